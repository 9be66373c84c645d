"""Batches packed on the decode threads.

For CPU batches of at least 1024 rows without shuffling, files whose columns all decode
directly are read in chunks cut at batch boundaries, and a batch that is one whole chunk is
handed out as the chunk's own buffer. These tests use row groups that do not line up with
batches (so batches are both whole chunks and pieces of several chunks) and compare every value
with pyarrow, while holding earlier batches alive.
"""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import recis_io._dataset as dataset_module
from recis_io import Column, Dataset, Ragged

BATCH = 1024
FILL = -7.0


def table(n: int, seed: int) -> pa.Table:
    rows = range(seed, seed + n)
    return pa.table(
        {
            "id": pa.array([i * 2**33 + 1 for i in rows], pa.int64()),
            "f": pa.array([None if i % 5 == 1 else i / 8 for i in rows], pa.float32()),
            "n": pa.array([i % 1000 for i in rows], pa.int32()),
            "seq": pa.array(
                [None if i % 9 == 4 else [i, i + 1, -i][: i % 4] for i in rows],
                pa.list_(pa.int64()),
            ),
            "d": pa.array([i * 0.5 for i in rows], pa.float64()),
        }
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("packing")
    paths = []
    for k, (n, group) in enumerate([(2500, 1100), (3000, 1024), (1700, 1700)]):
        p = tmp / f"part-{k}.parquet"
        pq.write_table(table(n, 10_000 * k), p, row_group_size=group)
        paths.append(p)
    return paths


COLUMNS = ["id", Column("f", fill=FILL), "n", "seq", "d"]


def expected(files: list[Path]) -> dict[str, list]:
    t = pa.concat_tables([pq.read_table(p) for p in files])
    out = {name: t[name].to_pylist() for name in t.column_names}
    out["f"] = [FILL if v is None else v for v in out["f"]]
    out["seq"] = [v or [] for v in out["seq"]]
    return out


def rows_of(batches: list, name: str) -> list:
    out: list = []
    for b in batches:
        col = b[name]
        if isinstance(col, Ragged):
            out += [col.row(i) for i in range(len(col))]
        else:
            out += col.tolist()
    return out


def check(batches: list, want: dict[str, list], start: int = 0) -> None:
    for name, values in want.items():
        got = rows_of(batches, name)
        assert len(got) == len(values) - start, name
        for i, (g, w) in enumerate(zip(got, values[start:], strict=True)):
            same = g == w or (isinstance(w, float) and math.isclose(g, w, rel_tol=1e-6))
            assert same, f"column {name}, row {start + i}: {g!r} != {w!r}"


def test_packed_batches_equal_pyarrow_while_earlier_batches_are_held(files: list[Path]) -> None:
    ds = Dataset(files, batch_size=BATCH, columns=COLUMNS, num_threads=2, prefetch=1)
    want = expected(files)
    for _ in range(2):  # the second pass reuses the reader and its buffers
        batches = list(ds)
        assert [len(b) for b in batches] == [BATCH] * 7 + [7200 - 7 * BATCH]
        check(batches, want)
        # Every batch owns distinct memory (packed chunks are never recycled under a batch).
        ptrs = {b.buffer.data_ptr() for b in batches}
        assert len(ptrs) == len(batches)


def test_packing_matches_unpacked_reading(files: list[Path], monkeypatch) -> None:
    def read(pack: bool) -> list:
        make = dataset_module.Reader
        monkeypatch.setattr(
            dataset_module, "Reader", lambda *a, **k: make(*a, **{**k, "pack": pack})
        )
        ds = Dataset(files, batch_size=BATCH, columns=COLUMNS, drop_last=True)
        batches = list(ds)
        monkeypatch.setattr(dataset_module, "Reader", make)
        return batches

    packed, plain = read(True), read(False)
    assert len(packed) == len(plain) == 7
    for a, b in zip(packed, plain, strict=True):
        for name in a:
            x, y = a[name], b[name]
            if isinstance(x, Ragged):
                assert torch.equal(x.values, y.values)
                assert all(torch.equal(p, q) for p, q in zip(x.offsets, y.offsets, strict=True))
            else:
                assert torch.equal(x, y), name


def test_resume_and_shards_with_packing(files: list[Path]) -> None:
    want = expected(files)
    ds = Dataset(files, batch_size=BATCH, columns=COLUMNS)
    it = iter(ds)
    head = [next(it) for _ in range(3)]
    state = ds.state_dict()
    del it
    again = Dataset(files, batch_size=BATCH, columns=COLUMNS)
    again.load_state_dict(state)
    check(head + list(again), want)

    for rank in range(2):
        shard = Dataset(
            files, batch_size=BATCH, columns=COLUMNS, rank=rank, world_size=2, num_threads=1
        )
        per = 7200 // 2
        sub = {k: v[rank * per : (rank + 1) * per] for k, v in want.items()}
        check(list(shard), sub)


def test_shuffled_batches_keep_every_row_whole(files: list[Path]) -> None:
    """Shuffled batches are gathered row by row (in source order, written to their places):
    every row's columns must still belong to one source row, each row read exactly once."""
    want = expected(files)
    index = {v: i for i, v in enumerate(want["id"])}
    ds = Dataset(files, batch_size=500, columns=COLUMNS, shuffle=True, seed=3, shuffle_window=2000)
    seen = []
    for batch in ds:
        ids = batch["id"].tolist()
        for name in ("f", "n", "d", "seq"):
            got = rows_of([batch], name)
            for v, g in zip(ids, got, strict=True):
                w = want[name][index[v]]
                same = g == w or (isinstance(w, float) and math.isclose(g, w, rel_tol=1e-6))
                assert same, f"column {name} of the row with id {v}: {g!r} != {w!r}"
        seen += ids
    assert sorted(seen) == sorted(want["id"])
    assert seen != want["id"]


def test_shuffled_strings_and_nested_lists_keep_every_row_whole(tmp_path: Path) -> None:
    """Shuffled gathering of string columns (one offsets level over bytes, short and long) and
    of nested lists (two offsets levels): every row equals its source row."""
    n = 3000
    rows = range(n)
    t = pa.table(
        {
            "id": pa.array(rows, pa.int64()),
            # Lengths 0..40 cover the short-copy cases (under 4, 4-7, 8-16 bytes) and memcpy.
            "s": pa.array(["x" * (i % 41) + str(i) * (i % 3) for i in rows]),
            "nest": pa.array(
                [[[i, -i][: j % 3] for j in range(i % 4)] for i in rows],
                pa.list_(pa.list_(pa.int64())),
            ),
        }
    )
    path = tmp_path / "strings.parquet"
    pq.write_table(t, path, row_group_size=700)
    want = {name: t[name].to_pylist() for name in t.column_names}
    ds = Dataset([path], batch_size=400, shuffle=True, seed=5, shuffle_window=1500)
    seen = []
    for batch in ds:
        ids = batch["id"].tolist()
        strings = [bytes(r).decode() for r in rows_of([batch], "s")]
        for i, s, nested in zip(ids, strings, rows_of([batch], "nest"), strict=True):
            assert s == want["s"][i], f"row {i}"
            assert nested == want["nest"][i], f"row {i}"
        seen += ids
    assert sorted(seen) == list(rows)
    assert seen != list(rows)


def _stream(ds: Dataset, reader, stop_after: int | None = None) -> list[tuple[dict, tuple]]:
    """Every batch of ``reader`` as (columns as lists, cursor after it)."""
    from recis_io._batch import Batch

    out = []
    while reader.prepare() is not None:
        capsule, layout = reader.fill_owned()
        reader.release_held()  # stored: the next prepare reads on
        batch = Batch(torch.utils.dlpack.from_dlpack(capsule), ds._infos, layout)
        columns = {name: rows_of([batch], name) for name in ("id", "f", "n", "seq", "d")}
        out.append((columns, tuple(reader.cursor())))
        if stop_after is not None and len(out) == stop_after:
            break
    return out


@pytest.mark.parametrize("epochs", [1, 2])
def test_batches_assembled_ahead_equal_those_assembled_in_turn(files, epochs) -> None:
    """Shuffled CPU batches are assembled on a thread of their own (``pack=True``); they,
    their layouts and the cursor after each must be those of assembling in turn."""
    from recis_io._recis_io import Reader

    ds = Dataset(files, batch_size=700, columns=COLUMNS, shuffle=True, seed=5, epochs=epochs)
    specs = [c._spec() for c in ds.columns]

    def reader(ahead: bool) -> Reader:
        return Reader(
            ds._files, specs, batch_size=700, drop_last=False, shuffle=True, seed=5,
            window=ds.shuffle_window, shard=0, shards=1, epochs=epochs, num_threads=2,
            prefetch=2, pack=ahead,
        )  # fmt: skip

    in_turn = _stream(ds, reader(False))
    assert len(in_turn) == epochs * math.ceil(7200 / 700)
    assert _stream(ds, reader(True)) == in_turn
    # Stopping, seeking back and pausing restart the thread at the cursor.
    r = reader(True)
    head = _stream(ds, r, stop_after=4)
    r.seek(*head[1][1])
    r.pause()
    assert head[:2] + _stream(ds, r) == in_turn
    r.seek(0, 0)
    assert r.prepare() is not None  # received, not handed out: the cursor stays
    assert tuple(r.cursor()) == (0, 0)
    r.seek(0, 0)
    assert _stream(ds, r) == in_turn
