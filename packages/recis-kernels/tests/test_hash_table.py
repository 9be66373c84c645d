from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from recis_kernels import IdMap, ShapeError, UnsupportedDtypeError
from recis_kernels.ops.hash_table import MAX_LOAD_FACTOR

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
KEYS = st.one_of(
    st.integers(-20, 20),
    st.sampled_from([0, -1, INT64_MIN, INT64_MAX, 1 << 62, (1 << 62) + 1]),
    st.integers(INT64_MIN, INT64_MAX),
)
OPS = st.lists(
    st.tuples(
        st.sampled_from(["insert", "find", "erase"]),
        st.lists(st.tuples(KEYS, st.integers(0, 2)), max_size=60),
    ),
    max_size=12,
)


@given(OPS)
def test_idmap_matches_dict_reference(ops) -> None:
    m = IdMap(capacity=16)
    ref: dict[tuple[int, int], int] = {}
    for op, pairs in ops:
        keys = torch.tensor([k for k, _ in pairs], dtype=torch.int64)
        tabs = torch.tensor([t for _, t in pairs], dtype=torch.int32)
        if op == "insert":
            rows, is_new = m.find_or_insert(keys, tabs)
            seen_here: dict[tuple[int, int], int] = {}
            for pair, row, new in zip(pairs, rows.tolist(), is_new.tolist(), strict=True):
                if pair in ref:
                    assert row == ref[pair]
                    assert not new
                else:
                    assert new
                    assert seen_here.setdefault(pair, row) == row
            ref.update(seen_here)
        elif op == "find":
            rows = m.find(keys, tabs)
            assert rows.tolist() == [ref.get(p, -1) for p in pairs]
        else:
            freed = m.erase(keys, tabs)
            gone = {p for p in pairs if p in ref}
            assert sorted(freed.tolist()) == sorted(ref[p] for p in gone)
            for p in gone:
                del ref[p]
        assert m.size == len(ref)
        assert len(set(ref.values())) == len(ref)
        exported = m.export()
        assert {
            (k, t): r
            for k, t, r in zip(
                exported.keys.tolist(),
                exported.tables.tolist(),
                exported.rows.tolist(),
                strict=True,
            )
        } == ref
        assert m.size + m.erased <= MAX_LOAD_FACTOR * m.capacity


def test_high_bits_and_tables_never_collide(device: torch.device) -> None:
    m = IdMap(device=device)
    keys = torch.tensor([1, 1 | (1 << 62), 1 | INT64_MIN, 1, -1, INT64_MAX], device=device)
    tabs = torch.tensor([0, 0, 0, 1, 0, 0], dtype=torch.int32, device=device)
    rows, is_new = m.find_or_insert(keys, tabs)
    assert rows.tolist() == [0, 1, 2, 3, 4, 5]
    assert bool(is_new.all())
    assert m.find(keys, tabs).tolist() == [0, 1, 2, 3, 4, 5]


def test_growth_keeps_every_key() -> None:
    m = IdMap(capacity=16)
    keys = torch.arange(10_000, dtype=torch.int64) * 7919 - 5000
    rows, _ = m.find_or_insert(keys)
    assert m.capacity >= 10_000 / MAX_LOAD_FACTOR
    assert torch.equal(m.find(keys), rows)
    assert sorted(rows.tolist()) == list(range(10_000))


def test_erased_rows_are_recycled() -> None:
    m = IdMap()
    m.find_or_insert(torch.tensor([10, 11, 12]))
    assert m.erase(torch.tensor([11, 99])).tolist() == [1]
    rows, is_new = m.find_or_insert(torch.tensor([13, 11]))
    assert rows.tolist() == [1, 3]
    assert is_new.tolist() == [True, True]
    assert m.num_rows == 4


def test_idmap_rejects_bad_input() -> None:
    m = IdMap()
    with pytest.raises(UnsupportedDtypeError, match=r"IdMap\.find: keys has dtype int32"):
        m.find(torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ShapeError, match=r"IdMap\.find_or_insert: tables has shape"):
        m.find_or_insert(torch.tensor([1, 2]), torch.tensor([0]))
