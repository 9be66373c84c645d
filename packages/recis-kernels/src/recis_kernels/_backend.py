"""Backend choice: which implementation an op runs for a given tensor.

``RECIS_KERNELS_BACKEND`` selects it:

- ``auto`` (default): NVRTC kernels for CUDA tensors when cuda-python is installed, otherwise the
  torch implementation (which also runs on CUDA tensors, more slowly); CPU tensors always use torch.
- ``cpu``: the torch implementation everywhere (useful to compare against the kernels).
- ``cuda``: NVRTC kernels for CUDA tensors, and a :class:`CudaUnavailableError` naming the
  ``recis-kernels[cuda]`` extra when cuda-python is missing.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import torch

from recis_kernels.exceptions import BackendError, CudaUnavailableError

__all__ = ["backend", "cuda_python_available", "use_cuda_kernels"]

_CHOICES = ("auto", "cpu", "cuda")


def backend() -> str:
    """The backend named by ``RECIS_KERNELS_BACKEND`` (``auto`` when unset)."""
    value = os.environ.get("RECIS_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise BackendError(
            f"RECIS_KERNELS_BACKEND must be one of {', '.join(_CHOICES)}, got {value!r}"
        )
    return value


@lru_cache(maxsize=1)
def cuda_python_available() -> bool:
    """Whether ``cuda.bindings`` (the cuda-python package) can be imported."""
    try:
        return importlib.util.find_spec("cuda.bindings") is not None
    except (ImportError, ValueError):
        return False


def use_cuda_kernels(device: torch.device) -> bool:
    """Whether an op whose tensors live on ``device`` should launch its NVRTC kernel."""
    choice = backend()
    if device.type != "cuda" or choice == "cpu":
        return False
    if cuda_python_available():
        return True
    if choice == "cuda":
        raise CudaUnavailableError(
            "RECIS_KERNELS_BACKEND=cuda needs cuda-python; install the extra with "
            "`pip install recis-kernels[cuda]`"
        )
    return False
