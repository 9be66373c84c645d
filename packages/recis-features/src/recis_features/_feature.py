"""``Feature``: a named chain of ops, built by chaining and checked as it grows."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from recis_kernels import RecisKernelsError, overlap

from ._op import Op, SourceOp
from ._ops import (
    Bucketize,
    FeatureCross,
    FillMissing,
    Hash,
    IDMultiHash,
    Lambda,
    Log1p,
    Mod,
    Normalize,
    SelectField,
    SelectFields,
    SequenceTruncate,
)
from ._values import Value, as_value, describe, value_kind
from .exceptions import (
    FeatureDefinitionError,
    FeatureInputError,
    FeatureTypeError,
    MissingColumnError,
    SerializationError,
)

__all__ = ["Feature", "fingerprint_of"]

INPUT_ERRORS = (RecisKernelsError, UnicodeEncodeError)
"""What an op raises on data it cannot use: the kernels' refusals, and a ``str`` that is not
encodable as UTF-8 (a lone surrogate such as ``"\\ud800"``) reaching a hash."""

_KIND_WORDS = {"pair": "a column pair", "any": "an unknown column"}


def fingerprint_of(config: Any) -> str:
    """SHA-256 hex digest of a config's canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _accepts(op: Op, kind: str) -> bool:
    if "any" in op.accepts or kind == "unknown":
        return True
    if kind == "any":
        return op.accepts != frozenset({"pair"})
    return kind in op.accepts


def _check_chain(name: str, ops: Sequence[Op]) -> None:
    """Static checks: a source op first and only first, and value kinds that fit each op."""
    kind = "any"
    for step, op in enumerate(ops):
        if not isinstance(op, Op):
            raise FeatureDefinitionError(
                f"feature {name!r}: step {step} is {type(op).__name__}, expected an op"
            )
        if step == 0 and not isinstance(op, SourceOp):
            raise FeatureDefinitionError(
                f"feature {name!r}: must start with a select op, got op {op.kind}"
            )
        if step > 0 and isinstance(op, SourceOp):
            raise FeatureDefinitionError(
                f"feature {name!r}: op {op.kind} (step {step}) can only be the first op"
            )
        if step > 0 and not _accepts(op, kind):
            found = _KIND_WORDS.get(kind, kind)
            raise FeatureTypeError(
                f"feature {name!r}: op {op.kind} (step {step}) expects {op.expectation()}, "
                f"found {found} (output of op {ops[step - 1].kind})"
            )
        kind = op.output_kind(kind)


class Feature:
    """A named chain of ops: one source op (select) followed by transforms.

    Features are immutable: each chaining method returns a new feature, so a common prefix can
    be shared. The chain is checked as it grows (a select first, op parameters, value kinds
    where they are known); the rest is checked on the first batch.

    Args:
        name: the output name in the engine's result.
        ops: the ops, when building from a config rather than by chaining.

    Raises:
        FeatureDefinitionError: bad name, parameters or op order.
        FeatureTypeError: an op cannot take the previous op's output (e.g. bucketize on ids).

    Example:
        >>> uid = Feature("uid").select("user_id").mod(10_000_000)
        >>> price = Feature("price").select("price").bucketize([1.0, 10.0, 100.0])
    """

    __slots__ = ("_name", "_ops")

    def __init__(self, name: str, ops: Sequence[Op] = ()) -> None:
        if not isinstance(name, str) or not name:
            raise FeatureDefinitionError(f"feature name must be a non-empty string, got {name!r}")
        ops = tuple(ops)
        _check_chain(name, ops)
        self._name = str(name)  # a plain str (not NumPy's): configs are plain data
        self._ops = ops

    @property
    def name(self) -> str:
        """The output name."""
        return self._name

    @property
    def ops(self) -> tuple[Op, ...]:
        """The chain of ops, source first."""
        return self._ops

    @property
    def columns(self) -> tuple[str, ...]:
        """The batch columns this feature reads."""
        source = self._ops[0] if self._ops else None
        return source.columns if isinstance(source, SourceOp) else ()

    def rename(self, name: str) -> Feature:
        """The same chain under another output name."""
        return Feature(name, self._ops)

    def then(self, op: Op) -> Feature:
        """A new feature with ``op`` appended (the way to chain a custom op)."""
        return Feature(self._name, (*self._ops, op))

    def _chain(self, cls: type[Op], *args: Any) -> Feature:
        try:
            op = cls(*args)
        except FeatureDefinitionError as exc:
            raise FeatureDefinitionError(f"feature {self._name!r}: {exc}") from None
        return self.then(op)

    def select(self, column: str, dtype: str | None = None) -> Feature:
        """Start with one column (:class:`SelectField`)."""
        return self._chain(SelectField, column, dtype)

    def select_fields(self, columns: Sequence[str]) -> Feature:
        """Start with two id columns to cross (:class:`SelectFields`)."""
        return self._chain(SelectFields, columns)

    def hash(self, algorithm: str = "farm", buckets: int = 0) -> Feature:
        """Hash strings to int64 ids (:class:`Hash`)."""
        return self._chain(Hash, algorithm, buckets)

    def mod(self, n: int) -> Feature:
        """Unsigned remainder of ids by ``n`` (:class:`Mod`)."""
        return self._chain(Mod, n)

    def bucketize(self, boundaries: Sequence[float]) -> Feature:
        """Bucket floats by ``boundaries`` (:class:`Bucketize`)."""
        return self._chain(Bucketize, boundaries)

    def cross(self) -> Feature:
        """Cross the two selected id columns (:class:`FeatureCross`)."""
        return self._chain(FeatureCross)

    def multi_hash(self, buckets: Sequence[int]) -> Feature:
        """Hash ids into several bucket counts (:class:`IDMultiHash`)."""
        return self._chain(IDMultiHash, buckets)

    def truncate(self, length: int, side: str = "head", levels: int = 2) -> Feature:
        """Truncate ragged sequences (:class:`SequenceTruncate`)."""
        return self._chain(SequenceTruncate, length, side, levels)

    def fill_missing(self, value: float) -> Feature:
        """Fill NaN floats and empty ragged rows (:class:`FillMissing`)."""
        return self._chain(FillMissing, value)

    def normalize(self, mean: float, std: float) -> Feature:
        """Standardize floats (:class:`Normalize`)."""
        return self._chain(Normalize, mean, std)

    def log1p(self) -> Feature:
        """``log(1 + x)`` of floats (:class:`Log1p`)."""
        return self._chain(Log1p)

    def map(self, fn: Callable[[Value], Value]) -> Feature:
        """Run a Python function on the value (:class:`Lambda`, never fused)."""
        return self._chain(Lambda, fn)

    def check_complete(self) -> None:
        """Raise unless the feature can produce an output (a source, and not a bare pair).

        Raises:
            FeatureDefinitionError: no ops, or a column pair that is never crossed.
        """
        if not self._ops:
            raise FeatureDefinitionError(f"feature {self._name!r}: has no ops; start with select")
        kind = "any"
        for op in self._ops:
            kind = op.output_kind(kind)
        if kind == "pair":
            raise FeatureDefinitionError(
                f"feature {self._name!r}: ends with a column pair; add cross() after select_fields"
            )

    def __call__(self, batch: Mapping[str, Any]) -> Value:
        """Compute this feature alone, op by op (the unfused reference path)."""
        self.check_complete()
        check_batch(batch)
        source = self._ops[0]
        assert isinstance(source, SourceOp)
        missing = [c for c in source.columns if c not in batch]
        if missing:
            raise missing_column_error(self._name, missing[0], batch)
        # Each op reads the one before: inside a caller's overlap() block none may defer.
        with overlap(False):
            value = read_source(
                self._name,
                source,
                {c: column_value(self._name, c, batch[c]) for c in source.columns},
            )
            for step, op in enumerate(self._ops[1:], start=1):
                check_value(self._name, op, step, value)
                try:
                    value = op.apply(value)  # type: ignore[attr-defined]
                except INPUT_ERRORS as exc:
                    raise input_error([self._name], op, exc) from exc
        return value

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., "ops": [...]}``: plain data (JSON/YAML-able).

        Raises:
            SerializationError: the feature holds a :class:`Lambda`.
        """
        try:
            return {"name": self._name, "ops": [op.to_dict() for op in self._ops]}
        except SerializationError as exc:
            raise SerializationError(f"feature {self._name!r}: {exc}") from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Feature:
        """Rebuild a feature from :meth:`to_dict`'s output.

        Raises:
            SerializationError: the dict lacks ``name`` or ``ops``, an op is unknown or has
                bad parameters, or the ops do not make a feature (the message of the
                :class:`FeatureDefinitionError` or :class:`FeatureTypeError` building it
                raised).
        """
        if not isinstance(data, Mapping) or "name" not in data or "ops" not in data:
            raise SerializationError(f"feature config must have 'name' and 'ops', got {data!r}")
        extra = sorted(map(str, set(data) - {"name", "ops"}))
        if extra:
            raise SerializationError(
                f"feature {data['name']!r}: unknown key(s) {extra} (a feature config has 'name' "
                "and 'ops')"
            )
        if not isinstance(data["ops"], Sequence) or isinstance(data["ops"], (str, bytes)):
            raise SerializationError(
                f"feature {data['name']!r}: 'ops' must be a list of op configs, got {data['ops']!r}"
            )
        try:
            ops = [Op.from_dict(op) for op in data["ops"]]
        except SerializationError as exc:
            raise SerializationError(f"feature {data['name']!r}: {exc}") from None
        try:
            feature = cls(data["name"], ops)
            feature.check_complete()  # a config is a whole feature, not a start of one
        except (FeatureDefinitionError, FeatureTypeError) as exc:
            raise SerializationError(str(exc)) from exc
        return feature

    def fingerprint(self) -> str:
        """A stable SHA-256 hex digest of :meth:`to_dict` (same config, same fingerprint)."""
        return fingerprint_of(self.to_dict())

    def same_ops(self, other: Feature) -> bool:
        """Whether ``other`` computes exactly the same thing (names aside)."""
        return len(self._ops) == len(other._ops) and all(
            a == b for a, b in zip(self._ops, other._ops, strict=True)
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Feature) and self._name == other._name and self.same_ops(other)

    def __hash__(self) -> int:
        return hash((self._name, tuple(op.key() for op in self._ops)))

    def __repr__(self) -> str:
        chain = ".".join(repr(op) for op in self._ops)
        return f"Feature({self._name!r}){'.' if chain else ''}{chain}"


def column_value(feature: str, column: str, raw: Any) -> Value:
    """``as_value`` of a batch column, its errors naming the feature and column."""
    try:
        return as_value(raw, column)
    except RecisKernelsError as exc:
        raise FeatureInputError(f"feature {feature!r}: column {column!r}: {exc}") from exc
    except FeatureTypeError as exc:
        raise FeatureTypeError(f"feature {feature!r}: {exc}") from exc


def read_source(feature: str, op: SourceOp, columns: Mapping[str, Value]) -> Value:
    """``op.read(columns)``, its type and input errors naming the feature and the op."""
    try:
        return op.read(columns)
    except FeatureTypeError as exc:
        raise FeatureTypeError(f"feature {feature!r}: op {op.kind} (step 0): {exc}") from exc
    except FeatureInputError as exc:
        raise FeatureInputError(f"feature {feature!r}: op {op.kind} (step 0): {exc}") from exc


def input_error(features: Sequence[str], op: Op, exc: Exception) -> FeatureInputError:
    """The error for an op that the kernels refused on these features' data."""
    who = f"feature {features[0]!r}" if len(features) == 1 else f"features {list(features)}"
    if isinstance(exc, UnicodeEncodeError):
        text = repr(exc.object) if len(exc.object) <= 40 else repr(exc.object[:40]) + "..."
        detail = (
            f"the string {text} cannot be encoded as UTF-8 ({exc.reason} at position "
            f"{exc.start}); pass its bytes instead"
        )
        return FeatureInputError(f"{who}: op {op.kind}: {detail}")
    return FeatureInputError(f"{who}: op {op.kind}: {exc}")


def check_value(feature: str, op: Op, step: int, value: Value) -> None:
    """Raise :class:`FeatureTypeError` naming the feature and op when ``op`` cannot take ``value``."""
    expected = op.mismatch(value)
    if expected is not None:
        accepts: frozenset[str] = getattr(op, "accepts", frozenset())
        hint = (
            "; strings become ids with a hash op first (.hash('farm'))"
            if value_kind(value) == "strings" and "ids" in accepts and "strings" not in accepts
            else ""
        )
        raise FeatureTypeError(
            f"feature {feature!r}: op {op.kind} (step {step}) expects {expected}, "
            f"found {describe(value)}{hint}"
        )


def check_batch(batch: Any) -> None:
    """Refuses a batch that is not a mapping of column names to values."""
    if not isinstance(batch, Mapping):
        raise FeatureTypeError(
            f"a batch must be a mapping of column names to values (a dict), got "
            f"{type(batch).__name__}"
        )


def missing_column_error(feature: str, column: str, batch: Mapping[str, Any]) -> MissingColumnError:
    """The error for a feature reading a column the batch lacks (names the columns it has)."""
    names = sorted(k if isinstance(k, str) else repr(k) for k in batch)
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    return MissingColumnError(
        f"feature {feature!r}: column {column!r} is not in the batch (columns: {shown or 'none'})"
    )
