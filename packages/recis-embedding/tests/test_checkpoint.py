from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import recis_embedding._checkpoint_save as save_mod
from recis_embedding import (
    CapacityEviction,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointReader,
    EmbeddingEngine,
    EmbeddingOption,
    Normal,
    SparseAdam,
    SparseSGD,
    load,
    save,
    tables_saved_separately,
)
from recis_kernels import RaggedTensor

DIM = 4


class Model(torch.nn.Module):
    def __init__(self, fuse: bool = True, dim: int = DIM) -> None:
        super().__init__()
        init = Normal(std=0.5)
        self.emb = EmbeddingEngine(
            {
                "user": EmbeddingOption(dim, initializer=init),
                "item": EmbeddingOption(dim, initializer=init, combiner="mean"),
                "hist": EmbeddingOption(dim, initializer=init, shared_name="item"),
            },
            fuse=fuse,
        )
        self.head = torch.nn.Linear(3 * dim, 1)

    def forward(self, batch):
        out = self.emb(batch)
        return self.head(torch.cat([out["user"], out["item"], out["hist"]], 1)).square().mean()


def batch(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(-50, 50, (8,), generator=g) * (1 << 58)
    return {
        "user": ids[:4, None],
        "item": RaggedTensor(ids, torch.tensor([0, 2, 5, 5, 8])),
        "hist": ids[4:, None],
    }


def train(model: Model, opt: SparseAdam, dense: torch.optim.Optimizer, steps: range) -> None:
    for k in steps:
        model(batch(k)).backward()
        opt.step()
        dense.step()
        opt.zero_grad()
        dense.zero_grad()


def build(fuse: bool = True) -> tuple[Model, SparseAdam, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Model(fuse)
    return model, SparseAdam(model, lr=0.05), torch.optim.SGD(model.head.parameters(), lr=0.1)


def state(model: Model) -> dict[str, torch.Tensor]:
    out = {}
    for name, (table, index) in sorted(model.emb.logical.items()):
        ids = table.ids(index)
        rows = table.find(ids, index)
        out[f"{name}.ids"] = ids
        out[f"{name}.rows"] = table.read_full(rows)
    with tables_saved_separately():  # the rows are read above
        out.update({k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_save_load_continues_training_identically(tmp_path) -> None:
    model, opt, dense = build()
    train(model, opt, dense, range(3))
    save(tmp_path / "c", model, opt)
    dense_state = dense.state_dict()
    train(model, opt, dense, range(3, 6))

    other, opt2, dense2 = build(fuse=False)  # fusion never changes checkpoint contents
    load(tmp_path / "c", other, opt2)
    dense2.load_state_dict(dense_state)
    train(other, opt2, dense2, range(3, 6))
    for name in ("user", "item"):
        ta, ia = model.emb.table(name)
        tb, ib = other.emb.table(name)
        assert torch.equal(ta.ids(ia), tb.ids(ib))
        assert torch.equal(ta.embeddings(table=ia), tb.embeddings(table=ib))
    assert torch.equal(model.head.weight, other.head.weight)


def test_delta_chain_loads_like_a_full_save(tmp_path) -> None:
    model, opt, dense = build()
    train(model, opt, dense, range(2))
    save(tmp_path / "base", model, opt)
    train(model, opt, dense, range(2, 4))
    save(tmp_path / "d1", model, opt, delta=True)
    table, index = model.emb.table("user")
    gone = table.ids(index)[:2]
    table.erase(gone, index)
    train(model, opt, dense, range(4, 5))
    save(tmp_path / "d2", model, opt, delta=True)
    save(tmp_path / "full", model, opt)

    reader = CheckpointReader(tmp_path / "d2")
    assert reader.kind == "delta"
    assert reader.read("user", "erased").tolist() == gone.tolist()
    assert reader.table_info("user")["rows"] < len(table)

    from_delta, opt_d, _ = build()
    load(tmp_path / "d2", from_delta, opt_d)
    from_full, opt_f, _ = build()
    load(tmp_path / "full", from_full, opt_f)
    assert_same(state(from_delta), state(from_full))
    assert_same(state(from_full), state(model))


def test_files_are_plain_safetensors_with_sorted_ids(tmp_path) -> None:
    model, opt, dense = build()
    train(model, opt, dense, range(2))
    save(tmp_path / "c", model, opt)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["tables"]["item"]["optimizer"] == "adam"
    assert manifest["optimizer"]["class"] == "SparseAdam"
    data = load_file(str(tmp_path / "c" / manifest["tables"]["item"]["files"][0]))
    assert sorted(data) == [
        "embeddings",
        "ids",
        "meta.frequency",
        "meta.inserted",
        "meta.last_seen",
        "slot.exp_avg",
        "slot.exp_avg_sq",
        "slot.step",
    ]
    assert data["ids"].tolist() == sorted(data["ids"].tolist())
    table, index = model.emb.table("item")
    assert torch.equal(data["embeddings"], table.embeddings(data["ids"], index))
    assert CheckpointReader(tmp_path / "c").tables() == ["item", "user"]


@pytest.mark.parametrize("fuse", [True, False])
def test_a_save_exports_each_physical_table_once(tmp_path, monkeypatch, fuse) -> None:
    # An export sorts every key of the physical table: the logical tables fused into one
    # share a single export, each file holding its own run of it.
    from recis_embedding import HashTable

    model, opt, dense = build(fuse)
    train(model, opt, dense, range(3))
    exported: list[int] = []
    real = HashTable.export
    monkeypatch.setattr(HashTable, "export", lambda self: exported.append(id(self)) or real(self))
    save(tmp_path / "c", model, opt)
    physical = {id(t) for t, _ in model.emb.logical.values()}
    assert len(physical) == (1 if fuse else 2)
    assert sorted(exported) == sorted(physical)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    for name in ("user", "item"):
        table, index = model.emb.table(name)
        data = load_file(str(tmp_path / "c" / manifest["tables"][name]["files"][0]))
        assert data["ids"].numel() > 0
        assert torch.equal(data["ids"], real(table)[0][real(table)[1] == index])
        assert torch.equal(data["embeddings"], table.embeddings(data["ids"], index))
        assert manifest["tables"][name]["rows"] == data["ids"].numel()


def test_corrupt_and_mismatched_checkpoints_raise(tmp_path) -> None:
    model, opt, dense = build()
    train(model, opt, dense, range(1))
    save(tmp_path / "c", model, opt)
    with pytest.raises(CheckpointError, match="dim 4, model has 8"):
        load(tmp_path / "c", Model(dim=8))
    f = next((tmp_path / "c" / "sparse").iterdir())
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    # Its own subclass, with both digests' heads, for callers that react to damaged files.
    with pytest.raises(
        CheckpointCorruptError,
        match=r"checksum mismatch for sparse/.* \(SHA-256 [0-9a-f]{16}\.\.\., the manifest "
        r"records [0-9a-f]{16}\.\.\.\)",
    ):
        load(tmp_path / "c", build()[0])
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        CheckpointReader(tmp_path / "nothing")
    fresh, _, _ = build()
    with pytest.raises(CheckpointError, match="delta checkpoint needs a previous save"):
        save(tmp_path / "d", fresh, delta=True)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    model, opt, dense = build()
    train(model, opt, dense, range(1))
    save(tmp_path / "c", model, opt)
    before = (tmp_path / "c" / "manifest.json").read_text()
    train(model, opt, dense, range(1, 2))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(save_mod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path / "c", model, opt)
    assert (tmp_path / "c" / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    CheckpointReader(tmp_path / "c")


def test_frequency_admission_counters_survive_a_checkpoint(tmp_path) -> None:
    from recis_embedding import FrequencyAdmission, SparseSGD

    def make():
        e = EmbeddingEngine({"f": EmbeddingOption(DIM, admission=FrequencyAdmission(threshold=2))})
        return e, SparseSGD(e, lr=0.1)

    engine, opt = make()
    engine({"f": torch.tensor([[1], [2]])})
    save(tmp_path / "c", engine, opt)
    assert CheckpointReader(tmp_path / "c").read("f", "admission.ids").tolist() == [1, 2]
    restored, opt2 = make()
    load(tmp_path / "c", restored, opt2)
    restored({"f": torch.tensor([[2], [3]])})  # 2 reaches the threshold, 3 is counted once
    assert restored.table("f")[0].ids().tolist() == [2]


def test_fused_tables_save_the_admission_counts_of_each_from_one_pass(tmp_path) -> None:
    # FrequencyAdmission.states() serves every logical table of a physical table from one
    # export of the counters; each file holds what state() gives for its table alone.
    from recis_embedding import FrequencyAdmission, SparseSGD

    names = ("a", "b", "c")
    policy = FrequencyAdmission(threshold=3)
    engine = EmbeddingEngine({n: EmbeddingOption(DIM, admission=policy) for n in names})
    opt = SparseSGD(engine, lr=0.1)
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        engine({n: torch.randint(-20, 20, (16, 1), generator=gen) * (1 << 59) for n in names})
    table, _ = engine.table("a")
    assert {id(engine.table(n)[0]) for n in names} == {id(table)}  # fused
    together = policy.states(table, [2, 0])
    assert sorted(together) == [0, 2]
    save(tmp_path / "c", engine, opt)
    reader = CheckpointReader(tmp_path / "c")
    for name in names:
        index = engine.table(name)[1]
        alone = policy.state(table, index)
        assert alone["ids"].numel() > 0
        if index in together:
            assert torch.equal(together[index]["ids"], alone["ids"])
            assert torch.equal(together[index]["counts"], alone["counts"])
        assert torch.equal(reader.read(name, "admission.ids"), alone["ids"])
        assert torch.equal(reader.read(name, "admission.counts"), alone["counts"])
    saved = policy.states(table, [0, 1, 2])
    # Loaded together (load_states) into the model that counted on, and into a new one: the
    # counts are the saved ones, not merged with those counted since.
    engine({n: torch.randint(-20, 20, (16, 1), generator=gen) * (1 << 59) for n in names})
    fresh = EmbeddingEngine({n: EmbeddingOption(DIM, admission=policy) for n in names})
    for model in (engine, fresh):
        load(tmp_path / "c", model, SparseSGD(model, lr=0.1))
        loaded = policy.states(model.table("a")[0], [0, 1, 2])
        for index in range(3):
            assert torch.equal(loaded[index]["ids"], saved[index]["ids"])
            assert torch.equal(loaded[index]["counts"], saved[index]["counts"])


def test_a_custom_admission_policys_state_round_trips_per_logical_table(tmp_path) -> None:
    # A policy with only state() and load_state(): the default states() and load_states()
    # call them per logical table; a checkpoint saved without the policy loads as no state.
    from dataclasses import dataclass

    from recis_embedding import AdmissionPolicy

    @dataclass(frozen=True)
    class Remembers(AdmissionPolicy):
        def admit(self, table, ids, tables):
            return torch.ones_like(ids, dtype=torch.bool)

        def state(self, table, index):
            kept = (table.admission_state or {}).get(index, torch.zeros(0, dtype=torch.int64))
            return {"ids": kept, "twice": 2 * kept}

        def load_state(self, table, index, state):
            table.admission_state = {**(table.admission_state or {}), index: state["ids"]}

    def make(policy):
        e = EmbeddingEngine({n: EmbeddingOption(DIM, admission=policy) for n in ("a", "b")})
        e({"a": torch.tensor([[1]]), "b": torch.tensor([[2]])})
        return e, SparseSGD(e, lr=0.1)

    engine, opt = make(Remembers())
    table, _ = engine.table("a")
    table.admission_state = {0: torch.tensor([7, 9]), 1: torch.tensor([-3])}
    save(tmp_path / "c", engine, opt)
    reader = CheckpointReader(tmp_path / "c")
    assert reader.read("a", "admission.twice").tolist() == [14, 18]
    other, other_opt = make(Remembers())
    load(tmp_path / "c", other, other_opt)
    kept = other.table("a")[0].admission_state
    assert {i: v.tolist() for i, v in kept.items()} == {0: [7, 9], 1: [-3]}
    plain, plain_opt = make(None)
    save(tmp_path / "plain", plain, plain_opt)
    load(tmp_path / "plain", other, other_opt)
    kept = other.table("a")[0].admission_state
    assert {i: v.tolist() for i, v in kept.items()} == {0: [], 1: []}


def test_delta_after_its_parent_was_renamed_needs_and_checks_the_new_place(tmp_path) -> None:
    model, opt, dense = build()
    train(model, opt, dense, range(1))
    save(tmp_path / "other", model, opt)  # an earlier save: not the parent
    train(model, opt, dense, range(1, 2))
    # Like a trainer's checkpoint: written inside a temporary directory, renamed when complete.
    save(tmp_path / ".writing" / "tables", model, opt)
    (tmp_path / ".writing").rename(tmp_path / "step-2")
    train(model, opt, dense, range(2, 4))
    with pytest.raises(CheckpointError, match=r"no longer exists .* pass parent="):
        save(tmp_path / "d1", model, opt, delta=True)
    train_state = state(model)
    # The failed attempt marked nothing saved: the delta still holds every change since step 2.
    save(tmp_path / "d1", model, opt, delta=True, parent=tmp_path / "step-2" / "tables")
    assert CheckpointReader(tmp_path / "d1").parent == (tmp_path / "step-2" / "tables").resolve()
    loaded, opt_l, _ = build()
    load(tmp_path / "d1", loaded, opt_l)
    assert_same(state(loaded), train_state)

    with pytest.raises(CheckpointError, match="not the previous save of these tables"):
        save(tmp_path / "d2", model, opt, delta=True, parent=tmp_path / "other")
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        save(tmp_path / "d2", model, opt, delta=True, parent=tmp_path / "nowhere")


def test_delta_whose_parent_was_overwritten_refuses_to_load(tmp_path) -> None:
    model, opt, dense = build()
    train(model, opt, dense, range(2))
    save(tmp_path / "base", model, opt)
    train(model, opt, dense, range(2, 3))
    save(tmp_path / "d1", model, opt, delta=True)
    train(model, opt, dense, range(3, 4))
    save(tmp_path / "base", model, opt)  # a later full save replaces the delta's parent
    with pytest.raises(CheckpointError, match="overwritten by a later save"):
        load(tmp_path / "d1", build()[0])


def test_delta_chain_moved_as_a_whole_still_loads(tmp_path) -> None:
    model, opt, dense = build()
    train(model, opt, dense, range(2))
    save(tmp_path / "a" / "base", model, opt)
    train(model, opt, dense, range(2, 4))
    save(tmp_path / "a" / "d1", model, opt, delta=True)
    (tmp_path / "a").rename(tmp_path / "b")
    loaded, opt_l, _ = build()
    load(tmp_path / "b" / "d1", loaded, opt_l)
    assert_same(state(loaded), state(model))


def test_loading_some_fused_tables_keeps_the_others(tmp_path) -> None:
    small = EmbeddingEngine({"a": EmbeddingOption(DIM)})
    small({"a": torch.tensor([1, 2])})
    save(tmp_path / "a", small)
    for fuse in (True, False):
        e = EmbeddingEngine({"a": EmbeddingOption(DIM), "b": EmbeddingOption(DIM)}, fuse=fuse)
        e({"a": torch.tensor([7]), "b": torch.tensor([10, 11])})
        b_before = e.table("b")[0].embeddings(table=e.table("b")[1])
        load(tmp_path / "a", e, strict=False)
        (ta, ia), (tb, ib) = e.table("a"), e.table("b")
        assert ta.ids(ia).tolist() == [1, 2], fuse
        assert tb.ids(ib).tolist() == [10, 11], fuse
        assert torch.equal(tb.embeddings(table=ib), b_before)


def test_optimizer_state_loads_only_into_its_own_optimizer(tmp_path) -> None:
    from recis_embedding import SparseAdamW

    model, opt, dense = build()
    train(model, opt, dense, range(2))
    save(tmp_path / "c", model, opt)
    other = Model()
    with pytest.raises(CheckpointError, match="SparseAdam sparse optimizer; it cannot be loaded"):
        load(tmp_path / "c", other, SparseAdamW(other, lr=0.05))
    bare = Model()
    with pytest.warns(UserWarning, match="create the sparse optimizer before load") as caught:
        load(tmp_path / "c", bare)
    # One warning for the load, naming every table, not one per table.
    (warning,) = [w for w in caught if "sparse optimizer" in str(w.message)]
    for name in CheckpointReader(tmp_path / "c").manifest["tables"]:
        assert repr(name) in str(warning.message)


def test_optimizer_state_with_other_param_groups_is_refused_before_anything_changes(
    tmp_path,
) -> None:
    model, opt, dense = build()
    train(model, opt, dense, range(2))
    save(tmp_path / "c", model, opt)
    other, other_opt, other_dense = build(fuse=False)
    train(other, other_opt, other_dense, range(5, 6))
    tables = [t for t, _ in {id(t): (t, i) for t, i in other.emb.logical.values()}.values()]
    two_groups = SparseAdam([{"params": tables[:1], "lr": 0.5}, {"params": tables[1:]}])
    before = state(other)
    with pytest.raises(CheckpointError, match=r"state has 1 param groups, optimizer has 2"):
        load(tmp_path / "c", other, two_groups)
    after = state(other)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_save_replaces_only_a_checkpoint_or_an_empty_directory(tmp_path) -> None:
    model, opt, dense = build()
    train(model, opt, dense, range(1))
    (tmp_path / "file").write_text("someone's data")
    with pytest.raises(CheckpointError, match=r"file exists and is not a directory"):
        save(tmp_path / "file", model, opt)
    assert (tmp_path / "file").read_text() == "someone's data"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.csv").write_text("1,2")
    with pytest.raises(CheckpointError, match=r"data is a directory that holds no checkpoint"):
        save(tmp_path / "data", model, opt)
    assert (tmp_path / "data" / "x.csv").read_text() == "1,2"
    (tmp_path / "empty").mkdir()
    save(tmp_path / "empty", model, opt)
    save(tmp_path / "empty", model, opt)  # now a checkpoint: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "empty", "file"]
    # A manifest.json of something else (a data set's) does not make a directory a checkpoint.
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "manifest.json").write_text('{"files": ["part-0.parquet"]}')
    (tmp_path / "dataset" / "part-0.parquet").write_text("rows")
    with pytest.raises(CheckpointError, match=r"dataset holds a manifest.json that is not a rec"):
        save(tmp_path / "dataset", model, opt)
    (tmp_path / "dataset" / "manifest.json").write_text("not json")
    with pytest.raises(CheckpointError, match=r"not a recis-embedding checkpoint's \(Expecting"):
        save(tmp_path / "dataset", model, opt)
    assert (tmp_path / "dataset" / "part-0.parquet").read_text() == "rows"
    # Hidden names are the file system's (.DS_Store, NFS's .nfsXXXX): replaced with it.
    (tmp_path / "empty" / ".DS_Store").write_text("finder")
    save(tmp_path / "empty", model, opt)
    # Nor is anything saved inside a checkpoint deleted with it: a checkpoint saved in it, notes.
    save(tmp_path / "empty" / "best", model, opt)
    (tmp_path / "empty" / "notes.txt").write_text("step 1")
    with pytest.raises(
        CheckpointError, match=r"empty is a checkpoint that also holds best, notes.txt, which a "
    ):
        save(tmp_path / "empty", model, opt)
    assert CheckpointReader(tmp_path / "empty" / "best").manifest["tables"]
    assert (tmp_path / "empty" / "notes.txt").read_text() == "step 1"


def test_state_that_is_not_a_tensor_is_refused_and_leaves_the_previous_save(tmp_path) -> None:
    model, opt, dense = build()
    train(model, opt, dense, range(1))
    save(tmp_path / "c", model, opt)
    before = sorted(p.name for p in (tmp_path / "c").rglob("*"))

    class Calibration(torch.nn.Module):
        def get_extra_state(self) -> dict:
            return {"scale": 1.5}

        def set_extra_state(self, state: dict) -> None:
            pass

    model.calibration = Calibration()
    with pytest.raises(
        CheckpointError,
        match=r"entries that are not tensors \(\{'calibration\._extra_state': 'dict'\}",
    ):
        save(tmp_path / "c", model, opt)
    assert sorted(p.name for p in (tmp_path / "c").rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_delta_carries_the_eviction_statistics_of_rows_only_read(tmp_path) -> None:
    # Rows read without a gradient are never written, but lookups change their LFU/LRU
    # statistics.
    def make():
        option = EmbeddingOption(DIM, capacity=10, eviction=CapacityEviction("lfu"))
        return EmbeddingEngine({"f": option})

    engine = make()
    with torch.no_grad():
        engine({"f": torch.tensor([[1], [2], [3]])})
        save(tmp_path / "base", engine)
        engine({"f": torch.tensor([[1], [1], [2]])})
    save(tmp_path / "delta", engine, delta=True)
    save(tmp_path / "full", engine)
    for name in ("delta", "full"):
        loaded = make()
        load(tmp_path / name, loaded)
        table, _ = loaded.table("f")
        rows = table.find(torch.tensor([1, 2, 3]))
        assert table.frequency[rows].tolist() == [3, 2, 1], name


def test_erasures_are_kept_only_for_the_next_delta(tmp_path) -> None:
    # A table with a capacity evicts every step of a long run; only the erasure of an id the
    # last save holds is news to a delta. Recording every one grew without bound between
    # saves (a run that never saves never shrank it).
    def make():
        option = EmbeddingOption(DIM, capacity=8, eviction=CapacityEviction("lru"))
        return EmbeddingEngine({"f": option})

    def step(engine, ids):
        with torch.no_grad():
            engine({"f": torch.tensor(ids)[:, None]})
        table.step += 1

    engine = make()
    table, _ = engine.table("f")
    for k in range(50):  # never saved: no delta can come, nothing to keep
        step(engine, [4 * k, 4 * k + 1, 4 * k + 2, 4 * k + 3])
    assert table._erased == []
    save(tmp_path / "base", engine)
    base = set(table.ids().tolist())
    for k in range(50, 100):  # evicts the saved ids, then ids inserted since
        step(engine, [4 * k, 4 * k + 1, 4 * k + 2, 4 * k + 3])
    assert set(table.erased_ids(0).tolist()) == base
    save(tmp_path / "delta", engine, delta=True)
    save(tmp_path / "full", engine)
    for name in ("delta", "full"):  # the delta erased what the base held
        loaded = make()
        load(tmp_path / name, loaded)
        assert torch.equal(loaded.table("f")[0].ids(), table.ids()), name


def test_a_changed_manifest_fails_its_checksum(tmp_path) -> None:
    model, opt, dense = build()
    train(model, opt, dense, range(2))
    save(tmp_path / "c", model, opt)
    path = tmp_path / "c" / "manifest.json"
    text = path.read_text()
    path.write_text(text.replace('"lr": 0.05', '"lr": 0.07'))
    with pytest.raises(CheckpointError, match=r"checksum mismatch for manifest\.json"):
        load(tmp_path / "c", build()[0])
    path.write_text(text)
    CheckpointReader(tmp_path / "c")


def test_a_failed_rename_puts_the_previous_checkpoint_back(tmp_path, monkeypatch) -> None:
    model, opt, dense = build()
    train(model, opt, dense, range(1))
    save(tmp_path / "c", model, opt)
    before = (tmp_path / "c" / "manifest.json").read_text()
    train(model, opt, dense, range(1, 2))
    real = save_mod.os.replace

    def replace(src, dst):
        if ".tmp" in str(src):
            raise OSError("rename failed")
        real(src, dst)

    monkeypatch.setattr(save_mod.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        save(tmp_path / "c", model, opt)
    monkeypatch.undo()
    assert (tmp_path / "c" / "manifest.json").read_text() == before
    CheckpointReader(tmp_path / "c")


def test_strict_load_refuses_tables_the_model_lacks(tmp_path) -> None:
    both = EmbeddingEngine({"a": EmbeddingOption(DIM), "b": EmbeddingOption(DIM)})
    both({"a": torch.tensor([1, 2]), "b": torch.tensor([5])})
    save(tmp_path / "ab", both)
    only_a = EmbeddingEngine({"a": EmbeddingOption(DIM)})
    only_a({"a": torch.tensor([9])})
    with pytest.raises(CheckpointError, match=r"has tables \['b'\] that the model lacks"):
        load(tmp_path / "ab", only_a)
    assert only_a.table("a")[0].ids().tolist() == [9]  # refused before any table changed
    load(tmp_path / "ab", only_a, strict=False)
    assert only_a.table("a")[0].ids().tolist() == [1, 2]


def test_loading_part_of_a_fused_table_sets_one_clock_with_or_without_rows(tmp_path) -> None:
    # Ranks of a sharded table may receive rows of a table or none: the clock must not
    # depend on it, or shards age rows (StaleEviction) on different clocks.
    for ids in ([1, 2], []):
        small = EmbeddingEngine({"a": EmbeddingOption(DIM)})
        opt = SparseSGD(small, lr=0.1)
        small({"a": torch.tensor(ids, dtype=torch.int64)})["a"].sum().backward()
        opt.step()
        save(tmp_path / "a", small)
        big = EmbeddingEngine({"a": EmbeddingOption(DIM), "b": EmbeddingOption(DIM)})
        opt_big = SparseSGD(big, lr=0.1)
        for _ in range(4):
            big({"a": torch.tensor([7]), "b": torch.tensor([10])})["b"].sum().backward()
            opt_big.step()
            opt_big.zero_grad()
        load(tmp_path / "a", big, strict=False)
        table, index = big.table("a")
        assert table.ids(index).tolist() == ids
        assert table.step == 4, ids  # b's later clock stays


def test_load_without_verify_reads_no_file_for_checksums_but_checks_manifests(
    tmp_path, monkeypatch
) -> None:
    import recis_embedding._checkpoint as checkpoint_mod

    model, opt, dense = build()
    train(model, opt, dense, range(2))
    save(tmp_path / "base", model, opt)
    train(model, opt, dense, range(2, 4))
    save(tmp_path / "d1", model, opt, delta=True)
    hashed: list[str] = []
    real = checkpoint_mod.sha256
    monkeypatch.setattr(checkpoint_mod, "sha256", lambda p: hashed.append(p.name) or real(p))
    files = [
        f
        for c in ("base", "d1")
        for f in json.loads((tmp_path / c / "manifest.json").read_text())["files"]
    ]

    verified, opt_v, _ = build()
    load(tmp_path / "d1", verified, opt_v)
    assert sorted(hashed) == sorted(f.split("/")[-1] for f in files)
    hashed.clear()
    trusted, opt_t, _ = build()
    load(tmp_path / "d1", trusted, opt_t, verify=False)
    assert hashed == []
    assert_same(state(trusted), state(verified))
    assert_same(state(trusted), state(model))

    # A manifest's own checksum is still checked, the parent's too.
    path = tmp_path / "base" / "manifest.json"
    path.write_text(path.read_text().replace('"lr": 0.05', '"lr": 0.07'))
    with pytest.raises(CheckpointError, match=r"checksum mismatch for manifest\.json"):
        load(tmp_path / "d1", build()[0], verify=False)


def test_loading_draws_no_initial_vectors(tmp_path, monkeypatch) -> None:
    # Saved rows go into the tables whole: the initializer (whose vectors would only be
    # overwritten) is not asked for them.
    model, opt, dense = build()
    train(model, opt, dense, range(3))
    save(tmp_path / "c", model, opt)
    other, opt2, _ = build()
    drawn: list[int] = []
    real = Normal.sample
    monkeypatch.setattr(
        Normal, "sample", lambda self, ids, *a: drawn.append(ids.numel()) or real(self, ids, *a)
    )
    load(tmp_path / "c", other, opt2)
    assert drawn == []
    assert_same(state(other), state(model))
    other(batch(99))  # new ids afterwards are initialized as before
    assert drawn


@pytest.mark.parametrize(
    ("runs", "files", "present", "calls", "distinct"),
    [
        ([[-5, 3, 9], [-7, 3, 8]], 2, [], 2, True),  # an id in two files: the later wins
        ([[1, 2], [0, 4]], 3, [], 1, True),  # shards of one save into an empty table
        ([[1, 2], [0, 4]], 3, [4], 2, True),  # into a table holding rows: per file
        ([[4], [3], [2, 6]], 2, [], 1, False),  # more runs than files: not as written
        ([[1, 2, 3]], 1, [], 1, False),  # one file: insert_or_assign sees the order itself
    ],
)
def test_saved_rows_go_in_one_call_or_one_per_shard_file(
    monkeypatch, runs, files, present, calls, distinct
) -> None:
    from recis_embedding import HashTable
    from recis_embedding._checkpoint_load import _insert_saved

    table = HashTable(1)
    if present:
        table.find_or_insert(torch.tensor(present))
    made: list[tuple[list[int], bool]] = []
    real = HashTable.insert_or_assign
    monkeypatch.setattr(
        HashTable,
        "insert_or_assign",
        lambda self, ids, *a, **k: (
            made.append((ids.tolist(), k.get("distinct", False))) or real(self, ids, *a, **k)
        ),
    )
    ids = torch.tensor([x for run in runs for x in run])
    full = torch.arange(ids.numel(), dtype=torch.float32)[:, None]
    rows = _insert_saved(table, ids, full, 0, files)
    assert len(made) == calls
    # Runs as written strictly increase and are passed on as distinct, split or joined.
    assert [d for _, d in made] == [distinct] * calls
    expected = {x: float(k) for k, x in enumerate(ids.tolist())}  # the last one of an id
    assert table.ids().tolist() == sorted(expected)
    assert table.embeddings(ids)[:, 0].tolist() == [expected[x] for x in ids.tolist()]
    assert torch.equal(rows, table.find(ids))


def test_a_delta_cannot_replace_a_checkpoint_further_up_its_own_chain(tmp_path) -> None:
    # Alternating two directories with deltas: the third save would overwrite the base the
    # second one needs, leaving nothing loadable.
    model, opt, dense = build()
    train(model, opt, dense, range(2))
    save(tmp_path / "p", model, opt)
    train(model, opt, dense, range(2, 3))
    save(tmp_path / "q", model, opt, delta=True)
    train(model, opt, dense, range(3, 4))
    with pytest.raises(CheckpointError, match=r"cannot replace .*p: the checkpoint it builds on"):
        save(tmp_path / "p", model, opt, delta=True)
    for name in ("p", "q"):  # both still load
        load(tmp_path / name, build()[0], build()[1])
    save(tmp_path / "r", model, opt, delta=True)  # elsewhere is fine
    restored, opt_r, _ = build()
    load(tmp_path / "r", restored, opt_r)
    assert_same(state(restored), state(model))


def test_a_table_first_saved_in_a_delta_is_replaced_when_the_chain_loads(tmp_path) -> None:
    def make(names: tuple[str, ...]) -> tuple[EmbeddingEngine, SparseSGD]:
        engine = EmbeddingEngine({n: EmbeddingOption(DIM) for n in names})
        return engine, SparseSGD(engine, lr=0.1)

    def step(engine: EmbeddingEngine, opt: SparseSGD, ids: dict) -> None:
        out = engine({k: torch.tensor(v)[:, None] for k, v in ids.items()})
        sum(o.sum() for o in out.values()).backward()
        opt.step()
        opt.zero_grad()

    old, old_opt = make(("a",))
    step(old, old_opt, {"a": [1, 2]})
    save(tmp_path / "base", old, old_opt)
    grown, grown_opt = make(("a", "x"))
    load(tmp_path / "base", grown, grown_opt, strict=False)  # "x" is new and empty
    step(grown, grown_opt, {"a": [2, 3], "x": [7, 8]})
    save(tmp_path / "delta", grown, grown_opt, delta=True)

    used, used_opt = make(("a", "x"))
    step(used, used_opt, {"a": [5], "x": [9]})  # rows the load must not keep
    load(tmp_path / "delta", used, used_opt)
    (x, ix), (a, ia) = used.table("x"), used.table("a")
    assert x.ids(ix).tolist() == [7, 8]
    assert a.ids(ia).tolist() == [1, 2, 3]
    want, want_index = grown.table("x")
    assert torch.equal(x.embeddings(table=ix), want.embeddings(table=want_index))


def test_clear_and_slot_writes_reach_the_next_delta(tmp_path) -> None:
    model, opt, dense = build(fuse=False)  # clear() empties the whole physical table
    train(model, opt, dense, range(2))
    save(tmp_path / "base", model, opt)
    user, _ = model.emb.table("user")
    step = user.step
    user.clear()
    assert len(user) == 0
    assert user.step == step  # the clock does not go back
    item, index = model.emb.table("item")
    rows = item.find(item.ids(index)[:2], index)
    item.write_slot(rows, "exp_avg", torch.full((2, DIM), 7.0))
    save(tmp_path / "delta", model, opt, delta=True)
    save(tmp_path / "full", model, opt)
    from_delta, opt_d, _ = build()
    load(tmp_path / "delta", from_delta, opt_d)
    from_full, opt_f, _ = build()
    load(tmp_path / "full", from_full, opt_f)
    assert_same(state(from_delta), state(from_full))
    assert_same(state(from_full), state(model))
    assert from_delta.emb.table("user")[0].step == step


def test_loading_a_checkpoint_without_admission_counts_drops_the_models_own(tmp_path) -> None:
    from recis_embedding import FrequencyAdmission

    plain = EmbeddingEngine({"f": EmbeddingOption(DIM)})
    plain({"f": torch.tensor([[1]])})
    save(tmp_path / "c", plain, SparseSGD(plain, lr=0.1))

    def make() -> EmbeddingEngine:
        return EmbeddingEngine({"f": EmbeddingOption(DIM, admission=FrequencyAdmission(2))})

    used = make()
    used({"f": torch.tensor([[5]])})  # counted once
    load(tmp_path / "c", used, SparseSGD(used, lr=0.1))
    used({"f": torch.tensor([[5]])})  # counted once again, as in a fresh model: not admitted
    assert used.table("f")[0].ids().tolist() == [1]


def test_a_save_interrupted_between_its_renames_is_recovered(tmp_path) -> None:
    model, opt, dense = build()
    train(model, opt, dense, range(1))
    save(tmp_path / "c", model, opt)
    kept = state(model)
    # What a crash after moving the previous checkpoint aside leaves (the pid of a restarted
    # container is often the same, so the next save may run under it).
    aside = tmp_path / f".c.old-{os.getpid()}"
    (tmp_path / "c").rename(aside)
    with pytest.raises(CheckpointError, match=r"interrupted save left the previous checkpoint"):
        load(tmp_path / "c", build()[0])
    (aside / "sparse" / "stale").write_text("the directory is not empty")
    train(model, opt, dense, range(1, 2))
    with pytest.MonkeyPatch.context() as mp:  # a failing save keeps it, at its place now
        mp.setattr(save_mod, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("full")))
        with pytest.raises(OSError, match="full"):
            save(tmp_path / "c", model, opt)
    restored, opt_r, _ = build()
    load(tmp_path / "c", restored, opt_r)
    assert_same(state(restored), kept)
    save(tmp_path / "c", model, opt)  # a save that succeeds leaves nothing beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_a_manifest_that_is_not_an_object_is_a_checkpoint_error(tmp_path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "manifest.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="not a recis-embedding checkpoint manifest"):
        CheckpointReader(tmp_path / "c")


def test_accumulators_of_new_rows_must_start_as_they_were_saved(tmp_path) -> None:
    from recis_embedding import SparseAdagrad, SparseFTRL

    for cls in (SparseAdagrad, SparseFTRL):
        engine = EmbeddingEngine({"f": EmbeddingOption(DIM)})
        engine({"f": torch.tensor([[1]])})
        save(tmp_path / cls.__name__, engine, cls(engine, initial_accumulator_value=0.5))
        other = EmbeddingEngine({"f": EmbeddingOption(DIM)})
        with pytest.raises(CheckpointError, match=r"initial_accumulator_value=0\.5, this"):
            load(tmp_path / cls.__name__, other, cls(other, initial_accumulator_value=0.25))
        same = EmbeddingEngine({"f": EmbeddingOption(DIM)})
        load(tmp_path / cls.__name__, same, cls(same, initial_accumulator_value=0.5))


# Checkpoints of the tables alone: save(..., dense=False) and load(..., dense=False).


def table_rows(model: Model) -> dict[str, torch.Tensor]:
    """The rows of every logical table (``state`` without the dense tensors)."""
    return {k: v for k, v in state(model).items() if k.split(".")[0] in model.emb.logical}


def dense_of(model: Model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.head.state_dict().items()}


def scrambled() -> tuple[Model, SparseAdam]:
    """A fresh model whose dense weights differ from any trained one's, and an optimizer with
    other hyperparameters than the saved ones."""
    model, _, _ = build()
    with torch.no_grad():
        model.head.weight.fill_(7.0)
        model.head.bias.fill_(-3.0)
    return model, SparseAdam(model, lr=0.5)


def manifest_files(path) -> dict[str, str]:
    return json.loads((path / "manifest.json").read_text())["files"]


@pytest.mark.parametrize("verify", [True, False])
def test_tables_only_checkpoint_restores_tables_and_leaves_the_dense_state(
    tmp_path, verify
) -> None:
    model, opt, dense = build()
    train(model, opt, dense, range(3))
    save(tmp_path / "c", model, opt, dense=False)

    assert not (tmp_path / "c" / "dense.safetensors").exists()
    assert "dense.safetensors" not in manifest_files(tmp_path / "c")
    assert manifest_files(tmp_path / "c")  # the table files are listed

    other, opt2 = scrambled()
    before = dense_of(other)
    load(tmp_path / "c", other, opt2, verify=verify)
    assert_same(table_rows(other), table_rows(model))
    assert_same(dense_of(other), before)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.05
    # The same tables as a checkpoint with the dense state gives.
    save(tmp_path / "with", model, opt)
    full, opt3, _ = build()
    load(tmp_path / "with", full, opt3, verify=verify)
    assert_same(table_rows(other), table_rows(full))
    assert_same(dense_of(full), dense_of(model))


def test_reader_tells_whether_a_checkpoint_has_the_dense_state(tmp_path) -> None:
    model, opt, dense = build()
    train(model, opt, dense, range(2))
    save(tmp_path / "with", model, opt)
    save(tmp_path / "without", model, opt, dense=False)

    with_dense = CheckpointReader(tmp_path / "with")
    assert with_dense.has_dense
    assert_same(with_dense.dense(), head_state(model))
    without = CheckpointReader(tmp_path / "without")
    assert not without.has_dense
    with pytest.raises(CheckpointError, match=r"saved with dense=False"):
        without.dense()
    assert without.tables() == with_dense.tables()
    for name in without.tables():
        assert torch.equal(without.read(name), with_dense.read(name))


def head_state(model: Model) -> dict[str, torch.Tensor]:
    return {f"head.{k}": v for k, v in dense_of(model).items()}


def test_a_dense_file_the_manifest_names_but_that_is_gone_is_a_checkpoint_error(
    tmp_path,
) -> None:
    model, opt, _ = build()
    save(tmp_path / "c", model, opt)
    (tmp_path / "c" / "dense.safetensors").unlink()
    reader = CheckpointReader(tmp_path / "c", verify=False)
    assert reader.has_dense
    with pytest.raises(CheckpointError, match=r"missing file dense\.safetensors"):
        reader.dense()


def test_a_tables_only_checkpoint_loads_into_a_model_with_another_dense_part(tmp_path) -> None:
    model, opt, dense = build()
    train(model, opt, dense, range(2))
    save(tmp_path / "c", model, opt, dense=False)

    class Wider(Model):
        def __init__(self) -> None:
            super().__init__()
            self.extra = torch.nn.Linear(2, 2)

    other = Wider()
    load(tmp_path / "c", other, SparseAdam(other, lr=0.5))  # strict: the tables must match
    assert_same(table_rows(other), table_rows(model))


@pytest.mark.parametrize("verify", [True, False])
def test_deltas_without_the_dense_state(tmp_path, verify) -> None:
    model, opt, dense = build()
    train(model, opt, dense, range(2))
    save(tmp_path / "base", model, opt)  # with the dense state
    train(model, opt, dense, range(2, 4))
    save(tmp_path / "d1", model, opt, delta=True, dense=False)
    at_d1 = dense_of(model)
    train(model, opt, dense, range(4, 6))
    save(tmp_path / "d2", model, opt, delta=True)  # the dense state again
    at_d2 = dense_of(model)
    train(model, opt, dense, range(6, 8))
    save(tmp_path / "d3", model, opt, delta=True, dense=False)

    assert "dense.safetensors" not in manifest_files(tmp_path / "d1")
    assert not (tmp_path / "d1" / "dense.safetensors").exists()
    assert not CheckpointReader(tmp_path / "d3").has_dense
    assert CheckpointReader(tmp_path / "d2").has_dense

    # A delta without the dense state leaves it as it is, not as its parent saved it.
    other, opt2 = scrambled()
    before = dense_of(other)
    load(tmp_path / "d3", other, opt2, verify=verify)
    assert_same(table_rows(other), table_rows(model))
    assert_same(dense_of(other), before)
    # A delta with the dense state loads its own, whatever its parents hold.
    other, opt2 = scrambled()
    load(tmp_path / "d2", other, opt2, verify=verify)
    assert not torch.equal(dense_of(other)["weight"], at_d1["weight"])
    assert_same(dense_of(other), at_d2)


def test_load_can_leave_the_dense_state_of_a_checkpoint_that_holds_one(tmp_path) -> None:
    model, opt, dense = build()
    train(model, opt, dense, range(2))
    save(tmp_path / "c", model, opt)

    other, opt2 = scrambled()
    before = dense_of(other)
    load(tmp_path / "c", other, opt2, dense=False)
    assert_same(table_rows(other), table_rows(model))
    assert_same(dense_of(other), before)
    load(tmp_path / "c", other, opt2)
    assert_same(dense_of(other), dense_of(model))
