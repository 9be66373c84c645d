"""The Trainer on 2 CPU ranks (gloo) against the same training in one process.

The comparison that is exact: rank ``r`` trains on batches of ``B`` rows and one process on
batches of ``2 * B`` rows, rank 0's rows then rank 1's, with the mean loss. The trainer sums
gradients over the ranks of ``loss / world_size`` (dense through DDP, sharded tables through
their all-to-all), so every step's dense and sparse gradient is the mean over the same ``2 * B``
rows in both runs, and so are the logged losses. Embedding rows start from per-id seeded
values and the dense model from the same seed, so only float summation order differs.
"""

from __future__ import annotations

import datetime
import functools
import gc
import io
import json
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _spawn import spawn_ranks
from _toy import TableModel, make_rows

import recis_embedding as emb
from recis_train import (
    Hook,
    LoggingHook,
    ProfilerHook,
    Trainer,
    TrainingArguments,
    seed_everything,
)
from recis_train.exceptions import CheckpointError, ConfigError

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

B = 8
WORLD = 2
TRAIN_BATCHES = (5, 7)  # uneven shares: rank 1 has two batches more, which nobody trains
EVAL_BATCHES = (3, 2)  # rank 1 runs out first and repeats its last batch uncounted
STEPS = min(TRAIN_BATCHES)
SIZES = (B, 2)  # rows per batch of each rank, where the ranks' batches differ in size


class ShardedModel(TableModel):
    """The table model, its table sharded (or not) and initialized from Normal(std=0.3)."""

    def __init__(self, shard: bool) -> None:
        option = emb.EmbeddingOption(4, initializer=emb.Normal(std=0.3))
        super().__init__(shard=shard, option=option)


def batches(rank: int, count: int, size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    rows = make_rows(WORLD * max(TRAIN_BATCHES) * B, seed)
    starts = [(k * WORLD + rank) * size for k in range(count)]
    return [{k: v[s : s + size] for k, v in rows.items()} for s in starts]


def merged(parts: list[list[dict[str, torch.Tensor]]]) -> list[dict[str, torch.Tensor]]:
    """One batch per step holding every rank's batch of that step, rank 0's rows first."""
    steps = min(len(p) for p in parts)
    return [{k: torch.cat([p[i][k] for p in parts]) for k in parts[0][0]} for i in range(steps)]


def build(out: Path, train_data, eval_data, *, shard: bool, stream=None, **args) -> Trainer:
    seed_everything(0)
    model = ShardedModel(shard)
    settings = {"output_dir": str(out), "device": "cpu", "log_every": 1}
    return Trainer(
        model,
        TrainingArguments(**(settings | args)),
        train_data=train_data,
        eval_data=eval_data,
        # Plain SGD: a gradient off by a constant factor changes the result (Adam's would not).
        dense_optimizer=torch.optim.SGD(model.mlp.parameters(), lr=0.5),
        sparse_optimizer=emb.SparseSGD(model, lr=0.5),
        hooks=[LoggingHook(stream=stream if stream is not None else io.StringIO())],
    )


def table_state(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    table = emb.sparse_parameters(trainer.model)[0]
    ids = torch.sort(table.ids()).values
    return ids, table.embeddings(ids)


def snapshot(trainer: Trainer) -> dict:
    ids, rows = table_state(trainer)
    return {
        "step": trainer.global_step,
        "losses": [logs["loss"] for _, logs in trainer.history["train"]],
        "samples": [logs["samples"] for _, logs in trainer.history["train"]],
        "dense": {k: v.clone() for k, v in trainer.model.mlp.state_dict().items()},
        "ids": ids,
        "rows": rows,
    }


def join_gloo(root: str, rank: int) -> None:
    """Join the test's 2-rank gloo group; a rank left waiting fails instead of hanging."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{root}/init",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )


class FailingData:
    """``batches`` that raise ``OSError`` (e.g. a corrupt file) when batch ``fail_at`` is read."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], fail_at: int) -> None:
        self.batches = batches
        self.fail_at = fail_at

    def __iter__(self):
        for index, batch in enumerate(self.batches):
            if index == self.fail_at:
                raise OSError("corrupt file part-00001.parquet")
            yield batch


class StopAfter(Hook):
    """Asks the trainer to stop after step ``step``, where ``here`` (on one rank, say)."""

    def __init__(self, step: int, here: bool) -> None:
        self.step, self.here = step, here

    def on_step_end(self, trainer: Trainer, logs) -> None:
        if self.here and trainer.global_step == self.step:
            trainer.should_stop = True


def error_of(call) -> tuple[str, str] | None:
    """The type name and message of what ``call()`` raised, or ``None``."""
    try:
        call()
    except Exception as err:
        return type(err).__name__, str(err)
    return None


def _worker(rank: int, root: str) -> None:
    join_gloo(root, rank)
    out = Path(root)
    train = batches(rank, TRAIN_BATCHES[rank], B, seed=0)
    evals = batches(rank, EVAL_BATCHES[rank], B, seed=1)
    result: dict = {}
    try:
        unsharded = ShardedModel(shard=False)
        with pytest.raises(ConfigError, match="not sharded"):
            Trainer(
                unsharded,
                TrainingArguments(output_dir=str(out / "x"), device="cpu"),
                train_data=[],
                dense_optimizer=torch.optim.SGD(unsharded.mlp.parameters(), lr=0.1),
            )

        log = io.StringIO()
        whole = build(out / "whole", train, evals, shard=True, stream=log)
        result["eval"] = whole.train_and_evaluate()
        result["whole"] = snapshot(whole)
        result["log"] = log.getvalue()
        result["cursor"] = whole._cursor

        # Micro-batches 2 per step: the last step has 1 on rank 0, so rank 1 trains 1 too.
        accum = build(out / "accum", train, evals, shard=True, gradient_accumulation_steps=2)
        profiler = ProfilerHook(str(out / "profile"), start=1, steps=1)
        accum.hooks.append(profiler)
        accum.train()
        result["accum"] = snapshot(accum)
        result["trace"] = profiler.trace_path

        # Interrupted after 3 steps, then rebuilt and resumed from the 2-rank checkpoint.
        cut = build(out / "cut", train, evals, shard=True, train_steps=3)
        cut.train()
        resumed = build(out / "cut", train, evals, shard=True)
        resumed.restore()
        result["restored_step"] = resumed.global_step
        resumed.train()
        result["resumed"] = snapshot(resumed)

        # Batches of B rows on rank 0 and of 2 on rank 1: each rank's single loss (its mean)
        # is weighed by its rows, so the ranks train as one process over both ranks' rows.
        sized = build(out / "sized", batches(rank, 3, SIZES[rank], seed=2), [], shard=True)
        sized.train()
        result["sized"] = snapshot(sized)

        # A hook on rank 1 alone asks to stop after step 2: both ranks stop there, rank 0's
        # checkpoint records the stop, and the same run started again trains no further.
        stopping = build(out / "stop", train, evals, shard=True)
        stopping.hooks.append(StopAfter(2, rank == 1))
        stopping.train()
        again = build(out / "stop", train, evals, shard=True)
        again.train()
        result["stop"] = (stopping.global_step, stopping.should_stop, again.global_step)

        # Rank 1's data fails at its third training batch, then at its second evaluation batch.
        # The failures leave no reference cycle through their errors: dropped, the trainer
        # (with its model's process group) is freed at once, not by a garbage collection
        # after destroy_process_group(), which could abort the process at exit.
        gc.collect()
        gc.disable()
        try:
            bad_train = FailingData(train, 2) if rank == 1 else train
            failing = build(out / "failing", bad_train, evals, shard=True)
            result["train_error"] = error_of(failing.train)
            result["train_error_step"] = failing.global_step
            bad_evals = FailingData(evals, 1) if rank == 1 else evals
            result["eval_error"] = error_of(functools.partial(failing.evaluate, bad_evals))
            dropped = weakref.ref(failing)
            del failing
            result["failed_trainer_freed"] = dropped() is None
        finally:
            gc.enable()
    finally:
        torch.save(result, out / f"rank-{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = spawn_ranks(_worker, lambda: tmp_path_factory.mktemp("ranks"), WORLD)
    return root, [torch.load(root / f"rank-{r}.pt") for r in range(WORLD)]


def single_train() -> list[dict[str, torch.Tensor]]:
    return merged([batches(r, TRAIN_BATCHES[r], B, seed=0) for r in range(WORLD)])


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Trainer, dict[str, float]]:
    out = tmp_path_factory.mktemp("single")
    evals = [b for r in range(WORLD) for b in batches(r, EVAL_BATCHES[r], B, seed=1)]
    trainer = build(out, single_train(), evals, shard=False)
    return trainer, trainer.train_and_evaluate()


def assert_same_training(got: list[dict], expected: dict) -> None:
    for result in got:
        torch.testing.assert_close(result["losses"], expected["losses"], rtol=1e-5, atol=1e-6)
        for key, value in expected["dense"].items():
            torch.testing.assert_close(result["dense"][key], value, rtol=1e-5, atol=1e-6)
    # Each rank holds the rows of the ids it owns; together they are the single table.
    ids = torch.cat([r["ids"] for r in got])
    rows = torch.cat([r["rows"] for r in got])
    order = torch.argsort(ids)
    assert torch.equal(ids[order], expected["ids"])
    assert set(got[0]["ids"].tolist()).isdisjoint(got[1]["ids"].tolist())
    torch.testing.assert_close(rows[order], expected["rows"], rtol=1e-5, atol=1e-6)


def test_a_stop_asked_on_one_rank_stops_all_and_is_recorded(ranks):
    _, results = ranks
    assert [r["stop"] for r in results] == [(2, True, 2), (2, True, 2)]


def test_ranks_stop_together_when_one_runs_out(ranks):
    _, results = ranks
    for rank, result in enumerate(results):
        assert result["whole"]["step"] == STEPS, rank
        # The cursor points after the last batch trained: rank 1's spare batches stay unread.
        assert result["cursor"]["consumed"] == STEPS, rank


def test_two_ranks_train_like_one_process_on_both_shares(ranks, single):
    _, results = ranks
    trainer, _ = single
    expected = snapshot(trainer)
    assert expected["step"] == STEPS
    assert_same_training([r["whole"] for r in results], expected)
    for result in results:
        assert result["whole"]["samples"] == [float(WORLD * B)] * STEPS


def test_a_single_loss_over_batches_of_different_sizes_trains_like_one_process(ranks, tmp_path):
    _, results = ranks
    trainer = build(
        tmp_path, merged([batches(r, 3, SIZES[r], seed=2) for r in range(WORLD)]), [], shard=False
    )
    trainer.train()
    assert_same_training([r["sized"] for r in results], snapshot(trainer))


def test_gradient_accumulation_matches_one_process(ranks, tmp_path):
    _, results = ranks
    trainer = build(tmp_path, single_train(), [], shard=False, gradient_accumulation_steps=2)
    trainer.train()
    expected = snapshot(trainer)
    assert expected["step"] == 3
    assert_same_training([r["accum"] for r in results], expected)
    assert results[0]["accum"]["samples"] == [32.0, 32.0, 16.0]


def test_evaluation_covers_every_rank_and_is_synced(ranks, single):
    _, results = ranks
    _, expected = single
    assert set(expected) == {"loss", "auc", "logloss", "calibration"}
    for result in results:
        assert result["eval"].keys() == expected.keys()
        for key, value in expected.items():
            assert result["eval"][key] == pytest.approx(value, rel=1e-5), key


def test_only_rank_zero_logs(ranks):
    _, results = ranks
    lines = results[0]["log"].splitlines()
    assert sum(line.startswith("step ") for line in lines) == STEPS
    assert any(line.startswith(f"eval at step {STEPS}") for line in lines)
    assert results[1]["log"] == ""


def test_each_rank_writes_its_own_profiler_trace(ranks):
    root, results = ranks
    paths = [Path(r["trace"]) for r in results]
    assert [p.name for p in paths] == [f"trace-step1-rank{r}.json" for r in range(WORLD)]
    assert sorted(p.name for p in (root / "profile").iterdir()) == [p.name for p in paths]
    for path in paths:
        assert json.loads(path.read_text())["traceEvents"]


def test_two_rank_checkpoint_resumes_exactly(ranks):
    root, results = ranks
    for result in results:
        assert result["restored_step"] == 3
        whole, resumed = result["whole"], result["resumed"]
        assert resumed["step"] == whole["step"]
        assert resumed["losses"] == whole["losses"]  # history restored, then the same steps
        for key, value in whole["dense"].items():
            assert torch.equal(resumed["dense"][key], value), key
        assert torch.equal(resumed["ids"], whole["ids"])
        assert torch.equal(resumed["rows"], whole["rows"])
    latest = root / "cut" / "checkpoints" / f"step-{STEPS:09d}"
    manifest = json.loads((latest / "manifest.json").read_text())
    assert manifest["meta"]["world_size"] == WORLD
    shards = sorted(p.name for p in (latest / "sparse" / "tables" / "sparse").iterdir())
    assert shards == [f"ids.shard-{r:05d}-of-{WORLD:05d}.safetensors" for r in range(WORLD)]
    state = torch.load(latest / "trainer" / "state.pt", weights_only=True)
    assert [s["cursor"]["consumed"] for s in state["ranks"]] == [STEPS, STEPS]


def test_one_process_warm_starts_from_two_ranks_but_does_not_resume(ranks, tmp_path):
    root, results = ranks
    latest = root / "cut" / "checkpoints" / f"step-{STEPS:09d}"
    trainer = build(tmp_path, [], [], shard=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(CheckpointError, match="written by 2 rank"):
        trainer.restore(latest)
    # Refused before anything was loaded: the model is as it was.
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not emb.sparse_parameters(trainer.model)[0].ids().numel()
    trainer.restore(latest, parts=("dense", "sparse"))
    ids, rows = table_state(trainer)
    both = torch.cat([r["resumed"]["ids"] for r in results])
    order = torch.argsort(both)
    assert torch.equal(ids, both[order])
    assert torch.equal(rows, torch.cat([r["resumed"]["rows"] for r in results])[order])
    for key, value in results[0]["resumed"]["dense"].items():
        assert torch.equal(trainer.model.mlp.state_dict()[key], value), key


def test_a_data_error_on_one_rank_ends_every_rank_naming_it(ranks):
    _, results = ranks
    # The failing rank raises its own error; the other learns of it instead of waiting.
    assert results[1]["train_error"] == ("OSError", "corrupt file part-00001.parquet")
    kind, message = results[0]["train_error"]
    assert kind == "RankFailedError"
    assert "training data for step 3 failed on rank(s) [1]" in message
    assert "rank 1: OSError: corrupt file part-00001.parquet" in message
    assert [r["train_error_step"] for r in results] == [2, 2]
    assert [r["failed_trainer_freed"] for r in results] == [True, True]
    assert results[1]["eval_error"] == ("OSError", "corrupt file part-00001.parquet")
    kind, message = results[0]["eval_error"]
    assert kind == "RankFailedError"
    assert "evaluation batch 2 (counted from 1) failed on rank(s) [1]" in message
