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
import functools
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


_version_read: tuple[object, str | None] | None = None  # (the function that read it, the version)


def _installed_triton() -> str | None:
    """The installed triton's version string, or None when there is none; does not import triton.

    Read from the package metadata once (reading it takes hundreds of
    microseconds, and the Gluon dispatch asks on every call); read again
    when ``importlib.metadata.version`` is not the function that read it (a
    test that mocks it).
    """
    global _version_read
    if "triton" in sys.modules and sys.modules["triton"] is None:  # import blocked: python -c "...= None"
        return None
    read = importlib.metadata.version
    if _version_read is not None and _version_read[0] is read:
        return _version_read[1]
    try:
        version = read("triton")
    except importlib.metadata.PackageNotFoundError:
        version = None
    _version_read = (read, version)
    return version


def _found() -> str:
    """What this Python has, for a one-line message: "triton 3.6.0 with torch 2.11.0+cu130"."""
    triton = _installed_triton()
    return f"{'no triton' if triton is None else f'triton {triton}'} with torch {torch.__version__}"


@functools.lru_cache(maxsize=16)  # the same string on every call of the Gluon dispatch
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


# triton releases whose JITFunction.run launches a compiled kernel as _launch_compiled does (read in their
# source, and run on the GPU runner with 3.6); with any other, every launch goes through JITFunction.run
DIRECT_LAUNCH_TRITONS = ((3, 6), (3, 9))
# (kernel, device, what triton specialises on of each argument, keyword arguments, compile knobs)
#   -> (compiled kernel, the values of the parameters after the positional ones)
_compiled: dict[tuple, tuple[object, tuple]] = {}
MAX_COMPILED_LAUNCHES = 1024
_UNSEEN = object()
_direct: bool | None = None  # whether this triton is one of DIRECT_LAUNCH_TRITONS; asked on the first launch


def _argument_key(arg: object) -> object:
    """What of one positional argument decides which compiled kernel triton launches: at least what it specialises on.

    A tensor's dtype and whether its address is a multiple of 16; an int's
    exact value (triton specialises on 1 and on multiples of 16, and picks
    32 or 64 bits by size); a bool's value; a float's type only (triton does
    not specialise floats). A TMA descriptor: every field but its base (lists
    as tuples), and its base's dtype. Anything else raises ``TypeError``: it
    is launched through triton's own path.
    """
    kind = type(arg)
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0)
    if kind is int or kind is bool:
        return (kind, arg)
    if kind is float:
        return float
    if kind.__name__ == "TensorDescriptor":  # triton's or Gluon's: the launcher encodes it from these fields
        return (kind, arg.base.dtype, *((name, tuple(value) if isinstance(value, list) else value)
                                         for name, value in sorted(vars(arg).items()) if name != "base"))
    raise TypeError(f"no launch key for {kind.__name__}")


def _hooked(hook: object) -> bool:
    """Whether a launch hook of triton's would do anything: set, and (a chain of hooks, as from 3.5 on) not empty."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _launch_compiled(kernel: object, grid: tuple[int, int, int], args: tuple, kwargs: dict) -> bool:
    """Launch the kernel that triton compiled for these arguments before, without triton's per-call work; False if none.

    Triton's ``kernel[grid](...)`` binds and specialises every argument and
    looks the compiled kernel up on every call: tens of microseconds of host
    time per launch, as long as the kernel itself at short lengths. The
    answer depends only on what :func:`_argument_key` keeps, so it is looked
    up by that here and launched as ``JITFunction.run`` launches it.
    """
    from triton import knobs

    if _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook):
        return False  # a profiler's hook wants triton's launch metadata
    try:
        device = torch.cuda.current_device()
        key = (id(kernel), device, tuple(_argument_key(a) for a in args), tuple(kwargs.items()), knobs.runtime.debug,
               knobs.compilation.instrumentation_mode, getattr(knobs.compilation, "fpsan_homomorphic_casts", None))
        entry = _compiled.get(key, _UNSEEN)
    except TypeError:  # an argument or keyword that no key describes, or cannot be hashed
        return False
    if entry is None:  # seen, and not to be launched but by triton
        return False
    if entry is _UNSEEN:
        compiled = kernel[grid](*args, **kwargs)
        _compiled[key] = _remembered(kernel, compiled, device, args, kwargs)
        return True
    compiled, tail = entry
    grid_y = grid[1] if len(grid) > 1 else 1
    grid_z = grid[2] if len(grid) > 2 else 1
    stream = torch._C._cuda_getCurrentRawStream(device)
    compiled.run(grid[0], grid_y, grid_z, stream, compiled.function, compiled.packed_metadata, None, None, None,
                 *args, *tail)
    return True


def _remembered(kernel: object, compiled: object, device: int, args: tuple, kwargs: dict) -> tuple | None:
    """The kernel triton compiled and launched for these arguments, with the values it bound to the other parameters.

    None where the launch is to stay triton's: a kernel with pre-run hooks,
    or a triton that binds arguments otherwise than the releases read.
    """
    if len(_compiled) >= MAX_COMPILED_LAUNCHES:  # one entry per shape: a program of ever new shapes starts over
        _compiled.clear()
    try:
        bound, _, _ = kernel.device_caches[device][-1](*args, **kwargs)  # triton's binder: every parameter's value
        hooks = kernel.pre_run_hooks
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None
    values = tuple(bound.values())
    if hooks or not all(a is b for a, b in zip(values, args)):
        return None
    return (compiled.result() if hasattr(compiled, "result") else compiled), values[len(args):]


def launch(kernel: Callable, grid: tuple[int, int, int], *args: object, **kwargs: object) -> None:
    """Launch ``kernel`` on ``grid``, on the GPU or through the interpreter, whichever it was defined for."""
    global _direct
    if is_interpreted(kernel):
        with _interpretable_language():
            kernel[grid](*args, **kwargs)
        return
    if _direct is None:
        _direct = triton_version() in DIRECT_LAUNCH_TRITONS
    if not (_direct and _launch_compiled(kernel, grid, args, kwargs)):
        kernel[grid](*args, **kwargs)
