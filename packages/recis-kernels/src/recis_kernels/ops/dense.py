"""``ragged_to_dense`` / ``dense_to_ragged`` for 2-level ``(B, L)`` and 3-level ``(B, S, L)`` data.

Example (2 levels, ``pad_value=0``)::

    values  = [1, 2, 3]                 dense = [[1, 2],
    offsets = [[0, 2, 2, 3]]                     [0, 0],
                                                 [3, 0]]
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import List  # noqa: UP035  (torch 2.6 infers schemas from typing.List only)

import torch

from recis_kernels._backend import run_op, use_cuda_kernels
from recis_kernels._checks import can_inspect, check_dtype, check_tensor, grid_for, is_int
from recis_kernels.exceptions import RaggedError, ShapeError
from recis_kernels.ragged import RaggedTensor

__all__ = ["dense_to_ragged", "ragged_to_dense"]

_WORDS = {
    1: (torch.uint8, "w1"),
    2: (torch.int16, "w2"),
    4: (torch.int32, "w4"),
    8: (torch.int64, "w8"),
}


def ragged_to_dense(
    r: RaggedTensor,
    pad_value: float | int = 0,
    shape: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """Pad a 2- or 3-level ragged tensor to a dense one.

    Args:
        r: ragged tensor with values ``(N, *E)`` and 1 or 2 offsets levels.
        pad_value: value written to padding slots (cast to the values' dtype, which must hold
            it exactly when it is an integer or bool dtype).
        shape: dense shape ``(B, L)`` or ``(B, S, L)`` (without the trailing ``E`` dims); ``None``
            entries (or ``shape=None``) take the longest row of that level. Rows longer than the
            requested length keep their head.

    Differentiable in ``values``: each value receives the gradient of its dense position, and
    values that a dense length cut off receive zero (``recis::ragged_to_dense_backward``, plain
    torch on every device).

    Returns:
        ``(B, L, *E)`` or ``(B, S, L, *E)`` tensor of the values' dtype.

    Raises:
        RaggedError: more than 3 levels, ``shape`` of the wrong length or batch size, entries
            that are not ints or ``None``, or a
            ``pad_value`` that integer (or bool) values cannot hold exactly (a fraction, or
            outside the dtype's range).
    """
    op = "ragged_to_dense"
    if not isinstance(r, RaggedTensor):
        raise RaggedError(f"{op}: expected a RaggedTensor, got {type(r).__name__}")
    if r.num_levels > 2:
        raise RaggedError(
            f"{op}: supports 2 or 3 levels (1 or 2 offsets), got {r.num_levels} offsets"
        )
    dims = _resolve_dims(op, r, shape)
    _check_pad(op, pad_value, r.values.dtype)
    pad = torch.tensor(pad_value, dtype=r.values.dtype, device=r.values.device)
    return run_op(_ragged_to_dense_op, _ragged_to_dense_impl, r.values, list(r.offsets), pad, dims)


def _check_pad(op: str, pad_value: object, dtype: torch.dtype) -> None:
    """Refuse a pad value that integer (or bool) values cannot hold exactly: a fraction would be
    truncated and an out-of-range value wrapped or refused deep in torch, and either way the
    padding could equal a real value (``0.5`` padding ids as ``0``, ``-1`` as uint8 ``255``)."""
    if not isinstance(pad_value, numbers.Real):
        raise RaggedError(f"{op}: pad_value must be a number, got {type(pad_value).__name__}")
    if dtype.is_floating_point or dtype.is_complex:
        return
    if dtype == torch.bool:
        low, high = 0, 1
    else:
        info = torch.iinfo(dtype)
        low, high = info.min, info.max
    whole: int | None
    if isinstance(pad_value, numbers.Integral):
        whole = int(pad_value)
    else:
        number = float(pad_value)
        whole = int(number) if number.is_integer() else None
    if whole is None or not low <= whole <= high:
        name = str(dtype).removeprefix("torch.")
        raise RaggedError(
            f"{op}: pad_value {pad_value!r} cannot be held exactly by {name} values "
            f"(integers in [{low}, {high}])"
        )


def _resolve_dims(op: str, r: RaggedTensor, shape: Sequence[int | None] | None) -> list[int]:
    wanted: list[int | None] = [None] * r.num_levels
    if shape is not None:
        shape = list(shape)
        if len(shape) != r.num_levels + 1:
            raise RaggedError(
                f"{op}: shape must have {r.num_levels + 1} entries for {r.num_levels + 1} levels, "
                f"got {len(shape)}"
            )
        if shape[0] is not None and shape[0] != len(r):
            raise RaggedError(
                f"{op}: shape[0] is {shape[0]} but the ragged tensor has {len(r)} rows"
            )
        wanted = shape[1:]
    dims = []
    for level, want in enumerate(wanted):
        if want is None:
            # The longest row: never negative, and not compared on the host, as under
            # torch.compile it is a data-dependent size.
            lengths = r.lengths(level)
            dims.append(int(lengths.max()) if lengths.numel() else 0)
            continue
        if not is_int(want):
            # A float would be truncated and a bool taken as 0 or 1.
            raise RaggedError(f"{op}: shape entries must be ints or None, got {want!r}")
        if want < 0:
            raise RaggedError(f"{op}: dense lengths must be >= 0, got {want}")
        dims.append(int(want))
    return dims


# torch has no index_put (masked or indexed assignment) for these, and older releases no
# boolean-mask indexing either: their bits move as the signed integers of their width.
_SIGNED_OF = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


def _ragged_to_dense_cpu(values, offsets, pad, dims):
    signed = _SIGNED_OF.get(values.dtype)
    if signed is not None:
        out = _ragged_to_dense_cpu(values.view(signed), offsets, pad.view(signed), dims)
        return out.view(values.dtype)
    if len(offsets) == 1:
        off = offsets[0]
        batch, length, device = off.numel() - 1, dims[0], values.device
        rest = values.shape[1:]
        lengths = off.diff()
        out = pad.expand(batch, length, *rest).clone()
        starts, counts, n = off, lengths, values.shape[0]
        if batch and int(lengths.max()) > length:
            # Rows longer than the dense length keep their head: gather the kept values first
            # (each at its index plus its row's shift from its start in the kept layout).
            counts = lengths.clamp(max=length)
            starts = torch.zeros(batch + 1, dtype=torch.int64, device=device)
            torch.cumsum(counts, 0, out=starts[1:])
            n = int(starts[-1])
            src = torch.repeat_interleave(off[:-1] - starts[:-1], counts, output_size=n)
            src += torch.arange(n, device=device)
            values = values.index_select(0, src)
            del src
        # The flat position of each value is its index plus its row's shift (row * L minus
        # the row's start): one (n,) int64 tensor and its addend, where an assignment indexed
        # by row and column tensors took about five and ran several times slower.
        shift = torch.arange(batch, device=device) * length - starts[:-1]
        pos = torch.repeat_interleave(shift, counts, output_size=n)
        pos += torch.arange(n, device=device)
        out.view(batch * length, *rest).index_copy_(0, pos, values)
        return out
    batch = offsets[0].numel() - 1
    index, keep = _dense_positions(offsets, dims, values.shape[0], values.device)
    out = pad.expand(batch, *dims, *values.shape[1:]).clone()
    out[index] = values[keep]
    return out


def _dense_positions(
    offsets: list[torch.Tensor], dims: list[int], n: int, device: torch.device
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Where each of the ``n`` values lands in the dense ``(B, *dims)`` layout: ``keep`` marks
    the values inside ``dims`` (rows longer than a dense length keep their head) and ``index``
    holds the dense coordinates of the kept ones, in value order."""
    coords: list[torch.Tensor] = []
    keep = torch.ones(n, dtype=torch.bool, device=device)
    owner = torch.arange(n, device=device)
    for level in range(len(offsets) - 1, -1, -1):
        off = offsets[level]
        rows = off.numel() - 1
        row_of = torch.repeat_interleave(
            torch.arange(rows, device=device),
            off.diff(),
            output_size=_rows_below(offsets, level, n),
        )
        pos = torch.arange(row_of.numel(), device=device) - off[row_of]
        coords.insert(0, pos[owner])
        keep &= pos[owner] < dims[level]
        owner = row_of[owner]
    return (owner[keep], *(c[keep] for c in coords)), keep


def _rows_below(offsets: list[torch.Tensor], level: int, n: int) -> int:
    return n if level == len(offsets) - 1 else offsets[level + 1].numel() - 1


def _ragged_to_dense_cuda(values, offsets, pad, dims):
    from recis_kernels._cuda import index_errors, launch

    batch = offsets[0].numel() - 1
    size = values.element_size()
    word_dtype, suffix = _WORDS[size]
    inner = 1
    for d in values.shape[1:]:
        inner *= d
    out = torch.empty((batch, *dims, *values.shape[1:]), dtype=values.dtype, device=values.device)
    words = (values.view(word_dtype), pad.reshape(1).view(word_dtype), out.view(word_dtype))
    total = out.numel()
    nvalues = values.shape[0]
    device = values.device
    if len(offsets) == 1:
        args = [("ptr", words[0]), ("i64", nvalues), ("ptr", offsets[0]), ("ptr", words[1]),
                ("i64", batch), ("i64", dims[0]), ("i64", inner), ("ptr", words[2]),
                *index_errors.error_args(device, "ragged_to_dense", ("offsets",))]  # fmt: skip
        launch("dense", f"ragged_to_dense2_{suffix}", grid_for(total), 256, args, device=device)
    else:
        args = [("ptr", words[0]), ("i64", nvalues), ("ptr", offsets[0]),
                ("i64", offsets[1].numel() - 1), ("ptr", offsets[1]), ("ptr", words[1]),
                ("i64", batch), ("i64", dims[0]), ("i64", dims[1]), ("i64", inner),
                ("ptr", words[2]),
                *index_errors.error_args(device, "ragged_to_dense", ("offsets[0]", "offsets[1]"))]  # fmt: skip
        launch("dense", f"ragged_to_dense3_{suffix}", grid_for(total), 256, args, device=device)
    index_errors.after_launch(device)
    return out


def _ragged_to_dense_impl(
    values: torch.Tensor,
    offsets: List[torch.Tensor],  # noqa: UP006
    pad: torch.Tensor,
    dims: List[int],  # noqa: UP006
) -> torch.Tensor:
    values = values.contiguous()
    offsets = [o.contiguous() for o in offsets]
    if (
        use_cuda_kernels(values.device)
        and values.element_size() in _WORDS
        and values.dtype != torch.bool
    ):
        return _ragged_to_dense_cuda(values, offsets, pad, dims)
    return _ragged_to_dense_cpu(values, offsets, pad, dims)


_ragged_to_dense_op = torch.library.custom_op("recis::ragged_to_dense", mutates_args=())(
    _ragged_to_dense_impl
)


@_ragged_to_dense_op.register_fake
def _(values, offsets, pad, dims):
    return values.new_empty((offsets[0].shape[0] - 1, *dims, *values.shape[1:]))


def _ragged_to_dense_backward_impl(
    grad: torch.Tensor,
    offsets: List[torch.Tensor],  # noqa: UP006
    num_values: int,
) -> torch.Tensor:
    """Gradient of the values: each value's dense position, zero for the values a dense length
    cut off. Plain torch on every device (a gather of the dense gradient)."""
    grad = grad.contiguous()
    offsets = [o.contiguous() for o in offsets]
    levels = len(offsets)
    dims = list(grad.shape[1 : 1 + levels])
    out = grad.new_zeros(num_values, *grad.shape[1 + levels :])
    if num_values:
        index, keep = _dense_positions(offsets, dims, num_values, grad.device)
        out[keep] = grad[index]
    return out


_ragged_to_dense_backward_op = torch.library.custom_op(
    "recis::ragged_to_dense_backward", mutates_args=()
)(_ragged_to_dense_backward_impl)


@_ragged_to_dense_backward_op.register_fake
def _(grad, offsets, num_values):
    return grad.new_empty((num_values, *grad.shape[1 + len(offsets) :]))


def _ragged_to_dense_setup(ctx, inputs, output) -> None:
    values, offsets, _, _ = inputs
    ctx.num_values = values.shape[0]
    ctx.save_for_backward(*offsets)


def _ragged_to_dense_backward(ctx, grad):
    offsets = list(ctx.saved_tensors)
    values_grad = None
    if ctx.needs_input_grad[0]:
        values_grad = run_op(
            _ragged_to_dense_backward_op,
            _ragged_to_dense_backward_impl,
            grad,
            offsets,
            ctx.num_values,
        )
    return values_grad, [None] * len(offsets), None, None


_ragged_to_dense_op.register_autograd(
    _ragged_to_dense_backward, setup_context=_ragged_to_dense_setup
)


def dense_to_ragged(
    dense: torch.Tensor,
    lengths: torch.Tensor | Sequence[torch.Tensor] | None = None,
    pad_value: float | int | None = None,
) -> RaggedTensor:
    """Turn a padded ``(B, L)`` or ``(B, S, L)`` tensor into a ragged one.

    Row lengths come from, in order of precedence:

    - ``lengths``: ``(B,)`` int64 for 2-d input; ``[(B,), (B, S)]`` (sub-rows per row, values per
      sub-row) for 3-d input. Each must fit the dense size.
    - ``pad_value``: trailing entries equal to ``pad_value`` (NaN entries for a NaN pad) are
      stripped from every row (inner padding is kept); for 3-d input, trailing sub-rows left
      empty are then stripped too.
    - neither: every row is full (length ``L``, and ``S`` sub-rows).

    The row lengths are torch operations; the values are copied by one kernel launch on CUDA
    (``dense_to_ragged{2,3}`` in ``cuda/dense.cu``) and one masked select on the CPU.
    Differentiable: the gradient of the values goes back to their dense positions (zero
    elsewhere).

    Args:
        dense: ``(B, L)`` or ``(B, S, L)`` tensor.
        lengths: optional explicit lengths, see above.
        pad_value: optional padding value to strip, see above.

    Returns:
        Ragged tensor with 1 (2-d input) or 2 (3-d input) offsets levels.

    Raises:
        ShapeError: ``dense`` is not 2-d or 3-d, or lengths have the wrong shape.
        RaggedError: a length is negative or exceeds the dense size, or ``pad_value`` is
            neither NaN nor a number ``dense``'s dtype holds exactly (``-1`` for uint8,
            ``0.5`` for ids).
    """
    op = "dense_to_ragged"
    check_tensor(op, "dense", dense)
    if dense.dim() not in (2, 3):
        raise ShapeError(
            f"{op}: dense must be 2-d (B, L) or 3-d (B, S, L), got shape {tuple(dense.shape)}"
        )
    lens = _dense_lengths(op, dense, lengths, pad_value)
    if dense.dim() == 2:
        offsets = [_offsets(lens[0])]
    else:
        outer, inner = lens
        sub_mask = torch.arange(dense.shape[1], device=dense.device) < outer[:, None]
        offsets = [_offsets(outer), _offsets(inner[sub_mask])]
    values = run_op(_dense_to_ragged_values_op, _dense_to_ragged_values_impl, dense, offsets)
    return RaggedTensor(values, offsets, validate=False)


def _dense_to_ragged_cpu(dense: torch.Tensor, offsets: list[torch.Tensor]) -> torch.Tensor:
    signed = _SIGNED_OF.get(dense.dtype)
    if signed is not None:  # no boolean-mask indexing of these in older torch releases
        return _dense_to_ragged_cpu(dense.view(signed), offsets).view(dense.dtype)
    rows = torch.arange(dense.shape[1], device=dense.device) < offsets[0].diff()[:, None]
    if len(offsets) == 1:
        return dense[rows]
    values = torch.arange(dense.shape[2], device=dense.device) < offsets[1].diff()[:, None]
    return dense[rows][values]


def _dense_to_ragged_cuda(dense: torch.Tensor, offsets: list[torch.Tensor]) -> torch.Tensor:
    from recis_kernels._cuda import index_errors, launch

    word_dtype, suffix = _WORDS[dense.element_size()]
    total = index_errors.host_int(offsets[-1][-1])
    if total < 0:
        raise RaggedError(f"dense_to_ragged: lengths must be >= 0, got a total length of {total}")
    # Zeros: the kernel writes no value of a row whose length is out of range (and records
    # the error), and the output is returned before that record is read.
    out = torch.zeros(total, dtype=dense.dtype, device=dense.device)
    if total == 0:
        return out
    src, dst = dense.view(word_dtype), out.view(word_dtype)
    batch = dense.shape[0]
    # Offsets are running sums of the lengths, which a device check would have to synchronize
    # for; a negative or too long length is caught by the kernel, as a bad offset.
    device = dense.device
    if len(offsets) == 1:
        args = [("ptr", src), ("ptr", offsets[0]), ("i64", batch), ("i64", dense.shape[1]),
                ("i64", total), ("ptr", dst),
                *index_errors.error_args(device, "dense_to_ragged", ("offsets",))]  # fmt: skip
        name = f"dense_to_ragged2_{suffix}"
    else:
        args = [("ptr", src), ("ptr", offsets[0]), ("i64", offsets[1].numel() - 1),
                ("ptr", offsets[1]), ("i64", batch), ("i64", dense.shape[1]),
                ("i64", dense.shape[2]), ("i64", total), ("ptr", dst),
                *index_errors.error_args(device, "dense_to_ragged", ("offsets[0]", "offsets[1]"))]  # fmt: skip
        name = f"dense_to_ragged3_{suffix}"
    launch("dense", name, grid_for(dense.numel()), 256, args, device=device)
    index_errors.after_launch(device)
    return out


def _dense_to_ragged_values_impl(
    dense: torch.Tensor,
    offsets: List[torch.Tensor],  # noqa: UP006
) -> torch.Tensor:
    dense = dense.contiguous()
    offsets = [o.contiguous() for o in offsets]
    if use_cuda_kernels(dense.device) and dense.element_size() in _WORDS:
        return _dense_to_ragged_cuda(dense, offsets)
    return _dense_to_ragged_cpu(dense, offsets)


_dense_to_ragged_values_op = torch.library.custom_op(
    "recis::dense_to_ragged_values", mutates_args=()
)(_dense_to_ragged_values_impl)


@_dense_to_ragged_values_op.register_fake
def _(dense, offsets):
    return dense.new_empty(torch.library.get_ctx().new_dynamic_size())


def _dense_to_ragged_setup(ctx, inputs, output) -> None:
    dense, offsets = inputs
    ctx.dims = list(dense.shape[1:])
    ctx.save_for_backward(*offsets)


def _dense_to_ragged_backward(ctx, grad):
    zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
    dense_grad = run_op(
        _ragged_to_dense_op, _ragged_to_dense_impl, grad, list(ctx.saved_tensors), zero, ctx.dims
    )
    return dense_grad, [None] * len(ctx.saved_tensors)


_dense_to_ragged_values_op.register_autograd(
    _dense_to_ragged_backward, setup_context=_dense_to_ragged_setup
)


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths, 0, out=out[1:])
    return out


def _dense_lengths(op, dense, lengths, pad_value) -> list[torch.Tensor]:
    b = dense.shape[0]
    if lengths is not None:
        given = [lengths] if isinstance(lengths, torch.Tensor) else list(lengths)
        shapes = [(b,)] if dense.dim() == 2 else [(b,), (b, dense.shape[1])]
        if len(given) != len(shapes):
            raise ShapeError(
                f"{op}: {dense.dim()}-d dense needs {len(shapes)} lengths tensors, got {len(given)}"
            )
        for k, (t, shape) in enumerate(zip(given, shapes, strict=True)):
            check_tensor(op, f"lengths[{k}]", t)
            check_dtype(op, f"lengths[{k}]", t, (torch.int64,))
            if tuple(t.shape) != shape:
                raise ShapeError(
                    f"{op}: lengths[{k}] must have shape {shape}, got {tuple(t.shape)}"
                )
            limit = dense.shape[k + 1]
            if can_inspect(t) and t.numel() and (int(t.min()) < 0 or int(t.max()) > limit):
                raise RaggedError(
                    f"{op}: lengths[{k}] must lie in [0, {limit}], got values in [{int(t.min())}, {int(t.max())}]"
                )
        return [t.to(dense.device) for t in given]
    if pad_value is not None:
        nan_pad = isinstance(pad_value, numbers.Real) and math.isnan(float(pad_value))
        if not nan_pad:
            # A pad the values cannot hold (-1 for uint8, a fraction for ids) would be wrapped
            # or rounded by torch's scalar comparison and strip real values: refused, as
            # ragged_to_dense refuses it.
            _check_pad(op, pad_value, dense.dtype)
        if dense.dtype.is_floating_point:
            # NaN equals nothing, itself included: a NaN pad is found by isnan.
            nonpad = ~dense.isnan() if nan_pad else dense != float(pad_value)
        elif nan_pad:
            nonpad = torch.ones_like(dense, dtype=torch.bool)  # integers hold no NaN
        else:
            # Compared in the values' own dtype: an int64 compared with a float scalar is
            # compared in float32 (2**40 + 1 equal to 2**40).
            nonpad = dense != torch.tensor(int(pad_value), dtype=dense.dtype, device=dense.device)
        inner = _trailing_length(nonpad)
        if dense.dim() == 2:
            return [inner]
        return [_trailing_length(inner > 0), inner]
    full = [torch.full((b,), dense.shape[1], dtype=torch.int64, device=dense.device)]
    if dense.dim() == 3:
        full.append(
            torch.full((b, dense.shape[1]), dense.shape[2], dtype=torch.int64, device=dense.device)
        )
    return full


def _trailing_length(nonpad: torch.Tensor) -> torch.Tensor:
    """Length up to and including the last True along the last dimension."""
    if nonpad.shape[-1] == 0:
        return torch.zeros(nonpad.shape[:-1], dtype=torch.int64, device=nonpad.device)
    pos = torch.arange(1, nonpad.shape[-1] + 1, device=nonpad.device)
    return (pos * nonpad).amax(dim=-1)
