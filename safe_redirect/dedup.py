"""`safe-redirect run --dedup`: lines that many ranks print alike, shown once on the terminal.

Ray's semantics, made explicit: two lines are alike when they are equal once every number and
hex word is dropped ("step 12 loss 0.31" and "step 12 loss 0.29" are). Within `window` seconds
of the first, the ones alike from other processes are held back; when the window has passed,
one line says how many there were: `<the first> [repeated 3x across ranks]`. The process whose
line was shown first goes on being shown (its own output, not a crowd's). Never applied to log
files: they keep every line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Dedup"]

#: numbers (1, 0.31, 1e-5) and hex words (0x1f, 9f86d081): what two lines alike may differ in
_VARIABLE = re.compile(r"\b(?:0x[0-9a-fA-F]+|[0-9a-fA-F]*\d[0-9a-fA-F]*)\b")


@dataclass
class _Seen:
    since_ns: int
    first: str  # the line shown, with its tag
    pid: int  # the process whose lines alike are shown during the window
    held: int = 0  # lines alike of other processes held back


class Dedup:
    """Which whole lines to show now, and the `[repeated Nx across ranks]` lines due."""

    def __init__(self, window: float = 5.0) -> None:
        self._window_ns = int(window * 1e9)
        self._seen: dict[tuple[str, str], _Seen] = {}  # (stream, line without numbers)

    def show(self, stream: str, pid: int, tag: str, line: str, time_ns: int) -> bool:
        """Whether `line` (one whole line, without its tag or newline) goes on the terminal."""
        key = (stream, _VARIABLE.sub("#", line))
        seen = self._seen.get(key)
        if seen is None or time_ns - seen.since_ns >= self._window_ns:
            self._seen[key] = _Seen(time_ns, tag + line, pid)
            return True
        if pid == seen.pid:
            return True  # the process whose lines are shown: its own output, not a crowd's
        seen.held += 1
        return False

    def due(self, now_ns: int | None = None) -> list[tuple[str, str]]:
        """(stream, line) summaries of the windows that have passed (all, with None)."""
        out = []
        for key, seen in list(self._seen.items()):
            if now_ns is not None and now_ns - seen.since_ns < self._window_ns:
                continue
            del self._seen[key]
            if seen.held:
                out.append((key[0], f"{seen.first} [repeated {seen.held}x across ranks]\n"))
        return out
