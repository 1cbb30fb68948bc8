"""Fault 6: bad input and odd use (see bad_input.py)."""

from __future__ import annotations

import pytest

from .bad_input import CASES
from .faults import run_fault


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES)
def test_bad_input_arrives_exactly_or_fails_exactly_as_without_the_library(case) -> None:
    tally = run_fault("bad_input", cases=[case])
    assert tally.problems == [] and tally.hangs == 0
    assert tally.written > 0 and tally.delivered == tally.written
    assert tally.lost == tally.duplicated == 0
