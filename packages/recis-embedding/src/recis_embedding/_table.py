"""``HashTable``: dynamic embedding rows keyed by full 64-bit ids, with optimizer state beside them."""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import numpy as np
import torch

from recis_embedding._host import first_occurrence, on_host, true_positions
from recis_embedding._initializers import Initializer, TruncatedNormal, init_rows
from recis_embedding._numbers import default_value_error
from recis_embedding.exceptions import ConfigError, InputError, TableFullError
from recis_kernels import IdMap, RowStore
from recis_kernels.ops.hash_table import MAX_LOAD_FACTOR, check_load_factor

if TYPE_CHECKING:
    from recis_embedding._policies import AdmissionPolicy, EvictionPolicy

__all__ = ["HashTable", "TableOf", "TableStats"]

_BLOCK_ROWS = 1 << 16
#: the per-row record arrays of a table (see ``HashTable.__init__``), grown and reset together
_RECORDS = ("inserted", "last_seen", "frequency", "_dirty", "_saved")
_INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@dataclasses.dataclass(frozen=True)
class TableStats:
    """Counters of one physical table (all its logical tables together).

    The counters (``lookups`` to ``evictions``) count from the table's creation in this process:
    checkpoints do not hold them, so a resumed run counts from 0 again, and loading one adds
    nothing to them. ``rows``, ``slots`` and ``bytes`` describe the table as it is.

    Attributes:
        rows: live keys.
        capacity: maximum live keys (``None``: unbounded).
        slots: slots of the id map (grows by rehash).
        bytes: bytes the table holds: row storage, id map, the per-row records (insertion
            and last-seen steps, uses, change flags), an admission policy's counters and
            the notes eviction policies keep between calls (:class:`StaleEviction`'s ids due
            before its next scan, ``CapacityEviction("lru")``'s coldest rows).
        lookups: ids passed to :meth:`HashTable.find` and :meth:`HashTable.find_or_insert`
            (training and eval). An id repeated within one call counts each time; the
            embedding engine deduplicates each batch first, so through it this counts the
            distinct ``(table, id)`` keys of each batch.
        inserts: keys inserted by lookups and :meth:`HashTable.insert_or_assign` (not the
            keys a checkpoint load restores).
        hits: of those lookups, the ids found in the table.
        admissions_rejected: ids an admission policy kept out.
        evictions: keys removed by an eviction policy.
    """

    rows: int
    capacity: int | None
    slots: int
    bytes: int
    lookups: int
    inserts: int
    hits: int
    admissions_rejected: int
    evictions: int


def _placed(name: str, device: torch.device | str | None) -> torch.device:
    """The device a table lives on, with its index: ``"cuda"`` is the current CUDA device
    (``cuda:0`` unless ``torch.cuda.set_device`` said otherwise), the device every tensor made
    on ``"cuda"`` reports, so ids compare equal to it; ``"cpu:0"`` is ``"cpu"``, the device
    every CPU tensor reports."""
    where = torch.device(device) if device is not None else torch.device("cpu")
    if where.type in ("cpu", "meta"):
        return torch.device(where.type)
    if where.index is not None:
        return where
    try:
        return torch.empty(0, device=where).device
    except (RuntimeError, AssertionError) as err:
        raise ConfigError(
            f"table {name!r}: device {str(where)!r} is not usable here: {err}"
        ) from err


class TableOf:
    """How a table's handle (the tensor an optimizer holds for it) leads back to the table:
    weakly, so that a table and its handle form no reference cycle and a table nothing uses
    any more is freed at once, not at some later garbage collection (with its rows, and for
    a sharded table its process group: destroyed that late, a gloo group can abort or hang
    the process). Whatever holds a handle holds its table too (a sparse optimizer keeps its
    tables). Pickled and copied, it takes the table along, as the plain reference did.
    """

    __slots__ = ("_ref",)

    def __init__(self, table: HashTable) -> None:
        self._ref = weakref.ref(table)

    def __call__(self) -> HashTable | None:
        """The table, or ``None`` once it is gone."""
        return self._ref()

    def __reduce__(self) -> tuple[Any, tuple[HashTable | None]]:
        return (TableOf, (self._ref(),))


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _exclusive(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """Runs a method that may insert or erase keys under the table's lock: it finds which ids
    are absent, then inserts them, and two threads doing so at once would each insert the same
    id (two rows for one id). Reads need no lock (the id map serializes its own calls)."""

    @functools.wraps(method)
    def locked(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with args[0]._mutex:  # type: ignore[attr-defined]
            return method(*args, **kwargs)

    return locked


class HashTable:
    """Embedding rows for one or more logical tables, keyed by ``(table, int64 id)``.

    Each row holds the embedding (in ``dtype``, packed into float32 words) followed by the
    optimizer state in float32, so one gather brings everything an update needs. Rows live in
    fixed-size blocks that grow without copying; the id map grows by rehash. Every int64 id,
    including ``0``, ``-1``, ``INT64_MIN`` and ``INT64_MAX``, is a valid key, and fused logical
    tables keep all 64 id bits.

    Args:
        embedding_dim: columns per embedding.
        name: name of logical table 0.
        initializer: initializer of logical table 0 (default ``TruncatedNormal(std=0.01)``).
        dtype: storage dtype of embeddings: float32, bfloat16 or float16.
        device: where the rows live.
        capacity: maximum live keys (default unbounded).
        default_value: what :meth:`lookup` returns for an absent id.
        max_load_factor: how full the id map's slots may get before it doubles, in
            ``(0, 0.9]``. The map spends 21 bytes a slot: 42 to 84 per live id at 0.5 (the
            default), 28 to 56 at 0.75, at the price of longer probes.

    Example:
        >>> t = HashTable(4, name="user")
        >>> rows, is_new = t.find_or_insert(torch.tensor([42, -1]))
        >>> t.embeddings(torch.tensor([42])).shape
        torch.Size([1, 4])
    """

    def __init__(
        self,
        embedding_dim: int,
        *,
        name: str = "table",
        initializer: Initializer | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        capacity: int | None = None,
        default_value: float = 0.0,
        max_load_factor: float = MAX_LOAD_FACTOR,
    ) -> None:
        if (
            isinstance(embedding_dim, bool)
            or not isinstance(embedding_dim, (int, np.integer))
            or embedding_dim < 1
        ):
            raise ConfigError(f"embedding_dim must be an int >= 1, got {embedding_dim!r}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        if capacity is not None and (
            isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1
        ):
            raise ConfigError(f"capacity must be an int >= 1 or None, got {capacity!r}")
        wrong = default_value_error(default_value)
        if wrong is not None:
            raise ConfigError(f"table {name!r}: {wrong}")
        try:
            load_factor = check_load_factor(f"table {name!r}", max_load_factor)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.dim = int(embedding_dim)
        self.dtype = dtype
        self.device = _placed(name, device)
        self.capacity = capacity
        self.default_value = float(default_value)
        elem = torch.empty(0, dtype=dtype).element_size()
        self.emb_words = math.ceil(self.dim * elem / 4)
        self.names: list[str] = []
        self.initializers: list[Initializer] = []
        self.optimizer_kind: str | None = None
        self.slots: list[tuple[str, int]] = []
        self.state_width = 0
        self._state_init = torch.empty(0)
        self._mutex = threading.RLock()  # see _exclusive
        self._map = IdMap(device=self.device, max_load_factor=load_factor)
        self._store = RowStore(self.emb_words, torch.float32, _BLOCK_ROWS, self.device)
        self._counts = dict.fromkeys(
            ("lookups", "inserts", "hits", "admissions_rejected", "evictions"), 0
        )
        # Hits of lookups on a GPU, summed there and read by stats(): reading each lookup's
        # count would synchronize every lookup only for a statistic.
        self._device_hits: torch.Tensor | None = None
        self.admission: AdmissionPolicy | None = None
        self.eviction: EvictionPolicy | None = None
        # What the admission policy keeps per table (FrequencyAdmission: its counters); it
        # lives here so that copies of the table carry it.
        self.admission_state: Any = None
        # An admission policy's decision on the lookup in progress, until it is inserted.
        self._admission_pending: Any = None
        self.step = 0
        # Per row, for eviction policies: the step a row was inserted at, the last step
        # training looked it up, and its training uses.
        self.inserted = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.last_seen = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.frequency = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._dirty = torch.zeros(0, dtype=torch.bool, device=self.device)
        # Per row: whether it held its id at the last save (or load). Only the erasure of such
        # a row is news to the next delta; one inserted since (and evicted again) is not, and
        # recording it would grow ``_erased`` with every eviction of a long run.
        self._saved = torch.zeros(0, dtype=torch.bool, device=self.device)
        # What the eviction policy keeps between calls (StaleEviction: the ids that may turn
        # stale before its next scan; CapacityEviction("lru"): the coldest rows, in order);
        # dropped wherever rows' last-seen steps are set other than by a training lookup.
        self._eviction_note: Any = None
        # While an eviction policy makes room: the rows it must not evict (see _evicting).
        self._protected: torch.Tensor | None = None
        self._erased: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.pending: list = []  # recis_embedding._sharding.Pending entries
        self.last_checkpoint: object = None
        # torch optimizers only accept tensors; this empty leaf stands for the table, and
        # leads back to it weakly (see TableOf).
        self.handle = torch.empty(0)
        self.handle._recis_table = TableOf(self)  # type: ignore[attr-defined]
        self.add_table(name, initializer or TruncatedNormal(std=0.01))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_mutex", None)  # a lock does not pickle; a copy gets its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch.load(map_location=...) moves the table's tensors but not its recorded device,
        # which checks and kernel launches go by: the table lives where its tensors are.
        self.__dict__.update(state)
        self._mutex = threading.RLock()
        self.__dict__.setdefault("_device_hits", None)  # pickles from before the count existed
        # Pickles from before eviction kept a note, or when only stale eviction did.
        self.__dict__.setdefault("_eviction_note", self.__dict__.pop("_stale_scan", None))
        if "_saved" not in self.__dict__:
            # A pickle from before the flag: every row counts as saved where the table was
            # saved or loaded (erasures then kept as before), none where it never was.
            saved = self.__dict__.get("last_checkpoint") is not None
            self._saved = torch.full_like(self._dirty, saved)
        self.device = self.inserted.device
        self._map.device = self._store.device = self.device

    # ----------------------------------------------------------------- logical tables
    def add_table(self, name: str, initializer: Initializer) -> int:
        """Register a logical table in this physical table; returns its table index."""
        if name in self.names:
            raise ConfigError(f"table {name!r} is already part of this hash table")
        if not isinstance(initializer, Initializer):
            raise ConfigError(
                f"table {name!r}: initializer must be an Initializer, got {initializer!r}"
            )
        self.names.append(name)
        self.initializers.append(initializer)
        return len(self.names) - 1

    def table_index(self, table: int | str) -> int:
        """Index of a logical table given by index or name."""
        if isinstance(table, str):
            if table not in self.names:
                raise InputError(f"no table {table!r} in this hash table (tables: {self.names})")
            return self.names.index(table)
        if isinstance(table, bool) or not isinstance(table, int):
            raise InputError(f"table must be a table name or index, got {table!r}")
        if not 0 <= table < len(self.names):
            raise InputError(f"table index {table} out of range [0, {len(self.names)})")
        return table

    def _tables(
        self, what: str, ids: torch.Tensor, table: int | str | torch.Tensor
    ) -> torch.Tensor | int:
        if not isinstance(table, torch.Tensor):
            return self.table_index(table)
        if table.dtype not in _INDEX_DTYPES:
            raise InputError(
                f"HashTable.{what}: table indices must be an integer tensor, got {table.dtype}"
            )
        if table.shape != ids.shape:
            raise InputError(
                f"HashTable.{what}: table indices of shape {tuple(table.shape)}, expected "
                f"{tuple(ids.shape)} like the ids"
            )
        if table.device != self.device:
            raise InputError(
                f"HashTable.{what}: table indices are on {table.device}, the table lives on "
                f"{self.device}"
            )
        if on_host(table):
            # Device indices are checked where ids are inserted only: reading them here
            # would synchronize every lookup.
            self._check_table_range(what, table)
        return table

    def _check_table_range(self, what: str, tabs: torch.Tensor) -> None:
        if tabs.numel() == 0:
            return
        low, high = (int(v) for v in torch.aminmax(tabs))
        if low < 0 or high >= len(self.names):
            raise InputError(
                f"HashTable.{what}: table index {low if low < 0 else high} out of range "
                f"[0, {len(self.names)})"
            )

    def _check_ids(self, what: str, ids: torch.Tensor) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 1:
            got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids)
            raise InputError(f"HashTable.{what}: ids must be a 1-d int64 tensor, got {got}")
        if ids.device != self.device:
            raise InputError(
                f"HashTable.{what}: ids are on {ids.device}, the table lives on {self.device}"
            )

    def _check_tensor(
        self, what: str, name: str, value: object, dtype: torch.dtype, shape: tuple[int, ...]
    ) -> None:
        """Raise :class:`InputError` unless ``value`` is a ``dtype`` tensor of ``shape`` on the
        table's device."""
        if (
            isinstance(value, torch.Tensor)
            and value.dtype == dtype
            and tuple(value.shape) == shape
            and value.device == self.device
        ):
            return
        got = (
            f"{value.dtype} {tuple(value.shape)} on {value.device}"
            if isinstance(value, torch.Tensor)
            else type(value).__name__
        )
        raise InputError(
            f"HashTable.{what}: {name} must be a {str(dtype).removeprefix('torch.')} tensor of "
            f"shape {shape} on {self.device}, got {got}"
        )

    # ----------------------------------------------------------------- lookups
    def find(self, ids: torch.Tensor, table: int | str | torch.Tensor = 0) -> torch.Tensor:
        """Rows of ``ids`` (``-1`` where absent); never inserts.

        Args:
            ids: ``(N,) int64``.
            table: logical table (index or name), or ``(N,)`` table indices.

        Returns:
            ``(N,) int64`` row indices.
        """
        self._check_ids("find", ids)
        rows = self._map.find(ids, self._tables("find", ids, table))
        self._counts["lookups"] += ids.numel()
        hits = (rows >= 0).sum()
        if rows.device.type == "cpu":
            self._counts["hits"] += int(hits)
        else:
            pending = self._device_hits
            self._device_hits = hits if pending is None else pending + hits
        return rows

    @_exclusive
    def find_or_insert(
        self,
        ids: torch.Tensor,
        table: int | str | torch.Tensor = 0,
        *,
        admit: torch.Tensor | None = None,
        distinct: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of ``ids``, inserting absent ones with their initial vectors.

        Args:
            ids: ``(N,) int64``, duplicates allowed.
            table: logical table (index or name), or ``(N,)`` table indices.
            admit: optional ``(N,) bool``: absent ids with ``False`` are not inserted (row
                ``-1``), unless the same id is admitted at another position of the call: every
                position of an id reads the one answer.
            distinct: no ``(id, table)`` pair repeats in the call (deduplicated ids, as the
                embedding engine passes), which spares deduplicating the new ones.

        Returns:
            ``(rows (N,) int64, is_new (N,) bool)``.

        Raises:
            InputError: ``ids``, table indices or ``admit`` of the wrong dtype, shape or device,
                or a table index out of range (indices on a GPU are checked for the ids to
                insert only, so that lookups do not synchronize).
            TableFullError: inserting would exceed ``capacity`` (nothing is inserted then).

        An initializer that raises inserts nothing either.
        """
        self._check_ids("find_or_insert", ids)
        tabs = self._tables("find_or_insert", ids, table)
        if admit is not None:
            self._check_tensor("find_or_insert", "admit", admit, torch.bool, tuple(ids.shape))
        if isinstance(tabs, int):
            tabs = torch.full_like(ids, tabs, dtype=torch.int32)
        rows = self._map.find(ids, tabs)
        self._counts["lookups"] += ids.numel()
        miss = rows < 0
        is_new = torch.zeros_like(miss)
        missing = int(miss.sum())  # one read serves the branch and the statistic
        self._counts["hits"] += ids.numel() - missing
        if not missing:
            return rows, is_new
        refused = None
        if admit is not None:
            if not distinct:
                refused = miss & ~admit
            miss = miss & admit
        idx = true_positions(miss)
        if idx.numel() == 0:
            return rows, is_new
        new_ids, new_tabs = ids[idx], tabs[idx]
        if not on_host(new_tabs):
            self._check_table_range("find_or_insert", new_tabs)
        self._check_capacity(new_ids, new_tabs, rows, distinct)
        # The map just reported these absent: insert them without a second lookup.
        new_rows = self._map.insert_absent(new_ids, new_tabs, distinct=distinct)
        try:
            self._initialize(new_rows, new_ids, new_tabs, distinct=distinct)
        except BaseException:
            # An initializer failed: the keys must not stay in the map without their rows.
            self._map.erase(new_ids, new_tabs)
            raise
        # An eviction policy's note that follows inserts (CapacityEviction("lfu")'s).
        record = getattr(self._eviction_note, "record_inserts", None)
        if record is not None:
            record(new_ids, new_tabs)
        rows[idx] = new_rows
        is_new[idx] = True
        if refused is not None:
            # A position refused admission whose id another position of this call inserted
            # reads that row too (one answer per id); the others stay -1.
            again = true_positions(refused)
            if again.numel():
                found = self._map.find(ids[again], tabs[again])
                rows[again] = found
                is_new[again] = found >= 0
        return rows, is_new

    def _check_capacity(
        self, ids: torch.Tensor, tabs: torch.Tensor, rows: torch.Tensor, distinct: bool
    ) -> None:
        """Make room for the absent ``ids`` (evicting, but never the found ``rows >= 0``) or
        raise :class:`TableFullError`; ``distinct``: no ``(id, table)`` pair repeats."""
        if self.capacity is None:
            return
        # Rows read by earlier lookups whose gradients are still pending (gradient
        # accumulation, or several lookups per step) are in use too: evicting one would hand
        # its row, and the gradient waiting for it, to a new id. A lookup an optimizer step
        # already went past (kept until zero_grad(), which the usual loop calls after the next
        # forward) is not: its rows may go, and erasing them unlinks them from it.
        protect = torch.cat([rows, *(p.rows for p in self.pending if not p.stepped)])
        protect = protect[protect >= 0]
        if distinct:
            needed = ids.numel()
        else:
            needed = torch.unique(torch.stack([ids, tabs.to(torch.int64)], dim=1), dim=0).shape[0]
        over = self._map.size + needed - self.capacity
        if over <= 0:
            return
        eviction, policy = self.eviction, type(self.eviction).__name__
        if eviction is None:
            advice = "set an eviction policy or a larger capacity"
        elif needed > self.capacity - protect.unique().numel():
            advice = (
                f"the rows {policy} may not evict (read by this lookup or by earlier lookups "
                "of this optimizer step) leave too little room; set a larger capacity"
            )
        elif not self._evicting(
            lambda: eviction.make_room(self, over, protect), _guard(eviction, protect)
        ):
            advice = (
                f"{policy} does not evict to make room; set a larger capacity, or use "
                "CapacityEviction"
            )
        elif self._map.size + needed > self.capacity:
            raise TableFullError(
                f"table {self.names[0]!r}: {policy}.make_room reported room for {needed} new "
                f"ids but left {self._map.size} rows of capacity {self.capacity}"
            )
        else:
            return
        raise TableFullError(
            f"table {self.names[0]!r} is full: {self._map.size} rows, capacity "
            f"{self.capacity}, {needed} new ids; {advice}"
        )

    def _evicting(self, evict: Callable[[], Any], protect: torch.Tensor | None = None) -> Any:
        """Run an eviction policy's ``evict()``: the keys it erases count as evictions, and
        erasing a row of ``protect`` (in use by the current lookup) raises before any key goes."""
        before = self._map.size
        if protect is not None:
            in_use = torch.zeros(self._map.num_rows, dtype=torch.bool, device=protect.device)
            in_use[protect] = True
            self._protected = in_use
        try:
            return evict()
        finally:
            self._protected = None
            self.count("evictions", before - self._map.size)

    def _initialize(
        self, rows: torch.Tensor, ids: torch.Tensor, tabs: torch.Tensor, *, distinct: bool = False
    ) -> None:
        if not distinct:
            rows, first = first_occurrence(rows)
            ids, tabs = ids[first], tabs[first]
        self._store.reserve(self._map.num_rows)
        self._grow_row_arrays(self._map.num_rows)
        emb = init_rows(ids, tabs, self.dim, self.initializers, self.names)
        self._check_initial(emb, ids, tabs)
        full = torch.empty(rows.numel(), self.emb_words + self.state_width, device=self.device)
        full[:, : self.emb_words] = self._to_words(emb)
        if self.state_width:
            full[:, self.emb_words :] = self._state_init.to(self.device)
        self._store.scatter(rows, full)
        self._counts["inserts"] += rows.numel()
        self._start_records(rows)
        self._dirty[rows] = True

    def _start_records(self, rows: torch.Tensor) -> None:
        """The records of rows that now hold new ids: inserted and last seen at this step, no
        uses yet, and in no save (their erasure is no news to the next delta)."""
        self.frequency[rows] = 0
        self.inserted[rows] = self.step
        self.last_seen[rows] = self.step
        self._saved[rows] = False

    def _check_initial(self, emb: torch.Tensor, ids: torch.Tensor, tabs: torch.Tensor) -> None:
        """Refuses initial rows that are not finite or that the table's dtype cannot hold
        (beyond float16's 65504 they would be stored as inf), as a load refuses such rows.

        One ``aminmax`` pass decides (NaN propagates to both ends); only a refused batch looks
        for its first bad row."""
        limit = torch.finfo(self.dtype).max if self.dtype != torch.float32 else math.inf
        if not emb.numel():
            return
        low, high = (float(v) for v in torch.aminmax(emb))
        if math.isfinite(low) and math.isfinite(high) and -limit <= low and high <= limit:
            return
        bad = ~(torch.isfinite(emb) & (emb.abs() <= limit)).all(dim=1)
        at = int(true_positions(bad)[0])
        t = int(tabs[at])
        values = emb[at].tolist()
        reason = (
            "not finite"
            if not all(math.isfinite(v) for v in values)
            else f"beyond the table's {str(self.dtype).removeprefix('torch.')} (max {limit:g})"
        )
        raise ConfigError(
            f"table {self.names[t]!r}: initializer {type(self.initializers[t]).__name__} gave id "
            f"{int(ids[at])} the values {values}, {reason}; nothing was inserted"
        )

    def _grow_row_arrays(self, n: int) -> None:
        if self.last_seen.numel() >= n:
            return
        size = max(n, 2 * self.last_seen.numel())
        for attr in _RECORDS:
            old = getattr(self, attr)
            new = torch.zeros(size, dtype=old.dtype, device=self.device)
            new[: old.numel()] = old
            setattr(self, attr, new)

    def lookup(self, ids: torch.Tensor, table: int | str | torch.Tensor = 0) -> torch.Tensor:
        """Embeddings of ``ids`` without inserting; absent ids read ``default_value``.

        Args:
            ids: ``(N,) int64``.
            table: logical table (index or name), or ``(N,)`` table indices.

        Returns:
            ``(N, dim) float32``.
        """
        rows = self.find(ids, table)
        out = torch.full((ids.numel(), self.dim), self.default_value, device=self.device)
        hit = true_positions(rows >= 0)
        out[hit] = self.read(rows[hit])
        return out

    # ----------------------------------------------------------------- rows
    def _to_words(self, emb: torch.Tensor) -> torch.Tensor:
        if self.dtype == torch.float32:
            return emb
        packed = torch.zeros(emb.shape[0], self.emb_words * 2, dtype=self.dtype, device=emb.device)
        packed[:, : self.dim] = emb
        return packed.view(torch.float32)

    def _from_words(self, words: torch.Tensor) -> torch.Tensor:
        if self.dtype == torch.float32:
            return words
        return words.contiguous().view(self.dtype)[:, : self.dim].to(torch.float32)

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        """``(N, dim) float32`` embeddings of existing rows."""
        return self._from_words(self._store.gather(rows, 0, self.emb_words))

    def write(self, rows: torch.Tensor, emb: torch.Tensor) -> None:
        """Overwrite the embeddings of distinct existing rows with ``(N, dim)`` values."""
        self._store.scatter(rows, self._to_words(emb.to(torch.float32)))
        self._dirty[rows] = True

    def read_full(self, rows: torch.Tensor) -> torch.Tensor:
        """``(N, emb_words + state_width) float32``: packed embedding words and optimizer state."""
        return self._store.gather(rows)

    def write_full(self, rows: torch.Tensor, full: torch.Tensor) -> None:
        """Overwrite whole rows (distinct) with values laid out as :meth:`read_full` returns."""
        self._store.scatter(rows, full)
        self._dirty[rows] = True

    def full_rows(
        self, embeddings: torch.Tensor, slots: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Whole rows laid out as :meth:`read_full` returns them (for :meth:`insert_or_assign`).

        Args:
            embeddings: ``(N, dim)`` floating embeddings, stored in the table's dtype.
            slots: optimizer slot name to its ``(N, width)`` values; a slot not given takes its
                initial value.

        Raises:
            InputError: embeddings or a slot of the wrong shape, or a slot the table lacks.
        """
        n = embeddings.shape[0] if embeddings.dim() == 2 else -1
        if n < 0 or embeddings.shape[1] != self.dim:
            raise InputError(
                f"HashTable.full_rows: embeddings of shape {tuple(embeddings.shape)}, expected "
                f"(N, {self.dim})"
            )
        given = dict(slots or {})
        unknown = sorted(set(given) - {name for name, _ in self.slots})
        if unknown:
            raise InputError(
                f"HashTable.full_rows: no optimizer slot(s) {unknown} "
                f"(slots: {[name for name, _ in self.slots]})"
            )
        parts = [self._to_words(embeddings.to(device=self.device, dtype=torch.float32))]
        for name, width in self.slots:
            if name not in given:
                parts.append(self.state_init(name).expand(n, width))
                continue
            values = given[name]
            if tuple(values.shape) != (n, width):
                raise InputError(
                    f"HashTable.full_rows: slot {name!r} of shape {tuple(values.shape)}, "
                    f"expected ({n}, {width})"
                )
            parts.append(values.to(device=self.device, dtype=torch.float32))
        return torch.cat(parts, dim=1)

    @_exclusive
    def insert_or_assign(
        self,
        ids: torch.Tensor,
        full: torch.Tensor,
        table: int | str | torch.Tensor = 0,
        *,
        distinct: bool = False,
        counted: bool = True,
    ) -> torch.Tensor:
        """Set the whole rows of ``ids`` to ``full``, inserting absent ids without running the
        initializer (restoring saved rows, say, whose initial vectors would only be overwritten).

        Inserted rows start with frequency 0 and the current step as insertion and last-seen
        step, as :meth:`find_or_insert` gives them; every written row counts as changed for the
        next delta checkpoint.

        Args:
            ids: ``(N,) int64``. An id given twice takes its last values.
            full: ``(N, emb_words + state_width) float32`` rows laid out as :meth:`read_full`
                returns them.
            table: logical table (index or name), or ``(N,)`` table indices.
            distinct: no ``(id, table)`` pair repeats in the call, which spares deduplicating
                (found without asking when ``table`` is one index and ``ids`` strictly increase).
            counted: add the absent ids to :meth:`stats`' ``inserts`` (checkpoint loads pass
                ``False``: they restore keys the table held, they insert no new ones).

        Returns:
            ``(N,) int64`` rows.

        Raises:
            InputError: ``ids``, table indices or ``full`` of the wrong dtype, shape or device,
                or a table index out of range.
            TableFullError: inserting would exceed ``capacity`` (nothing is inserted then).
        """
        self._check_ids("insert_or_assign", ids)
        tabs = self._tables("insert_or_assign", ids, table)
        width = self.emb_words + self.state_width
        self._check_tensor("insert_or_assign", "full", full, torch.float32, (ids.numel(), width))
        if isinstance(tabs, int):
            distinct = distinct or _strictly_increasing(ids)
            tabs = torch.full_like(ids, tabs, dtype=torch.int32)
        # An empty table (a restore into a new model) has nothing to find.
        rows = self._map.find(ids, tabs) if len(self) else torch.full_like(ids, -1)
        idx = true_positions(rows < 0)
        if idx.numel():
            new_ids, new_tabs = ids[idx], tabs[idx]
            if not on_host(new_tabs):
                self._check_table_range("insert_or_assign", new_tabs)
            self._check_capacity(new_ids, new_tabs, rows, distinct)
            new_rows = self._map.insert_absent(new_ids, new_tabs, distinct=distinct)
            self._store.reserve(self._map.num_rows)
            self._grow_row_arrays(self._map.num_rows)
            rows[idx] = new_rows
            if counted:
                self._counts["inserts"] += idx.numel() if distinct else new_rows.unique().numel()
            self._start_records(new_rows)
        # The caller may set these rows' last-seen steps next (a checkpoint load does).
        self._eviction_note = None
        if distinct:
            self._store.scatter(rows, full)
        else:
            # A repeated id's rows are written once, with its last values.
            last = rows.numel() - 1 - first_occurrence(rows.flip(0))[1]
            self._store.scatter(rows[last], full[last])
        self._dirty[rows] = True
        return rows

    def update_full(
        self,
        rows: torch.Tensor,
        fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    ) -> None:
        """Update whole rows (distinct) in place: ``fn(full, which)`` gets rows laid out as
        :meth:`read_full` returns, in the order ``rows[which]`` (``which`` ``None``: the order
        of ``rows``), and returns their new values in that order. Cheaper than a read and a
        write: the row store picks the order that costs least (see ``RowStore.update``)."""
        self._store.update(rows, fn)
        self._dirty[rows] = True

    def update_in_store(
        self, rows: torch.Tensor, fn: Callable[[RowStore, dict[str, int]], None]
    ) -> None:
        """Update distinct ``rows`` where they live: ``fn(store, columns)`` gets the row store
        (rows laid out as :meth:`read_full` returns them) and the first column of each
        optimizer slot, and changes those rows in place (an in-place optimizer kernel). The
        rows count as changed for the next delta checkpoint."""
        fn(self._store, {name: self._slot_range(name)[0] for name, _ in self.slots})
        self._dirty[rows] = True

    def read_slot(self, rows: torch.Tensor, slot: str) -> torch.Tensor:
        """``(N, width)`` float32 optimizer slot ``slot`` of existing rows."""
        start, stop = self._slot_range(slot)
        return self._store.gather(rows, start, stop)

    def write_slot(self, rows: torch.Tensor, slot: str, values: torch.Tensor) -> None:
        """Overwrite optimizer slot ``slot`` of distinct existing rows."""
        start, _ = self._slot_range(slot)
        self._store.scatter(rows, values.to(torch.float32), start)
        self._dirty[rows] = True

    def _slot_range(self, slot: str) -> tuple[int, int]:
        start = self.emb_words
        for name, width in self.slots:
            if name == slot:
                return start, start + width
            start += width
        raise InputError(f"no optimizer slot {slot!r} (slots: {[s for s, _ in self.slots]})")

    # ----------------------------------------------------------------- optimizer state
    def configure_state(
        self, kind: str, slots: Sequence[tuple[str, int]], init: torch.Tensor
    ) -> None:
        """Lay rows out for optimizer ``kind`` (state columns initialized to ``init``).

        Existing rows keep their embeddings; their new state columns take ``init``, and they
        count as changed for the next delta checkpoint. A later optimizer of the same kind (one
        built again, say for the next stage) keeps every row's state, and rows inserted from
        then on start from its ``init``.
        """
        if self.optimizer_kind == kind and list(slots) == self.slots:
            self._state_init = init.to(torch.float32).clone()
            return
        if self.optimizer_kind is not None:
            raise ConfigError(
                f"table {self.names[0]!r} already has optimizer state for {self.optimizer_kind!r}; "
                f"one sparse optimizer per table"
            )
        width = sum(w for _, w in slots)
        old = self._store
        self._store = RowStore(self.emb_words + width, torch.float32, _BLOCK_ROWS, self.device)
        self._store.reserve(old.capacity)
        # Only the rows ever used: an insert writes a whole row, state included, and a CPU
        # block's pages past them take no memory until written (see RowStore).
        used = self._map.num_rows
        for i, block in enumerate(old.blocks):
            n = min(block.shape[0], used - i * old.block_rows)
            if n <= 0:
                break
            self._store.blocks[i][:n, : self.emb_words] = block[:n]
            self._store.blocks[i][:n, self.emb_words :] = init
        self.optimizer_kind, self.slots, self.state_width = kind, list(slots), width
        self._state_init = init.to(torch.float32).clone()
        # Every row's state changed (to ``init``): the next delta checkpoint saves them all, or
        # a chain would give them back the state of an earlier checkpoint.
        self._dirty.fill_(True)

    def state_init(self, slot: str) -> torch.Tensor:
        """Initial value of optimizer slot ``slot`` for a new row, ``(width,) float32``."""
        start, stop = self._slot_range(slot)
        off = self.emb_words
        return self._state_init[start - off : stop - off].to(self.device)

    # ----------------------------------------------------------------- checkpoint support
    @_exclusive
    def clear(self) -> None:
        """Remove every key and row, as erasing each of them would: the next delta checkpoint
        records the erasures. The step, logical tables, optimizer layout and counters stay;
        admission counts of ids not admitted yet are dropped."""
        keys, tabs, _ = self._map.export()
        self._erase(keys, tabs)
        self.admission_state = None

    @_exclusive
    def _reset(self) -> None:
        """Forget everything a checkpoint holds, before one is loaded: keys, rows, admission
        counts and the step (the loaded checkpoint sets it)."""
        self._map.clear()
        self._store = RowStore(
            self.emb_words + self.state_width, torch.float32, _BLOCK_ROWS, self.device
        )
        for attr in _RECORDS:
            setattr(self, attr, getattr(self, attr)[:0].clone())
        self._erased.clear()
        self.pending.clear()
        self.admission_state = None
        self._eviction_note = None
        self.step = 0

    def mark_saved(self, path: object) -> None:
        """Record a save (or load) at ``path``: later deltas hold changes made after it."""
        self.last_checkpoint = path
        self._dirty.zero_()
        # Every row holding an id now is in the save; a free row is marked too, harmlessly:
        # an insert clears its mark before it can hold an id to erase.
        self._saved.fill_(True)
        self._erased.clear()

    def mark_changed(self, rows: torch.Tensor) -> None:
        """Record that ``rows`` changed other than through a write (their eviction statistics),
        so the next delta checkpoint saves them; ``-1`` entries are ignored."""
        self._dirty[rows[rows >= 0]] = True

    def dirty_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """``(N,) bool``: which rows changed since the last save."""
        return self._dirty[rows]

    def erased_ids(self, table: int) -> torch.Tensor:
        """Ids of logical table ``table`` erased since the last save."""
        parts = [ids[tabs == table] for ids, tabs in self._erased]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    # ----------------------------------------------------------------- erase and export
    def erase(self, ids: torch.Tensor, table: int | str | torch.Tensor = 0) -> int:
        """Remove ids (absent ones are ignored); returns how many were removed."""
        self._check_ids("erase", ids)
        return self._erase(ids, self._tables("erase", ids, table))

    @_exclusive
    def _erase(self, ids: torch.Tensor, tabs: torch.Tensor | int) -> int:
        if isinstance(tabs, int):
            tabs = torch.full_like(ids, tabs, dtype=torch.int32)
        rows = self._map.find(ids, tabs)
        present = rows >= 0
        rows = rows[present]
        protected = getattr(self, "_protected", None)
        if protected is not None and bool(protected[rows].any()):
            raise TableFullError(
                f"table {self.names[0]!r}: {type(self.eviction).__name__}.make_room tried to "
                "evict a row in use by this lookup (or an earlier one of this optimizer step), "
                "which the new ids would take over; a policy must leave the rows it is given "
                "as protect"
            )
        ids, tabs = ids[present], tabs[present]
        freed = self._map.erase(ids, tabs)
        if freed.numel():
            # The next delta must erase the ids the last save holds; an id inserted since is
            # in no save (and a table never saved has no delta to come).
            news = self._saved[rows]
            if bool(news.any()):
                self._erased.append((ids[news], tabs[news]))
            # A pending gradient of a freed row must not reach the id that reuses the row.
            for p in self.pending:
                p.rows = torch.where(torch.isin(p.rows, freed), -1, p.rows)
        return int(freed.numel())

    def export(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids, table indices, rows)`` of every live key, sorted by table then id."""
        keys, tabs, rows = self._map.export()
        order = _by_table_then_id(keys, tabs, len(self.names))
        return keys.index_select(0, order), tabs.index_select(0, order), rows.index_select(0, order)

    def ids(self, table: int | str = 0) -> torch.Tensor:
        """``(K,) int64`` ids of a logical table, ascending."""
        t = self.table_index(table)
        keys, tabs, _ = self._map.export()
        if len(self.names) > 1:
            keys = keys[tabs == t]  # then only this table's ids are sorted
        if on_host(keys):
            return torch.from_numpy(np.sort(keys.numpy()))
        return torch.sort(keys).values

    def embeddings(self, ids: torch.Tensor | None = None, table: int | str = 0) -> torch.Tensor:
        """``(K, dim) float32`` embeddings of ``ids`` (default: all ids of the table, ascending).

        Absent ids read ``default_value``.
        """
        if ids is None:
            ids = self.ids(table)
        return self.lookup(ids, table)

    def __len__(self) -> int:
        return self._map.size

    def stats(self) -> TableStats:
        """Current counters; see :class:`TableStats`."""
        records = [getattr(self, attr) for attr in _RECORDS]
        held = (
            self._store.nbytes
            + _held_bytes(self._map)
            + _held_bytes(records)
            + _held_bytes(self._erased)
        )
        pending = self._device_hits
        if pending is not None:
            self._counts["hits"] += int(pending)
            self._device_hits = None
        return TableStats(
            rows=self._map.size,
            capacity=self.capacity,
            slots=self._map.capacity,
            bytes=held + _held_bytes(self.admission_state) + _held_bytes(self._eviction_note),
            **self._counts,
        )

    def count(self, key: str, n: int) -> None:
        """Add ``n`` to counter ``key``. The table counts admission rejections (keys a lookup
        left without a row) and evictions (keys erased while an eviction policy's
        ``after_step`` or ``make_room`` runs) itself: a policy does not count them again."""
        self._counts[key] += n


def _guard(eviction: Any, protect: torch.Tensor) -> torch.Tensor | None:
    """The rows a policy's ``make_room`` is checked against: ``protect``, unless the method
    is the package's own (whose tests hold it to never evicting them; the check costs a pass
    over the table's rows per eviction)."""
    from recis_embedding._policies import CapacityEviction, EvictionPolicy

    own = (CapacityEviction.make_room, EvictionPolicy.make_room)
    return None if type(eviction).make_room in own else protect


def _held_bytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj``: a tensor, an id map (:attr:`IdMap.nbytes`), or a
    tuple, list, dict or dataclass of those (what admission policies keep, eviction
    policies' notes); anything else counts 0."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, IdMap):
        return obj.nbytes
    if isinstance(obj, dict):
        return _held_bytes(list(obj.values()))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _held_bytes([getattr(obj, f.name) for f in dataclasses.fields(obj)])
    if isinstance(obj, (tuple, list)):
        return sum(_held_bytes(x) for x in obj)
    return 0


def _strictly_increasing(ids: torch.Tensor) -> bool:
    """Whether ``ids`` strictly increase (and so are distinct): one comparison pass, which
    saved ids (sorted when written) pass."""
    return ids.numel() < 2 or bool((ids[1:] > ids[:-1]).all())


def _ascending(keys: torch.Tensor) -> torch.Tensor:
    """An order sorting int64 ``keys`` ascending: on the host by NumPy's sort, vectorized where
    the CPU allows (AVX-512: about twice torch's), else by torch's."""
    if on_host(keys):
        return torch.from_numpy(np.argsort(keys.numpy()))
    return torch.argsort(keys)


def _by_table_then_id(keys: torch.Tensor, tabs: torch.Tensor, tables: int) -> torch.Tensor:
    """An order sorting ``(id, table index)`` keys by table, then id (``tables``: how many
    logical tables there are; with one, by id alone)."""
    order = _ascending(keys)
    if tables > 1:
        # Stable by table, so ids stay ascending within each.
        order = order.index_select(0, _stable_order(tabs.index_select(0, order)))
    return order


def _table_runs(tabs: torch.Tensor, tables: int) -> list[slice]:
    """Per logical table index, the run of ``tabs`` (sorted ascending) holding it."""
    ends = torch.bincount(tabs.to(torch.int64), minlength=tables).cumsum(0).tolist()
    return [slice(ends[i - 1] if i else 0, ends[i]) for i in range(tables)]


def _stable_order(tabs: torch.Tensor) -> torch.Tensor:
    """Stable ascending order of small non-negative integers (table indices, or step
    offsets): on the host by NumPy's radix sort of 16-bit keys (one linear pass) when they
    fit, else by torch's stable sort."""
    if on_host(tabs) and tabs.numel() and int(tabs.max()) < 1 << 16:
        return torch.from_numpy(np.argsort(tabs.numpy().astype(np.uint16), kind="stable"))
    return torch.argsort(tabs, stable=True)
