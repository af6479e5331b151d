"""Times triton_attention against PyTorch's FlashAttention-2 and cuDNN kernels and compiled FlexAttention.

The grid of the GPU runner's anchors: bf16, 16k tokens per batch
(b = 16384 // n), model width 2048 (h = 2048 // d), d = 64 and 128, causal
and not, n from 1k to 16k; forward, and forward plus backward. Providers:
``triton`` (this package), ``sdpa_flash`` and ``sdpa_cudnn`` (PyTorch's
``scaled_dot_product_attention`` held to one backend) and ``flex``
(``torch.compile(flex_attention)``, with a causal block mask when causal).

It first checks every provider on fresh random data at n = 1k against a
float32 reference (``triton`` must stay within twice the error of
``sdpa_flash``), then times each with ``triton.testing.do_bench`` (median),
prints TFLOP/s and the ratios to ``sdpa_flash`` and ``flex``, and writes
JSON. FLOPs: ``4 b h n^2 d`` for the forward, half when causal, 3.5 times
that for forward plus backward (the anchors' convention).

Compiling FlexAttention for every shape, and the Triton kernels, takes
minutes; ``--jobs N`` does it first in N processes, into the on-disk caches
that the timing then reads.

    python benchmarks/bench_triton.py --jobs 12 --out benchmarks/results/triton-h200.json
"""

from __future__ import annotations

import os

# FlexAttention is compiled in worker processes first; compiling in-process keeps their number
# bounded, and the same setting in every process keeps the cache keys alike.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from flashattn import triton_attention  # noqa: E402
from flashattn.triton_attention import _TABLE, KernelConfigs, TileConfig, table_key  # noqa: E402

TOKENS, WIDTH = 16384, 2048
PROVIDERS = ("triton", "sdpa_flash", "sdpa_cudnn", "flex")
MODES = ("fwd", "fwd_bwd")
BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}

# one compile per shape, as a model of fixed sizes would get; the grid has more shapes than the default limit
for _limit in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, _limit):
        setattr(torch._dynamo.config, _limit, 256)
FLEX = torch.compile(flex_attention, dynamic=False)


def use_table(path: str | None) -> None:
    """Replace this GPU's rows of the kernels' table by the proposal of a tune_triton.py run."""
    if path is None:
        return
    with open(path) as f:
        proposal = json.load(f)["proposal"]
    arch = "sm90" if torch.cuda.get_device_capability()[0] >= 9 else "sm80"
    for key, row in proposal.items():
        d, length = key.split("/")
        _TABLE[(arch, int(d), length)] = KernelConfigs(*(TileConfig(*row[k]) for k in ("fwd", "dkdv", "dq")))


def causal_block_mask(n: int):
    return create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, n, n, device="cuda")


def attention(provider: str, causal: bool, n: int) -> Callable[..., torch.Tensor]:
    """``fn(q, k, v) -> o`` for one provider; square problems only (i = j = n)."""
    if provider == "triton":
        return lambda q, k, v: triton_attention(q, k, v, causal=causal)
    if provider in BACKENDS:
        def sdpa(q, k, v):
            with sdpa_kernel([BACKENDS[provider]]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return sdpa
    block_mask = causal_block_mask(n) if causal else None
    return lambda q, k, v: FLEX(q, k, v, block_mask=block_mask)


def inputs(n: int, d: int, grad: bool, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Fresh bf16 q, k, v (b = TOKENS // n, h = WIDTH // d) and an output gradient."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (TOKENS // n, WIDTH // d, n, d)
    q, k, v, do = (torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    return q.requires_grad_(grad), k.requires_grad_(grad), v.requires_grad_(grad), do


def step(fn: Callable, q, k, v, do, mode: str) -> Callable[[], None]:
    if mode == "fwd":
        return lambda: fn(q, k, v)

    def fwd_bwd():
        fn(q, k, v).backward(do)
    return fwd_bwd


def warm_task(task: tuple) -> tuple[tuple, str | None]:
    """Run one provider once at one shape in a worker process, leaving its compiled code in the caches."""
    provider, d, causal, n, mode, table = task
    try:
        use_table(table)
        q, k, v, do = inputs(n, d, grad=mode == "fwd_bwd")
        step(attention(provider, causal, n), q, k, v, do, mode)()
        torch.cuda.synchronize()
        return task, None
    except Exception as error:  # reported by the main process, which then compiles in place
        return task, f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"


def errors_vs_float32(provider: str, d: int, causal: bool, n: int) -> dict[str, float]:
    """max |x - ref| / max |ref| of o, dq, dk, dv against PyTorch's math kernel in float32."""
    q, k, v, do = inputs(n, d, grad=True, seed=1)
    o = attention(provider, causal, n)(q, k, v)
    o.backward(do)
    got = (o, q.grad, k.grad, v.grad)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    with sdpa_kernel([SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(q32, k32, v32, is_causal=causal)
    ref.backward(do.float())
    refs = (ref, q32.grad, k32.grad, v32.grad)
    return {name: ((x.float() - r).abs().max() / r.abs().max()).item()
            for name, x, r in zip(("o", "dq", "dk", "dv"), got, refs)}


def tflops(n: int, d: int, causal: bool, mode: str, ms: float) -> float:
    flops = 4 * TOKENS * n * WIDTH * (0.5 if causal else 1.0) * (3.5 if mode == "fwd_bwd" else 1.0)
    return flops / ms / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="where to write the JSON results")
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--d", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--table", help="a tune_triton.py JSON whose proposal replaces this GPU's table rows")
    parser.add_argument("--jobs", type=int, default=0, help="processes that compile everything first")
    parser.add_argument("--warm-only", action="store_true", help="compile (with --jobs) and stop")
    parser.add_argument("--rep", type=int, default=100, help="milliseconds of timing per measurement")
    args = parser.parse_args()
    use_table(args.table)
    grid = [(d, causal, n) for d in args.d for causal in (False, True) for n in args.n]

    if args.jobs:
        # FlexAttention compiles per shape; the Triton kernels once per head dimension and mask
        tasks = [("flex", d, causal, n, mode, args.table) for d, causal, n in grid for mode in MODES
                 if "flex" in args.providers]
        # (at the shortest and the longest length: the table has rows for short and for long sequences)
        tasks += [("triton", d, causal, n, "fwd_bwd", args.table) for d in args.d for causal in (False, True)
                  for n in sorted({args.n[0], args.n[-1]}) if "triton" in args.providers]
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for task, error in pool.map(warm_task, sorted(tasks, key=lambda t: -t[3])):
                if error:
                    print("warm-up failed:", task[:5], error, flush=True)
    if args.warm_only:
        return

    checks = []
    # the shortest length, and one that takes the table's rows for long sequences (within memory
    # for the float32 reference)
    for n, d, causal in itertools.product(sorted({args.n[0], min(max(args.n), 4096)}), args.d, (False, True)):
        errs = {p: errors_vs_float32(p, d, causal, n) for p in args.providers}
        checks.append(dict(d=d, causal=causal, n=n, errors=errs))
        print(f"check d={d} causal={causal} n={n}: " + "; ".join(
            f"{p} " + " ".join(f"{k} {e:.2e}" for k, e in errs[p].items()) for p in errs), flush=True)
        if "triton" in errs and "sdpa_flash" in errs:
            checks[-1]["triton_within_twice_sdpa_flash"] = all(
                e <= 2 * errs["sdpa_flash"][name] for name, e in errs["triton"].items())

    rows = []
    start = time.perf_counter()
    for d, causal, n in grid:
        for mode in MODES:
            q, k, v, do = inputs(n, d, grad=mode == "fwd_bwd", seed=2)
            for provider in args.providers:
                fn = step(attention(provider, causal, n), q, k, v, do, mode)
                fn()  # compiles, or reads the caches the workers filled
                ms = do_bench(fn, rep=args.rep, return_mode="median")
                rows.append(dict(provider=provider, mode=mode, causal=causal, d=d, n=n, b=TOKENS // n,
                                 h=WIDTH // d, ms=round(ms, 4), tflops=round(tflops(n, d, causal, mode, ms), 1)))
            point = rows[-len(args.providers):]
            ms = {r["provider"]: r["ms"] for r in point}
            # same FLOPs for every provider: the ratio of speeds is the inverse ratio of times
            ratios = " ".join(f"/{p} {ms[p] / ms['triton']:.2f}" for p in ms if p != "triton" and "triton" in ms)
            print(f"{mode:7s} d={d:3d} causal={causal!s:5s} n={n:5d}  "
                  + "  ".join(f"{r['provider']} {r['tflops']:6.1f}" for r in point)
                  + f"  triton{ratios}  ({time.perf_counter() - start:.0f} s)", flush=True)
            del q, k, v, do
            torch.cuda.empty_cache()

    keys = sorted({table_key(torch.device("cuda"), d, n, n) for d, _, n in grid})
    table = {"/".join(map(str, key)): {kernel: list(vars(getattr(_TABLE[key], kernel)).values())
                                       for kernel in ("fwd", "dkdv", "dq")} for key in keys}
    result = dict(
        device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version(), python=platform.python_version(),
        date=datetime.date.today().isoformat(), dtype="bfloat16", tokens=TOKENS, width=WIDTH,
        flops="fwd 4*b*h*n*n*d (half if causal); fwd_bwd 3.5x fwd",
        timing="triton.testing.do_bench, median",
        triton_table=table, checks=checks, rows=rows,
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    failed = [c for c in checks if not c.get("triton_within_twice_sdpa_flash", True)]
    if failed:
        raise SystemExit(f"triton's error exceeds twice sdpa_flash's in {failed}")


if __name__ == "__main__":
    main()
