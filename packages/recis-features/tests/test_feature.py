"""Feature chaining, static checks, serialization and fingerprints."""

from __future__ import annotations

import hashlib
import json

import pytest

from recis_features import (
    Bucketize,
    Feature,
    FeatureDefinitionError,
    FeatureTypeError,
    Log1p,
    Mod,
    Op,
    SelectField,
    SerializationError,
)


def test_chaining_builds_ops_in_order_and_leaves_the_prefix_unchanged() -> None:
    base = Feature("uid").select("user_id")
    f = base.mod(100).mod(7)
    assert f.ops == (SelectField("user_id"), Mod(100), Mod(7))
    assert base.ops == (SelectField("user_id"),)
    assert f.columns == ("user_id",)
    assert f.name == "uid"


def test_feature_from_ops_equals_chained_feature() -> None:
    chained = Feature("p").select("price").log1p().bucketize([0.5, 1.0])
    built = Feature("p", [SelectField("price"), Log1p(), Bucketize([0.5, 1.0])])
    assert built == chained
    assert hash(built) == hash(chained)
    assert Feature("q", built.ops) != built


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (
            lambda: Feature(""),
            FeatureDefinitionError,
            "feature name must be a non-empty string, got ''",
        ),
        (
            lambda: Feature("a").mod(3),
            FeatureDefinitionError,
            "feature 'a': must start with a select op, got op mod",
        ),
        (
            lambda: Feature("a").select("x").select("y"),
            FeatureDefinitionError,
            "feature 'a': op select (step 1) can only be the first op",
        ),
        (
            lambda: Feature("a").select("x").mod(0),
            FeatureDefinitionError,
            "feature 'a': mod: n must be an integer in [1, 2**63), got 0",
        ),
        (
            lambda: Feature("a").select("x").bucketize([2.0, 1.0]),
            FeatureDefinitionError,
            "feature 'a': bucketize: boundaries must be strictly increasing",
        ),
        (
            lambda: Feature("a").select("x").bucketize([]),
            FeatureDefinitionError,
            "feature 'a': bucketize: boundaries must not be empty",
        ),
        (
            lambda: Feature("a").select("x").bucketize([2**53, 2**53 + 1]),
            FeatureDefinitionError,
            "feature 'a': bucketize: boundaries must be strictly increasing as float64 values, "
            "the type they are compared in; 9007199254740992 and 9007199254740993 are one "
            "float64",
        ),
        (
            lambda: Feature("a").select("x").truncate(2**63),
            FeatureDefinitionError,
            "feature 'a': truncate: length must be an integer in [0, 2**63), got "
            "9223372036854775808",
        ),
        (
            lambda: Feature("a").select("x").hash("md5"),
            FeatureDefinitionError,
            "feature 'a': hash: algorithm must be 'farm' or 'murmur', got 'md5'",
        ),
        (
            lambda: Feature("a").select("x").truncate(5, side="middle"),
            FeatureDefinitionError,
            "feature 'a': truncate: side must be 'head' or 'tail', got 'middle'",
        ),
        (
            lambda: Feature("a").select("x").normalize(0.0, 0.0),
            FeatureDefinitionError,
            "feature 'a': normalize: std must be a positive finite number, got 0.0",
        ),
        (
            lambda: Feature("a").select("x").mod(10).bucketize([1.0]),
            FeatureTypeError,
            "feature 'a': op bucketize (step 2) expects floats, found ids (output of op mod)",
        ),
        (
            lambda: Feature("a").select("x", dtype="float32").mod(10),
            FeatureTypeError,
            "feature 'a': op mod (step 1) expects ids, found floats (output of op select)",
        ),
        (
            lambda: Feature("a").select("x").bucketize([1.0]).hash("farm"),
            FeatureTypeError,
            "feature 'a': op hash (step 2) expects strings, found ids (output of op bucketize)",
        ),
        (
            lambda: Feature("a").select_fields(["x", "y"]).mod(3),
            FeatureTypeError,
            "feature 'a': op mod (step 1) expects ids, found a column pair (output of op "
            "select_fields)",
        ),
        (
            lambda: Feature("a").select("x").cross(),
            FeatureTypeError,
            "feature 'a': op cross (step 1) expects a pair of id columns, found an unknown "
            "column (output of op select)",
        ),
        (
            lambda: Feature("a").select_fields(["x"]),
            FeatureDefinitionError,
            "feature 'a': select_fields: needs exactly 2 columns, got 1",
        ),
    ],
)
def test_bad_definitions_raise_pinned_messages(build, error, message) -> None:
    with pytest.raises(error) as info:
        build()
    assert str(info.value) == message


def test_incomplete_features_are_rejected() -> None:
    with pytest.raises(FeatureDefinitionError, match="has no ops; start with select"):
        Feature("a").check_complete()
    with pytest.raises(FeatureDefinitionError, match="ends with a column pair"):
        Feature("a").select_fields(["x", "y"]).check_complete()


FEATURES = [
    Feature("uid").select("user_id").mod(1000),
    Feature("price").select("price", dtype="float32").fill_missing(0.0).normalize(1.5, 2.0),
    Feature("age").select("age").log1p().bucketize([0.0, 1.5, 3.25]),
    Feature("seq").select("clicks").truncate(20, side="tail", levels=3),
    Feature("cross").select_fields(["user_id", "item_id"]).cross().mod(1 << 20),
    Feature("cat").select("category").hash("murmur", buckets=97),
    Feature("mh").select("item_id").multi_hash([1000, 2000]),
]


@pytest.mark.parametrize("feature", FEATURES, ids=lambda f: f.name)
def test_dict_and_json_round_trip(feature: Feature) -> None:
    data = feature.to_dict()
    restored = Feature.from_dict(json.loads(json.dumps(data)))
    assert restored == feature
    assert restored.fingerprint() == feature.fingerprint()
    assert all(Op.from_dict(op.to_dict()) == op for op in feature.ops)


def test_fingerprint_is_stable_and_sensitive() -> None:
    f = Feature("uid").select("user_id").mod(1000)
    canonical = (
        '{"name":"uid","ops":[{"column":"user_id","dtype":null,"op":"select"},'
        '{"n":1000,"op":"mod"}]}'
    )
    assert f.fingerprint() == hashlib.sha256(canonical.encode()).hexdigest()
    # Pinned: a change here means checkpoints no longer recognize the transforms that made them.
    assert f.fingerprint() == "6a2a94679d0a7d3fd1006e9f5bcc33ad11fe04f8e963709c44d15a39dd1dcce7"
    assert Feature("uid").select("user_id").mod(1001).fingerprint() != f.fingerprint()
    assert Feature("uid2").select("user_id").mod(1000).fingerprint() != f.fingerprint()


def test_lambda_features_refuse_serialization() -> None:
    f = Feature("x").select("a").map(abs)
    with pytest.raises(SerializationError) as info:
        f.to_dict()
    assert str(info.value) == (
        "feature 'x': op lambda (abs) cannot be serialized; use a registered op"
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "x"}, "feature config must have 'name' and 'ops', got {'name': 'x'}"),
        (
            {"name": "x", "ops": [{"op": "nope"}]},
            "feature 'x': unknown op kind 'nope' (known: ",
        ),
        (
            {"name": "x", "ops": [{"op": "select", "column": "a", "colour": 1}]},
            "feature 'x': op 'select' has bad parameters {'column': 'a', 'colour': 1}: ",
        ),
        ({"name": "x", "ops": [{"column": "a"}]}, "feature 'x': op config must be a dict with"),
    ],
)
def test_bad_configs_raise(data, message) -> None:
    with pytest.raises(SerializationError) as info:
        Feature.from_dict(data)
    assert str(info.value).startswith(message)
