"""The launch of the split-KV decoding kernels of :mod:`flashattn.triton.decode_kernels`.

``triton_decode`` takes inputs checked by ``flashattn.decode_attention``,
pads the head dimensions, picks the key tile and the number of chunks, and
runs the two kernels: one program per (chunk, K/V head and row tile,
sequence), then one merge program per query row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .attention import _fit_head_dim, _kernel_head_dim
from .runtime import check_device, is_interpreted, launch, load_kernels

MAX_ROWS = 64  # stacked query rows (g * i) per program; more rows take more programs
MAX_SPLITS = 256  # the merge kernel holds every chunk of a row at once


@dataclass(frozen=True)
class DecodeConfig:
    """How the chunk kernel is launched: its key tile, warps and pipeline stages."""

    block_k: int
    num_warps: int
    num_stages: int


# Measured on the H200 by benchmarks/bench_decode.py --tune (benchmarks/results/decode-tune-h200.json):
# a decoding program streams K and V and does little arithmetic, so what counts is how many bytes
# each SM has in flight. The same shapes fit an A100's shared memory.
_CONFIG_16BIT = DecodeConfig(block_k=64, num_warps=4, num_stages=3)
_CONFIG_FLOAT32 = DecodeConfig(block_k=32, num_warps=4, num_stages=2)
_CONFIG_INTERPRETER = DecodeConfig(block_k=64, num_warps=4, num_stages=1)
# enough programs for a few per SM, so that loads of one program hide the latency of another's
PROGRAMS_PER_SM = 4
MIN_TILES_PER_SPLIT = 4  # a chunk shorter than this costs more in its merge than it saves


def decode_config(dtype: torch.dtype, interpreted: bool) -> DecodeConfig:
    """The launch of the chunk kernel for inputs in ``dtype``."""
    if interpreted:
        return _CONFIG_INTERPRETER
    return _CONFIG_FLOAT32 if dtype == torch.float32 else _CONFIG_16BIT


def row_block(g: int, i: int) -> int:
    """Rows per program: the ``g * i`` stacked query rows rounded up to a power of two, from 16 to MAX_ROWS."""
    return min(MAX_ROWS, max(16, 1 << (g * i - 1).bit_length()))


def choose_num_splits(b: int, h_kv: int, g: int, i: int, j: int, block_k: int, sm_count: int) -> int:
    """How many chunks to cut each sequence's keys into, from the shape and the GPU.

    Enough programs to give each of ``sm_count`` SMs ``PROGRAMS_PER_SM`` of
    them, but no chunk shorter than ``MIN_TILES_PER_SPLIT`` key tiles, and one
    chunk when the grid is already full without splitting.
    """
    programs = b * h_kv * math.ceil(g * i / row_block(g, i))  # programs per chunk
    wanted = math.ceil(PROGRAMS_PER_SM * sm_count / programs)
    most = max(1, math.ceil(j / block_k) // MIN_TILES_PER_SPLIT)
    return max(1, min(wanted, most, MAX_SPLITS))


def triton_decode(q: Tensor, k: Tensor, v: Tensor, lens: Tensor | None, scale: float, num_splits: int | None) -> Tensor:
    """Split-KV attention of ``q`` (b, h, i, d) against ``k`` (b, h_kv, j, d), ``v`` (b, h_kv, j, d_v).

    ``lens`` (b,) integers in ``[0, j]`` or None for ``j``. Returns
    ``(b, h, i, d_v)`` in the dtype of ``q``. CUDA tensors, or CPU tensors
    under ``TRITON_INTERPRET=1``.
    """
    kernels = load_kernels("decode_kernels", "decode_attention")
    interpreted = is_interpreted(kernels.decode_split_kernel)
    check_device("decode_attention", interpreted, q.device)
    dtype = q.dtype
    if interpreted and dtype == torch.bfloat16:
        # numpy has no bfloat16, and the interpreter's stand-in computes it wrongly: work in float32
        q, k, v = q.float(), k.float(), v.float()
    b, h, i, d = q.shape
    h_kv, j, d_v = k.shape[1], k.shape[2], v.shape[3]
    g = h // h_kv
    # zero columns change no score q k^T, and add output columns that are cut off again
    head_dim, head_dim_v = _kernel_head_dim(d), _kernel_head_dim(d_v)
    q, k, v = _fit_head_dim(q, head_dim), _fit_head_dim(k, head_dim), _fit_head_dim(v, head_dim_v)

    cfg = decode_config(q.dtype, interpreted)
    block_m = row_block(g, i)
    if num_splits is None:
        sm_count = 1 if interpreted else torch.cuda.get_device_properties(q.device).multi_processor_count
        num_splits = choose_num_splits(b, h_kv, g, i, j, cfg.block_k, sm_count)
    # more chunks than key tiles would only add empty ones: the result is the same without them
    num_splits = max(1, min(num_splits, math.ceil(j / cfg.block_k), MAX_SPLITS))

    o_part = q.new_empty(b, h, i, num_splits, head_dim_v, dtype=torch.float32)
    lse_part = q.new_empty(b, h, i, num_splits, dtype=torch.float32)
    lens_arg = lens if lens is not None else lse_part  # not read without lengths
    grid = (num_splits, h_kv * math.ceil(g * i / block_m), b)
    launch(kernels.decode_split_kernel, grid,
        q, k, v, lens_arg, o_part, lse_part,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        h, g, i, j, num_splits, scale * math.log2(math.e),
        D=head_dim, DV=head_dim_v, BLOCK_M=block_m, BLOCK_K=cfg.block_k, HAS_LENS=lens is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    o = q.new_empty(b, h, i, head_dim_v)
    launch(kernels.decode_merge_kernel, (b * h * i,),
        o_part, lse_part, o, *o.stride()[:3], h, i, num_splits,
        DV=head_dim_v, BLOCK_S=max(2, 1 << (num_splits - 1).bit_length()),
    )
    return o[..., :d_v].to(dtype)
