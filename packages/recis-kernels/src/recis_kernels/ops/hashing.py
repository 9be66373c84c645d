"""String hashing: FarmHash Fingerprint64 and MurmurHash64A (seed 0) of ragged byte strings.

Strings are given as one byte buffer and offsets (the Arrow string layout)::

    strings = ["ab", "", "xyz"]
    data    = b"abxyz"               (uint8, N = 5)
    offsets = [0, 2, 2, 5]           (int64, S + 1)

Both hashes are bit-exact with the reference C++ implementations (``util::Fingerprint64`` of
FarmHash, Austin Appleby's ``MurmurHash64A`` with seed 0); the unsigned 64-bit result is returned
as the int64 with the same bits. ``buckets > 0`` reduces it to the unsigned remainder.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from recis_kernels._backend import run_op, use_cuda_kernels
from recis_kernels._checks import (
    can_inspect,
    check_1d,
    check_dtype,
    check_index_range,
    check_same_device,
    check_tensor,
    grid_for,
    index_error,
    is_int,
)
from recis_kernels.exceptions import ArgumentError, RaggedError, UnsupportedDtypeError
from recis_kernels.ops import _farm_host
from recis_kernels.ops._farm import farm_fingerprint64, murmur64a
from recis_kernels.ops._uint64 import umod_const

__all__ = ["hash_bytes", "hash_strings"]

_ALGORITHMS = {"farm": 0, "murmur": 1}
_INT64_MAX = (1 << 63) - 1


def _check_args(op: str, algorithm: str, buckets: int) -> int:
    if not isinstance(algorithm, str) or algorithm not in _ALGORITHMS:
        raise ArgumentError(f"{op}: algorithm must be 'farm' or 'murmur', got {algorithm!r}")
    if not is_int(buckets) or not 0 <= buckets <= _INT64_MAX:
        raise ArgumentError(f"{op}: buckets must be an int in [0, 2**63 - 1], got {buckets!r}")
    return int(buckets)


def hash_bytes(
    data: torch.Tensor, offsets: torch.Tensor, algorithm: str = "farm", buckets: int = 0
) -> torch.Tensor:
    """Hash each byte string ``data[offsets[i]:offsets[i+1]]``.

    Args:
        data: ``(N,)`` uint8 bytes of all strings, back to back.
        offsets: ``(S+1,)`` int64 string boundaries, starting at 0, non-decreasing, ending at N.
        algorithm: ``"farm"`` (FarmHash Fingerprint64) or ``"murmur"`` (MurmurHash64A, seed 0).
        buckets: when > 0, return ``(uint64)hash % buckets``.

    Returns:
        ``(S,)`` int64 hashes.

    Raises:
        UnsupportedDtypeError: ``data`` is not uint8 or ``offsets`` not int64.
        ShapeError: an argument is not 1-d.
        ArgumentError: unknown algorithm or bad bucket count.
        RaggedError: offsets that do not start at 0 or end at ``len(data)``.

    Example:
        >>> hash_bytes(torch.tensor(list(b"alphabet"), dtype=torch.uint8), torch.tensor([0, 8]))
        tensor([-2427165924636348523])
    """
    op = "hash_bytes"
    check_tensor(op, "data", data)
    check_tensor(op, "offsets", offsets)
    check_dtype(op, "data", data, (torch.uint8,))
    check_dtype(op, "offsets", offsets, (torch.int64,))
    check_1d(op, "data", data)
    check_1d(op, "offsets", offsets)
    check_same_device(op, {"data": data, "offsets": offsets})
    buckets = _check_args(op, algorithm, buckets)
    if offsets.numel() == 0:
        raise RaggedError(f"{op}: offsets must hold at least one entry (S + 1 for S strings)")
    if can_inspect(offsets):
        _check_offsets(op, offsets, data.numel())
    return run_op(_hash_bytes_op, _hash_bytes_impl, data, offsets, algorithm, buckets)


def _check_offsets(op: str, offsets: torch.Tensor, n: int) -> None:
    # An offset outside [0, len(data)] or below the one before it would address bytes outside
    # data: named by position, as the CUDA kernel names it.
    check_index_range(op, "offsets", offsets, 0, n + 1)
    off = offsets.numpy()
    down = np.flatnonzero(off[1:] < off[:-1])
    if down.size:
        k = int(down[0]) + 1
        raise index_error(op, "offsets", k, int(off[k]), int(off[k - 1]), n + 1)
    if int(off[0]) != 0 or int(off[-1]) != n:
        raise RaggedError(
            f"{op}: offsets must start at 0, be non-decreasing and end at len(data) = {n}, got "
            f"first {int(offsets[0])}, last {int(offsets[-1])}"
        )


def hash_strings(strings: Any, algorithm: str = "farm", buckets: int = 0) -> torch.Tensor:
    """Hash Python strings, a numpy object/bytes array, or a pyarrow string/binary array.

    ``str`` values are hashed as UTF-8. Arrow nulls and ``None`` hash like the empty string.
    Arrow arrays are read through their buffers without per-string Python work.

    Args:
        strings: sequence of ``str``/``bytes``, numpy array, or pyarrow (chunked) array.
        algorithm: ``"farm"`` or ``"murmur"``.
        buckets: when > 0, return ``(uint64)hash % buckets``.

    Returns:
        ``(S,)`` int64 hashes on the CPU.
    """
    op = "hash_strings"
    buckets = _check_args(op, algorithm, buckets)
    data, offsets = _to_ragged_bytes(op, strings)
    return hash_bytes(data, offsets, algorithm, buckets)


# Packing Python strings is host-side work with nothing to trace: Dynamo runs it as it is
# (tracing its NumPy calls failed under torch 2.6's compile).
@torch.compiler.disable
def _to_ragged_bytes(op: str, strings: Any) -> tuple[torch.Tensor, torch.Tensor]:
    arrow = _from_arrow(strings)
    if arrow is not None:
        return arrow
    if isinstance(strings, (str, bytes)):
        raise UnsupportedDtypeError(
            f"{op}: expected a sequence of strings, got a single {type(strings).__name__}"
        )
    encoded = [_encode(op, s) for s in _iterate(strings)]
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return torch.from_numpy(data), torch.from_numpy(offsets)


def _iterate(strings: Any) -> Iterable[Any]:
    if isinstance(strings, np.ndarray):
        return strings.reshape(-1).tolist()
    return strings


def _encode(op: str, s: Any) -> bytes:
    if s is None:
        return b""
    if isinstance(s, str):
        return s.encode("utf-8")
    if isinstance(s, (bytes, bytearray, memoryview)):
        return bytes(s)
    raise UnsupportedDtypeError(f"{op}: strings must be str or bytes, got {type(s).__name__}")


def _from_arrow(strings: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        import pyarrow as pa
    except ImportError:
        return None
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks()
    if not isinstance(strings, pa.Array):
        return None
    t = strings.type
    # View layouts (pyarrow >= 16) have no offsets buffer; convert them to the offsets layout.
    if getattr(pa.types, "is_string_view", lambda _: False)(t):
        strings = strings.cast(pa.large_string())
    elif getattr(pa.types, "is_binary_view", lambda _: False)(t):
        strings = strings.cast(pa.large_binary())
    t = strings.type
    if pa.types.is_string(t) or pa.types.is_binary(t):
        offset_dtype = np.int32
    elif pa.types.is_large_string(t) or pa.types.is_large_binary(t):
        offset_dtype = np.int64
    else:
        raise UnsupportedDtypeError(
            f"hash_strings: arrow array must hold strings or binary, got {t}"
        )
    if strings.null_count:
        # Null slots may carry arbitrary bytes; replace them by empty strings first.
        strings = strings.fill_null(
            b"" if pa.types.is_binary(t) or pa.types.is_large_binary(t) else ""
        )
    _, off_buf, data_buf = strings.buffers()
    n = len(strings)
    raw = np.frombuffer(off_buf, dtype=offset_dtype)[strings.offset : strings.offset + n + 1]
    offsets = raw.astype(np.int64) - (int(raw[0]) if n + 1 else 0)
    start, stop = int(raw[0]), int(raw[-1])
    data = (
        np.frombuffer(data_buf, dtype=np.uint8)[start:stop]
        if data_buf is not None
        else np.zeros(0, np.uint8)
    )
    return torch.from_numpy(data.copy()), torch.from_numpy(offsets)


def _hash_bytes_cpu(data, offsets, algorithm, buckets):
    # The torch implementation; it also runs on CUDA tensors when the kernels are not used.
    if can_inspect(data):
        fn = _farm_host.farm_fingerprint64 if algorithm == "farm" else _farm_host.murmur64a
        h = torch.from_numpy(fn(data.numpy(), offsets.numpy()))
    else:
        h = (farm_fingerprint64 if algorithm == "farm" else murmur64a)(data, offsets)
    return umod_const(h, buckets) if buckets > 0 else h


def _hash_bytes_cuda(data, offsets, algorithm, buckets):
    from recis_kernels._cuda import index_errors, launch

    n = offsets.numel() - 1
    device = data.device
    out = torch.empty(n, dtype=torch.int64, device=device)
    num_bytes = data.numel()
    if num_bytes == 0:
        data = torch.zeros(1, dtype=torch.uint8, device=device)
    args = [("ptr", data), ("i64", num_bytes), ("ptr", offsets), ("i64", n),
            ("i32", _ALGORITHMS[algorithm]), ("i64", buckets), ("ptr", out),
            *index_errors.error_args(device, "hash_bytes", ("offsets",))]  # fmt: skip
    launch("hashing", "hash_bytes", grid_for(n), 256, args, device=device)
    index_errors.after_launch(device)
    return out


def _hash_bytes_impl(
    data: torch.Tensor, offsets: torch.Tensor, algorithm: str, buckets: int
) -> torch.Tensor:
    data, offsets = data.contiguous(), offsets.contiguous()
    if use_cuda_kernels(data.device):
        return _hash_bytes_cuda(data, offsets, algorithm, buckets)
    return _hash_bytes_cpu(data, offsets, algorithm, buckets)


_hash_bytes_op = torch.library.custom_op("recis::hash_bytes", mutates_args=())(_hash_bytes_impl)


@_hash_bytes_op.register_fake
def _(data, offsets, algorithm, buckets):
    return offsets.new_empty(offsets.shape[0] - 1)
