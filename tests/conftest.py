import os

import torch
from hypothesis import HealthCheck, settings

# Without a GPU, the Triton kernels run in Triton's interpreter. It must be on before the kernels are
# defined, that is before flashattn.triton.kernels is imported (on the first call of triton_attention).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Deterministic by default, so that CI is reproducible; HYPOTHESIS_PROFILE=explore searches wider.
settings.register_profile(
    "ci", max_examples=100, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("explore", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
