"""recis-train: the Trainer, pipelines, metrics and checkpoints of recis."""

from recis_train import metrics
from recis_train.exceptions import RecisTrainError

__all__ = ["RecisTrainError", "metrics"]
