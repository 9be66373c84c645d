"""Exceptions raised by recis-io.

Every error derives from :class:`RecisIOError`; the leaves also derive from the builtin a
caller would naturally catch (``FileNotFoundError``, ``OSError``, ``ValueError``,
``RuntimeError``).
"""

from __future__ import annotations

__all__ = [
    "CorruptFileError",
    "DataFileNotFoundError",
    "DataFileReadError",
    "ForkedReaderError",
    "InvalidArgumentError",
    "RecisIOError",
    "SchemaError",
]


class RecisIOError(Exception):
    """Base class of every recis-io error."""


class DataFileNotFoundError(RecisIOError, FileNotFoundError):
    """A path, directory or glob matched no readable data file, or a planned file was gone
    when read. A missing file carries ``errno`` (``ENOENT``) and ``filename``, as ``open()``
    sets them: ``[Errno 2] file not found: '/data/a.parquet'``."""


class DataFileReadError(RecisIOError, OSError):
    """The operating system refused or failed a read of a data file: permission denied, an
    I/O error, a directory where a file was planned. ``errno`` holds its error number and the
    message names the file: ``[Errno 13] cannot read /data/a.parquet: permission denied``."""


class SchemaError(RecisIOError, ValueError):
    """A missing column, an unsupported type, a Parquet column or footer encrypted with
    modular encryption (not decrypted), files whose types disagree, or nulls in a column that
    has no ``fill`` value."""


class CorruptFileError(RecisIOError):
    """A file that is not valid Parquet/ORC or is truncated; the message names the file."""


class InvalidArgumentError(RecisIOError, ValueError):
    """An option out of range or of the wrong kind."""


class ForkedReaderError(RecisIOError, RuntimeError):
    """An iterator started in one process was used in a forked child."""
