"""Delta chains: every checkpoint of a chain is checked before any table changes, optimizer
state of an earlier optimizer is never put back, and a copied chain finds its own parent."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from recis_embedding import (
    CheckpointError,
    EmbeddingEngine,
    EmbeddingOption,
    Normal,
    SparseAdagrad,
    SparseAdam,
    SparseRowWiseAdagrad,
    SparseSGD,
    load,
    save,
)


def _engine(**tables: int | None) -> EmbeddingEngine:
    names = tables or {"f": None}
    return EmbeddingEngine(
        {n: EmbeddingOption(4, initializer=Normal(std=0.5), capacity=c) for n, c in names.items()}
    )


def _step(engine: EmbeddingEngine, optimizer, **ids: list[int]) -> None:
    out = engine({n: torch.tensor(v)[:, None] for n, v in ids.items()})
    sum(v.square().sum() for v in out.values()).backward()
    optimizer.step()
    optimizer.zero_grad()


def _rows(engine: EmbeddingEngine, name: str = "f") -> tuple[list[int], torch.Tensor]:
    table, index = engine.table(name)
    ids = torch.sort(table.ids(index)).values
    return ids.tolist(), table.read_full(table.find(ids, index))


@pytest.mark.parametrize("optimizer", [SparseAdam, SparseRowWiseAdagrad])
def test_a_chain_over_another_optimizer_s_base_loads_as_the_full_save(tmp_path, optimizer):
    pretrained = _engine()
    adagrad = SparseAdagrad(pretrained, lr=0.1)
    _step(pretrained, adagrad, f=[1, 2, 3])
    _step(pretrained, adagrad, f=[1, 2, 3])
    save(tmp_path / "base", pretrained, adagrad)
    # Warm start: the embeddings only, then another optimizer trains on.
    model = _engine()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "only its embeddings are loaded"
        load(tmp_path / "base", model)
    new = optimizer(model, lr=0.1)
    _step(model, new, f=[3, 4])
    save(tmp_path / "delta", model, new, delta=True)
    save(tmp_path / "full", model, new)

    from_chain, from_full = _engine(), _engine()
    chain_optimizer, full_optimizer = optimizer(from_chain, lr=0.1), optimizer(from_full, lr=0.1)
    _step(from_chain, chain_optimizer, f=[9])  # rows the load replaces
    load(tmp_path / "delta", from_chain, chain_optimizer)
    load(tmp_path / "full", from_full, full_optimizer)
    chain_ids, chain_rows = _rows(from_chain)
    full_ids, full_rows = _rows(from_full)
    assert chain_ids == full_ids == [1, 2, 3, 4]
    assert torch.equal(chain_rows, full_rows)  # embeddings and optimizer slots
    assert torch.equal(chain_rows, _rows(model)[1])


@pytest.mark.parametrize("later_optimizer", [False, True])
def test_a_chain_never_gives_back_state_its_table_lost_after_the_base(tmp_path, later_optimizer):
    """Base saved with Adam; loaded without a sparse optimizer (embeddings only), so its rows
    no longer have that state; a delta then holds only the rows changed since. The chain must
    load as the full save of the same moment, also when a later delta records Adam again."""
    pretrained = _engine()
    adam = SparseAdam(pretrained, lr=0.1)
    _step(pretrained, adam, f=[1, 2])
    save(tmp_path / "base", pretrained, adam)
    model = _engine()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "only its embeddings are loaded"
        load(tmp_path / "base", model)
    model({"f": torch.tensor([[7]])})  # a training lookup inserts a row
    save(tmp_path / "delta", model, delta=True)
    last = "delta"
    if later_optimizer:
        model = _engine()
        load(tmp_path / "delta", model)
        adam = SparseAdam(model, lr=0.1)
        _step(model, adam, f=[8])
        save(tmp_path / "delta2", model, adam, delta=True)
        last = "delta2"
    save(tmp_path / "full", model, adam if later_optimizer else None)

    from_chain, from_full = _engine(), _engine()
    chain_optimizer, full_optimizer = SparseAdam(from_chain, lr=0.1), SparseAdam(from_full, lr=0.1)
    load(tmp_path / last, from_chain, chain_optimizer)
    load(tmp_path / "full", from_full, full_optimizer)
    chain_ids, chain_rows = _rows(from_chain)
    full_ids, full_rows = _rows(from_full)
    assert chain_ids == full_ids == ([1, 2, 7, 8] if later_optimizer else [1, 2, 7])
    assert torch.equal(chain_rows, full_rows)  # embeddings and optimizer slots


def test_a_missing_or_truncated_file_is_refused_before_any_table_changes(tmp_path):
    model = _engine(a=None, b=None)
    optimizer = SparseSGD(model, lr=0.1)
    _step(model, optimizer, a=[1], b=[2])
    save(tmp_path / "c", model, optimizer)
    shard = next((tmp_path / "c").rglob("b.*.safetensors"))
    target = _engine(a=None, b=None)
    target_optimizer = SparseSGD(target, lr=0.1)
    _step(target, target_optimizer, a=[7], b=[8])
    save(tmp_path / "own", target, target_optimizer)
    rel = shard.relative_to(tmp_path / "c")

    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(CheckpointError) as info:
        load(tmp_path / "c", target, target_optimizer, verify=False)
    assert str(info.value).startswith(
        f"checkpoint {tmp_path / 'c'}: file {rel} is not readable safetensors ("
    )
    shard.unlink()
    with pytest.raises(CheckpointError) as info:
        load(tmp_path / "c", target, target_optimizer, verify=False)
    assert str(info.value) == f"checkpoint {tmp_path / 'c'} is missing file {rel}"
    assert _rows(target, "a")[0] == [7]
    assert _rows(target, "b")[0] == [8]
    # Nothing changed, so a delta still builds on the model's own last save.
    _step(target, target_optimizer, a=[9], b=[8])
    save(tmp_path / "delta", target, target_optimizer, delta=True)
    again = _engine(a=None, b=None)
    load(tmp_path / "delta", again, SparseSGD(again, lr=0.1))
    assert _rows(again, "a")[0] == [7, 9]


def test_a_load_failing_after_tables_changed_allows_no_delta(tmp_path, monkeypatch):
    import recis_embedding._checkpoint_load as loading

    model = _engine()
    optimizer = SparseSGD(model, lr=0.1)
    _step(model, optimizer, f=[1])
    save(tmp_path / "c", model, optimizer)

    def broken(*args, **kwargs):
        raise OSError("the disk went away")

    monkeypatch.setattr(loading, "_load_table", broken)
    with pytest.raises(CheckpointError) as info:
        load(tmp_path / "c", model, optimizer)
    assert str(info.value) == (
        f"loading checkpoint {tmp_path / 'c'} failed after the tables began to change (the disk "
        "went away); they hold part of it: load a checkpoint again before training (a delta "
        "cannot follow)"
    )
    with pytest.raises(CheckpointError, match="delta checkpoint needs a previous save"):
        save(tmp_path / "d", model, optimizer, delta=True)


def test_a_copied_chain_loads_after_the_original_directory_is_reused(tmp_path):
    model = _engine()
    optimizer = SparseAdam(model, lr=0.1)
    _step(model, optimizer, f=[1, 2])
    save(tmp_path / "run" / "base", model, optimizer)
    _step(model, optimizer, f=[3])
    save(tmp_path / "run" / "d1", model, optimizer, delta=True)
    shutil.copytree(tmp_path / "run", tmp_path / "backup")
    other = _engine()
    other_optimizer = SparseAdam(other, lr=0.1)
    _step(other, other_optimizer, f=[42])
    save(tmp_path / "run" / "base", other, other_optimizer)  # a new run reuses the directory

    copy = _engine()
    load(tmp_path / "backup" / "d1", copy, SparseAdam(copy, lr=0.1))
    assert _rows(copy)[0] == [1, 2, 3]
    assert torch.equal(_rows(copy)[1], _rows(model)[1])


def test_the_capacity_check_counts_rows_a_chain_replaces_once(tmp_path):
    old = _engine(a=None)
    old_optimizer = SparseSGD(old, lr=0.1)
    _step(old, old_optimizer, a=[1, 2])
    save(tmp_path / "base", old, old_optimizer)
    grown = _engine(a=None, x=4)
    grown_optimizer = SparseSGD(grown, lr=0.1)
    load(tmp_path / "base", grown, grown_optimizer, strict=False)
    _step(grown, grown_optimizer, a=[3], x=[7, 8, 9])
    save(tmp_path / "delta", grown, grown_optimizer, delta=True)  # x first saved in a delta

    used = _engine(a=None, x=4)
    used_optimizer = SparseSGD(used, lr=0.1)
    _step(used, used_optimizer, a=[5], x=[10, 11, 12])  # the load replaces these 3 rows
    load(tmp_path / "delta", used, used_optimizer)
    assert _rows(used, "x")[0] == [7, 8, 9]


def test_deltas_naming_each_other_as_parents_are_refused_not_followed_forever(tmp_path):
    import json

    from recis_embedding._checkpoint import manifest_digest

    model = _engine()
    optimizer = SparseAdam(model, lr=0.1)
    _step(model, optimizer, f=[1, 2])
    save(tmp_path / "base", model, optimizer)
    _step(model, optimizer, f=[2, 3])
    save(tmp_path / "d1", model, optimizer, delta=True)
    _step(model, optimizer, f=[3, 4])
    save(tmp_path / "d2", model, optimizer, delta=True)
    fresh = _engine()
    ids = _rows(fresh)[0]
    # d1 made to build on d2 (and d2 builds on d1): a loop, as a hand edit could write.
    path = tmp_path / "d1" / "manifest.json"
    manifest = json.loads(path.read_text())
    d2 = json.loads((tmp_path / "d2" / "manifest.json").read_text())
    manifest.update(parent=str(tmp_path / "d2"), parent_relative="../d2", parent_id=d2["id"])
    manifest["manifest_sha256"] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="delta checkpoints name each other as parents"):
        load(tmp_path / "d2", fresh, SparseAdam(fresh, lr=0.1))
    assert _rows(fresh)[0] == ids


class _Recorded:
    """A checkpoint of a chain as far as ``_states_kept`` reads it."""

    def __init__(self, tables: dict[str, str]) -> None:
        self.manifest = {"tables": tables}

    def table_info(self, name: str) -> dict[str, object]:
        return {"optimizer": self.manifest["tables"][name], "slots": [("m", 4)]}


def test_saved_optimizer_state_counts_only_where_every_later_save_agrees() -> None:
    from recis_embedding._checkpoint_load import _states_kept

    # Adam, SGD, (table absent), Adam, Adam: an Adam state before the SGD save is not the
    # rows' at the end, though the chain ends with Adam again.
    chain = [
        _Recorded({"f": "adam"}),
        _Recorded({"f": "sgd"}),
        _Recorded({"g": "adam"}),
        _Recorded({"f": "adam"}),
        _Recorded({"f": "adam", "g": "sgd"}),
    ]
    assert _states_kept(chain, "f") == [False, False, False, True, True]  # type: ignore[arg-type]
    assert _states_kept(chain, "g") == [False, False, False, False, True]  # type: ignore[arg-type]
    assert _states_kept([], "f") == []
