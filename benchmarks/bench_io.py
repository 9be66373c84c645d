"""IO: recis_io.Dataset vs what a PyTorch user would use instead to read columnar data.

Workload (docs/benchmarks.md): the Criteo-like click log of ``data.py`` (label, 13 float columns with
~10% nulls, 26 categoricals, one ``list<int64>`` sequence), zstd Parquet, row groups of 128k
rows, several files; batch size 8192. Two variants: categoricals as int64 ids, and as strings.

Contenders, each producing torch tensors with nulls filled (0.0) and list columns as values +
offsets, each run in its own fresh process so peak memory is its own:

- recis: ``recis_io.Dataset`` with its native decode threads (exactly 8192-row batches, one
  packed buffer per batch). Strings are read as bytes + offsets like the others, and once more
  hashed to int64 ids (FarmHash) while reading. One more recis row reads with ``shuffle=True``
  (row groups permuted, rows shuffled within 65,536-row windows, as for training); the
  contenders do not shuffle, so compare that row with recis's own unshuffled one.
- (a) ``pyarrow.parquet.read_table(use_threads=True)``: decode only, no tensors (an upper
  bound on decoding speed, not a loader).
- (b) ``pyarrow.dataset(...).to_batches(batch_size=8192)`` converted to torch tensors.
- (c) ``torch.utils.data.DataLoader(num_workers=2)`` over an IterableDataset doing (b) per row
  group, the workers splitting row groups.

Throughput is rows/s of one full pass: the median of every timed pass of ``--rounds`` rounds;
each round runs every contender once, in a fresh process (a warm-up pass, then ``--reps`` timed
passes), in the order of the round before reversed, so that no contender always runs first
(with a cold page cache) or last. Peak memory is the largest of its rounds.
Run: ``python benchmarks/bench_io.py [--rows 1000000] [--reps 3] [--rounds 2]``; writes
``results/io.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset

ROOT = Path(__file__).resolve().parent
BATCH = 8192
CONTENDERS = ("recis", "recis_hash", "recis_shuffle", "a", "b", "c")
LABELS = {
    "recis": "recis_io.Dataset",
    "recis_hash": "recis_io.Dataset, strings hashed",
    "recis_shuffle": "recis_io.Dataset, shuffle=True",
    "a": "(a) pq.read_table, decode only",
    "b": "(b) ds.to_batches -> torch",
    "c": "(c) DataLoader(2 workers) of (b)",
}


def _dataset_dir(rows: int, strings: bool) -> Path:
    from data import write_dataset

    kind = "strings" if strings else "ids"
    out = ROOT.parent / "data" / f"bench-io-{kind}-{rows}"
    marker = out / "done.json"
    if not marker.exists():
        write_dataset(out, rows=rows, files=4, row_group_size=131_072, strings=strings)
        marker.write_text(json.dumps({"rows": rows}))
    return out


def _files(directory: Path) -> list[str]:
    return sorted(str(p) for p in directory.glob("*.parquet"))


def _arrow_to_torch(batch: Any) -> dict[str, Any]:
    """Contender (b)'s conversion of one pyarrow RecordBatch."""
    import numpy as np
    import pyarrow as pa
    import torch

    out: dict[str, Any] = {}
    for name, col in zip(batch.schema.names, batch.columns, strict=False):
        if pa.types.is_list(col.type):
            # A batch's list column may be a slice: its offsets start where it starts in the
            # values, and flatten() returns only its own values.
            offsets = col.offsets.to_numpy().astype(np.int64)
            offsets -= offsets[0]
            out[name] = (torch.from_numpy(col.flatten().to_numpy()), torch.from_numpy(offsets))
        elif pa.types.is_string(col.type):
            _, offs, data = col.buffers()
            n = len(col)
            offsets = np.frombuffer(offs, np.int32, n + 1, col.offset * 4).astype(np.int64)
            values = np.frombuffer(data, np.uint8)[offsets[0] : offsets[-1]].copy()
            out[name] = (torch.from_numpy(values), torch.from_numpy(offsets - offsets[0]))
        elif pa.types.is_floating(col.type):
            out[name] = torch.from_numpy(col.fill_null(0.0).to_numpy())
        else:
            out[name] = torch.from_numpy(col.to_numpy())
    return out


class _RowGroups(IterableDataset):
    """Contender (c): an IterableDataset doing (b) per row group, split across workers."""

    def __init__(self, files: list[str]) -> None:
        import pyarrow.parquet as pq

        super().__init__()
        self.units = [(f, g) for f in files for g in range(pq.ParquetFile(f).num_row_groups)]

    def __iter__(self):
        import pyarrow.parquet as pq
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        for f, g in self.units[wid::n]:
            table = pq.ParquetFile(f).read_row_group(g)
            for batch in table.to_batches(max_chunksize=BATCH):
                yield _arrow_to_torch(batch)


def _pass_fn(name: str, files: list[str], strings: bool):
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq
    import torch

    if name in ("recis", "recis_hash", "recis_shuffle"):
        from recis_io import Column, Dataset

        cols: list[Any] = ["label", *(Column(f"I{j}", fill=0.0) for j in range(1, 14))]
        hashed = name == "recis_hash"
        cols += [Column(f"C{j}", hash="farm" if hashed else None) for j in range(1, 27)]
        cols.append("seq")
        ds = Dataset(files, batch_size=BATCH, columns=cols, shuffle=name == "recis_shuffle")
        return lambda: sum(len(b) for b in ds)
    if name == "a":
        return lambda: pq.read_table(files, use_threads=True).num_rows
    if name == "b":
        dataset = pads.dataset(files, format="parquet")

        def run_b() -> int:
            rows = 0
            for batch in dataset.to_batches(batch_size=BATCH):
                rows += len(_arrow_to_torch(batch)["label"])
            return rows

        return run_b
    loader = torch.utils.data.DataLoader(
        _RowGroups(files), batch_size=None, num_workers=2, persistent_workers=False
    )
    return lambda: sum(len(b["label"]) for b in loader)


def run_one(name: str, directory: str, strings: bool, reps: int) -> dict[str, Any]:
    """Times one contender in this process and reports rows/s and peak memory."""
    from _harness import measure, peak_rss_mib

    files = _files(Path(directory))
    fn = _pass_fn(name, files, strings)
    rows = fn()
    stats = measure(fn, reps=reps, warmup=0)
    own = peak_rss_mib()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "rows": rows,
        "times_s": list(stats.times_s),
        "peak_rss_mib": own,
        "peak_child_rss_mib": kids,
    }


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One contender's results over its rounds: the median of every timed pass, the largest
    peak memory."""
    times = [t for r in rounds for t in r["times_s"]]
    median = statistics.median(times)
    return {
        "rows": rounds[0]["rows"],
        "median_s": median,
        "rows_per_s": rounds[0]["rows"] / median,
        "times_s": times,
        "peak_rss_mib": max(r["peak_rss_mib"] for r in rounds),
        "peak_child_rss_mib": max(r["peak_child_rss_mib"] for r in rounds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", choices=("ids", "strings"), default=None)
    parser.add_argument("--_one", nargs=3, metavar=("NAME", "DIR", "STRINGS"), help="internal")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.rounds < 1:
        parser.error(f"--reps and --rounds must be at least 1, got {args.reps} and {args.rounds}")
    sys.path.insert(0, str(ROOT))
    if args._one:
        name, directory, strings = args._one
        print(json.dumps(run_one(name, directory, strings == "1", args.reps)))
        return 0
    from _harness import print_table, write_json

    results: dict[str, Any] = {"rows": args.rows, "batch_size": BATCH, "variants": {}}
    for variant in ("ids", "strings"):
        if args.only and variant != args.only:
            continue
        strings = variant == "strings"
        directory = _dataset_dir(args.rows, strings)
        names = [n for n in CONTENDERS if strings or n != "recis_hash"]
        rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for index in range(args.rounds):
            for name in names if index % 2 == 0 else names[::-1]:
                cmd = [sys.executable, __file__, "--reps", str(args.reps), "--_one", name,
                       str(directory), "1" if strings else "0"]  # fmt: skip
                out = subprocess.run(
                    cmd, check=True, capture_output=True, text=True, env=os.environ
                )
                rounds[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
        measured = {n: combine(r) for n, r in rounds.items()}
        results["variants"][variant] = measured
        recis = measured["recis"]["rows_per_s"]
        rows = [
            [
                LABELS[n],
                m["rows_per_s"],
                recis / m["rows_per_s"],
                m["peak_rss_mib"],
                m["peak_child_rss_mib"] if n == "c" else "",
            ]
            for n, m in measured.items()
        ]
        print_table(
            f"IO, {variant}, {args.rows:,} rows, batch {BATCH} ({os.cpu_count()} CPUs)",
            ["contender", "rows/s", "recis speedup", "peak RSS MiB", "worker peak RSS MiB"],
            rows,
        )
    path = write_json("io", results)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
