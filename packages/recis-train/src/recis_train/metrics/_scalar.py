"""Metrics that reduce to running sums: log loss and calibration."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch

from recis_train.exceptions import MetricInputError
from recis_train.metrics._base import Metric, _first, as_flat, check_pair


class LogLoss(Metric):
    """Streaming mean binary cross-entropy.

    ``-mean(y log p + (1 - y) log(1 - p))`` with ``p`` clipped to ``[eps, 1 - eps]`` so a
    confident mistake costs a large finite amount instead of infinity. Labels may be soft
    (any value in [0, 1]).

    Args:
        eps: clipping applied to probabilities.
        from_logits: treat ``preds`` as logits (computed stably, without clipping).
    """

    _reductions = MappingProxyType({"loss_sum": "sum", "count": "sum"})

    def __init__(self, *, eps: float = 1e-7, from_logits: bool = False) -> None:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < float(eps) < 0.5:
            raise MetricInputError(f"LogLoss: eps must be a number in (0, 0.5), got {eps!r}")
        if 1.0 - float(eps) == 1.0:
            # p clipped to 1 - eps would still be 1: a confident mistake would cost infinity.
            raise MetricInputError(
                f"LogLoss: eps {eps!r} is too small: 1 - eps rounds to 1 in float64; use at "
                "least 2**-53 (about 1.1e-16)"
            )
        if not isinstance(from_logits, bool):
            raise MetricInputError(
                f"LogLoss: from_logits must be True or False, got {from_logits!r}"
            )
        self.eps = float(eps)
        self.from_logits = from_logits
        super().__init__()

    def _initial_state(self) -> dict[str, torch.Tensor]:
        zero = torch.zeros((), dtype=torch.float64)
        return {"loss_sum": zero, "count": zero.clone()}

    def update(self, preds: Any, labels: Any) -> None:
        """Add one batch: ``preds`` (B,) probabilities (or logits), ``labels`` (B,) in [0, 1]."""
        p = as_flat(preds, "preds", "LogLoss", torch.float64)
        y = as_flat(labels, "labels", "LogLoss", torch.float64)
        check_pair(p, y, "LogLoss", binary=False)
        if self.from_logits:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(p, y, reduction="sum")
        else:
            outside = (p < 0) | (p > 1)
            if bool(outside.any()):
                raise MetricInputError(
                    f"LogLoss: preds must be probabilities in [0, 1], found "
                    f"{_first(p, outside)}; for logits pass LogLoss(from_logits=True), or apply "
                    "a sigmoid"
                )
            p = p.clamp(self.eps, 1.0 - self.eps)
            loss = -(y * torch.log(p) + (1.0 - y) * torch.log1p(-p)).sum()
        self._state["loss_sum"] += loss
        self._state["count"] += p.numel()

    def _check_loaded(self, state: Mapping[str, torch.Tensor]) -> None:
        self._refuse_counts(state, "count")
        loss = state["loss_sum"]
        self._refuse("loss_sum", loss, loss < 0, "a sum of losses (>= 0)")
        self._refuse("loss_sum", loss, (loss != 0) & (state["count"] == 0), "0 with a count of 0")

    def _compute(self, state: Mapping[str, torch.Tensor]) -> float:
        count = float(state["count"])
        return float(state["loss_sum"]) / count if count else float("nan")


class Calibration(Metric):
    """Streaming calibration: mean prediction divided by mean label.

    1.0 means the model predicts as many clicks as happen; above 1.0 it over-predicts. NaN when
    no positive label has been seen. :meth:`means` gives both means.
    """

    _reductions = MappingProxyType({"pred_sum": "sum", "label_sum": "sum", "count": "sum"})

    def _initial_state(self) -> dict[str, torch.Tensor]:
        zero = torch.zeros((), dtype=torch.float64)
        return {"pred_sum": zero, "label_sum": zero.clone(), "count": zero.clone()}

    def update(self, preds: Any, labels: Any) -> None:
        """Add one batch: ``preds`` (B,) probabilities, ``labels`` (B,) in [0, 1]."""
        p = as_flat(preds, "preds", "Calibration", torch.float64)
        y = as_flat(labels, "labels", "Calibration", torch.float64)
        check_pair(p, y, "Calibration", binary=False)
        outside = (p < 0) | (p > 1)
        if bool(outside.any()):
            raise MetricInputError(
                f"Calibration: preds must be probabilities in [0, 1], found {_first(p, outside)} "
                "(apply a sigmoid to logits)"
            )
        self._state["pred_sum"] += p.sum()
        self._state["label_sum"] += y.sum()
        self._state["count"] += p.numel()

    def means(self) -> tuple[float, float]:
        """``(mean prediction, mean label)`` over everything seen (synced across ranks)."""
        state = self._synced_state()
        count = float(state["count"])
        if not count:
            return float("nan"), float("nan")
        return float(state["pred_sum"]) / count, float(state["label_sum"]) / count

    def _check_loaded(self, state: Mapping[str, torch.Tensor]) -> None:
        self._refuse_counts(state, "count")
        for name in ("pred_sum", "label_sum"):
            # Sums of values in [0, 1]: between 0 and the number of rows summed.
            t = state[name]
            self._refuse(name, t, (t < 0) | (t > state["count"]), "a sum in [0, count]")

    def _compute(self, state: Mapping[str, torch.Tensor]) -> float:
        label_sum = float(state["label_sum"])
        return float(state["pred_sum"]) / label_sum if label_sum else float("nan")
