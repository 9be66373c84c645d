"""Train a click model online, one hourly window at a time, with recis_train.Online.

What it does, in order:

1. writes the first hours of a synthetic click log with a planted signal (``benchmarks/data.py``)
   into ``DIR/landing/hour=HH/``, each hour marked complete by a ``_SUCCESS`` file, the way an
   upstream job lands hourly partitions;
2. watches ``DIR/landing`` with ``recis_train.WatchDirectory``: every marked hour is one window,
   read with ``recis_io.Dataset`` and transformed with a ``recis_features.FeatureEngine``;
3. per window, evaluates the model on the new hour before training on it (prequential AUC),
   trains on it, exports the embedding rows it changed as a delta (``recis_embedding``), and
   checkpoints with the window committed; while it runs, a new hour lands after each window;
4. stops half way as if preempted, then builds everything afresh and resumes: the committed
   hours are skipped, the rest are trained;
5. checks that the first full export plus every delta loads to the live model's tables, and
   prints per-window AUC and delta sizes.

Run ``python examples/online.py --small --out DIR`` for a quick run (CI does this), or without
``--small`` for bigger hours.
"""

from __future__ import annotations

import argparse
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
    Online,
    TrainingArguments,
    WatchDirectory,
    WindowResult,
    seed_everything,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DENSE, SPARSE, at_least, load_data_module, outcome

DIM = 8


class Landing:
    """Writes hour ``h`` of one click stream into ``root/hour=HH/`` and then marks it complete."""

    def __init__(self, root: Path, rows_per_hour: int, hours: int) -> None:
        self.root, self.rows, self.hours = root, rows_per_hour, hours
        self.data = load_data_module()
        self.written = 0

    def land(self) -> None:
        import pyarrow.parquet as pq

        if self.written == self.hours:
            return  # upstream has nothing more
        hour = self.written
        table = self.data.generate_table(self.rows, start=hour * self.rows, signal=True)
        part = self.root / f"hour={hour:02d}"
        part.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, part / "part-00000.parquet", compression="zstd")
        (part / "_SUCCESS").touch()  # the marker goes last: the window is complete
        self.written += 1


def reader(paths: list[str], batch_size: int) -> recis_io.Dataset:
    columns = [recis_io.Column(c, fill=0.0) for c in DENSE] + [*SPARSE, "label"]
    return recis_io.Dataset(paths, batch_size=batch_size, columns=columns, shuffle=False)


class ClickModel(nn.Module):
    """26 categorical embeddings (one fused dynamic table) and 13 dense features into an MLP."""

    def __init__(self) -> None:
        super().__init__()
        features = [rf.Feature(c).select(c).log1p() for c in DENSE]
        features += [rf.Feature(c).select(c) for c in SPARSE]
        self.features = rf.FeatureEngine(features)
        self.embeddings = emb.EmbeddingEngine({c: emb.EmbeddingOption(DIM) for c in SPARSE})
        self.dense_norm = nn.BatchNorm1d(len(DENSE))
        self.mlp = nn.Sequential(
            nn.Linear(len(SPARSE) * DIM + len(DENSE), 64), nn.ReLU(), nn.Linear(64, 1)
        )

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        values = self.embeddings(self.features(batch))
        dense = self.dense_norm(torch.stack([values[c].float() for c in DENSE], dim=1))
        x = torch.cat([*(values[c] for c in SPARSE), dense], dim=1)
        logits = self.mlp(x)[:, 0]
        labels = batch["label"].float()
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
        return {"loss": loss, "predictions": torch.sigmoid(logits), "labels": labels}


def build(out: Path, landing: Landing, batch_size: int, max_windows: int | None) -> Online:
    """Model, optimizers and the online loop, built the same way by the first and resumed run."""
    seed_everything(0)
    model = ClickModel()
    args = TrainingArguments(output_dir=str(out / "run"), device="cpu", max_to_keep=2)

    def next_hour(result: WindowResult) -> None:
        print_window(result)
        landing.land()  # upstream lands another hour while training goes on

    return Online(
        model,
        args,
        WatchDirectory(landing.root, marker="_SUCCESS", poll_interval=0.05, idle_timeout=0.5),
        lambda paths: reader(paths, batch_size),
        dense_optimizer=torch.optim.Adam(model.parameters(), lr=2e-3),
        sparse_optimizer=emb.SparseAdam(model, lr=1e-2),
        max_windows=max_windows,
        on_window=next_hour,
    )


def print_window(result: WindowResult) -> None:
    auc = result.metrics.get("auc")
    shown = f"{auc:.4f}" if auc is not None else "  -   "
    print(
        f"window {result.index:>2}  {Path(result.files[0]).parent.name}  AUC before training "
        f"{shown}  loss {result.train['loss']:.4f}  {result.export_kind:<5} export "
        f"{result.export_rows:>7,} rows {result.export_bytes / 2**20:>6.2f} MiB"
    )


def table_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, (table, index) in model.embeddings.logical.items():
        ids = torch.sort(table.ids(index)).values
        state[f"{name}.ids"] = ids
        state[f"{name}.embeddings"] = table.embeddings(ids, index)
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small hours (CI)")
    parser.add_argument("--out", default="online-output", help="where data and exports go")
    parser.add_argument(
        "--hours",
        type=at_least(2),
        default=None,
        help="hourly windows to train (at least 2: the run stops after half, then resumes)",
    )
    opts = parser.parse_args(argv)
    out = Path(opts.out)
    hours = opts.hours or (6 if opts.small else 12)
    rows = 4_000 if opts.small else 200_000
    batch_size = 1024 if opts.small else 4096
    started = time.perf_counter()
    # A fresh run every time: an earlier invocation's landing and checkpoints would be resumed.
    shutil.rmtree(out / "landing", ignore_errors=True)
    shutil.rmtree(out / "run", ignore_errors=True)
    landing = Landing(out / "landing", rows, hours)
    landing.land()
    landing.land()
    print(f"{hours} hourly windows of {rows:,} rows land in {landing.root}")

    half = hours // 2
    build(out, landing, batch_size, max_windows=half).run()
    print(f"-- stopped after {half} windows, as if preempted; resuming with all built afresh --")
    online = build(out, landing, batch_size, max_windows=None)
    results = online.run()

    live = table_state(online.trainer.model)
    fresh = ClickModel()
    # The first full export plus every delta after it; the optimizer takes the rows' Adam state.
    emb.load(results[-1].export, fresh, emb.SparseAdam(fresh, lr=1e-2))
    chain_ok = all(torch.equal(live[k], v) for k, v in table_state(fresh).items())
    aucs = [r.metrics["auc"] for r in results if "auc" in r.metrics]
    deltas = [r.export_rows for r in results if r.export_kind == "delta"]
    rows_now = sum(len(v) for k, v in live.items() if k.endswith(".ids"))
    print(f"\n{len(results)} windows, {online.trainer.global_step} steps")
    print(f"prequential AUC: first evaluated window {aucs[0]:.4f}, last {aucs[-1]:.4f}")
    print(
        f"the tables hold {rows_now:,} rows; each delta holds only the rows its hour changed "
        f"({min(deltas):,}-{max(deltas):,})"
    )
    print(f"full export + deltas load to the live tables: {'yes' if chain_ok else 'NO'}")
    print(f"total time {time.perf_counter() - started:.1f}s")
    return outcome(
        {
            "the export chain loads to the live tables": chain_ok,
            f"{len(results)} windows trained of {hours}": len(results) == hours,
            f"last window's AUC {aucs[-1]:.4f} above 0.6": aucs[-1] > 0.6,
        }
    )


if __name__ == "__main__":
    sys.exit(main())
