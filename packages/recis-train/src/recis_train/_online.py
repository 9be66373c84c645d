"""``Online``: windowed streaming training (test on each new window, train on it, commit it)."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recis_train._arguments import TrainingArguments
from recis_train._distributed import DistributedContext
from recis_train._evaluation import MetricFactory
from recis_train._hooks import Hook
from recis_train._sparse import EmbeddingCheckpoint, default_sparse_checkpoint
from recis_train._trainer import Trainer
from recis_train._warmstart import reader_chain
from recis_train._windows import WatchDirectory, WindowSource, as_window
from recis_train.exceptions import CheckpointError, ConfigError, SourceNotFoundError

_log = logging.getLogger("recis_train")

#: builds the batches of one window from its files (called once per pass over the window)
DataFactory = Callable[[list[str]], Iterable[Any]]
_EXPORT_POINTER = "export.json"
#: where the tables are kept as they were before the first window, until a window is committed
_INITIAL_TABLES = ".online-initial"
# A watched directory has no new window yet: its decision is the seconds to wait (a float)
# before looking again, ``poll_interval`` or the time left before ``idle_timeout``.
_END = object()


@dataclasses.dataclass
class WindowResult:
    """What happened to one window.

    Attributes:
        index: the window's position among all windows trained (0 first), across restarts.
        files: the window's files as absolute paths, less those an earlier window already
            trained (a file is trained once).
        metrics: evaluation of the model on this window *before* training on it (``{}`` when
            skipped: the first window of an untrained model, see ``evaluate_untrained``).
        train: ``loss`` (mean over the window's steps), ``steps`` and ``samples``.
        step: the trainer's global step after the window.
        export: the directory of the window's embedding export (``None`` without tables).
        export_kind: ``"full"`` or ``"delta"``.
        export_rows: embedding rows in the export (all tables).
        export_bytes: bytes of the export's files.
        seconds: wall time of the window (evaluation, training, export, checkpoint).
    """

    index: int
    files: list[str]
    metrics: dict[str, float]
    train: dict[str, float]
    step: int
    export: str | None = None
    export_kind: str | None = None
    export_rows: int = 0
    export_bytes: int = 0
    seconds: float = 0.0


class _Progress(Hook):
    """The committed offsets: every finished window, kept in the trainer's checkpoints."""

    def __init__(self) -> None:
        self.windows: list[WindowResult] = []
        # The training figures of the window in training: summed here step by step, as the
        # trainer's history may hold fewer steps than a window (``history_size``).
        self.training: dict[str, float] | None = None

    def on_step_end(self, trainer: Trainer, logs: Mapping[str, float]) -> None:
        if self.training is not None:
            self.training["loss"] += logs["loss"]
            self.training["steps"] += 1.0
            self.training["samples"] += logs["samples"]

    def done_files(self) -> set[str]:
        return {f for w in self.windows for f in w.files}

    def state_dict(self) -> dict[str, Any]:
        return {"windows": [dataclasses.asdict(w) for w in self.windows]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.windows = [WindowResult(**w) for w in state.get("windows", [])]


class _ExportedTables:
    """The trainer's sparse checkpoint part: a pointer to the window's embedding export.

    Online writes every window's tables (in full or as a delta) to ``exports/``; the trainer's
    checkpoint names that export instead of storing the tables a second time, and a restore
    loads the export's chain of deltas.
    """

    def __init__(self, inner: EmbeddingCheckpoint, output_dir: Path) -> None:
        self.inner, self.output_dir = inner, output_dir
        self.current: Path | None = None

    def save(self, directory: Path, model: nn.Module, sparse_optimizer: Any) -> None:
        if self.current is None:
            raise CheckpointError("no embedding export to point the checkpoint at")
        ctx = DistributedContext.detect()
        if ctx is not None and not ctx.is_main:
            return  # every rank holds the same pointer; rank 0 writes it
        relative = os.path.relpath(self.current, self.output_dir)
        (directory / _EXPORT_POINTER).write_text(json.dumps({"export": relative}))

    def load(
        self, directory: Path, model: nn.Module, sparse_optimizer: Any, *, verified: bool = False
    ) -> None:
        """Load the export the checkpoint points at; ``verified``: :meth:`verify` has just
        checked its chain's files, so they are not hashed again."""
        pointer = directory / _EXPORT_POINTER
        if not pointer.is_file():
            raise CheckpointError(f"{directory} has no {_EXPORT_POINTER}: not an online checkpoint")
        export = self.output_dir / json.loads(pointer.read_text())["export"]
        import recis_embedding

        try:
            # The dense state comes from the checkpoint's dense part (the export holds it too,
            # for serving).
            recis_embedding.load(
                str(export), model, sparse_optimizer, verify=not verified, dense=False
            )
        except recis_embedding.CheckpointError as err:
            raise CheckpointError(f"loading the embedding export {export} failed: {err}") from err
        self.current = export

    def verify(self, directory: Path) -> list[str]:
        """What is wrong with the export a checkpoint points at and the parents its deltas
        build on (their SHA-256 checksums), checked before a restore loads anything."""
        pointer = directory / _EXPORT_POINTER
        try:
            export = self.output_dir / json.loads(pointer.read_text())["export"]
            reader_chain(export, "embedding export")
        except (OSError, ValueError, KeyError, CheckpointError) as err:
            return [f"sparse/{_EXPORT_POINTER} ({err})"]
        return []

    def filter_dense(self, state: Mapping[str, Any]) -> dict[str, Any]:
        return self.inner.filter_dense(state)


@dataclasses.dataclass
class _InitialState:
    """The state before the first window, to go back to while no window is committed.

    Attributes:
        trainer: the trainer part of a checkpoint (optimizers, schedulers, RNG, step, cursor,
            hooks and the committed offsets), deep-copied.
        dense: the dense parameters and buffers, cloned.
        tables: where the embedding tables were saved (``None``: the model has none).
        export: the export the checkpoints pointed at then.
        restored: whether the trainer had been restored from a checkpoint.
        last_saved_key: what the trainer's last checkpoint written or restored held (see
            ``Trainer._saved_current``).
    """

    trainer: dict[str, Any]
    dense: dict[str, torch.Tensor]
    tables: Path | None
    export: Path | None
    restored: bool
    last_saved_key: tuple[int, bool, int] | None


def _reporting_errors(
    decisions: Iterator[list[str] | float], ctx: DistributedContext
) -> Iterator[list[str] | float]:
    """Rank 0's decisions; an error reading the source is sent to the other ranks (which raise
    it too) before it is raised here, so that no rank is left waiting for a decision."""
    while True:
        try:
            decision = next(decisions)
        except StopIteration:
            return
        except Exception as err:
            ctx.broadcast((type(err).__name__, str(err)))
            raise
        yield decision


def _check_args(args: TrainingArguments) -> TrainingArguments:
    """The trainer's arguments: Online alone decides when to save, evaluate and restore."""
    if args.train_steps is not None:
        raise ConfigError(
            f"Online trains each window to its end; train_steps must be None, got {args.train_steps}"
        )
    for name in ("save_every", "eval_every"):
        if getattr(args, name):
            raise ConfigError(
                f"Online saves and evaluates once per window; {name} must be 0, "
                f"got {getattr(args, name)}"
            )
    return dataclasses.replace(args, resume=False, save_at_end=False)


class Online:
    """Trains one model on a stream of windows of new files, committing each one.

    Per window, in order:

    1. **evaluate** the current model on the window (prequential "test, then train": the
       metrics measure the model on data it has not seen yet). The first window of a run that
       has not trained yet is not evaluated, since an untrained model's metrics say nothing;
       ``evaluate_untrained=True`` evaluates it too (e.g. a model warm-started from a batch run);
    2. **train** on it, ``args.epochs`` passes;
    3. **export** the embedding tables to ``output_dir/exports/window-<index>``: in full for the
       first window (and every ``full_every`` windows), else a delta of the rows changed by this
       window (``recis_embedding.save(..., delta=True)``), whose parent is the previous export;
       ``recis_embedding.load`` of any export rebuilds the tables as they were after its window;
    4. **checkpoint** (``output_dir/checkpoints``): dense weights, optimizer and RNG state, and
       the committed offsets (every finished window's files and results). The checkpoint points
       at the window's export rather than storing the tables again.

    Rerunning after a crash restores the latest checkpoint (with ``args.resume``, the default)
    and continues with the first window not committed; a window interrupted half way is trained
    again from the state before it, with the same result an uninterrupted run would have had.
    A file is trained at most once (paths are compared made absolute): windows whose files are
    all committed are skipped, and committed files are dropped from a window that mixes old and
    new ones. A hook asking to stop (e.g. :class:`EarlyStopping`) ends the stream; a window it
    stopped during training is not committed (a later :meth:`run` trains it in full). A later
    :meth:`run` starts from the last committed state, so a stop decided on a window's
    evaluation (EarlyStopping's) is decided again: the stream stays ended.

    The same holds for calling :meth:`run` again on the same object after it raised inside a
    window (e.g. reading a corrupt file, which was then fixed or removed): the model, the
    tables, both optimizers, the LR schedulers, the RNG and the offsets first go back to the
    last committed window (its checkpoint), or to their state before the first window when no
    window was committed, so the retry ends as a run that never saw the failure.

    Under ``torchrun`` every rank builds and runs the same ``Online`` (tables sharded as for
    :class:`Trainer`): rank 0 alone reads ``source`` and sends each rank the next window, and
    ``make_data`` returns this rank's share of a window's files (``recis_io.Dataset`` shards by
    rank on its own).

    Args:
        model: the model (returns a loss or a dict, as for :class:`Trainer`).
        args: training arguments; ``train_steps``, ``save_every`` and ``eval_every`` must be
            unset (Online decides those per window), ``eval_steps`` caps each evaluation.
        source: the windows: a :class:`WatchDirectory` (or a directory path, watched with its
            defaults), or an iterable whose items are each a path or a sequence of paths.
        make_data: ``make_data(paths)`` returns an iterable of batches of those files (e.g. a
            ``recis_io.Dataset``); called once for the evaluation and once for training.
        dense_optimizer: a torch optimizer over the dense parameters, or ``None`` when only
            embedding tables train (as for :class:`Trainer`).
        sparse_optimizer: an optimizer over embedding tables.
        lr_schedulers: torch LR schedulers, stepped once per optimizer step.
        hooks: :class:`Hook` objects for the trainer.
        metrics: metric factories for the evaluations (as for :class:`Trainer`).
        max_windows: stop once this many windows are committed (counting those before a
            restart); ``None``: until the source ends.
        full_every: export the tables in full every this many windows (``None``: only the
            first), bounding the delta chain a load walks.
        evaluate_untrained: evaluate the first window even though the model has not trained.
        on_window: called with each window's :class:`WindowResult` once it is committed.

    Example:
        ```python
        online = Online(model, TrainingArguments(output_dir="online"),
                        WatchDirectory("/data/clicks", marker="_SUCCESS", poll_interval=60),
                        lambda paths: recis_io.Dataset(paths, batch_size=4096),
                        dense_optimizer=torch.optim.Adam(dense_params),
                        sparse_optimizer=recis_embedding.SparseAdam(model))
        for window in online.run():
            print(window.index, window.metrics.get("auc"), window.export)
        ```
    """

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments,
        source: WatchDirectory | str | os.PathLike[str] | WindowSource,
        make_data: DataFactory,
        *,
        dense_optimizer: torch.optim.Optimizer | None,
        sparse_optimizer: torch.optim.Optimizer | None = None,
        lr_schedulers: Sequence[Any] = (),
        hooks: Sequence[Hook] = (),
        metrics: Mapping[str, MetricFactory] | None = None,
        max_windows: int | None = None,
        full_every: int | None = None,
        evaluate_untrained: bool = False,
        on_window: Callable[[WindowResult], None] | None = None,
    ) -> None:
        if isinstance(source, (str, os.PathLike)):
            source = WatchDirectory(source)
        if isinstance(source, WatchDirectory):
            source.ready()  # a missing directory fails now, not at the first poll
        elif not isinstance(source, Iterable):
            raise ConfigError(
                f"source must be a WatchDirectory, a directory or an iterable of windows, "
                f"got {type(source).__name__}"
            )
        if not callable(make_data):
            raise ConfigError(f"make_data must be callable, got {type(make_data).__name__}")
        for name, value in (("max_windows", max_windows), ("full_every", full_every)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1 or None, got {value}")
        self.source, self.make_data = source, make_data
        self.max_windows, self.full_every = max_windows, full_every
        self.evaluate_untrained, self.on_window = evaluate_untrained, on_window
        self.output_dir = Path(args.output_dir)
        self.progress = _Progress()
        inner = default_sparse_checkpoint(model)
        self.tables = (
            _ExportedTables(inner, self.output_dir)
            if isinstance(inner, EmbeddingCheckpoint)
            else None
        )
        self.trainer = Trainer(
            model,
            _check_args(args),
            train_data=[],
            dense_optimizer=dense_optimizer,
            sparse_optimizer=sparse_optimizer,
            lr_schedulers=lr_schedulers,
            hooks=[self.progress, *hooks],
            metrics=metrics,
            sparse_checkpoint=self.tables,
        )
        self.resume = args.resume
        self.epochs = args.epochs
        #: the checkpoint of the last window committed (or restored), what a retry goes back to
        self._committed: Path | None = None
        #: the state before the first window, while no window is committed
        self._initial: _InitialState | None = None
        #: a window began and was not committed (its run raised): roll back before going on
        self._uncommitted = False
        #: the source's items, read across run() calls: an item is read from the source once,
        #: so a one-shot iterator (a generator) loses none when a run raises
        self._items: Iterator[Any] | None = None
        self._position = 0
        #: the window last read from an iterable source and not committed yet (a retry trains it)
        self._pulled: list[str] | None = None
        #: a hook asked to stop (e.g. EarlyStopping): the stream ends
        self._stopped = False

    @property
    def results(self) -> list[WindowResult]:
        """Every committed window's result, oldest first (restored ones included)."""
        return list(self.progress.windows)

    def run(self) -> list[WindowResult]:
        """Process windows until the source ends, ``max_windows``, or the idle timeout.

        Returns:
            Every committed window's :class:`WindowResult`, including those committed before a
            restart.

        A call after one that raised inside a window first restores the last committed state
        (see the class description).

        Raises:
            ConfigError: a source item is not a path or a non-empty sequence of paths,
                ``make_data`` returned something that is not iterable, or (with
                ``args.resume=False``) ``output_dir`` holds checkpoints of another run.
            SourceNotFoundError: the watched directory does not exist (any more).
        """
        restored = None
        if self.resume:
            restored = self.trainer.restore(missing_ok=True)
            if restored is not None:
                self._committed = restored
                _log.info(
                    "online: resuming after %d committed window(s) (%s)",
                    len(self.progress.windows),
                    restored,
                )
        else:
            # A new stream (resume=False) is refused before its first window in an output_dir
            # holding another run's checkpoints, which its own would mix with and rotate away.
            self.trainer._check_output_dir()
        if self._uncommitted and restored is None:
            self._roll_back()
        self._uncommitted = False
        self._stopped = False
        for files in self._windows():
            self._process(files)
            if self._stopped:
                break
        return self.results

    def _finished(self) -> bool:
        return self._stopped or (
            self.max_windows is not None and len(self.progress.windows) >= self.max_windows
        )

    def _windows(self) -> Iterator[list[str]]:
        """New windows, with committed files left out, read lazily so commits are seen.

        Under ``torchrun`` rank 0 alone reads the source and sends every rank each decision (a
        window, "nothing new yet" or "no more windows"), one per poll, so that all ranks train
        the same windows and none waits inside a collective for longer than a poll.
        """
        ctx = self.trainer.distributed
        if ctx is None:
            decisions = self._decisions()
        elif ctx.is_main:
            decisions = _reporting_errors(self._decisions(), ctx)
        else:
            decisions = iter(())
        while True:
            decision = next(decisions, None)
            if ctx is not None:
                decision = ctx.broadcast(decision)
                if isinstance(decision, tuple):  # rank 0 failed to read the source
                    kind, message = decision
                    error = {"ConfigError": ConfigError, "SourceNotFoundError": SourceNotFoundError}
                    raise error.get(kind, RuntimeError)(f"on rank 0: {message}")
            if decision is None:
                return
            if isinstance(decision, float):
                time.sleep(decision)
                continue
            yield list(decision)

    def _decisions(self) -> Iterator[list[str] | float]:
        """The next window, or the seconds to wait when a watched directory has nothing new
        yet."""
        if isinstance(self.source, WatchDirectory):
            yield from self._watch(self.source)
            return
        if self._items is None:
            self._items = iter(self.source)
        # Checked before reading the next item: a stream that is done reads no more (a live
        # feed would block), and every item read is trained before another is read.
        while not self._finished():
            if self._pulled is None:
                item = next(self._items, _END)
                if item is _END:
                    # A source that can be iterated again (a list) is read from its start by the
                    # next run(), with committed files skipped as always.
                    self._items = None
                    return
                position, self._position = self._position, self._position + 1
                self._pulled = as_window(item, position)
            done = self.progress.done_files()
            files = [f for f in self._pulled if f not in done]
            if files:
                yield files
            # Resumed: the window was committed (a run that raised never resumes this).
            self._pulled = None

    def _watch(self, source: WatchDirectory) -> Iterator[list[str] | float]:
        idle_since = time.monotonic()
        while not self._finished():
            done = self.progress.done_files()
            pending = [w for w in source.ready() if any(f not in done for f in w)]
            if pending:
                yield [f for f in pending[0] if f not in done]
                idle_since = time.monotonic()
                continue
            idle = time.monotonic() - idle_since
            wait = float(source.poll_interval)
            if source.idle_timeout is not None:
                if idle >= source.idle_timeout:
                    return
                # The last look comes when the timeout is up, not a whole interval after it.
                wait = min(wait, source.idle_timeout - idle)
            yield wait

    def _data(self, files: list[str], purpose: str) -> Iterable[Any]:
        """``make_data(files)``; under ``torchrun`` the ranks learn whether it failed on any of
        them (a file one rank cannot open), so that every rank raises instead of the others
        waiting for it in the evaluation or training that follows."""
        error: Exception | None = None
        data: Any = None
        try:
            data = self.make_data(list(files))
            if not isinstance(data, Iterable):
                raise ConfigError(
                    f"make_data({files}) returned {type(data).__name__}, expected an iterable "
                    "of batches"
                )
        except Exception as err:
            error = err
        ctx = self.trainer.distributed
        try:
            if ctx is not None:
                ctx.agree_count(
                    0, error, f"make_data of window {len(self.progress.windows)} ({purpose})"
                )
            if error is not None:
                raise error
        finally:
            del error  # see DistributedContext.fail_together
        return data

    def _keep_initial_state(self) -> None:
        """Keep the state before the first window (nothing committed yet) for a retry."""
        trainer = self.trainer
        tables = None
        if self.tables is not None:
            import recis_embedding

            tables = self.output_dir / _INITIAL_TABLES
            # The dense state is kept in memory (``dense`` below).
            recis_embedding.save(str(tables), trainer.model, trainer.sparse_optimizer, dense=False)  # type: ignore[arg-type]
        self._initial = _InitialState(
            trainer=copy.deepcopy(trainer._trainer_state()),
            dense={k: v.detach().clone() for k, v in trainer._dense_state().items()},
            tables=tables,
            export=self.tables.current if self.tables is not None else None,
            restored=trainer._restored,
            last_saved_key=trainer._last_saved_key,
        )

    def _drop_initial_state(self) -> None:
        """A window is committed: its checkpoint is what a retry goes back to from now on."""
        initial, self._initial = self._initial, None
        if initial is None or initial.tables is None:
            return
        ctx = self.trainer.distributed
        if ctx is None or ctx.is_main:
            shutil.rmtree(initial.tables, ignore_errors=True)

    def _roll_back(self) -> None:
        """Back to the last committed window, or to the state before the first window."""
        trainer = self.trainer
        if self._committed is not None:
            _log.info("online: going back to the last committed window (%s)", self._committed)
            trainer.restore(self._committed)
            return
        initial = self._initial
        if initial is None:
            return  # the failure came before the first window changed anything
        _log.info("online: going back to the state before the first window")
        if initial.tables is not None:
            import recis_embedding

            recis_embedding.load(str(initial.tables), trainer.model, trainer.sparse_optimizer)  # type: ignore[arg-type]
        where = self.output_dir / _INITIAL_TABLES
        trainer._load_dense(initial.dense, where)
        trainer._load_trainer(copy.deepcopy(initial.trainer), where)
        trainer._restored = initial.restored
        trainer._last_saved_key = initial.last_saved_key
        if self.tables is not None:
            self.tables.current = initial.export
        trainer._zero_grad()

    def _process(self, files: list[str]) -> None:
        if self._committed is None and self._initial is None:
            self._keep_initial_state()
        self._uncommitted = True
        started = time.perf_counter()
        trainer, index = self.trainer, len(self.progress.windows)
        metrics: dict[str, float] = {}
        # A stop asked for before (the run() that ended the stream) is spent: only this
        # window's evaluation or training can end the stream now.
        trainer.should_stop = False
        if trainer.global_step > 0 or self.evaluate_untrained:
            metrics = trainer.evaluate(self._data(files, "evaluation"))
            if trainer.should_stop:
                # A hook asked to stop on this window's evaluation (EarlyStopping): the stream
                # ends before training on it; the window is not committed.
                self._stop(index, "its evaluation")
                return
        self.progress.training = {"loss": 0.0, "steps": 0.0, "samples": 0.0}
        trainer.set_train_data(self._data(files, "training"), epochs=self.epochs)
        try:
            trainer.train()
        finally:
            sums, self.progress.training = self.progress.training, None
        if trainer.should_stop:
            # Stopped part way through the window: committing it would skip the rest of its
            # data for good. The stream ends with the window uncommitted; a later run() (or a
            # restart) goes back to the last committed state and trains the window in full.
            self._stop(index, f"training at step {trainer.global_step}")
            return
        steps = sums["steps"]
        result = WindowResult(
            index=index,
            files=list(files),
            metrics=metrics,
            train={
                "loss": sums["loss"] / steps if steps else float("nan"),
                "steps": steps,
                "samples": sums["samples"],
            },
            step=trainer.global_step,
        )
        if self.tables is not None:
            self._export(self.tables, result)
        result.seconds = time.perf_counter() - started
        self.progress.windows.append(result)
        try:
            self._committed = trainer.save()
        except BaseException:
            self.progress.windows.pop()  # not committed: the window is trained again
            raise
        self._uncommitted = False
        self._drop_initial_state()
        if trainer.distributed is None or trainer.distributed.is_main:
            _log.info("online: window %d committed (%s)", index, ", ".join(files))
        if self.on_window is not None:
            self.on_window(result)

    def _stop(self, index: int, where: str) -> None:
        self._stopped = True
        if self.trainer.distributed is None or self.trainer.distributed.is_main:
            _log.warning(
                "online: a hook asked to stop during %s of window %d; the stream ends with "
                "that window not committed (a later run() goes back to the last committed "
                "state and evaluates, then trains, it again; a hook that stopped on the same "
                "evaluation, as EarlyStopping does, stops there again)",
                where,
                index,
            )

    def _export(self, tables: _ExportedTables, result: WindowResult) -> None:
        import recis_embedding

        path = self.output_dir / "exports" / f"window-{result.index:06d}"
        full = tables.current is None or (
            self.full_every is not None and result.index % self.full_every == 0
        )
        # Any optimizer's hyperparameters are saved; recis-embedding's keep the row state in the tables.
        sparse_optimizer: Any = self.trainer.sparse_optimizer
        recis_embedding.save(str(path), self.trainer.model, sparse_optimizer, delta=not full)
        tables.current = path
        manifest = recis_embedding.CheckpointReader(path, verify=False).manifest
        result.export = str(path)
        result.export_kind = "full" if full else "delta"
        result.export_rows = sum(int(t["rows"]) for t in manifest["tables"].values())
        result.export_bytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
