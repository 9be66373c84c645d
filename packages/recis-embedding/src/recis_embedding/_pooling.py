"""Reductions from deduplicated embedding rows to per-bag outputs, with hand-written backward.

The forward reads rows ``emb[inverse]``; the backward accumulates gradients straight into the
``(U, D)`` gradient of the distinct rows (on the CPU one compiled pass over the ids,
recis-kernels' ``pooled_rows_grad``; elsewhere a pooled gather over the ids grouped by row), so
no per-occurrence gradient tensor outlives the call and no dense table gradient exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import recis_kernels as rk
from recis_embedding._host import on_host, repeat_values, true_positions

__all__ = ["bag_weights", "padded_gather", "per_bag_scale", "pool", "segment_ids"]


def bag_weights(
    bags: torch.Tensor, weights: torch.Tensor | None, mode: str, n: int
) -> torch.Tensor | None:
    """Per-id multipliers realizing ``mode`` as a weighted sum over each bag.

    ``sum``: ``w``; ``mean``: ``w / Σw``; ``sqrtn``: ``w / sqrt(Σw²)`` (bags with zero total get 0).

    Args:
        bags: ``(M+1,) int64`` bag offsets over the ``n`` ids.
        weights: ``(n,) float32`` or ``None`` (all ones).
        mode: ``"sum"``, ``"mean"`` or ``"sqrtn"``.
        n: number of ids.

    Returns:
        ``(n,) float32``, or ``None`` for an unweighted sum.
    """
    if mode == "sum":
        return weights
    lengths = bags[1:] - bags[:-1]
    if weights is None:  # one multiplier per bag, 1/L or 1/sqrt(L): no per-id sums needed
        return repeat_values(per_bag_scale(lengths, mode), lengths, n)
    seg = segment_ids(bags, n)
    # Σw and Σw² in float64, as recis_kernels.segment_reduce forms them: a float32 total stops
    # growing at 2**24 unit weights (every id of a longer bag then got too large a share), and
    # squares of tiny or huge float32 weights underflow or overflow there.
    wide = weights.to(torch.float64)
    terms = wide if mode == "mean" else wide * wide
    total = torch.zeros(lengths.numel(), dtype=torch.float64, device=bags.device)
    total = total.index_add_(0, seg, terms)
    nonzero = total != 0
    # The square root of the safe total: sqrt's gradient at a zero total is inf, and 0 * inf
    # gave weights a model computed NaN gradients wherever a bag's weights were all 0.
    safe = torch.where(nonzero, total, torch.ones_like(total))
    if mode == "sqrtn":
        safe = safe.sqrt()
    share = torch.where(nonzero[seg], wide / safe[seg], torch.zeros_like(wide))
    return share.to(weights.dtype)


def per_bag_scale(lengths: torch.Tensor, mode: str) -> torch.Tensor:
    """``(M,) float32`` multiplier of every id of an unweighted bag of each length: 1 for
    ``sum``, ``1/L`` for ``mean``, ``1/sqrt(L)`` for ``sqrtn`` (the same roundings as
    :func:`bag_weights` with unit weights; empty bags get a value no id uses)."""
    if mode == "sum":
        return torch.ones(lengths.numel(), device=lengths.device)
    total = lengths.to(torch.float64)
    if mode == "sqrtn":
        total = total.sqrt()
    return (1.0 / torch.where(total != 0, total, torch.ones_like(total))).to(torch.float32)


def segment_ids(bags: torch.Tensor, n: int) -> torch.Tensor:
    """``(n,) int64`` bag index of every id, from ``(M+1,)`` bag offsets over ``n`` ids."""
    if bags.numel() <= 2:
        return torch.zeros(n, dtype=torch.int64, device=bags.device)
    m = bags.numel() - 1
    return repeat_values(torch.arange(m, device=bags.device), bags[1:] - bags[:-1], n)


def _rows_grad(
    grad_out: torch.Tensor,
    bags: torch.Tensor | None,
    inverse: torch.Tensor,
    weights: torch.Tensor | None,
    num_rows: int,
    grouping: tuple[torch.Tensor, torch.Tensor] | None,
    seg: torch.Tensor | None = None,
) -> torch.Tensor:
    """``grad[u] = Σ_{i: inverse[i] = u} w_i * grad_out[bag(i)]``, summed in ascending ``i``
    (``bags`` ``None``: id ``i`` is bag ``i``; ``seg``: the bag of every id when the caller
    has it).

    On the CPU one compiled pass adds each id's term into its row. Elsewhere the ids are
    grouped by distinct row (the dedup's ``grouping``, or one stable sort of ``inverse``) and
    the sum per row is an ``embedding_bag`` over ``grad_out``, which reduces duplicates without
    atomics and sums in the same order.
    """
    if all(t is None or on_host(t) for t in (grad_out, inverse, bags, weights)):
        return rk.pooled_rows_grad(grad_out, inverse, num_rows, bags=bags, weights=weights)
    out_rows = seg if seg is not None or bags is None else segment_ids(bags, inverse.numel())
    if grouping is not None:
        order, offsets = grouping
    else:
        small = num_rows < 2**31
        # Stable: each row's gradient is summed in input order, the order a table of its own
        # (fuse=False) sums it in, so fusion does not change a rounding.
        order = torch.argsort(inverse.to(torch.int32) if small else inverse, stable=True)
        counts = torch.bincount(inverse, minlength=num_rows)
        offsets = torch.zeros(num_rows + 1, dtype=torch.int64, device=inverse.device)
        torch.cumsum(counts, 0, out=offsets[1:])
    index = order if out_rows is None else out_rows.index_select(0, order)
    w = None if weights is None else weights.index_select(0, order)
    return F.embedding_bag(
        index, grad_out, offsets, mode="sum", per_sample_weights=w, include_last_offset=True
    )


class _Pool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emb, inverse, bags, weights, singles, grouping):  # type: ignore[override]
        ctx.num_rows = emb.shape[0]
        ctx.grouping = grouping
        ctx.singles = singles
        ctx.has_weights = weights is not None
        if singles:
            ctx.save_for_backward(inverse)
            return emb.index_select(0, inverse)
        empty = torch.empty(0)
        # Weights that need a gradient (computed by a model) get it from the rows they scale.
        ctx.save_for_backward(
            inverse,
            bags,
            weights if weights is not None else empty,
            emb if weights is not None and weights.requires_grad else empty,
        )
        return F.embedding_bag(
            inverse, emb, bags, mode="sum", per_sample_weights=weights, include_last_offset=True
        )

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_out = grad_out.contiguous()
        grad = grad_w = None
        if ctx.singles:
            (inverse,) = ctx.saved_tensors
            grad = _rows_grad(grad_out, None, inverse, None, ctx.num_rows, ctx.grouping)
        else:
            inverse, bags, weights, emb = ctx.saved_tensors
            w = weights if ctx.has_weights else None
            # The bag of every id, when the weights' gradient needs it (the rows' gradient
            # then reuses it off the CPU).
            seg = segment_ids(bags, inverse.numel()) if ctx.needs_input_grad[3] else None
            if ctx.needs_input_grad[0]:
                grad = _rows_grad(grad_out, bags, inverse, w, ctx.num_rows, ctx.grouping, seg)
            if ctx.needs_input_grad[3]:
                # d out[bag(i)] / d w_i = emb[inverse[i]]
                rows = emb.index_select(0, inverse).to(grad_out.dtype)
                grad_w = (grad_out.index_select(0, seg) * rows).sum(1).to(weights.dtype)
        return grad, None, None, grad_w, None, None


def pool(
    emb: torch.Tensor,
    inverse: torch.Tensor,
    bags: torch.Tensor,
    weights: torch.Tensor | None,
    singles: bool,
    grouping: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Weighted sum of ``emb[inverse]`` over each bag.

    Args:
        emb: ``(U, D) float32`` distinct rows.
        inverse: ``(N,) int64`` row of each id in ``emb``.
        bags: ``(M+1,) int64`` bag offsets over the ids.
        weights: ``(N,) float32`` multipliers or ``None``.
        singles: every bag holds exactly one id and there are no weights (a gather suffices).
        grouping: optional ``(order, offsets)`` grouping the ids by row of ``emb`` (from the
            dedup sort), so the backward pass off the CPU needs no sort of its own.

    Returns:
        ``(M, D) float32``.
    """
    if inverse.numel() == 0:
        # Still in the graph of the rows and weights, so their gradients are (empty) zeros.
        zeros = emb.new_zeros(bags.numel() - 1, emb.shape[1]) + 0 * emb.sum()
        return zeros if weights is None else zeros + 0 * weights.sum()
    singles = singles and weights is None
    return _Pool.apply(emb, inverse, bags, weights, singles, grouping)


def padded_gather(
    emb: torch.Tensor, inverse: torch.Tensor, bags: torch.Tensor, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of each bag, left-aligned and zero-padded to ``max_len`` (longer bags truncated).

    Args:
        emb: ``(U, D)`` distinct rows.
        inverse: ``(N,) int64`` row of each id in ``emb``.
        bags: ``(M+1,) int64`` bag offsets.
        max_len: output length ``L``.

    Returns:
        ``(values (M, L, D), mask (M, L) bool)``.
    """
    m, d = bags.numel() - 1, emb.shape[1]
    lengths = bags[1:] - bags[:-1]
    seg = torch.repeat_interleave(torch.arange(m, device=bags.device), lengths)
    col = torch.arange(inverse.numel(), device=bags.device) - bags[:-1].repeat_interleave(lengths)
    keep = true_positions(col < max_len)
    pos = seg[keep] * max_len + col[keep]
    vals = emb.index_select(0, inverse[keep])
    out = emb.new_zeros(m * max_len, d).index_copy(0, pos, vals)
    mask = torch.zeros(m * max_len, dtype=torch.bool, device=bags.device)
    mask[pos] = True
    return out.view(m, max_len, d), mask.view(m, max_len)
