"""What each Hopper change buys: TMA loads, and variants of them, against pointer loads, kernel by kernel.

For every point of the grid (bf16, 16k tokens per batch, width 2048, d = 64
and 128, causal and not, n from 1k to 16k) it times, through the harness of
``timing.py`` (every launch of the point interleaved, several rounds, each
sample ``triton.testing.do_bench``'s median):

- ``pointers``: the kernels of ``flashattn/triton/kernels.py`` with pointer
  loads, at the launch table's configs: the forward, and the backward's
  three passes;
- ``tma``: the same kernels with ``TMA=True``, their tiles moved by TMA
  descriptors (``flashattn.triton.hopper``), each at several launches; and
  the variants of ``hopper_variants.py``, which no launch of the package
  uses: warp-specialised loops, and a forward that computes the next tile's
  scores before this tile's exponentials;
- ``fused``: the backward in one pass, dQ summed by atomic additions
  (``hopper_variants.attn_bwd_fused_kernel``), at several launches;
- ``cudnn``: SDPA's cuDNN kernel, forward and forward + backward, as the anchor.

Every candidate's output is compared with today's kernel's on the same
inputs before it is timed (relative error over the largest value); a
candidate that fails to compile or differs by more than 1e-2 is recorded and
not timed. Compiling the candidates takes minutes; ``--jobs N`` does it
first in N processes, into Triton's on-disk cache.

    python benchmarks/tune_hopper.py --jobs 14 --out flashattn/results/hopper-steps-h200.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import astuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import hopper_variants as variants
from flashattn.triton import attention as pointers
from flashattn.triton import hopper
from flashattn.triton.hopper import HopperLaunch
from flashattn.triton.launch import pick_configs
from hopper_variants import VariantLaunch
from runinfo import run_info
from timing import ROUNDS, compare

DEVICE = torch.device("cuda")
TOKENS, WIDTH = 16384, 2048
TOLERANCE = 1e-2  # relative difference from today's kernel: both round to bf16 (2^-8 relative) at the end


def _launches(*rows: tuple) -> list[VariantLaunch]:
    return [VariantLaunch(*row) for row in rows]


# (block_q, block_k, num_warps, num_stages, warp_specialize[, overlap]); for dK/dV and the fused pass,
# block_k is the tile a program owns and block_q the tile it streams
CANDIDATES: dict[str, list[VariantLaunch]] = {
    "fwd": _launches(
        (128, 64, 4, 3, False), (128, 64, 8, 3, False), (128, 128, 8, 2, False), (128, 128, 8, 3, False),
        (64, 64, 4, 3, False), (128, 64, 8, 4, False), (64, 128, 4, 3, False),
        # warp-specialised: with 4 warps triton 3.6's pass fails to compile (recorded as such)
        (128, 64, 4, 2, True), (128, 64, 8, 2, True), (128, 128, 8, 2, True), (128, 128, 8, 3, True),
        # the next tile's scores issued before this tile's exponentials
        (128, 64, 4, 3, False, True), (128, 64, 8, 3, False, True), (128, 64, 8, 2, False, True),
        (128, 128, 8, 2, False, True), (128, 128, 8, 3, False, True), (64, 64, 4, 3, False, True),
    ),
    "dkdv": _launches(
        (64, 128, 8, 2, False), (64, 128, 8, 3, False), (32, 128, 8, 3, False), (32, 64, 4, 3, False),
        (64, 64, 4, 3, False), (32, 64, 4, 4, False), (64, 128, 8, 2, True), (32, 128, 8, 2, True),
    ),
    "dq": _launches(
        (128, 64, 8, 3, False), (128, 64, 8, 2, False), (128, 128, 8, 2, False), (64, 64, 4, 3, False),
        (128, 64, 8, 4, False), (128, 32, 8, 3, False), (128, 64, 8, 2, True),
    ),
    "fused": _launches((64, 128, 8, 2, False), (64, 64, 4, 3, False), (64, 128, 8, 2, True)),
}


def inputs(b: int, h: int, n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return tuple(torch.randn((b, h, n, d), generator=g, device=DEVICE, dtype=torch.bfloat16) for _ in range(4))


def today(q, k, v, do, causal: bool, scale: float):
    """Today's kernels: o, lse, delta, and the gradients, at the launch table's configs."""
    cfg = pick_configs(DEVICE, q.dtype, q.shape[-1], q.shape[2], k.shape[2])
    o, lse = pointers.launch_forward(q, k, v, causal, scale, cfg.fwd)
    delta = pointers.launch_backward_preprocess(o, do)
    dk, dv = pointers.launch_backward_dkdv(q, k, v, do, lse, delta, causal, scale, cfg.dkdv)
    dq = pointers.launch_backward_dq(q, k, v, do, lse, delta, causal, scale, cfg.dq)
    return cfg, o, lse, delta, dq, dk, dv


def candidate(kernel: str, cfg: VariantLaunch, q, k, v, do, lse, delta, causal: bool, scale: float):
    """fn() running one candidate, whose results are (o,) or (dk, dv) or (dq,) or (dq, dk, dv).

    A plain TMA launch runs the package's kernels (``TMA=True``); the others run ``hopper_variants``.
    """
    plain = not (cfg.warp_specialize or cfg.overlap)
    path, launch = (hopper, HopperLaunch(cfg.block_q, cfg.block_k, cfg.num_warps, cfg.num_stages)) if plain \
        else (variants, cfg)
    if kernel == "fwd":
        return lambda: path.forward(q, k, v, causal, scale, launch)[:1]
    if kernel == "dkdv":
        return lambda: path.backward_dkdv(q, k, v, do, lse, delta, causal, scale, launch)
    if kernel == "dq":
        return lambda: (path.backward_dq(q, k, v, do, lse, delta, causal, scale, launch),)
    return lambda: variants.backward_fused(q, k, v, do, lse, delta, causal, scale, cfg)


def compile_task(task: tuple) -> tuple[tuple, str | None]:
    """Run one candidate once on a small problem with the grid's divisibility, leaving it in Triton's cache."""
    kernel, d, causal, row = task
    try:
        q, k, v, do = inputs(1, 16, 256, d)
        scale = d**-0.5
        if kernel == "today":  # the launch table's rows for short and for long sequences
            today(q, k, v, do, causal, scale)
            today(*inputs(1, 16, 4096, d), causal, scale)
        else:
            _, o, lse, delta, *_ = today(q, k, v, do, causal, scale)
            candidate(kernel, VariantLaunch(*row), q, k, v, do, lse, delta, causal, scale)()
        torch.cuda.synchronize()
        return task, None
    except Exception as error:  # noqa: BLE001 - recorded, and the candidate is skipped
        return task, f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"


def rel_diff(xs, refs) -> float:
    return max(((x.float() - r.float()).abs().max() / r.float().abs().max()).item() for x, r in zip(xs, refs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="where to write the JSON results")
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--d", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--jobs", type=int, default=0, help="processes that compile every candidate first")
    parser.add_argument("--rep", type=int, default=60, help="milliseconds of timing per sample")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="samples of every launch, interleaved")
    args = parser.parse_args()

    tasks = [("today", d, causal, None) for d in args.d for causal in (False, True)]
    tasks += [(kernel, d, causal, astuple(cfg)) for kernel, cfgs in CANDIDATES.items() for cfg in cfgs
              for d in args.d for causal in (False, True)]
    failed: dict[tuple, str] = {}
    start = time.perf_counter()
    if args.jobs:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for task, error in pool.map(compile_task, tasks):
                if error:
                    failed[task] = error
    print(f"compiled {len(tasks)} kernels in {time.perf_counter() - start:.0f} s; {len(failed)} failed", flush=True)
    for task, error in failed.items():
        print("  failed:", task, error, flush=True)

    rows = []
    for d in args.d:
        for causal in (False, True):
            for n in args.n:
                b, h = TOKENS // n, WIDTH // d
                q, k, v, do = inputs(b, h, n, d)
                scale = d**-0.5
                cfg, o, lse, delta, dq, dk, dv = today(q, k, v, do, causal, scale)
                refs = {"fwd": (o,), "dkdv": (dk, dv), "dq": (dq,), "fused": (dq, dk, dv)}
                point = dict(d=d, causal=causal, n=n, b=b, h=h)

                qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

                def cudnn_fwd():
                    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                        return F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)

                def cudnn_both():
                    qg.grad = kg.grad = vg.grad = None  # no accumulation into earlier gradients
                    cudnn_fwd().backward(do)

                # every launch of this point, timed against the others through the harness, interleaved
                calls = {
                    ("fwd", "cudnn", None): cudnn_fwd,
                    ("both", "cudnn", None): cudnn_both,
                    ("fwd", "pointers", astuple(cfg.fwd)): lambda: pointers.launch_forward(q, k, v, causal, scale, cfg.fwd),
                    ("preprocess", "pointers", None): lambda: pointers.launch_backward_preprocess(o, do),
                    ("dkdv", "pointers", astuple(cfg.dkdv)):
                        lambda: pointers.launch_backward_dkdv(q, k, v, do, lse, delta, causal, scale, cfg.dkdv),
                    ("dq", "pointers", astuple(cfg.dq)):
                        lambda: pointers.launch_backward_dq(q, k, v, do, lse, delta, causal, scale, cfg.dq),
                }
                candidate_rows = []
                for kernel, cfgs in CANDIDATES.items():
                    for launch in cfgs:
                        row = dict(point, kernel=kernel, path="fused" if kernel == "fused" else "tma",
                                   config=astuple(launch))
                        error = failed.get((kernel, d, causal, astuple(launch)))
                        if error is None:
                            fn = candidate(kernel, launch, q, k, v, do, lse, delta, causal, scale)
                            try:
                                row["diff"] = rel_diff(fn(), refs[kernel])
                                if row["diff"] <= TOLERANCE:
                                    calls[(kernel, row["path"], astuple(launch))] = fn
                                else:
                                    row["error"] = f"differs from today's kernel by {row['diff']:.3g}"
                            except Exception as exc:  # noqa: BLE001
                                row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
                        else:
                            row["error"] = error
                        candidate_rows.append(row)
                for fn in calls.values():
                    fn()  # compiled before any timing
                timings = compare(calls, rounds=args.rounds, rep_ms=args.rep)
                fwd, both = timings[("fwd", "cudnn", None)], timings[("both", "cudnn", None)]
                rows.append(dict(point, kernel="fwd", path="cudnn", **fwd.record()))
                # the backward alone: forward + backward less the forward, medians and the range they allow
                rows.append(dict(point, kernel="bwd", path="cudnn", ms=both.median - fwd.median,
                                 ms_min=both.low - fwd.high, ms_max=both.high - fwd.low))
                for (kernel, path, config), timing in timings.items():
                    if path == "pointers":
                        rows.append(dict(point, kernel=kernel, path=path, **({} if config is None else dict(config=config)),
                                         **timing.record()))
                for row in candidate_rows:
                    key = (row["kernel"], row["path"], row["config"])
                    if key in timings:
                        row.update(timings[key].record())
                    rows.append(row)
                report(rows, point)

    if args.out:
        result = run_info(dtype="bfloat16", tokens=TOKENS, width=WIDTH, n=args.n, d=args.d)
        result.update(timing=(f"benchmarks/timing.py: {args.rounds} rounds, every launch of a point interleaved, "
                              "each sample do_bench's median; ms the median, ms_min/ms_max the range"),
                      tolerance=TOLERANCE, rows=rows)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print("wrote", args.out)


def report(rows: list[dict], point: dict) -> None:
    """One line per point: today's and the best candidates' times, against cuDNN."""
    here = [r for r in rows if all(r[key] == point[key] for key in ("d", "causal", "n")) and "ms" in r]

    def best(kernel: str, path: str, ws: bool | None = None) -> float:
        times = [r["ms"] for r in here if r["kernel"] == kernel and r["path"] == path
                 and (ws is None or (r["config"][4] == ws and not r["config"][5]))]
        return min(times) if times else float("nan")

    def fastest(*times: float) -> float:
        return min((t for t in times if t == t), default=float("nan"))

    fwd = {"cudnn": best("fwd", "cudnn"), "today": best("fwd", "pointers"),
           "tma": best("fwd", "tma", False), "tma+ws": best("fwd", "tma", True)}
    fwd["overlap"] = min((r["ms"] for r in here if r["kernel"] == "fwd" and r["path"] == "tma" and r["config"][5]),
                         default=float("nan"))
    pre = best("preprocess", "pointers")
    bwd = {"cudnn": best("bwd", "cudnn"), "today": pre + best("dkdv", "pointers") + best("dq", "pointers"),
           "tma": pre + best("dkdv", "tma") + best("dq", "tma"), "fused": pre + best("fused", "fused")}
    print(f"d={point['d']} causal={point['causal']} n={point['n']}: fwd ms "
          + " ".join(f"{k} {v:.3f}" for k, v in fwd.items())
          + " | bwd ms " + " ".join(f"{k} {v:.3f}" for k, v in bwd.items())
          + f" | fwd vs cudnn today {fwd['cudnn'] / fwd['today']:.2f} best {fwd['cudnn'] / fastest(fwd['today'], fwd['tma'], fwd['tma+ws'], fwd['overlap']):.2f}"
          + f" | fwd+bwd vs cudnn today {(fwd['cudnn'] + bwd['cudnn']) / (fwd['today'] + bwd['today']):.2f}"
          + f" best {(fwd['cudnn'] + bwd['cudnn']) / (fastest(fwd['today'], fwd['tma'], fwd['tma+ws'], fwd['overlap']) + fastest(bwd['today'], bwd['tma'], bwd['fused'])):.2f}",
          flush=True)


if __name__ == "__main__":
    main()
