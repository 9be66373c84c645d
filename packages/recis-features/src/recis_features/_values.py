"""The values that flow between ops, and conversions from batch columns.

A value is one of:

- a dense ``torch.Tensor``: ``(B,)`` or ``(B, k)``;
- a :class:`recis_kernels.RaggedTensor` (ids, floats, or ``uint8`` bytes of strings);
- a ``list`` of ``str``/``bytes`` (one string per row);
- a ``tuple`` of values (the output of :class:`SelectFields`, consumed by a cross).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, NoReturn, TypeAlias

import torch

from recis_kernels import RaggedTensor

from .exceptions import FeatureTypeError

# Values are told apart at runtime (``value_kind``), so the alias stays ``Any`` for the checker.
Value: TypeAlias = Any

_INT_DTYPES = frozenset({torch.int8, torch.int16, torch.int32, torch.int64})
_DTYPES = {
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype named ``name`` (one of :data:`_DTYPES`)."""
    return _DTYPES[name]


def dtype_names() -> tuple[str, ...]:
    """Names accepted wherever a dtype is given as a string."""
    return tuple(_DTYPES)


def dtype_kind(dtype: torch.dtype) -> str:
    """``"floats"``, ``"ids"``, ``"bytes"`` or ``"other"`` for a tensor dtype."""
    if dtype.is_floating_point:
        return "floats"
    if dtype in _INT_DTYPES:
        return "ids"
    if dtype == torch.uint8:
        return "bytes"
    return "other"


# Dense tensors' kinds by dtype, filled as dtypes are met (the engine asks per op per batch).
_TENSOR_KINDS: dict[torch.dtype, str] = {}


def value_kind(value: Any) -> str:
    """The kind of a value, as ops declare what they accept.

    Returns:
        ``"floats"``, ``"ids"``, ``"strings"``, ``"pair"`` or ``"other"``. A ragged ``uint8``
        value and a list of strings are both ``"strings"``.
    """
    if isinstance(value, torch.Tensor):
        kind = _TENSOR_KINDS.get(value.dtype)
        if kind is None:
            kind = dtype_kind(value.dtype)
            kind = _TENSOR_KINDS[value.dtype] = "ids" if kind == "bytes" else kind
        return kind
    if isinstance(value, RaggedTensor):
        kind = dtype_kind(value.values.dtype)
        return "strings" if kind == "bytes" else kind
    if isinstance(value, list):
        # A list of anything else (a Lambda's ints) is no string column.
        return "strings" if _is_string_list(value) else "other"
    if isinstance(value, tuple):
        return "pair"
    return "other"


def describe(value: Any) -> str:
    """A short human description of a value for error messages."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"dense {dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, RaggedTensor):
        dtype = str(value.values.dtype).removeprefix("torch.")
        strings = " (strings)" if dtype_kind(value.values.dtype) == "bytes" else ""
        return f"ragged {dtype} with {len(value.offsets)} offset level(s){strings}"
    if isinstance(value, list):
        if _is_string_list(value):
            return f"strings (list of {len(value)})"
        first = next(v for v in value if not isinstance(v, (str, bytes)))
        return f"a list of {len(value)} holding {type(first).__name__} (not only strings)"
    if isinstance(value, tuple):
        parts = ", ".join(describe(v) for v in value)
        return f"a pair ({parts})" if len(value) == 2 else f"a tuple of {len(value)} ({parts})"
    return f"object of type {type(value).__name__}"


def _is_string_list(column: Sequence[Any]) -> bool:
    return all(isinstance(s, (str, bytes)) for s in column)


def as_value(column: Any, column_name: str) -> Value:
    """Convert a batch column to a value without copying its data.

    Args:
        column: a ``torch.Tensor``, a ``RaggedTensor``, any object with ``.values`` and
            ``.offsets`` (a recis-io ragged column), a NumPy array, or a list of strings.
        column_name: the column's name, for the error message.

    Raises:
        FeatureTypeError: the column has none of the supported types, is a list (or NumPy
            object/string array) with an item that is not a string, or is a NumPy array torch
            cannot share without a copy (negative strides, foreign byte order, a dtype torch
            lacks, a 0-d array).
    """
    if isinstance(column, (torch.Tensor, RaggedTensor)):
        return column
    if hasattr(column, "values") and hasattr(column, "offsets"):
        # Its NumPy arrays are checked as a dense column's are (torch may not share them).
        offsets = column.offsets
        parts = [column.values, getattr(column, "weights", None)]
        parts += list(offsets) if isinstance(offsets, (list, tuple)) else [offsets]
        for part in parts:
            if hasattr(part, "__array_interface__") and hasattr(part, "ndim"):
                _from_numpy(part, column_name)
        return RaggedTensor.from_column(column)
    if isinstance(column, (list, tuple)):
        if _is_string_list(column):
            return list(column)
        _not_strings(column, column_name, type(column).__name__)
    kind = getattr(getattr(column, "dtype", None), "kind", None)
    if kind in ("O", "U", "S"):
        strings = column.tolist()
        if isinstance(strings, list) and _is_string_list(strings):
            return strings
        if isinstance(strings, list):
            _not_strings(strings, column_name, f"NumPy array of dtype {column.dtype}")
    elif kind is not None and hasattr(column, "__array_interface__"):
        return _from_numpy(column, column_name)
    raise FeatureTypeError(
        f"column {column_name!r} has unsupported type {type(column).__name__}, expected a "
        "tensor, a ragged column (.values/.offsets), a NumPy array or a list of strings"
    )


def _not_strings(items: Sequence[Any], column_name: str, what: str) -> NoReturn:
    """Raise for a sequence column that is not all strings, naming the first item that is not."""
    bad = next(i for i, s in enumerate(items) if not isinstance(s, (str, bytes)))
    raise FeatureTypeError(
        f"column {column_name!r} is a {what} whose item {bad} is {type(items[bad]).__name__}, "
        "expected strings (str or bytes) only; numbers go in a tensor or NumPy array"
    )


def _from_numpy(array: Any, column_name: str) -> torch.Tensor:
    """A NumPy array as a tensor sharing its memory, or a :class:`FeatureTypeError` naming
    the column when torch cannot share it (dtype, byte order, negative strides, 0-d)."""
    if array.ndim == 0:
        raise FeatureTypeError(
            f"column {column_name!r} is a single NumPy {type(array).__name__}, expected an "
            "array with one value per row"
        )
    try:
        with warnings.catch_warnings():
            # Read-only arrays (from Arrow, memory maps) are fine: no op writes to its input.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(array)
    except (TypeError, ValueError) as exc:
        raise FeatureTypeError(
            f"column {column_name!r} is a NumPy array torch cannot share (dtype {array.dtype}, "
            f"strides {array.strides}): it needs a numeric or bool dtype in native byte order "
            "and no negative strides; pass np.ascontiguousarray(column, dtype=...)"
        ) from exc


def flat(value: torch.Tensor | RaggedTensor) -> torch.Tensor:
    """The elements of a dense or ragged value as one 1-D tensor (a view, no copy)."""
    if isinstance(value, RaggedTensor):
        return value.values
    return value if value.dim() == 1 else value.reshape(-1)


def as_int64(t: torch.Tensor) -> torch.Tensor:
    """``t`` as int64, without a conversion call when it already is."""
    return t if t.dtype == torch.int64 else t.to(torch.int64)


def rebuild(value: torch.Tensor | RaggedTensor, elements: torch.Tensor) -> Value:
    """``value``'s structure (shape or offsets and weights) around new ``elements``."""
    if isinstance(value, RaggedTensor):
        return value.with_values(elements, value.weights)
    return elements if elements.shape == value.shape else elements.reshape(value.shape)
