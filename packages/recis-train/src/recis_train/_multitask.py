"""``MultiTask``: one shared model body, one head, loss, weight and metric set per task."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from recis_train._evaluation import check_factories
from recis_train.exceptions import ConfigError, LabelError, ModelOutputError
from recis_train.metrics import Metric

#: ``mask(batch) -> (B,) bool tensor``: which rows count for a task
MaskFunction = Callable[[Mapping[str, Any]], torch.Tensor]


@dataclasses.dataclass
class Task:
    """One prediction task of a :class:`MultiTask` model.

    Rows whose label is unknown for this task (a conversion not attributed yet, a label only
    defined on clicked rows, a label stored as NaN or ``-1``) are left out with ``mask`` and/or
    ``missing``: they add nothing to the task's loss (nor its gradient) and are not passed to
    its metrics. A row counts for the task if it passes both.

    Attributes:
        name: the task's name (keys of losses, predictions and metrics).
        head: maps the shared representation ``(B, H)`` to logits ``(B,)`` or ``(B, 1)``.
        label: the batch column holding the task's 0/1 (or soft) labels.
        weight: the task's weight in the total loss (a finite number).
        loss: ``loss(logits, labels) -> scalar`` (default: binary cross-entropy on logits,
            for which every batch's labels are checked to lie in ``[0, 1]``). With ``mask`` or
            ``missing`` it receives the kept rows only; a batch that keeps no row of the task
            contributes a zero loss (with a gradient path, so DDP and gradient accumulation go
            on) and the loss is not called.
        metrics: metric name -> factory for this task (default: the trainer's).
        mask: which rows count for this task: the name of a batch column (bool, or numbers 0
            and 1; one per row, nonzero = the row counts), or ``mask(batch) -> (B,) bool
            tensor``. ``None``: every row (unless ``missing`` leaves it out).
        missing: a label value meaning "unknown" (e.g. ``-1``, or ``float("nan")``, matched
            with ``isnan``): rows whose label equals it are left out. ``None``: none.
    """

    name: str
    head: nn.Module
    label: str
    weight: float = 1.0
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = (
        nn.functional.binary_cross_entropy_with_logits
    )
    metrics: Mapping[str, Callable[[], Metric]] | None = None
    mask: str | MaskFunction | None = None
    missing: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "." in self.name:
            # The heads are kept in an nn.ModuleDict under the task names.
            raise ConfigError(f"a task name must be a non-empty str without '.', got {self.name!r}")
        if self.name == "loss":
            # Its results would read as the total loss's ("loss", "loss/auc").
            raise ConfigError("a task cannot be named 'loss', the name of the total loss")
        if self.metrics is not None:
            if not isinstance(self.metrics, Mapping):
                raise ConfigError(
                    f"task {self.name!r}: metrics must map metric names to zero-argument "
                    f"functions making a metric, got {type(self.metrics).__name__}"
                )
            # Refused now, not at the first evaluation (which may come after all the steps).
            check_factories(dict(self.metrics), f"task {self.name!r} metrics")
        if self.mask is not None and not isinstance(self.mask, str) and not callable(self.mask):
            raise ConfigError(
                f"task {self.name!r}: mask must be a batch column name or a function "
                f"mask(batch) -> (B,) bool tensor, got {type(self.mask).__name__}"
            )
        if (
            isinstance(self.weight, bool)
            or not isinstance(self.weight, numbers.Real)
            or not math.isfinite(self.weight)
        ):
            raise ConfigError(
                f"task {self.name!r}: weight must be a finite number, got "
                f"{type(self.weight).__name__} {self.weight!r}"
            )
        self.weight = float(self.weight)
        if self.missing is not None and (
            isinstance(self.missing, bool) or not isinstance(self.missing, (int, float))
        ):
            raise ConfigError(
                f"task {self.name!r}: missing must be a number (e.g. -1 or float('nan')) or "
                f"None, got {type(self.missing).__name__} {self.missing!r}"
            )

    @property
    def masked(self) -> bool:
        """Whether some rows may be left out of this task (``mask`` or ``missing`` is set)."""
        return self.mask is not None or self.missing is not None


_BCE = nn.functional.binary_cross_entropy_with_logits


def _labels(task: Task, target: Any, rows: int) -> torch.Tensor:
    """``target`` as ``(rows,)``, checked to have one label per row (raises :class:`LabelError`)."""
    where = f"task {task.name!r}: label column {task.label!r}"
    if not isinstance(target, torch.Tensor):
        raise LabelError(f"{where} must be a tensor, got {type(target).__name__}")
    if target.numel() != rows:
        raise LabelError(
            f"{where} has shape {tuple(target.shape)}, expected one label per row ({rows} rows)"
        )
    return target.reshape(rows)


def _check_range(task: Task, target: torch.Tensor, kept: torch.Tensor | None) -> None:
    """With the default loss (binary cross-entropy) every kept label must lie in ``[0, 1]``
    (soft labels included), since the loss is silently wrong outside.

    NaN labels are left to the trainer's non-finite loss check, which names the step.
    """
    if task.loss is not _BCE or not target.numel():
        return
    bad = (target < 0) | (target > 1)
    if kept is not None:
        bad &= kept
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        unknown = (
            "; rows with unknown labels can be left out with Task(mask=...) or Task(missing=...)"
            if not task.masked
            else ""
        )
        raise LabelError(
            f"task {task.name!r}: label column {task.label!r} holds {float(target[row]):g} at "
            f"row {row}; binary cross-entropy needs labels in [0, 1] (set Task.loss for other "
            f"targets){unknown}"
        )


def _mask(task: Task, batch: Mapping[str, Any], target: torch.Tensor) -> torch.Tensor | None:
    """``(rows,)`` bool on the labels' device: the rows that count for ``task`` (``None``: all).

    Raises:
        ConfigError: the mask column is not in the batch.
        LabelError: the mask is not a tensor of one bool (or 0/1 number) per row.
    """
    rows = target.shape[0]
    kept = None
    if task.mask is not None:
        if isinstance(task.mask, str):
            if task.mask not in batch:
                raise ConfigError(f"task {task.name!r}: batch has no mask column {task.mask!r}")
            where = f"task {task.name!r}: mask column {task.mask!r}"
            value = batch[task.mask]
        else:
            where = f"task {task.name!r}: mask function {_name(task.mask)}"
            value = task.mask(batch)
        kept = _as_mask(value, rows, where).to(target.device)
    if task.missing is not None:
        if math.isnan(task.missing):
            known = ~torch.isnan(target) if target.is_floating_point() else None
        else:
            known = target != task.missing
        if known is not None:
            kept = known if kept is None else kept & known
    return kept


def _name(function: Any) -> str:
    return getattr(function, "__qualname__", None) or type(function).__name__


def _as_mask(value: Any, rows: int, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise LabelError(f"{where} must be a tensor, got {type(value).__name__}")
    if value.numel() != rows or value.dim() > 2 or (value.dim() == 2 and value.shape[1] != 1):
        raise LabelError(
            f"{where} has shape {tuple(value.shape)}, expected one value per row ({rows} rows)"
        )
    value = value.reshape(rows)
    if value.dtype == torch.bool:
        return value
    if value.is_complex():  # every other non-bool dtype holds numbers, checked to be 0 or 1
        raise LabelError(f"{where} has dtype {value.dtype}, expected bool or numbers 0 and 1")
    bad = (value != 0) & (value != 1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise LabelError(
            f"{where} holds {value[row].item():g} at row {row}, expected bool or numbers 0 and 1"
        )
    return value != 0


class MultiTask(nn.Module):
    """A model with several heads over one body (e.g. click and conversion).

    ``body(batch)`` returns either one shared representation ``(B, H)`` used by every head, or
    a dict ``task name -> (B, H_t)`` (per-task towers, as in MMoE). The forward pass returns
    what the :class:`~recis_train.Trainer` reads: per-task ``losses`` and ``weights``,
    ``predictions`` (sigmoid of the logits) and ``labels``, plus ``groups`` when
    ``group_column`` is set (for GAUC).

    A task with ``mask`` or ``missing`` (see :class:`Task`) gets the mean loss over its kept
    rows, and its ``predictions`` and ``labels`` hold those rows only; ``groups`` is then a dict
    ``task name -> (K_t,)`` group ids of each task's kept rows.

    Args:
        body: the shared module.
        tasks: the tasks, in order.
        group_column: batch column of group ids (e.g. user) passed on as ``groups``.

    Example:
        ```python
        model = MultiTask(body, [Task("click", nn.Linear(64, 1), label="label"),
                                 Task("conversion", nn.Linear(64, 1), label="conversion",
                                      weight=0.5, mask="label")])  # conversions of clicks
        ```
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
        kept: dict[str, torch.Tensor | None] = {}
        if isinstance(shared, Mapping):
            absent = [t.name for t in self.tasks if t.name not in shared]
            if absent:
                raise ModelOutputError(
                    f"MultiTask body returned representations for {list(shared)} but not for "
                    f"task(s) {absent}; a body returning a dict gives one (B, H) tensor per task"
                )
        for task in self.tasks:
            rep = shared[task.name] if isinstance(shared, Mapping) else shared
            logits = self.heads[task.name](rep)
            # flatten, not reshape(B, -1): a batch of no rows has no size to infer.
            logits = logits.flatten(1) if logits.dim() > 1 else logits[:, None]
            if logits.shape[1] != 1:
                raise ModelOutputError(
                    f"task {task.name!r}: head must give one logit per row, got shape {tuple(logits.shape)}"
                )
            logits = logits[:, 0]
            if task.label not in batch:
                raise ConfigError(f"task {task.name!r}: batch has no label column {task.label!r}")
            target = _labels(task, batch[task.label], logits.shape[0])
            mask = _mask(task, batch, target)
            _check_range(task, target, mask)
            if mask is not None:
                logits, target = logits[mask.to(logits.device)], target[mask]
            if target.numel() or mask is None:
                losses[task.name] = task.loss(logits.float(), target.to(torch.float32))
            else:
                # No row of the task in this batch: a zero loss that still reaches every
                # parameter of the head (an empty sum), so DDP's reducer and accumulated steps
                # see the same graph as in any other batch, and no NaN of a mean over 0 rows.
                losses[task.name] = logits.float().sum()
            predictions[task.name] = torch.sigmoid(logits.detach().float())
            labels[task.name] = target
            kept[task.name] = mask
        out: dict[str, Any] = {
            "losses": losses,
            "weights": {t.name: t.weight for t in self.tasks},
            "predictions": predictions,
            "labels": labels,
        }
        if self.group_column is not None:
            out["groups"] = self._groups(batch, self.group_column, kept)
        return out

    def _groups(
        self, batch: Mapping[str, Any], column: str, kept: Mapping[str, torch.Tensor | None]
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """The group ids of the predictions: one tensor for all tasks, or per task when a task
        leaves rows out."""
        if column not in batch:
            raise ConfigError(
                f"MultiTask group_column {column!r}: batch has no such column "
                f"(its group ids go with the predictions of tasks "
                f"{[t.name for t in self.tasks]}); give the batch that column, or "
                "group_column=None"
            )
        groups = batch[column]
        if all(mask is None for mask in kept.values()):
            return groups
        rows = next(mask for mask in kept.values() if mask is not None).shape[0]
        if not isinstance(groups, torch.Tensor) or groups.numel() != rows:
            shape = (
                tuple(groups.shape) if isinstance(groups, torch.Tensor) else type(groups).__name__
            )
            raise ConfigError(
                f"MultiTask group_column {column!r} has shape {shape}, expected one group id "
                f"per row ({rows} rows)"
            )
        groups = groups.reshape(rows)
        return {
            name: groups if mask is None else groups[mask.to(groups.device)]
            for name, mask in kept.items()
        }
