from __future__ import annotations

import pytest
import torch
from conftest import EXTREME_IDS, signed64
from hash_reference import fmix64
from hypothesis import given
from hypothesis import strategies as st

import recis_kernels as rk

ids_st = st.lists(
    st.one_of(st.integers(-(1 << 63), (1 << 63) - 1), st.sampled_from(EXTREME_IDS)), max_size=30
)
GOLDEN = 0x9E3779B97F4A7C15


@given(ids=ids_st)
def test_mix64_is_fmix64(ids):
    got = rk.mix64(torch.tensor(ids, dtype=torch.int64))
    assert got.tolist() == [signed64(fmix64(i)) for i in ids]


def test_mix64_known_values_and_bijection():
    # fmix64(0) = 0, and fmix64 is a bijection: distinct ids never collide.
    assert rk.mix64(torch.tensor([0])).tolist() == [0]
    ids = torch.arange(-5000, 5000)
    assert rk.mix64(ids).unique().numel() == ids.numel()
    assert rk.mix64(ids.view(100, 100)).shape == (100, 100)


@given(ids=ids_st, buckets=st.lists(st.integers(0, (1 << 63) - 1), min_size=1, max_size=4))
def test_multi_hash_matches_reference(ids, buckets):
    got = rk.multi_hash(torch.tensor(ids, dtype=torch.int64), buckets)
    assert got.shape == (len(ids), len(buckets))
    for row, i in zip(got.tolist(), ids, strict=True):
        for k, b in enumerate(buckets):
            h = fmix64(i + (k + 1) * GOLDEN)
            assert row[k] == (h % b if b else signed64(h))


def test_multi_hash_hashes_differ():
    out = rk.multi_hash(torch.arange(1000), [0, 0])
    assert not torch.equal(out[:, 0], out[:, 1])


def test_mix_errors():
    with pytest.raises(
        rk.UnsupportedDtypeError, match="mix64: ids has dtype float32, expected int64"
    ):
        rk.mix64(torch.zeros(2))
    with pytest.raises(ValueError, match="multi_hash: buckets must name at least one hash"):
        rk.multi_hash(torch.zeros(2, dtype=torch.int64), [])
    with pytest.raises(
        ValueError, match=r"multi_hash: buckets\[1\] must be an int in \[0, 2\*\*63 - 1\], got -2"
    ):
        rk.multi_hash(torch.zeros(2, dtype=torch.int64), [3, -2])


def test_mix_device_matches_cpu(device):
    ids = torch.tensor([*EXTREME_IDS, *range(-100, 100)], dtype=torch.int64)
    assert torch.equal(rk.mix64(ids), rk.mix64(ids.to(device)).cpu())
    buckets = [0, 7, (1 << 63) - 1]
    assert torch.equal(rk.multi_hash(ids, buckets), rk.multi_hash(ids.to(device), buckets).cpu())


def test_mix_opcheck():
    torch.library.opcheck(torch.ops.recis.mix64.default, (torch.tensor([1, -1]),))
    torch.library.opcheck(torch.ops.recis.multi_hash.default, (torch.tensor([1, -1]), [3, 0]))


@given(ids=ids_st)
def test_fmix64_host_and_torch_spellings_match_the_reference(ids):
    from recis_kernels.ops.hash_table import _fmix64_torch

    x = torch.tensor(ids, dtype=torch.int64)
    want = [signed64(fmix64(i)) for i in ids]
    assert rk.fmix64(x).tolist() == want  # NumPy on the CPU
    assert _fmix64_torch(x).tolist() == want
    assert x.tolist() == ids  # the input is left alone


def test_fmix64_keeps_the_shape():
    x = torch.arange(-50, 50).view(10, 10)
    assert torch.equal(rk.fmix64(x).view(-1), rk.fmix64(x.reshape(-1)))
    assert torch.equal(rk.fmix64(x.t()), rk.fmix64(x).t())  # strided input


def uniform_reference(x: int, seed: int, column: int) -> float:
    """``hashed_uniform``'s formula in Python ints: ``t + 0.5`` rounded to float64 by Python's
    float addition, then scaled by 2**-53 (exact)."""
    base = fmix64((x ^ seed) % (1 << 64))
    t = fmix64((base + (column + 1) * GOLDEN) % (1 << 64)) >> 11
    return (float(t) + 0.5) / float(1 << 53)


seeds_st = st.one_of(st.integers(-(1 << 80), 1 << 80), st.sampled_from(EXTREME_IDS))


@given(ids=ids_st, seed=seeds_st, dim=st.integers(0, 5))
def test_hashed_uniform_matches_reference(ids, seed, dim):
    got = rk.hashed_uniform(torch.tensor(ids, dtype=torch.int64), seed, dim)
    assert got.shape == (len(ids), dim)
    assert got.dtype == torch.float64
    want = [[uniform_reference(i, seed, j) for j in range(dim)] for i in ids]
    assert got.tolist() == want
    assert bool(((got > 0) & (got < 1)).all())


@given(ids=ids_st, seeds=st.lists(seeds_st.map(signed64), min_size=30, max_size=30))
def test_hashed_uniform_per_id_seeds_equal_one_seed_per_call(ids, seeds):
    x = torch.tensor(ids, dtype=torch.int64)
    s = torch.tensor(seeds[: len(ids)], dtype=torch.int64)
    got = rk.hashed_uniform(x, s, 3)
    for row, i, seed in zip(got, ids, s.tolist(), strict=True):
        assert torch.equal(row, rk.hashed_uniform(torch.tensor([i]), seed, 3)[0])


def test_hashed_uniform_compiled_and_torch_spellings_agree():
    from recis_kernels.ops.mix import _hashed_uniform_torch

    g = torch.Generator().manual_seed(0)
    ids = torch.cat(
        [torch.tensor(EXTREME_IDS), torch.randint(-(1 << 63), (1 << 63) - 1, (5000,), generator=g)]
    )
    seeds = torch.randint(-(1 << 63), (1 << 63) - 1, ids.shape, generator=g)
    assert torch.equal(rk.hashed_uniform(ids, seeds, 7), _hashed_uniform_torch(ids, seeds, 7))
    one = torch.tensor([-12345])
    assert torch.equal(rk.hashed_uniform(ids, -12345, 7), _hashed_uniform_torch(ids, one, 7))
    # A strided view of the ids reads the same values.
    assert torch.equal(rk.hashed_uniform(ids[::2], 9, 2), rk.hashed_uniform(ids[::2].clone(), 9, 2))


def test_hashed_uniform_depends_on_id_seed_and_column_only():
    u = rk.hashed_uniform(torch.tensor([3, 4, 3]), 1, 4)
    assert torch.equal(u[0], u[2])
    assert not torch.equal(u[0], u[1])
    assert u[0].unique().numel() == 4  # the columns differ
    assert not torch.equal(u, rk.hashed_uniform(torch.tensor([3, 4, 3]), 2, 4))
    # Seeds are taken modulo 2**64.
    assert torch.equal(u, rk.hashed_uniform(torch.tensor([3, 4, 3]), 1 + (1 << 64), 4))
    assert rk.hashed_uniform(torch.tensor([], dtype=torch.int64), 0, 3).shape == (0, 3)


def test_hashed_uniform_errors():
    ids = torch.tensor([1, 2])
    with pytest.raises(rk.UnsupportedDtypeError, match="hashed_uniform: ids has dtype int32"):
        rk.hashed_uniform(ids.int(), 0, 2)
    with pytest.raises(ValueError, match=r"hashed_uniform: ids must be 1-d, got shape \(1, 2\)"):
        rk.hashed_uniform(ids.view(1, 2), 0, 2)
    for dim in (-1, 2.0, True):
        with pytest.raises(ValueError, match=r"hashed_uniform: dim must be an int >= 0, got"):
            rk.hashed_uniform(ids, 0, dim)
    with pytest.raises(
        ValueError,
        match=r"hashed_uniform: seeds must be an int or one int64 seed per id, shape \(2,\); "
        r"got shape \(3,\)",
    ):
        rk.hashed_uniform(ids, torch.tensor([1, 2, 3]), 2)
    with pytest.raises(rk.UnsupportedDtypeError, match="hashed_uniform: seeds has dtype float32"):
        rk.hashed_uniform(ids, torch.tensor([1.0, 2.0]), 2)
    with pytest.raises(
        rk.UnsupportedDtypeError,
        match=r"hashed_uniform: seeds must be an int or an int64 tensor of one seed per id, got "
        "float",
    ):
        rk.hashed_uniform(ids, 1.5, 2)


def test_hashed_uniform_device_matches_cpu(device):
    ids = torch.tensor([*EXTREME_IDS, *range(-100, 100)], dtype=torch.int64)
    seeds = torch.arange(ids.numel()) * 7919 - 3
    want = rk.hashed_uniform(ids, seeds, 5)
    assert torch.equal(want, rk.hashed_uniform(ids.to(device), seeds.to(device), 5).cpu())
    assert torch.equal(
        rk.hashed_uniform(ids, 77, 5), rk.hashed_uniform(ids.to(device), 77, 5).cpu()
    )


def test_hashed_uniform_opcheck():
    torch.library.opcheck(
        torch.ops.recis.hashed_uniform.default, (torch.tensor([1, -1]), torch.tensor([3]), 4)
    )
