"""Deduplication of int64 ids: ``unique`` with inverse indices and counts."""

from __future__ import annotations

from typing import NamedTuple

import torch

from recis_kernels._backend import run_op
from recis_kernels._checks import check_1d, check_dtype, check_tensor

__all__ = ["UniqueResult", "unique"]


class UniqueResult(NamedTuple):
    """Output of :func:`unique`.

    Attributes:
        unique_ids: ``(U,) int64`` distinct ids in ascending (signed) order.
        inverse: ``(N,) int64`` position of each input id in ``unique_ids``.
        counts: ``(U,) int64`` occurrences of each distinct id.
    """

    unique_ids: torch.Tensor
    inverse: torch.Tensor
    counts: torch.Tensor


def _unique_impl(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _unique_cpu(ids)


_unique_op = torch.library.custom_op("recis::unique", mutates_args=())(_unique_impl)


@_unique_op.register_fake
def _unique_fake(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = torch.library.get_ctx().new_dynamic_size()
    return ids.new_empty(n), torch.empty_like(ids), ids.new_empty(n)


def _unique_cpu(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # torch.unique sorts; sorting is also what makes the output order deterministic.
    u, inverse, counts = torch.unique(ids, sorted=True, return_inverse=True, return_counts=True)
    return u, inverse, counts


def unique(ids: torch.Tensor) -> UniqueResult:
    """Distinct ids with the inverse mapping and occurrence counts.

    Args:
        ids: ``(N,) int64`` ids, any values including ``INT64_MIN``/``INT64_MAX``.

    Returns:
        ``UniqueResult(unique_ids (U,), inverse (N,), counts (U,))`` with
        ``unique_ids[inverse] == ids`` and ``unique_ids`` sorted ascending.

    Raises:
        UnsupportedDtypeError: ``ids`` is not an int64 tensor.
        ShapeError: ``ids`` is not 1-d.

    Example:
        >>> unique(torch.tensor([7, -1, 7]))
        UniqueResult(unique_ids=tensor([-1,  7]), inverse=tensor([1, 0, 1]), counts=tensor([1, 2]))
    """
    check_tensor("unique", "ids", ids)
    check_dtype("unique", "ids", ids, (torch.int64,))
    check_1d("unique", "ids", ids)
    return UniqueResult(*run_op(_unique_op, _unique_impl, ids))
