"""``EmbeddingEngine`` and ``DynamicEmbedding``: fused dynamic-table lookups as ``nn.Module``s."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from recis_embedding._host import on_host, repeat_values, true_positions
from recis_embedding._inputs import Ids, as_ids
from recis_embedding._options import EmbeddingOption
from recis_embedding._policies import ReadOnlyAdmission
from recis_embedding._pooling import bag_weights, padded_gather, per_bag_scale, pool
from recis_embedding._sharding import Pending, ShardContext
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
)


def _shared_value(option: EmbeddingOption, field: str) -> Any:
    value = getattr(option, field)
    if field in ("admission", "eviction"):
        return None if value is None else (type(value).__name__, repr(value))
    if field == "device":
        return str(value)
    return value


class _Joined(NamedTuple):
    """The ids of a concatenation in batch-major order, ready for one pooled reduce."""

    values: torch.Tensor  # (N,) ids: row 0's of every member, then row 1's, ...
    tabs: torch.Tensor  # (N,) table index of each id
    bags: torch.Tensor  # (B * members + 1,) offsets of the (row, member) bags
    weights: torch.Tensor | None  # (N,) multipliers realizing each member's combiner
    singles: bool  # one id per bag and no weights: a gather suffices
    rows: int  # B


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

    Keys without an option pass through unchanged. In training mode unseen ids are inserted
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
        self.concat = self._check_concat(concat or {})
        # Module-level function (not a bound method): copies and pickles keep the hook.
        self.register_state_dict_pre_hook(warn_tables_not_in_state_dict)

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
        out: dict[str, Any] = dict(batch)
        groups: dict[int, list[str]] = {}
        for feature in self.options:
            if feature not in batch:
                raise InputError(f"batch has no column for feature {feature!r}")
            table, _ = self.logical[self._table_of[feature]]
            groups.setdefault(id(table), []).append(feature)
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
            out.update(self._lookup_group(mine, rest, batch))
        for name, members in self.concat.items():
            if name not in out:  # features of several tables: joined after pooling
                rows = out[members[0]].shape[0]
                for f in members:
                    if out[f].dim() != 2:
                        raise InputError(
                            f"concat {name!r}: feature {f!r} gives shape "
                            f"{tuple(out[f].shape)}; only (B, D) outputs join"
                        )
                    if out[f].shape[0] != rows:
                        raise InputError(
                            f"concat {name!r}: feature {f!r} has {out[f].shape[0]} rows, "
                            f"{members[0]!r} has {rows}"
                        )
                out[name] = torch.cat([out[f] for f in members], dim=1)
        return out

    def _lookup_group(
        self,
        concat: list[tuple[str, list[str]]],
        features: list[str],
        batch: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Lookups of one physical table: the batch-major concatenations ``concat`` and the
        other ``features``, all through one dedup and one read."""
        first = concat[0][1][0] if concat else features[0]
        table, _ = self.logical[self._table_of[first]]
        ordered = [f for _, members in concat for f in members] + features
        ids = {f: as_ids(f, batch[f]) for f in ordered}
        for f, i in ids.items():
            if i.values.device != table.device:
                raise InputError(
                    f"feature {f!r}: ids are on {i.values.device}, its table on {table.device}"
                )
        parts = [self._batch_major(name, members, ids) for name, members in concat]
        values = [p.values for p in parts] + [ids[f].values for f in features]
        tabs = [p.tabs for p in parts]
        if features:
            tabs.append(self._tabs_of(features, ids, table.device))
        emb, inverse, grouping = self._dedup_and_read(
            table,
            torch.cat(values) if len(values) > 1 else values[0],
            torch.cat(tabs) if len(tabs) > 1 else tabs[0],
        )
        out: dict[str, Any] = {}
        at = 0
        for (name, members), part in zip(concat, parts, strict=True):
            n = part.values.numel()
            whole = n == inverse.numel()
            pooled = pool(
                emb,
                inverse[at : at + n],
                part.bags,
                None,
                part.weights,
                part.singles,
                grouping if whole else None,
            )
            joined = pooled.view(part.rows, -1)
            out[name] = joined
            dim = emb.shape[1]
            for j, f in enumerate(members):
                out[f] = joined[:, j * dim : (j + 1) * dim]
            at += n
        if features:
            out.update(self._lookup_rest(features, ids, inverse[at:], emb, grouping, at == 0))
        return out

    def _table_index(self, feature: str) -> int:
        return self.logical[self._table_of[feature]][1]

    def _tabs_of(
        self, features: list[str], ids: Mapping[str, Ids], device: torch.device
    ) -> torch.Tensor:
        """The table index of every id of ``features``, their ids laid end to end."""
        sizes = [ids[f].values.numel() for f in features]
        index = torch.tensor([self._table_index(f) for f in features], dtype=torch.int64)
        return repeat_values(index.to(device), torch.tensor(sizes).to(device), sum(sizes))

    def _batch_major(self, name: str, members: list[str], ids: Mapping[str, Ids]) -> _Joined:
        """The ids of ``members`` reordered row by row: row 0's ids of each member in turn,
        then row 1's, and so on, with bag offsets over ``(row, member)`` and the per-id
        multipliers of each member's combiner."""
        parts = [ids[f] for f in members]
        rows = parts[0].bags.numel() - 1
        for f, i in zip(members, parts, strict=True):
            if i.outer is not None:
                raise InputError(
                    f"concat {name!r}: feature {f!r} has 3-level ids; only (B, D) outputs join"
                )
            if i.bags.numel() - 1 != rows:
                raise InputError(
                    f"concat {name!r}: feature {f!r} has {i.bags.numel() - 1} rows, "
                    f"{members[0]!r} has {rows}"
                )
        options = [self.options[f] for f in members]
        tabs = [self._table_index(f) for f in members]
        # Each member's combiner as multipliers: one per bag (1, 1/L or 1/sqrt(L)) when it
        # has no per-id weights, else one per id.
        scales: list[torch.Tensor | None] = []
        mults: list[torch.Tensor | None] = []
        for o, i in zip(options, parts, strict=True):
            mode = o.combiner or "sum"
            raw = i.weights if o.use_weight else None
            if raw is None:
                plain = mode == "sum"
                scales.append(None if plain else per_bag_scale(i.bags[1:] - i.bags[:-1], mode))
                mults.append(None)
            else:
                scales.append(None)
                mults.append(bag_weights(i.bags, raw, mode, i.values.numel()))
        if on_host(parts[0].values):
            return _batch_major_host(parts, tabs, scales, mults, rows)
        return _batch_major_torch(parts, tabs, scales, mults, rows)

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
                    self._pooled(
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
                    out.update(self._padded(option, features[k], ids[features[k]], part, emb))
        return out

    def _dedup_and_read(
        self, table: HashTable, values: torch.Tensor, tabs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        keys, key_tabs, inverse, grouping = _dedup(values, tabs)
        if self.shard is None:
            rows, emb = self._serve(table, keys, key_tabs)
            exchange, touched, uses = None, rows, inverse
        else:
            rows, emb, exchange, touched, uses = self._serve_sharded(table, keys, key_tabs, inverse)
        if self.training and self._trainable(table):
            if table.eviction is not None:
                table.eviction.touch(table, touched, uses)
                # Eviction state changed: the next delta checkpoint must carry these rows.
                table.mark_changed(touched)
            if torch.is_grad_enabled():
                emb.requires_grad_(True)
                table.pending.append(Pending(rows, emb, exchange))
        return emb, inverse, grouping

    def _serve_sharded(
        self, table: HashTable, keys: torch.Tensor, key_tabs: torch.Tensor, inverse: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor, torch.Tensor]:
        """:meth:`_serve` of a sharded lookup: the local distinct keys go to their owners, which
        serve each key once however many ranks asked for it, and the rows come back.

        Returns:
            ``(rows (R,), emb (U, D), exchange, owned (K,), uses)``: the rows read for the keys
            this rank received, in received order; the embeddings of the local keys; the
            routing; the rows of the distinct keys this rank served; and, per use of one of
            those keys by any rank's batch, its index into ``owned``.
        """
        assert self.shard is not None
        num_local = keys.numel()
        counts = torch.bincount(inverse, minlength=num_local)
        served, served_tabs, served_uses, exchange = self.shard.route(keys, key_tabs, counts)
        # A key asked for by several ranks arrives once per rank; admission, insertion and
        # the eviction statistics see it once, with all its uses, as one process would.
        ukeys, utabs, back, _ = _dedup(served, served_tabs)
        owned, emb = self._serve(table, ukeys, utabs)
        uses = repeat_values(back, served_uses, int(served_uses.sum()))
        rows = owned.index_select(0, back)
        emb = exchange.from_owners(emb.index_select(0, back), num_local)
        return rows, emb, exchange, owned, uses

    def _serve(
        self, table: HashTable, keys: torch.Tensor, key_tabs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows and embeddings of distinct keys this rank owns (inserting in training mode,
        unless the table is frozen: then unknown keys read the default, as in eval mode)."""
        if self.training and self._trainable(table):
            admit = None
            if table.admission is not None:
                admit = table.admission.admit(table, keys, key_tabs)
            rows, _ = table.find_or_insert(keys, key_tabs, admit=admit, distinct=True)
        else:
            rows = table.find(keys, key_tabs)
        present = rows >= 0
        if bool(present.all()):
            return rows, table.read(rows)
        emb = torch.full((rows.numel(), table.dim), table.default_value, device=rows.device)
        idx = true_positions(present)
        emb[idx] = table.read(rows[idx])
        return rows, emb

    def _trainable(self, table: HashTable) -> bool:
        name = table.names[0]
        return self._first_option[name].trainable

    def _pooled(
        self,
        option: EmbeddingOption,
        features: list[str],
        ids: list[Ids],
        inverse: torch.Tensor,
        emb: torch.Tensor,
        grouping: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> dict[str, torch.Tensor]:
        mode = option.combiner or "sum"
        any_weights = option.use_weight and any(i.weights is not None for i in ids)
        singles = all(i.singles for i in ids) and not any_weights and option.combiner == "sum"
        weights: list[torch.Tensor | None] = []
        bags: list[torch.Tensor] = []
        counts: list[int] = []
        shift = 0
        for i in ids:
            n = i.values.numel()
            if not singles:
                w = i.weights if option.use_weight else None
                if w is None and any_weights and mode == "sum":
                    w = torch.ones(n, device=emb.device)
                weights.append(bag_weights(i.bags, w, mode, n))
                bags.append(i.bags[:-1] + shift if shift else i.bags[:-1])
            counts.append(i.bags.numel() - 1)
            shift += n
        if singles:
            all_bags = torch.arange(shift + 1, device=emb.device)
            w_all = None
        else:
            all_bags = torch.cat([*bags, torch.tensor([shift], device=emb.device)])
            present = [w for w in weights if w is not None]
            w_all = torch.cat(present) if len(present) == len(weights) else None
        pooled = pool(emb, inverse, all_bags, None, w_all, singles, grouping)
        out = {}
        for f, i, p in zip(features, ids, torch.split(pooled, counts), strict=True):
            if i.outer is not None:
                longest = int((i.outer[1:] - i.outer[:-1]).max()) if i.outer.numel() > 1 else 0
                p = padded_gather(p, torch.arange(p.shape[0], device=p.device), i.outer, longest)[0]
            out[f] = p
        return out

    def _padded(
        self,
        option: EmbeddingOption,
        feature: str,
        ids: Ids,
        inverse: torch.Tensor,
        emb: torch.Tensor,
    ) -> dict[str, Any]:
        kwargs = option.combiner_kwargs or {}
        if ids.outer is not None:
            raise InputError(
                f"feature {feature!r}: combiner {option.combiner!r} takes 2-level ids, got 3 levels"
            )
        lengths = ids.bags[1:] - ids.bags[:-1]
        if option.combiner == "tile":
            length = int(kwargs["tile_len"])
            values, _ = padded_gather(emb, inverse, ids.bags, length)
            return {feature: values.reshape(values.shape[0], length * emb.shape[1])}
        if kwargs.get("ragged"):
            rows = emb.index_select(0, inverse)
            return {feature: RaggedTensor(rows, ids.bags, validate=False)}
        max_len = kwargs.get("max_len")
        if max_len is None:
            max_len = int(lengths.max()) if lengths.numel() else 0
        values, mask = padded_gather(emb, inverse, ids.bags, int(max_len))
        return {feature: values, f"{feature}_mask": mask}


def _batch_major_host(
    parts: list[Ids],
    tabs: list[int],
    scales: list[torch.Tensor | None],
    mults: list[torch.Tensor | None],
    rows: int,
) -> _Joined:
    """:meth:`EmbeddingEngine._batch_major` on the CPU, in NumPy: one permutation of the
    members' ids laid end to end, applied to ids and table indices; multipliers come per bag
    (one repeat) unless some member has per-id weights."""
    m = len(parts)
    sizes = [i.values.numel() for i in parts]
    plain = all(s is None for s in scales) and all(w is None for w in mults)
    if plain and all(i.singles for i in parts):
        values = np.stack([i.values.numpy() for i in parts], axis=1).reshape(-1)
        tab = np.tile(np.asarray(tabs, dtype=np.int64), rows)
        one_each = torch.arange(values.size + 1)
        return _Joined(torch.from_numpy(values), torch.from_numpy(tab), one_each, None, True, rows)
    lengths = np.ones((rows, m), dtype=np.int64)
    first = np.empty((rows, m), dtype=np.int64)  # where each (row, member) bag starts, end to end
    starts = np.cumsum(sizes) - sizes
    np.add(np.arange(rows)[:, None], starts, out=first)  # right for single-id members
    for j, i in enumerate(parts):
        if not i.singles:
            own = i.bags.numpy()
            np.subtract(own[1:], own[:-1], out=lengths[:, j])
            np.add(own[:-1], starts[j], out=first[:, j])
    flat = lengths.reshape(-1)
    bags = torch.zeros(rows * m + 1, dtype=torch.int64)
    torch.cumsum(torch.from_numpy(flat), 0, out=bags[1:])
    offsets = bags.numpy()
    n = int(offsets[-1])
    # Id k of a bag starting at offsets[q] comes from first[q] + (k - offsets[q]).
    perm = np.repeat(first.reshape(-1) - offsets[:-1], flat)
    perm += np.arange(n, dtype=np.int64)
    values = np.take(np.concatenate([i.values.numpy() for i in parts]), perm)
    tab = np.take(np.repeat(np.asarray(tabs, dtype=np.int64), sizes), perm)
    w = None
    if any(x is not None for x in mults):
        per_id = [
            x.numpy()
            if x is not None
            else np.repeat(s.numpy(), lengths[:, j])
            if s is not None
            else np.ones(sizes[j], dtype=np.float32)
            for j, (x, s) in enumerate(zip(mults, scales, strict=True))
        ]
        w = np.take(np.concatenate(per_id), perm)
    elif not plain:
        per_bag = np.ones((rows, m), dtype=np.float32)
        for j, s in enumerate(scales):
            if s is not None:
                per_bag[:, j] = s.numpy()
        w = np.repeat(per_bag.reshape(-1), flat)
    return _Joined(
        torch.from_numpy(values),
        torch.from_numpy(tab),
        bags,
        None if w is None else torch.from_numpy(w),
        False,
        rows,
    )


def _batch_major_torch(
    parts: list[Ids],
    tabs: list[int],
    scales: list[torch.Tensor | None],
    mults: list[torch.Tensor | None],
    rows: int,
) -> _Joined:
    """:func:`_batch_major_host` in torch, for other devices."""
    m = len(parts)
    device = parts[0].values.device
    sizes = [i.values.numel() for i in parts]
    plain = all(s is None for s in scales) and all(w is None for w in mults)
    if plain and all(i.singles for i in parts):
        values = torch.stack([i.values for i in parts], dim=1).reshape(-1)
        tab = torch.tensor(tabs, dtype=torch.int64, device=device).repeat(rows)
        bags = torch.arange(values.numel() + 1, device=device)
        return _Joined(values, tab, bags, None, True, rows)
    lengths = torch.ones((rows, m), dtype=torch.int64, device=device)
    first = torch.empty((rows, m), dtype=torch.int64, device=device)
    at = 0
    for j, i in enumerate(parts):
        if i.singles:
            first[:, j] = torch.arange(at, at + rows, device=device)
        else:
            lengths[:, j] = i.bags[1:] - i.bags[:-1]
            first[:, j] = i.bags[:-1] + at
        at += sizes[j]
    flat = lengths.reshape(-1)
    bags = torch.zeros(rows * m + 1, dtype=torch.int64, device=device)
    torch.cumsum(flat, 0, out=bags[1:])
    n = int(bags[-1])
    perm = repeat_values(first.reshape(-1) - bags[:-1], flat, n)
    perm += torch.arange(n, device=device)
    values = torch.cat([i.values for i in parts]).index_select(0, perm)
    member = torch.tensor(tabs, dtype=torch.int64, device=device)
    tab = repeat_values(member, torch.tensor(sizes, device=device), n).index_select(0, perm)
    w = None
    if any(x is not None for x in mults):
        per_id = [
            x
            if x is not None
            else repeat_values(s, lengths[:, j], sizes[j])
            if s is not None
            else torch.ones(sizes[j], device=device)
            for j, (x, s) in enumerate(zip(mults, scales, strict=True))
        ]
        w = torch.cat(per_id).index_select(0, perm)
    elif not plain:
        per_bag = torch.ones((rows, m), device=device)
        for j, s in enumerate(scales):
            if s is not None:
                per_bag[:, j] = s
        w = repeat_values(per_bag.reshape(-1), flat, n)
    return _Joined(values, tab, bags, w, False, rows)


_TABLE_MIX = -7046029254386353131  # 0x9E3779B97F4A7C15, odd: a bijection on ids per table
_MUL = -4658895280553007687  # 0xBF58476D1CE4E5B9, odd multiplier of the grouping hash


def _dedup(
    values: torch.Tensor, tabs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Distinct ``(table, id)`` pairs of a fused lookup, with the inverse mapping.

    Args:
        values: ``(N,) int64`` ids.
        tabs: ``(N,)`` int32 or int64 table index of every id.

    Returns:
        ``(ids (U,), tables (U,) int32, inverse (N,), grouping)``: ``grouping`` is
        ``(order, offsets)``, listing the positions of distinct pair ``u`` in ascending order
        as ``order[offsets[u]:offsets[u + 1]]`` (reused by the backward pass), or ``None``.
    """
    n = values.numel()
    if values.device.type == "cpu" and n > 1:
        found = _packed_dedup(values, tabs)
        if found is not None:
            return found
    return _exact_dedup(values, tabs)


_MIN_HASH_BITS = 24  # below this many hash bits per packed value, collisions get likely


def _packed_dedup(values: torch.Tensor, tabs: torch.Tensor):
    """Group equal pairs with one vectorized sort of plain int64 values (CPU, in NumPy).

    Each value packs, from the top, the high bits of a multiplicative hash of the id, the table
    index and the position, so numpy's sort of values (several times faster than an argsort)
    makes equal pairs adjacent, each group in ascending position order. Two different ids of
    one table share a group only when their hashes agree on every kept bit; that is detected
    and ``None`` sends the caller to the exact path. The passes run in NumPy, whose loops over
    these index arrays are faster than torch's on one thread (the whole function: about 4.0
    vs 4.8 ms for the embedding benchmark's 225k ids).
    """
    n = values.numel()
    bits = (n - 1).bit_length()
    v = values.numpy()
    t = tabs.numpy().astype(np.int64, copy=False)
    tab_bits = int(t.max()).bit_length()
    low_bits = bits + tab_bits
    if 64 - low_bits < _MIN_HASH_BITS:
        return None
    packed = v * np.int64(_MUL)  # wraps modulo 2**64, as intended
    packed &= np.int64(-(1 << low_bits))
    if tab_bits:
        packed |= t << np.int64(bits)
    packed |= np.arange(n, dtype=np.int64)
    packed.sort()
    order = packed & np.int64((1 << bits) - 1)
    sv = np.take(v, order)
    group = packed >> np.int64(bits)
    flags = np.empty(n, dtype=bool)
    flags[0] = True
    np.not_equal(group[1:], group[:-1], out=flags[1:])
    # Sorted neighbours with different ids but one group are two ids whose hashes collide.
    if np.greater(sv[1:] != sv[:-1], flags[1:]).any():
        return None
    starts = np.flatnonzero(flags)
    flags[0] = False
    # Ranked and scattered in int32 where they fit: half the bytes, which makes torch's
    # cumulative sum (faster than NumPy's) and the scatter about twice as fast.
    small = n < 1 << 31
    inverse = np.empty(n, dtype=np.int32 if small else np.int64)
    flags_t = torch.from_numpy(flags)
    ranks = torch.cumsum(flags_t, 0, dtype=torch.int32 if small else torch.int64)
    inverse[order] = ranks.numpy()
    offsets = np.append(starts, n).astype(np.int64, copy=False)
    key_tabs = (group[starts] & np.int64((1 << tab_bits) - 1)).astype(np.int32)
    grouping = (torch.from_numpy(order), torch.from_numpy(offsets))
    return (
        torch.from_numpy(sv[starts]),
        torch.from_numpy(key_tabs),
        torch.from_numpy(inverse.astype(np.int64, copy=False)),
        grouping,
    )


def _exact_dedup(values: torch.Tensor, tabs: torch.Tensor):
    """Sort-based dedup on any device.

    Pairs are keyed by ``id ^ (table * K)``. Two different pairs can share a key only with
    different tables, which the check below detects (each key must map back to one table); the
    lexicographic ``unique`` over pairs then runs instead, so no ids ever merge.
    """
    tabs = tabs.to(torch.int32)
    key = values ^ (tabs.to(torch.int64) * _TABLE_MIX)
    n = key.numel()
    sorted_key, order = torch.sort(key)
    flags = torch.ones(n, dtype=torch.bool, device=key.device)
    if n > 1:
        torch.ne(sorted_key[1:], sorted_key[:-1], out=flags[1:])
    starts = true_positions(flags)
    inverse = torch.empty(n, dtype=torch.int64, device=key.device)
    inverse.index_copy_(0, order, torch.cumsum(flags, 0) - 1)
    uniq = sorted_key.index_select(0, starts)
    key_tabs = torch.empty(uniq.numel(), dtype=torch.int32, device=values.device)
    key_tabs.scatter_(0, inverse, tabs)
    if not torch.equal(key_tabs.index_select(0, inverse), tabs):
        pairs = torch.stack([tabs.to(torch.int64), values], dim=1)
        up, inverse = torch.unique(pairs, dim=0, return_inverse=True)
        return up[:, 1].contiguous(), up[:, 0].to(torch.int32), inverse, None
    grouping = (order, torch.cat([starts, torch.tensor([n], device=key.device)]))
    return uniq ^ (key_tabs.to(torch.int64) * _TABLE_MIX), key_tabs, inverse, grouping


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
        self.name = name or option.shared_name or "embedding"
        self.engine = EmbeddingEngine({self.name: option.replace(shared_name=self.name)})

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
