"""Checkpoint checksums on 2 CPU ranks (gloo): the ranks compute a checkpoint's checksums when
saving and verify them when restoring together, each reading a share of its files, and agree on
the checkpoint they restore or the error they raise."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _spawn import spawn_ranks
from _toy import TableModel, make_rows

import recis_embedding as emb
import recis_train._distributed as distributed_module
from recis_train import Trainer, TrainingArguments, seed_everything
from recis_train._checkpoint import file_checksum, file_checksums

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

WORLD = 2
# The checkpoint's files in sorted order (dense/model.safetensors, sparse/tables/manifest.json,
# the two table shards, trainer/state.pt); rank r verifies files r, r + 2, r + 4: the dense file
# is rank 0's to read, rank 1's table shard rank 1's.
DAMAGED = ("dense/model.safetensors", "sparse/tables/sparse/ids.shard-00001-of-00002.safetensors")


def build(out: Path, rank: int, **args) -> Trainer:
    seed_everything(0)
    model = TableModel(shard=True, loss_only=True)
    rows = make_rows(96, seed=rank)
    data = [{k: v[s : s + 8] for k, v in rows.items()} for s in range(0, 96, 8)]
    return Trainer(
        model,
        TrainingArguments(output_dir=str(out), device="cpu", **args),
        train_data=data,
        dense_optimizer=torch.optim.SGD(model.mlp.parameters(), lr=0.1),
        sparse_optimizer=emb.SparseSGD(model, lr=0.1),
    )


def flip_middle_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x10
    file.write_bytes(bytes(data))


def _worker(rank: int, root: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{root}/init",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    result: dict = {}
    try:
        for damaged in DAMAGED:
            out = Path(root) / damaged.split("/")[0]
            build(out, rank, train_steps=6, save_every=3).train()
            newest = out / "checkpoints" / "step-000000006"
            if rank == 0:
                result["files"] = sorted(
                    p.relative_to(newest).as_posix() for p in newest.rglob("*") if p.is_file()
                )
                flip_middle_byte(newest / damaged)
            dist.barrier()
            fresh = build(out, rank)
            result[damaged, "auto"] = (str(fresh.restore()), fresh.global_step)
            try:
                build(out, rank).restore(newest)
                result[damaged, "explicit"] = None
            except Exception as err:
                result[damaged, "explicit"] = (type(err).__name__, str(err))
        result["shares"] = _saving_shares(Path(root) / "shares", rank)
        dist.barrier()  # both ranks are done before either tears the group down
    finally:
        torch.save(result, Path(root) / f"rank-{rank}.pt")
        dist.destroy_process_group()


def _saving_shares(out: Path, rank: int) -> dict:
    """Which files each rank checksums when a checkpoint is saved, and a save whose checksum
    reading fails on rank 1."""
    read: list[str] = []

    def recording(root: Path, names: list[str]) -> dict[str, str]:
        read.extend(names)
        return file_checksums(root, names)

    def failing(root: Path, names: list[str]) -> dict[str, str]:
        raise OSError(f"input/output error reading {names[0]}")

    trainer = build(out, rank, train_steps=3)
    trainer.train()  # saves step 3 at the end
    distributed_module.file_checksums = recording
    try:
        trainer.save()  # step 3 again, replacing it
    finally:
        distributed_module.file_checksums = file_checksums
    shares: dict = {"read": sorted(read)}
    trainer.args.train_steps = 4
    trainer.train()  # saves step 4 at the end
    trainer.args.train_steps = 5
    if rank == 1:
        distributed_module.file_checksums = failing
    try:
        trainer.train()  # its save of step 5 fails
        shares["error"] = None
    except Exception as err:
        shares["error"] = (type(err).__name__, str(err))
    finally:
        distributed_module.file_checksums = file_checksums
    return shares


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = spawn_ranks(_worker, lambda: tmp_path_factory.mktemp("ranks"), WORLD)
    return root, [torch.load(root / f"rank-{r}.pt", weights_only=False) for r in range(WORLD)]


def test_the_files_are_shared_out_as_the_test_expects(ranks):
    _, results = ranks
    files = [f for f in results[0]["files"] if f != "manifest.json"]
    assert [files.index(name) % WORLD for name in DAMAGED] == [0, 1]


@pytest.mark.parametrize("damaged", DAMAGED)
def test_every_rank_falls_back_to_the_same_checkpoint(ranks, damaged):
    root, results = ranks
    previous = root / damaged.split("/")[0] / "checkpoints" / "step-000000003"
    assert [r[damaged, "auto"] for r in results] == [(str(previous), 3)] * WORLD


@pytest.mark.parametrize("damaged", DAMAGED)
def test_every_rank_refuses_a_damaged_checkpoint_named_by_path(ranks, damaged):
    _, results = ranks
    errors = [r[damaged, "explicit"] for r in results]
    assert errors[0] == errors[1]
    kind, message = errors[0]
    assert kind == "CheckpointCorruptError"
    assert (
        f"step-000000006: checkpoint file(s) changed since they were written: {damaged} (crc32"
        in message
    )


def test_the_ranks_share_the_checksums_of_a_save(ranks):
    root, results = ranks
    newest = root / "shares" / "checkpoints" / "step-000000003"
    manifest = json.loads((newest / "manifest.json").read_text())
    shares = [r["shares"]["read"] for r in results]
    # Each rank read every other file of the sorted list, and only those: together all of them.
    assert shares == [sorted(manifest["files"][r::WORLD]) for r in range(WORLD)]
    assert all(shares)
    assert not set(shares[0]) & set(shares[1])
    sums = manifest["checksums"]["files"]
    assert sums == {name: file_checksum(newest / name) for name in manifest["files"]}


def test_a_rank_that_cannot_read_its_share_fails_the_save_on_every_rank(ranks):
    root, results = ranks
    for result in results:
        kind, message = result["shares"]["error"]
        assert kind == "CheckpointError"
        assert "saving checkpoint of step 5" in message
        assert "rank 1: OSError: input/output error reading" in message
    # Nothing of the failed save is left; the checkpoint before it is the newest.
    checkpoints = root / "shares" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000000003", "step-000000004"]
