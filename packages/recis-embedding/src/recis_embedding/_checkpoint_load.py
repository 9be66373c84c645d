"""Restoring a model from a checkpoint and its delta chain, checked before any table changes."""

from __future__ import annotations

import itertools
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recis_embedding._checkpoint import (
    CheckpointReader,
    _Saved,
    _Unsaved,
    dtype_name,
    engines,
    shard_context,
)
from recis_embedding._engine import logical_tables
from recis_embedding._host import on_host, true_positions
from recis_embedding._optim import SparseOptimizer
from recis_embedding._statedict import tables_saved_separately
from recis_embedding._table import HashTable
from recis_embedding.exceptions import CheckpointError, OptimizerError

__all__ = ["load"]


def load(
    path: str | os.PathLike[str],
    model: nn.Module,
    sparse_optimizer: SparseOptimizer | None = None,
    *,
    strict: bool = True,
    verify: bool = True,
    dense: bool = True,
) -> dict[str, Any]:
    """Restore ``model``'s tables (and dense state, and optimizer hyperparameters) from ``path``.

    A delta checkpoint is applied on top of its parent chain (loaded first). Tables are replaced,
    not merged: after loading, each table holds exactly the checkpoint's rows. The dense state
    is that of ``path`` itself (not of the parents of a delta); a checkpoint saved with
    ``save(..., dense=False)`` holds none, and loading it restores the tables and the optimizer's
    hyperparameters and leaves the model's dense state as it is.

    Args:
        path: checkpoint directory.
        model: a module with the same embedding tables (fusion may differ).
        sparse_optimizer: receives the saved hyperparameters; its tables receive optimizer slots.
        strict: the checkpoint's tables must be exactly the model's (none missing, none the
            model lacks), and dense keys must match. With ``strict=False`` tables the model
            lacks are skipped, and model tables absent from the checkpoint keep their rows.
        verify: check every file of the checkpoint (and of the parents a delta builds on)
            against the manifest's SHA-256 checksums before loading. ``False`` checks only each
            manifest's own checksum and that every file is there and opens, for a caller that
            has just verified the files itself (recis-train's restore does, with its own
            checksums): the files are then read once, to load them, instead of once more to
            hash them.
        dense: load the checkpoint's dense state (when it has one). ``False`` leaves the
            model's dense state as it is, for a caller that keeps it elsewhere (recis-train's
            checkpoints do); the checkpoint's dense file is then not read (``verify`` still
            checks its checksum).

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
            changes. Also a failure after the tables began to change (a file changed under
            the load): the tables then hold part of the checkpoint, and only a full save may
            follow.
        ConfigError: two embedding modules of ``model`` define the same table name.
    """
    tables = logical_tables(model)
    shard = shard_context(model)
    # Every check runs before any table changes; sharded, the ranks then agree, so that a
    # load refused on one rank (its share over a capacity, a file it cannot read) changes
    # no rank's tables.
    refused: Exception | None = None
    try:
        chain = [_reader(path, verify)]
        while chain[-1].kind == "delta":
            chain.append(parent_reader(chain[-1], verify))
            check_no_loop(chain)
        chain.reverse()
        if not verify:
            for reader in chain:
                reader.check_files()
        _check_optimizer(chain[-1], sparse_optimizer)
        _check_tables(chain[-1], tables, strict)
        for reader in chain:
            reader.check_tensors(sorted(set(tables) & set(reader.manifest["tables"])))
        for reader in chain[:-1]:
            _check_dims(reader, tables)
        _warn_unplaced_state(chain[-1], tables, _frozen_tables(model))
        _check_casts(chain, tables)
        _check_capacities(chain, tables, shard)
        state = chain[-1].dense() if dense and chain[-1].has_dense else None
        if state is not None:
            _check_dense(chain[-1], model, state, strict)
    except Exception as error:
        refused = error
    if shard is not None:
        reports = shard.gather_object(
            None if refused is None else f"{type(refused).__name__}: {refused}"
        )
        failed = [(r, m) for r, m in enumerate(reports) if m is not None]
        if failed and refused is None:
            ranks = "; ".join(f"rank {r} ({m})" for r, m in failed)
            raise CheckpointError(
                f"loading checkpoint {path} was refused on {ranks}; no rank loaded anything"
            )
    if refused is not None:
        try:
            raise refused
        finally:
            # This frame is in the error's traceback: keeping the error would make a cycle
            # holding the model, its tables and the shard's process group until a collection.
            del refused
    try:
        _apply(chain, tables, shard)
    except Exception as exc:
        # Not expected after the checks (a file changed under the load, a device out of
        # memory): the tables now hold part of the chain, which no checkpoint describes, so
        # no delta may build on them.
        for table, _ in tables.values():
            table.last_checkpoint = None
        raise CheckpointError(
            f"loading checkpoint {path} failed after the tables began to change ({exc}); they "
            "hold part of it: load a checkpoint again before training (a delta cannot follow)"
        ) from exc
    if state is not None:
        try:
            model.load_state_dict(state, strict=strict)
        except RuntimeError as exc:
            raise CheckpointError(
                f"dense state of {chain[-1].path} does not match the model: {exc}"
            ) from exc
    if sparse_optimizer is not None and chain[-1].manifest.get("optimizer"):
        sparse_optimizer.load_state_dict(chain[-1].manifest["optimizer"]["state"])
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


def _apply(
    chain: list[CheckpointReader], tables: dict[str, tuple[HashTable, int]], shard: Any
) -> None:
    """Load the tables of every checkpoint of ``chain`` in order (all checks passed)."""
    cleared: set[tuple[int, int]] = set()
    kept = {name: _states_kept(chain, name) for name in tables}
    for position, reader in enumerate(chain):
        saved = reader.manifest["tables"]
        admitting: dict[int, tuple[HashTable, dict[int, dict[str, torch.Tensor] | None]]] = {}
        for name, (table, index) in tables.items():
            if name not in saved:
                continue
            if (id(table), index) not in cleared:
                # The first checkpoint of the chain holding a logical table replaces it: a
                # full one always, a delta when the table was empty at its parent (a delta is
                # refused when a table its parent lacks kept rows). The other logical tables
                # fused into the same physical table keep their rows.
                siblings = {n: i for n, (t, i) in tables.items() if t is table}
                fresh = not any((id(table), i) in cleared for i in siblings.values())
                if fresh and all(n in saved for n in siblings):
                    table._reset()
                    cleared.update((id(table), i) for i in siblings.values())
                else:
                    keys, tabs, _ = table._map.export()
                    mine = tabs == index
                    table._erase(keys[mine], tabs[mine])
                    cleared.add((id(table), index))
            admission = _load_table(reader, name, table, index, shard, kept[name][position])
            if table.admission is not None:
                admitting.setdefault(id(table), (table, {}))[1][index] = admission
        # The admission states of a physical table's logical tables go in together (one pass
        # over the policy's state for all of them, see AdmissionPolicy.load_states).
        for table, states in admitting.values():
            assert table.admission is not None
            table.admission.load_states(table, states)


def _reader(path: str | os.PathLike[str], verify: bool) -> CheckpointReader:
    return _checked(CheckpointReader(path, verify=False), verify)


def _checked(reader: CheckpointReader, verify: bool) -> CheckpointReader:
    """``reader`` after checking every file's checksum, or (``verify=False``) the manifest's."""
    if verify:
        reader.verify()
    else:
        reader.verify_manifest()
    return reader


def check_no_loop(chain: list[CheckpointReader]) -> None:
    """Raises :class:`CheckpointError` when the last checkpoint of ``chain`` (a delta and the
    parents found so far) is one the chain already holds: a delta naming itself, or deltas
    naming each other, as parents (hand-edited or damaged manifests) would be followed
    forever."""
    # Each reader resolves its path once: resolving every path of the chain again for each
    # parent found took L²/2 resolutions, seconds for a chain of hundreds of deltas.
    last = chain[-1]._resolved
    if any(r._resolved == last for r in chain[:-1]):
        names = " -> ".join(str(r.path) for r in chain)
        raise CheckpointError(f"delta checkpoints name each other as parents: {names}")


def parent_reader(delta: CheckpointReader, verify: bool) -> CheckpointReader:
    """The checkpoint ``delta`` applies to: at its recorded path, else relative to the delta
    (a chain copied or moved as a whole), whichever holds the checkpoint the delta names.
    ``verify=False`` checks the manifest's own checksum only."""
    manifest = delta.manifest
    candidates = [delta.parent] if delta.parent is not None else []
    if manifest.get("parent_relative"):
        candidates.append(delta.path / manifest["parent_relative"])
    found = [p for p in candidates if (p / "manifest.json").is_file()]
    if not found:
        raise CheckpointError(f"delta checkpoint {delta.path} lacks its parent {delta.parent}")
    expected = manifest.get("parent_id")
    readers = [CheckpointReader(p, verify=False) for p in found]
    reader = next(
        (r for r in readers if expected is None or r.manifest.get("id") == expected), None
    )
    if reader is None:
        raise CheckpointError(
            f"delta checkpoint {delta.path} applies to checkpoint {expected}, but its parent "
            f"{found[0]} now holds checkpoint {readers[0].manifest.get('id')} (overwritten by a "
            "later save?)"
        )
    return _checked(reader, verify)


def _check_optimizer(reader: CheckpointReader, sparse_optimizer: SparseOptimizer | None) -> None:
    """The saved optimizer state must be loaded by the optimizer that saved it, with as many
    param groups: checked here, before any table changes."""
    saved = reader.manifest.get("optimizer")
    if sparse_optimizer is not None and saved:
        mine = type(sparse_optimizer).__name__
        if saved.get("class") != mine:
            raise CheckpointError(
                f"checkpoint {reader.path} holds the state of a {saved.get('class')} sparse "
                f"optimizer; it cannot be loaded into a {mine}"
            )
        try:
            sparse_optimizer._checked_groups(saved["state"])
        except OptimizerError as exc:
            raise CheckpointError(
                f"checkpoint {reader.path}: its sparse optimizer state does not fit: {exc}"
            ) from exc


def _frozen_tables(model: nn.Module) -> set[str]:
    """Names of the logical tables of ``trainable=False`` options."""
    return {
        name
        for engine in engines(model)
        for name, option in engine.table_options().items()
        if not option.trainable
    }


def _warn_unplaced_state(
    reader: CheckpointReader, tables: dict[str, Any], frozen: set[str]
) -> None:
    """Warns, once for the whole load, when saved optimizer state has no table slots to go
    to; a frozen table needs none (it never trains), so its embeddings alone are what a load
    is for."""
    unplaced: dict[str, list[str]] = {}
    for name, (table, _) in tables.items():
        info = reader.manifest["tables"].get(name)
        if info and info["slots"] and not table.slots and name not in frozen:
            unplaced.setdefault(str(info["optimizer"]), []).append(name)
    if unplaced:
        held = "; ".join(
            f"{opt} state of tables {sorted(names)}" for opt, names in unplaced.items()
        )
        warnings.warn(
            f"checkpoint {reader.path} holds optimizer state ({held}), but the model's tables "
            "have no sparse optimizer, so only their embeddings are loaded. To resume training, "
            "create the sparse optimizer before load() and pass it as sparse_optimizer.",
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
    _check_dims(reader, tables)
    for name, (table, _) in tables.items():
        if name not in saved:
            continue
        info = reader.manifest["tables"][name]
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


def _check_dims(reader: CheckpointReader, tables: dict[str, Any]) -> None:
    """Every checkpoint of a chain must have the model's dims (the optimizer slots of those a
    delta builds on may differ: see :func:`_slots_fit`)."""
    for name, (table, _) in tables.items():
        info = reader.manifest["tables"].get(name)
        if info and info["dim"] != table.dim:
            raise CheckpointError(
                f"table {name!r}: checkpoint {reader.path} has dim {info['dim']}, model has "
                f"{table.dim}"
            )


def _slots_fit(info: dict[str, Any], table: HashTable) -> bool:
    """Whether a checkpoint's optimizer state is the table's. A checkpoint before a delta may
    hold another optimizer's (the table was loaded without its optimizer, or trained by
    another one, after it): its rows then take only their embeddings, and the deltas after it
    hold every row with the state it has now."""
    slots = [tuple(s) for s in info["slots"]]
    return info["optimizer"] == table.optimizer_kind and slots == table.slots


def _check_casts(chain: list[CheckpointReader], tables: dict[str, Any]) -> None:
    """Embeddings saved in another dtype are cast to the table's (rounded to nearest); a
    finite value the table's dtype cannot hold would become infinite: refuse it before any
    table changes."""
    for reader in chain:
        for name, (table, _) in tables.items():
            info = reader.manifest["tables"].get(name)
            if not info or info["dtype"] == dtype_name(table.dtype) or not info["rows"]:
                continue
            emb = reader.read(name).to(torch.float32)
            lost = emb.isfinite() & ~emb.to(table.dtype).isfinite()
            if bool(lost.any()):
                worst = float(emb[lost].abs().max())
                raise CheckpointError(
                    f"table {name!r} of checkpoint {reader.path}: {int(lost.sum())} embedding "
                    f"values saved as {info['dtype']} (largest magnitude {worst:g}) overflow "
                    f"the table's {dtype_name(table.dtype)} (max "
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
    chain: list[CheckpointReader],
    name: str,
    table: HashTable,
    index: int,
    shard: Any,
    *,
    keep_rows: bool = False,
) -> int:
    """The most rows logical table ``name`` holds (on this rank) while ``chain`` loads: after
    each checkpoint holding it (a full one replaces its rows; a delta erases, then inserts).

    ``keep_rows``: a delta first holding the table applies over the table's rows (as
    recis-train's ``warm_start`` loads), not in place of them (as :func:`load` does).
    """
    held = [r for r in chain if name in r.manifest["tables"]]
    # Kept when no checkpoint of the chain holds the table; else the first one holding it
    # replaces its rows (see _apply), a full checkpoint or a delta, unless keep_rows.
    ids = table.ids(index).cpu() if keep_rows or not held else torch.zeros(0, dtype=torch.int64)
    most = ids.numel()
    for reader in held:
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
    keys when ``strict``, shapes always), and that no value changes (floating point values are
    cast to the model's precision, integers only widened), made before any table changes: a
    dense state that does not fit must not leave the model with the checkpoint's tables but
    its own dense part."""
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
        # Floating point values are cast to the model's precision, as torch does, and integers
        # widened; other casts would change values silently (a float cut to an integer
        # buffer, a counter saved as float, an int64 cut to int32).
        elif not _casts_faithfully(saved.dtype, mine.dtype):
            problems.append(
                f"dtype mismatch for {key}: {saved.dtype} in the checkpoint, {mine.dtype} in "
                "the model"
            )
    if problems:
        raise CheckpointError(
            f"dense state of {reader.path} does not match the model: {'; '.join(problems)} "
            f"(nothing was loaded)"
        )


def _casts_faithfully(saved: torch.dtype, mine: torch.dtype) -> bool:
    """Whether loading ``saved`` values into a ``mine`` tensor keeps them what they were: the
    same dtype, floating point to floating point (cast to the model's precision), or an
    integer to a wider integer."""
    if saved == mine or (saved.is_floating_point and mine.is_floating_point):
        return True

    def integer(dtype: torch.dtype) -> bool:
        return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)

    return integer(saved) and integer(mine) and torch.promote_types(saved, mine) == mine


def _states_kept(chain: list[CheckpointReader], name: str) -> list[bool]:
    """For each checkpoint of ``chain``, whether the optimizer state it holds for table
    ``name`` is still its rows' at the end of ``chain`` (``False`` where it lacks the table):
    every later checkpoint holding the table records the same optimizer and slots. A delta
    written after the table lost that state (loaded without its optimizer, or given another)
    holds only the rows changed since; the others' saved state is no longer theirs, and a full
    save at that point would hold none of it. One pass from the end of the chain."""
    kept = [False] * len(chain)
    later: Any = None  # what every later checkpoint holding the table records, if they agree
    mixed = False  # later checkpoints record different optimizers or slots
    for position in range(len(chain) - 1, -1, -1):
        reader = chain[position]
        if name not in reader.manifest["tables"]:
            continue
        info = reader.table_info(name)
        mine = (info["optimizer"], [tuple(s) for s in info["slots"]])
        kept[position] = not mixed and (later is None or later == mine)
        if later is None:
            later = mine
        elif later != mine:
            mixed = True
    return kept


def _load_table(
    reader: CheckpointReader,
    name: str,
    table: HashTable,
    index: int,
    shard: Any,
    state_kept: bool = True,
) -> dict[str, torch.Tensor] | None:
    """Loads logical table ``name``'s rows from ``reader`` and returns the admission state it
    holds for them (``None``: none), which the caller loads with the other logical tables'.
    ``state_kept``: whether the optimizer state saved in ``reader`` is still the rows' at the
    end of the chain (see :func:`_states_kept`); their slots are loaded only then."""
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
    if "erased" in data and data["erased"].numel():
        table.erase(data["erased"].to(table.device), index)
    # The table's clock: the checkpoint's step (a cleared table restarts at 0), or the later
    # clock of the other logical tables of a physical table loaded only in part. The same
    # whether or not this rank received rows of the table, so every shard keeps one clock.
    table.step = max(table.step, int(reader.table_info(name)["step"]))
    ids = data["ids"].to(table.device)
    if ids.numel() == 0:
        return admission or None
    fits = state_kept and _slots_fit(reader.table_info(name), table)
    slots = {s: data[f"slot.{s}"] for s, _ in table.slots if fits and f"slot.{s}" in data}
    # The saved rows go in whole: no initial vectors drawn only to be overwritten.
    full = table.full_rows(data["embeddings"], slots)
    rows = _insert_saved(table, ids, full, index, len(reader.table_info(name)["files"]))
    table.frequency[rows] = data["meta.frequency"].to(table.device)
    table.last_seen[rows] = data["meta.last_seen"].to(table.device)
    # Files written before rows recorded their insertion step: capacity eviction then breaks
    # ties by id alone.
    inserted = data.get("meta.inserted")
    table.inserted[rows] = 0 if inserted is None else inserted.to(table.device)
    return admission or None


def _insert_saved(
    table: HashTable, ids: torch.Tensor, full: torch.Tensor, index: int, files: int
) -> torch.Tensor:
    """``table.insert_or_assign`` of saved rows: one call, or one per shard file.

    Each file's ids were sorted when written, so a run of strictly increasing ids is distinct
    and inserts without deduplication; the files of a sharded save hold the runs one after
    another. Into an empty table, runs that share no id (the shards of one save) go in one
    call, which places them all in one pass; otherwise one call per run, so that an id found
    in two files takes the later file's values. Ids that fall into more runs than there are
    files (not as written) go in one call, deduplicated.
    """
    if files > 1 and ids.numel() > 1:
        breaks = true_positions(ids[1:] <= ids[:-1]) + 1
        if breaks.numel() < files:
            # Each run strictly increases (the breaks are every place it does not): distinct.
            if len(table) == 0 and _all_distinct(ids):
                return table.insert_or_assign(ids, full, index, distinct=True, counted=False)
            starts = [0, *breaks.tolist(), ids.numel()]
            return torch.cat(
                [
                    table.insert_or_assign(ids[a:b], full[a:b], index, distinct=True, counted=False)
                    for a, b in itertools.pairwise(starts)
                ]
            )
    # One file, or runs not as written: insert_or_assign finds out itself whether the ids
    # strictly increase.
    return table.insert_or_assign(ids, full, index, counted=False)


def _all_distinct(ids: torch.Tensor) -> bool:
    """Whether no id repeats: one sort of a copy (NumPy's on the host, faster than torch's)."""
    if on_host(ids):
        host = np.sort(ids.numpy())
        return not bool((host[1:] == host[:-1]).any())
    ordered = torch.sort(ids).values
    return not bool((ordered[1:] == ordered[:-1]).any())
