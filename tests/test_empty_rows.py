"""The in-place zeroing of rows with no key, and the gradient through it.

The kernel writes through ``o.data``, out of autograd's sight, while SDPA's
backward still uses the output it saved: the gradients must nevertheless be
exactly those of attention with the empty rows zeroed. On a CPU the kernel
runs in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1), on a
GPU compiled.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference import copying_saved_tensors, reference_attention

triton = pytest.importorskip("triton")
import flashattn.attention as attention_module  # noqa: E402
from flashattn import FlashAttention  # noqa: E402
from flashattn.attention import _ZeroRowsWithoutKey  # noqa: E402
from flashattn.triton.empty_rows import zero_rows_without_key_, zero_rows_without_key_in_mask_  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(DEVICE)


@pytest.mark.parametrize("flag_shape", [(2, 1, 1), (2, 3, 7), (1, 1, 7)])
def test_only_rows_without_key_are_written(flag_shape):
    o = randn(2, 3, 7, 24, seed=1)  # d_v = 24: not a power of two
    flags = torch.rand(flag_shape, generator=torch.Generator().manual_seed(2)) > 0.4
    flags = flags.to(DEVICE)
    want = o.masked_fill(~flags[..., None], 0.0)
    zero_rows_without_key_(o, flags)
    assert torch.equal(o, want)


@pytest.mark.parametrize("flag_shape", [(2, 1, 1), (2, 3, 7), (1, 1, 7)])
def test_the_same_launch_writes_plus_infinity_into_the_empty_rows_lse(flag_shape):
    o = randn(2, 3, 7, 24, seed=1)
    lse = randn(2, 3, 32, seed=3)[..., :7]  # padded rows, as the memory-efficient kernel saves it
    flags = (torch.rand(flag_shape, generator=torch.Generator().manual_seed(2)) > 0.4).to(DEVICE)
    want_o, want_lse = o.masked_fill(~flags[..., None], 0.0), lse.masked_fill(~flags, float("inf"))
    zero_rows_without_key_(o, flags, lse)
    assert torch.equal(o, want_o) and torch.equal(lse, want_lse)


@pytest.mark.parametrize("mask_shape", [(2, 3, 70, 130), (2, 1, 1, 130), (1, 1, 70, 130), (2, 1, 70, 1), (1, 3, 70, 5)])
def test_rows_whose_mask_row_holds_no_true_are_zeroed_and_no_other(mask_shape):
    """The kernel that reads the mask: any axis of it broadcast; j across two tiles of keys, and 1; i across two row tiles."""
    o = randn(2, 3, 70, 24, seed=1)  # d_v = 24: not a power of two
    keep = torch.rand(mask_shape, generator=torch.Generator().manual_seed(2)) > 0.97  # a few keys per row
    rows = keep.view(-1, mask_shape[-1])
    rows[::3] = False  # every third row empty
    rows[1::3, -1] = True  # and after each, a row that keeps at least its last key
    keep = keep.to(DEVICE)
    empty = ~keep.any(dim=-1, keepdim=True)
    assert empty.any() and not empty.all()
    want = o.masked_fill(empty, 0.0)
    zero_rows_without_key_in_mask_(o, keep)
    assert torch.equal(o, want)


def test_a_mask_seen_through_a_transpose_is_read_by_its_strides():
    o = randn(2, 3, 9, 16, seed=3)
    keep = (torch.rand(2, 1, 11, 9, generator=torch.Generator().manual_seed(4)) > 0.8).to(DEVICE).transpose(2, 3)
    want = o.masked_fill(~keep.any(dim=-1, keepdim=True), 0.0)
    zero_rows_without_key_in_mask_(o, keep)
    assert torch.equal(o, want)


def test_gradients_through_the_in_place_zeroing():
    q = randn(2, 3, 7, 16, seed=3).requires_grad_()
    k, v = randn(2, 3, 9, 16, seed=4).requires_grad_(), randn(2, 3, 9, 16, seed=5).requires_grad_()
    keep = torch.rand(2, 1, 7, 9, generator=torch.Generator().manual_seed(6)) > 0.3
    keep[0, 0, 2] = False  # an empty row
    keep[1, 0, 6] = False  # and another
    keep = keep.to(DEVICE)
    row_has_key = keep.any(dim=-1, keepdim=True)  # (2, 1, 7, 1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep | ~row_has_key)
    o = _ZeroRowsWithoutKey.apply(o, row_has_key[..., 0], zero_rows_without_key_)
    do = randn(*o.shape, seed=7)
    grads = torch.autograd.grad(o, (q, k, v), do)
    o_ref = reference_attention(q, k, v, mask=keep)
    grads_ref = torch.autograd.grad(o_ref, (q, k, v), do.double().cpu())
    torch.testing.assert_close(o.double().cpu(), o_ref, atol=1e-5, rtol=1e-5)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad.double().cpu(), grad_ref.double().cpu(), atol=1e-5, rtol=1e-5)
    assert (grads[0][0, :, 2] == 0).all() and (grads[0][1, :, 6] == 0).all()


def test_the_gradient_passed_on_has_the_layout_of_o():
    """The zeroed gradient is laid out as ``o`` is, whatever the incoming one: SDPA's backward then reads it as it is.

    ``o`` takes the layout of ``q`` (a (b, i, h, d) layout when q is a view of
    a projection's output); SDPA's cuDNN backward before cuDNN 9.5.1 copies a
    gradient of another layout once more.
    """
    base = randn(2, 7, 3, 16, seed=8).requires_grad_()  # (b, i, h, d) in memory
    o = base.transpose(1, 2) * 1.0  # (b, h, i, d), strides of the (b, i, h, d) layout
    assert not o.is_contiguous()
    row_has_key = torch.ones(2, 1, 7, dtype=torch.bool, device=DEVICE)
    row_has_key[1, 0, 4] = False
    seen = []
    o.register_hook(lambda g: seen.append(g))
    out = _ZeroRowsWithoutKey.apply(o, row_has_key, zero_rows_without_key_)
    do = randn(2, 3, 7, 16, seed=9)  # contiguous (b, h, i, d)
    out.backward(do)
    (grad,) = seen
    assert grad.stride() == o.stride()
    assert torch.equal(grad, do.masked_fill(~row_has_key[..., None], 0.0))


@pytest.fixture
def kernel_calls(monkeypatch):
    """The module's zeroing through the kernel (interpreted on the CPU), as on a GPU; the shapes of ``o`` it was called on.

    On the CPU the module zeroes with ``masked_fill``; ``zero_rows_kernel`` is
    the seam through which it is handed the kernel, so that the path a GPU
    takes runs, and a test sees that it did.
    """
    calls = []

    def kernel_for(o, reads_mask=False):
        def zero_rows_(o, row_has_key, lse=None):
            calls.append(tuple(o.shape))
            zero_rows_without_key_(o, row_has_key, lse)

        def zero_rows_in_mask_(o, keep):
            calls.append(("reads the mask", tuple(o.shape)))
            zero_rows_without_key_in_mask_(o, keep)

        return zero_rows_in_mask_ if reads_mask else zero_rows_

    monkeypatch.setattr(attention_module, "zero_rows_kernel", kernel_for)
    return calls


def test_the_module_zeroes_empty_rows_through_the_kernel(kernel_calls):
    """FlashAttention's flash path with the kernel doing the zeroing, as on a GPU: values and gradients of attention."""
    q = randn(2, 4, 7, 16, seed=8).requires_grad_()
    k, v = randn(2, 2, 5, 16, seed=9).requires_grad_(), randn(2, 2, 5, 16, seed=10).requires_grad_()
    mask = (torch.rand(2, 1, 7, 5, generator=torch.Generator().manual_seed(11)) > 0.3).to(DEVICE)
    mask[1, 0, 4] = False  # an empty row by the mask; the causal rule empties rows 0 and 1 (i - j = 2)
    o = FlashAttention(causal=True)(q, k, v, mask=mask)
    assert kernel_calls == [(2, 4, 7, 16)]
    do = randn(*o.shape, seed=12)
    grads = torch.autograd.grad(o, (q, k, v), do)
    o_ref = reference_attention(q, k, v, causal=True, mask=mask)
    grads_ref = torch.autograd.grad(o_ref, (q, k, v), do.double().cpu())
    # float32 against float64: sums of at most 5 terms of unit-scale values, a few roundoffs of 6e-8
    torch.testing.assert_close(o.double().cpu(), o_ref, atol=1e-5, rtol=1e-5)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad.double().cpu(), grad_ref.double().cpu(), atol=1e-5, rtol=1e-5)
    assert (o[:, :, :2] == 0).all() and (o[1, :, 4] == 0).all()


def test_without_gradients_the_module_zeroes_through_the_kernel_alone(kernel_calls, monkeypatch):
    """With no gradient asked for, SDPA gets the mask unfilled, the kernel that reads it zeroes the empty rows
    without the autograd function around it, and the output is the same."""
    applied, masks = [], []
    apply = _ZeroRowsWithoutKey.apply
    monkeypatch.setattr(_ZeroRowsWithoutKey, "apply", lambda *args: applied.append(1) or apply(*args))
    sdpa = F.scaled_dot_product_attention

    def seen_sdpa(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", seen_sdpa)
    q, k, v = randn(2, 4, 10, 16, seed=13), randn(2, 4, 8, 16, seed=14), randn(2, 4, 8, 16, seed=15)
    mask = (torch.rand(2, 1, 10, 8, generator=torch.Generator().manual_seed(16)) > 0.3).to(DEVICE)
    mask[0, 0, 3] = False  # an empty row
    module = FlashAttention(causal=True)
    with torch.no_grad():
        fast = module(q.requires_grad_(), k, v, mask=mask)
    assert kernel_calls == [("reads the mask", (2, 4, 10, 16))] and applied == []
    assert torch.equal(masks[0], mask & FlashAttention(causal=True).get_mask(10, 8, DEVICE))  # not filled
    assert (fast[0, :, 3] == 0).all() and (fast[:, :, :2] == 0).all()
    tracked = module(q, k, v, mask=mask)  # q requires a gradient: the rows silenced in SDPA's saved log-sum-exp
    assert applied == [] and type(tracked.grad_fn).__name__.startswith("ScaledDotProduct")
    assert torch.equal(fast, tracked.detach())
    with copying_saved_tensors():
        hooked = module(q, k, v, mask=mask)  # the saved tensors are copies: through the autograd function
    assert applied == [1]
    assert torch.equal(fast, hooked.detach())


@pytest.mark.parametrize("needs_grad", ["q", "k", "v", "attn_bias", None])
def test_empty_rows_reach_sdpa_filled_exactly_when_a_gradient_is_wanted(monkeypatch, needs_grad):
    """SDPA's backward needs finite rows, so a row with no key is given every key when any input wants a gradient
    (the bias too); without one the mask goes as it is, and the row is zeroed after the call."""
    masks = []
    sdpa = F.scaled_dot_product_attention

    def seen_sdpa(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", seen_sdpa)
    inputs = dict(q=randn(2, 2, 6, 8, seed=20), k=randn(2, 2, 7, 8, seed=21), v=randn(2, 2, 7, 8, seed=22),
                  attn_bias=randn(2, 1, 6, 7, seed=23))
    if needs_grad is not None:
        inputs[needs_grad].requires_grad_()
    mask = (torch.rand(2, 1, 6, 7, generator=torch.Generator().manual_seed(24)) > 0.3).to(DEVICE)
    mask[1, 0, 2] = False  # an empty row
    o = FlashAttention()(inputs["q"], inputs["k"], inputs["v"], mask=mask, attn_bias=inputs["attn_bias"])
    (attn_mask,) = masks
    if needs_grad is None:
        assert torch.equal(attn_mask, torch.where(mask, inputs["attn_bias"], float("-inf")))  # unfilled
    else:
        assert torch.isfinite(attn_mask[1, 0, 2]).all()  # filled: every key, with its bias
        # PyTorch 2.11's memory-efficient backward rejects a float32 bias that wants a gradient on an H100
        # ("LSE is not correctly aligned (strideH)"), a direct SDPA call too: that backward runs on the CPU only
        if needs_grad != "attn_bias" or DEVICE == "cpu":
            o.sum().backward()
            assert torch.isfinite(inputs[needs_grad].grad).all()
    assert (o[1, :, 2] == 0).all()


def sdpa_node(o):
    """The autograd node of the SDPA kernel that computed ``o``, however many nodes lie between."""
    nodes = [o.grad_fn]
    while nodes:
        node = nodes.pop()
        if type(node).__name__.startswith("ScaledDotProduct"):
            return node
        nodes.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    raise AssertionError("no SDPA node in the graph of o")


def masked_problem(seed):
    """A causal problem with a mask that empties rows (0 and 1 by the causal rule, one by the mask).

    Heads are not grouped: on a GPU, float32 with grouped heads goes to the
    math kernel, which saves no log-sum-exp (the bfloat16 tests on CUDA
    group them, in test_attention_cuda.py).
    """
    q = randn(2, 4, 10, 16, seed=seed).requires_grad_()
    k, v = randn(2, 4, 8, 16, seed=seed + 1).requires_grad_(), randn(2, 4, 8, 16, seed=seed + 2).requires_grad_()
    mask = (torch.rand(2, 1, 10, 8, generator=torch.Generator().manual_seed(seed + 3)) > 0.3).to(DEVICE)
    mask[1, 0, 4] = False
    return q, k, v, mask


def check_against_float64(o, grads, q, k, v, mask, do):
    o_ref = reference_attention(q, k, v, causal=True, mask=mask)
    grads_ref = torch.autograd.grad(o_ref, (q, k, v), do.double().cpu())
    # float32 against float64: sums of at most 5 terms of unit-scale values, a few roundoffs of 6e-8
    torch.testing.assert_close(o.double().cpu(), o_ref, atol=1e-5, rtol=1e-5)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad.double().cpu(), grad_ref.double().cpu(), atol=1e-5, rtol=1e-5)
    assert (grads[0][:, :, :2] == 0).all() and (grads[0][1, :, 4] == 0).all()


def test_silenced_rows_take_no_copy_of_the_incoming_gradient(kernel_calls):
    """The backward receives the caller's gradient itself, unchanged, and the gradients are those of attention."""
    q, k, v, mask = masked_problem(seed=20)
    o = FlashAttention(causal=True)(q, k, v, mask=mask)
    do = randn(*o.shape, seed=24)
    before = do.clone()
    seen = []
    sdpa_node(o).register_prehook(lambda grad_outputs: seen.append(grad_outputs[0].data_ptr()))
    grads = torch.autograd.grad(o, (q, k, v), do)
    assert seen == [do.data_ptr()] and torch.equal(do, before)  # SDPA's backward read the caller's tensor, unwritten
    check_against_float64(o, grads, q, k, v, mask, do)


def test_rows_silenced_through_hooks_on_saved_tensors_are_still_right(kernel_calls):
    """Under hooks that copy saved tensors (checkpointing, offloading), the log-sum-exp cannot be reached: same gradients."""
    q, k, v, mask = masked_problem(seed=30)
    with copying_saved_tensors():
        o = FlashAttention(causal=True)(q, k, v, mask=mask)
        do = randn(*o.shape, seed=34)
        grads = torch.autograd.grad(o, (q, k, v), do)
    check_against_float64(o, grads, q, k, v, mask, do)


def test_the_module_on_the_cpu_silences_rows_without_the_kernel():
    """Without the zeroing kernel (masked_fill on o.data): the same output and gradients as attention."""
    q, k, v, mask = masked_problem(seed=40)
    q, k, v, mask = (t.detach().cpu().requires_grad_(t.requires_grad) for t in (q, k, v, mask))
    o = FlashAttention(causal=True)(q, k, v, mask=mask)
    do = randn(*o.shape, seed=44).cpu()
    grads = torch.autograd.grad(o, (q, k, v), do)
    check_against_float64(o, grads, q, k, v, mask, do)



def test_the_saved_log_sum_exp_is_reached_only_where_a_fused_kernel_saved_it():
    """On the CPU's flash kernel: a (b, h, i) view of the tensor the backward reads, equal to log-sum-exp of the scores.

    None for the math kernel's output and for an output that another
    operation has produced from SDPA's (padded rows).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashattn.attention import saved_row_lse

    g = torch.Generator().manual_seed(50)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g, dtype=torch.float64, requires_grad=True) for n in (7, 9, 9))
    o = F.scaled_dot_product_attention(q, k, v)
    lse = saved_row_lse(o)
    want = torch.logsumexp(q.detach() @ k.detach().transpose(-1, -2) * 16**-0.5, dim=-1)  # (2, 3, 7)
    assert lse.shape == (2, 3, 7)
    torch.testing.assert_close(lse, want, atol=1e-12, rtol=0)
    lse[0, 0, 0] = 5.0  # a view: what the backward will read
    assert o.grad_fn._saved_logsumexp[0, 0, 0] == 5.0
    with sdpa_kernel(SDPBackend.MATH):
        assert saved_row_lse(F.scaled_dot_product_attention(q, k, v)) is None
    assert saved_row_lse(F.pad(o, (0, 0, 2, 0))) is None
    assert saved_row_lse(o.detach()) is None
