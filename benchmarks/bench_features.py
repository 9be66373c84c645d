"""Features: the fused FeatureEngine vs the same transforms as one call per feature.

Workload (docs/benchmarks.md): Criteo-like batches of 4096 rows from ``data.py``; 26 categorical
features (``mod`` with per-feature moduli), 13 dense features (NaN filled, then ``bucketize`` with
per-feature boundaries), one behaviour sequence (``truncate`` to its last 50 ids) and 2 crosses
(``cross`` then ``mod``): 42 features.

Contenders, run back to back on the same batches, for the full set and for each part alone:

- ``FeatureEngine`` (fused): one call per op kind and step.
- per-feature loop: for every feature its transforms as one call each (``recis_kernels.mod``,
  ``nan_to_num`` + ``torch.bucketize``, ``recis_kernels.truncate``,
  ``recis_kernels.feature_cross``), the way a hand-written preprocessing loop runs them.
- ``FeatureEngine(fused=False)``: the engine running every op on its own.

Before timing, every contender's outputs are checked equal; the contenders are then timed in
turns, each timed pass right after an untimed pass of its own (see ``_harness.measure``'s
``settle``), so a pass is timed in the steady state a training loop runs it in. Run:
``python benchmarks/bench_features.py [--threads 1]``.

``--device cuda`` runs the same on a GPU (batches copied there first; each timed pass ends with
a synchronization) and also reports the kernel launches per batch of the fused engine and of
the loop, counted by ``torch.profiler`` (every kernel the device ran, the ops' own and torch's
glue alike; copies and memsets aside).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import recis_kernels as rk
from recis_features import Feature, FeatureEngine
from recis_kernels import RaggedTensor

from _harness import Stats, measure, print_table, write_json
from data import NUM_DENSE, NUM_SPARSE, VOCAB_SIZES, generate_table

SEQ_LEN = 50
CROSSES = (("C1", "C2"), ("C3", "C4"))
CROSS_BUCKETS = (1 << 24, (1 << 22) + 15)


def _boundaries(j: int) -> list[float]:
    # Per-feature log-spaced boundaries over the lognormal dense values, exact in float32 so
    # that torch.bucketize on float32 boundaries compares the same way as the engine.
    return [float(np.float32(b)) for b in np.logspace(-2, 1.5, 8 + j)]


def _categorical() -> list[Feature]:
    return [Feature(f"C{j + 1}").select(f"C{j + 1}").mod(_modulus(j)) for j in range(NUM_SPARSE)]


def _dense() -> list[Feature]:
    return [
        Feature(f"I{j + 1}").select(f"I{j + 1}").fill_missing(0.0).bucketize(_boundaries(j))
        for j in range(NUM_DENSE)
    ]


def _sequence() -> list[Feature]:
    return [Feature("seq").select("seq").truncate(SEQ_LEN, side="tail")]


def _crosses() -> list[Feature]:
    return [
        Feature(f"{a}_x_{b}").select_fields([a, b]).cross().mod(n)
        for (a, b), n in zip(CROSSES, CROSS_BUCKETS, strict=True)
    ]


def _modulus(j: int) -> int:
    return int(VOCAB_SIZES[j]) + 7 * j


def make_batches(
    count: int, batch_size: int, device: torch.device | str = "cpu"
) -> list[dict[str, object]]:
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
        if torch.device(device).type != "cpu":
            batch = {k: v.to(device) for k, v in batch.items()}  # type: ignore[attr-defined]
        batches.append(batch)
    return batches


def loop_categorical(batch: dict[str, Any], out: dict[str, Any]) -> None:
    for j in range(NUM_SPARSE):
        out[f"C{j + 1}"] = rk.mod(batch[f"C{j + 1}"], _modulus(j))


def loop_dense(batch: dict[str, Any], out: dict[str, Any]) -> None:
    bounds = _boundaries_on(batch["I1"].device)
    for j in range(NUM_DENSE):
        x = batch[f"I{j + 1}"].nan_to_num(nan=0.0)
        out[f"I{j + 1}"] = torch.bucketize(x, bounds[j], right=True)


def loop_sequence(batch: dict[str, Any], out: dict[str, Any]) -> None:
    out["seq"] = rk.truncate(batch["seq"], SEQ_LEN, "tail").values


def loop_crosses(batch: dict[str, Any], out: dict[str, Any]) -> None:
    for (a, b), n in zip(CROSSES, CROSS_BUCKETS, strict=True):
        crossed = rk.feature_cross(batch[a], batch[b])  # single-valued: one id per row
        out[f"{a}_x_{b}"] = crossed.with_values(rk.mod(crossed.values, n), crossed.weights)


BOUNDARIES = [torch.tensor(_boundaries(j), dtype=torch.float32) for j in range(NUM_DENSE)]
_BOUNDARIES_BY_DEVICE: dict[torch.device, list[torch.Tensor]] = {}


def _boundaries_on(device: torch.device) -> list[torch.Tensor]:
    """The loop's boundary tensors on ``device``, copied there once."""
    bounds = _BOUNDARIES_BY_DEVICE.get(device)
    if bounds is None:
        bounds = _BOUNDARIES_BY_DEVICE[device] = [b.to(device) for b in BOUNDARIES]
    return bounds


# (workload, its features, its per-feature loop); the first is the full 42-feature set.
_PARTS = [
    ("26 categorical: mod", _categorical, loop_categorical),
    ("13 dense: fill_missing + bucketize", _dense, loop_dense),
    ("1 sequence: truncate", _sequence, loop_sequence),
    ("2 crosses: cross + mod", _crosses, loop_crosses),
]


def workloads() -> list[tuple[str, list[Feature], Callable[[dict[str, Any]], dict[str, Any]]]]:
    """The full feature set, then each of its parts alone."""

    def loop_of(parts: list[Callable[[dict[str, Any], dict[str, Any]], None]]) -> Callable:
        def run(batch: dict[str, Any]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for part in parts:
                part(batch, out)
            return out

        return run

    every = [f for _, make, _ in _PARTS for f in make()]
    result = [(f"all {len(every)} features", every, loop_of([loop for *_, loop in _PARTS]))]
    result += [(name, make(), loop_of([loop])) for name, make, loop in _PARTS]
    return result


def _same(a: object, b: object) -> bool:
    if isinstance(a, RaggedTensor):
        return (
            isinstance(b, RaggedTensor)
            and all(torch.equal(x, y) for x, y in zip(a.offsets, b.offsets, strict=True))
            and torch.equal(a.values, b.values)
        )
    return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)


def _interleaved(contenders: dict[str, Callable[[], Any]], reps: int) -> dict[str, Stats]:
    """Time the contenders in turns (one repetition each per round), so that load from other
    processes on a shared machine falls on all of them alike; medians over the rounds."""
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(reps):
        for name, fn in contenders.items():
            times[name].append(measure(fn, reps=1, warmup=0, settle=1).median_s)
    return {
        name: Stats(statistics.median(t), min(t), max(t), tuple(t)) for name, t in times.items()
    }


def _synced(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``fn`` followed, on a GPU, by a wait for the work it queued."""
    if device.type != "cuda":
        return fn

    def run() -> Any:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def kernel_launches(fn: Callable[[], Any], device: torch.device) -> int:
    """The device kernels one call of ``fn`` runs (copies and memsets aside), counted by
    ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    return sum(
        1
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
        and not e.name.lower().startswith(("memcpy", "memset"))
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or a CUDA device")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: torch sees no CUDA device", file=sys.stderr)
        return 2

    batches = make_batches(args.batches, args.batch_size, device)
    rows_total = args.batches * args.batch_size
    table, results = [], {}
    for name, features, loop in workloads():
        fused = FeatureEngine(features, passthrough=False)
        unfused = FeatureEngine(features, passthrough=False, fused=False)
        for batch in batches[:2]:
            ref = loop(batch)
            for engine in (fused, unfused):
                got = engine(batch)
                bad = [f for f in ref if not _same(got[f], ref[f])]
                if bad:
                    print(f"{name}: outputs differ from the loop for {bad}", file=sys.stderr)
                    return 1
        contenders = {
            "fused": lambda e=fused: [e(b) for b in batches],
            "loop": lambda f=loop: [f(b) for b in batches],
            "unfused": lambda e=unfused: [e(b) for b in batches],
        }
        stats = _interleaved({k: _synced(fn, device) for k, fn in contenders.items()}, args.reps)
        per_batch = {k: s.median_s / args.batches * 1e3 for k, s in stats.items()}
        calls = sum(len(step) for step in fused.plan())
        row = [
            name,
            calls,
            per_batch["fused"],
            per_batch["loop"],
            per_batch["unfused"],
            per_batch["loop"] / per_batch["fused"],
            per_batch["unfused"] / per_batch["fused"],
        ]
        results[name] = {
            "features": len(features),
            "engine_calls_per_batch": calls,
            "ms_per_batch": per_batch,
            "rows_per_s": {k: s.rate(rows_total) for k, s in stats.items()},
            "fused_speedup_vs_loop": per_batch["loop"] / per_batch["fused"],
            "fused_speedup_vs_unfused_engine": per_batch["unfused"] / per_batch["fused"],
        }
        if device.type == "cuda":
            launches = {
                k: kernel_launches(contenders[k], device) / args.batches for k in ("fused", "loop")
            }
            row += [launches["fused"], launches["loop"]]
            results[name]["kernel_launches_per_batch"] = launches
        table.append(row)
    columns = [
        "workload",
        "engine calls",
        "fused engine",
        "per-feature loop",
        "engine fused=False",
        "speed-up vs loop",
        "speed-up vs fused=False",
    ]
    if device.type == "cuda":
        columns += ["kernels/batch fused", "kernels/batch loop"]
    print_table(
        f"features on {device}: batch {args.batch_size}, {args.batches} batches, "
        f"{torch.get_num_threads()} thread(s); ms per batch (median of {args.reps})",
        columns,
        table,
    )
    write_json(
        "features",
        {
            "batch_size": args.batch_size,
            "batches": args.batches,
            "threads": torch.get_num_threads(),
            "device": str(device),
            "target_speedup_vs_loop": 3.0,
            "workloads": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
