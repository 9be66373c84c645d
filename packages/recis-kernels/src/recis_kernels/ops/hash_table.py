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
rehashing live keys and dropping tombstones) before full plus erased slots would exceed
:data:`MAX_LOAD_FACTOR` of the capacity, so a probe always ends at an empty slot.

On CUDA, lookups (``find``, and the lookup half of ``find_or_insert``) run the
``find_slots`` kernel of ``cuda/hash_table.cu``, one thread per query; inserts use the torch
rounds below on the device.

The torch implementation runs probe *rounds*: every query still unresolved looks at its current
slot in one vectorized step, so the Python loop runs once per probe distance, not once per key.
Concurrent inserts of the same free slot are resolved by letting the earliest query (in input
order) win; the others re-examine the slot in the next round, which makes inserts deterministic.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from recis_kernels._backend import use_cuda_kernels
from recis_kernels._checks import check_1d, check_dtype, check_tensor, grid_for
from recis_kernels.exceptions import ShapeError

__all__ = ["MAX_LOAD_FACTOR", "IdMap", "IdMapExport", "fmix64"]

#: Full plus erased slots never exceed this fraction of the capacity.
MAX_LOAD_FACTOR = 0.5

EMPTY, FULL, ERASED = 0, 1, 2
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
_C1 = -49064778989728563  # 0xff51afd7ed558ccd
_C2 = -4265267296055464877  # 0xc4ceb9fe1a85ec53
_LOW31 = (1 << 31) - 1


def fmix64(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 64-bit finalizer on int64 bits (wrapping arithmetic, logical shifts).

    Args:
        x: ``(N,) int64``.

    Returns:
        ``(N,) int64`` mixed bits; a bijection on 64-bit values.
    """
    # torch's >> is arithmetic on int64; masking the 33-bit shift keeps it logical.
    x = x ^ ((x >> 33) & _LOW31)
    x = x * _C1
    x = x ^ ((x >> 33) & _LOW31)
    x = x * _C2
    return x ^ ((x >> 33) & _LOW31)


def _home(keys: torch.Tensor, tabs: torch.Tensor, mask: int) -> torch.Tensor:
    return fmix64(keys + tabs.to(torch.int64) * _GOLDEN) & mask


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


def _as_tables(op: str, keys: torch.Tensor, tables: torch.Tensor | int) -> torch.Tensor:
    if isinstance(tables, int):
        return torch.full(keys.shape, tables, dtype=torch.int32, device=keys.device)
    check_tensor(op, "tables", tables)
    if tables.shape != keys.shape:
        raise ShapeError(
            f"{op}: tables has shape {tuple(tables.shape)}, expected {tuple(keys.shape)} like keys"
        )
    return tables.to(torch.int32)


def _check_keys(op: str, keys: torch.Tensor) -> None:
    check_tensor(op, "keys", keys)
    check_dtype(op, "keys", keys, (torch.int64,))
    check_1d(op, "keys", keys)


class IdMap:
    """Hash map from ``(table, id)`` to a row index with a row allocator that recycles rows.

    Rows are handed out densely from 0; erased keys return their rows to a free list used by
    later inserts first.

    Args:
        capacity: initial number of slots (rounded up to a power of two, at least 16).
        device: where the slot arrays live.

    Example:
        >>> m = IdMap()
        >>> m.find_or_insert(torch.tensor([5, -1, 5]))
        (tensor([0, 1, 0]), tensor([ True,  True,  True]))
        >>> m.find(torch.tensor([-1, 9]))
        tensor([ 1, -1])
    """

    def __init__(self, capacity: int = 1024, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._allocate(max(16, 1 << max(0, int(capacity) - 1).bit_length()))
        self.size = 0
        self.next_row = 0
        self.free_rows = torch.empty(0, dtype=torch.int64, device=self.device)

    def _allocate(self, capacity: int) -> None:
        d = self.device
        self.slot_keys = torch.zeros(capacity, dtype=torch.int64, device=d)
        self.slot_tabs = torch.zeros(capacity, dtype=torch.int32, device=d)
        self.slot_rows = torch.zeros(capacity, dtype=torch.int64, device=d)
        self.slot_state = torch.zeros(capacity, dtype=torch.int8, device=d)
        self.erased = 0

    @property
    def capacity(self) -> int:
        """Number of slots."""
        return self.slot_keys.numel()

    @property
    def num_rows(self) -> int:
        """Rows handed out so far (live plus free)."""
        return self.next_row

    def find(self, keys: torch.Tensor, tables: torch.Tensor | int = 0) -> torch.Tensor:
        """Rows of the given keys, ``-1`` where a key is absent.

        Args:
            keys: ``(N,) int64`` ids.
            tables: table index, one int or ``(N,)`` ints.

        Returns:
            ``(N,) int64`` row indices.
        """
        _check_keys("IdMap.find", keys)
        tabs = _as_tables("IdMap.find", keys, tables)
        slots = self._find_slots(keys, tabs)
        rows = torch.full_like(keys, -1)
        hit = slots >= 0
        rows[hit] = self.slot_rows.index_select(0, slots[hit])
        return rows

    def _find_slots(self, keys: torch.Tensor, tabs: torch.Tensor) -> torch.Tensor:
        if keys.numel() and use_cuda_kernels(keys.device):
            return self._find_slots_cuda(keys.contiguous(), tabs.contiguous())
        mask = self.capacity - 1
        out = torch.full_like(keys, -1)
        idx = torch.arange(keys.numel(), device=keys.device)
        k, t, p = keys, tabs, _home(keys, tabs, mask)
        while idx.numel():
            st = self.slot_state.index_select(0, p)
            hit = (
                (st == FULL)
                & (self.slot_keys.index_select(0, p) == k)
                & (self.slot_tabs.index_select(0, p) == t)
            )
            out[idx[hit]] = p[hit]
            go_on = (st != EMPTY) & ~hit
            if not bool(go_on.any()):
                break
            idx, k, t, p = idx[go_on], k[go_on], t[go_on], (p[go_on] + 1) & mask
        return out

    def _find_slots_cuda(self, keys: torch.Tensor, tabs: torch.Tensor) -> torch.Tensor:
        from recis_kernels._cuda import launch

        out = torch.empty_like(keys)
        n = keys.numel()
        launch(
            "hash_table",
            "find_slots",
            grid_for(n),
            256,
            [
                ("ptr", self.slot_keys),
                ("ptr", self.slot_tabs),
                ("ptr", self.slot_state),
                ("i64", self.capacity - 1),
                ("ptr", keys),
                ("ptr", tabs),
                ("i64", n),
                ("ptr", out),
            ],
            device=keys.device,
        )
        return out

    def find_or_insert(
        self, keys: torch.Tensor, tables: torch.Tensor | int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the given keys, inserting the absent ones (duplicates get one row).

        Args:
            keys: ``(N,) int64`` ids, duplicates allowed.
            tables: table index, one int or ``(N,)`` ints.

        Returns:
            ``(rows (N,) int64, is_new (N,) bool)``: ``is_new`` marks keys absent before the call.
        """
        _check_keys("IdMap.find_or_insert", keys)
        tabs = _as_tables("IdMap.find_or_insert", keys, tables)
        slots = self._find_slots(keys, tabs)
        is_new = slots < 0
        rows = torch.empty_like(keys)
        hit = ~is_new
        rows[hit] = self.slot_rows.index_select(0, slots[hit])
        miss = is_new.nonzero().squeeze(1)
        if miss.numel():
            self._reserve(self.size + miss.numel())
            rows[miss] = self.slot_rows[self._insert(keys[miss], tabs[miss])]
        return rows, is_new

    def _reserve(self, live: int) -> None:
        """Grow so ``live`` keys fit under the load factor, counting current tombstones."""
        if live + self.erased <= MAX_LOAD_FACTOR * self.capacity:
            return
        capacity = self.capacity
        while live > MAX_LOAD_FACTOR * capacity:
            capacity *= 2
        self._rehash(capacity)

    def _rehash(self, capacity: int) -> None:
        full = self.slot_state == FULL
        keys, tabs, rows = self.slot_keys[full], self.slot_tabs[full], self.slot_rows[full]
        self._allocate(capacity)
        slots = self._claim(keys, tabs, dedup=False)
        self.slot_rows[slots] = rows

    def _insert(self, keys: torch.Tensor, tabs: torch.Tensor) -> torch.Tensor:
        before = self.size
        slots = self._claim(keys, tabs, dedup=True)
        fresh_slots = self._last_claimed
        n_new = fresh_slots.numel()
        self.slot_rows[fresh_slots] = self._allocate_rows(n_new)
        self.size = before + n_new
        return slots

    def _allocate_rows(self, n: int) -> torch.Tensor:
        reuse = min(n, self.free_rows.numel())
        recycled = self.free_rows[:reuse]
        self.free_rows = self.free_rows[reuse:]
        fresh = torch.arange(self.next_row, self.next_row + n - reuse, device=self.device)
        self.next_row += n - reuse
        return torch.cat([recycled, fresh])

    def _claim(self, keys: torch.Tensor, tabs: torch.Tensor, *, dedup: bool) -> torch.Tensor:
        """Place absent keys into free slots; returns each key's slot.

        With ``dedup`` an equal key placed earlier in the same call is matched instead of being
        placed twice. The slots claimed by this call are left in ``self._last_claimed`` in
        claiming order.
        """
        mask = self.capacity - 1
        out = torch.empty_like(keys)
        idx = torch.arange(keys.numel(), device=keys.device)
        k, t, p = keys, tabs, _home(keys, tabs, mask)
        claimed = []
        while idx.numel():
            st = self.slot_state.index_select(0, p)
            free = st != FULL
            if dedup:
                same = (
                    ~free
                    & (self.slot_keys.index_select(0, p) == k)
                    & (self.slot_tabs.index_select(0, p) == t)
                )
                out[idx[same]] = p[same]
            else:
                same = torch.zeros_like(free)
            winners = self._winners(p, free)
            wp = p[winners]
            self.erased -= int((st[winners] == ERASED).sum())
            self.slot_keys[wp] = k[winners]
            self.slot_tabs[wp] = t[winners]
            self.slot_state[wp] = FULL
            out[idx[winners]] = wp
            claimed.append(wp)
            # Losers of a claim stay on the slot: next round it is full and may hold their key.
            stay = free & ~winners
            keep = ~winners & ~same
            advance = keep & ~stay
            p = torch.where(advance, (p + 1) & mask, p)
            idx, k, t, p = idx[keep], k[keep], t[keep], p[keep]
        self._last_claimed = torch.cat(claimed) if claimed else keys.new_empty(0)
        return out

    @staticmethod
    def _winners(p: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
        """Mask of the first query (in order) on each free slot."""
        cand = free.nonzero().squeeze(1)
        winners = torch.zeros_like(free)
        if cand.numel() == 0:
            return winners
        sp, order = torch.sort(p[cand], stable=True)
        first = torch.ones_like(sp, dtype=torch.bool)
        first[1:] = sp[1:] != sp[:-1]
        winners[cand[order[first]]] = True
        return winners

    def erase(self, keys: torch.Tensor, tables: torch.Tensor | int = 0) -> torch.Tensor:
        """Remove keys; their rows go to the free list.

        Args:
            keys: ``(N,) int64`` ids (absent ones and duplicates are ignored).
            tables: table index, one int or ``(N,)`` ints.

        Returns:
            ``(E,) int64`` rows that were freed.
        """
        _check_keys("IdMap.erase", keys)
        tabs = _as_tables("IdMap.erase", keys, tables)
        slots = self._find_slots(keys, tabs)
        slots = torch.unique(slots[slots >= 0])
        rows = self.slot_rows[slots]
        self.slot_state[slots] = ERASED
        self.size -= slots.numel()
        self.erased += slots.numel()
        self.free_rows = torch.cat([self.free_rows, rows])
        return rows

    def export(self) -> IdMapExport:
        """All live keys with their table indices and rows (slot order)."""
        full = self.slot_state == FULL
        return IdMapExport(self.slot_keys[full], self.slot_tabs[full], self.slot_rows[full])

    def clear(self) -> None:
        """Remove every key and forget all rows."""
        self._allocate(16)
        self.size = 0
        self.next_row = 0
        self.free_rows = self.free_rows.new_empty(0)
