"""Contracts of the public API as torch users rely on them: optimizers as torch optimizers,
shared tables, copies of models, checkpoints across storage dtypes."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from recis_embedding import (
    CheckpointError,
    CheckpointReader,
    ConfigError,
    Constant,
    EmbeddingEngine,
    EmbeddingOption,
    FrequencyAdmission,
    Normal,
    OptimizerError,
    SparseAdam,
    SparseSGD,
    load,
    save,
)


def _two_tables() -> EmbeddingEngine:
    # Different dims: two physical tables.
    return EmbeddingEngine(
        {
            "a": EmbeddingOption(2, initializer=Constant(0.0)),
            "b": EmbeddingOption(3, initializer=Constant(0.0)),
        }
    )


def _train_step(engine: EmbeddingEngine, opt: torch.optim.Optimizer, batch: dict) -> None:
    out = engine(batch)
    opt.zero_grad()
    sum(out[f].sum() for f in batch).backward()
    opt.step()


def test_param_groups_give_each_table_its_own_learning_rate() -> None:
    engine = _two_tables()
    ta, tb = engine.table("a")[0], engine.table("b")[0]
    opt = SparseSGD([{"params": [ta], "lr": 1.0}, {"params": [tb]}], lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.1]
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    _train_step(engine, opt, {"a": torch.tensor([[5]]), "b": torch.tensor([[5]])})
    assert torch.equal(ta.embeddings(torch.tensor([5])), torch.full((1, 2), -1.0))
    assert torch.allclose(tb.embeddings(torch.tensor([5])), torch.full((1, 3), -0.1))
    # Schedulers drive each group's rate.
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.05]
    with pytest.raises(OptimizerError, match="not both"):
        SparseSGD([{"params": [ta]}, tb])
    with pytest.raises(OptimizerError, match="lr must be >= 0 in a param group"):
        SparseSGD([{"params": [ta], "lr": -1.0}])
    with pytest.raises(OptimizerError, match="optimizes HashTables"):
        SparseSGD([{"params": [torch.zeros(2, requires_grad=True)]}])


def test_add_param_group_takes_tables_and_gives_them_optimizer_state() -> None:
    engine = _two_tables()
    ta, tb = engine.table("a")[0], engine.table("b")[0]
    opt = SparseAdam([ta], lr=0.1)
    opt.add_param_group({"params": [tb], "lr": 0.5})
    assert tb.slots == [("exp_avg", 3), ("exp_avg_sq", 3), ("step", 1)]
    ids = torch.tensor([[7], [7]])
    _train_step(engine, opt, {"a": ids, "b": ids})
    _train_step(engine, opt, {"a": ids, "b": ids})
    # torch.optim.Adam on the same row (gradient 2: the id appears twice).
    ref = torch.nn.Parameter(torch.zeros(3))
    ref_opt = torch.optim.Adam([ref], lr=0.5)
    for _ in range(2):
        ref_opt.zero_grad()
        (2 * ref).sum().backward()
        ref_opt.step()
    assert torch.allclose(tb.embeddings(torch.tensor([7]))[0], ref.detach(), atol=1e-6)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [tb]})


def test_optimizer_load_state_dict_keeps_its_tables() -> None:
    engine = _two_tables()
    opt = SparseAdam(engine, lr=0.1)
    tables = opt.tables()
    # torch optimizers write their parameters' positions under "params".
    dense = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    opt.load_state_dict(dense.state_dict())
    assert opt.param_groups[0]["lr"] == 0.3
    assert opt.tables() == tables
    _train_step(engine, opt, {"a": torch.tensor([[1]]), "b": torch.tensor([[1]])})
    # Round trip of its own state.
    opt.param_groups[0]["lr"] = 0.25
    other = SparseAdam(_two_tables(), lr=0.1)
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["lr"] == 0.25
    assert other.param_groups[0]["betas"] == (0.9, 0.999)
    # Another optimizer's hyperparameters do not fit.
    sgd = SparseSGD(_two_tables(), lr=0.1)
    with pytest.raises(OptimizerError, match="missing \\['betas', 'eps'\\]"):
        other.load_state_dict(sgd.state_dict())
    with pytest.raises(
        OptimizerError, match="not hyperparameters of SparseSGD: \\['betas', 'eps'\\]"
    ):
        sgd.load_state_dict(other.state_dict())


def test_shared_table_with_conflicting_options_names_both_features() -> None:
    with pytest.raises(ConfigError, match=r"features 'q' and 'h' share table 'item'.*dtype="):
        EmbeddingEngine(
            {
                "q": EmbeddingOption(4, shared_name="item"),
                "h": EmbeddingOption(4, shared_name="item", dtype=torch.float16),
            }
        )
    with pytest.raises(ConfigError, match="admission=FrequencyAdmission\\(threshold=2\\) vs None"):
        EmbeddingEngine(
            {
                "q": EmbeddingOption(4, shared_name="item", admission=FrequencyAdmission(2)),
                "h": EmbeddingOption(4, shared_name="item"),
            }
        )
    # Combiners may differ: one table, each feature pooled its own way.
    engine = EmbeddingEngine(
        {
            "q": EmbeddingOption(2, shared_name="item", initializer=Normal(std=1.0)),
            "h": EmbeddingOption(
                2, shared_name="item", initializer=Normal(std=1.0), combiner="mean"
            ),
        }
    )
    ids = torch.tensor([[1, 2], [2, 2]])
    out = engine({"q": ids, "h": ids})
    table = engine.table("item")[0]
    e = table.embeddings(torch.tensor([1, 2]))
    assert torch.allclose(out["q"], torch.stack([e[0] + e[1], 2 * e[1]]))
    assert torch.allclose(out["h"], torch.stack([(e[0] + e[1]) / 2, e[1]]))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_model_keeps_frequency_admission_counts(how: str) -> None:
    engine = EmbeddingEngine(
        {"a": EmbeddingOption(2, admission=FrequencyAdmission(2), initializer=Constant(1.0))}
    )
    ids = {"a": torch.tensor([[1], [2]])}
    engine(ids)  # seen once: not admitted yet
    clone = copy.deepcopy(engine) if how == "deepcopy" else pickle.loads(pickle.dumps(engine))
    out = clone(ids)["a"]  # second sighting: admitted in the copy as in the original
    assert torch.equal(out, torch.ones(2, 2))
    assert len(clone.table("a")[0]) == 2
    assert len(engine.table("a")[0]) == 0  # the original is untouched
    assert torch.equal(engine(ids)["a"], torch.ones(2, 2))


def test_fp32_checkpoint_loads_into_fp16_table_by_rounding_or_refuses_overflow(tmp_path) -> None:
    src = EmbeddingEngine({"a": EmbeddingOption(3, initializer=Normal(std=100.0))})
    src({"a": torch.tensor([[1], [2], [-1]])})
    save(tmp_path / "ck", src)
    saved = CheckpointReader(tmp_path / "ck").read("a")
    half = EmbeddingEngine({"a": EmbeddingOption(3, dtype=torch.float16)})
    load(tmp_path / "ck", half)
    got = half.table("a")[0].embeddings()
    assert torch.equal(got, saved.to(torch.float16).to(torch.float32))
    # ... and back: float16 values are exact in float32.
    save(tmp_path / "half", half)
    wide = EmbeddingEngine({"a": EmbeddingOption(3)})
    load(tmp_path / "half", wide)
    assert torch.equal(wide.table("a")[0].embeddings(), got)
    # Values float16 cannot hold: a clear error, and the table keeps its rows.
    big = EmbeddingEngine({"a": EmbeddingOption(3, initializer=Constant(1e5))})
    big({"a": torch.tensor([[4]])})
    save(tmp_path / "big", big)
    with pytest.raises(CheckpointError, match=r"'a'.*3 embedding values saved as float32.*float16"):
        load(tmp_path / "big", half)
    assert torch.equal(half.table("a")[0].embeddings(), got)
