"""Fault 3: the master SIGKILLed while its children print (see master_death.py)."""

from __future__ import annotations

import pytest

from .faults import run_fault


@pytest.mark.timeout(120)
@pytest.mark.parametrize("policy", ["block", "spill"])
def test_children_of_a_killed_master_finish_on_their_terminal_and_leave_no_segment(
        policy) -> None:
    tally = run_fault("master_death", runs=3, policies=[policy], lines=5_000)
    assert tally.problems == [] and tally.hangs == 0
    assert tally.runs == 3 and tally.written >= 3 * 3 * 5_000
    assert tally.delivered == tally.written  # every line on its child's terminal, in order
    assert tally.lost == tally.duplicated == 0
    assert tally.notes["lines on_output got before the kill"] > 0
