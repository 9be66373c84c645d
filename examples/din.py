"""Train a DIN-style click model: target attention of the candidate item over the behaviour sequence.

Deep Interest Network (Zhou et al., 2018): the candidate item's embedding (``C2``) attends over
the embeddings of the items in the user's behaviour sequence (``seq``, its 50 most recent ids,
looked up in the same item table as a padded ``(B, L, D)`` sequence with
``EmbeddingOption(combiner=None)``). An activation unit scores each behaviour from
``[candidate, behaviour, candidate − behaviour, candidate ⊙ behaviour]``; the masked softmax of
the scores weights the behaviours into one interest vector, which joins the other embeddings and
the dense features in the click MLP.

The click log plants the pattern this finds: a row whose item appears in its own history clicks
more often. The report gives AUC and GAUC per user on the held-out file, and how much attention
a behaviour equal to the candidate item gets compared with the other behaviours.

Run ``python examples/din.py --small --out DIR`` (CI) or without ``--small`` for a million
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
from recis_train import LoggingHook, MultiTask, Task, Trainer, seed_everything
from recis_train.metrics import AUROC, GAUC, LogLoss

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


class TargetAttention(nn.Module):
    """Weights the behaviours ``(B, L, D)`` by their relevance to the candidate ``(B, D)``."""

    def __init__(self, dim: int, hidden: int = 32) -> None:
        super().__init__()
        self.unit = mlp([4 * dim, hidden, 1], last_activation=False)

    def forward(
        self, candidate: torch.Tensor, behaviours: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the interest vector ``(B, D)`` and the attention weights ``(B, L)``."""
        query = candidate.unsqueeze(1).expand_as(behaviours)
        pairs = torch.cat([query, behaviours, query - behaviours, query * behaviours], dim=-1)
        scores = self.unit(pairs).squeeze(-1).masked_fill(~mask, float("-inf"))
        # A row without history has every score at -inf: its weights become 0, not NaN.
        weights = torch.softmax(scores, dim=1).nan_to_num(0.0)
        return torch.bmm(weights.unsqueeze(1), behaviours).squeeze(1), weights


class DIN(nn.Module):
    """Embeddings + target attention + MLP; returns the ``(B, 64)`` click representation."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.features = feature_engine()
        options = {c: emb.EmbeddingOption(DIM, combiner="sum", device=device) for c in SPARSE}
        # The sequence reads the item table: its ids are items, like the candidate C2.
        options["seq"] = emb.EmbeddingOption(DIM, shared_name="C2", combiner=None, device=device)
        self.embeddings = emb.EmbeddingEngine(options)
        self.attention = TargetAttention(DIM)
        self.dense_norm = nn.BatchNorm1d(len(DENSE))
        self.mlp = mlp([(len(SPARSE) + 1) * DIM + len(DENSE), 128, 64])
        self.out_dim = 64
        self.last: dict[str, torch.Tensor] = {}

    def forward(self, batch: Any) -> torch.Tensor:
        ids = self.features(batch)
        values = self.embeddings(ids)
        behaviours, mask = values["seq"], values["seq_mask"]  # (B, L, D), (B, L)
        interest, weights = self.attention(values["C2"], behaviours, mask)
        if not self.training:  # kept for the report: which behaviours got the attention
            history = ids["seq"].to_dense(0, max_len=behaviours.shape[1])
            self.last = {"weights": weights, "mask": mask, "same": history == ids["C2"][:, None]}
        fields = [values[c] for c in SPARSE]
        dense = self.dense_norm(dense_matrix(values))
        return self.mlp(torch.cat([*fields, interest, dense], dim=1))


def attention_on_candidate(model: MultiTask, batches: Any) -> float:
    """Mean attention weight of behaviours equal to the candidate item over that of the others."""
    body: Any = model.body
    same = other = n_same = n_other = 0.0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            model(batch)
            w, mask, hit = body.last["weights"], body.last["mask"], body.last["same"]
            same += float(w[hit & mask].sum())
            n_same += float((hit & mask).sum())
            other += float(w[~hit & mask].sum())
            n_other += float((~hit & mask).sum())
    return (same / max(n_same, 1.0)) / max(other / max(n_other, 1.0), 1e-12)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(__doc__.splitlines()[0], argv)
    started = time.perf_counter()
    train_files, eval_files = write_data(opts.out / "data", opts.train_rows, opts.eval_rows)
    shutil.rmtree(opts.out / "run", ignore_errors=True)
    args = training_arguments(opts, opts.out / "run")
    seed_everything(args.seed)
    body = DIN(torch.device(opts.device))
    metrics = {"auc": AUROC, "gauc": GAUC, "logloss": LogLoss}
    head = nn.Linear(body.out_dim, 1)
    model = MultiTask(
        body, [Task("click", head, label="label", metrics=metrics)], group_column="C1"
    )
    trainer = Trainer(
        model,
        args,
        train_data=reader(train_files, opts.batch_size, shuffle=True, labels=("label",)),
        eval_data=lambda: reader(eval_files, 4096, shuffle=False, labels=("label",)),
        dense_optimizer=torch.optim.Adam(model.parameters(), lr=5e-3),
        sparse_optimizer=emb.SparseAdam(model, lr=5e-3),
        hooks=[LoggingHook()],
    )
    final = trainer.train_and_evaluate()
    results = dict(final)
    results["constant-prediction logloss"] = constant_logloss(eval_files, "label")
    eval_batches = reader(eval_files, 4096, shuffle=False, labels=("label",))
    results["attention on the candidate / others"] = attention_on_candidate(model, eval_batches)
    print_results(
        f"DIN click model, {trainer.global_step} steps on {trainer.device}",
        results,
        [
            "click/auc",
            "click/gauc",
            "click/logloss",
            "constant-prediction logloss",
            "attention on the candidate / others",
        ],
    )
    print(f"total time {time.perf_counter() - started:.1f}s")
    learned = results["attention on the candidate / others"] > 1.2
    return outcome(
        {
            f"held-out click AUC {final['click/auc']:.4f} above 0.6": final["click/auc"] > 0.6,
            "attention on the candidate above 1.2x the others": learned,
        }
    )


if __name__ == "__main__":
    sys.exit(main())
