"""Shared fixtures: the ``device`` fixture and hypothesis settings for every recis-kernels test."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "recis",
    max_examples=int(os.environ.get("RECIS_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("recis")

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
EXTREME_IDS = [0, -1, 1, INT64_MIN, INT64_MAX, INT64_MIN + 1, INT64_MAX - 1]

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(
    params=[
        pytest.param("cpu", id="cpu"),
        pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, requires_cuda]),
    ]
)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Every op test runs on the CPU, and on CUDA when a GPU is present."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Keep compiled kernels of the test run out of the user's cache directory."""
    monkeypatch.setenv("RECIS_KERNELS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kcache"))
