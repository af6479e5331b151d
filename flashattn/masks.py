"""Masks and biases that attention takes: True in a mask means "may attend"."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .inputs import check_lengths_in_range, check_positive_int


def causal_mask(i: int, j: int, device: torch.device | str | None = None) -> Tensor:
    """The causal mask of ``i`` queries over ``j`` keys, aligned bottom-right.

    Query ``r`` may attend key ``c`` when ``c <= r + (j - i)``: the last query
    sees every key, as in decoding with a KV cache. For ``i == j`` this is the
    lower triangle. Returns a bool tensor of shape ``(i, j)``.
    """
    # a comparison of two ranges: bool tril is slow on some CPUs
    return torch.arange(j, device=device)[None, :] <= torch.arange(i, device=device)[:, None] + (j - i)


def padding_mask(lengths: Tensor | Sequence[int], j: int) -> Tensor:
    """Key-padding mask: batch element ``n`` may attend its first ``lengths[n]`` keys.

    ``lengths`` is an integer tensor of shape ``(b,)`` (or a list of ints)
    with values in ``[0, j]``; others raise ``ValueError``.
    Returns a bool tensor of shape ``(b, 1, 1, j)`` on the device of
    ``lengths``, which broadcasts over heads and queries without being
    expanded, so the fused kernels stay eligible.
    """
    if not isinstance(lengths, Tensor):
        try:
            lengths = torch.as_tensor(lengths)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"lengths must be a 1-D integer tensor (b,) or a list of ints, got {lengths!r}") from error
    if lengths.dim() != 1 or lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise ValueError(
            f"lengths must be a 1-D integer tensor (b,), got shape {tuple(lengths.shape)} "
            f"and dtype {lengths.dtype}"
        )
    check_lengths_in_range("lengths", lengths, j)
    positions = torch.arange(j, device=lengths.device)  # (j,)
    return (positions < lengths[:, None])[:, None, None, :]  # (b, 1, 1, j)


def alibi_slopes(h: int) -> list[float]:
    """The head slopes of ALiBi (Press et al., 2022).

    For ``h`` a power of two: ``2 ** (-8 k / h)`` for ``k = 1 .. h``. Otherwise
    the slopes of the nearest lower power of two ``p``, followed by every
    other slope of ``2 p``, as the paper's code does.
    """
    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]

    check_positive_int("the number of heads h", h)
    p = 2 ** math.floor(math.log2(h))
    return geometric(p) + geometric(2 * p)[0::2][: h - p]


def alibi_bias(h: int, i: int, j: int, device: torch.device | str | None = None) -> Tensor:
    """ALiBi's additive bias, ``-slope[head] * |distance|``, of shape ``(h, i, j)`` (float32).

    Query ``r`` stands at position ``r + (j - i)`` among the keys (the
    bottom-right alignment of :func:`causal_mask`), so the bias is zero on the
    causal diagonal and falls linearly with the distance to it.
    """
    slopes = torch.tensor(alibi_slopes(h), device=device)  # (h,)
    query_pos = torch.arange(i, device=device) + (j - i)  # (i,)
    key_pos = torch.arange(j, device=device)  # (j,)
    distance = (query_pos[:, None] - key_pos[None, :]).abs()  # (i, j)
    return -slopes[:, None, None] * distance  # (h, i, j)
