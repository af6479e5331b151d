"""The Hopper variants that no launch of the package uses, kept to re-run their measurements (tune_hopper.py).

``flashattn.triton.kernels`` with ``TMA=True`` is what ``triton_attention``
launches on Hopper. These kernels are that algorithm with its tiles moved by
TMA and one change each, measured in ``flashattn/results/hopper-steps-h200.json``
and discussed in chapter 10; none was faster where it mattered:

- **Warp specialisation.** With ``WARP_SPECIALIZE``, the key (or query)
  loop is a ``tl.range(..., warp_specialize=True)``: the compiler gives the
  TMA copies of the coming tiles to a producer warp, and the products and
  the softmax to consumer warps, which wait on barriers in shared memory
  instead of issuing loads themselves.
- **The next tile's scores first** (``OVERLAP``, forward only): ``S = Q K^T``
  of the next key tile issued before the exponentials of the current one.
- **A fused backward** (``attn_bwd_fused_kernel``): dK, dV and dQ in one pass
  over each key tile, dQ added in float32 with atomic additions. It does five
  products per tile pair where the two passes do seven, at the price of the
  atomics and of a result that may differ in the last bits from one run to
  the next.

Grids, layouts and arguments are those of the package's kernels, and
``forward``, ``backward_dkdv``, ``backward_dq`` and ``backward_fused`` launch
them as ``flashattn.triton.hopper`` launches its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from flashattn.triton.hopper import use_torch_allocator
from flashattn.triton.kernels import LN2, key_range, load_lse2
from flashattn.triton.runtime import is_interpreted, launch


@dataclass(frozen=True)
class VariantLaunch:
    """How one variant is launched: tiles, warps, pipeline stages, warp-specialised loop, next scores first."""

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int
    warp_specialize: bool
    overlap: bool = False  # forward only: the next tile's scores computed before this tile's exponentials


@triton.jit
def tma_descriptor(base, n, stride, BLOCK: tl.constexpr, COLS: tl.constexpr):
    """A TMA descriptor of the ``(n, COLS)`` matrix at ``base`` with row ``stride``, in tiles of ``BLOCK`` rows."""
    return tl.make_tensor_descriptor(base, shape=[n, COLS], strides=[stride, 1], block_shape=[BLOCK, COLS])


@triton.jit
def fwd_stage_tma(
    acc, m, l, q,
    k_desc, v_desc,
    offs_q,
    lo, hi, j, diag_offset, qk_scale,
    BLOCK_K: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """``kernels.fwd_stage`` (TMA), maybe warp-specialised: keys ``lo`` to ``hi``, one query tile."""
    for start_k in tl.range(lo, hi, BLOCK_K, warp_specialize=WARP_SPECIALIZE):
        offs_k = start_k + tl.arange(0, BLOCK_K)
        k = k_desc.load([start_k, 0])  # rows past j arrive as zeros, and are masked below
        qk = tl.dot(q, tl.trans(k))
        if MASKED:
            keep = (offs_k < j)[None, :]
            if CAUSAL:
                keep = keep & (offs_k[None, :] <= offs_q[:, None] + diag_offset)
            s = tl.where(keep, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_shift[:, None])
        else:
            m_new = tl.maximum(m, tl.max(qk, 1) * qk_scale)
            m_shift = m_new
            p = tl.math.exp2(qk * qk_scale - m_shift[:, None])
        alpha = tl.math.exp2(m - m_shift)
        l = l * alpha + tl.sum(p, 1)
        v = v_desc.load([start_k, 0])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m = m_new
    return acc, m, l


@triton.jit
def softmax_step(acc, m, l, qk, v, qk_scale):
    """One unmasked key tile into the online softmax: the body of ``fwd_stage_tma`` with ``MASKED=False``."""
    m_new = tl.maximum(m, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m - m_new)
    l = l * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l


@triton.jit
def fwd_stage_overlapped(acc, m, l, q, k_desc, v_desc, lo, hi, qk_scale, BLOCK_K: tl.constexpr):
    """The unmasked key tiles ``lo`` to ``hi``, with the scores of each tile computed one step early.

    The product ``S = Q K^T`` of the next tile is issued before the
    exponentials of the current one, so that the tensor cores can work on it
    while the exponentials run: the overlap that FlashAttention-3 arranges
    within a warpgroup.
    """
    if hi > lo:
        qk = tl.dot(q, tl.trans(k_desc.load([lo, 0])))
        for start_k in tl.range(lo + BLOCK_K, hi, BLOCK_K):
            qk_next = tl.dot(q, tl.trans(k_desc.load([start_k, 0])))
            acc, m, l = softmax_step(acc, m, l, qk, v_desc.load([start_k - BLOCK_K, 0]), qk_scale)
            qk = qk_next
        acc, m, l = softmax_step(acc, m, l, qk, v_desc.load([hi - BLOCK_K, 0]), qk_scale)
    return acc, m, l


@triton.jit
def attn_fwd_tma_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qi,
    stride_kb, stride_kh, stride_kj,
    stride_vb, stride_vh, stride_vj,
    stride_ob, stride_oh, stride_oi,
    g, i, j, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    CAUSAL: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, OVERLAP: tl.constexpr = False,
):
    """O and lse for one tile of queries, as ``kernels.attn_fwd_kernel``: grid (n_q_tiles, h, b)."""
    tile = tl.program_id(0)
    if CAUSAL:
        tile = tl.num_programs(0) - 1 - tile
    head = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    kv_head = head // g
    start_q = tile * BLOCK_Q
    offs_q = start_q + tl.arange(0, BLOCK_Q)
    diag_offset = j - i

    # -- one descriptor per matrix of this (batch, head): rows past its end read as zero, and are not written
    q_desc = tma_descriptor(q_ptr + batch * stride_qb + head * stride_qh, i, stride_qi, BLOCK_Q, D)
    k_desc = tma_descriptor(k_ptr + batch * stride_kb + kv_head * stride_kh, j, stride_kj, BLOCK_K, D)
    v_desc = tma_descriptor(v_ptr + batch * stride_vb + kv_head * stride_vh, j, stride_vj, BLOCK_K, DV)
    o_desc = tma_descriptor(o_ptr + batch * stride_ob + head * stride_oh, i, stride_oi, BLOCK_Q, DV)

    q = q_desc.load([start_q, 0])
    m = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, DV], dtype=tl.float32)

    mid, hi = key_range(start_q, j, diag_offset, BLOCK_Q, BLOCK_K, CAUSAL)
    if OVERLAP:
        acc, m, l = fwd_stage_overlapped(acc, m, l, q, k_desc, v_desc, 0, mid, qk_scale, BLOCK_K)
    else:
        acc, m, l = fwd_stage_tma(acc, m, l, q, k_desc, v_desc, offs_q,
                                   0, mid, j, diag_offset, qk_scale, BLOCK_K, False, CAUSAL, WARP_SPECIALIZE)
    acc, m, l = fwd_stage_tma(acc, m, l, q, k_desc, v_desc, offs_q,
                               mid, hi, j, diag_offset, qk_scale, BLOCK_K, True, CAUSAL, WARP_SPECIALIZE)

    l = tl.where(l == 0.0, 1.0, l)
    o = acc / l[:, None]
    lse = (m + tl.math.log2(l)) * LN2
    o_desc.store([start_q, 0], o.to(o_ptr.dtype.element_ty))
    tl.store(lse_ptr + (batch * tl.num_programs(1) + head) * i + offs_q, lse, mask=offs_q < i)


@triton.jit
def dkdv_stage_tma(
    dk, dv, k, v,
    q_desc, do_desc, lse_base, delta_base,
    offs_k,
    lo, hi, i, diag_offset, qk_scale,
    BLOCK_Q: tl.constexpr, MASKED: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """``kernels.dkdv_stage`` (TMA), maybe warp-specialised: queries ``lo`` to ``hi``, one key tile."""
    for start_q in tl.range(lo, hi, BLOCK_Q, warp_specialize=WARP_SPECIALIZE):
        offs_q = start_q + tl.arange(0, BLOCK_Q)
        rows = offs_q < i
        q = q_desc.load([start_q, 0])
        lse2 = load_lse2(lse_base, offs_q, rows)
        qk_t = tl.dot(k, tl.trans(q))
        p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
        if MASKED:
            p_t = tl.where(offs_k[:, None] <= offs_q[None, :] + diag_offset, p_t, 0.0)
        do = do_desc.load([start_q, 0])
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        delta = tl.load(delta_base + offs_q, mask=rows, other=0.0)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def dkdv_range(start_k, i, diag_offset, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, CAUSAL: tl.constexpr):
    """The query tiles of one key tile, as ``kernels.attn_bwd_dkdv_kernel``: none before lo, masked to mid."""
    if CAUSAL:
        lo = tl.maximum(start_k - diag_offset, 0) // BLOCK_Q * BLOCK_Q
        mid = tl.minimum(tl.cdiv(tl.maximum(start_k + BLOCK_K - 1 - diag_offset, 0), BLOCK_Q) * BLOCK_Q, i)
    else:
        lo = 0
        mid = 0
    return lo, mid


@triton.jit
def attn_bwd_dkdv_tma_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_qi,
    stride_kb, stride_kh, stride_kj,
    stride_vb, stride_vh, stride_vj,
    stride_dob, stride_doh, stride_doi,
    stride_dkb, stride_dkh, stride_dkj,
    stride_dvb, stride_dvh, stride_dvj,
    h, g, i, j, scale, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    CAUSAL: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """dK and dV for one tile of keys, as ``kernels.attn_bwd_dkdv_kernel``: grid (n_k_tiles, h_kv, b)."""
    kv_head = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    start_k = tl.program_id(0) * BLOCK_K
    offs_k = start_k + tl.arange(0, BLOCK_K)
    diag_offset = j - i

    k = tma_descriptor(k_ptr + batch * stride_kb + kv_head * stride_kh, j, stride_kj, BLOCK_K, D).load([start_k, 0])
    v = tma_descriptor(v_ptr + batch * stride_vb + kv_head * stride_vh, j, stride_vj, BLOCK_K, DV).load([start_k, 0])
    dk = tl.zeros([BLOCK_K, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_K, DV], dtype=tl.float32)
    lo, mid = dkdv_range(start_k, i, diag_offset, BLOCK_Q, BLOCK_K, CAUSAL)

    for head in range(kv_head * g, kv_head * g + g):
        q_desc = tma_descriptor(q_ptr + batch * stride_qb + head * stride_qh, i, stride_qi, BLOCK_Q, D)
        do_desc = tma_descriptor(do_ptr + batch * stride_dob + head * stride_doh, i, stride_doi, BLOCK_Q, DV)
        lse_base = lse_ptr + (batch * h + head) * i
        delta_base = delta_ptr + (batch * h + head) * i
        dk, dv = dkdv_stage_tma(dk, dv, k, v, q_desc, do_desc, lse_base, delta_base, offs_k,
                                 lo, mid, i, diag_offset, qk_scale, BLOCK_Q, True, WARP_SPECIALIZE)
        dk, dv = dkdv_stage_tma(dk, dv, k, v, q_desc, do_desc, lse_base, delta_base, offs_k,
                                 mid, i, i, diag_offset, qk_scale, BLOCK_Q, False, WARP_SPECIALIZE)

    dk = dk * scale
    tma_descriptor(dk_ptr + batch * stride_dkb + kv_head * stride_dkh, j, stride_dkj, BLOCK_K, D).store(
        [start_k, 0], dk.to(dk_ptr.dtype.element_ty))
    tma_descriptor(dv_ptr + batch * stride_dvb + kv_head * stride_dvh, j, stride_dvj, BLOCK_K, DV).store(
        [start_k, 0], dv.to(dv_ptr.dtype.element_ty))


@triton.jit
def dq_stage_tma(
    dq, q, do, lse2, delta,
    k_desc, v_desc,
    offs_q,
    lo, hi, j, diag_offset, qk_scale,
    BLOCK_K: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """``kernels.dq_stage`` (TMA), maybe warp-specialised: keys ``lo`` to ``hi``, one query tile."""
    for start_k in tl.range(lo, hi, BLOCK_K, warp_specialize=WARP_SPECIALIZE):
        offs_k = start_k + tl.arange(0, BLOCK_K)
        k = k_desc.load([start_k, 0])
        v = v_desc.load([start_k, 0])
        qk = tl.dot(q, tl.trans(k))
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
            keep = (offs_k < j)[None, :]
            if CAUSAL:
                keep = keep & (offs_k[None, :] <= offs_q[:, None] + diag_offset)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def attn_bwd_dq_tma_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    stride_qb, stride_qh, stride_qi,
    stride_kb, stride_kh, stride_kj,
    stride_vb, stride_vh, stride_vj,
    stride_dob, stride_doh, stride_doi,
    stride_dqb, stride_dqh, stride_dqi,
    g, i, j, scale, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    CAUSAL: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """dQ for one tile of queries, as ``kernels.attn_bwd_dq_kernel``: grid (n_q_tiles, h, b)."""
    tile = tl.program_id(0)
    if CAUSAL:
        tile = tl.num_programs(0) - 1 - tile
    head = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    kv_head = head // g
    start_q = tile * BLOCK_Q
    offs_q = start_q + tl.arange(0, BLOCK_Q)
    diag_offset = j - i

    rows = offs_q < i
    q = tma_descriptor(q_ptr + batch * stride_qb + head * stride_qh, i, stride_qi, BLOCK_Q, D).load([start_q, 0])
    do = tma_descriptor(do_ptr + batch * stride_dob + head * stride_doh, i, stride_doi, BLOCK_Q, DV).load([start_q, 0])
    head_rows = (batch * tl.num_programs(1) + head) * i
    lse2 = load_lse2(lse_ptr + head_rows, offs_q, rows)
    delta = tl.load(delta_ptr + head_rows + offs_q, mask=rows, other=0.0)
    k_desc = tma_descriptor(k_ptr + batch * stride_kb + kv_head * stride_kh, j, stride_kj, BLOCK_K, D)
    v_desc = tma_descriptor(v_ptr + batch * stride_vb + kv_head * stride_vh, j, stride_vj, BLOCK_K, DV)
    dq = tl.zeros([BLOCK_Q, D], dtype=tl.float32)

    mid, hi = key_range(start_q, j, diag_offset, BLOCK_Q, BLOCK_K, CAUSAL)
    dq = dq_stage_tma(dq, q, do, lse2, delta, k_desc, v_desc, offs_q,
                       0, mid, j, diag_offset, qk_scale, BLOCK_K, False, CAUSAL, WARP_SPECIALIZE)
    dq = dq_stage_tma(dq, q, do, lse2, delta, k_desc, v_desc, offs_q,
                       mid, hi, j, diag_offset, qk_scale, BLOCK_K, True, CAUSAL, WARP_SPECIALIZE)

    dq = dq * scale
    tma_descriptor(dq_ptr + batch * stride_dqb + head * stride_dqh, i, stride_dqi, BLOCK_Q, D).store(
        [start_q, 0], dq.to(dq_ptr.dtype.element_ty))


@triton.jit
def fused_bwd_stage(
    dk, dv, k, v,
    q_desc, do_desc, lse_base, delta_base, dq_base,
    offs_k, offs_d,
    lo, hi, i, diag_offset, qk_scale,
    D: tl.constexpr, BLOCK_Q: tl.constexpr, MASKED: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """``dkdv_stage_tma`` plus dQ: each query tile's share ``dS K`` is added to the float32 ``dq`` at ``dq_base``."""
    for start_q in tl.range(lo, hi, BLOCK_Q, warp_specialize=WARP_SPECIALIZE):
        offs_q = start_q + tl.arange(0, BLOCK_Q)
        rows = offs_q < i
        q = q_desc.load([start_q, 0])
        lse2 = load_lse2(lse_base, offs_q, rows)
        qk_t = tl.dot(k, tl.trans(q))
        p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
        if MASKED:
            p_t = tl.where(offs_k[:, None] <= offs_q[None, :] + diag_offset, p_t, 0.0)
        do = do_desc.load([start_q, 0])
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        delta = tl.load(delta_base + offs_q, mask=rows, other=0.0)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk)
        # dQ_r += dS_rc K_c: this key tile's share, added to what the other key tiles' programs add
        dq_share = tl.dot(tl.trans(ds_t), k)  # (BLOCK_Q, D), unscaled
        dq_ptrs = dq_base + offs_q[:, None] * D + offs_d[None, :]
        tl.atomic_add(dq_ptrs, dq_share, mask=rows[:, None], sem="relaxed")
    return dk, dv


@triton.jit
def attn_bwd_fused_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_ptr,
    stride_qb, stride_qh, stride_qi,
    stride_kb, stride_kh, stride_kj,
    stride_vb, stride_vh, stride_vj,
    stride_dob, stride_doh, stride_doi,
    stride_dkb, stride_dkh, stride_dkj,
    stride_dvb, stride_dvh, stride_dvj,
    h, g, i, j, scale, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    CAUSAL: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """dK, dV for one tile of keys and its share of dQ: grid (n_k_tiles, h_kv, b).

    ``dq_ptr`` is a zeroed float32 ``(b, h, i, D)`` buffer, contiguous, that
    collects ``dS K`` unscaled; the caller scales it and casts it.
    """
    kv_head = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    start_k = tl.program_id(0) * BLOCK_K
    offs_k = start_k + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, D)
    diag_offset = j - i

    k = tma_descriptor(k_ptr + batch * stride_kb + kv_head * stride_kh, j, stride_kj, BLOCK_K, D).load([start_k, 0])
    v = tma_descriptor(v_ptr + batch * stride_vb + kv_head * stride_vh, j, stride_vj, BLOCK_K, DV).load([start_k, 0])
    dk = tl.zeros([BLOCK_K, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_K, DV], dtype=tl.float32)
    lo, mid = dkdv_range(start_k, i, diag_offset, BLOCK_Q, BLOCK_K, CAUSAL)

    for head in range(kv_head * g, kv_head * g + g):
        q_desc = tma_descriptor(q_ptr + batch * stride_qb + head * stride_qh, i, stride_qi, BLOCK_Q, D)
        do_desc = tma_descriptor(do_ptr + batch * stride_dob + head * stride_doh, i, stride_doi, BLOCK_Q, DV)
        lse_base = lse_ptr + (batch * h + head) * i
        delta_base = delta_ptr + (batch * h + head) * i
        dq_base = dq_ptr + (batch * h + head) * i * D
        dk, dv = fused_bwd_stage(dk, dv, k, v, q_desc, do_desc, lse_base, delta_base, dq_base, offs_k, offs_d,
                                  lo, mid, i, diag_offset, qk_scale, D, BLOCK_Q, True, WARP_SPECIALIZE)
        dk, dv = fused_bwd_stage(dk, dv, k, v, q_desc, do_desc, lse_base, delta_base, dq_base, offs_k, offs_d,
                                  mid, i, i, diag_offset, qk_scale, D, BLOCK_Q, False, WARP_SPECIALIZE)

    dk = dk * scale
    tma_descriptor(dk_ptr + batch * stride_dkb + kv_head * stride_dkh, j, stride_dkj, BLOCK_K, D).store(
        [start_k, 0], dk.to(dk_ptr.dtype.element_ty))
    tma_descriptor(dv_ptr + batch * stride_dvb + kv_head * stride_dvh, j, stride_dvj, BLOCK_K, DV).store(
        [start_k, 0], dv.to(dv_ptr.dtype.element_ty))


def _launch(kernel: object, grid: tuple[int, int, int], cfg: VariantLaunch, *args: object, **kwargs: object) -> None:
    if not is_interpreted(kernel):  # the interpreter keeps its descriptors in host memory
        use_torch_allocator()
    launch(kernel, grid, *args, **kwargs, BLOCK_Q=cfg.block_q, BLOCK_K=cfg.block_k,
           WARP_SPECIALIZE=cfg.warp_specialize, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, cfg: VariantLaunch) -> tuple[Tensor, Tensor]:
    """The forward variant: ``o`` (b, h, i, d_v) and ``lse`` (b, h, i) float32."""
    b, h, i, d = q.shape
    h_kv, j, d_v = k.shape[1], k.shape[2], v.shape[3]
    o = q.new_empty(b, h, i, d_v)
    lse = q.new_empty(b, h, i, dtype=torch.float32)
    _launch(attn_fwd_tma_kernel, (math.ceil(i / cfg.block_q), h, b), cfg,
            q, k, v, o, lse,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            h // h_kv, i, j, scale * math.log2(math.e),
            D=d, DV=d_v, CAUSAL=causal, OVERLAP=cfg.overlap)
    return o, lse


def backward_dkdv(
    q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor, causal: bool, scale: float,
    cfg: VariantLaunch,
) -> tuple[Tensor, Tensor]:
    """The dK/dV pass: ``dk`` (b, h_kv, j, d) and ``dv`` (b, h_kv, j, d_v)."""
    b, h, i, d = q.shape
    h_kv, j, d_v = k.shape[1], k.shape[2], v.shape[3]
    dk, dv = k.new_empty(k.shape), v.new_empty(v.shape)
    _launch(attn_bwd_dkdv_tma_kernel, (math.ceil(j / cfg.block_k), h_kv, b), cfg,
            q, k, v, do, lse, delta, dk, dv,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
            h, h // h_kv, i, j, scale, scale * math.log2(math.e),
            D=d, DV=d_v, CAUSAL=causal)
    return dk, dv


def backward_dq(
    q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor, causal: bool, scale: float,
    cfg: VariantLaunch,
) -> Tensor:
    """The dQ pass: ``dq`` (b, h, i, d)."""
    b, h, i, d = q.shape
    h_kv, j, d_v = k.shape[1], k.shape[2], v.shape[3]
    dq = q.new_empty(q.shape)
    _launch(attn_bwd_dq_tma_kernel, (math.ceil(i / cfg.block_q), h, b), cfg,
            q, k, v, do, lse, delta, dq,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
            h // h_kv, i, j, scale, scale * math.log2(math.e),
            D=d, DV=d_v, CAUSAL=causal)
    return dq


def backward_fused(
    q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor, causal: bool, scale: float,
    cfg: VariantLaunch,
) -> tuple[Tensor, Tensor, Tensor]:
    """dK, dV and dQ in one pass over the key tiles, dQ summed in float32 by atomic additions: (dq, dk, dv)."""
    b, h, i, d = q.shape
    h_kv, j, d_v = k.shape[1], k.shape[2], v.shape[3]
    dk, dv = k.new_empty(k.shape), v.new_empty(v.shape)
    dq = torch.zeros(b, h, i, d, dtype=torch.float32, device=q.device)
    _launch(attn_bwd_fused_kernel, (math.ceil(j / cfg.block_k), h_kv, b), cfg,
            q, k, v, do, lse, delta, dk, dv, dq,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
            h, h // h_kv, i, j, scale, scale * math.log2(math.e),
            D=d, DV=d_v, CAUSAL=causal)
    return (dq * scale).to(q.dtype), dk, dv
