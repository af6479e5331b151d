"""scripts/emulate/sitecustomize.py, the T4 and A100 emulation of the GPU runner, on a CPU with a faked CUDA.

The emulation must answer the chapters and the package as the smaller GPU would (capability, name,
memory, bfloat16), yet tell Triton and torch.compile the real capability: a kernel they build for
sm75 or sm80 does not load on the runner's Hopper GPU ("no kernel image is available").
"""

from __future__ import annotations

import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

EMULATION = Path(__file__).resolve().parents[1] / "scripts" / "emulate" / "sitecustomize.py"
GIB = 2**30


@pytest.fixture
def fake_hopper(monkeypatch):
    """torch.cuda answering as one 80 GiB capability-9.0 GPU; every attribute the emulation replaces is restored."""
    real = SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, total_memory=80 * GIB,
                           multi_processor_count=132)
    fractions = []
    fakes = {
        "is_available": lambda: True,
        "get_device_properties": lambda device=None: real,
        "get_device_capability": lambda device=None: (9, 0),
        "get_device_name": lambda device=None: real.name,
        "is_bf16_supported": lambda including_emulation=True: True,
        "mem_get_info": lambda device=None: (70 * GIB, 80 * GIB),
        "memory_reserved": lambda device=None: 2 * GIB,
        "set_per_process_memory_fraction": lambda fraction, device=None: fractions.append(fraction),
        "get_per_process_memory_fraction": lambda device=None: 1.0,
    }
    for attr, fake in fakes.items():
        monkeypatch.setattr(torch.cuda, attr, fake)
    return fractions


def asked_from(module: str, expression: str):
    """The value of ``expression`` evaluated by code whose module is named ``module``."""
    return eval(expression, {"__name__": module, "torch": torch})


@pytest.mark.parametrize("gpu, capability, gib, bf16", [("t4", (7, 5), 15, False), ("a100", (8, 0), 40, True)])
def test_chapters_see_the_emulated_gpu_and_compilers_the_real_one(monkeypatch, fake_hopper, gpu, capability, gib,
                                                                  bf16):
    monkeypatch.setenv("FLASHATTN_EMULATE_GPU", gpu)
    runpy.run_path(str(EMULATION))
    assert fake_hopper == [gib / 80]  # the process may allocate the emulated GPU's memory, no more

    for reader in ("__main__", "flashattn.triton.launch", "torch.nn.attention"):
        assert asked_from(reader, "torch.cuda.get_device_capability()") == capability
        props = asked_from(reader, "torch.cuda.get_device_properties(0)")
        assert (props.major, props.minor, props.total_memory) == (*capability, gib * GIB)
        assert props.multi_processor_count == 132  # what the emulation does not change reads through
    assert "(emulated)" in torch.cuda.get_device_name()
    assert torch.cuda.is_bf16_supported() is bf16
    assert torch.cuda.mem_get_info() == ((gib - 2) * GIB, gib * GIB)  # the cap less what is reserved

    for compiler in ("triton.backends.nvidia.driver", "torch._inductor.utils", "torch._dynamo.device_interface"):
        assert asked_from(compiler, "torch.cuda.get_device_capability()") == (9, 0)
        props = asked_from(compiler, "torch.cuda.get_device_properties(0)")
        assert (props.major, props.minor) == (9, 0)


def test_strict_emulation_without_a_gpu_refuses(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("FLASHATTN_EMULATE_GPU", "t4")
    monkeypatch.setenv("FLASHATTN_EMULATE_STRICT", "1")
    with pytest.raises(RuntimeError, match="FLASHATTN_EMULATE_GPU=t4 needs a CUDA GPU"):
        runpy.run_path(str(EMULATION))
