"""The Gluon forward of FlashAttention-3 on Hopper (``flashattn.triton.fa3``).

On every machine: the kernel compiles for sm90 with the installed triton
(when it is one of ``GLUON_TRITONS``), within the shared memory of one
Hopper block and without a spill, and ``fa3_unsupported`` names what it
cannot take. On a GPU of compute capability 9.x: its output and
log-sum-exp against float64, within twice PyTorch's own error in the same
dtype, at ragged sizes, causal (bottom-right) or not, grouped heads, rows
with no key, strided inputs; and the Triton backward run on its output (``fa3_attention``).
Gluon has no CPU interpreter, so those skip elsewhere.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from flashattn import FlashAttention, triton_attention
from flashattn.triton import attention, fa3, hopper, runtime
from flashattn.triton.launch import KernelConfigs, TileConfig
from flashattn.triton.runtime import _installed_triton, _parse
from reference import reference_attention
from test_triton_attention import RATIO_FLOOR, errors, make_inputs

ROOT = Path(__file__).resolve().parent.parent
HOPPER_SHARED = 232448  # bytes per block: 227 KiB, the most an H100 or H200 block may ask for
HOPPER = (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
          and _installed_triton() is not None and _parse(_installed_triton()) in fa3.GLUON_TRITONS)
on_hopper = pytest.mark.skipif(not HOPPER, reason="Gluon runs on a GPU of compute capability 9.x only "
                                                  "(no CPU interpreter), with a triton of fa3.GLUON_TRITONS")


def _check_tritons():
    spec = importlib.util.spec_from_file_location("check_tritons", ROOT / "scripts" / "check_tritons.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_kernel_compiles_for_hopper_within_its_shared_memory_and_without_a_spill():
    version = _installed_triton()
    if version is None or _parse(version) not in fa3.GLUON_TRITONS:
        pytest.skip(f"the Gluon kernel is built with triton {fa3.GLUON_TRITONS} only; found {version}")
    check_tritons = _check_tritons()
    launches = check_tritons.fa3_launches()
    schedules = {number: name for name, number in fa3.SCHEDULES.items()}
    compiled = {(s["boxes"]["q_desc"][1], s["constexprs"]["CAUSAL"], s["constexprs"]["CONSUMERS"],
                 schedules[s["constexprs"]["SCHEDULE"]]) for s in launches if s["dtype"] == "bfloat16"}
    assert compiled == {(d, causal, *step) for d in fa3.HEAD_DIMS for causal in (False, True) for step in fa3.STEPS}
    for result in check_tritons.compile_in_subprocesses(launches, 90, jobs=2, timeout=900):
        where = (result["dtype"], result["boxes"], result["constexprs"])
        assert result["compiled"], (where, result["error"])
        d = result["boxes"]["q_desc"][1]
        # each consumer's Q tile and STAGES slots of K and V tiles, in 16-bit elements, and a few barriers besides
        tiles = 2 * d * (result["constexprs"]["CONSUMERS"] * fa3.BLOCK_M + 2 * fa3.STAGES * fa3.BLOCK_N)
        assert tiles <= result["shared"] <= min(tiles + 1024, HOPPER_SHARED), (where, result["shared"])
        assert result["stack"] == 0, (where, result["stack"])  # spilled registers would live there


def test_a_triton_without_the_tested_gluon_is_named(monkeypatch):
    q = torch.empty(1, 2, 8, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(runtime, "_installed_triton", lambda: "3.5.1")
    reason = fa3.fa3_unsupported(q, q, q)
    assert "triton 3.6, 3.9 only" in reason and "found triton 3.5.1" in reason, reason
    monkeypatch.setattr(runtime, "_installed_triton", lambda: None)
    assert "found no triton" in fa3.fa3_unsupported(q, q, q)


@pytest.mark.skipif(_installed_triton() is None or _parse(_installed_triton()) not in fa3.GLUON_TRITONS,
                    reason="the input checks come after the triton check")
def test_what_the_kernel_cannot_take_is_named_in_one_line():
    x = torch.empty(1, 2, 8, 64, dtype=torch.bfloat16)
    cases = [
        ((x.float(), x.float(), x.float()), "float16 or bfloat16"),
        ((x, x.half(), x), "all three alike"),
        ((x[..., :32], x[..., :32], x[..., :32]), "d = d_v in (64, 128); got d = 32"),
        ((x, x, torch.empty(1, 2, 8, 128, dtype=torch.bfloat16)), "got d = 64, d_v = 128"),
        ((torch.empty(1, 2, 64, 8, dtype=torch.bfloat16).transpose(2, 3), x, x), "last stride of 1"),
        ((x, x, x), "runs on a Hopper GPU"),  # everything else fits: the CPU is what is wrong
    ]
    for (q, k, v), words in cases:
        reason = fa3.fa3_unsupported(q, k, v)
        assert reason is not None and words in reason and "\n" not in reason, (words, reason)
    with pytest.raises(ValueError, match="fa3_forward: the Gluon kernel runs on a Hopper GPU"):
        fa3.fa3_forward(x, x, x)
    with pytest.raises(ValueError, match=r"warpgroups must be one of \(1, 2\), got 3"):
        fa3.fa3_forward(x, x, x, warpgroups=3)
    with pytest.raises(ValueError, match="got schedule='pingpong' with warpgroups=1"):
        fa3.fa3_forward(x, x, x, schedule="pingpong")
    with pytest.raises(ValueError, match="got schedule='fast'"):
        fa3.fa3_forward(x, x, x, schedule="fast")


@pytest.mark.skipif(_installed_triton() is None or _parse(_installed_triton()) not in fa3.GLUON_TRITONS,
                    reason="builds Gluon's tensor descriptors")
def test_the_descriptor_built_without_checks_equals_the_checked_one():
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    t = torch.randn(2, 300, 3, 8, 128, dtype=torch.bfloat16)[:, :, 1].transpose(1, 2)  # (2, 8, 300, 128), strided
    fast = fa3._descriptor(t, fa3.BLOCK_M)  # a box of 64 rows of 128: not square
    block = [1, 1, fa3.BLOCK_M, 128]
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)
    checked = TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)
    assert type(fast) is TensorDescriptor and fast.base is t
    # the direct launch tells descriptors apart by everything but their base
    key = runtime._argument_key
    other = torch.randn(2, 300, 3, 8, 128, dtype=torch.bfloat16)[:, :, 2].transpose(1, 2)  # same layout
    assert key(fast) == key(checked) == key(fa3._descriptor(other, fa3.BLOCK_M))
    assert key(fast) != key(fa3._descriptor(t, fa3.BLOCK_N))  # another box
    assert key(fast) != key(fa3._descriptor(t[:, :, :200], fa3.BLOCK_M))  # another shape
    assert {n: v for n, v in vars(fast).items() if n != "base"} == {n: v for n, v in vars(checked).items() if n != "base"}


@pytest.mark.skipif(_installed_triton() is None or _parse(_installed_triton()) not in fa3.GLUON_TRITONS,
                    reason="builds Gluon's tensor descriptors")
@pytest.mark.parametrize("warpgroups, schedule", fa3.STEPS)
def test_the_launch_describes_each_head_and_covers_every_row(monkeypatch, warpgroups, schedule):
    # what fa3_forward hands the kernel, seen through a stand-in: the grid, the descriptors' boxes and
    # strides (per head, no copy of strided inputs), the group size, the base-2 scale and its sign
    launches = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, args, kwargs))

    monkeypatch.setattr(fa3, "_kernels", lambda: type("Module", (), {"fa3_fwd_kernel": Kernel()}))
    monkeypatch.setattr(fa3, "fa3_unsupported", lambda q, k, v: None)
    qkv = torch.randn(2, 300, 3, 8, 128, dtype=torch.bfloat16)
    q = qkv[:, :, 0].transpose(1, 2)  # (2, 8, 300, 128), strided
    k, v = (qkv[:, :200, n, :2].transpose(1, 2) for n in (1, 2))  # 2 K/V heads: g = 4
    fa3.fa3_forward(q, k, v, causal=True, scale=0.1, warpgroups=warpgroups, schedule=schedule)
    fa3.fa3_forward(q, k, v, causal=True, scale=-0.1, warpgroups=warpgroups, schedule=schedule)
    (grid, args, kwargs), (_, negated, _) = launches
    assert grid == (math.ceil(300 / (warpgroups * fa3.BLOCK_M)), 8, 2)
    q_desc, k_desc, v_desc, o, lse, *ints = args
    assert (q_desc.shape, q_desc.strides, q_desc.block_shape) == ([2, 8, 300, 128], list(q.stride()),
                                                                  [1, 1, fa3.BLOCK_M, 128])
    assert (k_desc.shape, k_desc.strides, k_desc.block_shape) == ([2, 2, 200, 128], list(k.stride()),
                                                                  [1, 1, fa3.BLOCK_N, 128])
    assert (q_desc.base.data_ptr(), v_desc.base.data_ptr()) == (q.data_ptr(), v.data_ptr())  # no copies
    assert o.shape == (2, 8, 300, 128) and lse.shape == (2, 8, 300) and lse.dtype == torch.float32
    assert ints[:3] == list(o.stride()[:3]) and ints[3:7] == [8, 4, 300, 200]
    # a negative scale: (-q) k^T |scale| are the same scores, and the kernel's scale stays positive
    assert ints[7] == pytest.approx(0.1 * math.log2(math.e)) == negated[12]
    assert torch.equal(negated[0].base, -q)
    assert kwargs == dict(CAUSAL=True, STAGES=fa3.STAGES, CONSUMERS=warpgroups, SCHEDULE=fa3.SCHEDULES[schedule],
                          num_warps=4)


def test_triton_attention_takes_the_gluon_forward_only_where_a_row_says_so_and_it_runs(monkeypatch):
    base = KernelConfigs(TileConfig(1, 1, 1, 1), TileConfig(2, 2, 2, 2), TileConfig(3, 3, 3, 3))
    x = torch.empty(1, 2, 4096, 128, dtype=torch.bfloat16)
    capability = (9, 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(runtime, "_installed_triton", lambda: "3.6.0")
    cuda = torch.device("cuda")
    with fa3.gluon_rows({}):  # an empty table changes nothing
        assert fa3.gluon_configs(base, cuda, False, x, x, x) == base
    table = fa3.gluon_table()
    row = fa3.GluonLaunch(2, "pingpong")
    with fa3.gluon_rows({(128, False, "long"): row}):
        assert fa3.gluon_configs(base, cuda, False, x, x, x) == dataclasses.replace(base, fwd=row)
        assert fa3.gluon_configs(base, cuda, True, x, x, x) == base  # no causal row
        short = x[:, :, :1024]
        assert fa3.gluon_configs(base, cuda, False, short, short, short) == base  # no short row
        # "long" when either length is: 1024 queries against 4096 keys take the row
        assert fa3.gluon_configs(base, cuda, False, short, x, x) == dataclasses.replace(base, fwd=row)
        assert fa3.gluon_configs(base, cuda, False, x.float(), x.float(), x.float()) == base  # float32
        capability = (8, 0)  # an A100: the Triton kernels, silently
        assert fa3.gluon_configs(base, cuda, False, x, x, x) == base
        capability = (9, 0)
        monkeypatch.setattr(runtime, "_installed_triton", lambda: "3.7.0")  # a Gluon it was not built with
        assert fa3.gluon_configs(base, cuda, False, x, x, x) == base
    assert fa3.gluon_table() == table  # the rows were the block's only


def test_each_gluon_row_was_measured_faster_than_the_triton_forward():
    # the rule of fa3._GLUON_TABLE, from the committed run: at every length of the row's key, the step's
    # slowest sample beat the Triton forward's fastest; and no other row passed the rule (a row is not dropped)
    bench = json.loads((ROOT / "flashattn" / "results" / "fa3-steps-h100.json").read_text())
    samples = {(r["provider"], r["d"], r["causal"], r["n"]): r["samples_ms"]
               for r in bench["rows"] if r["mode"] == "fwd"}
    faster: dict[tuple[int, bool, str], list[fa3.GluonLaunch]] = {}
    for d in bench["sizes"]["d"]:
        for causal in (False, True):
            for warpgroups, schedule in fa3.STEPS:
                provider = f"fa3_{warpgroups}wg_{schedule}"
                lengths = {hopper.hopper_key(d, causal, n, n): [] for n in bench["sizes"]["n"]}
                for n in bench["sizes"]["n"]:
                    wins = max(samples[provider, d, causal, n]) < min(samples["triton", d, causal, n])
                    lengths[hopper.hopper_key(d, causal, n, n)].append(wins)
                for key, wins in lengths.items():
                    if all(wins):
                        faster.setdefault(key, []).append(fa3.GluonLaunch(warpgroups, schedule))
    table = fa3.gluon_table()
    assert table and set(table) == set(faster), (table, faster)
    assert all(launch in faster[key] for key, launch in table.items()), (table, faster)


def test_the_forward_of_a_gluon_launch_is_the_gluon_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(fa3, "launch_gluon", lambda *args: calls.append(args) or ("o", "lse"))
    x = torch.empty(1, 2, 8, 64, dtype=torch.bfloat16)
    cfg = fa3.GluonLaunch(1, "overlap")
    assert attention.launch_forward(x, x, x, True, 0.125, cfg) == ("o", "lse")
    assert calls == [(x, x, x, True, 0.125, cfg)]


# -- on a Hopper GPU ---------------------------------------------------------------------------

HOPPER_CASES = [
    # b, h, h_kv, i, j, d, causal, dtype
    (2, 4, 4, 1000, 1000, 128, False, torch.bfloat16),  # ragged: 1000 is no multiple of 64 or 128
    (2, 8, 2, 777, 1531, 128, True, torch.bfloat16),  # grouped heads; i < j: the diagonal moves right
    (1, 4, 4, 1500, 333, 64, True, torch.float16),  # i > j: the first 1167 rows see no key
    (1, 8, 2, 2000, 2000, 64, False, torch.bfloat16),
    (1, 2, 2, 64, 128, 128, True, torch.float16),  # one query tile, one key tile
]


@on_hopper
@pytest.mark.parametrize("warpgroups, schedule", fa3.STEPS)
@pytest.mark.parametrize("b, h, h_kv, i, j, d, causal, dtype", HOPPER_CASES)
def test_within_twice_pytorch_error(b, h, h_kv, i, j, d, causal, dtype, warpgroups, schedule):
    q, k, v, do = make_inputs(b, h, h_kv, i, j, d, d, dtype, seed=i + j + d, device="cuda")
    ours = errors(lambda q, k, v: fa3.fa3_attention(q, k, v, causal=causal, warpgroups=warpgroups, schedule=schedule),
                  q, k, v, do, causal)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    pytorch = errors(lambda q, k, v: FlashAttention(causal=causal)(q, k, v), q, k, v, do, causal)
    for name in ours:
        assert ours[name] <= max(2 * pytorch[name], RATIO_FLOOR[dtype]), (name, ours, pytorch)


@on_hopper
@pytest.mark.parametrize("warpgroups, schedule", fa3.STEPS)
@pytest.mark.parametrize("causal", [False, True])
def test_lse_and_rows_without_keys(causal, warpgroups, schedule):
    # lse against float64's logsumexp of the scaled, masked scores; a row with no key: o = 0, lse = -inf
    q, k, v, _ = make_inputs(1, 4, 2, 700, 300, 128, 128, torch.bfloat16, seed=5, device="cuda")
    o, lse = fa3.fa3_forward(q.detach(), k.detach(), v.detach(), causal=causal, warpgroups=warpgroups,
                             schedule=schedule)
    q64, k64 = q.detach().double().cpu(), k.detach().double().cpu().repeat_interleave(2, dim=1)
    scores = q64 @ k64.transpose(-1, -2) / math.sqrt(128)
    if causal:  # bottom-right: row r sees keys c <= r + j - i
        keep = torch.ones(700, 300, dtype=torch.bool).tril(300 - 700)
        scores = scores.masked_fill(~keep, -math.inf)
    want = torch.logsumexp(scores, dim=-1)
    has_key = want > -math.inf
    # float32 accumulation of 128 products of bfloat16 values, exp2 and log2 in float32: errors ~1e-6
    assert (lse.cpu()[has_key] - want[has_key]).abs().max() < 1e-4
    assert torch.equal(lse.cpu()[~has_key], want[~has_key])
    assert torch.equal(o.cpu()[~has_key], torch.zeros_like(o.cpu()[~has_key]))
    assert has_key.all() != causal  # causal with i > j leaves rows without keys; the test must see them


@on_hopper
@pytest.mark.parametrize("warpgroups, schedule", fa3.STEPS)
def test_strided_inputs(warpgroups, schedule):
    # q, k, v as views of (b, n, h, d) projections: the descriptors take their strides, no copy
    gen = torch.Generator(device="cuda").manual_seed(11)
    qkv = torch.randn(2, 900, 3, 8, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    q, k, v = (qkv[:, :, n].transpose(1, 2) for n in range(3))
    assert not q.is_contiguous()
    o, _ = fa3.fa3_forward(q, k, v, causal=True, warpgroups=warpgroups, schedule=schedule)
    want = reference_attention(q.double(), k.double(), v.double(), causal=True)
    pytorch = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    error, sdpa = ((x.double().cpu() - want).abs().max().item() for x in (o, pytorch))
    assert error <= max(2 * sdpa, RATIO_FLOOR[torch.bfloat16] * want.abs().max().item()), (error, sdpa)


@on_hopper
@pytest.mark.parametrize("causal", [False, True])
def test_triton_attention_with_a_gluon_row(causal, monkeypatch):
    # a row of the Gluon table: triton_attention's forward is the Gluon kernel, its backward the Triton one
    launched = []
    launch_gluon = fa3.launch_gluon
    monkeypatch.setattr(fa3, "launch_gluon", lambda *args: launched.append(args[-1]) or launch_gluon(*args))
    q, k, v, do = make_inputs(2, 8, 2, 1500, 1500, 128, 128, torch.bfloat16, seed=7, device="cuda")
    row = fa3.GluonLaunch(2, "pingpong")
    with fa3.gluon_rows({(128, causal, "long"): row}):
        ours = errors(lambda q, k, v: triton_attention(q, k, v, causal=causal), q, k, v, do, causal)
    assert launched == [row]
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    pytorch = errors(lambda q, k, v: FlashAttention(causal=causal)(q, k, v), q, k, v, do, causal)
    for name in ours:
        assert ours[name] <= max(2 * pytorch[name], RATIO_FLOOR[torch.bfloat16]), (name, ours, pytorch)
