"""Part 2, transport throughput: N forked producers -> one consumer in this process.

Payloads: 100-byte lines, one call per line; and 4 KiB chunks (32 lines of 128 bytes), one call
per chunk. Every consumer counts the bytes it receives (not the newlines: bytes.count(b"\n") runs
at some 3 GB/s, slower than the ring itself), so every transport does the same work and a lost
write fails the measurement; lines/s is bytes/s over the line size. Transports:
- ring: safe_redirect's ring, low-level API (`Producer.append` per unit; the consumer reads every
  lane with `Segment.read`), one 1 MiB lane per producer;
- queue: one multiprocessing.Queue, put() per unit, get() per unit;
- pipe: one os.pipe, os.write() per unit (atomic: <= PIPE_BUF), os.read() of 64 KiB;
- faster-fifo: one faster_fifo.Queue (16 MiB), put() per unit, get_many() in the consumer;
- tail_log: a file per producer, os.write() per unit, tailed by torch.distributed.elastic's own
  `TailLog` (a thread per file, readline; its poll interval set to 1 ms, torch uses 0.1 s);
- e2e wrap / e2e fd: the library end to end: children print() (lines) or write() (chunks) to a
  stream hooked by install(mode="wrap"), or to fd 1 under install(mode="fd") (a pipe and a pump
  per child), counted in on_output; the clock stops when on_output has seen every byte.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import harness
from harness import BenchError, Children, Gate, check_count, log, rotated, summarize

import safe_redirect
from safe_redirect.record import Record
from safe_redirect.ring import REC_HEADER, Producer, Ring, Segment
from safe_redirect.stamp import Stamp

LINE_TEXT = "y" * 99 + "\n"  # 100 bytes
CHUNK_TEXT = ("z" * 127 + "\n") * 32  # 4096 bytes, 32 lines
PAYLOADS = {"line": LINE_TEXT, "chunk": CHUNK_TEXT}
PRODUCERS = (1, 2, 4, 8, 16)
TRANSPORTS = ("ring", "queue", "pipe", "faster-fifo", "tail_log", "e2e wrap", "e2e fd")

QUEUE_TARGET = 10.0  # ring / multiprocessing.Queue, lines per second: at least
PIPE_TARGET = 1.0  # ring / os.pipe, lines per second: at least
GBPS_TARGET = 1.0  # ring, 4 KiB chunks: GB/s (1e9 bytes per second), at least


@dataclass(frozen=True)
class Run:
    """One measurement: `nprod` producers, each sending `units` copies of `text`."""

    nprod: int
    text: str
    units: int

    @property
    def data(self) -> bytes:
        return self.text.encode()

    @property
    def bytes(self) -> int:
        return self.nprod * self.units * len(self.data)


def _send_rest(producer: Producer, data: bytes, sent: int) -> None:
    """What a full lane did not take: sleep until the consumer frees room (the lane's futex, as
    the library's own writers do), then retry."""
    while True:
        if sent < 0:
            raise BenchError("segment closed under a producer")
        data = data[sent:]
        if not data:
            return
        producer.wait_space(len(data) + REC_HEADER, 0.1)
        sent = producer.append(0, 0, data)


def _ring_producer(seg: Segment, gate: Gate, run: Run) -> None:
    """Claims its lane before the gate, so that the clock sees appends only."""
    me = Stamp.current()
    lane = seg.claim(me.pid, me.start_us, -1)
    if lane < 0:
        raise BenchError("no free lane")
    producer = seg.producer(lane)
    append, data, size = producer.append, run.data, len(run.data)
    gate.wait()
    for _ in range(run.units):
        sent = append(0, 0, data)
        if sent != size:
            _send_rest(producer, data, sent)


def run_ring(run: Run) -> float:
    ring = Ring.create(Stamp.current(), nlanes=max(16, run.nprod), lane_bytes=1 << 20)
    seg, gate = ring.segment, Gate()
    count = 0
    try:
        with Children() as kids:
            for _ in range(run.nprod):
                kids.spawn(functools.partial(_ring_producer, seg, gate, run),
                           close=gate.parent_ends)
            gate.wait_ready(run.nprod)
            lanes = seg.busy_lanes()  # every producer claimed its lane before it said ready
            read, expected = seg.read, run.bytes
            start = gate.go()
            while count < expected:
                got = 0
                for lane in lanes:
                    for _stream, _flags, _time_ns, payload, *_ in read(lane, 1 << 62):
                        got += len(payload)
                if got:
                    count += got
                else:
                    seg.wait(0.001)
            elapsed = time.perf_counter() - start
            kids.join()
            for lane in lanes:
                seg.free(lane)
    finally:
        gate.close()
        ring.close()
        ring.unlink()
    check_count(count, run.bytes)
    return elapsed


def _put_producer(queue: Any, gate: Gate, run: Run) -> None:
    """put() per unit, as a worker forwarding its output write by write would."""
    put, data = queue.put, run.data
    gate.wait()
    for _ in range(run.units):
        put(data)
    queue.close()
    queue.join_thread()  # os._exit would otherwise drop what the feeder thread still holds


def run_queue(run: Run) -> float:
    queue = multiprocessing.get_context("fork").Queue()
    gate = Gate()
    count = 0
    try:
        with Children() as kids:
            for _ in range(run.nprod):
                kids.spawn(functools.partial(_put_producer, queue, gate, run),
                           close=gate.parent_ends)
            gate.wait_ready(run.nprod)
            get = queue.get
            start = gate.go()
            for _ in range(run.nprod * run.units):
                count += len(get())
            elapsed = time.perf_counter() - start
            kids.join()
    finally:
        gate.close()
        queue.close()
        queue.join_thread()
    check_count(count, run.bytes)
    return elapsed


def _fifo_producer(queue: Any, gate: Gate, run: Run) -> None:
    put, data = queue.put, run.data
    gate.wait()
    for _ in range(run.units):
        put(data, timeout=harness.RUN_LIMIT)


def run_fifo(run: Run) -> float:
    try:
        import faster_fifo
    except ImportError as exc:
        raise BenchError(f"faster-fifo is not installed (pip install faster-fifo): {exc}") from exc
    queue = faster_fifo.Queue(max_size_bytes=16 << 20)
    gate = Gate()
    count = received = 0
    try:
        with Children() as kids:
            for _ in range(run.nprod):
                kids.spawn(functools.partial(_fifo_producer, queue, gate, run),
                           close=gate.parent_ends)
            gate.wait_ready(run.nprod)
            get_many, total = queue.get_many, run.nprod * run.units
            start = gate.go()
            while received < total:
                batch = get_many(timeout=harness.RUN_LIMIT)
                received += len(batch)
                count += sum(map(len, batch))
            elapsed = time.perf_counter() - start
            kids.join()
    finally:
        gate.close()
        queue.close()
    check_count(count, run.bytes)
    return elapsed


def _write_producer(fd: int, gate: Gate, run: Run) -> None:
    """os.write() per unit: into one shared pipe, or into a file of its own."""
    write, data = os.write, run.data
    gate.wait()
    for _ in range(run.units):
        write(fd, data)


def run_pipe(run: Run) -> float:
    r, w = os.pipe()
    gate = Gate()
    count = 0
    try:
        with Children() as kids:
            for _ in range(run.nprod):
                kids.spawn(functools.partial(_write_producer, w, gate, run),
                           close=(*gate.parent_ends, r))
            os.close(w)  # now EOF means every producer is gone
            w = -1
            gate.wait_ready(run.nprod)
            expected = run.bytes
            start = gate.go()
            while count < expected:
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break
                count += len(chunk)
            elapsed = time.perf_counter() - start
            kids.join()
    finally:
        gate.close()
        os.close(r)
        if w >= 0:
            os.close(w)
    check_count(count, run.bytes)
    return elapsed


class _TailSink:
    """TailLog's `dst`: counts the lines each tailing thread hands over (a thread only touches
    its own count, so no lock), and says when every thread has seen all of its file. TailLog
    hands over one line per call, with its header in front: lines are what it can count."""

    def __init__(self, nfiles: int, lines_per_file: int) -> None:
        self.counts: dict[int, int] = {}
        self.lines_per_file = lines_per_file
        self.nfiles = nfiles
        self.finished: list[int] = []
        self.done = threading.Event()

    def write(self, text: str) -> int:
        me = threading.get_ident()
        n = self.counts[me] = self.counts.get(me, 0) + text.count("\n")
        if n == self.lines_per_file:
            self.finished.append(me)
            if len(self.finished) == self.nfiles:
                self.done.set()
        return len(text)

    def flush(self) -> None:
        pass


def run_tail_log(run: Run) -> float:
    try:
        from torch.distributed.elastic.multiprocessing.tail_log import TailLog
    except ImportError as exc:
        raise BenchError(f"torch is not installed: {exc}") from exc
    gate = Gate()
    lines = run.nprod * run.units * run.text.count("\n")
    sink = _TailSink(run.nprod, lines // run.nprod)
    with tempfile.TemporaryDirectory(prefix="bench-tail-") as tmp:
        paths = {i: os.path.join(tmp, f"{i}.log") for i in range(run.nprod)}
        fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) for p in paths.values()]
        tail = TailLog("bench", paths, sink, interval_sec=0.001)  # type: ignore[arg-type]
        try:
            with Children() as kids:
                for fd in fds:
                    kids.spawn(functools.partial(_write_producer, fd, gate, run),
                               close=gate.parent_ends)
                gate.wait_ready(run.nprod)
                tail.start()
                start = gate.go()
                if not sink.done.wait(harness.RUN_LIMIT):
                    raise BenchError(f"tail_log: {sum(sink.counts.values())} of {lines} "
                                     "lines seen")
                elapsed = time.perf_counter() - start
                kids.join()
        finally:
            tail.stop()
            gate.close()
            for fd in fds:
                os.close(fd)
    check_count(sum(sink.counts.values()), lines, unit="lines")
    return elapsed


class CharCounter:
    """on_output callback: counts the characters (ASCII here: bytes) of the stdout records
    delivered; runs on the drain thread."""

    def __init__(self) -> None:
        self.chars = 0

    def __call__(self, record: Record) -> None:
        if record.stream == "stdout":
            self.chars += len(record.text)


def _e2e_producer(session: safe_redirect.Session, mode: str, hooked: TextIO, gate: Gate,
                  run: Run) -> None:
    """What user code in a worker does: print() each line, or write() each chunk, to a stream
    the library captures (wrap: the hooked stream inherited; fd: a stream on fd 1)."""
    stream = harness.fd1_stream() if mode == "fd" else hooked
    emit = (functools.partial(print, file=stream) if run.text == LINE_TEXT else stream.write)
    text = run.text[:-1] if run.text == LINE_TEXT else run.text
    emit(text)  # the first captured write claims this child's lane: keep it off the clock
    stream.flush()
    lane = harness.OwnLane(session) if mode == "fd" else None
    gate.wait()
    for _ in range(run.units):
        emit(text)
    stream.flush()
    if lane is not None:  # what the pump holds would be lost at os._exit: wait for it
        lane.wait(run.units * len(run.data))


def run_e2e(mode: str, run: Run, stats: list[dict[str, Any]]) -> float:
    """Children write under install(); timed until on_output has seen every line."""
    counter = CharCounter()
    stream = harness.devnull_stream()
    gate = Gate()
    expected = run.bytes
    with harness.as_stdout(stream):
        session = safe_redirect.install(counter, mode=mode, streams=("stdout",))
    try:
        with Children() as kids:
            for _ in range(run.nprod):
                kids.spawn(functools.partial(_e2e_producer, session, mode, stream, gate, run),
                           close=gate.parent_ends)
            gate.wait_ready(run.nprod)
            _wait_chars(counter, run.nprod * len(run.data), 30)  # the claiming writes
            counter.chars = 0  # the children wait at the gate: nothing is in flight
            start = gate.go()
            _wait_chars(counter, expected, harness.RUN_LIMIT)
            elapsed = time.perf_counter() - start
            kids.join()
        st = session.stats()
    finally:
        session.uninstall()
        gate.close()
        stream.close()
    stats.append({"stalls": st.stalls, "spilled_records": st.spilled_records,
                  "lane_misses": st.lane_misses, "callback_errors": st.callback_errors})
    check_count(counter.chars, expected, f" ({st})")
    return elapsed


def _wait_chars(counter: CharCounter, expected: int, timeout: float) -> None:
    """Until on_output has seen `expected` characters (polled: flush() would add its work)."""
    deadline = time.monotonic() + timeout
    while counter.chars < expected:
        if time.monotonic() > deadline:
            raise BenchError(f"{counter.chars} of {expected} bytes delivered after {timeout} s")
        time.sleep(0.0005)


def _sizes(scale: float) -> dict[str, dict[str, int]]:
    """Units per run, all producers together (split among them), per payload and transport."""
    base = {  # at scale 1 each run takes some 0.1-0.5 s on a 2-core machine
        "line": {"ring": 2_000_000, "queue": 100_000, "pipe": 600_000, "faster-fifo": 300_000,
                 "tail_log": 400_000, "e2e wrap": 1_000_000, "e2e fd": 1_000_000},
        "chunk": {"ring": 64_000, "queue": 16_000, "pipe": 32_000, "faster-fifo": 16_000,
                  "tail_log": 8_000, "e2e wrap": 32_000, "e2e fd": 32_000},
    }
    return {p: {t: max(1_600, int(n * scale)) for t, n in by.items()} for p, by in base.items()}


def measure(reps: int, scale: float, payloads: tuple[str, ...] = ("line", "chunk"),
            producers: tuple[int, ...] = PRODUCERS) -> dict[str, Any]:
    """Every transport for each payload and N, the transports of one repetition back to back
    in rotating order; lines/s and bytes/s from the same elapsed time."""
    sizes = _sizes(scale)
    out: dict[str, Any] = {"units_per_run": sizes, "payload_bytes": {
        p: len(PAYLOADS[p].encode()) for p in payloads}, "lines_per_unit": {
        p: PAYLOADS[p].count("\n") for p in payloads}}
    for payload in payloads:
        text = PAYLOADS[payload]
        out[payload] = {}
        for nprod in producers:
            log(f"  {payload}, {nprod} producer(s)")
            e2e_stats: dict[str, list[dict[str, Any]]] = {"e2e wrap": [], "e2e fd": []}
            runners: dict[str, Callable[[Run], float]] = {
                "ring": run_ring, "queue": run_queue, "pipe": run_pipe,
                "faster-fifo": run_fifo, "tail_log": run_tail_log,
                "e2e wrap": functools.partial(run_e2e, "wrap", stats=e2e_stats["e2e wrap"]),
                "e2e fd": functools.partial(run_e2e, "fd", stats=e2e_stats["e2e fd"]),
            }
            rates: list[dict[str, float]] = []
            errors: dict[str, str] = {}
            for rep in range(reps + 1):
                rate: dict[str, float] = {}  # bytes per second
                for name in rotated(TRANSPORTS, rep):
                    if name in errors:
                        continue
                    run = Run(nprod, text, max(1, sizes[payload][name] // nprod))
                    try:
                        with harness.fd1_on_devnull():  # e2e fd: the children's terminal
                            elapsed = runners[name](run)
                        rate[name] = run.bytes / elapsed
                    except BenchError as exc:
                        errors[name] = f"rep {rep}: {exc}"
                        log(f"    {name} FAILED: {errors[name]}")
                if rep:
                    rates.append(rate)
            per_line = len(text.encode()) / text.count("\n")
            row: dict[str, Any] = {}
            for name in TRANSPORTS:
                got = [r[name] for r in rates if name in r]
                row[name] = {"bytes_per_s": summarize(got),
                             "lines_per_s": summarize([x / per_line for x in got])}
            for top in ("ring", "e2e wrap", "e2e fd"):
                for bottom in ("queue", "pipe", "faster-fifo", "tail_log"):
                    row[f"{top}/{bottom}"] = summarize(
                        [r[top] / r[bottom] for r in rates if top in r and bottom in r])
            row["e2e_stats"] = e2e_stats
            row["errors"] = errors
            out[payload][str(nprod)] = row
    return out
