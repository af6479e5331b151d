"""How each Triton kernel is launched: tile sizes, warps and pipeline stages, per GPU and problem.

The table is keyed by GPU architecture, head dimension and sequence length,
and was measured by ``benchmarks/tune_triton.py``. The kernels need an
NVIDIA GPU of compute capability 8.0 or newer (Ampere, Ada, Hopper, ...):
older ones, such as the T4 (7.5) that Colab sometimes gives, are refused
with an error that says so, because no launch here was compiled for them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_CAPABILITY = (8, 0)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256  # padded head dimensions above this do not fit the tiles in shared memory


@dataclass(frozen=True)
class TileConfig:
    """How one kernel is launched: its tile of queries and of keys, warps, pipeline stages."""

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class KernelConfigs:
    """The launch of each kernel of one attention call; the backward's preprocessing pass needs none.

    On Hopper, ``flashattn.triton.hopper.hopper_configs`` may put a
    ``HopperLaunch`` (a TMA kernel) in place of any of them.
    """

    fwd: TileConfig
    dkdv: TileConfig
    dq: TileConfig


def with_launches(configs: KernelConfigs, fwd: object = None, dkdv: object = None, dq: object = None) -> KernelConfigs:
    """``configs`` with the launches given in place of its own (None keeps one), built once per combination.

    The Hopper and Gluon dispatches replace a few launches of a few table
    rows on every call: the same handful of combinations, so they are kept.
    """
    key = (configs, fwd, dkdv, dq)
    replaced = _replaced.get(key)
    if replaced is None:
        replaced = _replaced[key] = KernelConfigs(fwd or configs.fwd, dkdv or configs.dkdv, dq or configs.dq)
    return replaced


_replaced: dict[tuple, KernelConfigs] = {}

_Launch = tuple[int, int, int, int]  # (block_q, block_k, num_warps, num_stages)


def _configs(fwd: _Launch, dkdv: _Launch, dq: _Launch) -> KernelConfigs:
    return KernelConfigs(TileConfig(*fwd), TileConfig(*dkdv), TileConfig(*dq))


# (block_q, block_k, num_warps, num_stages) for 16-bit inputs, keyed by architecture, padded head
# dimension (16 and 32 share the rows of 64) and length: "short" when neither i nor j exceeds
# SHORT, "long" otherwise, "any" where the length does not matter. For dK/dV, block_k is the tile a
# program owns and block_q the tile it streams; for the forward and dQ, the other way round.
#
# Hopper's rows are chosen by benchmarks/tune_triton.py on the H200 (flashattn/results/tune-h200-*.json):
# long sequences favour large tiles; short causal ones small tiles, which waste less work on the
# diagonal (9-14% faster at n = 1k). Without the causal rule, the small tiles gain 2-3% at n = 1k
# and lose 6-9% at n = 2k. Ampere's rows are not timed here: they are shapes that fit the shared
# memory of every Ampere and Ada GPU (99 KiB per block), as ptxas reports them compiled for sm80
# (tests/test_compile_sm80.py); three of their launches spill a little (24 to 64 bytes of stack
# with triton 3.9, listed there), and all were run on an H100 with the table forced, against float64
# (benchmarks/results/check-sm80-rows-h100.json).
SHORT = 2048
_TABLE: dict[tuple[str, int, str], KernelConfigs] = {
    ("sm90", 64, "short"): _configs(fwd=(64, 64, 4, 3), dkdv=(32, 64, 4, 3), dq=(128, 64, 8, 3)),
    ("sm90", 64, "long"): _configs(fwd=(128, 64, 8, 4), dkdv=(32, 64, 4, 4), dq=(128, 64, 8, 3)),
    ("sm90", 128, "short"): _configs(fwd=(64, 64, 4, 3), dkdv=(32, 64, 4, 3), dq=(128, 64, 8, 3)),
    ("sm90", 128, "long"): _configs(fwd=(128, 128, 8, 3), dkdv=(64, 128, 8, 3), dq=(128, 64, 8, 3)),
    ("sm90", 256, "any"): _configs(fwd=(64, 32, 4, 3), dkdv=(32, 64, 8, 2), dq=(64, 64, 8, 2)),
    ("sm80", 64, "any"): _configs(fwd=(128, 64, 4, 3), dkdv=(32, 128, 8, 3), dq=(128, 64, 8, 3)),
    ("sm80", 128, "any"): _configs(fwd=(128, 64, 8, 3), dkdv=(32, 64, 8, 2), dq=(64, 64, 8, 2)),
    ("sm80", 256, "any"): _configs(fwd=(64, 32, 4, 2), dkdv=(16, 32, 4, 2), dq=(32, 32, 4, 2)),
}
# float32 tiles take twice the memory of 16-bit ones: small tiles, the same on every GPU
_FLOAT32 = {
    64: _configs(fwd=(32, 32, 4, 2), dkdv=(32, 32, 4, 2), dq=(32, 32, 4, 2)),
    128: _configs(fwd=(32, 32, 4, 1), dkdv=(32, 32, 4, 1), dq=(32, 32, 4, 1)),
    256: _configs(fwd=(16, 16, 4, 1), dkdv=(16, 16, 4, 1), dq=(16, 16, 4, 1)),
}
# the interpreter runs each program as numpy code: few, large tiles are fastest
_INTERPRETER = _configs(fwd=(64, 64, 4, 1), dkdv=(64, 64, 4, 1), dq=(64, 64, 4, 1))
PREPROCESS_BLOCK_Q = 64


def launch_table() -> dict[tuple[str, int, str], KernelConfigs]:
    """The launches for 16-bit inputs, keyed by (architecture, padded head dimension, length), as a new dict.

    Length is "short" when neither i nor j exceeds :data:`SHORT`, "long"
    otherwise, and "any" where it does not matter. Reading it needs no triton.
    """
    return dict(_TABLE)


def use_rows(rows: dict[tuple[str, int, str], KernelConfigs]) -> None:
    """Put ``rows`` into the table for 16-bit inputs from now on: a tuning run times its proposal so."""
    for key, configs in rows.items():
        if not isinstance(configs, KernelConfigs):
            raise TypeError(f"the row {key} must be a KernelConfigs, got {type(configs).__name__}")
    _TABLE.update(rows)


def float32_table() -> dict[int, KernelConfigs]:
    """The launches for float32 inputs, keyed by padded head dimension (the same on every GPU), as a new dict."""
    return dict(_FLOAT32)


_forced: KernelConfigs | None = None


@contextlib.contextmanager
def forced_configs(configs: KernelConfigs) -> Iterator[None]:
    """Within the block, launch every kernel of ``triton_attention`` with ``configs``, whatever the GPU.

    The table is then bypassed, the Hopper launches included: to run one
    GPU's rows on another, or tiles small enough to see one by one. Inputs
    are still checked; a launch that does not fit the GPU fails to compile.
    """
    if not isinstance(configs, KernelConfigs):
        raise TypeError(f"configs must be a KernelConfigs, got {type(configs).__name__}")
    global _forced
    before, _forced = _forced, configs
    try:
        yield
    finally:
        _forced = before


def is_forced() -> bool:
    """Whether a :func:`forced_configs` block is active."""
    return _forced is not None


def kernel_head_dim(n: int) -> int:
    """The head dimension the kernels work with: a power of two, at least 16 (the smallest tensor-core product)."""
    return max(16, 1 << (n - 1).bit_length())


def fit_head_dim(t: Tensor, size: int) -> Tensor:
    """``t`` with its last dimension zero-padded to ``size`` and unit-strided, as the kernels read it."""
    if t.shape[-1] < size:
        return F.pad(t, (0, size - t.shape[-1]))
    return t if t.stride(-1) == 1 else t.contiguous()


def kernel_operands(q: Tensor, k: Tensor, v: Tensor, interpreted: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``q``, ``k``, ``v`` as the kernels read them: head dimensions padded to :func:`kernel_head_dim`, unit last stride.

    Zero columns change no score ``q k^T``, and add output columns that the
    caller cuts off again. In the interpreter bfloat16 becomes float32: numpy
    has no bfloat16, and the interpreter's stand-in computes it wrongly.
    """
    if interpreted and q.dtype == torch.bfloat16:
        q, k, v = q.float(), k.float(), v.float()
    head_dim, head_dim_v = kernel_head_dim(q.shape[-1]), kernel_head_dim(v.shape[-1])
    return fit_head_dim(q, head_dim), fit_head_dim(k, head_dim), fit_head_dim(v, head_dim_v)


_capabilities: dict[tuple[object, int], tuple[int, int]] = {}


def device_capability(device: torch.device) -> tuple[int, int]:
    """``torch.cuda.get_device_capability(device)``, asked once per GPU.

    A GPU's capability does not change, and asking torch costs microseconds
    on every call. The answer is kept per function too, so that code which
    replaces ``torch.cuda.get_device_capability`` (a test, or chapter 09
    asking what a T4 would get) is answered by its replacement. A device
    without an index (``torch.device("cuda")``) is asked each time: which GPU
    it names depends on the current device.
    """
    ask = torch.cuda.get_device_capability
    if device.index is None:
        return tuple(ask(device))
    key = (ask, device.index)
    capability = _capabilities.get(key)
    if capability is None:
        capability = _capabilities[key] = tuple(ask(device))
    return capability


def check_capability(device: torch.device) -> tuple[int, int]:
    """Raise ``RuntimeError`` unless ``device`` is a GPU that the launch table serves (capability 8.0 or newer); return its capability."""
    capability = device_capability(device)
    if capability < MIN_CAPABILITY:
        raise RuntimeError(
            f"triton_attention needs an NVIDIA GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
            f"or newer (Ampere or later); {device} ({torch.cuda.get_device_name(device)}) has "
            f"{capability[0]}.{capability[1]}. tiled_attention and FlashAttention compute the same function there."
        )
    return capability


def fits_kernels(device: torch.device, dtype: torch.dtype, d: int, d_v: int) -> bool:
    """Whether the package's Triton kernels take inputs of ``dtype`` with head dimensions ``d``, ``d_v`` on CUDA ``device``."""
    return (
        dtype in KERNEL_DTYPES
        and max(d, d_v) <= MAX_HEAD_DIM
        and device_capability(device) >= MIN_CAPABILITY
    )


def table_key(device: torch.device, head_dim: int, i: int, j: int) -> tuple[str, int, str]:
    """The row of ``_TABLE`` for 16-bit inputs: architecture, padded head dimension, length."""
    major, _ = check_capability(device)
    # Hopper's rows serve later GPUs too; Ampere's serve every GPU before Hopper
    arch = "sm90" if major >= 9 else "sm80"
    row = max(head_dim, 64)
    length = "short" if max(i, j) <= SHORT else "long"
    return (arch, row, length) if (arch, row, length) in _TABLE else (arch, row, "any")


def pick_configs(
    device: torch.device, dtype: torch.dtype, head_dim: int, i: int, j: int, interpreted: bool = False
) -> KernelConfigs:
    """How to launch each kernel for ``i`` queries and ``j`` keys in ``dtype`` on ``device``.

    ``head_dim`` is the padded head dimension the kernels see.
    """
    if _forced is not None:
        return _forced
    if interpreted:
        return _INTERPRETER
    if dtype == torch.float32:
        check_capability(device)
        return _FLOAT32[max(head_dim, 64)]
    return _TABLE[table_key(device, head_dim, i, j)]  # table_key checks the capability
