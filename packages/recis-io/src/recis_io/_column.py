"""Per-column read options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .exceptions import InvalidArgumentError

_HASHES = ("farm", "murmur")
_DTYPES = {
    torch.bool: "bool",
    torch.int8: "int8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.uint8: "uint8",
    # torch has uint16/32/64 since 2.3, with few ops beyond copies and views.
    torch.uint16: "uint16",
    torch.uint32: "uint32",
    torch.uint64: "uint64",
    torch.float16: "float16",
    torch.float32: "float32",
    torch.float64: "float64",
}
# torch >= 2.3 has uint16/32/64 (with limited op support); the names work on any torch.
for _name in ("uint16", "uint32", "uint64"):
    if isinstance(getattr(torch, _name, None), torch.dtype):
        _DTYPES[getattr(torch, _name)] = _name
_DTYPE_NAMES = frozenset(_DTYPES.values()) | {"uint16", "uint32", "uint64"}


@dataclass(frozen=True)
class Column:
    """Options for one column, given in ``Dataset(columns=[...])``.

    Args:
        name: Column name in the files.
        fill: Value written in place of nulls. Integer, bool and string columns (hashed or
            not) with nulls and no ``fill`` raise :class:`~recis_io.exceptions.SchemaError`;
            float columns without ``fill`` read nulls as NaN; unhashed strings take a ``str``
            (written as UTF-8) or ``bytes`` fill (``""`` for an empty string). A number must fit the output dtype (no
            fraction for an integer dtype), or the dataset raises
            :class:`~recis_io.exceptions.InvalidArgumentError`.
        hash: ``"farm"`` (FarmHash Fingerprint64) or ``"murmur"`` (MurmurHash64A, seed 0)
            turns a string column, or a list of strings, into int64 ids while reading.
        buckets: With ``hash``, ids become the unsigned hash modulo ``buckets`` (0 keeps the
            full 64 bits, reinterpreted as int64). Ids are int64: with ``buckets`` above
            2**63, an id at or above 2**63 reads as its bits, ``id - 2**64``.
        dtype: Output element type (``torch.dtype`` or its name such as ``"float32"``,
            ``"uint16"``); numeric columns are cast while decoding, and a value the dtype
            cannot hold raises :class:`~recis_io.exceptions.SchemaError`. With a dtype,
            files may store the column as different numeric types (int32 in one file, int64
            in another); without one they must agree.

    Example:
        >>> Column("user_id", hash="farm", buckets=1_000_000, fill=0)
        Column(name='user_id', fill=0, hash='farm', buckets=1000000, dtype=None)
    """

    name: str
    fill: int | float | str | bytes | None = None
    hash: str | None = None
    buckets: int = 0
    dtype: torch.dtype | str | None = None

    def __post_init__(self) -> None:
        for field in ("fill", "buckets"):
            object.__setattr__(self, field, plain_number(getattr(self, field)))
        # Any string: Parquet and ORC allow an empty column name, and reading every column
        # gives it as "".
        if not isinstance(self.name, str):
            raise InvalidArgumentError(f"column name must be a string, got {self.name!r}")
        if self.hash is not None and self.hash not in _HASHES:
            raise InvalidArgumentError(
                f"column '{self.name}' has hash={self.hash!r}, expected 'farm' or 'murmur'"
            )
        if isinstance(self.buckets, bool) or not isinstance(self.buckets, int):
            raise InvalidArgumentError(f"column '{self.name}' has non-integer buckets")
        if self.buckets < 0 or self.buckets >= 2**64:
            raise InvalidArgumentError(
                f"column '{self.name}' has buckets={self.buckets}, expected 0 <= buckets < 2**64"
            )
        if self.fill is not None and not isinstance(self.fill, (int, float, str, bytes)):
            raise InvalidArgumentError(
                f"column '{self.name}' has fill of type {type(self.fill).__name__}, "
                "expected a number, a str or bytes"
            )
        _dtype_name(self)

    def _spec(self) -> tuple[str, int | float | str | bytes | None, str | None, int, str | None]:
        return (self.name, self.fill, self.hash, self.buckets, _dtype_name(self))


def plain_number(value: Any) -> Any:
    """A NumPy scalar (``np.int64(5)``, what NumPy reductions and array items give) as the
    Python bool, int or float it holds; anything else unchanged, for the checks to judge."""
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def _dtype_name(col: Column) -> str | None:
    if col.dtype is None:
        return None
    if isinstance(col.dtype, torch.dtype):
        if col.dtype not in _DTYPES:
            raise InvalidArgumentError(f"column '{col.name}' has unsupported dtype {col.dtype}")
        return _DTYPES[col.dtype]
    if isinstance(col.dtype, str) and col.dtype in _DTYPE_NAMES:
        return col.dtype
    raise InvalidArgumentError(f"column '{col.name}' has unknown dtype {col.dtype!r}")
