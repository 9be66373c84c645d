"""Checkpoints: atomic saves, rotation, exact in-process resume and kill-and-resume."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _toy import ToyModel, ToyReader, make_optimizers

from recis_train import (
    CheckpointManager,
    EarlyStopping,
    Hook,
    Trainer,
    TrainingArguments,
    seed_everything,
)
from recis_train.exceptions import CheckpointError, CheckpointNotFoundError, ConfigError

HERE = Path(__file__).resolve().parent


def build(out, *, rows=600, batch=30, data=None, **args):
    seed_everything(0)
    model = ToyModel(rows)
    dense, sparse = make_optimizers(model)
    schedule = torch.optim.lr_scheduler.ExponentialLR(dense, gamma=0.95)
    settings = {"output_dir": str(out), "device": "cpu", "epochs": 2, "deterministic": True}
    return Trainer(
        model,
        TrainingArguments(**(settings | args)),
        train_data=data if data is not None else ToyReader(rows, batch),
        dense_optimizer=dense,
        sparse_optimizer=sparse,
        lr_schedulers=[schedule],
    )


def params(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def assert_same(a, b, context=""):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} {context}"


@pytest.mark.parametrize("stateful", [True, False])
def test_resume_in_process_is_bit_exact(tmp_path, stateful):
    def data():
        reader = ToyReader(600, 30)
        return reader if stateful else list(reader)

    whole = build(tmp_path / "whole", data=data())
    whole.train()
    first = build(tmp_path / "cut", data=data(), train_steps=13, save_every=13)
    first.train()
    second = build(tmp_path / "cut", data=data())
    second.train()
    assert second.global_step == whole.global_step == 40
    assert_same(params(second), params(whole))
    assert (
        second.dense_optimizer.param_groups[0]["lr"] == whole.dense_optimizer.param_groups[0]["lr"]
    )
    assert torch.equal(second.model.seen, torch.full((600,), 2))
    if stateful:
        assert second.train_data.loads == [{"position": 390}]


def test_history_comes_back_from_a_checkpoint_as_it_was(tmp_path):
    trainer = build(tmp_path, train_steps=12, save_every=6)
    trainer.train()
    trainer.evaluate([])  # an evaluation of no rows: empty results
    trainer.history["train"][3][1]["extra"] = 1.5  # a log only some steps have
    trainer.history["mine"] = [(1, {"note": 2.0})]
    trainer.save()
    again = build(tmp_path)
    again.restore()
    assert again.history == trainer.history
    assert all(type(v) is float for _, logs in again.history["train"] for v in logs.values())
    # Held in columns: the steps and each key's values are tensors, not 12 dicts.
    state = torch.load(again.checkpoints.latest() / "trainer" / "state.pt", weights_only=True)
    train = state["history"]["train"]
    assert train["steps"].tolist() == list(range(1, 13))
    assert train["values"].shape == (12, len(train["keys"]))
    assert train["present"].sum() == 12 * (len(train["keys"]) - 1) + 1
    # A log holding anything but floats (an int a user put there) is kept as it is.
    trainer.history["train"][0][1]["count"] = 3
    trainer.save()
    again = build(tmp_path)
    again.restore()
    assert again.history["train"][0][1]["count"] == 3
    assert type(again.history["train"][0][1]["count"]) is int
    # A part of the user's own holding other entries comes back as it was.
    trainer.history["notes"] = ["hello", [3, {"a": 1.0}], 5]
    trainer.save()
    again = build(tmp_path)
    again.restore()
    assert again.history["notes"] == ["hello", [3, {"a": 1.0}], 5]


def test_history_size_keeps_the_latest_steps_in_memory_and_checkpoints(tmp_path):
    every = build(tmp_path / "every", train_steps=34)
    every.train()
    bounded = build(tmp_path / "bounded", train_steps=30, history_size=8)
    bounded.train()
    held = bounded.history["train"]
    # Dropped an eighth of the limit at a time (one here): 8 or 9 held, the latest.
    assert 8 <= len(held) <= 9

    def losses(entries):
        return [(step, logs["loss"]) for step, logs in entries]

    assert losses(held) == losses(every.history["train"][30 - len(held) : 30])
    again = build(tmp_path / "bounded", train_steps=34, history_size=8)
    again.train()
    # Resumed, it holds what a run that was never stopped holds.
    whole = build(tmp_path / "whole", train_steps=34, history_size=8)
    whole.train()
    assert losses(again.history["train"]) == losses(whole.history["train"])
    assert losses(whole.history["train"]) == losses(every.history["train"][-8:])
    with pytest.raises(ConfigError, match="history_size must be at least 1 or None, got 0"):
        TrainingArguments(history_size=0)


def test_restore_picks_latest_complete_and_rotates(tmp_path):
    trainer = build(tmp_path, train_steps=12, save_every=3, max_to_keep=2)
    trainer.train()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000000009", "step-000000012"]
    (root / "step-000000012" / "manifest.json").unlink()  # as if killed before the rename
    (root / "step-000000015").mkdir()
    fresh = build(tmp_path)
    assert fresh.restore() == root / "step-000000009"
    assert fresh.global_step == 9


@pytest.mark.parametrize("damaged", ["dense/model.safetensors", "trainer/state.pt"])
def test_a_truncated_newest_checkpoint_is_passed_over(tmp_path, damaged):
    whole = build(tmp_path / "whole", train_steps=12)
    whole.train()
    trainer = build(tmp_path / "run", train_steps=12, save_every=3, max_to_keep=2)
    trainer.train()
    root = tmp_path / "run" / "checkpoints"
    file = root / "step-000000012" / damaged
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])  # a disk that filled up
    assert trainer.checkpoints.latest() == root / "step-000000009"
    with pytest.raises(CheckpointError, match=rf"step-000000012: .*{damaged} \(\d+ bytes, written"):
        build(tmp_path / "run").restore(root / "step-000000012")
    resumed = build(tmp_path / "run", train_steps=12, save_every=3, max_to_keep=2)
    resumed.train()  # resumes from step 9 and writes step 12 again
    assert_same(params(resumed), params(whole))
    assert [p.name for p in resumed.checkpoints.complete()] == ["step-000000009", "step-000000012"]


def test_an_unreadable_checkpoint_file_is_named(tmp_path):
    trainer = build(tmp_path, train_steps=3)
    trainer.train()
    path = trainer.checkpoints.latest()
    # Same size, other bytes, in a checkpoint of a version that recorded no checksums: not
    # caught by the manifest, so loading it names the file.
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["checksums"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    file = path / "dense" / "model.safetensors"
    file.write_bytes(b"\xff" * file.stat().st_size)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read the tensors"):
        build(tmp_path).restore()


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    trainer = build(tmp_path, train_steps=4, save_every=4)
    trainer.train()
    manager = trainer.checkpoints
    before = manager.latest()

    def broken(directory):
        (directory / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(CheckpointError, match=r"saving checkpoint of step 9 .* failed: disk full"):
        manager.save(9, {"dense": broken}, {})
    assert manager.latest() == before
    assert [p.name for p in manager.root.iterdir()] == [before.name]
    assert build(tmp_path).restore() == before


def test_state_that_is_not_a_tensor_is_named_and_keeps_the_previous_checkpoint(tmp_path):
    trainer = build(tmp_path, train_steps=2, save_every=2)
    trainer.train()
    before = trainer.checkpoints.latest()

    class Calibration(torch.nn.Module):
        def get_extra_state(self):
            return {"scale": 1.5}

        def set_extra_state(self, state):
            pass

    trainer.model.calibration = Calibration()
    with pytest.raises(CheckpointError, match=r"not tensors \(\{'calibration\._extra_state'"):
        trainer.save()
    assert trainer.checkpoints.latest() == before
    assert [p.name for p in trainer.checkpoints.root.iterdir()] == [before.name]


def test_checkpoint_files_are_open_formats(tmp_path):
    from safetensors.torch import load_file

    trainer = build(tmp_path, train_steps=2)
    trainer.train()
    path = trainer.checkpoints.latest()
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 2
    assert manifest["meta"]["args"]["train_steps"] == 2
    assert set(manifest["files"]) == {"dense/model.safetensors", "trainer/state.pt"}
    tensors = load_file(str(path / "dense" / "model.safetensors"))
    assert torch.equal(tensors["mlp.0.weight"], trainer.model.mlp[0].weight)


def test_restore_errors_are_clear(tmp_path):
    trainer = build(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="no complete checkpoint in"):
        trainer.restore()
    assert trainer.restore(missing_ok=True) is None
    with pytest.raises(ConfigError, match=r"unknown part\(s\) \['optimizer'\]"):
        trainer.restore(parts=("optimizer",))
    with pytest.raises(CheckpointNotFoundError, match="is not a complete checkpoint"):
        trainer.restore(tmp_path)


def test_warm_start_loads_weights_only(tmp_path):
    donor = build(tmp_path / "donor", train_steps=5)
    donor.train()
    fresh = build(tmp_path / "fresh")
    fresh.restore(donor.checkpoints.latest(), parts=("dense",))
    assert fresh.global_step == 0
    assert torch.equal(fresh.model.mlp[0].weight, donor.model.mlp[0].weight)
    assert torch.equal(fresh.model.embedding.weight, donor.model.embedding.weight)
    assert not fresh.dense_optimizer.state  # optimizer state is part of "trainer", not loaded


def test_checkpoint_manager_lists_in_step_order(tmp_path):
    manager = CheckpointManager(tmp_path, max_to_keep=5)
    for step in (100, 7, 1_000_000_000):
        manager.save(step, {}, {})
    assert [int(p.name.split("-")[1]) for p in manager.complete()] == [7, 100, 1_000_000_000]


def run_script(out, result, *, kill_at=None):
    cmd = [sys.executable, str(HERE / "_resume_script.py"), str(out), str(result)]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    if kill_at is None:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return
    # The script waits after printing step ``kill_at``, so the kill lands at that step however
    # late this process runs; its stderr goes to a file (an unread pipe could fill and block it).
    with open(f"{out}.stderr", "w") as err:
        proc = subprocess.Popen(
            [*cmd, str(kill_at)], stdout=subprocess.PIPE, stderr=err, text=True, env=env
        )
        try:
            for line in proc.stdout:
                if line.strip() == f"step {kill_at}":
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == -signal.SIGKILL, Path(f"{out}.stderr").read_text()


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_rerun_equals_an_uninterrupted_run(tmp_path):
    run_script(tmp_path / "whole", tmp_path / "whole.pt")
    kill_at = random.Random().randint(6, 54)  # 60 steps in all; checkpoints every 5
    run_script(tmp_path / "cut", tmp_path / "cut.pt", kill_at=kill_at)
    assert not (tmp_path / "cut.pt").exists()
    assert CheckpointManager(tmp_path / "cut" / "checkpoints").latest() is not None
    run_script(tmp_path / "cut", tmp_path / "cut.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)
    resumed = torch.load(tmp_path / "cut.pt", weights_only=True)
    assert_same(resumed, whole, f"(killed at step {kill_at})")
    # Every row trained on exactly once per epoch: none skipped, none repeated.
    assert torch.equal(resumed["seen"], torch.full((1_200,), 2)), f"killed at step {kill_at}"


class TableModel(ToyModel):
    """Keeps an extra "table" outside the state_dict, like recis-embedding's hash tables."""

    def __init__(self, rows):
        super().__init__(rows)
        self.table = torch.zeros(4)

    def forward(self, batch):
        self.table += batch["click"][:4].sum()  # changes every step, bit-exactly reproducible
        return super().forward(batch)


class TableCheckpoint:
    def __init__(self):
        self.saved, self.loaded = 0, 0

    def save(self, directory, model, sparse_optimizer):
        state = {"table": model.table, "embedding": model.embedding.weight.detach()}
        torch.save(state, directory / "table.pt")
        self.saved += 1

    def load(self, directory, model, sparse_optimizer):
        state = torch.load(directory / "table.pt", weights_only=True)
        model.table = state["table"]
        with torch.no_grad():
            model.embedding.weight.copy_(state["embedding"])
        self.loaded += 1

    def filter_dense(self, state):
        return {k: v for k, v in state.items() if not k.startswith("embedding.")}


def test_sparse_checkpoint_seam_saves_and_restores_tables(tmp_path):
    def make(**args):
        seed_everything(0)
        model = TableModel(600)
        dense, sparse = make_optimizers(model)
        hook = TableCheckpoint()
        settings = {"output_dir": str(tmp_path / "run"), "device": "cpu", "save_every": 7}
        trainer = Trainer(
            model,
            TrainingArguments(**(settings | args)),
            train_data=ToyReader(600, 30),
            dense_optimizer=dense,
            sparse_optimizer=sparse,
            sparse_checkpoint=hook,
        )
        return trainer, hook

    whole, _ = make(output_dir=str(tmp_path / "whole"))
    whole.train()
    cut, hook = make(train_steps=7)
    cut.train()
    assert hook.saved == 1
    path = cut.checkpoints.latest()
    assert (path / "sparse" / "table.pt").is_file()
    # The dense file leaves out what the sparse part owns.
    from safetensors.torch import load_file

    assert "embedding.weight" not in load_file(str(path / "dense" / "model.safetensors"))
    resumed, hook = make()
    resumed.train()
    assert hook.loaded == 1
    assert torch.equal(resumed.model.table, whole.model.table)
    for key, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


class CrashInEvaluation(Hook):
    """Raises during the evaluation of step ``at`` (``None``: never), like a kill there."""

    def __init__(self, at):
        self.at = at

    def on_evaluate(self, trainer, metrics):
        if trainer.global_step == self.at:
            raise RuntimeError(f"crash in the evaluation of step {self.at}")


def build_evaluated(out, crash_at=None, **settings):
    """Evaluates every 2 steps, saves every 2; stops at the second evaluation (step 4)."""
    seed_everything(0)
    model = ToyModel(600)
    dense, sparse = make_optimizers(model)
    stop = EarlyStopping("auc", patience=1, min_delta=1.0)  # nothing improves by a whole unit
    settings = {"eval_every": 2, "save_every": 2} | settings
    args = TrainingArguments(output_dir=str(out), device="cpu", deterministic=True, **settings)
    return Trainer(
        model,
        args,
        train_data=ToyReader(600, 30),
        eval_data=ToyReader(200, 50, seed=1),
        dense_optimizer=dense,
        sparse_optimizer=sparse,
        hooks=[CrashInEvaluation(crash_at), stop],
    )


def test_a_crash_during_an_evaluation_resumes_to_the_same_early_stop(tmp_path):
    whole = build_evaluated(tmp_path / "whole")
    whole.train_and_evaluate()
    assert whole.hooks[1].stopped_at == whole.global_step == 4
    cut = build_evaluated(tmp_path / "cut", crash_at=4)
    with pytest.raises(RuntimeError, match="crash in the evaluation of step 4"):
        cut.train_and_evaluate()
    resumed = build_evaluated(tmp_path / "cut")
    results = resumed.train_and_evaluate()
    assert resumed.global_step == 4
    assert resumed.hooks[1].stopped_at == 4
    assert [step for step, _ in resumed.history["eval"]] == [2, 4]
    assert results == whole.history["eval"][-1][1]


def test_running_an_early_stopped_run_again_trains_no_further(tmp_path, caplog):
    first = build_evaluated(tmp_path)
    final = first.train_and_evaluate()
    assert first.global_step == 4
    again = build_evaluated(tmp_path)
    assert again.train_and_evaluate() == final
    assert "checkpoint of step 4 records that a hook stopped the run" in caplog.text
    assert again.global_step == 4
    assert again.hooks[1].stopped_at == 4
    assert [step for step, _ in again.history["eval"]] == [2, 4]
    assert_same(params(again), params(first))


@pytest.mark.parametrize(
    ("settings", "last"),
    [
        # The last of train_steps is saved by save_every, and evaluated only as the end.
        ({"train_steps": 6, "save_every": 3, "eval_every": 4}, 6),
        # The data runs out (20 batches, one epoch) at a step save_every saved.
        ({"epochs": 1, "save_every": 10, "eval_every": 0}, 20),
    ],
)
def test_the_final_evaluation_is_in_the_checkpoint_of_the_last_step(tmp_path, settings, last):
    first = build_evaluated(tmp_path, **settings)
    final = first.train_and_evaluate()
    assert first.global_step == last
    evaluated = [step for step, _ in first.history["eval"]]
    assert evaluated[-1] == last
    # A second run finds the evaluation (and the hooks' reaction to it) in the checkpoint:
    # it neither evaluates the last step again (which would crash here) nor trains past it.
    again = build_evaluated(tmp_path, crash_at=last, **settings)
    assert again.train_and_evaluate() == final
    assert again.global_step == last
    assert [step for step, _ in again.history["eval"]] == evaluated
    assert again.hooks[1].best == first.hooks[1].best
    assert again.hooks[1].bad_evaluations == first.hooks[1].bad_evaluations
    assert_same(params(again), params(first))


def no_schedulers(trainer):
    trainer.lr_schedulers = []


def sgd(trainer):
    trainer.dense_optimizer = torch.optim.SGD(trainer.model.dense_parameters(), lr=0.1)


def float_counter(trainer):
    # An integer buffer that became float: loading would cast the counts without a word.
    trainer.model.seen = trainer.model.seen.float()


def no_sparse_optimizer(trainer):
    trainer.sparse_optimizer = None


@pytest.mark.parametrize(
    ("args", "change", "message"),
    [
        ({"gradient_accumulation_steps": 2}, None, r"gradient_accumulation_steps 1 \(now 2\)"),
        ({"seed": 5}, None, r"seed 0 \(now 5\)"),
        ({}, sgd, r"dense_optimizer torch\.optim\.adam\.Adam \(now torch\.optim\.sgd\.SGD\)"),
        (
            {},
            no_sparse_optimizer,
            r"sparse_optimizer torch\.optim\.sparse_adam\.SparseAdam \(now None\)",
        ),
        (
            {},
            no_schedulers,
            r"lr_schedulers \['torch\.optim\.lr_scheduler\.ExponentialLR'\] \(now \[\]\)",
        ),
        (
            {"rows": 300},
            None,
            r"model\.safetensors: dense parameter\(s\) do not fit the model's shapes or dtypes \(checkpoint vs model: seen \(600,\) vs \(300,\)\)",
        ),
        (
            {},
            float_counter,
            r"model\.safetensors: .* do not fit the model's shapes or dtypes \(checkpoint vs model: seen torch\.int64 vs torch\.float32\)",
        ),
    ],
)
def test_resuming_a_changed_setup_names_the_change_and_loads_nothing(
    tmp_path, args, change, message
):
    build(tmp_path, train_steps=4).train()
    trainer = build(tmp_path, train_steps=8, **args)
    if change is not None:
        change(trainer)
    before = params(trainer)
    with pytest.raises(CheckpointError, match=f"step-000000004.*{message}"):
        trainer.train()
    assert trainer.global_step == 0
    assert_same(params(trainer), before)


def test_resume_may_extend_the_run_and_change_how_often_it_saves(tmp_path):
    whole = build(tmp_path / "whole", epochs=3)
    whole.train()
    build(tmp_path / "cut", train_steps=10, save_every=5).train()
    extended = build(tmp_path / "cut", epochs=3, save_every=7, max_to_keep=5)
    extended.train()
    assert extended.global_step == whole.global_step == 60
    assert_same(params(extended), params(whole))


def test_resuming_past_the_end_of_changed_data_is_an_error(tmp_path):
    batches = list(ToyReader(600, 30))
    build(tmp_path, data=batches, train_steps=12, save_every=12).train()
    with pytest.raises(
        ConfigError, match="resuming at batch 12 of epoch 1, but train_data has only 5"
    ):
        build(tmp_path, data=batches[:5]).train()


def write(text):
    return {"dense": lambda d: (d / "a.txt").write_text(text)}


def test_a_failed_save_over_the_same_step_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, max_to_keep=1)
    path = manager.save(7, write("old"), {})
    real = os.replace

    def failing(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(CheckpointError, match=r"saving checkpoint of step 7 .* failed: disk gone"):
        manager.save(7, write("new"), {})
    monkeypatch.undo()
    assert manager.complete() == [path]
    assert (path / "dense" / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    manager.save(7, write("new"), {})
    assert (path / "dense" / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_save_that_cannot_make_its_directories_raises_checkpoint_error(tmp_path, monkeypatch):
    # The root under a regular file, then a temporary directory refused: each is the save's
    # CheckpointError, and the checkpoint written before stays.
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match=r"saving checkpoint of step 1 .* failed"):
        CheckpointManager(tmp_path / "file" / "checkpoints").save(1, write("x"), {})
    manager = CheckpointManager(tmp_path / "ok", max_to_keep=1)
    path = manager.save(1, write("old"), {})
    real = Path.mkdir

    def refused(self, *args, **kwargs):
        if self.name.startswith(".tmp-"):
            raise PermissionError(f"[Errno 1] Operation not permitted: '{self}'")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(CheckpointError, match=r"step 2 .* failed: \[Errno 1\] Operation not"):
        manager.save(2, write("new"), {})
    monkeypatch.undo()
    assert manager.complete() == [path]


@pytest.mark.parametrize("new_in_place", [False, True])
def test_a_save_killed_while_replacing_a_step_is_recovered(tmp_path, new_in_place):
    manager = CheckpointManager(tmp_path, max_to_keep=1)
    path = manager.save(7, write("old"), {})
    aside = tmp_path / ".replaced-step-000000007-4242"
    path.rename(aside)  # as if killed after moving the old checkpoint aside
    if new_in_place:
        CheckpointManager(tmp_path / "other").save(7, write("new"), {}).rename(path)
    assert manager.latest() == path
    assert (path / "dense" / "a.txt").read_text() == ("new" if new_in_place else "old")
    assert not aside.exists()


class Recorder(torch.nn.Module):
    """A linear model that records the ``"tag"`` of every batch it trains on."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(6, 1)
        self.tags = []

    def forward(self, batch):
        if self.training:
            self.tags.append(batch["tag"])
        logit = self.linear(batch["dense"])[:, 0]
        return torch.nn.functional.binary_cross_entropy_with_logits(logit, batch["click"])


def tagged(count, tag):
    """``count`` batches of 10 rows, the ``i``-th tagged ``f"{tag}{i}"``."""
    return [dict(b, tag=f"{tag}{i}") for i, b in enumerate(ToyReader(10 * count, 10, seed=3))]


def recorder_trainer(out, data, model=None, **args):
    model = model or Recorder()
    settings = {"output_dir": str(out), "device": "cpu"}
    return Trainer(
        model,
        TrainingArguments(**(settings | args)),
        train_data=data,
        dense_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
    )


def test_train_after_set_train_data_starts_the_new_data_even_after_a_save(tmp_path):
    # train() saves at its end (save_at_end, resume default): the next call must not restore
    # that checkpoint, whose data cursor belongs to the old data.
    trainer = recorder_trainer(tmp_path, tagged(3, "A"))
    trainer.train()
    trainer.set_train_data(tagged(5, "B"))
    trainer.train()
    assert trainer.model.tags == ["A0", "A1", "A2", "B0", "B1", "B2", "B3", "B4"]
    assert trainer.global_step == 8
    trainer.set_train_data(tagged(2, "C"))  # shorter than the cursor of the checkpoint of step 8
    trainer.train()
    assert trainer.model.tags[8:] == ["C0", "C1"]
    assert trainer.global_step == 10
    assert [p.name for p in trainer.checkpoints.complete()][-1] == "step-000000010"


def test_a_second_train_call_continues_from_memory_not_from_the_last_checkpoint(tmp_path):
    trainer = recorder_trainer(
        tmp_path, tagged(10, "A"), train_steps=5, save_every=2, save_at_end=False
    )
    trainer.train()
    trainer.dense_optimizer.param_groups[0]["lr"] = 0.01  # set in memory, after the last save
    trainer.args.train_steps = 6
    trainer.train()
    # Step 5 (after the checkpoint of step 4) is not trained again, and nothing is rolled back.
    assert trainer.model.tags == [f"A{i}" for i in range(6)]
    assert [step for step, _ in trainer.history["train"]] == [1, 2, 3, 4, 5, 6]
    assert trainer.dense_optimizer.param_groups[0]["lr"] == 0.01


def test_epochs_raised_between_train_calls_go_on_from_the_cursor(tmp_path):
    trainer = recorder_trainer(tmp_path, tagged(3, "A"), epochs=1)
    trainer.train()
    assert trainer.global_step == 3
    trainer.args.epochs = 3
    assert trainer.total_steps == 9
    trainer.train()
    assert trainer.model.tags == [f"A{i}" for i in range(3)] * 3
    assert trainer.global_step == 9
    # Epochs named by set_train_data are the new data's, whatever args.epochs reads.
    trainer.set_train_data(tagged(2, "B"), epochs=2)
    trainer.args.epochs = 1
    trainer.train()
    assert trainer.model.tags[9:] == ["B0", "B1", "B0", "B1"]
    # A one-shot iterator takes one pass: raising epochs for it is refused when train() starts.
    trainer.set_train_data(iter(tagged(2, "C")))
    trainer.args.epochs = 2
    with pytest.raises(ConfigError, match="one-shot iterator"):
        trainer.train()


def test_set_train_data_before_the_first_train_resumes_all_but_the_cursor(tmp_path):
    first = recorder_trainer(tmp_path, tagged(5, "A"), train_steps=3)
    first.train()  # the checkpoint of step 3 has consumed 3 batches of the A data
    again = recorder_trainer(tmp_path, tagged(5, "A"))
    again.set_train_data(tagged(2, "B"))
    again.train()
    assert again.model.tags == ["B0", "B1"]
    assert again.global_step == 5
    assert [step for step, _ in again.history["train"]] == [1, 2, 3, 4, 5]


class Flaky(Recorder):
    """Raises once, in its ``fail_at``-th training forward (a transient error in a step)."""

    def __init__(self, fail_at):
        super().__init__()
        self.fail_at, self.calls = fail_at, 0

    def forward(self, batch):
        if self.training:
            self.calls += 1
            if self.calls == self.fail_at:
                raise RuntimeError("transient failure")
        return super().forward(batch)


def test_a_call_after_a_step_cut_short_does_not_add_its_gradients_twice(tmp_path):
    # The first micro-batch's gradient of the step that raised was kept, and the next call
    # (continuing from memory) took that batch again: it counted twice.
    def run(out, fail_at):
        torch.manual_seed(0)
        model = Flaky(fail_at)
        args = {"train_steps": 4, "save_every": 1, "gradient_accumulation_steps": 2}
        trainer = recorder_trainer(out, tagged(8, "A"), model, **args)
        if fail_at:
            with pytest.raises(RuntimeError, match="transient failure"):
                trainer.train()
            assert trainer.global_step == 2
        trainer.train()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(run(tmp_path / "a", None), run(tmp_path / "b", 6))  # step 3, batch 2


def test_restore_after_a_hook_stopped_the_run_trains_again(tmp_path):
    stop = EarlyStopping("loss", mode="min", patience=2, min_delta=100.0)
    data = tagged(6, "A")
    trainer = recorder_trainer(
        tmp_path, data, train_steps=6, save_every=1, eval_every=1, max_to_keep=10
    )
    trainer.hooks, trainer.eval_data = [stop], data
    trainer.train_and_evaluate()
    assert trainer.global_step == 3  # stopped there
    trainer.restore(trainer.checkpoints.path_for(1))  # written before the stop
    trainer.train()
    assert trainer.global_step == 6


class BestLoss(Hook):
    """Keeps the best loss as a NumPy scalar once ``numpy_from`` steps are trained."""

    def __init__(self, numpy_from):
        self.best, self.numpy_from = None, numpy_from

    def on_step_end(self, trainer, logs):
        best = logs["loss"] if self.best is None else min(self.best, logs["loss"])
        numpy = pytest.importorskip("numpy")
        self.best = numpy.float64(best) if trainer.global_step >= self.numpy_from else best

    def state_dict(self):
        return {"best": self.best}

    def load_state_dict(self, state):
        self.best = state["best"]


def test_state_a_resume_could_not_load_fails_the_save_and_names_the_entry(tmp_path):
    trainer = build(tmp_path, train_steps=4, save_every=2, epochs=1)
    trainer.hooks = [BestLoss(numpy_from=3)]
    with pytest.raises(
        CheckpointError,
        match=r"saving checkpoint of step 4 .* failed: the state written to trainer/state\.pt "
        r"could not be loaded back: hooks\['BestLoss'\]\['best'\] is a numpy\.float64, which "
        r"torch\.load\(weights_only=True\) refuses",
    ):
        trainer.train()
    root = trainer.checkpoints.root
    assert [p.name for p in root.iterdir()] == ["step-000000002"]
    resumed = build(tmp_path, epochs=1)
    resumed.hooks = [BestLoss(numpy_from=100)]
    assert resumed.restore() == root / "step-000000002"
    assert isinstance(resumed.hooks[0].best, float)


def test_a_new_run_is_refused_in_a_directory_of_another_runs_checkpoints(tmp_path):
    build(tmp_path, train_steps=6, save_every=2, max_to_keep=2).train()
    root = tmp_path / "checkpoints"
    before = sorted(p.name for p in root.iterdir())
    fresh = build(tmp_path, train_steps=2, resume=False, max_to_keep=2)
    message = r"already holds checkpoints of another run \(step-000000004, step-000000006"
    with pytest.raises(ConfigError, match=message):
        fresh.train()
    with pytest.raises(ConfigError, match=message):
        fresh.save()
    assert fresh.global_step == 0
    assert sorted(p.name for p in root.iterdir()) == before
    # In a directory of its own a run with resume=False trains, saves and trains on.
    own = build(tmp_path / "own", train_steps=2, save_every=1, resume=False)
    own.train()
    own.args.train_steps = 3
    own.train()
    assert [p.name for p in own.checkpoints.complete()][-1] == "step-000000003"


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path, caplog):
    trainer = build(tmp_path, train_steps=8, save_every=2, max_to_keep=2, epochs=1)
    trainer.train()
    root = trainer.checkpoints.root
    assert [p.name for p in trainer.checkpoints.complete()] == ["step-000000006", "step-000000008"]
    # Going back to step 6 and saving step 7: the lower step is the one just written.
    back = build(tmp_path, max_to_keep=2, epochs=1)
    back.restore(root / "step-000000006")
    with caplog.at_level("WARNING", logger="recis_train"):
        back.args.train_steps = 7
        back.train()
    assert back.global_step == 7
    assert [p.name for p in back.checkpoints.complete()] == ["step-000000007", "step-000000008"]
    assert "checkpoint step-000000007 is not the latest" in caplog.text
    assert "(later: step-000000008)" in caplog.text
    # The later steps stay whatever max_to_keep, and the warning names only steps that exist.
    manager = CheckpointManager(tmp_path / "manager", max_to_keep=1)
    manager.save(5, {}, {})
    manager.save(2, {}, {})
    caplog.clear()
    with caplog.at_level("WARNING", logger="recis_train"):
        manager.save(3, {}, {})
    assert [p.name for p in manager.complete()] == ["step-000000003", "step-000000005"]
    assert "(later: step-000000005)" in caplog.text
    # Back to step 2 of 2, 4 and 6 with max_to_keep=2: step 2 goes, 4 and 6 stay.
    manager = CheckpointManager(tmp_path / "back", max_to_keep=3)
    for step in (2, 4, 6):
        manager.save(step, {}, {})
    manager.max_to_keep = 2
    manager.save(3, {}, {})
    assert [p.name for p in manager.complete()] == [
        "step-000000003",
        "step-000000004",
        "step-000000006",
    ]


class StopAt(Hook):
    def __init__(self, step):
        self.step = step

    def on_save(self, trainer, path):
        if trainer.global_step == self.step:
            raise RuntimeError("preempted")


class RowModel(torch.nn.Module):
    """Records the rows of every batch it trains on, in order."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(1, 1)
        self.rows = []

    def forward(self, batch):
        (x,) = batch
        if self.training:
            self.rows += x[:, 0].long().tolist()
        return self.linear(x).pow(2).mean()


@pytest.mark.parametrize("own_generator", [False, True])
def test_resuming_a_shuffled_dataloader_mid_epoch_trains_the_uninterrupted_order(
    tmp_path, own_generator
):
    from torch.utils.data import DataLoader, TensorDataset

    def run(out, hooks=()):
        model = RowModel()
        loader = DataLoader(
            TensorDataset(torch.arange(16.0).reshape(16, 1)),
            batch_size=2,
            shuffle=True,
            generator=torch.Generator().manual_seed(7) if own_generator else None,
        )
        trainer = Trainer(
            model,
            TrainingArguments(output_dir=str(out), device="cpu", save_every=1, epochs=2),
            train_data=loader,
            dense_optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
            hooks=hooks,
        )
        with contextlib.suppress(RuntimeError):
            trainer.train()
        return model.rows

    whole = run(tmp_path / "whole")
    # Cut in the second epoch: its order follows from the RNG the first one advanced.
    first = run(tmp_path / "cut", [StopAt(11)])
    second = run(tmp_path / "cut")
    assert len(first) == 22
    assert first + second == whole
    assert sorted(whole[:16]) == sorted(whole[16:]) == list(range(16))


def test_a_call_after_a_hook_stopped_the_run_trains_no_further_until_new_data(tmp_path, caplog):
    trainer = build_evaluated(tmp_path)
    trainer.args.save_every, trainer.args.save_at_end = 0, False  # no checkpoint records it
    trainer.train_and_evaluate()
    assert trainer.global_step == 4
    with caplog.at_level("WARNING", logger="recis_train"):
        trainer.train_and_evaluate()
    assert trainer.global_step == 4
    assert "a hook stopped the run at step 4 in an earlier call" in caplog.text
    trainer.set_train_data(ToyReader(120, 30))
    trainer.train()
    assert trainer.global_step == 8


def test_a_checkpoint_is_on_the_disk_before_it_replaces_or_rotates_out_others(
    tmp_path, monkeypatch
):
    # Every file and directory of a checkpoint is flushed before its rename into place, and
    # the rename itself (the root directory) before an older checkpoint is deleted: a crash
    # right after could otherwise leave empty files and no complete checkpoint at all.
    import recis_train._checkpoint as ckpt_mod

    manager = CheckpointManager(tmp_path, max_to_keep=1)

    def writer(directory: Path) -> None:
        (directory / "inner").mkdir()
        (directory / "inner" / "state.bin").write_bytes(b"x" * 100)

    manager.save(1, {"part": writer}, {})
    events = []
    real_fsync, real_replace, real_rmtree = os.fsync, os.replace, ckpt_mod.shutil.rmtree

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    def rmtree(path, *args, **kwargs):
        events.append(("rmtree", str(path)))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", rmtree)
    for step in (2, 2):  # a new step (rotating step 1 out), then the same step replaced
        events.clear()
        final = manager.save(step, {"part": writer}, {})
        into_place = events.index(("replace", str(final)))
        flushed = {what for kind, what in events[:into_place] if kind == "fsync"}
        tmp_names = {Path(w).relative_to(tmp_path).parts[0] for w in flushed}
        assert len(tmp_names) == 1, flushed  # the temporary directory's
        tmp = tmp_path / tmp_names.pop()
        written = [tmp / p.relative_to(final) for p in final.rglob("*")] + [tmp]
        assert {str(p) for p in written} <= flushed, sorted(flushed)
        removals = [i for i, (kind, _) in enumerate(events) if kind == "rmtree" and i > into_place]
        assert removals, events
        assert ("fsync", str(tmp_path)) in events[into_place : removals[0]], events
    assert [p.name for p in manager.complete()] == ["step-000000002"]
