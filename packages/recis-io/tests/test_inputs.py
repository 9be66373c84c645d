"""Which files a data set is made of, and files whose column types differ.

Directories and globs skip what data-writing jobs leave next to their output (``_SUCCESS``,
``_temporary/``, ``.crc`` and other hidden names); an explicit ``dtype`` reads numbers stored
as different types in different files (Parquet or ORC) as one output type.
"""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from recis_io import Column, Dataset, SchemaError
from recis_io.exceptions import CorruptFileError, DataFileNotFoundError, InvalidArgumentError

from .conftest import write


def ids(start: int, stop: int, typ: pa.DataType | None = None) -> pa.Table:
    return pa.table({"id": pa.array(range(start, stop), typ or pa.int64())})


def read_ids(ds: Dataset) -> list[int]:
    return [v for b in ds for v in b["id"].tolist()]


@pytest.fixture
def job_output(tmp_path: Path) -> Path:
    """A directory as a Spark-like job leaves it: data files next to markers and leftovers."""
    out = tmp_path / "out"
    (out / "day=1").mkdir(parents=True)
    write(ids(0, 5), out / "part-0.parquet", "parquet", 2)
    write(ids(5, 9), out / "day=1" / "part-1.orc", "orc", 4)
    (out / "_SUCCESS").write_bytes(b"")
    (out / ".part-0.parquet.crc").write_bytes(b"crc")
    for leftover in ("_temporary/0/part-9.parquet", ".spark-staging/part-8.parquet"):
        (out / leftover).parent.mkdir(parents=True)
        (out / leftover).write_bytes(b"not yet a parquet file")
    return out


def test_directory_skips_hidden_and_underscore_directories(job_output: Path) -> None:
    ds = Dataset(job_output, batch_size=4)
    assert [Path(f).relative_to(job_output).as_posix() for f in ds.files] == [
        "day=1/part-1.orc",
        "part-0.parquet",
    ]
    assert sorted(read_ids(ds)) == list(range(9))


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        # A matched directory contributes its data files, as a directory entry does.
        ("*", ["day=1/part-1.orc", "part-0.parquet"]),
        ("**/*.parquet", ["part-0.parquet"]),
        ("**/*", ["day=1/part-1.orc", "part-0.parquet"]),
        ("_temporary/*/*.parquet", ["_temporary/0/part-9.parquet"]),
    ],
)
def test_glob_skips_hidden_names_it_did_not_spell_out(
    job_output: Path, pattern: str, expected: list[str]
) -> None:
    if expected[0].startswith("_temporary"):
        # Spelled out, an underscore name is matched; the file is not valid Parquet.
        (job_output / expected[0]).unlink()
        write(ids(0, 2), job_output / expected[0], "parquet", 2)
    ds = Dataset(str(job_output / pattern), batch_size=4)
    assert [Path(f).relative_to(job_output).as_posix() for f in ds.files] == expected


def test_a_pattern_with_two_double_stars_keeps_the_names_it_spells_out(tmp_path: Path) -> None:
    # Only the first `**` was lined up; the spelled-out `_keep` was paired with the second
    # one and taken for a hidden name, dropping two of the three files.
    for where in ("_keep", "x/_keep", "x/_keep/y", "x/_skip/_keep"):
        (tmp_path / where).mkdir(parents=True)
        write(ids(0, 2), tmp_path / where / "f.parquet", "parquet", 2)
    ds = Dataset(str(tmp_path / "**" / "_keep" / "**" / "*.parquet"), batch_size=4)
    assert [Path(f).relative_to(tmp_path).as_posix() for f in ds.files] == [
        "_keep/f.parquet",
        "x/_keep/f.parquet",
        "x/_keep/y/f.parquet",
    ]


def test_a_directory_follows_linked_directories_as_its_glob_does(tmp_path: Path) -> None:
    # A linked partition (`dt=latest` pointing elsewhere) was read by `data/*` and silently
    # left out by `data/`.
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    (data / "a").mkdir(parents=True)
    elsewhere.mkdir()
    write(ids(0, 2), data / "a" / "x.parquet", "parquet", 2)
    write(ids(2, 4), elsewhere / "y.parquet", "parquet", 2)
    (data / "b").symlink_to(elsewhere, target_is_directory=True)
    spellings = [str(data), str(data / "*"), str(data / "**" / "*.parquet")]
    for spelling in spellings:
        ds = Dataset(spelling, batch_size=4)
        assert [Path(f).relative_to(data).as_posix() for f in ds.files] == [
            "a/x.parquet",
            "b/y.parquet",
        ], spelling
        assert sorted(read_ids(ds)) == [0, 1, 2, 3]


def test_a_link_back_to_a_directory_above_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    write(ids(0, 2), data / "a" / "x.parquet", "parquet", 2)
    (data / "a" / "up").symlink_to(data, target_is_directory=True)
    with pytest.raises(InvalidArgumentError, match=r"leads back to a directory above it"):
        Dataset(str(data), batch_size=4)


def test_glob_of_only_hidden_files_matches_nothing(job_output: Path) -> None:
    with pytest.raises(DataFileNotFoundError, match="matches no data files"):
        Dataset(str(job_output / "**" / "part-9.parquet"), batch_size=4)


# Each case: the files' (type, format, values), the dtype and fill, and the values read.
CASES = [
    (
        [
            (pa.int32(), "parquet", [1, None]),
            (pa.int64(), "orc", [2**40, 3]),
            (pa.int16(), "parquet", [4]),
        ],
        torch.int64,
        -1,
        [1, -1, 2**40, 3, 4],
    ),
    (
        [(pa.int64(), "orc", [-5]), (pa.uint8(), "parquet", [255, 0]), (pa.int32(), "orc", [7])],
        torch.int64,
        None,
        [-5, 255, 0, 7],
    ),
    (
        [(pa.float32(), "parquet", [0.5, None]), (pa.float64(), "orc", [1e300, 2.25])],
        torch.float64,
        None,
        [0.5, math.nan, 1e300, 2.25],
    ),
    (
        [
            (pa.float64(), "orc", [2.5, None]),
            (pa.int32(), "parquet", [3]),
            (pa.float32(), "orc", [1.5]),
        ],
        torch.float32,
        0.5,
        [2.5, 0.5, 3.0, 1.5],
    ),
]


@pytest.mark.parametrize("lists", [False, True])
@pytest.mark.parametrize(("files", "dtype", "fill", "expected"), CASES)
def test_explicit_dtype_reads_files_of_different_number_types(
    tmp_path: Path, files: list, dtype: torch.dtype, fill, expected: list, lists: bool
) -> None:
    paths = []
    for i, (typ, fmt, values) in enumerate(files):
        if lists:
            # Each value as a list of two; a null as a list holding a null.
            col = pa.array([[v, v] for v in values], pa.list_(typ))
        else:
            col = pa.array(values, typ)
        paths.append(write(pa.table({"x": col}), tmp_path / f"f{i}.{fmt}", fmt, 2))
    ds = Dataset(paths, batch_size=3, columns=[Column("x", dtype=dtype, fill=fill)])
    got: list = []
    for b in ds:
        col = b["x"]
        flat = col.values if lists else col
        assert flat.dtype == dtype
        got += flat.tolist()
    want = [v for v in expected for _ in range(2)] if lists else expected
    assert got == pytest.approx(want, nan_ok=True)


@pytest.mark.parametrize("fmt", ["parquet", "orc"])
def test_dtype_cast_of_a_later_file_checks_each_value(tmp_path: Path, fmt: str) -> None:
    a = write(ids(0, 3, pa.int32()), tmp_path / "a.parquet", "parquet", 3)
    b = write(pa.table({"id": pa.array([1, 2**40], pa.int64())}), tmp_path / f"b.{fmt}", fmt, 2)
    ds = Dataset([a, b], batch_size=2, columns=[Column("id", dtype="int32")])
    unit = "row group" if fmt == "parquet" else "stripe"
    with pytest.raises(
        SchemaError, match=rf"value 1099511627776 that overflows int32 \(.*b\.{fmt}, {unit} 0\)"
    ):
        read_ids(ds)


@pytest.mark.parametrize(
    ("first", "later", "dtype", "value"),
    [
        (pa.int32(), pa.uint32(), "int32", 2**32 - 1),
        (pa.int64(), pa.uint64(), "int64", 2**63),
    ],
)
def test_unsigned_later_file_is_not_read_as_signed(
    tmp_path: Path, first: pa.DataType, later: pa.DataType, dtype: str, value: int
) -> None:
    # Stored with the same physical Parquet type as the first file's numbers: still checked.
    a = write(ids(0, 3, first), tmp_path / "a.parquet", "parquet", 3)
    b = write(pa.table({"id": pa.array([5, value], later)}), tmp_path / "b.parquet", "parquet", 2)
    ds = Dataset([a, b], batch_size=2, columns=[Column("id", dtype=dtype)])
    with pytest.raises(SchemaError, match=rf"value {value} that overflows {dtype} \(.*b\.parquet"):
        read_ids(ds)
    small = write(pa.table({"id": pa.array([5, 6], later)}), tmp_path / "c.parquet", "parquet", 2)
    got = read_ids(Dataset([a, small], batch_size=2, columns=[Column("id", dtype=dtype)]))
    assert got == [0, 1, 2, 5, 6]


def test_different_number_types_without_dtype_name_both_files(tmp_path: Path) -> None:
    a = write(ids(0, 3, pa.int32()), tmp_path / "a.parquet", "parquet", 3)
    b = write(ids(3, 5, pa.int64()), tmp_path / "b.orc", "orc", 2)
    pattern = (
        r"column 'id' has type Int64 in .*b\.orc, but Int32 in .*a\.parquet; "
        r"give Column\('id', dtype=\.\.\.\) to read both as one type"
    )
    with pytest.raises(SchemaError, match=pattern):
        Dataset([a, b], batch_size=2)


@pytest.mark.parametrize(
    "other",
    [
        pa.table({"x": pa.array(["1", "2"])}),
        pa.table({"x": pa.array([[1], [2]], pa.list_(pa.int64()))}),
    ],
)
def test_dtype_does_not_join_strings_or_other_layouts(tmp_path: Path, other: pa.Table) -> None:
    a = write(pa.table({"x": pa.array([1, 2], pa.int64())}), tmp_path / "a.parquet", "parquet", 2)
    b = write(other, tmp_path / "b.parquet", "parquet", 2)
    with pytest.raises(SchemaError, match=r"column 'x' has type .* in .*b\.parquet, but Int64 in"):
        Dataset([a, b], batch_size=2, columns=[Column("x", dtype="int64")])


@pytest.mark.parametrize("fmt", ["parquet", "orc"])
def test_unsupported_type_names_the_file(tmp_path: Path, fmt: str) -> None:
    p = write(pa.table({"d": pa.array([1, 2], pa.date32())}), tmp_path / f"d.{fmt}", fmt, 1)
    with pytest.raises(
        SchemaError, match=rf"column 'd' has unsupported type Date32 \(file .*d\.{fmt}\)"
    ):
        Dataset(p, batch_size=4)


def test_a_glob_matching_directories_reads_their_files(tmp_path: Path) -> None:
    for k, day in enumerate(["dt=2024-01-01", "dt=2024-01-02", "dt=2023-12-31"]):
        (tmp_path / day).mkdir()
        write(ids(10 * k, 10 * k + 2), tmp_path / day / "part-0.parquet", "parquet", 10)
        (tmp_path / day / "_SUCCESS").write_text("")
    assert read_ids(Dataset(str(tmp_path / "dt=2024-*"), batch_size=4)) == [0, 1, 10, 11]
    # A file matched and also below a matched directory is read once.
    assert read_ids(Dataset(str(tmp_path / "**"), batch_size=4)) == [20, 21, 0, 1, 10, 11]


def test_a_glob_orders_files_as_their_directory_does(tmp_path: Path) -> None:
    # "-" sorts before "/": comparing whole paths put a-b/x before a/x, a directory a/ first.
    data = tmp_path / "data"
    for k, part in enumerate(["a", "a-b", "a/c", "b"]):
        (data / part).mkdir(parents=True, exist_ok=True)
        write(ids(10 * k, 10 * k + 2), data / part / "x.parquet", "parquet", 10)
    expected = ["a/c/x.parquet", "a/x.parquet", "a-b/x.parquet", "b/x.parquet"]
    for spelled in (data, str(data / "*"), str(data / "**" / "*.parquet")):
        ds = Dataset(spelled, batch_size=4)
        assert [Path(f).relative_to(data).as_posix() for f in ds.files] == expected, spelled
        assert read_ids(ds) == [20, 21, 0, 1, 10, 11, 30, 31]


def test_a_glob_skips_matched_files_of_no_data_format(tmp_path: Path) -> None:
    write(ids(0, 3), tmp_path / "part-0.parquet", "parquet", 3)
    (tmp_path / "README.md").write_text("what these files hold")
    (tmp_path / "schema.json").write_text("{}")
    assert read_ids(Dataset(str(tmp_path / "*"), batch_size=4)) == read_ids(
        Dataset(tmp_path, batch_size=4)
    )
    with pytest.raises(
        DataFileNotFoundError,
        match=r"pattern .*\*\.\[mj\]\* matches no \.parquet, \.pq or \.orc files \(it matches "
        r".*README\.md and others\); pass format='parquet' or 'orc'",
    ):
        Dataset(str(tmp_path / "*.[mj]*"), batch_size=4)
    # With a format given, names are not looked at: every matched file is read as that format.
    with pytest.raises(CorruptFileError, match=r"cannot read .*README\.md: not a Parquet file"):
        Dataset(str(tmp_path / "*"), batch_size=4, format="parquet")


def test_a_string_fill_must_be_utf8_for_a_string_column(tmp_path: Path) -> None:
    table = pa.table(
        {"s": pa.array(["a", None], pa.string()), "b": pa.array([b"\x00", None], pa.binary())}
    )
    p = write(table, tmp_path / "s.parquet", "parquet", 2)
    # Its nulls would have read as bytes no string array may hold (to_arrow() made one).
    with pytest.raises(
        InvalidArgumentError, match=r"column 's' holds UTF-8 strings, its fill is not UTF-8"
    ):
        Dataset(p, batch_size=2, columns=[Column("s", fill=b"ok\xff")])
    ds = Dataset(p, batch_size=2, columns=[Column("s", fill="é"), Column("b", fill=b"\xff")])
    arrow = next(iter(ds)).to_arrow()
    assert arrow.column("s").to_pylist() == ["a", "é"]
    assert arrow.column("b").to_pylist() == [b"\x00", b"\xff"]


def test_existing_file_with_glob_characters_is_that_file(tmp_path: Path) -> None:
    named = write(ids(0, 2), tmp_path / "part[1].parquet", "parquet", 2)
    write(ids(5, 6), tmp_path / "part1.parquet", "parquet", 2)
    assert read_ids(Dataset(named, batch_size=4)) == [0, 1]
    # As a pattern the brackets are a character class.
    assert read_ids(Dataset(str(tmp_path / "part[0-9].parquet"), batch_size=4)) == [5]


def test_paths_that_are_not_paths_are_refused_naming_them(tmp_path: Path) -> None:
    # bytes were iterated as ints, None and numbers failed with a bare TypeError.
    a = write(ids(0, 3), tmp_path / "a.parquet", "parquet", 3)
    for paths, shown in [
        (bytes(a), repr(bytes(a))),
        (None, "None"),
        (3, "3"),
        ([a, None], "None"),
        ([str(a).encode()], repr(str(a).encode())),
    ]:
        with pytest.raises(InvalidArgumentError, match="paths must") as info:
            Dataset(paths, batch_size=4)  # type: ignore[arg-type]
        assert shown in str(info.value)
    # Any iterable of paths still works, read once.
    assert read_ids(Dataset(iter([a]), batch_size=4)) == [0, 1, 2]
    assert read_ids(Dataset((str(a),), batch_size=4)) == [0, 1, 2]


def test_a_file_reached_twice_is_refused_naming_it_and_both_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading a file twice per epoch would break exactly-once reading: a file that two
    entries of ``paths`` reach is an error naming the file and both entries."""
    data = tmp_path / "data"
    data.mkdir()
    a = write(ids(0, 5), data / "a.parquet", "parquet", 5)
    write(ids(5, 9), data / "b.parquet", "parquet", 5)
    monkeypatch.chdir(data)
    cases = [
        ([data, a], [repr(str(data)), repr(str(a))]),  # a directory and a file inside it
        ([a, a], [repr(str(a))]),  # one file twice
        ([str(data / "*.parquet"), str(data / "a*")], ["*.parquet", "a*"]),  # two globs
        (["a.parquet", "./a.parquet"], ["'a.parquet'", "'./a.parquet'"]),  # relative spellings
        ([a, tmp_path / "data" / ".." / "data" / "a.parquet"], [repr(str(a))]),
    ]
    for paths, entries in cases:
        with pytest.raises(InvalidArgumentError, match="twice") as info:
            Dataset(paths, batch_size=4)
        message = str(info.value)
        assert str(a.resolve()) in message, message
        for entry in entries:
            assert entry in message, message
    # A link to a file reaches that file too.
    link = tmp_path / "link.parquet"
    link.symlink_to(a)
    with pytest.raises(InvalidArgumentError, match=r"twice, .*link\.parquet"):
        Dataset([a, link], batch_size=4)
    # Distinct files, in whatever spelling, still read every row once.
    ds = Dataset(["./a.parquet", str(data / "b*")], batch_size=4)
    assert sorted(read_ids(ds)) == list(range(9))


def test_numpy_scalars_are_taken_as_the_python_numbers_they_hold(tmp_path: Path) -> None:
    # Sizes, seeds and fills often come out of NumPy; each is the Python number it holds (they
    # were refused as "must be an integer" / "fill of type int64"), and the state stays JSON.
    import json

    np = pytest.importorskip("numpy")
    path = write(pa.table({"a": [1, 2, None, 4]}), tmp_path / "x.parquet", "parquet", 2)

    def read(**kw) -> tuple[list[list[int]], dict]:
        ds = Dataset(path, **kw)
        return [b["a"].tolist() for b in ds], ds.state_dict()

    ours = read(
        batch_size=np.int64(2), shuffle=np.True_, seed=np.uint64(3), prefetch=np.int32(1),
        rank=np.int64(0), world_size=np.int64(1), columns=[Column("a", fill=np.int64(5))],
    )  # fmt: skip
    plain = read(batch_size=2, shuffle=True, seed=3, prefetch=1, rank=0, world_size=1,
                 columns=[Column("a", fill=5)])  # fmt: skip
    assert ours == plain
    json.dumps(ours[1])
    assert Column("a", fill=np.float32(0.5), buckets=np.uint8(3)) == Column("a", 0.5, buckets=3)
    with pytest.raises(InvalidArgumentError, match=r"batch_size must be an integer .*got 2\.0"):
        Dataset(path, batch_size=np.float64(2.0))
    with pytest.raises(InvalidArgumentError, match=r"shuffle must be True or False, got 1"):
        Dataset(path, batch_size=2, shuffle=np.int64(1))
