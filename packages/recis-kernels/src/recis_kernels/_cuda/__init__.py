"""CUDA infrastructure: NVRTC compilation with a two-level cache, and kernel launches.

Nothing in this package imports cuda-python at module import time, so a CPU-only install imports
cleanly; the first CUDA launch (or an explicit :func:`compile_kernel`) loads it.
"""

from recis_kernels._cuda.compiler import (
    CompiledKernel,
    cache_dir,
    compile_all,
    compile_kernel,
    kernel_names,
)
from recis_kernels._cuda.launcher import launch

__all__ = [
    "CompiledKernel",
    "cache_dir",
    "compile_all",
    "compile_kernel",
    "kernel_names",
    "launch",
]
