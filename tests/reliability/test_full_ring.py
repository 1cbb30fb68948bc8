"""Fault 2: a full ring, under every overflow policy (see overflow.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

import safe_redirect
from safe_redirect import Record

from ..conftest import fork_call, lines_by_origin, wait_pid
from .faults import run_fault


@pytest.mark.parametrize("mode", ["wrap", "fd"])
@pytest.mark.parametrize(("policy", "callback"), [
    ("block", "slow"), ("block", "stuck"), ("spill", "slow"), ("spill", "stuck")])
def test_a_full_ring_holds_its_overflow_policy_exactly(policy, callback, mode) -> None:
    # fd mode: more than a child's pipe holds (1 MiB), or a child ends before its lane is full
    lines = 20_000 if mode == "wrap" else 40_000
    tally = run_fault("full_ring", runs=2, policy=policy, callback=callback, mode=mode,
                      lines=lines)
    assert tally.problems == [] and tally.hangs == 0
    assert tally.written == 2 * 2 * lines
    assert tally.lost == tally.duplicated == 0
    assert tally.delivered + tally.spilled == tally.written
    if (policy, callback) == ("block", "slow"):  # back-pressure: everything, nothing spilled
        assert tally.delivered == tally.written and tally.notes["stalls"] > 0
    else:
        assert tally.notes["spilled bytes"] > 0 and tally.spilled > 0


MEMORY_SCRIPT = """
    import json, os, resource, sys, time
    import safe_redirect

    def peak_kib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    seen = {"chars": 0, "records": 0}
    def slow(record):  # slower than the producer; keeps nothing
        seen["chars"] += len(record.text)
        seen["records"] += 1
        time.sleep(0.001)

    line = "m" * 99 + "\\n"
    batch = line * 10_000  # 1 MB per write
    before = peak_kib()
    with safe_redirect.install(slow, lane_bytes=1 << 20) as session:
        pid = os.fork()
        if pid == 0:
            for _ in range(int(sys.argv[1])):
                sys.stdout.write(batch)
            sys.stdout.flush()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        session.flush(60)
        stats = session.stats()
    print(json.dumps({"growth_kib": peak_kib() - before, "chars": seen["chars"],
                      "spilled": stats.spilled_bytes, "status": status}), file=sys.stderr)
"""


@pytest.mark.timeout(120)
def test_memory_stays_bounded_while_a_fast_producer_outruns_a_slow_callback(tmp_path) -> None:
    """300 MB through 1 MiB lanes to a callback that sleeps on every record: the master's peak
    memory grows by a few lanes' worth, not by what was written (nothing queues up unbounded)."""
    megabytes = 300
    script = tmp_path / "memory.py"
    script.write_text(textwrap.dedent(MEMORY_SCRIPT))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFE_REDIRECT_")}
    done = subprocess.run([sys.executable, str(script), str(megabytes)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          timeout=110)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stderr.strip().splitlines()[-1])
    assert figures["status"] == 0 and figures["spilled"] == 0
    assert figures["chars"] == megabytes * 1_000_000  # every byte: the block policy waits
    assert figures["growth_kib"] < 64 * 1024, figures  # not the 300 MB written


def test_block_keeps_a_writer_waiting_while_the_master_reads_other_lanes() -> None:
    """A stall is the master reading nothing at all. Here a pass over the eight full lanes takes
    0.8 s (0.1 s of callback per lane), longer than stall_timeout, but the master reads some lane
    every 0.1 s: no writer may spill. (Found by this suite: the writers watched their own lane
    only, and under load eight children printing to stdout and stderr lost a quarter of their
    lines to spills.)"""
    records: list[Record] = []

    def slow(record: Record) -> None:
        time.sleep(0.1)
        records.append(record)

    lines = [f"line {i:04d} " + "x" * 90 for i in range(120)]  # three lanes' worth each
    with safe_redirect.install(slow, lane_bytes=4096, stall_timeout=0.5) as session:
        def child() -> None:
            for line in lines:
                print(line)

        pids = [fork_call(child) for _ in range(8)]
        assert all(wait_pid(pid, 100) == 0 for pid in pids)
        assert session.flush(timeout=60)
        stats = session.stats()
    assert stats.spilled_bytes == 0 and stats.stalls > 0
    by_origin = lines_by_origin(records)
    assert all(by_origin[(pid, "stdout")] == lines for pid in pids)
