"""Times each kernel of triton_attention over a small list of launch configurations, on a GPU.

For each head dimension, causal or not, and sequence length (bf16, 16k tokens
per batch, model width 2048, as in the benchmark), every candidate
(block_q, block_k, num_warps, num_stages) of the forward, dK/dV and dQ
kernels is checked against the current table's result and timed alone. It
prints the fastest per problem, and per head dimension and length (short up to
``SHORT`` tokens, long beyond) the candidate that is slowest relative to the
fastest by the least (geometric mean over problems): rows for ``_TABLE`` in
``flashattn/triton/launch.py``.

Compiling every candidate takes minutes; ``--compile-only --jobs N`` compiles
them in N processes first, into Triton's on-disk cache, which the timing run
then reads.

    python benchmarks/tune_triton.py --compile-only --jobs 12
    python benchmarks/tune_triton.py --out flashattn/results/tune-h200-1k-4k-16k.json
    python benchmarks/tune_triton.py --quick --out /tmp/tune-quick.json   # smoke test: d = 64, n = 1k, 2 candidates
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import torch

from flashattn.triton.attention import launch_backward_dkdv, launch_backward_dq, launch_backward_preprocess, launch_forward
from flashattn.triton.launch import SHORT, TileConfig, pick_configs
from timing import ROUNDS, compare
from runinfo import run_info

TOKENS, WIDTH = 16384, 2048
KERNELS = ("fwd", "dkdv", "dq")
QUICK = dict(d=[64], n=[1024], candidates=2, rep=10)

# (block_q, block_k, num_warps, num_stages). Chosen so that ptxas reports no (or little) register
# spilling and the shared memory fits Hopper's 227 KiB; the first of each list is a safe default.
CANDIDATES: dict[str, dict[int, list[tuple[int, int, int, int]]]] = {
    "fwd": {
        64: [(128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3), (128, 64, 8, 3),
             (64, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 4), (128, 64, 8, 4)],
        128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2),
              (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 8, 3), (128, 64, 8, 5)],
        256: [(64, 32, 4, 3), (64, 64, 8, 2)],
    },
    "dkdv": {
        64: [(64, 128, 8, 3), (32, 128, 8, 3), (32, 64, 4, 3), (64, 128, 8, 2),
             (32, 128, 8, 4), (16, 128, 8, 3), (32, 64, 4, 4), (16, 64, 4, 3)],
        128: [(32, 128, 8, 3), (32, 128, 8, 4), (16, 128, 8, 3), (64, 128, 8, 3),
              (64, 128, 8, 2), (32, 64, 4, 3), (16, 64, 4, 3), (32, 64, 8, 3)],
        256: [(16, 64, 8, 2), (32, 64, 8, 2)],
    },
    "dq": {
        64: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3),
             (64, 128, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4)],
        128: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2),
              (64, 32, 4, 3), (128, 64, 8, 4), (128, 32, 8, 4), (64, 64, 4, 4)],
        256: [(64, 32, 8, 2), (64, 64, 8, 2)],
    },
}


class Problem:
    """bf16 inputs of one problem, with the saved forward results and delta that the backward kernels read."""

    def __init__(self, b: int, h: int, n: int, d: int, causal: bool):
        self.d, self.n, self.causal = d, n, causal
        self.q, self.k, self.v, self.do = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
                                           for _ in range(4))
        self.scale = d**-0.5
        self.table = pick_configs(self.q.device, self.q.dtype, d, n, n)
        self.o, self.lse = launch_forward(self.q, self.k, self.v, causal, self.scale, self.table.fwd)
        self.delta = launch_backward_preprocess(self.o, self.do)

    def run(self, kernel: str, cfg: TileConfig) -> tuple[torch.Tensor, ...]:
        """The outputs of one kernel: (o, lse), (dk, dv) or (dq,)."""
        args = (self.q, self.k, self.v, self.do, self.lse, self.delta, self.causal, self.scale, cfg)
        if kernel == "fwd":
            return launch_forward(self.q, self.k, self.v, self.causal, self.scale, cfg)
        if kernel == "dkdv":
            return launch_backward_dkdv(*args)
        return (launch_backward_dq(*args),)


def candidates(kernel: str, d: int, limit: int | None = None) -> list[tuple[int, int, int, int]]:
    """The candidates of one kernel and head dimension, the first ``limit`` of them when given."""
    return CANDIDATES[kernel][d][:limit]


def tasks(dims: list[int], limit: int | None = None) -> list[tuple[str, int, bool, tuple[int, int, int, int]]]:
    return [(kernel, d, causal, cfg) for kernel in KERNELS for d in dims for causal in (False, True)
            for cfg in candidates(kernel, d, limit)]


def compile_task(task: tuple[str, int, bool, tuple[int, int, int, int]]) -> tuple[tuple, str | None]:
    """Compile (and run once) one candidate on a small problem that specializes the kernel alike."""
    kernel, d, causal, cfg = task
    try:
        # the timed problems' head count, and lengths divisible by 16 like theirs, give the same binary
        Problem(1, WIDTH // d, 256, d, causal).run(kernel, TileConfig(*cfg))
        torch.cuda.synchronize()
        return task, None
    except Exception as error:  # a candidate that does not compile is reported, not fatal
        return task, f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"


def rel_diff(xs: tuple[torch.Tensor, ...], refs: tuple[torch.Tensor, ...]) -> float:
    """The largest max |x - ref| / max |ref| over the outputs of a kernel."""
    return max(((x.float() - r.float()).abs().max() / r.float().abs().max()).item() for x, r in zip(xs, refs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="where to write the JSON results")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: d = 64, n = 1024, the first 2 candidates of each kernel, rep 10 ms")
    parser.add_argument("--candidates", type=int, help="only the first N candidates of each kernel")
    parser.add_argument("--d", type=int, nargs="+", help="head dimensions (default: 64 128 256)")
    parser.add_argument("--n", type=int, nargs="+", help="lengths (default: 1024 4096 16384; d = 256 at 4096 only)")
    parser.add_argument("--rep", type=int, help="milliseconds of timing per candidate (default: 40)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="samples of every candidate, interleaved")
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--jobs", type=int, default=8, help="processes for --compile-only")
    args = parser.parse_args()
    # --quick changes the defaults; what is given explicitly stays
    defaults = QUICK if args.quick else dict(d=[64, 128, 256], n=[1024, 4096, 16384], candidates=None, rep=40)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    limit = args.candidates

    if args.compile_only:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            for task, error in pool.map(compile_task, tasks(args.d, limit)):
                if error:
                    print("compile failed:", task, error, flush=True)
        return

    torch.manual_seed(0)
    rows = []
    for d in args.d:
        # d = 256 is tuned at one length: it is not in the benchmark's grid
        lengths = args.n if d <= 128 else [4096]
        for causal in (False, True):
            for n in lengths:
                p = Problem(TOKENS // n, WIDTH // d, n, d, causal)
                for kernel in KERNELS:
                    ref = p.run(kernel, getattr(p.table, kernel))
                    checked, runs = [], {}
                    for cfg in candidates(kernel, d, limit):
                        row = dict(kernel=kernel, d=d, causal=causal, n=n, config=list(cfg))
                        try:
                            run = functools.partial(p.run, kernel, TileConfig(*cfg))
                            diff = rel_diff(run(), ref)
                            # tiles change the order of sums only: a few bf16 roundoffs at most
                            row["rel_diff"] = round(diff, 5)
                            if diff > 2**-5:
                                row["error"] = "result differs from the table's"
                            else:
                                runs[tuple(cfg)] = run
                        except Exception as error:
                            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                        checked.append(row)
                    # the candidates that compute the right result, timed against each other, interleaved
                    timings = compare(runs, rounds=args.rounds, rep_ms=args.rep)
                    for row in checked:
                        if tuple(row["config"]) in timings:
                            row.update(timings[tuple(row["config"])].record())
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                del p
                torch.cuda.empty_cache()

    timed = {(r["kernel"], r["d"], r["causal"], r["n"], tuple(r["config"])): r["ms"] for r in rows if "ms" in r}
    best: dict[tuple, tuple[float, tuple]] = {}
    for (*problem, cfg), ms in timed.items():
        if tuple(problem) not in best or ms < best[tuple(problem)][0]:
            best[tuple(problem)] = (ms, cfg)
    print("\nfastest per problem (kernel, d, causal, n):")
    for problem, (ms, cfg) in sorted(best.items()):
        print(f"  {problem}: {cfg} {ms:.3f} ms")

    print(f"\nproposed table rows (least geometric-mean slowdown against the fastest, per head dimension and "
          f"length: short up to n = {SHORT}):")
    arch = "sm{}{}".format(*torch.cuda.get_device_capability())
    proposal = {}
    for d in args.d:
        for length in ("short", "long"):
            choice = {}
            for kernel in KERNELS:
                problems = [p for p in best if p[:2] == (kernel, d) and (p[3] <= SHORT) == (length == "short")]
                slowdown = {}
                for cfg in candidates(kernel, d, limit):
                    ratios = [timed.get((*problem, cfg), math.inf) / best[problem][0] for problem in problems]
                    if problems and all(map(math.isfinite, ratios)):
                        slowdown[cfg] = math.exp(sum(map(math.log, ratios)) / len(ratios))
                if slowdown:
                    ranked = sorted(slowdown, key=slowdown.get)
                    choice[kernel] = ranked[0]
                    print(f"  d={d} {length} {kernel}: " + ", ".join(f"{c} {slowdown[c]:.3f}" for c in ranked[:4]))
            if len(choice) == len(KERNELS):
                proposal[f"{d}/{length}"] = choice
                print(f'    ("{arch}", {d}, "{length}"): '
                      f'_configs(fwd={choice["fwd"]}, dkdv={choice["dkdv"]}, dq={choice["dq"]}),')

    if args.out:
        result = dict(
            **run_info(tokens=TOKENS, width=WIDTH, d=args.d, n=args.n, b="tokens // n", h="width // d",
                       candidates_per_kernel=limit, quick=args.quick, rep_ms=args.rep),
            dtype="bfloat16", rows=rows, proposal={key: {k: list(v) for k, v in c.items()} for key, c in proposal.items()},
        )
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
