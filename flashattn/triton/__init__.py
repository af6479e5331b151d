"""FlashAttention-2 as Triton kernels: the kernels, their launch table, and the autograd function around them.

- :mod:`flashattn.triton.kernels`: the forward kernel and the backward's three kernels.
- :mod:`flashattn.triton.launch`: tile sizes, warps and stages per GPU and problem.
- :mod:`flashattn.triton.attention`: ``triton_attention`` and ``triton_forward``.

Importing this package does not import triton: the kernels are imported on
the first call, so ``flashattn`` works without triton installed.
"""

from .attention import triton_attention, triton_forward

__all__ = ["triton_attention", "triton_forward"]
