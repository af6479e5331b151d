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

# pyproject.toml's version, as installed into the package's metadata; a source
# checkout that is on sys.path without being installed reads its pyproject.toml.
try:
    from importlib.metadata import version as _installed_version

    __version__ = _installed_version("flashattn")
except ImportError:  # importlib.metadata.PackageNotFoundError
    import pathlib as _pathlib
    import re as _re

    _pyproject = _pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
    _found = _pyproject.is_file() and _re.search(r'^version = "(.+)"$', _pyproject.read_text(encoding="utf-8"), _re.M)
    __version__ = _found.group(1) if _found else "0+unknown"
