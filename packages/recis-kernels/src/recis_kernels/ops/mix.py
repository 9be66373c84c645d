"""Integer id mixing: ``mix64``, ``multi_hash`` and ``hashed_uniform``.

``mix64`` is MurmurHash3's 64-bit finalizer ``fmix64``, a bijection on 64-bit patterns::

    k ^= k >> 33; k *= 0xff51afd7ed558ccd; k ^= k >> 33; k *= 0xc4ceb9fe1a85ec53; k ^= k >> 33

``multi_hash`` derives K independent hashes by offsetting the id with multiples of the golden
ratio constant before mixing: ``h_k = fmix64(id + (k + 1) * 0x9e3779b97f4a7c15)`` (wrapping), then
``h_k % buckets[k]`` (unsigned) for ``buckets[k] > 0``.

``hashed_uniform`` draws counter-based uniforms: column ``j`` of id ``x`` under seed ``s`` is
``(t + 0.5) / 2**53`` where ``t`` is the top 53 bits of
``fmix64(fmix64(x ^ s) + (j + 1) * 0x9e3779b97f4a7c15)`` (wrapping), a float64 in (0, 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import List  # noqa: UP035  (torch 2.6 infers schemas from typing.List only)

import torch

from recis_kernels import _native
from recis_kernels._backend import on_host, run_op, use_cuda_kernels
from recis_kernels._checks import (
    check_1d,
    check_dtype,
    check_same_device,
    check_tensor,
    grid_for,
    is_int,
)
from recis_kernels.exceptions import ArgumentError, UnsupportedDtypeError
from recis_kernels.ops._uint64 import const, shr, umod

__all__ = ["hashed_uniform", "mix64", "multi_hash"]

_C1 = const(0xFF51AFD7ED558CCD)
_C2 = const(0xC4CEB9FE1A85EC53)
_GOLDEN = 0x9E3779B97F4A7C15
_INT64_MAX = (1 << 63) - 1
_TWO_POW_53 = float(1 << 53)


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
        tensor([                   0, -5451962507482445012])
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


def hashed_uniform(ids: torch.Tensor, seeds: int | torch.Tensor, dim: int) -> torch.Tensor:
    """``(N, dim)`` float64 uniforms in (0, 1), each a pure function of its id, seed and column.

    ``out[i, j] = (t + 0.5) / 2**53``, ``t`` the top 53 bits of
    ``fmix64(fmix64(ids[i] ^ seed_i) + (j + 1) * 0x9e3779b97f4a7c15)`` (64-bit wrapping
    arithmetic). The value never depends on the other ids of the call or on the device: the
    embedding initializers draw their rows from it, so an id gets the same row whatever the
    batch. One compiled pass on the CPU, one kernel launch on CUDA.

    Args:
        ids: ``(N,)`` int64 ids.
        seeds: one seed for every id, an int (any size: taken modulo 2**64), or a ``(N,)``
            int64 tensor of per-id seeds on the ids' device.
        dim: columns per id, ``>= 0``.

    Returns:
        ``(N, dim)`` float64 tensor on the ids' device.

    Example:
        >>> hashed_uniform(torch.tensor([7, 7, 8]), 0, 2)[:, 0].tolist()[:2]  # same id, same row
        [0.06431427050769228, 0.06431427050769228]
    """
    op = "hashed_uniform"
    if not (type(ids) is torch.Tensor and ids.dtype == torch.int64 and ids.dim() == 1):
        check_tensor(op, "ids", ids)
        check_dtype(op, "ids", ids, (torch.int64,))
        check_1d(op, "ids", ids)
    if not is_int(dim) or dim < 0:
        raise ArgumentError(f"{op}: dim must be an int >= 0, got {dim!r}")
    dim = int(dim)
    if is_int(seeds):
        seed = torch.tensor([const(int(seeds))], dtype=torch.int64, device=ids.device)
    else:
        if not isinstance(seeds, torch.Tensor):
            raise UnsupportedDtypeError(
                f"{op}: seeds must be an int or an int64 tensor of one seed per id, got "
                f"{type(seeds).__name__}"
            )
        seed = seeds
        check_dtype(op, "seeds", seed, (torch.int64,))
        if seed.shape != ids.shape:
            raise ArgumentError(
                f"{op}: seeds must be an int or one int64 seed per id, shape {tuple(ids.shape)}; "
                f"got shape {tuple(seed.shape)}"
            )
        check_same_device(op, {"ids": ids, "seeds": seed})
    if on_host((ids, seed)) and not use_cuda_kernels(ids.device):
        return _hashed_uniform_host(ids.contiguous(), seed.contiguous(), dim)
    return run_op(_hashed_uniform_op, _hashed_uniform_impl, ids, seed, dim)


def _hashed_uniform_host(ids: torch.Tensor, seeds: torch.Tensor, dim: int) -> torch.Tensor:
    out = torch.empty(ids.numel(), dim, dtype=torch.float64)
    _native.hashed_uniform(
        ids.data_ptr(),
        ids.numel(),
        seeds.data_ptr(),
        seeds.numel(),
        dim,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


def _hashed_uniform_torch(ids: torch.Tensor, seeds: torch.Tensor, dim: int) -> torch.Tensor:
    # seeds: (1,) broadcasts over the ids, or (N,).
    base = _fmix64(ids ^ seeds)
    cols = torch.arange(1, dim + 1, dtype=torch.int64, device=ids.device) * const(_GOLDEN)
    top53 = shr(_fmix64(base[:, None] + cols[None, :]), 11)
    return (top53.to(torch.float64) + 0.5) / _TWO_POW_53


def _hashed_uniform_impl(ids: torch.Tensor, seeds: torch.Tensor, dim: int) -> torch.Tensor:
    ids, seeds = ids.contiguous(), seeds.contiguous()
    if not use_cuda_kernels(ids.device):
        return _hashed_uniform_torch(ids, seeds, dim)
    from recis_kernels._cuda import launch

    n = ids.numel()
    out = torch.empty((n, dim), dtype=torch.float64, device=ids.device)
    if n * dim:
        args = [("ptr", ids), ("i64", n), ("ptr", seeds), ("i64", 1 if seeds.numel() == n else 0),
                ("i64", dim), ("ptr", out)]  # fmt: skip
        launch("mix", "hashed_uniform", grid_for(n * dim), 256, args, device=ids.device)
    return out


_hashed_uniform_op = torch.library.custom_op("recis::hashed_uniform", mutates_args=())(
    _hashed_uniform_impl
)


@_hashed_uniform_op.register_fake
def _(ids, seeds, dim):
    return ids.new_empty((ids.shape[0], dim), dtype=torch.float64)


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
