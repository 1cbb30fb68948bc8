"""Benchmarks of safe_redirect's hot paths: what a captured print costs, and how fast lines move.

    python benchmarks/bench_core.py           # default sizes, a few minutes
    python benchmarks/bench_core.py --quick   # small sizes, under a minute

1. print cost: ns per `print()` of an 80-byte line to a devnull stream object, hooked by
   `safe_redirect.install()` or not, in a forked child (the case the library exists for) and in
   the master. The hooked and the plain stream objects live side by side, so every repetition
   measures both back to back and the ratio is taken within the repetition.
2. throughput: lines/s of 100-byte lines from 1, 2, 4, 8 forked producers to one consumer in this
   process, through safe_redirect's ring (low-level API), multiprocessing.Queue, one os.pipe, and
   end to end (children `print()` under `install()`, counted in `on_output`).

Every figure is a rate or a ratio measured in this run against a baseline measured in the same
repetition; the table shows the median over the repetitions that follow one discarded warm-up,
with (min-max). The machine may be shared and noisy: the load average is recorded with the results
in benchmarks/results/bench_core.json.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import multiprocessing
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

import safe_redirect
from safe_redirect.drain import Record
from safe_redirect.ring import Ring, Segment
from safe_redirect.stamp import Stamp

RESULTS = Path(__file__).resolve().parent / "results" / "bench_core.json"

PRINT_TEXT = "x" * 79  # print() adds the newline: an 80-byte line
LINE_TEXT = "y" * 99  # the 100-byte line of the throughput runs, as text and as bytes
LINE = (LINE_TEXT + "\n").encode()
PRODUCERS = (1, 2, 4, 8)
TRANSPORTS = ("ring", "queue", "pipe", "e2e")
TRANSPORT_NAMES = {"ring": "ring (direct)", "queue": "mp.Queue", "pipe": "os.pipe",
                   "e2e": "end-to-end"}

PRINT_TARGET = 1.3  # hooked / unhooked child print: at most
QUEUE_TARGET = 10.0  # ring / multiprocessing.Queue lines per second: at least

RUN_LIMIT = 60  # seconds one measurement may take before its children are killed
CHILD_LIMIT = 120  # seconds any child lives at most, even if this process is stuck or gone
TOTAL_LIMIT = {"quick": 180, "default": 900}  # seconds for the whole run; main() sets _deadline
_deadline = float("inf")  # time.monotonic() after which no measurement starts or continues


@dataclass(frozen=True)
class Sizes:
    """How much work one repetition does; `reps` repetitions are kept after one warm-up."""

    reps: int
    prints: int  # timed print() calls per process and repetition
    ring_lines: int  # lines per producer: ring and pipe
    queue_lines: int  # lines per producer: multiprocessing.Queue, some 10x slower
    e2e_lines: int  # lines per producer: print() under install()


QUICK = Sizes(reps=5, prints=50_000, ring_lines=50_000, queue_lines=5_000, e2e_lines=20_000)
DEFAULT = Sizes(reps=9, prints=200_000, ring_lines=200_000, queue_lines=20_000,
                e2e_lines=200_000)


def log(message: str) -> None:
    """Progress goes to stderr, so that stdout carries the table only."""
    print(message, file=sys.stderr, flush=True)


# -- forked children that cannot hang the benchmark


class BenchError(RuntimeError):
    """A measurement that could not be completed: timeout, failed child, lost lines."""


def _child_main(body: Callable[[], object], close: Iterable[int]) -> NoReturn:
    """In a forked child: run `body` under the child's own alarm, leave by os._exit only."""
    code = 1
    try:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)  # default action: the child dies
        signal.alarm(CHILD_LIMIT)
        for fd in close:
            os.close(fd)
        body()
        code = 0
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(code)


class Children:
    """The forked children of one measurement, under a deadline.

    SIGALRM interrupts whatever this process blocks in (read, Queue.get, waitpid) once `limit`
    seconds have passed or the whole run's time is up, and on leaving the block every child not
    yet reaped is killed and reaped: nothing outlives its measurement, whatever went wrong.
    """

    def __init__(self, limit: float = RUN_LIMIT) -> None:
        self.limit = limit
        self.pids: list[int] = []
        self._previous: Any = None

    def __enter__(self) -> Children:
        limit = min(self.limit, _deadline - time.monotonic())
        if limit <= 0:
            raise BenchError("the overall time limit has passed")

        def expire(signum: int, frame: object) -> None:
            raise BenchError(f"timed out after {limit:.3g} s")

        self._previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, limit)
        return self

    def __exit__(self, *exc_info: object) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._previous)
        for pid in self.pids:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue  # already reaped: the pid may belong to somebody else by now
            if not done:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        self.pids.clear()

    def spawn(self, body: Callable[[], object], close: Iterable[int] = ()) -> int:
        """Fork a child that runs `body` after closing the fds in `close`, then exits."""
        pid = os.fork()
        if pid == 0:
            _child_main(body, close)
        self.pids.append(pid)
        return pid

    def join(self) -> None:
        """Reap every child; one that did not exit with 0 fails the measurement."""
        codes = []
        while self.pids:
            _, status = os.waitpid(self.pids[0], 0)
            self.pids.pop(0)
            codes.append(os.waitstatus_to_exitcode(status))
        if any(codes):
            raise BenchError(f"children failed, exit codes {codes}")


class Gate:
    """A start line for forked producers: each says it is ready, then all are let go at once,
    so that forking and setting up are kept out of the clock."""

    def __init__(self) -> None:
        self.ready_r, self.ready_w = os.pipe()
        self.go_r, self.go_w = os.pipe()

    @property
    def parent_ends(self) -> tuple[int, int]:
        """What a child must close: otherwise the release (EOF on go_r) would never come."""
        return self.ready_r, self.go_w

    def wait(self) -> None:
        """In a child: report ready, block until released."""
        os.write(self.ready_w, b"r")
        os.read(self.go_r, 1)

    def wait_ready(self, n: int) -> None:
        """In the parent, after forking `n` children: wait until all of them are ready."""
        os.close(self.ready_w)
        self.ready_w = -1
        got = 0
        while got < n:
            chunk = os.read(self.ready_r, n - got)
            if not chunk:
                raise BenchError("a producer died before the start")
            got += len(chunk)

    def go(self) -> float:
        """Release the children; returns the start time (perf_counter)."""
        start = time.perf_counter()
        os.close(self.go_w)
        self.go_w = -1
        return start

    def close(self) -> None:
        for fd in (self.ready_r, self.ready_w, self.go_r, self.go_w):
            if fd >= 0:
                os.close(fd)
        self.ready_r = self.ready_w = self.go_r = self.go_w = -1


def _read_all(fd: int) -> bytes:
    """Read a pipe to EOF (a child's report: EOF comes when the child is gone)."""
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def summarize(samples: list[float]) -> dict[str, Any] | None:
    """Median and range of the measured repetitions, samples kept for the JSON; None if none."""
    if not samples:
        return None
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "n": len(samples), "samples": samples}


# -- 1. print cost


def devnull_stream(kind: str) -> TextIO:
    """A text stream to /dev/null: `buffered` as open() makes it, or `write-through` as
    PYTHONUNBUFFERED=1 makes sys.stdout (raw FileIO under a write-through TextIOWrapper)."""
    if kind == "buffered":
        return open(os.devnull, "w", encoding="utf-8")
    return io.TextIOWrapper(io.FileIO(os.devnull, "w"), encoding="utf-8", write_through=True)


def print_ns(stream: TextIO, n: int) -> float:
    """ns per print(80-byte line) to `stream`, printed the way user code does: via sys.stdout."""
    saved, sys.stdout = sys.stdout, stream
    try:
        text = PRINT_TEXT
        for _ in range(min(n, 5_000)):  # warm-up; in a hooked child this also claims its lane
            print(text)
        start = time.perf_counter_ns()
        for _ in range(n):
            print(text)
        return (time.perf_counter_ns() - start) / n
    finally:
        sys.stdout = saved


def child_print_ns(stream: TextIO, n: int) -> float:
    """print_ns() in a forked child; the figure comes back through a pipe, not through stdout."""
    r, w = os.pipe()
    try:
        with Children() as kids:
            kids.spawn(lambda: os.write(w, repr(print_ns(stream, n)).encode()), close=(r,))
            os.close(w)
            w = -1
            data = _read_all(r)
            kids.join()
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    return float(data)


def measure_print_cost(kind: str, sizes: Sizes) -> dict[str, Any]:
    """Unhooked vs hooked print, child side (the target) and master side (for information).

    Two devnull stream objects of the same kind: `hooked` is sys.stdout while install() runs, so
    it is the object that gets the hooks; `plain` never is. Each repetition times both, in
    alternating order, in a fresh forked child and then in this process. Before each timing the
    session is flushed, so that the drain thread's backlog from one timing never lands in the
    next; after it, the lane-full waits (stats().stalls) it caused are counted.
    """
    plain, hooked = devnull_stream(kind), devnull_stream(kind)
    saved, sys.stdout = sys.stdout, hooked
    try:
        session = safe_redirect.install(on_output=lambda record: None)
    finally:
        sys.stdout = saved
    sides = {"child": child_print_ns, "master": print_ns}
    samples: dict[str, dict[str, list[float]]] = {
        side: {"unhooked": [], "hooked": [], "ratio": []} for side in sides}
    stalls = dict.fromkeys(sides, 0)
    try:
        for rep in range(sizes.reps + 1):
            order = [("unhooked", plain), ("hooked", hooked)]
            if rep % 2:
                order.reverse()
            for side, measure in sides.items():
                ns = {}
                for label, stream in order:
                    _settle(session)
                    before = session.stats().stalls
                    ns[label] = measure(stream, sizes.prints)
                    _settle(session)
                    if rep:  # rep 0 is the warm-up
                        stalls[side] += session.stats().stalls - before
                if rep:
                    samples[side]["unhooked"].append(ns["unhooked"])
                    samples[side]["hooked"].append(ns["hooked"])
                    samples[side]["ratio"].append(ns["hooked"] / ns["unhooked"])
        stats = session.stats()
    finally:
        session.uninstall()
        plain.close()
        hooked.close()
    result: dict[str, Any] = {
        side: {key: summarize(values) for key, values in by_key.items()}
        for side, by_key in samples.items()}
    for side, count in stalls.items():
        result[side]["lane_full_waits"] = count
    result["session_stats"] = asdict(stats)
    return result


def _settle(session: safe_redirect.Session) -> None:
    """Everything written so far delivered, exited children's lanes reclaimed."""
    if not session.flush(timeout=30):
        raise BenchError("flush timed out")


# -- 2. throughput


def _ring_producer(seg: Segment, gate: Gate, lines: int) -> None:
    """Claims its lane before the gate, so that the clock sees appends only; retries what a full
    lane did not take, as any writer of a bounded ring must."""
    me = Stamp.current()
    lane = seg.claim(me.pid, me.start_us, -1)
    if lane < 0:
        raise BenchError("no free lane")
    append = seg.producer(lane).append
    line, size = LINE, len(LINE)
    gate.wait()
    for _ in range(lines):
        sent = append(0, 0, line)
        if sent == size:
            continue
        rest = line
        while sent != len(rest):  # the lane is full: retry what did not fit
            if sent < 0:
                raise BenchError("segment closed under a producer")
            rest = rest[sent:]
            os.sched_yield()
            sent = append(0, 0, rest)


def run_ring(nprod: int, lines: int) -> float:
    """safe_redirect's ring through its low-level API: one lane per producer, append per line."""
    ring = Ring.create(Stamp.current(), nlanes=16, lane_bytes=1 << 20)
    seg, gate = ring.segment, Gate()
    expected = count = 0
    try:
        with Children() as kids:
            for _ in range(nprod):
                kids.spawn(functools.partial(_ring_producer, seg, gate, lines),
                           close=gate.parent_ends)
            gate.wait_ready(nprod)
            lanes = seg.busy_lanes()  # every producer claimed its lane before it said ready
            expected = nprod * lines
            read = seg.read
            start = gate.go()
            while count < expected:
                got = 0
                for lane in lanes:
                    for _stream, _flags, _time_ns, payload, *_ in read(lane, 1 << 62):
                        got += payload.count(b"\n")
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
    _check_count(count, expected)
    return expected / elapsed


def _queue_producer(queue: Any, gate: Gate, lines: int) -> None:
    """put() per line, as a worker forwarding its output line by line would."""
    put, line = queue.put, LINE
    gate.wait()
    for _ in range(lines):
        put(line)
    queue.close()
    queue.join_thread()  # os._exit would otherwise drop what the feeder thread still holds


def run_queue(nprod: int, lines: int) -> float:
    """One multiprocessing.Queue shared by all producers; put() and get() per line."""
    queue = multiprocessing.get_context("fork").Queue()
    gate = Gate()
    expected = count = 0
    try:
        with Children() as kids:
            for _ in range(nprod):
                kids.spawn(functools.partial(_queue_producer, queue, gate, lines),
                           close=gate.parent_ends)
            gate.wait_ready(nprod)
            expected = nprod * lines
            get = queue.get
            start = gate.go()
            for _ in range(expected):
                count += get().count(b"\n")
            elapsed = time.perf_counter() - start
            kids.join()
    finally:
        gate.close()
        queue.close()
        queue.join_thread()
    _check_count(count, expected)
    return expected / elapsed


def _pipe_producer(fd: int, gate: Gate, lines: int) -> None:
    """os.write() per line into one shared pipe: the classic funnel from many processes."""
    write, line = os.write, LINE
    gate.wait()
    for _ in range(lines):
        write(fd, line)  # 100 bytes < PIPE_BUF: atomic, lines of producers never interleave


def run_pipe(nprod: int, lines: int) -> float:
    """One os.pipe shared by all producers; os.write per line, os.read of 64 KiB at a time."""
    r, w = os.pipe()
    gate = Gate()
    expected = count = 0
    try:
        with Children() as kids:
            for _ in range(nprod):
                kids.spawn(functools.partial(_pipe_producer, w, gate, lines),
                           close=(*gate.parent_ends, r))
            os.close(w)  # now EOF means every producer is gone
            w = -1
            gate.wait_ready(nprod)
            expected = nprod * lines
            start = gate.go()
            while count < expected:
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break
                count += chunk.count(b"\n")
            elapsed = time.perf_counter() - start
            kids.join()
    finally:
        gate.close()
        os.close(r)
        if w >= 0:
            os.close(w)
    _check_count(count, expected)
    return expected / elapsed


class LineCounter:
    """on_output callback: counts the stdout lines delivered (runs on the drain thread)."""

    def __init__(self) -> None:
        self.lines = 0

    def __call__(self, record: Record) -> None:
        if record.stream == "stdout":
            self.lines += record.text.count("\n")


def _print_producer(gate: Gate, lines: int) -> None:
    """Plain print() to an inherited, hooked sys.stdout: what user code in a worker does."""
    text = LINE_TEXT
    print(text)  # the first captured write claims this child's lane: keep it off the clock
    gate.wait()
    for _ in range(lines):
        print(text)


def run_e2e(nprod: int, lines: int, diagnostics: list[dict[str, Any]]) -> float:
    """Children print() under install(); timed until on_output has seen every line."""
    counter = LineCounter()
    stream = devnull_stream("buffered")
    saved, sys.stdout = sys.stdout, stream
    gate = Gate()
    expected = 0
    try:
        session = safe_redirect.install(on_output=counter)
        try:
            with Children() as kids:
                for _ in range(nprod):
                    kids.spawn(functools.partial(_print_producer, gate, lines),
                               close=gate.parent_ends)
                gate.wait_ready(nprod)
                if not session.flush(timeout=30):
                    raise BenchError("flush of the warm-up lines timed out")
                counter.lines = 0  # the children wait at the gate: nothing is in flight
                expected = nprod * lines
                start = gate.go()
                kids.join()
                flushed = session.flush(timeout=30)
                elapsed = time.perf_counter() - start
            stats = session.stats()
        finally:
            session.uninstall()
    finally:
        sys.stdout = saved
        gate.close()
        stream.close()
    diagnostics.append(asdict(stats))
    if not flushed:
        raise BenchError(f"flush timed out; {counter.lines} of {expected} lines delivered")
    _check_count(counter.lines, expected, f" ({stats})")
    return expected / elapsed


def _check_count(count: int, expected: int, detail: str = "") -> None:
    if count != expected:
        raise BenchError(f"{expected - count} of {expected} lines lost{detail}")


def measure_throughput(sizes: Sizes) -> dict[str, Any]:
    """All transports, each repetition running them back to back in rotating order."""
    e2e_stats: dict[int, list[dict[str, Any]]] = {n: [] for n in PRODUCERS}
    runners: dict[str, Callable[[int], float]] = {
        "ring": lambda n: run_ring(n, sizes.ring_lines),
        "queue": lambda n: run_queue(n, sizes.queue_lines),
        "pipe": lambda n: run_pipe(n, sizes.ring_lines),
        "e2e": lambda n: run_e2e(n, sizes.e2e_lines, e2e_stats[n]),
    }
    out: dict[str, Any] = {"lines_per_producer": {
        "ring": sizes.ring_lines, "queue": sizes.queue_lines, "pipe": sizes.ring_lines,
        "e2e": sizes.e2e_lines}}
    for nprod in PRODUCERS:
        log(f"  {nprod} producer(s)")
        rates: list[dict[str, float]] = []
        errors: dict[str, str] = {}
        for rep in range(sizes.reps + 1):
            order = TRANSPORTS[rep % len(TRANSPORTS):] + TRANSPORTS[:rep % len(TRANSPORTS)]
            rate: dict[str, float] = {}
            for name in order:
                if name in errors:
                    continue
                try:
                    rate[name] = runners[name](nprod)
                except BenchError as exc:
                    errors[name] = f"rep {rep}: {exc}"
                    log(f"    {name} FAILED: {errors[name]}")
            if rep:
                rates.append(rate)
            else:  # the warm-up
                e2e_stats[nprod].clear()
        row: dict[str, Any] = {
            name: summarize([r[name] for r in rates if name in r]) for name in TRANSPORTS}
        for top, bottom in (("ring", "queue"), ("ring", "pipe"), ("e2e", "queue")):
            row[f"{top}/{bottom}"] = summarize(
                [r[top] / r[bottom] for r in rates if top in r and bottom in r])
        row["e2e_lane_full_waits"] = summarize([st["stalls"] for st in e2e_stats[nprod]])
        row["e2e_session_stats"] = e2e_stats[nprod]
        row["errors"] = errors
        out[str(nprod)] = row
    return out


# -- report


def _fmt(stat: dict[str, Any] | None, fmt: Callable[[float], str]) -> str:
    if stat is None:
        return "failed"
    return f"{fmt(stat['median'])} ({fmt(stat['min'])}-{fmt(stat['max'])})"


def _rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.0f}k"


def _ns(x: float) -> str:
    return f"{x:.0f}"


def _ratio(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verdict(stat: dict[str, Any] | None, ok: Callable[[float], bool]) -> str:
    if stat is None:
        return "n/a"
    return "ok" if ok(stat["median"]) else "MISSED"


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    out = [f"safe_redirect {meta['safe_redirect']} core benchmark, {meta['mode']} mode: "
           f"Python {meta['python']}, {meta['cpus']} CPUs, load {meta['loadavg_start']}"
           f" -> {meta['loadavg_end']}",
           f"median of {meta['reps']} repetitions after 1 warm-up, (min-max); "
           f"ratios taken within each repetition", ""]

    out.append(f"1. print() of an 80-byte line to a devnull stream object, ns/print "
               f"({meta['sizes']['prints']} prints per repetition)")
    rows = []
    for kind, result in results["print_cost"].items():
        if "error" in result:
            rows.append([kind, "-", "failed", result["error"], "", "", ""])
            continue
        for side in ("child", "master"):
            r = result[side]
            target = (f"<= {PRINT_TARGET} {verdict(r['ratio'], lambda x: x <= PRINT_TARGET)}"
                      if side == "child" and kind == "buffered" else "info")
            rows.append([kind, side, _fmt(r["unhooked"], _ns), _fmt(r["hooked"], _ns),
                         _fmt(r["ratio"], _ratio), target, str(r["lane_full_waits"])])
    out += [_table(["stream", "process", "unhooked", "hooked", "hooked/unhooked", "target",
                    "lane-full waits"], rows),
            "(lane-full waits: times a hooked writer found its 1 MiB lane full and slept, "
            "in all measured repetitions together)", ""]

    tp = results["throughput"]
    per = tp["lines_per_producer"]
    out.append("2. throughput of 100-byte lines, N forked producers -> 1 consumer, lines/s "
               f"(lines per producer: ring {per['ring']}, Queue {per['queue']}, "
               f"pipe {per['pipe']}, end-to-end {per['e2e']})")
    rows = [[str(n), *(_fmt(tp[str(n)][t], _rate) for t in TRANSPORTS)] for n in PRODUCERS]
    out += [_table(["N", *(TRANSPORT_NAMES[t] for t in TRANSPORTS)], rows), ""]
    rows = []
    for n in PRODUCERS:
        row = tp[str(n)]
        rows.append([str(n), _fmt(row["ring/queue"], _ratio),
                     verdict(row["ring/queue"], lambda x: x >= QUEUE_TARGET),
                     _fmt(row["ring/pipe"], _ratio), _fmt(row["e2e/queue"], _ratio),
                     _fmt(row["e2e_lane_full_waits"], _ns)])
    out += [_table(["N", "ring/Queue", f">= {QUEUE_TARGET:g}", "ring/pipe",
                    "end-to-end/Queue", "end-to-end lane-full waits/run"], rows), ""]

    out.append("problems observed:" if results["problems"] else "problems observed: none")
    out += [f"  - {p}" for p in results["problems"]]
    return "\n".join(out)


def find_problems(results: dict[str, Any]) -> list[str]:
    """What a reader must not miss: failed runs, lost or spilled output, missed targets."""
    problems = []
    for kind, result in results["print_cost"].items():
        if "error" in result:
            problems.append(f"print cost ({kind}) failed: {result['error']}")
            continue
        st = result["session_stats"]
        if st["spilled_records"] or st["lane_misses"] or st["callback_errors"]:
            problems.append(f"print cost ({kind}): session stats {st}")
        ratio = result["child"]["ratio"]
        if kind == "buffered" and ratio and ratio["median"] > PRINT_TARGET:
            problems.append(f"child print hooked/unhooked {ratio['median']:.2f} > {PRINT_TARGET}")
    tp = results["throughput"]
    for n in PRODUCERS:
        row = tp[str(n)]
        for name, error in row["errors"].items():
            problems.append(f"throughput {TRANSPORT_NAMES[name]}, {n} producer(s): {error}")
        for st in row["e2e_session_stats"]:
            if st["spilled_records"] or st["lane_misses"] or st["callback_errors"]:
                problems.append(f"end-to-end, {n} producer(s): session stats {st}")
        ratio = row["ring/queue"]
        if ratio and ratio["median"] < QUEUE_TARGET:
            problems.append(f"ring/Queue {ratio['median']:.1f} < {QUEUE_TARGET:g} with {n} "
                            "producer(s)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "default"
    sizes = QUICK if args.quick else DEFAULT
    began = time.monotonic()
    global _deadline
    _deadline = began + TOTAL_LIMIT[mode]
    meta: dict[str, Any] = {
        "mode": mode, "reps": sizes.reps, "sizes": asdict(sizes),
        "safe_redirect": safe_redirect.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "cpus": os.cpu_count(),
        "PYTHONUNBUFFERED": os.environ.get("PYTHONUNBUFFERED", ""),
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    results: dict[str, Any] = {"meta": meta, "print_cost": {}}

    for kind in ("buffered", "write-through"):
        log(f"print cost, {kind} stream")
        try:
            results["print_cost"][kind] = measure_print_cost(kind, sizes)
        except BenchError as exc:
            results["print_cost"][kind] = {"error": str(exc)}
    log("throughput")
    results["throughput"] = measure_throughput(sizes)

    meta["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["seconds"] = round(time.monotonic() - began, 1)
    results["problems"] = find_problems(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    print(f"\n{meta['seconds']} s; results in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
