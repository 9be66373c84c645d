"""Online: windowed streaming training over new files, with deltas and committed offsets."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _toy import NUM_DENSE, make_rows
from torch import nn

import recis_embedding as emb
from recis_train import (
    EarlyStopping,
    Hook,
    Online,
    TrainingArguments,
    WatchDirectory,
    seed_everything,
)
from recis_train.exceptions import ConfigError, SourceNotFoundError

ROWS = 48
BATCH = 16


def write_hour(path: Path, hour: int) -> str:
    """One window's file: rows with a planted signal, tagged with their hour."""
    rows = make_rows(ROWS, seed=hour)
    columns = {f"d{i}": rows["dense"][:, i].numpy() for i in range(NUM_DENSE)}
    columns |= {"ids": rows["ids"].numpy(), "click": rows["click"].numpy()}
    columns["hour"] = [hour] * ROWS
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return str(path)


def read(paths: list[str]):
    """make_data: batches of BATCH rows of the files, in order."""
    for path in paths:
        table = pq.read_table(path)
        for start in range(0, table.num_rows, BATCH):
            part = table.slice(start, BATCH)

            def column(name: str, part: pa.Table = part) -> torch.Tensor:
                return torch.tensor(part[name].to_numpy())

            yield {
                "dense": torch.stack([column(f"d{i}") for i in range(NUM_DENSE)], dim=1),
                "ids": column("ids"),
                "click": column("click"),
                "hour": column("hour"),
            }


class Model(nn.Module):
    """A dynamic table and an MLP with dropout; logs which hour it evaluates or trains on."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = emb.EmbeddingEngine({"ids": emb.EmbeddingOption(4)})
        self.mlp = nn.Sequential(
            nn.Linear(NUM_DENSE + 4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 1)
        )
        self.log: list[tuple[str, int]] = []

    def forward(self, batch):
        self.log.append(("train" if self.training else "eval", int(batch["hour"][0])))
        out = self.embeddings({"ids": batch["ids"].reshape(-1, 1)})
        logits = self.mlp(torch.cat([batch["dense"], out["ids"]], dim=1))[:, 0]
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch["click"])
        return {"loss": loss, "predictions": torch.sigmoid(logits), "labels": batch["click"]}


def build(out: Path, source, make_data=read, *, arguments=None, **options) -> Online:
    seed_everything(0)
    model = Model()
    args = TrainingArguments(output_dir=str(out), device="cpu", log_every=1000, **arguments or {})
    return Online(
        model,
        args,
        source,
        make_data,
        dense_optimizer=torch.optim.Adam(model.mlp.parameters(), lr=0.02),
        sparse_optimizer=emb.SparseAdam(model, lr=0.02),
        **options,
    )


def table_state(model: nn.Module) -> dict[str, torch.Tensor]:
    table, index = model.embeddings.table("ids")
    ids = torch.sort(table.ids(index)).values
    state = {"ids": ids, "rows": table.read_full(table.find(ids, index))}
    with emb.tables_saved_separately():  # the rows are read above
        state |= {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture
def hours(tmp_path: Path) -> list[str]:
    return [write_hour(tmp_path / "data" / f"hour-{h:02d}.parquet", h) for h in range(4)]


def test_window_figures_do_not_depend_on_the_history_kept(tmp_path, hours):
    windows = [hours[0], [hours[1], hours[2]], hours[3]]
    every = build(tmp_path / "every", windows).run()
    bounded = build(tmp_path / "bounded", windows, arguments={"history_size": 1})
    results = bounded.run()
    assert [r.train for r in results] == [r.train for r in every]
    assert [r.train["steps"] for r in results] == [3, 6, 3]
    assert len(bounded.trainer.history["train"]) == 1


def test_iterator_windows_are_evaluated_before_training(tmp_path, hours):
    online = build(tmp_path / "run", [hours[0], [hours[1], hours[2]], Path(hours[3])])
    results = online.run()
    assert [r.files for r in results] == [[hours[0]], [hours[1], hours[2]], [hours[3]]]
    assert [r.index for r in results] == [0, 1, 2]
    # Test, then train: each window is evaluated by the model of the windows before it.
    phases = []
    for mode, hour in online.trainer.model.log:
        if not phases or phases[-1] != (mode, hour):
            phases.append((mode, hour))
    assert phases == [
        ("train", 0),
        ("eval", 1),
        ("eval", 2),
        ("train", 1),
        ("train", 2),
        ("eval", 3),
        ("train", 3),
    ]
    assert results[0].metrics == {}  # the untrained model's first window is not evaluated
    assert set(results[1].metrics) >= {"auc", "logloss", "loss"}
    assert [r.train["samples"] for r in results] == [ROWS, 2 * ROWS, ROWS]
    assert [r.step for r in results] == [3, 9, 12]
    assert [r.export_kind for r in results] == ["full", "delta", "delta"]
    assert all(r.export_bytes > 0 for r in results)


def test_evaluate_untrained_evaluates_the_first_window_too(tmp_path, hours):
    online = build(tmp_path / "run", [hours[0]], evaluate_untrained=True)
    (result,) = online.run()
    assert online.trainer.model.log[0] == ("eval", 0)
    assert 0.0 <= result.metrics["auc"] <= 1.0


def test_base_and_deltas_load_to_the_live_state_after_every_window(tmp_path, hours):
    live: list[dict[str, torch.Tensor]] = []
    online = build(
        tmp_path / "run",
        hours,
        full_every=3,
        on_window=lambda r: live.append(table_state(online.trainer.model)),
    )
    results = online.run()
    assert [r.export_kind for r in results] == ["full", "delta", "delta", "full"]
    total = len(live[2]["ids"])
    assert 0 < results[2].export_rows < total  # a delta holds only this window's rows
    for result, state in zip(results, live, strict=True):
        assert emb.CheckpointReader(result.export).has_dense  # exports serve the dense part too
        fresh = Model()
        emb.load(result.export, fresh, emb.SparseAdam(fresh, lr=0.02))
        assert_same(table_state(fresh), state)


def test_restart_after_a_crash_resumes_at_the_next_window_identically(tmp_path, hours):
    whole = build(tmp_path / "whole", hours)
    expected = whole.run()

    calls: list[tuple[str, ...]] = []
    crash = [True]

    def crashing(paths):
        calls.append(tuple(paths))
        # Window 2's training pass (its second read, after the evaluation) dies half way.
        if crash[0] and paths == [hours[2]] and calls.count((hours[2],)) == 2:
            crash[0] = False
            yield from list(read(paths))[:1]
            raise RuntimeError("preempted")
        yield from read(paths)

    with pytest.raises(RuntimeError, match="preempted"):
        build(tmp_path / "cut", hours, crashing).run()
    calls.clear()
    resumed = build(tmp_path / "cut", hours, crashing)
    results = resumed.run()
    assert calls == [(hours[2],), (hours[2],), (hours[3],), (hours[3],)]  # 0 and 1 are done
    assert [r.files for r in results] == [r.files for r in expected]
    for got, want in zip(results, expected, strict=True):
        assert got.metrics == want.metrics
        assert got.train == want.train
        assert got.export_rows == want.export_rows
    assert_same(table_state(resumed.trainer.model), table_state(whole.trainer.model))
    # Nothing is left to do: a third run trains nothing and reports the same windows.
    again = build(tmp_path / "cut", hours)
    assert [r.files for r in again.run()] == [r.files for r in expected]
    assert again.trainer.model.log == []


def test_watched_directory_takes_new_files_in_order(tmp_path, hours):
    watched = tmp_path / "watched"
    write_hour(watched / "hour-01.parquet", 1)
    write_hour(watched / "hour-00.parquet", 0)
    write_hour(watched / ".hour-05.parquet", 5)  # still being written
    write_hour(watched / "_hour-06.parquet", 6)  # bookkeeping, never data

    def arrive(result):
        if result.index == 0:  # a file lands while the run is going
            write_hour(watched / "hour-02.parquet", 2)

    source = WatchDirectory(watched, poll_interval=0.01, idle_timeout=0.2)
    online = build(tmp_path / "run", source, on_window=arrive)
    results = online.run()
    names = [[Path(f).name for f in r.files] for r in results]
    assert names == [["hour-00.parquet"], ["hour-01.parquet"], ["hour-02.parquet"]]
    # Restarted later with one more file: only that one is trained.
    write_hour(watched / "hour-03.parquet", 3)
    again = build(tmp_path / "run", source)
    assert [Path(r.files[0]).name for r in again.run()][3:] == ["hour-03.parquet"]
    assert {hour for _, hour in again.trainer.model.log} == {3}


def test_an_idle_timeout_shorter_than_the_poll_interval_ends_the_run_on_time(tmp_path, monkeypatch):
    # The timeout was checked only after a whole poll interval's sleep: idle_timeout=5 with
    # the default poll_interval=30 waited 30 s. Sleeps are recorded instead of slept.
    slept: list[float] = []
    monkeypatch.setattr("recis_train._online.time.sleep", slept.append)
    clock = itertools.count()  # each look at the clock: one second later
    monkeypatch.setattr("recis_train._online.time.monotonic", lambda: float(next(clock)))
    watched = tmp_path / "watched"
    watched.mkdir()
    source = WatchDirectory(watched, poll_interval=30, idle_timeout=5)
    assert build(tmp_path / "run", source).run() == []
    assert slept
    assert all(0 < s <= 5 for s in slept)


def test_watched_directory_with_markers_and_max_windows(tmp_path):
    watched = tmp_path / "watched"
    for hour in range(3):
        write_hour(watched / f"hour={hour:02d}" / "part-0.parquet", hour)
        write_hour(watched / f"hour={hour:02d}" / "part-1.parquet", hour)
        if hour != 1:
            (watched / f"hour={hour:02d}" / "_SUCCESS").touch()
    source = WatchDirectory(watched, marker="_SUCCESS", poll_interval=0.01, idle_timeout=0.1)
    results = build(tmp_path / "run", source, max_windows=1).run()
    assert [[Path(f).relative_to(watched).as_posix() for f in r.files] for r in results] == [
        ["hour=00/part-0.parquet", "hour=00/part-1.parquet"]
    ]
    results = build(tmp_path / "run", source).run()  # hour=01 is not marked complete
    assert [Path(r.files[0]).parent.name for r in results] == ["hour=00", "hour=02"]


def test_bad_sources_raise_clear_errors_and_keep_committed_windows(tmp_path, hours):
    with pytest.raises(SourceNotFoundError, match=r"watched directory .*missing does not exist"):
        build(tmp_path / "run", tmp_path / "missing")
    assert issubclass(SourceNotFoundError, FileNotFoundError)
    with pytest.raises(ConfigError, match="window 1 of the source is int 42"):
        build(tmp_path / "run", [hours[0], 42]).run()
    with pytest.raises(ConfigError, match="window 0 of the source is empty"):
        build(tmp_path / "other", [[]]).run()
    with pytest.raises(ConfigError, match="holds int 7, expected file paths"):
        build(tmp_path / "other", [[hours[0], 7]]).run()
    with pytest.raises(ConfigError, match="returned NoneType, expected an iterable"):
        build(tmp_path / "other", [hours[0]], lambda paths: None).run()
    with pytest.raises(ConfigError, match="train_steps must be None"):
        Online(
            Model(),
            TrainingArguments(output_dir=str(tmp_path / "other"), train_steps=5),
            [hours[0]],
            read,
            dense_optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1),
        )
    # The window before the bad item was committed; a fixed source continues after it.
    fixed = build(tmp_path / "run", [hours[0], hours[1]])
    assert [r.files for r in fixed.run()] == [[hours[0]], [hours[1]]]
    assert {hour for _, hour in fixed.trainer.model.log} == {1}


def test_a_window_without_rows_is_committed_and_the_stream_goes_on(tmp_path, hours):
    empty = tmp_path / "data" / "empty.parquet"
    pq.write_table(pq.read_table(hours[0]).slice(0, 0), empty)
    results = build(tmp_path / "run", [hours[0], str(empty), hours[1]]).run()
    assert [r.train["steps"] for r in results] == [3, 0, 3]
    assert math.isnan(results[1].train["loss"])
    assert (results[1].metrics, results[1].export_rows, results[1].step) == ({}, 0, 3)
    again = build(tmp_path / "run", [hours[0], str(empty), hours[1], hours[2]])
    assert [r.index for r in again.run()] == [0, 1, 2, 3]
    assert {hour for _, hour in again.trainer.model.log} == {2}


def assert_same_run(got: Online, want: Online) -> None:
    """Same windows, results, tables, dense weights and optimizer state."""
    pairs = zip(got.results, want.results, strict=True)
    for a, b in pairs:
        assert (a.files, a.metrics, a.train, a.step) == (b.files, b.metrics, b.train, b.step)
        assert (a.export_kind, a.export_rows) == (b.export_kind, b.export_rows)
    assert_same(table_state(got.trainer.model), table_state(want.trainer.model))
    adam = got.trainer.dense_optimizer.state_dict()["state"]
    expected = want.trainer.dense_optimizer.state_dict()["state"]
    assert adam.keys() == expected.keys()
    for key in adam:
        assert_same(adam[key], expected[key])
    assert got.trainer.global_step == want.trainer.global_step


def test_retrying_after_a_failure_in_the_first_window_starts_it_over(tmp_path, hours):
    whole = build(tmp_path / "whole", hours[:3])
    whole.run()
    broken = [True]

    def corrupt_once(paths):
        for position, batch in enumerate(read(paths)):
            if broken[0] and paths == [hours[0]] and position == 2:
                raise OSError(f"{paths[0]}: corrupt row group")
            yield batch

    online = build(tmp_path / "cut", hours[:3], corrupt_once)
    with pytest.raises(OSError, match="corrupt row group"):
        online.run()
    assert online.trainer.global_step == 2  # two steps of window 0 trained, nothing committed
    broken[0] = False  # the file is fixed
    assert [r.index for r in online.run()] == [0, 1, 2]
    assert_same_run(online, whole)
    assert not (tmp_path / "cut" / ".online-initial").exists()


@pytest.mark.parametrize("resume", [True, False])
def test_retrying_after_a_failure_in_a_later_window_goes_back_to_its_commit(
    tmp_path, hours, resume
):
    # Two batches per step: the bad batch fails in the forward pass of a step whose first
    # batch has already put gradients on the weights and inserted ids into the table.
    arguments = {"gradient_accumulation_steps": 2, "resume": resume}
    whole = build(tmp_path / "whole", hours[:3], arguments=arguments)
    whole.run()
    passes: list[str] = []
    broken = [True]

    def bad_batch_once(paths):
        passes.append(paths[0])
        for position, batch in enumerate(read(paths)):
            # The training pass of window 1 (its second read, after the evaluation).
            if broken[0] and paths == [hours[1]] and passes.count(hours[1]) == 2 and position:
                batch = {**batch, "click": batch["click"][:-1]}  # a row short: BCE raises
            yield batch

    online = build(tmp_path / "cut", hours[:3], bad_batch_once, arguments=arguments)
    with pytest.raises(ValueError, match="must be the same as input size"):
        online.run()
    assert [r.index for r in online.results] == [0]
    broken[0] = False
    assert [r.index for r in online.run()] == [0, 1, 2]
    assert_same_run(online, whole)


def test_a_damaged_export_is_passed_over_on_restart(tmp_path, hours, caplog):
    whole = build(tmp_path / "whole", hours)
    expected = whole.run()
    build(tmp_path / "cut", hours[:3]).run()
    export = tmp_path / "cut" / "exports" / "window-000002"
    (table_file,) = (export / "sparse").glob("*.safetensors")
    data = bytearray(table_file.read_bytes())
    data[len(data) // 2] ^= 0x10  # same size, other bytes
    table_file.write_bytes(bytes(data))
    resumed = build(tmp_path / "cut", hours)
    with caplog.at_level("WARNING", logger="recis_train"):
        results = resumed.run()
    # The checkpoint of window 2 points at the damaged export: window 1's is restored instead.
    assert f"checksum mismatch for sparse/{table_file.name} in checkpoint {export}" in caplog.text
    assert resumed.trainer.model.log[0] == ("eval", 2)
    assert [r.files for r in results] == [r.files for r in expected]
    for got, want in zip(results, expected, strict=True):
        assert got.metrics == want.metrics
        assert got.train == want.train
    assert_same(table_state(resumed.trainer.model), table_state(whole.trainer.model))


def test_a_restart_reads_the_export_files_for_checksums_once(tmp_path, hours, monkeypatch):
    import collections

    import recis_embedding._checkpoint as embedding_checkpoint

    build(tmp_path / "cut", hours[:3]).run()
    hashed: list[str] = []
    real = embedding_checkpoint.sha256
    monkeypatch.setattr(embedding_checkpoint, "sha256", lambda p: hashed.append(str(p)) or real(p))
    again = build(tmp_path / "cut", hours[:3])
    again.run()  # every window is done: the restart restores the last one's export only
    assert again.trainer.model.log == []
    exports = {str(p) for p in (tmp_path / "cut" / "exports").rglob("*.safetensors")}
    # The export chain is checked (SHA-256) before the restore loads it, and not again by it.
    assert hashed
    assert set(hashed) <= exports
    assert set(collections.Counter(hashed).values()) == {1}


def test_a_new_stream_is_refused_where_another_run_committed_windows(tmp_path, hours):
    build(tmp_path / "run", [hours[0]]).run()
    fresh = build(tmp_path / "run", [hours[1]], arguments={"resume": False})
    with pytest.raises(ConfigError, match=r"already holds checkpoints of another run \(step-"):
        fresh.run()
    assert fresh.trainer.model.log == []  # refused before the first window's evaluation
    assert [r.files for r in build(tmp_path / "run", [hours[0]]).run()] == [[hours[0]]]
    # In an output_dir of its own a stream with resume=False runs as before.
    assert len(build(tmp_path / "new", hours[:2], arguments={"resume": False}).run()) == 2


def test_a_one_shot_source_retried_after_a_failure_loses_no_window(tmp_path, hours):
    whole = build(tmp_path / "whole", hours[:3])
    whole.run()
    broken = [True]

    def corrupt_once(paths):
        for position, batch in enumerate(read(paths)):
            if broken[0] and paths == [hours[1]] and position == 1:
                raise OSError(f"{paths[0]}: corrupt row group")
            yield batch

    online = build(tmp_path / "cut", (h for h in hours[:3]), corrupt_once)
    with pytest.raises(OSError, match="corrupt row group"):
        online.run()
    broken[0] = False
    # The generator gave hour 1 before the failure: the retry trains it, not only hour 2.
    assert [r.files for r in online.run()] == [[hours[0]], [hours[1]], [hours[2]]]
    assert_same_run(online, whole)


def test_max_windows_reads_no_item_past_the_last_window(tmp_path, hours):
    read_items: list[str] = []

    def feed():
        for hour in hours:
            read_items.append(hour)
            yield hour

    online = build(tmp_path / "run", feed(), max_windows=2)
    assert [r.files for r in online.run()] == [[hours[0]], [hours[1]]]
    assert read_items == hours[:2]  # a live feed would block waiting for a third
    online.max_windows = 3
    assert [r.files for r in online.run()][2:] == [[hours[2]]]


class StopAt(Hook):
    """Asks to stop once, at one global step."""

    def __init__(self, step: int) -> None:
        self.step, self.fired = step, False

    def on_step_end(self, trainer, logs) -> None:
        if trainer.global_step == self.step and not self.fired:
            self.fired = True
            trainer.should_stop = True


def test_a_stop_asked_for_inside_a_window_ends_the_stream_without_committing_it(
    tmp_path, hours, caplog
):
    whole = build(tmp_path / "whole", hours[:3])
    whole.run()
    online = build(tmp_path / "cut", hours[:3], hooks=[StopAt(4)])  # window 1's first step
    assert [r.files for r in online.run()] == [[hours[0]]]
    assert "asked to stop during training at step 4 of window 1" in caplog.text
    # A later run trains window 1 in full from the commit of window 0, then goes on.
    assert [r.index for r in online.run()] == [0, 1, 2]
    assert_same_run(online, whole)


def test_early_stopping_ends_the_stream_and_passes_over_empty_windows(tmp_path, hours):
    empty = tmp_path / "data" / "empty.parquet"
    pq.write_table(pq.read_table(hours[0]).slice(0, 0), empty)
    stopper = EarlyStopping("loss", mode="min", patience=1, min_delta=100.0)
    online = build(
        tmp_path / "run",
        [hours[0], str(empty), hours[1], hours[2], hours[3]],
        hooks=[stopper],
        metrics={},
    )
    results = online.run()
    # Window 2 (hour 1) is the first evaluated with a loss: the best. Window 3's evaluation
    # does not improve by 100, so the stream ends before training on it.
    assert [r.files for r in results] == [[hours[0]], [str(empty)], [hours[1]]]
    assert stopper.stopped_at == results[-1].step


def test_watched_subdirectories_being_written_are_never_read(tmp_path):
    watched = tmp_path / "watched"
    write_hour(watched / "date=01" / "part-0.parquet", 0)
    write_hour(watched / "_temporary" / "0" / "part-1.parquet", 1)
    write_hour(watched / ".spark-staging-42" / "part-2.parquet", 2)
    source = WatchDirectory(watched, pattern="**/*.parquet", poll_interval=0.01, idle_timeout=0.1)
    assert [[Path(f).relative_to(watched).as_posix() for f in w] for w in source.ready()] == [
        ["date=01/part-0.parquet"]
    ]
    with pytest.raises(SourceNotFoundError, match="is a file; pass \\[path\\] as the source"):
        WatchDirectory(watched / "date=01" / "part-0.parquet").ready()


def test_a_marker_the_pattern_matches_is_not_a_data_file(tmp_path):
    # Hive writes 000000_0 without an extension: a loose pattern also matches a marker that
    # is not hidden by a leading "_".
    watched = tmp_path / "watched"
    write_hour(watched / "hour=00" / "000000_0", 0)
    (watched / "hour=00" / "DONE").touch()
    source = WatchDirectory(watched, pattern="*", marker="DONE")
    assert [[Path(f).relative_to(watched).as_posix() for f in w] for w in source.ready()] == [
        ["hour=00/000000_0"]
    ]


def test_one_file_named_two_ways_is_trained_once(tmp_path, hours, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = str(Path(hours[0]).relative_to(tmp_path))
    online = build(tmp_path / "run", [hours[0], "./" + relative, [relative, hours[1], hours[1]]])
    results = online.run()
    assert [r.files for r in results] == [[hours[0]], [hours[1]]]
    assert sorted({h for mode, h in online.trainer.model.log if mode == "train"}) == [0, 1]
    assert len([1 for mode, h in online.trainer.model.log if mode == "train" and h == 1]) == 3


def test_a_marked_partition_without_matching_files_is_reported_once(tmp_path, caplog):
    watched = tmp_path / "watched"
    write_hour(watched / "hour=00" / "part-0.parquet", 0)
    (watched / "hour=00" / "_SUCCESS").touch()
    (watched / "hour=01").mkdir()
    (watched / "hour=01" / "000000_0").write_bytes(b"hive output, no extension")
    (watched / "hour=01" / "_SUCCESS").touch()
    source = WatchDirectory(watched, marker="_SUCCESS", poll_interval=0.01, idle_timeout=0.1)
    results = build(tmp_path / "run", source).run()
    assert [Path(r.files[0]).parent.name for r in results] == ["hour=00"]
    reports = [r for r in caplog.records if "holds no file matching '*.parquet'" in r.message]
    assert len(reports) == 1
    assert "hour=01 is marked complete (_SUCCESS)" in reports[0].message
