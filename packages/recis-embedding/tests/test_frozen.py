"""Frozen tables (``trainable=False``): no growth, no row changes, default values for unseen ids."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recis_embedding import (
    CapacityEviction,
    CheckpointReader,
    ConfigError,
    DynamicEmbedding,
    EmbeddingEngine,
    EmbeddingOption,
    FrequencyAdmission,
    Normal,
    ProbabilityAdmission,
    ReadOnlyAdmission,
    SparseAdam,
    StaleEviction,
    load,
    save,
    sparse_parameters,
)

DIM = 3
DEFAULT = 0.25
KNOWN = torch.arange(10)  # ids the pretrained table holds
UNSEEN = torch.arange(100, 106)


def options(frozen: bool) -> dict[str, EmbeddingOption]:
    return {
        "item": EmbeddingOption(
            DIM, trainable=not frozen, default_value=DEFAULT, initializer=Normal(std=0.5)
        ),
        "user": EmbeddingOption(DIM, initializer=Normal(std=0.5)),
    }


class Model(torch.nn.Module):
    def __init__(self, frozen: bool, shard: bool = False) -> None:
        super().__init__()
        self.emb = EmbeddingEngine(options(frozen), shard=shard)
        self.head = torch.nn.Linear(2 * DIM, 1)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        out = self.emb(batch)
        loss = self.head(torch.cat([out["item"], out["user"]], 1)).square().sum()
        return loss, out


def step_batch(k: int) -> dict:
    # Known and unseen item ids in every batch; user ids grow the trainable table.
    items = torch.cat([KNOWN[k : k + 3], UNSEEN[k : k + 2]])
    return {"item": items[:, None], "user": (items + 1000 * k)[:, None]}


def pretrained(root: Path) -> Path:
    """A checkpoint of the model trained with ``item`` trainable, holding ``KNOWN`` items."""
    model = Model(frozen=False)
    opt = SparseAdam(model, lr=0.1)
    batch = {"item": KNOWN[:, None], "user": KNOWN[:, None]}
    for _ in range(2):
        model(batch)[0].backward()
        opt.step()
        opt.zero_grad()
    return save(root / "pretrained", model, opt)


def item_state(engine: EmbeddingEngine) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    table, index = engine.table("item")
    ids = table.ids(index)
    rows = table.find(ids, index)
    meta = torch.stack([table.frequency[rows], table.last_seen[rows], table.inserted[rows]])
    return ids, table.read_full(rows), meta


def test_a_frozen_table_neither_grows_nor_changes_in_training(tmp_path: Path) -> None:
    path = pretrained(tmp_path)
    model = Model(frozen=True)
    opt = SparseAdam(model, lr=0.1)
    # A warm start: the saved Adam state of "item" has no slots to go to, and needs none.
    load(path, model, opt)
    before = item_state(model.emb)
    table, index = model.emb.table("item")
    stats, clock = table.stats(), table.step
    assert torch.equal(before[0], KNOWN)
    dense = torch.optim.SGD(model.head.parameters(), lr=0.1)
    model.train()
    for k in range(4):
        loss, out = model(step_batch(k))
        assert not out["item"].requires_grad
        ids = step_batch(k)["item"][:, 0]
        known = torch.isin(ids, KNOWN)
        assert torch.equal(out["item"][known], table.embeddings(ids[known], index))
        assert bool((out["item"][~known] == DEFAULT).all())
        loss.backward()
        opt.step()
        dense.step()
        opt.zero_grad()
        dense.zero_grad()
    after = item_state(model.emb)
    assert torch.equal(after[0], before[0])
    assert torch.equal(after[1], before[1])  # embeddings bit for bit
    assert torch.equal(after[2], before[2])  # eviction statistics
    assert table.stats().inserts == stats.inserts
    assert table.step == clock  # no optimizer steps it
    assert model.emb.rows_per_table()["user"] > len(KNOWN)  # the trainable table grew


def test_a_frozen_table_is_absent_from_delta_checkpoints_and_round_trips(tmp_path: Path) -> None:
    model = Model(frozen=True)
    opt = SparseAdam(model, lr=0.1)
    load(pretrained(tmp_path), model, opt)
    save(tmp_path / "base", model, opt)
    for k in range(3):
        model(step_batch(k))[0].backward()
        opt.step()
        opt.zero_grad()
    save(tmp_path / "delta", model, opt, delta=True)
    delta = CheckpointReader(tmp_path / "delta")
    assert delta.table_info("item")["rows"] == 0
    assert delta.read("item", "erased").numel() == 0
    assert delta.table_info("user")["rows"] > 0
    save(tmp_path / "full", model, opt)
    for name in ("delta", "full"):
        loaded = Model(frozen=True)
        load(tmp_path / name, loaded, SparseAdam(loaded, lr=0.1))
        for got, want in zip(item_state(loaded.emb), item_state(model.emb), strict=True):
            assert torch.equal(got, want), name


def test_a_frozen_dynamic_embedding_reads_defaults_for_unseen_ids() -> None:
    emb = DynamicEmbedding(EmbeddingOption(DIM, trainable=False, default_value=DEFAULT))
    emb.table.find_or_insert(torch.tensor([1, 2]))
    stored = emb.table.embeddings(torch.tensor([1, 2]))
    out = emb(torch.tensor([[1], [7], [2]]))
    assert len(emb.table) == 2
    assert torch.equal(out[[0, 2]], stored)
    assert bool((out[1] == DEFAULT).all())


def test_frozen_and_trainable_tables_are_never_fused() -> None:
    engine = EmbeddingEngine(
        {"a": EmbeddingOption(DIM, trainable=False), "b": EmbeddingOption(DIM)}, fuse=True
    )
    frozen, trainable = engine.table("a")[0], engine.table("b")[0]
    assert frozen is not trainable
    assert sparse_parameters(engine) == [trainable]
    engine({"a": torch.tensor([[5]]), "b": torch.tensor([[5]])})
    assert engine.rows_per_table() == {"a": 0, "b": 1}
    with pytest.raises(ConfigError, match=r"share table 'a'.*trainable=False vs True"):
        EmbeddingEngine(
            {"a": EmbeddingOption(DIM, trainable=False), "x": EmbeddingOption(DIM, shared_name="a")}
        )


@pytest.mark.parametrize(
    ("policy", "named"),
    [
        ({"admission": FrequencyAdmission(2)}, "admission=FrequencyAdmission"),
        ({"admission": ProbabilityAdmission(0.5)}, "admission=ProbabilityAdmission"),
        ({"eviction": StaleEviction(3)}, "eviction=StaleEviction"),
        ({"eviction": CapacityEviction("lru"), "capacity": 10}, "eviction=CapacityEviction"),
    ],
)
def test_a_frozen_table_refuses_admission_and_eviction_policies(policy, named) -> None:
    option = EmbeddingOption(DIM, shared_name="pretrained", trainable=False, **policy)
    with pytest.raises(
        ConfigError, match=rf"feature 'f': table 'pretrained' has trainable=False and {named}"
    ):
        EmbeddingEngine({"f": option})
    EmbeddingEngine({"f": option.replace(trainable=True)})


def test_a_frozen_table_accepts_read_only_admission() -> None:
    # The combination documented before frozen tables stopped inserting still works.
    engine = EmbeddingEngine(
        {"f": EmbeddingOption(DIM, trainable=False, admission=ReadOnlyAdmission())}
    )
    engine({"f": torch.tensor([[3], [4]])})
    table, _ = engine.table("f")
    assert len(table) == 0
    assert table.stats().admissions_rejected == 0  # the policy is not consulted


# --------------------------------------------------------------------------- sharded
WORLD = 2


def _sharded_worker(rank: int, root: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{root}/init",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    model = Model(frozen=True, shard=True)
    opt = SparseAdam(model, lr=0.1)
    load(Path(root) / "pretrained", model, opt)
    before = item_state(model.emb)
    outs = []
    for k in range(3):
        loss, out = model(step_batch(2 * k + rank))
        outs.append(out["item"].detach().clone())
        loss.backward()
        opt.step()
        opt.zero_grad()
    torch.save(
        {"before": before, "after": item_state(model.emb), "outs": outs}, Path(root) / f"r{rank}.pt"
    )
    dist.destroy_process_group()


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)
def test_a_sharded_frozen_table_neither_grows_nor_changes(tmp_path: Path) -> None:
    pretrained(tmp_path)
    reference = Model(frozen=True)
    load(tmp_path / "pretrained", reference, SparseAdam(reference, lr=0.1))
    mp.spawn(_sharded_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"r{r}.pt") for r in range(WORLD)]
    ids = torch.cat([r["after"][0] for r in ranks])
    assert torch.equal(ids.sort().values, KNOWN)  # no rank inserted an unseen id
    for r in ranks:
        for got, want in zip(r["after"], r["before"], strict=True):
            assert torch.equal(got, want)
    reference.eval()
    for rank, r in enumerate(ranks):
        for k, out in enumerate(r["outs"]):
            expected = reference(step_batch(2 * k + rank))[1]["item"]
            assert torch.equal(out, expected), (rank, k)
