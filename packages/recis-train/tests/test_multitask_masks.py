"""MultiTask tasks that leave rows with unknown labels out: ``Task(mask=...)`` and ``missing``."""

from __future__ import annotations

import math

import pytest
import torch
from _toy import NUM_DENSE, ToyReader
from torch import nn

from recis_train import MultiTask, Task, Trainer, TrainingArguments, seed_everything
from recis_train.exceptions import ConfigError, LabelError
from recis_train.metrics import AUROC, GAUC, LogLoss

BCE = nn.functional.binary_cross_entropy_with_logits


class Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(50, 4)
        self.mlp = nn.Sequential(nn.Linear(NUM_DENSE + 4, 16), nn.ReLU())

    def forward(self, batch):
        return self.mlp(torch.cat([batch["dense"], self.embedding(batch["ids"])], dim=1))


class First(nn.Module):
    """A head whose logit is column 0 of the representation (so its gradient is visible)."""

    def forward(self, rep: torch.Tensor) -> torch.Tensor:
        return rep[:, 0]


def leaf_batch(labels: list[float], **columns) -> tuple[dict, torch.Tensor]:
    """A batch whose representation is a leaf: ``rep.grad[:, 0]`` is d loss / d logit."""
    rep = torch.linspace(-2, 2, len(labels)).reshape(-1, 1).repeat(1, 2).requires_grad_()
    batch = {"rep": rep, "y": torch.tensor(labels, dtype=torch.float32), **columns}
    return batch, rep


def leaf_model(**task) -> MultiTask:
    return MultiTask(_Rep(), [Task("t", First(), label="y", **task)])


class _Rep(nn.Module):
    def forward(self, batch):
        return batch["rep"]


def test_column_mask_loss_is_bce_over_kept_rows_and_masked_rows_get_no_gradient():
    keep = torch.tensor([True, False, True, True, False, True])
    # Masked rows hold a -1 sentinel: outside [0, 1], fine since they are left out.
    batch, rep = leaf_batch([1, -1, 0, 1, -1, 0], keep=keep)
    out = leaf_model(mask="keep")(batch)
    logits = rep.detach()[:, 0]
    expected = BCE(logits[keep], batch["y"][keep])
    torch.testing.assert_close(out["losses"]["t"], expected)
    out["losses"]["t"].backward()
    assert torch.all(rep.grad[~keep] == 0)
    assert torch.all(rep.grad[keep, 0] != 0)
    torch.testing.assert_close(out["predictions"]["t"], torch.sigmoid(logits[keep]))
    assert torch.equal(out["labels"]["t"], batch["y"][keep])


@pytest.mark.parametrize("keep", [[1, 0, 1, 1], [1.0, 0.0, 1.0, 1.0], [[1], [0], [1], [1]]])
def test_numeric_mask_columns_count_nonzero_rows(keep):
    batch, rep = leaf_batch([1, 5, 0, 1], keep=torch.tensor(keep))
    out = leaf_model(mask="keep")(batch)
    kept = torch.tensor([True, False, True, True])
    torch.testing.assert_close(out["losses"]["t"], BCE(rep.detach()[kept, 0], batch["y"][kept]))


def test_nan_missing_labels_are_left_out_of_loss_and_outputs():
    batch, rep = leaf_batch([1, math.nan, 0, math.nan, 1])
    out = leaf_model(missing=math.nan)(batch)
    known = ~torch.isnan(batch["y"])
    loss = out["losses"]["t"]
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, BCE(rep.detach()[known, 0], batch["y"][known]))
    loss.backward()
    assert torch.all(rep.grad[~known] == 0)
    assert not torch.isnan(out["labels"]["t"]).any()
    assert out["predictions"]["t"].shape == (3,)


def test_sentinel_missing_and_callable_mask_combine():
    batch, rep = leaf_batch([1, -1, 0, 1, 0, -1], late=torch.tensor([0, 0, 0, 1, 1, 0]))
    calls = []

    def recent(b):
        calls.append(b)
        return b["late"] == 0

    out = leaf_model(mask=recent, missing=-1)(batch)
    kept = torch.tensor([True, False, True, False, False, False])  # passes both
    assert calls == [batch]
    torch.testing.assert_close(out["losses"]["t"], BCE(rep.detach()[kept, 0], batch["y"][kept]))
    assert torch.equal(out["labels"]["t"], torch.tensor([1.0, 0.0]))


def test_custom_loss_receives_only_the_kept_rows():
    seen = []

    def loss(logits, labels):
        seen.append((logits.detach().clone(), labels.clone()))
        return ((torch.sigmoid(logits) - labels) ** 2).mean()

    batch, rep = leaf_batch([0.2, 0.9, 7.0, 0.4], keep=torch.tensor([True, True, False, True]))
    leaf_model(mask="keep", loss=loss)(batch)
    ((logits, labels),) = seen
    torch.testing.assert_close(logits, rep.detach()[[0, 1, 3], 0])
    torch.testing.assert_close(labels, torch.tensor([0.2, 0.9, 0.4]))


def test_label_range_is_checked_on_kept_rows_only():
    batch, _ = leaf_batch([1, 2, 0], keep=torch.tensor([True, True, False]))
    with pytest.raises(LabelError, match=r"task 't': label column 'y' holds 2 at row 1"):
        leaf_model(mask="keep")(batch)
    batch, _ = leaf_batch([1, -1, 0])
    with pytest.raises(LabelError, match=r"holds -1 at row 1.*Task\(mask=...\) or Task\(missing"):
        leaf_model()(batch)


def test_a_batch_without_kept_rows_gives_zero_loss_with_a_gradient_path():
    batch, rep = leaf_batch([math.nan, math.nan, math.nan])
    head = nn.Linear(2, 1)
    model = MultiTask(_Rep(), [Task("t", head, label="y", missing=math.nan)])
    out = model(batch)
    loss = out["losses"]["t"]
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert torch.all(rep.grad == 0)
    assert head.weight.grad is not None
    assert torch.all(head.weight.grad == 0)
    assert out["predictions"]["t"].numel() == 0
    assert out["labels"]["t"].numel() == 0


def two_tasks(mask="click", **conv) -> MultiTask:
    return MultiTask(
        Body(),
        [
            Task("click", nn.Linear(16, 1), label="click"),
            Task("conv", nn.Linear(16, 1), label="conv", mask=mask, **conv),
        ],
        group_column="ids",
    )


def test_training_goes_on_through_batches_that_keep_no_row(tmp_path):
    seed_everything(0)
    model = two_tasks(mask="clicked")
    reader = ToyReader(120, 20)
    # The conversion task keeps the clicked rows of the first batch only: five batches keep none.
    reader.rows["clicked"] = (reader.rows["row"] < 20) & (reader.rows["click"] == 1)
    before = model.heads["conv"].weight.detach().clone()
    trainer = Trainer(
        model,
        TrainingArguments(output_dir=str(tmp_path), device="cpu", save_at_end=False),
        train_data=reader,
        dense_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
    )
    trainer.train()
    losses = [logs["loss/conv"] for _, logs in trainer.history["train"]]
    assert len(losses) == 6
    assert all(math.isfinite(v) for v in losses)
    assert losses[0] > 0
    assert losses[1:] == [0.0] * 5
    assert not torch.equal(model.heads["conv"].weight, before)  # step 1 trained it
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_evaluation_sees_only_the_kept_rows(tmp_path):
    seed_everything(0)
    conv_metrics = {"auc": AUROC, "gauc": GAUC, "logloss": LogLoss}
    model = MultiTask(
        Body(),
        [
            Task("click", nn.Linear(16, 1), label="click"),
            Task("conv", nn.Linear(16, 1), label="conv", mask="clicked", metrics=conv_metrics),
        ],
        group_column="ids",
    )
    reader = ToyReader(400, 50, seed=3)
    # Unclicked rows have no attributed conversion: their label says 1 (as if unknown were
    # stored as positive), which would change every metric if they were counted.
    reader.rows["clicked"] = reader.rows["click"] == 1
    reader.rows["conv"] = torch.where(reader.rows["click"] == 1, reader.rows["conv"], 1.0)
    reader.rows["ids"] = reader.rows["ids"] % 5  # a few groups, each with both classes
    trainer = Trainer(
        model,
        TrainingArguments(output_dir=str(tmp_path), device="cpu", save_at_end=False),
        train_data=[],
        eval_data=reader,
        dense_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
    )
    results = trainer.evaluate()
    model.eval()
    with torch.no_grad():
        rows = reader.rows
        logits = model.heads["conv"](model.body(rows))[:, 0]
    kept = rows["clicked"]
    preds, labels, groups = torch.sigmoid(logits[kept]), rows["conv"][kept], rows["ids"][kept]
    auc, gauc, logloss = AUROC(), GAUC(), LogLoss()
    auc.update(preds, labels)
    gauc.update(preds, labels, groups=groups)
    logloss.update(preds, labels)
    assert results["conv/auc"] == pytest.approx(auc.compute(), abs=1e-12)
    assert results["conv/gauc"] == pytest.approx(gauc.compute(), abs=1e-12)
    assert results["conv/logloss"] == pytest.approx(logloss.compute(), rel=1e-5)
    # The task's loss is its mean over every kept row, not a mean of per-batch means.
    assert results["loss/conv"] == pytest.approx(float(BCE(logits[kept], labels)), rel=1e-5)
    assert results["click/auc"] != results["conv/auc"]


@pytest.mark.parametrize(
    ("task", "columns", "error", "message"),
    [
        ({"mask": "keep"}, {}, ConfigError, "task 't': batch has no mask column 'keep'"),
        (
            {"mask": "keep"},
            {"keep": torch.ones(2, dtype=torch.bool)},
            LabelError,
            r"task 't': mask column 'keep' has shape \(2,\), expected one value per row \(3 rows\)",
        ),
        (
            {"mask": "keep"},
            {"keep": torch.ones(3, 2)},
            LabelError,
            r"mask column 'keep' has shape \(3, 2\)",
        ),
        (
            {"mask": "keep"},
            {"keep": torch.tensor([1.0, 0.5, 0.0])},
            LabelError,
            "mask column 'keep' holds 0.5 at row 1, expected bool or numbers 0 and 1",
        ),
        (
            {"mask": "keep"},
            {"keep": [True, True, False]},
            LabelError,
            "mask column 'keep' must be a tensor, got list",
        ),
        (
            {"mask": "keep"},
            {"keep": torch.ones(3, dtype=torch.complex64)},
            LabelError,
            "mask column 'keep' has dtype torch.complex64, expected bool",
        ),
        (
            {"mask": lambda batch: torch.ones(4, dtype=torch.bool)},
            {},
            LabelError,
            r"task 't': mask function .*<lambda> has shape \(4,\), expected one value per row",
        ),
    ],
)
def test_bad_masks_are_named(task, columns, error, message):
    batch, _ = leaf_batch([1, 0, 1], **columns)
    with pytest.raises(error, match=message):
        leaf_model(**task)(batch)


def test_bad_mask_configuration_is_refused_when_the_task_is_built():
    with pytest.raises(ConfigError, match="task 't': mask must be a batch column name or a"):
        Task("t", First(), label="y", mask=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="task 't': missing must be a number"):
        Task("t", First(), label="y", missing="nan")  # type: ignore[arg-type]


@pytest.mark.parametrize("batch_size", [400, 50, 7])
def test_evaluation_total_loss_is_the_weighted_sum_of_task_losses(tmp_path, batch_size):
    seed_everything(0)
    model = MultiTask(
        Body(),
        [
            Task("click", nn.Linear(16, 1), label="click"),
            Task("conv", nn.Linear(16, 1), label="conv", mask="clicked", weight=0.5),
        ],
    )
    reader = ToyReader(400, batch_size, seed=3)
    reader.rows["clicked"] = reader.rows["click"] == 1
    trainer = Trainer(
        model,
        TrainingArguments(output_dir=str(tmp_path), device="cpu", save_at_end=False),
        train_data=[],
        eval_data=reader,
        dense_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
    )
    results = trainer.evaluate()
    model.eval()
    with torch.no_grad():
        rows = reader.rows
        rep = model.body(rows)
        kept = rows["clicked"]
        click = BCE(model.heads["click"](rep)[:, 0], rows["click"])
        conv = BCE(model.heads["conv"](rep)[kept, 0], rows["conv"][kept])
    # Over the whole evaluation, whatever the batches: the conv mean over its kept rows,
    # weighted as in training; not a row-weighted mean of per-batch totals.
    assert results["loss"] == pytest.approx(float(click + 0.5 * conv), rel=1e-5)
    assert results["loss"] == pytest.approx(
        results["loss/click"] + 0.5 * results["loss/conv"], rel=1e-12
    )


def test_an_evaluation_batch_of_no_rows_weighs_nothing_in_a_multitask_model(tmp_path):
    # Its heads' (0, 1) logits could not be reshaped to (0, -1): the evaluation failed.
    seed_everything(0)
    model = MultiTask(
        Body(),
        [
            Task("click", nn.Linear(16, 1), label="click"),
            Task("conv", nn.Linear(16, 1), label="conv", mask="clicked"),
        ],
    )
    data = list(ToyReader(200, 50, seed=3))
    for batch in data:
        batch["clicked"] = batch["click"] == 1
    empty = {k: v[:0] for k, v in data[0].items()}
    trainer = Trainer(
        model,
        TrainingArguments(output_dir=str(tmp_path), device="cpu", save_at_end=False),
        train_data=[],
        dense_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
    )
    want = trainer.evaluate(data)
    got = trainer.evaluate([data[0], empty, *data[1:]])
    assert got == pytest.approx(want, rel=1e-9)


def test_a_single_loss_is_evaluated_as_the_mean_over_its_labels(tmp_path):
    """A model returning one loss over the rows it kept (and those rows' labels) is weighed by
    them, as in training: weighing its batches by all their rows skewed the evaluation loss."""

    class Kept(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(NUM_DENSE, 1)

        def forward(self, batch):
            keep = batch["clicked"]
            logit = self.lin(batch["dense"])[:, 0][keep]
            label = batch["conv"][keep]
            return {"loss": BCE(logit, label), "predictions": torch.sigmoid(logit), "labels": label}

    seed_everything(0)
    model = Kept()
    data = list(ToyReader(300, 70, seed=3))  # uneven kept counts per batch
    for batch in data:
        batch["clicked"] = batch["click"] == 1
    trainer = Trainer(
        model,
        TrainingArguments(output_dir=str(tmp_path), device="cpu", save_at_end=False),
        train_data=[],
        dense_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        metrics={"logloss": LogLoss},
    )
    results = trainer.evaluate(data)
    with torch.no_grad():
        rows = {k: torch.cat([b[k] for b in data]) for k in data[0]}
        keep = rows["clicked"]
        want = float(BCE(model.lin(rows["dense"])[:, 0][keep], rows["conv"][keep]))
    assert results["loss"] == pytest.approx(want, rel=1e-5)
    assert results["loss"] == pytest.approx(results["logloss"], rel=1e-5)


def test_task_names_and_weights_the_trainer_cannot_use_are_refused():
    for name in ("ctr.v2", "", "loss"):
        with pytest.raises(ConfigError, match="task"):
            Task(name, nn.Linear(16, 1), label="click")
    from recis_train._outputs import parse_output
    from recis_train.exceptions import ModelOutputError

    s = torch.zeros((), requires_grad=True)
    loss = torch.ones((), requires_grad=True)
    with pytest.raises(ModelOutputError, match=r"weights\['click'\] requires grad"):
        parse_output({"losses": {"click": loss}, "weights": {"click": torch.exp(-s)}})
