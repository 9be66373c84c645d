"""Frozen tables, hook state by key, hooks across stages, arguments from files, one-class AUC."""

from __future__ import annotations

import math

import pytest
import torch
from _toy import NUM_DENSE, TableModel, ToyModel, ToyReader, make_optimizers
from torch import nn

import recis_embedding as emb
from recis_train import (
    EarlyStopping,
    Hook,
    LoggingHook,
    MultiStage,
    ProfilerHook,
    Stage,
    Trainer,
    TrainingArguments,
    seed_everything,
)
from recis_train.exceptions import CheckpointError, ConfigError
from recis_train.metrics import AUROC


def table_rows(model: TableModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted ids and their full rows (embedding and optimizer slots)."""
    table, index = model.embeddings.table("ids")
    ids = torch.sort(table.ids(index)).values
    return ids, table.read_full(table.find(ids, index))


def shifted(reader: ToyReader, offset: int) -> list[dict[str, torch.Tensor]]:
    """The reader's batches with ids moved out of the range the first stage saw."""
    return [{**b, "ids": b["ids"] + offset} for b in reader]


def test_a_frozen_embedding_module_keeps_its_rows_and_optimizer_slots(tmp_path):
    seed_everything(0)
    model = TableModel(loss_only=True)
    args = TrainingArguments(output_dir=str(tmp_path), device="cpu", log_every=1000)

    def adam(params):
        return torch.optim.Adam(params, lr=0.05)

    def sparse(m):
        return emb.SparseAdam(m, lr=0.05)

    pretrain = Stage("pretrain", ToyReader(200, 50), adam, sparse_optimizer=sparse)
    MultiStage(model, args, [pretrain]).run()
    ids, rows = table_rows(model)
    mlp = {k: v.clone() for k, v in model.mlp.state_dict().items()}
    # Finetune: half the ids are new to the table; the stage has a sparse optimizer.
    data = ToyReader(200, 50, seed=1)
    finetune = Stage(
        "finetune",
        [*shifted(data, 0), *shifted(data, 25)],
        adam,
        frozen=["embeddings"],
        sparse_optimizer=sparse,
    )
    MultiStage(model, args, [pretrain, finetune]).run()
    after_ids, after_rows = table_rows(model)
    assert torch.equal(after_ids, ids)  # no id inserted
    assert torch.equal(after_rows, rows)  # embeddings and Adam slots untouched
    assert not torch.equal(model.mlp.state_dict()["0.weight"], mlp["0.weight"])
    assert model.embeddings.training  # the module's mode is restored after each lookup


class TwoTables(nn.Module):
    """A user and an item engine, each its own table, over the toy batches."""

    def __init__(self) -> None:
        super().__init__()
        self.user = emb.EmbeddingEngine({"u": emb.EmbeddingOption(4)})
        self.item = emb.EmbeddingEngine({"i": emb.EmbeddingOption(4)})
        self.mlp = nn.Sequential(nn.Linear(NUM_DENSE + 8, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        u = self.user({"u": batch["ids"].reshape(-1, 1)})["u"]
        i = self.item({"i": (batch["ids"] * 7 % 50).reshape(-1, 1)})["i"]
        logit = self.mlp(torch.cat([batch["dense"], u, i], 1))[:, 0]
        return nn.functional.binary_cross_entropy_with_logits(logit, batch["click"])


def test_a_frozen_table_gets_no_state_from_the_stage_optimizer_and_a_later_one_may_train_it(
    tmp_path,
):
    seed_everything(0)
    model = TwoTables()
    args = TrainingArguments(output_dir=str(tmp_path), device="cpu", log_every=1000)

    def adam(params):
        return torch.optim.Adam(params, lr=0.05)

    warm = Stage("warm", list(ToyReader(100, 50)), adam)  # inserts ids, no optimizer state
    user_only = Stage(
        "user-only",
        list(ToyReader(100, 50, seed=1)),
        adam,
        frozen=["item"],
        sparse_optimizer=lambda m: emb.SparseAdagrad(m, lr=0.1),
    )
    MultiStage(model, args, [warm]).run()
    table, index = model.item.table("i")
    ids = torch.sort(table.ids(index)).values
    rows = table.read_full(table.find(ids, index)).clone()
    MultiStage(model, args, [warm, user_only]).run()
    assert model.user.table("u")[0].optimizer_kind == "adagrad"
    assert table.optimizer_kind is None  # the frozen table was not laid out for Adagrad
    assert torch.equal(table.read_full(table.find(ids, index)), rows)
    # A later stage trains the item table, with another optimizer than the user table's.
    item_only = Stage(
        "item-only",
        list(ToyReader(100, 50, seed=2)),
        adam,
        frozen=["user"],
        sparse_optimizer=lambda m: emb.SparseAdam(m.item, lr=0.05),
    )
    MultiStage(model, args, [warm, user_only, item_only]).run()
    assert table.optimizer_kind == "adam"
    assert not torch.equal(table.read_full(table.find(ids, index))[:, :4], rows)


def test_a_stage_trains_its_tables_with_its_own_sparse_hyperparameters(tmp_path):
    # The previous stage's weights are loaded into a fresh stage; its sparse optimizer's
    # hyperparameters are trainer state and stay the ones the stage built it with.
    seed_everything(0)
    model = TableModel(loss_only=True)
    args = TrainingArguments(output_dir=str(tmp_path), device="cpu", log_every=1000)
    rates: list[tuple[str, float]] = []

    class Rates(Hook):
        def on_step_end(self, trainer, logs):
            rates.append((trainer.args.output_dir, trainer.sparse_optimizer.param_groups[0]["lr"]))

    def stage(name: str, lr: float, seed: int) -> Stage:
        return Stage(
            name,
            list(ToyReader(100, 50, seed=seed)),
            lambda params: torch.optim.Adam(params, lr=0.05),
            sparse_optimizer=lambda m: emb.SparseAdam(m, lr=lr),
        )

    MultiStage(
        model, args, [stage("pretrain", 0.05, 0), stage("finetune", 0.001, 1)], hooks=[Rates()]
    ).run()
    assert {lr for d, lr in rates if d.endswith("pretrain")} == {0.05}
    assert {lr for d, lr in rates if d.endswith("finetune")} == {0.001}


def test_a_table_outside_the_trainable_prefixes_is_frozen_too(tmp_path):
    seed_everything(0)
    model = TableModel(loss_only=True)
    args = TrainingArguments(output_dir=str(tmp_path), device="cpu", log_every=1000)

    def sparse(m):
        return emb.SparseAdagrad(m, lr=0.1)

    first = Stage(
        "a", ToyReader(100, 50), lambda ps: torch.optim.SGD(ps, lr=0.1), sparse_optimizer=sparse
    )
    MultiStage(model, args, [first]).run()
    ids, rows = table_rows(model)
    second = Stage(
        "b",
        shifted(ToyReader(100, 50, seed=2), 10),
        lambda ps: torch.optim.SGD(ps, lr=0.1),
        trainable=["mlp"],
        sparse_optimizer=sparse,
    )
    MultiStage(model, args, [first, second]).run()
    assert all(torch.equal(a, b) for a, b in zip(table_rows(model), (ids, rows), strict=True))


class Counter(Hook):
    """A hook with state: the number of steps it saw."""

    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, trainer, logs):
        self.steps += 1

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = int(state["steps"])


def toy_trainer(out, hooks, train_steps=4):
    seed_everything(0)
    model = ToyModel()
    dense, sparse = make_optimizers(model)
    args = TrainingArguments(
        output_dir=str(out), device="cpu", train_steps=train_steps, log_every=1000
    )
    return Trainer(
        model,
        args,
        train_data=ToyReader(400, 20),
        dense_optimizer=dense,
        sparse_optimizer=sparse,
        hooks=hooks,
    )


def test_hook_state_follows_the_hook_not_its_position(tmp_path, capsys):
    stop, counter = EarlyStopping("auc", patience=3), Counter()
    first = toy_trainer(tmp_path, [stop, counter])
    first.train()
    stop.best, stop.bad_evaluations = 0.75, 2
    first.save()
    assert counter.steps == 4
    # Resumed with the hooks reordered and a stateless hook added in front.
    stop2, counter2 = EarlyStopping("auc", patience=3), Counter()
    trainer = toy_trainer(tmp_path, [LoggingHook(), counter2, stop2], train_steps=6)
    trainer.restore()
    assert counter2.steps == 4
    assert (stop2.best, stop2.bad_evaluations) == (0.75, 2)


def test_hook_state_without_its_hook_is_refused_and_named(tmp_path):
    toy_trainer(tmp_path, [Counter(), EarlyStopping("auc")]).train()
    trainer = toy_trainer(tmp_path, [Counter()], train_steps=6)
    with pytest.raises(CheckpointError, match=r"hook\(s\) \['EarlyStopping\(auc\)'\]"):
        trainer.restore()
    assert trainer.global_step == 0  # nothing was loaded

    class Picky(Counter):
        state_key = "Counter"

        def load_state_dict(self, state):
            raise KeyError("epoch")

    with pytest.raises(CheckpointError, match="hook 'Counter' cannot load its saved state"):
        toy_trainer(tmp_path, [Picky(), EarlyStopping("auc")], train_steps=6).restore()


def test_repeated_hooks_of_one_class_keep_their_own_state(tmp_path):
    first, second = Counter(), Counter()
    second.steps = 100
    toy_trainer(tmp_path, [first, second]).train()
    again = [Counter(), Counter()]
    toy_trainer(tmp_path, [LoggingHook(), *again], train_steps=6).restore()
    assert [h.steps for h in again] == [4, 104]


def test_early_stopping_shared_by_stages_starts_fresh_in_each_stage(tmp_path):
    seed_everything(0)
    model = ToyModel(dropout=0.0)
    stop = EarlyStopping("loss", mode="min", patience=1, min_delta=10.0)
    evaluations = []

    class Steps(Hook):
        def on_evaluate(self, trainer, metrics):
            evaluations.append((trainer.args.output_dir.rsplit("/", 1)[-1], trainer.global_step))

    def stage(name, seed):
        def dense(params):  # the sparse-gradient embedding is left out (no sparse optimizer)
            return torch.optim.Adam([p for p in params if p is not model.embedding.weight], lr=0.01)

        return Stage(
            name,
            ToyReader(200, 20, seed=seed),
            dense,
            eval_data=ToyReader(60, 30, seed=3),
        )

    args = TrainingArguments(
        output_dir=str(tmp_path), device="cpu", log_every=1000, eval_every=2, train_steps=10
    )
    MultiStage(model, args, [stage("a", 0), stage("b", 1)], hooks=[stop, Steps()]).run()
    # Each stage: the first evaluation is its best, the second one stops it (patience 1).
    assert evaluations == [("a", 2), ("a", 4), ("b", 2), ("b", 4)]
    assert stop.stopped_at == 4


def test_profiler_hook_starting_at_the_first_step_records_it(tmp_path):
    hook = ProfilerHook(str(tmp_path / "trace"), start=1, steps=2)
    toy_trainer(tmp_path / "run", [hook]).train()
    assert hook.trace_path is not None
    assert hook.trace_path.endswith("trace-step1.json")
    assert "aten::" in hook.table


def test_yaml_mixed_precision_no_is_the_string_no(tmp_path):
    config = tmp_path / "args.yaml"
    config.write_text("mixed_precision: no\ngrad_clip: 1e-3\nresume: off\n")
    args = TrainingArguments.from_file(config)
    assert (args.mixed_precision, args.grad_clip, args.resume) == ("no", 1e-3, False)
    config.write_text("mixed_precision: yes\n")
    with pytest.raises(ValueError, match="mixed_precision must be str, got True"):
        TrainingArguments.from_file(config)


def test_cli_help_describes_each_flag(capsys):
    with pytest.raises(SystemExit):
        TrainingArguments.from_cli(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--gradient-accumulation-steps GRADIENT_ACCUMULATION_STEPS micro-batches" in text
    assert "(default: 1)" in text
    assert "--resume, --no-resume the first train() of a Trainer first restores" in text


@pytest.mark.parametrize("label", [0, 1])
def test_thresholded_auroc_of_one_class_is_nan_like_exact(label):
    for mode in ("exact", "thresholded"):
        auc = AUROC(mode)
        auc.update(torch.tensor([0.1, 0.5, 0.9]), torch.full((3,), label))
        assert math.isnan(auc.compute()), mode


def test_multistage_checks_every_stage_before_training_any(tmp_path):
    model = TableModel(loss_only=True)
    args = TrainingArguments(output_dir=str(tmp_path), device="cpu")
    first = Stage("a", ToyReader(100, 50), lambda ps: torch.optim.SGD(ps, lr=0.1))
    typo = Stage("b", ToyReader(100, 50), first.dense_optimizer, args={"train_step": 5})
    with pytest.raises(
        ConfigError, match=r"stage 'b'.*unknown training argument\(s\) \['train_step'\]"
    ):
        MultiStage(model, args, [first, typo])
    # The next stage and a rerun start from the checkpoint that ends a stage: it is required.
    unsaved = TrainingArguments(output_dir=str(tmp_path), device="cpu", save_at_end=False)
    with pytest.raises(ConfigError, match="stage 'a': save_at_end must be True"):
        MultiStage(model, unsaved, [first])
    assert not (tmp_path / "a").exists()


def test_multistage_with_resume_false_refuses_a_finished_stage(tmp_path):
    # It returned the finished run's results and trained nothing, where a Trainer refuses.
    def run(resume: bool) -> dict:
        seed_everything(0)
        model = TableModel(loss_only=True)
        args = TrainingArguments(output_dir=str(tmp_path), device="cpu", resume=resume)
        stage = Stage("a", ToyReader(100, 50), lambda ps: torch.optim.SGD(ps, lr=0.1))
        return MultiStage(model, args, [stage]).run()

    run(False)
    with pytest.raises(ConfigError, match=r"stage 'a' already finished in .*resume=False starts"):
        run(False)
    assert run(True) == {"a": {}}


def test_fp16_on_cpu_trains_with_loss_scaling(tmp_path):
    seed_everything(0)
    model = ToyModel()
    model.embedding.weight.requires_grad_(False)  # dense only: fp16 refuses sparse optimizers
    args = TrainingArguments(
        output_dir=str(tmp_path), device="cpu", mixed_precision="fp16", epochs=2, grad_clip=1.0
    )
    trainer = Trainer(
        model,
        args,
        train_data=ToyReader(600, 50),
        eval_data=ToyReader(200, 100, seed=1),
        dense_optimizer=torch.optim.Adam(model.dense_parameters(), lr=0.05),
    )
    assert math.isfinite(trainer.train()["loss"])
    assert trainer._scaler is not None
    assert trainer._scaler.get_scale() > 1
    assert trainer.evaluate()["auc"] > 0.7


def test_multistage_killed_in_stage_two_resumes_to_the_uninterrupted_result(tmp_path):
    def run(out, crash_at=None):
        seed_everything(0)
        model = TableModel(loss_only=True)
        args = TrainingArguments(
            output_dir=str(out), device="cpu", log_every=1000, save_every=2, deterministic=True
        )

        def sparse(m):
            return emb.SparseAdam(m, lr=0.05)

        class Stream:
            """Stage two's data (ids partly new to the table); dies at batch ``crash_at``."""

            def __iter__(self):
                for i, batch in enumerate(ToyReader(300, 50, seed=1)):
                    if i == crash_at:
                        raise RuntimeError("killed")
                    yield {**batch, "ids": batch["ids"] + 20}

        stages = [
            Stage(
                "a",
                ToyReader(200, 50),
                lambda ps: torch.optim.Adam(ps, lr=0.05),
                sparse_optimizer=sparse,
            ),
            Stage(
                "b",
                Stream(),
                lambda ps: torch.optim.Adam(ps, lr=0.05),
                frozen=["embeddings"],
                sparse_optimizer=sparse,
                eval_data=ToyReader(100, 50, seed=3),
            ),
        ]
        return model, MultiStage(model, args, stages).run()

    whole, expected = run(tmp_path / "whole")
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "cut", crash_at=3)  # after stage b's checkpoint of step 2
    resumed, results = run(tmp_path / "cut")
    assert results == expected
    for got, want in zip(table_rows(resumed), table_rows(whole), strict=True):
        assert torch.equal(got, want)
    with emb.tables_saved_separately():  # dense tensors here, tables above
        for key, value in whole.state_dict().items():
            assert torch.equal(resumed.state_dict()[key], value), key


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"frozen": ["embedding"]}, r"frozen prefix\(es\) \['embedding'\] name no module"),
        ({"trainable": ["mlp", "tower"]}, r"trainable prefix\(es\) \['tower'\] name no module"),
        ({"frozen": "embeddings"}, "frozen must be a list of module name prefixes"),
    ],
)
def test_stage_prefixes_that_name_nothing_are_refused_up_front(tmp_path, options, message):
    model = TableModel(loss_only=True)
    args = TrainingArguments(output_dir=str(tmp_path), device="cpu")
    stage = Stage("s", ToyReader(100, 50), lambda ps: torch.optim.SGD(ps, lr=0.1), **options)
    with pytest.raises(ConfigError, match=r"stage 's': " + message):
        MultiStage(model, args, [stage])
    ok = Stage("s", [], lambda ps: torch.optim.SGD(ps, lr=0.1), frozen=["embeddings", "mlp.0"])
    MultiStage(model, args, [ok])


def test_a_frozen_table_with_eviction_keeps_its_rows_and_clock(tmp_path):
    # The stage's sparse optimizer is built from the whole model; its steps must not age the
    # frozen table's rows (StaleEviction would erase every one of them).
    seed_everything(0)
    model = TableModel(loss_only=True, option=emb.EmbeddingOption(4, eviction=emb.StaleEviction(2)))
    args = TrainingArguments(output_dir=str(tmp_path), device="cpu", log_every=1000)

    def sparse(m):
        return emb.SparseAdam(m, lr=0.05)

    def adam(params):
        return torch.optim.Adam(params, lr=0.05)

    pretrain = Stage("pretrain", ToyReader(200, 50), adam, sparse_optimizer=sparse)
    MultiStage(model, args, [pretrain]).run()
    ids, rows = table_rows(model)
    clock = model.embeddings.table("ids")[0].step
    finetune = Stage(
        "finetune", ToyReader(400, 50, seed=1), adam, frozen=["embeddings"], sparse_optimizer=sparse
    )
    MultiStage(model, args, [pretrain, finetune]).run()
    assert len(ids) > 0
    assert all(torch.equal(a, b) for a, b in zip(table_rows(model), (ids, rows), strict=True))
    assert model.embeddings.table("ids")[0].step == clock


def test_stage_schedulers_are_checked_as_the_trainer_checks_them(tmp_path):
    model = TableModel(loss_only=True)
    args = TrainingArguments(output_dir=str(tmp_path), device="cpu", log_every=1000)

    def sgd(params):
        return torch.optim.SGD(params, lr=0.1)

    for schedulers, message in [
        (lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1), "got one StepLR"),
        (lambda opt: [torch.optim.lr_scheduler.ReduceLROnPlateau(opt)], "ReduceLROnPlateau"),
        (
            lambda opt: [
                torch.optim.lr_scheduler.StepLR(sgd([torch.nn.Parameter(torch.ones(1))]), 1)
            ],
            "schedules an optimizer the trainer does not step",
        ),
    ]:
        stage = Stage("s", ToyReader(100, 50), sgd, lr_schedulers=schedulers)
        with pytest.raises(ConfigError, match=message):
            MultiStage(model, args, [stage]).run()


def test_a_prefix_inside_an_embedding_module_is_refused(tmp_path):
    model = torch.nn.Module()
    model.user = emb.DynamicEmbedding(emb.EmbeddingOption(4))
    model.mlp = torch.nn.Linear(4, 1)
    args = TrainingArguments(output_dir=str(tmp_path), device="cpu")
    for options in ({"frozen": ["user.engine"]}, {"trainable": ["mlp", "user.engine"]}):
        stage = Stage("s", [], lambda ps: torch.optim.SGD(ps, lr=0.1), **options)
        field = next(iter(options))
        with pytest.raises(
            ConfigError,
            match=rf"stage 's': {field} prefix 'user.engine' names a part of the embedding "
            r"module 'user', whose tables freeze or train as a whole; name 'user' itself",
        ):
            MultiStage(model, args, [stage])
    MultiStage(
        model, args, [Stage("s", [], lambda ps: torch.optim.SGD(ps, lr=0.1), frozen=["user"])]
    )


def test_one_shot_stage_data_used_twice_is_refused_before_any_stage_trains(tmp_path):
    model = TableModel(loss_only=True)
    args = TrainingArguments(output_dir=str(tmp_path), device="cpu", log_every=1000)

    def sgd(params):
        return torch.optim.SGD(params, lr=0.1)

    first = Stage("a", ToyReader(100, 50), sgd)
    for options, message in [
        ({"train_data": iter(list(ToyReader(100, 50))), "args": {"epochs": 2}}, "epochs=2"),
        ({"eval_data": iter(list(ToyReader(100, 50))), "args": {"eval_every": 1}}, "eval_every=1"),
    ]:
        second = Stage(
            **({"name": "b", "train_data": ToyReader(100, 50), "dense_optimizer": sgd} | options)
        )
        with pytest.raises(ConfigError, match=rf"stage 'b': .* one-shot iterator .*{message}"):
            MultiStage(model, args, [first, second])
    assert not (tmp_path / "a").exists()


def test_a_stage_may_train_embedding_tables_only(tmp_path):
    seed_everything(0)
    model = TableModel(loss_only=True)
    args = TrainingArguments(output_dir=str(tmp_path), device="cpu", log_every=1000)

    def sparse(m):
        return emb.SparseAdam(m, lr=0.05)

    first = Stage(
        "all", ToyReader(100, 50), lambda ps: torch.optim.Adam(ps, lr=0.05), sparse_optimizer=sparse
    )
    MultiStage(model, args, [first]).run()
    ids, rows = table_rows(model)
    mlp = {k: v.clone() for k, v in model.mlp.state_dict().items()}
    tables_only = Stage(
        "tables", ToyReader(100, 50, seed=3), None, frozen=["mlp"], sparse_optimizer=sparse
    )
    results = MultiStage(model, args, [first, tables_only]).run()
    assert results == {"all": {}, "tables": {}}
    for key, value in model.mlp.state_dict().items():
        assert torch.equal(value, mlp[key]), key
    after_ids, after_rows = table_rows(model)
    kept = torch.isin(after_ids, ids)
    assert torch.equal(after_ids[kept], ids)  # the first stage's rows are kept ...
    assert not torch.equal(after_rows[kept], rows)  # ... and trained further
    # Rerunning resumes from the stage's checkpoint, written without a dense optimizer.
    again = TableModel(loss_only=True)
    MultiStage(again, args, [first, tables_only]).run()
    assert all(torch.equal(a, b) for a, b in zip(table_rows(again), table_rows(model), strict=True))


def test_a_stage_with_nothing_to_train_or_no_optimizer_is_refused(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), device="cpu")
    data = ToyReader(10, 5)

    def sparse(m):
        return emb.SparseAdam(m, lr=0.05)

    def sgd(ps):
        return torch.optim.SGD(ps, lr=0.1)

    cases = [
        (
            Stage("x", data, sgd, frozen=["mlp", "embeddings"], sparse_optimizer=sparse),
            "stage 'x': no trainable parameter is left, and no embedding table to train with a "
            "sparse optimizer",
        ),
        (
            Stage("x", data, sgd, frozen=["mlp"]),
            "stage 'x': no trainable parameter is left, and no embedding table to train with a "
            "sparse optimizer",
        ),
        (
            Stage("x", data, None, sparse_optimizer=sparse),
            "stage 'x': 4 dense parameter(s) train but the stage has no dense_optimizer; give "
            "one, or freeze them",
        ),
        (
            Stage(
                "x",
                data,
                sgd,
                frozen=["mlp"],
                sparse_optimizer=sparse,
                lr_schedulers=lambda o: [torch.optim.lr_scheduler.StepLR(o, 1)],
            ),
            "stage 'x': trains embedding tables only, so it has no dense optimizer for its "
            "lr_schedulers to schedule; leave lr_schedulers out",
        ),
    ]
    for k, (stage, message) in enumerate(cases):
        model = TableModel(loss_only=True)
        with pytest.raises(ConfigError) as info:
            MultiStage(model, args, [stage]).run()
        assert str(info.value) == message
        assert all(p.requires_grad for p in model.parameters())
        if k >= 2:  # refused before the sparse optimizer laid out the tables' state
            assert model.embeddings.table("ids")[0].optimizer_kind is None


# -- hooks, schedulers and the checkpoints around a stop ---------------------------------------


class Calls(Hook):
    """Records the hook calls with the step they came at; stops the run where asked."""

    def __init__(self, stop_at: int | None = None, stop_in: str = "on_step_end") -> None:
        self.calls: list[tuple[str, int]] = []
        self.stop_at, self.stop_in = stop_at, stop_in

    def _note(self, name: str, trainer) -> None:
        self.calls.append((name, trainer.global_step))
        if name == self.stop_in and trainer.global_step == self.stop_at:
            trainer.should_stop = True

    def on_step_begin(self, trainer):
        self._note("on_step_begin", trainer)

    def on_step_end(self, trainer, logs):
        self._note("on_step_end", trainer)

    def on_save(self, trainer, path):
        self._note("on_save", trainer)

    def on_train_end(self, trainer):
        self._note("on_train_end", trainer)


def saved_stop(trainer) -> tuple[str, bool]:
    newest = max(trainer.checkpoints.complete())
    return newest.name, torch.load(newest / "trainer" / "state.pt", weights_only=False)["stopped"]


def test_schedulers_and_hooks_given_as_generators_are_kept(tmp_path):
    # The checks listed them once and the trainer listed them again, from used-up generators:
    # both were silently dropped.
    seed_everything(0)
    model = ToyModel()
    dense, sparse = make_optimizers(model)
    calls = Calls()
    trainer = Trainer(
        model,
        TrainingArguments(output_dir=str(tmp_path), device="cpu", train_steps=3, log_every=1000),
        train_data=ToyReader(400, 20),
        dense_optimizer=dense,
        sparse_optimizer=sparse,
        lr_schedulers=(s for s in [torch.optim.lr_scheduler.StepLR(dense, 1, 0.5)]),
        hooks=iter([calls]),
    )
    trainer.train()
    assert len(trainer.lr_schedulers) == 1
    assert trainer.hooks == [calls]
    assert [logs["lr"] for _, logs in trainer.history["train"]] == pytest.approx(
        [0.025, 0.0125, 0.00625]
    )
    assert ("on_step_end", 3) in calls.calls


def test_a_stop_asked_for_after_the_steps_checkpoint_is_written_to_it(tmp_path):
    # The step's checkpoint was written before the stop; the end of the run kept it as it was,
    # and a resumed run trained on past the stop.
    calls = Calls(stop_at=2, stop_in="on_save")
    trainer = toy_trainer(tmp_path, [calls], train_steps=6)
    trainer.args.save_every = 2
    trainer.train()
    assert trainer.global_step == 2
    assert saved_stop(trainer) == ("step-000000002", True)
    again = toy_trainer(tmp_path, [Calls()], train_steps=6)
    again.train()
    assert again.global_step == 2


def test_a_stop_begins_no_step_and_a_hooks_save_is_not_written_twice(tmp_path):
    class SaveEvery3(Calls):
        def on_step_end(self, trainer, logs):
            super().on_step_end(trainer, logs)
            if trainer.global_step % 3 == 0:
                trainer.save()

    calls = SaveEvery3(stop_at=3)
    trainer = toy_trainer(tmp_path, [calls], train_steps=6)
    trainer.args.save_every = 2
    trainer.train()
    # No on_step_begin after the stop at step 3 (a begin no step followed), and step 3's
    # checkpoint, which the hook wrote after asking to stop, not written again at the end.
    assert calls.calls[-4:] == [
        ("on_step_begin", 2),
        ("on_step_end", 3),
        ("on_save", 3),
        ("on_train_end", 3),
    ]
    assert saved_stop(trainer) == ("step-000000003", True)
    # Without a stop, a step the hook saved is not saved again by save_every.
    plain = SaveEvery3()
    trainer = toy_trainer(tmp_path / "plain", [plain], train_steps=6)
    trainer.args.save_every = 2
    trainer.train()
    assert [step for name, step in plain.calls if name == "on_save"] == [2, 3, 4, 6]
