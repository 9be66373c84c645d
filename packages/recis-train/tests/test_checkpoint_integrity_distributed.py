"""Checkpoint checksums on 2 CPU ranks (gloo): the ranks verify a checkpoint together, each
reading a share of its files, and agree on the checkpoint they restore or the error they raise."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _toy import TableModel, make_rows

import recis_embedding as emb
from recis_train import Trainer, TrainingArguments, seed_everything

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

WORLD = 2
# The checkpoint's files in sorted order; rank r verifies files r, r + 2, r + 4: the dense file
# is rank 0's to read, the trainer state rank 1's.
DAMAGED = ("dense/model.safetensors", "trainer/state.pt")


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
        dist.barrier()  # both ranks are done before either tears the group down
    finally:
        torch.save(result, Path(root) / f"rank-{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(str(root),), nprocs=WORLD, join=True)
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
