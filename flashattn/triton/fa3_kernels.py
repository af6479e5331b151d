"""FlashAttention-3's forward on Hopper, in Gluon: a producer warp feeds consumer warpgroups.

The kernel splits one program's warps by job, as FlashAttention-3 does
(Shah et al. 2024, section 3.1):

- the **producer**, one warp, asks the Tensor Memory Accelerator (TMA) for
  the program's Q tiles once and then for each K and V tile, into a ring of
  ``STAGES`` shared-memory slots; it waits for a slot to be free before it
  refills it;
- each **consumer**, a warpgroup (four warps) with ``BLOCK_M`` query rows of
  its own, computes S = Q K^T with a warpgroup matrix product (WGMMA), the
  online softmax in registers, and O += P V with a second WGMMA whose left
  operand, P, never leaves the registers; then it frees the slot.

The steps toward FlashAttention-3's schedule are constexpr choices:

(a) ``CONSUMERS=1, SCHEDULE_SERIAL``: the loads leave the consumer's
    instruction stream; each product is waited for before the next step;
(b) ``CONSUMERS=2``: two warpgroups share every K/V tile, so that one's
    exponentials can run while the other's WGMMA does, as the warp
    schedulers interleave them;
(c) ``SCHEDULE_OVERLAP``: within a warpgroup, tile t's S = Q K^T is issued
    with tile t-1's O += P V, and tile t's softmax runs while the second
    product does (FlashAttention-3, section 3.2);
(d) ``SCHEDULE_PINGPONG`` with two consumers: after issuing its products a
    warpgroup hands the tensor cores to the other, through a pair of
    mbarriers, so that their softmaxes alternate with each other's products
    (section 3.1).

They talk through mbarriers, one per slot and direction: ``k_ready`` and
``v_ready`` complete when the TMA has written the slot's bytes,
``kv_free`` when every consumer has read them (it counts ``CONSUMERS``
arrivals). An mbarrier counts phases; waiting for parity ``p`` returns once
the phase of that parity has completed, and a new barrier counts as having
completed the phase before its first, which is why the producer's first
pass waits for parity 1 and finds every slot free.

Layouts are those of ``kernels.py``: q, o (b, h, i, d), k, v (b, h_kv, j, d),
any strides that a TMA descriptor accepts (base and every stride but the
last multiples of 16 bytes, last stride 1); lse (b, h, i) float32, natural
units; query head ``head`` reads key/value head ``head // g``. The
descriptors are four-dimensional with boxes of (1, 1, rows, d), so a tile
never reaches into the next head: rows past ``i`` or ``j`` arrive as zeros.
Scores are base 2 (``qk_scale = scale * log2(e)``). The causal rule is the
bottom-right one (key ``c`` visible to query ``r`` when ``c <= r + j - i``);
a row that sees no key gets o = 0 and lse = -inf, as in the Triton kernels.
Only the key tiles that cross ``j`` or the diagonal are masked.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

LN2 = gl.constexpr(0.6931471805599453)  # ln(2): log(x) == log2(x) * LN2
CONSUMER_WARPS = gl.constexpr(4)  # one warpgroup: a WGMMA is issued by four warps together
# how a consumer orders one key tile's work (fa3_consume)
SCHEDULE_SERIAL = gl.constexpr(0)
SCHEDULE_OVERLAP = gl.constexpr(1)
SCHEDULE_PINGPONG = gl.constexpr(2)
# a TMA load into shared memory: named async_copy_global_to_shared up to triton 3.6, async_load after
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@gluon.jit
def fa3_load(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_free,
             batch, head, kv_head, start_m, n_tiles, STAGES: gl.constexpr):
    """The producer: each consumer's Q tile once, then K and V tile by tile into the ring of slots."""
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[2]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
    CONSUMERS: gl.constexpr = q_smem.shape[0]
    mbarrier.expect(q_bar, CONSUMERS * q_desc.block_type.nbytes)
    for c in gl.static_range(CONSUMERS):
        tma_load(q_desc, [batch, head, start_m + c * BLOCK_M, 0], q_bar, q_smem.index(c))
    for t in range(n_tiles):
        slot = t % STAGES
        # every consumer frees slot `slot` once per pass through the ring; pass 0 finds it free
        mbarrier.wait(kv_free.index(slot), ((t // STAGES) & 1) ^ 1)
        mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
        tma_load(k_desc, [batch, kv_head, t * BLOCK_N, 0], k_ready.index(slot), k_smem.index(slot))
        mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
        tma_load(v_desc, [batch, kv_head, t * BLOCK_N, 0], v_ready.index(slot), v_smem.index(slot))


@gluon.jit
def masked_scores(qk, t, first_row, rows, j, diag_offset, qk_scale, col_layout: gl.constexpr,
                  BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """Key tile ``t``'s scores in base 2: -inf where the key is past ``j`` or, causal, right of the diagonal.

    Only a tile that reaches past ``j``, or past the diagonal of the
    warpgroup's first row ``first_row``, is masked: the others are every
    tile but the last few, and their scores skip the comparisons.
    """
    last_key = t * BLOCK_N + BLOCK_N - 1
    crosses = last_key >= j
    if CAUSAL:
        crosses = crosses | (last_key > first_row + diag_offset)
    if crosses:
        cols = t * BLOCK_N + gl.arange(0, BLOCK_N, layout=col_layout)
        keep = gl.expand_dims(cols < j, 0)
        if CAUSAL:
            keep = keep & (gl.expand_dims(cols, 0) <= gl.expand_dims(rows + diag_offset, 1))
        s = gl.where(keep, qk * qk_scale, float("-inf"))
    else:
        s = qk * qk_scale
    return s


@gluon.jit
def softmax_step(s, m, l):
    """One key tile into the online softmax: its p, the factor alpha for what came before, the new m and l."""
    m_new = gl.maximum(m, gl.max(s, 1))
    # a row with nothing kept so far has m_new = -inf; shifting it by 0 keeps its p at 0, not NaN
    m_shift = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s - gl.expand_dims(m_shift, 1))
    alpha = gl.exp2(m - m_shift)
    return p, alpha, m_new, l * alpha + gl.sum(p, 1)


@gluon.jit
def wait_turn(turn, k, CONSUMER: gl.constexpr, PINGPONG: gl.constexpr):
    """Ping-pong: wait until the other warpgroup hands over the tensor cores for this one's ``k``-th issue.

    Warpgroup 0 goes first: its wait for parity 1 on a new barrier returns at once.
    """
    if PINGPONG:
        mbarrier.wait(turn.index(CONSUMER), (k & 1) ^ (1 - CONSUMER))


@gluon.jit
def pass_turn(turn, CONSUMER: gl.constexpr, PINGPONG: gl.constexpr):
    """Ping-pong: this warpgroup has issued its products; the other may issue its own."""
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - CONSUMER), count=1)


@gluon.jit
def fa3_consume(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_free, turn, o_ptr, lse_ptr,
                stride_ob, stride_oh, stride_oi, batch, head, h, i, j, start_m, n_tiles, qk_scale,
                CONSUMER: gl.constexpr, CAUSAL: gl.constexpr, STAGES: gl.constexpr, SCHEDULE: gl.constexpr):
    """Consumer warpgroup ``CONSUMER``: S = Q K^T, the online softmax, O += P V for its rows; then O and lse.

    ``start_m`` is the program's first row; this warpgroup's rows start
    ``CONSUMER * BLOCK_M`` after it. ``SCHEDULE`` orders the work of one
    key tile: ``SERIAL`` waits for each product before the next step;
    ``OVERLAP`` issues tile t's S = Q K^T and tile t-1's O += P V together
    and computes tile t's softmax while the second still runs (needs
    ``n_tiles >= 1``); ``PINGPONG`` adds, with two consumers, the handing
    over of the tensor cores between them after each issue.
    """
    BLOCK_M: gl.constexpr = q_smem.shape[3]
    D: gl.constexpr = q_smem.shape[4]
    BLOCK_N: gl.constexpr = k_smem.shape[3]
    DV: gl.constexpr = v_smem.shape[4]
    dtype: gl.constexpr = q_smem.dtype
    PINGPONG: gl.constexpr = SCHEDULE == SCHEDULE_PINGPONG
    # where each thread holds its part of a WGMMA's accumulator: instruction tiles of 16 rows by
    # all the columns, K = 16 for 16-bit inputs, the four warps stacked along the rows
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[CONSUMER_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[CONSUMER_WARPS, 1],
                                                       instr_shape=[16, DV, 16])
    # P as the left operand of the second product, straight from registers
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    o_rows_layout: gl.constexpr = gl.SliceLayout(1, o_layout)

    start_m = start_m + CONSUMER * BLOCK_M
    rows = start_m + gl.arange(0, BLOCK_M, layout=row_layout)
    m = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_layout)  # running row maximum (base 2)
    l = gl.zeros([BLOCK_M], gl.float32, layout=row_layout)  # running row sum of exp2(s - m)
    acc = gl.zeros([BLOCK_M, DV], gl.float32, layout=o_layout)  # running, unnormalised P V
    no_scores = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    q = q_smem.index(CONSUMER).reshape([BLOCK_M, D])
    diag_offset = j - i

    mbarrier.wait(q_bar, 0)
    if SCHEDULE == SCHEDULE_SERIAL:
        for t in range(n_tiles):
            slot = t % STAGES
            phase = (t // STAGES) & 1
            mbarrier.wait(k_ready.index(slot), phase)
            k_t = k_smem.index(slot).reshape([BLOCK_N, D]).permute((1, 0))  # K^T as a view: (D, BLOCK_N)
            qk = warpgroup_mma(q, k_t, no_scores, use_acc=False, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))
            s = masked_scores(qk, t, start_m, rows, j, diag_offset, qk_scale, col_layout, BLOCK_N, CAUSAL)
            p, alpha, m, l = softmax_step(s, m, l)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows_layout), 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            mbarrier.wait(v_ready.index(slot), phase)
            acc = warpgroup_mma(p_op, v_smem.index(slot).reshape([BLOCK_N, DV]), acc, is_async=True)
            # p_op stays a dependency: the product reads it from registers until it completes
            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
            mbarrier.arrive(kv_free.index(slot), count=1)  # both products have read the slot
    else:
        # tile 0: its scores and softmax; its P V joins tile 1's scores
        wait_turn(turn, 0, CONSUMER, PINGPONG)
        mbarrier.wait(k_ready.index(0), 0)
        k_t = k_smem.index(0).reshape([BLOCK_N, D]).permute((1, 0))
        qk = warpgroup_mma(q, k_t, no_scores, use_acc=False, is_async=True)
        pass_turn(turn, CONSUMER, PINGPONG)
        qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))
        s = masked_scores(qk, 0, start_m, rows, j, diag_offset, qk_scale, col_layout, BLOCK_N, CAUSAL)
        p, alpha, m, l = softmax_step(s, m, l)
        p_op = gl.convert_layout(p.to(dtype), p_layout)  # acc is zero: nothing to rescale yet
        for t in range(1, n_tiles):
            slot = t % STAGES
            prev = (t - 1) % STAGES
            wait_turn(turn, t, CONSUMER, PINGPONG)
            mbarrier.wait(k_ready.index(slot), (t // STAGES) & 1)
            k_t = k_smem.index(slot).reshape([BLOCK_N, D]).permute((1, 0))
            qk = warpgroup_mma(q, k_t, no_scores, use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(prev), ((t - 1) // STAGES) & 1)
            acc = warpgroup_mma(p_op, v_smem.index(prev).reshape([BLOCK_N, DV]), acc, is_async=True)
            pass_turn(turn, CONSUMER, PINGPONG)
            # products complete in the order they were issued: one left outstanding is tile t-1's P V
            qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk,))
            s = masked_scores(qk, t, start_m, rows, j, diag_offset, qk_scale, col_layout, BLOCK_N, CAUSAL)
            p, alpha, m, l = softmax_step(s, m, l)  # while tile t-1's P V runs
            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
            mbarrier.arrive(kv_free.index(prev), count=1)  # K_{t-1} and V_{t-1} are read
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows_layout), 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
        last = (n_tiles - 1) % STAGES
        wait_turn(turn, n_tiles, CONSUMER, PINGPONG)
        mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // STAGES) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(last).reshape([BLOCK_N, DV]), acc, is_async=True)
        pass_turn(turn, CONSUMER, PINGPONG)
        acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
        mbarrier.arrive(kv_free.index(last), count=1)

    # a row with no key has acc = 0 and m = -inf: dividing by 1 gives o = 0 and lse = -inf
    l = gl.where(l == 0.0, 1.0, l)
    lse = (m + gl.log2(l)) * LN2
    o = acc / gl.expand_dims(gl.convert_layout(l, o_rows_layout), 1)
    o_rows = start_m + gl.arange(0, BLOCK_M, layout=o_rows_layout)
    o_cols = gl.arange(0, DV, layout=gl.SliceLayout(0, o_layout))
    o_base = o_ptr + batch.to(gl.int64) * stride_ob + head.to(gl.int64) * stride_oh
    o_ptrs = o_base + gl.expand_dims(o_rows.to(gl.int64) * stride_oi, 1) + gl.expand_dims(o_cols, 0)
    gl.store(o_ptrs, o.to(dtype), mask=gl.expand_dims(o_rows < i, 1))
    lse_ptrs = lse_ptr + (batch.to(gl.int64) * h + head) * i + rows
    gl.store(lse_ptrs, lse, mask=rows < i)


@gluon.jit
def fa3_worker(load_args, consume_args, ROLE: gl.constexpr, CAUSAL: gl.constexpr, STAGES: gl.constexpr,
               SCHEDULE: gl.constexpr):
    """A worker partition: the producer (``ROLE`` 0) or consumer warpgroup ``ROLE`` (1 on)."""
    if ROLE == 0:
        fa3_load(*load_args, STAGES)
    else:
        fa3_consume(*consume_args, ROLE, CAUSAL, STAGES, SCHEDULE)


@gluon.jit
def fa3_fwd_kernel(q_desc, k_desc, v_desc, o_ptr, lse_ptr,
                   stride_ob, stride_oh, stride_oi,
                   h, g, i, j, qk_scale,
                   CAUSAL: gl.constexpr, STAGES: gl.constexpr, CONSUMERS: gl.constexpr = 1,
                   SCHEDULE: gl.constexpr = SCHEDULE_SERIAL):
    """O and lse for one tile of ``CONSUMERS * BLOCK_M`` queries: grid (n_q_tiles, h, b); num_warps=4.

    ``CONSUMERS`` warpgroups share each K/V slot, each with ``BLOCK_M`` rows
    of its own (step (b): while one computes its exponentials, the other's
    WGMMA can run); the first is the default partition, the others workers.
    ``SCHEDULE`` is that of ``fa3_consume``; ``SCHEDULE_PINGPONG`` needs two
    consumers.
    """
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[2]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
    dtype: gl.constexpr = q_desc.dtype

    tile = gl.program_id(0)
    if CAUSAL:
        tile = gl.num_programs(0) - 1 - tile  # the tiles with the most keys first
    head = gl.program_id(1)
    batch = gl.program_id(2)
    start_m = tile * (CONSUMERS * BLOCK_M)
    if CAUSAL:
        # keys past the last row's diagonal are never loaded
        hi = gl.minimum(gl.maximum(start_m + CONSUMERS * BLOCK_M + j - i, 0), j)
    else:
        hi = j
    n_tiles = gl.cdiv(hi, BLOCK_N)
    if SCHEDULE != SCHEDULE_SERIAL:
        # the overlapped loop starts with tile 0; a program whose rows see no key reads it, all masked
        n_tiles = gl.maximum(n_tiles, 1)

    q_smem = gl.allocate_shared_memory(dtype, [CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # ping-pong: whose turn
    mbarrier.init(q_bar, count=1)
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    for slot in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(slot), count=1)
        mbarrier.init(v_ready.index(slot), count=1)
        mbarrier.init(kv_free.index(slot), count=CONSUMERS)  # a slot is free once every consumer has read it

    load_args = (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_free,
                 batch, head, head // g, start_m, n_tiles)
    consume_args = (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_free, turn, o_ptr, lse_ptr,
                    stride_ob, stride_oh, stride_oi, batch, head, h, i, j, start_m, n_tiles, qk_scale)
    if CONSUMERS == 1:
        gl.warp_specialize([
            (fa3_consume, consume_args + (0, CAUSAL, STAGES, SCHEDULE)),
            (fa3_worker, (load_args, consume_args, 0, CAUSAL, STAGES, SCHEDULE)),
        ], [1], [24])
    else:
        gl.warp_specialize([
            (fa3_consume, consume_args + (0, CAUSAL, STAGES, SCHEDULE)),
            (fa3_worker, (load_args, consume_args, 0, CAUSAL, STAGES, SCHEDULE)),
            (fa3_worker, (load_args, consume_args, 1, CAUSAL, STAGES, SCHEDULE)),
        ], [1, 4], [24, 240])
