from __future__ import annotations

import struct

import pytest
import torch
from conftest import EXTREME_IDS, ragged_from_rows, ragged_rows, signed64
from hash_reference import murmur64a
from hypothesis import given
from hypothesis import strategies as st

import recis_kernels as rk

id_st = st.one_of(
    st.integers(-3, 3), st.sampled_from(EXTREME_IDS), st.integers(-(1 << 63), (1 << 63) - 1)
)


def pair_hash(x: int, y: int) -> int:
    return signed64(murmur64a(struct.pack("<qq", x, y)))


def distinct(row, weights):
    seen, ids, ws = set(), [], []
    for v, w in zip(row, weights, strict=True):
        if v not in seen:
            seen.add(v)
            ids.append(v)
            ws.append(w)
    return ids, ws


def ref_cross(a_rows, b_rows, a_w, b_w):
    out, out_w = [], []
    for ra, rb, wa, wb in zip(a_rows, b_rows, a_w, b_w, strict=True):
        ia, ja = distinct(ra, wa)
        ib, jb = distinct(rb, wb)
        out.append([pair_hash(x, y) for x in ia for y in ib])
        out_w.append([p * q for p in ja for q in jb])
    return out, out_w


@st.composite
def pair_st(draw):
    n = draw(st.integers(0, 6))
    a = [draw(st.lists(id_st, max_size=5)) for _ in range(n)]
    b = [draw(st.lists(id_st, max_size=5)) for _ in range(n)]
    aw = [[draw(st.sampled_from([0.5, 1.0, 2.0])) for _ in r] for r in a]
    bw = [[draw(st.sampled_from([0.25, 1.0, 3.0])) for _ in r] for r in b]
    return a, b, aw, bw


@given(case=pair_st(), weighted=st.booleans())
def test_feature_cross_matches_reference(case, weighted):
    a, b, aw, bw = case
    ra = ragged_from_rows(a, aw if weighted else None)
    rb = ragged_from_rows(b, bw)
    out = rk.feature_cross(ra, rb)
    exp, exp_w = ref_cross(a, b, aw if weighted else [[1.0] * len(r) for r in a], bw)
    assert ragged_rows(out) == exp
    assert out.weights.tolist() == [w for r in exp_w for w in r]
    out.validate()


@given(
    ids=st.lists(st.tuples(id_st, id_st, st.sampled_from([0.5, 2.0]), st.sampled_from([3.0, 1.0]))),
    sides=st.sampled_from(["", "a", "b", "ab"]),
)
def test_single_id_rows_cross_value_by_value(ids, sides):
    """One id on each side of every row (crosses of single-valued features): same hashes and
    weight products as the general rule, and no weights when neither side has any."""
    a, b = [[x] for x, *_ in ids], [[y] for _, y, *_ in ids]
    wa, wb = [[w] for *_, w, _ in ids], [[w] for *_, w in ids]
    ra = ragged_from_rows(a, wa if "a" in sides else None)
    rb = ragged_from_rows(b, wb if "b" in sides else None)
    out = rk.feature_cross(ra, rb)
    ones = [[1.0]] * len(ids)
    exp, exp_w = ref_cross(a, b, wa if "a" in sides else ones, wb if "b" in sides else ones)
    assert ragged_rows(out) == exp
    assert out.offsets[0].tolist() == list(range(len(ids) + 1))
    if sides:
        assert out.weights.tolist() == [w for (w,) in exp_w]
    else:
        assert out.weights is None


@given(
    ids=st.lists(st.tuples(id_st, id_st), max_size=8),
    more=st.lists(st.tuples(id_st, id_st), max_size=8),
)
def test_dense_single_valued_sides_cross_like_one_id_rows(ids, more):
    """A (B,) int64 tensor is a feature with one id per row: dense pairs, mixed dense/ragged
    pairs and their ragged equivalents give the same crosses."""
    dense = [
        tuple(torch.tensor([t[j] for t in p], dtype=torch.int64) for j in (0, 1))
        for p in (ids, more)
    ]
    ragged = [tuple(ragged_from_rows([[v] for v in t.tolist()]) for t in pair) for pair in dense]
    mixed = [(dense[0][0], ragged[0][1]), (ragged[1][0], dense[1][1])]
    expected = rk.fused_feature_cross(ragged)
    for got in (rk.fused_feature_cross(dense), rk.fused_feature_cross(mixed)):
        for g, e in zip(got, expected, strict=True):
            assert torch.equal(g.values, e.values)
            assert torch.equal(g.offsets[0], e.offsets[0])
            assert g.weights is None
    assert ragged_rows(expected[0]) == [[pair_hash(x, y)] for x, y in ids]


@pytest.mark.parametrize("longest", [2, 16, 17, 40])
def test_repeated_ids_in_rows_of_every_length(longest):
    """Repeats are dropped by comparing neighbours up to 16 ids apart in rows up to 16 long,
    and by sorting in longer rows: the same crosses as the reference either way."""
    gen = torch.Generator().manual_seed(longest)
    lengths = torch.randint(0, longest + 1, (60,), generator=gen).tolist()
    lengths[0] = longest
    a = [torch.randint(-3, 4, (n,), generator=gen).tolist() for n in lengths]
    b = [torch.randint(0, 3, (n % 4,), generator=gen).tolist() for n in lengths]
    wa = [[float(1 + (v % 3)) for v in r] for r in a]
    out = rk.feature_cross(ragged_from_rows(a, wa), ragged_from_rows(b))
    exp, exp_w = ref_cross(a, b, wa, [[1.0] * len(r) for r in b])
    assert ragged_rows(out) == exp
    assert out.weights.tolist() == [w for r in exp_w for w in r]


def test_unweighted_cross_has_no_weights_and_uses_murmur_bytes():
    a = ragged_from_rows([[1, 2, 1], [], [5]])
    b = ragged_from_rows([[7, 8], [3], [6, 6]])
    out = rk.feature_cross(a, b)
    assert out.weights is None
    assert out.offsets[0].tolist() == [0, 4, 4, 5]
    data = torch.tensor(list(struct.pack("<qq", 1, 7)), dtype=torch.uint8)
    assert out.values[0].item() == rk.hash_bytes(data, torch.tensor([0, 16]), "murmur").item()


@given(cases=st.lists(pair_st(), max_size=4))
def test_fused_cross_matches_per_pair(cases):
    pairs = [(ragged_from_rows(a, aw), ragged_from_rows(b)) for a, b, aw, _ in cases]
    fused = rk.fused_feature_cross(pairs)
    assert len(fused) == len(pairs)
    for got, (a, b) in zip(fused, pairs, strict=True):
        single = rk.feature_cross(a, b)
        assert torch.equal(got.values, single.values)
        assert torch.equal(got.offsets[0], single.offsets[0])
        assert torch.equal(got.weights, single.weights)


@given(
    cases=st.lists(pair_st(), max_size=3),
    dense=st.lists(st.tuples(id_st, id_st), max_size=6),
    buckets=st.lists(st.integers(0, (1 << 63) - 1) | st.integers(0, 9), min_size=5, max_size=5),
)
def test_buckets_reduce_each_cross_like_mod(cases, dense, buckets):
    """With bucket counts, each crossed id is its unsigned remainder (``mod``), whatever the
    layout: dense pairs (hashed and reduced in one pass), ragged weighted ones, mixed."""
    pairs = [(ragged_from_rows(a, aw), ragged_from_rows(b, bw)) for a, b, aw, bw in cases]
    x = torch.tensor([p[0] for p in dense], dtype=torch.int64)
    y = torch.tensor([p[1] for p in dense], dtype=torch.int64)
    pairs += [(x, y), (x, ragged_from_rows([[v] for v in y.tolist()]))]
    ns = buckets[: len(pairs)]
    got = rk.fused_feature_cross(pairs, buckets=ns)
    for g, (a, b), n in zip(got, pairs, ns, strict=True):
        want = rk.feature_cross(a, b)
        assert torch.equal(g.values, rk.mod(want.values, n) if n else want.values)
        assert torch.equal(g.offsets[0], want.offsets[0])
        assert (g.weights is None) == (want.weights is None)
        if want.weights is not None:
            assert torch.equal(g.weights, want.weights)
        single = rk.feature_cross(a, b, buckets=n)
        assert torch.equal(single.values, g.values)


def test_bucket_errors():
    x = torch.tensor([1, 2])
    with pytest.raises(
        rk.ArgumentError,
        match=r"^feature_cross: buckets must be an int in \[0, 2\*\*63 - 1\], got -1$",
    ):
        rk.feature_cross(x, x, buckets=-1)
    with pytest.raises(
        rk.ArgumentError,
        match=r"^fused_feature_cross: buckets\[1\] must be an int in \[0, 2\*\*63 - 1\], "
        r"got 9223372036854775808$",
    ):
        rk.fused_feature_cross([(x, x), (x, x)], buckets=[3, 1 << 63])
    with pytest.raises(
        rk.ArgumentError, match=r"^fused_feature_cross: got 1 pairs but 2 bucket counts$"
    ):
        rk.fused_feature_cross([(x, x)], buckets=[3, 4])
    with pytest.raises(rk.ArgumentError, match=r"buckets must be a list of ints, got 3"):
        rk.fused_feature_cross([(x, x)], buckets=3)


def test_cross_errors():
    a = ragged_from_rows([[1]])
    with pytest.raises(
        rk.RaggedError, match="feature_cross: pairs\\[0\\] has 1 rows in a but 2 in b"
    ):
        rk.feature_cross(a, ragged_from_rows([[1], [2]]))
    with pytest.raises(
        rk.UnsupportedDtypeError, match=r"feature_cross: b\.values must be 1-d int64 ids"
    ):
        rk.feature_cross(a, ragged_from_rows([[1.0]], dtype=torch.float32))
    with pytest.raises(
        rk.RaggedError, match="feature_cross: a must be a RaggedTensor or a 1-d int64 tensor"
    ):
        rk.feature_cross([1], a)
    with pytest.raises(
        rk.UnsupportedDtypeError,
        match=r"feature_cross: b as a dense tensor must be 1-d int64 ids \(one per row\), got "
        r"torch.int64 of shape \(1, 1\)",
    ):
        rk.feature_cross(a, torch.tensor([[1]]))
    with pytest.raises(rk.RaggedError, match="pairs\\[0\\] has 1 rows in a but 2 in b"):
        rk.fused_feature_cross([(torch.tensor([1]), torch.tensor([1, 2]))])
    with pytest.raises(
        rk.RaggedError, match="fused_feature_cross: pairs\\[0\\] must be an \\(a, b\\) pair"
    ):
        rk.fused_feature_cross([(a,)])


def test_cross_device_matches_cpu(device):
    g = torch.Generator().manual_seed(1)
    rows = 300
    la = torch.randint(0, 6, (rows,), generator=g)
    lb = torch.randint(0, 6, (rows,), generator=g)
    a = rk.RaggedTensor(
        torch.randint(-5, 5, (int(la.sum()),), generator=g),
        torch.cat([torch.zeros(1, dtype=torch.int64), la.cumsum(0)]),
    )
    b = rk.RaggedTensor(
        torch.randint(-(1 << 62), 1 << 62, (int(lb.sum()),), generator=g),
        torch.cat([torch.zeros(1, dtype=torch.int64), lb.cumsum(0)]),
        torch.rand(int(lb.sum()), generator=g),
    )
    for buckets in (None, [(1 << 22) + 15, 0]):
        cpu = rk.fused_feature_cross([(a, b), (b, a)], buckets=buckets)
        dev = rk.fused_feature_cross(
            [(a.to(device), b.to(device)), (b.to(device), a.to(device))], buckets=buckets
        )
        for c, d in zip(cpu, dev, strict=True):
            assert torch.equal(c.values, d.values.cpu())
            assert torch.equal(c.offsets[0], d.offsets[0].cpu())
            assert torch.equal(c.weights, d.weights.cpu())


def test_fused_cross_adds_no_weights_to_unweighted_pairs():
    w = rk.RaggedTensor(torch.tensor([1, 2]), torch.tensor([0, 2]), torch.tensor([2.0, 3.0]))
    u = rk.RaggedTensor(torch.tensor([1, 2]), torch.tensor([0, 2]))
    b = rk.RaggedTensor(torch.tensor([5]), torch.tensor([0, 1]))
    out = rk.fused_feature_cross([(w, b), (u, b), (b, w)])
    assert out[0].weights.tolist() == [2.0, 3.0]
    assert out[1].weights is None
    assert rk.feature_cross(u, b).weights is None
    assert out[2].weights.tolist() == [2.0, 3.0]
    assert torch.equal(out[1].values, rk.feature_cross(u, b).values)


def ref_weight_grads(a_rows, b_rows, a_w, b_w, grads):
    """The gradients of ``sum(grads * weights)`` by the definition: a pair's weight is the
    product of its ids' first occurrences' weights; repeats dropped within a row get none."""
    ga = [[0.0] * len(r) for r in a_rows]
    gb = [[0.0] * len(r) for r in b_rows]
    k = 0
    for r, (ra, rb) in enumerate(zip(a_rows, b_rows, strict=True)):
        first_a = [i for i, v in enumerate(ra) if v not in ra[:i]]
        first_b = [j for j, v in enumerate(rb) if v not in rb[:j]]
        for i in first_a:
            for j in first_b:
                ga[r][i] += grads[k] * b_w[r][j]
                gb[r][j] += grads[k] * a_w[r][i]
                k += 1
    return [g for r in ga for g in r], [g for r in gb for g in r]


def _weighted(rows, weights):
    ragged = ragged_from_rows(rows, weights)
    ragged.weights.requires_grad_()
    return ragged


def _grad(ragged):
    g = ragged.weights.grad
    return torch.zeros_like(ragged.weights) if g is None else g


@given(case=pair_st(), sides=st.sampled_from(["a", "b", "both"]))
def test_cross_weight_gradients_match_reference(case, sides):
    a, b, aw, bw = case
    ones_a, ones_b = [[1.0] * len(r) for r in a], [[1.0] * len(r) for r in b]
    ra = _weighted(a, aw) if sides != "b" else ragged_from_rows(a)
    rb = _weighted(b, bw) if sides != "a" else ragged_from_rows(b)
    out = rk.feature_cross(ra, rb)
    grads = torch.arange(1, out.values.numel() + 1, dtype=torch.float32) / 2
    (out.weights * grads).sum().backward()
    exp_a, exp_b = ref_weight_grads(
        a, b, aw if sides != "b" else ones_a, bw if sides != "a" else ones_b, grads.tolist()
    )
    if sides != "b":
        torch.testing.assert_close(_grad(ra), torch.tensor(exp_a, dtype=torch.float32))
    if sides != "a":
        torch.testing.assert_close(_grad(rb), torch.tensor(exp_b, dtype=torch.float32))


def test_fused_cross_weight_gradients_add_up_over_pairs():
    g = torch.Generator().manual_seed(3)
    a = _weighted([[1, 2, 1], [], [5, 5, 6]], [[0.5, 2.0, 3.0], [], [1.5, 4.0, 0.25]])
    b = _weighted([[7, 8], [3], [6, 6]], [[1.0, 2.0], [3.0], [5.0, 7.0]])
    outs = rk.fused_feature_cross([(a, b), (b, a), (a, a)])
    grads = [torch.rand(o.values.numel(), generator=g) for o in outs]
    sum((o.weights * w).sum() for o, w in zip(outs, grads, strict=True)).backward()
    fused = _grad(a).clone(), _grad(b).clone()
    a.weights.grad = b.weights.grad = None
    for (x, y), w in zip([(a, b), (b, a), (a, a)], grads, strict=True):
        (rk.feature_cross(x, y).weights * w).sum().backward()
    torch.testing.assert_close(fused, (_grad(a), _grad(b)))


@pytest.mark.parametrize("longest", [3, 20])  # rows deduplicated by shifts, then by sorting
def test_cross_weight_gradcheck(longest):
    g = torch.Generator().manual_seed(longest)
    lengths = torch.tensor([longest, 0, 2, 1, 4])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    n = int(offsets[-1])
    av = torch.randint(0, 4, (n,), generator=g)  # few distinct ids: rows repeat them
    bv = torch.randint(0, 3, (n,), generator=g)
    aw = (torch.rand(n, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    bw = (torch.rand(n, generator=g, dtype=torch.float64) + 0.5).requires_grad_()

    def crossed_weights(aw, bw):
        return torch.ops.recis.feature_cross(av, offsets, aw, bv, offsets, bw)[2]

    assert torch.autograd.gradcheck(crossed_weights, (aw, bw))
    assert torch.autograd.gradcheck(lambda w: crossed_weights(w, None), (aw,))


def test_cross_weight_gradients_on_device_match_cpu(device):
    g = torch.Generator().manual_seed(4)
    rows = 200
    la = torch.randint(0, 6, (rows,), generator=g)
    lb = torch.randint(0, 6, (rows,), generator=g)
    offsets_a = torch.cat([torch.zeros(1, dtype=torch.int64), la.cumsum(0)])
    offsets_b = torch.cat([torch.zeros(1, dtype=torch.int64), lb.cumsum(0)])
    ids_a = torch.randint(-3, 3, (int(la.sum()),), generator=g)
    ids_b = torch.randint(-3, 3, (int(lb.sum()),), generator=g)
    wa, wb = torch.rand(ids_a.numel(), generator=g), torch.rand(ids_b.numel(), generator=g)
    grads = []
    for where in ("cpu", device):
        leaves = [w.detach().to(where).requires_grad_() for w in (wa, wb)]
        a = rk.RaggedTensor(ids_a.to(where), offsets_a.to(where), leaves[0])
        b = rk.RaggedTensor(ids_b.to(where), offsets_b.to(where), leaves[1])
        rk.feature_cross(a, b).weights.square().sum().backward()
        grads.append(tuple(w.grad.cpu() for w in leaves))
    torch.testing.assert_close(grads[0], grads[1])
