"""Resume over a real recis-io reader: its cursor goes into the checkpoint and comes back."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _toy import NUM_DENSE, ToyModel, make_optimizers, make_rows

import recis_io
from recis_train import Trainer, TrainingArguments, seed_everything
from recis_train.exceptions import NonFiniteLossError

ROWS = 900


def write_parquet(path):
    rows = make_rows(ROWS, seed=3)
    columns = {f"d{i}": pa.array(rows["dense"][:, i].numpy()) for i in range(NUM_DENSE)}
    columns |= {k: pa.array(rows[k].numpy()) for k in ("ids", "click", "conv", "row")}
    # Several row groups so batches cross row-group boundaries and shuffling has units to permute.
    pq.write_table(pa.table(columns), path, row_group_size=128)


class ColumnsModel(ToyModel):
    def forward(self, batch):
        dense = torch.stack([batch[f"d{i}"] for i in range(NUM_DENSE)], dim=1)
        return super().forward(
            {**{k: batch[k] for k in ("ids", "click", "conv", "row")}, "dense": dense}
        )


def build(out, path, reader_epochs=2, **args):
    seed_everything(0)
    model = ColumnsModel(ROWS)
    dense, sparse = make_optimizers(model)
    reader = recis_io.Dataset(
        [str(path)], batch_size=40, shuffle=True, seed=11, epochs=reader_epochs
    )
    settings = {"output_dir": str(out), "device": "cpu", "save_every": 5, "deterministic": True}
    trainer = Trainer(
        model,
        TrainingArguments(**(settings | args)),
        train_data=reader,
        dense_optimizer=dense,
        sparse_optimizer=sparse,
    )
    return trainer


def test_resume_over_recis_io_continues_with_the_next_sample(tmp_path):
    path = tmp_path / "clicks.parquet"
    write_parquet(path)
    whole = build(tmp_path / "whole", path)
    whole.train()
    # 23 batches per reader epoch: step 27 is inside the reader's second epoch.
    cut = build(tmp_path / "cut", path, train_steps=27)
    cut.train()
    assert cut.checkpoints.latest().name == "step-000000027"
    resumed = build(tmp_path / "cut", path)
    resumed.train()
    assert resumed.global_step == whole.global_step
    for key, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    assert torch.equal(resumed.model.seen, torch.full((ROWS,), 2))


def test_trainer_epochs_read_a_new_order_each_and_resume_exactly(tmp_path):
    path = tmp_path / "clicks.parquet"
    write_parquet(path)
    orders = []
    whole = build(tmp_path / "whole", path, reader_epochs=1, epochs=2)
    forward = whole.model.forward

    def record(batch):
        orders.append(batch["row"].tolist())
        return forward(batch)

    whole.model.forward = record
    whole.train()
    rows = [r for batch in orders for r in batch]
    first, second = rows[:ROWS], rows[ROWS:]
    assert sorted(first) == sorted(second) == list(range(ROWS))
    assert first != second  # the trainer calls set_epoch: each epoch is shuffled anew
    cut = build(tmp_path / "cut", path, reader_epochs=1, epochs=2, train_steps=27)
    cut.train()
    resumed = build(tmp_path / "cut", path, reader_epochs=1, epochs=2)
    resumed.train()
    assert resumed.global_step == whole.global_step
    for key, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def test_a_nan_loss_names_the_readers_own_epoch_and_row(tmp_path):
    # The reader runs 2 epochs of 23 batches in the trainer's one: the 30th batch is the 7th
    # of the reader's second epoch, ending at row 280 of its shard.
    write_parquet(tmp_path / "data.parquet")
    trainer = build(tmp_path / "out", tmp_path / "data.parquet")
    forward = trainer.model.forward
    calls = []

    def poisoned(batch):
        calls.append(1)
        if len(calls) == 30:
            batch = {**batch, "d0": batch["d0"] * float("nan")}
        return forward(batch)

    trainer.model.forward = poisoned
    with pytest.raises(
        NonFiniteLossError,
        match=r"at step 30 \(epoch 1 of 1, batch 30 of that epoch; the reader's own epoch 2 of "
        r"that pass, up to row 280 of its shard, micro-batch 1 of 1",
    ):
        trainer.train()
