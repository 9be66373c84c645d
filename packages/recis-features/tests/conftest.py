"""Shared fixtures and helpers for the recis-features tests."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch

from recis_kernels import RaggedTensor

# --emulate-kernels (every op through its CUDA kernel compiled as host C++) and _host_kernels.
from recis_kernels.testing.pytest_plugin import *  # noqa: F403

CUDA = torch.cuda.is_available()


@pytest.fixture(
    params=[
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")],
        ),
    ]
)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each test using it runs on the CPU and, where present, on the GPU."""
    return torch.device(request.param)


def assert_same(actual: object, expected: object) -> None:
    """Exact equality of values (dense, ragged, lists), NaN equal to NaN, dtypes included."""
    assert type(actual) is type(expected), (type(actual), type(expected))
    if isinstance(expected, RaggedTensor):
        assert isinstance(actual, RaggedTensor)
        assert len(actual.offsets) == len(expected.offsets)
        for a, e in zip(actual.offsets, expected.offsets, strict=True):
            assert_same(a, e)
        assert_same(actual.values, expected.values)
        assert (actual.weights is None) == (expected.weights is None)
        if expected.weights is not None:
            assert_same(actual.weights, expected.weights)
    elif isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor)
        assert actual.dtype == expected.dtype
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    else:
        assert actual == expected


def ragged(
    rows: list[list], dtype: torch.dtype = torch.int64, weights: bool = False
) -> RaggedTensor:
    """A one-level ragged tensor from Python rows (weights ``1, 2, 3, ...`` when asked)."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    values = torch.tensor([x for r in rows for x in r], dtype=dtype)
    w = torch.arange(1, values.shape[0] + 1, dtype=torch.float32) if weights else None
    return RaggedTensor(values, [offsets], w)


def rows_of(r: RaggedTensor) -> list[list]:
    """The Python rows of a one-level ragged tensor."""
    offsets = r.offsets[0].tolist()
    values = r.values.tolist()
    return [values[a:b] for a, b in itertools.pairwise(offsets)]


def random_sequences(
    rows: int, generator: torch.Generator, low: int = -(1 << 62), high: int = 1 << 62
) -> RaggedTensor:
    """``rows`` random int64 sequences of 0 to 89 values in ``[low, high)`` each: from 8000
    rows on, large enough a batch that its truncation copies in the background."""
    lengths = torch.randint(0, 90, (rows,), generator=generator)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    values = torch.randint(low, high, (int(offsets[-1]),), generator=generator)
    return RaggedTensor(values, [offsets])


@pytest.fixture
def torch_threads() -> Iterator[None]:
    """torch's intra-op thread count restored after the test, which may set its own."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
