from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import recis_kernels as rk
from recis_kernels import RaggedTensor

rows_st = st.lists(st.lists(st.integers(-(1 << 63), (1 << 63) - 1), max_size=6), max_size=8)


def from_rows(rows: list[list[int]]) -> RaggedTensor:
    values = torch.tensor([v for r in rows for v in r], dtype=torch.int64)
    offsets = torch.tensor(np.cumsum([0, *[len(r) for r in rows]]), dtype=torch.int64)
    return RaggedTensor(values, offsets)


def test_basic_attributes():
    r = RaggedTensor(torch.tensor([10, 11, 12]), torch.tensor([0, 2, 2, 3]))
    assert len(r) == 3
    assert r.num_levels == 1
    assert isinstance(r.offsets, list)
    assert r.lengths().tolist() == [2, 0, 1]
    assert r[0].tolist() == [10, 11]
    assert r[-1].tolist() == [12]
    assert r[1].numel() == 0
    assert r.weights is None


def test_three_levels_and_indexing():
    r = RaggedTensor(
        torch.tensor([1, 2, 3, 4]),
        [torch.tensor([0, 2, 2, 3]), torch.tensor([0, 2, 3, 4])],
        weights=torch.tensor([0.5, 1.0, 2.0, 3.0]),
    )
    assert r.num_levels == 2
    assert r.lengths(0).tolist() == [2, 0, 1]
    assert r.lengths(1).tolist() == [2, 1, 1]
    row0 = r[0]
    assert isinstance(row0, RaggedTensor)
    assert row0.offsets[0].tolist() == [0, 2, 3]
    assert row0.values.tolist() == [1, 2, 3]
    tail = r[1:3]
    assert tail.offsets[0].tolist() == [0, 0, 1]
    assert tail.offsets[1].tolist() == [0, 1]
    assert tail.values.tolist() == [4]
    assert tail.weights.tolist() == [3.0]
    with pytest.raises(rk.RaggedError, match="level must be in"):
        r.lengths(2)


@given(rows=rows_st, a=st.integers(-10, 10), b=st.integers(-10, 10))
def test_slicing_matches_python(rows, a, b):
    r = from_rows(rows)
    sub = r[a:b]
    expected = rows[a:b]
    assert len(sub) == len(expected)
    assert [sub[i].tolist() for i in range(len(sub))] == expected
    sub.validate()


@pytest.mark.parametrize(
    ("offsets", "message"),
    [
        ([1, 2, 3], r"offsets\[0\] must start at 0, got 1"),
        ([0, 2, 1, 3], r"offsets\[0\] must be non-decreasing, got 2 then 1 at row 1"),
        ([0, 1, 2], r"offsets\[0\] must end at the number of values \(3\), got 2"),
        # The step from 10 down to -2**63 + 1 wraps around int64 to a positive difference.
        (
            [0, 10, -(2**63) + 1, -1, 3],
            r"offsets\[0\] must be non-decreasing, got 10 then -9223372036854775807 at row 1",
        ),
    ],
)
def test_validation_errors(offsets, message):
    with pytest.raises(rk.RaggedError, match=message):
        RaggedTensor(torch.tensor([1, 2, 3]), torch.tensor(offsets))
    with pytest.raises(ValueError, match=message):
        RaggedTensor(torch.tensor([1, 2, 3]), torch.tensor(offsets), validate=False).validate()


def test_inner_level_validation_error():
    with pytest.raises(
        rk.RaggedError, match=r"offsets\[0\] must end at the number of offsets\[1\] rows"
    ):
        RaggedTensor(torch.tensor([1, 2]), [torch.tensor([0, 3]), torch.tensor([0, 1, 2])])


@pytest.mark.parametrize(
    ("values", "dtype"),
    [
        (np.arange(3)[::-1], "int64"),
        (np.arange(3, dtype=">i8"), ">i8"),
        (np.array([1, 2, 3], dtype=object), "object"),
    ],
)
def test_numpy_arrays_torch_cannot_share_raise_a_ragged_error(values, dtype):
    with pytest.raises(
        rk.RaggedError, match=rf"ragged values is a NumPy array torch cannot share \(dtype {dtype}"
    ):
        RaggedTensor(values, np.array([0, 1, 3]))


def test_construction_errors():
    with pytest.raises(rk.RaggedError, match=r"offsets\[0\] must be int64, got torch.int32"):
        RaggedTensor(torch.tensor([1]), torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(rk.RaggedError, match="weights must be float32"):
        RaggedTensor(
            torch.tensor([1]), torch.tensor([0, 1]), torch.tensor([1.0], dtype=torch.float64)
        )
    with pytest.raises(rk.RaggedError, match=r"weights must have shape \(1,\)"):
        RaggedTensor(torch.tensor([1]), torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    with pytest.raises(rk.RaggedError, match="at least one level"):
        RaggedTensor(torch.tensor([1]), [])
    with pytest.raises(rk.RaggedError, match="step 1 only"):
        RaggedTensor(torch.tensor([1]), torch.tensor([0, 1]))[::2]


class Column:
    def __init__(self, values, offsets):
        self.values = values
        self.offsets = offsets


def test_from_column_shares_memory():
    values = torch.tensor([5, 6, 7])
    offsets = torch.tensor([0, 1, 3])
    r = RaggedTensor.from_column(Column(values, offsets))
    assert r.values.data_ptr() == values.data_ptr()
    assert r.offsets[0].data_ptr() == offsets.data_ptr()
    np_values = np.array([1, 2], dtype=np.int64)
    r2 = RaggedTensor.from_column(Column(np_values, [np.array([0, 2], dtype=np.int64)]))
    np_values[0] = 42
    assert r2.values.tolist() == [42, 2]
    with pytest.raises(rk.RaggedError, match=r"needs an object with .values and .offsets"):
        RaggedTensor.from_column(object())


def test_with_values_and_to(device):
    r = RaggedTensor(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 3]))
    w = r.with_values(torch.tensor([1.0, 2.0, 3.0]), torch.ones(3))
    assert w.offsets[0] is r.offsets[0]
    assert w.weights.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(rk.RaggedError, match="with_values needs 3 values"):
        r.with_values(torch.tensor([1]))
    moved = w.to(device)
    assert moved.values.device.type == device.type
    assert moved.offsets[0].device.type == device.type
    assert moved.to("cpu").values.tolist() == [1.0, 2.0, 3.0]
    # A dtype is not a device: the offsets' dtype was blamed ("offsets[0] must be int64").
    with pytest.raises(rk.RaggedError, match=r"to\(\) moves to a device, got the dtype"):
        r.to(torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs a CUDA device")
def test_pin_memory():
    r = RaggedTensor(torch.tensor([1, 2]), torch.tensor([0, 2])).pin_memory()
    assert r.values.is_pinned()
    assert r.offsets[0].is_pinned()


@pytest.mark.parametrize("where", ["offsets", "inner offsets", "weights"])
@pytest.mark.parametrize("validate", [None, False])
def test_parts_on_another_device_than_values_are_refused(where: str, validate) -> None:
    # "meta" stands for another device: CUDA kernels would take host offsets as device
    # addresses; validation used to fail in Tensor.item() and weights were kept as given.
    meta = torch.device("meta")
    outer, inner = torch.tensor([0, 1, 2]), torch.tensor([0, 2, 3])
    weights = torch.ones(3)
    if where == "offsets":
        outer = outer.to(meta)
    elif where == "inner offsets":
        inner = inner.to(meta)
    else:
        weights = weights.to(meta)
    name = {"offsets": r"offsets\[0\]", "inner offsets": r"offsets\[1\]", "weights": "weights"}
    with pytest.raises(
        rk.RaggedError, match=rf"ragged {name[where]} is on meta but values are on cpu"
    ):
        RaggedTensor(torch.arange(3), [outer, inner], weights, validate=validate)
    r = RaggedTensor(torch.arange(3), [torch.tensor([0, 1, 2]), torch.tensor([0, 2, 3])])
    with pytest.raises(rk.RaggedError, match="values are on meta"):
        r.with_values(torch.arange(3, device=meta))


def test_bool_row_index_and_level_are_refused() -> None:
    r = from_rows([[1, 2], [3]])
    with pytest.raises(rk.RaggedError, match="indexed by int or slice, got bool"):
        r[True]
    with pytest.raises(rk.RaggedError, match="level must be in"):
        r.lengths(False)
    assert r[np.int64(1)].tolist() == [3]
    assert r.lengths(np.int64(0)).tolist() == [2, 1]


@pytest.mark.parametrize("max_len", [True, 2.0, "2", (2.5,), (None, False)])
def test_to_dense_refuses_max_len_that_is_not_an_int(max_len) -> None:
    r = RaggedTensor(torch.arange(4), [torch.tensor([0, 2, 3]), torch.tensor([0, 2, 3, 4])])
    with pytest.raises(rk.RaggedError, match="to_dense: max_len must"):
        r.to_dense(max_len=max_len)
    assert r.to_dense(max_len=(None, 1)).tolist() == [[[0], [2]], [[3], [0]]]


def test_ragged_to_dense_refuses_shape_entries_that_are_not_ints() -> None:
    r = from_rows([[1, 2], [3]])
    for bad in (1.5, True):
        with pytest.raises(rk.RaggedError, match="shape entries must be ints or None"):
            rk.ragged_to_dense(r, shape=[None, bad])


def test_clone_detach_and_equal() -> None:
    values = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    r = RaggedTensor(values * 2, [torch.tensor([0, 2, 2, 3])], torch.tensor([0.5, 1.0, 2.0]))
    copy = r.clone()
    assert copy.equal(r)
    assert r.equal(copy)
    assert copy.values.data_ptr() != r.values.data_ptr()
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(copy.offsets, r.offsets, strict=True))
    assert copy.weights.data_ptr() != r.weights.data_ptr()
    assert copy.values.requires_grad  # clone keeps the autograd history, as torch's does
    copy.offsets[0][1] = 1  # a change to the copy leaves the original alone
    assert not copy.equal(r)
    assert int(r.offsets[0][1]) == 2
    detached = r.detach()
    assert not detached.values.requires_grad
    assert detached.equal(r)
    assert detached.values.data_ptr() == r.values.data_ptr()
    # Same values, other rows / weights / dtype / levels: not equal.
    assert not r.equal(RaggedTensor(r.values, [torch.tensor([0, 1, 2, 3])], r.weights))
    assert not r.equal(RaggedTensor(r.values, r.offsets))
    assert not r.equal(RaggedTensor(r.values.double(), r.offsets, r.weights))
    assert not r.equal(RaggedTensor(r.values, [torch.tensor([0, 3]), r.offsets[0]], r.weights))
    assert not r.equal(r.values)
    nan = RaggedTensor(torch.tensor([float("nan")]), torch.tensor([0, 1]))
    assert not nan.equal(nan.clone())  # as torch.equal
