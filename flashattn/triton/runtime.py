"""How the package's Triton kernels are loaded and launched, on a GPU or through Triton's interpreter.

Each kernel module (``kernels``, ``decode_kernels``) is
imported on its first use, so that ``flashattn`` works without triton. When
``TRITON_INTERPRET=1`` was set before that import, the kernels are defined
for Triton's interpreter and run as numpy code on CPU tensors.

What the kernels need of triton is checked here, before triton is asked to
do anything: a missing or too old triton is named in one line, with the
torch and triton found and the version needed, never as a traceback from
inside triton. :func:`triton_support` answers the same question without
raising, for code that would rather skip the kernels.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import NamedTuple

import torch

# the oldest triton whose compiler builds every kernel for sm80 and sm90, the TMA kernels included
# (tl.make_tensor_descriptor came in 3.4); the pointer kernels compile from 3.2 on
# (scripts/check_tritons.py, benchmarks/results/compile-tritons.json)
COMPILED_MIN_TRITON = (3, 4)
INTERPRETER_MIN_TRITON = (3, 7)  # earlier interpreters fail on range(lo, hi, BLOCK) with lo > 0
MIN_CAPABILITY = (8, 0)  # as flashattn.triton.launch: no launch was compiled for older GPUs


def _dotted(version: tuple[int, int]) -> str:
    return ".".join(map(str, version))


def _installed_triton() -> str | None:
    """The installed triton's version string, or None when there is none; does not import triton."""
    if "triton" in sys.modules and sys.modules["triton"] is None:  # import blocked: python -c "...= None"
        return None
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def _found() -> str:
    """What this Python has, for a one-line message: "triton 3.6.0 with torch 2.11.0+cu130"."""
    triton = _installed_triton()
    return f"{'no triton' if triton is None else f'triton {triton}'} with torch {torch.__version__}"


def _parse(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def triton_version() -> tuple[int, int]:
    """The installed triton's (major, minor) version."""
    import triton

    return _parse(triton.__version__)


class TritonSupport(NamedTuple):
    """Whether the kernels run on a device here (``ok``), and if not, one line that says why and what would."""

    ok: bool
    reason: str


def triton_support(device: torch.device | str | None = None) -> TritonSupport:
    """Whether ``triton_attention`` and the decoding kernels can run on ``device`` in this Python.

    ``device`` defaults to CUDA when it is present, else the CPU. On a CUDA
    GPU the kernels are compiled: compute capability 8.0 or newer and
    triton 3.4 or newer. On the CPU they run in Triton's interpreter:
    triton 3.7 or newer and ``TRITON_INTERPRET=1`` set before their first
    call. Returns ``(ok, reason)``, ``reason`` empty when ``ok``. Does not
    import triton when it is missing, and never raises.
    """
    try:
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        return _support(device)
    except Exception as error:  # noqa: BLE001 - an answer, never an exception
        return TritonSupport(False, f"could not tell whether the kernels run on {device}: {error!r} ({_found()})")


def _support(device: torch.device) -> TritonSupport:
    version = _installed_triton()
    floor = INTERPRETER_MIN_TRITON if device.type == "cpu" else COMPILED_MIN_TRITON
    if device.type not in ("cpu", "cuda"):
        return TritonSupport(False, f"the kernels run on NVIDIA GPUs and, in Triton's interpreter, on the CPU, "
                                    f"not on {device.type} ({_found()})")
    if version is None or _parse(version) < floor:
        where = "in Triton's interpreter on the CPU" if device.type == "cpu" else "compiled on a GPU"
        return TritonSupport(False, f"the kernels need triton {_dotted(floor)} or newer to run {where}; "
                                    f"found {_found()}: pip install \"triton>={_dotted(floor)}\"")
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            return TritonSupport(False, f"the kernels need an NVIDIA GPU of compute capability "
                                        f"{_dotted(MIN_CAPABILITY)} or newer; {torch.cuda.get_device_name(device)} "
                                        f"has {_dotted(capability)}")
        return TritonSupport(True, "")
    if not _interpreting():
        return TritonSupport(False, "on the CPU the kernels run in Triton's interpreter: set TRITON_INTERPRET=1 "
                                    "before their first call")
    return TritonSupport(True, "")


def _interpreting() -> bool:
    """Whether the kernels are (or, imported now, would be) defined for Triton's interpreter."""
    loaded = sys.modules.get(f"{__package__}.kernels")
    if loaded is not None:
        return is_interpreted(loaded.attn_fwd_kernel)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def load_kernels(module: str, caller: str) -> ModuleType:
    """Import ``flashattn.triton.<module>``, or raise naming ``caller``, what was found and what it needs.

    ``ImportError`` when triton is missing, cannot be imported, or is older
    than the compiled kernels need (the interpreter's further need is
    checked by :func:`check_device`, which knows the device).
    """
    loaded = sys.modules.get(f"{__package__}.{module}")
    if loaded is not None:
        return loaded
    need = (f"triton {_dotted(COMPILED_MIN_TRITON)} or newer on a GPU, "
            f"{_dotted(INTERPRETER_MIN_TRITON)} or newer in Triton's interpreter on the CPU")
    version = _installed_triton()
    if version is None:
        raise ImportError(f"{caller} needs triton ({need}; pip install triton, or the flashattn[triton] extra), "
                          f"found {_found()}; the package's PyTorch code computes the same function without it")
    if _parse(version) < COMPILED_MIN_TRITON:
        raise ImportError(f"{caller} needs {need}; found {_found()}: "
                           f"pip install \"triton>={_dotted(COMPILED_MIN_TRITON)}\" (with a torch that allows it)")
    try:
        return importlib.import_module(f"{__package__}.{module}")
    except ImportError as error:
        raise ImportError(f"{caller} could not import triton ({error}); found {_found()}, needs {need}") from None


def is_interpreted(kernel: object) -> bool:
    """Whether ``kernel`` was defined under ``TRITON_INTERPRET=1`` (then it runs numpy code on the CPU)."""
    import triton

    return not isinstance(kernel, triton.runtime.JITFunction)


def check_device(caller: str, interpreted: bool, device: torch.device) -> None:
    """Raise unless the kernels can run on ``device``: CUDA, or the CPU under a recent enough interpreter."""
    if interpreted and triton_version() < INTERPRETER_MIN_TRITON:
        raise RuntimeError(
            f"Triton's interpreter runs these kernels from triton {_dotted(INTERPRETER_MIN_TRITON)} on, and triton "
            f"{_dotted(triton_version())} is installed (with torch {torch.__version__}): "
            f"pip install \"triton>={_dotted(INTERPRETER_MIN_TRITON)}\", or use the PyTorch code on the CPU"
        )
    if interpreted and device.type != "cpu":
        raise ValueError(f"under TRITON_INTERPRET=1 the kernels run on CPU tensors, got q on {device}")
    if not interpreted and device.type != "cuda":
        raise ValueError(
            f"{caller} runs on CUDA tensors, got q on {device}; to run it on the CPU, "
            "set TRITON_INTERPRET=1 before its first call"
        )


@contextlib.contextmanager
def _interpretable_language() -> Iterator[None]:
    """Let the interpreter call Triton's own jit'd helpers (``tl.zeros``, ``tl.sum``, ...) while a kernel runs.

    The one place where the package changes triton at run time. Triton builds
    its helpers for the GPU or for the interpreter when it is first imported,
    and ``import flashattn`` imports it (``torch.nn.attention.bias`` imports
    ``torch._dynamo``, which imports triton) before a notebook can set
    ``TRITON_INTERPRET=1``. Up to triton 3.9 at least, the interpreter then
    fails on the GPU helpers ("Cannot call @triton.jit'd outside of the scope
    of a kernel"), so interpreted copies stand in for them during the launch,
    and are taken back after. With ``TRITON_INTERPRET=1`` set before triton's
    first import there are no GPU helpers, and nothing is replaced.
    tests/test_runtime.py fails when this is no longer needed.
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    replaced = [
        (module, name, helper)
        for module in (tl, tl.math, tl.standard)
        for name, helper in vars(module).items()
        if isinstance(helper, JITFunction)
    ]
    try:
        for module, name, helper in replaced:
            setattr(module, name, InterpretedFunction(helper.fn))
        yield
    finally:
        for module, name, helper in replaced:
            setattr(module, name, helper)


def launch(kernel: Callable, grid: tuple[int, int, int], *args: object, **kwargs: object) -> None:
    """Launch ``kernel`` on ``grid``, on the GPU or through the interpreter, whichever it was defined for."""
    if is_interpreted(kernel):
        with _interpretable_language():
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)
