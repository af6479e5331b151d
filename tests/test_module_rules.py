"""The rules of API.md that are not value checks over random shapes."""

from __future__ import annotations

import warnings

import pytest
import torch

from flashattn import FlashAttention, alibi_bias, causal_mask, padding_mask
from reference import reference_attention

PATHS = [True, False]  # flash, einsum


@pytest.fixture
def fresh_compiler():
    """A test that compiles starts and leaves with dynamo's caches empty: compiles of other tests count
    against a function's recompile limit, and this test's must not count against the next one's."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("flash", PATHS)
@pytest.mark.parametrize("i, j", [(5, 5), (3, 9), (9, 3)])
def test_seed_usage_example_2_means_causal(flash, i, j):
    """m(q, k, v, mask=m.get_mask(i, j, dev)) equals FlashAttention(causal=True)(q, k, v)."""
    q, k, v = randn(2, 3, i, 8, seed=1), randn(2, 3, j, 8, seed=2), randn(2, 3, j, 8, seed=3)
    m = FlashAttention(flash=flash)
    with_mask = m(q, k, v, mask=m.get_mask(i, j, q.device))
    causal = FlashAttention(causal=True, flash=flash)(q, k, v)
    torch.testing.assert_close(with_mask, causal, atol=1e-12, rtol=0)
    torch.testing.assert_close(causal, reference_attention(q, k, v, causal=True), atol=1e-12, rtol=1e-12)


def test_causal_mask_is_bottom_right():
    r = torch.arange(4)[:, None]
    c = torch.arange(7)[None, :]
    assert torch.equal(causal_mask(4, 7), c <= r + 3)
    assert torch.equal(causal_mask(7, 4), c[:, :4] <= torch.arange(7)[:, None] - 3)
    assert torch.equal(causal_mask(5, 5), torch.ones(5, 5, dtype=torch.bool).tril())
    assert torch.equal(FlashAttention().get_mask(4, 7, "cpu"), causal_mask(4, 7))


@pytest.mark.parametrize("flash", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_with_no_key_give_zeros_and_zero_gradients(flash, dtype):
    q = randn(2, 2, 6, 8, seed=4, dtype=dtype).requires_grad_()
    k = randn(2, 2, 5, 8, seed=5, dtype=dtype).requires_grad_()
    v = randn(2, 2, 5, 8, seed=6, dtype=dtype).requires_grad_()
    mask = torch.ones(2, 1, 6, 5, dtype=torch.bool)
    mask[0, 0, 4] = False  # one empty row by the mask; causal empties rows 0 (i - j = 1)
    o = FlashAttention(causal=True, flash=flash)(q, k, v, mask=mask)
    o.backward(randn(*o.shape, seed=7, dtype=dtype))
    assert torch.isfinite(o).all() and torch.isfinite(q.grad).all()
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    assert (o[:, :, 0] == 0).all() and (o[0, :, 4] == 0).all()
    assert (q.grad[:, :, 0] == 0).all() and (q.grad[0, :, 4] == 0).all()
    assert (o[1, :, 1:].abs().sum(-1) > 0).all()  # the other rows are not zeroed


@pytest.mark.parametrize("flash", PATHS)
def test_key_padding_of_whole_batch_element(flash):
    q, k, v = randn(2, 2, 4, 8, seed=8), randn(2, 2, 6, 8, seed=9), randn(2, 2, 6, 8, seed=10)
    mask = padding_mask(torch.tensor([0, 3]), 6)
    assert mask.shape == (2, 1, 1, 6)
    o = FlashAttention(flash=flash)(q, k, v, mask=mask)
    assert (o[0] == 0).all()
    torch.testing.assert_close(o, reference_attention(q, k, v, mask=mask), atol=1e-12, rtol=1e-12)


def test_padding_mask_values_and_errors():
    mask = padding_mask(torch.tensor([2, 0, 4]), 4)
    expected = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[:, 0, 0], expected)
    with pytest.raises(ValueError, match=r"lengths must be a 1-D integer tensor .*\(2, 1\)"):
        padding_mask(torch.tensor([[2], [3]]), 4)
    with pytest.raises(ValueError, match=r"lengths must be a 1-D integer tensor \(b,\) or a list of ints, got \[2, 'a'\]"):
        padding_mask([2, "a"], 4)  # not even a tensor
    # a length past j or below 0 is an error, as decode_attention's cache_lens
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, j\] = \[0, 4\], got values from -1 to 5"):
        padding_mask([5, -1], 4)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, j\] = \[0, 4\], got values from 0 to 5"):
        padding_mask(torch.tensor([5, 0]), 4)
    assert padding_mask(torch.zeros(0, dtype=torch.int64), 4).shape == (0, 1, 1, 4)


def test_alibi_bias_values():
    bias = alibi_bias(8, 3, 5)
    assert bias.shape == (8, 3, 5)
    slopes = torch.tensor([2.0 ** -(k + 1) for k in range(8)])  # 2^(-8k/8)
    # query 2 sits at position 4 (bottom-right): distance to key 1 is 3
    torch.testing.assert_close(bias[:, 2, 1], -3 * slopes)
    torch.testing.assert_close(bias[:, 0, 2], torch.zeros(8))  # on the diagonal
    # six heads: the four slopes of h = 4, then the odd ones of h = 8 (Press et al.)
    six = alibi_bias(6, 1, 2)[:, 0, 0]
    torch.testing.assert_close(six, -torch.tensor([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]))


@pytest.mark.parametrize("flash", PATHS)
def test_alibi_with_causal_matches_reference(flash):
    q, k, v = randn(1, 4, 7, 8, seed=11), randn(1, 4, 9, 8, seed=12), randn(1, 4, 9, 8, seed=13)
    bias = alibi_bias(4, 7, 9).double()
    o = FlashAttention(causal=True, flash=flash)(q, k, v, attn_bias=bias)
    torch.testing.assert_close(o, reference_attention(q, k, v, causal=True, attn_bias=bias), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("flash", PATHS)
def test_scale_default_and_custom(flash):
    q, k, v = randn(1, 2, 5, 16, seed=14), randn(1, 2, 6, 16, seed=15), randn(1, 2, 6, 16, seed=16)
    torch.testing.assert_close(FlashAttention(flash=flash)(q, k, v), reference_attention(q, k, v, scale=0.25))
    torch.testing.assert_close(FlashAttention(flash=flash, scale=0.7)(q, k, v), reference_attention(q, k, v, scale=0.7))


@pytest.mark.parametrize("flash", PATHS)
def test_dropout_acts_in_training_only_drops_its_share_and_scales_the_rest(flash):
    """Inverted dropout: each weight is dropped with probability 0.3, and a kept one is scaled by 1 / 0.7.

    With v the identity (d_v = j) the output row is the row of weights
    itself, so every sample shows which weights were dropped (exactly 0: the
    weights of finite scores are positive) and what the others became.
    """
    i, j, rate, samples = 4, 6, 0.3, 1000
    q, k = randn(1, 1, i, 8, seed=17), randn(1, 1, j, 8, seed=18)
    v = torch.eye(j, dtype=torch.float64)[None, None]  # (1, 1, j, j)
    weights = reference_attention(q, k, v)  # (1, 1, i, j): the softmax itself
    m = FlashAttention(dropout=rate, flash=flash)
    m.eval()
    torch.testing.assert_close(m(q, k, v), weights, atol=1e-12, rtol=1e-12)
    m.train()
    with torch.random.fork_rng():  # dropout draws from the global generator; later tests get it back as it was
        torch.manual_seed(0)
        out = torch.stack([m(q, k, v) for _ in range(samples)])  # (samples, 1, 1, i, j)
    dropped = out == 0
    # samples * i * j = 24000 Bernoulli(0.3) draws: standard deviation sqrt(0.21 / 24000) = 0.003 of the
    # share dropped; 4 of them is 0.012, far below the 0.1 of a module that drops a third too few
    share = dropped.double().mean().item()
    assert abs(share - rate) < 4 * (rate * (1 - rate) / dropped.numel()) ** 0.5, share
    kept = (weights / (1 - rate)).expand_as(out)
    torch.testing.assert_close(out[~dropped], kept[~dropped], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_dropout_outside_unit_interval_is_a_value_error(bad):
    with pytest.raises(ValueError, match=rf"dropout must lie in \[0, 1\), got {bad}"):
        FlashAttention(dropout=bad)


def test_module_has_no_parameters_prints_nothing_and_warns_nothing(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for flash in PATHS:
            m = FlashAttention(causal=True, dropout=0.1, flash=flash)
            assert list(m.parameters()) == [] and list(m.buffers()) == []
            for i, j in [(4, 4), (3, 6), (6, 3)]:
                m(randn(1, 2, i, 8), randn(1, 2, j, 8), randn(1, 2, j, 8), mask=torch.ones(i, j, dtype=torch.bool))
                m(randn(1, 2, i, 8), randn(1, 2, j, 8), randn(1, 2, j, 8))
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


@pytest.mark.parametrize("flash", PATHS)
def test_output_has_dtype_of_q_and_value_width(flash):
    q, k = randn(2, 4, 3, 8, dtype=torch.float32), randn(2, 2, 5, 8, dtype=torch.float32)
    v = randn(2, 2, 5, 12, dtype=torch.float32)
    o = FlashAttention(flash=flash)(q, k, v)
    assert o.shape == (2, 4, 3, 12) and o.dtype == torch.float32


@pytest.mark.parametrize("causal", [False, True])
def test_works_inside_torch_compile(causal, fresh_compiler):
    q, k, v = randn(1, 2, 5, 8, seed=20), randn(1, 1, 7, 8, seed=21), randn(1, 1, 7, 8, seed=22)
    mask = torch.rand(1, 1, 5, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[0, 0, 2] = False
    for flash in PATHS:
        m = FlashAttention(causal=causal, flash=flash)
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        for kwargs in ({}, {"mask": mask}):
            expected = reference_attention(q, k, v, causal=causal, **kwargs)
            torch.testing.assert_close(compiled(q, k, v, **kwargs), expected, atol=1e-12, rtol=1e-12)


def test_the_callers_backend_choice_is_kept():
    """Inside a caller's ``sdpa_kernel`` the flash path uses what the caller allows, as a direct call would."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = randn(1, 2, 5, 8, seed=23), randn(1, 2, 7, 8, seed=24), randn(1, 2, 7, 8, seed=25)
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):  # no such kernel on the CPU
        with pytest.raises(RuntimeError, match="No (available kernel|viable backend)"):
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
        with pytest.raises(RuntimeError, match="No (available kernel|viable backend)"):
            FlashAttention()(q, k, v)
    with sdpa_kernel(SDPBackend.MATH):
        o = FlashAttention(causal=True)(q, k, v)
    torch.testing.assert_close(o, reference_attention(q, k, v, causal=True), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("flash", PATHS)
@pytest.mark.parametrize("b, i, j", [(0, 4, 6), (2, 0, 6), (2, 4, 0)])
def test_empty_sizes(flash, b, i, j):
    """No batch element or no query: an empty result. No key: every row has no key, so zeros."""
    q = randn(b, 4, i, 8, seed=40).requires_grad_()
    k, v = randn(b, 2, j, 8, seed=41).requires_grad_(), randn(b, 2, j, 5, seed=42).requires_grad_()
    for mask in (None, torch.ones(b, 1, i, j, dtype=torch.bool)):
        o = FlashAttention(causal=True, flash=flash)(q, k, v, mask=mask)
        assert o.shape == (b, 4, i, 5) and (o == 0).all()
        dq, dk, dv = torch.autograd.grad(o.sum(), (q, k, v))
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("flash", PATHS)
def test_a_wide_bias_is_not_rounded_away(flash):
    """A float32 bias of 300 + 2 N(0, 1) with bfloat16 q: the flash path shifts each row before rounding.

    bfloat16 keeps 8 bits: near 300 its spacing is 2, which would move weights by
    factors up to e; shifted to the row's maximum, the kept biases lie near 0.
    The output is rounded to bfloat16 (spacing 2^-7 near 1): a few of those.
    """
    q, k, v = (randn(2, 4, 6, 16, seed=s, dtype=torch.bfloat16) for s in (50, 51, 52))
    bias = 300 + 2 * randn(4, 6, 6, seed=53, dtype=torch.float32)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1, ..., 4:] = False
    for kwargs in ({}, {"mask": mask}):
        o = FlashAttention(flash=flash)(q, k, v, attn_bias=bias, **kwargs)
        err = (o.double() - reference_attention(q, k, v, attn_bias=bias, **kwargs)).abs().max().item()
        assert err < 4 * 2**-7, err


@pytest.mark.parametrize("flash", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_float64_bias_with_narrower_q(flash, dtype):
    q, k, v = (randn(1, 2, 5, 8, seed=s, dtype=dtype) for s in (54, 55, 56))
    bias = randn(2, 5, 5, seed=57)  # float64
    o = FlashAttention(flash=flash)(q, k, v, attn_bias=bias)
    assert o.dtype == dtype
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 4 * 2**-7}[dtype]
    assert (o.double() - reference_attention(q, k, v, attn_bias=bias)).abs().max().item() < tolerance


@pytest.mark.parametrize("flash", PATHS)
def test_a_bias_of_minus_infinity_hides_keys(flash):
    """-inf in the bias hides a key like False in the mask; a row left with no key gives zeros and zero gradients."""
    q = randn(1, 2, 4, 8, seed=58).requires_grad_()
    k, v = randn(1, 2, 6, 8, seed=59).requires_grad_(), randn(1, 2, 6, 8, seed=60).requires_grad_()
    bias = torch.zeros(4, 6, dtype=torch.float64)
    bias[1] = float("-inf")  # row 1 has no key
    bias[2, 3:] = float("-inf")  # row 2 has keys 0..2
    o = FlashAttention(flash=flash)(q, k, v, attn_bias=bias)
    o.backward(randn(*o.shape, seed=61))
    keep = torch.isfinite(bias)
    want = reference_attention(q, k, v, mask=keep)
    torch.testing.assert_close(o, want, atol=1e-12, rtol=1e-12)
    assert (o[:, :, 1] == 0).all() and (q.grad[:, :, 1] == 0).all()
    assert all(torch.isfinite(t).all() for t in (q.grad, k.grad, v.grad))


@pytest.mark.parametrize("flash", PATHS)
def test_nan_in_q_reaches_its_row_only_on_the_einsum_path_by_definition(flash):
    """Inputs must be finite (the docstring says so); the einsum path keeps NaN in the row it came from.

    The flash path's kernels are PyTorch's and are not checked (a check would
    make the host wait for the GPU); the test pins down what the documentation
    promises: the other rows are unaffected on both paths.
    """
    q, k, v = randn(1, 1, 4, 8, seed=62), randn(1, 1, 5, 8, seed=63), randn(1, 1, 5, 8, seed=64)
    q[0, 0, 1, 0] = float("nan")
    o = FlashAttention(flash=flash)(q, k, v)
    clean = [0, 2, 3]
    torch.testing.assert_close(o[:, :, clean], reference_attention(q, k, v)[:, :, clean], atol=1e-12, rtol=1e-12)
    if not flash:
        assert torch.isnan(o[0, 0, 1]).all()


# torch 2.11 warns from inside its own compiler here; that is not the module's warning
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiles_with_dynamic_shapes(fresh_compiler):
    """torch.compile(dynamic=True) once failed on every flash-path call: enable_gqa received a SymBool."""
    m = torch.compile(FlashAttention(causal=True), fullgraph=True, dynamic=True, backend="aot_eager")
    for i, j, h_kv in ((5, 7, 1), (6, 9, 2), (9, 9, 2)):
        q, k, v = randn(1, 2, i, 8, seed=i), randn(1, h_kv, j, 8, seed=j), randn(1, h_kv, j, 8, seed=j + 1)
        torch.testing.assert_close(m(q, k, v), reference_attention(q, k, v, causal=True), atol=1e-12, rtol=1e-12)


def test_forward_documents_dropout_in_training_mode():
    doc = FlashAttention.forward.__doc__
    assert "training mode" in doc and ".eval()" in doc


def test_mask_helpers_reject_bad_arguments():
    assert torch.equal(padding_mask([3, 0], 4), padding_mask(torch.tensor([3, 0]), 4))
    with pytest.raises(ValueError, match="the number of heads h must be a positive integer, got 0"):
        alibi_bias(0, 5, 9)
    with pytest.raises(ValueError, match="the number of heads h must be a positive integer, got None"):
        alibi_bias(None, 5, 9)  # None is not a count here, as it is where an argument may be None
    with pytest.raises(ValueError, match="lengths must be a 1-D integer tensor"):
        padding_mask([1.5, 2.0], 4)


@pytest.mark.parametrize("flash", PATHS)
def test_non_contiguous_inputs_mask_and_bias(flash):
    """q, k, v cut from (b, i, h, d) layouts, as a model's projections give them; a transposed mask and bias."""
    b, h, h_kv, i, j, d = 2, 4, 2, 6, 9, 8
    q = randn(b, i, h, d, seed=70).transpose(1, 2).requires_grad_()
    k = randn(b, j, h_kv, d, seed=71).transpose(1, 2).requires_grad_()
    v = randn(b, j, h_kv, d + 4, seed=72)[..., ::2].transpose(1, 2).requires_grad_()  # every other column
    mask = torch.rand(b, 1, j, i, generator=torch.Generator().manual_seed(73)).transpose(-1, -2) > 0.3
    mask[0, 0, 3] = False  # an empty row
    bias = randn(h, j, i, seed=74).transpose(-1, -2)
    assert not any(t.is_contiguous() for t in (q, k, v, mask, bias))
    o = FlashAttention(causal=True, flash=flash)(q, k, v, mask=mask, attn_bias=bias)
    do = randn(*o.shape, seed=75)
    grads = torch.autograd.grad(o, (q, k, v), do)
    o_ref = reference_attention(q, k, v, causal=True, mask=mask, attn_bias=bias)
    grads_ref = torch.autograd.grad(o_ref, (q, k, v), do)
    torch.testing.assert_close(o, o_ref, atol=1e-12, rtol=1e-12)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("flash", PATHS)
@pytest.mark.parametrize("scale", [0.0, -0.4])
def test_zero_and_negative_scale(flash, scale):
    """scale 0 weighs every kept key alike; a negative scale favours the keys least like the query."""
    for i, j in [(5, 7), (6, 6), (7, 5)]:  # the causal rule as a bias object, as SDPA's flag, rows without key
        q = randn(2, 2, i, 8, seed=76).requires_grad_()
        k, v = randn(2, 2, j, 8, seed=77).requires_grad_(), randn(2, 2, j, 8, seed=78).requires_grad_()
        mask = torch.rand(2, 1, i, j, generator=torch.Generator().manual_seed(79)) > 0.3
        check_scale_case(flash, scale, q, k, v, mask)


def check_scale_case(flash, scale, q, k, v, mask):
    for kwargs in ({}, {"mask": mask}):
        o = FlashAttention(causal=True, flash=flash, scale=scale)(q, k, v, **kwargs)
        o_ref = reference_attention(q, k, v, causal=True, scale=scale, **kwargs)
        torch.testing.assert_close(o, o_ref, atol=1e-12, rtol=1e-12)
        do = randn(*o.shape, seed=80)
        for grad, grad_ref in zip(torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(o_ref, (q, k, v), do)):
            torch.testing.assert_close(grad, grad_ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("flash", PATHS)
def test_a_mask_or_bias_on_another_device_is_named(flash):
    q, k, v = randn(1, 2, 4, 8, seed=81), randn(1, 2, 6, 8, seed=82), randn(1, 2, 6, 8, seed=83)
    m = FlashAttention(flash=flash)
    with pytest.raises(ValueError, match="mask is on meta but q is on cpu"):
        m(q, k, v, mask=torch.ones(4, 6, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="attn_bias is on meta but q is on cpu"):
        m(q, k, v, attn_bias=torch.zeros(2, 4, 6, device="meta"))


def test_rows_with_no_key_reach_sdpa_with_every_key_and_are_flagged_for_zeroing():
    """What SDPA is handed for a mask with empty rows: no row of its mask is empty (the fused kernels disagree on
    such rows: cuDNN's returns non-zero rows and, in some versions, NaN gradients), and the rows to zero afterwards."""
    from flashattn.attention import sdpa_masking

    keep = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(21)) > 0.4
    keep[0, 0, 1] = False  # empty rows
    keep[1, 0, 3] = False
    call = sdpa_masking(keep, None, False, 5, 7, torch.float32, torch.device("cpu"))
    has_key = keep.any(dim=-1, keepdim=True)
    assert torch.equal(call.row_has_key, has_key)
    assert call.attn_mask.any(dim=-1).all()  # every row of SDPA's mask keeps a key
    assert torch.equal(call.attn_mask, keep | ~has_key)  # kept rows unchanged, empty rows given every key
