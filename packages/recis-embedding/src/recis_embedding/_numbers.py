"""Parameters given as NumPy scalars are kept as Python numbers.

Vocabulary sizes, learning rates and seeds often come out of NumPy (``arr.max() + 1``, a
config parsed into arrays). Kept as NumPy scalars they would compute differently
(``np.float32`` arithmetic) and fail where a checkpoint's JSON manifest records them; converted
here once, they are the Python ``int``/``float``/``bool`` every check and serializer expects.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import numpy as np

__all__ = ["default_value_error", "plain", "plain_fields"]


def plain(value: Any) -> Any:
    """``value`` as a Python number when it is a NumPy bool, integer or real scalar (or a
    tuple of them); anything else unchanged, for the caller's checks to judge."""
    if isinstance(value, (bool, int, float)) and type(value) in (bool, int, float):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    return value


def plain_fields(obj: Any) -> None:
    """Replace every NumPy scalar field of the (possibly frozen) dataclass ``obj`` by its
    Python number."""
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        converted = plain(value)
        if converted is not value:
            object.__setattr__(obj, field.name, converted)


# What absent ids read is materialised as float32 (torch.full's default dtype).
_FLOAT32_MAX = 3.4028234663852886e38


def default_value_error(value: Any) -> str | None:
    """Why ``value`` cannot be a table's ``default_value`` (a finite real number within
    float32's range, which absent ids read), or ``None`` if it can."""
    import math

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"default_value must be a finite number, got {value!r}"
    if not math.isfinite(value):
        # NaN would also differ from itself wherever two options are compared.
        return f"default_value must be a finite number, got {value!r}"
    if abs(float(value)) > _FLOAT32_MAX:
        return (
            f"default_value {value!r} is beyond float32's range (absent ids read it as float32, "
            f"max {_FLOAT32_MAX:.6g})"
        )
    return None
