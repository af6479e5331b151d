"""Compile the package's Triton kernels ahead of time, without a GPU, for the A100 (sm80) and Hopper (sm90).

    python scripts/check_tritons.py --out benchmarks/results/compile-tritons.json

installs, one at a time, each triton that a torch release from 2.6 on pins
(``TORCH_PINS``) and the newest one, into a temporary folder
(``pip install --no-deps --target``), and in a subprocess that puts that
folder first on ``sys.path`` compiles the pointer kernels for sm80 and
sm90 and the kernels with ``TMA=True`` for sm90, at the launches
of the package's tables. It records, per (triton, target, kernel), whether
every launch compiled and, if one did not, the first line of its error; the
folders are deleted afterwards.

No GPU is needed: triton ships ptxas, and a stand-in driver
(``OfflineDriver``) names the target. The kernels are compiled through
their own ``warmup``, so each triton specialises the arguments as it would
at a real launch (16-byte-aligned pointers, strides that are multiples of
16). The kernel files are loaded as a package of their own, without
``flashattn`` (and so without torch's own use of triton).

``python scripts/check_tritons.py compile --arch 80`` is the worker: it reads
launches (JSON) on stdin and writes one result per launch on stdout, each
with the shared memory the compiled kernel asks for and the stack frame
that cuobjdump reports (where spilled registers go). The tests use it with
the installed triton (tests/test_compile_sm80.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL_DIR = ROOT / "flashattn" / "triton"

# torch release -> the triton it requires on Linux x86_64 ("Requires-Dist: triton==..." in the
# metadata of its manylinux x86_64 wheel on PyPI, read from the wheel's .metadata file)
TORCH_PINS = {
    "2.6.0": "3.2.0",
    "2.7.0": "3.3.0",
    "2.7.1": "3.3.1",
    "2.8.0": "3.4.0",
    "2.9.0": "3.5.0",
    "2.9.1": "3.5.1",
    "2.10.0": "3.6.0",
    "2.11.0": "3.6.0",
    "2.12.0": "3.7.0",
    "2.12.1": "3.7.1",
    "2.13.0": "3.7.1",
}
NEWEST_TRITON = "3.9.0"

# Arguments that are not constexprs take the values of a typical call: contiguous (b, h, n, d)
# tensors, whose strides are multiples of 16 (Triton specialises on that, and on == 1), one query
# head per key/value head (g == 1 is specialised too), lengths of 4096.
FLOAT32_POINTERS = ("lse_ptr", "delta_ptr", "lse_part_ptr", "o_part_ptr")  # o_part is float32 when split
DEFAULT_INTS = dict(g=1, h=8, i=4096, j=4096, num_splits=4)
STRIDE = 4096 * 64
SCALE = 0.125


class OfflineDriver:
    """The part of Triton's driver that compiling needs: the target. Nothing is launched."""

    def __init__(self, target: object) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> object:
        return self.target


def kernel_modules() -> types.ModuleType:
    """The directory of the kernel files as a package of its own, so that ``.kernels`` imports resolve."""
    package = types.ModuleType("flashattn_kernel_files")
    package.__path__ = [str(KERNEL_DIR)]
    sys.modules[package.__name__] = package
    return package


def tile_descriptor(dtype: str, rows: int, head_dim: int) -> object:
    """A Gluon TMA descriptor of a (b, heads, 4096, head_dim) tensor in ``dtype`` whose box is (1, 1, rows, head_dim)."""
    import torch
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    t = torch.empty(1, 1, 1, head_dim, dtype=getattr(torch, dtype)).expand(2, 8, 4096, head_dim)
    block = [1, 1, rows, head_dim]
    layout = gl.NVMMASharedLayout.get_default_for(block, getattr(gl, dtype))
    strides = [8 * 4096 * head_dim, 4096 * head_dim, head_dim, 1]  # contiguous, as the descriptor describes it
    return TensorDescriptor(t, list(t.shape), strides, block, layout)


def kernel_arguments(kernel: object, dtype: str, ints: dict, boxes: dict | None = None) -> list:
    """The non-constexpr arguments of ``kernel``, by parameter name, as a launch of inputs in ``dtype`` passes them.

    ``boxes`` maps a descriptor parameter (``q_desc``) to the (rows, head
    dimension) of its tile, for the Gluon kernel.
    """
    import torch

    args = []
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            continue
        if name.endswith("_desc"):
            args.append(tile_descriptor(dtype, *boxes[name]))
        elif name.endswith("_ptr"):
            kind = "float32" if name in FLOAT32_POINTERS else "int32" if name == "lens_ptr" else dtype
            args.append(torch.empty(16, dtype=getattr(torch, kind)))  # 64-byte aligned, as on the GPU
        elif name.startswith("stride_"):
            args.append(STRIDE)
        elif name.endswith("scale"):
            args.append(SCALE)
        else:
            args.append({**DEFAULT_INTS, **ints}[name])
    return args


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread and stack frame bytes of the kernel in ``cubin``, by the cuobjdump that triton ships.

    Spilled registers live in the stack frame; the package's kernels have no
    local arrays, so a frame of 0 bytes means no spill. Both None where
    triton ships no cuobjdump.
    """
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return dict(registers=None, stack=None)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        out = subprocess.run([str(tool), "-res-usage", file.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return dict(registers=int(found.group(1)), stack=int(found.group(2))) if found else dict(registers=None, stack=None)


def first_line(error: BaseException) -> str:
    """The error's type and the first non-empty line of its message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def compile_launches(launches: list[dict], arch: int) -> list[dict]:
    """Compile each launch for ``GPUTarget("cuda", arch, 32)`` with the triton that is imported.

    A launch is a dict: ``module`` (a kernel file's name), ``kernel``,
    ``dtype`` (of the inputs), ``constexprs``, ``num_warps``, ``num_stages``,
    and optionally ``ints`` (values other than ``DEFAULT_INTS``). Each result
    is the launch with ``compiled``, ``error``, ``shared`` (bytes of shared
    memory per block), ``registers`` where known, and ``stack``.
    """
    from triton.backends.compiler import GPUTarget

    sys.modules["triton.runtime.driver"].driver.set_active(OfflineDriver(GPUTarget("cuda", arch, 32)))
    package = kernel_modules()
    results = []
    for spec in launches:
        result = dict(spec, compiled=False, error=None, shared=None, registers=None, stack=None)
        try:
            kernel = getattr(importlib.import_module(f"{package.__name__}.{spec['module']}"), spec["kernel"])
            args = kernel_arguments(kernel, spec["dtype"], spec.get("ints", {}), spec.get("boxes"))
            compiled = kernel.warmup(*args, grid=(1,),
                                     **spec["constexprs"], num_warps=spec["num_warps"],
                                     num_stages=spec["num_stages"])
            result.update(compiled=True, shared=compiled.metadata.shared, **resource_usage(compiled.asm["cubin"]))
        except Exception as error:  # noqa: BLE001 - every failure is a result to record
            result["error"] = first_line(error)
        results.append(result)
    return results


def worker_environment(site: str | None) -> dict:
    """The environment of a compiling subprocess: no interpreter, and ``site`` first on the path."""
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default of every triton here, said aloud (3.9 warns otherwise)
    if site is not None:
        env["PYTHONPATH"] = site
    return env


def compile_in_subprocesses(launches: list[dict], arch: int, site: str | None = None, jobs: int = 2,
                            timeout: float = 1800) -> list[dict]:
    """:func:`compile_launches` in ``jobs`` subprocesses with a clean environment; results in the launches' order.

    ``site``: a folder put first on ``sys.path`` (another triton), or None
    for the installed one.
    """
    chunks = [launches[n::jobs] for n in range(jobs)]

    def run(chunk: list[dict]) -> list[dict]:
        if not chunk:
            return []
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "compile", "--arch", str(arch)],
                              input=json.dumps(chunk), capture_output=True, text=True, timeout=timeout,
                              env=worker_environment(site))
        if done.returncode != 0:
            raise RuntimeError(f"the compiling subprocess failed:\n{done.stderr[-4000:]}")
        return json.loads(done.stdout)

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        parts = list(pool.map(run, chunks))
    merged: list[dict] = [None] * len(launches)  # type: ignore[list-item]
    for n, part in enumerate(parts):
        for k, result in enumerate(part):
            merged[n + k * jobs] = result
    return merged


def table_launches(arch: str, head_dims: dict[int, tuple[int, ...]] | None = None,
                   causal: tuple[bool, ...] = (False, True)) -> list[dict]:
    """The pointer kernels' launches for 16-bit inputs in the launch table's rows of ``arch`` ("sm80", "sm90").

    ``head_dims`` maps a row's head dimension to those it serves (all of
    them by default: 64 serves 16, 32 and 64). One launch per distinct
    (kernel, tiles, head dimension, causal), in bfloat16.
    """
    from flashattn.triton.launch import PREPROCESS_BLOCK_Q, launch_table

    head_dims = head_dims or {64: (16, 32, 64), 128: (128,), 256: (256,)}
    launches: dict[str, dict] = {}
    for (row_arch, row, _), configs in launch_table().items():
        if row_arch != arch or row not in head_dims:
            continue
        for d in head_dims[row]:
            for flag in causal:
                for kernel, cfg in (("attn_fwd_kernel", configs.fwd), ("attn_bwd_dkdv_kernel", configs.dkdv),
                                    ("attn_bwd_dq_kernel", configs.dq)):
                    spec = tile_launch("kernels", kernel, "bfloat16", d, cfg, CAUSAL=flag)
                    launches[json.dumps(spec, sort_keys=True)] = spec
            spec = dict(module="kernels", kernel="attn_bwd_preprocess_kernel", dtype="bfloat16",
                        constexprs=dict(DV=d, BLOCK_Q=PREPROCESS_BLOCK_Q), num_warps=4, num_stages=3)
            launches[json.dumps(spec, sort_keys=True)] = spec
    return list(launches.values())


def tile_launch(module: str, kernel: str, dtype: str, d: int, cfg: object, **constexprs: object) -> dict:
    """A launch of a kernel of ``module`` whose tiles are ``cfg`` (a TileConfig or HopperLaunch), d_v = d."""
    return dict(module=module, kernel=kernel, dtype=dtype,
                constexprs=dict(D=d, DV=d, BLOCK_Q=cfg.block_q, BLOCK_K=cfg.block_k, **constexprs),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def float32_launches(head_dims: tuple[int, ...] = (16, 32, 64, 128, 256),
                     causal: tuple[bool, ...] = (False, True)) -> list[dict]:
    """The pointer kernels' launches for float32 inputs (the same table on every GPU)."""
    from flashattn.triton.launch import PREPROCESS_BLOCK_Q, float32_table

    table = float32_table()
    launches = []
    for d in head_dims:
        configs = table[max(d, 64)]
        for flag in causal:
            for kernel, cfg in (("attn_fwd_kernel", configs.fwd), ("attn_bwd_dkdv_kernel", configs.dkdv),
                                ("attn_bwd_dq_kernel", configs.dq)):
                launches.append(tile_launch("kernels", kernel, "float32", d, cfg, CAUSAL=flag))
    launches.append(dict(module="kernels", kernel="attn_bwd_preprocess_kernel", dtype="float32",
                         constexprs=dict(DV=max(head_dims), BLOCK_Q=PREPROCESS_BLOCK_Q), num_warps=4, num_stages=3))
    return launches


def decode_launches(head_dims: tuple[int, ...] = (64, 128, 256)) -> list[dict]:
    """The decoding kernels at their GPU launch: the chunk kernel with the most rows per program, and the merge
    of the most chunks, in 16-bit and float32 inputs."""
    from flashattn.triton.decoding import MAX_SPLITS, decode_config, max_rows

    import torch

    launches = []
    for dtype in ("bfloat16", "float32"):
        for d in head_dims:
            cfg = decode_config(getattr(torch, dtype), interpreted=False, head_dim=d)
            rows = max_rows(getattr(torch, dtype), d)
            launches.append(dict(module="decode_kernels", kernel="decode_split_kernel", dtype=dtype,
                                 constexprs=dict(D=d, DV=d, BLOCK_M=rows, BLOCK_K=cfg.block_k, HAS_LENS=True),
                                 num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    for d in head_dims:
        launches.append(dict(module="decode_kernels", kernel="decode_merge_kernel", dtype="bfloat16",
                             constexprs=dict(DV=d, BLOCK_S=MAX_SPLITS), num_warps=4, num_stages=3))
    return launches


def tma_launches() -> list[dict]:
    """The kernels with ``TMA=True`` at each distinct launch of the Hopper table, causal or not as its row."""
    from flashattn.triton.hopper import hopper_table

    names = ("attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel")
    launches: dict[str, dict] = {}
    for (d, causal, _), row in hopper_table().items():
        for kernel, cfg in zip(names, row):
            if cfg is None:
                continue
            spec = tile_launch("kernels", kernel, "bfloat16", d, cfg, CAUSAL=causal, TMA=True)
            launches[json.dumps(spec, sort_keys=True)] = spec
    return list(launches.values())


def fa3_launches() -> list[dict]:
    """The Gluon forward (``fa3_kernels``) at its launches: each step (warpgroups, schedule), head dimension and
    causal rule in bfloat16, and the first step in float16 (the two dtypes compile to the same tiles)."""
    from flashattn.triton import fa3

    def launch(dtype, d, causal, warpgroups, schedule):
        return dict(module="fa3_kernels", kernel="fa3_fwd_kernel", dtype=dtype,
                    boxes=dict(q_desc=(fa3.BLOCK_M, d), k_desc=(fa3.BLOCK_N, d), v_desc=(fa3.BLOCK_N, d)),
                    constexprs=dict(CAUSAL=causal, STAGES=fa3.STAGES, CONSUMERS=warpgroups,
                                    SCHEDULE=fa3.SCHEDULES[schedule]),
                    num_warps=4, num_stages=1)

    return ([launch("bfloat16", d, causal, *step) for step in fa3.STEPS for d in fa3.HEAD_DIMS
             for causal in (False, True)]
            + [launch("float16", d, causal, *fa3.STEPS[0]) for d in fa3.HEAD_DIMS for causal in (False, True)])


def version_check_launches() -> dict[int, list[dict]]:
    """What is compiled with each triton, per target: each pointer kernel at the largest head dimension of
    every row of the target's table, causal; float32 and decoding at d = 128; on sm90 the TMA kernels too."""
    largest = {64: (64,), 128: (128,), 256: (256,)}
    pointer = float32_launches((128,), (True,)) + decode_launches((128,))
    return {
        80: table_launches("sm80", largest, (True,)) + pointer,
        90: table_launches("sm90", largest, (True,)) + pointer + tma_launches(),
    }


def install_triton(version: str, folder: Path) -> None:
    """``pip install --no-deps triton==version`` into ``folder``."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                    f"triton=={version}", "--target", str(folder)], check=True, timeout=1800)


def summarise(results: list[dict]) -> list[dict]:
    """One record per kernel: how many of its launches compiled, the first error, the most shared memory and
    stack frame (spills) of any launch, in bytes."""
    kernels: dict[str, dict] = {}
    for result in results:
        record = kernels.setdefault(result["kernel"], dict(kernel=result["kernel"], launches=0, compiled=0,
                                                           error=None, max_shared=None, max_stack=None))
        record["launches"] += 1
        if result["compiled"]:
            record["compiled"] += 1
            record["max_shared"] = max(record["max_shared"] or 0, result["shared"])
            if result["stack"] is not None:
                record["max_stack"] = max(record["max_stack"] or 0, result["stack"])
        elif record["error"] is None:
            record["error"] = result["error"]
    return list(kernels.values())


def check_versions(versions: list[str], jobs: int) -> list[dict]:
    """Install each triton of ``versions`` in turn, compile the kernels with it, and delete it again."""
    launches = version_check_launches()
    records = []
    for version in versions:
        folder = Path(tempfile.mkdtemp(prefix=f"triton-{version}-"))
        try:
            started = time.time()
            install_triton(version, folder)
            for arch, specs in launches.items():
                results = compile_in_subprocesses(specs, arch, site=str(folder), jobs=jobs)
                for record in summarise(results):
                    records.append(dict(triton=version, target=f"sm{arch}", **record))
            print(f"triton {version}: {time.time() - started:.0f} s", file=sys.stderr)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="versions", choices=("versions", "compile"))
    parser.add_argument("--arch", type=int, default=80, help="compile: the target's compute capability, as 80")
    parser.add_argument("--tritons", nargs="*", help="versions: these tritons instead of the torch pins and the newest")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compile-tritons.json")
    options = parser.parse_args()
    if options.mode == "compile":
        results, sys.stdout = sys.stdout, sys.stderr  # whatever triton prints stays out of the results
        results.write(json.dumps(compile_launches(json.load(sys.stdin), options.arch)))
        return

    sys.path.insert(0, str(ROOT))
    import torch

    versions = options.tritons or sorted({*TORCH_PINS.values(), NEWEST_TRITON}, key=lambda v: tuple(map(int, v.split("."))))
    git = lambda *args: subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "HEAD")
    changed = git("status", "--porcelain", "--", str(KERNEL_DIR)).splitlines()  # kernels compiled as they stand
    records = check_versions(versions, options.jobs)
    out = dict(
        commit=commit,
        kernel_files_changed_since_commit=[line[3:] for line in changed],
        kernel_files_sha256={path.name: hashlib.sha256(path.read_bytes()).hexdigest()
                             for path in sorted(KERNEL_DIR.glob("*kernels.py"))},
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        python=sys.version.split()[0],
        torch=torch.__version__,
        torch_pins=TORCH_PINS,
        compiled_with=versions,
        launches={f"sm{arch}": specs for arch, specs in version_check_launches().items()},
        results=records,
    )
    options.out.write_text(json.dumps(out, indent=1) + "\n")
    failed = [r for r in records if r["compiled"] < r["launches"]]
    for r in failed:
        print(f"triton {r['triton']} {r['target']} {r['kernel']}: {r['error']}", file=sys.stderr)


if __name__ == "__main__":
    main()
