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
