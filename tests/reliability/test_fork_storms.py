"""Fault 4: fork storms (see storms.py)."""

from __future__ import annotations

import pytest

from .faults import run_fault
from .storms import SCENARIOS


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fork_storms_deliver_every_line_once_in_order_and_never_hang(scenario) -> None:
    tally = run_fault("fork_storm", runs=2, scenarios=[scenario])
    assert tally.problems == [] and tally.hangs == 0
    assert tally.written > 0 and tally.delivered == tally.written
    assert tally.lost == tally.duplicated == 0
    if scenario == "lanes":  # 24 children, 8 lanes, one of them the master's: 17 fall back
        assert tally.notes["children beyond the lanes, counted in lane_misses"] == 2 * 17
