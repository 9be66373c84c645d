"""``EmbeddingEngine`` and ``DynamicEmbedding``: fused dynamic-table lookups as ``nn.Module``s."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from recis_embedding._concat import Joined, batch_major, check_joinable
from recis_embedding._dedup import dedup
from recis_embedding._host import repeat_values
from recis_embedding._inputs import Ids, as_ids, head
from recis_embedding._options import EmbeddingOption
from recis_embedding._outputs import check_padded, padded_output, pooled_outputs
from recis_embedding._policies import ReadOnlyAdmission, policy_key
from recis_embedding._pooling import pool
from recis_embedding._serving import serve, serve_sharded
from recis_embedding._sharding import Pending, ShardContext, Use
from recis_embedding._statedict import warn_tables_not_in_state_dict
from recis_embedding._table import HashTable
from recis_embedding.exceptions import ConfigError, InputError
from recis_kernels import RaggedTensor

__all__ = ["DynamicEmbedding", "EmbeddingEngine"]

_POOLED = ("sum", "mean", "sqrtn")
# What features sharing one table must agree on (the table's storage properties).
_SHARED_FIELDS = (
    "embedding_dim",
    "dtype",
    "device",
    "trainable",
    "initializer",
    "admission",
    "eviction",
    "capacity",
    "default_value",
    "max_load_factor",
)


def _shared_value(option: EmbeddingOption, field: str) -> Any:
    value = getattr(option, field)
    if field in ("admission", "eviction"):
        return policy_key(value)
    if field == "device":
        return str(value)
    return value


class EmbeddingEngine(nn.Module):
    """Embeds a dict of id features with dynamic hash tables; dict in, dict out.

    Features name a table (``shared_name``, default the feature name). Tables whose options
    have equal storage properties are fused into one physical :class:`HashTable` (each keeps
    its own table index and all 64 id bits), except tables with a ``capacity``, which keep
    their own; per physical table the ids of all features are deduplicated once and read with
    one gather, and features with equal runtime properties are pooled by one reduce. Fusion
    never changes results or checkpoint names.

    Inputs per feature: dense ``(B,)``/``(B, k)`` int64, a ``RaggedTensor`` with 2 or 3 levels
    (optional weights), or any column with ``.values``/``.offsets``. Outputs:

    - ``sum``/``mean``/``sqrtn``: ``(B, D)`` (3-level input: ``(B, S, D)``, S the longest row);
    - ``tile``: ``(B, tile_len * D)``;
    - ``None`` (sequence): ``(B, L, D)`` zero-padded, plus ``"<feature>_mask"`` ``(B, L)`` bool;
      with ``combiner_kwargs={"ragged": True}`` a ``RaggedTensor`` of ``(N, D)`` rows.

    Keys without an option pass through unchanged; one output never replaces another: a
    mask or concat name that is also a feature's raises :class:`~recis_embedding.ConfigError`,
    and a batch column named like a mask or concat output raises
    :class:`~recis_embedding.InputError`. In training mode unseen ids are inserted
    (subject to admission); in ``eval()`` mode nothing is inserted and unknown ids read the
    option's ``default_value``. Tables of ``trainable=False`` options are frozen: they look
    ids up as in ``eval()`` mode in training too (no insertion, no admission or eviction
    state, nothing recorded for an optimizer).

    Features sharing a table must agree on its storage options (a conflict raises
    :class:`~recis_embedding.ConfigError` naming both features); combiners may differ.
    Tables are neither parameters nor buffers: ``state_dict()`` holds no embeddings (save them
    with :func:`recis_embedding.save`). Each table stays on the device and in the dtype of its
    option: ``.to(device)``/``.cuda()``/``.cpu()`` to a device other than a table's raises
    :class:`~recis_embedding.ConfigError` naming the tables (a move to the device they are on
    works), while dtype casts (``.half()``, ``.double()``, ``.to(torch.bfloat16)``) cast the
    dense submodules only and leave the tables, and the float32 lookup outputs, as they are.
    A ``state_dict()`` taken while the tables hold rows warns with
    :class:`~recis_embedding.TablesNotInStateDictWarning` (once per call site), except inside
    :func:`recis_embedding.tables_saved_separately`.

    Args:
        options: feature name -> :class:`EmbeddingOption`.
        fuse: fuse tables with equal storage properties (``False`` keeps one physical table per
            logical table; results are identical).
        shard: spread every table's rows over the ranks of ``process_group`` (row-wise, owner =
            ``recis_kernels.owner_rank(id, world_size)``); needs ``torch.distributed``
            initialized, and every rank must run the same lookups and optimizer steps.
        process_group: the group to shard over (default: the whole world).
        concat: output name -> pooled features (2-level inputs, equal ``B``) to join into one
            ``(B, sum of dims)`` output under that name, in the listed order, as TorchRec's
            ``KeyedTensor.values()``; each listed feature's output is then a view of it. When
            the features share a physical table they are pooled batch-major straight into it
            (no concatenation copy forward or backward); otherwise the outputs are
            concatenated. Values are those of ``torch.cat`` of the outputs; gradients of one
            row add up in another order, so they agree up to rounding.

    Example:
        >>> engine = EmbeddingEngine({"user": EmbeddingOption(8), "item": EmbeddingOption(8)})
        >>> out = engine({"user": torch.tensor([[3], [5]]), "item": torch.tensor([[7], [7]])})
        >>> out["user"].shape
        torch.Size([2, 8])
    """

    def __init__(
        self,
        options: Mapping[str, EmbeddingOption],
        *,
        fuse: bool = True,
        shard: bool = False,
        process_group: object = None,
        concat: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__()
        self.options = dict(options)
        self.fuse = fuse
        self.shard = ShardContext(process_group) if shard else None
        self.logical: dict[str, tuple[HashTable, int]] = {}
        self.physical: list[HashTable] = []
        self._table_of: dict[str, str] = {}
        self._first_option: dict[str, EmbeddingOption] = {}
        by_storage: dict[Any, HashTable] = {}
        for feature, option in self.options.items():
            if not isinstance(feature, str) or not feature:
                raise ConfigError(
                    f"feature names must be non-empty strs (batch keys), got {feature!r}"
                )
            if not isinstance(option, EmbeddingOption):
                raise ConfigError(
                    f"feature {feature!r}: expected an EmbeddingOption, got {type(option).__name__}"
                )
            name = option.shared_name or feature
            _check_frozen(feature, name, option)
            self._table_of[feature] = name
            if name in self.logical:
                self._check_shared(feature, name, option)
                continue
            # A capacity bounds one logical table: a fused physical table would share it
            # among its logical tables (and evict across them), so such tables stand alone.
            alone = not fuse or option.capacity is not None
            key = (name,) if alone else option.storage_key()
            table = by_storage.get(key)
            if table is None:
                table = _new_table(name, option)
                by_storage[key] = table
                self.physical.append(table)
                index = 0
            else:
                index = table.add_table(name, option.initializer)
            self.logical[name] = (table, index)
            self._first_option[name] = option
        if self.shard is not None:
            self.shard.check_devices(self.physical)
        # Whether the ranks were found to declare the same tables (see _agree_on_tables).
        self._tables_agreed = False
        self.concat = self._check_concat(concat or {})
        self._masks = self._check_masks()
        # Module-level function (not a bound method): copies and pickles keep the hook.
        self.register_state_dict_pre_hook(warn_tables_not_in_state_dict)

    def _table_layout(self) -> list[tuple[Any, ...]]:
        """What every rank of a sharded engine must declare alike, in order: each physical
        table's logical tables (name, dim, dtype, initializer) and what its rows share (capacity,
        policies, default value, load factor, trainable). The device is left out: each rank
        has its own."""
        layout = []
        for table in self.physical:
            option = self._first_option[table.names[0]]
            layout.append(
                (
                    tuple(
                        (name, self._first_option[name].embedding_dim, _described(init))
                        for name, init in zip(table.names, table.initializers, strict=True)
                    ),
                    str(option.dtype),
                    option.capacity,
                    _described(option.admission),
                    _described(option.eviction),
                    option.default_value,
                    option.max_load_factor,
                    option.trainable,
                )
            )
        return layout

    def _agree_on_tables(self) -> None:
        """Before the first sharded lookup, check (one object gather) that every rank built
        the engine alike: keys travel between the ranks with their table's position, so ranks
        whose tables differ in order, name or layout would read and train each other's rows
        silently, or fail inside a collective with no word of why.

        Raises:
            ConfigError: on every rank, naming the first rank whose tables differ from rank
                0's and the first difference.
        """
        assert self.shard is not None
        mine = self._table_layout()
        layouts = self.shard.gather_object(mine)
        for rank, layout in enumerate(layouts):
            if layout == layouts[0]:
                continue
            first = next(
                (i for i, (a, b) in enumerate(zip(layouts[0], layout, strict=False)) if a != b),
                min(len(layout), len(layouts[0])),
            )
            theirs = _shown(layout[first]) if first < len(layout) else "missing"
            ours = _shown(layouts[0][first]) if first < len(layouts[0]) else "missing"
            raise ConfigError(
                f"sharded EmbeddingEngine: rank {rank} declares other tables than rank 0 "
                f"(tables of rank 0: {_names(layouts[0])}; of rank {rank}: {_names(layout)}); "
                f"physical table {first} is [{ours}] on rank 0 and [{theirs}] on rank {rank}. "
                "Every rank must build the engine with the same options in the same order "
                "(build them from a sorted list of features, not from a set, whose order "
                "differs between processes)"
            )
        self._tables_agreed = True

    def _check_concat(self, concat: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        seen: dict[str, str] = {}
        for name, features in concat.items():
            where = f"concat {name!r}"
            if name in self.options:
                raise ConfigError(f"{where}: the name is also a feature's; pick another key")
            if isinstance(features, str) or not features:
                raise ConfigError(f"{where}: expected a non-empty list of feature names")
            for f in features:
                if f not in self.options:
                    raise ConfigError(f"{where}: {f!r} has no EmbeddingOption")
                if self.options[f].combiner not in _POOLED:
                    raise ConfigError(
                        f"{where}: {f!r} has combiner {self.options[f].combiner!r}; only pooled "
                        f"features ({', '.join(_POOLED)}) are concatenated"
                    )
                if f in seen:
                    raise ConfigError(f"{where}: {f!r} is already in concat {seen[f]!r}")
                seen[f] = name
            groups[name] = list(features)
        return groups

    def _check_masks(self) -> set[str]:
        """The names of the ``"<feature>_mask"`` outputs of padded sequence features, each a
        name no feature or concatenation has: one output may not replace another."""
        masks = set()
        for feature, option in self.options.items():
            if option.combiner is not None or (option.combiner_kwargs or {}).get("ragged"):
                continue
            mask = f"{feature}_mask"
            if mask in self.options:
                raise ConfigError(
                    f"feature {feature!r}: its padded output comes with a mask named {mask!r}, "
                    f"which is also a feature's name; rename one of them"
                )
            if mask in self.concat:
                raise ConfigError(
                    f"concat {mask!r}: the name is also the mask of sequence feature "
                    f"{feature!r}; pick another key"
                )
            masks.add(mask)
        return masks

    def _apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> EmbeddingEngine:
        """Every move and cast of the module (``.to()``, ``.cuda()``, ``.half()``, ...) comes
        here. Tables are not tensors of the module and stay where their options put them, so
        a move that would leave one on another device than the dense part is refused before
        this module (or its submodules) changes."""
        self._check_move(fn)
        return super()._apply(fn, recurse)

    def _check_move(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Raises :class:`ConfigError` when ``fn`` would put tensors of a table's device
        elsewhere; ``fn`` is learned from an empty tensor on each table device (a dtype cast
        keeps the device and passes)."""
        stay: dict[str, list[str]] = {}
        target = None
        probed: dict[str, bool] = {}
        for table in self.physical:
            where = str(table.device)
            if where not in probed:
                here = torch.empty(0, device=table.device)
                with torch.no_grad():
                    there = fn(here).device
                probed[where] = there != here.device
                if probed[where]:
                    target = there
            if probed[where]:
                stay.setdefault(where, []).extend(table.names)
        if not stay:
            return
        left = "; ".join(f"{sorted(names)} on {where}" for where, names in stay.items())
        raise ConfigError(
            f"cannot move {type(self).__name__} to {target}: its tables {left} would stay "
            f"behind (tables are not parameters; each lives on the device of its "
            f"EmbeddingOption); create them on {target} with EmbeddingOption(..., "
            f"device={str(target)!r}), or move only the dense submodules"
        )

    def _check_shared(self, feature: str, name: str, option: EmbeddingOption) -> None:
        first = self._first_option[name]
        differ = [
            f"{field}={getattr(first, field)!r} vs {getattr(option, field)!r}"
            for field in _SHARED_FIELDS
            if _shared_value(first, field) != _shared_value(option, field)
        ]
        if differ:
            owner = next(f for f, t in self._table_of.items() if t == name and f != feature)
            raise ConfigError(
                f"features {owner!r} and {feature!r} share table {name!r} but their options "
                f"differ in {'; '.join(differ)}; features of one table must agree on its "
                f"storage (combiner, combiner_kwargs and use_weight may differ)"
                + (
                    "; policies agree when equal (==): pass one policy object, or give the "
                    "policy class __eq__ and __hash__ (a frozen dataclass has both)"
                    if any(d.startswith(("admission=", "eviction=")) for d in differ)
                    else ""
                )
            )

    def table(self, name: str) -> tuple[HashTable, int]:
        """The physical table holding logical table ``name`` and its table index there."""
        if name not in self.logical:
            raise InputError(f"no table {name!r} (tables: {sorted(self.logical)})")
        return self.logical[name]

    def table_options(self) -> dict[str, EmbeddingOption]:
        """Logical table name -> the option that created it."""
        return dict(self._first_option)

    def rows_per_table(self) -> dict[str, int]:
        """Logical table name -> rows it holds (on this rank, when sharded)."""
        rows: dict[str, int] = {}
        for table in self.physical:
            if len(table.names) == 1 or len(table) == 0:
                rows[table.names[0]] = len(table)
                rows.update(dict.fromkeys(table.names[1:], 0))
                continue
            tabs = table._map.export().tables.to(torch.int64)
            counts = torch.bincount(tabs, minlength=len(table.names)).tolist()
            rows.update(zip(table.names, counts, strict=True))
        return rows

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Embed every feature that has an option; other keys pass through."""
        if (
            self.training
            and not torch.compiler.is_compiling()
            and torch._C._current_graph_task_id() != -1
        ):
            # A training lookup run by a backward pass: activation checkpointing
            # (torch.utils.checkpoint) recomputing its forward. The recomputed lookup would
            # insert ids and count admission and use a second time, and train rows the loss
            # never read (an id admitted only by the recount).
            raise ConfigError(
                "an EmbeddingEngine in training mode was called during a backward pass, as "
                "activation checkpointing (torch.utils.checkpoint) recomputes a forward: its "
                "lookups insert ids and count admission and use, and must run once per step; "
                "call the engine outside the checkpointed function and checkpoint the dense "
                "layers only"
            )
        if self.shard is not None and not self._tables_agreed:
            self._agree_on_tables()
        made = [k for k in batch if k in self.concat or k in self._masks]
        if made:
            raise InputError(
                f"batch columns {made} have the names of outputs this engine makes (a concat, "
                "or the mask of a sequence feature) and would be replaced; rename them"
            )
        out: dict[str, Any] = dict(batch)
        groups: dict[int, list[str]] = {}
        for feature in self.options:
            if feature not in batch:
                names = sorted(k if isinstance(k, str) else repr(k) for k in batch)
                shown = ", ".join(names[:10]) + (
                    f", ... ({len(names)} in all)" if len(names) > 10 else ""
                )
                raise InputError(
                    f"batch has no column for feature {feature!r} (columns: {shown or 'none'})"
                )
            table, _ = self.logical[self._table_of[feature]]
            groups.setdefault(id(table), []).append(feature)
        # Every feature's ids are taken and checked before the first lookup inserts any: a
        # batch refused for one feature leaves every table as it was.
        plans = []
        for features in groups.values():
            # Concatenations whose features all live in this table are pooled batch-major,
            # straight into their (B, sum of dims) output.
            mine = [
                (name, members)
                for name, members in self.concat.items()
                if set(members) <= set(features)
            ]
            taken = {f for _, members in mine for f in members}
            rest = [f for f in features if f not in taken]
            plans.append(self._plan_group(mine, rest, batch))
        ids = {f: i for plan in plans for f, i in plan.ids.items()}
        joined = {name for plan in plans for name, _ in plan.concat}
        apart = [(n, m) for n, m in self.concat.items() if n not in joined]
        for name, members in apart:  # features of several tables: joined after pooling
            check_joinable(name, members, ids)
        for plan in plans:
            out.update(self._lookup_group(plan))
        for name, members in apart:
            out[name] = torch.cat([out[f] for f in members], dim=1)
        return out

    def _plan_group(
        self,
        concat: list[tuple[str, list[str]]],
        features: list[str],
        batch: Mapping[str, Any],
    ) -> _Plan:
        """The lookup of one physical table, checked: the ids of the batch-major
        concatenations ``concat`` and of the other ``features``, as their outputs take them.

        Raises:
            InputError: naming the feature whose ids its table or output cannot take.
        """
        first = concat[0][1][0] if concat else features[0]
        table, _ = self.logical[self._table_of[first]]
        ordered = [f for _, members in concat for f in members] + features
        ids = {f: self._ids_used(f, batch[f]) for f in ordered}
        for f, i in ids.items():
            if i.values.device != table.device:
                raise InputError(
                    f"feature {f!r}: ids are on {i.values.device}, its table on {table.device}"
                )
        for f in features:
            if self.options[f].combiner not in _POOLED:
                check_padded(self.options[f], f, ids[f])
        parts = [self._batch_major(name, members, ids) for name, members in concat]
        return _Plan(table, concat, features, ids, parts)

    def _lookup_group(self, plan: _Plan) -> dict[str, Any]:
        """Lookups of one physical table: the batch-major concatenations and the other
        features of ``plan``, all through one dedup and one read."""
        table, concat, features, ids, parts = plan
        values = [p.values for p in parts] + [ids[f].values for f in features]
        tabs = [p.tabs for p in parts]
        if features:
            tabs.append(self._tabs_of(features, ids, table.device))
        emb, inverse, grouping, pending = self._dedup_and_read(
            table,
            torch.cat(values) if len(values) > 1 else values[0],
            torch.cat(tabs) if len(tabs) > 1 else tabs[0],
        )
        out: dict[str, Any] = {}
        at = 0
        # Where each feature's ids lie in `inverse`, for the optimizer to tell the rows of
        # outputs that received a gradient from those of outputs left out of the loss.
        uses: dict[str, Use] = {}
        for (name, members), part in zip(concat, parts, strict=True):
            n = part.values.numel()
            whole = n == inverse.numel()
            pooled = pool(
                emb,
                inverse[at : at + n],
                part.bags,
                part.weights,
                part.singles,
                grouping if whole else None,
            )
            dim = emb.shape[1]
            # Spelled out: an empty batch has no elements to infer a -1 from.
            joined = pooled.view(part.rows, len(members) * dim)
            # The members are views of `joined`, not of the output: a gradient reaching one
            # member does not pass through the joined output (so their gradients tell apart
            # which of them the loss used).
            out[name] = joined.view(joined.shape)
            for j, f in enumerate(members):
                out[f] = joined[:, j * dim : (j + 1) * dim]
                uses[f] = Use(at, at + n, part.bags, len(members), j)
            at += n
        if features:
            starts = [at]
            for f in features:
                starts.append(starts[-1] + ids[f].values.numel())
                uses[f] = Use(starts[-2], starts[-1], device=inverse.device)
            out.update(self._lookup_rest(features, ids, inverse[at:], emb, grouping, at == 0))
        if pending is not None and len(uses) > 1:
            _track_uses(pending, inverse, uses, out, concat)
        return out

    def _ids_used(self, feature: str, value: Any) -> Ids:
        """The ids of ``feature`` that reach its output: a ``tile`` feature, or a sequence
        with ``max_len``, drops each row's ids past that length before the lookup."""
        ids = as_ids(feature, value)
        option = self.options[feature]
        kwargs = option.combiner_kwargs or {}
        length = kwargs.get("tile_len") if option.combiner == "tile" else kwargs.get("max_len")
        if option.combiner in _POOLED or length is None or ids.outer is not None:
            return ids  # 3-level ids are refused with their output's message
        return head(ids, int(length))

    def _table_index(self, feature: str) -> int:
        return self.logical[self._table_of[feature]][1]

    def _tabs_of(
        self, features: list[str], ids: Mapping[str, Ids], device: torch.device
    ) -> torch.Tensor:
        """The table index of every id of ``features``, their ids laid end to end."""
        sizes = [ids[f].values.numel() for f in features]
        index = torch.tensor([self._table_index(f) for f in features], dtype=torch.int64)
        return repeat_values(index.to(device), torch.tensor(sizes).to(device), sum(sizes))

    def _batch_major(self, name: str, members: list[str], ids: Mapping[str, Ids]) -> Joined:
        """The ids of ``members`` reordered row by row: row 0's ids of each member in turn,
        then row 1's, and so on, with bag offsets over ``(row, member)`` and the per-id
        multipliers of each member's combiner."""
        options = [self.options[f] for f in members]
        tabs = [self._table_index(f) for f in members]
        return batch_major(name, members, ids, options, tabs)

    def _lookup_rest(
        self,
        features: list[str],
        ids: Mapping[str, Ids],
        inverse: torch.Tensor,
        emb: torch.Tensor,
        grouping: tuple[torch.Tensor, torch.Tensor] | None,
        alone: bool,
    ) -> dict[str, Any]:
        """Outputs of features looked up feature by feature (``inverse`` covers theirs)."""
        starts = [0]
        for f in features:
            starts.append(starts[-1] + ids[f].values.numel())
        runtime: dict[Any, list[int]] = {}
        for k, f in enumerate(features):
            runtime.setdefault(self.options[f].runtime_key(), []).append(k)
        out: dict[str, Any] = {}
        whole = alone and len(runtime) == 1
        for members in runtime.values():
            option = self.options[features[members[0]]]
            if option.combiner in _POOLED:
                first, last = members[0], members[-1]
                if last - first + 1 == len(members):  # adjacent features: one slice
                    part = inverse[starts[first] : starts[last + 1]]
                else:
                    part = torch.cat([inverse[starts[k] : starts[k + 1]] for k in members])
                out.update(
                    pooled_outputs(
                        option,
                        [features[k] for k in members],
                        [ids[features[k]] for k in members],
                        part,
                        emb,
                        grouping if whole else None,
                    )
                )
            else:
                for k in members:
                    part = inverse[starts[k] : starts[k + 1]]
                    out.update(padded_output(option, features[k], ids[features[k]], part, emb))
        return out

    def _dedup_and_read(
        self, table: HashTable, values: torch.Tensor, tabs: torch.Tensor
    ) -> tuple[
        torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, Pending | None
    ]:
        keys, key_tabs, inverse, grouping = dedup(values, tabs)
        # A frozen table reads as in eval mode in training too: no insertion, no eviction
        # state, nothing recorded for an optimizer; and so does any table under
        # torch.inference_mode(), whose tensors could never be updated in place afterwards.
        insert = self.training and self._trainable(table) and not torch.is_inference_mode_enabled()
        if self.shard is None:
            rows, emb = serve(table, keys, key_tabs, insert)
            exchange, touched, uses = None, rows, inverse
        else:
            rows, emb, exchange, touched, uses = serve_sharded(
                self.shard, table, keys, key_tabs, inverse, insert
            )
        pending = None
        if insert:
            if table.eviction is not None:
                table.eviction.touch(table, touched, uses)
                # Eviction state changed: the next delta checkpoint must carry these rows.
                table.mark_changed(touched)
            if torch.is_grad_enabled():
                emb.requires_grad_(True)
                pending = Pending(rows, emb, exchange)
                table.pending.append(pending)
        return emb, inverse, grouping, pending

    def _trainable(self, table: HashTable) -> bool:
        name = table.names[0]
        return self._first_option[name].trainable


class _Plan(NamedTuple):
    """One physical table's share of a lookup, its ids checked (see ``_plan_group``)."""

    table: HashTable
    concat: list[tuple[str, list[str]]]
    features: list[str]
    ids: dict[str, Ids]
    parts: list[Joined]


def _track_uses(
    pending: Pending,
    inverse: torch.Tensor,
    uses: dict[str, Use],
    out: Mapping[str, Any],
    concat: list[tuple[str, list[str]]],
) -> None:
    """Marks, through gradient hooks on the outputs, which features of one lookup received a
    gradient; a concatenation's joined output marks all its members."""
    pending.uses = list(uses.values())
    pending.inverse = inverse
    for name, members in concat:
        for tensor in _grad_tensors(out[name]):
            for f in members:
                _on_gradient(tensor, uses[f].mark)
    for f, use in uses.items():
        for tensor in _grad_tensors(out[f]):
            _on_gradient(tensor, use.mark)


def _on_gradient(tensor: torch.Tensor, mark: Callable[..., None]) -> None:
    """Calls ``mark`` when ``tensor`` receives a gradient: a pre-hook of the node that made it
    (a view or gather of the lookup's rows, whose one output is ``tensor``), cheaper than a
    tensor hook."""
    node = tensor.grad_fn
    if node is None:
        tensor.register_hook(mark)
    else:
        node.register_prehook(mark)


def _grad_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of an output that carry gradients (a ragged output's values)."""
    if isinstance(value, RaggedTensor):
        value = value.values
    return [value] if isinstance(value, torch.Tensor) and value.requires_grad else []


def _check_frozen(feature: str, name: str, option: EmbeddingOption) -> None:
    """A frozen table never inserts or evicts, so a policy that would do either is refused
    rather than silently ignored (``ReadOnlyAdmission`` says what freezing does, and passes)."""
    if option.trainable:
        return
    admission = option.admission
    if admission is not None and not isinstance(admission, ReadOnlyAdmission):
        policy = f"admission={admission!r}"
    elif option.eviction is not None:
        policy = f"eviction={option.eviction!r}"
    else:
        return
    raise ConfigError(
        f"feature {feature!r}: table {name!r} has trainable=False and {policy}; a frozen table "
        f"never inserts or evicts rows (unknown ids read default_value), so it takes no "
        f"admission or eviction policy: drop the policy, or set trainable=True"
    )


def _new_table(name: str, option: EmbeddingOption) -> HashTable:
    table = HashTable(
        option.embedding_dim,
        name=name,
        initializer=option.initializer,
        dtype=option.dtype,
        device=option.device,
        capacity=option.capacity,
        default_value=option.default_value,
        max_load_factor=option.max_load_factor,
    )
    table.admission = option.admission
    table.eviction = option.eviction
    return table


class DynamicEmbedding(nn.Module):
    """One dynamic hash embedding table as an ``nn.Module``.

    Args:
        option: the table's :class:`EmbeddingOption`.
        name: table name (default ``option.shared_name`` or ``"embedding"``).

    ``forward(ids)`` takes what :class:`EmbeddingEngine` takes for one feature and returns the
    output tensor; with ``combiner=None`` it returns ``(values (B, L, D), mask (B, L))``.

    Example:
        >>> emb = DynamicEmbedding(EmbeddingOption(4, combiner="mean"))
        >>> emb(torch.tensor([[1, 2], [3, 3]])).shape
        torch.Size([2, 4])
    """

    def __init__(self, option: EmbeddingOption, name: str | None = None) -> None:
        super().__init__()
        if name is not None and (not isinstance(name, str) or not name):
            raise ConfigError(
                f"DynamicEmbedding: name must be a non-empty str or None, got {name!r}"
            )
        self.name = name or option.shared_name or "embedding"
        self.engine = EmbeddingEngine({self.name: option.replace(shared_name=self.name)})
        # Messages about the engine name this module, the path users wrote.
        setattr(self.engine, "_wrapped_by", type(self).__name__)  # noqa: B010

    @property
    def table(self) -> HashTable:
        """The underlying :class:`HashTable`."""
        return self.engine.logical[self.name][0]

    def forward(self, ids: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.engine({self.name: ids})
        if f"{self.name}_mask" in out:
            return out[self.name], out[f"{self.name}_mask"]
        return out[self.name]


def logical_tables(model: nn.Module) -> dict[str, tuple[HashTable, int]]:
    """Every logical table of the embedding modules inside ``model``: name to (table, index).

    Raises:
        ConfigError: two embedding modules of ``model`` define the same table name
            (checkpoints and sparse optimizers know a table by its name, so one would
            overwrite the other's rows in a checkpoint); the error names both modules.
    """
    tables: dict[str, tuple[HashTable, int]] = {}
    where: dict[str, str] = {}
    # A DynamicEmbedding is named for its engine: the path users wrote. named_modules visits
    # a module before its children.
    owner: dict[int, str] = {}
    for path, module in model.named_modules():
        if isinstance(module, DynamicEmbedding):
            owner[id(module.engine)] = path
        if not isinstance(module, EmbeddingEngine):
            continue
        path = owner.get(id(module), path) or "(the model itself)"
        for name, entry in module.logical.items():
            if name in tables and tables[name][0] is not entry[0]:
                raise ConfigError(
                    f"embedding modules {where[name]!r} and {path!r} both define table "
                    f"{name!r}; a table name must be unique within a model (checkpoints and "
                    f"optimizers know tables by name): rename one (EmbeddingOption.shared_name, "
                    f"the feature name, or DynamicEmbedding(name=...))"
                )
            tables.setdefault(name, entry)
            where.setdefault(name, path)
    return tables


def _described(thing: Any) -> str | None:
    """A policy or initializer as every process describes it: a dataclass by its fields, any
    other object by its class (its default repr would hold a per-process address)."""
    if thing is None:
        return None
    if dataclasses.is_dataclass(thing):
        return repr(thing)
    return type(thing).__qualname__


def _names(layout: list[tuple[Any, ...]]) -> list[str]:
    return [name for table in layout for name, _, _ in table[0]]


def _shown(table: tuple[Any, ...]) -> str:
    """One physical table of `EmbeddingEngine._table_layout`, in words."""
    logical, dtype, capacity, admission, eviction, default, load, trainable = table
    names = ", ".join(f"{name!r} (dim {dim}, {init})" for name, dim, init in logical)
    return (
        f"{names}; {dtype}, capacity {capacity}, admission {admission}, eviction {eviction}, "
        f"default value {default}, max load factor {load}, trainable {trainable}"
    )
