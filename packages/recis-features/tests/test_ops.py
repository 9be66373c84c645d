"""Each op on its own against an independent pure-Python reference."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_same, ragged, rows_of
from hypothesis import given, settings
from hypothesis import strategies as st

from recis_features import Feature, FillMissing, Log1p, Mod, Normalize, SelectField
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
