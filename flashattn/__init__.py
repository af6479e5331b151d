"""flashattn: FlashAttention from the softmax up to a GPU kernel.

``FlashAttention`` is the module to use in a model; ``tiled_attention`` and
``triton_attention`` are the algorithm written out, in PyTorch and in Triton,
as the book derives it.
"""

from .attention import FlashAttention
from .masks import alibi_bias, causal_mask, padding_mask

__all__ = [
    "FlashAttention",
    "alibi_bias",
    "causal_mask",
    "padding_mask",
]

__version__ = "0.1.0"
