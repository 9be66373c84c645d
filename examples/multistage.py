"""Multi-stage training with recis: pretrain on clicks, then finetune conversion with frozen embeddings.

``recis_train.MultiStage`` runs the stages one after another on one model, each a full
``Trainer`` run with its own data, optimizers, frozen modules, evaluation and checkpoints
(``<out>/run/<stage>/``). This script starts over on every run (it clears ``<out>/run``); a
``MultiStage`` whose stages resume (``resume=True``, the default) skips finished stages when run
again and resumes the interrupted one (see the multi-stage guide).

1. ``pretrain``: the embeddings, the shared bottom MLP and the click tower learn the click
   (the reader gives only the ``label`` column, so only the click loss is computed);
2. ``finetune``: the conversion tower and the bottom MLP learn the conversion; the embedding
   tables get no sparse optimizer (frozen) and the click tower is frozen;
3. each stage ends with an evaluation of both tasks on the held-out file.

The report shows both tasks' AUC after each stage: conversion improves in the second stage,
while the click keeps most of what it learned.

Run ``python examples/multistage.py --small --out DIR`` (CI) or without ``--small`` for a
million training rows.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import recis_embedding as emb
from recis_train import Hook, LoggingHook, MultiStage, Stage, Trainer, seed_everything

from _common import (
    DENSE,
    LABELS,
    SPARSE,
    dense_matrix,
    feature_engine,
    mlp,
    outcome,
    parse_args,
    reader,
    training_arguments,
    write_data,
)

DIM = 8
TASKS = {"click": "label", "conversion": "conversion"}


class ClickConversion(nn.Module):
    """Embeddings and a bottom MLP shared by a click and a conversion tower.

    A batch trains the tasks whose label column it carries, so each stage picks its tasks by
    the columns its reader returns.
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.features = feature_engine()
        options = {c: emb.EmbeddingOption(DIM, combiner="sum", device=device) for c in SPARSE}
        options["seq"] = emb.EmbeddingOption(DIM, shared_name="C2", combiner="mean", device=device)
        self.embeddings = emb.EmbeddingEngine(options, concat={"fields": [*SPARSE, "seq"]})
        # LayerNorm, not BatchNorm: a frozen bottom must not move its statistics either.
        self.bottom = nn.Sequential(
            nn.LayerNorm((len(SPARSE) + 1) * DIM + len(DENSE)),
            mlp([(len(SPARSE) + 1) * DIM + len(DENSE), 128, 64]),
        )
        self.towers = nn.ModuleDict(
            {t: nn.Sequential(mlp([64, 32]), nn.Linear(32, 1)) for t in TASKS}
        )
        self.train_tables = True

    def forward(self, batch: Any) -> dict[str, Any]:
        # Frozen tables: lookups record nothing for a sparse optimizer to apply (or release).
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_tables):
            values = self.embeddings(self.features(batch))
        x = torch.cat([values["fields"], dense_matrix(values)], dim=1)
        shared = self.bottom(x)
        losses, predictions, labels = {}, {}, {}
        for task, column in TASKS.items():
            if column not in batch:
                continue
            logits = self.towers[task](shared)[:, 0]
            target = batch[column]
            losses[task] = nn.functional.binary_cross_entropy_with_logits(logits, target.float())
            predictions[task] = torch.sigmoid(logits.detach())
            labels[task] = target
        return {"losses": losses, "predictions": predictions, "labels": labels}


class TablesFollowOptimizer(Hook):
    """Tables train in a stage exactly when the stage has a sparse optimizer."""

    def on_train_begin(self, trainer: Trainer) -> None:
        trainer.model.train_tables = trainer.sparse_optimizer is not None  # type: ignore[assignment]


def stages(opts: Any, train_files: list[Path], eval_files: list[Path]) -> list[Stage]:
    steps = math.ceil(opts.train_rows / opts.batch_size)

    def held_out() -> Any:
        return reader(eval_files, 8192, shuffle=False, labels=LABELS)

    return [
        Stage(
            "pretrain",
            reader(train_files, opts.batch_size, shuffle=True, labels=("label",)),
            lambda params: torch.optim.Adam(params, lr=2e-3),
            eval_data=held_out,
            frozen=["towers.conversion"],
            sparse_optimizer=lambda model: emb.SparseAdam(model, lr=5e-3),
            args={"train_steps": steps},
        ),
        Stage(
            "finetune",
            reader(train_files, opts.batch_size, shuffle=True, labels=("conversion",), epochs=2),
            lambda params: torch.optim.Adam(params, lr=2e-3),
            eval_data=held_out,
            frozen=["towers.click"],
            sparse_optimizer=None,
            args={"train_steps": 2 * steps},
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(__doc__.splitlines()[0], argv)
    started = time.perf_counter()
    train_files, eval_files = write_data(opts.out / "data", opts.train_rows, opts.eval_rows)
    shutil.rmtree(opts.out / "run", ignore_errors=True)
    args = training_arguments(opts, opts.out / "run", eval_every=0)
    seed_everything(args.seed)
    model = ClickConversion(torch.device(opts.device))
    runner = MultiStage(
        model,
        args,
        stages(opts, train_files, eval_files),
        hooks=[LoggingHook(), TablesFollowOptimizer()],
    )
    results = runner.run()
    print("\n=== multi-stage report (held-out AUC after each stage) ===")
    print(f"{'stage':<10}{'click':>9}{'conversion':>12}")
    for stage, found in results.items():
        print(f"{stage:<10}{found['click/auc']:>9.4f}{found['conversion/auc']:>12.4f}")
    print(f"checkpoints under {opts.out / 'run'}; total time {time.perf_counter() - started:.1f}s")
    before, after = results["pretrain"], results["finetune"]
    improved = after["conversion/auc"] > max(before["conversion/auc"], 0.6)
    return outcome(
        {
            f"pretrain click AUC {before['click/auc']:.4f} above 0.6": before["click/auc"] > 0.6,
            "finetune conversion AUC above pretrain's and 0.6": improved,
        }
    )


if __name__ == "__main__":
    sys.exit(main())
