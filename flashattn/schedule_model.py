r"""The consumer schedules of FlashAttention-3 on one Hopper SM, simulated in cycles.

A model, not a measurement: it says what each schedule of the Gluon kernel
(``flashattn.triton.fa3_kernels``) can gain at best, so that the kernel's
measured speed can be held against it. One SM runs one program; per key
tile, each consumer warpgroup needs two matrix products on the tensor cores
(:math:`S = QK^\top` and :math:`O \mathrel{+}= PV`, :math:`2\,B_r B_c d`
FLOPs each) and a softmax (:math:`B_r B_c` exponentials on the
special-function units and ``fp32_ops_per_score`` other float32
operations per score on the FMA units). Both kinds of unit are shared by
the SM's warpgroups: a product waits for the one issued before it, a
softmax for the one that started before it. The loads are taken as always
ready (the producer keeps ahead: the forward at d = 128 is bound by
compute, chapter 10), and issuing, waiting and the rescaling of O are
taken as free.

The schedules are those of ``fa3_kernels``:

- ``serial``: for each tile, S, then its softmax, then P V, each waited for;
- ``overlap``: tile t's S and tile t-1's P V issued together, tile t's
  softmax run while P V does;
- ``pingpong`` (two warpgroups): ``overlap``, and a warpgroup issues its
  products only when the other has issued its own, so that their
  softmaxes alternate with each other's products.

:data:`H100_SXM` holds the rates of an H100 SXM5 SM at the clock of its
datasheet's peaks: 4096 dense 16-bit tensor FLOPs per cycle (989.4
TFLOP/s over 132 SMs at 1830 MHz), 16 exponentials per cycle (the 3.9
TFLOP/s that FlashAttention-3, section 3.1, gives for the multi-function
units) and 128 float32 operations per cycle (128 FP32 cores per SM).
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("serial", "overlap", "pingpong")


@dataclass(frozen=True)
class SMRates:
    """What one SM does per cycle, and its clock."""

    tensor_flops: int  # dense 16-bit FLOPs per cycle on the tensor cores
    exps: int  # exponentials per cycle on the special-function units
    fp32_ops: int  # other float32 operations per cycle on the FMA units
    clock_hz: float
    sms: int


H100_SXM = SMRates(tensor_flops=4096, exps=16, fp32_ops=128, clock_hz=1.83e9, sms=132)


@dataclass(frozen=True)
class TileCycles:
    """Cycles of one warpgroup's work on one key tile, each on its own unit at the SM's full rate."""

    qk: float  # S = Q K^T on the tensor cores
    pv: float  # O += P V on the tensor cores
    softmax: float  # the exponentials, then the other float32 operations


def tile_cycles(d: int, block_m: int = 64, block_n: int = 128, rates: SMRates = H100_SXM,
                fp32_ops_per_score: int = 4) -> TileCycles:
    """The cycles of one key tile of ``block_n`` keys against ``block_m`` query rows at head dimension ``d``.

    ``fp32_ops_per_score``: the scale and subtraction (one fused
    multiply-add), the row maximum, the row sum and the conversion of P.
    """
    for name, value in (("d", d), ("block_m", block_m), ("block_n", block_n)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    scores = block_m * block_n
    product = 2 * scores * d / rates.tensor_flops
    return TileCycles(qk=product, pv=product,
                      softmax=scores / rates.exps + fp32_ops_per_score * scores / rates.fp32_ops)


@dataclass(frozen=True)
class Interval:
    """One piece of work on the timeline: warpgroup, unit ("tensor" or "softmax"), what, and when it ran.

    Between ``start`` and ``end`` the piece may have shared its unit with
    another warpgroup's (then both run at part of the rate).
    """

    warpgroup: int
    unit: str
    name: str  # "S 3", "PV 3", "softmax 3": the kind of work and its key tile
    start: float
    end: float


@dataclass(frozen=True)
class Timeline:
    """The intervals of a simulated program and its length in cycles."""

    intervals: tuple[Interval, ...]
    cycles: float

    @property
    def tensor_busy(self) -> float:
        """The fraction of the program's cycles in which the tensor cores work (at the full rate, when shared)."""
        covered, last_end = 0.0, 0.0
        for start, end in sorted((iv.start, iv.end) for iv in self.intervals if iv.unit == "tensor"):
            covered += max(0.0, end - max(start, last_end))
            last_end = max(last_end, end)
        return covered / self.cycles if self.cycles else 0.0


def _program(schedule: str, n_tiles: int) -> list[tuple[set[str], list[str]]]:
    """One warpgroup's program: groups of work issued together, each once the work it names is done.

    Every group also waits for the one before it to be issued.
    """
    # a warpgroup's products run in the order it issued them, so a product never needs to wait for the
    # one before it here: serial's S t follows P V t-1 on the tensor cores by that order alone
    if schedule == "serial":
        groups = []
        for t in range(n_tiles):
            groups += [(set(), [f"S {t}"]), ({f"S {t}"}, [f"softmax {t}"]), ({f"softmax {t}"}, [f"PV {t}"])]
        return groups
    # overlap (and ping-pong): tile t's S goes with tile t-1's P V. The kernel also waits for that P V
    # before it rescales O, and so before its next issue: by the same order, that costs nothing here
    groups = [(set(), ["S 0"]), ({"S 0"}, ["softmax 0"])]
    for t in range(1, n_tiles):
        groups += [({f"softmax {t - 1}"}, [f"S {t}", f"PV {t - 1}"]), ({f"S {t}"}, [f"softmax {t}"])]
    groups.append(({f"softmax {n_tiles - 1}"}, [f"PV {n_tiles - 1}"]))
    return groups


def _unit(name: str) -> str:
    return "softmax" if name.startswith("softmax") else "tensor"


@dataclass
class _Job:
    """A piece of work in flight: whose, what, the cycles it still needs at the full rate, when it was issued."""

    warpgroup: int
    name: str
    left: float
    order: int  # its place in the order of issue
    start: float | None = None  # when it first ran


def simulate(schedule: str, warpgroups: int, n_tiles: int, cost: TileCycles) -> Timeline:
    """The timeline of one program: ``warpgroups`` consumers, each with ``n_tiles`` key tiles, under ``schedule``.

    ``pingpong`` needs two warpgroups.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if warpgroups not in (1, 2) or (schedule == "pingpong" and warpgroups != 2):
        raise ValueError(f"warpgroups must be 1 or 2 (2 for pingpong), got {warpgroups!r} with {schedule!r}")
    if not isinstance(n_tiles, int) or n_tiles < 1:
        raise ValueError(f"n_tiles must be a positive integer, got {n_tiles!r}")
    work = {"S": cost.qk, "PV": cost.pv, "softmax": cost.softmax}
    programs = [_program(schedule, n_tiles) for _ in range(warpgroups)]
    issued = [0] * warpgroups  # groups issued, per warpgroup
    done: list[dict[str, float]] = [{} for _ in range(warpgroups)]  # name -> when it finished
    running: list[_Job] = []
    order, now = 0, 0.0
    intervals = []

    while True:
        progressed = True
        while progressed:  # issue every group whose work is done, in each program's order
            progressed = False
            for w, program in enumerate(programs):
                if issued[w] < len(program):
                    needs, group = program[issued[w]]
                    if needs <= done[w].keys():
                        for name in group:
                            running.append(_Job(w, name, work[name.split()[0]], order))
                            order += 1
                        issued[w] += 1
                        progressed = True
        if not running:
            break
        # the rates: a warpgroup's own work on a unit runs in issue order; the unit is split between
        # the warpgroups that have work on it, except that with ping-pong the products run whole, in order
        rates: dict[int, float] = {}  # id(job) -> its share of its unit
        for unit in ("tensor", "softmax"):
            heads: dict[int, _Job] = {}  # each warpgroup's first job on the unit
            for job in sorted((j for j in running if _unit(j.name) == unit), key=lambda j: j.order):
                heads.setdefault(job.warpgroup, job)
            if unit == "tensor" and schedule == "pingpong" and heads:
                rates[id(min(heads.values(), key=lambda j: j.order))] = 1.0
            else:
                for job in heads.values():
                    rates[id(job)] = 1.0 / len(heads)
        active = [job for job in running if id(job) in rates]
        step = min(job.left / rates[id(job)] for job in active)
        for job in active:
            job.start = now if job.start is None else job.start
            job.left -= rates[id(job)] * step
        now += step
        for job in active:
            if job.left <= 1e-9 * max(work.values()):
                running.remove(job)
                done[job.warpgroup][job.name] = now
                intervals.append(Interval(job.warpgroup, _unit(job.name), job.name, job.start, now))
    return Timeline(tuple(sorted(intervals, key=lambda iv: (iv.start, iv.warpgroup, iv.name))), now)
