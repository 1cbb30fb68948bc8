"""Part 6, the limits of this machine, one core, from Python: what no transport can beat.

- memcpy: a slice assignment into a preallocated buffer (`view[:n] = block`, one memcpy in C) of
  100 B, 4 KiB, 64 KiB and 1 MiB blocks: copies/s and GB/s. The 100-byte figure is the ceiling of
  any per-line Python loop that copies its line once; 1 MiB shows the memory bandwidth.
- os.write loop: 100-byte and 4 KiB writes to /dev/null (a system call each, no copy) and into a
  pipe that a forked child empties (the kernel copies in and out): writes/s and GB/s.
"""

from __future__ import annotations

import os
import time
from typing import Any

from harness import BenchError, Children, log, read_all, rotated, summarize


def memcpy_rate(size: int, n: int) -> float:
    """Bytes per second copied by `view[:size] = block` in a loop of `n`."""
    buffer = memoryview(bytearray(size))
    block = b"m" * size
    for _ in range(min(n, 1000)):
        buffer[:size] = block
    start = time.perf_counter()
    for _ in range(n):
        buffer[:size] = block
    return n * size / (time.perf_counter() - start)


def devnull_write_rate(size: int, n: int) -> float:
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        data, write = b"w" * size, os.write
        start = time.perf_counter()
        for _ in range(n):
            write(fd, data)
        return n * size / (time.perf_counter() - start)
    finally:
        os.close(fd)


def pipe_write_rate(size: int, n: int) -> float:
    """One writer (this process), one reader (a child, os.read of 64 KiB); timed until the
    reader has seen every byte."""
    data = b"p" * size
    r, w = os.pipe()
    report_r, report_w = os.pipe()

    def reader() -> None:
        got = 0
        while chunk := os.read(r, 1 << 16):
            got += len(chunk)
        os.write(report_w, str(got).encode())

    try:
        with Children() as kids:
            kids.spawn(reader, close=(w, report_r))
            os.close(r)
            os.close(report_w)
            r = report_w = -1
            write = os.write
            start = time.perf_counter()
            for _ in range(n):
                write(w, data)
            os.close(w)
            w = -1
            got = int(read_all(report_r) or 0)
            elapsed = time.perf_counter() - start
            kids.join()
    finally:
        for fd in (r, w, report_r, report_w):
            if fd >= 0:
                os.close(fd)
    if got != n * size:
        raise BenchError(f"pipe limit: {got} of {n * size} bytes read")
    return n * size / elapsed


def measure(reps: int, scale: float) -> dict[str, Any]:
    """Every test once per repetition, in rotating order; at scale 1 each takes some 0.1-0.3 s."""
    counts = {  # name -> (function, block size, calls at scale 1)
        "memcpy 100 B": (memcpy_rate, 100, 2_000_000),
        "memcpy 4 KiB": (memcpy_rate, 4096, 1_000_000),
        "memcpy 64 KiB": (memcpy_rate, 64 << 10, 100_000),
        "memcpy 1 MiB": (memcpy_rate, 1 << 20, 2_000),
        "os.write /dev/null 100 B": (devnull_write_rate, 100, 1_000_000),
        "os.write /dev/null 4 KiB": (devnull_write_rate, 4096, 1_000_000),
        "os.write pipe 100 B": (pipe_write_rate, 100, 500_000),
        "os.write pipe 4 KiB": (pipe_write_rate, 4096, 200_000),
    }
    tests = {name: (f, size, max(100, int(n * scale))) for name, (f, size, n) in counts.items()}
    samples: dict[str, list[float]] = {name: [] for name in tests}
    try:
        for rep in range(reps + 1):
            for name in rotated(list(tests), rep):
                function, size, n = tests[name]
                rate = function(size, n)
                if rep:
                    samples[name].append(rate)
    except BenchError as exc:
        log(f"    FAILED: {exc}")
        return {"error": str(exc)}
    out: dict[str, Any] = {}
    for name, (_, size, _) in tests.items():
        out[name] = {"size": size, "bytes_per_s": summarize(samples[name]),
                     "units_per_s": summarize([x / size for x in samples[name]])}
    return out
