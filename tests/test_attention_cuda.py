"""FlashAttention on CUDA: the fused kernels keep the rules of API.md.

These run on the GPU runner; without CUDA they are skipped (and reported as
skipped, not passed). On the CPU, PyTorch's math kernel already returns zero
rows, so only here is the empty-row handling of the flash path exercised
against kernels (cuDNN) that do not.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from flashattn import FlashAttention, alibi_bias, padding_mask
from reference import copying_saved_tensors, reference_attention, reference_keep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEV = "cuda"


def randn(*shape, seed, dtype=torch.bfloat16):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=DEV, dtype=dtype)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def kernel_names(fn) -> list[str]:
    with profile(activities=[ProfilerActivity.CUDA], acc_events=True) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type.name == "CUDA"]


@pytest.mark.parametrize("flash", [True, False])
@pytest.mark.parametrize("i, j", [(192, 192), (704, 704), (300, 517), (517, 300)])
def test_empty_rows_are_zero_with_zero_gradients_on_cuda(flash, i, j):
    q = randn(2, 4, i, 64, seed=1).requires_grad_()
    k = randn(2, 2, j, 64, seed=2).requires_grad_()
    v = randn(2, 2, j, 64, seed=3).requires_grad_()
    mask = torch.rand(2, 1, i, j, device=DEV, generator=torch.Generator(DEV).manual_seed(4)) > 0.3
    mask[0, 0, 5] = False
    mask[1, 0, -1] = False
    o = FlashAttention(causal=True, flash=flash)(q, k, v, mask=mask)
    o.backward(randn(*o.shape, seed=5))
    for t in (o, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()
    assert (o[0, :, 5] == 0).all() and (q.grad[0, :, 5] == 0).all()
    assert (o[1, :, -1] == 0).all() and (q.grad[1, :, -1] == 0).all()
    if i > j:  # causal leaves the first i - j rows empty
        assert (o[:, :, : i - j] == 0).all() and (q.grad[:, :, : i - j] == 0).all()


@pytest.mark.parametrize("backend", [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
def test_rows_without_key_are_silenced_in_sdpas_saved_log_sum_exp(backend):
    """Each fused kernel that takes a mask: no node and no copy of dO after SDPA's, and the gradients of attention.

    Causal with i > j leaves 217 of 517 rows without a key: were they not
    silenced, their gradient would reach dk and dv in full. The same problem
    under hooks that copy the saved tensors takes the copying path; both
    are held to float64 as tightly as PyTorch's own kernel is.
    """
    b, h, h_kv, i, j, d = 2, 4, 2, 517, 300, 64
    mask = torch.rand(b, 1, i, j, device=DEV, generator=torch.Generator(DEV).manual_seed(30)) > 0.3
    mask[1, 0, 400] = False  # and one row empty by the mask
    leaves = [randn(b, h, i, d, seed=31), randn(b, h_kv, j, d, seed=32), randn(b, h_kv, j, d, seed=33)]
    do = randn(b, h, i, d, seed=34)
    q64, k64, v64 = (t.double().cpu().requires_grad_() for t in leaves)
    ref = reference_attention(q64, k64, v64, causal=True, mask=mask)
    ref.backward(do.double().cpu())

    def run(copying: bool):
        q, k, v = (t.clone().requires_grad_() for t in leaves)
        hooks = copying_saved_tensors() if copying else contextlib.nullcontext()
        try:
            with sdpa_kernel(backend), hooks:
                o = FlashAttention(causal=True)(q, k, v, mask=mask)
                node = type(o.grad_fn).__name__
                o.backward(do)
        except RuntimeError as error:
            if "No available kernel" in str(error):
                pytest.skip(f"{backend.name} does not take this masked problem with torch {torch.__version__}: {error}")
            raise
        return node, [max_err(o, ref)] + [max_err(a.grad, r.grad) for a, r in zip((q, k, v), (q64, k64, v64))], q.grad

    node, errors, dq = run(copying=False)
    copied_node, copied_errors, _ = run(copying=True)
    assert node.startswith("ScaledDotProduct") and not copied_node.startswith("ScaledDotProduct"), (node, copied_node)
    assert (dq[:, :, : i - j] == 0).all() and (dq[1, :, 400] == 0).all()
    for what, err, copied_err in zip(["o", "dq", "dk", "dv"], errors, copied_errors):
        # the floor: one bf16 unit (2^-8) on unit-scale values
        assert err <= 2 * copied_err + 2**-8, f"{backend.name} {what}: {err:.3g} vs the copying path's {copied_err:.3g}"


def _cases(b=2, h=8, i=333, j=517, d=64):
    keep_pad = padding_mask(torch.tensor([517, 200], device=DEV), j)
    return {
        "plain": dict(),
        "causal": dict(causal=True),
        "causal square": dict(causal=True, i=j),
        "key padding": dict(mask=keep_pad),
        "key padding causal": dict(mask=keep_pad, causal=True),
        "alibi": dict(attn_bias=alibi_bias(h, i, j, DEV).to(torch.bfloat16)),
        "alibi causal": dict(attn_bias=alibi_bias(h, i, j, DEV).to(torch.bfloat16), causal=True),
        "dense mask": dict(mask=torch.rand(b, h, i, j, device=DEV, generator=torch.Generator(DEV).manual_seed(9)) > 0.5),
    }


CASE_NAMES = ["plain", "causal", "causal square", "key padding", "key padding causal", "alibi", "alibi causal", "dense mask"]


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_bf16_error_at_most_twice_pytorchs_own(name, kv_heads):
    """Error against float64 is at most twice that of PyTorch's own bf16 SDPA on the same problem."""
    cases = _cases()
    assert list(cases) == CASE_NAMES
    case = cases[name]
    b, h, d = 2, 8, 64
    i = case.get("i", 333)
    j = 517
    q = randn(b, h, i, d, seed=10).requires_grad_()
    k = randn(b, kv_heads, j, d, seed=11).requires_grad_()
    v = randn(b, kv_heads, j, d, seed=12).requires_grad_()
    mask, bias, causal = case.get("mask"), case.get("attn_bias"), case.get("causal", False)
    do = randn(b, h, i, d, seed=13)

    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q64, k64, v64, causal=causal, mask=mask, attn_bias=bias)
    ref.backward(do.double().cpu())

    keep = reference_keep(i, j, causal, mask, (b, h)).to(DEV)
    dense = keep if bias is None else torch.where(keep, bias, float("-inf"))
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):  # zero rows and GQA-free: expand heads
        g = h // kv_heads
        own = F.scaled_dot_product_attention(qs, ks.repeat_interleave(g, 1), vs.repeat_interleave(g, 1), attn_mask=dense)
    own.backward(do)
    own_errors = [max_err(own, ref)] + [max_err(a.grad, r.grad) for a, r in zip((qs, ks, vs), (q64, k64, v64))]

    for flash in (True, False):
        for t in (q, k, v):
            t.grad = None
        o = FlashAttention(causal=causal, flash=flash)(q, k, v, mask=mask, attn_bias=bias)
        o.backward(do)
        errors = [max_err(o, ref)] + [max_err(a.grad, r.grad) for a, r in zip((q, k, v), (q64, k64, v64))]
        for what, err, own_err in zip(["o", "dq", "dk", "dv"], errors, own_errors):
            # the floor: one bf16 unit (2^-8) on unit-scale values
            assert err <= 2 * own_err + 2**-8, f"{name} flash={flash} {what}: {err:.3g} vs PyTorch's {own_err:.3g}"


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_flash_path_never_falls_back_to_the_math_kernel(name, kv_heads):
    case = _cases()[name]
    i = case.get("i", 333)
    q = randn(2, 8, i, 64, seed=20)
    k, v = randn(2, kv_heads, 517, 64, seed=21), randn(2, kv_heads, 517, 64, seed=22)
    m = FlashAttention(causal=case.get("causal", False))
    names = kernel_names(lambda: m(q, k, v, mask=case.get("mask"), attn_bias=case.get("attn_bias")))
    assert not any("softmax" in n.lower() for n in names), names
    assert any(w in n.lower() for n in names for w in ("fmha", "flash", "cudnn")), names


def test_masked_call_can_be_captured_in_a_cuda_graph():
    """While a graph is captured the host cannot read whether a row is empty: the zeroing is captured too."""
    q, k, v = randn(2, 4, 100, 64, seed=30), randn(2, 4, 120, 64, seed=31), randn(2, 4, 120, 64, seed=32)
    mask = padding_mask(torch.tensor([120, 0], device=DEV), 120)  # batch element 1 has no key
    m = FlashAttention()
    eager = m(q, k, v, mask=mask)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        m(q, k, v, mask=mask)  # warm-up outside the capture, as CUDA graphs require
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = m(q, k, v, mask=mask)
    graph.replay()
    torch.cuda.synchronize()
    assert (captured[1] == 0).all()
    torch.testing.assert_close(captured, eager, atol=0, rtol=0)


def test_the_callers_backend_choice_is_kept_on_cuda():
    """After enable_cudnn_sdp(False) the module must not run cuDNN's kernel, as a direct call would not."""
    q, k, v = randn(2, 8, 512, 64, seed=40), randn(2, 8, 512, 64, seed=41), randn(2, 8, 512, 64, seed=42)
    mask = padding_mask(torch.tensor([512, 300], device=DEV), 512)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        for kwargs in ({}, {"mask": mask}):
            names = kernel_names(lambda: FlashAttention()(q, k, v, **kwargs))
            assert not any("cudnn" in n.lower() for n in names), names
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_empty_rows_are_zero_on_a_device_that_is_not_the_current_one():
    """Tensors on cuda:1 while cuda:0 is current: the zeroing must not depend on which device is current."""
    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    q, k, v = (torch.randn(2, 4, 256, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
    mask = torch.ones(2, 1, 256, 256, dtype=torch.bool, device=dev)
    mask[1, 0, 7] = False
    for _ in range(20):
        o = FlashAttention()(q, k, v, mask=mask)
        assert (o[1, :, 7] == 0).all() and (o[0, :, 7] != 0).any()


def test_a_masked_call_does_not_wait_for_the_gpu():
    """With a long kernel queued ahead, a masked call returns while that kernel still runs."""
    q, k, v = randn(2, 4, 256, 64, seed=43), randn(2, 4, 256, 64, seed=44), randn(2, 4, 256, 64, seed=45)
    mask = padding_mask(torch.tensor([256, 0], device=DEV), 256)  # batch element 1 has no key
    m = FlashAttention(causal=True)
    m(q, k, v, mask=mask)  # warm-up: kernels loaded, memory cached
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time at ~2 GHz
    o = m(q, k, v, mask=mask)
    still_busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert still_busy, "the masked call waited for the GPU to drain its queue"
    assert (o[1] == 0).all() and (o[0] != 0).any()


@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float32])
def test_a_bias_of_minus_infinity_hides_keys_on_cuda(bias_dtype):
    q = randn(2, 4, 300, 64, seed=46).requires_grad_()
    k, v = randn(2, 4, 300, 64, seed=47).requires_grad_(), randn(2, 4, 300, 64, seed=48).requires_grad_()
    bias = torch.zeros(300, 300, device=DEV, dtype=bias_dtype)
    bias[11] = float("-inf")
    o = FlashAttention()(q, k, v, attn_bias=bias)
    o.backward(randn(*o.shape, seed=49))
    assert (o[:, :, 11] == 0).all() and (q.grad[:, :, 11] == 0).all()
    assert all(torch.isfinite(t).all() for t in (o, q.grad, k.grad, v.grad))


def test_a_wide_bias_is_not_rounded_away_on_cuda():
    q, k, v = (randn(2, 8, 256, 64, seed=s) for s in (50, 51, 52))
    bias = 300 + 2 * randn(8, 256, 256, seed=53, dtype=torch.float32)
    o = FlashAttention()(q, k, v, attn_bias=bias)
    err = max_err(o, reference_attention(q, k, v, attn_bias=bias))
    assert err < 4 * 2**-7, err
