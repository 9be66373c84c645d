"""Device-side range checks of index inputs: the error buffer the kernels report into.

On CUDA the ops do not read index inputs (rows, offsets) on the host before a launch, since that
would synchronize every call. Each kernel instead checks, where it uses an input value to
address memory, that the value lies in its range; a bad value is never dereferenced, and the
first one is recorded in a small per-device buffer (``RECIS_ERR_WORDS`` int64 in
``cuda/recis_common.cuh``: claimed, site, argument, position, value, low, high). Python reads
the buffer where an op synchronizes anyway (:func:`host_ints`), when kernels ran on the host
(:func:`after_launch`), and in :func:`check_index_errors`, and raises
:class:`~recis_kernels.IndexOutOfRangeError` naming the op, argument, position and value.

This rather than a device-side trap or assert (torch's way): a trap leaves the CUDA context
unusable for the rest of the process, in unrelated code too, and reports only "device-side
assert triggered"; the buffer keeps the context working, says what was wrong, costs the kernels
one compare per checked value on the fast path, and adds no synchronization (the read rides on
one the op already does). The price: a bad index is reported at the next such read rather than
at the faulty call, like any asynchronous CUDA error, and the outputs of that launch hold zeros
where the bad index was.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from recis_kernels._checks import index_error

__all__ = ["after_launch", "check_index_errors", "error_args", "host_int", "host_ints"]

# Words of the error buffer; RECIS_ERR_WORDS in cuda/recis_common.cuh.
ERR_WORDS = 8
_sites: list[tuple[str, tuple[str, ...]]] = []
_site_ids: dict[tuple[str, tuple[str, ...]], int] = {}
_buffers: dict[torch.device, torch.Tensor] = {}
_lock = threading.Lock()


def _key(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def error_buffer(device: torch.device) -> torch.Tensor:
    """The zero-initialized error buffer of ``device`` (created on first use)."""
    key = _key(device)
    buf = _buffers.get(key)
    if buf is None:
        with _lock:
            buf = _buffers.get(key)
            if buf is None:
                buf = torch.zeros(ERR_WORDS, dtype=torch.int64, device=key)
                _buffers[key] = buf
    return buf


def site_id(op: str, args: Sequence[str]) -> int:
    """Id of the launch site of ``op`` whose kernel checks ``args`` (by argument number)."""
    key = (op, tuple(args))
    sid = _site_ids.get(key)
    if sid is None:
        with _lock:
            sid = _site_ids.get(key)
            if sid is None:
                sid = len(_sites)
                _sites.append(key)
                _site_ids[key] = sid
    return sid


def error_args(device: torch.device, op: str, args: Sequence[str]) -> list[tuple[str, object]]:
    """The ``(err, err_site)`` launch arguments every checked kernel takes last.

    Args:
        device: device of the launch.
        op: public name of the op, as the error message shows it.
        args: names of the arguments the kernel checks, in the kernel's argument numbering.
    """
    return [("ptr", error_buffer(device)), ("i64", site_id(op, args))]


def _raise_recorded(words: list[int], buf: torch.Tensor) -> None:
    if not words[0]:
        return
    buf.zero_()
    _, site, arg, pos, value, low, high = words[:7]
    op, names = _sites[site] if 0 <= site < len(_sites) else ("unknown op", ())
    name = names[arg] if 0 <= arg < len(names) else f"argument {arg}"
    raise index_error(op, name, pos, value, low, high)


def check_index_errors(device: torch.device | str | None = None) -> None:
    """Raise the first out-of-range index a kernel met on ``device`` since the last check.

    Kernels skip a bad index and record it; the ops raise it where they synchronize anyway. Call
    this where a program synchronizes (once per training step, say) to catch what was recorded
    since. It copies a few bytes from each device and so waits for the work queued there.

    Args:
        device: the device to check; ``None`` checks every device a kernel was launched on.

    Raises:
        IndexOutOfRangeError: naming the op, the argument, the position and the value; the
            record is cleared, so the next check reports only later errors.
    """
    if device is None:
        targets = list(_buffers.values())
    else:
        buf = _buffers.get(_key(torch.device(device)))
        targets = [] if buf is None else [buf]
    for buf in targets:
        _raise_recorded(buf.tolist(), buf)


def after_launch(device: torch.device) -> None:
    """Check right after a launch when that costs no synchronization: kernels run on the host
    (CPU tensors) have already finished. On a GPU the check waits for the next read."""
    if device.type == "cpu":
        buf = _buffers.get(device)
        if buf is not None:
            _raise_recorded(buf.tolist(), buf)


def host_ints(values: torch.Tensor) -> list[int]:
    """``values.tolist()`` of a small 1-d integer device tensor, with the pending index errors
    of its device read by the same transfer (so the check adds no synchronization).

    Raises:
        IndexOutOfRangeError: a kernel on that device recorded a bad index.
    """
    buf = _buffers.get(_key(values.device))
    if buf is None or values.device.type == "cpu":
        after_launch(values.device)
        return [int(v) for v in values.tolist()]
    n = values.numel()
    words = torch.cat((values.to(torch.int64), buf)).tolist()
    _raise_recorded(words[n:], buf)
    return words[:n]


def host_int(value: torch.Tensor) -> int:
    """``int(value)`` of a one-element device tensor, like :func:`host_ints`."""
    return host_ints(value.reshape(1))[0]
