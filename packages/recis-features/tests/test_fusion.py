"""The fusion registry, and fused == unfused on generated feature sets and batches."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import pytest
import torch
from conftest import assert_same
from hypothesis import given, settings
from hypothesis import strategies as st

from recis_features import (
    Feature,
    FeatureEngine,
    Mod,
    RegistrationError,
    Transform,
    fused_implementation,
    fused_kinds,
    register_fused,
)
from recis_kernels import RaggedTensor


class Clip(Transform):
    """A user-defined op kind, fused by registration only."""

    kind = "test_clip"
    accepts: ClassVar[frozenset[str]] = frozenset({"floats"})

    def __init__(self, limit: float) -> None:
        self.limit = limit

    def params(self) -> dict[str, float]:
        return {"limit": self.limit}

    def apply(self, value: torch.Tensor) -> torch.Tensor:
        return value.clamp(-self.limit, self.limit)


CLIP_CALLS: list[int] = []


@register_fused("test_clip")
def _fused_clip(ops: Sequence[Clip], values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    CLIP_CALLS.append(len(ops))
    sizes = [v.numel() for v in values]
    packed = torch.cat([v.reshape(-1) for v in values])
    limits = torch.tensor([op.limit for op in ops]).repeat_interleave(torch.tensor(sizes))
    out = torch.minimum(torch.maximum(packed, -limits), limits)
    return [o.view(v.shape) for o, v in zip(out.split(sizes), values, strict=True)]


def test_a_registered_kind_runs_as_one_call_per_step_with_per_feature_parameters() -> None:
    CLIP_CALLS.clear()
    features = [Feature(f"f{i}").select(f"x{i}").then(Clip(float(i + 1))) for i in range(3)]
    batch = {f"x{i}": torch.tensor([-5.0, 0.5, 5.0]) for i in range(3)}
    engine = FeatureEngine(features)
    out = engine(batch)
    assert CLIP_CALLS == [3]
    for i, f in enumerate(features):
        assert out[f.name].tolist() == [-(i + 1.0), 0.5, i + 1.0]
        assert_same(out[f.name], f(batch))
    assert engine.plan()[1] == [
        {"kind": "test_clip", "ops": 3, "features": ["f0", "f1", "f2"], "fused": True}
    ]
    assert "test_clip" in fused_kinds()
    CLIP_CALLS.clear()
    FeatureEngine(features, fused=False)(batch)
    assert CLIP_CALLS == []


def test_registration_errors() -> None:
    with pytest.raises(RegistrationError) as info:
        register_fused("test_clip", _fused_clip)
    assert str(info.value) == (
        "op kind 'test_clip' already has a fused implementation; pass replace=True"
    )
    with pytest.raises(RegistrationError, match="op kind must be a non-empty string"):
        register_fused("", _fused_clip)
    with pytest.raises(RegistrationError, match="must be callable"):
        register_fused("test_other", 3)  # type: ignore[arg-type]
    with pytest.raises(RegistrationError) as info:

        class Duplicate(Transform):
            kind = "mod"

            def apply(self, value: torch.Tensor) -> torch.Tensor:
                return value

    assert str(info.value) == "op kind 'mod' is already registered by Mod"


def test_replacing_an_implementation_is_explicit() -> None:
    original = fused_implementation("mod")
    assert original is not None
    seen: list[list[int]] = []

    def spy(ops: Sequence[Mod], values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        seen.append([op.n for op in ops])
        return original(ops, values)

    register_fused("mod", spy, replace=True)
    try:
        features = [Feature(f"m{n}").select("ids").mod(n) for n in (3, 5, 7)]
        FeatureEngine(features)({"ids": torch.arange(10)})
    finally:
        register_fused("mod", original, replace=True)
    assert seen == [[3, 5, 7]]


# -- fused == unfused on generated feature sets and batches ---------------------------------

ROWS = st.integers(0, 12)
INT64 = st.integers(-(2**63), 2**63 - 1)
FLOAT = st.floats(-100, 100, width=32) | st.just(math.nan)


@st.composite
def batches(draw: st.DrawFn) -> dict[str, object]:
    """Dense ids, dense floats (with NaN), ragged ids (empty rows, maybe weights)."""
    b = draw(ROWS)
    ids = draw(st.lists(INT64, min_size=b, max_size=b))
    floats = draw(st.lists(FLOAT, min_size=b, max_size=b))
    lengths = draw(st.lists(st.integers(0, 5), min_size=b, max_size=b))
    values = draw(st.lists(INT64, min_size=sum(lengths), max_size=sum(lengths)))
    offsets = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)
    weights = None
    if draw(st.booleans()):
        weights = torch.tensor(
            draw(st.lists(st.floats(0, 4, width=32), min_size=len(values), max_size=len(values))),
            dtype=torch.float32,
        )
    return {
        "ids": torch.tensor(ids, dtype=torch.int64),
        "ids2d": torch.tensor(ids, dtype=torch.int64).repeat_interleave(2).view(b, 2),
        "floats": torch.tensor(floats, dtype=torch.float32),
        "seq": RaggedTensor(torch.tensor(values, dtype=torch.int64), [offsets], weights),
    }


def _templates(draw: st.DrawFn, name: str) -> Feature:
    f = Feature(name)
    n = st.integers(1, 2**63 - 1)
    choice = draw(st.sampled_from(["mod", "mod2d", "seq_mod", "floats", "cast"]))
    if choice == "mod":
        return f.select("ids").mod(draw(n))
    if choice == "mod2d":
        return f.select("ids2d").mod(draw(n)).mod(draw(st.integers(1, 100)))
    if choice == "seq_mod":
        return f.select("seq").fill_missing(draw(st.integers(-5, 5))).mod(draw(n))
    if choice == "floats":
        return (
            f.select("floats").fill_missing(0.0).normalize(draw(FLOAT.filter(math.isfinite)), 2.0)
        )
    return f.select("floats", dtype="float64").log1p()


@st.composite
def feature_sets(draw: st.DrawFn) -> list[Feature]:
    count = draw(st.integers(1, 6))
    return [_templates(draw, f"f{i}") for i in range(count)]


@settings(max_examples=40, deadline=None)
@given(features=feature_sets(), batch=batches())
def test_fused_engine_equals_unfused_engine_and_each_feature_alone(
    features: list[Feature], batch: dict[str, object]
) -> None:
    fused = FeatureEngine(features, passthrough=False)(batch)
    unfused = FeatureEngine(features, passthrough=False, fused=False)(batch)
    assert list(fused) == list(unfused)
    for f in features:
        assert_same(fused[f.name], unfused[f.name])
        assert_same(fused[f.name], f(batch))
