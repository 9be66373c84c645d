"""Bucket tables: CPU ``bucketize`` of float32 values by table lookup instead of a search.

The top 16 bits of a float32 (sign, exponent and 7 mantissa bits) split the floats into 65536
cells, each a contiguous interval of values (about 0.8% wide). For one boundary list, a cell's
``base`` is the number of boundaries ``<=`` its smallest value and its ``bound`` is the single
boundary inside the cell (NaN when there is none, which no comparison passes). The bucket of
``x`` is then ``base[cell] + (x >= bound[cell])``: two gathers and a comparison per element,
whatever the number of boundaries, with no branch on the data.

A cell holding several distinct boundaries, or both an infinity and NaNs, is marked ambiguous
(``base`` 255); values falling in one are bucketed by binary search. Tables are built once per
boundary set (about a millisecond per feature) and kept in a small cache bounded by memory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import NamedTuple

import numpy as np

__all__ = ["MAX_BOUNDARIES", "BucketTable", "lookup", "table_for"]

_CELLS = 1 << 16
_AMBIGUOUS = 255
MAX_BOUNDARIES = _AMBIGUOUS - 1
# Tables kept in the cache, in bytes (5 bytes per cell and feature: about 320 KiB a feature).
_CACHE_BYTES = 64 << 20


class BucketTable(NamedTuple):
    """Lookup tables of K boundary lists, feature ``k`` at cells ``[k * 65536, (k + 1) * 65536)``."""

    base: np.ndarray  # uint8, boundaries <= the cell's smallest value; 255: ambiguous cell
    bound: np.ndarray  # float32, the one boundary inside the cell, else NaN
    lists: tuple[np.ndarray, ...]  # the boundary lists, for values in ambiguous cells


_lock = threading.Lock()
_cache: OrderedDict[tuple[bytes, tuple[int, ...]], BucketTable] = OrderedDict()
_cell_range: tuple[np.ndarray, np.ndarray] | None = None


def _cell_limits() -> tuple[np.ndarray, np.ndarray]:
    """Smallest and largest float32 of every cell (NaN where the cell's end is a NaN)."""
    global _cell_range
    if _cell_range is None:
        cells = np.arange(_CELLS, dtype=np.uint32)
        first = (cells << 16).view(np.float32)
        last = ((cells << 16) | 0xFFFF).view(np.float32)
        positive = cells < 0x8000
        # Negative floats grow in magnitude with their bits: the cell's first pattern is its top.
        _cell_range = (np.where(positive, first, last), np.where(positive, last, first))
    return _cell_range


def _build(lists: tuple[np.ndarray, ...]) -> BucketTable:
    lo, hi = _cell_limits()
    nan_lo, nan_hi = np.isnan(lo), np.isnan(hi)
    all_nan, some_nan = nan_lo & nan_hi, nan_lo ^ nan_hi
    base = np.empty((len(lists), _CELLS), dtype=np.uint8)
    bound = np.empty((len(lists), _CELLS), dtype=np.float32)
    for k, b in enumerate(lists):
        at_lo = np.searchsorted(b, lo, side="right")
        inside = np.searchsorted(b, hi, side="right") - at_lo
        first_inside = b[np.minimum(at_lo, b.size - 1)] if b.size else np.zeros_like(lo)
        bound[k] = np.where(inside > 0, first_inside, np.float32(np.nan))
        # NaN lands in bucket 0: cells of NaNs only have base 0 and no boundary.
        base[k] = np.where(all_nan, 0, at_lo)
        # Several distinct boundaries inside, or an infinity sharing its cell with NaNs.
        ambiguous = some_nan | (inside > 1)
        base[k][ambiguous] = _AMBIGUOUS
    return BucketTable(base.reshape(-1), bound.reshape(-1), lists)


def table_for(bounds: np.ndarray, sizes: list[int]) -> BucketTable:
    """The table of the packed float32 boundary lists ``bounds`` (``sizes[k]`` each, every one
    sorted, NaN-free and at most :data:`MAX_BOUNDARIES` long), from the cache when built before."""
    key = (bounds.tobytes(), tuple(sizes))
    with _lock:
        table = _cache.get(key)
        if table is not None:
            _cache.move_to_end(key)
            return table
    lists = tuple(np.split(bounds.copy(), np.cumsum(sizes[:-1], dtype=np.int64)))
    table = _build(lists)
    with _lock:
        _cache[key] = table
        total = sum(t.base.nbytes + t.bound.nbytes for t in _cache.values())
        while len(_cache) > 1 and total > _CACHE_BYTES:
            _, old = _cache.popitem(last=False)
            total -= old.base.nbytes + old.bound.nbytes
    return table


def lookup(x: np.ndarray, sizes: list[int], table: BucketTable) -> np.ndarray:
    """int64 bucket of every element of the flat float32 ``x``, whose consecutive segments of
    ``sizes[k]`` elements use boundary list ``k`` of ``table``."""
    k = len(sizes)
    cell = np.empty(x.shape[0], dtype=np.int64)
    np.right_shift(x.view(np.uint32), np.uint32(16), out=cell, dtype=np.int64)
    if k > 1:
        if len(set(sizes)) == 1:
            square = cell.reshape(k, -1)
            np.add(square, (np.arange(k, dtype=np.int64) * _CELLS)[:, None], out=square)
        else:
            start = 0
            for j, size in enumerate(sizes):
                part = cell[start : start + size]
                np.add(part, j * _CELLS, out=part)
                start += size
    base = table.base.take(cell)
    bound = table.bound.take(cell)
    # The cell indices are spent: the buckets go into their buffer.
    out = cell
    np.add(base, np.greater_equal(x, bound), out=out, dtype=np.int64)
    if base.size and base.max() == _AMBIGUOUS:
        _settle_ambiguous(x, sizes, table, base, out)
    return out


def _settle_ambiguous(
    x: np.ndarray, sizes: list[int], table: BucketTable, base: np.ndarray, out: np.ndarray
) -> None:
    """Buckets of the values in ambiguous cells, by binary search (NaN to bucket 0)."""
    where = np.flatnonzero(base == _AMBIGUOUS)
    owner = np.searchsorted(np.cumsum(sizes, dtype=np.int64), where, side="right")
    for j in np.unique(owner):
        at = where[owner == j]
        values = x[at]
        found = np.searchsorted(table.lists[j], values, side="right")
        out[at] = np.where(np.isnan(values), 0, found)
