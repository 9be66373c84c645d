"""FeatureEngine behaviour: pass-through, sharing, duplicates, conflicts, errors, duck typing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_same, ragged

import recis_kernels as rk
from recis_features import (
    Feature,
    FeatureConflictError,
    FeatureDefinitionError,
    FeatureEngine,
    FeatureInputError,
    FeatureTypeError,
    MissingColumnError,
    SerializationError,
)
from recis_kernels import RaggedTensor


def _batch() -> dict[str, object]:
    return {
        "user_id": torch.tensor([5, -1, 123, 7]),
        "price": torch.tensor([0.5, float("nan"), 3.0, 10.0]),
        "clicks": ragged([[1, 2, 3], [], [4], [5, 6]]),
        "label": torch.tensor([0, 1, 0, 1]),
    }


def test_outputs_match_each_feature_computed_alone(device: torch.device) -> None:
    features = [
        Feature("uid").select("user_id").mod(10),
        Feature("uid_small").select("user_id").mod(3),
        Feature("price").select("price").fill_missing(-1.0).normalize(1.0, 4.0),
        Feature("clicks").select("clicks").mod(4),
    ]
    batch = {
        k: (v.to(device) if isinstance(v, (torch.Tensor, RaggedTensor)) else v)
        for k, v in _batch().items()
    }
    out = FeatureEngine(features)(batch)
    for f in features:
        assert_same(out[f.name], f(batch))
    assert out["uid"].tolist() == [5, 5, 3, 7]  # -1 is 2**64 - 1, whose remainder by 10 is 5
    assert out["price"].tolist() == [-0.125, -0.5, 0.5, 2.25]


def test_unused_columns_pass_through_unchanged_and_can_be_switched_off() -> None:
    batch = _batch()
    features = [Feature("uid").select("user_id").mod(10)]
    out = FeatureEngine(features)(batch)
    assert list(out) == ["uid", "price", "clicks", "label"]
    assert out["price"] is batch["price"]
    assert out["clicks"] is batch["clicks"]
    assert "user_id" not in out
    assert list(FeatureEngine(features, passthrough=False)(batch)) == ["uid"]


def test_identical_duplicates_are_kept_once_and_shared_prefixes_run_once() -> None:
    calls: list[int] = []

    def count(v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return v

    shared = Feature("a").select("user_id").map(count)
    engine = FeatureEngine([shared.mod(10), shared.mod(10), shared.rename("b").mod(7)])
    out = engine(_batch())
    assert len(engine.features) == 2
    assert len(calls) == 1
    assert out["a"].tolist() == [5, 5, 3, 7]
    assert out["b"].tolist() == [5, 1, 4, 0]


def test_plan_groups_each_kind_of_a_step_into_one_call() -> None:
    engine = FeatureEngine(
        [
            Feature("a").select("user_id").mod(10),
            Feature("b").select("user_id").mod(7),
            Feature("c").select("price").normalize(0.0, 1.0),
        ]
    )
    plan = engine.plan()
    assert len(plan) == 2
    assert plan[1] == [
        {"kind": "mod", "ops": 2, "features": ["a", "b"], "fused": True},
        {"kind": "normalize", "ops": 1, "features": ["c"], "fused": False},
    ]
    assert plan[0][0]["kind"] == "select"
    assert plan[0][0]["ops"] == 2  # one select per distinct column


def test_conflicting_definitions_under_one_name_raise() -> None:
    with pytest.raises(FeatureConflictError) as info:
        FeatureEngine([Feature("a").select("x").mod(10), Feature("a").select("x").mod(11)])
    assert str(info.value) == (
        "feature 'a' is defined twice differently: Feature('a').SelectField(column='x', "
        "dtype=None).Mod(n=10) and Feature('a').SelectField(column='x', dtype=None).Mod(n=11)"
    )


def test_feature_named_like_a_pass_through_column_raises() -> None:
    engine = FeatureEngine([Feature("label").select("user_id").mod(10)])
    with pytest.raises(FeatureConflictError) as info:
        engine(_batch())
    assert str(info.value) == (
        "feature 'label' has the name of a pass-through column; rename the feature or build "
        "the engine with passthrough=False"
    )
    out = FeatureEngine([Feature("label").select("user_id").mod(10)], passthrough=False)(_batch())
    assert out["label"].tolist() == [5, 5, 3, 7]


def test_missing_column_raises_with_the_feature_and_the_columns() -> None:
    engine = FeatureEngine([Feature("uid").select("uid_column").mod(10)])
    with pytest.raises(MissingColumnError) as info:
        engine(_batch())
    assert str(info.value) == (
        "feature 'uid': column 'uid_column' is not in the batch (columns: clicks, label, price, "
        "user_id)"
    )
    assert isinstance(info.value, KeyError)


@pytest.mark.parametrize(
    ("feature", "message"),
    [
        (
            Feature("p").select("user_id").bucketize([1.0]),
            "feature 'p': op bucketize (step 1) expects floats, found dense int64 tensor of "
            "shape (4,)",
        ),
        (
            Feature("p").select("price").mod(3),
            "feature 'p': op mod (step 1) expects ids, found dense float32 tensor of shape (4,)",
        ),
        (
            Feature("p").select("price").hash("farm"),
            "feature 'p': op hash (step 1) expects strings, found dense float32 tensor of "
            "shape (4,)",
        ),
        (
            Feature("p").select("user_id").truncate(3),
            "feature 'p': op truncate (step 1) expects a ragged value with 1 offset level(s), "
            "found dense int64 tensor of shape (4,)",
        ),
        (
            Feature("p").select("clicks").truncate(3, levels=3),
            "feature 'p': op truncate (step 1) expects a ragged value with 2 offset level(s), "
            "found ragged int64 with 1 offset level(s)",
        ),
        (
            Feature("p").select_fields(["user_id", "price"]).cross(),
            "feature 'p': op cross (step 1) expects a pair of id columns, found a pair (dense "
            "int64 tensor of shape (4,), dense float32 tensor of shape (4,))",
        ),
        (
            Feature("p").select("user_id").fill_missing(0),
            "feature 'p': op fill_missing (step 1) expects dense floats or a one-level ragged "
            "value of ids or floats, found dense int64 tensor of shape (4,)",
        ),
    ],
)
def test_wrong_value_kinds_raise_at_the_first_batch(feature: Feature, message: str) -> None:
    with pytest.raises(FeatureTypeError) as info:
        FeatureEngine([feature])(_batch())
    assert str(info.value) == message
    with pytest.raises(FeatureTypeError) as info:
        feature(_batch())
    assert str(info.value) == message


def test_each_batch_is_checked_after_good_ones() -> None:
    # The engine remembers the dtypes a group's ops accepted; a later batch of another dtype is
    # still checked, on either path, as are the fill of a fill+bucketize group and a bad fill.
    features = [
        Feature("m").select("x").mod(7),
        Feature("b").select("y").fill_missing(5.0).bucketize([1.0]),
        Feature("f").select("z").fill_missing(1e6),
        Feature("g").select("w").fill_missing(1e6).bucketize([1.0]),
        Feature("r").select("s").mod(5),
    ]
    good = {
        "s": RaggedTensor(torch.tensor([6, 7, 8]), torch.tensor([0, 2, 3])),
        "x": torch.tensor([3, 9]),
        "y": torch.tensor([0.5, float("nan")]),
        "w": torch.tensor([0.5, 2.0]),
        "z": torch.tensor([float("nan"), 2.0]),
    }
    for fused in (True, False):
        engine = FeatureEngine(features, fused=fused)
        for _ in range(2):
            out = engine(good)
            assert out["m"].tolist() == [3, 2]
            assert out["b"].tolist() == [0, 1]  # NaN filled with 5.0: above the boundary
        with pytest.raises(FeatureTypeError, match=r"feature 'm': op mod \(step 1\) expects"):
            engine({**good, "x": torch.tensor([1.5, 2.0])})
        with pytest.raises(FeatureTypeError, match=r"feature 'b': op fill_missing \(step 1\)"):
            engine({**good, "y": torch.tensor([1, 2])})
        with pytest.raises(FeatureTypeError, match=r"feature 'f': op fill_missing .* float16"):
            engine({**good, "z": torch.tensor([1.0], dtype=torch.float16)})
        floats = RaggedTensor(torch.tensor([6.0, 7.0, 8.0]), torch.tensor([0, 2, 3]))
        with pytest.raises(FeatureTypeError, match=r"feature 'r': op mod \(step 1\) expects"):
            engine({**good, "s": floats})
        # float16 suits the fill of 'b' (5.0), not that of 'g' (1e6, beyond float16's range).
        half = {c: good[c].half() for c in ("y", "w")}
        with pytest.raises(FeatureTypeError, match=r"feature 'g': op fill_missing .* float16"):
            engine({**good, **half})


def test_a_mapped_value_is_checked_when_the_batch_runs() -> None:
    # What a function returns is unknown when the feature is built: the next op checks it.
    pair = Feature("c").select_fields(["user_id", "label"]).map(lambda p: (p[0] % 10, p[1]))
    direct = Feature("d").select_fields(["user_id", "label"]).cross()
    batch = {"user_id": torch.tensor([15, 7]), "label": torch.tensor([0, 1])}
    for fused in (True, False):
        out = FeatureEngine([pair.cross(), direct], fused=fused)(batch)
        expected = FeatureEngine([direct])({**batch, "user_id": torch.tensor([5, 7])})["d"]
        assert_same(out["c"], expected)
    wrong = Feature("w").select_fields(["user_id", "label"]).map(lambda p: p[0]).cross()
    with pytest.raises(FeatureTypeError) as info:
        FeatureEngine([wrong])(batch)
    assert str(info.value) == (
        "feature 'w': op cross (step 2) expects a pair of id columns, found dense int64 tensor "
        "of shape (2,)"
    )


@pytest.mark.parametrize("flag", ["passthrough", "fused"])
def test_engine_switches_must_be_bools(flag: str) -> None:
    # "false" from a hand-written config is truthy: it must not silently mean True.
    with pytest.raises(FeatureDefinitionError) as info:
        FeatureEngine([Feature("a").select("x").mod(3)], **{flag: "false"})  # type: ignore[arg-type]
    assert str(info.value) == f"FeatureEngine: {flag} must be True or False, got 'false' (str)"


def test_unsupported_column_type_raises() -> None:
    engine = FeatureEngine([Feature("a").select("x").mod(3)])
    with pytest.raises(FeatureTypeError) as info:
        engine({"x": {1: 2}})
    assert str(info.value) == (
        "feature 'a': column 'x' has unsupported type dict, expected a tensor, a ragged column "
        "(.values/.offsets), a NumPy array or a list of strings"
    )


def test_incomplete_features_are_rejected_by_the_engine() -> None:
    with pytest.raises(FeatureDefinitionError, match="feature 'a': has no ops"):
        FeatureEngine([Feature("a")])
    with pytest.raises(FeatureDefinitionError, match="engine features must be Feature objects"):
        FeatureEngine(["a"])  # type: ignore[list-item]


class _IoColumn:
    """What a recis-io ragged column looks like to this package: values and offsets."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray) -> None:
        self.values = values
        self.offsets = offsets


def test_duck_typed_ragged_and_numpy_columns_are_used_without_copying() -> None:
    values = np.array([3, 4, 5, 6], dtype=np.int64)
    col = _IoColumn(values, np.array([0, 2, 2, 4], dtype=np.int64))
    dense = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    engine = FeatureEngine(
        [
            Feature("seq").select("seq").map(lambda r: r),
            Feature("x").select("x").map(lambda t: t),
        ]
    )
    out = engine({"seq": col, "x": dense})
    assert isinstance(out["seq"], RaggedTensor)
    assert out["seq"].values.data_ptr() == values.ctypes.data
    assert out["x"].data_ptr() == dense.ctypes.data
    assert out["seq"].offsets[0].tolist() == [0, 2, 2, 4]


class _IoRagged:
    """A recis-io ``Ragged``: tensors, offsets as a tuple; strings as their UTF-8 bytes."""

    def __init__(self, values: torch.Tensor, offsets: tuple[torch.Tensor, ...]) -> None:
        self.values = values
        self.offsets = offsets


def test_recis_io_string_and_nested_columns() -> None:
    words = _IoRagged(torch.tensor(list(b"abcd"), dtype=torch.uint8), (torch.tensor([0, 2, 2, 4]),))
    lists = _IoRagged(
        torch.tensor([1, 2, 3, 4]), (torch.tensor([0, 2, 3]), torch.tensor([0, 1, 3, 4]))
    )
    engine = FeatureEngine(
        [
            Feature("w").select("words").hash("murmur", buckets=10),
            Feature("l").select("lists").truncate(1, levels=3),
        ]
    )
    out = engine({"words": words, "lists": lists})
    expected = [(h % 2**64) % 10 for h in rk.hash_strings(["ab", "", "cd"], "murmur").tolist()]
    assert out["w"].tolist() == expected
    assert out["l"].offsets[0].tolist() == [0, 1, 2]
    assert out["l"].offsets[1].tolist() == [0, 1, 2]
    assert out["l"].values.tolist() == [1, 4]


def test_empty_batch() -> None:
    engine = FeatureEngine(
        [
            Feature("a").select("ids").mod(10),
            Feature("b").select("seq").fill_missing(0).mod(3),
        ]
    )
    out = engine({"ids": torch.zeros(0, dtype=torch.int64), "seq": ragged([])})
    assert out["a"].shape == (0,)
    assert len(out["b"]) == 0


def test_engine_round_trips_through_json_and_keeps_its_fingerprint() -> None:
    engine = FeatureEngine(
        [
            Feature("b").select("price").log1p().bucketize([0.1, 1.0]),
            Feature("a").select("user_id").mod(10),
        ],
        passthrough=False,
    )
    data = json.loads(json.dumps(engine.to_dict()))
    restored = FeatureEngine.from_dict(data)
    assert restored.features == engine.features
    assert restored.passthrough is False
    assert restored.fingerprint() == engine.fingerprint()
    reordered = FeatureEngine(list(reversed(engine.features)))
    assert reordered.fingerprint() == engine.fingerprint()
    assert FeatureEngine(engine.features[:1]).fingerprint() != engine.fingerprint()


def test_engine_config_errors() -> None:
    with pytest.raises(SerializationError, match="must be a dict with a 'features' list"):
        FeatureEngine.from_dict({"feature": []})
    with pytest.raises(SerializationError) as info:
        FeatureEngine.from_dict({"format": 9, "features": []})
    assert str(info.value) == "engine config has format 9, this version reads 1"


def _every_op_batch(device: torch.device) -> dict[str, object]:
    words = [b"red", b"", b"blue", b"green"]
    byte_offsets = torch.tensor([0, 3, 3, 7, 12])
    nested = RaggedTensor(
        torch.tensor([1, 2, 3, 4, 5]),
        [torch.tensor([0, 3, 3, 3, 4]), torch.tensor([0, 1, 3, 4, 5])],
    )
    batch = {
        **_batch(),
        "item_id": torch.tensor([[1, 2], [3, 3], [4, 5], [6, 7]]),
        "words": RaggedTensor(
            torch.tensor(list(b"".join(words)), dtype=torch.uint8), [byte_offsets]
        ),
        "weighted": ragged([[1, 1, 2], [3], [], [4]], weights=True),
        "nested": nested,
        # list<string> rows [["red", ""], [], ["blue", "green"], []]
        "phrases": RaggedTensor(
            torch.tensor(list(b"".join(words)), dtype=torch.uint8),
            [torch.tensor([0, 2, 2, 4, 4]), byte_offsets],
        ),
    }
    return {k: v.to(device) for k, v in batch.items()}  # type: ignore[attr-defined]


EVERY_OP = [
    Feature("m").select("user_id").mod(1000),
    Feature("m2").select("item_id").mod(3),
    Feature("b").select("price").fill_missing(0.0).bucketize([0.0, 1.0, 5.0]),
    Feature("n").select("price").normalize(1.0, 2.0).log1p(),
    Feature("h").select("words").hash("farm", buckets=100),
    Feature("h2").select("words").hash("murmur"),
    Feature("x").select_fields(["user_id", "weighted"]).cross().mod(1 << 20),
    Feature("x2").select_fields(["item_id", "clicks"]).cross(),
    Feature("t").select("clicks").truncate(2, side="tail"),
    Feature("t2").select("weighted").fill_missing(0).truncate(1),
    Feature("t3").select("nested").truncate(2, levels=3),
    Feature("t4").select("phrases").truncate(1, side="tail"),
    Feature("t5").select("phrases").truncate(1).hash("murmur", buckets=50),
    Feature("mh").select("weighted").multi_hash([7, 0, 11]),
]


# Features whose values a device's math library computes (log1p): equal across devices to within
# rounding, exactly equal fused and unfused on one device.
LIBM_FEATURES = {"n"}


def test_every_op_fused_matches_unfused_and_the_cpu(device: torch.device) -> None:
    batch = _every_op_batch(device)
    fused = FeatureEngine(EVERY_OP, passthrough=False)(batch)
    unfused = FeatureEngine(EVERY_OP, passthrough=False, fused=False)(batch)
    on_cpu = FeatureEngine(EVERY_OP, passthrough=False, fused=False)(
        _every_op_batch(torch.device("cpu"))
    )
    for f in EVERY_OP:
        assert_same(fused[f.name], unfused[f.name])
        value = fused[f.name]
        assert value.device.type == device.type
        if f.name in LIBM_FEATURES and device.type != "cpu":
            # log1p comes from each device's math library: CUDA's and the CPU's agree to an
            # ulp or two, not bit for bit (torch.log1p alone differs the same way).
            torch.testing.assert_close(
                value.to("cpu"), on_cpu[f.name], rtol=3e-7, atol=0, equal_nan=True
            )
        else:
            assert_same(value.to("cpu"), on_cpu[f.name])
    assert fused["m"].tolist() == [5, (2**64 - 1) % 1000, 123, 7]
    assert fused["t3"].offsets[0].tolist() == [0, 2, 4, 6, 8]
    assert fused["t4"].offsets[0].tolist() == [0, 1, 1, 2, 2]
    assert bytes(fused["t4"].values.tolist()) == b"green"
    assert fused["t5"].offsets[0].tolist() == [0, 1, 1, 2, 2]


def test_casting_strings_raises() -> None:
    engine = FeatureEngine([Feature("c").select("city", dtype="int64").mod(3)])
    with pytest.raises(FeatureTypeError) as info:
        engine({"city": ["a", "b"]})
    assert str(info.value) == (
        "feature 'c': op select (step 0): column 'city' holds strings (list of 2), which "
        "cannot be cast to int64"
    )


def test_engines_pickle_and_deepcopy() -> None:
    import copy
    import pickle

    engine = FeatureEngine(
        [Feature("a").select("user_id").mod(7), Feature("b").select("price").bucketize([1.0])]
    )
    expected = engine(_batch())
    for clone in (pickle.loads(pickle.dumps(engine)), copy.deepcopy(engine)):
        assert clone.fingerprint() == engine.fingerprint()
        got = clone(_batch())
        for name in ("a", "b"):
            assert_same(got[name], expected[name])


class _Column:
    def __init__(self, values: np.ndarray, offsets: np.ndarray) -> None:
        self.values, self.offsets = values, offsets


@pytest.mark.parametrize("fused", [True, False])
def test_data_the_kernels_refuse_is_named_by_feature_and_column(fused: bool) -> None:
    cross = Feature("ux").select_fields(["user_id", "item_id"]).cross()
    with pytest.raises(
        FeatureInputError, match=r"feature 'ux': op cross: .* has 3 rows in a but 2"
    ):
        FeatureEngine([cross], fused=fused)(
            {"user_id": torch.tensor([1, 2, 3]), "item_id": torch.tensor([1, 2])}
        )
    bad = {"clicks": _Column(np.array([1, 2, 3]), np.array([0, 5]))}
    mod = Feature("c").select("clicks").mod(3)
    for run in (FeatureEngine([mod], fused=fused), mod):
        with pytest.raises(FeatureInputError, match="feature 'c': column 'clicks': ragged offsets"):
            run(bad)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (
            {"x": RaggedTensor(torch.ones(2, 2), torch.tensor([0, 2, 2]))},
            "expects a one-level ragged value with one number per element",
        ),
        (
            {"x": torch.tensor([1.0, float("nan")], dtype=torch.float16)},
            r"can hold the fill value 100000\.0",
        ),
        (
            # Ragged bytes are strings, not a ragged value this op fills.
            {"x": RaggedTensor(torch.tensor(list(b"ab"), dtype=torch.uint8), torch.tensor([0, 2]))},
            "expects dense floats or a one-level ragged value of ids or floats, found ragged",
        ),
        (
            {"x": RaggedTensor(torch.tensor([True]), torch.tensor([0, 1, 1]))},
            "expects dense floats or a one-level ragged value of ids or floats, found ragged",
        ),
    ],
)
def test_fill_missing_refuses_values_it_cannot_fill(batch: dict, message: str) -> None:
    feature = Feature("e").select("x").fill_missing(1e5)
    for run in (FeatureEngine([feature]), FeatureEngine([feature], fused=False), feature):
        with pytest.raises(FeatureTypeError, match=message):
            run(batch)


def test_fill_value_must_be_finite_and_ops_a_list() -> None:
    with pytest.raises(FeatureDefinitionError, match="value must be a finite number, got nan"):
        Feature("a").select("x").fill_missing(float("nan"))
    with pytest.raises(SerializationError, match="'ops' must be a list of op configs, got 5"):
        Feature.from_dict({"name": "a", "ops": 5})


@pytest.mark.parametrize("buckets", [[5], [5, 7]])
def test_fused_multi_hash_of_ragged_values_with_a_trailing_dim(buckets: list[int]) -> None:
    col = RaggedTensor(torch.tensor([[1, 2], [3, 4], [5, 6]]), torch.tensor([0, 2, 3]))
    feature = Feature("h").select("pairs").multi_hash(buckets)
    alone = feature({"pairs": col})
    assert alone.values.shape == (3, 2, len(buckets))
    for fused in (True, False):
        got = FeatureEngine([feature], fused=fused)({"pairs": col})["h"]
        assert torch.equal(got.values, alone.values), fused
