"""Deduplication of the ``(table, id)`` pairs of a fused lookup, with the inverse mapping."""

from __future__ import annotations

import torch

import recis_kernels as rk
from recis_embedding._host import true_positions

__all__ = ["dedup", "exact_dedup"]

_TABLE_MIX = -7046029254386353131  # 0x9E3779B97F4A7C15, odd: a bijection on ids per table


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
        as ``order[offsets[u]:offsets[u + 1]]`` (reused by the backward pass off the CPU), or
        ``None`` (on the CPU, and where the sort-based dedup falls back to ``torch.unique``).
        On the CPU the pairs come in order of first occurrence (recis-kernels'
        ``unique_pairs``: one compiled pass with a hash set), elsewhere in sorted order.
    """
    if values.device.type == "cpu":
        # The backward pass on the CPU adds each id's gradient into its row in one pass, with
        # no grouping of the ids by row: none is listed.
        found = rk.unique_pairs(values, tabs, positions=False)
        return found.ids, found.tables, found.inverse, None
    return exact_dedup(values, tabs)


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
