"""MultiStage on 2 CPU ranks (gloo) against the same stages in one process.

Rank ``r`` trains on batches of ``B`` rows and one process on batches of ``2 * B`` rows (rank 0's
batch then rank 1's), as in ``test_distributed.py``: every stage's steps, evaluation and final
weights match up to float summation order. A second run skips the finished stages on every
rank and leaves the model as the last stage ended.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _spawn import spawn_ranks
from test_distributed import WORLD, B, ShardedModel, batches, join_gloo, merged

import recis_embedding as emb
from recis_train import MultiStage, Stage, TrainingArguments, seed_everything

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

PRETRAIN, FINETUNE, EVAL = 4, 3, 2  # batches per rank


def stages(train_a, train_b, evals) -> list[Stage]:
    return [
        Stage(
            "pretrain",
            train_a,
            lambda ps: torch.optim.SGD(ps, lr=0.5),
            sparse_optimizer=lambda m: emb.SparseSGD(m, lr=0.5),
        ),
        Stage(
            "finetune",
            train_b,
            lambda ps: torch.optim.SGD(ps, lr=0.2),
            eval_data=evals,
            frozen=["mlp.0"],
            sparse_optimizer=lambda m: emb.SparseSGD(m, lr=0.2),
        ),
    ]


def run(out: Path, shard: bool, train_a, train_b, evals) -> tuple[dict, ShardedModel]:
    seed_everything(0)
    model = ShardedModel(shard)
    args = TrainingArguments(output_dir=str(out), device="cpu", log_every=1)
    results = MultiStage(model, args, stages(train_a, train_b, evals)).run()
    return results, model


def state(model: ShardedModel) -> dict:
    table = emb.sparse_parameters(model)[0]
    ids = torch.sort(table.ids()).values
    dense = {k: v.clone() for k, v in model.mlp.state_dict().items()}
    return {"ids": ids, "rows": table.embeddings(ids), "dense": dense}


def _worker(rank: int, root: str) -> None:
    join_gloo(root, rank)
    out = Path(root)
    data = (
        batches(rank, PRETRAIN, B, seed=0),
        batches(rank, FINETUNE, B, seed=2),
        batches(rank, EVAL, B, seed=1),
    )
    result: dict = {}
    try:
        result["results"], model = run(out / "run", True, *data)
        result["state"] = state(model)
        result["again"], again = run(out / "run", True, *data)
        result["again_state"] = state(again)
    finally:
        torch.save(result, out / f"rank-{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    root = spawn_ranks(_worker, lambda: tmp_path_factory.mktemp("multistage-ranks"), WORLD)
    return [torch.load(root / f"rank-{r}.pt", weights_only=False) for r in range(WORLD)]


def test_two_ranks_run_the_stages_like_one_process(ranks, tmp_path):
    single = [
        merged([batches(r, n, B, seed=s) for r in range(WORLD)])
        for n, s in ((PRETRAIN, 0), (FINETUNE, 2))
    ]
    evals = [b for r in range(WORLD) for b in batches(r, EVAL, B, seed=1)]
    expected, model = run(tmp_path, False, *single, evals)
    want = state(model)
    assert expected["pretrain"] == {}
    for result in ranks:
        assert result["results"].keys() == expected.keys()
        for key, value in expected["finetune"].items():
            assert result["results"]["finetune"][key] == pytest.approx(value, rel=1e-5), key
        for key, value in want["dense"].items():
            torch.testing.assert_close(result["state"]["dense"][key], value, rtol=1e-5, atol=1e-6)
    ids = torch.cat([r["state"]["ids"] for r in ranks])
    rows = torch.cat([r["state"]["rows"] for r in ranks])
    order = torch.argsort(ids)
    assert torch.equal(ids[order], want["ids"])
    torch.testing.assert_close(rows[order], want["rows"], rtol=1e-5, atol=1e-6)


def test_a_second_run_skips_finished_stages_on_every_rank(ranks):
    for result in ranks:
        assert result["again"] == result["results"]
        for key, value in result["state"]["dense"].items():
            assert torch.equal(result["again_state"]["dense"][key], value), key
        assert torch.equal(result["again_state"]["ids"], result["state"]["ids"])
        assert torch.equal(result["again_state"]["rows"], result["state"]["rows"])
