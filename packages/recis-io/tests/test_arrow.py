"""`Batch.to_arrow()` of batches whose ragged values are empty (only empty strings or lists)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from recis_io import Dataset

from .conftest import write

COLUMNS = {
    "s": pa.array(["", "", ""]),
    "b": pa.array([b"", b"", b""]),
    "ls": pa.array([[""], [], ["", ""]], pa.list_(pa.string())),
    "lls": pa.array([[[""]], [[]], []], pa.list_(pa.list_(pa.string()))),
    "l": pa.array([[], [], []], pa.list_(pa.int64())),
    "ll": pa.array([[[]], [], [[], []]], pa.list_(pa.list_(pa.int32()))),
}


@pytest.mark.parametrize("name", list(COLUMNS))
def test_batches_with_empty_values_convert_to_arrow(tmp_path, fmt: str, name: str) -> None:
    table = pa.table({name: COLUMNS[name], "id": pa.array([1, 2, 3])})
    path = write(table, tmp_path / f"e.{fmt}", fmt, 3)
    batch = next(iter(Dataset(path, batch_size=3)))
    rb = batch.to_arrow()
    assert rb.column(name).to_pylist() == table.column(name).to_pylist()
    assert pa.record_batch(batch).equals(rb)
    # Columns with values still share the batch's memory.
    assert rb.column("id").buffers()[1].address == batch["id"].data_ptr()


def test_binary_exports_as_binary_whatever_its_fields_are_named(tmp_path) -> None:
    # Text or bytes was told by searching the printed type for "Utf8", which a list item's
    # field name can hold: invalid UTF-8 bytes then went out in a string array.
    import pyarrow.parquet as pq

    path = tmp_path / "b.parquet"
    kind = pa.list_(pa.field("Utf8_bytes", pa.binary()))
    table = pa.table({"b": pa.array([[b"\xff\xfe"], [b"ok"]], kind)})
    pq.write_table(table, path, use_compliant_nested_type=False)
    out = next(iter(Dataset(path, batch_size=2))).to_arrow()
    assert out.schema.field("b").type == pa.large_list(pa.large_binary())
    out.validate(full=True)
    assert out.column("b").to_pylist() == [[b"\xff\xfe"], [b"ok"]]


def test_to_arrow_without_pyarrow_names_the_extra(tmp_path, monkeypatch) -> None:
    import sys

    path = write(pa.table({"id": pa.array([1, 2, 3])}), tmp_path / "p.parquet", "parquet", 3)
    batch = next(iter(Dataset(path, batch_size=3)))
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'recis-io\[arrow\]'"):
        batch.to_arrow()
