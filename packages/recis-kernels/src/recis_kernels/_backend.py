"""Backend choice: which implementation an op runs for a given tensor.

``RECIS_KERNELS_BACKEND`` selects it:

- ``auto`` (default): NVRTC kernels for CUDA tensors when cuda-python is installed, otherwise the
  torch implementation (which also runs on CUDA tensors, more slowly).
- ``cpu``: no CUDA kernels; CUDA tensors take the torch implementation too (useful to compare
  against the kernels).
- ``cuda``: NVRTC kernels for CUDA tensors, and a :class:`CudaUnavailableError` naming the
  ``recis-kernels[cuda]`` extra when cuda-python is missing.

The choice only concerns CUDA tensors: CPU tensors always take the CPU path (the compiled CPU
kernels of :mod:`recis_kernels._native` where an op has one, torch otherwise).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch

from recis_kernels.exceptions import BackendError, CudaUnavailableError

__all__ = ["backend", "cuda_python_available", "on_host", "run_op", "use_cuda_kernels"]

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


_DIRECT_DEVICES = ("cpu", "cuda")


def _plain(args: tuple[Any, ...]) -> bool:
    grad = torch.is_grad_enabled()
    for a in args:
        for t in a if isinstance(a, list) else (a,):
            if isinstance(t, torch.Tensor) and (
                type(t) is not torch.Tensor
                or (grad and t.requires_grad)
                or t.device.type not in _DIRECT_DEVICES
            ):
                return False
    return True


def run_op(op: Callable[..., Any], impl: Callable[..., Any], *args: Any) -> Any:
    """Run the custom op ``op`` whose implementation is ``impl``.

    Eager calls on plain CPU or CUDA tensors that need no gradient run ``impl`` directly: going
    through torch's dispatcher costs tens of microseconds a call, as much as the work itself on
    a batch of a few thousand ids, and buys nothing there. Everything else goes through ``op``:
    ``torch.compile`` and export, ``torch.jit.trace`` (which records the op), tensor subclasses
    (fake and functional tensors), meta tensors and inputs that need gradients (the op's
    registered autograd).
    """
    if not torch.compiler.is_compiling() and not torch.jit.is_tracing() and _plain(args):
        return impl(*args)
    return op(*args)


def on_host(tensors) -> bool:
    """Whether an op's CPU path may work on these tensors' memory directly (NumPy, or the
    compiled CPU kernels): eager, plain CPU tensors (``None`` entries are skipped) that need no
    gradient."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    return all(plain_host(t) for t in tensors if t is not None)


def plain_host(t: object) -> bool:
    """Whether ``t`` is a plain (not a subclass) CPU tensor that needs no gradient: the
    per-tensor half of :func:`on_host`, which also rules out tracing."""
    return type(t) is torch.Tensor and t.is_cpu and not t.requires_grad
