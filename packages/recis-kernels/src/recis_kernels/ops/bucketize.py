"""``bucketize`` / ``fused_bucketize``: bucket = number of boundaries ``<= x``.

With boundaries ``[0, 10, 20]``: ``x < 0 -> 0``, ``0 <= x < 10 -> 1``, ``x = 10 -> 2`` (a value equal
to a boundary goes to the upper bucket), ``x >= 20 -> 3``; NaN goes to bucket 0. Comparison happens
in float64 when either side is floating point (float32 when both are float32, which compares
identically), else in int64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import List  # noqa: UP035  (torch 2.6 infers schemas from typing.List only)

import torch

from recis_kernels._backend import use_cuda_kernels
from recis_kernels._checks import check_same_device, check_tensor, grid_for
from recis_kernels.exceptions import ShapeError, UnsupportedDtypeError
from recis_kernels.ops._packing import pack, unpack

__all__ = ["bucketize", "fused_bucketize"]

_INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _boundaries(op: str, where: str, b: torch.Tensor | Sequence[float], device) -> torch.Tensor:
    """``b`` as a 1-d numeric tensor on ``device`` (order and NaN are checked by the caller)."""
    t = b if isinstance(b, torch.Tensor) else torch.tensor(list(b))
    if t.dtype not in _INTS + _FLOATS:
        raise UnsupportedDtypeError(f"{op}: {where} must be numeric, got {t.dtype}")
    if t.dim() != 1:
        raise ShapeError(f"{op}: {where} must be 1-d, got shape {tuple(t.shape)}")
    return t.to(device)


def _check_order(op: str, wheres: Sequence[str], packed: torch.Tensor, sizes: list[int]) -> None:
    """Every boundary list free of NaN and non-decreasing, checked over the packed lists at
    once; the error names the first list that is not."""
    if torch.compiler.is_compiling() or packed.numel() == 0:
        return
    bad = packed.isnan() if packed.is_floating_point() else None
    if bad is not None and bool(bad.any()):
        k = _owner(int(bad.nonzero()[0]), sizes)
        raise ValueError(f"{op}: {wheres[k]} must not contain NaN")
    if packed.numel() > 1:
        # A step down between two neighbours of one list (not across a list boundary).
        down = packed[1:] < packed[:-1]
        starts = torch.tensor(sizes[:-1], dtype=torch.int64).cumsum(0) - 1
        down[starts[(starts >= 0) & (starts < down.numel())].to(down.device)] = False
        if bool(down.any()):
            k = _owner(int(down.nonzero()[0]) + 1, sizes)
            raise ValueError(f"{op}: {wheres[k]} must be sorted in non-decreasing order")


def _owner(position: int, sizes: Sequence[int]) -> int:
    """Index of the list holding ``position`` of the packed lists."""
    end = 0
    for k, size in enumerate(sizes):
        end += size
        if position < end:
            return k
    return len(sizes) - 1


def _check_x(op: str, where: str, x: object) -> torch.Tensor:
    t = check_tensor(op, where, x)
    if t.dtype not in _INTS + _FLOATS:
        raise UnsupportedDtypeError(
            f"{op}: {where} must be an integer or float tensor, got {t.dtype}"
        )
    return t


def bucketize(x: torch.Tensor, boundaries: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Bucket index of each value: the number of ``boundaries`` that are ``<= x``.

    Args:
        x: integer or float tensor of any shape.
        boundaries: ``(M,)`` sorted (non-decreasing) boundaries, tensor or sequence.

    Returns:
        int64 tensor shaped like ``x`` with values in ``[0, M]``.

    Example:
        >>> bucketize(torch.tensor([-1.0, 0.0, 5.0, 10.0]), [0.0, 10.0])
        tensor([0, 1, 1, 2])
    """
    return fused_bucketize([x], [boundaries], _op="bucketize")[0]


def fused_bucketize(
    xs: Sequence[torch.Tensor],
    boundaries_list: Sequence[torch.Tensor | Sequence[float]],
    *,
    _op: str = "fused_bucketize",
) -> list[torch.Tensor]:
    """:func:`bucketize` of K features, each with its own boundaries, in one pass.

    Args:
        xs: K integer or float tensors on one device.
        boundaries_list: K sorted boundary tensors or sequences.

    Returns:
        K int64 tensors shaped like ``xs``.
    """
    op = _op
    if len(xs) != len(boundaries_list):
        raise ValueError(f"{op}: got {len(xs)} inputs but {len(boundaries_list)} boundary lists")
    if not xs:
        return []
    for k, x in enumerate(xs):
        _check_x(op, "x" if op == "bucketize" else f"xs[{k}]", x)
    device = check_same_device(op, {f"xs[{k}]": x for k, x in enumerate(xs)})
    wheres = [
        "boundaries" if op == "bucketize" else f"boundaries_list[{k}]"
        for k in range(len(boundaries_list))
    ]
    bounds = [
        _boundaries(op, where, b, device) for where, b in zip(wheres, boundaries_list, strict=True)
    ]
    dtype = _common_dtype([*xs, *bounds])
    packed, sizes = pack([x.to(dtype) for x in xs])
    packed_b, b_sizes = pack([b.to(dtype) for b in bounds])
    _check_order(op, wheres, packed_b, b_sizes)
    out = torch.ops.recis.fused_bucketize(packed, sizes, packed_b, b_sizes)
    return unpack(out, sizes, [x.shape for x in xs])


def _common_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 when any side is floating point (exact for every float and int32), else int64."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if not dtype.is_floating_point:
        return torch.int64
    # float32 against float32 compares identically in float32; anything mixed goes to float64.
    return (
        torch.float32
        if dtype == torch.float32 and all(t.dtype == torch.float32 for t in tensors)
        else torch.float64
    )


# Up to this many boundaries per feature, counting with comparisons beats binary search.
_COUNT_MAX = 32


def _fused_bucketize_cpu(xs, sizes, bounds, b_sizes):
    k = len(sizes)
    if k == 1:
        out = torch.searchsorted(bounds, xs, right=True)
    elif len(set(sizes)) == 1 and max(b_sizes) <= _COUNT_MAX:
        # Few boundaries: count them with one vectorized comparison per boundary column, which
        # beats a binary search per element; NaN compares false everywhere and lands in 0.
        # Float padding is NaN, never counted; integer padding is the dtype's maximum, which
        # only a maximal x counts, so integer counts are clamped to the real number.
        floating = xs.is_floating_point()
        table = _pad_rows(bounds, b_sizes, float("nan") if floating else torch.iinfo(xs.dtype).max)
        values = xs.view(k, -1)
        # Byte counters (at most _COUNT_MAX) added to in place: a third of the memory traffic
        # of int64 counters, and no dtype promotion per column.
        counts = torch.zeros(values.shape, dtype=torch.uint8, device=xs.device)
        hit = torch.empty(values.shape, dtype=torch.bool, device=xs.device)
        for j in range(table.shape[1]):
            torch.ge(values, table[:, j : j + 1], out=hit)
            counts.add_(hit.view(torch.uint8))
        out = counts.view(-1).to(torch.int64)
        if not floating:
            out = torch.minimum(out.view(k, -1), torch.tensor(b_sizes, device=xs.device)[:, None])
        return out.view(-1)
    elif len(set(sizes)) == 1:
        big = torch.finfo(xs.dtype).max if xs.is_floating_point() else torch.iinfo(xs.dtype).max
        table = _pad_rows(bounds, b_sizes, big)
        found = torch.searchsorted(table, xs.view(k, -1), right=True)
        out = torch.minimum(found, torch.tensor(b_sizes, device=xs.device)[:, None]).view(-1)
    else:
        big = torch.finfo(xs.dtype).max if xs.is_floating_point() else torch.iinfo(xs.dtype).max
        table = _pad_rows(bounds, b_sizes, big)
        values = _pad_rows(xs, sizes, 0)
        found = torch.searchsorted(table, values, right=True)
        # Padding equals the dtype's maximum, so a maximal x may count it; clamp to the real count.
        found = torch.minimum(found, torch.tensor(b_sizes, device=xs.device)[:, None])
        mask = (
            torch.arange(values.shape[1], device=xs.device)
            < torch.tensor(sizes, device=xs.device)[:, None]
        )
        out = found[mask]
    if xs.is_floating_point():
        out = torch.where(xs.isnan(), 0, out)
    return out


def _pad_rows(flat: torch.Tensor, sizes: list[int], fill) -> torch.Tensor:
    width = max(sizes) if sizes else 0
    table = flat.new_full((len(sizes), width), fill)
    lengths = torch.tensor(sizes, device=flat.device)
    mask = torch.arange(width, device=flat.device) < lengths[:, None]
    table[mask] = flat
    return table


def _fused_bucketize_cuda(xs, sizes, bounds, b_sizes):
    from recis_kernels._cuda import launch

    out = torch.empty(xs.numel(), dtype=torch.int64, device=xs.device)
    x_off = _offsets(sizes, xs.device)
    b_off = _offsets(b_sizes, xs.device)
    if bounds.numel() == 0:
        bounds = bounds.new_zeros(1)
    if xs.is_floating_point():
        xs, bounds = xs.to(torch.float64), bounds.to(torch.float64)
    suffix = "f64" if xs.is_floating_point() else "i64"
    n = xs.numel()
    args = [("ptr", xs), ("ptr", x_off), ("ptr", bounds), ("ptr", b_off), ("i64", len(sizes)),
            ("i64", n), ("ptr", out)]  # fmt: skip
    launch("bucketize", f"fused_bucketize_{suffix}", grid_for(n), 256, args, device=xs.device)
    return out


def _offsets(sizes: list[int], device) -> torch.Tensor:
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    return torch.tensor(bounds, dtype=torch.int64, device=device)


@torch.library.custom_op("recis::fused_bucketize", mutates_args=())
def _fused_bucketize_op(
    xs: torch.Tensor,
    sizes: List[int],  # noqa: UP006
    bounds: torch.Tensor,
    b_sizes: List[int],  # noqa: UP006
) -> torch.Tensor:
    xs, bounds = xs.contiguous(), bounds.contiguous()
    if use_cuda_kernels(xs.device):
        return _fused_bucketize_cuda(xs, sizes, bounds, b_sizes)
    return _fused_bucketize_cpu(xs, sizes, bounds, b_sizes)


@_fused_bucketize_op.register_fake
def _(xs, sizes, bounds, b_sizes):
    return xs.new_empty(xs.shape, dtype=torch.int64)
