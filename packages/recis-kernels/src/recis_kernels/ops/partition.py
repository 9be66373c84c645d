"""Grouping distinct ids by the rank that owns them (row-wise sharding)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from recis_kernels._backend import run_op
from recis_kernels._checks import check_1d, check_dtype, check_tensor
from recis_kernels.exceptions import ShapeError
from recis_kernels.ops._uint64 import umod_const
from recis_kernels.ops.hash_table import fmix64

__all__ = ["PartitionResult", "owner_rank", "partition_ids"]

_INT64_MAX = (1 << 63) - 1


class PartitionResult(NamedTuple):
    """Output of :func:`partition_ids`.

    Attributes:
        ids: ``(U,) int64`` distinct ids grouped by owner rank (rank 0 first), ascending inside
            each group.
        counts: ``(world_size,) int64`` number of ids each rank owns.
        inverse: ``(N,) int64`` position of each input id in ``ids``.
    """

    ids: torch.Tensor
    counts: torch.Tensor
    inverse: torch.Tensor


def owner_rank(ids: torch.Tensor, world_size: int) -> torch.Tensor:
    """Rank owning each id: ``fmix64(id)`` (MurmurHash3 finalizer) as unsigned 64-bit, mod world size.

    Branch-free (no host synchronization on CUDA, one graph under ``torch.compile``).

    Args:
        ids: int64 tensor of any shape.
        world_size: number of ranks, an int in ``[1, 2**63 - 1]``.

    Returns:
        int64 ranks in ``[0, world_size)``, shaped like ``ids``.

    Raises:
        UnsupportedDtypeError: ``ids`` is not an int64 tensor (the rank of an id must not
            depend on the dtype it arrives in).
        ShapeError: ``world_size`` is not an int in ``[1, 2**63 - 1]``.
    """
    check_tensor("owner_rank", "ids", ids)
    check_dtype("owner_rank", "ids", ids, (torch.int64,))
    world_size = _check_world_size("owner_rank", world_size)
    # Unsigned remainder from the signed bits: (2**64 + h) % w for negative h.
    return umod_const(fmix64(ids), world_size)


#: partition_ids' largest world size: its counts tensor holds one entry per rank.
_MAX_PARTITIONS = 1 << 24


def _check_world_size(op: str, world_size: object) -> int:
    if isinstance(world_size, bool) or not isinstance(world_size, (int, np.integer)):
        raise ShapeError(f"{op}: world_size must be an int >= 1, got {world_size!r}")
    if int(world_size) < 1:
        raise ShapeError(f"{op}: world_size must be >= 1, got {world_size}")
    if int(world_size) > _INT64_MAX:
        # The unsigned remainder works on int64 moduli: 2**63 gave wrong ranks, larger
        # values an OverflowError from torch.
        raise ShapeError(f"{op}: world_size must be <= 2**63 - 1, got {world_size}")
    return int(world_size)


def _partition_impl(
    ids: torch.Tensor, world_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _partition_ids_cpu(ids, world_size)


_partition_op = torch.library.custom_op("recis::partition_ids", mutates_args=())(_partition_impl)


@_partition_op.register_fake
def _partition_fake(
    ids: torch.Tensor, world_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = torch.library.get_ctx().new_dynamic_size()
    return ids.new_empty(n), ids.new_empty(world_size), torch.empty_like(ids)


def _partition_ids_cpu(
    ids: torch.Tensor, world_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    rank = owner_rank(u, world_size)
    # A stable sort by rank keeps ids ascending inside each rank's group.
    _, order = torch.sort(rank, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=ids.device)
    counts = torch.bincount(rank, minlength=world_size)
    return u[order], counts, position[inverse]


def partition_ids(ids: torch.Tensor, world_size: int) -> PartitionResult:
    """Deduplicate ids and group them by owner rank for an all-to-all exchange.

    The owner of an id is :func:`owner_rank`: the MurmurHash3 64-bit finalizer of the id's bits,
    read as an unsigned integer, modulo ``world_size``.

    Args:
        ids: ``(N,) int64`` ids, duplicates allowed.
        world_size: number of ranks, in ``[1, 2**24]``.

    Returns:
        ``PartitionResult(ids (U,), counts (world_size,), inverse (N,))``: rank ``r`` owns
        ``ids[sum(counts[:r]) : sum(counts[:r+1])]`` and ``result.ids[inverse] == ids``.

    Raises:
        UnsupportedDtypeError: ``ids`` is not int64.
        ShapeError: ``ids`` is not 1-d or ``world_size`` is outside ``[1, 2**24]``.
    """
    check_tensor("partition_ids", "ids", ids)
    check_dtype("partition_ids", "ids", ids, (torch.int64,))
    check_1d("partition_ids", "ids", ids)
    world_size = _check_world_size("partition_ids", world_size)
    if world_size > _MAX_PARTITIONS:
        # counts holds one entry per rank.
        raise ShapeError(
            f"partition_ids: world_size must be <= 2**24 (counts has one entry per rank), "
            f"got {world_size}"
        )
    return PartitionResult(*run_op(_partition_op, _partition_impl, ids, world_size))
