"""``load`` refuses a checkpoint that does not fit the model before any table changes."""

from __future__ import annotations

import pytest
import torch

from recis_embedding import (
    CapacityEviction,
    CheckpointError,
    EmbeddingEngine,
    EmbeddingOption,
    Normal,
    SparseSGD,
    load,
    save,
)

DIM = 3


class Model(torch.nn.Module):
    def __init__(self, out: int = 2, capacity: int | None = None, extra: bool = False) -> None:
        super().__init__()
        eviction = CapacityEviction("lfu") if capacity is not None else None
        option = EmbeddingOption(
            DIM, initializer=Normal(std=0.5), capacity=capacity, eviction=eviction
        )
        self.emb = EmbeddingEngine({"user": option})
        self.head = torch.nn.Linear(DIM, out)
        if extra:
            self.extra = torch.nn.Linear(DIM, 1)


def train(model: Model, ids: list[int]) -> SparseSGD:
    opt = SparseSGD(model, lr=0.1)
    model.emb({"user": torch.tensor(ids)})["user"].sum().backward()
    opt.step()
    opt.zero_grad()
    return opt


def snapshot(model: Model) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    table, index = model.emb.table("user")
    ids = table.ids(index)
    dense = {k: v.clone() for k, v in model.head.state_dict().items()}
    return ids, table.lookup(ids, index), dense


def assert_unchanged(model: Model, before: tuple) -> None:
    ids, emb, dense = snapshot(model)
    assert torch.equal(ids, before[0])
    assert torch.equal(emb, before[1])
    assert dense.keys() == before[2].keys()
    for k, v in dense.items():
        assert torch.equal(v, before[2][k])


@pytest.fixture
def checkpoint(tmp_path):
    model = Model()
    opt = train(model, list(range(10)))
    return save(tmp_path / "ckpt", model, opt)


@pytest.mark.parametrize("strict", [True, False])
def test_dense_shape_mismatch_leaves_tables(checkpoint, strict):
    model = Model(out=4)
    opt = train(model, [100, 101])
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"size mismatch for head\.weight.*nothing was"):
        load(checkpoint, model, opt, strict=strict)
    assert_unchanged(model, before)


def test_dense_values_that_would_change_kind_leave_tables(tmp_path):
    saved = Model()
    saved.register_buffer("calibration", torch.tensor([0.25, 1.75, -2.5]))
    opt = train(saved, list(range(10)))
    save(tmp_path / "ckpt", saved, opt)
    model = Model()
    model.register_buffer("calibration", torch.zeros(3, dtype=torch.int64))
    opt = train(model, [100, 101])
    before = snapshot(model)
    with pytest.raises(
        CheckpointError,
        match=r"dtype mismatch for calibration: torch.float32 in the checkpoint, torch.int64 in",
    ):
        load(tmp_path / "ckpt", model, opt)
    assert_unchanged(model, before)
    assert model.calibration.tolist() == [0, 0, 0]
    # Floating point values are cast to the model's precision, as torch casts them.
    model.calibration = torch.zeros(3, dtype=torch.float64)
    load(tmp_path / "ckpt", model, opt)
    assert model.calibration.tolist() == [0.25, 1.75, -2.5]
    # Integers may widen, not narrow.
    saved.calibration = torch.tensor([1, -2, 2**40])
    save(tmp_path / "ints", saved, train(saved, [1]))
    model.calibration = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(CheckpointError, match=r"dtype mismatch for calibration: torch.int64 in"):
        load(tmp_path / "ints", model, opt)
    saved.calibration = torch.tensor([1, -2, 3], dtype=torch.int16)
    save(tmp_path / "ints", saved, train(saved, [1]))
    model.calibration = torch.zeros(3, dtype=torch.int64)
    load(tmp_path / "ints", model, opt)
    assert model.calibration.tolist() == [1, -2, 3]


def test_dense_missing_keys_leave_tables(checkpoint):
    model = Model(extra=True)
    opt = train(model, [100, 101])
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"missing keys \['extra\.bias', 'extra\.weight'\]"):
        load(checkpoint, model, opt)
    assert_unchanged(model, before)
    load(checkpoint, model, opt, strict=False)  # strict=False loads the keys there are
    assert model.emb.table("user")[0].ids().tolist() == list(range(10))


def test_checkpoint_beyond_capacity_leaves_table(checkpoint):
    model = Model(capacity=5)
    opt = train(model, [100, 101])
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"'user' has capacity 5.*would put 10 rows"):
        load(checkpoint, model, opt)
    assert_unchanged(model, before)


def test_capacity_counts_rows_of_each_checkpoint_of_a_delta_chain(tmp_path):
    """The rows the base leaves, then each delta (base, minus erased, plus added), must fit."""
    model = Model()
    opt = train(model, [1, 2, 3])
    save(tmp_path / "base", model, opt)
    model.emb.table("user")[0].erase(torch.tensor([1, 2]))
    train(model, [5, 6])
    save(tmp_path / "delta", model, opt, delta=True)  # holds 3, 5, 6
    train(model, [7])
    save(tmp_path / "delta2", model, opt, delta=True)  # holds 3, 5, 6, 7

    fits = Model(capacity=3)
    fits_opt = train(fits, [100])
    load(tmp_path / "delta", fits, fits_opt)
    assert fits.emb.table("user")[0].ids().tolist() == [3, 5, 6]
    assert fits.emb.table("user")[0].stats().evictions == 0
    with pytest.raises(CheckpointError, match="would put 4 rows in it"):
        load(tmp_path / "delta2", fits, fits_opt)
    assert fits.emb.table("user")[0].ids().tolist() == [3, 5, 6]

    small = Model(capacity=2)
    small_opt = train(small, [100])
    with pytest.raises(CheckpointError, match="would put 3 rows in it"):
        load(tmp_path / "delta", small, small_opt)
    assert small.emb.table("user")[0].ids().tolist() == [100]


def test_capacity_counts_the_base_of_a_delta_chain(tmp_path):
    """A base larger than the capacity is refused although the chain ends smaller: loading
    it would raise TableFullError (or evict) halfway through the chain."""
    model = Model()
    opt = train(model, [1, 2, 3, 4])
    save(tmp_path / "base", model, opt)
    model.emb.table("user")[0].erase(torch.tensor([1, 2]))
    save(tmp_path / "delta", model, opt, delta=True)  # holds 3, 4

    target = Model(capacity=3)
    target_opt = train(target, [100])
    with pytest.raises(CheckpointError, match="would put 4 rows in it"):
        load(tmp_path / "delta", target, target_opt)
    assert target.emb.table("user")[0].ids().tolist() == [100]


def test_load_reads_each_table_file_once(tmp_path, monkeypatch):
    """A table file holds ~10 tensors; reading it whole once per tensor read it ~10 times.
    It is opened twice: its header is checked before any table changes, then it is read."""
    import safetensors
    import safetensors.torch

    import recis_embedding._checkpoint as ckpt_mod

    model = Model()
    opt = train(model, list(range(10)))
    path = save(tmp_path / "ckpt", model, opt)
    opened: list[str] = []

    def counting_load_file(name, *args, **kwargs):
        opened.append(str(name))
        return safetensors.torch.load_file(name, *args, **kwargs)

    def counting_safe_open(name, *args, **kwargs):
        opened.append(str(name))
        return safetensors.safe_open(name, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "load_file", counting_load_file)
    monkeypatch.setattr(ckpt_mod, "safe_open", counting_safe_open, raising=False)
    target = Model()
    load(path, target, train(target, [100]))
    table_files = [f for f in opened if "/sparse/" in f.replace("\\", "/")]
    assert len(table_files) == 2, table_files
    assert len(set(table_files)) == 1, table_files
    assert target.emb.table("user")[0].ids().tolist() == list(range(10))


def _engine(names: list[str]) -> EmbeddingEngine:
    return EmbeddingEngine({n: EmbeddingOption(DIM, initializer=Normal(std=0.5)) for n in names})


@pytest.mark.parametrize("fuse", [True, False])
def test_delta_after_a_load_that_kept_other_rows_is_refused(tmp_path, fuse):
    """``strict=False`` keeps the rows of a table the checkpoint lacks; a delta built on that
    checkpoint would hold only their later changes, and loading it lost the rest silently."""
    source = _engine(["user"])
    source({"user": torch.arange(5)})
    save(tmp_path / "users", source)

    model = EmbeddingEngine(
        {n: EmbeddingOption(DIM, initializer=Normal(std=0.5)) for n in ("user", "item")},
        fuse=fuse,
    )
    opt = SparseSGD(model, lr=0.1)
    model({"user": torch.arange(100, 103), "item": torch.arange(10)})
    load(tmp_path / "users", model, opt, strict=False)
    model({"user": torch.tensor([0]), "item": torch.tensor([0])})["item"].sum().backward()
    opt.step()
    with pytest.raises(CheckpointError, match=r"tables \['item'\] kept rows.*full checkpoint"):
        save(tmp_path / "delta", model, opt, delta=True)
    assert not (tmp_path / "delta").exists()

    save(tmp_path / "full", model, opt)  # a full save, then deltas again
    model({"user": torch.tensor([1]), "item": torch.tensor([11])})
    save(tmp_path / "delta", model, opt, delta=True)
    restored = EmbeddingEngine(
        {n: EmbeddingOption(DIM, initializer=Normal(std=0.5)) for n in ("user", "item")}
    )
    load(tmp_path / "delta", restored, SparseSGD(restored, lr=0.1))
    table, index = restored.table("item")
    assert table.ids(index).tolist() == [*range(10), 11]


def test_delta_after_a_load_that_left_a_table_empty(tmp_path):
    """A table the checkpoint lacks that held no rows at the load needs no parent: all its
    rows are later changes, so deltas stay possible and load back whole."""
    source = _engine(["user"])
    source({"user": torch.arange(5)})
    save(tmp_path / "users", source)

    model = _engine(["user", "item"])
    load(tmp_path / "users", model, strict=False)
    model({"user": torch.tensor([7]), "item": torch.arange(4)})
    save(tmp_path / "delta", model, delta=True)
    restored = _engine(["user", "item"])
    load(tmp_path / "delta", restored)
    assert restored.table("item")[0].ids(restored.table("item")[1]).tolist() == [0, 1, 2, 3]
    assert restored.table("user")[0].ids(restored.table("user")[1]).tolist() == [0, 1, 2, 3, 4, 7]


def _edit_table_file(path, edit) -> None:
    """Rewrite the table file of checkpoint ``path`` with ``edit(tensors)`` applied and record
    its new checksum, as a hand edit that passes the checksums would."""
    import json

    from safetensors.torch import load_file, save_file

    from recis_embedding._checkpoint import manifest_digest, sha256

    manifest = json.loads((path / "manifest.json").read_text())
    (rel,) = manifest["tables"]["user"]["files"]
    tensors = load_file(str(path / rel))
    edit(tensors, manifest)
    save_file(tensors, str(path / rel))
    if rel in manifest["files"]:
        manifest["files"][rel] = sha256(path / rel)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t, m: t.update(ids=t["ids"].int()), r"'ids' is I32 of shape \[10\]"),
        (
            lambda t, m: t.update(embeddings=t["embeddings"][:-2].clone()),
            r"'embeddings' is F32 of shape \[8, 3\], expected F32 of shape \[10, 3\]",
        ),
        (lambda t, m: t.pop("meta.frequency"), r"no tensor 'meta.frequency'"),
        (
            lambda t, m: m["tables"]["user"].update(dtype="float16"),
            r"'embeddings' is F32 of shape \[10, 3\], expected F16",
        ),
        (
            lambda t, m: m["files"].pop(m["tables"]["user"]["files"][0]),
            r"names file .* which has no checksum in the manifest",
        ),
    ],
)
def test_table_files_that_do_not_fit_their_manifest_are_refused_before_any_table_changes(
    tmp_path, edit, message
) -> None:
    model = Model()
    opt = train(model, list(range(10)))
    path = save(tmp_path / "ckpt", model, opt)
    _edit_table_file(path, edit)
    target = Model()
    target_opt = train(target, [100, 101])
    before = target.emb.table("user")[0].ids().tolist()
    with pytest.raises(CheckpointError, match=message):
        load(path, target, target_opt)
    assert target.emb.table("user")[0].ids().tolist() == before


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(kind="bogus"), r"kind must be 'full' or 'delta', got 'bogus'"),
        (
            lambda m: m["tables"]["user"].update(dim="3"),
            r"table 'user': dim must be a non-negative",
        ),
        (lambda m: m["tables"]["user"].pop("slots"), r"table 'user': slots must list"),
        (
            lambda m: m["tables"]["user"].update(rows=-3),
            r"table 'user': rows must be a non-negative",
        ),
        (lambda m: m.update(files=[]), r"'files' must map file names to checksums"),
    ],
)
def test_manifest_entries_of_the_wrong_shape_are_refused_by_name(tmp_path, edit, message):
    import json

    from recis_embedding._checkpoint import manifest_digest

    model = Model()
    path = save(tmp_path / "ckpt", model, train(model, [1, 2]))
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    target = Model()
    with pytest.raises(CheckpointError, match=r"manifest\.json: " + message):
        load(path, target, train(target, [5]))
    assert target.emb.table("user")[0].ids().tolist() == [5]
