"""File types beyond the plain ones: fixed-size lists, dictionaries, codecs, files that differ
only in how a writer names list items, and the unsigned output dtypes."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pytest
import torch

from recis_io import Column, Dataset, Ragged, SchemaError, hash_bytes

from .conftest import write


def one_batch(path, **kwargs):
    return next(iter(Dataset(path, batch_size=1000, **kwargs)))


def fsl(values: list, k: int, typ: pa.DataType | None = None) -> pa.Array:
    return pa.array(values, pa.list_(typ or pa.int32(), k))


# ORC has no fixed-size lists (pyarrow writes them as lists), so these are Parquet only.
@pytest.mark.parametrize("shuffle", [False, True])
def test_list_of_fixed_size_lists_keeps_each_item(tmp_path, shuffle: bool) -> None:
    fmt = "parquet"
    rows = [[], [[1, 1]], None, [[3, 3]], [[4, 4], [5, 5]]] * 20
    table = pa.table({"p": pa.array(rows, pa.list_(pa.list_(pa.int32(), 2)))})
    path = write(table, tmp_path / f"p.{fmt}", fmt, 30)
    got = []
    for batch in Dataset(path, batch_size=7, shuffle=shuffle, seed=3, shuffle_window=16):
        col = batch["p"]
        assert isinstance(col, Ragged)
        assert col.values.shape[1:] == (2,)
        got += [col.row(i) for i in range(len(col))]
    want = [r or [] for r in rows]
    assert sorted(map(str, got)) == sorted(map(str, want))
    if not shuffle:
        assert got == want
        batch = one_batch(path)
        assert batch.to_arrow().column("p").to_pylist() == want


def test_fixed_size_list_of_width_one_is_two_dimensional(tmp_path) -> None:
    fmt = "parquet"
    table = pa.table({"w1": fsl([[1], [2], [3]], 1, pa.int64()), "w2": fsl([[1, 2]] * 3, 2)})
    batch = one_batch(write(table, tmp_path / f"w.{fmt}", fmt, 2))
    assert batch["w1"].shape == (3, 1)
    assert batch["w1"].tolist() == [[1], [2], [3]]
    assert batch["w2"].shape == (3, 2)
    assert batch.to_arrow().column("w1").type == pa.list_(pa.int64(), 1)


@pytest.mark.parametrize("k", [1, 2])
def test_fixed_size_list_of_lists_is_refused_when_opened(tmp_path, k: int) -> None:
    typ = pa.list_(pa.list_(pa.int64()), k)
    path = tmp_path / "g.parquet"
    pq.write_table(pa.table({"g": pa.array([[[1]] * k, [[2, 3]] * k], typ)}), path)
    with pytest.raises(SchemaError, match=r"column 'g' has unsupported type FixedSizeList"):
        Dataset(path, batch_size=2)


@pytest.mark.parametrize("name", ["uint16", "uint32", "uint64"])
def test_unsigned_dtypes_by_name_and_torch_dtype(tmp_path, name: str) -> None:
    path = tmp_path / "u.parquet"
    pq.write_table(pa.table({"x": pa.array([0, 7, 300], pa.int64())}), path)
    for dtype in (name, getattr(torch, name)):
        got = one_batch(path, columns=[Column("x", dtype=dtype)])["x"]
        assert got.dtype == getattr(torch, name)
        assert got.to(torch.int64).tolist() == [0, 7, 300]


@pytest.mark.parametrize("hashed", [False, True])
def test_dictionary_string_columns(tmp_path, hashed: bool) -> None:
    words = ["paris", "rome", None, "paris", "oslo"] * 40
    table = pa.table({"city": pa.array(words).dictionary_encode()})
    assert pa.types.is_dictionary(table.schema.field("city").type)
    path = tmp_path / "d.parquet"
    pq.write_table(table, path, row_group_size=64)
    col = Column("city", hash="farm", fill=-1) if hashed else Column("city", fill="?")
    got = []
    for batch in Dataset(path, batch_size=30, columns=[col]):
        c = batch["city"]
        got += c.tolist() if hashed else [bytes(c.row(i)).decode() for i in range(len(c))]
    if hashed:
        assert got == [-1 if w is None else hash_bytes(w.encode(), "farm") for w in words]
    else:
        assert got == ["?" if w is None else w for w in words]


def test_list_item_names_and_nullability_do_not_make_files_differ(tmp_path) -> None:
    rows = [[1, 2], [], [3]]
    element = pa.list_(pa.field("element", pa.int64()))
    required = pa.list_(pa.field("element", pa.int64(), nullable=False))
    a, b, c = tmp_path / "a.parquet", tmp_path / "b.parquet", tmp_path / "c.orc"
    pq.write_table(pa.table({"l": pa.array(rows, element)}), a, use_compliant_nested_type=True)
    pq.write_table(pa.table({"l": pa.array(rows, required)}), b)
    orc.write_table(pa.table({"l": pa.array(rows, pa.list_(pa.int64()))}), c)
    col = one_batch([a, b, c])["l"]
    assert [col.row(i) for i in range(len(col))] == rows * 3
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"l": pa.array(rows, pa.list_(pa.int32()))}), other)
    with pytest.raises(SchemaError, match=r"column 'l' has type .*Int32.* in .*other\.parquet"):
        Dataset([a, other], batch_size=2)


def test_brotli_parquet_reads(tmp_path) -> None:
    path = tmp_path / "b.parquet"
    table = pa.table({"x": pa.array(range(1000), pa.int64()), "s": [str(i) for i in range(1000)]})
    pq.write_table(table, path, compression="brotli", row_group_size=300)
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "BROTLI"
    got = [b["x"] for b in Dataset(path, batch_size=256, columns=["x", "s"])]
    assert torch.cat(got).tolist() == list(range(1000))


def test_dictionary_number_columns_read_as_their_values(tmp_path) -> None:
    """Numbers stored dictionary-encoded (``dictionary_encode()`` on ints or floats, kept as
    such in the file's Arrow schema) read as the plain values pyarrow decodes. ORC has no
    dictionary encoding of numbers, and pyarrow refuses to write one there."""
    n = 300
    ints = [None if i % 7 == 3 else (i % 5) * 1000 - 2000 for i in range(n)]
    floats = [None if i % 11 == 0 else (i % 3) / 4 for i in range(n)]
    lists = [None if i % 9 == 0 else [i % 4] * (i % 3) for i in range(n)]
    table = pa.table(
        {
            "i64": pa.array(ints, pa.int64()).dictionary_encode(),
            "f64": pa.array(floats, pa.float64()).dictionary_encode(),
            "i8": pa.array([i % 3 - 1 for i in range(n)], pa.int8()).dictionary_encode(),
            "f32": pa.array(floats, pa.float32()).dictionary_encode(),
            "l": pa.array(lists, pa.list_(pa.dictionary(pa.int32(), pa.int64()))),
        }
    )
    path = tmp_path / "dict.parquet"
    pq.write_table(table, path, row_group_size=128)
    # pyarrow's own decoding, as plain values.
    want = pq.read_table(path)
    assert pq.read_schema(path).field("i64").type == pa.int64()
    columns = [Column("i64", fill=-1), "f64", "i8", "f32", "l"]
    got: dict[str, list] = {c: [] for c in want.column_names}
    for batch in Dataset(path, batch_size=100, columns=columns):
        for name in ("i64", "f64", "i8", "f32"):
            got[name] += batch[name].tolist()
        got["l"] += [batch["l"].row(i) for i in range(len(batch))]
    assert got["i64"] == [-1 if v is None else v for v in want["i64"].to_pylist()]
    for name in ("f64", "f32"):
        expected = want[name].to_numpy(zero_copy_only=False).tolist()
        assert [repr(v) for v in got[name]] == [repr(v) for v in expected], name
    assert got["i8"] == want["i8"].to_pylist()
    assert got["l"] == [v or [] for v in want["l"].to_pylist()]
    outs = next(iter(Dataset(path, batch_size=4, columns=columns)))
    assert (outs["i64"].dtype, outs["i8"].dtype, outs["f32"].dtype) == (
        torch.int64,
        torch.int8,
        torch.float32,
    )
    # With a dtype the values are cast (the dictionary's values, not its keys).
    cast = Dataset(path, batch_size=1000, columns=[Column("i64", fill=0, dtype=torch.float64)])
    assert torch.cat([b["i64"] for b in cast]).tolist() == [
        0.0 if v is None else float(v) for v in want["i64"].to_pylist()
    ]
    # A file storing the same column plainly is the same type.
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"i8": pa.array([5, 6], pa.int8())}), plain)
    mixed = Dataset([path, plain], batch_size=1000, columns=["i8"])
    assert torch.cat([b["i8"] for b in mixed]).tolist() == [*want["i8"].to_pylist(), 5, 6]
