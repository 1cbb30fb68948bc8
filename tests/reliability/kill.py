"""Fault 1: a child SIGKILLed in the middle of writing a record.

Each run forks a child that writes numbered records of mixed sizes (a few bytes up to a whole lane,
so that large writes are cut into several records and wait for room) as fast as it can, and kills
it at a random point, one of three ways:
- "kill": SIGKILL at a random moment after fork (before, during or after it claims its lane);
- "stop": once it has written, SIGSTOP at a random moment, then SIGKILL (the stopped child is
  mostly inside some write: its terminal write, the hook, or waiting for room);
- "hook": the child asks `internals.stop_inside_next_record(stage)` before a random write and stops
  itself inside the ring copy of that record: after its header (stage 1), after half its payload
  (2), or with everything copied and counted but the tail not yet published (3); the master sees
  the record's bytes past the published tail ("caught mid-record"), then SIGKILLs it.
The child notes in shared memory how many writes it started and completed. After the kill the
master flushes, and the child's delivered text must be an exact prefix of what it wrote (no torn
record, no duplicate, no foreign byte) that covers every write that completed; the drain must
report no error and the child's lane must be free again.
"""

from __future__ import annotations

import mmap
import os
import random
import signal
import struct
import sys
import time

import safe_redirect
from safe_redirect import Record

from .. import internals
from .tally import Tally, child_exit, common_prefix_length, reap, wait_until

_PROGRESS = struct.Struct("=QQ")  # writes started, writes completed
MODES = ("kill", "stop", "hook")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def record_text(run: int, i: int, size: int) -> str:
    """Write number `i` of run `run`: `size` characters, unique, one line."""
    head = f"<{run:05d}.{i:07d}>"
    return head + _LETTERS[i % 26] * max(0, size - len(head) - 1) + "\n"


def record_sizes(rng: random.Random, lane_bytes: int, count: int = 4096) -> list[int]:
    half = lane_bytes // 2
    sizes = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.6:
            sizes.append(rng.randint(16, 200))
        elif kind < 0.85:
            sizes.append(rng.randint(1_000, 8_000))
        else:
            sizes.append(rng.randint(half // 2, 2 * half))  # up to two records' worth
    return sizes


def _write_forever(run: int, sizes: list[int], progress: mmap.mmap, devnull: int,
                   stop_at: tuple[int, int] = (-1, 0)) -> None:
    """Write records flat out; before write `stop_at[0]`, arm the stop at stage `stop_at[1]`."""
    os.dup2(devnull, 1)  # the terminal: not the point here
    i = 0
    give_up = time.monotonic() + 120  # the test kills it long before; never outlive a lost test
    while i & 0xFFF or time.monotonic() < give_up:
        if i == stop_at[0]:
            internals.stop_inside_next_record(stop_at[1])
        _PROGRESS.pack_into(progress, 0, i + 1, i)
        sys.stdout.write(record_text(run, i, sizes[i % len(sizes)]))
        _PROGRESS.pack_into(progress, 0, i + 1, i + 1)
        i += 1


def caught_mid_record(session: safe_redirect.Session, pid: int, size: int,
                      since_ns: int) -> bool:
    """Whether stopped child `pid` is inside the ring copy of a write of `size` characters: the
    header of its (first) record, written after `since_ns`, lies at the published tail."""
    lane = internals.lane_of(session, pid)
    if lane is None:
        return False
    length, stream, time_ns = internals.record_header_at(
        session, lane, internals.lane_info(session, lane).tail)
    chunk = min(size, internals.ring_of(session).segment.lane_bytes // 2 - internals.REC_HEADER)
    return length == chunk and stream == 0 and time_ns >= since_ns


def kill_mid_write(runs: int = 500, seed: int = 1, lane_bytes: int = 1 << 16) -> Tally:
    tally = Tally(fault="child SIGKILLed mid-write")
    rng = random.Random(seed)
    records: list[Record] = []
    progress = mmap.mmap(-1, _PROGRESS.size)  # MAP_SHARED: the children's counters
    devnull = os.open(os.devnull, os.O_WRONLY)
    session = safe_redirect.install(records.append, lane_bytes=lane_bytes, lanes=4)
    errors_before = internals.drain_errors(session)
    try:
        for run in range(runs):
            tally.runs += 1
            mode = MODES[run % len(MODES)]
            sizes = record_sizes(rng, lane_bytes)
            stop_at = (rng.randint(0, 20), rng.randint(1, 3)) if mode == "hook" else (-1, 0)
            _PROGRESS.pack_into(progress, 0, 0, 0)
            since_ns = time.time_ns()
            pid = os.fork()
            if pid == 0:
                child_exit(lambda run=run, sizes=sizes, stop_at=stop_at: _write_forever(
                    run, sizes, progress, devnull, stop_at))
            if mode == "kill":
                time.sleep(rng.uniform(0, 0.004))  # the fault: a random moment to kill
            else:
                if mode == "stop":
                    if not wait_until(lambda: _PROGRESS.unpack_from(progress)[1] >= 1, 30.0):
                        tally.hang(f"run {run}: the child never completed a write")
                    time.sleep(rng.uniform(0, 0.002))  # the fault: a random moment
                    os.kill(pid, signal.SIGSTOP)
                state = _stopped(pid, 30.0)
                if state == "running":
                    tally.hang(f"run {run}: the child never stopped")
                elif state == "exited":
                    tally.problem(f"run {run}: the writer exited by itself")
                    continue
                started, completed = _PROGRESS.unpack_from(progress)
                if started > completed:
                    tally.note("stopped inside a write")
                    i = started - 1
                    if caught_mid_record(session, pid, sizes[i % len(sizes)], since_ns):
                        tally.note(f"caught mid-record ({mode})")
                if mode == "hook":
                    tally.note("hook runs")
            os.kill(pid, signal.SIGKILL)
            if reap(pid, 30.0) is None:
                tally.hang(f"run {run}: the killed child did not go")
            started, completed = _PROGRESS.unpack_from(progress)
            if not session.flush(timeout=30):
                tally.hang(f"run {run}: flush after the kill")
            _check_run(tally, session, records, run, pid, sizes, completed)
        errors = internals.drain_errors(session) - errors_before
        if errors:
            tally.problem(f"the drain reported {errors} errors (a torn or corrupt record)")
    finally:
        session.uninstall()
        os.close(devnull)
    return tally


def _stopped(pid: int, timeout: float) -> str:
    """Wait (bounded) until child `pid` stops: "stopped", "exited" (reaped) or "running"."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG | os.WUNTRACED)
        if done:
            return "stopped" if os.WIFSTOPPED(status) else "exited"
        time.sleep(0.0005)
    return "running"


def _check_run(tally: Tally, session: safe_redirect.Session, records: list[Record], run: int,
               pid: int, sizes: list[int], completed: int) -> None:
    batch = records[:]
    del records[:len(batch)]
    text = "".join(r.text for r in batch if r.pid == pid)
    foreign = [r for r in batch if r.pid != pid]
    if foreign:
        tally.problem(f"run {run}: records of another process: {foreign[0]!r:.100}")
    expected_parts: list[str] = []
    size = 0
    i = 0
    while size < len(text) or i < completed:
        part = record_text(run, i, sizes[i % len(sizes)])
        expected_parts.append(part)
        size += len(part)
        i += 1
    expected = "".join(expected_parts)
    whole = text.count("\n")
    delivered_of_completed = min(whole, completed)
    tally.written += completed
    tally.delivered += delivered_of_completed
    tally.note("in-flight writes delivered", max(0, whole - completed))
    if not expected.startswith(text):
        at = common_prefix_length(text, expected)
        tally.problem(f"run {run}: delivered text departs from what was written at char {at}: "
                      f"{text[max(0, at - 20): at + 40]!r}")
        ids = [line.split(">", 1)[0] for line in text.splitlines()]
        tally.duplicated += len(ids) - len(set(ids))
    completed_chars = len("".join(expected_parts[:completed]))
    if len(text) < completed_chars:
        lost = completed - delivered_of_completed
        tally.lost += max(lost, 1)
        tally.problem(f"run {run}: {completed_chars - len(text)} characters of completed writes "
                      "never delivered")
    if internals.lane_of(session, pid) is not None:
        tally.problem(f"run {run}: the dead child's lane was not reclaimed")
