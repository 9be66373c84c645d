from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from recis_kernels import ShapeError, UnsupportedDtypeError, unique

INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
EXTREMES = st.sampled_from([0, -1, 1, -(1 << 63), (1 << 63) - 1])


@given(st.lists(st.one_of(INT64, EXTREMES, st.integers(-3, 3)), max_size=200))
def test_unique_matches_python(values: list[int]) -> None:
    ids = torch.tensor(values, dtype=torch.int64)
    u, inverse, counts = unique(ids)
    expected = sorted(set(values))
    assert u.tolist() == expected
    assert u[inverse].tolist() == values
    assert counts.tolist() == [values.count(v) for v in expected]


def test_unique_on_device(device: torch.device) -> None:
    ids = torch.tensor([5, -(1 << 63), 5, 0], device=device)
    u, inverse, counts = unique(ids)
    assert u.tolist() == [-(1 << 63), 0, 5]
    assert inverse.tolist() == [2, 0, 2, 1]
    assert counts.tolist() == [1, 1, 2]


def test_unique_rejects_bad_input() -> None:
    with pytest.raises(UnsupportedDtypeError, match="unique: ids has dtype int32"):
        unique(torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ShapeError, match="unique: ids must be 1-d"):
        unique(torch.zeros(2, 2, dtype=torch.int64))


def test_unique_op_registration() -> None:
    from recis_kernels.ops.unique import _unique_op

    torch.library.opcheck(_unique_op, (torch.tensor([3, -1, 3, 0]),))
