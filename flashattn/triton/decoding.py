"""The launch of the split-KV decoding kernels of :mod:`flashattn.triton.decode_kernels`.

``triton_decode`` takes inputs checked by ``flashattn.decode_attention``,
pads the head dimensions, picks the key tile and the number of chunks, and
runs the two kernels: one program per (chunk, K/V head and row tile,
sequence), then one merge program per query row.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from .launch import kernel_operands
from .runtime import check_device, is_interpreted, launch, load_kernels

MAX_ROWS = 64  # stacked query rows (g * i) per program; more rows take more programs
MAX_SPLITS = 256  # the merge kernel holds every chunk of a row at once


@dataclass(frozen=True)
class DecodeConfig:
    """How the chunk kernel is launched: its key tile, warps and pipeline stages."""

    block_k: int
    num_warps: int
    num_stages: int


# Measured on the H200 by benchmarks/bench_decode.py --tune (flashattn/results/decode-tune-h200.json):
# a decoding program streams K and V and does little arithmetic, so what counts is the bytes in
# flight on each SM; two stages of 64-key tiles let four or five programs share an SM (four queries
# need more registers than one). The same shapes fit an A100's shared memory.
_CONFIG_16BIT = DecodeConfig(block_k=64, num_warps=4, num_stages=2)
_CONFIG_FLOAT32 = DecodeConfig(block_k=32, num_warps=4, num_stages=2)
# float32 tiles at d = 256 asked for more shared memory than an A100 gives (212992 bytes at 64 rows and
# two stages, compiled for sm80): 16 rows (max_rows), one stage and eight warps take 64 KiB and spill no
# register there
_CONFIG_FLOAT32_WIDE = DecodeConfig(block_k=32, num_warps=8, num_stages=1)
_CONFIG_INTERPRETER = DecodeConfig(block_k=64, num_warps=4, num_stages=1)
WAVES = 1  # grids of this many full waves of programs: the chunks then all end together
MIN_TILES_PER_SPLIT = 4  # a chunk shorter than this costs more in its merge than it saves
_resident: dict[tuple, int] = {}  # programs of one compiled chunk kernel that fit on one SM at once
# the number of chunks _wave_splits chose for a shape, the least recently used dropped first: bounded,
# since a cache that grows by a token at every step has a new shape at every step
_wave_splits_chosen: OrderedDict[tuple, int] = OrderedDict()
CHOICES_KEPT = 512


def decode_config(dtype: torch.dtype, interpreted: bool, head_dim: int = 128) -> DecodeConfig:
    """The launch of the chunk kernel for inputs in ``dtype`` whose (padded) head dimension is ``head_dim``."""
    if interpreted:
        return _CONFIG_INTERPRETER
    if dtype != torch.float32:
        return _CONFIG_16BIT
    return _CONFIG_FLOAT32_WIDE if head_dim > 128 else _CONFIG_FLOAT32


def max_rows(dtype: torch.dtype, head_dim: int) -> int:
    """The most stacked query rows one program of the chunk kernel takes, for inputs in ``dtype``.

    A float32 program holds its rows' tiles at twice the bytes of a 16-bit one: at 64 rows it spills
    registers on sm80, and at d = 256 outgrows an A100's shared memory; 32 rows (16 at d > 128) fit an
    A100 and an Ada GPU (tests/test_compile_sm80.py compiles every launch for sm80).
    """
    if dtype != torch.float32:
        return MAX_ROWS
    return 16 if head_dim > 128 else 32


def use_16bit_config(cfg: DecodeConfig) -> None:
    """Launch the chunk kernel with ``cfg`` for 16-bit inputs from now on: a tuning run times its candidates so."""
    global _CONFIG_16BIT
    _CONFIG_16BIT = cfg


def measured_residency(cfg: DecodeConfig) -> list[int]:
    """The programs per SM measured so far for the compiled variants of the chunk kernel launched with ``cfg``."""
    return [n for key, n in _resident.items() if key[1] == cfg]


def row_block(g: int, i: int, most: int = MAX_ROWS) -> int:
    """Rows per program: the ``g * i`` stacked query rows rounded up to a power of two, from 16 to ``most``."""
    return min(most, max(16, 1 << (g * i - 1).bit_length()))


def choose_num_splits(b: int, h_kv: int, g: int, i: int, j: int, block_k: int, slots: int,
                      most_rows: int = MAX_ROWS) -> int:
    """How many chunks to cut each sequence's keys into, given ``slots`` programs the GPU runs at once.

    As many chunks as fill ``WAVES`` full waves of the ``slots`` (SMs times
    the programs that fit on one), so that no SM idles while others finish a
    last, partial wave; no chunk shorter than ``MIN_TILES_PER_SPLIT`` key
    tiles; one chunk when the grid fills the GPU without splitting.
    """
    programs = b * h_kv * math.ceil(g * i / row_block(g, i, most_rows))  # programs per chunk
    most = max(1, math.ceil(j / block_k) // MIN_TILES_PER_SPLIT)
    return max(1, min(WAVES * slots // programs, most, MAX_SPLITS))


def specialization(args: tuple) -> tuple:
    """What Triton compiles a separate variant of a kernel for, in these arguments.

    Triton specialises each integer argument on whether it equals 1 and
    whether it is a multiple of 16 (and pointers on 16-byte alignment,
    which PyTorch's allocator gives): one query (``i == 1``) compiles to
    other code, with other registers, than four.
    """
    return tuple((a == 1, a % 16 == 0) for a in args if isinstance(a, int) and not isinstance(a, bool))


def resident_programs(kernel, device: torch.device, cfg: DecodeConfig, args: tuple, constants: dict) -> int:
    """Programs of the chunk kernel that fit on one SM at once, measured once per compiled variant.

    One query and four compile to different code (:func:`specialization`),
    with different registers: the count is kept per variant, never shared
    between two of them.
    """
    key = (device.index, cfg, tuple(sorted(constants.items())), args[0].dtype, specialization(args))
    if key not in _resident:
        _resident[key] = _measure_resident(kernel, device, cfg, args, constants)
    return _resident[key]


def _measure_resident(kernel, device: torch.device, cfg: DecodeConfig, args: tuple, constants: dict) -> int:
    """Compile the chunk kernel for ``args`` and read what fits on one SM: its registers and shared memory against the SM's."""
    import triton

    compiled = kernel.warmup(*args, grid=(1,), **constants, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    compiled._init_handles()
    sm = triton.runtime.driver.active.utils.get_device_properties(device.index)
    threads = cfg.num_warps * 32
    by_registers = sm["max_num_regs"] // max(1, compiled.n_regs * threads)
    by_memory = sm["max_shared_mem"] // max(1, compiled.metadata.shared)
    return max(1, min(by_registers, by_memory, 2048 // threads))


def _slots(kernel, device: torch.device, cfg: DecodeConfig, args: tuple, constants: dict) -> int:
    """Programs of the chunk kernel that the GPU runs at once: SMs times how many fit on one SM."""
    return resident_programs(kernel, device, cfg, args, constants) * torch.cuda.get_device_properties(device).multi_processor_count


@dataclass(frozen=True)
class _Plan:
    """The inputs in the form the kernels read, and how they are launched."""

    kernels: ModuleType
    q: Tensor
    k: Tensor
    v: Tensor
    lens: Tensor | None
    scale: float
    cfg: DecodeConfig
    constants: dict
    num_splits: int


def _chunk_args(q: Tensor, k: Tensor, v: Tensor, lens: Tensor | None, scale: float, num_splits: int,
                o_part: Tensor, lse_part: Tensor) -> tuple:
    """The chunk kernel's arguments, writing into ``o_part`` and ``lse_part``."""
    b, h, i, _ = q.shape
    lens = lens if lens is not None else lse_part  # not read without lengths
    return (q, k, v, lens, o_part, lse_part, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            h, h // k.shape[1], i, k.shape[2], num_splits, scale * math.log2(math.e))


# What fits on an SM is read from the chunk kernel compiled for a launch of several chunks: Triton
# compiles num_splits = 2 like any other count that is neither 1 nor a multiple of 16
PROBE_SPLITS = 2


def _wave_splits(kernels: ModuleType, q: Tensor, k: Tensor, v: Tensor, lens: Tensor | None, cfg: DecodeConfig,
                 constants: dict) -> int:
    """:func:`choose_num_splits` for the programs this GPU runs at once."""
    b, h, i, _ = q.shape
    h_kv, j = k.shape[1], k.shape[2]
    probe = q.new_empty(1, dtype=torch.float32)  # compiling needs arguments of the right types only
    args = _chunk_args(q, k, v, lens, 1.0, PROBE_SPLITS, probe, probe)
    slots = _slots(kernels.decode_split_kernel, q.device, cfg, args, constants)
    return choose_num_splits(b, h_kv, h // h_kv, i, j, cfg.block_k, slots, constants["BLOCK_M"])


def _plan(q: Tensor, k: Tensor, v: Tensor, lens: Tensor | None, scale: float, num_splits: int | None) -> _Plan:
    kernels = load_kernels("decode_kernels", "decode_attention")
    interpreted = is_interpreted(kernels.decode_split_kernel)
    check_device("decode_attention", interpreted, q.device)
    g, i, j = q.shape[1] // k.shape[1], q.shape[2], k.shape[2]
    q, k, v = kernel_operands(q, k, v, interpreted)
    width = max(q.shape[-1], v.shape[-1])  # padded
    cfg = decode_config(q.dtype, interpreted, width)
    constants = dict(D=q.shape[-1], DV=v.shape[-1], BLOCK_M=row_block(g, i, max_rows(q.dtype, width)),
                     BLOCK_K=cfg.block_k, HAS_LENS=lens is not None)
    if num_splits is None:
        if interpreted:
            num_splits = 1
        else:
            # the same shapes, strides and launch choose the same number: worked out once (it compiles
            # and measures the kernel the first time), then looked up, to keep a decoding step's host time short
            key = (q.device, q.dtype, q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), cfg,
                   lens is not None)
            if key in _wave_splits_chosen:
                _wave_splits_chosen.move_to_end(key)
            else:
                _wave_splits_chosen[key] = _wave_splits(kernels, q, k, v, lens, cfg, constants)
                if len(_wave_splits_chosen) > CHOICES_KEPT:
                    _wave_splits_chosen.popitem(last=False)  # the least recently used
            num_splits = _wave_splits_chosen[key]
    # more chunks than key tiles would only add empty ones: the result is the same without them
    num_splits = max(1, min(num_splits, math.ceil(j / cfg.block_k), MAX_SPLITS))
    return _Plan(kernels, q, k, v, lens, scale, cfg, constants, num_splits)


def decode_num_splits(q: Tensor, k: Tensor, v: Tensor, lens: Tensor | None = None) -> int:
    """The number of chunks ``triton_decode`` cuts the keys into for these inputs when it chooses."""
    return _plan(q, k, v, lens, 1.0, None).num_splits


def triton_decode(q: Tensor, k: Tensor, v: Tensor, lens: Tensor | None, scale: float, num_splits: int | None) -> Tensor:
    """Split-KV attention of ``q`` (b, h, i, d) against ``k`` (b, h_kv, j, d), ``v`` (b, h_kv, j, d_v).

    ``lens`` (b,) integers in ``[0, j]`` or None for ``j``; ``num_splits``
    None chooses (:func:`choose_num_splits`). Returns ``(b, h, i, d_v)`` in
    the dtype of ``q``. CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
    """
    plan = _plan(q, k, v, lens, scale, num_splits)
    kernels = plan.kernels
    b, h, i, _ = q.shape
    h_kv, splits, cfg = k.shape[1], plan.num_splits, plan.cfg
    head_dim_v = plan.constants["DV"]
    # one chunk: the chunk kernel's result is the output; more: float32 partial results, then the merge
    o_part = plan.q.new_empty(b, h, i, splits, head_dim_v, dtype=torch.float32 if splits > 1 else plan.q.dtype)
    lse_part = plan.q.new_empty(b, h, i, splits, dtype=torch.float32)
    grid = (splits, h_kv * math.ceil(h // h_kv * i / plan.constants["BLOCK_M"]), b)
    args = _chunk_args(plan.q, plan.k, plan.v, plan.lens, plan.scale, splits, o_part, lse_part)
    launch(kernels.decode_split_kernel, grid, *args, **plan.constants,
           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if splits == 1:
        o = o_part.view(b, h, i, head_dim_v)
    else:
        o = plan.q.new_empty(b, h, i, head_dim_v)
        launch(kernels.decode_merge_kernel, (b * h * i,),
            o_part, lse_part, o, *o.stride()[:3], h, i, splits,
            DV=head_dim_v, BLOCK_S=max(2, 1 << (splits - 1).bit_length()),
        )
    return o[..., : v.shape[3]].to(q.dtype)
