"""Turning files, directories and globs into an ordered list of data files."""

from __future__ import annotations

import errno
import fnmatch
import glob
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Union

from .exceptions import DataFileNotFoundError, InvalidArgumentError

PathLike = Union[str, "os.PathLike[str]"]
_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".orc": "orc"}
_FORMATS = ("auto", "parquet", "orc")


def _format_of(path: Path, fmt: str) -> str | None:
    if fmt != "auto":
        return fmt
    return _SUFFIXES.get(path.suffix.lower())


def _hidden_name(name: str) -> bool:
    return name.startswith((".", "_"))


def _hidden_match(match: str, pattern: str) -> bool:
    """Whether a glob match passes through a hidden or ``_``-prefixed name the pattern did
    not spell out (``data/*`` skips ``data/_SUCCESS``, ``data/_part*`` still matches).

    The pattern's names are lined up with the match's: each ``**`` takes zero or more names
    (never spelling one out), every other part one name. The match is hidden when some lining
    up exists and every one passes such a name through a wildcard; where none lines up (a
    spelling this matcher does not follow), the match is kept, as glob found it."""
    got, pat = Path(match).parts, Path(pattern).parts
    memo: dict[tuple[int, int, bool], bool] = {}

    def fits(i: int, j: int, strict: bool) -> bool:
        # Whether got[i:] lines up with pat[j:] (strict: without an unspelled hidden name).
        key = (i, j, strict)
        if key not in memo:
            if j == len(pat):
                memo[key] = i == len(got)
            elif pat[j] == "**":
                memo[key] = fits(i, j + 1, strict) or (
                    i < len(got)
                    and not (strict and _hidden_name(got[i]))
                    and fits(i + 1, j, strict)
                )
            else:
                memo[key] = (
                    i < len(got)
                    and fnmatch.fnmatchcase(got[i], pat[j])
                    and not (strict and _hidden_name(got[i]) and not pat[j].startswith(got[i][0]))
                    and fits(i + 1, j + 1, strict)
                )
        return memo[key]

    return fits(0, 0, strict=False) and not fits(0, 0, strict=True)


def resolve_paths(paths: PathLike | Sequence[PathLike], fmt: str) -> list[tuple[str, str]]:
    """Expands ``paths`` into ``(file, format)`` pairs in a stable order.

    Directories contribute their data files (recursively, sorted name by name from the
    directory, skipping every file whose path below the directory has a hidden or
    ``_``-prefixed name, such as ``_SUCCESS`` or ``_temporary/``, and files of other formats);
    globs are expanded and sorted the same way, skipping the hidden and ``_``-prefixed names
    the pattern matched with a wildcard and, with ``fmt="auto"``, matched files of no data
    format (``README.md``), and a directory they match contributes its data files as a
    directory does; explicit files keep the given order.

    Every file may be reached once: a file that two entries reach (a directory and a file
    inside it, one file listed twice, two globs matching it, ``./a.parquet`` and
    ``a.parquet``, a link and its target) would be read twice per epoch, so it raises
    :class:`InvalidArgumentError` naming the file and both entries.
    """
    if fmt not in _FORMATS:
        raise InvalidArgumentError(f"format must be one of {', '.join(_FORMATS)}, got {fmt!r}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not isinstance(paths, Iterable) or isinstance(paths, (bytes, bytearray)):
        # Iterating bytes would give ints, and None or a number is not iterable at all.
        raise InvalidArgumentError(
            f"paths must be a path (str or os.PathLike) or a list of them, got {paths!r}"
        )
    paths = list(paths)
    for raw in paths:
        if not isinstance(raw, (str, os.PathLike)) or isinstance(os.fspath(raw), bytes):
            raise InvalidArgumentError(
                f"paths must hold str or os.PathLike entries, got {raw!r} in {paths!r}"
            )
    out: list[tuple[str, str]] = []
    # Each file's identity (device and inode, else its resolved path) -> the entry that
    # reached it and the path it was found as.
    seen: dict[object, tuple[str, Path]] = {}
    for raw in paths:
        text = os.fspath(raw)
        path = Path(text)
        if path.is_dir():
            found = _data_files(path, fmt)
            if not found:
                raise DataFileNotFoundError(
                    f"directory {text} holds no .parquet, .pq or .orc files"
                )
        elif path.is_file():
            # Before globbing: a file named `part[1].parquet` is that file, not a pattern.
            found = [path]
        elif glob.has_magic(text):
            # A matched directory (a Hive partition, `dt=2024-*`) contributes its data files
            # as a directory entry does; a file both matched and below a matched directory
            # (`data/**`) is one file of the pattern.
            matched: set[Path] = set()
            # Files the pattern matched whose names are of no data format (a README.md next
            # to the parts): skipped as a directory skips them, named if nothing else matched.
            other: list[str] = []
            for m in glob.glob(text, recursive=True):
                if _hidden_match(m, text):
                    continue
                if Path(m).is_file():
                    if _format_of(Path(m), fmt) is None:
                        other.append(m)
                    else:
                        matched.add(Path(m))
                elif Path(m).is_dir():
                    matched.update(_data_files(Path(m), fmt))
            # The order a directory of the same files has, so that a state taken with one
            # spelling of the data set resumes with the other.
            found = sorted(matched, key=_tree_order)
            if not found and other:
                raise DataFileNotFoundError(
                    f"pattern {text} matches no .parquet, .pq or .orc files (it matches "
                    f"{min(other)}{' and others' if len(other) > 1 else ''}); pass "
                    "format='parquet' or 'orc' to read files named otherwise"
                )
            if not found:
                raise DataFileNotFoundError(f"pattern {text} matches no data files")
        else:
            # As the reader raises it: errno and filename set, as open() sets them.
            raise DataFileNotFoundError(errno.ENOENT, "file not found", text)
        for p in found:
            f = _format_of(p, fmt)
            if f is None:
                raise InvalidArgumentError(
                    f"cannot tell the format of {p} from its name, pass format='parquet' or 'orc'"
                )
            key = _identity(p)
            if key in seen:
                raise InvalidArgumentError(_twice(p, seen[key], text))
            seen[key] = (text, p)
            out.append((str(p), f))
    if not out:
        raise DataFileNotFoundError("no input files given")
    return out


def _data_files(directory: Path, fmt: str) -> list[Path]:
    """The data files below ``directory``, sorted, skipping paths with hidden or
    ``_``-prefixed names below it and files of no data format. Linked directories are
    followed, as a glob follows them (``data/`` and ``data/*`` reach the same files); a link
    back to a directory above it raises :class:`InvalidArgumentError`."""
    found: list[Path] = []

    def visit(folder: Path, above: tuple[object, ...]) -> None:
        here = _identity(folder)
        if here in above:
            raise InvalidArgumentError(
                f"directory {directory}: {folder} leads back to a directory above it (a link "
                "cycle); its files would be read without end"
            )
        with os.scandir(folder) as entries:
            listed = sorted(entries, key=lambda e: e.name)
        for entry in listed:
            if _hidden_name(entry.name):
                continue
            path = Path(entry.path)
            if entry.is_dir():  # a link to a directory too
                visit(path, (*above, here))
            elif entry.is_file() and _format_of(path, fmt):
                found.append(path)

    visit(directory, ())
    return sorted(found, key=_tree_order)


def _tree_order(path: Path) -> tuple[str, ...]:
    """Sort key of a data file: name by name from the root, so a directory's files come
    together (``a/x`` before ``a-b/x``, which comparing whole strings puts first, as ``-``
    sorts before ``/``)."""
    return path.parts


def _identity(path: Path) -> object:
    """What makes two paths one file: the device and inode (shared by links to it), or the
    resolved path where the file system has no inode numbers."""
    st = path.stat()
    if st.st_ino:
        return (st.st_dev, st.st_ino)
    return os.path.realpath(path)


def _twice(path: Path, first: tuple[str, Path], entry: str) -> str:
    """The error for a file reached twice: by ``first`` (entry, path found) and by ``entry``."""
    first_entry, first_path = first
    by = f"both by {entry!r}" if first_entry == entry else f"by {first_entry!r} and by {entry!r}"
    if first_path != path:
        by += f" (as {first_path} and as {path})"
    return (
        f"paths reach the file {os.path.realpath(path)} twice, {by}; "
        "give each file once, or its rows would be read twice per epoch"
    )
