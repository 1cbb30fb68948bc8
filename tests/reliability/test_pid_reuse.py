"""Fault 5: PID reuse (see pid_reuse.py)."""

from __future__ import annotations

from .faults import run_fault
from .pid_reuse import can_reuse_pids


def test_a_lane_or_a_segment_whose_owner_pid_was_reused_is_recognised_as_dead() -> None:
    tally = run_fault("pid_reuse", runs=3)
    assert tally.problems == [] and tally.hangs == 0
    assert tally.written == tally.delivered == 3 * 51  # the dead owner's lines, partial one too
    taken = tally.notes.get("runs where the kernel would not give the pid again", 0)
    assert tally.notes["lanes owned by a reused pid"] + taken >= 3
    assert tally.notes["lanes owned by a reused pid"] >= 1
    if can_reuse_pids():  # real reuse (root): the segment of a master whose pid was reused too
        assert tally.notes["segments whose master's pid was reused"] >= 1
