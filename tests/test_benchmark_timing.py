"""The benchmarks' timing harness (benchmarks/timing.py), with a sampler that returns set times instead of timing.

Whether providers are interleaved, whether every sample is kept, and when a
difference counts as larger than the spread: none of it needs a GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from timing import Timing, compare, differs, ratio  # noqa: E402


class FakeSampler:
    """Returns, for each provider, its next time from a list, and records the order of the calls."""

    def __init__(self, times: dict[str, list[float]]):
        self.times = {name: iter(values) for name, values in times.items()}
        self.order: list[str] = []

    def __call__(self, fn, graph, rep_ms):
        name = fn()  # each provider returns its own name
        self.order.append(name)
        return next(self.times[name]), f"fake, graph={graph}, rep={rep_ms}"


def providers(*names):
    return {name: (lambda name=name: name) for name in names}


def test_rounds_interleave_the_providers_and_rotate_who_goes_first():
    sampler = FakeSampler({"a": [1.0] * 3, "b": [2.0] * 3, "c": [3.0] * 3})
    compare(providers("a", "b", "c"), rounds=3, sample=sampler)
    assert sampler.order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_every_sample_is_kept_with_its_median_quartiles_and_range():
    sampler = FakeSampler({"a": [5.0, 1.0, 3.0, 2.0, 4.0]})
    timing = compare(providers("a"), rounds=5, graph=True, rep_ms=20, sample=sampler)["a"]
    assert timing.samples_ms == [5.0, 1.0, 3.0, 2.0, 4.0]
    assert (timing.median, timing.low, timing.high) == (3.0, 1.0, 5.0)
    assert timing.quartiles() == (2.0, 4.0)
    assert timing.method == "fake, graph=True, rep=20"
    record = timing.record()
    assert record["ms"] == 3.0 and (record["ms_min"], record["ms_max"]) == (1.0, 5.0)
    assert (record["ms_q1"], record["ms_q3"]) == (2.0, 4.0)


def test_a_difference_counts_only_beyond_the_spread():
    fast, slow = Timing([1.0, 1.1, 1.05]), Timing([1.2, 1.3, 1.25])
    overlapping = Timing([1.08, 1.3, 1.2])
    assert differs(fast, slow) and differs(slow, fast)
    assert not differs(fast, overlapping)  # 1.08 lies inside fast's range: within the spread
    r = ratio(slow, fast)
    assert r["median"] == pytest.approx(1.25 / 1.05)
    assert (r["low"], r["high"]) == (pytest.approx(1.2 / 1.1), pytest.approx(1.3 / 1.0))


def test_no_round_is_refused():
    with pytest.raises(ValueError, match="rounds must be at least 1, got 0"):
        compare(providers("a"), rounds=0, sample=FakeSampler({"a": []}))
