from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from recis_kernels import (
    ArgumentError,
    ShapeError,
    UnsupportedDtypeError,
    interleave_bags,
)
from recis_kernels.ops import interleave as interleave_module

# A member: None for one id per row, else each row's length; and whether it has scales.
MEMBER = st.tuples(st.one_of(st.none(), st.lists(st.integers(0, 4))), st.booleans())


def _members(spec, rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    values, offsets, scales = [], [], []
    for lengths, scaled in spec:
        if lengths is None:
            values.append(torch.randint(-100, 100, (rows,), generator=g))
            offsets.append(None)
        else:
            lens = ((lengths or [0]) * (rows + 1))[:rows]
            # Offsets from a nonzero start into a longer buffer: rows need not begin at item 0.
            o = torch.tensor([0, *lens], dtype=torch.int64).cumsum(0) + 2
            values.append(torch.randint(-100, 100, (int(o[-1]) + 1,), generator=g))
            offsets.append(o)
        scales.append(torch.rand(rows, generator=g) if scaled else None)
    return values, offsets, scales


@given(st.lists(MEMBER, min_size=1, max_size=5), st.integers(0, 9), st.integers(0, 99))
def test_interleave_matches_python(spec, rows: int, seed: int) -> None:
    values, offsets, scales = _members(spec, rows, seed)
    labels = [3 * k + 1 for k in range(len(spec))]
    expected_values, expected_labels, expected_weights, bags = [], [], [], [0]
    for r in range(rows):
        for v, o, s, label in zip(values, offsets, scales, labels, strict=True):
            items = [int(v[r])] if o is None else v[int(o[r]) : int(o[r + 1])].tolist()
            expected_values += items
            expected_labels += [label] * len(items)
            expected_weights += [1.0 if s is None else float(s[r])] * len(items)
            bags.append(len(expected_values))
    for got in (
        interleave_bags(values, offsets, labels, scales),
        interleave_module._interleave_torch(values, offsets, labels, scales, rows, True),
    ):
        assert got.values.tolist() == expected_values
        assert got.labels.tolist() == expected_labels
        assert got.labels.dtype == torch.int32
        assert got.bags.tolist() == bags
        assert got.weights is not None
        assert got.weights.tolist() == pytest.approx(expected_weights)
    assert interleave_bags(values, offsets, labels).weights is None


def test_interleave_names_bad_members() -> None:
    ids = torch.arange(3)
    with pytest.raises(ShapeError, match=r"member 1: row 1 spans items 2\.\.1 of 3"):
        interleave_bags([ids, ids], [None, torch.tensor([0, 2, 1, 3])], [0, 1])
    with pytest.raises(ShapeError, match=r"member 0: row 2 spans items 2\.\.4 of 3"):
        interleave_bags([ids], [torch.tensor([0, 1, 2, 4])], [0])
    with pytest.raises(ArgumentError, match="member 1 has 2 rows, member 0 has 3"):
        interleave_bags([ids, ids[:2]], [None, None], [0, 1])
    with pytest.raises(ShapeError, match=r"scales\[0\] has 2 values for 3 rows"):
        interleave_bags([ids], [None], [0], [torch.ones(2)])
    with pytest.raises(ArgumentError, match="outside int32"):
        interleave_bags([ids], [None], [2**31])
    with pytest.raises(ArgumentError, match=r"labels\[0\] is 1\.7, expected an int"):
        interleave_bags([ids], [None], [1.7])
    with pytest.raises(ShapeError, match=r"offsets\[1\] is empty, expected R \+ 1 >= 1"):
        interleave_bags([ids[:0], ids[:0]], [None, torch.zeros(0, dtype=torch.int64)], [0, 1])
    with pytest.raises(ArgumentError, match="same members"):
        interleave_bags([ids], [None, None], [0])
    with pytest.raises(UnsupportedDtypeError, match=r"offsets\[0\]"):
        interleave_bags([ids], [torch.tensor([0, 1, 2, 3], dtype=torch.int32)], [0])
    with pytest.raises(UnsupportedDtypeError, match=r"scales\[0\]"):
        interleave_bags([ids], [None], [0], [torch.ones(3, dtype=torch.float64)])
