"""Contracts of sharded tables met under ``torchrun``: saves that fail on one rank."""

from __future__ import annotations

import datetime
import gc
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import recis_embedding._checkpoint_save as checkpoint_save
from recis_embedding import (
    CheckpointError,
    ConfigError,
    EmbeddingEngine,
    EmbeddingOption,
    SparseAdam,
    TableFullError,
    load,
    save,
)
from recis_kernels import owner_rank

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

WORLD = 2


def engine() -> EmbeddingEngine:
    return EmbeddingEngine({"a": EmbeddingOption(2), "b": EmbeddingOption(2)}, shard=True)


def train(model: EmbeddingEngine, opt: SparseAdam, ids: torch.Tensor) -> None:
    out = model({"a": ids[:, None], "b": ids[:, None] * 3})
    (out["a"].sin().sum() + out["b"].square().sum()).backward()
    opt.step()
    opt.zero_grad()


def state(model: EmbeddingEngine) -> dict[str, torch.Tensor]:
    out = {}
    for name, (table, index) in sorted(model.logical.items()):
        ids = table.ids(index)
        out[name] = torch.cat([ids[:, None].double(), table.read_full(table.find(ids, index))], 1)
    return out


def failing(real, rank: int, fail_rank: int):
    def write(*args, **kwargs):
        if rank == fail_rank:
            raise OSError(f"disk full on rank {rank}")
        return real(*args, **kwargs)

    return write


def _join(rank: int, root: str) -> None:
    """Join the gloo group of the test's ``WORLD`` processes (rendezvous through ``root``)."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{root}/init",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),  # a loaded machine may start a rank late
    )


def _save_worker(rank: int, root: str) -> None:
    _join(rank, root)
    model = engine()
    opt = SparseAdam(model, lr=0.1)
    train(model, opt, torch.arange(12))
    save(Path(root) / "ckpt", model, opt)
    saved = state(model)
    train(model, opt, torch.arange(6, 30))
    errors = []
    # Rank 1 fails writing its table files; then rank 0 fails writing the manifest.
    for name, fail_rank in (("save_file", 1), ("_write", 0)):
        real = getattr(checkpoint_save, name)
        setattr(checkpoint_save, name, failing(real, rank, fail_rank))
        try:
            save(Path(root) / "ckpt", model, opt)
            errors.append(None)
        except Exception as exc:  # what each rank got is the result
            errors.append((type(exc).__name__, str(exc)))
        finally:
            setattr(checkpoint_save, name, real)
        dist.barrier()
        # The previous checkpoint is intact and loads on every rank.
        fresh = engine()
        load(Path(root) / "ckpt", fresh, SparseAdam(fresh, lr=0.1))
        got = state(fresh)
        errors.append(all(torch.equal(got[k], saved[k]) for k in saved))
    # No rank recorded the failed saves: a delta builds on the intact checkpoint.
    save(Path(root) / "delta", model, opt, delta=True)
    fresh = engine()
    load(Path(root) / "delta", fresh, SparseAdam(fresh, lr=0.1))
    got, now = state(fresh), state(model)
    errors.append(all(torch.equal(got[k], now[k]) for k in now))
    torch.save(errors, Path(root) / f"errors-{rank}.pt")
    dist.destroy_process_group()


def test_a_save_failing_on_one_rank_raises_on_every_rank_and_keeps_the_checkpoint(
    tmp_path: Path,
) -> None:
    mp.spawn(_save_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"errors-{r}.pt") for r in range(WORLD)]
    # The failing rank raises its own error, the others a CheckpointError naming it.
    assert got[1][0] == ("OSError", "disk full on rank 1")
    assert got[0][0][0] == "CheckpointError"
    assert "failed while writing the table files on rank 1 (OSError: disk full" in got[0][0][1]
    assert got[0][2] == ("OSError", "disk full on rank 0")
    assert got[1][2][0] == "CheckpointError"
    assert "failed while writing the manifest on rank 0" in got[1][2][1]
    for r in range(WORLD):
        assert got[r][1] is True, r  # previous checkpoint intact
        assert got[r][3] is True, r
        assert got[r][4] is True, r  # delta on top of it
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_host_tables_sharded_over_nccl_are_refused_naming_them(tmp_path, monkeypatch) -> None:
    # NCCL exchanges CUDA tensors only: host tables failed at their first lookup inside NCCL.
    # A one-process gloo group stands in, its backend reported as nccl.
    assert not dist.is_initialized(), "a process group is already initialized in this process"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        options = {"user": EmbeddingOption(4), "item": EmbeddingOption(4, shared_name="goods")}
        EmbeddingEngine(options, shard=True)  # gloo: host tables are fine
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
        with pytest.raises(
            ConfigError, match=r"sharded tables \['goods', 'user'\] live on the host"
        ):
            EmbeddingEngine(options, shard=True)
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
        EmbeddingEngine(options, shard=True)
    finally:
        dist.destroy_process_group()


def _owned_by(rank: int, count: int, start: int = 0) -> torch.Tensor:
    ids = torch.arange(start, start + 64 * count)
    return ids[owner_rank(ids, WORLD) == rank][:count]


def _one_rank_worker(rank: int, root: str) -> None:
    _join(rank, root)
    got: dict[str, object] = {}
    # 1. A table looked up but left out of the loss on every rank: the step leaves its rows
    # (value, moments, step count) alone, as one process does.
    model = EmbeddingEngine({"a": EmbeddingOption(2), "c": EmbeddingOption(3)}, shard=True)
    opt = SparseAdam(model, lr=0.1)
    ids = torch.arange(8)[:, None] + rank
    out = model({"a": ids, "c": ids})
    # The ranks agree on which lookups got a gradient in one all-reduce per step and one per
    # zero_grad(), whatever the number of tables.
    calls: list[str] = []
    all_reduce = dist.all_reduce

    def counted(*args, **kwargs):
        calls.append("all_reduce")
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counted
    try:
        opt.zero_grad()
        got["zero_grad all_reduces"] = len(calls)
        (out["a"].sum() + out["c"].sum()).backward()
        opt.step()
        got["step all_reduces"] = len(calls) - got["zero_grad all_reduces"]
    finally:
        dist.all_reduce = all_reduce
    opt.zero_grad()
    before = state(model)["c"]
    model({"a": ids, "c": ids})["a"].sum().backward()
    opt.step()
    opt.zero_grad()
    got["unused table unchanged"] = torch.equal(before, state(model)["c"])
    # 2. A lookup refused by a full shard raises on every rank, and all go on afterwards.
    # Garbage collection is off until both refusals are over: their errors must leave no
    # reference cycle holding the model (and its process group) past its last use.
    gc.collect()
    gc.disable()
    full = EmbeddingEngine({"f": EmbeddingOption(2, capacity=3)}, shard=True)
    mine = _owned_by(rank, 5 if rank == 0 else 2, start=100)
    try:
        full({"f": mine[:, None]})
        got["full"] = None
    except TableFullError as exc:
        got["full"] = str(exc)
    got["after full"] = tuple(full({"f": _owned_by(rank, 1)[:, None]})["f"].shape)
    # 3. A load refused on one rank (its share over the capacity) loads nothing anywhere.
    wide = EmbeddingEngine({"f": EmbeddingOption(2)}, shard=True)
    wide({"f": torch.cat([_owned_by(0, 2, 500), _owned_by(1, 5, 500)])[:, None]})
    save(Path(root) / "wide", wide)
    narrow = EmbeddingEngine({"f": EmbeddingOption(2, capacity=3)}, shard=True)
    narrow({"f": _owned_by(rank, 1, 900)[:, None]})
    held = state(narrow)["f"]
    try:
        load(Path(root) / "wide", narrow)
        got["load"] = None
    except CheckpointError as exc:
        got["load"] = str(exc)
    got["kept"] = torch.equal(held, state(narrow)["f"])
    dropped = weakref.ref(full), weakref.ref(narrow)
    del full, narrow
    got["refusing models freed"] = [ref() is None for ref in dropped]
    gc.enable()
    torch.save(got, Path(root) / f"one-rank-{rank}.pt")
    dist.destroy_process_group()


def test_what_one_rank_refuses_or_skips_every_rank_does(tmp_path: Path) -> None:
    mp.spawn(_one_rank_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"one-rank-{r}.pt") for r in range(WORLD)]
    for r in range(WORLD):
        assert got[r]["unused table unchanged"] is True, r
        assert (got[r]["step all_reduces"], got[r]["zero_grad all_reduces"]) == (1, 1), r
        assert got[r]["after full"] == (1, 2), r
        assert got[r]["kept"] is True, r
        assert got[r]["refusing models freed"] == [True, True], r
    assert "table 'f' is full: 0 rows, capacity 3, 5 new ids" in got[0]["full"]
    assert "table 'f' is full on rank 0, which refused this lookup" in got[1]["full"]
    assert "would put 5 rows in it ('f': 5 on this rank)" in got[1]["load"]
    assert "was refused on rank 1 (CheckpointError: table 'f' has capacity 3" in got[0]["load"]


def _mismatch_worker(rank: int, root: str) -> None:
    _join(rank, root)
    got: dict[str, object] = {}
    ids = torch.arange(4)[:, None]
    declared = {
        # Options built from a set: the order differs between processes.
        "order": {"t": EmbeddingOption(2), "z": EmbeddingOption(2)},
        "dim": {"t": EmbeddingOption(2 + rank), "z": EmbeddingOption(2)},
    }
    for case, options in declared.items():
        if case == "order" and rank == 1:
            options = dict(reversed(options.items()))
        model = EmbeddingEngine(options, shard=True)
        try:
            model({"t": ids, "z": ids})
            got[case] = None
        except ConfigError as exc:
            got[case] = str(exc)
    same = EmbeddingEngine({"t": EmbeddingOption(2), "z": EmbeddingOption(2)}, shard=True)
    got["after"] = tuple(same({"t": ids, "z": ids})["t"].shape)
    torch.save(got, Path(root) / f"mismatch-{rank}.pt")
    dist.destroy_process_group()


def test_ranks_declaring_other_tables_are_refused_on_every_rank(tmp_path: Path) -> None:
    mp.spawn(_mismatch_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"mismatch-{r}.pt") for r in range(WORLD)]
    for r in range(WORLD):
        assert (
            "rank 1 declares other tables than rank 0 (tables of rank 0: ['t', 'z']; of "
            "rank 1: ['z', 't'])" in got[r]["order"]
        ), r
        assert "not from a set" in got[r]["order"]
        assert "physical table 0 is ['t' (dim 2, TruncatedNormal(" in got[r]["dim"], r
        assert "on rank 0 and ['t' (dim 3, " in got[r]["dim"], r
        assert got[r]["after"] == (4, 2), r


def _gloo_threads() -> list[str]:
    """Names of this process's gloo threads (Linux)."""
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
        except OSError:
            continue  # the thread ended meanwhile
        if "gloo" in name:
            names.append(name)
    return names


def _teardown_worker(rank: int, root: str) -> None:
    _join(rank, root)
    model = engine()
    # Creating a torch optimizer imports torch.distributed.nn.functional (through
    # torch._dynamo) unless something imported it before the group existed.
    opt = SparseAdam(model, lr=0.1)
    train(model, opt, torch.arange(4) + rank)
    dist.destroy_process_group()
    torch.save(_gloo_threads(), Path(root) / f"threads-{rank}.pt")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through /proc")
def test_destroying_the_group_ends_its_threads(tmp_path: Path) -> None:
    """A sharded run's group is gone after destroy_process_group: nothing recis imports keeps
    it alive, so no gloo thread is left to race the interpreter's shutdown (which aborts the
    process at exit)."""
    mp.spawn(_teardown_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    for r in range(WORLD):
        assert torch.load(tmp_path / f"threads-{r}.pt") == [], r


@pytest.mark.parametrize(
    ("backend", "cuda"),
    [
        ("nccl", True),
        ("cuda:nccl", True),
        ("NCCL", True),
        ("gloo", False),
        ("cpu:gloo", False),
        ("cpu:gloo,cuda:nccl", False),  # host tensors go through gloo
        ("cuda:nccl,cpu:gloo", False),
        ("mpi", False),
    ],
)
def test_which_backends_take_cuda_tensors_only(backend: str, cuda: bool) -> None:
    # dist.get_backend() returns the string the group was made with: "cuda:nccl" is NCCL too.
    from recis_embedding._sharding import cuda_only

    assert cuda_only(backend) is cuda
