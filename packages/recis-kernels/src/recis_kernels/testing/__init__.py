"""Run recis-kernels' CUDA kernels on the CPU, for tests on machines without a GPU.

The grid-stride kernels (every kernel that uses no shared memory, synchronization or warp
intrinsics) compile as host C++ with ``host_shim.h``: one "thread" walks every iteration of
the grid-stride loop in order. :func:`use_host_kernels` then sends the ops of the named
modules through their kernel launch path on CPU tensors, so the launch code, the arguments
and the kernel logic run where no GPU is — also from the tests of packages built on these ops::

    kernels = HostKernels(tmp_dir)
    use_host_kernels(kernels, monkeypatch)  # pytest's monkeypatch, or anything with setattr
    ...  # every op of EMULATED_KERNELS now launches its kernel on CPU tensors

Needs a C++ compiler (``$CXX``, else ``g++`` or ``clang++``). Results match the GPU's where the
kernel's outcome does not depend on thread timing (the ``claim_slots`` kernel places keys one
after another here) and up to rounding where the GPU contracts to fused multiply-adds.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from recis_kernels.exceptions import ArgumentError

__all__ = ["EMULATED_KERNELS", "HostKernels", "use_host_kernels"]

#: Kernel sources that are plain grid-stride loops; each is launched by the op module of its
#: name (``recis_kernels.ops.<name>``). row_store's block pointer table holds the blocks' data
#: pointers, host addresses for CPU blocks.
EMULATED_KERNELS: tuple[str, ...] = (
    "mod",
    "hashing",
    "mix",
    "bucketize",
    "dense",
    "feature_cross",
    "truncate",
    "segment_reduce",
    "row_store",
    "optim",
    "hash_table",
)


class _Patcher(Protocol):
    def setattr(self, target: object, name: str, value: object) -> None: ...


class HostKernels:
    """The kernel sources compiled as host C++ into ``out``, each on first use.

    Args:
        out: directory for the shared libraries.

    Raises:
        RuntimeError: no C++ compiler was found.
    """

    def __init__(self, out: str | os.PathLike[str]) -> None:
        cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
        if cxx is None:
            raise RuntimeError("HostKernels: host kernels need a C++ compiler (set CXX)")
        self.cxx, self.out = cxx, Path(out)
        self.libs: dict[str, ctypes.CDLL] = {}

    def __getitem__(self, name: str) -> ctypes.CDLL:
        from recis_kernels._cuda import compiler

        if name not in self.libs:
            lib = self.out / f"lib{name}.so"
            shim = Path(__file__).with_name("host_shim.h")
            src = compiler._source_dir()
            cmd = [self.cxx, "-x", "c++", "-std=c++17", "-O1", "-w", "-shared", "-fPIC", "-include",
                   str(shim), "-I", str(src), str(src / f"{name}.cu"), "-o", str(lib)]  # fmt: skip
            subprocess.run(cmd, check=True)
            self.libs[name] = ctypes.CDLL(str(lib))
        return self.libs[name]

    def launch(
        self,
        module_name: str,
        kernel: str,
        grid: int | Sequence[int],
        block: int | Sequence[int],
        args: Iterable[tuple[str, Any]],
        *,
        device: torch.device | str | int | None,
        shared_mem: int = 0,
    ) -> None:
        """Stand-in for ``recis_kernels._cuda.launch`` running the kernel on CPU tensors."""
        from recis_kernels._cuda.launcher import _CTYPES

        args = list(args)
        fn = getattr(self[module_name], kernel)
        fn.restype = None
        fn.argtypes = [_CTYPES[kind] for kind, _ in args]
        fn(*[v.data_ptr() if isinstance(v, torch.Tensor) else v for _, v in args])


def use_host_kernels(
    kernels: HostKernels, patcher: _Patcher, modules: Iterable[str] = EMULATED_KERNELS
) -> None:
    """Send the ops of ``modules`` (names in :data:`EMULATED_KERNELS`) through their kernels
    on CPU tensors, by setting attributes with ``patcher.setattr`` (pytest's ``monkeypatch``
    undoes them after the test)."""
    import recis_kernels._cuda as cuda_pkg

    patcher.setattr(cuda_pkg, "launch", kernels.launch)
    for module in modules:
        if module not in EMULATED_KERNELS:
            raise ArgumentError(f"use_host_kernels: {module!r} is not in {EMULATED_KERNELS}")
        mod = importlib.import_module(f"recis_kernels.ops.{module}")
        patcher.setattr(mod, "use_cuda_kernels", lambda device: True)
