from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from recis_kernels import (
    ArgumentError,
    ShapeError,
    UnsupportedDeviceError,
    UnsupportedDtypeError,
    unique,
    unique_pairs,
)
from recis_kernels.ops import unique as unique_module

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


def _expected_pairs(values: list[int], tables: list[int]):
    """Distinct pairs in order of first occurrence, each position's group, each group's
    positions: the definition, one pair at a time."""
    groups: dict[tuple[int, int], int] = {}
    inverse = [groups.setdefault(p, len(groups)) for p in zip(values, tables, strict=True)]
    members: list[list[int]] = [[] for _ in groups]
    for i, g in enumerate(inverse):
        members[g].append(i)
    return list(groups), inverse, members


@given(
    st.lists(
        st.tuples(st.one_of(INT64, EXTREMES, st.integers(-3, 3)), st.integers(0, 3)),
        max_size=300,
    )
)
def test_unique_pairs_matches_python(pairs: list[tuple[int, int]]) -> None:
    values = [v for v, _ in pairs]
    tables = [t for _, t in pairs]
    ids = torch.tensor(values, dtype=torch.int64)
    tabs = torch.tensor(tables, dtype=torch.int32)
    firsts, inverse, members = _expected_pairs(values, tables)
    # The compiled CPU path and the torch path of other devices give one result.
    for positions in (True, False):
        for got in (
            unique_pairs(ids, tabs, positions=positions),
            unique_module._unique_pairs_torch(ids, tabs, positions),
        ):
            assert list(zip(got.ids.tolist(), got.tables.tolist(), strict=True)) == firsts
            assert got.tables.dtype == torch.int32
            assert got.inverse.tolist() == inverse
            if not positions:
                assert got.order is None
                assert got.offsets is None
                continue
            offsets = got.offsets.tolist()
            assert offsets[0] == 0
            assert len(offsets) == len(firsts) + 1
            assert [got.order[a:b].tolist() for a, b in itertools.pairwise(offsets)] == members


def test_unique_pairs_keeps_pairs_with_equal_premix_values_apart() -> None:
    # id + table * 0x9E3779B97F4A7C15 is one value for (golden, 0) and (0, 1): one home slot
    # in the set, two pairs; many more pairs than the set starts with make it grow.
    golden = -7046029254386353131
    ids = torch.tensor([golden, 0, golden, 0, *list(range(5000))], dtype=torch.int64)
    tabs = torch.tensor([0, 1, 0, 1] + [2] * 5000, dtype=torch.int32)
    got = unique_pairs(ids, tabs)
    assert got.ids[:2].tolist() == [golden, 0]
    assert got.tables[:2].tolist() == [0, 1]
    assert got.inverse[:4].tolist() == [0, 1, 0, 1]
    assert got.ids.numel() == 5002
    assert torch.equal(got.ids[got.inverse], ids)


def test_unique_pairs_takes_int64_tables_in_range_only() -> None:
    ids = torch.tensor([4, 4, 9])
    got = unique_pairs(ids, torch.tensor([1, 1, 2**31 - 1]))
    assert got.tables.tolist() == [1, 2**31 - 1]
    for bad in (-1, 2**31):
        with pytest.raises(ArgumentError, match=f"tables must be in .*got {bad}"):
            unique_pairs(ids, torch.tensor([1, bad, 0]))
    with pytest.raises(ArgumentError, match=r"tables must be in .*got -1"):
        unique_pairs(ids, torch.tensor([1, -1, 0], dtype=torch.int32))


def test_unique_pairs_on_device(device: torch.device) -> None:
    got = unique_pairs(
        torch.tensor([5, -(1 << 63), 5, 5], device=device),
        torch.tensor([0, 0, 1, 0], device=device),
    )
    assert got.ids.tolist() == [5, -(1 << 63), 5]
    assert got.inverse.tolist() == [0, 1, 2, 0]
    assert got.order.tolist() == [0, 3, 1, 2]
    assert got.offsets.tolist() == [0, 2, 3, 4]


def test_unique_pairs_rejects_bad_input() -> None:
    ids = torch.tensor([1, 2])
    with pytest.raises(UnsupportedDtypeError, match="unique_pairs: ids"):
        unique_pairs(ids.int(), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(UnsupportedDtypeError, match="unique_pairs: tables"):
        unique_pairs(ids, torch.zeros(2))
    with pytest.raises(ShapeError, match="tables has shape"):
        unique_pairs(ids, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ShapeError, match="ids must be 1-d"):
        unique_pairs(ids.view(1, 2), torch.zeros((1, 2), dtype=torch.int32))
    with pytest.raises(UnsupportedDeviceError, match="one device"):
        unique_pairs(ids, torch.zeros(2, dtype=torch.int32, device="meta"))


def test_unique_pairs_gives_the_same_groups_after_larger_and_smaller_calls() -> None:
    """The hash set is kept between calls on a thread and sized from the last one: calls of
    very different sizes, one after another, must not see each other's pairs."""
    g = torch.Generator().manual_seed(11)
    big = torch.randint(-(2**62), 2**62, (60_000,), generator=g)
    small = torch.tensor([5, 5, -3])
    for ids in (big, small, big[:100], big, small):
        tabs = (ids & 3).to(torch.int32)
        got = unique_pairs(ids, tabs)
        want = unique_module._unique_pairs_torch(ids, tabs)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
