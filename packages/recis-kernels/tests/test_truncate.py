from __future__ import annotations

import pytest
import torch
from conftest import ragged3_from_rows, ragged3_rows, ragged_from_rows, ragged_rows
from hypothesis import given
from hypothesis import strategies as st

import recis_kernels as rk
from recis_kernels import RaggedTensor

rows_st = st.lists(st.lists(st.integers(-100, 100), max_size=7), max_size=6)
rows3_st = st.lists(st.lists(st.lists(st.integers(-100, 100), max_size=3), max_size=5), max_size=5)


def cut(row, max_len, side):
    if len(row) <= max_len:
        return list(row)
    return list(row[:max_len]) if side == "head" else list(row[len(row) - max_len :])


@given(rows=rows_st, max_len=st.integers(0, 8), side=st.sampled_from(["head", "tail"]))
def test_truncate2_matches_reference(rows, max_len, side):
    weights = [[float(v) for v in r] for r in rows]
    res = rk.truncate(ragged_from_rows(rows, weights), max_len, side)
    assert ragged_rows(res.values) == [cut(r, max_len, side) for r in rows]
    assert res.values.weights.tolist() == [float(v) for r in rows for v in cut(r, max_len, side)]
    assert res.dropped.tolist() == [max(len(r) - max_len, 0) for r in rows]
    assert res.padded.tolist() == [max(max_len - len(r), 0) for r in rows]
    res.values.validate()


@given(rows=rows3_st, max_len=st.integers(0, 6), side=st.sampled_from(["head", "tail"]))
def test_truncate3_pads_outer_level(rows, max_len, side):
    r = ragged3_from_rows(rows)
    r = rk.RaggedTensor(r.values, r.offsets, r.values.to(torch.float32))
    res = rk.truncate(r, max_len, side)
    # Weights were set equal to the values, so they must still match after truncation.
    assert torch.equal(res.values.weights, res.values.values.to(torch.float32))
    expected = [cut(r, max_len, side) + [[]] * max(max_len - len(r), 0) for r in rows]
    assert ragged3_rows(res.values) == expected
    assert res.values.lengths(0).tolist() == [max_len] * len(rows)
    assert res.dropped.tolist() == [max(len(r) - max_len, 0) for r in rows]
    assert res.padded.tolist() == [max(max_len - len(r), 0) for r in rows]
    res.values.validate()


@given(
    feats=st.lists(
        st.tuples(
            st.one_of(rows_st, rows3_st), st.integers(0, 5), st.sampled_from(["head", "tail"])
        ),
        max_size=5,
    )
)
def test_fused_truncate_matches_single(feats):
    rs = []
    for rows, _, _ in feats:
        three = any(isinstance(x, list) for r in rows for x in r)
        rs.append(ragged3_from_rows(rows) if three else ragged_from_rows(rows))
    fused = rk.fused_truncate(rs, [m for _, m, _ in feats], [s for _, _, s in feats])
    for got, r, (_, m, s) in zip(fused, rs, feats, strict=True):
        single = rk.truncate(r, m, s)
        assert torch.equal(got.values.values, single.values.values)
        for x, y in zip(got.values.offsets, single.values.offsets, strict=True):
            assert torch.equal(x, y)
        assert torch.equal(got.dropped, single.dropped)
        assert torch.equal(got.padded, single.padded)


def test_truncate_errors():
    r = ragged_from_rows([[1, 2]])
    with pytest.raises(
        ValueError, match="truncate: side for r must be 'head' or 'tail', got 'middle'"
    ):
        rk.truncate(r, 1, "middle")
    for bad in (-1, 2**63):
        with pytest.raises(
            ValueError,
            match=rf"truncate: max_len for r must be an int in \[0, 2\*\*63 - 1\], got {bad}",
        ):
            rk.truncate(r, bad)
    with pytest.raises(ValueError, match=r"fused_truncate: max_len for rs\[0\] must be an int"):
        rk.fused_truncate([r], [2**64], ["head"])
    # 3 levels pad every row to max_len sub-rows: beyond int64 offsets, the cumulative sum
    # wrapped into a bare IndexError.
    three = rk.RaggedTensor(
        torch.arange(3), [torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3])]
    )
    with pytest.raises(
        rk.ShapeError,
        match=r"padding the 3 rows of rs\[1\] to max_len=4611686018427387904 sub-rows each "
        r"makes 13835058055282163715 sub-rows in all, more than int64 offsets hold",
    ):
        rk.fused_truncate([three, three], [1, 2**62], ["head", "tail"])
    with pytest.raises(rk.RaggedError, match="truncate: r must be a RaggedTensor"):
        rk.truncate(torch.tensor([1]), 1)
    with pytest.raises(ValueError, match="fused_truncate: got 1 inputs, 2 max_lens and 1 sides"):
        rk.fused_truncate([r], [1, 2], ["head"])


def test_truncate_device_matches_cpu(device):
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(0, 40, (500,), generator=g)
    r = rk.RaggedTensor(
        torch.randint(0, 1000, (int(lengths.sum()),), generator=g),
        torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
        torch.rand(int(lengths.sum()), generator=g),
    )
    r3 = ragged3_from_rows([[[1, 2], [3], [], [4, 5, 6]], [], [[7]]])
    for side in ("head", "tail"):
        cpu = rk.fused_truncate([r, r3, r], [10, 2, 0], [side, side, "head"])
        dev = rk.fused_truncate(
            [r.to(device), r3.to(device), r.to(device)], [10, 2, 0], [side, side, "head"]
        )
        for c, d in zip(cpu, dev, strict=True):
            assert torch.equal(c.values.values, d.values.values.cpu())
            for x, y in zip(c.values.offsets, d.values.offsets, strict=True):
                assert torch.equal(x, y.cpu())
            assert torch.equal(c.dropped, d.dropped.cpu())


@pytest.mark.parametrize("values_dtype", [torch.int64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
def test_host_truncation_matches_the_torch_path(monkeypatch, values_dtype, weighted):
    """Eager CPU truncation (by deletion, in NumPy) equals the torch path that compiled code
    runs: values with trailing dims, dtypes NumPy lacks, weights, both sides, fused features."""
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 40, (300,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    n = int(offsets[-1])
    values = torch.randn(n, 3, generator=gen).mul(100).to(values_dtype)
    weights = torch.rand(n, generator=gen) if weighted else None
    r = RaggedTensor(values, [offsets], weights)
    short = RaggedTensor(values[: int(offsets[7])], [offsets[:8]], None)
    args = ([r, short, r], [10, 2, 50], ["tail", "head", "head"])
    host = rk.fused_truncate(*args)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    reference = rk.fused_truncate(*args)
    for got, want in zip(host, reference, strict=True):
        assert torch.equal(got.values.values, want.values.values)
        assert torch.equal(got.values.offsets[0], want.values.offsets[0])
        assert (got.values.weights is None) == (want.values.weights is None)
        if got.values.weights is not None:
            assert torch.equal(got.values.weights, want.values.weights)
        assert torch.equal(got.dropped, want.dropped)
        assert torch.equal(got.padded, want.padded)


def test_fused_truncate_keeps_each_inputs_dtype_and_shape():
    # Mixed values dtypes and trailing shapes used to be concatenated (int64 ids promoted to
    # float32, or a raw torch.cat error); each result must equal truncate of its input alone.
    ids = RaggedTensor(torch.tensor([2**40 + 1, 7, 2**62 + 3]), torch.tensor([0, 2, 3]))
    flt = RaggedTensor(torch.tensor([0.5, 1.5]), torch.tensor([0, 1, 2]))
    emb = RaggedTensor(torch.arange(12.0).view(3, 4), torch.tensor([0, 3]))
    ids2 = RaggedTensor(torch.tensor([2**53 + 1]), torch.tensor([0, 1]))
    rs = [ids, flt, emb, ids2]
    fused = rk.fused_truncate(rs, [1, 5, 2, 5], ["head", "tail", "tail", "head"])
    for got, r, m, s in zip(fused, rs, [1, 5, 2, 5], ["head", "tail", "tail", "head"], strict=True):
        alone = rk.truncate(r, m, s)
        assert got.values.values.dtype == r.values.dtype
        assert torch.equal(got.values.values, alone.values.values)
        assert torch.equal(got.values.offsets[0], alone.values.offsets[0])
        assert torch.equal(got.dropped, alone.dropped)
        assert torch.equal(got.padded, alone.padded)
    assert fused[0].values.values.tolist() == [2**40 + 1, 2**62 + 3]


def test_fused_truncate_adds_no_weights_to_unweighted_inputs():
    w = RaggedTensor(torch.tensor([1, 2]), torch.tensor([0, 2]), torch.tensor([2.0, 3.0]))
    u = RaggedTensor(torch.tensor([1, 2]), torch.tensor([0, 2]))
    u3 = ragged3_from_rows([[[1], [2, 3]]])
    w3 = RaggedTensor(u3.values, u3.offsets, torch.tensor([0.5, 1.0, 2.0]))
    out = rk.fused_truncate([w, u, w3, u3], [1, 1, 1, 1], ["head"] * 4)
    assert out[0].values.weights.tolist() == [2.0]
    assert out[1].values.weights is None
    assert out[2].values.weights.tolist() == [0.5]
    assert out[3].values.weights is None


def test_overlapped_truncations_equal_in_place_ones():
    """Inside ``overlap`` a large row copy runs on a pool thread; once its block ends (or
    ``finish_overlapped`` returns) the result equals the copy made in place, also when the
    block raises, in nested blocks, and with one thread (no copy deferred)."""
    from recis_kernels import _overlap

    before = torch.get_num_threads()
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 120, (20_000,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    r = rk.RaggedTensor(torch.randint(-9, 9, (int(offsets[-1]),), generator=g), [offsets])
    want = rk.truncate(r, 50, "tail").values
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            with rk.overlap():
                first = rk.fused_truncate([r], [50], ["tail"])[0]
                with rk.overlap():  # nested: waits for its own copy, not the outer one
                    got = rk.fused_truncate([r, r], [50, 50], ["tail", "tail"])
                    outer = _overlap._current().parent
                    assert len(_overlap._current().pending) == (0 if threads == 1 else 1)
                assert len(outer.pending) == (0 if threads == 1 else 1)
                rk.finish_overlapped()
                assert not _overlap._current().pending
                late = rk.fused_truncate([r], [50], ["tail"])[0]
            for t in (first, *got, late):
                assert torch.equal(t.values.values, want.values)
                assert torch.equal(t.values.offsets[0], want.offsets[0])
            kept: list = []
            with pytest.raises(RuntimeError, match="stop"):
                _truncate_then_raise(r, kept)
            assert _overlap._current() is None
            assert torch.equal(kept[0].values.values, want.values)
    finally:
        torch.set_num_threads(before)
    rk.finish_overlapped()  # outside a block: nothing to wait for


def _truncate_then_raise(r, kept: list) -> None:
    with rk.overlap():
        kept.append(rk.fused_truncate([r], [50], ["tail"])[0])
        raise RuntimeError("stop")
