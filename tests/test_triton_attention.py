"""The Triton kernels against the float64 reference, forward and gradients.

Without a GPU, the kernels run in Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set by conftest.py): small sizes, float32 and
float16, lengths that the tiles do not divide, i < j and i > j, rows with no
key, grouped-query and 3-D k/v, head dimensions that are not powers of two,
strided inputs, several tile shapes. With a GPU, the same kernels compiled,
on CUDA tensors of realistic sizes in bfloat16 and float16, whose error must
stay within twice that of PyTorch's own attention in the same dtype.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashattn import FlashAttention, decode_attention, tiled_attention, triton_attention
from flashattn.decoding import split_kv_attention
from flashattn.tiled import tiled_forward_fa2
import flashattn.triton.runtime as runtime_module
from flashattn.triton.attention import _kernels, _TritonAttention, triton_forward
from flashattn.triton.runtime import is_interpreted
from flashattn.triton.launch import (
    _FLOAT32, _TABLE, KernelConfigs, TileConfig, check_capability, device_capability, float32_table, forced_configs,
    launch_table, pick_configs, table_key,
)
from reference import reference_attention, reference_keep
from fresh_python import run_without_interpreter

INTERPRETED = is_interpreted(_kernels().attn_fwd_kernel)
on_cpu = pytest.mark.skipif(not INTERPRETED, reason="the interpreter runs only without a GPU (TRITON_INTERPRET=1)")
on_cuda = pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Errors are measured as max |x - ref| / max |ref| (see rel_error). The inputs are drawn in
# their dtype, and the reference starts from those same values, so only the kernel's own
# rounding counts. float32: unit roundoff 2^-24 = 6e-8; scores are d-term dot products and
# outputs and gradients sums of up to ~200 terms, so some 100 roundoffs: 1e-5.
# float16: unit roundoff 2^-11 = 4.9e-4; P and dS are rounded to it before their products,
# and so are the results: a few roundoffs, 2^-9. bfloat16 runs in float32 in the interpreter
# and only its results are rounded (unit roundoff 2^-9): 2^-6, as for tiled_attention.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2**-9, torch.bfloat16: 2**-6}
# "At most twice PyTorch's error" needs a floor: two errors of a roundoff or so compare as a ratio of
# two rounding accidents. Below two unit roundoffs of the dtype (relative to the largest value) an
# error is rounding, whatever PyTorch's own is.
RATIO_FLOOR = {torch.float16: 2**-10, torch.bfloat16: 2**-8}


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|, in float64 (the absolute error where the reference is all zero)."""
    ref = ref.double().cpu()
    error = (x.double().cpu() - ref).abs().max().item()
    scale = ref.abs().max().item()
    return error / scale if scale > 0 else error


def make_inputs(b, h, h_kv, i, j, d, d_v, dtype, seed, kv_3d=False, device="cpu"):
    """Random q, k, v (requiring grad) and an output gradient do, drawn in float64 then rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    kv_shape = (b, j) if kv_3d else (b, h_kv, j)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)

    q, k, v = randn(b, h, i, d), randn(*kv_shape, d), randn(*kv_shape, d_v)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), randn(b, h, i, d_v)


def reference_with_grads(q, k, v, do, causal=False, scale=None):
    """The float64 reference output and its gradients with respect to q, k, v."""
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    o = reference_attention(q64, k64, v64, causal=causal, scale=scale)
    o.backward(do.double().cpu())
    return o, q64.grad, k64.grad, v64.grad


def errors(fn, q, k, v, do, causal=False, scale=None):
    """Relative errors of o, dq, dk, dv computed by ``fn`` against the float64 reference."""
    o = fn(q, k, v)
    o.backward(do)
    got = (o, q.grad, k.grad, v.grad)
    ref = reference_with_grads(q, k, v, do, causal, scale)
    return {name: rel_error(x, r) for name, x, r in zip(("o", "dq", "dk", "dv"), got, ref)}


# ---------------------------------------------------------------------------------------------
# On the CPU, through the interpreter

CASES = [
    # b, h, h_kv, i, j, d, d_v, causal, dtype
    (2, 2, 2, 128, 128, 64, 64, False, torch.float32),  # whole tiles only
    (1, 2, 2, 100, 100, 32, 32, True, torch.float32),  # a ragged last tile
    (1, 4, 2, 37, 150, 64, 64, True, torch.float16),  # i < j, grouped-query
    (1, 2, 2, 150, 37, 16, 16, True, torch.float32),  # i > j: the first 113 rows see no key
    (1, 2, 1, 90, 20, 128, 128, False, torch.float16),  # i > j without the causal rule
    (1, 2, 2, 70, 70, 48, 48, True, torch.float32),  # d padded to 64
    (1, 1, 1, 130, 130, 128, 128, True, torch.float16),
    (1, 3, 3, 64, 80, 32, 16, False, torch.float32),  # d_v != d
    (1, 2, 2, 96, 96, 64, 64, True, torch.bfloat16),
    (2, 2, 1, 1, 100, 64, 64, True, torch.float32),  # one query: decoding over a cache
    (1, 2, 2, 1, 1, 16, 16, True, torch.float16),
    (1, 2, 2, 200, 64, 16, 16, False, torch.float16),
]


@on_cpu
@pytest.mark.parametrize("b, h, h_kv, i, j, d, d_v, causal, dtype", CASES)
def test_matches_reference(b, h, h_kv, i, j, d, d_v, causal, dtype):
    q, k, v, do = make_inputs(b, h, h_kv, i, j, d, d_v, dtype, seed=i * j + d)
    errs = errors(lambda q, k, v: triton_attention(q, k, v, causal=causal), q, k, v, do, causal)
    assert max(errs.values()) < TOLERANCE[dtype], errs


@on_cpu
@pytest.mark.parametrize("causal", [False, True])
def test_three_dimensional_kv(causal):
    q, k, v, do = make_inputs(2, 3, 1, 60, 80, 32, 32, torch.float32, seed=5, kv_3d=True)
    errs = errors(lambda q, k, v: triton_attention(q, k, v, causal=causal), q, k, v, do, causal)
    assert k.grad.shape == k.shape and v.grad.shape == v.shape
    assert max(errs.values()) < TOLERANCE[torch.float32], errs


@on_cpu
@pytest.mark.parametrize("scale", [0.3, -0.5, 0.0])
def test_scale(scale):
    # a negative scale flips q inside; zero makes every kept key equally likely
    q, k, v, do = make_inputs(1, 2, 2, 70, 90, 32, 32, torch.float32, seed=6)
    errs = errors(lambda q, k, v: triton_attention(q, k, v, causal=True, scale=scale), q, k, v, do, True, scale)
    assert max(errs.values()) < TOLERANCE[torch.float32], errs


@on_cpu
def test_strided_inputs():
    # q read from a (b, i, h, d) layout, k with its head dimension strided, v a slice of a wider tensor
    gen = torch.Generator().manual_seed(7)
    b, h, i, j, d = 2, 3, 70, 90, 32
    q = torch.randn(b, i, h, d, generator=gen).transpose(1, 2).requires_grad_()
    k_t = torch.randn(b, h, d, j, generator=gen).requires_grad_()
    v_wide = torch.randn(b, h, j, 2 * d, generator=gen).requires_grad_()
    do = torch.randn(b, h, i, d, generator=gen)
    k, v = k_t.transpose(-1, -2), v_wide[..., :d]
    assert not q.is_contiguous() and k.stride(-1) != 1 and not v.is_contiguous()
    o = triton_attention(q, k, v, causal=True)
    o.backward(do)
    ref_o, ref_dq, ref_dk, ref_dv = reference_with_grads(q, k, v, do, causal=True)
    assert rel_error(o, ref_o) < TOLERANCE[torch.float32]
    assert rel_error(q.grad, ref_dq) < TOLERANCE[torch.float32]
    assert rel_error(k_t.grad.transpose(-1, -2), ref_dk) < TOLERANCE[torch.float32]
    assert rel_error(v_wide.grad[..., :d], ref_dv) < TOLERANCE[torch.float32]
    assert (v_wide.grad[..., d:] == 0).all()


@on_cpu
def test_rows_with_no_key_are_zero():
    i, j = 100, 30
    q, k, v, do = make_inputs(1, 2, 2, i, j, 32, 32, torch.float32, seed=8)
    o = triton_attention(q, k, v, causal=True)
    o.backward(do)
    empty = i - j  # rows r < i - j see no key
    assert (o[:, :, :empty] == 0).all() and (q.grad[:, :, :empty] == 0).all()
    assert (o[:, :, empty:].abs().amax(dim=-1) > 0).all()
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    _, lse = triton_forward(q, k, v, causal=True)
    assert torch.isneginf(lse[:, :, :empty]).all() and torch.isfinite(lse[:, :, empty:]).all()


@on_cpu
@pytest.mark.parametrize("i, j, causal", [(90, 133, True), (133, 90, True), (75, 75, False)])
def test_lse_matches_reference(i, j, causal):
    q, k, _, _ = make_inputs(2, 2, 1, i, j, 32, 32, torch.float32, seed=9)
    v = torch.randn(2, 1, j, 32)
    _, lse = triton_forward(q, k, v, causal=causal)
    s = (q.double() @ k.double().transpose(-1, -2)) * 32**-0.5  # (b, h, i, j)
    s = s.masked_fill(~reference_keep(i, j, causal, None, (2, 2)), float("-inf"))
    ref = torch.logsumexp(s, dim=-1)  # (b, h, i), -inf where no key is kept
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref))
    finite = torch.isfinite(ref)
    assert (lse[finite].double() - ref[finite]).abs().max() < 1e-5


@st.composite
def tiled_problems(draw):
    """A random problem and tile shape: lengths that the tiles rarely divide, either side longer."""
    h_kv = draw(st.integers(1, 2))
    return dict(
        h=h_kv * draw(st.integers(1, 2)),
        h_kv=h_kv,
        i=draw(st.integers(1, 150)),
        j=draw(st.integers(1, 150)),
        d=draw(st.sampled_from([16, 32])),
        causal=draw(st.booleans()),
        fwd=(draw(st.sampled_from([16, 32, 64])), draw(st.sampled_from([16, 32, 64]))),
        bwd=(draw(st.sampled_from([16, 32, 64])), draw(st.sampled_from([16, 32, 64]))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@on_cpu
@settings(max_examples=25)
@given(tiled_problems())
def test_any_tile_shape_matches_reference(p):
    # the stages (unmasked, across the diagonal, skipped) depend on both tile sizes: vary them
    q, k, v, do = make_inputs(1, p["h"], p["h_kv"], p["i"], p["j"], p["d"], p["d"], torch.float32, p["seed"])
    fwd, bwd = TileConfig(*p["fwd"], 4, 1), TileConfig(*p["bwd"], 4, 1)
    configs = KernelConfigs(fwd=fwd, dkdv=bwd, dq=bwd)
    scale = p["d"] ** -0.5
    errs = errors(lambda q, k, v: _TritonAttention.apply(q, k, v, p["causal"], scale, configs),
                  q, k, v, do, p["causal"])
    assert max(errs.values()) < TOLERANCE[torch.float32], errs


@on_cpu
@pytest.mark.parametrize("tiles", [(16, 32), (32, 16)])
def test_every_diagonal_offset(tiles):
    # j - i runs through every residue modulo the tiles, so every way the diagonal can cut
    # a tile (and miss the stage boundaries by one) occurs
    block_q, block_k = tiles
    configs = KernelConfigs(*(TileConfig(block_q, block_k, 4, 1) for _ in range(3)))
    for j in range(40 - 16, 40 + 17):
        q, k, v, do = make_inputs(1, 1, 1, 40, j, 16, 16, torch.float32, seed=j)
        errs = errors(lambda q, k, v: _TritonAttention.apply(q, k, v, True, 0.25, configs), q, k, v, do, True)
        assert max(errs.values()) < TOLERANCE[torch.float32], (j, errs)


def table_tilings() -> list[KernelConfigs]:
    """Each distinct set of tiles in the launch tables (16-bit and float32), once."""
    seen = {}
    for configs in list(launch_table().values()) + list(float32_table().values()):
        seen.setdefault(tuple((c.block_q, c.block_k) for c in (configs.fwd, configs.dkdv, configs.dq)), configs)
    return list(seen.values())


@on_cpu
@pytest.mark.parametrize("configs", table_tilings(), ids=lambda c: f"{c.fwd.block_q}x{c.fwd.block_k}-{c.dkdv.block_q}x{c.dkdv.block_k}-{c.dq.block_q}x{c.dq.block_k}")
def test_the_tables_launches_in_the_interpreter(configs, monkeypatch):
    """The tiles a GPU is launched with, run in the interpreter (which otherwise takes its own): ragged lengths, i < j.

    ``forced_configs`` puts them in place of the interpreter's; the launches seen
    by ``_run`` show that they were the ones used.
    """
    import flashattn.triton.attention as attention_module

    launched = []
    run = attention_module._run

    def spy(name, grid, *args, **kwargs):
        if "BLOCK_K" in kwargs:
            launched.append((name, kwargs["BLOCK_Q"], kwargs["BLOCK_K"]))
        run(name, grid, *args, **kwargs)

    monkeypatch.setattr(attention_module, "_run", spy)
    q, k, v, do = make_inputs(1, 2, 1, 70, 150, 16, 16, torch.float32, seed=12)
    with forced_configs(configs):
        errs = errors(lambda q, k, v: triton_attention(q, k, v, causal=True), q, k, v, do, True)
    assert max(errs.values()) < TOLERANCE[torch.float32], errs
    assert launched == [
        ("attn_fwd_kernel", configs.fwd.block_q, configs.fwd.block_k),
        ("attn_bwd_dkdv_kernel", configs.dkdv.block_q, configs.dkdv.block_k),
        ("attn_bwd_dq_kernel", configs.dq.block_q, configs.dq.block_k),
    ]


@pytest.mark.parametrize("path", ["flash", "einsum", "tiled", "triton", "decode", "split_kv"])
def test_large_scores_on_every_path(path):
    """q scaled by 100: scores of several hundred, whose exponentials overflow float32 unless each row's maximum is subtracted.

    Float32 against float64: a score of ~500 is rounded by ~500 * 6e-8 = 3e-5, and
    the weights move by as much relatively; 1e-4 leaves room for a few of those.
    """
    if path in ("triton", "decode") and not INTERPRETED:
        pytest.skip("the kernels run here in the interpreter only (TRITON_INTERPRET=1)")
    gen = torch.Generator().manual_seed(13)
    q = 100 * torch.randn(2, 4, 5, 16, generator=gen)
    k, v = torch.randn(2, 2, 9, 16, generator=gen), torch.randn(2, 2, 9, 16, generator=gen)
    attention = {
        "flash": lambda: FlashAttention(causal=True)(q, k, v),
        "einsum": lambda: FlashAttention(causal=True, flash=False)(q, k, v),
        "tiled": lambda: tiled_attention(q, k, v, causal=True, block_q=2, block_k=4),
        "triton": lambda: triton_attention(q, k, v, causal=True),
        "decode": lambda: decode_attention(q, k, v, num_splits=2),  # the queries are the last 5 of 9
        "split_kv": lambda: split_kv_attention(q, k, v, torch.full((2,), 9), scale=16**-0.5, num_splits=2),
    }[path]
    scores = (q.double() @ k.double().repeat_interleave(2, dim=1).transpose(-1, -2)) * 16**-0.5
    assert scores.abs().max() > 200 and torch.isinf(torch.exp(scores.float())).any()
    o = attention()
    assert torch.isfinite(o).all()
    assert rel_error(o, reference_attention(q, k, v, causal=True)) < 1e-4


@on_cpu
@pytest.mark.parametrize("i, j, causal", [(100, 100, True), (40, 130, True), (130, 40, True), (70, 50, False)])
def test_matches_tiled_attention(i, j, causal):
    # the same algorithm twice: outputs, log-sum-exps (with their -inf rows) and gradients agree
    q, k, v, do = make_inputs(1, 4, 2, i, j, 32, 32, torch.float32, seed=10)
    o, lse = triton_forward(q, k, v, causal=causal)
    o_tiled, lse_tiled = tiled_forward_fa2(q, k, v, causal=causal)
    assert rel_error(o, o_tiled) < TOLERANCE[torch.float32]
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_tiled))
    finite = torch.isfinite(lse_tiled)
    assert (lse[finite] - lse_tiled[finite]).abs().max() < 1e-5

    grads = []
    for fn in (triton_attention, tiled_attention):
        qc, kc, vc = (t.detach().clone().requires_grad_() for t in (q, k, v))
        fn(qc, kc, vc, causal=causal).backward(do)
        grads.append((qc.grad, kc.grad, vc.grad))
    for got, want in zip(*grads):
        assert rel_error(got, want) < TOLERANCE[torch.float32]


@on_cpu
@pytest.mark.parametrize(
    "shapes, dtype, error, words",
    [
        (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), torch.float64, TypeError, "float64"),
        (((1, 2, 8, 320), (1, 2, 8, 320), (1, 2, 8, 320)), torch.float32, ValueError, "d = 320"),
        (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 512)), torch.float32, ValueError, "d_v = 512"),
        (((2, 8, 16), (2, 8, 16), (2, 8, 16)), torch.float32, ValueError, "q must be 4-D"),
        (((1, 3, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), torch.float32, ValueError, "multiple"),
        (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 9, 16)), torch.float32, ValueError, "same length j"),
    ],
)
def test_bad_input(shapes, dtype, error, words):
    q, k, v = (torch.randn(s, dtype=dtype) for s in shapes)
    with pytest.raises(error, match=words):
        triton_attention(q, k, v)


@pytest.mark.parametrize("capability, head_dim, i, j, key", [
    ((9, 0), 64, 1024, 1024, ("sm90", 64, "short")),
    ((9, 0), 16, 2048, 100, ("sm90", 64, "short")),
    ((9, 0), 128, 1, 4096, ("sm90", 128, "long")),
    ((10, 0), 256, 1024, 1024, ("sm90", 256, "any")),
    ((8, 0), 128, 8192, 8192, ("sm80", 128, "any")),
    ((8, 6), 32, 100, 100, ("sm80", 64, "any")),
])
def test_table_rows(monkeypatch, capability, head_dim, i, j, key):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert table_key(torch.device("cuda"), head_dim, i, j) == key


def test_capability_is_asked_once_per_gpu_and_anew_when_replaced(monkeypatch):
    asked = []

    def hopper(device=None):
        asked.append(device)
        return (9, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", hopper)
    gpu0, gpu1 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert [device_capability(d) for d in (gpu0, gpu0, gpu1, gpu0, gpu1)] == [(9, 0)] * 5
    assert asked == [gpu0, gpu1]  # each GPU once
    assert device_capability(torch.device("cuda")) == (9, 0) and len(asked) == 3  # no index: which GPU varies
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # as chapter 09 does
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert device_capability(gpu0) == (7, 5)
    with pytest.raises(RuntimeError, match="has 7.5"):
        check_capability(gpu0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpus_before_ampere_are_refused_by_name(monkeypatch, dtype):
    """A Colab T4 is sm75: no launch was compiled for it, and the error says what it has and needs."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(RuntimeError, match=r"compute capability 8.0 or newer .*Tesla T4\) has 7.5"):
        pick_configs(torch.device("cuda"), dtype, 64, 128, 128)


@on_cpu
def test_interpreter_too_old_is_named(monkeypatch):
    monkeypatch.setattr(runtime_module, "triton_version", lambda: (3, 6))
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(RuntimeError, match="from triton 3.7 on, and triton 3.6 is installed"):
        triton_attention(q, q, q)


@on_cpu
def test_interpreter_switched_on_after_import():
    """A notebook imports flashattn (and so triton, through torch) before it sets TRITON_INTERPRET=1."""
    code = (
        "import os, torch, flashattn\n"
        "from flashattn.tiled import tiled_forward_fa2\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q, k = torch.randn(1, 2, 40, 16, generator=g), torch.randn(1, 2, 50, 16, generator=g)\n"
        "o = flashattn.triton_attention(q, k, k, causal=True)\n"
        "print((o - tiled_forward_fa2(q, k, k, causal=True)[0]).abs().max().item())\n"
    )
    out = run_without_interpreter(code)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 1e-5


LONG_ROWS = """
import json, sys
import torch
from flashattn import decode_attention, triton_attention
from reference import reference_attention

j, d, stride = 2100, 16, 2**20  # row 2100 of k and v starts 2100 * 2**20 > 2**31 elements in
try:
    buffer = torch.empty(j * stride, dtype=torch.float16)  # 4.4 GB of address space, a few MB of it touched
except RuntimeError:
    print(json.dumps("no address space"))
    sys.exit(0)
rows = buffer.view(j, stride)
gen = torch.Generator().manual_seed(0)
rows[:, : 2 * d] = torch.randn(j, 2 * d, generator=gen).half()
k, v = rows[:, :d][None, None], rows[:, d : 2 * d][None, None]  # (1, 1, j, d), row stride 2**20
q = torch.randn(1, 2, 20, d, generator=gen).half()
do = torch.randn(1, 2, 20, d, generator=gen).half()
qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
o = triton_attention(qs, ks, vs, causal=True)
o.backward(do)
q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
ref = reference_attention(q64, k64, v64, causal=True)
ref.backward(do.double())

def rel(x, r):
    return ((x.double() - r).abs().max() / r.abs().max()).item()

errors = {"o": rel(o, ref), "dq": rel(qs.grad, q64.grad), "dk": rel(ks.grad, k64.grad), "dv": rel(vs.grad, v64.grad),
          "decode": rel(decode_attention(q, k, v, num_splits=3), ref)}
print(json.dumps(errors))
"""


@on_cpu
def test_row_offsets_past_two_to_the_31():
    """Keys and values whose rows lie 2**20 elements apart, 2100 of them: the last rows start past 2**31 elements.

    The kernels must take row offsets in 64 bits; in 32 they wrap, and read
    outside the buffer, which may kill the process: so the kernels run in a
    subprocess, and the test reads their errors (float16 against float64)
    from its output.
    """
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    tests = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", LONG_ROWS], capture_output=True, text=True, timeout=300, env=env, cwd=tests)
    assert out.returncode == 0, (out.returncode, out.stderr[-3000:])
    errs = json.loads(out.stdout.splitlines()[-1])
    if errs == "no address space":
        pytest.skip("4.4 GB of address space is not available here")
    assert max(errs.values()) < TOLERANCE[torch.float16], errs


def test_causal_must_be_a_bool():
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(TypeError, match="causal must be True or False, got 0.1"):
        triton_attention(q, q, q, causal=0.1)


@pytest.mark.parametrize("b, i, j", [(0, 4, 6), (2, 0, 6), (2, 4, 0)])
def test_empty_sizes_launch_nothing(b, i, j):
    device = "cpu" if INTERPRETED else "cuda"
    q, k, v = torch.randn(b, 2, i, 16, device=device), torch.randn(b, 2, j, 16, device=device), torch.randn(b, 2, j, 16, device=device)
    o = triton_attention(q, k, v, causal=True)
    assert o.shape == (b, 2, i, 16) and (o == 0).all()


def test_table_tiles_are_powers_of_two():
    # tl.arange and tl.dot need power-of-two tiles of at least 16
    for configs in list(_TABLE.values()) + list(_FLOAT32.values()):
        for cfg in (configs.fwd, configs.dkdv, configs.dq):
            for block in (cfg.block_q, cfg.block_k):
                assert block >= 16 and block & (block - 1) == 0, cfg


def test_import_without_triton():
    # flashattn itself must import without triton; triton_attention then says what is missing
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, flashattn\n"
        "q = torch.randn(1, 1, 4, 16)\n"
        "try:\n"
        "    flashattn.triton_attention(q, q, q)\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ImportError: triton_attention needs triton" in out.stdout


# ---------------------------------------------------------------------------------------------
# On the GPU, compiled

CUDA_CASES = [
    # b, h, h_kv, i, j, d, causal, dtype, layout
    (2, 8, 8, 1024, 1024, 128, False, torch.bfloat16, "contiguous"),
    (2, 8, 8, 1024, 1024, 128, True, torch.bfloat16, "contiguous"),
    (2, 8, 2, 700, 1300, 64, True, torch.bfloat16, "contiguous"),  # i < j, grouped-query
    (2, 8, 8, 1300, 700, 64, True, torch.bfloat16, "contiguous"),  # i > j: 600 rows see no key
    (2, 8, 8, 1000, 1000, 64, False, torch.float16, "contiguous"),
    (1, 16, 4, 2048, 2048, 128, True, torch.float16, "contiguous"),
    (2, 4, 4, 512, 512, 256, True, torch.bfloat16, "contiguous"),
    (2, 8, 8, 777, 777, 96, False, torch.bfloat16, "contiguous"),  # d padded to 128
    (2, 8, 8, 1024, 1024, 128, True, torch.bfloat16, "b i h d"),  # q, k, v views of (b, i, h, d)
    (2, 8, 1, 600, 900, 64, True, torch.bfloat16, "3-D kv"),
    (1, 4, 4, 4096, 4096, 128, True, torch.bfloat16, "contiguous"),  # the table's rows for long sequences
    (1, 4, 2, 2500, 3100, 64, False, torch.float16, "contiguous"),
]


@on_cuda
@pytest.mark.parametrize("b, h, h_kv, i, j, d, causal, dtype, layout", CUDA_CASES)
def test_cuda_within_twice_pytorch_error(b, h, h_kv, i, j, d, causal, dtype, layout):
    # PyTorch's own attention in the same dtype (SDPA through FlashAttention's flash path,
    # which also zeroes rows with no key) sets the scale of an acceptable error
    torch.manual_seed(i + j + d)
    if layout == "b i h d":
        q, k, v, do = (torch.randn(b, n, hh, d, device="cuda", dtype=dtype).transpose(1, 2)
                       for n, hh in ((i, h), (j, h_kv), (j, h_kv), (i, h)))
    else:
        q, k, v, do = make_inputs(b, h, h_kv, i, j, d, d, dtype, seed=i + j + d, kv_3d=layout == "3-D kv",
                                  device="cuda")
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    ours = errors(lambda q, k, v: triton_attention(q, k, v, causal=causal), q, k, v, do, causal)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    pytorch = errors(lambda q, k, v: FlashAttention(causal=causal)(q, k, v), q, k, v, do, causal)
    for name in ours:
        assert ours[name] <= max(2 * pytorch[name], RATIO_FLOOR[dtype]), (name, ours, pytorch)


@on_cuda
def test_cuda_float32_matches_reference():
    q, k, v, do = make_inputs(2, 4, 2, 300, 500, 64, 64, torch.float32, seed=11, device="cuda")
    errs = errors(lambda q, k, v: triton_attention(q, k, v, causal=True), q, k, v, do, True)
    assert max(errs.values()) < TOLERANCE[torch.float32], errs


@on_cuda
def test_cuda_rejects_cpu_tensors():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="CUDA tensors"):
        triton_attention(q, q, q)


@on_cuda
def test_cuda_long_rows_of_a_wide_buffer():
    """Row offsets past 2**31 elements: keys and values are slices of a (j, 32768) buffer, j = 66000.

    The result must equal, bit for bit, that of the same keys and values made
    contiguous (the kernels then do the same arithmetic in the same order).
    """
    j, width, d = 66000, 32768, 64
    assert j * width > 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)
    buffer = torch.randn(1, j, width, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = buffer[:, :, :d].unsqueeze(1)  # (1, 1, j, d), row stride 32768
    v = buffer[:, :, -d:].unsqueeze(1)
    q = torch.randn(1, 2, 300, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    do = torch.randn(1, 2, 300, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    results = []
    for kk, vv in ((k, v), (k.contiguous(), v.contiguous())):
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, kk, vv))
        o = triton_attention(qq, kk, vv, causal=True)
        o.backward(do)
        results.append((o, qq.grad, kk.grad, vv.grad))
    for name, strided, contiguous in zip(("o", "dq", "dk", "dv"), *results):
        assert torch.isfinite(strided).all(), name
        assert torch.equal(strided, contiguous), name


@pytest.mark.parametrize("d_v", [32, 24])  # 24: padded to 32 inside, sliced back
def test_a_call_without_gradients_skips_autograd_and_gives_the_same_output(d_v):
    device = "cpu" if INTERPRETED else "cuda"  # the interpreter on a CPU, the compiled kernels on a GPU
    # each requires a gradient
    q, k, v, _ = make_inputs(2, 4, 2, 37, 53, 32, d_v, torch.float32, seed=41, device=device)
    with torch.no_grad():
        fast = triton_attention(q, k, v, causal=True)
    assert fast.grad_fn is None and not fast.requires_grad
    plain = triton_attention(q.detach(), k.detach(), v.detach(), causal=True)  # nothing requires a gradient
    tracked = triton_attention(q, k, v, causal=True)  # through autograd
    assert tracked.grad_fn is not None
    assert fast.shape == (2, 4, 37, d_v) and fast.is_contiguous() == tracked.is_contiguous()
    assert torch.equal(fast, tracked.detach()) and torch.equal(plain, tracked.detach())


def test_the_launch_key_tells_apart_what_triton_specialises_on():
    """Arguments that triton compiles different kernels for never share a key; floats, which it does not specialise, do."""
    key = runtime_module._argument_key
    buffer = torch.empty(64, dtype=torch.float16)
    aligned, shifted = buffer[:32], buffer[1:33]  # 2 bytes apart: one of them is not on 16 bytes
    assert key(aligned) != key(shifted) and key(aligned) == key(buffer[8:40])  # 16 bytes apart: alike
    assert key(aligned) != key(aligned.float())
    assert key(1) != key(True) and key(0) != key(False)  # an int 1 is a constant to triton, a bool an i1
    assert key(16) != key(32) and key(1) != key(2)
    assert key(0.5) == key(2.0) and key(0.5) != key(1)
    with pytest.raises(TypeError):
        key("a string")  # no key: launched through triton's own path


@on_cuda
def test_a_launch_seen_before_skips_tritons_binding_and_gives_the_same_result(monkeypatch):
    """The second call of one shape launches the compiled kernel directly: the same output, bit for bit.

    A view whose address is not on 16 bytes is another specialisation: it
    goes through triton's own launch again, and is right against float64.
    """
    if runtime_module.triton_version() not in runtime_module.DIRECT_LAUNCH_TRITONS:
        pytest.skip(f"triton {runtime_module.triton_version()} launches every kernel through its own path")
    from triton.runtime.jit import JITFunction

    bound = []
    run = JITFunction.run
    monkeypatch.setattr(JITFunction, "run", lambda self, *args, **kwargs: bound.append(1) or run(self, *args, **kwargs))
    q, k, v = (torch.randn(2, 4, 203, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    first = triton_attention(q, k, v, causal=True)
    bound.clear()
    second = triton_attention(q, k, v, causal=True)
    assert bound == [] and torch.equal(first, second)
    storage = torch.randn(2 * 4 * 203 * 64 + 1, device="cuda", dtype=torch.float16)
    shifted = storage[1:].view(2, 4, 203, 64)  # 2 bytes past the allocation: not on 16 bytes
    o = triton_attention(shifted, k, v, causal=True)
    assert bound != []  # a new specialisation: triton's own launch
    ref = reference_attention(shifted, k, v, causal=True)
    assert rel_error(o, ref) <= TOLERANCE[torch.float16]


def test_the_direct_launch_is_the_one_the_installed_triton_makes():
    """For a triton of DIRECT_LAUNCH_TRITONS, its JITFunction.run binds and launches as runtime._launch_compiled repeats."""
    import inspect

    if runtime_module.triton_version() not in runtime_module.DIRECT_LAUNCH_TRITONS:
        pytest.skip(f"triton {runtime_module.triton_version()} launches every kernel through its own path")
    from triton.runtime.jit import JITFunction

    source = " ".join(inspect.getsource(JITFunction.run).split())
    assert "kernel_cache, kernel_key_cache, target, backend, binder = self.device_caches[device]" in source
    assert "bound_args, specialization, options = binder(*args, **kwargs)" in source
    assert ("kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata, "
            "knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound_args.values())") in source
