"""Train a multi-task DeepFM-style click/conversion model end to end with recis.

What it does, in order:

1. writes a synthetic click log with a planted signal (``benchmarks/data.py``): a training set
   and a held-out evaluation set, Parquet, zstd;
2. reads it with ``recis_io.Dataset`` (nulls filled while reading);
3. transforms it with a ``recis_features.FeatureEngine`` (log1p of the dense columns, the
   behaviour sequence truncated to its most recent ids);
4. embeds the 26 categorical columns and the sequence with ``recis_embedding`` dynamic hash
   tables (the sequence shares the item table), trained by a sparse Adam;
5. trains click and conversion heads over a DeepFM body with ``recis_train.Trainer``,
   evaluating AUC per task (and GAUC per user) against a constant-prediction baseline;
6. stops half way, then builds everything afresh and resumes from the checkpoint, the way a
   restarted job would;
7. prints a short report and saves a PNG of the loss and AUC curves (with matplotlib).

Run ``python examples/demo.py --small --out DIR`` for a quick run (CI does this), or
without ``--small`` for a million training rows (``--rows N`` for another size).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import recis_embedding as emb
import recis_features as rf
import recis_io
from recis_train import (
    LoggingHook,
    MultiTask,
    TableStatsHook,
    Task,
    Trainer,
    TrainingArguments,
    find_tables,
    seed_everything,
)
from recis_train.metrics import AUROC, GAUC, Calibration, LogLoss

ROOT = Path(__file__).resolve().parent.parent
DENSE = [f"I{i}" for i in range(1, 14)]
SPARSE = [f"C{i}" for i in range(1, 27)]
SEQ_LEN = 50
DIM = 8


def load_data_module() -> Any:
    """``benchmarks/data.py`` of this repository (not an installed package)."""
    spec = importlib.util.spec_from_file_location(
        "recis_bench_data", ROOT / "benchmarks" / "data.py"
    )
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load {ROOT / 'benchmarks' / 'data.py'}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


def write_data(out: Path, train_rows: int, eval_rows: int) -> tuple[list[Path], list[Path]]:
    """The training and held-out click logs (the planted signal is the same in both)."""
    data = load_data_module()
    common = {"row_group_size": 65_536, "signal": True, "compression": "zstd"}
    train = data.write_dataset(out / "train", rows=train_rows, files=4, seed=0, **common)
    held_out = data.write_dataset(out / "eval", rows=eval_rows, files=1, seed=1, **common)
    return train, held_out


def reader(files: list[Path], batch_size: int, *, shuffle: bool) -> recis_io.Dataset:
    columns = [recis_io.Column(c, fill=0.0) for c in DENSE]
    columns += [*SPARSE, "seq", "label", "conversion"]
    return recis_io.Dataset(
        [str(f) for f in files], batch_size=batch_size, columns=columns, shuffle=shuffle, seed=0
    )


def feature_engine() -> rf.FeatureEngine:
    features = [rf.Feature(c).select(c).log1p() for c in DENSE]
    features += [rf.Feature(c).select(c) for c in SPARSE]
    features.append(rf.Feature("seq").select("seq").truncate(SEQ_LEN, side="tail"))
    return rf.FeatureEngine(features)


class DeepFM(nn.Module):
    """Features → embeddings → FM interactions + MLP; returns the shared representation.

    Inputs per batch: 13 dense floats, 26 categorical ids (one per row) and a variable-length
    behaviour sequence of item ids, mean-pooled through the item table (shared with ``C2``).
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.features = feature_engine()
        options = {c: emb.EmbeddingOption(DIM, combiner="sum", device=device) for c in SPARSE}
        options["seq"] = emb.EmbeddingOption(DIM, shared_name="C2", combiner="mean", device=device)
        # All 27 pooled fields as one (B, 27 * DIM) output, pooled straight into it.
        self.embeddings = emb.EmbeddingEngine(options, concat={"fields": [*SPARSE, "seq"]})
        fields = len(SPARSE) + 1
        self.dense_norm = nn.BatchNorm1d(len(DENSE))
        self.mlp = nn.Sequential(
            nn.Linear(fields * DIM + len(DENSE), 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
        )
        self.out_dim = 64 + 1

    def forward(self, batch: Any) -> torch.Tensor:
        values = self.embeddings(self.features(batch))
        fields = values["fields"].view(-1, len(SPARSE) + 1, DIM)  # (B, F, D)
        dense = self.dense_norm(torch.stack([values[c].float() for c in DENSE], dim=1))
        # FM second order: ½((Σ e)² − Σ e²), summed over the embedding dimension.
        fm = 0.5 * (fields.sum(1).pow(2) - fields.pow(2).sum(1)).sum(1, keepdim=True)
        deep = self.mlp(torch.cat([fields.flatten(1), dense], dim=1))
        return torch.cat([deep, fm], dim=1)


def build(out_dir: Path, args: TrainingArguments, train_files, eval_files, batch_size: int):
    """Model, optimizers and trainer, built the same way by the first run and the resumed one."""
    seed_everything(args.seed)
    # Tables live where the dense model runs, so ids never cross devices.
    body = DeepFM(torch.device("cuda" if args.device == "cuda" else "cpu"))
    metrics = {"auc": AUROC, "logloss": LogLoss, "calibration": Calibration}
    model = MultiTask(
        body,
        [
            Task(
                "click", nn.Linear(body.out_dim, 1), label="label", metrics=metrics | {"gauc": GAUC}
            ),
            Task(
                "conversion",
                nn.Linear(body.out_dim, 1),
                label="conversion",
                weight=0.5,
                metrics=metrics,
            ),
        ],
        group_column="C1",  # the user column: GAUC averages AUC per user
    )
    dense_params = [p for p in model.parameters() if p.requires_grad]
    trainer = Trainer(
        model,
        args,
        train_data=reader(train_files, batch_size, shuffle=True),
        eval_data=lambda: reader(eval_files, 8192, shuffle=False),
        dense_optimizer=torch.optim.Adam(dense_params, lr=2e-3),
        sparse_optimizer=emb.SparseAdam(model, lr=5e-3),
        hooks=[LoggingHook(), TableStatsHook(every=args.log_every)],
    )
    return trainer


def baseline(eval_files: list[Path]) -> dict[str, float]:
    """A constant prediction (the held-out base rate): AUC 0.5 and the entropy log loss."""
    results = {}
    counts = {"label": 0.0, "conversion": 0.0}
    rows = 0
    for batch in reader(eval_files, 65_536, shuffle=False):
        rows += int(batch["label"].shape[0])
        for k in counts:
            counts[k] += float(batch[k].sum())
    for task, column in (("click", "label"), ("conversion", "conversion")):
        rate = counts[column] / rows
        loss = LogLoss()
        loss.update(torch.full((1,), rate, dtype=torch.float64), torch.ones(1))
        positive = loss.compute()
        loss.reset()
        loss.update(torch.full((1,), rate, dtype=torch.float64), torch.zeros(1))
        results[f"{task}/logloss"] = rate * positive + (1 - rate) * loss.compute()
        results[f"{task}/auc"] = 0.5
        results[f"{task}/rate"] = rate
    return results


def save_plot(trainer: Trainer, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [s for s, _ in trainer.history["train"]]
    for key in ("loss/click", "loss/conversion"):
        values = [logs.get(key, math.nan) for _, logs in trainer.history["train"]]
        left.plot(steps, values, label=key, linewidth=0.8)
    left.set_xlabel("step")
    left.set_title("training loss")
    left.legend()
    eval_steps = [s for s, _ in trainer.history["eval"]]
    for key in ("click/auc", "conversion/auc", "click/gauc"):
        right.plot(
            eval_steps, [r.get(key, math.nan) for _, r in trainer.history["eval"]], "o-", label=key
        )
    right.axhline(0.5, color="grey", linestyle="--", label="baseline")
    right.set_xlabel("step")
    right.set_title("held-out AUC")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _rows(text: str) -> int:
    """``--rows``: a positive integer (0 would read as "not given", the full size)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a small data set (CI)")
    parser.add_argument("--out", default="demo-output", help="where data, checkpoints, plot go")
    parser.add_argument(
        "--rows", type=_rows, default=None, help="training rows (overrides --small)"
    )
    opts = parser.parse_args(argv)
    out = Path(opts.out)
    train_rows = opts.rows or (40_000 if opts.small else 1_000_000)
    eval_rows = max(train_rows // 10, 10_000)
    batch_size = 1024 if opts.small else 4096
    torch.manual_seed(0)

    started = time.perf_counter()
    train_files, eval_files = write_data(out / "data", train_rows, eval_rows)
    print(f"wrote {train_rows:,} training and {eval_rows:,} held-out rows to {out / 'data'}")

    steps = math.ceil(train_rows / batch_size)
    # Evaluations and checkpoints every quarter (rounded up, so that the last one before the
    # end is not one step short of the evaluation at the end); the first run stops on the
    # second of them.
    every = max(math.ceil(steps / 4), 1)
    half = 2 * every if 2 * every < steps else max(steps // 2, 1)
    args = TrainingArguments(
        output_dir=str(out / "run"),
        train_steps=steps,
        eval_every=every,
        log_every=max(steps // 10, 1),
        save_every=every,
        max_to_keep=2,
        device="cuda" if torch.cuda.is_available() else "cpu",
        resume=True,
    )
    # A fresh demo every time: checkpoints of an earlier invocation would be resumed from.
    shutil.rmtree(out / "run", ignore_errors=True)
    # First run: stop half way, as if the job had been preempted.
    first = build(
        out,
        TrainingArguments.from_dict(args.to_dict() | {"train_steps": half}),
        train_files,
        eval_files,
        batch_size,
    )
    t0 = time.perf_counter()
    first.train_and_evaluate()
    first_time, first_steps = time.perf_counter() - t0, first.global_step
    # Second run: everything built afresh; train() restores the latest checkpoint and goes on.
    second = build(out, args, train_files, eval_files, batch_size)
    t0 = time.perf_counter()
    final = second.train_and_evaluate()
    second_time = time.perf_counter() - t0
    resumed_at = next((s for s, _ in second.history["train"] if s > first_steps), None)

    trained = sum(logs["samples"] for _, logs in second.history["train"])
    busy = sum(logs["step_time"] for _, logs in second.history["train"])
    rates = (trained / max(busy, 1e-9), trained / max(first_time + second_time, 1e-9))
    base = baseline(eval_files)
    plotted = save_plot(second, out / "curves.png")
    print_report(second, final, base, rates, resumed_at, first_steps, plotted, out)
    print(f"total time {time.perf_counter() - started:.1f}s")
    failed = [
        f"{t} AUC {final[f'{t}/auc']:.4f} not above 0.6"
        for t in ("click", "conversion")
        if final[f"{t}/auc"] <= 0.6
    ]
    if failed:  # CI runs the demo and reads its exit status
        print(f"demo check failed: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def print_report(trainer, final, base, rates, resumed_at, first_steps, plotted, out) -> None:
    print("\n=== recis demo report ===")
    print(f"device {trainer.device}, {trainer.global_step} steps")
    print(
        f"{rates[0]:,.0f} samples/s in training steps, {rates[1]:,.0f} samples/s wall clock "
        "(reading, evaluation and checkpoints included)"
    )
    print(f"resumed from the checkpoint of step {first_steps} (next step trained: {resumed_at})")
    print(
        f"{'task':<12}{'AUC':>8}{'baseline':>10}{'logloss':>10}{'baseline':>10}{'calibration':>13}"
    )
    for task in ("click", "conversion"):
        print(
            f"{task:<12}{final[f'{task}/auc']:>8.4f}{base[f'{task}/auc']:>10.4f}"
            f"{final[f'{task}/logloss']:>10.4f}{base[f'{task}/logloss']:>10.4f}"
            f"{final[f'{task}/calibration']:>13.3f}"
        )
    print(f"click GAUC per user {final['click/gauc']:.4f}")
    for table in find_tables(trainer.model).values():
        stats, names = table.stats(), getattr(table, "names", ())
        fused = f" ({len(names)} logical tables fused)" if len(names) > 1 else ""
        print(f"embedding table{fused}: {stats.rows:,} rows, {stats.bytes / 2**20:.1f} MiB")
    print(f"checkpoint {trainer.checkpoints.latest()}")
    if plotted:
        print(f"curves {out / 'curves.png'}")
    else:
        print("curves not drawn: matplotlib is not installed (pip install 'recis-train[demo]')")


if __name__ == "__main__":
    sys.exit(main())
