"""Zero the output rows that have no key, in place, touching nothing else.

The flash path gives a query row with no key every key (the fused kernels
disagree on empty rows) and must then zero that row. Zeroing with
``masked_fill`` reads and writes the whole output: on a large problem that
pass costs several per cent of the attention itself. This kernel reads one
flag per row and writes only the rows whose flag is False, so when no row
is empty, the common case, it costs a launch and a few flag loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .runtime import launch

_BLOCK_ROWS = 64


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
