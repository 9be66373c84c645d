"""Each op on its own against an independent pure-Python reference."""

from __future__ import annotations

import bisect
import math

import pytest
import torch
from conftest import assert_same, ragged, rows_of
from hypothesis import given, settings
from hypothesis import strategies as st

import recis_kernels as rk
from recis_features import (
    Bucketize,
    Feature,
    FeatureCross,
    FillMissing,
    Hash,
    IDMultiHash,
    Log1p,
    Mod,
    Normalize,
    SelectField,
    SequenceTruncate,
)
from recis_kernels import RaggedTensor

INT64 = st.integers(-(2**63), 2**63 - 1)
SETTINGS = settings(max_examples=40, deadline=None)


@SETTINGS
@given(ids=st.lists(INT64, max_size=30), n=st.integers(1, 2**63 - 1))
def test_mod_is_the_unsigned_remainder(ids: list[int], n: int) -> None:
    out = Mod(n).apply(torch.tensor(ids, dtype=torch.int64))
    assert out.tolist() == [(x % 2**64) % n for x in ids]


@SETTINGS
@given(rows=st.lists(st.lists(INT64, max_size=4), max_size=8), n=st.integers(1, 1000))
def test_mod_keeps_ragged_structure_and_weights(rows: list[list[int]], n: int) -> None:
    r = ragged(rows, weights=True)
    out = Mod(n).apply(r)
    assert rows_of(out) == [[(x % 2**64) % n for x in row] for row in rows]
    assert_same(out.offsets[0], r.offsets[0])
    assert_same(out.weights, r.weights)


def test_mod_accepts_int32_ids_as_int64() -> None:
    out = Mod(7).apply(torch.tensor([[-1, 8]], dtype=torch.int32))
    assert out.dtype == torch.int64
    assert out.tolist() == [[(2**64 - 1) % 7, 1]]


FLOATS = st.floats(-1e6, 1e6, width=32) | st.just(math.nan)


@SETTINGS
@given(xs=st.lists(FLOATS, max_size=20), fill=st.floats(-10, 10, width=32))
def test_fill_missing_replaces_nan_in_dense_floats(xs: list[float], fill: float) -> None:
    out = FillMissing(fill).apply(torch.tensor(xs, dtype=torch.float32))
    assert out.tolist() == [fill if math.isnan(x) else x for x in xs]


@SETTINGS
@given(rows=st.lists(st.lists(st.integers(-100, 100), max_size=3), max_size=10))
def test_fill_missing_gives_empty_rows_one_value(rows: list[list[int]]) -> None:
    r = ragged(rows, weights=True)
    out = FillMissing(-7).apply(r)
    assert rows_of(out) == [row or [-7] for row in rows]
    expected_w, k = [], 1
    for row in rows:
        expected_w += list(range(k, k + len(row))) if row else [1]
        k += len(row)
    assert out.weights.tolist() == [float(w) for w in expected_w]


def test_fill_missing_on_ragged_floats_fills_nan_and_empty_rows() -> None:
    r = ragged([[1.0, math.nan], []], dtype=torch.float32)
    out = FillMissing(0.5).apply(r)
    assert rows_of(out) == [[1.0, 0.5], [0.5]]
    assert out.weights is None


@SETTINGS
@given(xs=st.lists(st.floats(-1e3, 1e3, width=32), max_size=20))
def test_normalize_and_log1p(xs: list[float]) -> None:
    x = torch.tensor(xs, dtype=torch.float32)
    assert_same(Normalize(2.0, 0.5).apply(x), (x - 2.0) / 0.5)
    assert_same(Log1p().apply(x), torch.log1p(x))
    for got, v in zip(Normalize(2.0, 0.5).apply(x).tolist(), xs, strict=True):
        assert got == pytest.approx((v - 2.0) / 0.5, rel=1e-6, abs=1e-6)


def test_float_ops_keep_ragged_structure() -> None:
    r = RaggedTensor(
        torch.tensor([1.0, 3.0, 5.0]), [torch.tensor([0, 2, 3])], torch.tensor([1.0, 2.0, 3.0])
    )
    out = Normalize(1.0, 2.0).apply(r)
    assert out.values.tolist() == [0.0, 1.0, 2.0]
    assert_same(out.weights, r.weights)


@pytest.mark.parametrize("dtype", ["int32", "int64", "float32", "float64"])
def test_select_casts_dense_and_ragged(dtype: str) -> None:
    op = SelectField("x", dtype=dtype)
    dense = op.read({"x": torch.tensor([1, 2])})
    rag = op.read({"x": ragged([[1], [2, 3]], weights=True)})
    assert str(dense.dtype) == f"torch.{dtype}"
    assert str(rag.values.dtype) == f"torch.{dtype}"
    assert rag.weights is not None


def test_lambda_runs_the_function() -> None:
    f = Feature("x").select("a").map(lambda t: t * 2)
    assert f({"a": torch.tensor([1, 2])}).tolist() == [2, 4]


@SETTINGS
@given(
    xs=st.lists(st.floats(-50, 50, width=32), max_size=20),
    bounds=st.lists(st.floats(-50, 50), min_size=1, max_size=6, unique=True).map(sorted),
)
def test_bucketize_counts_boundaries_at_or_below(xs: list[float], bounds: list[float]) -> None:
    out = Bucketize(bounds).apply(torch.tensor(xs, dtype=torch.float32))
    assert out.dtype == torch.int64
    # float32 values compared with float64 boundaries exactly, as Python floats compare.
    assert out.tolist() == [bisect.bisect_right(bounds, x) for x in xs]


def test_bucketize_puts_boundary_values_up_and_nan_in_bucket_zero() -> None:
    out = Bucketize([0.0, 10.0, 20.0]).apply(torch.tensor([-1.0, 0.0, 10.0, 25.0, math.nan]))
    assert out.tolist() == [0, 1, 2, 3, 0]


def _truncated(rows: list[list[int]], length: int, side: str) -> list[list[int]]:
    return [row[:length] if side == "head" else row[max(len(row) - length, 0) :] for row in rows]


@SETTINGS
@given(
    rows=st.lists(st.lists(st.integers(-9, 9), max_size=6), max_size=8),
    length=st.integers(0, 7),
    side=st.sampled_from(["head", "tail"]),
)
def test_truncate_keeps_head_or_tail(rows: list[list[int]], length: int, side: str) -> None:
    r = ragged(rows, weights=True)
    out = SequenceTruncate(length, side).apply(r)
    assert rows_of(out) == _truncated(rows, length, side)
    counter = iter(range(1, 1 + sum(map(len, rows))))
    weights = _truncated([[next(counter) for _ in row] for row in rows], length, side)
    assert out.weights.tolist() == [float(w) for row in weights for w in row]


def test_truncate_three_levels_pads_with_empty_lists() -> None:
    # rows: [[[1], [2, 3], [4]], [], [[5]]]
    r = RaggedTensor(
        torch.tensor([1, 2, 3, 4, 5]),
        [torch.tensor([0, 3, 3, 4]), torch.tensor([0, 1, 3, 4, 5])],
    )
    out = SequenceTruncate(2, "tail", levels=3).apply(r)
    assert out.offsets[0].tolist() == [0, 2, 4, 6]
    assert out.offsets[1].tolist() == [0, 2, 3, 3, 3, 4, 4]
    assert out.values.tolist() == [2, 3, 4, 5]


@SETTINGS
@given(strings=st.lists(st.text(max_size=8), max_size=10), buckets=st.integers(0, 2**40))
def test_hash_of_strings_and_of_their_bytes_agree(strings: list[str], buckets: int) -> None:
    encoded = [s.encode() for s in strings]
    offsets = torch.tensor([0, *map(len, encoded)], dtype=torch.int64).cumsum(0)
    data = RaggedTensor(torch.tensor(list(b"".join(encoded)), dtype=torch.uint8), [offsets])
    for algorithm in ("farm", "murmur"):
        full = Hash(algorithm).apply(strings)
        assert_same(full, rk.hash_strings(strings, algorithm))
        assert_same(Hash(algorithm, buckets).apply(data), Hash(algorithm, buckets).apply(strings))
        if buckets:
            expected = [(h % 2**64) % buckets for h in full.tolist()]
            assert Hash(algorithm, buckets).apply(strings).tolist() == expected


def test_hash_of_two_level_bytes_keeps_the_rows() -> None:
    # rows: [["ab", "c"], [], ["d"]]
    data = RaggedTensor(
        torch.tensor(list(b"abcd"), dtype=torch.uint8),
        [torch.tensor([0, 2, 2, 3]), torch.tensor([0, 2, 3, 4])],
    )
    out = Hash("murmur").apply(data)
    assert out.offsets[0].tolist() == [0, 2, 2, 3]
    assert_same(out.values, rk.hash_strings(["ab", "c", "d"], "murmur"))


def test_cross_pairs_distinct_ids_and_multiplies_weights() -> None:
    a = ragged([[1, 2, 1], [], [5]], weights=True)  # weights 1, 2, 3, 4
    b = torch.tensor([[7, 8], [3, 3], [6, 6]])  # dense rows of 2 ids
    out = FeatureCross().apply((a, b))
    assert out.offsets[0].tolist() == [0, 4, 4, 5]
    assert out.weights.tolist() == [1.0, 1.0, 2.0, 2.0, 4.0]
    single = rk.feature_cross(
        RaggedTensor(torch.tensor([1]), [torch.tensor([0, 1])]),
        RaggedTensor(torch.tensor([8]), [torch.tensor([0, 1])]),
    )
    assert out.values[1] == single.values[0]


@SETTINGS
@given(
    ids=st.lists(INT64, max_size=10), buckets=st.lists(st.integers(0, 1000), min_size=1, max_size=4)
)
def test_multi_hash_adds_a_hash_dimension(ids: list[int], buckets: list[int]) -> None:
    x = torch.tensor(ids, dtype=torch.int64)
    out = IDMultiHash(buckets).apply(x)
    assert out.shape == (len(ids), len(buckets))
    assert_same(out, rk.multi_hash(x, buckets))
    for k, b in enumerate(buckets):
        if b:
            assert bool(((out[:, k] >= 0) & (out[:, k] < b)).all())
    r = IDMultiHash(buckets).apply(ragged([ids, []], weights=True))
    assert_same(r.values, out)
    assert r.offsets[0].tolist() == [0, len(ids), len(ids)]
