"""Open-addressing hash map from ``(table index, int64 id)`` to a row index.

Layout: four slot arrays of one power-of-two capacity ``C``::

    slot_keys  (C,) int64   the id, all 64 bits
    slot_tabs  (C,) int32   the table index (fused tables share one map)
    slot_rows  (C,) int64   the row the key owns in the row store
    slot_state (C,) int8    0 empty, 1 full, 2 erased (tombstone)

Occupancy lives in ``slot_state``, not in a reserved key value, so every int64 id (``0``, ``-1``,
``INT64_MIN``, ``INT64_MAX``) is a valid key, and the table index is stored beside the id instead
of being packed into its bits. A key's home slot is ``fmix64(id + table * 0x9E3779B97F4A7C15) &
(C - 1)`` (MurmurHash3's 64-bit finalizer); collisions probe linearly. The map grows (doubling,
rehashing live keys and dropping tombstones) before full plus erased slots would exceed its
``max_load_factor`` (default :data:`MAX_LOAD_FACTOR`) of the capacity, so a probe always ends
at an empty slot.

On CUDA, lookups (``find``, and the lookup half of ``find_or_insert``) run the
``find_slots`` kernel of ``cuda/hash_table.cu``, one thread per query, and inserts into a map
that already holds keys run its ``claim_slots`` kernel: one thread per new key walks from the
home slot and takes the first slot that is not full with a compare-and-swap.

On CPU tensors both run compiled (``rust/src/idmap.rs``): a lookup probes key by key from the
home slot, with the next queries' home slots prefetched, and inserts place keys in the claim
rounds described below, slot for slot as the torch implementation does. That implementation
(other devices without the CUDA kernels) is vectorized over the queries; its Python loops run
once per *round*, never once per key.

- Lookups: the first round looks at every query's home slot (most keys end there: a hit or an
  empty slot); the queries left scan windows of consecutive slots (4, then 8, 16, ... up to 64)
  per round and stop at the first hit or empty slot, so long probes need a few rounds.
- Inserts (``find_or_insert``): a lookup first; the missing keys are then reduced to their
  distinct pairs (first occurrence order). Into a map whose slots are all empty (its first
  insert, every rehash, a restore into a new table) they are placed in one pass: in order of
  home slot, each on the first free slot at or after its home (linear probing in that order,
  computed with a cumulative maximum). Otherwise they are placed in claim rounds: every key
  looks at its current slot and the earliest key (in input order) on a free slot takes it;
  every other key then moves on to the first free slot among the next 16 (or past them), so a
  long cluster of full slots costs a round per 16 slots, not one per slot. This makes the CPU's
  placement deterministic.

Rows do not depend on placement: new keys get rows in order of first occurrence (recycled rows
of erased keys first, then fresh ones), on every device and path.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch

from recis_kernels import _native
from recis_kernels._backend import use_cuda_kernels
from recis_kernels._checks import (
    can_inspect,
    check_1d,
    check_device,
    check_dtype,
    check_tensor,
    flat_nonzero,
    grid_for,
    is_int,
    resolve_device,
)
from recis_kernels.exceptions import ArgumentError, ShapeError, UnsupportedDtypeError

__all__ = [
    "LOAD_FACTOR_LIMIT",
    "MAX_LOAD_FACTOR",
    "IdMap",
    "IdMapExport",
    "check_load_factor",
    "fmix64",
]

#: Full plus erased slots never exceed this fraction of the capacity (the default of
#: ``IdMap(max_load_factor=...)``).
MAX_LOAD_FACTOR = 0.5

EMPTY, FULL, ERASED = 0, 1, 2
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
_C1 = -49064778989728563  # 0xff51afd7ed558ccd
_C2 = -4265267296055464877  # 0xc4ceb9fe1a85ec53
_LOW31 = (1 << 31) - 1
# Slots a probe scans per round after the home slot (doubling each round up to the maximum).
_WINDOW = 4
_MAX_WINDOW = 64
# Slots a key that found its slot full looks ahead for a free one per claim round.
_CLAIM_WINDOW = 16


def fmix64(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 64-bit finalizer on int64 bits (wrapping arithmetic, logical shifts).

    Args:
        x: int64 tensor of any shape.

    Returns:
        int64 mixed bits shaped like ``x``; a bijection on 64-bit values.

    Raises:
        UnsupportedDtypeError: ``x`` is not an int64 tensor (narrower ids would be mixed as
            32-bit words and hash differently from the same id as int64).
    """
    check_tensor("fmix64", "x", x)
    check_dtype("fmix64", "x", x, (torch.int64,))
    if can_inspect(x):
        return torch.from_numpy(_fmix64_host(x.numpy()))
    return _fmix64_torch(x)


def _fmix64_torch(x: torch.Tensor) -> torch.Tensor:
    # torch's >> is arithmetic on int64; masking the 33-bit shift keeps it logical. The first
    # xor makes a new tensor (the input is left alone); the rest works in place on it.
    y = x >> 33
    y &= _LOW31
    x = x ^ y
    x *= _C1
    torch.bitwise_right_shift(x, 33, out=y)
    y &= _LOW31
    x ^= y
    x *= _C2
    torch.bitwise_right_shift(x, 33, out=y)
    y &= _LOW31
    x ^= y
    return x


_U64 = np.uint64
_GOLDEN_U, _C1_U, _C2_U = (np.uint64(c % (1 << 64)) for c in (_GOLDEN, _C1, _C2))


def _fmix64_in_place(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's finalizer on a uint64 array, in place (NumPy's shifts are logical)."""
    for c in (_C1_U, _C2_U):
        h ^= h >> _U64(33)
        h *= c
    h ^= h >> _U64(33)
    return h


def _fmix64_host(x: np.ndarray) -> np.ndarray:
    """:func:`fmix64` of an int64 array in NumPy (about twice as fast as the torch spelling)."""
    return _fmix64_in_place(x.astype(np.uint64)).view(np.int64)


def _home_host(keys: np.ndarray, tabs: np.ndarray, mask: int) -> np.ndarray:
    """:func:`_home` in NumPy's unsigned arithmetic (twice as fast on the host)."""
    h = tabs.astype(np.uint64)
    h *= _GOLDEN_U
    h += keys.view(np.uint64)
    _fmix64_in_place(h)
    h &= _U64(mask)
    return h.view(np.int64)


def _home(keys: torch.Tensor, tabs: torch.Tensor, mask: int) -> torch.Tensor:
    """Home slot of each pair: ``fmix64(key + table * golden) & mask``."""
    if can_inspect(keys):
        return torch.from_numpy(_home_host(keys.numpy(), tabs.numpy(), mask))
    return _home_torch(keys, tabs, mask)


def _home_torch(keys: torch.Tensor, tabs: torch.Tensor, mask: int) -> torch.Tensor:
    h = tabs.to(torch.int64)
    h *= _GOLDEN
    h += keys
    h = _fmix64_torch(h)
    h &= mask
    return h


def _first_per_slot(p: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """Positions (ascending) of the first query on each free slot of ``p``."""
    cand = flat_nonzero(free)
    if cand.numel() <= 1:
        return cand
    sp, order = torch.sort(p.index_select(0, cand), stable=True)
    first = torch.ones_like(sp, dtype=torch.bool)
    torch.ne(sp[1:], sp[:-1], out=first[1:])
    if bool(first.all()):
        return cand
    return torch.sort(cand.index_select(0, order[first])).values


def _first_occurrences(keys: torch.Tensor, tabs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct ``(key, table)`` pairs in order of first occurrence.

    One stable sort on ``key + table * 0x9E3779B97F4A7C15`` groups equal pairs; only if two
    different pairs share that value (``key`` differs by a multiple of the constant), pairs are
    sorted by key and table instead.

    Returns:
        ``(first, inverse)``: ``first`` holds the position of each distinct pair's first
        occurrence (ascending), ``inverse`` the index into ``first`` of every pair.
    """
    n = keys.numel()
    head = torch.ones(n, dtype=torch.bool, device=keys.device)
    if n <= 1:
        return flat_nonzero(head), torch.zeros_like(keys)
    pre = tabs.to(torch.int64)
    pre *= _GOLDEN
    pre += keys
    sorted_pre, order = torch.sort(pre, stable=True)
    torch.ne(sorted_pre[1:], sorted_pre[:-1], out=head[1:])
    sk = keys.index_select(0, order)
    if not bool((head[1:] | (sk[1:] == sk[:-1])).all()):
        order = torch.sort(tabs, stable=True).indices
        order = order.index_select(0, torch.sort(keys.index_select(0, order), stable=True).indices)
        sk, st = keys.index_select(0, order), tabs.index_select(0, order)
        head[1:] = (sk[1:] != sk[:-1]) | (st[1:] != st[:-1])
    # A stable sort keeps each group's first occurrence at its head.
    heads = order[head]
    is_first = torch.zeros_like(head)
    is_first[heads] = True
    rank = torch.cumsum(is_first, 0) - 1
    inverse = torch.empty_like(order)
    inverse[order] = rank.index_select(0, heads).index_select(0, torch.cumsum(head, 0) - 1)
    return flat_nonzero(is_first), inverse


#: The highest ``max_load_factor`` an :class:`IdMap` takes: linear probing's expected probe
#: length grows as ``1 / (1 - load)**2`` for absent keys (50 slots at 0.9).
LOAD_FACTOR_LIMIT = 0.9


def check_load_factor(where: str, value: object) -> float:
    """``value`` as a float in ``(0, LOAD_FACTOR_LIMIT]``, or a ``ValueError`` whose message
    starts with ``where`` (when not empty)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.floating, np.integer))
        or not 0 < float(value) <= LOAD_FACTOR_LIMIT
    ):
        raise ArgumentError(
            f"{where + ': ' if where else ''}max_load_factor must be a number in "
            f"(0, {LOAD_FACTOR_LIMIT}], got {value!r}"
        )
    return float(value)


class IdMapExport(NamedTuple):
    """Every live key of an :class:`IdMap`, in slot order.

    Attributes:
        keys: ``(K,) int64`` ids.
        tables: ``(K,) int32`` table indices.
        rows: ``(K,) int64`` row indices.
    """

    keys: torch.Tensor
    tables: torch.Tensor
    rows: torch.Tensor


# Table indices are stored as int32; anything outside [0, _TABLE_MAX] would alias another table.
_TABLE_MAX = 2**31 - 1
_TABLE_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _as_tables(op: str, keys: torch.Tensor, tables: torch.Tensor | int) -> torch.Tensor:
    if is_int(tables):
        tables = int(tables)
        if not 0 <= tables <= _TABLE_MAX:
            raise ArgumentError(f"{op}: tables must be in [0, {_TABLE_MAX}], got {tables}")
        return torch.full(keys.shape, tables, dtype=torch.int32, device=keys.device)
    if not isinstance(tables, torch.Tensor):
        raise UnsupportedDtypeError(
            f"{op}: tables must be an int or an integer tensor shaped like keys, got "
            f"{type(tables).__name__}"
        )
    check_dtype(op, "tables", tables, _TABLE_DTYPES)
    if tables.shape != keys.shape:
        raise ShapeError(
            f"{op}: tables has shape {tuple(tables.shape)}, expected {tuple(keys.shape)} like keys"
        )
    if can_inspect(tables) and tables.numel():
        # Host tables only: reading device values would synchronize every lookup.
        t = tables.numpy()
        low, high = int(t.min()), int(t.max())
        if low < 0 or high > _TABLE_MAX:
            bad = low if low < 0 else high
            raise ArgumentError(f"{op}: tables must be in [0, {_TABLE_MAX}], got {bad}")
    return tables.to(torch.int32)


def _check_keys(op: str, keys: torch.Tensor) -> None:
    check_tensor(op, "keys", keys)
    check_dtype(op, "keys", keys, (torch.int64,))
    check_1d(op, "keys", keys)


_M = TypeVar("_M", bound=Callable[..., Any])


def _one_at_a_time(method: _M) -> _M:
    """Run ``method`` under the map's lock: a compiled probe runs without the GIL on the slot
    arrays, which an insert on another thread may replace (a rehash) and free under it."""

    @functools.wraps(method)
    def locked(self: IdMap, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


class IdMap:
    """Hash map from ``(table, id)`` to a row index with a row allocator that recycles rows.

    Rows are handed out densely from 0, to new keys in order of first occurrence; erased keys
    return their rows to a free list used by later inserts first, in the order they were freed:
    the rows of each :meth:`erase` call ascending, after those of earlier calls (erasing row 7,
    then row 2, has the next inserts reuse 7, then 2). Rows never depend on which slots keys
    take, so a map on CUDA hands out the rows of one on the CPU.

    Args:
        capacity: initial number of slots (rounded up to a power of two, at least 16).
        device: where the slot arrays live.
        max_load_factor: the most full plus erased slots may fill before the map doubles, in
            ``(0, 0.9]`` (default :data:`MAX_LOAD_FACTOR`, 0.5). Higher packs more keys per
            byte of slot arrays (21 bytes a slot) at the price of longer probes.

    Example:
        >>> m = IdMap()
        >>> m.find_or_insert(torch.tensor([5, -1, 5]))
        (tensor([0, 1, 0]), tensor([True, True, True]))
        >>> m.find(torch.tensor([-1, 9]))
        tensor([ 1, -1])
    """

    def __init__(
        self,
        capacity: int = 1024,
        device: torch.device | str | None = None,
        *,
        max_load_factor: float = MAX_LOAD_FACTOR,
    ) -> None:
        self._lock = threading.RLock()
        self.max_load_factor = check_load_factor("IdMap", max_load_factor)
        self.device = resolve_device(device)
        self._allocate(max(16, 1 << max(0, int(capacity) - 1).bit_length()))
        self.size = 0
        self.next_row = 0
        self.free_rows = torch.empty(0, dtype=torch.int64, device=self.device)

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        del state["_lock"]  # a lock cannot be pickled; a loaded map gets its own
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        # torch.load(map_location=...) moves the slot arrays: the map lives where they are.
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self.device = self.slot_keys.device

    def _allocate(self, capacity: int) -> None:
        d = self.device
        self.slot_keys = torch.zeros(capacity, dtype=torch.int64, device=d)
        self.slot_tabs = torch.zeros(capacity, dtype=torch.int32, device=d)
        self.slot_rows = torch.zeros(capacity, dtype=torch.int64, device=d)
        self.slot_state = torch.zeros(capacity, dtype=torch.int8, device=d)
        self.erased = 0
        # Every slot empty (a new map, a rehash, clear()): the next claim places in one pass.
        self._blank = True

    @property
    def capacity(self) -> int:
        """Number of slots."""
        return self.slot_keys.numel()

    @property
    def num_rows(self) -> int:
        """Rows handed out so far (live plus free)."""
        return self.next_row

    @property
    def nbytes(self) -> int:
        """Bytes held by the slot arrays and the list of free rows."""
        arrays = (self.slot_keys, self.slot_tabs, self.slot_rows, self.slot_state, self.free_rows)
        return sum(t.numel() * t.element_size() for t in arrays)

    @_one_at_a_time
    def find(self, keys: torch.Tensor, tables: torch.Tensor | int = 0) -> torch.Tensor:
        """Rows of the given keys, ``-1`` where a key is absent.

        Args:
            keys: ``(N,) int64`` ids.
            tables: table index in ``[0, 2**31 - 1]``, one int or ``(N,)`` integer tensor.

        Returns:
            ``(N,) int64`` row indices.
        """
        tabs = self._keys_and_tables("IdMap.find", keys, tables)
        if keys.numel() and not use_cuda_kernels(keys.device) and can_inspect(keys):
            # Compiled: the probe reads each found slot's row too (no second pass).
            if not self.slot_rows.is_contiguous():
                self.slot_rows = self.slot_rows.contiguous()
            return self._compiled(_native.idmap_find, keys, tabs, self.slot_rows.data_ptr())[0]
        return self._rows_of(self._find_slots(keys, tabs))

    def _keys_and_tables(
        self, op: str, keys: torch.Tensor, tables: torch.Tensor | int
    ) -> torch.Tensor:
        """Check ``keys`` (dtype, shape, device) and return ``tables`` as int32 on their device."""
        _check_keys(op, keys)
        check_device(op, "keys", keys, self.device)
        if isinstance(tables, torch.Tensor):
            check_device(op, "tables", tables, self.device)
        return _as_tables(op, keys, tables)

    def _rows_of(self, slots: torch.Tensor) -> torch.Tensor:
        """Row of each slot, ``-1`` for slot ``-1``."""
        rows = self.slot_rows.index_select(0, slots.clamp(min=0))
        return torch.where(slots >= 0, rows, -1)

    def _find_slots(self, keys: torch.Tensor, tabs: torch.Tensor) -> torch.Tensor:
        if keys.numel() and use_cuda_kernels(keys.device):
            return self._find_slots_cuda(keys.contiguous(), tabs.contiguous())
        if can_inspect(keys):
            return self._find_slots_host(keys, tabs)
        return self._find_slots_torch(keys, tabs)

    def _find_slots_host(self, keys: torch.Tensor, tabs: torch.Tensor) -> torch.Tensor:
        """:meth:`_find_slots_torch` compiled (``_native.idmap_find``): each query probes from
        its home slot to its key or an empty slot, with the home slots of the next queries
        prefetched (26.7k queries into a map of 2**20 slots: 0.2 ms, where NumPy windows of
        slots took 0.76 ms)."""
        return self._compiled(_native.idmap_find, keys, tabs)[0]

    def _compiled(
        self, kernel: Callable[..., Any], keys: torch.Tensor, tabs: torch.Tensor, *extra: Any
    ) -> tuple[torch.Tensor, Any]:
        """Run ``kernel`` (``idmap_find`` or ``idmap_claim``) on this map's slot arrays for
        ``keys`` and their int32 ``tabs``: ``(slot of each key, what the kernel returned)``
        (``extra`` arguments go last: ``idmap_find`` given the slot rows' address writes each
        key's row instead of its slot)."""
        out = torch.empty_like(keys)
        k, t = keys.contiguous(), tabs.contiguous()
        result = kernel(
            self._slot_addresses(), self.capacity, k.data_ptr(), t.data_ptr(), k.numel(),
            out.data_ptr(), *extra,
        )  # fmt: skip
        return out, result

    def _slot_addresses(self) -> tuple[int, int, int]:
        """Addresses of the id, table and state arrays for the compiled kernels."""
        arrays = (self.slot_keys, self.slot_tabs, self.slot_state)
        if not all(a.is_contiguous() for a in arrays):
            # Only a map unpickled from strided arrays could get here.
            self.slot_keys, self.slot_tabs, self.slot_state = (a.contiguous() for a in arrays)
        return self.slot_keys.data_ptr(), self.slot_tabs.data_ptr(), self.slot_state.data_ptr()

    def _find_slots_torch(self, keys: torch.Tensor, tabs: torch.Tensor) -> torch.Tensor:
        """Slot of each key, ``-1`` where absent: the home slot for all, then windows of slots.

        Most keys end at their home slot (a hit or an empty slot), so the first round looks at
        that one slot for every query with no compaction. The few left scan windows of
        ``_WINDOW`` (then twice as many) consecutive slots per round, taking the first hit or
        empty slot of the window; consecutive slots share cache lines, so a window costs little
        more than one slot and the tail of long probes needs a handful of rounds, not one per
        probe distance.
        """
        mask = self.capacity - 1
        p = _home(keys, tabs, mask)
        st = self.slot_state.index_select(0, p)
        hit = (
            (self.slot_keys.index_select(0, p) == keys)
            & (self.slot_tabs.index_select(0, p) == tabs)
            & (st == FULL)
        )
        out = torch.where(hit, p, -1)
        idx = flat_nonzero((st != EMPTY) & ~hit)
        if idx.numel() == 0:
            return out
        k, t, p = keys.index_select(0, idx), tabs.index_select(0, idx), p.index_select(0, idx)
        width = _WINDOW
        while True:
            n = idx.numel()
            win = (p.unsqueeze(1) + torch.arange(1, width + 1, device=p.device)) & mask
            flat = win.view(-1)
            st = self.slot_state.index_select(0, flat).view(n, width)
            hit = (
                (self.slot_keys.index_select(0, flat).view(n, width) == k.unsqueeze(1))
                & (self.slot_tabs.index_select(0, flat).view(n, width) == t.unsqueeze(1))
                & (st == FULL)
            )
            stop = hit | (st == EMPTY)
            first = stop.to(torch.uint8).argmax(1, keepdim=True)
            found = hit.gather(1, first).squeeze(1)
            out.index_put_((idx[found],), win.gather(1, first).squeeze(1)[found])
            go_on = ~stop.any(1)
            if not bool(go_on.any()):
                return out
            idx, k, t = idx[go_on], k[go_on], t[go_on]
            p = (p[go_on] + width) & mask
            width = min(2 * width, _MAX_WINDOW)

    def _launch(
        self, kernel: str, keys: torch.Tensor, tabs: torch.Tensor, *outputs: torch.Tensor
    ) -> None:
        """Launch a ``cuda/hash_table.cu`` kernel, one thread per key; every kernel takes the
        slot arrays, the mask, the keys and their tables, then its outputs."""
        from recis_kernels._cuda import launch

        n = keys.numel()
        self._slot_addresses()  # makes strided slot arrays (an unpickled map's) contiguous
        keys, tabs = keys.contiguous(), tabs.contiguous()
        args = [
            ("ptr", self.slot_keys),
            ("ptr", self.slot_tabs),
            ("ptr", self.slot_state),
            ("i64", self.capacity - 1),
            ("ptr", keys),
            ("ptr", tabs),
            ("i64", n),
        ]
        args += [("ptr", out) for out in outputs]
        launch("hash_table", kernel, grid_for(n), 256, args, device=keys.device)

    def _find_slots_cuda(self, keys: torch.Tensor, tabs: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(keys)
        self._launch("find_slots", keys, tabs, out)
        return out

    @_one_at_a_time
    def find_or_insert(
        self, keys: torch.Tensor, tables: torch.Tensor | int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the given keys, inserting the absent ones (duplicates get one row).

        Args:
            keys: ``(N,) int64`` ids, duplicates allowed.
            tables: table index in ``[0, 2**31 - 1]``, one int or ``(N,)`` integer tensor.

        Returns:
            ``(rows (N,) int64, is_new (N,) bool)``: ``is_new`` marks keys absent before the call.
        """
        tabs = self._keys_and_tables("IdMap.find_or_insert", keys, tables)
        slots = self._find_slots(keys, tabs)
        is_new = slots < 0
        rows = self._rows_of(slots)
        miss = flat_nonzero(is_new)
        if miss.numel():
            mk, mt = keys.index_select(0, miss), tabs.index_select(0, miss)
            rows[miss] = self._insert_rows(mk, mt, distinct=False)
        return rows, is_new

    @_one_at_a_time
    def insert_absent(
        self, keys: torch.Tensor, tables: torch.Tensor | int = 0, *, distinct: bool = False
    ) -> torch.Tensor:
        """Insert keys that :meth:`find` just reported absent, without looking them up again.

        Gives the same rows as :meth:`find_or_insert` would for these keys. The caller
        guarantees absence (a key already in the map would get a second slot); with
        ``distinct`` it also guarantees that no ``(key, table)`` pair repeats, which skips the
        deduplication.

        Args:
            keys: ``(N,) int64`` ids absent from the map.
            tables: table index in ``[0, 2**31 - 1]``, one int or ``(N,)`` integer tensor.
            distinct: the pairs are known to be distinct.

        Returns:
            ``(N,) int64`` rows (repeated pairs share one).
        """
        tabs = self._keys_and_tables("IdMap.insert_absent", keys, tables)
        if keys.numel() == 0:
            return keys.new_empty(0)
        return self._insert_rows(keys, tabs, distinct=distinct)

    def _insert_rows(
        self, keys: torch.Tensor, tabs: torch.Tensor, *, distinct: bool
    ) -> torch.Tensor:
        if distinct:
            self._reserve(self.size + keys.numel())
            return self.slot_rows.index_select(0, self._insert(keys, tabs))
        first, inverse = _first_occurrences(keys, tabs)
        # Room for the distinct new keys only: repeats of one key take no slot, so they must
        # not grow the map (a batch repeating 3 new ids 100000 times used to take 2**20 slots).
        self._reserve(self.size + first.numel())
        new_slots = self._insert(keys.index_select(0, first), tabs.index_select(0, first))
        return self.slot_rows.index_select(0, new_slots.index_select(0, inverse))

    def _reserve(self, live: int) -> None:
        """Grow so ``live`` keys fit under the load factor, counting current tombstones."""
        if live + self.erased <= self.max_load_factor * self.capacity:
            return
        capacity = self.capacity
        while live > self.max_load_factor * capacity:
            capacity *= 2
        self._rehash(capacity)

    def _rehash(self, capacity: int) -> None:
        full = flat_nonzero(self.slot_state == FULL)
        keys = self.slot_keys.index_select(0, full)
        tabs = self.slot_tabs.index_select(0, full)
        rows = self.slot_rows.index_select(0, full)
        self._allocate(capacity)
        self.slot_rows[self._claim(keys, tabs)] = rows

    def _insert(self, keys: torch.Tensor, tabs: torch.Tensor) -> torch.Tensor:
        """Place distinct absent keys and give them rows in input order, whatever slots they
        take (so rows do not depend on how a device places keys); returns their slots."""
        slots = self._claim(keys, tabs)
        self.slot_rows[slots] = self._allocate_rows(slots.numel())
        self.size += slots.numel()
        return slots

    def _allocate_rows(self, n: int) -> torch.Tensor:
        reuse = min(n, self.free_rows.numel())
        recycled = self.free_rows[:reuse]
        self.free_rows = self.free_rows[reuse:]
        fresh = torch.arange(self.next_row, self.next_row + n - reuse, device=self.device)
        self.next_row += n - reuse
        if reuse == 0:
            return fresh
        return torch.cat([recycled, fresh]) if reuse < n else recycled

    def _claim(self, keys: torch.Tensor, tabs: torch.Tensor) -> torch.Tensor:
        """Place distinct keys, all absent from the map, into free slots; returns each key's
        slot.

        Every round each unplaced key looks at its current slot; of the keys on one free slot
        the earliest (in input order) takes it. Every other key then stands on a full slot and
        moves on to the first slot that is not full among the next ``_CLAIM_WINDOW`` (or
        past them all when every one is full). As the keys are distinct and absent, a full slot
        never holds one of them, so only the slot states are read.

        Into a map whose slots are all empty (its first insert, a rehash, the first insert
        after :meth:`clear`) the keys are placed in one pass instead, as key-by-key linear
        probing in order of home slot would place them (see :meth:`_claim_blank_torch`).
        """
        if keys.numel() == 0:
            return keys.new_empty(0)
        if self._blank:
            self._blank = False
            if can_inspect(keys):
                return self._claim_blank_host(keys, tabs)
            return self._claim_blank_torch(keys, tabs)
        if use_cuda_kernels(keys.device):
            return self._claim_cuda(keys.contiguous(), tabs.contiguous())
        if can_inspect(keys):
            return self._claim_host(keys, tabs)
        return self._claim_torch(keys, tabs)

    def _claim_cuda(self, keys: torch.Tensor, tabs: torch.Tensor) -> torch.Tensor:
        """:meth:`_claim` by the ``claim_slots`` kernel: one thread per key walks from its home
        slot and takes the first slot that is not full with a compare-and-swap. Which key wins a
        contested slot depends on thread timing, so slots (not rows) may differ from the CPU's
        placement; every key stays reachable by linear probing from its home slot."""
        n = keys.numel()
        # The kernel swaps 4 state bytes at a time: the array must start on a 4-byte boundary
        # (torch's allocations do; capacities are powers of two of at least 16 slots).
        if self.slot_state.data_ptr() % 4 or self.capacity % 4:
            raise RuntimeError("IdMap: the slot state array is not 4-byte aligned")
        slots = torch.empty_like(keys)
        reclaimed = torch.zeros(1, dtype=torch.int64, device=keys.device)
        self._launch("claim_slots", keys, tabs, slots, reclaimed)
        # Both counts in one read from the device (one synchronization).
        unplaced, reused = torch.stack(((slots < 0).sum(), reclaimed[0])).tolist()
        if unplaced:
            raise RuntimeError(
                f"IdMap: no free slot for {unplaced} of {n} keys in a map of "
                f"{self.capacity} slots holding {self.size} keys and {self.erased} tombstones "
                "(the map grows before this can happen; please report it)"
            )
        self.erased -= reused
        return slots

    def _claim_blank_torch(self, keys: torch.Tensor, tabs: torch.Tensor) -> torch.Tensor:
        """:meth:`_claim` into a map whose slots are all empty, in one pass.

        Keys go in order of home slot (input order among equal homes), each to the first free
        slot at or after its home: the ``i``-th key in that order lands on ``i + max(home_j -
        j, j <= i)`` (a cumulative maximum), unless that is past the last slot; the keys past it
        wrap around and take the first free slots from slot 0, in order. This is exactly
        sequential linear probing in that order, so every probe from a key's home reaches it
        over full slots only.
        """
        mask = self.capacity - 1
        n = keys.numel()
        home = _home(keys, tabs, mask)
        sorted_home, order = torch.sort(home, stable=True)
        i = torch.arange(n, device=keys.device)
        place = torch.cummax(sorted_home - i, 0).values + i
        past = int(torch.searchsorted(place, mask + 1))
        if past < n:
            self.slot_state[place[:past]] = FULL
            place[past:] = flat_nonzero(self.slot_state[:n] != FULL)[: n - past]
        self.slot_keys[place] = keys.index_select(0, order)
        self.slot_tabs[place] = tabs.index_select(0, order)
        self.slot_state[place] = FULL
        slots = torch.empty_like(keys)
        slots[order] = place
        return slots

    def _claim_blank_host(self, keys: torch.Tensor, tabs: torch.Tensor) -> torch.Tensor:
        """:meth:`_claim_blank_torch` compiled (``_native.idmap_claim_blank``): one radix sort
        of the pairs by home slot, then the slots written in ascending order (1M keys into 4M
        empty slots: 17 to 25 ms, where a NumPy sort and scatters of the same placement took
        70 to 99 ms on a 2-core AMD EPYC)."""
        out, _ = self._compiled(_native.idmap_claim_blank, keys, tabs)
        return out

    def _claim_torch(self, keys: torch.Tensor, tabs: torch.Tensor) -> torch.Tensor:
        mask = self.capacity - 1
        out = torch.empty_like(keys)
        idx = torch.arange(keys.numel(), device=keys.device)
        p = _home(keys, tabs, mask)
        steps = torch.arange(1, _CLAIM_WINDOW + 1, device=keys.device)
        while idx.numel():
            st = self.slot_state.index_select(0, p)
            free = st != FULL
            won = _first_per_slot(p, free)
            wp = p.index_select(0, won)
            wi = idx.index_select(0, won)
            if self.erased:
                self.erased -= int((st.index_select(0, won) == ERASED).sum())
            self.slot_keys[wp] = keys.index_select(0, wi)
            self.slot_tabs[wp] = tabs.index_select(0, wi)
            self.slot_state[wp] = FULL
            out[wi] = wp
            if won.numel() == idx.numel():
                break
            keep = torch.ones_like(free)
            keep[won] = False
            idx, p = idx[keep], p[keep]
            # Everyone left stands on a full slot: move to the first slot of the window that
            # is not full, or past the window.
            win = (p.unsqueeze(1) + steps) & mask
            open_ = self.slot_state.index_select(0, win.view(-1)).view(win.shape) != FULL
            first = open_.to(torch.uint8).argmax(1, keepdim=True)
            ahead = win.gather(1, first).squeeze(1)
            p = torch.where(open_.any(1), ahead, win[:, -1])
        return out

    def _claim_host(self, keys: torch.Tensor, tabs: torch.Tensor) -> torch.Tensor:
        """:meth:`_claim` compiled (``_native.idmap_claim``): round for round the placement of
        :meth:`_claim_torch`, every round one pass over the keys left in input order."""
        slots, reused = self._compiled(_native.idmap_claim, keys, tabs)
        self.erased -= reused
        return slots

    @_one_at_a_time
    def erase(self, keys: torch.Tensor, tables: torch.Tensor | int = 0) -> torch.Tensor:
        """Remove keys; their rows go to the free list.

        Args:
            keys: ``(N,) int64`` ids (absent ones and duplicates are ignored).
            tables: table index in ``[0, 2**31 - 1]``, one int or ``(N,)`` integer tensor.

        Returns:
            ``(E,) int64`` rows that were freed, ascending.
        """
        tabs = self._keys_and_tables("IdMap.erase", keys, tables)
        slots = self._find_slots(keys, tabs)
        slots = torch.unique(slots[slots >= 0])
        # Ascending rows, not slot order: later inserts reuse them in this order, and slots
        # depend on placement (a CUDA map's differ from a CPU map's), rows must not.
        rows = torch.sort(self.slot_rows[slots]).values
        self.slot_state[slots] = ERASED
        self.size -= slots.numel()
        self.erased += slots.numel()
        self.free_rows = torch.cat([self.free_rows, rows])
        return rows

    @_one_at_a_time
    def export(self) -> IdMapExport:
        """All live keys with their table indices and rows (slot order)."""
        full = self.slot_state == FULL
        return IdMapExport(self.slot_keys[full], self.slot_tabs[full], self.slot_rows[full])

    @_one_at_a_time
    def clear(self) -> None:
        """Remove every key and forget all rows."""
        self._allocate(16)
        self.size = 0
        self.next_row = 0
        self.free_rows = self.free_rows.new_empty(0)
