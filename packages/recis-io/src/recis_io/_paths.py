"""Turning files, directories and globs into an ordered list of data files."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
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


def _hidden(path: Path) -> bool:
    return path.name.startswith((".", "_"))


def resolve_paths(paths: PathLike | Sequence[PathLike], fmt: str) -> list[tuple[str, str]]:
    """Expands ``paths`` into ``(file, format)`` pairs in a stable order.

    Directories contribute their data files (recursively, sorted, hidden and ``_``-prefixed
    names skipped); globs are expanded and sorted; explicit files keep the given order.
    """
    if fmt not in _FORMATS:
        raise InvalidArgumentError(f"format must be one of {', '.join(_FORMATS)}, got {fmt!r}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[tuple[str, str]] = []
    for raw in paths:
        text = os.fspath(raw)
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p))
            found = [p for p in found if _format_of(p, fmt)]
            if not found:
                raise DataFileNotFoundError(f"directory {text} holds no .parquet or .orc files")
        elif glob.has_magic(text):
            found = [Path(p) for p in sorted(glob.glob(text, recursive=True)) if Path(p).is_file()]
            if not found:
                raise DataFileNotFoundError(f"pattern {text} matches no files")
        elif path.is_file():
            found = [path]
        else:
            raise DataFileNotFoundError(f"file not found: {text}")
        for p in found:
            f = _format_of(p, fmt)
            if f is None:
                raise InvalidArgumentError(
                    f"cannot tell the format of {p} from its name, pass format='parquet' or 'orc'"
                )
            out.append((str(p), f))
    if not out:
        raise DataFileNotFoundError("no input files given")
    return out
