from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import gpu, requires_cuda, use_host_kernels
from hypothesis import given
from hypothesis import strategies as st
from idmap_reference import ReferenceIdMap

from recis_kernels import IdMap, ShapeError, UnsupportedDtypeError
from recis_kernels.ops import hash_table as ht
from recis_kernels.ops.hash_table import FULL, MAX_LOAD_FACTOR

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


@pytest.mark.parametrize("load", [0.25, 0.75, 0.9])
def test_max_load_factor_sets_when_the_map_grows(load) -> None:
    m = IdMap(capacity=16, max_load_factor=load)
    keys = torch.arange(20_000, dtype=torch.int64) * 7919 - 5000
    rows = []
    for part in keys.split(1_000):
        rows.append(m.find_or_insert(part)[0])
        # Never fuller than the bound, and never doubled while the keys fitted under it.
        assert m.size + m.erased <= load * m.capacity
        assert m.size > load * m.capacity / 2
    every = torch.cat(rows)
    assert sorted(every.tolist()) == list(range(20_000))
    assert torch.equal(m.find(keys), every)
    m.erase(keys[::2])
    assert torch.equal(m.find(keys[1::2]), every[1::2])


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 0.95, 1, float("nan"), "0.5", True, None])
def test_idmap_rejects_a_load_factor_out_of_range(bad) -> None:
    with pytest.raises(ValueError, match=r"IdMap: max_load_factor must be a number in \(0, 0\.9\]"):
        IdMap(max_load_factor=bad)


def test_erased_rows_are_recycled() -> None:
    m = IdMap()
    m.find_or_insert(torch.tensor([10, 11, 12]))
    assert m.erase(torch.tensor([11, 99])).tolist() == [1]
    # 1024 slots of 8 + 4 + 8 + 1 bytes, and one free row of 8.
    assert m.nbytes == 1024 * 21 + 8
    rows, is_new = m.find_or_insert(torch.tensor([13, 11]))
    assert rows.tolist() == [1, 3]
    assert is_new.tolist() == [True, True]
    assert m.num_rows == 4


def test_freed_rows_are_reused_in_the_order_freed() -> None:
    # Each erase frees its rows ascending, after those of earlier erases: the free list is not
    # sorted as a whole (the class docstring called it ascending).
    m = IdMap()
    m.find_or_insert(torch.arange(10))
    assert m.erase(torch.tensor([7])).tolist() == [7]
    assert m.erase(torch.tensor([5, 2])).tolist() == [2, 5]
    assert m.find_or_insert(torch.tensor([100, 101, 102, 103]))[0].tolist() == [7, 2, 5, 10]
    assert "free list (ascending)" not in (IdMap.__doc__ or "")


def test_idmap_rejects_bad_input() -> None:
    m = IdMap()
    with pytest.raises(UnsupportedDtypeError, match=r"IdMap\.find: keys has dtype int32"):
        m.find(torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ShapeError, match=r"IdMap\.find_or_insert: tables has shape"):
        m.find_or_insert(torch.tensor([1, 2]), torch.tensor([0]))


def _reference(capacity: int = 1024, max_load_factor: float = MAX_LOAD_FACTOR) -> ReferenceIdMap:
    """The reference placing keys as this test's IdMap does: in claim rounds, or key by key
    where the ``claim_slots`` kernel runs compiled for the host (one thread after another)."""
    kernel = ht.use_cuda_kernels(torch.device("cpu"))
    return ReferenceIdMap(capacity, max_load_factor, sequential=kernel)


def _assert_same_state(m: IdMap, ref: ReferenceIdMap) -> None:
    assert m.capacity == ref.capacity
    assert (m.size, m.erased, m.next_row) == (ref.size, ref.erased, ref.next_row)
    assert torch.equal(m.slot_state, ref.slot_state)
    full = m.slot_state == FULL
    assert torch.equal(m.slot_keys[full], ref.slot_keys[full])
    assert torch.equal(m.slot_tabs[full], ref.slot_tabs[full])
    assert torch.equal(m.slot_rows[full], ref.slot_rows[full])
    assert torch.equal(m.free_rows, ref.free_rows)


# Few distinct keys in small tables: long clusters, probes that wrap past the last slot,
# claims lost to earlier keys, duplicates in a batch and tombstones reused by inserts.
SMALL_OPS = st.lists(
    st.tuples(
        st.sampled_from(["insert", "insert", "find", "erase"]),
        st.lists(st.tuples(st.integers(-40, 40), st.integers(0, 1)), max_size=80),
    ),
    max_size=10,
)


@given(SMALL_OPS, st.sampled_from([16, 64]), st.sampled_from([0.5, 0.9]))
def test_idmap_matches_reference_rounds_exactly(ops, capacity, load) -> None:
    m = IdMap(capacity=capacity, max_load_factor=load)
    ref = _reference(capacity, load)
    for op, pairs in ops:
        keys = torch.tensor([k for k, _ in pairs], dtype=torch.int64)
        tabs = torch.tensor([t for _, t in pairs], dtype=torch.int32)
        if op == "insert":
            rows, is_new = m.find_or_insert(keys, tabs)
            ref_rows, ref_new = ref.find_or_insert(keys, tabs)
            assert rows.tolist() == ref_rows.tolist()
            assert is_new.tolist() == ref_new.tolist()
        elif op == "find":
            assert m.find(keys, tabs).tolist() == ref.find(keys, tabs).tolist()
        else:
            assert m.erase(keys, tabs).tolist() == ref.erase(keys, tabs).tolist()
        _assert_same_state(m, ref)


@pytest.fixture(params=["torch", "kernel"])
def claims(request, monkeypatch) -> str:
    """How an IdMap on CPU tensors places new keys: its own claim rounds, or the
    ``claim_slots`` and ``find_slots`` kernels compiled for the host."""
    if request.param == "kernel":
        use_host_kernels(request.getfixturevalue("_host_kernels"), monkeypatch, ("hash_table",))
    return request.param


def test_large_batches_match_reference_rounds_exactly(claims) -> None:
    g = torch.Generator().manual_seed(0)
    m, ref = IdMap(capacity=16), _reference(16)
    pool = torch.randint(INT64_MIN, INT64_MAX, (12_000,), generator=g)
    for step in range(6):
        pick = torch.randint(0, 2_000 * (step + 1), (8_000,), generator=g)
        keys = pool[pick]
        tabs = (pick % 3).to(torch.int32)
        rows, is_new = m.find_or_insert(keys, tabs)
        ref_rows, ref_new = ref.find_or_insert(keys, tabs)
        assert torch.equal(rows, ref_rows)
        assert torch.equal(is_new, ref_new)
        # Probe past the end of long clusters: keys absent from the map.
        missing = torch.randint(INT64_MIN, INT64_MAX, (4_000,), generator=g)
        assert torch.equal(m.find(missing, 1), ref.find(missing, torch.ones_like(tabs[:4_000])))
        gone = keys[:1_500]
        assert torch.equal(m.erase(gone, tabs[:1_500]), ref.erase(gone, tabs[:1_500]))
        _assert_same_state(m, ref)


@pytest.mark.parametrize("where", ["host", pytest.param("cuda", marks=[gpu, requires_cuda])])
def test_kernel_placement_hands_out_the_rows_of_claim_rounds(where, request) -> None:
    """The claim kernel places keys otherwise than the CPU's claim rounds (by thread timing on a
    GPU, key by key compiled for the host), but rows go by first occurrence and freed rows are
    reused in the order freed (each erase's ascending): inserts, erases and growth give the rows
    of a CPU map."""
    device = "cuda" if where == "cuda" else "cpu"
    host = request.getfixturevalue("_host_kernels") if where == "host" else None

    @contextlib.contextmanager
    def kernels():
        with pytest.MonkeyPatch.context() as mp:
            if host is not None:
                use_host_kernels(host, mp, ("hash_table",))
            yield

    g = torch.Generator().manual_seed(1)
    cpu, other = IdMap(capacity=16), IdMap(capacity=16, device=device)
    pool = torch.randint(INT64_MIN, INT64_MAX, (40_000,), generator=g)
    placed_alike = True
    for step in range(8):
        keys = pool[torch.randint(0, 5_000 * (step + 1), (20_000,), generator=g)]
        tabs = (keys & 3).to(torch.int32)
        rows, is_new = cpu.find_or_insert(keys, tabs)
        with kernels():
            got_rows, got_new = other.find_or_insert(keys.to(device), tabs.to(device))
        assert torch.equal(got_rows.cpu(), rows)
        assert torch.equal(got_new.cpu(), is_new)
        placed_alike &= torch.equal(other.slot_keys.cpu(), cpu.slot_keys)
        gone, gone_tabs = keys[:3_000], tabs[:3_000]
        with kernels():
            freed = other.erase(gone.to(device), gone_tabs.to(device))
        assert torch.equal(freed.cpu(), cpu.erase(gone, gone_tabs))
        # Tombstones reused, hence growth, depend on placement; the keys held do not.
        assert other.size == cpu.size
        probe = pool[:10_000]
        with kernels():
            assert torch.equal(other.find(probe.to(device), 1).cpu(), cpu.find(probe, 1))
    if not request.config.getoption("--emulate-kernels"):
        assert not placed_alike  # the two placements did differ


def test_claim_kernel_fails_loudly_when_no_slot_is_free(request, monkeypatch) -> None:
    """The map grows before it fills, so this cannot happen through the public methods; if the
    invariant ever broke, the kernel must not write a key to slot -1 (the last slot)."""
    use_host_kernels(request.getfixturevalue("_host_kernels"), monkeypatch, ("hash_table",))
    m = IdMap(capacity=16)
    m.find_or_insert(torch.arange(8))
    m.slot_state.fill_(FULL)
    before = m.slot_keys.clone()
    with pytest.raises(RuntimeError, match=r"IdMap: no free slot for 2 of 2 keys in a map of 16"):
        m._claim(torch.tensor([100, 101]), torch.zeros(2, dtype=torch.int32))
    assert torch.equal(m.slot_keys, before)


def test_pairs_with_equal_premix_values_stay_distinct() -> None:
    # key + table * 0x9E3779B97F4A7C15 (wrapping) is equal for the three pairs, so they share a
    # home slot and one sort key; they must still get three rows.
    def signed(x: int) -> int:
        x %= 1 << 64
        return x - (1 << 64) if x > INT64_MAX else x

    one, two = signed(0x9E3779B97F4A7C15), signed(2 * 0x9E3779B97F4A7C15)
    keys = torch.tensor([two, one, 0, one, two, 0])
    tabs = torch.tensor([0, 1, 2, 1, 0, 2], dtype=torch.int32)
    m, ref = IdMap(capacity=16), _reference(16)
    rows, is_new = m.find_or_insert(keys, tabs)
    assert rows.tolist() == [0, 1, 2, 1, 0, 2]
    assert is_new.tolist() == [True] * 6
    ref.find_or_insert(keys, tabs)
    _assert_same_state(m, ref)
    assert m.find(keys, tabs).tolist() == [0, 1, 2, 1, 0, 2]


@given(SMALL_OPS, st.sampled_from([16, 64]), st.booleans())
def test_insert_absent_gives_the_rows_of_find_or_insert(ops, capacity, dedup_first) -> None:
    # Inserting what find() reported absent (optionally deduplicated, as distinct pairs) leaves
    # the map exactly as find_or_insert does.
    m, ref = IdMap(capacity=capacity), IdMap(capacity=capacity)
    for _, pairs in ops:
        keys = torch.tensor([k for k, _ in pairs], dtype=torch.int64)
        tabs = torch.tensor([t for _, t in pairs], dtype=torch.int32)
        if dedup_first and pairs:
            seen = dict.fromkeys(pairs)
            keys = torch.tensor([k for k, _ in seen], dtype=torch.int64)
            tabs = torch.tensor([t for _, t in seen], dtype=torch.int32)
        want, _ = ref.find_or_insert(keys, tabs)
        rows = m.find(keys, tabs)
        miss = (rows < 0).nonzero().squeeze(1)
        rows[miss] = m.insert_absent(keys[miss], tabs[miss], distinct=dedup_first)
        assert rows.tolist() == want.tolist()
        assert (m.capacity, m.size) == (ref.capacity, ref.size)
        assert torch.equal(m.slot_state, ref.slot_state)
        assert torch.equal(m.slot_rows[m.slot_state == FULL], ref.slot_rows[ref.slot_state == FULL])


@given(SMALL_OPS, st.sampled_from([16, 64]))
def test_host_and_torch_probes_agree(ops, capacity) -> None:
    """The CPU finds slots in NumPy; the torch spelling (other devices without kernels) must
    probe the same slots, tombstones and wrapped clusters included."""
    m = IdMap(capacity=capacity)
    for op, pairs in ops:
        keys = torch.tensor([k for k, _ in pairs], dtype=torch.int64)
        tabs = torch.tensor([t for _, t in pairs], dtype=torch.int32)
        if op == "insert":
            m.find_or_insert(keys, tabs)
        elif op == "erase":
            m.erase(keys, tabs)
        probe = torch.cat([keys, keys + 41])  # present and absent pairs
        ptabs = torch.cat([tabs, tabs])
        host = m._find_slots_host(probe, ptabs)
        assert torch.equal(host, m._find_slots_torch(probe, ptabs))


def test_torch_home_matches_the_host_one_on_extreme_keys() -> None:
    """``_home`` runs in NumPy on the CPU; its torch spelling must give the same slots."""
    from recis_kernels.ops import hash_table as ht

    keys = torch.tensor([0, 1, -1, INT64_MIN, INT64_MAX, 0x9E3779B97F4A7C15 - (1 << 64)])
    tabs = torch.tensor([0, 5, 2**31 - 1, 1, 0, 3], dtype=torch.int32)
    for mask in (15, (1 << 40) - 1):
        host = torch.from_numpy(ht._home_host(keys.numpy(), tabs.numpy(), mask))
        assert torch.equal(host, ht._home_torch(keys, tabs, mask))
        assert torch.equal(host, ht._home(keys, tabs, mask))


def _keys_homed_at_the_end(capacity: int, count: int) -> torch.Tensor:
    """``count`` distinct keys (table 0) whose home is one of the last two slots."""
    from recis_kernels.ops import hash_table as ht

    cand = torch.arange(-50_000, 50_000)
    home = ht._home_torch(cand, torch.zeros_like(cand, dtype=torch.int32), capacity - 1)
    picked = cand[home >= capacity - 2][:count]
    assert picked.numel() == count
    return picked


@pytest.mark.parametrize("capacity", [16, 64, 1 << 12])
@pytest.mark.parametrize("path", ["host", "torch"])
def test_claims_into_an_empty_map_are_sequential_linear_probing(capacity, path) -> None:
    """A map with every slot empty (new, rehashed, cleared) places its keys in one pass; the
    result must be key-by-key linear probing in home order, wrapping past the last slot."""
    g = torch.Generator().manual_seed(capacity)
    wrapped = _keys_homed_at_the_end(capacity, min(6, capacity // 4))
    rest = torch.randint(INT64_MIN, INT64_MAX, (capacity // 2 - wrapped.numel(),), generator=g)
    keys = torch.cat([rest[: rest.numel() // 2], wrapped, rest[rest.numel() // 2 :]])
    tabs = torch.zeros(keys.numel(), dtype=torch.int32)
    tabs[wrapped.numel() + rest.numel() // 2 :] = 3
    m, ref = IdMap(capacity=capacity), ReferenceIdMap(capacity=capacity)
    claim = m._claim_blank_host if path == "host" else m._claim_blank_torch
    slots = claim(keys, tabs)
    assert torch.equal(slots, ref._claim(keys, tabs, dedup=False))
    assert torch.equal(m.slot_state, ref.slot_state)
    assert torch.equal(m.slot_keys, ref.slot_keys)
    assert torch.equal(m.slot_tabs, ref.slot_tabs)
    start = rest.numel() // 2
    # At most two of the keys homed on the last two slots fit there: the others wrapped.
    assert bool((slots[start : start + wrapped.numel()] < capacity - 2).any())
    assert torch.equal(m._find_slots_host(keys, tabs), slots)


def test_first_insert_rehash_and_clear_use_the_one_pass_placement() -> None:
    m, ref = IdMap(capacity=16), _reference(16)
    keys = torch.arange(40) * 1_000_003 - 7
    tabs = torch.zeros(40, dtype=torch.int32)
    # The first insert fills an empty map, the growth to 128 slots rehashes into empty slots.
    for part in (keys[:5], keys[5:40]):
        part_tabs = tabs[: part.numel()]
        rows, _ = m.find_or_insert(part, part_tabs)
        assert torch.equal(rows, ref.find_or_insert(part, part_tabs)[0])
        _assert_same_state(m, ref)
    assert m.capacity == 128
    assert torch.equal(m.find(keys[:5], 0), torch.arange(5))  # rows in input order
    m.clear()
    rows, _ = m.find_or_insert(keys.flip(0), 0)
    assert torch.equal(rows, torch.arange(40))


@pytest.mark.parametrize("capacity", [64, 1 << 12])
def test_host_and_torch_claims_place_keys_alike(capacity) -> None:
    """The CPU claims slots in NumPy; the torch spelling must place every key on the same
    slot in the same round, over tombstones and full clusters."""
    import copy

    g = torch.Generator().manual_seed(capacity)
    m = IdMap(capacity=capacity)
    pool = torch.randint(INT64_MIN, INT64_MAX, (capacity,), generator=g)
    m.find_or_insert(pool[: capacity // 4], 0)
    m.erase(pool[: capacity // 16], 0)
    keys = pool[capacity // 4 : capacity // 4 + capacity // 5]  # distinct and absent
    tabs = (torch.arange(keys.numel()) % 3).to(torch.int32)
    host, torch_map = m, copy.deepcopy(m)
    assert torch.equal(host._claim_host(keys, tabs), torch_map._claim_torch(keys, tabs))
    for name in ("slot_state", "slot_keys", "slot_tabs"):
        assert torch.equal(getattr(host, name), getattr(torch_map, name))
    assert host.erased == torch_map.erased


@pytest.mark.parametrize(
    ("tables", "error", "match"),
    [
        (
            torch.tensor([2**32]),
            ValueError,
            r"IdMap\.\w+: tables must be in \[0, 2147483647\], got 4294967296",
        ),
        (torch.tensor([-1]), ValueError, r"tables must be in \[0, 2147483647\], got -1"),
        (2**31, ValueError, r"tables must be in \[0, 2147483647\], got 2147483648"),
        (torch.tensor([0.7]), UnsupportedDtypeError, r"IdMap\.\w+: tables has dtype float32"),
        (
            True,
            UnsupportedDtypeError,
            r"IdMap\.\w+: tables must be an int or an integer tensor shaped like keys, got bool",
        ),
    ],
)
def test_idmap_rejects_tables_it_cannot_store(tables, error, match):
    # Tables are stored as int32: 2**32 used to alias table 0 and 0.7 to truncate to it.
    m = IdMap()
    for call in (m.find_or_insert, m.find, m.erase):
        with pytest.raises(error, match=match):
            call(torch.tensor([1]), tables)
    assert m.find(torch.tensor([1]), 0).tolist() == [-1]
    rows, _ = m.find_or_insert(torch.tensor([1, 1]), torch.tensor([2**31 - 1, 0]))
    assert rows.tolist() == [0, 1]


def test_an_idmap_looked_up_on_one_thread_while_another_inserts():
    """A lookup thread reads the slot arrays without the GIL while inserts on another thread
    rehash (replace and free them): the calls run one at a time, so every lookup finds the
    rows it was given. Run in a child process: a regression reads freed memory."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import pickle, threading, torch
        from recis_kernels import IdMap
        torch.manual_seed(0)
        m = IdMap(capacity=16)
        base = torch.randperm(1 << 22)[:100_000].to(torch.int64)
        rows, _ = m.find_or_insert(base)
        stop, wrong, lookups = False, 0, 0
        looked = threading.Event()
        def reader():
            global wrong, lookups
            while not stop:
                wrong += int((m.find(base) != rows).sum())
                lookups += 1
                looked.set()
        t = threading.Thread(target=reader)
        t.start()
        assert looked.wait(timeout=60)  # the reader runs while the inserts start
        start = 1 << 40
        for i in range(14):  # each batch makes the map double: a rehash after another
            n = 20_000 * (i + 1)
            m.find_or_insert(torch.arange(start, start + n))
            start += n
        stop = True
        t.join()
        copy = pickle.loads(pickle.dumps(m))  # the lock is not pickled; the copy has its own
        assert torch.equal(copy.find(base), rows)
        print(lookups, wrong)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], timeout=120, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    lookups, wrong = map(int, done.stdout.split())
    assert lookups > 0
    assert wrong == 0
