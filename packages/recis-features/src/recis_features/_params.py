"""Checks and normal forms of op parameters, shared by the built-in ops' constructors."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Set
from typing import Any

import torch

from ._op import require

__all__ = ["INT64_MAX", "is_finite", "is_int", "is_number", "number_list", "plain"]

INT64_MAX = 2**63 - 1


def is_int(x: Any) -> bool:
    # numbers.Integral: Python ints and NumPy integer scalars (``np.int64(5)``, what NumPy
    # reductions and array items give), never bools.
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    # numbers.Real: Python and NumPy scalars (``np.float32(0.5)``); bools are not numbers here
    # (NumPy's bool is not registered as a number at all).
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def is_finite(x: Any) -> bool:
    """Whether ``x`` is a number a float64 holds as a finite value (an int beyond float range,
    such as ``10**400``, is not: ``math.isfinite`` would raise ``OverflowError`` on it)."""
    if not is_number(x):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def plain(x: Any) -> Any:
    """A parameter as a plain Python ``int`` or ``float`` (NumPy scalars are stored as Python
    numbers, so ``Mod(np.int64(5))`` and ``Mod(5)`` are one op and serialize alike)."""
    return int(x) if is_int(x) else float(x)


def number_list(values: Any, kind: str, name: str) -> list[Any]:
    """A sequence parameter as a list; a 1-d torch tensor or NumPy array gives its items.

    Raises:
        FeatureDefinitionError: ``values`` is a single number or anything else that is not a
            sequence (``"<kind>: <name> must be a sequence of numbers, got ..."``), or a
            tensor or array of more than one dimension.
    """
    # A tensor's or array's ndim; 1 for anything else (a list of lists fails as numbers).
    ndim = getattr(values, "ndim", 1)
    require(
        isinstance(values, Iterable) and ndim != 0,
        kind,
        f"{name} must be a sequence of numbers, got {values!r}",
    )
    if ndim != 1:
        require(
            False,
            kind,
            f"{name} must be a 1-d sequence of numbers, got a {ndim}-d "
            f"{type(values).__name__} of shape {tuple(values.shape)}",
        )
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().tolist()
    require(
        not isinstance(values, (Set, Mapping, str, bytes)),
        kind,
        f"{name} must be an ordered sequence of numbers (a list, tuple, array or tensor), "
        f"got {type(values).__name__} {values!r}",
    )
    return list(values)
