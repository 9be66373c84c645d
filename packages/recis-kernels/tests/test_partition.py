from __future__ import annotations

import pytest
import torch
from hash_reference import fmix64 as _fmix64_ref
from hypothesis import given
from hypothesis import strategies as st

from recis_kernels import ShapeError, owner_rank, partition_ids

INT64 = st.integers(-(1 << 63), (1 << 63) - 1)


@given(st.lists(st.one_of(INT64, st.integers(-5, 5)), max_size=150), st.integers(1, 7))
def test_partition_matches_python(values: list[int], world_size: int) -> None:
    ids = torch.tensor(values, dtype=torch.int64)
    out = partition_ids(ids, world_size)
    owners = {v: _fmix64_ref(v) % world_size for v in set(values)}
    expected = sorted(set(values), key=lambda v: (owners[v], v))
    assert out.ids.tolist() == expected
    assert out.counts.tolist() == [
        sum(1 for o in owners.values() if o == r) for r in range(world_size)
    ]
    assert out.ids[out.inverse].tolist() == values


def test_owner_rank_is_unsigned_hash_mod() -> None:
    ids = torch.tensor([0, -1, -(1 << 63), (1 << 63) - 1, 12345])
    for w in (1, 2, 3, 5, 8):
        assert owner_rank(ids, w).tolist() == [_fmix64_ref(v) % w for v in ids.tolist()]


def test_partition_on_device(device: torch.device) -> None:
    ids = torch.tensor([3, 1, 3, -7], device=device)
    out = partition_ids(ids, 2)
    assert out.ids.device.type == device.type
    assert int(out.counts.sum()) == 3
    assert out.ids[out.inverse].tolist() == [3, 1, 3, -7]


def test_partition_rejects_bad_world_size() -> None:
    with pytest.raises(ShapeError, match="world_size must be >= 1, got 0"):
        partition_ids(torch.tensor([1]), 0)


def test_partition_op_registration() -> None:
    from recis_kernels.ops.partition import _partition_op

    torch.library.opcheck(_partition_op, (torch.tensor([3, -1, 3, 0]), 3))


@pytest.mark.parametrize("world_size", [1 << 63, (1 << 64) + 1])
def test_world_size_past_int64_is_refused(world_size: int) -> None:
    # 2**63 gave wrong ranks (the unsigned remainder needs an int64 modulus), 2**64 + 1 an
    # OverflowError from torch.
    for fn in (owner_rank, partition_ids):
        with pytest.raises(ShapeError, match=r"world_size must be <= 2\*\*63 - 1"):
            fn(torch.tensor([1, -1]), world_size)
    # partition_ids' counts hold one entry per rank: 2**40 ranks tried to allocate 8 TiB.
    with pytest.raises(ShapeError, match=r"partition_ids: world_size must be <= 2\*\*24"):
        partition_ids(torch.tensor([1, -1]), 2**40)
    assert partition_ids(torch.tensor([1, -1]), 2**24).counts.numel() == 2**24
    largest = (1 << 63) - 1
    assert owner_rank(torch.tensor([1, -1]), largest).tolist() == [
        _fmix64_ref(1) % largest,
        _fmix64_ref(-1) % largest,
    ]
