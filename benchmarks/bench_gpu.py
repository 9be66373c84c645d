"""GPU: hash-table find/insert keys/s and row gather/scatter bandwidth against the copy bandwidth.

The GPU targets of docs/benchmarks.md, measured in one run on one device:

- Hash table (``recis_kernels.IdMap``), at each load factor of ``--load-factors`` (default 0.5
  and 0.75): a map filled with random int64 keys to exactly that fraction of the smallest
  power-of-two capacity holding at least ``--table-keys`` keys there (default 2**26 on CUDA), built
  with ``max_load_factor`` 0.9 so that no timed insert makes it grow (the largest batch must fit
  under 0.9). ``find`` of batches of ``2**--batch-log2`` present
  keys, drawn uniformly or Zipf-distributed (``--zipf``) over the table's keys; and
  ``find_or_insert`` of batches of keys absent from the map (uniform: all distinct; Zipf: drawn
  from a pool of as many new keys, so repeats are deduplicated). Every timed insert starts from
  the same map: the slot arrays are restored (untimed) before each call. Reported in keys/s
  (keys in the batch, repeats included) and, at the first load factor, against the 2 billion
  keys/s find target.
- Rows (``recis_kernels.RowStore``, float32, dims ``--dims``): ``gather`` of ``--gather-rows``
  distinct random rows of a store of ``--store-rows`` rows, ``scatter`` (overwrite) and
  ``scatter_add`` of as many rows; for reference torch's ``index_select``, ``index_copy_`` and
  ``index_add_`` on one flat ``(store rows, dim)`` tensor holding the same rows. Bandwidth is the
  bytes an op must move (rows read and written, and the int64 row indices) over its median time;
  the device's copy bandwidth is ``dst.copy_(src)`` of as many bytes as the gathered rows
  (read + written), measured in the same run; the target is gather and scatter at >= 60% of it.

Before timing, results are checked: found rows equal the rows the keys were inserted with,
inserted keys get fresh distinct rows that ``find`` then returns, gathered rows equal torch's
``index_select`` and scattered rows equal torch's ``index_copy_`` / ``index_add_``. A failed
check prints what differed and exits with status 1.

On CUDA, times come from CUDA events around each call after warm-up calls (median of
``--reps``). Without a CUDA device (or with ``--device cpu``) the same ops run their CPU paths
against a CPU copy, with smaller default sizes: absolute numbers there mean little, but the
script and its checks run on any machine.

Run: ``python benchmarks/bench_gpu.py [--device cuda] [--quick] [--table-keys N]
[--load-factors 0.5 0.75] [--batch-log2 20 22 24] [--dims 16 64 128]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import recis_kernels as rk
from recis_kernels.ops.hash_table import LOAD_FACTOR_LIMIT

from _harness import Stats, print_table, write_json

FIND_TARGET_KEYS_PER_S = 2e9  # on an H100 (docs/benchmarks.md)
BANDWIDTH_TARGET = 0.60  # gather and scatter, as a fraction of the measured copy bandwidth
INDEX_BYTES = 8  # an int64 row index


class CheckFailed(Exception):
    """A result differs from the reference it is checked against."""


@dataclasses.dataclass(frozen=True)
class Sizes:
    table_keys: int
    batch_log2: tuple[int, ...]
    store_rows: int
    gather_rows: int
    dims: tuple[int, ...]
    reps: int
    warmup: int


def default_sizes(device: torch.device, quick: bool) -> Sizes:
    """Full sizes on CUDA; sizes a CPU measures in seconds; a smoke run with ``quick``."""
    if quick:
        return Sizes(1 << 16, (10, 12), 1 << 14, 1 << 12, (16, 64, 128), 3, 1)
    if device.type == "cuda":
        return Sizes(1 << 26, (20, 22, 24), 1 << 23, 1 << 22, (16, 64, 128), 10, 3)
    return Sizes(1 << 21, (14, 16, 18), 1 << 19, 1 << 17, (16, 64, 128), 5, 2)


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    reps: int,
    warmup: int,
    setup: Callable[[], Any] | None = None,
) -> Stats:
    """Time ``fn()`` ``reps`` times after ``warmup`` calls; ``setup()`` runs untimed before each.

    On CUDA each call is timed by CUDA events recorded on the current stream around it (after
    a synchronize, so the interval holds the call's host work and its kernels); on the CPU by
    the wall clock. Garbage is collected once, before the warm-up: a full collection with
    torch loaded takes a large part of a second, too long to repeat before every call.
    """
    gc.collect()
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(reps):
        if setup is not None:
            setup()
        synchronize(device)
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return Stats(statistics.median(times), min(times), max(times), tuple(times))


def time_stream(fn: Callable[[], Any], device: torch.device, *, reps: int) -> float:
    """Seconds per call of ``reps`` calls queued back to back (after a synchronize), timed by
    two CUDA events around them all: the kernels' own rate, the host's work per call hidden
    behind the previous call's kernels where the host is the faster. Wall clock on the CPU."""
    synchronize(device)
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    begin = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - begin) / reps


def stats_json(stats: Stats, **extra: Any) -> dict[str, Any]:
    return {"median_s": stats.median_s, "min_s": stats.min_s, "max_s": stats.max_s, **extra}


# ----------------------------------------------------------------------------- hash table


def random_keys(n: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """``n`` random int64 keys over the whole range (repeats have probability ~n**2 / 2**65)."""
    keys = torch.randint(-(1 << 63), (1 << 63) - 1, (n,), generator=generator, dtype=torch.int64)
    return keys.to(device)


def zipf_positions(n: int, pool: int, a: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` positions in ``[0, pool)``, Zipf-distributed (position 0 the most frequent)."""
    return (rng.zipf(a, n) - 1) % pool


def map_shape(table_keys: int, load: float, largest_batch: int) -> tuple[int, int]:
    """``(capacity, keys)``: the smallest power-of-two capacity whose fraction ``load`` holds
    at least ``table_keys`` keys, and that many keys; the largest insert batch must still fit
    under :data:`LOAD_FACTOR_LIMIT` (the bench map's bound), so that no timed insert grows it."""
    capacity = 16
    while int(load * capacity) < table_keys:
        capacity *= 2
    keys = int(load * capacity)
    if keys + largest_batch > LOAD_FACTOR_LIMIT * capacity:
        raise SystemExit(
            f"bench_gpu: {keys:,} keys at load {load} plus a batch of {largest_batch:,} would "
            f"fill more than {LOAD_FACTOR_LIMIT} of {capacity:,} slots: lower --load-factors or "
            f"--batch-log2"
        )
    return capacity, keys


_SLOTS = ("slot_keys", "slot_tabs", "slot_rows", "slot_state")


class MapSnapshot:
    """A copy of an :class:`~recis_kernels.IdMap`'s state that :meth:`restore` puts back in place.

    Restoring copies into the map's own slot arrays, so timed inserts all start from the same
    map without allocating a new one.
    """

    def __init__(self, m: rk.IdMap) -> None:
        self.map = m
        self.slots = {name: getattr(m, name).clone() for name in _SLOTS}
        self.scalars = (m.size, m.next_row, m.erased, m.free_rows.clone())

    def restore(self) -> None:
        m = self.map
        for name, saved in self.slots.items():
            current = getattr(m, name)
            if current.shape != saved.shape:
                raise CheckFailed(
                    f"the map grew during a timed insert ({saved.numel()} -> {current.numel()} "
                    "slots): the benchmark sized its capacity too small"
                )
            current.copy_(saved)
        m.size, m.next_row, m.erased, free = self.scalars
        m.free_rows = free.clone()


def build_map(
    table_keys: int, capacity: int, device: torch.device, generator: torch.Generator
) -> tuple[rk.IdMap, torch.Tensor, torch.Tensor]:
    """A map of ``table_keys`` random keys, filled in chunks; returns it, the keys and rows."""
    m = rk.IdMap(capacity=capacity, device=device, max_load_factor=LOAD_FACTOR_LIMIT)
    keys = random_keys(table_keys, device, generator)
    rows = torch.empty_like(keys)
    chunk = 1 << 22
    for at in range(0, table_keys, chunk):
        got, is_new = m.find_or_insert(keys[at : at + chunk])
        if not bool(is_new.all()):
            raise CheckFailed("building the map: a random key was already present")
        rows[at : at + chunk] = got
    if m.capacity != capacity:
        raise CheckFailed(f"building the map grew it from {capacity} to {m.capacity} slots")
    if m.size != table_keys or torch.unique(rows).numel() != table_keys:
        raise CheckFailed(f"building the map: {m.size} keys, expected {table_keys} distinct")
    return m, keys, rows


def check_find(m: rk.IdMap, queries: torch.Tensor, expected: torch.Tensor, label: str) -> None:
    found = m.find(queries)
    bad = torch.nonzero(found != expected).flatten()
    if bad.numel():
        i = int(bad[0])
        raise CheckFailed(
            f"find ({label}): {bad.numel()} of {queries.numel()} rows differ; key "
            f"{int(queries[i])} at position {i} found row {int(found[i])}, "
            f"expected {int(expected[i])}"
        )


def check_insert(m: rk.IdMap, snap: MapSnapshot, batch: torch.Tensor, label: str) -> None:
    """After a restore, ``find_or_insert(batch)``: all new, one fresh row per distinct key."""
    snap.restore()
    before = m.next_row
    rows, is_new = m.find_or_insert(batch)
    if not bool(is_new.all()):
        raise CheckFailed(f"insert ({label}): {int((~is_new).sum())} new keys reported present")
    distinct, inverse = torch.unique(batch, return_inverse=True)
    per_key = torch.full_like(distinct, -1).scatter_(0, inverse, rows)
    if not torch.equal(per_key.index_select(0, inverse), rows):
        raise CheckFailed(f"insert ({label}): repeats of one key got different rows")
    fresh = torch.unique(rows)
    if fresh.numel() != distinct.numel() or int(fresh.min()) < before:
        raise CheckFailed(
            f"insert ({label}): {distinct.numel()} distinct new keys got {fresh.numel()} "
            f"distinct rows, smallest {int(fresh.min())} (rows below {before} were taken)"
        )
    check_find(m, batch, rows, f"{label}, after the insert")
    snap.restore()


def key_batches(
    n: int,
    keys: torch.Tensor,
    rows: torch.Tensor,
    zipf_a: float,
    device: torch.device,
    g: torch.Generator,
    rng: np.random.Generator,
) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor | None]]:
    """``(op, distribution) -> (n keys, their expected rows)`` (``None``: keys to insert)."""
    uniform = torch.randint(0, keys.numel(), (n,), generator=g).to(device)
    skewed = torch.from_numpy(zipf_positions(n, keys.numel(), zipf_a, rng)).to(device)
    pool = random_keys(n, device, g)
    repeats = torch.from_numpy(zipf_positions(n, n, zipf_a, rng)).to(device)
    return {
        ("find", "uniform"): (keys.index_select(0, uniform), rows.index_select(0, uniform)),
        ("find", "zipf"): (keys.index_select(0, skewed), rows.index_select(0, skewed)),
        ("find_or_insert", "uniform"): (random_keys(n, device, g), None),
        ("find_or_insert", "zipf"): (pool.index_select(0, repeats), None),
    }


def bench_hash_table(
    sizes: Sizes, load: float, device: torch.device, zipf_a: float
) -> tuple[dict[str, Any], list[list[Any]]]:
    """find and find_or_insert on a map filled to ``load`` of its capacity."""
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    largest = 1 << max(sizes.batch_log2)
    capacity, table_keys = map_shape(sizes.table_keys, load, largest)
    m, keys, rows = build_map(table_keys, capacity, device, g)
    snap = MapSnapshot(m)
    results: dict[str, Any] = {
        "table_keys": table_keys,
        "capacity": capacity,
        "load_factor": table_keys / capacity,
        "zipf_a": zipf_a,
        "find": {},
        "find_or_insert": {},
    }
    table = []
    for log2 in sizes.batch_log2:
        batches = key_batches(1 << log2, keys, rows, zipf_a, device, g, rng)
        for (op, dist), (batch, expected) in batches.items():
            label = f"{dist}, 2^{log2} keys"
            if op == "find":
                check_find(m, batch, expected, label)
                stats = time_calls(
                    lambda b=batch: m.find(b), device, reps=sizes.reps, warmup=sizes.warmup
                )
            else:
                check_insert(m, snap, batch, label)
                stats = time_calls(
                    lambda b=batch: m.find_or_insert(b),
                    device,
                    reps=sizes.reps,
                    warmup=sizes.warmup,
                    setup=snap.restore,
                )
            rate = stats.rate(batch.numel())
            distinct = torch.unique(batch).numel()
            results[op].setdefault(dist, {})[f"2^{log2}"] = stats_json(
                stats, keys=batch.numel(), distinct_keys=distinct, keys_per_s=rate
            )
            table.append(
                [
                    f"IdMap.{op}",
                    dist,
                    f"2^{log2}",
                    distinct,
                    f"{load:g}",
                    stats.median_s * 1e3,
                    rate / 1e9,
                ]
            )
    snap.restore()
    return results, table


# ----------------------------------------------------------------------------- rows


def filled_store(rows: int, dim: int, device: torch.device, g: torch.Generator) -> rk.RowStore:
    """A RowStore of ``rows`` random rows in 8 blocks (a grown table has several)."""
    store = rk.RowStore(dim, block_rows=max(1, rows // 8), device=device)
    store.reserve(rows)
    for block in store.blocks:
        torch.randn(block.shape, generator=g, device=device, out=block)
    return store


def flat_rows(store: rk.RowStore, rows: int) -> torch.Tensor:
    return torch.cat(store.blocks)[:rows]


def check_equal(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if not torch.equal(got, expected):
        bad = torch.nonzero((got != expected).reshape(got.shape[0], -1).any(1)).flatten()
        raise CheckFailed(
            f"{what}: {bad.numel()} of {got.shape[0]} rows differ from torch's, first at "
            f"position {int(bad[0]) if bad.numel() else -1}"
        )


def check_rows(
    store: rk.RowStore,
    flat: torch.Tensor,
    idx: torch.Tensor,
    values: torch.Tensor,
) -> None:
    """gather = index_select; scatter = index_copy_; scatter_add = index_add_ (on copies)."""
    check_equal(store.gather(idx), flat.index_select(0, idx), f"gather (dim {store.width})")
    saved = store.gather(idx)
    ref = flat.clone()
    store.scatter(idx, values)
    ref.index_copy_(0, idx, values)
    check_equal(flat_rows(store, flat.shape[0]), ref, f"scatter (dim {store.width})")
    store.scatter_add(idx, values)
    ref.index_add_(0, idx, values)
    check_equal(flat_rows(store, flat.shape[0]), ref, f"scatter_add (dim {store.width})")
    store.scatter(idx, saved)
    try:
        rk.check_index_errors()
    except rk.IndexOutOfRangeError as err:
        raise CheckFailed(f"a row kernel recorded an out-of-range row: {err}") from err


def row_contenders(
    store: rk.RowStore, flat: torch.Tensor, idx: torch.Tensor, values: torch.Tensor
) -> list[tuple[str, str, Callable[[], Any], int]]:
    """``(contender, op, call, bytes the op must move)``, the copy of as many bytes first."""
    n, dim = values.shape
    payload = n * dim * 4
    src, dst = torch.empty_like(values), torch.empty_like(values)
    out = torch.empty_like(values)
    moved = 2 * payload + INDEX_BYTES * n  # rows read and written once, indices read
    added = 3 * payload + INDEX_BYTES * n  # the target rows are read too
    return [
        ("torch copy_", "copy", lambda: dst.copy_(src), 2 * payload),
        ("recis RowStore.gather", "gather", lambda: store.gather(idx), moved),
        ("torch index_select", "gather", lambda: torch.index_select(flat, 0, idx, out=out), moved),
        ("recis RowStore.scatter", "scatter", lambda: store.scatter(idx, values), moved),
        ("torch index_copy_", "scatter", lambda: flat.index_copy_(0, idx, values), moved),
        (
            "recis RowStore.scatter_add",
            "scatter_add",
            lambda: store.scatter_add(idx, values),
            added,
        ),
        ("torch index_add_", "scatter_add", lambda: flat.index_add_(0, idx, values), added),
    ]


def bench_row_width(
    sizes: Sizes, dim: int, idx: torch.Tensor, device: torch.device, g: torch.Generator
) -> tuple[dict[str, Any], list[list[Any]]]:
    store = filled_store(sizes.store_rows, dim, device, g)
    flat = flat_rows(store, sizes.store_rows)
    values = torch.randn(idx.numel(), dim, generator=g, device=device)
    check_rows(store, flat, idx, values)
    entries: dict[str, Any] = {}
    table = []
    copy_bw = 0.0
    for label, op, fn, nbytes in row_contenders(store, flat, idx, values):
        stats = time_calls(fn, device, reps=sizes.reps, warmup=sizes.warmup)
        streamed = time_stream(fn, device, reps=sizes.reps)
        bw = nbytes / streamed
        copy_bw = bw if op == "copy" else copy_bw
        entries[label] = stats_json(
            stats,
            op=op,
            bytes=nbytes,
            streamed_s=streamed,
            bytes_per_s=bw,
            fraction_of_copy=bw / copy_bw,
        )
        table.append([dim, op, label, stats.median_s * 1e3, streamed * 1e3, bw / 1e9, bw / copy_bw])
    return {"payload_bytes": values.numel() * 4, "contenders": entries}, table


def bench_rows(sizes: Sizes, device: torch.device) -> tuple[dict[str, Any], list[list[Any]]]:
    n = sizes.gather_rows
    idx = torch.randperm(sizes.store_rows, generator=torch.Generator().manual_seed(1))[:n]
    idx = idx.to(device)
    # Row values are drawn on the device: gigabytes of them would take seconds on the host.
    g = torch.Generator(device=device).manual_seed(1)
    results: dict[str, Any] = {"store_rows": sizes.store_rows, "rows_per_call": n, "dims": {}}
    table = []
    for dim in sizes.dims:
        results["dims"][str(dim)], rows = bench_row_width(sizes, dim, idx, device, g)
        table += rows
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results, table


# ----------------------------------------------------------------------------- main


def targets(
    device: torch.device, hash_table: dict[str, Any], rows: dict[str, Any]
) -> dict[str, Any]:
    """Each target's measured figure and verdict (verdicts apply to a CUDA run only).

    Find: uniform keys at the largest batch (how hash-table throughput is usually quoted), in
    the map at the first load factor measured.
    Gather and scatter: the worst recis fraction of the copy bandwidth over the row widths.
    """
    out: dict[str, Any] = {}
    if hash_table:
        load = next(iter(hash_table))
        batches = hash_table[load]["find"]["uniform"]
        largest = max(batches, key=lambda b: batches[b]["keys"])
        measured = batches[largest]["keys_per_s"]
        out["find_keys_per_s"] = {
            "target": FIND_TARGET_KEYS_PER_S,
            "measured": measured,
            "where": f"uniform keys, batch {largest}, load factor {load}",
            "met": measured >= FIND_TARGET_KEYS_PER_S,
            "applies": device.type == "cuda",
        }
    if rows:
        for op in ("gather", "scatter"):
            fractions = {
                f"{label}, dim {dim}": e["fraction_of_copy"]
                for dim, d in rows["dims"].items()
                for label, e in d["contenders"].items()
                if e["op"] == op and label.startswith("recis")
            }
            where = min(fractions, key=fractions.__getitem__)
            out[f"{op}_fraction_of_copy"] = {
                "target": BANDWIDTH_TARGET,
                "measured": fractions[where],
                "where": where,
                "met": fractions[where] >= BANDWIDTH_TARGET,
                "applies": device.type == "cuda",
            }
    return out


def resolve_device(name: str) -> torch.device:
    """The device to measure, with an index for CUDA ("cuda" is the current device)."""
    if name == "auto":
        if not torch.cuda.is_available():
            print("no CUDA device: measuring the CPU paths (as with --device cpu)", flush=True)
            return torch.device("cpu")
        name = "cuda"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench_gpu: --device cuda asked for, but torch sees no CUDA device")
        if device.index is None:
            # torch.cuda.set_device refuses an index-less device on recent torch.
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    ap.add_argument("--quick", action="store_true", help="small sizes, few repetitions (smoke run)")
    ap.add_argument(
        "--table-keys", type=int, help="least keys in the hash table at each load factor"
    )
    ap.add_argument(
        "--load-factors",
        type=float,
        nargs="+",
        default=[0.5, 0.75],
        help="fill the hash table to these fractions of its capacity, one run each",
    )
    ap.add_argument("--batch-log2", type=int, nargs="+", help="log2 of the key batch sizes")
    ap.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent of the skewed batches")
    ap.add_argument("--store-rows", type=int, help="rows in the row store")
    ap.add_argument("--gather-rows", type=int, help="rows gathered/scattered per call")
    ap.add_argument("--dims", type=int, nargs="+", help="row widths (float32)")
    ap.add_argument("--reps", type=int, help="timed calls per contender")
    ap.add_argument(
        "--only", nargs="+", choices=("hash_table", "rows"), help="measure these parts only"
    )
    return ap.parse_args(argv)


def resolve_sizes(args: argparse.Namespace, device: torch.device) -> Sizes:
    base = default_sizes(device, args.quick)
    sizes = Sizes(
        table_keys=args.table_keys or base.table_keys,
        batch_log2=tuple(args.batch_log2 or base.batch_log2),
        store_rows=args.store_rows or base.store_rows,
        gather_rows=args.gather_rows or base.gather_rows,
        dims=tuple(args.dims or base.dims),
        reps=args.reps or base.reps,
        warmup=base.warmup,
    )
    bad = [load for load in args.load_factors if not 0 < load < LOAD_FACTOR_LIMIT]
    if bad:
        raise SystemExit(
            f"bench_gpu: --load-factors must lie in (0, {LOAD_FACTOR_LIMIT}), got {bad}"
        )
    if sizes.gather_rows > sizes.store_rows:
        raise SystemExit(
            f"bench_gpu: --gather-rows {sizes.gather_rows} exceeds --store-rows {sizes.store_rows}"
        )
    return sizes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda":
        # The timing events record on the current device's stream: make it the measured one.
        torch.cuda.set_device(device)
    sizes = resolve_sizes(args, device)
    parts = set(args.only or ("hash_table", "rows"))
    nvrtc = device.type == "cuda" and rk.backend() != "cpu" and rk.cuda_python_available()
    kernels = "nvrtc" if nvrtc else "torch"
    print(f"device {device} ({kernels} kernels), {sizes}", flush=True)
    hash_table: dict[str, Any] = {}
    rows: dict[str, Any] = {}
    try:
        if "hash_table" in parts:
            table = []
            for load in args.load_factors:
                result, lines = bench_hash_table(sizes, load, device, args.zipf)
                hash_table[f"{load:g}"] = result
                table += lines
                print(
                    f"hash table at load {load:g}: {result['table_keys']:,} keys in "
                    f"{result['capacity']:,} slots",
                    flush=True,
                )
                if device.type == "cuda":
                    synchronize(device)
                    torch.cuda.empty_cache()
            print_table(
                f"hash table, {device}, median of {sizes.reps}",
                ["call", "keys", "batch", "distinct", "load", "median ms", "G keys/s"],
                table,
            )
        if "rows" in parts:
            rows, table = bench_rows(sizes, device)
            print_table(
                f"rows: {sizes.gather_rows:,} of {sizes.store_rows:,} float32 rows per call, "
                f"{device}; median ms: median of {sizes.reps} calls, each after a synchronize; "
                f"streamed ms: {sizes.reps} calls back to back, per call; GB/s from streamed; "
                "fraction = GB/s over torch copy_'s GB/s",
                ["dim", "op", "contender", "median ms", "streamed ms", "GB/s", "fraction of copy"],
                table,
            )
    except CheckFailed as err:
        print(f"bench_gpu: check failed: {err}", file=sys.stderr, flush=True)
        return 1
    goals = targets(device, hash_table, rows)
    for name, goal in goals.items():
        verdict = ("met" if goal["met"] else "NOT met") if goal["applies"] else "n/a on the CPU"
        print(
            f"target {name}: {goal['measured']:.3g} ({goal['where']}) vs >= "
            f"{goal['target']:.3g}: {verdict}"
        )
    path = write_json(
        "gpu",
        {
            "device": str(device),
            "kernels": kernels,
            "quick": args.quick,
            "sizes": dataclasses.asdict(sizes),
            "hash_table": hash_table,
            "rows": rows,
            "targets": goals,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
