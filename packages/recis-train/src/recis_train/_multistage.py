"""``MultiStage``: consecutive training stages over one model (pretrain, finetune, calibrate)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recis_train._arguments import TrainingArguments
from recis_train._evaluation import MetricFactory
from recis_train._hooks import Hook
from recis_train._sparse import embedding_prefixes as _embedding_prefixes
from recis_train._trainer import Trainer
from recis_train.exceptions import ConfigError

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


@dataclasses.dataclass
class Stage:
    """One stage of a :class:`MultiStage` run.

    Attributes:
        name: the stage's name (its checkpoints live in ``output_dir/<name>``): a plain
            directory name, unique ignoring case (no ``/``, ``\\``, ``.`` or ``..``).
        train_data: the stage's training batches.
        dense_optimizer: builds the stage's optimizer from its trainable dense parameters;
            may be ``None`` for a stage that freezes every dense parameter and trains
            embedding tables only (with a ``sparse_optimizer``).
        eval_data: evaluated at the end of the stage (and every ``eval_every`` steps).
        args: overrides of the run's :class:`TrainingArguments` (e.g. ``train_steps``; not
            ``output_dir``, which is ``output_dir/<name>`` of the run's arguments).
        trainable: module name prefixes that train; every other parameter is frozen.
            ``None`` means all modules not listed in ``frozen``.
        frozen: module name prefixes frozen in this stage. A frozen recis-embedding module
            (e.g. ``"embeddings"``) looks ids up without inserting or updating any row, so
            its tables and their optimizer slots stay as they were, sparse optimizer or not
            (its tables are taken out of the stage's sparse optimizer). Every prefix must name
            a module or parameter of the model, and not a part of an embedding module.
        sparse_optimizer: builds the stage's sparse optimizer from the model, or ``None``.
            Its per-row state lives in the tables and carries over between stages, so every
            stage training a table uses the same sparse optimizer class.
        lr_schedulers: builds the stage's list of schedulers from its dense optimizer
            (checked as :class:`Trainer` checks its ``lr_schedulers``).
    """

    name: str
    train_data: Iterable[Any]
    dense_optimizer: OptimizerFactory | None
    eval_data: Iterable[Any] | Callable[[], Iterable[Any]] | None = None
    args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    trainable: Sequence[str] | None = None
    frozen: Sequence[str] = ()
    sparse_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None
    lr_schedulers: Callable[[torch.optim.Optimizer], Sequence[Any]] | None = None


def _matches(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _check_prefixes(model: nn.Module, stage: Stage) -> None:
    """Raises :class:`ConfigError` for a ``trainable`` or ``frozen`` prefix naming no module or
    parameter of ``model`` (a typo would otherwise train what was meant to be frozen)."""
    names = [n for n, _ in model.named_modules() if n] + [n for n, _ in model.named_parameters()]
    embedding = [e for e in _embedding_prefixes(model) if e]
    for field in ("trainable", "frozen"):
        prefixes = getattr(stage, field) or ()
        if isinstance(prefixes, str):
            raise ConfigError(
                f"stage {stage.name!r}: {field} must be a list of module name prefixes, got the "
                f"string {prefixes!r}"
            )
        unknown = [p for p in prefixes if not any(_matches(n, [p]) for n in names)]
        if unknown:
            top = sorted({n.split(".")[0] for n in names})
            raise ConfigError(
                f"stage {stage.name!r}: {field} prefix(es) {unknown} name no module or parameter "
                f"of the model (its top-level modules: {top})"
            )
        for p in prefixes:
            inside = [e for e in embedding if p != e and _matches(p, [e])]
            if inside:
                raise ConfigError(
                    f"stage {stage.name!r}: {field} prefix {p!r} names a part of the embedding "
                    f"module {inside[0]!r}, whose tables freeze or train as a whole; name "
                    f"{inside[0]!r} itself"
                )


class _Frozen:
    """Freezes one stage's modules and restores every flag afterwards.

    Dense parameters get ``requires_grad=False``. Embedding modules (recis-embedding's, whose
    tables are not parameters) under a frozen prefix run every lookup as in evaluation: no id
    is inserted, no row is recorded for the sparse optimizer and no eviction counter moves, so
    the table and its optimizer slots stay exactly as the stage found them.
    """

    def __init__(self, model: nn.Module, stage: Stage) -> None:
        self.model, self.stage = model, stage
        self.saved: dict[str, bool] = {}
        self.handles: list[Any] = []
        self.modes: dict[int, bool] = {}
        self.embedding_modules: list[nn.Module] = []

    def _trains(self, name: str) -> bool:
        trainable = self.stage.trainable is None or _matches(name, self.stage.trainable)
        return trainable and not _matches(name, self.stage.frozen)

    def __enter__(self) -> list[nn.Parameter]:
        trainable = []
        for name, param in self.model.named_parameters():
            self.saved[name] = param.requires_grad
            param.requires_grad_(self._trains(name) and param.requires_grad)
            if param.requires_grad:
                trainable.append(param)
        for name in _embedding_prefixes(self.model):
            if not self._trains(name):
                module = self.model.get_submodule(name)
                self.handles.append(module.register_forward_pre_hook(self._lookup_only))
                self.handles.append(module.register_forward_hook(self._restore_mode))
                self.embedding_modules.append(module)
        return trainable

    def building_optimizer(self) -> contextlib.AbstractContextManager[None]:
        """The block the stage's sparse optimizer (built from the whole model) is built in: it
        leaves the frozen embedding modules' tables out. Their layout is the first optimizer's
        that takes them, and optimizing them would advance their clocks and run their eviction,
        which erases the rows of a table that no lookup touches in this stage."""
        if not self.embedding_modules:
            return contextlib.nullcontext()
        from recis_embedding import leaving_out, sparse_parameters

        frozen = {id(t): t for m in self.embedding_modules for t in sparse_parameters(m)}
        return leaving_out(frozen.values())

    def _lookup_only(self, module: nn.Module, inputs: Any) -> None:
        # Evaluation mode is the embedding modules' read-only lookup; the trainer sets the whole
        # model to training mode before every step, so it is switched per forward pass.
        self.modes[id(module)] = module.training
        module.train(False)

    def _restore_mode(self, module: nn.Module, inputs: Any, output: Any) -> None:
        module.train(self.modes.pop(id(module), module.training))

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.embedding_modules.clear()
        for name, param in self.model.named_parameters():
            param.requires_grad_(self.saved[name])


def _nothing_to_train(stage: Stage) -> ConfigError:
    return ConfigError(
        f"stage {stage.name!r}: no trainable parameter is left, and no embedding table to "
        "train with a sparse optimizer"
    )


def _check_dense_parts(stage: Stage, trainable: list[nn.Parameter]) -> None:
    """What the stage's trainable dense parameters ask of it, checked before its sparse
    optimizer is built (building one lays out its tables' optimizer state)."""
    if trainable and stage.dense_optimizer is None:
        raise ConfigError(
            f"stage {stage.name!r}: {len(trainable)} dense parameter(s) train but the stage "
            "has no dense_optimizer; give one, or freeze them"
        )
    if not trainable and stage.sparse_optimizer is None:
        raise _nothing_to_train(stage)
    if not trainable and stage.lr_schedulers is not None:
        raise ConfigError(
            f"stage {stage.name!r}: trains embedding tables only, so it has no dense optimizer "
            "for its lr_schedulers to schedule; leave lr_schedulers out"
        )


def _dense_optimizer(
    stage: Stage, trainable: list[nn.Parameter], sparse: torch.optim.Optimizer | None
) -> torch.optim.Optimizer | None:
    """The stage's dense optimizer, or ``None`` for a stage that trains embedding tables only
    (after :func:`_check_dense_parts`)."""
    if trainable:
        assert stage.dense_optimizer is not None
        return stage.dense_optimizer(trainable)
    if sparse is None or not any(g["params"] for g in sparse.param_groups):
        raise _nothing_to_train(stage)
    return None


class MultiStage:
    """Runs stages one after another on one model, each a full :class:`Trainer` run.

    Each stage has its own data, length, optimizer, frozen modules and evaluation, and its own
    checkpoint directory ``output_dir/<stage name>``. Rerunning the same command after an
    interruption skips finished stages (loading the last one's weights) and resumes the
    interrupted stage from its latest checkpoint.

    Args:
        model: the model all stages train.
        args: the base arguments; each stage's ``args`` override them.
        stages: the stages, in order (unique names).
        hooks: hooks shared by every stage.
        metrics: metric factories for evaluation (as for :class:`Trainer`).

    Example:
        ```python
        MultiStage(model, args, [
            Stage("pretrain", clicks, lambda ps: torch.optim.Adam(ps), args={"epochs": 1}),
            Stage("finetune", recent, lambda ps: torch.optim.SGD(ps, lr=1e-3),
                  frozen=["embedding"], eval_data=holdout),
        ]).run()
        ```
    """

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments,
        stages: Sequence[Stage],
        *,
        hooks: Sequence[Hook] = (),
        metrics: Mapping[str, MetricFactory] | None = None,
    ) -> None:
        if not stages:
            raise ConfigError("MultiStage needs at least one stage, got none")
        _check_names([s.name for s in stages])
        self.model, self.args, self.stages = model, args, list(stages)
        self.hooks, self.metrics = list(hooks), metrics
        self.results: dict[str, dict[str, float]] = {}
        # Every stage is checked now, not after the stages before it have trained.
        for stage in self.stages:
            _check_prefixes(model, stage)
            if "output_dir" in stage.args:
                raise ConfigError(
                    f"stage {stage.name!r}: args may not set output_dir; every stage writes to "
                    f"<output_dir>/<stage name> of the run's arguments "
                    f"({Path(args.output_dir) / stage.name})"
                )
            stage_args = self._stage_args(stage)
            if stage_args.epochs > 1 and isinstance(stage.train_data, Iterator):
                raise ConfigError(
                    f"stage {stage.name!r}: train_data is a one-shot iterator "
                    f"({type(stage.train_data).__name__}) but epochs={stage_args.epochs} needs "
                    "to iterate it again; give a list or another iterable that can be iterated "
                    "again, or set epochs=1"
                )
            if stage_args.eval_every and isinstance(stage.eval_data, Iterator):
                raise ConfigError(
                    f"stage {stage.name!r}: eval_data is a one-shot iterator "
                    f"({type(stage.eval_data).__name__}) but eval_every={stage_args.eval_every} "
                    "evaluates it repeatedly; give a list, another iterable that can be "
                    "iterated again, or a function returning a fresh iterable"
                )
            if not stage_args.save_at_end:
                raise ConfigError(
                    f"stage {stage.name!r}: save_at_end must be True in a MultiStage run; the "
                    "next stage, and a rerun after an interruption, start from the checkpoint "
                    "that ends each stage"
                )

    def _stage_args(self, stage: Stage) -> TrainingArguments:
        values = self.args.to_dict() | dict(stage.args)
        values["output_dir"] = str(Path(self.args.output_dir) / stage.name)
        return TrainingArguments.from_dict(values, source=f"stage {stage.name!r}")

    def _trainers(self) -> Generator[tuple[Stage, Trainer], None, None]:
        previous: Trainer | None = None
        for stage in self.stages:
            args = self._stage_args(stage)
            freezing = _Frozen(self.model, stage)
            with freezing as trainable:
                _check_dense_parts(stage, trainable)
                with freezing.building_optimizer():
                    sparse = stage.sparse_optimizer(self.model) if stage.sparse_optimizer else None
                dense = _dense_optimizer(stage, trainable, sparse)
                trainer = Trainer(
                    self.model,
                    args,
                    train_data=stage.train_data,
                    eval_data=stage.eval_data,
                    dense_optimizer=dense,
                    sparse_optimizer=sparse,
                    # Given to the Trainer, which checks them (a list, of this optimizer, ...).
                    lr_schedulers=(
                        stage.lr_schedulers(dense)
                        if stage.lr_schedulers and dense is not None
                        else ()
                    ),
                    hooks=self.hooks,
                    metrics=self.metrics,
                )
                if previous is not None and _latest(trainer) is None:
                    # A fresh stage starts from the weights the previous stage ended with.
                    latest = _latest(previous)
                    if latest is not None:
                        trainer.restore(latest, parts=("dense", "sparse"))
                yield stage, trainer
            previous = trainer

    def run(self) -> dict[str, dict[str, float]]:
        """Run every stage; return each stage's final evaluation (empty without eval data).

        The flags a stage changed (frozen modules) are put back when it ends, also when it
        raises: the model is left as the run found it, ready for a run again.
        """
        # Closed on the way out, so a stage that raises ends its freezing (_Frozen.__exit__)
        # now, not whenever the suspended generator is collected.
        with contextlib.closing(self._trainers()) as trainers:
            return self._run(trainers)

    def _run(self, trainers: Iterator[tuple[Stage, Trainer]]) -> dict[str, dict[str, float]]:
        skipped: Trainer | None = None
        for stage, trainer in trainers:
            done = Path(trainer.args.output_dir) / "stage-done.json"
            ctx = trainer.distributed
            # Under torchrun every rank skips the stages rank 0 found finished.
            if done.is_file() if ctx is None else ctx.broadcast(done.is_file()):
                if not trainer.args.resume:
                    # As a Trainer refuses a directory holding another run's checkpoints: a
                    # new run from step 0 must not pass for one that trained.
                    raise ConfigError(
                        f"stage {stage.name!r} already finished in {trainer.args.output_dir!r} "
                        f"({done.name} there) and resume=False starts a new run: pass "
                        "resume=True to skip finished stages, choose another output_dir, or "
                        "delete that stage's directory if it is no longer needed"
                    )
                self.results[stage.name] = json.loads(done.read_text())
                skipped = trainer
                continue
            skipped = None
            if stage.eval_data is not None:
                results = trainer.train_and_evaluate()
            else:
                trainer.train()
                results = {}
            self.results[stage.name] = results
            if ctx is None or ctx.is_main:
                done.parent.mkdir(parents=True, exist_ok=True)
                done.write_text(json.dumps(results))
        last = _latest(skipped) if skipped is not None else None
        if skipped is not None and last is not None:
            # Everything had finished before: leave the model as the last stage ended.
            skipped.restore(last, parts=("dense", "sparse"))
        return self.results


def _check_names(names: Sequence[Any]) -> None:
    """Raises :class:`ConfigError` for stage names that do not each name a directory of their
    own under ``output_dir``: a stage that shares another's directory would find its
    ``stage-done.json`` and silently never train.

    Refused: a name that is not a non-empty string, ``"."`` or ``".."``, one holding a path
    separator (``/`` or ``\\``, also ``"ft/"`` beside ``"ft"``), and names equal but for case
    (one directory on a case-insensitive file system).
    """
    seen: dict[str, str] = {}
    for name in names:
        if not isinstance(name, str) or not name:
            raise ConfigError(
                f"stage names must be non-empty strings (each is a directory under output_dir), "
                f"got {name!r} among {list(names)}"
            )
        if name in (".", "..") or "/" in name or "\\" in name:
            raise ConfigError(
                f"stage name {name!r} is not a plain directory name: '.', '..' and names with "
                "'/' or '\\' do not name a directory of the stage's own under output_dir "
                "(where its checkpoints and stage-done.json go)"
            )
        other = seen.get(name.casefold())
        if other is not None:
            raise ConfigError(
                "MultiStage needs stages with unique names (each names a directory under "
                f"output_dir): {other!r} and {name!r} name the same one"
                + (" on a case-insensitive file system" if other != name else "")
                + f", got {list(names)}"
            )
        seen[name.casefold()] = name


def _latest(trainer: Trainer) -> Path | None:
    """The trainer's latest checkpoint; under torchrun rank 0's, so every rank loads the same."""
    found = trainer.checkpoints.latest()
    return found if trainer.distributed is None else trainer.distributed.choose_checkpoint(found)
