"""``feature_cross`` / ``fused_feature_cross``: hashed Cartesian product of two ragged id lists.

Per row, the distinct ids of ``a`` (first occurrences, in order) are paired with the distinct ids
of ``b``, a-major; each pair ``(x, y)`` becomes ``MurmurHash64A(le64(x) ++ le64(y), seed=0)`` (the
16 little-endian bytes of the two ids) and its weight is ``w_a(x) * w_b(y)`` (the weight of the
first occurrence; a missing weight counts as 1)::

    a = [[1, 2, 1], [],  [5]]          out row 0: h(1,7) h(1,8) h(2,7) h(2,8)
    b = [[7, 8],    [3], [6, 6]]       out row 1: (empty)    out row 2: h(5,6)

With ``buckets`` (a crossed column's hash bucket size), each hash is then reduced to its
unsigned 64-bit remainder, exactly as :func:`~recis_kernels.mod` of the crossed ids, in the
same pass where the compiled kernel runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from recis_kernels._backend import on_host, plain_host, run_op, use_cuda_kernels
from recis_kernels._checks import can_inspect, check_same_device, grid_for, is_int, masked_rows
from recis_kernels.exceptions import ArgumentError, RaggedError, UnsupportedDtypeError
from recis_kernels.ops import _cpu_kernels
from recis_kernels.ops._packing import concat_rows, split_rows
from recis_kernels.ops._uint64 import const, shr
from recis_kernels.ops.mod import fused_mod
from recis_kernels.ragged import RaggedTensor

__all__ = ["feature_cross", "fused_feature_cross"]

_M = const(0xC6A4A7935BD1E995)


Ids = RaggedTensor | torch.Tensor


def _check(op: str, name: str, r: object) -> Ids:
    if isinstance(r, torch.Tensor):
        if r.dtype != torch.int64 or r.dim() != 1:
            raise UnsupportedDtypeError(
                f"{op}: {name} as a dense tensor must be 1-d int64 ids (one per row), got "
                f"{r.dtype} of shape {tuple(r.shape)}"
            )
        return r
    if not isinstance(r, RaggedTensor):
        raise RaggedError(
            f"{op}: {name} must be a RaggedTensor or a 1-d int64 tensor, got {type(r).__name__}"
        )
    if r.num_levels != 1:
        raise RaggedError(
            f"{op}: {name} must have 2 levels (one offsets tensor), got {r.num_levels + 1}"
        )
    if r.values.dtype != torch.int64 or r.values.dim() != 1:
        raise UnsupportedDtypeError(
            f"{op}: {name}.values must be 1-d int64 ids, got {r.values.dtype} of shape {tuple(r.values.shape)}"
        )
    return r


def feature_cross(a: Ids, b: Ids, *, buckets: int = 0) -> RaggedTensor:
    """Cross two id features row by row (see the module docstring for the exact rule).

    Args:
        a: 2-level ragged int64 ids, ``B`` rows, optional weights; or a ``(B,)`` int64 tensor,
            one id per row (a single-valued feature).
        b: the same for the other side.
        buckets: when not 0, each hash is reduced to its unsigned remainder by ``buckets``
            (``mod(hashes, buckets)``), in ``[1, 2**63 - 1]``.

    Returns:
        2-level ragged int64 hashes with ``B`` rows; row ``i`` has
        ``distinct(a[i]) * distinct(b[i])`` values. Weights are set when ``a`` or ``b`` has them.

    Raises:
        RaggedError: not 2-level ragged tensors, or different row counts.
        UnsupportedDtypeError: ids that are not int64 (or a dense side that is not 1-d).
        ArgumentError: ``buckets`` not an int in ``[0, 2**63 - 1]``.
    """
    return fused_feature_cross([(a, b)], buckets=[buckets], _op="feature_cross")[0]


def fused_feature_cross(
    pairs: Sequence[tuple[Ids, Ids]],
    *,
    buckets: Sequence[int] | None = None,
    _op: str = "fused_feature_cross",
) -> list[RaggedTensor]:
    """:func:`feature_cross` of K feature pairs in one pass (one kernel launch on CUDA).

    Args:
        pairs: K ``(a, b)`` pairs of 2-level ragged int64 ids or ``(B,)`` int64 tensors (one id
            per row), on one device. Pairs of two dense tensors, the cross of two
            single-valued features, are hashed value by value without any row bookkeeping.
        buckets: optional K bucket counts: pair ``k``'s hashes reduced to their unsigned
            remainder by ``buckets[k]`` (0 keeps them whole). Pairs of dense host tensors are
            hashed and reduced in one pass; otherwise one :func:`~recis_kernels.fused_mod`
            follows the crossing.

    Returns:
        K ragged tensors of crossed ids.

    Raises:
        ArgumentError: ``buckets`` not K ints in ``[0, 2**63 - 1]``.
    """
    op = _op
    ns = _buckets(op, buckets, len(pairs))
    if not pairs:
        return []
    if _plain_dense_pairs(pairs):
        return _cross_dense_host(pairs, ns)  # type: ignore[arg-type]
    for k, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise RaggedError(f"{op}: pairs[{k}] must be an (a, b) pair of id features")
        a, b = (
            _check(op, f"pairs[{k}][{j}]" if op != "feature_cross" else "ab"[j], r)
            for j, r in enumerate(pair)
        )
        if len(a) != len(b):
            raise RaggedError(f"{op}: pairs[{k}] has {len(a)} rows in a but {len(b)} in b")
    tensors = {}
    for k, (a, b) in enumerate(pairs):
        tensors[f"pairs[{k}][0]"] = _ids(a)
        tensors[f"pairs[{k}][1]"] = _ids(b)
    check_same_device(op, tensors)
    dense = all(isinstance(x, torch.Tensor) for pair in pairs for x in pair)
    if dense and on_host(tensors.values()):
        return _cross_dense_host(pairs, ns)  # type: ignore[arg-type]
    ragged = [(_as_ragged(a), _as_ragged(b)) for a, b in pairs]
    av, ao, aw, rows = concat_rows([(a.values, a.offsets[0], a.weights) for a, _ in ragged])
    bv, bo, bw, _ = concat_rows([(b.values, b.offsets[0], b.weights) for _, b in ragged])
    weighted = aw is not None or bw is not None
    values, offsets, weights = run_op(
        _feature_cross_op, _feature_cross_impl, av, ao, aw, bv, bo, bw
    )
    parts = split_rows(values, offsets, weights if weighted else None, rows)
    # The packed weights count a missing side as 1, so a pair with no weighted side gets ones
    # there; like the unfused op, its result has no weights.
    own = [a.weights is not None or b.weights is not None for a, b in ragged]
    return _reduce(
        [
            RaggedTensor(v, o, w if has else None, validate=False)
            for (v, o, w), has in zip(parts, own, strict=True)
        ],
        ns,
    )


_INT64_MAX = (1 << 63) - 1


def _buckets(op: str, buckets: Sequence[int] | None, count: int) -> list[int] | None:
    """The checked bucket counts as Python ints, or ``None`` when no hash is reduced."""
    if buckets is None:
        return None
    name = "buckets" if op == "feature_cross" else "buckets[{k}]"
    if isinstance(buckets, (str, bytes)) or not isinstance(buckets, Sequence):
        raise ArgumentError(f"{op}: buckets must be a list of ints, got {buckets!r}")
    if len(buckets) != count:
        raise ArgumentError(f"{op}: got {count} pairs but {len(buckets)} bucket counts")
    for k, n in enumerate(buckets):
        if not is_int(n) or not 0 <= n <= _INT64_MAX:
            where = name.format(k=k)
            raise ArgumentError(f"{op}: {where} must be an int in [0, 2**63 - 1], got {n!r}")
    ns = [int(n) for n in buckets]
    return ns if any(ns) else None


def _reduce(crossed: list[RaggedTensor], ns: list[int] | None) -> list[RaggedTensor]:
    """Each crossed result with a bucket count reduced by it, all in one ``fused_mod``."""
    todo = [k for k in range(len(crossed)) if ns is not None and ns[k] > 0]
    if not todo:
        return crossed
    reduced = fused_mod([crossed[k].values for k in todo], [ns[k] for k in todo])  # type: ignore[index]
    for k, values in zip(todo, reduced, strict=True):
        crossed[k] = crossed[k].with_values(values, crossed[k].weights)
    return crossed


def _plain_dense_pairs(pairs: Sequence[object]) -> bool:
    """Whether every pair is two plain 1-d int64 CPU tensors of one length (the usual cross
    of single-valued features), checked in one pass; anything else takes the checked path,
    which names what is wrong."""
    if not on_host(()):
        return False  # tracing
    for pair in pairs:
        if type(pair) not in (tuple, list):
            return False
        sides: Sequence[object] = pair  # type: ignore[assignment]
        if len(sides) != 2 or not (plain_host(sides[0]) and plain_host(sides[1])):
            return False
        a: torch.Tensor = sides[0]  # type: ignore[assignment]
        b: torch.Tensor = sides[1]  # type: ignore[assignment]
        if (
            a.dtype != torch.int64
            or b.dtype != torch.int64
            or a.dim() != 1
            or b.dim() != 1
            or a.shape[0] != b.shape[0]
        ):
            return False
    return True


def _ids(x: Ids) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x.values


def _unit_offsets(rows: int, device) -> torch.Tensor:
    return torch.arange(rows + 1, dtype=torch.int64, device=device)


def _as_ragged(x: Ids) -> RaggedTensor:
    """A dense side as ragged rows of one id each."""
    if isinstance(x, RaggedTensor):
        return x
    return RaggedTensor(x, [_unit_offsets(x.shape[0], x.device)], validate=False)


def _cross_dense_host(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], ns: list[int] | None
) -> list[RaggedTensor]:
    """Pairs of single-valued features on the host: one hash per row, all pairs at once (read
    where they lie, hashed and reduced by ``ns`` in one pass by the compiled kernel, when the
    ids are plain tensors)."""
    xs = _cpu_kernels.host_spans([a for a, _ in pairs], torch.int64)
    ys = _cpu_kernels.host_spans([b for _, b in pairs], torch.int64)
    reduced = False
    if xs is not None and ys is not None:
        hashes = _cpu_kernels.pair_hash_spans(xs, ys, ns)
        reduced = True
    elif len(pairs) == 1:
        hashes = _pair_hash(*pairs[0])
    else:
        hashes = _pair_hash(*(torch.cat([p[j] for p in pairs]) for j in (0, 1)))
    sizes = [a.shape[0] for a, _ in pairs]
    # One id per row: the offsets 0..rows, made once per row count (pairs of one batch share
    # them, as a ragged value and its with_values copy share theirs).
    units = {rows: _unit_offsets(rows, pairs[0][0].device) for rows in set(sizes)}
    crossed = [
        RaggedTensor._trusted(part, [units[rows]], None)
        for part, rows in zip(hashes.split(sizes), sizes, strict=True)
    ]
    return crossed if reduced else _reduce(crossed, ns)


# Rows up to this long find their repeated ids by comparing each id with the ones 1, 2, ...
# places before it (a vectorized pass per distance) instead of sorting every id.
_SHIFT_MAX = 16


def _first_occurrences(values, offsets) -> torch.Tensor | None:
    """Per id, whether it is the first occurrence of its value in its row; ``None`` when no
    row holds two ids (every id is)."""
    n = values.numel()
    lengths = offsets.diff()
    longest = int(lengths.max()) if n else 0
    if longest <= 1:
        return None
    starts = torch.repeat_interleave(offsets[:-1], lengths, output_size=n)
    if longest <= _SHIFT_MAX:
        return ~_repeats_by_shifts(values, starts, longest)
    return _first_by_sort(values, lengths, n)


def _distinct(values, offsets, weights, keep=None):
    """Keep the first occurrence of each id within each row, in order (``keep``: the mask of
    :func:`_first_occurrences`, when already known)."""
    if keep is None:
        keep = _first_occurrences(values, offsets)
        if keep is None:
            return values, offsets, weights  # no row holds two ids: nothing to drop
    n = values.numel()
    # Kept ids before each position; read at the row boundaries, the new offsets.
    before = torch.zeros(n + 1, dtype=offsets.dtype, device=offsets.device)
    torch.cumsum(keep, 0, out=before[1:])
    w = None if weights is None else masked_rows(weights, keep)
    return masked_rows(values, keep), before[offsets], w


def _repeats_by_shifts(values, starts, longest: int) -> torch.Tensor:
    """Ids equal to an earlier id of their row, rows at most ``longest`` long."""
    pos = torch.arange(values.numel(), device=values.device) - starts
    repeat = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    for d in range(1, longest):
        repeat[d:] |= (values[d:] == values[:-d]) & (pos[d:] >= d)
    return repeat


def _first_by_sort(values, lengths, n: int) -> torch.Tensor:
    """First occurrences of each id in its row, by a stable sort of (row, id)."""
    row = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=values.device), lengths, output_size=n
    )
    order = torch.argsort(values, stable=True)
    order = order[torch.argsort(row[order], stable=True)]
    sv, sr = values[order], row[order]
    first = torch.ones(n, dtype=torch.bool, device=values.device)
    first[1:] = (sv[1:] != sv[:-1]) | (sr[1:] != sr[:-1])
    keep = torch.zeros(n, dtype=torch.bool, device=values.device)
    keep[order[first]] = True
    return keep


def _pair_hash(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MurmurHash64A of each pair's 16 little-endian bytes: by the compiled kernel for plain
    CPU tensors, else in torch ops (int64 wrap-around multiplies give the same bits)."""
    xs = _cpu_kernels.host_parts([x], torch.int64)
    ys = _cpu_kernels.host_parts([y], torch.int64)
    if xs is not None and ys is not None:
        return _cpu_kernels.pair_hash_flat(xs, ys)
    h = torch.full_like(x, const(16 * 0xC6A4A7935BD1E995))
    for k in (x, y):
        k = k * _M
        k = (k ^ shr(k, 47)) * _M
        h = (h ^ k) * _M
    h = h ^ shr(h, 47)
    h = h * _M
    return h ^ shr(h, 47)


def _cross_layout(ao, bo):
    """Row lengths of both sides and the offsets of the crossed rows."""
    la, lb = ao.diff(), bo.diff()
    out_off = torch.zeros_like(ao)
    torch.cumsum(la * lb, 0, out=out_off[1:])
    return la, lb, out_off


def _product(aw, ia, bw, ib, n: int, device) -> torch.Tensor:
    """Per output the product of its pair's weights (a missing side counts as 1); empty when
    neither side is weighted. ``ia``/``ib`` pick the pair's entries (``None``: the first ``n``)."""
    picked = [
        w[:n] if i is None else w.index_select(0, i)
        for w, i in ((aw, ia), (bw, ib))
        if w is not None
    ]
    if not picked:
        return torch.empty(0, dtype=torch.float32, device=device)
    return picked[0] * picked[1] if len(picked) == 2 else picked[0].clone()


def _cross_cpu(av, ao, aw, bv, bo, bw):
    rows = ao.numel() - 1
    if av.numel() == rows == bv.numel() and _one_per_row(ao) and _one_per_row(bo):
        # One id on each side of every row (single-valued features): pair value by value.
        return _pair_hash(av, bv), ao.clone(), _product(aw, None, bw, None, rows, av.device)
    ia, ib, out_off = _pair_index(ao, bo, av.numel())
    pick = torch.Tensor.index_select
    return (
        _pair_hash(pick(av, 0, ia), pick(bv, 0, ib)),
        out_off,
        _product(aw, ia, bw, ib, ia.numel(), av.device),
    )


def _pair_index(ao, bo, na: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every crossed pair the index of its ``a`` id and of its ``b`` id (a-major within each
    row), and the offsets of the crossed rows; ``na`` is the number of ``a`` ids."""
    rows = ao.numel() - 1
    la, lb, out_off = _cross_layout(ao, bo)
    total = int(out_off[-1])
    # a-major pairs without a division per output: each id of a is repeated once per id of b in
    # its row, and the b side runs through that row's ids once per repeat.
    device = ao.device
    row_of_a = torch.repeat_interleave(torch.arange(rows, device=device), la, output_size=na)
    per_a = lb.index_select(0, row_of_a)
    ia = torch.repeat_interleave(torch.arange(na, device=device), per_a, output_size=total)
    block_start = torch.cumsum(per_a, 0) - per_a
    ib = torch.repeat_interleave(
        bo.index_select(0, row_of_a) - block_start, per_a, output_size=total
    )
    ib += torch.arange(total, device=device)
    return ia, ib, out_off


def _one_per_row(offsets: torch.Tensor) -> bool:
    """Whether ``offsets`` is ``0, 1, ..., rows`` (every row holds exactly one id)."""
    if can_inspect(offsets):
        return bool((np.diff(offsets.numpy()) == 1).all())
    return bool((offsets.diff() == 1).all())


def _cross_cuda(av, ao, aw, bv, bo, bw):
    from recis_kernels._cuda import index_errors, launch

    *_, out_off = _cross_layout(ao, bo)
    device = av.device
    total = index_errors.host_int(out_off[-1])
    out_v = torch.empty(total, dtype=torch.int64, device=device)
    out_w = torch.empty(total, dtype=torch.float32, device=device)
    rows = ao.numel() - 1
    args = [("ptr", av), ("i64", av.numel()), ("ptr", ao), ("ptr", aw), ("ptr", bv),
            ("i64", bv.numel()), ("ptr", bo), ("ptr", bw), ("ptr", out_off), ("i64", rows),
            ("i64", total), ("ptr", out_v), ("ptr", out_w),
            *index_errors.error_args(device, "feature_cross", ("a offsets", "b offsets"))]  # fmt: skip
    launch("feature_cross", "feature_cross", grid_for(total), 256, args, device=device)
    index_errors.after_launch(device)
    return out_v, out_off, out_w


def _feature_cross_impl(
    a_values: torch.Tensor,
    a_offsets: torch.Tensor,
    a_weights: torch.Tensor | None,
    b_values: torch.Tensor,
    b_offsets: torch.Tensor,
    b_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crossed values, offsets and weights; the weights are empty when neither side has any."""
    av, ao, aw = _distinct(a_values.contiguous(), a_offsets.contiguous(), a_weights)
    bv, bo, bw = _distinct(b_values.contiguous(), b_offsets.contiguous(), b_weights)
    if not use_cuda_kernels(av.device) or any(
        w is not None and w.dtype != torch.float32 for w in (aw, bw)
    ):
        # The torch path runs on any device; the kernel takes float32 weights only (what a
        # RaggedTensor holds; other dtypes reach the op only when it is called directly, e.g.
        # by gradcheck in float64).
        return _cross_cpu(av, ao, aw, bv, bo, bw)
    weighted = aw is not None or bw is not None
    aw, bw = (
        torch.ones(v.numel(), dtype=torch.float32, device=v.device) if w is None else w.contiguous()
        for v, w in ((av, aw), (bv, bw))
    )
    values, offsets, weights = _cross_cuda(av, ao, aw, bv, bo, bw)
    return values, offsets, weights if weighted else weights[:0]


_feature_cross_op = torch.library.custom_op("recis::feature_cross", mutates_args=())(
    _feature_cross_impl
)


def _setup_context(ctx, inputs, output) -> None:
    a_values, a_offsets, a_weights, b_values, b_offsets, b_weights = inputs
    ctx.save_for_backward(a_values, a_offsets, a_weights, b_values, b_offsets, b_weights)


def _original_pairs(a_values, a_offsets, b_values, b_offsets):
    """For every crossed pair the positions of its two ids in the inputs (before the repeats
    within a row were dropped)."""
    sides = []
    for values, offsets in ((a_values, a_offsets), (b_values, b_offsets)):
        keep = _first_occurrences(values, offsets)
        positions = torch.arange(values.numel(), device=values.device)
        if keep is not None:
            positions, offsets, _ = _distinct(positions, offsets, None, keep)
        sides.append((positions, offsets))
    (pa, ao), (pb, bo) = sides
    ia, ib, _ = _pair_index(ao, bo, pa.numel())
    return pa.index_select(0, ia), pb.index_select(0, ib)


def _backward(ctx, grad_values, grad_offsets, grad_weights):
    """Each pair's weight is ``w_a * w_b`` of the first occurrences of its ids: the gradient of
    a weight is the sum, over the pairs its id is in, of the pair's gradient times the other
    side's weight; repeats dropped within a row get none."""
    a_values, a_offsets, a_weights, b_values, b_offsets, b_weights = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[2], ctx.needs_input_grad[5]
    grad_a = grad_b = None
    if grad_weights is None or grad_weights.numel() == 0 or not (need_a or need_b):
        return None, None, grad_a, None, None, grad_b
    ia, ib = _original_pairs(
        a_values.contiguous(), a_offsets.contiguous(), b_values.contiguous(), b_offsets.contiguous()
    )
    g = grad_weights
    if need_a:
        other = g if b_weights is None else g * b_weights.index_select(0, ib)
        grad_a = torch.zeros_like(a_weights).index_add_(0, ia, other.to(a_weights.dtype))
    if need_b:
        other = g if a_weights is None else g * a_weights.index_select(0, ia)
        grad_b = torch.zeros_like(b_weights).index_add_(0, ib, other.to(b_weights.dtype))
    return None, None, grad_a, None, None, grad_b


_feature_cross_op.register_autograd(_backward, setup_context=_setup_context)


@_feature_cross_op.register_fake
def _(a_values, a_offsets, a_weights, b_values, b_offsets, b_weights):
    n = torch.library.get_ctx().new_dynamic_size()
    return (
        a_values.new_empty(n),
        a_offsets.new_empty(a_offsets.shape),
        a_values.new_empty(
            0 if a_weights is None and b_weights is None else n, dtype=torch.float32
        ),
    )
