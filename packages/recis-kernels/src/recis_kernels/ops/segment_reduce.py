"""``segment_reduce``: pool the rows of each ragged segment (embedding bag pooling).

Segment ``b`` is ``rows[offsets[b]:offsets[b+1]]`` with weights ``w`` (1 when absent)::

    rows    = [e0, e1, e2]         offsets = [0, 2, 2, 3]
    sum   -> [w0 e0 + w1 e1, 0, w2 e2]
    mean  -> sum / (w0 + w1)   (Σw·e / Σw; 0 for an empty segment or Σw = 0)
    sqrtn -> sum / sqrt(w0² + w1²)
    tile  -> first tile_len rows of each segment, weighted, concatenated and zero padded:
             tile_len=2: [[w0 e0, w1 e1], [0, 0], [w2 e2, 0]] flattened to (B, 2 * D)

Gradients flow to ``rows`` and to ``weights`` (when it requires grad).
"""

from __future__ import annotations

import numpy as np
import torch

from recis_kernels._backend import run_op, use_cuda_kernels
from recis_kernels._checks import (
    can_inspect,
    check_1d,
    check_dtype,
    check_same_device,
    check_tensor,
    grid_for,
    is_int,
)
from recis_kernels.exceptions import ArgumentError, ShapeError

__all__ = ["segment_reduce"]

_MODES = {"sum": 0, "mean": 1, "sqrtn": 2, "tile": 3}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def segment_reduce(
    rows: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor | None = None,
    mode: str = "sum",
    tile_len: int | None = None,
) -> torch.Tensor:
    """Weighted sum / mean / sqrtn pooling, or tiling, of ragged row segments.

    Args:
        rows: ``(N, D)`` floating rows; float16 and bfloat16 rows are pooled in float32 and
            the result rounded to their dtype.
        offsets: ``(B+1,)`` int64 segment boundaries (start at 0, end at N).
        weights: optional ``(N,)`` per-row weights (float32, or the rows' dtype).
        mode: ``"sum"``, ``"mean"``, ``"sqrtn"`` or ``"tile"``.
        tile_len: number of rows kept per segment in ``"tile"`` mode (required there only).

    Returns:
        ``(B, D)``, or ``(B, tile_len * D)`` in ``"tile"`` mode, of the rows' dtype.

    Raises:
        UnsupportedDtypeError: rows not floating, offsets not int64.
        ShapeError: wrong dimensions or lengths, or offsets that do not run from 0 to N
            without decreasing (checked for offsets on the host).
        ArgumentError: unknown mode or missing/invalid tile_len.
    """
    op = "segment_reduce"
    check_tensor(op, "rows", rows)
    check_tensor(op, "offsets", offsets)
    check_dtype(op, "rows", rows, _FLOATS)
    check_dtype(op, "offsets", offsets, (torch.int64,))
    if rows.dim() != 2:
        raise ShapeError(f"{op}: rows must be 2-d (N, D), got shape {tuple(rows.shape)}")
    check_1d(op, "offsets", offsets)
    if offsets.numel() == 0:
        raise ShapeError(f"{op}: offsets must hold at least one entry (B + 1 for B segments)")
    if weights is not None:
        check_tensor(op, "weights", weights)
        check_dtype(op, "weights", weights, (torch.float32, rows.dtype))
        if tuple(weights.shape) != (rows.shape[0],):
            raise ShapeError(
                f"{op}: weights must have shape ({rows.shape[0]},), got {tuple(weights.shape)}"
            )
    check_same_device(op, {"rows": rows, "offsets": offsets, "weights": weights})
    if not isinstance(mode, str) or mode not in _MODES:
        raise ArgumentError(f"{op}: mode must be one of sum, mean, sqrtn, tile, got {mode!r}")
    if mode == "tile":
        if not is_int(tile_len) or tile_len < 1:
            raise ArgumentError(f"{op}: tile mode needs tile_len as an int >= 1, got {tile_len!r}")
        tile_len = int(tile_len)
    elif tile_len is not None:
        raise ArgumentError(f"{op}: tile_len only applies to mode 'tile', got mode {mode!r}")
    if can_inspect(offsets) and (int(offsets[0]) != 0 or int(offsets[-1]) != rows.shape[0]):
        raise ShapeError(
            f"{op}: offsets must start at 0 and end at the number of rows ({rows.shape[0]}), "
            f"got {int(offsets[0])} and {int(offsets[-1])}"
        )
    if can_inspect(offsets):
        # Host offsets only, like the check above: reading device offsets would synchronize.
        off = offsets.numpy()
        down = np.flatnonzero(off[1:] < off[:-1])  # not np.diff, which can wrap around int64
        if down.size:
            k = int(down[0])
            raise ShapeError(
                f"{op}: offsets must be non-decreasing, got offsets[{k}] = "
                f"{int(offsets[k])} > offsets[{k + 1}] = {int(offsets[k + 1])}"
            )
    return run_op(
        _segment_reduce_op, _segment_reduce_impl, rows, offsets, weights, mode, tile_len or 0
    )


def _segments(offsets: torch.Tensor, n: int) -> torch.Tensor:
    lengths = offsets.diff()
    return torch.repeat_interleave(
        torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=n
    )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the torch path pools in: float32 for half rows. Squares of weights above 256
    overflow float16 (sqrtn pooled to 0), those below 2**-12 vanish, and a float16 sum of
    weights stops growing past 2048: the sums are formed in float32 (the normalizers in float64,
    see :func:`_scale`) and only the result is rounded to the rows' dtype."""
    return torch.promote_types(dtype, torch.float32)


def _scale(offsets, w, seg, mode) -> torch.Tensor:
    """Per-segment factor of the pooled sum (1, 1 / sum w or 1 / sqrt(sum w^2)) from weights
    ``w`` (in the accumulation dtype), in float64: ``sum w`` and ``sum w^2``
    are formed there, where the square of a float32 weight is exact and neither underflows nor
    overflows (in float32, weights of 1e-24 squared to 0 and weights of 1e20 to inf, both
    pooling to 0; 1e-20 squared to a subnormal, losing digits), and the factor is applied
    there too (``1 / sqrt(sum w^2)`` of tiny weights exceeds float32's range). The kernels do
    the same, so both agree."""
    b = offsets.numel() - 1
    if mode in ("sum", "tile"):
        return torch.ones(b, dtype=torch.float64, device=offsets.device)
    w = w.to(torch.float64)
    term = w if mode == "mean" else w * w
    total = torch.zeros(b, dtype=torch.float64, device=offsets.device).index_add_(0, seg, term)
    if mode == "sqrtn":
        total = total.sqrt()
    return torch.where(total == 0, torch.zeros_like(total), 1 / total)


def _weights(weights, n, dtype, device) -> torch.Tensor:
    if weights is None:
        return torch.ones(n, dtype=dtype, device=device)
    return weights.to(dtype)


def _forward_cpu(rows, offsets, weights, mode, tile_len):
    n, d = rows.shape
    b = offsets.numel() - 1
    seg = _segments(offsets, n)
    acc = _acc_dtype(rows.dtype)
    w = _weights(weights, n, acc, rows.device)
    weighted = rows.to(acc) * w[:, None]
    if mode == "tile":
        out = rows.new_zeros(b, tile_len, d)
        pos = torch.arange(n, device=rows.device) - offsets[seg]
        m = pos < tile_len
        out[seg[m], pos[m]] = weighted[m].to(rows.dtype)
        return out.reshape(b, tile_len * d)
    out = torch.zeros(b, d, dtype=acc, device=rows.device).index_add_(0, seg, weighted)
    if mode == "sum":
        return out.to(rows.dtype)
    return (out * _scale(offsets, w, seg, mode)[:, None]).to(rows.dtype)


def _backward_cpu(grad, offsets, weights, mode, tile_len, num_rows):
    d = grad.shape[1] // (tile_len if mode == "tile" else 1)
    seg = _segments(offsets, num_rows)
    acc = _acc_dtype(grad.dtype)
    w = _weights(weights, num_rows, acc, grad.device)
    if mode == "tile":
        out = grad.new_zeros(num_rows, d)
        pos = torch.arange(num_rows, device=grad.device) - offsets[seg]
        m = pos < tile_len
        out[m] = (grad.view(grad.shape[0], tile_len, d)[seg[m], pos[m]].to(acc) * w[m, None]).to(
            grad.dtype
        )
        return out
    if mode == "sum":
        return (grad[seg].to(acc) * w[:, None]).to(grad.dtype)
    # Each row's factor w / sum w (w / sqrt(sum w^2)) is formed in float64 and is at most 1 in
    # size for weights of one sign: in the accumulation dtype it multiplies the (N, D)
    # gradient without an (N, D) float64 temporary. The kernels do the same.
    w64 = w.to(torch.float64)  # _scale takes it as it is (no second conversion)
    factor = (w64 * _scale(offsets, w64, seg, mode)[seg]).to(acc)
    return (grad[seg].to(acc) * factor[:, None]).to(grad.dtype)


def _launch(direction, src, offsets, weights, mode, tile_len, d, out):
    from recis_kernels._cuda import index_errors, launch

    b = offsets.numel() - 1
    suffix = "f32" if src.dtype == torch.float32 else "f64"
    w = weights.to(torch.float32).contiguous() if weights is not None else 0
    total = b * d * (tile_len if mode == "tile" else 1)
    # The offsets split the rows of the (N, D) array on the row side: the input forward, the
    # gradient output backward.
    num_rows = (src if direction == "fwd" else out).shape[0]
    op = "segment_reduce" if direction == "fwd" else "segment_reduce (backward)"
    args = [("ptr", src), ("i64", num_rows), ("ptr", offsets), ("ptr", w), ("i64", b),
            ("i64", d), ("i32", _MODES[mode]), ("i64", tile_len), ("ptr", out),
            *index_errors.error_args(src.device, op, ("offsets",))]  # fmt: skip
    launch(
        "segment_reduce",
        f"segment_reduce_{direction}_{suffix}",
        grid_for(total),
        256,
        args,
        device=src.device,
    )
    index_errors.after_launch(src.device)


def _kernel_ok(t: torch.Tensor, weights) -> bool:
    # The kernels read float32 weights; float64 weights with float64 rows keep the torch path
    # so that double-precision gradient checks stay exact.
    return (
        use_cuda_kernels(t.device)
        and t.dtype in (torch.float32, torch.float64)
        and (weights is None or weights.dtype == torch.float32)
    )


def _segment_reduce_impl(
    rows: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor | None,
    mode: str,
    tile_len: int,
) -> torch.Tensor:
    rows, offsets = rows.contiguous(), offsets.contiguous()
    if not _kernel_ok(rows, weights):
        return _forward_cpu(rows, offsets, weights, mode, tile_len)
    b, d = offsets.numel() - 1, rows.shape[1]
    out = rows.new_empty(b, d * (tile_len if mode == "tile" else 1))
    _launch("fwd", rows, offsets, weights, mode, tile_len, d, out)
    return out


_segment_reduce_op = torch.library.custom_op("recis::segment_reduce", mutates_args=())(
    _segment_reduce_impl
)


@_segment_reduce_op.register_fake
def _(rows, offsets, weights, mode, tile_len):
    width = rows.shape[1] * (tile_len if mode == "tile" else 1)
    return rows.new_empty(offsets.shape[0] - 1, width)


def _segment_reduce_backward_impl(
    grad: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor | None,
    mode: str,
    tile_len: int,
    num_rows: int,
) -> torch.Tensor:
    grad, offsets = grad.contiguous(), offsets.contiguous()
    if not _kernel_ok(grad, weights):
        return _backward_cpu(grad, offsets, weights, mode, tile_len, num_rows)
    d = grad.shape[1] // (tile_len if mode == "tile" else 1)
    # Zeroed: the kernels write only rows inside a segment (with bad offsets, some are not).
    out = grad.new_zeros(num_rows, d)
    _launch("bwd", grad, offsets, weights, mode, tile_len, d, out)
    return out


_segment_reduce_backward_op = torch.library.custom_op(
    "recis::segment_reduce_backward", mutates_args=()
)(_segment_reduce_backward_impl)


@_segment_reduce_backward_op.register_fake
def _(grad, offsets, weights, mode, tile_len, num_rows):
    d = grad.shape[1] // (tile_len if mode == "tile" else 1)
    return grad.new_empty(num_rows, d)


def _setup_context(ctx, inputs, output):
    rows, offsets, weights, mode, tile_len = inputs
    ctx.mode, ctx.tile_len = mode, tile_len
    ctx.weights_need_grad = weights is not None and weights.requires_grad
    saved_rows = rows if ctx.weights_need_grad else None
    saved_out = output if ctx.weights_need_grad else None
    ctx.save_for_backward(offsets, weights, saved_rows, saved_out)
    ctx.num_rows = rows.shape[0]


def _backward(ctx, grad):
    offsets, weights, rows, out = ctx.saved_tensors
    grad_rows = None
    if ctx.needs_input_grad[0]:
        grad_rows = run_op(
            _segment_reduce_backward_op,
            _segment_reduce_backward_impl,
            grad,
            offsets,
            weights,
            ctx.mode,
            ctx.tile_len,
            ctx.num_rows,
        )
    grad_w = None
    if ctx.weights_need_grad and ctx.needs_input_grad[2]:
        grad_w = _weight_grad(grad, rows, offsets, weights, out, ctx.mode, ctx.tile_len).to(
            weights.dtype
        )
    return grad_rows, None, grad_w, None, None


def _weight_grad(grad, rows, offsets, weights, out, mode, tile_len):
    n = rows.shape[0]
    seg = _segments(offsets, n)
    acc = _acc_dtype(rows.dtype)
    grad, rows, out = grad.to(acc), rows.to(acc), out.to(acc)
    w = weights.to(acc)
    if mode == "tile":
        d = rows.shape[1]
        pos = torch.arange(n, device=rows.device) - offsets[seg]
        m = pos < tile_len
        g = torch.zeros_like(rows)
        g[m] = grad.view(grad.shape[0], tile_len, d)[seg[m], pos[m]]
        return (g * rows).sum(1)
    ge = (grad[seg] * rows).sum(1)
    if mode == "sum":
        return ge
    scale = _scale(offsets, w, seg, mode)[seg]
    go = (grad * out).sum(1)[seg]
    if mode == "mean":
        return (ge - go) * scale
    return ge * scale - go * w * scale * scale


_segment_reduce_op.register_autograd(_backward, setup_context=_setup_context)
