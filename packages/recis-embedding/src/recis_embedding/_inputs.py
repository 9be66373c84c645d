"""Normalizing lookup inputs (dense ids, RaggedTensor, recis-io columns) to one packed form."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from recis_embedding._host import repeat_values, true_positions
from recis_embedding.exceptions import InputError
from recis_kernels import RaggedTensor

__all__ = ["Ids", "as_ids", "head"]


@dataclass
class Ids:
    """One feature's ids in packed form.

    Attributes:
        values: ``(N,) int64`` ids.
        bags: ``(M+1,) int64`` offsets of the innermost rows (the bags that pooling reduces).
        outer: ``(B+1,) int64`` offsets of 3-level inputs over the bags, else ``None``.
        weights: ``(N,) float32`` per-id weights or ``None``.
        singles: every bag holds exactly one id (a dense ``[B]`` / ``[B, 1]`` input).
    """

    values: torch.Tensor
    bags: torch.Tensor
    outer: torch.Tensor | None
    weights: torch.Tensor | None
    singles: bool

    @property
    def num_rows(self) -> int:
        """Outer rows ``B``."""
        src = self.outer if self.outer is not None else self.bags
        return src.numel() - 1


def as_ids(name: str, value: Any) -> Ids:
    """Convert a dense tensor, RaggedTensor or ``(values, offsets)`` column to :class:`Ids`."""
    if isinstance(value, torch.Tensor):
        return _dense(name, value)
    if not isinstance(value, RaggedTensor):
        if hasattr(value, "values") and hasattr(value, "offsets"):
            value = RaggedTensor.from_column(value)
        else:
            raise InputError(
                f"feature {name!r}: ids must be a tensor, a RaggedTensor or a column with "
                f".values/.offsets, got {type(value).__name__}"
            )
    return _ragged(name, value)


# Integer ids narrower than int64 (recis-io's int32 columns, say) widen exactly.
_WIDENED = frozenset({torch.int32, torch.int16, torch.int8, torch.uint8})


def _int64_ids(name: str, values: torch.Tensor) -> torch.Tensor:
    """``values`` as int64 ids: int64 as it is, narrower integers widened (the same ids)."""
    if values.dtype == torch.int64:
        return values
    if values.dtype in _WIDENED:
        return values.to(torch.int64)
    raise InputError(
        f"feature {name!r}: ids must be integers (int64, or int32/int16/int8/uint8, widened "
        f"to int64), got {values.dtype}"
    )


def _dense(name: str, ids: torch.Tensor) -> Ids:
    ids = _int64_ids(name, ids)
    if ids.dim() == 1:
        ids = ids[:, None]
    if ids.dim() != 2:
        raise InputError(
            f"feature {name!r}: dense ids must be [B] or [B, k], got shape {tuple(ids.shape)}"
        )
    b, k = ids.shape
    if torch.compiler.is_compiling():
        bags = _make_even_offsets(b, k, ids.device)
    else:
        bags = _even_offsets(b, k, ids.device)
    return Ids(ids.reshape(-1), bags, None, None, singles=k == 1)


def _make_even_offsets(b: int, k: int, device: torch.device) -> torch.Tensor:
    """``(b + 1,) int64`` offsets of ``b`` bags of ``k`` ids."""
    if k == 0:
        return torch.zeros(b + 1, dtype=torch.int64, device=device)
    return torch.arange(0, b * k + 1, k, device=device)


@functools.lru_cache(maxsize=32)
def _even_offsets(b: int, k: int, device: torch.device) -> torch.Tensor:
    """:func:`_make_even_offsets`, kept per shape: every batch of a pipeline has the same
    shape, and offsets are only read, never written in place. Made outside inference mode,
    so offsets first made in an ``inference_mode`` evaluation can be saved for a training
    step's backward pass."""
    with torch.inference_mode(False):
        return _make_even_offsets(b, k, device)


def _ragged(name: str, r: RaggedTensor) -> Ids:
    if r.values.dtype == torch.uint8:
        # recis-io and recis-features lay strings out this way: a string column whose hash
        # step was forgotten would train one row per byte value, pooled over each string.
        raise InputError(
            f"feature {name!r}: ragged uint8 values are a column of strings (their UTF-8 bytes, "
            "as recis-io reads strings), not ids: hash them first (recis_io.Column(..., "
            "hash='farm') or a recis-features hash op); for uint8 ids, widen the values "
            "(r.with_values(r.values.long()))"
        )
    values = _int64_ids(name, r.values)
    if values.dim() != 1:
        raise InputError(f"feature {name!r}: ragged ids must have 1-d values")
    if r.num_levels == 1:
        outer, bags = None, r.offsets[0]
    elif r.num_levels == 2:
        outer, bags = r.offsets[0], r.offsets[1]
    else:
        raise InputError(
            f"feature {name!r}: ragged ids must have 2 or 3 levels, got {r.num_levels + 1}"
        )
    weights = None if r.weights is None else r.weights.to(torch.float32)
    return Ids(values, bags.to(torch.int64), outer, weights, singles=False)


def head(ids: Ids, length: int) -> Ids:
    """The first ``length`` ids of every bag of 2-level ``ids`` (all of ``ids`` when no bag is
    longer). Features that output only those (``tile``, or a sequence with ``max_len``) look up
    no others: the ids past them are never inserted, counted by admission or trained."""
    lengths = ids.bags[1:] - ids.bags[:-1]
    if lengths.numel() == 0 or int(lengths.max()) <= length:
        return ids
    n = ids.values.numel()
    col = torch.arange(n, device=ids.bags.device) - repeat_values(ids.bags[:-1], lengths, n)
    keep = true_positions(col < length)
    bags = torch.zeros_like(ids.bags)
    torch.cumsum(lengths.clamp(max=length), 0, out=bags[1:])
    weights = None if ids.weights is None else ids.weights[keep]
    return Ids(ids.values[keep], bags, ids.outer, weights, singles=False)
