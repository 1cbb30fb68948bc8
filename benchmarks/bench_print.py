"""Part 1, write cost: ns per `print()` of an 80-byte line, unhooked vs hooked by safe_redirect.

The "terminal" is /dev/null. Cases:
- wrap, buffered: sys.stdout is a block-buffered text stream, as it is whenever stdout is not a
  terminal; hooked = the stream object install(mode="wrap") hooked. The target case.
- wrap, write-through: the same under PYTHONUNBUFFERED=1 (every print reaches the fd).
- fd, buffered: a block-buffered text stream on fd 1, the object sys.stdout is at install();
  hooked = fd mode: its hooks capture each print with its thread and write to the terminal
  (before 2026-12: fd 1 was the child's own pipe, emptied by its pump thread, which teed to the
  terminal and appended to the ring). The clock runs until every byte is in the process's own
  lane, so a pump's work counts.
- fd, write-through: the same under PYTHONUNBUFFERED=1.

Wall time is the figure; the ratio of the process's CPU time (all its threads: the fd pump
too) is shown beside it, as it does not count the time the process waited for a core that a
neighbour on a shared machine held (it does not count time waiting for a full lane either).
Each figure is taken in a forked child (the processes the library exists for; the target) and,
for information, in the master, whose drain thread (and fd pump) shares the writer's GIL.
Each repetition measures unhooked and hooked back to back, in alternating order; the hooked
side installs a fresh session for its measurement, the unhooked side runs with none at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TextIO

import harness
from harness import BenchError, devnull_stream, fd1_stream, in_child, summarize

import safe_redirect

PRINT_TEXT = "x" * 79  # print() adds the newline: an 80-byte line
LINE_BYTES = 80
TARGET = 1.2  # hooked / unhooked, child, buffered: at most
CASES = {  # name -> (mode, stream kind)
    "wrap, buffered": ("wrap", "buffered"),
    "wrap, write-through": ("wrap", "write-through"),
    "fd, buffered": ("fd", "buffered"),
    "fd, write-through": ("fd", "write-through"),
}
TARGET_CASES = ("wrap, buffered", "fd, buffered")


def print_loop(stream: TextIO, n: int, captured: Callable[[int], object]) -> tuple[float, float]:
    """ns per print(80-byte line) to `stream`, printed the way user code does: via sys.stdout;
    the clock stops once the stream is flushed and `captured(bytes printed)` returned (fd mode:
    the pump has caught up). Wall time, and this process's CPU time (all its threads)."""
    with harness.as_stdout(stream):
        text = PRINT_TEXT
        warm = min(n, 5_000)
        for _ in range(warm):  # warm-up; in a hooked child this also claims its lane
            print(text)
        stream.flush()
        captured(warm * LINE_BYTES)
        start, cpu = time.perf_counter_ns(), time.process_time_ns()
        for _ in range(n):
            print(text)
        stream.flush()
        captured((warm + n) * LINE_BYTES)
        return (time.perf_counter_ns() - start) / n, (time.process_time_ns() - cpu) / n


def _nothing(nbytes: int) -> None:
    pass


def _waiter(session: safe_redirect.Session | None) -> Callable[[int], object]:
    """In the calling process: what print_loop waits on after its prints."""
    return _nothing if session is None else harness.OwnLane(session).wait


def _measure_once(mode: str, kind: str, hooked: bool, n: int) -> dict[str, Any]:
    """One child and one master figure, hooked by a session of their own or not at all."""
    if mode == "wrap":
        stream = devnull_stream(kind)
        if hooked:  # install() hooks the object that sys.stdout is
            with harness.as_stdout(stream):
                session = safe_redirect.install(lambda r: None, streams=("stdout",))
    else:
        stream = fd1_stream(kind)  # fd 1 is /dev/null here (run() sees to it), a pipe once hooked
        if hooked:  # as sys.stdout is at install(): fd mode hooks it too
            with harness.as_stdout(stream):
                session = safe_redirect.install(lambda r: None, mode="fd", streams=("stdout",))
    fd_session = session if hooked and mode == "fd" else None
    try:
        def child() -> str:  # the inherited (hooked or plain) stream
            return repr(print_loop(stream, n, _waiter(fd_session)))

        out: dict[str, Any] = {"child": tuple(map(float, in_child(child).strip("()").split(",")))}
        out["master"] = print_loop(stream, n, _waiter(fd_session))
        if hooked:
            _settle(session, mode)
            st = session.stats()
            out["stalls"] = st.stalls
            out["lost"] = st.spilled_records + st.lane_misses + st.callback_errors
    finally:
        if hooked:
            session.uninstall()
        stream.close()
    return out


def _settle(session: safe_redirect.Session, mode: str) -> None:
    """Everything written so far delivered. Not flush() in fd mode: it can close the capture
    (harness.OwnLane says why); uninstall() right after delivers the rest there."""
    if mode == "wrap" and not session.flush(timeout=30):
        raise BenchError("flush timed out")


def measure(reps: int, prints: int) -> dict[str, Any]:
    """Every case, `reps` repetitions after one warm-up; ratios taken within each repetition."""
    results: dict[str, Any] = {"prints": prints, "target": TARGET}
    with harness.fd1_on_devnull():
        for case, (mode, kind) in CASES.items():
            harness.log(f"  {case}")
            samples: dict[str, dict[str, list[float]]] = {
                side: {"unhooked": [], "hooked": [], "ratio": [], "cpu_ratio": []}
                for side in ("child", "master")}
            stalls = lost = 0
            try:
                for rep in range(reps + 1):
                    order = (False, True) if rep % 2 else (True, False)
                    got = {hooked: _measure_once(mode, kind, hooked, prints) for hooked in order}
                    if rep == 0:
                        continue  # the warm-up
                    stalls += got[True]["stalls"]
                    lost += got[True]["lost"]
                    for side, by in samples.items():
                        (plain, plain_cpu), (hooked, hooked_cpu) = got[False][side], got[True][side]
                        by["unhooked"].append(plain)
                        by["hooked"].append(hooked)
                        by["ratio"].append(hooked / plain)
                        by["cpu_ratio"].append(hooked_cpu / plain_cpu)
            except BenchError as exc:
                results[case] = {"error": str(exc)}
                harness.log(f"    FAILED: {exc}")
                continue
            results[case] = {side: {k: summarize(v) for k, v in by.items()}
                             for side, by in samples.items()}
            results[case]["lane_full_waits"] = stalls
            results[case]["lost_or_spilled"] = lost
    return results
