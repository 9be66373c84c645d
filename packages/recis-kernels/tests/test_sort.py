from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import EXTREME_IDS

import recis_kernels as rk


class _Sub(torch.Tensor):
    """A tensor subclass: ops on it take their torch path."""


def _values(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-(1 << 63), (1 << 63) - 1, (n,), generator=g, dtype=torch.int64)
    x[: min(n, len(EXTREME_IDS))] = torch.tensor(EXTREME_IDS[: min(n, len(EXTREME_IDS))])
    return x


def _stable_by_high_bits(x: torch.Tensor, low_bits: int) -> list[int]:
    return sorted(x.tolist(), key=lambda v: v >> low_bits)  # Python's sort is stable


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("low_bits", [0, 1, 11, 18, 40, 63])
def test_sorts_stably_by_the_high_bits(path: str, low_bits: int) -> None:
    for n in (0, 1, 2, 1000, 70_000):
        x = _values(n, n + low_bits)
        if n > 2:
            x[: n // 2] = x[: n // 2] >> 54 << 54 | (x[: n // 2] & 255)  # many ties
        want = _stable_by_high_bits(x, low_bits)
        y = x.clone() if path == "kernel" else x.clone().as_subclass(_Sub)
        assert rk.sort_by_high_bits_(y, low_bits) is y
        assert y.tolist() == want


def test_positions_in_the_low_bits_give_the_ascending_order() -> None:
    bits = 18
    x = (_values(200_000, 1) & -(1 << bits)) | torch.arange(200_000)
    x[::3] = x[::7].repeat(3)[: x[::3].numel()] & -(1 << bits) | torch.arange(0, 200_000, 3)
    got = rk.sort_by_high_bits_(x.clone(), bits)
    np.testing.assert_array_equal(got.numpy(), np.sort(x.numpy()))


def test_sort_arguments_are_checked() -> None:
    x = torch.arange(6)
    with pytest.raises(rk.ArgumentError, match="low_bits must be an int from 0 to 63, got 64"):
        rk.sort_by_high_bits_(x, 64)
    with pytest.raises(rk.ArgumentError, match="x must be contiguous"):
        rk.sort_by_high_bits_(x[::2])
    with pytest.raises(rk.UnsupportedDtypeError, match="x has dtype int32, expected int64"):
        rk.sort_by_high_bits_(x.int())
    with pytest.raises(rk.ShapeError, match=r"x must be 1-d, got shape \(2, 3\)"):
        rk.sort_by_high_bits_(x.view(2, 3))
