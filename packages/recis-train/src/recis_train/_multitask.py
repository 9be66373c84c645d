"""``MultiTask``: one shared model body, one head, loss, weight and metric set per task."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from recis_train.exceptions import ConfigError, LabelError, ModelOutputError
from recis_train.metrics import Metric


@dataclasses.dataclass
class Task:
    """One prediction task of a :class:`MultiTask` model.

    Attributes:
        name: the task's name (keys of losses, predictions and metrics).
        head: maps the shared representation ``(B, H)`` to logits ``(B,)`` or ``(B, 1)``.
        label: the batch column holding the task's 0/1 (or soft) labels.
        weight: the task's weight in the total loss.
        loss: ``loss(logits, labels) -> scalar`` (default: binary cross-entropy on logits,
            for which every batch's labels are checked to lie in ``[0, 1]``).
        metrics: metric name -> factory for this task (default: the trainer's).
    """

    name: str
    head: nn.Module
    label: str
    weight: float = 1.0
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = (
        nn.functional.binary_cross_entropy_with_logits
    )
    metrics: Mapping[str, Callable[[], Metric]] | None = None


_BCE = nn.functional.binary_cross_entropy_with_logits


def _labels(task: Task, target: Any, rows: int) -> torch.Tensor:
    """``target`` as ``(rows,)``, checked to fit the task (raises :class:`LabelError`).

    One label per row is required; with the default loss (binary cross-entropy) every label
    must lie in ``[0, 1]`` (soft labels included), since the loss is silently wrong outside.
    NaN labels are left to the trainer's non-finite loss check, which names the step.
    """
    where = f"task {task.name!r}: label column {task.label!r}"
    if not isinstance(target, torch.Tensor):
        raise LabelError(f"{where} must be a tensor, got {type(target).__name__}")
    if target.numel() != rows:
        raise LabelError(
            f"{where} has shape {tuple(target.shape)}, expected one label per row ({rows} rows)"
        )
    target = target.reshape(rows)
    if task.loss is _BCE and rows:
        bad = (target < 0) | (target > 1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise LabelError(
                f"{where} holds {float(target[row]):g} at row {row}; binary cross-entropy "
                "needs labels in [0, 1] (set Task.loss for other targets)"
            )
    return target


class MultiTask(nn.Module):
    """A model with several heads over one body (e.g. click and conversion).

    ``body(batch)`` returns either one shared representation ``(B, H)`` used by every head, or
    a dict ``task name -> (B, H_t)`` (per-task towers, as in MMoE). The forward pass returns
    what the :class:`~recis_train.Trainer` reads: per-task ``losses`` and ``weights``,
    ``predictions`` (sigmoid of the logits) and ``labels``, plus ``groups`` when
    ``group_column`` is set (for GAUC).

    Args:
        body: the shared module.
        tasks: the tasks, in order.
        group_column: batch column of group ids (e.g. user) passed on as ``groups``.

    Example:
        >>> model = MultiTask(body, [Task("click", nn.Linear(64, 1), label="label"),
        ...                          Task("conversion", nn.Linear(64, 1), label="conversion", weight=0.5)])
    """

    def __init__(self, body: nn.Module, tasks: Sequence[Task], *, group_column: str | None = None):
        super().__init__()
        if not tasks:
            raise ConfigError("MultiTask needs at least one task")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"MultiTask task names must be unique, got {names}")
        self.body = body
        self.heads = nn.ModuleDict({t.name: t.head for t in tasks})
        self.tasks = list(tasks)
        self.group_column = group_column

    def task_metrics(self) -> dict[str, Mapping[str, Callable[[], Metric]]]:
        """Per-task metric factories the trainer uses instead of its default."""
        return {t.name: t.metrics for t in self.tasks if t.metrics is not None}

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        shared = self.body(batch)
        losses, predictions, labels = {}, {}, {}
        for task in self.tasks:
            rep = shared[task.name] if isinstance(shared, Mapping) else shared
            logits = self.heads[task.name](rep)
            logits = logits.reshape(logits.shape[0], -1)
            if logits.shape[1] != 1:
                raise ModelOutputError(
                    f"task {task.name!r}: head must give one logit per row, got shape {tuple(logits.shape)}"
                )
            logits = logits[:, 0]
            if task.label not in batch:
                raise ConfigError(f"task {task.name!r}: batch has no label column {task.label!r}")
            target = _labels(task, batch[task.label], logits.shape[0])
            losses[task.name] = task.loss(logits.float(), target.to(torch.float32))
            predictions[task.name] = torch.sigmoid(logits.detach().float())
            labels[task.name] = target
        out: dict[str, Any] = {
            "losses": losses,
            "weights": {t.name: t.weight for t in self.tasks},
            "predictions": predictions,
            "labels": labels,
        }
        if self.group_column is not None:
            if self.group_column not in batch:
                raise ConfigError(
                    f"MultiTask group_column {self.group_column!r}: batch has no such column "
                    f"(its group ids go with the predictions of tasks "
                    f"{[t.name for t in self.tasks]}); give the batch that column, or "
                    "group_column=None"
                )
            out["groups"] = batch[self.group_column]
        return out
