"""ring_attention on 2 and 4 CPU processes over gloo, against FlashAttention on the full sequence; the layouts.

The processes are started by the tests (torch.multiprocessing, spawn). Each
draws the same full q, k, v and output gradient in float64, computes
FlashAttention and its gradients on the whole sequence, and compares its
own shard of them with what ring_attention gives it from its shards alone:
causal and not, both layouts, grouped-query heads (h = 4, h_kv = 2),
d != d_v, 3-D k/v, a chosen scale, chunks of one row; a sub-group of two
of four processes (whose ring must address its peers by their global ranks;
the other two are told they are not members); a group of one process. Each
also checks that its k and v shards come back unchanged (the ring receives
into buffers of its own). The errors travel back to the pytest process,
which asserts.

In the pytest process: the single-process path (no process group), the
round trip between a tensor and its shards and the errors for what a layout
cannot cut, and the block rule (``block_pieces``): over a whole ring every
pair that the causal rule shows is computed exactly once (for the layouts'
chunk lists and for others), and with the zigzag layout every rank computes
as many score entries as every other, in one piece per step.

Without a GPU every block runs the tiled PyTorch code; the kernels of the
CUDA path are checked here only for their calls (on meta tensors) and, for
the Triton kernels, in Triton's interpreter; the choice among them
(``pick_block_kernel``), with SDPA's answer and the GPU's capability given.
With GPUs, the same rings run over NCCL (float64, so on the tiled code: it
tests the transfers between GPUs), and each block kernel of the CUDA path is
compared on one GPU, in bfloat16, with the tiled code in float32.
"""

from __future__ import annotations

import datetime
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flashattn import FlashAttention, ring_attention, shard_sequence, unshard_sequence
from flashattn.ring import (
    block_backward, block_forward, block_pieces, pick_block_kernel, shard_chunks, shard_positions,
)
from reference import reference_attention

# float64 against float64: both sides sum the same few dozen terms in a different order (the ring
# merges partial softmaxes through exp(lse)): a few ulps of 1e-16; 1e-10 leaves room and still
# catches any wrong block, mask or merge (those give errors of order 1).
FLOAT64_REL = 1e-10
SPAWN_TIMEOUT_S = 120.0
CHUNK = 3  # rows per chunk: shards of 3 (contiguous) or 2 x 3 (zigzag) rows, so that no chunk is a single row
# bfloat16 kernels against float32: their results are rounded to bf16 (unit roundoff 2^-9), and the fused
# backward kernels round P and dS to bf16 before their products: a few roundoffs, 2^-5 with margin
BFLOAT16_REL = 2**-5
on_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# against the float64 reference, by the dtype of the inputs: float32 (unit roundoff 6e-8) sums of a few
# dozen terms, 1e-5; bfloat16 results rounded to it (u = 2^-9), 2^-6 as for tiled_attention
REL = {torch.float64: FLOAT64_REL, torch.float32: 1e-5, torch.bfloat16: 2**-6}


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|."""
    return ((x - ref).abs().max() / ref.abs().max()).item()


def full_problem(b, h, h_kv, n, d, d_v, kv_3d=False, seed=0):
    """The full q, k, v and output gradient, in float64, the same in every process."""
    gen = torch.Generator().manual_seed(seed)
    kv = (b, n) if kv_3d else (b, h_kv, n)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return randn(b, h, n, d), randn(*kv, d), randn(*kv, d_v), randn(b, h, n, d_v)


def shard_errors(full, rank, world, *, causal, layout, scale=None, group=None):
    """Ring attention on this rank's shards against FlashAttention on the full sequence: errors of o, dq, dk, dv."""
    q, k, v, do = full
    dim = 2 if k.dim() == 4 else 1  # the sequence dimension of 3-D k, v
    qf, kf, vf = (t.to(torch.float64, copy=True).requires_grad_() for t in (q, k, v))  # the whole sequence, float64
    o = FlashAttention(causal, scale=scale)(qf, kf, vf)
    o.backward(do.double())

    def shard(t, dim=2):
        return shard_sequence(t, rank, world, layout=layout, dim=dim)

    qs, ks, vs = shard(q).requires_grad_(), shard(k, dim).requires_grad_(), shard(v, dim).requires_grad_()
    os_ = ring_attention(qs, ks, vs, causal=causal, scale=scale, group=group, layout=layout)
    os_.backward(shard(do))
    assert os_.dtype == q.dtype and qs.grad.dtype == q.dtype
    return {
        # the ring receives into buffers of its own, never into the caller's shards (exactly 0)
        "k, v kept": max(rel_error(t.detach().double(), shard(t0, dim).double()) for t, t0 in ((ks, k), (vs, v))),
        "o": rel_error(os_.double(), shard(o)),
        "dq": rel_error(qs.grad.double(), shard(qf.grad)),
        "dk": rel_error(ks.grad.double(), shard(kf.grad, dim)),
        "dv": rel_error(vs.grad.double(), shard(vf.grad, dim)),
    }


def _child(rank: int, world: int, store_file: str, queue, backend: str) -> None:
    """One process of the ring: runs every case and puts ``(rank, {case: {tensor: error}})`` on ``queue``."""
    torch.set_num_threads(1)  # the processes share two cores
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=f"file://{store_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60), device_id=device if backend == "nccl" else None,
    )
    errors = {}
    try:
        b, h, h_kv, d, d_v = 2, 4, 2, 8, 6
        n = 2 * world * CHUNK
        gqa = [t.to(device) for t in full_problem(b, h, h_kv, n, d, d_v)]
        for layout in ("contiguous", "zigzag"):
            for causal in (False, True):
                errors[f"{layout} causal={causal}"] = shard_errors(gqa, rank, world, causal=causal, layout=layout)
        for dtype in (torch.float32, torch.bfloat16):
            errors[f"zigzag causal {dtype}"] = shard_errors(
                [t.to(dtype) for t in gqa], rank, world, causal=True, layout="zigzag", scale=-0.4
            )
        # chunks of one row: the late query chunk of a zigzag shard is then its row 1 to its end
        one_row = [t.to(device) for t in full_problem(b, h, h_kv, 2 * world, d, d_v, seed=2)]
        errors["zigzag causal, chunks of one row"] = shard_errors(one_row, rank, world, causal=True, layout="zigzag")
        kv_3d = [t.to(device) for t in full_problem(b, h, h_kv, n, d, d_v, kv_3d=True, seed=1)]
        errors["zigzag causal 3-D k/v scale=0.3"] = shard_errors(
            kv_3d, rank, world, causal=True, layout="zigzag", scale=0.3
        )

        # a group of one process: ring_attention is FlashAttention on the full tensors
        singles = [dist.new_group([r]) for r in range(world)]  # every process takes part in creating each group
        errors["group of one"] = shard_errors(gqa, 0, 1, causal=True, layout="zigzag", group=singles[rank])

        if world == 4:
            # ranks 1 and 3 form a ring of two: group ranks 0 and 1, global ranks 1 and 3
            pair = dist.new_group([1, 3])
            if rank in (1, 3):
                errors["sub-group [1, 3] zigzag causal"] = shard_errors(
                    gqa, dist.get_rank(pair), 2, causal=True, layout="zigzag", group=pair
                )
            else:  # told so at once, rather than failing in the ring's shard maths for rank -1 of -1
                with pytest.raises(ValueError, match="not a member of group"):
                    ring_attention(*gqa[:3], causal=True, group=pair)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    queue.put((rank, errors))


def run_ring(world: int, store_dir, backend: str = "gloo") -> dict[int, dict]:
    """Start ``world`` processes of ``_child``; a failure in one of them fails here with its traceback.

    They meet through a file in ``store_dir`` (a new, empty file for each ring), not a TCP port that
    another process could take between choosing it and binding it.
    """
    queue = mp.get_context("spawn").SimpleQueue()
    store_file = str(store_dir / f"ring-{world}-{backend}")
    processes = mp.start_processes(_child, args=(world, store_file, queue, backend), nprocs=world, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not processes.join(timeout=max(deadline - time.monotonic(), 0.1)):  # raises if a child raised
        if time.monotonic() > deadline:
            for p in processes.processes:
                p.kill()
            pytest.fail(f"the {world} ring processes did not finish within {SPAWN_TIMEOUT_S} s (a hang in the ring?)")
    return dict(queue.get() for _ in range(world))


def check_ring_results(results: dict[int, dict], world: int) -> None:
    assert sorted(results) == list(range(world))
    def tolerance(case: str) -> float:
        return REL[torch.bfloat16] if "bfloat16" in case else REL[torch.float32] if "float32" in case else FLOAT64_REL

    failures = [
        f"rank {rank}, {case}: {name} error {error:.1e}"
        for rank, cases in results.items()
        for case, errs in cases.items()
        for name, error in errs.items()
        if not error < tolerance(case)  # NaN fails too
    ]
    worst = max(e for cases in results.values() for case, errs in cases.items() for e in errs.values()
                if tolerance(case) == FLOAT64_REL)
    print(f"world {world}: {sum(len(c) for c in results.values())} cases, worst float64 error {worst:.1e}")
    assert not failures, "\n".join(failures)
    if world == 4:
        assert all("sub-group [1, 3] zigzag causal" in results[r] for r in (1, 3))


@pytest.mark.parametrize("world", [2, 4])
def test_ring_equals_full_attention_values_and_gradients(world, tmp_path):
    check_ring_results(run_ring(world, tmp_path), world)


@pytest.mark.parametrize("world", [2, 4])
def test_ring_over_nccl_equals_full_attention(world, tmp_path):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA GPUs")
    check_ring_results(run_ring(world, tmp_path, "nccl"), world)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_without_a_process_group_it_is_attention(layout, causal, dtype):
    """One process holds the whole sequence: values and gradients against the float64 reference, in each dtype."""
    assert not dist.is_initialized()
    q, k, v, do = (t.to(dtype) for t in full_problem(2, 4, 2, 10, 8, 6))
    ring = [t.clone().requires_grad_() for t in (q, k, v)]
    o = ring_attention(*ring, causal=causal, layout=layout, scale=-0.3)
    o.backward(do)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    o_ref = reference_attention(*ref, causal=causal, scale=-0.3)
    o_ref.backward(do.double())
    assert o.dtype == dtype and all(t.grad.dtype == dtype for t in ring)
    for got, want in zip([o] + [t.grad for t in ring], [o_ref] + [t.grad for t in ref]):
        assert rel_error(got.double(), want) < REL[dtype]


def test_ring_attention_is_not_causal_by_default():
    q, k, v, _ = full_problem(1, 4, 2, 10, 8, 6, seed=2)
    o = ring_attention(q, k, v)
    assert rel_error(o, reference_attention(q, k, v, causal=False)) < FLOAT64_REL


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("dim", [2, 0, -1])
def test_shard_unshard_round_trip(layout, world, dim):
    n = 2 * world * 3
    shape = [2, 3, 5, 4]
    shape[dim] = n
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(world))
    shards = [shard_sequence(x, r, world, layout=layout, dim=dim) for r in range(world)]
    assert all(s.shape[dim] == n // world for s in shards)
    for r, s in enumerate(shards):  # each shard holds exactly the positions the layout gives it
        assert torch.equal(s, x.index_select(dim % x.dim(), shard_positions(r, world, n, layout=layout)))
    assert torch.equal(unshard_sequence(shards, layout=layout, dim=dim), x)


def test_zigzag_gives_each_rank_an_early_and_a_late_chunk():
    assert shard_chunks(0, 2, "zigzag") == [0, 3] and shard_chunks(1, 2, "zigzag") == [1, 2]
    assert shard_positions(0, 2, 8, layout="zigzag").tolist() == [0, 1, 6, 7]
    assert shard_positions(1, 2, 8, layout="zigzag").tolist() == [2, 3, 4, 5]
    assert shard_positions(1, 2, 8, layout="contiguous").tolist() == [4, 5, 6, 7]


def test_lengths_and_layouts_that_do_not_fit_raise():
    x = torch.zeros(1, 1, 6, 2)
    with pytest.raises(ValueError, match=r"length 6 .* 4 equal chunks"):
        shard_sequence(x, 0, 4)
    with pytest.raises(ValueError, match=r"length 6 .* 4 equal chunks .* 'zigzag'"):
        shard_sequence(x, 0, 2, layout="zigzag")
    with pytest.raises(ValueError, match="'ring'"):
        shard_sequence(x, 0, 2, layout="ring")
    with pytest.raises(ValueError, match=r"rank must lie in \[0, world_size\)"):
        shard_sequence(x, 2, 2)
    with pytest.raises(ValueError, match="one shape"):
        unshard_sequence([x, x[:, :, :4]])
    with pytest.raises(ValueError, match="unshard_sequence needs at least one shard"):
        unshard_sequence([])
    with pytest.raises(ValueError, match="'ring'"):
        unshard_sequence([x, x], layout="ring")
    with pytest.raises(ValueError, match=r"length 3 .* 'zigzag'"):
        unshard_sequence([x[:, :, :3]], layout="zigzag")
    q, k = torch.zeros(1, 2, 6, 4), torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match="'diagonal'"):
        ring_attention(q, q, q, layout="diagonal")
    with pytest.raises(ValueError, match=r"one length .* \(1, 2, 6, 4\) .* \(1, 2, 4, 4\)"):
        ring_attention(q, k, k)
    with pytest.raises(ValueError, match=r"even, got q \(1, 2, 5, 4\)"):
        ring_attention(q[:, :, :5], q[:, :, :5], q[:, :, :5], layout="zigzag")


@pytest.mark.parametrize("rank, world_size", [(True, 2), (0, True), (1.0, 2), (0, 2.0)])
def test_a_rank_or_world_size_that_is_not_an_int_raises(rank, world_size):
    # a bool is an int to isinstance, but True as a rank is a bug of the caller's
    with pytest.raises(TypeError, match=r"(rank|world_size) must be an int"):
        shard_chunks(rank, world_size, "zigzag")


def _pairs_computed(rank, world, layout, chunk, causal):
    """The (global query, global key) pairs that rank's pieces compute over the whole ring, and their count."""
    q_pos = shard_positions(rank, world, 2 * world * chunk, layout=layout)
    pairs = torch.zeros(2 * world * chunk, 2 * world * chunk, dtype=torch.int64)
    per_rank_chunk = len(shard_chunks(0, world, layout))
    for step in range(world):
        src = (rank - step) % world
        k_pos = shard_positions(src, world, 2 * world * chunk, layout=layout)
        for rows, cols, piece_causal in block_pieces(
            shard_chunks(rank, world, layout), shard_chunks(src, world, layout), 2 * chunk // per_rank_chunk, causal
        ):
            r = torch.arange(rows.start, rows.stop)[:, None]
            c = torch.arange(cols.start, cols.stop)[None, :]
            keep = (c <= r) if piece_causal else torch.ones_like(r * c, dtype=torch.bool)
            pairs[q_pos[rows][:, None], k_pos[cols][None, :]] += keep.to(torch.int64)
    return pairs[q_pos]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [False, True])
def test_block_pieces_compute_each_visible_pair_once(world, layout, causal):
    chunk, n = 2, 2 * world * 2
    visible = torch.ones(n, n, dtype=torch.int64)
    if causal:
        visible = visible.tril()
    work = []
    for rank in range(world):
        pairs = _pairs_computed(rank, world, layout, chunk, causal)
        assert torch.equal(pairs, visible[shard_positions(rank, world, n, layout=layout)])
        work.append(int(pairs.sum()))
    if causal and layout == "zigzag":  # balanced: every rank computes the same number of score entries
        assert len(set(work)) == 1, work
    if causal and layout == "contiguous" and world > 1:  # the last rank computes the most
        assert work == sorted(work) and work[-1] > work[0], work


@pytest.mark.parametrize(
    "q_chunks, k_chunks, n_pieces",
    # the query chunks see 0, 2, 2 key chunks; 1, 2, 2; 2, 3, 3: one piece per distinct non-empty prefix
    [([0, 5, 6], [1, 2, 7], 1), ([1, 3, 4], [0, 2, 5], 2), ([2, 6, 7], [0, 1, 3], 2)],
)
def test_block_pieces_of_any_disjoint_chunk_lists_compute_each_visible_pair_once(q_chunks, k_chunks, n_pieces):
    """Beyond the two layouts: three chunks a shard, so that a joined piece can start past row 0."""
    chunk = 2
    q_pos, k_pos = (torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in cs]) for cs in (q_chunks, k_chunks))
    visible = (k_pos[None, :] <= q_pos[:, None]).to(torch.int64)
    computed = torch.zeros_like(visible)
    pieces = block_pieces(q_chunks, k_chunks, chunk, True)
    assert len(pieces) == n_pieces, pieces
    for rows, cols, piece_causal in pieces:
        assert not piece_causal  # disjoint chunks: each chunk pair is wholly shown or wholly hidden
        computed[rows, cols] += 1
    assert torch.equal(computed, visible)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_zigzag_attends_one_piece_per_step_in_the_documented_shape(world):
    """One kernel call per step: ``block_pieces`` joins the query chunks that see the same keys."""
    c = 3
    for rank in range(world):
        for src in range(world):
            pieces = block_pieces(shard_chunks(rank, world, "zigzag"), shard_chunks(src, world, "zigzag"), c, True)
            if src < rank:  # every query sees the early key chunk only
                want = (slice(0, 2 * c), slice(0, c), False)
            elif src > rank:  # only the late query chunk sees keys, and it sees both chunks
                want = (slice(c, 2 * c), slice(0, 2 * c), False)
            else:
                want = (slice(0, 2 * c), slice(0, 2 * c), True)
            assert pieces == [want], (rank, src)


def test_an_unknown_block_kernel_is_named():
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"kernel must be one of \('cudnn', 'flash', 'triton', 'tiled'\), got 'cuda'"):
        block_forward(q, q, q, False, 0.3, "cuda")
    with pytest.raises(ValueError, match="got 'cuda'"):
        block_backward(q, q, q, q, q, q[..., 0], False, 0.3, "cuda")


@pytest.mark.parametrize(
    "sdpa_choice, d, d_v, capability, want",
    [
        ("CUDNN_ATTENTION", 64, 64, (9, 0), "cudnn"),
        ("FLASH_ATTENTION", 64, 64, (9, 0), "flash"),
        # SDPA pads head dimensions to a multiple of 8 before its fused kernels; called unpadded, they are not used
        ("CUDNN_ATTENTION", 60, 64, (9, 0), "triton"),
        ("FLASH_ATTENTION", 64, 60, (9, 0), "triton"),
        ("EFFICIENT_ATTENTION", 64, 64, (8, 0), "triton"),
        ("MATH", 64, 64, (7, 5), "tiled"),  # no Triton launch below compute capability 8.0
        ("MATH", 320, 320, (9, 0), "tiled"),  # nor for head dimensions above 256
    ],
)
def test_block_kernel_on_cuda_is_sdpas_choice_else_triton_else_tiled(
    monkeypatch, sdpa_choice, d, d_v, capability, want
):
    """``pick_block_kernel`` on a GPU, without one: SDPA's answer and the device's capability are given."""
    from types import SimpleNamespace

    from torch.nn.attention import SDPBackend

    pytest.importorskip("triton")
    asked = []

    def fused_sdp_choice(q, k, v, mask, dropout_p, causal, scale, enable_gqa):
        asked.append((mask, dropout_p, causal, scale, enable_gqa))
        return getattr(SDPBackend, sdpa_choice).value

    monkeypatch.setattr(torch.ops.aten, "_fused_sdp_choice", fused_sdp_choice)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    def on_gpu(*shape):  # what pick_block_kernel reads of a tensor
        return SimpleNamespace(shape=torch.Size(shape), dtype=torch.bfloat16, device=torch.device("cuda", 0))

    n = 300  # a head dimension read from the sequence axis would not fit the Triton kernels
    q = on_gpu(2, 8, n, d)
    for h_kv in (4, 8):  # grouped heads and not
        assert pick_block_kernel(q, on_gpu(2, h_kv, n, d), on_gpu(2, h_kv, n, d_v), True, -0.3) == want
    # what SDPA itself asks for these inputs: no mask, no dropout, the grouped heads named
    assert asked == [(None, 0.0, True, -0.3, True), (None, 0.0, True, -0.3, False)]


@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
@pytest.mark.parametrize("causal, i, j", [(True, 8, 8), (False, 4, 8)])
def test_fused_kernel_calls_on_meta_tensors(kernel, causal, i, j):
    """The calls of PyTorch's fused kernels (CUDA only) take these arguments and give back these shapes."""
    b, h, h_kv, d = 2, 4, 2, 16

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, device="meta", dtype=dtype)

    q, k, v = meta(b, h, i, d), meta(b, h_kv, j, d), meta(b, h_kv, j, d)
    o, lse = block_forward(q, k, v, causal, 0.25, kernel)
    assert (o.shape, o.dtype, lse.shape, lse.dtype) == ((b, h, i, d), torch.bfloat16, (b, h, i), torch.float32)
    dq, dk, dv = block_backward(meta(b, h, i, d), q, k, v, o, lse, causal, 0.25, kernel)
    assert [t.shape for t in (dq, dk, dv)] == [q.shape, k.shape, v.shape]
    assert {t.dtype for t in (dq, dk, dv)} == {torch.bfloat16}


def test_cudnn_backward_takes_the_log_sum_exp_in_the_shape_its_forward_returns(monkeypatch):
    """PyTorch's versions differ in that shape, ``(b, h, i)`` or ``(b, h, i, 1)``; the meta kernels say which."""
    def meta(*shape):
        return torch.empty(*shape, device="meta", dtype=torch.bfloat16)

    q, k, v, do = meta(2, 4, 8, 16), meta(2, 2, 8, 16), meta(2, 2, 8, 16), meta(2, 4, 8, 16)
    forward_lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, q, q, None, True, is_causal=True)[1]
    cudnn_backward = torch.ops.aten._scaled_dot_product_cudnn_attention_backward
    taken = []

    def backward(**kwargs):
        taken.append(tuple(kwargs["logsumexp"].shape))
        return cudnn_backward(**kwargs)

    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention_backward", backward)
    o, lse = block_forward(q, k, v, True, 0.25, "cudnn")
    block_backward(do, q, k, v, o, lse, True, 0.25, "cudnn")
    assert taken == [tuple(forward_lse.shape)]


@pytest.mark.parametrize("scale", [0.3, -0.3])
@pytest.mark.parametrize("causal, i, j", [(True, 12, 12), (False, 6, 12)])
def test_triton_block_kernel_matches_float64(scale, causal, i, j):
    """The Triton path of the blocks (padded head dimensions, a negative scale, GQA), in the interpreter."""
    from flashattn.triton.attention import _kernels
    from flashattn.triton.runtime import is_interpreted

    if not is_interpreted(_kernels().attn_fwd_kernel):
        pytest.skip("the interpreter runs only without a GPU (TRITON_INTERPRET=1)")
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, i, 8, generator=gen), torch.randn(1, 2, j, 8, generator=gen)
    v = torch.randn(1, 2, j, 6, generator=gen)
    do = torch.randn(1, 4, i, 6, generator=gen)
    # the reference is float64 attention from its definition, not the tiled code
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o_ref = reference_attention(q64, k64, v64, causal=causal, scale=scale)
    grads_ref = torch.autograd.grad(o_ref, (q64, k64, v64), do.double())
    s = (q64 @ k64.repeat_interleave(2, dim=1).transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(i, j, dtype=torch.bool).triu(1), float("-inf"))
    lse_ref = torch.logsumexp(s, dim=-1)
    # float32 kernels against float64: sums of at most 12 terms, a few roundoffs of 6e-8
    o, lse = block_forward(q, k, v, causal, scale, "triton")
    torch.testing.assert_close(o.double(), o_ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(lse.double(), lse_ref.detach(), atol=1e-5, rtol=0)
    grads = block_backward(do, q, k, v, o, lse, causal, scale, "triton")
    for got, want in zip(grads, grads_ref):
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_triton_blocks_take_the_hopper_launch_of_their_causal_rule(monkeypatch, causal):
    """A causal block is prepared as causal, so that on Hopper it gets the causal row of the Hopper table."""
    from flashattn.triton import attention, hopper
    from flashattn.triton.launch import KernelConfigs, TileConfig

    pytest.importorskip("triton")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    x = torch.empty(1, 2, 4096, 128, dtype=torch.bfloat16)
    base = KernelConfigs(TileConfig(1, 1, 1, 1), TileConfig(2, 2, 2, 2), TileConfig(3, 3, 3, 3))
    chosen = []

    def kernel_inputs(q, prepared, causal=False):
        # what the launch on an H100 would be for a long block under the rule the block was prepared with
        chosen.append(hopper.hopper_configs(base, torch.device("cuda", 0), 128, causal, 4096, 4096, x, x, x))
        raise RuntimeError("stop before the kernels")

    monkeypatch.setattr(attention, "kernel_inputs", kernel_inputs)
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="stop before the kernels"):
        block_forward(q, q, q, causal, 0.25, "triton")
    with pytest.raises(RuntimeError, match="stop before the kernels"):
        block_backward(q, q, q, q, q, q[..., 0], causal, 0.25, "triton")
    fwd, dkdv, dq = hopper.hopper_table()[(128, causal, "long")]
    want = KernelConfigs(fwd or base.fwd, dkdv or base.dkdv, dq or base.dq)
    assert chosen == [want, want]
    assert hopper.hopper_table()[(128, True, "long")] != hopper.hopper_table()[(128, False, "long")]


@on_cuda
@pytest.mark.parametrize("kernel", ["cudnn", "flash", "triton"])
@pytest.mark.parametrize("causal, i, j", [(True, 256, 256), (False, 128, 256)])
def test_cuda_block_kernels_equal_tiled_float32(kernel, causal, i, j):
    """Each block kernel of the CUDA path: values, log-sum-exp and gradients, with GQA and a chosen scale."""
    gen = torch.Generator().manual_seed(5)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to("cuda", torch.bfloat16)

    q, k, v, do = randn(2, 8, i, 64), randn(2, 4, j, 64), randn(2, 4, j, 64), randn(2, 8, i, 64)
    o, lse = block_forward(q, k, v, causal, 0.1, kernel)
    o_ref, lse_ref = block_forward(q.float(), k.float(), v.float(), causal, 0.1, "tiled")
    assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32 and lse.shape == (2, 8, i)
    assert rel_error(o.float(), o_ref) < BFLOAT16_REL
    assert (lse - lse_ref).abs().max().item() < 1e-2  # lse is computed in float32 from bf16 inputs
    grads = block_backward(do, q, k, v, o, lse, causal, 0.1, kernel)
    grads_ref = block_backward(do.float(), q.float(), k.float(), v.float(), o_ref, lse_ref, causal, 0.1, "tiled")
    for name, got, want in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert got.shape == want.shape and got.dtype == torch.bfloat16, name
        assert rel_error(got.float(), want) < BFLOAT16_REL, name
