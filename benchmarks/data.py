"""Seeded Criteo-like click-log generator (docs/benchmarks.md, "Workload").

Columns of every generated file:

- ``label`` (int64 0/1): the click label.
- ``I1`` … ``I13`` (float32, ~10% nulls): dense features.
- ``C1`` … ``C26`` (int64, or strings with ``strings=True``): categorical ids drawn from Zipf
  distributions over vocabularies of 1e2 … 1e6 values, scrambled over the full 64-bit range
  (so negative ids and ids differing only in high bits occur, as with hashed production ids).
  ``C1`` plays the user and ``C2`` the item.
- ``seq`` (``list<int64>``): a behaviour sequence of item ids (length 0–100, mean ~30).
- with ``signal=True`` also ``conversion`` (int64 0/1, only ever 1 on clicked rows).

With ``signal=True`` the labels carry a planted signal a model can learn: each id of a few
columns has a hidden weight, two dense columns act linearly, and a row whose item appears in its
own behaviour sequence clicks more often (the pattern target attention finds). Without it the
labels are independent coin flips at a ~25% rate.

Everything depends only on ``seed`` and the row position: the same call always writes the same
bytes, and a data set of N rows is a prefix of one of M > N rows with the same file split.

Run ``python benchmarks/data.py OUT_DIR --rows 1000000 --files 4`` to write one from the shell.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

NUM_DENSE = 13
NUM_SPARSE = 26
VOCAB_SIZES = tuple(int(v) for v in np.logspace(2, 6, NUM_SPARSE).round())
ZIPF_A = 1.2
SEQ_MAX_LEN = 100
SEQ_MEAN_LEN = 31.5  # before clipping at SEQ_MAX_LEN; the clipped mean is ~30
NULL_RATE = 0.1
_CHUNK_ROWS = 65_536  # rows generated per random stream; the unit of determinism

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """The MurmurHash3 fmix64 finalizer on uint64 (a bijection, so distinct ids stay distinct)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(33)
        x *= np.uint64(0xFF51AFD7ED558CCD)
        x ^= x >> np.uint64(33)
        x *= np.uint64(0xC4CEB9FE1A85EC53)
        x ^= x >> np.uint64(33)
    return x


def _scramble(rank: np.ndarray, column: int) -> np.ndarray:
    """Map a Zipf rank of column ``column`` to a 64-bit id (int64, any sign)."""
    salted = rank.astype(np.uint64) + (np.uint64(column + 1) << np.uint64(40))
    return _mix64(salted).view(np.int64)


def _hidden_weight(ids: np.ndarray, column: int, scale: float) -> np.ndarray:
    """A fixed pseudo-random weight in [-scale, scale] per (column, id)."""
    h = _mix64(ids.view(np.uint64) ^ _mix64(np.array([column + 977], dtype=np.uint64)))
    return ((h >> np.uint64(11)).astype(np.float64) / float(1 << 53) * 2.0 - 1.0) * scale


def _chunk(chunk_index: int, rows: int, seed: int, signal: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, chunk_index])
    cols: dict[str, np.ndarray] = {}
    dense = rng.lognormal(mean=0.0, sigma=1.0, size=(NUM_DENSE, rows)).astype(np.float32)
    nulls = rng.random((NUM_DENSE, rows)) < NULL_RATE
    for j in range(NUM_SPARSE):
        ranks = (rng.zipf(ZIPF_A, rows) - 1) % VOCAB_SIZES[j]
        cols[f"C{j + 1}"] = _scramble(ranks, j)

    lengths = np.minimum(rng.exponential(SEQ_MEAN_LEN, rows).astype(np.int64), SEQ_MAX_LEN)
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    seq_ranks = (rng.zipf(ZIPF_A, int(offsets[-1])) - 1) % VOCAB_SIZES[1]
    seq = _scramble(seq_ranks, 1)
    # Some rows carry their own item in their history: the target-attention signal.
    has_item = (rng.random(rows) < 0.3) & (lengths > 0)
    pos = offsets[:-1] + (rng.random(rows) * np.maximum(lengths, 1)).astype(np.int64)
    seq[pos[has_item]] = cols["C2"][has_item]

    coin = rng.random((2, rows))
    if signal:
        logit = (
            -1.6
            + 0.6 * np.log1p(np.where(nulls[0], 0.0, dense[0]))
            - 0.4 * np.where(nulls[1], 0.0, np.log1p(dense[1]))
        )
        for j, scale in ((0, 1.2), (1, 1.5), (2, 0.8), (5, 0.8)):
            logit = logit + _hidden_weight(cols[f"C{j + 1}"], j, scale)
        logit = logit + 1.2 * has_item
        click = coin[0] < 1.0 / (1.0 + np.exp(-logit))
        cv_logit = (
            -1.0 + _hidden_weight(cols["C2"], 101, 1.5) + _hidden_weight(cols["C4"], 103, 1.0)
        )
        conversion = click & (coin[1] < 1.0 / (1.0 + np.exp(-cv_logit)))
    else:
        click = coin[0] < 0.25
        conversion = None

    out: dict[str, np.ndarray] = {"label": click.astype(np.int64)}
    if conversion is not None:
        out["conversion"] = conversion.astype(np.int64)
    for i in range(NUM_DENSE):
        out[f"I{i + 1}"] = np.ma.masked_array(dense[i], mask=nulls[i])
    out.update(cols)
    out["seq"] = (seq, offsets)  # type: ignore[assignment]
    return out


def generate_table(
    rows: int, *, seed: int = 0, strings: bool = False, signal: bool = False, start: int = 0
) -> pa.Table:
    """Rows ``[start, start + rows)`` of the seeded click log as a pyarrow Table.

    Args:
        rows: how many rows.
        seed: the data set's seed.
        strings: write ``C1`` … ``C26`` as decimal strings of the ids instead of int64.
        signal: plant a learnable signal and add the ``conversion`` label.
        start: first row: tables are slices of one deterministic stream, so
            ``generate_table(n, start=s)`` equals rows ``s … s+n`` of any longer table.

    Returns:
        A pyarrow Table with the columns described in the module docstring.
    """
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    batches = []
    first = start // _CHUNK_ROWS
    skip = start - first * _CHUNK_ROWS  # rows of the first chunk that precede `start`
    done = 0
    chunk_index = first
    while done < rows:
        chunk = _chunk(chunk_index, _CHUNK_ROWS, seed, signal)
        n = min(_CHUNK_ROWS - skip, rows - done)
        batches.append(_to_record_batch(chunk, skip, n, strings))
        done += n
        skip = 0
        chunk_index += 1
    if not batches:
        empty = _chunk(0, 1, seed, signal)
        return pa.Table.from_batches([_to_record_batch(empty, 0, 0, strings)])
    return pa.Table.from_batches(batches)


def _to_record_batch(chunk: dict[str, np.ndarray], a: int, n: int, strings: bool) -> pa.RecordBatch:
    """Rows ``[a, a + n)`` of a generated chunk as a RecordBatch."""
    b = a + n
    arrays: dict[str, pa.Array] = {}
    for name, col in chunk.items():
        if name == "seq":
            values, offsets = col
            offs = offsets[a : b + 1]
            arrays[name] = pa.ListArray.from_arrays(
                pa.array(offs - offs[0], type=pa.int32()), values[offs[0] : offs[-1]]
            )
        elif isinstance(col, np.ma.MaskedArray):
            arrays[name] = pa.array(col.data[a:b], mask=col.mask[a:b], type=pa.float32())
        else:
            arr = pa.array(col[a:b])
            if strings and name.startswith("C"):
                arr = arr.cast(pa.string())
            arrays[name] = arr
    return pa.RecordBatch.from_pydict(arrays)


def write_dataset(
    out_dir: str | Path,
    *,
    rows: int,
    files: int = 4,
    row_group_size: int = 131_072,
    format: str = "parquet",
    strings: bool = False,
    compression: str = "zstd",
    seed: int = 0,
    signal: bool = False,
) -> list[Path]:
    """Write the seeded click log as ``files`` files of (nearly) equal row counts.

    Args:
        out_dir: directory to create (existing files of the same names are replaced).
        rows: total row count.
        files: number of files; file ``i`` is named ``part-{i:05d}.parquet`` (or ``.orc``).
        row_group_size: rows per Parquet row group (ORC stripes are sized in bytes by the writer;
            this sets a matching stripe size estimate).
        format: ``"parquet"`` or ``"orc"``.
        strings: categoricals as strings (see :func:`generate_table`).
        compression: codec name (``"zstd"``, ``"snappy"``, ``"lz4"``, ``"none"``, …).
        seed: the data set's seed.
        signal: plant a learnable signal (see the module docstring).

    Returns:
        The written file paths, in order.
    """
    if format not in ("parquet", "orc"):
        raise ValueError(f"format must be 'parquet' or 'orc', got {format!r}")
    if files < 1:
        raise ValueError(f"files must be >= 1, got {files}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    start = 0
    for i in range(files):
        n = rows // files + (1 if i < rows % files else 0)
        table = generate_table(n, seed=seed, strings=strings, signal=signal, start=start)
        path = out / f"part-{i:05d}.{format}"
        _write(table, path, format, row_group_size, compression)
        paths.append(path)
        start += n
    return paths


def _write(table: pa.Table, path: Path, fmt: str, row_group_size: int, compression: str) -> None:
    codec = None if compression == "none" else compression
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path, row_group_size=row_group_size, compression=codec or "none")
    else:
        import pyarrow.orc as orc

        bytes_per_row = max(1, table.nbytes // max(1, table.num_rows))
        orc.write_table(
            table,
            path,
            compression=(codec or "uncompressed").upper(),
            stripe_size=max(1 << 20, row_group_size * bytes_per_row // 4),
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("out_dir")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--row-group-size", type=int, default=131_072)
    p.add_argument("--format", choices=("parquet", "orc"), default="parquet")
    p.add_argument("--strings", action="store_true")
    p.add_argument("--compression", default="zstd")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--signal", action="store_true")
    a = p.parse_args(argv)
    paths = write_dataset(
        a.out_dir,
        rows=a.rows,
        files=a.files,
        row_group_size=a.row_group_size,
        format=a.format,
        strings=a.strings,
        compression=a.compression,
        seed=a.seed,
        signal=a.signal,
    )
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
