"""Fault 5: PID reuse. A dead process's pid handed to a new process must not fool the stamps.

Real reuse: the kernel gives the next process the pid after /proc/sys/kernel/ns_last_pid, which
root may write (CAP_SYS_ADMIN in the pid namespace). Each run:
- lane: child A prints lines and a partial line into its lane and is SIGKILLed; before the drain
  reaps its lane, a new process B is forked with A's pid. The drain must see that the lane's owner
  is dead (B's start time is not the stamp's), deliver A's lines, the partial one included, and
  free the lane, while B, alive with that pid, is left alone;
- segment: a master (a fresh interpreter) creates a segment and is SIGKILLed; a new process takes
  its pid; sweep_orphaned_segments() must still remove the segment (its master stamp is dead).
Where ns_last_pid cannot be written the lane part simulates reuse: the lane's owner pid is set to
a live process of another start time (noted in the figures as simulated).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import safe_redirect
from safe_redirect import Record
from safe_redirect.ring import sweep_orphaned_segments

from .. import internals
from .tally import Tally, reap, wait_until

NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"


def can_reuse_pids() -> bool:
    try:
        with open(NS_LAST_PID, "r+") as f:
            f.write(f.read().strip())
        return True
    except OSError:
        return False


def _idle_until_read(fd: int) -> Callable[[], None]:
    def body() -> None:
        os.read(fd, 1)
        os._exit(0)  # no flush, no atexit: it must never write (and claim a lane)
    return body


def fork_with_pid(pid: int, body: Callable[[], None], attempts: int = 50) -> int | None:
    """Fork a child that gets `pid` (free and reaped); None if the kernel would not give it.
    Other processes on the machine may take it first: a few tries."""
    for _ in range(attempts):
        try:
            with open(NS_LAST_PID, "w") as f:
                f.write(str(pid - 1))
        except OSError:
            return None
        child = os.fork()
        if child == 0:
            body()
        if child == pid:
            return child
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    return None


def pid_reuse(runs: int = 5, lines: int = 50) -> Tally:
    real = can_reuse_pids()
    tally = Tally(fault="PID reuse" + ("" if real else " (simulated)"))
    for run in range(runs):
        tally.runs += 1
        _lane_of_a_reused_pid(tally, run, lines, real)
        if real:
            _segment_of_a_reused_pid(tally, run)
    return tally


def _lane_of_a_reused_pid(tally: Tally, run: int, lines: int, real: bool) -> None:
    records: list[Record] = []
    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()
    session = safe_redirect.install(records.append)
    internals.reap_only_on_flush(session)  # no reap until the pid is taken again
    try:
        a = os.fork()
        if a == 0:
            for i in range(lines):
                print(f"A line {i}")
            sys.stdout.write("A's partial line")
            os.write(ready_w, b"1")
            time.sleep(3600)  # alive until SIGKILLed
        os.read(ready_r, 1)
        time.sleep(0.03)  # start times are kept in clock ticks: B must start ticks later
        os.kill(a, signal.SIGKILL)
        os.waitpid(a, 0)
        lane = internals.lane_of(session, a)
        if lane is None:
            tally.problem(f"run {run}: A's lane was reaped before its pid was reused")
            return
        if real:
            b = fork_with_pid(a, _idle_until_read(release_r))
            if b is None:
                tally.note("runs where the kernel would not give the pid again")
                return
        else:
            b = os.fork()
            if b == 0:
                _idle_until_read(release_r)()
            _set_owner_pid(session, lane, b)
        try:
            b_start = _start_us(b)
            owner = internals.lane_info(session, lane)
            if owner.owner_pid != b or b_start == owner.owner_start_us:
                tally.problem(f"run {run}: the set-up failed: lane owner {owner.owner_pid} "
                              f"start {owner.owner_start_us}, B {b} start {b_start}")
                return
            tally.note("lanes owned by a reused pid")
            reclaimed = session.stats().lanes_reclaimed
            if not session.flush(timeout=30):
                tally.hang(f"run {run}: flush")
            expected = [f"A line {i}" for i in range(lines)] + ["A's partial line"]
            got = [line for r in records if r.pid == a for line in r.text.splitlines()]
            tally.count_lines(f"run {run}: A, dead, its pid reused", expected, got)
            if internals.lane_info(session, lane).owner_pid == b:
                tally.problem(f"run {run}: the lane of dead A was kept for live B")
            if session.stats().lanes_reclaimed != reclaimed + 1:
                tally.problem(f"run {run}: A's lane was not reclaimed")
            if not psutil_alive(b):
                tally.problem(f"run {run}: B died")
        finally:
            os.write(release_w, b"1")
            if reap(b, 30) is None:
                tally.hang(f"run {run}: B")
    finally:
        session.uninstall()
        for fd in (ready_r, ready_w, release_r, release_w):
            os.close(fd)


def _segment_of_a_reused_pid(tally: Tally, run: int) -> None:
    script = ("import os, signal\nfrom safe_redirect.ring import Ring\n"
              "from safe_redirect.stamp import Stamp\n"
              "r = Ring.create(Stamp.current(), 1, 4096)\nprint(r.name, os.getpid(), flush=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFE_REDIRECT_")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env=env)
    name, pid = done.stdout.split()
    release_r, release_w = os.pipe()
    taker = fork_with_pid(int(pid), _idle_until_read(release_r))
    try:
        if taker is None:
            tally.note("runs where the kernel would not give the pid again")
            os.unlink(f"/dev/shm/{name}")
            return
        tally.note("segments whose master's pid was reused")
        sweep_orphaned_segments()  # (another capture starting on this machine may sweep too)
        if os.path.exists(f"/dev/shm/{name}"):
            tally.problem(f"run {run}: a segment whose master's pid was reused was kept")
            os.unlink(f"/dev/shm/{name}")
    finally:
        os.write(release_w, b"1")
        if taker is not None and reap(taker, 30) is None:
            tally.hang(f"run {run}: the process that took the master's pid")
        os.close(release_r)
        os.close(release_w)


def _start_us(pid: int) -> int:
    import psutil

    return round(psutil.Process(pid).create_time() * 1_000_000)


def psutil_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _set_owner_pid(session: safe_redirect.Session, lane: int, pid: int) -> None:
    """Simulated reuse: the lane's owner pid is that of another process."""
    internals.set_lane_owner(session, lane, pid)
    wait_until(lambda: internals.lane_info(session, lane).owner_pid == pid, 1.0)
