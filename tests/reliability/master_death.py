"""Fault 3: the master SIGKILLed while its children print.

Each run starts a master (a fresh interpreter) that installs a capture with small lanes, starts
children of three kinds — a multiprocessing fork child, an os.fork() child that ends with
sys.exit(), a spawned interpreter attached through SAFE_REDIRECT_ATTACH — that print flat out, and
SIGKILLs itself at a random moment while they do. Each child prints until its parent is gone and
then `lines` lines more, so the kill always lands while all three print. Promises checked:
- no child blocks or crashes: each one finishes its lines and exits within a bound (with "block",
  a child whose lane fills notices the dead master and detaches; with "spill" it never waits);
- each child's terminal shows every line it printed, once, in order (the fallback);
- what the master's on_output got before it died is, per child, lines it wrote, once, in order;
- the segment is not leaked: once the children are gone, /dev/shm holds nothing of the master.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from .faults import segments_of
from .tally import Tally, is_subsequence, wait_until

KINDS = ("multiprocessing", "fork-exit", "spawn")

_CHILD_WORK = """
def work(k, lines, tmp, master):
    import os, sys
    fd = os.open(f"{tmp}/terminal-{k}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    with open(f"{tmp}/pid-{k}", "w") as out:
        out.write(str(os.getpid()))
    import time
    i = 0
    give_up = time.monotonic() + 60  # never print for ever, whatever happens to the test
    while os.getppid() == master and time.monotonic() < give_up:
        # print until the master is gone, then `lines` more
        for _ in range(100):
            print(f"child {k} line {i}")
            i += 1
    for _ in range(lines):
        print(f"child {k} line {i}")
        i += 1
    sys.stdout.flush()
    with open(f"{tmp}/done-{k}", "w") as out:
        out.write(str(i))
"""

_MASTER = """
import multiprocessing, os, signal, subprocess, sys, time
import safe_redirect

policy, lines, delay, tmp = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
log = os.open(f"{tmp}/log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

def on_output(record):
    os.write(log, "".join(f"{record.pid} {line}\\n"
                          for line in record.text.splitlines()).encode())

if __name__ == "__main__":
    safe_redirect.install(on_output, lane_bytes=4096, overflow=policy, stall_timeout=0.5)
    print("segment", os.getpid(), file=sys.stderr, flush=True)
    me = os.getpid()
    if os.fork() == 0:
        work(1, lines, tmp, me)
        sys.exit(0)
    multiprocessing.get_context("fork").Process(target=work, args=(0, lines, tmp, me)).start()
    spawned = ("import sys\\n" + CHILD_WORK +
               "\\nwork(2, int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))\\n")
    subprocess.Popen([sys.executable, "-c", spawned, str(lines), tmp, str(me)])
    time.sleep(delay)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def master_script() -> str:
    """The master's program: the children's work, its source (for the spawned child), the rest."""
    return _CHILD_WORK + f"CHILD_WORK = {_CHILD_WORK!r}\n" + _MASTER


def master_death(runs: int = 4, policies: tuple[str, ...] = ("block", "spill"),
                 lines: int = 20_000, seed: int = 3) -> Tally:
    tally = Tally(fault="master SIGKILLed while children print")
    rng = random.Random(seed)
    for run in range(runs):
        tally.runs += 1
        with tempfile.TemporaryDirectory(prefix="safe_redirect-master-death-") as tmp:
            _one_run(tally, run, Path(tmp), policies[run % len(policies)], lines,
                     rng.uniform(0.05, 0.3))
    return tally


def _one_run(tally: Tally, run: int, tmp: Path, policy: str, lines: int, delay: float) -> None:
    script = master_script()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFE_REDIRECT_")}
    try:
        master = subprocess.run([sys.executable, "-c", script, policy, str(lines), str(delay),
                                 str(tmp)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                timeout=60, env=env)
    except subprocess.TimeoutExpired:
        tally.hang(f"run {run}: the master did not die")
        return
    if master.returncode != -signal.SIGKILL:
        tally.problem(f"run {run}: the master exited {master.returncode}: {master.stderr[-800:]}")
        return
    master_pid = int(master.stderr.split("segment ")[1].split()[0])
    children = len(KINDS)
    if not wait_until(lambda: all((tmp / f"done-{k}").exists() for k in range(children)), 60,
                      step=0.01):
        tally.hang(f"run {run} ({policy}): a child never finished after the master died")
    pids = [int((tmp / f"pid-{k}").read_text() or 0) for k in range(children)
            if (tmp / f"pid-{k}").exists()]
    if not wait_until(lambda: not any(_running(pid) for pid in pids), 30, step=0.01):
        tally.hang(f"run {run} ({policy}): a child did not exit")
        for pid in pids:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    leaked = segments_of(master_pid)
    if leaked:
        tally.problem(f"run {run} ({policy}): segment left in /dev/shm after the children "
                      f"exited: {leaked}")
        for name in leaked:
            os.unlink(f"/dev/shm/{name}")
    log = (tmp / "log").read_text() if (tmp / "log").exists() else ""
    if log and not log.endswith("\n"):
        log = log[: log.rfind("\n") + 1]  # the kill cut the callback's last write short
    for k in range(children):
        done = tmp / f"done-{k}"
        total = int(done.read_text() or 0) if done.exists() else 0
        expected = [f"child {k} line {i}" for i in range(total)]
        terminal_file = tmp / f"terminal-{k}"
        terminal = terminal_file.read_text().splitlines() if terminal_file.exists() else []
        tally.count_lines(f"run {run} ({policy}) {KINDS[k]} child's terminal", expected, terminal)
        if k < len(pids):
            prefix = f"{pids[k]} "
            got = [line[len(prefix):] for line in log.splitlines() if line.startswith(prefix)]
            tally.note("lines on_output got before the kill", len(got))
            # "spill" may have left lines out while the master lived: a subsequence then
            if (got != expected[: len(got)] if policy == "block"
                    else not is_subsequence(got, expected)):
                tally.duplicated += len(got) - len(set(got))
                tally.problem(f"run {run} ({policy}): what on_output got of the {KINDS[k]} "
                              "child is not its lines, once, in order")


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
