"""decode_attention against float64 attention over each sequence's valid keys alone.

The reference never sees a slot past a sequence's length: it slices the
cache to ``cache_lens[n]`` keys and applies the bottom-right causal rule
there, so a kernel that read past the length, or masked the wrong keys,
shows up as a difference (or as NaN: the slots past the length hold NaN and
infinities). On the CPU, ``decode_attention`` runs the Triton kernels through
the interpreter (conftest sets ``TRITON_INTERPRET=1``), and
``split_kv_attention``, the PyTorch path, is tested directly.
"""

from __future__ import annotations

import math

import pytest
import torch

from flashattn import FlashAttention, decode_attention
from flashattn.decoding import _uses_kernels, split_kv_attention
import flashattn.triton.decoding as triton_decoding
from flashattn.triton.decoding import (
    MAX_SPLITS, MIN_TILES_PER_SPLIT, choose_num_splits, decode_config, resident_programs, row_block, specialization,
    triton_decode,
)
from flashattn.triton.runtime import is_interpreted, load_kernels
from reference import reference_attention
from fresh_python import run_without_interpreter

INTERPRETED = is_interpreted(load_kernels("decode_kernels", "decode_attention").decode_split_kernel)
on_cuda = pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Errors are max |x - ref| / max |ref|. float32: the kernels' products run as three TF32 products
# and keep nearly float32 precision; a key chunk sums up to a few hundred terms: 1e-5. float64 (the
# PyTorch path): 1e-12. float16: P is rounded to float16 (unit roundoff 2^-11) before P V, and the
# output is rounded again: 2^-9. bfloat16 runs in float32 in the interpreter, so only the output's
# rounding (2^-9) counts, with margin: 2^-7.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2**-9, torch.bfloat16: 2**-7}


def reference_decode(q, k, v, lens, scale=None):
    """Float64: each sequence's queries against its first ``lens[n]`` keys, bottom-right causal."""
    b, h, i, _ = q.shape
    out = torch.zeros(b, h, i, v.shape[-1], dtype=torch.float64)
    for n, length in enumerate(lens.tolist()):
        if length > 0:  # no key at all: every query gives zeros
            out[n : n + 1] = reference_attention(
                q[n : n + 1], k[n : n + 1, :, :length], v[n : n + 1, :, :length], causal=True, scale=scale
            )
    return out


def rel_error(got, want):
    return ((got.double().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def make_cache(b, h, h_kv, i, j, d, d_v, lens, dtype=torch.float32, seed=0, device="cpu"):
    """Random q and caches whose slots past each length hold NaN and infinities."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, i, d, generator=gen).to(dtype)
    k = torch.randn(b, h_kv, j, d, generator=gen).to(dtype)
    v = torch.randn(b, h_kv, j, d_v, generator=gen).to(dtype)
    for n, length in enumerate(lens.tolist()):
        k[n, :, length:] = float("nan")
        v[n, :, length:] = float("inf")
        v[n, :, length + 1 :: 2] = float("nan")
    return q.to(device), k.to(device), v.to(device)


# (b, h, h_kv, i, j, d, d_v): grouped-query and not, d != d_v, sizes that are not powers of two,
# more queries than keys, lengths 0 and j among the ragged ones
SHAPES = [
    (3, 4, 2, 1, 100, 32, 16),
    (2, 8, 2, 3, 77, 24, 40),
    (4, 2, 2, 9, 5, 16, 16),
    (2, 6, 1, 2, 300, 64, 64),
    (1, 4, 4, 70, 130, 16, 32),
    (3, 12, 3, 5, 257, 40, 24),
]


def ragged_lens(b, j, seed):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, j + 1, (b,), generator=gen)
    lens[0] = j
    if b > 1:
        lens[-1] = 0
    return lens


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_splits", [None, 1, 3, 1000])
def test_kernels_match_float64(shape, num_splits):
    b, h, h_kv, i, j, d, d_v = shape
    lens = ragged_lens(b, j, seed=j)
    q, k, v = make_cache(b, h, h_kv, i, j, d, d_v, lens, seed=i)
    o = decode_attention(q, k, v, lens, num_splits=num_splits)
    assert o.shape == (b, h, i, d_v) and o.dtype == q.dtype
    assert rel_error(o, reference_decode(q, k, v, lens)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_splits", [1, 2, 7, 1000])
def test_pytorch_path_matches_float64(shape, num_splits):
    b, h, h_kv, i, j, d, d_v = shape
    lens = ragged_lens(b, j, seed=j + 1)
    q, k, v = make_cache(b, h, h_kv, i, j, d, d_v, lens, dtype=torch.float64, seed=i + 1)
    o = split_kv_attention(q, k, v, lens, scale=d**-0.5, num_splits=num_splits)
    assert rel_error(o, reference_decode(q, k, v, lens)) < TOLERANCE[torch.float64]


@pytest.mark.parametrize("j, num_splits, chunks", [(50, 1, 1), (50, 2, 2), (50, 7, 7), (48, 5, 5), (10, 1000, 10)])
def test_the_pytorch_path_attends_num_splits_chunks(monkeypatch, j, num_splits, chunks):
    """One merge per chunk: ``num_splits`` chunks of ceil(j / num_splits) keys (at most one key each)."""
    import flashattn.decoding as decoding

    merged = []
    merge = decoding.merge_partials

    def counting_merge(*args):
        merged.append(args[2].shape)  # the chunk's partial output
        return merge(*args)

    monkeypatch.setattr(decoding, "merge_partials", counting_merge)
    lens = torch.tensor([j, j // 3])
    q, k, v = make_cache(2, 4, 2, 1, j, 16, 16, lens, dtype=torch.float64, seed=j)
    o = split_kv_attention(q, k, v, lens, scale=0.25, num_splits=num_splits)
    assert len(merged) == chunks
    assert rel_error(o, reference_decode(q, k, v, lens, scale=0.25)) < TOLERANCE[torch.float64]


def test_float64_takes_the_pytorch_path():
    lens = torch.tensor([50, 0, 13])
    q, k, v = make_cache(3, 4, 2, 2, 50, 16, 16, lens, dtype=torch.float64)
    o = decode_attention(q, k, v, lens, scale=-0.3)
    assert o.dtype == torch.float64
    assert rel_error(o, reference_decode(q, k, v, lens, scale=-0.3)) < TOLERANCE[torch.float64]


def test_the_pytorch_path_without_lengths_attends_the_whole_cache():
    q, k, v = make_cache(3, 4, 2, 2, 50, 16, 16, torch.tensor([50, 50, 50]), dtype=torch.float64, seed=5)
    o = decode_attention(q, k, v)
    assert rel_error(o, reference_decode(q, k, v, torch.tensor([50, 50, 50]))) < TOLERANCE[torch.float64]


def test_on_a_cpu_without_the_interpreter_the_pytorch_path_runs():
    """Triton installed but TRITON_INTERPRET unset, as on a reader's laptop: no kernel is tried on CPU tensors."""
    script = (
        "import torch\n"
        "from flashattn import decode_attention\n"
        "from flashattn.decoding import _uses_kernels\n"
        "q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)\n"
        "assert not _uses_kernels(q, 16)\n"
        "lens = torch.tensor([40, 7])\n"
        "o = decode_attention(q, k, v, lens).double()\n"
        "ref = torch.stack([torch.nn.functional.scaled_dot_product_attention(\n"
        "    q[n:n+1].double(), k[n:n+1, :, :L].double().repeat_interleave(2, 1),\n"
        "    v[n:n+1, :, :L].double().repeat_interleave(2, 1))[0] for n, L in enumerate(lens.tolist())])\n"
        "err = ((o - ref).abs().max() / ref.abs().max()).item()\n"
        "assert err < 1e-5, err\n"
        "print('ok', err)\n"
    )
    run = run_without_interpreter(script)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout + run.stderr


def test_every_num_splits_from_one_to_more_than_the_key_tiles():
    """The result does not depend on the number of chunks beyond rounding."""
    b, h, h_kv, i, j, d = 2, 4, 2, 2, 200, 32
    lens = torch.tensor([200, 141])
    q, k, v = make_cache(b, h, h_kv, i, j, d, d, lens, seed=3)
    want = reference_decode(q, k, v, lens)
    key_tiles = math.ceil(j / 64)  # the interpreter's key tile
    for num_splits in range(1, key_tiles + 3):
        assert rel_error(decode_attention(q, k, v, lens, num_splits=num_splits), want) < TOLERANCE[torch.float32]
        o_pt = split_kv_attention(q.double(), k.double(), v.double(), lens, scale=d**-0.5, num_splits=num_splits)
        assert rel_error(o_pt, want) < TOLERANCE[torch.float64]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs(dtype):
    lens = torch.tensor([90, 33])
    q, k, v = make_cache(2, 8, 2, 4, 90, 64, 64, lens, dtype=dtype, seed=5)
    o = decode_attention(q, k, v, lens, num_splits=2)
    assert o.dtype == dtype
    assert rel_error(o, reference_decode(q, k, v, lens)) < TOLERANCE[dtype]


def test_head_dimensions_past_the_kernels_take_the_pytorch_path():
    """The kernels' tiles hold head dimensions up to 256; wider heads are computed by the PyTorch code."""
    lens = torch.tensor([20, 7])
    q, k, v = make_cache(2, 2, 1, 2, 20, 300, 16, lens, seed=11)
    assert not _uses_kernels(q, v.shape[-1]) and _uses_kernels(q[..., :256], v.shape[-1]) == INTERPRETED
    assert rel_error(decode_attention(q, k, v, lens), reference_decode(q, k, v, lens)) < TOLERANCE[torch.float32]


def test_queries_without_keys_give_zeros():
    """With more queries than valid keys, the first queries come before every key."""
    lens = torch.tensor([3, 0])
    q, k, v = make_cache(2, 2, 1, 6, 10, 16, 16, lens, seed=6)
    o = decode_attention(q, k, v, lens, num_splits=2)
    assert torch.equal(o[0, :, :3], torch.zeros_like(o[0, :, :3]))  # queries 0..2 see keys up to -3..-1
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    assert rel_error(o, reference_decode(q, k, v, lens)) < TOLERANCE[torch.float32]


def test_full_caches_equal_flashattention_causal():
    """Without lengths, decoding is causal attention with the queries at the end of the sequence."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = torch.randn(2, 8, 3, 32, generator=gen), torch.randn(2, 2, 150, 32, generator=gen), torch.randn(2, 2, 150, 32, generator=gen)
    want = FlashAttention(causal=True, flash=False)(q.double(), k.double(), v.double())
    assert rel_error(decode_attention(q, k, v), want) < TOLERANCE[torch.float32]
    full = torch.full((2,), 150)
    assert rel_error(decode_attention(q, k, v, full), want) < TOLERANCE[torch.float32]


def test_one_head_shared_by_all():
    """3-D caches (b, j, d): one K/V head for every query head."""
    lens = torch.tensor([40, 17])
    q, k, v = make_cache(2, 4, 1, 1, 40, 16, 16, lens, seed=8)
    got = decode_attention(q, k[:, 0], v[:, 0], lens)
    assert rel_error(got, reference_decode(q, k, v, lens)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # the kernels (interpreted on the CPU), the PyTorch code
def test_strided_caches(dtype):
    """Caches read from a (b, j, h_kv, d) layout, a value cache cut from a wider buffer, q with no unit stride."""
    b, h, h_kv, i, j, d, d_v = 2, 4, 2, 3, 70, 16, 24
    lens = torch.tensor([70, 33])
    q, k, v = make_cache(b, h, h_kv, i, j, d, d_v, lens, dtype=dtype, seed=15)
    k_strided = k.transpose(1, 2).contiguous().transpose(1, 2)  # (b, h_kv, j, d) view of (b, j, h_kv, d)
    wide = torch.full((b, h_kv, j, d_v + 8), float("nan"), dtype=dtype)
    wide[..., :d_v] = v
    v_strided = wide[..., :d_v]  # rows of d_v + 8, NaN past d_v
    q_strided = q.transpose(2, 3).contiguous().transpose(2, 3)  # last stride i, not 1
    assert not (k_strided.is_contiguous() or v_strided.is_contiguous() or q_strided.stride(-1) == 1)
    o = decode_attention(q_strided, k_strided, v_strided, lens, num_splits=2)
    assert rel_error(o, reference_decode(q, k, v, lens)) < TOLERANCE[dtype]


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter runs only without a GPU (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("num_splits", [1, 3])
def test_kernel_reports_lengths_out_of_range_as_nan_and_reads_nothing_past_the_cache(num_splits):
    """The range check of the lengths on the GPU: a sequence whose length is outside [0, j] gets NaN, the others are exact.

    On a GPU ``decode_attention`` hands the lengths to ``triton_decode``
    unread (reading them would make the host wait). The caches are the first j
    slots of a longer buffer whose later slots hold NaN and infinities, so a
    load past j would spoil the sequences whose lengths are in range too.
    """
    b, h, h_kv, i, j, d = 4, 4, 2, 2, 50, 16
    q, k_long, v_long = make_cache(b, h, h_kv, i, j + 40, d, d, torch.full((b,), j), seed=16)
    k, v = k_long[:, :, :j], v_long[:, :, :j]
    lens = torch.tensor([j + 30, 17, -5, j])
    o = triton_decode(q, k, v, lens, d**-0.5, num_splits)
    bad = (lens < 0) | (lens > j)
    assert o[bad].isnan().all()  # every output of the two sequences out of range
    good = ~bad
    assert rel_error(o[good], reference_decode(q[good], k[good], v[good], lens[good])) < TOLERANCE[torch.float32]


def test_lengths_out_of_range_on_the_cpu_raise_with_the_range_and_the_values():
    gen = torch.Generator().manual_seed(17)
    q, k = torch.randn(2, 2, 1, 16, generator=gen), torch.randn(2, 2, 8, 16, generator=gen)
    with pytest.raises(ValueError, match=r"cache_lens must lie in \[0, j\] = \[0, 8\] \(j = k_cache.shape\[2\]\), "
                                         r"got values from 3 to 9"):
        decode_attention(q, k, k, torch.tensor([3, 9]))


def test_empty_problems():
    """No key (j = 0) gives zeros, never NaN; no query or no sequence gives an empty result of the right shape."""
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(2, 4, 3, 16, generator=gen)
    no_key = decode_attention(q, torch.randn(2, 2, 0, 16, generator=gen), torch.randn(2, 2, 0, 8, generator=gen))
    assert no_key.shape == (2, 4, 3, 8) and no_key.dtype == q.dtype
    assert torch.equal(no_key, torch.zeros(2, 4, 3, 8))
    k, v = torch.randn(2, 2, 5, 16, generator=gen), torch.randn(2, 2, 5, 8, generator=gen)
    assert decode_attention(q[:, :, :0], k, v).shape == (2, 4, 0, 8)
    assert decode_attention(q[:0], k[:0], v[:0], torch.zeros(0, dtype=torch.int64)).shape == (0, 4, 3, 8)


def test_gradients_are_refused_with_a_message():
    gen = torch.Generator().manual_seed(13)
    q = torch.randn(1, 2, 1, 16, generator=gen, requires_grad=True)
    kv = torch.randn(1, 2, 20, 16, generator=gen)
    o = decode_attention(q, kv, kv)
    with pytest.raises(RuntimeError, match="decode_attention is for inference"):
        o.sum().backward()


def _inputs():
    gen = torch.Generator().manual_seed(14)
    return (torch.randn(2, 4, 1, 16, generator=gen), torch.randn(2, 2, 10, 16, generator=gen),
            torch.randn(2, 2, 10, 8, generator=gen))


@pytest.mark.parametrize(
    "cache_lens, error, match",
    [
        (torch.tensor([1.0, 2.0]), TypeError, "cache_lens must be an integer tensor, got dtype torch.float32"),
        (torch.tensor([True, False]), TypeError, "integer tensor, got dtype torch.bool"),
        ([3, 4], TypeError, r"cache_lens must be None or an integer tensor of shape \(b,\) = \(2,\), got list"),
        (torch.tensor([3, 4, 5]), ValueError, r"shape \(b,\) = \(2,\), one length per sequence, got \(3,\)"),
        (torch.tensor([[3, 4]]), ValueError, r"got \(1, 2\)"),
        (torch.tensor([3, 11]), ValueError, r"\[0, j\] = \[0, 10\] \(j = k_cache.shape\[2\]\), got values from 3 to 11"),
        (torch.tensor([-1, 4]), ValueError, "got values from -1 to 4"),
        (torch.tensor([3, 4], device="meta"), ValueError, "cache_lens is on meta but q is on cpu"),
    ],
)
def test_bad_cache_lens(cache_lens, error, match):
    q, k, v = _inputs()
    with pytest.raises(error, match=match):
        decode_attention(q, k, v, cache_lens)


def test_bad_shapes_name_the_caches():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match=r"heads of q \(3\) must be a multiple of the heads of k_cache and v_cache \(2\)"):
        decode_attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match=r"k_cache and v_cache must have the same length j, got q \(2, 4, 1, 16\), "
                                         r"k_cache \(2, 2, 10, 16\), v_cache \(2, 2, 9, 8\)"):
        decode_attention(q, k, v[:, :, :9])
    with pytest.raises(ValueError, match="num_splits must be None or a positive integer, got 0"):
        decode_attention(q, k, v, num_splits=0)
    with pytest.raises(ValueError, match="num_splits must be None or a positive integer, got 2.0"):
        decode_attention(q, k, v, num_splits=2.0)


def test_number_of_splits_chosen():
    """One full wave of programs, no chunk below MIN_TILES_PER_SPLIT key tiles, one chunk when the grid is full."""
    slots = 132 * 3  # an H200's SMs, three programs on each
    # one sequence, 8 K/V heads: 8 programs per chunk; 49 chunks make 392 of the 396 slots
    assert choose_num_splits(1, 8, 4, 1, 32768, 64, slots) == 49
    # a short cache: 8 key tiles, no chunk below the minimum
    assert choose_num_splits(1, 8, 4, 1, 512, 64, slots) == 512 // 64 // MIN_TILES_PER_SPLIT
    # a batch that fills the GPU by itself: no split
    assert choose_num_splits(64, 32, 1, 1, 4096, 64, slots) == 1
    assert choose_num_splits(1, 1, 1, 1, 10**7, 64, 10**6) == MAX_SPLITS
    assert row_block(4, 1) == 16 and row_block(8, 4) == 32 and row_block(32, 4) == 64


def test_programs_per_sm_are_read_per_compiled_variant():
    """One query and four compile to different code (Triton specialises i == 1), with different registers.

    The number of programs that fit on an SM is cached per compiled variant: a
    cache keyed without the specialisation reused one query's count for four
    queries, and gave them more chunks than one wave holds.
    """
    one = (7, 1, 4096, 2.5)  # a stride, i = 1, j = 4096, and a float, which is not specialised
    four = (7, 4, 4096, 2.5)
    assert specialization(one) != specialization(four)
    assert specialization(one) == ((False, False), (True, False), (False, True))
    assert specialization((7, 4, 4096)) == specialization((9, 4, 4112))  # the same variant


def test_programs_per_sm_are_measured_once_per_compiled_variant(monkeypatch):
    """``resident_programs`` keys its cache by the compiled variant: i = 1 and i = 4 are measured apart, a repeat is not."""
    measured = []

    def measure(kernel, device, cfg, args, constants):  # stands in for compiling on a GPU
        measured.append(args[2])
        return {1: 5, 4: 3}[args[2]]

    monkeypatch.setattr(triton_decoding, "_resident", {})
    monkeypatch.setattr(triton_decoding, "_measure_resident", measure)
    device, cfg = torch.device("cuda", 0), decode_config(torch.bfloat16, interpreted=False)
    q = torch.empty(1, dtype=torch.bfloat16)
    constants = dict(D=64, DV=64, BLOCK_M=16, BLOCK_K=64, HAS_LENS=True)

    def args(i, j=4096):
        return (q, 7, i, j, 2, 2.5)  # a stride, i, j, num_splits and a float

    assert resident_programs(None, device, cfg, args(1), constants) == 5
    assert resident_programs(None, device, cfg, args(4), constants) == 3
    assert resident_programs(None, device, cfg, args(1, j=4112), constants) == 5  # the same variant (4112 = 257 x 16)
    assert measured == [1, 4]
    resident_programs(None, device, cfg, args(1), {**constants, "BLOCK_M": 32})  # another kernel
    assert measured == [1, 4, 1]


# --- on the GPU: the kernels at decoding sizes, against SDPA's own bf16 error


def _sdpa_reference_error(q, k, v, lens, want):
    """SDPA's bf16 error on the same inputs, sequence by sequence over the valid keys."""
    import torch.nn.functional as F

    out = torch.zeros_like(want)
    for n, length in enumerate(lens.tolist()):
        if length == 0:
            continue
        i = q.shape[2]
        keep = torch.arange(length, device=q.device) <= torch.arange(i, device=q.device)[:, None] + (length - i)
        o = F.scaled_dot_product_attention(
            q[n : n + 1], k[n : n + 1, :, :length], v[n : n + 1, :, :length], attn_mask=keep, enable_gqa=True,
        )
        out[n : n + 1] = o.double().cpu().nan_to_num(0.0)  # rows before every key: zeros, as decode gives
    return (out - want).abs().max().item()


@on_cuda
@pytest.mark.parametrize("b, h, h_kv, i, j", [(1, 32, 8, 1, 40000), (4, 32, 8, 4, 9000), (3, 16, 16, 1, 5000),
                                             (2, 8, 1, 3, 70000)])
def test_cuda_bf16_error_at_most_twice_sdpa(b, h, h_kv, i, j):
    lens = ragged_lens(b, j, seed=j)
    if b > 2:
        lens[1] = 1  # a single key, with i > 1 queries of which the first see none
    q, k, v = make_cache(b, h, h_kv, i, j, 128, 128, lens, dtype=torch.bfloat16, seed=b, device="cuda")
    lens = lens.cuda()
    want = reference_decode(q.cpu(), k.cpu(), v.cpu(), lens.cpu())
    sdpa_error = _sdpa_reference_error(q, k, v, lens, want)
    for num_splits in (None, 1, 16, 333):
        o = decode_attention(q, k, v, lens, num_splits=num_splits)
        error = (o.double().cpu() - want).abs().max().item()
        # below 2^-8 (two unit roundoffs of bfloat16 on outputs of size ~1) an error is rounding, whatever SDPA's
        assert error <= max(2 * sdpa_error, 2**-8), (num_splits, error, sdpa_error)


@on_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_other_dtypes(dtype):
    lens = torch.tensor([3000, 1, 2047])
    q, k, v = make_cache(3, 8, 2, 2, 3000, 64, 32, lens, dtype=dtype, seed=9, device="cuda")
    o = decode_attention(q, k, v, lens.cuda())
    assert rel_error(o, reference_decode(q.cpu(), k.cpu(), v.cpu(), lens)) < TOLERANCE[dtype]


@on_cuda
def test_cuda_graph_capture_replays_new_lengths():
    """Inside a captured graph the lengths are not read on the host; replay follows their new values."""
    lens = torch.tensor([1000, 500], device="cuda")
    q, k, v = make_cache(2, 8, 2, 1, 1000, 64, 64, torch.tensor([1000, 1000]), dtype=torch.bfloat16, seed=10,
                         device="cuda")
    decode_attention(q, k, v, lens)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o = decode_attention(q, k, v, lens)
    for new in ([1000, 500], [17, 999], [0, 64]):
        lens.copy_(torch.tensor(new))
        graph.replay()
        want = reference_decode(q.cpu(), k.cpu(), v.cpu(), torch.tensor(new))
        assert rel_error(o, want) < TOLERANCE[torch.bfloat16], new


def _busy_gpu(ms: float = 200.0) -> torch.cuda.Event:
    """Queue about ``ms`` of matrix products on the GPU; return an event that completes after them."""
    a = torch.randn(4096, 4096, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.mm(a, a)
    end.record()
    torch.cuda.synchronize()
    for _ in range(max(1, round(ms / start.elapsed_time(end)))):
        torch.mm(a, a)
    marker = torch.cuda.Event()
    marker.record()
    return marker


@on_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])  # the kernels, and the PyTorch path
def test_cuda_decoding_step_returns_while_queued_work_runs(dtype):
    """A decoding step with ``cache_lens`` never makes the host wait for the GPU: the work queued before it is still running when it returns."""
    lens = torch.tensor([1000, 37], device="cuda")
    q, k, v = make_cache(2, 8, 2, 1, 1000, 64, 64, torch.tensor([1000, 1000]), dtype=dtype, seed=18, device="cuda")
    decode_attention(q, k, v, lens)  # compiled and measured outside the timed call
    torch.cuda.synchronize()
    marker = _busy_gpu()
    o = decode_attention(q, k, v, lens)
    assert not marker.query(), "decode_attention waited for the GPU work queued before it"
    assert rel_error(o, reference_decode(q.cpu(), k.cpu(), v.cpu(), lens.cpu())) < TOLERANCE[dtype]


@on_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_cuda_lengths_out_of_range_give_nan_for_their_sequence(dtype):
    j = 300
    lens = torch.tensor([j + 1, 120, -1])
    q, k, v = make_cache(3, 4, 2, 1, j, 32, 32, torch.full((3,), j), dtype=dtype, seed=19, device="cuda")
    o = decode_attention(q, k, v, lens.cuda())
    assert o[0].isnan().all() and o[2].isnan().all()
    assert rel_error(o[1:2], reference_decode(q[1:2].cpu(), k[1:2].cpu(), v[1:2].cpu(), lens[1:2])) < TOLERANCE[dtype]


@on_cuda
def test_cuda_lengths_on_another_device_are_named():
    q, k, v = (t.cuda() for t in _inputs())
    with pytest.raises(ValueError, match="cache_lens is on cpu but q is on cuda:0"):
        decode_attention(q, k, v, torch.tensor([1, 2]))


def test_use_16bit_config_is_what_decode_config_gives_after():
    from flashattn.triton import decoding

    before = decoding.decode_config(torch.bfloat16, interpreted=False)
    candidate = decoding.DecodeConfig(block_k=32, num_warps=2, num_stages=3)
    try:
        decoding.use_16bit_config(candidate)
        assert decoding.decode_config(torch.float16, interpreted=False) == candidate
        assert decoding.decode_config(torch.float32, interpreted=False) != candidate  # float32 has its own
        assert decoding.measured_residency(candidate) == []  # nothing compiled with it here
    finally:
        decoding.use_16bit_config(before)
    assert decoding.decode_config(torch.bfloat16, interpreted=False) == before


def test_the_number_of_chunks_is_chosen_once_per_shape_and_the_choices_kept_are_bounded(monkeypatch):
    """On a GPU ``_plan`` asks ``_wave_splits`` (which compiles and measures) once per shape, then looks the answer up."""
    asked = []

    def wave_splits(kernels, q, k, v, lens, cfg, constants):
        asked.append(k.shape[2])
        return 3

    monkeypatch.setattr(triton_decoding, "is_interpreted", lambda kernel: False)  # as on a GPU
    monkeypatch.setattr(triton_decoding, "check_device", lambda *args: None)
    monkeypatch.setattr(triton_decoding, "_wave_splits", wave_splits)
    monkeypatch.setattr(triton_decoding, "_wave_splits_chosen", type(triton_decoding._wave_splits_chosen)())
    monkeypatch.setattr(triton_decoding, "CHOICES_KEPT", 2)
    q = torch.randn(1, 4, 1, 16, dtype=torch.float16)

    def plan(j):
        kv = torch.randn(1, 2, j, 16, dtype=torch.float16)
        return triton_decoding._plan(q, kv, kv, None, 0.25, None).num_splits

    assert [plan(1000), plan(1000)] == [3, 3] and asked == [1000]  # the second call looked it up
    plan(2000), plan(3000)  # two more shapes: the first is no longer kept
    assert plan(1000) == 3 and asked == [1000, 2000, 3000, 1000]
    assert plan(3000) == 3 and asked == [1000, 2000, 3000, 1000]  # still kept


def test_float32_programs_take_fewer_rows_and_still_cover_every_row():
    # float32 tiles hold twice the bytes of 16-bit ones: 32 stacked rows per program at most (16 past
    # d = 128, with one stage and eight warps) so that the chunk kernel fits an A100 and spills nothing
    # (tests/test_compile_sm80.py)
    assert triton_decoding.max_rows(torch.float32, 128) == 32 and triton_decoding.max_rows(torch.float32, 256) == 16
    assert triton_decoding.max_rows(torch.bfloat16, 256) == triton_decoding.MAX_ROWS
    assert row_block(32, 4, 32) == 32 and row_block(8, 1, 32) == 16
    wide = decode_config(torch.float32, interpreted=False, head_dim=256)
    assert (wide.num_stages, wide.num_warps) == (1, 8)
    assert choose_num_splits(1, 8, 16, 4, 32768, 32, 132 * 3, most_rows=32) == 24  # 16 programs per chunk
    # 8 query heads on one K/V head, 4 queries each: 32 stacked rows, two programs of 16 at d = 256
    lens = torch.tensor([70, 33])
    q, k, v = make_cache(2, 8, 1, 4, 80, 256, 256, lens, seed=5)
    got = decode_attention(q, k, v, lens, num_splits=2)
    assert rel_error(got, reference_decode(q.double(), k.double(), v.double(), lens)) < TOLERANCE[torch.float32]
