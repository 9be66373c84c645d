"""Shared fixtures and hypothesis settings for the recis-embedding tests."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

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


# -- optional host emulation of the CUDA kernels -------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--emulate-kernels",
        action="store_true",
        help="send every recis-kernels op through its CUDA kernel compiled as host C++ "
        "(recis_kernels.testing) on CPU tensors",
    )


@pytest.fixture(scope="session")
def _host_kernels(tmp_path_factory: pytest.TempPathFactory):
    from recis_kernels.testing import HostKernels

    return HostKernels(tmp_path_factory.mktemp("host-kernels"))


@pytest.fixture(autouse=True)
def _emulate_kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.config.getoption("--emulate-kernels"):
        from recis_kernels.testing import use_host_kernels

        use_host_kernels(request.getfixturevalue("_host_kernels"), monkeypatch)
