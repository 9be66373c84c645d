"""Config errors, errors naming the feature, float parameters, the fusion registry's limits, and
the guide's examples run as written."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_same

import recis_kernels as rk
from recis_features import (
    Feature,
    FeatureConflictError,
    FeatureDefinitionError,
    FeatureEngine,
    FeatureTypeError,
    Lambda,
    Normalize,
    Op,
    RegistrationError,
    SerializationError,
    op_kinds,
    register_fused,
)
from recis_kernels import RaggedTensor

GUIDE = Path(__file__).resolve().parents[3] / "docs" / "features" / "guide.md"


# -- configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"op": "mod", "n": 0},
            "op 'mod' has bad parameters {'n': 0}: mod: n must be an integer in [1, 2**63), got 0",
        ),
        (
            {"op": "bucketize", "boundaries": [2.0, 1.0]},
            "op 'bucketize' has bad parameters {'boundaries': [2.0, 1.0]}: bucketize: "
            "boundaries must be strictly increasing",
        ),
        (
            {"op": "truncate", "length": 3, "levels": 4},
            "op 'truncate' has bad parameters {'length': 3, 'levels': 4}: truncate: levels must "
            "be 2 or 3, got 4",
        ),
    ],
)
def test_a_config_with_bad_parameter_values_is_a_serialization_error(
    config: dict[str, Any], message: str
) -> None:
    with pytest.raises(SerializationError) as info:
        Op.from_dict(config)
    assert str(info.value) == message
    feature = {"name": "f", "ops": [{"op": "select", "column": "x"}, config]}
    with pytest.raises(SerializationError) as info:
        Feature.from_dict(feature)
    assert str(info.value) == f"feature 'f': {message}"
    with pytest.raises(SerializationError, match=r"^feature 'f': op "):
        FeatureEngine.from_dict({"format": 1, "features": [feature]})


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"format": 1, "passthrough": "false", "features": []},
            "engine config 'passthrough' must be true or false, got 'false'",
        ),
        (
            {"format": 1, "passthrough": 0, "features": []},
            "engine config 'passthrough' must be true or false, got 0",
        ),
        ({"format": 1, "features": "uid"}, "engine config 'features' must be a list, got 'uid'"),
    ],
)
def test_an_engine_config_with_a_malformed_field_is_refused(
    config: dict[str, Any], message: str
) -> None:
    # bool("false") is True: the quoted flag used to keep every column silently.
    with pytest.raises(SerializationError) as info:
        FeatureEngine.from_dict(config)
    assert str(info.value) == message
    assert (
        FeatureEngine.from_dict({"format": 1, "passthrough": False, "features": []})(
            {"label": torch.tensor([1.0])}
        )
        == {}
    )


def test_normalize_parameters_are_floats_so_equal_ops_are_one_op() -> None:
    ints, floats = Normalize(0, 2), Normalize(0.0, 2.0)
    assert ints == floats
    assert ints.to_dict() == {"op": "normalize", "mean": 0.0, "std": 2.0}
    a = Feature("n").select("x").normalize(1, 4)
    b = Feature("n").select("x").normalize(1.0, 4.0)
    assert a.fingerprint() == b.fingerprint()
    # The same transform listed twice (from code and from a config) is computed once.
    engine = FeatureEngine([a, Feature.from_dict(json.loads(json.dumps(b.to_dict())))])
    assert [f.name for f in engine.features] == ["n"]
    x = torch.tensor([1.0, 5.0, float("nan")])
    assert_same(engine({"x": x})["n"], a({"x": x}))
    with pytest.raises(FeatureConflictError):
        FeatureEngine([a, Feature("n").select("x").normalize(1.0, 4.5)])


# -- errors name the feature --------------------------------------------------------------------


def test_an_unsupported_column_type_names_the_feature() -> None:
    feature = Feature("age_bucket").select("age").bucketize([18.0])
    message = (
        "feature 'age_bucket': column 'age' has unsupported type int, expected a tensor, a "
        "ragged column (.values/.offsets), a NumPy array or a list of strings"
    )
    for run in (feature, FeatureEngine([feature])):
        with pytest.raises(FeatureTypeError) as info:
            run({"age": 31})
        assert str(info.value) == message


def test_a_select_cast_of_strings_names_the_feature_and_op() -> None:
    feature = Feature("city_id").select("city", dtype="int64")
    message = (
        "feature 'city_id': op select (step 0): column 'city' holds strings (list of 2), "
        "which cannot be cast to int64"
    )
    for run in (feature, FeatureEngine([feature])):
        with pytest.raises(FeatureTypeError) as info:
            run({"city": ["Hangzhou", "Beijing"]})
        assert str(info.value) == message
    # The same strings as their UTF-8 bytes (the ragged uint8 form): not cast to byte values.
    raw = RaggedTensor(torch.tensor(list(b"HZBJ"), dtype=torch.uint8), torch.tensor([0, 2, 4]))
    for run in (feature, FeatureEngine([feature])):
        with pytest.raises(
            FeatureTypeError, match=r"column 'city' holds ragged uint8 .* cannot be"
        ):
            run({"city": raw})


def test_a_cross_of_a_float_column_says_what_the_pair_held() -> None:
    feature = Feature("ux").select_fields(["uid", "price"]).cross()
    batch = {
        "uid": torch.tensor([1, 2]),
        "price": RaggedTensor(torch.tensor([0.5]), torch.tensor([0, 1, 1])),
    }
    with pytest.raises(FeatureTypeError) as info:
        FeatureEngine([feature])(batch)
    assert str(info.value) == (
        "feature 'ux': op cross (step 1) expects a pair of id columns, found a pair (dense "
        "int64 tensor of shape (2,), ragged float32 with 1 offset level(s))"
    )


# -- the fusion registry ------------------------------------------------------------------------


def test_lambda_and_source_kinds_cannot_be_fused() -> None:
    def fused(ops: Any, values: Any) -> list[Any]:
        return list(values)

    with pytest.raises(RegistrationError, match="'lambda' runs op by op and cannot be fused"):
        register_fused("lambda", fused)
    for kind, cls in (("select", "SelectField"), ("select_fields", "SelectFields")):
        with pytest.raises(RegistrationError) as info:
            register_fused(kind, fused, replace=True)
        assert str(info.value) == (
            f"op kind {kind!r} is a source op ({cls}): sources read columns and are never fused"
        )
    engine = FeatureEngine(
        [Feature(f"f{i}").select("x").then(Lambda(lambda v, i=i: v + i)) for i in range(2)]
    )
    assert engine.plan()[0][0]["fused"] is False
    assert engine.plan()[1] == [
        {"kind": "lambda", "ops": 2, "features": ["f0", "f1"], "fused": False}
    ]


# -- the guide ----------------------------------------------------------------------------------


def _guide_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", GUIDE.read_text(encoding="utf-8"), re.S)


@pytest.mark.skipif(
    not GUIDE.is_file(), reason="docs/features/guide.md is in the monorepo, not in this sdist"
)
def test_the_guide_examples_run_as_written() -> None:
    """The worked example gives the table's values, and the guide's fused clip equals each
    feature's own clip for features of different dtypes in one step."""
    example, engine_block, sequence_block, clip_block = _guide_blocks()
    ns: dict[str, Any] = {}
    exec(example + engine_block, ns)
    exec(sequence_block, ns)
    assert ns["ids"].offsets[0].tolist() == [0, 2, 2, 3]
    assert ns["ids"].values.tolist() == rk.hash_strings(["bb", "ccc", "d"], "farm", 10_000).tolist()
    out, batch = ns["out"], ns["batch"]
    assert out["user"].tolist() == [973020, 350684, 42]
    assert out["item"].tolist() == [7, 7, 8]
    assert out["city"].tolist() == [224, 575, 224]
    assert out["price"].tolist() == [1, 0, 3]
    assert out["clicks"].values.tolist() == [12, 13, 14, 0, 15, 16]
    assert out["clicks"].offsets[0].tolist() == [0, 3, 4, 6]
    assert out["user_x_item"].offsets[0].tolist() == [0, 1, 2, 3]
    assert out["label"] is batch["label"]
    plan = [[(g["kind"], g["features"]) for g in step] for step in ns["engine"].plan()]
    assert plan[1:] == [
        [
            ("mod", ["user", "item"]),
            ("hash", ["city"]),
            ("fill_missing+bucketize", ["price"]),
            ("fill_missing", ["clicks"]),
            ("cross+mod", ["user_x_item"]),
        ],
        [("truncate", ["clicks"])],
        [("mod", ["clicks"])],
    ]

    # The guide registers the op kind "clip" for the whole process: only once.
    if "clip" not in op_kinds():
        exec(clip_block, ns)
    clip = op_kinds()["clip"]
    features = [
        Feature("a").select("a").then(clip(1.5)),
        Feature("b").select("b").then(clip(0.1)),
        Feature("c").select("c").then(clip(2.0)),
    ]
    clip_batch = {
        "a": torch.tensor([-3.0, 0.5, float("nan"), 0.1], dtype=torch.float32),
        "b": torch.tensor([[0.3, -0.05], [0.1, 7.0]], dtype=torch.float64),
        "c": torch.tensor([5.0, -1.0], dtype=torch.float16),
    }
    engine = FeatureEngine(features)
    assert engine.plan()[1][0] == {
        "kind": "clip",
        "ops": 3,
        "features": ["a", "b", "c"],
        "fused": True,
    }
    fused = engine(clip_batch)
    for f in features:
        assert_same(fused[f.name], f(clip_batch))


# -- parameters given as NumPy scalars or tensors -------------------------------------------------


def _numpy_param_features(np_):
    return [
        Feature("m").select("i").mod(np_.int64(7)),
        Feature("h").select("s").hash(buckets=np_.uint32(100)),
        Feature("b")
        .select("x")
        .fill_missing(np_.float32(0.5))
        .bucketize([np_.float32(0.25), np_.float64(1.0)]),
        Feature("t").select("x").bucketize(torch.tensor([0.25, 1.0])),
        Feature("k").select("i").multi_hash(np_.array([10, 20])),
        Feature("q").select("seq").truncate(np_.int32(2), side="tail"),
        Feature("f").select("x").fill_missing(np_.int64(3)),
    ]


def _python_param_features():
    return [
        Feature("m").select("i").mod(7),
        Feature("h").select("s").hash(buckets=100),
        Feature("b").select("x").fill_missing(0.5).bucketize([0.25, 1.0]),
        Feature("t").select("x").bucketize([0.25, 1.0]),
        Feature("k").select("i").multi_hash([10, 20]),
        Feature("q").select("seq").truncate(2, side="tail"),
        Feature("f").select("x").fill_missing(3),
    ]


def test_numpy_scalars_and_tensors_are_accepted_as_parameters() -> None:
    # Vocabulary sizes and boundaries usually come out of NumPy (``arr.max() + 1``,
    # ``np.quantile``) or torch; they are the same ops as their Python numbers: equal
    # fingerprints, equal outputs and the same JSON.
    np_ = pytest.importorskip("numpy")
    ours = FeatureEngine(_numpy_param_features(np_), passthrough=False)
    plain = FeatureEngine(_python_param_features(), passthrough=False)
    assert json.dumps(ours.to_dict()) == json.dumps(plain.to_dict())
    batch = {
        "i": torch.tensor([5, -1, 12]),
        "s": ["a", "bb", ""],
        "x": torch.tensor([float("nan"), 0.3, 2.0]),
        "seq": RaggedTensor(torch.arange(7), [torch.tensor([0, 3, 3, 7])]),
    }
    got, want = ours(batch), plain(batch)
    for name in want:
        assert_same(got[name], want[name])
    assert type(ours.to_dict()["features"][0]["ops"][1]["n"]) is int
    assert type(ours.to_dict()["features"][6]["ops"][1]["value"]) is int


def test_numpy_bools_and_matrices_are_still_refused() -> None:
    np_ = pytest.importorskip("numpy")
    with pytest.raises(FeatureDefinitionError, match=r"mod: n must be an integer"):
        Feature("a").select("x").mod(np_.True_)
    with pytest.raises(FeatureDefinitionError, match=r"fill_missing: value must be a finite"):
        Feature("a").select("x").fill_missing(np_.float32("nan"))
    with pytest.raises(
        FeatureDefinitionError, match=r"bucketize: boundaries must be a 1-d sequence"
    ):
        Feature("a").select("x").bucketize(torch.tensor([[0.5, 1.0]]))


@pytest.mark.parametrize(
    ("ops", "message"),
    [
        ([{"op": "mod", "n": 3}], "feature 'a': must start with a select op, got op mod"),
        (
            [
                {"op": "select", "column": "x", "dtype": "int64"},
                {"op": "bucketize", "boundaries": [1]},
            ],
            "feature 'a': op bucketize (step 1) expects floats, found ids (output of op select)",
        ),
    ],
)
def test_a_config_whose_ops_make_no_feature_is_a_serialization_error(ops, message) -> None:
    for load in (
        lambda: Feature.from_dict({"name": "a", "ops": ops}),
        lambda: FeatureEngine.from_dict({"features": [{"name": "a", "ops": ops}]}),
    ):
        with pytest.raises(SerializationError) as info:
            load()
        assert str(info.value) == message
