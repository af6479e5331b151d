"""What the first cell of every chapter of the book sets up, in one call.

A chapter runs everywhere: on a CPU at small sizes, so that it takes seconds,
and on a GPU at sizes where speed and memory show. Its checked outputs must
not depend on where it ran, so random data is drawn on the CPU and then moved
to the device: every device sees the same numbers.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import torch
from torch import Tensor

from .triton.runtime import triton_support


@dataclass(frozen=True)
class Sizes:
    """Problem sizes for the measured parts of a chapter (timings, memory).

    ``seq_lens`` are the sequence lengths a plot sweeps, shortest first; a
    problem is ``(batch, heads, seq_len, head_dim)``.
    """

    batch: int
    heads: int
    head_dim: int
    seq_lens: tuple[int, ...]


@dataclass(frozen=True)
class BookSetup:
    """Where a chapter runs: device, working dtype, sizes and seed.

    ``dtype`` is the dtype of the fast paths and of every timing: bfloat16 on
    a GPU that computes in it (Ampere and later), float16 on an older GPU,
    float32 on a CPU. Checks against a reference run in float32 or float64
    whatever the device, and say so.
    """

    device: torch.device
    device_name: str
    dtype: torch.dtype
    sizes: Sizes
    seed: int

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard normal numbers of ``shape`` on ``self.device``, drawn on the CPU.

        Drawn from the CPU generator that ``setup`` seeded, so the values are
        the same on every device, and so are the outputs computed from them.
        """
        return torch.randn(*shape, dtype=dtype).to(self.device)

    def __str__(self) -> str:
        s = self.sizes
        return (
            f"device: {self.device} ({self.device_name}), dtype: {self.dtype}, seed: {self.seed}\n"
            f"sizes: batch {s.batch}, heads {s.heads}, head_dim {s.head_dim}, seq_lens {s.seq_lens}"
        )


_CPU_SIZES = Sizes(batch=1, heads=4, head_dim=64, seq_lens=(128, 256, 512, 1024))
_GPU_SIZES = Sizes(batch=4, heads=16, head_dim=128, seq_lens=(512, 1024, 2048, 4096))
# A GPU of less memory (a T4's 15 GiB) takes one sequence per batch: the standard attention that the
# chapters time beside FlashAttention stores (b, h, n, n) scores, about 16 GiB at batch 4 for its backward.
_SMALL_GPU_SIZES = Sizes(batch=1, heads=16, head_dim=128, seq_lens=(512, 1024, 2048, 4096))
_SMALL_GPU_GIB = 32
GIB = 2**30


def setup(seed: int = 0, device: torch.device | str | None = None) -> BookSetup:
    """Pick the device, dtype and sizes of a chapter, and seed Python's and torch's generators.

    ``device`` defaults to CUDA when it is present, else the CPU; pass
    ``"cpu"`` to run a chapter on the CPU of a GPU machine.
    """
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    random.seed(seed)
    torch.manual_seed(seed)  # seeds the CPU generator and every CUDA generator
    if dev.type == "cuda":
        # The first backward pass on a GPU can warn that autograd's thread has no CUDA context
        # yet (torch 2.11); one tiny backward here, with that warning silenced, keeps it out of
        # every chapter's outputs.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = torch.ones(2, 2, device=dev, requires_grad=True)
            (x @ x).sum().backward()
        major, _ = torch.cuda.get_device_capability(dev)
        dtype = torch.bfloat16 if major >= 8 else torch.float16
        sizes = _GPU_SIZES if gpu_memory_gib(dev) >= _SMALL_GPU_GIB else _SMALL_GPU_SIZES
        return BookSetup(dev, torch.cuda.get_device_name(dev), dtype, sizes, seed)
    name = f"{torch.get_num_threads()} CPU threads" if dev.type == "cpu" else dev.type
    return BookSetup(dev, name, torch.float32, _CPU_SIZES, seed)


def gpu_memory_gib(device: torch.device | str | None = None) -> float:
    """The memory a program may use on the CUDA ``device``, in GiB.

    The device's total memory, or less where a cap was set with
    ``torch.cuda.set_per_process_memory_fraction``: chapter sizes follow it.
    """
    dev = torch.device(device if device is not None else "cuda")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    _, total = torch.cuda.mem_get_info(index)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(index)
    return total * fraction / GIB


@dataclass(frozen=True)
class KernelSupport:
    """Whether the package's Triton kernels run on a device here, and if not, why and what would run them.

    ``where`` is "compiled" (an NVIDIA GPU), "interpreted" (Triton's
    interpreter on the CPU) or "" when they do not run; ``reason`` is one
    line for the reader, empty when they run.
    """

    runs: bool
    where: str
    reason: str

    def skip(self, what: str) -> bool:
        """Print one line saying that ``what`` is skipped and why, and return True, when the kernels do not run."""
        if not self.runs:
            print(f"skipped: {what}. {self.reason}")
        return not self.runs


def kernel_support(device: torch.device | str) -> KernelSupport:
    """Whether ``triton_attention`` and the decoding kernels can run on ``device`` in this Python.

    On a CUDA GPU they are compiled, and need compute capability 8.0 or newer
    and triton 3.4 or newer; on the CPU they run in Triton's interpreter,
    which these kernels need from triton 3.7 on, switched on by
    ``TRITON_INTERPRET=1`` before their first call. The answer is
    :func:`flashattn.triton.runtime.triton_support`'s, worded for a reader;
    it does not import triton when triton is missing, and never raises.
    """
    device = torch.device(device)
    ok, reason = triton_support(device)
    if ok:
        return KernelSupport(True, "compiled" if device.type == "cuda" else "interpreted", "")
    return KernelSupport(False, "", reason[:1].upper() + reason[1:].rstrip(".") + ".")


def max_error(got: Tensor, want: Tensor) -> float:
    """The largest absolute difference of ``got`` and ``want``, computed in float64 on the CPU."""
    if got.shape != want.shape:
        raise ValueError(f"got has shape {tuple(got.shape)} but want has shape {tuple(want.shape)}")
    return (got.detach().double().cpu() - want.detach().double().cpu()).abs().max().item() if got.numel() else 0.0


def check(claim: str, got: Tensor, want: Tensor, atol: float) -> None:
    """Print the largest absolute error of ``got`` against ``want`` with its tolerance; raise past it.

    The line reads ``claim: max |error| = 3.1e-07 (tolerance 1e-05)``. The
    error's digits depend on the device that computed it, so nbval's sanitize
    file (``notebooks/nbval_sanitize.cfg``) masks them before comparing;
    the tolerance, and the ``AssertionError`` past it, do not. NaN anywhere
    in ``got`` fails the check. Returns nothing, so that a check at the end
    of a cell prints only its line (use :func:`max_error` for the number).
    """
    err = max_error(got, want)
    # :g prints the tolerance as written in the call (0.25, 0.03125, 1e-05), never rounded
    print(f"{claim}: max |error| = {err:.1e} (tolerance {atol:g})")
    if not err <= atol:  # a NaN error fails too
        raise AssertionError(f"{claim}: max |error| = {err:.3e} exceeds the tolerance {atol:g}")


def committed_result(name: str) -> dict:
    """A benchmark result that ships with the package (``flashattn/results/<name>``), as a dict.

    The chapters quote these measurements of the GPU runner; reading them from
    the installed package, not from the network, keeps a chapter's prose and
    the data of its release together, on any machine.
    """
    folder = resources.files("flashattn") / "results"
    path = folder / name
    if not path.is_file():
        names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".json"))
        raise ValueError(f"no committed result {name!r}; flashattn/results holds {', '.join(names)}")
    return json.loads(path.read_text(encoding="utf-8"))


def saved_bytes(fn: Callable[[], object], exclude: tuple[Tensor, ...] = ()) -> int:
    """The bytes that autograd keeps for the backward pass while ``fn()`` runs, each storage counted once.

    Every tensor autograd saves passes through a pack hook of
    ``torch.autograd.graph.saved_tensors_hooks``; a storage saved twice (the
    probabilities, kept by the softmax and by the product with V) counts
    once. Storages of the tensors in ``exclude`` (the inputs, say) are left
    out. Chapter 03 derives this count; other chapters call it from here.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    kept: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            kept[storage.data_ptr()] = storage.nbytes()
        return t  # holding t keeps its storage alive, so no address is reused while counting

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
        del out
    return sum(kept.values())
