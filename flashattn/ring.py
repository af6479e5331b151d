r"""Ring attention: exact attention over a sequence cut into shards, one shard per process.

Each rank of a process group holds one shard of the queries, keys and values.
The key/value shards travel around the ring, rank ``r`` sending to rank
``r + 1``: at step ``s`` rank ``r`` holds the keys and values of rank
``(r - s) mod world``, attends its own queries to them, and folds the block's
output and log-sum-exp into its running result with
:func:`~flashattn.online_softmax.merge_partials`. After ``world`` steps every
query has seen every key, and the result is exact.

Layouts (which positions a rank holds), for a sequence of length ``n``:

- ``"contiguous"``: the sequence is cut into ``world`` equal chunks; rank
  ``r`` holds chunk ``r``. Under the causal rule the last rank attends to
  every earlier chunk while rank 0 attends only to its own: the ranks wait
  for the slowest one.
- ``"zigzag"``: the sequence is cut into ``2 world`` equal chunks; rank
  ``r`` holds chunks ``r`` and ``2 world - 1 - r`` (an early one and a late
  one), in that order. Every rank then does the same causal work at every
  step (see :func:`block_pieces`).

The transfer of the next shard is posted (``batch_isend_irecv``) before the
current block is attended and waited for after it, so that the two overlap.
Each block runs on the fastest kernel the device has that returns the
log-sum-exp (:func:`pick_block_kernel`, :func:`block_forward`,
:func:`block_backward`). The backward pass rings the keys and values again,
and with them the running sums of their gradients (:func:`ring_backward`).

:func:`shard_sequence` and :func:`unshard_sequence` go between a full tensor
and its shards; :func:`shard_chunks` and :func:`shard_positions` say which
chunks and positions a rank holds.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from .attention import FlashAttention
from .inputs import check_flag, prepare
from .online_softmax import merge_partials
from .tiled import load_kv, sum_groups, tiled_backward_two_pass, tiled_forward_fa2
from .triton.launch import fits_kernels

LAYOUTS = ("contiguous", "zigzag")
# the block kernels: PyTorch's fused cuDNN and FlashAttention-2 kernels, the package's Triton kernels, the tiled code
KERNELS = ("cudnn", "flash", "triton", "tiled")


# ---------------------------------------------------------------------------------------------------------------------
# Layouts


def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(repr(x) for x in LAYOUTS)}, got {layout!r}")
    return layout


def _check_world(rank: int, world_size: int) -> None:
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size), got rank {rank} and world_size {world_size}")


def shard_chunks(rank: int, world_size: int, layout: str = "contiguous") -> list[int]:
    """The chunks of the sequence that ``rank`` holds, in the order it holds them (ascending).

    ``"contiguous"``: ``[rank]`` of ``world_size`` chunks. ``"zigzag"``:
    ``[rank, 2 world_size - 1 - rank]`` of ``2 world_size`` chunks.
    """
    _check_layout(layout)
    _check_world(rank, world_size)
    return [rank] if layout == "contiguous" else [rank, 2 * world_size - 1 - rank]


def _chunk_length(length: int, world_size: int, layout: str) -> int:
    """The length of one chunk; ``ValueError`` when the layout cannot cut ``length`` into equal chunks."""
    chunks = world_size * len(shard_chunks(0, world_size, layout))
    if length % chunks:
        raise ValueError(
            f"a sequence of length {length} cannot be cut into the {chunks} equal chunks that layout "
            f"{layout!r} needs for world_size {world_size}"
        )
    return length // chunks


def shard_positions(rank: int, world_size: int, length: int, *, layout: str = "contiguous") -> Tensor:
    """The global positions (int64, ascending) of the ``length // world_size`` rows that ``rank`` holds."""
    chunk = _chunk_length(length, world_size, layout)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in shard_chunks(rank, world_size, layout)])


def shard_sequence(x: Tensor, rank: int, world_size: int, *, layout: str = "contiguous", dim: int = 2) -> Tensor:
    """The shard of the full tensor ``x`` that ``rank`` of ``world_size`` holds, along ``dim``.

    ``x`` of length ``n`` along ``dim`` gives a tensor of length
    ``n // world_size`` there (a view for ``"contiguous"``, a new tensor for
    ``"zigzag"``). Raises ``ValueError`` when the layout cannot cut ``n``.
    """
    dim = dim % x.dim()
    chunk = _chunk_length(x.shape[dim], world_size, layout)
    pieces = [x.narrow(dim, c * chunk, chunk) for c in shard_chunks(rank, world_size, layout)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def unshard_sequence(shards: Sequence[Tensor], *, layout: str = "contiguous", dim: int = 2) -> Tensor:
    """The full tensor from its shards, given in rank order: the inverse of :func:`shard_sequence`.

    All shards must have one shape; a shard of length ``m`` along ``dim``
    gives a tensor of length ``len(shards) * m`` there. Raises
    ``ValueError`` when the layout cannot cut a shard into its chunks.
    """
    _check_layout(layout)
    if len(shards) == 0:
        raise ValueError("unshard_sequence needs at least one shard")
    shapes = {tuple(s.shape) for s in shards}
    if len(shapes) != 1:
        raise ValueError(f"the shards must share one shape, got {sorted(shapes)}")
    world_size = len(shards)
    dim = dim % shards[0].dim()
    per_rank = len(shard_chunks(0, world_size, layout))
    chunk = _chunk_length(shards[0].shape[dim] * world_size, world_size, layout)
    owner = {}  # chunk id -> (rank, slot in that rank's shard)
    for rank in range(world_size):
        for slot, c in enumerate(shard_chunks(rank, world_size, layout)):
            owner[c] = (rank, slot)
    in_order = (owner[c] for c in range(world_size * per_rank))
    pieces = [shards[r].narrow(dim, slot * chunk, chunk) for r, slot in in_order]
    return torch.cat(pieces, dim=dim)


def block_pieces(
    q_chunks: Sequence[int], k_chunks: Sequence[int], chunk: int, causal: bool
) -> list[tuple[slice, slice, bool]]:
    r"""What to compute when the queries of chunks ``q_chunks`` meet the keys of chunks ``k_chunks``.

    Returns ``(rows, cols, causal)`` triples: local query rows, local key
    columns, and whether the piece needs the causal mask; pieces that the
    causal rule hides entirely are left out (the list is empty when it hides
    the whole block). Each list of chunk ids is ascending (as
    :func:`shard_chunks` gives them), and two ranks' lists are either the
    same (a rank's own shard) or disjoint. Then, with the causal rule on:

    - own shard: one square piece under the ordinary causal mask. The local
      order of the rows is their global order, so "key position <= query
      position" is "local column <= local row".
    - another rank's shard: a key chunk lies wholly before or wholly after a
      query chunk, so each chunk pair is full or empty; query chunk ``a``
      sees exactly the key chunks with smaller ids, a prefix of the ascending
      list. Consecutive query chunks that see the same prefix form one
      piece, computed without a mask.

    For the zigzag layout on ``world`` ranks (chunk length ``c``, shard
    length ``2c``) this gives one piece per step: rank ``r`` meeting the
    shard of ``src < r`` computes all its ``2c`` queries against the first
    ``c`` keys; meeting ``src > r``, its last ``c`` queries against all
    ``2c`` keys; its own shard, ``2c x 2c`` under the mask. Each is
    ``2c^2`` score entries (``2c^2 + c`` with the diagonal): every rank does
    the same work at every step.
    With the contiguous layout, rank ``r`` computes a full ``c x c`` block
    for ``src < r``, nothing for ``src > r``.
    """
    n_q, n_k = len(q_chunks) * chunk, len(k_chunks) * chunk
    if not causal:
        return [(slice(0, n_q), slice(0, n_k), False)]
    if list(q_chunks) == list(k_chunks):
        return [(slice(0, n_q), slice(0, n_k), True)]
    pieces: list[tuple[slice, slice, bool]] = []
    for a, qc in enumerate(q_chunks):
        seen = sum(kc < qc for kc in k_chunks)  # a prefix of the ascending key chunks
        if seen == 0:
            continue
        rows, cols = slice(a * chunk, (a + 1) * chunk), slice(0, seen * chunk)
        if pieces and pieces[-1][1] == cols and pieces[-1][0].stop == rows.start:
            rows = slice(pieces.pop()[0].start, rows.stop)  # the previous query chunk saw the same keys
        pieces.append((rows, cols, False))
    return pieces


# ---------------------------------------------------------------------------------------------------------------------
# Block kernels: attention of some query rows over some keys, returning the log-sum-exp


def pick_block_kernel(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> str:
    """The fastest kernel that returns the log-sum-exp for these shards (one of ``KERNELS``).

    On CUDA: the fused kernel that PyTorch's SDPA would choose for them
    (cuDNN's or FlashAttention-2's; ``torch.nn.attention.sdpa_kernel``
    narrows the choice as it does for SDPA), else the package's Triton
    kernels (GPUs of compute capability 8.0+, float16/bfloat16/float32, head
    dimensions up to 256), else the tiled PyTorch code, which runs anywhere.
    ``q`` ``(b, h, n, d)``, ``k`` ``(b, h_kv, n, d)``, ``v`` ``(b, h_kv, n, d_v)``.
    """
    if q.device.type != "cuda":
        return "tiled"
    from torch.nn.attention import SDPBackend

    choice = torch.ops.aten._fused_sdp_choice(
        q, k, v, None, 0.0, causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    # SDPA pads head dimensions to a multiple of 8 before it calls these kernels; called directly, they are not padded
    aligned = q.shape[-1] % 8 == 0 and v.shape[-1] % 8 == 0
    if aligned and choice == SDPBackend.CUDNN_ATTENTION.value:
        return "cudnn"
    if aligned and choice == SDPBackend.FLASH_ATTENTION.value:
        return "flash"
    fits_triton = importlib.util.find_spec("triton") is not None and fits_kernels(
        q.device, q.dtype, q.shape[-1], v.shape[-1]
    )
    return "triton" if fits_triton else "tiled"


@functools.cache
def _cudnn_lse_has_unit_dim() -> bool:
    """Whether this PyTorch's cuDNN attention returns its log-sum-exp as ``(b, h, i, 1)``, rather than ``(b, h, i)``.

    Its backward takes the log-sum-exp in the shape the forward returns;
    PyTorch's shape rule for the op (its meta kernel) says which, without a GPU.
    """
    m = torch.empty(1, 1, 1, 16, device="meta", dtype=torch.bfloat16)
    return torch.ops.aten._scaled_dot_product_cudnn_attention(m, m, m, None, True)[1].dim() == 4


def _packed(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``q``, ``k``, ``v`` as PyTorch's fused kernels take them: packed, one key/value head per query head."""
    group = q.shape[1] // k.shape[1]
    every = slice(None)  # the whole shard, repeated for the query heads of each group
    return q.contiguous(), load_kv(k, every, group).contiguous(), load_kv(v, every, group).contiguous()


def _tiled_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    return tiled_forward_fa2(q, k, v, causal=causal, scale=scale)


def _triton_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    from .triton.attention import triton_forward

    return triton_forward(q, k, v, causal=causal, scale=scale)


def _cudnn_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    q, k, v = _packed(q, k, v)
    o, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, attn_bias=None, compute_log_sumexp=True, dropout_p=0.0, is_causal=causal, scale=scale
    )[:2]
    return o, lse.reshape(q.shape[:3])


def _flash_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    q, k, v = _packed(q, k, v)
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p=0.0, is_causal=causal, scale=scale)[:2]
    return o, lse.reshape(q.shape[:3])


def _tiled_backward(do, q, k, v, o, lse, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return tiled_backward_two_pass(do, q, k, v, o, lse, causal=causal, scale=scale)


def _triton_backward(do, q, k, v, o, lse, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    from .triton.attention import triton_backward

    return triton_backward(do, q, k, v, o, lse, causal=causal, scale=scale)


def _cudnn_backward(do, q, k, v, o, lse, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    group = q.shape[1] // k.shape[1]
    q, k_all, v_all = _packed(q, k, v)
    lse = lse.float().contiguous()
    # dropout is off: the random seed and offset are never read
    seed, offset = (torch.empty((), dtype=torch.int64, device=q.device) for _ in range(2))
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        grad_out=do.contiguous(), query=q, key=k_all, value=v_all, out=o.contiguous(),
        logsumexp=lse.unsqueeze(-1) if _cudnn_lse_has_unit_dim() else lse,  # in the shape its forward returns
        philox_seed=seed, philox_offset=offset, attn_bias=None, cum_seq_q=None, cum_seq_k=None,
        max_q=q.shape[2], max_k=k_all.shape[2], dropout_p=0.0, is_causal=causal, scale=scale,
    )
    return dq, sum_groups(dk, group), sum_groups(dv, group)


def _flash_backward(do, q, k, v, o, lse, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    group = q.shape[1] // k.shape[1]
    q, k_all, v_all = _packed(q, k, v)
    # no cumulative lengths: the dense kernel, not the variable-length one; dropout is off, so the
    # random state (shaped as the forward returns it) is never read
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        grad_out=do.contiguous(), query=q, key=k_all, value=v_all, out=o.contiguous(),
        logsumexp=lse.float().contiguous(), cum_seq_q=None, cum_seq_k=None, max_q=q.shape[2],
        max_k=k_all.shape[2], dropout_p=0.0, is_causal=causal,
        philox_seed=torch.empty(2, dtype=torch.uint64, device=q.device),
        philox_offset=torch.empty((), dtype=torch.uint64, device=q.device), scale=scale,
    )
    return dq, sum_groups(dk, group), sum_groups(dv, group)


# each kernel of KERNELS: its forward (returning the log-sum-exp) and its backward (taking it)
_BLOCK_KERNELS = {
    "cudnn": (_cudnn_forward, _cudnn_backward),
    "flash": (_flash_forward, _flash_backward),
    "triton": (_triton_forward, _triton_backward),
    "tiled": (_tiled_forward, _tiled_backward),
}


def _block_kernel(kernel: str) -> tuple:
    if kernel not in _BLOCK_KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return _BLOCK_KERNELS[kernel]


def block_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, kernel: str) -> tuple[Tensor, Tensor]:
    """Attention of ``q`` ``(b, h, i, d)`` over ``k`` ``(b, h_kv, j, d)``, ``v`` ``(b, h_kv, j, d_v)`` by ``kernel``.

    ``causal`` is the ordinary (square, ``i == j``) causal mask. Returns
    ``(o, lse)``: ``o`` ``(b, h, i, d_v)`` in the dtype of ``q``, ``lse``
    ``(b, h, i)`` in float32 (float64 for float64 inputs, on the tiled path).
    """
    forward, _ = _block_kernel(kernel)
    return forward(q, k, v, causal, scale)


def block_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool, scale: float, kernel: str
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of one block: ``(dq, dk, dv)``, shaped and typed like ``q``, ``k``, ``v``.

    ``do`` and ``o`` ``(b, h, i, d_v)`` and ``lse`` ``(b, h, i)`` are those
    of the whole attention (over every key of the sequence), restricted to
    these query rows: then ``P = exp(S - lse)`` is the block's share of the
    global probabilities, and ``D = rowsum(dO * O)`` the global one. Each
    kernel computes ``D`` itself from ``o`` and ``do`` (PyTorch's fused
    backward kernels take no ``D``), which costs one pass over those rows.
    """
    _, backward = _block_kernel(kernel)
    return backward(do, q, k, v, o, lse, causal, scale)


# ---------------------------------------------------------------------------------------------------------------------
# The ring


@dataclass(frozen=True)
class Ring:
    """This process's place in the ring of ``group``: its rank there, the size, and its neighbours' global ranks."""

    group: dist.ProcessGroup
    rank: int
    world: int
    next_peer: int
    prev_peer: int

    @classmethod
    def of(cls, group: dist.ProcessGroup, rank: int, world: int) -> Ring:
        # P2POp takes global ranks; within a sub-group they differ from the group's own
        return cls(group, rank, world, dist.get_global_rank(group, (rank + 1) % world),
                   dist.get_global_rank(group, (rank - 1) % world))

    def shift(self, send: Sequence[Tensor], recv: Sequence[Tensor], tag: int) -> list[dist.Work]:
        """Post the sends of ``send`` to the next rank and the receives of ``recv`` from the previous one.

        Returns at once; the transfers run while the caller computes, until
        :func:`_wait`. ``tag`` (and ``tag + 1``, ...) keeps two shifts in
        flight at once apart on backends that match messages by tag.
        """
        ops = []
        for n, (out, into) in enumerate(zip(send, recv)):
            ops.append(dist.P2POp(dist.isend, out, self.next_peer, self.group, tag + n))
            ops.append(dist.P2POp(dist.irecv, into, self.prev_peer, self.group, tag + n))
        return dist.batch_isend_irecv(ops)


def _wait(works: list[dist.Work]) -> None:
    """Wait for posted transfers (on CUDA: the current stream waits, the host does not)."""
    for work in works:
        work.wait()


def ring_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, ring: Ring, layout: str, kernel: str
) -> tuple[Tensor, Tensor]:
    """The forward ring: returns ``o`` ``(b, h, n, d_v)`` in the dtype of ``q`` and ``lse`` ``(b, h, n)``.

    ``lse`` is float32 (float64 for float64 inputs); the running output is
    kept in that dtype too, and rounded once at the end.
    """
    q_chunks = shard_chunks(ring.rank, ring.world, layout)
    chunk = q.shape[2] // len(q_chunks)
    work_dtype = torch.promote_types(q.dtype, torch.float32)
    o = lse = None
    kv, spare = (k, v), None
    for step in range(ring.world):
        last = step == ring.world - 1
        if not last:  # the next shard travels while this one is attended
            incoming = spare if spare is not None else (torch.empty_like(k), torch.empty_like(v))
            works = ring.shift(kv, incoming, tag=0)
        src = (ring.rank - step) % ring.world
        for rows, cols, piece_causal in block_pieces(q_chunks, shard_chunks(src, ring.world, layout), chunk, causal):
            k_blk, v_blk = kv[0][:, :, cols], kv[1][:, :, cols]
            o_blk, lse_blk = block_forward(q[:, :, rows], k_blk, v_blk, piece_causal, scale, kernel)
            lse_blk = lse_blk.to(work_dtype)  # o_blk is promoted inside the merge, without a copy of its own
            if o is None:  # step 0 is the own shard, one piece over every row: it starts the result
                o, lse = o_blk.to(work_dtype), lse_blk
            elif rows == slice(0, q.shape[2]):
                o, lse = merge_partials(o, lse, o_blk, lse_blk)
            else:
                o[:, :, rows], lse[:, :, rows] = merge_partials(o[:, :, rows], lse[:, :, rows], o_blk, lse_blk)
        if not last:
            _wait(works)
            # the buffers just sent are free again (never the caller's k and v): they receive the shard after next
            spare = kv if step > 0 else None
            kv = incoming
    return o.to(q.dtype), lse


def ring_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
    causal: bool, scale: float, ring: Ring, layout: str, kernel: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward ring: ``(dq, dk, dv)`` of this rank's shards, typed like ``q``, ``k``, ``v``.

    The key/value shards travel as in the forward, and with each goes the
    running sum of its ``dK`` and ``dV`` (float32; float64 for float64
    inputs): at step ``s`` rank ``r`` adds what its queries contribute to the
    shard of rank ``(r - s) mod world``, adds the sum that arrived from rank
    ``r - 1`` (which held the same shard at step ``s - 1``), and sends the
    total on. After the last step the sums hold every rank's share, and one
    more hop brings each to its owner: the shard held at step ``world - 1``
    belongs to rank ``r + 1``. So ``K``, ``V`` make ``world - 1`` hops and
    ``dK``, ``dV`` make ``world``; each transfer runs during the next block's
    compute.
    """
    q_chunks = shard_chunks(ring.rank, ring.world, layout)
    chunk = q.shape[2] // len(q_chunks)
    work_dtype = lse.dtype
    dq = torch.zeros(q.shape, dtype=work_dtype, device=q.device)
    kv, spare = (k, v), None
    dkv_works: list[dist.Work] = []
    dkv_sent = dkv_received = None
    for step in range(ring.world):
        last = step == ring.world - 1
        if not last:
            incoming = spare if spare is not None else (torch.empty_like(k), torch.empty_like(v))
            kv_works = ring.shift(kv, incoming, tag=0)
        src = (ring.rank - step) % ring.world
        dk = torch.zeros(k.shape, dtype=work_dtype, device=k.device)
        dv = torch.zeros(v.shape, dtype=work_dtype, device=v.device)
        for rows, cols, piece_causal in block_pieces(q_chunks, shard_chunks(src, ring.world, layout), chunk, causal):
            dq_blk, dk_blk, dv_blk = block_backward(
                do[:, :, rows], q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], o[:, :, rows], lse[:, :, rows],
                piece_causal, scale, kernel,
            )
            dq[:, :, rows] += dq_blk
            dk[:, :, cols] += dk_blk
            dv[:, :, cols] += dv_blk
        if step > 0:
            _wait(dkv_works)  # the sums of the ranks before, for the shard held now
            dk += dkv_received[0]
            dv += dkv_received[1]
            free = dkv_sent  # its send is complete
        else:
            free = (torch.empty_like(dk), torch.empty_like(dv))
        dkv_sent, dkv_received = (dk, dv), free
        dkv_works = ring.shift(dkv_sent, dkv_received, tag=2)
        if not last:
            _wait(kv_works)
            spare = kv if step > 0 else None
            kv = incoming
    _wait(dkv_works)  # the last hop: this rank's own dK and dV, complete
    return dq.to(q.dtype), dkv_received[0].to(k.dtype), dkv_received[1].to(v.dtype)


class RingAttention(torch.autograd.Function):
    """The forward and backward rings; saves this rank's ``q``, ``k``, ``v``, ``o`` and ``lse``."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, q: Tensor, k: Tensor, v: Tensor,
        causal: bool, scale: float, ring: Ring, layout: str, kernel: str,
    ) -> Tensor:
        k, v = k.contiguous(), v.contiguous()  # they are sent as they are: the backends send packed tensors
        o, lse = ring_forward(q, k, v, causal, scale, ring, layout, kernel)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.options = (causal, scale, ring, layout, kernel)
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, do: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(do.contiguous(), q, k, v, o, lse, *ctx.options)
        return dq, dk, dv, None, None, None, None, None


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    layout: str = "contiguous",
) -> Tensor:
    """Exact attention over a sequence sharded across the ranks of ``group``; call it on every rank.

    Each rank passes its shard (:func:`shard_sequence` with the same
    ``layout``): ``q`` ``(b, h, n, d)``, ``k`` ``(b, h_kv, n, d)`` and ``v``
    ``(b, h_kv, n, d_v)`` with ``h % h_kv == 0`` (or 3-D ``(b, n, ·)``),
    where ``n`` is the shard's length, the sequence's divided by the group's
    size. Every rank must pass the same shapes, dtype and options (this is not
    checked: a mismatch fails or hangs in the transfers). Returns the rank's
    shard ``(b, h, n, d_v)`` of the attention over the whole sequence, in the
    dtype of ``q``; the gradients of ``q``, ``k``, ``v`` are the shards of the
    full gradients.

    ``causal`` applies the ordinary causal rule to global positions.
    ``layout`` is ``"contiguous"`` or ``"zigzag"`` (see the module's
    docstring); zigzag needs an even ``n``. ``group`` defaults to every
    process. Without ``torch.distributed`` initialised, or on a group of one
    process, this is ``FlashAttention(causal, scale=scale)(q, k, v)``.

    Each step attends with the fastest kernel the device has that returns
    the log-sum-exp (:func:`pick_block_kernel`), while the next key/value
    shard travels (``torch.distributed.batch_isend_irecv``).
    """
    layout = _check_layout(layout)
    causal = check_flag("causal", causal)
    x = prepare(q, k, v, scale=scale)
    n = q.shape[2]
    if x.k.shape[2] != n:
        raise ValueError(
            f"ring_attention takes shards of one length for q, k and v, got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if layout == "zigzag" and n % 2:
        raise ValueError(
            f"layout 'zigzag' holds two equal chunks per rank: the shard length must be even, got q {tuple(q.shape)}"
        )
    if not (dist.is_available() and dist.is_initialized()):
        return FlashAttention(causal, scale=scale)(q, k, v)
    group = dist.group.WORLD if group is None else group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("ring_attention was called on a process that is not a member of group")
    if world == 1 or x.is_empty:
        return FlashAttention(causal, scale=scale)(q, k, v)
    kernel = pick_block_kernel(q, x.k, x.v, causal, x.scale)
    return RingAttention.apply(q, x.k, x.v, causal, x.scale, Ring.of(group, rank, world), layout, kernel)
