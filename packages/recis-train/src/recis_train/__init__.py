"""recis-train: the Trainer, pipelines, metrics and checkpoints of recis."""

from recis_train import metrics
from recis_train._arguments import TrainingArguments
from recis_train._checkpoint import CheckpointManager
from recis_train._hooks import (
    EarlyStopping,
    Hook,
    LoggingHook,
    ProfilerHook,
    TableStatsHook,
    TensorBoardHook,
    find_tables,
)
from recis_train._multistage import MultiStage, Stage
from recis_train._multitask import MultiTask, Task
from recis_train._online import Online, WindowResult
from recis_train._outputs import StepOutput, parse_output
from recis_train._sparse import EmbeddingCheckpoint, SparseCheckpoint
from recis_train._state import seed_everything
from recis_train._trainer import Trainer
from recis_train._warmstart import WarmStartResult, warm_start
from recis_train._windows import WatchDirectory
from recis_train.exceptions import RecisTrainError

__all__ = [
    "CheckpointManager",
    "EarlyStopping",
    "EmbeddingCheckpoint",
    "Hook",
    "LoggingHook",
    "MultiStage",
    "MultiTask",
    "Online",
    "ProfilerHook",
    "RecisTrainError",
    "SparseCheckpoint",
    "Stage",
    "StepOutput",
    "TableStatsHook",
    "Task",
    "TensorBoardHook",
    "Trainer",
    "TrainingArguments",
    "WarmStartResult",
    "WatchDirectory",
    "WindowResult",
    "find_tables",
    "metrics",
    "parse_output",
    "seed_everything",
    "warm_start",
]
