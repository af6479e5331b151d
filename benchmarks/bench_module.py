"""Times FlashAttention's flash path against the best direct call of SDPA, on a GPU.

For each problem (no mask, square causal, decoding with a KV cache, key
padding, ALiBi bias, grouped-query attention; bf16; d = 64 and 128) it
checks the module against a float32 reference, then reports TFLOP/s of the
module's flash path, of ``F.scaled_dot_product_attention`` called directly
with the best inputs for the same problem, and of the einsum path; the
ratio module / direct, timed eagerly and, for the forward, also replayed as
a CUDA graph (GPU time without the host's launch time, which is what bounds
the small decoding steps in eager mode); peak memory; and the attention
kernels that ran, read off ``torch.profiler``.

    python benchmarks/bench_module.py --out benchmarks/results/module-h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention.bias import causal_lower_right
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench, do_bench_cudagraph

from flashattn import FlashAttention, alibi_bias, padding_mask

TOKENS, WIDTH = 16384, 2048  # per batch, as the anchors in the GPU runner's README
ATTENTION_KERNEL_WORDS = ("fmha", "flash", "cudnn", "attention", "sdpa", "softmax")


@dataclass
class Problem:
    name: str
    d: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pairs: int  # (query, key) pairs attended, summed over batch and heads
    module: FlashAttention
    module_kwargs: dict = field(default_factory=dict)
    direct_kwargs: dict = field(default_factory=dict)
    backward: bool = True

    def module_call(self, flash: bool = True) -> torch.Tensor:
        if flash:
            return self.module(self.q, self.k, self.v, **self.module_kwargs)
        return self.module.einsum_attn(self.q, self.k, self.v, **self.module_kwargs)

    def direct_call(self) -> torch.Tensor:
        return F.scaled_dot_product_attention(self.q, self.k, self.v, **self.direct_kwargs)


def problems(d: int, device: torch.device) -> list[Problem]:
    dtype = torch.bfloat16
    h = WIDTH // d

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_()

    out = []
    n = 4096
    b = TOKENS // n
    q, k, v = randn(b, h, n, d), randn(b, h, n, d), randn(b, h, n, d)
    out.append(Problem("no mask", d, q, k, v, b * h * n * n, FlashAttention()))
    out.append(Problem("causal", d, q, k, v, b * h * n * (n + 1) // 2, FlashAttention(causal=True),
                       direct_kwargs=dict(is_causal=True)))
    lengths = torch.randint(n // 2, n + 1, (b,), device=device)
    keep = padding_mask(lengths, n)  # (b, 1, 1, n)
    out.append(Problem("key padding", d, q, k, v, int(lengths.sum()) * h * n, FlashAttention(),
                       module_kwargs=dict(mask=keep), direct_kwargs=dict(attn_mask=keep)))
    bias = alibi_bias(h, n, n, device).to(dtype)  # (h, n, n), as a model would hold it
    out.append(Problem("alibi bias", d, q, k, v, b * h * n * n, FlashAttention(),
                       module_kwargs=dict(attn_bias=bias), direct_kwargs=dict(attn_mask=bias[None].contiguous())))
    h_kv = h // 4
    kg, vg = randn(b, h_kv, n, d), randn(b, h_kv, n, d)
    out.append(Problem("gqa", d, q, kg, vg, b * h * n * n, FlashAttention(), direct_kwargs=dict(enable_gqa=True)))
    out.append(Problem("gqa causal", d, q, kg, vg, b * h * n * (n + 1) // 2, FlashAttention(causal=True),
                       direct_kwargs=dict(enable_gqa=True, is_causal=True)))
    for j in (4096, 16384):
        for i in (1, 16, 128):
            b = 8
            qd, kd, vd = randn(b, h, i, d), randn(b, h_kv, j, d), randn(b, h_kv, j, d)
            best = dict(enable_gqa=True) if i == 1 else dict(enable_gqa=True, attn_mask=causal_lower_right(i, j))
            out.append(Problem(f"decode i={i} j={j}", d, qd, kd, vd, b * h * (i * j - i * (i - 1) // 2),
                               FlashAttention(causal=True), direct_kwargs=best, backward=False))
    return out


def with_backward(fn: Callable[[], torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
    def step():
        fn().backward(grad)
    return step


def median_ms(fn: Callable, rounds: int = 3) -> float:
    return statistics.median(do_bench(fn, return_mode="median") for _ in range(rounds))


def kernels(fn: Callable) -> list[str]:
    """Names of the attention kernels (and softmax kernels, the sign of the math path) that ran."""
    with profile(activities=[ProfilerActivity.CUDA], acc_events=True) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type.name == "CUDA"}
    return sorted(n[:80] for n in names if any(w in n.lower() for w in ATTENTION_KERNEL_WORDS))


def peak_mib(fn: Callable) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def check(p: Problem) -> float:
    """Largest error of the module (bf16) against the einsum path in float32, over the output."""
    with torch.no_grad():
        got = p.module_call().float()
        ref_inputs = {n: getattr(p, n).float() for n in "qkv"}
        kwargs = {key: (t.float() if t.is_floating_point() else t) for key, t in p.module_kwargs.items()}
        ref = p.module.einsum_attn(ref_inputs["q"], ref_inputs["k"], ref_inputs["v"], **kwargs)
        return (got - ref).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--no-einsum", action="store_true", help="skip the einsum path (slow, large)")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    rows = []
    for d in (64, 128):
        for p in problems(d, device):
            err = check(p)
            # bf16 rounding of q, k, v and the output: a few units of 2^-8 on unit-scale outputs
            assert err < 3e-2, f"{p.name} d={d}: max |module - float32 reference| = {err:.3g}"
            modes = ["fwd", "fwd_bwd"] if p.backward else ["fwd"]
            for mode in modes:
                grad = torch.randn_like(p.module_call())
                calls = {
                    "module": lambda: p.module_call(),
                    "direct": p.direct_call,
                    "einsum": lambda: p.module_call(flash=False),
                }
                if args.no_einsum:
                    del calls["einsum"]
                if mode == "fwd_bwd":
                    calls = {k: with_backward(f, grad) for k, f in calls.items()}
                flops = 4 * p.pairs * d * (3.5 if mode == "fwd_bwd" else 1.0)
                row = dict(case=p.name, d=d, mode=mode, b=p.q.shape[0], h=p.q.shape[1], h_kv=p.k.shape[1],
                           i=p.q.shape[2], j=p.k.shape[2], max_abs_err_vs_fp32=err)
                for prov, fn in calls.items():
                    ms = median_ms(fn)
                    row[f"{prov}_ms"] = ms
                    row[f"{prov}_tflops"] = flops / ms / 1e9
                    row[f"{prov}_peak_mib"] = peak_mib(fn)
                    if prov != "einsum":
                        row[f"{prov}_kernels"] = kernels(fn)
                        if mode == "fwd":
                            # replayed as a CUDA graph: GPU time alone, without the host's
                            # time to launch, which bounds the small decoding steps in eager mode
                            row[f"{prov}_graph_ms"] = statistics.median(
                                do_bench_cudagraph(fn, return_mode="median") for _ in range(3))
                row["ratio_module_vs_direct"] = row["direct_ms"] / row["module_ms"]
                if mode == "fwd":
                    row["graph_ratio_module_vs_direct"] = row["direct_graph_ms"] / row["module_graph_ms"]
                rows.append(row)
                graph = f"graph ratio {row['graph_ratio_module_vs_direct']:.3f}" if mode == "fwd" else ""
                print(f"{p.name:22s} d={d:3d} {mode:7s} module {row['module_tflops']:7.1f} TFLOP/s  "
                      f"direct {row['direct_tflops']:7.1f}  ratio {row['ratio_module_vs_direct']:.3f} {graph}  "
                      f"peak MiB {row['module_peak_mib']:8.1f} / {row['direct_peak_mib']:8.1f}  "
                      f"kernels {row['module_kernels']} | direct {row['direct_kernels']}", flush=True)
            del p
            torch.cuda.empty_cache()
    result = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version(),
        python=platform.python_version(),
        date=datetime.date.today().isoformat(),
        dtype="bfloat16",
        tokens_per_batch=TOKENS,
        width=WIDTH,
        flops="4*pairs*d forward, 3.5x for forward+backward; pairs = attended (query, key) pairs",
        timing="triton.testing.do_bench median, median of 3 rounds; graph: do_bench_cudagraph, likewise",
        rows=rows,
    )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
