"""The fusion registry: one fused implementation per op kind.

A fused implementation receives every op of one kind found in one step of the engine (one per
feature, each with its own parameters) and their input values, and returns the outputs in the
same order, exactly equal to running each op's ``apply`` on its own value. The engine calls it
once per step and kind. Registering one for a new op kind is all it takes to fuse that kind::

    @register_fused("clip")
    def fused_clip(ops, values):
        ...
        return outputs
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar, overload

from ._op import SourceOp, check_kind_name, op_kinds
from ._values import Value
from .exceptions import RegistrationError

__all__ = ["FusedFn", "fused_implementation", "fused_kinds", "register_fused"]

FusedFn = Callable[[Sequence[Any], Sequence[Value]], list[Value]]
"""``fn(ops, values) -> outputs``: the ops of one kind in one step, their inputs, their outputs."""

_F = TypeVar("_F", bound=FusedFn)
_FUSED: dict[str, FusedFn] = {}


@overload
def register_fused(kind: str, fn: None = None, *, replace: bool = False) -> Callable[[_F], _F]: ...


@overload
def register_fused(kind: str, fn: _F, *, replace: bool = False) -> _F: ...


def register_fused(
    kind: str, fn: FusedFn | None = None, *, replace: bool = False
) -> Callable[[_F], _F] | FusedFn:
    """Register the fused implementation of op kind ``kind``; usable as a decorator.

    Args:
        kind: the op kind (``Op.kind``) the implementation fuses.
        fn: ``fn(ops, values) -> outputs``; omitted when used as ``@register_fused(kind)``.
        replace: allow replacing an existing registration (otherwise an error).

    Returns:
        ``fn`` (or a decorator returning it unchanged).

    Raises:
        RegistrationError: ``kind`` already has an implementation and ``replace`` is false,
            ``fn`` is not callable, ``kind`` is ``"lambda"`` or a source op's kind (those
            always run op by op), or ``kind`` holds ``"+"`` (the engine's names of the groups
            it merges, such as ``"cross+mod"``).
    """

    def register(f: _F) -> _F:
        if not callable(f):
            raise RegistrationError(f"fused implementation of {kind!r} must be callable")
        if kind in _FUSED and not replace:
            raise RegistrationError(
                f"op kind {kind!r} already has a fused implementation; pass replace=True"
            )
        _FUSED[kind] = f
        return f

    if not isinstance(kind, str) or not kind:
        raise RegistrationError(f"op kind must be a non-empty string, got {kind!r}")
    if kind == "lambda":
        raise RegistrationError("op kind 'lambda' runs op by op and cannot be fused")
    check_kind_name(kind)
    source = op_kinds().get(kind)
    if source is not None and issubclass(source, SourceOp):
        raise RegistrationError(
            f"op kind {kind!r} is a source op ({source.__qualname__}): sources read columns "
            "and are never fused"
        )
    return register if fn is None else register(fn)


def fused_implementation(kind: str) -> FusedFn | None:
    """The fused implementation registered for ``kind``, or ``None`` (ops then run one by one)."""
    return _FUSED.get(kind)


def fused_kinds() -> tuple[str, ...]:
    """The op kinds that have a fused implementation, sorted."""
    return tuple(sorted(_FUSED))
