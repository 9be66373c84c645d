"""Hooks: code that runs at fixed points of the training loop (logging, early stop, stats)."""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any

from recis_train.exceptions import ConfigError

if TYPE_CHECKING:
    from recis_train._trainer import Trainer


class Hook:
    """Base class of hooks; override any subset of the methods.

    Hooks run in the order given to the :class:`~recis_train.Trainer`. ``logs`` passed to
    :meth:`on_step_end` holds ``loss`` (the step's weighted total), one ``loss/<task>`` per task,
    ``lr`` (the dense optimizer's first group's learning rate once the step's LR schedulers
    stepped: the rate of the next step), ``samples`` (rows in the step), ``step`` and ``step_time`` (seconds, from taking the
    first micro-batch's output to the end of the optimizer step).

    Checkpoints keep each hook's :meth:`state_dict` under the hook's :attr:`state_key`, not its
    position, so a resumed run may add, drop or reorder stateless hooks. A checkpoint whose hook
    state no hook of the resumed trainer takes (or whose state a hook rejects) cannot be resumed:
    :class:`~recis_train.exceptions.CheckpointError` names the hook.
    """

    @property
    def state_key(self) -> str:
        """The name this hook's state is kept under in checkpoints (default: the class name).

        Hooks of one class in one trainer get ``#2``, ``#3``, … appended in order; override it
        when two hooks of one class keep different state (as :class:`EarlyStopping` does).
        """
        return type(self).__qualname__

    def on_train_begin(self, trainer: Trainer) -> None:
        """Before the first step (after a restore)."""

    def on_step_begin(self, trainer: Trainer) -> None:
        """Before each optimizer step takes its first batch (``trainer.global_step`` is still
        the previous step's). Not called once the run is asked to stop; a step the data turns
        out too short for, or that another rank's stop ends, does not follow."""

    def on_step_end(self, trainer: Trainer, logs: Mapping[str, float]) -> None:
        """After every optimizer step."""

    def on_evaluate(self, trainer: Trainer, metrics: Mapping[str, float]) -> None:
        """After every evaluation, with its results."""

    def on_save(self, trainer: Trainer, path: str) -> None:
        """After a checkpoint was written to ``path``."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last step."""

    def state_dict(self) -> dict[str, Any]:
        """State to keep in checkpoints (hooks that count or remember override this)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def hook_keys(hooks: Sequence[Hook]) -> list[str]:
    """Each hook's checkpoint key: its :attr:`Hook.state_key`, ``#<n>`` added to repeats."""
    keys: list[str] = []
    seen: dict[str, int] = {}
    for hook in hooks:
        key = getattr(hook, "state_key", None) or type(hook).__qualname__
        seen[key] = seen.get(key, 0) + 1
        keys.append(key if seen[key] == 1 else f"{key}#{seen[key]}")
    return keys


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _count(hook: str, name: str, value: Any, least: int) -> int:
    """``value`` as an int of at least ``least`` (a NumPy integer counts), else a
    :class:`ConfigError` naming the hook and the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ConfigError(f"{hook}: {name} must be an int of at least {least}, got {value!r}")
    return int(value)


class LoggingHook(Hook):
    """Progress with loss, learning rate, samples/s and ETA.

    On an interactive terminal it redraws one progress line; otherwise (files, CI logs) it
    prints a plain line every ``every`` steps. Evaluation results always get their own line.

    ``samples/s`` is the training rate since the last line: the time the trainer spent
    evaluating or writing checkpoints in between is left out, so a line after an evaluation
    does not drop. The ETA is the wall-clock time of this ``train()`` call so far per step,
    evaluations and checkpoints included (they recur), times the steps left.

    Args:
        every: steps between lines, at least 1 (default: the trainer's ``log_every``).
        stream: where to write (default ``sys.stderr``).
    """

    def __init__(self, every: int | None = None, *, stream: IO[str] | None = None) -> None:
        if every is not None and (
            isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1
        ):
            raise ConfigError(
                f"LoggingHook: every must be an int of at least 1 or None, got {every!r}"
            )
        self.every = every
        self.stream = stream
        self._window_start = 0.0
        self._window_samples = 0
        # Seconds of the window spent evaluating or saving, and when (and at which global
        # step) this hook last saw a step, an evaluation or a save end: the trainer evaluates
        # and saves right after a step's hooks.
        self._paused = 0.0
        self._mark = 0.0
        self._mark_step = -1
        self._run_start = 0.0
        self._run_steps = 0

    @property
    def _out(self) -> IO[str]:
        return self.stream if self.stream is not None else sys.stderr

    def _interactive(self) -> bool:
        isatty = getattr(self._out, "isatty", None)
        return bool(isatty and isatty())

    def on_train_begin(self, trainer: Trainer) -> None:
        now = time.perf_counter()
        self._window_start = self._mark = self._run_start = now
        self._mark_step = trainer.global_step
        self._window_samples = 0
        self._paused = 0.0
        self._run_steps = 0

    def _pause_ended(self, trainer: Trainer) -> None:
        """An evaluation or a save, which began when this step's hooks (or the other) ended.

        One that ran before this hook saw the step (a hook earlier in the list evaluating) is
        counted as training time: it began at an unknown point of the step.
        """
        now = time.perf_counter()
        if trainer.global_step == self._mark_step:
            self._paused += now - self._mark
        self._mark = now

    def on_step_end(self, trainer: Trainer, logs: Mapping[str, float]) -> None:
        now = self._mark = time.perf_counter()
        self._mark_step = trainer.global_step
        self._window_samples += int(logs.get("samples", 0))
        self._run_steps += 1
        every = self.every or trainer.args.log_every
        step = trainer.global_step
        if step % every and not self._interactive():
            return
        rate = self._window_samples / max(now - self._window_start - self._paused, 1e-9)
        total = trainer.total_steps
        line = f"step {step}" + (f"/{total}" if total else "")
        line += f" loss {logs['loss']:.5f}"
        tasks = [f"{k.split('/', 1)[1]} {v:.4f}" for k, v in logs.items() if k.startswith("loss/")]
        if tasks:
            line += " (" + ", ".join(tasks) + ")"
        line += f" lr {logs['lr']:.3g} samples/s {rate:,.0f}"
        if total and step % every == 0:
            per_step = (now - self._run_start) / self._run_steps
            line += f" eta {_duration(max(total - step, 0) * per_step)}"
        if self._interactive():
            self._out.write("\r" + line.ljust(100))
        else:
            self._out.write(line + "\n")
        self._out.flush()
        if step % every == 0:
            self._window_start, self._window_samples, self._paused = now, 0, 0.0

    def on_evaluate(self, trainer: Trainer, metrics: Mapping[str, float]) -> None:
        self._pause_ended(trainer)
        text = " ".join(f"{k} {v:.5f}" for k, v in metrics.items())
        prefix = "\n" if self._interactive() else ""
        self._out.write(f"{prefix}eval at step {trainer.global_step}: {text}\n")
        self._out.flush()

    def on_save(self, trainer: Trainer, path: str) -> None:
        self._pause_ended(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        if self._interactive():
            self._out.write("\n")
            self._out.flush()


class EarlyStopping(Hook):
    """Stop training when an evaluation metric stops improving.

    Args:
        monitor: the key of :meth:`Trainer.evaluate`'s result to watch (e.g. ``"auc"``,
            ``"click/auc"``, ``"loss"``).
        mode: ``"max"`` (higher is better) or ``"min"``.
        patience: evaluations without improvement tolerated before stopping.
        min_delta: smallest change that counts as an improvement (0 or more, finite).

    A NaN result (e.g. the AUC of an evaluation slice with one class) counts as no improvement
    and never becomes the best value; the first finite result does. A fresh run (a trainer that
    has neither trained nor evaluated yet, e.g. the next stage of a
    :class:`~recis_train.MultiStage` run sharing this hook) starts with a clean state; a resumed
    run continues with the state of its checkpoint.
    """

    def __init__(
        self, monitor: str, *, mode: str = "max", patience: int = 2, min_delta: float = 0.0
    ):
        if not isinstance(monitor, str):
            raise ConfigError(
                f"EarlyStopping: monitor must be a result key such as 'auc', got {monitor!r}"
            )
        if mode not in ("max", "min"):
            raise ConfigError(f"EarlyStopping: mode must be 'max' or 'min', got {mode!r}")
        patience = _count("EarlyStopping", "patience", patience, 1)
        if (
            isinstance(min_delta, bool)
            or not isinstance(min_delta, (int, float))
            or not 0 <= min_delta < math.inf
        ):
            raise ConfigError(
                f"EarlyStopping: min_delta must be 0 or more and finite (a number), got "
                f"{min_delta!r}"
            )
        self.monitor: str = monitor
        self.mode: str = mode
        self.patience: int = patience
        self.min_delta: float = float(min_delta)
        self.best: float | None = None
        self.bad_evaluations = 0
        self.stopped_at: int | None = None

    def on_evaluate(self, trainer: Trainer, metrics: Mapping[str, float]) -> None:
        if not metrics:
            return  # an evaluation over no batch (e.g. an empty Online window) judges nothing
        if self.monitor not in metrics:
            raise ConfigError(
                f"EarlyStopping: metric {self.monitor!r} not in evaluation results {sorted(metrics)}"
            )
        value = metrics[self.monitor]
        sign = 1.0 if self.mode == "max" else -1.0
        improved = not math.isnan(value) and (
            self.best is None or sign * (value - self.best) > self.min_delta
        )
        if improved:
            self.best, self.bad_evaluations = value, 0
            return
        self.bad_evaluations += 1
        if self.bad_evaluations >= self.patience:
            self.stopped_at = trainer.global_step
            trainer.should_stop = True

    @property
    def state_key(self) -> str:
        """``EarlyStopping(<monitor>)``: the state of one metric never loads into another's."""
        return f"EarlyStopping({self.monitor})"

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "bad_evaluations": self.bad_evaluations,
            "stopped_at": self.stopped_at,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state.get("best")
        self.bad_evaluations = int(state.get("bad_evaluations", 0))
        self.stopped_at = state.get("stopped_at")

    def on_train_begin(self, trainer: Trainer) -> None:
        # A fresh trainer (e.g. the next stage of a MultiStage run sharing this hook) starts
        # watching anew; a resumed one has loaded this hook's state from its checkpoint.
        if trainer.global_step == 0 and not trainer.history["eval"]:
            self.best, self.bad_evaluations, self.stopped_at = None, 0, None


def find_tables(model: Any) -> dict[str, Any]:
    """Objects in ``model`` that report table statistics through a ``stats()`` method.

    Duck-typed so any embedding implementation can take part: a submodule with a callable
    ``stats``, the values of a submodule's ``tables`` dict, or the entries of a submodule's
    ``physical`` list (recis-embedding's fused tables, named by their logical tables).
    """
    found: dict[str, Any] = {}
    for name, module in model.named_modules():
        candidates: list[tuple[str, Any]] = [(name, module)]
        tables = getattr(module, "tables", None)
        if isinstance(tables, Mapping):
            candidates += [(f"{name}.{k}" if name else str(k), v) for k, v in tables.items()]
        for table in getattr(module, "physical", None) or ():
            label = "+".join(getattr(table, "names", ())) or f"table{len(found)}"
            candidates.append((f"{name}.{label}" if name else label, table))
        for label, obj in candidates:
            if callable(getattr(obj, "stats", None)) and label not in found:
                found[label or type(obj).__name__] = obj
    return found


def _numbers(raw: Any) -> dict[str, float]:
    if dataclasses.is_dataclass(raw) and not isinstance(raw, type):
        raw = dataclasses.asdict(raw)
    elif not isinstance(raw, Mapping):
        raw = vars(raw)
    return {k: float(v) for k, v in raw.items() if isinstance(v, (int, float))}


class TableStatsHook(Hook):
    """Logs embedding-table statistics (size, growth, hit rate, evictions) every N steps.

    Any object found by :func:`find_tables` is reported; the snapshots are kept in
    :attr:`history` as ``(step, {table: stats})`` for reports and plots, every one of them
    unless ``keep`` bounds them (a snapshot of 1,000 tables holds about 0.5 MB). The counters
    (lookups, inserts, hits, evictions) are the tables' own since this process built them:
    checkpoints do not keep them, so after a restore they count from 0 again.

    Args:
        every: steps between snapshots.
        stream: where to write lines (``None``: keep snapshots without printing).
        tables: a function returning ``{name: table}`` (default: :func:`find_tables` of the model).
        keep: how many of the latest snapshots :attr:`history` keeps (``None``: all).
    """

    def __init__(
        self,
        every: int = 100,
        *,
        stream: IO[str] | None = None,
        tables: Callable[[], Mapping[str, Any]] | None = None,
        keep: int | None = None,
    ) -> None:
        every = _count("TableStatsHook", "every", every, 1)
        if keep is not None:
            keep = _count("TableStatsHook", "keep", keep, 1)
        self.every, self.stream, self._tables, self.keep = every, stream, tables, keep
        self.history: list[tuple[int, dict[str, dict[str, float]]]] = []

    def snapshot(self, trainer: Trainer) -> dict[str, dict[str, float]]:
        tables = self._tables() if self._tables else find_tables(trainer.model)
        stats = {}
        for name, table in tables.items():
            stats[name] = _numbers(table.stats())
        return stats

    def on_step_end(self, trainer: Trainer, logs: Mapping[str, float]) -> None:
        if trainer.global_step % self.every:
            return
        stats = self.snapshot(trainer)
        previous = self.history[-1][1] if self.history else {}
        self.history.append((trainer.global_step, stats))
        if self.keep is not None and len(self.history) > self.keep:
            del self.history[: len(self.history) - self.keep]
        if self.stream is None:
            return
        for name, values in stats.items():
            parts = [f"{k} {v:g}" for k, v in values.items()]
            rows = values.get("rows", values.get("size"))
            before = previous.get(name, {}).get("rows", previous.get(name, {}).get("size"))
            if rows is not None and before is not None:
                parts.append(f"growth {rows - before:+g}")
            lookups, hits = values.get("lookups"), values.get("hits")
            if lookups:
                parts.append(f"hit_rate {(hits or 0) / lookups:.3f}")
            self.stream.write(f"table {name} at step {trainer.global_step}: {' '.join(parts)}\n")
        self.stream.flush()


class ProfilerHook(Hook):
    """Profiles a window of steps with ``torch.profiler`` and writes a Chrome/Perfetto trace.

    Steps ``[start, start + steps)`` are recorded (CPU, and CUDA when available); the trace is
    written to ``output_dir/trace-step<start>.json`` (open it in ``chrome://tracing`` or
    https://ui.perfetto.dev), and :attr:`table` keeps the top operators by self time. In a
    distributed run every rank profiles its own steps and writes
    ``trace-step<start>-rank<r>.json``. A ``train()`` ending inside the window writes the steps
    recorded so far (in :class:`Online`, every window is a ``train()``: a trace ends with it).

    Args:
        output_dir: where the trace goes.
        start: first profiled step (after warm-up steps, so lazy setup is not measured).
        steps: profiled steps.
        row_limit: operators kept in :attr:`table`.
    """

    def __init__(self, output_dir: str, *, start: int = 5, steps: int = 3, row_limit: int = 15):
        self.start = _count("ProfilerHook", "start", start, 1)
        self.steps = _count("ProfilerHook", "steps", steps, 1)
        self.row_limit = _count("ProfilerHook", "row_limit", row_limit, 1)
        self.output_dir = output_dir
        self.trace_path: str | None = None
        self.table = ""
        self._profiler: Any = None
        self._profiled = 0  # steps recorded by the open profiler

    def on_step_begin(self, trainer: Trainer) -> None:
        # The window opens as step `start` begins: the evaluation and checkpoint of the step
        # before it, which run after that step's hooks, stay out of it.
        import torch.profiler as tp

        if trainer.global_step != self.start - 1 or self._profiler is not None:
            return
        activities = [tp.ProfilerActivity.CPU]
        if trainer.device.type == "cuda":
            activities.append(tp.ProfilerActivity.CUDA)
        self._profiler = tp.profile(activities=activities, record_shapes=False)
        self._profiler.__enter__()
        self._profiled = 0

    def on_step_end(self, trainer: Trainer, logs: Mapping[str, float]) -> None:
        if self._profiler is None:
            return
        self._profiled += 1
        if trainer.global_step == self.start + self.steps - 1:
            self._finish(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        if self._profiler is None:
            return
        if self._profiled:
            self._finish(trainer)  # training ended inside the window: keep what was recorded
        else:
            # The data ended before step `start`: no trace of a step to write.
            profiler, self._profiler = self._profiler, None
            profiler.__exit__(None, None, None)

    def _finish(self, trainer: Trainer) -> None:
        from pathlib import Path

        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        out = Path(self.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        # Ranks share output_dir: each writes its own file, not one rank over another's.
        suffix = f"-rank{trainer.rank}" if trainer.world_size > 1 else ""
        path = out / f"trace-step{self.start}{suffix}.json"
        profiler.export_chrome_trace(str(path))
        self.trace_path = str(path)
        self.table = profiler.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=self.row_limit
        )


class TensorBoardHook(Hook):
    """Writes training logs, evaluation results and table statistics as TensorBoard scalars.

    Per optimizer step: ``train/loss``, ``train/loss/<task>``, ``train/lr`` and
    ``train/samples_per_s`` (rows over the step's time). Per evaluation: ``eval/<key>`` for every
    result (``eval/click/auc``, ``eval/loss``, …). Every ``stats_every`` steps: the numeric
    statistics of each table :func:`find_tables` finds, as ``tables/<table>/<stat>`` (rows,
    bytes, lookups, hits, evictions, …; on a sharded run, rank 0's shard). A resumed run drops
    events the interrupted one wrote after its checkpoint, so curves do not fold back. Runs on
    rank 0 only when training is distributed.

    Needs the ``tensorboard`` package (``pip install 'recis-train[tensorboard]'``); view with
    ``tensorboard --logdir <log_dir>``.

    Args:
        log_dir: where event files go (default: ``<output_dir>/tensorboard`` of the trainer
            running the hook, so each :class:`~recis_train.MultiStage` stage gets its own run).
        stats_every: steps between table statistics (default: the trainer's ``log_every``;
            ``0``: never).

    Attributes:
        written_to: the directory of the latest event file.

    Raises:
        ImportError: tensorboard is not installed.
    """

    rank_zero_only = True

    def __init__(self, log_dir: str | None = None, *, stats_every: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                "TensorBoardHook needs the tensorboard package: "
                "pip install 'recis-train[tensorboard]'"
            ) from err
        if stats_every is not None:
            stats_every = _count("TensorBoardHook", "stats_every", stats_every, 0)
        self._writer_class = SummaryWriter
        self.log_dir, self.stats_every = log_dir, stats_every
        self.writer: Any = None
        self.written_to: str | None = None

    def _open(self, trainer: Trainer, purge_step: int | None = None) -> Any:
        if self.writer is None:
            from pathlib import Path

            where = self.log_dir or str(Path(trainer.args.output_dir) / "tensorboard")
            self.writer = self._writer_class(where, purge_step=purge_step)
            self.written_to = where
        return self.writer

    def close(self) -> None:
        """Flush and close the event file (the next event opens a new one)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def on_train_begin(self, trainer: Trainer) -> None:
        self.close()  # a new run (or stage) may write elsewhere
        # A resumed run drops events logged after its checkpoint by the run that was cut short.
        step = trainer.global_step
        self._open(trainer, purge_step=step + 1 if step else None)

    def on_step_end(self, trainer: Trainer, logs: Mapping[str, float]) -> None:
        writer, step = self._open(trainer), trainer.global_step
        for key, value in logs.items():
            if key == "loss" or key.startswith("loss/") or key == "lr":
                writer.add_scalar(f"train/{key}", value, step)
        if logs.get("step_time"):
            rate = logs.get("samples", 0.0) / logs["step_time"]
            writer.add_scalar("train/samples_per_s", rate, step)
        every = trainer.args.log_every if self.stats_every is None else self.stats_every
        if every and step % every == 0:
            for name, table in find_tables(trainer.model).items():
                for stat, value in _numbers(table.stats()).items():
                    writer.add_scalar(f"tables/{name}/{stat}", value, step)

    def on_evaluate(self, trainer: Trainer, metrics: Mapping[str, float]) -> None:
        was_open = self.writer is not None  # evaluate() may run after training ended
        writer = self._open(trainer)
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(f"eval/{key}", value, trainer.global_step)
        if was_open:
            writer.flush()
        else:
            self.close()

    def on_train_end(self, trainer: Trainer) -> None:
        self.close()
