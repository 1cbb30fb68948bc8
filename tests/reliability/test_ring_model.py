"""Fault 8: the ring against a model, driven by hypothesis (see ring_model.py)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .faults import run_fault
from .ring_model import Flush, Read, Recycle, Write, run_ops

LANES = 3
LANE = 4096

_lanes = st.integers(0, LANES - 1)
_streams = st.integers(0, 1)
_text_like = st.lists(st.sampled_from([b"a", b"\n", b"\r", b"\xe2\x98\x83", b"\xe2", b"\x98",
                                       b"\xff", b"\x00", b"xyz"]), max_size=400).map(b"".join)
_data = st.one_of(st.binary(max_size=64), st.binary(min_size=LANE // 2, max_size=3 * LANE),
                  _text_like)
_ops = st.lists(st.one_of(
    st.builds(Write, _lanes, _streams, _data),
    st.builds(Flush, _lanes, _streams),
    st.builds(Read, _lanes, st.integers(1, 2 * LANE)),
    st.builds(Recycle, _lanes),
), max_size=50)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(_ops)
def test_any_interleaving_of_writes_flushes_reads_and_recycling_keeps_every_lane_exact(ops):
    """Per lane and stream: bytes read == bytes written (writes up to three lanes long included),
    and the text the drain's LaneReader rebuilds == what the bytes decode to."""
    outcome = run_ops(ops, lanes=LANES, lane_bytes=LANE)
    assert outcome.problems == []
    assert outcome.bytes_read == outcome.bytes_written


def test_a_hundred_seeded_random_interleavings_for_the_figures_agree() -> None:
    tally = run_fault("ring_model", runs=100)
    assert tally.problems == [] and tally.delivered == tally.written > 0
    assert tally.notes["bytes read"] == tally.notes["bytes written"]
