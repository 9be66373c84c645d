"""On 2 CPU ranks (gloo): MultiTask tasks that leave rows out, and Online retried after a failure.

Masked tasks: rank ``r`` trains on batches of ``B`` rows and one process on batches of ``2 * B``
rows (rank 0's rows, then rank 1's), as in ``test_distributed.py``; the ranks keep different
numbers of rows of the masked task (none at all in one batch on rank 0, none of the whole
evaluation on rank 1), and every step, logged loss and evaluation result must be the one
process's over the union of the rows.

Online: a file of one window fails to read on rank 1 only; after the file is fixed, ``run()`` is
called again on both ranks and must end exactly as a 2-rank run that never failed.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _spawn import spawn_ranks
from _toy import NUM_DENSE, make_rows
from test_distributed import WORLD, B, join_gloo, merged
from test_online_distributed import build as build_online
from test_online_distributed import reader, roots_with_hours, summary
from torch import nn

import recis_embedding as emb
from recis_train import LoggingHook, MultiTask, Task, Trainer, TrainingArguments, seed_everything
from recis_train.metrics import AUROC, GAUC, LogLoss

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

#: rows of the masked task kept per training batch, per rank: rank 0 keeps none in batch 2
KEPT_TRAIN = ((1, 0, 5), (6, 3, 2))
#: per evaluation batch: rank 1 keeps no row of the whole evaluation
KEPT_EVAL = ((5, 3), (0, 0))
GROUPS = 3


class Body(nn.Module):
    def __init__(self, shard: bool) -> None:
        super().__init__()
        option = emb.EmbeddingOption(4, initializer=emb.Normal(std=0.3))
        self.embeddings = emb.EmbeddingEngine({"ids": option}, shard=shard)
        self.mlp = nn.Sequential(nn.Linear(NUM_DENSE + 4, 8), nn.ReLU())

    def forward(self, batch):
        out = self.embeddings({"ids": batch["ids"].reshape(-1, 1)})
        return self.mlp(torch.cat([batch["dense"], out["ids"]], dim=1))


def masked_model(shard: bool) -> MultiTask:
    metrics = {"auc": AUROC, "gauc": GAUC, "logloss": LogLoss}
    return MultiTask(
        Body(shard),
        [
            Task("click", nn.Linear(8, 1), label="click", metrics=metrics),
            Task("conv", nn.Linear(8, 1), label="conv", weight=0.5, mask="keep", metrics=metrics),
        ],
        group_column="user",
    )


def masked_batches(rank: int, kept: tuple[tuple[int, ...], ...], seed: int) -> list[dict]:
    """Batch ``k`` of rank ``r`` keeps its first ``kept[r][k]`` rows for the masked task."""
    count = len(kept[0])
    rows = make_rows(WORLD * count * B, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    rows["conv"] = torch.randint(0, 2, (WORLD * count * B,), generator=gen).float()
    rows["user"] = rows["ids"] % GROUPS
    out = []
    for k in range(count):
        start = (k * WORLD + rank) * B
        batch = {name: value[start : start + B] for name, value in rows.items()}
        batch["keep"] = torch.arange(B) < kept[rank][k]
        out.append(batch)
    return out


def build_masked(out: Path, train_data, eval_data, *, shard: bool, **args) -> Trainer:
    seed_everything(0)
    model = masked_model(shard)
    dense = [p for name, p in model.named_parameters() if "embeddings" not in name]
    settings = {"output_dir": str(out), "device": "cpu", "log_every": 1}
    return Trainer(
        model,
        TrainingArguments(**(settings | args)),
        train_data=train_data,
        eval_data=eval_data,
        # Plain SGD: a gradient off by any factor changes the parameters.
        dense_optimizer=torch.optim.SGD(dense, lr=0.5),
        sparse_optimizer=emb.SparseSGD(model, lr=0.5),
        hooks=[LoggingHook(stream=io.StringIO())],
    )


def masked_snapshot(trainer: Trainer) -> dict:
    table = emb.sparse_parameters(trainer.model)[0]
    ids = torch.sort(table.ids()).values
    dense = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    return {
        "logs": [
            {k: v for k, v in logs.items() if k.startswith("loss") or k == "samples"}
            for _, logs in trainer.history["train"]
        ],
        "dense": dense,
        "ids": ids,
        "rows": table.embeddings(ids),
    }


def online_state(online) -> dict:
    trainer = online.trainer
    table, index = trainer.model.embeddings.table("ids")
    ids = torch.sort(table.ids(index)).values
    windows = summary(online.results)
    for window in windows:
        window["export"] = Path(window["export"]).name  # other output directories
    return {
        "windows": windows,
        "step": trainer.global_step,
        "dense": {k: v.clone() for k, v in trainer.model.mlp.state_dict().items()},
        "ids": ids,
        "rows": table.read_full(table.find(ids, index)),
    }


class FlakyFile:
    """``make_data`` whose call ``call`` (from 1) of ``path`` fails while ``broken`` (a corrupt
    file, read on this rank only): at its third batch, or when called (``opening``, a reader
    that opens its files at once); as ``reader`` otherwise."""

    def __init__(self, rank: int, path: str, call: int, opening: bool = False) -> None:
        self.read = reader(rank, WORLD, B)
        self.path, self.call, self.opening = path, call, opening
        self.calls = 0
        self.broken = True

    def __call__(self, paths: list[str]):
        if self.path in paths:
            self.calls += 1
        failing = self.broken and self.path in paths and self.calls == self.call
        if failing and self.opening:
            raise OSError(f"corrupt file {Path(self.path).name}")
        return self._batches(paths, failing)

    def _batches(self, paths: list[str], failing: bool):
        for index, batch in enumerate(self.read(paths)):
            if failing and index == 2:
                raise OSError(f"corrupt file {Path(self.path).name}")
            yield batch


def _retried(
    out: Path, rank: int, files: list[str], window: int, result: dict, key: str, call: int
) -> None:
    """Window ``window`` fails on rank 1, then ``run()`` again on both ranks."""
    make_data = FlakyFile(rank, files[window], call=call, opening=key == "opening")
    if rank == 0:
        make_data.broken = False
    online = build_online(out / key, files, make_data, shard=True)
    try:
        online.run()
    except Exception as err:
        result[f"{key}_error"] = (type(err).__name__, str(err))
    result[f"{key}_initial_kept"] = (out / key / ".online-initial").is_dir()
    make_data.broken = False
    online.run()
    result[key] = online_state(online)
    dist.barrier()
    result[f"{key}_initial_left"] = (out / key / ".online-initial").exists()


def _worker(rank: int, root: str) -> None:
    join_gloo(root, rank)
    out = Path(root)
    result: dict = {}
    try:
        train = masked_batches(rank, KEPT_TRAIN, seed=0)
        evals = masked_batches(rank, KEPT_EVAL, seed=1)
        trainer = build_masked(out / "masked", train, evals, shard=True)
        result["eval"] = trainer.train_and_evaluate()
        result["masked"] = masked_snapshot(trainer)
        accum = build_masked(out / "accum", train, evals, shard=True, gradient_accumulation_steps=2)
        accum.train()
        result["accum"] = masked_snapshot(accum)

        files = sorted(str(p) for p in (out / "data").glob("*.parquet"))[:2]
        clean = build_online(out / "clean", files, reader(rank, WORLD, B), shard=True)
        clean.run()
        result["clean"] = online_state(clean)
        # Window 1 is evaluated (call 1) before it is trained (call 2); window 0 only trained.
        _retried(out, rank, files, 1, result, "committed", call=2)
        _retried(out, rank, files, 0, result, "initial", call=1)
        _retried(out, rank, files, 1, result, "opening", call=1)
    finally:
        torch.save(result, out / f"rank-{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    root = spawn_ranks(_worker, roots_with_hours(tmp_path_factory, "masks-retry"), WORLD)
    return [torch.load(root / f"rank-{r}.pt", weights_only=False) for r in range(WORLD)]


def single_masked(tmp_path: Path, **args) -> Trainer:
    train = merged([masked_batches(r, KEPT_TRAIN, seed=0) for r in range(WORLD)])
    evals = merged([masked_batches(r, KEPT_EVAL, seed=1) for r in range(WORLD)])
    return build_masked(tmp_path, train, evals, shard=False, **args)


def assert_close_state(got: dict, expected: dict) -> None:
    assert len(got["logs"]) == len(expected["logs"])
    for logs, want in zip(got["logs"], expected["logs"], strict=True):
        assert logs.keys() == want.keys()
        for key, value in want.items():
            assert logs[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for key, value in expected["dense"].items():
        torch.testing.assert_close(got["dense"][key], value, rtol=1e-5, atol=1e-6)


def assert_same_tables(got: list[dict], expected: dict) -> None:
    ids = torch.cat([r["ids"] for r in got])
    rows = torch.cat([r["rows"] for r in got])
    order = torch.argsort(ids)
    assert torch.equal(ids[order], expected["ids"])
    torch.testing.assert_close(rows[order], expected["rows"], rtol=1e-5, atol=1e-6)


def test_masked_tasks_train_on_two_ranks_like_one_process_over_the_union(ranks, tmp_path):
    single = single_masked(tmp_path)
    single.train()
    expected = masked_snapshot(single)
    for result in ranks:
        assert_close_state(result["masked"], expected)
    assert_same_tables([r["masked"] for r in ranks], expected)


def test_masked_tasks_accumulate_on_two_ranks_like_one_process(ranks, tmp_path):
    single = single_masked(tmp_path, gradient_accumulation_steps=2)
    single.train()
    expected = masked_snapshot(single)
    assert len(expected["logs"]) == 2
    for result in ranks:
        assert_close_state(result["accum"], expected)
    assert_same_tables([r["accum"] for r in ranks], expected)


def test_masked_evaluation_on_two_ranks_matches_one_process(ranks, tmp_path):
    single = single_masked(tmp_path)
    single.train()
    expected = single.evaluate()
    assert {"loss", "loss/conv", "conv/auc", "conv/gauc", "click/gauc"} <= expected.keys()
    for result in ranks:
        assert result["eval"].keys() == expected.keys()
        for key, value in expected.items():
            assert result["eval"][key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.parametrize(
    ("key", "failed"),
    [
        ("committed", "training data for step 7"),
        ("initial", "training data for step 3"),
        # make_data itself raises on rank 1: rank 0 learns of it before evaluating the window
        ("opening", "make_data of window 1 (evaluation)"),
    ],
)
def test_online_retried_after_one_rank_failed_ends_as_an_uninterrupted_run(ranks, key, failed):
    hour = 0 if key == "initial" else 1
    assert ranks[1][f"{key}_error"] == ("OSError", f"corrupt file hour-{hour:02d}.parquet")
    kind, message = ranks[0][f"{key}_error"]
    assert kind == "RankFailedError"
    assert f"{failed} failed on rank(s) [1]" in message
    for result in ranks:
        # Only a failure before the first commit goes back to the saved initial tables.
        assert result[f"{key}_initial_kept"] == (key == "initial")
        assert not result[f"{key}_initial_left"]
        got, clean = result[key], result["clean"]
        assert got["windows"] == clean["windows"]
        assert got["step"] == clean["step"]
        for name, value in clean["dense"].items():
            assert torch.equal(got["dense"][name], value), name
        assert torch.equal(got["ids"], clean["ids"])
        assert torch.equal(got["rows"], clean["rows"])
