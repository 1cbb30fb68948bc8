"""Fault 7: load (see soak.py). CI size by default; `pytest --soak` for 8 x 1,000,000 lines."""

from __future__ import annotations

import pytest

from .faults import run_fault

CI_LINES = 100_000
SOAK_LINES = 1_000_000


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_eight_producers_every_line_once_in_order(request) -> None:
    lines = SOAK_LINES if request.config.getoption("--soak") else CI_LINES
    tally = run_fault("soak", timeout=850, producers=8, lines=lines)
    assert tally.problems == [] and tally.hangs == 0
    assert tally.written == tally.delivered == 8 * lines
    assert tally.lost == tally.duplicated == 0
