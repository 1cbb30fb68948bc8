"""What every part of the benchmark shares: forked children under a deadline, a start gate, the
summary of repetitions, and streams on /dev/null.

Nothing here measures anything. A measurement that cannot complete (a timeout, a failed child,
lost lines) raises BenchError; the caller reports it and moves on, it never retries.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NoReturn, TextIO, TypeVar

T = TypeVar("T")

RUN_LIMIT = 60  # seconds one measurement may take before its children are killed
CHILD_LIMIT = 120  # seconds any child lives at most, even if the parent is stuck or gone

_deadline = float("inf")  # time.monotonic() after which no measurement starts or continues


def set_deadline(seconds: float) -> None:
    """The whole run's time budget, from now."""
    global _deadline
    _deadline = time.monotonic() + seconds


def time_left() -> float:
    return _deadline - time.monotonic()


def log(message: str) -> None:
    """Progress goes to stderr, so that stdout carries the table only."""
    print(message, file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """A measurement that could not be completed: timeout, failed child, lost lines."""


def summarize(samples: Sequence[float]) -> dict[str, Any] | None:
    """Median and range of the measured repetitions, samples kept for the JSON; None if none."""
    if not samples:
        return None
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "n": len(samples), "samples": list(samples)}


def rotated(items: Sequence[T], rep: int) -> list[T]:
    """`items` starting at a different one in each repetition: no candidate always runs first."""
    k = rep % len(items)
    return [*items[k:], *items[:k]]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of already sorted values, nearest rank."""
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


# -- forked children that cannot hang the benchmark


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
        limit = min(self.limit, time_left())
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


def read_all(fd: int) -> bytes:
    """Read a pipe to EOF (a child's report: EOF comes when the child is gone)."""
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def in_child(body: Callable[[], str], limit: float = RUN_LIMIT) -> str:
    """Run `body` in a forked child; what it returns comes back through a pipe."""
    r, w = os.pipe()
    try:
        with Children(limit) as kids:
            kids.spawn(lambda: os.write(w, body().encode()), close=(r,))
            os.close(w)
            w = -1
            data = read_all(r)
            kids.join()
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    return data.decode()


def check_count(count: int, expected: int, detail: str = "", unit: str = "bytes") -> None:
    if count != expected:
        raise BenchError(f"{expected - count} of {expected} {unit} lost{detail}")


# -- streams


def devnull_stream(kind: str = "buffered") -> TextIO:
    """A text stream to /dev/null: `buffered` as open() makes it, or `write-through` as
    PYTHONUNBUFFERED=1 makes sys.stdout (raw FileIO under a write-through TextIOWrapper)."""
    if kind == "buffered":
        return open(os.devnull, "w", encoding="utf-8")
    return io.TextIOWrapper(io.FileIO(os.devnull, "w"), encoding="utf-8", write_through=True)


def fd1_stream(kind: str = "buffered") -> TextIO:
    """A text stream on fd 1: `buffered` as sys.stdout is when fd 1 is not a terminal, or
    `write-through` as PYTHONUNBUFFERED=1 makes it."""
    if kind == "buffered":
        return open(1, "w", encoding="utf-8", closefd=False)
    return io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                            write_through=True)


@contextlib.contextmanager
def fd1_on_devnull() -> Iterator[None]:
    """fd 1 of this process on /dev/null for the block: the "terminal" of fd-mode captures,
    which tee everything to it. The table is printed after the block, on the real fd 1."""
    sys.stdout.flush()
    saved = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


@contextlib.contextmanager
def as_stdout(stream: TextIO) -> Iterator[None]:
    """sys.stdout is `stream` for the block: install() hooks the object sys.stdout is."""
    saved, sys.stdout = sys.stdout, stream
    try:
        yield
    finally:
        sys.stdout = saved


class OwnLane:
    """fd mode: has this process's pump captured everything it was given? Counts the payload
    bytes in this process's own lane (from the moment this object is made).

    Not Session.flush() / drain_fd_pump(): before commit f102295 they closed the capture for good
    when they found the pipe empty (the next write to fd 1 failed with EPIPE, or blocked once the
    master held the pipe open too); the lane's own counter works on every version. There is no
    public API for a process's own lane.
    """

    def __init__(self, session: Any) -> None:
        self._ring = session._writer.ring
        self._lane = session._writer.producer.lane
        self._base = self.bytes()

    def bytes(self) -> int:
        return int(self._ring.lane_info(self._lane).bytes)

    def wait(self, nbytes: int, timeout: float = 30.0) -> None:
        """Until `nbytes` more than at the start are in the lane."""
        deadline = time.monotonic() + timeout
        while self.bytes() < self._base + nbytes:
            if time.monotonic() > deadline:
                raise BenchError(f"fd pump: {self.bytes() - self._base} of {nbytes} bytes "
                                 f"captured after {timeout} s")
            time.sleep(0.0001)
