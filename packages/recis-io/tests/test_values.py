from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch

from recis_io import Batch, Column, Dataset, Ragged
from recis_io.exceptions import InvalidArgumentError, SchemaError

from .conftest import write

N = 97


def rows_of(batch: Batch, name: str, text: bool = False) -> list:
    col = batch[name]
    if isinstance(col, Ragged):
        rows = [col.row(i) for i in range(len(col))]
        if text and len(col.offsets) == 2:
            return [[bytes(x).decode() for x in r] for r in rows]
        if text:
            return [bytes(r).decode() for r in rows]
        return rows
    return col.tolist()


def collect(ds: Dataset, text: frozenset[str] = frozenset()) -> dict[str, list]:
    out: dict[str, list] = {}
    for batch in ds:
        for name in batch:
            out.setdefault(name, []).extend(rows_of(batch, name, name in text))
    return out


def base_table(fmt: str) -> pa.Table:
    cols = {
        "i8": pa.array([i % 100 - 50 for i in range(N)], pa.int8()),
        "i16": pa.array([i * 300 - 9000 for i in range(N)], pa.int16()),
        "i32": pa.array([i * 70000 for i in range(N)], pa.int32()),
        "i64": pa.array([i * 2**40 - 2**50 for i in range(N)], pa.int64()),
        "f32": pa.array([i / 3 for i in range(N)], pa.float32()),
        "f64": pa.array([i / 7 - 3 for i in range(N)], pa.float64()),
        "b": pa.array([i % 3 == 0 for i in range(N)], pa.bool_()),
        "s": pa.array([f"row-{i}" * (i % 4) for i in range(N)], pa.string()),
        "l": pa.array([list(range(i, i + i % 5)) for i in range(N)], pa.list_(pa.int64())),
        "ll": pa.array(
            [[[j] * (j % 3) for j in range(i % 4)] for i in range(N)],
            pa.list_(pa.list_(pa.int32())),
        ),
        "ls": pa.array([[f"w{j}" for j in range(i % 3)] for i in range(N)], pa.list_(pa.string())),
    }
    if fmt == "parquet":
        cols["u8"] = pa.array([i % 256 for i in range(N)], pa.uint8())
        cols["u64"] = pa.array([2**63 + i for i in range(N)], pa.uint64())
        cols["fx"] = pa.array([[i, i + 0.5, -i] for i in range(N)], pa.list_(pa.float32(), 3))
    return pa.table(cols)


@pytest.mark.parametrize("batch_size", [1, 10, 32, 200])
def test_values_equal_pyarrow(tmp_path, fmt: str, batch_size: int) -> None:
    table = base_table(fmt)
    path = write(table, tmp_path / f"t.{fmt}", fmt, 16)
    got = collect(Dataset(path, batch_size=batch_size), text=frozenset({"s", "ls"}))
    expected = table.to_pydict()
    assert set(got) == set(expected)
    for name, values in expected.items():
        if name.startswith("f"):
            flat_got = torch.tensor(got[name]).flatten().tolist()
            flat_exp = torch.tensor(values, dtype=torch.float64).flatten().tolist()
            assert flat_got == pytest.approx(flat_exp, rel=1e-6), name
        else:
            assert got[name] == values, name


def test_dtypes_and_shapes(tmp_path) -> None:
    path = write(base_table("parquet"), tmp_path / "t.parquet", "parquet", 50)
    batch = next(iter(Dataset(path, batch_size=8)))
    assert len(batch) == 8
    assert batch["i8"].dtype == torch.int8
    assert batch["b"].dtype == torch.bool
    assert batch["u64"].dtype == torch.uint64
    assert batch["fx"].shape == (8, 3)
    assert batch["f32"].shape == (8,)
    ll = batch["ll"]
    assert isinstance(ll, Ragged)
    assert len(ll.offsets) == 2
    assert all(o.dtype == torch.int64 for o in ll.offsets)
    assert ll.offsets[0].shape == (9,)
    assert ll.offsets[0][0] == 0
    # Every column is a view into the one batch buffer.
    base = batch.buffer.data_ptr()
    end = base + batch.buffer.numel()
    for value in batch.values():
        tensors = [value.values, *value.offsets] if isinstance(value, Ragged) else [value]
        for t in tensors:
            assert base <= t.data_ptr() <= end


def test_nulls_with_and_without_fill(tmp_path, fmt: str) -> None:
    table = pa.table(
        {
            "i": pa.array([1, None, 3, None], pa.int64()),
            "f": pa.array([1.5, None, None, 4.0], pa.float64()),
            "b": pa.array([True, None, False, None], pa.bool_()),
            "s": pa.array(["a", None, "c", None], pa.string()),
            "l": pa.array([[1, None], None, [], [None]], pa.list_(pa.int64())),
        }
    )
    path = write(table, tmp_path / f"n.{fmt}", fmt, 2)
    cols = [
        Column("i", fill=-1),
        "f",
        Column("b", fill=True),
        Column("s", fill="?"),
        Column("l", fill=0),
    ]
    got = collect(Dataset(path, batch_size=3, columns=cols), text=frozenset({"s"}))
    assert got["i"] == [1, -1, 3, -1]
    assert got["f"][0] == 1.5
    assert math.isnan(got["f"][1])
    assert math.isnan(got["f"][2])
    assert got["b"] == [True, True, False, True]
    assert got["s"] == ["a", "?", "c", "?"]
    # A null list reads as an empty list; null elements take the fill.
    assert got["l"] == [[1, 0], [], [], [0]]
    cast = collect(Dataset(path, batch_size=4, columns=[Column("i", fill=9, dtype="float32")]))
    assert cast["i"] == [1.0, 9.0, 3.0, 9.0]


def test_number_columns_match_across_decode_paths(tmp_path, fmt: str) -> None:
    # Number columns alone take the direct Parquet path; next to a string column every column
    # goes through Arrow. Both must give the same values, also for a shard starting mid-group.
    n = 50
    table = pa.table(
        {
            "i": pa.array([None if i % 3 == 0 else i for i in range(n)], pa.int64()),
            "f": pa.array([None if i % 4 == 1 else i / 2 for i in range(n)], pa.float32()),
            "r": pa.array(range(n), pa.int32()),
            "l": pa.array(
                [None if i % 5 == 0 else [i, None][: i % 3] for i in range(n)],
                pa.list_(pa.int64()),
            ),
            "s": pa.array([str(i) for i in range(n)], pa.string()),
        }
    )
    schema = table.schema.set(2, pa.field("r", pa.int32(), nullable=False))
    path = write(table.cast(schema), tmp_path / f"d.{fmt}", fmt, 7)
    numbers = [Column("i", fill=-1), "f", "r", Column("l", fill=7)]
    for rank in range(3):
        direct = collect(Dataset(path, batch_size=6, columns=numbers, rank=rank, world_size=3))
        mixed = collect(
            Dataset(path, batch_size=6, columns=[*numbers, "s"], rank=rank, world_size=3)
        )
        rows = range(rank * 16, rank * 16 + 16)
        assert direct["i"] == mixed["i"] == [-1 if i % 3 == 0 else i for i in rows]
        f = [None if i % 4 == 1 else i / 2 for i in rows]
        for got in (direct["f"], mixed["f"]):
            assert [None if math.isnan(x) else x for x in got] == f
        assert direct["r"] == mixed["r"] == list(rows)
        lists = [[] if i % 5 == 0 else [i, 7][: i % 3] for i in rows]
        assert direct["l"] == mixed["l"] == lists
    with pytest.raises(SchemaError, match="column 'i' has nulls and no fill value"):
        collect(Dataset(path, batch_size=6, columns=["i"]))


def test_column_order_and_projection(tmp_path, fmt: str) -> None:
    path = write(base_table(fmt), tmp_path / f"t.{fmt}", fmt, 30)
    batch = next(iter(Dataset(path, batch_size=5, columns=["l", "i8"])))
    assert list(batch) == ["l", "i8"]
    assert batch["i8"].tolist() == [-50, -49, -48, -47, -46]


def test_batches_span_row_groups_and_last_is_smaller(tmp_path, fmt: str) -> None:
    table = pa.table({"x": pa.array(range(103), pa.int64())})
    path = write(table, tmp_path / f"x.{fmt}", fmt, 10)
    sizes = [len(b) for b in Dataset(path, batch_size=25)]
    assert sizes == [25, 25, 25, 25, 3]
    sizes = [len(b) for b in Dataset(path, batch_size=25, drop_last=True)]
    assert sizes == [25, 25, 25, 25]


def test_to_arrow_round_trips(tmp_path) -> None:
    table = base_table("parquet").drop_columns(["ll"])
    path = write(table, tmp_path / "t.parquet", "parquet", 40)
    batch = next(iter(Dataset(path, batch_size=N)))
    rb = batch.to_arrow()
    assert rb.num_rows == N
    for name in table.column_names:
        assert rb.column(name).to_pylist() == table.column(name).to_pylist(), name


def test_batch_to_device_is_one_copy(tmp_path, device: str) -> None:
    path = write(base_table("parquet"), tmp_path / "t.parquet", "parquet", 40)
    batch = next(iter(Dataset(path, batch_size=16)))
    moved = batch.to(device, non_blocking=True)
    assert moved.device.type == device
    assert moved["l"].values.tolist() == batch["l"].values.tolist()
    assert moved["fx"].tolist() == batch["fx"].tolist()
    assert moved["i64"].data_ptr() - moved.buffer.data_ptr() == (
        batch["i64"].data_ptr() - batch.buffer.data_ptr()
    )


@pytest.mark.parametrize("target", [torch.float32, torch.int64, "bogus"])
def test_batch_to_refuses_what_is_not_a_device(tmp_path, target) -> None:
    # Converting the one uint8 buffer to a dtype would reinterpret every column's bytes.
    path = write(base_table("parquet"), tmp_path / "t.parquet", "parquet", 40)
    batch = next(iter(Dataset(path, batch_size=16)))
    with pytest.raises(InvalidArgumentError, match=r"Batch\.to takes a device"):
        batch.to(target)
    with pytest.raises(InvalidArgumentError, match=r"Ragged\.to takes a device"):
        batch["ll"].to(target)
    assert batch.to(torch.device("cpu"))["i64"].tolist() == batch["i64"].tolist()
    assert batch["ll"].to("cpu").offsets[1].dtype == torch.int64


def test_buffers_are_reused_only_after_batches_are_dropped(tmp_path) -> None:
    table = pa.table({"x": pa.array(range(100), pa.int64())})
    path = write(table, tmp_path / "r.parquet", "parquet", 10)
    it = iter(Dataset(path, batch_size=16, prefetch=1))
    first = next(it)
    ptr = first.buffer.data_ptr()
    kept = next(it)
    assert kept.buffer.data_ptr() != ptr
    del first
    third = next(it)
    assert third.buffer.data_ptr() == ptr
    assert kept["x"].tolist() == list(range(16, 32))
    assert third["x"].tolist() == list(range(32, 48))


def test_arrow_pycapsule_interface_shares_the_batch_memory(tmp_path) -> None:
    table = base_table("parquet").drop_columns(["ll"])
    path = write(table, tmp_path / "t.parquet", "parquet", 40)
    batch = next(iter(Dataset(path, batch_size=N)))
    # Any Arrow consumer takes the batch through the C data interface.
    rb = pa.record_batch(batch)
    assert rb.equals(batch.to_arrow())
    assert pa.schema(batch) == rb.schema
    assert rb.column("i64").buffers()[1].address == batch["i64"].data_ptr()
    assert rb.column("l").values.buffers()[1].address == batch["l"].values.data_ptr()
    del batch  # the arrays keep the batch's buffer alive
    assert rb.column("i64").to_pylist() == table.column("i64").to_pylist()[:N]


def test_ragged_row_counts_negative_indices_from_the_end() -> None:
    rows = Ragged(torch.tensor([1, 2, 3]), (torch.tensor([0, 2, 2, 3]),))
    assert [rows.row(i) for i in (-3, -2, -1, 0, 2)] == [[1, 2], [], [3], [1, 2], [3]]
    for bad in (3, -4):
        with pytest.raises(IndexError, match=f"row {bad} is out of range for 3 rows"):
            rows.row(bad)
