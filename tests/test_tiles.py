"""The tile classification against the dense masks it summarises."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flashattn import causal_mask
from flashattn.tiles import TileKind, causal_tile_kinds, classify_tiles, tile_slices


def kinds_by_counting(keep: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """Each tile's kind from its entries, one tile at a time: the definition, written plainly."""
    rows = [keep[r0 : r0 + block_q] for r0 in range(0, keep.shape[0], block_q)]
    return torch.tensor([
        [TileKind.FULL if t.all() else TileKind.PARTIAL if t.any() else TileKind.EMPTY
         for t in (row[:, c0 : c0 + block_k] for c0 in range(0, keep.shape[1], block_k))]
        for row in rows
    ])


@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 17), st.integers(1, 17))
def test_causal_tiles_at_every_offset(i, j, block_q, block_k):
    """i < j, i == j and i > j, lengths that are not block multiples."""
    want = kinds_by_counting(causal_mask(i, j), block_q, block_k)
    assert torch.equal(causal_tile_kinds(i, j, block_q, block_k), want)
    assert torch.equal(classify_tiles(causal_mask(i, j), block_q, block_k), want)


@given(st.integers(1, 30), st.integers(1, 30), st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**31))
def test_any_mask(i, j, block_q, block_k, seed):
    g = torch.Generator().manual_seed(seed)
    density = torch.rand((), generator=g)
    keep = torch.rand(i, j, generator=g) < density  # from nearly empty to nearly full
    assert torch.equal(classify_tiles(keep, block_q, block_k), kinds_by_counting(keep, block_q, block_k))


def test_square_causal_visits_about_half_the_tiles():
    """T (T + 1) / 2 tiles of T^2 are not empty, T of them on the diagonal partial."""
    kinds = causal_tile_kinds(256, 256, 32, 32)
    t = 256 // 32
    assert int((kinds != TileKind.EMPTY).sum()) == t * (t + 1) // 2
    assert int((kinds == TileKind.PARTIAL).sum()) == t


@pytest.mark.parametrize("bad", [0, -3, 2.0, True])
def test_bad_block(bad):
    with pytest.raises(ValueError, match="block must be a positive integer"):
        tile_slices(10, bad)


def test_bad_mask():
    with pytest.raises(ValueError, match=r"keep must be a 2-D bool tensor \(i, j\), got torch.float32 tensor of shape \(3, 4\)"):
        classify_tiles(torch.ones(3, 4), 2, 2)
