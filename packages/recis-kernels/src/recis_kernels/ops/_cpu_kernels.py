"""The compiled CPU kernels (``recis_kernels._native``, built from ``rust/``) on CPU tensors.

Each kernel makes one pass over the elements of several features, every feature with its own
parameter, read where it lies (no packed copy of the inputs) and written into one fresh output,
the elements shared out between up to ``torch.get_num_threads()`` threads, without the GIL.

The kernels get raw addresses: the callers pass eager, plain CPU tensors (see
``recis_kernels._backend.on_host`` / ``_checks.can_inspect``); here they are made contiguous in
the kernel's dtype, kept alive for the call, and given an output of their own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from recis_kernels import _native, _overlap
from recis_kernels._backend import on_host, plain_host

__all__ = [
    "Spans",
    "bucketize_flat",
    "bucketize_parts",
    "bucketize_spans",
    "copy_rows",
    "host_parts",
    "host_spans",
    "pair_hash_flat",
    "pair_hash_spans",
    "split_spans",
    "truncate_plan",
    "umod_flat",
    "umod_parts",
    "umod_spans",
]

BUCKET_DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.int64: "int64"}


def _parts(xs: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    # reshape(-1) of a non-contiguous tensor copies it into a contiguous one.
    out = []
    for x in xs:
        if x.dtype != dtype:
            raise TypeError(f"CPU kernel expected {dtype} parts, got {x.dtype}")
        # A view costs about a microsecond, and fused calls pass dozens of flat features.
        flat = x if x.dim() == 1 else x.reshape(-1)
        out.append(flat if flat.is_contiguous() else flat.contiguous())
    return out


def host_parts(xs: Sequence[object], dtype: torch.dtype) -> list[torch.Tensor] | None:
    """``xs`` as flat, contiguous tensors a kernel may read in place: ``None`` unless every one
    is of ``dtype`` and :func:`~recis_kernels._backend.on_host` (the caller then checks its
    inputs and reports, or takes its torch path). One pass: fused calls take dozens of parts."""
    if not on_host(()):
        return None  # tracing
    parts: list[torch.Tensor] = []
    for x in xs:
        if not plain_host(x) or x.dtype is not dtype:  # type: ignore[attr-defined]
            return None
        assert isinstance(x, torch.Tensor)
        flat = x if x.dim() == 1 else x.reshape(-1)
        parts.append(flat if flat.is_contiguous() else flat.contiguous())
    return parts


class Spans(NamedTuple):
    """Inputs a kernel reads where they lie (:func:`host_spans`)."""

    keep: list[torch.Tensor]  # the flat, contiguous tensors read: alive for the call
    spans: list[tuple[int, int]]  # each one's (address, element count), as the kernels take
    sizes: list[int]  # each one's element count
    shapes: list[torch.Size] | None  # the inputs' shapes; None when every input is 1-d


def host_spans(xs: Sequence[object], dtype: torch.dtype) -> Spans | None:
    """:func:`host_parts` with what a kernel call needs of them, in the same single pass:
    addresses, element counts and (unless every input is 1-d) shapes to give the results.
    ``None`` unless every input is a plain CPU tensor of ``dtype`` that needs no gradient,
    outside tracing. Fused calls take dozens of inputs per batch: each attribute read counts."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return None
    keep: list[torch.Tensor] = []
    spans: list[tuple[int, int]] = []
    sizes: list[int] = []
    flat = True
    for x in xs:
        if type(x) is not torch.Tensor or x.dtype is not dtype or not x.is_cpu or x.requires_grad:
            return None
        if x.dim() != 1:
            flat = False
            x = x.reshape(-1)
        if not x.is_contiguous():
            x = x.contiguous()
        n = x.shape[0]
        keep.append(x)
        spans.append((x.data_ptr(), n))
        sizes.append(n)
    return Spans(keep, spans, sizes, None if flat else [x.shape for x in xs])  # type: ignore[attr-defined]


def split_spans(out: torch.Tensor, spans: Spans) -> list[torch.Tensor]:
    """A kernel's flat output cut into one result per input of ``spans``, shaped like it."""
    parts = out.split_with_sizes(spans.sizes)
    if spans.shapes is None:
        return list(parts)
    return [p if p.shape == s else p.view(s) for p, s in zip(parts, spans.shapes, strict=True)]


def umod_spans(spans: Spans, ns: list[int]) -> list[torch.Tensor]:
    """``(uint64)x % n`` of every input of ``spans`` (int64) by its Python int modulus in
    ``[1, 2**63 - 1]``, one result per input, shaped like it."""
    total = sum(spans.sizes)
    out = torch.empty(total, dtype=torch.int64)
    background = _overlap.deferring(8 * total)
    job = _native.umod_parts(spans.spans, ns, out.data_ptr(), torch.get_num_threads(), background)
    if job is not None:
        _overlap.defer(job, out, *spans.keep)
    return split_spans(out, spans)


def umod_parts(xs: Sequence[torch.Tensor], ns: Sequence[int]) -> torch.Tensor:
    """``(uint64)xs[k] % ns[k]`` for int64 CPU tensors, ``0 < ns[k] < 2**63``, written one after
    another into one flat int64 tensor."""
    return umod_flat(_parts(xs, torch.int64), [int(n) for n in ns])


def umod_flat(
    parts: Sequence[torch.Tensor], ns: list[int], sizes: list[int] | None = None
) -> torch.Tensor:
    """:func:`umod_parts` on parts already flat, contiguous and int64 (:func:`host_parts`), with
    Python int moduli (``sizes``: the parts' lengths, when the caller has them)."""
    if sizes is None:
        sizes = [p.shape[0] for p in parts]
    out = torch.empty(sum(sizes), dtype=torch.int64)
    _native.umod_parts(
        [(p.data_ptr(), n) for p, n in zip(parts, sizes, strict=True)],
        ns,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


def pair_hash_spans(xs: Spans, ys: Spans, ns: list[int] | None = None) -> torch.Tensor:
    """:func:`pair_hash_flat` of the int64 inputs of ``xs`` and ``ys`` (of equal sizes)."""
    out = torch.empty(sum(xs.sizes), dtype=torch.int64)
    _native.pair_hash_parts(xs.spans, ys.spans, out.data_ptr(), torch.get_num_threads(), ns)
    return out


def pair_hash_flat(
    xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], ns: list[int] | None = None
) -> torch.Tensor:
    """The hash of every pair ``(xs[k][i], ys[k][i])`` (MurmurHash64A of the two ids' 16
    little-endian bytes), the parts one after another in one flat int64 tensor; ``xs`` and
    ``ys`` flat, contiguous int64 CPU tensors (:func:`host_parts`), ``xs[k]`` as long as
    ``ys[k]``. With ``ns`` (Python ints in ``[0, 2**63 - 1]``), part ``k``'s hashes are
    reduced to their unsigned remainder by ``ns[k]`` in the same pass (0: kept whole)."""
    out = torch.empty(sum(x.numel() for x in xs), dtype=torch.int64)
    _native.pair_hash_parts(
        [(x.data_ptr(), x.numel()) for x in xs],
        [(y.data_ptr(), y.numel()) for y in ys],
        out.data_ptr(),
        torch.get_num_threads(),
        ns,
    )
    return out


def bucketize_parts(
    xs: Sequence[torch.Tensor],
    bounds: torch.Tensor,
    b_sizes: Sequence[int],
    nan_buckets: list[int] | None = None,
) -> torch.Tensor:
    """The bucket of every element of ``xs[k]`` against boundary list ``k`` of ``bounds`` (the
    lists back to back, ``b_sizes[k]`` each, sorted, NaN-free and of the parts' dtype: float32,
    float64 or int64), written one part after another into one flat int64 tensor; NaN in
    ``xs[k]`` lands in bucket ``nan_buckets[k]`` (int64; 0 when not given)."""
    dtype = bounds.dtype
    if dtype not in BUCKET_DTYPES:
        raise TypeError(f"CPU bucketize kernel takes float32, float64 or int64, got {dtype}")
    return bucketize_flat(_parts(xs, dtype), bounds, [int(n) for n in b_sizes], nan_buckets)


def bucketize_spans(
    spans: Spans, bounds: torch.Tensor, b_sizes: list[int], nan_buckets: list[int] | None
) -> list[torch.Tensor]:
    """:func:`bucketize_flat` of the inputs of ``spans`` (of the boundaries' dtype), one
    result per input, shaped like it."""
    bounds = bounds if bounds.is_contiguous() else bounds.contiguous()
    out = torch.empty(sum(spans.sizes), dtype=torch.int64)
    _native.bucketize_parts(
        BUCKET_DTYPES[bounds.dtype],
        spans.spans,
        bounds.data_ptr(),
        b_sizes,
        out.data_ptr(),
        torch.get_num_threads(),
        nan_buckets,
    )
    return split_spans(out, spans)


def bucketize_flat(
    parts: Sequence[torch.Tensor],
    bounds: torch.Tensor,
    b_sizes: list[int],
    nan_buckets: list[int] | None = None,
) -> torch.Tensor:
    """:func:`bucketize_parts` on parts already flat, contiguous and of the boundaries' dtype
    (:func:`host_parts`), with Python int list sizes."""
    bounds = bounds if bounds.is_contiguous() else bounds.contiguous()
    out = torch.empty(sum(p.numel() for p in parts), dtype=torch.int64)
    _native.bucketize_parts(
        BUCKET_DTYPES[bounds.dtype],
        [(p.data_ptr(), p.numel()) for p in parts],
        bounds.data_ptr(),
        b_sizes,
        out.data_ptr(),
        torch.get_num_threads(),
        nan_buckets,
    )
    return out


def copy_rows(
    src: torch.Tensor, src_starts: torch.Tensor, dst_offsets: torch.Tensor, total: int
) -> torch.Tensor:
    """Rows of ``src`` (a CPU tensor whose rows along dim 0 are the items) gathered into a new
    tensor of ``total`` items: row ``i`` of the result, items ``dst_offsets[i]:dst_offsets[i +
    1]``, is a copy of the same number of items of ``src`` from item ``src_starts[i]`` on.
    ``src_starts`` and ``dst_offsets`` are contiguous int64 CPU tensors of ``rows`` and ``rows +
    1`` entries, ``dst_offsets[-1] == total``; every range is checked to lie in its tensor
    before anything is copied. Inside :func:`recis_kernels.overlap`, a large copy may still be
    running on a pool thread when this returns (see there)."""
    src = src if src.is_contiguous() else src.contiguous()
    out = torch.empty((total, *src.shape[1:]), dtype=src.dtype)
    item = src.element_size() * math.prod(src.shape[1:])
    background = _overlap.deferring(total * item)
    job = _native.copy_rows(
        src.data_ptr(),
        src.shape[0],
        out.data_ptr(),
        total,
        item,
        src_starts.data_ptr(),
        dst_offsets.data_ptr(),
        src_starts.shape[0],
        torch.get_num_threads(),
        background,
    )
    if job is not None:
        _overlap.defer(job, src, out)
    return out


def truncate_plan(
    offsets: torch.Tensor, parts: list[tuple[int, int, bool]]
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ranges a 2-level truncation keeps of the rows of ``offsets`` (a contiguous int64 CPU
    tensor), in consecutive parts ``(rows, max_len, tail)``: the kept items' count, the new
    offsets, each row's first kept item, and its dropped and padded counts (views of one
    buffer)."""
    rows = offsets.shape[0] - 1
    buf = torch.empty(4 * rows + 1, dtype=torch.int64)
    total = _native.truncate_plan(offsets.data_ptr(), rows, parts, buf.data_ptr())
    new_offsets, starts, dropped, padded = buf.split([rows + 1, rows, rows, rows])
    return total, new_offsets, starts, dropped, padded
