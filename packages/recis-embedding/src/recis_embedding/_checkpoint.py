"""Checkpoints as open files: safetensors per table and shard, a JSON manifest, atomic writes.

Layout of a checkpoint directory (format version 1)::

    manifest.json
    dense.safetensors                                  the model's state_dict (dense tensors)
    sparse/<table>.shard-<r>-of-<w>.safetensors        one file per logical table and shard

A table file holds, for the ``K`` ids it saves (ascending):

- ``ids`` ``(K,) int64``;
- ``embeddings`` ``(K, D)`` in the table's storage dtype;
- ``slot.<name>`` ``(K, width) float32`` per optimizer slot (e.g. ``slot.exp_avg``);
- ``meta.frequency``, ``meta.last_seen`` and ``meta.inserted`` ``(K,) int64`` (eviction state:
  training uses, last step looked up in training, step inserted at; ``meta.inserted`` is 0 for
  every row when a file lacks it);
- ``admission.<key>``: the admission policy's state (``FrequencyAdmission``: ``ids`` and
  ``counts`` of ids still being counted);
- ``erased`` ``(E,) int64`` in delta checkpoints: ids removed since the previous save.

The manifest records the format version, a random ``id`` of this save, the kind (``full`` or
``delta``, with the ``parent`` checkpoint a delta applies to: its absolute path, its path relative
to the delta, and its ``parent_id``), the world size, per table its dim, dtype, optimizer kind and
slots, row count, step and files, the sparse optimizer's hyperparameters, a SHA-256 per file,
and ``manifest_sha256``: the SHA-256 of the manifest's own canonical JSON (``indent=2``, sorted
keys) without that entry.
Everything is written into a temporary sibling directory and renamed into place, so an
interrupted save leaves the previous checkpoint untouched; checksums are verified on load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from recis_embedding._engine import EmbeddingEngine, logical_tables
from recis_embedding._optim import SparseOptimizer
from recis_embedding._statedict import tables_saved_separately
from recis_embedding._table import HashTable
from recis_embedding.exceptions import CheckpointError

__all__ = ["FORMAT_VERSION", "CheckpointReader", "load", "save"]

FORMAT_VERSION = 1
_FORMAT = "recis-embedding-checkpoint"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class _Saved:
    """Where a table was last saved or loaded, and the ``id`` of that checkpoint's manifest."""

    path: Path
    id: str | None


@dataclasses.dataclass(frozen=True)
class _Unsaved:
    """Set by a load that left rows in logical tables ``tables`` which the checkpoint lacks:
    no checkpoint holds them, so the next save must be full."""

    tables: tuple[str, ...]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _engines(model: nn.Module) -> list[EmbeddingEngine]:
    return [m for m in model.modules() if isinstance(m, EmbeddingEngine)]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(
    path: str | os.PathLike[str],
    model: nn.Module,
    sparse_optimizer: SparseOptimizer | None = None,
    *,
    delta: bool = False,
    parent: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a checkpoint of ``model``'s tables (and dense state) to directory ``path``.

    Args:
        path: checkpoint directory (created; an existing one is replaced atomically).
        model: a module containing :class:`EmbeddingEngine`/``DynamicEmbedding`` modules.
        sparse_optimizer: its hyperparameters are saved too (row state is in the tables).
        delta: write only rows changed (and ids erased) since the previous save of these
            tables; the manifest names that save as ``parent``.
        parent: where the previous save lives now, when its directory was moved or renamed
            after saving (e.g. a save into a temporary directory renamed into place); it must
            be that same save. Default: where the tables were last saved or loaded.

    Returns:
        The checkpoint directory.

    Raises:
        CheckpointError: ``delta=True`` without a previous save of these tables (or after a
            ``load(..., strict=False)`` that kept rows of tables the checkpoint lacks), or the
            previous save is no longer where it was written (and ``parent`` is not given), or
            ``parent`` is not the previous save; on the other ranks of a sharded model, when
            the save failed on one rank (that rank raises its own error). Every rank raises,
            none waits for the failed one, and the previous checkpoint at ``path`` is left as
            it was.
        ConfigError: two embedding modules of ``model`` define the same table name.
    """
    path = Path(path)
    tables = logical_tables(model)
    physical = {id(t): t for t, _ in tables.values()}.values()
    shard = _shard_context(model)
    rank, world = (shard.rank, shard.world_size) if shard else (0, 1)
    tmp = (
        path.parent / f".{path.name}.tmp"
        if shard
        else path.parent / f".{path.name}.tmp-{os.getpid()}"
    )
    # Each phase ends with every rank learning whether any rank failed in it (one collective
    # per phase), so a failure on one rank raises on all of them instead of leaving the others
    # waiting in the next collective, and no rank records a save that did not happen.
    previous = None
    with _phase(shard, path, "preparing", tmp if rank == 0 else None):
        if delta:
            previous = _previous_save(physical, path, parent)
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "sparse").mkdir(parents=True)
    with _phase(shard, path, "writing the table files", tmp if rank == 0 else None) as phase:
        infos = {
            name: _save_table(tmp, name, table, index, delta, rank, world)
            for name, (table, index) in sorted(tables.items())
        }
        files = {
            f.relative_to(tmp).as_posix(): _sha256(f)
            for f in sorted((tmp / "sparse").glob(f"*.shard-{rank:05d}-of-{world:05d}.safetensors"))
        }
        phase.result = (infos, files, uuid.uuid4().hex)
    gathered = phase.gathered
    save_id = gathered[0][2]  # rank 0's, the same on every rank
    with _phase(shard, path, "writing the manifest", tmp if rank == 0 else None):
        if rank == 0:
            _write(tmp, model, gathered, sparse_optimizer, previous, path, world, save_id)
            _replace(tmp, path)
    for table in physical:
        table.mark_saved(_Saved(path.resolve(), save_id))
    return path


def _previous_save(physical: Any, path: Path, parent: str | os.PathLike[str] | None) -> _Saved:
    """The save a delta builds on, checked to still be where the delta will point."""
    saves = {getattr(t, "last_checkpoint", None) for t in physical}
    kept = sorted(n for s in saves if isinstance(s, _Unsaved) for n in s.tables)
    if kept:
        raise CheckpointError(
            f"delta checkpoint needs a previous save holding every table, but tables {kept} "
            f"kept rows that the checkpoint last loaded (strict=False) lacks; save a full "
            f"checkpoint first"
        )
    last = next(iter(saves))
    if len(saves) != 1 or not isinstance(last, _Saved):
        raise CheckpointError(
            "delta checkpoint needs a previous save (or load) of the same tables to build on"
        )
    where = Path(parent).resolve() if parent is not None else last.path
    if where == path.resolve():
        raise CheckpointError(f"a delta checkpoint cannot replace its own parent {path}")
    if not (where / "manifest.json").is_file():
        if parent is not None:
            raise CheckpointError(f"parent {where} is not a checkpoint (missing manifest.json)")
        raise CheckpointError(
            f"the previous save of these tables, {where}, no longer exists (moved or renamed "
            "after saving?); pass parent= the directory it lives in now, or save a full checkpoint"
        )
    found = CheckpointReader(where, verify=False).manifest.get("id")
    if last.id is not None and found != last.id:
        raise CheckpointError(
            f"{where} holds checkpoint {found}, not the previous save of these tables "
            f"({last.id}); a delta must build on the save its tables were last saved or loaded from"
        )
    return _Saved(where, last.id)


def _shard_context(model: nn.Module):
    contexts = {id(e.shard): e.shard for e in _engines(model) if e.shard is not None}
    if not contexts:
        return None
    if len(contexts) > 1 or any(e.shard is None for e in _engines(model)):
        raise CheckpointError("all embedding modules of a model must share one sharding context")
    return next(iter(contexts.values()))


class _phase:
    """One phase of a save: runs its body on every rank, then tells every rank whether any
    rank failed (one ``all_gather_object``), and raises on all of them if one did.

    The failing rank re-raises its own exception; the others raise :class:`CheckpointError`
    naming the failed ranks and their errors. ``tmp`` (rank 0's temporary directory) is removed
    on failure. Set ``result`` inside the body to gather it: ``gathered`` holds every rank's.
    Interrupts (``KeyboardInterrupt``, ``SystemExit``) propagate at once, without the exchange.
    """

    def __init__(self, shard: Any, path: Path, what: str, tmp: Path | None) -> None:
        self.shard, self.path, self.what, self.tmp = shard, path, what, tmp
        self.result: Any = None
        self.gathered: list[Any] = []

    def __enter__(self) -> _phase:
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> Literal[False]:
        if exc is not None and not isinstance(exc, Exception):
            self._cleanup()
            return False
        mine = None if exc is None else f"{type(exc).__name__}: {exc}"
        reports = _gather(self.shard, (mine, self.result))
        self.gathered = [r for _, r in reports]
        failed = [(r, m) for r, (m, _) in enumerate(reports) if m is not None]
        if not failed:
            return False
        # A failed save must not leave half-written files next to the previous checkpoint.
        self._cleanup()
        if exc is not None:
            return False  # this rank's own error propagates
        ranks = ", ".join(f"rank {r} ({m})" for r, m in failed)
        raise CheckpointError(
            f"saving checkpoint {self.path} failed while {self.what} on {ranks}; the "
            f"previous checkpoint at {self.path} is unchanged"
        )

    def _cleanup(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _gather(shard: Any, item: Any) -> list[Any]:
    if shard is None:
        return [item]
    out: list[Any] = [None] * shard.world_size
    torch.distributed.all_gather_object(out, item, group=shard.group)
    return out


def _write(
    tmp: Path,
    model: nn.Module,
    gathered: list[tuple[dict[str, Any], dict[str, str], str]],
    sparse_optimizer: SparseOptimizer | None,
    previous: _Saved | None,
    path: Path,
    world: int,
    save_id: str,
) -> None:
    tables: dict[str, Any] = {}
    files: dict[str, str] = {}
    for infos, shard_files, _ in gathered:
        files.update(shard_files)
        for name, info in infos.items():
            if name not in tables:
                tables[name] = dict(info, files=[], rows=0)
            tables[name]["files"] += info["files"]
            tables[name]["rows"] += info["rows"]
    manifest: dict[str, Any] = {
        "format": _FORMAT,
        "format_version": FORMAT_VERSION,
        "id": save_id,
        "kind": "delta" if previous is not None else "full",
        "parent": str(previous.path) if previous is not None else None,
        # Relative to the delta, so a chain moved or copied as a whole still loads.
        "parent_relative": (
            os.path.relpath(previous.path, path.resolve()) if previous is not None else None
        ),
        "parent_id": previous.id if previous is not None else None,
        "world_size": world,
        "tables": tables,
        "optimizer": None,
        "files": files,
    }
    with tables_saved_separately():  # the tables are the files written beside it
        state = model.state_dict()
    dense = {k: v.detach().contiguous().clone() for k, v in state.items()}
    save_file(dense, str(tmp / "dense.safetensors"))
    files["dense.safetensors"] = _sha256(tmp / "dense.safetensors")
    if sparse_optimizer is not None:
        manifest["optimizer"] = {
            "class": type(sparse_optimizer).__name__,
            "state": sparse_optimizer.state_dict(),
        }
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON without its own ``manifest_sha256`` entry."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, indent=2, sort_keys=True).encode()).hexdigest()


def _replace(tmp: Path, path: Path) -> None:
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    if path.exists():
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        # The new checkpoint could not take its place: put the previous one back.
        if old.exists():
            os.replace(old, path)
        raise
    if old.exists():
        shutil.rmtree(old)


def _save_table(
    root: Path, name: str, table: HashTable, index: int, delta: bool, rank: int, world: int
) -> dict[str, Any]:
    keys, tabs, rows = table.export()
    mine = tabs == index
    ids, rows = keys[mine], rows[mine]
    tensors: dict[str, torch.Tensor] = {}
    if delta:
        changed = table.dirty_rows(rows)
        ids, rows = ids[changed], rows[changed]
        tensors["erased"] = table.erased_ids(index)
    full = table.read_full(rows)
    emb = table._from_words(full[:, : table.emb_words]).to(table.dtype)
    tensors.update({"ids": ids, "embeddings": emb})
    start = table.emb_words
    for slot, width in table.slots:
        tensors[f"slot.{slot}"] = full[:, start : start + width].contiguous()
        start += width
    tensors["meta.frequency"] = table.frequency[rows].clone()
    tensors["meta.last_seen"] = table.last_seen[rows].clone()
    tensors["meta.inserted"] = table.inserted[rows].clone()
    if table.admission is not None:
        for key, value in table.admission.state(table, index).items():
            tensors[f"admission.{key}"] = value
    fname = f"sparse/{quote(name, safe='')}.shard-{rank:05d}-of-{world:05d}.safetensors"
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(root / fname))
    return {
        "dim": table.dim,
        "dtype": _dtype_name(table.dtype),
        "optimizer": table.optimizer_kind,
        "slots": [[s, w] for s, w in table.slots],
        "rows": int(ids.numel()),
        "step": table.step,
        "files": [fname],
    }


class CheckpointReader:
    """Reads a checkpoint without building a model.

    Args:
        path: checkpoint directory.
        verify: check the manifest's SHA-256 and every file's against the manifest.

    Raises:
        CheckpointError: missing or unreadable manifest, unknown format version, bad checksum.

    Example:
        >>> r = CheckpointReader("ckpt/step-100")
        >>> r.tables()
        ['item', 'user']
        >>> r.read("user", "embeddings").shape
        torch.Size([5123, 16])
    """

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = True) -> None:
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not mpath.is_file():
            raise CheckpointError(f"no checkpoint at {self.path} (missing manifest.json)")
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"corrupt manifest {mpath}: {exc}") from exc
        if self.manifest.get("format") != _FORMAT:
            raise CheckpointError(f"{mpath} is not a recis-embedding checkpoint manifest")
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {self.path} has format version {self.manifest.get('format_version')}, "
                f"this recis-embedding reads version {FORMAT_VERSION}"
            )
        if verify:
            self.verify()

    def verify(self) -> None:
        """Check the manifest's own SHA-256 and every file's SHA-256 against the manifest."""
        if self.manifest.get("manifest_sha256") != _manifest_digest(self.manifest):
            raise CheckpointError(
                f"checksum mismatch for manifest.json in checkpoint {self.path} (edited or corrupt)"
            )
        for rel, digest in self.manifest["files"].items():
            f = self.path / rel
            if not f.is_file():
                raise CheckpointError(f"checkpoint {self.path} is missing file {rel}")
            if _sha256(f) != digest:
                raise CheckpointError(f"checksum mismatch for {rel} in checkpoint {self.path}")

    @property
    def kind(self) -> str:
        """``"full"`` or ``"delta"``."""
        return self.manifest["kind"]

    @property
    def parent(self) -> Path | None:
        """The checkpoint a delta applies to."""
        p = self.manifest.get("parent")
        return Path(p) if p else None

    def tables(self) -> list[str]:
        """Logical table names, sorted."""
        return sorted(self.manifest["tables"])

    def table_info(self, table: str) -> dict[str, Any]:
        """Manifest entry of a table (dim, dtype, optimizer, slots, rows, step, files)."""
        if table not in self.manifest["tables"]:
            raise CheckpointError(f"checkpoint {self.path} has no table {table!r}")
        return self.manifest["tables"][table]

    def keys(self, table: str) -> list[str]:
        """Tensor names stored for ``table`` (``ids``, ``embeddings``, ``slot.*``, ``meta.*``)."""
        first = self.path / self.table_info(table)["files"][0]
        with safe_open(str(first), framework="pt") as f:
            return sorted(f.keys())

    def read(self, table: str, key: str = "embeddings") -> torch.Tensor:
        """Tensor ``key`` of ``table``, concatenated over its shard files."""
        return self._read(table, [key])[key]

    def read_all(self, table: str) -> dict[str, torch.Tensor]:
        """Every tensor of ``table``, concatenated over shards."""
        return self._read(table, None)

    def _read(self, table: str, keys: list[str] | None) -> dict[str, torch.Tensor]:
        """Tensors ``keys`` of ``table`` (``None``: those of its first file), concatenated over
        its shard files; each file is opened once and only the tensors asked for are read."""
        parts: dict[str, list[torch.Tensor]] = {}
        for rel in self.table_info(table)["files"]:
            with safe_open(str(self.path / rel), framework="pt") as f:
                present = set(f.keys())
                if keys is None:
                    keys = sorted(present)
                for key in keys:
                    if key not in present:
                        raise CheckpointError(f"table {table!r} has no tensor {key!r} in {rel}")
                    parts.setdefault(key, []).append(f.get_tensor(key))
        return {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in parts.items()}

    def dense(self) -> dict[str, torch.Tensor]:
        """The model's dense ``state_dict`` tensors."""
        return load_file(str(self.path / "dense.safetensors"))


def load(
    path: str | os.PathLike[str],
    model: nn.Module,
    sparse_optimizer: SparseOptimizer | None = None,
    *,
    strict: bool = True,
) -> dict[str, Any]:
    """Restore ``model``'s tables (and dense state, and optimizer hyperparameters) from ``path``.

    A delta checkpoint is applied on top of its parent chain (loaded first). Tables are replaced,
    not merged: after loading, each table holds exactly the checkpoint's rows.

    Args:
        path: checkpoint directory.
        model: a module with the same embedding tables (fusion may differ).
        sparse_optimizer: receives the saved hyperparameters; its tables receive optimizer slots.
        strict: the checkpoint's tables must be exactly the model's (none missing, none the
            model lacks), and dense keys must match. With ``strict=False`` tables the model
            lacks are skipped, and model tables absent from the checkpoint keep their rows.

    Returns:
        The manifest of ``path``.

    Embeddings saved in another storage dtype are cast to the table's (float32 to float16 or
    bfloat16 rounds to nearest; the other way is exact).

    Raises:
        CheckpointError: corrupt files, missing or unexpected tables (``strict``), dim or
            optimizer-slot mismatch, saved embeddings too large for the table's dtype
            (beyond float16's 65504), more rows than a table's ``capacity`` (after the base
            or any delta of a chain), or a dense state that does not fit the model (keys
            when ``strict``, shapes always). All of these are found before any table
            changes.
        ConfigError: two embedding modules of ``model`` define the same table name.
    """
    tables = logical_tables(model)
    chain = [CheckpointReader(path)]
    while chain[-1].kind == "delta":
        chain.append(_parent_reader(chain[-1]))
    chain.reverse()
    shard = _shard_context(model)
    _check_optimizer(chain[-1], sparse_optimizer)
    _check_tables(chain[-1], tables, strict)
    _warn_unplaced_state(chain[-1], tables, _frozen_tables(model))
    _check_casts(chain, tables)
    _check_capacities(chain, tables, shard)
    dense = chain[-1].dense()
    _check_dense(chain[-1], model, dense, strict)
    cleared: set[tuple[int, int]] = set()
    for reader in chain:
        saved = reader.manifest["tables"]
        for name, (table, index) in tables.items():
            if name not in saved:
                continue
            if reader.kind == "full" and (id(table), index) not in cleared:
                # A full checkpoint replaces the logical tables it holds; the other logical
                # tables fused into the same physical table keep their rows.
                siblings = {n: i for n, (t, i) in tables.items() if t is table}
                if all(n in saved for n in siblings):
                    table.clear()
                    cleared.update((id(table), i) for i in siblings.values())
                else:
                    keys, tabs, _ = table._map.export()
                    mine = tabs == index
                    table._erase(keys[mine], tabs[mine])
                    cleared.add((id(table), index))
            _load_table(reader, name, table, index, shard)
    try:
        model.load_state_dict(dense, strict=strict)
    except RuntimeError as exc:
        raise CheckpointError(
            f"dense state of {chain[-1].path} does not match the model: {exc}"
        ) from exc
    if sparse_optimizer is not None and chain[-1].manifest.get("optimizer"):
        state = chain[-1].manifest["optimizer"]["state"]
        for group in state["param_groups"]:
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
        sparse_optimizer.load_state_dict(state)
    loaded = _Saved(Path(path).resolve(), chain[-1].manifest.get("id"))
    in_checkpoint = set(chain[-1].manifest["tables"])
    for table in {id(t): t for t, _ in tables.values()}.values():
        # A delta holds the rows changed since its parent: rows of a logical table the
        # checkpoint lacks (kept by strict=False) are in no parent, so only a full save may
        # follow. An empty one is fine: every row it gets later is a change.
        kept = [
            n for i, n in enumerate(table.names) if n not in in_checkpoint and len(table.ids(i))
        ]
        table.mark_saved(_Unsaved(tuple(kept)) if kept else loaded)
    return chain[-1].manifest


def _parent_reader(delta: CheckpointReader) -> CheckpointReader:
    """The checkpoint ``delta`` applies to: at its recorded path, else relative to the delta."""
    manifest = delta.manifest
    candidates = [delta.parent] if delta.parent is not None else []
    if manifest.get("parent_relative"):
        candidates.append(delta.path / manifest["parent_relative"])
    found = next((p for p in candidates if (p / "manifest.json").is_file()), None)
    if found is None:
        raise CheckpointError(f"delta checkpoint {delta.path} lacks its parent {delta.parent}")
    reader = CheckpointReader(found)
    expected = manifest.get("parent_id")
    if expected is not None and reader.manifest.get("id") != expected:
        raise CheckpointError(
            f"delta checkpoint {delta.path} applies to checkpoint {expected}, but its parent "
            f"{found} now holds checkpoint {reader.manifest.get('id')} (overwritten by a later save?)"
        )
    return reader


def _check_optimizer(reader: CheckpointReader, sparse_optimizer: SparseOptimizer | None) -> None:
    """The saved optimizer state must be loaded by the optimizer that saved it."""
    saved = reader.manifest.get("optimizer")
    if sparse_optimizer is not None and saved:
        mine = type(sparse_optimizer).__name__
        if saved.get("class") != mine:
            raise CheckpointError(
                f"checkpoint {reader.path} holds the state of a {saved.get('class')} sparse "
                f"optimizer; it cannot be loaded into a {mine}"
            )


def _frozen_tables(model: nn.Module) -> set[str]:
    """Names of the logical tables of ``trainable=False`` options."""
    return {
        name
        for engine in _engines(model)
        for name, option in engine.table_options().items()
        if not option.trainable
    }


def _warn_unplaced_state(
    reader: CheckpointReader, tables: dict[str, Any], frozen: set[str]
) -> None:
    """Warns when saved optimizer state has no table slots to go to; a frozen table needs
    none (it never trains), so its embeddings alone are what a load is for."""
    for name, (table, _) in tables.items():
        info = reader.manifest["tables"].get(name)
        if info and info["slots"] and not table.slots and name not in frozen:
            warnings.warn(
                f"checkpoint {reader.path}: table {name!r} has {info['optimizer']} optimizer "
                f"state, but the model's table has no sparse optimizer, so only its embeddings "
                f"are loaded. To resume training, create the sparse optimizer before load() "
                f"and pass it as sparse_optimizer.",
                stacklevel=3,
            )


def _check_tables(reader: CheckpointReader, tables: dict[str, Any], strict: bool) -> None:
    saved = set(reader.manifest["tables"])
    missing = sorted(set(tables) - saved)
    if strict and missing:
        raise CheckpointError(f"checkpoint {reader.path} has no tables {missing}")
    unexpected = sorted(saved - set(tables))
    if strict and unexpected:
        # As torch's strict load_state_dict refuses unexpected keys: trained rows that no table
        # of the model receives would be lost without a word (and from the next save).
        raise CheckpointError(
            f"checkpoint {reader.path} has tables {unexpected} that the model lacks (model "
            f"tables: {sorted(tables)}); pass strict=False to load the others and skip them"
        )
    for name, (table, _) in tables.items():
        if name not in saved:
            continue
        info = reader.manifest["tables"][name]
        if info["dim"] != table.dim:
            raise CheckpointError(
                f"table {name!r}: checkpoint has dim {info['dim']}, model has {table.dim}"
            )
        slots = [tuple(s) for s in info["slots"]]
        if (
            slots
            and table.slots
            and (slots != table.slots or info["optimizer"] != table.optimizer_kind)
        ):
            raise CheckpointError(
                f"table {name!r}: checkpoint optimizer {info['optimizer']!r} slots {slots} do not "
                f"match the model's {table.optimizer_kind!r} slots {table.slots}"
            )


def _check_casts(chain: list[CheckpointReader], tables: dict[str, Any]) -> None:
    """Embeddings saved in another dtype are cast to the table's (rounded to nearest); a
    finite value the table's dtype cannot hold would become infinite: refuse it before any
    table changes."""
    for reader in chain:
        for name, (table, _) in tables.items():
            info = reader.manifest["tables"].get(name)
            if not info or info["dtype"] == _dtype_name(table.dtype) or not info["rows"]:
                continue
            emb = reader.read(name).to(torch.float32)
            lost = emb.isfinite() & ~emb.to(table.dtype).isfinite()
            if bool(lost.any()):
                worst = float(emb[lost].abs().max())
                raise CheckpointError(
                    f"table {name!r} of checkpoint {reader.path}: {int(lost.sum())} embedding "
                    f"values saved as {info['dtype']} (largest magnitude {worst:g}) overflow "
                    f"the table's {_dtype_name(table.dtype)} (max "
                    f"{torch.finfo(table.dtype).max:g}); load into a table of a wider dtype"
                )


def _check_capacities(
    chain: list[CheckpointReader], tables: dict[str, tuple[HashTable, int]], shard: Any
) -> None:
    """A table with a ``capacity`` must hold every row the load gives it (on this rank), after
    each checkpoint of a delta chain: refuse a checkpoint with more before any table changes,
    rather than raise :class:`TableFullError` from a table the load has already emptied (or
    let capacity eviction drop loaded rows)."""
    for table in {id(t): t for t, _ in tables.values() if t.capacity is not None}.values():
        counts = {
            name: _rows_while_loading(chain, name, table, index, shard)
            for name, (t, index) in tables.items()
            if t is table
        }
        if sum(counts.values()) > (table.capacity or 0):
            held = ", ".join(f"{n!r}: {c}" for n, c in counts.items())
            raise CheckpointError(
                f"table {table.names[0]!r} has capacity {table.capacity}, but loading checkpoint "
                f"{chain[-1].path} would put {sum(counts.values())} rows in it ({held}"
                f"{' on this rank' if shard is not None else ''}); load into a table with a "
                f"capacity of at least that"
            )


def _rows_while_loading(
    chain: list[CheckpointReader], name: str, table: HashTable, index: int, shard: Any
) -> int:
    """The most rows logical table ``name`` holds (on this rank) while ``chain`` loads: after
    its full checkpoint and after each delta (which erases, then inserts)."""
    ids = table.ids(index).cpu()  # kept when no full checkpoint of the chain holds the table
    most = 0
    for reader in chain:
        if name not in reader.manifest["tables"]:
            continue
        saved = reader.read(name, "ids")
        if shard is not None:
            saved = saved[shard.owns(saved.to(table.device)).cpu()]
        if reader.kind == "full":
            ids = saved
        else:
            erased = reader.read(name, "erased")
            ids = torch.cat([ids[~torch.isin(ids, erased)], saved]).unique()
        most = max(most, ids.numel())
    return most


def _check_dense(
    reader: CheckpointReader, model: nn.Module, dense: dict[str, torch.Tensor], strict: bool
) -> None:
    """Torch's checks of ``model.load_state_dict(dense, strict)`` (missing and unexpected
    keys when ``strict``, shapes always), made before any table changes: a dense state that
    does not fit must not leave the model with the checkpoint's tables but its own dense
    part."""
    with tables_saved_separately():
        expected = model.state_dict()
    problems = []
    if strict:
        missing = sorted(set(expected) - set(dense))
        unexpected = sorted(set(dense) - set(expected))
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
    for key in sorted(set(expected) & set(dense)):
        mine, saved = expected[key], dense[key]
        if not isinstance(mine, torch.Tensor) or torch.nn.parameter.is_lazy(mine):
            continue
        shape = saved.shape
        if mine.dim() == 0 and shape == (1,):  # torch loads these (1-d from torch 0.3)
            continue
        if shape != mine.shape:
            problems.append(
                f"size mismatch for {key}: {tuple(shape)} in the checkpoint, "
                f"{tuple(mine.shape)} in the model"
            )
    if problems:
        raise CheckpointError(
            f"dense state of {reader.path} does not match the model: {'; '.join(problems)} "
            f"(nothing was loaded)"
        )


def _load_table(reader: CheckpointReader, name: str, table: HashTable, index: int, shard) -> None:
    data = reader.read_all(name)
    admission = {
        k.removeprefix("admission."): v for k, v in data.items() if k.startswith("admission.")
    }
    data = {k: v for k, v in data.items() if not k.startswith("admission.")}
    if shard is not None:
        # Resharding: whatever world size wrote the files, keep the ids this rank owns.
        mine = shard.owns(data["ids"])
        data = {k: (v if k == "erased" else v[mine]) for k, v in data.items()}
        if "ids" in admission:
            held = shard.owns(admission["ids"])
            admission = {k: v[held] for k, v in admission.items()}
    if admission and table.admission is not None:
        table.admission.load_state(table, index, admission)
    if "erased" in data and data["erased"].numel():
        table.erase(data["erased"].to(table.device), index)
    # The table's clock: the checkpoint's step (a cleared table restarts at 0), or the later
    # clock of the other logical tables of a physical table loaded only in part. The same
    # whether or not this rank received rows of the table, so every shard keeps one clock.
    table.step = max(table.step, int(reader.table_info(name)["step"]))
    ids = data["ids"].to(table.device)
    if ids.numel() == 0:
        return
    rows, _ = table.find_or_insert(ids, index)
    emb = data["embeddings"].to(device=table.device, dtype=torch.float32)
    parts = [table._to_words(emb)]
    for slot, width in table.slots:
        key = f"slot.{slot}"
        parts.append(
            data[key].to(table.device)
            if key in data
            else table.state_init(slot).expand(ids.numel(), width)
        )
    table.write_full(rows, torch.cat(parts, dim=1))
    table.frequency[rows] = data["meta.frequency"].to(table.device)
    table.last_seen[rows] = data["meta.last_seen"].to(table.device)
    # Files written before rows recorded their insertion step: capacity eviction then breaks
    # ties by id alone.
    inserted = data.get("meta.inserted")
    table.inserted[rows] = 0 if inserted is None else inserted.to(table.device)
