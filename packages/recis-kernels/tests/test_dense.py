from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    ragged3_from_rows,
    ragged3_rows,
    ragged_from_rows,
    ragged_rows,
    use_host_kernels,
)
from hypothesis import given
from hypothesis import strategies as st

import recis_kernels as rk

rows_st = st.lists(st.lists(st.integers(1, 100), max_size=6), max_size=6)
rows3_st = st.lists(st.lists(st.lists(st.integers(1, 100), max_size=3), max_size=4), max_size=4)


def pad(row, n, value):
    return (list(row) + [value] * n)[:n]


@given(rows=rows_st, max_len=st.one_of(st.none(), st.integers(0, 7)))
def test_to_dense2_matches_reference(rows, max_len):
    r = ragged_from_rows(rows)
    dense = rk.ragged_to_dense(
        r, pad_value=-1, shape=None if max_len is None else [len(rows), max_len]
    )
    width = max_len if max_len is not None else max((len(x) for x in rows), default=0)
    assert dense.shape == (len(rows), width)
    assert dense.tolist() == [pad(x, width, -1) for x in rows]


@given(rows=rows3_st)
def test_to_dense3_matches_reference(rows):
    r = ragged3_from_rows(rows)
    dense = r.to_dense(pad_value=0)
    s = max((len(x) for x in rows), default=0)
    sub = max((len(y) for x in rows for y in x), default=0)
    expected = [[pad(y, sub, 0) for y in x] + [[0] * sub] * (s - len(x)) for x in rows]
    assert dense.tolist() == expected
    back = rk.dense_to_ragged(dense, pad_value=0)
    # Values never equal the padding, so stripping trailing padding recovers the rows up to
    # trailing empty sub-rows.
    assert ragged3_rows(back) == [_strip_empty(x) for x in rows]


def _strip_empty(subs):
    subs = list(subs)
    while subs and not subs[-1]:
        subs.pop()
    return subs


@given(rows=rows_st)
def test_dense_roundtrip2(rows):
    r = ragged_from_rows(rows)
    dense = r.to_dense(pad_value=0)
    back = rk.RaggedTensor.from_dense(dense, pad_value=0)
    assert ragged_rows(back) == rows
    back2 = rk.dense_to_ragged(dense, lengths=r.lengths())
    assert ragged_rows(back2) == rows


def test_dense_extras():
    r = rk.RaggedTensor(torch.arange(6.0).view(3, 2), torch.tensor([0, 1, 3]))
    assert r.to_dense().tolist() == [[[0, 1], [0, 0]], [[2, 3], [4, 5]]]
    r3 = ragged3_from_rows([[[1, 2, 3], [4]], [[5]]])
    assert r3.to_dense(max_len=(1, 2)).tolist() == [[[1, 2]], [[5, 0]]]
    full = rk.dense_to_ragged(torch.ones(2, 3, 4))
    assert full.lengths(0).tolist() == [3, 3]
    assert full.values.numel() == 24
    explicit = rk.dense_to_ragged(
        torch.arange(8).view(2, 2, 2),
        lengths=[torch.tensor([1, 2]), torch.tensor([[2, 0], [1, 2]])],
    )
    assert ragged3_rows(explicit) == [[[0, 1]], [[4], [6, 7]]]
    # Inner padding is kept, only trailing padding is stripped.
    assert ragged_rows(rk.dense_to_ragged(torch.tensor([[0, 5, 0, 0]]), pad_value=0)) == [[0, 5]]


def test_dense_errors():
    r = ragged_from_rows([[1]])
    with pytest.raises(rk.RaggedError, match="shape must have 2 entries for 2 levels, got 3"):
        rk.ragged_to_dense(r, shape=[1, 2, 3])
    with pytest.raises(rk.RaggedError, match="shape\\[0\\] is 4 but the ragged tensor has 1 rows"):
        rk.ragged_to_dense(r, shape=[4, 2])
    with pytest.raises(
        rk.ShapeError, match="dense must be 2-d \\(B, L\\) or 3-d \\(B, S, L\\), got shape \\(3,\\)"
    ):
        rk.dense_to_ragged(torch.zeros(3))
    with pytest.raises(
        rk.RaggedError, match="lengths\\[0\\] must lie in \\[0, 2\\], got values in \\[0, 3\\]"
    ):
        rk.dense_to_ragged(torch.zeros(2, 2), lengths=torch.tensor([0, 3]))
    with pytest.raises(rk.ShapeError, match="3-d dense needs 2 lengths tensors, got 1"):
        rk.dense_to_ragged(torch.zeros(2, 2, 2), lengths=torch.tensor([0, 1]))


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.float32, torch.float16, torch.uint8, torch.float64]
)
def test_to_dense_device_matches_cpu(device, dtype):
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 9, (200,), generator=g)
    values = torch.randint(0, 100, (int(lengths.sum()), 3), generator=g).to(dtype)
    r = rk.RaggedTensor(values, torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]))
    r3 = ragged3_from_rows([[[1, 2], [3]], [], [[4, 5, 6]]])
    for rr, shape in ((r, None), (r, [200, 4]), (r3, None), (r3, [3, 1, 2])):
        cpu = rk.ragged_to_dense(rr, pad_value=7, shape=shape)
        dev = rk.ragged_to_dense(rr.to(device), pad_value=7, shape=shape)
        assert torch.equal(cpu, dev.cpu())


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.float16, torch.uint8])
def test_from_dense_device_matches_cpu(device, dtype):
    g = torch.Generator().manual_seed(4)
    dense2 = torch.randint(0, 3, (300, 9), generator=g).to(dtype)
    dense3 = torch.randint(0, 3, (50, 4, 6), generator=g).to(dtype)
    for dense in (dense2, dense3):
        cpu = rk.dense_to_ragged(dense, pad_value=0)
        dev = rk.dense_to_ragged(dense.to(device), pad_value=0)
        assert torch.equal(cpu.values, dev.values.cpu())
        assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu.offsets, dev.offsets, strict=True))


def test_dense_to_ragged_gradient_and_opcheck():
    dense2 = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    lengths = torch.tensor([2, 0, 4])
    torch.autograd.gradcheck(lambda d: rk.dense_to_ragged(d, lengths=lengths).values, (dense2,))
    dense3 = torch.randn(2, 3, 2, dtype=torch.double, requires_grad=True)
    lens3 = [torch.tensor([2, 1]), torch.tensor([[1, 2, 0], [2, 0, 0]])]
    torch.autograd.gradcheck(lambda d: rk.dense_to_ragged(d, lengths=lens3).values, (dense3,))
    offsets = [torch.tensor([0, 2, 2, 6])]
    torch.library.opcheck(torch.ops.recis.dense_to_ragged_values, (torch.randn(3, 4), offsets))


def test_dense_to_ragged_strips_a_nan_pad():
    # NaN != NaN: a NaN pad used to strip nothing.
    nan = float("nan")
    d = torch.tensor([[1.0, nan], [nan, nan], [nan, 2.0]])
    r = rk.dense_to_ragged(d, pad_value=nan)
    assert r.offsets[0].tolist() == [0, 1, 1, 3]
    assert torch.equal(r.values[:1], torch.tensor([1.0]))
    assert r.values[1].isnan()  # inner NaN padding is kept
    assert r.values[2] == 2.0
    d3 = torch.tensor([[[1.0, nan], [nan, nan]], [[nan, nan], [nan, nan]]])
    r3 = rk.dense_to_ragged(d3, pad_value=nan)
    assert [o.tolist() for o in r3.offsets] == [[0, 1, 1], [0, 1]]
    # An integer tensor holds no NaN: nothing is stripped.
    ri = rk.dense_to_ragged(torch.tensor([[1, 0]]), pad_value=nan)
    assert ri.offsets[0].tolist() == [0, 2]
    # A NumPy NaN too, not only a Python float's (it stripped nothing).
    assert rk.dense_to_ragged(d, pad_value=np.float32(nan)).offsets[0].tolist() == [0, 1, 1, 3]


def test_dense_to_ragged_compares_the_pad_exactly():
    # torch compared an int64 with a float pad in float32 (2**40 + 1 equal to 2**40) ...
    r = rk.dense_to_ragged(torch.tensor([[3, 2**40 + 1, 2**40]]), pad_value=float(2**40))
    assert r.values.tolist() == [3, 2**40 + 1]
    # ... and wrapped a pad the dtype cannot hold, stripping real values: now refused, as
    # ragged_to_dense refuses it.
    for dense, pad in (
        (torch.tensor([[7, 255, 255]], dtype=torch.uint8), -1),
        (torch.tensor([[5, 2**31 - 1]], dtype=torch.int32), 2**31 - 1 + 2**32),
        (torch.tensor([[5, 0]]), 0.5),
    ):
        with pytest.raises(rk.RaggedError, match=rf"dense_to_ragged: pad_value {pad!r} cannot"):
            rk.dense_to_ragged(dense, pad_value=pad)


@pytest.mark.parametrize(
    ("offsets", "max_len"),
    [
        ([[0, 2, 2, 5]], None),
        ([[0, 2, 2, 5]], 2),  # rows cut: the values past the length get no gradient
        ([[0, 2, 2, 3], [0, 2, 3, 5]], None),
        ([[0, 2, 2, 3], [0, 2, 3, 5]], (1, 1)),
        ([[0]], None),
    ],
)
def test_to_dense_gradient_reaches_the_values(offsets, max_len):
    # Values that need a gradient (embedding rows of a ragged lookup) had no backward:
    # "no autograd formula was registered" for recis::ragged_to_dense.
    n = offsets[-1][-1]
    offs = [torch.tensor(o) for o in offsets]
    values = torch.randn(n, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v: rk.RaggedTensor(v, offs).to_dense(pad_value=-1.0, max_len=max_len), (values,)
    )
    dense = rk.RaggedTensor(values, offs).to_dense(max_len=max_len)
    upstream = torch.randn_like(dense)
    (grad,) = torch.autograd.grad(dense, values, upstream)
    # Reference: the same padding written with torch indexing on the detached values.
    index = torch.arange(n, dtype=torch.float64)
    positions = rk.RaggedTensor(index, offs).to_dense(pad_value=-1.0, max_len=max_len)
    expected = torch.zeros_like(values)
    kept = positions >= 0
    expected[positions[kept].long()] = upstream[kept]
    assert torch.equal(grad, expected)


# opcheck's aot_dispatch test reads .grad of its own non-leaf copies, which warns inside torch.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_to_dense_backward_opcheck():
    offsets = [torch.tensor([0, 2, 2, 5])]
    values = torch.randn(5, 3, requires_grad=True)
    torch.library.opcheck(
        torch.ops.recis.ragged_to_dense.default, (values, offsets, torch.tensor(0.0), [2])
    )
    torch.library.opcheck(
        torch.ops.recis.ragged_to_dense_backward.default, (torch.randn(3, 2, 3), offsets, 5)
    )


@pytest.mark.parametrize(
    ("dtype", "signed"),
    [(torch.uint16, torch.int16), (torch.uint32, torch.int32), (torch.uint64, torch.int64)],
)
def test_unsigned_values_pad_and_round_trip(dtype, signed) -> None:
    # torch has no index_put for these dtypes: to_dense raised NotImplementedError. Values are
    # built and compared as the signed integers of their bits (-1: the dtype's largest value).
    values = torch.tensor([1, -1, 3], dtype=signed).view(dtype)
    r = rk.RaggedTensor(values, torch.tensor([0, 2, 2, 3]))

    def bits(t: torch.Tensor) -> list:
        assert t.dtype == dtype
        return t.view(signed).tolist()

    assert bits(r.to_dense(pad_value=7)) == [[1, -1], [7, 7], [3, 7]]
    assert bits(r.to_dense(pad_value=0, max_len=1)) == [[1], [0], [3]]  # a row cut
    assert bits(rk.dense_to_ragged(r.to_dense(pad_value=0), pad_value=0).values) == [1, -1, 3]
    r3 = rk.RaggedTensor(values, [torch.tensor([0, 2, 2]), torch.tensor([0, 1, 3])])
    assert bits(r3.to_dense(pad_value=0)) == [[[1, 0], [-1, 3]], [[0, 0], [0, 0]]]


def test_complex_values_pad_with_a_real_number() -> None:
    # The pad check asked torch.iinfo of a complex dtype (a TypeError naming neither op nor dtype).
    r = rk.RaggedTensor(torch.tensor([1 + 1j, 2j]), torch.tensor([0, 2, 2]))
    assert r.to_dense(pad_value=0).tolist() == [[1 + 1j, 2j], [0j, 0j]]
    back = rk.dense_to_ragged(torch.tensor([[1j, 0j], [2 + 0j, 3j]]), pad_value=0)
    assert back.values.tolist() == [1j, 2 + 0j, 3j]
    assert back.offsets[0].tolist() == [0, 1, 3]


@pytest.mark.parametrize("levels", [2, 3])
def test_dense_to_ragged_kernel_leaves_zeros_where_a_length_is_out_of_range(
    levels, request, monkeypatch
) -> None:
    """On a GPU the lengths are not checked on the host (that would synchronize): the kernel
    skips a row whose length is out of range and records it, and the op returns before that
    record is read. The values of that row are zeros, not the memory the output was given."""
    from recis_kernels._cuda import index_errors
    from recis_kernels.ops.dense import _dense_to_ragged_cuda

    use_host_kernels(request.getfixturevalue("_host_kernels"), monkeypatch, ("dense",))
    monkeypatch.setattr(index_errors, "after_launch", lambda device: None)  # as on a GPU
    real_empty = torch.empty
    # Memory a GPU allocator hands out holds whatever was there: stand-in values.
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(-777))
    if levels == 2:
        dense = torch.arange(1, 7, dtype=torch.int64).reshape(2, 3)
        offsets = [torch.tensor([0, 5, 6])]  # row 0 claims 5 values of 3
        want = [0, 0, 0, 0, 0, 4]
    else:
        dense = torch.arange(1, 9, dtype=torch.int64).reshape(2, 2, 2)
        offsets = [torch.tensor([0, 1, 2]), torch.tensor([0, 3, 4])]  # sub-row 0 claims 3 of 2
        want = [0, 0, 0, 5]
    out = _dense_to_ragged_cuda(dense, offsets)
    assert out.tolist() == want
    with pytest.raises(rk.IndexOutOfRangeError):
        index_errors.check_index_errors("cpu")
