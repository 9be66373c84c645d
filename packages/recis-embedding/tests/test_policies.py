from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recis_embedding import (
    CapacityEviction,
    ConfigError,
    Constant,
    DynamicEmbedding,
    EmbeddingEngine,
    EmbeddingOption,
    FrequencyAdmission,
    HashTable,
    ProbabilityAdmission,
    ReadOnlyAdmission,
    SparseSGD,
    StaleEviction,
    TableFullError,
    load,
    make_policy,
    save,
)

DIM = 2


def engine_with(**kw) -> tuple[EmbeddingEngine, SparseSGD]:
    engine = EmbeddingEngine({"f": EmbeddingOption(DIM, initializer=Constant(value=1.0), **kw)})
    return engine, SparseSGD(engine, lr=0.1)


def step(engine: EmbeddingEngine, opt: SparseSGD, ids: list[int]) -> torch.Tensor:
    out = engine({"f": torch.tensor(ids)[:, None]})["f"]
    out.sum().backward()
    opt.step()
    opt.zero_grad()
    return out.detach()


def test_frequency_admission_waits_for_the_threshold() -> None:
    engine, opt = engine_with(admission=FrequencyAdmission(threshold=3), default_value=0.0)
    table, _ = engine.table("f")
    for k in range(2):
        out = step(engine, opt, [5, 5, 6])
        assert out.tolist() == [[0.0, 0.0]] * 3, k
        assert len(table) == 0
    out = step(engine, opt, [5])
    assert out.tolist() == [[1.0, 1.0]]
    assert table.ids().tolist() == [5]
    assert table.stats().admissions_rejected == 4


def test_read_only_admission_updates_known_rows_only() -> None:
    engine, opt = engine_with()
    step(engine, opt, [1])
    table, _ = engine.table("f")
    table.admission = ReadOnlyAdmission()
    out = step(engine, opt, [1, 2])
    assert out[1].tolist() == [0.0, 0.0]
    assert table.ids().tolist() == [1]
    torch.testing.assert_close(table.embeddings(torch.tensor([1])), torch.full((1, DIM), 0.8))
    assert table.stats().admissions_rejected == 1


@pytest.mark.parametrize(("p", "rows"), [(0.0, 0), (1.0, 50)])
def test_probability_admission_extremes(p: float, rows: int) -> None:
    engine, opt = engine_with(admission=ProbabilityAdmission(p=p))
    step(engine, opt, list(range(50)))
    assert len(engine.table("f")[0]) == rows


def test_probability_admission_is_deterministic_and_partial() -> None:
    sizes = []
    for _ in range(2):
        engine, opt = engine_with(admission=ProbabilityAdmission(p=0.5, seed=1))
        step(engine, opt, list(range(400)))
        sizes.append(engine.table("f")[0].ids().tolist())
    assert sizes[0] == sizes[1]
    assert 120 < len(sizes[0]) < 280


def test_stale_eviction_removes_ids_not_seen_for_n_steps() -> None:
    engine, opt = engine_with(eviction=StaleEviction(steps=2))
    table, _ = engine.table("f")
    step(engine, opt, [1, 2])
    step(engine, opt, [2])
    assert table.ids().tolist() == [1, 2]
    step(engine, opt, [2])  # id 1 was not looked up in the last 2 steps
    assert table.ids().tolist() == [2]
    assert table.stats().evictions == 1
    step(engine, opt, [1])  # comes back with a fresh initial vector
    torch.testing.assert_close(table.embeddings(torch.tensor([1])), torch.full((1, DIM), 0.9))


class _ScanEveryStep(StaleEviction):
    """The definition of StaleEviction, checked on every row after every step."""

    def after_step(self, table: HashTable) -> None:
        for index in range(len(table.names)):
            ids = table.ids(index)
            rows = table.find(ids, index)
            stale = (table.step - table.last_seen[rows]) > self.steps
            if bool(stale.any()):
                table.erase(ids[stale], index)  # the table counts the evictions


def test_stale_evictions_note_counts_in_the_tables_bytes() -> None:
    engine, opt = engine_with(eviction=StaleEviction(steps=5))
    table, _ = engine.table("f")
    step(engine, opt, [1, 2, 3])
    step(engine, opt, [4])  # the scan after step 1 noted 1, 2 and 3 (last seen at step 0)
    assert sorted(table._eviction_note.keys.tolist()) == [1, 2, 3]
    held = table.stats().bytes
    table._eviction_note = None
    # 12 bytes an id, and a last-seen step with its end position per distinct step.
    assert held - table.stats().bytes == 3 * 12 + 2 * 8


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("steps", [1, 2, 3, 7])
def test_stale_eviction_erases_what_a_scan_of_every_row_erases(tmp_path, seed, steps) -> None:
    # Random lookups into two fused tables, steps without lookups, ids erased by hand and a
    # checkpoint loaded back (which sets last-seen steps): after every step both engines hold
    # the same ids with the same vectors and have counted the same evictions.
    gen = torch.Generator().manual_seed(seed)
    engines = []
    for policy in (StaleEviction(steps), _ScanEveryStep(steps)):
        options = {
            name: EmbeddingOption(DIM, initializer=Constant(value=1.0), eviction=policy)
            for name in ("f", "g")
        }
        engine = EmbeddingEngine(options)
        engines.append((engine, SparseSGD(engine, lr=0.1)))
    assert len({id(t) for t, _ in engines[0][0].logical.values()}) == 1  # fused
    for k in range(60):
        batch = {
            name: torch.randint(
                0, 30, (int(torch.randint(0, 6, (), generator=gen)), 1), generator=gen
            )
            for name in ("f", "g")
        }
        erase = torch.randint(0, 30, (2,), generator=gen) if k % 9 == 4 else None
        for n, (engine, opt) in enumerate(engines):
            out = engine(batch)
            (out["f"].sum() + 2 * out["g"].sum()).backward()
            opt.step()
            opt.zero_grad()
            if erase is not None:
                engine.table("g")[0].erase(erase, "g")
            if k == 30:
                save(tmp_path / f"c{n}", engine, opt)
                load(tmp_path / f"c{n}", engine, opt)
        (a, _), (b, _) = engines
        for name in ("f", "g"):
            (ta, ia), (tb, ib) = a.table(name), b.table(name)
            assert ta.ids(ia).tolist() == tb.ids(ib).tolist(), (k, name)
            assert torch.equal(ta.embeddings(table=ia), tb.embeddings(table=ib)), (k, name)
        assert ta.stats().evictions == tb.stats().evictions, k


def test_stale_eviction_scans_the_table_once_in_steps_plus_one_steps(monkeypatch) -> None:
    engine, opt = engine_with(eviction=StaleEviction(steps=4))
    table, _ = engine.table("f")
    scans = []
    real = type(table._map).export
    monkeypatch.setattr(type(table._map), "export", lambda m: scans.append(1) or real(m))
    for k in range(20):
        step(engine, opt, [k, k + 1, 100])
    assert len(scans) == 4  # after steps 1, 6, 11 and 16
    # Id j was last looked up at step j (20 at 19): after step 20, those before 16 are gone.
    assert table.ids().tolist() == [*range(16, 21), 100]
    assert table.stats().evictions == 16


def test_capacity_eviction_with_headroom_frees_the_next_coldest_rows_too() -> None:
    # Capacity 10, headroom 0.3: a full table evicts the rows it needs and then, in the same
    # order, 3 more, so the next inserts fit without evicting.
    engine, opt = engine_with(capacity=10, eviction=CapacityEviction("lru", headroom=0.3))
    table, _ = engine.table("f")
    for k in range(10):
        step(engine, opt, [k])  # last seen at step k
    step(engine, opt, [9, 100])  # needs 1 row: 0 goes, then 1, 2 and 3
    assert table.ids().tolist() == [*range(4, 10), 100]
    assert table.stats().evictions == 4
    step(engine, opt, [101, 102, 103])  # fits: nothing evicted
    assert table.stats().evictions == 4
    step(engine, opt, [104, 4])  # full again: 5 goes, then 6, 7, 8 (4 is in use)
    assert table.ids().tolist() == [4, 9, 100, 101, 102, 103, 104]
    assert table.stats().evictions == 8


@pytest.mark.parametrize(("headroom", "free"), [(0.29, 29), (0.57, 57), (0.295, 29), (0.3, 30)])
def test_capacity_eviction_headroom_is_the_fraction_as_written(headroom, free) -> None:
    # 0.29 * 100 is 28.999... in floats: the headroom frees 29 rows all the same.
    table = HashTable(DIM, capacity=100)
    table.eviction = CapacityEviction("lfu", headroom=headroom)
    table.find_or_insert(torch.arange(100))
    table.find_or_insert(torch.tensor([10**6]))
    assert table.capacity - len(table) == free


def test_capacity_eviction_headroom_never_takes_a_row_in_use() -> None:
    # Only two rows are free to go: the headroom asks for more, the rows in use stay.
    engine, opt = engine_with(capacity=4, eviction=CapacityEviction("lfu", headroom=0.9))
    table, _ = engine.table("f")
    step(engine, opt, [1, 2, 3, 4])
    step(engine, opt, [3, 4, 5, 6])
    assert table.ids().tolist() == [3, 4, 5, 6]
    assert table.stats().evictions == 2


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2, float("nan"), "0.1", True, None])
def test_capacity_eviction_headroom_must_be_a_fraction(bad) -> None:
    with pytest.raises(ConfigError, match=r"headroom must be a number in \[0, 1\)"):
        CapacityEviction("lfu", headroom=bad)


@pytest.mark.parametrize(("policy", "survivor"), [("lfu", 1), ("lru", 3)])
def test_capacity_eviction_makes_room(policy: str, survivor: int) -> None:
    engine, opt = engine_with(capacity=3, eviction=CapacityEviction(policy=policy))
    table, _ = engine.table("f")
    step(engine, opt, [1, 1, 1, 1, 1, 2, 3])
    step(engine, opt, [2, 3])
    step(engine, opt, [3])
    # Uses 1: 5, 2: 2, 3: 3; last seen 1: step 0, 2: step 1, 3: step 2. Two must go:
    # lfu evicts 2 and 3, lru evicts 1 and 2.
    step(engine, opt, [4, 5])
    assert len(table) == 3
    ids = table.ids().tolist()
    assert ids == sorted([survivor, 4, 5])
    assert table.stats().evictions == 2


def tutorial_step(engine: EmbeddingEngine, opt: SparseSGD, ids: list[int]) -> None:
    """One step in the order of torch's tutorials: forward, ``zero_grad()``, backward, step.
    The lookups of the step before are still listed at the forward (``zero_grad()`` forgets
    them after it)."""
    out = engine({"f": torch.tensor(ids)[:, None]})["f"]
    opt.zero_grad()
    out.sum().backward()
    opt.step()


@pytest.mark.parametrize(("policy", "survivor"), [("lfu", 1), ("lru", 3)])
def test_capacity_eviction_makes_room_in_the_tutorials_order(policy: str, survivor: int) -> None:
    # Rows read by a lookup an optimizer step already applied are not in use: they counted as
    # such until the next zero_grad(), which picked the wrong rows or refused for want of room.
    engine, opt = engine_with(capacity=3, eviction=CapacityEviction(policy=policy))
    table, _ = engine.table("f")
    for ids in ([1, 1, 1, 1, 1, 2, 3], [2, 3], [3], [4, 5]):
        tutorial_step(engine, opt, ids)
    assert table.ids().tolist() == sorted([survivor, 4, 5])
    engine, opt = engine_with(capacity=3, eviction=CapacityEviction(policy=policy))
    table, _ = engine.table("f")
    tutorial_step(engine, opt, [10, 11])
    tutorial_step(engine, opt, [12, 13])  # two rows free to go, one needed
    assert len(table) == 3
    assert {12, 13} <= set(table.ids().tolist())


def test_an_evicted_row_of_an_applied_lookup_takes_none_of_its_gradient() -> None:
    # Without zero_grad() a second step applies the first lookup's gradient again (as a torch
    # optimizer steps twice on one .grad); the row of an id evicted meanwhile went to a new
    # id, which must get only its own gradient.
    engine, opt = engine_with(capacity=2, eviction=CapacityEviction("lru"))
    table, _ = engine.table("f")
    engine({"f": torch.tensor([[10], [11]])})["f"].sum().backward()
    opt.step()
    out = engine({"f": torch.tensor([[11], [12]])})["f"]  # evicts 10; 12 takes its row
    out.sum().backward()
    opt.step()
    assert table.ids().tolist() == [11, 12]
    # 11: 1 - 3 * 0.1 (the first lookup's gradient twice, the second's once); 12: 1 - 0.1.
    assert table.lookup(table.ids()).flatten().tolist() == pytest.approx([0.7, 0.7, 0.9, 0.9])


def tied_history(engine: EmbeddingEngine, opt: SparseSGD) -> None:
    """Ids 100..109 inserted at step 0, ids 0..9 at step 1, then all 20 used once more at step
    2: every row has 2 uses and was last seen at step 2, so only the insertion step and the id
    tell them apart."""
    old, young = list(range(100, 110)), list(range(10))
    step(engine, opt, old)
    step(engine, opt, young)
    step(engine, opt, young[::-1] + old[::-1])


@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_capacity_eviction_ties_go_to_the_row_inserted_first_then_the_smaller_id(
    policy: str,
) -> None:
    engine, opt = engine_with(capacity=20, eviction=CapacityEviction(policy))
    table, _ = engine.table("f")
    tied_history(engine, opt)
    step(engine, opt, [50, 51, 52, 53, 54])
    assert table.ids().tolist() == [*range(10), 50, 51, 52, 53, 54, *range(105, 110)]


@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_capacity_eviction_ties_in_one_step_go_to_the_smaller_ids(policy: str) -> None:
    big, small = 2**63 - 1, -(2**63)
    ids = [17, -1, big, 0, 5, small, -40, 3]
    engine, opt = engine_with(capacity=len(ids), eviction=CapacityEviction(policy))
    table, _ = engine.table("f")
    step(engine, opt, ids)
    step(engine, opt, [1000, 1001, 1002])
    assert table.ids().tolist() == [0, 3, 5, 17, 1000, 1001, 1002, big]


@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_capacity_eviction_order_survives_a_checkpoint(tmp_path, policy: str) -> None:
    engine, opt = engine_with(capacity=20, eviction=CapacityEviction(policy))
    tied_history(engine, opt)
    save(tmp_path / "c", engine, opt)
    loaded, loaded_opt = engine_with(capacity=20, eviction=CapacityEviction(policy))
    load(tmp_path / "c", loaded, loaded_opt)
    for e, o in ((engine, opt), (loaded, loaded_opt)):
        step(e, o, [50, 51, 52, 53, 54])
    expected = [*range(10), 50, 51, 52, 53, 54, *range(105, 110)]
    assert engine.table("f")[0].ids().tolist() == expected
    assert loaded.table("f")[0].ids().tolist() == expected


@settings(max_examples=40, deadline=None)
@given(
    keys=st.lists(
        st.tuples(st.integers(-3, 3), st.integers(0, 1), st.integers(0, 2)),
        min_size=1,
        max_size=12,
        unique_by=lambda k: k[:2],
    ),
    new=st.integers(1, 4),
    policy=st.sampled_from(["lfu", "lru"]),
)
def test_capacity_eviction_follows_the_documented_order(keys, new: int, policy: str) -> None:
    # (id, logical table, step inserted at); last_seen and frequency are set apart from
    # insertion so that every level of the order decides some cases.
    new = min(new, len(keys))
    table = HashTable(1, capacity=len(keys))
    table.add_table("other", Constant(value=0.0))
    table.eviction = CapacityEviction(policy)
    for ids, tabs, at in keys:
        table.step = at
        table.find_or_insert(torch.tensor([ids]), tabs)
    rows = {k[:2]: int(table.find(torch.tensor([k[0]]), k[1])) for k in keys}
    for i, (ids, tabs, _) in enumerate(keys):
        table.frequency[rows[ids, tabs]] = i % 2
        table.last_seen[rows[ids, tabs]] = 3 + i % 3
    use = table.frequency if policy == "lfu" else table.last_seen

    def age(k: tuple[int, int, int]) -> tuple[int, int, int, int]:
        return int(use[rows[k[:2]]]), k[2], k[0], k[1]

    victims = sorted(keys, key=age)[:new]
    table.step = 9
    table.find_or_insert(torch.arange(100, 100 + new), 1)
    kept = {(ids, tabs) for ids, tabs, _ in keys} - {v[:2] for v in victims}
    for t in (0, 1):
        expected = sorted([i for i, tab in kept if tab == t] + ([*range(100, 100 + new)] * t))
        assert table.ids(t).tolist() == expected
    assert table.stats().evictions == len(victims)


class _OrderEveryRow(CapacityEviction):
    """The definition of CapacityEviction: every row ordered on every eviction."""

    def make_room(self, table: HashTable, needed: int, protect: torch.Tensor) -> bool:
        ids, tabs, rows = table.export()
        use = table.frequency if self.policy == "lfu" else table.last_seen
        in_use = set(protect.tolist())
        free = sorted(
            (int(use[r]), int(table.inserted[r]), int(i), int(t))
            for i, t, r in zip(ids.tolist(), tabs.tolist(), rows.tolist(), strict=True)
            if r not in in_use
        )
        victims = free[: needed + int(Fraction(repr(self.headroom)) * table.capacity)]
        for _, _, i, t in victims:
            table.erase(torch.tensor([i]), t)  # the table counts the evictions
        return len(victims) >= needed


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    ("policy", "headroom"), [("lru", 0.0), ("lru", 0.2), ("lfu", 0.0), ("lfu", 0.2)]
)
def test_capacity_eviction_evicts_what_ordering_every_row_evicts(
    tmp_path, seed: int, policy: str, headroom: float
) -> None:
    # Two features sharing one table of capacity 24, two micro-batches a step (the first's
    # rows stay in use until the optimizer step), ids erased by hand, a checkpoint loaded
    # back (which sets last-seen steps) and steps whose lookup the full table refuses: after
    # every step both engines hold the same ids with the same vectors and counted the same
    # evictions. lru keeps a note of its coldest rows between passes over the table.
    gen = torch.Generator().manual_seed(seed)
    engines = []
    for cls in (CapacityEviction, _OrderEveryRow):
        kw = {"capacity": 24, "eviction": cls(policy, headroom=headroom)}
        options = {
            "f": EmbeddingOption(DIM, initializer=Constant(1.0), **kw),
            "g": EmbeddingOption(DIM, shared_name="f", initializer=Constant(1.0), **kw),
        }
        engine = EmbeddingEngine(options)
        engines.append((engine, SparseSGD(engine, lr=0.1)))
    refused = 0
    for k in range(80):
        micro = [
            {
                name: torch.randint(
                    -20, 20 + k, (int(torch.randint(0, 5, (), generator=gen)), 1), generator=gen
                )
                for name in ("f", "g")
            }
            for _ in range(2)
        ]
        erase = torch.randint(-20, 20 + k, (3,), generator=gen) if k % 11 == 5 else None
        outcomes = []
        for n, (engine, opt) in enumerate(engines):
            try:
                for batch in micro:
                    out = engine(batch)
                    (out["f"].sum() + 2 * out["g"].sum()).backward()
                outcomes.append("ok")
            except TableFullError:
                outcomes.append("full")
            opt.step()
            opt.zero_grad()
            if erase is not None:
                engine.table("f")[0].erase(erase)
            if k == 40:
                save(tmp_path / f"c{n}", engine, opt)
                load(tmp_path / f"c{n}", engine, opt)
        assert outcomes[0] == outcomes[1], k
        refused += outcomes[0] == "full"
        (ta, _), (tb, _) = engines[0][0].table("f"), engines[1][0].table("f")
        assert ta.ids().tolist() == tb.ids().tolist(), k
        assert torch.equal(ta.embeddings(), tb.embeddings()), k
        assert ta.stats().evictions == tb.stats().evictions, k
    assert ta.stats().evictions > 100


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("headroom", [0.0, 0.05])
def test_capacity_eviction_notes_serve_many_evictions_with_the_same_victims(
    monkeypatch, policy: str, headroom: float
) -> None:
    # A table of capacity 200 taking up to 24 new ids a lookup, half of them from a hot set
    # (uses and last-seen steps spread), two micro-batches a step and hand erasures: a pass
    # over the table notes more rows than one eviction takes, so most evictions are served
    # by the note (with lfu, the rows inserted since and those passed over kept aside), and
    # they take what ordering every row takes.
    gen = torch.Generator().manual_seed(7)
    engines = []
    for cls in (CapacityEviction, _OrderEveryRow):
        kw = {"capacity": 200, "eviction": cls(policy, headroom=headroom)}
        options = {
            "f": EmbeddingOption(DIM, initializer=Constant(1.0), **kw),
            "g": EmbeddingOption(DIM, shared_name="f", initializer=Constant(1.0), **kw),
        }
        engine = EmbeddingEngine(options)
        engines.append((engine, SparseSGD(engine, lr=0.1)))
    (table, _), (reference, _) = engines[0][0].table("f"), engines[1][0].table("f")
    passes = []
    real = type(table._map).export
    monkeypatch.setattr(
        type(table._map), "export", lambda m: passes.append(m is table._map) or real(m)
    )
    evicting = 0
    for k in range(100):
        micro = []
        for _ in range(2):
            batch = {}
            for name in ("f", "g"):
                n = int(torch.randint(0, 12, (), generator=gen))
                hot = torch.randint(0, 40, (n,), generator=gen)
                new = torch.randint(0, 60 + 20 * k, (n,), generator=gen)
                batch[name] = torch.where(torch.rand(n, generator=gen) < 0.5, hot, new)[:, None]
            micro.append(batch)
        erase = torch.randint(0, 60 + 20 * k, (5,), generator=gen) if k % 13 == 7 else None
        before = table.stats().evictions
        for engine, opt in engines:
            for batch in micro:
                out = engine(batch)
                (out["f"].sum() + 2 * out["g"].sum()).backward()
            opt.step()
            opt.zero_grad()
            if erase is not None:
                engine.table("f")[0].erase(erase)
        evicting += table.stats().evictions > before
        assert table.ids().tolist() == reference.ids().tolist(), k
        assert torch.equal(table.embeddings(), reference.embeddings()), k
        assert table.stats().evictions == reference.stats().evictions, k
    own = sum(passes) - 2 * 100  # table.ids() and embeddings() export too
    assert evicting > 40
    assert own < evicting / 3, (own, evicting)


def test_lru_capacity_eviction_passes_over_the_table_only_when_its_note_runs_out(
    monkeypatch,
) -> None:
    # Capacity 64: a pass notes max(8 * 2, 64 // 8) = 16 coldest rows; each step inserts 2
    # new ids, so a pass serves 8 evictions.
    engine, opt = engine_with(capacity=64, eviction=CapacityEviction("lru"))
    table, _ = engine.table("f")
    for k in range(32):
        step(engine, opt, [2 * k, 2 * k + 1])
    passes = []
    real = type(table._map).export
    monkeypatch.setattr(type(table._map), "export", lambda m: passes.append(1) or real(m))
    for k in range(32, 64):
        step(engine, opt, [2 * k, 2 * k + 1])
    assert len(passes) == 4
    assert table.ids().tolist() == list(range(64, 128))
    assert table.stats().evictions == 64


@dataclass(frozen=True)
class _RefusesId(Constant):
    """Constant 1.0, but raises for one id: an insert that fails after room was made."""

    refused: int = 100

    def sample(self, ids: torch.Tensor, dim: int, seed) -> torch.Tensor:
        if bool((ids == self.refused).any()):
            raise RuntimeError(f"no initial vector for {self.refused}")
        return super().sample(ids, dim, seed)


def test_lru_capacity_eviction_keeps_a_row_in_use_by_a_failed_lookup_the_coldest() -> None:
    # Ids 1 to 4 last seen at steps 0 to 3. A lookup of 1 and 100 makes room by evicting 2
    # (1 is in use), then 100's initializer fails: 1 was not looked up after all, so it is
    # still the coldest row and the next eviction takes it.
    table = HashTable(DIM, capacity=4, initializer=_RefusesId(value=1.0))
    table.eviction = CapacityEviction("lru")
    for k in range(1, 5):
        table.find_or_insert(torch.tensor([k]))
        table.step += 1
    with pytest.raises(RuntimeError, match="no initial vector for 100"):
        table.find_or_insert(torch.tensor([1, 100]))
    assert table.ids().tolist() == [1, 3, 4]
    table.find_or_insert(torch.tensor([200]))  # fits
    table.find_or_insert(torch.tensor([201]))
    assert table.ids().tolist() == [3, 4, 200, 201]


def test_full_table_without_room_raises() -> None:
    engine, opt = engine_with(capacity=2, eviction=CapacityEviction())
    with pytest.raises(TableFullError, match="capacity 2, 3 new ids"):
        step(engine, opt, [1, 2, 3])
    engine, opt = engine_with(capacity=2)
    step(engine, opt, [1, 2])
    with pytest.raises(TableFullError, match="set an eviction policy"):
        step(engine, opt, [3])


def test_policy_registry() -> None:
    assert make_policy("frequency", threshold=4).threshold == 4
    with pytest.raises(ConfigError, match="unknown policy 'nope'"):
        make_policy("nope")
    with pytest.raises(ConfigError, match=r"threshold in \[1, 2\*\*63 - 1\]"):
        FrequencyAdmission(threshold=0)


def test_eviction_never_takes_a_row_whose_gradient_is_pending() -> None:
    # Two micro-batches before one optimizer step: the first one's rows are in use until the
    # step, so the second one's new id may not take one of them (with its gradient).
    engine = EmbeddingEngine(
        {
            "f": EmbeddingOption(
                1, capacity=3, eviction=CapacityEviction("lru"), initializer=Constant(value=0.0)
            )
        }
    )
    opt = SparseSGD(engine, lr=1.0)
    table, _ = engine.table("f")
    step(engine, opt, [9])  # an idle row, free to evict
    (100 * engine({"f": torch.tensor([1, 2])})["f"]).sum().backward()
    engine({"f": torch.tensor([3])})["f"].sum().backward()  # evicts 9, not 1 or 2
    opt.step()
    assert table.ids().tolist() == [1, 2, 3]
    got = table.embeddings(torch.tensor([1, 2, 3]))[:, 0].tolist()
    assert got == [-100.0, -100.0, -1.0]
    opt.zero_grad()
    (100 * engine({"f": torch.tensor([1, 2, 3])})["f"]).sum().backward()
    with pytest.raises(TableFullError, match="may not evict"):
        engine({"f": torch.tensor([4])})


def test_erasing_a_row_drops_its_pending_gradient() -> None:
    engine, opt = engine_with()
    table, _ = engine.table("f")
    (100 * engine({"f": torch.tensor([1, 2])})["f"]).sum().backward()
    table.erase(torch.tensor([1]))
    engine({"f": torch.tensor([3])})["f"].sum().backward()  # reuses 1's row
    opt.step()
    torch.testing.assert_close(
        table.embeddings(torch.tensor([2, 3])), torch.tensor([[-9.0] * DIM, [0.9] * DIM])
    )


def test_stale_eviction_counts_steps_without_gradients_for_the_table() -> None:
    engine = EmbeddingEngine(
        {
            "f": EmbeddingOption(DIM, eviction=StaleEviction(steps=1)),
            "g": EmbeddingOption(DIM + 1),
        }
    )
    opt = SparseSGD(engine, lr=0.1)
    table, _ = engine.table("f")
    empty = torch.empty(2, 0, dtype=torch.int64)
    for ids in ([[1], [2]], empty, empty):
        out = engine({"f": torch.as_tensor(ids), "g": torch.tensor([[5], [6]])})
        (out["f"].sum() + out["g"].sum()).backward()
        opt.step()
        opt.zero_grad()
    assert table.step == 3
    assert table.ids().tolist() == []


@pytest.mark.parametrize("seed", [7, 100, 2**40, -3])
def test_probability_admission_takes_any_int_seed(seed: int) -> None:
    engine, opt = engine_with(admission=ProbabilityAdmission(p=0.5, seed=seed))
    step(engine, opt, list(range(100)))
    assert 0 < len(engine.table("f")[0]) < 100


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"admission": "frequency"}, "admission must be an AdmissionPolicy"),
        ({"admission": StaleEviction(3)}, "admission must be an AdmissionPolicy"),
        ({"eviction": FrequencyAdmission(2)}, "eviction must be an EvictionPolicy"),
        ({"capacity": 2.5}, "capacity must be an int"),
        ({"default_value": "x"}, "default_value must be a finite number"),
        ({"combiner": "tile", "combiner_kwargs": {"tile_len": 2.5}}, "int L >= 1, got 2.5"),
        ({"combiner": None, "combiner_kwargs": {"max_len": -1}}, "'max_len' must be an int"),
        ({"combiner": None, "combiner_kwargs": {"ragged": 1}}, "'ragged' must be a bool"),
        ({"trainable": "yes"}, "trainable must be a bool"),
        # Each failed at the first lookup with a bare error, or (NaN) made two equal options
        # differ from each other.
        ({"default_value": float("nan")}, "default_value must be a finite number, got nan"),
        ({"shared_name": 3}, "shared_name must be a non-empty str"),
        ({"combiner_kwargs": [("max_len", 2)]}, "combiner_kwargs must be a dict"),
    ],
)
def test_option_values_are_checked_up_front(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        EmbeddingOption(DIM, **kw)


def test_policies_check_their_seeds() -> None:
    with pytest.raises(ConfigError, match="int seed"):
        ProbabilityAdmission(p=0.5, seed=1.5)
    with pytest.raises(ConfigError, match="p <= 1"):
        ProbabilityAdmission(p="0.5")


def test_probability_admission_is_the_same_fused_or_not() -> None:
    ids = torch.arange(64)[:, None]
    admitted = {}
    for fuse in (True, False):
        options = {
            name: EmbeddingOption(DIM, admission=ProbabilityAdmission(p=0.5, seed=1))
            for name in ("a", "b")
        }
        engine = EmbeddingEngine(options, fuse=fuse)
        engine({"a": ids, "b": ids})
        admitted[fuse] = {n: engine.table(n)[0].ids(engine.table(n)[1]).tolist() for n in "ab"}
    assert admitted[True] == admitted[False]
    # Each table draws its own decisions.
    assert admitted[True]["a"] != admitted[True]["b"]


def test_each_table_keeps_its_own_capacity_when_tables_could_fuse() -> None:
    ids = torch.tensor([[1], [2], [3]])
    for fuse in (True, False):
        options = {name: EmbeddingOption(DIM, capacity=3) for name in ("a", "b")}
        engine = EmbeddingEngine(options, fuse=fuse)
        engine({"a": ids, "b": ids})
        assert [len(engine.table(n)[0].ids(engine.table(n)[1])) for n in "ab"] == [3, 3]
        with pytest.raises(TableFullError, match="capacity 3, 1 new ids"):
            engine({"a": torch.tensor([[4]]), "b": ids})


def test_a_lookup_refused_by_a_full_table_takes_no_admission_count() -> None:
    # Capacity 2 with no eviction, full with 1 and 2: id 3's second batch is refused. It
    # must keep its count, so the first batch after a row frees admits it.
    engine, opt = engine_with(capacity=2, admission=FrequencyAdmission(threshold=2))
    table, _ = engine.table("f")
    for _ in range(2):
        step(engine, opt, [1, 2])
    step(engine, opt, [3])  # counted once, rejected
    state = table.admission.state(table, 0)
    assert (state["ids"].tolist(), state["counts"].tolist()) == ([3], [1])
    for _ in range(2):  # refused twice: the count stays at 1
        with pytest.raises(TableFullError):
            engine({"f": torch.tensor([[3]])})
        state = table.admission.state(table, 0)
        assert (state["ids"].tolist(), state["counts"].tolist()) == ([3], [1])
    opt.zero_grad()
    table.erase(torch.tensor([1]))
    out = step(engine, opt, [3])
    assert out.tolist() == [[1.0, 1.0]]  # admitted on its second counted batch
    assert sorted(table.ids().tolist()) == [2, 3]
    assert table.admission.state(table, 0)["ids"].numel() == 0


def test_thresholds_beyond_int64_are_refused() -> None:
    for bad in (2**63, 2**64 + 5):
        with pytest.raises(ConfigError, match=r"threshold in \[1, 2\*\*63 - 1\]"):
            FrequencyAdmission(bad)
        with pytest.raises(ConfigError, match=r"steps in \[1, 2\*\*63 - 1\]"):
            StaleEviction(bad)
    engine, opt = engine_with(admission=FrequencyAdmission(2**63 - 1))
    step(engine, opt, [1])
    assert len(engine.table("f")[0]) == 0


def test_registry_refuses_what_it_cannot_build() -> None:
    from recis_embedding import AdmissionPolicy, register_policy

    with pytest.raises(ConfigError, match="must be a class subclassing AdmissionPolicy"):
        register_policy("x", lambda: 0)
    with pytest.raises(ConfigError, match="must be a class subclassing AdmissionPolicy"):
        register_policy("x", FrequencyAdmission(2))
    with pytest.raises(ConfigError, match="non-empty str"):
        register_policy(3, FrequencyAdmission)

    class Mine(AdmissionPolicy):
        def admit(self, table, ids, tables):
            return torch.ones(ids.shape, dtype=torch.bool)

    with pytest.raises(ConfigError, match="'frequency' is a built-in policy's"):
        register_policy("frequency", Mine)
    assert make_policy("frequency", threshold=2) == FrequencyAdmission(2)
    register_policy("frequency", FrequencyAdmission)  # the same class again: a no-op
    with pytest.raises(ConfigError, match="must be a str, got list"):
        make_policy(["x"])


def test_equal_policies_built_apart_share_a_table() -> None:
    from dataclasses import dataclass

    from recis_embedding import AdmissionPolicy, register_policy

    @dataclass(frozen=True)
    class EvenOnly(AdmissionPolicy):
        modulus: int = 2

        def admit(self, table, ids, tables):
            return ids % self.modulus == 0

    class Opaque(AdmissionPolicy):  # no __eq__: equal only to itself
        def admit(self, table, ids, tables):
            return torch.ones(ids.shape, dtype=torch.bool)

    register_policy("even_only_test", EvenOnly)
    pairs = [
        (make_policy("even_only_test", modulus=2), make_policy("even_only_test", modulus=2)),
        (ProbabilityAdmission(1), ProbabilityAdmission(1.0)),
        (FrequencyAdmission(3), FrequencyAdmission(3)),
    ]
    for a, b in pairs:
        engine = EmbeddingEngine(
            {
                "f": EmbeddingOption(DIM, shared_name="t", admission=a),
                "g": EmbeddingOption(DIM, shared_name="t", admission=b),
                "h": EmbeddingOption(DIM, admission=b),
            }
        )
        assert engine.table("t")[0] is engine.table("h")[0], (a, b)  # fused as well
    opaque = Opaque()
    EmbeddingEngine(
        {
            "f": EmbeddingOption(DIM, shared_name="t", admission=opaque),
            "g": EmbeddingOption(DIM, shared_name="t", admission=opaque),
        }
    )
    with pytest.raises(ConfigError, match=r"policies agree when equal \(==\)"):
        EmbeddingEngine(
            {
                "f": EmbeddingOption(DIM, shared_name="t", admission=Opaque()),
                "g": EmbeddingOption(DIM, shared_name="t", admission=Opaque()),
            }
        )
    with pytest.raises(ConfigError, match="differ in admission=FrequencyAdmission"):
        EmbeddingEngine(
            {
                "f": EmbeddingOption(DIM, shared_name="t", admission=FrequencyAdmission(2)),
                "g": EmbeddingOption(DIM, shared_name="t", admission=FrequencyAdmission(3)),
            }
        )


def test_feature_and_module_names_must_be_strings() -> None:
    with pytest.raises(
        ConfigError, match=r"feature names must be non-empty strs \(batch keys\), got 1"
    ):
        EmbeddingEngine({1: EmbeddingOption(DIM)})
    with pytest.raises(ConfigError, match="DynamicEmbedding: name must be a non-empty str"):
        DynamicEmbedding(EmbeddingOption(DIM), name=5)


def test_custom_policies_rejections_and_evictions_are_counted() -> None:
    """The table counts what any policy keeps out or removes, as the built-in ones' are."""
    from recis_embedding import AdmissionPolicy, EvictionPolicy

    class EvenOnly(AdmissionPolicy):
        def admit(self, table, ids, tables):
            return ids % 2 == 0

    class DropOdd(EvictionPolicy):
        def after_step(self, table):
            ids = table.ids()
            table.erase(ids[ids % 2 == 1])

    engine, opt = engine_with(admission=EvenOnly())
    step(engine, opt, [1, 2, 3, 3])
    stats = engine.table("f")[0].stats()
    assert (stats.rows, stats.admissions_rejected, stats.evictions) == (1, 2, 0)
    engine, opt = engine_with(eviction=DropOdd())
    step(engine, opt, [1, 2, 3])
    stats = engine.table("f")[0].stats()
    assert (stats.rows, stats.admissions_rejected, stats.evictions) == (1, 0, 2)
    # A hand-made erase outside a policy is no eviction.
    engine.table("f")[0].erase(torch.tensor([2]))
    assert engine.table("f")[0].stats().evictions == 2


def test_an_eviction_policy_that_makes_no_room_or_evicts_a_row_in_use_is_refused() -> None:
    from recis_embedding import EvictionPolicy

    class Liar(EvictionPolicy):  # reports room, frees nothing
        def make_room(self, table, needed, protect):
            return True

    class IgnoresProtect(EvictionPolicy):  # evicts the oldest rows, in use or not
        def make_room(self, table, needed, protect):
            keys, tabs, rows = table.export()
            order = torch.argsort(table.inserted[rows] * 1_000 + keys, stable=True)[:needed]
            return table.erase(keys[order], tabs[order]) >= needed

    engine, opt = engine_with(capacity=3, eviction=Liar())
    step(engine, opt, [1, 2, 3])
    with pytest.raises(TableFullError, match=r"Liar.make_room reported room for 3 new ids but"):
        step(engine, opt, [4, 5, 6])
    assert len(engine.table("f")[0]) == 3
    engine, opt = engine_with(capacity=3, eviction=IgnoresProtect())
    step(engine, opt, [1, 2, 3])
    # Id 1 is read by this lookup and the oldest: its row would go to id 4, gradient and all.
    with pytest.raises(TableFullError, match="tried to evict a row in use by this lookup"):
        step(engine, opt, [1, 4])
    assert engine.table("f")[0].ids().tolist() == [1, 2, 3]
    step(engine, opt, [4])  # no row in use: the oldest, id 1, goes
    assert engine.table("f")[0].ids().tolist() == [2, 3, 4]
    assert engine.table("f")[0].stats().evictions == 1


def test_policy_configurations_that_do_nothing_or_do_not_fit_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"evicts only from a full table, and this option sets"):
        EmbeddingOption(DIM, eviction=CapacityEviction("lfu"))
    with pytest.raises(ConfigError, match=r"policy 'frequency' does not take \['thresh'\]"):
        make_policy("frequency", thresh=3)
    engine, opt = engine_with(capacity=2, eviction=StaleEviction(5))
    step(engine, opt, [1, 2])
    with pytest.raises(TableFullError, match="StaleEviction does not evict to make room"):
        step(engine, opt, [3])
