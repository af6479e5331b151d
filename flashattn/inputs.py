"""The inputs of attention, checked and prepared once for every implementation.

Every implementation of the package (the einsum path, the flash path, the
tiled PyTorch code and the Triton kernels) starts with :func:`prepare`:
the same checks, whose errors name the argument and the shapes, the same
4-D views of ``k`` and ``v``, the same default scale and the same
grouped-query group size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _shapes(q: Tensor, k: Tensor, v: Tensor, names: tuple[str, str, str] = ("q", "k", "v")) -> str:
    return f"{names[0]} {_shape(q)}, {names[1]} {_shape(k)}, {names[2]} {_shape(v)}"


def _check_broadcasts(name: str, t: Tensor, target: tuple[int, int, int, int]) -> None:
    """Raise unless ``t`` broadcasts to ``target`` = (b, h, i, j) without growing it."""
    # each axis, aligned from the right, is 1 or the target's size (a few integer comparisons:
    # torch.broadcast_shapes costs tens of microseconds of host time per call)
    shape = t.shape
    fits = len(shape) <= 4 and all(n == 1 or n == m for n, m in zip(reversed(shape), reversed(target)))
    if not fits:
        raise ValueError(
            f"{name} of shape {_shape(t)} does not broadcast to (b, h, i, j) = {target}; "
            f"use for example (i, j), (b, 1, 1, j), (b, 1, i, j) or (b, h, i, j)"
        )


def check_attention_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    attn_bias: Tensor | None = None,
    names: tuple[str, str, str] = ("q", "k", "v"),
) -> tuple[Tensor, Tensor]:
    """Check the inputs of attention and return ``k`` and ``v`` as 4-D views.

    ``q`` is ``(b, h, i, d)``; ``k`` and ``v`` are ``(b, h_kv, j, d)`` and
    ``(b, h_kv, j, d_v)`` with ``h % h_kv == 0``, or 3-D ``(b, j, d)``, one
    head shared by all (returned as ``(b, 1, j, d)``). ``mask`` is bool and
    ``attn_bias`` floating, each broadcastable to ``(b, h, i, j)``.
    ``names`` are the caller's names of ``q``, ``k`` and ``v``, for the errors.
    Raises ``TypeError`` for a wrong type or dtype, ``ValueError`` for shapes.
    """
    qn, kn, vn = names
    for name, t in ((qn, q), (kn, k), (vn, v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if q.dim() != 4:
        raise ValueError(f"{qn} must be 4-D (b, h, i, d), got shape {_shape(q)}")
    for name, t in ((kn, k), (vn, v)):
        if t.dim() not in (3, 4):
            raise ValueError(
                f"{name} must be 4-D (b, h_kv, j, d) or 3-D (b, j, d), got shape {_shape(t)}"
            )
    if k.dim() != v.dim():
        raise ValueError(f"{kn} and {vn} must have the same number of dimensions, got {kn} {_shape(k)} and {vn} {_shape(v)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{qn}, {kn} and {vn} must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{qn}, {kn} and {vn} must be on one device, got {q.device}, {k.device} and {v.device}")

    k4 = k if k.dim() == 4 else k.unsqueeze(1)  # (b, h_kv, j, d)
    v4 = v if v.dim() == 4 else v.unsqueeze(1)  # (b, h_kv, j, d_v)
    b, h, i, d = q.shape
    h_kv, j = k4.shape[1], k4.shape[2]
    if k4.shape[0] != b or v4.shape[0] != b:
        raise ValueError(f"{qn}, {kn} and {vn} must have the same batch size, got {_shapes(q, k, v, names)}")
    if k4.shape[-1] != d:
        raise ValueError(f"{qn} and {kn} must have the same head dimension d, got {_shapes(q, k, v, names)}")
    if v4.shape[2] != j:
        raise ValueError(f"{kn} and {vn} must have the same length j, got {_shapes(q, k, v, names)}")
    if v4.shape[1] != h_kv:
        raise ValueError(f"{kn} and {vn} must have the same number of heads, got {_shapes(q, k, v, names)}")
    if h_kv == 0 or h == 0:
        raise ValueError(f"{qn}, {kn} and {vn} must have at least one head, got {_shapes(q, k, v, names)}")
    if h % h_kv != 0:
        raise ValueError(
            f"the heads of {qn} ({h}) must be a multiple of the heads of {kn} and {vn} ({h_kv}), got {_shapes(q, k, v, names)}"
        )
    if d == 0 or v4.shape[-1] == 0:
        raise ValueError(f"the head dimensions d and d_v must be positive, got {_shapes(q, k, v, names)}")

    target = (b, h, i, j)
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"mask must be a bool tensor (True = may attend), got {got}")
        _check_broadcasts("mask", mask, target)
        if mask.device != q.device:
            raise ValueError(f"mask is on {mask.device} but q is on {q.device}")
    if attn_bias is not None:
        if not isinstance(attn_bias, Tensor) or not attn_bias.is_floating_point():
            got = attn_bias.dtype if isinstance(attn_bias, Tensor) else type(attn_bias).__name__
            raise TypeError(f"attn_bias must be a floating-point tensor, got {got}")
        _check_broadcasts("attn_bias", attn_bias, target)
        if attn_bias.device != q.device:
            raise ValueError(f"attn_bias is on {attn_bias.device} but q is on {q.device}")
    return k4, v4


def check_lengths_in_range(name: str, lengths: Tensor, j: int, j_is: str = "") -> None:
    """Raise ``ValueError`` unless every value of the integer tensor ``lengths`` lies in ``[0, j]``.

    Reading the values waits for the GPU once when they live there; inside a
    CUDA graph capture, which cannot wait, nothing is checked. ``j_is`` says
    where ``j`` comes from, for the error (``"k_cache.shape[2]"``).
    """
    if lengths.numel() == 0 or (lengths.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    low, high = (int(x) for x in torch.aminmax(lengths))
    if low < 0 or high > j:
        where = f" (j = {j_is})" if j_is else ""
        raise ValueError(f"{name} must lie in [0, j] = [0, {j}]{where}, got values from {low} to {high}")


def check_positive_int(name: str, value: int | None, *, or_none: bool = False) -> int | None:
    """Return ``value`` if it is a positive int (or None, when ``or_none``); raise ``ValueError`` naming ``name`` otherwise.

    A bool is not taken for an int here, nor ``2.0``.
    """
    if or_none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be {'None or ' if or_none else ''}a positive integer, got {value!r}")
    return value


def check_flag(name: str, value: bool) -> bool:
    """Return ``value`` if it is a bool; raise ``TypeError`` naming ``name`` otherwise (``0.1`` is not ``True``)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} of type {type(value).__name__}")
    return value


def check_dropout(dropout: float) -> float:
    """Return ``dropout`` as a float, or raise ``ValueError`` unless it lies in ``[0, 1)``."""
    p = float(dropout)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    return p


def check_scale(scale: float | None) -> float | None:
    """Return ``scale`` as a float (None keeps the default ``d ** -0.5``); raise ``ValueError`` unless finite."""
    if scale is None:
        return None
    s = float(scale)
    if not math.isfinite(s):
        raise ValueError(f"scale must be a finite number or None, got {scale}")
    return s


@dataclass(frozen=True)
class Prepared:
    """Checked inputs of attention: ``q`` ``(b, h, i, d)``, ``k`` ``(b, h_kv, j, d)``, ``v`` ``(b, h_kv, j, d_v)``.

    ``scale`` is the factor on ``q k^T`` (``d ** -0.5`` unless chosen) and
    ``group`` the number of query heads that share one key/value head.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    scale: float
    group: int

    @property
    def is_empty(self) -> bool:
        """Whether there is nothing to compute: no batch element, no query or no key."""
        return self.q.numel() == 0 or self.k.shape[2] == 0


def prepare(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    mask: Tensor | None = None,
    attn_bias: Tensor | None = None,
    at_least: torch.dtype | None = None,
    names: tuple[str, str, str] = ("q", "k", "v"),
) -> Prepared:
    """Check the inputs of attention and bring them to one form (see :class:`Prepared`).

    3-D ``k``, ``v`` ``(b, j, d)`` become ``(b, 1, j, d)`` views, through
    which autograd returns gradients of the original shape. With
    ``at_least``, ``q``, ``k`` and ``v`` are cast, once checked, to the wider
    of their dtype and ``at_least`` (the working dtype of an implementation
    that computes in more precision than its inputs).
    ``mask`` and ``attn_bias`` are checked, not changed; ``names`` are the
    caller's names of ``q``, ``k`` and ``v``, for the errors.
    """
    k, v = check_attention_inputs(q, k, v, mask, attn_bias, names)
    scale = check_scale(scale)
    if at_least is not None:
        work = torch.promote_types(q.dtype, at_least)
        q, k, v = q.to(work), k.to(work), v.to(work)
    return Prepared(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale, q.shape[1] // k.shape[1])
