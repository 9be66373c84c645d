"""``interleave_bags``: several features' ids laid out row by row (batch-major order).

A concatenated embedding lookup pools row ``r`` of every member feature into consecutive
columns of one output; laying the members' ids out as row 0's ids of each member in turn, then
row 1's, and so on makes that one pooling call over ``(row, member)`` bags.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from recis_kernels import _native
from recis_kernels._backend import on_host
from recis_kernels._checks import check_1d, check_dtype, check_tensor, is_int
from recis_kernels.exceptions import ArgumentError, ShapeError

__all__ = ["InterleaveResult", "interleave_bags"]

_INT32 = (-(2**31), 2**31 - 1)


class InterleaveResult(NamedTuple):
    """Output of :func:`interleave_bags`.

    Attributes:
        values: ``(N,)`` the members' ids, row by row and member by member within a row.
        bags: ``(R * M + 1,) int64`` offsets of the ``(row, member)`` bags: row ``r``'s ids of
            member ``m`` are ``values[bags[r * M + m]:bags[r * M + m + 1]]``.
        labels: ``(N,) int32`` each id's member label.
        weights: ``(N,) float32`` each id's bag scale (1 where a member has none), or ``None``
            when no member has scales.
    """

    values: torch.Tensor
    bags: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor | None


def interleave_bags(
    values: Sequence[torch.Tensor],
    offsets: Sequence[torch.Tensor | None],
    labels: Sequence[int],
    scales: Sequence[torch.Tensor | None] | None = None,
) -> InterleaveResult:
    """Lay ``M`` ragged members of ``R`` rows out row by row.

    Args:
        values: per member, its ``int64`` ids (1-d).
        offsets: per member, ``(R + 1,) int64`` row offsets into its ids (row ``r`` holds
            ``values[offsets[r]:offsets[r + 1]]``), or ``None`` for one id per row.
        labels: per member, an int32 label written for each of its ids (e.g. its table index).
        scales: per member, ``(R,) float32`` per-row weights or ``None`` (weight 1); ``None``
            for no weights at all.

    Returns:
        :class:`InterleaveResult`.

    Raises:
        ArgumentError: the lists differ in length, a label is outside int32, or the members
            disagree on the rows.
        UnsupportedDtypeError: ids or offsets not int64, scales not float32.
        ShapeError: a tensor is not 1-d, or offsets that decrease or leave the ids.

    Example:
        >>> r = interleave_bags(
        ...     [torch.tensor([1, 2]), torch.tensor([7, 8, 9])],
        ...     [None, torch.tensor([0, 2, 3])],
        ...     [0, 5],
        ... )
        >>> r.values, r.bags, r.labels
        (tensor([1, 7, 8, 2, 9]), tensor([0, 1, 3, 4, 5]), tensor([0, 5, 5, 0, 5], dtype=torch.int32))
    """
    op = "interleave_bags"
    m = len(values)
    if m == 0 or len(offsets) != m or len(labels) != m or (scales is not None and len(scales) != m):
        raise ArgumentError(
            f"{op}: values, offsets, labels (and scales) must list the same members, at least "
            f"one; got {m}, {len(offsets)}, {len(labels)}"
            + ("" if scales is None else f", {len(scales)}")
        )
    scale_list = list(scales) if scales is not None else [None] * m
    rows = -1
    for k in range(m):
        v, o, s = values[k], offsets[k], scale_list[k]
        check_tensor(op, f"values[{k}]", v)
        check_dtype(op, f"values[{k}]", v, (torch.int64,))
        check_1d(op, f"values[{k}]", v)
        if o is not None:
            check_tensor(op, f"offsets[{k}]", o)
            check_dtype(op, f"offsets[{k}]", o, (torch.int64,))
            check_1d(op, f"offsets[{k}]", o)
            if o.numel() == 0:
                raise ShapeError(
                    f"{op}: offsets[{k}] is empty, expected R + 1 >= 1 row offsets (0 for no rows)"
                )
        if s is not None:
            check_tensor(op, f"scales[{k}]", s)
            check_dtype(op, f"scales[{k}]", s, (torch.float32,))
            check_1d(op, f"scales[{k}]", s)
        own = v.numel() if o is None else o.numel() - 1
        if rows < 0:
            rows = own
        elif own != rows:
            raise ArgumentError(f"{op}: member {k} has {own} rows, member 0 has {rows}")
        if s is not None and s.numel() != rows:
            raise ShapeError(f"{op}: scales[{k}] has {s.numel()} values for {rows} rows")
        label = labels[k]
        if not is_int(label):
            raise ArgumentError(f"{op}: labels[{k}] is {label!r}, expected an int")
        if not _INT32[0] <= int(label) <= _INT32[1]:
            raise ArgumentError(f"{op}: labels[{k}] is {label}, outside int32")
    rows = max(rows, 0)
    tensors = [*values, *offsets, *scale_list]
    if on_host(tensors):
        return _interleave_host(values, offsets, labels, scale_list, rows, scales is not None)
    return _interleave_torch(values, offsets, labels, scale_list, rows, scales is not None)


def _interleave_host(
    values, offsets, labels, scales, rows: int, weighted: bool
) -> InterleaveResult:
    members = []
    keep = []  # contiguous copies live through the call
    n = 0
    for v, o, label, s in zip(values, offsets, labels, scales, strict=True):
        v = v.contiguous()
        o = None if o is None else o.contiguous()
        s = None if s is None else s.contiguous()
        keep += [v, o, s]
        if o is None:
            n += v.numel()
        elif rows:
            n += int(o[rows]) - int(o[0])
        members.append(
            (
                v.data_ptr(),
                v.numel(),
                None if o is None else o.data_ptr(),
                int(label),
                None if s is None else s.data_ptr(),
            )
        )
    device = values[0].device
    out_values = torch.empty(max(n, 0), dtype=torch.int64, device=device)
    out_labels = torch.empty(max(n, 0), dtype=torch.int32, device=device)
    weights = torch.empty(max(n, 0), dtype=torch.float32, device=device) if weighted else None
    bags = torch.empty(rows * len(members) + 1, dtype=torch.int64, device=device)
    try:
        _native.interleave_bags(
            members,
            rows,
            max(n, 0),
            (
                out_values.data_ptr(),
                out_labels.data_ptr(),
                None if weights is None else weights.data_ptr(),
                bags.data_ptr(),
            ),
        )
    except ValueError as error:
        raise ShapeError(str(error)) from None
    return InterleaveResult(out_values, bags, out_labels, weights)


def _interleave_torch(
    values, offsets, labels, scales, rows: int, weighted: bool
) -> InterleaveResult:
    device = values[0].device
    m = len(values)
    lengths = torch.ones((rows, m), dtype=torch.int64, device=device)
    first = torch.empty((rows, m), dtype=torch.int64, device=device)
    at = 0
    for j, (v, o) in enumerate(zip(values, offsets, strict=True)):
        if o is None:
            first[:, j] = torch.arange(at, at + rows, device=device)
        else:
            lengths[:, j] = o[1:] - o[:-1]
            if bool((lengths[:, j] < 0).any()) or (
                rows and (int(o[0]) < 0 or int(o[rows]) > v.numel())
            ):
                raise ShapeError(f"interleave_bags: offsets[{j}] decrease or leave its values")
            first[:, j] = o[:-1] + at
        at += v.numel()
    flat = lengths.reshape(-1)
    bags = torch.zeros(rows * m + 1, dtype=torch.int64, device=device)
    torch.cumsum(flat, 0, out=bags[1:])
    n = int(bags[-1])
    perm = torch.repeat_interleave(first.reshape(-1) - bags[:-1], flat, output_size=n)
    perm += torch.arange(n, device=device)
    out_values = torch.cat(list(values)).index_select(0, perm)
    sizes = torch.tensor([v.numel() for v in values], device=device)
    member = torch.tensor([int(label) for label in labels], dtype=torch.int32, device=device)
    out_labels = torch.repeat_interleave(member, sizes, output_size=at).index_select(0, perm)
    weights = None
    if weighted:
        per_bag = torch.ones((rows, m), dtype=torch.float32, device=device)
        for j, s in enumerate(scales):
            if s is not None:
                per_bag[:, j] = s
        weights = torch.repeat_interleave(per_bag.reshape(-1), flat, output_size=n)
    return InterleaveResult(out_values, bags, out_labels, weights)
