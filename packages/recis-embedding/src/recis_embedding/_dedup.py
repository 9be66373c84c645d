"""Deduplication of the ``(table, id)`` pairs of a fused lookup, with the inverse mapping."""

from __future__ import annotations

import numpy as np
import torch

import recis_kernels as rk
from recis_embedding._host import true_positions

__all__ = ["dedup", "exact_dedup", "packed_dedup"]

_TABLE_MIX = -7046029254386353131  # 0x9E3779B97F4A7C15, odd: a bijection on ids per table
_MUL = -4658895280553007687  # 0xBF58476D1CE4E5B9, odd multiplier of the grouping hash


def dedup(
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
        found = packed_dedup(values, tabs)
        if found is not None:
            return found
    return exact_dedup(values, tabs)


_MIN_HASH_BITS = 24  # below this many hash bits per packed value, collisions get likely


def packed_dedup(values: torch.Tensor, tabs: torch.Tensor):
    """Group equal pairs with one vectorized sort of plain int64 values (CPU, in NumPy).

    Each value packs, from the top, the high bits of a multiplicative hash of the id, the table
    index and the position, so one sort of plain values makes equal pairs adjacent, each group
    in ascending position order: recis-kernels' radix sort by the bits above the position
    (229k values: about 2 ms, where NumPy's sort takes about 9). Two different ids of one
    table share a group only when their hashes agree on every kept bit; that is detected and
    ``None`` sends the caller to the exact path. The other passes run in NumPy, whose loops
    over these index arrays are faster than torch's on one thread.
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
    # The positions in the low bits make a stable sort by the bits above them the full sort.
    rk.sort_by_high_bits_(torch.from_numpy(packed), bits)
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


def exact_dedup(values: torch.Tensor, tabs: torch.Tensor):
    """Sort-based dedup on any device.

    Pairs are keyed by ``id ^ (table * K)``. Two different pairs can share a key only with
    different tables, which the check below detects (each key must map back to one table); the
    lexicographic ``unique`` over pairs then runs instead, so no ids ever merge.
    """
    tabs = tabs.to(torch.int32)
    key = values ^ (tabs.to(torch.int64) * _TABLE_MIX)
    n = key.numel()
    sorted_key, order = torch.sort(key, stable=True)  # each group's positions ascending
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
