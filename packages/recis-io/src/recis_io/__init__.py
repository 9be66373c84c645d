"""recis-io: a multithreaded Parquet/ORC reader yielding packed PyTorch batches."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from ._batch import Batch, Ragged
from ._column import Column
from ._dataset import Dataset
from ._recis_io import hash_bytes
from .exceptions import (
    CorruptFileError,
    DataFileNotFoundError,
    DataFileReadError,
    ForkedReaderError,
    InvalidArgumentError,
    RecisIOError,
    SchemaError,
)

try:
    __version__ = version("recis-io")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0+unknown"

__all__ = [
    "Batch",
    "Column",
    "CorruptFileError",
    "DataFileNotFoundError",
    "DataFileReadError",
    "Dataset",
    "ForkedReaderError",
    "InvalidArgumentError",
    "Ragged",
    "RecisIOError",
    "SchemaError",
    "__version__",
    "hash_bytes",
]
