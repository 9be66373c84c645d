"""Row-wise sharding over 2 and 3 CPU processes (gloo) against a single-process run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recis_embedding import (
    CapacityEviction,
    Constant,
    EmbeddingEngine,
    EmbeddingOption,
    FrequencyAdmission,
    Normal,
    SparseAdam,
    SparseSGD,
    load,
    save,
)
from recis_kernels import RaggedTensor, owner_rank

B, DIM, STEPS = 4, 3, 3
FEATURES = ("user", "hist")

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)


def make_engine(shard: bool, group: object = None, *, concat: bool = False) -> EmbeddingEngine:
    init = Normal(std=0.5)
    return EmbeddingEngine(
        {
            "user": EmbeddingOption(DIM, initializer=init),
            "hist": EmbeddingOption(DIM, initializer=init, combiner="mean"),
        },
        shard=shard,
        process_group=group,
        concat={"both": list(FEATURES)} if concat else None,
    )


def rank_batch(step: int, rank: int) -> dict:
    g = torch.Generator().manual_seed(100 * step + rank)
    ids = torch.randint(-6, 6, (10,), generator=g) * ((1 << 61) + 1)
    lengths = torch.tensor([3, 0, 2, 1])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return {"user": ids[:B, None], "hist": RaggedTensor(ids[B : B + 6], offsets)}


def global_batch(step: int, world: int) -> dict:
    parts = [rank_batch(step, r) for r in range(world)]
    values = torch.cat([p["hist"].values for p in parts])
    lengths = torch.cat([p["hist"].lengths() for p in parts])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return {"user": torch.cat([p["user"] for p in parts]), "hist": RaggedTensor(values, offsets)}


def loss(out: dict, step: int, rows: slice) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    total = 0
    for f in FEATURES:
        target = torch.randn(64, DIM, generator=g)[rows]
        total = total + (out[f] - target).square().sum()
    return total


def table_state(engine: EmbeddingEngine) -> dict[str, torch.Tensor]:
    out = {}
    for name, (table, index) in sorted(engine.logical.items()):
        ids = table.ids(index)
        out[f"{name}.ids"] = ids
        out[f"{name}.rows"] = table.read_full(table.find(ids, index))
    return out


def _worker(rank: int, world: int, root: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{root}/init", rank=rank, world_size=world)
    # Phase 1: ranks 0 and 1 train a table sharded over a 2-rank group and save it.
    pair = dist.new_group([0, 1])
    if rank < 2:
        # Pooled batch-major into one joined output: the same values as the reference.
        engine = make_engine(shard=True, group=pair, concat=True)
        opt = SparseAdam(engine, lr=0.05)
        outs = []
        for k in range(STEPS):
            out = engine(rank_batch(k, rank))
            outs.append({f: out[f].detach().clone() for f in FEATURES})
            loss(out, k, slice(rank * B, (rank + 1) * B)).backward()
            opt.step()
            opt.zero_grad()
        save(Path(root) / "ckpt2", engine, opt)
        torch.save({"outs": outs, "state": table_state(engine)}, Path(root) / f"train-{rank}.pt")
        # 1 -> 2: the single-process checkpoint of the same training loads into this shard.
        resharded = make_engine(shard=True, group=pair)
        load(Path(root) / "ckpt1", resharded, SparseAdam(resharded, lr=0.05))
        mine, loaded = table_state(engine), table_state(resharded)
        assert mine.keys() == loaded.keys()
        for key in mine:
            torch.testing.assert_close(loaded[key], mine[key], rtol=1e-6, atol=1e-6)
        policy_training(rank, pair, root)
        eviction_training(rank, pair, root)
        unused_training(rank, pair, root)
    dist.barrier()
    # Phase 2: all 3 ranks load the 2-shard checkpoint and save it as 3 shards.
    engine = make_engine(shard=True)
    opt = SparseAdam(engine, lr=0.05)
    load(Path(root) / "ckpt2", engine, opt)
    save(Path(root) / "ckpt3", engine, opt)
    torch.save({"state": table_state(engine)}, Path(root) / f"reshard-{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_sharded_training_and_resharding_match_one_process(tmp_path: Path) -> None:
    # The same data in one process: both ranks' batches concatenated, losses summed.
    ref = make_engine(shard=False)
    opt = SparseAdam(ref, lr=0.05)
    ref_outs = []
    for k in range(STEPS):
        out = ref(global_batch(k, 2))
        ref_outs.append({f: out[f].detach().clone() for f in FEATURES})
        loss(out, k, slice(0, 2 * B)).backward()
        opt.step()
        opt.zero_grad()
    expected = table_state(ref)

    save(tmp_path / "ckpt1", ref, opt)
    mp.spawn(_worker, args=(3, str(tmp_path)), nprocs=3, join=True)
    check_policy_training(tmp_path)
    check_eviction_training(tmp_path)
    check_unused_training(tmp_path)

    ranks = [torch.load(tmp_path / f"train-{r}.pt") for r in range(2)]
    for k in range(STEPS):
        for f in FEATURES:
            got = torch.cat([ranks[r]["outs"][k][f] for r in range(2)])
            torch.testing.assert_close(got, ref_outs[k][f], rtol=1e-6, atol=1e-6)
    for name in ("user", "hist"):
        ids = torch.cat([ranks[r]["state"][f"{name}.ids"] for r in range(2)])
        for r in range(2):
            owned = ranks[r]["state"][f"{name}.ids"]
            assert bool((owner_rank(owned, 2) == r).all())
        order = torch.argsort(ids)
        assert torch.equal(ids[order], expected[f"{name}.ids"])
        rows = torch.cat([ranks[r]["state"][f"{name}.rows"] for r in range(2)])[order]
        torch.testing.assert_close(rows, expected[f"{name}.rows"], rtol=1e-6, atol=1e-6)

    # Resharding 1 -> 2 was checked in the workers; 2 -> 3 and 3 -> 1 here.
    for r in range(3):
        state = torch.load(tmp_path / f"reshard-{r}.pt")["state"]
        assert bool((owner_rank(state["user.ids"], 3) == r).all())
    single = make_engine(shard=False)
    load(tmp_path / "ckpt3", single, SparseAdam(single, lr=0.05))
    got = table_state(single)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6)


def policy_engine(shard: bool, group: object = None) -> EmbeddingEngine:
    return EmbeddingEngine(
        {
            "f": EmbeddingOption(
                DIM,
                initializer=Normal(std=0.5),
                admission=FrequencyAdmission(threshold=2),
                eviction=CapacityEviction("lfu"),
                capacity=1000,
            ),
            "t": EmbeddingOption(DIM, combiner="tile", combiner_kwargs={"tile_len": 2}),
        },
        shard=shard,
        process_group=group,
    )


def policy_batch(step: int, rank: int) -> dict:
    # Id 7 is used twice by every rank's batch; rank 1's tile feature has no rows at all.
    g = torch.Generator().manual_seed(10 * step + rank)
    ids = torch.randint(0, 6, (6,), generator=g)
    ids[:2] = 7
    rows = 0 if rank == 1 else 2
    tile = RaggedTensor(ids[: 2 * rows], torch.arange(0, 2 * rows + 1, 2))
    return {"f": RaggedTensor(ids, torch.tensor([0, 3, 4, 6])), "t": tile}


def policy_state(engine: EmbeddingEngine) -> dict:
    table, index = engine.table("f")
    ids = table.ids(index)
    rows = table.find(ids, index)
    stats = table.stats()
    return {
        "ids": ids,
        "rows": table.read_full(rows),
        "frequency": table.frequency[rows].clone(),
        "last_seen": table.last_seen[rows].clone(),
        "inserted": table.inserted[rows].clone(),
        "counted": table.admission.state(table, index)["ids"],
        "stats": (stats.lookups, stats.hits, stats.admissions_rejected),
    }


def policy_loss(out: dict) -> torch.Tensor:
    return out["f"].square().sum() + out["t"].sin().sum()


def policy_reference() -> dict:
    """The policy engine trained in one process on both ranks' batches."""
    engine = policy_engine(shard=False)
    opt = SparseAdam(engine, lr=0.05)
    for k in range(STEPS):
        parts = [policy_batch(k, r) for r in range(2)]
        joined = {}
        for f in ("f", "t"):
            values = torch.cat([p[f].values for p in parts])
            lengths = torch.cat([p[f].lengths() for p in parts])
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
            joined[f] = RaggedTensor(values, offsets)
        policy_loss(engine(joined)).backward()
        opt.step()
        opt.zero_grad()
    return policy_state(engine)


def policy_training(rank: int, group: object, root: str) -> None:
    """Ranks 0 and 1 train the policy engine sharded over ``group``."""
    engine = policy_engine(shard=True, group=group)
    opt = SparseAdam(engine, lr=0.05)
    for k in range(STEPS):
        out = engine(policy_batch(k, rank))
        # zero_grad between forward and backward, as torch's own tutorials do.
        opt.zero_grad()
        policy_loss(out).backward()
        opt.step()
    torch.save(policy_state(engine), Path(root) / f"policy-{rank}.pt")


def check_policy_training(root: Path) -> None:
    """Admission, eviction statistics and rows of the sharded run equal one process's."""
    expected = policy_reference()
    ranks = [torch.load(root / f"policy-{r}.pt") for r in range(2)]
    ids = torch.cat([s["ids"] for s in ranks])
    order = torch.argsort(ids)
    assert torch.equal(ids[order], expected["ids"])
    for key in ("frequency", "last_seen", "inserted"):
        assert torch.equal(torch.cat([s[key] for s in ranks])[order], expected[key]), key
    rows = torch.cat([s["rows"] for s in ranks])[order]
    torch.testing.assert_close(rows, expected["rows"], rtol=1e-6, atol=1e-6)
    counted = torch.cat([s["counted"] for s in ranks]).sort().values
    assert torch.equal(counted, expected["counted"])
    # Each key is served once per step by its owner, however many ranks asked for it.
    summed = tuple(sum(s["stats"][i] for s in ranks) for i in range(3))
    assert summed == expected["stats"]


# Capacity eviction per shard: ids 100..119 are inserted at step 0, ids 0..19 at step 1, all
# are used once more at step 2 (equal uses and last step seen), and step 3 inserts new ids.
EVICT_OLD, EVICT_YOUNG, EVICT_NEW = range(100, 120), range(20), range(1000, 1030)


def eviction_capacity() -> int:
    owners = owner_rank(torch.tensor([*EVICT_OLD, *EVICT_YOUNG]), 2)
    return int(torch.bincount(owners, minlength=2).max())


def eviction_training(rank: int, group: object, root: str) -> None:
    option = EmbeddingOption(
        1,
        initializer=Constant(value=0.0),
        capacity=eviction_capacity(),
        eviction=CapacityEviction("lru"),
    )
    engine = EmbeddingEngine({"f": option}, shard=True, process_group=group)
    opt = SparseSGD(engine, lr=0.1)
    old, young, new = (list(r)[rank::2] for r in (EVICT_OLD, EVICT_YOUNG, EVICT_NEW))
    for ids in (old, young, young + old, new):
        engine({"f": torch.tensor(ids)[:, None]})["f"].sum().backward()
        opt.step()
        opt.zero_grad()
    table, index = engine.table("f")
    torch.save(table.ids(index), Path(root) / f"evict-{rank}.pt")


def check_eviction_training(root: Path) -> None:
    """Each shard evicts its own rows in the documented order: first inserted, then by id."""
    capacity = eviction_capacity()
    for rank in range(2):
        aged = [i for i in [*EVICT_OLD, *EVICT_YOUNG] if owner_rank(torch.tensor([i]), 2) == rank]
        new = [i for i in EVICT_NEW if owner_rank(torch.tensor([i]), 2) == rank]
        over = max(0, len(aged) + len(new) - capacity)
        expected = sorted(aged[over:] + new)
        assert torch.load(root / f"evict-{rank}.pt").tolist() == expected, rank


# Features each rank's loss uses at each step: a fused lookup whose other feature no rank's
# loss used steps none of the rows only that feature read (the mark travels with the
# gradients); one that some rank's loss used steps every row it read, as one process does
# with the output of the concatenated batches.
UNUSED_PLAN = [
    (("user", "hist"), ("user", "hist")),
    (("user",), ("user",)),
    (("hist",), ("user",)),
    (("user",), ("user", "hist")),
    (("user",), ("user",)),
]


def unused_engine(shard: bool, group: object = None) -> EmbeddingEngine:
    init = Constant(0.5)
    return EmbeddingEngine(
        {
            "user": EmbeddingOption(DIM, initializer=init),
            "hist": EmbeddingOption(DIM, initializer=init, combiner="mean"),
        },
        shard=shard,
        process_group=group,
    )


def unused_steps(engine: EmbeddingEngine, batches: list[dict], ranks: list[int]) -> None:
    """Steps on ``batches``: the batches of ``ranks`` (all, in one process), each rank's
    loss over its rows of the features the plan gives it."""
    from recis_embedding import SparseAdamW

    opt = SparseAdamW(engine, lr=0.05, weight_decay=0.5)
    for plan, data in zip(UNUSED_PLAN, batches, strict=True):
        out = engine(data)
        total = 0
        for k, rank in enumerate(ranks):
            rows = slice(k * B, (k + 1) * B)
            total = total + sum((out[f][rows] * out[f][rows]).sum() for f in plan[rank])
        total.backward()
        opt.step()
        opt.zero_grad()


def unused_training(rank: int, group: object, root: str) -> None:
    engine = unused_engine(shard=True, group=group)
    unused_steps(engine, [rank_batch(k, rank) for k in range(len(UNUSED_PLAN))], [rank])
    torch.save(table_state(engine), Path(root) / f"unused-{rank}.pt")


def check_unused_training(root: Path) -> None:
    ref = unused_engine(shard=False)
    unused_steps(ref, [global_batch(k, 2) for k in range(len(UNUSED_PLAN))], [0, 1])
    expected = table_state(ref)
    shards = [torch.load(root / f"unused-{r}.pt") for r in range(2)]
    for name in ("user", "hist"):
        ids = torch.cat([s[f"{name}.ids"] for s in shards])
        rows = torch.cat([s[f"{name}.rows"] for s in shards])
        order = torch.argsort(ids)
        assert torch.equal(ids[order], expected[f"{name}.ids"]), name
        torch.testing.assert_close(rows[order], expected[f"{name}.rows"], rtol=1e-6, atol=1e-6)
    # The plan left some rows unstepped: they still hold their initial value.
    assert bool((expected["hist.rows"][:, :DIM] == 0.5).all(dim=1).any())
