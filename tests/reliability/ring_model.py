"""Fault 8: the ring against a model. Any interleaving of writes (of any size, larger than the
lane included), flushes, reads (of any size bound) and lane recycling, over several lanes and both
streams: per lane and stream, the bytes read are the bytes written, in order, once; and rebuilt
into text by the drain's LaneReader, they are exactly what the written bytes decode to.

`run_ops` is the checker; tests/reliability/test_ring_model.py drives it with hypothesis, the
figures script with seeded random operation lists (`ring_model`).
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from dataclasses import dataclass

from safe_redirect.lanereader import LaneReader
from safe_redirect.ring import Ring
from safe_redirect.stamp import Stamp

from ..internals import FLAG_FLUSH
from .tally import Tally


@dataclass(frozen=True)
class Write:
    lane: int
    stream: int
    data: bytes


@dataclass(frozen=True)
class Flush:
    lane: int
    stream: int


@dataclass(frozen=True)
class Read:
    lane: int
    max_bytes: int


@dataclass(frozen=True)
class Recycle:
    """Drain a lane, free it (its owner gone) and claim it again for a new owner."""

    lane: int


Op = Write | Flush | Read | Recycle


@dataclass
class Outcome:
    writes: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    problems: list[str] | None = None


class _Lane:
    """One lane incarnation: what its producer wrote, what its consumer read."""

    def __init__(self, ring: Ring, index: int, owner: int) -> None:
        claimed = ring.segment.claim(owner, 1, -1)
        assert claimed == index, (claimed, index)
        self.producer = ring.segment.producer(index)
        self.reader = LaneReader(owner, 1, None)
        self.sent: dict[int, bytearray] = defaultdict(bytearray)
        self.got: dict[int, bytearray] = defaultdict(bytearray)
        # text per stream as the reader must rebuild it: each flush ends a decoding segment
        self.segments: dict[int, list[bytes]] = defaultdict(lambda: [b""])
        self.text: dict[int, str] = defaultdict(str)


def run_ops(ops: list[Op], lanes: int = 3, lane_bytes: int = 4096) -> Outcome:
    outcome = Outcome(problems=[])
    assert outcome.problems is not None
    ring = Ring.create(Stamp.current(), nlanes=lanes, lane_bytes=lane_bytes)
    owners = iter(range(os.getpid() * 1000, os.getpid() * 1000 + 1_000_000))
    try:
        state = [_Lane(ring, i, next(owners)) for i in range(lanes)]

        def read(lane: int, max_bytes: int = 1 << 62) -> None:
            s = state[lane]
            records = ring.segment.read(lane, max_bytes)
            for stream, flags, _t, payload, _thread, _rank in records:
                if not flags & FLAG_FLUSH:
                    s.got[stream] += payload
                    outcome.bytes_read += len(payload)
            for record in s.reader.feed(records):
                s.text[0 if record.stream == "stdout" else 1] += record.text

        def check(lane: int) -> None:
            s = state[lane]
            for record in s.reader.flush():
                s.text[0 if record.stream == "stdout" else 1] += record.text
            for stream in (0, 1):
                if bytes(s.got[stream]) != bytes(s.sent[stream]):
                    outcome.problems.append(f"lane {lane} stream {stream}: read "
                                            f"{len(s.got[stream])} bytes, not the "
                                            f"{len(s.sent[stream])} written")
                want = "".join(seg.decode("utf-8", "replace") for seg in s.segments[stream])
                if s.text[stream] != want:
                    outcome.problems.append(f"lane {lane} stream {stream}: rebuilt text differs")

        for op in ops:
            s = state[op.lane]
            if isinstance(op, Write):
                outcome.writes += 1
                outcome.bytes_written += len(op.data)
                s.sent[op.stream] += op.data
                s.segments[op.stream][-1] += op.data
                done = s.producer.append(op.stream, 0, op.data)
                while done < len(op.data):  # full: the consumer makes room, then the rest
                    read(op.lane)
                    done += s.producer.append(op.stream, 0, op.data[done:])
            elif isinstance(op, Flush):
                # a marker that finds no room is not written (append() says 0 either way: the
                # tail tells); the reader then has no flush to end its decoding segment at
                tail = ring.lane_info(op.lane).tail
                s.producer.append(op.stream, FLAG_FLUSH, b"")
                if ring.lane_info(op.lane).tail != tail:
                    s.segments[op.stream].append(b"")
            elif isinstance(op, Read):
                read(op.lane, op.max_bytes)
            else:
                read(op.lane)
                check(op.lane)
                ring.segment.free(op.lane)
                state[op.lane] = _Lane(ring, op.lane, next(owners))
        for lane in range(lanes):
            read(lane)
            check(lane)
    finally:
        ring.close()
        ring.unlink()
    return outcome


def random_ops(rng: random.Random, count: int, lanes: int = 3, lane_bytes: int = 4096,
               ) -> list[Op]:
    ops: list[Op] = []
    alphabet = [b"a", b"\n", b"\r", b"\xe2\x98\x83", b"\xff", b"\xc3", b"\x00", b"xyz"]
    for _ in range(count):
        lane = rng.randrange(lanes)
        kind = rng.random()
        if kind < 0.55:
            size = rng.choice([rng.randint(0, 64), rng.randint(0, lane_bytes),
                               rng.randint(lane_bytes, 3 * lane_bytes)])
            if rng.random() < 0.5:
                data = rng.randbytes(size)
            else:
                data = b"".join(rng.choice(alphabet) for _ in range(size))
            ops.append(Write(lane, rng.randrange(2), data))
        elif kind < 0.65:
            ops.append(Flush(lane, rng.randrange(2)))
        elif kind < 0.95:
            ops.append(Read(lane, rng.randint(1, 2 * lane_bytes)))
        else:
            ops.append(Recycle(lane))
    return ops


def ring_model(runs: int = 200, ops: int = 60, seed: int = 8) -> Tally:
    tally = Tally(fault="ring model: random interleavings")
    rng = random.Random(seed)
    for run in range(runs):
        tally.runs += 1
        outcome = run_ops(random_ops(rng, ops))
        tally.written += outcome.writes
        tally.note("bytes written", outcome.bytes_written)
        tally.note("bytes read", outcome.bytes_read)
        if outcome.problems:
            tally.lost += outcome.writes
            for problem in outcome.problems:
                tally.problem(f"run {run}: {problem}")
        else:
            tally.delivered += outcome.writes
    return tally
