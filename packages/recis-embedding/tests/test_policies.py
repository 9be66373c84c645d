from __future__ import annotations

import pytest
import torch

from recis_embedding import (
    CapacityEviction,
    ConfigError,
    Constant,
    EmbeddingEngine,
    EmbeddingOption,
    FrequencyAdmission,
    ProbabilityAdmission,
    ReadOnlyAdmission,
    SparseSGD,
    StaleEviction,
    TableFullError,
    make_policy,
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
    with pytest.raises(ConfigError, match="threshold >= 1"):
        FrequencyAdmission(threshold=0)
