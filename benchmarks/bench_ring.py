"""Times ring_attention on several GPUs against the same attention on one GPU and against PyTorch's context_parallel.

The problem: b = 1, h = 32, d = 128, bf16, causal, one sequence of 32k to
512k tokens (k = 1024), forward and forward + backward. Methods, all in one
run and timed the same way:

- ``one_gpu``: ``FlashAttention(causal=True)`` on the whole sequence on rank
  0 alone (SDPA, whose kernel is the ring's block kernel: the same choice,
  ``pick_block_kernel``), while the other ranks wait;
- ``ring_contiguous``, ``ring_zigzag``: ``flashattn.ring_attention`` on N
  GPUs, each holding a shard of the sequence in that layout;
- ``context_parallel``: ``F.scaled_dot_product_attention`` inside
  ``torch.distributed.tensor.experimental.context_parallel`` on the same N
  GPUs (a 1-D DeviceMesh of their group, the ring rotation ``alltoall``
  unless ``--cp-rotate allgather``); for causal attention it shards the
  sequence head-and-tail, which is the zigzag layout.

With ``--worlds 2,4`` one launch of 4 processes measures rings of 2 GPUs
(ranks 0 and 1, a sub-group; ranks 2 and 3 wait) and of 4, against one
baseline. Each call is timed with CUDA events between barriers of its group;
a call's time is the slowest rank's. At one length the methods are timed in
``--rounds`` rounds, one call of each per round, in an order that rotates
from round to round (``timing.rotation``, as every benchmark here does), so
that a drift of the machine falls on all of them alike; a method's inputs
(its shards, context_parallel's copies) are made before its call and freed
after it, so that no more memory is held than when the methods ran one
after another. ``--warmup`` calls precede the first round's. A call over 2 s
takes part in two rounds only, one over 5 s in one: such calls vary by far
less than the effects measured. A row keeps every sample, their median
(``ms``), quartiles and range. Scaling efficiency = one-GPU time / (N x time);
FLOPs are counted as ``4 b h n^2 d / 2`` for the causal forward and 3.5 times
that for forward + backward.

Before timing, at a small length (8k), the ring and context_parallel are
checked against float32 attention on the full sequence, forward and gradients,
for each layout and each block kernel the ring can use on this GPU (PyTorch's
default choice, FlashAttention-2 forced with ``sdpa_kernel``, and the Triton
fallback, forced by allowing SDPA only its memory-efficient kernel); the
one-GPU bf16 error is the yardstick (``ok``: within 3 times it).

Lengths that do not fit in memory are skipped, with the reason. Rank 0
rewrites the JSON after every length, so an interrupted run keeps what it
measured.

    torchrun --standalone --nproc-per-node 4 benchmarks/bench_ring.py --worlds 2,4 \
        --out flashattn/results/ring-h200.json
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_ring.py --smoke --out /tmp/ring-smoke.json   # CPU, gloo
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from flashattn import FlashAttention, ring_attention, shard_sequence
from flashattn.ring import pick_block_kernel
from runinfo import run_info
from timing import Timing, rotation

K = 1024
GIB = 2**30
LAYOUTS = ("contiguous", "zigzag")
MODES = ("fwd", "fwd_bwd")
LONG_CALL_MS, VERY_LONG_CALL_MS = 2000.0, 5000.0  # calls this long take 2 rounds, or 1: they vary by < 1 %
FULL = dict(b=1, h=32, d=128, lengths=[32 * K, 64 * K, 128 * K, 256 * K, 512 * K], check_len=8 * K)
SMOKE = dict(b=1, h=4, d=16, lengths=[64, 128], check_len=64)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the JSON file rank 0 writes")
    p.add_argument("--worlds", default=None, help="ring sizes to measure, e.g. 2,4 (default: every process)")
    p.add_argument("--lengths", default=None, help="sequence lengths, e.g. 32k,512k (default: 32k to 512k)")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--rounds", type=int, default=3, help="calls of each method, one per round, interleaved")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--cp-rotate", choices=["alltoall", "allgather"], default="alltoall")
    p.add_argument("--no-cp", action="store_true", help="leave out context_parallel")
    p.add_argument("--no-triton-check", action="store_true", help="leave the Triton block kernels out of the check")
    p.add_argument("--smoke", action="store_true", help="CPU, gloo, float32, tiny lengths: tests the script")
    return p.parse_args()


def parse_length(text: str) -> int:
    return int(text[:-1]) * K if text.lower().endswith("k") else int(text)


# ---------------------------------------------------------------------------------------------------------------------
# Processes, groups, timing


def setup(smoke: bool) -> tuple[int, int, torch.device]:
    """Join the process group that torchrun describes; returns (rank, world size, device)."""
    timeout = datetime.timedelta(minutes=20)  # ranks outside a measured ring wait for it at a barrier
    if smoke:
        dist.init_process_group("gloo", timeout=timeout)
        torch.set_num_threads(1)
        return dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)  # batch_isend_irecv over NCCL needs it
    dist.init_process_group("nccl", timeout=timeout, device_id=device)
    return dist.get_rank(), dist.get_world_size(), device


def make_groups(worlds: list[int], world: int) -> dict[int, dist.ProcessGroup]:
    """One group of the first N ranks for each N (every process takes part in creating each)."""
    return {n: dist.group.WORLD if n == world else dist.new_group(list(range(n))) for n in worlds}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], object], group: dist.ProcessGroup | None, device: torch.device) -> float:
    """Milliseconds of one call of ``fn``: the slowest member's. ``group`` None: this process alone.

    The call starts on every member together, after a barrier of ``group``.
    """
    synchronize(device)
    if group is not None:
        dist.barrier(group=group)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
    else:
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
    if group is not None:
        slowest = torch.tensor([ms], device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
        ms = slowest.item()
    return ms


def full_problem(n: int, cfg: dict, dtype: torch.dtype, device: torch.device, seed: int) -> list[Tensor]:
    """q, k, v, do over the whole sequence, (b, h, n, d), drawn alike in every process."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(cfg["b"], cfg["h"], n, cfg["d"], generator=gen, device=device, dtype=dtype) for _ in range(4)]


def shards(tensors: list[Tensor], rank: int, world: int, layout: str) -> list[Tensor]:
    return [shard_sequence(t, rank, world, layout=layout).contiguous() for t in tensors]


def attention_call(attend: Callable[..., Tensor], qkv: list[Tensor], do: Tensor, mode: str) -> Callable[[], None]:
    """A call of ``attend(q, k, v)``: under no_grad for ``fwd``; with the backward of ``do`` for ``fwd_bwd``."""
    if mode == "fwd":
        def call() -> None:
            with torch.no_grad():
                attend(*qkv)
        return call
    leaves = [t.detach().requires_grad_() for t in qkv]

    def call_bwd() -> None:
        for t in leaves:
            t.grad = None
        attend(*leaves).backward(do)
    return call_bwd


@contextlib.contextmanager
def cp_sharded(mesh, qkv: list[Tensor], rotate: str) -> Iterator[list[Tensor]]:
    """Copies of the full q, k, v, sharded by context_parallel in place, with SDPA replaced by its ring."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import set_rotate_method

    set_rotate_method(rotate)
    local = [t.clone() for t in qkv]
    with context_parallel(mesh, buffers=local, buffer_seq_dims=[2, 2, 2], no_restore_buffers=set(local)):
        yield local


def cp_sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # looked up at call time: replaced in the context


# ---------------------------------------------------------------------------------------------------------------------
# Correctness before timing


def rel_error(x: Tensor, ref: Tensor) -> float:
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def with_grads(attend: Callable[..., Tensor], qkv: list[Tensor], do: Tensor) -> list[Tensor]:
    """``[o, dq, dk, dv]`` of ``attend`` on copies of ``qkv``."""
    leaves = [t.detach().clone().requires_grad_() for t in qkv]
    o = attend(*leaves)
    o.backward(do)
    return [o.detach()] + [t.grad for t in leaves]


def check(cfg: dict, dtype: torch.dtype, device: torch.device, rank: int, groups: dict, meshes: dict,
          layouts: list[str], args: argparse.Namespace) -> list[dict]:
    """Ring (each layout, each block kernel) and context_parallel against float32 attention, at cfg['check_len']."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n = cfg["check_len"]
    full = full_problem(n, cfg, dtype, device, seed=1)
    ref_dtype = torch.float64 if device.type == "cpu" else torch.float32
    ref = with_grads(FlashAttention(causal=True), [t.to(ref_dtype) for t in full[:3]], full[3].to(ref_dtype))
    single = with_grads(FlashAttention(causal=True), full[:3], full[3])
    single_err = [rel_error(x, r) for x, r in zip(single, ref)]
    unit = torch.finfo(dtype).eps / 2
    variants = {"default": None}
    if device.type == "cuda":
        variants["flash"] = [SDPBackend.FLASH_ATTENTION]
        if not args.no_triton_check:
            variants["triton"] = [SDPBackend.EFFICIENT_ATTENTION]  # SDPA's kernel choice then leaves the fused ones out
    rows = []

    def record(method: str, world: int, group, layout: str, kernel: str, got: list[Tensor]) -> None:
        errs = torch.tensor([rel_error(x, shard_sequence(r, dist.get_rank(group), world, layout=layout))
                             for x, r in zip(got, ref)], device=device)
        dist.all_reduce(errs, op=dist.ReduceOp.MAX, group=group)
        errs = errs.tolist()
        ok = all(e <= 3 * max(s, unit) for e, s in zip(errs, single_err))
        rows.append(dict(method=method, gpus=world, layout=layout, kernel=kernel, n=n, ok=ok,
                         error=dict(zip(("o", "dq", "dk", "dv"), errs)),
                         one_gpu_error=dict(zip(("o", "dq", "dk", "dv"), single_err))))

    for world, group in groups.items():
        if rank < world:
            r = dist.get_rank(group)
            for layout in layouts:
                local = shards(full, r, world, layout)
                for name, backends in variants.items():
                    with sdpa_kernel(backends) if backends else contextlib.nullcontext():
                        kernel = pick_block_kernel(*local[:3], True, cfg["d"] ** -0.5)
                        got = with_grads(
                            lambda q, k, v: ring_attention(q, k, v, causal=True, group=group, layout=layout),
                            local[:3], local[3],
                        )
                    record(f"ring_{layout}", world, group, layout, f"{kernel} ({name})", got)
            if world in meshes:
                with cp_sharded(meshes[world], full[:3], args.cp_rotate) as local:
                    got = with_grads(cp_sdpa, local, shard_sequence(full[3], r, world, layout="zigzag").contiguous())
                record("context_parallel", world, group, "zigzag", "sdpa", got)
        dist.barrier()
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Timing


def fits(n: int, cfg: dict, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    """Whether every process has the memory for length ``n``, and the reason when not.

    Each process holds the full q, k, v, do (4 S, S = one (b, h, n, d)
    tensor), and at one time one of: rank 0 the baseline's o, dq, dk, dv
    (4 S); a ring of 2 its float32 sums and buffers (about 10 S);
    context_parallel's copies (3 S: its in-place sharding keeps their
    storage) and sums. With the kernels' workspace: 16 S and 2 GiB.
    """
    if device.type != "cuda":
        return True, ""
    torch.cuda.empty_cache()
    need = 16 * cfg["b"] * cfg["h"] * n * cfg["d"] * torch.finfo(dtype).bits // 8 + 2 * GIB
    free = torch.tensor([torch.cuda.mem_get_info(device)[0]], device=device)
    dist.all_reduce(free, op=dist.ReduceOp.MIN)
    if free.item() >= need:
        return True, ""
    return False, f"needs about {need / GIB:.0f} GiB per GPU, {free.item() / GIB:.0f} GiB free on the fullest"


@dataclass
class Method:
    """One timed method at one length: its name, GPUs and mode, and how its call is made.

    ``inputs()`` is a context that makes the method's inputs and yields
    ``(call, extra)``: the call to time, and what the row records beside its
    times. It is entered on the members only: rank 0 for ``one_gpu``, the
    first ``gpus`` ranks otherwise.
    """

    method: str
    gpus: int
    mode: str
    group: dist.ProcessGroup | None
    inputs: Callable[[], contextlib.AbstractContextManager]
    timing: Timing = field(default_factory=Timing)
    extra: dict = field(default_factory=dict)
    rounds: int = 0

    def takes_part(self, rank: int) -> bool:
        return rank < self.gpus


@contextlib.contextmanager
def one_gpu_inputs(full: list[Tensor], mode: str) -> Iterator[tuple[Callable[[], None], dict]]:
    yield attention_call(FlashAttention(causal=True), full[:3], full[3], mode), {}


@contextlib.contextmanager
def ring_inputs(full: list[Tensor], group: dist.ProcessGroup, world: int, layout: str, mode: str
                ) -> Iterator[tuple[Callable[[], None], dict]]:
    local = shards(full, dist.get_rank(group), world, layout)

    def ring(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return ring_attention(q, k, v, causal=True, group=group, layout=layout)

    yield attention_call(ring, local[:3], local[3], mode), dict(kernel=pick_block_kernel(*local[:3], True,
                                                                                          full[0].shape[-1] ** -0.5))


@contextlib.contextmanager
def cp_inputs(full: list[Tensor], mesh, group: dist.ProcessGroup, world: int, mode: str, rotate: str
              ) -> Iterator[tuple[Callable[[], None], dict]]:
    with cp_sharded(mesh, full[:3], rotate) as local:
        do = shard_sequence(full[3], dist.get_rank(group), world, layout="zigzag").contiguous()
        yield attention_call(cp_sdpa, local, do, mode), {}


def methods(full: list[Tensor], groups: dict, meshes: dict, layouts: list[str], args: argparse.Namespace
            ) -> list[Method]:
    """Every method timed at one length, in the same order on every process."""
    out = [Method("one_gpu", 1, mode, None, functools.partial(one_gpu_inputs, full, mode)) for mode in MODES]
    for world, group in groups.items():
        for layout in layouts:
            out += [Method(f"ring_{layout}", world, mode, group,
                           functools.partial(ring_inputs, full, group, world, layout, mode)) for mode in MODES]
        if world in meshes:
            out += [Method("context_parallel", world, mode, group,
                           functools.partial(cp_inputs, full, meshes[world], group, world, mode, args.cp_rotate))
                    for mode in MODES]
    return out


def time_length(n: int, cfg: dict, dtype: torch.dtype, device: torch.device, rank: int, groups: dict, meshes: dict,
                layouts: list[str], args: argparse.Namespace) -> list[dict]:
    """Every method at length ``n``, interleaved over ``args.rounds`` rounds: rows of {n, mode, method, gpus,
    ms and its spread, samples_ms} (rank 0's list is complete)."""
    full = full_problem(n, cfg, dtype, device, seed=n)
    timed = methods(full, groups, meshes, layouts, args)
    for m in timed:
        m.rounds = args.rounds
    for r in range(args.rounds):
        for m in rotation(timed, r):
            if m.takes_part(rank) and r < m.rounds:
                with m.inputs() as (call, extra):
                    if r == 0:
                        for _ in range(args.warmup):
                            call()
                    ms = timed_call(call, m.group, device)
                del call  # it holds the inputs and gradients: freed before the next method makes its own
                m.timing.samples_ms.append(ms)
                m.extra = extra
                if r == 0:  # the members agree on ms (the slowest's), so on the rounds too
                    m.rounds = min(m.rounds, 1 if ms > VERY_LONG_CALL_MS else 2 if ms > LONG_CALL_MS else m.rounds)
            dist.barrier()  # every process goes from method to method together
    rows = []
    for m in timed:
        if m.takes_part(rank):
            times = m.timing.record()
            del times["method"]  # how each sample was taken: the result's "timing" says it once
            rows.append(dict(n=n, mode=m.mode, method=m.method, gpus=m.gpus, **times, **m.extra))
    return rows


def causal_flops(n: int, cfg: dict, mode: str) -> float:
    forward = 4 * cfg["b"] * cfg["h"] * n * n * cfg["d"] / 2
    return forward * (3.5 if mode == "fwd_bwd" else 1.0)


def derive(rows: list[dict], cfg: dict) -> None:
    """Add TFLOP/s, scaling efficiency against one GPU, and the speed-up over context_parallel, to each row."""
    def find(n, mode, method, gpus):
        return next((r for r in rows if (r["n"], r["mode"], r["method"], r["gpus"]) == (n, mode, method, gpus)), None)

    for row in rows:
        row["tflops"] = causal_flops(row["n"], cfg, row["mode"]) / (row["ms"] * 1e-3) / 1e12
        base = find(row["n"], row["mode"], "one_gpu", 1)
        if base is not None and row["gpus"] > 1:
            row["efficiency"] = base["ms"] / (row["gpus"] * row["ms"])
        cp = find(row["n"], row["mode"], "context_parallel", row["gpus"])
        if cp is not None and row["method"].startswith("ring_"):
            row["speedup_vs_cp"] = cp["ms"] / row["ms"]


def summary(rows: list[dict], skipped: list[dict], world: int) -> dict:
    """The done-criteria: efficiency of the zigzag ring at ``world`` GPUs, fwd+bwd, at the longest length one GPU held;
    and the zigzag ring against context_parallel at every point."""
    out: dict = {}
    base_lengths = [r["n"] for r in rows if r["method"] == "one_gpu" and r["mode"] == "fwd_bwd"]
    if base_lengths:
        n = max(base_lengths)
        key = (n, "fwd_bwd", "ring_zigzag", world)
        row = next((r for r in rows if (r["n"], r["mode"], r["method"], r["gpus"]) == key), None)
        if row is not None:
            out["zigzag_fwd_bwd_efficiency"] = dict(gpus=world, n=n, efficiency=row["efficiency"], target=0.85,
                                                    met=row["efficiency"] >= 0.85)
    versus = [r for r in rows if r["method"] == "ring_zigzag" and "speedup_vs_cp" in r]
    if versus:
        out["zigzag_vs_context_parallel"] = dict(
            points=len(versus), slowest_ratio=min(r["speedup_vs_cp"] for r in versus),
            at_least_as_fast_everywhere=all(r["speedup_vs_cp"] >= 1.0 for r in versus),
        )
    out["skipped_lengths"] = [s["n"] for s in skipped]
    return out


def main() -> None:
    args = parse_args()
    rank, world, device = setup(args.smoke)
    cfg = dict(SMOKE if args.smoke else FULL)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    lengths = [parse_length(x) for x in args.lengths.split(",")] if args.lengths else cfg["lengths"]
    worlds = sorted({int(x) for x in args.worlds.split(",")}) if args.worlds else [world]
    layouts = args.layouts.split(",")
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    if not all(2 <= w <= world for w in worlds) or not set(layouts) <= set(LAYOUTS):
        raise SystemExit(f"--worlds must lie in [2, {world}] and --layouts among {LAYOUTS}; got {worlds}, {layouts}")
    groups = make_groups(worlds, world)
    meshes = {}
    cp_note = None
    if args.no_cp:
        cp_note = "left out (--no-cp)"
    elif device.type != "cuda":
        cp_note = "left out: context_parallel replaces only the CUDA kernels of SDPA"
    else:
        from torch.distributed.device_mesh import DeviceMesh

        meshes = {w: DeviceMesh.from_group(g, "cuda") for w, g in groups.items() if rank < w}

    def log(text: str) -> None:
        if rank == 0:
            print(text, flush=True)

    sizes = dict(b=cfg["b"], h=cfg["h"], d=cfg["d"], dtype=str(dtype), causal=True, lengths=lengths, worlds=worlds,
                 layouts=layouts, rounds=args.rounds, warmup=args.warmup, cp_rotate=args.cp_rotate)
    result: dict = dict(run=run_info(**sizes) if rank == 0 else None, world_size=world, worlds=worlds,
                        backend=dist.get_backend(), context_parallel=cp_note or f"rotate method {args.cp_rotate}",
                        timing=(f"{args.rounds} rounds, methods interleaved (benchmarks/timing.py's rotation), one call "
                                "of each per round after the warm-up, its time the slowest rank's (CUDA events); ms "
                                "the median of the samples, ms_min/ms_max their range; calls over 2 s take 2 rounds, "
                                "over 5 s one"))
    if device.type == "cuda":
        result["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    log(f"{world} processes on {device.type}, rings of {worlds}")

    result["check"] = check(cfg, dtype, device, rank, groups, meshes, layouts, args)
    for row in result["check"]:
        log(f"check {row['method']:17} {row['gpus']} GPUs {row['kernel']:18} ok={row['ok']} "
            + " ".join(f"{k} {v:.1e}" for k, v in row["error"].items()))

    rows: list[dict] = []
    skipped: list[dict] = []
    for n in lengths:
        ok, why = fits(n, cfg, dtype, device)
        if not ok:
            skipped.append(dict(n=n, reason=why))
            log(f"n = {n}: skipped, {why}")
            continue
        new = time_length(n, cfg, dtype, device, rank, groups, meshes, layouts, args)
        rows.extend(new)
        derive(rows, cfg)
        for row in new:
            extra = "".join(f"  {k} {row[k]:.2f}" for k in ("efficiency", "speedup_vs_cp") if k in row)
            log(f"n = {n // K if n >= K else n}{'k' if n >= K else ''} {row['mode']:7} {row['method']:17} "
                f"{row['gpus']} GPUs {row['ms']:10.2f} ms [{row['ms_min']:.2f}-{row['ms_max']:.2f}] "
                f"{row['tflops']:7.1f} TFLOP/s{extra} {row.get('kernel', '')}")
        if rank == 0:
            result.update(rows=rows, skipped=skipped, summary=summary(rows, skipped, max(worlds)))
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    result.update(rows=rows, skipped=skipped, summary=summary(rows, skipped, max(worlds)))
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    log(json.dumps(result["summary"], indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
