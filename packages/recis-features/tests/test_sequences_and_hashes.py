"""Sequences of strings, hashes against their published definitions, casts and column types.

The hash references (MurmurHash64A of Austin Appleby's MurmurHash2, seed 0; FarmHash
``Fingerprint64``, i.e. ``farmhashna::Hash64``; MurmurHash3's ``fmix64``) are the scalar
pure-Python ones of recis-kernels' tests, written from the published algorithms independently of
the library's implementations.
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from conftest import assert_same, ragged, rows_of
from hypothesis import given, settings
from hypothesis import strategies as st

from recis_features import (
    Feature,
    FeatureEngine,
    FeatureInputError,
    FeatureTypeError,
    SequenceTruncate,
    SerializationError,
)
from recis_kernels import RaggedTensor

SETTINGS = settings(max_examples=30, deadline=None)
M64 = (1 << 64) - 1

# -- reference hashes ----------------------------------------------------------------------------
# The pure-Python FarmHash Fingerprint64, MurmurHash64A and fmix64 written from the published
# algorithms for recis-kernels' tests (this monorepo's one copy of them).


_REFERENCE = Path(__file__).resolve().parents[2] / "recis-kernels" / "tests" / "hash_reference.py"
if not _REFERENCE.is_file():  # the package's sdist unpacked alone
    pytest.skip(
        f"the reference hashes are read from the monorepo's {_REFERENCE.name} "
        "(packages/recis-kernels/tests); run these tests from a checkout",
        allow_module_level=True,
    )


def _load_hash_reference() -> ModuleType:
    path = _REFERENCE
    spec = importlib.util.spec_from_file_location("recis_hash_reference", path)
    assert spec is not None, path
    assert spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_hashes = _load_hash_reference()
farm64, fmix64 = _hashes.farm64, _hashes.fmix64


def murmur64a(data: bytes) -> int:
    """MurmurHash64A, seed 0, as an unsigned 64-bit integer."""
    return _hashes.murmur64a(data)


def as_int64(h: int) -> int:
    return h - (1 << 64) if h >> 63 else h


REFERENCE = {"farm": farm64, "murmur": murmur64a}
# Every length class of both hashes (0..140 bytes covers FarmHash's 0-16, 17-32, 33-64 and the
# 64-byte loop with 1 to 64 bytes left), non-ASCII text, NUL bytes, and long inputs.
STRINGS: list[bytes] = [
    b"",
    b"\x00",
    b"a\x00b",
    b"\x00" * 9,
    "héllo wörld".encode(),
    "中文 😀".encode(),
    bytes(range(256)),
    bytes(range(256)) * 17,
] + [bytes((7 * i + j) % 256 for j in range(i)) for i in range(1, 141)]


def test_reference_hashes_match_published_values() -> None:
    # Fixed points of the definitions: FarmHash of "" is k2; MurmurHash64A of "" is 0.
    assert farm64(b"") == _hashes.K2
    assert murmur64a(b"") == 0


@pytest.mark.parametrize("algorithm", ["farm", "murmur"])
@pytest.mark.parametrize("buckets", [0, 1, 97, 2**40 + 7, 2**63 - 1])
def test_hash_matches_the_published_definition(algorithm: str, buckets: int) -> None:
    ref = REFERENCE[algorithm]
    expected = [as_int64(ref(s)) if buckets == 0 else ref(s) % buckets for s in STRINGS]
    offsets = torch.tensor([0, *map(len, STRINGS)]).cumsum(0)
    as_bytes = RaggedTensor(torch.tensor(list(b"".join(STRINGS)), dtype=torch.uint8), [offsets])
    feature = Feature("h").select("s").hash(algorithm, buckets)
    other = Feature("o").select("s").hash("murmur" if algorithm == "farm" else "farm", 3)
    for column in (STRINGS, as_bytes):
        assert feature({"s": column}).tolist() == expected
        fused = FeatureEngine([feature, other])({"s": column})
        assert fused["h"].dtype == torch.int64
        assert fused["h"].tolist() == expected


def test_hash_of_text_is_the_hash_of_its_utf8_bytes() -> None:
    text = ["", "é", "日本語", "a\x00", "😀" * 30]
    out = Feature("h").select("s").hash("farm")({"s": text})
    assert out.tolist() == [as_int64(farm64(t.encode())) for t in text]


# -- multi_hash and cross ------------------------------------------------------------------------


def test_multi_hash_matches_its_definition() -> None:
    ids = [0, 1, -1, 2**63 - 1, -(2**63), 123456789]
    buckets = [7, 0, 2**63 - 1, 1]
    expected = []
    for x in ids:
        row = []
        for k, b in enumerate(buckets):
            h = fmix64((x + (k + 1) * 0x9E3779B97F4A7C15) & M64)
            row.append(as_int64(h) if b == 0 else h % b)
        expected.append(row)
    feature = Feature("m").select("x").multi_hash(buckets)
    for fused in (True, False):
        engine = FeatureEngine([feature, Feature("n").select("x").multi_hash([3])], fused=fused)
        out = engine({"x": torch.tensor(ids)})["m"]
        assert out.dtype == torch.int64
        assert out.tolist() == expected


def _cross_rows(a: list[list[int]], b: list[list[int]]) -> list[list[int]]:
    out = []
    for ra, rb in zip(a, b, strict=True):
        out.append(
            [
                as_int64(
                    murmur64a((x & M64).to_bytes(8, "little") + (y & M64).to_bytes(8, "little"))
                )
                for x in dict.fromkeys(ra)
                for y in dict.fromkeys(rb)
            ]
        )
    return out


def test_cross_matches_murmur_of_the_two_ids() -> None:
    a = [[1, 2, 1], [], [5], [-1, 2**63 - 1]]
    b = [[7, 8], [3], [6, 6], [-(2**63)]]
    dense = torch.tensor([4, -5, 6, 0], dtype=torch.int32)
    batch = {"a": ragged(a, weights=True), "b": ragged(b), "d": dense}
    features = [
        Feature("ab").select_fields(["a", "b"]).cross(),
        Feature("ad").select_fields(["a", "d"]).cross(),
        Feature("db").select_fields(["d", "b"]).cross(),
    ]
    for fused in (True, False):
        out = FeatureEngine(features, fused=fused)(batch)
        assert rows_of(out["ab"]) == _cross_rows(a, b)
        assert rows_of(out["ad"]) == _cross_rows(a, [[x] for x in dense.tolist()])
        assert rows_of(out["db"]) == _cross_rows([[x] for x in dense.tolist()], b)
        # Weights of the first occurrences of ``a`` (1, 2, -, 4, 5, 6), times 1 for ``d``.
        assert out["ad"].weights.tolist() == [1.0, 2.0, 4.0, 5.0, 6.0]
        assert out["db"].weights is None


# -- sequences of strings ------------------------------------------------------------------------


def _string_rows(rows: list[list[bytes]]) -> RaggedTensor:
    """A list<string> column as recis-io gives it: bytes, string offsets, byte offsets."""
    words = [w for row in rows for w in row]
    outer = torch.tensor([0, *map(len, rows)]).cumsum(0)
    inner = torch.tensor([0, *map(len, words)]).cumsum(0)
    data = torch.tensor(list(b"".join(words)), dtype=torch.uint8)
    return RaggedTensor(data, [outer, inner])


def _strings_of(r: RaggedTensor) -> list[list[bytes]]:
    outer, inner = (o.tolist() for o in r.offsets)
    data = bytes(r.values.tolist())
    words = [data[a:b] for a, b in itertools.pairwise(inner)]
    return [words[a:b] for a, b in itertools.pairwise(outer)]


def _kept(rows: list[list], length: int, side: str) -> list[list]:
    return [row[:length] if side == "head" else row[max(len(row) - length, 0) :] for row in rows]


WORDS = st.lists(st.lists(st.binary(max_size=5), max_size=5), max_size=6)


@SETTINGS
@given(rows=WORDS, length=st.integers(0, 6), side=st.sampled_from(["head", "tail"]))
def test_truncate_keeps_whole_strings_and_never_pads(
    rows: list[list[bytes]], length: int, side: str
) -> None:
    out = SequenceTruncate(length, side).apply(_string_rows(rows))
    assert out.values.dtype == torch.uint8
    assert _strings_of(out) == _kept(rows, length, side)
    hashed = (
        Feature("h").select("s").truncate(length, side).hash("murmur")({"s": _string_rows(rows)})
    )
    assert rows_of(hashed) == [
        [as_int64(murmur64a(w)) for w in row] for row in _kept(rows, length, side)
    ]


@SETTINGS
@given(
    words=WORDS,
    ids=st.lists(st.lists(st.integers(-9, 9), max_size=5), max_size=6),
    lengths=st.lists(st.integers(0, 4), min_size=4, max_size=4),
    sides=st.lists(st.sampled_from(["head", "tail"]), min_size=4, max_size=4),
)
def test_fused_truncate_of_strings_and_ids_equals_unfused(
    words: list[list[bytes]], ids: list[list[int]], lengths: list[int], sides: list[str]
) -> None:
    rows = max(len(words), len(ids))
    words += [[]] * (rows - len(words))
    ids += [[]] * (rows - len(ids))
    batch = {"w": _string_rows(words), "i": ragged(ids)}
    features = [
        Feature("w0").select("w").truncate(lengths[0], sides[0]),
        Feature("w1").select("w").truncate(lengths[1], sides[1]).hash("farm", 1000),
        Feature("i0").select("i").truncate(lengths[2], sides[2]),
        Feature("i1").select("i").truncate(lengths[3], sides[3]),
    ]
    fused = FeatureEngine(features, passthrough=False)(batch)
    unfused = FeatureEngine(features, passthrough=False, fused=False)(batch)
    for f in features:
        assert_same(fused[f.name], unfused[f.name])
    assert _strings_of(fused["w0"]) == _kept(words, lengths[0], sides[0])
    assert rows_of(fused["w1"]) == [
        [farm64(w) % 1000 for w in row] for row in _kept(words, lengths[1], sides[1])
    ]
    assert rows_of(fused["i0"]) == _kept(ids, lengths[2], sides[2])


def test_truncate_of_lists_of_lists_of_strings_pads_with_empty_lists_only() -> None:
    # rows: [[["a", "bb"], ["c"]], [], [[""], ["dd", "e"], ["f"]]]
    words = [b"a", b"bb", b"c", b"", b"dd", b"e", b"f"]
    value = RaggedTensor(
        torch.tensor(list(b"".join(words)), dtype=torch.uint8),
        [
            torch.tensor([0, 2, 2, 5]),
            torch.tensor([0, 2, 3, 4, 6, 7]),
            torch.tensor([0, *map(len, words)]).cumsum(0),
        ],
    )
    features = [
        Feature("t").select("x").truncate(2, "tail", levels=3),
        Feature("u").select("x").truncate(1, levels=3).hash("murmur"),
    ]
    for fused in (True, False):
        out = FeatureEngine(features, fused=fused)({"x": value})
        assert [o.tolist() for o in out["t"].offsets] == [
            [0, 2, 4, 6],
            [0, 2, 3, 3, 3, 5, 6],
            [0, 1, 3, 4, 6, 7, 8],
        ]
        assert bytes(out["t"].values.tolist()) == b"abbcddef"
        # Row 1 gets one empty list (no ids); row 2 keeps its real empty string.
        assert [o.tolist() for o in out["u"].offsets] == [[0, 1, 2, 3], [0, 2, 2, 3]]
        assert out["u"].values.tolist() == [as_int64(murmur64a(w)) for w in (b"a", b"bb", b"")]


@pytest.mark.parametrize(
    "column",
    [
        ["ab", "cde"],
        RaggedTensor(torch.tensor(list(b"abcde"), dtype=torch.uint8), [torch.tensor([0, 2, 5])]),
    ],
)
def test_truncating_a_string_column_with_one_string_per_row_raises(column: object) -> None:
    feature = Feature("city").select("city").truncate(1)
    found = (
        "strings (list of 2)"
        if isinstance(column, list)
        else "ragged uint8 with 1 offset level(s) (strings)"
    )
    message = (
        "feature 'city': op truncate (step 1) expects a sequence of strings per row (ragged "
        "bytes with 2 offset levels), not one string per row: truncate keeps whole strings and "
        f"never cuts one, found {found}"
    )
    for run in (feature, FeatureEngine([feature]), FeatureEngine([feature], fused=False)):
        with pytest.raises(FeatureTypeError) as info:
            run({"city": column})
        assert str(info.value) == message


def test_truncate_levels_3_on_a_list_of_strings_raises() -> None:
    feature = Feature("w").select("w").truncate(2, levels=3)
    with pytest.raises(FeatureTypeError) as info:
        feature({"w": _string_rows([[b"a", b"b"]])})
    assert str(info.value) == (
        "feature 'w': op truncate (step 1) expects rows of lists of lists of strings (ragged "
        "bytes with 3 offset levels), found ragged uint8 with 2 offset level(s) (strings)"
    )


def test_truncate_and_hash_of_recis_io_string_columns(tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    recis_io = pytest.importorskip("recis_io")
    lists = [["a", "bb", "ccc"], [], ["d"], ["", "é", "😀", "x" * 70]]
    ids = [[1, 2, 3], [], [4], [5, 6]]
    table = pa.table(
        {
            "words": pa.array(lists, pa.list_(pa.string())),
            "ids": pa.array(ids, pa.list_(pa.int64())),
            "city": pa.array(["hz", "bj", "", "sh"], pa.string()),
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    (batch,) = list(recis_io.Dataset(tmp_path / "t.parquet", batch_size=8))
    features = [
        Feature("w").select("words").truncate(2, "tail").hash("farm", 1000),
        Feature("w1").select("words").truncate(1).hash("murmur"),
        Feature("i").select("ids").truncate(1, "tail"),
    ]
    for fused in (True, False):
        out = FeatureEngine(features, fused=fused, passthrough=False)(batch)
        assert rows_of(out["w"]) == [
            [farm64(w.encode()) % 1000 for w in row] for row in _kept(lists, 2, "tail")
        ]
        assert rows_of(out["w1"]) == [
            [as_int64(murmur64a(w.encode())) for w in row] for row in _kept(lists, 1, "head")
        ]
        assert rows_of(out["i"]) == _kept(ids, 1, "tail")
    with pytest.raises(FeatureTypeError, match="not one string per row"):
        FeatureEngine([Feature("c").select("city").truncate(1)])(batch)


# -- select(dtype=...) casts ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "dtype", "shown"),
    [
        (torch.tensor([1.0, 1.5]), "int64", "1.5"),
        (torch.tensor([1.0, float("nan")]), "int64", "nan"),
        (torch.tensor([1.0, 1e19], dtype=torch.float64), "int64", "1e+19"),
        (torch.tensor([5, 2**40 + 3]), "int32", "1099511627779"),
        # Wraps to int32 -1 and back to the same uint32: only the sign tells.
        (torch.tensor([5, 2**32 - 1], dtype=torch.uint32), "int32", "4294967295"),
        (torch.tensor([5, 2**31], dtype=torch.uint32), "int32", "2147483648"),
    ],
)
def test_a_cast_to_integers_that_loses_values_raises(
    values: torch.Tensor, dtype: str, shown: str
) -> None:
    feature = Feature("n").select("x", dtype).mod(1000)
    source = str(values.dtype).removeprefix("torch.")
    message = (
        f"feature 'n': op select (step 0): column 'x' holds {source} values that {dtype} cannot "
        f"hold exactly (such as {shown}); a cast to integers never truncates, rounds or wraps"
    )
    for run in (feature, FeatureEngine([feature])):
        with pytest.raises(FeatureInputError) as info:
            run({"x": values})
        assert str(info.value) == message
    ragged_column = RaggedTensor(values, [torch.tensor([0, 2])])
    with pytest.raises(FeatureInputError, match="cannot hold exactly"):
        feature({"x": ragged_column})


@pytest.mark.parametrize(
    ("values", "dtype", "shown"),
    [
        (torch.tensor([1.0, 70000.0]), "float16", "70000.0"),
        (torch.tensor([1, 70000]), "float16", "70000"),
        (torch.tensor([1.0, -1e300], dtype=torch.float64), "float32", "-1e+300"),
        (torch.tensor([1.0, 1e300], dtype=torch.float64), "bfloat16", "1e+300"),
    ],
)
def test_a_cast_to_floats_that_overflows_raises(
    values: torch.Tensor, dtype: str, shown: str
) -> None:
    feature = Feature("n").select("x", dtype)
    source = str(values.dtype).removeprefix("torch.")
    limit = torch.finfo(getattr(torch, dtype)).max
    message = (
        f"feature 'n': op select (step 0): column 'x' holds {source} values beyond the range "
        f"of {dtype} (such as {shown}; it spans ±{limit}); a cast to floats rounds but never "
        "overflows to inf"
    )
    for run in (feature, FeatureEngine([feature])):
        with pytest.raises(FeatureInputError) as info:
            run({"x": values})
        assert str(info.value) == message
    # Infinities and NaNs are kept: only a finite value turning into inf is refused.
    kept = Feature("k").select("x", dtype)({"x": torch.tensor([float("inf"), float("nan"), 2.0])})
    assert kept.isinf().tolist() == [True, False, False]
    assert kept.isnan().tolist() == [False, True, False]


def test_exact_casts_to_integers_and_casts_to_floats_pass() -> None:
    assert Feature("a").select("x", "int64")(
        {"x": torch.tensor([1.0, -3.0, 2.0**40])}
    ).tolist() == [
        1,
        -3,
        2**40,
    ]
    assert (
        Feature("a").select("x", "int32")({"x": torch.tensor([5, -(2**31)])}).dtype == torch.int32
    )
    # uint64 ids keep their 64 bits as int64, as mod and hash read them.
    out = Feature("a").select("x", "int64").mod(10)({"x": np.array([2**64 - 1], dtype=np.uint64)})
    assert out.tolist() == [(2**64 - 1) % 10]
    # A cast to floats rounds, as documented.
    out = Feature("a").select("x", "float32")({"x": torch.tensor([2**40 + 1])})
    assert out.dtype == torch.float32
    assert out.tolist() == [2.0**40]


# -- column types --------------------------------------------------------------------------------


def test_read_only_numpy_columns_are_used_without_a_warning() -> None:
    array = np.arange(5, dtype=np.int64)
    array.flags.writeable = False
    # pytest turns warnings into errors here (filterwarnings = error).
    out = FeatureEngine([Feature("m").select("x").mod(3)])({"x": array})
    assert out["m"].tolist() == [0, 1, 2, 0, 1]


class _Ragged:
    """A ragged column as a reader hands it: ``.values`` and ``.offsets`` NumPy arrays."""

    def __init__(self, values: np.ndarray, offsets: object) -> None:
        self.values, self.offsets = values, offsets


@pytest.mark.parametrize(
    ("column", "message"),
    [
        (
            np.arange(4)[::-1],
            "feature 'm': column 'x' is a NumPy array torch cannot share (dtype int64, strides "
            "(-8,)): it needs a numeric or bool dtype in native byte order and no negative "
            "strides; pass np.ascontiguousarray(column, dtype=...)",
        ),
        (
            np.arange(4, dtype=">i8"),
            "feature 'm': column 'x' is a NumPy array torch cannot share (dtype >i8, strides "
            "(8,)): it needs a numeric or bool dtype in native byte order and no negative "
            "strides; pass np.ascontiguousarray(column, dtype=...)",
        ),
        (
            _Ragged(np.arange(4)[::-1], np.array([0, 1, 4])),
            "feature 'm': column 'x' is a NumPy array torch cannot share (dtype int64, strides "
            "(-8,)): it needs a numeric or bool dtype in native byte order and no negative "
            "strides; pass np.ascontiguousarray(column, dtype=...)",
        ),
        (
            _Ragged(np.arange(4), [np.array([0, 1, 4], dtype=">i8")]),
            "feature 'm': column 'x' is a NumPy array torch cannot share (dtype >i8, strides "
            "(8,)): it needs a numeric or bool dtype in native byte order and no negative "
            "strides; pass np.ascontiguousarray(column, dtype=...)",
        ),
        (
            np.int64(3),
            "feature 'm': column 'x' is a single NumPy int64, expected an array with one value "
            "per row",
        ),
        (
            [1, 2],
            "feature 'm': column 'x' is a list whose item 0 is int, expected strings (str or "
            "bytes) only; numbers go in a tensor or NumPy array",
        ),
        (
            ["a", None],
            "feature 'm': column 'x' is a list whose item 1 is NoneType, expected strings (str "
            "or bytes) only; numbers go in a tensor or NumPy array",
        ),
    ],
)
def test_unusable_columns_raise_naming_the_feature_and_column(column: object, message: str) -> None:
    engine = FeatureEngine([Feature("m").select("x").mod(3)])
    with pytest.raises(FeatureTypeError) as info:
        engine({"x": column})
    assert str(info.value) == message


# -- lambda and configs --------------------------------------------------------------------------


def test_a_lambda_is_refused_both_ways_by_configs() -> None:
    feature = Feature("x").select("x").map(abs)
    with pytest.raises(SerializationError, match=r"op lambda \(abs\) cannot be serialized"):
        FeatureEngine([feature]).fingerprint()
    config = {"name": "x", "ops": [{"op": "select", "column": "x"}, {"op": "lambda", "fn": "abs"}]}
    with pytest.raises(SerializationError) as info:
        Feature.from_dict(config)
    assert str(info.value) == (
        "feature 'x': op 'lambda' holds a Python function and cannot be built from a config; "
        "subclass Transform with a registered kind instead"
    )


@pytest.mark.usefixtures("torch_threads")
@pytest.mark.parametrize("fused", [True, False])
def test_string_sequences_truncated_beside_another_op_on_two_threads(fused) -> None:
    # Two op kinds in one step run their groups overlapped on two threads, where a large
    # truncation copy finishes in the background: the strings must be gathered after it.
    torch.set_num_threads(2)
    torch.manual_seed(0)
    rows, per_row = 8192, 6  # 49,152 kept positions: a copy of 384 KiB
    outer = torch.arange(rows + 1, dtype=torch.int64) * per_row
    inner = torch.arange(rows * per_row + 1, dtype=torch.int64) * 3
    data = torch.randint(97, 123, (int(inner[-1]),), dtype=torch.uint8)
    batch = {"queries": RaggedTensor(data, [outer, inner]), "user_id": torch.arange(rows)}
    recent = Feature("recent").select("queries").truncate(50, side="tail").hash("farm")
    user = Feature("user").select("user_id").mod(1_000_003)
    engine = FeatureEngine([recent, user], fused=fused)
    expected = recent(batch)
    for _ in range(4):
        got = engine(batch)["recent"]
        assert torch.equal(got.values, expected.values)
        assert torch.equal(got.offsets[0], expected.offsets[0])


@pytest.mark.parametrize(
    "column",
    [
        ["ab", "cde"],
        RaggedTensor(torch.tensor(list(b"abcde"), dtype=torch.uint8), [torch.tensor([0, 2, 5])]),
    ],
)
def test_an_id_op_on_strings_says_to_hash_them_first(column: object) -> None:
    feature = Feature("city").select("city").mod(1000)
    found = (
        "strings (list of 2)"
        if isinstance(column, list)
        else "ragged uint8 with 1 offset level(s) (strings)"
    )
    for run in (feature, FeatureEngine([feature]), FeatureEngine([feature], fused=False)):
        with pytest.raises(FeatureTypeError) as info:
            run({"city": column})
        assert str(info.value) == (
            f"feature 'city': op mod (step 1) expects ids, found {found}; strings become ids "
            "with a hash op first (.hash('farm'))"
        )
