"""recis-kernels: RaggedTensor and fused sparse ops on CPU (torch) and CUDA (NVRTC)."""

from recis_kernels._backend import backend, cuda_python_available
from recis_kernels._cuda.compiler import (
    CompiledKernel,
    cache_dir,
    compile_all,
    compile_kernel,
    kernel_names,
)
from recis_kernels.exceptions import (
    BackendError,
    CudaUnavailableError,
    KernelCompileError,
    KernelLaunchError,
    RaggedError,
    RecisKernelsError,
    ShapeError,
    UnsupportedDeviceError,
    UnsupportedDtypeError,
)
from recis_kernels.ops.mod import fused_mod, mod
from recis_kernels.ragged import RaggedTensor

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "CompiledKernel",
    "CudaUnavailableError",
    "KernelCompileError",
    "KernelLaunchError",
    "RaggedError",
    "RaggedTensor",
    "RecisKernelsError",
    "ShapeError",
    "UnsupportedDeviceError",
    "UnsupportedDtypeError",
    "__version__",
    "backend",
    "cache_dir",
    "compile_all",
    "compile_kernel",
    "cuda_python_available",
    "fused_mod",
    "kernel_names",
    "mod",
]
