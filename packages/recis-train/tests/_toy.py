"""A small deterministic reader and model shared by the trainer tests and the resume script."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import recis_embedding as emb

NUM_IDS = 50
NUM_DENSE = 6


def make_rows(num_rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A table with a planted signal: clicks depend on the dense features and the id."""
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(num_rows, NUM_DENSE, generator=gen)
    ids = torch.randint(0, NUM_IDS, (num_rows,), generator=gen)
    id_effect = torch.linspace(-2, 2, NUM_IDS)[ids]
    logit = dense[:, 0] * 1.5 - dense[:, 1] + id_effect
    click = (torch.rand(num_rows, generator=gen) < torch.sigmoid(logit)).to(torch.float32)
    conv = click * (torch.rand(num_rows, generator=gen) < torch.sigmoid(dense[:, 2])).float()
    return {"dense": dense, "ids": ids, "click": click, "conv": conv, "row": torch.arange(num_rows)}


class ToyReader:
    """A resumable reader: ``state_dict()`` is the index of the next row, like recis-io's cursor."""

    def __init__(self, num_rows: int, batch_size: int, seed: int = 0) -> None:
        self.rows = make_rows(num_rows, seed)
        self.num_rows, self.batch_size = num_rows, batch_size
        self.position = 0
        self.loads: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return -(-self.num_rows // self.batch_size)

    def __iter__(self):
        while self.position < self.num_rows:
            end = min(self.position + self.batch_size, self.num_rows)
            batch = {k: v[self.position : end] for k, v in self.rows.items()}
            self.position = end
            yield batch
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loads.append(dict(state))
        self.position = int(state["position"])


class ToyModel(nn.Module):
    """Embedding (sparse gradients) + MLP, one or two tasks; counts the rows it trains on."""

    def __init__(self, num_rows: int = 0, *, tasks: tuple[str, ...] = ("click",), dropout=0.1):
        super().__init__()
        self.tasks = tasks
        self.embedding = nn.Embedding(NUM_IDS, 4, sparse=True)
        self.mlp = nn.Sequential(
            nn.Linear(NUM_DENSE + 4, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, len(tasks))
        )
        self.register_buffer("seen", torch.zeros(num_rows, dtype=torch.int64))

    def dense_parameters(self):
        return list(self.mlp.parameters())

    def forward(self, batch):
        if self.training and self.seen.numel():
            self.seen[batch["row"]] += 1
        x = torch.cat([batch["dense"], self.embedding(batch["ids"])], dim=1)
        logits = self.mlp(x)
        losses, preds, labels = {}, {}, {}
        for i, task in enumerate(self.tasks):
            target = batch[task].to(logits.dtype)
            losses[task] = nn.functional.binary_cross_entropy_with_logits(logits[:, i], target)
            preds[task] = torch.sigmoid(logits[:, i])
            labels[task] = batch[task]
        if len(self.tasks) == 1:
            task = self.tasks[0]
            return {"loss": losses[task], "predictions": preds[task], "labels": labels[task]}
        return {"losses": losses, "weights": {"conv": 0.5}, "predictions": preds, "labels": labels}


def make_optimizers(model: ToyModel, lr: float = 0.05):
    dense = torch.optim.Adam(model.dense_parameters(), lr=lr)
    sparse = torch.optim.SparseAdam(list(model.embedding.parameters()), lr=lr)
    return dense, sparse


class TableModel(nn.Module):
    """A recis-embedding table of the ``ids`` column (``option``, dimension 4 by default;
    sharded over the process group with ``shard``) under an MLP with the dense features:
    checkpoints of it have a sparse part. ``forward`` returns the loss, predictions and labels,
    or the loss alone with ``loss_only`` (nothing for metrics)."""

    def __init__(
        self,
        *,
        shard: bool = False,
        option: emb.EmbeddingOption | None = None,
        loss_only: bool = False,
    ) -> None:
        super().__init__()
        option = option or emb.EmbeddingOption(4)
        self.embeddings = emb.EmbeddingEngine({"ids": option}, shard=shard)
        self.mlp = nn.Sequential(nn.Linear(NUM_DENSE + 4, 8), nn.ReLU(), nn.Linear(8, 1))
        self.loss_only = loss_only

    def forward(self, batch):
        out = self.embeddings({"ids": batch["ids"].reshape(-1, 1)})
        logits = self.mlp(torch.cat([batch["dense"], out["ids"]], dim=1))[:, 0]
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch["click"])
        if self.loss_only:
            return loss
        return {"loss": loss, "predictions": torch.sigmoid(logits), "labels": batch["click"]}


def table_trainer(out: Any, hooks: Any = (), **args: Any) -> Any:
    """A seeded CPU trainer of a :class:`TableModel` over ``ToyReader(500, 25)`` (2 epochs,
    20 steps each; a checkpoint every 6 steps) writing to ``out``; ``args`` override its
    ``TrainingArguments``."""
    from recis_train import Trainer, TrainingArguments, seed_everything

    seed_everything(0)
    model = TableModel()
    settings = {"output_dir": str(out), "device": "cpu", "epochs": 2, "save_every": 6}
    return Trainer(
        model,
        TrainingArguments(**(settings | args)),
        train_data=ToyReader(500, 25),
        dense_optimizer=torch.optim.Adam(model.mlp.parameters(), lr=0.02),
        sparse_optimizer=emb.SparseAdam(model, lr=0.02),
        hooks=hooks,
    )


def table_rows(trainer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids of the trainer's table, sorted, and their embeddings."""
    table = emb.sparse_parameters(trainer.model)[0]
    ids = torch.sort(table.ids()).values
    return ids, table.embeddings(ids)
