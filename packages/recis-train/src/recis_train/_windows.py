"""Where ``Online``'s windows come from: a watched directory, or an iterable of file paths."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from recis_train.exceptions import ConfigError, SourceNotFoundError

_log = logging.getLogger("recis_train")

WindowSource = Iterable["str | os.PathLike[str] | Sequence[str | os.PathLike[str]]"]


@dataclasses.dataclass
class WatchDirectory:
    """A directory polled for new data files, in sorted name order.

    Names starting with ``.`` or ``_`` are never read (the Hadoop/Spark convention for files still
    being written or bookkeeping files): a writer should write ``.part-7.parquet`` and rename it
    to ``part-7.parquet`` when complete, or use a ``marker``.

    Attributes:
        directory: the directory to watch (it must exist).
        pattern: glob of data files, relative to ``directory`` (or to a window's subdirectory).
        marker: ``None``: each new data file is a window. A name (e.g. ``"_SUCCESS"``): each
            subdirectory holding a file of that name is a window of all its data files (an
            hourly partition a writer marks complete); unmarked subdirectories wait. The marker
            itself is never read, even where ``pattern`` matches it.
        poll_interval: seconds between looks when nothing new is there.
        idle_timeout: stop after this many seconds without a new window (``None``: keep
            watching until ``max_windows``).
    """

    directory: str | os.PathLike[str]
    pattern: str = "*.parquet"
    marker: str | None = None
    poll_interval: float = 30.0
    idle_timeout: float | None = None
    _reported: set[Path] = dataclasses.field(
        default_factory=set, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.poll_interval < 0:
            raise ConfigError(f"poll_interval must be 0 or more, got {self.poll_interval}")
        if self.idle_timeout is not None and self.idle_timeout < 0:
            raise ConfigError(f"idle_timeout must be 0 or more or None, got {self.idle_timeout}")

    def ready(self) -> list[list[str]]:
        """Every complete window present now (absolute paths), in sorted order.

        Raises:
            SourceNotFoundError: the directory does not exist.
        """
        root = Path(self.directory).resolve()
        if root.is_file():
            raise SourceNotFoundError(
                f"watched directory {root} is a file; pass [path] as the source for a window "
                "of that one file"
            )
        if not root.is_dir():
            raise SourceNotFoundError(f"watched directory {root} does not exist")
        if self.marker is None:
            return [[str(p)] for p in _data_files(root, self.pattern)]
        parts = sorted(d for d in root.iterdir() if d.is_dir() and not _hidden(d.name))
        windows = []
        for d in parts:
            if not (d / self.marker).is_file():
                continue
            # The marker is bookkeeping, never data, whatever the pattern matches (a loose
            # "*" for Hive's 000000_0 would take a marker named DONE).
            files = [p for p in _data_files(d, self.pattern) if p != d / self.marker]
            if not files and d not in self._reported:
                # Marked complete, yet nothing to read: most likely a pattern that does not fit
                # the writer's file names (Hive writes 000000_0 without an extension).
                self._reported.add(d)
                _log.warning(
                    "watched partition %s is marked complete (%s) but holds no file matching "
                    "%r; it is passed over",
                    d,
                    self.marker,
                    self.pattern,
                )
            windows.append([str(p) for p in files])
        return windows


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def _data_files(directory: Path, pattern: str) -> list[Path]:
    # Hidden anywhere below the directory: a pattern reaching into subdirectories (``**/``)
    # must not read Spark's ``_temporary/`` or a ``.staging/`` directory being written.
    return sorted(
        p
        for p in directory.glob(pattern)
        if p.is_file() and not any(_hidden(part) for part in p.relative_to(directory).parts)
    )


def as_window(item: Any, position: int) -> list[str]:
    """One source item (a path or a sequence of paths) as a list of absolute path strings, each
    file once: ``a.parquet`` and ``./a.parquet`` are one file, trained at most once."""
    return list(dict.fromkeys(os.path.abspath(p) for p in _paths(item, position)))


def _paths(item: Any, position: int) -> list[str]:
    if isinstance(item, (str, os.PathLike)):
        return [os.fspath(item)]
    if isinstance(item, Sequence) and not isinstance(item, (bytes, bytearray)):
        if not item:
            raise ConfigError(f"window {position} of the source is empty")
        bad = [p for p in item if not isinstance(p, (str, os.PathLike))]
        if bad:
            raise ConfigError(
                f"window {position} of the source holds {type(bad[0]).__name__} {bad[0]!r}, "
                "expected file paths"
            )
        return [os.fspath(p) for p in item]
    raise ConfigError(
        f"window {position} of the source is {type(item).__name__} {item!r}, "
        "expected a file path or a sequence of file paths"
    )
