"""``FeatureEngine``: compiles features into steps and runs each step's ops fused by kind."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

import recis_kernels as rk
from recis_kernels import RaggedTensor

from ._feature import (
    INPUT_ERRORS,
    Feature,
    check_batch,
    check_value,
    column_value,
    fingerprint_of,
    input_error,
    missing_column_error,
    read_source,
)
from ._fused import (
    cross_then_mod,
    fill_bucketize_args,
    fill_then_bucketize,
)
from ._fusion import fused_implementation, fused_kinds
from ._op import Op, SourceOp
from ._ops import Bucketize, FeatureCross, FillMissing, Mod, SelectField
from ._values import Value
from .exceptions import (
    FeatureConflictError,
    FeatureDefinitionError,
    FeatureInputError,
    RecisFeaturesError,
    RegistrationError,
    SerializationError,
)

__all__ = ["FeatureEngine"]

_FORMAT_VERSION = 1
# The kind of a group of bucketize ops run with the fill_missing each reads.
_FILL_BUCKETIZE = "fill_missing+bucketize"
# The kind of a group of mod ops run with the cross each reads.
_CROSS_MOD = "cross+mod"
# The built-in fused implementations whose large host work (a truncation's row copy, the
# remainders of a mod) may go on in the background while the step's later groups run
# (recis_kernels.overlap); they read nothing of what they return. Their groups go first in a
# step, in this order (the longest work first).
_DEFER_ORDER = {"truncate": 0, "mod": 1}
# The fused implementations recis-features registers itself, by kind (a registration replacing
# one is the user's code).
_BUILTIN: dict[str, Callable[..., Any]] = {
    kind: fn for kind in fused_kinds() if (fn := fused_implementation(kind)) is not None
}


@dataclasses.dataclass
class _Node:
    """One op applied to one input: shared by every feature whose chain starts the same way."""

    op: Op
    parent: int  # index of the input node; -1 for a source op
    step: int
    features: list[str]
    # A bucketize whose input comes from a fill_missing that nothing else reads runs with it,
    # in the fill's step: ``fill`` is that op (at step ``step - 1``), ``parent`` the fill's input.
    fill: FillMissing | None = None
    # Likewise a mod whose input is a cross that nothing else reads: ``cross`` is that op.
    cross: FeatureCross | None = None

    @property
    def run_step(self) -> int:
        """The step the node runs in."""
        return self.step - 1 if self.fill is not None or self.cross is not None else self.step


@dataclasses.dataclass
class _Group:
    """All nodes of one op kind in one step: run as one fused call when the kind has one."""

    kind: str
    nodes: list[int]
    # Filled once compiled (the engine runs groups per batch: no lookups on that path).
    members: list[_Node] = dataclasses.field(default_factory=list)
    ops: list[Op] = dataclasses.field(default_factory=list)
    # Source groups: (node, column) of every select that passes its column through unchanged.
    plain_reads: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    # What every op of the group was seen to accept: dense tensors by dtype, ragged values by
    # ``(RaggedTensor, values dtype)``; such an input needs no further check. Kept only where
    # an op judges those by dtype alone (ops of one class with the base ``Op.mismatch``; the
    # fills of a fill_missing+bucketize group, which record dense dtypes once every fill
    # accepted one).
    tensor_dtypes: set[object] | None = None
    # fill_missing+bucketize groups: per input dtype, the boundaries and NaN buckets of the
    # fused bucketize call (see ``fill_bucketize_args``).
    fill_args: dict[torch.dtype, tuple[list, list[int]]] = dataclasses.field(default_factory=dict)


@functools.cache
def _threads_per_caller() -> bool:
    """Whether ``torch.set_num_threads`` sets the count of the calling thread alone.

    So it does with torch's OpenMP backend (``torch.__config__.parallel_info()`` names a
    build's backend): the count is the calling thread's OpenMP setting, so another thread's
    torch ops keep theirs; only a thread whose first op that torch splits (or first
    ``torch.get_num_threads()``) falls inside the block takes the block's count, and keeps it.
    torch's native backend sizes one pool for the process once and warns at later changes;
    there the engine leaves the count alone.
    """
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """The calling thread's torch intra-op threads set to ``n`` in the block (nothing done when
    already ``n``); see ``_threads_per_caller``."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _dedup(features: Iterable[Feature]) -> list[Feature]:
    """Drop identical repeats; raise when one name has two different definitions."""
    by_name: dict[str, Feature] = {}
    for f in features:
        if not isinstance(f, Feature):
            raise FeatureDefinitionError(f"engine features must be Feature objects, got {f!r}")
        f.check_complete()
        seen = by_name.get(f.name)
        if seen is None:
            by_name[f.name] = f
        elif seen != f:
            raise FeatureConflictError(
                f"feature {f.name!r} is defined twice differently: {seen!r} and {f!r}"
            )
    return list(by_name.values())


def _apply(node: _Node, value: Value) -> Value:
    """``node.op.apply(value)``, data it refuses reported with the features sharing the node."""
    return _apply_op(node.features, node.op, value)


def _apply_op(features: list[str], op: Op, value: Value) -> Value:
    try:
        return op.apply(value)  # type: ignore[attr-defined]
    except INPUT_ERRORS as exc:
        raise input_error(features, op, exc) from exc


def _fill_then_apply(node: _Node, value: Value) -> Value:
    """A merged node's fill, then its own op, each on its own (checked as in their steps)."""
    assert node.fill is not None
    filled = _apply_op(node.features, node.fill, value)
    check_value(node.features[0], node.op, node.step, filled)
    return _apply(node, filled)


def _cross_then_apply(node: _Node, value: Value) -> Value:
    """A merged node's cross, then its own op (a mod), each on its own."""
    assert node.cross is not None
    crossed = _apply_op(node.features, node.cross, value)
    check_value(node.features[0], node.op, node.step, crossed)
    return _apply(node, crossed)


def _check_inputs(group: _Group, inputs: list[Value]) -> None:
    """``check_value`` of each input of the group; dense tensors and ragged values of a dtype
    the group's ops were already seen to accept skip it."""
    seen = group.tensor_dtypes
    for node, value in zip(group.members, inputs, strict=True):
        key: object = None
        if seen is not None:
            # A value's kind (what the base mismatch judges) follows from its dtype alone.
            if type(value) is torch.Tensor:
                key = value.dtype
            elif type(value) is RaggedTensor:
                key = (RaggedTensor, value.values.dtype)
            if key in seen:
                continue
        check_value(node.features[0], node.op, node.step, value)
        if key is not None:
            seen.add(key)  # type: ignore[union-attr]


def _refused(
    nodes: list[_Node],
    inputs: list[Value],
    exc: Exception,
    run: Callable[[_Node, Value], Value],
) -> FeatureInputError:
    """The error for a fused call that refused its data. It names the feature whose data was
    refused, not every feature of the call (nor the kernel's index into it): each node runs
    alone (``run``) until one raises; if none does, every feature of the call is named."""
    for n, v in zip(nodes, inputs, strict=True):
        run(n, v)
    return input_error(sorted({f for n in nodes for f in n.features}), nodes[0].op, exc)


class FeatureEngine(nn.Module):
    """Run many features on a batch, each op kind of each step as one fused call.

    The features are compiled into steps (step k holds the k-th op of every feature); features
    whose chains start alike share those ops, so an identical op on the same input runs once.
    Within a step, the ops of one kind (with per-feature parameters) go to the kind's fused
    implementation (see :func:`register_fused`) in one call; kinds without one run op by op.
    A ``bucketize`` whose input is a ``fill_missing`` that nothing else reads runs in the fill's
    step, with it: dense floats are bucketed with NaN sent straight to the fill value's bucket
    (no filled copy). Likewise a ``mod`` of a ``cross`` that nothing else reads: the crossed
    ids are hashed and reduced in one pass (one call for every such feature). Results are
    exactly those of each :class:`Feature` computed alone.

    Args:
        features: the features; an identical feature listed twice is kept once.
        passthrough: copy columns that no feature reads into the output, unchanged.
        fused: run fused implementations (``False`` runs every op on its own, for comparison).

    Raises:
        FeatureConflictError: one name with two different definitions.
        FeatureDefinitionError: an incomplete feature (no ops, or a pair never crossed), or
            ``passthrough``/``fused`` not a bool.

    Example:
        >>> engine = FeatureEngine([
        ...     Feature("uid").select("user_id").mod(1_000_003),
        ...     Feature("age").select("age").bucketize([18.0, 30.0, 50.0]),
        ... ])
        >>> out = engine({"user_id": torch.tensor([5, -1]), "age": torch.tensor([20.0, 70.0])})
        >>> out["age"]
        tensor([1, 3])
    """

    def __init__(
        self, features: Iterable[Feature], *, passthrough: bool = True, fused: bool = True
    ) -> None:
        super().__init__()
        for name, flag in (("passthrough", passthrough), ("fused", fused)):
            # A string such as "false" from a config is truthy: refuse it rather than guess.
            if not isinstance(flag, bool):
                raise FeatureDefinitionError(
                    f"FeatureEngine: {name} must be True or False, got {flag!r} "
                    f"({type(flag).__name__})"
                )
        self._features = tuple(_dedup(features))
        self.passthrough = passthrough
        self.fused = fused
        self._nodes: list[_Node] = []
        self._outputs: list[tuple[str, int]] = []
        self._compile()
        self._columns = frozenset(c for f in self._features for c in f.columns)

    def _compile(self) -> None:
        index: dict[tuple[int, type, str], int] = {}
        for f in self._features:
            parent = -1
            for step, op in enumerate(f.ops):
                key = (parent, type(op), op.key())
                node = index.get(key)
                if node is None:
                    node = index[key] = len(self._nodes)
                    self._nodes.append(_Node(op, parent, step, []))
                self._nodes[node].features.append(f.name)
                parent = node
            self._outputs.append((f.name, parent))
        merged = self._merge_chains()
        depth = max((n.step for n in self._nodes), default=-1) + 1
        steps: list[list[_Group]] = [[] for _ in range(depth)]
        for i, n in enumerate(self._nodes):
            if i in merged:
                continue
            kind = (
                _FILL_BUCKETIZE
                if n.fill is not None
                else _CROSS_MOD
                if n.cross is not None
                else n.op.kind
            )
            groups = steps[n.run_step]
            group = next((g for g in groups if g.kind == kind), None)
            if group is None:
                groups.append(group := _Group(kind, []))
            group.nodes.append(i)
        # Kinds whose fused call may leave host work running (see recis_kernels.overlap) go
        # first in their step, so the step's other groups overlap it.
        self._steps = [
            sorted(groups, key=lambda g: _DEFER_ORDER.get(g.kind, len(_DEFER_ORDER)))
            for groups in steps
            if groups
        ]
        for groups in self._steps:
            for group in groups:
                group.members = [self._nodes[i] for i in group.nodes]
                group.ops = [n.op for n in group.members]
                group.plain_reads = [
                    (i, n.op.column)
                    for i, n in zip(group.nodes, group.members, strict=True)
                    if type(n.op) is SelectField and n.op.dtype is None
                ]
                kinds = {type(op) for op in group.ops}
                if group.kind == _FILL_BUCKETIZE or (
                    len(kinds) == 1 and kinds.pop().mismatch is Op.mismatch
                ):
                    # (A fill_missing judges a dense tensor by its dtype and its fill value.)
                    group.tensor_dtypes = set()
        # Each column converted once, errors naming the first feature that reads it.
        reads: dict[str, str] = {}
        for f in self._features:
            for c in f.columns:
                reads.setdefault(c, f.name)
        self._reads = [(c, name) for c, name in reads.items()]

    def _merge_chains(self) -> set[int]:
        """Run an op with the ops reading its result, when nothing else reads that result (no
        feature ends there): a ``fill_missing`` read only by ``bucketize`` ops runs with them
        (NaN goes straight to the fill value's bucket, with no filled copy), and a ``cross``
        read by a single ``mod`` runs with it (the crossed ids reduced in the pass that hashes
        them). Returns the nodes no longer run on their own."""
        readers: dict[int, list[int]] = {}
        for i, n in enumerate(self._nodes):
            readers.setdefault(n.parent, []).append(i)
        ends = {node for _, node in self._outputs}
        merged = set()
        for i, n in enumerate(self._nodes):
            children = [self._nodes[c] for c in readers.get(i, [])]
            if i in ends or not children:
                continue
            if type(n.op) is FillMissing and all(type(c.op) is Bucketize for c in children):
                for c in children:
                    c.fill = n.op
            elif type(n.op) is FeatureCross and len(children) == 1 and type(children[0].op) is Mod:
                children[0].cross = n.op
            else:
                continue
            for c in children:
                c.parent = n.parent
            merged.add(i)
        return merged

    @property
    def features(self) -> tuple[Feature, ...]:
        """The engine's features (duplicates removed), in the order given."""
        return self._features

    @property
    def columns(self) -> frozenset[str]:
        """The batch columns the features read."""
        return self._columns

    def plan(self) -> list[list[dict[str, Any]]]:
        """The compiled steps: per step, one entry per op kind with its features and whether
        it runs as one fused call. A ``bucketize`` reading a ``fill_missing`` result that
        nothing else reads runs with the fill, in its step, as kind
        ``"fill_missing+bucketize"`` (``ops`` counts the bucketize ops); a ``mod`` reading a
        ``cross`` result that nothing else reads runs with the cross as kind ``"cross+mod"``
        (``ops`` counts the mods).

        Returns:
            ``plan[k]`` lists ``{"kind", "ops", "features", "fused"}`` for step ``k``.
        """
        return [
            [
                {
                    "kind": g.kind,
                    "ops": len(g.nodes),
                    "features": [name for i in g.nodes for name in self._nodes[i].features],
                    # Sources always read op by op, whatever is registered under their kind.
                    "fused": self.fused
                    and not isinstance(g.ops[0], SourceOp)
                    and (
                        g.kind in (_FILL_BUCKETIZE, _CROSS_MOD)
                        or fused_implementation(g.kind) is not None
                    ),
                }
                for g in groups
            ]
            for groups in self._steps
        ]

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Compute every feature.

        Args:
            batch: column name to a tensor (``(B,)``/``(B, k)``), a ``RaggedTensor``, a ragged
                column with ``.values``/``.offsets`` (wrapped without copying), or strings.

        Returns:
            Feature name to its value (dense tensor or ``RaggedTensor``), then, when
            ``passthrough`` is on, every column no feature reads, unchanged.

        Raises:
            MissingColumnError: a feature reads a column the batch lacks.
            FeatureTypeError: an op got a value of the wrong kind, or the batch is not a
                mapping of columns.
            FeatureConflictError: a pass-through column has a feature's name.
        """
        check_batch(batch)
        values: list[Value] = [None] * len(self._nodes)
        # Called inside a caller's overlap() block, the ops of a step would defer their work
        # into that block and the next step read unfinished results: the steps run in place
        # but for the engine's own blocks, each of which waits before the next step.
        with rk.overlap(False):
            self._run_steps(values, self._read_columns(batch))
        out: dict[str, Any] = {name: values[node] for name, node in self._outputs}
        if self.passthrough:
            for name, column in batch.items():
                if name in self._columns:
                    continue
                if name in out:
                    raise FeatureConflictError(
                        f"feature {name!r} has the name of a pass-through column; rename the "
                        "feature or build the engine with passthrough=False"
                    )
                out[name] = column
        return out

    def _run_steps(self, values: list[Value], columns: dict[str, Value]) -> None:
        """Every step's groups in turn, each node's value written into ``values``."""
        threads = torch.get_num_threads()
        for groups in self._steps:
            if len(groups) == 1 or threads == 1:
                for group in groups:
                    self._run_group(group, values, columns)
                continue
            # Large host work of the built-in fused truncate and mod may run on another core
            # while the step's other groups run; the block's end waits for it, before the next
            # step reads it. Every other group (a map's function, say, or a registered
            # implementation) may read what it computes: its ops run in place. The groups of
            # one step read only earlier steps' values, so their order within it is free.
            with rk.overlap():
                own: list[_Group] = []  # run by the engine's own fused implementations
                other: list[_Group] = []
                for group in groups:
                    if self._defers(group):
                        self._run_group(group, values, columns)
                    else:
                        (own if self._builtin(group) else other).append(group)
                if own or other:
                    with rk.overlap(False):
                        for group in own:
                            self._run_group(group, values, columns)
                        if other:
                            # Deferred work occupies a core until the block ends. torch splits
                            # an op in fixed parts, so an op split over a thread that shares
                            # that core waits for it (milliseconds for a 4096-float log1p on
                            # two cores): these groups leave the core to the work. recis-kernels'
                            # passes of the engine's own groups hand out parts as threads come
                            # free (a late thread finds none left), and keep every thread.
                            # (Running these groups before the deferring ones instead leaves
                            # the work nothing to overlap: 0.68 against 0.50 ms a batch for
                            # the demo's engine on two cores.)
                            cap = rk.overlap_pending() and _threads_per_caller()
                            spare = threads - 1 if cap else threads
                            with _torch_threads(spare):
                                for group in other:
                                    self._run_group(group, values, columns)

    def _read_columns(self, batch: Mapping[str, Any]) -> dict[str, Value]:
        columns: dict[str, Value] = {}
        for c, feature in self._reads:
            if c not in batch:
                raise missing_column_error(feature, c, batch)
            raw = batch[c]
            # Tensors and ragged tensors are values as they are (as_value returns them).
            kind = type(raw)
            columns[c] = (
                raw
                if kind is torch.Tensor or kind is RaggedTensor
                else column_value(feature, c, raw)
            )
        return columns

    def _defers(self, group: _Group) -> bool:
        """Whether ``group`` runs the built-in fused ``truncate`` or ``mod``, whose host work
        may be deferred."""
        return group.kind in _DEFER_ORDER and self._builtin(group)

    def _builtin(self, group: _Group) -> bool:
        """Whether ``group`` runs one of the engine's own fused implementations (not replaced
        by a registration) or one of its merged groups."""
        if group.kind == _FILL_BUCKETIZE or group.kind == _CROSS_MOD:
            return True
        builtin = _BUILTIN.get(group.kind)
        return builtin is not None and self.fused and builtin is fused_implementation(group.kind)

    def _run_group(self, group: _Group, values: list[Value], columns: dict[str, Value]) -> None:
        nodes = group.members
        if nodes[0].parent < 0:
            if len(group.plain_reads) == len(nodes):
                for i, column in group.plain_reads:
                    values[i] = columns[column]
                return
            for i, node in zip(group.nodes, nodes, strict=True):
                assert isinstance(node.op, SourceOp)
                values[i] = read_source(node.features[0], node.op, columns)
            return
        inputs = [values[node.parent] for node in nodes]
        if group.kind == _FILL_BUCKETIZE or group.kind == _CROSS_MOD:
            merged = self._fill_bucketize if group.kind == _FILL_BUCKETIZE else self._cross_mod
            outputs = merged(group, inputs)
            for i, value in zip(group.nodes, outputs, strict=True):
                values[i] = value
            return
        _check_inputs(group, inputs)
        fused = fused_implementation(group.kind) if self.fused else None
        if fused is None:
            outputs = [_apply(n, v) for n, v in zip(nodes, inputs, strict=True)]
        else:
            try:
                outputs = fused(group.ops, inputs)
            except INPUT_ERRORS as exc:
                if len(nodes) == 1:
                    raise input_error(nodes[0].features, nodes[0].op, exc) from exc
                raise _refused(nodes, inputs, exc, _apply) from exc
            if not isinstance(outputs, (list, tuple)) or len(outputs) != len(nodes):
                got = (
                    f"{len(outputs)} outputs"
                    if isinstance(outputs, (list, tuple))
                    else type(outputs).__name__
                )
                name = getattr(fused, "__qualname__", repr(fused))
                raise RegistrationError(
                    f"the fused implementation of op kind {group.kind!r} ({name}) returned "
                    f"{got} for {len(nodes)} ops; it must return a list of one output per op, "
                    "in order"
                )
        for i, value in zip(group.nodes, outputs, strict=True):
            values[i] = value

    def _fill_bucketize(self, group: _Group, inputs: list[Value]) -> list[Value]:
        """A fill_missing and the bucketize reading it, for each node: dense floats in one
        fused call, other values (ragged ones) op by op, every error as the ops alone give it."""
        nodes = group.members
        seen = group.tensor_dtypes
        assert seen is not None
        dtypes = {v.dtype if type(v) is torch.Tensor else None for v in inputs}
        checked = len(dtypes) == 1 and dtypes <= seen
        if checked and self.fused:
            # The usual batch: dense floats of one dtype every fill accepted before, all fused
            # with the boundaries and NaN buckets worked out for that dtype once.
            (dtype,) = dtypes
            assert dtype is not None
            args = group.fill_args.get(dtype)
            if args is None:
                args = group.fill_args[dtype] = fill_bucketize_args(
                    [n.fill for n in nodes],  # type: ignore[misc]
                    group.ops,  # type: ignore[arg-type]
                    dtype,
                )
            try:
                return rk.fused_bucketize(inputs, args[0], nan_buckets=args[1])  # type: ignore[arg-type]
            except INPUT_ERRORS as exc:
                raise _refused(nodes, inputs, exc, _fill_then_apply) from exc
        outputs: list[Value] = [None] * len(nodes)
        dense = []
        for k, (node, value) in enumerate(zip(nodes, inputs, strict=True)):
            fill = node.fill
            assert fill is not None
            if not checked:
                check_value(node.features[0], fill, node.step - 1, value)
            if self.fused and type(value) is torch.Tensor and value.is_floating_point():
                dense.append(k)
            else:
                outputs[k] = _fill_then_apply(node, value)
        (dtype,) = dtypes if len(dtypes) == 1 else (None,)
        if not checked and dtype is not None:
            seen.add(dtype)  # every fill accepted dense tensors of this one dtype
        if dense:
            members = [nodes[k] for k in dense]
            xs = [inputs[k] for k in dense]
            try:
                fused = fill_then_bucketize(
                    [n.fill for n in members],  # type: ignore[misc]
                    [n.op for n in members],  # type: ignore[misc]
                    xs,
                )
            except INPUT_ERRORS as exc:
                raise _refused(members, xs, exc, _fill_then_apply) from exc
            for k, out in zip(dense, fused, strict=True):
                outputs[k] = out
        return outputs

    def _cross_mod(self, group: _Group, inputs: list[Value]) -> list[Value]:
        """A cross and the mod reading it, for each node: one crossing call with every mod's
        modulus as its bucket count (hash and remainder in one pass), errors as the ops alone
        give them."""
        nodes = group.members
        for node, value in zip(nodes, inputs, strict=True):
            check_value(node.features[0], node.cross, node.step - 1, value)  # type: ignore[arg-type]
        if not self.fused:
            return [_cross_then_apply(n, v) for n, v in zip(nodes, inputs, strict=True)]
        try:
            return cross_then_mod(
                [n.cross for n in nodes],  # type: ignore[misc]
                group.ops,  # type: ignore[arg-type]
                inputs,
            )
        except INPUT_ERRORS as exc:
            if len(nodes) == 1:
                raise input_error(nodes[0].features, nodes[0].cross, exc) from exc  # type: ignore[arg-type]
            raise _refused(nodes, inputs, exc, _cross_then_apply) from exc

    def to_dict(self) -> dict[str, Any]:
        """Plain-data config (JSON/YAML-able) that :meth:`from_dict` rebuilds."""
        return {
            "format": _FORMAT_VERSION,
            "passthrough": self.passthrough,
            "features": [f.to_dict() for f in self._features],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, fused: bool = True) -> FeatureEngine:
        """Rebuild an engine from :meth:`to_dict`'s output.

        Raises:
            SerializationError: not an engine config, an unsupported format version,
                ``features`` not a list, ``passthrough`` not a bool, or a bad feature config.
        """
        if not isinstance(data, Mapping) or "features" not in data:
            raise SerializationError("engine config must be a dict with a 'features' list")
        extra = sorted(map(str, set(data) - {"format", "passthrough", "features"}))
        if extra:
            # A misspelled "passthrough" would silently keep the default.
            raise SerializationError(
                f"engine config has unknown key(s) {extra} (it has 'format', 'passthrough' "
                "and 'features')"
            )
        version = data.get("format", _FORMAT_VERSION)
        if type(version) is not int or version != _FORMAT_VERSION:
            raise SerializationError(
                f"engine config has format {version!r}, this version reads {_FORMAT_VERSION}"
            )
        passthrough = data.get("passthrough", True)
        if not isinstance(passthrough, bool):
            # bool("false") is True: a quoted flag would silently keep every column.
            raise SerializationError(
                f"engine config 'passthrough' must be true or false, got {passthrough!r}"
            )
        raw = data["features"]
        if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
            raise SerializationError(f"engine config 'features' must be a list, got {raw!r}")
        features = [Feature.from_dict(f) for f in raw]
        try:
            return cls(features, passthrough=passthrough, fused=fused)
        except RecisFeaturesError as exc:
            # Two definitions under one name, say: the config is what is wrong.
            raise SerializationError(str(exc)) from exc

    def fingerprint(self) -> str:
        """Stable SHA-256 hex digest of the transforms (feature order and pass-through aside):
        record it with a checkpoint to know exactly which transforms produced its ids.

        Raises:
            SerializationError: a feature holds a :class:`Lambda` (not serializable).
        """
        return fingerprint_of(
            sorted((f.to_dict() for f in self._features), key=lambda d: d["name"])
        )

    def extra_repr(self) -> str:
        return f"features={len(self._features)}, passthrough={self.passthrough}, fused={self.fused}"
