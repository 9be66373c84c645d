"""MultiTask and MultiStage pipelines."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _toy import NUM_DENSE, ToyReader
from torch import nn

from recis_train import (
    MultiStage,
    MultiTask,
    Stage,
    Task,
    Trainer,
    TrainingArguments,
    seed_everything,
)
from recis_train.exceptions import ConfigError, LabelError, MetricInputError
from recis_train.metrics import AUROC, Calibration, LogLoss


class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(50, 4)
        self.mlp = nn.Sequential(nn.Linear(NUM_DENSE + 4, 16), nn.ReLU())

    def forward(self, batch):
        return self.mlp(torch.cat([batch["dense"], self.embedding(batch["ids"])], dim=1))


def two_tasks(**click):
    return [
        Task("click", nn.Linear(16, 1), label="click", **click),
        Task("conv", nn.Linear(16, 1), label="conv", weight=0.25, metrics={"auc": AUROC}),
    ]


def test_multitask_output_matches_hand_computed_losses():
    seed_everything(0)
    model = MultiTask(Body(), two_tasks(), group_column="ids")
    batch = next(iter(ToyReader(64, 64)))
    out = model(batch)
    features = model.body(batch)
    click_logits = model.heads["click"](features)[:, 0]
    expected = nn.functional.binary_cross_entropy_with_logits(click_logits, batch["click"])
    torch.testing.assert_close(out["losses"]["click"], expected)
    torch.testing.assert_close(out["predictions"]["click"], torch.sigmoid(click_logits).detach())
    assert out["weights"] == {"click": 1.0, "conv": 0.25}
    assert torch.equal(out["groups"], batch["ids"])


def test_multitask_trains_with_per_task_metrics(tmp_path):
    seed_everything(0)
    model = MultiTask(Body(), two_tasks())
    trainer = Trainer(
        model,
        TrainingArguments(output_dir=str(tmp_path), device="cpu", epochs=3, save_at_end=False),
        train_data=ToyReader(1_000, 50),
        eval_data=ToyReader(500, 100, seed=1),
        dense_optimizer=torch.optim.Adam(model.parameters(), lr=0.03),
    )
    results = trainer.train_and_evaluate()
    assert set(results) == {
        "loss",
        "loss/click",
        "loss/conv",
        "click/auc",
        "click/logloss",
        "click/calibration",
        "conv/auc",
    }
    assert results["loss"] == pytest.approx(
        results["loss/click"] + 0.25 * results["loss/conv"], rel=1e-5
    )
    assert results["click/auc"] > 0.8


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: MultiTask(Body(), []), "MultiTask needs at least one task"),
        (lambda: MultiTask(Body(), two_tasks() + two_tasks()), "task names must be unique"),
    ],
)
def test_multitask_configuration_errors(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_multitask_names_a_missing_label():
    model = MultiTask(Body(), [Task("buy", nn.Linear(16, 1), label="purchase")])
    with pytest.raises(ConfigError, match="task 'buy': batch has no label column 'purchase'"):
        model(next(iter(ToyReader(8, 8))))


def test_multitask_takes_a_column_of_labels_and_keeps_soft_ones():
    model = MultiTask(Body(), [Task("click", nn.Linear(16, 1), label="click")])
    batch = next(iter(ToyReader(8, 8)))
    flat = model(batch)
    column = model({**batch, "click": batch["click"].reshape(8, 1)})
    torch.testing.assert_close(column["losses"]["click"], flat["losses"]["click"])
    assert column["labels"]["click"].shape == (8,)
    soft = model({**batch, "click": torch.full((8,), 0.25)})
    assert torch.isfinite(soft["losses"]["click"])


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0, 0.0, 0.0, 1.0]), "holds 2 at row 2; binary"),
        (torch.tensor([0, 1, 0, 0, 1, 0, 0, -1]), "holds -1 at row 7; binary"),
        (torch.zeros(4), r"has shape \(4,\), expected one label per row \(8 rows\)"),
        ([0.0] * 8, "must be a tensor, got list"),
    ],
)
def test_multitask_rejects_labels_that_do_not_fit_the_task(labels, message):
    model = MultiTask(Body(), [Task("click", nn.Linear(16, 1), label="click")])
    batch = next(iter(ToyReader(8, 8)))
    with pytest.raises(LabelError, match="task 'click': label column 'click' " + message):
        model({**batch, "click": labels})


def test_multitask_leaves_label_values_to_a_custom_loss():
    mse = MultiTask(
        Body(), [Task("stay", nn.Linear(16, 1), label="t", loss=nn.functional.mse_loss)]
    )
    batch = next(iter(ToyReader(8, 8)))
    out = mse({**batch, "t": torch.linspace(-3, 40, 8)})
    assert torch.isfinite(out["losses"]["stay"])


def stages():
    return [
        Stage(
            "pretrain",
            ToyReader(400, 40),
            lambda ps: torch.optim.Adam(ps, lr=0.05),
            args={"epochs": 1},
        ),
        Stage(
            "finetune",
            ToyReader(400, 40, seed=2),
            lambda ps: torch.optim.SGD(ps, lr=0.1),
            eval_data=ToyReader(200, 100, seed=1),
            frozen=["body.embedding"],
            args={"train_steps": 5},
        ),
    ]


def test_multistage_runs_stages_in_order_and_freezes(tmp_path):
    seed_everything(0)
    model = MultiTask(Body(), two_tasks(metrics={"logloss": LogLoss}))
    args = TrainingArguments(output_dir=str(tmp_path), device="cpu")
    runner = MultiStage(model, args, stages())
    snapshots = {}
    results = runner.run()
    assert set(results) == {"pretrain", "finetune"}
    assert results["pretrain"] == {}
    assert "click/logloss" in results["finetune"]
    for name in ("pretrain", "finetune"):
        assert (tmp_path / name / "checkpoints").is_dir()
    # finetune froze the embedding: its weights equal the end of pretraining.
    pretrain_end = (tmp_path / "pretrain" / "checkpoints").glob("step-*")
    from safetensors.torch import load_file

    saved = load_file(str(next(pretrain_end) / "dense" / "model.safetensors"))
    assert torch.equal(saved["body.embedding.weight"], model.body.embedding.weight)
    assert not torch.equal(saved["heads.click.weight"], model.heads["click"].weight)
    assert all(p.requires_grad for p in model.parameters())  # flags restored after the stage
    snapshots["final"] = {k: v.clone() for k, v in model.state_dict().items()}

    # Rerunning skips finished stages and leaves the model as the last stage ended.
    seed_everything(1)
    again = MultiTask(Body(), two_tasks(metrics={"logloss": LogLoss}))
    assert MultiStage(again, args, stages()).run() == results
    for key, value in again.state_dict().items():
        assert torch.equal(value, snapshots["final"][key]), key


def test_multistage_rejects_duplicate_names_and_all_frozen(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), device="cpu")
    model = MultiTask(Body(), two_tasks())
    with pytest.raises(ConfigError, match="unique names"):
        MultiStage(model, args, stages() + stages())
    frozen = Stage(
        "x",
        ToyReader(10, 5),
        lambda ps: torch.optim.SGD(ps, lr=0.1),
        trainable=["body.mlp"],
        frozen=["body", "heads"],
    )
    with pytest.raises(ConfigError, match="stage 'x': no trainable parameter is left"):
        MultiStage(model, args, [frozen]).run()


def test_multitask_names_a_missing_group_column():
    model = MultiTask(Body(), [Task("click", nn.Linear(16, 1), label="click")], group_column="user")
    with pytest.raises(
        ConfigError, match=r"group_column 'user': batch has no such column .*tasks \['click'\]"
    ):
        model(next(iter(ToyReader(8, 8))))


def test_soft_labels_evaluate_with_metrics_that_accept_them(tmp_path):
    batches = [{**b, "click": torch.sigmoid(b["dense"][:, 0])} for b in ToyReader(64, 32)]

    def trainer(**metrics):
        seed_everything(0)
        model = MultiTask(Body(), [Task("click", nn.Linear(16, 1), label="click", **metrics)])
        args = TrainingArguments(output_dir=str(tmp_path), device="cpu", save_at_end=False)
        return Trainer(
            model,
            args,
            train_data=batches,
            eval_data=batches,
            dense_optimizer=torch.optim.Adam(model.parameters()),
        )

    with pytest.raises(
        MetricInputError,
        match=r"labels must be 0 or 1, found 0\.\d+ at \d+; soft labels need metrics",
    ):
        trainer().evaluate()
    results = trainer(metrics={"logloss": LogLoss, "calibration": Calibration}).evaluate()
    assert sorted(results) == ["click/calibration", "click/logloss", "loss", "loss/click"]
    assert results["click/logloss"] == pytest.approx(results["loss"], rel=1e-4)


def flags(model):
    return {name: param.requires_grad for name, param in model.named_parameters()}


def test_a_stage_that_fails_leaves_no_parameter_frozen(tmp_path):
    model = MultiTask(Body(), two_tasks())
    before = flags(model)
    args = TrainingArguments(output_dir=str(tmp_path / "a"), device="cpu")
    everything = Stage("x", ToyReader(10, 5), lambda ps: torch.optim.SGD(ps, lr=0.1))
    frozen = dataclasses.replace(everything, frozen=["body", "heads"])
    with pytest.raises(ConfigError, match="stage 'x': no trainable parameter is left"):
        MultiStage(model, args, [frozen]).run()
    assert flags(model) == before

    def broken():
        yield from ToyReader(10, 5)
        raise OSError("the data went away")

    failing = dataclasses.replace(everything, train_data=broken(), frozen=["body"])
    args = TrainingArguments(output_dir=str(tmp_path / "b"), device="cpu")
    with pytest.raises(OSError, match="the data went away") as raised:
        MultiStage(model, args, [failing]).run()
    # The flags are back while the error's traceback (and the run's frames in it) is alive.
    assert flags(model) == before
    assert raised.traceback


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["ft", "ft/"], r"stage name 'ft/' is not a plain directory name"),
        (["ft", "a\\b"], r"stage name 'a\\\\b' is not a plain directory name"),
        (["."], r"stage name '\.' is not a plain directory name"),
        (["..", "x"], r"stage name '\.\.' is not a plain directory name"),
        (["", "x"], r"stage names must be non-empty strings .* got '' among \['', 'x'\]"),
        (
            ["FT", "ft"],
            r"unique names .*: 'FT' and 'ft' name the same one on a case-insensitive file system",
        ),
    ],
)
def test_stage_names_must_each_name_a_directory_of_their_own(tmp_path, names, message):
    args = TrainingArguments(output_dir=str(tmp_path), device="cpu")
    stage = Stage("x", ToyReader(10, 5), lambda ps: torch.optim.SGD(ps, lr=0.1))
    with pytest.raises(ConfigError, match=message):
        MultiStage(Body(), args, [dataclasses.replace(stage, name=n) for n in names])
