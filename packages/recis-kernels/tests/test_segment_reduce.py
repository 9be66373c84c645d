from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import use_host_kernels
from hypothesis import given
from hypothesis import strategies as st

import recis_kernels as rk


def ref(rows, lengths, weights, mode, tile_len):
    rows = np.asarray(rows, dtype=np.float64)
    d = rows.shape[1]
    out = []
    start = 0
    for n in lengths:
        seg = rows[start : start + n]
        w = np.asarray(weights[start : start + n], dtype=np.float64)
        start += n
        if mode == "tile":
            tile = np.zeros((tile_len, d))
            k = min(n, tile_len)
            tile[:k] = seg[:k] * w[:k, None]
            out.append(tile.reshape(-1))
            continue
        s = (seg * w[:, None]).sum(0) if n else np.zeros(d)
        if mode == "mean":
            den = w.sum()
            s = s / den if den != 0 else np.zeros(d)
        elif mode == "sqrtn":
            den = np.sqrt((w * w).sum())
            s = s / den if den != 0 else np.zeros(d)
        out.append(s)
    width = d * (tile_len if mode == "tile" else 1)
    return np.asarray(out).reshape(len(lengths), width)


@st.composite
def case_st(draw):
    lengths = draw(st.lists(st.integers(0, 5), max_size=6))
    d = draw(st.integers(1, 4))
    n = sum(lengths)
    rows = draw(
        st.lists(st.lists(st.floats(-10, 10), min_size=d, max_size=d), min_size=n, max_size=n)
    )
    weights = draw(st.lists(st.sampled_from([0.5, 1.0, 2.0, 0.0]), min_size=n, max_size=n))
    return lengths, d, rows, weights


def offsets_of(lengths):
    return torch.tensor(np.cumsum([0, *lengths]), dtype=torch.int64)


@given(
    case=case_st(), mode=st.sampled_from(["sum", "mean", "sqrtn", "tile"]), weighted=st.booleans()
)
def test_segment_reduce_matches_reference(case, mode, weighted):
    lengths, d, rows, weights = case
    tile_len = 3 if mode == "tile" else None
    rows_t = torch.tensor(rows, dtype=torch.float64).view(-1, d)
    w = torch.tensor(weights, dtype=torch.float32) if weighted else None
    got = rk.segment_reduce(rows_t, offsets_of(lengths), w, mode, tile_len)
    expected = ref(
        rows_t.numpy(), lengths, weights if weighted else [1.0] * len(rows), mode, tile_len
    )
    width = d * (3 if mode == "tile" else 1)
    assert got.shape == (len(lengths), width)
    np.testing.assert_allclose(
        got.numpy(), expected.reshape(len(lengths), width), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("mode", ["sum", "mean", "sqrtn", "tile"])
def test_segment_reduce_gradcheck(mode):
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    weights = (torch.rand(7, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    offsets = torch.tensor([0, 3, 3, 4, 7])
    tile_len = 2 if mode == "tile" else None
    assert torch.autograd.gradcheck(
        lambda r, w: rk.segment_reduce(r, offsets, w, mode, tile_len), (rows, weights)
    )
    assert torch.autograd.gradcheck(
        lambda r: rk.segment_reduce(r, offsets, None, mode, tile_len), (rows,)
    )


def test_segment_reduce_errors():
    rows = torch.zeros(3, 2)
    off = torch.tensor([0, 3])
    with pytest.raises(ValueError, match="mode must be one of sum, mean, sqrtn, tile, got 'max'"):
        rk.segment_reduce(rows, off, mode="max")
    # A list is refused by name (it raised a bare TypeError: unhashable type).
    with pytest.raises(rk.ArgumentError, match=r"mode must be one of .*, got \['sum'\]"):
        rk.segment_reduce(rows, off, mode=["sum"])
    with pytest.raises(ValueError, match="tile mode needs tile_len as an int >= 1, got None"):
        rk.segment_reduce(rows, off, mode="tile")
    with pytest.raises(ValueError, match="tile_len only applies to mode 'tile', got mode 'sum'"):
        rk.segment_reduce(rows, off, tile_len=2)
    with pytest.raises(rk.ShapeError, match=r"rows must be 2-d \(N, D\), got shape \(3,\)"):
        rk.segment_reduce(torch.zeros(3), off)
    with pytest.raises(rk.ShapeError, match=r"weights must have shape \(3,\), got \(2,\)"):
        rk.segment_reduce(rows, off, torch.ones(2))
    with pytest.raises(
        rk.ShapeError, match="offsets must start at 0 and end at the number of rows \\(3\\)"
    ):
        rk.segment_reduce(rows, torch.tensor([0, 2]))
    with pytest.raises(rk.UnsupportedDtypeError, match="segment_reduce: rows has dtype int64"):
        rk.segment_reduce(torch.zeros(3, 2, dtype=torch.int64), off)


@pytest.mark.parametrize("mode", ["sum", "mean", "sqrtn", "tile"])
def test_segment_reduce_device_matches_cpu(device, mode):
    g = torch.Generator().manual_seed(4)
    lengths = torch.randint(0, 12, (300,), generator=g)
    n = int(lengths.sum())
    rows = torch.randn(n, 16, generator=g)
    w = torch.rand(n, generator=g)
    off = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    tile_len = 5 if mode == "tile" else None
    for weights in (None, w):
        r_cpu = rows.detach().clone().requires_grad_()
        r_dev = rows.detach().clone().to(device).requires_grad_()
        out_cpu = rk.segment_reduce(r_cpu, off, weights, mode, tile_len)
        out_dev = rk.segment_reduce(
            r_dev, off.to(device), None if weights is None else weights.to(device), mode, tile_len
        )
        torch.testing.assert_close(out_cpu, out_dev.cpu(), rtol=1e-5, atol=1e-5)
        grad = torch.randn(out_cpu.shape, generator=g)
        out_cpu.backward(grad)
        out_dev.backward(grad.to(device))
        torch.testing.assert_close(r_cpu.grad, r_dev.grad.cpu(), rtol=1e-5, atol=1e-5)


# opcheck's aot_dispatch test reads .grad of its own non-leaf copies, which warns inside torch.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_segment_reduce_opcheck():
    rows = torch.randn(4, 2)
    off = torch.tensor([0, 1, 4])
    torch.library.opcheck(
        torch.ops.recis.segment_reduce.default, (rows, off, torch.rand(4), "mean", 0)
    )
    torch.library.opcheck(
        torch.ops.recis.segment_reduce.default, (rows.requires_grad_(), off, None, "tile", 2)
    )


@pytest.mark.parametrize(
    ("offsets", "where"),
    [
        ([0, 3, 1, 3], r"offsets\[1\] = 3 > offsets\[2\] = 1"),
        ([0, -1, 3], r"offsets\[0\] = 0"),
        # 10 down to -2**63 + 1: a difference wraps around int64 to a positive step.
        ([0, 10, -(2**63) + 1, -1, 3], r"offsets\[1\] = 10 > offsets\[2\] = -9223372036854775807"),
    ],
)
def test_segment_reduce_rejects_decreasing_offsets(offsets, where):
    with pytest.raises(
        rk.ShapeError, match=f"segment_reduce: offsets must be non-decreasing.*{where}"
    ):
        rk.segment_reduce(torch.ones(3, 2), torch.tensor(offsets))
    # Equal neighbours are empty segments, not an error.
    out = rk.segment_reduce(torch.ones(3, 2), torch.tensor([0, 0, 3, 3]))
    assert out.tolist() == [[0.0, 0.0], [3.0, 3.0], [0.0, 0.0]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("mode", "weight"),
    [("sqrtn", 300.0), ("sqrtn", 1e-4), ("mean", 40000.0), ("mean", 1e-5)],
)
def test_half_rows_normalize_in_float32(dtype, mode, weight):
    # The normalizer was formed in the rows' dtype: 300**2 overflowed float16 and 1e-4**2
    # underflowed, both pooling to 0; a float16 sum of 40000s overflowed to inf (pooled to 0).
    rows = torch.tensor([[1.0, -2.0], [1.0, -2.0], [1.0, -2.0]], dtype=dtype, requires_grad=True)
    weights = torch.full((3,), weight, requires_grad=True)
    out = rk.segment_reduce(rows, torch.tensor([0, 3]), weights, mode)
    scale = 3**0.5 if mode == "sqrtn" else 1.0
    expected = torch.tensor([[scale, -2 * scale]], dtype=dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected_grad = (1 / 3**0.5 if mode == "sqrtn" else 1 / 3) * torch.tensor([[1.0, 1.0]] * 3)
    torch.testing.assert_close(rows.grad, expected_grad.to(dtype))
    # Equal weights: the pooled value does not depend on them.
    torch.testing.assert_close(weights.grad, torch.zeros(3), atol=1e-3 / weight, rtol=0)


@pytest.mark.parametrize(
    ("dtype", "through_kernel"),
    # The kernels pool float32 and float64 rows only.
    [
        (torch.float32, False),
        (torch.float32, True),
        (torch.bfloat16, False),
        (torch.float16, False),
    ],
)
@pytest.mark.parametrize("weight", [1e-24, 1e-20, 1e20, 1e30, 1e-40])
def test_sqrtn_of_tiny_and_huge_weights(request, monkeypatch, through_kernel, dtype, weight):
    # Squares of float32 weights were summed in float32 (in the torch path and the kernel):
    # 1e-24 squared to 0 and 1e20 to inf, both pooling to 0, and 1e-20 to a subnormal.
    if through_kernel:
        use_host_kernels(request.getfixturevalue("_host_kernels"), monkeypatch, ("segment_reduce",))
    rows = torch.tensor([[1.0, -2.0], [3.0, 4.0], [5.0, 6.0]], dtype=dtype, requires_grad=True)
    offsets = torch.tensor([0, 2, 2, 3])
    weights = torch.full((3,), weight, requires_grad=True)
    out = rk.segment_reduce(rows, offsets, weights, "sqrtn")
    # Equal weights: segment sums over sqrt(number of rows); the empty segment pools to 0.
    expected = torch.tensor([[4 / 2**0.5, 2 / 2**0.5], [0.0, 0.0], [5.0, 6.0]])
    tol = 1e-5 if weight != 1e-40 else 1e-2  # 1e-40 is a float32 subnormal: w e loses digits
    if dtype != torch.float32:
        tol = max(tol, 1e-2)
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    out.backward(torch.ones_like(out))
    grad = torch.tensor([[2**-0.5] * 2] * 2 + [[1.0, 1.0]])
    torch.testing.assert_close(rows.grad.float(), grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", ["sum", "mean", "sqrtn", "tile"])
def test_kernels_round_as_the_torch_path(request, monkeypatch, mode):
    # The kernels multiply in the torch path's order (the backward: the weight times the scale
    # first), so both give the same float32 results bit for bit where no sum is involved.
    gen = torch.Generator().manual_seed(5)
    offsets = torch.tensor([0, 3, 3, 7, 12])
    rows = torch.randn(12, 8, generator=gen)
    weights = torch.rand(12, generator=gen) * 3
    tile = 4 if mode == "tile" else None
    grad = torch.randn(4, 8 * (tile or 1), generator=gen)
    got = []
    for through_kernel in (False, True):
        with monkeypatch.context() as mp:
            if through_kernel:
                use_host_kernels(request.getfixturevalue("_host_kernels"), mp, ("segment_reduce",))
            r = rows.clone().requires_grad_()
            rk.segment_reduce(r, offsets, weights, mode=mode, tile_len=tile).backward(grad)
            got.append(r.grad)
    assert torch.equal(got[1], got[0])


@pytest.mark.parametrize("mode", ["sum", "mean", "sqrtn", "tile"])
@pytest.mark.parametrize("weighted", [False, True])
def test_zero_width_rows_have_zero_width_gradients(mode, weighted):
    rows = torch.zeros(4, 0, requires_grad=True)
    weights = torch.ones(4, requires_grad=True) if weighted else None
    tile_len = 3 if mode == "tile" else None
    out = rk.segment_reduce(rows, torch.tensor([0, 2, 4]), weights, mode, tile_len)
    assert out.shape == (2, 0)
    out.sum().backward()
    assert rows.grad is not None
    assert rows.grad.shape == (4, 0)
    if weighted:
        assert torch.equal(weights.grad, torch.zeros(4))
