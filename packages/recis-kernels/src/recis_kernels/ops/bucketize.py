"""``bucketize`` / ``fused_bucketize``: bucket = number of boundaries ``<= x``.

With boundaries ``[0, 10, 20]``: ``x < 0 -> 0``, ``0 <= x < 10 -> 1``, ``x = 10 -> 2`` (a value equal
to a boundary goes to the upper bucket), ``x >= 20 -> 3``; NaN goes to bucket 0. float32 values are
compared in float32 against floating boundaries rounded up to the next float32 (for a float32
``x``, ``x >= b`` exactly when ``x >= roundup32(b)``), which halves the memory traffic of a float64
comparison and gives the same buckets. Other floating inputs compare in float64 (integer
boundaries rounded up to float64), integers in int64 (floating boundaries rounded up to
integers), so every combination is exact. Each feature of :func:`fused_bucketize` compares in
the dtype it would alone (features are grouped by it), and a sequence of boundaries is taken
exactly: Python floats as float64, ints as int64; a sequence mixing them, or holding ints
outside int64, is checked on the Python numbers and converted for the dtype ``x`` compares in
(see :func:`_exact_sequence`).
"""

from __future__ import annotations

import itertools
import math
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import List  # noqa: UP035  (torch 2.6 infers schemas from typing.List only)

import numpy as np
import torch

from recis_kernels._backend import on_host, run_op, use_cuda_kernels
from recis_kernels._checks import (
    can_inspect,
    check_parts,
    check_same_device,
    check_tensor,
    common_device,
    grid_for,
    is_int,
)
from recis_kernels.exceptions import ArgumentError, ShapeError, UnsupportedDtypeError
from recis_kernels.ops import _cpu_kernels
from recis_kernels.ops._packing import pack, unpack

__all__ = ["bucketize", "fused_bucketize"]

_INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _boundaries(
    op: str, where: str, b: torch.Tensor | Sequence[float], device, x_dtype: torch.dtype
) -> tuple[torch.Tensor, str | None]:
    """``b`` as a 1-d numeric tensor on ``device`` for values of dtype ``x_dtype``, and what is
    wrong with it when it is a sequence checked here (see :func:`_exact_sequence`); the order of
    other boundaries, and NaN, are checked by the caller.

    A sequence of Python numbers is taken exactly: ints as int64, and floats as float64 (a
    Python float), never rounded to torch's default float32."""
    if isinstance(b, torch.Tensor):
        t = b
    else:
        try:
            values = list(b)
            exact = _exact_values(values)
            if exact is not None:
                error = _sequence_error(exact)
                t = _exact_sequence([] if error else exact, x_dtype)
                return (t if t.device == device else t.to(device)), error
            # NumPy infers float64 for Python floats and int64 for ints (torch.tensor: float32).
            t = torch.from_numpy(np.asarray(values))
        except (TypeError, ValueError, OverflowError) as e:
            raise UnsupportedDtypeError(f"{op}: {where} must be numeric, got {b!r:.80}") from e
    if t.dtype not in _INTS + _FLOATS:
        names = ", ".join(str(d).removeprefix("torch.") for d in _INTS + _FLOATS)
        raise UnsupportedDtypeError(
            f"{op}: {where} must be numeric ({names}; wider unsigned integers as a list or a "
            f"NumPy array), got {t.dtype}"
        )
    if t.dim() != 1:
        raise ShapeError(f"{op}: {where} must be 1-d, got shape {tuple(t.shape)}")
    return (t if t.device == device else t.to(device)), None


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _exact_values(values: list) -> list[int | float] | None:
    """``values`` as Python ints and floats where NumPy would not take them exactly: ints mixed
    with floats (NumPy rounds the ints to float64: ``2**53 + 1`` became ``2**53``) or ints
    outside int64 (NumPy makes them uint64, objects or float64). None where NumPy is exact (all
    floats, or all ints in int64) or the values are not all Python or NumPy real numbers."""
    types = set(map(type, values))
    if any(issubclass(t, np.generic) for t in types):
        values = [v.item() if isinstance(v, np.generic) else v for v in values]
        types = set(map(type, values))
    if not types or not types <= {int, float, bool}:
        return None
    if float in types:
        return values if len(types) > 1 else None
    return values if min(values) < _INT64_MIN or max(values) > _INT64_MAX else None


def _sequence_error(values: list[int | float]) -> str | None:
    """What is wrong with a sequence of Python numbers, checked on the numbers themselves:
    Python compares an int with a float exactly, where converting first could round a step
    down away (``[2**53 + 1, 2.0**53]`` as float64 is ``[2**53, 2**53]``)."""
    if any(v != v for v in values):
        return "must not contain NaN"
    if any(b < a for a, b in itertools.pairwise(values)):
        return "must be sorted in non-decreasing order"
    return None


def _exact_sequence(values: list[int | float], x_dtype: torch.dtype) -> torch.Tensor:
    """Sorted Python ints and floats (see :func:`_exact_values`) as boundaries with the counts
    of exact arithmetic for values of dtype ``x_dtype``: for floating values each rounded up to
    the next float64 (no float64 lies between a number and that), for integer values each
    rounded up to an integer, those above every int64 dropped and those below clamped to
    ``INT64_MIN`` (as :func:`_ceil_to_int64` does to floating boundaries)."""
    if x_dtype.is_floating_point:
        return torch.tensor([_up_to_float64(v) for v in values], dtype=torch.float64)
    ints = [_ceil(v) for v in values]
    return torch.tensor([max(v, _INT64_MIN) for v in ints if v <= _INT64_MAX], dtype=torch.int64)


def _up_to_float64(v: int | float) -> float:
    """The smallest float64 ``>= v``."""
    if isinstance(v, float):
        return v
    try:
        f = float(v)  # the nearest float64, maybe below v
    except OverflowError:
        return math.inf if v > 0 else -sys.float_info.max
    return math.nextafter(f, math.inf) if f < v else f


def _ceil(v: int | float) -> int:
    """The smallest integer ``>= v``; ``+-inf`` as integers beyond int64 on that side."""
    if isinstance(v, int):
        return int(v)
    if math.isinf(v):
        return _INT64_MAX + 1 if v > 0 else _INT64_MIN
    return math.ceil(v)


def _order_error(packed: torch.Tensor, sizes: list[int]) -> tuple[int, str] | None:
    """The first packed boundary list holding NaN, or else the first that steps down, with what
    is wrong with it; checked over the packed lists at once (on a host copy: boundary lists are
    short). Nothing is checked while tracing or on meta tensors, which hold no values."""
    if torch.compiler.is_compiling() or packed.numel() == 0 or packed.device.type == "meta":
        return None
    b = packed.detach().cpu().numpy()
    if b.dtype.kind == "f":
        bad = np.flatnonzero(np.isnan(b))
        if bad.size:
            return _owner(int(bad[0]), sizes), "must not contain NaN"
    # A step down between two neighbours of one list (not across a list boundary).
    down = b[1:] < b[:-1]
    ends = np.cumsum(sizes[:-1], dtype=np.int64) - 1
    down[ends[(ends >= 0) & (ends < down.size)]] = False
    steps = np.flatnonzero(down)
    if steps.size:
        return _owner(int(steps[0]) + 1, sizes), "must be sorted in non-decreasing order"
    return None


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


def bucketize(
    x: torch.Tensor, boundaries: torch.Tensor | Sequence[float], *, nan_bucket: int = 0
) -> torch.Tensor:
    """Bucket index of each value: the number of ``boundaries`` that are ``<= x``.

    Args:
        x: integer or float tensor of any shape.
        boundaries: ``(M,)`` sorted (non-decreasing) boundaries, tensor or sequence.
        nan_bucket: the bucket of NaN values (NaN compares false with every boundary: bucket 0
            by default); ``bucketize(x, b, nan_bucket=bucketize(v, b))`` equals bucketizing
            ``x`` with NaN filled by ``v``, in one pass.

    Returns:
        int64 tensor shaped like ``x`` with values in ``[0, M]``.

    Example:
        >>> bucketize(torch.tensor([-1.0, 0.0, 5.0, 10.0]), [0.0, 10.0])
        tensor([0, 1, 1, 2])
    """
    return fused_bucketize([x], [boundaries], nan_buckets=[nan_bucket], _op="bucketize")[0]


def fused_bucketize(
    xs: Sequence[torch.Tensor],
    boundaries_list: Sequence[torch.Tensor | Sequence[float]],
    *,
    nan_buckets: Sequence[int] | None = None,
    _op: str = "fused_bucketize",
) -> list[torch.Tensor]:
    """:func:`bucketize` of K features, each with its own boundaries, in one pass.

    Args:
        xs: K integer or float tensors on one device.
        boundaries_list: K sorted boundary tensors or sequences.
        nan_buckets: K buckets for the NaN values of each feature (default: all 0).

    Returns:
        K int64 tensors shaped like ``xs``.
    """
    op = _op
    if len(xs) != len(boundaries_list):
        raise ArgumentError(f"{op}: got {len(xs)} inputs but {len(boundaries_list)} boundary lists")
    nans = _nan_buckets(op, nan_buckets, len(xs))
    if not xs:
        return []
    fast = _host_one_pass(op, xs, boundaries_list, nans)
    if fast is not None:
        return fast
    device = common_device(xs, _INTS + _FLOATS)
    if device is None:
        for k, x in enumerate(xs):
            _check_x(op, "x" if op == "bucketize" else f"xs[{k}]", x)
        device = check_same_device(op, {f"xs[{k}]": x for k, x in enumerate(xs)})
    results: list[torch.Tensor] = [None] * len(xs)  # type: ignore[list-item]
    for members, packed_b, b_sizes, dtype in _prepared_boundaries(op, boundaries_list, xs, device):
        group = [xs[k] for k in members]
        parts = [_as(x, dtype) for x in group]
        sizes = [x.numel() for x in parts]
        # Integers are never NaN; a float group passes its NaN buckets when one is not 0.
        group_nans = None
        if dtype.is_floating_point and any(nans[k] for k in members):
            group_nans = [nans[k] for k in members]
        if on_host(parts) and not use_cuda_kernels(device):
            # The compiled CPU kernel reads each feature where it lies: no packed copy.
            out = _cpu_kernels.bucketize_parts(parts, packed_b, b_sizes, group_nans)
            unpacked = unpack(out, sizes, [x.shape for x in group])
        else:
            packed, _ = pack(parts)
            out = run_op(
                _fused_bucketize_op, _fused_bucketize_impl, packed, sizes, packed_b, b_sizes
            )
            unpacked = unpack(out, sizes, [x.shape for x in group])
            if group_nans is not None:
                unpacked = [
                    torch.where(x.isnan(), n, part) if n else part
                    for x, n, part in zip(group, group_nans, unpacked, strict=True)
                ]
        for k, part in zip(members, unpacked, strict=True):
            results[k] = part
    return results


_CPU = torch.device("cpu")


def _host_one_pass(
    op: str, xs: Sequence[torch.Tensor], boundaries_list, nans: list[int]
) -> list[torch.Tensor] | None:
    """The usual case in one pass over the inputs: plain CPU tensors all of one dtype the
    compiled kernel compares in (float32, float64, int64), with boundaries that need no other
    dtype; ``None`` for everything else (the general path then checks and groups)."""
    if type(xs[0]) is not torch.Tensor or xs[0].dtype not in _cpu_kernels.BUCKET_DTYPES:
        return None
    if use_cuda_kernels(_CPU):
        return None  # host tensors sent through the CUDA kernels (their host emulation)
    dtype = xs[0].dtype
    spans = _cpu_kernels.host_spans(xs, dtype)
    if spans is None:
        return None
    prepared = _prepared_boundaries(op, boundaries_list, xs, _CPU)
    if len(prepared) != 1 or prepared[0][3] != dtype:
        return None
    _, packed_b, b_sizes, _ = prepared[0]
    group_nans = nans if dtype.is_floating_point and any(nans) else None
    return _cpu_kernels.bucketize_spans(spans, packed_b, b_sizes, group_nans)


def _nan_buckets(op: str, nan_buckets: Sequence[int] | None, count: int) -> list[int]:
    """The NaN bucket of each of ``count`` features, checked: ints in int64."""
    name = "nan_bucket" if op == "bucketize" else "nan_buckets"
    if nan_buckets is None:
        return [0] * count
    if (
        type(nan_buckets) is list
        and len(nan_buckets) == count
        and all(type(n) is int and _INT64_MIN <= n <= _INT64_MAX for n in nan_buckets)
    ):
        return nan_buckets  # the usual case: Python ints, checked in one pass
    if isinstance(nan_buckets, (str, bytes)) or not isinstance(nan_buckets, Sequence):
        raise ArgumentError(f"{op}: {name} must be a list of ints, got {nan_buckets!r}")
    if len(nan_buckets) != count:
        raise ArgumentError(f"{op}: got {count} inputs but {len(nan_buckets)} nan_buckets")
    for k, n in enumerate(nan_buckets):
        if not is_int(n) or not -(1 << 63) <= int(n) < 1 << 63:
            where = name if op == "bucketize" else f"nan_buckets[{k}]"
            raise ArgumentError(f"{op}: {where} must be an int64 integer, got {n!r}")
    return [int(n) for n in nan_buckets]


def _prepare(
    op: str, boundaries_list: Sequence[torch.Tensor | Sequence[float]], xs, device
) -> list[tuple[list[int], torch.Tensor, list[int], torch.dtype]]:
    """The features grouped by the dtype each compares in on its own (see
    :func:`_compare_dtype`), with each group's boundary lists checked and packed in that dtype.

    Grouping, rather than one common dtype for all, keeps every feature exact: an int64 feature
    fused with a float one would otherwise compare in float64, inexact above 2**53.
    """
    wheres = [
        "boundaries" if op == "bucketize" else f"boundaries_list[{k}]"
        for k in range(len(boundaries_list))
    ]
    bounds: list[torch.Tensor] = []
    errors: list[tuple[int, str]] = []  # (list, what is wrong with it)
    for k, (where, b, x) in enumerate(zip(wheres, boundaries_list, xs, strict=True)):
        t, what = _boundaries(op, where, b, device, x.dtype)
        bounds.append(t)
        if what is not None:
            errors.append((k, what))
    members: dict[torch.dtype, list[int]] = {}
    for k, (x, b) in enumerate(zip(xs, bounds, strict=True)):
        members.setdefault(_compare_dtype(x.dtype, b.dtype), []).append(k)
    groups = []
    for dtype, ks in members.items():
        error = _group_order_error([bounds[k] for k in ks])
        if error is not None:
            errors.append((ks[error[0]], error[1]))
        if dtype == torch.float32:
            # float32 values against wider floating boundaries: rounded up to float32.
            wide = any(bounds[k].dtype != dtype for k in ks)
            packed_b, b_sizes = pack([_as(bounds[k], torch.float64 if wide else dtype) for k in ks])
            if wide:
                packed_b = _round_up_to_float32(packed_b)
        else:
            packed_b, b_sizes = pack([_exact_boundaries(bounds[k], dtype) for k in ks])
        groups.append((ks, packed_b, b_sizes, dtype))
    if errors:
        k, what = min(errors)
        raise ArgumentError(f"{op}: {wheres[k]} {what}")
    return groups


def _group_order_error(bounds: list[torch.Tensor]) -> tuple[int, str] | None:
    """:func:`_order_error` of the boundary lists of one group, each checked in a dtype that
    holds it exactly (floating lists in float64, integer ones in int64)."""
    found = []
    for floating in (True, False):
        sub = [k for k, b in enumerate(bounds) if b.is_floating_point() == floating]
        if sub:
            wide = torch.float64 if floating else torch.int64
            error = _order_error(*pack([_as(bounds[k], wide) for k in sub]))
            if error is not None:
                found.append((sub[error[0]], error[1]))
    return min(found) if found else None


def _exact_boundaries(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boundaries in the compare dtype ``dtype`` (float64 or int64) with the same counts as
    exact arithmetic: integer boundaries of floating values are rounded up to float64, floating
    boundaries of integer values up to integers (see :func:`_round_up_to_float64` and
    :func:`_ceil_to_int64`)."""
    if dtype == torch.float64 and not b.is_floating_point():
        return _round_up_to_float64(b.to(torch.int64))
    if dtype == torch.int64 and b.is_floating_point():
        return _ceil_to_int64(b.to(torch.float64))
    return _as(b, dtype)


_TWO_63 = 2.0**63


def _round_up_to_float64(b: torch.Tensor) -> torch.Tensor:
    """Each int64 boundary as the smallest float64 ``>=`` it.

    Above 2**53 an int64 rounds to the nearest float64, maybe below it: ``2**60 + 1`` became
    ``2**60``, which a float ``x = 2**60`` then counted. For a floating ``x`` and an integer
    ``b``, ``x >= b`` holds exactly when ``x >= roundup64(b)``.
    """
    near = b.to(torch.float64)
    # An integral float64 below 2**63 converts back to int64 exactly; 2**63 is above every int64.
    fits = near < _TWO_63
    low = fits & (torch.where(fits, near, 0.0).to(torch.int64) < b)
    if torch.compiler.is_compiling() or b.device.type == "meta" or bool(low.any()):
        near = torch.where(low, torch.nextafter(near, near.new_tensor(torch.inf)), near)
    return near


def _ceil_to_int64(b: torch.Tensor) -> torch.Tensor:
    """Sorted float64 boundaries of integer values as int64 boundaries with the same counts.

    For an integer ``x``, ``b <= x`` holds exactly when ``ceil(b) <= x``. Boundaries at or below
    ``-2**63`` (``-inf`` included) count for every int64 and become ``INT64_MIN``; those at or
    above ``2**63`` (``+inf`` included) count for none and are dropped (they close the sorted
    list, so the counts of the rest are unchanged). Comparing in float64 instead rounded ``x``:
    ``2**53 + 3`` counted the boundary ``2**53 + 4``.
    """
    c = torch.ceil(b).clamp(min=-_TWO_63)
    below = c < _TWO_63
    if torch.compiler.is_compiling() or b.device.type == "meta":
        # Sizes cannot depend on values while tracing: the boundaries above every int64 become
        # INT64_MAX there, counted by INT64_MAX itself only.
        return torch.where(below, c, 0.0).to(torch.int64).masked_fill(~below, 2**63 - 1)
    return c[: int(below.sum())].to(torch.int64)


# Prepared boundaries of recent calls, keyed by the identity of each boundary tensor: a feature
# pipeline passes the same tensors batch after batch, and checking, converting and packing them
# again costs more than bucketing a few thousand values (4096 float32 values, 10 float64
# boundaries, a busy CPU: about 65 us a call prepared anew, 33 us from the cache). An entry
# holds its tensors, so their ids cannot be reused while it lives, and a copy of their values,
# compared exactly on every hit: a version counter alone misses writes that skip it (through
# a NumPy view, ``.data`` or DLPack) and would serve stale boundaries. The comparison costs
# about 3 us a call on the host (a version-keyed hit took 30 us); for boundaries on a GPU it
# synchronizes once, as preparing them anew does (the order check reads them on the host).
# A tuple of Python ints and floats cannot change at all: held by its entry, its identity is
# its value, and a hit needs no comparison (a fused call of 13 features: 13 comparisons less).
_PREPARED_MAX = 64
# key -> (the boundary objects, copies of the tensors among them, the prepared groups, whether
# every one is a tuple)
_prepared: OrderedDict[tuple, tuple[tuple, tuple, list, bool]] = OrderedDict()
_prepared_lock = threading.Lock()


def _prepared_boundaries(op, boundaries_list, xs, device):
    key = _prepared_key(op, boundaries_list, xs, device)
    if key is None:
        return _prepare(op, boundaries_list, xs, device)
    with _prepared_lock:
        hit = _prepared.get(key)
    if hit is not None and (
        hit[3]
        or all(
            type(b) is tuple or torch.equal(b, seen)
            for b, seen in zip(boundaries_list, hit[1], strict=True)
        )
    ):
        with _prepared_lock:
            if key in _prepared:
                _prepared.move_to_end(key)
        return hit[2]
    result = _prepare(op, boundaries_list, xs, device)
    if not all(type(v) in (int, float) for b in boundaries_list if type(b) is tuple for v in b):
        return result  # a tuple holding anything else might change: not kept
    seen = tuple(b if type(b) is tuple else b.detach().clone() for b in boundaries_list)
    with _prepared_lock:
        tuples = all(type(b) is tuple for b in boundaries_list)  # nothing to compare on a hit
        _prepared[key] = (tuple(boundaries_list), seen, result, tuples)
        _prepared.move_to_end(key)
        while len(_prepared) > _PREPARED_MAX:
            _prepared.popitem(last=False)
    return result


def _prepared_key(op, boundaries_list, xs, device) -> tuple | None:
    if torch.compiler.is_compiling():
        return None
    ident = []
    for b in boundaries_list:
        if type(b) is not tuple and (type(b) is not torch.Tensor or b.is_inference() or b.is_meta):
            # Lists are converted anew; inference tensors are not held (they may not be used
            # outside inference mode), meta tensors hold no values to compare.
            return None
        ident.append(id(b))
    dtype = xs[0].dtype
    same = all(x.dtype == dtype for x in xs)
    return (op, tuple(ident), dtype if same else tuple(x.dtype for x in xs), device)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _compare_dtype(x: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype values of dtype ``x`` compare in against boundaries of dtype ``b``, each exact:
    float32 for float32 values and floating boundaries (rounded up to float32, see
    :func:`_round_up_to_float32`), float64 for other floating values (integer boundaries rounded
    up to float64), int64 for integer values (floating boundaries rounded up to integers)."""
    if x == torch.float32 and b.is_floating_point:
        return torch.float32
    if x.is_floating_point:
        return torch.float64
    return torch.int64


def _round_up_to_float32(b: torch.Tensor) -> torch.Tensor:
    """Each float64 boundary as the smallest float32 ``>=`` it (``inf`` above float32's range).

    For a float32 ``x`` and any real ``b``, ``x >= b`` holds exactly when ``x >= roundup32(b)``
    (no float32 lies in between), so float32 values compare in float32 with the same result.
    """
    near = b.to(torch.float32)
    low = near.to(torch.float64) < b
    # Reading ``low`` on the host is not possible while tracing nor on meta tensors.
    if torch.compiler.is_compiling() or b.device.type == "meta" or bool(low.any()):
        near = torch.where(low, torch.nextafter(near, near.new_tensor(torch.inf)), near)
    return near


# Up to this many boundaries per feature, counting with comparisons beats binary search.
_COUNT_MAX = 32
# The dtypes the compiled CPU kernel compares in (every compare dtype, see :func:`_compare_dtype`).
_HOST_DTYPES = (torch.float32, torch.float64, torch.int64)


def _fused_bucketize_cpu(xs, sizes, bounds, b_sizes):
    k = len(sizes)
    if can_inspect(xs) and xs.dtype == bounds.dtype and xs.dtype in _HOST_DTYPES:
        return _cpu_kernels.bucketize_parts(xs.split(sizes), bounds, b_sizes)
    # The torch implementation: while tracing, and on CUDA tensors when the kernels are not used.
    if k == 1:
        out = torch.searchsorted(bounds, xs, right=True)
    elif len(set(sizes)) == 1 and max(b_sizes) <= _COUNT_MAX:
        # Few boundaries: count them with one vectorized comparison per boundary column, which
        # beats a binary search per element; NaN compares false everywhere and lands in 0.
        # Float padding is NaN, never counted; integer padding is the dtype's maximum, which
        # only a maximal x counts, so integer counts are clamped to the real number.
        floating = xs.is_floating_point()
        table = _pad_rows(bounds, b_sizes, float("nan") if floating else torch.iinfo(xs.dtype).max)
        out = _count_at_most(xs.view(k, -1), table).view(-1).to(torch.int64)
        if not floating:
            out = torch.minimum(out.view(k, -1), torch.tensor(b_sizes, device=xs.device)[:, None])
        return out.view(-1)
    elif len(set(sizes)) == 1:
        big = _padding(xs.dtype)
        table = _pad_rows(bounds, b_sizes, big)
        found = torch.searchsorted(table, xs.view(k, -1), right=True)
        out = torch.minimum(found, torch.tensor(b_sizes, device=xs.device)[:, None]).view(-1)
    else:
        big = _padding(xs.dtype)
        table = _pad_rows(bounds, b_sizes, big)
        values = _pad_rows(xs, sizes, 0)
        found = torch.searchsorted(table, values, right=True)
        # A maximal x (+inf, or the integer maximum) counts the padding; clamp to the real count.
        found = torch.minimum(found, torch.tensor(b_sizes, device=xs.device)[:, None])
        mask = (
            torch.arange(values.shape[1], device=xs.device)
            < torch.tensor(sizes, device=xs.device)[:, None]
        )
        out = found[mask]
    if xs.is_floating_point():
        out = torch.where(xs.isnan(), 0, out)
    return out


def _padding(dtype: torch.dtype) -> float | int:
    """Padding after each boundary list of a search table: no smaller than any boundary, so a
    padded row stays sorted (an infinite boundary included); the values it counts (+inf, or an
    integer dtype's maximum) are clamped back to the list's length."""
    return math.inf if dtype.is_floating_point else torch.iinfo(dtype).max


def _count_at_most(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Per element of row k of ``values``, how many of ``table[k]`` are ``<= `` it, as uint8.

    Byte counters (at most _COUNT_MAX) added to in place: a third of the memory traffic of int64
    counters, and no dtype promotion per column.
    """
    counts = torch.zeros(values.shape, dtype=torch.uint8, device=values.device)
    hit = torch.empty(values.shape, dtype=torch.bool, device=values.device)
    for j in range(table.shape[1]):
        torch.ge(values, table[:, j : j + 1], out=hit)
        counts.add_(hit.view(torch.uint8))
    return counts


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


def _fused_bucketize_impl(
    xs: torch.Tensor,
    sizes: List[int],  # noqa: UP006
    bounds: torch.Tensor,
    b_sizes: List[int],  # noqa: UP006
) -> torch.Tensor:
    xs, bounds = xs.contiguous(), bounds.contiguous()
    op = "fused_bucketize"
    if len(b_sizes) != len(sizes):
        raise ShapeError(
            f"{op}: {len(sizes)} value parts but {len(b_sizes)} boundary lists (b_sizes)"
        )
    check_parts(op, "sizes", sizes, xs.numel(), "xs")
    check_parts(op, "b_sizes", b_sizes, bounds.numel(), "bounds")
    if use_cuda_kernels(xs.device):
        return _fused_bucketize_cuda(xs, sizes, bounds, b_sizes)
    return _fused_bucketize_cpu(xs, sizes, bounds, b_sizes)


_fused_bucketize_op = torch.library.custom_op("recis::fused_bucketize", mutates_args=())(
    _fused_bucketize_impl
)


@_fused_bucketize_op.register_fake
def _(xs, sizes, bounds, b_sizes):
    return xs.new_empty(xs.shape, dtype=torch.int64)
