"""Every bad input of API.md gives an error that names the argument and the shapes."""

from __future__ import annotations

import re

import pytest
import torch

from flashattn import FlashAttention

B, H, I, J, D = 2, 4, 5, 7, 8


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=dtype)


GOOD = dict(q=t(B, H, I, D), k=t(B, H, J, D), v=t(B, H, J, D))

CASES = [
    # (what changes, error type, pattern the message must match)
    (dict(q=t(B, I, D)), ValueError, r"q must be 4-D \(b, h, i, d\), got shape \(2, 5, 8\)"),
    (dict(k=t(B, H, J, D, 1)), ValueError, r"k must be 4-D .* or 3-D .*, got shape \(2, 4, 7, 8, 1\)"),
    (dict(v=t(J, D)), ValueError, r"v must be 4-D .* or 3-D .*, got shape \(7, 8\)"),
    (dict(k=t(B, J, D)), ValueError, r"k and v must have the same number of dimensions, got k \(2, 7, 8\) and v \(2, 4, 7, 8\)"),
    (dict(k=t(3, H, J, D), v=t(3, H, J, D)), ValueError, r"same batch size, got q \(2, 4, 5, 8\), k \(3, 4, 7, 8\)"),
    (dict(v=t(3, H, J, D)), ValueError, r"same batch size, got q \(2, 4, 5, 8\), k \(2, 4, 7, 8\), v \(3, 4, 7, 8\)"),
    (dict(k=t(B, H, J, 6)), ValueError, r"same head dimension d, got q \(2, 4, 5, 8\), k \(2, 4, 7, 6\)"),
    (dict(v=t(B, H, 6, D)), ValueError, r"k and v must have the same length j, got .*k \(2, 4, 7, 8\), v \(2, 4, 6, 8\)"),
    (dict(k=t(B, 3, J, D), v=t(B, 3, J, D)), ValueError, r"heads of q \(4\) must be a multiple of the heads of k and v \(3\)"),
    (dict(v=t(B, 2, J, D)), ValueError, r"k and v must have the same number of heads, got .*k \(2, 4, 7, 8\), v \(2, 2, 7, 8\)"),
    (dict(q=t(B, H, I, D, dtype=torch.float64)), TypeError, r"q, k and v must share one dtype, got torch.float64, torch.float32"),
    (dict(q=t(B, H, I, D).to(torch.int64)), TypeError, r"q must be a floating-point tensor, got dtype torch.int64"),
    (dict(q=t(B, 0, I, D), k=t(B, 0, J, D), v=t(B, 0, J, D)), ValueError, r"at least one head, got q \(2, 0, 5, 8\)"),
    (dict(q=t(B, 0, I, D)), ValueError, r"at least one head, got q \(2, 0, 5, 8\), k \(2, 4, 7, 8\)"),
    (dict(k=t(B, 0, J, D), v=t(B, 0, J, D)), ValueError, r"at least one head, got q \(2, 4, 5, 8\), k \(2, 0, 7, 8\)"),
    (dict(q=[[1.0]]), TypeError, r"q must be a torch.Tensor, got list"),
    (dict(v=t(B, H, J, D).to("meta")), ValueError, r"q, k and v must be on one device, got cpu, cpu and meta"),
    (dict(q=t(B, H, I, 0), k=t(B, H, J, 0)), ValueError, r"d and d_v must be positive, got q \(2, 4, 5, 0\)"),
    (dict(v=t(B, H, J, 0)), ValueError, r"d and d_v must be positive, got q \(2, 4, 5, 8\), k \(2, 4, 7, 8\), v \(2, 4, 7, 0\)"),
    (dict(mask=torch.ones(I, J)), TypeError, r"mask must be a bool tensor \(True = may attend\), got torch.float32"),
    (dict(mask=torch.ones(I, J + 1, dtype=torch.bool)), ValueError, r"mask of shape \(5, 8\) does not broadcast to \(b, h, i, j\) = \(2, 4, 5, 7\)"),
    (dict(mask=torch.ones(3, 1, I, J, dtype=torch.bool)), ValueError, r"mask of shape \(3, 1, 5, 7\) does not broadcast"),
    (dict(mask=torch.ones(1, B, H, I, J, dtype=torch.bool)), ValueError, r"mask of shape \(1, 2, 4, 5, 7\) does not broadcast"),
    (dict(attn_bias=torch.ones(H, I, J, dtype=torch.bool)), TypeError, r"attn_bias must be a floating-point tensor, got torch.bool"),
    (dict(attn_bias=t(H + 1, I, J)), ValueError, r"attn_bias of shape \(5, 5, 7\) does not broadcast to \(b, h, i, j\) = \(2, 4, 5, 7\)"),
]


@pytest.mark.parametrize("flash", [True, False])
@pytest.mark.parametrize("change, error, pattern", CASES, ids=[c[2][:40] for c in CASES])
def test_bad_input_message(flash, change, error, pattern):
    args = {**GOOD, **change}
    m = FlashAttention(flash=flash)
    with pytest.raises(error, match=pattern) as info:
        m(args["q"], args["k"], args["v"], mask=args.get("mask"), attn_bias=args.get("attn_bias"))
    assert "einops" not in str(info.value) and "No available kernel" not in str(info.value)


def test_bad_scale():
    with pytest.raises(ValueError, match=re.escape("scale must be a finite number or None, got nan")):
        FlashAttention(scale=float("nan"))


def test_good_inputs_pass():
    """The baseline of the cases above is valid, so each case fails for its one change."""
    for flash in (True, False):
        o = FlashAttention(flash=flash)(GOOD["q"], GOOD["k"], GOOD["v"])
        assert o.shape == (B, H, I, D)


@pytest.mark.parametrize("name", ["causal", "flash"])
@pytest.mark.parametrize("bad", [0.1, "no", 1, None])
def test_flags_must_be_bool(name, bad):
    """``FlashAttention(0.1)`` once meant ``causal=True``: a flag that is not a bool is an error."""
    with pytest.raises(TypeError, match=f"{name} must be True or False, got {re.escape(repr(bad))}"):
        FlashAttention(**{name: bad})
