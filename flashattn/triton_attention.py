"""FlashAttention-2 in Triton: the kernels of ``triton_kernels`` behind a ``torch.autograd.Function``.

``triton_attention`` computes the same function as ``tiled_attention``, the
algorithm written in PyTorch: the forward saves only ``o`` and ``lse``, the
backward recomputes the probabilities tile by tile. It runs on CUDA tensors
(float16, bfloat16, float32), or, when ``TRITON_INTERPRET=1`` is set before
its first call, on CPU tensors through Triton's interpreter.

``triton_forward`` runs the forward kernel alone and returns ``(o, lse)``, as
``tiled_forward_fa2`` does. Tile sizes and launch options come from a table
keyed by GPU architecture, head dimension and sequence length, measured by
``benchmarks/tune_triton.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from .checks import check_attention_inputs, check_scale

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class TileConfig:
    """How one kernel is launched: its tile of queries and of keys, warps, pipeline stages."""

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class KernelConfigs:
    """The launch of each kernel of one attention call; the backward's preprocessing pass needs none."""

    fwd: TileConfig
    dkdv: TileConfig
    dq: TileConfig


_Launch = tuple[int, int, int, int]  # (block_q, block_k, num_warps, num_stages)


def _configs(fwd: _Launch, dkdv: _Launch, dq: _Launch) -> KernelConfigs:
    return KernelConfigs(TileConfig(*fwd), TileConfig(*dkdv), TileConfig(*dq))


# (block_q, block_k, num_warps, num_stages) for 16-bit inputs, keyed by architecture, padded head
# dimension (16 and 32 share the rows of 64) and length: "short" when neither i nor j exceeds
# SHORT, "long" otherwise, "any" where the length does not matter. For dK/dV, block_k is the tile a
# program owns and block_q the tile it streams; for the forward and dQ, the other way round.
#
# Hopper's rows are chosen by benchmarks/tune_triton.py on the H200 (benchmarks/results/tune-h200-*.json):
# long sequences favour large tiles; short causal ones small tiles, which waste less work on the
# diagonal (9-14% faster at n = 1k). Without the causal rule, the small tiles gain 2-3% at n = 1k
# and lose 6-9% at n = 2k. Ampere's rows are not measured here: they are shapes that fit the
# shared memory of every Ampere and Ada GPU (99 KiB per block) without spilling registers, as
# ptxas reports them.
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
_PREPROCESS_BLOCK_Q = 64


def table_key(device: torch.device, head_dim: int, i: int, j: int) -> tuple[str, int, str]:
    """The row of ``_TABLE`` for 16-bit inputs: architecture, padded head dimension, length."""
    major, _ = torch.cuda.get_device_capability(device)
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
    if interpreted:
        return _INTERPRETER
    if dtype == torch.float32:
        return _FLOAT32[max(head_dim, 64)]
    return _TABLE[table_key(device, head_dim, i, j)]


def _kernels() -> ModuleType:
    """The kernel module, imported on first use: ``flashattn`` itself does not need triton."""
    try:
        from . import triton_kernels
    except ImportError as error:
        raise ImportError(
            "triton_attention needs triton (pip install triton, or the flashattn[triton] extra); "
            "tiled_attention computes the same function in plain PyTorch"
        ) from error
    return triton_kernels


def _is_interpreted(kernels: ModuleType) -> bool:
    """Whether the kernels were defined under ``TRITON_INTERPRET=1`` (then they run numpy code on the CPU)."""
    import triton

    return not isinstance(kernels.attn_fwd_kernel, triton.runtime.JITFunction)


def _kernel_head_dim(n: int) -> int:
    """The head dimension the kernels work with: a power of two, at least 16 (the smallest tensor-core product)."""
    return max(16, 1 << (n - 1).bit_length())


def _fit_head_dim(t: Tensor, size: int) -> Tensor:
    """``t`` with its last dimension zero-padded to ``size`` and unit-strided, as the kernels read it."""
    if t.shape[-1] < size:
        return F.pad(t, (0, size - t.shape[-1]))
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, cfg: TileConfig) -> tuple[Tensor, Tensor]:
    """Run the forward kernel: returns ``o`` (b, h, i, d_v) and ``lse`` (b, h, i) float32."""
    b, h, i, d = q.shape
    h_kv, j, d_v = k.shape[1], k.shape[2], v.shape[3]
    o = q.new_empty(b, h, i, d_v)
    lse = q.new_empty(b, h, i, dtype=torch.float32)
    grid = (math.ceil(i / cfg.block_q), h, b)
    _kernels().attn_fwd_kernel[grid](
        q, k, v, o, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        h // h_kv, i, j, scale * math.log2(math.e),
        D=d, DV=d_v, BLOCK_Q=cfg.block_q, BLOCK_K=cfg.block_k, CAUSAL=causal,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return o, lse


def _backward_preprocess(o: Tensor, do: Tensor) -> Tensor:
    """The backward's first pass: ``delta = rowsum(dO * O)`` (b, h, i) float32."""
    b, h, i, d_v = o.shape
    delta = o.new_empty(b, h, i, dtype=torch.float32)
    _kernels().attn_bwd_preprocess_kernel[(math.ceil(i / _PREPROCESS_BLOCK_Q), h, b)](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], i, DV=d_v, BLOCK_Q=_PREPROCESS_BLOCK_Q,
    )
    return delta


def _backward_dkdv(
    q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor, causal: bool, scale: float, cfg: TileConfig
) -> tuple[Tensor, Tensor]:
    """The backward's second pass: ``dk`` (b, h_kv, j, d) and ``dv`` (b, h_kv, j, d_v), one key tile per program."""
    b, h, i, d = q.shape
    h_kv, j, d_v = k.shape[1], k.shape[2], v.shape[3]
    dk, dv = k.new_empty(k.shape), v.new_empty(v.shape)
    _kernels().attn_bwd_dkdv_kernel[(math.ceil(j / cfg.block_k), h_kv, b)](
        q, k, v, do, lse, delta, dk, dv,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        h, h // h_kv, i, j, scale, scale * math.log2(math.e),
        D=d, DV=d_v, BLOCK_Q=cfg.block_q, BLOCK_K=cfg.block_k, CAUSAL=causal,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dk, dv


def _backward_dq(
    q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor, causal: bool, scale: float, cfg: TileConfig
) -> Tensor:
    """The backward's third pass: ``dq`` (b, h, i, d), one query tile per program."""
    b, h, i, d = q.shape
    h_kv, j, d_v = k.shape[1], k.shape[2], v.shape[3]
    dq = q.new_empty(q.shape)
    _kernels().attn_bwd_dq_kernel[(math.ceil(i / cfg.block_q), h, b)](
        q, k, v, do, lse, delta, dq,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
        h // h_kv, i, j, scale, scale * math.log2(math.e),
        D=d, DV=d_v, BLOCK_Q=cfg.block_q, BLOCK_K=cfg.block_k, CAUSAL=causal,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dq


def _backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
    causal: bool, scale: float, configs: KernelConfigs,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward in three passes: delta = rowsum(dO * O), then dK and dV, then dQ."""
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = _backward_preprocess(o, do)
    dk, dv = _backward_dkdv(q, k, v, do, lse, delta, causal, scale, configs.dkdv)
    dq = _backward_dq(q, k, v, do, lse, delta, causal, scale, configs.dq)
    return dq, dk, dv


class _TritonAttention(torch.autograd.Function):
    """The kernels' forward and backward: saves only ``q``, ``k``, ``v``, ``o`` and ``lse``.

    Takes inputs in the form the kernels read, which ``_prepare`` gives:
    ``q`` (b, h, i, d), ``k`` (b, h_kv, j, d), ``v`` (b, h_kv, j, d_v), 4-D,
    last dimension unit-strided, ``d`` and ``d_v`` powers of two from 16 to
    256, one dtype of float16, bfloat16, float32; ``scale >= 0``. Returns
    ``o`` (b, h, i, d_v).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, configs: KernelConfigs
    ) -> Tensor:
        o, lse = _forward(q, k, v, causal, scale, configs.fwd)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale, ctx.configs = causal, scale, configs
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, do: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.causal, ctx.scale, ctx.configs)
        return dq, dk, dv, None, None, None


@dataclass
class _Prepared:
    """Inputs in the form the kernels read, and what is needed to give the result back its form."""

    q: Tensor
    k: Tensor
    v: Tensor
    scale: float
    configs: KernelConfigs
    d_v: int
    dtype: torch.dtype


def _prepare(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> _Prepared:
    """Check the inputs and bring them to the form the kernels read (see ``_TritonAttention``)."""
    k, v = check_attention_inputs(q, k, v)  # 3-D k, v become (b, 1, j, ·) views, through which autograd returns
    scale = check_scale(scale)
    if q.dtype not in _DTYPES:
        raise TypeError(f"triton_attention takes float16, bfloat16 or float32 inputs, got {q.dtype}")
    d, d_v = q.shape[-1], v.shape[-1]
    if max(d, d_v) > _MAX_HEAD_DIM:
        raise ValueError(
            f"triton_attention takes head dimensions up to {_MAX_HEAD_DIM}, got d = {d} and d_v = {d_v} "
            f"(q {tuple(q.shape)}, v {tuple(v.shape)})"
        )
    interpreted = _is_interpreted(_kernels())
    if interpreted and q.device.type != "cpu":
        raise ValueError(f"under TRITON_INTERPRET=1 the kernels run on CPU tensors, got q on {q.device}")
    if not interpreted and q.device.type != "cuda":
        raise ValueError(
            f"triton_attention runs on CUDA tensors, got q on {q.device}; to run it on the CPU, "
            "set TRITON_INTERPRET=1 before its first call"
        )

    dtype = q.dtype
    if interpreted and dtype == torch.bfloat16:
        # numpy has no bfloat16, and the interpreter's stand-in computes it wrongly: work in float32
        q, k, v = q.float(), k.float(), v.float()
    scale = d**-0.5 if scale is None else scale
    if scale < 0:
        # the kernels need scale >= 0 (they scale the row maximum, not every score); (-q) k^T |scale| is the same
        q, scale = -q, -scale
    head_dim, head_dim_v = _kernel_head_dim(d), _kernel_head_dim(d_v)
    # zero columns change no score q k^T, and add output columns that are cut off again
    q, k = _fit_head_dim(q, head_dim), _fit_head_dim(k, head_dim)
    v = _fit_head_dim(v, head_dim_v)
    configs = pick_configs(q.device, q.dtype, head_dim, q.shape[2], k.shape[2], interpreted)
    return _Prepared(q, k, v, scale, configs, d_v, dtype)


def triton_forward(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """The forward kernel alone, as ``tiled_forward_fa2`` computes it: no autograd.

    Arguments as for :func:`triton_attention`. Returns ``(o, lse)``: ``o``
    ``(b, h, i, d_v)`` in the dtype of ``q``, and ``lse`` ``(b, h, i)`` in
    float32, ``-inf`` for a row with no key (whose ``o`` is zero).
    """
    p = _prepare(q, k, v, scale)
    o, lse = _forward(p.q, p.k, p.v, bool(causal), p.scale, p.configs.fwd)
    return o[..., : p.d_v].to(p.dtype), lse


def triton_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: float | None = None) -> Tensor:
    """Attention by the FlashAttention-2 kernels in Triton, forward and backward.

    ``q`` ``(b, h, i, d)``; ``k`` ``(b, h_kv, j, d)`` with ``h % h_kv == 0``,
    or ``(b, j, d)`` shared by every head; ``v`` likewise with ``d_v``; any
    strides. ``causal``: query ``r`` attends key ``c`` only when
    ``c <= r + (j - i)``. ``scale`` defaults to ``d ** -0.5``. ``d`` and
    ``d_v`` go up to 256.

    Returns ``o`` ``(b, h, i, d_v)`` in the dtype of ``q``; a query row with
    no key to attend gives zeros and zero gradients. For backward, only
    ``q``, ``k``, ``v``, ``o`` and the row log-sum-exp are kept.

    Inputs are CUDA tensors in float16, bfloat16 or float32, or CPU tensors
    when ``TRITON_INTERPRET=1`` was set before the first call.
    """
    p = _prepare(q, k, v, scale)
    o = _TritonAttention.apply(p.q, p.k, p.v, bool(causal), p.scale, p.configs)  # (b, h, i, padded d_v)
    return o[..., : p.d_v].to(p.dtype)
