"""The FlashAttention-2 kernels, in Triton: one forward, and a backward in three passes.

Each program owns one tile of one (batch, head): ``BLOCK_Q`` queries in the
forward and dQ kernels, ``BLOCK_K`` keys in the dK/dV kernel, and streams the
other side past it, tile by tile, through on-chip memory. The grid is
(tiles, heads, batch). The tensors are laid out as in ``tiled_attention``:

    q, o, dq, do   (b, h, i, d) and (b, h, i, d_v), any strides, last one 1
    k, v, dk, dv   (b, h_kv, j, d) and (b, h_kv, j, d_v); query head ``head``
                   reads key/value head ``head // g``
    lse, delta     (b, h, i) float32, contiguous

``D`` and ``DV`` are ``d`` and ``d_v`` (powers of two from 16; the wrapper
pads other sizes). Scores are kept in base-2 units: ``qk_scale`` is
``scale * log2(e)``, so that the exponentials are ``exp2``, and the maxima
``m`` are base-2 as well. ``lse`` is stored in natural units, as the book
defines it. A query row that may attend no key gets zero output, zero
gradients and ``lse = -inf``, as in ``tiled_attention``.

The causal rule is the bottom-right one, key ``c`` visible to query ``r``
when ``c <= r + diag_offset`` with ``diag_offset = j - i``. Each kernel
splits its loop in two stages: the tiles that every row may see in full,
without any mask, and the tiles across the diagonal (or past the end of the
sequence), where the mask is applied; tiles above the diagonal are skipped.

Each kernel reads and writes its tiles in one of two ways, chosen by the
constexpr ``TMA`` and written once, in ``matrix``, ``load_tile`` and
``store_tile``. With ``TMA=False`` a tile is a block of pointers, loaded and
stored with a mask for the rows past the end of the sequence. With
``TMA=True`` (Hopper, 16-bit inputs) each matrix of a (batch, head) is
described once by a tensor descriptor, and a tile is fetched by the Tensor
Memory Accelerator, a copy engine that fills the rows past the end with zeros
and stores none of them: what the masks did. A descriptor needs its base
address and row stride to be multiples of 16 bytes, which the launch checks
(``flashattn.triton.hopper.tma_fits``).
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) == exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): log(x) == log2(x) * LN2
# float32 products run on tensor cores as three TF32 products (a split of each factor into a
# high and a low part), which keeps nearly float32's precision where one TF32 product would keep
# 10 bits; float16 and bfloat16 inputs ignore it
DOT_PRECISION = tl.constexpr("tf32x3")


@triton.jit
def tile_ptrs(base, start, stride, BLOCK: tl.constexpr, cols):
    """Pointers to rows ``start .. start + BLOCK`` and columns ``cols`` of a matrix at ``base`` with row ``stride``.

    The row offset ``start * stride`` is taken in 64 bits: for a long
    sequence, or rows of a wide packed buffer, it passes 2**31. Within the
    tile the offsets stay small and 32-bit.
    """
    return base + tl.cast(start, tl.int64) * stride + tl.arange(0, BLOCK)[:, None] * stride + cols[None, :]


@triton.jit
def matrix(base, n, stride, BLOCK: tl.constexpr, COLS: tl.constexpr, TMA: tl.constexpr):
    """What the tiles of the ``(n, COLS)`` matrix at ``base`` with row ``stride`` are read through.

    With ``TMA``, a descriptor of the matrix that moves tiles of ``BLOCK``
    rows; without, ``base`` itself, from which ``tile_ptrs`` makes pointers.
    """
    if TMA:
        src = tl.make_tensor_descriptor(base, shape=[n, COLS], strides=[stride, 1], block_shape=[BLOCK, COLS])
    else:
        src = base
    return src


@triton.jit
def load_tile(src, start, stride, BLOCK: tl.constexpr, cols, mask, TMA: tl.constexpr):
    """Rows ``start .. start + BLOCK`` of the matrix that ``src`` reads: (BLOCK, cols), zero where ``mask`` is not.

    ``src`` comes from ``matrix``. Pointers need the column indices
    ``cols``, the row ``stride`` and the ``mask`` of rows in the matrix
    (``(BLOCK, 1)``); a descriptor knows the shape and ignores them.
    """
    if TMA:
        tile = src.load([start, 0])  # one copy by the TMA engine; rows past the end arrive as zeros
    else:
        tile = tl.load(tile_ptrs(src, start, stride, BLOCK, cols), mask=mask, other=0.0)
    return tile


@triton.jit
def store_tile(src, start, stride, BLOCK: tl.constexpr, cols, value, mask, TMA: tl.constexpr):
    """Write ``value`` (BLOCK, cols), cast to the matrix's dtype, to the rows ``start ..`` of ``src`` under ``mask``."""
    if TMA:
        src.store([start, 0], value.to(src.dtype))  # rows past the end are not written
    else:
        tl.store(tile_ptrs(src, start, stride, BLOCK, cols), value.to(src.dtype.element_ty), mask=mask)


@triton.jit
def fwd_stage(
    acc, m, l, q,
    k_src, v_src, stride_kj, stride_vj,
    offs_q, offs_d, offs_dv,
    lo, hi, j, diag_offset, qk_scale,
    BLOCK_K: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, TMA: tl.constexpr,
):
    """The inner loop of the forward: key tiles ``lo`` to ``hi`` into the online softmax of one query tile."""
    for start_k in range(lo, hi, BLOCK_K):
        offs_k = start_k + tl.arange(0, BLOCK_K)
        # load K_c; rows past j read as zero and are masked below
        k = load_tile(k_src, start_k, stride_kj, BLOCK_K, offs_d, mask=(offs_k < j)[:, None], TMA=TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_Q, BLOCK_K), unscaled
        if MASKED:
            keep = (offs_k < j)[None, :]
            if CAUSAL:
                keep = keep & (offs_k[None, :] <= offs_q[:, None] + diag_offset)
            s = tl.where(keep, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            # a row with nothing kept so far has m_new = -inf; shifting it by 0 keeps its p at 0, not NaN
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_shift[:, None])
        else:
            # qk_scale > 0, so the maximum of the scaled scores is the scaled maximum, and
            # each exponent below is one fused multiply-add
            m_new = tl.maximum(m, tl.max(qk, 1) * qk_scale)
            m_shift = m_new
            p = tl.math.exp2(qk * qk_scale - m_shift[:, None])
        # rescale what was summed under the old maximum: exp2(m - m_new) <= 1
        alpha = tl.math.exp2(m - m_shift)
        l = l * alpha + tl.sum(p, 1)
        v = load_tile(v_src, start_k, stride_vj, BLOCK_K, offs_dv, mask=(offs_k < j)[:, None], TMA=TMA)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m = m_new
    return acc, m, l


@triton.jit
def key_range(start_q, j, diag_offset, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, CAUSAL: tl.constexpr):
    """Split the keys of one query tile: ``[0, mid)`` need no mask, ``[mid, hi)`` do, the rest are skipped."""
    if CAUSAL:
        # the first row of the tile sees keys up to start_q + diag_offset, its last row up to
        # start_q + BLOCK_Q - 1 + diag_offset; clamped at 0 first, since // truncates towards zero
        mid = tl.minimum(tl.maximum(start_q + diag_offset + 1, 0), j) // BLOCK_K * BLOCK_K
        hi = tl.minimum(tl.maximum(start_q + BLOCK_Q + diag_offset, 0), j)
    else:
        mid = j // BLOCK_K * BLOCK_K
        hi = j
    return mid, hi


@triton.jit
def attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qi,
    stride_kb, stride_kh, stride_kj,
    stride_vb, stride_vh, stride_vj,
    stride_ob, stride_oh, stride_oi,
    g, i, j, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    CAUSAL: tl.constexpr, TMA: tl.constexpr = False,
):
    """O and lse for one tile of queries: grid (n_q_tiles, h, b)."""
    # -- setup: which query tile of which (batch, head) this program owns
    tile = tl.program_id(0)
    if CAUSAL:
        # the tiles with the most keys first, so the short ones fill in at the end
        tile = tl.num_programs(0) - 1 - tile
    head = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    kv_head = head // g
    start_q = tile * BLOCK_Q
    offs_q = start_q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    k_src = matrix(k_ptr + batch * stride_kb + kv_head * stride_kh, j, stride_kj, BLOCK_K, D, TMA)
    v_src = matrix(v_ptr + batch * stride_vb + kv_head * stride_vh, j, stride_vj, BLOCK_K, DV, TMA)
    diag_offset = j - i

    # -- load Q_r once; it stays on chip while every key tile streams past
    q = load_tile(matrix(q_ptr + batch * stride_qb + head * stride_qh, i, stride_qi, BLOCK_Q, D, TMA),
                  start_q, stride_qi, BLOCK_Q, offs_d, mask=(offs_q < i)[:, None], TMA=TMA)
    m = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)  # running row maximum (base 2)
    l = tl.zeros([BLOCK_Q], dtype=tl.float32)  # running row sum of exp2(s - m)
    acc = tl.zeros([BLOCK_Q, DV], dtype=tl.float32)  # running, unnormalised P V

    # -- stage 1: key tiles every row sees in full; stage 2: across the diagonal or past j
    mid, hi = key_range(start_q, j, diag_offset, BLOCK_Q, BLOCK_K, CAUSAL)
    acc, m, l = fwd_stage(acc, m, l, q, k_src, v_src, stride_kj, stride_vj, offs_q, offs_d, offs_dv,
                           0, mid, j, diag_offset, qk_scale, BLOCK_K, False, CAUSAL, TMA)
    acc, m, l = fwd_stage(acc, m, l, q, k_src, v_src, stride_kj, stride_vj, offs_q, offs_d, offs_dv,
                           mid, hi, j, diag_offset, qk_scale, BLOCK_K, True, CAUSAL, TMA)

    # -- epilogue: normalise, and keep lse for the backward; a row with no key has acc = 0 and
    # m = -inf, so dividing by 1 instead of l = 0 gives o = 0 and lse = -inf (the log of an empty sum)
    l = tl.where(l == 0.0, 1.0, l)
    o = acc / l[:, None]
    lse = (m + tl.math.log2(l)) * LN2
    store_tile(matrix(o_ptr + batch * stride_ob + head * stride_oh, i, stride_oi, BLOCK_Q, DV, TMA),
               start_q, stride_oi, BLOCK_Q, offs_dv, o, mask=(offs_q < i)[:, None], TMA=TMA)
    lse_rows = lse_ptr + (batch * tl.num_programs(1) + head) * i + offs_q
    tl.store(lse_rows, lse, mask=offs_q < i)


@triton.jit
def attn_bwd_preprocess_kernel(
    o_ptr, do_ptr, delta_ptr,
    stride_ob, stride_oh, stride_oi,
    stride_dob, stride_doh, stride_doi,
    i,
    DV: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """delta = rowsum(dO * O) for one tile of rows: grid (n_q_tiles, h, b)."""
    head = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    start_q = tl.program_id(0) * BLOCK_Q
    offs_q = start_q + tl.arange(0, BLOCK_Q)
    offs_dv = tl.arange(0, DV)
    rows = (offs_q < i)[:, None]
    o = tl.load(tile_ptrs(o_ptr + batch * stride_ob + head * stride_oh, start_q, stride_oi, BLOCK_Q, offs_dv),
                mask=rows, other=0.0)
    do = tl.load(tile_ptrs(do_ptr + batch * stride_dob + head * stride_doh, start_q, stride_doi, BLOCK_Q, offs_dv),
                 mask=rows, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + (batch * tl.num_programs(1) + head) * i + offs_q, delta, mask=offs_q < i)


@triton.jit
def load_lse2(lse_base, offs_q, rows):
    """The lse of rows ``offs_q`` in base 2, as the backward uses it to recompute ``p = exp2(s - lse2)``.

    A row with no key has lse = -inf, and so do the rows past i; both become
    +inf, which makes every p of the row exp2(s - inf) = 0.
    """
    lse = tl.load(lse_base + offs_q, mask=rows, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def dkdv_stage(
    dk, dv, k, v,
    q_src, do_src, lse_base, delta_base, stride_qi, stride_doi,
    offs_k, offs_d, offs_dv,
    lo, hi, i, diag_offset, qk_scale,
    BLOCK_Q: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr,
):
    """The inner loop of dK, dV: query tiles ``lo`` to ``hi`` of one head against one key tile.

    Works on transposed tiles (keys down, queries across), so that P^T and
    dS^T come out in the layout their products with dO and Q need.
    """
    for start_q in range(lo, hi, BLOCK_Q):
        offs_q = start_q + tl.arange(0, BLOCK_Q)
        rows = offs_q < i
        q = load_tile(q_src, start_q, stride_qi, BLOCK_Q, offs_d, mask=rows[:, None], TMA=TMA)
        lse2 = load_lse2(lse_base, offs_q, rows)
        # recompute P^T from the scores and the saved lse: no running max needed
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_K, BLOCK_Q)
        p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
        if MASKED:
            p_t = tl.where(offs_k[:, None] <= offs_q[None, :] + diag_offset, p_t, 0.0)
        do = load_tile(do_src, start_q, stride_doi, BLOCK_Q, offs_dv, mask=rows[:, None], TMA=TMA)
        # dV += P^T dO
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        # dP^T = V dO^T, then dS^T = P^T * (dP^T - D): the softmax's backward, row by row
        delta = tl.load(delta_base + offs_q, mask=rows, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_K, BLOCK_Q)
        ds_t = p_t * (dp_t - delta[None, :])
        # dK += dS^T Q (times the scale, applied once at the end)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_qi,
    stride_kb, stride_kh, stride_kj,
    stride_vb, stride_vh, stride_vj,
    stride_dob, stride_doh, stride_doi,
    stride_dkb, stride_dkh, stride_dkj,
    stride_dvb, stride_dvh, stride_dvj,
    h, g, i, j, scale, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    CAUSAL: tl.constexpr, TMA: tl.constexpr = False,
):
    """dK and dV for one tile of keys, summed over the g query heads that share it: grid (n_k_tiles, h_kv, b)."""
    # -- setup: which key tile of which (batch, key/value head) this program owns
    kv_head = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    start_k = tl.program_id(0) * BLOCK_K
    offs_k = start_k + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    diag_offset = j - i

    # -- load K_c and V_c once; dK_c and dV_c accumulate on chip
    cols = (offs_k < j)[:, None]
    k = load_tile(matrix(k_ptr + batch * stride_kb + kv_head * stride_kh, j, stride_kj, BLOCK_K, D, TMA),
                  start_k, stride_kj, BLOCK_K, offs_d, mask=cols, TMA=TMA)
    v = load_tile(matrix(v_ptr + batch * stride_vb + kv_head * stride_vh, j, stride_vj, BLOCK_K, DV, TMA),
                  start_k, stride_vj, BLOCK_K, offs_dv, mask=cols, TMA=TMA)
    dk = tl.zeros([BLOCK_K, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_K, DV], dtype=tl.float32)

    # -- which query tiles see these keys: none before lo; across the diagonal up to mid; in full after
    if CAUSAL:
        lo = tl.maximum(start_k - diag_offset, 0) // BLOCK_Q * BLOCK_Q
        mid = tl.minimum(tl.cdiv(tl.maximum(start_k + BLOCK_K - 1 - diag_offset, 0), BLOCK_Q) * BLOCK_Q, i)
    else:
        lo = 0
        mid = 0

    for head in range(kv_head * g, kv_head * g + g):
        q_src = matrix(q_ptr + batch * stride_qb + head * stride_qh, i, stride_qi, BLOCK_Q, D, TMA)
        do_src = matrix(do_ptr + batch * stride_dob + head * stride_doh, i, stride_doi, BLOCK_Q, DV, TMA)
        lse_base = lse_ptr + (batch * h + head) * i
        delta_base = delta_ptr + (batch * h + head) * i
        # stage 1: across the diagonal, masked (empty without the causal rule);
        # stage 2: below it, every query sees every key
        dk, dv = dkdv_stage(dk, dv, k, v, q_src, do_src, lse_base, delta_base, stride_qi, stride_doi,
                             offs_k, offs_d, offs_dv, lo, mid, i, diag_offset, qk_scale,
                             BLOCK_Q, True, TMA)
        dk, dv = dkdv_stage(dk, dv, k, v, q_src, do_src, lse_base, delta_base, stride_qi, stride_doi,
                             offs_k, offs_d, offs_dv, mid, i, i, diag_offset, qk_scale,
                             BLOCK_Q, False, TMA)

    # -- epilogue: dS was taken with respect to the scaled scores, so dK carries the scale once
    dk = dk * scale
    store_tile(matrix(dk_ptr + batch * stride_dkb + kv_head * stride_dkh, j, stride_dkj, BLOCK_K, D, TMA),
               start_k, stride_dkj, BLOCK_K, offs_d, dk, mask=cols, TMA=TMA)
    store_tile(matrix(dv_ptr + batch * stride_dvb + kv_head * stride_dvh, j, stride_dvj, BLOCK_K, DV, TMA),
               start_k, stride_dvj, BLOCK_K, offs_dv, dv, mask=cols, TMA=TMA)


@triton.jit
def dq_stage(
    dq, q, do, lse2, delta,
    k_src, v_src, stride_kj, stride_vj,
    offs_q, offs_d, offs_dv,
    lo, hi, j, diag_offset, qk_scale,
    BLOCK_K: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, TMA: tl.constexpr,
):
    """The inner loop of dQ: key tiles ``lo`` to ``hi`` against one query tile."""
    for start_k in range(lo, hi, BLOCK_K):
        offs_k = start_k + tl.arange(0, BLOCK_K)
        k = load_tile(k_src, start_k, stride_kj, BLOCK_K, offs_d, mask=(offs_k < j)[:, None], TMA=TMA)
        v = load_tile(v_src, start_k, stride_vj, BLOCK_K, offs_dv, mask=(offs_k < j)[:, None], TMA=TMA)
        # recompute P from the scores and the saved lse
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_Q, BLOCK_K)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
            keep = (offs_k < j)[None, :]
            if CAUSAL:
                keep = keep & (offs_k[None, :] <= offs_q[:, None] + diag_offset)
            p = tl.where(keep, p, 0.0)
        # dP = dO V^T, dS = P * (dP - D)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_Q, BLOCK_K)
        ds = p * (dp - delta[:, None])
        # dQ += dS K (times the scale, applied once at the end)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    stride_qb, stride_qh, stride_qi,
    stride_kb, stride_kh, stride_kj,
    stride_vb, stride_vh, stride_vj,
    stride_dob, stride_doh, stride_doi,
    stride_dqb, stride_dqh, stride_dqi,
    g, i, j, scale, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    CAUSAL: tl.constexpr, TMA: tl.constexpr = False,
):
    """dQ for one tile of queries: grid (n_q_tiles, h, b)."""
    # -- setup: as in the forward, the longest rows first
    tile = tl.program_id(0)
    if CAUSAL:
        tile = tl.num_programs(0) - 1 - tile
    head = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    kv_head = head // g
    start_q = tile * BLOCK_Q
    offs_q = start_q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    k_src = matrix(k_ptr + batch * stride_kb + kv_head * stride_kh, j, stride_kj, BLOCK_K, D, TMA)
    v_src = matrix(v_ptr + batch * stride_vb + kv_head * stride_vh, j, stride_vj, BLOCK_K, DV, TMA)
    diag_offset = j - i

    # -- load Q_r, dO_r, lse_r and D_r once
    rows = offs_q < i
    q = load_tile(matrix(q_ptr + batch * stride_qb + head * stride_qh, i, stride_qi, BLOCK_Q, D, TMA),
                  start_q, stride_qi, BLOCK_Q, offs_d, mask=rows[:, None], TMA=TMA)
    do = load_tile(matrix(do_ptr + batch * stride_dob + head * stride_doh, i, stride_doi, BLOCK_Q, DV, TMA),
                   start_q, stride_doi, BLOCK_Q, offs_dv, mask=rows[:, None], TMA=TMA)
    head_rows = (batch * tl.num_programs(1) + head) * i  # where this head's lse and delta start
    lse2 = load_lse2(lse_ptr + head_rows, offs_q, rows)
    delta = tl.load(delta_ptr + head_rows + offs_q, mask=rows, other=0.0)
    dq = tl.zeros([BLOCK_Q, D], dtype=tl.float32)

    # -- the same two stages as the forward
    mid, hi = key_range(start_q, j, diag_offset, BLOCK_Q, BLOCK_K, CAUSAL)
    dq = dq_stage(dq, q, do, lse2, delta, k_src, v_src, stride_kj, stride_vj, offs_q, offs_d, offs_dv,
                   0, mid, j, diag_offset, qk_scale, BLOCK_K, False, CAUSAL, TMA)
    dq = dq_stage(dq, q, do, lse2, delta, k_src, v_src, stride_kj, stride_vj, offs_q, offs_d, offs_dv,
                   mid, hi, j, diag_offset, qk_scale, BLOCK_K, True, CAUSAL, TMA)

    # -- epilogue
    dq = dq * scale
    store_tile(matrix(dq_ptr + batch * stride_dqb + head * stride_dqh, i, stride_dqi, BLOCK_Q, D, TMA),
               start_q, stride_dqi, BLOCK_Q, offs_d, dq, mask=rows[:, None], TMA=TMA)
