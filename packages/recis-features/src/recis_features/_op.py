"""The op base class: parameters, serialization, identity and the registry of op kinds."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from ._values import Value, value_kind
from .exceptions import FeatureDefinitionError, RegistrationError, SerializationError

__all__ = ["Op", "SourceOp", "Transform", "op_kinds"]

_OP_KINDS: dict[str, type[Op]] = {}


def op_kinds() -> dict[str, type[Op]]:
    """Every registered op kind and its class (a copy)."""
    return dict(_OP_KINDS)


def check_kind_name(kind: object) -> None:
    """Refuse an op kind the engine could mistake for one of its own group names.

    Raises:
        RegistrationError: ``kind`` holds ``"+"``: the engine names the groups it merges so
            (``"cross+mod"``, ``"fill_missing+bucketize"``).
    """
    if isinstance(kind, str) and "+" in kind:
        raise RegistrationError(
            f"op kind {kind!r} may not contain '+': the engine names the groups it merges so "
            "('cross+mod', 'fill_missing+bucketize')"
        )


def _is_abstract(cls: type) -> bool:
    """Whether ``cls`` leaves an abstract method unimplemented (``ABCMeta`` records this only
    after ``__init_subclass__`` has run, so it is worked out here)."""
    names = {n for n, v in vars(cls).items() if getattr(v, "__isabstractmethod__", False)}
    for base in cls.__mro__[1:]:
        for name in getattr(base, "__abstractmethods__", ()):
            if getattr(getattr(cls, name, None), "__isabstractmethod__", False):
                names.add(name)
    return bool(names)


class Op:
    """One step of a feature: a :class:`SourceOp` first, then :class:`Transform` ops.

    A concrete subclass sets its own ``kind`` (a unique, stable name used in serialized configs
    and to group ops for fusion; a subclass that leaves it empty or inherits its parent's is
    refused when defined) and ``accepts`` (the value kinds it takes: ``"ids"``, ``"floats"``,
    ``"strings"``, ``"pair"``, or ``"any"``), and implements :meth:`params` and,
    when its output kind differs from its input's, :meth:`output_kind`. Defining the subclass
    registers its kind, so :meth:`Op.from_dict` can rebuild it.

    Ops are immutable and compare equal when their kind and parameters are equal.
    """

    kind: ClassVar[str] = ""
    accepts: ClassVar[frozenset[str]] = frozenset({"any"})
    serializable: ClassVar[bool] = True
    """Whether configs can hold the op (``False`` for :class:`Lambda`, which holds a function)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if not kind:
            if _is_abstract(cls):
                return
            # A concrete op without a kind of its own would share its result and its fused
            # implementation with other ops: the engine groups and merges ops by kind.
            inherited = f" and would run as {cls.kind!r}" if cls.kind else ""
            raise RegistrationError(
                f"op class {cls.__qualname__} must set its own kind (a unique, non-empty "
                f"name){inherited}"
            )
        check_kind_name(kind)
        if kind in _OP_KINDS:
            raise RegistrationError(
                f"op kind {kind!r} is already registered by {_OP_KINDS[kind].__qualname__}"
            )
        _OP_KINDS[kind] = cls

    def params(self) -> dict[str, Any]:
        """The op's parameters as JSON-able values, in the constructor's keyword names."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        """``{"op": kind, **params}``: a plain dict that :meth:`from_dict` turns back into an op."""
        return {"op": self.kind, **self.params()}

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Op:
        """Rebuild an op from :meth:`to_dict`'s output.

        Raises:
            SerializationError: the dict names no op, an unknown kind or ``"lambda"`` (never
                serializable), or has bad parameters.
        """
        if not isinstance(data, Mapping) or "op" not in data:
            raise SerializationError(f"op config must be a dict with an 'op' key, got {data!r}")
        params = dict(data)
        kind = params.pop("op")
        # An unhashable kind (a list from a hand-edited YAML) is an unknown kind, not a TypeError.
        cls = _OP_KINDS.get(kind) if isinstance(kind, str) else None
        if cls is None:
            known = ", ".join(sorted(k for k, c in _OP_KINDS.items() if c.serializable))
            raise SerializationError(f"unknown op kind {kind!r} (known: {known})")
        if not cls.serializable:
            raise SerializationError(
                f"op {kind!r} holds a Python function and cannot be built from a config; "
                "subclass Transform with a registered kind instead"
            )
        try:
            return cls(**params)
        except (TypeError, FeatureDefinitionError) as exc:
            raise SerializationError(f"op {kind!r} has bad parameters {params!r}: {exc}") from exc

    def key(self) -> str:
        """A canonical string of kind and parameters: equal ops have equal keys."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"

    def output_kind(self, input_kind: str) -> str:
        """The value kind this op produces from ``input_kind``: ``"ids"``, ``"floats"``,
        ``"strings"``, ``"pair"``, ``"any"`` (a column of a type not yet known) or
        ``"unknown"`` (whatever a Python function returned: checked only when the batch runs)."""
        return input_kind

    def expectation(self) -> str:
        """What the op accepts, in words, for error messages."""
        return " or ".join(sorted(self.accepts))

    def mismatch(self, value: Value) -> str | None:
        """``None`` when the op can run on ``value``, else what was expected instead."""
        if "any" in self.accepts or value_kind(value) in self.accepts:
            return None
        return self.expectation()


class Transform(Op, ABC):
    """An op that maps one feature's value to a new value; subclass it for a new op kind."""

    @abstractmethod
    def apply(self, value: Value) -> Value:
        """Run the op on one feature's value (the unfused path and the fusion reference)."""


class SourceOp(Op, ABC):
    """An op that starts a feature by reading columns of the batch."""

    accepts: ClassVar[frozenset[str]] = frozenset()

    @property
    @abstractmethod
    def columns(self) -> tuple[str, ...]:
        """The batch columns this op reads."""

    @abstractmethod
    def read(self, columns: Mapping[str, Value]) -> Value:
        """Build the feature's first value from the converted columns it names."""


def require(condition: bool, kind: str, message: str) -> None:
    """Raise a :class:`FeatureDefinitionError` ``"<kind>: <message>"`` unless ``condition``."""
    if not condition:
        raise FeatureDefinitionError(f"{kind}: {message}")
