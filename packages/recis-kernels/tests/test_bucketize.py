from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import recis_kernels as rk

floats = st.floats(allow_nan=False, width=32)


def ref(xs, bounds):
    return [
        0 if (isinstance(x, float) and math.isnan(x)) else sum(b <= x for b in bounds) for x in xs
    ]


@given(
    xs=st.lists(st.one_of(floats, st.just(float("nan"))), max_size=30),
    bounds=st.lists(floats, max_size=10),
)
def test_bucketize_float_matches_reference(xs, bounds):
    bounds = sorted(bounds)
    got = rk.bucketize(
        torch.tensor(xs, dtype=torch.float32), torch.tensor(bounds, dtype=torch.float32)
    )
    assert got.dtype == torch.int64
    assert got.tolist() == ref(xs, bounds)


@given(
    xs=st.lists(st.integers(-(1 << 63), (1 << 63) - 1), max_size=30),
    bounds=st.lists(st.integers(-(1 << 63), (1 << 63) - 1), max_size=10),
)
def test_bucketize_int64_is_exact(xs, bounds):
    bounds = sorted(bounds)
    got = rk.bucketize(torch.tensor(xs, dtype=torch.int64), torch.tensor(bounds, dtype=torch.int64))
    assert got.tolist() == ref(xs, bounds)


@given(
    data=st.lists(
        st.tuples(st.lists(floats, max_size=20), st.lists(floats, max_size=6)), max_size=5
    )
)
def test_fused_bucketize_matches_per_feature(data):
    xs = [torch.tensor(x, dtype=torch.float64) for x, _ in data]
    bounds = [sorted(b) for _, b in data]
    outs = rk.fused_bucketize(xs, bounds)
    assert [o.tolist() for o in outs] == [ref(x, b) for (x, _), b in zip(data, bounds, strict=True)]


doubles = st.floats(allow_nan=False, width=64)


@given(
    data=st.lists(
        st.tuples(
            st.lists(st.one_of(floats, st.just(float("nan"))), min_size=4, max_size=4),
            st.lists(
                st.one_of(doubles, floats.map(lambda f: math.nextafter(f, math.inf))), max_size=6
            ),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_float32_values_against_float64_boundaries(data):
    """float64 boundaries that fall between, above or below float32 numbers, with float32
    values (compared in float32 after rounding the boundaries up): buckets as in exact math."""
    xs = [torch.tensor(x, dtype=torch.float32) for x, _ in data]
    bounds = [sorted(b) for _, b in data]
    outs = rk.fused_bucketize(xs, [torch.tensor(b, dtype=torch.float64) for b in bounds])
    # float32 -> Python float is exact, so the reference compares in exact float64 arithmetic.
    expected = [ref(x.tolist(), b) for x, b in zip(xs, bounds, strict=True)]
    assert [o.tolist() for o in outs] == expected
    single = rk.bucketize(xs[0], torch.tensor(bounds[0], dtype=torch.float64))
    assert single.tolist() == expected[0]


def _table_boundary_lists() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    f32 = np.float32
    one = f32(1.0)
    return [
        np.logspace(-2, 1.5, 13).astype(f32),
        # Two distinct boundaries in one table cell (a relative gap far below 1/128), and
        # duplicates, which keep the cell settled by the table.
        np.array([-5.0, one, np.nextafter(one, f32(2)), 3.0, 3.0, 3.0, 7.5], dtype=f32),
        np.array([-np.inf, -1e-45, -0.0, 1e-45, 1e30, np.inf], dtype=f32),
        np.array([], dtype=f32),
        np.sort(rng.standard_normal(254).astype(f32) * 100),  # the most a table takes
        np.sort(rng.standard_normal(255).astype(f32) * 100),  # one more: binary search
    ]


def _edge_values(bounds: list[np.ndarray], n: int) -> np.ndarray:
    rng = np.random.default_rng(11)
    f32 = np.float32
    every = np.concatenate(bounds)
    near = [every, np.nextafter(every, f32(-np.inf)), np.nextafter(every, f32(np.inf))]
    special = np.array(
        [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45, 3.4e38, -3.4e38], dtype=f32
    )
    # Random bit patterns: every sign, exponent, denormals, infinities and NaN payloads.
    bits = rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32).view(f32)
    spread = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4, n)).astype(f32)
    values = np.concatenate([*near, special, bits, spread])
    return values[rng.permutation(values.size)]


@pytest.mark.parametrize("equal_sizes", [True, False])
@pytest.mark.parametrize("lists", [5, 6], ids=["bucket-table", "binary-search"])
def test_large_float32_batches_bucket_exactly(equal_sizes, lists):
    """Batches large enough for the bucket table (lists of up to 254 boundaries), and the same
    with a 255-boundary list, which sends the call to binary search over a padded table: every
    boundary, its neighbouring floats, signed zeros, denormals, infinities and NaN payloads
    bucket exactly as by a search of each list alone."""
    bounds = _table_boundary_lists()[:lists]
    values = _edge_values(bounds, 6000)
    sizes = [values.size - (0 if equal_sizes else 97 * k) for k in range(lists)]
    xs = [torch.from_numpy(np.roll(values, 13 * k)[:size]) for k, size in enumerate(sizes)]
    outs = rk.fused_bucketize(xs, [torch.from_numpy(b) for b in bounds])
    for x, b, out in zip(xs, bounds, outs, strict=True):
        v = x.numpy()
        expected = np.where(np.isnan(v), 0, np.searchsorted(b, v, side="right"))
        assert out.dtype == torch.int64
        np.testing.assert_array_equal(out.numpy(), expected)
    single = rk.bucketize(xs[1], torch.from_numpy(bounds[1]))
    assert torch.equal(single, outs[1])


def test_boundary_goes_to_upper_bucket_and_shapes():
    x = torch.tensor([[-1.0, 0.0], [5.0, 10.0]])
    out = rk.bucketize(x, [0.0, 10.0])
    assert out.tolist() == [[0, 1], [1, 2]]
    assert rk.bucketize(torch.tensor([float("inf"), float("-inf")]), [0.0]).tolist() == [1, 0]
    assert rk.bucketize(torch.tensor([1, 5]), []).tolist() == [0, 0]


def test_mixed_int_and_float():
    outs = rk.fused_bucketize([torch.tensor([1, 2, 3]), torch.tensor([0.5])], [[2], [0.0, 1.0]])
    assert [o.tolist() for o in outs] == [[0, 1, 1], [1]]


def test_fused_errors_name_the_list_and_allow_steps_between_lists():
    xs = [torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([1.0])]
    # Each list is sorted; the packed lists step down from one list to the next, which is fine.
    outs = rk.fused_bucketize(xs, [[5.0, 6.0], [1.0, 2.0], []])
    assert [o.tolist() for o in outs] == [[0], [1], [0]]
    with pytest.raises(ValueError, match=r"boundaries_list\[2\] must be sorted"):
        rk.fused_bucketize(xs, [[5.0, 6.0], [], [3.0, 1.0]])
    with pytest.raises(ValueError, match=r"boundaries_list\[1\] must not contain NaN"):
        rk.fused_bucketize(xs, [[0.0], [float("nan")], [1.0]])


def test_bucketize_errors():
    with pytest.raises(
        ValueError, match="bucketize: boundaries must be sorted in non-decreasing order"
    ):
        rk.bucketize(torch.tensor([1.0]), [2.0, 1.0])
    with pytest.raises(ValueError, match="bucketize: boundaries must not contain NaN"):
        rk.bucketize(torch.tensor([1.0]), [float("nan")])
    with pytest.raises(rk.ShapeError, match=r"boundaries must be 1-d, got shape \(1, 1\)"):
        rk.bucketize(torch.tensor([1.0]), torch.tensor([[1.0]]))
    with pytest.raises(
        rk.UnsupportedDtypeError, match="bucketize: x must be an integer or float tensor"
    ):
        rk.bucketize(torch.tensor([True]), [1.0])
    with pytest.raises(ValueError, match="fused_bucketize: got 1 inputs but 2 boundary lists"):
        rk.fused_bucketize([torch.tensor([1.0])], [[1.0], [2.0]])


def test_bucketize_device_matches_cpu(device):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, generator=g) * 10 for n in (0, 1, 500, 3000)] + [
        torch.randint(-50, 50, (100,), generator=g)
    ]
    bounds = [[], [0.0], torch.linspace(-20, 20, 33).tolist(), [-1.0, -1.0, 2.0], [-10, 0, 10]]
    cpu = rk.fused_bucketize(xs, bounds)
    dev = rk.fused_bucketize([x.to(device) for x in xs], bounds)
    for c, d in zip(cpu, dev, strict=True):
        assert torch.equal(c, d.cpu())


def test_bucketize_opcheck():
    torch.library.opcheck(
        torch.ops.recis.fused_bucketize.default,
        (
            torch.tensor([0.5, 3.0, -1.0], dtype=torch.float64),
            [2, 1],
            torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64),
            [2, 1],
        ),
    )


@given(
    xs=st.lists(st.lists(floats, min_size=5, max_size=5), min_size=2, max_size=4),
    bounds=st.data(),
)
def test_fused_bucketize_equal_sized_float32(xs, bounds):
    bs = [sorted(bounds.draw(st.lists(floats, max_size=6))) for _ in xs]
    outs = rk.fused_bucketize(
        [torch.tensor(x, dtype=torch.float32) for x in xs],
        [torch.tensor(b, dtype=torch.float32) for b in bs],
    )
    assert [o.tolist() for o in outs] == [ref(x, b) for x, b in zip(xs, bs, strict=True)]


ints64 = st.integers(-(1 << 63), (1 << 63) - 1)


@given(
    xs=st.lists(
        st.lists(
            st.one_of(ints64, st.sampled_from([(1 << 63) - 1, -(1 << 63), 0])),
            min_size=4,
            max_size=4,
        ),
        min_size=2,
        max_size=4,
    ),
    bounds=st.data(),
    many=st.booleans(),
)
def test_fused_bucketize_equal_sized_int64(xs, bounds, many):
    # Few boundaries take the counting path, many (over 32) the binary search; both exact,
    # including a maximal x against padding and boundaries equal to the dtype's extremes.
    size = st.integers(33, 40) if many else st.integers(0, 6)
    bs = [
        sorted(bounds.draw(st.lists(ints64, min_size=n, max_size=n)))
        for n in (bounds.draw(size) for _ in xs)
    ]
    outs = rk.fused_bucketize(
        [torch.tensor(x, dtype=torch.int64) for x in xs],
        [torch.tensor(b, dtype=torch.int64) for b in bs],
    )
    assert [o.tolist() for o in outs] == [ref(x, b) for x, b in zip(xs, bs, strict=True)]


def test_fused_bucketize_nan_and_infinities_with_padding():
    xs = [torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0])] * 2
    outs = rk.fused_bucketize(xs, [[0.0], [0.0, 1.0, float("inf")]])
    assert [o.tolist() for o in outs] == [[0, 1, 0, 1], [0, 3, 0, 2]]


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_nan_buckets_equal_filling_nan_first(path):
    # Both CPU paths: the compiled kernel for plain tensors, the torch ops for a tensor that
    # needs gradients (as while tracing); short lists (counted) and long ones (searched).
    g = torch.Generator().manual_seed(3)
    xs = []
    for n, dtype in ((5000, torch.float32), (70_000, torch.float64), (7, torch.float16)):
        x = torch.randn(n, generator=g, dtype=torch.float64).to(dtype) * 4
        x[torch.rand(n, generator=g) < 0.3] = float("nan")
        xs.append(x)
    xs.append(torch.arange(-5, 5))  # integers: never NaN
    bounds = [[-1.0, 0.0, 2.5], torch.linspace(-9, 9, 50).tolist(), [0.0], [0, 3]]
    fills = [0.7, -100.0, 0.0, 0.0]
    nan_buckets = [
        rk.bucketize(torch.tensor([f], dtype=x.dtype), b).item()
        for x, f, b in zip(xs, fills, bounds, strict=True)
    ]
    nan_buckets[3] = 9
    if path == "torch":
        xs = [x.requires_grad_() if x.is_floating_point() else x for x in xs]
    got = rk.fused_bucketize(xs, bounds, nan_buckets=nan_buckets)
    for x, b, f, out in zip(xs, bounds, fills, got, strict=True):
        filled = x.detach().nan_to_num(nan=f, posinf=math.inf, neginf=-math.inf)
        assert torch.equal(out, rk.bucketize(filled, b))
    x = torch.tensor([[float("nan"), 1.0], [3.0, float("nan")]])
    assert rk.bucketize(x, [0.0, 2.0], nan_bucket=-4).tolist() == [[-4, 1], [2, -4]]


def test_nan_buckets_are_checked():
    x = torch.tensor([1.0])
    with pytest.raises(rk.ArgumentError, match="fused_bucketize: got 1 inputs but 2 nan_buckets"):
        rk.fused_bucketize([x], [[0.0]], nan_buckets=[0, 1])
    with pytest.raises(rk.ArgumentError, match=r"nan_buckets\[0\] must be an int64 integer"):
        rk.fused_bucketize([x], [[0.0]], nan_buckets=[1.5])
    with pytest.raises(rk.ArgumentError, match="bucketize: nan_bucket must be an int64 integer"):
        rk.bucketize(x, [0.0], nan_bucket=1 << 63)
    with pytest.raises(rk.ArgumentError, match="nan_buckets must be a list of ints"):
        rk.fused_bucketize([x], [[0.0]], nan_buckets=3)


def test_boundary_tensors_changed_in_place_are_checked_and_used_again():
    """Boundaries prepared for one call are reused for the same tensors; an in-place change
    is seen (new buckets, and the order check runs again)."""
    x = torch.linspace(0, 10, 2048)
    b = torch.tensor([2.0, 4.0])
    first = rk.fused_bucketize([x, x], [b, b])
    assert torch.equal(rk.fused_bucketize([x, x], [b, b])[1], first[1])
    b[1] = 8.0
    again = rk.fused_bucketize([x, x], [b, b])
    assert torch.equal(again[0], rk.bucketize(x, [2.0, 8.0]))
    assert not torch.equal(again[0], first[0])
    b[0] = 9.0
    with pytest.raises(ValueError, match=r"boundaries_list\[0\] must be sorted"):
        rk.fused_bucketize([x, x], [b, b])


def test_list_boundaries_are_exact_python_numbers():
    # Python floats used to be rounded to float32 (torch.tensor's default dtype).
    x = torch.tensor([0.1, 0.3, 1e10 + 1], dtype=torch.float64)
    assert rk.bucketize(x, [0.1, 0.3, 1e10 + 1]).tolist() == [1, 2, 3]
    # float32(0.7) = 0.699999988... < 0.7: below the exact boundary, above its float32 rounding.
    x32 = torch.tensor([0.7, 0.70000005], dtype=torch.float32)
    assert rk.bucketize(x32, [0.7]).tolist() == [0, 1]
    assert rk.bucketize(x32, (0.5, 0.7)).tolist() == [1, 2]
    assert rk.bucketize(torch.tensor([2**60 + 1, 2**60]), [2**60 + 1]).tolist() == [1, 0]
    with pytest.raises(rk.UnsupportedDtypeError, match="bucketize: boundaries must be numeric"):
        rk.bucketize(x, ["a"])
    # A uint64 tensor is refused, saying how such boundaries are given (a NumPy array is taken).
    wide = torch.tensor([1, -1], dtype=torch.int64).view(torch.uint64)
    with pytest.raises(rk.UnsupportedDtypeError, match="as a list or a NumPy array"):
        rk.bucketize(x, wide)


def test_lists_mixing_ints_and_floats_are_exact():
    # A list holding ints and floats was made float64 by NumPy, rounding 2**53 + 1 to 2**53.
    bounds = [0.5, 2**53 + 1]
    for x in (torch.tensor([2**53, 2**53 + 1]), torch.tensor([2.0**53, 2.0**53 + 2]).double()):
        assert rk.bucketize(x, bounds).tolist() == ref(x.tolist(), bounds)
    assert rk.bucketize(torch.tensor([2.0**53, 2.0**54]), bounds).tolist() == [1, 2]
    assert rk.bucketize(torch.tensor([0.5, 1.0]).half(), [0.5, 1, 2**70 + 1]).tolist() == [1, 2]
    # The order is checked on the Python numbers, before any rounding.
    with pytest.raises(rk.ArgumentError, match="boundaries must be sorted in non-decreasing"):
        rk.bucketize(torch.tensor([2**53]), [2**53 + 1, 2.0**53])
    with pytest.raises(rk.ArgumentError, match=r"boundaries_list\[1\] must not contain NaN"):
        rk.fused_bucketize([torch.tensor([1])] * 2, [[1.0, 2.0], [1, math.nan]])
    # The first bad list is named, whichever way each is checked.
    with pytest.raises(rk.ArgumentError, match=r"boundaries_list\[0\] must be sorted"):
        rk.fused_bucketize([torch.tensor([1])] * 2, [torch.tensor([2.0, 1.0]), [2, 1.0]])
    # Ints at or above 2**63 count as floats there do: for no int64, for floats exactly.
    top = torch.tensor([2**63 - 1, 0])
    assert rk.bucketize(top, [2**63]).tolist() == rk.bucketize(top, [2.0**63]).tolist() == [0, 0]
    assert rk.bucketize(top, [-1, 2**63]).tolist() == [1, 1]
    assert rk.bucketize(top, [-(2**64), 2**63 + 1]).tolist() == [1, 1]
    big = torch.tensor([2.0**63, 2.0**64], dtype=torch.float64)
    assert rk.bucketize(big, [2**63, 2**63 + 1, 2**64]).tolist() == [1, 3]
    assert rk.bucketize(big, [10**400]).tolist() == [0, 0]
    # NumPy integer scalars are taken as the ints they hold.
    assert rk.bucketize(torch.tensor([2**53]), [0.5, np.int64(2**53 + 1)]).tolist() == [1]


def test_fused_features_of_mixed_dtypes_bucket_as_alone():
    ids = torch.tensor([2**53, 2**53 + 1, 2**62 + 1, -(2**62)])
    ib = torch.tensor([2**53 + 1, 2**62 + 2])
    f32 = torch.tensor([0.25, 0.75, 0.7])
    f64 = torch.tensor([0.1, 0.7], dtype=torch.float64)
    i32 = torch.tensor([3, 9], dtype=torch.int32)
    xs = [f32, ids, f64, i32, ids]
    bs = [torch.tensor([0.5]), ib, [0.1, 0.7], [4, 9], [0.5, 2.0**62]]
    fused = rk.fused_bucketize(xs, bs)
    assert fused[1].tolist() == [0, 1, 1, 0]
    for got, x, b in zip(fused, xs, bs, strict=True):
        assert torch.equal(got, rk.bucketize(x, b))
    assert [o.tolist() for o in fused[2:4]] == [[1, 2], [0, 2]]


def test_boundaries_changed_without_a_version_bump_are_not_served_stale():
    x = torch.tensor([5.0, 15.0, 25.0])
    b = torch.tensor([10.0, 20.0], dtype=torch.float64)
    assert rk.bucketize(x, b).tolist() == [0, 1, 2]
    b.numpy()[:] = [0.0, 1.0]  # a NumPy view does not bump the version counter
    assert rk.bucketize(x, b).tolist() == [2, 2, 2]
    b.data.copy_(torch.tensor([30.0, 40.0], dtype=torch.float64))  # nor does .data
    assert rk.bucketize(x, b).tolist() == [0, 0, 0]
    b.data = torch.tensor([10.0], dtype=torch.float64)  # a new shape, same tensor object
    assert rk.bucketize(x, b).tolist() == [0, 1, 1]
    b.numpy()[:] = [float("nan")]  # and the order check runs again
    with pytest.raises(ValueError, match="bucketize: boundaries must not contain NaN"):
        rk.bucketize(x, b)


def test_tuple_boundaries_are_prepared_once_and_exact():
    from recis_kernels.ops import bucketize as module

    x = torch.tensor([0.5, 1.5, 2.5, float("nan")])
    b = (1.0, 2.0)
    module._prepared.clear()
    assert rk.fused_bucketize([x, x], [b, (2,)], nan_buckets=[7, 0])[0].tolist() == [0, 1, 2, 7]
    (entry,) = module._prepared.values()
    assert entry[1][0] is b  # held, not copied
    assert rk.fused_bucketize([x, x], [b, (2,)])[1].tolist() == [0, 0, 1, 0]
    assert len(module._prepared) == 1  # served from the entry
    # A tuple holding a tensor may change under the same identity: never kept.
    t = torch.tensor(1.0)
    held = (t, 2.0)
    assert rk.bucketize(x, held).tolist() == [0, 1, 2, 0]
    t.fill_(3.0)
    with pytest.raises(ValueError, match="boundaries must be sorted"):
        rk.bucketize(x, held)
    assert len(module._prepared) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_bucketize_on_meta_tensors(dtype):
    x = torch.empty(2, 3, dtype=dtype, device="meta")
    for b in (torch.tensor([1.0, 2.0], device="meta"), [1.0, 2.5]):
        out = rk.bucketize(x, b)
        assert out.device.type == "meta"
        assert out.shape == (2, 3)
        assert out.dtype == torch.int64
    outs = rk.fused_bucketize([x, x[0]], [[1.0], torch.tensor([1], device="meta")])
    assert [o.shape for o in outs] == [(2, 3), (3,)]
