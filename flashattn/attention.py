"""The FlashAttention module: one function of attention, computed two ways.

``einsum_attn`` is the definition, written to be read. ``flash_attn`` hands
the same problem to PyTorch's fused kernels in the form that keeps them
eligible. Both share the input checks, the mask rules and the zero rows.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from einops import repeat
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from .checks import check_attention_inputs, check_dropout, check_scale
from .masks import causal_mask

# With every backend enabled, PyTorch picks the fastest eligible kernel at
# call time, whatever GPU it runs on, and falls back to the math kernel
# rather than failing with "No available kernel".
_ALL_BACKENDS = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]
_BACKEND_ENABLED = [
    torch.backends.cuda.cudnn_sdp_enabled,
    torch.backends.cuda.flash_sdp_enabled,
    torch.backends.cuda.mem_efficient_sdp_enabled,
    torch.backends.cuda.math_sdp_enabled,
]


def _all_sdpa_backends():
    """A context that enables every SDPA backend, even inside a caller's narrower ``sdpa_kernel``.

    When all are enabled already (PyTorch's default), it does nothing: entering
    ``sdpa_kernel`` costs more host time than a small decoding step's kernel.
    """
    if not torch.compiler.is_compiling() and all(enabled() for enabled in _BACKEND_ENABLED):
        return contextlib.nullcontext()
    return sdpa_kernel(_ALL_BACKENDS)


def combined_keep(mask: Tensor | None, causal: bool, i: int, j: int, device: torch.device) -> Tensor | None:
    """The keys each query may attend: ``mask`` and the causal rule together.

    Returns a bool tensor that broadcasts to ``(b, h, i, j)`` (as small as its
    inputs allow), or None when nothing is masked.
    """
    if not causal:
        return mask
    keep = causal_mask(i, j, device)  # (i, j)
    return keep if mask is None else mask & keep


def _as_4d(t: Tensor) -> Tensor:
    """View a mask or bias as 4-D: the fused kernels take only 4-D masks."""
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


class _EmptyRowCheck:
    """Whether some query row has no key to attend, read without stalling the GPU.

    On CUDA the answer is copied to the host asynchronously; ``__bool__``
    waits only for that copy, which was queued before the attention kernel,
    so the GPU stays busy while the host decides. Where the host cannot wait
    (inside ``torch.compile``, or while a CUDA graph is being captured) the
    answer is taken to be yes: the zeroing is then always applied.
    """

    def __init__(self, row_has_key: Tensor):
        self._event = None
        if torch.compiler.is_compiling() or (row_has_key.is_cuda and torch.cuda.is_current_stream_capturing()):
            self._answer: Tensor | bool = True
        elif row_has_key.is_cuda:
            self._answer = torch.empty((), dtype=torch.bool, pin_memory=True)
            self._answer.copy_(~row_has_key.all(), non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._answer = ~row_has_key.all()

    def __bool__(self) -> bool:
        if self._event is not None:
            self._event.synchronize()
        return bool(self._answer)


class FlashAttention(nn.Module):
    """Scaled dot-product attention with masks, biases, GQA and dropout.

    Args:
        causal: query ``r`` attends key ``c`` only when ``c <= r + (j - i)``
            (bottom-right alignment).
        dropout: probability of dropping an attention weight, in training only.
        flash: use PyTorch's fused kernels (``flash_attn``) rather than the
            readable ``einsum_attn``; both compute the same function.
        scale: factor on ``q @ k^T``; ``None`` means ``d ** -0.5``.

    Call with ``q`` ``(b, h, i, d)``, ``k`` ``(b, h_kv, j, d)`` or ``(b, j, d)``,
    ``v`` ``(b, h_kv, j, d_v)`` or ``(b, j, d_v)``, an optional bool ``mask``
    (True = may attend) and float ``attn_bias``, each broadcastable to
    ``(b, h, i, j)``. Returns ``(b, h, i, d_v)`` in the dtype of ``q``. A query
    row with no key to attend gives zeros and zero gradients.
    """

    def __init__(self, causal: bool = False, dropout: float = 0.0, flash: bool = True, *, scale: float | None = None):
        super().__init__()
        self.causal = bool(causal)
        self.dropout = check_dropout(dropout)
        self.flash = bool(flash)
        self.scale = check_scale(scale)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, dropout={self.dropout}, flash={self.flash}, scale={self.scale}"

    def get_mask(self, i: int, j: int, device: torch.device | str | None = None) -> Tensor:
        """The causal mask ``(i, j)``, True = may attend: passing it as ``mask`` equals ``causal=True``."""
        return causal_mask(i, j, device)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, attn_bias: Tensor | None = None) -> Tensor:
        if self.flash:
            return self.flash_attn(q, k, v, mask=mask, attn_bias=attn_bias)
        return self.einsum_attn(q, k, v, mask=mask, attn_bias=attn_bias)

    def _dropout_p(self) -> float:
        return self.dropout if self.training else 0.0

    def einsum_attn(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, attn_bias: Tensor | None = None) -> Tensor:
        """Attention from its definition: scores, mask, softmax, dropout, weighted sum."""
        k, v = check_attention_inputs(q, k, v, mask, attn_bias)
        b, h, i, d = q.shape
        j = k.shape[2]
        out_dtype = q.dtype
        scale = self.scale if self.scale is not None else d**-0.5

        # grouped-query attention: each key/value head serves h // h_kv query heads
        k = repeat(k, "b h_kv j d -> b (h_kv g) j d", g=h // k.shape[1])
        v = repeat(v, "b h_kv j d -> b (h_kv g) j d", g=h // v.shape[1])

        # half-precision scores and exponentials lose too much: like the fused kernels,
        # the path computes in at least float32 and rounds only the output
        work = torch.promote_types(q.dtype, torch.float32)
        q, k, v = q.to(work), k.to(work), v.to(work)

        s = torch.einsum("b h i d, b h j d -> b h i j", q, k) * scale  # (b, h, i, j)
        if attn_bias is not None:
            s = s + attn_bias
        keep = combined_keep(mask, self.causal, i, j, q.device)
        if keep is not None:
            # the lowest finite value, not -inf: a row with no key left then stays finite
            # (uniform), and is zeroed below without NaN reaching the gradients
            s = s.masked_fill(~keep, torch.finfo(s.dtype).min)

        p = s.softmax(dim=-1)  # (b, h, i, j)
        if keep is not None:
            p = p.masked_fill(~keep.any(dim=-1, keepdim=True), 0.0)
        p = F.dropout(p, self._dropout_p(), training=self.training)

        o = torch.einsum("b h i j, b h j d -> b h i d", p, v)  # (b, h, i, d_v)
        return o.to(out_dtype)

    def flash_attn(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, attn_bias: Tensor | None = None) -> Tensor:
        """Attention through ``F.scaled_dot_product_attention``, keeping its fused kernels eligible."""
        k, v = check_attention_inputs(q, k, v, mask, attn_bias)
        i, j = q.shape[2], k.shape[2]

        def sdpa(q: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self._dropout_p(), is_causal=is_causal,
                scale=self.scale, enable_gqa=k.shape[1] != q.shape[1],
            )

        with _all_sdpa_backends():
            if mask is None and attn_bias is None:
                if not self.causal or i == 1:  # a single query may attend every key
                    return sdpa(q)
                if i == j:
                    return sdpa(q, is_causal=True)
                if i < j:
                    # bottom-right causal without a dense mask: the fused kernels take it natively;
                    # torch.compile cannot trace that bias object, so compiled code gets the (i, j) mask
                    if torch.compiler.is_compiling():
                        return sdpa(q, attn_mask=_as_4d(causal_mask(i, j, q.device)))
                    return sdpa(q, attn_mask=causal_lower_right(i, j))
                # i > j: the first i - j queries see no key; the rest form a square causal problem
                o = sdpa(q[:, :, i - j :], is_causal=True)  # (b, h, j, d_v)
                return F.pad(o, (0, 0, i - j, 0))  # (b, h, i, d_v)

            keep = combined_keep(mask, self.causal, i, j, q.device)
            if keep is None:
                return sdpa(q, attn_mask=_as_4d(attn_bias.to(q.dtype)))

            # A row with no key to attend is given every key, then zeroed: fused kernels
            # disagree on empty rows (cuDNN returns non-zero rows and NaN gradients).
            row_has_key = keep.any(dim=-1, keepdim=True)  # (..., i or 1, 1)
            has_empty_row = _EmptyRowCheck(row_has_key)
            keep = keep | ~row_has_key
            if attn_bias is None:
                attn_mask = keep
            else:
                attn_mask = torch.where(keep, attn_bias.to(q.dtype), float("-inf"))
            o = sdpa(q, attn_mask=_as_4d(attn_mask))  # (b, h, i, d_v)
            if has_empty_row:
                o = o.masked_fill(~_as_4d(row_has_key), 0.0)
            return o
