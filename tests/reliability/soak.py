"""Fault 7: load. N producer processes print M numbered lines each as fast as they can, to one
master whose callback checks every line as it comes: per producer, each number exactly once and in
order; at the end every count complete. CI runs a small M; `pytest --soak` runs 8 x 1,000,000.
"""

from __future__ import annotations

import multiprocessing
import sys
import time

import safe_redirect
from safe_redirect import Record

from .tally import Tally


def _produce(k: int, lines: int) -> None:
    write = sys.stdout.write
    for i in range(lines):
        write(f"producer {k} line {i}\n")
    sys.stdout.flush()


class OrderChecker:
    """Runs on the drain thread: the next expected number per producer, and what broke it."""

    def __init__(self, producers: int) -> None:
        self.next = [0] * producers
        self.duplicated = 0
        self.skipped = 0  # numbers jumped over (lost, or out of order)
        self.foreign = 0
        self.first_problem = ""

    def __call__(self, record: Record) -> None:
        expect = self.next
        for line in record.text.splitlines():
            parts = line.split(" ")
            if len(parts) != 4 or parts[0] != "producer":
                self.foreign += 1
                self.first_problem = self.first_problem or f"foreign line {line[:80]!r}"
                continue
            k, i = int(parts[1]), int(parts[3])
            if i == expect[k]:
                expect[k] = i + 1
            elif i < expect[k]:
                self.duplicated += 1
                self.first_problem = self.first_problem or f"producer {k}: {i} again"
            else:
                self.skipped += i - expect[k]
                self.first_problem = self.first_problem or f"producer {k}: {expect[k]}..{i - 1}"
                expect[k] = i + 1


def soak(producers: int = 8, lines: int = 1_000_000, runs: int = 1) -> Tally:
    tally = Tally(fault=f"soak: {producers} producers x {lines:,} lines")
    fork = multiprocessing.get_context("fork")
    for run in range(runs):
        tally.runs += 1
        check = OrderChecker(producers)
        t0 = time.monotonic()
        with safe_redirect.install(check) as session:
            children = [fork.Process(target=_produce, args=(k, lines)) for k in range(producers)]
            for child in children:
                child.start()
            for child in children:
                child.join(max(120.0, lines / 5_000))
                if child.exitcode is None:
                    tally.hang(f"run {run}: producer {child.pid}")
                    child.kill()
                    child.join()
                elif child.exitcode != 0:
                    tally.problem(f"run {run}: producer {child.pid} exited {child.exitcode}")
            if not session.flush(timeout=120):
                tally.hang(f"run {run}: flush")
            stats = session.stats()
        tally.note("seconds producing and delivering", round(time.monotonic() - t0))
        tally.written += producers * lines
        delivered = sum(min(n, lines) for n in check.next) - check.skipped
        tally.delivered += delivered
        tally.lost += producers * lines - delivered
        tally.duplicated += check.duplicated
        if check.first_problem:
            tally.problem(f"run {run}: {check.first_problem}")
        if check.foreign:
            tally.problem(f"run {run}: {check.foreign} lines never written")
        if stats.spilled_bytes or stats.lane_misses:
            tally.problem(f"run {run}: {stats.spilled_bytes} bytes spilled, "
                          f"{stats.lane_misses} lane misses")
        tally.note("stalls (a producer waited for room)", stats.stalls)
    return tally
