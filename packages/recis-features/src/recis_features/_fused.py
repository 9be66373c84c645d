"""Fused implementations of the built-in op kinds, registered with the fusion registry.

Each gathers the elements of every feature's value, makes one recis-kernels call for the whole
group (per-feature parameters passed alongside), and puts the results back into each value's
structure. Ops with a bucket count (``hash``, ``multi_hash``) hash the whole group unreduced and
take every feature's remainder in one ``fused_mod``: the kernels define ``buckets > 0`` as exactly
that unsigned remainder.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch

import recis_kernels as rk
from recis_kernels import RaggedTensor

from ._fusion import register_fused
from ._ops import (
    Bucketize,
    FeatureCross,
    FillMissing,
    Hash,
    IDMultiHash,
    Mod,
    SequenceTruncate,
)
from ._ragged import gather_strings, is_string_ragged, string_positions
from ._values import Value, as_int64, flat, rebuild

__all__: list[str] = []


@register_fused("mod")
def fused_mod(ops: Sequence[Mod], values: Sequence[Value]) -> list[Value]:
    """All ``mod`` ops of a step as one ``recis_kernels.fused_mod`` call."""
    ns = [op.n for op in ops]
    if all(type(v) is torch.Tensor and v.dtype is torch.int64 for v in values):
        # Dense int64 ids (the usual case): fused_mod keeps each input's shape.
        return rk.fused_mod(values, ns)  # type: ignore[arg-type]
    ids = [as_int64(flat(v)) for v in values]
    outs = rk.fused_mod(ids, ns)
    return [rebuild(v, o) for v, o in zip(values, outs, strict=True)]


@register_fused("bucketize")
def fused_bucketize(ops: Sequence[Bucketize], values: Sequence[Value]) -> list[Value]:
    """All ``bucketize`` ops of a step as one ``recis_kernels.fused_bucketize`` call."""
    xs = [flat(v) for v in values]
    # The boundaries as the op's tuple of floats: prepared once by the kernels, then reused.
    outs = rk.fused_bucketize(xs, [op.boundaries for op in ops])
    return [rebuild(v, o) for v, o in zip(values, outs, strict=True)]


def fill_then_bucketize(
    fills: Sequence[FillMissing], buckets: Sequence[Bucketize], xs: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``bucketize(fill_missing(x))`` of dense float tensors in one ``fused_bucketize`` call:
    NaN goes straight to the bucket of the fill value (as an element of ``x``'s dtype), with no
    filled copy of ``x``."""
    # fused_bucketize keeps each input's shape.
    return rk.fused_bucketize(
        xs,
        [b.boundaries for b in buckets],
        nan_buckets=[
            b.bucket_of(f.fill_for(x.dtype), x.dtype)
            for f, b, x in zip(fills, buckets, xs, strict=True)
        ],
    )


def fill_bucketize_args(
    fills: Sequence[FillMissing], buckets: Sequence[Bucketize], dtype: torch.dtype
) -> tuple[list[tuple[float, ...]], list[int]]:
    """The boundaries and NaN buckets :func:`fill_then_bucketize` passes for inputs that are
    all of ``dtype``: what a caller running the same features batch after batch keeps."""
    return [b.boundaries for b in buckets], [
        b.bucket_of(f.fill_for(dtype), dtype) for f, b in zip(fills, buckets, strict=True)
    ]


def _reduce(hashes: list[torch.Tensor], buckets: list[int]) -> list[torch.Tensor]:
    """Unsigned remainders of the hashes whose bucket count is non-zero, in one call."""
    todo = [k for k, b in enumerate(buckets) if b > 0]
    if todo:
        reduced = rk.fused_mod([hashes[k] for k in todo], [buckets[k] for k in todo])
        for k, r in zip(todo, reduced, strict=True):
            hashes[k] = r
    return hashes


def _hash_group(algorithm: str, values: list[Value]) -> list[torch.Tensor]:
    """Unreduced hashes of the innermost strings of each value: one call per input layout."""
    out: list[torch.Tensor | None] = [None] * len(values)
    lists = [k for k, v in enumerate(values) if isinstance(v, list)]
    if lists:
        hashed = rk.hash_strings([s for k in lists for s in values[k]], algorithm, 0)
        for k, h in zip(lists, hashed.split([len(values[k]) for k in lists]), strict=True):
            out[k] = h
    raggeds = [k for k, v in enumerate(values) if not isinstance(v, list)]
    if raggeds:
        datas = [values[k].values for k in raggeds]
        starts = torch.tensor([0] + [d.shape[0] for d in datas]).cumsum(0).tolist()
        offsets = [values[k].offsets[-1] for k in raggeds]
        joined = torch.cat(
            [offsets[0][:1]] + [o[1:] + s for o, s in zip(offsets, starts, strict=False)]
        )
        hashed = rk.hash_bytes(torch.cat(datas), joined, algorithm, 0)
        for k, h in zip(raggeds, hashed.split([o.shape[0] - 1 for o in offsets]), strict=True):
            out[k] = h
    return out  # type: ignore[return-value]


@register_fused("hash")
def fused_hash(ops: Sequence[Hash], values: Sequence[Value]) -> list[Value]:
    """All ``hash`` ops of a step: one hashing call per algorithm and input layout, then one
    ``fused_mod`` for every bucketed feature."""
    by_algorithm: dict[str, list[int]] = defaultdict(list)
    for k, op in enumerate(ops):
        by_algorithm[op.algorithm].append(k)
    hashes: list[torch.Tensor] = [torch.empty(0)] * len(ops)
    for algorithm, members in by_algorithm.items():
        for k, h in zip(members, _hash_group(algorithm, [values[k] for k in members]), strict=True):
            hashes[k] = h
    hashes = _reduce(hashes, [op.buckets for op in ops])
    outs: list[Value] = []
    for v, h in zip(values, hashes, strict=True):
        if isinstance(v, list) or len(v.offsets) == 1:
            outs.append(h)
        else:
            outs.append(RaggedTensor(h, list(v.offsets[:-1]), validate=False))
    return outs


@register_fused("multi_hash")
def fused_multi_hash(ops: Sequence[IDMultiHash], values: Sequence[Value]) -> list[Value]:
    """All ``multi_hash`` ops of a step: one unreduced ``multi_hash`` per number of hashes, then
    one ``fused_mod`` over every (feature, hash) column with a bucket count."""
    by_width: dict[int, list[int]] = defaultdict(list)
    for k, op in enumerate(ops):
        by_width[len(op.buckets)].append(k)
    outs: list[Value] = [None] * len(ops)
    for width, members in by_width.items():
        # Elements of any shape (ragged values may be (N, D)) are hashed as one flat run.
        shapes = [_element_shape(values[k]) for k in members]
        ids = [as_int64(flat(values[k])).reshape(-1) for k in members]
        full = rk.multi_hash(torch.cat(ids), [0] * width).split([i.numel() for i in ids])
        columns = [h[:, j] for h in full for j in range(width)]
        buckets = [b for k in members for b in ops[k].buckets]
        columns = _reduce(columns, buckets)
        for m, k in enumerate(members):
            hashed = torch.stack(columns[m * width : (m + 1) * width], dim=-1)
            hashed = hashed.reshape(*shapes[m], width)
            v = values[k]
            outs[k] = v.with_values(hashed, v.weights) if isinstance(v, RaggedTensor) else hashed
    return outs


@register_fused("cross")
def fused_cross(ops: Sequence[FeatureCross], values: Sequence[Value]) -> list[Value]:
    """All ``cross`` ops of a step as one ``recis_kernels.fused_feature_cross`` call."""
    # Like the unfused op, the kernel gives weights only to pairs with a weighted side.
    return list(rk.fused_feature_cross([FeatureCross.rows(v) for v in values]))


def cross_then_mod(
    crosses: Sequence[FeatureCross], mods: Sequence[Mod], values: Sequence[Value]
) -> list[Value]:
    """``mod(cross(v))`` for each value in one ``recis_kernels.fused_feature_cross`` call, each
    mod's modulus its bucket count: the kernels define it as exactly that unsigned remainder
    (dense pairs on the host are hashed and reduced in one pass)."""
    del crosses  # a cross has no parameters: every one hashes its pair alike
    return list(
        rk.fused_feature_cross(
            [FeatureCross.rows(v) for v in values], buckets=[op.n for op in mods]
        )
    )


def _element_shape(value: Value) -> torch.Size:
    """Shape of a dense value, or of a ragged value's elements."""
    return value.values.shape if isinstance(value, RaggedTensor) else value.shape


@register_fused("truncate")
def fused_truncate(ops: Sequence[SequenceTruncate], values: Sequence[Value]) -> list[Value]:
    """All ``truncate`` ops of a step as one ``recis_kernels.fused_truncate`` call (which runs
    one pass per group of inputs of one layout and keeps each input's dtype and weights)."""
    # Sequences of strings are truncated as the positions of their strings (int64, in the same
    # pass as id sequences of that layout), then the kept strings' bytes are gathered whole.
    inputs = [string_positions(v) if is_string_ragged(v) else v for v in values]
    results = rk.fused_truncate(inputs, [op.length for op in ops], [op.side for op in ops])
    return [
        gather_strings(v, r.values) if is_string_ragged(v) else r.values
        for v, r in zip(values, results, strict=True)
    ]


@register_fused("fill_missing")
def fused_fill_missing(ops: Sequence[FillMissing], values: Sequence[Value]) -> list[Value]:
    """Dense floats of one dtype and device in one masked pass; everything else op by op.

    The filled features come back as consecutive parts of one buffer, so a fused op of the next
    step (a ``bucketize``, say) takes them without packing again.
    """
    outs: list[Value] = [None] * len(ops)
    dense: dict[tuple[torch.dtype, torch.device], list[int]] = defaultdict(list)
    for k, (op, v) in enumerate(zip(ops, values, strict=True)):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            dense[(v.dtype, v.device)].append(k)
        else:
            outs[k] = op.apply(v)
    for members in dense.values():
        filled = fill_dense_packed([ops[k] for k in members], [values[k] for k in members])
        for k, out in zip(members, filled, strict=True):
            outs[k] = out
    return outs


def fill_dense_packed(ops: Sequence[FillMissing], xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """NaN replaced by each op's value in dense float tensors of one dtype and device, in one
    masked pass over the packed elements."""
    sizes = [x.numel() for x in xs]
    flat = [x if x.dim() == 1 else x.reshape(-1) for x in xs]
    packed = torch.cat(flat) if len(flat) > 1 else flat[0]
    # Fill values compare with their sign: 0.0 == -0.0, yet each feature gets its own zero.
    if len({(op.value, math.copysign(1.0, op.value)) for op in ops}) == 1:
        filled = packed.nan_to_num(
            nan=ops[0].fill_for(packed.dtype), posinf=torch.inf, neginf=-torch.inf
        )
    else:
        fills = torch.tensor([op.fill_for(packed.dtype) for op in ops], dtype=packed.dtype)
        fills = fills.to(packed.device)
        fills = fills.repeat_interleave(
            torch.tensor(sizes, device=packed.device), output_size=packed.shape[0]
        )
        filled = torch.where(packed.isnan(), fills, packed)
    return [
        part if part.shape == x.shape else part.view(x.shape)
        for part, x in zip(filled.split(sizes), xs, strict=True)
    ]
