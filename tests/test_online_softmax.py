"""The online softmax against the softmax and log-sum-exp of their definitions, in float64.

Rows are drawn at random, with masked (-inf) entries placed so that some
blocks, and some whole rows, see nothing but -inf.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flashattn import merge_partials, online_softmax_update, safe_softmax, streaming_softmax
from reference import reference_attention

NEG_INF = float("-inf")


def definition_softmax(s: torch.Tensor) -> torch.Tensor:
    """exp(s) / sum exp(s) over the last dimension, zeros for a row of only -inf (float64, no max shift)."""
    e = torch.exp(s)
    total = e.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, e / total, 0.0)


@st.composite
def score_rows(draw):
    """(rows, n) float64 scores of moderate size, some entries -inf, row 0 entirely -inf when asked."""
    rows = draw(st.integers(1, 4))
    n = draw(st.integers(1, 40))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    s = 3 * torch.randn(rows, n, generator=gen, dtype=torch.float64)
    masked = torch.rand(rows, n, generator=gen) < draw(st.sampled_from([0.0, 0.3, 0.8]))
    s = s.masked_fill(masked, NEG_INF)
    if draw(st.booleans()):
        s[0] = NEG_INF
    return s


def test_safe_softmax_does_not_overflow():
    s = torch.tensor([[1000.0, 999.0, 998.0], [-1000.0, -1001.0, NEG_INF]], dtype=torch.float64)
    naive = torch.exp(s) / torch.exp(s).sum(dim=-1, keepdim=True)
    assert naive.isnan().all()  # inf / inf in the first row, 0 / 0 in the second
    expected = torch.tensor([[1.0, torch.e**-1, torch.e**-2], [1.0, torch.e**-1, 0.0]], dtype=torch.float64)
    expected = expected / expected.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(safe_softmax(s), expected, atol=1e-15, rtol=1e-14)


@given(score_rows())
def test_safe_softmax_matches_definition(s):
    p = safe_softmax(s)
    torch.testing.assert_close(p, definition_softmax(s), atol=1e-14, rtol=1e-12)
    has_key = ~torch.isneginf(s).all(dim=-1)
    torch.testing.assert_close(p.sum(dim=-1), has_key.double(), atol=1e-14, rtol=0)


@given(score_rows(), st.integers(1, 50))
def test_update_carries_max_and_sum(s, block):
    """Folding the blocks one by one leaves m = row max and l = sum exp(s - m)."""
    m = torch.full(s.shape[:-1], NEG_INF, dtype=s.dtype)
    l = torch.zeros(s.shape[:-1], dtype=s.dtype)
    for start in range(0, s.shape[-1], block):
        m, l, p, alpha = online_softmax_update(m, l, s[:, start : start + block])
        assert not (p.isnan().any() or alpha.isnan().any())
    row_max = s.amax(dim=-1)
    torch.testing.assert_close(m, row_max, atol=0, rtol=0)
    shift = torch.where(torch.isneginf(row_max), 0.0, row_max)
    torch.testing.assert_close(l, torch.exp(s - shift[:, None]).sum(dim=-1), atol=1e-14, rtol=1e-12)


@given(score_rows(), st.integers(1, 50), st.integers(1, 5))
def test_update_rescales_an_accumulator(s, block, d_v):
    """acc <- alpha * acc + p @ v over the blocks, divided by l at the end, is softmax(s) @ v."""
    v = torch.randn(s.shape[-1], d_v, dtype=s.dtype, generator=torch.Generator().manual_seed(1))
    m = torch.full(s.shape[:-1], NEG_INF, dtype=s.dtype)
    l = torch.zeros(s.shape[:-1], dtype=s.dtype)
    acc = torch.zeros(s.shape[0], d_v, dtype=s.dtype)
    for start in range(0, s.shape[-1], block):
        m, l, p, alpha = online_softmax_update(m, l, s[:, start : start + block])
        acc = alpha[:, None] * acc + p @ v[start : start + block]
    o = acc / torch.where(l > 0, l, 1.0)[:, None]
    torch.testing.assert_close(o, definition_softmax(s) @ v, atol=1e-13, rtol=1e-12)


@given(score_rows(), st.integers(1, 50))
def test_streaming_softmax_matches_definition(s, block):
    p, lse = streaming_softmax(s, block)
    torch.testing.assert_close(p, definition_softmax(s), atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(lse, torch.log(torch.exp(s).sum(dim=-1)), atol=1e-13, rtol=1e-13)


def test_rows_of_no_entries():
    """n = 0: the softmax of an empty row is empty, and its log-sum-exp that of an empty sum, -inf."""
    s = torch.empty(3, 2, 0, dtype=torch.float64)
    p = safe_softmax(s)
    assert p.shape == (3, 2, 0) and p.dtype == torch.float64
    p, lse = streaming_softmax(s, 4)
    assert p.shape == (3, 2, 0) and lse.shape == (3, 2) and torch.isneginf(lse).all()


def test_streaming_softmax_first_blocks_masked():
    """A row whose first blocks are all -inf picks up its maximum late, with no NaN on the way."""
    s = torch.tensor([[NEG_INF, NEG_INF, NEG_INF, 2.0, 700.0, 1.0]], dtype=torch.float64)
    p, lse = streaming_softmax(s, 2)
    torch.testing.assert_close(p, definition_softmax(s - 700.0), atol=1e-15, rtol=1e-14)
    assert abs(lse.item() - 700.0) < 1e-12


def test_streaming_softmax_rejects_bad_block():
    with pytest.raises(ValueError, match="block_size"):
        streaming_softmax(torch.zeros(2, 3), 0)


def partial_attention(q, k, v, keys):
    """Attention of q over the keys selected by the bool vector ``keys``, and the lse of those scores."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~keys, NEG_INF)
    lse = torch.logsumexp(s, dim=-1)
    if not keys.any():
        return torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype), lse
    return reference_attention(q, k[:, :, keys], v[:, :, keys]), lse


@given(st.integers(1, 30), st.integers(1, 40), st.integers(0, 2**31 - 1), st.integers(2, 5))
def test_merge_of_disjoint_key_sets_is_attention_over_all(i, j, seed, n_parts):
    """Split the keys into random disjoint sets (some may be empty), attend each, merge: the whole."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, i, 6, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, j, 6, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 2, j, 5, generator=gen, dtype=torch.float64)
    part_of_key = torch.randint(0, n_parts, (j,), generator=gen)
    o = torch.zeros(1, 2, i, 5, dtype=torch.float64)
    lse = torch.full((1, 2, i), NEG_INF, dtype=torch.float64)
    for part in range(n_parts):
        o_part, lse_part = partial_attention(q, k, v, part_of_key == part)
        o, lse = merge_partials(o, lse, o_part, lse_part)
    whole_lse = torch.logsumexp((q @ k.transpose(-1, -2)) * 6**-0.5, dim=-1)
    torch.testing.assert_close(o, reference_attention(q, k, v), atol=1e-13, rtol=1e-12)
    torch.testing.assert_close(lse, whole_lse, atol=1e-13, rtol=1e-13)


def test_merge_with_empty_parts():
    o_a = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    lse_a = torch.tensor([0.5], dtype=torch.float64)
    empty_o = torch.zeros_like(o_a)
    empty_lse = torch.tensor([NEG_INF], dtype=torch.float64)
    for o, lse in (merge_partials(o_a, lse_a, empty_o, empty_lse), merge_partials(empty_o, empty_lse, o_a, lse_a)):
        torch.testing.assert_close(o, o_a, atol=0, rtol=0)
        torch.testing.assert_close(lse, lse_a, atol=0, rtol=0)
    o, lse = merge_partials(empty_o, empty_lse, empty_o, empty_lse)
    assert (o == 0).all() and torch.isneginf(lse).all()


def test_merge_weights_by_lse():
    """Two parts whose softmax denominators are e^0 = 1 and e^(log 3) = 3 weigh 1/4 and 3/4."""
    o_a = torch.tensor([[4.0]], dtype=torch.float64)
    o_b = torch.tensor([[8.0]], dtype=torch.float64)
    lse_a = torch.tensor([0.0], dtype=torch.float64)
    lse_b = torch.log(torch.tensor([3.0], dtype=torch.float64))
    o, lse = merge_partials(o_a, lse_a, o_b, lse_b)
    torch.testing.assert_close(o, torch.tensor([[0.25 * 4 + 0.75 * 8]], dtype=torch.float64), atol=1e-15, rtol=0)
    torch.testing.assert_close(lse, torch.log(torch.tensor([4.0], dtype=torch.float64)), atol=1e-15, rtol=0)
