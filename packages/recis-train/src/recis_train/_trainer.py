"""The Trainer: the training loop, evaluation, checkpoints and resume."""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import recis_kernels
from recis_train._arguments import TrainingArguments
from recis_train._checkpoint import (
    CheckpointManager,
    first_verified,
    load_object,
    load_tensors,
    save_object,
    save_tensors,
)
from recis_train._data import DataStream, batch_rows, move_to
from recis_train._distributed import DistributedContext, own_rank_state
from recis_train._hooks import Hook, LoggingHook, hook_keys
from recis_train._outputs import StepOutput, parse_output
from recis_train._sparse import (
    SparseCheckpoint,
    default_sparse_checkpoint,
    tables_saved_separately,
)
from recis_train._state import rng_state, seed_everything, set_rng_state
from recis_train.exceptions import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    ModelOutputError,
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
#: training arguments a resume must keep: a step is ``gradient_accumulation_steps`` batches, and
#: the saved RNG state continues the run of the saved seed (a new one would be ignored)
FIXED_ON_RESUME = ("gradient_accumulation_steps", "seed")


def _class_name(obj: Any) -> str:
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if backend is None or not callable(available) or not available():
        raise ConfigError(f"device {name!r} was asked for but torch sees no {device.type} device")
    count = getattr(backend, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        raise ConfigError(
            f"device {name!r} was asked for but torch sees {count()} {device.type} device(s) "
            f"(indices 0 to {count() - 1})"
        )
    return device


class Trainer:
    """Runs training and evaluation of one model and keeps it resumable.

    The loop per optimizer step: take ``gradient_accumulation_steps`` batches from
    ``train_data``, move each to the device, ``model(batch)`` (under autocast for mixed
    precision), backward of the loss, then the dense optimizer step (after unscaling and
    clipping), the sparse optimizer step, zeroing gradients and stepping the LR schedulers.

    The model returns a scalar loss, or a dict with ``"loss"`` or ``"losses"`` (task -> loss),
    and optionally ``"weights"`` (task -> float), ``"predictions"`` / ``"labels"`` ((B,) tensors
    or task -> (B,) tensors) and ``"groups"`` ((B,) ids for GAUC, or task -> ids matching that
    task's predictions). Predictions are probabilities.

    Under ``torchrun`` (``torch.distributed`` initialized with two or more ranks) it trains
    data-parallel: constructing it and every call of ``train``, ``evaluate``, ``save`` and
    ``restore`` are collective, every rank makes them. The dense parameters are wrapped in
    ``DistributedDataParallel`` and the embedding tables must be sharded
    (``EmbeddingEngine(shard=True)``); gradients of ``loss / world_size`` are summed over the
    ranks, so ``W`` ranks of ``b`` rows per step train as one process with ``W * b`` rows and
    the mean loss. Ranks stop together when any rank runs out of data, logs are cross-rank
    means (``samples`` the sum), only rank 0 runs ``LoggingHook`` (and hooks with
    ``rank_zero_only = True``), evaluation covers every rank's rows with synced metrics, and
    checkpoints are written together: dense and trainer state by rank 0, each table shard by
    its owner, into one directory on a file system all ranks share.

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
        ddp_options: keyword arguments of ``DistributedDataParallel`` (e.g.
            ``find_unused_parameters=True``) when running distributed.

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
        ddp_options: Mapping[str, Any] | None = None,
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
        self.distributed = DistributedContext.detect()
        self.device = _resolve_device(args.device)
        if self.distributed is not None:
            self.device = self.distributed.device(self.device)
            self.distributed.check_tables(model)
        self.model = model.to(self.device)
        self._ddp = (
            self.distributed.wrap(self.model, self.device, ddp_options or {})
            if self.distributed is not None
            else None
        )
        self.train_data = train_data
        self.eval_data = eval_data
        self.dense_optimizer = dense_optimizer
        self.sparse_optimizer = sparse_optimizer
        self.lr_schedulers = list(lr_schedulers)
        self.hooks = list(hooks)
        self.metric_factories = _check_factories(
            dict(metrics if metrics is not None else DEFAULT_METRICS), "metrics"
        )
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
        self._stopped_at_restore = False
        self._evaluated_iterator = False  # the trainer's eval_data, if an iterator, is used up
        self._tables: list[Any] | None = None
        self._last_saved_step: int | None = None
        self._scaler = (
            torch.amp.GradScaler(self.device.type) if args.mixed_precision == "fp16" else None
        )
        if args.deterministic:
            torch.use_deterministic_algorithms(True)

    # ------------------------------------------------------------------ properties

    @property
    def rank(self) -> int:
        """This process's rank (0 when not distributed)."""
        return self.distributed.rank if self.distributed is not None else 0

    @property
    def world_size(self) -> int:
        """Number of ranks training together (1 when not distributed)."""
        return self.distributed.world_size if self.distributed is not None else 1

    @property
    def is_main_process(self) -> bool:
        """Whether this is rank 0, the rank that prints logs and writes shared files."""
        return self.rank == 0

    def _hooks(self) -> list[Hook]:
        """The hooks this rank runs: all of them, except rank-0-only ones on other ranks."""
        if self.is_main_process:
            return self.hooks
        return [h for h in self.hooks if not _rank_zero_only(h)]

    @property
    def total_steps(self) -> int | None:
        """The global step this run will end at, when known: ``train_steps``, or the step at
        which ``epochs`` passes over data with a length end, whichever is fewer (training stops
        at the first of the two). The steps the data has left are counted from the cursor, so
        the total holds after a resume and after :meth:`set_train_data`, whose data the step
        count carries on over."""
        wanted = self.args.train_steps
        try:
            batches = len(self.train_data)  # type: ignore[arg-type]
        except TypeError:
            return wanted
        # Accumulation runs across epoch boundaries: a step may take batches of two epochs.
        taken = int(self._cursor["epoch"]) * batches + int(self._cursor["consumed"])
        left = max(0, batches * self.stream.epochs - taken)
        passes = self.global_step + math.ceil(left / self.args.gradient_accumulation_steps)
        return passes if wanted is None else min(wanted, passes)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        precision = self.args.mixed_precision
        if precision == "no":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    # ------------------------------------------------------------------ training

    def set_train_data(self, train_data: Iterable[Any], *, epochs: int | None = None) -> None:
        """Train the next ``train()`` call on new data (e.g. the next window of a stream).

        The data cursor starts over on the new data; the step count, optimizers and
        everything else carry on.

        Args:
            train_data: the new iterable of batches (see the class's ``train_data``).
            epochs: passes over it (default: ``args.epochs``).
        """
        self.train_data = train_data
        self.stream = DataStream(train_data, self.args.epochs if epochs is None else epochs)
        self._cursor = self.stream.state_dict()
        self._stopped_at_restore = False  # a stop asked for on the old data ended that run only

    def train(self) -> dict[str, float]:
        """Train until ``train_steps``, the end of the data, or a hook asks to stop.

        Resumes from the latest checkpoint in ``output_dir`` first when ``args.resume``.

        Returns:
            The last step's logs (``loss``, ``loss/<task>``, ``lr``, ``samples``, ``step``).
        """
        return self._run(evaluate_every=0)

    def train_and_evaluate(self) -> dict[str, float]:
        """Train, evaluating every ``eval_every`` steps and at the end.

        Each evaluation runs before the checkpoint of its step is written, so a checkpoint holds
        it and the hooks' reaction (e.g. :class:`EarlyStopping` asking to stop): a run resumed
        after a crash evaluates and stops where the uninterrupted run would, and running a
        finished run again trains no further.

        Returns:
            The final evaluation's results.
        """
        if self.eval_data is None:
            raise ConfigError("train_and_evaluate needs eval_data")
        if self.args.eval_every and isinstance(self.eval_data, Iterator):
            raise ConfigError(
                f"eval_data is a one-shot iterator ({type(self.eval_data).__name__}) but "
                f"eval_every={self.args.eval_every} evaluates it repeatedly; give a list, another "
                "iterable that can be iterated again, or a function returning a fresh iterable"
            )
        self._run(evaluate_every=self.args.eval_every, evaluate_at_end=True)
        return dict(self.history["eval"][-1][1])

    def _run(self, evaluate_every: int, evaluate_at_end: bool = False) -> dict[str, float]:
        if self.args.resume and not self._restored:
            self.restore(missing_ok=True)
        if not self._restored and self.global_step == 0:
            seed_everything(self.args.seed)
        # A run restored from a checkpoint written after a hook asked to stop is finished.
        self.should_stop, self._stopped_at_restore = self._stopped_at_restore, False
        if self.should_stop:
            _log.warning(
                "train() runs no step: the checkpoint of step %d records that a hook stopped "
                "the run there; use another output_dir to train further",
                self.global_step,
            )
        for hook in self._hooks():
            hook.on_train_begin(self)
        logs: dict[str, float] = {}
        first_step = self.global_step
        past_start = self.stream.epoch > 0 or self.stream.consumed > 0
        batches = self._batches()
        try:
            while True:
                if self.args.train_steps is not None and self.global_step >= self.args.train_steps:
                    break
                micro = self._agree(batches)
                if not micro:
                    break
                logs = self._step(micro)
                # Evaluate before saving: the checkpoint of this step then holds the evaluation
                # and what the hooks made of it (EarlyStopping's count, a request to stop).
                if evaluate_every and self.global_step % evaluate_every == 0:
                    self.evaluate()
                if self.args.save_every and self.global_step % self.args.save_every == 0:
                    self.save()
        finally:
            # The prefetcher may hold a batch already taken from the data: rewind to the cursor
            # of the last batch trained on so a later call continues exactly there.
            batches.close()
            self.stream.load_state_dict(self._cursor)
        self._warn_if_data_ran_out(first_step, past_start)
        if evaluate_at_end and not (
            self.history["eval"] and self.history["eval"][-1][0] == self.global_step
        ):
            self.evaluate()
        if self.args.save_at_end and self._last_saved_step != self.global_step:
            self.save()
        for hook in self._hooks():
            hook.on_train_end(self)
        return logs

    def _warn_if_data_ran_out(self, first_step: int, past_start: bool) -> None:
        """Logs a warning when training stopped for want of data, not by request
        (``past_start``: the call began past the data's first batch)."""
        wanted = self.args.train_steps
        if self.should_stop or (wanted is not None and self.global_step >= wanted):
            return
        if wanted is not None:
            _log.warning(
                "the training data ran out at step %d of train_steps=%d (%d pass(es) over the "
                "data); raise epochs or give more data to train that many steps",
                self.global_step,
                wanted,
                self.stream.epochs,
            )
        elif self.global_step == first_step:
            _log.warning(
                "train() ran no step: %s",
                f"the run had finished its {self.stream.epochs} pass(es) over the data already"
                if past_start
                else "the training data gave no batches"
                if self.distributed is None
                else "the training data of at least one rank gave no batches (ranks train "
                "together, as many steps as the rank with the fewest batches)",
            )

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

    def _agree(self, batches: Iterator[tuple[Any, dict[str, Any]]]) -> list[Any]:
        """The next step's micro-batches every rank has: ranks stop together when one runs out
        of data (or a hook asked to stop).

        Every rank must run the same number of forward passes (sharded lookups and DDP are
        collective), so each trains on as many micro-batches as the rank with the fewest; the
        cursor then points after the last batch trained, and the others are read again. A rank
        whose data raises tells the others, which raise :class:`RankFailedError` naming it,
        instead of waiting for it in the next collective.
        """
        if self.distributed is None:
            return self._take(batches) if not self.should_stop else []
        micro: list[Any] = []
        error = None
        try:
            if not self.should_stop:
                micro = self._take(batches)
        except Exception as err:
            error = err
        agreed = self.distributed.agree_count(
            len(micro), error, f"reading the training data for step {self.global_step + 1}"
        )
        return micro[:agreed]

    def _sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        # Accumulated micro-batches all-reduce their gradients once, with the last backward.
        if self._ddp is None or last:
            return contextlib.nullcontext()
        return self._ddp.no_sync()

    def _step(self, micro: list[tuple[Any, dict[str, Any]]]) -> dict[str, float]:
        started = time.perf_counter()
        self.model.train()
        forward = self._ddp if self._ddp is not None else self.model
        totals: dict[str, float] = {}
        samples = 0
        for index, (batch, cursor) in enumerate(micro):
            with self._sync(index == len(micro) - 1):
                with self._autocast():
                    out = parse_output(forward(batch))
                kept = _task_rows(out)
                union = self._check_finite(out, index, len(micro), cursor, kept)
                if not out.loss.requires_grad:
                    self._zero_grad()
                    raise ModelOutputError(
                        f"the model's loss at step {self.global_step + 1} (micro-batch "
                        f"{index + 1} of {len(micro)}) has no gradient: it was computed without "
                        "an autograd graph (detached, under torch.no_grad(), or from no parameter "
                        "that requires grad, e.g. with every module frozen)"
                    )
                losses, total = _union_losses(out, kept, union, self.world_size)
                # Gradients are summed over the ranks: dividing by the world size makes the
                # step that of the mean loss over every rank's rows.
                loss = total / (len(micro) * self.world_size)
                (self._scaler.scale(loss) if self._scaler else loss).backward()
            totals["loss"] = totals.get("loss", 0.0) + float(total.detach()) / len(micro)
            if len(out.losses) > 1 or "loss" not in out.losses:
                for task, value in losses.items():
                    key = f"loss/{task}"
                    totals[key] = totals.get(key, 0.0) + float(value.detach()) / len(micro)
            samples += batch_rows(batch)
        self._optimizer_step()
        self._cursor = micro[-1][1]
        self.global_step += 1
        if self.distributed is not None:
            totals, samples = self.distributed.mean_logs(totals, samples)
        logs = {
            **totals,
            "lr": float(self.dense_optimizer.param_groups[0]["lr"]),
            "samples": float(samples),
            "step": float(self.global_step),
            "step_time": time.perf_counter() - started,
        }
        self.history["train"].append((self.global_step, logs))
        for hook in self._hooks():
            hook.on_step_end(self, logs)
        return logs

    def _check_finite(
        self,
        out: StepOutput,
        index: int,
        count: int,
        cursor: Mapping[str, Any],
        kept: Mapping[str, int] | None = None,
    ) -> dict[str, float]:
        """Raise if the loss is not finite (or a kernel met a bad index) on any rank.

        Returns:
            ``kept`` (task -> rows its loss is the mean over) summed over the ranks, taken by
            the same all-reduce (``kept`` itself in one process).
        """
        kept = dict(kept or {})
        finite = bool(torch.isfinite(out.loss.detach()).item())
        # The loss read above waited for this micro-batch's kernels: an out-of-range index one
        # of them met is raised here, naming the op, instead of training on its zeros.
        index_error = self._recorded_index_error()
        # Every rank learns of a bad loss (or index) anywhere, so no rank waits in a backward
        # alone.
        ok = finite and index_error is None
        bad: list[int] = []
        union: dict[str, float] = {task: float(rows) for task, rows in kept.items()}
        if self.distributed is not None:
            bad, summed = self.distributed.nonfinite_ranks(ok, list(union.values()))
            union = dict(zip(union, summed, strict=True))
        if ok and not bad:
            return union
        self._zero_grad()  # gradients of earlier micro-batches must not leak into a retry
        if index_error is not None:
            raise index_error
        if finite:
            raise NonFiniteLossError(
                f"loss is not finite (or an index was out of range) on rank(s) {bad} at step "
                f"{self.global_step + 1} (micro-batch {index + 1} of {count}); see the error of "
                "those ranks"
            )
        tasks = ", ".join(f"{k} {float(v.detach()):g}" for k, v in out.losses.items())
        where = f" on rank {self.rank}" if self.distributed is not None else ""
        raise NonFiniteLossError(
            f"loss is {float(out.loss.detach())}{where} at step {self.global_step + 1} (epoch "
            f"{cursor['epoch'] + 1} of {self.stream.epochs}, batch {cursor['consumed']} of that "
            f"epoch, micro-batch {index + 1} of {count}; counted from 1); task losses: {tasks}"
        )

    def _recorded_index_error(self) -> Exception | None:
        """The out-of-range index a recis-kernels CUDA kernel recorded since the last read (e.g.
        bad ragged offsets: the kernel skipped it and wrote zeros), or ``None``.

        Only CUDA kernels record into the buffer; reading it waits for the queued work, so it
        is read where the trainer waits anyway.
        """
        if self.device.type != "cuda":
            return None
        try:
            recis_kernels.check_index_errors(self.device)
        except recis_kernels.IndexOutOfRangeError as error:
            return error
        return None

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
        # Lookups record the rows they touched on their table until an optimizer consumes them;
        # a table no sparse optimizer steps (none given, or a stage training other tables)
        # would keep every step's record, so drop what is left.
        for table in self._recording_tables():
            table.pending.clear()

    def _recording_tables(self) -> list[Any]:
        if self._tables is None:
            try:
                from recis_embedding import sparse_parameters
            except ImportError:  # a model without recis-embedding tables
                self._tables = []
            else:
                self._tables = sparse_parameters(self.model)
        return self._tables

    # ------------------------------------------------------------------ evaluation

    def _task_metrics(self, task: str) -> dict[str, Metric]:
        per_task = getattr(self.model, "task_metrics", None)
        factories = self.metric_factories
        if callable(per_task):
            factories = _check_factories(
                dict(per_task().get(task, factories)), f"task_metrics() of task {task!r}"
            )
        return {name: make() for name, make in factories.items()}

    def evaluate(self, eval_data: Iterable[Any] | None = None) -> dict[str, float]:
        """Evaluate on ``eval_data`` (default: the trainer's), at most ``eval_steps`` batches.

        The model runs in ``eval()`` mode without gradients (embedding tables insert no new ids).
        Distributed, each rank evaluates its own ``eval_data`` (a recis-io ``Dataset`` reads its
        shard) and the results cover every rank's rows: losses and metrics are synced.

        Returns:
            ``loss``, ``loss/<task>`` (each task's mean over the rows it kept), and
            ``<task>/<metric>`` for every task the model predicts (plain ``<metric>`` for a
            single unnamed prediction). With per-task losses ``loss`` is their weighted sum
            ``Σ weight · loss/<task>``, the total of training over the whole evaluation
            whatever its batches; with one loss, its row-weighted mean over the batches.
        """
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
        data = source() if callable(source) and not hasattr(source, "__iter__") else source
        metrics: dict[str, dict[str, Metric]] = {}
        sums: dict[str, float] = {}
        task_rows: dict[str, float] = {}  # rows each task's loss is the mean over
        weighted: dict[str, float] = {}  # per task: sum of weight * loss * kept rows
        rows = 0
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for batch, counts in self._eval_batches(data):
                    with self._autocast():
                        out = parse_output(self.model(batch))
                    if not counts:
                        continue
                    n = batch_rows(batch)
                    rows += n
                    sums["loss"] = sums.get("loss", 0.0) + float(out.loss.detach()) * n
                    if len(out.losses) > 1 or "loss" not in out.losses:
                        for task, value in out.losses.items():
                            # A task's loss is its mean over the rows it kept (all of them,
                            # unless it leaves rows with unknown labels out): weigh it by those.
                            kept = out.labels[task].numel() if task in out.labels else n
                            key = f"loss/{task}"
                            sums[key] = sums.get(key, 0.0) + float(value.detach()) * kept
                            task_rows[key] = task_rows.get(key, 0) + kept
                            weighted[key] = (
                                weighted.get(key, 0.0)
                                + out.weights.get(task, 1.0) * float(value.detach()) * kept
                            )
                    self._update_metrics(metrics, out)
        finally:
            self.model.train(was_training)
        # An out-of-range index a kernel met during the evaluation (its output held zeros
        # there) fails the evaluation on every rank instead of reaching the results.
        index_error = self._recorded_index_error()
        if self.distributed is not None and self.device.type == "cuda":
            if self.distributed.reduce([float(index_error is not None)], "max")[0]:
                self.distributed.fail_together(index_error, "evaluation")
        elif index_error is not None:
            raise index_error
        if self.distributed is not None:
            keys, tasks = sorted(sums), sorted(task_rows)
            total = self.distributed.reduce(
                [rows]
                + [sums[k] for k in keys]
                + [task_rows[k] for k in tasks]
                + [weighted[k] for k in tasks]
            )
            rows, sums = int(total[0]), dict(zip(keys, total[1 : 1 + len(keys)], strict=True))
            end = 1 + len(keys) + len(tasks)
            task_rows = dict(zip(tasks, total[1 + len(keys) : end], strict=True))
            weighted = dict(zip(tasks, total[end:], strict=True))
        results = (
            {k: _mean(v, task_rows[k]) if k in task_rows else v / rows for k, v in sums.items()}
            if rows
            else {}
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
                results[f"{task}/{name}" if task else name] = metric.compute()
        self.history["eval"].append((self.global_step, results))
        for hook in self._hooks():
            hook.on_evaluate(self, results)
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
                self.distributed.fail_together(
                    error, f"reading evaluation batch {taken + 1} (counted from 1)"
                )
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

    def _update_metrics(self, metrics: dict[str, dict[str, Metric]], out: StepOutput) -> None:
        for task, preds in out.predictions.items():
            named = metrics.setdefault(task, self._task_metrics(task))
            labels = out.labels[task]
            for name, metric in named.items():
                if isinstance(metric, GAUC):
                    groups = out.task_groups(task)
                    if groups is None:
                        raise ConfigError(
                            f"metric {name!r} (GAUC) needs the model to return 'groups'"
                            + (f" for task {task!r}" if isinstance(out.groups, dict) else "")
                        )
                    metric.update(preds.float(), labels, groups=groups)
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
            "hooks": dict(
                zip(hook_keys(self.hooks), (h.state_dict() for h in self.hooks), strict=True)
            ),
            "history": self.history,
            "stopped": self.should_stop,
            "classes": self._state_classes(),
        }
        if self._scaler is not None:
            state["scaler"] = self._scaler.state_dict()
        if self.sparse_optimizer is not None:
            # recis-embedding's holds hyperparameters only (rows live in the tables); a torch
            # sparse optimizer's holds its per-parameter state too.
            state["sparse_optimizer"] = self.sparse_optimizer.state_dict()
        if self.distributed is not None:
            # Each rank reads its own shard of the data and draws from its own RNG; the dense
            # optimizer, schedulers and hooks are alike on every rank, so rank 0's stand for all.
            mine = {"cursor": self._cursor, "rng": state["rng"]}
            state["ranks"] = self.distributed.gather(mine)
        return state

    def _state_classes(self) -> dict[str, Any]:
        """The classes whose state the trainer part holds, checked on resume."""
        return {
            "dense_optimizer": _class_name(self.dense_optimizer),
            "sparse_optimizer": _class_name(self.sparse_optimizer)
            if self.sparse_optimizer is not None
            else None,
            "lr_schedulers": [_class_name(s) for s in self.lr_schedulers],
        }

    def _dense_state(self) -> dict[str, torch.Tensor]:
        with tables_saved_separately():  # the sparse checkpoint saves them
            state = self.model.state_dict()
        if self.sparse_checkpoint is not None:
            state = self.sparse_checkpoint.filter_dense(state)
        return state

    def save(self) -> Path:
        """Write a checkpoint of the current step (atomically) and return its directory.

        Distributed, every rank must call it; it returns once the checkpoint is complete.
        """
        meta = {"args": self.args.to_dict(), "epoch": self._cursor["epoch"]}
        sparse = self._save_sparse if self.sparse_checkpoint is not None else None
        if self.distributed is None:
            writers = {
                "dense": lambda d: save_tensors(self._dense_state(), d / "model.safetensors"),
                "trainer": lambda d: save_object(self._trainer_state(), d / "state.pt"),
            }
            if sparse is not None:
                writers["sparse"] = sparse
            path = self.checkpoints.save(self.global_step, writers, meta)
        else:
            path = self._save_distributed(sparse, meta)
        self._last_saved_step = self.global_step
        for hook in self._hooks():
            hook.on_save(self, str(path))
        return path

    def _save_sparse(self, directory: Path) -> None:
        self.sparse_checkpoint.save(directory, self.model, self.sparse_optimizer)  # type: ignore[union-attr]

    def _save_distributed(
        self, sparse: Callable[[Path], None] | None, meta: dict[str, Any]
    ) -> Path:
        assert self.distributed is not None
        state = self._trainer_state()  # collective: gathers every rank's cursor and RNG
        writers = {}
        if self.distributed.is_main:
            dense = self._dense_state()
            writers = {
                "dense": lambda d: save_tensors(dense, d / "model.safetensors"),
                "trainer": lambda d: save_object(state, d / "state.pt"),
            }
        meta = {**meta, "world_size": self.world_size}
        return self.distributed.save(self.checkpoints, self.global_step, writers, sparse, meta)

    def restore(
        self,
        path: str | Path | None = None,
        *,
        parts: Sequence[str] = _PARTS,
        missing_ok: bool = False,
    ) -> Path | None:
        """Load a checkpoint: the latest complete one in ``output_dir``, or ``path``.

        The files of the parts to load are verified first against the checksums the manifest
        recorded. A latest checkpoint that fails is skipped with a warning naming the file, and
        the newest one before it that verifies is loaded; a ``path`` that fails raises.

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
            CheckpointCorruptError: ``path`` fails verification (the error names the file, the
                expected and the found checksum), or no complete checkpoint does.
            CheckpointError: the checkpoint is incomplete or does not fit the model; or, loading
                the ``"trainer"`` part, it was written with another optimizer class, other LR
                schedulers, another ``gradient_accumulation_steps`` or ``seed``, or by another
                number of ranks. Nothing is loaded then.
        """
        unknown = sorted(set(parts) - set(_PARTS))
        if unknown:
            raise ConfigError(
                f"restore: unknown part(s) {unknown}, expected a subset of {list(_PARTS)}"
            )
        found = self._choose_checkpoint(path, parts)
        if found is None:
            if missing_ok:
                return None
            raise CheckpointNotFoundError(f"no complete checkpoint in {self.checkpoints.root}")
        manifest = self.checkpoints.read_manifest(found)
        # Everything is checked before anything is loaded, so a refused resume changes nothing.
        trainer_file = found / "trainer" / "state.pt"
        trainer_state = load_object(trainer_file) if "trainer" in parts else None
        if trainer_state is not None:
            self._check_resumable(manifest, trainer_state, found)
            own_rank_state(trainer_state, self.rank, self.world_size, trainer_file)
        dense_file = found / "dense" / "model.safetensors"
        dense = load_tensors(dense_file) if "dense" in parts else None
        if dense is not None:
            self._check_dense_shapes(dense, dense_file)
        # A hook may refuse its saved state only when it loads it: that comes first, so a
        # refusal leaves the hooks as they were and nothing else loaded.
        hooks_before = (
            self._load_hooks(trainer_state["hooks"], trainer_file)
            if trainer_state is not None
            else None
        )
        try:
            if dense is not None:
                self._load_dense(dense, dense_file)
            if "sparse" in parts and self.sparse_checkpoint is not None:
                self.sparse_checkpoint.load(found / "sparse", self.model, self.sparse_optimizer)
        except BaseException:
            if hooks_before is not None:
                self._set_hook_states(hooks_before)
            raise
        if trainer_state is not None:
            self._load_trainer(trainer_state, trainer_file, hooks=False)
            self._restored = True
        # Gradients of a step cut short (e.g. by a bad batch) belong to no checkpoint.
        self._zero_grad()
        _log.info("restored checkpoint %s (parts %s)", found, list(parts))
        return found

    def _choose_checkpoint(self, path: str | Path | None, parts: Sequence[str]) -> Path | None:
        """``path``, or the newest complete checkpoint whose files of ``parts`` verify.

        Distributed, the ranks verify rank 0's candidates together (each reads a share of the
        files) and so agree on the checkpoint, or all raise.
        """
        candidates = [Path(path)] if path is not None else self.checkpoints.complete()[::-1]
        explicit, root = path is not None, self.checkpoints.root
        if self.distributed is not None:
            return self.distributed.choose_verified(
                candidates,
                lambda p, share: self._mismatches(p, parts, share),
                explicit=explicit,
                root=root,
            )
        return first_verified(
            candidates, lambda p: self._mismatches(p, parts), explicit=explicit, root=root
        )

    def _mismatches(
        self, path: Path, parts: Sequence[str], share: tuple[int, int] = (0, 1)
    ) -> list[str]:
        """What is wrong with the files of ``parts`` in checkpoint ``path``: their checksums,
        and what the sparse checkpoint's own ``verify`` (if it has one) finds in its part."""
        wrong = CheckpointManager.mismatches(path, parts, share=share)
        verify = getattr(self.sparse_checkpoint, "verify", None)
        if share[0] == 0 and "sparse" in parts and callable(verify) and (path / "sparse").is_dir():
            wrong += verify(path / "sparse")
        return wrong

    def _check_resumable(
        self, manifest: Mapping[str, Any], state: Mapping[str, Any], path: Path
    ) -> None:
        """Raises :class:`CheckpointError` naming each way this trainer differs from the one
        that wrote ``path`` in what its trainer state cannot carry over."""
        saved_args = manifest.get("meta", {}).get("args", {})
        differences = [
            f"{name} {saved_args[name]!r} (now {getattr(self.args, name)!r})"
            for name in FIXED_ON_RESUME
            if name in saved_args and saved_args[name] != getattr(self.args, name)
        ]
        saved = state.get("classes")
        if saved is not None:  # checkpoints of earlier versions do not record them
            now = self._state_classes()
            differences += [
                f"{key} {saved[key]} (now {now[key]})"
                for key in ("dense_optimizer", "sparse_optimizer", "lr_schedulers")
                if saved[key] != now[key]
            ]
        elif len(state["lr_schedulers"]) != len(self.lr_schedulers):
            differences.append(
                f"{len(state['lr_schedulers'])} lr scheduler(s) (now {len(self.lr_schedulers)})"
            )
        for key, optimizer in (
            ("dense_optimizer", self.dense_optimizer),
            ("sparse_optimizer", self.sparse_optimizer),
        ):
            if optimizer is not None and key in state:
                differences += _group_differences(key, state[key], optimizer)
        self._check_hook_states(state.get("hooks", {}), path)
        if differences:
            raise CheckpointError(
                f"{path}: cannot resume, the checkpoint was written with "
                + "; ".join(differences)
                + "; keep them as they were, use another output_dir, or restore "
                "parts=('dense', 'sparse') to start a new run from its weights"
            )

    def _check_hook_states(self, saved: Any, path: Path) -> None:
        """Raises :class:`CheckpointError` when hook state in ``path`` has no hook to go to."""
        if not isinstance(saved, Mapping):
            return  # checkpoints of earlier versions: a list matched by position
        keys = set(hook_keys(self.hooks))
        orphans = sorted(k for k, v in saved.items() if v and k not in keys)
        if orphans:
            raise CheckpointError(
                f"{path}: cannot resume, the checkpoint holds the state of hook(s) {orphans} "
                f"that this trainer does not have (its hooks: {sorted(keys)}); give the trainer "
                "those hooks again, or use another output_dir"
            )

    def _load_hooks(self, saved: Any, file: Path) -> list[Any]:
        """Load each hook's saved state; returns the states the hooks held before.

        Raises:
            CheckpointError: a hook refused its state; every hook then holds its state from
                before the call again.
        """
        if not isinstance(saved, Mapping):
            saved = dict(zip(hook_keys(self.hooks), saved, strict=False))
        before = [copy.deepcopy(hook.state_dict()) for hook in self.hooks]
        for key, hook in zip(hook_keys(self.hooks), self.hooks, strict=True):
            if key not in saved:
                continue  # a hook new to this run starts fresh
            try:
                hook.load_state_dict(saved[key])
            except Exception as err:
                self._set_hook_states(before)
                raise CheckpointError(
                    f"{file}: hook {key!r} cannot load its saved state ({type(err).__name__}: "
                    f"{err}); nothing of the checkpoint was loaded"
                ) from err
        return before

    def _set_hook_states(self, states: Sequence[Any]) -> None:
        """Give each hook back a state it held (best effort: the hooks are being rolled back
        after an error, which is the one raised)."""
        for hook, state in zip(self.hooks, states, strict=True):
            with contextlib.suppress(Exception):
                hook.load_state_dict(state)

    def _check_dense_shapes(self, tensors: Mapping[str, torch.Tensor], file: Path) -> None:
        with tables_saved_separately():  # read for dense shapes only
            own = self.model.state_dict()
        wrong = [
            f"{name} {tuple(tensor.shape)} vs {tuple(own[name].shape)}"
            for name, tensor in sorted(tensors.items())
            if name in own and tuple(own[name].shape) != tuple(tensor.shape)
        ]
        # Floating point values are cast to the model's precision; other kinds (an integer
        # counter saved as float, a float loaded into an integer buffer) would change silently.
        wrong += [
            f"{name} {tensor.dtype} vs {own[name].dtype}"
            for name, tensor in sorted(tensors.items())
            if name in own
            and tensor.dtype != own[name].dtype
            and not (tensor.dtype.is_floating_point and own[name].dtype.is_floating_point)
        ]
        if wrong:
            raise CheckpointError(
                f"{file}: dense parameter(s) do not fit the model's shapes or dtypes (checkpoint "
                f"vs model: {', '.join(wrong)})"
            )
        missing = [name for name in own if name not in tensors]
        if self.sparse_checkpoint is not None:
            # Table entries come back through the sparse part, not the dense file.
            missing = list(self.sparse_checkpoint.filter_dense(dict.fromkeys(missing)))
        unexpected = [name for name in tensors if name not in own]
        if missing or unexpected:
            raise CheckpointError(
                f"{file}: dense parameters do not fit the model (missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)})"
            )

    def _load_dense(self, tensors: Mapping[str, torch.Tensor], file: Path) -> None:
        missing, unexpected = self.model.load_state_dict(tensors, strict=False)
        if self.sparse_checkpoint is not None:
            # Table entries come back through the sparse part, not the dense file.
            missing = list(self.sparse_checkpoint.filter_dense(dict.fromkeys(missing)))
        if missing or unexpected:
            raise CheckpointError(
                f"{file}: dense parameters do not fit the model (missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)})"
            )

    def _load_trainer(self, state: Mapping[str, Any], file: Path, *, hooks: bool = True) -> None:
        own = own_rank_state(state, self.rank, self.world_size, file)
        self.global_step = int(state["global_step"])
        self._cursor = dict(own["cursor"])
        self._last_saved_step = self.global_step
        self.stream.load_state_dict(self._cursor)
        self.dense_optimizer.load_state_dict(state["dense_optimizer"])
        for scheduler, saved in zip(self.lr_schedulers, state["lr_schedulers"], strict=True):
            scheduler.load_state_dict(saved)
        if hooks:
            self._load_hooks(state["hooks"], file)
        if self._scaler is not None and "scaler" in state:
            self._scaler.load_state_dict(state["scaler"])
        if self.sparse_optimizer is not None and "sparse_optimizer" in state:
            self.sparse_optimizer.load_state_dict(state["sparse_optimizer"])
        self.history = {k: list(v) for k, v in state["history"].items()}
        self._stopped_at_restore = bool(state.get("stopped", False))
        set_rng_state(own["rng"])


def _check_factories(factories: dict[str, Any], where: str) -> dict[str, MetricFactory]:
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


def _group_differences(key: str, saved: Any, optimizer: Any) -> list[str]:
    """How the param groups of ``optimizer`` differ from those of its saved state: their
    number, and the parameters in each (where the state lists them, as torch optimizers do).
    Loading such a state raises inside the optimizer, after the dense part was loaded."""
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    own = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list) or not isinstance(own, list):
        return []
    if len(groups) != len(own):
        return [f"{key} with {len(groups)} param group(s) (now {len(own)})"]
    sizes = [
        (index, len(group["params"]), len(mine["params"]))
        for index, (group, mine) in enumerate(zip(groups, own, strict=True))
        if isinstance(group, Mapping) and "params" in group
    ]
    return [
        f"{key} param group {index} of {was} parameter(s) (now {now})"
        for index, was, now in sizes
        if was != now
    ]


def _task_rows(out: StepOutput) -> dict[str, int]:
    """Per-task losses with labels: task -> rows its loss is the mean over (the kept rows of
    a task that leaves rows out, see :class:`~recis_train.Task`). Empty for a single loss."""
    if len(out.losses) == 1 and "loss" in out.losses:
        return {}
    return {task: out.labels[task].numel() for task in out.losses if task in out.labels}


def _union_losses(
    out: StepOutput, kept: Mapping[str, int], union: Mapping[str, float], world_size: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """This rank's share of each task's loss over every rank's rows, and their weighted sum.

    A task's loss is this rank's mean over its ``kept`` rows; the mean over the ``union`` of
    every rank's kept rows is the sum over the ranks of ``loss · kept / union``. Scaled by
    ``world_size`` (the trainer divides every rank's loss by it, and logs the mean over the
    ranks), ranks that keep different numbers of a task's rows (one none at all) train and log
    as one process over all their rows. With equal counts on every rank nothing changes.
    """
    scales = {
        task: rows * world_size / union[task] if union[task] else 1.0 for task, rows in kept.items()
    }
    if all(scale == 1.0 for scale in scales.values()):
        return out.losses, out.loss
    losses = {task: value * scales.get(task, 1.0) for task, value in out.losses.items()}
    total = sum(out.weights.get(task, 1.0) * value for task, value in losses.items())
    assert isinstance(total, torch.Tensor)
    return losses, total


def _mean(total: float, count: float) -> float:
    """``total / count``, NaN for no rows (a task that kept no row of the evaluation)."""
    return total / count if count else float("nan")


def _rank_zero_only(hook: Hook) -> bool:
    """Whether ``hook`` runs on rank 0 only: ``LoggingHook``, or ``rank_zero_only = True``."""
    return bool(getattr(hook, "rank_zero_only", isinstance(hook, LoggingHook)))
