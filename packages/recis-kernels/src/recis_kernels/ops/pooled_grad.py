"""``pooled_rows_grad``: the gradient of a sum-pooled lookup for its distinct rows.

A lookup reads row ``inverse[i]`` of a ``(U, D)`` table for id ``i``, and bag ``m`` sums the
rows of its ids ``bags[m]:bags[m + 1]``, each scaled by its weight ``w_i``. Given the gradient
of the bags, row ``u`` gets::

    grad[u] = sum(w_i * grad_out[bag(i)] for every id i with inverse[i] == u)

summed in ascending id order.
"""

from __future__ import annotations

import torch

from recis_kernels import _native
from recis_kernels._backend import on_host
from recis_kernels._checks import (
    check_1d,
    check_dtype,
    check_same_device,
    check_tensor,
    flat_nonzero,
    is_int,
)
from recis_kernels.exceptions import ArgumentError, IndexOutOfRangeError, ShapeError
from recis_kernels.ops.segment_reduce import _segments

__all__ = ["pooled_rows_grad"]


def pooled_rows_grad(
    grad_out: torch.Tensor,
    inverse: torch.Tensor,
    num_rows: int,
    *,
    bags: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The gradient of the ``num_rows`` distinct rows of a sum-pooled lookup.

    On CPU tensors that need no gradient, one compiled pass over the ids adds each id's term
    into its row: no sort of the ids by row. Each row's terms are summed in ascending id order,
    as a stable sort of the ids by row followed by an ``embedding_bag`` sum would sum them.
    Elsewhere (CUDA, or a ``grad_out`` that needs a gradient itself) the torch spelling,
    ``index_add_`` (on CUDA in an unspecified order).

    Args:
        grad_out: ``(M, D) float32`` gradient of each bag, or of each id without ``bags``.
        inverse: ``(N,) int64`` row of each id, in ``[0, num_rows)``.
        num_rows: ``U``, the rows of the table read.
        bags: ``(M + 1,) int64`` bag offsets over the ids, from 0 to ``N``, non-decreasing;
            ``None``: id ``i`` is bag ``i`` (``M == N``).
        weights: ``(N,) float32`` per-id weights, or ``None`` for ones.

    Returns:
        ``(U, D) float32``.

    Raises:
        UnsupportedDtypeError: a tensor of another dtype than above.
        ShapeError: wrong dimensions or lengths, or (on CPU tensors) bag offsets that do not
            run from 0 to ``N`` without decreasing.
        UnsupportedDeviceError: the tensors live on different devices.
        IndexOutOfRangeError: an entry of ``inverse`` outside ``[0, num_rows)`` (checked on CPU
            tensors).

    Example:
        >>> g = pooled_rows_grad(torch.tensor([[1.0], [10.0]]), torch.tensor([1, 0, 1]), 2,
        ...                      bags=torch.tensor([0, 2, 3]))
        >>> g
        tensor([[ 1.],
                [11.]])
    """
    op = "pooled_rows_grad"
    check_tensor(op, "grad_out", grad_out)
    check_tensor(op, "inverse", inverse)
    check_dtype(op, "grad_out", grad_out, (torch.float32,))
    check_dtype(op, "inverse", inverse, (torch.int64,))
    check_1d(op, "inverse", inverse)
    if grad_out.dim() != 2:
        raise ShapeError(f"{op}: grad_out must be (M, D), got shape {tuple(grad_out.shape)}")
    if not is_int(num_rows) or num_rows < 0:
        raise ArgumentError(f"{op}: num_rows must be an int >= 0, got {num_rows!r}")
    num_rows = int(num_rows)
    n, m = inverse.numel(), grad_out.shape[0]
    if bags is not None:
        check_tensor(op, "bags", bags)
        check_dtype(op, "bags", bags, (torch.int64,))
        check_1d(op, "bags", bags)
        if bags.numel() != m + 1:
            raise ShapeError(
                f"{op}: bags has {bags.numel()} offsets, expected {m + 1} for {m} bags of grad_out"
            )
    elif m != n:
        raise ShapeError(f"{op}: grad_out has {m} rows, expected one per id ({n}) without bags")
    if weights is not None:
        check_tensor(op, "weights", weights)
        check_dtype(op, "weights", weights, (torch.float32,))
        if tuple(weights.shape) != (n,):
            raise ShapeError(f"{op}: weights has shape {tuple(weights.shape)}, expected ({n},)")
    check_same_device(
        op, {"grad_out": grad_out, "inverse": inverse, "bags": bags, "weights": weights}
    )
    if on_host((grad_out, inverse, bags, weights)):
        return _host(op, grad_out, inverse, num_rows, bags, weights)
    if inverse.device.type == "cpu":
        # The compiled pass checks these as it goes; the torch spelling would fail on them
        # with torch's own errors, or not at all.
        _check_host(op, inverse, num_rows, bags)
    return _torch(grad_out, inverse, num_rows, bags, weights)


def _check_host(op: str, inverse: torch.Tensor, num_rows: int, bags: torch.Tensor | None) -> None:
    """The compiled pass's checks of CPU ``bags`` and ``inverse``, with its messages."""
    n = inverse.numel()
    if bags is not None:
        b = bags.detach()
        if int(b[0]) != 0 or int(b[-1]) != n:
            raise ShapeError(
                f"{op}: bag offsets run from {int(b[0])} to {int(b[-1])}, expected 0 to {n}"
            )
        down = flat_nonzero(b[1:] < b[:-1])
        if down.numel():
            k = int(down[0])
            raise ShapeError(
                f"{op}: bag offsets decrease at {k + 1}: {int(b[k])} then {int(b[k + 1])}"
            )
    bad = flat_nonzero((inverse < 0) | (inverse >= num_rows))
    if bad.numel():
        i = int(bad[0])
        raise IndexOutOfRangeError(
            f"{op}: inverse[{i}] = {int(inverse[i])} is outside the {num_rows} rows"
        )


def _host(op, grad_out, inverse, num_rows, bags, weights) -> torch.Tensor:
    m, d = grad_out.shape
    grad_out, inverse = grad_out.contiguous(), inverse.contiguous()
    bags = None if bags is None else bags.contiguous()
    weights = None if weights is None else weights.contiguous()
    out = torch.zeros(num_rows, d, dtype=torch.float32)
    if inverse.numel() == 0 or d == 0:
        # Nothing to add, but the ids and their bags must be valid all the same.
        _check_host(op, inverse, num_rows, bags)
        return out
    try:
        _native.pooled_rows_grad(
            grad_out.data_ptr(),
            m,
            d,
            None if bags is None else bags.data_ptr(),
            inverse.data_ptr(),
            inverse.numel(),
            None if weights is None else weights.data_ptr(),
            out.data_ptr(),
            num_rows,
        )
    except ValueError as error:
        message = str(error)
        if "is outside" in message:
            raise IndexOutOfRangeError(message) from None
        raise ShapeError(message) from None
    return out


def _torch(grad_out, inverse, num_rows, bags, weights) -> torch.Tensor:
    src = grad_out if bags is None else grad_out.index_select(0, _segments(bags, inverse.numel()))
    if weights is not None:
        src = src * weights[:, None]
    out = grad_out.new_zeros(num_rows, grad_out.shape[1])
    return out.index_add(0, inverse, src)
