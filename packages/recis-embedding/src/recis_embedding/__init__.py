"""recis-embedding: dynamic hash embedding tables, table fusion, sparse optimizers, checkpoints."""

from recis_embedding._checkpoint import FORMAT_VERSION, CheckpointReader
from recis_embedding._checkpoint_load import load
from recis_embedding._checkpoint_save import save
from recis_embedding._engine import DynamicEmbedding, EmbeddingEngine
from recis_embedding._initializers import (
    Constant,
    Initializer,
    KaimingNormal,
    KaimingUniform,
    Normal,
    TruncatedNormal,
    Uniform,
    XavierNormal,
    XavierUniform,
)
from recis_embedding._optim import (
    SparseAdagrad,
    SparseAdam,
    SparseAdamW,
    SparseFTRL,
    SparseOptimizer,
    SparseRowWiseAdagrad,
    SparseSGD,
    leaving_out,
    sparse_parameters,
)
from recis_embedding._options import EmbeddingOption
from recis_embedding._policies import (
    AdmissionPolicy,
    CapacityEviction,
    EvictionPolicy,
    FrequencyAdmission,
    ProbabilityAdmission,
    ReadOnlyAdmission,
    StaleEviction,
    make_policy,
    register_policy,
)
from recis_embedding._statedict import tables_saved_separately
from recis_embedding._table import HashTable, TableStats
from recis_embedding.exceptions import (
    CheckpointCorruptError,
    CheckpointError,
    ConfigError,
    InputError,
    OptimizerError,
    RecisEmbeddingError,
    TableFullError,
    TablesNotInStateDictWarning,
)

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "AdmissionPolicy",
    "CapacityEviction",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointReader",
    "ConfigError",
    "Constant",
    "DynamicEmbedding",
    "EmbeddingEngine",
    "EmbeddingOption",
    "EvictionPolicy",
    "FrequencyAdmission",
    "HashTable",
    "Initializer",
    "InputError",
    "KaimingNormal",
    "KaimingUniform",
    "Normal",
    "OptimizerError",
    "ProbabilityAdmission",
    "ReadOnlyAdmission",
    "RecisEmbeddingError",
    "SparseAdagrad",
    "SparseAdam",
    "SparseAdamW",
    "SparseFTRL",
    "SparseOptimizer",
    "SparseRowWiseAdagrad",
    "SparseSGD",
    "StaleEviction",
    "TableFullError",
    "TableStats",
    "TablesNotInStateDictWarning",
    "TruncatedNormal",
    "Uniform",
    "XavierNormal",
    "XavierUniform",
    "__version__",
    "leaving_out",
    "load",
    "make_policy",
    "register_policy",
    "save",
    "sparse_parameters",
    "tables_saved_separately",
]
