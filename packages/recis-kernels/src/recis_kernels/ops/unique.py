"""Deduplication of int64 ids: ``unique`` with inverse indices and counts, and
``unique_pairs``, the distinct ``(id, table)`` pairs of a fused lookup with their groups."""

from __future__ import annotations

from typing import NamedTuple

import torch

from recis_kernels import _native
from recis_kernels._backend import on_host, run_op
from recis_kernels._checks import check_1d, check_dtype, check_same_device, check_tensor
from recis_kernels.exceptions import ArgumentError, ShapeError

__all__ = ["UniquePairsResult", "UniqueResult", "unique", "unique_pairs"]


class UniqueResult(NamedTuple):
    """Output of :func:`unique`.

    Attributes:
        unique_ids: ``(U,) int64`` distinct ids in ascending (signed) order.
        inverse: ``(N,) int64`` position of each input id in ``unique_ids``.
        counts: ``(U,) int64`` occurrences of each distinct id.
    """

    unique_ids: torch.Tensor
    inverse: torch.Tensor
    counts: torch.Tensor


def _unique_impl(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _unique_cpu(ids)


_unique_op = torch.library.custom_op("recis::unique", mutates_args=())(_unique_impl)


@_unique_op.register_fake
def _unique_fake(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = torch.library.get_ctx().new_dynamic_size()
    return ids.new_empty(n), torch.empty_like(ids), ids.new_empty(n)


def _unique_cpu(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # torch.unique sorts; sorting is also what makes the output order deterministic.
    u, inverse, counts = torch.unique(ids, sorted=True, return_inverse=True, return_counts=True)
    return u, inverse, counts


def unique(ids: torch.Tensor) -> UniqueResult:
    """Distinct ids with the inverse mapping and occurrence counts.

    Args:
        ids: ``(N,) int64`` ids, any values including ``INT64_MIN``/``INT64_MAX``.

    Returns:
        ``UniqueResult(unique_ids (U,), inverse (N,), counts (U,))`` with
        ``unique_ids[inverse] == ids`` and ``unique_ids`` sorted ascending.

    Raises:
        UnsupportedDtypeError: ``ids`` is not an int64 tensor.
        ShapeError: ``ids`` is not 1-d.

    Example:
        >>> unique(torch.tensor([7, -1, 7]))
        UniqueResult(unique_ids=tensor([-1,  7]), inverse=tensor([1, 0, 1]), counts=tensor([1, 2]))
    """
    check_tensor("unique", "ids", ids)
    check_dtype("unique", "ids", ids, (torch.int64,))
    check_1d("unique", "ids", ids)
    return UniqueResult(*run_op(_unique_op, _unique_impl, ids))


class UniquePairsResult(NamedTuple):
    """Output of :func:`unique_pairs`.

    Attributes:
        ids: ``(U,) int64`` the id of each distinct pair, in order of first occurrence.
        tables: ``(U,) int32`` its table.
        inverse: ``(N,) int64`` the distinct pair of each input position.
        order: ``(N,) int64`` the input positions grouped by distinct pair, each group's in
            ascending order: pair ``u``'s are ``order[offsets[u]:offsets[u + 1]]`` (``None``
            when called with ``positions=False``).
        offsets: ``(U + 1,) int64`` where each group starts in ``order`` (or ``None``).
    """

    ids: torch.Tensor
    tables: torch.Tensor
    inverse: torch.Tensor
    order: torch.Tensor | None
    offsets: torch.Tensor | None


_TABLE_DTYPES = (torch.int32, torch.int64)


def unique_pairs(
    ids: torch.Tensor, tables: torch.Tensor, *, positions: bool = True
) -> UniquePairsResult:
    """Distinct ``(id, table)`` pairs in order of first occurrence, with the group of every
    position and the positions of every group (the grouping a pooled lookup's backward pass
    sums gradients by).

    Pairs are compared whole: the same id in two tables is two pairs, and no two distinct
    pairs ever merge, whatever their ids. On CPU tensors one compiled pass with a hash set
    groups the pairs and a counting pass lists each group's positions (208k pairs of 26.7k
    distinct ones: about 1 ms on one core); elsewhere ``torch.unique`` over the pairs, ordered
    by first occurrence after.

    Args:
        ids: ``(N,) int64`` ids, any values.
        tables: ``(N,)`` int32 or int64 table indices in ``[0, 2**31 - 1]``.
        positions: list each group's positions (``order`` and ``offsets``); without them the
            CPU pass skips its counting pass.

    Returns:
        :class:`UniquePairsResult` ``(ids, tables, inverse, order, offsets)`` with
        ``ids[inverse] == ids`` and ``tables[inverse] == tables`` (as int32).

    Raises:
        UnsupportedDtypeError: ``ids`` is not int64 or ``tables`` not int32/int64.
        ShapeError: ``ids`` is not 1-d, or ``tables`` not shaped like it.
        UnsupportedDeviceError: the two live on different devices.
        ArgumentError: a table index outside ``[0, 2**31 - 1]`` (checked on CPU tensors).

    Example:
        >>> r = unique_pairs(torch.tensor([7, 3, 7, 7]), torch.tensor([0, 0, 1, 0]))
        >>> r.ids, r.tables, r.inverse
        (tensor([7, 3, 7]), tensor([0, 0, 1], dtype=torch.int32), tensor([0, 1, 2, 0]))
        >>> r.order, r.offsets
        (tensor([0, 3, 1, 2]), tensor([0, 2, 3, 4]))
    """
    op = "unique_pairs"
    check_tensor(op, "ids", ids)
    check_tensor(op, "tables", tables)
    check_dtype(op, "ids", ids, (torch.int64,))
    check_dtype(op, "tables", tables, _TABLE_DTYPES)
    check_1d(op, "ids", ids)
    if tables.shape != ids.shape:
        raise ShapeError(
            f"{op}: tables has shape {tuple(tables.shape)}, expected {tuple(ids.shape)} like ids"
        )
    check_same_device(op, {"ids": ids, "tables": tables})
    host = on_host((ids, tables))
    if host and tables.numel():
        low, high = torch.aminmax(tables)
        if int(low) < 0 or int(high) > 2**31 - 1:
            bad = int(low) if int(low) < 0 else int(high)
            raise ArgumentError(f"{op}: tables must be in [0, {2**31 - 1}], got {bad}")
    tabs = tables.to(torch.int32)
    if host and ids.numel() < 2**32 - 1:
        return _unique_pairs_host(ids.contiguous(), tabs.contiguous(), positions)
    return _unique_pairs_torch(ids, tabs, positions)


def _unique_pairs_host(
    ids: torch.Tensor, tabs: torch.Tensor, positions: bool = True
) -> UniquePairsResult:
    n = ids.numel()
    keys, key_tabs = torch.empty_like(ids), torch.empty_like(tabs)
    inverse = torch.empty_like(ids)
    order = offsets = None
    if positions:
        order, offsets = torch.empty_like(ids), torch.empty(n + 1, dtype=torch.int64)
    u = _native.group_pairs(
        ids.data_ptr(),
        tabs.data_ptr(),
        n,
        (keys.data_ptr(), key_tabs.data_ptr(), inverse.data_ptr()),
        None if order is None or offsets is None else (order.data_ptr(), offsets.data_ptr()),
    )
    return UniquePairsResult(
        keys[:u], key_tabs[:u], inverse, order, None if offsets is None else offsets[: u + 1]
    )


def _unique_pairs_torch(
    ids: torch.Tensor, tabs: torch.Tensor, positions: bool = True
) -> UniquePairsResult:
    n = ids.numel()
    pairs = torch.stack([tabs.to(torch.int64), ids], dim=1)
    sorted_pairs, inv = torch.unique(pairs, dim=0, return_inverse=True)
    u = sorted_pairs.shape[0]
    at = torch.arange(n, device=ids.device)
    first = torch.full((u,), n, dtype=torch.int64, device=ids.device)
    first.scatter_reduce_(0, inv, at, reduce="amin")
    by_first = torch.argsort(first)
    rank = torch.empty_like(by_first)
    rank[by_first] = torch.arange(u, device=ids.device)
    inverse = rank.index_select(0, inv)
    firsts = sorted_pairs.index_select(0, by_first)
    order = offsets = None
    if positions:
        order = torch.sort(inverse, stable=True).indices
        offsets = torch.zeros(u + 1, dtype=torch.int64, device=ids.device)
        torch.cumsum(torch.bincount(inverse, minlength=u), 0, out=offsets[1:])
    return UniquePairsResult(
        firsts[:, 1].contiguous(), firsts[:, 0].to(torch.int32), inverse, order, offsets
    )
