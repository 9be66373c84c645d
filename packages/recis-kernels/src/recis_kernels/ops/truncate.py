"""``truncate`` / ``fused_truncate``: cap ragged rows at ``max_len`` entries, keeping head or tail.

2 levels, ``max_len=2``::

    rows    [[1, 2, 3], [4], []]
    head -> [[1, 2],    [4], []]      dropped [1, 0, 0]   padded [0, 1, 2]
    tail -> [[2, 3],    [4], []]

``padded`` counts the slots a dense ``(B, max_len)`` view would pad; the ragged rows themselves
are not padded.

3 levels (rows of sub-rows, e.g. sessions of events with several ids each): the sub-row level is
truncated to ``max_len`` sub-rows per row (inner lists are kept whole) and then padded with empty
sub-rows, so every row has exactly ``max_len`` sub-rows; ``max_len=2``, head::

    [[[1], [2, 3], [4]], [[5]]]  ->  [[[1], [2, 3]], [[5], []]]    dropped [1, 0]  padded [0, 1]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from recis_kernels._backend import on_host, run_op, use_cuda_kernels
from recis_kernels._checks import can_inspect, grid_for, is_int
from recis_kernels.exceptions import ArgumentError, RaggedError, ShapeError
from recis_kernels.ops import _cpu_kernels
from recis_kernels.ops._packing import stacked_offsets
from recis_kernels.ragged import RaggedTensor

__all__ = ["TruncateResult", "fused_truncate", "truncate"]


class TruncateResult(NamedTuple):
    """Result of :func:`truncate`.

    Attributes:
        values: the truncated ragged tensor (same number of levels as the input).
        dropped: ``(B,)`` int64 entries removed per row (sub-rows for 3 levels).
        padded: ``(B,)`` int64 ``max(max_len - len, 0)`` per row: padding added (3 levels) or
            needed for a dense ``(B, max_len)`` view (2 levels).
    """

    values: RaggedTensor
    dropped: torch.Tensor
    padded: torch.Tensor


def _check(op, where, r, max_len, side) -> None:
    if not isinstance(r, RaggedTensor):
        raise RaggedError(f"{op}: {where} must be a RaggedTensor, got {type(r).__name__}")
    if r.num_levels not in (1, 2):
        raise RaggedError(f"{op}: {where} must have 2 or 3 levels, got {r.num_levels + 1}")
    if not is_int(max_len) or not 0 <= max_len < 1 << 63:
        raise ArgumentError(
            f"{op}: max_len for {where} must be an int in [0, 2**63 - 1], got {max_len!r}"
        )
    if side not in ("head", "tail"):
        raise ArgumentError(f"{op}: side for {where} must be 'head' or 'tail', got {side!r}")


def truncate(r: RaggedTensor, max_len: int, side: str = "head") -> TruncateResult:
    """Keep at most ``max_len`` entries per row (see the module docstring for 3 levels).

    Args:
        r: 2- or 3-level ragged tensor; values of any dtype and optional weights follow along.
        max_len: maximum row length, ``>= 0``.
        side: ``"head"`` keeps the first entries, ``"tail"`` the last.

    Returns:
        :class:`TruncateResult` with the truncated tensor and per-row drop/pad counts.
    """
    _check("truncate", "r", r, max_len, side)
    return fused_truncate([r], [max_len], [side], _checked=True)[0]


def fused_truncate(
    rs: Sequence[RaggedTensor],
    max_lens: Sequence[int],
    sides: Sequence[str],
    *,
    _checked: bool = False,
) -> list[TruncateResult]:
    """:func:`truncate` of K features: one pass per group of inputs with the same number of
    levels, values dtype and trailing shape, and weights dtype (or none). Each result equals
    :func:`truncate` of its input alone (dtype kept; weights only where the input has them).

    Args:
        rs: K ragged tensors on one device.
        max_lens: K maximum lengths.
        sides: K of ``"head"`` / ``"tail"``.

    Returns:
        K :class:`TruncateResult`.
    """
    op = "fused_truncate"
    if not len(rs) == len(max_lens) == len(sides):
        raise ArgumentError(
            f"{op}: got {len(rs)} inputs, {len(max_lens)} max_lens and {len(sides)} sides"
        )
    if not _checked:
        for k, (r, m, s) in enumerate(zip(rs, max_lens, sides, strict=True)):
            _check(op, f"rs[{k}]", r, m, s)
    results: list[TruncateResult | None] = [None] * len(rs)
    for levels, group in _groups(rs):
        packed = _concat([rs[k] for k in group])
        rows = [len(rs[k]) for k in group]
        maxes, tails = [int(max_lens[k]) for k in group], [sides[k] == "tail" for k in group]
        if levels == 2:
            _check_padded(op, group, rows, maxes)
        if levels == 1 and on_host((packed.values, packed.offsets[0], packed.weights)):
            out, dropped, padded = _truncate2_host(packed, maxes, tails, rows)
        else:
            row_max = _per_row(maxes, rows, packed.device)
            row_tail = _per_row(tails, rows, packed.device)
            out, dropped, padded = (_truncate2 if levels == 1 else _truncate3)(
                packed, row_max, row_tail
            )
        for k, part in zip(group, _split(out, dropped, padded, rows), strict=True):
            results[k] = part
    return results  # type: ignore[return-value]


def _check_padded(op: str, group: list[int], rows: list[int], maxes: list[int]) -> None:
    """3 levels pad every row to ``max_len`` sub-rows: their number must fit int64 offsets
    (a larger one would wrap in the offsets' cumulative sum)."""
    total = sum(n * m for n, m in zip(rows, maxes, strict=True))
    if total >= 1 << 63:
        k = max(range(len(group)), key=lambda i: rows[i] * maxes[i])
        raise ShapeError(
            f"{op}: padding the {rows[k]} rows of rs[{group[k]}] to max_len={maxes[k]} sub-rows "
            f"each makes {total} sub-rows in all, more than int64 offsets hold (2**63 - 1); "
            f"3-level truncation pads every row to max_len, so max_len must be a real length"
        )


def _groups(rs: Sequence[RaggedTensor]) -> list[tuple[int, list[int]]]:
    """Indices of the inputs that can share one pass, in input order: same levels, values dtype,
    trailing value shape, device and weights (dtype, or none). Concatenating anything else would
    promote the values (an int64 id through float32 loses its low bits), fail on the shapes, or
    give an unweighted input weights of 1."""
    groups: dict[tuple, list[int]] = {}
    for k, r in enumerate(rs):
        w = r.weights
        key = (
            r.num_levels,
            r.values.dtype,
            r.values.shape[1:],
            r.values.device,
            None if w is None else (w.dtype, w.shape[1:]),
        )
        groups.setdefault(key, []).append(k)
    return [(key[0], group) for key, group in groups.items()]


def _per_row(params, rows, device) -> torch.Tensor:
    # output_size is known on the host, which spares a device synchronization on CUDA.
    return torch.repeat_interleave(
        torch.tensor(params, device=device),
        torch.tensor(rows, device=device),
        output_size=sum(rows),
    )


def _truncate2_host(r: RaggedTensor, maxes: list[int], tails: list[bool], rows: list[int]):
    """:func:`_truncate2` on the host: the kept range of each row worked out from the offsets
    in one compiled pass, then copied by the compiled CPU kernel (a block copy per run of
    rows, shared between threads)."""
    off = r.offsets[0]
    off = off if off.is_contiguous() else off.contiguous()
    total, new_off, starts, dropped, padded = _cpu_kernels.truncate_plan(
        off, list(zip(rows, maxes, tails, strict=True))
    )
    values = _cpu_kernels.copy_rows(r.values, starts, new_off, total)
    weights = (
        None if r.weights is None else _cpu_kernels.copy_rows(r.weights, starts, new_off, total)
    )
    return RaggedTensor._trusted(values, [new_off], weights), dropped, padded


def _truncate2(r: RaggedTensor, row_max, row_tail):
    index, new_off = run_op(
        _truncate_index_op, _truncate_index_impl, r.offsets[0], row_max, row_tail
    )
    lengths = r.lengths()
    # index_select: the same gather as r.values[index], without advanced indexing's overhead.
    weights = None if r.weights is None else r.weights.index_select(0, index)
    out = RaggedTensor(r.values.index_select(0, index), new_off, weights, validate=False)
    return out, (lengths - row_max).clamp(min=0), (row_max - lengths).clamp(min=0)


def _truncate3(r: RaggedTensor, row_max, row_tail):
    sub_index, kept_off = run_op(
        _truncate_index_op, _truncate_index_impl, r.offsets[0], row_max, row_tail
    )
    sub_lengths = r.lengths(1)
    sub_starts = r.offsets[1][:-1]
    kept_len = sub_lengths[sub_index]
    # Values of the kept sub-rows, in order: expand each kept sub-row into its value range.
    # No branch on the number of kept sub-rows: it is data-dependent under torch.compile.
    total = int(kept_len.sum())
    # The repeats-only overload: arange(n).repeat_interleave(kept_len) without the arange. The
    # (input, repeats) overload branches on len(repeats) == 1 (broadcast repeats); torch 2.6
    # evaluates that branch as a guard, which fails under torch.compile as len(kept_len) is
    # data-dependent (later releases treat it as size-oblivious).
    owner = torch.repeat_interleave(kept_len, output_size=total)
    kept_base = torch.cumsum(kept_len, 0) - kept_len
    value_index = (
        sub_starts[sub_index][owner] + torch.arange(total, device=r.device) - kept_base[owner]
    )
    # Pad every row to exactly max_len sub-rows with empty sub-rows at its end.
    batch = len(r)
    kept_rows = kept_off.diff()
    new_off0 = torch.zeros(batch + 1, dtype=torch.int64, device=r.device)
    torch.cumsum(row_max, 0, out=new_off0[1:])
    row_of_kept = torch.repeat_interleave(
        torch.arange(batch, device=r.device), kept_rows, output_size=sub_index.numel()
    )
    slot = (
        new_off0[row_of_kept]
        + torch.arange(sub_index.numel(), device=r.device)
        - kept_off[row_of_kept]
    )
    padded_len = torch.zeros(int(new_off0[-1]), dtype=torch.int64, device=r.device)
    padded_len[slot] = kept_len
    new_off1 = torch.zeros(padded_len.numel() + 1, dtype=torch.int64, device=r.device)
    torch.cumsum(padded_len, 0, out=new_off1[1:])
    weights = None if r.weights is None else r.weights.index_select(0, value_index)
    values = r.values.index_select(0, value_index)
    out = RaggedTensor(values, [new_off0, new_off1], weights, validate=False)
    lengths = r.lengths()
    return out, (lengths - row_max).clamp(min=0), (row_max - lengths).clamp(min=0)


def _concat(rs: Sequence[RaggedTensor]) -> RaggedTensor:
    if len(rs) == 1:
        return rs[0]
    levels = rs[0].num_levels
    offsets = [
        stacked_offsets(
            [r.offsets[level] for r in rs],
            [
                r.values.shape[0] if level == levels - 1 else r.offsets[level + 1].numel() - 1
                for r in rs
            ],
        )
        for level in range(levels)
    ]
    values = torch.cat([r.values for r in rs])
    # The group shares one weights dtype, or none (see _groups): no weight of 1 is invented.
    weights = (
        None
        if rs[0].weights is None
        else torch.cat([r.weights for r in rs if r.weights is not None])
    )
    return RaggedTensor(values, offsets, weights, validate=False)


def _split(out: RaggedTensor, dropped, padded, rows: list[int]) -> list[TruncateResult]:
    if len(rows) == 1:
        return [TruncateResult(out, dropped, padded)]
    parts = []
    start = 0
    for n in rows:
        parts.append(
            TruncateResult(
                out._slice(start, start + n), dropped[start : start + n], padded[start : start + n]
            )
        )
        start += n
    return parts


def _truncate_index_cpu(offsets, row_max, row_tail):
    # The torch implementation; it also runs on CUDA tensors when the kernels are not used.
    if can_inspect(offsets):
        return _truncate_index_numpy(offsets, row_max, row_tail)
    lengths = offsets.diff()
    kept = torch.minimum(lengths, row_max)
    new_off = torch.zeros_like(offsets)
    torch.cumsum(kept, 0, out=new_off[1:])
    total = int(new_off[-1])
    # Output position p of row i reads offsets[i] + skip[i] + (p - new_off[i]): one per-row base,
    # expanded once, instead of gathering three per-row tensors per output element.
    base = offsets[:-1] - new_off[:-1]
    base += torch.where(row_tail, lengths - kept, 0)
    index = torch.repeat_interleave(base, kept, output_size=total)
    index += torch.arange(total, device=offsets.device)
    return index, new_off


def _truncate_index_numpy(offsets, row_max, row_tail):
    """:func:`_truncate_index_cpu` in NumPy, whose ``repeat`` expands the per-row bases about
    twice as fast as ``torch.repeat_interleave`` (same arithmetic)."""
    off = offsets.numpy()
    lengths = np.diff(off)
    kept = np.minimum(lengths, row_max.numpy())
    new_off = np.zeros_like(off)
    np.cumsum(kept, out=new_off[1:])
    base = off[:-1] - new_off[:-1]
    base += np.where(row_tail.numpy(), lengths - kept, 0)
    index = np.repeat(base, kept)
    index += np.arange(index.size, dtype=np.int64)
    return torch.from_numpy(index), torch.from_numpy(new_off)


def _truncate_index_cuda(offsets, row_max, row_tail):
    from recis_kernels._cuda import index_errors, launch

    kept = torch.minimum(offsets.diff(), row_max)
    new_off = torch.zeros_like(offsets)
    torch.cumsum(kept, 0, out=new_off[1:])
    # The kernel reads no memory through input values (its index feeds torch's checked
    # gathers); the read of the total also raises what earlier kernels recorded.
    total = index_errors.host_int(new_off[-1])
    index = torch.empty(total, dtype=torch.int64, device=offsets.device)
    tail = row_tail.to(torch.uint8)
    args = [
        ("ptr", offsets),
        ("ptr", new_off),
        ("ptr", tail),
        ("i64", kept.numel()),
        ("i64", total),
        ("ptr", index),
    ]
    launch("truncate", "truncate_index", grid_for(total), 256, args, device=offsets.device)
    return index, new_off


def _truncate_index_impl(
    offsets: torch.Tensor, row_max: torch.Tensor, row_tail: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    offsets, row_max, row_tail = offsets.contiguous(), row_max.contiguous(), row_tail.contiguous()
    if use_cuda_kernels(offsets.device):
        return _truncate_index_cuda(offsets, row_max, row_tail)
    return _truncate_index_cpu(offsets, row_max, row_tail)


_truncate_index_op = torch.library.custom_op("recis::truncate_index", mutates_args=())(
    _truncate_index_impl
)


@_truncate_index_op.register_fake
def _(offsets, row_max, row_tail):
    n = torch.library.get_ctx().new_dynamic_size()
    return offsets.new_empty(n), torch.empty_like(offsets)
