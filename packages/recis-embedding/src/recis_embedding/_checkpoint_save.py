"""Writing checkpoints: table files per rank, then the manifest and dense state, renamed into place.

The format is described in ``recis_embedding._checkpoint``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import torch
from safetensors.torch import save_file
from torch import nn

from recis_embedding._checkpoint import (
    DENSE_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    CheckpointReader,
    _Saved,
    _Unsaved,
    dtype_name,
    interrupted_replaces,
    manifest_digest,
    moved_aside,
    sha256,
    shard_context,
)
from recis_embedding._checkpoint_load import parent_reader
from recis_embedding._engine import logical_tables
from recis_embedding._optim import SparseOptimizer
from recis_embedding._statedict import tables_saved_separately
from recis_embedding._table import HashTable, _table_runs
from recis_embedding.exceptions import CheckpointError

__all__ = ["save"]


def save(
    path: str | os.PathLike[str],
    model: nn.Module,
    sparse_optimizer: SparseOptimizer | None = None,
    *,
    delta: bool = False,
    parent: str | os.PathLike[str] | None = None,
    dense: bool = True,
) -> Path:
    """Write a checkpoint of ``model``'s tables (and dense state) to directory ``path``.

    Args:
        path: checkpoint directory (created; a previous checkpoint or an empty directory
            there is replaced atomically, anything else refused, a symbolic link included).
        model: a module containing :class:`EmbeddingEngine`/``DynamicEmbedding`` modules.
        sparse_optimizer: its hyperparameters are saved too (row state is in the tables).
        delta: write only rows changed (and ids erased) since the previous save of these
            tables; the manifest names that save as ``parent``.
        parent: where the previous save lives now, when its directory was moved or renamed
            after saving (e.g. a save into a temporary directory renamed into place); it must
            be that same save. Default: where the tables were last saved or loaded.
        dense: also write the model's dense ``state_dict`` (``dense.safetensors``). ``False``
            writes the tables (and the optimizer's hyperparameters) only, for a caller that
            keeps the dense state elsewhere (recis-train's checkpoints do): the checkpoint
            then has no ``dense.safetensors`` (nor an entry for it in the manifest's
            ``files``), and :func:`recis_embedding.load` of it leaves the model's dense state as
            it is.

    Returns:
        The checkpoint directory.

    Raises:
        CheckpointError: ``delta=True`` without a previous save of these tables (or after a
            ``load(..., strict=False)`` that kept rows of tables the checkpoint lacks), or the
            previous save is no longer where it was written (and ``parent`` is not given), or
            ``parent`` is not the previous save, or ``path`` holds something other than a
            previous checkpoint or an empty directory (a file, another directory, a symbolic
            link, even one to a checkpoint), or (``dense=True``) the
            model's ``state_dict`` holds entries that are not tensors (extra state); on the
            other ranks of a sharded model, when
            the save failed on one rank (that rank raises its own error). Every rank raises,
            none waits for the failed one, and the previous checkpoint at ``path`` is left as
            it was.
        ConfigError: two embedding modules of ``model`` define the same table name.
    """
    path = Path(path)
    tables = logical_tables(model)
    physical = {id(t): t for t, _ in tables.values()}.values()
    shard = shard_context(model)
    rank, world = (shard.rank, shard.world_size) if shard else (0, 1)
    # Every rank of a sharded save writes into rank 0's directory, so its name is the same on
    # all of them (and the next sharded save to ``path`` removes one a killed save left); one
    # process names its own after its host and pid (see ``_remove_leftovers``).
    tmp = path.parent / (f".{path.name}.tmp" if shard else _tmp_name(path.name, os.getpid()))
    # Each phase ends with every rank learning whether any rank failed in it (one collective
    # per phase), so a failure on one rank raises on all of them instead of leaving the others
    # waiting in the next collective, and no rank records a save that did not happen.
    previous = None
    with _phase(shard, path, "preparing", tmp if rank == 0 else None):
        if delta:
            previous = _previous_save(physical, path, parent)
        if rank == 0:
            _recover_interrupted(path)
            _check_replaceable(path)
            _remove_leftovers(path)
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "sparse").mkdir(parents=True)
    with _phase(shard, path, "writing the table files", tmp if rank == 0 else None) as phase:
        infos = _save_tables(tmp, tables, delta, rank, world)
        mine = sorted((tmp / "sparse").glob(f"*.shard-{rank:05d}-of-{world:05d}.safetensors"))
        for f in mine:
            _fsync(f)  # each rank flushes its own files; rank 0 the directories (``_write``)
        files = {f.relative_to(tmp).as_posix(): sha256(f) for f in mine}
        phase.result = (infos, files, uuid.uuid4().hex)
    gathered = phase.gathered
    save_id = gathered[0][2]  # rank 0's, the same on every rank
    with _phase(shard, path, "writing the manifest", tmp if rank == 0 else None):
        if rank == 0:
            _write(tmp, model, gathered, sparse_optimizer, previous, path, world, save_id, dense)
            _replace(tmp, path)
    for table in physical:
        table.mark_saved(_Saved(path.resolve(), save_id))
    return path


#: what a checkpoint directory holds (see ``_write``)
_CHECKPOINT_ENTRIES = frozenset({"manifest.json", "sparse", DENSE_FILE})


def _check_replaceable(path: Path) -> None:
    """A save replaces a previous checkpoint or an empty directory at ``path``, nothing else:
    a file or another directory there is someone's data, and a symbolic link someone's
    pointer (a ``latest`` link) that replacing would turn into a directory."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink():
        raise CheckpointError(
            f"{path} is a symbolic link to {os.readlink(path)}; save does not replace a "
            f"symbolic link (nor write through one): save to its target, {path.resolve()}, "
            "or remove the link first"
        )
    if not path.is_dir():
        raise CheckpointError(
            f"{path} exists and is not a directory; a checkpoint is a directory, and save "
            "does not replace other files"
        )
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return
    if "manifest.json" not in entries:
        raise CheckpointError(
            f"{path} is a directory that holds no checkpoint (no manifest.json); save "
            "replaces a previous checkpoint or an empty directory only"
        )
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSON and Unicode errors are ValueErrors
        manifest = exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        why = f" ({manifest})" if isinstance(manifest, Exception) else ""
        raise CheckpointError(
            f"{path} holds a manifest.json that is not a recis-embedding checkpoint's{why}; "
            "save replaces a previous checkpoint or an empty directory only"
        )
    # Replacing the checkpoint removes the whole directory: anything else put in it (another
    # checkpoint saved inside, a user's notes) would go with it.
    # Hidden names are the file system's own (.DS_Store, NFS's .nfsXXXX of a file deleted
    # while open), not someone's data.
    other = [n for n in entries if n not in _CHECKPOINT_ENTRIES and not n.startswith(".")]
    if other:
        listed = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
        raise CheckpointError(
            f"{path} is a checkpoint that also holds {listed}, which a save in its place would "
            "delete with it: move them out, or save elsewhere"
        )


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
    reader = CheckpointReader(where, verify=False)
    found = reader.manifest.get("id")
    if last.id is not None and found != last.id:
        raise CheckpointError(
            f"{where} holds checkpoint {found}, not the previous save of these tables "
            f"({last.id}); a delta must build on the save its tables were last saved or loaded from"
        )
    # Replacing a checkpoint further up the chain would break the chain the delta needs,
    # leaving no loadable checkpoint at all. (A chain already broken is not this save's to
    # judge: loading it says what is missing.)
    target = path.resolve()
    while (target / "manifest.json").is_file() and reader.kind == "delta":
        try:
            reader = parent_reader(reader, verify=False)
        except CheckpointError:
            break
        if reader.path.resolve() == target:
            raise CheckpointError(
                f"a delta checkpoint cannot replace {path}: the checkpoint it builds on, "
                f"{where}, is a delta of it; save to another directory or save a full checkpoint"
            )
    return _Saved(where, last.id)


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
    return [item] if shard is None else shard.gather_object(item)


def _write(
    tmp: Path,
    model: nn.Module,
    gathered: list[tuple[dict[str, Any], dict[str, str], str]],
    sparse_optimizer: SparseOptimizer | None,
    previous: _Saved | None,
    path: Path,
    world: int,
    save_id: str,
    dense: bool,
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
        "format": FORMAT_NAME,
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
    written = [tmp / "manifest.json", tmp / "sparse", tmp]
    if dense:
        save_file(_dense_state(model), str(tmp / DENSE_FILE))
        files[DENSE_FILE] = sha256(tmp / DENSE_FILE)
        written.insert(0, tmp / DENSE_FILE)
    if sparse_optimizer is not None:
        manifest["optimizer"] = {
            "class": type(sparse_optimizer).__name__,
            "state": _json_numbers(sparse_optimizer.state_dict()),
        }
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for done in written:
        _fsync(done)


def _json_numbers(value: Any) -> Any:
    """``value`` with its tensors as numbers (a one-element tensor) or lists, for the manifest:
    torch's schedulers take tensor learning rates, which JSON cannot hold."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {k: _json_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_numbers(v) for v in value]
    return value


def _dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's ``state_dict`` tensors, copied (the tables are the files written beside
    them)."""
    with tables_saved_separately():
        state = model.state_dict()
    other = {k: type(v).__name__ for k, v in state.items() if not isinstance(v, torch.Tensor)}
    if other:
        raise CheckpointError(
            f"the model's state_dict holds entries that are not tensors ({other}; e.g. a "
            "module's get_extra_state()); the dense state is written as safetensors, which "
            "holds tensors only"
        )
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's data and entries to the disk: a checkpoint is on the disk
    before it replaces the previous one, which a crash soon after could otherwise leave as
    empty files while the previous checkpoint is already deleted."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(tmp: Path, path: Path) -> None:
    # A name of its own (a restarted container often has the same pid): a directory left by
    # an earlier interrupted replace is never in the way.
    old = path.parent / f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if path.exists():
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        # The new checkpoint could not take its place: put the previous one back.
        if old.exists():
            os.replace(old, path)
        raise
    _fsync(path.parent)  # the renames are on the disk before the previous checkpoint goes
    # The previous checkpoint (``old``), and any an interrupted replace left: the new one
    # supersedes them all.
    for stale in moved_aside(path):
        shutil.rmtree(stale)


def _tmp_prefix(name: str) -> str:
    """What the temporary directories of this host's saves to checkpoint ``name`` start with."""
    return f".{name}.tmp-{quote(socket.gethostname(), safe='')}-"


def _tmp_name(name: str, pid: int) -> str:
    """The temporary directory of process ``pid`` of this host saving to checkpoint ``name``."""
    return f"{_tmp_prefix(name)}{pid}"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host (pid namespace) is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


def _remove_leftovers(path: Path) -> None:
    """Removes the temporary directories that saves to ``path`` killed before their end left
    beside it (``.<name>.tmp-<host>-<pid>``, the process writing the files gone without
    cleaning up), each holding a copy of the tables.

    Only this host's, and only those of processes that are no longer running: a temporary
    directory on a shared file system may be a save in progress on another host (whose pids
    mean nothing here), or of another process here. A sharded save's ``.<name>.tmp`` is not
    touched: the next sharded save to ``path`` replaces it.
    """
    if os.name != "posix":
        return  # os.kill(pid, 0) does not test for a process elsewhere
    prefix = _tmp_prefix(path.name)
    for left in path.parent.glob(f"{glob.escape(prefix)}*"):
        pid = left.name[len(prefix) :]
        if not (pid.isascii() and pid.isdigit()) or int(pid) <= 0 or int(pid) == os.getpid():
            continue  # another host's (whose name starts like this one's), or this process's
        if left.is_dir() and not left.is_symlink() and not _alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)


def _recover_interrupted(path: Path) -> None:
    """Puts back the previous checkpoint a save interrupted between moving it aside and
    putting the new one in its place (nothing at ``path``, a ``.<name>.old-*`` beside it), so
    that it stays at ``path`` should this save fail too."""
    left = interrupted_replaces(path)
    if left and not path.exists() and not path.is_symlink():
        os.replace(left[0], path)


#: The longest table part of a file name (bytes): with the shard suffix (33 bytes) a table file
#: name stays well under the 255 bytes file systems allow.
_MAX_STEM = 128
_HASH_CHARS = 16


def _table_file_stem(name: str) -> str:
    """The part of table ``name``'s file names before ``.shard-``: the name percent-encoded
    (``quote(name, safe="")``), or, when that is longer than 128 bytes, as much of it as fits
    in whole characters, ``+`` and the first 16 hex digits of the SHA-256 of the name (UTF-8).

    The encoding turns every ``+`` of a name into ``%2B``, so a shortened name never equals
    another name's encoding. Loading finds the files through the manifest (each table's
    ``files``); nothing recomputes their names.
    """
    encoded = quote(name, safe="")
    if len(encoded) <= _MAX_STEM:
        return encoded
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:_HASH_CHARS]
    prefix = ""
    for char in name:
        part = quote(char, safe="")
        if len(prefix) + len(part) > _MAX_STEM - 1 - _HASH_CHARS:
            break
        prefix += part
    return f"{prefix}+{digest}"


def _save_tables(
    root: Path, tables: dict[str, tuple[HashTable, int]], delta: bool, rank: int, world: int
) -> dict[str, dict[str, Any]]:
    """Writes every logical table's file and returns their manifest entries, by name.

    Each physical table is exported once for all the logical tables fused into it: an export
    sorts every live key of the physical table, so one per logical table would sort it again
    for each (26 sorts of a million keys for the demo's fused table, most of a save's time).
    """
    fused: dict[int, list[str]] = {}
    for name, (table, _) in tables.items():
        fused.setdefault(id(table), []).append(name)
    infos: dict[str, dict[str, Any]] = {}
    for names in fused.values():
        table = tables[names[0]][0]
        keys, tabs, rows = table.export()
        # Sorted by table index, so each logical table's keys are one run of the export.
        runs = _table_runs(tabs, len(table.names))
        indices = [tables[name][1] for name in names]
        admission: dict[int, dict[str, torch.Tensor]] = (
            {} if table.admission is None else table.admission.states(table, indices)
        )
        for name, index in zip(names, indices, strict=True):
            run = runs[index]
            infos[name] = _save_table(
                root,
                name,
                table,
                index,
                keys[run],
                rows[run],
                admission.get(index),
                delta,
                rank,
                world,
            )
        del keys, tabs, rows, admission
    return dict(sorted(infos.items()))


def _save_table(
    root: Path,
    name: str,
    table: HashTable,
    index: int,
    ids: torch.Tensor,
    rows: torch.Tensor,
    admission: dict[str, torch.Tensor] | None,
    delta: bool,
    rank: int,
    world: int,
) -> dict[str, Any]:
    """Writes logical table ``index`` of ``table`` (its ``ids``, ascending, their ``rows``
    and its admission policy's state, if it has a policy) and returns its manifest entry."""
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
    for key, value in (admission or {}).items():
        tensors[f"admission.{key}"] = value
    fname = f"sparse/{_table_file_stem(name)}.shard-{rank:05d}-of-{world:05d}.safetensors"
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(root / fname))
    return {
        "dim": table.dim,
        "dtype": dtype_name(table.dtype),
        "optimizer": table.optimizer_kind,
        "slots": [[s, w] for s, w in table.slots],
        "rows": int(ids.numel()),
        "step": table.step,
        "files": [fname],
    }
