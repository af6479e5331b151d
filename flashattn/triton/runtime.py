"""How the package's Triton kernels are loaded and launched, on a GPU or through Triton's interpreter.

Each kernel module (``kernels``, ``decode_kernels``) is imported on its
first use, so that ``flashattn`` works without triton. When
``TRITON_INTERPRET=1`` was set before that import, the kernels are defined
for Triton's interpreter and run as numpy code on CPU tensors.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from types import ModuleType

import torch

INTERPRETER_MIN_TRITON = (3, 7)  # earlier interpreters fail on range(lo, hi, BLOCK) with lo > 0


def load_kernels(module: str, caller: str) -> ModuleType:
    """Import ``flashattn.triton.<module>``, or raise ``ImportError`` naming ``caller`` and what to do."""
    try:
        return importlib.import_module(f"{__package__}.{module}")
    except ImportError as error:
        raise ImportError(
            f"{caller} needs triton (pip install triton, or the flashattn[triton] extra); "
            "the package's PyTorch code computes the same function without it"
        ) from error


def is_interpreted(kernel: object) -> bool:
    """Whether ``kernel`` was defined under ``TRITON_INTERPRET=1`` (then it runs numpy code on the CPU)."""
    import triton

    return not isinstance(kernel, triton.runtime.JITFunction)


def triton_version() -> tuple[int, int]:
    """The installed triton's (major, minor) version."""
    import triton

    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def check_device(caller: str, interpreted: bool, device: torch.device) -> None:
    """Raise unless the kernels can run on ``device``: CUDA, or the CPU under a recent enough interpreter."""
    if interpreted and triton_version() < INTERPRETER_MIN_TRITON:
        need = ".".join(map(str, INTERPRETER_MIN_TRITON))
        raise RuntimeError(
            f"Triton's interpreter runs these kernels from triton {need} on, and triton "
            f"{'.'.join(map(str, triton_version()))} is installed: upgrade triton, or use the PyTorch code on the CPU"
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

    Triton builds its helpers for the GPU or for the interpreter when it is
    first imported, and ``import flashattn`` imports it (through torch)
    before a notebook can set ``TRITON_INTERPRET=1``. Interpreted copies then
    stand in for the GPU helpers during the launch, and are taken back after.
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
