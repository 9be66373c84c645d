"""`Column(dtype=...)` casts and fill values never lose or wrap a value silently."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recis_io import Column, Dataset, InvalidArgumentError, SchemaError


def read(path, col: Column) -> list:
    return [v for b in Dataset(path, batch_size=2, columns=[col]) for v in b[col.name].tolist()]


@pytest.fixture
def cast_file(tmp_path):
    path = tmp_path / "cast.parquet"
    table = pa.table(
        {
            "u": pa.array([1, 2**63, 5], pa.uint64()),
            "i": pa.array([1, 300, -5], pa.int64()),
            "f": pa.array([1.0, float("nan"), float("inf")], pa.float64()),
            "big": pa.array([1.0, 1e300, 2.0], pa.float64()),
            "h": pa.array([1, 70000, 2], pa.int32()),
            "ok": pa.array([1.5, -2.5, None], pa.float64()),
        }
    )
    pq.write_table(table, path, row_group_size=2)
    return path


@pytest.mark.parametrize(
    ("name", "dtype", "value", "group"),
    [
        ("u", "int64", "9223372036854775808", 0),
        ("i", "int8", "300", 0),
        ("f", "int32", "NaN", 0),
        ("big", "float32", "1e300", 0),
        ("h", "float16", "70000", 0),
    ],
)
@pytest.mark.parametrize("fill", [None, 0])
def test_values_that_overflow_the_dtype_are_errors(cast_file, name, dtype, value, group, fill):
    col = Column(name, dtype=dtype, fill=fill)
    pattern = rf"column '{name}' has value {value} that overflows {dtype} \(.*cast\.parquet, row group {group}\)"
    with pytest.raises(SchemaError, match=pattern):
        read(cast_file, col)


def test_numbers_other_than_0_and_1_cast_to_bool_are_errors(tmp_path) -> None:
    # Arrow's cast reads every number but 0 as true; a bool holds 0 and 1 only, as a fill of 2
    # on a bool column is refused.
    path = tmp_path / "flags.parquet"
    table = pa.table(
        {
            "i": pa.array([0, 1, None, 2], pa.int64()),
            "neg": pa.array([1, -1], pa.int8()).take([0, 0, 0, 1]),
            "f": pa.array([0.0, 1.0, None, 0.5]),
            "nan": pa.array([1.0, 0.0, 0.0, float("nan")], pa.float32()),
        }
    )
    pq.write_table(table, path, row_group_size=2)
    for name, value in [("i", "2"), ("neg", "-1"), ("f", "0.5"), ("nan", "NaN")]:
        pattern = rf"column '{name}' has value {value} that overflows bool \(.*row group 1\)"
        with pytest.raises(SchemaError, match=pattern):
            read(path, Column(name, dtype="bool", fill=False))
    small = tmp_path / "small.parquet"
    pq.write_table(table.slice(0, 2), small)
    for name in ("i", "f"):
        assert read(small, Column(name, dtype="bool")) == [False, True]


def test_overflowing_float32_is_named_by_its_exact_value(tmp_path) -> None:
    # 2**31 in float32 prints as "2147483600" in shortest form, a number int32 holds.
    path = tmp_path / "f32.parquet"
    pq.write_table(pa.table({"f": pa.array([2.0**31], pa.float32())}), path)
    with pytest.raises(SchemaError, match=r"value 2147483648 that overflows int32"):
        read(path, Column("f", dtype="int32"))


def test_infinite_float_is_an_error_as_integer_not_as_narrower_float(tmp_path) -> None:
    path = tmp_path / "inf.parquet"
    pq.write_table(pa.table({"f": pa.array([float("inf"), -1.0], pa.float64())}), path)
    with pytest.raises(SchemaError, match=r"value inf that overflows int64"):
        read(path, Column("f", dtype="int64"))
    assert read(path, Column("f", dtype="float32")) == [math.inf, -1.0]


def test_casts_that_fit_keep_values_and_nulls_take_the_fill(cast_file) -> None:
    assert read(cast_file, Column("i", dtype="int16")) == [1, 300, -5]
    assert read(cast_file, Column("ok", dtype="int8", fill=7)) == [1, -2, 7]
    assert read(cast_file, Column("u", dtype="float64"))[1] == 2.0**63


@pytest.mark.parametrize(
    ("typ", "dtype", "fill", "expected"),
    [
        (
            pa.int8(),
            None,
            1000,
            r"fill 1000, out of range for int8: expected an integer in \[-128, 127\]",
        ),
        (
            pa.uint8(),
            None,
            -1,
            r"fill -1, out of range for uint8: expected an integer in \[0, 255\]",
        ),
        (pa.int64(), None, 2.9, r"fill 2\.9, out of range for int64"),
        (pa.int64(), None, float("nan"), r"fill NaN, out of range for int64"),
        (pa.int64(), None, 2**63, r"fill 9223372036854775808, out of range for int64"),
        (pa.int64(), None, 2**200, r"fill \d+, out of range for every dtype"),
        (pa.bool_(), None, 2, r"fill 2, out of range for bool: expected an integer in \[0, 1\]"),
        (pa.float32(), "float16", 1e6, r"fill 1000000\.0, out of range for float16"),
    ],
)
def test_fill_out_of_the_dtype_range_is_refused(tmp_path, typ, dtype, fill, expected) -> None:
    path = tmp_path / "fill.parquet"
    pq.write_table(pa.table({"x": pa.array([None, True if typ == pa.bool_() else 1], typ)}), path)
    with pytest.raises(InvalidArgumentError, match=rf"column 'x' has {expected}"):
        Dataset(path, batch_size=2, columns=[Column("x", fill=fill, dtype=dtype)])


@pytest.mark.parametrize(
    ("typ", "dtype", "fill"),
    [
        (pa.uint64(), None, 2**64 - 1),
        (pa.int8(), None, -128),
        (pa.int64(), None, 3.0),
        (pa.bool_(), None, True),
        (pa.float32(), "float16", float("-inf")),
    ],
)
def test_fill_at_the_edge_of_the_range_is_written_exactly(tmp_path, typ, dtype, fill) -> None:
    path = tmp_path / "edge.parquet"
    pq.write_table(pa.table({"x": pa.array([None, True if typ == pa.bool_() else 1], typ)}), path)
    got = read(path, Column("x", fill=fill, dtype=dtype))
    assert got == [fill, 1]


def test_unhashed_string_nulls_need_a_string_fill(tmp_path) -> None:
    # What the guide's Nulls section says: no fill is an error, fill="" an empty string.
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"s": pa.array(["a", None, "b"])}), path)
    with pytest.raises(SchemaError, match=r"column 's' has nulls and no fill value.*row group 0"):
        next(iter(Dataset(path, batch_size=3)))
    col = next(iter(Dataset(path, batch_size=3, columns=[Column("s", fill="")])))["s"]
    assert [bytes(col.row(i)) for i in range(3)] == [b"a", b"", b"b"]


def test_unhashed_string_and_binary_nulls_take_a_bytes_fill(tmp_path) -> None:
    # The guide's Nulls section: a str or bytes fill; bytes are written as they are.
    path = tmp_path / "b.parquet"
    table = pa.table({"b": pa.array([b"\xff", None]), "s": pa.array(["a", None])})
    pq.write_table(table, path)
    cols = [Column("b", fill=b"\x00\x01"), Column("s", fill=b"z")]
    batch = next(iter(Dataset(path, batch_size=2, columns=cols)))
    assert [bytes(batch["b"].row(i)) for i in range(2)] == [b"\xff", b"\x00\x01"]
    assert [bytes(batch["s"].row(i)) for i in range(2)] == [b"a", b"z"]
    with pytest.raises(InvalidArgumentError, match=r"column 'n' has fill of type bytearray"):
        Column("n", fill=bytearray(b"x"))  # type: ignore[arg-type]
