"""Part 3, latency: from a child's write to the moment the master sees the line.

A probe child writes one 80-byte line every 2 ms, `L <perf_counter_ns> <i>`, and flushes it
(print(..., flush=True)); the master reads the clock when the line reaches it and keeps the
difference (perf_counter is CLOCK_MONOTONIC, one clock for every process on Linux). Transports:
- wrap / fd: install(mode=...), the probe prints to the captured stream, the master's clock is read
  in on_output (the drain thread);
- pipe (the baseline: the kernel's own wake-up): the probe os.write()s its line into a pipe that a
  thread of the master reads.
Conditions: idle (the probe alone) and under load (two more children write 80-byte lines flat out
through the same transport: printing under the same capture, or 4080-byte blocks into the pipe).
Per run: p50, p99 and max over the probe's lines; the table gives the median run, (min-max).
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

import harness
from harness import BenchError, Children, log, percentile, rotated, summarize

import safe_redirect
from safe_redirect.drain import Record

INTERVAL = 0.002  # seconds between the probe's lines
LOAD_CHILDREN = 2
TARGET_P99_MS = 2.0  # idle, p99: at most
TRANSPORTS = ("wrap", "fd", "pipe")
CONDITIONS = ("idle", "load")
LOAD_LINE = "load " + "x" * 74  # 80 bytes with the newline; no "L " in it


def _probe_line(i: int) -> str:
    return f"L {time.perf_counter_ns()} {i} ".ljust(79, ".")


class Latencies:
    """Collects now - t for every probe line `L <t> ...` in the text it is given."""

    def __init__(self) -> None:
        self.ns: list[int] = []

    def text(self, text: str, now: int) -> None:
        if "L " not in text:
            return
        for line in text.splitlines():
            if line.startswith("L "):
                self.ns.append(now - int(line.split()[1]))

    def __call__(self, record: Record) -> None:  # on_output
        self.text(record.text, time.perf_counter_ns())


# -- children


def _probe(emit: Callable[[str], object], n: int, delay: float) -> None:
    emit("warm-up: this child's first write claims its lane".ljust(79, "."))
    time.sleep(delay)
    for i in range(n):
        emit(_probe_line(i))
        time.sleep(INTERVAL)


def _load(emit: Callable[[str], object], until: float, stop: int) -> None:
    """Write flat out until `stop` (a non-blocking pipe) reaches EOF, or `until` at the latest."""
    while time.monotonic() < until:
        for _ in range(500):
            emit(LOAD_LINE)
        try:
            if not os.read(stop, 1):
                return
        except BlockingIOError:
            pass


def _captured_child(body: Callable[[Callable[[str], object]], None], mode: str,
                    session: safe_redirect.Session, hooked: TextIO) -> None:
    """A child printing under the capture: to the hooked stream (wrap) or to fd 1 (fd), each
    probe line flushed; in fd mode it waits for its pump before it exits."""
    stream = harness.fd1_stream() if mode == "fd" else hooked
    lane = harness.OwnLane(session) if mode == "fd" else None
    written = 0

    def emit(line: str) -> None:
        nonlocal written
        print(line, file=stream, flush=line.startswith("L "))
        written += len(line) + 1

    body(emit)
    stream.flush()
    if lane is not None:
        lane.wait(written)


def _pipe_child(body: Callable[[Callable[[str], object]], None], fd: int, block: int) -> None:
    """A child writing into the pipe: each probe line alone, load lines in blocks of `block`."""
    if block == 1:
        body(lambda line: os.write(fd, (line + "\n").encode()))
        return
    data = ((LOAD_LINE + "\n") * block).encode()  # 4080 bytes: one atomic write (<= PIPE_BUF)
    body(lambda line: os.write(fd, data))


# -- one run


class Load:
    """The probe's body and the load children's; under load the probe starts 0.1 s late, and
    the load stops once the probe is done (stop(): the children see EOF on a pipe)."""

    def __init__(self, n: int, load: bool) -> None:
        delay = 0.1 if load else 0.02
        until = time.monotonic() + delay + n * INTERVAL * 3 + 2.0
        self._stop_r, self._stop_w = os.pipe()
        os.set_blocking(self._stop_r, False)
        self.probe = functools.partial(_probe, n=n, delay=delay)
        self.loads = [functools.partial(_load, until=until, stop=self._stop_r)] * (
            LOAD_CHILDREN if load else 0)

    def run(self, kids: Children, spawn: Callable[[Callable[..., None]], int]) -> None:
        """Start the load and the probe, wait for the probe, stop the load, reap everybody."""
        for body in self.loads:
            spawn(body)
        probe = spawn(self.probe)
        _, status = os.waitpid(probe, 0)
        kids.pids.remove(probe)
        self.close()
        kids.join()
        if os.waitstatus_to_exitcode(status):
            raise BenchError(f"the probe failed: exit code {os.waitstatus_to_exitcode(status)}")

    def close(self) -> None:
        for fd in (self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)
        self._stop_r = self._stop_w = -1


def run_captured(mode: str, load: bool, n: int) -> list[int]:
    sink = Latencies()
    stream = harness.devnull_stream()
    with harness.as_stdout(stream):
        session = safe_redirect.install(sink, mode=mode, streams=("stdout",))
    bodies = Load(n, load)
    try:
        with Children() as kids:
            bodies.run(kids, lambda body: kids.spawn(
                functools.partial(_captured_child, body, mode, session, stream)))
        deadline = time.monotonic() + 10
        while len(sink.ns) < n and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        bodies.close()
        session.uninstall()
        stream.close()
    if len(sink.ns) != n:
        raise BenchError(f"{len(sink.ns)} of {n} probe lines seen")
    return sink.ns


def run_pipe(load: bool, n: int) -> list[int]:
    sink = Latencies()
    r, w = os.pipe()

    def reader() -> None:
        rest = b""
        while chunk := os.read(r, 1 << 16):
            now = time.perf_counter_ns()
            text = rest + chunk
            cut = text.rfind(b"\n") + 1
            rest = text[cut:]
            if b"L " in text:
                sink.text(text[:cut].decode(), now)

    thread = threading.Thread(target=reader, name="bench-pipe-reader", daemon=True)
    thread.start()
    bodies = Load(n, load)
    try:
        with Children() as kids:
            bodies.run(kids, lambda body: kids.spawn(functools.partial(
                _pipe_child, body, w, 1 if body is bodies.probe else 51), close=(r,)))
        os.close(w)
        w = -1
        thread.join(10)
    finally:
        bodies.close()
        if w >= 0:
            os.close(w)
        if not thread.is_alive():
            os.close(r)
    if thread.is_alive():
        raise BenchError("the pipe reader did not finish")
    if len(sink.ns) != n:
        raise BenchError(f"{len(sink.ns)} of {n} probe lines seen")
    return sink.ns


def measure(reps: int, probes: int) -> dict[str, Any]:
    """Each repetition runs every transport and condition, in rotating order."""
    configs = [(t, c) for c in CONDITIONS for t in TRANSPORTS]
    samples: dict[str, dict[str, list[float]]] = {
        f"{t} {c}": {"p50": [], "p99": [], "max": []} for t, c in configs}
    errors: dict[str, str] = {}
    with harness.fd1_on_devnull():  # the terminal of the fd-mode children
        for rep in range(reps + 1):
            log(f"  repetition {rep}" + (" (warm-up)" if rep == 0 else ""))
            for transport, condition in rotated(configs, rep):
                key = f"{transport} {condition}"
                if key in errors:
                    continue
                try:
                    if transport == "pipe":
                        ns = run_pipe(condition == "load", probes)
                    else:
                        ns = run_captured(transport, condition == "load", probes)
                except BenchError as exc:
                    errors[key] = f"rep {rep}: {exc}"
                    log(f"    {key} FAILED: {errors[key]}")
                    continue
                if rep == 0:
                    continue
                ns.sort()
                for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0)):
                    samples[key][name].append(percentile(ns, q) / 1e6)  # ms
    out: dict[str, Any] = {"probes": probes, "interval_ms": INTERVAL * 1e3,
                           "load_children": LOAD_CHILDREN, "target_p99_ms": TARGET_P99_MS,
                           "errors": errors}
    for key, by in samples.items():
        out[key] = {name: summarize(values) for name, values in by.items()}
    return out
