"""The kernels with ``TMA=True`` (tiles moved by TMA descriptors), and the Hopper variants of benchmarks/, against float64.

They are called directly, through :mod:`flashattn.triton.hopper` and
``benchmarks/hopper_variants.py`` (warp-specialised loops, the next tile's
scores first, the fused backward), at several launches each, so that every
kernel is checked whatever ``triton_attention`` picks. Without a GPU they run
in Triton's interpreter on float16 CPU tensors (TMA moves 16-bit tiles only);
on a GPU of compute capability 9.x, compiled, in bfloat16, where their error
must stay within twice that of PyTorch's own attention in the same dtype.
"""

from __future__ import annotations

import contextvars
import sys
from pathlib import Path

import pytest
import torch

from flashattn import FlashAttention, triton_attention
from flashattn.triton import hopper
from flashattn.triton.attention import launch_backward_preprocess, _TritonAttention
from flashattn.triton.hopper import HopperLaunch, tma_fits
from flashattn.triton.launch import KernelConfigs, TileConfig
from flashattn.triton.runtime import is_interpreted
from test_triton_attention import RATIO_FLOOR, TOLERANCE, errors, make_inputs, reference_with_grads, rel_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import hopper_variants as variants  # noqa: E402 - the variants live with the benchmark that times them
from hopper_variants import VariantLaunch  # noqa: E402

INTERPRETED = is_interpreted(variants.attn_fwd_tma_kernel)
HOPPER = not INTERPRETED and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
on_cpu = pytest.mark.skipif(not INTERPRETED, reason="the interpreter runs only without a GPU (TRITON_INTERPRET=1)")
on_hopper = pytest.mark.skipif(not HOPPER, reason="needs a GPU of compute capability 9.x")


def hopper_attention(fwd: HopperLaunch | VariantLaunch, bwd: HopperLaunch | VariantLaunch, fused: bool):
    """attention(q, k, v, causal, scale) -> o through the TMA kernels, with their backward, for the tests.

    A ``HopperLaunch`` runs the package's kernels with ``TMA=True``, a ``VariantLaunch`` the benchmark's variants.
    """

    def kernels(cfg):
        return hopper if isinstance(cfg, HopperLaunch) else variants

    class Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, causal, scale):
            o, lse = kernels(fwd).forward(q, k, v, causal, scale, fwd)
            ctx.save_for_backward(q, k, v, o, lse)
            ctx.causal, ctx.scale = causal, scale
            return o

        @staticmethod
        def backward(ctx, do):
            q, k, v, o, lse = ctx.saved_tensors
            do = do.contiguous()
            delta = launch_backward_preprocess(o, do)
            args = (q, k, v, do, lse, delta, ctx.causal, ctx.scale, bwd)
            if fused:
                dq, dk, dv = variants.backward_fused(*args)
            else:
                dk, dv = kernels(bwd).backward_dkdv(*args)
                dq = kernels(bwd).backward_dq(*args)
            return dq, dk, dv, None, None

    def attention(q, k, v, causal=False):
        return Attention.apply(q, k, v, causal, q.shape[-1] ** -0.5)

    return attention


# fwd launch, backward launch (block_q, block_k, warps, stages[, warp-specialised]), fused backward or three passes
CPU_LAUNCHES = [
    (HopperLaunch(32, 16, 4, 1), HopperLaunch(16, 32, 4, 1), False),
    (HopperLaunch(16, 32, 4, 1), HopperLaunch(32, 16, 4, 1), False),
    (VariantLaunch(16, 32, 4, 1, True), VariantLaunch(32, 16, 4, 1, True), True),
    (VariantLaunch(16, 16, 4, 1, False, overlap=True), VariantLaunch(16, 16, 4, 1, False), False),
]
CPU_CASES = [
    # b, h, h_kv, i, j, d, d_v, causal
    (1, 2, 2, 64, 64, 32, 32, False),  # whole tiles only
    (2, 4, 2, 70, 50, 32, 16, True),  # i > j: rows with no key; grouped-query; d_v != d
    (1, 2, 1, 45, 90, 16, 32, True),  # i < j, ragged on both sides
    (1, 3, 3, 33, 77, 32, 32, False),
]


@on_cpu
@pytest.mark.parametrize("fwd, bwd, fused", CPU_LAUNCHES)
@pytest.mark.parametrize("b, h, h_kv, i, j, d, d_v, causal", CPU_CASES)
def test_matches_reference(fwd, bwd, fused, b, h, h_kv, i, j, d, d_v, causal):
    q, k, v, do = make_inputs(b, h, h_kv, i, j, d, d_v, torch.float16, seed=i * j + d)
    errs = errors(lambda q, k, v: hopper_attention(fwd, bwd, fused)(q, k, v, causal), q, k, v, do, causal)
    assert max(errs.values()) < TOLERANCE[torch.float16], errs


@on_cpu
def test_rows_without_keys_are_zero():
    # i > j under the causal rule: the first i - j rows see no key; their output and dq must be exactly 0
    q, k, v, do = make_inputs(1, 2, 2, 60, 20, 16, 16, torch.float16, seed=3)
    fwd, bwd, fused = CPU_LAUNCHES[0]
    o = hopper_attention(fwd, bwd, fused)(q, k, v, True)
    o.backward(do)
    assert torch.equal(o[:, :, :40], torch.zeros_like(o[:, :, :40]))
    assert torch.equal(q.grad[:, :, :40], torch.zeros_like(q.grad[:, :, :40]))
    ref = reference_with_grads(q, k, v, do, causal=True)
    assert rel_error(o, ref[0]) < TOLERANCE[torch.float16]


def test_tma_fits():
    # descriptors need 16-byte aligned rows and bases, a unit last stride, 16-bit elements
    x = torch.empty(2, 3, 40, 64, dtype=torch.float16)
    assert tma_fits(x)
    assert not tma_fits(x.float())  # float32 stays on the pointer kernels
    assert tma_fits(x[..., :32])  # a slice keeps the 128-byte rows
    assert tma_fits(x[..., :56].contiguous())  # 112-byte rows
    assert not tma_fits(x[..., :60].contiguous())  # 120-byte rows
    assert not tma_fits(torch.empty(2, 3, 40, 12, dtype=torch.float16))  # 24-byte rows
    assert not tma_fits(x.transpose(-1, -2))  # last stride not 1
    assert not tma_fits(torch.empty(2 * 3 * 40 * 64 + 1, dtype=torch.float16)[1:].view(2, 3, 40, 64))  # base + 2 bytes


HOPPER_CASES = [
    # b, h, h_kv, i, j, d, causal
    (2, 8, 8, 1000, 1000, 128, True),
    (2, 8, 2, 777, 1500, 128, False),  # grouped-query, ragged, i < j
    (1, 4, 4, 1500, 333, 64, True),  # i > j: rows with no key
    (1, 16, 4, 3000, 3000, 128, True),
]
HOPPER_LAUNCHES = [
    (HopperLaunch(128, 64, 8, 3), HopperLaunch(64, 128, 8, 2), False),
    (VariantLaunch(128, 128, 8, 3, True), VariantLaunch(64, 128, 8, 2, True), False),
    (VariantLaunch(128, 64, 8, 3, False, overlap=True), VariantLaunch(64, 128, 8, 2, False), True),
]


@on_hopper
@pytest.mark.parametrize("fwd, bwd, fused", HOPPER_LAUNCHES)
@pytest.mark.parametrize("b, h, h_kv, i, j, d, causal", HOPPER_CASES)
def test_hopper_within_twice_pytorch_error(fwd, bwd, fused, b, h, h_kv, i, j, d, causal):
    q, k, v, do = make_inputs(b, h, h_kv, i, j, d, d, torch.bfloat16, seed=i + j + d, device="cuda")
    ours = errors(lambda q, k, v: hopper_attention(fwd, bwd, fused)(q, k, v, causal), q, k, v, do, causal)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    pytorch = errors(lambda q, k, v: FlashAttention(causal=causal)(q, k, v), q, k, v, do, causal)
    for name in ours:
        assert ours[name] <= max(2 * pytorch[name], RATIO_FLOOR[torch.bfloat16]), (name, ours, pytorch)


# ---------------------------------------------------------------------------------------------
# How triton_attention chooses between the Hopper kernels and the pointer kernels


@on_cpu
@pytest.mark.parametrize("causal", [False, True])
def test_mixed_configs_match_reference(causal):
    # each kernel of one call may be a Hopper launch or a pointer one: _TritonAttention dispatches on the type
    configs = KernelConfigs(fwd=HopperLaunch(32, 16, 4, 1), dkdv=TileConfig(16, 32, 4, 1),
                            dq=HopperLaunch(32, 16, 4, 1))
    q, k, v, do = make_inputs(1, 4, 2, 50, 70, 32, 32, torch.float16, seed=9)
    errs = errors(lambda q, k, v: _TritonAttention.apply(q, k, v, causal, 32**-0.5, configs), q, k, v, do, causal)
    assert max(errs.values()) < TOLERANCE[torch.float16], errs


def test_hopper_configs_choice(monkeypatch):
    # the table's launches replace the pointer kernels' on capability 9.x only, for tensors TMA can describe
    base = KernelConfigs(TileConfig(1, 1, 1, 1), TileConfig(2, 2, 2, 2), TileConfig(3, 3, 3, 3))
    x = torch.empty(1, 2, 4096, 128, dtype=torch.bfloat16)
    capability = (9, 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda")
    got = hopper.hopper_configs(base, cuda, 128, False, 4096, 4096, x, x, x)
    fwd, dkdv, dq = hopper.hopper_table()[(128, False, "long")]
    assert (got.fwd, got.dkdv, got.dq) == (fwd, base.dkdv, dq) and dkdv is None
    assert hopper.hopper_configs(base, cuda, 32, True, 512, 512, x, x, x) == base  # a row without Hopper launches
    assert hopper.hopper_configs(base, cuda, 256, False, 4096, 4096, x, x, x) == base  # no row for d = 256
    assert hopper.hopper_configs(base, cuda, 128, False, 4096, 4096, x, x, x.float()) == base  # float32
    with hopper.tma_kernels(False):
        assert hopper.hopper_configs(base, cuda, 128, False, 4096, 4096, x, x, x) == base
    assert hopper.hopper_configs(base, cuda, 128, False, 4096, 4096, x, x, x) == got  # restored after the block
    for capability in ((8, 0), (10, 0)):  # Ampere, and Blackwell, where they were not measured
        assert hopper.hopper_configs(base, cuda, 128, False, 4096, 4096, x, x, x) == base


@on_hopper
@pytest.mark.parametrize("d, causal", [(128, False), (128, True), (64, False), (64, True)])
def test_hopper_path_and_pointer_path_agree(d, causal):
    # on the H200, triton_attention with and without the Hopper kernels: both within twice PyTorch's error
    q, k, v, do = make_inputs(2, 4, 2, 2500, 2500, d, d, torch.bfloat16, seed=d, device="cuda")
    hopper_errs = errors(lambda q, k, v: triton_attention(q, k, v, causal=causal), q, k, v, do, causal)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with hopper.tma_kernels(False):
        pointer_errs = errors(lambda q, k, v: triton_attention(q, k, v, causal=causal), q, k, v, do, causal)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    pytorch = errors(lambda q, k, v: FlashAttention(causal=causal)(q, k, v), q, k, v, do, causal)
    for name in pytorch:
        bound = max(2 * pytorch[name], RATIO_FLOOR[torch.bfloat16])
        assert hopper_errs[name] <= bound and pointer_errs[name] <= bound, (name, hopper_errs, pointer_errs, pytorch)


def test_pytorchs_allocator_is_given_to_triton_unless_the_program_set_one(monkeypatch):
    """The TMA workspace comes from PyTorch's allocator; a program's own allocator is kept; a triton that keeps
    its allocator where the package does not look still gets one (else a TMA launch would fail)."""
    import triton
    from triton.runtime import _allocation

    given = []
    monkeypatch.setattr(triton, "set_allocator", given.append)
    monkeypatch.setattr(_allocation, "_allocator", contextvars.ContextVar("a", default=_allocation.NullAllocator()))
    hopper.use_torch_allocator()
    assert given == [hopper._workspace]
    monkeypatch.setattr(_allocation, "_allocator", contextvars.ContextVar("a", default=lambda *a: None))
    hopper.use_torch_allocator()
    assert given == [hopper._workspace]  # the program's own: not replaced
    monkeypatch.delattr(_allocation, "_allocator")
    hopper.use_torch_allocator()
    assert given == [hopper._workspace, hopper._workspace]


@pytest.mark.parametrize("alignment", [16, 128, 256])
@pytest.mark.parametrize("start", [0, 1, 7])
def test_the_workspace_view_is_aligned(alignment, start):
    """Triton asks its allocator for aligned bytes; the workspace is cut from a block one alignment longer."""
    size = 1000
    buffer = torch.empty(size + alignment - 1 + start, dtype=torch.int8)[start:]  # starts wherever it falls
    view = hopper.aligned_view(buffer, size, alignment)
    assert view.data_ptr() % alignment == 0 and view.numel() == size
    assert buffer.data_ptr() <= view.data_ptr() and view.data_ptr() + size <= buffer.data_ptr() + buffer.numel()
