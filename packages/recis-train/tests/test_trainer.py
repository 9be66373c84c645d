"""The training loop: learning, accumulation, clipping, precision, errors, evaluation, hooks."""

from __future__ import annotations

import io
import json
import logging
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _toy import ToyModel, ToyReader, make_optimizers
from torch import nn

from recis_embedding import OptimizerError
from recis_train import (
    EarlyStopping,
    Hook,
    LoggingHook,
    ProfilerHook,
    TableStatsHook,
    Trainer,
    TrainingArguments,
    seed_everything,
)
from recis_train._data import DataStream
from recis_train._outputs import parse_output
from recis_train.exceptions import (
    ConfigError,
    MetricInputError,
    ModelOutputError,
    NonFiniteLossError,
)
from recis_train.metrics import AUROC, GAUC, LogLoss


def make_trainer(tmp_path, *, model=None, rows=1_000, batch=50, eval_rows=400, **kwargs):
    seed_everything(0)
    model = model or ToyModel(rows, tasks=kwargs.pop("tasks", ("click",)))
    dense, sparse = make_optimizers(model)
    defaults = {"output_dir": str(tmp_path), "device": "cpu", "save_at_end": False}
    args = TrainingArguments(**(defaults | kwargs.pop("args", {})))
    return Trainer(
        model,
        args,
        train_data=kwargs.pop("train_data", ToyReader(rows, batch)),
        eval_data=ToyReader(eval_rows, 100, seed=1),
        dense_optimizer=dense,
        sparse_optimizer=sparse,
        **kwargs,
    )


def test_trains_to_the_planted_signal(tmp_path):
    trainer = make_trainer(tmp_path, args={"epochs": 3})
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert trainer.global_step == 60
    assert after["auc"] > 0.8 > before["auc"] - 0.05
    assert after["loss"] < before["loss"]
    assert after["logloss"] == pytest.approx(after["loss"], rel=1e-4)
    assert int(trainer.model.seen.sum()) == 3 * 1_000


def test_multi_task_losses_weights_and_metrics(tmp_path):
    trainer = make_trainer(tmp_path, tasks=("click", "conv"), args={"train_steps": 5})
    logs = trainer.train()
    assert logs["loss"] == pytest.approx(logs["loss/click"] + 0.5 * logs["loss/conv"], rel=1e-5)
    results = trainer.evaluate()
    assert {"click/auc", "conv/auc", "click/logloss", "conv/calibration"} <= set(results)
    # Metrics equal those computed by hand over the same evaluation batches.
    model, auc = trainer.model.eval(), AUROC()
    with torch.no_grad():
        for batch in ToyReader(400, 100, seed=1):
            auc.update(model(batch)["predictions"]["conv"], batch["conv"])
    assert results["conv/auc"] == pytest.approx(auc.compute(), abs=1e-12)


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    finals = []
    for batch, accumulate in ((40, 1), (20, 2), (10, 4)):
        seed_everything(3)
        trainer = make_trainer(
            tmp_path / str(batch),
            model=ToyModel(0, dropout=0.0),
            batch=batch,
            args={"gradient_accumulation_steps": accumulate, "train_steps": 10},
        )
        trainer.train()
        finals.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    torch.testing.assert_close(finals[1], finals[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(finals[2], finals[0], rtol=1e-5, atol=1e-6)


def test_grad_clip_bounds_the_dense_gradient_norm(tmp_path):
    norms = []

    class Recorder(Hook):
        pass

    model = ToyModel(0)
    original = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, **kwargs):
        params = list(params)
        original(params, max_norm, **kwargs)
        norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))))

    trainer = make_trainer(tmp_path, model=model, args={"grad_clip": 0.01, "train_steps": 4})
    torch.nn.utils.clip_grad_norm_, saved = spy, torch.nn.utils.clip_grad_norm_
    try:
        trainer.train()
    finally:
        torch.nn.utils.clip_grad_norm_ = saved
    assert len(norms) == 4
    assert max(norms) <= 0.01 * (1 + 1e-4)


@pytest.mark.parametrize("precision", ["bf16"])
def test_mixed_precision_trains(tmp_path, precision):
    trainer = make_trainer(tmp_path, args={"mixed_precision": precision, "epochs": 2})
    logs = trainer.train()
    assert torch.isfinite(torch.tensor(logs["loss"]))
    assert trainer.evaluate()["auc"] > 0.75


def test_fp16_with_sparse_optimizer_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="mixed_precision 'fp16' needs loss scaling"):
        make_trainer(tmp_path, args={"mixed_precision": "fp16"})


class PoisonedModel(ToyModel):
    def forward(self, batch):
        out = super().forward(batch)
        if int(batch["row"][0]) == 150:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nan_loss_names_step_and_batch_and_keeps_parameters(tmp_path):
    snapshots = []

    class Snapshot(Hook):
        def on_step_end(self, trainer, logs):
            snapshots.append({k: v.clone() for k, v in trainer.model.named_parameters()})

    trainer = make_trainer(tmp_path, model=PoisonedModel(1_000, dropout=0.0), hooks=[Snapshot()])
    with pytest.raises(
        NonFiniteLossError,
        match=r"loss is nan at step 4 \(epoch 1 of 1, batch 4 of that epoch, micro-batch 1 of 1; "
        r"counted from 1\)",
    ):
        trainer.train()
    assert trainer.global_step == 3
    for name, value in trainer.model.named_parameters():
        assert torch.equal(value, snapshots[-1][name]), name
        assert value.grad is None, name


def test_a_sparse_step_refused_for_its_rate_leaves_the_dense_weights(tmp_path):
    # A scheduler takes the sparse rate to 0 after two steps; SparseFTRL needs lr > 0. The
    # dense optimizer steps first: it must not have moved the weights of a step that is then
    # refused and not counted (a checkpoint would label them with the step before).
    from _toy import TableModel

    import recis_embedding as emb

    seed_everything(0)
    model = TableModel()
    dense = torch.optim.SGD(model.mlp.parameters(), lr=0.1)
    sparse = emb.SparseFTRL(model, lr=0.1)
    schedule = torch.optim.lr_scheduler.LinearLR(sparse, 1.0, 0.0, total_iters=2)
    snapshots = []

    class Snapshot(Hook):
        def on_step_end(self, trainer, logs):
            snapshots.append({k: v.clone() for k, v in trainer.model.mlp.state_dict().items()})

    trainer = Trainer(
        model,
        TrainingArguments(output_dir=str(tmp_path), device="cpu", save_at_end=False),
        train_data=ToyReader(500, 25),
        dense_optimizer=dense,
        sparse_optimizer=sparse,
        lr_schedulers=[schedule],
        hooks=[Snapshot()],
    )
    with pytest.raises(OptimizerError, match=r"SparseFTRL: lr must be > 0, got 0.0 at this step"):
        trainer.train()
    assert trainer.global_step == len(snapshots) == 2
    for key, value in trainer.model.mlp.state_dict().items():
        assert torch.equal(value, snapshots[-1][key]), key


def test_an_index_a_cuda_kernel_met_out_of_range_ends_the_step(tmp_path, monkeypatch):
    # On CUDA the kernels skip an out-of-range index and record it; the trainer reads the
    # record where it already waits for the step's loss and raises it, keeping the parameters.
    import recis_kernels

    checked = []

    def recorded(device):
        checked.append(device)
        raise recis_kernels.IndexOutOfRangeError("RowStore.gather: rows[1] = 12 is out of range")

    monkeypatch.setattr(recis_kernels, "check_index_errors", recorded)
    trainer = make_trainer(tmp_path)
    output = parse_output({"loss": torch.tensor(0.5, requires_grad=True)})
    cursor = {"epoch": 0, "consumed": 1}
    trainer._check_finite(output, 0, 1, cursor)  # on the CPU there is nothing to read
    assert checked == []
    trainer.device = torch.device("cuda", 0)
    with pytest.raises(recis_kernels.IndexOutOfRangeError, match=r"rows\[1\] = 12"):
        trainer._check_finite(output, 0, 1, cursor)
    assert checked == [torch.device("cuda", 0)]


def test_an_index_a_cuda_kernel_met_during_evaluation_fails_the_evaluation(tmp_path, monkeypatch):
    import recis_kernels

    trainer = make_trainer(tmp_path)
    assert trainer._recorded_index_error() is None  # nothing is recorded on the CPU
    error = recis_kernels.IndexOutOfRangeError("segment_reduce: offsets[3] = 9 is out of range")
    monkeypatch.setattr(trainer, "_recorded_index_error", lambda: error)
    with pytest.raises(recis_kernels.IndexOutOfRangeError, match=r"offsets\[3\] = 9"):
        trainer.evaluate()
    assert trainer.history["eval"] == []  # no results computed on the skipped index's zeros


class BadModel(nn.Module):
    def __init__(self, output):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.output = output

    def forward(self, batch):
        return self.output(self.w)


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (lambda w: [w.sum()], "model must return a loss tensor or a dict"),
        (lambda w: w.repeat(3), r"model output 'loss' must be a scalar tensor, got \(3,\)"),
        (lambda w: {"score": w.sum()}, "model output dict needs 'loss' or 'losses'"),
        (lambda w: {"losses": {"a": w.sum()}, "weights": {"b": 1.0}}, r"unknown task\(s\) \['b'\]"),
        (lambda w: {"loss": w.sum(), "predictions": w}, r"predictions without labels"),
    ],
)
def test_bad_model_output_is_named(tmp_path, output, message):
    model = BadModel(output)
    trainer = Trainer(
        model,
        TrainingArguments(output_dir=str(tmp_path), device="cpu"),
        train_data=[{"x": torch.zeros(2)}],
        dense_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
    )
    with pytest.raises(ModelOutputError, match=message):
        trainer.train()


def test_early_stopping_stops_when_the_metric_stalls(tmp_path):
    stop = EarlyStopping("auc", patience=2, min_delta=1.0)  # nothing improves by a whole unit
    trainer = make_trainer(tmp_path, args={"epochs": 5, "eval_every": 3}, hooks=[stop])
    trainer.train_and_evaluate()
    assert stop.stopped_at == 9
    assert trainer.global_step == 9
    assert [step for step, _ in trainer.history["eval"]] == [3, 6, 9]
    with pytest.raises(ConfigError, match="metric 'gauc' not in evaluation results"):
        EarlyStopping("gauc").on_evaluate(trainer, {"auc": 0.5})


def test_logging_hook_prints_plain_lines_when_not_a_tty(tmp_path):
    stream = io.StringIO()
    trainer = make_trainer(
        tmp_path, args={"train_steps": 6, "log_every": 3}, hooks=[LoggingHook(stream=stream)]
    )
    trainer.train()
    trainer.evaluate()
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines[:2]] == ["3/6", "6/6"]
    assert "samples/s" in lines[0]
    assert "eta" in lines[0]
    assert "\r" not in stream.getvalue()
    assert lines[2].startswith("eval at step 6: loss ")


def test_logging_hook_leaves_evaluation_and_saving_out_of_samples_per_s(monkeypatch):
    """The rate covers training time only; the ETA is the run's wall clock per step."""
    clock = [0.0]
    monkeypatch.setattr("recis_train._hooks.time.perf_counter", lambda: clock[0])
    stream = io.StringIO()
    hook = LoggingHook(every=4, stream=stream)
    trainer = SimpleNamespace(global_step=0, total_steps=8, args=SimpleNamespace(log_every=4))
    logs = {"loss": 0.5, "lr": 0.1, "samples": 100}

    def step(at):
        clock[0] = at
        trainer.global_step += 1
        hook.on_step_end(trainer, logs)

    hook.on_train_begin(trainer)
    step(1.0)
    step(2.0)
    clock[0] = 12.0  # ten seconds of evaluation after step 2 ...
    hook.on_evaluate(trainer, {"auc": 0.7})
    clock[0] = 14.0  # ... then two of writing a checkpoint
    hook.on_save(trainer, "ckpt")
    step(15.0)
    step(16.0)
    line = stream.getvalue().splitlines()[1]
    # 400 rows in 4 s of training (16 s of wall clock); 4 steps left at 16 s / 4 steps.
    assert "samples/s 100 " in line
    assert line.endswith("eta 0m16s")
    # The next window starts clean: 4 steps of 2 s each, no pause.
    for at in (18.0, 20.0, 22.0, 24.0):
        step(at)
    line = stream.getvalue().splitlines()[2]
    assert "samples/s 50 " in line
    assert line.endswith("eta 0m00s")
    # An evaluation that a hook earlier in the list ran within step 9, before this hook saw
    # the step, began at an unknown point of it: it counts as training time, not as a pause.
    trainer.total_steps = 12
    hook.on_train_begin(trainer)  # at 24 s
    for at in (25.0, 26.0, 27.0):
        step(at)
    trainer.global_step += 1
    clock[0] = 38.0
    hook.on_evaluate(trainer, {"auc": 0.7})
    trainer.global_step -= 1
    step(39.0)
    assert "samples/s 27 " in stream.getvalue().splitlines()[-1]  # 400 rows in 15 s


def test_table_stats_hook_reports_growth_and_hit_rate(tmp_path):
    class Table:
        def __init__(self):
            self.rows = 0

        def stats(self):
            self.rows += 10
            return {"rows": self.rows, "lookups": 100, "hits": 75}

    class WithTable(ToyModel):
        def __init__(self):
            super().__init__(0)
            self.tables = {"user": Table()}

    stream = io.StringIO()
    hook = TableStatsHook(every=2, stream=stream)
    trainer = make_trainer(tmp_path, model=WithTable(), args={"train_steps": 4}, hooks=[hook])
    trainer.train()
    assert [step for step, _ in hook.history] == [2, 4]
    assert hook.history[1][1]["user"]["rows"] == 20
    assert (
        "table user at step 4: rows 20 lookups 100 hits 75 growth +10 hit_rate 0.750"
        in stream.getvalue()
    )


def test_gauc_needs_groups_and_uses_them(tmp_path):
    class Grouped(ToyModel):
        def forward(self, batch):
            return super().forward(batch) | {"groups": batch["ids"]}

    trainer = make_trainer(
        tmp_path,
        model=Grouped(0),
        metrics={"gauc": GAUC, "logloss": LogLoss},
        args={"train_steps": 3},
    )
    trainer.train()
    assert 0.0 <= trainer.evaluate()["gauc"] <= 1.0
    plain = make_trainer(tmp_path / "p", metrics={"gauc": GAUC})
    with pytest.raises(ConfigError, match=r"'gauc' \(GAUC\) needs the model to return 'groups'"):
        plain.evaluate()


def test_rejects_what_is_not_a_model_or_optimizer(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), device="cpu")
    with pytest.raises(ConfigError, match=r"model must be a torch\.nn\.Module, got function"):
        Trainer(lambda b: b, args, train_data=[], dense_optimizer=None)  # type: ignore[arg-type]
    model = ToyModel(0)
    with pytest.raises(
        ConfigError, match=r"dense_optimizer must be a torch\.optim\.Optimizer or None, got list"
    ):
        Trainer(model, args, train_data=[], dense_optimizer=[])  # type: ignore[arg-type]


def test_profiler_hook_writes_a_trace_of_the_chosen_steps(tmp_path):
    hook = ProfilerHook(str(tmp_path / "prof"), start=2, steps=2)
    trainer = make_trainer(tmp_path, args={"train_steps": 5}, hooks=[hook])
    trainer.train()
    trace = json.loads((tmp_path / "prof" / "trace-step2.json").read_text())
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert any("addmm" in name or "linear" in name for name in names)
    assert "Name" in hook.table
    with pytest.raises(
        ConfigError, match="ProfilerHook: start must be an int of at least 1, got 0"
    ):
        ProfilerHook(str(tmp_path), start=0, steps=2)


class _Labelled(nn.Module):
    """Marks its training and evaluation forwards in profiler traces."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, batch):
        with torch.profiler.record_function("TRAIN_FORWARD" if self.training else "EVAL_FORWARD"):
            logit = self.lin(batch["x"])[:, 0]
        loss = nn.functional.binary_cross_entropy_with_logits(logit, batch["y"])
        return {"loss": loss, "predictions": torch.sigmoid(logit).detach(), "labels": batch["y"]}


def _labelled_batches(n: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(8, 4, generator=gen), "y": torch.tensor([0.0, 1.0] * 4)}] * n


@pytest.mark.parametrize(("batches", "start", "expected"), [(10, 5, (3, 0)), (5, 6, None)])
def test_profiler_hook_traces_its_steps_only(tmp_path, batches, start, expected):
    # The window opened after step start - 1's hooks, before its evaluation and checkpoint,
    # which the trace then held; a start past the data's end wrote a trace of no step.
    model = _Labelled()
    hook = ProfilerHook(str(tmp_path / "prof"), start=start, steps=3)
    trainer = Trainer(
        model,
        TrainingArguments(
            output_dir=str(tmp_path / "run"), device="cpu", eval_every=4, save_every=4
        ),
        train_data=_labelled_batches(batches),
        eval_data=_labelled_batches(1),
        dense_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        hooks=[hook],
    )
    trainer.train_and_evaluate()
    if expected is None:
        assert hook.trace_path is None
        assert not (tmp_path / "prof").exists()
        return
    events = json.loads(Path(hook.trace_path).read_text())["traceEvents"]
    counts = tuple(
        sum(e.get("name") == name for e in events) for name in ("TRAIN_FORWARD", "EVAL_FORWARD")
    )
    assert counts == expected


def test_deterministic_algorithms_are_asked_for_during_the_run_only(tmp_path):
    # The setting is the process's: a deterministic run left it on for every later run (the
    # next stage, another trainer) that did not ask for it.
    assert not torch.are_deterministic_algorithms_enabled()
    seen = []

    class Probe(Hook):
        def on_step_end(self, trainer, logs):
            seen.append(torch.are_deterministic_algorithms_enabled())

    for flag in (True, False):
        trainer = make_trainer(
            tmp_path / str(flag), args={"train_steps": 1, "deterministic": flag}, hooks=[Probe()]
        )
        trainer.train()
        assert not torch.are_deterministic_algorithms_enabled()
    assert seen == [True, False]


def test_set_train_data_trains_the_next_call_on_new_data_from_its_start(tmp_path):
    trainer = make_trainer(tmp_path, rows=500, args={"train_steps": 4})
    trainer.train()  # 4 of the 10 batches of the first data
    seen = int(trainer.model.seen.sum())
    trainer.set_train_data(ToyReader(300, 50, seed=2))
    trainer.args.train_steps = 100
    trainer.train()
    # All 6 batches of the new data, from its first row, and the step count carries on.
    assert trainer.global_step == 4 + 6
    assert int(trainer.model.seen.sum()) == seen + 300
    assert trainer.stream.state_dict()["consumed"] == 6


def test_warns_when_the_data_runs_out_before_train_steps(tmp_path, caplog):
    trainer = make_trainer(tmp_path, rows=200, batch=50, args={"train_steps": 10, "epochs": 2})
    with caplog.at_level("WARNING", logger="recis_train"):
        trainer.train()
    assert trainer.global_step == 8
    assert "the training data ran out at step 8 of train_steps=10 (2 pass(es)" in caplog.text


def test_warns_when_the_data_gives_no_batches(tmp_path, caplog):
    trainer = make_trainer(tmp_path, train_data=[])
    with caplog.at_level("WARNING", logger="recis_train"):
        trainer.train()
    assert trainer.global_step == 0
    assert "train() ran no step: the training data gave no batches" in caplog.text
    caplog.clear()
    done = make_trainer(tmp_path / "done", rows=100, batch=50)
    done.train()
    with caplog.at_level("WARNING", logger="recis_train"):
        done.train()  # the one pass is over: nothing left to train on
    assert "the run had finished its 1 pass(es) over the data already" in caplog.text


def test_no_warning_when_train_steps_are_reached_or_a_hook_stops(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="recis_train"):
        make_trainer(tmp_path, rows=200, batch=50, args={"train_steps": 4}).train()
        make_trainer(tmp_path / "all", rows=200, batch=50).train()
    assert "ran out" not in caplog.text
    assert "no step" not in caplog.text


class IterableOnce:
    """An iterable (not an iterator) that gives its batches on the first iteration only."""

    def __init__(self, batches):
        self.batches = iter(batches)

    def __iter__(self):
        return self.batches


def test_a_one_shot_iterator_for_more_than_one_epoch_is_refused_up_front(tmp_path):
    batches = list(ToyReader(200, 50))
    with pytest.raises(ConfigError, match=r"one-shot iterator \(generator\) but epochs=2"):
        make_trainer(tmp_path, train_data=(b for b in batches), args={"epochs": 2})
    trainer = make_trainer(tmp_path, train_data=(b for b in batches))
    trainer.train()
    assert trainer.global_step == 4  # one epoch of a generator is fine


def test_a_one_shot_iterable_is_an_error_when_its_second_epoch_is_empty(tmp_path):
    trainer = make_trainer(
        tmp_path, train_data=IterableOnce(ToyReader(200, 50)), args={"epochs": 2}
    )
    with pytest.raises(ConfigError, match="no batch in epoch 2 of 2 after giving some in epoch 1"):
        trainer.train()
    assert trainer.global_step == 4


def test_an_evaluation_batch_without_rows_weighs_nothing(tmp_path):
    # Its mean loss is NaN (a mean over no rows): times 0 rows it made the evaluation's NaN.
    trainer = make_trainer(tmp_path, tasks=("click", "conv"))
    data = list(ToyReader(400, 100, seed=1))
    empty = {k: v[:0] for k, v in data[0].items()}
    want = trainer.evaluate(data)
    got = trainer.evaluate([*data[:2], empty, *data[2:]])
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key


def test_an_evaluation_without_rows_warns_that_its_results_are_empty(tmp_path, caplog):
    trainer = make_trainer(tmp_path, tasks=("click", "conv"))
    empty = {k: v[:0] for k, v in next(iter(ToyReader(100, 100))).items()}
    with caplog.at_level(logging.WARNING, logger="recis_train"):
        assert trainer.evaluate([]) == {}
        got = trainer.evaluate([empty, empty])  # metrics of no rows are NaN, no loss
        assert "loss" not in got
        assert all(math.isnan(v) for v in got.values())
    warned = [r.getMessage() for r in caplog.records if "read no rows" in r.getMessage()]
    assert warned == ["evaluation at step 0 read no rows from list: no loss or metrics"] * 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="recis_train"):
        assert "loss" in trainer.evaluate(list(ToyReader(100, 50)))
    assert not [r for r in caplog.records if "read no rows" in r.getMessage()]


@pytest.mark.parametrize("kind", ["numpy", "list"])
def test_batches_of_numpy_arrays_or_lists_count_their_rows(tmp_path, kind, caplog):
    # A batch with no tensor column counted 0 rows: evaluations lost their loss and warned
    # that they read no rows, training logged 0 samples.
    class Converting(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def forward(self, batch):
            x = torch.as_tensor(np.asarray(batch["x"]), dtype=torch.float32)
            y = torch.as_tensor(np.asarray(batch["y"]), dtype=torch.float32)
            logit = self.lin(x)[:, 0]
            loss = nn.functional.binary_cross_entropy_with_logits(logit, y)
            return {"loss": loss, "predictions": torch.sigmoid(logit), "labels": y}

    rng = np.random.default_rng(0)
    batches = []
    for _ in range(4):
        x = rng.standard_normal((4, 2))
        y = (x[:, 0] > 0).astype(np.float64)
        batches.append({"x": x, "y": y} if kind == "numpy" else {"x": x.tolist(), "y": y.tolist()})
    model = Converting()
    trainer = Trainer(
        model,
        TrainingArguments(output_dir=str(tmp_path), device="cpu", save_at_end=False, log_every=4),
        train_data=batches,
        dense_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
    )
    with caplog.at_level(logging.WARNING, logger="recis_train"):
        trainer.train()
        results = trainer.evaluate(batches)
    assert "loss" in results
    assert not [r for r in caplog.records if "read no rows" in r.getMessage()]
    assert trainer.history["train"][-1][1]["samples"] == 4


def test_a_metric_refusing_an_evaluation_batch_names_the_batch_and_result(tmp_path):
    trainer = make_trainer(tmp_path, tasks=("click", "conv"))
    data = list(ToyReader(400, 100, seed=1))
    data[2]["conv"] = data[2]["conv"].clone()
    data[2]["conv"][5] = float("nan")  # an unknown label left in, not masked
    with pytest.raises(
        MetricInputError,
        match=r"evaluation batch 2 \(counting from 0\), metric 'conv/auc': AUROC: labels must "
        r"be 0 or 1, found nan",
    ):
        trainer.evaluate(data)


def test_a_one_shot_eval_iterator_is_refused_for_a_second_evaluation(tmp_path):
    trainer = make_trainer(tmp_path, args={"train_steps": 4, "eval_every": 2})
    trainer.eval_data = (b for b in ToyReader(200, 100, seed=1))
    with pytest.raises(ConfigError, match=r"one-shot iterator \(generator\) but eval_every=2"):
        trainer.train_and_evaluate()
    assert trainer.global_step == 0
    assert "auc" in trainer.evaluate()
    with pytest.raises(
        ConfigError, match=r"one-shot iterator .* that an earlier evaluation consumed"
    ):
        trainer.evaluate()
    assert trainer.evaluate(list(ToyReader(200, 100, seed=1)))["auc"] > 0  # explicit data is fine


class StepOnly:
    def __init__(self):
        self.global_step, self.should_stop = 0, False


@pytest.mark.parametrize("mode", ["max", "min"])
def test_early_stopping_never_takes_nan_as_the_best_value(mode):
    stop, trainer = EarlyStopping("auc", mode=mode, patience=2), StepOnly()
    sign = 1 if mode == "max" else -1
    for step, value in [(1, float("nan")), (2, 0.70 * sign), (3, 0.75 * sign), (4, float("nan"))]:
        trainer.global_step = step
        stop.on_evaluate(trainer, {"auc": value})
    assert stop.best == 0.75 * sign
    assert stop.bad_evaluations == 1
    assert not trainer.should_stop
    trainer.global_step = 5
    stop.on_evaluate(trainer, {"auc": float("nan")})
    assert trainer.should_stop
    assert stop.stopped_at == 5


@pytest.mark.parametrize(
    ("batches", "epochs", "accumulation"),
    [(13, 3, 2), (13, 1, 2), (12, 3, 5), (7, 2, 1), (5, 1, 8)],
)
def test_total_steps_is_the_number_of_steps_trained(tmp_path, batches, epochs, accumulation):
    trainer = make_trainer(
        tmp_path,
        rows=batches * 10,
        batch=10,
        args={"epochs": epochs, "gradient_accumulation_steps": accumulation},
    )
    expected = trainer.total_steps
    trainer.train()
    assert trainer.global_step == expected


def test_progress_counts_to_the_end_of_the_data_when_train_steps_is_beyond_it(tmp_path):
    # 10 batches, one epoch: the run ends at step 10, not at train_steps=100.
    out = io.StringIO()
    trainer = make_trainer(
        tmp_path,
        rows=100,
        batch=10,
        args={"train_steps": 100, "log_every": 5},
        hooks=[LoggingHook(stream=out)],
    )
    assert trainer.total_steps == 10
    trainer.train()
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["5/10", "10/10"]
    assert " eta 0m00s" in lines[-1]
    assert make_trainer(tmp_path, rows=100, batch=10, args={"train_steps": 4}).total_steps == 4


@pytest.mark.parametrize("device", ["mps", "xpu", "xpu:0"])
def test_a_device_torch_does_not_have_is_a_config_error(tmp_path, device, monkeypatch):
    for backend in ("mps", "xpu"):
        if hasattr(torch, backend):
            monkeypatch.setattr(getattr(torch, backend), "is_available", lambda: False)
    with pytest.raises(ConfigError, match=f"device '{device}' was asked for but torch sees no"):
        make_trainer(tmp_path, args={"device": device})


def test_a_cuda_index_beyond_the_devices_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(
        ConfigError, match=r"'cuda:2' .* torch sees 2 cuda device\(s\) \(indices 0 to 1\)"
    ):
        make_trainer(tmp_path, args={"device": "cuda:2"})


def test_a_metric_instance_instead_of_a_factory_is_refused_up_front(tmp_path):
    with pytest.raises(ConfigError, match=r"metrics: 'auc' must be a zero-argument function"):
        make_trainer(tmp_path, metrics={"auc": AUROC("thresholded")})
    trainer = make_trainer(tmp_path, metrics={"auc": lambda: AUROC("thresholded")})
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first["auc"] == second["auc"]  # each evaluation counts its own rows only


def test_rng_state_of_more_gpus_than_visible_restores_those_there(monkeypatch) -> None:
    # A checkpoint saved with 2 visible GPUs resumed where 1 is visible: the first GPU's state
    # is restored, the second has nowhere to go (torch's set_rng_state_all raised IndexError).
    import torch

    from recis_train._state import rng_state, set_rng_state

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.append((i, s)))

    def refuse(states):
        raise IndexError("device 1 of 1")

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", refuse)
    state = rng_state()
    saved = [torch.full((8,), 1, dtype=torch.uint8), torch.full((8,), 2, dtype=torch.uint8)]
    state["cuda"] = saved
    set_rng_state(state)
    assert [i for i, _ in restored] == [0]
    assert torch.equal(restored[0][1], saved[0])


class Fixed:
    """A metric whose ``compute()`` returns ``value`` (sklearn's return NumPy scalars)."""

    def __init__(self, value):
        self.value = value

    def update(self, preds, labels):
        pass

    def compute(self):
        return self.value


def test_metric_results_are_stored_as_floats_so_their_checkpoints_resume(tmp_path):
    numpy = pytest.importorskip("numpy")
    values = {
        "np64": numpy.float64(0.25),
        "np32": numpy.float32(0.5),
        "int": numpy.int64(3),
        "array": numpy.array([0.125]),
        "tensor": torch.tensor(0.75),
    }
    metrics = {name: (lambda v=v: Fixed(v)) for name, v in values.items()}
    args = {"train_steps": 2, "save_at_end": True}
    results = make_trainer(tmp_path, metrics=metrics, args=args).train_and_evaluate()
    assert {k: results[k] for k in values} == {
        "np64": 0.25,
        "np32": 0.5,
        "int": 3.0,
        "array": 0.125,
        "tensor": 0.75,
    }
    assert all(type(results[k]) is float for k in values)
    resumed = make_trainer(tmp_path, metrics=metrics, args=args | {"train_steps": 3})
    resumed.train()  # the checkpoint of step 2 holds the evaluation in its history
    assert resumed.global_step == 3
    assert resumed.history["eval"][0][1]["np64"] == 0.25


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("0.5", "str '0.5'"),
        (1 + 2j, "complex (1+2j)"),
        (None, "NoneType None"),
        (torch.tensor([0.1, 0.2]), "torch.Tensor of shape (2,)"),
    ],
)
def test_a_metric_result_that_is_not_a_real_number_is_named(tmp_path, value, shown):
    trainer = make_trainer(tmp_path, metrics={"odd": lambda: Fixed(value)})
    expected = f"metric 'odd': compute() returned {shown}, expected a real number"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        trainer.evaluate()


def test_a_generator_goes_on_where_it_stands_in_a_second_train_call(tmp_path):
    batches = list(ToyReader(500, 50))  # 10 batches, rows counted by the model
    trainer = make_trainer(tmp_path, rows=500, train_data=iter(batches), args={"train_steps": 3})
    trainer.train()
    trainer.args.train_steps = 6
    trainer.train()
    assert trainer.model.seen.tolist() == [1] * 300 + [0] * 200


def test_a_generator_gives_again_the_batches_taken_but_not_trained():
    stream = DataStream((i for i in range(6)), 1)
    batches = iter(stream)
    taken = []
    for _ in range(3):  # the third is taken ahead, as for the copy to a GPU
        taken.append((next(batches), stream.state_dict()))
    stream.trained(taken[1][1])
    batches.close()
    stream.load_state_dict(taken[1][1])  # the trainer rewinds to the last batch trained
    assert list(stream) == [2, 3, 4, 5]
    stream.load_state_dict({"epoch": 0, "consumed": 1, "reader": None})
    with pytest.raises(
        ConfigError,
        match=r"one-shot iterator \(generator\) that has given 6 batch\(es\); it cannot go back "
        r"to batch 2",
    ):
        list(stream)


class _PersistentLoader(list):
    """Batches in a list, with the attributes of a DataLoader keeping its workers."""

    persistent_workers = True
    num_workers = 2


def test_resuming_a_persistent_worker_loader_in_a_later_epoch_warns(caplog):
    # Its later epochs' orders come from an iterator the first epoch built (which drew a seed
    # for its workers first): the replayed random state cannot give them again.
    first = DataStream(_PersistentLoader(range(4)), 3)
    taken = iter(first)
    for _ in range(6):  # into epoch 2
        next(taken)
    cursor = first.state_dict()
    assert (cursor["epoch"], cursor["consumed"]) == (1, 2)
    resumed = DataStream(_PersistentLoader(range(4)), 3)
    resumed.load_state_dict(cursor)
    with caplog.at_level("WARNING", logger="recis_train"):
        assert list(resumed)[:2] == [2, 3]
    assert "resuming in epoch 2 of a DataLoader with persistent_workers=True" in caplog.text
    caplog.clear()
    again = DataStream(_PersistentLoader(range(4)), 3)  # within its first epoch: exact
    again.load_state_dict({"epoch": 0, "consumed": 1, "reader": None})
    with caplog.at_level("WARNING", logger="recis_train"):
        assert list(again)[:3] == [1, 2, 3]
    assert not caplog.text


def test_batches_are_moved_to_a_cpu_device_when_a_column_is_elsewhere():
    """``device="cpu"`` leaves host batches as they are (no copy), and moves a batch holding a
    tensor elsewhere (a CUDA column from the caller's own loader) rather than hand the model
    mixed devices. Checked with meta tensors, which stand for a device that is not the host."""
    from recis_kernels import RaggedTensor
    from recis_train._data import _off_host, move_to

    host = {"x": torch.ones(3), "seq": RaggedTensor(torch.arange(3), torch.tensor([0, 1, 3]))}
    assert move_to(host, torch.device("cpu")) is host
    elsewhere = torch.empty(3, device="meta")
    for batch in ({"x": elsewhere}, [torch.ones(1), (elsewhere,)], elsewhere):
        assert _off_host(batch)
    ragged = RaggedTensor(
        torch.empty(3, device="meta"),
        torch.empty(3, dtype=torch.int64, device="meta"),
        validate=False,
    )
    assert _off_host({"seq": ragged})
    assert not _off_host(host)
    assert not _off_host({"n": 3, "names": ["a", "b"]})
