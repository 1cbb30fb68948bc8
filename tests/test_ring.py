"""The shared-memory lanes, driven directly: framing, wrap-around, full lanes, claims, wake-ups."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safe_redirect.ring import Producer, Ring, Segment, sweep_orphaned_segments
from safe_redirect.stamp import Stamp

from . import internals
from .conftest import fork_call, wait_for, wait_pid


@pytest.fixture
def ring() -> Iterator[Ring]:
    ring = Ring.create(Stamp.current(), nlanes=8, lane_bytes=4096)
    yield ring
    ring.close()
    ring.unlink()


def claim(ring: Ring, pid: int = 0) -> Producer:
    lane = ring.segment.claim(pid or os.getpid(), 1, -1)
    assert lane >= 0
    return ring.segment.producer(lane)


def timed_in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[tuple[Any, float]]]:
    """Start `call()` on a thread; the list receives (its result, the seconds it took)."""
    done: list[tuple[Any, float]] = []

    def run() -> None:
        t0 = time.monotonic()
        result = call()
        done.append((result, time.monotonic() - t0))

    thread = threading.Thread(target=run)
    thread.start()
    return thread, done


def read_all(ring: Ring, lane: int) -> list[tuple[int, int, bytes]]:
    return [(stream, flags, payload) for stream, flags, _, payload, *_ in
            ring.segment.read(lane, 1 << 62)]


def test_records_round_trip_joined_per_stream(ring: Ring) -> None:
    p = claim(ring)
    assert p.append(0, 0, b"hello ") == 6
    assert p.append(0, 0, b"world\n") == 6
    assert p.append(1, 0, b"oops\n") == 5
    assert p.append(0, internals.FLAG_FLUSH, b"") == 0
    assert p.append(0, 0, b"tail") == 4
    assert read_all(ring, p.lane) == [
        (0, 0, b"hello world\n"), (1, 0, b"oops\n"), (0, internals.FLAG_FLUSH, b""),
        (0, 0, b"tail")]
    assert ring.segment.read(p.lane, 1 << 62) == []


def test_records_wrap_around_the_ring_end(ring: Ring) -> None:
    p = claim(ring)
    sent = bytearray()
    for i in range(200):  # 200 x ~40 bytes: the 4 KiB lane wraps several times
        data = f"record {i:04d} {'x' * (i % 13)}\n".encode()
        assert p.append(0, 0, data) == len(data)
        sent += data
        if i % 7 == 0:
            got = b"".join(payload for _, _, payload in read_all(ring, p.lane))
            assert sent.startswith(got)
            del sent[: len(got)]
    assert b"".join(payload for _, _, payload in read_all(ring, p.lane)) == bytes(sent)


def test_a_write_larger_than_the_lane_is_split_not_refused(ring: Ring) -> None:
    p = claim(ring)
    data = bytes(range(256)) * 64  # 16 KiB into a 4 KiB lane
    got = bytearray()
    offset = 0
    while offset < len(data):
        n = p.append(0, 0, data[offset:])
        assert n >= 0
        offset += n
        got += b"".join(payload for _, _, payload in read_all(ring, p.lane))
    got += b"".join(payload for _, _, payload in read_all(ring, p.lane))
    assert bytes(got) == data


def test_a_full_lane_reports_what_fit_and_loses_nothing(ring: Ring) -> None:
    p = claim(ring)
    accepted = 0
    while True:
        n = p.append(0, 0, b"y" * 100)
        if n == 0:
            break
        accepted += n
    assert 3000 < accepted < 4096
    info = ring.lane_info(p.lane)
    assert info.bytes == accepted
    assert sum(len(payload) for _, _, payload in read_all(ring, p.lane)) == accepted
    assert p.append(0, 0, b"y" * 100) == 100  # room again once read


def test_a_closed_segment_detaches_its_producers(ring: Ring) -> None:
    p = claim(ring)
    ring.segment.mark_closed()
    assert p.append(0, 0, b"late\n") == -1
    assert not p.live


def test_a_released_segment_is_never_touched(ring: Ring) -> None:
    p = claim(ring)
    ring.close()
    assert p.append(0, 0, b"after close\n") == -1
    with pytest.raises(ValueError, match="released"):
        ring.segment.busy_lanes()


def test_claims_from_many_processes_get_distinct_lanes() -> None:
    ring = Ring.create(Stamp.current(), nlanes=16, lane_bytes=4096)
    try:
        def child() -> None:
            lane = ring.segment.claim(os.getpid(), 1, -1)
            p = ring.segment.producer(lane)
            p.append(0, 0, f"{os.getpid()}\n".encode())

        pids = [fork_call(child) for _ in range(16)]
        assert all(wait_pid(pid, 30) == 0 for pid in pids)
        busy = ring.segment.busy_lanes()
        assert len(busy) == 16
        owners = {ring.lane_info(lane).owner_pid for lane in busy}
        assert owners == set(pids)
        for lane in busy:  # each lane holds exactly its owner's record
            payload = b"".join(p for _, _, _, p, *_ in ring.segment.read(lane, 1 << 62))
            assert payload == f"{ring.lane_info(lane).owner_pid}\n".encode()
        assert ring.segment.claim(os.getpid(), 1, -1) == -1
        assert ring.segment.lane_misses == 1
        ring.segment.free(busy[0])
        assert ring.segment.claim(os.getpid(), 1, -1) == busy[0]
    finally:
        ring.close()
        ring.unlink()


def test_a_producer_process_and_a_consumer_agree_byte_for_byte() -> None:
    ring = Ring.create(Stamp.current(), nlanes=2, lane_bytes=8192)
    try:
        expected = b"".join(f"{i:06d} {'z' * (i % 50)}\n".encode() for i in range(50_000))

        def produce() -> None:
            p = ring.segment.producer(ring.segment.claim(os.getpid(), 1, -1))
            view = memoryview(expected)
            offset = 0
            while offset < len(view):
                chunk = view[offset: offset + 1 + (offset % 997)]
                n = p.append(0, 0, chunk)
                while n < len(chunk):  # full: the consumer frees space concurrently
                    os.sched_yield()
                    n += p.append(0, 0, chunk[n:])
                offset += len(chunk)

        pid = fork_call(produce)
        got = bytearray()
        deadline = time.monotonic() + 60
        while len(got) < len(expected) and time.monotonic() < deadline:
            for lane in ring.segment.busy_lanes():
                got += b"".join(p for _, _, _, p, *_ in ring.segment.read(lane, 1 << 62))
            ring.segment.wait(0.01)
        assert wait_pid(pid, 30) == 0
        assert bytes(got) == expected
    finally:
        ring.close()
        ring.unlink()


def test_wait_returns_when_a_producer_publishes(ring: Ring) -> None:
    p = claim(ring)
    thread, woke = timed_in_thread(lambda: ring.segment.wait(60.0))
    wait_for(lambda: internals.drain_waits_on_doorbell(ring), what="the consumer to sleep")
    p.append(0, 0, b"ding\n")
    thread.join(30)
    assert not thread.is_alive()  # woken: not the 60 s timeout
    assert woke[0][0] is False  # it slept: no data was waiting when it began
    assert ring.segment.wait(0.0) is True  # data waiting: no sleep at all


def test_wait_times_out_when_nothing_comes(ring: Ring) -> None:
    t0 = time.monotonic()
    assert ring.segment.wait(0.05) is False
    assert 0.04 < time.monotonic() - t0 < 2.0


def test_attach_by_name_sees_the_same_lanes(ring: Ring) -> None:
    p = claim(ring)
    other = Ring.attach(ring.name)
    try:
        assert other.master == ring.master
        p.append(1, 0, b"shared\n")
        assert other.segment.read(p.lane, 1 << 62)[0][3] == b"shared\n"
    finally:
        other.close()


def test_garbage_is_not_a_segment() -> None:
    with pytest.raises(ValueError, match="not a safe_redirect segment"):
        Segment(bytearray(4096))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.binary(min_size=0, max_size=9000), st.just(None)), max_size=60))
def test_any_interleaving_of_writes_and_reads_delivers_the_bytes_in_order(ops) -> None:
    """None = a read; bytes = a write (up to twice the lane), retried until it fits."""
    ring = Ring.create(Stamp.current(), nlanes=1, lane_bytes=4096)
    try:
        p = ring.segment.producer(ring.segment.claim(os.getpid(), 1, -1))
        sent, got = bytearray(), bytearray()
        for op in ops:
            if op is None:
                got += b"".join(x for _, _, _, x, *_ in ring.segment.read(0, 1 << 62))
                continue
            sent += op
            offset = p.append(0, 0, op)
            while offset < len(op):
                got += b"".join(x for _, _, _, x, *_ in ring.segment.read(0, 1 << 62))
                offset += p.append(0, 0, op[offset:])
        got += b"".join(x for _, _, _, x, *_ in ring.segment.read(0, 1 << 62))
        assert bytes(got) == bytes(sent)
    finally:
        ring.close()
        ring.unlink()


def test_a_producer_waiting_for_room_wakes_when_the_consumer_reads(ring: Ring) -> None:
    p = claim(ring)
    while p.append(0, 0, b"f" * 500) == 500:
        pass
    assert p.wait_space(600, 0.01) is False  # full, and nobody reads
    thread, woke = timed_in_thread(lambda: p.wait_space(600, 60.0))
    wait_for(lambda: internals.producer_waits_for_room(ring, p.lane),
             what="the producer to sleep")
    assert thread.is_alive()
    ring.segment.read(p.lane, 1 << 62)
    thread.join(30)
    assert not thread.is_alive()  # woken: not the 60 s timeout
    assert woke[0][0] is True


def test_segments_of_a_master_that_died_are_swept_and_live_ones_kept() -> None:
    script = ("import os, signal\nfrom safe_redirect.ring import Ring\n"
              "from safe_redirect.stamp import Stamp\n"
              "r = Ring.create(Stamp.current(), 1, 4096)\nprint(r.name, flush=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    orphan = done.stdout.strip()
    assert os.path.exists(f"/dev/shm/{orphan}")
    live = Ring.create(Stamp.current(), nlanes=1, lane_bytes=4096)
    try:
        removed = sweep_orphaned_segments()
        assert orphan in removed and live.name not in removed
        assert not os.path.exists(f"/dev/shm/{orphan}")
        assert os.path.exists(live.path)
    finally:
        live.close()
        live.unlink()


def test_a_producer_out_of_room_cuts_the_consumers_pause_short(ring: Ring) -> None:
    """Between passes the drain pauses without arming the doorbell (no system call per write),
    but a writer whose lane is full must not wait out the pause."""
    p = claim(ring)
    while p.append(0, 0, b"f") == 1:  # full to the last record's worth
        pass
    thread, _ = timed_in_thread(lambda: ring.segment.pause(60.0))
    wait_for(lambda: thread.native_id is not None
             and internals.asleep_on_doorbell(ring, thread.native_id),
             what="the consumer to pause on the doorbell")
    rung = internals.doorbell_rings(ring)
    assert p.append(0, 0, b"ordinary write\n") == 0  # full: an ordinary write rings nothing
    assert internals.doorbell_rings(ring) == rung and thread.is_alive()
    p.wait_space(600, 0.01)  # out of room: it rings the bell
    thread.join(30)
    assert not thread.is_alive()  # cut short: not the 60 s pause
