"""What a benchmark ran on, recorded in every results JSON: code, GPU, driver, library versions, date, command;
and which attention kernels a call ran.

    python benchmarks/runinfo.py    # prints it (works without a GPU)
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent


def _command(*args: str) -> str | None:
    """stdout of a command, without its trailing newline; None when it cannot run or fails."""
    try:
        done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.rstrip("\n") if done.returncode == 0 else None


def source_sha256() -> str:
    """One hash of the package's and the benchmarks' Python files: tells two trees apart where git cannot."""
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("flashattn/**/*.py"), *ROOT.glob("benchmarks/*.py")]):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def git_state() -> dict:
    """The commit checked out and whether the working tree differs from it (read-only: takes no lock).

    ``BENCH_GIT_COMMIT``, when set, names the commit and wins over ``git``: a
    copy of the tree sent to a GPU machine may carry a ``.git`` that is not
    the tree's. ``source_sha256`` identifies the code in any case.
    """
    if os.environ.get("BENCH_GIT_COMMIT"):
        state = dict(commit=os.environ["BENCH_GIT_COMMIT"], commit_from="BENCH_GIT_COMMIT", dirty=None,
                     changed_files=[])
    else:
        commit = _command("git", "rev-parse", "HEAD")
        status = _command("git", "--no-optional-locks", "status", "--porcelain") if commit else None
        changed = [] if status is None else [line[3:] for line in status.splitlines() if line.strip()]
        state = dict(commit=commit, dirty=None if status is None else bool(changed), changed_files=changed[:50])
    state["source_sha256"] = source_sha256()
    return state


ATTENTION_KERNEL_WORDS = ("fmha", "flash", "cudnn", "attention", "sdpa", "softmax")


def attention_kernels(fn: Callable[[], object]) -> list[str]:
    """Names of the attention kernels (and softmax kernels, the sign of the math path) that ``fn`` runs on the GPU."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA], acc_events=True) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type.name == "CUDA"}
    return sorted(n[:80] for n in names if any(w in n.lower() for w in ATTENTION_KERNEL_WORDS))


def run_info(**sizes: object) -> dict:
    """Everything a result needs to be reproduced, with ``sizes`` (the problem sizes) under "sizes".

    Works without triton (then "triton" is None), as in a reader's environment that lacks it.
    """
    try:
        import triton
    except ImportError:
        triton = None

    info: dict = dict(
        git=git_state(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        python=platform.python_version(),
        torch=torch.__version__,
        triton=triton.__version__ if triton else None,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        host=platform.node(),
    )
    if torch.cuda.is_available():
        smi = _command("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
        driver_api = getattr(torch._C, "_cuda_getDriverVersion", None)
        info.update(
            device=torch.cuda.get_device_name(),
            capability=list(torch.cuda.get_device_capability()),
            sm_count=torch.cuda.get_device_properties(0).multi_processor_count,
            driver=smi.splitlines()[0].strip() if smi else None,
            # the CUDA version the driver supports (13000 = 13.0), as torch reads it
            cuda_driver_api=driver_api() if driver_api else None,
        )
    else:
        info.update(device=None, driver=None)
    info["sizes"] = sizes
    return info


if __name__ == "__main__":
    print(json.dumps(run_info(), indent=1))
