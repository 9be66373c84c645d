"""The fusion registry, and fused == unfused on generated feature sets and batches."""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Sequence
from typing import ClassVar

import pytest
import torch
from conftest import assert_same, random_sequences
from hypothesis import given, settings
from hypothesis import strategies as st

import recis_kernels as rk
from recis_features import (
    Feature,
    FeatureEngine,
    FeatureInputError,
    FeatureTypeError,
    FillMissing,
    Mod,
    RegistrationError,
    SourceOp,
    Transform,
    _engine,
    fused_implementation,
    fused_kinds,
    op_kinds,
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
        register_fused("test_other", 3)  # type: ignore[call-overload]
    with pytest.raises(RegistrationError) as info:

        class Duplicate(Transform):
            kind = "mod"

            def apply(self, value: torch.Tensor) -> torch.Tensor:
                return value

    assert str(info.value) == "op kind 'mod' is already registered by Mod"


def test_kinds_named_like_the_engines_merged_groups_are_refused() -> None:
    # A user op of kind "cross+mod" was taken for the engine's merged cross and mod group
    # (an AttributeError on the first batch, or fused with a real cross).
    for kind in ("cross+mod", "fill_missing+bucketize", "a+b"):
        with pytest.raises(RegistrationError, match=rf"op kind '{re.escape(kind)}' may not"):
            type("Plus", (Transform,), {"kind": kind, "apply": lambda self, v: v + 1})
        with pytest.raises(RegistrationError, match=r"may not contain '\+'"):
            register_fused(kind, _fused_clip)
    assert "cross+mod" not in op_kinds()


def test_a_fused_implementation_returning_the_wrong_outputs_is_named() -> None:
    class Twice(Transform):
        kind = "test_twice"

        def apply(self, value: torch.Tensor) -> torch.Tensor:
            return value * 2

    def short(ops: Sequence[Twice], values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [values[0] * 2]

    register_fused("test_twice", short)
    engine = FeatureEngine([Feature(f"t{c}").select(c).then(Twice()) for c in "xy"])
    batch = {"x": torch.tensor([1, 2]), "y": torch.tensor([3])}
    with pytest.raises(
        RegistrationError,
        match=r"fused implementation of op kind 'test_twice' \(.*short\) returned 1 outputs "
        r"for 2 ops",
    ):
        engine(batch)
    register_fused("test_twice", lambda ops, values: None, replace=True)
    with pytest.raises(RegistrationError, match=r"returned NoneType for 2 ops"):
        engine(batch)


def test_a_source_kind_registered_before_its_class_is_planned_as_unfused() -> None:
    # Sources always read op by op; plan() said fused when the registration came first.
    register_fused("test_select_late", lambda ops, values: list(values))

    class SelectLate(SourceOp):
        kind = "test_select_late"

        def __init__(self, column: str) -> None:
            self.column = column

        def params(self) -> dict[str, str]:
            return {"column": self.column}

        @property
        def columns(self) -> tuple[str, ...]:
            return (self.column,)

        def read(self, columns):  # type: ignore[no-untyped-def]
            return columns[self.column] + 1

    engine = FeatureEngine([Feature("s", [SelectLate("x")])])
    assert engine({"x": torch.tensor([3, 0])})["s"].tolist() == [4, 1]
    assert engine.plan()[0][0]["fused"] is False


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
    """Dense ids, dense floats (with NaN), ragged ids (empty rows, maybe weights), ragged floats,
    3-level ragged ids, strings as a list and as ragged bytes."""
    b = draw(ROWS)
    ids = draw(st.lists(INT64, min_size=b, max_size=b))
    floats = draw(st.lists(FLOAT, min_size=b, max_size=b))
    strings = draw(st.lists(st.text(max_size=6), min_size=b, max_size=b))
    encoded = [s.encode() for s in strings]
    byte_offsets = torch.tensor([0, *(len(e) for e in encoded)], dtype=torch.int64).cumsum(0)
    return {
        "ids": torch.tensor(ids, dtype=torch.int64),
        "ids2d": torch.tensor(ids, dtype=torch.int64).repeat_interleave(2).view(b, 2),
        "floats": torch.tensor(floats, dtype=torch.float32),
        "seq": draw(ragged_values(b, INT64, weighted=draw(st.booleans()))),
        "seq_w": draw(ragged_values(b, st.integers(-50, 50), weighted=True)),
        "fseq": draw(ragged_values(b, FLOAT, weighted=False, dtype=torch.float32)),
        "nested": draw(nested_values(b)),
        "strings": strings,
        "bytes": RaggedTensor(
            torch.tensor(list(b"".join(encoded)), dtype=torch.uint8), [byte_offsets]
        ),
    }


@st.composite
def ragged_values(
    draw: st.DrawFn,
    rows: int,
    elements: st.SearchStrategy,
    weighted: bool,
    dtype: torch.dtype = torch.int64,
) -> RaggedTensor:
    lengths = draw(st.lists(st.integers(0, 5), min_size=rows, max_size=rows))
    values = draw(st.lists(elements, min_size=sum(lengths), max_size=sum(lengths)))
    offsets = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)
    weights = None
    if weighted:
        weights = torch.tensor(
            draw(st.lists(st.floats(0, 4, width=32), min_size=len(values), max_size=len(values))),
            dtype=torch.float32,
        )
    return RaggedTensor(torch.tensor(values, dtype=dtype), [offsets], weights)


@st.composite
def nested_values(draw: st.DrawFn, rows: int) -> RaggedTensor:
    """3-level ragged ids: rows of sub-rows of ids."""
    outer = draw(st.lists(st.integers(0, 4), min_size=rows, max_size=rows))
    inner = draw(st.lists(st.integers(0, 3), min_size=sum(outer), max_size=sum(outer)))
    values = draw(st.lists(INT64, min_size=sum(inner), max_size=sum(inner)))
    return RaggedTensor(
        torch.tensor(values, dtype=torch.int64),
        [
            torch.tensor([0, *outer], dtype=torch.int64).cumsum(0),
            torch.tensor([0, *inner], dtype=torch.int64).cumsum(0),
        ],
    )


BOUNDARIES = st.lists(st.floats(-100, 100), min_size=1, max_size=6, unique=True).map(sorted)
BUCKETS = st.integers(0, 2**63 - 1) | st.integers(1, 100)
TEMPLATES = [
    "mod",
    "mod2d",
    "seq_mod",
    "floats",
    "cast",
    "bucketize",
    "ragged_bucketize",
    "hash",
    "hash_bytes",
    "cross",
    "cross_dense",
    "cross_dense_mod",
    "truncate",
    "truncate_floats",
    "truncate_nested",
    "multi_hash",
    "fill_bucketize",
    "fill_only",
]
# Few fill values, so that generated features share fills (merged with several bucketize ops,
# or not merged because a feature ends at the fill).
FILLS = st.sampled_from([0.0, -1.0, 2.5, 1e-3])
FLOAT_DTYPES = st.sampled_from([None, "float64", "float16"])


def _template(draw: st.DrawFn, name: str) -> Feature:
    f = Feature(name)
    n = st.integers(1, 2**63 - 1)
    choice = draw(st.sampled_from(TEMPLATES))
    side = draw(st.sampled_from(["head", "tail"]))
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
    if choice == "cast":
        return f.select("floats", dtype="float64").log1p()
    if choice == "bucketize":
        return f.select("floats").bucketize(draw(BOUNDARIES))
    if choice == "ragged_bucketize":
        return f.select("fseq").fill_missing(1.0).bucketize(draw(BOUNDARIES))
    if choice == "hash":
        return f.select("strings").hash(draw(st.sampled_from(["farm", "murmur"])), draw(BUCKETS))
    if choice == "hash_bytes":
        return f.select("bytes").hash(draw(st.sampled_from(["farm", "murmur"])), draw(BUCKETS))
    if choice == "cross":
        cols = draw(st.sampled_from([["seq", "seq_w"], ["ids", "seq"], ["seq_w", "ids"]]))
        return f.select_fields(cols).cross().mod(draw(n))
    if choice == "cross_dense":
        return f.select_fields(["ids", "ids2d"]).cross()
    if choice == "cross_dense_mod":
        # Two single-valued columns: hashed and reduced in one pass when merged.
        return f.select_fields(["ids", draw(st.sampled_from(["ids", "seq"]))]).cross().mod(draw(n))
    if choice == "truncate":
        return f.select(draw(st.sampled_from(["seq", "seq_w"]))).truncate(
            draw(st.integers(0, 6)), side
        )
    if choice == "truncate_floats":
        return f.select("fseq").truncate(draw(st.integers(0, 6)), side)
    if choice == "truncate_nested":
        return f.select("nested").truncate(draw(st.integers(0, 5)), side, levels=3)
    if choice == "fill_bucketize":
        column = f.select("floats", dtype=draw(FLOAT_DTYPES))
        return column.fill_missing(draw(FILLS)).bucketize(draw(BOUNDARIES))
    if choice == "fill_only":
        return f.select("floats", dtype=draw(FLOAT_DTYPES)).fill_missing(draw(FILLS))
    widths = draw(st.lists(BUCKETS, min_size=1, max_size=3))
    return f.select(draw(st.sampled_from(["ids", "seq", "ids2d"]))).multi_hash(widths)


@st.composite
def feature_sets(draw: st.DrawFn) -> list[Feature]:
    count = draw(st.integers(1, 8))
    return [_template(draw, f"f{i}") for i in range(count)]


@settings(max_examples=60, deadline=None)
@given(features=feature_sets(), batch=batches())
def test_fused_engine_equals_unfused_engine_and_each_feature_alone(
    features: list[Feature], batch: dict[str, object]
) -> None:
    engine = FeatureEngine(features, passthrough=False)
    fused = engine(batch)
    unfused = FeatureEngine(features, passthrough=False, fused=False)(batch)
    restored = FeatureEngine.from_dict(json.loads(json.dumps(engine.to_dict())))
    assert restored.fingerprint() == engine.fingerprint()
    again = restored(batch)
    assert list(fused) == list(unfused) == list(again)
    for f in features:
        assert_same(fused[f.name], unfused[f.name])
        assert_same(fused[f.name], f(batch))
        assert_same(again[f.name], fused[f.name])


def test_packed_fill_of_dense_floats_equals_each_fill(device: torch.device) -> None:
    from recis_features._fused import fill_dense_packed

    ops = [FillMissing(-1.0), FillMissing(2.5), FillMissing(0.0)]
    xs = [
        torch.tensor([1.0, math.nan, 3.0], device=device),
        torch.tensor([[math.nan, 5.0], [6.0, math.nan]], device=device),
        torch.zeros(0, device=device),
    ]
    for got, op, x in zip(fill_dense_packed(ops, xs), ops, xs, strict=True):
        assert_same(got, op.apply(x))
    assert fill_dense_packed(ops, xs)[1].tolist() == [[2.5, 5.0], [6.0, 2.5]]


def test_an_op_class_must_have_a_kind_of_its_own() -> None:
    # A subclass sharing Mod's kind would be merged with Mod ops and run by Mod's fused call.
    with pytest.raises(RegistrationError) as info:

        class ModPlusOne(Mod):
            def apply(self, value: torch.Tensor) -> torch.Tensor:
                return super().apply(value) + 1

    assert str(info.value) == (
        "op class test_an_op_class_must_have_a_kind_of_its_own.<locals>.ModPlusOne must set "
        "its own kind (a unique, non-empty name) and would run as 'mod'"
    )
    with pytest.raises(RegistrationError, match=r"Nameless must set its own kind \("):

        class Nameless(Transform):
            def apply(self, value: torch.Tensor) -> torch.Tensor:
                return value

    # An abstract intermediate class needs no kind; its concrete subclasses do.
    class Base(Transform):
        pass

    class Concrete(Base):
        kind = "test_concrete"

        def apply(self, value: torch.Tensor) -> torch.Tensor:
            return value * 2

    assert Concrete().apply(torch.tensor([2])).tolist() == [4]


def test_a_fill_read_only_by_bucketize_runs_with_it() -> None:
    features = [
        # One fill read by two bucketize ops: both run with it, NaN to the fill's bucket.
        Feature("a").select("x").fill_missing(2.5).bucketize([0.0, 2.0, 3.0]),
        Feature("b").select("x").fill_missing(2.5).bucketize([1.0]),
        # A feature ends at this fill: it runs, and the bucketize reads its result.
        Feature("c").select("x").fill_missing(-1.0),
        Feature("d").select("x").fill_missing(-1.0).bucketize([0.0]),
        # Ragged floats: the fill gives empty rows a value, the bucketize reads them.
        Feature("e").select("r").fill_missing(7.0).bucketize([5.0]),
    ]
    engine = FeatureEngine(features, passthrough=False)
    plan = [[(g["kind"], g["features"], g["fused"]) for g in step] for step in engine.plan()]
    assert plan[1] == [
        ("fill_missing+bucketize", ["a", "b", "e"], True),
        ("fill_missing", ["c", "d"], True),
    ]
    assert plan[2] == [("bucketize", ["d"], True)]
    batch = {
        "x": torch.tensor([[math.nan, 0.5], [2.5, 9.0]]),
        "r": RaggedTensor(torch.tensor([1.0, math.nan, 6.0]), torch.tensor([0, 2, 2, 3])),
    }
    out = engine(batch)
    assert out["a"].tolist() == [[2, 1], [2, 3]]
    assert out["b"].tolist() == [[1, 0], [1, 1]]
    assert out["d"].tolist() == [[0, 1], [1, 1]]
    # The NaN in a row and the empty row both get 7.
    assert out["e"].values.tolist() == [0, 1, 1, 1]
    assert out["e"].offsets[0].tolist() == [0, 2, 3, 4]
    for fused in (True, False):
        got = FeatureEngine(features, passthrough=False, fused=fused)(batch)
        for f in features:
            assert_same(got[f.name], f(batch))


def test_a_cross_read_only_by_one_mod_runs_with_it() -> None:
    features = [
        # Dense single-valued sides: hashed and reduced in one pass.
        Feature("a").select_fields(["u", "i"]).cross().mod(1000),
        Feature("b").select_fields(["i", "u"]).cross().mod((1 << 63) - 1),
        # Weighted ragged sides: crossed, then reduced in the same call.
        Feature("c").select_fields(["r", "u"]).cross().mod(7),
        # Two mods read one cross: it runs once, then each mod in the next step.
        Feature("d").select_fields(["u", "r"]).cross().mod(5),
        Feature("e").select_fields(["u", "r"]).cross().mod(11),
        # A feature ends at this cross: it runs, and the mod reads its result.
        Feature("f").select_fields(["i", "i"]).cross(),
        Feature("g").select_fields(["i", "i"]).cross().mod(3),
    ]
    engine = FeatureEngine(features, passthrough=False)
    plan = [[(g["kind"], g["features"], g["fused"]) for g in step] for step in engine.plan()]
    assert plan[1] == [
        ("cross+mod", ["a", "b", "c"], True),
        ("cross", ["d", "e", "f", "g"], True),
    ]
    assert plan[2] == [("mod", ["d", "e", "g"], True)]
    batch = {
        "u": torch.tensor([1, -1, 1 << 62]),
        "i": torch.tensor([7, 7, -(1 << 63)]),
        "r": RaggedTensor(
            torch.tensor([3, 3, 4, 5]),
            torch.tensor([0, 2, 2, 4]),
            torch.tensor([0.5, 2.0, 1.0, 3.0]),
        ),
    }
    for fused in (True, False):
        got = FeatureEngine(features, passthrough=False, fused=fused)(batch)
        for f in features:
            assert_same(got[f.name], f(batch))
    out = engine(batch)
    crossed = rk.feature_cross(batch["u"], batch["i"])
    assert out["a"].values.tolist() == rk.mod(crossed.values, 1000).tolist()
    assert out["a"].offsets[0].tolist() == [0, 1, 2, 3]
    assert out["c"].weights.tolist() == [0.5, 1.0, 3.0]


def test_a_merged_cross_reports_errors_as_its_own_step() -> None:
    engine = FeatureEngine(
        [
            Feature("ok").select_fields(["u", "u"]).cross().mod(10),
            Feature("p").select_fields(["u", "x"]).cross().mod(10),
        ]
    )
    for fused in (True, False):
        engine.fused = fused
        with pytest.raises(
            FeatureTypeError,
            match=r"feature 'p': op cross \(step 1\) expects a pair of id columns",
        ):
            engine({"u": torch.tensor([1, 2]), "x": torch.tensor([1.0, 2.0])})
        # Rows that do not pair up: the kernel refuses them, the error names the feature.
        with pytest.raises(
            FeatureInputError,
            match=r"^feature 'p': op cross: feature_cross: pairs\[0\] has 2 rows in a but 1 in b$",
        ):
            engine(
                {
                    "u": torch.tensor([1, 2]),
                    "x": RaggedTensor(torch.tensor([1]), torch.tensor([0, 1])),
                }
            )


def test_a_merged_fill_reports_errors_as_its_own_step() -> None:
    engine = FeatureEngine([Feature("p").select("x").fill_missing(0).bucketize([1.0])])
    for fused in (True, False):
        engine.fused = fused
        with pytest.raises(
            FeatureTypeError, match=r"feature 'p': op fill_missing \(step 1\) expects dense floats"
        ):
            engine({"x": torch.tensor([1, 2])})
        # Ragged ids are filled, then refused by the bucketize of step 2.
        with pytest.raises(
            FeatureTypeError, match=r"feature 'p': op bucketize \(step 2\) expects floats"
        ):
            engine({"x": RaggedTensor(torch.tensor([1, 2]), torch.tensor([0, 2]))})
        with pytest.raises(FeatureTypeError, match=r"op fill_missing \(step 1\).*can hold"):
            FeatureEngine([Feature("h").select("x").fill_missing(1e5).bucketize([1.0])])(
                {"x": torch.tensor([math.nan], dtype=torch.float16)}
            )


@pytest.mark.usefixtures("torch_threads")
def test_a_long_truncation_overlaps_the_other_groups_of_its_step() -> None:
    """With more than one thread, a truncation large enough to copy in the background runs
    first in its step while the step's other groups run: the results are those of each
    feature alone, including a later step reading the truncated sequence."""
    g = torch.Generator().manual_seed(5)
    batch = {
        "seq": random_sequences(8000, g, -50, 50),
        "ids": torch.randint(-(1 << 62), 1 << 62, (8000,), generator=g),
    }
    features = [
        Feature("ids").select("ids").mod(1_000_003),
        Feature("seq").select("seq").truncate(40, side="tail").mod(97),
        Feature("head").select("seq").truncate(30),
    ]
    engine = FeatureEngine(features, passthrough=False)
    assert [g["kind"] for g in engine.plan()[1]] == ["truncate", "mod"]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = engine(batch)
        for f in features:
            assert_same(out[f.name], f(batch))


class ModPlusOne(Transform):
    """``mod(n) + 1`` of dense ids: a kind whose fused implementation reads what it computes."""

    kind = "test_mod_plus_one"

    def __init__(self, n: int) -> None:
        self.n = n

    def params(self) -> dict[str, int]:
        return {"n": self.n}

    def apply(self, value: torch.Tensor) -> torch.Tensor:
        return rk.mod(value, self.n) + 1


@register_fused("test_mod_plus_one")
def _fused_mod_plus_one(
    ops: Sequence[ModPlusOne], values: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    return [r + 1 for r in rk.fused_mod(list(values), [op.n for op in ops])]


def _reading_mod(ops: Sequence[Mod], values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    # A replacement of the built-in mod that reads its remainders (adding 0 copies them).
    return [r + 0 for r in rk.fused_mod(list(values), [op.n for op in ops])]


@pytest.mark.usefixtures("torch_threads")
def test_other_groups_of_an_overlapped_step_read_complete_results() -> None:
    """The built-in fused truncate and mod of a step may leave their host work running while
    the step's other groups run. Those groups (a map's function, a registered kind, a
    replacement of the built-in mod) run their ops in place, so what they compute and read is
    complete: every output equals the feature alone, batch after batch, on two threads."""
    g = torch.Generator().manual_seed(11)
    batches = []
    for _ in range(3):
        seq = random_sequences(8000, g)
        batches.append(
            {"seq": seq, "ids": torch.randint(-(1 << 62), 1 << 62, (40_000,), generator=g)}
        )

    def last_mod(r: RaggedTensor) -> torch.Tensor:
        # 320 KB of copy and of remainders: both would be deferred in an enabled block.
        return rk.mod(rk.truncate(r, 40, "tail").values.values, 97) + 1

    features = [
        Feature("seq").select("seq").truncate(40, side="tail"),
        Feature("ids").select("ids").mod(1_000_003),
        Feature("mapped").select("seq").map(last_mod),
        Feature("plus").select("ids").then(ModPlusOne(1_000_033)),
    ]
    builtin = fused_implementation("mod")
    assert builtin is not None
    torch.set_num_threads(2)
    try:
        for replaced in (False, True):
            if replaced:
                register_fused("mod", _reading_mod, replace=True)
            engine = FeatureEngine(features, passthrough=False)
            kinds = [g["kind"] for g in engine.plan()[1]]
            assert kinds == ["truncate", "mod", "lambda", "test_mod_plus_one"]
            for _ in range(5):
                for batch in batches:
                    out = engine(batch)
                    for f in features:
                        assert_same(out[f.name], f(batch))
    finally:
        register_fused("mod", builtin, replace=True)


@pytest.mark.usefixtures("torch_threads")
@pytest.mark.parametrize("per_caller", [True, False])
def test_in_place_groups_leave_a_core_to_the_steps_deferred_work(
    per_caller: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a step's truncation copies in the background, the step's in-place groups run
    torch on one thread fewer (not splitting small ops over a thread that must share a core
    with that work); the thread count is restored after the step, and is left alone in a
    step that defers nothing, and where torch's thread count is not the calling thread's
    own (its native backend: one pool for the process)."""
    monkeypatch.setattr(_engine, "_threads_per_caller", lambda: per_caller)
    g = torch.Generator().manual_seed(5)
    sequences = random_sequences(20_000, g)
    values, offsets = sequences.values, sequences.offsets[0]
    seen: list[tuple[int, bool]] = []

    def log1p_seen(x: torch.Tensor) -> torch.Tensor:
        seen.append((torch.get_num_threads(), rk.overlap_pending()))
        return torch.log1p(x)

    features = [
        Feature("seq").select("seq").truncate(40, side="tail"),
        Feature("price").select("price").map(log1p_seen),
    ]
    engine = FeatureEngine(features, passthrough=False)
    assert [g["kind"] for g in engine.plan()[1]] == ["truncate", "lambda"]
    for threads in (2, 3):
        torch.set_num_threads(threads)
        for rows in (offsets, offsets[:3]):  # a long truncation, then a short one
            seen.clear()
            seq = RaggedTensor(values[: int(rows[-1])], [rows])
            batch = {"seq": seq, "price": torch.rand(len(rows) - 1)}
            out = engine(batch)
            assert torch.get_num_threads() == threads
            ((count, pending),) = seen
            assert count == (threads - 1 if pending and per_caller else threads)
            assert pending == (len(rows) > 3)
            for f in features:
                assert_same(out[f.name], f(batch))


@pytest.mark.usefixtures("torch_threads")
def test_leaving_a_core_to_deferred_work_leaves_other_threads_counts_alone() -> None:
    """The engine lowers the torch thread count of the thread calling it only: a thread that
    already ran an op torch splits keeps its count while the engine's in-place groups run on fewer
    (torch's OpenMP backend keeps the count per thread, which the engine relies on)."""
    if not _engine._threads_per_caller():
        pytest.skip("torch's parallel backend has one thread count for the process")
    torch.set_num_threads(2)
    counts: dict[str, int] = {}
    split, inside, read = threading.Event(), threading.Event(), threading.Event()

    def other_thread() -> None:
        torch.ones(1 << 17).add_(1)  # an op torch splits: the thread takes the count of 2
        split.set()
        inside.wait(timeout=60)
        counts["other"] = torch.get_num_threads()
        read.set()

    def log1p_looked_at(x: torch.Tensor) -> torch.Tensor:
        counts["engine"] = torch.get_num_threads()
        inside.set()
        read.wait(timeout=60)
        return torch.log1p(x)

    worker = threading.Thread(target=other_thread)
    worker.start()
    # A thread takes torch's process-wide count at its first split op, so the engine (which
    # lowers that count while it runs) starts only once the other thread has taken its own.
    assert split.wait(timeout=60)
    features = [
        Feature("seq").select("seq").truncate(40, side="tail"),
        Feature("price").select("price").map(log1p_looked_at),
    ]
    sequences = random_sequences(20_000, torch.Generator().manual_seed(5))
    FeatureEngine(features)({"seq": sequences, "price": torch.rand(20_000)})
    worker.join(timeout=60)
    assert counts == {"engine": 1, "other": 2}
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.usefixtures("torch_threads")
def test_an_engine_run_inside_the_callers_overlap_block(enabled: bool) -> None:
    """Inside a caller's ``recis_kernels.overlap()`` (or ``overlap(False)``) block the engine's
    step blocks are nested: each still waits for its own work, so a step never reads the
    unfinished truncation of the step before."""
    g = torch.Generator().manual_seed(5)
    batch = {
        "seq": random_sequences(20_000, g),
        "ids": torch.randint(-(1 << 62), 1 << 62, (40_000,), generator=g),
    }
    features = [
        Feature("ids").select("ids").mod(1_000_003),
        Feature("seq").select("seq").truncate(40, side="tail").mod(97),
    ]
    engine = FeatureEngine(features, passthrough=False)
    assert [[g["kind"] for g in step] for step in engine.plan()] == [
        ["select"],
        ["truncate", "mod"],
        ["mod"],
    ]
    torch.set_num_threads(2)
    for _ in range(5):
        with rk.overlap(enabled):
            out = engine(batch)
            if not enabled:
                for f in features:
                    assert_same(out[f.name], f(batch))
        for f in features:
            assert_same(out[f.name], f(batch))


@pytest.mark.usefixtures("torch_threads")
def test_chained_steps_inside_the_callers_overlap_block_read_finished_results() -> None:
    """A step of one group runs outside any block of the engine's own: inside a caller's
    enabled ``overlap()`` block its large ``mod`` would defer into that block and the next
    step read the unfinished remainders. The engine and ``Feature.__call__`` run their ops
    in place there (``overlap(False)``)."""
    ids = torch.randint(-(1 << 62), 1 << 62, (1 << 20,), generator=torch.Generator().manual_seed(3))
    feature = Feature("a").select("ids").mod(1_000_003).mod(7)
    want = rk.mod(rk.mod(ids, 1_000_003), 7)  # outside any block
    engines = [FeatureEngine([feature]), FeatureEngine([feature], fused=False)]
    assert [[g["kind"] for g in step] for step in engines[0].plan()] == [
        ["select"],
        ["mod"],
        ["mod"],
    ]
    torch.set_num_threads(2)
    for _ in range(5):
        with rk.overlap():
            outs = [e({"ids": ids})["a"] for e in engines] + [feature({"ids": ids})]
        for out in outs:
            assert torch.equal(out, want)
