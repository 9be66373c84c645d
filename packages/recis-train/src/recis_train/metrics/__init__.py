"""Streaming evaluation metrics, synced across ranks when ``torch.distributed`` is initialized.

Every metric follows one protocol: ``update(preds, labels, ...)`` per batch, ``compute()`` for
the value over everything seen, ``reset()``, and ``state_dict()`` / ``load_state_dict()``.
"""

from recis_train.metrics._auc import AUROC, GAUC
from recis_train.metrics._base import Metric
from recis_train.metrics._scalar import Calibration, LogLoss

__all__ = ["AUROC", "GAUC", "Calibration", "LogLoss", "Metric"]
