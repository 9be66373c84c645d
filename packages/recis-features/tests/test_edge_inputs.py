"""Edge inputs and parameters: signed zero fills, parameters that are not sequences or not
representable, errors of a fused call naming the feature whose data was refused, strings that
are not UTF-8 text, and single numbers given as a cross's columns."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_same

from recis_features import (
    Feature,
    FeatureDefinitionError,
    FeatureEngine,
    FeatureInputError,
    FeatureTypeError,
    Op,
    SequenceTruncate,
    SerializationError,
)

np = pytest.importorskip("numpy")


# -- fill_missing: integers beyond int64 are float fills on every path ---------------------------


@pytest.mark.parametrize("fill", [10**30, 2**64, -(2**63) - 1])
def test_a_fill_beyond_int64_fills_floats_alike_on_every_path(fill: int) -> None:
    # torch takes no integer scalar outside int64/uint64: the per-feature path and the ragged
    # one raised a bare OverflowError where the fused dense pass filled.
    from recis_kernels import RaggedTensor

    nan = float("nan")
    dense = {"x": torch.tensor([nan, 1.0])}
    ragged = {"x": RaggedTensor(torch.tensor([nan, 2.0]), [torch.tensor([0, 0, 2])])}
    feature = Feature("f").select("x").fill_missing(fill)
    other = Feature("g").select("x").fill_missing(3.0)  # a second fill value: packed pass
    want = torch.tensor([float(fill), 1.0])
    assert_same(feature(dense), want)
    for engine in (FeatureEngine([feature]), FeatureEngine([feature], fused=False)):
        assert_same(engine(dense)["f"], want)
    assert_same(FeatureEngine([feature, other])(dense)["f"], want)
    got = FeatureEngine([feature])(ragged)["f"]
    assert_same(got.values, torch.tensor([float(fill), float(fill), 2.0]))
    assert_same(feature(ragged).values, got.values)


def test_a_three_level_truncation_too_long_to_pad_names_the_feature() -> None:
    from recis_kernels import RaggedTensor

    sessions = RaggedTensor(
        torch.arange(3), [torch.tensor([0, 1, 2, 2, 3]), torch.tensor([0, 1, 2, 3])]
    )
    for length in (2**62, 2**63 - 1):
        with pytest.raises(
            FeatureInputError,
            match=r"feature 's': op truncate: .*more than int64 offsets hold",
        ):
            FeatureEngine([Feature("s").select("r").truncate(length, levels=3)])({"r": sessions})


# -- fill_missing: each feature keeps the sign of its own zero ------------------------------------


@pytest.mark.parametrize("order", [(0.0, -0.0), (-0.0, 0.0)])
def test_fused_fill_keeps_the_sign_of_each_features_zero(order: tuple[float, float]) -> None:
    # 0.0 == -0.0, so the fused pass took them for one fill value and gave both features the
    # first one's zero; a later op that tells zeros apart (1 / x, copysign) then differed.
    nan = float("nan")
    features = [
        Feature("a").select("x").fill_missing(order[0]),
        Feature("b").select("y").fill_missing(order[1]),
    ]
    batch = {"x": torch.tensor([nan, 1.0]), "y": torch.tensor([nan, 2.0])}
    out = FeatureEngine(features)(batch)
    for f in features:
        alone = f(batch)
        assert_same(out[f.name], alone)
        assert torch.equal(out[f.name].signbit(), alone.signbit()), f.name
    assert bool(out["a"][0].signbit()) == (str(order[0]) == "-0.0")
    assert bool(out["b"][0].signbit()) == (str(order[1]) == "-0.0")


# -- parameters -------------------------------------------------------------------------------


def test_truncate_levels_is_stored_as_a_python_int() -> None:
    # A NumPy integer passed the ``in (2, 3)`` check and was stored as it was: building an
    # engine (which keys ops by their JSON) raised "Object of type int64 is not JSON serializable".
    feature = Feature("s").select("seq").truncate(np.int64(3), np.str_("tail"), np.int64(2))
    assert feature.to_dict()["ops"][1] == {
        "op": "truncate",
        "length": 3,
        "side": "tail",
        "levels": 2,
    }
    assert type(feature.ops[1].levels) is int
    assert type(feature.ops[1].side) is str
    plain = Feature("s").select("seq").truncate(3, "tail", 2)
    assert FeatureEngine([feature]).fingerprint() == FeatureEngine([plain]).fingerprint()


def test_truncate_levels_must_be_an_integer() -> None:
    # 2.0 == 2 passed and was kept as 2.0: another fingerprint for the same op.
    with pytest.raises(FeatureDefinitionError, match=r"truncate: levels must be 2 or 3, got 2\.0"):
        SequenceTruncate(3, "head", 2.0)  # type: ignore[arg-type]
    with pytest.raises(SerializationError, match=r"levels must be 2 or 3, got 3\.0"):
        Op.from_dict({"op": "truncate", "length": 3, "levels": 3.0})


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda f: f.bucketize(5.0),
            "feature 'f': bucketize: boundaries must be a sequence of numbers, got 5.0",
        ),
        (
            lambda f: f.bucketize(None),
            "feature 'f': bucketize: boundaries must be a sequence of numbers, got None",
        ),
        (
            lambda f: f.bucketize(np.float64(2.5)),
            # numpy 2 prints the scalar as np.float64(2.5), numpy 1 as 2.5
            "feature 'f': bucketize: boundaries must be a sequence of numbers, got "
            f"{np.float64(2.5)!r}",
        ),
        (
            lambda f: f.bucketize(np.array(2.5)),
            "feature 'f': bucketize: boundaries must be a sequence of numbers, got array(2.5)",
        ),
        (
            lambda f: f.multi_hash(1000),
            "feature 'f': multi_hash: buckets must be a sequence of numbers, got 1000",
        ),
        (
            lambda f: f.bucketize(torch.tensor(2.5)),
            "feature 'f': bucketize: boundaries must be a sequence of numbers, got tensor(2.5000)",
        ),
        # A 2-d table of boundaries was taken as one non-number ("must be finite numbers").
        (
            lambda f: f.bucketize(torch.tensor([[1.0, 2.0]])),
            "feature 'f': bucketize: boundaries must be a 1-d sequence of numbers, got a 2-d "
            "Tensor of shape (1, 2)",
        ),
        (
            lambda f: f.bucketize(np.zeros((2, 3))),
            "feature 'f': bucketize: boundaries must be a 1-d sequence of numbers, got a 2-d "
            "ndarray of shape (2, 3)",
        ),
    ],
)
def test_a_single_number_for_a_list_parameter_names_the_feature_and_op(
    build: object, message: str
) -> None:
    # These raised a bare TypeError ("'float' object is not iterable").
    with pytest.raises(FeatureDefinitionError) as info:
        build(Feature("f").select("x"))  # type: ignore[operator]
    assert str(info.value) == message


def test_select_fields_of_none_names_the_feature_and_op() -> None:
    with pytest.raises(FeatureDefinitionError) as info:
        Feature("ux").select_fields(None)  # type: ignore[arg-type]
    assert str(info.value) == (
        "feature 'ux': select_fields: columns must be a list of 2 column names, got None"
    )


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda f: f.bucketize([0.0, 10**400]), r"bucketize: boundaries must be finite numbers"),
        (lambda f: f.normalize(10**400, 1.0), r"normalize: bad mean 1000"),
        (lambda f: f.normalize(0.0, 10**400), r"normalize: std must be a positive finite"),
        (lambda f: f.fill_missing(-(10**400)), r"fill_missing: value must be a finite number"),
    ],
)
def test_an_integer_beyond_float_range_is_a_definition_error(build: object, match: str) -> None:
    # math.isfinite raised OverflowError on such an int (a JSON config can hold one).
    with pytest.raises(FeatureDefinitionError, match=rf"^feature 'f': {match}"):
        build(Feature("f").select("x"))  # type: ignore[operator]


def test_an_integer_beyond_float_range_in_a_config_is_a_serialization_error() -> None:
    config = json.loads('{"op": "bucketize", "boundaries": [1' + "0" * 400 + "]}")
    with pytest.raises(SerializationError, match=r"bucketize: boundaries must be finite numbers"):
        Op.from_dict(config)


@pytest.mark.parametrize("kind", [["mod"], {"op": "mod"}])
def test_an_op_kind_that_is_not_a_string_is_an_unknown_kind(kind: object) -> None:
    # A list or dict kind (a hand-edited YAML) raised "TypeError: unhashable type".
    with pytest.raises(SerializationError, match=r"^unknown op kind .* \(known: bucketize, ") as e:
        Op.from_dict({"op": kind, "n": 3})
    assert "lambda" not in str(e.value)  # never built from a config: not offered
    with pytest.raises(SerializationError, match=r"^feature 'f': unknown op kind"):
        Feature.from_dict({"name": "f", "ops": [{"op": "select", "column": "x"}, {"op": kind}]})


# -- errors of a fused call name the feature whose data was refused ------------------------------


def _cross_batch() -> dict[str, torch.Tensor]:
    return {
        "a": torch.tensor([1, 2]),
        "b": torch.tensor([3, 4]),
        "i": torch.tensor([1, 2, 3]),
        "j": torch.tensor([1, 2]),
    }


@pytest.mark.parametrize("fused", [True, False])
def test_a_refused_cross_names_only_its_feature(fused: bool) -> None:
    # One call crossed both features; its error named both (the good one too) and the failing
    # pair by its index in that call ("pairs[1]"), which the user never sees.
    engine = FeatureEngine(
        [
            Feature("ok").select_fields(["a", "b"]).cross(),
            Feature("bad").select_fields(["i", "j"]).cross(),
            Feature("ok2").select_fields(["b", "a"]).cross(),
        ],
        fused=fused,
    )
    alone = Feature("bad").select_fields(["i", "j"]).cross()
    with pytest.raises(FeatureInputError) as expected:
        alone(_cross_batch())
    with pytest.raises(FeatureInputError) as info:
        engine(_cross_batch())
    assert str(info.value) == str(expected.value)
    assert str(info.value) == (
        "feature 'bad': op cross: feature_cross: pairs[0] has 3 rows in a but 2 in b"
    )


def test_a_refused_op_shared_by_features_names_them_all() -> None:
    engine = FeatureEngine(
        [
            Feature("ok").select_fields(["a", "b"]).cross(),
            Feature("bad").select_fields(["i", "j"]).cross(),
            Feature("bad_mod").select_fields(["i", "j"]).cross().mod(5),
        ]
    )
    with pytest.raises(FeatureInputError, match=r"^features \['bad', 'bad_mod'\]: op cross: "):
        engine(_cross_batch())


# -- strings that are not UTF-8 text ------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
def test_a_str_with_a_lone_surrogate_names_the_feature_and_op(fused: bool) -> None:
    # A str holding a lone surrogate (from a surrogateescape decode) reached the UTF-8 encoder
    # and raised a bare UnicodeEncodeError naming neither feature nor column.
    features = [
        Feature("city").select("city").hash("farm", 100),
        Feature("q").select("q").hash("murmur"),
    ]
    batch = {"city": ["paris", "caf\udce9"], "q": ["a"]}
    message = (
        "feature 'city': op hash: the string 'caf\\udce9' cannot be encoded as UTF-8 "
        "(surrogates not allowed at position 3); pass its bytes instead"
    )
    with pytest.raises(FeatureInputError) as info:
        FeatureEngine(features, fused=fused)(batch)
    assert str(info.value) == message
    with pytest.raises(FeatureInputError) as info:
        features[0](batch)
    assert str(info.value) == message
    ok = FeatureEngine(features, fused=fused)({"city": ["paris", b"caf\xe9"], "q": ["a"]})
    assert ok["city"].shape == (2,)


# -- a cross of single numbers ------------------------------------------------------------------


def test_a_cross_of_zero_dimensional_tensors_is_a_type_error() -> None:
    # A 0-d tensor has no rows: the cross raised IndexError ("tuple index out of range").
    engine = FeatureEngine([Feature("ux").select_fields(["a", "b"]).cross()])
    with pytest.raises(FeatureTypeError) as info:
        engine({"a": torch.tensor(3), "b": torch.tensor([4])})
    assert str(info.value) == (
        "feature 'ux': op cross (step 1) expects a pair of id columns (one or more ids per row, "
        "not a single number), found a pair (dense int64 tensor of shape (), dense int64 tensor "
        "of shape (1,))"
    )


@pytest.mark.parametrize("fused", [True, False])
def test_a_cross_of_ragged_vectors_is_a_type_error(fused: bool) -> None:
    from recis_kernels import RaggedTensor

    # Ragged values of shape (N, 2) passed the type check and the kernel refused them as a
    # data error, in its own words (and in other words fused and alone).
    pairs = RaggedTensor(torch.arange(12).reshape(6, 2), [torch.tensor([0, 2, 2, 6])])
    engine = FeatureEngine([Feature("x").select_fields(["r", "d"]).cross()], fused=fused)
    with pytest.raises(FeatureTypeError) as info:
        engine({"r": pairs, "d": torch.tensor([1, 2, 3])})
    assert str(info.value) == (
        "feature 'x': op cross (step 1) expects a pair of id columns (one id per ragged value, "
        "not vectors), found a pair (ragged int64 with 1 offset level(s), dense int64 tensor "
        "of shape (3,))"
    )


@pytest.mark.parametrize("fused", [True, False])
def test_a_cross_takes_dense_uint8_ids_as_mod_does(fused: bool) -> None:
    # Every op reads a dense uint8 column as ids; the cross refused it as bytes.
    features = [
        Feature("ux").select_fields(["a", "b"]).cross(),
        Feature("am").select("a").mod(7),
    ]
    a, b = torch.tensor([200, 1], dtype=torch.uint8), torch.tensor([[3, 4], [5, 5]])
    out = FeatureEngine(features, fused=fused)({"a": a, "b": b})
    want = FeatureEngine(features, fused=fused)({"a": a.long(), "b": b})
    assert_same(out["ux"], want["ux"])
    assert out["am"].tolist() == [200 % 7, 1]
