"""Attention in float64, written from the definition with no code shared with flashattn.

Every test compares against these functions: they loop over nothing, use
plain matrix products, and spell the causal rule and the empty rows out.
"""

from __future__ import annotations

import torch
from torch import Tensor


def reference_keep(i: int, j: int, causal: bool, mask: Tensor | None, shape: tuple[int, int]) -> Tensor:
    """The (b, h, i, j) bool tensor of what each query may attend."""
    b, h = shape
    keep = torch.ones(b, h, i, j, dtype=torch.bool)
    if causal:
        r = torch.arange(i)[:, None]
        c = torch.arange(j)[None, :]
        keep = keep & (c <= r + (j - i))  # bottom-right alignment
    if mask is not None:
        keep = keep & mask.cpu()
    return keep


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    mask: Tensor | None = None,
    attn_bias: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Attention in float64 on the CPU: q (b, h, i, d), k/v (b, h_kv, j, d) or (b, j, d).

    Rows with no key to attend are zero. Differentiable with respect to q, k, v.
    """
    q64, k64, v64 = (t.cpu().double() for t in (q, k, v))
    if k64.dim() == 3:
        k64, v64 = k64[:, None], v64[:, None]
    b, h, i, d = q64.shape
    j = k64.shape[2]
    g = h // k64.shape[1]
    k64 = k64.repeat_interleave(g, dim=1)
    v64 = v64.repeat_interleave(g, dim=1)
    scale = d**-0.5 if scale is None else scale

    s = (q64 @ k64.transpose(-1, -2)) * scale
    if attn_bias is not None:
        s = s + attn_bias.cpu().double()
    keep = reference_keep(i, j, causal, mask, (b, h))
    s = torch.where(keep, s, torch.tensor(float("-inf"), dtype=torch.float64))
    row_max = s.amax(dim=-1, keepdim=True)
    empty = ~keep.any(dim=-1, keepdim=True)
    row_max = torch.where(empty, torch.zeros_like(row_max), row_max)
    e = torch.exp(s - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(empty, torch.ones_like(denom), denom)
    return p @ v64



def copying_saved_tensors():
    """Hooks under which autograd keeps a copy of every saved tensor and unpacks a new copy each time.

    As offloading to another device does: what a backward reads is not the
    tensor the forward saved. The copies are contiguous: on CUDA, PyTorch's
    memory-efficient backward then needs the mask's strides to stay
    multiples of 4 (so j a multiple of 4 in the masks of these tests).
    """
    return torch.autograd.graph.saved_tensors_hooks(torch.clone, torch.clone)
