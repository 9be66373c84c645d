"""Exception and warning classes of recis-embedding.

Every error raised on purpose derives from :class:`RecisEmbeddingError`; the leaves also derive
from the matching builtin so callers may catch ``ValueError``, ``KeyError`` or ``RuntimeError``.
"""

from __future__ import annotations

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "ConfigError",
    "InputError",
    "OptimizerError",
    "RecisEmbeddingError",
    "TableFullError",
    "TablesNotInStateDictWarning",
]


class RecisEmbeddingError(Exception):
    """Base class of every error raised by recis-embedding."""


class ConfigError(RecisEmbeddingError, ValueError):
    """An option, initializer or policy has an invalid value."""


class InputError(RecisEmbeddingError, ValueError):
    """Ids given to a lookup have the wrong type, dtype, shape or device."""


class TableFullError(RecisEmbeddingError, RuntimeError):
    """A table reached its capacity and has no eviction policy to make room."""


class OptimizerError(RecisEmbeddingError, ValueError):
    """A sparse optimizer got invalid hyperparameters or tables it cannot serve."""


class CheckpointError(RecisEmbeddingError, ValueError):
    """A checkpoint is missing, corrupt (checksum mismatch) or does not match the model."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file's bytes (or the manifest's) are not the ones written: its SHA-256
    differs from the one recorded (bit rot, a partial overwrite, a copy gone wrong)."""


class TablesNotInStateDictWarning(UserWarning):
    """``state_dict()`` was taken of a module whose embedding tables hold rows.

    Tables are neither parameters nor buffers, so the state dict holds none of their rows: a
    ``load_state_dict`` of it leaves the tables as they are (freshly initialized in a new
    model). Save tables with :func:`recis_embedding.save`; code that does so wraps its own
    ``state_dict()`` calls in :func:`recis_embedding.tables_saved_separately`.
    """
