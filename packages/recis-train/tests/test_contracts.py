"""Promises of the trainer's contracts: refused resumes load nothing, model outputs and
pipeline settings are checked where they are given, and the progress total counts on."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from recis_train import (
    EarlyStopping,
    Hook,
    LoggingHook,
    MultiStage,
    MultiTask,
    ProfilerHook,
    Stage,
    TableStatsHook,
    Task,
    Trainer,
    TrainingArguments,
    parse_output,
)
from recis_train.exceptions import CheckpointError, ConfigError, ModelOutputError
from recis_train.metrics import AUROC


def _batches(rows: int = 40, size: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, generator=gen)
    y = (x[:, 0] > 0).float()
    return [{"x": x[i : i + size], "y": y[i : i + size]} for i in range(0, rows, size)]


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, batch):
        logit = self.lin(batch["x"])[:, 0]
        return {
            "loss": nn.functional.binary_cross_entropy_with_logits(logit, batch["y"]),
            "predictions": torch.sigmoid(logit),
            "labels": batch["y"],
        }


class _Wider(_Model):
    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(2, 2)


def _trainer(tmp_path, model=None, optimizer=None, **kwargs) -> Trainer:
    model = model if model is not None else _Model()
    hooks = kwargs.pop("hooks", ())
    data = kwargs.pop("train_data", None)
    args = TrainingArguments(output_dir=str(tmp_path), device="cpu", **kwargs)
    return Trainer(
        model,
        args,
        train_data=data if data is not None else _batches(),
        dense_optimizer=optimizer or torch.optim.SGD(model.parameters(), lr=0.1),
        hooks=hooks,
    )


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- refused resumes load nothing


@pytest.mark.parametrize("layout", ["two groups", "fewer parameters"])
def test_resume_with_other_optimizer_groups_is_refused_before_loading(tmp_path, layout):
    _trainer(tmp_path, train_steps=2).train()
    model = _Model()
    before = _snapshot(model)
    if layout == "two groups":
        optimizer = torch.optim.SGD([{"params": [model.lin.weight]}, {"params": [model.lin.bias]}])
        expected = r"dense_optimizer with 1 param group\(s\) \(now 2\)"
    else:
        optimizer = torch.optim.SGD([model.lin.weight], lr=0.1)
        expected = r"dense_optimizer param group 0 of 2 parameter\(s\) \(now 1\)"
    trainer = _trainer(tmp_path, model, optimizer, train_steps=3)
    with pytest.raises(CheckpointError, match=expected):
        trainer.restore()
    assert _unchanged(model, before)
    assert trainer.global_step == 0
    assert trainer._cursor == {"epoch": 0, "consumed": 0, "reader": None}


class _Counter(Hook):
    def __init__(self, refuse: bool = False) -> None:
        self.count, self.refuse = 0, refuse

    def on_step_end(self, trainer, logs) -> None:
        self.count += 1

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state) -> None:
        self.count = state["count"]
        if self.refuse:
            raise ValueError("state of an older format")


class _Refusing(_Counter):
    pass


def test_a_hook_refusing_its_state_leaves_everything_as_it_was(tmp_path):
    _trainer(tmp_path, train_steps=2, hooks=[_Counter(), _Refusing()]).train()
    model = _Model()
    before = _snapshot(model)
    counter, refusing = _Counter(), _Refusing(refuse=True)
    trainer = _trainer(tmp_path, model, train_steps=3, hooks=[counter, refusing])
    with pytest.raises(CheckpointError, match=r"hook '_Refusing' cannot load its saved state"):
        trainer.restore()
    assert _unchanged(model, before)
    assert trainer.global_step == 0
    assert (counter.count, refusing.count) == (0, 0)  # the one loaded first was put back


def test_dense_tensors_the_model_lacks_are_refused_before_loading(tmp_path):
    _trainer(tmp_path, train_steps=2).train()
    model = _Wider()
    before = _snapshot(model)
    trainer = _trainer(tmp_path, model, torch.optim.SGD(model.lin.parameters(), lr=0.1))
    with pytest.raises(CheckpointError, match=r"missing \['extra.bias', 'extra.weight'\]"):
        trainer.restore(parts=("dense",))
    assert _unchanged(model, before)


def test_a_sparse_part_that_fails_puts_the_hooks_back(tmp_path):
    _trainer(tmp_path, train_steps=2, hooks=[_Counter()]).train()

    class Failing:
        def save(self, directory, model, optimizer) -> None: ...

        def load(self, directory, model, optimizer) -> None:
            raise CheckpointError("tables unreadable")

        def filter_dense(self, state):
            return dict(state)

    counter = _Counter()
    trainer = _trainer(tmp_path, train_steps=3, hooks=[counter])
    trainer.sparse_checkpoint = Failing()
    with pytest.raises(CheckpointError, match="tables unreadable"):
        trainer.restore()
    assert counter.count == 0
    assert trainer.global_step == 0


def test_resume_after_the_fixes_still_continues(tmp_path):
    hook = _Counter()
    _trainer(tmp_path, train_steps=2, hooks=[hook]).train()
    again = _Counter()
    trainer = _trainer(tmp_path, train_steps=4, hooks=[again])
    trainer.train()
    assert trainer.global_step == 4
    assert again.count == 4


# ---------------------------------------------------------------- model outputs


def _loss() -> torch.Tensor:
    return torch.tensor(0.5, requires_grad=True)


@pytest.mark.parametrize(
    ("weight", "shown"),
    [("x", "str 'x'"), (float("nan"), "float nan"), (math.inf, "float inf"), (True, "True")],
)
def test_output_weights_must_be_finite_numbers(weight, shown):
    with pytest.raises(
        ModelOutputError, match=rf"weights\['a'\] must be a finite number, got .*{shown}"
    ):
        parse_output({"losses": {"a": _loss()}, "weights": {"a": weight}})


def test_output_weights_take_numbers_of_any_kind():
    out = parse_output(
        {
            "losses": {"a": _loss(), "b": _loss(), "c": _loss()},
            "weights": {"a": np.float32(0.5), "b": torch.tensor(2.0), "c": 3},
        }
    )
    assert out.weights == {"a": 0.5, "b": 2.0, "c": 3.0}
    assert float(out.loss.detach()) == pytest.approx(0.5 * 5.5)


def test_output_with_loss_and_losses_is_refused():
    with pytest.raises(ModelOutputError, match="both 'loss' and 'losses'"):
        parse_output({"loss": _loss(), "losses": {"a": _loss()}})


class _Detached(_Model):
    def forward(self, batch):
        out = super().forward(batch)
        out["loss"] = out["loss"].detach()
        return out


def test_a_loss_without_gradient_names_the_step(tmp_path):
    trainer = _trainer(tmp_path, _Detached(), train_steps=2)
    with pytest.raises(
        ModelOutputError, match=r"loss at step 1 \(micro-batch 1 of 1\) has no gradient"
    ):
        trainer.train()


class _Towers(nn.Module):
    def __init__(self, names) -> None:
        super().__init__()
        self.lin, self.names = nn.Linear(4, 3), names

    def forward(self, batch):
        hidden = self.lin(batch["x"])
        return {name: hidden for name in self.names}


def test_multitask_body_without_a_task_tower_names_the_task():
    tasks = [Task("click", nn.Linear(3, 1), label="y"), Task("buy", nn.Linear(3, 1), label="y")]
    model = MultiTask(_Towers(["click"]), tasks)
    with pytest.raises(ModelOutputError, match=r"for \['click'\] but not for task\(s\) \['buy'\]"):
        model(_batches()[0])


@pytest.mark.parametrize("weight", ["1", float("nan"), -math.inf, None, False])
def test_task_weight_must_be_a_finite_number(weight):
    with pytest.raises(ConfigError, match="task 'click': weight must be a finite number"):
        Task("click", nn.Linear(3, 1), label="y", weight=weight)


def test_task_weight_takes_numpy_numbers():
    assert Task("click", nn.Linear(3, 1), label="y", weight=np.float32(0.5)).weight == 0.5


# ---------------------------------------------------------------- hooks and stages


@pytest.mark.parametrize("every", [0, -1, 2.5, True])
def test_logging_hook_every_is_checked(every):
    with pytest.raises(ConfigError, match="LoggingHook: every must be an int of at least 1"):
        LoggingHook(every=every)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: EarlyStopping("auc", patience=1.5), "EarlyStopping: patience must be an int"),
        (lambda: EarlyStopping("auc", patience="2"), "EarlyStopping: patience must be an int"),
        (lambda: EarlyStopping("auc", min_delta="0.1"), "EarlyStopping: min_delta must be 0"),
        (lambda: EarlyStopping(3), "EarlyStopping: monitor must be a result key"),
        (lambda: TableStatsHook(2.5), "TableStatsHook: every must be an int of at least 1"),
        (lambda: TableStatsHook("5"), "TableStatsHook: every must be an int of at least 1"),
        (lambda: ProfilerHook(".", start=2.5), "ProfilerHook: start must be an int of at least 1"),
        (lambda: ProfilerHook(".", steps="3"), "ProfilerHook: steps must be an int of at least 1"),
        (lambda: ProfilerHook(".", row_limit=0), "ProfilerHook: row_limit must be an int"),
    ],
)
def test_hook_counts_of_the_wrong_type_are_refused_naming_them(make, message):
    # A float start never profiled, a float every snapshotted at its multiples, a string
    # raised a bare TypeError.
    with pytest.raises(ConfigError, match=message):
        make()
    assert TableStatsHook(np.int64(5)).every == 5


@pytest.mark.parametrize("min_delta", [-0.1, float("nan"), math.inf])
def test_early_stopping_min_delta_is_checked(min_delta):
    with pytest.raises(ConfigError, match="EarlyStopping: min_delta must be 0 or more"):
        EarlyStopping("auc", min_delta=min_delta)


def test_a_task_metric_instance_is_refused_before_training(tmp_path):
    # It passed every check and failed at the first evaluation: with train_and_evaluate that is
    # the end of training, before the last checkpoint, and the run was lost.
    with pytest.raises(ConfigError, match=r"task 'click' metrics: 'auc' must be a zero-argument"):
        Task("click", nn.Identity(), "y", metrics={"auc": AUROC()})
    with pytest.raises(ConfigError, match="task 'click': metrics must map metric names"):
        Task("click", nn.Identity(), "y", metrics=[AUROC])

    class OwnTasks(_Model):
        def task_metrics(self):
            return {"click": {"auc": AUROC()}}

    with pytest.raises(ConfigError, match=r"task_metrics\(\) of task 'click': 'auc' must be"):
        _trainer(tmp_path, model=OwnTasks())


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("clicks.parquet", r"got str \(a path: read its files with recis_io\.Dataset"),
        ({"x": torch.zeros(2, 4)}, r"got dict \(one batch: give a list of batches\)"),
    ],
)
def test_a_path_or_one_batch_is_not_taken_as_data(tmp_path, data, message):
    # Both iterate (over characters, over keys) and failed in the model's first step.
    with pytest.raises(ConfigError, match="train_data must be an iterable of batches .*" + message):
        _trainer(tmp_path, train_data=data)
    model = _Model()
    with pytest.raises(ConfigError, match="eval_data must be an iterable .*" + message):
        Trainer(
            model,
            TrainingArguments(output_dir=str(tmp_path), device="cpu"),
            train_data=_batches(),
            eval_data=data,
            dense_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        )
    with pytest.raises(ConfigError, match="train_data must be an iterable of batches"):
        _trainer(tmp_path).set_train_data(data)


@pytest.mark.parametrize("epochs", [0, 2.5, "2", True])
def test_set_train_data_checks_its_epochs(tmp_path, epochs):
    trainer = _trainer(tmp_path)
    with pytest.raises(ConfigError, match="set_train_data: epochs must be an int of at least 1"):
        trainer.set_train_data(_batches(), epochs=epochs)
    trainer.set_train_data(_batches(), epochs=np.int64(2))
    assert trainer.stream.epochs == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"weights": 0.5}, r"'weights' must be a dict of task -> weight \(a number\), got float"),
        ({"weights": torch.tensor([1.0, 2.0])}, r"'weights' must be a dict .* got Tensor"),
        ({"weights": [0.5]}, r"'weights' must be a dict .* got list"),
        ({"labels": {"a": [1.0]}}, r"model output labels\['a'\] must be a tensor, got list"),
        ({"predictions": {"a": None}}, r"predictions\['a'\] must be a tensor, got NoneType"),
    ],
)
def test_model_output_weights_and_labels_of_the_wrong_kind_are_named(extra, message):
    output = {"losses": {"a": torch.tensor(1.0, requires_grad=True)}} | extra
    if "labels" in extra:
        output["predictions"] = {"a": torch.zeros(1)}
    with pytest.raises(ModelOutputError, match=message):
        parse_output(output)


def test_stage_args_may_not_move_the_stage(tmp_path):
    model = _Model()
    stage = Stage(
        "only",
        _batches(),
        lambda params: torch.optim.SGD(params, lr=0.1),
        args={"output_dir": str(tmp_path / "elsewhere")},
    )
    with pytest.raises(ConfigError, match="stage 'only': args may not set output_dir"):
        MultiStage(model, TrainingArguments(output_dir=str(tmp_path), device="cpu"), [stage])


# ---------------------------------------------------------------- progress total


def test_total_steps_counts_on_over_new_data(tmp_path):
    stream = io.StringIO()
    trainer = _trainer(tmp_path, hooks=[LoggingHook(every=1, stream=stream)], save_at_end=False)
    trainer.train()
    assert trainer.global_step == 5
    assert trainer.total_steps == 5
    trainer.set_train_data(_batches(16, seed=1))
    assert trainer.total_steps == 7
    trainer.train()
    assert trainer.global_step == 7
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == [f"{s}/5" for s in range(1, 6)] + ["6/7", "7/7"]


def test_total_steps_after_resuming_an_extended_run(tmp_path):
    # 5 batches, 2 per step: 3 passes end at step 8 with a step of one batch (the 15th).
    _trainer(tmp_path, epochs=3, gradient_accumulation_steps=2).train()
    trainer = _trainer(tmp_path, epochs=4, gradient_accumulation_steps=2)
    trainer.restore()
    assert trainer.global_step == 8
    assert trainer.total_steps == 11  # 5 batches left: steps of 2, 2 and 1
    trainer.train()
    assert trainer.global_step == 11


# ---------------------------------------------------------------- trainer parts checked upfront


def _parts(model: nn.Module) -> dict:
    dense = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    step = torch.optim.lr_scheduler.StepLR
    scheduler = step(dense, 1)
    import recis_embedding as emb

    return {
        "sparse_optimizer='adam'": ({"sparse_optimizer": "adam"}, "sparse_optimizer must be"),
        "the same optimizer twice": ({"sparse_optimizer": dense}, "are the same object"),
        "a sparse dense optimizer": (
            {
                "dense_optimizer": emb.SparseAdam(
                    emb.DynamicEmbedding(emb.EmbeddingOption(2)), lr=0.1
                )
            },
            "dense_optimizer is a sparse optimizer",
        ),
        "one scheduler": ({"lr_schedulers": step(dense, 1)}, "pass \\[scheduler\\]"),
        "a scheduler twice": (
            {"lr_schedulers": [scheduler, scheduler]},
            "lr_schedulers\\[1\\] is lr_schedulers\\[0\\] again \\(StepLR\\)",
        ),
        "a parameter in both optimizers": (
            {"sparse_optimizer": torch.optim.SGD(model.lin.parameters(), lr=0.1)},
            "parameters lin.weight, lin.bias are in both dense_optimizer and sparse_optimizer",
        ),
        "an optimizer as scheduler": ({"lr_schedulers": [dense]}, "must be an LR scheduler"),
        "ReduceLROnPlateau": (
            {"lr_schedulers": [torch.optim.lr_scheduler.ReduceLROnPlateau(dense)]},
            "steps on a metric",
        ),
        "a foreign scheduler": (
            {"lr_schedulers": [step(other, 1)]},
            "schedules an optimizer the trainer does not step",
        ),
        "one hook": ({"hooks": LoggingHook()}, "hooks must be a list"),
        "a function as hook": ({"hooks": [print]}, "hooks\\[0\\] must be a recis_train.Hook"),
        "no train_data": ({"train_data": None}, "train_data must be an iterable"),
        "eval_data=5": ({"eval_data": 5}, "eval_data must be an iterable"),
    }, dense


@pytest.mark.parametrize(
    "case",
    [
        "sparse_optimizer='adam'",
        "the same optimizer twice",
        "a sparse dense optimizer",
        "one scheduler",
        "a scheduler twice",
        "a parameter in both optimizers",
        "an optimizer as scheduler",
        "ReduceLROnPlateau",
        "a foreign scheduler",
        "one hook",
        "a function as hook",
        "no train_data",
        "eval_data=5",
    ],
)
def test_trainer_parts_of_the_wrong_kind_are_refused_before_any_step(tmp_path, case):
    # Each used to be accepted, then failed mid-step (some after the update was applied, so
    # a retry trained the batch twice) or misbehaved silently.
    model = _Model()
    cases, dense = _parts(model)
    change, message = cases[case]
    kwargs = {"train_data": _batches(), "dense_optimizer": dense, **change}
    before = _snapshot(model)
    with pytest.raises(ConfigError, match=message):
        Trainer(model, TrainingArguments(output_dir=str(tmp_path), device="cpu"), **kwargs)
    assert _unchanged(model, before)


def test_arguments_and_an_output_dir_that_cannot_be_used_are_refused_before_any_step(tmp_path):
    model = _Model()
    dense = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"args must be TrainingArguments, got dict \(build"):
        Trainer(model, {"output_dir": str(tmp_path)}, train_data=_batches(), dense_optimizer=dense)
    taken = tmp_path / "taken"
    taken.write_text("a file")
    for out in (taken, taken / "run"):  # the whole run trained, then its first save failed
        with pytest.raises(
            ConfigError, match=r"output_dir .* cannot be a directory: .*taken' is a file"
        ):
            Trainer(
                model,
                TrainingArguments(output_dir=str(out), device="cpu"),
                train_data=_batches(),
                dense_optimizer=dense,
            )


def test_a_failing_scheduler_leaves_the_applied_step_counted(tmp_path):
    # The update is applied when a scheduler fails: the step counts, so a later train() call
    # does not take its batch again, and the run ends where an uninterrupted one does.
    class Failing(torch.optim.lr_scheduler.LambdaLR):
        fail = True

        def step(self, *args, **kwargs):
            if Failing.fail and self.last_epoch >= 0:
                Failing.fail = False
                raise RuntimeError("scheduler broke")
            return super().step(*args, **kwargs)

    def run(scheduler_class, out):
        torch.manual_seed(0)
        model = _Model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        args = TrainingArguments(output_dir=str(out), device="cpu", train_steps=5, save_every=0)
        trainer = Trainer(
            model,
            args,
            train_data=_batches(),
            dense_optimizer=optimizer,
            lr_schedulers=[scheduler_class(optimizer, lambda step: 1.0)],
        )
        return model, trainer

    model, trainer = run(Failing, tmp_path / "a")
    with pytest.raises(RuntimeError, match="scheduler broke"):
        trainer.train()
    assert trainer.global_step == 1
    trainer.train()
    assert trainer.global_step == 5
    reference, ref_trainer = run(torch.optim.lr_scheduler.LambdaLR, tmp_path / "b")
    ref_trainer.train()
    assert _unchanged(model, _snapshot(reference))


def test_evaluation_leaves_the_training_run_s_random_numbers_alone(tmp_path):
    # A DataLoader draws its seed from torch's global generator when it is iterated; an
    # evaluation with one in the middle of training must not shift later dropout masks.
    from torch.utils.data import DataLoader

    def run(evaluate: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))

        class Wrapped(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = model

            def forward(self, batch):
                logit = self.net(batch["x"])[:, 0]
                loss = nn.functional.binary_cross_entropy_with_logits(logit, batch["y"])
                return {"loss": loss, "predictions": torch.sigmoid(logit), "labels": batch["y"]}

        wrapped = Wrapped()
        rows = _batches()
        eval_loader = DataLoader(rows, batch_size=None, shuffle=False)
        args = TrainingArguments(
            output_dir=str(tmp_path / str(evaluate)),
            device="cpu",
            train_steps=4,
            eval_every=2 if evaluate else 0,
            save_every=0,
            seed=3,
        )
        trainer = Trainer(
            wrapped,
            args,
            train_data=rows,
            eval_data=eval_loader,
            dense_optimizer=torch.optim.SGD(wrapped.parameters(), lr=0.1),
        )
        trainer.train_and_evaluate() if evaluate else trainer.train()
        return _snapshot(wrapped)

    plain, evaluated = run(False), run(True)
    assert all(torch.equal(plain[k], evaluated[k]) for k in plain)


def test_tables_no_sparse_optimizer_steps_are_named_once(tmp_path, caplog):
    import recis_embedding as emb

    class WithTables(_Model):
        def __init__(self, trainable: bool) -> None:
            super().__init__()
            self.emb = emb.EmbeddingEngine({"u": emb.EmbeddingOption(1, trainable=trainable)})

        def forward(self, batch):
            out = super().forward(batch)
            looked_up = self.emb({"u": (batch["x"][:, 0] > 0).long()})["u"][:, 0]
            out["loss"] = out["loss"] + 0.0 * looked_up.sum()
            return out

    cases = [(True, False, True), (True, True, False), (False, False, False)]
    for k, (trainable, sparse, warned) in enumerate(cases):
        model = WithTables(trainable)
        args = TrainingArguments(
            output_dir=str(tmp_path / str(k)), device="cpu", train_steps=3, save_every=0
        )
        trainer = Trainer(
            model,
            args,
            train_data=_batches(),
            dense_optimizer=torch.optim.SGD(model.lin.parameters(), lr=0.1),
            sparse_optimizer=emb.SparseAdam(model, lr=0.1) if sparse else None,
        )
        caplog.clear()
        with caplog.at_level("WARNING", logger="recis_train"):
            trainer.train()
        said = [r.getMessage() for r in caplog.records if "no sparse_optimizer" in r.getMessage()]
        assert len(said) == int(warned), (trainable, sparse, said)
        if warned:
            assert "['u']" in said[0]


def test_parameters_no_optimizer_steps_are_named(tmp_path, caplog):
    model = _Wider()  # lin and extra; extra is in no loss, but it takes gradients
    args = TrainingArguments(output_dir=str(tmp_path), device="cpu")
    for optimized, warned in [(model.lin.parameters(), True), (model.parameters(), False)]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="recis_train"):
            Trainer(
                model,
                args,
                train_data=_batches(),
                dense_optimizer=torch.optim.SGD(optimized, lr=0.1),
            )
        said = [r.getMessage() for r in caplog.records if "never learn" in r.getMessage()]
        assert len(said) == int(warned)
        if warned:
            assert "parameters extra.weight, extra.bias require gradients" in said[0]


def test_a_trainer_without_a_dense_optimizer_trains_its_tables_only(tmp_path):
    from _toy import TableModel, ToyReader

    import recis_embedding as emb

    args = TrainingArguments(output_dir=str(tmp_path / "a"), device="cpu", train_steps=3)
    model = TableModel(loss_only=True)
    with pytest.raises(ConfigError) as info:
        Trainer(model, args, train_data=ToyReader(40, 10), dense_optimizer=None)
    assert str(info.value) == (
        "dense_optimizer is None, but parameters mlp.0.weight, mlp.0.bias, mlp.2.weight, "
        "mlp.2.bias require gradients; give a dense optimizer over them, or set "
        "requires_grad=False to train the embedding tables only"
    )
    model.mlp.requires_grad_(False)
    with pytest.raises(ConfigError, match="are both None: the trainer would train nothing"):
        Trainer(model, args, train_data=ToyReader(40, 10), dense_optimizer=None)
    with pytest.raises(ConfigError, match=r"must be a torch\.optim\.Optimizer or None, got str"):
        Trainer(model, args, train_data=ToyReader(40, 10), dense_optimizer="adam")  # type: ignore[arg-type]

    mlp = {k: v.clone() for k, v in model.mlp.state_dict().items()}
    sparse = emb.SparseAdagrad(model, lr=0.25)
    trainer = Trainer(
        model, args, train_data=ToyReader(40, 10), dense_optimizer=None, sparse_optimizer=sparse
    )
    logs = trainer.train()
    assert logs["lr"] == 0.25  # the sparse optimizer's rate, with no dense one
    assert all(torch.equal(v, mlp[k]) for k, v in model.mlp.state_dict().items())
    table, index = model.embeddings.table("ids")
    assert len(table.ids(index)) > 0
    # Resuming it with a dense optimizer is refused: the checkpoint has no state for one.
    model.mlp.requires_grad_(True)
    resumed = Trainer(
        model,
        args,
        train_data=ToyReader(40, 10),
        dense_optimizer=torch.optim.SGD(model.mlp.parameters(), lr=0.1),
        sparse_optimizer=emb.SparseAdagrad(model, lr=0.25),
    )
    with pytest.raises(CheckpointError, match=r"dense_optimizer None \(now torch.optim.sgd.SGD\)"):
        resumed.train()
