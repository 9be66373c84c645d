"""Training on a CUDA device: recis-embedding tables on the GPU under the trainer, resume from
a checkpoint written there, bf16 autocast, and agreement with the same training on the CPU."""

from __future__ import annotations

import math

import pytest
import torch
from _toy import NUM_IDS, TableModel, ToyReader

import recis_embedding as emb
from recis_train import Trainer, TrainingArguments, seed_everything

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def build(out, device: str = "cuda", **args) -> Trainer:
    seed_everything(0)
    model = TableModel(option=emb.EmbeddingOption(4, device=device))
    settings = {"output_dir": str(out), "device": device, "epochs": 2, "save_every": 6}
    return Trainer(
        model,
        TrainingArguments(**(settings | args)),
        train_data=ToyReader(500, 25),
        eval_data=ToyReader(400, 100, seed=1),
        dense_optimizer=torch.optim.Adam(model.mlp.parameters(), lr=0.02),
        sparse_optimizer=emb.SparseAdam(model, lr=0.02),
    )


def table_state(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    table = emb.sparse_parameters(trainer.model)[0]
    ids = torch.sort(table.ids()).values
    return ids.cpu(), table.embeddings(ids).cpu()


def dense_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    with emb.tables_saved_separately():
        return {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}


def assert_same_state(actual: Trainer, expected: Trainer, *, rtol: float, atol: float) -> None:
    """The same ids in the table, and rows and dense tensors equal to the tolerances."""
    ids_a, rows_a = table_state(actual)
    ids_e, rows_e = table_state(expected)
    assert torch.equal(ids_a, ids_e)
    torch.testing.assert_close(rows_a, rows_e, rtol=rtol, atol=atol)
    dense = dense_state(actual)
    for key, value in dense_state(expected).items():
        torch.testing.assert_close(dense[key], value, rtol=rtol, atol=atol)


def test_trains_on_the_gpu_with_tables_there(tmp_path) -> None:
    trainer = build(tmp_path, epochs=3)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert trainer.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in trainer.model.mlp.parameters())
    table = emb.sparse_parameters(trainer.model)[0]
    assert table.device.type == "cuda"
    ids, rows = table_state(trainer)
    assert ids.tolist() == list(range(NUM_IDS))
    assert bool(torch.isfinite(rows).all())
    assert after["auc"] > 0.8 > before["auc"] - 0.05
    assert after["loss"] < before["loss"]


def test_gpu_training_matches_the_cpu_to_rounding(tmp_path) -> None:
    gpu, cpu = build(tmp_path / "gpu"), build(tmp_path / "cpu", device="cpu")
    gpu.train()
    cpu.train()
    assert gpu.global_step == cpu.global_step == 40
    # 40 Adam steps from the same start: float32 kernels of the two devices round differently.
    assert_same_state(gpu, cpu, rtol=1e-3, atol=1e-4)
    assert gpu.evaluate()["auc"] == pytest.approx(cpu.evaluate()["auc"], abs=0.01)


def test_resume_on_the_gpu_continues_the_run(tmp_path) -> None:
    whole = build(tmp_path / "whole")
    whole.train()
    cut = build(tmp_path / "cut", train_steps=18)
    cut.train()
    assert cut.global_step == 18
    resumed = build(tmp_path / "cut")
    resumed.train()
    assert resumed.global_step == whole.global_step == 40
    # Same kernels, same order of work: equal up to the order of atomic additions at most.
    assert_same_state(resumed, whole, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_trains_on_the_gpu(tmp_path) -> None:
    trainer = build(tmp_path, epochs=3, mixed_precision="bf16")
    logs = trainer.train()
    assert math.isfinite(logs["loss"])
    assert trainer.evaluate()["auc"] > 0.75
    # Tables keep float32 rows under autocast.
    _, rows = table_state(trainer)
    assert rows.dtype == torch.float32
