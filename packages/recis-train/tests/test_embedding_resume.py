"""Resume with recis-embedding's dynamic tables and sparse optimizer (the real seam)."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from _toy import TableModel, ToyReader, table_trainer
from _toy import table_rows as rows_of

import recis_embedding as emb
from recis_train import (
    EmbeddingCheckpoint,
    TableStatsHook,
    Trainer,
    TrainingArguments,
    seed_everything,
    warm_start,
)
from recis_train.exceptions import ConfigError


def build(out, **args):
    return table_trainer(out, hooks=[TableStatsHook(every=5, stream=io.StringIO())], **args)


def test_resume_with_dynamic_tables_is_bit_exact(tmp_path):
    whole = build(tmp_path / "whole")
    whole.train()
    cut = build(tmp_path / "cut", train_steps=18)
    assert isinstance(cut.sparse_checkpoint, EmbeddingCheckpoint)
    cut.train()
    assert (cut.checkpoints.latest() / "sparse").is_dir()
    resumed = build(tmp_path / "cut")
    resumed.train()
    assert resumed.global_step == whole.global_step == 40
    with emb.tables_saved_separately():  # dense tensors here, tables below
        for key, value in whole.model.state_dict().items():
            assert torch.equal(resumed.model.state_dict()[key], value), key
    ids_a, rows_a = rows_of(whole)
    ids_b, rows_b = rows_of(resumed)
    assert torch.equal(ids_a, ids_b)
    assert torch.equal(rows_a, rows_b)
    stats = resumed.hooks[0].history[-1][1]
    assert next(iter(stats.values()))["rows"] == len(ids_a)


def test_tables_no_sparse_optimizer_steps_keep_no_lookup_records(tmp_path):
    # Frozen tables (no sparse optimizer): what lookups recorded is dropped every step,
    # not kept for an update that never comes.
    seed_everything(0)
    model = TableModel()
    trainer = Trainer(
        model,
        TrainingArguments(output_dir=str(tmp_path), device="cpu", train_steps=5),
        train_data=ToyReader(100, 25),
        dense_optimizer=torch.optim.Adam(model.mlp.parameters(), lr=0.02),
    )
    trainer.train()
    tables = emb.sparse_parameters(model)
    assert tables
    assert all(len(table.pending) == 0 for table in tables)
    assert tables[0].stats().rows > 0


def test_checkpoints_resume_and_warm_start_take_the_state_dict_without_the_table_warning(
    tmp_path,
):
    # The trainer saves tables through recis_embedding.save, so its own state_dict() calls
    # (checkpoint, resume, warm start) never raise TablesNotInStateDictWarning, which a
    # plain state_dict() of the same trained model does.
    with warnings.catch_warnings():
        warnings.simplefilter("error", emb.TablesNotInStateDictWarning)
        cut = build(tmp_path / "cut", train_steps=8)
        cut.train()
        resumed = build(tmp_path / "cut", train_steps=12)
        resumed.model.embeddings({"ids": torch.tensor([[3]])})  # rows the resume replaces
        resumed.train()
        assert resumed.global_step == 12
        seed_everything(1)
        fresh = TableModel()
        fresh.embeddings({"ids": torch.tensor([[-5], [7]])})  # rows warm start replaces
        result = warm_start(fresh, resumed.checkpoints.latest())
    assert result.tables["ids"] == len(emb.sparse_parameters(resumed.model)[0]) > 0
    with pytest.warns(emb.TablesNotInStateDictWarning, match=r"'embeddings'.*'ids': \d+"):
        resumed.model.state_dict()


def test_warm_start_loads_whole_rows_with_fresh_optimizer_state(tmp_path, monkeypatch):
    donor = build(tmp_path / "donor", train_steps=8)
    donor.train()
    drawn: list[int] = []
    real = emb.TruncatedNormal.sample
    monkeypatch.setattr(
        emb.TruncatedNormal,
        "sample",
        lambda self, ids, *a: drawn.append(ids.numel()) or real(self, ids, *a),
    )
    fresh = build(tmp_path / "fresh")  # its SparseAdam gives the table Adam's slots
    (table,) = emb.sparse_parameters(fresh.model)
    table.configure_state(*_adam_layout(emb.sparse_parameters(donor.model)[0]))
    result = warm_start(fresh.model, donor.checkpoints.latest())
    assert drawn == []  # no initial vector is drawn only to be overwritten
    ids, rows = rows_of(donor)
    assert result.tables["ids"] == len(ids)
    assert torch.equal(table.embeddings(ids), rows)
    # The optimizer state of the rows taken is fresh (their slots' initial values).
    fresh_state = table.read_full(table.find(ids))[:, table.emb_words :]
    start = 0
    for slot, width in table.slots:
        init = table.state_init(slot).expand(len(ids), width)
        assert torch.equal(fresh_state[:, start : start + width], init), slot
        start += width


def _adam_layout(donor_table):
    init = torch.cat([donor_table.state_init(s) for s, _ in donor_table.slots])
    return donor_table.optimizer_kind, donor_table.slots, init


def test_table_stats_keep_bounds_the_snapshots_it_holds(tmp_path):
    every = build(tmp_path / "all")
    every.train()
    bounded = table_trainer(
        tmp_path / "bounded", hooks=[TableStatsHook(every=5, stream=io.StringIO(), keep=2)]
    )
    bounded.train()
    steps = [step for step, _ in every.hooks[0].history]
    assert steps == list(range(5, 41, 5))
    assert bounded.hooks[0].history == every.hooks[0].history[-2:]
    with pytest.raises(ConfigError, match="TableStatsHook: keep must be an int of at least 1"):
        TableStatsHook(keep=0)
