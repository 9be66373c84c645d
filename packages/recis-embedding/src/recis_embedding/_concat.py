"""Concatenations of pooled features of one table, laid out batch-major for one pooled reduce."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch

import recis_kernels as rk
from recis_embedding._host import on_host, repeat_values
from recis_embedding._inputs import Ids
from recis_embedding._options import EmbeddingOption
from recis_embedding._pooling import bag_weights, per_bag_scale
from recis_embedding.exceptions import InputError

__all__ = ["Joined", "batch_major", "batch_major_host", "batch_major_torch", "check_joinable"]


class Joined(NamedTuple):
    """The ids of a concatenation in batch-major order, ready for one pooled reduce."""

    values: torch.Tensor  # (N,) ids: row 0's of every member, then row 1's, ...
    tabs: torch.Tensor  # (N,) table index of each id
    bags: torch.Tensor  # (B * members + 1,) offsets of the (row, member) bags
    weights: torch.Tensor | None  # (N,) multipliers realizing each member's combiner
    singles: bool  # one id per bag and no weights: a gather suffices
    rows: int  # B


def check_joinable(name: str, members: list[str], ids: Mapping[str, Ids]) -> int:
    """The rows ``B`` of concatenation ``name``'s pooled ``members``.

    Raises:
        InputError: a member has 3-level ids (a ``(B, S, D)`` output), or members differ in
            their number of rows.
    """
    rows = ids[members[0]].bags.numel() - 1
    for f in members:
        i = ids[f]
        if i.outer is not None:
            raise InputError(
                f"concat {name!r}: feature {f!r} has 3-level ids; only (B, D) outputs join"
            )
        if i.bags.numel() - 1 != rows:
            raise InputError(
                f"concat {name!r}: feature {f!r} has {i.bags.numel() - 1} rows, "
                f"{members[0]!r} has {rows}"
            )
    return rows


def batch_major(
    name: str,
    members: list[str],
    ids: Mapping[str, Ids],
    options: list[EmbeddingOption],
    tabs: list[int],
) -> Joined:
    """The ids of ``members`` reordered row by row: row 0's ids of each member in turn,
    then row 1's, and so on, with bag offsets over ``(row, member)`` and the per-id
    multipliers of each member's combiner.

    Args:
        name: the concatenation's output name (for errors).
        members: its features, in output order.
        ids: feature -> its ids.
        options: the option of each member.
        tabs: the table index of each member in their physical table.

    Raises:
        InputError: a member has 3-level ids, or members differ in their number of rows.
    """
    parts = [ids[f] for f in members]
    rows = check_joinable(name, members, ids)
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
    # NumPy cannot carry gradients: multipliers from weights that need one stay in torch.
    if on_host(parts[0].values) and not any(w is not None and w.requires_grad for w in mults):
        return batch_major_host(parts, tabs, scales, mults, rows)
    return batch_major_torch(parts, tabs, scales, mults, rows)


def batch_major_host(
    parts: list[Ids],
    tabs: list[int],
    scales: list[torch.Tensor | None],
    mults: list[torch.Tensor | None],
    rows: int,
) -> Joined:
    """:func:`batch_major` on the CPU, in NumPy: one permutation of the
    members' ids laid end to end, applied to ids and table indices; multipliers come per bag
    (one repeat) unless some member has per-id weights."""
    m = len(parts)
    sizes = [i.values.numel() for i in parts]
    plain = all(s is None for s in scales) and all(w is None for w in mults)
    if plain and all(i.singles for i in parts):
        values = np.stack([i.values.numpy() for i in parts], axis=1).reshape(-1)
        tab = np.tile(np.asarray(tabs, dtype=np.int64), rows)
        one_each = torch.arange(values.size + 1)
        return Joined(torch.from_numpy(values), torch.from_numpy(tab), one_each, None, True, rows)
    if all(w is None for w in mults):
        # Compiled: one pass writes the ids, their table indices and bag weights row by row.
        laid = rk.interleave_bags(
            [i.values for i in parts],
            [None if i.singles else i.bags for i in parts],
            tabs,
            None if plain else scales,
        )
        return Joined(laid.values, laid.labels, laid.bags, laid.weights, False, rows)
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
    return Joined(
        torch.from_numpy(values),
        torch.from_numpy(tab),
        bags,
        None if w is None else torch.from_numpy(w),
        False,
        rows,
    )


def batch_major_torch(
    parts: list[Ids],
    tabs: list[int],
    scales: list[torch.Tensor | None],
    mults: list[torch.Tensor | None],
    rows: int,
) -> Joined:
    """:func:`batch_major_host` in torch, for other devices."""
    m = len(parts)
    device = parts[0].values.device
    sizes = [i.values.numel() for i in parts]
    plain = all(s is None for s in scales) and all(w is None for w in mults)
    if plain and all(i.singles for i in parts):
        values = torch.stack([i.values for i in parts], dim=1).reshape(-1)
        tab = torch.tensor(tabs, dtype=torch.int64, device=device).repeat(rows)
        bags = torch.arange(values.numel() + 1, device=device)
        return Joined(values, tab, bags, None, True, rows)
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
    return Joined(values, tab, bags, w, False, rows)
