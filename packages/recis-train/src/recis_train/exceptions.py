"""Exceptions raised by recis-train.

Every error derives from :class:`RecisTrainError`; each leaf also derives from the builtin a
caller would naturally catch (``ValueError``, ``FileNotFoundError``, ``RuntimeError``).
"""

from __future__ import annotations

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "LabelError",
    "MetricInputError",
    "ModelOutputError",
    "NonFiniteLossError",
    "RankFailedError",
    "RecisTrainError",
    "SourceNotFoundError",
]


class RecisTrainError(Exception):
    """Base class of every recis-train error."""


class ConfigError(RecisTrainError, ValueError):
    """Training arguments, a pipeline or a hook are configured with an invalid value."""


class LabelError(RecisTrainError, ValueError):
    """A batch's label column does not fit its task: not one label per row, or values the
    task's loss does not accept (binary cross-entropy: outside ``[0, 1]``); or the task's mask
    is not one bool (or 0/1 number) per row."""


class MetricInputError(RecisTrainError, ValueError):
    """A metric received predictions, labels or groups it cannot use."""


class ModelOutputError(RecisTrainError, TypeError):
    """The model returned something that is neither a loss nor a dict of per-task losses."""


class NonFiniteLossError(RecisTrainError, FloatingPointError):
    """The loss of a training step is NaN or infinite."""


class RankFailedError(RecisTrainError, RuntimeError):
    """Another rank of a distributed run failed (e.g. reading its data); raised on the ranks
    that did not, naming the ranks that did and their errors, so that none is left waiting."""


class CheckpointError(RecisTrainError, RuntimeError):
    """A checkpoint cannot be written, or is incomplete or inconsistent when read."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file's bytes are not the ones written: its checksum differs from the one
    the manifest recorded (bit rot, a partial overwrite, a copy gone wrong)."""


class CheckpointNotFoundError(RecisTrainError, FileNotFoundError):
    """No complete checkpoint exists where one was asked for."""


class SourceNotFoundError(RecisTrainError, FileNotFoundError):
    """A data source (e.g. a watched directory) does not exist."""
