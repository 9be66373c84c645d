"""Online on 2 CPU ranks (gloo) against the same windows in one process.

Each rank reads its share of every window (batches ``r, r + 2, ...`` of ``B`` rows of each file);
one process reads batches of ``2 * B`` rows, which hold rank 0's batch then rank 1's. The tables
are sharded over the ranks, so every window's losses, evaluation and embedding rows match the
single process up to float summation order (see ``test_distributed.py``).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
from _spawn import spawn_ranks
from _toy import NUM_DENSE, make_rows
from test_distributed import WORLD, B, ShardedModel, join_gloo

import recis_embedding as emb
from recis_train import LoggingHook, Online, TrainingArguments, WatchDirectory, seed_everything
from recis_train.exceptions import ConfigError

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

ROWS = 4 * WORLD * B  # per window file: 4 batches per rank
HOURS = 4


def write_hours(directory: Path) -> list[str]:
    paths = []
    for hour in range(HOURS):
        rows = make_rows(ROWS, seed=hour)
        columns = {f"d{i}": rows["dense"][:, i].numpy() for i in range(NUM_DENSE)}
        columns |= {"ids": rows["ids"].numpy(), "click": rows["click"].numpy()}
        path = directory / f"hour-{hour:02d}.parquet"
        pq.write_table(pa.table(columns), path)
        paths.append(str(path))
    return paths


def roots_with_hours(tmp_path_factory, name: str) -> Callable[[], Path]:
    """Makes a fresh directory for a 2-rank run, its ``data/`` holding the hourly files."""

    def fresh() -> Path:
        root = tmp_path_factory.mktemp(name)
        (root / "data").mkdir()
        write_hours(root / "data")
        return root

    return fresh


def reader(rank: int, world: int, batch: int):
    """make_data: batches ``rank, rank + world, ...`` of ``batch`` rows of each file."""

    def read(paths: list[str]):
        for path in paths:
            table = pq.read_table(path)
            for k, start in enumerate(range(0, table.num_rows, batch)):
                if k % world != rank:
                    continue
                part = table.slice(start, batch)
                yield {
                    "dense": torch.stack(
                        [torch.tensor(part[f"d{i}"].to_numpy()) for i in range(NUM_DENSE)], dim=1
                    ),
                    "ids": torch.tensor(part["ids"].to_numpy()),
                    "click": torch.tensor(part["click"].to_numpy()),
                }

    return read


def build(out: Path, source, make_data, *, shard: bool, stream=None, **options) -> Online:
    seed_everything(0)
    model = ShardedModel(shard)
    args = TrainingArguments(output_dir=str(out), device="cpu", log_every=1)
    return Online(
        model,
        args,
        source,
        make_data,
        # Plain SGD: a gradient off by a constant factor changes the result.
        dense_optimizer=torch.optim.SGD(model.mlp.parameters(), lr=0.5),
        sparse_optimizer=emb.SparseSGD(model, lr=0.5),
        hooks=[LoggingHook(stream=stream if stream is not None else io.StringIO())],
        **options,
    )


def summary(results) -> list[dict]:
    return [
        {
            "index": r.index,
            "files": r.files,
            "metrics": r.metrics,
            "train": r.train,
            "step": r.step,
            "export": r.export,
            "export_kind": r.export_kind,
            "export_rows": r.export_rows,
        }
        for r in results
    ]


def _worker(rank: int, root: str) -> None:
    join_gloo(root, rank)
    out = Path(root)
    data = out / "data"
    make_data = reader(rank, WORLD, B)
    result: dict = {}
    try:
        watch = WatchDirectory(data, poll_interval=0.0, idle_timeout=0.0)
        log = io.StringIO()
        # Stopped after 2 windows as if preempted, then resumed by a fresh Online.
        first = build(out / "run", watch, make_data, shard=True, stream=log, max_windows=2)
        result["first"] = summary(first.run())
        second = build(out / "run", watch, make_data, shard=True)
        result["second"] = summary(second.run())
        result["log"] = log.getvalue()

        # A bad source item: rank 0 reads it, and every rank raises instead of waiting.
        paths = sorted(str(p) for p in data.glob("*.parquet"))
        bad = build(out / "bad", [paths[0], 7], make_data, shard=True)
        try:
            bad.run()
        except ConfigError as err:
            result["error"] = str(err)
        result["bad_windows"] = len(bad.results)
    finally:
        torch.save(result, out / f"rank-{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = spawn_ranks(_worker, roots_with_hours(tmp_path_factory, "online-ranks"), WORLD)
    return root, [torch.load(root / f"rank-{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single(ranks, tmp_path_factory) -> tuple[Online, list[dict]]:
    root, _ = ranks
    out = tmp_path_factory.mktemp("online-single")
    online = build(
        out, sorted(str(p) for p in (root / "data").glob("*.parquet")), reader(0, 1, 2 * B),
        shard=False,
    )  # fmt: skip
    return online, summary(online.run())


def test_ranks_train_the_same_windows_and_resume_after_a_stop(ranks):
    root, results = ranks
    files = sorted(str(p) for p in (root / "data").glob("*.parquet"))
    for result in results:
        assert [w["files"] for w in result["first"]] == [[f] for f in files[:2]]
        assert [w["index"] for w in result["second"]] == [0, 1, 2, 3]
        assert [w["files"] for w in result["second"]] == [[f] for f in files]
        assert result["second"][:2] == result["first"]  # restored from the checkpoint
        assert [w["export_kind"] for w in result["second"]] == ["full"] + ["delta"] * 3
    assert results[0]["second"] == results[1]["second"]


def test_two_ranks_match_one_process_window_by_window(ranks, single):
    _, results = ranks
    _, expected = single
    got = results[0]["second"]
    assert len(got) == len(expected) == HOURS
    for g, e in zip(got, expected, strict=True):
        assert g["step"] == e["step"] == (g["index"] + 1) * ROWS // (WORLD * B)
        assert g["train"]["samples"] == e["train"]["samples"] == ROWS
        assert g["train"]["loss"] == pytest.approx(e["train"]["loss"], rel=1e-5)
        assert g["metrics"].keys() == e["metrics"].keys()
        for key, value in e["metrics"].items():
            assert g["metrics"][key] == pytest.approx(value, rel=1e-5), key
        assert g["export_rows"] == e["export_rows"]


def test_two_rank_export_chain_loads_into_one_process(ranks, single):
    _, results = ranks
    online, _ = single
    model = ShardedModel(shard=False)
    emb.load(results[0]["second"][-1]["export"], model, emb.SparseSGD(model, lr=0.5))
    table, index = model.embeddings.table("ids")
    ids = torch.sort(table.ids(index)).values
    ref_table, ref_index = online.trainer.model.embeddings.table("ids")
    assert torch.equal(ids, torch.sort(ref_table.ids(ref_index)).values)
    torch.testing.assert_close(
        table.read_full(table.find(ids, index)),
        ref_table.read_full(ref_table.find(ids, ref_index)),
        rtol=1e-5,
        atol=1e-6,
    )
    for key, value in online.trainer.model.mlp.state_dict().items():
        torch.testing.assert_close(model.mlp.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_only_rank_zero_logs(ranks):
    _, results = ranks
    assert "step " in results[0]["log"]
    assert results[1]["log"] == ""


def test_a_source_error_on_rank_zero_stops_every_rank(ranks):
    _, results = ranks
    for rank, result in enumerate(results):
        assert result["bad_windows"] == 1, rank  # the good window before the bad item
        assert "window 1 of the source is int 7" in result["error"], rank
    assert results[1]["error"].startswith("on rank 0: ")
