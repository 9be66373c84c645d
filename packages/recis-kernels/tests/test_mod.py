from __future__ import annotations

import pytest
import torch
from conftest import EXTREME_IDS, INT64_MAX
from hypothesis import given
from hypothesis import strategies as st

import recis_kernels as rk

ids_st = st.lists(
    st.one_of(st.integers(-(1 << 63), (1 << 63) - 1), st.sampled_from(EXTREME_IDS)), max_size=40
)
n_st = st.one_of(
    st.integers(1, 1000), st.integers(1, INT64_MAX), st.sampled_from([1, 2, INT64_MAX])
)


def ref_mod(ids: list[int], n: int) -> list[int]:
    return [(i % (1 << 64)) % n for i in ids]


@given(ids=ids_st, n=n_st)
def test_mod_matches_python_unsigned(ids, n):
    out = rk.mod(torch.tensor(ids, dtype=torch.int64), n)
    assert out.dtype == torch.int64
    assert out.tolist() == ref_mod(ids, n)


@given(data=st.lists(st.tuples(ids_st, n_st), max_size=5))
def test_fused_mod_matches_per_feature(data):
    ids_list = [torch.tensor(i, dtype=torch.int64) for i, _ in data]
    outs = rk.fused_mod(ids_list, [n for _, n in data])
    assert len(outs) == len(data)
    for out, (ids, n) in zip(outs, data, strict=True):
        assert out.tolist() == ref_mod(ids, n)


def test_mod_keeps_shape_and_examples(device):
    ids = torch.tensor([[7, -1], [INT64_MAX, -(1 << 63)]], device=device)
    out = rk.mod(ids, 10)
    assert out.shape == (2, 2)
    assert out.cpu().tolist() == [[7, 5], [7, 8]]


def test_fused_mod_device_matches_cpu(device):
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(-(1 << 62), 1 << 62, (n,), generator=g) for n in (0, 1, 1000, 5000)]
    ns = [7, 1 << 40, 3, INT64_MAX]
    expected = rk.fused_mod(ids, ns)
    got = rk.fused_mod([t.to(device) for t in ids], ns)
    for e, o in zip(expected, got, strict=True):
        assert torch.equal(e, o.cpu())


@pytest.mark.parametrize("n", [0, -3, 1 << 63, 2.5, True])
def test_mod_rejects_bad_modulus(n):
    with pytest.raises(ValueError, match=r"mod: n must be an int in \[1, 2\*\*63 - 1\]"):
        rk.mod(torch.tensor([1]), n)


def test_mod_rejects_non_int64():
    with pytest.raises(rk.UnsupportedDtypeError, match="mod: ids has dtype int32, expected int64"):
        rk.mod(torch.tensor([1], dtype=torch.int32), 3)


def test_fused_mod_rejects_count_mismatch():
    with pytest.raises(ValueError, match="got 1 id tensors but 2 moduli"):
        rk.fused_mod([torch.tensor([1])], [2, 3])


def test_mod_opcheck():
    torch.library.opcheck(
        torch.ops.recis.fused_mod.default, (torch.tensor([1, -1, 5]), [1, 2], [3, 4])
    )


@given(data=st.lists(ids_st.map(lambda x: (x + [0] * 6)[:6]), min_size=2, max_size=5), ns=st.data())
def test_fused_mod_equal_sized_features(data, ns):
    moduli = [ns.draw(n_st) for _ in data]
    outs = rk.fused_mod([torch.tensor(i, dtype=torch.int64) for i in data], moduli)
    assert [o.tolist() for o in outs] == [ref_mod(i, n) for i, n in zip(data, moduli, strict=True)]


def test_overlapped_fused_mod_equals_in_place_and_overlap_false_runs_in_place(mod_defers):
    """Inside ``overlap`` with more than one thread, the remainders of large int64 CPU inputs
    are computed on a pool thread; once the block ends they equal the in-place ones. Inside
    ``overlap(False)`` (nested in an enabled block) they are computed in place, readable at
    once, while work started before it goes on."""
    from recis_kernels import _overlap

    before = torch.get_num_threads()
    g = torch.Generator().manual_seed(7)
    ids = [torch.randint(-(1 << 62), 1 << 62, (20_000,), generator=g) for _ in range(3)]
    ns = [1_000_003, 97, (1 << 40) + 15]  # 480 KB of output: above the 256 KiB threshold
    want = [
        torch.tensor([(int(v) % (1 << 64)) % n for v in x]) for x, n in zip(ids, ns, strict=True)
    ]
    try:
        torch.set_num_threads(2)
        with rk.overlap():
            got = rk.fused_mod(ids, ns)
            outer = _overlap._current()
            assert len(outer.pending) == 1
            with rk.overlap(False):
                now = rk.fused_mod(ids, ns)
                assert not _overlap._current().pending  # nothing more deferred
                assert len(outer.pending) == 1  # the outer work goes on
                assert all(torch.equal(a, b) for a, b in zip(now, want, strict=True))
            later = rk.fused_mod(ids, ns)  # the outer block defers again
            assert len(outer.pending) == 2
        assert _overlap._current() is None
        for out in (got, later):
            assert all(torch.equal(a, b) for a, b in zip(out, want, strict=True))
    finally:
        torch.set_num_threads(before)
    with pytest.raises(TypeError, match="overlap: enabled must be a bool, got 'no'"):
        rk.overlap("no")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: torch.ops.recis.fused_mod(torch.tensor([1, 2, 3]), [1 << 40], [7]),
            r"fused_mod: sizes must be non-negative part sizes adding up to the 3 elements",
        ),
        (
            lambda: torch.ops.recis.fused_mod(torch.tensor([1, 2, 3]), [3], [7, 9]),
            r"fused_mod: 1 id parts but 2 moduli",
        ),
        (
            # Boundary sizes beyond the boundaries: the compiled kernel read past them (SIGSEGV).
            lambda: torch.ops.recis.fused_bucketize(
                torch.tensor([1.0, 2.0, 3.0]), [3], torch.tensor([0.5]), [1 << 40]
            ),
            r"fused_bucketize: b_sizes must be non-negative part sizes adding up to the 1",
        ),
        (
            lambda: torch.ops.recis.fused_bucketize(
                torch.tensor([1.0, 2.0, 3.0]), [2, 1], torch.tensor([0.5]), [1]
            ),
            r"fused_bucketize: 2 value parts but 1 boundary lists",
        ),
    ],
)
def test_the_registered_ops_check_their_part_sizes(call, message) -> None:
    # torch.ops.recis.* are public too, and take the sizes the wrappers otherwise build.
    with pytest.raises(rk.ShapeError, match=message):
        call()
