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

from .checks import check_attention_inputs, check_scale
from .online_softmax import merge_partials, online_softmax_update, safe_softmax


def _tiles(n: int, block: int) -> list[slice]:
    """``range(n)`` cut into consecutive slices of ``block`` indices; the last may be shorter."""
    return [slice(start, min(start + block, n)) for start in range(0, n, block)]


def _fully_masked(rows: slice, cols: slice, i: int, j: int) -> bool:
    """Whether the causal rule hides every key of ``cols`` from every query of ``rows``.

    The tile's last query sees the most keys, and its first key is the
    hardest to see: the tile is hidden when even that pair is.
    """
    return cols.start > (rows.stop - 1) + (j - i)


def _mask_tile(s: Tensor, rows: slice, cols: slice, i: int, j: int) -> Tensor:
    """The score tile ``s`` ``(b, h, B_r, B_c)`` with ``-inf`` where the causal rule hides the key."""
    if cols.stop - 1 <= rows.start + (j - i):
        return s  # even the tile's first query sees its last key: nothing to mask
    r = torch.arange(rows.start, rows.stop, device=s.device)[:, None]  # (B_r, 1)
    c = torch.arange(cols.start, cols.stop, device=s.device)[None, :]  # (1, B_c)
    return s.masked_fill(c > r + (j - i), float("-inf"))


def _load_kv(t: Tensor, cols: slice, g: int) -> Tensor:
    """The tile ``cols`` of keys or values ``(b, h_kv, j, ·)``, repeated for the ``g`` query heads of each group.

    Returns ``(b, h, B_c, ·)``: query head ``n`` reads key/value head ``n // g``.
    """
    tile = t[:, :, cols]  # (b, h_kv, B_c, ·)
    return tile if g == 1 else tile.repeat_interleave(g, dim=1)


def _sum_groups(t: Tensor, g: int) -> Tensor:
    """Sum ``(b, h, B_c, ·)`` over the ``g`` query heads of each group: ``(b, h_kv, B_c, ·)``."""
    return t if g == 1 else t.unflatten(1, (-1, g)).sum(dim=2)


def _prepare(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None, block_q: int, block_k: int
) -> tuple[Tensor, Tensor, Tensor, float]:
    """Check the inputs; return q, 4-D k and v in the working dtype, and the scale.

    Exponentials and running sums lose too much in half precision, so the
    work is done in at least float32, as the kernels accumulate.
    """
    k, v = check_attention_inputs(q, k, v)
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"{name} must be a positive integer, got {block!r}")
    scale = check_scale(scale)
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    return q, k, v, q.shape[-1] ** -0.5 if scale is None else scale


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
    out_dtype = q.dtype
    q, k, v, scale = _prepare(q, k, v, scale, block_q, block_k)
    b, h, i, _ = q.shape
    h_kv, j, d_v = k.shape[1], k.shape[2], v.shape[3]
    g = h // h_kv
    o = q.new_empty(b, h, i, d_v)
    lse = q.new_empty(b, h, i)
    for rows in _tiles(i, block_q):
        q_tile = q[:, :, rows]  # (b, h, B_r, d)
        m = q.new_full(q_tile.shape[:-1], float("-inf"))  # (b, h, B_r)
        l = q.new_zeros(q_tile.shape[:-1])  # (b, h, B_r)
        acc = q.new_zeros(*q_tile.shape[:-1], d_v)  # (b, h, B_r, d_v)
        for cols in _tiles(j, block_k):
            if causal and _fully_masked(rows, cols, i, j):
                break  # every later key tile lies further right, hidden too
            k_tile = _load_kv(k, cols, g)  # (b, h, B_c, d)
            v_tile = _load_kv(v, cols, g)  # (b, h, B_c, d_v)
            s = (q_tile @ k_tile.transpose(-1, -2)) * scale  # (b, h, B_r, B_c)
            if causal:
                s = _mask_tile(s, rows, cols, i, j)
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
    """FlashAttention-1's forward (Dao et al., 2022, Algorithm 1): key tiles outside, query tiles inside.

    The output lives in main memory from the start (zeros, with ``lse =
    -inf``: attention over no key yet), and every (key tile, query tile) pair
    rescales it: the attention of the query tile over this key tile alone is
    merged into the stored result through the log-sum-exp
    (:func:`~flashattn.online_softmax.merge_partials`). The paper stores the
    row maximum ``m`` and sum ``l``; ``lse = m + log l`` carries the same
    information in one number. Query tiles that the causal rule hides from
    the whole key tile are skipped.

    Same arguments and returns as :func:`tiled_forward_fa2`.
    """
    out_dtype = q.dtype
    q, k, v, scale = _prepare(q, k, v, scale, block_q, block_k)
    b, h, i, _ = q.shape
    h_kv, j, d_v = k.shape[1], k.shape[2], v.shape[3]
    g = h // h_kv
    o = q.new_zeros(b, h, i, d_v)
    lse = q.new_full((b, h, i), float("-inf"))
    for cols in _tiles(j, block_k):
        k_tile = _load_kv(k, cols, g)  # (b, h, B_c, d)
        v_tile = _load_kv(v, cols, g)  # (b, h, B_c, d_v)
        for rows in _tiles(i, block_q):
            if causal and _fully_masked(rows, cols, i, j):
                continue  # every query of this tile comes before the key tile
            s = (q[:, :, rows] @ k_tile.transpose(-1, -2)) * scale  # (b, h, B_r, B_c)
            if causal:
                s = _mask_tile(s, rows, cols, i, j)
            o_tile = safe_softmax(s) @ v_tile  # (b, h, B_r, d_v): attention over this key tile alone
            lse_tile = torch.logsumexp(s, dim=-1)  # (b, h, B_r)
            o[:, :, rows], lse[:, :, rows] = merge_partials(o[:, :, rows], lse[:, :, rows], o_tile, lse_tile)
    return o.to(out_dtype), lse


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
    tiles (in main memory). With grouped-query attention, the gradients of a
    key/value head sum over the query heads that share it.

    ``do`` and ``o`` ``(b, h, i, d_v)``, ``lse`` ``(b, h, i)`` as returned by
    :func:`tiled_forward_fa2`; the other arguments as given to it. Returns
    ``(dq, dk, dv)`` shaped and typed like ``q``, ``k``, ``v``.
    """
    out_dtype, k_shape, v_shape = q.dtype, k.shape, v.shape
    q, k, v, scale = _prepare(q, k, v, scale, block_q, block_k)
    do, o = do.to(q.dtype), o.to(q.dtype)
    i, j = q.shape[2], k.shape[2]
    g = q.shape[1] // k.shape[1]
    delta = (do * o).sum(dim=-1)  # (b, h, i): D
    # A row with no key has lse = -inf and every score -inf; any finite lse keeps its P at 0.
    lse = torch.where(torch.isneginf(lse), 0.0, lse).to(q.dtype)  # (b, h, i)
    dq = torch.zeros_like(q)  # (b, h, i, d)
    dk = torch.zeros_like(k)  # (b, h_kv, j, d)
    dv = torch.zeros_like(v)  # (b, h_kv, j, d_v)
    for cols in _tiles(j, block_k):
        k_tile = _load_kv(k, cols, g)  # (b, h, B_c, d)
        v_tile = _load_kv(v, cols, g)  # (b, h, B_c, d_v)
        dk_tile = torch.zeros_like(k_tile)  # (b, h, B_c, d)
        dv_tile = torch.zeros_like(v_tile)  # (b, h, B_c, d_v)
        for rows in _tiles(i, block_q):
            if causal and _fully_masked(rows, cols, i, j):
                continue  # every query of this tile comes before the key tile
            q_tile, do_tile = q[:, :, rows], do[:, :, rows]  # (b, h, B_r, d), (b, h, B_r, d_v)
            s = (q_tile @ k_tile.transpose(-1, -2)) * scale  # (b, h, B_r, B_c)
            if causal:
                s = _mask_tile(s, rows, cols, i, j)
            p = torch.exp(s - lse[:, :, rows, None])  # (b, h, B_r, B_c)
            dv_tile += p.transpose(-1, -2) @ do_tile
            dp = do_tile @ v_tile.transpose(-1, -2)  # (b, h, B_r, B_c)
            ds = p * (dp - delta[:, :, rows, None])  # (b, h, B_r, B_c)
            dq[:, :, rows] += (ds @ k_tile) * scale
            dk_tile += (ds.transpose(-1, -2) @ q_tile) * scale
        dk[:, :, cols] = _sum_groups(dk_tile, g)
        dv[:, :, cols] = _sum_groups(dv_tile, g)
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
    k, v = check_attention_inputs(q, k, v)  # 3-D k, v become (b, 1, j, ·) views, through which autograd returns
    return _TiledAttention.apply(q, k, v, bool(causal), scale, block_q, block_k)
