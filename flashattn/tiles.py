"""The score matrix cut into tiles, and what a mask leaves of each tile.

A tiled algorithm visits the ``i x j`` score matrix ``B_r x B_c`` at a time.
Under a mask each tile is one of three kinds, and the kind decides its cost:

- ``FULL``: every query of the tile may attend every key of it; computed
  without a mask.
- ``PARTIAL``: some pairs are hidden; computed, then masked.
- ``EMPTY``: every pair is hidden; skipped, neither loaded nor computed.

``tiled.py`` and ``io_model.py`` classify the causal tiles with
:func:`causal_tile_kind`; the Triton kernels compute the same split inside
each program (their ``key_range``), and the tests tie the two together.
"""

from __future__ import annotations

from enum import IntEnum

import torch
from torch import Tensor

from .inputs import check_positive_int


class TileKind(IntEnum):
    """What a mask leaves of one tile of the score matrix."""

    EMPTY = 0
    PARTIAL = 1
    FULL = 2


def tile_slices(n: int, block: int) -> list[slice]:
    """``range(n)`` cut into consecutive slices of ``block`` indices; the last may be shorter."""
    check_positive_int("block", block)
    return [slice(start, min(start + block, n)) for start in range(0, n, block)]


def causal_tile_kind(rows: slice, cols: slice, i: int, j: int) -> TileKind:
    """The kind of the tile ``rows x cols`` under the causal rule ``c <= r + (j - i)``.

    The tile's last query sees the most keys and its first key is the hardest
    to see: when even that pair is hidden, the tile is ``EMPTY``. Its first
    query sees the fewest keys and its last key is the easiest to hide: when
    even that pair is visible, the tile is ``FULL``.
    """
    offset = j - i
    if cols.start > (rows.stop - 1) + offset:
        return TileKind.EMPTY
    if cols.stop - 1 <= rows.start + offset:
        return TileKind.FULL
    return TileKind.PARTIAL


def causal_tile_kinds(i: int, j: int, block_q: int, block_k: int) -> Tensor:
    """:func:`causal_tile_kind` of every tile: an int64 tensor ``(T_r, T_c)`` of ``TileKind`` values."""
    row_tiles, col_tiles = tile_slices(i, block_q), tile_slices(j, block_k)
    kinds = [[causal_tile_kind(rows, cols, i, j) for cols in col_tiles] for rows in row_tiles]
    return torch.tensor(kinds, dtype=torch.int64).reshape(len(row_tiles), len(col_tiles))


def classify_tiles(keep: Tensor, block_q: int, block_k: int) -> Tensor:
    """The kind of every tile of any mask ``keep`` ``(i, j)`` (True = may attend).

    Returns an int64 tensor ``(T_r, T_c)`` of ``TileKind`` values: ``FULL``
    where every pair inside the matrix is kept, ``EMPTY`` where none is.
    A last, shorter tile is judged on the pairs it holds.
    """
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.dim() != 2:
        got = f"{keep.dtype} tensor of shape {tuple(keep.shape)}" if isinstance(keep, Tensor) else type(keep).__name__
        raise ValueError(f"keep must be a 2-D bool tensor (i, j), got {got}")
    i, j = keep.shape
    n_r, n_c = len(tile_slices(i, block_q)), len(tile_slices(j, block_k))
    pad = (0, n_c * block_k - j, 0, n_r * block_q - i)

    def per_tile(x: Tensor) -> Tensor:  # (i, j) -> (T_r, T_c): sum over each tile
        x = torch.nn.functional.pad(x.to(torch.int64), pad)  # (T_r B_r, T_c B_c)
        return x.reshape(n_r, block_q, n_c, block_k).sum(dim=(1, 3))

    kept, size = per_tile(keep), per_tile(torch.ones_like(keep))
    kinds = torch.full_like(kept, TileKind.PARTIAL)
    kinds[kept == 0] = TileKind.EMPTY
    kinds[kept == size] = TileKind.FULL
    return kinds
