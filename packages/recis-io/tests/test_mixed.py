"""Parquet files mixing columns the reader decodes directly with columns it reads through Arrow.

Every case compares with values computed from pyarrow, for shards that start in the middle of a
row group, with dictionary and plain string pages, and with several pages per column chunk.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import recis_io
from recis_io import Column, Dataset, Ragged

N = 203
WORLD = 3


def words(i: int) -> str | None:
    """A string column value: few distinct values (dictionary friendly), some nulls and ''."""
    if i % 7 == 3:
        return None
    return "" if i % 11 == 0 else f"w{i % 13}-" + "x" * (i % 40)


def table() -> pa.Table:
    rows = range(N)
    return pa.table(
        {
            "i": pa.array([None if i % 3 == 0 else i * 2**33 for i in rows], pa.int64()),
            "f": pa.array([None if i % 4 == 1 else i / 4 for i in rows], pa.float32()),
            "r": pa.array(list(rows), pa.int32()),
            "s": pa.array([words(i) for i in rows], pa.string()),
            "u": pa.array([f"unique-{i}" * (1 + i % 3) for i in rows], pa.string()),
            "bin": pa.array([bytes([i % 256, 0, 255]) * (i % 3) for i in rows], pa.binary()),
            "ls": pa.array(
                [None if i % 9 == 4 else [words(i + j) for j in range(i % 4)] for i in rows],
                pa.list_(pa.string()),
            ),
            "l": pa.array(
                [None if i % 5 == 0 else [i, None, -i][: i % 4] for i in rows],
                pa.list_(pa.int64()),
            ),
            "b": pa.array([i % 2 == 0 for i in rows], pa.bool_()),
            "i16": pa.array([i - 100 for i in rows], pa.int16()),
        }
    )


def write_variants(tmp: Path) -> list[Path]:
    """The same table as dictionary, plain, and dictionary-then-plain (tiny dictionary limit)."""
    t = table()
    paths = []
    for name, kwargs in {
        "dict": {},
        "plain": {"use_dictionary": False},
        "fallback": {"dictionary_pagesize_limit": 64, "data_page_size": 256},
        "pages": {"data_page_size": 128, "write_batch_size": 16},
    }.items():
        path = tmp / f"{name}.parquet"
        pq.write_table(t, path, row_group_size=37, compression="zstd", **kwargs)
        paths.append(path)
    return paths


def signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def hashed(s: str | bytes, kind: str, buckets: int = 0) -> int:
    data = s.encode() if isinstance(s, str) else s
    return recis_io.hash_bytes(data, kind, buckets)


COLUMNS = {
    "i": Column("i", fill=-1),
    "f": "f",
    "r": "r",
    "s": Column("s", fill="?"),
    "s#farm": Column("s", fill=-5, hash="farm"),
    "u": Column("u", hash="murmur", buckets=1000),
    "bin": "bin",
    "ls": Column("ls", fill="-"),
    "ls#farm": Column("ls", fill=0, hash="farm"),
    "l": Column("l", fill=7),
    "b": "b",
    "i16": Column("i16", fill=0, dtype="int64"),
}
TEXT = {"s", "bin", "ls"}


def expected(rows: range) -> dict[str, list]:
    t = table().to_pydict()
    sel = {k: [v[i] for i in rows] for k, v in t.items()}
    return {
        "i": [-1 if v is None else v for v in sel["i"]],
        "f": [math.nan if v is None else v for v in sel["f"]],
        "r": sel["r"],
        "s": [b"?" if v is None else v.encode() for v in sel["s"]],
        "s#farm": [-5 if v is None else hashed(v, "farm") for v in sel["s"]],
        "u": [hashed(v, "murmur", 1000) for v in sel["u"]],
        "bin": sel["bin"],
        "ls": [[b"-" if w is None else w.encode() for w in v or []] for v in sel["ls"]],
        "ls#farm": [[0 if w is None else hashed(w, "farm") for w in v or []] for v in sel["ls"]],
        "l": [[7 if x is None else x for x in v or []] for v in sel["l"]],
        "b": sel["b"],
        "i16": sel["i16"],
    }


def read(path: Path, rank: int, batch_size: int) -> dict[str, list]:
    """Reads each column of ``COLUMNS`` on its own, keyed like ``COLUMNS``."""
    out: dict[str, list] = {}
    for key, col in COLUMNS.items():
        ds = Dataset(path, batch_size=batch_size, columns=[col], rank=rank, world_size=WORLD)
        values: list = []
        for batch in ds:
            v = next(iter(batch.values()))
            if isinstance(v, Ragged):
                rows = [v.row(i) for i in range(len(v))]
                if key in TEXT and len(v.offsets) == 2:
                    values.extend([bytes(x) for x in r] for r in rows)
                elif key in TEXT:
                    values.extend(bytes(r) for r in rows)
                else:
                    values.extend(rows)
            else:
                values.extend(v.tolist())
        out[key] = values
    return out


def shard_rows(rank: int) -> range:
    per = N // WORLD
    return range(rank * per, (rank + 1) * per)


def same(got: dict[str, list], exp: dict[str, list]) -> None:
    for key, values in exp.items():
        if key == "f":
            a = [None if math.isnan(x) else x for x in got[key]]
            b = [None if math.isnan(x) else x for x in values]
            assert a == b, key
        else:
            assert got[key] == values, key


@pytest.mark.parametrize("rank", range(WORLD))
def test_mixed_columns_equal_pyarrow(tmp_path, rank: int) -> None:
    for path in write_variants(tmp_path):
        got = read(path, rank, batch_size=10)
        same(got, expected(shard_rows(rank)))


def test_all_columns_in_one_dataset(tmp_path) -> None:
    # Number, string, hashed, list and Arrow-only columns side by side in one reader: the
    # direct and Arrow parts of each chunk must line up row for row.
    cols = [
        Column("i", fill=-1),
        Column("s", fill=-5, hash="farm"),
        "bin",
        Column("ls", fill="-"),
        Column("l", fill=7),
        "b",
        Column("i16", fill=0, dtype="int64"),
        "r",
    ]
    for path in write_variants(tmp_path):
        for rank in range(WORLD):
            exp = expected(shard_rows(rank))
            ds = Dataset(path, batch_size=16, columns=cols, rank=rank, world_size=WORLD)
            got: dict[str, list] = {}
            for batch in ds:
                got.setdefault("i", []).extend(batch["i"].tolist())
                got.setdefault("s#farm", []).extend(batch["s"].tolist())
                binv = batch["bin"]
                got.setdefault("bin", []).extend(bytes(binv.row(k)) for k in range(len(binv)))
                ls = batch["ls"]
                got.setdefault("ls", []).extend(
                    [bytes(x) for x in ls.row(k)] for k in range(len(ls))
                )
                lv = batch["l"]
                got.setdefault("l", []).extend(lv.row(k) for k in range(len(lv)))
                got.setdefault("b", []).extend(batch["b"].tolist())
                got.setdefault("i16", []).extend(batch["i16"].tolist())
                got.setdefault("r", []).extend(batch["r"].tolist())
            for key, values in got.items():
                assert values == exp[key], (path.name, rank, key)


def test_string_nulls_without_fill_fail(tmp_path) -> None:
    path = write_variants(tmp_path)[0]
    with pytest.raises(recis_io.exceptions.SchemaError, match="column 's' has nulls"):
        list(Dataset(path, batch_size=50, columns=["r", "s"]))
    with pytest.raises(recis_io.exceptions.SchemaError, match="column 's' has nulls"):
        list(Dataset(path, batch_size=50, columns=["r", Column("s", hash="farm")]))


def test_small_decode_chunks(tmp_path) -> None:
    # Chunks of 4 rows (set before the reader starts, so in a fresh process): direct and Arrow
    # columns meet at many chunk edges, and dictionary hashes carry over from chunk to chunk.
    root = Path(__file__).resolve().parent.parent
    code = (
        "import pathlib, sys; from tests import test_mixed as t; p = pathlib.Path(sys.argv[1]); "
        "t.test_all_columns_in_one_dataset(p); t.test_mixed_columns_equal_pyarrow(p, 1)"
    )
    env = {**os.environ, "RECIS_IO_DECODE_ROWS": "4"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
