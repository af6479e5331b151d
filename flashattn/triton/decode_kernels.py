"""Split-KV decoding (flash-decoding) as two Triton kernels: attend one chunk of the cache, then merge.

In decoding, a few new queries attend a long KV cache. FlashAttention-2's
grid (query tiles x heads x batch) then has a handful of programs, each
streaming the whole cache, while most of the GPU's SMs idle. Here the keys
of each sequence are split into ``num_splits`` chunks, and each chunk gets a
program of its own: grid (num_splits, h_kv x row tiles, b). A program
attends its chunk as the forward kernel does (online softmax in base 2) and
writes a partial output and its log-sum-exp; the merge kernel then combines
the chunks of each query row through their log-sum-exp, the merge of
``flashattn.merge_partials``.

Grouped-query attention: the ``g`` query heads that share one K/V head are
stacked into the rows of one tile, ``g * i`` rows for ``i`` queries, so each
K/V head is read once for its whole group. Row ``m`` of K/V head ``kv`` is
query ``r = m % i`` of query head ``kv * g + m // i``.

Layouts: ``q`` (b, h, i, D), ``k`` (b, h_kv, j, D), ``v`` (b, h_kv, j, DV),
any strides with the last one 1; ``lens`` (b,) integers; the partial results
``o_part`` (b, h, i, num_splits, DV) and ``lse_part`` (b, h, i, num_splits)
float32, contiguous; with one chunk, ``o_part`` is the output, in the
inputs' dtype, and the merge is skipped. ``D`` and ``DV`` are powers of two from 16.

The rule: query ``r`` of sequence ``n`` sees key ``c`` when
``c <= lens[n] - i + r``; keys at or past ``lens[n]`` are never loaded, so
whatever the cache holds there (NaN included) cannot reach the result. A
length outside ``[0, j]`` is an error that the kernel reports without making
the host wait: every output row of that sequence is NaN.
"""

import triton
import triton.language as tl

from .kernels import DOT_PRECISION, LN2


@triton.jit
def chunk_stage(
    acc, m, l, q,
    k_base, v_base, stride_kj, stride_vj,
    offs_d, offs_dv, last_key,
    lo, hi, qk_scale,
    BLOCK_K: tl.constexpr,
):
    """The inner loop of the chunk kernel: key tiles ``lo`` to ``hi`` into the online softmax of the stacked rows.

    Keys at or past ``hi`` are never loaded; row ``r`` keeps key ``c`` when
    ``c <= last_key[r]``. It computes what ``kernels.fwd_stage`` computes with
    ``hi`` as the number of keys and ``last_key - r`` as the diagonal's
    offset, and is written out on its own because that shared loop, compiled
    here for sm80 with bfloat16 and d = 256, spills 440 bytes of registers
    (triton 3.9; tests/test_compile_sm80.py), where this one spills none.
    """
    for start_k in range(lo, hi, BLOCK_K):
        offs_k = start_k + tl.arange(0, BLOCK_K)
        in_chunk = offs_k < hi
        k_ptrs = k_base + offs_k.to(tl.int64)[:, None] * stride_kj + offs_d[None, :]
        k = tl.load(k_ptrs, mask=in_chunk[:, None], other=0.0)  # (BLOCK_K, D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_K)
        keep = in_chunk[None, :] & (offs_k[None, :] <= last_key[:, None])
        s = tl.where(keep, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        # a row with nothing kept so far has m_new = -inf; shifting it by 0 keeps its p at 0, not NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m - m_shift)
        l = l * alpha + tl.sum(p, 1)
        v_ptrs = v_base + offs_k.to(tl.int64)[:, None] * stride_vj + offs_dv[None, :]
        v = tl.load(v_ptrs, mask=in_chunk[:, None], other=0.0)  # (BLOCK_K, DV)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m = m_new
    return acc, m, l


@triton.jit
def decode_split_kernel(
    q_ptr, k_ptr, v_ptr, lens_ptr, o_part_ptr, lse_part_ptr,
    stride_qb, stride_qh, stride_qi,
    stride_kb, stride_kh, stride_kj,
    stride_vb, stride_vh, stride_vj,
    h, g, i, j, num_splits, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_LENS: tl.constexpr,
):
    """One chunk of the cache against one tile of stacked query rows: grid (num_splits, h_kv * row tiles, b)."""
    # -- setup: which chunk, which K/V head and rows, which sequence
    split = tl.program_id(0)
    row_tiles = tl.cdiv(g * i, BLOCK_M)
    kv_head = (tl.program_id(1) // row_tiles).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    rows = (tl.program_id(1) % row_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < g * i
    head = kv_head * g + rows // i  # (BLOCK_M,) the query head of each row
    r = rows % i  # (BLOCK_M,) its query index
    if HAS_LENS:
        # the range check runs here, not on the host (which would wait for the GPU): a length outside
        # [0, j] makes its sequence's output NaN, and is clamped so that no load leaves the cache
        given = tl.load(lens_ptr + batch).to(tl.int64)
        out_of_range = (given < 0) | (given > j)
        length = tl.minimum(tl.maximum(given, 0), j).to(tl.int32)
    else:
        out_of_range = False
        length = j

    # -- the chunk: the valid keys cut into num_splits runs of whole key tiles
    tiles_per_split = tl.cdiv(tl.cdiv(length, BLOCK_K), num_splits)
    lo = split * tiles_per_split * BLOCK_K
    hi = tl.minimum(lo + tiles_per_split * BLOCK_K, length)
    last_key = length - i + r  # (BLOCK_M,) the last key each row may see

    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    q_rows = q_ptr + batch * stride_qb + head * stride_qh + r.to(tl.int64) * stride_qi  # (BLOCK_M,)
    q = tl.load(q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh

    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row maximum (base 2)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(s - m)
    acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)  # running, unnormalised P V

    # -- the online softmax over the chunk's key tiles
    acc, m, l = chunk_stage(acc, m, l, q, k_base, v_base, stride_kj, stride_vj, offs_d, offs_dv, last_key,
                            lo, hi, qk_scale, BLOCK_K)

    # -- the chunk's normalised output and log-sum-exp (natural units); an empty one gives 0 and -inf
    has_key = l > 0
    o = acc / tl.where(has_key, l, 1.0)[:, None]
    lse = tl.where(has_key, (m + tl.math.log2(tl.where(has_key, l, 1.0))) * LN2, float("-inf"))
    o = tl.where(out_of_range, float("nan"), o)  # NaN partial results merge to NaN
    lse = tl.where(out_of_range, float("nan"), lse)
    part_row = (batch * h + head) * i + r  # (BLOCK_M,) the row of (b, h, i)
    tl.store(lse_part_ptr + part_row * num_splits + split, lse, mask=row_ok)
    o_ptrs = o_part_ptr + (part_row * num_splits + split)[:, None] * DV + offs_dv[None, :]
    # with one chunk, o_part is the output itself, in the inputs' dtype, and no merge follows
    tl.store(o_ptrs, o.to(o_part_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def decode_merge_kernel(
    o_part_ptr, lse_part_ptr, o_ptr,
    stride_ob, stride_oh, stride_oi,
    h, i, num_splits,
    DV: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Merge the chunks of one query row through their log-sum-exp: grid (b * h * i,)."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, DV)
    in_range = offs_s < num_splits
    lse = tl.load(lse_part_ptr + row * num_splits + offs_s, mask=in_range, other=float("-inf"))  # (BLOCK_S,)
    lse_max = tl.max(lse, 0)
    # every chunk empty (a query with no key): shift by 0, so that every weight is 0 and o is 0
    shift = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weight = tl.exp(lse - shift)  # (BLOCK_S,) e^{lse_s - lse_max}, 0 for an empty chunk
    total = tl.sum(weight, 0)
    parts = tl.load(o_part_ptr + (row * num_splits + offs_s)[:, None] * DV + offs_dv[None, :],
                    mask=in_range[:, None], other=0.0)  # (BLOCK_S, DV)
    o = tl.sum(weight[:, None] * parts, 0) / tl.where(total > 0, total, 1.0)  # (DV,)
    batch = row // (h * i)
    head = (row // i) % h
    r = row % i
    tl.store(o_ptr + batch * stride_ob + head * stride_oh + r * stride_oi + offs_dv, o.to(o_ptr.dtype.element_ty))
