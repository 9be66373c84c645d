"""``FeatureEngine``: compiles features into steps and runs each step's ops fused by kind."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from ._feature import (
    INPUT_ERRORS,
    Feature,
    check_value,
    column_value,
    fingerprint_of,
    input_error,
    missing_column_error,
    read_source,
)
from ._fusion import fused_implementation
from ._op import Op, SourceOp
from ._values import Value
from .exceptions import FeatureConflictError, FeatureDefinitionError, SerializationError

__all__ = ["FeatureEngine"]

_FORMAT_VERSION = 1


@dataclasses.dataclass
class _Node:
    """One op applied to one input: shared by every feature whose chain starts the same way."""

    op: Op
    parent: int  # index of the input node; -1 for a source op
    step: int
    features: list[str]


@dataclasses.dataclass
class _Group:
    """All nodes of one op kind in one step: run as one fused call when the kind has one."""

    kind: str
    nodes: list[int]
    # Filled once compiled (the engine runs groups per batch: no lookups on that path).
    members: list[_Node] = dataclasses.field(default_factory=list)
    ops: list[Op] = dataclasses.field(default_factory=list)


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
    try:
        return node.op.apply(value)  # type: ignore[attr-defined]
    except INPUT_ERRORS as exc:
        raise input_error(node.features, node.op, exc) from exc


class FeatureEngine(nn.Module):
    """Run many features on a batch, each op kind of each step as one fused call.

    The features are compiled into steps (step k holds the k-th op of every feature); features
    whose chains start alike share those ops, so an identical op on the same input runs once.
    Within a step, the ops of one kind (with per-feature parameters) go to the kind's fused
    implementation (see :func:`register_fused`) in one call; kinds without one run op by op.
    Results are exactly those of each :class:`Feature` computed alone.

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
        depth = max((n.step for n in self._nodes), default=-1) + 1
        self._steps: list[list[_Group]] = [[] for _ in range(depth)]
        for i, n in enumerate(self._nodes):
            groups = self._steps[n.step]
            group = next((g for g in groups if g.kind == n.op.kind), None)
            if group is None:
                groups.append(group := _Group(n.op.kind, []))
            group.nodes.append(i)
        for groups in self._steps:
            for group in groups:
                group.members = [self._nodes[i] for i in group.nodes]
                group.ops = [n.op for n in group.members]
        # Each column converted once, errors naming the first feature that reads it.
        reads: dict[str, str] = {}
        for f in self._features:
            for c in f.columns:
                reads.setdefault(c, f.name)
        self._reads = [(c, name) for c, name in reads.items()]

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
        it runs as one fused call.

        Returns:
            ``plan[k]`` lists ``{"kind", "ops", "features", "fused"}`` for step ``k``.
        """
        return [
            [
                {
                    "kind": g.kind,
                    "ops": len(g.nodes),
                    "features": [name for i in g.nodes for name in self._nodes[i].features],
                    "fused": self.fused and fused_implementation(g.kind) is not None,
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
            FeatureTypeError: an op got a value of the wrong kind.
            FeatureConflictError: a pass-through column has a feature's name.
        """
        values: list[Value] = [None] * len(self._nodes)
        columns = self._read_columns(batch)
        for groups in self._steps:
            for group in groups:
                self._run_group(group, values, columns)
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

    def _read_columns(self, batch: Mapping[str, Any]) -> dict[str, Value]:
        columns: dict[str, Value] = {}
        for c, feature in self._reads:
            if c not in batch:
                raise missing_column_error(feature, c, batch)
            columns[c] = column_value(feature, c, batch[c])
        return columns

    def _run_group(self, group: _Group, values: list[Value], columns: dict[str, Value]) -> None:
        nodes = group.members
        if nodes[0].parent < 0:
            for i, node in zip(group.nodes, nodes, strict=True):
                assert isinstance(node.op, SourceOp)
                values[i] = read_source(node.features[0], node.op, columns)
            return
        inputs = [values[node.parent] for node in nodes]
        for node, value in zip(nodes, inputs, strict=True):
            check_value(node.features[0], node.op, node.step, value)
        fused = fused_implementation(group.kind) if self.fused else None
        if fused is None:
            outputs = [_apply(n, v) for n, v in zip(nodes, inputs, strict=True)]
        else:
            try:
                outputs = fused(group.ops, inputs)
            except INPUT_ERRORS as exc:
                if len(nodes) == 1:
                    raise input_error(nodes[0].features, nodes[0].op, exc) from exc
                # Name the feature whose data was refused, not every feature of the fused call
                # (nor the kernel's index into it): run the ops alone until one fails.
                for n, v in zip(nodes, inputs, strict=True):
                    _apply(n, v)
                names = sorted({f for n in nodes for f in n.features})
                raise input_error(names, nodes[0].op, exc) from exc
        for i, value in zip(group.nodes, outputs, strict=True):
            values[i] = value

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
        version = data.get("format", _FORMAT_VERSION)
        if version != _FORMAT_VERSION:
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
        return cls(features, passthrough=passthrough, fused=fused)

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
