"""Shared fixtures: the ``device`` fixture and hypothesis settings for every recis-kernels test."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from recis_kernels.testing import use_host_kernels  # noqa: F401 (tests import it from here)

# --emulate-kernels (every op through its CUDA kernel compiled as host C++) and _host_kernels.
from recis_kernels.testing.pytest_plugin import *  # noqa: F403

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


@pytest.fixture
def mod_defers(request: pytest.FixtureRequest) -> None:
    """Skips a test that counts deferred work under ``--emulate-kernels``: ``mod`` then runs
    through its emulated CUDA kernel, which defers nothing."""
    if request.config.getoption("--emulate-kernels"):
        pytest.skip("mod runs through its emulated kernel, which defers nothing")


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Keep compiled kernels of the test run out of the user's cache directory."""
    monkeypatch.setenv("RECIS_KERNELS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kcache"))


def ragged_from_rows(rows, weights=None, dtype=torch.int64):
    """A 2-level RaggedTensor from Python lists (weights: matching nested lists or None)."""
    from recis_kernels import RaggedTensor

    values = torch.tensor([v for r in rows for v in r], dtype=dtype)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    w = None
    if weights is not None:
        w = torch.tensor([x for r in weights for x in r], dtype=torch.float32)
    return RaggedTensor(values, offsets, w)


def ragged3_from_rows(rows, dtype=torch.int64):
    """A 3-level RaggedTensor from a list of lists of lists."""
    from recis_kernels import RaggedTensor

    subs = [s for r in rows for s in r]
    values = torch.tensor([v for s in subs for v in s], dtype=dtype)
    off0 = torch.zeros(len(rows) + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor([len(r) for r in rows], dtype=torch.int64), 0, out=off0[1:])
    off1 = torch.zeros(len(subs) + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor([len(s) for s in subs], dtype=torch.int64), 0, out=off1[1:])
    return RaggedTensor(values, [off0, off1])


def ragged_rows(r):
    """Python lists of a 2-level RaggedTensor's rows."""
    offs = r.offsets[0].tolist()
    values = r.values.tolist()
    return [values[offs[i] : offs[i + 1]] for i in range(len(offs) - 1)]


def ragged3_rows(r):
    """Python nested lists of a 3-level RaggedTensor."""
    o0, o1 = r.offsets[0].tolist(), r.offsets[1].tolist()
    values = r.values.tolist()
    return [
        [values[o1[s] : o1[s + 1]] for s in range(o0[b], o0[b + 1])] for b in range(len(o0) - 1)
    ]


def signed64(x: int) -> int:
    """The int64 with the bit pattern of the unsigned 64-bit ``x``."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x
