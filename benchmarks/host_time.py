"""Host time of one eager call of the package against the direct PyTorch call it replaces, with the GPU busy.

Three calls, each against direct SDPA on the same inputs (bf16):

- ``triton_attention`` forward, no gradient: (b, h, n, d) = (1, 16, 4096, 128), not causal;
- ``decode_attention``, one query per sequence against a cache of 32k slots with
  ``cache_lens``: b = 8, 32 query heads, 8 K/V heads, d = 128; the direct call
  is SDPA with a key-padding mask (what a user would write for ragged lengths);
- ``FlashAttention()`` with a key-padding mask (b, 1, 1, n): (4, 16, 4096, 128).

The host time of a call is what ``time.perf_counter`` sees around it while
large matrix products queued ahead keep the GPU busy: a call that launches
its kernels and returns costs its launch work; a call that waits for the GPU
costs the rest of the queue. Each round queues the products, then times
``calls`` calls of every provider, interleaved (a, b, a, b, ...), and checks
afterwards that the queue was still running when the last call returned
(``waited``: False). The result per provider is the median over every call
of every round, with the interquartile range; the ratio is package / direct.

    python benchmarks/host_time.py --out host-time.json [--profile]

``--profile`` adds, for each provider, where the host time goes: the
functions with the largest own time under ``cProfile``, and the PyTorch ops
and CUDA runtime calls of one call with their host time (``torch.profiler``,
CPU side), with the number of kernel launches per call. Both profile only a
few calls (``--profile-calls``) behind the queue: a few hundred launches
fill CUDA's launch queue, after which every launch waits for a free slot and
the profile shows that wait instead of the launch work.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runinfo import run_info  # noqa: E402

from flashattn import FlashAttention, decode_attention, padding_mask, triton_attention  # noqa: E402

DEVICE = "cuda"
BF16 = torch.bfloat16


def cases() -> dict[str, dict[str, Callable[[], object]]]:
    """For each call: the package's provider and the direct one, with their inputs bound."""
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=BF16, generator=g)

    q, k, v = randn(1, 16, 4096, 128), randn(1, 16, 4096, 128), randn(1, 16, 4096, 128)
    dq, dk, dv = randn(8, 32, 1, 128), randn(8, 8, 32768, 128), randn(8, 8, 32768, 128)
    lens = torch.randint(1024, 32769, (8,), device=DEVICE, generator=g)
    dkeep = padding_mask(lens, 32768)  # (8, 1, 1, 32768)
    mq, mk, mv = randn(4, 16, 4096, 128), randn(4, 16, 4096, 128), randn(4, 16, 4096, 128)
    mkeep = padding_mask(torch.randint(2048, 4097, (4,), device=DEVICE, generator=g), 4096)
    module = FlashAttention()
    return {
        "triton_attention forward": {
            "package": lambda: triton_attention(q, k, v),
            "direct": lambda: F.scaled_dot_product_attention(q, k, v),
        },
        "decode_attention step": {
            "package": lambda: decode_attention(dq, dk, dv, lens),
            "direct": lambda: F.scaled_dot_product_attention(dq, dk, dv, attn_mask=dkeep, enable_gqa=True),
        },
        "FlashAttention key padding": {
            "package": lambda: module(mq, mk, mv, mask=mkeep),
            "direct": lambda: F.scaled_dot_product_attention(mq, mk, mv, attn_mask=mkeep),
        },
    }


def busy_queue(ms: float) -> Callable[[], None]:
    """A function that queues about ``ms`` of GPU work (bf16 8192^3 products) and returns at once."""
    a = torch.randn(8192, 8192, device=DEVICE, dtype=BF16)
    c = torch.empty_like(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.mm(a, a, out=c)
    start.record()
    for _ in range(10):
        torch.mm(a, a, out=c)
    end.record()
    torch.cuda.synchronize()
    count = max(1, round(ms / (start.elapsed_time(end) / 10)))

    def queue() -> None:
        for _ in range(count):
            torch.mm(a, a, out=c)

    return queue


def host_times(providers: dict[str, Callable[[], object]], rounds: int, calls: int, queue: Callable[[], None]) -> dict:
    """Median and quartiles of the host time of each provider, interleaved, behind ``queue``; and whether any waited."""
    times: dict[str, list[float]] = {name: [] for name in providers}
    waited = False
    for _ in range(rounds):
        torch.cuda.synchronize()
        queue()
        marker = torch.cuda.Event()
        marker.record()  # completes when the queue (and nothing after it) is done
        for _ in range(calls):
            for name, fn in providers.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        waited |= marker.query()  # the queue finished before the calls did: some call may have waited
    torch.cuda.synchronize()
    out: dict = {"waited": waited}
    for name, ts in times.items():
        q1, med, q3 = statistics.quantiles([t * 1e6 for t in ts], n=4)
        out[name] = {"median_us": med, "q1_us": q1, "q3_us": q3, "n": len(ts)}
    out["ratio"] = out["package"]["median_us"] / out["direct"]["median_us"]
    # the ratio's spread: worst and best pairing of the quartiles
    out["ratio_range"] = [out["package"]["q1_us"] / out["direct"]["q3_us"], out["package"]["q3_us"] / out["direct"]["q1_us"]]
    return out


# the CUDA runtime and driver calls that launch a kernel (PyTorch's ops, Triton's launcher, cuDNN)
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def trace(fn: Callable[[], object], calls: int, queue: Callable[[], None], activities=None, top: int = 25) -> dict:
    """Per call of ``fn`` behind ``queue``: host time of each PyTorch op and runtime call, and kernel launches.

    ``activities`` defaults to the CPU and CUDA (the CUDA runtime calls
    are recorded on the CPU side); the ``top`` entries by own host time are
    kept, in microseconds per call of ``fn``.
    """
    from torch.profiler import ProfilerActivity, profile as torch_profile

    if activities is None:
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    queue()
    with torch_profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    averages = prof.key_averages()
    events = sorted((e for e in averages if e.self_cpu_time_total > 0 or e.key in LAUNCH_CALLS),
                    key=lambda e: e.self_cpu_time_total, reverse=True)
    ops = [dict(name=e.key, per_call=e.count / calls, self_us=e.self_cpu_time_total / calls,
                total_us=e.cpu_time_total / calls) for e in events[:top]]
    launches = sum(e.count for e in averages if e.key in LAUNCH_CALLS) / calls
    return dict(calls=calls, launches_per_call=launches, ops=ops)


def profile(fn: Callable[[], object], calls: int, queue: Callable[[], None], top: int = 25) -> str:
    """The ``top`` functions by own time over ``calls`` calls of ``fn`` behind a busy GPU."""
    torch.cuda.synchronize()
    queue()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def waits_for_gpu(fn: Callable[[], object], queue: Callable[[], None]) -> bool:
    """Whether one call of ``fn`` returned only after the GPU work queued before it had finished."""
    torch.cuda.synchronize()
    queue()
    marker = torch.cuda.Event()
    marker.record()
    fn()
    return marker.query()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=10, help="calls of each provider per round")
    parser.add_argument("--queue-ms", type=float, default=200.0, help="GPU work queued ahead of each round")
    parser.add_argument("--profile", action="store_true", help="where each provider's host time goes")
    parser.add_argument("--profile-calls", type=int, default=20, help="calls profiled behind one queue")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("host_time.py measures eager calls on a GPU; no CUDA device is available here")

    queue = busy_queue(args.queue_ms)
    result = run_info(rounds=args.rounds, calls=args.calls, queue_ms=args.queue_ms)
    result["method"] = ("time.perf_counter around each eager call, GPU kept busy by queued bf16 matmuls; providers "
                        "interleaved; median and quartiles over rounds x calls")
    result["cases"] = {}
    for name, providers in cases().items():
        for fn in providers.values():  # warm up: compiled, chosen, memory cached
            for _ in range(5):
                fn()
        torch.cuda.synchronize()
        row = host_times(providers, args.rounds, args.calls, queue)
        row["package_waits_for_gpu"] = waits_for_gpu(providers["package"], queue)
        row["direct_waits_for_gpu"] = waits_for_gpu(providers["direct"], queue)
        if args.profile:
            row["profile"] = profile(providers["package"], args.profile_calls, queue)
            row["trace"] = {who: trace(fn, args.profile_calls, queue) for who, fn in providers.items()}
        result["cases"][name] = row
        print(f"{name:28s} package {row['package']['median_us']:7.1f} us "
              f"[{row['package']['q1_us']:.1f}-{row['package']['q3_us']:.1f}]  direct {row['direct']['median_us']:7.1f} us "
              f"[{row['direct']['q1_us']:.1f}-{row['direct']['q3_us']:.1f}]  ratio {row['ratio']:.2f} "
              f"({row['ratio_range'][0]:.2f}-{row['ratio_range'][1]:.2f})  waits: package {row['package_waits_for_gpu']}, "
              f"direct {row['direct_waits_for_gpu']}; queue outlived the calls: {not row['waited']}", flush=True)
        if args.profile:
            print(row["profile"], flush=True)
            for who, found in row["trace"].items():
                print(f"  {who}: {found['launches_per_call']:.1f} launches per call", flush=True)
                for op in found["ops"]:
                    print(f"    {op['self_us']:8.1f} us own {op['total_us']:8.1f} us with callees "
                          f"{op['per_call']:5.1f}x  {op['name']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
