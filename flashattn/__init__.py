"""flashattn: FlashAttention from the softmax up to a GPU kernel.

``FlashAttention`` is the module to use in a model; ``tiled_attention`` and
``triton_attention`` are the algorithm written out, in PyTorch and in Triton,
as the book derives it.
"""

from .attention import FlashAttention
from .decoding import decode_attention
from .masks import alibi_bias, causal_mask, padding_mask
from .online_softmax import merge_partials, online_softmax_update, safe_softmax, streaming_softmax
from .ring import ring_attention, shard_sequence, unshard_sequence
from .tiled import tiled_attention
from .triton import triton_attention

__all__ = [
    "FlashAttention",
    "alibi_bias",
    "causal_mask",
    "decode_attention",
    "merge_partials",
    "online_softmax_update",
    "padding_mask",
    "ring_attention",
    "safe_softmax",
    "shard_sequence",
    "streaming_softmax",
    "tiled_attention",
    "triton_attention",
    "unshard_sequence",
]

__version__ = "0.1.0"
