"""FlashAttention-2 in Triton: the kernels of :mod:`flashattn.triton.kernels` behind a ``torch.autograd.Function``.

``triton_attention`` computes the same function as ``tiled_attention``, the
algorithm written in PyTorch: the forward saves only ``o`` and ``lse``, the
backward recomputes the probabilities tile by tile. It runs on CUDA tensors
(float16, bfloat16, float32) on GPUs of compute capability 8.0 or newer, or,
when ``TRITON_INTERPRET=1`` is set before its first call, on CPU tensors
through Triton's interpreter (triton 3.7 or newer).

``triton_forward`` runs the forward kernel alone and returns ``(o, lse)``, as
``tiled_forward_fa2`` does. Tile sizes and launch options come from a table
keyed by GPU architecture, head dimension and sequence length
(:mod:`flashattn.triton.launch`). On Hopper, the kernels that move their
tiles by TMA (:mod:`flashattn.triton.hopper`) take the place of those that
were measured slower there, and so would the Gluon forward
(:mod:`flashattn.triton.fa3`) where its table has a row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from ..inputs import Prepared, check_flag, prepare
from ..tiled import tiled_attention, tiled_backward, tiled_forward_fa2
from . import fa3, hopper
from .fa3 import GluonLaunch
from .hopper import HopperLaunch
from .launch import (
    KERNEL_DTYPES, MAX_HEAD_DIM, PREPROCESS_BLOCK_Q, KernelConfigs, TileConfig, fit_head_dim, is_forced, kernel_operands,
    pick_configs,
)
from .runtime import check_device, is_interpreted, launch, load_kernels


def _kernels() -> ModuleType:
    """The kernel module, imported on first use: ``flashattn`` itself does not need triton."""
    return load_kernels("kernels", "triton_attention")


def _run(name: str, grid: tuple[int, int, int], *args: object, **kwargs: object) -> None:
    """Launch the kernel ``name`` of :mod:`flashattn.triton.kernels` on ``grid``."""
    launch(getattr(_kernels(), name), grid, *args, **kwargs)


def launch_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, cfg: TileConfig | HopperLaunch | GluonLaunch
) -> tuple[Tensor, Tensor]:
    """Run the forward kernel: returns ``o`` (b, h, i, d_v) and ``lse`` (b, h, i) float32."""
    if isinstance(cfg, HopperLaunch):
        return hopper.forward(q, k, v, causal, scale, cfg)
    if isinstance(cfg, GluonLaunch):
        return fa3.launch_gluon(q, k, v, causal, scale, cfg)
    b, h, i, d = q.shape
    h_kv, j, d_v = k.shape[1], k.shape[2], v.shape[3]
    o = q.new_empty(b, h, i, d_v)
    lse = q.new_empty(b, h, i, dtype=torch.float32)
    grid = (math.ceil(i / cfg.block_q), h, b)
    _run("attn_fwd_kernel", grid,
        q, k, v, o, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        h // h_kv, i, j, scale * math.log2(math.e),
        D=d, DV=d_v, BLOCK_Q=cfg.block_q, BLOCK_K=cfg.block_k, CAUSAL=causal,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return o, lse


def launch_backward_preprocess(o: Tensor, do: Tensor) -> Tensor:
    """The backward's first pass: ``delta = rowsum(dO * O)`` (b, h, i) float32."""
    b, h, i, d_v = o.shape
    delta = o.new_empty(b, h, i, dtype=torch.float32)
    _run("attn_bwd_preprocess_kernel", (math.ceil(i / PREPROCESS_BLOCK_Q), h, b),
        o, do, delta, *o.stride()[:3], *do.stride()[:3], i, DV=d_v, BLOCK_Q=PREPROCESS_BLOCK_Q,
    )
    return delta


def launch_backward_dkdv(
    q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor, causal: bool, scale: float,
    cfg: TileConfig | HopperLaunch,
) -> tuple[Tensor, Tensor]:
    """The backward's second pass: ``dk`` (b, h_kv, j, d) and ``dv`` (b, h_kv, j, d_v), one key tile per program."""
    if isinstance(cfg, HopperLaunch):
        return hopper.backward_dkdv(q, k, v, do, lse, delta, causal, scale, cfg)
    b, h, i, d = q.shape
    h_kv, j, d_v = k.shape[1], k.shape[2], v.shape[3]
    dk, dv = k.new_empty(k.shape), v.new_empty(v.shape)
    _run("attn_bwd_dkdv_kernel", (math.ceil(j / cfg.block_k), h_kv, b),
        q, k, v, do, lse, delta, dk, dv,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        h, h // h_kv, i, j, scale, scale * math.log2(math.e),
        D=d, DV=d_v, BLOCK_Q=cfg.block_q, BLOCK_K=cfg.block_k, CAUSAL=causal,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dk, dv


def launch_backward_dq(
    q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor, causal: bool, scale: float,
    cfg: TileConfig | HopperLaunch,
) -> Tensor:
    """The backward's third pass: ``dq`` (b, h, i, d), one query tile per program."""
    if isinstance(cfg, HopperLaunch):
        return hopper.backward_dq(q, k, v, do, lse, delta, causal, scale, cfg)
    b, h, i, d = q.shape
    h_kv, j, d_v = k.shape[1], k.shape[2], v.shape[3]
    dq = q.new_empty(q.shape)
    _run("attn_bwd_dq_kernel", (math.ceil(i / cfg.block_q), h, b),
        q, k, v, do, lse, delta, dq,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
        h // h_kv, i, j, scale, scale * math.log2(math.e),
        D=d, DV=d_v, BLOCK_Q=cfg.block_q, BLOCK_K=cfg.block_k, CAUSAL=causal,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dq


def launch_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
    causal: bool, scale: float, configs: KernelConfigs,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward in three passes: delta = rowsum(dO * O), then dK and dV, then dQ."""
    tma = isinstance(configs.dkdv, HopperLaunch) or isinstance(configs.dq, HopperLaunch)
    if do.stride(-1) != 1 or (tma and not hopper.tma_fits(do)):
        do = do.contiguous()  # a fresh tensor: rows and base aligned as TMA needs
    delta = launch_backward_preprocess(o, do)
    dk, dv = launch_backward_dkdv(q, k, v, do, lse, delta, causal, scale, configs.dkdv)
    dq = launch_backward_dq(q, k, v, do, lse, delta, causal, scale, configs.dq)
    return dq, dk, dv


class _TritonAttention(torch.autograd.Function):
    """The kernels' forward and backward: saves only ``q``, ``k``, ``v``, ``o`` and ``lse``.

    Takes inputs in the form the kernels read, which ``kernel_inputs`` gives:
    ``q`` (b, h, i, d), ``k`` (b, h_kv, j, d), ``v`` (b, h_kv, j, d_v), 4-D,
    last dimension unit-strided, ``d`` and ``d_v`` powers of two from 16 to
    256, one dtype of float16, bfloat16, float32; ``scale >= 0``. Returns
    ``o`` (b, h, i, d_v).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, configs: KernelConfigs
    ) -> Tensor:
        o, lse = launch_forward(q, k, v, causal, scale, configs.fwd)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale, ctx.configs = causal, scale, configs
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, do: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = launch_backward(do, q, k, v, o, lse, ctx.causal, ctx.scale, ctx.configs)
        return dq, dk, dv, None, None, None


@dataclass
class KernelInputs:
    """Inputs in the form the kernels read (see ``_TritonAttention``), and what gives the result back its form.

    ``negated``: the kernels take ``scale >= 0``, so a negative scale is run
    as ``(-q) k^T |scale|``; the gradient of ``q`` then changes sign.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    scale: float
    configs: KernelConfigs
    d_v: int
    dtype: torch.dtype
    negated: bool

    def output(self, o: Tensor) -> Tensor:
        """The kernels' ``o`` (b, h, i, padded d_v) in the caller's form: sliced and cast only where it differs."""
        if o.shape[-1] != self.d_v:
            o = o[..., : self.d_v]
        return o if o.dtype == self.dtype else o.to(self.dtype)


def kernel_inputs(q: Tensor, x: Prepared, causal: bool = False) -> KernelInputs:
    """Check ``q`` and the prepared inputs ``x`` (:func:`~flashattn.inputs.prepare`) for the kernels, and bring them to their form."""
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"triton_attention takes float16, bfloat16 or float32 inputs, got {q.dtype}")
    d, d_v = q.shape[-1], x.v.shape[-1]
    if max(d, d_v) > MAX_HEAD_DIM:
        raise ValueError(
            f"triton_attention takes head dimensions up to {MAX_HEAD_DIM}, got d = {d} and d_v = {d_v} "
            f"(q {tuple(q.shape)}, v {tuple(x.v.shape)})"
        )
    interpreted = is_interpreted(_kernels().attn_fwd_kernel)
    check_device("triton_attention", interpreted, q.device)

    q_k, k, v = kernel_operands(q, x.k, x.v, interpreted)
    negated = x.scale < 0
    # the kernels need scale >= 0 (they scale the row maximum, not every score); (-q) k^T |scale| is the same
    q_k, scale = (-q_k, -x.scale) if negated else (q_k, x.scale)
    configs = pick_configs(q.device, q_k.dtype, q_k.shape[-1], q.shape[2], k.shape[2], interpreted)
    if not interpreted and not is_forced():
        configs = hopper.hopper_configs(configs, q.device, q_k.shape[-1], causal, q.shape[2], k.shape[2], q_k, k, v)
        configs = fa3.gluon_configs(configs, q.device, causal, q_k, k, v)
    return KernelInputs(q_k, k, v, scale, configs, d_v, q.dtype, negated)


def triton_forward(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """The forward kernel alone, as ``tiled_forward_fa2`` computes it: no autograd.

    Arguments as for :func:`triton_attention`. Returns ``(o, lse)``: ``o``
    ``(b, h, i, d_v)`` in the dtype of ``q``, and ``lse`` ``(b, h, i)`` in
    float32, ``-inf`` for a row with no key (whose ``o`` is zero).
    """
    causal = check_flag("causal", causal)
    x = prepare(q, k, v, scale=scale)  # 3-D k, v become (b, 1, j, ·) views, through which autograd returns
    if x.is_empty:  # nothing to compute: no kernel is launched on an empty grid
        return tiled_forward_fa2(q, k, v, causal=causal, scale=scale)
    inputs = kernel_inputs(q, x, causal)
    o, lse = launch_forward(inputs.q, inputs.k, inputs.v, causal, inputs.scale, inputs.configs.fwd)
    return inputs.output(o), lse


def triton_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, *, causal: bool = False,
    scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward kernels alone, as ``tiled_backward`` computes them: no autograd.

    ``do`` and ``o`` ``(b, h, i, d_v)`` and ``lse`` ``(b, h, i)`` as
    :func:`triton_forward` returns them (or those of a larger attention,
    restricted to these rows, as the ring passes them); the other arguments
    as for :func:`triton_attention`. Returns ``(dq, dk, dv)`` shaped and
    typed like ``q``, ``k``, ``v``.
    """
    causal = check_flag("causal", causal)
    x = prepare(q, k, v, scale=scale)
    if x.is_empty:
        return tiled_backward(do, q, k, v, o, lse, causal=causal, scale=scale)
    inputs = kernel_inputs(q, x, causal)
    d, d_v = q.shape[-1], x.v.shape[-1]
    do, o = (fit_head_dim(t.to(inputs.q.dtype), inputs.v.shape[-1]) for t in (do, o))
    dq, dk, dv = launch_backward(do, inputs.q, inputs.k, inputs.v, o, lse.float().contiguous(), causal, inputs.scale,
                           inputs.configs)
    dq = -dq if inputs.negated else dq
    return dq[..., :d].to(q.dtype), dk[..., :d].reshape(k.shape).to(k.dtype), dv[..., :d_v].reshape(v.shape).to(v.dtype)


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
    causal = check_flag("causal", causal)
    x = prepare(q, k, v, scale=scale)
    if x.is_empty:
        return tiled_attention(q, k, v, causal=causal, scale=scale)
    inputs = kernel_inputs(q, x, causal)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        o = _TritonAttention.apply(inputs.q, inputs.k, inputs.v, causal, inputs.scale, inputs.configs)
    else:  # no gradient asked for: the kernel alone, without autograd's bookkeeping on the host
        o, _ = launch_forward(inputs.q, inputs.k, inputs.v, causal, inputs.scale, inputs.configs.fwd)
    return inputs.output(o)
