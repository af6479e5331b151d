"""The online softmax: the softmax computed block by block, and the merge of two partial results.

Everything here works along the last dimension, one row at a time, with any
leading dimensions, and in the dtype of the scores it is given: the running
statistics of half-precision scores are off by per cents, so pass float32
scores (as the tiled code and the kernels keep their statistics in float32). Scores of ``-inf`` stand for masked entries; a row whose
every score is ``-inf`` has no key to attend, and its probabilities (and the
output built from them) are zeros, never NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .inputs import check_positive_int


def finite_or_zero(m: Tensor) -> Tensor:
    """``m`` with ``-inf`` replaced by 0: a shift that keeps ``exp(-inf - shift)`` at 0 instead of NaN."""
    return torch.where(torch.isneginf(m), 0.0, m)


def safe_softmax(s: Tensor) -> Tensor:
    r"""The softmax over the last dimension, computed with the row maximum subtracted.

    .. math::

        m = \max_c s_c, \qquad p_c = \frac{e^{s_c - m}}{\sum_{c'} e^{s_{c'} - m}}

    Subtracting ``m`` changes nothing mathematically (it cancels between
    numerator and denominator) but keeps every exponent at most 0, so no
    ``exp`` overflows. ``s`` is ``(..., n)``; returns ``p`` of the same shape.
    A row of only ``-inf`` gives zeros; rows of no entries (``n = 0``) stay empty.
    """
    if s.shape[-1] == 0:
        return s.clone()
    m = s.amax(dim=-1, keepdim=True)  # (..., 1)
    e = torch.exp(s - finite_or_zero(m))  # (..., n)
    l = e.sum(dim=-1, keepdim=True)  # (..., 1)
    return e / torch.where(l > 0, l, 1.0)  # an empty row has e = 0 and stays 0


def online_softmax_update(m: Tensor, l: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Fold one block of scores into the running maximum ``m`` and running sum ``l``.

    Before the first block ``m = -inf`` and ``l = 0``. For the next block of
    scores ``s``:

    .. math::

        m' = \max\bigl(m, \max_c s_c\bigr), \qquad
        \alpha = e^{m - m'}, \qquad
        p_c = e^{s_c - m'}, \qquad
        \ell' = \alpha\, \ell + \sum_c p_c

    After the last block, ``l`` is the row sum of ``exp(s - m)`` over every
    score seen and ``m + log(l)`` their log-sum-exp. Anything accumulated with
    the old maximum, such as FlashAttention's unnormalized output, is brought
    to the new one by multiplying it by ``alpha``.

    ``m``, ``l``: ``(...)``; ``s``: ``(..., n)`` with ``n >= 1``.
    Returns ``(m', l', p, alpha)``: ``m'``, ``l'``, ``alpha`` ``(...)`` and
    ``p`` ``(..., n)``.
    """
    m_new = torch.maximum(m, s.amax(dim=-1))  # (...)
    shift = finite_or_zero(m_new)  # a row that has seen only -inf keeps alpha = p = 0
    alpha = torch.exp(m - shift)  # (...)
    p = torch.exp(s - shift[..., None])  # (..., n)
    l_new = alpha * l + p.sum(dim=-1)  # (...)
    return m_new, l_new, p, alpha


def streaming_softmax(s: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    r"""The softmax over the last dimension, with its statistics gathered in one pass over blocks.

    The pass visits the columns ``block_size`` at a time and carries only
    ``(m, l)`` from block to block (:func:`online_softmax_update`); it never
    holds a whole row's maximum before it has seen the whole row. Then

    .. math::

        \mathrm{lse} = m + \log \ell, \qquad p_c = e^{s_c - \mathrm{lse}}

    ``s`` is ``(..., n)``. Returns ``(p, lse)``: ``p`` ``(..., n)`` and
    ``lse`` ``(...)``, which is ``-inf`` (and ``p`` zero) for a row of only
    ``-inf``.
    """
    check_positive_int("block_size", block_size)
    m = s.new_full(s.shape[:-1], float("-inf"))  # (...)
    l = s.new_zeros(s.shape[:-1])  # (...)
    for start in range(0, s.shape[-1], block_size):
        m, l, _, _ = online_softmax_update(m, l, s[..., start : start + block_size])
    lse = m + torch.log(l)  # (...); log(0) = -inf for an empty row
    p = torch.exp(s - finite_or_zero(lse)[..., None])  # (..., n)
    return p, lse


def merge_partials(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    r"""Merge the attention outputs of two disjoint sets of keys into the output over both.

    If ``o_a`` is the softmax-weighted average of the values of key set
    :math:`\mathcal{A}`, with log-sum-exp ``lse_a`` of its scores, and
    likewise for :math:`\mathcal{B}`, then over :math:`\mathcal{A} \cup \mathcal{B}`

    .. math::

        \mathrm{lse} = \log\bigl(e^{\mathrm{lse}_a} + e^{\mathrm{lse}_b}\bigr), \qquad
        o = e^{\mathrm{lse}_a - \mathrm{lse}}\, o_a + e^{\mathrm{lse}_b - \mathrm{lse}}\, o_b

    since each part's softmax denominator is :math:`e^{\mathrm{lse}}` of that
    part. This identity lets attention be computed over pieces of the keys
    and combined afterwards: tile by tile (FlashAttention-1's forward), split
    over the KV cache in decoding, or passed around a ring of devices. A part
    with no key (``lse = -inf``, ``o = 0``) leaves the other unchanged; two
    such parts give ``lse = -inf`` and ``o = 0``.

    ``o_a``, ``o_b``: ``(..., d_v)``; ``lse_a``, ``lse_b``: ``(...)``.
    Returns ``(o, lse)`` with the same shapes.
    """
    lse = torch.logaddexp(lse_a, lse_b)  # (...)
    shift = finite_or_zero(lse)
    w_a = torch.exp(lse_a - shift)[..., None]  # (..., 1)
    w_b = torch.exp(lse_b - shift)[..., None]  # (..., 1)
    return w_a * o_a + w_b * o_b, lse
