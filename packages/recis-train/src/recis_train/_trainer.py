"""The Trainer: construction, the run of training, and the public methods.

The optimizer step (``_step.py``), evaluation (``_evaluation.py``) and checkpoints
(``_resume.py``) are mixins that :class:`Trainer` composes. The public methods are defined
here, on the class the API reference documents (it lists a class's own members), and call the
hooks; the mixins' methods do the work.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recis_train._arguments import TrainingArguments
from recis_train._checkpoint import CheckpointManager
from recis_train._data import DataStream
from recis_train._distributed import DistributedContext
from recis_train._evaluation import (
    DEFAULT_METRICS,
    EvaluationMixin,
    MetricFactory,
    check_factories,
)
from recis_train._hooks import Hook, LoggingHook
from recis_train._resume import CheckpointMixin
from recis_train._sparse import SparseCheckpoint, default_sparse_checkpoint
from recis_train._state import seed_everything
from recis_train._step import StepMixin

# CheckpointError and CheckpointNotFoundError are raised through CheckpointMixin: imported so
# that the API reference links them where restore()'s docstring names them.
from recis_train.exceptions import CheckpointError, CheckpointNotFoundError, ConfigError  # noqa: F401

_log = logging.getLogger("recis_train")

_PARTS = ("dense", "sparse", "trainer")


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


class Trainer(StepMixin, EvaluationMixin, CheckpointMixin):
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
        dense_optimizer: a torch optimizer over the dense parameters; ``None`` when no dense
            parameter requires a gradient (a model, or a stage, that trains embedding tables
            only), which then needs a ``sparse_optimizer``.
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
        ```python
        trainer = Trainer(model, TrainingArguments(output_dir="out", train_steps=100),
                          train_data=loader, dense_optimizer=torch.optim.Adam(model.parameters()))
        trainer.train()
        ```
    """

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments,
        *,
        train_data: Iterable[Any],
        eval_data: Iterable[Any] | Callable[[], Iterable[Any]] | None = None,
        dense_optimizer: torch.optim.Optimizer | None,
        sparse_optimizer: torch.optim.Optimizer | None = None,
        lr_schedulers: Sequence[Any] = (),
        hooks: Sequence[Hook] = (),
        metrics: Mapping[str, MetricFactory] | None = None,
        sparse_checkpoint: SparseCheckpoint | None = None,
        ddp_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(args, TrainingArguments):
            hint = (
                " (build it with TrainingArguments.from_dict)" if isinstance(args, Mapping) else ""
            )
            raise ConfigError(f"args must be TrainingArguments, got {type(args).__name__}{hint}")
        if dense_optimizer is None:
            _check_sparse_only(model, sparse_optimizer)
        elif not isinstance(dense_optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"dense_optimizer must be a torch.optim.Optimizer or None, got "
                f"{type(dense_optimizer).__name__}"
            )
        # Listed once: a generator checked, then listed again, would be used up (its schedulers
        # or hooks silently dropped).
        if isinstance(lr_schedulers, Iterator):
            lr_schedulers = list(lr_schedulers)
        if isinstance(hooks, Iterator):
            hooks = list(hooks)
        _check_parts(train_data, eval_data, dense_optimizer, sparse_optimizer, lr_schedulers, hooks)
        _refuse_parameters_stepped_twice(model, dense_optimizer, sparse_optimizer)
        _warn_unstepped_parameters(model, dense_optimizer, sparse_optimizer)
        _check_output_path(args.output_dir)
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
        self.metric_factories = check_factories(
            dict(metrics if metrics is not None else DEFAULT_METRICS), "metrics"
        )
        # A model's own per-task metrics are checked now too, not at the first evaluation
        # (which may come at the end of training, before its checkpoint).
        per_task = getattr(model, "task_metrics", None)
        if callable(per_task):
            for task, factories in per_task().items():
                check_factories(dict(factories), f"task_metrics() of task {task!r}")
        self.sparse_checkpoint = (
            sparse_checkpoint if sparse_checkpoint is not None else default_sparse_checkpoint(model)
        )
        self.checkpoints = CheckpointManager(
            Path(args.output_dir) / "checkpoints", max_to_keep=args.max_to_keep
        )
        self.stream = DataStream(train_data, args.epochs)
        # The passes set_train_data named for its data; None: args.epochs, read by each train().
        self._data_epochs: int | None = None
        self.global_step = 0
        self.should_stop = False
        self.history: dict[str, list[tuple[int, dict[str, float]]]] = {"train": [], "eval": []}
        self._cursor = self.stream.state_dict()
        self._restored = False
        self._stopped_at_restore = False
        # A train() call has begun: later calls continue from the state in memory, they never
        # restore a checkpoint on their own (it would throw away the steps trained since it).
        self._started = False
        # set_train_data was called before the first train(): a resume keeps the new data's
        # cursor (at its first batch), not the checkpoint's, which belongs to other data.
        self._data_replaced = False
        # output_dir was found free of another run's checkpoints (see _check_output_dir).
        self._output_checked = False
        # A hook stopped the last call: later calls train no further on this data.
        self._hook_stopped = False
        self._evaluated_iterator = False  # the trainer's eval_data, if an iterator, is used up
        self._tables: list[Any] | None = None
        # What the last checkpoint written or restored holds (see _saved_current).
        self._last_saved_key: tuple[int, bool, int] | None = None
        self._scaler = (
            torch.amp.GradScaler(self.device.type) if args.mixed_precision == "fp16" else None
        )

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
        left = max(0, batches * self._epochs() - taken)
        passes = self.global_step + math.ceil(left / self.args.gradient_accumulation_steps)
        return passes if wanted is None else min(wanted, passes)

    def _epochs(self) -> int:
        """The passes over the training data: those ``set_train_data`` named, else
        ``args.epochs`` as it reads now (raised between ``train()`` calls, the run goes on)."""
        return self.args.epochs if self._data_epochs is None else self._data_epochs

    @contextlib.contextmanager
    def _deterministic(self) -> Iterator[None]:
        """With ``args.deterministic``, torch's deterministic algorithms for the call; the
        process's setting before it is restored after (the next trainer, or stage, may not
        want them)."""
        if not self.args.deterministic:
            yield
            return
        before = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(before, warn_only=warn_only)

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
        everything else carry on. On a trainer that has not trained yet, the resume of the
        first ``train()`` (with ``args.resume``) restores the checkpoint's step, weights,
        optimizers, RNG and hooks, but not its data cursor, which belongs to the data it was
        trained on: the new data still starts at its first batch. (An explicit :meth:`restore`
        loads the cursor with the rest.)

        Args:
            train_data: the new iterable of batches (see the class's ``train_data``).
            epochs: passes over it (default: ``args.epochs``).
        """
        check_train_data(train_data)
        if epochs is not None and (
            not isinstance(epochs, numbers.Integral) or isinstance(epochs, bool) or epochs < 1
        ):
            raise ConfigError(
                f"set_train_data: epochs must be an int of at least 1, got {epochs!r}"
            )
        self.train_data = train_data
        self._data_epochs = None if epochs is None else int(epochs)
        self.stream = DataStream(train_data, self._epochs())
        self._cursor = self.stream.state_dict()
        # A stop asked for on the old data ended that run only.
        self._stopped_at_restore = self._hook_stopped = False
        self._data_replaced = True

    def train(self) -> dict[str, float]:
        """Train until ``train_steps``, the end of the data, or a hook asks to stop.

        The first call of a trainer resumes from the latest checkpoint in ``output_dir`` when
        ``args.resume`` (unless :meth:`restore` loaded one already). Later calls (e.g. with
        ``train_steps`` raised, or after :meth:`set_train_data`) continue from the state in
        memory, where the previous call stopped: they restore nothing, so no step trained since
        the last checkpoint is lost. A run a hook asked to stop (e.g. :class:`EarlyStopping`)
        is finished, as its checkpoint records: later calls train no step until
        :meth:`set_train_data` gives new data.

        With ``resume=False`` the run starts from step 0 (or from what :meth:`restore`
        loaded), and an ``output_dir`` that already holds checkpoints of another run is
        refused before training.

        Returns:
            The last step's logs (``loss``, ``loss/<task>``, ``lr``, ``samples``, ``step``).
        """
        with self._deterministic():
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
        with self._deterministic():
            self._run(evaluate_every=self.args.eval_every, evaluate_at_end=True)
        return dict(self.history["eval"][-1][1])

    def _run(self, evaluate_every: int, evaluate_at_end: bool = False) -> dict[str, float]:
        if not self._started:
            self._begin()
        self.stream.set_epochs(self._epochs())  # args.epochs may have been raised since
        if not self._restored and self.global_step == 0:
            seed_everything(self.args.seed)
        # A run a hook asked to stop is finished (until set_train_data gives new data): one
        # restored from a checkpoint written after the stop, as one an earlier call stopped.
        from_checkpoint, earlier_call = self._stopped_at_restore, self._hook_stopped
        self._stopped_at_restore = self._hook_stopped = False
        self.should_stop = from_checkpoint or earlier_call
        if from_checkpoint:
            _log.warning(
                "train() runs no step: the checkpoint of step %d records that a hook stopped "
                "the run there; use another output_dir to train further",
                self.global_step,
            )
        elif earlier_call:
            _log.warning(
                "train() runs no step: a hook stopped the run at step %d in an earlier call; "
                "give new data with set_train_data, or use another output_dir, to train further",
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
                # A stop asked for already (by a hook, or by the checkpoint resumed) begins no
                # step; a stop asked for on another rank is learned in the agreement below.
                if not self.should_stop:
                    for hook in self._hooks():
                        hook.on_step_begin(self)
                micro = self._agree(batches)
                if not micro:
                    break
                logs = self._step(micro)
                for hook in self._hooks():
                    hook.on_step_end(self, logs)
                # Evaluate before saving: the checkpoint of this step then holds the evaluation
                # and what the hooks made of it (EarlyStopping's count, a request to stop).
                # The last of train_steps takes its evaluation at the end here too.
                last = (
                    self.args.train_steps is not None and self.global_step >= self.args.train_steps
                )
                if (evaluate_every and self.global_step % evaluate_every == 0) or (
                    evaluate_at_end and last
                ):
                    self.evaluate()
                if (
                    self.args.save_every
                    and self.global_step % self.args.save_every == 0
                    and not self._saved_current()
                ):
                    self.save()  # unless a hook saved this step as it stands
        except BaseException:
            # A step cut short (an error in a forward, an interrupt) leaves the gradients of
            # its first micro-batches: a later call, which continues from memory and takes
            # those batches again, must not add them twice.
            self._zero_grad()
            raise
        finally:
            # Batches of a step cut short were taken from the data: rewind to the cursor of the
            # last batch trained on so a later call continues exactly there.
            batches.close()
            self.stream.load_state_dict(self._cursor)
        self._warn_if_data_ran_out(first_step, past_start)
        checkpointed = self._last_saved_step == self.global_step
        if evaluate_at_end and not (
            self.history["eval"] and self.history["eval"][-1][0] == self.global_step
        ):
            self.evaluate()
        # A checkpoint of this step written before the end lacks what came after it (the
        # evaluation at the end and the hooks' reaction to it, a stop asked for after it was
        # written): it is written again.
        if (self.args.save_at_end or checkpointed) and not self._saved_current():
            self.save()
        self._hook_stopped = self.should_stop  # as the checkpoint of this step records it
        for hook in self._hooks():
            hook.on_train_end(self)
        return logs

    def _begin(self) -> None:
        """Before the first training of this trainer: the resume (``args.resume``), or the
        check that a new run does not write into another run's checkpoints.

        Only the first ``train()`` resumes: the trainer's own checkpoints are behind what it
        holds in memory once it has trained, and a checkpoint's data cursor does not fit data
        given by :meth:`set_train_data` since. A resume that raises leaves the trainer
        unstarted, so the next call tries again.
        """
        if self.args.resume and not self._restored:
            restored = self.restore(missing_ok=True)
            if restored is not None and self._data_replaced:
                # set_train_data promised the new data from its first batch: the checkpoint's
                # cursor (and a stop a hook asked for there) belong to the data it trained on.
                self.stream = DataStream(self.train_data, self.stream.epochs)
                self._cursor = self.stream.state_dict()
                self._stopped_at_restore = False
        self._check_output_dir()
        self._started = True

    def _check_output_dir(self) -> None:
        """Refuses a new run (``resume=False``, no trainer state restored, nothing saved yet)
        in an ``output_dir`` holding complete checkpoints.

        Its checkpoints would mix with the other run's: a resume takes the newest step
        whichever run wrote it, and rotation deletes the oldest steps of both runs. The
        checkpoints are the user's to keep or delete, so nothing is deleted here.

        Raises:
            ConfigError: naming the checkpoints found and the ways out.
        """
        if (
            self._output_checked
            or self.args.resume
            or self._restored
            or self._last_saved_step is not None
        ):
            return
        # Rank 0 lists them and tells the others, so that every rank raises or none does.
        ctx = self.distributed
        found = (
            [p.name for p in self.checkpoints.complete()] if ctx is None or ctx.is_main else None
        )
        if ctx is not None:
            found = ctx.broadcast(found)
        if found:
            raise ConfigError(
                f"output_dir {self.args.output_dir!r} already holds checkpoints of another run "
                f"({', '.join(found)} in {self.checkpoints.root}) and resume=False starts a new "
                "run from step 0: its checkpoints would mix with those (a resume takes the newest "
                "step, whichever run wrote it) and rotation would delete them; choose another "
                "output_dir, pass resume=True to continue that run, or delete those checkpoints "
                "if they are no longer needed"
            )
        self._output_checked = True

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

    # ------------------------------------------------------------------ evaluation

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
            Evaluation data without rows gives no loss (metrics fed only empty batches are
            NaN, metrics never fed are left out) and logs a warning.
        """
        with self._deterministic():
            results = self._evaluate(eval_data)
        for hook in self._hooks():
            hook.on_evaluate(self, results)
        return results

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        """Write a checkpoint of the current step (atomically) and return its directory.

        Distributed, every rank must call it; it returns once the checkpoint is complete.

        Raises:
            ConfigError: ``resume=False``, nothing restored or saved yet, and ``output_dir``
                holds another run's checkpoints (see :meth:`train`).
            CheckpointError: writing failed, or the trainer state (e.g. a hook's
                ``state_dict()``) holds a value a resume could not load; the error names the
                entry, and the checkpoints written before stay as they were.
        """
        self._check_output_dir()
        path = self._save()
        for hook in self._hooks():
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

        The files of the parts to load are verified first against the checksums the manifest
        recorded. A latest checkpoint that fails is skipped with a warning naming the file, and
        the newest one before it that verifies is loaded; a ``path`` that fails raises.

        Args:
            path: a checkpoint directory (e.g. from another run, for a warm start).
            parts: what to load: ``"dense"`` parameters, ``"sparse"`` tables (their rows with
                the optimizer slots they hold) and ``"trainer"`` state (optimizers' and
                schedulers' state, the sparse optimizer's hyperparameters, RNG, step, data
                cursor). A warm start from another run's weights passes
                ``parts=("dense", "sparse")`` and keeps the optimizers it was built with.
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
        return self._restore(path, parts, missing_ok)


def _rank_zero_only(hook: Hook) -> bool:
    """Whether ``hook`` runs on rank 0 only: ``LoggingHook``, or ``rank_zero_only = True``."""
    return bool(getattr(hook, "rank_zero_only", isinstance(hook, LoggingHook)))


def _first_names(names: list[str]) -> str:
    """The first five of ``names``, and how many more, for a message."""
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return ", ".join(names[:5]) + more


def _check_sparse_only(model: nn.Module, sparse: torch.optim.Optimizer | None) -> None:
    """``dense_optimizer=None``: the model trains its embedding tables only."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if trainable:
        raise ConfigError(
            f"dense_optimizer is None, but parameters {_first_names(trainable)} require "
            "gradients; give a dense optimizer over them, or set requires_grad=False to train "
            "the embedding tables only"
        )
    if sparse is None:
        raise ConfigError(
            "dense_optimizer and sparse_optimizer are both None: the trainer would train "
            "nothing; give a sparse optimizer over the embedding tables"
        )


def _check_parts(
    train_data: object,
    eval_data: object,
    dense: torch.optim.Optimizer | None,
    sparse: object,
    schedulers: object,
    hooks: object,
) -> None:
    """Refuses, before anything runs, what would fail or misbehave in the middle of a step
    (where an update may already be applied): optimizers, schedulers, hooks and data of the
    wrong kind."""
    from recis_embedding import SparseOptimizer

    if isinstance(dense, SparseOptimizer):
        raise ConfigError(
            f"dense_optimizer is a sparse optimizer ({type(dense).__name__}), which trains "
            "embedding tables only; pass it as sparse_optimizer and give dense_optimizer a torch "
            "optimizer over the dense parameters"
        )
    if sparse is not None:
        if not isinstance(sparse, torch.optim.Optimizer):
            raise ConfigError(
                f"sparse_optimizer must be a recis_embedding sparse optimizer (e.g. "
                f"SparseAdam(model)) or None, got {type(sparse).__name__} {sparse!r}"
            )
        if sparse is dense:  # never both None here: a sparse optimizer was given
            raise ConfigError(
                "dense_optimizer and sparse_optimizer are the same object, which would step "
                "twice per step; give each its own optimizer"
            )
    if hasattr(schedulers, "step"):  # one scheduler, not a list of them
        raise ConfigError(
            f"lr_schedulers must be a list of LR schedulers, got one {type(schedulers).__name__}; "
            "pass [scheduler]"
        )
    if isinstance(schedulers, (str, bytes, Mapping)) or not isinstance(schedulers, Iterable):
        raise ConfigError(
            f"lr_schedulers must be a list of LR schedulers, got {type(schedulers).__name__}"
        )
    owned = [o for o in (dense, sparse) if o is not None]
    seen: dict[int, int] = {}
    for k, scheduler in enumerate(schedulers):
        name = type(scheduler).__name__
        if id(scheduler) in seen:
            raise ConfigError(
                f"lr_schedulers[{k}] is lr_schedulers[{seen[id(scheduler)]}] again ({name}), "
                "which would step it twice per optimizer step; list each scheduler once"
            )
        seen[id(scheduler)] = k
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise ConfigError(
                f"lr_schedulers[{k}] is a ReduceLROnPlateau, which steps on a metric, not once "
                "per optimizer step; step it yourself from a Hook's on_evaluate with the metric"
            )
        optimizer = getattr(scheduler, "optimizer", None)
        if not callable(getattr(scheduler, "step", None)) or optimizer is None:
            raise ConfigError(
                f"lr_schedulers[{k}] must be an LR scheduler (with .step() and .optimizer), "
                f"got {name}"
            )
        if not any(optimizer is o for o in owned):
            raise ConfigError(
                f"lr_schedulers[{k}] ({name}) schedules an optimizer the trainer does not step; "
                "build it on dense_optimizer or sparse_optimizer"
            )
    if isinstance(hooks, Hook) or not isinstance(hooks, Iterable):
        raise ConfigError(f"hooks must be a list of Hook objects, got {type(hooks).__name__}")
    for k, hook in enumerate(hooks):
        if not isinstance(hook, Hook):
            raise ConfigError(
                f"hooks[{k}] must be a recis_train.Hook (subclass it), got {type(hook).__name__}"
            )
    check_train_data(train_data)
    # A path or one batch (a dict) iterates, over characters or keys, and would fail in the
    # model's first step.
    if eval_data is not None and (
        isinstance(eval_data, (str, bytes, os.PathLike, Mapping))
        or not (isinstance(eval_data, Iterable) or callable(eval_data))
    ):
        raise ConfigError(
            "eval_data must be an iterable of batches or a function returning one, got "
            f"{type(eval_data).__name__}{_data_hint(eval_data)}"
        )


def check_train_data(train_data: object) -> None:
    """Refuses training data that is not an iterable of batches."""
    if (
        train_data is None
        or isinstance(train_data, (str, bytes, os.PathLike, Mapping))
        or not isinstance(train_data, Iterable)
    ):
        raise ConfigError(
            f"train_data must be an iterable of batches (a recis-io Dataset, a DataLoader, a "
            f"list), got {type(train_data).__name__}{_data_hint(train_data)}"
        )


def _data_hint(data: object) -> str:
    if isinstance(data, (str, bytes, os.PathLike)):
        return " (a path: read its files with recis_io.Dataset(path, batch_size=...))"
    if isinstance(data, Mapping):
        return " (one batch: give a list of batches)"
    return ""


def _refuse_parameters_stepped_twice(
    model: nn.Module, dense: torch.optim.Optimizer | None, sparse: torch.optim.Optimizer | None
) -> None:
    """A parameter in both optimizers would be updated twice per step (e.g. a torch
    ``SGD(model.parameters())`` next to a sparse optimizer over an ``nn.Embedding``)."""
    if dense is None or sparse is None:
        return
    in_dense = {id(p) for g in dense.param_groups for p in g["params"]}
    both = {id(p) for g in sparse.param_groups for p in g["params"] if id(p) in in_dense}
    if both:
        names = [n for n, p in model.named_parameters() if id(p) in both]
        what = _first_names(names) if names else f"{len(both)} parameter(s) outside the model"
        raise ConfigError(
            f"parameters {what} are in both dense_optimizer and sparse_optimizer, which would "
            "update them twice per step; give each parameter to one optimizer (e.g. the dense "
            "optimizer over the parameters outside the embeddings)"
        )


def _check_output_path(output_dir: str) -> None:
    """An ``output_dir`` that is a file fails at the first checkpoint, after training."""
    path = Path(output_dir)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise ConfigError(
                    f"output_dir {output_dir!r} cannot be a directory: {str(part)!r} is a file"
                )
            return


def _warn_unstepped_parameters(
    model: nn.Module, dense: torch.optim.Optimizer | None, sparse: torch.optim.Optimizer | None
) -> None:
    """Parameters that take gradients but no optimizer of the trainer steps: they never learn.
    Legitimate at times (a part stepped by hand), easy to get by mistake (an optimizer built
    on one submodule), so the trainer says it once."""
    stepped = {
        id(p) for o in (dense, sparse) if o is not None for g in o.param_groups for p in g["params"]
    }
    left = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in stepped]
    if left:
        _log.warning(
            "parameters %s require gradients but no optimizer of the trainer steps them: they "
            "never learn; add them to dense_optimizer, or set requires_grad=False",
            _first_names(left),
        )
