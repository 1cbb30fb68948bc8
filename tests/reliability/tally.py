"""What a fault loop counts, and the bounded waits it counts hangs with.

A loop never raises on a violated promise: it counts it (lost, duplicated, hangs) and notes the
first few in words (`problems`), so that the figures script can report a whole run and a test can
show every violation at once. A wait that runs out kills what it waited for and counts a hang.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..children import child_exit, reap

__all__ = ["Tally", "child_exit", "common_prefix_length", "is_subsequence", "reap", "wait_until"]

MAX_PROBLEMS = 20


@dataclass
class Tally:
    """The figures of one fault loop.

    written: lines whose write returned (the library owes their delivery, or, where the overflow
    policy allows it, a counted spill); delivered: of those, delivered whole and once; spilled:
    lines the policy sent to the terminal only, counted in stats(); lost, duplicated: must stay 0;
    hangs: a process, a flush or a wait that did not finish within its bound.
    """

    fault: str
    runs: int = 0
    written: int = 0
    delivered: int = 0
    spilled: int = 0
    lost: int = 0
    duplicated: int = 0
    hangs: int = 0
    notes: dict[str, int] = field(default_factory=dict)  # loop-specific counts
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)

    def note(self, key: str, n: int = 1) -> None:
        self.notes[key] = self.notes.get(key, 0) + n

    def hang(self, what: str) -> None:
        self.hangs += 1
        self.problem(f"hang: {what}")

    def count_lines(self, who: str, expected: Sequence[str], got: Sequence[str], *,
                    exact_order: bool = True, spilled: int = 0) -> None:
        """Add one writer's lines: `expected` (what it completed) against `got` (what arrived).

        exact_order: `got` must be `expected` itself; otherwise (a policy that spills) the lines
        that arrived must keep their order and the missing ones must be covered by `spilled`.
        """
        self.written += len(expected)
        want, have = Counter(expected), Counter(got)
        delivered = sum(min(n, want[line]) for line, n in have.items())
        duplicated = sum(n - want[line] for line, n in have.items() if n > want[line] > 0)
        foreign = [line for line in have if line not in want]
        self.delivered += delivered
        self.duplicated += duplicated
        missing = len(expected) - delivered
        lost = missing if exact_order else max(0, missing - spilled)
        self.spilled += 0 if exact_order else min(missing, spilled)
        self.lost += lost
        if lost:
            self.problem(f"{who}: {lost} of {len(expected)} lines lost")
        if duplicated:
            self.problem(f"{who}: {duplicated} lines duplicated")
        if foreign:
            self.problem(f"{who}: {len(foreign)} lines never written, e.g. {foreign[0][:80]!r}")
        if exact_order and not lost and not duplicated and list(got) != list(expected):
            self.problem(f"{who}: lines out of order")
        if not exact_order and not is_subsequence([x for x in got if x in want], expected):
            self.problem(f"{who}: lines out of order")

    def merge(self, other: Tally) -> None:
        for name in ("runs", "written", "delivered", "spilled", "lost", "duplicated", "hangs"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for key, n in other.notes.items():
            self.note(key, n)
        for text in other.problems:
            self.problem(text)
        self.seconds += other.seconds

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicated or self.hangs or self.problems)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str) -> Tally:
        return cls(**json.loads(raw))


def common_prefix_length(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def is_subsequence(items: Iterable[str], sequence: Iterable[str]) -> bool:
    it = iter(sequence)
    return all(any(x == y for y in it) for x in items)


def wait_until(condition: Callable[[], Any], timeout: float, step: float = 0.001) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True
