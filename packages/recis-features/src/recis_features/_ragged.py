"""Ragged restructurings the built-in ops share with their fused implementations."""

from __future__ import annotations

import math

import torch

import recis_kernels as rk
from recis_kernels import RaggedTensor

from ._values import Value, as_int64

__all__ = [
    "as_rows",
    "cross_side",
    "fill_empty_rows",
    "gather_strings",
    "is_string_ragged",
    "string_positions",
]


def as_rows(value: torch.Tensor | RaggedTensor) -> RaggedTensor:
    """A dense ``(B,)`` or ``(B, k)`` value as a one-level ragged value (``k`` ids per row)."""
    if isinstance(value, RaggedTensor):
        return value
    rows = value.shape[0]
    per_row = math.prod(value.shape[1:])
    offsets = torch.arange(rows + 1, dtype=torch.int64, device=value.device) * per_row
    return RaggedTensor(value.reshape(-1), [offsets], validate=False)


def cross_side(part: torch.Tensor | RaggedTensor) -> torch.Tensor | RaggedTensor:
    if isinstance(part, torch.Tensor) and part.dim() == 1:
        return as_int64(part)
    r = as_rows(part)
    return r if r.values.dtype == torch.int64 else r.with_values(as_int64(r.values), r.weights)


def is_string_ragged(value: Value) -> bool:
    """Whether ``value`` is a ragged value of strings (``uint8`` bytes, the last offsets
    delimiting the strings)."""
    return isinstance(value, RaggedTensor) and value.values.dtype == torch.uint8


def string_positions(value: RaggedTensor) -> RaggedTensor:
    """The strings of a ragged string value as their positions ``0, 1, ...`` under the outer
    offsets: the structure a truncation acts on, without the bytes."""
    outer = list(value.offsets[:-1])
    count = value.offsets[-1].shape[0] - 1
    positions = torch.arange(count, dtype=torch.int64, device=value.values.device)
    return RaggedTensor(positions, outer, validate=False)


def gather_strings(value: RaggedTensor, kept: RaggedTensor) -> RaggedTensor:
    """The strings of ``value`` at the positions ``kept`` holds, whole, under ``kept``'s
    offsets (the inverse of :func:`string_positions` after a truncation).

    ``kept`` comes from a truncation, whose copy may still be running in the background
    inside an engine step's ``recis_kernels.overlap()`` block: it is waited for first."""
    rk.finish_overlapped()
    starts_all = value.offsets[-1]
    index = kept.values
    starts = starts_all[:-1].index_select(0, index)
    lengths = starts_all[1:].index_select(0, index) - starts
    byte_offsets = torch.zeros(index.shape[0] + 1, dtype=torch.int64, device=index.device)
    torch.cumsum(lengths, 0, out=byte_offsets[1:])
    total = int(byte_offsets[-1])
    owner = torch.repeat_interleave(
        torch.arange(index.shape[0], device=index.device), lengths, output_size=total
    )
    byte_index = (
        starts.index_select(0, owner)
        + torch.arange(total, device=index.device)
        - byte_offsets[:-1].index_select(0, owner)
    )
    weights = None if value.weights is None else value.weights.index_select(0, byte_index)
    return RaggedTensor(
        value.values.index_select(0, byte_index),
        [*kept.offsets, byte_offsets],
        weights,
        validate=False,
    )


def fill_empty_rows(r: RaggedTensor, fill: float) -> RaggedTensor:
    """Give every empty row of a one-level ragged value a single ``fill`` element."""
    values = r.values
    if values.dtype.is_floating_point:
        values = torch.where(values.isnan(), torch.full_like(values, fill), values)
    offsets = r.offsets[0]
    lengths = offsets[1:] - offsets[:-1]
    empty = lengths == 0
    new_lengths = lengths + empty.to(torch.int64)
    new_offsets = torch.zeros_like(offsets)
    torch.cumsum(new_lengths, 0, out=new_offsets[1:])
    # An old element moves right by the number of empty rows before its own row.
    shift = torch.repeat_interleave(new_offsets[:-1] - offsets[:-1], lengths)
    positions = torch.arange(values.shape[0], device=values.device) + shift
    out = torch.full((int(new_offsets[-1]),), fill, dtype=values.dtype, device=values.device)
    out[positions] = values
    weights = None
    if r.weights is not None:
        weights = torch.ones(out.shape[0], dtype=r.weights.dtype, device=out.device)
        weights[positions] = r.weights
    return RaggedTensor(out, [new_offsets], weights, validate=False)
