"""What the runtime says about the triton it finds, and the one change it makes to triton while it runs.

``triton_support`` is asked with the installed version mocked (and the GPU's
capability), and in a subprocess where triton cannot be imported. The
errors at first use must be one line that names the torch and triton found
and what is needed. The interpreter's stand-ins for triton's own helpers
(``runtime._interpretable_language``) are checked to be still needed: the
test fails when a triton comes that runs the kernels without them.
"""

from __future__ import annotations

import sys

import pytest
import torch

import flashattn.triton.runtime as runtime
from flashattn.triton.runtime import TritonSupport, triton_support
from fresh_python import run_without_interpreter



@pytest.fixture
def on_gpu(monkeypatch):
    """A CUDA device of the given capability, as far as the runtime asks."""

    def set_capability(capability: tuple[int, int], name: str = "NVIDIA A100-SXM4-40GB") -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    return set_capability


@pytest.mark.parametrize("version, cpu_ok, gpu_ok", [
    (None, False, False),
    ("3.2.0", False, False),
    ("3.3.1", False, False),
    ("3.4.0", False, True),
    ("3.6.0", False, True),
    ("3.7.1", True, True),
    ("3.9.0", True, True),
    ("3.10.0+git1234", True, True),
])
def test_support_follows_the_version(monkeypatch, on_gpu, version, cpu_ok, gpu_ok):
    monkeypatch.setattr(runtime, "_installed_triton", lambda: version)
    monkeypatch.setattr(runtime, "_interpreting", lambda: True)
    on_gpu((8, 0))
    for device, ok in (("cpu", cpu_ok), ("cuda", gpu_ok)):
        support = triton_support(device)
        assert isinstance(support, TritonSupport) and support.ok == ok
        if ok:
            assert support.reason == ""
        else:
            found = "no triton" if version is None else f"triton {version}"
            need = "3.7" if device == "cpu" else "3.4"
            assert f"found {found} with torch {torch.__version__}" in support.reason
            assert f'pip install "triton>={need}"' in support.reason
            assert "\n" not in support.reason


def test_support_names_an_old_gpu(monkeypatch, on_gpu):
    monkeypatch.setattr(runtime, "_installed_triton", lambda: "3.9.0")
    on_gpu((7, 5), "Tesla T4")
    assert triton_support("cuda") == (False, "the kernels need an NVIDIA GPU of compute capability 8.0 or newer; "
                                             "Tesla T4 has 7.5")


def test_support_on_the_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(runtime, "_installed_triton", lambda: "3.9.0")
    monkeypatch.setattr(runtime, "_interpreting", lambda: False)
    ok, reason = triton_support("cpu")
    assert not ok and "set TRITON_INTERPRET=1" in reason


@pytest.mark.parametrize("device", ["mps", "no such device"])
def test_support_never_raises(device):
    ok, reason = triton_support(device)
    assert not ok and reason and "\n" not in reason


def test_too_old_triton_is_named_in_one_line_at_first_use(monkeypatch):
    monkeypatch.setattr(runtime, "_installed_triton", lambda: "3.2.0")
    monkeypatch.delitem(sys.modules, "flashattn.triton.decode_kernels", raising=False)  # not yet loaded
    with pytest.raises(ImportError) as error:
        runtime.load_kernels("decode_kernels", "decode_attention")
    message = str(error.value)
    assert "\n" not in message and error.value.__cause__ is None
    assert f"found triton 3.2.0 with torch {torch.__version__}" in message
    assert "decode_attention needs triton 3.4 or newer on a GPU, 3.7 or newer in Triton's interpreter" in message


def test_old_interpreter_is_named_in_one_line(monkeypatch):
    monkeypatch.setattr(runtime, "triton_version", lambda: (3, 6))
    with pytest.raises(RuntimeError) as error:
        runtime.check_device("triton_attention", True, torch.device("cpu"))
    message = str(error.value)
    assert "\n" not in message
    assert f"triton 3.6 is installed (with torch {torch.__version__})" in message
    assert 'pip install "triton>=3.7"' in message


def test_without_triton_nothing_imports_it_and_nothing_raises_from_inside_it():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, flashattn\n"
        "from flashattn.triton.runtime import triton_support\n"
        "print(triton_support('cpu'))\n"
        "print(triton_support('cuda'))\n"
        "q = torch.randn(1, 1, 4, 16)\n"
        "try:\n"
        "    flashattn.triton_attention(q, q, q)\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
        "assert sys.modules['triton'] is None\n"
    )
    out = run_without_interpreter(code, timeout=120)
    assert out.returncode == 0, out.stderr
    cpu, cuda, error = out.stdout.splitlines()
    assert cpu.startswith("TritonSupport(ok=False, reason=") and "found no triton with torch" in cpu
    assert "found no triton with torch" in cuda or "compute capability" in cuda
    assert error.startswith("ImportError: triton_attention needs triton (triton 3.4 or newer on a GPU")


# ---------------------------------------------------------------------------------------------
# The interpreter's stand-ins for triton's helpers

_triton = runtime._installed_triton()
interpreter = pytest.mark.skipif(
    torch.cuda.is_available() or _triton is None or runtime._parse(_triton) < runtime.INTERPRETER_MIN_TRITON,
    reason="needs Triton's interpreter (triton 3.7 or newer) on a machine without a GPU",
)

LATE_INTERPRETER = (
    "import contextlib, os, sys, torch, flashattn\n"
    "import flashattn.triton.runtime as runtime\n"
    "assert 'triton' in sys.modules  # imported by torch, as in a notebook, before TRITON_INTERPRET is set\n"
    "if sys.argv[1] == 'unpatched':\n"
    "    runtime._interpretable_language = contextlib.nullcontext\n"
    "os.environ['TRITON_INTERPRET'] = '1'\n"
    "q = torch.randn(1, 1, 20, 16, generator=torch.Generator().manual_seed(0))\n"
    "o = flashattn.triton_attention(q, q, q, causal=True)\n"
    "ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)\n"
    "print((o - ref).abs().max().item())\n"
)


@interpreter
def test_interpreter_set_after_import_needs_the_stand_ins():
    """If this fails because the unpatched run succeeds, triton no longer needs the stand-ins: remove them."""
    runs = {
        how: run_without_interpreter(LATE_INTERPRETER, how)
        for how in ("patched", "unpatched")
    }
    assert runs["patched"].returncode == 0, runs["patched"].stderr
    assert float(runs["patched"].stdout) < 1e-5
    assert runs["unpatched"].returncode != 0, "triton runs the kernels without runtime._interpretable_language"
    assert "Cannot call @triton.jit'd outside of the scope of a kernel" in runs["unpatched"].stderr
