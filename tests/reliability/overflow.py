"""Fault 2: a full ring. Producers far faster than the drain, under every overflow policy.

The lanes are small (4 KiB) and the callback is slow (sleeps on every record) or stuck (blocks until
the producers are done). What each policy promises, as documented in README.md ("Full lane"):
- "block" (the default): a writer whose lane is full waits while the master keeps reading:
  with a slow callback every line is delivered, in order, nothing spilled;
- "block" with a stuck callback: after `stall_timeout` seconds without progress the writer spills
  (its bytes already reached the terminal) and goes on without waiting: no deadlock;
- "spill": a writer never waits; what does not fit is spilled.
In every case the terminal shows every line once, in order, and the accounting is exact: bytes
delivered + bytes spilled (stats().spilled_bytes) == bytes written. Lines that arrive keep their
order and arrive once, whole or, where the policy spilled the rest of a line, cut short (never
joined with another line, never a tail without its head).
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import safe_redirect
from safe_redirect import Record

from .tally import Tally, child_exit, reap

CALLBACKS = ("slow", "stuck")


def line_text(run: int, producer: int, i: int) -> str:
    return f"run {run} producer {producer} line {i:06d} " + "o" * (i % 40)


def _produce(run: int, producer: int, lines: int, terminal: str | None) -> None:
    if terminal is not None:  # wrap mode
        fd = os.open(terminal, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 1)
    else:  # fd mode: fd 1 is the child's pipe; pytest's own sys.stdout does not write to fd 1
        sys.stdout = open(1, "w", closefd=False)
    for i in range(lines):
        print(line_text(run, producer, i))
    sys.stdout.flush()


def full_ring(runs: int = 2, policy: str = "block", callback: str = "slow",
              producers: int = 2, lines: int = 20_000, lane_bytes: int = 4096,
              stall_timeout: float = 0.3, mode: str = "wrap") -> Tally:
    tally = Tally(fault=f"full ring: overflow={policy}, {callback} callback, {mode} mode")
    with tempfile.TemporaryDirectory(prefix="safe_redirect-overflow-") as tmp:
        for run in range(runs):
            tally.runs += 1
            if mode == "fd":
                _one_fd_run(tally, Path(tmp), run, policy, callback, producers, lines,
                            lane_bytes, stall_timeout)
            else:
                _one_run(tally, Path(tmp), run, policy, callback, producers, lines, lane_bytes,
                         stall_timeout)
    return tally


def _one_fd_run(tally: Tally, tmp: Path, run: int, policy: str, callback: str, producers: int,
                lines: int, lane_bytes: int, stall_timeout: float) -> None:
    """fd mode: the children's pumps fill their lanes (the C pump waits for room, then the
    policy). Their terminal is the master's: one file, where the pumps' copies interleave; it
    must hold every byte once."""
    terminal = tmp / f"terminal-{run}"
    saved = os.dup(1)
    fd = os.open(terminal, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.close(fd)
    try:
        _one_run(tally, tmp, run, policy, callback, producers, lines, lane_bytes, stall_timeout,
                 mode="fd")
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    written = sum(len(line_text(run, k, i)) + 1 for k in range(producers) for i in range(lines))
    shown = terminal.stat().st_size
    if shown != written:
        tally.problem(f"run {run}: the terminal got {shown} bytes of {written}")


def _one_run(tally: Tally, tmp: Path, run: int, policy: str, callback: str, producers: int,
             lines: int, lane_bytes: int, stall_timeout: float, mode: str = "wrap") -> None:
    records: list[Record] = []
    producers_done = threading.Event()

    def on_output(record: Record) -> None:
        if callback == "slow":
            time.sleep(0.0002)
        elif not producers_done.wait(60):
            tally.hang("the stuck callback was never released")
        records.append(record)

    # fd mode: stdout only, or the children's own "lane full" warnings (fd 2) would be captured
    streams = ("stdout",) if mode == "fd" else ("stdout", "stderr")
    session = safe_redirect.install(on_output, lane_bytes=lane_bytes, overflow=policy,
                                    stall_timeout=stall_timeout, mode=mode, streams=streams)
    try:
        terminals: list[str | None] = [
            None if mode == "fd" else str(tmp / f"terminal-{run}-{k}") for k in range(producers)]
        pids = []
        for k in range(producers):
            pid = os.fork()
            if pid == 0:
                child_exit(lambda k=k: _produce(run, k, lines, terminals[k]))
            pids.append(pid)
        for pid in pids:
            code = reap(pid, 60.0)
            if code is None:
                tally.hang(f"run {run}: producer {pid} blocked ({policy}, {callback} callback)")
            elif code != 0:
                tally.problem(f"run {run}: producer {pid} exited {code}")
        producers_done.set()
        if not session.flush(timeout=60):
            tally.hang(f"run {run}: flush")
        stats = session.stats()
    finally:
        producers_done.set()
        session.uninstall()
    written_bytes = delivered_bytes = 0
    for k, pid in enumerate(pids):
        expected = [line_text(run, k, i) for i in range(lines)]
        written_bytes += sum(len(line) + 1 for line in expected)
        mine = [r for r in records if r.pid == pid and r.stream == "stdout"]
        text = "".join(r.text for r in mine)
        delivered_bytes += len(text.encode())
        terminal_file = terminals[k]
        terminal = (expected if terminal_file is None  # fd mode: _one_fd_run counts its bytes
                    else Path(terminal_file).read_text().splitlines())
        if terminal != expected:
            tally.problem(f"run {run}: producer {k}'s terminal does not show its lines, once, "
                          "in order")
        # per Record, as lines_by_origin does: a line cut short by a spill is a Record's end
        got = [line for r in mine for line in r.text.splitlines()]
        want = set(expected)
        cut = [line for line in got if line not in want]
        got = [line for line in got if line in want]
        tally.note("lines cut short by a spill", len(cut))
        for line in cut:  # fd mode cuts anywhere in a line: a read ends where it ends
            if not any(e.startswith(line) for e in expected):
                tally.problem(f"run {run}: a line that was never written: {line[:100]!r}")
                break
        if policy == "block" and callback == "slow":
            tally.count_lines(f"run {run} producer {k}", expected, got)
        else:
            missing = len(expected) - len(set(got) & set(expected))
            tally.count_lines(f"run {run} producer {k}", expected, got, exact_order=False,
                              spilled=missing)
    spilled = stats.spilled_bytes
    tally.note("spilled bytes", spilled)
    tally.note("stalls", stats.stalls)
    if delivered_bytes + spilled != written_bytes:
        tally.problem(f"run {run}: {written_bytes} bytes written, {delivered_bytes} delivered + "
                      f"{spilled} spilled")
        tally.lost += 1
    if policy == "block" and callback == "slow" and spilled:
        tally.problem(f"run {run}: the block policy spilled {spilled} bytes while the master "
                      "was reading")
    if callback == "stuck" and not spilled:
        tally.problem(f"run {run}: nothing spilled although the master never read")
