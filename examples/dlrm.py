"""Train a DLRM-style click model on the Criteo-like click log with recis.

The model (Naumov et al., 2019): a bottom MLP maps the 13 dense features to one vector of the
embedding size; the 26 categorical ids are embedded by recis-embedding dynamic hash tables
(fused into one physical table, no id modulo); every pair of the 27 vectors interacts by a
dot product; a top MLP reads the bottom vector and the 351 dot products and predicts the click.

The model returns the plain single-task contract (``loss``, ``predictions``, ``labels``), so
the trainer reports ``auc``, ``logloss`` and ``calibration`` of the click on the held-out file.

Run ``python examples/dlrm.py --small --out DIR`` (CI) or without ``--small`` for a million
training rows.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import recis_embedding as emb
from recis_train import LoggingHook, Trainer, find_tables, seed_everything

from _common import (
    DENSE,
    SPARSE,
    constant_logloss,
    dense_matrix,
    feature_engine,
    mlp,
    outcome,
    parse_args,
    print_results,
    reader,
    training_arguments,
    write_data,
)

DIM = 16


class DLRM(nn.Module):
    """Bottom MLP, embeddings, pairwise dot interactions, top MLP; one click logit per row."""

    pairs: torch.Tensor  # flat indices of the upper triangle of the 27 x 27 dot products

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.features = feature_engine(seq_len=None)
        self.embeddings = emb.EmbeddingEngine(
            {c: emb.EmbeddingOption(DIM, combiner="sum", device=device) for c in SPARSE},
            concat={"fields": SPARSE},  # the 26 pooled ids as one (B, 26 * DIM) output
        )
        self.bottom = mlp([len(DENSE), 64, DIM])
        vectors = len(SPARSE) + 1
        upper = torch.triu_indices(vectors, vectors, offset=1)
        self.register_buffer("pairs", upper[0] * vectors + upper[1], persistent=False)
        self.top = mlp([DIM + upper.shape[1], 128, 64, 1], last_activation=False)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        values = self.embeddings(self.features(batch))
        bottom = self.bottom(dense_matrix(values))  # (B, D)
        fields = values["fields"].view(-1, len(SPARSE), DIM)
        vectors = torch.cat([bottom.unsqueeze(1), fields], dim=1)  # (B, 27, D)
        dots = torch.bmm(vectors, vectors.transpose(1, 2)).flatten(1)  # (B, 27 * 27)
        logits = self.top(torch.cat([bottom, dots[:, self.pairs]], dim=1))[:, 0]
        labels = batch["label"]
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
        return {"loss": loss, "predictions": torch.sigmoid(logits.detach()), "labels": labels}


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(__doc__.splitlines()[0], argv)
    started = time.perf_counter()
    train_files, eval_files = write_data(opts.out / "data", opts.train_rows, opts.eval_rows)
    shutil.rmtree(opts.out / "run", ignore_errors=True)
    args = training_arguments(opts, opts.out / "run")
    seed_everything(args.seed)
    model = DLRM(torch.device(opts.device))
    trainer = Trainer(
        model,
        args,
        train_data=reader(train_files, opts.batch_size, shuffle=True, sequence=False),
        eval_data=lambda: reader(eval_files, 8192, shuffle=False, sequence=False),
        dense_optimizer=torch.optim.Adam(model.parameters(), lr=2e-3),
        sparse_optimizer=emb.SparseAdam(model, lr=5e-3),
        hooks=[LoggingHook()],
    )
    final = trainer.train_and_evaluate()
    trained = sum(logs["samples"] for _, logs in trainer.history["train"])
    busy = sum(logs["step_time"] for _, logs in trainer.history["train"])
    results = dict(final, **{"constant-prediction logloss": constant_logloss(eval_files, "label")})
    print_results(
        f"DLRM click model, {trainer.global_step} steps on {trainer.device}",
        results,
        ["auc", "logloss", "constant-prediction logloss", "calibration"],
    )
    rows = sum(t.stats().rows for t in find_tables(model).values())
    print(f"{trained / busy:,.0f} samples/s in training steps; {rows:,} embedding rows")
    print(f"total time {time.perf_counter() - started:.1f}s")
    return outcome({f"held-out AUC {final['auc']:.4f} above 0.6": final["auc"] > 0.6})


if __name__ == "__main__":
    sys.exit(main())
