"""The simulated consumer schedules of FlashAttention-3 (``flashattn.schedule_model``), against closed forms."""

from __future__ import annotations

import pytest

from flashattn.schedule_model import H100_SXM, TileCycles, simulate, tile_cycles

COST = TileCycles(qk=512.0, pv=512.0, softmax=768.0)  # d = 128, 64 x 128 tiles on an H100 SXM SM


def test_tile_cycles_from_the_rates():
    # 2 * 64 * 128 * 128 FLOPs at 4096 per cycle; 8192 exponentials at 16 and 4 * 8192 operations at 128
    assert tile_cycles(128) == COST
    assert tile_cycles(64) == TileCycles(qk=256.0, pv=256.0, softmax=768.0)
    # the rates are the datasheet's: 989 TFLOP/s of tensor work and 3.9 TFLOP/s of exponentials per GPU
    per_gpu = H100_SXM.sms * H100_SXM.clock_hz
    assert H100_SXM.tensor_flops * per_gpu == pytest.approx(989.4e12, rel=1e-3)
    assert H100_SXM.exps * per_gpu == pytest.approx(3.9e12, rel=0.01)
    with pytest.raises(ValueError, match="block_n must be a positive integer, got 0"):
        tile_cycles(128, block_n=0)


@pytest.mark.parametrize("n", [1, 2, 7, 32])
def test_serial_waits_for_everything(n):
    assert simulate("serial", 1, n, COST).cycles == n * (COST.qk + COST.softmax + COST.pv)


@pytest.mark.parametrize("n", [1, 2, 7, 32])
@pytest.mark.parametrize("cost", [COST, TileCycles(qk=512.0, pv=512.0, softmax=300.0)])
def test_overlap_hides_the_softmax_behind_the_previous_tiles_product(n, cost):
    # tile 0's S and softmax; then per tile S, and the longer of its softmax and the previous P V; the last P V
    want = cost.qk + cost.softmax + (n - 1) * (cost.qk + max(cost.softmax, cost.pv)) + cost.pv
    assert simulate("overlap", 1, n, cost).cycles == want


@pytest.mark.parametrize("schedule", ["serial", "overlap"])
@pytest.mark.parametrize("n", [1, 5, 32])
def test_two_warpgroups_without_turns_run_in_lockstep(schedule, n):
    # issued together, their products share the tensor cores and their softmaxes the other units:
    # twice the work in twice the time of one warpgroup, nothing gained
    assert simulate(schedule, 2, n, COST).cycles == pytest.approx(2 * simulate(schedule, 1, n, COST).cycles)


def test_pingpong_keeps_the_tensor_cores_busy():
    # each warpgroup's softmax (768 cycles) fits in the other's two products (1024): the tensor cores
    # wait only at the start and the end
    n = 64
    timeline = simulate("pingpong", 2, n, COST)
    tensor = 2 * n * (COST.qk + COST.pv)
    assert tensor <= timeline.cycles <= tensor + 2 * (COST.qk + COST.softmax)
    assert timeline.tensor_busy > 0.98
    # one warpgroup cannot: serial 4/7 of the time, overlapped 4/5
    assert simulate("serial", 1, n, COST).tensor_busy == pytest.approx(1024 / 1792)
    assert simulate("overlap", 1, n, COST).tensor_busy == pytest.approx(1024 / 1280, rel=0.01)
    # a softmax longer than the other's products: the shared exponential units set the pace, always busy
    slow = TileCycles(qk=512.0, pv=512.0, softmax=1500.0)
    assert simulate("pingpong", 2, n, slow).cycles == pytest.approx(2 * n * slow.softmax, rel=0.02)


@pytest.mark.parametrize("schedule, warpgroups", [("serial", 1), ("serial", 2), ("overlap", 2), ("pingpong", 2)])
def test_every_piece_of_work_runs_once_in_its_warpgroups_order(schedule, warpgroups):
    n = 9
    timeline = simulate(schedule, warpgroups, n, COST)
    names = sorted((iv.warpgroup, iv.name) for iv in timeline.intervals)
    assert names == sorted((w, f"{kind} {t}") for w in range(warpgroups) for t in range(n)
                           for kind in ("S", "PV", "softmax"))
    for w in range(warpgroups):  # and in its order: S t, then softmax t, then P V t
        at = {iv.name: iv for iv in timeline.intervals if iv.warpgroup == w}
        for t in range(n):
            assert at[f"S {t}"].end <= at[f"softmax {t}"].start and at[f"softmax {t}"].end <= at[f"PV {t}"].start


def test_pingpong_alternates_the_warpgroups_on_the_tensor_cores():
    # whole products in issue order: warpgroup 0's S k, then warpgroup 1's, then warpgroup 0's S k+1
    n = 12
    timeline = simulate("pingpong", 2, n, COST)
    starts = {(iv.warpgroup, iv.name): iv.start for iv in timeline.intervals}
    order = [starts[(w, f"S {t}")] for t in range(n) for w in (0, 1)]
    assert order == sorted(order) and len(set(order)) == len(order)
    tensor = [iv for iv in timeline.intervals if iv.unit == "tensor"]
    assert all(iv.end - iv.start == pytest.approx(512.0) for iv in tensor)  # never shared


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="schedule must be one of"):
        simulate("fast", 1, 4, COST)
    with pytest.raises(ValueError, match="2 for pingpong"):
        simulate("pingpong", 1, 4, COST)
    with pytest.raises(ValueError, match="n_tiles must be a positive integer, got 0"):
        simulate("serial", 1, 0, COST)
