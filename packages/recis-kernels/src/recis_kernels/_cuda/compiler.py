"""NVRTC compilation of the ``.cu`` sources shipped in ``recis_kernels/cuda``.

A compiled cubin is cached in memory and on disk under a key made of the arch, a hash of the
source (the ``.cu`` file and every shared ``.cuh`` header), the compiler options and the NVRTC
version, so editing a kernel or upgrading NVRTC never reuses a stale binary.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from recis_kernels.exceptions import ArgumentError, CudaUnavailableError, KernelCompileError

__all__ = ["CompiledKernel", "cache_dir", "compile_all", "compile_kernel", "kernel_names"]

_BASE_OPTIONS: tuple[str, ...] = ("-std=c++17", "--device-as-default-execution-space")
_ARCH_RE = re.compile(r"^sm_\d{2,3}[a-z]?$")
_memory_cache: dict[str, CompiledKernel] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class CompiledKernel:
    """A compiled ``.cu`` file.

    Attributes:
        name: file stem of the source (``cuda/<name>.cu``).
        arch: target architecture, e.g. ``"sm_90"``.
        cubin: the compiled device binary.
        key: cache key (hex digest of arch, source, options and NVRTC version).
        log: NVRTC's log (warnings), possibly empty.
    """

    name: str
    arch: str
    cubin: bytes
    key: str
    log: str


def _source_dir() -> Path:
    return Path(str(resources.files("recis_kernels") / "cuda"))


def kernel_names() -> list[str]:
    """Names (file stems) of every ``.cu`` source shipped with the package, sorted."""
    return sorted(p.stem for p in _source_dir().glob("*.cu"))


def cache_dir() -> Path:
    """Directory of the on-disk cubin cache.

    ``RECIS_KERNELS_CACHE_DIR`` when set, otherwise ``$XDG_CACHE_HOME/recis-kernels`` (falling
    back to ``~/.cache/recis-kernels``).
    """
    explicit = os.environ.get("RECIS_KERNELS_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "recis-kernels"


def cuda_bindings(module: str) -> Any:
    """``cuda.bindings.<module>`` (``nvrtc``, ``driver``), or the error naming the extra."""
    try:
        # The import statement machinery (not importlib) so import hooks see the request.
        return __import__(f"cuda.bindings.{module}", fromlist=[module])
    except ImportError as exc:
        raise CudaUnavailableError(
            "the cuda backend needs cuda-python; install the extra with "
            "`pip install recis-kernels[cuda]`"
        ) from exc


def _check(nvrtc, result, what: str) -> None:
    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, msg = nvrtc.nvrtcGetErrorString(result)
        raise KernelCompileError(f"nvrtc {what} failed: {msg.decode()}")


def _headers() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(_source_dir().glob("*.cuh"))}


def _cache_key(name: str, arch: str, source: bytes, headers: dict[str, bytes], opts, version):
    digest = hashlib.sha256()
    for part in (name, arch, repr(tuple(opts)), repr(version)):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(source)
    for hname, hsrc in headers.items():
        digest.update(hname.encode())
        digest.update(hsrc)
    return digest.hexdigest()[:32]


def compile_kernel(name: str, arch: str = "sm_90", options: tuple[str, ...] = ()) -> CompiledKernel:
    """Compile ``cuda/<name>.cu`` for ``arch`` with NVRTC; no GPU is needed.

    Results are cached in memory and on disk (see :func:`cache_dir`).

    Args:
        name: file stem of a source listed by :func:`kernel_names`.
        arch: target architecture such as ``"sm_80"`` or ``"sm_90"``.
        options: extra NVRTC options.

    Returns:
        The compiled kernel.

    Raises:
        ArgumentError: unknown kernel name or malformed arch.
        CudaUnavailableError: cuda-python is not installed.
        KernelCompileError: NVRTC rejected the source; the message carries the full log.
    """
    if not _ARCH_RE.match(arch):
        raise ArgumentError(f"arch must look like 'sm_90', got {arch!r}")
    path = _source_dir() / f"{name}.cu"
    if not path.is_file():
        raise ArgumentError(f"no kernel source named {name!r}; known: {kernel_names()}")
    nvrtc = cuda_bindings("nvrtc")
    source = path.read_bytes()
    headers = _headers()
    opts = (*_BASE_OPTIONS, f"--gpu-architecture={arch}", *options)
    _, major, minor = nvrtc.nvrtcVersion()
    key = _cache_key(name, arch, source, headers, opts, (major, minor))
    with _lock:
        hit = _memory_cache.get(key)
    if hit is not None:
        return hit
    compiled = _load_from_disk(name, arch, key)
    if compiled is None:
        compiled = _run_nvrtc(nvrtc, name, arch, source, headers, opts, key)
        _store_on_disk(compiled)
    with _lock:
        _memory_cache[key] = compiled
    return compiled


def compile_all(arch: str = "sm_90") -> dict[str, CompiledKernel]:
    """Compile every shipped ``.cu`` for ``arch``; the first failure raises.

    Args:
        arch: target architecture such as ``"sm_80"``.

    Returns:
        Mapping from kernel name to compiled kernel.
    """
    return {name: compile_kernel(name, arch) for name in kernel_names()}


def _run_nvrtc(nvrtc, name, arch, source, headers, opts, key) -> CompiledKernel:
    err, prog = nvrtc.nvrtcCreateProgram(
        source, f"{name}.cu".encode(), len(headers), list(headers.values()),
        [h.encode() for h in headers],
    )  # fmt: skip
    _check(nvrtc, err, f"program creation for {name!r}")
    try:
        (result,) = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
        log = _program_log(nvrtc, prog)
        if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise KernelCompileError(
                f"nvrtc failed to compile kernel {name!r} for {arch} "
                f"(options {' '.join(opts)}):\n{log}"
            )
        err, size = nvrtc.nvrtcGetCUBINSize(prog)
        _check(nvrtc, err, f"cubin size query for {name!r}")
        # A fresh mutable buffer: NVRTC writes into it (never into a shared bytes object).
        buf = bytearray(size)
        (err,) = nvrtc.nvrtcGetCUBIN(prog, buf)
        _check(nvrtc, err, f"cubin retrieval for {name!r}")
        cubin = bytes(buf)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return CompiledKernel(name=name, arch=arch, cubin=cubin, key=key, log=log)


def _program_log(nvrtc, prog) -> str:
    err, size = nvrtc.nvrtcGetProgramLogSize(prog)
    _check(nvrtc, err, "log size query")
    buf = bytearray(size)
    (err,) = nvrtc.nvrtcGetProgramLog(prog, buf)
    _check(nvrtc, err, "log retrieval")
    return bytes(buf).rstrip(b"\0").decode(errors="replace")


def _disk_path(name: str, arch: str, key: str) -> Path:
    return cache_dir() / f"{name}-{arch}-{key}.cubin"


def _load_from_disk(name: str, arch: str, key: str) -> CompiledKernel | None:
    path = _disk_path(name, arch, key)
    try:
        cubin = path.read_bytes()
    except OSError:
        return None
    if not cubin:
        return None
    return CompiledKernel(name=name, arch=arch, cubin=cubin, key=key, log="")


def _store_on_disk(compiled: CompiledKernel) -> None:
    path = _disk_path(compiled.name, compiled.arch, compiled.key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename so a concurrent reader never sees a truncated cubin.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".cubin")
        with os.fdopen(fd, "wb") as fh:
            fh.write(compiled.cubin)
        os.replace(tmp, path)
    except OSError:
        # A read-only or full cache directory only costs a recompile next time.
        return
