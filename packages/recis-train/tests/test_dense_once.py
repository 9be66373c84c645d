"""A checkpoint holds the dense weights once, in ``dense/model.safetensors``: the tables under
``sparse/tables`` are saved without them, and a restore takes them from the dense part only,
from checkpoints written before too (whose tables hold a copy of them)."""

from __future__ import annotations

import itertools
import shutil

import pytest
import torch
from _toy import TableModel
from _toy import table_rows as rows_of
from _toy import table_trainer as build
from safetensors.torch import load_file

import recis_embedding as emb
import recis_train._sparse as sparse_mod
from recis_train import Trainer, seed_everything, warm_start
from recis_train.exceptions import CheckpointError

ALL_PARTS = ("dense", "sparse", "trainer")


def dense_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.mlp.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module", params=["new", "old"])
def layout(request, tmp_path_factory):
    """A run cut at step 12 whose checkpoints' tables are saved as now (``new``) or, as
    before, with the dense state (``old``); what its latest checkpoint holds."""
    out = tmp_path_factory.mktemp(request.param)
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "old":
            # recis_embedding.save as the trainer called it before: with the dense state.
            def save_with_dense(self, directory, model, sparse_optimizer) -> None:
                emb.save(str(directory / "tables"), model, sparse_optimizer)

            patch.setattr(sparse_mod.EmbeddingCheckpoint, "save", save_with_dense)
        cut = build(out, train_steps=12)
        cut.train()
    step = cut.checkpoints.latest()
    tables = step / "sparse" / "tables"
    assert (tables / "dense.safetensors").exists() == (request.param == "old")
    if request.param == "old":
        copy = emb.CheckpointReader(tables).dense()
        assert same({k.removeprefix("mlp."): v for k, v in copy.items()}, dense_of(cut))
    return {
        "out": out,
        "step": step,
        "dense": dense_of(cut),
        "rows": rows_of(cut),
        "global_step": cut.global_step,
    }


def test_a_checkpoint_holds_the_dense_weights_once(tmp_path) -> None:
    trainer = build(tmp_path, train_steps=12)
    trainer.train()
    for step in sorted(trainer.checkpoints.root.glob("step-*")):
        tables = step / "sparse" / "tables"
        assert not (tables / "dense.safetensors").exists()
        reader = emb.CheckpointReader(tables)
        assert not reader.has_dense
        assert "dense.safetensors" not in reader.manifest["files"]
        assert reader.tables() == ["ids"]
        dense = load_file(str(step / "dense" / "model.safetensors"))
        assert {k for k in dense if k.startswith("mlp.")} == {
            f"mlp.{k}" for k in trainer.model.mlp.state_dict()
        }
    last = load_file(str(trainer.checkpoints.latest() / "dense" / "model.safetensors"))
    assert same({k.removeprefix("mlp."): v for k, v in last.items()}, dense_of(trainer))


@pytest.mark.parametrize(
    "parts",
    [c for n in (1, 2, 3) for c in itertools.combinations(ALL_PARTS, n)],
    ids=lambda c: "+".join(c),
)
def test_restore_loads_each_part_from_its_own_files(layout, parts, tmp_path) -> None:
    fresh = build(tmp_path)
    fresh.model.embeddings({"ids": torch.tensor([[-5], [7]])})  # rows a sparse load replaces
    dense_before, rows_before = dense_of(fresh), rows_of(fresh)
    assert not same(dense_before, layout["dense"])
    assert fresh.restore(layout["step"], parts=parts) == layout["step"]

    # The dense weights come from dense/model.safetensors, and only with "dense" (before,
    # "sparse" alone loaded them too, from the tables' copy).
    assert same(dense_of(fresh), layout["dense"] if "dense" in parts else dense_before)
    ids, rows = rows_of(fresh)
    want_ids, want_rows = layout["rows"] if "sparse" in parts else rows_before
    assert torch.equal(ids, want_ids)
    assert torch.equal(rows, want_rows)
    assert fresh.global_step == (layout["global_step"] if "trainer" in parts else 0)


def test_resume_equals_an_uninterrupted_run(layout, tmp_path) -> None:
    whole = build(tmp_path / "whole")
    whole.train()
    shutil.copytree(layout["out"], tmp_path / "cut")  # the other tests keep the original
    resumed = build(tmp_path / "cut")
    resumed.train()
    assert resumed.global_step == whole.global_step == 40
    assert same(dense_of(resumed), dense_of(whole))
    for a, b in zip(rows_of(resumed), rows_of(whole), strict=True):
        assert torch.equal(a, b)


def test_warm_start_from_a_trainer_checkpoint(layout) -> None:
    seed_everything(1)
    model = TableModel()
    result = warm_start(model, layout["step"])
    assert same(dict(model.mlp.state_dict()), layout["dense"])
    assert result.tables == {"ids": len(layout["rows"][0])}
    table = emb.sparse_parameters(model)[0]
    assert torch.equal(table.embeddings(layout["rows"][0]), layout["rows"][1])


def test_warm_start_from_a_tables_only_embedding_checkpoint(tmp_path) -> None:
    donor = build(tmp_path / "donor", train_steps=6)
    donor.train()
    emb.save(tmp_path / "tables", donor.model, dense=False)

    seed_everything(1)
    model = TableModel()
    before = {k: v.clone() for k, v in model.mlp.state_dict().items()}
    result = warm_start(model, tmp_path / "tables")  # the parts it has: the tables
    assert result.dense == []
    assert result.tables == {"ids": len(rows_of(donor)[0])}
    assert same(dict(model.mlp.state_dict()), before)
    with pytest.raises(CheckpointError, match="has no dense part"):
        warm_start(model, tmp_path / "tables", parts=("dense",))
