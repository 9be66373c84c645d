"""Argument checks shared by the ops; every message names the argument and the op."""

from __future__ import annotations

import numbers
from collections.abc import Collection, Mapping, Sequence
from typing import TypeGuard

import numpy as np
import torch

from recis_kernels.exceptions import (
    IndexOutOfRangeError,
    ShapeError,
    UnsupportedDeviceError,
    UnsupportedDtypeError,
)

__all__ = [
    "can_inspect",
    "check_1d",
    "check_device",
    "check_dtype",
    "check_index_range",
    "check_same_device",
    "check_tensor",
    "common_device",
    "flat_nonzero",
    "grid_for",
    "index_error",
    "is_int",
    "masked_rows",
    "resolve_device",
]


def can_inspect(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values on the host is cheap and allowed: a CPU tensor, outside
    ``torch.compile`` tracing (where reading values would break the graph). Checks of values use
    it, and so do the NumPy shortcuts of the torch implementations."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Positions (int64) of the ``True`` entries of a 1-D bool ``mask``, as
    ``mask.nonzero().squeeze(1)``; on the host through NumPy's ``flatnonzero``, which is 3-6x
    as fast as torch's on one thread (227k entries: 0.13 vs 0.81 ms)."""
    if can_inspect(mask):
        return torch.from_numpy(np.flatnonzero(mask.numpy()).astype(np.int64, copy=False))
    return mask.nonzero().squeeze(1)


def masked_rows(t: torch.Tensor, keep: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``t[keep]`` for a boolean ``keep``; on the host through NumPy where ``t`` allows it.

    NumPy's boolean indexing copies runs of kept rows at once: on masks that keep long runs
    (truncation, dropping a few repeats) it is several times as fast as torch's on the CPU, and
    on random masks about as fast as ``torch.masked_select``."""
    if can_inspect(t) and not t.requires_grad:
        mask = keep if isinstance(keep, np.ndarray) else keep.numpy() if can_inspect(keep) else None
        if mask is not None:
            try:
                return torch.from_numpy(t.numpy()[mask])
            except TypeError:  # bfloat16 and other dtypes NumPy lacks
                pass
    return t[torch.from_numpy(keep).to(t.device) if isinstance(keep, np.ndarray) else keep]


def index_error(
    op: str, name: str, pos: int, value: int, low: int, high: int
) -> IndexOutOfRangeError:
    """The error for ``name[pos] = value`` outside ``[low, high)``; the kernels' device-side
    checks report theirs with the same message."""
    if high <= low:  # nothing to index yet (a row store before its first reserve)
        return IndexOutOfRangeError(
            f"{op}: {name}[{pos}] = {value} is out of range: there is nothing to index (size "
            f"{max(high - low, 0)})"
        )
    return IndexOutOfRangeError(
        f"{op}: {name}[{pos}] = {value} is out of range, expected a value in [{low}, {high - 1}]"
    )


def check_index_range(
    op: str,
    name: str,
    index: torch.Tensor,
    low: int,
    high: int,
    bounds: tuple[int, int] | None = None,
) -> None:
    """Raise :func:`index_error` for the first entry of int64 ``index`` outside ``[low, high)``.

    Two reductions of host ``index`` when every entry is in range; a device ``index`` needs
    ``bounds``, its least and greatest entries, read by the caller where it synchronizes anyway
    (the search for the bad position runs only when they leave the range).
    """
    if not index.numel():
        return
    if bounds is None:
        values = index.numpy()
        bounds = int(values.min()), int(values.max())
    if bounds[0] >= low and bounds[1] < high:
        return
    pos = int(flat_nonzero((index < low) | (index >= high))[0])
    raise index_error(op, name, pos, int(index[pos]), low, high)


def is_int(value: object) -> TypeGuard[int]:
    """Whether ``value`` is an integer parameter: a Python int or a NumPy integer scalar
    (what NumPy reductions and array items give), never a bool."""
    if type(value) is int:  # the common case, without the abstract-class check
        return True
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_tensor(op: str, name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise UnsupportedDtypeError(
            f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}"
        )
    return value


def check_dtype(op: str, name: str, tensor: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if tensor.dtype not in allowed:
        # dict.fromkeys: each dtype named once ("float32, float32" when the rows are float32).
        names = ", ".join(str(d).removeprefix("torch.") for d in dict.fromkeys(allowed))
        raise UnsupportedDtypeError(
            f"{op}: {name} has dtype {str(tensor.dtype).removeprefix('torch.')}, expected {names}"
        )


def check_1d(op: str, name: str, tensor: torch.Tensor) -> None:
    if tensor.dim() != 1:
        raise ShapeError(f"{op}: {name} must be 1-d, got shape {tuple(tensor.shape)}")


def common_device(
    tensors: Sequence[object], dtypes: Collection[torch.dtype]
) -> torch.device | None:
    """The one device of ``tensors`` when every one is a tensor of one of ``dtypes``, else
    ``None``. A fused op checks its K inputs with this in one pass, and runs its per-input
    checks (which build the error message naming the input) only when it says ``None``."""
    device = None
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.dtype not in dtypes:
            return None
        if device is None:
            device = t.device
        elif t.device != device:
            return None
    return device


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``device`` (default CPU) with its index: ``"cuda"`` is the current CUDA device, the
    device that every tensor made on ``"cuda"`` reports. A structure that keeps its device
    compares it with its inputs' devices, and ``torch.device("cuda") != torch.device("cuda", 0)``.
    """
    where = torch.device(device) if device is not None else torch.device("cpu")
    if where.type == "cuda" and where.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return where


def check_device(op: str, name: str, tensor: torch.Tensor, device: torch.device) -> None:
    """Raise :class:`UnsupportedDeviceError` unless ``tensor`` lives on ``device``.

    The CUDA kernels dereference the addresses they are given: a tensor of another device
    reaching one (host memory, say) would fault and leave the CUDA context unusable, where the
    torch implementation raises. Checked before any launch."""
    if tensor.device != device:
        raise UnsupportedDeviceError(f"{op}: {name} is on {tensor.device}, expected {device}")


def check_same_device(op: str, tensors: Mapping[str, torch.Tensor | None]) -> torch.device:
    present = {k: t for k, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {t.device}" for k, t in present.items())
        raise UnsupportedDeviceError(f"{op}: tensors must share one device, got {where}")
    return next(iter(devices)) if devices else torch.device("cpu")


def check_parts(op: str, name: str, sizes: Sequence[int], total: int, of: str) -> None:
    """Refuses part sizes (``sizes``, the lengths of consecutive parts of a packed tensor
    ``of``) that are negative or do not add up to its ``total`` elements: the kernels walk the
    parts by these sizes. The public wrappers build them right; a direct call of the
    registered op (``torch.ops.recis.*``) may not."""
    if any(s < 0 for s in sizes) or sum(sizes) != total:
        raise ShapeError(
            f"{op}: {name} must be non-negative part sizes adding up to the {total} elements of "
            f"{of}, got {list(sizes)}"
        )


def grid_for(n: int, block: int = 256, cap: int = 65535 * 8) -> int:
    """Grid size of a grid-stride loop over ``n`` elements."""
    return max(0, min((n + block - 1) // block, cap))
