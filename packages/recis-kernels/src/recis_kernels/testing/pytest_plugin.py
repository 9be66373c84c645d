"""pytest hooks and fixtures for ``--emulate-kernels``; a test suite's ``conftest.py`` takes
them with ``from recis_kernels.testing.pytest_plugin import *``.

- ``--emulate-kernels``: every test runs with the ops of :data:`EMULATED_KERNELS` sent through
  their kernels compiled as host C++ (see :mod:`recis_kernels.testing`).
- ``_host_kernels``: the session's :class:`HostKernels`, for tests that send chosen ops through
  their kernels in every run (``use_host_kernels(request.getfixturevalue("_host_kernels"),
  monkeypatch, ("hash_table",))``).
"""

from __future__ import annotations

import pytest

from recis_kernels.testing import HostKernels, use_host_kernels

__all__ = ["_emulate_kernels", "_host_kernels", "pytest_addoption"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--emulate-kernels",
        action="store_true",
        help="send every recis-kernels op with a grid-stride CUDA kernel through that kernel, "
        "compiled as host C++ ($CXX, default g++), on CPU tensors",
    )


@pytest.fixture(scope="session")
def _host_kernels(tmp_path_factory: pytest.TempPathFactory) -> HostKernels:
    return HostKernels(tmp_path_factory.mktemp("host-kernels"))


@pytest.fixture(autouse=True)
def _emulate_kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.config.getoption("--emulate-kernels"):
        use_host_kernels(request.getfixturevalue("_host_kernels"), monkeypatch)
