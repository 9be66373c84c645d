"""Files written with writer options other than the defaults (page versions, codecs, encodings,
page indexes, checksums, bloom filters, many small pages, tiny row groups or stripes, required
columns) pass the checks of page headers and stripe footers made before decoding, and read back
the values pyarrow reads from the same file, in batches of every size."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pyarrow.types as pt
import pytest

from recis_io import Column, Dataset

N = 240


def nullable_table(fmt: str) -> pa.Table:
    def null(i: int) -> bool:
        return i % 7 == 3

    cols: dict[str, pa.Array] = {
        "i8": pa.array([None if null(i) else i % 100 - 50 for i in range(N)], pa.int8()),
        "i16": pa.array([None if null(i) else i * 30 - 900 for i in range(N)], pa.int16()),
        "i32": pa.array([None if null(i) else i * 70000 for i in range(N)], pa.int32()),
        "i64": pa.array([None if null(i) else i * 2**40 - 2**50 for i in range(N)], pa.int64()),
        "f32": pa.array([None if null(i) else i / 3 for i in range(N)], pa.float32()),
        "f64": pa.array([None if null(i) else i / 7 - 3 for i in range(N)], pa.float64()),
        "b": pa.array([None if null(i) else i % 3 == 0 for i in range(N)], pa.bool_()),
        "s": pa.array([None if null(i) else f"r{i % 13}" * (i % 4) for i in range(N)]),
        "bin": pa.array([None if null(i) else bytes([i % 256]) * (i % 3) for i in range(N)]),
        "l": pa.array(
            [
                None if i % 11 == 5 else [None if (i + j) % 9 == 0 else i + j for j in range(i % 5)]
                for i in range(N)
            ],
            pa.list_(pa.int64()),
        ),
        "ll": pa.array(
            [None if i % 13 == 1 else [[j] * (j % 3) for j in range(i % 4)] for i in range(N)],
            pa.list_(pa.list_(pa.int64())),
        ),
        "ls": pa.array(
            [
                None if i % 10 == 2 else [None if j == 1 else f"w{j}" for j in range(i % 3)]
                for i in range(N)
            ],
            pa.list_(pa.string()),
        ),
        "lf": pa.array(
            [[None if j == 2 else j / 2 for j in range(i % 4)] for i in range(N)],
            pa.list_(pa.float32()),
        ),
    }
    if fmt == "parquet":
        cols["u16"] = pa.array([None if null(i) else i * 200 for i in range(N)], pa.uint16())
        cols["u64"] = pa.array([None if null(i) else 2**63 + i for i in range(N)], pa.uint64())
        cols["large"] = pa.array([list(range(i % 4)) for i in range(N)], pa.large_list(pa.int32()))
        cols["lstr"] = pa.array([f"L{i}" for i in range(N)], pa.large_string())
        cols["cat"] = pa.array([f"c{i % 5}" for i in range(N)]).dictionary_encode()
        cols["h"] = pa.array([None if null(i) else i / 4 for i in range(N)], pa.float16())
        cols["fx"] = pa.array([[i, i + 0.5, -i] for i in range(N)], pa.list_(pa.float32(), 3))
    return pa.table(cols)


def required_table() -> pa.Table:
    """Non-nullable columns and list items (Parquet REQUIRED fields)."""

    def req(t: pa.DataType) -> pa.DataType:
        return pa.list_(pa.field("element", t, nullable=False))

    cols = {
        "i32": (pa.int32(), [i * 3 for i in range(N)]),
        "i64": (pa.int64(), [i - 100 for i in range(N)]),
        "f64": (pa.float64(), [i / 8 for i in range(N)]),
        "s": (pa.string(), [f"r{i % 13}" for i in range(N)]),
        "l": (req(pa.int64()), [list(range(i % 5)) for i in range(N)]),
        "lf": (req(pa.float32()), [[j / 2 for j in range(i % 3)] for i in range(N)]),
        "ll": (req(req(pa.int32())), [[[j] * j for j in range(i % 4)] for i in range(N)]),
    }
    schema = pa.schema([pa.field(name, t, nullable=False) for name, (t, _) in cols.items()])
    return pa.table({name: values for name, (_, values) in cols.items()}, schema=schema)


def is_list(t: pa.DataType) -> bool:
    return pt.is_list(t) or pt.is_large_list(t) or pt.is_list_view(t) or pt.is_large_list_view(t)


def leaf_type(t: pa.DataType) -> pa.DataType:
    while is_list(t) or pt.is_fixed_size_list(t):
        t = t.value_type
    return t.value_type if pt.is_dictionary(t) else t


def fill_of(t: pa.DataType) -> Any:
    leaf = leaf_type(t)
    if pt.is_floating(leaf):
        return None
    if pt.is_string(leaf) or pt.is_large_string(leaf) or pt.is_binary(leaf):
        return ""
    return 0


def expected(value: Any, t: pa.DataType) -> Any:
    """pyarrow's value as the reader gives it: nulls as the fill (NaN for floats), a null list
    as an empty one."""
    if pt.is_fixed_size_list(t):
        items = value if value is not None else [None] * t.list_size
        return [expected(v, t.value_type) for v in items]
    if is_list(t):
        return [expected(v, t.value_type) for v in value or []]
    leaf = leaf_type(t)
    if value is None:
        fill = fill_of(t)
        return math.nan if fill is None else b"" if pt.is_binary(leaf) else fill
    if pt.is_floating(leaf):
        return float(value)
    return int(value) if isinstance(value, bool) else value


def same(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


def check_reads_like_pyarrow(path: Path, table: pa.Table, batch_sizes=(7, 100, 1024)) -> None:
    columns = [Column(f.name, fill=fill_of(f.type)) for f in table.schema]
    want = {f.name: [expected(v, f.type) for v in table[f.name].to_pylist()] for f in table.schema}
    n = table.num_rows
    for batch_size in batch_sizes:
        got: dict[str, list] = {f.name: [] for f in table.schema}
        sizes = []
        for batch in Dataset(path, batch_size=batch_size, columns=columns, shuffle=False):
            sizes.append(len(batch))
            record = batch.to_arrow()
            for f in table.schema:
                got[f.name] += [expected(v, f.type) for v in record[f.name].to_pylist()]
        assert sizes == [min(batch_size, n - s) for s in range(0, n, batch_size)], batch_size
        for name, values in want.items():
            assert same(got[name], values), (name, batch_size)


PARQUET = {
    "page v1": {"data_page_version": "1.0"},
    "page v2": {"data_page_version": "2.0"},
    **{
        f"{codec} v{v}": {"compression": codec, "data_page_version": f"{v}.0"}
        for codec in ("none", "snappy", "gzip", "brotli", "lz4", "zstd")
        for v in (1, 2)
    },
    "gzip level 9": {"compression": "gzip", "compression_level": 9},
    "zstd level 19": {"compression": "zstd", "compression_level": 19},
    "plain pages": {"use_dictionary": False},
    "plain pages v2": {"use_dictionary": False, "data_page_version": "2.0"},
    "dictionary per column": {"use_dictionary": ["s", "i64", "ls"]},
    "dictionary falls back to plain": {"dictionary_pagesize_limit": 64, "data_page_size": 256},
    "no statistics": {"write_statistics": False},
    "page index": {"write_page_index": True, "data_page_size": 256},
    "page checksums": {"write_page_checksum": True, "data_page_version": "2.0"},
    "bloom filter": {"bloom_filter_options": {"s": {"ndv": 100, "fpp": 0.01}}},
    "small pages v1": {"data_page_size": 64},
    "small pages v2": {"data_page_size": 64, "data_page_version": "2.0"},
    "row groups of one row": {"row_group_size": 1},
    "row groups of 50 rows v2": {"row_group_size": 50, "data_page_version": "2.0"},
    "no arrow schema": {"store_schema": False},
    "format 1.0": {"version": "1.0"},
    "byte stream split": {"use_dictionary": False, "use_byte_stream_split": ["f32", "f64", "lf"]},
    "delta encodings": {
        "use_dictionary": False,
        "column_encoding": {
            "i32": "DELTA_BINARY_PACKED",
            "i64": "DELTA_BINARY_PACKED",
            "l": "DELTA_BINARY_PACKED",
            "s": "DELTA_BYTE_ARRAY",
            "ls": "DELTA_LENGTH_BYTE_ARRAY",
            "bin": "DELTA_LENGTH_BYTE_ARRAY",
            "f64": "BYTE_STREAM_SPLIT",
        },
    },
    "delta encodings v2 small pages": {
        "use_dictionary": False,
        "data_page_version": "2.0",
        "data_page_size": 128,
        "column_encoding": {"i64": "DELTA_BINARY_PACKED", "s": "DELTA_BYTE_ARRAY", "b": "RLE"},
    },
}


@pytest.mark.parametrize("options", PARQUET.values(), ids=PARQUET.keys())
def test_parquet_writer_options(tmp_path, options: dict) -> None:
    table = nullable_table("parquet")
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, **options)
    check_reads_like_pyarrow(path, table)


@pytest.mark.parametrize("version", ["1.0", "2.0"])
@pytest.mark.parametrize("dictionary", [True, False])
def test_parquet_required_columns(tmp_path, version: str, dictionary: bool) -> None:
    table = required_table()
    path = tmp_path / "t.parquet"
    pq.write_table(
        table, path, data_page_version=version, use_dictionary=dictionary, data_page_size=128
    )
    check_reads_like_pyarrow(path, table)


def test_parquet_empty_row_groups_and_all_null_columns(tmp_path) -> None:
    table = nullable_table("parquet")
    path = tmp_path / "t.parquet"
    with pq.ParquetWriter(path, table.schema, data_page_version="2.0") as w:
        for piece in (table.slice(0, 0), table.slice(0, 10), table.slice(0, 0), table.slice(10)):
            w.write_table(piece)
    assert pq.ParquetFile(path).metadata.num_row_groups == 4
    check_reads_like_pyarrow(path, table)
    nulls = pa.table({f.name: pa.nulls(30, f.type) for f in table.schema if f.name != "cat"})
    pq.write_table(nulls, path, data_page_version="2.0")
    check_reads_like_pyarrow(path, nulls, batch_sizes=(7,))


ORC = {
    **{
        codec: {"compression": codec} for codec in ("uncompressed", "zlib", "snappy", "lz4", "zstd")
    },
    "file version 0.11": {"file_version": "0.11"},
    "file version 0.11, dictionaries": {"file_version": "0.11", "dictionary_key_size_threshold": 1},
    "no dictionaries": {"dictionary_key_size_threshold": 0},
    "dictionaries always": {"dictionary_key_size_threshold": 1},
    "small stripes": {"stripe_size": 1024, "batch_size": 7},
    "row index stride 50": {"row_index_stride": 50},
    "bloom filters": {"bloom_filter_columns": [0, 7], "bloom_filter_fpp": 0.01},
}


@pytest.mark.parametrize("options", ORC.values(), ids=ORC.keys())
def test_orc_writer_options(tmp_path, options: dict) -> None:
    table = nullable_table("orc")
    path = tmp_path / "t.orc"
    orc.write_table(table, path, **options)
    check_reads_like_pyarrow(path, table)


@pytest.mark.parametrize("version", ["0.11", "0.12"])
def test_orc_list_lengths_of_every_run_kind(tmp_path, version: str) -> None:
    """List lengths that the writer stores as short repeats, direct runs, patched bases (rare
    long lists among short ones) and deltas (lengths that grow by one)."""
    lengths = [3] * 20 + list(range(100)) + [i % 4 if i % 37 else 3000 + i for i in range(600)]
    table = pa.table(
        {
            "l": pa.array([list(range(k)) for k in lengths], pa.list_(pa.int64())),
            "s": pa.array(["x" * k for k in lengths]),
        }
    )
    path = tmp_path / "t.orc"
    orc.write_table(table, path, file_version=version, dictionary_key_size_threshold=0)
    check_reads_like_pyarrow(path, table, batch_sizes=(100, 1024))


def test_parquet_list_views_read_as_lists(tmp_path) -> None:
    """pyarrow writes list views as Parquet lists and records the view types in the Arrow schema
    it stores in the file: they read as the lists they are (they were refused as unsupported
    types)."""
    rows = [None if i % 9 == 4 else list(range(i % 5)) for i in range(N)]
    words = [[f"w{j}" for j in range(i % 3)] for i in range(N)]
    table = pa.table(
        {
            "lv": pa.array(rows, pa.list_view(pa.int64())),
            "llv": pa.array(rows, pa.large_list_view(pa.float32())),
            "lvs": pa.array(words, pa.list_view(pa.string())),
            "llvv": pa.array([[r or []] for r in rows], pa.list_(pa.list_view(pa.int32()))),
        }
    )
    path = tmp_path / "t.parquet"
    pq.write_table(table, path)
    assert pq.read_schema(path).field("lv").type == pa.list_view(pa.int64())
    check_reads_like_pyarrow(path, table)


def write_encrypted(path: Path, table: pa.Table, plaintext_footer: bool) -> None:
    """Writes `table` with Parquet modular encryption of column "b" (keys from a stand-in KMS)."""
    pe = pytest.importorskip("pyarrow.parquet.encryption")
    import base64

    class Kms(pe.KmsClient):
        def __init__(self, config: Any) -> None:
            super().__init__()

        def wrap_key(self, key: bytes, master: str) -> bytes:
            return base64.b64encode(key)

        def unwrap_key(self, wrapped: bytes, master: str) -> bytes:
            return base64.b64decode(wrapped)

    keys = {"footer": "0123456789012345", "col": "1234567890123450"}
    config = pe.EncryptionConfiguration(
        footer_key="footer",
        column_keys={"col": ["b"]},
        plaintext_footer=plaintext_footer,
        double_wrapping=False,
    )
    props = pe.CryptoFactory(Kms).file_encryption_properties(
        pe.KmsConnectionConfig(custom_kms_conf=keys), config
    )
    with pq.ParquetWriter(path, table.schema, encryption_properties=props) as w:
        w.write_table(table)


def test_encrypted_columns_are_named_not_reported_as_damage(tmp_path) -> None:
    """A column encrypted with Parquet modular encryption cannot be decrypted: with a plaintext
    footer the error names the column and the encryption (not a page header that does not
    parse), and the columns left plain still read."""
    from recis_io import SchemaError

    table = pa.table({"a": list(range(10)), "b": [f"x{i}" for i in range(10)]})
    path = tmp_path / "t.parquet"
    write_encrypted(path, table, plaintext_footer=True)
    for columns in (None, ["a", "b"]):
        with pytest.raises(SchemaError, match=r"column 'b' is encrypted .*t\.parquet"):
            Dataset(path, batch_size=4, columns=columns)
    check_reads_like_pyarrow(path, table.select(["a"]))


def test_encrypted_footer_is_named(tmp_path) -> None:
    from recis_io import SchemaError

    table = pa.table({"a": list(range(10)), "b": [f"x{i}" for i in range(10)]})
    path = tmp_path / "t.parquet"
    write_encrypted(path, table, plaintext_footer=False)
    with pytest.raises(SchemaError, match=r"t\.parquet has an encrypted footer"):
        Dataset(path, batch_size=4, columns=["a"])
