from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pytest
import torch

FORMATS = ("parquet", "orc")


def write(table: pa.Table, path: Path, fmt: str, rows_per_group: int) -> Path:
    """Writes ``table`` with row groups (Parquet) or stripes (ORC) of about ``rows_per_group``."""
    if fmt == "parquet":
        pq.write_table(table, path, row_group_size=rows_per_group, compression="zstd")
    else:
        # ORC stripes are cut by bytes, not rows: write slices as separate files' worth of
        # stripes is not possible, so a small stripe size yields several stripes.
        orc.write_table(table, path, stripe_size=max(1024, rows_per_group * 8), compression="zstd")
    return path


@pytest.fixture(params=FORMATS)
def fmt(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(
    params=[
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
            ],
        ),
    ]
)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


def ids_table(rows: int, start: int = 0) -> pa.Table:
    ids = list(range(start, start + rows))
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "seq": pa.array([[i] * (i % 4) for i in ids], pa.list_(pa.int64())),
        }
    )


def write_ids(tmp: Path, fmt: str, rows_per_file: list[int], group: int) -> list[Path]:
    paths = []
    start = 0
    for i, rows in enumerate(rows_per_file):
        p = write(ids_table(rows, start), tmp / f"part-{i}.{fmt}", fmt, group)
        paths.append(p)
        start += rows
    return paths
