"""The seeded click-log generator of benchmarks/data.py: schema, determinism, statistics."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pytest


def test_schema(data) -> None:
    table = data.generate_table(1000, seed=1)
    names = table.schema.names
    assert names[0] == "label"
    assert names[1:14] == [f"I{i}" for i in range(1, 14)]
    assert names[14:40] == [f"C{i}" for i in range(1, 27)]
    assert names[40] == "seq"
    assert table.schema.field("seq").type == pa.list_(pa.int64())
    assert table.schema.field("C7").type == pa.int64()
    assert table.schema.field("I3").type == pa.float32()
    strings = data.generate_table(1000, seed=1, strings=True)
    assert strings.schema.field("C7").type == pa.string()
    assert strings["C7"].to_pylist() == [str(v) for v in table["C7"].to_pylist()]


def test_same_seed_same_rows_and_slices_agree(data) -> None:
    whole = data.generate_table(140_000, seed=7, signal=True)
    again = data.generate_table(140_000, seed=7, signal=True)
    assert whole.equals(again)
    part = data.generate_table(5_000, seed=7, signal=True, start=65_000)
    assert part.equals(whole.slice(65_000, 5_000))
    other = data.generate_table(1_000, seed=8, signal=True)
    assert not other.equals(whole.slice(0, 1_000))


def test_statistics_match_the_workload(data) -> None:
    table = data.generate_table(65_536, seed=0)
    lengths = pc.list_value_length(table["seq"])
    assert 25 < pc.mean(lengths).as_py() < 35
    assert pc.min(lengths).as_py() == 0
    assert pc.max(lengths).as_py() <= 100
    assert 0.08 < table["I1"].null_count / table.num_rows < 0.12
    # Zipf: the most frequent id of a large vocabulary is far above uniform.
    counts = pc.value_counts(table["C26"]).field("counts")
    assert pc.max(counts).as_py() > 100


def test_signal_labels(data) -> None:
    table = data.generate_table(65_536, seed=0, signal=True)
    click = table["label"].to_numpy()
    conversion = table["conversion"].to_numpy()
    assert 0.1 < click.mean() < 0.6
    assert conversion.sum() > 0
    assert not (conversion & ~click.astype(bool)).any(), "conversion without a click"


@pytest.mark.parametrize("fmt", ["parquet", "orc"])
def test_write_dataset_splits_rows_over_files(tmp_path, data, fmt) -> None:
    paths = data.write_dataset(tmp_path, rows=10_001, files=3, row_group_size=2_000, format=fmt)
    assert [p.name for p in paths] == [f"part-0000{i}.{fmt}" for i in range(3)]
    read = pq.read_table if fmt == "parquet" else orc.read_table
    tables = [read(p) for p in paths]
    assert [t.num_rows for t in tables] == [3334, 3334, 3333]
    assert pa.concat_tables(tables).equals(data.generate_table(10_001))
    if fmt == "parquet":
        assert pq.ParquetFile(paths[0]).metadata.num_row_groups == 2


def test_bad_arguments(tmp_path, data) -> None:
    with pytest.raises(ValueError, match="format must be"):
        data.write_dataset(tmp_path, rows=10, format="csv")
    with pytest.raises(ValueError, match="rows must be"):
        data.generate_table(-1)
