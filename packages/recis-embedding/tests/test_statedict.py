"""``model.state_dict()`` holds no embeddings, and says so when tables hold rows."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import recis_embedding
from recis_embedding import (
    DynamicEmbedding,
    EmbeddingEngine,
    EmbeddingOption,
    SparseAdam,
    TablesNotInStateDictWarning,
    load,
    save,
    tables_saved_separately,
)


class Model(nn.Module):
    def __init__(self, shard: bool = False) -> None:
        super().__init__()
        self.emb = EmbeddingEngine(
            {
                "user": EmbeddingOption(4),
                "item": EmbeddingOption(4),
                "history": EmbeddingOption(4, shared_name="item", combiner="mean"),
                "city": EmbeddingOption(4),
            },
            shard=shard,
        )
        self.head = nn.Linear(12, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.emb(batch)
        return self.head(torch.cat([out["user"], out["item"], out["history"]], dim=1))


def batch() -> dict[str, torch.Tensor]:
    # 3 user ids, 4 item ids (item and history share the table), no city id.
    return {
        "user": torch.tensor([[1], [2], [3]]),
        "item": torch.tensor([[10], [11], [10]]),
        "history": torch.tensor([[12, 13], [10, 10], [11, 12]]),
        "city": torch.zeros(3, 0, dtype=torch.int64),
    }


def test_a_state_dict_of_trained_tables_warns_naming_them_and_their_rows() -> None:
    model = Model()
    model(batch())
    with pytest.warns(TablesNotInStateDictWarning) as record:
        state = model.state_dict()
    assert sorted(state) == ["head.bias", "head.weight"]
    assert len(record) == 1
    message = str(record[0].message)
    assert "module 'emb' hold 7 rows" in message
    assert "('item': 4, 'user': 3)" in message  # the empty 'city' is not named
    assert "recis_embedding.save(" in message
    assert "tables_saved_separately()" in message
    assert record[0].filename == __file__  # the line that called state_dict()
    assert issubclass(TablesNotInStateDictWarning, UserWarning)


def test_unfused_tables_and_dynamic_embedding_warn_too() -> None:
    engine = EmbeddingEngine({"a": EmbeddingOption(4), "b": EmbeddingOption(4)}, fuse=False)
    engine({"a": torch.tensor([[5], [6]]), "b": torch.tensor([[7], [7]])})
    with pytest.warns(TablesNotInStateDictWarning, match=r"the EmbeddingEngine hold 3 rows"):
        engine.state_dict()
    single = DynamicEmbedding(EmbeddingOption(4), name="query")
    single(torch.tensor([[9]]))
    with pytest.warns(TablesNotInStateDictWarning, match=r"1 row that .*\('query': 1\)"):
        single.state_dict()


def test_empty_tables_do_not_warn() -> None:
    model = Model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.state_dict()
        model.eval()
        model(batch())  # eval() inserts nothing
        model.state_dict()


def test_no_warning_inside_tables_saved_separately_and_again_after_it() -> None:
    model = Model()
    model(batch())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with tables_saved_separately():
            with tables_saved_separately():
                model.state_dict()
            model.state_dict()  # still inside the outer block
    with pytest.warns(TablesNotInStateDictWarning):
        model.state_dict()

    @tables_saved_separately()
    def dense_only() -> dict[str, torch.Tensor]:
        return model.state_dict()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sorted(dense_only()) == ["head.bias", "head.weight"]


def test_once_per_call_site_under_the_default_action() -> None:
    model = Model()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        for step in range(3):
            model.emb(batch() | {"user": torch.full((3, 1), 100 + step)})  # one more row
            model.state_dict()  # row counts change, the site does not
        assert len(record) == 1
        model.state_dict()  # another line: another site
        assert len(record) == 2
        assert all(r.category is TablesNotInStateDictWarning for r in record)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            model.state_dict()
        assert len(record) == 3


def test_save_and_load_do_not_warn_and_keep_the_rows(tmp_path) -> None:
    model = Model()
    model(batch())
    opt = SparseAdam(model, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save(tmp_path / "ckpt", model, opt)
        other = Model()
        load(tmp_path / "ckpt", other, SparseAdam(other, lr=0.1))
    assert other.emb.rows_per_table() == {"user": 3, "item": 4, "city": 0}
    assert torch.equal(other.emb.table("item")[0].ids(), model.emb.table("item")[0].ids())


def test_copies_keep_the_warning() -> None:
    model = Model()
    model(batch())
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with pytest.warns(TablesNotInStateDictWarning, match="hold 7 rows"):
            clone.state_dict()


def test_a_ddp_wrapped_model_warns_naming_the_wrapped_module(tmp_path) -> None:
    # Every other test starts its process groups in child processes.
    assert not dist.is_initialized(), "a process group is already initialized in this process"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        model = Model(shard=True)
        ddp = DistributedDataParallel(model)
        ddp(batch()).sum().backward()
        with pytest.warns(TablesNotInStateDictWarning) as record:
            state = ddp.state_dict()
        assert sorted(state) == ["module.head.bias", "module.head.weight"]
        assert len(record) == 1
        message = str(record[0].message)
        assert "module 'module.emb' (this rank's shard) hold 7 rows" in message
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with recis_embedding.tables_saved_separately():
                ddp.state_dict()
    finally:
        dist.destroy_process_group()
