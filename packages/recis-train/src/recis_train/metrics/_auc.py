"""Area under the ROC curve: exact (rank statistic), thresholded (TF-compatible) and grouped."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch

from recis_train.exceptions import MetricInputError
from recis_train.metrics._base import Metric, _first, as_flat, check_pair

_TF_KEPSILON = 1e-7  # how far TF puts its first and last threshold outside [0, 1]
_TF_EPSILON = 1e-6  # TF's guard against 0/0 in the recall and false-positive rate


def grouped_auc(
    groups: torch.Tensor, preds: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact AUC of every group, ties in ``preds`` counted as half a correct pair.

    Args:
        groups: (N,) int64 group ids, in any order.
        preds: (N,) float64 scores.
        labels: (N,) float64, 0 or 1.

    Returns:
        ``(auc, size)``: (G,) float64 AUC per distinct group (NaN for a group with one class)
        and (G,) float64 group sizes, groups in ascending id order.
    """
    order = torch.argsort(preds, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    g, p, y = groups[order], preds[order], labels[order]
    n = g.numel()
    _, group_idx, group_size = torch.unique_consecutive(g, return_inverse=True, return_counts=True)
    num_groups = group_size.numel()
    group_start = torch.cumsum(group_size, 0) - group_size
    rank = torch.arange(1, n + 1, dtype=torch.float64) - group_start[group_idx].to(torch.float64)
    # Tied scores inside one group share the mean of their ranks (the Mann-Whitney convention).
    new_tie = torch.ones(n, dtype=torch.bool)
    if n > 1:
        new_tie[1:] = (g[1:] != g[:-1]) | (p[1:] != p[:-1])
    tie_idx = torch.cumsum(new_tie, 0) - 1
    num_ties = int(tie_idx[-1]) + 1 if n else 0
    tie_sum = torch.zeros(num_ties, dtype=torch.float64).index_add_(0, tie_idx, rank)
    tie_count = torch.bincount(tie_idx, minlength=num_ties).to(torch.float64)
    avg_rank = (tie_sum / tie_count)[tie_idx]
    pos_rank_sum = torch.zeros(num_groups, dtype=torch.float64).index_add_(
        0, group_idx, avg_rank * y
    )
    n_pos = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_idx, y)
    size = group_size.to(torch.float64)
    n_neg = size - n_pos
    with torch.no_grad():
        auc = (pos_rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = float("nan")
    return auc, size


def _refuse_labels(metric: Metric, labels: torch.Tensor) -> None:
    metric._refuse("labels", labels, (labels != 0) & (labels != 1), "0 or 1")


def tf_thresholds(num_thresholds: int) -> torch.Tensor:
    """TF's thresholds: ``-eps``, ``1/(n-1) … (n-2)/(n-1)``, ``1+eps`` as (num_thresholds,)."""
    inner = torch.arange(1, num_thresholds - 1, dtype=torch.float64) / (num_thresholds - 1)
    ends = torch.tensor([-_TF_KEPSILON, 1.0 + _TF_KEPSILON], dtype=torch.float64)
    return torch.cat([ends[:1], inner, ends[1:]])


class AUROC(Metric):
    """Streaming area under the ROC curve of binary labels.

    ``mode="exact"`` keeps every prediction and computes the Mann-Whitney rank statistic with
    ties averaged: the probability that a random positive scores above a random negative, ties
    counting one half. ``mode="thresholded"`` keeps only confusion counts at ``num_thresholds``
    fixed thresholds (constant memory) and matches TensorFlow's ``tf.compat.v1.metrics.auc``:
    thresholds ``-1e-7, 1/(n-1), …, (n-2)/(n-1), 1+1e-7``, a prediction is positive iff it is
    strictly above the threshold (both compared in float32, as TF does), and the curve is
    integrated with the trapezoid rule. ``tf.keras.metrics.AUC`` puts scores into threshold
    buckets with ``ceil(p * (n - 1)) - 1`` instead, which counts some scores that sit exactly on
    a threshold differently, and divides without TF v1's ``1e-6`` guards: it agrees closely but
    not exactly.
    Predictions are probabilities in [0, 1] for the thresholded mode (others raise
    :class:`~recis_train.exceptions.MetricInputError`); any real scores for exact. With no data,
    or with labels of one class only (the AUC is undefined), both modes return NaN; there
    ``tf.compat.v1.metrics.auc`` returns 0.0 (only positives) or about 1.0 (only negatives).

    Args:
        mode: ``"exact"`` or ``"thresholded"``.
        num_thresholds: thresholds of the thresholded mode (TF's default is 200).

    Example:
        >>> auc = AUROC()
        >>> auc.update(torch.tensor([0.1, 0.8, 0.4]), torch.tensor([0, 1, 1]))
        >>> auc.compute()
        1.0
    """

    def __init__(self, mode: str = "exact", *, num_thresholds: int = 200) -> None:
        if mode not in ("exact", "thresholded"):
            raise MetricInputError(f"AUROC: mode must be 'exact' or 'thresholded', got {mode!r}")
        if isinstance(num_thresholds, bool) or not isinstance(num_thresholds, int):
            raise MetricInputError(
                f"AUROC: num_thresholds must be an integer, got {num_thresholds!r}"
            )
        if num_thresholds < 3:
            raise MetricInputError(
                f"AUROC: num_thresholds must be at least 3, got {num_thresholds}"
            )
        self.mode = mode
        self.num_thresholds = num_thresholds
        self._thresholds = tf_thresholds(num_thresholds)
        self._thresholds32 = self._thresholds.to(torch.float32)
        self._reductions = (
            {"preds": "cat", "labels": "cat"} if mode == "exact" else {"pos": "sum", "neg": "sum"}
        )
        super().__init__()

    def _initial_state(self) -> dict[str, torch.Tensor]:
        if self.mode == "exact":
            empty = torch.zeros(0, dtype=torch.float64)
            return {"preds": empty, "labels": empty.clone()}
        # pos[k]: positives with exactly k thresholds strictly below their prediction.
        zeros = torch.zeros(self.num_thresholds + 1, dtype=torch.float64)
        return {"pos": zeros, "neg": zeros.clone()}

    def update(self, preds: Any, labels: Any) -> None:
        """Add one batch.

        Args:
            preds: (B,) or any shape with B elements: scores (probabilities for thresholded).
            labels: same number of elements, 0 or 1.
        """
        exact = self.mode == "exact"  # kept until compute: copies, never the caller's buffers
        p = as_flat(preds, "preds", "AUROC", torch.float64, keep=exact)
        y = as_flat(labels, "labels", "AUROC", torch.float64, keep=exact)
        check_pair(p, y, "AUROC", binary=True)
        if exact:
            self._append("preds", p)
            self._append("labels", y)
            return
        outside = (p < 0) | (p > 1)
        if bool(outside.any()):
            raise MetricInputError(
                f"AUROC: the thresholded mode needs predictions in [0, 1], found "
                f"{_first(p, outside)}; pass probabilities (e.g. sigmoid of logits) or use "
                "mode='exact', which takes any real scores"
            )
        # TF compares float32 predictions with float32 thresholds; in float64 a prediction
        # equal to a threshold in float32 (e.g. 0.37 against the 0.37 of 101 thresholds) could
        # land on the other side of it.
        below = torch.searchsorted(self._thresholds32, p.to(torch.float32), side="left")
        size = self.num_thresholds + 1
        self._state["pos"] += torch.bincount(below, weights=y, minlength=size)
        self._state["neg"] += torch.bincount(below, weights=1.0 - y, minlength=size)

    def _compute(self, state: Mapping[str, torch.Tensor]) -> float:
        if self.mode == "exact":
            y = state["labels"]
            auc, _ = grouped_auc(torch.zeros_like(y, dtype=torch.int64), state["preds"], y)
            return float(auc[0]) if auc.numel() else float("nan")
        if not float(state["pos"].sum()) or not float(state["neg"].sum()):
            # One class only: TF's formula gives 0.0 (all positive) or about 1.0 (all negative),
            # numbers that would pass for a real AUC; undefined is reported as NaN instead.
            return float("nan")
        # tp[i]: positives above threshold i = positives with more than i thresholds below them.
        tp = state["pos"].flip(0).cumsum(0).flip(0)[1:]
        fp = state["neg"].flip(0).cumsum(0).flip(0)[1:]
        fn = state["pos"].sum() - tp
        tn = state["neg"].sum() - fp
        tpr = (tp + _TF_EPSILON) / (tp + fn + _TF_EPSILON)
        fpr = fp / (fp + tn + _TF_EPSILON)
        return float(((fpr[:-1] - fpr[1:]) * (tpr[:-1] + tpr[1:]) / 2).sum())

    def _check_loaded(self, state: Mapping[str, torch.Tensor]) -> None:
        if self.mode == "exact":
            _refuse_labels(self, state["labels"])
        else:
            self._refuse_counts(state, "pos", "neg")

    def __repr__(self) -> str:
        return f"AUROC(mode={self.mode!r}, num_thresholds={self.num_thresholds})"


class GAUC(Metric):
    """Streaming group AUC: the size-weighted mean of per-group exact AUCs.

    Groups (typically users) whose rows hold a single class are skipped. Every row is kept until
    :meth:`compute`, so a group spread over many batches (or ranks) counts as one group, with no
    row dropped at a batch boundary.

    Example:
        >>> gauc = GAUC()
        >>> gauc.update(torch.tensor([0.9, 0.2]), torch.tensor([1, 0]), groups=torch.tensor([7, 7]))
        >>> gauc.update(torch.tensor([0.3]), torch.tensor([1]), groups=torch.tensor([7]))
        >>> gauc.compute()
        1.0
    """

    _reductions = MappingProxyType({"preds": "cat", "labels": "cat", "groups": "cat"})

    def _initial_state(self) -> dict[str, torch.Tensor]:
        empty = torch.zeros(0, dtype=torch.float64)
        return {
            "preds": empty,
            "labels": empty.clone(),
            "groups": torch.zeros(0, dtype=torch.int64),
        }

    def update(self, preds: Any, labels: Any, *, groups: Any) -> None:
        """Add one batch.

        Args:
            preds: (B,) scores.
            labels: (B,) 0 or 1.
            groups: (B,) integer group ids (e.g. user ids).
        """
        # Kept until compute: copies, never the caller's buffers.
        p = as_flat(preds, "preds", "GAUC", torch.float64, keep=True)
        y = as_flat(labels, "labels", "GAUC", torch.float64, keep=True)
        check_pair(p, y, "GAUC", binary=True)
        try:
            raw = groups if isinstance(groups, torch.Tensor) else torch.as_tensor(groups)
        except (TypeError, ValueError, RuntimeError) as exc:
            unsigned = _unsigned_ids(groups)
            if unsigned is None:
                raise MetricInputError(
                    f"GAUC: groups must be integer ids (a tensor, array or list of ints in "
                    f"[-2**63, 2**64)), got {type(groups).__name__}: {exc}; map string user ids "
                    "to integers first"
                ) from exc
            raw = unsigned
        if raw.numel() == 0 and not isinstance(groups, torch.Tensor):
            raw = raw.to(torch.int64)  # an empty list or array reads as float
        if raw.is_floating_point() or raw.is_complex():
            raise MetricInputError(f"GAUC: groups must be integer ids, got dtype {raw.dtype}")
        g = as_flat(raw, "groups", "GAUC", torch.int64, keep=True)
        if g.numel() != p.numel():
            raise MetricInputError(
                f"GAUC: groups has {g.numel()} elements but preds has {p.numel()}"
            )
        for name, value in (("preds", p), ("labels", y), ("groups", g)):
            self._append(name, value)

    def _check_loaded(self, state: Mapping[str, torch.Tensor]) -> None:
        _refuse_labels(self, state["labels"])

    def _compute(self, state: Mapping[str, torch.Tensor]) -> float:
        auc, size = grouped_auc(state["groups"], state["preds"], state["labels"])
        valid = ~torch.isnan(auc)
        if not bool(valid.any()):
            return float("nan")
        return float((auc[valid] * size[valid]).sum() / size[valid].sum())


def _unsigned_ids(groups: Any) -> torch.Tensor | None:
    """A list of Python ints some of which pass int64 (unsigned 64-bit hashed ids) as int64
    tensors of the same bit patterns, one id to one value; ``None`` if ``groups`` is not that."""
    if not isinstance(groups, (list, tuple)):
        return None
    if any(isinstance(g, bool) for g in groups):
        return None
    try:
        values = [operator.index(g) for g in groups]  # ints and NumPy integers, not floats
    except TypeError:
        return None
    if not all(-(1 << 63) <= g < 1 << 64 for g in values):
        return None
    return torch.tensor([g - (1 << 64) if g >= 1 << 63 else g for g in values], dtype=torch.int64)
