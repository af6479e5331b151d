"""The one way every benchmark here times GPU work: providers interleaved, several rounds, median and spread.

Timing providers one after another, once each, lets a drift of the GPU
(clock, temperature, another job on the machine) pass for a difference
between them: two providers that run the same kernels read 0.87 to 1.11 of
each other that way. Here each round times every provider once, in an order
that rotates from round to round (round ``r`` starts with provider
``r mod n``), so that a drift falls on all of them alike; a sample is the
median of ``triton.testing.do_bench`` (or, with ``graph=True``, of
``do_bench_cudagraph``, which replays the call from a CUDA graph and times
the GPU alone). The result per provider keeps every sample: the median, the
quartiles and the range.

A difference between two providers is stated only when their ranges do not
overlap (:func:`differs`); :func:`ratio` gives the median ratio with the
range that the samples allow.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

ROUNDS = 5


@dataclass
class Timing:
    """The samples of one provider, in milliseconds, and how they were taken."""

    samples_ms: list[float] = field(default_factory=list)
    method: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def low(self) -> float:
        return min(self.samples_ms)

    @property
    def high(self) -> float:
        return max(self.samples_ms)

    def quartiles(self) -> tuple[float, float]:
        """The first and third quartile (both the one sample when there is one)."""
        if len(self.samples_ms) < 2:
            return self.low, self.high
        q1, _, q3 = statistics.quantiles(self.samples_ms, n=4, method="inclusive")
        return q1, q3

    def record(self) -> dict:
        """What a result file keeps: the median, the spread, the samples and the method."""
        q1, q3 = self.quartiles()
        return dict(ms=self.median, ms_min=self.low, ms_max=self.high, ms_q1=q1, ms_q3=q3,
                    samples_ms=self.samples_ms, method=self.method)


def gpu_sample(fn: Callable[[], object], graph: bool, rep_ms: float) -> tuple[float, str]:
    """One sample of ``fn``'s time in ms: do_bench's median, replayed from a CUDA graph when ``graph``.

    A call that cannot be captured (it synchronizes, or allocates in a way
    capture forbids) is timed eagerly instead, and the method says so.
    """
    from triton.testing import do_bench, do_bench_cudagraph

    if graph:
        try:
            return do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"), "CUDA graph replay, do_bench_cudagraph median"
        except Exception as error:  # noqa: BLE001 - recorded, and the eager time taken instead
            reason = f"{type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
            return do_bench(fn, rep=rep_ms, return_mode="median"), f"eager, do_bench median (graph capture failed: {reason})"
    return do_bench(fn, rep=rep_ms, return_mode="median"), "eager, do_bench median"


def rotation(items: list, r: int) -> list:
    """Round ``r``'s order of ``items``: from the one at ``r mod len(items)`` on, then those before it."""
    k = r % len(items) if items else 0
    return items[k:] + items[:k]


Sampler = Callable[[Callable[[], object], bool, float], tuple[float, str]]


def compare(providers: dict[str, Callable[[], object]], *, rounds: int = ROUNDS, graph: bool = False,
            rep_ms: float = 100.0, sample: Sampler = gpu_sample) -> dict[str, Timing]:
    """Time every provider ``rounds`` times, interleaved, the order rotating each round.

    ``providers`` maps a name to a call without arguments (warmed up by the
    caller: compiled, autotuned). ``sample(fn, graph, rep_ms)`` takes one
    sample (tests pass their own). Returns a :class:`Timing` per provider, in
    the order given.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    names = list(providers)
    timings = {name: Timing() for name in names}
    for r in range(rounds):
        for name in rotation(names, r):
            ms, method = sample(providers[name], graph, rep_ms)
            timings[name].samples_ms.append(ms)
            timings[name].method = method
    return timings


def ratio(a: Timing, b: Timing) -> dict:
    """``a``'s time over ``b``'s: the ratio of medians, and the lowest and highest the samples allow."""
    return dict(median=a.median / b.median, low=a.low / b.high, high=a.high / b.low)


def differs(a: Timing, b: Timing) -> bool:
    """Whether ``a`` and ``b`` differ by more than their spread: their ranges of samples do not overlap."""
    return a.high < b.low or b.high < a.low
