"""recis-kernels: RaggedTensor and fused sparse ops on CPU (torch) and CUDA (NVRTC)."""

from recis_kernels._backend import backend, cuda_python_available
from recis_kernels._cuda.compiler import (
    CompiledKernel,
    cache_dir,
    compile_all,
    compile_kernel,
    kernel_names,
)
from recis_kernels._cuda.index_errors import check_index_errors
from recis_kernels._overlap import finish_overlapped, overlap, overlap_pending
from recis_kernels.exceptions import (
    ArgumentError,
    BackendError,
    CudaUnavailableError,
    IndexOutOfRangeError,
    KernelCompileError,
    KernelLaunchError,
    RaggedError,
    RecisKernelsError,
    ShapeError,
    UnsupportedDeviceError,
    UnsupportedDtypeError,
)
from recis_kernels.ops.bucketize import bucketize, fused_bucketize
from recis_kernels.ops.dense import dense_to_ragged, ragged_to_dense
from recis_kernels.ops.feature_cross import feature_cross, fused_feature_cross
from recis_kernels.ops.hash_table import IdMap, IdMapExport, fmix64
from recis_kernels.ops.hashing import hash_bytes, hash_strings
from recis_kernels.ops.interleave import InterleaveResult, interleave_bags
from recis_kernels.ops.mix import hashed_uniform, mix64, multi_hash
from recis_kernels.ops.mod import fused_mod, mod
from recis_kernels.ops.optim import (
    adagrad_rows_,
    adam_rows_,
    adam_store_,
    ftrl_rows_,
    rowwise_adagrad_rows_,
    rowwise_adagrad_store_,
    sgd_rows_,
    state_width,
)
from recis_kernels.ops.partition import PartitionResult, owner_rank, partition_ids
from recis_kernels.ops.pooled_grad import pooled_rows_grad
from recis_kernels.ops.row_store import RowStore
from recis_kernels.ops.segment_reduce import segment_reduce
from recis_kernels.ops.sort import sort_by_high_bits_
from recis_kernels.ops.truncate import TruncateResult, fused_truncate, truncate
from recis_kernels.ops.unique import UniquePairsResult, UniqueResult, unique, unique_pairs
from recis_kernels.ragged import RaggedTensor

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "BackendError",
    "CompiledKernel",
    "CudaUnavailableError",
    "IdMap",
    "IdMapExport",
    "IndexOutOfRangeError",
    "InterleaveResult",
    "KernelCompileError",
    "KernelLaunchError",
    "PartitionResult",
    "RaggedError",
    "RaggedTensor",
    "RecisKernelsError",
    "RowStore",
    "ShapeError",
    "TruncateResult",
    "UniquePairsResult",
    "UniqueResult",
    "UnsupportedDeviceError",
    "UnsupportedDtypeError",
    "__version__",
    "adagrad_rows_",
    "adam_rows_",
    "adam_store_",
    "backend",
    "bucketize",
    "cache_dir",
    "check_index_errors",
    "compile_all",
    "compile_kernel",
    "cuda_python_available",
    "dense_to_ragged",
    "feature_cross",
    "finish_overlapped",
    "fmix64",
    "ftrl_rows_",
    "fused_bucketize",
    "fused_feature_cross",
    "fused_mod",
    "fused_truncate",
    "hash_bytes",
    "hash_strings",
    "hashed_uniform",
    "interleave_bags",
    "kernel_names",
    "mix64",
    "mod",
    "multi_hash",
    "overlap",
    "overlap_pending",
    "owner_rank",
    "partition_ids",
    "pooled_rows_grad",
    "ragged_to_dense",
    "rowwise_adagrad_rows_",
    "rowwise_adagrad_store_",
    "segment_reduce",
    "sgd_rows_",
    "sort_by_high_bits_",
    "state_width",
    "truncate",
    "unique",
    "unique_pairs",
]
