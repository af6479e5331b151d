import os

from hypothesis import HealthCheck, settings

# Deterministic by default, so that CI is reproducible; HYPOTHESIS_PROFILE=explore searches wider.
settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("explore", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
