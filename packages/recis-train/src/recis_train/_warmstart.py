"""Warm start: load chosen dense tensors and embedding tables from another run's checkpoint.

:meth:`Trainer.restore` loads whole parts of a checkpoint; :func:`warm_start` picks names
inside them, e.g. only the sparse tables, or every tower but the one being retrained.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recis_train._checkpoint import MANIFEST, CheckpointManager, checksummed, load_tensors
from recis_train._sparse import tables_saved_separately
from recis_train.exceptions import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
)

_PARTS = ("dense", "sparse")
_EMBEDDING_FORMAT = "recis-embedding-checkpoint"
_EMBEDDING_DENSE = "dense.safetensors"
_GLOB = frozenset("*?[")


@dataclasses.dataclass
class WarmStartResult:
    """What :func:`warm_start` loaded.

    Attributes:
        checkpoint: the checkpoint directory read.
        dense: ``state_dict`` keys loaded into the model.
        tables: logical table name -> rows loaded.
        skipped: selected names of the checkpoint that the model does not have.
    """

    checkpoint: Path
    dense: list[str] = dataclasses.field(default_factory=list)
    tables: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped: list[str] = dataclasses.field(default_factory=list)


def _matches(name: str, pattern: str) -> bool:
    """A glob (``*``, ``?``, ``[...]``) matches the whole name; a plain pattern is a prefix:
    the name itself or anything below it (``"tower"`` matches ``"tower.0.weight"``)."""
    if _GLOB & set(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.startswith(pattern + ".")


class _Selection:
    """Applies include/exclude patterns and remembers which include patterns matched a name,
    and which of those a name that was not excluded."""

    def __init__(self, include: Sequence[str] | None, exclude: Sequence[str]) -> None:
        for label, patterns in (("include", include or ()), ("exclude", exclude)):
            if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
                raise ConfigError(
                    f"warm_start: {label} must be a sequence of name patterns, got {patterns!r}"
                )
        self.include, self.exclude = include, tuple(exclude)
        self.matched: set[str] = set()
        self.used: set[str] = set()
        self.excluding: set[str] = set()

    def __call__(self, name: str) -> bool:
        hits = [p for p in self.include or () if _matches(name, p)]
        self.matched.update(hits)
        excluded_by = [p for p in self.exclude if _matches(name, p)]
        if excluded_by:
            self.excluding.update(excluded_by)
            return False
        self.used.update(hits)
        return self.include is None or bool(hits)

    def unused(self) -> list[str]:
        """Include patterns matching no name."""
        return [p for p in self.include or () if p not in self.matched]

    def unused_exclude(self) -> list[str]:
        """Exclude patterns matching no name: a typo there would load what was to be kept."""
        return [p for p in self.exclude if p not in self.excluding]

    def excluded(self) -> list[str]:
        """Include patterns whose every match was excluded."""
        return [p for p in self.include or () if p in self.matched and p not in self.used]


def _resolve(
    path: str | Path, asked: Sequence[str] | None
) -> tuple[Path, Path | None, Path | None, bool]:
    """(checkpoint dir, dense safetensors file or None (a recis-embedding checkpoint saved with
    ``dense=False`` has none), recis-embedding checkpoint or None,
    whether that recis-embedding checkpoint's files were verified here).

    ``path`` may be a trainer checkpoint (``step-…``), a directory of them (the latest complete
    one whose files of the ``asked`` parts verify is taken; a run's ``output_dir`` works too),
    or a recis-embedding checkpoint. A trainer checkpoint's files of the ``asked`` parts (all
    when ``None``) are verified here; a recis-embedding checkpoint's when it is read.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointNotFoundError(f"warm_start: no checkpoint directory at {path}")
    verified = False
    if not (path / MANIFEST).is_file():
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        latest = CheckpointManager(root).choose(parts=asked)
        if latest is None:
            raise CheckpointNotFoundError(f"warm_start: no complete checkpoint in {path}")
        path, verified = latest, True
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path / MANIFEST} is not valid json: {err}") from err
    if manifest.get("format") == _EMBEDDING_FORMAT:
        if asked is not None and "sparse" not in asked:
            _verify_embedding(path)  # no chain is read, which would verify the dense file
        # One saved with dense=False holds the tables only (a malformed ``files`` is refused
        # when the checkpoint is read).
        files = manifest.get("files")
        dense = (
            path / _EMBEDDING_DENSE
            if isinstance(files, dict) and _EMBEDDING_DENSE in files
            else None
        )
        return path, dense, path, False
    if verified:
        parts = CheckpointManager.read_manifest(path)["parts"]
    else:
        parts = CheckpointManager.verify(path, asked)["parts"]
    dense = path / "dense" / "model.safetensors" if "dense" in parts else None
    tables = path / "sparse" / "tables" if "sparse" in parts else None
    if tables is not None and not (tables / MANIFEST).is_file():
        tables = None  # a custom SparseCheckpoint wrote this part in its own layout
    # The asked parts' files were checked against the manifest's checksums just now.
    checked = (asked is None or "sparse" in asked) and checksummed(manifest, "sparse")
    return path, dense, tables, tables is not None and checked


class _Renaming:
    """Maps checkpoint names to model names by prefix and remembers which prefixes matched."""

    def __init__(self, rename: Mapping[str, str] | None) -> None:
        rename = dict(rename or {})
        for old, new in rename.items():
            if not isinstance(old, str) or not isinstance(new, str) or not old or not new:
                raise ConfigError(
                    f"warm_start: rename must map non-empty name prefixes to non-empty name "
                    f"prefixes, got {old!r}: {new!r}"
                )
            if _GLOB & set(old):
                raise ConfigError(f"warm_start: rename prefix {old!r} may not hold a glob")
        # The longest prefix wins: {"tower": ..., "tower.click": ...} renames the click tower
        # by the second.
        self.rename = sorted(rename.items(), key=lambda item: -len(item[0]))
        self.used: set[str] = set()

    def __call__(self, name: str) -> str:
        for old, new in self.rename:
            if _matches(name, old):
                self.used.add(old)
                return new + name[len(old) :]
        return name

    def unused(self) -> list[str]:
        return [old for old, _ in self.rename if old not in self.used]


def _same_kind(a: torch.dtype, b: torch.dtype) -> bool:
    """Whether a tensor of dtype ``a`` may load into one of ``b``: the same dtype, or both
    floating point (the value is cast, as ``load_state_dict`` does)."""
    return a == b or (a.is_floating_point and b.is_floating_point)


def _fit_dense(
    model: nn.Module,
    saved: dict[str, torch.Tensor],
    names: dict[str, str],
    result: WarmStartResult,
) -> dict[str, torch.Tensor]:
    """The selected tensors the model has (checkpoint name -> model name in ``names``),
    checked for shape and dtype (others go to ``skipped``), keyed by model name."""
    with tables_saved_separately():  # read for dense shapes only; tables load on their own
        own = model.state_dict()
    chosen: dict[str, torch.Tensor] = {}
    misfits = []
    for key, target in names.items():
        label = key if key == target else f"{key} (as {target})"
        if target not in own:
            result.skipped.append(target)
        elif own[target].shape != saved[key].shape:
            misfits.append(f"{label} {tuple(saved[key].shape)} vs {tuple(own[target].shape)}")
        elif not _same_kind(saved[key].dtype, own[target].dtype):
            misfits.append(f"{label} {saved[key].dtype} vs {own[target].dtype}")
        else:
            chosen[target] = saved[key]
    if misfits:
        raise CheckpointError(
            f"warm_start: tensors of {result.checkpoint} do not fit the model's shapes or dtypes "
            f"(checkpoint vs model: {', '.join(misfits)}); exclude them"
        )
    return chosen


def _model_tables(model: nn.Module) -> dict[str, tuple[Any, int, Any]]:
    """Logical table name -> (physical table, table index, shard context or None)."""
    found: dict[str, tuple[Any, int, Any]] = {}
    for module in model.modules():
        logical = getattr(module, "logical", None)
        if not isinstance(logical, dict) or not hasattr(module, "physical"):
            continue
        for name, (table, index) in logical.items():
            found[name] = (table, index, getattr(module, "shard", None))
    return found


def _wrapped(err: Exception, what: str) -> CheckpointError:
    """recis-embedding's checkpoint error ``err`` as this package's: a checksum mismatch as
    :class:`CheckpointCorruptError`, as the trainer's own checks raise it."""
    from recis_embedding import CheckpointCorruptError as EmbeddingCorruptError

    kind = CheckpointCorruptError if isinstance(err, EmbeddingCorruptError) else CheckpointError
    return kind(f"{what}: {err}")


def _verify_embedding(directory: Path) -> None:
    """Check a recis-embedding checkpoint's files against its SHA-256 checksums."""
    from recis_embedding import CheckpointError as EmbeddingCheckpointError
    from recis_embedding import CheckpointReader

    try:
        CheckpointReader(directory)
    except EmbeddingCheckpointError as err:
        raise _wrapped(err, "warm_start") from err


def _check_chain_files(chain: list[Any], tables: dict[str, Any]) -> None:
    """Every checkpoint of ``chain`` holds the selected tables with the model's dims, in files
    whose tensors fit their manifests (checked from their headers): before anything loads, so
    a misfit leaves the model untouched."""
    from recis_embedding import CheckpointError as EmbeddingCheckpointError

    for reader in chain:
        saved = reader.manifest["tables"]
        names = {name: table for name, (table, _, _) in tables.values() if name in saved}
        for name, table in names.items():
            if saved[name].get("dim") != table.dim:
                raise CheckpointError(
                    f"warm_start: table {name!r} has dim {saved[name].get('dim')} in "
                    f"{reader.path}, the model's has {table.dim}"
                )
        try:
            reader.check_tensors(sorted(names))
        except EmbeddingCheckpointError as err:
            raise _wrapped(err, "warm_start") from err


def reader_chain(directory: Path, what: str = "warm_start", *, verified: bool = False) -> list[Any]:
    """The recis-embedding checkpoint and the parents a delta builds on, oldest first, each
    verified against its SHA-256 checksums (``verified``: the files of ``directory`` itself
    were just checked otherwise; only its manifest's own checksum is checked then).

    Raises:
        CheckpointError: a checkpoint of the chain is missing, corrupt or fails verification
            (the message starts with ``what``).
    """
    from recis_embedding import CheckpointError as EmbeddingCheckpointError
    from recis_embedding import CheckpointReader
    from recis_embedding._checkpoint_load import check_no_loop

    try:
        chain = [CheckpointReader(directory, verify=not verified)]
        if verified:
            chain[0].verify_manifest()
        while chain[-1].kind == "delta":
            chain.append(CheckpointReader(_parent_of(chain[-1])))
            check_no_loop(chain)
    except CheckpointError as err:
        raise type(err)(f"{what}: {err}") from err
    except EmbeddingCheckpointError as err:
        raise _wrapped(err, what) from err
    return chain[::-1]


def _parent_of(delta: Any) -> Path:
    """Where a delta's parent is: its recorded path, else its path relative to the delta
    (the manifest keeps both when it has both; the pair was moved together)."""
    candidates = [delta.parent] if delta.parent is not None else []
    relative = delta.manifest.get("parent_relative")
    if relative:
        candidates.append(delta.path / relative)
    expected = delta.manifest.get("parent_id")
    for candidate in candidates:
        manifest = candidate / MANIFEST
        if manifest.is_file() and (
            expected is None or json.loads(manifest.read_text()).get("id") == expected
        ):
            return candidate
    raise CheckpointError(
        f"delta checkpoint {delta.path} lacks its parent (looked in {[str(c) for c in candidates]})"
    )


def _fit_tables(
    model: nn.Module,
    reader: Any,
    names: dict[str, str],
    optimizer_state: bool,
    result: WarmStartResult,
) -> dict[str, tuple[str, tuple[Any, int, Any]]]:
    """The selected tables the model has (checkpoint name -> model name in ``names``), checked
    for dim and optimizer slots: model name -> (checkpoint name, the model's table)."""
    own = _model_tables(model)
    chosen = {}
    for name, target in names.items():
        if target not in own:
            result.skipped.append(target)
            continue
        label = repr(name) if name == target else f"{name!r} (as {target!r})"
        table = own[target][0]
        info = reader.table_info(name)
        if info["dim"] != table.dim:
            raise CheckpointError(
                f"warm_start: table {label} has dim {info['dim']} in {reader.path}, "
                f"the model's has {table.dim}; exclude it"
            )
        slots = [tuple(s) for s in info["slots"]]
        if optimizer_state and slots != list(table.slots):
            raise CheckpointError(
                f"warm_start: table {label} has optimizer slots {slots} in {reader.path}, the "
                f"model's table has {table.slots}; pass optimizer_state=False"
            )
        chosen[target] = (name, own[target])
    return chosen


def _check_capacities(
    chain: list[Any], tables: dict[str, tuple[str, tuple[Any, int, Any]]]
) -> None:
    """A table with a ``capacity`` (alone in its physical table: the embedding engine fuses
    none) must hold the rows loading gives it (on this rank): checked before anything loads,
    rather than a ``TableFullError`` once other tensors and tables are loaded."""
    from recis_embedding._checkpoint_load import _rows_while_loading

    for target, (name, (table, index, shard)) in tables.items():
        if table.capacity is None:
            continue
        most = _rows_while_loading(chain, name, table, index, shard, keep_rows=True)
        if most > table.capacity:
            label = repr(name) if name == target else f"{name!r} (as {target!r})"
            raise CheckpointError(
                f"warm_start: table {label} has capacity {table.capacity}, but loading "
                f"{chain[-1].path} would put {most} rows in it"
                f"{' on this rank' if shard is not None else ''}; exclude the table or build "
                "it with a capacity of at least that"
            )


def _load_table(reader: Any, name: str, entry: tuple[Any, int, Any], optimizer_state: bool) -> None:
    table, index, shard = entry
    keys = ["ids", "embeddings"]
    if optimizer_state:
        keys += [f"slot.{slot}" for slot, _ in table.slots]
    data = {k: reader.read(name, k) for k in keys}
    if reader.kind == "full":
        old = table.ids(index)
        if old.numel():
            table.erase(old, index)  # the checkpoint's rows replace the table's
    else:
        erased = reader.read(name, "erased")
        if erased.numel():
            table.erase(erased.to(table.device), index)
    if shard is not None:
        mine = shard.owns(data["ids"])  # whatever world size wrote them, keep this rank's ids
        data = {k: v[mine] for k, v in data.items()}
    ids = data.pop("ids").to(table.device)
    if ids.numel() == 0:
        return
    # Whole rows, without initial vectors drawn only to be overwritten. Slots not taken start
    # at their initial value, as a row inserted by a lookup would (the rows of this table a
    # delta overwrites were loaded from its base a moment ago, with those same values).
    slots = {
        key.removeprefix("slot."): values for key, values in data.items() if key != "embeddings"
    }
    table.insert_or_assign(ids, table.full_rows(data["embeddings"], slots), index, counted=False)


def warm_start(
    target: Any,
    path: str | Path,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    parts: Iterable[str] | None = None,
    optimizer_state: bool = False,
    rename: Mapping[str, str] | None = None,
) -> WarmStartResult:
    """Initialize a model from another run's checkpoint, choosing what to take by name.

    Dense tensors are named by their ``state_dict`` key (``"body.mlp.0.weight"``); embedding
    tables by their logical table name (``"C1"``, or an option's ``shared_name``). A pattern
    with ``*``, ``?`` or ``[...]`` is a glob over the whole name; any other pattern matches
    that name and everything below it (``"body.mlp"`` matches ``"body.mlp.0.weight"``).
    A name is taken when it matches an ``include`` pattern (every name when ``include`` is
    ``None``) and no ``exclude`` pattern. Patterns name things as the checkpoint does;
    ``rename`` then maps checkpoint names to the model's by prefix, for a module that moved or
    was renamed (``{"tower": "towers.click"}`` loads ``tower.0.weight`` into
    ``towers.click.0.weight``; ``{"user": "user_v2"}`` loads table ``user`` into ``user_v2``).

    A dense tensor must have the model's shape; its dtype may differ only between floating
    point types (the value is cast to the model's, e.g. a float64 checkpoint into a float32
    model); an integer or boolean tensor must have the model's dtype exactly.

    A selected table replaces the model's rows of that logical table (tables fused with it
    keep theirs); rows get fresh eviction counters, and fresh optimizer state unless
    ``optimizer_state`` is set. Nothing of the source run's step, optimizers or data cursor is
    loaded: call this after building the :class:`~recis_train.Trainer` and before training
    (with ``resume=True``, only when ``trainer.checkpoints.latest()`` is ``None``, or a
    restarted job would overwrite its own progress).

    Args:
        target: an ``nn.Module``, or a :class:`~recis_train.Trainer` (its model).
        path: a trainer checkpoint (``…/checkpoints/step-000001000``), a directory holding
            them or a run's ``output_dir`` (the latest complete checkpoint is used), or a
            ``recis_embedding.save`` directory.
        include: name patterns to load (default: everything in ``parts``).
        exclude: name patterns to leave as they are.
        parts: ``"dense"`` tensors and/or ``"sparse"`` tables; ``parts=("sparse",)`` takes
            only embedding tables (default: the parts the checkpoint has; a part asked for
            explicitly must be there).
        optimizer_state: also load the sparse optimizer's per-row state (the slots must be
            those of the model's sparse optimizer, which must already exist); otherwise the
            rows loaded start with fresh optimizer state.
        rename: checkpoint name prefix -> model name prefix (a prefix matches a name and what
            lies below it, as plain patterns do; the longest matching prefix wins).

    Returns:
        A :class:`WarmStartResult` naming what was loaded and what the model lacked.

    Raises:
        ConfigError: unknown parts, malformed patterns, or an ``include`` or ``exclude``
            pattern or a ``rename`` prefix that matches nothing in the checkpoint (a typo
            would otherwise load nothing, or what was to be kept, silently).
        CheckpointNotFoundError: no checkpoint at ``path``.
        CheckpointError: a selected tensor or table does not fit the model (shape, dtype, dim,
            slots, more rows than a table's ``capacity``), or the checkpoint is incomplete or
            corrupt.

    Example:
        ```python
        warm_start(model, "pretrain/checkpoints", parts=("sparse",), exclude=["C1"])
        # WarmStartResult(checkpoint=..., dense=[], tables={'C2': 5123, ...}, skipped=[])
        ```
    """
    asked = tuple(parts) if parts is not None else None
    if asked is not None and (not asked or set(asked) - set(_PARTS)):
        raise ConfigError(f"warm_start: parts must be a non-empty subset of {list(_PARTS)}")
    model = target if isinstance(target, nn.Module) else getattr(target, "model", None)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"warm_start: target must be an nn.Module or a Trainer, got {type(target).__name__}"
        )
    checkpoint, dense_file, tables_dir, tables_verified = _resolve(path, asked)
    present = tuple(p for p, where in (("dense", dense_file), ("sparse", tables_dir)) if where)
    parts = asked if asked is not None else present
    for part in parts:
        if part not in present:
            raise CheckpointError(f"warm_start: checkpoint {checkpoint} has no {part} part")
    if not parts:
        raise CheckpointError(
            f"warm_start: checkpoint {checkpoint} has neither a dense nor a sparse part "
            "warm_start can read"
        )
    select = _Selection(include, exclude)
    renamed = _Renaming(rename)
    result = WarmStartResult(checkpoint)
    # Check everything before loading anything: a typo or a misfit leaves the model untouched.
    # The chain first: reading it verifies a recis-embedding checkpoint's dense file too.
    chain = (
        reader_chain(tables_dir, verified=tables_verified)
        if "sparse" in parts and tables_dir is not None
        else []
    )
    saved = load_tensors(dense_file) if "dense" in parts and dense_file is not None else {}
    dense_names = {k: renamed(k) for k in sorted(saved) if select(k)}
    table_names = {t: renamed(t) for t in chain[-1].tables() if select(t)} if chain else {}
    unused = select.unused()
    if unused:
        raise ConfigError(
            f"warm_start: include pattern(s) {unused} match nothing in the {'/'.join(parts)} "
            f"part(s) of {checkpoint}"
        )
    unused = select.unused_exclude()
    if unused:
        raise ConfigError(
            f"warm_start: exclude pattern(s) {unused} match nothing in the {'/'.join(parts)} "
            f"part(s) of {checkpoint}; a misspelt one would load what it was meant to keep"
        )
    excluded = select.excluded()
    if excluded:
        raise ConfigError(
            f"warm_start: include pattern(s) {excluded} match only names the exclude patterns "
            f"{list(select.exclude)} take out, in the {'/'.join(parts)} part(s) of {checkpoint}"
        )
    unused = renamed.unused()
    if unused:
        raise ConfigError(
            f"warm_start: rename prefix(es) {unused} match nothing selected in the "
            f"{'/'.join(parts)} part(s) of {checkpoint}"
        )
    for kind, names in (("tensor", dense_names), ("table", table_names)):
        targets: dict[str, str] = {}
        for name, target in names.items():
            if target in targets:
                raise ConfigError(
                    f"warm_start: rename maps {kind}s {targets[target]!r} and {name!r} of "
                    f"{checkpoint} both to {target!r}"
                )
            targets[target] = name
    dense = _fit_dense(model, saved, dense_names, result)
    tables = _fit_tables(model, chain[-1], table_names, optimizer_state, result) if chain else {}
    _check_chain_files(chain, tables)
    _check_capacities(chain, tables)
    model.load_state_dict(dense, strict=False)
    result.dense.extend(dense)
    if tables:
        from recis_embedding._checkpoint_load import _states_kept
    for target, (name, (table, index, shard)) in tables.items():
        # A checkpoint's slots only where they are still its rows' at the chain's end (the
        # chain's last checkpoint holds the model table's slots, checked above).
        kept = _states_kept(chain, name) if optimizer_state else [False] * len(chain)
        for position, reader in enumerate(chain):
            if name in reader.manifest["tables"]:
                _load_table(reader, name, (table, index, shard), kept[position])
        result.tables[target] = int(table.ids(index).numel())
    return result
