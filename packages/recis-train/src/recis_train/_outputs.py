"""Reading what a model returns: one loss, or per-task losses with weights and predictions."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from recis_train.exceptions import ModelOutputError


@dataclasses.dataclass
class StepOutput:
    """A model output in one shape.

    Attributes:
        loss: the scalar the trainer differentiates (weighted sum of task losses).
        losses: task name -> its unweighted scalar loss (``{"loss": loss}`` for one loss).
        predictions: task name -> (B,) probabilities, for metrics (may be empty).
        labels: task name -> (B,) labels matching ``predictions``.
        groups: (B,) group ids for grouped metrics such as GAUC, shared by every task; or
            task name -> that task's group ids, matching its ``predictions`` (a task whose
            predictions hold only some rows of the batch); or ``None``.
        weights: task name -> its weight in ``loss`` (1.0 for a task not named).
    """

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    predictions: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    groups: torch.Tensor | dict[str, torch.Tensor] | None
    weights: dict[str, float] = dataclasses.field(default_factory=dict)

    def task_groups(self, task: str) -> torch.Tensor | None:
        """The group ids matching ``predictions[task]`` (``None`` when there are none)."""
        if isinstance(self.groups, dict):
            return self.groups.get(task)
        return self.groups


def _per_task(value: Any, key: str) -> dict[str, torch.Tensor]:
    if value is None:
        return {}
    if isinstance(value, torch.Tensor):
        return {"": value}
    if isinstance(value, Mapping):
        for task, tensor in value.items():
            if not isinstance(tensor, torch.Tensor):
                raise ModelOutputError(
                    f"model output {key}[{task!r}] must be a tensor, got {type(tensor).__name__}"
                )
        return dict(value)
    raise ModelOutputError(
        f"model output {key!r} must be a tensor or a dict of tensors, got {type(value).__name__}"
    )


def parse_output(output: Any) -> StepOutput:
    """Normalize a model's return value.

    Accepted forms: a scalar loss tensor; or a mapping with ``"loss"`` (a scalar) or
    ``"losses"`` (task -> scalar) and optionally ``"weights"`` (task -> float, default 1),
    ``"predictions"`` and ``"labels"`` (a (B,) tensor or task -> (B,) tensor), and
    ``"groups"`` ((B,) ids, or task -> ids of the rows in that task's predictions).
    """
    if isinstance(output, torch.Tensor):
        return StepOutput(_scalar(output, "loss"), {"loss": output}, {}, {}, None)
    if not isinstance(output, Mapping):
        raise ModelOutputError(
            f"model must return a loss tensor or a dict with 'loss' or 'losses', got {type(output).__name__}"
        )
    if "losses" in output:
        losses = output["losses"]
        if not isinstance(losses, Mapping) or not losses:
            raise ModelOutputError("model output 'losses' must be a non-empty dict of task -> loss")
        weights = output.get("weights")
        if weights is None:
            weights = {}
        elif not isinstance(weights, Mapping):
            raise ModelOutputError(
                f"model output 'weights' must be a dict of task -> weight (a number), got "
                f"{type(weights).__name__} {weights!r}"
            )
        unknown = sorted(set(weights) - set(losses))
        if unknown:
            raise ModelOutputError(f"model output 'weights' names unknown task(s) {unknown}")
        losses = {name: _scalar(value, f"losses[{name!r}]") for name, value in losses.items()}
        weights = {name: _weight(weights.get(name, 1.0), name) for name in losses}
        total = sum(weights[name] * value for name, value in losses.items())
        loss = total if isinstance(total, torch.Tensor) else torch.tensor(total)
        if "loss" in output:
            raise ModelOutputError(
                "model output has both 'loss' and 'losses'; the trainer would differentiate the "
                "weighted sum of 'losses' and ignore 'loss': return one of them (put an extra "
                "term such as a regularizer into 'losses' as a task of its own)"
            )
    elif "loss" in output:
        loss = _scalar(output["loss"], "loss")
        losses = {"loss": loss}
        weights = {}
    else:
        raise ModelOutputError(
            f"model output dict needs 'loss' or 'losses', got keys {sorted(output)}"
        )
    predictions = _per_task(output.get("predictions"), "predictions")
    labels = _per_task(output.get("labels"), "labels")
    missing = sorted(set(predictions) - set(labels))
    if missing:
        raise ModelOutputError(f"model output has predictions without labels for task(s) {missing}")
    groups = output.get("groups")
    if isinstance(groups, Mapping):
        groups = _per_task(groups, "groups")
    return StepOutput(loss, losses, predictions, labels, groups, weights)


def _weight(value: Any, task: str) -> float:
    """A task's weight as a float: a finite real number (a 0-d tensor counts as its value)."""
    if isinstance(value, torch.Tensor) and value.requires_grad:
        # Taken as its value, it would train nothing (uncertainty weighting, say).
        raise ModelOutputError(
            f"model output weights[{task!r}] requires grad, but weights are taken as numbers "
            "and get no gradient; put a learnable weighting into the task's loss instead"
        )
    number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    if (
        isinstance(number, bool)
        or not isinstance(number, numbers.Real)
        or not math.isfinite(number)
    ):
        raise ModelOutputError(
            f"model output weights[{task!r}] must be a finite number, got "
            f"{type(value).__name__} {value!r}"
        )
    return float(number)


def _scalar(value: Any, key: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ModelOutputError(f"model output {key!r} must be a scalar tensor, got {shape}")
    return value.reshape(())
