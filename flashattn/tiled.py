r"""FlashAttention in plain PyTorch: the tiled forward of both papers, and the tiled backward.

The loops run over tiles in Python, one iteration for what a GPU kernel gives
one program; inside a tile every step is one batched tensor operation over
``(b, h)``. No ``(i, j)`` matrix is ever held whole: a tile of scores is
``(b, h, block_q, block_k)``, the forward keeps only the output ``o`` and the
log-sum-exp ``lse`` of each row, and the backward recomputes the scores tile
by tile from them.

Causal attention lets query ``r`` attend key ``c`` when ``c <= r + (j - i)``.
A tile that this rule hides entirely is skipped, not computed and masked; a
tile that it leaves entirely visible is computed without a mask.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from .inputs import Prepared, check_flag, check_positive_int, prepare
from .online_softmax import finite_or_zero, online_softmax_update
from .tiles import TileKind, causal_tile_kind, tile_slices


def _mask_tile(s: Tensor, rows: slice, cols: slice, i: int, j: int) -> Tensor:
    """The score tile ``s`` ``(b, h, B_r, B_c)`` with ``-inf`` where the causal rule hides the key."""
    r = torch.arange(rows.start, rows.stop, device=s.device)[:, None]  # (B_r, 1)
    c = torch.arange(cols.start, cols.stop, device=s.device)[None, :]  # (1, B_c)
    return s.masked_fill(c > r + (j - i), float("-inf"))


def _scores(q_tile: Tensor, k_tile: Tensor, scale: float, kind: TileKind, rows: slice, cols: slice, i: int, j: int) -> Tensor:
    """The score tile ``tau Q_r K_c^T`` ``(b, h, B_r, B_c)``, masked only when the tile is partial."""
    s = (q_tile @ k_tile.transpose(-1, -2)) * scale  # (b, h, B_r, B_c)
    return _mask_tile(s, rows, cols, i, j) if kind is TileKind.PARTIAL else s


def _kind(causal: bool, rows: slice, cols: slice, i: int, j: int) -> TileKind:
    """The tile's kind: without the causal rule, every tile is full."""
    return causal_tile_kind(rows, cols, i, j) if causal else TileKind.FULL


def load_kv(t: Tensor, cols: slice, g: int) -> Tensor:
    """The tile ``cols`` of keys or values ``(b, h_kv, j, ·)``, repeated for the ``g`` query heads of each group.

    Returns ``(b, h, B_c, ·)``: query head ``n`` reads key/value head ``n // g``.
    """
    tile = t[:, :, cols]  # (b, h_kv, B_c, ·)
    return tile if g == 1 else tile.repeat_interleave(g, dim=1)


def sum_groups(t: Tensor, g: int) -> Tensor:
    """Sum ``(b, h, B_c, ·)`` over the ``g`` query heads of each group: ``(b, h_kv, B_c, ·)``."""
    return t if g == 1 else t.unflatten(1, (-1, g)).sum(dim=2)


def _in_working_dtype(q: Tensor, k: Tensor, v: Tensor, scale: float | None, block_q: int, block_k: int) -> Prepared:
    """The inputs prepared (:func:`~flashattn.inputs.prepare`) in the working dtype, and the tile sizes checked.

    Exponentials and running sums lose too much in half precision, so the
    work is done in at least float32, as the kernels accumulate.
    """
    check_positive_int("block_q", block_q)
    check_positive_int("block_k", block_k)
    return prepare(q, k, v, scale=scale, at_least=torch.float32)


def tiled_forward_fa2(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
) -> tuple[Tensor, Tensor]:
    """FlashAttention-2's forward (Dao, 2023, Algorithm 1): query tiles outside, key tiles inside.

    Each query tile keeps its running maximum ``m``, running sum ``l`` and
    unnormalized output ``acc`` while it streams over the key tiles (the
    online softmax, :func:`~flashattn.online_softmax.online_softmax_update`),
    and divides by ``l`` once, at the end. Under the causal rule the inner
    loop stops at the first key tile hidden from the whole query tile.

    ``q`` ``(b, h, i, d)``; ``k`` ``(b, h_kv, j, d)`` or ``(b, j, d)``; ``v``
    ``(b, h_kv, j, d_v)`` or ``(b, j, d_v)``. Returns ``(o, lse)``: ``o``
    ``(b, h, i, d_v)`` in the dtype of ``q``, and ``lse`` ``(b, h, i)`` in at
    least float32, ``-inf`` for a row with no key (whose ``o`` is zero).
    """
    x = _in_working_dtype(q, k, v, scale, block_q, block_k)
    out_dtype = q.dtype  # q as given, now checked
    q, k, v, scale, g = x.q, x.k, x.v, x.scale, x.group
    b, h, i, _ = q.shape
    j, d_v = k.shape[2], v.shape[3]
    o = q.new_empty(b, h, i, d_v)
    lse = q.new_empty(b, h, i)
    for rows in tile_slices(i, block_q):  # one program of the kernel
        q_tile = q[:, :, rows]  # (b, h, B_r, d): loaded once, kept on chip
        m = q.new_full(q_tile.shape[:-1], float("-inf"))  # (b, h, B_r)
        l = q.new_zeros(q_tile.shape[:-1])  # (b, h, B_r)
        acc = q.new_zeros(*q_tile.shape[:-1], d_v)  # (b, h, B_r, d_v)
        for cols in tile_slices(j, block_k):
            kind = _kind(causal, rows, cols, i, j)
            if kind is TileKind.EMPTY:
                break  # every later key tile lies further right, hidden too
            k_tile = load_kv(k, cols, g)  # (b, h, B_c, d)
            v_tile = load_kv(v, cols, g)  # (b, h, B_c, d_v)
            s = _scores(q_tile, k_tile, scale, kind, rows, cols, i, j)  # (b, h, B_r, B_c)
            m, l, p, alpha = online_softmax_update(m, l, s)  # p: (b, h, B_r, B_c)
            acc = alpha[..., None] * acc + p @ v_tile  # (b, h, B_r, d_v)
        o[:, :, rows] = acc / torch.where(l > 0, l, 1.0)[..., None]  # a row with no key has acc = 0
        lse[:, :, rows] = m + torch.log(l)
    return o.to(out_dtype), lse


def tiled_forward_fa1(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
) -> tuple[Tensor, Tensor]:
    r"""FlashAttention-1's forward (Dao et al., 2022, Algorithm 1): key tiles outside, query tiles inside.

    Written line by line as the paper's algorithm (its line numbers in the
    comments; the paper's loop indices are tiles, here ``cols`` and ``rows``).
    ``O``, ``l`` and ``m`` live in main memory from the start; every
    (key tile, query tile) pair reads ``O_r, l_r, m_r``, folds the tile into
    them and writes them back, normalised:

    .. math::

        m^{new} = \max(m, \tilde m), \quad
        \ell^{new} = e^{m - m^{new}} \ell + e^{\tilde m - m^{new}} \tilde\ell, \quad
        O \leftarrow \frac{e^{m - m^{new}} \ell\, O + e^{\tilde m - m^{new}} \tilde P V_c}{\ell^{new}}

    where :math:`\tilde m, \tilde P, \tilde\ell` are the row maximum, the
    shifted exponentials and their row sum of this tile alone. Tiles that the
    causal rule hides entirely are skipped; a row that has seen no key yet
    keeps ``m = -inf``, ``l = 0`` and ``O = 0`` without NaN.

    Same arguments as :func:`tiled_forward_fa2`; returns ``(o, lse)`` with
    ``lse = m + log l``, formed once at the end.
    """
    x = _in_working_dtype(q, k, v, scale, block_q, block_k)
    out_dtype = q.dtype  # q as given, now checked
    q, k, v, scale, g = x.q, x.k, x.v, x.scale, x.group
    b, h, i, _ = q.shape
    j, d_v = k.shape[2], v.shape[3]
    o = q.new_zeros(b, h, i, d_v)  # line 2: O = 0, l = 0, m = -inf, in main memory
    l = q.new_zeros(b, h, i)
    m = q.new_full((b, h, i), float("-inf"))
    for cols in tile_slices(j, block_k):  # line 5
        k_tile = load_kv(k, cols, g)  # line 6: (b, h, B_c, d)
        v_tile = load_kv(v, cols, g)  # line 6: (b, h, B_c, d_v)
        for rows in tile_slices(i, block_q):  # line 7
            kind = _kind(causal, rows, cols, i, j)
            if kind is TileKind.EMPTY:
                continue  # every query of this tile comes before the key tile
            o_r, l_r, m_r = o[:, :, rows], l[:, :, rows], m[:, :, rows]  # line 8 (and Q_r below)
            s = _scores(q[:, :, rows], k_tile, scale, kind, rows, cols, i, j)  # line 9: (b, h, B_r, B_c)
            m_tile = s.amax(dim=-1)  # line 10: (b, h, B_r)
            p_tile = torch.exp(s - finite_or_zero(m_tile)[..., None])  # line 10: (b, h, B_r, B_c)
            l_tile = p_tile.sum(dim=-1)  # line 10: (b, h, B_r)
            m_new = torch.maximum(m_r, m_tile)  # line 11
            shift = finite_or_zero(m_new)  # a row with no key so far: both weights 0, not NaN
            w_old, w_tile = torch.exp(m_r - shift), torch.exp(m_tile - shift)  # (b, h, B_r)
            l_new = w_old * l_r + w_tile * l_tile  # line 11
            o[:, :, rows] = (  # line 12: written back to main memory, normalised
                (w_old * l_r)[..., None] * o_r + w_tile[..., None] * (p_tile @ v_tile)
            ) / torch.where(l_new > 0, l_new, 1.0)[..., None]
            l[:, :, rows], m[:, :, rows] = l_new, m_new  # line 13
    return o.to(out_dtype), m + torch.log(l)


def _tile_gradients(
    q_tile: Tensor, k_tile: Tensor, v_tile: Tensor, do_tile: Tensor, lse_rows: Tensor, delta_rows: Tensor,
    scale: float, kind: TileKind, rows: slice, cols: slice, i: int, j: int,
) -> tuple[Tensor, Tensor]:
    r"""Recompute one tile's probabilities and score gradients: ``(P, dS)``, each ``(b, h, B_r, B_c)``.

    :math:`P = e^{S - \mathrm{lse}}` from the saved log-sum-exp (``lse_rows``
    with ``-inf`` already replaced by a finite number), and
    :math:`dS = P \circ (dO\, V^\top - D)`.
    """
    s = _scores(q_tile, k_tile, scale, kind, rows, cols, i, j)  # (b, h, B_r, B_c)
    p = torch.exp(s - lse_rows[..., None])  # (b, h, B_r, B_c)
    dp = do_tile @ v_tile.transpose(-1, -2)  # (b, h, B_r, B_c)
    return p, p * (dp - delta_rows[..., None])


def _backward_setup(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float | None, block_q: int, block_k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, float, int]:
    """The inputs of a tiled backward in the working dtype, with ``D = rowsum(dO * O)`` and a finite ``lse``.

    Returns ``(do, q, k, v, delta, lse, scale, g)``; ``k``, ``v`` 4-D.
    """
    x = _in_working_dtype(q, k, v, scale, block_q, block_k)
    q, k, v, scale = x.q, x.k, x.v, x.scale
    do, o = do.to(q.dtype), o.to(q.dtype)
    delta = (do * o).sum(dim=-1)  # (b, h, i): D
    # A row with no key has lse = -inf and every score -inf; any finite lse keeps its P at 0.
    lse = torch.where(torch.isneginf(lse), 0.0, lse).to(q.dtype)  # (b, h, i)
    return do, q, k, v, delta, lse, scale, x.group


def tiled_backward(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""FlashAttention-2's backward (Dao, 2023, Algorithm 2): key tiles outside, query tiles inside.

    Each probability tile is recomputed from the saved log-sum-exp,
    :math:`P = e^{S - \mathrm{lse}}`, and with :math:`D = \operatorname{rowsum}(dO \circ O)`

    .. math::

        dV = P^\top dO, \quad dP = dO\, V^\top, \quad dS = P \circ (dP - D), \quad
        dQ = \tau\, dS\, K, \quad dK = \tau\, dS^\top Q,

    each a sum over tiles: ``dk`` and ``dv`` of a key tile accumulate over the
    query tiles (on chip, in a kernel), ``dq`` of a query tile over the key
    tiles, in main memory: on a GPU, programs that own different key tiles
    add into the same ``dq`` rows, with atomic additions.
    :func:`tiled_backward_two_pass` avoids those. With grouped-query
    attention, the gradients of a key/value head sum over the query heads
    that share it.

    ``do`` and ``o`` ``(b, h, i, d_v)``, ``lse`` ``(b, h, i)`` as returned by
    :func:`tiled_forward_fa2`; the other arguments as given to it. Returns
    ``(dq, dk, dv)`` shaped and typed like ``q``, ``k``, ``v``.
    """
    setup = _backward_setup(do, q, k, v, o, lse, scale, block_q, block_k)
    out_dtype, k_shape, v_shape = q.dtype, k.shape, v.shape  # as given, now checked
    do, q, k, v, delta, lse, scale, g = setup
    i, j = q.shape[2], k.shape[2]
    dq = torch.zeros_like(q)  # (b, h, i, d)
    dk = torch.zeros_like(k)  # (b, h_kv, j, d)
    dv = torch.zeros_like(v)  # (b, h_kv, j, d_v)
    for cols in tile_slices(j, block_k):
        k_tile = load_kv(k, cols, g)  # (b, h, B_c, d)
        v_tile = load_kv(v, cols, g)  # (b, h, B_c, d_v)
        dk_tile = torch.zeros_like(k_tile)  # (b, h, B_c, d)
        dv_tile = torch.zeros_like(v_tile)  # (b, h, B_c, d_v)
        for rows in tile_slices(i, block_q):
            kind = _kind(causal, rows, cols, i, j)
            if kind is TileKind.EMPTY:
                continue  # every query of this tile comes before the key tile
            q_tile, do_tile = q[:, :, rows], do[:, :, rows]  # (b, h, B_r, d), (b, h, B_r, d_v)
            p, ds = _tile_gradients(q_tile, k_tile, v_tile, do_tile, lse[:, :, rows], delta[:, :, rows],
                                    scale, kind, rows, cols, i, j)
            dv_tile += p.transpose(-1, -2) @ do_tile
            dq[:, :, rows] += (ds @ k_tile) * scale  # the atomic addition of a kernel
            dk_tile += (ds.transpose(-1, -2) @ q_tile) * scale
        dk[:, :, cols] = sum_groups(dk_tile, g)
        dv[:, :, cols] = sum_groups(dv_tile, g)
    return dq.to(out_dtype), dk.view(k_shape).to(out_dtype), dv.view(v_shape).to(out_dtype)


def tiled_backward_two_pass(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward in the order of the package's Triton kernels: a dK/dV pass, then a dQ pass.

    The first pass gives each key tile to one program, which streams the
    query tiles and accumulates ``dK_c`` and ``dV_c`` on chip; the second
    gives each query tile to one program, which streams the key tiles and
    accumulates ``dQ_r`` on chip. Each output has one owner, so nothing is
    added atomically; the price is that ``P`` and ``dS`` are computed twice.
    Same arguments and returns as :func:`tiled_backward`.
    """
    setup = _backward_setup(do, q, k, v, o, lse, scale, block_q, block_k)
    out_dtype, k_shape, v_shape = q.dtype, k.shape, v.shape  # as given, now checked
    do, q, k, v, delta, lse, scale, g = setup
    i, j = q.shape[2], k.shape[2]
    dq = torch.empty_like(q)  # (b, h, i, d)
    dk = torch.empty_like(k)  # (b, h_kv, j, d)
    dv = torch.empty_like(v)  # (b, h_kv, j, d_v)
    for cols in tile_slices(j, block_k):  # pass 1: one program per key tile (attn_bwd_dkdv_kernel)
        k_tile = load_kv(k, cols, g)  # (b, h, B_c, d)
        v_tile = load_kv(v, cols, g)  # (b, h, B_c, d_v)
        dk_tile = torch.zeros_like(k_tile)  # (b, h, B_c, d)
        dv_tile = torch.zeros_like(v_tile)  # (b, h, B_c, d_v)
        for rows in tile_slices(i, block_q):
            kind = _kind(causal, rows, cols, i, j)
            if kind is TileKind.EMPTY:
                continue
            q_tile, do_tile = q[:, :, rows], do[:, :, rows]
            p, ds = _tile_gradients(q_tile, k_tile, v_tile, do_tile, lse[:, :, rows], delta[:, :, rows],
                                    scale, kind, rows, cols, i, j)
            dv_tile += p.transpose(-1, -2) @ do_tile
            dk_tile += ds.transpose(-1, -2) @ q_tile
        dk[:, :, cols] = sum_groups(dk_tile, g) * scale
        dv[:, :, cols] = sum_groups(dv_tile, g)
    for rows in tile_slices(i, block_q):  # pass 2: one program per query tile (attn_bwd_dq_kernel)
        q_tile, do_tile = q[:, :, rows], do[:, :, rows]
        dq_tile = torch.zeros_like(q_tile)  # (b, h, B_r, d)
        for cols in tile_slices(j, block_k):
            kind = _kind(causal, rows, cols, i, j)
            if kind is TileKind.EMPTY:
                break  # every later key tile lies further right, hidden too
            k_tile = load_kv(k, cols, g)
            _, ds = _tile_gradients(q_tile, k_tile, load_kv(v, cols, g), do_tile, lse[:, :, rows],
                                    delta[:, :, rows], scale, kind, rows, cols, i, j)
            dq_tile += ds @ k_tile
        dq[:, :, rows] = dq_tile * scale
    return dq.to(out_dtype), dk.view(k_shape).to(out_dtype), dv.view(v_shape).to(out_dtype)


class _TiledAttention(torch.autograd.Function):
    """FlashAttention-2's forward and backward: saves only ``q``, ``k``, ``v``, ``o`` and ``lse``."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None, block_q: int, block_k: int
    ) -> Tensor:
        o, lse = tiled_forward_fa2(q, k, v, causal=causal, scale=scale, block_q=block_q, block_k=block_k)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.options = {"causal": causal, "scale": scale, "block_q": block_q, "block_k": block_k}
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, do: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = tiled_backward(do, q, k, v, o, lse, **ctx.options)
        return dq, dk, dv, None, None, None, None


def tiled_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
) -> Tensor:
    """Attention computed tile by tile, FlashAttention-2's way, with a tiled backward.

    ``q`` ``(b, h, i, d)``; ``k`` ``(b, h_kv, j, d)`` with ``h % h_kv == 0``,
    or ``(b, j, d)`` shared by every head; ``v`` likewise with ``d_v``.
    ``causal``: query ``r`` attends key ``c`` only when ``c <= r + (j - i)``.
    ``scale`` defaults to ``d ** -0.5``. ``block_q`` and ``block_k`` are the
    tile sizes :math:`B_r` and :math:`B_c`; any lengths work, and a block may
    be longer than the sequence.

    Returns ``o`` ``(b, h, i, d_v)`` in the dtype of ``q``; a query row with
    no key to attend gives zeros and zero gradients. For backward, only
    ``q``, ``k``, ``v``, ``o`` and the row log-sum-exp are kept: memory grows
    linearly in the sequence lengths.
    """
    x = prepare(q, k, v, scale=scale)  # 3-D k, v become (b, 1, j, ·) views, through which autograd returns
    return _TiledAttention.apply(q, x.k, x.v, check_flag("causal", causal), x.scale, block_q, block_k)
