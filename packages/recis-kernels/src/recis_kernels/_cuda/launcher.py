"""Loading compiled kernels into the current CUDA context and launching them on torch's stream."""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Sequence
from typing import Any

import torch

from recis_kernels._cuda.compiler import compile_kernel, cuda_bindings
from recis_kernels.exceptions import KernelLaunchError

__all__ = ["launch"]

_functions: dict[tuple[int, str, str], Any] = {}
_modules: dict[tuple[int, str], Any] = {}
_contexts: dict[int, Any] = {}
_lock = threading.Lock()

# Scalar argument kinds accepted by :func:`launch`, mapped to their C types.
_CTYPES = {
    "ptr": ctypes.c_void_p,
    "i64": ctypes.c_int64,
    "i32": ctypes.c_int32,
    "u64": ctypes.c_uint64,
    "f32": ctypes.c_float,
    "f64": ctypes.c_double,
}


def _check(driver, result, what: str) -> None:
    if result != driver.CUresult.CUDA_SUCCESS:
        _, msg = driver.cuGetErrorString(result)
        text = msg.decode() if msg else str(result)
        raise KernelLaunchError(f"cuda driver call {what} failed: {text}")


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _make_current(driver, index: int) -> None:
    """Make the primary context of device ``index`` current on this thread.

    torch allocates in the primary context; modules must be loaded and launched in that same
    context, whichever device the calling thread last used.
    """
    ctx = _contexts.get(index)
    if ctx is None:
        # Idempotent; torch initialized the driver already when CUDA tensors exist, but the
        # driver API refuses every call of a process that did not call it.
        (err,) = driver.cuInit(0)
        _check(driver, err, "cuInit")
        err, dev = driver.cuDeviceGet(index)
        _check(driver, err, f"cuDeviceGet({index})")
        err, ctx = driver.cuDevicePrimaryCtxRetain(dev)
        _check(driver, err, f"cuDevicePrimaryCtxRetain({index})")
        _contexts[index] = ctx
    err, current = driver.cuCtxGetCurrent()
    _check(driver, err, "cuCtxGetCurrent")
    if int(current) != int(ctx):
        (err,) = driver.cuCtxSetCurrent(ctx)
        _check(driver, err, f"cuCtxSetCurrent(device {index})")


def _function(device: torch.device, module_name: str, kernel: str):
    index = device.index if device.index is not None else torch.cuda.current_device()
    fkey = (index, module_name, kernel)
    with _lock:
        fn = _functions.get(fkey)
    if fn is not None:
        return fn
    driver = cuda_bindings("driver")
    compiled = compile_kernel(module_name, _arch(torch.device("cuda", index)))
    with _lock:
        _make_current(driver, index)
        module = _modules.get((index, module_name))
        if module is None:
            err, module = driver.cuModuleLoadData(compiled.cubin)
            _check(driver, err, f"cuModuleLoadData({module_name!r}, {compiled.arch})")
            _modules[(index, module_name)] = module
        err, fn = driver.cuModuleGetFunction(module, kernel.encode())
        _check(driver, err, f"cuModuleGetFunction({module_name!r}, {kernel!r})")
        _functions[fkey] = fn
    return fn


def launch(
    module_name: str,
    kernel: str,
    grid: int | tuple[int, int, int],
    block: int | tuple[int, int, int],
    args: Sequence[tuple[str, object]],
    *,
    device: torch.device,
    shared_mem: int = 0,
) -> None:
    """Launch ``kernel`` from ``cuda/<module_name>.cu`` on torch's current stream of ``device``.

    Args:
        module_name: file stem of the ``.cu`` source.
        kernel: ``extern "C"`` name of the kernel.
        grid: grid size (x or (x, y, z)).
        block: block size (x or (x, y, z)).
        args: ``(kind, value)`` pairs in kernel parameter order; kind is one of ``ptr``
            (a tensor, whose ``data_ptr()`` is passed, or an int address), ``i64``, ``i32``,
            ``u64``, ``f32``, ``f64``.
        device: CUDA device the tensors live on.
        shared_mem: dynamic shared memory in bytes.

    Raises:
        CudaUnavailableError: cuda-python is missing.
        KernelCompileError: the source does not compile for the device's arch.
        KernelLaunchError: the driver refused to load or launch.
    """
    grid3 = (grid, 1, 1) if isinstance(grid, int) else grid
    block3 = (block, 1, 1) if isinstance(block, int) else block
    if grid3[0] == 0:
        return
    driver = cuda_bindings("driver")
    index = device.index if device.index is not None else torch.cuda.current_device()
    # Launching on another device than the current one happens under torch's device guard:
    # making that device's context current by hand would leave it current after the launch,
    # and torch (which takes its current device from the current context) would then put
    # every later "cuda" tensor of this thread on that device.
    guard = (
        torch.cuda.device(index)
        if index != torch.cuda.current_device()
        else contextlib.nullcontext()
    )
    with guard:
        _launch(driver, device, index, module_name, kernel, grid3, block3, args, shared_mem)


def _launch(driver, device, index, module_name, kernel, grid3, block3, args, shared_mem) -> None:
    fn = _function(device, module_name, kernel)
    _make_current(driver, index)
    values = []
    types = []
    for kind, value in args:
        if kind == "ptr" and isinstance(value, torch.Tensor):
            value = value.data_ptr()
        values.append(value)
        types.append(_CTYPES[kind])
    stream = torch.cuda.current_stream(index).cuda_stream
    (err,) = driver.cuLaunchKernel(
        fn, *grid3, *block3, shared_mem, driver.CUstream(stream), (tuple(values), tuple(types)), 0
    )
    _check(driver, err, f"cuLaunchKernel({module_name!r}, {kernel!r})")
