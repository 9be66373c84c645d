"""recis-io as a standalone data loader, on the seeded click log.

Writes the click log (once; later runs reuse it), reads one epoch with recis-io, prints the
batch layout and rows/s, then shows exact resume: a reader stopped half way and restored from its
JSON cursor yields exactly the rows an uninterrupted reader yields.

    python examples/read_clicks.py                # 1M rows
    python examples/read_clicks.py --small        # 50k rows, as CI runs it
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

import recis_io

ROOT = Path(__file__).resolve().parent.parent


def load_data_module():
    """benchmarks/data.py, the seeded click-log generator."""
    spec = importlib.util.spec_from_file_location(
        "recis_bench_data", ROOT / "benchmarks" / "data.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def ensure_dataset(out: Path, rows: int, files: int) -> Path:
    """Write the click log under ``out`` unless the same one is already there."""
    data_dir = out / "data"
    marker = data_dir / "MANIFEST.json"
    wanted = {"rows": rows, "files": files, "seed": 0, "signal": True}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return data_dir
    start = time.perf_counter()
    load_data_module().write_dataset(data_dir, rows=rows, files=files, seed=0, signal=True)
    marker.write_text(json.dumps(wanted))
    print(
        f"wrote {rows:,} rows in {files} Parquet files to {data_dir} ({time.perf_counter() - start:.1f}s)"
    )
    return data_dir


def columns() -> list:
    dense = [recis_io.Column(f"I{i}", fill=0.0) for i in range(1, 14)]
    return ["label", "conversion", *dense, *[f"C{i}" for i in range(1, 27)], "seq"]


def describe(batch: recis_io.Batch) -> None:
    print(f"a batch holds {len(batch)} rows and {len(batch.keys())} columns:")
    for name in ("label", "I1", "C1", "seq"):
        col = batch[name]
        if isinstance(col, torch.Tensor):
            print(f"  {name:<6} tensor {col.dtype!s:<14} shape {list(col.shape)}")
        else:
            print(
                f"  {name:<6} ragged values {col.values.dtype!s} [{col.values.numel()}],"
                f" offsets {[list(o.shape) for o in col.offsets]}"
            )


class Digest:
    """Row count and a hash of every value of every batch fed to it, in order."""

    def __init__(self) -> None:
        self.rows = 0
        self._h = hashlib.sha256()

    def update(self, batch: recis_io.Batch) -> None:
        self.rows += len(batch)
        for name in sorted(batch.keys()):
            col = batch[name]
            parts = [col] if isinstance(col, torch.Tensor) else [col.values, *col.offsets]
            for part in parts:
                self._h.update(part.contiguous().numpy().tobytes())

    def result(self) -> tuple[int, str]:
        return self.rows, self._h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=None, help="rows to write (overrides --small)")
    p.add_argument("--small", action="store_true", help="50k rows (as CI runs it)")
    p.add_argument("--out", type=Path, default=ROOT / "target" / "demo", help="data directory")
    p.add_argument("--batch-size", type=int, default=8192, help="rows per batch")
    p.add_argument("--threads", type=int, default=None, help="decode threads")
    args = p.parse_args(argv)
    rows = args.rows if args.rows is not None else 50_000 if args.small else 1_000_000
    if rows < 1:
        p.error(f"--rows must be at least 1, got {rows}")
    data_dir = ensure_dataset(args.out, rows, files=4)

    def dataset(**kw) -> recis_io.Dataset:
        return recis_io.Dataset(
            data_dir, batch_size=args.batch_size, columns=columns(), num_threads=args.threads, **kw
        )

    first = next(iter(dataset()))
    describe(first)

    start = time.perf_counter()
    n_rows = n_batches = 0
    for batch in dataset():
        n_rows += len(batch)
        n_batches += 1
    elapsed = time.perf_counter() - start
    print(f"read {n_rows:,} rows in {n_batches} batches: {n_rows / elapsed:,.0f} rows/s")

    # Exact resume, with shuffling: stop half way, save the cursor as JSON, restore, continue.
    whole = Digest()
    for batch in dataset(shuffle=True, seed=7):
        whole.update(batch)
    joined = Digest()
    reader = dataset(shuffle=True, seed=7)
    for i, batch in enumerate(reader):
        joined.update(batch)
        if i + 1 == n_batches // 2:
            break
    cursor = json.dumps(reader.state_dict())
    resumed = dataset(shuffle=True, seed=7)
    resumed.load_state_dict(json.loads(cursor))
    for batch in resumed:
        joined.update(batch)
    ok = joined.result() == whole.result()
    print(f"resume from a {len(cursor)}-byte cursor after {n_batches // 2} batches: ", end="")
    print("identical stream" if ok else f"MISMATCH {joined.result()} != {whole.result()}")
    if not (ok and n_rows == rows):  # CI runs the example and reads its exit status
        print(
            f"example check failed: read {n_rows:,} rows of {rows:,}, or the resumed "
            "stream differs",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
