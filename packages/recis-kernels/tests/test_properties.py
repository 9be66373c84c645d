"""Property tests of the CPU paths against independent pure-Python / NumPy references.

Every reference here is written from the documented semantics (docs/kernels) without calling
the package; examples are derandomized so CI sees the same inputs on every run.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from hash_reference import farm64, murmur64a
from hypothesis import given, settings
from hypothesis import strategies as st

import recis_kernels as rk

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
U64 = 1 << 64
PROPS = settings(max_examples=60, deadline=None, derandomize=True)


def _signed(u: int) -> int:
    u %= U64
    return u - U64 if u >= 1 << 63 else u


# --------------------------------------------------------------------------------------------
# IdMap against a dict keyed by (table, key)

_KEY = st.one_of(
    st.integers(-4, 4),
    st.sampled_from([INT64_MIN, INT64_MAX, INT64_MIN + 1, INT64_MAX - 1]),
    # keys differing only in their high bits
    st.integers(0, 7).map(lambda h: _signed((h << 61) | 5)),
    st.integers(INT64_MIN, INT64_MAX),
)
_BATCH = st.lists(st.tuples(_KEY, st.integers(0, 3)), max_size=40)
_STREAM = st.lists(st.tuples(st.sampled_from(["insert", "find", "erase"]), _BATCH), max_size=10)


def _tensors(pairs):
    keys = torch.tensor([k for k, _ in pairs], dtype=torch.int64)
    tabs = torch.tensor([t for _, t in pairs], dtype=torch.int32)
    return keys, tabs


@PROPS
@given(_STREAM)
def test_idmap_stream_matches_dict(stream) -> None:
    m = rk.IdMap(capacity=16)
    ref: dict[tuple[int, int], int] = {}
    for op, pairs in stream:
        keys, tabs = _tensors(pairs)
        pairs_tk = [(t, k) for k, t in pairs]
        if op == "insert":
            before = dict(ref)
            rows, is_new = m.find_or_insert(keys, tabs)
            for p, row, new in zip(pairs_tk, rows.tolist(), is_new.tolist(), strict=True):
                # "new" marks exactly the keys absent before the call (every occurrence).
                assert new == (p not in before)
                if p in before:
                    assert row == before[p]
                else:
                    assert ref.setdefault(p, row) == row
        elif op == "find":
            assert m.find(keys, tabs).tolist() == [ref.get(p, -1) for p in pairs_tk]
        else:
            freed = m.erase(keys, tabs)
            gone = {p for p in pairs_tk if p in ref}
            assert sorted(freed.tolist()) == sorted(ref.pop(p) for p in gone)
        # rows of live keys are distinct and stable
        assert len(set(ref.values())) == len(ref)
        assert all(0 <= r < m.num_rows for r in ref.values())
        if ref:
            live = list(ref)
            k = torch.tensor([k for _, k in live], dtype=torch.int64)
            t = torch.tensor([t for t, _ in live], dtype=torch.int32)
            assert m.find(k, t).tolist() == [ref[p] for p in live]
        ex = m.export()
        got = list(zip(ex.tables.tolist(), ex.keys.tolist(), ex.rows.tolist(), strict=True))
        assert len(got) == len(ref) == m.size
        assert {(t, k): r for t, k, r in got} == ref


# --------------------------------------------------------------------------------------------
# mod on the full uint64 range

_ANY64 = st.one_of(
    st.integers(INT64_MIN, INT64_MAX), st.sampled_from([0, -1, 1, INT64_MIN, INT64_MAX])
)
_MODULUS = st.one_of(
    st.integers(1, 10),
    st.integers(1, INT64_MAX),
    st.sampled_from([1, 2, 3, 1 << 32, (1 << 32) + 1, 1 << 62, INT64_MAX, INT64_MAX - 1]),
)


@PROPS
@given(st.lists(st.tuples(st.lists(_ANY64, max_size=20), _MODULUS), min_size=1, max_size=4))
def test_mod_matches_unsigned_remainder(features) -> None:
    ids = [torch.tensor(v, dtype=torch.int64) for v, _ in features]
    ns = [n for _, n in features]
    want = [[(x % U64) % n for x in v] for v, n in features]
    assert [t.tolist() for t in rk.fused_mod(ids, ns)] == want
    for t, n, w in zip(ids, ns, want, strict=True):
        assert rk.mod(t, n).tolist() == w


# --------------------------------------------------------------------------------------------
# hashing of byte strings

_BYTES = st.one_of(
    st.binary(max_size=80),
    st.sampled_from([b"", b"\x00", b"\x00" * 17, "é中😀".encode(), b"\xff" * 33]),
    st.text(max_size=20).map(lambda s: s.encode("utf-8")),
)


@PROPS
@given(st.lists(_BYTES, max_size=8), st.sampled_from([0, 1, 7, 1 << 40, INT64_MAX]))
def test_hash_bytes_matches_reference(strings, buckets) -> None:
    data = torch.tensor(list(b"".join(strings)), dtype=torch.uint8)
    offsets = torch.tensor([0, *np.cumsum([len(s) for s in strings]).tolist()], dtype=torch.int64)
    for algo, fn in (("farm", farm64), ("murmur", murmur64a)):
        want = [fn(s) % buckets if buckets else _signed(fn(s)) for s in strings]
        assert rk.hash_bytes(data, offsets, algo, buckets).tolist() == want
        assert rk.hash_strings(strings, algo, buckets).tolist() == want


# --------------------------------------------------------------------------------------------
# bucketize

_SPECIAL = [0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -1.0, 2.5]
_FLOAT = st.one_of(
    st.sampled_from(_SPECIAL), st.floats(-100, 100, width=32), st.integers(-5, 5).map(float)
)
_BOUND = st.one_of(
    st.sampled_from([0.0, -0.0, math.inf, -math.inf, 1.0, 2.5]),
    st.floats(-100, 100, width=32),
    st.floats(-100, 100),
)


def _bucket_ref(x: float | int, bounds: list[float | int]) -> int:
    # NaN compares false with everything: bucket 0. Python compares int and float exactly.
    return sum(1 for b in bounds if b <= x)


# Inputs up to 150 values: the compiled kernel counts blocks of 64 values, then the rest one
# by one; both paths are drawn.
@PROPS
@given(
    st.lists(_FLOAT, max_size=150),
    st.lists(_BOUND, max_size=8).map(sorted),
    st.sampled_from([torch.float32, torch.float64]),
    st.booleans(),
)
def test_bucketize_floats_match_reference(xs, bounds, dtype, as_tensor) -> None:
    x = torch.tensor(xs, dtype=dtype)
    exact = [float(v) for v in x.tolist()]  # the values as stored
    b = torch.tensor(bounds, dtype=torch.float64) if as_tensor else bounds
    want = [_bucket_ref(v, bounds) for v in exact]
    assert rk.bucketize(x, b).tolist() == want
    assert rk.fused_bucketize([x, x[:3]], [b, bounds])[0].tolist() == want


@PROPS
@given(
    st.lists(st.one_of(st.integers(-(1 << 60), 1 << 60), st.sampled_from([0, -1])), max_size=150),
    st.lists(
        st.one_of(st.integers(-(1 << 60), 1 << 60), st.sampled_from([0, -1, 2**53 + 1])),
        max_size=6,
    ).map(sorted),
)
def test_bucketize_int64_exact(xs, bounds) -> None:
    x = torch.tensor(xs, dtype=torch.int64)
    want = [_bucket_ref(v, bounds) for v in xs]
    assert rk.bucketize(x, bounds).tolist() == want
    assert rk.bucketize(x, torch.tensor(bounds, dtype=torch.int64)).tolist() == want


def test_bucketize_int64_values_against_float_boundaries_is_exact() -> None:
    # 2**53 + 3 is below the boundary 2**53 + 4 (both exact), but rounds up to it as a float64.
    big = 2**53
    x = torch.tensor([big + 3, big + 4, big + 5, INT64_MAX, INT64_MIN, -(big + 3)])
    bounds = [-math.inf, -float(big + 4), 0.5, float(big + 4), 2.0**63, math.inf]
    want = [_bucket_ref(v, bounds) for v in x.tolist()]
    assert want == [3, 4, 4, 4, 1, 2]
    assert rk.bucketize(x, bounds).tolist() == want
    assert rk.bucketize(x, torch.tensor(bounds, dtype=torch.float64)).tolist() == want
    assert (
        rk.fused_bucketize([x, x.to(torch.int32).clamp(-5, 5)], [bounds, [0.5]])[0].tolist() == want
    )


def test_bucketize_float_values_against_int64_boundaries_is_exact() -> None:
    # float(2**60) is below the boundary 2**60 + 1, which rounds down to it as a float64.
    big = 2**60
    bounds = [-(big + 1), big + 1, INT64_MAX]
    for dtype in (torch.float64, torch.float32):
        x = torch.tensor([float(big), -float(big), 2.0**63, 1.0], dtype=dtype)
        want = [_bucket_ref(float(v), bounds) for v in x.tolist()]
        assert rk.bucketize(x, bounds).tolist() == want, dtype
        assert rk.bucketize(x, torch.tensor(bounds)).tolist() == want, dtype
    assert want == [1, 1, 3, 1]


@PROPS
@given(
    st.lists(st.one_of(_ANY64, st.integers(2**53, 2**53 + 6)), max_size=12),
    st.lists(
        st.one_of(
            st.floats(allow_nan=False),
            st.integers(2**53, 2**53 + 6).map(float),
            st.sampled_from([2.0**63, -(2.0**63), 0.5, -0.0]),
        ),
        max_size=6,
    ).map(sorted),
    st.lists(st.one_of(_ANY64, st.integers(2**53, 2**53 + 6)), max_size=6).map(sorted),
    st.sampled_from([torch.float64, torch.float32]),
)
def test_bucketize_mixed_int_and_float_is_exact(ints, float_bounds, int_bounds, fdtype) -> None:
    x = torch.tensor(ints, dtype=torch.int64)
    assert rk.bucketize(x, float_bounds).tolist() == [_bucket_ref(v, float_bounds) for v in ints]
    f = torch.tensor([float(v) for v in ints], dtype=fdtype)
    want = [_bucket_ref(v, int_bounds) for v in f.tolist()]
    assert rk.bucketize(f, int_bounds).tolist() == want
    got = rk.fused_bucketize([x, f], [float_bounds, torch.tensor(int_bounds, dtype=torch.int64)])
    assert got[1].tolist() == want


def test_bucketize_large_table_path_special_values() -> None:
    # >= 1024 float32 values take the bucket-table path; include the awkward values.
    rng = np.random.default_rng(0)
    vals = np.concatenate(
        [
            rng.normal(0, 10, 2000).astype(np.float32),
            np.array(_SPECIAL * 10, dtype=np.float32),
            np.array([1.0, np.nextafter(np.float32(1.0), np.float32(2))], dtype=np.float32),
        ]
    )
    bounds = sorted([-0.0, 0.0, 1.0, 1.0, 2.5, -math.inf, math.inf, 1e-3, 1.0000001])
    x = torch.from_numpy(vals)
    want = [_bucket_ref(float(v), bounds) for v in vals.tolist()]
    assert rk.bucketize(x, bounds).tolist() == want


# --------------------------------------------------------------------------------------------
# ragged references

_ROW = st.lists(st.integers(-50, 50), max_size=5)
_ROWS2 = st.lists(_ROW, max_size=6)
_ROWS3 = st.lists(st.lists(_ROW, max_size=4), max_size=5)


def _off(lengths) -> torch.Tensor:
    return torch.tensor([0, *np.cumsum(list(lengths), dtype=np.int64).tolist()], dtype=torch.int64)


def _r2(rows, weights=None) -> rk.RaggedTensor:
    values = torch.tensor([v for r in rows for v in r], dtype=torch.int64)
    w = None
    if weights is not None:
        w = torch.tensor([x for r in weights for x in r], dtype=torch.float32)
    return rk.RaggedTensor(values, _off(len(r) for r in rows), w)


def _r3(rows) -> rk.RaggedTensor:
    subs = [s for r in rows for s in r]
    values = torch.tensor([v for s in subs for v in s], dtype=torch.int64)
    return rk.RaggedTensor(values, [_off(len(r) for r in rows), _off(len(s) for s in subs)])


def _rows2(r: rk.RaggedTensor, values=None):
    o = r.offsets[0].tolist()
    v = (r.values if values is None else values).tolist()
    return [v[o[i] : o[i + 1]] for i in range(len(o) - 1)]


def _rows3(r: rk.RaggedTensor):
    o0, o1, v = r.offsets[0].tolist(), r.offsets[1].tolist(), r.values.tolist()
    subs = [v[o1[j] : o1[j + 1]] for j in range(len(o1) - 1)]
    return [subs[o0[i] : o0[i + 1]] for i in range(len(o0) - 1)]


@PROPS
@given(_ROWS2, st.integers(0, 6), st.sampled_from(["head", "tail"]))
def test_truncate_2level_matches_reference(rows, max_len, side) -> None:
    weights = [[float(v) / 4 for v in r] for r in rows]
    res = rk.truncate(_r2(rows, weights), max_len, side)

    def keep(r):
        return r[:max_len] if side == "head" else r[max(len(r) - max_len, 0) :]

    assert _rows2(res.values) == [keep(r) for r in rows]
    assert _rows2(res.values, res.values.weights) == [keep(w) for w in weights]
    assert res.dropped.tolist() == [max(len(r) - max_len, 0) for r in rows]
    assert res.padded.tolist() == [max(max_len - len(r), 0) for r in rows]


@PROPS
@given(_ROWS3, st.integers(0, 5), st.sampled_from(["head", "tail"]))
def test_truncate_3level_matches_reference(rows, max_len, side) -> None:
    res = rk.truncate(_r3(rows), max_len, side)
    want = []
    for r in rows:
        kept = r[:max_len] if side == "head" else r[max(len(r) - max_len, 0) :]
        want.append(kept + [[]] * (max_len - len(kept)))
    assert _rows3(res.values) == want
    assert res.dropped.tolist() == [max(len(r) - max_len, 0) for r in rows]
    assert res.padded.tolist() == [max(max_len - len(r), 0) for r in rows]


@PROPS
@given(_ROWS2, st.sampled_from([0, -1, 99]), st.one_of(st.none(), st.integers(0, 6)))
def test_to_dense_2level_matches_reference(rows, pad, max_len) -> None:
    width = max((len(r) for r in rows), default=0) if max_len is None else max_len
    want = [(r + [pad] * width)[:width] for r in rows]
    dense = _r2(rows).to_dense(pad, max_len)
    assert tuple(dense.shape) == (len(rows), width)
    assert dense.tolist() == want


@PROPS
@given(_ROWS3, st.sampled_from([0, -7]))
def test_to_dense_3level_matches_reference(rows, pad) -> None:
    s = max((len(r) for r in rows), default=0)
    length = max((len(x) for r in rows for x in r), default=0)
    want = [
        [(x + [pad] * length)[:length] for x in r] + [[pad] * length] * (s - len(r)) for r in rows
    ]
    dense = _r3(rows).to_dense(pad)
    assert tuple(dense.shape) == (len(rows), s, length)
    assert dense.tolist() == want


@PROPS
@given(_ROWS2, st.sampled_from([0, -1]))
def test_from_dense_roundtrip_matches_reference(rows, pad) -> None:
    # with explicit lengths, rows come back exactly (inner pad values included)
    width = max((len(r) for r in rows), default=0)
    dense = torch.tensor([(r + [pad] * width)[:width] for r in rows], dtype=torch.int64)
    dense = dense.reshape(len(rows), width)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    assert _rows2(rk.RaggedTensor.from_dense(dense, lengths)) == rows
    # with pad_value, trailing pads are stripped, inner pads kept
    stripped = []
    for r in rows:
        r = list(r)
        while r and r[-1] == pad:
            r.pop()
        stripped.append(r)
    assert _rows2(rk.RaggedTensor.from_dense(dense, pad_value=pad)) == stripped


def test_from_dense_nan_pad_strips_trailing_nans_only() -> None:
    nan = math.nan
    dense = torch.tensor([[1.0, nan, 2.0, nan], [nan, nan, nan, nan], [3.0, 4.0, 5.0, 6.0]])
    r = rk.dense_to_ragged(dense, pad_value=nan)
    got = [[("nan" if math.isnan(v) else v) for v in row] for row in _rows2(r)]
    assert got == [[1.0, "nan", 2.0], [], [3.0, 4.0, 5.0, 6.0]]


# --------------------------------------------------------------------------------------------
# segment_reduce

_SEG_LENGTHS = st.lists(st.integers(0, 4), min_size=1, max_size=5)
_W = st.sampled_from([0.0, 1.0, -1.0, 0.5, 2.0, -0.25])


def _segment_ref(rows: np.ndarray, lengths, w: np.ndarray, mode: str, tile_len: int):
    d = rows.shape[1]
    out = []
    start = 0
    for n in lengths:
        e, ww = rows[start : start + n], w[start : start + n]
        start += n
        s = (ww[:, None] * e).sum(0) if n else np.zeros(d)
        if mode == "sum":
            out.append(s)
        elif mode == "mean":
            out.append(s / ww.sum() if n and ww.sum() != 0 else np.zeros(d))
        elif mode == "sqrtn":
            q = float((ww**2).sum())
            out.append(s / math.sqrt(q) if n and q != 0 else np.zeros(d))
        else:
            t = np.zeros((tile_len, d))
            k = min(n, tile_len)
            t[:k] = ww[:k, None] * e[:k]
            out.append(t.reshape(-1))
    width = d * tile_len if mode == "tile" else d
    return np.array(out).reshape(len(lengths), width)


@PROPS
@given(
    _SEG_LENGTHS,
    st.integers(1, 3),
    st.sampled_from(["sum", "mean", "sqrtn", "tile"]),
    st.integers(1, 3),
    st.booleans(),
    st.data(),
)
def test_segment_reduce_forward_matches_reference(lengths, d, mode, tile_len, weighted, data):
    n = sum(lengths)
    rng = np.random.default_rng(n * 31 + d)
    rows = rng.normal(size=(n, d))
    w = np.array(data.draw(st.lists(_W, min_size=n, max_size=n))) if weighted else np.ones(n)
    want = _segment_ref(rows, lengths, w, mode, tile_len)
    got = rk.segment_reduce(
        torch.from_numpy(rows),
        _off(lengths),
        torch.from_numpy(w) if weighted else None,
        mode=mode,
        tile_len=tile_len if mode == "tile" else None,
    )
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["sum", "mean", "sqrtn", "tile"])
@pytest.mark.parametrize("lengths", [[2, 0, 3], [0, 0]])
def test_segment_reduce_gradcheck_rows_and_weights(mode, lengths) -> None:
    n = sum(lengths)
    gen = torch.Generator().manual_seed(len(lengths) * 7 + n)
    rows = torch.randn(n, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    w = (torch.rand(n, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    offsets = _off(lengths)
    tile = 2 if mode == "tile" else None

    def f(r, ww):
        return rk.segment_reduce(r, offsets, ww, mode=mode, tile_len=tile)

    assert torch.autograd.gradcheck(f, (rows, w))
    # and against the same formula written in plain torch
    out = f(rows, w)
    ref = torch.from_numpy(
        _segment_ref(rows.detach().numpy(), lengths, w.detach().numpy(), mode, tile or 1)
    )
    torch.testing.assert_close(out.detach(), ref)


# --------------------------------------------------------------------------------------------
# feature_cross


def _cross_ref(a_rows, b_rows, a_w, b_w):
    out_rows, out_w = [], []
    for i in range(len(a_rows)):

        def distinct(ids, ws):
            seen: dict[int, float] = {}
            for x, wx in zip(ids, ws, strict=True):
                seen.setdefault(x, wx)
            return list(seen.items())

        da = distinct(a_rows[i], a_w[i] if a_w else [1.0] * len(a_rows[i]))
        db = distinct(b_rows[i], b_w[i] if b_w else [1.0] * len(b_rows[i]))
        out_rows.append(
            [_signed(murmur64a(struct.pack("<qq", x, y))) for x, _ in da for y, _ in db]
        )
        out_w.append([wx * wy for _, wx in da for _, wy in db])
    return out_rows, out_w


_IDS = st.lists(st.one_of(st.integers(-3, 3), st.sampled_from([INT64_MIN, INT64_MAX])), max_size=5)


@PROPS
@given(
    st.lists(st.tuples(_IDS, _IDS), max_size=5),
    st.booleans(),
    st.booleans(),
)
def test_feature_cross_matches_reference(rows, a_weighted, b_weighted) -> None:
    a_rows, b_rows = [a for a, _ in rows], [b for _, b in rows]
    a_w = [[0.5 + j for j in range(len(r))] for r in a_rows] if a_weighted else None
    b_w = [[2.0 - j / 4 for j in range(len(r))] for r in b_rows] if b_weighted else None
    want, want_w = _cross_ref(a_rows, b_rows, a_w, b_w)
    a, b = _r2(a_rows, a_w), _r2(b_rows, b_w)
    for got in (rk.feature_cross(a, b), rk.fused_feature_cross([(a, b), (b, a)])[0]):
        assert _rows2(got) == want
        if a_weighted or b_weighted:
            assert got.weights is not None
            assert _rows2(got, got.weights) == want_w
        else:
            assert got.weights is None


@PROPS
@given(st.lists(st.tuples(_KEY, _KEY), max_size=8))
def test_feature_cross_single_valued_matches_reference(pairs) -> None:
    a = torch.tensor([x for x, _ in pairs], dtype=torch.int64)
    b = torch.tensor([y for _, y in pairs], dtype=torch.int64)
    want = [[_signed(murmur64a(struct.pack("<qq", x, y)))] for x, y in pairs]
    assert _rows2(rk.feature_cross(a, b)) == want
    assert _rows2(rk.feature_cross(_r2([[x] for x, _ in pairs]), b)) == want


# --------------------------------------------------------------------------------------------
# sparse optimizer rows against torch.optim on dense copies of the touched rows

_OPT_CASES = {
    "sgd": (torch.optim.SGD, [{"lr": 0.1}, {"lr": 0.05, "weight_decay": 0.1}]),
    "adagrad": (
        torch.optim.Adagrad,
        [
            {"lr": 0.1},
            {"lr": 0.05, "lr_decay": 0.1, "weight_decay": 0.05, "initial_accumulator_value": 0.3},
        ],
    ),
    "adam": (
        torch.optim.Adam,
        [{"lr": 0.01}, {"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}],
    ),
    "adamw": (
        torch.optim.AdamW,
        [{"lr": 0.01}, {"lr": 0.02, "betas": (0.7, 0.9), "eps": 1e-5, "weight_decay": 0.3}],
    ),
}


def _apply_rows(name: str, kw: dict, param, grad, state) -> None:
    d = param.shape[1]
    if name == "sgd":
        rk.sgd_rows_(param, grad, lr=kw["lr"], weight_decay=kw.get("weight_decay", 0.0))
    elif name == "adagrad":
        rk.adagrad_rows_(
            param, grad, state[:, :d], state[:, d],
            lr=kw["lr"], lr_decay=kw.get("lr_decay", 0.0),
            weight_decay=kw.get("weight_decay", 0.0),
        )  # fmt: skip
    else:
        b1, b2 = kw.get("betas", (0.9, 0.999))
        rk.adam_rows_(
            param, grad, state[:, :d], state[:, d : 2 * d], state[:, 2 * d],
            lr=kw["lr"], beta1=b1, beta2=b2, eps=kw.get("eps", 1e-8),
            weight_decay=kw.get("weight_decay", 0.0 if name == "adam" else 0.01),
            decoupled=name == "adamw",
        )  # fmt: skip


@PROPS
@given(
    st.sampled_from(sorted(_OPT_CASES)),
    st.integers(0, 1),
    st.lists(st.sets(st.integers(0, 5), max_size=6), min_size=1, max_size=5),
)
def test_optimizer_rows_match_torch_optim(pytestconfig, name, case, touched_per_step) -> None:
    cls, cases = _OPT_CASES[name]
    kw = cases[case]
    num, d = 6, 3
    gen = torch.Generator().manual_seed(len(touched_per_step))
    table = torch.randn(num, d, generator=gen)
    width = d + rk.state_width(name, d)
    store = torch.zeros(num, width)  # one row: embedding then optimizer state
    store[:, :d] = table
    if name == "adagrad":
        store[:, d : 2 * d] = kw.get("initial_accumulator_value", 0.0)
    # the reference: one parameter per row; untouched rows get no grad (torch skips them)
    ref = [torch.nn.Parameter(table[i].clone()) for i in range(num)]
    opt = cls(ref, foreach=False, **kw)
    for touched in touched_per_step:
        rows = torch.tensor(sorted(touched), dtype=torch.int64)
        grad = torch.randn(rows.numel(), d, generator=gen)
        buf = store.index_select(0, rows)
        _apply_rows(name, kw, buf[:, :d], grad, buf[:, d:])
        store.index_copy_(0, rows, buf)
        for i, p in enumerate(ref):
            p.grad = None
            if i in touched:
                p.grad = grad[sorted(touched).index(i)].clone()
        opt.step()
    want = torch.stack([p.detach() for p in ref])
    if pytestconfig.getoption("--emulate-kernels"):
        # contiguous rows (a lone row, or SGD's stateless rows) run the kernel, which rounds
        # like the GPU (a fused multiply-add there), not bit for bit like torch on the CPU
        torch.testing.assert_close(store[:, :d], want, rtol=1e-5, atol=1e-6)
    else:
        # torch numerics: bit for bit what torch.optim computes on the CPU
        torch.testing.assert_close(store[:, :d], want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["adam", "adamw", "adagrad"])
def test_optimizer_rows_are_bit_exact_with_torch(name) -> None:
    # Dividing before scaling (param - lr * (m / denom)) was an ulp off torch's addcdiv.
    cls, cases = _OPT_CASES[name]
    kw = cases[1]
    gen = torch.Generator().manual_seed(0)
    n, d = 64, 8
    init = torch.randn(n, d, generator=gen)
    ref = torch.nn.Parameter(init.clone())
    opt = cls([ref], **kw)
    store = torch.zeros(n, d + rk.state_width(name, d))
    store[:, :d] = init
    if name == "adagrad":
        store[:, d : 2 * d] = kw["initial_accumulator_value"]
    for _ in range(10):
        grad = torch.randn(n, d, generator=gen)
        _apply_rows(name, kw, store[:, :d], grad, store[:, d:])
        ref.grad = grad.clone()
        opt.step()
    assert torch.equal(store[:, :d], ref.detach())


def _rowwise_adagrad_ref(param, grads, lr, eps, wd):
    p = param.astype(np.float64).copy()
    acc = np.zeros((p.shape[0], 1))
    for g in grads:
        g = g.astype(np.float64) + wd * p
        acc += (g**2).mean(1, keepdims=True)
        p -= lr * g / (np.sqrt(acc) + eps)
    return p


def _ftrl_ref(param, grads, lr, lr_power, l1, l2, beta, init_acc):
    w = param.astype(np.float64).copy()
    n = np.full_like(w, init_acc)
    z = np.zeros_like(w)
    for g in grads:
        g = g.astype(np.float64)
        n_new = n + g * g
        z += g - (n_new ** (-lr_power) - n ** (-lr_power)) / lr * w
        quad = (beta + n_new ** (-lr_power)) / lr + 2 * l2
        w = np.where(np.abs(z) > l1, (np.sign(z) * l1 - z) / quad, 0.0)
        n = n_new
    return w


@PROPS
@given(
    st.integers(1, 5),
    st.sampled_from([(0.1, 1e-8, 0.0), (0.05, 1e-3, 0.1)]),
    st.sampled_from(
        [(0.1, -0.5, 0.0, 0.0, 0.0), (0.05, -0.5, 0.01, 0.1, 0.5), (0.1, -0.3, 0.02, 0.0, 1.0)]
    ),
)
def test_rowwise_adagrad_and_ftrl_rows_match_reference(steps, rw, ftrl) -> None:
    gen = torch.Generator().manual_seed(steps)
    init = torch.randn(4, 3, generator=gen)
    grads = [torch.randn(4, 3, generator=gen) for _ in range(steps)]
    lr, eps, wd = rw
    p, acc = init.clone(), torch.zeros(4, 1)
    for g in grads:
        rk.rowwise_adagrad_rows_(p, g, acc, lr=lr, eps=eps, weight_decay=wd)
    want = _rowwise_adagrad_ref(init.numpy(), [g.numpy() for g in grads], lr, eps, wd)
    np.testing.assert_allclose(p.numpy(), want, rtol=1e-5, atol=1e-6)
    lr, lr_power, l1, l2, beta = ftrl
    p, n, z = init.clone(), torch.full((4, 3), 0.1), torch.zeros(4, 3)
    for g in grads:
        rk.ftrl_rows_(p, g, n, z, lr=lr, lr_power=lr_power, l1=l1, l2=l2, beta=beta)
    want = _ftrl_ref(init.numpy(), [g.numpy() for g in grads], lr, lr_power, l1, l2, beta, 0.1)
    np.testing.assert_allclose(p.numpy(), want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# RowStore across blocks, duplicate rows


@PROPS
@given(
    st.sampled_from([1, 2, 4]),
    st.integers(1, 12),
    st.lists(
        st.tuples(
            st.sampled_from(["gather", "scatter", "scatter_add"]),
            st.lists(st.integers(0, 11), max_size=10),
            st.integers(0, 2),
        ),
        max_size=6,
    ),
)
def test_row_store_matches_dense_reference(block_rows, num_rows, ops) -> None:
    width = 3
    s = rk.RowStore(width, dtype=torch.float64, block_rows=block_rows)
    s.reserve(num_rows)
    ref = np.zeros((num_rows, width))
    gen = np.random.default_rng(num_rows)
    for op, rows, start in ops:
        rows = [r % num_rows for r in rows]
        if op == "scatter":
            rows = list(dict.fromkeys(rows))  # scatter takes distinct rows
        idx = torch.tensor(rows, dtype=torch.int64)
        vals = gen.normal(size=(len(rows), width - start))
        if op == "gather":
            got = s.gather(idx, start)
            np.testing.assert_array_equal(got.numpy(), ref[rows][:, start:])
        elif op == "scatter":
            s.scatter(idx, torch.from_numpy(vals), start)
            ref[rows, start:] = vals
        else:
            s.scatter_add(idx, torch.from_numpy(vals), start)
            for r, v in zip(rows, vals, strict=True):
                ref[r, start:] += v
        everything = s.gather(torch.arange(num_rows))
        np.testing.assert_allclose(everything.numpy(), ref, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# long strings (every FarmHash length class and several 64-byte rounds), integer mixing


@PROPS
@given(st.lists(st.integers(0, 300), min_size=1, max_size=6), st.integers(0, 255))
def test_hash_bytes_long_strings_match_reference(lengths, fill) -> None:
    rng = np.random.default_rng(sum(lengths) + fill)
    strings = [bytes(rng.integers(0, 256, n, dtype=np.uint8)) for n in lengths]
    strings.append(bytes([fill]) * lengths[0])
    data = torch.tensor(list(b"".join(strings)), dtype=torch.uint8)
    offsets = torch.tensor([0, *np.cumsum([len(s) for s in strings]).tolist()], dtype=torch.int64)
    for algo, fn in (("farm", farm64), ("murmur", murmur64a)):
        assert rk.hash_bytes(data, offsets, algo).tolist() == [_signed(fn(s)) for s in strings]


def _fmix64_ref(k: int) -> int:
    k %= U64
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) % U64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) % U64
    return k ^ (k >> 33)


@PROPS
@given(
    st.lists(_ANY64, max_size=12),
    st.lists(st.one_of(st.just(0), st.integers(1, INT64_MAX)), min_size=1, max_size=3),
    st.integers(1, 9),
)
def test_mix64_multi_hash_owner_rank_match_reference(ids, buckets, world) -> None:
    x = torch.tensor(ids, dtype=torch.int64)
    assert rk.mix64(x).tolist() == [_signed(_fmix64_ref(v)) for v in ids]
    g = 0x9E3779B97F4A7C15
    want = []
    for v in ids:
        hs = [_fmix64_ref(v + (k + 1) * g) for k in range(len(buckets))]
        want.append([h % b if b else _signed(h) for h, b in zip(hs, buckets, strict=True)])
    assert rk.multi_hash(x, buckets).reshape(len(ids), len(buckets)).tolist() == want
    assert rk.owner_rank(x, world).tolist() == [_fmix64_ref(v) % world for v in ids]
    # partition_ids: distinct ids grouped by owner rank, inverse mapping back
    p = rk.partition_ids(x, world)
    counts = p.counts.tolist()
    assert sorted(p.ids.tolist()) == sorted(set(ids))
    assert (p.ids[p.inverse] if ids else p.ids).tolist() == ids
    ranks = [_fmix64_ref(v) % world for v in p.ids.tolist()]
    assert ranks == sorted(ranks)
    assert counts == [ranks.count(r) for r in range(world)]
    u = rk.unique(x)
    assert u.unique_ids.tolist() == sorted(set(ids))
    assert u.counts.tolist() == [ids.count(v) for v in sorted(set(ids))]
    assert u.unique_ids[u.inverse].tolist() == ids


@PROPS
@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(-6, 6), max_size=40), st.lists(st.integers(-3, 3), max_size=20)
        ),
        max_size=4,
    )
)
def test_feature_cross_long_rows_match_reference(rows) -> None:
    # rows longer than 16 ids deduplicate by sorting: the first-occurrence order must hold
    a_rows, b_rows = [a for a, _ in rows], [b for _, b in rows]
    a_w = [[1.0 + j for j in range(len(r))] for r in a_rows]
    want, want_w = _cross_ref(a_rows, b_rows, a_w, None)
    got = rk.feature_cross(_r2(a_rows, a_w), _r2(b_rows))
    assert _rows2(got) == want
    assert _rows2(got, got.weights) == want_w


@PROPS
@given(_ROWS3, st.sampled_from([0, -1]))
def test_from_dense_3level_matches_reference(rows, pad) -> None:
    s = max((len(r) for r in rows), default=0)
    length = max((len(x) for r in rows for x in r), default=0)
    dense = torch.tensor(
        [
            [(x + [pad] * length)[:length] for x in r] + [[pad] * length] * (s - len(r))
            for r in rows
        ],
        dtype=torch.int64,
    ).reshape(len(rows), s, length)
    lengths = [
        torch.tensor([len(r) for r in rows], dtype=torch.int64),
        torch.tensor(
            [[len(x) for x in r] + [0] * (s - len(r)) for r in rows], dtype=torch.int64
        ).reshape(len(rows), s),
    ]
    assert _rows3(rk.dense_to_ragged(dense, lengths)) == rows
    # pad_value: trailing pads stripped from each sub-row, then trailing empty sub-rows
    want = []
    for r in rows:
        subs = []
        for x in r + [[]] * (s - len(r)):
            x = list(x)
            while x and x[-1] == pad:
                x.pop()
            subs.append(x)
        while subs and not subs[-1]:
            subs.pop()
        want.append(subs)
    assert _rows3(rk.dense_to_ragged(dense, pad_value=pad)) == want


def test_segment_reduce_weights_dtype_error_names_each_dtype_once() -> None:
    rows = torch.zeros(2, 3)
    with pytest.raises(
        rk.UnsupportedDtypeError,
        match=r"^segment_reduce: weights has dtype float64, expected float32$",
    ):
        rk.segment_reduce(rows, torch.tensor([0, 2]), torch.ones(2, dtype=torch.float64))
