"""Integer id mixing: ``mix64`` and ``multi_hash``.

``mix64`` is MurmurHash3's 64-bit finalizer ``fmix64``, a bijection on 64-bit patterns::

    k ^= k >> 33; k *= 0xff51afd7ed558ccd; k ^= k >> 33; k *= 0xc4ceb9fe1a85ec53; k ^= k >> 33

``multi_hash`` derives K independent hashes by offsetting the id with multiples of the golden
ratio constant before mixing: ``h_k = fmix64(id + (k + 1) * 0x9e3779b97f4a7c15)`` (wrapping), then
``h_k % buckets[k]`` (unsigned) for ``buckets[k] > 0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import List  # noqa: UP035  (torch 2.6 infers schemas from typing.List only)

import torch

from recis_kernels._backend import run_op, use_cuda_kernels
from recis_kernels._checks import check_dtype, check_tensor, grid_for, is_int
from recis_kernels.exceptions import ArgumentError
from recis_kernels.ops._uint64 import const, shr, umod

__all__ = ["mix64", "multi_hash"]

_C1 = const(0xFF51AFD7ED558CCD)
_C2 = const(0xC4CEB9FE1A85EC53)
_GOLDEN = 0x9E3779B97F4A7C15
_INT64_MAX = (1 << 63) - 1


def _fmix64(k: torch.Tensor) -> torch.Tensor:
    k = k ^ shr(k, 33)
    k = k * _C1
    k = k ^ shr(k, 33)
    k = k * _C2
    return k ^ shr(k, 33)


def mix64(ids: torch.Tensor) -> torch.Tensor:
    """MurmurHash3 ``fmix64`` of each id (a bijection, so distinct ids stay distinct).

    Args:
        ids: int64 tensor of any shape.

    Returns:
        int64 tensor shaped like ``ids``.

    Example:
        >>> mix64(torch.tensor([0, 1]))
        tensor([0, -5451962507482445012])
    """
    check_tensor("mix64", "ids", ids)
    check_dtype("mix64", "ids", ids, (torch.int64,))
    return run_op(_mix64_op, _mix64_impl, ids.reshape(-1)).view(ids.shape)


def multi_hash(ids: torch.Tensor, buckets: Sequence[int]) -> torch.Tensor:
    """K independent hashes of each id, hash ``k`` reduced modulo ``buckets[k]``.

    Args:
        ids: int64 tensor of shape ``S`` (usually ``(N,)``).
        buckets: K bucket counts in ``[0, 2**63 - 1]``; 0 keeps the full 64-bit hash.

    Returns:
        int64 tensor of shape ``(*S, K)``.
    """
    op = "multi_hash"
    check_tensor(op, "ids", ids)
    check_dtype(op, "ids", ids, (torch.int64,))
    buckets = list(buckets)
    if not buckets:
        raise ArgumentError(f"{op}: buckets must name at least one hash, got an empty sequence")
    for k, b in enumerate(buckets):
        if not is_int(b) or not 0 <= b <= _INT64_MAX:
            raise ArgumentError(f"{op}: buckets[{k}] must be an int in [0, 2**63 - 1], got {b!r}")
        buckets[k] = int(b)
    out = run_op(_multi_hash_op, _multi_hash_impl, ids.reshape(-1), buckets)
    return out.view(*ids.shape, len(buckets))


def _mix64_cpu(ids):
    return _fmix64(ids)


def _multi_hash_cpu(ids, buckets):
    seeds = torch.tensor([const((k + 1) * _GOLDEN) for k in range(len(buckets))], device=ids.device)
    h = _fmix64(ids[:, None] + seeds)
    b = torch.tensor(buckets, dtype=torch.int64, device=ids.device)
    c = torch.tensor([(1 << 64) % v if v else 0 for v in buckets], device=ids.device)
    reduced = umod(h, b.clamp(min=1), c)
    return torch.where(b > 0, reduced, h)


def _mix64_impl(ids: torch.Tensor) -> torch.Tensor:
    ids = ids.contiguous()
    if not use_cuda_kernels(ids.device):
        return _mix64_cpu(ids)
    from recis_kernels._cuda import launch

    out = torch.empty_like(ids)
    n = ids.numel()
    launch(
        "mix",
        "mix64",
        grid_for(n),
        256,
        [("ptr", ids), ("i64", n), ("ptr", out)],
        device=ids.device,
    )
    return out


_mix64_op = torch.library.custom_op("recis::mix64", mutates_args=())(_mix64_impl)


@_mix64_op.register_fake
def _(ids):
    return torch.empty_like(ids)


def _multi_hash_impl(ids: torch.Tensor, buckets: List[int]) -> torch.Tensor:  # noqa: UP006
    ids = ids.contiguous()
    if not use_cuda_kernels(ids.device):
        return _multi_hash_cpu(ids, buckets)
    from recis_kernels._cuda import launch

    k = len(buckets)
    out = torch.empty((ids.numel(), k), dtype=torch.int64, device=ids.device)
    b = torch.tensor(buckets, dtype=torch.int64, device=ids.device)
    n = ids.numel()
    args = [("ptr", ids), ("i64", n), ("ptr", b), ("i64", k), ("ptr", out)]
    launch("mix", "multi_hash", grid_for(n * k), 256, args, device=ids.device)
    return out


_multi_hash_op = torch.library.custom_op("recis::multi_hash", mutates_args=())(_multi_hash_impl)


@_multi_hash_op.register_fake
def _(ids, buckets):
    return ids.new_empty((ids.shape[0], len(buckets)))
