"""Admission and eviction policies for dynamic tables.

Admission decides, in training mode, whether an id that is not in its table yet gets a row; an
id held back reads the table's default value and receives no update. Eviction removes rows:
after optimizer steps (staleness) or to make room when a table with a ``capacity`` is full
(least-frequently or least-recently used). Every rejection and eviction is counted in
:meth:`HashTable.stats`; nothing is dropped silently.

Custom policies subclass :class:`AdmissionPolicy` or :class:`EvictionPolicy`;
:func:`register_policy` makes them constructible by name with :func:`make_policy` (for configs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from recis_embedding._host import first_occurrence, on_host, true_positions
from recis_embedding._initializers import check_seed, int64_bits, table_seed
from recis_embedding._numbers import plain, plain_fields
from recis_embedding.exceptions import ConfigError
from recis_kernels import IdMap, fmix64

if TYPE_CHECKING:
    from recis_embedding._table import HashTable

__all__ = [
    "AdmissionPolicy",
    "CapacityEviction",
    "EvictionPolicy",
    "FrequencyAdmission",
    "ProbabilityAdmission",
    "ReadOnlyAdmission",
    "StaleEviction",
    "make_policy",
    "register_policy",
]

_REGISTRY: dict[str, type] = {}
_BUILT_IN: set[str] = set()  # names of the built-in policies, which others may not take
_INT64_MAX = (1 << 63) - 1


def register_policy(name: str, cls: type | None = None):
    """Register a policy class under ``name`` (usable as a decorator)."""

    def add(c: type) -> type:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a policy name must be a non-empty str, got {name!r}")
        if not isinstance(c, type) or not issubclass(c, (AdmissionPolicy, EvictionPolicy)):
            raise ConfigError(
                f"policy {name!r} must be a class subclassing AdmissionPolicy or "
                f"EvictionPolicy, got {c!r}"
            )
        if name in _BUILT_IN and c is not _REGISTRY[name]:
            raise ConfigError(
                f"policy name {name!r} is a built-in policy's ({_REGISTRY[name].__name__}); "
                f"register {c.__name__} under another name"
            )
        _REGISTRY[name] = c
        return c

    return add(cls) if cls is not None else add


def make_policy(name: str, **kwargs: Any) -> AdmissionPolicy | EvictionPolicy:
    """Construct the policy registered as ``name``."""
    if not isinstance(name, str):
        raise ConfigError(f"a policy name must be a str, got {type(name).__name__} {name!r}")
    if name not in _REGISTRY:
        raise ConfigError(f"unknown policy {name!r} (registered: {sorted(_REGISTRY)})")
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"policy {name!r} does not take {sorted(kwargs)}: {exc}") from exc


def policy_key(policy: Any) -> Any:
    """What two tables' policies must share to be one table's: equal (``==``) policies of one
    class. A policy class without ``__eq__`` equals only itself, so separately built
    instances are different policies; give a custom policy ``__eq__`` and ``__hash__`` (a
    frozen dataclass has both) to let equal ones share a table."""
    if policy is None:
        return None
    try:
        hash(policy)
    except TypeError:
        return (type(policy), id(policy))  # unhashable: only the same object matches
    return (type(policy), policy)


class AdmissionPolicy:
    """Decides which absent ids get a row in training mode."""

    def admit(self, table: HashTable, ids: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """``(N,) bool`` for distinct ``(table, id)`` keys: may an absent key be inserted."""
        raise NotImplementedError

    def inserted(self, table: HashTable) -> None:
        """Called once the keys of the last :meth:`admit` of ``table`` were inserted; not
        called when that insert failed (:class:`~recis_embedding.TableFullError`). A policy
        that keeps state commits it here, so a failed lookup changes none (default: nothing).
        """

    def state(self, table: HashTable, index: int) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint for logical table ``index`` (default: none).

        Keys are stored as ``admission.<key>`` in the table's checkpoint file; rows must be
        aligned with an ``ids`` tensor so shards can be filtered by owner on load.
        """
        return {}

    def states(
        self, table: HashTable, indices: Sequence[int]
    ) -> dict[int, dict[str, torch.Tensor]]:
        """:meth:`state` of each of the logical tables ``indices`` of ``table``, by index: a
        checkpoint asks for those of a physical table together. Override it where one pass
        over the policy's state serves them all (default: :meth:`state` of each)."""
        return {index: self.state(table, index) for index in indices}

    def load_state(self, table: HashTable, index: int, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state` returned (default: nothing)."""

    def load_states(
        self, table: HashTable, states: Mapping[int, dict[str, torch.Tensor] | None]
    ) -> None:
        """:meth:`load_state` of several logical tables of ``table`` (by index), as a load
        restores a physical table's together; ``None``: the checkpoint holds no state for
        that table (saved without the policy), so it keeps none, not what it had before.
        Override it where one pass over the policy's state serves them all (default:
        :meth:`load_state` of each, a missing state given as :meth:`state`'s tensors emptied).
        """
        for index, state in states.items():
            if not state:
                state = {k: v[:0] for k, v in self.state(table, index).items()}
            if state:
                self.load_state(table, index, state)


@dataclass(frozen=True)
class ReadOnlyAdmission(AdmissionPolicy):
    """Never insert: training reads existing rows and updates them, unknown ids read the default."""

    def admit(self, table, ids, tables):
        absent = table._map.find(ids, tables) < 0
        return torch.zeros_like(absent)


@dataclass(frozen=True)
class ProbabilityAdmission(AdmissionPolicy):
    """Insert an absent id with probability ``p``, decided by a hash of (id, logical table
    name, seed, table step).

    Deterministic for a given id, table and step, so runs are reproducible, and the same
    whether or not the table is fused with others (the name, not the fused table index, enters
    the hash).
    """

    p: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        plain_fields(self)
        check_seed("ProbabilityAdmission", self.seed)
        p = self.p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ConfigError(f"ProbabilityAdmission needs 0 <= p <= 1, got {self.p}")

    def admit(self, table, ids, tables):
        salt = int64_bits((self.seed * 0x2545F4914F6CDD1D) ^ (table.step * 0x9E3779B1))
        names = torch.tensor(
            [table_seed(self.seed, name) for name in table.names],
            dtype=torch.int64,
            device=ids.device,
        )
        h = fmix64(ids ^ salt ^ names[tables.to(torch.int64)])
        u = ((h >> 11) & ((1 << 53) - 1)).to(torch.float64) / float(1 << 53)
        return u < self.p


class FrequencyAdmission(AdmissionPolicy):
    """Insert an id once it has been looked up in ``threshold`` batches (training mode).

    Until then it reads the default value and is counted in a side map, so the table itself
    holds only ids that proved frequent. The counts live with the table
    (``table.admission_state``), so a copy of a model (``copy.deepcopy``, ``pickle``) keeps
    counting where the original was, and one policy object may serve several tables. A count
    is kept until its id is admitted or the table is cleared: nothing bounds the side map (50
    to 100 bytes an id), so a long tail of ids seen once grows it for the whole run.

    Args:
        threshold: batches an id must appear in before it is admitted (1 admits at once).
    """

    def __init__(self, threshold: int = 2) -> None:
        threshold = plain(threshold)
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, int)
            or not 1 <= threshold <= _INT64_MAX
        ):
            raise ConfigError(
                f"FrequencyAdmission needs an int threshold in [1, 2**63 - 1], got {threshold!r}"
            )
        self.threshold = threshold

    def __repr__(self) -> str:
        return f"FrequencyAdmission(threshold={self.threshold})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.threshold == self.threshold  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.threshold))

    def state(self, table, index):
        return self.states(table, [index])[index]

    def states(self, table, indices):
        counter, counts = table.admission_state or (None, None)
        if counter is None or counts is None:
            return {
                i: {
                    "ids": torch.empty(0, dtype=torch.int64),
                    "counts": torch.empty(0, dtype=torch.int64),
                }
                for i in indices
            }
        from recis_embedding._table import _by_table_then_id, _table_runs

        # One export of the counters serves all the tables asked for.
        keys, tabs, rows = counter.export()
        live = true_positions(counts[rows] > 0)
        keys, tabs, seen = keys[live], tabs[live], counts[rows[live]]
        order = _by_table_then_id(keys, tabs, len(table.names))
        keys, tabs, seen = (x.index_select(0, order) for x in (keys, tabs, seen))
        runs = _table_runs(tabs, len(table.names))
        return {i: {"ids": keys[runs[i]], "counts": seen[runs[i]]} for i in indices}

    def load_state(self, table, index, state):
        self.load_states(table, {index: state})

    def load_states(self, table, states):
        # Each checkpoint holds the complete counters of its tables: replace, do not merge.
        # One export finds the old counts of all of them, one insert places the new ones.
        counter, counts = table.admission_state or (IdMap(device=table.device), None)
        if counter.size:
            keys, tabs, rows = counter.export()
            loading = torch.tensor(sorted(states), dtype=tabs.dtype, device=tabs.device)
            old = torch.isin(tabs, loading)
            counter.erase(keys[old], tabs[old])
            if counts is not None:
                counts[rows[old]] = 0
        given = [(i, s) for i, s in states.items() if s and s["ids"].numel()]
        if given:
            ids = torch.cat([s["ids"] for _, s in given]).to(table.device)
            seen = torch.cat([s["counts"] for _, s in given]).to(table.device)
            tabs = torch.cat(
                [torch.full((s["ids"].numel(),), i, dtype=torch.int32) for i, s in given]
            ).to(table.device)
            rows, _ = counter.find_or_insert(ids, tabs)
            counts = self._grow(counts, counter.num_rows, table.device)
            counts[rows] = seen
        table.admission_state = (counter, counts)

    @staticmethod
    def _grow(counts: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
        if counts is not None and counts.numel() >= n:
            return counts
        grown = torch.zeros(max(n, 16) * 2, dtype=torch.int64, device=device)
        if counts is not None:
            grown[: counts.numel()] = counts
        return grown

    def admit(self, table, ids, tables):
        table._admission_pending = None
        absent = table._map.find(ids, tables) < 0
        idx = true_positions(absent)
        ok = torch.ones_like(absent)
        if idx.numel() == 0:
            return ok
        counter, counts = table.admission_state or (IdMap(device=table.device), None)
        rows, _ = counter.find_or_insert(ids[idx], tables[idx])
        counts = self._grow(counts, counter.num_rows, table.device)
        table.admission_state = (counter, counts)
        seen = counts[rows] + 1
        ready = seen >= self.threshold
        ok[idx] = ready
        # The counts change in inserted(), once the insert went through: a lookup that fails
        # (TableFullError) takes no batch from an id's count.
        table._admission_pending = (rows, seen, ready, ids[idx], tables[idx])
        return ok

    def inserted(self, table):
        pending, table._admission_pending = table._admission_pending, None
        if pending is None:
            return
        rows, seen, ready, ids, tables = pending
        counter, counts = table.admission_state
        counts[rows] = seen
        if bool(ready.any()):
            done = true_positions(ready)
            counts[rows[done]] = 0
            counter.erase(ids[done], tables[done])


class EvictionPolicy:
    """Removes rows after optimizer steps or to make room in a full table."""

    def touch(self, table: HashTable, rows: torch.Tensor, inverse: torch.Tensor) -> None:
        """Record a training lookup of distinct ``rows`` (``-1``: absent): row ``rows[u]`` was
        used once per entry ``u`` of ``inverse`` (for a sharded table, by every rank's batch)."""
        present = rows >= 0
        counts = torch.bincount(inverse, minlength=rows.numel())
        table.last_seen[rows[present]] = table.step
        table.frequency[rows[present]] += counts[present]

    def after_step(self, table: HashTable) -> None:
        """Called after each optimizer step of ``table`` (default: nothing)."""

    def make_room(self, table: HashTable, needed: int, protect: torch.Tensor) -> bool:
        """Free ``needed`` rows of a full table, never one of the rows in ``protect`` (in use by
        the current lookup); ``False`` if this policy does not evict for room."""
        return False


def _evict(table: HashTable, victims_fn) -> int:
    """Erase the keys ``victims_fn(keys, tabs, rows)`` picks (positions into the map's export)."""
    keys, tabs, rows = table._map.export()
    return _evict_at(table, keys, tabs, victims_fn(keys, tabs, rows))


def _evict_at(table: HashTable, keys: torch.Tensor, tabs: torch.Tensor, at: torch.Tensor) -> int:
    """Erase the keys at positions ``at`` of ``keys``/``tabs`` as evictions; how many went."""
    if at.numel() == 0:
        return 0
    return table._erase(keys[at], tabs[at])  # counted by the table as evictions


@dataclass(frozen=True)
class StaleEviction(EvictionPolicy):
    """Evict ids not looked up in training for more than ``steps`` optimizer steps.

    After optimizer step ``t`` of a table (its :attr:`HashTable.step` then reads ``t``), every
    id last looked up in training at a step before ``t - steps`` is erased: exactly then,
    neither earlier nor later.

    The whole table is scanned once every ``steps + 1`` steps at most. A scan notes the ids
    that may turn stale before the next one (those not looked up since the previous step),
    ordered by the step they were last seen at; each step in between looks only at the noted
    ids whose time has come, and erases those not looked up since. A step's cost therefore
    follows the ids due at that step, not the size of the table (a scan of a million rows
    costs tens of milliseconds: once a step, that was more than the training step itself).
    The note takes 12 bytes per noted id until the next scan. A checkpoint load or
    :meth:`HashTable.insert_or_assign` (which set rows' last-seen steps) drops it, and the
    next step scans again.
    """

    steps: int = 1000

    def __post_init__(self) -> None:
        plain_fields(self)
        steps = self.steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= _INT64_MAX:
            raise ConfigError(f"StaleEviction needs an int steps in [1, 2**63 - 1], got {steps!r}")

    def after_step(self, table):
        t, scan = table.step, table._eviction_note
        if (
            not isinstance(scan, _StaleScan)
            or scan.steps != self.steps
            or not scan.step < t <= scan.step + self.steps
        ):
            table._eviction_note = None  # freed before the scan builds the next one
            table._eviction_note = _scan_stale(table, self.steps)
            return
        # The noted ids last seen before t - steps are due now; those looked up since the
        # scan were seen at its step or later, so they stay (the next scan notes them again).
        due = int(torch.searchsorted(scan.values, torch.tensor(t - self.steps)))
        end = int(scan.ends[due - 1]) if due else 0
        if end <= scan.done:
            return
        keys, tabs = scan.keys[scan.done : end], scan.tabs[scan.done : end]
        scan.done = end
        rows = table._map.find(keys, tabs)
        present = true_positions(rows >= 0)
        _evict_at(table, keys, tabs, present[(t - table.last_seen[rows[present]]) > self.steps])


@dataclass
class _StaleScan:
    """What a scan of a table by :class:`StaleEviction` leaves for the steps after it."""

    step: int  # the table's step at the scan
    steps: int  # the policy's steps
    keys: torch.Tensor  # ids last seen before the scan's step, ordered by that step
    tabs: torch.Tensor  # their logical tables
    values: torch.Tensor  # the distinct last-seen steps among them, ascending (on the CPU)
    ends: torch.Tensor  # per value, where its ids end in ``keys`` (on the CPU)
    done: int = 0  # ids before this position were examined


def _scan_stale(table: HashTable, steps: int) -> _StaleScan:
    """Erases every stale id of ``table`` and notes the ids that may turn stale within the next
    ``steps`` steps: those last seen before the current step (an id seen at the current step
    or later turns stale at step ``table.step + steps + 1`` at the earliest)."""
    from recis_embedding._table import _stable_order

    t = table.step
    keys, tabs, rows = table._map.export()
    last = table.last_seen[rows]
    _evict_at(table, keys, tabs, true_positions((t - last) > steps))
    noted = true_positions((last < t) & ((t - last) <= steps))
    keys, tabs, last = keys[noted], tabs[noted], last[noted]
    # Stable: the ids due at one step keep the order of the map at the scan.
    order = _stable_order(last - (t - steps))
    keys, tabs, last = keys[order], tabs[order], last[order]
    values, counts = torch.unique_consecutive(last, return_counts=True)
    return _StaleScan(t, steps, keys, tabs, values.cpu(), counts.cumsum(0).cpu())


@dataclass(frozen=True)
class CapacityEviction(EvictionPolicy):
    """When a table with a ``capacity`` is full, evict least-frequently (``"lfu"``) or
    least-recently (``"lru"``) used rows to make room; ties go to the older row.

    Rows are evicted in ascending order of, first, their training uses (``"lfu"``) or the
    last optimizer step at which training looked them up (``"lru"``); then of the table step
    at which they were inserted (the older row first); then of their id (as a signed int64);
    then of their logical table index. The order depends only on these per-row values, which
    checkpoints save, never on where a row sits in the hash map: it is the same in every run,
    after a save and load, and on each shard of a sharded table (a shard evicts among its own
    rows).

    Neither policy passes over the whole table on every evicting step. A pass notes the rows
    leading the order (at least an eighth of the capacity, 20 bytes a row with ``"lru"``, 28
    with ``"lfu"``, until the next pass), and the evictions after it choose among them.
    ``"lru"`` takes the noted rows not looked up since, which are still the coldest: a row
    looked up or inserted later was seen at a later step than every noted one. ``"lfu"``
    also keeps aside the rows inserted since the pass (with the fewest uses they may come
    first) and the noted rows an eviction passed over, and orders those with the noted rows
    up to the needed number of unchanged ones: a row's uses only grow, so every other row
    still follows them. A new pass runs when the note runs out (with ``"lfu"``, also when
    more rows are kept aside than were noted). The victims are the same as a pass on every
    eviction would choose. A checkpoint load or :meth:`HashTable.insert_or_assign` drops the
    note.

    With ``headroom`` 0 (the default) a full table evicts exactly the rows each inserting
    lookup needs. A ``headroom`` ``h`` evicts, whenever the table must evict, the rows needed
    and then, in the same order, the next ones until a fraction ``h`` of ``capacity`` is free
    as well (``h * capacity`` rounded down to whole rows; never a row in use): a table of
    capacity ``C`` receiving ``n`` new ids a step then evicts about once every ``h * C / n``
    steps, at the price of holding up to ``h * C`` rows fewer (TFRA's ``restrict`` and
    HugeCTR's eviction to a watermark do the same).
    """

    policy: str = "lfu"
    headroom: float = 0.0

    def __post_init__(self) -> None:
        plain_fields(self)
        if self.policy not in ("lfu", "lru"):
            raise ConfigError(
                f"CapacityEviction policy must be 'lfu' or 'lru', got {self.policy!r}"
            )
        h = self.headroom
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0 <= h < 1:
            raise ConfigError(
                f"CapacityEviction headroom must be a number in [0, 1) (a fraction of the "
                f"capacity), got {h!r}"
            )
        object.__setattr__(self, "headroom", float(h))

    def make_room(self, table, needed, protect):
        # Rows freed beyond the needed ones: the fraction of the capacity as its decimal reads
        # (0.29 of 100 is 29 rows, where the float product is 28.999...), whole rows only.
        wanted = needed + int(Fraction(repr(self.headroom)) * table.capacity)
        in_use = torch.zeros(table.last_seen.numel(), dtype=torch.bool, device=protect.device)
        in_use[protect] = True
        evict_noted = _evict_least_recent if self.policy == "lru" else _evict_least_frequent
        evicted = evict_noted(table, wanted, in_use)
        if evicted is not None:
            return evicted >= needed

        def coldest(keys, tabs, rows):
            # The protected rows rank last (no row's uses or step reach int64's maximum), so
            # the first level of the order is one gather over the table and the later levels
            # gather for its ties only.
            guarded = in_use[rows]
            free = rows.numel() - int(guarded.sum())
            if free <= wanted:
                return true_positions(~guarded)
            primary = (table.frequency if self.policy == "lfu" else table.last_seen)[rows]
            primary.masked_fill_(guarded, _INT64_MAX)
            later = _later_levels(table, keys, tabs, rows)
            return _smallest(primary, later, wanted)

        return _evict(table, coldest) >= needed


@dataclass
class _LruNote:
    """What a pass over a table by ``CapacityEviction("lru")`` leaves for the evictions after
    it: the coldest rows of the table then, in eviction order, all last seen before the
    table's step at the pass."""

    keys: torch.Tensor  # the noted rows' ids, coldest first
    tabs: torch.Tensor  # their logical tables
    last_seen: torch.Tensor  # their last-seen steps at the pass
    done: int = 0  # the rows noted before this position are gone or were looked up since

    def usable(self) -> bool:
        return True


# A pass notes at least this many times the rows an eviction wants, and an eighth of the
# capacity: a table taking n new ids a step passes over its rows about once every C / 8n steps.
_NOTE_TIMES, _NOTE_SHARE = 8, 8


def _evict_least_recent(table: HashTable, wanted: int, in_use: torch.Tensor) -> int | None:
    """Evicts the ``wanted`` least recently used rows not ``in_use`` (a bool per row) and says
    how many went; ``None`` (nothing evicted) when the rows last seen before the current step
    are too few for them, and the caller then orders every row."""
    return _evict_by_note(table, wanted, in_use, _LruNote, _note_least_recent, _take_least_recent)


def _take_least_recent(
    table: HashTable, note: _LruNote, wanted: int, in_use: torch.Tensor
) -> int | None:
    at = _take_noted(table, note, wanted, in_use)
    return None if at is None else _evict_at(table, note.keys, note.tabs, at)


def _evict_by_note(
    table: HashTable,
    wanted: int,
    in_use: torch.Tensor,
    kind: type[_LruNote] | type[_LfuNote],
    make_note: Callable[[HashTable, int], Any],
    take: Callable[[HashTable, Any, int, torch.Tensor], int | None],
) -> int | None:
    """Evicts with the table's note of ``kind`` if it still tells the ``wanted`` rows, else
    with the note of a new pass (``make_note``); ``None`` if neither does, and the table then
    keeps no note. ``take(table, note, wanted, in_use)`` evicts, or returns ``None`` having
    changed nothing."""
    note = table._eviction_note
    if isinstance(note, kind) and note.usable():
        evicted = take(table, note, wanted, in_use)
        if evicted is not None:
            return evicted
    table._eviction_note = None  # freed before the pass builds the next one
    note = table._eviction_note = make_note(table, wanted)
    evicted = take(table, note, wanted, in_use)
    if evicted is None:
        table._eviction_note = None
    return evicted


def _note_least_recent(table: HashTable, wanted: int) -> _LruNote:
    """A pass over every row: notes, coldest first, the rows that lead the eviction order
    among those last seen before the current step (their order can only change by their
    leaving it: a lookup or an insert sets a row's last-seen step to the current one)."""
    keys, tabs, rows = table._map.export()
    last = table.last_seen[rows]
    before = last < table.step
    first = last.masked_fill(~before, _INT64_MAX)
    later = _later_levels(table, keys, tabs, rows)
    noted = max(_NOTE_TIMES * wanted, (table.capacity or 0) // _NOTE_SHARE)
    at = _smallest(first, later, noted)
    at = at[before[at]]
    order = _lexicographic([last[at], table.inserted[rows[at]], keys[at], tabs[at]])
    at = at[order]
    return _LruNote(keys[at], tabs[at], last[at])


def _take_noted(
    table: HashTable, note: _LruNote, wanted: int, in_use: torch.Tensor
) -> torch.Tensor | None:
    """Positions in ``note`` of the first ``wanted`` noted rows still live, not looked up
    since the note and not ``in_use``; ``None`` if the note holds fewer."""
    chosen: list[torch.Tensor] = []
    need, pos, n = wanted, note.done, note.keys.numel()
    held = n  # the first noted row still due but in use: the note resumes there
    while need > 0 and pos < n:
        end = min(n, pos + max(2 * need, 1024))
        rows = table._map.find(note.keys[pos:end], note.tabs[pos:end])
        safe = rows.clamp(min=0)
        due = (rows >= 0) & (table.last_seen[safe] == note.last_seen[pos:end])
        used = due & in_use[safe]
        if held == n and bool(used.any()):
            held = pos + int(true_positions(used)[0])
        free = true_positions(due & ~used)[:need]
        chosen.append(free + pos)
        need -= free.numel()
        pos = end
    if need > 0:
        return None
    at = torch.cat(chosen)
    if at.numel():
        note.done = min(held, int(at[-1]) + 1)
    return at


@dataclass
class _LfuNote:
    """What a pass over a table by ``CapacityEviction("lfu")`` leaves for the evictions after
    it: the rows leading the eviction order then, in that order, with the uses and insertion
    step each had; and the rows that may since have moved ahead of noted ones (inserted after
    the pass, or noted ones passed over, looked up or in use, by an eviction).

    A row's uses only grow and its insertion step stays while it lives, so a row never moves
    ahead of where the pass put it; only rows inserted since (fewest uses) move ahead of
    noted ones. The rows after the note's last one at the pass therefore stay behind every
    noted row whose values did not change, and an eviction's victims are among the noted rows
    up to the ``wanted``-th unchanged one and the rows kept aside."""

    keys: torch.Tensor  # the noted rows' ids, first to be evicted first
    tabs: torch.Tensor  # their logical tables
    frequency: torch.Tensor  # their uses at the pass
    inserted: torch.Tensor  # their insertion steps
    done: int = 0  # the noted rows before this position are gone or kept aside
    aside_keys: list[torch.Tensor] = field(default_factory=list)
    aside_tabs: list[torch.Tensor] = field(default_factory=list)
    aside: int = 0  # entries in aside_keys (a row may be there twice)

    def usable(self) -> bool:
        # Once more rows are kept aside than noted, a new pass costs less than ordering them.
        return self.aside <= self.keys.numel()

    def record_inserts(self, keys: torch.Tensor, tabs: torch.Tensor) -> None:
        """Called by the table with the ids it inserted (after their rows are initialized)."""
        self.keep_aside(keys, tabs)

    def keep_aside(self, keys: torch.Tensor, tabs: torch.Tensor) -> None:
        if keys.numel():
            self.aside_keys.append(keys)
            self.aside_tabs.append(tabs)
            self.aside += keys.numel()


def _evict_least_frequent(table: HashTable, wanted: int, in_use: torch.Tensor) -> int | None:
    """Evicts the ``wanted`` least frequently used rows not ``in_use`` and says how many went;
    ``None`` (nothing evicted) when the note of a new pass cannot tell them, and the caller
    then orders every row."""
    return _evict_by_note(
        table, wanted, in_use, _LfuNote, _note_least_frequent, _take_least_frequent
    )


def _note_least_frequent(table: HashTable, wanted: int) -> _LfuNote:
    """A pass over every row (those in use too: they may be evicted once free): notes, in
    order, the rows leading the eviction order."""
    keys, tabs, rows = table._map.export()
    uses = table.frequency[rows]
    later = _later_levels(table, keys, tabs, rows)
    noted = max(_NOTE_TIMES * wanted, (table.capacity or 0) // _NOTE_SHARE)
    at = _smallest(uses, later, noted)
    inserted = table.inserted[rows[at]]
    at = at[_lexicographic([uses[at], inserted, keys[at], tabs[at]])]
    return _LfuNote(keys[at], tabs[at], uses[at], table.inserted[rows[at]])


def _take_least_frequent(
    table: HashTable, note: _LfuNote, wanted: int, in_use: torch.Tensor
) -> int | None:
    """Evicts the first ``wanted`` rows not ``in_use`` in the order of uses, insertion step,
    id and table, choosing among the noted rows up to the ``wanted``-th one that is free and
    unchanged since the pass, and the rows kept aside; ``None`` (nothing evicted, the note
    unchanged) if the note holds fewer such rows."""
    # Noted positions [note.done, end) hold `wanted` free unchanged rows, the last at end - 1.
    found: list[torch.Tensor] = []
    need, pos, n = wanted, note.done, note.keys.numel()
    while need > 0 and pos < n:
        stop = min(n, pos + max(2 * need, 1024))
        rows = table._map.find(note.keys[pos:stop], note.tabs[pos:stop])
        safe = rows.clamp(min=0)
        same = (
            (rows >= 0)
            & (table.frequency[safe] == note.frequency[pos:stop])
            & (table.inserted[safe] == note.inserted[pos:stop])
            & ~in_use[safe]
        )
        hits = true_positions(same)
        if hits.numel() >= need:
            stop = pos + int(hits[need - 1]) + 1
            rows = rows[: stop - pos]
        found.append(rows)
        need -= min(need, hits.numel())
        pos = stop
    if need > 0:
        return None
    end = pos
    last = end - 1
    bound = (note.frequency[last], note.inserted[last], note.keys[last], note.tabs[last])
    # Candidates: the live noted rows scanned and the live rows kept aside, once each.
    keys = torch.cat([note.keys[note.done : end], *note.aside_keys])
    tabs = torch.cat([note.tabs[note.done : end], *note.aside_tabs])
    rows = torch.cat([*found, table._map.find(keys[end - note.done :], tabs[end - note.done :])])
    live = true_positions(rows >= 0)
    rows, first = first_occurrence(rows[live])
    keys, tabs = keys[live[first]], tabs[live[first]]
    uses, inserted = table.frequency[rows], table.inserted[rows]
    # A row behind the wanted-th free unchanged noted row cannot be among the victims.
    can = _not_after((uses, inserted, keys, tabs), bound) & ~in_use[rows]
    at = true_positions(can)
    at = at[_lexicographic([uses[at], inserted[at], keys[at], tabs[at]])][:wanted]
    evicted = _evict_at(table, keys, tabs, at)
    kept = torch.ones(keys.numel(), dtype=torch.bool, device=keys.device)
    kept[at] = False
    note.done = end
    note.aside_keys, note.aside_tabs, note.aside = [], [], 0
    note.keep_aside(keys[kept], tabs[kept])
    return evicted


def _not_after(levels: Sequence[torch.Tensor], bound: Sequence[torch.Tensor]) -> torch.Tensor:
    """Whether each entry's ``levels`` are lexicographically at most ``bound``."""
    result = levels[-1] <= bound[-1]
    for level, b in zip(reversed(levels[:-1]), reversed(bound[:-1]), strict=True):
        result = (level < b) | ((level == b) & result)
    return result


def _later_levels(
    table: HashTable, keys: torch.Tensor, tabs: torch.Tensor, rows: torch.Tensor
) -> tuple[Callable[[torch.Tensor], torch.Tensor], ...]:
    """The levels of the eviction order after the first, for :func:`_smallest` over a map
    export: insertion step, then id, then logical table."""
    return (
        lambda at: table.inserted[rows[at]],
        lambda at: keys[at],
        lambda at: tabs[at],
    )


def _lexicographic(levels: Sequence[torch.Tensor]) -> torch.Tensor:
    """The order sorting entries by ``levels[0]``, then ``levels[1]``, and so on."""
    if levels[0].numel() and on_host(levels[0]):
        return torch.from_numpy(np.lexsort([x.numpy() for x in reversed(levels)]))
    order = torch.arange(levels[0].numel(), device=levels[0].device)
    for level in reversed(levels):
        order = order[torch.argsort(level[order], stable=True)]
    return order


def _smallest(
    first: torch.Tensor, later: Sequence[Callable[[torch.Tensor], torch.Tensor]], k: int
) -> torch.Tensor:
    """Positions of the ``k`` smallest entries in the lexicographic order of ``first`` and then
    the ``later`` levels (each gives its values at the positions it is passed; together they
    must tell every entry apart), in no particular order. Costs a linear selection per level
    instead of sorting, the later levels only over the entries tied before them."""
    n = first.numel()
    if k >= n:
        return torch.arange(n, device=first.device)
    # Fewer than k entries lie strictly below the k-th value, so k stays positive.
    bound = torch.kthvalue(first, k).values
    chosen = [true_positions(first < bound)]
    tied = true_positions(first == bound)
    k -= chosen[0].numel()
    for level in later:
        if tied.numel() <= k:
            break
        values = level(tied)
        bound = torch.kthvalue(values, k).values
        below = true_positions(values < bound)
        chosen.append(tied[below])
        tied = tied[true_positions(values == bound)]
        k -= below.numel()
    chosen.append(tied[:k])
    return torch.cat(chosen)


for _name, _cls in {
    "read_only": ReadOnlyAdmission,
    "probability": ProbabilityAdmission,
    "frequency": FrequencyAdmission,
    "stale": StaleEviction,
    "capacity": CapacityEviction,
}.items():
    register_policy(_name, _cls)
_BUILT_IN.update(_REGISTRY)
