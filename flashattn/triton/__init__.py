"""The package's Triton kernels: FlashAttention-2, split-KV decoding, and what loads and launches them.

- :mod:`flashattn.triton.kernels`: the forward kernel and the backward's three kernels,
  their tiles loaded by pointers or (``TMA=True``) moved by TMA descriptors.
- :mod:`flashattn.triton.hopper`: when ``triton_attention`` takes the TMA loads
  (capability 9.x, where they were measured faster), and how it launches them.
- :mod:`flashattn.triton.launch`: tile sizes, warps and stages per GPU and problem.
- :mod:`flashattn.triton.attention`: ``triton_attention`` and ``triton_forward``.
- :mod:`flashattn.triton.decode_kernels`, :mod:`flashattn.triton.decoding`: the
  split-KV chunk and merge kernels behind ``flashattn.decode_attention``, and their launch.
- :mod:`flashattn.triton.runtime`: loading the kernel modules, launching on a GPU
  or through Triton's interpreter.
- :mod:`flashattn.triton.empty_rows`: zeroing the output rows that have no key.
- :mod:`flashattn.triton.fa3_kernels`, :mod:`flashattn.triton.fa3`: FlashAttention-3's
  forward on Hopper in Gluon (a producer warp feeding one or two consumer warpgroups
  through mbarriers), and its launch; not yet chosen by ``triton_attention``.

Importing this package does not import triton: the kernels are imported on
the first call, so ``flashattn`` works without triton installed.
"""

from .attention import triton_attention, triton_forward

__all__ = ["triton_attention", "triton_forward"]
