"""The benchmark scripts that check or measure on the GPU runner, run here as far as a CPU allows.

``check_sm80_rows.py --cpu-smoke`` forces every ``sm80`` row of the launch
table through Triton's interpreter at tiny sizes and compares the outputs and
gradients with float64; ``host_time.py`` needs a GPU and must say so;
``bench_ring.py --smoke`` runs its two processes over gloo on the CPU and
times every method in interleaved rounds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("triton")


def test_the_sm80_rows_forced_through_the_interpreter_match_float64(tmp_path):
    out = tmp_path / "sm80.json"
    run = subprocess.run([sys.executable, "benchmarks/check_sm80_rows.py", "--cpu-smoke", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["complete"] and record["failed"] == 0 and len(record["cases"]) >= 10
    # every sm80 row of the launch table was forced at least once
    from flashattn.triton.launch import launch_table

    sm80_rows = {str(row) for arch, row, _ in launch_table() if arch == "sm80"}
    assert {str(case["row"]) for case in record["cases"]} >= sm80_rows
    assert all(case[name]["error"] <= case[name]["limit"] for case in record["cases"] for name in ("o", "dq", "dk", "dv"))
    assert all(case["passed"] for case in record["cases"])


def test_host_time_says_it_needs_a_gpu(tmp_path):
    run = subprocess.run([sys.executable, "benchmarks/host_time.py", "--out", str(tmp_path / "h.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode != 0
    assert "host_time.py measures eager calls on a GPU; no CUDA device is available here" in run.stderr


def test_host_time_traces_the_ops_of_one_call():
    """host_time.py --profile's trace: every PyTorch op of a call, counted and timed per call (here on the CPU)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import host_time
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import torch
    from torch.profiler import ProfilerActivity

    a, b = torch.randn(64, 64), torch.randn(64, 64)
    queued = []
    found = host_time.trace(lambda: (torch.add(a, b), torch.mm(a, b), torch.mm(b, a)), 4, lambda: queued.append(1),
                            activities=[ProfilerActivity.CPU])
    ops = {op["name"]: op for op in found["ops"]}
    assert queued == [1] and found["calls"] == 4 and found["launches_per_call"] == 0  # no GPU: no launch
    assert ops["aten::mm"]["per_call"] == 2 and ops["aten::add"]["per_call"] == 1
    assert 0 < ops["aten::mm"]["self_us"] <= ops["aten::mm"]["total_us"]


def test_the_ring_benchmark_times_every_method_in_interleaved_rounds(tmp_path):
    """bench_ring.py's smoke run (2 processes, gloo, CPU): every method at every length gets one sample per round."""
    out = tmp_path / "ring.json"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "benchmarks/bench_ring.py", "--smoke", "--rounds", "3", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    record = json.loads(out.read_text())
    assert all(row["ok"] for row in record["check"]) and len(record["check"]) == 2  # both layouts
    expected = {(n, mode, method, gpus) for n in (64, 128) for mode in ("fwd", "fwd_bwd")
                for method, gpus in (("one_gpu", 1), ("ring_contiguous", 2), ("ring_zigzag", 2))}
    assert {(r["n"], r["mode"], r["method"], r["gpus"]) for r in record["rows"]} == expected
    assert len(record["rows"]) == len(expected)
    for row in record["rows"]:
        samples = row["samples_ms"]
        assert len(samples) == 3 and all(t > 0 for t in samples), row
        assert row["ms"] == sorted(samples)[1] and (row["ms_min"], row["ms_max"]) == (min(samples), max(samples))
    assert record["timing"].startswith("3 rounds, methods interleaved")


def test_the_ragged_decoding_providers_attend_each_sequence_to_its_own_length():
    """bench_decode.py --ragged: each provider that runs on the CPU gives float64's attention over each sequence's keys.

    The cache past a sequence's length holds large values (a provider that
    read them would be far off); the forced SDPA backends run on the GPU only.
    """
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_decode
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from torch.nn.attention.flex_attention import flex_attention

    torch = pytest.importorskip("torch")
    lens_list = bench_decode.ragged_lengths(4, 3, 37)
    assert lens_list[0] == 3 and lens_list[-1] == 37 and lens_list == sorted(set(lens_list))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, hh, n, 16, generator=g) for hh, n in ((6, 1), (2, 40), (2, 40)))  # groups of 3
    k[:, :, 37:], v[:, :, 37:] = 1e4, 1e4  # slots no sequence holds
    for n, length in enumerate(lens_list):
        k[n, :, length:], v[n, :, length:] = 1e4 * (n + 1), -1e4
    lens = torch.tensor(lens_list)
    want = bench_decode.ragged_reference(q, k, v, lens_list)
    providers = bench_decode.ragged_providers(lens, 40, flex=flex_attention)
    assert set(providers) == {"decode", "sdpa_mask", *bench_decode.MASK_BACKENDS, "sdpa_mask_packed", "flex"}
    for name in ("decode", "sdpa_mask", "sdpa_mask_packed", "flex"):
        with warnings.catch_warnings():  # flex_attention run eagerly says that it is slow so
            warnings.filterwarnings("ignore", "flex_attention called without torch.compile", UserWarning)
            o = providers[name](q, k, v)
        error = bench_decode.ragged_error(o, want)
        assert error < 1e-5, f"{name}: {error}"  # float32 inputs: a few ulps of values of order 1
