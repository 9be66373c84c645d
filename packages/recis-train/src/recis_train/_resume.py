"""Checkpoints of :class:`~recis_train.Trainer`: saving its state and resuming from it."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from recis_train._arguments import TrainingArguments
from recis_train._checkpoint import (
    CheckpointManager,
    checksummed,
    first_verified,
    load_object,
    load_tensors,
    save_object,
    save_tensors,
)
from recis_train._data import DataStream
from recis_train._distributed import DistributedContext, own_rank_state
from recis_train._history import check_history, pack_history, unpack_history
from recis_train._hooks import Hook, hook_keys
from recis_train._sparse import SparseCheckpoint, load_sparse, tables_saved_separately
from recis_train._state import rng_state, set_rng_state
from recis_train.exceptions import CheckpointError, CheckpointNotFoundError

_log = logging.getLogger("recis_train")

#: training arguments a resume must keep: a step is ``gradient_accumulation_steps`` batches, and
#: the saved RNG state continues the run of the saved seed (a new one would be ignored)
FIXED_ON_RESUME = ("gradient_accumulation_steps", "seed")


def _class_name(obj: Any) -> str | None:
    """``module.QualName`` of ``obj``'s class; ``None`` for a part the trainer does not have."""
    if obj is None:
        return None
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


class CheckpointMixin:
    """Writes checkpoints of the trainer and restores them, checking first that they fit.

    A part of :class:`~recis_train.Trainer`, which sets the attributes declared here.
    """

    args: TrainingArguments
    model: nn.Module
    distributed: DistributedContext | None
    stream: DataStream
    dense_optimizer: torch.optim.Optimizer | None
    sparse_optimizer: torch.optim.Optimizer | None
    lr_schedulers: list[Any]
    hooks: list[Hook]
    sparse_checkpoint: SparseCheckpoint | None
    checkpoints: CheckpointManager
    global_step: int
    should_stop: bool
    history: dict[str, list[tuple[int, dict[str, float]]]]
    _cursor: dict[str, Any]
    _restored: bool
    _stopped_at_restore: bool
    _hook_stopped: bool
    _last_saved_key: tuple[int, bool, int] | None
    _scaler: torch.amp.GradScaler | None

    if TYPE_CHECKING:

        @property
        def rank(self) -> int: ...

        @property
        def world_size(self) -> int: ...

        def _zero_grad(self) -> None: ...

    def _trainer_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "global_step": self.global_step,
            "cursor": self._cursor,
            "dense_optimizer": (
                self.dense_optimizer.state_dict() if self.dense_optimizer is not None else None
            ),
            "lr_schedulers": [s.state_dict() for s in self.lr_schedulers],
            "rng": rng_state(),
            "hooks": dict(
                zip(hook_keys(self.hooks), (h.state_dict() for h in self.hooks), strict=True)
            ),
            "history": pack_history(self.history),
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
            "sparse_optimizer": _class_name(self.sparse_optimizer),
            "lr_schedulers": [_class_name(s) for s in self.lr_schedulers],
        }

    def _dense_state(self) -> dict[str, torch.Tensor]:
        with tables_saved_separately():  # the sparse checkpoint saves them
            state = self.model.state_dict()
        if self.sparse_checkpoint is not None:
            state = self.sparse_checkpoint.filter_dense(state)
        other = {k: type(v).__name__ for k, v in state.items() if not isinstance(v, torch.Tensor)}
        if other:
            raise CheckpointError(
                f"the model's state_dict holds entries that are not tensors ({other}; e.g. a "
                "module's get_extra_state()); checkpoints hold the dense state as safetensors, "
                "tensors only"
            )
        return state

    def _save(self) -> Path:
        """Writes the checkpoint of :meth:`Trainer.save <recis_train.Trainer.save>` (which then
        calls the hooks) and returns its directory."""
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
        self._last_saved_key = self._save_key()
        return path

    @property
    def _last_saved_step(self) -> int | None:
        """The step of the last checkpoint written (or restored), if any."""
        key = self._last_saved_key
        return None if key is None else key[0]

    def _save_key(self, stopped: bool | None = None) -> tuple[int, bool, int]:
        """What a checkpoint of the trainer as it stands records that changes within a step:
        the step, the stop flag (``should_stop`` unless given) and the evaluations."""
        stop = self.should_stop if stopped is None else stopped
        return (self.global_step, stop, len(self.history.get("eval", ())))

    def _saved_current(self) -> bool:
        """Whether the last checkpoint written (or restored) holds the trainer as it stands."""
        return self._last_saved_key == self._save_key()

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

    def _restore(
        self, path: str | Path | None, parts: Sequence[str], missing_ok: bool
    ) -> Path | None:
        """Loads the checkpoint of :meth:`Trainer.restore <recis_train.Trainer.restore>`, which
        has checked ``parts``."""
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
            _check_trainer_state(trainer_state, trainer_file)
            self._check_resumable(manifest, trainer_state, found)
            _check_rank_state(
                own_rank_state(trainer_state, self.rank, self.world_size, trainer_file),
                trainer_file,
            )
            self._check_sparse_hyperparameters(trainer_state, trainer_file)
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
            # The tables first: recis-embedding checks everything it loads before any table
            # changes, so a refusal there leaves the dense weights as they were too (theirs
            # were checked above).
            if "sparse" in parts and self.sparse_checkpoint is not None:
                # Its files were verified while choosing the checkpoint (when the manifest
                # records their checksums): they are not read again for that. The sparse
                # optimizer's hyperparameters are trainer state: a warm start (or a stage
                # starting from the previous one's weights) keeps the ones it was built with.
                load_sparse(
                    self.sparse_checkpoint,
                    found / "sparse",
                    self.model,
                    self.sparse_optimizer if trainer_state is not None else None,
                    verified=checksummed(manifest, "sparse"),
                )
            if dense is not None:
                self._load_dense(dense, dense_file)
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
        candidates, damaged = self.checkpoints._candidates(path)
        explicit, root = path is not None, self.checkpoints.root
        if self.distributed is not None:
            return self.distributed.choose_verified(
                candidates,
                lambda p, share: self._mismatches(p, parts, share),
                explicit=explicit,
                root=root,
                damaged=damaged,
            )
        return first_verified(
            candidates,
            lambda p: self._mismatches(p, parts),
            explicit=explicit,
            root=root,
            damaged=damaged,
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
            if optimizer is not None and state.get(key) is not None:
                differences += _group_differences(key, state[key], optimizer)
        self._check_hook_states(state.get("hooks", {}), path)
        if differences:
            raise CheckpointError(
                f"{path}: cannot resume, the checkpoint was written with "
                + "; ".join(differences)
                + "; keep them as they were, use another output_dir, or restore "
                "parts=('dense', 'sparse') to start a new run from its weights"
            )

    def _check_sparse_hyperparameters(self, state: Mapping[str, Any], file: Path) -> None:
        """A recis sparse optimizer checks saved hyperparameters without loading them: done
        before anything loads, so a state of another optimizer changes nothing."""
        check = getattr(self.sparse_optimizer, "_checked_groups", None)
        if check is None or state.get("sparse_optimizer") is None:
            return
        try:
            check(state["sparse_optimizer"])
        except Exception as err:
            raise CheckpointError(
                f"{file}: its sparse optimizer state does not fit: {err}"
            ) from err

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
        self.stream.load_state_dict(self._cursor)
        if self.dense_optimizer is not None:
            self.dense_optimizer.load_state_dict(state["dense_optimizer"])
        for scheduler, saved in zip(self.lr_schedulers, state["lr_schedulers"], strict=True):
            scheduler.load_state_dict(saved)
        if hooks:
            self._load_hooks(state["hooks"], file)
        if self._scaler is not None and "scaler" in state:
            self._scaler.load_state_dict(state["scaler"])
        if self.sparse_optimizer is not None and "sparse_optimizer" in state:
            self.sparse_optimizer.load_state_dict(state["sparse_optimizer"])
        self.history = unpack_history(state["history"])
        self._stopped_at_restore = bool(state.get("stopped", False))
        # train() then takes the checkpoint's stop flag as its own (should_stop).
        self._last_saved_key = self._save_key(stopped=self._stopped_at_restore)
        # The state in memory is the checkpoint's now: a stop an earlier call of this trainer
        # ended with no longer holds (the checkpoint says whether the run it records stopped).
        self._hook_stopped = False
        set_rng_state(own["rng"])


def _check_trainer_state(state: Any, file: Path) -> None:
    """Raises :class:`CheckpointError` naming ``file`` and the entry when the trainer state
    lacks an entry a resume loads or holds one of the wrong kind (a damaged or hand-edited
    file): checked before anything loads, so a refused resume changes nothing."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{file}: not a trainer state (a dict), got {type(state).__name__}")
    kinds: dict[str, tuple[type, ...]] = {
        "global_step": (int,),
        "lr_schedulers": (list, tuple),
        "history": (Mapping,),
        "hooks": (Mapping, list, tuple),
    }
    for key, kind in kinds.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(
                f"{file}: trainer state entry {key!r} is {type(value).__name__}, expected "
                f"{' or '.join(k.__name__ for k in kind)}"
            )
    if state["global_step"] < 0:
        raise CheckpointError(f"{file}: trainer state global_step {state['global_step']} < 0")
    check_history(state["history"], file)
    for key in ("dense_optimizer", "sparse_optimizer"):
        if state.get(key) is not None and not isinstance(state[key], Mapping):
            raise CheckpointError(
                f"{file}: trainer state entry {key!r} is {type(state[key]).__name__}, "
                "expected an optimizer state (a dict)"
            )


def _check_rank_state(own: Any, file: Path) -> None:
    """This rank's part of the trainer state: its data cursor and RNG states."""
    if not isinstance(own, Mapping) or not isinstance(own.get("cursor"), Mapping):
        raise CheckpointError(f"{file}: trainer state holds no data cursor (a dict) for this rank")
    if not isinstance(own.get("rng"), Mapping):
        raise CheckpointError(f"{file}: trainer state holds no RNG states (a dict) for this rank")


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
