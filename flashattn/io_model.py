r"""How many bytes each attention algorithm moves between main memory (HBM) and the chip.

The model is the FlashAttention paper's (Dao et al., 2022, Theorem 2): a
matrix product reads its operands from main memory once and writes its result
once, and what a tiled algorithm holds on chip between two steps costs
nothing. Only the forward pass is counted. Sizes are in elements (``i``
queries, ``j`` keys, head dimensions ``d`` and ``d_v``, on-chip memory
``sram`` = :math:`M`), traffic in bytes: ``elem_bytes`` per element of
:math:`Q, K, V, O, S, P` and ``stat_bytes`` per row statistic (:math:`m, \ell`
or :math:`\mathrm{lse}`, float32 in the kernels). Everything is for one batch
element and one head; multiply by :math:`b\,h` for the whole problem.

The tiled counts follow the loops of :mod:`flashattn.tiled` exactly: partial
last tiles, and, with ``causal=True``, the tiles that the rule
:math:`c \le r + (j - i)` hides entirely, which are skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .inputs import check_positive_int
from .tiles import TileKind, causal_tile_kind, tile_slices


@dataclass(frozen=True)
class HBMTraffic:
    """Bytes read from and written to main memory."""

    read: int
    written: int

    @property
    def total(self) -> int:
        """Bytes moved either way."""
        return self.read + self.written


def theorem2_block_sizes(d: int, sram: int) -> tuple[int, int]:
    r"""The tile sizes of FlashAttention-1's Theorem 2 for head dimension ``d`` and ``sram`` elements on chip.

    .. math::

        B_c = \left\lceil \frac{M}{4d} \right\rceil, \qquad B_r = \min(B_c, d)

    so that the tiles of :math:`K, V` (kept on chip through the inner loop)
    take about half of :math:`M` and the streamed tiles of :math:`Q, O` and
    the score tile :math:`B_r \times B_c` the rest. Returns ``(block_q, block_k)`` =
    :math:`(B_r, B_c)`.
    """
    if sram < 1 or d < 1:
        raise ValueError(f"d and sram must be positive, got d={d}, sram={sram}")
    block_k = math.ceil(sram / (4 * d))
    return min(block_k, d), block_k


def _blocks(
    d: int, sram: int | None, block_q: int | None, block_k: int | None, *, resident_is_q: bool
) -> tuple[int, int]:
    """The tile sizes given, or Theorem 2's for ``sram``, the large tile going to the loop that stays on chip."""
    if (block_q is None) != (block_k is None) or (sram is None) == (block_q is None):
        raise ValueError(
            f"give either sram or both block_q and block_k, got sram={sram}, block_q={block_q}, block_k={block_k}"
        )
    if sram is None:
        return check_positive_int("block_q", block_q), check_positive_int("block_k", block_k)
    small, large = theorem2_block_sizes(d, sram)
    return (large, small) if resident_is_q else (small, large)


def standard_attention_io(i: int, j: int, d: int, *, d_v: int | None = None, elem_bytes: int = 2) -> HBMTraffic:
    r"""Standard attention (Dao et al., 2022, Algorithm 0), which writes :math:`S` and :math:`P` to main memory.

    1. read :math:`Q, K`, write :math:`S = \tau Q K^\top`;
    2. read :math:`S`, write :math:`P = \operatorname{softmax}(S)`;
    3. read :math:`P, V`, write :math:`O = P V`.

    .. math::

        \text{read} = e\,(i d + j d + 2 i j + j d_v), \qquad
        \text{written} = e\,(2 i j + i d_v)

    with :math:`e` = ``elem_bytes``: :math:`\Theta(n d + n^2)` for
    :math:`i = j = n`, whatever the on-chip memory. A causal mask changes
    nothing here: it is applied to the whole :math:`S` in step 2.
    """
    d_v = d if d_v is None else d_v
    read = i * d + j * d + 2 * i * j + j * d_v
    written = 2 * i * j + i * d_v
    return HBMTraffic(read * elem_bytes, written * elem_bytes)


def flash_attention1_io(
    i: int,
    j: int,
    d: int,
    *,
    sram: int | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    d_v: int | None = None,
    causal: bool = False,
    elem_bytes: int = 2,
    stat_bytes: int = 4,
) -> HBMTraffic:
    r"""FlashAttention-1's forward (Dao et al., 2022, Algorithm 1): key tiles outside, query tiles inside.

    :math:`O, \ell, m` are first written to main memory (zeros, zeros,
    :math:`-\infty`). Each key tile reads :math:`K_c, V_c` once; each visible
    (key tile, query tile) pair reads :math:`Q_r, O_r, \ell_r, m_r` and writes
    :math:`O_r, \ell_r, m_r` back. Without a causal mask, with
    :math:`T_c = \lceil j / B_c \rceil`,

    .. math::

        \text{read} = e\,j\,(d + d_v) + T_c \bigl(e\, i\,(d + d_v) + 2 s\, i\bigr), \qquad
        \text{written} = (T_c + 1)\,(e\, i\, d_v + 2 s\, i)

    (:math:`e` = ``elem_bytes``, :math:`s` = ``stat_bytes``). With Theorem 2's
    :math:`B_c = \lceil M / 4d \rceil`, :math:`T_c \approx 4 n d / M` and the
    traffic is :math:`\Theta(n^2 d^2 / M)` for :math:`i = j = n`.

    Give either ``sram`` (tiles of :func:`theorem2_block_sizes`) or both
    ``block_q`` and ``block_k``.
    """
    d_v = d if d_v is None else d_v
    block_q, block_k = _blocks(d, sram, block_q, block_k, resident_is_q=False)
    read = 0
    written = elem_bytes * i * d_v + stat_bytes * 2 * i  # O, l and m set up in main memory
    for cols in tile_slices(j, block_k):
        read += elem_bytes * (cols.stop - cols.start) * (d + d_v)  # K_c, V_c
        for rows in tile_slices(i, block_q):
            if causal and causal_tile_kind(rows, cols, i, j) is TileKind.EMPTY:
                continue
            n = rows.stop - rows.start
            read += elem_bytes * n * (d + d_v) + stat_bytes * 2 * n  # Q_r, O_r, l_r, m_r
            written += elem_bytes * n * d_v + stat_bytes * 2 * n  # O_r, l_r, m_r
    return HBMTraffic(read, written)


def flash_attention2_io(
    i: int,
    j: int,
    d: int,
    *,
    sram: int | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    d_v: int | None = None,
    causal: bool = False,
    elem_bytes: int = 2,
    stat_bytes: int = 4,
) -> HBMTraffic:
    r"""FlashAttention-2's forward (Dao, 2023, Algorithm 1): query tiles outside, key tiles inside.

    Each query tile reads :math:`Q_r` once, then :math:`K_c, V_c` of every
    key tile it can see, and writes :math:`O_r` and :math:`\mathrm{lse}_r`
    once, at the end: the output is never read back. Without a causal mask,
    with :math:`T_r = \lceil i / B_r \rceil`,

    .. math::

        \text{read} = e\, i\, d + T_r\, e\, j\,(d + d_v), \qquad
        \text{written} = e\, i\, d_v + s\, i

    (:math:`e` = ``elem_bytes``, :math:`s` = ``stat_bytes``). Here the query
    tile stays on chip through the inner loop, so given ``sram`` it takes
    Theorem 2's large tile: :math:`B_r = \lceil M / 4d \rceil` and
    :math:`B_c = \min(B_r, d)`, and the traffic is again
    :math:`\Theta(n^2 d^2 / M)`, with the output written once instead of
    :math:`T_c + 1` times.

    Give either ``sram`` or both ``block_q`` and ``block_k``.
    """
    d_v = d if d_v is None else d_v
    block_q, block_k = _blocks(d, sram, block_q, block_k, resident_is_q=True)
    read = 0
    written = elem_bytes * i * d_v + stat_bytes * i  # O and lse, once
    for rows in tile_slices(i, block_q):
        read += elem_bytes * (rows.stop - rows.start) * d  # Q_r
        for cols in tile_slices(j, block_k):
            if causal and causal_tile_kind(rows, cols, i, j) is TileKind.EMPTY:
                break  # every later key tile is hidden too
            read += elem_bytes * (cols.stop - cols.start) * (d + d_v)  # K_c, V_c
    return HBMTraffic(read, written)
