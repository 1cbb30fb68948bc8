"""Fault 1: a child SIGKILLed in the middle of writing a record (see kill.py)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

import safe_redirect
from safe_redirect import Record

from .. import internals
from ..conftest import fork_call, lines_by_origin, wait_for, wait_pid
from .faults import run_fault
from .kill import caught_mid_record


@pytest.mark.timeout(120)
def test_children_killed_at_500_random_points_lose_no_completed_write_and_tear_nothing() -> None:
    tally = run_fault("kill_mid_write", runs=500)
    assert tally.problems == [] and tally.hangs == 0
    assert tally.runs == 500 and tally.written > 1000
    assert tally.delivered == tally.written and tally.lost == tally.duplicated == 0
    # every third run stops the child inside the ring copy of a record before it is killed
    assert tally.notes["caught mid-record (hook)"] == tally.notes["hook runs"] > 150


def _stopped(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG | os.WUNTRACED)
        if done:
            return os.WIFSTOPPED(status)
        time.sleep(0.001)
    return False


SHAPES = {
    "small": 60,  # one record
    "wrapping": 700,  # one record across the end of the ring
    "split": 3000,  # larger than half the lane: two records, one tail store
}


@pytest.mark.parametrize("then", ["SIGKILL", "SIGCONT"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_writer_stopped_inside_a_record_then_killed_or_resumed(stage, shape, then) -> None:
    """Stage 1: header copied; 2: half the payload; 3: all copied and counted, tail unpublished.
    Killed there, the record never arrives, torn or whole, and all before it does; resumed, it
    arrives whole."""
    records: list[Record] = []
    size = SHAPES[shape]
    before = [f"before {i:03d} " + "b" * 40 for i in range(40)]  # ~2 KiB: the wrap lands inside
    record = f"<the record> {'r' * (size - 14)}\n"

    def child() -> None:
        for line in before:
            print(line)
        internals.stop_inside_next_record(stage)
        sys.stdout.write(record)

    with safe_redirect.install(records.append, lane_bytes=4096) as session:
        since = time.time_ns()
        pid = fork_call(child)
        assert _stopped(pid), "the child never stopped inside its write"
        assert caught_mid_record(session, pid, len(record), since)
        os.kill(pid, getattr(signal, then))
        code = wait_pid(pid, 30)
        assert code == (-signal.SIGKILL if then == "SIGKILL" else 0)
        assert session.flush(timeout=30)
        assert internals.drain_errors(session) == 0
        lane_owners = {info.owner_pid for info in internals.lanes(session).values()}
    text = "".join(r.text for r in records if r.pid == pid)
    expected = "".join(line + "\n" for line in before)
    assert text == (expected if then == "SIGKILL" else expected + record)
    assert pid not in lane_owners  # reclaimed


def test_a_writer_killed_while_it_waits_for_room_loses_nothing_it_published() -> None:
    release = threading.Event()
    records: list[Record] = []

    def stuck(record: Record) -> None:
        release.wait(30)
        records.append(record)

    r, w = os.pipe()
    with safe_redirect.install(stuck, lane_bytes=4096, stall_timeout=60) as session:
        def child() -> None:
            for i in range(100_000):
                os.write(w, b"+")  # one byte per write started
                print(f"waiting writer {i:06d} " + "w" * 50)

        pid = fork_call(child)
        wait_for(lambda: session.stats().stalls >= 1, 30, "the writer to wait for room")
        os.kill(pid, signal.SIGKILL)
        wait_pid(pid, 30)
        os.set_blocking(r, False)
        started = 0
        while True:  # the writes it started, all in the pipe now that it is gone
            try:
                n = len(os.read(r, 65536))
            except BlockingIOError:
                break
            started += n
        release.set()
        assert session.flush(timeout=30)
        stats = session.stats()
    os.close(r)
    os.close(w)
    lines = lines_by_origin(records)[(pid, "stdout")]
    assert 20 < len(lines) <= started < 100_000  # it was blocked in a write, not done
    assert lines == [f"waiting writer {i:06d} " + "w" * 50 for i in range(len(lines))]
    assert stats.stalls >= 1 and stats.spilled_bytes == 0
