"""The counts of main-memory traffic against closed forms, and against the tiles the implementation computes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from flashattn.io_model import (
    HBMTraffic,
    flash_attention1_io,
    flash_attention2_io,
    standard_attention_io,
    theorem2_block_sizes,
)
from flashattn.tiled import tiled_forward_fa1, tiled_forward_fa2

sizes = st.integers(1, 300)
heads = st.integers(1, 128)
blocks = st.integers(1, 128)
elem = st.sampled_from([1, 2, 4, 8])


@given(sizes, sizes, heads, heads, elem)
def test_standard_attention(i, j, d, d_v, e):
    io = standard_attention_io(i, j, d, d_v=d_v, elem_bytes=e)
    # Q, K in; S out. S in; P out. P, V in; O out.
    assert io == HBMTraffic(read=e * (i * d + j * d + i * j + i * j + j * d_v), written=e * (i * j + i * j + i * d_v))
    assert io.total == io.read + io.written


@given(sizes, sizes, heads, heads, blocks, blocks, elem, elem)
def test_flash1_without_mask(i, j, d, d_v, block_q, block_k, e, s):
    io = flash_attention1_io(i, j, d, d_v=d_v, block_q=block_q, block_k=block_k, elem_bytes=e, stat_bytes=s)
    t_c = math.ceil(j / block_k)
    assert io.read == e * j * (d + d_v) + t_c * (e * i * (d + d_v) + 2 * s * i)
    assert io.written == (t_c + 1) * (e * i * d_v + 2 * s * i)


@given(sizes, sizes, heads, heads, blocks, blocks, elem, elem)
def test_flash2_without_mask(i, j, d, d_v, block_q, block_k, e, s):
    io = flash_attention2_io(i, j, d, d_v=d_v, block_q=block_q, block_k=block_k, elem_bytes=e, stat_bytes=s)
    t_r = math.ceil(i / block_q)
    assert io.read == e * i * d + t_r * e * j * (d + d_v)
    assert io.written == e * i * d_v + s * i


@given(st.integers(1, 40), st.integers(1, 64), heads, elem, elem)
def test_causal_square_counts_the_lower_triangle_of_tiles(n_tiles, block, d, e, s):
    """i = j = T B: key tile c is read by the T - c query tiles from the diagonal down, T (T + 1) / 2 pairs."""
    n = n_tiles * block
    triangle = n_tiles * (n_tiles + 1) // 2
    io2 = flash_attention2_io(n, n, d, block_q=block, block_k=block, causal=True, elem_bytes=e, stat_bytes=s)
    assert io2.read == e * n * d + e * triangle * block * 2 * d
    assert io2.written == e * n * d + s * n
    io1 = flash_attention1_io(n, n, d, block_q=block, block_k=block, causal=True, elem_bytes=e, stat_bytes=s)
    rows_read = triangle * block  # sum over key tiles c of the rows from tile c down: (T - c) B
    assert io1.read == e * n * 2 * d + rows_read * (e * 2 * d + 2 * s)
    assert io1.written == e * n * d + 2 * s * n + rows_read * (e * d + 2 * s)


@given(sizes, sizes, heads, blocks, blocks)
def test_causal_never_moves_more(i, j, d, block_q, block_k):
    for count in (flash_attention1_io, flash_attention2_io):
        full = count(i, j, d, block_q=block_q, block_k=block_k)
        causal = count(i, j, d, block_q=block_q, block_k=block_k, causal=True)
        assert causal.read <= full.read and causal.written <= full.written


@given(heads, st.integers(1, 2**20))
def test_theorem2_block_sizes(d, sram):
    block_q, block_k = theorem2_block_sizes(d, sram)
    assert block_k == -(-sram // (4 * d)) and block_q == min(block_k, d)


def test_theorem2_traffic_falls_as_one_over_sram():
    """n = 4096, d = 64: each doubling of M halves T_c, and so the part of FA-1's traffic that repeats per key tile."""
    n, d, e, s = 4096, 64, 2, 4
    per_key_tile_read = e * n * 2 * d + 2 * s * n  # Q, O, l, m of every query
    for sram in (2**14, 2**15, 2**16, 2**17):
        block_q, block_k = theorem2_block_sizes(d, sram)
        t_c = n // block_k
        assert t_c == 4 * n * d // sram
        io1 = flash_attention1_io(n, n, d, sram=sram)
        assert io1 == flash_attention1_io(n, n, d, block_q=block_q, block_k=block_k)
        assert io1.read == e * n * 2 * d + t_c * per_key_tile_read
        # FA-2 keeps the query tile on chip, so it gets the large tile: B_r = ceil(M / 4d)
        io2 = flash_attention2_io(n, n, d, sram=sram)
        assert io2 == flash_attention2_io(n, n, d, block_q=block_k, block_k=block_q)
        assert io2.read == e * n * d + t_c * e * n * 2 * d
        assert io2.total < io1.total < standard_attention_io(n, n, d).total


def test_needs_sram_or_both_blocks():
    for kwargs in ({}, {"block_q": 16}, {"sram": 1024, "block_q": 16, "block_k": 16}, {"block_q": 0, "block_k": 4}):
        for count in (flash_attention1_io, flash_attention2_io):
            with pytest.raises(ValueError):
                count(64, 64, 16, **kwargs)
    with pytest.raises(ValueError):
        theorem2_block_sizes(0, 1024)


@pytest.mark.parametrize(
    "i, j, block_q, block_k", [(48, 70, 8, 16), (50, 64, 16, 8), (64, 25, 16, 5), (40, 40, 8, 8), (16, 96, 16, 32)]
)
@pytest.mark.parametrize("causal", [False, True])
def test_counts_follow_the_tiles_that_run(i, j, block_q, block_k, causal):
    """The tiles the counts read are the tiles the tiled forwards compute, causal skips included.

    With every query tile full (``block_q`` divides ``i``), each key column read
    by a query tile costs ``2 B_r (d + d_v)`` FLOPs in ``S = Q K^T`` and
    ``P V``. Likewise for FA-1, with every key tile full, each query row read
    by a key tile costs ``2 B_c (d + d_v)``.
    """
    d, d_v = 6, 5
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, i, d, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, j, d, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 1, j, d_v, generator=gen, dtype=torch.float64)
    opts = dict(causal=causal, block_q=block_q, block_k=block_k)
    counts = dict(d_v=d_v, elem_bytes=1, stat_bytes=0, **opts)

    if i % block_q == 0:
        with FlopCounterMode(display=False) as counter:
            tiled_forward_fa2(q, k, v, **opts)
        kv_read = flash_attention2_io(i, j, d, **counts).read - i * d  # elements of K and V
        assert counter.get_total_flops() == 2 * block_q * kv_read

    if j % block_k == 0:
        with FlopCounterMode(display=False) as counter:
            tiled_forward_fa1(q, k, v, **opts)
        qo_read = flash_attention1_io(i, j, d, **counts).read - j * (d + d_v)  # elements of Q and O
        assert counter.get_total_flops() == 2 * block_k * qo_read


class MainMemoryTraffic(TorchDispatchMode):
    """Elements that a tiled forward moves in and out of the tensors it holds "in main memory".

    Main memory is ``q``, ``k``, ``v`` and every tensor of a full row length
    that the forward allocates (``o``, ``l``, ``m``, ``lse``); the tiles of a
    forward must be shorter than the sequence, or they would count as main
    memory too. Reading a tile is slicing
    along the length; writing one is slicing, then ``copy_`` into the slice.
    So reads = slices - copies, writes = copies + the allocations themselves.
    Counts are split by rank: 4-D tensors are ``Q, K, V, O``, 3-D the row statistics.
    """

    def __init__(self, inputs, length):
        super().__init__()
        self.storages = {t.untyped_storage().data_ptr() for t in inputs}
        self.length = length
        self.sliced = {3: 0, 4: 0}
        self.copied = {3: 0, 4: 0}
        self.allocated = {3: 0, 4: 0}

    def _in_memory(self, t):
        return isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.storages

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("new_zeros", "new_full", "new_empty") and out.dim() in (3, 4) and out.shape[2] == self.length:
            self.storages.add(out.untyped_storage().data_ptr())
            if name != "new_empty":  # an empty tensor is set aside, not written
                self.allocated[out.dim()] += out.numel()
        elif name == "slice" and self._in_memory(args[0]) and args[1] == 2:
            self.sliced[out.dim()] += out.numel()
        elif name == "copy_" and self._in_memory(args[0]):
            self.copied[args[0].dim()] += args[0].numel()
        return out


# distinct byte sizes for elements and statistics, so that one cannot stand in for the other
E_BYTES, S_BYTES = 3, 5


def measured_traffic(forward, i, j, block_q, block_k, causal, seed):
    """The bytes ``forward`` reads and writes in main memory, as MainMemoryTraffic counts them, and the counter."""
    d, d_v = 6, 5
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, i, d, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, j, d, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 1, j, d_v, generator=gen, dtype=torch.float64)
    with MainMemoryTraffic((q, k, v), i) as traffic:
        forward(q, k, v, causal=causal, block_q=block_q, block_k=block_k)
    e, s = E_BYTES, S_BYTES
    read = e * (traffic.sliced[4] - traffic.copied[4]) + s * (traffic.sliced[3] - traffic.copied[3])
    written = e * (traffic.copied[4] + traffic.allocated[4]) + s * (traffic.copied[3] + traffic.allocated[3])
    return HBMTraffic(read, written), traffic


# (forward, its count, how its row statistics reach main memory and how many per row): FA-1 sets up
# m and l there and updates them; FA-2 writes lse once, at the end
ALGORITHMS = [
    (tiled_forward_fa1, flash_attention1_io, "allocated", 2),
    (tiled_forward_fa2, flash_attention2_io, "copied", 1),
]


@pytest.mark.parametrize("forward, count, stats_kind, stats_per_row", ALGORITHMS, ids=["fa1", "fa2"])
@pytest.mark.parametrize("i, j, block_q, block_k", [(37, 53, 8, 16), (53, 37, 16, 8), (32, 32, 8, 8)])
@pytest.mark.parametrize("causal", [False, True])
def test_counts_are_what_the_forward_moves(forward, count, stats_kind, stats_per_row, i, j, block_q, block_k, causal):
    """The closed counts (``flash_attention1_io``, ``flash_attention2_io``) against the elements and row statistics the tiled forwards move."""
    got, traffic = measured_traffic(forward, i, j, block_q, block_k, causal, seed=1)
    assert got == count(i, j, 6, d_v=5, block_q=block_q, block_k=block_k, causal=causal,
                        elem_bytes=E_BYTES, stat_bytes=S_BYTES)
    assert getattr(traffic, stats_kind)[3] == stats_per_row * i
