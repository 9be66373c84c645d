"""The built-in ops. Each ``apply`` is the per-feature path, the reference for fusion."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from typing import Any, ClassVar

import torch

import recis_kernels as rk
from recis_kernels import RaggedTensor

from ._op import SourceOp, Transform, require
from ._params import INT64_MAX, is_finite, is_int, number_list, plain
from ._ragged import cross_side, fill_empty_rows, gather_strings, is_string_ragged, string_positions
from ._values import (
    Value,
    as_int64,
    describe,
    dtype_from_name,
    dtype_kind,
    dtype_names,
    flat,
    rebuild,
    value_kind,
)
from .exceptions import FeatureInputError, FeatureTypeError, SerializationError

__all__ = [
    "Bucketize",
    "FeatureCross",
    "FillMissing",
    "Hash",
    "IDMultiHash",
    "Lambda",
    "Log1p",
    "Mod",
    "Normalize",
    "SelectField",
    "SelectFields",
    "SequenceTruncate",
]

HASH_ALGORITHMS = ("farm", "murmur")


class SelectField(SourceOp):
    """Read one column of the batch, optionally casting its (element) dtype.

    Args:
        column: the column name.
        dtype: ``None`` to keep the column's dtype, else one of ``"int32"``, ``"int64"``,
            ``"float16"``, ``"bfloat16"``, ``"float32"``, ``"float64"``. A cast to a float
            dtype rounds to the nearest value (a finite value beyond its range, such as 70000
            as ``float16``, raises :class:`~recis_features.FeatureInputError`); a cast to an
            integer dtype must give back every value exactly when cast back (``uint64`` ids
            keep their 64 bits as ``int64``, the way ``mod`` and ``hash`` read them), else a
            batch holding a fraction, a NaN or an out-of-range value raises
            :class:`~recis_features.FeatureInputError`. Complex values cast as their real
            part when it is all they have; one with an imaginary part raises.
    """

    kind = "select"

    def __init__(self, column: str, dtype: str | None = None) -> None:
        require(isinstance(column, str) and column != "", self.kind, f"bad column {column!r}")
        require(
            dtype is None or dtype in dtype_names(),
            self.kind,
            f"dtype must be one of {', '.join(dtype_names())}, got {dtype!r}",
        )
        # Plain strs (not NumPy's): the config is plain data for JSON and YAML.
        self.column = str(column)
        self.dtype = None if dtype is None else str(dtype)

    def params(self) -> dict[str, Any]:
        return {"column": self.column, "dtype": self.dtype}

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,)

    def output_kind(self, input_kind: str) -> str:
        return "any" if self.dtype is None else dtype_kind(dtype_from_name(self.dtype))

    def read(self, columns: Mapping[str, Value]) -> Value:
        value = columns[self.column]
        if self.dtype is None:
            return value
        dtype = dtype_from_name(self.dtype)
        if isinstance(value, torch.Tensor):
            return self._cast(value, dtype)
        if isinstance(value, RaggedTensor) and not is_string_ragged(value):
            return value.with_values(self._cast(value.values, dtype), value.weights)
        raise FeatureTypeError(
            f"column {self.column!r} holds {describe(value)}, which cannot be cast to {self.dtype}"
        )

    def _cast(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``t`` as ``dtype``; a cast to integers must keep every value exactly."""
        if t.dtype.is_complex and not dtype.is_complex:
            # torch's cast drops the imaginary part (with only a warning): a value lost.
            imaginary = t.imag != 0
            if bool(imaginary.any()):
                first = t.flatten()[int(imaginary.flatten().nonzero()[0])].item()
                raise FeatureInputError(
                    f"column {self.column!r} holds complex values with an imaginary part "
                    f"(such as {first!r}), which {self.dtype} cannot hold; a cast never drops it"
                )
            t = t.real
        out = t.to(dtype)
        if t.dtype == dtype or _widens(t.dtype, dtype):
            return out
        if dtype.is_floating_point:
            # Rounding is what a float cast does; turning a finite value into inf is not.
            lost = out.isinf()
            if t.dtype.is_floating_point:
                lost &= t.isfinite()
        else:
            lost = out.to(t.dtype) != t
            if (
                not t.dtype.is_signed
                and t.dtype != torch.bool
                and (t.dtype != torch.uint64 or dtype != torch.int64)
            ):
                # uint32 2**32 - 1 wraps to int32 -1 and back again: the sign tells. (uint64
                # ids are read as the int64 of their bits, as documented; as int32 they wrap.)
                lost |= out < 0
        if bool(lost.any()):
            # Found by position, not by t[lost]: torch 2.6 has no boolean-mask indexing of
            # uint32/uint64 tensors on CPU ("index_cpu" not implemented).
            first = t.flatten()[int(lost.flatten().nonzero()[0])].item()
            source = str(t.dtype).removeprefix("torch.")
            if dtype.is_floating_point:
                raise FeatureInputError(
                    f"column {self.column!r} holds {source} values beyond the range of "
                    f"{self.dtype} (such as {first!r}; it spans ±{torch.finfo(dtype).max}); a "
                    "cast to floats rounds but never overflows to inf"
                )
            raise FeatureInputError(
                f"column {self.column!r} holds {source} values that {self.dtype} cannot hold "
                f"exactly (such as {first!r}); a cast to integers never truncates, rounds or wraps"
            )
        return out


def _widens(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether every ``source`` value is a value of ``target`` (for a float ``target``: within
    its range, rounding aside)."""
    if source == torch.bool:
        return True
    if source.is_complex:
        return False
    if target.is_floating_point:
        src: torch.finfo | torch.iinfo = (
            torch.finfo(source) if source.is_floating_point else torch.iinfo(source)
        )
        return src.max <= torch.finfo(target).max
    if source.is_floating_point:
        return False
    src, dst = torch.iinfo(source), torch.iinfo(target)
    return src.min >= dst.min and src.max <= dst.max


class SelectFields(SourceOp):
    """Read two id columns as a pair, the input of :class:`FeatureCross`.

    Args:
        columns: the two column names, in cross order.
    """

    kind = "select_fields"

    def __init__(self, columns: Sequence[str]) -> None:
        # An unordered collection (a set) would cross in an order that changes with the
        # process's string hashing: the ids and the fingerprint with it.
        require(
            isinstance(columns, Iterable),
            self.kind,
            f"columns must be a list of 2 column names, got {columns!r}",
        )
        require(
            not isinstance(columns, (Set, Mapping)),
            self.kind,
            f"columns must be a list of 2 column names in cross order, got the unordered "
            f"{type(columns).__name__} {columns!r}",
        )
        columns = list(columns) if not isinstance(columns, str) else [columns]
        require(len(columns) == 2, self.kind, f"needs exactly 2 columns, got {len(columns)}")
        require(
            all(isinstance(c, str) and c for c in columns), self.kind, f"bad columns {columns!r}"
        )
        self._columns = tuple(str(c) for c in columns)

    def params(self) -> dict[str, Any]:
        return {"columns": list(self._columns)}

    @property
    def columns(self) -> tuple[str, ...]:
        return self._columns

    def output_kind(self, input_kind: str) -> str:
        return "pair"

    def read(self, columns: Mapping[str, Value]) -> Value:
        return tuple(columns[c] for c in self._columns)


class Hash(Transform):
    """Hash strings to int64 ids: FarmHash Fingerprint64 or MurmurHash64A (seed 0).

    The hash runs over each string's raw bytes (UTF-8 for ``str``) and its 64 bits are read as
    int64: the ids recis-io's hashed string columns hold. There is no seed parameter.

    Input: a list of strings (one per row, output ``(B,)``), or a ragged ``uint8`` value whose
    innermost rows are the strings' bytes (one level: output ``(B,)``; two levels: a ragged of
    ids with the outer offsets).

    Args:
        algorithm: ``"farm"`` or ``"murmur"``.
        buckets: ``0`` for the full 64-bit hash, else the unsigned remainder by ``buckets``.
    """

    kind = "hash"
    accepts: ClassVar[frozenset[str]] = frozenset({"strings"})

    def __init__(self, algorithm: str = "farm", buckets: int = 0) -> None:
        require(
            algorithm in HASH_ALGORITHMS,
            self.kind,
            f"algorithm must be 'farm' or 'murmur', got {algorithm!r}",
        )
        require(
            is_int(buckets) and 0 <= buckets <= INT64_MAX,
            self.kind,
            f"buckets must be an integer in [0, 2**63), got {buckets!r}",
        )
        self.algorithm = str(algorithm)
        self.buckets = int(buckets)

    def params(self) -> dict[str, Any]:
        return {"algorithm": self.algorithm, "buckets": self.buckets}

    def output_kind(self, input_kind: str) -> str:
        return "ids"

    def apply(self, value: Value) -> Value:
        if isinstance(value, list):
            return rk.hash_strings(value, self.algorithm, self.buckets)
        inner = value.offsets[-1]
        hashed = rk.hash_bytes(value.values, inner, self.algorithm, self.buckets)
        if len(value.offsets) == 1:
            return hashed
        return RaggedTensor(hashed, list(value.offsets[:-1]), validate=False)


class Mod(Transform):
    """Unsigned 64-bit remainder of ids by ``n``: ``-1`` is ``2**64 - 1``.

    Input: integer ids, dense ``(B,)`` / ``(B, k)`` or ragged (values ``(N,)``). Output: int64
    in ``[0, n)`` with the same shape, or the same offsets and weights.

    Args:
        n: the modulus, ``1 <= n < 2**63``.
    """

    kind = "mod"
    accepts: ClassVar[frozenset[str]] = frozenset({"ids"})

    def __init__(self, n: int) -> None:
        require(
            is_int(n) and 1 <= n <= INT64_MAX,
            self.kind,
            f"n must be an integer in [1, 2**63), got {n!r}",
        )
        self.n = int(n)

    def params(self) -> dict[str, Any]:
        return {"n": self.n}

    def output_kind(self, input_kind: str) -> str:
        return "ids"

    def apply(self, value: Value) -> Value:
        return rebuild(value, rk.mod(as_int64(flat(value)), self.n))


class Bucketize(Transform):
    """Bucket floats: bucket = number of boundaries ``<=`` x (a value on a boundary goes up).

    Input: floats, dense ``(B,)`` / ``(B, k)`` or ragged. Output: int64 bucket ids with the same
    shape, or the same offsets and weights. Comparisons run in float64, so a float32 value and a
    boundary compare exactly. Fill NaN first (:class:`FillMissing`) if it matters: NaN goes to
    bucket 0.

    Args:
        boundaries: strictly increasing finite numbers (at least one), still distinct as
            float64 (``2**53`` and ``2**53 + 1`` are not). Output ids are int64 in
            ``[0, len(boundaries)]``.
    """

    kind = "bucketize"
    accepts: ClassVar[frozenset[str]] = frozenset({"floats"})

    def __init__(self, boundaries: Sequence[float]) -> None:
        b = number_list(boundaries, self.kind, "boundaries")
        require(len(b) > 0, self.kind, "boundaries must not be empty")
        require(
            all(is_finite(x) for x in b),
            self.kind,
            "boundaries must be finite numbers",
        )
        require(
            all(x < y for x, y in itertools.pairwise(b)),
            self.kind,
            "boundaries must be strictly increasing",
        )
        # + 0.0 makes -0.0 the 0.0 it buckets as: one op, one fingerprint.
        self.boundaries = tuple(float(x) + 0.0 for x in b)
        # Comparisons run in float64: integers it cannot tell apart would be one boundary.
        pairs = zip(itertools.pairwise(b), itertools.pairwise(self.boundaries), strict=True)
        same = next(((x, y) for (x, y), (fx, fy) in pairs if fx >= fy), None)
        if same is not None:
            require(
                False,
                self.kind,
                f"boundaries must be strictly increasing as float64 values, the type they are "
                f"compared in; {same[0]!r} and {same[1]!r} are one float64",
            )
        self._tensors: dict[torch.device, torch.Tensor] = {}
        self._buckets: dict[tuple[float | int, torch.dtype], int] = {}

    def params(self) -> dict[str, Any]:
        return {"boundaries": list(self.boundaries)}

    def bucket_of(self, value: float | int, dtype: torch.dtype) -> int:
        """The bucket of one ``value`` held as an element of ``dtype`` (rounded as a tensor of
        that dtype rounds it), exactly as :meth:`apply` buckets it; cached."""
        key = (value, dtype)
        bucket = self._buckets.get(key)
        if bucket is None:
            x = torch.tensor([value], dtype=dtype)
            bucket = self._buckets[key] = int(rk.bucketize(x, self.boundary_tensor(x.device)))
        return bucket

    def output_kind(self, input_kind: str) -> str:
        return "ids"

    def boundary_tensor(self, device: torch.device) -> torch.Tensor:
        """The boundaries as a float64 tensor on ``device`` (built once per device)."""
        tensor = self._tensors.get(device)
        if tensor is None:
            tensor = torch.tensor(self.boundaries, dtype=torch.float64, device=device)
            self._tensors[device] = tensor
        return tensor

    def apply(self, value: Value) -> Value:
        x = flat(value)
        return rebuild(value, rk.bucketize(x, self.boundary_tensor(x.device)))


class FeatureCross(Transform):
    """Cross two id columns: per row, every pair of distinct ids, hashed to int64.

    Each pair ``(a, b)`` hashes with MurmurHash64A over the 16 little-endian bytes of ``a``
    then ``b``; weights multiply. Dense ``(B,)`` / ``(B, k)`` inputs are rows of 1 / k ids.
    Output: a one-level ragged of int64 ids. Follows :class:`SelectFields`.
    """

    kind = "cross"
    accepts: ClassVar[frozenset[str]] = frozenset({"pair"})

    def output_kind(self, input_kind: str) -> str:
        return "ids"

    def expectation(self) -> str:
        return "a pair of id columns"

    def mismatch(self, value: Value) -> str | None:
        expected = self.expectation()
        if not isinstance(value, tuple) or len(value) != 2:
            return expected
        for part in value:
            # Ids as every op takes them: a dense uint8 column too (a ragged one is strings).
            if not isinstance(part, (torch.Tensor, RaggedTensor)) or value_kind(part) != "ids":
                return expected
            if isinstance(part, torch.Tensor) and part.dim() == 0:
                return expected + " (one or more ids per row, not a single number)"
            if isinstance(part, RaggedTensor) and len(part.offsets) != 1:
                return expected + " (one ragged level each)"
            if isinstance(part, RaggedTensor) and part.values.dim() != 1:
                return expected + " (one id per ragged value, not vectors)"
        return None

    @staticmethod
    def rows(value: Value) -> tuple[torch.Tensor | RaggedTensor, torch.Tensor | RaggedTensor]:
        """The pair as the kernel's int64 id inputs: a ``(B,)`` column as it is (one id per
        row), anything else as one-level ragged rows."""
        return tuple(cross_side(part) for part in value)  # type: ignore[return-value]

    def apply(self, value: Value) -> Value:
        return rk.feature_cross(*self.rows(value))


class IDMultiHash(Transform):
    """Hash each id with several independent hash functions into given bucket counts.

    Hash ``k`` is MurmurHash3's ``fmix64(id + (k + 1) * 0x9e3779b97f4a7c15)`` (64-bit wrapping
    arithmetic), then the unsigned remainder by ``buckets[k]``, as int64.

    Output: the ids' structure with a trailing dimension of ``len(buckets)``: dense ``(B,)``
    becomes ``(B, H)``; a ragged value gets ``(N, H)`` values.

    Args:
        buckets: bucket counts, one per hash function; ``0`` keeps the full 64-bit hash.
    """

    kind = "multi_hash"
    accepts: ClassVar[frozenset[str]] = frozenset({"ids"})

    def __init__(self, buckets: Sequence[int]) -> None:
        b = number_list(buckets, self.kind, "buckets")
        require(len(b) > 0, self.kind, "buckets must not be empty")
        require(
            all(is_int(x) and 0 <= x <= INT64_MAX for x in b),
            self.kind,
            f"buckets must be integers in [0, 2**63), got {b!r}",
        )
        self.buckets = tuple(int(x) for x in b)

    def params(self) -> dict[str, Any]:
        return {"buckets": list(self.buckets)}

    def output_kind(self, input_kind: str) -> str:
        return "ids"

    def apply(self, value: Value) -> Value:
        hashed = rk.multi_hash(as_int64(flat(value)), list(self.buckets))
        if isinstance(value, RaggedTensor):
            return value.with_values(hashed, value.weights)
        return hashed.reshape(*value.shape, len(self.buckets))


class SequenceTruncate(Transform):
    """Truncate ragged sequences to at most ``length`` items, keeping the head or the tail.

    Two levels, ``length=2``, ``side="tail"``::

        rows    [[1, 2, 3], [], [4]]     values [1, 2, 3, 4]   offsets [0, 3, 3, 4]
        kept    [[2, 3], [], [4]]        values [2, 3, 4]      offsets [0, 2, 2, 3]

    With ``levels=3`` (rows of sequences of id lists) the sequence level is truncated and then
    padded with empty lists up to ``length``.

    Strings are items: a sequence of strings (a ``list<string>`` column, ragged ``uint8``
    bytes with two offsets arrays) has two levels, and truncation keeps each row's first or
    last ``length`` strings whole; it never cuts inside a string and never adds strings (with
    ``levels=3``, rows of lists of strings are padded with empty lists, which hash to no ids).
    A string column with one string per row is not a sequence: truncating it raises
    :class:`~recis_features.FeatureTypeError`.

    Args:
        length: the maximum sequence length, ``0 <= length < 2**63``.
        side: ``"head"`` keeps the first items, ``"tail"`` the last.
        levels: ``2`` for ``[B, L]`` ragged values (one offsets array, one more for strings),
            ``3`` for ``[B, L, K]``.
    """

    kind = "truncate"
    accepts: ClassVar[frozenset[str]] = frozenset({"ids", "floats", "strings"})

    def __init__(self, length: int, side: str = "head", levels: int = 2) -> None:
        require(
            is_int(length) and 0 <= length <= INT64_MAX,
            self.kind,
            f"length must be an integer in [0, 2**63), got {length!r}",
        )
        require(side in ("head", "tail"), self.kind, f"side must be 'head' or 'tail', got {side!r}")
        # An integer check first: 2.0 == 2 would pass ``in`` and be stored (and fingerprinted)
        # as a float, and a NumPy integer would break the op's JSON.
        require(
            is_int(levels) and levels in (2, 3),
            self.kind,
            f"levels must be 2 or 3, got {levels!r}",
        )
        self.length = int(length)
        self.side = str(side)
        self.levels = int(levels)

    def params(self) -> dict[str, Any]:
        return {"length": self.length, "side": self.side, "levels": self.levels}

    def expectation(self) -> str:
        return f"a ragged value with {self.levels - 1} offset level(s)"

    def _string_expectation(self, value: Value) -> str:
        levels = f"ragged bytes with {self.levels} offset levels"
        if isinstance(value, list) or len(value.offsets) == 1:
            return (
                f"a sequence of strings per row ({levels}), not one string per row: truncate "
                "keeps whole strings and never cuts one"
            )
        rows = "lists of strings" if self.levels == 2 else "lists of lists of strings"
        return f"rows of {rows} ({levels})"

    def mismatch(self, value: Value) -> str | None:
        if isinstance(value, list) or is_string_ragged(value):
            if is_string_ragged(value) and len(value.offsets) == self.levels:
                return None
            return self._string_expectation(value)
        if isinstance(value, RaggedTensor) and len(value.offsets) == self.levels - 1:
            return None
        return self.expectation()

    def apply(self, value: Value) -> Value:
        if is_string_ragged(value):
            kept = rk.truncate(string_positions(value), self.length, self.side).values
            return gather_strings(value, kept)
        return rk.truncate(value, self.length, self.side).values


class FillMissing(Transform):
    """Fill missing entries: NaN floats become ``value``; an empty ragged row gets one ``value``.

    Dense floats and one-level ragged values (ids or floats) are accepted; filled ragged
    entries get weight 1. With ``value=0``::

        rows    [[3, 4], [], [5]]        values [3, 4, 5]      offsets [0, 2, 2, 3]
        filled  [[3, 4], [0], [5]]       values [3, 4, 0, 5]   offsets [0, 2, 3, 4]

    Args:
        value: the fill value (an integer for id columns).
    """

    kind = "fill_missing"
    accepts: ClassVar[frozenset[str]] = frozenset({"ids", "floats"})

    def __init__(self, value: float) -> None:
        require(
            is_finite(value),
            self.kind,
            f"value must be a finite number, got {value!r}",
        )
        self.value = plain(value)

    def params(self) -> dict[str, Any]:
        return {"value": self.value}

    def expectation(self) -> str:
        return "dense floats or a one-level ragged value of ids or floats"

    def mismatch(self, value: Value) -> str | None:
        if isinstance(value, RaggedTensor):
            kind = dtype_kind(value.values.dtype)
            if len(value.offsets) != 1 or kind not in ("ids", "floats"):
                return self.expectation()
            if value.values.dim() != 1:
                return "a one-level ragged value with one number per element"
            if kind == "ids" and not is_int(self.value):
                return f"floats, since the fill value {self.value!r} is not an integer"
            return self._fits(value.values.dtype)
        if isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
            return self._fits(value.dtype)
        return self.expectation()

    def _fits(self, dtype: torch.dtype) -> str | None:
        info = torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)
        if info.min <= self.value <= info.max:
            return None
        return (
            f"values that can hold the fill value {self.value!r} ({dtype} spans {info.min} to "
            f"{info.max})"
        )

    def apply(self, value: Value) -> Value:
        if isinstance(value, torch.Tensor):
            return value.masked_fill(value.isnan(), self.fill_for(value.dtype))
        return fill_empty_rows(value, self.fill_for(value.values.dtype))

    def fill_for(self, dtype: torch.dtype) -> int | float:
        """The fill value as elements of ``dtype`` take it: a float for float elements (an
        integer beyond int64, such as ``10**30``, is a float fill that torch cannot take as
        an integer; the fused pass rounds it through a float the same way)."""
        return float(self.value) if dtype.is_floating_point else self.value


class Normalize(Transform):
    """Standardize floats: ``(x - mean) / std``, elementwise on dense or ragged values.

    Args:
        mean: subtracted first (kept as a float).
        std: then divided by; must be positive (kept as a float).
    """

    kind = "normalize"
    accepts: ClassVar[frozenset[str]] = frozenset({"floats"})

    def __init__(self, mean: float, std: float) -> None:
        require(is_finite(mean), self.kind, f"bad mean {mean!r}")
        require(
            is_finite(std) and std > 0,
            self.kind,
            f"std must be a positive finite number, got {std!r}",
        )
        # Stored as floats, like Bucketize's boundaries: Normalize(0, 1) and
        # Normalize(0.0, 1.0) compute the same values, so they are one op with one fingerprint.
        self.mean = float(mean)
        self.std = float(std)

    def params(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std}

    def output_kind(self, input_kind: str) -> str:
        return "floats"

    def apply(self, value: Value) -> Value:
        x = flat(value)
        if x.dtype in (torch.float16, torch.bfloat16):
            # x - mean can leave the half type's range where the result does not (30000 -
            # -40000 in float16): computed in float32 and rounded once.
            return rebuild(value, ((x.float() - self.mean) / self.std).to(x.dtype))
        return rebuild(value, (x - self.mean) / self.std)


class Log1p(Transform):
    """``log(1 + x)`` of floats (``x < -1`` gives NaN, as ``torch.log1p``)."""

    kind = "log1p"
    accepts: ClassVar[frozenset[str]] = frozenset({"floats"})

    def output_kind(self, input_kind: str) -> str:
        return "floats"

    def apply(self, value: Value) -> Value:
        return rebuild(value, torch.log1p(flat(value)))


class Lambda(Transform):
    """Run a Python function on the feature's value: the escape hatch, never fused.

    A feature holding a ``Lambda`` cannot be serialized: ``to_dict`` (and so an engine's
    ``to_dict`` and ``fingerprint``) raises :class:`~recis_features.SerializationError`, and
    ``from_dict`` refuses a config naming ``"lambda"``. Two ``Lambda`` ops are equal only when
    they hold the same function object. What the function returns is checked by the next op
    when the batch runs, so a function may, for example, build the column pair a ``cross``
    takes.

    Args:
        fn: called with the value, returns the new value.
    """

    kind = "lambda"
    serializable = False

    def __init__(self, fn: Callable[[Value], Value]) -> None:
        require(callable(fn), self.kind, f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn

    def params(self) -> dict[str, Any]:
        return {"fn": getattr(self.fn, "__qualname__", repr(self.fn))}

    def to_dict(self) -> dict[str, Any]:
        raise SerializationError(
            f"op lambda ({self.params()['fn']}) cannot be serialized; use a registered op"
        )

    def key(self) -> str:
        return f"lambda:{id(self.fn)}"

    def output_kind(self, input_kind: str) -> str:
        # Whatever the function returns: the next op checks it when the batch runs.
        return "unknown"

    def apply(self, value: Value) -> Value:
        return self.fn(value)
