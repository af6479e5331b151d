"""FlashAttention-3's forward on Hopper (the Gluon kernel of ``fa3_kernels``), from Python.

``STEPS`` lists its launches in the order the schedule is built: one
consumer warpgroup, two, the softmax overlapped with the next product, and
the two warpgroups taking turns (ping-pong).

:func:`fa3_forward` returns ``(o, lse)`` as :func:`~flashattn.triton.triton_forward`
does, so that the Triton backward (:func:`~flashattn.triton.attention.triton_backward`)
takes its output. :func:`fa3_unsupported` says in one line why it cannot take
given inputs here, or None when it can.

Gluon is Triton's lower-level language, experimental, and its API moves
between releases (``tma.async_copy_global_to_shared`` became
``tma.async_load`` after 3.6), so the kernel is used only with the triton
versions in ``GLUON_TRITONS``: with each, it compiles for sm90 without a
spill (tests/test_fa3.py). Gluon has no CPU interpreter; the kernel runs on
a Hopper GPU only, where tests/test_fa3.py checks it against float64.
``triton_attention`` takes it for its forward where ``_GLUON_TABLE`` has a
row (:func:`gluon_configs`): where it was measured faster than the Triton
forward, as the Hopper table's rows were chosen (d = 128, lengths over
``hopper.HOPPER_SHORT``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from ..inputs import check_flag, prepare
from . import runtime
from .hopper import TMA_DTYPES, hopper_key, tma_fits
from .launch import KernelConfigs, device_capability, with_launches

GLUON_TRITONS = ((3, 6), (3, 9))  # (major, minor) releases whose Gluon compiles the kernel for sm90
HEAD_DIMS = (64, 128)
BLOCK_M = 64  # query rows per consumer warpgroup: its WGMMA tile
BLOCK_N = 128  # keys per tile
STAGES = 2  # K/V slots in shared memory: 16 KiB of Q + 2 x 64 KiB of K and V at d = 128, bfloat16
WARPGROUPS = (1, 2)  # consumer warpgroups per program: step (a) has one, step (b) two that share the K/V slots
# how a consumer orders one key tile's work (fa3_kernels.fa3_consume): each product waited for before the
# next step; the next tile's scores issued with this tile's P V and the softmax run while P V does (step c);
# that, and two warpgroups handing the tensor cores to each other after each issue (step d)
SCHEDULES = {"serial": 0, "overlap": 1, "pingpong": 2}
# the launches a reader can compare, in the order the chapter builds them: (warpgroups, schedule)
STEPS = ((1, "serial"), (2, "serial"), (1, "overlap"), (2, "overlap"), (2, "pingpong"))

def _inputs_unsupported(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """Why the kernel cannot take these inputs with this triton, wherever they live; None when it can."""
    version = runtime._installed_triton()
    if version is None or runtime._parse(version) not in GLUON_TRITONS:
        tested = ", ".join(f"{major}.{minor}" for major, minor in GLUON_TRITONS)
        return f"the Gluon kernel is built with triton {tested} only; found {runtime._found()}"
    if q.dtype not in TMA_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"the Gluon kernel takes float16 or bfloat16, all three alike; got q {q.dtype}, k {k.dtype}, v {v.dtype}"
    d, d_v = q.shape[-1], v.shape[-1]
    if d not in HEAD_DIMS or d_v != d:
        return f"the Gluon kernel takes d = d_v in {HEAD_DIMS}; got d = {d}, d_v = {d_v}"
    if not tma_fits(q, k, v):
        return ("TMA descriptors need a last stride of 1 and every other stride and the base address on 16 bytes; "
                f"got strides q {tuple(q.stride())}, k {tuple(k.stride())}, v {tuple(v.stride())}")
    return None


def fa3_unsupported(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """Why :func:`fa3_forward` cannot run on these inputs here, in one line; None when it can.

    ``q`` (b, h, i, d), ``k`` and ``v`` (b, h_kv, j, d), as the kernels take them.
    """
    reason = _inputs_unsupported(q, k, v)
    if reason is not None:
        return reason
    if q.device.type != "cuda":
        return f"the Gluon kernel runs on a Hopper GPU (Gluon has no CPU interpreter), got q on {q.device}"
    capability = device_capability(q.device)
    if capability[0] != 9:
        return ("the Gluon kernel uses WGMMA and TMA, which need compute capability 9.x; "
                f"this GPU has {capability[0]}.{capability[1]}")
    return None


@dataclass(frozen=True)
class GluonLaunch:
    """How ``triton_attention`` runs its forward with the Gluon kernel: consumer warpgroups and schedule."""

    warpgroups: int
    schedule: str


def _kernels() -> ModuleType:
    return importlib.import_module(f"{__package__}.fa3_kernels")


@functools.cache
def _shared_layout(rows: int, d: int, dtype: torch.dtype) -> object:
    """The shared-memory layout of one (1, 1, rows, d) tile: the same few on every call, built once."""
    from triton.experimental.gluon import language as gl

    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, d], gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


@functools.cache
def _descriptor_defaults() -> dict[str, object]:
    """The fields of Gluon's ``TensorDescriptor`` that have defaults, with them (3.9 added one)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    return {f.name: f.default for f in dataclasses.fields(TensorDescriptor) if f.default is not dataclasses.MISSING}


def _descriptor(t: Tensor, rows: int) -> object:
    """A TMA descriptor of ``t`` (b, heads, n, d) whose box is one tile: (1, 1, rows, d).

    Built without the dataclass's own checks, which cost microseconds on
    every call (three descriptors per launch): the same alignment was
    checked before the kernel was chosen (:func:`_inputs_unsupported`), and
    the box is one of two constant shapes. ``tests/test_fa3.py`` checks
    that the result equals the checked construction.
    """
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    d = t.shape[-1]
    descriptor = object.__new__(TensorDescriptor)
    descriptor.__dict__.update(_descriptor_defaults(), base=t, shape=list(t.shape), strides=list(t.stride()),
                               block_shape=[1, 1, rows, d], layout=_shared_layout(rows, d, t.dtype))
    return descriptor


def fa3_forward(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: float | None = None, warpgroups: int = 1,
    schedule: str = "serial",
) -> tuple[Tensor, Tensor]:
    """Attention's forward by the Gluon kernel: ``(o, lse)``, as :func:`~flashattn.triton.triton_forward` returns them.

    ``q`` (b, h, i, d), ``k`` and ``v`` (b, h_kv, j, d) with ``h_kv`` dividing
    ``h``; ``causal`` is the bottom-right rule. ``o`` is (b, h, i, d) in the
    inputs' dtype and ``lse`` (b, h, i) float32, -inf for a row with no key
    (whose ``o`` is zero). ``warpgroups`` is the number of consumer
    warpgroups per program (``WARPGROUPS``), each with ``BLOCK_M`` rows;
    ``schedule`` one of ``SCHEDULES`` ("pingpong" needs two warpgroups).
    Raises ``ValueError`` with the reason of :func:`fa3_unsupported` where
    the kernel cannot run.
    """
    causal = check_flag("causal", causal)
    if warpgroups not in WARPGROUPS:
        raise ValueError(f"fa3_forward: warpgroups must be one of {WARPGROUPS}, got {warpgroups!r}")
    if schedule not in SCHEDULES or (schedule == "pingpong" and warpgroups != 2):
        raise ValueError(f"fa3_forward: schedule must be one of {tuple(SCHEDULES)}, \"pingpong\" with warpgroups=2; "
                         f"got schedule={schedule!r} with warpgroups={warpgroups}")
    x = prepare(q, k, v, scale=scale)
    reason = fa3_unsupported(q, x.k, x.v)
    if reason is not None:
        raise ValueError(f"fa3_forward: {reason}")
    if x.is_empty:  # no kernel on an empty grid; a row without keys has o = 0 and lse = -inf
        b, h, i, d = q.shape
        return q.new_zeros(b, h, i, d), q.new_full((b, h, i), -math.inf, dtype=torch.float32)
    # the kernel scales the row maximum, which needs scale >= 0; (-q) k^T |scale| is the same scores
    q_k, scale = (-q, -x.scale) if x.scale < 0 else (q, x.scale)
    return launch_gluon(q_k, x.k, x.v, causal, scale, GluonLaunch(warpgroups, schedule))


def launch_gluon(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                 cfg: GluonLaunch) -> tuple[Tensor, Tensor]:
    """Run the Gluon forward on inputs already checked: ``(o, lse)``, as ``attention.launch_forward`` returns them.

    ``scale`` must not be negative.
    """
    b, h, i, _ = q.shape
    j = k.shape[2]
    o = q.new_empty(b, h, i, v.shape[-1])
    lse = q.new_empty(b, h, i, dtype=torch.float32)
    runtime.launch(_kernels().fa3_fwd_kernel, (math.ceil(i / (cfg.warpgroups * BLOCK_M)), h, b),
        _descriptor(q, BLOCK_M), _descriptor(k, BLOCK_N), _descriptor(v, BLOCK_N), o, lse,
        *o.stride()[:3], h, h // k.shape[1], i, j, scale * math.log2(math.e),
        CAUSAL=causal, STAGES=STAGES, CONSUMERS=cfg.warpgroups, SCHEDULE=SCHEDULES[cfg.schedule], num_warps=4,
    )
    return o, lse


# (head dimension, causal, length) -> the Gluon forward's launch for triton_attention, where it was measured
# faster than the forward that hopper.hopper_configs chooses (keys as hopper.hopper_key makes them). The rule:
# at every length measured for the key, the step's slowest sample beat the Triton forward's fastest
# (flashattn/results/fa3-steps-h100.json; tests/test_fa3.py checks the rows against it). At d = 64 no step
# did; the short rows were not measured.
_GLUON_TABLE: dict[tuple[int, bool, str], GluonLaunch] = {
    (128, False, "long"): GluonLaunch(2, "serial"),
    (128, True, "long"): GluonLaunch(2, "serial"),
}


def gluon_table() -> dict[tuple[int, bool, str], GluonLaunch]:
    """The Gluon forward's rows, keyed by (head dimension, causal, length), as a new dict."""
    return dict(_GLUON_TABLE)


@contextlib.contextmanager
def gluon_rows(rows: dict[tuple[int, bool, str], GluonLaunch]) -> Iterator[None]:
    """Within the block, ``triton_attention`` takes the Gluon forward at ``rows`` (in place of the table's)."""
    global _GLUON_TABLE
    before, _GLUON_TABLE = _GLUON_TABLE, dict(rows)
    try:
        yield
    finally:
        _GLUON_TABLE = before


def gluon_configs(configs: KernelConfigs, device: torch.device, causal: bool, q: Tensor, k: Tensor,
                  v: Tensor) -> KernelConfigs:
    """``configs`` with the Gluon forward in place of ``configs.fwd`` where ``_GLUON_TABLE`` has a row and it runs.

    It runs on a GPU of compute capability 9.x, with a triton of
    ``GLUON_TRITONS``, for inputs it takes (:func:`fa3_unsupported`);
    anywhere else ``configs`` comes back unchanged, and the Triton kernels
    run as before, without a word to the caller.
    """
    if not _GLUON_TABLE:
        return configs
    cfg = _GLUON_TABLE.get(hopper_key(q.shape[-1], causal, q.shape[2], k.shape[2]))
    if cfg is None or device_capability(device)[0] != 9 or _inputs_unsupported(q, k, v) is not None:
        return configs
    return with_launches(configs, fwd=cfg)


class _FA3Attention(torch.autograd.Function):
    """The Gluon forward, and the Triton backward on the (o, lse) it returns."""

    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None, warpgroups: int, schedule: str
    ) -> Tensor:
        o, lse = fa3_forward(q, k, v, causal=causal, scale=scale, warpgroups=warpgroups, schedule=schedule)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do: Tensor) -> tuple[Tensor | None, ...]:
        from .attention import triton_backward  # here, not at the top: attention imports this module

        q, k, v, o, lse = ctx.saved_tensors
        return (*triton_backward(do, q, k, v, o, lse, causal=ctx.causal, scale=ctx.scale), None, None, None, None)


def fa3_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: float | None = None, warpgroups: int = 1,
    schedule: str = "serial",
) -> Tensor:
    """Attention by :func:`fa3_forward`, its gradients by the Triton backward: what a dispatch to Gluon would run.

    Arguments and errors as for :func:`fa3_forward`; returns ``o``.
    """
    return _FA3Attention.apply(q, k, v, causal, scale, warpgroups, schedule)
