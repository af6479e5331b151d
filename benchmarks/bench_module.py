"""Times FlashAttention's flash path against the best direct call of SDPA, on a GPU.

For each problem (no mask, square causal, key padding, ALiBi bias,
grouped-query attention, causal GQA, decoding with a KV cache; bf16; d = 64
and 128) it measures the error of every provider in units of the output's
last place against a float64 reference (``accuracy.py``: o, and dq, dk, dv
when the problem has a backward), then reports, forward and forward +
backward: TFLOP/s of the module's flash path (``module``), of
``F.scaled_dot_product_attention`` called directly with the best inputs for
the same problem (``direct``: SDPA's own choice of kernel, ``sdpa_default``,
cuDNN's on the H200) and of the einsum path; the ratio module / direct, timed
eagerly and replayed as a CUDA graph (GPU time without the host's launch
time, which is what bounds the small decoding steps in eager mode); peak
memory; and the attention kernels that ran, read off ``torch.profiler``.

With a mask the module always zeroes the rows that have no key to attend, on
the GPU (a kernel that writes only those rows, and +inf into the log-sum-exp
that SDPA saved for its backward, so that the rows give no gradient); the key
padding problem measures that cost, in time and peak memory, against the
direct call with the same mask. The host time of one
masked call, and whether it waits for the GPU, is ``host_time.py``'s to measure.

    python benchmarks/bench_module.py --out flashattn/results/module-h200.json
    python benchmarks/bench_module.py --quick --out /tmp/module-quick.json   # smoke test
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from accuracy import P99_LIMIT, chunked_reference, format_report, over_limit, part, run_with_grads, ulp_report
from flashattn import FlashAttention, alibi_bias, padding_mask
from runinfo import attention_kernels, run_info
from timing import ROUNDS, compare

DEVICE = torch.device("cuda")
TOKENS, WIDTH = 16384, 2048  # per batch, as the anchors in the GPU runner's README
N = 4096  # length of the prefill problems
DECODE_B, DECODE_I, DECODE_J = 8, (1, 16, 128), (4096, 16384)
PROVIDERS = ("module", "direct", "einsum")
QUICK = dict(n=1024, d=(64,), decode_i=(1, 16), decode_j=(4096,), rounds=1)

AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class Problem:
    name: str
    d: int
    q: Tensor
    k: Tensor
    v: Tensor
    pairs: int  # (query, key) pairs attended, summed over batch and heads
    module: FlashAttention
    module_kwargs: dict = field(default_factory=dict)
    direct_kwargs: dict = field(default_factory=dict)
    backward: bool = True

    def fn(self, provider: str) -> AttentionFn:
        """``fn(q, k, v) -> o`` of one provider, with this problem's mask, bias and flags bound."""
        if provider == "module":
            return functools.partial(self.module, **self.module_kwargs)
        if provider == "direct":
            return functools.partial(F.scaled_dot_product_attention, **self.direct_kwargs)
        return functools.partial(self.module.einsum_attn, **self.module_kwargs)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, batch: slice, heads: slice) -> Tensor:
        """The einsum path in float64 on one part of the problem: the reference of ``accuracy.chunked_reference``."""
        kwargs = {key: part(t, batch, heads) for key, t in self.module_kwargs.items()}
        kwargs = {key: t.double() if t.is_floating_point() else t for key, t in kwargs.items()}
        return self.module.einsum_attn(q, k, v, **kwargs)


def problems(d: int, n: int, decode_i: tuple[int, ...], decode_j: tuple[int, ...]) -> list[Problem]:
    dtype = torch.bfloat16
    h = WIDTH // d

    def randn(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_()

    out = []
    b = TOKENS // n
    q, k, v = randn(b, h, n, d), randn(b, h, n, d), randn(b, h, n, d)
    out.append(Problem("no mask", d, q, k, v, b * h * n * n, FlashAttention()))
    out.append(Problem("causal", d, q, k, v, b * h * n * (n + 1) // 2, FlashAttention(causal=True),
                       direct_kwargs=dict(is_causal=True)))
    lengths = torch.randint(n // 2, n + 1, (b,), device=DEVICE)
    keep = padding_mask(lengths, n)  # (b, 1, 1, n)
    out.append(Problem("key padding", d, q, k, v, int(lengths.sum()) * h * n, FlashAttention(),
                       module_kwargs=dict(mask=keep), direct_kwargs=dict(attn_mask=keep)))
    bias = alibi_bias(h, n, n, DEVICE).to(dtype)  # (h, n, n), as a model would hold it
    out.append(Problem("alibi bias", d, q, k, v, b * h * n * n, FlashAttention(),
                       module_kwargs=dict(attn_bias=bias), direct_kwargs=dict(attn_mask=bias[None].contiguous())))
    h_kv = h // 4
    kg, vg = randn(b, h_kv, n, d), randn(b, h_kv, n, d)
    out.append(Problem("gqa", d, q, kg, vg, b * h * n * n, FlashAttention(), direct_kwargs=dict(enable_gqa=True)))
    out.append(Problem("gqa causal", d, q, kg, vg, b * h * n * (n + 1) // 2, FlashAttention(causal=True),
                       direct_kwargs=dict(enable_gqa=True, is_causal=True)))
    for j in decode_j:
        for i in decode_i:
            qd, kd, vd = randn(DECODE_B, h, i, d), randn(DECODE_B, h_kv, j, d), randn(DECODE_B, h_kv, j, d)
            best = dict(enable_gqa=True) if i == 1 else dict(enable_gqa=True, attn_mask=causal_lower_right(i, j))
            out.append(Problem(f"decode i={i} j={j}", d, qd, kd, vd, DECODE_B * h * (i * j - i * (i - 1) // 2),
                               FlashAttention(causal=True), direct_kwargs=best, backward=False))
    return out


def with_backward(fn: Callable[[], Tensor], grad: Tensor) -> Callable[[], None]:
    def step():
        fn().backward(grad)
    return step


def peak_mib(fn: Callable) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def ulp_errors(p: Problem, providers: list[str], grad: Tensor | None) -> dict[str, dict]:
    """Each provider's error in ulps (o, and dq, dk, dv with ``grad``) against the float64 einsum path."""
    ref = chunked_reference(p.reference, p.q, p.k, p.v, grad)
    out = {prov: ulp_report(run_with_grads(p.fn(prov), p.q, p.k, p.v, grad), ref) for prov in providers}
    del ref
    torch.cuda.empty_cache()
    return out


def ratio_range(values: list[float]) -> str:
    return f"{min(values):.3f} to {max(values):.3f}" if values else "-"


def summary(rows: list[dict]) -> list[str]:
    """The headline: module / direct (SDPA's own choice of kernel, sdpa_default) per mode, eager and graph."""
    direct_kernels = sorted({k for r in rows for k in r.get("direct_kernels", [])})
    lines = ["direct = F.scaled_dot_product_attention with SDPA's own choice of kernel (sdpa_default); "
             f"it ran: {', '.join(direct_kernels)}",
             "speed of the module's flash path relative to the direct call (direct time / module time):"] if rows else []
    for mode in ("fwd", "fwd_bwd"):
        for kind, pick in (("prefill", lambda r: not r["case"].startswith("decode")),
                           ("decode", lambda r: r["case"].startswith("decode"))):
            chosen = [r for r in rows if r["mode"] == mode and pick(r)]
            if chosen:
                graph = [r["graph_ratio_module_vs_direct"] for r in chosen if r.get("graph_ratio_module_vs_direct")]
                lines.append(f"  {mode:7s} {kind:7s} eager {ratio_range([r['ratio_module_vs_direct'] for r in chosen])}"
                             f", CUDA graph {ratio_range(graph)}  ({len(chosen)} rows)")
    for r in rows:
        if r["case"] == "key padding":
            graph = r.get("graph_ratio_module_vs_direct")
            graph = f"{graph:.3f}" if graph else f"failed ({r.get('module_graph_error') or r.get('direct_graph_error')})"
            lines.append(f"  key padding d={r['d']} {r['mode']:7s}: eager {r['ratio_module_vs_direct']:.3f}, "
                         f"CUDA graph {graph}")
    einsum = [r["module_ms"] / r["einsum_ms"] for r in rows if "einsum_ms" in r]
    if einsum:
        lines.append(f"einsum path: {100 * min(einsum):.1f}% to {100 * max(einsum):.1f}% of the flash path's speed")
    for prov in PROVIDERS:
        worst: dict[str, float] = {}
        for r in rows:
            for name, s in r.get(f"{prov}_ulp", {}).items():
                e = worst.get(name, 0.0)
                worst[name] = math.nan if math.isnan(s["p99"]) or math.isnan(e) else max(e, s["p99"])
        if worst:
            lines.append(f"largest p99 error of {prov} over the rows, in ulps: "
                         + " ".join(f"{name} {e:g}" for name, e in worst.items()))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: n = {QUICK['n']}, d = 64, decoding at j = 4096 with i = 1, 16, one round")
    parser.add_argument("--d", type=int, nargs="+", help="head dimensions (default: 64 128; with --quick 64)")
    parser.add_argument("--cases", nargs="+", metavar="NAME",
                        help="only the problems whose name contains one of these (e.g. 'key padding' decode)")
    parser.add_argument("--no-einsum", action="store_true", help="skip the einsum path (slow, large)")
    args = parser.parse_args()
    n = QUICK["n"] if args.quick else N
    dims = args.d or (QUICK["d"] if args.quick else (64, 128))
    decode_i = QUICK["decode_i"] if args.quick else DECODE_I
    decode_j = QUICK["decode_j"] if args.quick else DECODE_J
    rounds = QUICK["rounds"] if args.quick else ROUNDS
    providers = [p for p in PROVIDERS if not (args.no_einsum and p == "einsum")]
    torch.manual_seed(0)

    rows, failures = [], []
    meta = dict(
        **run_info(tokens_per_batch=TOKENS, width=WIDTH, n=n, d=list(dims), decode_b=DECODE_B,
                   decode_i=list(decode_i), decode_j=list(decode_j), quick=args.quick, cases=args.cases),
        dtype="bfloat16",
        flops="4*pairs*d forward, 3.5x for forward+backward; pairs = attended (query, key) pairs",
        timing=(f"benchmarks/timing.py: {rounds} round(s), providers interleaved, each sample do_bench's median; "
                "*_ms the median of the samples, *_ms_spread their range; graph: do_bench_cudagraph, likewise"),
        direct="F.scaled_dot_product_attention with SDPA's own choice of kernel (sdpa_default)",
        accuracy=("error in ulps of bf16 against the float64 einsum path rounded to bf16, per element at "
                  "max(|ref|, row RMS, tensor RMS / 16) (benchmarks/accuracy.py): max, p99, mean; "
                  f"flagged above a p99 of {P99_LIMIT}"),
    )

    def write(complete: bool = False) -> None:
        """The results so far (after every problem, so that a run cut short keeps what it measured)."""
        with open(args.out, "w") as f:
            json.dump(dict(**meta, complete=complete, rows=rows,
                           accuracy_failures=failures), f, indent=1)

    for d in dims:
        for p in problems(d, n, decode_i, decode_j):
            if args.cases and not any(c in p.name for c in args.cases):
                continue
            grad = torch.randn_like(p.fn("module")(p.q, p.k, p.v)) if p.backward else None
            errors = ulp_errors(p, providers, grad)
            for prov, report in errors.items():
                flagged = over_limit(report)
                if flagged and prov != "direct":
                    failures.append(f"{p.name} d={d} {prov}: p99 above {P99_LIMIT} ulp in {flagged}")
                print(f"{p.name:22s} d={d:3d} ulp max/p99/mean {prov:7s} {format_report(report)}"
                      + (f"   <-- above {P99_LIMIT}" if flagged else ""), flush=True)
            for mode in (["fwd", "fwd_bwd"] if p.backward else ["fwd"]):
                calls = {prov: functools.partial(p.fn(prov), p.q, p.k, p.v) for prov in providers}
                if mode == "fwd_bwd":
                    calls = {prov: with_backward(f, grad) for prov, f in calls.items()}
                flops = 4 * p.pairs * d * (3.5 if mode == "fwd_bwd" else 1.0)
                row = dict(case=p.name, d=d, mode=mode, b=p.q.shape[0], h=p.q.shape[1], h_kv=p.k.shape[1],
                           i=p.q.shape[2], j=p.k.shape[2], pairs=p.pairs)
                eager = compare(calls, rounds=rounds)
                # replayed as a CUDA graph: GPU time alone, without the host's time to launch, which bounds
                # the small decoding steps in eager mode
                graphed = compare({prov: fn for prov, fn in calls.items() if prov != "einsum"}, rounds=rounds,
                                  graph=True)
                for prov, fn in calls.items():
                    ms = eager[prov].median
                    record = eager[prov].record()
                    row[f"{prov}_ms"] = ms
                    row[f"{prov}_ms_spread"] = [record["ms_min"], record["ms_max"]]
                    row[f"{prov}_tflops"] = flops / ms / 1e9
                    row[f"{prov}_peak_mib"] = peak_mib(fn)
                    # forward: the output's error; forward + backward: the gradients' too
                    report = errors[prov]
                    row[f"{prov}_ulp"] = {"o": report["o"]} if mode == "fwd" else report
                    if prov != "einsum":
                        row[f"{prov}_kernels"] = attention_kernels(fn)
                        timing = graphed[prov]
                        if timing.method.startswith("eager"):  # the capture failed: no GPU-only time
                            row[f"{prov}_graph_ms"] = None
                            row[f"{prov}_graph_error"] = timing.method
                        else:
                            row[f"{prov}_graph_ms"] = timing.median
                            row[f"{prov}_graph_ms_spread"] = [timing.low, timing.high]
                row["ratio_module_vs_direct"] = row["direct_ms"] / row["module_ms"]
                if row["module_graph_ms"] and row["direct_graph_ms"]:
                    row["graph_ratio_module_vs_direct"] = row["direct_graph_ms"] / row["module_graph_ms"]
                rows.append(row)
                graph = row.get("graph_ratio_module_vs_direct")
                print(f"{p.name:22s} d={d:3d} {mode:7s} module {row['module_tflops']:7.1f} TFLOP/s  "
                      f"direct {row['direct_tflops']:7.1f}  ratio {row['ratio_module_vs_direct']:.3f}  "
                      f"graph ratio {f'{graph:.3f}' if graph else '-'}  "
                      f"peak MiB {row['module_peak_mib']:8.1f} / {row['direct_peak_mib']:8.1f}  "
                      f"kernels {row['module_kernels']} | direct {row['direct_kernels']}", flush=True)
            torch.cuda.empty_cache()
            write()

    write(complete=True)
    print("\n" + "\n".join(summary(rows)))
    if failures:
        raise SystemExit("accuracy above the limit:\n  " + "\n  ".join(failures))


if __name__ == "__main__":
    main()
