"""The plainest torch implementation of ``IdMap``: lookups one probe distance per round,
claims walking on one slot at a time in a Python loop over the keys, and claims into a map with
every slot empty as sequential linear probing, key by key.

Kept as the reference the optimized map must match exactly: same rows, same ``is_new``, same
slot placement (hence the same export order) and the same capacity after every call. With
``sequential=True`` claims into a map that holds keys are key-by-key linear probing in order of
first occurrence instead of rounds: what the ``claim_slots`` kernel does when its threads run
one after another, as they do compiled for the host (``--emulate-kernels``).
"""

from __future__ import annotations

import torch

from recis_kernels.ops.hash_table import EMPTY, ERASED, FULL, MAX_LOAD_FACTOR, fmix64

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
CLAIM_WINDOW = 16  # slots a key on a full slot walks on per claim round


def _home(keys: torch.Tensor, tabs: torch.Tensor, mask: int) -> torch.Tensor:
    return fmix64(keys + tabs.to(torch.int64) * _GOLDEN) & mask


class ReferenceIdMap:
    """Same layout and contract as ``IdMap`` (CPU only)."""

    def __init__(
        self,
        capacity: int = 1024,
        max_load_factor: float = MAX_LOAD_FACTOR,
        *,
        sequential: bool = False,
    ) -> None:
        self.max_load_factor = max_load_factor
        self.sequential = sequential
        self._allocate(max(16, 1 << max(0, int(capacity) - 1).bit_length()))
        self.size = 0
        self.next_row = 0
        self.free_rows = torch.empty(0, dtype=torch.int64)

    def _allocate(self, capacity: int) -> None:
        self.slot_keys = torch.zeros(capacity, dtype=torch.int64)
        self.slot_tabs = torch.zeros(capacity, dtype=torch.int32)
        self.slot_rows = torch.zeros(capacity, dtype=torch.int64)
        self.slot_state = torch.zeros(capacity, dtype=torch.int8)
        self.erased = 0

    @property
    def capacity(self) -> int:
        return self.slot_keys.numel()

    def find(self, keys: torch.Tensor, tabs: torch.Tensor) -> torch.Tensor:
        slots = self._find_slots(keys, tabs)
        rows = torch.full_like(keys, -1)
        hit = slots >= 0
        rows[hit] = self.slot_rows[slots[hit]]
        return rows

    def _find_slots(self, keys: torch.Tensor, tabs: torch.Tensor) -> torch.Tensor:
        mask = self.capacity - 1
        out = torch.full_like(keys, -1)
        idx = torch.arange(keys.numel())
        k, t, p = keys, tabs, _home(keys, tabs, mask)
        while idx.numel():
            st = self.slot_state[p]
            hit = (st == FULL) & (self.slot_keys[p] == k) & (self.slot_tabs[p] == t)
            out[idx[hit]] = p[hit]
            go_on = (st != EMPTY) & ~hit
            idx, k, t, p = idx[go_on], k[go_on], t[go_on], (p[go_on] + 1) & mask
        return out

    def find_or_insert(
        self, keys: torch.Tensor, tabs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self._find_slots(keys, tabs)
        is_new = slots < 0
        rows = torch.empty_like(keys)
        rows[~is_new] = self.slot_rows[slots[~is_new]]
        miss = is_new.nonzero().squeeze(1)
        if miss.numel():
            # Room for the distinct new pairs: repeats take no slot.
            pairs = list(zip(keys[miss].tolist(), tabs[miss].tolist(), strict=True))
            first = {pair: i for i, pair in reversed(list(enumerate(pairs)))}
            self._reserve(self.size + len(first))
            slots = self._claim(keys[miss], tabs[miss], dedup=True)
            # Rows in order of first occurrence, whatever slots the keys took.
            fresh = slots[sorted(first.values())]
            self.slot_rows[fresh] = self._allocate_rows(fresh.numel())
            self.size += fresh.numel()
            rows[miss] = self.slot_rows[slots]
        return rows, is_new

    def _reserve(self, live: int) -> None:
        if live + self.erased <= self.max_load_factor * self.capacity:
            return
        capacity = self.capacity
        while live > self.max_load_factor * capacity:
            capacity *= 2
        full = self.slot_state == FULL
        keys, tabs, rows = self.slot_keys[full], self.slot_tabs[full], self.slot_rows[full]
        self._allocate(capacity)
        self.slot_rows[self._claim(keys, tabs, dedup=False)] = rows

    def _allocate_rows(self, n: int) -> torch.Tensor:
        reuse = min(n, self.free_rows.numel())
        recycled = self.free_rows[:reuse]
        self.free_rows = self.free_rows[reuse:]
        fresh = torch.arange(self.next_row, self.next_row + n - reuse)
        self.next_row += n - reuse
        return torch.cat([recycled, fresh])

    def _claim(self, keys: torch.Tensor, tabs: torch.Tensor, *, dedup: bool) -> torch.Tensor:
        if keys.numel() and bool((self.slot_state == EMPTY).all()):
            return self._claim_blank(keys, tabs)
        if self.sequential:
            return self._claim_sequential(keys, tabs)
        mask = self.capacity - 1
        out = torch.empty_like(keys)
        idx = torch.arange(keys.numel())
        k, t, p = keys, tabs, _home(keys, tabs, mask)
        while idx.numel():
            st = self.slot_state[p]
            free = st != FULL
            same = torch.zeros_like(free)
            if dedup:
                same = ~free & (self.slot_keys[p] == k) & (self.slot_tabs[p] == t)
                out[idx[same]] = p[same]
            # The first query (in order) on each free slot wins it.
            cand = free.nonzero().squeeze(1)
            winners = torch.zeros_like(free)
            sp, order = torch.sort(p[cand], stable=True)
            first = torch.ones_like(sp, dtype=torch.bool)
            first[1:] = sp[1:] != sp[:-1]
            winners[cand[order[first]]] = True
            wp = p[winners]
            self.erased -= int((st[winners] == ERASED).sum())
            self.slot_keys[wp] = k[winners]
            self.slot_tabs[wp] = t[winners]
            self.slot_state[wp] = FULL
            out[idx[winners]] = wp
            keep = ~winners & ~same
            idx, k, t, p = idx[keep], k[keep], t[keep], p[keep].clone()
            # Everyone left stands on a full slot: walk on, one slot at a time, up to
            # CLAIM_WINDOW slots, stopping on a slot that is not full, or (with duplicates) on
            # the slot that now holds the key: next round finds it there.
            for j in range(idx.numel()):
                q = int(p[j])
                for _ in range(CLAIM_WINDOW):
                    if dedup and self._holds(q, k[j], t[j]):
                        break
                    q = (q + 1) & mask
                    if self.slot_state[q] != FULL:
                        break
                p[j] = q
        return out

    def _claim_sequential(self, keys: torch.Tensor, tabs: torch.Tensor) -> torch.Tensor:
        """Key by key in order of first occurrence: the first slot at or after the home slot
        that is not full."""
        mask = self.capacity - 1
        homes = _home(keys, tabs, mask).tolist()
        slot_of: dict[tuple[int, int], int] = {}
        pairs = list(zip(keys.tolist(), tabs.tolist(), strict=True))
        for i, pair in enumerate(pairs):
            if pair in slot_of:
                continue
            q = homes[i]
            while self.slot_state[q] == FULL:
                q = (q + 1) & mask
            if self.slot_state[q] == ERASED:
                self.erased -= 1
            self.slot_keys[q], self.slot_tabs[q] = pair
            self.slot_state[q] = FULL
            slot_of[pair] = q
        return torch.tensor([slot_of[p] for p in pairs], dtype=torch.int64)

    def _claim_blank(self, keys: torch.Tensor, tabs: torch.Tensor) -> torch.Tensor:
        """Into a map with every slot empty: plain sequential linear probing, one key at a
        time, in order of home slot then first occurrence; rows in first-occurrence order."""
        mask = self.capacity - 1
        pairs = list(zip(keys.tolist(), tabs.tolist(), strict=True))
        homes = _home(keys, tabs, mask).tolist()
        first: dict[tuple[int, int], int] = {}
        for i, pair in enumerate(pairs):
            first.setdefault(pair, i)
        state = [EMPTY] * self.capacity
        slot_of: dict[tuple[int, int], int] = {}
        for pair, i in sorted(first.items(), key=lambda item: (homes[item[1]], item[1])):
            q = homes[i]
            while state[q] == FULL:
                q = (q + 1) & mask
            state[q] = FULL
            slot_of[pair] = q
        placed = torch.tensor([slot_of[p] for p in first], dtype=torch.int64)
        self.slot_keys[placed] = torch.tensor([k for k, _ in first], dtype=torch.int64)
        self.slot_tabs[placed] = torch.tensor([t for _, t in first], dtype=torch.int32)
        self.slot_state[placed] = FULL
        return torch.tensor([slot_of[p] for p in pairs], dtype=torch.int64)

    def _holds(self, slot: int, key: torch.Tensor, tab: torch.Tensor) -> bool:
        return bool(
            self.slot_state[slot] == FULL
            and self.slot_keys[slot] == key
            and self.slot_tabs[slot] == tab
        )

    def erase(self, keys: torch.Tensor, tabs: torch.Tensor) -> torch.Tensor:
        slots = self._find_slots(keys, tabs)
        slots = torch.unique(slots[slots >= 0])
        rows = torch.sort(self.slot_rows[slots]).values
        self.slot_state[slots] = ERASED
        self.size -= slots.numel()
        self.erased += slots.numel()
        self.free_rows = torch.cat([self.free_rows, rows])
        return rows
