from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import EXTREME_IDS
from hypothesis import given
from hypothesis import strategies as st

from recis_embedding import (
    ConfigError,
    Constant,
    EmbeddingEngine,
    EmbeddingOption,
    HashTable,
    InputError,
    Normal,
    TableFullError,
)

IDS = st.lists(
    st.one_of(
        st.integers(-30, 30), st.sampled_from(EXTREME_IDS), st.integers(-(1 << 63), (1 << 63) - 1)
    ),
    max_size=80,
)


@given(st.lists(IDS, max_size=6), st.lists(IDS, max_size=3))
def test_table_matches_dict_of_vectors(batches: list[list[int]], erases: list[list[int]]) -> None:
    table = HashTable(3, name="t", initializer=Normal(std=1.0))
    ref: dict[int, torch.Tensor] = {}
    for k, batch in enumerate(batches):
        ids = torch.tensor(batch, dtype=torch.int64)
        rows, is_new = table.find_or_insert(ids)
        for x, new in zip(batch, is_new.tolist(), strict=True):
            assert new == (x not in ref)
        emb = table.read(rows)
        for x, e in zip(batch, emb, strict=True):
            if x not in ref:
                ref[x] = Normal(std=1.0)(torch.tensor([x]), 3, "t")[0]
            torch.testing.assert_close(e, ref[x])
        if k < len(erases):
            gone = torch.tensor(erases[k], dtype=torch.int64)
            assert table.erase(gone) == len(set(erases[k]) & set(ref))
            for x in erases[k]:
                ref.pop(x, None)
        assert len(table) == len(ref)
        assert table.ids().tolist() == sorted(ref)
    probe = torch.tensor([*sorted(ref), 12345678901], dtype=torch.int64)
    expected = [ref[x] for x in sorted(ref)] + [torch.zeros(3)]
    torch.testing.assert_close(table.lookup(probe), torch.stack(expected))


def test_every_id_is_a_key_and_high_bits_matter() -> None:
    table = HashTable(2, initializer=Constant(value=1.0))
    ids = torch.tensor(EXTREME_IDS)
    rows, is_new = table.find_or_insert(ids)
    assert len(set(rows.tolist())) == len(EXTREME_IDS)
    assert bool(is_new.all())
    table.write(rows, torch.arange(2 * len(EXTREME_IDS), dtype=torch.float32).view(-1, 2))
    got = table.lookup(ids)
    assert got[:, 0].tolist() == [2.0 * i for i in range(len(EXTREME_IDS))]


def test_logical_tables_keep_ids_apart() -> None:
    table = HashTable(2, name="a", initializer=Constant(value=1.0))
    b = table.add_table("b", Constant(value=2.0))
    ids = torch.tensor([7, -1])
    table.find_or_insert(ids, "a")
    table.find_or_insert(ids, b)
    assert table.lookup(ids, "a").tolist() == [[1.0, 1.0]] * 2
    assert table.lookup(ids, "b").tolist() == [[2.0, 2.0]] * 2
    assert table.erase(torch.tensor([7]), "a") == 1
    assert table.ids("a").tolist() == [-1]
    assert table.ids("b").tolist() == [-1, 7]


def test_capacity_raises_instead_of_dropping_keys() -> None:
    table = HashTable(2, capacity=3)
    table.find_or_insert(torch.tensor([1, 2, 2]))
    with pytest.raises(TableFullError, match="capacity 3, 2 new ids"):
        table.find_or_insert(torch.tensor([3, 4, 1]))
    assert table.ids().tolist() == [1, 2]
    table.find_or_insert(torch.tensor([3, 3, 1]))
    assert len(table) == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_storage_rounds_once(dtype: torch.dtype) -> None:
    table = HashTable(5, dtype=dtype, initializer=Normal(std=1.0))
    ids = torch.tensor([3, 9])
    rows, _ = table.find_or_insert(ids)
    expected = Normal(std=1.0)(ids, 5, "table").to(dtype).float()
    assert torch.equal(table.read(rows), expected)
    table.write(rows, torch.full((2, 5), 0.1))
    assert torch.equal(table.read(rows), torch.full((2, 5), 0.1).to(dtype).float())


def test_stats_count_lookups_inserts_and_hits() -> None:
    table = HashTable(4)
    table.find_or_insert(torch.tensor([1, 2, 1]))
    table.find(torch.tensor([1, 5]))
    s = table.stats()
    # The repeated 1 in the first call was absent when looked up: only the find hits.
    assert (s.rows, s.lookups, s.inserts, s.hits) == (2, 5, 2, 1)
    assert s.bytes > 0


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_stats_bytes_count_everything_the_table_holds() -> None:
    from recis_embedding import FrequencyAdmission

    engine = EmbeddingEngine({"a": EmbeddingOption(4, admission=FrequencyAdmission(3))})
    table = engine.table("a")[0]
    engine({"a": torch.arange(1_000).reshape(-1, 1)})  # counted once each, none admitted yet
    assert len(table) == 0
    for _ in range(2):
        engine({"a": torch.arange(600).reshape(-1, 1)})  # the first 600 reach 3 and go in
    assert len(table) == 600
    assert table.erase(torch.arange(100)) == 100  # their rows wait on the free list for reuse
    m = table._map
    assert m.free_rows.numel() == 100
    expected = (
        table._store.nbytes
        + _nbytes(m.slot_keys, m.slot_tabs, m.slot_rows, m.slot_state, m.free_rows)
        + _nbytes(table.inserted, table.last_seen, table.frequency, table._dirty, table._saved)
    )
    # The admission counters: an id map of their own and a count per counted id.
    counter, counts = table.admission_state
    admission = _nbytes(
        counter.slot_keys,
        counter.slot_tabs,
        counter.slot_rows,
        counter.slot_state,
        counter.free_rows,  # admitted ids leave the counters; their rows wait for reuse
        counts,
    )
    assert admission > 0
    assert table.stats().bytes == expected + admission


def test_distinct_ids_insert_like_any_ids() -> None:
    # The engine passes deduplicated ids with distinct=True; rows, vectors and state must not
    # depend on it.
    ids = torch.tensor([7, -3, 1 << 62, 11, 5, 9, 2, 8])
    tabs = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1], dtype=torch.int32)
    plain, fast = HashTable(4, name="a"), HashTable(4, name="a")
    for t in (plain, fast):
        t.add_table("b", Normal(std=0.1))
    for part in (slice(0, 3), slice(2, 8)):
        want = plain.find_or_insert(ids[part], tabs[part])
        got = fast.find_or_insert(ids[part], tabs[part], distinct=True)
        assert all(torch.equal(w, g) for w, g in zip(want, got, strict=True))
    assert torch.equal(plain.read(torch.arange(8)), fast.read(torch.arange(8)))
    assert plain.stats() == fast.stats()


def test_bad_input_is_rejected() -> None:
    table = HashTable(4)
    with pytest.raises(InputError, match="ids must be a 1-d int64 tensor"):
        table.find(torch.tensor([1.0]))
    with pytest.raises(InputError, match="no table 'x'"):
        table.find(torch.tensor([1]), "x")
    with pytest.raises(ConfigError, match="embedding_dim must be an int >= 1"):
        HashTable(0)


@pytest.mark.parametrize(
    ("table", "match"),
    [
        (torch.tensor([0, 5]), r"table index 5 out of range \[0, 2\)"),
        (torch.tensor([0]), r"table indices of shape \(1,\), expected \(2,\) like the ids"),
        (torch.tensor([0.0, 1.0]), "table indices must be an integer tensor, got torch.float32"),
        (torch.tensor([-1, 0]), r"table index -1 out of range \[0, 2\)"),
    ],
)
def test_bad_table_indices_are_rejected_and_change_nothing(table: torch.Tensor, match: str) -> None:
    t = HashTable(2, initializer=Constant(value=1.0))
    t.add_table("other", Constant(value=2.0))
    ids = torch.tensor([1, 2])
    for call in (t.find_or_insert, t.find, t.erase, t.lookup):
        with pytest.raises(InputError, match=match):
            call(ids, table)
    assert len(t) == 0
    assert t.stats().lookups == 0


def test_an_id_admitted_at_one_position_reads_its_row_at_every_position() -> None:
    # Duplicates with mixed admission: the refused positions read -1 though the call had
    # inserted their id, two answers for one id.
    t = HashTable(4)
    rows, is_new = t.find_or_insert(
        torch.tensor([5, 5, 6, 6, 7]), admit=torch.tensor([True, False, False, True, False])
    )
    assert rows.tolist() == [rows[0].item()] * 2 + [rows[2].item()] * 2 + [-1]
    assert rows[0] >= 0
    assert rows[2] >= 0
    assert is_new.tolist() == [True, True, True, True, False]
    assert sorted(t.ids().tolist()) == [5, 6]
    assert t.stats().inserts == 2


def test_bad_admit_masks_are_rejected() -> None:
    t = HashTable(2)
    with pytest.raises(InputError, match=r"admit must be a bool tensor of shape \(2,\)"):
        t.find_or_insert(torch.tensor([1, 2]), admit=torch.tensor([True]))
    with pytest.raises(InputError, match=r"admit must be a bool tensor of shape \(2,\)"):
        t.find_or_insert(torch.tensor([1, 2]), admit=torch.tensor([1, 0]))
    assert len(t) == 0


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"capacity": 0}, "capacity must be an int >= 1 or None, got 0"),
        ({"capacity": 2.5}, "capacity must be an int >= 1 or None, got 2.5"),
        ({"capacity": True}, "capacity must be an int >= 1 or None, got True"),
        ({"default_value": "x"}, "default_value must be a finite number, got 'x'"),
        ({"default_value": float("nan")}, "default_value must be a finite number"),
        ({"default_value": 1e39}, "beyond float32's range"),
        ({"initializer": "normal"}, "initializer must be an Initializer, got 'normal'"),
        (
            {"max_load_factor": 0.95},
            r"table 'table': max_load_factor must be a number in \(0, 0.9\], got 0.95",
        ),
    ],
)
def test_table_arguments_are_checked_up_front(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        HashTable(2, **kw)


def test_a_higher_load_factor_holds_the_same_rows_in_fewer_slots() -> None:
    ids = torch.arange(3_000) * 1_000_003 - 17
    dense, packed = HashTable(4), HashTable(4, max_load_factor=0.75)
    for t in (dense, packed):
        for part in ids.split(500):
            t.find_or_insert(part)
    assert (dense.stats().slots, packed.stats().slots) == (8192, 4096)
    assert packed.stats().bytes < dense.stats().bytes
    assert torch.equal(packed.embeddings(ids), dense.embeddings(ids))  # per-id initial values
    assert torch.equal(packed.ids(), dense.ids())


def test_table_names_and_indices_are_checked() -> None:
    t = HashTable(2)
    with pytest.raises(ConfigError, match="initializer must be an Initializer"):
        t.add_table("other", None)
    assert t.names == ["table"]
    with pytest.raises(InputError, match="table must be a table name or index, got True"):
        t.find(torch.tensor([1]), True)
    with pytest.raises(InputError, match=r"table must be a table name or index, got 0\.0"):
        t.find(torch.tensor([1]), 0.0)


class Failing(Constant):
    def sample(self, ids: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
        raise RuntimeError("initializer failed")


def test_a_failing_initializer_inserts_nothing() -> None:
    t = HashTable(2, initializer=Constant(value=1.0))
    t.add_table("bad", Failing(value=0.0))
    t.find_or_insert(torch.tensor([1]))
    with pytest.raises(RuntimeError, match="initializer failed"):
        t.find_or_insert(torch.tensor([2, 3, 4]), torch.tensor([0, 1, 1]))
    assert t.export()[0].tolist() == [1]
    assert t.find(torch.tensor([2, 3]), torch.tensor([0, 1])).tolist() == [-1, -1]
    assert t.stats().inserts == 1
    _, is_new = t.find_or_insert(torch.tensor([2]))
    assert is_new.tolist() == [True]
    torch.testing.assert_close(t.embeddings(torch.tensor([1, 2])), torch.ones(2, 2))


# -- where a table lives --------------------------------------------------------------------------


def test_a_table_device_carries_its_index(device) -> None:
    # Tensors made on "cuda" report "cuda:0" (the current device); a table declared on "cuda"
    # must report the same, or every lookup of ids moved to "cuda" is refused as being on
    # another device.
    table = HashTable(4, name="user", device=device.type)
    assert table.device == torch.empty(0, device=device.type).device
    ids = torch.tensor([3, -1, 3], device=device.type)
    rows, _ = table.find_or_insert(ids)
    assert torch.equal(table.find(ids), rows)
    engine = EmbeddingEngine({"user": EmbeddingOption(4, device=device.type)})
    assert engine({"user": ids.view(3, 1)})["user"].device == table.device


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_table_on_an_unusable_device_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"table 'user': device 'cuda' is not usable here"):
        HashTable(4, name="user", device="cuda")
    with pytest.raises(ConfigError, match=r"table 'user': device 'cuda' is not usable here"):
        EmbeddingEngine({"user": EmbeddingOption(4, device="cuda")})


@given(
    st.lists(st.tuples(IDS, st.booleans(), st.booleans()), max_size=5),
    st.lists(IDS, max_size=3),
)
def test_insert_or_assign_matches_dict_of_rows(
    calls: list[tuple[list[int], bool, bool]], erases: list[list[int]]
) -> None:
    # Rows set whole (the last values of an id given twice win), found rows overwritten, absent
    # ones inserted with exactly the given values; interleaved with find_or_insert and erase.
    table = HashTable(2, name="t", initializer=Constant(value=7.0))
    table.configure_state("adagrad", [("sum", 2)], torch.tensor([0.5, 0.5]))
    ref: dict[int, list[float]] = {}
    for k, (batch, assign, sort) in enumerate(calls):
        ids = torch.tensor(sorted(set(batch)) if sort else batch, dtype=torch.int64)
        if assign:
            full = torch.randn(ids.numel(), 4)
            rows = table.insert_or_assign(ids, full)
            for x, values in zip(ids.tolist(), full.tolist(), strict=True):
                ref[x] = values
        else:
            rows, _ = table.find_or_insert(ids)
            for x in ids.tolist():
                ref.setdefault(x, [7.0, 7.0, 0.5, 0.5])
        assert [r >= 0 for r in rows.tolist()] == [True] * ids.numel()
        if k < len(erases):
            table.erase(torch.tensor(erases[k], dtype=torch.int64))
            for x in erases[k]:
                ref.pop(x, None)
        assert len(table) == len(ref)
        assert table.ids().tolist() == sorted(ref)
    if ref:
        keys = torch.tensor(sorted(ref), dtype=torch.int64)
        got = table.read_full(table.find(keys))
        assert got.tolist() == [ref[x] for x in sorted(ref)]


def test_insert_or_assign_skips_the_initializer_and_keeps_row_records() -> None:
    table = HashTable(3, initializer=Failing(value=0.0))
    table.step = 4
    ids = torch.tensor(EXTREME_IDS)
    full = torch.arange(3 * len(EXTREME_IDS), dtype=torch.float32).view(-1, 3)
    rows = table.insert_or_assign(ids, full)
    stats = table.stats()
    assert (stats.inserts, stats.lookups, stats.hits) == (len(EXTREME_IDS), 0, 0)
    assert len(set(rows.tolist())) == len(EXTREME_IDS)
    assert torch.equal(table.embeddings(ids), full)
    assert table.frequency[rows].tolist() == [0] * len(EXTREME_IDS)
    assert table.inserted[rows].tolist() == [4] * len(EXTREME_IDS)
    assert table.last_seen[rows].tolist() == [4] * len(EXTREME_IDS)
    assert bool(table.dirty_rows(rows).all())
    # Found ids are overwritten in their rows, not counted as inserts again.
    again = table.insert_or_assign(ids[:2], -full[:2], distinct=True)
    assert torch.equal(again, rows[:2])
    assert torch.equal(table.embeddings(ids[:2]), -full[:2])
    assert table.stats().inserts == len(EXTREME_IDS)


def _resident_bytes(tensor: torch.Tensor) -> int:
    """Bytes of ``tensor``'s pages in RAM (Linux's /proc/self/pagemap, bit 63: present)."""
    page = os.sysconf("SC_PAGE_SIZE")
    first = tensor.data_ptr() // page
    last = (tensor.data_ptr() + tensor.numel() * tensor.element_size() - 1) // page
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = np.frombuffer(pagemap.read((last - first + 1) * 8), dtype=np.uint64)
    return int(((entries >> np.uint64(63)) & np.uint64(1)).sum()) * page


@pytest.mark.skipif(not os.path.exists("/proc/self/pagemap"), reason="reads Linux's /proc")
def test_optimizer_state_laid_out_after_rows_exist_writes_only_those_rows() -> None:
    # Rows take memory as they are written (RowStore's lazily mapped blocks); laying out the
    # state columns of a table with a few rows wrote whole blocks (6 MiB at dim 8 for Adam).
    table = HashTable(8)
    table.find_or_insert(torch.arange(10))
    before = table.embeddings(torch.arange(10))
    table.configure_state("adam", [("m", 8), ("v", 8)], torch.full((16,), 0.5))
    block = table._store.blocks[0]
    assert block.shape == (1 << 16, 24)
    assert _resident_bytes(block) <= 2 << 20  # a few pages (a huge page at most) of 6 MiB
    assert torch.equal(table.embeddings(torch.arange(10)), before)
    rows = table.find(torch.arange(10))
    assert torch.equal(table.read_full(rows)[:, 8:], torch.full((10, 16), 0.5))
    new = table.find_or_insert(torch.tensor([99]))[0]
    assert torch.equal(table.read_full(new)[:, 8:], torch.full((1, 16), 0.5))


def test_only_erasures_of_ids_the_last_save_holds_are_kept() -> None:
    table = HashTable(4)
    table.find_or_insert(torch.tensor([1, 2, 3]))
    table.erase(torch.tensor([1]))  # never saved: no delta to come
    assert table.erased_ids(0).tolist() == []
    table.mark_saved("a save")
    table.erase(torch.tensor([3]))
    assert table.erased_ids(0).tolist() == [3]
    # Ids put in since, in rows the save held free or held, are in no save: not kept.
    table.insert_or_assign(torch.tensor([100, 101]), torch.zeros(2, 4))
    table.find_or_insert(torch.tensor([102]))
    table.erase(torch.tensor([100, 101, 102]))
    assert table.erased_ids(0).tolist() == [3]


def test_insert_or_assign_keeps_logical_tables_apart() -> None:
    table = HashTable(1, name="a")
    table.add_table("b", Constant(value=0.0))
    ids = torch.tensor([5, 5, 6])
    rows = table.insert_or_assign(ids, torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([0, 1, 0]))
    assert len(set(rows.tolist())) == 3
    assert table.embeddings(torch.tensor([5, 6]), "a").tolist() == [[1.0], [3.0]]
    assert table.embeddings(torch.tensor([5]), "b").tolist() == [[2.0]]


def test_insert_or_assign_checks_its_input_and_capacity_first() -> None:
    table = HashTable(2, capacity=3)
    with pytest.raises(InputError, match=r"full must be a float32 tensor of shape \(2, 2\)"):
        table.insert_or_assign(torch.tensor([1, 2]), torch.zeros(2, 3))
    with pytest.raises(InputError, match=r"full must be a float32 tensor .* got torch.float64"):
        table.insert_or_assign(torch.tensor([1, 2]), torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(InputError, match="ids must be a 1-d int64 tensor"):
        table.insert_or_assign(torch.tensor([1.0]), torch.zeros(1, 2))
    with pytest.raises(InputError, match="table index 3 out of range"):
        table.insert_or_assign(torch.tensor([1]), torch.zeros(1, 2), 3)
    table.insert_or_assign(torch.tensor([1, 2]), torch.zeros(2, 2))
    with pytest.raises(TableFullError, match="is full"):
        table.insert_or_assign(torch.tensor([2, 3, 4]), torch.ones(3, 2))
    assert table.ids().tolist() == [1, 2]
    assert table.embeddings(torch.tensor([2])).tolist() == [[0.0, 0.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_full_rows_lay_out_what_read_full_returns(dtype: torch.dtype) -> None:
    table = HashTable(3, dtype=dtype)
    table.configure_state("adam", [("exp_avg", 3), ("exp_avg_sq", 3), ("step", 1)], torch.zeros(7))
    ids = torch.tensor([4, -9])
    emb = torch.tensor([[0.5, -1.0, 2.0], [3.0, 0.25, -0.125]])
    avg = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    rows = table.insert_or_assign(ids, table.full_rows(emb, {"exp_avg": avg}))
    assert torch.equal(table.embeddings(ids), emb)  # exact in every storage dtype
    assert torch.equal(table.read_slot(rows, "exp_avg"), avg)
    assert not table.read_slot(rows, "exp_avg_sq").any()
    with pytest.raises(InputError, match=r"embeddings of shape \(2, 4\), expected \(N, 3\)"):
        table.full_rows(torch.zeros(2, 4))
    with pytest.raises(InputError, match=r"no optimizer slot\(s\) \['sum'\]"):
        table.full_rows(emb, {"sum": avg})
    with pytest.raises(InputError, match=r"slot 'step' of shape \(2, 3\), expected \(2, 1\)"):
        table.full_rows(emb, {"step": avg})


def test_checkpoint_loads_add_nothing_to_the_counters(tmp_path) -> None:
    from recis_embedding import load, save

    def model() -> torch.nn.Module:
        m = torch.nn.Module()
        m.emb = EmbeddingEngine({"user": EmbeddingOption(4), "item": EmbeddingOption(4)})
        return m

    trained = model()
    trained.emb({"user": torch.tensor([1, 2, 3]), "item": torch.tensor([7, 8])})
    save(tmp_path / "ckpt", trained)
    (table,) = trained.emb.physical
    before = table.stats()
    assert (before.rows, before.inserts) == (5, 5)
    load(tmp_path / "ckpt", trained)  # the same keys again
    after = table.stats()
    assert (after.rows, after.lookups, after.inserts, after.hits) == (5, 5, 5, 0)
    fresh = model()
    load(tmp_path / "ckpt", fresh)
    (loaded,) = fresh.emb.physical
    s = loaded.stats()
    assert (s.rows, s.lookups, s.inserts, s.hits) == (5, 0, 0, 0)
    # insert_or_assign called by a user still counts what it inserts.
    loaded.insert_or_assign(
        torch.tensor([9]), torch.zeros(1, loaded.emb_words + loaded.state_width)
    )
    assert loaded.stats().inserts == 1


def _insert_from_two_threads(seed: int) -> tuple[HashTable, list[dict[int, int]]]:
    import threading

    table = HashTable(4, name="t")
    start = threading.Barrier(2)
    rows_seen: list[dict[int, int]] = [{}, {}]

    def insert(k: int) -> None:
        g = torch.Generator().manual_seed(seed + k)
        start.wait()
        for _ in range(20):
            ids = torch.randint(0, 20_000, (2000,), generator=g)
            rows, _ = table.find_or_insert(ids)
            rows_seen[k].update(zip(ids[:100].tolist(), rows[:100].tolist(), strict=True))

    threads = [threading.Thread(target=insert, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return table, rows_seen


def test_two_threads_inserting_the_same_ids_give_each_id_one_row() -> None:
    # find_or_insert finds the absent ids, then inserts them: two threads doing so at once
    # each inserted an id both found absent, two rows for one id (every round of this test).
    import sys

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for attempt in range(3):
            table, rows_seen = _insert_from_two_threads(10 * attempt)
            ids = table.ids()
            assert ids.numel() == ids.unique().numel() == len(table)
            for seen in rows_seen:
                for i, row in seen.items():
                    assert int(table.find(torch.tensor([i]))[0]) == row
    finally:
        sys.setswitchinterval(old)
