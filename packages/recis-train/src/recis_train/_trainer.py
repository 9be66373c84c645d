"""The Trainer: the training loop, evaluation, checkpoints and resume."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recis_train._arguments import TrainingArguments
from recis_train._checkpoint import (
    CheckpointManager,
    load_object,
    load_tensors,
    save_object,
    save_tensors,
)
from recis_train._data import DataStream, batch_rows, move_to
from recis_train._hooks import Hook
from recis_train._outputs import StepOutput, parse_output
from recis_train._sparse import SparseCheckpoint, default_sparse_checkpoint
from recis_train._state import rng_state, seed_everything, set_rng_state
from recis_train.exceptions import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    NonFiniteLossError,
)
from recis_train.metrics import AUROC, GAUC, Calibration, LogLoss, Metric

_log = logging.getLogger("recis_train")

MetricFactory = Callable[[], Metric]
DEFAULT_METRICS: Mapping[str, MetricFactory] = {
    "auc": AUROC,
    "logloss": LogLoss,
    "calibration": Calibration,
}
_PARTS = ("dense", "sparse", "trainer")


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but torch sees no cuda device")
    return device


class Trainer:
    """Runs training and evaluation of one model and keeps it resumable.

    The loop per optimizer step: take ``gradient_accumulation_steps`` batches from
    ``train_data``, move each to the device, ``model(batch)`` (under autocast for mixed
    precision), backward of the loss, then the dense optimizer step (after unscaling and
    clipping), the sparse optimizer step, zeroing gradients and stepping the LR schedulers.

    The model returns a scalar loss, or a dict with ``"loss"`` or ``"losses"`` (task -> loss),
    and optionally ``"weights"`` (task -> float), ``"predictions"`` / ``"labels"`` ((B,) tensors
    or task -> (B,) tensors) and ``"groups"`` ((B,) ids for GAUC). Predictions are probabilities.

    Args:
        model: the ``nn.Module``; moved to ``args.device``.
        args: the run's :class:`TrainingArguments`.
        train_data: an iterable of batches; if it has ``state_dict()`` / ``load_state_dict()``
            (a recis-io ``Dataset``) its cursor is checkpointed, else resuming skips consumed
            batches of a re-iteration.
        eval_data: an iterable of evaluation batches, or a function returning a fresh one.
        dense_optimizer: a torch optimizer over the dense parameters.
        sparse_optimizer: an optimizer over embedding tables (stepped after the dense one).
        lr_schedulers: torch LR schedulers, stepped once per optimizer step.
        hooks: :class:`Hook` objects, called in order.
        metrics: metric name -> a zero-argument factory; one instance per task per
            evaluation (default: auc, logloss, calibration; a model with ``task_metrics()``
            may name its own per task).
        sparse_checkpoint: how embedding tables are saved (default: recis-embedding's
            ``save``/``load`` when the model holds its tables, else nothing extra).

    Example:
        >>> trainer = Trainer(model, TrainingArguments(output_dir="out", train_steps=100),
        ...                   train_data=loader, dense_optimizer=torch.optim.Adam(model.parameters()))
        >>> trainer.train()
    """

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments,
        *,
        train_data: Iterable[Any],
        eval_data: Iterable[Any] | Callable[[], Iterable[Any]] | None = None,
        dense_optimizer: torch.optim.Optimizer,
        sparse_optimizer: torch.optim.Optimizer | None = None,
        lr_schedulers: Sequence[Any] = (),
        hooks: Sequence[Hook] = (),
        metrics: Mapping[str, MetricFactory] | None = None,
        sparse_checkpoint: SparseCheckpoint | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(dense_optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"dense_optimizer must be a torch.optim.Optimizer, got {type(dense_optimizer).__name__}"
            )
        if args.mixed_precision == "fp16" and sparse_optimizer is not None:
            raise ConfigError(
                "mixed_precision 'fp16' needs loss scaling, which sparse optimizers do not undo; use 'bf16'"
            )
        self.args = args
        self.device = _resolve_device(args.device)
        self.model = model.to(self.device)
        self.train_data = train_data
        self.eval_data = eval_data
        self.dense_optimizer = dense_optimizer
        self.sparse_optimizer = sparse_optimizer
        self.lr_schedulers = list(lr_schedulers)
        self.hooks = list(hooks)
        self.metric_factories = dict(metrics if metrics is not None else DEFAULT_METRICS)
        self.sparse_checkpoint = (
            sparse_checkpoint if sparse_checkpoint is not None else default_sparse_checkpoint(model)
        )
        self.checkpoints = CheckpointManager(
            Path(args.output_dir) / "checkpoints", max_to_keep=args.max_to_keep
        )
        self.stream = DataStream(train_data, args.epochs)
        self.global_step = 0
        self.should_stop = False
        self.history: dict[str, list[tuple[int, dict[str, float]]]] = {"train": [], "eval": []}
        self._cursor = self.stream.state_dict()
        self._restored = False
        self._last_saved_step: int | None = None
        self._scaler = (
            torch.amp.GradScaler(self.device.type) if args.mixed_precision == "fp16" else None
        )
        if args.deterministic:
            torch.use_deterministic_algorithms(True)

    # ------------------------------------------------------------------ properties

    @property
    def total_steps(self) -> int | None:
        """Optimizer steps this run will take, when known."""
        if self.args.train_steps is not None:
            return self.args.train_steps
        try:
            batches = len(self.train_data)  # type: ignore[arg-type]
        except TypeError:
            return None
        return math.ceil(batches / self.args.gradient_accumulation_steps) * self.args.epochs

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        precision = self.args.mixed_precision
        if precision == "no":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    # ------------------------------------------------------------------ training

    def train(self) -> dict[str, float]:
        """Train until ``train_steps``, the end of the data, or a hook asks to stop.

        Resumes from the latest checkpoint in ``output_dir`` first when ``args.resume``.

        Returns:
            The last step's logs (``loss``, ``loss/<task>``, ``lr``, ``samples``, ``step``).
        """
        return self._run(evaluate_every=0)

    def train_and_evaluate(self) -> dict[str, float]:
        """Train, evaluating every ``eval_every`` steps and at the end.

        Returns:
            The final evaluation's results.
        """
        if self.eval_data is None:
            raise ConfigError("train_and_evaluate needs eval_data")
        self._run(evaluate_every=self.args.eval_every)
        if self.history["eval"] and self.history["eval"][-1][0] == self.global_step:
            return dict(self.history["eval"][-1][1])  # the loop just evaluated this step
        return self.evaluate()

    def _run(self, evaluate_every: int) -> dict[str, float]:
        if self.args.resume and not self._restored:
            self.restore(missing_ok=True)
        if not self._restored and self.global_step == 0:
            seed_everything(self.args.seed)
        self.should_stop = False
        for hook in self.hooks:
            hook.on_train_begin(self)
        logs: dict[str, float] = {}
        batches = self._batches()
        try:
            while not self.should_stop:
                if self.args.train_steps is not None and self.global_step >= self.args.train_steps:
                    break
                micro = self._take(batches)
                if not micro:
                    break
                logs = self._step(micro)
                if self.args.save_every and self.global_step % self.args.save_every == 0:
                    self.save()
                if evaluate_every and self.global_step % evaluate_every == 0:
                    self.evaluate()
        finally:
            # The prefetcher may hold a batch already taken from the data: rewind to the cursor
            # of the last batch trained on so a later call continues exactly there.
            batches.close()
            self.stream.load_state_dict(self._cursor)
        if self.args.save_at_end and self._last_saved_step != self.global_step:
            self.save()
        for hook in self.hooks:
            hook.on_train_end(self)
        return logs

    def _batches(self) -> Generator[tuple[Any, dict[str, Any]], None, None]:
        """(batch on the device, cursor after it), one batch ahead when copying to a GPU."""
        pending = None
        for batch in self.stream:
            item = (move_to(batch, self.device), self.stream.state_dict())
            if self.device.type == "cpu":
                yield item
                continue
            # The copy of this batch overlaps the compute of the previous one.
            if pending is not None:
                yield pending
            pending = item
        if pending is not None:
            yield pending

    def _take(self, batches: Iterator[tuple[Any, dict[str, Any]]]) -> list[Any]:
        micro = []
        for _ in range(self.args.gradient_accumulation_steps):
            try:
                batch, cursor = next(batches)
            except StopIteration:
                break
            micro.append((batch, cursor))
        return micro

    def _step(self, micro: list[tuple[Any, dict[str, Any]]]) -> dict[str, float]:
        started = time.perf_counter()
        self.model.train()
        totals: dict[str, float] = {}
        samples = 0
        for index, (batch, cursor) in enumerate(micro):
            with self._autocast():
                out = parse_output(self.model(batch))
            self._check_finite(out, index, len(micro), cursor)
            loss = out.loss / len(micro)
            (self._scaler.scale(loss) if self._scaler else loss).backward()
            totals["loss"] = totals.get("loss", 0.0) + float(out.loss.detach()) / len(micro)
            if len(out.losses) > 1 or "loss" not in out.losses:
                for task, value in out.losses.items():
                    key = f"loss/{task}"
                    totals[key] = totals.get(key, 0.0) + float(value.detach()) / len(micro)
            samples += batch_rows(batch)
        self._optimizer_step()
        self._cursor = micro[-1][1]
        self.global_step += 1
        logs = {
            **totals,
            "lr": float(self.dense_optimizer.param_groups[0]["lr"]),
            "samples": float(samples),
            "step": float(self.global_step),
            "step_time": time.perf_counter() - started,
        }
        self.history["train"].append((self.global_step, logs))
        for hook in self.hooks:
            hook.on_step_end(self, logs)
        return logs

    def _check_finite(
        self, out: StepOutput, index: int, count: int, cursor: Mapping[str, Any]
    ) -> None:
        if torch.isfinite(out.loss.detach()).item():
            return
        self._zero_grad()  # gradients of earlier micro-batches must not leak into a retry
        tasks = ", ".join(f"{k} {float(v.detach()):g}" for k, v in out.losses.items())
        raise NonFiniteLossError(
            f"loss is {float(out.loss.detach())} at step {self.global_step + 1} (epoch {cursor['epoch']}, "
            f"batch {cursor['consumed'] - 1} of the epoch, micro-batch {index + 1} of {count}); "
            f"task losses: {tasks}"
        )

    def _optimizer_step(self) -> None:
        dense = self.dense_optimizer
        if self._scaler is not None:
            self._scaler.unscale_(dense)
        if self.args.grad_clip is not None:
            params = [p for g in dense.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.args.grad_clip)
        if self._scaler is not None:
            self._scaler.step(dense)
            self._scaler.update()
        else:
            dense.step()
        if self.sparse_optimizer is not None:
            self.sparse_optimizer.step()
        self._zero_grad()
        for scheduler in self.lr_schedulers:
            scheduler.step()

    def _zero_grad(self) -> None:
        self.dense_optimizer.zero_grad(set_to_none=True)
        if self.sparse_optimizer is not None:
            self.sparse_optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ evaluation

    def _task_metrics(self, task: str) -> dict[str, Metric]:
        per_task = getattr(self.model, "task_metrics", None)
        factories = self.metric_factories
        if callable(per_task):
            factories = dict(per_task().get(task, factories))
        return {name: make() for name, make in factories.items()}

    def evaluate(self, eval_data: Iterable[Any] | None = None) -> dict[str, float]:
        """Evaluate on ``eval_data`` (default: the trainer's), at most ``eval_steps`` batches.

        The model runs in ``eval()`` mode without gradients (embedding tables insert no new ids).

        Returns:
            ``loss`` (row-weighted mean), ``loss/<task>``, and ``<task>/<metric>`` for every
            task the model predicts (plain ``<metric>`` for a single unnamed prediction).
        """
        source = eval_data if eval_data is not None else self.eval_data
        if source is None:
            raise ConfigError("evaluate needs eval_data (given to the trainer or to evaluate)")
        data = source() if callable(source) and not hasattr(source, "__iter__") else source
        metrics: dict[str, dict[str, Metric]] = {}
        sums: dict[str, float] = {}
        rows = 0
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for index, batch in enumerate(data):
                    if self.args.eval_steps is not None and index >= self.args.eval_steps:
                        break
                    batch = move_to(batch, self.device)
                    with self._autocast():
                        out = parse_output(self.model(batch))
                    n = batch_rows(batch)
                    rows += n
                    sums["loss"] = sums.get("loss", 0.0) + float(out.loss.detach()) * n
                    if len(out.losses) > 1 or "loss" not in out.losses:
                        for task, value in out.losses.items():
                            sums[f"loss/{task}"] = (
                                sums.get(f"loss/{task}", 0.0) + float(value.detach()) * n
                            )
                    self._update_metrics(metrics, out)
        finally:
            self.model.train(was_training)
        results = {k: v / rows for k, v in sums.items()} if rows else {}
        for task, named in metrics.items():
            for name, metric in named.items():
                results[f"{task}/{name}" if task else name] = metric.compute()
        self.history["eval"].append((self.global_step, results))
        for hook in self.hooks:
            hook.on_evaluate(self, results)
        return results

    def _update_metrics(self, metrics: dict[str, dict[str, Metric]], out: StepOutput) -> None:
        for task, preds in out.predictions.items():
            named = metrics.setdefault(task, self._task_metrics(task))
            labels = out.labels[task]
            for name, metric in named.items():
                if isinstance(metric, GAUC):
                    if out.groups is None:
                        raise ConfigError(
                            f"metric {name!r} (GAUC) needs the model to return 'groups'"
                        )
                    metric.update(preds.float(), labels, groups=out.groups)
                else:
                    metric.update(preds.float(), labels)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ checkpoints

    def _trainer_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "global_step": self.global_step,
            "cursor": self._cursor,
            "dense_optimizer": self.dense_optimizer.state_dict(),
            "lr_schedulers": [s.state_dict() for s in self.lr_schedulers],
            "rng": rng_state(),
            "hooks": [h.state_dict() for h in self.hooks],
            "history": self.history,
        }
        if self._scaler is not None:
            state["scaler"] = self._scaler.state_dict()
        if self.sparse_optimizer is not None:
            # recis-embedding's holds hyperparameters only (rows live in the tables); a torch
            # sparse optimizer's holds its per-parameter state too.
            state["sparse_optimizer"] = self.sparse_optimizer.state_dict()
        return state

    def _dense_state(self) -> dict[str, torch.Tensor]:
        state = self.model.state_dict()
        if self.sparse_checkpoint is not None:
            state = self.sparse_checkpoint.filter_dense(state)
        return state

    def save(self) -> Path:
        """Write a checkpoint of the current step (atomically) and return its directory."""
        writers = {
            "dense": lambda d: save_tensors(self._dense_state(), d / "model.safetensors"),
            "trainer": lambda d: save_object(self._trainer_state(), d / "state.pt"),
        }
        if self.sparse_checkpoint is not None:
            writers["sparse"] = lambda d: self.sparse_checkpoint.save(  # type: ignore[union-attr]
                d, self.model, self.sparse_optimizer
            )
        path = self.checkpoints.save(
            self.global_step, writers, {"args": self.args.to_dict(), "epoch": self._cursor["epoch"]}
        )
        self._last_saved_step = self.global_step
        for hook in self.hooks:
            hook.on_save(self, str(path))
        return path

    def restore(
        self,
        path: str | Path | None = None,
        *,
        parts: Sequence[str] = _PARTS,
        missing_ok: bool = False,
    ) -> Path | None:
        """Load a checkpoint: the latest complete one in ``output_dir``, or ``path``.

        Args:
            path: a checkpoint directory (e.g. from another run, for a warm start).
            parts: what to load: ``"dense"`` parameters, ``"sparse"`` tables and ``"trainer"``
                state (optimizers, schedulers, RNG, step, data cursor). A warm start from
                another run's weights passes ``parts=("dense", "sparse")``.
            missing_ok: return ``None`` instead of raising when there is no checkpoint.

        Returns:
            The checkpoint directory loaded, or ``None``.

        Raises:
            CheckpointNotFoundError: no complete checkpoint (and not ``missing_ok``).
            CheckpointError: the checkpoint is incomplete or does not fit the model.
        """
        unknown = sorted(set(parts) - set(_PARTS))
        if unknown:
            raise ConfigError(
                f"restore: unknown part(s) {unknown}, expected a subset of {list(_PARTS)}"
            )
        found = Path(path) if path is not None else self.checkpoints.latest()
        if found is None:
            if missing_ok:
                return None
            raise CheckpointNotFoundError(f"no complete checkpoint in {self.checkpoints.root}")
        self.checkpoints.read_manifest(found)
        if "dense" in parts:
            self._load_dense(found / "dense" / "model.safetensors")
        if "sparse" in parts and self.sparse_checkpoint is not None:
            self.sparse_checkpoint.load(found / "sparse", self.model, self.sparse_optimizer)
        if "trainer" in parts:
            self._load_trainer(load_object(found / "trainer" / "state.pt"))
            self._restored = True
        _log.info("restored checkpoint %s (parts %s)", found, list(parts))
        return found

    def _load_dense(self, file: Path) -> None:
        tensors = load_tensors(file)
        missing, unexpected = self.model.load_state_dict(tensors, strict=False)
        if self.sparse_checkpoint is not None:
            # Table entries come back through the sparse part, not the dense file.
            missing = list(self.sparse_checkpoint.filter_dense(dict.fromkeys(missing)))
        if missing or unexpected:
            raise CheckpointError(
                f"{file}: dense parameters do not fit the model (missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)})"
            )

    def _load_trainer(self, state: Mapping[str, Any]) -> None:
        self.global_step = int(state["global_step"])
        self._cursor = dict(state["cursor"])
        self._last_saved_step = self.global_step
        self.stream.load_state_dict(self._cursor)
        self.dense_optimizer.load_state_dict(state["dense_optimizer"])
        for scheduler, saved in zip(self.lr_schedulers, state["lr_schedulers"], strict=True):
            scheduler.load_state_dict(saved)
        for hook, saved in zip(self.hooks, state["hooks"], strict=False):
            hook.load_state_dict(saved)
        if self._scaler is not None and "scaler" in state:
            self._scaler.load_state_dict(state["scaler"])
        if self.sparse_optimizer is not None and "sparse_optimizer" in state:
            self.sparse_optimizer.load_state_dict(state["sparse_optimizer"])
        self.history = {k: list(v) for k, v in state["history"].items()}
        set_rng_state(state["rng"])
