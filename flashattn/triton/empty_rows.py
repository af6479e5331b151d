"""Zero the output rows that have no key, in place, touching nothing else.

The flash path gives a query row with no key every key (the fused kernels
disagree on empty rows) and must then zero that row. Zeroing with
``masked_fill`` reads and writes the whole output: on a large problem that
pass costs several per cent of the attention itself. This kernel reads one
flag per row and writes only the rows whose flag is False, so when no row
is empty, the common case, it costs a launch and a few flag loads.

Without gradients the module gives the fused kernel the caller's mask as it
is (whatever the kernel writes into an empty row is overwritten), and the
second kernel here finds the empty rows itself, reading the mask: one launch
in place of the two operations that would compute the flags and fill the
mask, each of which costs tens of microseconds of host time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .runtime import launch

_BLOCK_ROWS = 64
_BLOCK_KEYS = 128  # mask entries of a row read at once


@triton.jit
def _zero_rows_kernel(
    o_ptr, flag_ptr, lse_ptr,
    stride_ob, stride_oh, stride_oi,
    stride_fb, stride_fh, stride_fi,
    stride_lb, stride_lh, stride_li,
    i, d_v,
    BLOCK_ROWS: tl.constexpr, BLOCK_DV: tl.constexpr, SILENCE_LSE: tl.constexpr,
):
    """Grid (n_row_tiles, h, b): store zeros in the rows of one tile whose flag is 0 (and +inf in their lse)."""
    head = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    has_key = tl.load(flag_ptr + batch * stride_fb + head * stride_fh + rows * stride_fi, mask=rows < i, other=1)
    empty = (has_key == 0) & (rows < i)
    cols = tl.arange(0, BLOCK_DV)
    ptrs = o_ptr + batch * stride_ob + head * stride_oh + rows.to(tl.int64)[:, None] * stride_oi + cols[None, :]
    zeros = tl.zeros([BLOCK_ROWS, BLOCK_DV], dtype=o_ptr.dtype.element_ty)
    tl.store(ptrs, zeros, mask=empty[:, None] & (cols < d_v)[None, :])
    if SILENCE_LSE:
        inf = tl.full([BLOCK_ROWS], float("inf"), dtype=lse_ptr.dtype.element_ty)
        tl.store(lse_ptr + batch * stride_lb + head * stride_lh + rows * stride_li, inf, mask=empty)


def zero_rows_without_key_(o: Tensor, row_has_key: Tensor, lse: Tensor | None = None) -> None:
    """Set ``o[n, eta, r, :] = 0`` wherever ``row_has_key`` is False, in place; and ``lse[n, eta, r] = +inf`` there.

    ``o`` is a CUDA tensor ``(b, h, i, d_v)`` whose last dimension has unit
    stride; ``row_has_key`` is a bool tensor of shape ``(b or 1, h or 1, i or 1)``
    that broadcasts to ``(b, h, i)``; ``lse``, when given, a floating tensor
    ``(b, h, i)`` (the log-sum-exp that SDPA saved for its backward), written
    in the same launch.
    """
    b, h, i, d_v = o.shape
    flags = row_has_key.expand(b, h, i).view(torch.uint8)  # zero strides where it broadcasts
    grid = (triton.cdiv(i, _BLOCK_ROWS), h, b)
    silenced = flags if lse is None else lse  # without lse, a stand-in that the kernel does not read
    launch(_zero_rows_kernel, grid,
        o, flags, silenced, *o.stride()[:3], *flags.stride(), *silenced.stride(), i, d_v,
        BLOCK_ROWS=_BLOCK_ROWS, BLOCK_DV=triton.next_power_of_2(d_v), SILENCE_LSE=lse is not None,
    )


@triton.jit
def _zero_rows_without_key_in_mask_kernel(
    o_ptr, keep_ptr,
    stride_ob, stride_oh, stride_oi,
    stride_kb, stride_kh, stride_ki, stride_kj,
    b, h, i, j, d_v, mask_b, mask_h,
    BLOCK_ROWS: tl.constexpr, BLOCK_KEYS: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Grid (n_row_tiles, mask_h, mask_b): find the rows of one tile whose mask row is all False, zero them in o.

    The mask's batch and head axes may be 1 (``mask_b``, ``mask_h``; their
    strides 0): a program then serves every batch or head that shares its
    mask row, so the mask is read once, not once per head.
    """
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    mask_row = tl.program_id(2).to(tl.int64) * stride_kb + tl.program_id(1).to(tl.int64) * stride_kh \
        + rows.to(tl.int64) * stride_ki  # (BLOCK_ROWS,)
    seen = tl.zeros([BLOCK_ROWS], dtype=tl.int32)
    for start in range(0, j, BLOCK_KEYS):
        cols = start + tl.arange(0, BLOCK_KEYS)
        kept = tl.load(keep_ptr + mask_row[:, None] + cols.to(tl.int64)[None, :] * stride_kj,
                       mask=(rows < i)[:, None] & (cols < j)[None, :], other=0)
        seen = tl.maximum(seen, tl.max(kept.to(tl.int32), 1))
    empty = (seen == 0) & (rows < i)
    cols = tl.arange(0, BLOCK_DV)
    zeros = tl.zeros([BLOCK_ROWS, BLOCK_DV], dtype=o_ptr.dtype.element_ty)
    for batch in range(tl.program_id(2), b, mask_b):  # every batch and head that reads this mask row
        for head in range(tl.program_id(1), h, mask_h):
            # tl.cast, not .to: in the interpreter a loop variable is a Python int
            ptrs = o_ptr + tl.cast(batch, tl.int64) * stride_ob + tl.cast(head, tl.int64) * stride_oh \
                + rows.to(tl.int64)[:, None] * stride_oi + cols[None, :]
            tl.store(ptrs, zeros, mask=empty[:, None] & (cols < d_v)[None, :])


def zero_rows_without_key_in_mask_(o: Tensor, keep: Tensor) -> None:
    """Set ``o[n, eta, r, :] = 0`` wherever row ``keep[n, eta, r, :]`` holds no True, in place.

    ``o`` is a CUDA tensor ``(b, h, i, d_v)`` whose last dimension has unit
    stride; ``keep`` a 4-D bool mask that broadcasts to ``(b, h, i, j)``
    (any of its first three axes may be 1; ``j >= 1``).
    """
    b, h, i, d_v = o.shape
    mask_b, mask_h, mask_i, j = keep.shape
    flags = keep.view(torch.uint8)
    strides = [0 if size == 1 else stride for size, stride in zip(keep.shape, flags.stride())]  # broadcast: 0
    grid = (triton.cdiv(i, _BLOCK_ROWS), mask_h, mask_b)
    launch(_zero_rows_without_key_in_mask_kernel, grid,
        o, flags, *o.stride()[:3], *strides, b, h, i, j, d_v, mask_b, mask_h,
        BLOCK_ROWS=_BLOCK_ROWS, BLOCK_KEYS=_BLOCK_KEYS, BLOCK_DV=triton.next_power_of_2(d_v),
    )
