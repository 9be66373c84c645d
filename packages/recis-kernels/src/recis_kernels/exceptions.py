"""Exception hierarchy of recis-kernels.

Every error raised on purpose by this package derives from :class:`RecisKernelsError`; the leaves
also derive from the matching builtin so callers may catch ``ValueError`` or ``RuntimeError``.
"""

from __future__ import annotations

__all__ = [
    "ArgumentError",
    "BackendError",
    "CudaUnavailableError",
    "IndexOutOfRangeError",
    "KernelCompileError",
    "KernelLaunchError",
    "RaggedError",
    "RecisKernelsError",
    "ShapeError",
    "UnsupportedDeviceError",
    "UnsupportedDtypeError",
]


class RecisKernelsError(Exception):
    """Base class of every error raised by recis-kernels."""


class ArgumentError(RecisKernelsError, ValueError):
    """A non-tensor argument has a value the op does not accept (a modulus, a bucket count, a
    length, a mode or side name, mismatched list lengths)."""


class RaggedError(RecisKernelsError, ValueError):
    """A ragged structure is malformed (offsets not monotone, wrong length, bad level count)."""


class ShapeError(RecisKernelsError, ValueError):
    """A tensor argument has the wrong number of dimensions or mismatched lengths."""


class IndexOutOfRangeError(RecisKernelsError, IndexError, ValueError):
    """An index or offset argument addresses memory outside what it indexes (a row past a
    store's capacity, offsets past the values). The message names the op, the argument, the
    position and the value. On CUDA the kernels detect it and the error is raised where the
    package next reads the device, or by :func:`recis_kernels.check_index_errors`.

    It is an ``IndexError``, and a ``ValueError`` like the other malformed-argument errors
    (offsets were reported as ``ValueError`` before they were checked by position)."""


class UnsupportedDtypeError(RecisKernelsError, TypeError):
    """A tensor argument has a dtype the op does not accept."""


class UnsupportedDeviceError(RecisKernelsError, ValueError):
    """Tensor arguments live on different devices, or on a device the op does not support."""


class BackendError(RecisKernelsError, ValueError):
    """``RECIS_KERNELS_BACKEND`` holds an unknown value."""


class CudaUnavailableError(RecisKernelsError, RuntimeError):
    """The CUDA backend was requested but cuda-python (the ``recis-kernels[cuda]`` extra) or a GPU
    is missing."""


class KernelCompileError(RecisKernelsError, RuntimeError):
    """NVRTC rejected a kernel source; the message carries the op name, the arch and the log."""


class KernelLaunchError(RecisKernelsError, RuntimeError):
    """The CUDA driver failed to load a compiled module or launch a kernel."""
