"""Make a large NVIDIA GPU look like a smaller one to every Python started with this folder on PYTHONPATH.

    FLASHATTN_EMULATE_GPU=t4    capability 7.5, 15 GiB, no bfloat16 (Colab's T4)
    FLASHATTN_EMULATE_GPU=a100  capability 8.0, 40 GiB (Colab's A100)

What a chapter asks of the GPU through torch.cuda (capability, name, bfloat16 support, memory)
answers as the emulated GPU would, and the memory a process may allocate is capped at the
emulated size, so that a chapter that would run out of memory there runs out here. The kernels
themselves still compile for the real GPU: Triton and torch.compile (callers from the modules
``triton``, ``torch._inductor`` and ``torch._dynamo``) are told the real capability, for a kernel
built for sm75 or sm80 does not load on a Hopper GPU. So this checks what the chapters and the package
decide from the GPU they see, and their memory, not the smaller GPU's instructions or speed.
Used by scripts/emulated_gpu_run.sh on the GPU runner.
"""

import os
import sys

_GPUS = {  # name, capability, memory in GiB, bfloat16
    "t4": ("Tesla T4", (7, 5), 15, False),
    "a100": ("NVIDIA A100-SXM4-40GB", (8, 0), 40, True),
}
_COMPILERS = ("triton.", "torch._inductor.", "torch._dynamo.")
_which = os.environ.get("FLASHATTN_EMULATE_GPU", "").lower()

if _which in _GPUS:
    import torch

    _name, _capability, _gib, _bf16 = _GPUS[_which]
    if torch.cuda.is_available():
        _cap_bytes = _gib * 2**30
        _real_total = torch.cuda.mem_get_info(0)[1]
        torch.cuda.set_per_process_memory_fraction(min(1.0, _cap_bytes / _real_total), 0)
        _real_mem_get_info = torch.cuda.mem_get_info

        def _mem_get_info(device=None):
            free, _ = _real_mem_get_info(device)
            return min(free, max(_cap_bytes - torch.cuda.memory_reserved(device), 0)), _cap_bytes

        _real_properties = torch.cuda.get_device_properties

        class _Properties:
            # the real GPU's properties, but for those the emulated GPU answers differently
            def __init__(self, real):
                self._real = real
                self.name, self.total_memory = f"{_name} (emulated)", _cap_bytes
                self.major, self.minor = _capability

            def __getattr__(self, attr):
                return getattr(self._real, attr)

        def _asked_by_compiler() -> bool:
            # the caller of the patched function below: a compiler must build for the real GPU
            return sys._getframe(2).f_globals.get("__name__", "").startswith(_COMPILERS)

        def _get_device_properties(device=None):
            real = _real_properties(device)
            return real if _asked_by_compiler() else _Properties(real)

        def _get_device_capability(device=None):
            if _asked_by_compiler():
                real = _real_properties(device)
                return real.major, real.minor
            return _capability

        torch.cuda.get_device_properties = _get_device_properties
        torch.cuda.get_device_capability = _get_device_capability
        torch.cuda.get_device_name = lambda device=None: f"{_name} (emulated)"
        torch.cuda.is_bf16_supported = lambda including_emulation=True: _bf16
        torch.cuda.mem_get_info = _mem_get_info
        torch.cuda.get_per_process_memory_fraction = lambda device=None: 1.0  # the total above is the cap
    elif os.environ.get("FLASHATTN_EMULATE_STRICT") == "1":
        raise RuntimeError(f"FLASHATTN_EMULATE_GPU={_which} needs a CUDA GPU to emulate on")
