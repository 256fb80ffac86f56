"""Test setup. Hypothesis profiles: ``ci`` (default, fast) and ``thorough`` (>= 1,000 examples per property).

Select with ``HYPOTHESIS_PROFILE=thorough pytest``.
"""

import os

import torch
from hypothesis import HealthCheck, settings

# Without a GPU the Triton kernels run on the CPU through Triton's interpreter. Set before any
# kernel is defined (the package imports Triton lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
