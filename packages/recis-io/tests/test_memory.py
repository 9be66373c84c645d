"""Memory stays bounded by ``prefetch`` batches, whatever the data set size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ._peak import PRINT_PEAK_KIB

_READ = (
    """
import sys
import recis_io
rows = 0
for batch in recis_io.Dataset(sys.argv[1], batch_size=8192, num_threads=2, prefetch=2):
    rows += len(batch)
print(rows)
"""
    + PRINT_PEAK_KIB
)


def _write(directory: Path, files: int, rows_per_file: int) -> None:
    directory.mkdir()
    rng = np.random.default_rng(0)
    for i in range(files):
        table = pa.table(
            {
                "id": pa.array(rng.integers(0, 1 << 62, rows_per_file)),
                "x": pa.array(rng.random(rows_per_file)),
            }
        )
        pq.write_table(table, directory / f"part-{i}.parquet", row_group_size=65_536)


def _peak_kib(directory: Path) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", _READ, str(directory)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout.split()
    return int(out[0]), int(out[1])


def test_peak_memory_does_not_grow_with_the_data_set(tmp_path) -> None:
    rows_per_file = 500_000
    _write(tmp_path / "small", 1, rows_per_file)
    _write(tmp_path / "large", 8, rows_per_file)  # 4M rows, 64 MB of decoded values
    small_rows, small_peak = _peak_kib(tmp_path / "small")
    large_rows, large_peak = _peak_kib(tmp_path / "large")
    assert (small_rows, large_rows) == (rows_per_file, 8 * rows_per_file)
    # Holding the extra 56 MB of decoded values would show; a bounded reader's peak is the
    # same up to allocator noise.
    assert large_peak - small_peak < 16 * 1024, (small_peak, large_peak)
