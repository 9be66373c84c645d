"""Kernels: each fused recis-kernels op vs a per-feature loop and vs the obvious torch code.

Workload: Criteo-like batches of 4096 rows (docs/benchmarks.md) generated here with a fixed seed:
26 sparse id features (Zipf-distributed int64 ids), 13 dense float features, 26 string columns
(decimal renderings of the ids), one behaviour sequence (length 0-100, mean ~30) and a 16-dim
embedding row per sequence element for pooling.

Contenders per op:

- recis fused: one call for all features (``fused_mod``, ``fused_bucketize``, one ``hash_bytes``
  over all string columns, ``fused_feature_cross``, ``fused_truncate``, ``segment_reduce``).
- per-feature loop: the same recis op called once per feature.
- torch: the obvious torch implementation (``torch.remainder``, ``torch.bucketize``,
  ``F.embedding_bag`` / ``index_add_``, per-row slicing for truncate and cross, ...), where one
  exists.
- hashed_uniform: one step's new ids (8,320, dim 16, a seed per table) against the same
  formula in torch operations (``mix64``, shifts, a float conversion).
- id map: ``IdMap.find`` / ``find_or_insert`` for one step's 110k ids (40k distinct) over a map of
  1M ``(id, table)`` pairs, vs a Python ``dict`` and vs ``torch.unique`` + ``searchsorted`` over a
  sorted key array.

Before timing, recis outputs are checked against the torch contender where both compute the same
thing. Run: ``python benchmarks/bench_kernels.py`` (``--quick`` for a smoke run, ``--threads 1``
on a machine shared with other work, where torch's OpenMP threads oversubscribe the cores).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F

import recis_kernels as rk

from _harness import measure, print_table, write_json

BATCH = 4096
NUM_SPARSE = 26
NUM_DENSE = 13
DIM = 16


def make_inputs(seed: int = 0) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    vocab = np.logspace(2, 6, NUM_SPARSE).astype(np.int64)
    sparse = [torch.from_numpy((rng.zipf(1.2, BATCH) % v).astype(np.int64)) for v in vocab]
    dense = [
        torch.from_numpy(rng.lognormal(0, 1.5, BATCH).astype(np.float32)) for _ in range(NUM_DENSE)
    ]
    bounds = [
        torch.from_numpy(np.logspace(-2, 1.5, 8 + j).astype(np.float32)) for j in range(NUM_DENSE)
    ]
    lengths = torch.from_numpy(np.minimum(rng.exponential(30, BATCH), 100).astype(np.int64))
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    seq = rk.RaggedTensor(
        torch.from_numpy(rng.zipf(1.2, int(lengths.sum())).astype(np.int64)), offsets
    )
    strings = [[str(int(x)) for x in col.tolist()] for col in sparse]
    multi = [
        rk.RaggedTensor(
            torch.from_numpy(rng.integers(0, 1000, 3 * BATCH)), torch.arange(0, 3 * BATCH + 1, 3)
        )
        for _ in range(4)
    ]
    return {
        "sparse": sparse,
        "moduli": [int(v) + 7 for v in vocab],
        "dense": dense,
        "bounds": bounds,
        "seq": seq,
        "strings": strings,
        "multi": multi,
        "rows": torch.randn(seq.values.numel(), DIM),
    }


def bench_mod(x):
    ids, ns = x["sparse"], x["moduli"]
    fused = rk.fused_mod(ids, ns)
    for a, i, n in zip(fused, ids, ns, strict=True):
        assert torch.equal(a, torch.remainder(i, n))
    return {
        "recis fused_mod": lambda: rk.fused_mod(ids, ns),
        "per-feature rk.mod": lambda: [rk.mod(i, n) for i, n in zip(ids, ns, strict=True)],
        "torch.remainder loop": lambda: [
            torch.remainder(i, n) for i, n in zip(ids, ns, strict=True)
        ],
    }, NUM_SPARSE * BATCH


def bench_bucketize(x):
    xs, bs = x["dense"], x["bounds"]
    fused = rk.fused_bucketize(xs, bs)
    for a, v, b in zip(fused, xs, bs, strict=True):
        assert torch.equal(a, torch.bucketize(v, b, right=True))
    return {
        "recis fused_bucketize": lambda: rk.fused_bucketize(xs, bs),
        "per-feature rk.bucketize": lambda: [
            rk.bucketize(v, b) for v, b in zip(xs, bs, strict=True)
        ],
        "torch.bucketize loop": lambda: [
            torch.bucketize(v, b, right=True) for v, b in zip(xs, bs, strict=True)
        ],
    }, NUM_DENSE * BATCH


def bench_hash(x):
    cols = x["strings"]
    packed = [rk.ops.hashing._to_ragged_bytes("bench", c) for c in cols]
    data = torch.cat([d for d, _ in packed])
    pieces, base = [], 0
    for d, o in packed:
        pieces.append(o[:-1] + base)
        base += d.numel()
    offsets = torch.cat([*pieces, torch.tensor([base])])
    expected = torch.cat([rk.hash_bytes(d, o) for d, o in packed])
    assert torch.equal(rk.hash_bytes(data, offsets), expected)
    return {
        "recis hash_bytes (all columns)": lambda: rk.hash_bytes(data, offsets),
        "per-column rk.hash_bytes": lambda: [rk.hash_bytes(d, o) for d, o in packed],
        "per-column rk.hash_strings": lambda: [rk.hash_strings(c) for c in cols],
    }, NUM_SPARSE * BATCH


def _golden(k: int) -> int:
    v = ((k + 1) * 0x9E3779B97F4A7C15) % (1 << 64)
    return v - (1 << 64) if v >= 1 << 63 else v


def bench_multi_hash(x):
    ids = x["sparse"][0]
    buckets = [1 << 20, 1 << 18, 1 << 16, 1 << 14]
    loop = torch.stack([rk.mod(rk.mix64(ids + _golden(k)), b) for k, b in enumerate(buckets)], 1)
    assert torch.equal(rk.multi_hash(ids, buckets), loop)
    return {
        "recis multi_hash (K=4)": lambda: rk.multi_hash(ids, buckets),
        "per-hash mix64 + mod": lambda: [
            rk.mod(rk.mix64(ids + _golden(k)), b) for k, b in enumerate(buckets)
        ],
    }, BATCH * len(buckets)


def bench_hashed_uniform(x):
    # One training step's new ids at dim 16 (the embedding benchmark's dim), each with its
    # table's seed, as the embedding initializers draw them.
    ids = torch.cat([c[:320] for c in x["sparse"]])
    seeds = torch.repeat_interleave(torch.arange(NUM_SPARSE) * 0x2545F491 - 7, 320)
    dim = DIM

    def torch_spelling():
        base = rk.mix64(ids ^ seeds)
        cols = torch.tensor([_golden(j) for j in range(dim)])
        top53 = (rk.mix64((base[:, None] + cols).reshape(-1)).view(-1, dim) >> 11) & ((1 << 53) - 1)
        return (top53.to(torch.float64) + 0.5) / float(1 << 53)

    assert torch.equal(rk.hashed_uniform(ids, seeds, dim), torch_spelling())
    return {
        "recis hashed_uniform": lambda: rk.hashed_uniform(ids, seeds, dim),
        "torch (mix64 + shifts)": torch_spelling,
    }, ids.numel() * dim


def _cross_rows_torch(a: rk.RaggedTensor, b: rk.RaggedTensor) -> list[torch.Tensor]:
    out = []
    for ra, rb in zip(
        a.values.split(a.lengths().tolist()), b.values.split(b.lengths().tolist()), strict=True
    ):
        ua, ub = torch.unique(ra), torch.unique(rb)
        out.append(
            torch.cartesian_prod(ua, ub).reshape(-1, 2)
            if ua.numel() and ub.numel()
            else ra.new_empty(0, 2)
        )
    return out


def bench_cross(x):
    m = x["multi"]
    pairs = [(m[0], m[1]), (m[2], m[3])]
    return {
        "recis fused_feature_cross (2 pairs)": lambda: rk.fused_feature_cross(pairs),
        "per-pair rk.feature_cross": lambda: [rk.feature_cross(a, b) for a, b in pairs],
        "torch per-row unique + cartesian_prod (no hash)": lambda: [
            _cross_rows_torch(a, b) for a, b in pairs
        ],
    }, 2 * BATCH


def bench_truncate(x):
    seq = x["seq"]
    lengths = seq.lengths().tolist()

    def torch_rows():
        return torch.cat([r[-50:] for r in seq.values.split(lengths)])

    off = seq.offsets[0]

    def torch_vectorized():
        # Each row's last min(length, 50) values, gathered by one index over every row.
        keep = off.diff().clamp(max=50)
        row = torch.repeat_interleave(torch.arange(keep.numel()), keep)
        starts = torch.cumsum(keep, 0) - keep
        return seq.values[off[1:][row] - keep[row] + torch.arange(row.numel()) - starts[row]]

    want = rk.truncate(seq, 50, "tail").values.values
    assert torch.equal(want, torch_rows())
    assert torch.equal(want, torch_vectorized())
    return {
        "recis truncate (tail 50)": lambda: rk.truncate(seq, 50, "tail"),
        "torch vectorized (repeat_interleave + gather)": torch_vectorized,
        "torch split + slice per row": torch_rows,
    }, BATCH


def bench_segment_reduce(x):
    seq, rows = x["seq"], x["rows"]
    off = seq.offsets[0]
    idx = torch.arange(rows.shape[0])
    weights = torch.rand(rows.shape[0])
    ours = rk.segment_reduce(rows, off, weights, "sum")
    ref = F.embedding_bag(idx, rows, off[:-1], mode="sum", per_sample_weights=weights)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)

    def fwd_bwd(fn):
        def run():
            r = rows.detach().requires_grad_()
            fn(r).sum().backward()

        return run

    seg = torch.repeat_interleave(torch.arange(BATCH), seq.lengths())
    return {
        "recis segment_reduce sum fwd+bwd": fwd_bwd(
            lambda r: rk.segment_reduce(r, off, weights, "sum")
        ),
        "F.embedding_bag sum fwd+bwd": fwd_bwd(
            lambda r: F.embedding_bag(idx, r, off[:-1], mode="sum", per_sample_weights=weights)
        ),
        "index_add_ fwd+bwd": fwd_bwd(
            lambda r: torch.zeros(BATCH, DIM).index_add(0, seg, r * weights[:, None])
        ),
        "recis segment_reduce mean fwd+bwd": fwd_bwd(
            lambda r: rk.segment_reduce(r, off, None, "mean")
        ),
        "F.embedding_bag mean fwd+bwd": fwd_bwd(
            lambda r: F.embedding_bag(idx, r, off[:-1], mode="mean")
        ),
    }, BATCH


def bench_to_dense(x):
    seq = x["seq"]
    lengths = seq.lengths().tolist()
    pad = torch.nn.utils.rnn.pad_sequence

    def torch_dense():
        return pad(list(seq.values.split(lengths)), batch_first=True)

    off = seq.offsets[0]

    def torch_vectorized():
        # One indexed assignment of every value into a zero (B, longest row) tensor.
        length = off.diff()
        row = torch.repeat_interleave(torch.arange(length.numel()), length)
        out = seq.values.new_zeros(length.numel(), int(length.max()))
        out[row, torch.arange(row.numel()) - off[:-1][row]] = seq.values
        return out

    assert torch.equal(seq.to_dense(), torch_dense())
    assert torch.equal(seq.to_dense(), torch_vectorized())
    return {
        "recis ragged_to_dense": lambda: seq.to_dense(),
        "torch vectorized (repeat_interleave + index_put)": torch_vectorized,
        "torch split + pad_sequence": torch_dense,
    }, BATCH


MAP_KEYS = 1_000_000
LOOKUPS = 110_000
DISTINCT = 40_000
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64


def _lookup_batch(g, keys, tabs, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LOOKUPS ids drawn from DISTINCT (id, table) pairs, the first ``new`` of them absent."""
    pick = torch.randint(0, keys.numel(), (DISTINCT,), generator=g)
    k, t = keys[pick], tabs[pick]
    k[:new] = torch.randint(-(1 << 63), (1 << 63) - 1, (new,), generator=g)
    sel = torch.randint(0, DISTINCT, (LOOKUPS,), generator=g)
    return k[sel], t[sel]


def bench_id_map(x):
    """One step's id lookups in a fused id map of MAP_KEYS (id, table) pairs over 27 tables."""
    g = torch.Generator().manual_seed(1)
    keys = torch.randint(-(1 << 63), (1 << 63) - 1, (MAP_KEYS,), generator=g)
    tabs = torch.randint(0, NUM_SPARSE + 1, (MAP_KEYS,), generator=g, dtype=torch.int32)
    m = rk.IdMap()
    m.find_or_insert(keys, tabs)
    q_keys, q_tabs = _lookup_batch(g, keys, tabs, new=0)
    # A stream where 5% of each step's distinct ids are new: a fresh batch for each of the
    # (at most 9) warmup and timed calls.
    # One batch per call: warm-up, and an untimed settling call before each timed one
    # (``measure(..., settle=1)`` in main), with room to spare.
    stream = [_lookup_batch(g, keys, tabs, new=DISTINCT // 20) for _ in range(24)]
    calls = iter(stream)

    rows = m.export()
    pairs = zip(rows.keys.tolist(), rows.tables.tolist(), strict=True)
    as_dict = dict(zip(pairs, rows.rows.tolist(), strict=True))

    def dict_find():
        return [as_dict.get(p, -1) for p in zip(q_keys.tolist(), q_tabs.tolist(), strict=True)]

    # Sorted array of ``id + table * golden`` (a baseline: it may merge distinct pairs).
    packed = rows.keys + rows.tables.to(torch.int64) * _GOLDEN
    sorted_packed, order = torch.sort(packed)
    sorted_rows = rows.rows[order]

    def sorted_find():
        uq, inverse = torch.unique(q_keys + q_tabs.to(torch.int64) * _GOLDEN, return_inverse=True)
        at = torch.searchsorted(sorted_packed, uq).clamp(max=sorted_packed.numel() - 1)
        found = torch.where(sorted_packed[at] == uq, sorted_rows[at], -1)
        return found[inverse]

    expected = m.find(q_keys, q_tabs)
    assert bool((expected >= 0).all())
    assert expected.tolist() == dict_find()
    assert torch.equal(sorted_find(), expected)
    return {
        "recis IdMap.find": lambda: m.find(q_keys, q_tabs),
        "recis IdMap.find_or_insert (all present)": lambda: m.find_or_insert(q_keys, q_tabs),
        "recis IdMap.find_or_insert (5% new)": lambda: m.find_or_insert(*next(calls)),
        "python dict.get": dict_find,
        "torch.unique + searchsorted (sorted array)": sorted_find,
    }, LOOKUPS


BENCHES = {
    "mod": bench_mod,
    "bucketize": bench_bucketize,
    "hash": bench_hash,
    "multi_hash": bench_multi_hash,
    "hashed_uniform": bench_hashed_uniform,
    "feature_cross": bench_cross,
    "truncate": bench_truncate,
    "segment_reduce": bench_segment_reduce,
    "ragged_to_dense": bench_to_dense,
    "id_map": bench_id_map,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (smoke run)")
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHES), help="run these ops only")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: default)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps, warmup = (2, 1) if args.quick else (7, 2)
    inputs = make_inputs()
    results = {}
    for name, bench in BENCHES.items():
        if args.only and name not in args.only:
            continue
        contenders, units = bench(inputs)
        stats = {
            label: measure(fn, reps=reps, warmup=warmup, settle=1)
            for label, fn in contenders.items()
        }
        first = next(iter(stats))
        rows = []
        for label, s in stats.items():
            ratio = s.median_s / stats[first].median_s
            rows.append([label, s.median_s * 1e3, s.rate(units) / 1e6, ratio])
        print_table(
            f"{name} (batch {BATCH}; ratio = contender time / {first} time)",
            ["contender", "median ms", "M items/s", "ratio"],
            rows,
        )
        results[name] = {
            "units_per_call": units,
            "contenders": {
                label: {"median_s": s.median_s, "min_s": s.min_s} for label, s in stats.items()
            },
            "speedup_vs": {label: s.median_s / stats[first].median_s for label, s in stats.items()},
        }
    path = write_json(
        "kernels",
        {"batch": BATCH, "quick": args.quick, "threads": torch.get_num_threads(), "ops": results},
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
