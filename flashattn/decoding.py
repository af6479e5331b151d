"""Attention for decoding: a few new queries against a long KV cache, the keys split into chunks.

``decode_attention`` is split-KV attention (flash-decoding): the keys of
each sequence are cut into ``num_splits`` chunks, each chunk is attended on
its own, giving a partial output and its log-sum-exp, and the partial results
are merged with :func:`flashattn.merge_partials`. The split gives a GPU
enough independent work when there are too few queries to fill it; the
merge makes the result exact.

On CUDA (compute capability 8.0 or newer, triton installed, head dimensions
up to 256) the chunks are attended by the Triton kernels of :mod:`flashattn.triton.decode_kernels`;
under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors. Elsewhere
(the CPU, float64, older GPUs, heads wider than 256) :func:`split_kv_attention` runs the same
algorithm in PyTorch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from .inputs import check_lengths_in_range, check_positive_int, prepare
from .online_softmax import finite_or_zero, merge_partials
from .tiles import tile_slices
from .triton.launch import KERNEL_DTYPES, MAX_HEAD_DIM, fits_kernels

CPU_CHUNK = 4096  # keys per chunk on the CPU when num_splits is None: bounds the score buffer


def _attend_chunk(s: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax of the scores ``s`` (..., r, n) over one chunk, times ``v`` (..., n, d_v): ``(o, lse)``.

    A row whose scores are all ``-inf`` (no key in the chunk) gives ``o = 0``
    and ``lse = -inf``, the neutral element of the merge.
    """
    shift = finite_or_zero(s.amax(dim=-1))  # (..., r)
    p = torch.exp(s - shift[..., None])  # (..., r, n)
    l = p.sum(dim=-1)  # (..., r)
    o = (p @ v) / torch.where(l > 0, l, 1.0)[..., None]  # (..., r, d_v)
    return o, shift + torch.log(l)  # log(0) = -inf for an empty row


def split_kv_attention(
    q: Tensor, k: Tensor, v: Tensor, lens: Tensor, *, scale: float, num_splits: int
) -> Tensor:
    """Split-KV attention in PyTorch: ``num_splits`` chunks of the keys, attended one by one and merged.

    ``q`` (b, h, i, d); ``k`` (b, h_kv, j, d) and ``v`` (b, h_kv, j, d_v)
    with ``h % h_kv == 0``; ``lens`` (b,) integers in ``[0, j]``. Query ``r``
    of sequence ``n`` attends key ``c`` when ``c <= lens[n] - i + r``; slots
    at or past ``lens[n]`` are zeroed before use, so nothing they hold, not
    even NaN, reaches the result. Computes in the dtype of ``q``; returns
    ``(b, h, i, d_v)``.
    """
    b, h, i, d = q.shape
    h_kv, j, d_v = k.shape[1], k.shape[2], v.shape[3]
    g = h // h_kv
    # the g query heads of one K/V head, stacked: each K/V chunk is used once for its whole group
    q_rows = q.reshape(b, h_kv, g * i, d)  # query head kv * g + m // i, query m % i
    r = torch.arange(i, device=q.device).repeat(g)  # (g i,) the query index of each row
    last_key = lens[:, None] - i + r  # (b, g i) the last key each row may see
    o = q.new_zeros(b, h_kv, g * i, d_v)  # the merge of no chunk: o = 0, lse = -inf
    lse = q.new_full((b, h_kv, g * i), -math.inf)
    for cols in tile_slices(j, math.ceil(j / num_splits)):
        c = torch.arange(cols.start, cols.stop, device=q.device)  # (n,) key positions of the chunk
        valid = (c < lens[:, None])[:, None, :, None]  # (b, 1, n, 1) slots that hold the sequence
        k_c = torch.where(valid, k[:, :, cols], 0.0)  # (b, h_kv, n, d)
        v_c = torch.where(valid, v[:, :, cols], 0.0)  # (b, h_kv, n, d_v): 0 * NaN would be NaN
        keep = (c <= last_key[:, :, None])[:, None]  # (b, 1, g i, n)
        s = (q_rows @ k_c.transpose(-1, -2) * scale).masked_fill(~keep, -math.inf)  # (b, h_kv, g i, n)
        o_c, lse_c = _attend_chunk(s, v_c)
        o, lse = merge_partials(o, lse, o_c, lse_c)
    return o.reshape(b, h, i, d_v)


def _check_cache_lens(cache_lens: Tensor | None, b: int, j: int, device: torch.device) -> Tensor | None:
    """Raise unless ``cache_lens`` is None or integers ``(b,)`` in ``[0, j]`` on ``device``."""
    if cache_lens is None:
        return None
    if not isinstance(cache_lens, Tensor):
        raise TypeError(f"cache_lens must be None or an integer tensor of shape (b,) = ({b},), got {type(cache_lens).__name__}")
    if cache_lens.is_floating_point() or cache_lens.is_complex() or cache_lens.dtype == torch.bool:
        raise TypeError(f"cache_lens must be an integer tensor, got dtype {cache_lens.dtype}")
    if cache_lens.shape != (b,):
        raise ValueError(f"cache_lens must have shape (b,) = ({b},), one length per sequence, got {tuple(cache_lens.shape)}")
    if cache_lens.device != device:
        raise ValueError(f"cache_lens is on {cache_lens.device} but q is on {device}")
    # On the CPU the range is checked here. On a GPU, reading the lengths would make the host wait
    # for every queued kernel, once per decoded token: there the check runs on the GPU
    # (:func:`_decode`), and a sequence whose length is out of range gets NaN.
    if not cache_lens.is_cuda:
        check_lengths_in_range("cache_lens", cache_lens, j, "k_cache.shape[2]")
    return cache_lens


def _uses_kernels(q: Tensor, d_v: int) -> bool:
    """Whether the Triton kernels can take ``q`` and values of width ``d_v``.

    On a CUDA GPU when :func:`~flashattn.triton.launch.fits_kernels` says so
    (capability 8.0+, float16/bfloat16/float32, head dimensions up to 256),
    or on the CPU under the interpreter for the same dtypes and sizes.
    """
    if q.dtype not in KERNEL_DTYPES or max(q.shape[-1], d_v) > MAX_HEAD_DIM:
        return False
    try:
        from .triton.runtime import is_interpreted, load_kernels

        interpreted = is_interpreted(load_kernels("decode_kernels", "decode_attention").decode_split_kernel)
    except ImportError:
        return False  # no triton: the PyTorch code computes the same
    if q.device.type == "cuda":
        return not interpreted and fits_kernels(q.device, q.dtype, q.shape[-1], d_v)
    return interpreted and q.device.type == "cpu"


def _decode(q: Tensor, k: Tensor, v: Tensor, lens: Tensor | None, scale: float, num_splits: int | None) -> Tensor:
    """The Triton kernels where they run, else the same algorithm in PyTorch."""
    if _uses_kernels(q, v.shape[-1]):
        from .triton.decoding import triton_decode

        return triton_decode(q, k, v, lens, scale, num_splits)
    work = torch.promote_types(q.dtype, torch.float32)
    j = k.shape[2]
    clamped = torch.full((q.shape[0],), j, device=q.device) if lens is None else lens.clamp(0, j)
    splits = num_splits if num_splits is not None else max(1, math.ceil(j / CPU_CHUNK))
    o = split_kv_attention(q.to(work), k.to(work), v.to(work), clamped, scale=scale, num_splits=splits)
    if lens is not None and lens.is_cuda:  # the range check on the GPU, as the kernels make it
        out_of_range = (lens < 0) | (lens > j)  # (b,)
        o = o.masked_fill(out_of_range[:, None, None, None], math.nan)
    return o.to(q.dtype)


class _DecodeAttention(torch.autograd.Function):
    """Inference only: the forward of :func:`decode_attention`, and a backward that says so."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, q: Tensor, k: Tensor, v: Tensor, lens: Tensor | None, scale: float, num_splits: int | None
    ) -> Tensor:
        return _decode(q, k, v, lens, scale, num_splits)

    @staticmethod
    def backward(ctx: FunctionCtx, do: Tensor) -> tuple[Tensor | None, ...]:
        raise RuntimeError(
            "decode_attention is for inference and has no backward; for gradients use FlashAttention "
            "(or flashattn.triton_attention) with causal=True on the same tensors"
        )


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_lens: Tensor | None = None,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
) -> Tensor:
    """Attention of a few new queries against a KV cache, by split-KV (flash-decoding).

    ``q`` ``(b, h, i, d)``: the last ``i`` tokens of each sequence (``i = 1``
    for plain decoding, a few more for speculative decoding).
    ``k_cache`` ``(b, h_kv, j, d)`` and ``v_cache`` ``(b, h_kv, j, d_v)``
    with ``h % h_kv == 0`` (grouped-query attention: each K/V head is read
    once for its group, never repeated in memory), or 3-D ``(b, j, d)``.

    ``cache_lens``: None (all ``j`` slots hold the sequence) or an integer
    tensor ``(b,)`` on ``q``'s device with ``0 <= cache_lens[n] <= j``.
    Slots at or past ``cache_lens[n]`` are not part of sequence ``n``: they
    may hold anything, NaN included, and do not change the result. A length
    outside ``[0, j]`` raises ``ValueError`` when the lengths are on the CPU;
    on a GPU the call never waits for the GPU to read them (a decoding loop
    keeps queueing work ahead), so the range is checked on the GPU instead:
    every output of a sequence whose length is out of range is NaN. Callers
    that want an exception there check the lengths themselves, at the cost of
    one wait.

    Query ``r`` of sequence ``n`` attends key ``c`` when
    ``c <= cache_lens[n] - i + r`` (causal, aligned to the end of the valid
    cache); a query with no key gives zeros. ``scale`` defaults to
    ``d ** -0.5``. ``num_splits``: the number of chunks each sequence's keys
    are cut into; None chooses from the shape and the GPU. The result does
    not depend on it beyond rounding.

    Returns ``(b, h, i, d_v)`` in the dtype of ``q``. Inference only: asking
    for gradients through it raises ``RuntimeError``.
    """
    x = prepare(q, k_cache, v_cache, scale=scale, names=("q", "k_cache", "v_cache"))
    b, h, i, _ = q.shape
    j, d_v = x.k.shape[2], x.v.shape[3]
    lens = _check_cache_lens(cache_lens, b, j, q.device)
    num_splits = check_positive_int("num_splits", num_splits, or_none=True)
    if q.numel() == 0 or j == 0:  # nothing to attend: every query has no key
        return q.new_zeros(b, h, i, d_v)
    if torch.is_grad_enabled() and (q.requires_grad or x.k.requires_grad or x.v.requires_grad):
        return _DecodeAttention.apply(q, x.k, x.v, lens, x.scale, num_splits)  # to refuse a backward
    return _decode(q, x.k, x.v, lens, x.scale, num_splits)
