"""Embedding training step: recis dynamic tables vs nn.EmbeddingBag + SparseAdam (and FBGEMM TBE).

Workload (docs/benchmarks.md): 26 single-id Zipf features + 1 behaviour sequence (~30 ids), batch
4096, dim 16, from the seeded click log of ``benchmarks/data.py``. Each contender runs forward,
backward of the same loss (a fixed linear head over the concatenated pooled embeddings) and its
sparse optimizer step on the same stream of batches, none repeated: ``--warmup-batches`` untimed
steps first (the dynamic tables then hold every id of those batches, the static tables'
optimizer state is allocated), then the timed steps on later batches, whose ids the dynamic
tables meet partly for the first time and insert, as in training.

- recis: one ``EmbeddingEngine`` (all 27 tables fuse into one physical dynamic hash table: no
  modulo, no fixed size) with ``SparseAdam`` and with ``SparseRowWiseAdagrad``; the head reads
  its ``concat`` output, the 27 pooled features as one ``(B, 27 * 16)`` tensor (what TBE
  returns; the ``nn.EmbeddingBag`` contender concatenates its 27 outputs with ``torch.cat``).
- anchor (a): one ``nn.EmbeddingBag(sparse=True)`` per feature (and one for the sequence), ids
  modulo ``--static-rows`` (1M, as RESEARCH.md's anchor; 0: each feature's vocabulary size),
  ``torch.optim.SparseAdam``.
- anchor (b): FBGEMM table-batched embeddings on CPU (``SplitTableBatchedEmbeddingBagsCodegen``,
  one fp32 table per feature sized to its vocabulary, ids modulo it, the sequence sum-pooled over
  C2's table) with exact row-wise Adagrad fused into the backward, at the recis row-wise
  Adagrad contender's learning rate. Only when ``fbgemm_gpu`` imports (``nox -s bench-fbgemm``
  makes an environment with matching torch and fbgemm-gpu-cpu); otherwise not measured.

Contenders are timed in interleaved rounds (one step of each per round, after an untimed step
of the same contender), each contender taking the batches of the stream in the same order. On a
shared 2-core machine use ``--threads 1``: with torch's default
two OpenMP threads and other work on the cores, every contender slows down by an order of
magnitude (spinning threads wait for a descheduled sibling).

Run: ``python benchmarks/bench_embedding.py [--warmup-batches 30] [--reps 15] [--threads N]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import Stats, measure, print_table, write_json
from data import VOCAB_SIZES, generate_table

BATCH = 4096
DIM = 16
FEATURES = [f"C{j + 1}" for j in range(26)]
ROWWISE_ADAGRAD_LR = 0.05  # the recis row-wise Adagrad contender and FBGEMM TBE's fused one


def make_batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of ``{C1..C26: (B,) int64, seq: (values, offsets)}``."""
    table = generate_table(n * BATCH, seed=seed)
    batches = []
    for k in range(n):
        part = table.slice(k * BATCH, BATCH)
        b: dict[str, torch.Tensor] = {
            f: torch.from_numpy(part.column(f).to_numpy().copy()) for f in FEATURES
        }
        seq = part.column("seq").combine_chunks()
        offsets = torch.from_numpy(seq.offsets.to_numpy().astype("int64").copy())
        offsets -= int(offsets[0])
        values = torch.from_numpy(seq.values.to_numpy().copy())[: int(offsets[-1])]
        b["seq_values"], b["seq_offsets"] = values, offsets
        batches.append(b)
    return batches


def _head(num_features: int) -> torch.Tensor:
    return torch.randn(num_features * DIM, generator=torch.Generator().manual_seed(7)) / 100


def recis_step_factory(batches, optimizer: str):
    from recis_embedding import EmbeddingEngine, EmbeddingOption, SparseAdam, SparseRowWiseAdagrad
    from recis_kernels import RaggedTensor

    options = {f: EmbeddingOption(DIM) for f in FEATURES}
    options["seq"] = EmbeddingOption(DIM, shared_name="C2")
    engine = EmbeddingEngine(options, concat={"all": list(options)})
    opt = (
        SparseAdam(engine, lr=1e-3)
        if optimizer == "adam"
        else SparseRowWiseAdagrad(engine, lr=ROWWISE_ADAGRAD_LR)
    )
    head = _head(len(options))
    inputs = []
    for b in batches:
        d = {f: b[f] for f in FEATURES}
        d["seq"] = RaggedTensor(b["seq_values"], b["seq_offsets"], validate=False)
        inputs.append(d)
    state = {"i": 0}

    def step() -> None:
        batch = inputs[state["i"]]
        state["i"] += 1
        x = engine(batch)["all"]
        loss = (x @ head).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    return step, engine


def embedding_bag_step_factory(batches, static_rows: int):
    vocab = [*VOCAB_SIZES, VOCAB_SIZES[1]]
    sizes = [static_rows] * len(vocab) if static_rows else vocab
    bags = [torch.nn.EmbeddingBag(n, DIM, mode="sum", sparse=True) for n in sizes]
    opt = torch.optim.SparseAdam([p for b in bags for p in b.parameters()], lr=1e-3)
    head = _head(len(bags))
    inputs = []
    for b in batches:
        feats = []
        for j, f in enumerate(FEATURES):
            ids = torch.remainder(b[f], sizes[j])
            feats.append((ids, torch.arange(BATCH)))
        feats.append((torch.remainder(b["seq_values"], sizes[-1]), b["seq_offsets"][:-1]))
        inputs.append(feats)
    state = {"i": 0}

    def step() -> None:
        feats = inputs[state["i"]]
        state["i"] += 1
        x = torch.cat([bag(ids, off) for bag, (ids, off) in zip(bags, feats, strict=True)], dim=1)
        loss = (x @ head).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    return step


def fbgemm_step_factory(batches, lr: float):
    """FBGEMM table-batched embeddings on CPU with fused exact row-wise Adagrad.

    One table per single-id feature (rows = its vocabulary size, ids modulo it); the sequence
    sum-pools over C2's table, as the recis contender shares it. Inputs are the flat ids and
    offsets of the 27 features in feature-major order (``27 * B + 1`` offsets). Bounds checks
    are off: the ids are already reduced into range.
    """
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
        BoundsCheckMode,
        ComputeDevice,
        EmbeddingLocation,
        PoolingMode,
    )
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    sizes = list(VOCAB_SIZES)
    feature_table_map = [*range(len(FEATURES)), 1]  # the sequence reads C2's table
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(n, DIM, EmbeddingLocation.HOST, ComputeDevice.CPU) for n in sizes],
        feature_table_map=feature_table_map,
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=lr,
        eps=1e-8,
        pooling_mode=PoolingMode.SUM,
        weights_precision=SparseType.FP32,
        device=torch.device("cpu"),
        bounds_check_mode=BoundsCheckMode.NONE,
    )
    # TBE's CPU weights start at zero, which would make every gradient (and update) zero;
    # start them like recis' default initializer (normal, std 0.01).
    with torch.no_grad():
        tbe.weights_host.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(11))
    head = _head(len(feature_table_map))
    inputs = []
    for b in batches:
        ids = [torch.remainder(b[f], sizes[j]) for j, f in enumerate(FEATURES)]
        ids.append(torch.remainder(b["seq_values"], sizes[1]))
        lengths = [torch.ones(BATCH, dtype=torch.int64)] * len(FEATURES)
        lengths.append(torch.diff(b["seq_offsets"]))
        offsets = torch.zeros(len(feature_table_map) * BATCH + 1, dtype=torch.int64)
        torch.cumsum(torch.cat(lengths), 0, out=offsets[1:])
        inputs.append((torch.cat(ids).contiguous(), offsets))
    state = {"i": 0}

    def step() -> None:
        indices, offsets = inputs[state["i"]]
        state["i"] += 1
        x = tbe(indices, offsets)
        loss = (x @ head).square().mean()
        loss.backward()  # the row-wise Adagrad update is fused into TBE's backward

    with torch.no_grad():
        out = tbe(*inputs[0])
    want = (BATCH, len(feature_table_map) * DIM)
    if out.shape != want or not bool(torch.isfinite(out).all()) or not bool(out.any()):
        raise RuntimeError(
            f"FBGEMM TBE forward gave shape {tuple(out.shape)} (want {want}), "
            f"finite: {bool(torch.isfinite(out).all())}, nonzero: {bool(out.any())}"
        )
    return step


def interleaved(contenders: dict, reps: int) -> dict[str, Stats]:
    """Time one step of each contender per round, ``reps`` rounds: on a shared machine, load
    changes then hit every contender alike instead of whichever ran during a busy spell. Each
    timed step follows an untimed step of the same contender (``settle``, see ``measure``)."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(reps):
        for name, fn in contenders.items():
            times[name] += measure(fn, reps=1, warmup=0, settle=1).times_s
    return {
        name: Stats(statistics.median(t), min(t), max(t), tuple(t)) for name, t in times.items()
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--warmup-batches",
        type=int,
        default=30,
        help="untimed steps before the timed ones, on batches of their own",
    )
    ap.add_argument("--reps", type=int, default=15, help="timed rounds (one step each)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--static-rows",
        type=int,
        default=1_000_000,
        help="rows per nn.EmbeddingBag table (ids modulo it; RESEARCH.md's anchor used 1M); "
        "0: each feature's vocabulary size",
    )
    args = ap.parse_args(argv)
    if args.reps < 1 or args.warmup_batches < 1:
        ap.error("--reps and --warmup-batches must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    # Every contender takes the stream in order: the warm-up batches, then two a timed round
    # (the untimed step before each timed one, see interleaved); no batch is seen twice.
    batches = make_batches(args.warmup_batches + 2 * args.reps)
    ids_per_batch = sum(b[f].numel() for b in batches for f in FEATURES) / len(batches) + sum(
        b["seq_values"].numel() for b in batches
    ) / len(batches)

    recis_adam, engine = recis_step_factory(batches, "adam")
    recis_rw, _ = recis_step_factory(batches, "rowwise")
    bag_step = embedding_bag_step_factory(batches, args.static_rows)
    contenders = {
        "recis + SparseAdam": recis_adam,
        "recis + SparseRowWiseAdagrad": recis_rw,
        "nn.EmbeddingBag + SparseAdam": bag_step,
    }
    fbgemm_name = "FBGEMM TBE (CPU, row-wise Adagrad)"
    try:
        import fbgemm_gpu
    except ImportError:
        fbgemm = "not measured (fbgemm_gpu not installed)"
    else:
        fbgemm = f"fbgemm_gpu {getattr(fbgemm_gpu, '__version__', '?')}, torch {torch.__version__}"
        contenders[fbgemm_name] = fbgemm_step_factory(batches, ROWWISE_ADAGRAD_LR)
    # Warm-up: the dynamic tables take the ids of the first batches, the static tables'
    # optimizer state is allocated (one step fewer: measure's one timed call ends it).
    for fn in contenders.values():
        measure(fn, reps=1, warmup=args.warmup_batches - 1)
    rows_before = len(engine.physical[0])
    results = interleaved(contenders, args.reps)
    rows_adam = len(engine.physical[0])

    base = results["nn.EmbeddingBag + SparseAdam"].rate(BATCH)
    rows = []
    for name, st in results.items():
        rate = st.rate(BATCH)
        rows.append([name, rate, st.median_s * 1e3, rate / base])
    if fbgemm_name not in results:
        rows.append([fbgemm_name, fbgemm, "", ""])
    print_table(
        f"embedding train step: batch {BATCH}, 26 single-id + 1 sequence feature, dim {DIM}, "
        f"{ids_per_batch:,.0f} ids/batch, {args.warmup_batches} warm-up batches, recis table "
        f"{rows_before:,} rows before the timed steps and {rows_adam:,} after, "
        f"EmbeddingBag rows/table "
        f"{args.static_rows or 'vocabulary'}, torch threads {torch.get_num_threads()}",
        ["contender", "samples/s", "median ms/step", "x EmbeddingBag+SparseAdam"],
        rows,
    )
    recis_vs_tbe = None
    if fbgemm_name in results:
        recis_vs_tbe = results["recis + SparseRowWiseAdagrad"].rate(BATCH) / results[
            fbgemm_name
        ].rate(BATCH)
        print(f"recis + SparseRowWiseAdagrad vs {fbgemm_name} ({fbgemm}): {recis_vs_tbe:.2f}x")
    write_json(
        "embedding",
        {
            "batch": BATCH,
            "dim": DIM,
            "ids_per_batch": ids_per_batch,
            "static_rows": args.static_rows,
            "warmup_batches": args.warmup_batches,
            "recis_table_rows_before": rows_before,
            "recis_table_rows": rows_adam,
            "fbgemm": fbgemm,
            "recis_rowwise_vs_fbgemm_tbe": recis_vs_tbe,
            "results": {
                k: {"samples_per_s": v.rate(BATCH), "median_s": v.median_s, "times_s": v.times_s}
                for k, v in results.items()
            },
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
