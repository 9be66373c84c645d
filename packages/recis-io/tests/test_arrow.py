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
