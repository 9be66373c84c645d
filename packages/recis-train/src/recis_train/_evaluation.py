"""Evaluation of :class:`~recis_train.Trainer`: losses and metrics over evaluation batches."""

from __future__ import annotations

import contextlib
import itertools
import logging
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from recis_train._arguments import TrainingArguments
from recis_train._checkpoint import type_name
from recis_train._data import batch_rows, move_to
from recis_train._distributed import DistributedContext
from recis_train._outputs import StepOutput, parse_output
from recis_train._step import _task_rows
from recis_train.exceptions import ConfigError, MetricInputError
from recis_train.metrics import AUROC, GAUC, Calibration, LogLoss, Metric

_log = logging.getLogger("recis_train")

MetricFactory = Callable[[], Metric]
DEFAULT_METRICS: Mapping[str, MetricFactory] = {
    "auc": AUROC,
    "logloss": LogLoss,
    "calibration": Calibration,
}


class EvaluationMixin:
    """Runs the model over evaluation batches and computes the losses and metrics.

    A part of :class:`~recis_train.Trainer`, which sets the attributes declared here.
    """

    args: TrainingArguments
    model: nn.Module
    device: torch.device
    distributed: DistributedContext | None
    eval_data: Iterable[Any] | Callable[[], Iterable[Any]] | None
    metric_factories: dict[str, MetricFactory]
    global_step: int
    history: dict[str, list[tuple[int, dict[str, float]]]]
    _evaluated_iterator: bool

    if TYPE_CHECKING:

        @property
        def world_size(self) -> int: ...

        def _autocast(self) -> contextlib.AbstractContextManager[Any]: ...

        def _recorded_index_error(self) -> Exception | None: ...

    def _task_metrics(self, task: str) -> dict[str, Metric]:
        per_task = getattr(self.model, "task_metrics", None)
        factories = self.metric_factories
        if callable(per_task):
            factories = check_factories(
                dict(per_task().get(task, factories)), f"task_metrics() of task {task!r}"
            )
        return {name: make() for name, make in factories.items()}

    def _evaluate(self, eval_data: Iterable[Any] | None) -> dict[str, float]:
        """The evaluation of :meth:`Trainer.evaluate <recis_train.Trainer.evaluate>`, up to
        calling the hooks: the results, which it adds to ``history``."""
        source = eval_data if eval_data is not None else self.eval_data
        if source is None:
            raise ConfigError("evaluate needs eval_data (given to the trainer or to evaluate)")
        if source is self.eval_data and isinstance(source, Iterator):
            if self._evaluated_iterator:
                raise ConfigError(
                    f"eval_data is a one-shot iterator ({type(source).__name__}) that an earlier "
                    "evaluation consumed; give the trainer a list, another iterable that can be "
                    "iterated again, or a function returning a fresh iterable"
                )
            self._evaluated_iterator = True
        metrics: dict[str, dict[str, Metric]] = {}
        sums: dict[str, float] = {}
        task_rows: dict[str, float] = {}  # rows each task's loss is the mean over
        weighted: dict[str, float] = {}  # per task: sum of weight * loss * kept rows
        rows = 0
        loss_rows = 0.0  # rows the "loss" of a single-loss model is the mean over
        was_training = self.model.training
        self.model.eval()
        try:
            # The evaluation draws from forked random states: a DataLoader's seed or a random
            # layer taken here never shifts the training run's random numbers.
            with torch.no_grad(), _forked_rng(self.device):
                data = source() if callable(source) and not hasattr(source, "__iter__") else source
                for index, (batch, counts) in enumerate(self._eval_batches(data)):
                    with self._autocast():
                        out = parse_output(self.model(batch))
                    if not counts:
                        continue
                    n = batch_rows(batch)
                    rows += n
                    # The rows each loss is the mean over, as in training: a task's kept rows,
                    # a single loss's labels (a model that leaves unlabelled rows out weighs
                    # its batches by the rows it kept).
                    kept_rows = _task_rows(out, batch)
                    counted = kept_rows.get("loss", n)
                    loss_rows += counted
                    # A batch without rows weighs nothing: its mean loss is NaN (0 / 0), and
                    # NaN * 0 would poison the sum. The keys stay, the same on every rank.
                    sums["loss"] = sums.get("loss", 0.0) + _weighed(out.loss, counted)
                    if len(out.losses) > 1 or "loss" not in out.losses:
                        for task, value in out.losses.items():
                            # A task's loss is its mean over the rows it kept (all of them,
                            # unless it leaves rows with unknown labels out): weigh it by those.
                            kept = kept_rows.get(task, n)
                            key, part = f"loss/{task}", _weighed(value, kept)
                            sums[key] = sums.get(key, 0.0) + part
                            task_rows[key] = task_rows.get(key, 0) + kept
                            weight = out.weights.get(task, 1.0)
                            weighted[key] = weighted.get(key, 0.0) + weight * part
                    self._update_metrics(metrics, out, index)
        finally:
            self.model.train(was_training)
        # An out-of-range index a kernel met during the evaluation (its output held zeros
        # there) fails the evaluation on every rank instead of reaching the results.
        index_error = self._recorded_index_error()
        try:
            if self.distributed is not None and self.device.type == "cuda":
                if self.distributed.reduce([float(index_error is not None)], "max")[0]:
                    self.distributed.fail_together(index_error, "evaluation")
            elif index_error is not None:
                raise index_error
        finally:
            del index_error  # see DistributedContext.fail_together
        if self.distributed is not None:
            keys, tasks = sorted(sums), sorted(task_rows)
            total = self.distributed.reduce(
                [rows, loss_rows]
                + [sums[k] for k in keys]
                + [task_rows[k] for k in tasks]
                + [weighted[k] for k in tasks]
            )
            rows, loss_rows = int(total[0]), total[1]
            sums = dict(zip(keys, total[2 : 2 + len(keys)], strict=True))
            end = 2 + len(keys) + len(tasks)
            task_rows = dict(zip(tasks, total[2 + len(keys) : end], strict=True))
            weighted = dict(zip(tasks, total[end:], strict=True))
        results = (
            {k: _mean(v, task_rows.get(k, loss_rows)) for k, v in sums.items()} if rows else {}
        )
        if not rows:
            # Empty results would otherwise pass for an evaluation (a hook or a report finds
            # no key), e.g. when the evaluation files hold no rows.
            _log.warning(
                "evaluation at step %d read no rows from %s: no loss or metrics",
                self.global_step,
                type(source).__name__,
            )
        if rows and task_rows:
            # The weighted total of the task losses over the whole evaluation, as in training:
            # each task's mean over the rows it kept (a mean of per-batch totals would weigh a
            # masked task's batches by rows it left out, and change with the batch size). A
            # task that kept no row adds nothing, as a batch without kept rows in training.
            results["loss"] = float(
                sum(weighted[k] / task_rows[k] for k in sorted(task_rows) if task_rows[k])
            )
        for task, named in metrics.items():
            for name, metric in named.items():
                key = f"{task}/{name}" if task else name
                results[key] = metric_value(metric.compute(), key)
        self.history["eval"].append((self.global_step, results))
        return results

    def _eval_batches(self, data: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
        """Evaluation batches on the device, each with whether its output counts.

        Distributed, the ranks run forward passes in lockstep (sharded lookups are collective)
        until every rank is out of data; a rank that is out already repeats its last batch, whose
        output is not counted (in ``eval()`` mode a lookup changes no table).
        """
        limit = self.args.eval_steps
        batches = itertools.islice(data, limit) if limit is not None else iter(data)
        if self.distributed is None:
            for batch in batches:
                yield move_to(batch, self.device), True
            return
        last = None
        taken = 0
        while True:
            error = None
            try:
                batch = next(batches, None)
            except Exception as err:
                batch, error = None, err
            have = batch is not None
            ready, started, failed = self.distributed.reduce(
                [have, have or last is not None, error is not None]
            )
            if failed:
                try:
                    self.distributed.fail_together(
                        error, f"reading evaluation batch {taken + 1} (counted from 1)"
                    )
                finally:
                    del error  # see DistributedContext.fail_together
            if not ready:
                return
            taken += 1
            if started < self.world_size:
                raise ConfigError(
                    f"{self.world_size - int(started)} of {self.world_size} ranks have no "
                    "evaluation batch while others have some; give every rank evaluation data"
                )
            if have:
                last = move_to(batch, self.device)
            yield last, have

    def _update_metrics(
        self, metrics: dict[str, dict[str, Metric]], out: StepOutput, index: int
    ) -> None:
        for task, preds in out.predictions.items():
            named = metrics.setdefault(task, self._task_metrics(task))
            labels = out.labels[task]
            for name, metric in named.items():
                try:
                    if isinstance(metric, GAUC):
                        groups = out.task_groups(task)
                        if groups is None:
                            raise ConfigError(
                                f"metric {name!r} (GAUC) needs the model to return 'groups'"
                                + (f" for task {task!r}" if isinstance(out.groups, dict) else "")
                            )
                        metric.update(preds, labels, groups=groups)
                    else:
                        metric.update(preds, labels)  # type: ignore[attr-defined]
                except MetricInputError as e:
                    # The metric names what it found; which result and batch fed it is ours.
                    key = f"{task}/{name}" if task else name
                    raise MetricInputError(
                        f"evaluation batch {index} (counting from 0), metric {key!r}: {e}"
                    ) from e


def check_factories(factories: dict[str, Any], where: str) -> dict[str, MetricFactory]:
    """``factories`` if every value makes a fresh metric, else a :class:`ConfigError`.

    A metric instance is refused: every evaluation needs its own, or one evaluation's rows
    would count in the next.
    """
    for name, make in factories.items():
        if isinstance(make, Metric) or not callable(make):
            raise ConfigError(
                f"{where}: {name!r} must be a zero-argument function making a metric (e.g. "
                f"AUROC, or lambda: AUROC('thresholded')), got {make!r}; each evaluation "
                "makes its own metrics"
            )
    return factories


def metric_value(value: Any, key: str) -> float:
    """``value``, a metric's ``compute()`` result, as a Python float.

    Results go into ``history``, which checkpoints hold and a resume loads with
    ``torch.load(weights_only=True)``: that refuses NumPy scalars (what e.g. sklearn's
    ``roc_auc_score`` returns), so every result is stored as a plain float. A NumPy scalar, a
    0-d or one-element array or tensor, an int or a bool are converted.

    Raises:
        ConfigError: ``value`` is not a real number (a string, a complex number, several
            values, ``None``), naming the metric.
    """
    if not isinstance(value, numbers.Real) and callable(getattr(value, "item", None)):
        size = value.numel() if isinstance(value, torch.Tensor) else getattr(value, "size", None)
        if size == 1:
            value = value.item()
    if isinstance(value, numbers.Real):
        return float(value)
    shape = getattr(value, "shape", None)
    raise ConfigError(
        f"metric {key!r}: compute() returned {type_name(value)}"
        + (f" of shape {tuple(shape)}" if shape is not None else f" {value!r}")
        + ", expected a real number (a float, a NumPy scalar or a one-element tensor)"
    )


def _weighed(loss: torch.Tensor, rows: int) -> float:
    """``loss * rows``: a batch's (or a task's) mean loss times the rows it is the mean over;
    0 for no rows, whatever the loss of no rows is (NaN for a mean over nothing)."""
    return float(loss.detach()) * rows if rows else 0.0


def _mean(total: float, count: float) -> float:
    """``total / count``, NaN for no rows (a task that kept no row of the evaluation)."""
    return total / count if count else float("nan")


def _forked_rng(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """torch's CPU random state, and that of ``device`` when it is a GPU, put back on exit."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.random.fork_rng(devices=[index])
    return torch.random.fork_rng(devices=[])
