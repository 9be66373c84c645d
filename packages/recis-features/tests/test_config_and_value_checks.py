"""Definitions and configs that read the same wherever they run, and values checked for what
they hold: found by adversarial review, each a case that passed silently or raised the wrong
error before."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from recis_features import (
    Feature,
    FeatureDefinitionError,
    FeatureEngine,
    FeatureInputError,
    FeatureTypeError,
    MissingColumnError,
    SerializationError,
)

FEAT = {"name": "a", "ops": [{"op": "select", "column": "x"}, {"op": "mod", "n": 5}]}


def test_an_unordered_set_of_columns_or_numbers_is_refused() -> None:
    # A set crossed its columns in the order of the process's string hashing.
    with pytest.raises(FeatureDefinitionError, match="in cross order, got the unordered set"):
        Feature("ux").select_fields({"user_id", "item_id"})
    with pytest.raises(FeatureDefinitionError, match="boundaries must be an ordered sequence"):
        Feature("b").select("x").bucketize({1.0, 2.0})
    with pytest.raises(FeatureDefinitionError, match="buckets must be an ordered sequence"):
        Feature("m").select("x").multi_hash({7, 11})


def test_a_cross_gives_the_same_ids_and_fingerprint_in_every_process() -> None:
    code = (
        "import json, torch; from recis_features import Feature; "
        "f = Feature('ux').select_fields(['user_id', 'item_id']).cross().mod(1 << 20); "
        "out = f({'user_id': torch.tensor([1, 2]), 'item_id': torch.tensor([3, 4])}).values; "
        "print(json.dumps([out.tolist(), f.fingerprint()]))"
    )
    seen = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        ).stdout
        for seed in (1, 2, 3)
    }
    assert len(seen) == 1


def test_normalize_of_half_floats_rounds_once() -> None:
    # x - mean (70000) overflowed float16 where the result (0.7) fits.
    x = torch.tensor([30000.0, 1.0], dtype=torch.float16)
    got = Feature("n").select("x").normalize(-40000.0, 100000.0)({"x": x})
    want = ((x.double() + 40000.0) / 100000.0).to(torch.float16)
    assert torch.equal(got, want)
    assert got.dtype == torch.float16


def test_engine_configs_raise_serialization_errors_for_bad_features() -> None:
    cases = [
        ([{"name": "a", "ops": []}], "feature 'a': has no ops"),
        (
            [{"name": "a", "ops": [{"op": "select_fields", "columns": ["x", "y"]}]}],
            "feature 'a'",
        ),
        ([FEAT, FEAT | {"ops": [*FEAT["ops"][:1], {"op": "mod", "n": 6}]}], "'a'"),
    ]
    for features, message in cases:
        with pytest.raises(SerializationError, match=message):
            FeatureEngine.from_dict({"features": features})
    with pytest.raises(SerializationError, match="has no ops"):
        Feature.from_dict({"name": "a", "ops": []})


def test_unknown_config_keys_are_refused() -> None:
    with pytest.raises(
        SerializationError, match=r"engine config has unknown key\(s\) \['passthough'\]"
    ):
        FeatureEngine.from_dict({"passthough": False, "features": [FEAT]})
    with pytest.raises(SerializationError, match=r"feature 'a': unknown key\(s\) \['dtype'\]"):
        Feature.from_dict(FEAT | {"dtype": "float32"})
    with pytest.raises(SerializationError, match="engine config has format True"):
        FeatureEngine.from_dict({"format": True, "features": [FEAT]})


def test_configs_of_numpy_strings_are_plain_data() -> None:
    names = np.array(["user_id", "item_id", "u", "float32"])
    engine = FeatureEngine(
        [
            Feature(names[2]).select(names[0], dtype=names[3]),
            Feature("ux").select_fields(list(names[:2])).cross(),
            Feature("h").select("s").hash(np.str_("murmur")),
        ]
    )
    config = engine.to_dict()
    # np.str_ is a str to isinstance, not to yaml.safe_dump (RepresenterError).
    assert _plain(config)
    assert json.loads(json.dumps(config)) == config
    assert FeatureEngine.from_dict(json.loads(json.dumps(config))).fingerprint() == (
        engine.fingerprint()
    )


def _plain(value: object) -> bool:
    """Whether ``value`` holds only the exact types a YAML safe dump writes."""
    if isinstance(value, dict):
        return all(type(k) is str and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return type(value) in (str, int, float, bool, type(None))


def test_a_batch_with_odd_keys_or_of_the_wrong_kind_names_the_problem() -> None:
    engine = FeatureEngine([Feature.from_dict(FEAT)])
    t = torch.tensor([1, 2])
    with pytest.raises(
        MissingColumnError, match=r"column 'x' is not in the batch \(columns: 0, y\)"
    ):
        engine({0: t, "y": t})
    for call in (engine, Feature.from_dict(FEAT)):
        with pytest.raises(FeatureTypeError, match="a batch must be a mapping of column names"):
            call([("x", t)])


def test_a_lambda_returning_a_list_of_numbers_is_not_taken_for_strings() -> None:
    f = Feature("c").select("x").map(lambda v: [1, 2]).hash("farm")
    with pytest.raises(FeatureTypeError, match="a list of 2 holding int"):
        f({"x": torch.tensor([1, 2])})


def test_a_cast_of_uint64_to_int32_never_wraps() -> None:
    x = torch.tensor([-1, -(2**31)], dtype=torch.int64).view(torch.uint64)  # 2**64 - 1, ...
    with pytest.raises(FeatureInputError, match="int32 cannot hold exactly"):
        Feature("u").select("x", dtype="int32")({"x": x})
    # As int64 they keep their bits, as documented.
    got = Feature("u").select("x", dtype="int64")({"x": x})
    assert got.tolist() == [-1, -(2**31)]


def test_a_cast_of_complex_values_to_floats_never_drops_the_imaginary_part() -> None:
    x = torch.tensor([1 + 0j, 3 + 2j])
    with pytest.raises(FeatureInputError, match=r"imaginary part \(such as \(3\+2j\)\)"):
        Feature("c").select("x", dtype="float32")({"x": x})
    with pytest.raises(FeatureInputError, match=r"imaginary part .* which int64 cannot hold"):
        Feature("c").select("x", dtype="int64")({"x": x})
    # Real values cast as the real numbers they are.
    got = Feature("c").select("x", dtype="float64")({"x": torch.tensor([1 + 0j, -2.5 + 0j])})
    assert got.dtype == torch.float64
    assert got.tolist() == [1.0, -2.5]


def test_a_negative_zero_boundary_is_zero() -> None:
    a = Feature("b").select("x").bucketize([-0.0, 1.0])
    b = Feature("b").select("x").bucketize([0.0, 1.0])
    assert a == b
    assert a.fingerprint() == b.fingerprint()
    FeatureEngine([a, b])  # one definition, not a conflict
