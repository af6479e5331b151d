"""Every launch that an A100 (sm80) would run, compiled ahead of time for it on the CPU: it must fit.

The ``sm80`` rows of the launch table, the float32 table and the decoding
kernels' launch were never run on an A100. Triton ships ptxas, so each of
their kernels is compiled here for ``GPUTarget("cuda", 80, 32)``, as a GPU
launch would compile it, and must ask for no more shared memory per block
than an Ada GPU gives (99 KiB, the least of the GPUs these rows serve) and
an A100 (163 KiB), and spill no register (a stack frame of 0 bytes, as
cuobjdump reports it).

The compiling runs in subprocesses without ``TRITON_INTERPRET`` (which
conftest.py sets for the other tests), through the worker of
``scripts/check_tritons.py``. Each distinct (kernel, tiles, head dimension,
causal) is compiled once: bfloat16 and float16 compile to the same tiles.
Triton's cache keeps the results, so a second run takes seconds.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ADA_SHARED = 101376  # bytes per block: 99 KiB, what compute capabilities 8.6 and 8.9 allow
A100_SHARED = 166912  # bytes per block: 163 KiB


def _load_script():
    spec = importlib.util.spec_from_file_location("check_tritons", ROOT / "scripts" / "check_tritons.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_tritons = _load_script()
triton = pytest.importorskip("triton")
# ptxas differs from one triton to the next, and so do the spills: KNOWN_SPILLS was measured with 3.9
SPILLS_MEASURED_WITH = (3, 9)

LAUNCHES = (
    check_tritons.table_launches("sm80")
    + check_tritons.float32_launches(head_dims=(64, 128, 256))
    + check_tritons.decode_launches()
)


def launch_id(spec: dict) -> str:
    c = spec["constexprs"]
    tiles = "-".join(f"{k}{v}" for k, v in c.items() if k not in ("D", "DV", "CAUSAL"))
    causal = "-causal" if c.get("CAUSAL") else ""
    d = c.get("D", c.get("DV"))
    return f"{spec['kernel']}-{spec['dtype']}-d{d}-{tiles}-w{spec['num_warps']}s{spec['num_stages']}{causal}"


# Launches that do not meet the limits today (triton 3.9's ptxas). They stay in the test, marked, until
# their launches change in flashattn/triton/launch.py or flashattn/triton/decoding.py; one that then
# passes shows as XPASS. Stack frames in bytes, as measured.
_SPILL = "spills registers on sm80 (stack frame {} bytes); its launch needs fewer registers per thread"
KNOWN_SPILLS = {
    "attn_fwd_kernel-bfloat16-d64-BLOCK_Q128-BLOCK_K64-w4s3-causal": _SPILL.format(24),
    "attn_fwd_kernel-bfloat16-d256-BLOCK_Q64-BLOCK_K32-w4s2": _SPILL.format(64),
    "attn_fwd_kernel-bfloat16-d256-BLOCK_Q64-BLOCK_K32-w4s2-causal": _SPILL.format(64),
    "attn_bwd_dkdv_kernel-float32-d128-BLOCK_Q32-BLOCK_K32-w4s1": _SPILL.format(448),
    "attn_bwd_dkdv_kernel-float32-d128-BLOCK_Q32-BLOCK_K32-w4s1-causal": _SPILL.format(448),
    "attn_bwd_dq_kernel-float32-d128-BLOCK_Q32-BLOCK_K32-w4s1": _SPILL.format(80),
    "attn_bwd_dq_kernel-float32-d128-BLOCK_Q32-BLOCK_K32-w4s1-causal": _SPILL.format(80),
    "attn_fwd_kernel-float32-d256-BLOCK_Q16-BLOCK_K16-w4s1": _SPILL.format(104),
    "attn_fwd_kernel-float32-d256-BLOCK_Q16-BLOCK_K16-w4s1-causal": _SPILL.format(112),
    "attn_bwd_dkdv_kernel-float32-d256-BLOCK_Q16-BLOCK_K16-w4s1": _SPILL.format(336),
    "attn_bwd_dkdv_kernel-float32-d256-BLOCK_Q16-BLOCK_K16-w4s1-causal": _SPILL.format(464),
    "attn_bwd_dq_kernel-float32-d256-BLOCK_Q16-BLOCK_K16-w4s1": _SPILL.format(312),
    "attn_bwd_dq_kernel-float32-d256-BLOCK_Q16-BLOCK_K16-w4s1-causal": _SPILL.format(320),
    "decode_merge_kernel-bfloat16-d128-BLOCK_S256-w4s3": _SPILL.format(64),
    "decode_merge_kernel-bfloat16-d256-BLOCK_S256-w4s3": _SPILL.format(2424),
}
_OVER_ADA = "asks for {} bytes of shared memory per block: fits an A100, not Ada's 99 KiB (an L4, an RTX 4090)"
KNOWN_OVER_ADA = {
    "decode_split_kernel-bfloat16-d256-BLOCK_M64-BLOCK_K64-HAS_LENSTrue-w4s2": _OVER_ADA.format(106496),
}


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    jobs = max(1, min(2, os.cpu_count() or 1))
    results = check_tritons.compile_in_subprocesses(LAUNCHES, 80, jobs=jobs, timeout=900)
    return {launch_id(result): result for result in results}


def _cases(known: dict) -> list:
    return [
        pytest.param(launch_id(spec), marks=pytest.mark.xfail(reason=known[launch_id(spec)], strict=False))
        if launch_id(spec) in known else launch_id(spec)
        for spec in LAUNCHES
    ]


def test_launches_are_distinct():
    assert len({launch_id(spec) for spec in LAUNCHES}) == len(LAUNCHES)


def test_every_known_failure_names_a_launch_of_today():
    # a launch that changed leaves its entry behind: the entry goes, or it would mark nothing
    ids = {launch_id(spec) for spec in LAUNCHES}
    assert set(KNOWN_SPILLS) <= ids and set(KNOWN_OVER_ADA) <= ids, (set(KNOWN_SPILLS) | set(KNOWN_OVER_ADA)) - ids


@pytest.mark.parametrize("launch", _cases(KNOWN_OVER_ADA))
def test_fits_shared_memory(compiled, launch):
    result = compiled[launch]
    assert result["compiled"], result["error"]
    assert result["shared"] <= A100_SHARED, f"{result['shared']} bytes of shared memory, an A100 has {A100_SHARED}"
    assert result["shared"] <= ADA_SHARED, f"{result['shared']} bytes of shared memory, Ada has {ADA_SHARED}"


@pytest.mark.parametrize("launch", _cases(KNOWN_SPILLS))
def test_spills_no_register(compiled, launch):
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < SPILLS_MEASURED_WITH:
        pytest.skip(f"the known spills were measured with triton {SPILLS_MEASURED_WITH}, this is {triton.__version__}")
    result = compiled[launch]
    assert result["compiled"], result["error"]
    if result["stack"] is None:
        pytest.skip("this triton ships no cuobjdump to read the stack frame with")
    assert result["stack"] == 0, f"{result['stack']} bytes of stack frame ({result['registers']} registers): spills"
