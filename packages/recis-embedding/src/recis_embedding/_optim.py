"""Sparse optimizers over hash tables: ``torch.optim.Optimizer`` subclasses updating touched rows.

A lookup in training mode records, per physical table, the distinct rows it read and the
``(U, D)`` leaf tensor holding them. After ``backward()`` that leaf's ``.grad`` is the gradient
of exactly those rows. ``step()`` gathers every recorded row once (embedding and optimizer state
side by side), applies the update in float32 with torch's numerics, and writes the rows back.
Gradients of several micro-batches accumulate until ``zero_grad()``, as dense gradients do.
Learning rates live in ``param_groups`` so torch LR schedulers drive them.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from recis_embedding._numbers import plain
from recis_embedding._sharding import awaiting_backward, handed_over
from recis_embedding._table import HashTable, TableOf
from recis_embedding.exceptions import OptimizerError
from recis_kernels import (
    adagrad_rows_,
    adam_rows_,
    adam_store_,
    ftrl_rows_,
    rowwise_adagrad_rows_,
    rowwise_adagrad_store_,
    sgd_rows_,
)

__all__ = [
    "SparseAdagrad",
    "SparseAdam",
    "SparseAdamW",
    "SparseFTRL",
    "SparseOptimizer",
    "SparseRowWiseAdagrad",
    "SparseSGD",
    "sparse_parameters",
]


# Tables (from sparse_parameters), param group dicts ({"params": [tables], "lr": ...}), or a
# model to collect the tables from.
Tables = Iterable[HashTable] | Iterable[dict[str, Any]] | nn.Module

# Flags of torch's optimizers that the sparse ones do not implement, with torch's defaults
# (accepted, so code passing the defaults works).
_UNSUPPORTED_FLAGS: dict[str, bool | None] = {
    "maximize": False,
    "foreach": None,
    "fused": None,
    "capturable": False,
    "differentiable": False,
}

# Options of torch's optimizers that no sparse optimizer implements, with torch's defaults:
# a param group or a loaded state holding another value is refused, not silently ignored.
_TORCH_OPTIONS: dict[str, Any] = {
    "momentum": 0,
    "dampening": 0,
    "nesterov": False,
    "amsgrad": False,
    "decoupled_weight_decay": False,
    "centered": False,
}

_NON_NEGATIVE = ("lr", "eps", "weight_decay", "lr_decay", "l1", "l2", "beta")
# Every sparse optimizer's hyperparameters: a saved group naming one this optimizer lacks was
# written by another optimizer.
_HYPERPARAMETERS = frozenset({*_NON_NEGATIVE, "betas", "lr_power"})


def sparse_parameters(model: nn.Module) -> list[HashTable]:
    """Every trainable physical :class:`HashTable` of the embedding modules inside ``model``.

    Raises:
        ConfigError: two embedding modules of ``model`` define the same table name (found
            here, before training, rather than at the first checkpoint).
    """
    from recis_embedding._engine import EmbeddingEngine, logical_tables

    logical_tables(model)  # refuses a table name defined twice
    tables: dict[int, HashTable] = {}
    for module in model.modules():
        if isinstance(module, EmbeddingEngine):
            for table in module.physical:
                if module.table_options()[table.names[0]].trainable:
                    tables.setdefault(id(table), table)
    return list(tables.values())


# Ids of the tables that sparse optimizers built inside `leaving_out` leave out.
_LEFT_OUT: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "recis_embedding_left_out", default=frozenset()
)


@contextlib.contextmanager
def leaving_out(tables: Tables) -> Iterator[None]:
    """Sparse optimizers built (or given param groups) inside the block leave ``tables`` out:
    those tables get no state columns and no steps, exactly as if they had not been passed.

    For code that builds an optimizer from a whole model while part of it is frozen (a
    multi-stage pipeline's frozen embedding modules): a table's layout is fixed by the first
    optimizer given it, so an optimizer that only removed the frozen tables from its groups
    afterwards would already have laid them out for its kind, and they would refuse the
    optimizer of a later stage that trains them.

    Args:
        tables: tables, or a module whose tables (see :func:`sparse_parameters`) are left out.
    """
    found = sparse_parameters(tables) if isinstance(tables, nn.Module) else list(tables)
    for t in found:
        if not isinstance(t, HashTable):
            raise OptimizerError(
                f"leaving_out takes HashTables or a module, got {type(t).__name__}"
            )
    token = _LEFT_OUT.set(_LEFT_OUT.get() | {id(t) for t in found})
    try:
        yield
    finally:
        _LEFT_OUT.reset(token)


class SparseOptimizer(torch.optim.Optimizer):
    """Base class: an optimizer over :class:`HashTable` rows.

    Subclasses set ``kind`` and implement :meth:`_slots` and :meth:`_update`.
    """

    kind = ""

    def __init__(
        self,
        tables: Tables,
        defaults: dict[str, Any],
        flags: dict[str, Any] | None = None,
    ) -> None:
        self._check_flags(flags or {})
        if isinstance(tables, nn.Module):
            tables = sparse_parameters(tables)
        groups = list(tables)
        if not groups:
            raise OptimizerError(f"{type(self).__name__} got no tables to optimize")
        self._check_hyperparameters(defaults, "")
        if not all(isinstance(g, dict) for g in groups):
            if any(isinstance(g, dict) for g in groups):
                raise OptimizerError(
                    f"{type(self).__name__}: pass either tables or param group dicts, not both"
                )
            groups = [{"params": groups}]
        # torch's constructor hands every group to add_param_group, which takes tables.
        super().__init__(groups, defaults)  # type: ignore[arg-type]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of tables with their own hyperparameters, as torch's does.

        ``param_group["params"]`` holds the tables (or a model to collect them
        from); the group's other entries override the optimizer's defaults, e.g.
        ``{"params": [table], "lr": 0.1}``. The tables get this optimizer's state columns.

        Raises:
            OptimizerError: a group without tables, something other than a table in it, or a
                negative hyperparameter.
        """
        name = type(self).__name__
        if not isinstance(param_group, dict) or "params" not in param_group:
            raise OptimizerError(
                f"{name}: a param group is a dict with 'params' (a list of HashTables), got "
                f"{param_group!r}"
            )
        params = param_group["params"]
        if isinstance(params, nn.Module):
            tables: list[Any] = sparse_parameters(params)
        elif isinstance(params, (HashTable, torch.Tensor)):
            tables = [params]
        else:
            tables = list(params)
        resolved = []
        for t in tables:
            owner = _owner_of(t) if isinstance(t, torch.Tensor) else None
            if owner is not None:
                t = owner  # a table's handle, as param_groups hold them
            if not isinstance(t, HashTable):
                raise OptimizerError(
                    f"{name} optimizes HashTables (see sparse_parameters), got {type(t).__name__}"
                )
            resolved.append(t)
        if not resolved:
            raise OptimizerError(f"{name}: param group has no tables to optimize")
        left_out = _LEFT_OUT.get()
        # A group of left-out tables only stays, empty, so its place and hyperparameters do.
        resolved = [t for t in resolved if id(t) not in left_out]
        self._check_hyperparameters(param_group, " in a param group")
        for t in resolved:
            slots, init = self._slots(t.dim)
            t.configure_state(self.kind, slots, init)
        # The optimizer keeps its tables: their handles in param_groups lead back weakly.
        self.__dict__.setdefault("_tables_held", []).extend(resolved)
        super().add_param_group({**param_group, "params": [t.handle for t in resolved]})

    def _check_flags(self, flags: dict[str, Any]) -> None:
        name = type(self).__name__
        for key, value in flags.items():
            if key not in _UNSUPPORTED_FLAGS and key not in _TORCH_OPTIONS:
                raise TypeError(f"{name}.__init__() got an unexpected keyword argument {key!r}")
            self._refuse_unsupported(key, value, "")

    def _refuse_unsupported(self, key: str, value: Any, where: str) -> None:
        """Refuses a torch flag or option the sparse optimizers do not implement at other than
        torch's default (``None`` and ``False`` mean "not asked for" too)."""
        default = _UNSUPPORTED_FLAGS.get(key, _TORCH_OPTIONS.get(key))
        if value is not None and value is not False and value != default:
            raise OptimizerError(
                f"{type(self).__name__}: {key}={value!r}{where} is not supported for sparse "
                f"tables (only {key}={default!r}, torch's default, is accepted)"
            )

    #: Hyperparameters this optimizer needs above 0, not only at 0 or more.
    _POSITIVE: tuple[str, ...] = ()

    def _check_hyperparameters(self, values: dict[str, Any], where: str) -> None:
        """Checks (in place: NumPy scalars become Python numbers, which enter checkpoint
        manifests) the hyperparameters among ``values``, and refuses torch options these
        optimizers do not implement at other than their defaults: in the constructor, in an
        added param group and in a loaded state alike."""
        name = type(self).__name__
        for key, value in list(values.items()):
            if key in _UNSUPPORTED_FLAGS or key in _TORCH_OPTIONS:
                self._refuse_unsupported(key, value, where)
            if key not in _HYPERPARAMETERS:
                continue
            values[key] = value = plain(value)
            if key == "betas":
                values[key] = _betas(name, value, where)
                continue
            number = _real(value)
            if number is None:
                raise OptimizerError(
                    f"{name}: {key} must be a real number{where}, got {type(value).__name__} "
                    f"{value!r}"
                )
            if key == "lr_power":
                if not (math.isfinite(number) and number <= 0):
                    raise OptimizerError(f"{name}: lr_power must be <= 0{where}, got {value!r}")
            elif key in self._POSITIVE:
                if not (math.isfinite(number) and number > 0):
                    raise OptimizerError(f"{name}: {key} must be > 0{where}, got {value!r}")
            elif not (math.isfinite(number) and number >= 0):
                need = "finite" if number >= 0 else ">= 0"
                raise OptimizerError(f"{name}: {key} must be {need}{where}, got {value!r}")

    def tables(self) -> list[HashTable]:
        """The tables this optimizer updates."""
        held = self._held()
        return [_table_of(p, held) for g in self.param_groups for p in g["params"]]

    def _held(self) -> dict[int, HashTable]:
        """The tables this optimizer keeps, by their handles' ids."""
        return {id(t.handle): t for t in self.__dict__.get("_tables_held", ())}

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer keeps only defaults, state and param_groups: a copy or a pickle
        # of the optimizer keeps its tables too.
        return {**super().__getstate__(), "_tables_held": self.__dict__.get("_tables_held", [])}

    def _slots(self, dim: int) -> tuple[list[tuple[str, int]], torch.Tensor]:
        raise NotImplementedError

    def _update(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        state: dict[str, torch.Tensor],
        group: dict[str, Any],
    ) -> None:
        raise NotImplementedError

    #: The optimizer's update of float32 rows where they live in a table's row store, when it
    #: has one: ``(store, rows, grads, columns, group)``, ``columns`` the first column of each
    #: state slot; used on the CPU instead of :meth:`_update` on gathered rows.
    _in_store: Callable[..., None] | None = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gradients computed so far, as ``torch.optim.Optimizer.zero_grad`` does.

        A lookup whose ``backward()`` has not run yet keeps the gradient it will get, as a
        torch parameter would: ``out = model(x); opt.zero_grad(); loss.backward();
        opt.step()`` updates the rows ``x`` read. Lookups that already have their gradient,
        or that an optimizer step went past, are forgotten; a ``backward()`` that reaches a
        forgotten lookup (after a step, or through a graph retained past ``zero_grad()``)
        raises ``RuntimeError`` rather than lose the gradient: run a forward again for another
        backward.

        Args:
            set_to_none: accepted for torch compatibility; both values forget the same
                gradients. A table's gradient is sparse: it names the rows it touches, and
                a row without a gradient is left alone by ``step()`` (its value, moments and
                step count), as ``torch.optim.SparseAdam`` leaves the rows of a zero-filled
                sparse gradient. ``set_to_none=False`` thus does not make a following
                ``step()`` decay the moments of earlier rows with a zero gradient, as a
                dense torch optimizer would for a dense parameter.
        """
        tables = self.tables()
        waiting = {id(p) for p in awaiting_backward([p for t in tables for p in t.pending])}
        for table in tables:
            for p in table.pending:
                if id(p) not in waiting:
                    # Forgotten with its gradient: another backward() through a retained
                    # graph would reach a lookup no step applies, so it raises.
                    p.missed[0] = True
            table.pending[:] = [p for p in table.pending if id(p) in waiting]

    def check_step(self) -> None:
        """Raises :class:`OptimizerError` when the next :meth:`step` would be refused for its
        hyperparameters as they are now: an LR scheduler may have set one since the
        constructor checked it (``LinearLR`` down to 0, where the optimizer needs ``lr > 0``).

        :meth:`step` checks it before any table changes. A training loop that steps a dense
        optimizer first calls it before that step (``recis_train.Trainer`` does), so that a
        refused step leaves the dense weights as they were too.
        """
        for group in self.param_groups:
            for key in self._POSITIVE:
                value = _real(group[key])
                if value is None or not value > 0:
                    raise OptimizerError(
                        f"{type(self).__name__}: {key} must be > 0, got {group[key]!r} at "
                        f"this step (set by an LR scheduler? end its schedule above 0)"
                    )

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Update every row touched since the last ``zero_grad()``; returns ``closure()``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.check_step()
        held = self._held()
        tables = [
            (_table_of(handle, held), group)
            for group in self.param_groups
            for handle in group["params"]
        ]
        stepped = _with_gradient([p for table, _ in tables for p in table.pending])
        for table, group in tables:
            self._step_table(table, group, stepped)
        return loss

    def _step_table(
        self, table: HashTable, group: dict[str, Any], stepped: dict[int, bool]
    ) -> None:
        collected = _collect(table, stepped)
        if collected is not None:
            self._apply(table, group, *collected)
        for pending in table.pending:
            # Applied now or passed without a gradient, the lookup is done with: no later step
            # applies a gradient that reaches it from now on (a backward() run after this
            # step, a second one through a retained graph too), so that one raises.
            pending.missed[0] = True
        # Every optimizer step advances the table's clock, with or without gradients for it,
        # so eviction ages rows by optimizer steps (and every shard keeps the same clock).
        table.step += 1
        if table.eviction is not None:
            eviction = table.eviction
            table._evicting(lambda: eviction.after_step(table))

    def _apply(
        self, table: HashTable, group: dict[str, Any], rows: torch.Tensor, grads: torch.Tensor
    ) -> None:
        if (
            self._in_store is not None
            and table.dtype == torch.float32
            and rows.device.type == "cpu"
        ):
            # Float32 rows on the CPU are updated where they live, in one compiled pass,
            # instead of being gathered into a buffer, updated and scattered back.
            update_in_store = self._in_store
            table.update_in_store(
                rows, lambda store, columns: update_in_store(store, rows, grads, columns, group)
            )
            return
        widths = [table.emb_words] + [w for _, w in table.slots]

        # On the CPU the update works in place on column views of the rows read (fewer
        # passes than copying the columns out and back); the CUDA kernels take contiguous
        # columns.
        in_place = rows.device.type == "cpu"

        def update(full: torch.Tensor, which: torch.Tensor | None) -> torch.Tensor:
            parts = list(torch.split(full, widths, dim=1))
            if not in_place:
                parts = [p.contiguous() for p in parts]
            param = table._from_words(parts[0])
            state = {name: part for (name, _), part in zip(table.slots, parts[1:], strict=True)}
            g = grads if which is None else grads.index_select(0, which)
            self._update(param, g, state, group)
            if in_place:
                if param is not parts[0]:  # narrower dtypes: param is a float32 copy
                    parts[0].copy_(table._to_words(param))
                return full
            parts[0] = table._to_words(param)
            return torch.cat(parts, dim=1)

        table.update_full(rows, update)

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters only; row state lives in the tables (saved by checkpoints)."""
        return {
            "param_groups": [
                {k: v for k, v in g.items() if k != "params"} for g in self.param_groups
            ],
            **self._row_init(),
        }

    def _row_init(self) -> dict[str, float]:
        """Settings that fix the optimizer state of rows inserted later (saved with the
        hyperparameters, and required to match when they are loaded)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore hyperparameters written by :meth:`state_dict`, group by group.

        Each group keeps its own tables: a ``"params"`` entry (as torch optimizers write) is
        ignored, never put in place of the tables.

        Raises:
            OptimizerError: a different number of groups, or groups written by an optimizer
                with other hyperparameters (another sparse optimizer class).
        """
        for mine, saved in zip(self.param_groups, self._checked_groups(state_dict), strict=True):
            for key, value in saved.items():
                held = mine.get(key)
                number = None if isinstance(value, torch.Tensor) else _real(value)
                if isinstance(held, torch.Tensor) and held.numel() == 1 and number is not None:
                    # A tensor learning rate (a scheduler's) stays a tensor; checkpoints hold
                    # its value as a number.
                    held.fill_(number)
                else:
                    mine[key] = value

    def _checked_groups(self, state_dict: dict[str, Any]) -> list[dict[str, Any]]:
        """The hyperparameters of each param group of ``state_dict``, checked to fit this
        optimizer, as :meth:`load_state_dict` would put them in place (changing nothing).

        Raises:
            OptimizerError: as :meth:`load_state_dict`.
        """
        name = type(self).__name__
        for key, mine in self._row_init().items():
            saved = state_dict.get(key, mine)
            if saved != mine:
                raise OptimizerError(
                    f"{name}: the state was written with {key}={saved!r}, this optimizer has "
                    f"{key}={mine!r}; rows inserted after loading would start from another value"
                )
        groups = state_dict["param_groups"]
        checked = []
        if len(groups) != len(self.param_groups):
            raise OptimizerError(
                f"{name}: state has {len(groups)} param groups, optimizer has "
                f"{len(self.param_groups)}"
            )
        for k, saved in enumerate(groups):
            saved = {key: value for key, value in saved.items() if key != "params"}
            missing = sorted(set(self.defaults) - set(saved))
            foreign = sorted((set(saved) & _HYPERPARAMETERS) - set(self.defaults))
            if missing or foreign:
                raise OptimizerError(
                    f"{name}: param group {k} of the state does not fit this optimizer "
                    f"(missing {missing}, not hyperparameters of {name}: {foreign}); was it "
                    f"written by another optimizer?"
                )
            self._check_hyperparameters(saved, f" in param group {k} of the state")
            checked.append(saved)
        return checked


def _real(value: Any) -> float | None:
    """``value`` as a float if it is a real number (a one-element tensor counts, as torch's
    schedulers take tensor learning rates), else ``None``."""
    if isinstance(value, torch.Tensor):
        return float(value.item()) if value.numel() == 1 and value.is_floating_point() else None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _betas(name: str, value: Any, where: str) -> tuple[float, float]:
    """``value`` as two moment decays in ``[0, 1)``."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else None
    numbers_ = None if pair is None or len(pair) != 2 else [_real(plain(b)) for b in pair]
    if numbers_ is None or any(b is None or not 0 <= b < 1 for b in numbers_):
        raise OptimizerError(f"{name}: betas must be two numbers in [0, 1){where}, got {value!r}")
    return (float(numbers_[0]), float(numbers_[1]))  # type: ignore[arg-type]


def _collect(
    table: HashTable, stepped: dict[int, bool]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The rows and summed gradients of ``table``'s lookups in ``stepped`` (``id()`` -> whether
    to keep only the rows an output with a gradient read, from :func:`_with_gradient`)."""
    # Every stepped entry is visited, even without a gradient on this rank: sharded entries
    # exchange gradients collectively and all ranks must take part.
    entries = [
        (*got, p.exchange is not None)
        for p in table.pending
        if id(p) in stepped and (got := p.gradient(stepped[id(p)])) is not None
    ]
    if not entries:
        return None
    rows = torch.cat([r for r, _, _ in entries]) if len(entries) > 1 else entries[0][0]
    grads = torch.cat([g for _, g, _ in entries]) if len(entries) > 1 else entries[0][1]
    if len(entries) > 1 or entries[0][2]:
        rows, inverse = torch.unique(rows, return_inverse=True)
        summed = torch.zeros(rows.numel(), grads.shape[1], device=grads.device)
        grads = summed.index_add_(0, inverse, grads)
    # Row -1 stands for ids that were not in the table (default value); it is never updated.
    keep = rows >= 0
    if not bool(keep.all()):
        rows, grads = rows[keep], grads[keep]
    if rows.numel() == 0:
        return None
    return rows, grads


def _with_gradient(pending: list[Any]) -> dict[int, bool]:
    """The ``id()``s of the lookups a step applies: those with a gradient. A sharded lookup's
    gradient reaches the owners through a collective exchange, so the ranks agree first on
    which of them got a gradient on any rank: one all-reduce per process group and step, over
    the lookups of every table in the order the optimizer holds them (the same on every rank).
    One that got none anywhere (a table looked up but left out of the loss) is skipped by every
    rank, as a single process skips it, instead of exchanging zeros that the step would apply.

    Each is mapped to whether only the rows read by outputs that received a gradient are
    applied (the lookup fed several outputs and some got none). For a sharded lookup the same
    all-reduce tells every rank which outputs received a gradient on any rank, and those count
    as reached on all: one process training on the concatenated batches has one tensor per
    output, which receives a gradient (zero on the rows of ranks whose loss left it out) when
    any rank's loss uses it; and the mark then travels with the gradients, so the ranks agree.
    """
    stepped = {id(p): p.partial for p in pending if p.exchange is None}
    by_group: dict[int, list[Any]] = {}
    for p in pending:
        if p.exchange is not None:
            by_group.setdefault(id(p.exchange.group), []).append(p)
    for sharded in by_group.values():
        # Per lookup: whether it got a gradient, then whether each of its outputs did (the
        # same outputs in the same order on every rank: the engines' features).
        local = []
        for p in sharded:
            local.append(float(p.leaf.grad is not None))
            local.extend(float(u.reached) for u in p.uses or ())
        flags = torch.tensor(local, device=sharded[0].leaf.device)
        with handed_over(flags):
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=sharded[0].exchange.group)
        at, merged = 0, flags.tolist()
        for p in sharded:
            got = merged[at] > 0
            uses = p.uses or []
            for k, use in enumerate(uses):
                use.reached = merged[at + 1 + k] > 0
            at += 1 + len(uses)
            if got:
                stepped[id(p)] = p.partial
    return stepped


class SparseSGD(SparseOptimizer):
    """``torch.optim.SGD`` (no momentum) on touched rows.

    Args:
        tables: tables (from :func:`sparse_parameters`), a model to collect them from, or
            param group dicts as for torch optimizers (``[{"params": [t1], "lr": 0.1},
            {"params": [t2]}]``: per-group hyperparameters over the defaults).
        lr: learning rate.
        weight_decay: L2 penalty.
        **flags: torch's ``maximize``, ``foreach``, ``fused``, ``capturable`` and
            ``differentiable``, and the options of torch's optimizers no sparse one implements
            (``momentum``, ``dampening``, ``nesterov``, ``amsgrad``, ``centered``,
            ``decoupled_weight_decay``), accepted at torch's defaults only.

    Raises:
        OptimizerError: one of those flags set (they are not supported for sparse tables),
            or a negative hyperparameter.
    """

    kind = "sgd"

    def __init__(
        self, tables: Tables, lr: float = 0.01, weight_decay: float = 0.0, **flags: Any
    ) -> None:
        super().__init__(tables, {"lr": lr, "weight_decay": weight_decay}, flags)

    def _slots(self, dim):
        return [], torch.zeros(0)

    def _update(self, param, grad, state, group):
        sgd_rows_(param, grad, lr=group["lr"], weight_decay=group["weight_decay"])


class SparseAdagrad(SparseOptimizer):
    """``torch.optim.Adagrad`` on touched rows (per-row step count for ``lr_decay``).

    Args:
        tables: tables, a model, or param group dicts (see :class:`SparseSGD`).
        lr: learning rate.
        lr_decay: learning-rate decay per row update.
        weight_decay: L2 penalty.
        initial_accumulator_value: starting value of the squared-gradient sums.
        eps: added to the root of the sum.
        **flags: torch's flags at their defaults only (see :class:`SparseSGD`).
    """

    kind = "adagrad"

    def __init__(
        self,
        tables: Tables,
        lr: float = 0.01,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        **flags: Any,
    ) -> None:
        init = _real(plain(initial_accumulator_value))
        if init is None or not (math.isfinite(init) and init >= 0):
            raise OptimizerError(
                f"SparseAdagrad: initial_accumulator_value must be >= 0 and finite, got "
                f"{initial_accumulator_value!r}"
            )
        self._init_acc = init
        super().__init__(
            tables,
            {"lr": lr, "lr_decay": lr_decay, "weight_decay": weight_decay, "eps": eps},
            flags,
        )

    def _row_init(self):
        return {"initial_accumulator_value": self._init_acc}

    def _slots(self, dim):
        init = torch.cat([torch.full((dim,), self._init_acc), torch.zeros(1)])
        return [("sum", dim), ("step", 1)], init

    def _update(self, param, grad, state, group):
        adagrad_rows_(
            param,
            grad,
            state["sum"],
            state["step"][:, 0],
            lr=group["lr"],
            lr_decay=group["lr_decay"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
        )


class SparseRowWiseAdagrad(SparseOptimizer):
    """Row-wise Adagrad: one accumulator per row (FBGEMM's ``EXACT_ROWWISE_ADAGRAD``).

    Args:
        tables: tables, a model, or param group dicts (see :class:`SparseSGD`).
        lr: learning rate.
        eps: added to the root of the accumulator.
        weight_decay: L2 penalty.
        **flags: torch's flags at their defaults only (see :class:`SparseSGD`).
    """

    kind = "rowwise_adagrad"

    def __init__(
        self,
        tables: Tables,
        lr: float = 0.01,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        **flags: Any,
    ) -> None:
        super().__init__(tables, {"lr": lr, "eps": eps, "weight_decay": weight_decay}, flags)

    def _slots(self, dim):
        return [("sum", 1)], torch.zeros(1)

    def _update(self, param, grad, state, group):
        rowwise_adagrad_rows_(param, grad, state["sum"], **self._options(group))

    def _in_store(self, store, rows, grads, columns, group):
        rowwise_adagrad_store_(store, rows, grads, state=columns["sum"], **self._options(group))

    @staticmethod
    def _options(group: dict[str, Any]) -> dict[str, Any]:
        """The update's keyword arguments from a param group."""
        return {"lr": group["lr"], "eps": group["eps"], "weight_decay": group["weight_decay"]}


class SparseAdam(SparseOptimizer):
    """``torch.optim.Adam`` on touched rows, bias correction by each row's own step count.

    Args:
        tables: tables, a model, or param group dicts (see :class:`SparseSGD`).
        lr: learning rate.
        betas: moment decays.
        eps: added to the bias-corrected root of the second moment.
        weight_decay: L2 penalty.
        **flags: torch's flags at their defaults only (see :class:`SparseSGD`).
    """

    kind = "adam"
    _decoupled = False

    def __init__(
        self,
        tables: Tables,
        lr: float = 0.001,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        **flags: Any,
    ) -> None:
        super().__init__(
            tables,
            {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay},
            flags,
        )

    def _slots(self, dim):
        return [("exp_avg", dim), ("exp_avg_sq", dim), ("step", 1)], torch.zeros(2 * dim + 1)

    def _in_store(self, store, rows, grads, columns, group):
        slots = {k: columns[k] for k in ("exp_avg", "exp_avg_sq", "step")}
        adam_store_(store, rows, grads, **slots, **self._options(group))

    def _update(self, param, grad, state, group):
        m, v, step = state["exp_avg"], state["exp_avg_sq"], state["step"][:, 0]
        adam_rows_(param, grad, m, v, step, **self._options(group))

    def _options(self, group: dict[str, Any]) -> dict[str, Any]:
        """The update's keyword arguments from a param group."""
        beta1, beta2 = group["betas"]
        return {
            "lr": group["lr"],
            "beta1": beta1,
            "beta2": beta2,
            "eps": group["eps"],
            "weight_decay": group["weight_decay"],
            "decoupled": self._decoupled,
        }


class SparseAdamW(SparseAdam):
    """``torch.optim.AdamW`` on touched rows (decoupled weight decay, default 0.01)."""

    kind = "adamw"
    _decoupled = True

    def __init__(
        self,
        tables: Tables,
        lr: float = 0.001,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        **flags: Any,
    ) -> None:
        super().__init__(tables, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **flags)


class SparseFTRL(SparseOptimizer):
    """FTRL-proximal (TensorFlow ``Ftrl`` numerics) on touched rows.

    Args:
        tables: tables, a model, or param group dicts (see :class:`SparseSGD`).
        lr: learning rate.
        lr_power: power of the accumulator (``-0.5``: square root).
        l1: L1 strength.
        l2: L2 strength.
        beta: beta of the per-coordinate rate.
        initial_accumulator_value: starting value of the accumulators (TensorFlow: 0.1).
        **flags: torch's flags at their defaults only (see :class:`SparseSGD`).
    """

    kind = "ftrl"

    def __init__(
        self,
        tables: Tables,
        lr: float = 0.01,
        lr_power: float = -0.5,
        l1: float = 0.0,
        l2: float = 0.0,
        beta: float = 0.0,
        initial_accumulator_value: float = 0.1,
        **flags: Any,
    ) -> None:
        init = _real(plain(initial_accumulator_value))
        if init is None or not (math.isfinite(init) and init > 0):
            raise OptimizerError(
                f"SparseFTRL: initial_accumulator_value must be > 0 and finite, got "
                f"{initial_accumulator_value!r}"
            )
        self._init_acc = init
        super().__init__(
            tables,
            {"lr": lr, "lr_power": lr_power, "l1": l1, "l2": l2, "beta": beta},
            flags,
        )

    def _row_init(self):
        return {"initial_accumulator_value": self._init_acc}

    def _slots(self, dim):
        return [("accum", dim), ("linear", dim)], torch.cat(
            [torch.full((dim,), self._init_acc), torch.zeros(dim)]
        )

    # FTRL divides by the learning rate.
    _POSITIVE = ("lr",)

    def _update(self, param, grad, state, group):
        ftrl_rows_(
            param,
            grad,
            state["accum"],
            state["linear"],
            lr=group["lr"],
            lr_power=group["lr_power"],
            l1=group["l1"],
            l2=group["l2"],
            beta=group["beta"],
        )


def _owner_of(handle: torch.Tensor) -> HashTable | None:
    """The live table ``handle`` leads back to (weakly), or ``None``."""
    back = getattr(handle, "_recis_table", None)
    table = back() if isinstance(back, TableOf) else None
    return table if isinstance(table, HashTable) else None


def _table_of(handle: torch.Tensor, held: dict[int, HashTable]) -> HashTable:
    """The table a param group's handle stands for: where the handle leads back (weakly, see
    :class:`~recis_embedding._table.TableOf`), else the optimizer's own table of that handle
    (``torch.save`` drops a tensor's attributes; the handle object itself stays the table's)."""
    table = _owner_of(handle)
    if table is None:
        table = held.get(id(handle))
    if table is None:
        raise OptimizerError(
            "a param group holds a tensor that stands for no table this optimizer keeps "
            "(param groups hold the handles of their tables: add tables with add_param_group)"
        )
    return table
