"""The optimizer step of :class:`~recis_train.Trainer`: micro-batches in, one update out."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Generator, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import recis_kernels
from recis_train._arguments import TrainingArguments
from recis_train._data import DataStream, batch_rows, move_to
from recis_train._distributed import DistributedContext
from recis_train._outputs import StepOutput, parse_output
from recis_train.exceptions import ModelOutputError, NonFiniteLossError

_log = logging.getLogger("recis_train")


class StepMixin:
    """Takes the batches of a step, runs forward and backward, and steps the optimizers.

    A part of :class:`~recis_train.Trainer`, which sets the attributes declared here.
    """

    args: TrainingArguments
    model: nn.Module
    device: torch.device
    distributed: DistributedContext | None
    _ddp: DistributedDataParallel | None
    stream: DataStream
    dense_optimizer: torch.optim.Optimizer | None
    sparse_optimizer: torch.optim.Optimizer | None
    lr_schedulers: list[Any]
    global_step: int
    should_stop: bool
    history: dict[str, list[tuple[int, dict[str, float]]]]
    _cursor: dict[str, Any]
    _tables: list[Any] | None
    _scaler: torch.amp.GradScaler | None

    if TYPE_CHECKING:

        @property
        def rank(self) -> int: ...

        @property
        def world_size(self) -> int: ...

        def _autocast(self) -> contextlib.AbstractContextManager[Any]: ...

    def _batches(self) -> Generator[tuple[Any, dict[str, Any]], None, None]:
        """(batch on the device, cursor after it).

        The copy is ``non_blocking`` (from pinned memory the host goes on while it runs) and
        no batch is taken ahead: a batch taken one step early would start the next epoch's
        iteration, and so draw its order from the RNG, before the step that a checkpoint of
        the epoch's end records the RNG after (a resume would then draw another order); and
        on the compute stream an early copy overlaps nothing.
        """
        for batch in self.stream:
            yield move_to(batch, self.device), self.stream.state_dict()

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
        try:
            agreed, stopped = self.distributed.agree_step(
                len(micro),
                self.should_stop,
                error,
                f"reading the training data for step {self.global_step + 1}",
            )
        finally:
            del error  # see DistributedContext.fail_together
        if stopped:
            # A hook of one rank asked to stop: every rank stops, and their checkpoints (rank
            # 0 writes the trainer state) record the stop.
            self.should_stop = True
            return []
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
                kept = _task_rows(out, batch)
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
                # The logged values are read before backward, in one transfer: on a GPU a read
                # after it would wait for the whole backward pass.
                per_task = len(out.losses) > 1 or "loss" not in out.losses
                names = ["loss", *(f"loss/{task}" for task in losses)] if per_task else ["loss"]
                parts = [total, *losses.values()] if per_task else [total]
                read = torch.stack([v.detach().to(torch.float64) for v in parts]).tolist()
                # Gradients are summed over the ranks: dividing by the world size makes the
                # step that of the mean loss over every rank's rows.
                loss = total / (len(micro) * self.world_size)
                (self._scaler.scale(loss) if self._scaler else loss).backward()
            for key, value in zip(names, read, strict=True):
                totals[key] = totals.get(key, 0.0) + value / len(micro)
            samples += batch_rows(batch)
        self._optimizer_step()
        # The update is applied: count it before anything else can fail (a scheduler, the
        # logs), so that a later call never takes these batches again.
        self._cursor = micro[-1][1]
        self.stream.trained(self._cursor)
        self.global_step += 1
        for scheduler in self.lr_schedulers:
            scheduler.step()
        if self.distributed is not None:
            totals, samples = self.distributed.mean_logs(totals, samples)
        logs = {
            **totals,
            "lr": self._logged_lr(),
            "samples": float(samples),
            "step": float(self.global_step),
            "step_time": time.perf_counter() - started,
        }
        train = self.history["train"]
        train.append((self.global_step, logs))
        limit = self.args.history_size
        # The oldest logs go an eighth of the limit at a time, not one per step (each drop
        # moves the whole list).
        if limit is not None and len(train) > limit + limit // 8:
            del train[: len(train) - limit]
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
            try:
                raise index_error
            finally:
                del index_error  # see DistributedContext.fail_together
        if finite:
            raise NonFiniteLossError(
                f"loss is not finite (or an index was out of range) on rank(s) {bad} at step "
                f"{self.global_step + 1} (micro-batch {index + 1} of {count}); see the error of "
                "those ranks"
            )
        tasks = ", ".join(f"{k} {float(v.detach()):g}" for k, v in out.losses.items())
        where = f" on rank {self.rank}" if self.distributed is not None else ""
        raise NonFiniteLossError(
            f"loss is {float(out.loss.detach())}{where} at step {self.global_step + 1} ("
            f"{_position(cursor, self.stream.epochs)}, micro-batch {index + 1} of {count}; "
            f"counted from 1); task losses: {tasks}"
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

    def _logged_lr(self) -> float:
        """The dense optimizer's first group's rate; the sparse one's without a dense one."""
        optimizer = self.dense_optimizer
        if optimizer is None:
            optimizer = self.sparse_optimizer
        assert optimizer is not None  # the trainer refuses to be built without both
        return float(optimizer.param_groups[0]["lr"])

    def _optimizer_step(self) -> None:
        dense = self.dense_optimizer
        if dense is not None:
            # A sparse step refused for its hyperparameters (an LR scheduler took its rate to
            # 0) raises before the dense weights change: the step is not counted, and must
            # not leave them a step ahead of the tables and of the step count.
            sparse_check = getattr(self.sparse_optimizer, "check_step", None)
            if callable(sparse_check):
                sparse_check()
            self._dense_step(dense)
        if self.sparse_optimizer is not None:
            self.sparse_optimizer.step()
        self._warn_untrained_tables()
        self._zero_grad()

    def _dense_step(self, dense: torch.optim.Optimizer) -> None:
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

    def _zero_grad(self) -> None:
        if self.dense_optimizer is not None:
            self.dense_optimizer.zero_grad(set_to_none=True)
        if self.sparse_optimizer is not None:
            self.sparse_optimizer.zero_grad(set_to_none=True)
        # Lookups record the rows they touched on their table until an optimizer consumes them;
        # a table no sparse optimizer steps (none given, or a stage training other tables)
        # would keep every step's record, so drop what is left.
        for table in self._recording_tables():
            table.pending.clear()

    def _warn_untrained_tables(self) -> None:
        """Training lookups no sparse optimizer consumed (none given, or one over other
        tables): their tables take new ids and never learn. Legitimate at times, easy to get
        by mistake, so said once per trainer. Lookups a frozen stage runs record nothing."""
        if getattr(self, "_warned_untrained", False):
            return
        # A step marks each lookup it passed ``missed`` (done with); the others it never saw.
        names = sorted(
            {
                n
                for t in self._recording_tables()
                if any(not p.missed[0] for p in t.pending)
                for n in t.names
            }
        )
        if names:
            self._warned_untrained = True
            _log.warning(
                "embedding tables %s were looked up for training but no sparse_optimizer "
                "steps them: they take new ids and never learn; pass a sparse optimizer over "
                "them (e.g. SparseAdam(model)), or freeze them with "
                "EmbeddingOption(trainable=False)",
                names,
            )

    def _recording_tables(self) -> list[Any]:
        if self._tables is None:
            try:
                from recis_embedding import sparse_parameters
            except ImportError:  # a model without recis-embedding tables
                self._tables = []
            else:
                self._tables = sparse_parameters(self.model)
        return self._tables


def _task_rows(out: StepOutput, batch: Any) -> dict[str, int]:
    """Per-task losses with labels: task -> rows its loss is the mean over (the kept rows of
    a task that leaves rows out, see :class:`~recis_train.Task`). A single loss is the mean
    over its labels, else over the batch's rows."""
    if len(out.losses) == 1 and "loss" in out.losses:
        labels = next(iter(out.labels.values()), None)
        return {"loss": labels.numel() if labels is not None else batch_rows(batch)}
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


def _position(cursor: Mapping[str, Any], epochs: int) -> str:
    """Where the batch just taken lies: the trainer's epoch and batch, and for a reader that
    runs epochs of its own within the trainer's (a recis-io ``Dataset(epochs=n)``, whose state
    the cursor holds) the reader's epoch and the row of its shard the batch ended at."""
    where = f"epoch {cursor['epoch'] + 1} of {epochs}, batch {cursor['consumed']} of that epoch"
    reader = cursor.get("reader")
    if isinstance(reader, Mapping) and {"epoch", "row", "first_epoch"} <= reader.keys():
        epoch, first = int(reader["epoch"]), int(reader["first_epoch"])
        if epoch != first:
            where += (
                f"; the reader's own epoch {epoch - first + 1} of that pass, up to row "
                f"{reader['row']} of its shard"
            )
    return where
