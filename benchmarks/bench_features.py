"""Features: the fused FeatureEngine vs the same transforms as one call per feature.

Workload (BENCHMARKS.md): Criteo-like batches of 4096 rows from ``data.py``; 26 categorical
features (``mod`` with per-feature moduli), 13 dense features (NaN filled, then ``bucketize`` with
per-feature boundaries), one behaviour sequence (``truncate`` to its last 50 ids) and 2 crosses
(``cross`` then ``mod``): 42 features.

Contenders, run back to back on the same batches:

- ``FeatureEngine`` (fused): one call per op kind and step.
- per-feature loop: for every feature its transforms as one call each (``recis_kernels.mod``,
  ``torch.bucketize``, ``recis_kernels.truncate``, ``recis_kernels.feature_cross``), the way a
  hand-written preprocessing loop runs them.
- ``FeatureEngine(fused=False)``: the engine running every op on its own (engine overhead only).

Before timing, every contender's outputs are checked equal. Run: ``python benchmarks/bench_features.py``.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from _harness import measure, print_table, write_json
from data import NUM_DENSE, NUM_SPARSE, VOCAB_SIZES, generate_table

import recis_kernels as rk
from recis_features import Feature, FeatureEngine
from recis_kernels import RaggedTensor

SEQ_LEN = 50
CROSSES = (("C1", "C2"), ("C3", "C4"))
CROSS_BUCKETS = (1 << 24, (1 << 22) + 15)


def _boundaries(j: int) -> list[float]:
    # Per-feature log-spaced boundaries over the lognormal dense values, exact in float32 so
    # that torch.bucketize on float32 boundaries compares the same way as the engine.
    return [float(np.float32(b)) for b in np.logspace(-2, 1.5, 8 + j)]


def make_features() -> list[Feature]:
    features = [
        Feature(f"C{j + 1}").select(f"C{j + 1}").mod(int(VOCAB_SIZES[j]) + 7 * j)
        for j in range(NUM_SPARSE)
    ]
    features += [
        Feature(f"I{j + 1}").select(f"I{j + 1}").fill_missing(0.0).bucketize(_boundaries(j))
        for j in range(NUM_DENSE)
    ]
    features.append(Feature("seq").select("seq").truncate(SEQ_LEN, side="tail"))
    features += [
        Feature(f"{a}_x_{b}").select_fields([a, b]).cross().mod(n)
        for (a, b), n in zip(CROSSES, CROSS_BUCKETS, strict=True)
    ]
    return features


def make_batches(count: int, batch_size: int) -> list[dict[str, object]]:
    table = generate_table(count * batch_size, seed=0)
    batches = []
    for k in range(count):
        rb = table.slice(k * batch_size, batch_size).combine_chunks()
        batch: dict[str, object] = {}
        for j in range(NUM_SPARSE):
            batch[f"C{j + 1}"] = torch.from_numpy(rb.column(f"C{j + 1}").to_numpy().copy())
        for j in range(NUM_DENSE):
            col = rb.column(f"I{j + 1}").fill_null(float("nan"))
            batch[f"I{j + 1}"] = torch.from_numpy(col.to_numpy().copy())
        seq = rb.column("seq").combine_chunks()
        offsets = torch.from_numpy(seq.offsets.to_numpy().astype(np.int64))
        offsets -= offsets[0].clone()
        values = torch.from_numpy(seq.flatten().to_numpy().copy())
        batch["seq"] = RaggedTensor(values, [offsets])
        batches.append(batch)
    return batches


def per_feature_loop(batch: dict[str, object]) -> dict[str, object]:
    """The same transforms, one call per feature and transform."""
    out: dict[str, object] = {}
    for j in range(NUM_SPARSE):
        out[f"C{j + 1}"] = rk.mod(batch[f"C{j + 1}"], int(VOCAB_SIZES[j]) + 7 * j)
    for j in range(NUM_DENSE):
        x = batch[f"I{j + 1}"].nan_to_num(nan=0.0)
        out[f"I{j + 1}"] = torch.bucketize(x, BOUNDARIES[j], right=True)
    out["seq"] = rk.truncate(batch["seq"], SEQ_LEN, "tail").values
    for (a, b), n in zip(CROSSES, CROSS_BUCKETS, strict=True):
        unit = torch.arange(batch[a].shape[0] + 1, dtype=torch.int64)
        ra, rb = (RaggedTensor(batch[c], [unit]) for c in (a, b))
        crossed = rk.feature_cross(ra, rb)
        out[f"{a}_x_{b}"] = crossed.with_values(rk.mod(crossed.values, n), crossed.weights)
    return out


BOUNDARIES = [torch.tensor(_boundaries(j), dtype=torch.float32) for j in range(NUM_DENSE)]


def _same(a: object, b: object) -> bool:
    if isinstance(a, RaggedTensor):
        return (
            isinstance(b, RaggedTensor)
            and all(torch.equal(x, y) for x, y in zip(a.offsets, b.offsets, strict=True))
            and torch.equal(a.values, b.values)
        )
    return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    batches = make_batches(args.batches, args.batch_size)
    features = make_features()
    fused = FeatureEngine(features, passthrough=False)
    unfused = FeatureEngine(features, passthrough=False, fused=False)

    for batch in batches[:2]:
        ref = per_feature_loop(batch)
        for engine in (fused, unfused):
            got = engine(batch)
            bad = [name for name in ref if not _same(got[name], ref[name])]
            if bad:
                print(f"outputs differ from the per-feature loop for {bad}", file=sys.stderr)
                return 1

    contenders = {
        "FeatureEngine (fused)": lambda: [fused(b) for b in batches],
        "per-feature loop": lambda: [per_feature_loop(b) for b in batches],
        "FeatureEngine(fused=False)": lambda: [unfused(b) for b in batches],
    }
    stats = {name: measure(fn, reps=args.reps) for name, fn in contenders.items()}
    rows_total = args.batches * args.batch_size
    base = stats["FeatureEngine (fused)"].median_s
    calls = sum(len(step) for step in fused.plan())
    rows = [
        [name, s.median_s / args.batches * 1e3, s.rate(rows_total), s.median_s / base]
        for name, s in stats.items()
    ]
    print_table(
        f"features: {len(features)} features, batch {args.batch_size}, {calls} engine calls, "
        f"{torch.get_num_threads()} thread(s)",
        ["contender", "ms / batch", "rows/s", "fused speed-up"],
        rows,
    )
    write_json(
        "features",
        {
            "batch_size": args.batch_size,
            "batches": args.batches,
            "threads": torch.get_num_threads(),
            "features": len(features),
            "engine_calls_per_batch": calls,
            "plan": fused.plan(),
            "results": {
                name: {
                    "median_s_per_batch": s.median_s / args.batches,
                    "rows_per_s": s.rate(rows_total),
                    "fused_speedup": s.median_s / base,
                }
                for name, s in stats.items()
            },
            "target_speedup_vs_loop": 3.0,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
