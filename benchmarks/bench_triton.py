"""Times triton_attention against PyTorch's SDPA kernels (its own choice, FlashAttention-2, cuDNN) and compiled FlexAttention.

The grid of the GPU runner's anchors: bf16, 16k tokens per batch
(b = 16384 // n), model width 2048 (h = 2048 // d), d = 64 and 128, causal
and not, n from 1k to 16k; forward, and forward plus backward. Providers:
``triton`` (this package), ``sdpa_default`` (PyTorch's
``scaled_dot_product_attention`` choosing its kernel itself: cuDNN's on the
H200), ``sdpa_flash`` and ``sdpa_cudnn`` (SDPA held to one backend) and
``flex`` (``torch.compile(flex_attention)``, with a causal block mask when
causal). On Hopper, ``triton`` takes the TMA kernels where the table of
``flashattn/triton/hopper.py`` has them, and ``triton_pointers`` is the same
call held to the pointer kernels of ``kernels.py``, the path of every other
GPU.

At every point it first measures each provider's error in units of the
output's last place, o, dq, dk and dv, against a float64 reference from the
same bf16 inputs (``accuracy.py``), then times them with the harness of
``timing.py`` (providers interleaved, several rounds, each sample
``triton.testing.do_bench``'s median), prints TFLOP/s and the ratios, and
writes JSON: every row holds a provider's median time, its spread and samples,
and its error. FLOPs:
``4 b h n^2 d`` for the forward, half when causal, 3.5 times that for
forward plus backward (the anchors' convention). It ends with the headline:
triton_attention against sdpa_default and against sdpa_flash.

Compiling FlexAttention for every shape, and the Triton kernels, takes
minutes; ``--jobs N`` does it first in N processes, into the on-disk caches
that the timing then reads.

    python benchmarks/bench_triton.py --jobs 12 --out flashattn/results/triton-h200.json
    python benchmarks/bench_triton.py --quick --out /tmp/triton-quick.json   # smoke test, without flex
"""

from __future__ import annotations

import os

# FlexAttention is compiled in worker processes first; compiling in-process keeps their number
# bounded, and the same setting in every process keeps the cache keys alike.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402

from accuracy import (  # noqa: E402
    P99_LIMIT,
    chunked_reference,
    format_report,
    over_limit,
    plain_attention,
    run_with_grads,
    ulp_report,
)
from flashattn import triton_attention  # noqa: E402
from flashattn.triton import fa3, hopper  # noqa: E402
from flashattn.triton.launch import KernelConfigs, TileConfig, launch_table, table_key, use_rows  # noqa: E402
from plot_triton import backend_name, headline, speed_ratios  # noqa: E402
from runinfo import attention_kernels, run_info  # noqa: E402
from timing import ROUNDS, compare  # noqa: E402

DEVICE = torch.device("cuda")
TOKENS, WIDTH = 16384, 2048
PROVIDERS = ("triton", "triton_pointers", "sdpa_default", "sdpa_flash", "sdpa_cudnn", "flex")
# named with --providers only: the Gluon forward (Hopper, bf16/fp16, d = 64 or 128) with the Triton backward,
# at each of its steps (flashattn.triton.fa3.STEPS): fa3_1wg_serial, fa3_2wg_serial, ..., fa3_2wg_pingpong
FA3_STEPS = {f"fa3_{warpgroups}wg_{schedule}": (warpgroups, schedule) for warpgroups, schedule in fa3.STEPS}
OPTIONAL_PROVIDERS = tuple(FA3_STEPS)
MODES = ("fwd", "fwd_bwd")
BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}
QUICK = dict(n=[1024], d=[64], rep=20)

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
    rows = {}
    for key, row in proposal.items():
        d, length = key.split("/")
        rows[(arch, int(d), length)] = KernelConfigs(*(TileConfig(*row[k]) for k in ("fwd", "dkdv", "dq")))
    use_rows(rows)


def causal_block_mask(n: int):
    return create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, n, n, device=DEVICE)


def attention(provider: str, causal: bool, n: int) -> Callable[..., torch.Tensor]:
    """``fn(q, k, v) -> o`` for one provider; square problems only (i = j = n)."""
    if provider == "triton":
        return lambda q, k, v: triton_attention(q, k, v, causal=causal)
    if provider == "triton_pointers":

        def pointers(q, k, v):
            with hopper.tma_kernels(False):
                return triton_attention(q, k, v, causal=causal)
        return pointers
    if provider in FA3_STEPS:
        warpgroups, schedule = FA3_STEPS[provider]
        return lambda q, k, v: fa3.fa3_attention(q, k, v, causal=causal, warpgroups=warpgroups, schedule=schedule)
    if provider == "sdpa_default":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if provider in BACKENDS:
        backend = BACKENDS[provider]

        def sdpa(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return sdpa
    block_mask = causal_block_mask(n) if causal else None
    return lambda q, k, v: FLEX(q, k, v, block_mask=block_mask)


def inputs(n: int, d: int, grad: bool, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Fresh bf16 q, k, v (b = TOKENS // n, h = WIDTH // d) and an output gradient."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    shape = (TOKENS // n, WIDTH // d, n, d)
    q, k, v, do = (torch.randn(shape, generator=g, device=DEVICE, dtype=torch.bfloat16) for _ in range(4))
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


def ulp_errors(providers: list[str], d: int, causal: bool, n: int) -> tuple[dict[str, dict], list[str]]:
    """Each provider's error in ulps (o, dq, dk, dv) against float64, on fresh inputs; and sdpa_default's kernels."""
    q, k, v, do = inputs(n, d, grad=True, seed=1)

    def fn64(q, k, v, batch, heads):
        return plain_attention(q, k, v, causal=causal)

    ref = chunked_reference(fn64, q, k, v, do)
    errors = {p: ulp_report(run_with_grads(attention(p, causal, n), q, k, v, do), ref) for p in providers}
    default_kernels = []
    if "sdpa_default" in providers:
        default_kernels = attention_kernels(step(attention("sdpa_default", causal, n), q, k, v, do, "fwd_bwd"))
    del q, k, v, do, ref
    torch.cuda.empty_cache()
    return errors, default_kernels


def tflops(n: int, d: int, causal: bool, mode: str, ms: float) -> float:
    flops = 4 * TOKENS * n * WIDTH * (0.5 if causal else 1.0) * (3.5 if mode == "fwd_bwd" else 1.0)
    return flops / ms / 1e9


def summary(rows: list[dict], providers: list[str]) -> list[str]:
    """The headline (against sdpa_default and sdpa_flash), then against every other provider, and the errors."""
    lines = headline(rows).splitlines()
    for baseline in providers:
        if baseline in ("triton", "sdpa_default", "sdpa_flash"):
            continue
        for mode in MODES:
            ratios = speed_ratios(rows, mode, baseline)
            if ratios:
                lines.append(f"triton_attention against {baseline}, {mode}: {min(ratios):.2f}-{max(ratios):.2f}x"
                             f" as fast, ahead at {sum(r > 1 for r in ratios)} of {len(ratios)} points")
    for provider in providers:
        p99 = {}
        for r in rows:
            if r["provider"] == provider:
                for name, s in r.get("ulp", {}).items():
                    p99[name] = max(p99.get(name, 0.0), s["p99"])
        lines.append(f"largest p99 error of {provider:12s} in ulps: " + " ".join(f"{k} {e:g}" for k, e in p99.items()))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="where to write the JSON results")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: n = 1024, d = 64, without flex unless --providers names it, rep 20 ms")
    parser.add_argument("--n", type=int, nargs="+", help="lengths (default: 1024 2048 4096 8192 16384)")
    parser.add_argument("--d", type=int, nargs="+", help="head dimensions (default: 64 128)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS + OPTIONAL_PROVIDERS,
                        help=f"default: all ({' '.join(PROVIDERS)}); with --quick all but flex; "
                             f"named only: {' '.join(OPTIONAL_PROVIDERS)} (Hopper)")
    parser.add_argument("--table", help="a tune_triton.py JSON whose proposal replaces this GPU's table rows")
    parser.add_argument("--jobs", type=int, default=0, help="processes that compile everything first")
    parser.add_argument("--warm-only", action="store_true", help="compile (with --jobs) and stop")
    parser.add_argument("--rep", type=int, help="milliseconds of timing per sample (default: 50)")
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help=f"samples of every provider, interleaved (benchmarks/timing.py; default {ROUNDS})")
    args = parser.parse_args()
    # --quick changes the defaults; what is given explicitly stays
    defaults = QUICK if args.quick else dict(n=[1024, 2048, 4096, 8192, 16384], d=[64, 128], rep=50)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    providers = args.providers or [p for p in PROVIDERS if not (args.quick and p == "flex")]
    use_table(args.table)
    grid = [(d, causal, n) for d in args.d for causal in (False, True) for n in args.n]

    if args.jobs:
        # FlexAttention compiles per shape; the Triton kernels once per head dimension and mask
        tasks = [("flex", d, causal, n, mode, args.table) for d, causal, n in grid for mode in MODES
                 if "flex" in providers]
        # (at the shortest and the longest length: the table has rows for short and for long sequences)
        tasks += [(p, d, causal, n, "fwd_bwd", args.table) for p in ("triton", "triton_pointers")
                  for d in args.d for causal in (False, True)
                  for n in sorted({args.n[0], args.n[1 if len(args.n) > 1 else 0], args.n[-1]}) if p in providers]
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for task, error in pool.map(warm_task, sorted(tasks, key=lambda t: -t[3])):
                if error:
                    print("warm-up failed:", task[:5], error, flush=True)
    if args.warm_only:
        return

    rows, failures, default_kernels = [], [], set()
    meta = dict(
        **run_info(tokens=TOKENS, width=WIDTH, n=args.n, d=args.d, b="tokens // n", h="width // d",
                   quick=args.quick, rep_ms=args.rep),
        dtype="bfloat16", providers=providers,
        flops="fwd 4*b*h*n*n*d (half if causal); fwd_bwd 3.5x fwd",
        timing=(f"benchmarks/timing.py: {args.rounds} rounds, providers interleaved, each sample do_bench's median "
                f"over {args.rep} ms; ms is the median of the samples, ms_min/ms_max/ms_q1/ms_q3 their spread"),
        accuracy=("error in ulps of bf16 against a float64 reference from the same bf16 inputs, rounded to bf16, "
                  "per element at max(|ref|, row RMS, tensor RMS / 16) (benchmarks/accuracy.py): max, p99, mean; "
                  f"o in fwd rows, o, dq, dk, dv in fwd_bwd rows (measured once per point, seed 1); "
                  f"triton flagged above a p99 of {P99_LIMIT}"),
    )
    keys = sorted({table_key(DEVICE, d, n, n) for d, _, n in grid})
    table = {"/".join(map(str, key)): {kernel: list(vars(getattr(launch_table()[key], kernel)).values())
                                       for kernel in ("fwd", "dkdv", "dq")} for key in keys}

    hopper_table = {f"{d}/{'causal' if causal else 'no mask'}/{length}": {
        kernel: None if launch is None else list(vars(launch).values())
        for kernel, launch in zip(("fwd", "dkdv", "dq"), launches)}
        for (d, causal, length), launches in hopper.hopper_table().items()}

    def write(complete: bool = False) -> None:
        """The results so far (after every point, so that a run cut short keeps what it measured)."""
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(**meta, sdpa_default_kernels=sorted(default_kernels),
                               sdpa_default_backend=backend_name(sorted(default_kernels)), triton_table=table,
                               hopper_table=hopper_table,
                               complete=complete, rows=rows, accuracy_failures=failures), f, indent=1)

    start = time.perf_counter()
    for d, causal, n in grid:
        errors, kernels = ulp_errors(providers, d, causal, n)
        default_kernels.update(kernels)
        for provider, report in errors.items():
            flagged = over_limit(report)
            if flagged and provider == "triton":
                failures.append(f"d={d} causal={causal} n={n}: triton's p99 above {P99_LIMIT} ulp in {flagged}")
            print(f"ulp max/p99/mean d={d:3d} causal={causal!s:5s} n={n:5d} {provider:12s} {format_report(report)}"
                  + (f"   <-- above {P99_LIMIT}" if flagged else ""), flush=True)
        for mode in MODES:
            q, k, v, do = inputs(n, d, grad=mode == "fwd_bwd", seed=2)
            fns = {provider: step(attention(provider, causal, n), q, k, v, do, mode) for provider in providers}
            for fn in fns.values():
                fn()  # compiles, or reads the caches the workers filled
            timings = compare(fns, rounds=args.rounds, rep_ms=args.rep)
            for provider, timing in timings.items():
                ms = timing.median
                report = errors[provider]
                rows.append(dict(provider=provider, mode=mode, causal=causal, d=d, n=n, b=TOKENS // n,
                                 h=WIDTH // d, **timing.record(), tflops=round(tflops(n, d, causal, mode, ms), 1),
                                 # forward: the output's error; forward + backward: the gradients' too
                                 ulp={"o": report["o"]} if mode == "fwd" else report))
                if provider == "sdpa_default":
                    rows[-1]["kernels"] = kernels
            point = rows[-len(providers):]
            ms = {r["provider"]: r["ms"] for r in point}
            # same FLOPs for every provider: the ratio of speeds is the inverse ratio of times
            ratios = " ".join(f"/{p} {ms[p] / ms['triton']:.2f}" for p in ms if p != "triton" and "triton" in ms)
            print(f"{mode:7s} d={d:3d} causal={causal!s:5s} n={n:5d}  "
                  + "  ".join(f"{r['provider']} {r['tflops']:6.1f}" for r in point)
                  + f"  triton{ratios}  ({time.perf_counter() - start:.0f} s)", flush=True)
            del q, k, v, do
            torch.cuda.empty_cache()
        write()

    write(complete=True)
    print("\n" + "\n".join(summary(rows, providers)))
    if failures:
        raise SystemExit("triton's error above the limit:\n  " + "\n  ".join(failures))


if __name__ == "__main__":
    main()
