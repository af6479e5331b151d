"""The FlashAttention module: one function of attention, computed two ways.

``einsum_attn`` is the definition, written to be read. ``flash_attn`` hands
the same problem to PyTorch's fused kernels in the form that keeps them
eligible. Both share the input preparation, the mask rules and the zero rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import repeat
from torch import Tensor, nn
from torch.nn.attention.bias import CausalBias, causal_lower_right

from .inputs import check_dropout, check_flag, check_scale, prepare
from .masks import causal_mask
from .online_softmax import finite_or_zero


def combined_keep(mask: Tensor | None, causal: bool, i: int, j: int, device: torch.device) -> Tensor | None:
    """The keys each query may attend: ``mask`` and the causal rule together.

    Returns a bool tensor that broadcasts to ``(b, h, i, j)`` (as small as its
    inputs allow), or None when nothing is masked.
    """
    if not causal:
        return mask
    keep = causal_mask(i, j, device)  # (i, j)
    return keep if mask is None else mask & keep


def bias_in(dtype: torch.dtype, attn_bias: Tensor, keep: Tensor | None) -> Tensor:
    """``attn_bias`` in ``dtype``, shifted per row first when ``dtype`` is narrower.

    The softmax of a row does not change when one number is subtracted from
    the whole row. Subtracting the row's largest kept bias before rounding to
    a narrower dtype keeps the kept values near 0, where the narrow dtype is
    precise: a float32 bias of 300 rounds to bfloat16 with an error of about
    1, which moves the weights by a factor e; shifted, it rounds exactly.
    """
    if torch.finfo(attn_bias.dtype).bits <= torch.finfo(dtype).bits:
        return attn_bias.to(dtype)
    kept = attn_bias if keep is None else torch.where(keep, attn_bias, float("-inf"))
    row_max = finite_or_zero(kept.amax(dim=-1, keepdim=True))  # a row with no key needs no shift
    return (attn_bias - row_max).to(dtype)


def _as_4d(t: Tensor) -> Tensor:
    """View a mask or bias as 4-D: the fused kernels take only 4-D masks."""
    return t if t.dim() == 4 else t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


def zero_rows_kernel(o: Tensor, reads_mask: bool = False):
    """The kernel that zeroes rows of ``o`` in place (:mod:`flashattn.triton.empty_rows`) where it applies, else None.

    It applies to a CUDA ``o`` with a unit last stride, outside
    ``torch.compile``, with triton installed; elsewhere ``masked_fill`` zeroes
    the rows. ``reads_mask``: the kernel that finds the empty rows in the
    mask itself, rather than the one given a flag per row. Tests replace this
    function to run the kernels in Triton's interpreter on the CPU.
    """
    if not o.is_cuda or o.stride(-1) != 1 or torch.compiler.is_compiling():
        return None
    try:
        from .triton.empty_rows import zero_rows_without_key_, zero_rows_without_key_in_mask_
    except ImportError:
        return None
    return zero_rows_without_key_in_mask_ if reads_mask else zero_rows_without_key_


class _ZeroRowsWithoutKey(torch.autograd.Function):
    """``o`` with the rows that have no key set to zero, and their gradient set to zero.

    The way of :func:`zero_rows_without_key` where SDPA's saved log-sum-exp
    cannot be reached (:func:`saved_row_lse`): it costs a copy of the
    incoming gradient.

    A pass of ``masked_fill`` over the whole output would cost a read and a
    write of it; the kernel writes only the empty rows. It writes through
    ``o.data``, out of autograd's sight, so that SDPA's backward may still
    use the output it saved: the rows changed there are exactly the rows
    whose incoming gradient is zeroed below, and a row with zero gradient
    contributes nothing to any gradient, whatever its output was.
    """

    @staticmethod
    def forward(ctx, o: Tensor, row_has_key: Tensor, zero_rows_) -> Tensor:  # row_has_key: (b or 1, h or 1, i or 1)
        zero_rows_(o.data, row_has_key)
        ctx.save_for_backward(row_has_key)
        ctx.o_stride = o.stride()
        return o

    @staticmethod
    def backward(ctx, do: Tensor) -> tuple[Tensor, None, None]:
        (row_has_key,) = ctx.saved_tensors
        # written in the memory layout of o: SDPA's cuDNN backward before cuDNN 9.5.1 copies a dO
        # whose strides differ from O's (a gradient that arrives through a transpose, say) once more
        do_kept = torch.empty_strided(do.shape, ctx.o_stride, dtype=do.dtype, device=do.device)
        return torch.where(row_has_key[..., None], do, do.new_zeros(()), out=do_kept), None, None


# what PyTorch's autograd nodes of its fused kernels call the log-sum-exp they save (flash, cuDNN and the
# CPU's flash kernel: logsumexp; memory-efficient: log_sumexp, as its output is named)
_SAVED_LSE_NAMES = ("_saved_logsumexp", "_saved_log_sumexp")


def saved_row_lse(o: Tensor) -> Tensor | None:
    """The log-sum-exp of each row that SDPA's fused backward of ``o`` will read: a ``(b, h, i)`` view of what it saved.

    None where there is none to reach: ``o`` is not the output of a fused
    kernel (the math backend, a padded output), or saved tensors pass through
    hooks (``torch.utils.checkpoint``, offloading), which unpack a new copy
    each time, so that writing into one would change nothing.
    """
    node = o.grad_fn
    if node is None or torch.compiler.is_compiling():
        return None
    name = next((n for n in _SAVED_LSE_NAMES if hasattr(node, n)), None)
    output = getattr(node, "_saved_output", None)
    if name is None or output is None or output.data_ptr() != o.data_ptr():
        return None
    lse = getattr(node, name)
    if getattr(node, name).data_ptr() != lse.data_ptr() or not lse.is_floating_point():  # a copy per unpacking
        return None
    b, h, i = o.shape[:3]
    if lse.dim() < 3 or lse.shape[0] != b or lse.shape[1] != h:
        return None
    try:  # (b, h, i), or (b, h, i, 1), or padded to a multiple of 32 rows (memory-efficient)
        rows = lse.data.view(b, h, -1)  # .data: out of autograd's sight, as o.data below
    except RuntimeError:
        return None
    return rows[..., :i] if rows.shape[2] >= i else None


def zero_rows_without_key(o: Tensor, row_has_key: Tensor) -> Tensor:
    """``o`` ``(b, h, i, d_v)`` with zeros, and zero gradient, where ``row_has_key`` ``(b or 1, h or 1, i or 1, 1)`` is False.

    Where SDPA's fused kernel saved its log-sum-exp for the backward, the
    rows are silenced there: the backward recomputes each probability as
    ``exp(s - lse)``, so ``lse = +inf`` makes every probability of the row
    zero, and with it all that the row gives to dq, dk and dv (its
    ``rowsum(dO * O)`` is zero too, ``O`` being zeroed). The incoming
    gradient is then used as it is: no copy of it, and no pass over it.
    """
    zero_rows_ = zero_rows_kernel(o)
    lse = saved_row_lse(o) if o.requires_grad else None
    if lse is not None:
        if zero_rows_ is None:
            lse.masked_fill_(~row_has_key[..., 0], float("inf"))
            o.data.masked_fill_(~row_has_key, 0.0)
        else:  # both in one launch
            zero_rows_(o.data, row_has_key[..., 0], lse)
        return o
    if zero_rows_ is None:
        return o.masked_fill(~row_has_key, 0.0)
    if not (o.requires_grad and torch.is_grad_enabled()):  # no gradient to zero: the kernel alone
        zero_rows_(o, row_has_key[..., 0])
        return o
    return _ZeroRowsWithoutKey.apply(o, row_has_key[..., 0], zero_rows_)


def zero_rows_without_key_in(o: Tensor, keep: Tensor) -> Tensor:
    """``o`` ``(b, h, i, d_v)``, no gradient wanted, with zeros in every row whose ``keep`` row holds no True.

    ``keep`` is the 4-D bool mask the fused kernel was given as it is: what
    the kernel wrote into a row with no key (NaN, or anything) is overwritten.
    On a GPU one launch finds the rows and zeroes them; elsewhere ``any``
    and ``masked_fill`` do.
    """
    zero_rows_ = zero_rows_kernel(o, reads_mask=True)
    if zero_rows_ is None:
        return o.masked_fill(~keep.any(dim=-1, keepdim=True), 0.0)
    zero_rows_(o, keep)
    return o


class SdpaMasking(NamedTuple):
    """How one call of ``F.scaled_dot_product_attention`` is told what each query may attend.

    ``attn_mask``: None, a 4-D bool mask or float bias, or PyTorch's
    bottom-right causal bias. ``is_causal``: SDPA's own causal flag (square,
    top-left). ``skip``: the first query rows, which see no key: left out of
    the call and given zeros. ``row_has_key``: None, or bool
    ``(b or 1, h or 1, i or 1, 1)``, False for the rows that were given
    every key in the call and must be zeroed after it. ``zero_rows_of``:
    None, or the 4-D bool mask whose rows with no True must be zeroed after
    the call (the mask was passed unfilled: no gradient is wanted).
    """

    attn_mask: Tensor | CausalBias | None = None
    is_causal: bool = False
    skip: int = 0
    row_has_key: Tensor | None = None
    zero_rows_of: Tensor | None = None


def sdpa_masking(
    mask: Tensor | None, attn_bias: Tensor | None, causal: bool, i: int, j: int, dtype: torch.dtype, device: torch.device,
    fill_empty_rows: bool = True,
) -> SdpaMasking:
    """The mask, the causal rule and the bias in the form that keeps SDPA's fused kernels eligible.

    ``dtype`` is the dtype of ``q``, to which the bias is brought (:func:`bias_in`).
    ``fill_empty_rows``: give a row with no key every key, so that the
    kernel's forward and backward stay finite there; without gradients the
    forward's row is overwritten anyway, and the mask goes as it is.
    """
    if mask is None and attn_bias is None:
        if not causal or i == 1:  # a single query may attend every key
            return SdpaMasking()
        if i == j:
            return SdpaMasking(is_causal=True)
        if i > j:  # the first i - j queries see no key; the rest form a square causal problem
            return SdpaMasking(is_causal=True, skip=i - j)
        # bottom-right causal without a dense mask: the fused kernels take it natively;
        # torch.compile cannot trace that bias object, so compiled code gets the (i, j) mask
        if torch.compiler.is_compiling():
            return SdpaMasking(attn_mask=_as_4d(causal_mask(i, j, device)))
        return SdpaMasking(attn_mask=causal_lower_right(i, j))

    keep = combined_keep(mask, causal, i, j, device)
    bias = None if attn_bias is None else bias_in(dtype, attn_bias, keep)
    if keep is None:
        return SdpaMasking(attn_mask=_as_4d(bias))
    # A row with no key to attend is zeroed after the call: the fused kernels disagree on empty
    # rows (cuDNN's returns non-zero rows and NaN gradients). For the backward it is also given
    # every key in the call; without one, a kernel that reads keep finds the rows afterwards. The
    # zeroing runs on the GPU whether or not a row is empty: asking first would make the host wait.
    row_has_key = None
    if fill_empty_rows:
        row_has_key = _as_4d(keep.any(dim=-1, keepdim=True))  # (..., i or 1, 1)
        keep = torch.where(row_has_key, keep, True)  # keep | ~row_has_key, in one operation
    attn_mask = keep if bias is None else torch.where(keep, bias, float("-inf"))
    return SdpaMasking(attn_mask=_as_4d(attn_mask), row_has_key=row_has_key,
                       zero_rows_of=None if fill_empty_rows else _as_4d(keep))


class FlashAttention(nn.Module):
    """Scaled dot-product attention with masks, biases, GQA and dropout.

    Args:
        causal: query ``r`` attends key ``c`` only when ``c <= r + (j - i)``
            (bottom-right alignment).
        dropout: probability of dropping an attention weight, in training
            mode only (a module's default; ``.eval()`` turns it off).
        flash: use PyTorch's fused kernels (``flash_attn``) rather than the
            readable ``einsum_attn``; both compute the same function.
        scale: factor on ``q @ k^T``; ``None`` means ``d ** -0.5``.

    Call with ``q`` ``(b, h, i, d)``, ``k`` ``(b, h_kv, j, d)`` or ``(b, j, d)``,
    ``v`` ``(b, h_kv, j, d_v)`` or ``(b, j, d_v)``, an optional bool ``mask``
    (True = may attend) and float ``attn_bias``, each broadcastable to
    ``(b, h, i, j)``. Returns ``(b, h, i, d_v)`` in the dtype of ``q``.

    A query row with no key to attend (every key hidden by the mask, the
    causal rule or a bias of ``-inf``) gives zeros and zero gradients.
    ``q``, ``k``, ``v`` and ``attn_bias`` must otherwise be finite, at hidden
    keys too: the fused kernels read every key and weight a hidden one by 0,
    and ``0 * nan`` is NaN. They are not checked, because a check would make
    the host wait for the GPU.
    """

    def __init__(self, causal: bool = False, dropout: float = 0.0, flash: bool = True, *, scale: float | None = None):
        super().__init__()
        self.causal = check_flag("causal", causal)
        self.dropout = check_dropout(dropout)
        self.flash = check_flag("flash", flash)
        self.scale = check_scale(scale)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, dropout={self.dropout}, flash={self.flash}, scale={self.scale}"

    def get_mask(self, i: int, j: int, device: torch.device | str | None = None) -> Tensor:
        """The causal mask ``(i, j)``, True = may attend: passing it as ``mask`` equals ``causal=True``."""
        return causal_mask(i, j, device)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, attn_bias: Tensor | None = None) -> Tensor:
        """Attention of ``q`` over ``k``, ``v``: ``flash_attn`` when ``self.flash``, else ``einsum_attn``.

        ``q`` ``(b, h, i, d)``; ``k``, ``v`` ``(b, h_kv, j, d)``, ``(b, h_kv, j, d_v)``
        or 3-D ``(b, j, ·)``; ``mask`` bool and ``attn_bias`` floating, each
        broadcastable to ``(b, h, i, j)``. Returns ``(b, h, i, d_v)`` in the
        dtype of ``q``.

        Dropout acts only in training mode, which is a module's mode until
        ``.eval()`` is called: with ``dropout > 0`` two calls on the same
        inputs differ until then.
        """
        if self.flash:
            return self.flash_attn(q, k, v, mask=mask, attn_bias=attn_bias)
        return self.einsum_attn(q, k, v, mask=mask, attn_bias=attn_bias)

    def _dropout_p(self) -> float:
        return self.dropout if self.training else 0.0

    def einsum_attn(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, attn_bias: Tensor | None = None) -> Tensor:
        """Attention from its definition: scores, mask, softmax, dropout, weighted sum."""
        # half-precision scores and exponentials lose too much: like the fused kernels,
        # the path computes in at least float32 and rounds only the output
        x = prepare(q, k, v, scale=self.scale, mask=mask, attn_bias=attn_bias, at_least=torch.float32)
        work = x.q.dtype
        i, j = q.shape[2], x.k.shape[2]

        # grouped-query attention: each key/value head serves `group` query heads
        k = repeat(x.k, "b h_kv j d -> b (h_kv g) j d", g=x.group)
        v = repeat(x.v, "b h_kv j d -> b (h_kv g) j d", g=x.group)

        s = torch.einsum("b h i d, b h j d -> b h i j", x.q, k) * x.scale  # (b, h, i, j)
        if attn_bias is not None:
            s = s + attn_bias.to(work)
        keep = combined_keep(mask, self.causal, i, j, q.device)
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))

        if (keep is None and attn_bias is None) or j == 0:
            p = s.softmax(dim=-1)  # (b, h, i, j)
        else:
            # A row with no key (every score -inf) has no softmax: it is given zeros, not NaN.
            # Filling it with 0 before the softmax and zeros after keeps its gradient zero too,
            # and keeps what autograd saves to the softmax's output, as for the unmasked path.
            empty = torch.isneginf(s.detach().amax(dim=-1, keepdim=True))  # (b, h, i, 1)
            p = s.masked_fill(empty, 0.0).softmax(dim=-1).masked_fill(empty, 0.0)  # (b, h, i, j)
        p = F.dropout(p, self._dropout_p(), training=self.training)
        o = torch.einsum("b h i j, b h j d -> b h i d", p, v)  # (b, h, i, d_v)
        return o.to(q.dtype)

    def flash_attn(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, attn_bias: Tensor | None = None) -> Tensor:
        """Attention through ``F.scaled_dot_product_attention``, keeping its fused kernels eligible.

        PyTorch picks the kernel among the backends that are enabled (all, by
        default; ``torch.nn.attention.sdpa_kernel`` narrows the choice).
        """
        x = prepare(q, k, v, scale=self.scale, mask=mask, attn_bias=attn_bias)
        if x.is_empty:
            return self.einsum_attn(q, k, v, mask=mask, attn_bias=attn_bias)  # zeros, or nothing, of the right shape
        wants_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, x.k, x.v, attn_bias)
        )
        call = sdpa_masking(mask, attn_bias, self.causal, q.shape[2], x.k.shape[2], q.dtype, q.device,
                            fill_empty_rows=wants_grad)
        # PyTorch's causal kernels give NaN for a scale <= 0 (on the CPU they multiply the hidden
        # scores, -inf, by the scale): a negative scale's sign goes into q, exactly (negation does
        # not round, where q * scale would round to q's dtype), and a zero scale zeroes q
        if x.scale < 0:
            q, scale = -q, -x.scale
        elif x.scale == 0:
            q, scale = q * 0.0, 1.0
        else:
            scale = x.scale
        # SDPA needs a plain bool; under torch.compile(dynamic=True) the comparison is symbolic, and
        # branching on it is what makes the compiler settle it (and guard on it)
        gqa = True if x.group > 1 else False  # noqa: SIM210
        q_call = q[:, :, call.skip :] if call.skip else q  # a view costs host time: made only when rows are skipped
        o = F.scaled_dot_product_attention(
            q_call, x.k, x.v, attn_mask=call.attn_mask, dropout_p=self._dropout_p(),
            is_causal=call.is_causal, scale=scale, enable_gqa=gqa,
        )  # (b, h, i - skip, d_v)
        if call.skip:
            o = F.pad(o, (0, 0, call.skip, 0))  # (b, h, i, d_v)
        if call.row_has_key is not None:
            o = zero_rows_without_key(o, call.row_has_key)
        elif call.zero_rows_of is not None:
            o = zero_rows_without_key_in(o, call.zero_rows_of)
        return o
