"""Atomic, rotating checkpoints: one directory per step, renamed into place when complete."""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import pickle
import re
import shutil
import time
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from recis_train.exceptions import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: the algorithm of the per-file checksums in the manifest
CHECKSUM = "crc32"
_CHUNK = 4 << 20
_NAME = re.compile(r"^step-(\d{9,})$")
_log = logging.getLogger("recis_train")

#: writes one part of a checkpoint into the given (temporary) directory
Writer = Callable[[Path], None]
#: what is wrong with a checkpoint's files (an empty list: nothing)
Check = Callable[[Path], list[str]]
#: the checksums of the named files (paths relative to the given directory), by name
Checksums = Callable[[Path, list[str]], dict[str, str]]


def file_checksum(path: Path) -> str:
    """The CRC32 of a file's bytes as 8 hex digits, read in chunks of a few MiB."""
    crc = 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while count := fh.readinto(buffer):
            crc = zlib.crc32(view[:count], crc)
    return f"{crc:08x}"


def file_checksums(root: Path, names: Sequence[str]) -> dict[str, str]:
    """:func:`file_checksum` of each of ``names`` (relative to ``root``), by name."""
    return {name: file_checksum(root / name) for name in names}


def part_files(manifest: Mapping[str, Any], parts: Collection[str] | None = None) -> list[str]:
    """The files a manifest lists, of the given parts only (every part when ``None``)."""
    files = manifest.get("files", [])
    if parts is None:
        return list(files)
    return [f for f in files if f.split("/", 1)[0] in parts]


def checksummed(manifest: Mapping[str, Any], part: str) -> bool:
    """Whether the manifest records a checksum of every file of ``part`` (and lists one at
    least), so that verifying the part reads each of its files."""
    files = part_files(manifest, [part])
    recorded = (manifest.get("checksums") or {}).get("files", {})
    return bool(files) and all(f in recorded for f in files)


def checksum_mismatches(path: Path, manifest: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    """The files among ``names`` whose checksum is not the one the manifest recorded, each as
    ``"dense/model.safetensors (crc32 expected 1c291ca3, found 5d4e3f01)"``.

    Checkpoints written before checksums were recorded have none to check (sizes only).

    Raises:
        CheckpointError: the manifest's checksums use an algorithm this version does not know.
    """
    recorded = manifest.get("checksums")
    if recorded is None:
        return []
    algo = recorded.get("algo")
    if algo != CHECKSUM:
        raise CheckpointError(
            f"{path}: the manifest's checksums use {algo!r}, this version of recis-train "
            f"verifies {CHECKSUM!r}"
        )
    expected = recorded.get("files", {})
    wrong = []
    for name in names:
        if name not in expected:
            continue  # only the manifest's own files are listed
        found = file_checksum(path / name)
        if found != expected[name]:
            wrong.append(f"{name} ({algo} expected {expected[name]}, found {found})")
    return wrong


def _changed(wrong: Sequence[str]) -> str:
    return f"checkpoint file(s) changed since they were written: {', '.join(wrong)}"


def first_verified(
    candidates: Sequence[Path],
    check: Check,
    *,
    explicit: bool,
    root: Path,
    damaged: Sequence[str] = (),
) -> Path | None:
    """The first of ``candidates`` (newest first) whose files ``check`` finds nothing wrong with.

    Args:
        candidates: checkpoint directories, the preferred one first.
        check: what is wrong with a checkpoint's files (an empty list: it verifies).
        explicit: the one candidate was named by the caller: a failed check raises instead of
            falling back.
        root: where the candidates were found, for the error message.
        damaged: checkpoints of ``root`` left out of ``candidates`` as incomplete although
            their manifest is there (see :meth:`CheckpointManager.damaged`).

    Returns:
        The checkpoint to restore, or ``None`` when there are no candidates and none is
        damaged.

    Raises:
        CheckpointCorruptError: ``explicit`` and the check failed (naming the file, the
            expected and the found checksum), or no candidate verifies (naming each one tried,
            and each damaged one): a run whose checkpoints are all damaged does not start over
            (and overwrite them).
    """
    tried = []
    for path in candidates:
        wrong = check(path)
        if not wrong:
            return path
        what = _changed(wrong)
        if explicit:
            raise CheckpointCorruptError(f"{path}: {what}")
        _log.warning("skipping checkpoint %s, it fails verification: %s", path, what)
        tried.append(f"{path.name} ({', '.join(wrong)})")
    found = [f"tried, newest first: {'; '.join(tried)}"] if tried else []
    if damaged:
        found.append(
            "incomplete although their manifest is there (files truncated or missing since "
            f"they were saved): {'; '.join(damaged)}"
        )
    if found:
        raise CheckpointCorruptError(
            f"no checkpoint in {root} passes verification; {'; '.join(found)}"
        )
    return None


def _step_of(path: Path) -> int:
    """The step of a checkpoint directory named ``step-000000123`` (as
    :meth:`CheckpointManager.path_for` makes them and :meth:`CheckpointManager.complete` lists
    them)."""
    return int(path.name.split("-", 1)[1])


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root``, and ``root`` itself, to the disk (a
    directory's fsync makes the names in it durable)."""
    for path in sorted(root.rglob("*"), reverse=True):  # a directory after its entries
        if path.is_file() or (path.is_dir() and not path.is_symlink()):
            _fsync(path)
    _fsync(root)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Writes, lists, rotates and finds checkpoints under ``root``.

    A checkpoint is the directory ``root/step-000000123``. It is written under a temporary name,
    its files flushed to disk, its ``manifest.json`` written last, then renamed into place, so a
    crash or an error mid-save never leaves a directory that :meth:`latest` would pick; the
    previous checkpoints stay as they were. Saving a step that has a checkpoint already replaces
    it without a moment where neither is complete: the old directory is renamed aside to
    ``.replaced-step-...``, the new one renamed in, then the old one deleted; if the process
    dies in between, :meth:`complete` puts the old one back. After a successful save, complete
    checkpoints beyond ``max_to_keep`` are deleted, lowest steps first, never the one just
    written (which a run that went back to an older checkpoint writes below later steps).

    The manifest records every file's size and CRC32 checksum. Listing (:meth:`complete`,
    :meth:`latest`, rotation) checks sizes only; :meth:`verify` and :meth:`choose` read the
    files and compare their checksums, as a restore does before loading anything.

    Args:
        root: directory holding the checkpoints (created on first save).
        max_to_keep: complete checkpoints kept.
    """

    def __init__(self, root: str | Path, *, max_to_keep: int = 3) -> None:
        self.root = Path(root)
        self.max_to_keep = max_to_keep

    def path_for(self, step: int) -> Path:
        """Where the checkpoint of ``step`` lives."""
        return self.root / f"step-{step:09d}"

    def save(
        self,
        step: int,
        writers: Mapping[str, Writer],
        meta: Mapping[str, Any],
        *,
        checksums: Checksums = file_checksums,
    ) -> Path:
        """Write a checkpoint of ``step``; each writer fills its own subdirectory.

        Args:
            step: the global step it captures.
            writers: part name -> a function writing that part into the directory it is given.
            meta: JSON-serializable facts stored in the manifest (e.g. the training arguments).
            checksums: computes the manifest's checksums of the written files (a distributed
                save shares the reading among the ranks); it must return one per file.

        Returns:
            The checkpoint's final directory.

        Raises:
            CheckpointError: a writer failed; nothing of this save is left behind.
        """
        final = self.path_for(step)
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temporaries()
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for part, write in writers.items():
                (tmp / part).mkdir()
                write(tmp / part)
            paths = sorted(p for p in tmp.rglob("*") if p.is_file())
            files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in paths}
            sums = checksums(tmp, list(files))
            if sums.keys() != files.keys():
                raise CheckpointError(
                    "the checksums computed do not match the files written: missing "
                    f"{sorted(files.keys() - sums.keys())}, extra {sorted(sums.keys() - files.keys())}"
                )
            manifest = {
                "format_version": FORMAT_VERSION,
                "step": step,
                "created": time.time(),
                "parts": sorted(writers),
                "files": sorted(files),
                "sizes": dict(sorted(files.items())),
                "checksums": {"algo": CHECKSUM, "files": sums},
                "meta": dict(meta),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            _fsync_tree(tmp)
            self._move_into_place(tmp, final)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, Exception):
                raise CheckpointError(
                    f"saving checkpoint of step {step} to {final} failed: {err}"
                ) from err
            raise
        self._rotate(final)
        return final

    def _move_into_place(self, tmp: Path, final: Path) -> None:
        # The renames are flushed (the root directory's fsync) before anything older is
        # deleted: the replaced checkpoint here, older steps by ``_rotate``.
        if not final.exists():
            os.replace(tmp, final)
            _fsync(self.root)
            return
        aside = self.root / f".replaced-{final.name}-{os.getpid()}"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(aside, final)
            raise
        _fsync(self.root)
        shutil.rmtree(aside, ignore_errors=True)

    def _recover_replaced(self) -> None:
        # Left by a process that died while replacing a checkpoint: the old one is put back
        # unless the new one made it into place.
        for aside in sorted(self.root.glob(".replaced-step-*")):
            final = self.root / aside.name.split("-", 1)[1].rsplit("-", 1)[0]
            try:
                if final.exists():
                    shutil.rmtree(aside)
                else:
                    os.replace(aside, final)
                    _log.warning("restored checkpoint %s, left aside by an interrupted save", final)
            except FileNotFoundError:
                pass  # another process (rank) recovered it first

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return self._survey()[0]

    def damaged(self) -> list[str]:
        """Checkpoints passed over as incomplete although their manifest is there, newest
        first, each as ``"step-... (what is wrong)"``. A save writes the manifest last, into a
        directory renamed into place, so such a checkpoint was complete once: a file of it was
        truncated or removed since (a copy cut short, a full disk)."""
        return self._survey()[1]

    def _candidates(self, path: str | Path | None = None) -> tuple[list[Path], list[str]]:
        """What a restore chooses from: ``path`` alone when given, else the complete
        checkpoints newest first; and (``path`` not given) the :meth:`damaged` ones, from the
        same look at the directory (each manifest is read once)."""
        if path is not None:
            return [Path(path)], []
        done, damaged = self._survey()
        return done[::-1], damaged

    def _survey(self) -> tuple[list[Path], list[str]]:
        """One pass over the checkpoint directories: the complete ones, oldest first, and the
        :meth:`damaged` ones, newest first. Incomplete ones are passed over with a warning."""
        if not self.root.is_dir():
            return [], []
        self._recover_replaced()
        done, damaged = [], []
        for path in self.root.iterdir():
            match = _NAME.match(path.name)
            if not (match and path.is_dir()):
                continue
            step = int(match.group(1))
            try:
                self.read_manifest(path)
            except (CheckpointError, OSError) as err:
                _log.warning("skipping incomplete checkpoint %s: %s", path, err)
                if (path / MANIFEST).is_file():
                    damaged.append((step, f"{path.name} ({err})"))
                continue
            done.append((step, path))
        return [p for _, p in sorted(done)], [what for _, what in sorted(damaged, reverse=True)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or ``None`` (checked by sizes only, not checksums)."""
        done = self.complete()
        return done[-1] if done else None

    def choose(
        self, path: str | Path | None = None, *, parts: Collection[str] | None = None
    ) -> Path | None:
        """The checkpoint to restore: ``path``, or the newest complete one that verifies.

        Each candidate's files of ``parts`` are read and their checksums compared with the
        manifest's. Picking the newest automatically, a checkpoint that fails is skipped with a
        warning naming the file, and the one before it is tried.

        Args:
            path: a checkpoint directory named by the caller (no fallback).
            parts: the parts to verify (every part when ``None``).

        Returns:
            The checkpoint, or ``None`` when ``path`` is ``None`` and none is complete.

        Raises:
            CheckpointNotFoundError: ``path`` is not a complete checkpoint.
            CheckpointCorruptError: ``path`` fails verification (naming the file, the expected
                and the found checksum), or none of the complete checkpoints verifies.
        """
        candidates, damaged = self._candidates(path)
        return first_verified(
            candidates,
            lambda p: self.mismatches(p, parts),
            explicit=path is not None,
            root=self.root,
            damaged=damaged,
        )

    @classmethod
    def mismatches(
        cls,
        path: str | Path,
        parts: Collection[str] | None = None,
        *,
        share: tuple[int, int] = (0, 1),
    ) -> list[str]:
        """The files of ``parts`` in checkpoint ``path`` whose checksum changed since saving.

        Args:
            path: a checkpoint directory.
            parts: the parts whose files are read (every part when ``None``).
            share: ``(index, count)``: read only every ``count``-th file from ``index`` on, so
                that ``count`` processes verify one checkpoint together.

        Raises:
            CheckpointNotFoundError: no manifest.
            CheckpointError: the checkpoint is incomplete (see :meth:`read_manifest`).
        """
        path = Path(path)
        manifest = cls.read_manifest(path)
        index, count = share
        return checksum_mismatches(path, manifest, part_files(manifest, parts)[index::count])

    @classmethod
    def verify(cls, path: str | Path, parts: Collection[str] | None = None) -> dict[str, Any]:
        """The manifest of checkpoint ``path``, after checking the checksums of its files.

        Checkpoints written before checksums were recorded are checked by size only.

        Args:
            path: a checkpoint directory.
            parts: the parts whose files are read (every part when ``None``).

        Raises:
            CheckpointNotFoundError: no manifest.
            CheckpointCorruptError: a file's checksum is not the one recorded (names the file,
                the expected and the found checksum).
            CheckpointError: the checkpoint is otherwise incomplete.
        """
        path = Path(path)
        manifest = cls.read_manifest(path)
        wrong = checksum_mismatches(path, manifest, part_files(manifest, parts))
        if wrong:
            raise CheckpointCorruptError(f"{path}: {_changed(wrong)}")
        return manifest

    @staticmethod
    def read_manifest(path: str | Path) -> dict[str, Any]:
        """The manifest of a checkpoint directory, checked for completeness: every file it
        lists is there with the size it was written with (checksums are :meth:`verify`'s)."""
        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise CheckpointNotFoundError(f"{path} is not a complete checkpoint (no {MANIFEST})")
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path / MANIFEST} is not valid json: {err}") from err
        if not isinstance(manifest, dict):
            raise CheckpointError(
                f"{path / MANIFEST} is not a checkpoint manifest (a JSON object), got "
                f"{type(manifest).__name__}"
            )
        files, sizes = manifest.get("files", []), manifest.get("sizes", {})
        if not (
            isinstance(files, (list, dict))
            and all(isinstance(f, str) for f in files)
            and isinstance(sizes, dict)
            and all(isinstance(n, int) and not isinstance(n, bool) for n in sizes.values())
        ):
            raise CheckpointError(
                f"{path / MANIFEST}: 'files' must list file names and 'sizes' map them to byte "
                "counts"
            )
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: checkpoint format {manifest.get('format_version')}, expected {FORMAT_VERSION}"
            )
        missing = [f for f in manifest.get("files", []) if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{path}: checkpoint is missing file(s) {missing}")
        # Checkpoints written before sizes were recorded have none to check.
        wrong = [
            f"{name} ({(path / name).stat().st_size} bytes, written {size})"
            for name, size in manifest.get("sizes", {}).items()
            if (path / name).stat().st_size != size
        ]
        if wrong:
            raise CheckpointError(
                f"{path}: checkpoint file(s) changed size since they were written, truncated or "
                f"overwritten: {', '.join(wrong)}"
            )
        return manifest

    def _rotate(self, written: Path) -> None:
        """Deletes complete checkpoints beyond ``max_to_keep``, the lowest steps first, never
        ``written`` (the one just saved).

        ``written`` is not always the highest step: after ``restore`` of an older checkpoint
        the run saves below the steps it went back from. It is kept whatever its step (ordering
        by step alone would delete it at once), and the later steps are kept too and named in a
        warning, since a resume takes the latest step: they are the user's to delete. Only
        steps below ``written`` are deleted, so more than ``max_to_keep`` may stay then.
        """
        others = [path for path in self.complete() if path != written]
        step = _step_of(written)
        earlier = [path for path in others if _step_of(path) < step]
        for old in earlier[: max(0, len(others) + 1 - self.max_to_keep)]:
            shutil.rmtree(old, ignore_errors=True)
        later = [path.name for path in others if _step_of(path) > step]
        if later:
            _log.warning(
                "checkpoint %s is not the latest in %s (later: %s): restore() and a resumed "
                "train() take the latest; delete the later ones if they belong to a run you "
                "went back from",
                written.name,
                self.root,
                ", ".join(later),
            )

    def _remove_stale_temporaries(self) -> None:
        # Left by a process killed mid-save; never picked up by latest().
        for path in self.root.glob(".tmp-step-*"):
            shutil.rmtree(path, ignore_errors=True)


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Save a flat name -> tensor mapping as safetensors (copies break any memory sharing)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file written by :func:`save_tensors`.

    Raises:
        CheckpointError: the file is missing or not a readable safetensors file (names it).
    """
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:
        raise CheckpointError(
            f"{path}: cannot read the tensors ({type(err).__name__}: {err})"
        ) from err


def save_object(obj: Any, path: Path) -> None:
    """Save nested state (optimizers, schedulers, RNG) with torch's serializer, checked to load
    as :func:`load_object` loads it.

    ``torch.save`` takes any picklable value, but ``torch.load(weights_only=True)`` only
    tensors, Python numbers and strings, plain containers and a few torch types: a NumPy
    scalar in a hook's ``state_dict()`` would make a checkpoint that saves fine and that no
    resume can read. So the file is read back weights-only right away (memory-mapped, its
    tensors' bytes are not read) and an entry that cannot be loaded fails the save.

    Raises:
        CheckpointError: ``obj`` holds a value that weights-only loading refuses; names the
            entry (e.g. ``hooks['BestLoss']['best']``) and its type.
    """
    torch.save(obj, path)
    try:
        _load_back(path)
    except Exception as err:
        found = _unloadable(obj)
        if found is not None:
            what = f"{found[0]} is a {found[1]}, which torch.load(weights_only=True) refuses"
        else:  # torch's own reason then; its message holds a line naming the global refused
            lines = [ln.strip() for ln in str(err).splitlines() if "Unsupported" in ln]
            what = f"torch.load(weights_only=True) refuses it ({type(err).__name__}: " + (
                f"{lines[0]})" if lines else f"{err})"
            )
        raise CheckpointError(
            f"the state written to {path.parent.name}/{path.name} could not be loaded back: "
            f"{what}, so no resume "
            "could read the checkpoint; state (a hook's state_dict(), a metric's result) may "
            "hold tensors, Python numbers, strings and None, in lists, tuples and dicts: convert "
            "NumPy values with float(x) or x.item() (torch.from_numpy(a) for an array)"
        ) from err


def _load_back(path: Path) -> None:
    """Loads ``path`` as :func:`load_object` does; memory-mapped, so that its tensors' bytes
    are not read, where the file system allows it."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise  # what weights-only loading refuses
    except Exception:  # e.g. no mmap where the file lies: read it in full instead
        torch.load(path, map_location="cpu", weights_only=True)


#: leaves weights-only loading always takes (their exact types: a NumPy float64 is a float
#: subclass, and refused), checked without a round trip
_PLAIN = (str, bytes, int, float, bool, complex, type(None))


def _loads(value: Any) -> bool:
    """Whether ``value`` alone survives ``torch.save`` and a weights-only ``torch.load``."""
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
        buffer.seek(0)
        torch.load(buffer, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return True


def _unloadable(obj: Any, where: str = "") -> tuple[str, str] | None:
    """The first entry of ``obj`` that weights-only loading refuses, as ``(where, type)``,
    e.g. ``("hooks['BestLoss']['best']", "numpy.float64")``; ``None`` if none is found.

    Plain dicts, lists and tuples are walked (keys too); every other value is checked alone,
    so that the entry named is the innermost one (tensors are never round-tripped: a large
    optimizer state is not copied to find a NumPy scalar beside it).
    """
    if type(obj) in (dict, collections.OrderedDict):
        for key, value in obj.items():
            inner = f"{where}[{key!r}]" if where else str(key)
            if type(key) not in _PLAIN and not _loads(key):
                return f"the key {key!r} of {where or 'the state'}", type_name(key)
            found = _unloadable(value, inner)
            if found is not None:
                return found
        return None
    if type(obj) in (list, tuple):
        for index, value in enumerate(obj):
            found = _unloadable(value, f"{where}[{index}]")
            if found is not None:
                return found
        return None
    if type(obj) in _PLAIN or isinstance(obj, torch.Tensor) or _loads(obj):
        return None
    return where or "the state", type_name(obj)


def type_name(value: Any) -> str:
    """``value``'s type as an error names it: ``int``, ``numpy.float64``."""
    kind = type(value)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


def load_object(path: Path) -> Any:
    """Load state saved by :func:`save_object`; only tensors and plain containers are allowed.

    Raises:
        CheckpointError: the file is missing or cannot be read (names it).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{path}: cannot read the state ({type(err).__name__}: {err})"
        ) from err
