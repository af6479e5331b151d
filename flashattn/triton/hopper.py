"""The kernels of :mod:`flashattn.triton.kernels` with ``TMA=True`` on Hopper: when they apply, and how they are called.

``triton_attention`` takes this path on GPUs of compute capability 9.x for
float16 and bfloat16 inputs whose layout a TMA descriptor can describe
(``tma_fits``), kernel by kernel: ``hopper_configs`` puts a Hopper launch in
place of the launch table's where ``_HOPPER_TABLE`` below has one, and leaves the
kernel with pointer loads (``TMA=False``) where it has none, because it was
measured faster there. Every other call runs the kernels with pointer loads.
The kernels create their
descriptors on the GPU, in a small workspace of global memory that Triton
asks for at each launch: ``use_torch_allocator`` lets it come from
PyTorch's caching allocator (so it is recorded in a CUDA graph like any
other tensor).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from .launch import KernelConfigs, device_capability, with_launches
from .runtime import is_interpreted, launch, load_kernels

TMA_ALIGNMENT = 16  # bytes: a descriptor's base address and row stride must be multiples of this
TMA_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class HopperLaunch:
    """How one kernel is launched with its tiles moved by TMA: tiles, warps, pipeline stages."""

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int


_L = HopperLaunch
# (padded head dimension, causal, length) -> launches of the forward, dK/dV and dQ kernels; None keeps
# the pointer kernel at the launch table's config. "short": neither i nor j above HOPPER_SHORT. Chosen by
# benchmarks/tune_hopper.py on the H200 (flashattn/results/hopper-steps-h200.json): a Hopper launch only
# where it was at least as fast as the pointer kernel at every length of its row. Warp-specialised loops,
# the next tile's scores computed early, and a fused backward never were (benchmarks/hopper_variants.py).
HOPPER_SHORT = 1024  # not launch.SHORT: the Hopper rows were measured with their own split
_HOPPER_TABLE: dict[tuple[int, bool, str], tuple[HopperLaunch | None, HopperLaunch | None, HopperLaunch | None]] = {
    (64, False, "short"): (None, None, None),
    (64, False, "long"): (_L(128, 64, 8, 3), None, _L(128, 64, 8, 3)),
    (64, True, "short"): (None, None, None),
    (64, True, "long"): (None, _L(32, 64, 4, 3), None),
    (128, False, "short"): (_L(64, 64, 4, 3), None, _L(128, 64, 8, 3)),
    (128, False, "long"): (_L(128, 128, 8, 3), None, _L(128, 64, 8, 3)),
    (128, True, "short"): (None, None, None),
    (128, True, "long"): (_L(64, 64, 4, 3), None, _L(128, 64, 8, 3)),
}
_enabled = True


def hopper_table() -> dict[tuple[int, bool, str], tuple[HopperLaunch | None, HopperLaunch | None, HopperLaunch | None]]:
    """The Hopper launches, keyed by (padded head dimension, causal, length), as a new dict.

    Each value holds the launches of the forward, dK/dV and dQ kernels; None
    keeps the pointer kernel at :func:`flashattn.triton.launch.launch_table`'s
    config. Length is "short" when neither i nor j exceeds :data:`HOPPER_SHORT`.
    """
    return dict(_HOPPER_TABLE)


def hopper_key(head_dim: int, causal: bool, i: int, j: int) -> tuple[int, bool, str]:
    """The row of a Hopper table (this module's, and ``fa3``'s): padded head dimension, causal, length."""
    return max(head_dim, 64), causal, "short" if max(i, j) <= HOPPER_SHORT else "long"


@contextlib.contextmanager
def tma_kernels(enabled: bool) -> Iterator[None]:
    """Within the block, let ``triton_attention`` take the Hopper kernels (the default) or not: to compare the two."""
    global _enabled
    before, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = before


def hopper_configs(configs: KernelConfigs, device: torch.device, head_dim: int, causal: bool, i: int, j: int,
                   *tensors: Tensor) -> KernelConfigs:
    """``configs`` with the Hopper launches of ``_HOPPER_TABLE`` in place of the pointer kernels', where they apply.

    They apply on a GPU of compute capability 9.x, for head dimensions up to
    128, when every one of ``tensors`` fits a TMA descriptor.
    """
    key = hopper_key(head_dim, causal, i, j)
    if not _enabled or key not in _HOPPER_TABLE or device_capability(device)[0] != 9 or not tma_fits(*tensors):
        return configs
    return with_launches(configs, *_HOPPER_TABLE[key])


def _kernels() -> ModuleType:
    """The kernel module, imported on first use."""
    return load_kernels("kernels", "triton_attention")


def aligned_view(buffer: Tensor, size: int, alignment: int) -> Tensor:
    """``size`` bytes of the int8 ``buffer`` (at least ``size + alignment - 1`` long), from its first address that is a multiple of ``alignment``."""
    offset = -buffer.data_ptr() % alignment
    return buffer[offset : offset + size]


def _workspace(size: int, alignment: int, stream: int | None) -> Tensor:
    """Triton's allocator: ``size`` bytes from PyTorch's caching allocator, aligned, for the launch's stream.

    ``stream`` is the handle of the CUDA stream the kernel is launched on
    (None: the current one): the block is allocated on it, so that the
    allocator reuses it only after the kernel's work on that stream.
    """
    # the current stream's handle, read as Triton's CUDA driver reads it: torch.cuda.current_stream() would
    # build a Stream object on every launch, and this runs on every launch
    on_stream = stream is not None and stream != torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)) if on_stream else contextlib.nullcontext():
        buffer = torch.empty(size + alignment - 1, dtype=torch.int8, device="cuda")
    return aligned_view(buffer, size, alignment)


def use_torch_allocator() -> None:
    """Give Triton PyTorch's allocator for the descriptors' workspace, unless the program has set one of its own.

    Whether one is set is read from triton's private state (triton has no
    public getter); where a triton keeps it elsewhere, PyTorch's is set: a
    launch without an allocator fails, one with another allocator works.
    """
    import triton

    try:
        from triton.runtime import _allocation

        unset = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except (ImportError, AttributeError):
        unset = True
    if unset:
        triton.set_allocator(_workspace)


def tma_fits(*tensors: Tensor) -> bool:
    """Whether TMA descriptors can describe the row-major matrices of every (batch, head) of ``tensors``.

    Each is ``(b, heads, rows, cols)`` with a unit last stride; the first
    element of every (batch, head) and every row must start on a multiple
    of 16 bytes.
    """
    for t in tensors:
        if t.dtype not in TMA_DTYPES:
            return False
        strides = t.stride()
        if len(strides) != 4:
            return False
        size, (s0, s1, s2, s3) = t.element_size(), strides  # unrolled: this runs on every call, three times
        if s3 != 1 or t.data_ptr() % TMA_ALIGNMENT or (s0 * size) % TMA_ALIGNMENT or (s1 * size) % TMA_ALIGNMENT \
                or (s2 * size) % TMA_ALIGNMENT:
            return False
    return True


def _launch_tma(name: str, grid: tuple[int, int, int], cfg: HopperLaunch, *args: object, **kwargs: object) -> None:
    """Launch the kernel ``name`` with ``TMA=True`` on ``grid`` with the tiles, warps and stages of ``cfg``."""
    kernel = getattr(_kernels(), name)
    if not is_interpreted(kernel):  # the interpreter keeps its descriptors in host memory
        use_torch_allocator()
    launch(kernel, grid, *args, **kwargs, BLOCK_Q=cfg.block_q, BLOCK_K=cfg.block_k, TMA=True,
           num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, cfg: HopperLaunch) -> tuple[Tensor, Tensor]:
    """The forward on Hopper: ``o`` (b, h, i, d_v) and ``lse`` (b, h, i) float32, as ``attention.launch_forward``."""
    b, h, i, d = q.shape
    h_kv, j, d_v = k.shape[1], k.shape[2], v.shape[3]
    o = q.new_empty(b, h, i, d_v)
    lse = q.new_empty(b, h, i, dtype=torch.float32)
    _launch_tma("attn_fwd_kernel", (math.ceil(i / cfg.block_q), h, b), cfg,
         q, k, v, o, lse,
         *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
         h // h_kv, i, j, scale * math.log2(math.e),
         D=d, DV=d_v, CAUSAL=causal)
    return o, lse


def backward_dkdv(
    q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor, causal: bool, scale: float,
    cfg: HopperLaunch,
) -> tuple[Tensor, Tensor]:
    """The dK/dV pass on Hopper, as ``attention.launch_backward_dkdv``."""
    b, h, i, d = q.shape
    h_kv, j, d_v = k.shape[1], k.shape[2], v.shape[3]
    dk, dv = k.new_empty(k.shape), v.new_empty(v.shape)
    _launch_tma("attn_bwd_dkdv_kernel", (math.ceil(j / cfg.block_k), h_kv, b), cfg,
         q, k, v, do, lse, delta, dk, dv,
         *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
         h, h // h_kv, i, j, scale, scale * math.log2(math.e),
         D=d, DV=d_v, CAUSAL=causal)
    return dk, dv


def backward_dq(
    q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor, causal: bool, scale: float,
    cfg: HopperLaunch,
) -> Tensor:
    """The dQ pass on Hopper, as ``attention.launch_backward_dq``."""
    b, h, i, d = q.shape
    h_kv, j, d_v = k.shape[1], k.shape[2], v.shape[3]
    dq = q.new_empty(q.shape)
    _launch_tma("attn_bwd_dq_kernel", (math.ceil(i / cfg.block_q), h, b), cfg,
         q, k, v, do, lse, delta, dq,
         *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
         h // h_kv, i, j, scale, scale * math.log2(math.e),
         D=d, DV=d_v, CAUSAL=causal)
    return dq

