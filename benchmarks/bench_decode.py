"""Times decode_attention (split-KV) against SDPA, triton_attention and FlexAttention on decoding shapes.

The grid: bf16, h = 32 query heads with h_kv = 8 (grouped-query) or 32 K/V
heads, d = 128, batch b in {1, 8, 32}, cache length j from 4k to 128k (full
caches), i in {1, 4} new queries (bottom-right causal). Providers, all in one
run and timed the same way:

- ``decode``: ``flashattn.decode_attention``, its own choice of num_splits;
- ``sdpa_gqa``: ``F.scaled_dot_product_attention(..., enable_gqa=True)``,
  PyTorch choosing its kernel; ``sdpa_flash``, ``sdpa_efficient`` and
  ``sdpa_cudnn``: the same held to one backend (a backend that refuses the
  inputs is recorded, not timed);
- ``sdpa_packed`` (i = 1 only): the query heads of one K/V head passed as
  ``g`` queries of that head, ``(b, h_kv, g, d)``, so that SDPA reads each
  K/V head once without ``enable_gqa``; the best input SDPA can be given;
- ``triton``: ``flashattn.triton_attention`` (FlashAttention-2's grid);
- ``flex``: ``torch.compile(flex_attention, dynamic=False)`` with
  ``enable_gqa``, a block mask for the causal rule when i > 1. Compiled for
  each shape: with shapes left dynamic, inductor cannot size the chunks of its
  decoding kernel and falls back to its long-query kernel. Which of the two
  ran is read from the generated code and recorded (``flex_kernel``).

``--ragged``: one query per sequence against caches of different lengths,
as a server decodes a batch: b = 8 sequences of 1k, 2k, ..., 128k tokens in
a cache of 128k slots, h = 32, h_kv = 8. What a user would otherwise call:
SDPA with a key-padding mask (``sdpa_mask``, PyTorch choosing; held to its
memory-efficient and cuDNN backends; and ``sdpa_mask_packed``, the query
heads of each K/V head passed as its queries, as ``sdpa_packed`` above), and
FlexAttention with a length mask, compiled (``flex``). Bandwidth counts the bytes of the keys each
sequence holds (``2 h_kv d`` bf16 numbers per token); every provider's
output is checked against float64 per sequence.

Decoding runs one small step at a time, and serving systems replay it from
CUDA graphs; every provider is timed so (``triton.testing.do_bench_cudagraph``
through the harness of ``timing.py``: providers interleaved, several rounds,
median and spread), which removes the host's launch cost from all of them
alike. The eager time of ``decode`` and ``sdpa_gqa`` is recorded too.
Effective bandwidth = bytes of K and V read once (``2 b h_kv j d`` bf16
numbers) / time, set against the copy bandwidth measured in the same run
(read + write bytes of a 4 GiB ``copy_``, per second).

Before timing, at every shape, each provider's output for sequence 0 is
compared with a float64 reference (max |error|); decode's error must be at
most twice SDPA's own.

    python benchmarks/bench_decode.py --out flashattn/results/decode-h200.json
    python benchmarks/bench_decode.py --tune --out flashattn/results/decode-tune-h200.json
    python benchmarks/bench_decode.py --ragged --out flashattn/results/decode-ragged-h200.json
    python benchmarks/bench_decode.py --batch 1 8 --out decode-b1-b8.json   # a part of the grid
    python benchmarks/bench_decode.py --quick           # a few points, without flex
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from torch._inductor.utils import run_and_get_code
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from triton.testing import do_bench

import flashattn.triton.decoding as decoding
from flashattn import decode_attention, padding_mask, triton_attention
from accuracy import plain_attention
from runinfo import run_info
from timing import ROUNDS, compare, differs, ratio

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
H, D = 32, 128
BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}
PROVIDERS = ["decode", "sdpa_gqa", *BACKENDS, "sdpa_packed", "triton", "flex"]
MASK_BACKENDS = {"sdpa_mask_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_mask_cudnn": SDPBackend.CUDNN_ATTENTION}
RAGGED_B, RAGGED_J, RAGGED_SHORTEST = 8, 131072, 1024
GiB = 2**30


@functools.cache
def compiled_flex() -> Callable:
    """flex_attention compiled once per shape: its decoding kernel needs a static batch and static heads."""
    return torch.compile(flex_attention, dynamic=False)


def copy_bandwidth(rep: int) -> float:
    """Bytes read and written per second by a device-to-device copy of 4 GiB."""
    src = torch.empty(4 * GiB // 2, dtype=DTYPE, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), rep=rep, return_mode="median")
    return 2 * 4 * GiB / (ms * 1e-3)


def sdpa_mask(i: int, j: int):
    """The bottom-right causal rule for SDPA; none for one query (it sees every key)."""
    return None if i == 1 else causal_lower_right(i, j)


def attention(provider: str, i: int, j: int, h_kv: int) -> Callable | None:
    """``fn(q, k, v) -> o`` for one provider, or None where it does not apply."""
    if provider == "decode":
        return lambda q, k, v: decode_attention(q, k, v)
    if provider == "triton":
        return lambda q, k, v: triton_attention(q, k, v, causal=True)
    if provider == "sdpa_gqa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask(i, j), enable_gqa=True)
    if provider in BACKENDS:
        backend = BACKENDS[provider]

        def sdpa(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask(i, j), enable_gqa=True)
        return sdpa
    if provider == "sdpa_packed":
        if i != 1:
            return None
        g = H // h_kv

        def packed(q, k, v):
            b = q.shape[0]
            o = F.scaled_dot_product_attention(q.view(b, h_kv, g, D), k, v)  # (b, h_kv, g, d)
            return o.view(b, H, 1, D)
        return packed
    block_mask = None
    if i > 1:
        offset = j - i
        block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + offset, None, None, i, j,
                                       device=DEVICE)
    return lambda q, k, v: compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=True)


def flex_kernel(sources: list[str]) -> str:
    """Which of inductor's FlexAttention templates the generated code ``sources`` launches.

    ``flex_decoding`` (the split-KV decoding kernel) has a ``SPLIT_KV``
    parameter that the long-query kernel ``flex_attention`` lacks; both
    carry the templates' ``Q, K, V`` notation comment.
    """
    code = "\n".join(sources)
    if "SPLIT_KV" in code:
        return "flex_decoding"
    if "GQA_SHARED_HEADS" in code:
        return "flex_attention"
    return "not a FlexAttention template (" + (", ".join(sorted(set(re.findall(r"def (triton_\w+)", code)))) or "no kernel") + ")"


def first_call(provider: str, fn: Callable, *args) -> tuple[torch.Tensor, str | None]:
    """The first output of ``provider``, on the host; for ``flex``, compiled afresh, with the template it runs.

    Raises what a backend that refuses the inputs raises.
    """
    if provider != "flex":
        out = fn(*args)
        torch.cuda.synchronize()
        return out, None
    out, sources = run_and_get_code(fn, *args)
    torch.cuda.synchronize()
    return out, flex_kernel(sources)


def refusal(exc: Exception) -> str:
    """The first line of a backend's refusal, as a result file keeps it."""
    return str(exc).splitlines()[0][:300]


def ragged_lengths(b: int, shortest: int, longest: int) -> list[int]:
    """``b`` cache lengths spread evenly in log from ``shortest`` to ``longest`` (1k, 2k, ..., 128k for b = 8)."""
    return [round(shortest * (longest / shortest) ** (n / (b - 1))) for n in range(b)]


def ragged_providers(lens: torch.Tensor, j: int, flex: Callable | None = None) -> dict[str, Callable]:
    """``fn(q, k, v) -> o`` for each way of attending caches of lengths ``lens`` ``(b,)`` in ``j`` slots, one query each.

    ``flex`` is the FlexAttention to call (compiled by default; the tests
    pass the eager one).
    """
    flex = compiled_flex() if flex is None else flex
    keep = padding_mask(lens, j)  # (b, 1, 1, j)
    block_mask = create_block_mask(lambda n, h, q_idx, kv_idx: kv_idx < lens[n], lens.shape[0], None, 1, j,
                                   device=lens.device)  # one head: the form flex's decoding kernel takes with GQA

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)

    def held_to(backend):
        def call(q, k, v):
            with sdpa_kernel([backend]):
                return sdpa(q, k, v)
        return call

    def packed(q, k, v):  # the g query heads of a K/V head as g queries of it: SDPA reads each K/V head once
        b, h, _, d = q.shape
        o = F.scaled_dot_product_attention(q.view(b, k.shape[1], h // k.shape[1], d), k, v, attn_mask=keep)
        return o.view(b, h, 1, v.shape[-1])

    return {"decode": lambda q, k, v: decode_attention(q, k, v, cache_lens=lens), "sdpa_mask": sdpa,
            **{name: held_to(backend) for name, backend in MASK_BACKENDS.items()}, "sdpa_mask_packed": packed,
            "flex": lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=True)}


def ragged_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int]) -> list[torch.Tensor]:
    """Float64 attention of each sequence ``n`` over its first ``lens[n]`` keys: one ``(h, i, d)`` tensor per sequence."""
    return [plain_attention(q[n:n + 1].double(), k[n:n + 1, :, :length].double(), v[n:n + 1, :, :length].double(),
                            causal=True)[0] for n, length in enumerate(lens)]


def ragged_error(o: torch.Tensor, want: list[torch.Tensor]) -> float:
    """The largest |error| of ``o`` ``(b, h, i, d)`` over every sequence."""
    return max((o[n].double() - w).abs().max().item() for n, w in enumerate(want))


def ragged(args: argparse.Namespace, meta: dict) -> dict:
    """Every provider of :func:`ragged_providers` on the ragged batch, checked per sequence, timed in one harness."""
    h_kv = 8
    lens_list = ragged_lengths(RAGGED_B, RAGGED_SHORTEST, RAGGED_J)
    lens = torch.tensor(lens_list, device=DEVICE, dtype=torch.int32)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(RAGGED_B, hh, n, D, device=DEVICE, dtype=DTYPE, generator=gen)
               for hh, n in ((H, 1), (h_kv, RAGGED_J), (h_kv, RAGGED_J)))
    want = ragged_reference(q, k, v, lens_list)
    kv_bytes = 2 * sum(lens_list) * h_kv * D * 2
    calls, errors, skipped, flex_ran = {}, {}, [], None
    for name, fn in ragged_providers(lens, RAGGED_J).items():
        try:
            o, ran = first_call(name, fn, q, k, v)
        except Exception as exc:  # a backend that refuses these inputs
            skipped.append(dict(provider=name, why=refusal(exc)))
            continue
        flex_ran = ran or flex_ran
        errors[name] = ragged_error(o, want)
        calls[name] = functools.partial(fn, q, k, v)
    graphed = compare(calls, rounds=args.rounds, graph=True, rep_ms=args.rep)
    eager = compare(calls, rounds=args.rounds, rep_ms=args.rep)
    rows = [dict(provider=name, **timing.record(), eager=eager[name].record(), eager_ms=eager[name].median,
                 max_error=errors[name], tb_per_s=kv_bytes / (timing.median * 1e-3) / 1e12)
            for name, timing in graphed.items()]
    others = {name: timing.median for name, timing in graphed.items() if name != "decode"}
    best = min(others, key=others.get)
    speedup = ratio(graphed[best], graphed["decode"])  # the fastest other's time over decode's
    sdpa_error = min(e for name, e in errors.items() if name.startswith("sdpa"))
    failures = ([f"decode error {errors['decode']:.2e} > 2 x SDPA's {sdpa_error:.2e}"]
                if errors["decode"] > 2 * sdpa_error else [])
    for row in rows:
        print(f"{row['provider']:20s} {row['ms'] * 1e3:8.1f} us [{row['ms_min'] * 1e3:.1f}-{row['ms_max'] * 1e3:.1f}] "
              f"eager {row['eager_ms'] * 1e3:8.1f} us {row['tb_per_s']:5.2f} TB/s err {row['max_error']:.1e}", flush=True)
    print(f"flex ran {flex_ran}; decode against the fastest other ({best}): {speedup['median']:.2f}x "
          f"[{speedup['low']:.2f}-{speedup['high']:.2f}]"
          f"{'' if differs(graphed[best], graphed['decode']) else ', within the spread'}; "
          f"skipped {[s['provider'] for s in skipped]}", flush=True)
    return {**meta, "bandwidth": "bytes of the keys and values the sequences hold (2 h_kv d bf16 per token) / time",
            **dict(b=RAGGED_B, h_kv=h_kv, i=1, j=RAGGED_J, cache_lens=lens_list, rows=rows, skipped=skipped,
                   flex_kernel=flex_ran, fastest_other=best, speedup=speedup,
                   speedup_beyond_spread=differs(graphed[best], graphed["decode"]), accuracy_failures=failures,
                   complete=True)}


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Float64 attention of sequence 0 (b = 1), bottom-right causal."""
    return plain_attention(*(t[:1].double() for t in (q, k, v)), causal=True)


def tune(args: argparse.Namespace) -> dict:
    """Launches of the chunk kernel, and numbers of chunks around the chosen one, on a few decoding shapes.

    The numbers of chunks of one shape and launch are timed against each
    other through the harness (interleaved, ``--rounds`` samples each).
    """
    shapes = [(1, 8, 1, 32768), (1, 8, 1, 131072), (8, 8, 4, 16384), (32, 8, 1, 16384), (32, 32, 1, 4096)]
    configs = [decoding.DecodeConfig(*c) for c in ((64, 4, 2), (64, 4, 3), (64, 2, 2), (128, 4, 2), (32, 2, 3))]
    results = []
    for b, h_kv, i, j in shapes:
        q, k, v = (torch.randn(b, hh, n, D, device=DEVICE, dtype=DTYPE) for hh, n in ((H, i), (h_kv, j), (h_kv, j)))
        want = reference(q, k, v)
        for cfg in configs:
            decoding.use_16bit_config(cfg)
            chosen = decoding.decode_num_splits(q, k, v)
            resident = max(decoding.measured_residency(cfg))
            candidates = sorted({max(1, s) for s in (chosen, chosen // 2, chosen * 3 // 4, chosen * 3 // 2,
                                                     chosen * 2, chosen * 4)})
            calls = {splits: functools.partial(decode_attention, q, k, v, num_splits=splits) for splits in candidates}
            errors = {splits: (fn()[:1].double() - want).abs().max().item() for splits, fn in calls.items()}
            timings = compare(calls, rounds=args.rounds, graph=True, rep_ms=args.rep)
            for splits, timing in timings.items():
                ms = timing.median
                bandwidth = 2 * b * h_kv * j * D * 2 / (ms * 1e-3)
                results.append(dict(b=b, h_kv=h_kv, i=i, j=j, config=vars(cfg), resident=resident, chosen=chosen,
                                    num_splits=splits, **timing.record(), tb_per_s=bandwidth / 1e12,
                                    max_error=errors[splits]))
                print(f"b={b:2d} h_kv={h_kv:2d} i={i} j={j:6d} {tuple(vars(cfg).values())} resident {resident} "
                      f"splits {splits:3d}{'*' if splits == chosen else ' '} {ms * 1e3:8.1f} us "
                      f"[{timing.low * 1e3:.1f}-{timing.high * 1e3:.1f}] {bandwidth / 1e12:5.2f} TB/s "
                      f"err {errors[splits]:.1e}", flush=True)
    return dict(results=results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="where to write the JSON results")
    parser.add_argument("--quick", action="store_true", help="a few points, without flex")
    parser.add_argument("--tune", action="store_true", help="sweep the chunk kernel's launch instead")
    parser.add_argument("--ragged", action="store_true", help="one batch of ragged cache lengths instead (b = 8, 1k-128k)")
    parser.add_argument("--rep", type=int, default=50, help="milliseconds of timing per sample")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="samples of every provider, interleaved")
    parser.add_argument("--batch", type=int, nargs="+", help="only these batch sizes of the grid (a run in parts: "
                        "FlexAttention compiles for every shape)")
    parser.add_argument("--h-kv", type=int, nargs="+", help="only these numbers of K/V heads of the grid")
    parser.add_argument("--queries", type=int, nargs="+", help="only these numbers of new queries i of the grid")
    parser.add_argument("--lengths", type=int, nargs="+", help="only these cache lengths j of the grid")
    parser.add_argument("--max-kv-gib", type=float, default=64, help="skip shapes whose K and V take more")
    args = parser.parse_args()
    start = time.perf_counter()
    copy = copy_bandwidth(args.rep)
    print(f"copy bandwidth {copy / 1e12:.2f} TB/s (read + write)", flush=True)
    meta = run_info(h=H, d=D, dtype="bfloat16", quick=args.quick, rep_ms=args.rep, batch=args.batch, h_kv=args.h_kv,
                    queries=args.queries, lengths=args.lengths)
    meta.update(copy_tb_per_s=copy / 1e12,
                timing=(f"benchmarks/timing.py: {args.rounds} rounds, providers interleaved; each sample "
                        f"do_bench_cudagraph's median over {args.rep} ms (eager: do_bench's); ms is the median "
                        "of the samples, ms_min/ms_max/ms_q1/ms_q3 their spread"),
                bandwidth="bytes of K and V (2 b h_kv j d bf16) / time")
    if args.tune:
        out = dict(**meta, **tune(args))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)
        return

    if args.ragged:
        out = ragged(args, meta)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)
        for failure in out["accuracy_failures"]:
            print("ACCURACY:", failure)
        return

    if args.quick:
        grid = [(1, 8, i, j) for i in (1, 4) for j in (4096, 32768)]
        providers = [p for p in PROVIDERS if p != "flex"]
    else:
        grid = [(b, h_kv, i, j) for h_kv in (8, 32) for b in (1, 8, 32) for j in (4096, 8192, 16384, 32768, 65536, 131072)
                for i in (1, 4)]
        providers = PROVIDERS
    for axis, chosen in enumerate((args.batch, args.h_kv, args.queries, args.lengths)):  # (b, h_kv, i, j)
        if chosen:
            grid = [point for point in grid if point[axis] in chosen]
    torch._dynamo.config.cache_size_limit = 256  # flex compiles for each shape
    rows, skipped, failures = [], [], []

    def write(complete: bool = False) -> None:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(**meta, providers=providers, complete=complete, rows=rows, skipped=skipped,
                               accuracy_failures=failures), f, indent=1)

    cache_key, cache = None, None
    for b, h_kv, i, j in grid:
        kv_bytes = 2 * b * h_kv * j * D * 2
        if kv_bytes > args.max_kv_gib * GiB:
            skipped.append(dict(b=b, h_kv=h_kv, i=i, j=j, provider="all",
                                why=f"K and V take {kv_bytes / GiB:.0f} GiB, above --max-kv-gib {args.max_kv_gib}"))
            continue
        if cache_key != (b, h_kv, j):
            cache = None
            torch.cuda.empty_cache()
            gen = torch.Generator(device=DEVICE).manual_seed(j + b)
            cache = tuple(torch.randn(b, h_kv, j, D, device=DEVICE, dtype=DTYPE, generator=gen) for _ in range(2))
            cache_key = (b, h_kv, j)
        k, v = cache
        q = torch.randn(b, H, i, D, device=DEVICE, dtype=DTYPE)
        want = reference(q, k, v)
        errors, calls, flex_ran = {}, {}, None
        for provider in providers:
            fn = attention(provider, i, j, h_kv)
            if fn is None:
                continue
            try:
                o, ran = first_call(provider, fn, q, k, v)
            except Exception as exc:  # a backend that refuses these inputs
                skipped.append(dict(b=b, h_kv=h_kv, i=i, j=j, provider=provider, why=refusal(exc)))
                continue
            flex_ran = ran or flex_ran
            errors[provider] = (o[:1].double() - want).abs().max().item()
            calls[provider] = functools.partial(fn, q, k, v)
        # every provider replayed from a CUDA graph, interleaved over several rounds; the eager calls likewise
        graphed = compare(calls, rounds=args.rounds, graph=True, rep_ms=args.rep)
        eager = compare({p: calls[p] for p in ("decode", "sdpa_gqa") if p in calls}, rounds=args.rounds,
                        rep_ms=args.rep)
        times = {provider: timing.median for provider, timing in graphed.items()}
        for provider, timing in graphed.items():
            row = dict(b=b, h_kv=h_kv, i=i, j=j, provider=provider, **timing.record(), max_error=errors[provider],
                       tb_per_s=kv_bytes / (timing.median * 1e-3) / 1e12)
            if provider == "flex":
                row["flex_kernel"] = flex_ran
            if provider in eager:
                row["eager"] = eager[provider].record()
                row["eager_ms"] = eager[provider].median
            rows.append(row)
        sdpa_error = min(e for p, e in errors.items() if p.startswith("sdpa"))
        if errors["decode"] > 2 * sdpa_error:
            failures.append(f"b={b} h_kv={h_kv} i={i} j={j}: decode error {errors['decode']:.2e} "
                            f"> 2 x SDPA's {sdpa_error:.2e}")
        others = {p: t for p, t in times.items() if p != "decode"}
        best = min(others, key=others.get)
        print(f"b={b:2d} h_kv={h_kv:2d} i={i} j={j:6d} decode {times['decode'] * 1e3:8.1f} us "
              f"{kv_bytes / (times['decode'] * 1e-3) / copy:5.0%} of copy | best other {best} "
              f"{others[best] * 1e3:8.1f} us | speed-up {others[best] / times['decode']:5.2f} | "
              f"err {errors['decode']:.1e} (sdpa {sdpa_error:.1e})", flush=True)
        write()
    write(complete=True)
    print(f"{len(rows)} rows, {len(failures)} accuracy failures, {time.perf_counter() - start:.0f} s")
    for failure in failures:
        print("ACCURACY:", failure)


if __name__ == "__main__":
    main()
