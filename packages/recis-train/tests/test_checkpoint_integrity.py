"""Checkpoint checksums: a file whose bytes changed but whose size did not is caught on restore."""

from __future__ import annotations

import io
import json
import logging
import os
import zlib
from pathlib import Path

import pytest
import torch
from _toy import TableModel, ToyModel, ToyReader, make_optimizers

import recis_embedding as emb
from recis_train import CheckpointManager, Trainer, TrainingArguments, seed_everything, warm_start
from recis_train._checkpoint import file_checksum
from recis_train.exceptions import CheckpointCorruptError, CheckpointError

SUM = r"\(crc32 expected [0-9a-f]{8}, found [0-9a-f]{8}\)"


def build(out, **args):
    seed_everything(0)
    model = ToyModel(600)
    dense, sparse = make_optimizers(model)
    settings = {"output_dir": str(out), "device": "cpu", "epochs": 2, "deterministic": True}
    return Trainer(
        model,
        TrainingArguments(**(settings | args)),
        train_data=ToyReader(600, 30),
        dense_optimizer=dense,
        sparse_optimizer=sparse,
    )


def build_tables(out, **args):
    seed_everything(0)
    model = TableModel()
    return Trainer(
        model,
        TrainingArguments(output_dir=str(out), device="cpu", **args),
        train_data=ToyReader(200, 25),
        dense_optimizer=torch.optim.Adam(model.mlp.parameters(), lr=0.02),
        sparse_optimizer=emb.SparseAdam(model, lr=0.02),
    )


def params_of(model):
    with emb.tables_saved_separately():  # dense tensors only
        return {k: v.clone() for k, v in model.state_dict().items()}


def params(trainer):
    return params_of(trainer.model)


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def flip_middle_byte(file: Path) -> None:
    """One bit of one byte in the middle of the file's data changes; its size does not."""
    data = bytearray(file.read_bytes())
    start = 0
    if file.suffix == ".safetensors":  # past the JSON header: a tensor's bytes
        start = 8 + int.from_bytes(data[:8], "little")
    data[start + (len(data) - start) // 2] ^= 0x10
    file.write_bytes(bytes(data))


def step(root: Path, number: int) -> Path:
    return root / f"step-{number:09d}"


def test_file_checksum_is_the_crc32_of_the_bytes_across_chunks(tmp_path):
    data = os.urandom((9 << 20) + 3)  # more than two 4 MiB chunks, the last one short
    file = tmp_path / "blob"
    file.write_bytes(data)
    assert file_checksum(file) == f"{zlib.crc32(data):08x}"
    (tmp_path / "empty").write_bytes(b"")
    assert file_checksum(tmp_path / "empty") == "00000000"


def test_a_clean_checkpoint_records_every_files_checksum_and_verifies(tmp_path):
    trainer = build(tmp_path, train_steps=3)
    trainer.train()
    path = trainer.checkpoints.latest()
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["checksums"]["algo"] == "crc32"
    assert set(manifest["checksums"]["files"]) == set(manifest["files"])
    for name, recorded in manifest["checksums"]["files"].items():
        assert recorded == f"{zlib.crc32((path / name).read_bytes()):08x}", name
    assert CheckpointManager.verify(path) == manifest
    assert CheckpointManager.mismatches(path) == []
    fresh = build(tmp_path)
    assert fresh.restore() == path
    assert fresh.global_step == 3
    assert_same(params(fresh), params(trainer))


@pytest.mark.parametrize("damaged", ["dense/model.safetensors", "trainer/state.pt"])
def test_a_flipped_byte_in_the_newest_checkpoint_falls_back_on_resume(tmp_path, caplog, damaged):
    whole = build(tmp_path / "whole", train_steps=12)
    whole.train()
    trainer = build(tmp_path / "run", train_steps=12, save_every=3, max_to_keep=2)
    trainer.train()
    root = tmp_path / "run" / "checkpoints"
    flip_middle_byte(step(root, 12) / damaged)
    assert trainer.checkpoints.latest() == step(root, 12)  # listing checks sizes only
    fresh = build(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="recis_train"):
        assert fresh.restore() == step(root, 9)
    assert fresh.global_step == 9
    assert "skipping checkpoint" in caplog.text
    assert str(step(root, 12)) in caplog.text
    assert f"{damaged} (crc32 expected" in caplog.text
    resumed = build(tmp_path / "run", train_steps=12, save_every=3, max_to_keep=2)
    resumed.train()  # resumes from step 9 and writes step 12 again, replacing the damaged one
    assert_same(params(resumed), params(whole))
    assert CheckpointManager.verify(step(root, 12))["step"] == 12


@pytest.mark.parametrize("damaged", ["dense/model.safetensors", "trainer/state.pt"])
def test_restoring_a_damaged_checkpoint_by_path_names_the_file_and_loads_nothing(tmp_path, damaged):
    trainer = build(tmp_path, train_steps=3)
    trainer.train()
    path = trainer.checkpoints.latest()
    flip_middle_byte(path / damaged)
    fresh = build(tmp_path)
    before = params(fresh)
    pattern = rf"step-000000003: checkpoint file\(s\) changed .*: {damaged} {SUM}"
    with pytest.raises(CheckpointCorruptError, match=pattern) as caught:
        fresh.restore(path)
    assert isinstance(caught.value, CheckpointError)
    assert fresh.global_step == 0
    assert_same(params(fresh), before)
    with pytest.raises(CheckpointCorruptError, match=pattern):
        CheckpointManager.verify(path)


def test_when_no_checkpoint_verifies_the_error_lists_every_one_tried(tmp_path, caplog):
    trainer = build(tmp_path, train_steps=6, save_every=3)
    trainer.train()
    root = trainer.checkpoints.root
    flip_middle_byte(step(root, 6) / "dense" / "model.safetensors")
    flip_middle_byte(step(root, 3) / "trainer" / "state.pt")
    pattern = (
        rf"no checkpoint in {root} passes verification; tried, newest first: "
        rf"step-000000006 \(dense/model\.safetensors {SUM}\); "
        rf"step-000000003 \(trainer/state\.pt {SUM}\)"
    )
    for missing_ok in (False, True):  # damaged checkpoints are not missing ones
        with pytest.raises(CheckpointCorruptError, match=pattern):
            build(tmp_path).restore(missing_ok=missing_ok)


def test_a_run_whose_checkpoints_are_all_truncated_does_not_start_over(tmp_path):
    """A truncated file makes a checkpoint incomplete (passed over for the one before it); when
    every checkpoint is, the run raises instead of training from step 0 over them."""
    build(tmp_path, train_steps=6, save_every=3).train()
    root = tmp_path / "checkpoints"
    for number in (3, 6):
        dense = step(root, number) / "dense" / "model.safetensors"
        dense.write_bytes(dense.read_bytes()[:-3])
    pattern = (
        rf"no checkpoint in {root} passes verification; incomplete although their manifest is "
        r"there \(files truncated or missing since they were saved\): step-000000006 \(.*; "
        r"step-000000003 \("
    )
    for missing_ok in (False, True):
        with pytest.raises(CheckpointCorruptError, match=pattern):
            build(tmp_path).restore(missing_ok=missing_ok)
    rerun = build(tmp_path, train_steps=6, save_every=3)
    with pytest.raises(CheckpointCorruptError, match=pattern):
        rerun.train()
    assert rerun.global_step == 0
    # One complete checkpoint left: it is taken, the damaged newer one passed over.
    (tmp_path / "fresh").mkdir()
    build(tmp_path / "fresh", train_steps=3).train()
    step(root, 3).rename(tmp_path / "old-3")
    step(tmp_path / "fresh" / "checkpoints", 3).rename(step(root, 3))
    assert build(tmp_path).restore() == step(root, 3)


def test_only_the_parts_restored_are_verified(tmp_path):
    donor = build(tmp_path / "donor", train_steps=3)
    donor.train()
    path = donor.checkpoints.latest()
    flip_middle_byte(path / "trainer" / "state.pt")
    fresh = build(tmp_path / "fresh")
    assert fresh.restore(path, parts=("dense",)) == path
    assert torch.equal(fresh.model.mlp[0].weight, donor.model.mlp[0].weight)
    with pytest.raises(CheckpointCorruptError, match=r"trainer/state\.pt"):
        fresh.restore(path)


def test_a_checkpoint_written_before_checksums_still_loads(tmp_path):
    trainer = build(tmp_path, train_steps=3)
    trainer.train()
    path = trainer.checkpoints.latest()
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["checksums"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert CheckpointManager.verify(path) == manifest
    fresh = build(tmp_path)
    assert fresh.restore() == path
    assert fresh.global_step == 3
    assert_same(params(fresh), params(trainer))


def test_an_unknown_checksum_algorithm_is_refused_by_name(tmp_path):
    trainer = build(tmp_path, train_steps=3)
    trainer.train()
    path = trainer.checkpoints.latest()
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["checksums"]["algo"] = "xxh3"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"checksums use 'xxh3', .* verifies 'crc32'"):
        build(tmp_path).restore(path)


def test_a_damaged_table_file_falls_back_on_resume_and_is_named_by_path(tmp_path, caplog):
    trainer = build_tables(tmp_path, train_steps=6, save_every=3)
    trainer.train()
    root = trainer.checkpoints.root
    (table_file,) = (step(root, 6) / "sparse" / "tables" / "sparse").glob("*.safetensors")
    name = table_file.relative_to(step(root, 6)).as_posix()
    flip_middle_byte(table_file)
    with pytest.raises(CheckpointCorruptError, match=rf"{name} {SUM}"):
        build_tables(tmp_path).restore(step(root, 6))
    fresh = build_tables(tmp_path)
    with caplog.at_level(logging.WARNING, logger="recis_train"):
        assert fresh.restore() == step(root, 3)
    assert name in caplog.text
    assert fresh.global_step == 3


def test_warm_start_verifies_the_checkpoint_it_reads(tmp_path, caplog):
    donor = build(tmp_path / "donor", train_steps=6, save_every=3)
    donor.train()
    root = donor.checkpoints.root
    flip_middle_byte(step(root, 6) / "dense" / "model.safetensors")
    model = ToyModel(600)
    with pytest.raises(CheckpointCorruptError, match=rf"dense/model\.safetensors {SUM}"):
        warm_start(model, step(root, 6), parts=("dense",))
    # A run's directory: the newest checkpoint that verifies is taken.
    with caplog.at_level(logging.WARNING, logger="recis_train"):
        result = warm_start(model, tmp_path / "donor", parts=("dense",))
    assert result.checkpoint == step(root, 3)
    assert "dense/model.safetensors (crc32 expected" in caplog.text
    saved = build(tmp_path / "donor")
    saved.restore(step(root, 3), parts=("dense",))
    assert torch.equal(model.mlp[0].weight, saved.model.mlp[0].weight)


def test_warm_start_of_dense_tensors_verifies_a_recis_embedding_checkpoint(tmp_path):
    seed_everything(0)
    source = TableModel()
    source.embeddings({"ids": torch.arange(10).reshape(-1, 1)})
    emb.save(str(tmp_path / "tables"), source)
    flip_middle_byte(tmp_path / "tables" / "dense.safetensors")
    target = TableModel()
    before = params_of(target)
    # A damaged file is CheckpointCorruptError, as the trainer's own checks raise it.
    with pytest.raises(CheckpointCorruptError, match=r"checksum mismatch for dense\.safetensors"):
        warm_start(target, tmp_path / "tables", parts=("dense",))
    assert_same(params_of(target), before)


def hashed_files(monkeypatch) -> list[str]:
    """Names of the files recis-embedding hashes (SHA-256) from now on."""
    import recis_embedding._checkpoint as embedding_checkpoint

    names: list[str] = []
    real = embedding_checkpoint.sha256
    monkeypatch.setattr(embedding_checkpoint, "sha256", lambda p: names.append(p.name) or real(p))
    return names


def table_rows(trainer):
    (table,) = emb.sparse_parameters(trainer.model)
    ids = torch.sort(table.ids()).values
    return ids, table.read_full(table.find(ids))


def test_a_restore_reads_the_table_files_for_checksums_once(tmp_path, monkeypatch):
    trainer = build_tables(tmp_path, train_steps=6, save_every=3)
    trainer.train()
    hashed = hashed_files(monkeypatch)
    fresh = build_tables(tmp_path)
    assert fresh.restore() == step(trainer.checkpoints.root, 6)
    # The trainer's checksums covered the table files: recis-embedding does not hash them again.
    assert hashed == []
    for a, b in zip(table_rows(fresh), table_rows(trainer), strict=True):
        assert torch.equal(a, b)


def test_a_restore_without_recorded_checksums_leaves_the_table_check_to_recis_embedding(
    tmp_path, monkeypatch
):
    trainer = build_tables(tmp_path, train_steps=3)
    trainer.train()
    path = trainer.checkpoints.latest()
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["checksums"]  # as written before checksums were recorded
    (path / "manifest.json").write_text(json.dumps(manifest))
    (table_file,) = (path / "sparse" / "tables" / "sparse").glob("*.safetensors")
    hashed = hashed_files(monkeypatch)
    fresh = build_tables(tmp_path)
    assert fresh.restore() == path
    assert table_file.name in hashed
    flip_middle_byte(table_file)
    with pytest.raises(
        emb.CheckpointError, match=rf"checksum mismatch for sparse/{table_file.name}"
    ):
        build_tables(tmp_path).restore(path)


def test_a_sparse_part_whose_load_takes_no_verified_keyword_still_loads(tmp_path):
    from recis_train import EmbeddingCheckpoint
    from recis_train._sparse import embedding_prefixes

    class Plain(EmbeddingCheckpoint):  # a SparseCheckpoint written to the original protocol
        loads = 0

        def load(self, directory, model, sparse_optimizer):
            Plain.loads += 1
            super().load(directory, model, sparse_optimizer)

    def make(**args):
        trainer = build_tables(tmp_path, **args)
        trainer.sparse_checkpoint = Plain(embedding_prefixes(trainer.model))
        return trainer

    trainer = make(train_steps=3)
    trainer.train()
    fresh = make()
    fresh.restore()
    assert Plain.loads == 1
    for a, b in zip(table_rows(fresh), table_rows(trainer), strict=True):
        assert torch.equal(a, b)


def test_warm_start_reads_the_table_files_for_checksums_once(tmp_path, monkeypatch):
    donor = build_tables(tmp_path / "donor", train_steps=6, save_every=3)
    donor.train()
    root = donor.checkpoints.root
    hashed = hashed_files(monkeypatch)
    # A trainer checkpoint (or a run's directory): its CRC32 checksums cover the table files.
    for source in (step(root, 6), tmp_path / "donor"):
        model = TableModel()
        result = warm_start(model, source, parts=("sparse",))
        assert result.checkpoint == step(root, 6)
        assert hashed == []
        (table,) = emb.sparse_parameters(model)
        ids, rows = table_rows(donor)
        assert torch.equal(table.embeddings(ids), rows[:, :4])
    # A damaged table file is still caught, by the trainer's checksum.
    (table_file,) = (step(root, 6) / "sparse" / "tables" / "sparse").glob("*.safetensors")
    flip_middle_byte(table_file)
    with pytest.raises(CheckpointCorruptError, match=rf"{table_file.name} {SUM}"):
        warm_start(TableModel(), step(root, 6), parts=("sparse",))
    # A recis-embedding checkpoint on its own is checked against its SHA-256 checksums.
    emb.save(str(tmp_path / "tables"), donor.model)
    warm_start(TableModel(), tmp_path / "tables", parts=("sparse",))
    assert hashed


def rewrite(path: Path, name: str, data: bytes) -> None:
    """Replace file ``name`` of checkpoint ``path`` and record its size and checksum, as a
    hand edit that passes the integrity checks would."""
    (path / name).write_bytes(data)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["sizes"][name] = len(data)
    manifest["checksums"]["files"][name] = file_checksum(path / name)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.update(global_step="abc"), r"entry 'global_step' is str, expected int"),
        (lambda s: s.pop("cursor"), r"holds no data cursor \(a dict\) for this rank"),
        (lambda s: s.pop("rng"), r"holds no RNG states \(a dict\) for this rank"),
        (lambda s: s.update(history=None), r"entry 'history' is NoneType"),
        (
            lambda s: s["history"]["train"].update(steps=s["history"]["train"]["steps"].float()),
            r"history\['train'\]: 'steps' is not a 1-d int64 tensor \(a torch.float32",
        ),
        (
            lambda s: s["history"]["train"].update(keys=["loss", *s["history"]["train"]["keys"]]),
            r"history\['train'\]: 'keys' names a key twice",
        ),
        (
            lambda s: s["history"]["train"].update(values=s["history"]["train"]["values"][1:]),
            r"'values' is not a float64 tensor of shape \(3, \d+\)",
        ),
        (
            lambda s: s["history"]["train"].update(present=torch.ones(3)),
            r"'present' is not None or a bool tensor",
        ),
        (
            lambda s: s["history"]["train"].pop("keys"),
            r"must map names to lists or to columns .*; 'train' is a dict",
        ),
        (
            lambda s: s["sparse_optimizer"]["param_groups"][0].pop("lr"),
            r"its sparse optimizer state does not fit",
        ),
    ],
)
def test_a_trainer_state_of_the_wrong_shape_is_refused_before_anything_loads(
    tmp_path, edit, message
):
    trainer = build_tables(tmp_path / "run", train_steps=3)
    trainer.train()
    path = trainer.checkpoints.latest()
    state = torch.load(path / "trainer" / "state.pt", weights_only=True)
    edit(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    rewrite(path, "trainer/state.pt", buffer.getvalue())
    fresh = build_tables(tmp_path / "run")
    before, (ids, rows) = params(fresh), table_rows(fresh)
    with pytest.raises(CheckpointError, match=r"trainer/state\.pt: .*" + message):
        fresh.restore(path)
    assert fresh.global_step == 0
    assert_same(params(fresh), before)
    after_ids, after_rows = table_rows(fresh)
    assert torch.equal(after_ids, ids)
    assert torch.equal(after_rows, rows)


def test_a_table_load_refused_by_recis_embedding_leaves_the_dense_weights(tmp_path):
    trainer = build_tables(tmp_path / "run", train_steps=3)
    trainer.train()
    path = trainer.checkpoints.latest()
    seed_everything(1)
    other = build_tables(tmp_path / "other")
    other.model.embeddings = emb.EmbeddingEngine({"ids": emb.EmbeddingOption(5)})
    before = params(other)
    with pytest.raises(emb.CheckpointError, match="has dim 4, model has 5"):
        other.restore(path, parts=("dense", "sparse"))
    assert_same(params(other), before)


@pytest.mark.parametrize("damage", ["list", "not utf-8", "sizes"])
def test_a_damaged_manifest_of_the_latest_checkpoint_is_passed_over(tmp_path, caplog, damage):
    trainer = build(tmp_path, train_steps=6, save_every=3)
    trainer.train()
    manifest = trainer.checkpoints.latest() / "manifest.json"
    text = {
        "list": b"[1, 2]",
        "not utf-8": b"{\xff}",
        "sizes": json.dumps(json.loads(manifest.read_text()) | {"sizes": [1]}).encode(),
    }[damage]
    manifest.write_bytes(text)
    fresh = build(tmp_path)
    with caplog.at_level(logging.WARNING, logger="recis_train"):
        assert fresh.restore() == step(trainer.checkpoints.root, 3)
    assert "skipping incomplete checkpoint" in caplog.text


def test_warm_start_from_table_files_that_do_not_fit_leaves_the_model_untouched(tmp_path):
    from safetensors.torch import load_file, save_file

    from recis_embedding._checkpoint import manifest_digest, sha256

    trainer = build_tables(tmp_path / "run", train_steps=3)
    trainer.train()
    path = tmp_path / "tables"
    emb.save(path, trainer.model, trainer.sparse_optimizer)
    manifest = json.loads((path / "manifest.json").read_text())
    (rel,) = manifest["tables"]["ids"]["files"]
    tensors = load_file(str(path / rel))
    tensors["embeddings"] = tensors["embeddings"][:-2].clone()  # two rows short of the ids
    save_file(tensors, str(path / rel))
    manifest["files"][rel] = sha256(path / rel)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    fresh = build_tables(tmp_path / "fresh")
    fresh.model.embeddings({"ids": torch.arange(5)[:, None]})  # rows a misfit must keep
    before, (ids, rows) = params(fresh), table_rows(fresh)
    with pytest.raises(CheckpointError, match=r"warm_start: .*'embeddings' is F32 of shape"):
        warm_start(fresh.model, path)
    assert_same(params(fresh), before)
    after_ids, after_rows = table_rows(fresh)
    assert torch.equal(after_ids, ids)
    assert torch.equal(after_rows, rows)
