"""warm_start: dense tensors and embedding tables from another run, chosen by name."""

from __future__ import annotations

import pytest
import torch
from _toy import NUM_DENSE, ToyReader
from torch import nn

import recis_embedding as emb
from recis_train import Trainer, TrainingArguments, seed_everything, warm_start
from recis_train.exceptions import CheckpointError, CheckpointNotFoundError, ConfigError


class TwoTables(nn.Module):
    """A user and an item table (fused into one physical table) under an MLP."""

    def __init__(self, hidden: int = 8, item_dim: int = 4, capacity: int | None = None):
        super().__init__()
        self.embeddings = emb.EmbeddingEngine(
            {
                "user": emb.EmbeddingOption(4, capacity=capacity),
                "item": emb.EmbeddingOption(item_dim),
            }
        )
        self.mlp = nn.Sequential(
            nn.Linear(NUM_DENSE + 4 + item_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, batch):
        ids = batch["ids"].reshape(-1, 1)
        out = self.embeddings({"user": ids, "item": ids % 7})
        x = torch.cat([batch["dense"], out["user"], out["item"]], dim=1)
        logits = self.mlp(x)[:, 0]
        return nn.functional.binary_cross_entropy_with_logits(logits, batch["click"])


def train_source(out, steps=6):
    seed_everything(0)
    model = TwoTables()
    trainer = Trainer(
        model,
        TrainingArguments(output_dir=str(out), device="cpu", train_steps=steps),
        train_data=ToyReader(200, 25),
        dense_optimizer=torch.optim.Adam(model.mlp.parameters(), lr=0.05),
        sparse_optimizer=emb.SparseAdam(model, lr=0.05),
    )
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return train_source(tmp_path_factory.mktemp("source"))


def rows(model, name):
    engine = model.embeddings
    table, index = engine.table(name)
    ids = torch.sort(table.ids(index)).values
    return ids, table.embeddings(ids, index)


def dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's dense tensors (its tables are compared through ``rows``)."""
    with emb.tables_saved_separately():
        return {k: v.clone() for k, v in model.state_dict().items()}


def fresh(**kwargs):
    torch.manual_seed(123)
    return TwoTables(**kwargs)


def test_everything_is_loaded_by_default(source):
    model = fresh()
    result = warm_start(model, source.checkpoints.latest())
    for key, value in dense_state(source.model).items():
        assert torch.equal(dense_state(model)[key], value), key
    for name in ("user", "item"):
        ids, values = rows(model, name)
        want_ids, want_values = rows(source.model, name)
        assert torch.equal(ids, want_ids)
        assert torch.equal(values, want_values)
        assert result.tables[name] == len(want_ids) > 0
    assert sorted(result.dense) == sorted(dense_state(source.model))
    assert result.skipped == []


def test_only_sparse_tables_leave_dense_weights_alone(source):
    model = fresh()
    before = dense_state(model)
    result = warm_start(model, source.args.output_dir, parts=("sparse",))
    assert result.dense == []
    for key, value in before.items():
        assert torch.equal(dense_state(model)[key], value), key
    assert torch.equal(rows(model, "item")[1], rows(source.model, "item")[1])


def test_exclude_keeps_a_fused_neighbour_table_as_it_was(source):
    model = fresh()
    model.train()
    model(next(iter(ToyReader(40, 40, seed=5))))  # the target's own user rows
    own_user = rows(model, "user")
    result = warm_start(model, source.checkpoints.latest(), exclude=["user", "mlp.2"])
    assert set(result.tables) == {"item"}
    assert torch.equal(rows(model, "user")[0], own_user[0])
    assert torch.equal(rows(model, "user")[1], own_user[1])
    assert torch.equal(rows(model, "item")[1], rows(source.model, "item")[1])
    assert sorted(result.dense) == ["mlp.0.bias", "mlp.0.weight"]
    assert not torch.equal(model.mlp[2].weight, source.model.mlp[2].weight)


def test_a_full_table_replaces_rows_the_target_had(source):
    model = fresh()
    model.train()
    model(
        {
            "ids": torch.tensor([1000, 1001]),
            "dense": torch.zeros(2, NUM_DENSE),
            "click": torch.zeros(2),
        }
    )
    warm_start(model, source.checkpoints.latest(), parts=("sparse",))
    assert torch.equal(rows(model, "user")[0], rows(source.model, "user")[0])


@pytest.mark.parametrize(
    ("include", "dense", "tables"),
    [
        (["mlp.*.bias"], ["mlp.0.bias", "mlp.2.bias"], set()),
        (["mlp.0"], ["mlp.0.bias", "mlp.0.weight"], set()),
        (["it?m"], [], {"item"}),
        (["user", "mlp.2.weight"], ["mlp.2.weight"], {"user"}),
    ],
)
def test_include_patterns_pick_names(source, include, dense, tables):
    result = warm_start(fresh(), source.checkpoints.latest(), include=include)
    assert sorted(result.dense) == dense
    assert set(result.tables) == tables


def test_an_include_pattern_matching_nothing_changes_nothing(source):
    model = fresh()
    before = dense_state(model)
    with pytest.raises(ConfigError, match=r"\['mlpp'\] match nothing"):
        warm_start(model, source.checkpoints.latest(), include=["mlp.0", "mlpp"])
    for key, value in before.items():
        assert torch.equal(dense_state(model)[key], value), key
    assert len(rows(model, "item")[0]) == 0


def test_an_exclude_pattern_matching_nothing_changes_nothing(source):
    # A misspelt exclude ("users" for the table "user") loaded the table it meant to keep.
    model = fresh()
    before = dense_state(model)
    with pytest.raises(ConfigError, match=r"exclude pattern\(s\) \['users'\] match nothing"):
        warm_start(model, source.checkpoints.latest(), exclude=["users", "mlp.2"])
    for key, value in before.items():
        assert torch.equal(dense_state(model)[key], value), key
    assert len(rows(model, "user")[0]) == 0


def test_an_include_pattern_whose_matches_are_all_excluded_is_named_as_such(source):
    # "mlp.0" matches, but exclude takes out every name it matches: not "match nothing".
    model = fresh()
    before = dense_state(model)
    with pytest.raises(
        ConfigError, match=r"\['mlp.0'\] match only names the exclude patterns \['mlp.0'\] take out"
    ):
        warm_start(model, source.checkpoints.latest(), include=["user", "mlp.0"], exclude=["mlp.0"])
    for key, value in before.items():
        assert torch.equal(dense_state(model)[key], value), key
    # An include pattern with some match left is fine.
    result = warm_start(
        model, source.checkpoints.latest(), include=["mlp.0"], exclude=["mlp.0.bias"]
    )
    assert sorted(result.dense) == ["mlp.0.weight"]


def test_a_table_of_another_dim_is_an_error_unless_excluded(source):
    model = fresh(item_dim=6)
    before = model.mlp[2].weight.clone()
    with pytest.raises(CheckpointError, match="'item' has dim 4"):
        warm_start(model, source.checkpoints.latest(), exclude=["mlp.0"])
    assert torch.equal(model.mlp[2].weight, before)  # nothing loaded before the error
    assert len(rows(model, "user")[0]) == 0
    result = warm_start(model, source.checkpoints.latest(), parts=("sparse",), exclude=["item"])
    assert set(result.tables) == {"user"}


def test_more_rows_than_a_tables_capacity_is_an_error_before_anything_loads(source):
    latest = source.checkpoints.latest()
    saved = {n: len(rows(source.model, n)[0]) for n in ("user", "item")}
    model = fresh(capacity=saved["user"] - 1)  # the user table's
    before = dense_state(model)
    want = rf"'user' has capacity {saved['user'] - 1}, but loading .* put {saved['user']} rows"
    with pytest.raises(CheckpointError, match=want):
        warm_start(model, latest)
    assert all(torch.equal(v, before[k]) for k, v in dense_state(model).items())
    assert len(rows(model, "user")[0]) == len(rows(model, "item")[0]) == 0
    result = warm_start(fresh(capacity=saved["user"]), latest)
    assert result.tables == saved


def test_a_tensor_of_another_shape_is_an_error(source):
    with pytest.raises(CheckpointError, match=r"mlp.0.weight \(8, 14\) vs \(5, 14\)"):
        warm_start(fresh(hidden=5), source.checkpoints.latest())
    result = warm_start(fresh(hidden=5), source.checkpoints.latest(), exclude=["mlp"])
    assert result.dense == []


def test_a_tensor_of_another_kind_of_dtype_is_an_error(tmp_path):
    from _toy import ToyModel, make_optimizers

    donor = ToyModel(40)
    dense, sparse = make_optimizers(donor)
    args = TrainingArguments(output_dir=str(tmp_path), device="cpu", train_steps=2)
    Trainer(
        donor, args, train_data=ToyReader(40, 10), dense_optimizer=dense, sparse_optimizer=sparse
    ).train()
    target = ToyModel(40)
    target.seen = target.seen.float()  # an int64 counter in the checkpoint
    before = target.mlp[0].weight.clone()
    with pytest.raises(CheckpointError, match=r"seen torch\.int64 vs torch\.float32\); exclude"):
        warm_start(target, tmp_path)
    assert torch.equal(target.mlp[0].weight, before)  # nothing loaded
    # Floating point precisions differ freely: the values are cast to the model's.
    wide = ToyModel(40).double()
    result = warm_start(wide, tmp_path, exclude=["seen"])
    assert "mlp.0.weight" in result.dense
    assert wide.mlp[0].weight.dtype == torch.float64
    assert torch.equal(wide.mlp[0].weight, donor.mlp[0].weight.double())


def test_rename_loads_a_moved_module_and_a_renamed_table(source):
    class Moved(nn.Module):
        """TwoTables with the MLP under ``head.body`` and the user table renamed."""

        def __init__(self):
            super().__init__()
            self.embeddings = emb.EmbeddingEngine(
                {"member": emb.EmbeddingOption(4), "item": emb.EmbeddingOption(4)}
            )
            self.head = nn.Module()
            self.head.body = nn.Sequential(nn.Linear(NUM_DENSE + 8, 8), nn.ReLU(), nn.Linear(8, 1))

    target = Moved()
    path = source.checkpoints.latest()
    result = warm_start(
        target, path, rename={"mlp": "head.body", "user": "member"}, exclude=["mlp.2"]
    )
    assert result.dense == ["head.body.0.bias", "head.body.0.weight"]
    assert set(result.tables) == {"member", "item"}
    assert result.skipped == []
    assert torch.equal(target.head.body[0].weight, source.model.mlp[0].weight)
    assert not torch.equal(target.head.body[2].weight, source.model.mlp[2].weight)
    want_ids, want_values = rows(source.model, "user")
    ids, values = rows(target, "member")
    assert torch.equal(ids, want_ids)
    assert torch.equal(values, want_values)
    # Without rename the moved names are only skipped.
    plain = warm_start(Moved(), path, parts=("dense",))
    assert plain.dense == []
    assert "mlp.0.weight" in plain.skipped
    with pytest.raises(ConfigError, match=r"rename prefix\(es\) \['tower'\] match nothing"):
        warm_start(Moved(), path, rename={"tower": "head.body"})
    with pytest.raises(ConfigError, match=r"maps tables 'item' and 'user' .* both to 'item'"):
        warm_start(Moved(), path, rename={"user": "item"})


def test_names_the_model_lacks_are_reported(source):
    class UserOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = emb.EmbeddingEngine({"user": emb.EmbeddingOption(4)})

    result = warm_start(UserOnly(), source.checkpoints.latest())
    assert set(result.tables) == {"user"}
    assert "item" in result.skipped
    assert "mlp.0.weight" in result.skipped


def test_optimizer_state_is_fresh_unless_asked_for(source):
    src_table, src_index = source.model.embeddings.table("user")
    ids = src_table.ids(src_index)
    want = src_table.read_slot(src_table.find(ids, src_index), "exp_avg")
    assert want.abs().sum() > 0
    for asked in (False, True):
        model = fresh()
        emb.SparseAdam(model, lr=0.05)
        warm_start(model, source.checkpoints.latest(), optimizer_state=asked)
        table, index = model.embeddings.table("user")
        got = table.read_slot(table.find(ids, index), "exp_avg")
        assert torch.equal(got, want) == asked


def test_optimizer_state_needs_matching_slots(source):
    model = fresh()
    emb.SparseSGD(model, lr=0.05)
    with pytest.raises(CheckpointError, match="optimizer slots"):
        warm_start(model, source.checkpoints.latest(), parts=("sparse",), optimizer_state=True)


def test_a_recis_embedding_checkpoint_and_a_trainer_target(source, tmp_path):
    emb.save(tmp_path / "tables", source.model)
    seed_everything(1)
    model = fresh()
    trainer = Trainer(
        model,
        TrainingArguments(output_dir=str(tmp_path / "run"), device="cpu"),
        train_data=ToyReader(50, 25),
        dense_optimizer=torch.optim.Adam(model.parameters()),
    )
    result = warm_start(trainer, tmp_path / "tables", include=["user", "mlp"])
    assert set(result.tables) == {"user"}
    assert torch.equal(model.mlp[0].weight, source.model.mlp[0].weight)
    assert torch.equal(rows(model, "user")[1], rows(source.model, "user")[1])


def test_a_delta_checkpoint_is_applied_over_its_parent(tmp_path):
    model = fresh()
    opt = emb.SparseSGD(model, lr=0.5)

    def step(ids):
        batch = {
            "ids": ids,
            "dense": torch.ones(len(ids), NUM_DENSE),
            "click": torch.ones(len(ids)),
        }
        model(batch).backward()
        opt.step()
        opt.zero_grad()

    step(torch.arange(10))
    emb.save(tmp_path / "full", model)
    step(torch.arange(5, 15))
    table, index = model.embeddings.table("user")
    table.erase(torch.tensor([0, 1]), index)
    emb.save(tmp_path / "delta", model, delta=True)
    target = fresh()
    warm_start(target, tmp_path / "delta", parts=("sparse",))
    for name in ("user", "item"):
        ids, values = rows(target, name)
        want_ids, want_values = rows(model, name)
        assert torch.equal(ids, want_ids)
        assert torch.equal(values, want_values)
    assert 0 not in rows(target, "user")[0].tolist()


def test_optimizer_state_of_a_chain_over_another_optimizer_s_base(tmp_path):
    """Base trained by Adagrad, then loaded (embeddings only) and trained by Adam, saved as a
    delta: with ``optimizer_state=True`` the rows take the state the delta's Adam tables hold,
    as recis-embedding's load of the chain gives them, never a slot of the base's Adagrad."""
    pretrained = fresh()
    adagrad = emb.SparseAdagrad(pretrained, lr=0.1)
    batch = {"ids": torch.arange(10), "dense": torch.ones(10, NUM_DENSE), "click": torch.ones(10)}
    pretrained(batch).backward()
    adagrad.step()
    emb.save(tmp_path / "base", pretrained, adagrad)
    model = fresh()
    with pytest.warns(UserWarning, match="only their embeddings"):
        emb.load(tmp_path / "base", model)
    adam = emb.SparseAdam(model, lr=0.1)
    model({**batch, "ids": torch.arange(5, 15)}).backward()
    adam.step()
    emb.save(tmp_path / "delta", model, adam, delta=True)

    target, loaded = fresh(), fresh()
    emb.SparseAdam(target, lr=0.1)
    warm_start(target, tmp_path / "delta", parts=("sparse",), optimizer_state=True)
    emb.load(tmp_path / "delta", loaded, emb.SparseAdam(loaded, lr=0.1), dense=False)
    for name in ("user", "item"):
        table, index = target.embeddings.table(name)
        want_table, want_index = loaded.embeddings.table(name)
        ids = torch.sort(want_table.ids(want_index)).values
        assert torch.equal(torch.sort(table.ids(index)).values, ids)
        got = table.read_full(table.find(ids, index))
        assert torch.equal(got, want_table.read_full(want_table.find(ids, want_index)))


def test_bad_arguments(source, tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        warm_start(fresh(), tmp_path)
    with pytest.raises(ConfigError, match="parts"):
        warm_start(fresh(), source.checkpoints.latest(), parts=("trainer",))
    with pytest.raises(ConfigError, match="sequence of name patterns"):
        warm_start(fresh(), source.checkpoints.latest(), include="mlp")
    with pytest.raises(ConfigError, match=r"nn\.Module or a Trainer"):
        warm_start(object(), source.checkpoints.latest())


def test_default_parts_are_those_the_checkpoint_has(tmp_path):
    def plain():
        torch.manual_seed(0)
        return nn.Linear(3, 1)

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = plain()

        def forward(self, x):
            return self.linear(x).pow(2).mean()

    donor = Plain()
    args = TrainingArguments(output_dir=str(tmp_path), device="cpu", train_steps=3)
    optimizer = torch.optim.SGD(donor.parameters(), lr=0.1)
    Trainer(donor, args, train_data=[torch.ones(4, 3)] * 3, dense_optimizer=optimizer).train()
    target = Plain()
    result = warm_start(target, tmp_path)
    assert result.dense == ["linear.bias", "linear.weight"]
    assert result.tables == {}
    assert torch.equal(target.linear.weight, donor.linear.weight)
    with pytest.raises(CheckpointError, match="step-000000003 has no sparse part"):
        warm_start(Plain(), tmp_path, parts=("sparse",))
