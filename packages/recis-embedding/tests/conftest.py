"""Shared fixtures and hypothesis settings for the recis-embedding tests."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# --emulate-kernels (every op through its CUDA kernel compiled as host C++) and _host_kernels.
from recis_kernels.testing.pytest_plugin import *  # noqa: F403

settings.register_profile(
    "recis",
    max_examples=int(os.environ.get("RECIS_HYPOTHESIS_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("recis")

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
EXTREME_IDS = [0, -1, 1, INT64_MIN, INT64_MAX, 1 << 62, (1 << 62) | 1]


@pytest.fixture(
    params=[
        pytest.param("cpu", id="cpu"),
        pytest.param(
            "cuda",
            id="cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
            ],
        ),
    ]
)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Tests that take it run on the CPU, and on CUDA when a GPU is present."""
    return torch.device(request.param)
