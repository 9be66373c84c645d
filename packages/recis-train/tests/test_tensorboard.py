"""TensorBoardHook: scalars read back from the event files with tensorboard's EventAccumulator."""

from __future__ import annotations

import sys

import pytest
import torch
from _toy import NUM_DENSE, ToyModel, ToyReader, make_optimizers
from torch import nn

import recis_embedding as emb
from recis_train import TensorBoardHook, Trainer, TrainingArguments, seed_everything

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def scalars(log_dir) -> dict[str, dict[int, float]]:
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step was logged twice: {steps}"
        out[tag] = {e.step: e.value for e in events}
    return out


def toy_trainer(out, hook, **args):
    seed_everything(0)
    model = ToyModel(tasks=("click", "conv"))
    dense, sparse = make_optimizers(model)
    settings = {"output_dir": str(out), "device": "cpu", "log_every": 2} | args
    return Trainer(
        model,
        TrainingArguments(**settings),
        train_data=ToyReader(200, 20),
        eval_data=lambda: ToyReader(60, 30, seed=1),
        dense_optimizer=dense,
        sparse_optimizer=sparse,
        hooks=[hook],
    )


def test_train_and_eval_scalars_match_the_trainer_history(tmp_path):
    trainer = toy_trainer(tmp_path, TensorBoardHook(), train_steps=6, eval_every=3)
    final = trainer.train_and_evaluate()
    found = scalars(tmp_path / "tensorboard")
    for step, logs in trainer.history["train"]:
        for key in ("loss", "loss/click", "loss/conv", "lr"):
            assert found[f"train/{key}"][step] == pytest.approx(logs[key], rel=1e-6)
        rate = logs["samples"] / logs["step_time"]
        assert found["train/samples_per_s"][step] == pytest.approx(rate, rel=1e-5)
    assert sorted(found["train/loss"]) == [1, 2, 3, 4, 5, 6]
    assert sorted(found["eval/click/auc"]) == [3, 6]
    for key, value in final.items():
        assert found[f"eval/{key}"][6] == pytest.approx(value, rel=1e-6)
    assert not any(tag.startswith("tables/") for tag in found)  # nn.Embedding has no stats()


def test_an_evaluation_after_training_is_written(tmp_path):
    hook = TensorBoardHook(str(tmp_path / "tb"))
    trainer = toy_trainer(tmp_path / "run", hook, train_steps=2)
    trainer.train()
    assert hook.writer is None
    results = trainer.evaluate()
    assert hook.writer is None
    assert scalars(tmp_path / "tb")["eval/conv/auc"] == {2: pytest.approx(results["conv/auc"])}


class TableModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = emb.EmbeddingEngine({"ids": emb.EmbeddingOption(4)})
        self.mlp = nn.Linear(NUM_DENSE + 4, 1)

    def forward(self, batch):
        out = self.embeddings({"ids": batch["ids"].reshape(-1, 1)})
        logits = self.mlp(torch.cat([batch["dense"], out["ids"]], dim=1))[:, 0]
        return nn.functional.binary_cross_entropy_with_logits(logits, batch["click"])


def test_table_statistics_every_n_steps(tmp_path):
    model = TableModel()
    trainer = Trainer(
        model,
        TrainingArguments(output_dir=str(tmp_path), device="cpu", train_steps=6),
        train_data=ToyReader(200, 20),
        dense_optimizer=torch.optim.Adam(model.mlp.parameters()),
        sparse_optimizer=emb.SparseAdam(model, lr=0.01),
        hooks=[TensorBoardHook(stats_every=3)],
    )
    trainer.train()
    found = scalars(tmp_path / "tensorboard")
    rows = [tag for tag in found if tag.startswith("tables/") and tag.endswith("/rows")]
    assert len(rows) == 1
    assert sorted(found[rows[0]]) == [3, 6]
    table = model.embeddings.physical[0]
    assert found[rows[0]][6] == len(table) > 0


def test_a_resumed_run_replaces_the_steps_after_its_checkpoint(tmp_path):
    # The first run is cut short after step 5; its checkpoint is from step 3.
    first = toy_trainer(tmp_path, TensorBoardHook(), train_steps=5, save_every=3, save_at_end=False)
    first.train()
    lost = dict(first.history["train"])
    resumed = toy_trainer(tmp_path, TensorBoardHook(), train_steps=8, save_every=3)
    resumed.train()
    kept = dict(resumed.history["train"])
    found = scalars(tmp_path / "tensorboard")["train/loss"]
    assert sorted(found) == list(range(1, 9))
    assert found[2] == pytest.approx(lost[2]["loss"])
    for step in (4, 5, 6, 8):
        assert found[step] == pytest.approx(kept[step]["loss"])


def test_missing_tensorboard_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"recis-train\[tensorboard\]"):
        TensorBoardHook()
