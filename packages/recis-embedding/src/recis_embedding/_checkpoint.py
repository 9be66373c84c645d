"""Checkpoints as open files: safetensors per table and shard, a JSON manifest, atomic writes.

Layout of a checkpoint directory (format version 1)::

    manifest.json
    dense.safetensors                                  the model's state_dict (dense tensors);
                                                       absent when saved with ``dense=False``
    sparse/<table>.shard-<r>-of-<w>.safetensors        one file per logical table and shard

``<table>`` is the table name percent-encoded, shortened (a readable prefix, ``+`` and a hash)
when that is long (``_checkpoint_save._table_file_stem``); readers take each table's file names
from the manifest.

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

This module holds the format (constants, manifest digest, the marks a save or load leaves on
tables) and :class:`CheckpointReader`; ``_checkpoint_save`` writes checkpoints and
``_checkpoint_load`` restores them.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from recis_embedding._engine import EmbeddingEngine
from recis_embedding.exceptions import CheckpointCorruptError, CheckpointError

__all__ = [
    "DENSE_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CheckpointReader",
    "dtype_name",
    "engines",
    "manifest_digest",
    "sha256",
    "shard_context",
]

FORMAT_VERSION = 1
FORMAT_NAME = "recis-embedding-checkpoint"
#: The dense state's file; a checkpoint saved with ``dense=False`` has none.
DENSE_FILE = "dense.safetensors"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# The marks a save or load leaves on its tables (``HashTable.last_checkpoint``) travel with
# pickled tables, so they keep this module and these names.
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


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def engines(model: nn.Module) -> list[EmbeddingEngine]:
    return [m for m in model.modules() if isinstance(m, EmbeddingEngine)]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON without its own ``manifest_sha256`` entry."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, indent=2, sort_keys=True).encode()).hexdigest()


def shard_context(model: nn.Module):
    contexts = {id(e.shard): e.shard for e in engines(model) if e.shard is not None}
    if not contexts:
        return None
    if len(contexts) > 1 or any(e.shard is None for e in engines(model)):
        raise CheckpointError("all embedding modules of a model must share one sharding context")
    return next(iter(contexts.values()))


def moved_aside(path: Path) -> list[Path]:
    """What saves moved aside to put a new checkpoint at ``path`` (``.<name>.old-*`` beside
    it): the previous checkpoint of a save in progress, and any left by interrupted ones."""
    return list(path.parent.glob(f".{glob.escape(path.name)}.old-*"))


def interrupted_replaces(path: Path) -> list[Path]:
    """Complete checkpoints a save moved aside to put a new one at ``path`` and did not get
    to delete, newest first."""
    found = [p for p in moved_aside(path) if (p / "manifest.json").is_file()]
    return sorted(found, key=lambda p: (p / "manifest.json").stat().st_mtime, reverse=True)


class CheckpointReader:
    """Reads a checkpoint without building a model.

    Args:
        path: checkpoint directory.
        verify: check the manifest's SHA-256 and every file's against the manifest.

    Raises:
        CheckpointError: missing or unreadable manifest, unknown format version, bad checksum.

    Example:
        ```python
        r = CheckpointReader("ckpt/step-100")
        r.tables()
        # ['item', 'user']
        r.read("user", "embeddings").shape
        # torch.Size([5123, 16])
        ```
    """

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = True) -> None:
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not mpath.is_file():
            left = interrupted_replaces(self.path)
            hint = (
                f"; an interrupted save left the previous checkpoint in {left[0]}: rename it "
                f"to {self.path.name} (the next save to {self.path} does)"
                if left
                else ""
            )
            raise CheckpointError(f"no checkpoint at {self.path} (missing manifest.json){hint}")
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"corrupt manifest {mpath}: {exc}") from exc
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT_NAME:
            raise CheckpointError(f"{mpath} is not a recis-embedding checkpoint manifest")
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {self.path} has format version {self.manifest.get('format_version')}, "
                f"this recis-embedding reads version {FORMAT_VERSION}"
            )
        wrong = _manifest_error(self.manifest)
        if wrong is not None:
            raise CheckpointError(f"{mpath}: {wrong}")
        if verify:
            self.verify()

    @functools.cached_property
    def _resolved(self) -> str:
        """This checkpoint's directory with links resolved, worked out once: a delta chain is
        checked for loops after each parent is found (see ``check_no_loop``)."""
        return str(self.path.resolve())

    def verify(self) -> None:
        """Check the manifest's own SHA-256 and every file's SHA-256 against the manifest,
        and that every file a table names has one and lies inside the checkpoint."""
        self.verify_manifest()
        files = self.manifest["files"]  # the entries' shapes were checked on reading
        for name, info in self.manifest["tables"].items():
            for rel in info["files"]:
                if rel not in files or not _inside(self.path, rel):
                    raise CheckpointError(
                        f"checkpoint {self.path}: table {name!r} names file {rel!r}, which has "
                        "no checksum in the manifest or lies outside the checkpoint"
                    )
        for rel, digest in self.manifest["files"].items():
            found = sha256(self._file(rel))
            if found != digest:
                raise CheckpointCorruptError(
                    f"checksum mismatch for {rel} in checkpoint {self.path} (SHA-256 "
                    f"{found[:16]}..., the manifest records {str(digest)[:16]}...)"
                )

    def check_files(self) -> None:
        """Check, without hashing, that every file the manifest lists is there and opens as
        safetensors (its header reads): a missing or truncated file is found before a load
        changes any table."""
        for rel in self.manifest["files"]:
            if rel.endswith(".safetensors"):
                self._header(rel)

    def check_tensors(self, tables: Iterable[str]) -> None:
        """Check, from the files' headers only, that each of ``tables`` holds the tensors a
        load reads, with the manifest's dtype and dim and one length per table file: found
        before a load changes any table, not half way through it.

        Raises:
            CheckpointError: naming the table, the file and the tensor.
        """
        for name in tables:
            info = self.table_info(name)
            dim, dtype = info.get("dim"), info.get("dtype")
            slots = {str(s[0]): int(s[1]) for s in info.get("slots") or []}
            for rel in info["files"]:
                _check_table_file(self.path, name, rel, self._header(rel), dim, dtype, slots)

    def _header(self, rel: str) -> dict[str, tuple[str, list[int]]]:
        """The dtype and shape of every tensor of safetensors file ``rel``, from its header
        (no tensor data is read)."""
        try:
            with safe_open(str(self._file(rel)), framework="pt") as handle:
                slices = {k: handle.get_slice(k) for k in set(handle.keys())}
                return {k: (v.get_dtype(), v.get_shape()) for k, v in slices.items()}
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error type for a bad header
            raise CheckpointError(
                f"checkpoint {self.path}: file {rel} is not readable safetensors ({exc})"
            ) from exc

    def _file(self, rel: str) -> Path:
        """The path of file ``rel`` of the checkpoint, which must be there."""
        f = self.path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {self.path} is missing file {rel}")
        return f

    def verify_manifest(self) -> None:
        """Check the manifest's own SHA-256 only (reads no other file)."""
        if self.manifest.get("manifest_sha256") != manifest_digest(self.manifest):
            raise CheckpointCorruptError(
                f"checksum mismatch for manifest.json in checkpoint {self.path} (edited or corrupt)"
            )

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

    @property
    def has_dense(self) -> bool:
        """Whether the checkpoint holds the model's dense state (``dense.safetensors``):
        ``False`` for one saved with ``dense=False``."""
        return DENSE_FILE in self.manifest["files"]

    def dense(self) -> dict[str, torch.Tensor]:
        """The model's dense ``state_dict`` tensors.

        Raises:
            CheckpointError: the checkpoint holds no dense state (saved with ``dense=False``,
                see :attr:`has_dense`), or its dense file is missing.
        """
        if not self.has_dense:
            raise CheckpointError(
                f"checkpoint {self.path} holds no dense state: it was saved with dense=False "
                "(its tables only; the dense state was kept elsewhere)"
            )
        return load_file(str(self._file(DENSE_FILE)))


# safetensors' dtype names of the manifest's.
_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _inside(root: Path, rel: str) -> bool:
    """Whether file ``rel`` of a checkpoint at ``root`` lies inside it."""
    if not isinstance(rel, str) or Path(rel).is_absolute():
        return False
    return (root / rel).resolve().is_relative_to(root.resolve())


def _check_table_file(
    path: Path,
    name: str,
    rel: str,
    found: dict[str, tuple[str, list[int]]],
    dim: Any,
    dtype: Any,
    slots: dict[str, int],
) -> None:
    """The tensors of one file of table ``name``: ``found`` maps each to (dtype, shape)."""

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: table {name!r}, file {rel}: {what}")

    if "ids" not in found:
        raise refuse("no tensor 'ids'")
    ids_dtype, ids_shape = found["ids"]
    if ids_dtype != "I64" or len(ids_shape) != 1:
        raise refuse(f"'ids' is {ids_dtype} of shape {ids_shape}, expected int64 (N,)")
    rows = ids_shape[0]
    want = {
        "embeddings": (_SAFETENSORS_DTYPES.get(str(dtype)), [rows, dim]),
        "meta.frequency": (None, [rows]),
        "meta.last_seen": (None, [rows]),
    }
    for slot, width in slots.items():
        want[f"slot.{slot}"] = ("F32", [rows, width])
    for key, (kind, shape) in want.items():
        if key not in found:
            raise refuse(f"no tensor {key!r}")
        got_kind, got_shape = found[key]
        if list(got_shape) != shape or (kind is not None and got_kind != kind):
            raise refuse(
                f"{key!r} is {got_kind} of shape {got_shape}, expected "
                f"{kind or 'any dtype'} of shape {shape} (the manifest's dtype {dtype} and dim "
                f"{dim}, one row per id)"
            )
    for key in ("meta.inserted", "erased"):
        if key in found and len(found[key][1]) != 1:
            raise refuse(f"{key!r} has shape {found[key][1]}, expected 1-d")
    if "meta.inserted" in found and found["meta.inserted"][1][0] != rows:
        raise refuse(f"'meta.inserted' has {found['meta.inserted'][1][0]} rows, ids {rows}")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _manifest_error(manifest: dict[str, Any]) -> str | None:
    """What is wrong with the shape of a manifest's entries a load reads (a damaged or
    hand-edited file), or ``None``."""
    if manifest.get("kind") not in ("full", "delta"):
        return f"kind must be 'full' or 'delta', got {manifest.get('kind')!r}"
    if not isinstance(manifest.get("files"), dict):
        return "'files' must map file names to checksums"
    tables = manifest.get("tables")
    if not isinstance(tables, dict):
        return "'tables' must map table names to their entries"
    for name, info in tables.items():
        if not isinstance(info, dict):
            return f"table {name!r}: its entry must be an object"
        for key in ("dim", "rows", "step"):
            value = info.get(key)
            if not _count(value) or (key == "dim" and value == 0):
                return f"table {name!r}: {key} must be a non-negative int, got {value!r}"
        if info.get("dtype") not in _SAFETENSORS_DTYPES:
            return f"table {name!r}: dtype must be one of {sorted(_SAFETENSORS_DTYPES)}"
        slots = info.get("slots")
        if not isinstance(slots, list) or not all(
            isinstance(s, list) and len(s) == 2 and isinstance(s[0], str) and _count(s[1])
            for s in slots
        ):
            return f"table {name!r}: slots must list [name, width] pairs, got {slots!r}"
        files = info.get("files")
        if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
            return f"table {name!r}: files must list its file names, got {files!r}"
    return None
