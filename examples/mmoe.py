"""Train an MMoE multi-task model: click and conversion from shared experts with one gate per task.

The conversion task predicts conversion given a click (CVR): it is trained and evaluated on
clicked rows only, with ``Task(mask="label")``, while the click task sees every row.

Multi-gate Mixture-of-Experts (Ma et al., 2018): the embeddings of the 26 categorical ids, the
mean-pooled behaviour sequence (read through the item table) and the dense features feed four
expert MLPs; per task a softmax gate mixes the experts' outputs, and a task tower reads the mix.
``recis_train.MultiTask`` puts a logit head on each tower (the body returns one representation
per task), sums the weighted task losses and reports each task's metrics.

The report gives AUC and log loss per task on the held-out file, against the constant
prediction, and how each task's gate spreads over the experts.

Run ``python examples/mmoe.py --small --out DIR`` (CI) or without ``--small`` for a million
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

DIM = 8
TASKS = ("click", "conversion")


class MMoE(nn.Module):
    """Shared experts, one gate and one tower per task; returns ``{task: (B, 32)}``."""

    def __init__(self, device: torch.device, experts: int = 4) -> None:
        super().__init__()
        self.features = feature_engine()
        options = {c: emb.EmbeddingOption(DIM, combiner="sum", device=device) for c in SPARSE}
        options["seq"] = emb.EmbeddingOption(DIM, shared_name="C2", combiner="mean", device=device)
        self.embeddings = emb.EmbeddingEngine(options, concat={"fields": [*SPARSE, "seq"]})
        self.dense_norm = nn.BatchNorm1d(len(DENSE))
        width = (len(SPARSE) + 1) * DIM + len(DENSE)
        self.experts = nn.ModuleList(mlp([width, 64, 32]) for _ in range(experts))
        self.gates = nn.ModuleDict({t: nn.Linear(width, experts) for t in TASKS})
        self.towers = nn.ModuleDict({t: mlp([32, 32]) for t in TASKS})
        self.out_dim = 32
        self.gate_sums = {t: torch.zeros(experts) for t in TASKS}

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        values = self.embeddings(self.features(batch))
        x = torch.cat([values["fields"], self.dense_norm(dense_matrix(values))], dim=1)
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # (B, E, 32)
        out = {}
        for task in TASKS:
            gate = torch.softmax(self.gates[task](x), dim=1)  # (B, E)
            if not self.training:
                self.gate_sums[task] += gate.detach().sum(0).cpu()
            out[task] = self.towers[task]((gate.unsqueeze(2) * experts).sum(1))
        return out


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(__doc__.splitlines()[0], argv)
    started = time.perf_counter()
    train_files, eval_files = write_data(opts.out / "data", opts.train_rows, opts.eval_rows)
    shutil.rmtree(opts.out / "run", ignore_errors=True)
    args = training_arguments(opts, opts.out / "run")
    seed_everything(args.seed)
    body = MMoE(torch.device(opts.device))
    model = MultiTask(
        body,
        [
            Task("click", nn.Linear(body.out_dim, 1), label="label"),
            # conversion given a click: only clicked rows count for this task
            Task("conversion", nn.Linear(body.out_dim, 1), label="conversion", mask="label"),
        ],
    )
    trainer = Trainer(
        model,
        args,
        train_data=reader(train_files, opts.batch_size, shuffle=True),
        eval_data=lambda: reader(eval_files, 8192, shuffle=False),
        dense_optimizer=torch.optim.Adam(model.parameters(), lr=2e-3),
        sparse_optimizer=emb.SparseAdam(model, lr=5e-3),
        hooks=[LoggingHook()],
    )
    trainer.train()
    for sums in body.gate_sums.values():
        sums.zero_()  # count the gates of the final evaluation only
    final = trainer.evaluate()
    results = dict(final)
    results["click/constant-prediction logloss"] = constant_logloss(eval_files, "label")
    results["conversion/constant-prediction logloss"] = constant_logloss(
        eval_files, "conversion", where="label"
    )
    print_results(
        f"MMoE click and conversion model, {trainer.global_step} steps on {trainer.device}",
        results,
        [
            f"{task}/{key}"
            for task in TASKS
            for key in ("auc", "logloss", "constant-prediction logloss")
        ],
    )
    for task, sums in body.gate_sums.items():
        share = " ".join(f"{v:.2f}" for v in (sums / sums.sum()).tolist())
        print(f"{task} gate, mean weight per expert: {share}")
    print(f"total time {time.perf_counter() - started:.1f}s")
    return outcome(
        {
            f"held-out {t} AUC {final[f'{t}/auc']:.4f} above 0.6": final[f"{t}/auc"] > 0.6
            for t in TASKS
        }
    )


if __name__ == "__main__":
    sys.exit(main())
