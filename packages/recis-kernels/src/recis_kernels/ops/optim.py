"""Sparse optimizer updates of touched rows, in place, with torch's numerics.

Every function updates ``param`` and its optimizer state for ``N`` touched rows in one pass.
On the CPU the results are bit for bit those of ``torch.optim`` (its single-tensor code, the
default for CPU parameters): the same float32 operations in the same order.
The tensors are usually column views of one gathered ``(N, W)`` float32 buffer holding, per
row, the embedding followed by its optimizer state (the layout of a recis hash table row), so
one gather and one scatter move everything an update needs. Row-wise Adagrad and Adam also
update rows of a :class:`RowStore` where they live (``rowwise_adagrad_store_``,
``adam_store_``), with no gather and no scatter (``adam_store_`` then rounds its square roots
and per-row scalars as ``torch.optim.Adam``'s scalar code does: see there).

On CUDA tensors (contiguous float32) each update is one NVRTC kernel from ``cuda/optim.cu``;
elsewhere it is the torch code below, the reference in tests.

State that torch keeps per parameter (the step count used by bias correction and learning-rate
decay) is kept per row here: a row inserted late starts its own count at 1, exactly as if a torch
optimizer had been created for that row when it was inserted. Row counts are float32, exact up
to 2**24 updates of one row.

State layout per optimizer (``D`` = embedding dim), see :data:`STATE_WIDTH`:

=====================  =======================================  =========================
optimizer              state columns                            initial values
=====================  =======================================  =========================
``sgd``                none
``adagrad``            ``sum (D)``, ``step (1)``                ``initial_accumulator_value``, 0
``rowwise_adagrad``    ``sum (1)``                              0
``adam`` / ``adamw``   ``exp_avg (D)``, ``exp_avg_sq (D)``, ``step (1)``  0
``ftrl``               ``accum (D)``, ``linear (D)``            ``initial_accumulator_value``, 0
=====================  =======================================  =========================
"""

from __future__ import annotations

import itertools

import torch

from recis_kernels import _native
from recis_kernels._backend import on_host, use_cuda_kernels
from recis_kernels._checks import check_device, check_dtype, check_tensor, grid_for
from recis_kernels.exceptions import ArgumentError, ShapeError, UnsupportedDtypeError
from recis_kernels.ops.row_store import RowStore

__all__ = [
    "STATE_WIDTH",
    "adagrad_rows_",
    "adam_rows_",
    "adam_store_",
    "ftrl_rows_",
    "rowwise_adagrad_rows_",
    "rowwise_adagrad_store_",
    "sgd_rows_",
    "state_width",
]

#: State columns per row as ``(per-dim multiplier, extra columns)``.
STATE_WIDTH: dict[str, tuple[int, int]] = {
    "sgd": (0, 0),
    "adagrad": (1, 1),
    "rowwise_adagrad": (0, 1),
    "adam": (2, 1),
    "adamw": (2, 1),
    "ftrl": (2, 0),
}


def state_width(optimizer: str, dim: int) -> int:
    """Optimizer state columns per row for an embedding of ``dim`` columns.

    Raises:
        ArgumentError: ``optimizer`` is not a name in :data:`STATE_WIDTH`.
    """
    if not isinstance(optimizer, str) or optimizer not in STATE_WIDTH:
        raise ArgumentError(
            f"state_width: optimizer must be one of {', '.join(STATE_WIDTH)}, got {optimizer!r}"
        )
    per_dim, extra = STATE_WIDTH[optimizer]
    return per_dim * dim + extra


def _kernel(*tensors: torch.Tensor) -> bool:
    """Whether the NVRTC kernel can run: CUDA backend and contiguous float32 arguments."""
    first = tensors[0]
    if not use_cuda_kernels(first.device):
        return False
    # A tensor of another device must not reach the kernel (it would fault on its address);
    # the torch implementation raises torch's error naming the devices instead.
    return all(
        t.device == first.device and t.is_contiguous() and t.dtype == torch.float32 for t in tensors
    )


def _adam_scalars(
    step: torch.Tensor, lr: float, beta1: float, beta2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``-lr / (1 - beta1**step)`` and ``sqrt(1 - beta2**step)`` as ``(N, 1)`` float32
    columns (computed in float64, as torch computes them from its Python-float step)."""
    s = step.double()
    return _col(-lr / (1 - beta1**s)), _col((1 - beta2**s).sqrt())


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """``x.sqrt()`` as a new tensor, taken on a contiguous copy: the column view of a gathered
    row buffer takes torch's strided loop, about five times slower (26.7k rows of 8: 1.04 ms
    against 0.22 ms with the copy) for the same values."""
    c = x.contiguous()
    return c.sqrt_() if c is not x else c.sqrt()


def _host_rows(*tensors: torch.Tensor) -> bool:
    """Whether the compiled CPU update can run: eager, plain float32 CPU tensors, each row's
    elements consecutive (the column views of a gathered buffer are), no two the same."""
    if not on_host(tensors):
        return False
    for t in tensors:
        if t.dtype != torch.float32:
            return False
        rows, width = t.shape[0], t.shape[1] if t.dim() == 2 else 1
        # Rows must not overlap (an expanded gradient repeats one row with stride 0).
        if (width > 1 and t.stride(-1) != 1) or (rows > 1 and t.stride(0) < width):
            return False
    return len({t.data_ptr() for t in tensors}) == len(tensors)


def _launch(kernel: str, n: int, args: list) -> None:
    from recis_kernels._cuda import launch

    launch("optim", kernel, grid_for(n), 256, args, device=args[0][1].device)


def _check_shapes(
    op: str, param: torch.Tensor, grad: torch.Tensor, **state: tuple[torch.Tensor, str]
) -> None:
    """Refuse before anything is updated: a wrong shape would broadcast (one gradient row
    applied to every row) or fail half-way, with the step counts and moments already moved.
    ``state`` maps names to ``(tensor, "rows")`` for ``(N, D)`` and ``(tensor, "count")``
    for ``(N,)`` (``"sum"``: ``(N, 1)``)."""
    if not isinstance(param, torch.Tensor) or param.dim() != 2:
        got = tuple(param.shape) if isinstance(param, torch.Tensor) else type(param).__name__
        raise ShapeError(f"{op}: param must be (N, D) rows, got {got}")
    n = param.shape[0]
    wanted = {"rows": tuple(param.shape), "count": (n,), "sum": (n, 1)}
    for name, (t, kind) in {"grad": (grad, "rows"), **state}.items():
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != wanted[kind]:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ShapeError(f"{op}: {name} must have shape {wanted[kind]} for param of shape "
                             f"{tuple(param.shape)}, got {got}")  # fmt: skip
    # A float64 or integer gradient failed half-way (step counts already moved) or was
    # silently rounded: every tensor must be of the rows' floating dtype.
    if not param.is_floating_point():
        raise UnsupportedDtypeError(f"{op}: param must be float32 rows, got {param.dtype}")
    for name, (t, _) in {"grad": (grad, "rows"), **state}.items():
        if t.dtype != param.dtype:
            raise UnsupportedDtypeError(
                f"{op}: {name} must have the dtype of param ({param.dtype}), got {t.dtype}"
            )


def _col(values: torch.Tensor) -> torch.Tensor:
    # Per-row scalars computed in float64 (as torch computes its Python-float scalars), then
    # rounded to float32 the way torch rounds a Python scalar applied to a float32 tensor.
    return values.to(torch.float32)[:, None]


def sgd_rows_(
    param: torch.Tensor, grad: torch.Tensor, *, lr: float, weight_decay: float = 0.0
) -> None:
    """``torch.optim.SGD`` (no momentum) on rows.

    Args:
        param: ``(N, D) float32`` rows, updated in place.
        grad: ``(N, D) float32`` gradients.
        lr: learning rate.
        weight_decay: L2 penalty added to the gradient.
    """
    _check_shapes("sgd_rows_", param, grad)
    if _kernel(param, grad):
        n, d = param.shape
        _launch(
            "sgd_rows",
            n * d,
            [
                ("ptr", param),
                ("ptr", grad),
                ("i64", n),
                ("i64", d),
                ("f32", lr),
                ("f32", weight_decay),
            ],
        )
        return
    if weight_decay:
        grad = grad.add(param, alpha=weight_decay)
    param.add_(grad, alpha=-lr)


def adagrad_rows_(
    param: torch.Tensor,
    grad: torch.Tensor,
    state_sum: torch.Tensor,
    step: torch.Tensor,
    *,
    lr: float,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    eps: float = 1e-10,
) -> None:
    """``torch.optim.Adagrad`` on rows.

    Args:
        param: ``(N, D) float32`` rows, updated in place.
        grad: ``(N, D) float32`` gradients.
        state_sum: ``(N, D) float32`` running sums of squared gradients, updated in place.
        step: ``(N,) float32`` per-row update counts, incremented in place.
        lr: learning rate.
        lr_decay: learning-rate decay per row update.
        weight_decay: L2 penalty added to the gradient.
        eps: added to the root of the sum.
    """
    _check_shapes("adagrad_rows_", param, grad, state_sum=(state_sum, "rows"), step=(step, "count"))
    step.add_(1)
    if _kernel(param, grad, state_sum, step):
        n, d = param.shape
        _launch(
            "adagrad_rows",
            n * d,
            [
                ("ptr", param),
                ("ptr", grad),
                ("ptr", state_sum),
                ("ptr", step),
                ("i64", n),
                ("i64", d),
                ("f64", lr),
                ("f64", lr_decay),
                ("f32", weight_decay),
                ("f32", eps),
            ],
        )
        return
    if weight_decay:
        grad = grad.add(param, alpha=weight_decay)
    neg_clr = _col(-lr / (1 + (step.double() - 1) * lr_decay))
    state_sum.addcmul_(grad, grad, value=1)
    std = state_sum.sqrt().add_(eps)
    # torch's param.addcdiv_(grad, std, value=-clr) rounds param + (-clr * grad) / std in this
    # order (dividing first, as param - clr * (grad / std), was off by an ulp).
    param.add_(torch.mul(grad, neg_clr).div_(std))


def rowwise_adagrad_rows_(
    param: torch.Tensor,
    grad: torch.Tensor,
    state_sum: torch.Tensor,
    *,
    lr: float,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> None:
    """Row-wise Adagrad (one accumulator per row, as FBGEMM's ``EXACT_ROWWISE_ADAGRAD``).

    ``G += mean(g**2)`` over the row; ``param -= lr * g / (sqrt(G) + eps)``.

    Args:
        param: ``(N, D) float32`` rows, updated in place.
        grad: ``(N, D) float32`` gradients.
        state_sum: ``(N, 1) float32`` accumulators, updated in place.
        lr: learning rate.
        eps: added to the root of the accumulator.
        weight_decay: L2 penalty added to the gradient.
    """
    _check_shapes("rowwise_adagrad_rows_", param, grad, state_sum=(state_sum, "sum"))
    if _kernel(param, grad, state_sum):
        n, d = param.shape
        _launch(
            "rowwise_adagrad_rows",
            n,
            [
                ("ptr", param),
                ("ptr", grad),
                ("ptr", state_sum),
                ("i64", n),
                ("i64", d),
                ("f32", lr),
                ("f32", eps),
                ("f32", weight_decay),
            ],
        )
        return
    if weight_decay:
        grad = grad.add(param, alpha=weight_decay)
    state_sum.add_(grad.square().mean(dim=1, keepdim=True))
    # param + (-lr * grad) / denom: the same roundings as param - lr * grad / denom, in one pass.
    param.addcdiv_(grad, state_sum.sqrt().add_(eps), value=-lr)


def rowwise_adagrad_store_(
    store: RowStore,
    rows: torch.Tensor,
    grad: torch.Tensor,
    *,
    state: int,
    start: int = 0,
    lr: float,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> None:
    """:func:`rowwise_adagrad_rows_` on rows of a :class:`RowStore`, where they live.

    Row ``rows[i]`` holds its ``D`` parameters in columns ``[start, start + D)`` and its
    accumulator in column ``state``, and takes the gradient ``grad[i]``. On the CPU one compiled
    pass updates each row in place in its block (``_native.rowwise_adagrad_block_rows``): no
    gather of the rows into a buffer and no scatter back, which is what an update through
    :meth:`RowStore.update` pays for. Its sum of squares is accumulated in order, so results
    can differ from torch's vectorized mean in the last bit. Elsewhere (CUDA, or blocks that
    are not dense) the rows go through :meth:`RowStore.update` and
    :func:`rowwise_adagrad_rows_`.

    Args:
        store: a float32 row store.
        rows: ``(N,) int64`` distinct rows below ``store.capacity``.
        grad: ``(N, D) float32`` gradients.
        state: the accumulator's column.
        start: the first parameter column.
        lr: learning rate.
        eps: added to the root of the accumulator.
        weight_decay: L2 penalty added to the gradient.

    Raises:
        UnsupportedDtypeError: the store or ``grad`` is not float32, or ``rows`` not int64.
        ShapeError: ``grad`` is not ``(N, D)``, or the columns fall outside a row or overlap.
        UnsupportedDeviceError: ``rows`` or ``grad`` live on another device than the store.
        IndexOutOfRangeError: a row outside the store (nothing is updated).
    """
    op = "rowwise_adagrad_store_"
    d = _check_store_update(op, store, rows, grad)
    _check_columns(op, store.width, {"parameters": (start, d), "accumulator": (state, 1)})
    if rows.numel() == 0 or d == 0:
        return
    if store._host(rows) and on_host((grad,)):
        rows, grad = rows.contiguous(), grad.contiguous()
        _native.rowwise_adagrad_block_rows(
            *_in_store_args(store, rows, grad), (start, state), (lr, eps, weight_decay)
        )
        return
    low, high = min(start, state), max(start + d, state + 1)

    def update(current: torch.Tensor, which: torch.Tensor | None) -> torch.Tensor:
        g = grad if which is None else grad.index_select(0, which)
        param = current[:, start - low : start - low + d]
        acc = current[:, state - low : state - low + 1]
        rowwise_adagrad_rows_(param, g, acc, lr=lr, eps=eps, weight_decay=weight_decay)
        return current

    store.update(rows, update, low, high)


def adam_rows_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = False,
) -> None:
    """``torch.optim.Adam`` (``decoupled=False``) or ``torch.optim.AdamW`` on rows.

    Args:
        param: ``(N, D) float32`` rows, updated in place.
        grad: ``(N, D) float32`` gradients.
        exp_avg: ``(N, D) float32`` first moments, updated in place.
        exp_avg_sq: ``(N, D) float32`` second moments, updated in place.
        step: ``(N,) float32`` per-row update counts, incremented in place.
        lr: learning rate.
        beta1: first-moment decay.
        beta2: second-moment decay.
        eps: added to the bias-corrected root of the second moment.
        weight_decay: L2 penalty (Adam) or decoupled decay factor (AdamW).
        decoupled: AdamW's ``param *= 1 - lr * weight_decay`` instead of an L2 gradient term.
    """
    _check_shapes(
        "adam_rows_", param, grad, exp_avg=(exp_avg, "rows"), exp_avg_sq=(exp_avg_sq, "rows"),
        step=(step, "count"),
    )  # fmt: skip
    if _host_rows(param, grad, exp_avg, exp_avg_sq, step):
        # Compiled: the torch operations below, fused per element, in the same order, but for
        # the square roots of the second moments, which torch takes (its vectorized sqrt is
        # not correctly rounded on every CPU).
        n, d = param.shape
        hyper = _adam_hyper(lr, beta1, beta2, weight_decay, decoupled)
        views = (param, grad, exp_avg, exp_avg_sq, step)
        _native.adam_moments([(t.data_ptr(), t.stride(0)) for t in views], n, d, hyper)
        neg_step_size, bc2_sqrt = _adam_scalars(step, lr, beta1, beta2)
        views = (param, exp_avg, _sqrt(exp_avg_sq), neg_step_size, bc2_sqrt)
        _native.adam_apply([(t.data_ptr(), t.stride(0)) for t in views], n, d, eps)
        return
    step.add_(1)
    if _kernel(param, grad, exp_avg, exp_avg_sq, step):
        n, d = param.shape
        l2 = 0.0 if decoupled else weight_decay
        decay = 1 - lr * weight_decay if decoupled else 1.0
        _launch(
            "adam_rows",
            n * d,
            [
                ("ptr", param),
                ("ptr", grad),
                ("ptr", exp_avg),
                ("ptr", exp_avg_sq),
                ("ptr", step),
                ("i64", n),
                ("i64", d),
                ("f64", lr),
                ("f32", 1 - beta1),
                ("f32", beta2),
                ("f32", 1 - beta2),
                ("f64", beta1),
                ("f64", beta2),
                ("f32", eps),
                ("f32", l2),
                ("f32", decay),
            ],
        )
        return
    if weight_decay:
        if decoupled:
            param.mul_(1 - lr * weight_decay)
        else:
            grad = grad.add(param, alpha=weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    neg_step_size, bc2_sqrt = _adam_scalars(step, lr, beta1, beta2)
    # The same operations as torch's Adam on per-row scalars, in the same order: its
    # param.addcdiv_(exp_avg, denom, value=-step_size) rounds param + (-step_size * exp_avg) /
    # denom (dividing first, as param - step_size * (exp_avg / denom), was off by an ulp).
    denom = _sqrt(exp_avg_sq).div_(bc2_sqrt).add_(eps)
    param.add_(torch.div(torch.mul(exp_avg, neg_step_size), denom, out=denom))


def _check_store_update(op: str, store: RowStore, rows: torch.Tensor, grad: torch.Tensor) -> int:
    """Check an in-store update's store, rows and ``(N, D)`` float32 gradient; returns ``D``."""
    check_tensor(op, "grad", grad)
    check_dtype(op, "grad", grad, (torch.float32,))
    check_device(op, "grad", grad, store.device)
    if store.dtype != torch.float32:
        raise UnsupportedDtypeError(f"{op}: the store holds {store.dtype}, expected torch.float32")
    store._check_rows(op, rows)
    if grad.dim() != 2 or grad.shape[0] != rows.numel():
        raise ShapeError(
            f"{op}: grad has shape {tuple(grad.shape)}, expected ({rows.numel()}, D) for "
            f"{rows.numel()} rows"
        )
    return grad.shape[1]


def _in_store_args(
    store: RowStore, rows: torch.Tensor, grad: torch.Tensor
) -> tuple[list[int], int, int, int, int, int, int]:
    """What a compiled in-store update takes first: the blocks' addresses, rows per block as a
    power of two, the row width, and the addresses and sizes of the contiguous rows and
    ``(N, D)`` gradient (which the caller keeps alive through the call)."""
    blocks = [b.data_ptr() for b in store.blocks]
    n, d = grad.shape
    return (blocks, store.block_shift, store.width, rows.data_ptr(), n, grad.data_ptr(), d)


def _check_columns(op: str, width: int, spans: dict[str, tuple[int, int]]) -> None:
    """Raise :class:`ShapeError` unless every ``name: (first column, count)`` lies in a row of
    ``width`` columns, apart from the others."""
    ranges = sorted((c, c + w) for c, w in spans.values() if w)
    inside = all(c >= 0 and c + w <= width for c, w in spans.values())
    apart = all(a[1] <= b[0] for a, b in itertools.pairwise(ranges))
    if not (inside and apart):
        listed = ", ".join(f"{name} [{c}, {c + w})" for name, (c, w) in spans.items())
        raise ShapeError(f"{op}: {listed} must be separate columns of a row of {width}")


def _adam_hyper(
    lr: float, beta1: float, beta2: float, weight_decay: float, decoupled: bool
) -> tuple[float, float, float, float]:
    """``(beta1, beta2, l2, decay)`` as the compiled first half of Adam takes them."""
    l2 = 0.0 if decoupled else weight_decay
    return (beta1, beta2, l2, 1 - lr * weight_decay if decoupled else 1.0)


def adam_store_(
    store: RowStore,
    rows: torch.Tensor,
    grad: torch.Tensor,
    *,
    exp_avg: int,
    exp_avg_sq: int,
    step: int,
    start: int = 0,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = False,
) -> None:
    """:func:`adam_rows_` on rows of a :class:`RowStore`, where they live.

    Row ``rows[i]`` holds its ``D`` parameters in columns ``[start, start + D)``, its first and
    second moments in ``D`` columns from ``exp_avg`` and from ``exp_avg_sq``, and its update count
    in column ``step``, and takes the gradient ``grad[i]``.

    On the CPU one compiled pass updates each row in place in its block
    (``_native.adam_block_rows``), with no gather of the rows into a buffer and no scatter
    back: the operations of :func:`adam_rows_` in the same order, but for two roundings that
    follow ``torch.optim.Adam``'s scalar arithmetic rather than torch's vectorized kernels. The
    square roots of the second moments are correctly rounded (torch's vectorized float32
    ``sqrt`` is not on every CPU: with AVX-512 some of its roots are an ulp apart), and each
    row's step size and bias correction come from C's ``pow`` on its count, as Python computes
    ``beta ** step``. So a parameter can be an ulp or so from what :func:`adam_rows_` gives on
    the same rows (moments and counts are bit for bit the same for the same inputs; with Adam's
    L2 weight decay a later update adds those parameters to its gradients, so its moments can
    then be as far apart). Elsewhere (CUDA, or blocks
    that are not dense) the rows go through :meth:`RowStore.update` and :func:`adam_rows_`.

    Args:
        store: a float32 row store.
        rows: ``(N,) int64`` distinct rows below ``store.capacity``.
        grad: ``(N, D) float32`` gradients.
        exp_avg: the first column of the first moments.
        exp_avg_sq: the first column of the second moments.
        step: the update count's column.
        start: the first parameter column.
        lr: learning rate.
        beta1: first-moment decay.
        beta2: second-moment decay.
        eps: added to the bias-corrected root of the second moment.
        weight_decay: L2 penalty (Adam) or decoupled decay factor (AdamW).
        decoupled: AdamW's ``param *= 1 - lr * weight_decay`` instead of an L2 gradient term.

    Raises:
        UnsupportedDtypeError: the store or ``grad`` is not float32, or ``rows`` not int64.
        ShapeError: ``grad`` is not ``(N, D)``, or the columns fall outside a row or overlap.
        UnsupportedDeviceError: ``rows`` or ``grad`` live on another device than the store.
        IndexOutOfRangeError: a row outside the store (nothing is updated).
    """
    op = "adam_store_"
    d = _check_store_update(op, store, rows, grad)
    spans = {"parameters": (start, d), "exp_avg": (exp_avg, d), "exp_avg_sq": (exp_avg_sq, d)}
    spans["step"] = (step, 1)
    _check_columns(op, store.width, spans)
    if rows.numel() == 0 or d == 0:
        return
    if store._host(rows) and on_host((grad,)):
        rows, grad = rows.contiguous(), grad.contiguous()
        _native.adam_block_rows(
            *_in_store_args(store, rows, grad),
            (start, exp_avg, exp_avg_sq, step),
            _adam_hyper(lr, beta1, beta2, weight_decay, decoupled),
            lr,
            eps,
        )
        return
    cols = [c for c, _ in spans.values()]
    low, high = min(cols), max(c + w for c, w in spans.values())

    def update(current: torch.Tensor, which: torch.Tensor | None) -> torch.Tensor:
        g = grad if which is None else grad.index_select(0, which)

        def part(first: int, width: int) -> torch.Tensor:
            return current[:, first - low : first - low + width]

        adam_rows_(
            part(start, d), g, part(exp_avg, d), part(exp_avg_sq, d), part(step, 1)[:, 0],
            lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            decoupled=decoupled,
        )  # fmt: skip
        return current

    store.update(rows, update, low, high)


def ftrl_rows_(
    param: torch.Tensor,
    grad: torch.Tensor,
    accum: torch.Tensor,
    linear: torch.Tensor,
    *,
    lr: float,
    lr_power: float = -0.5,
    l1: float = 0.0,
    l2: float = 0.0,
    beta: float = 0.0,
) -> None:
    """FTRL-proximal (McMahan et al. 2013, TensorFlow's ``ApplyFtrl`` numerics) on rows.

    ``n' = n + g**2``; ``z += g - (n'**-p - n**-p) / lr * w``;
    ``w = (sign(z) * l1 - z) / ((beta + n'**-p) / lr + 2 * l2)`` where ``|z| > l1``, else 0,
    with ``p = lr_power``.

    Args:
        param: ``(N, D) float32`` rows, overwritten in place.
        grad: ``(N, D) float32`` gradients.
        accum: ``(N, D) float32`` squared-gradient accumulators ``n``, updated in place.
        linear: ``(N, D) float32`` linear terms ``z``, updated in place.
        lr: learning rate (alpha).
        lr_power: power of the accumulator in the per-coordinate rate (``-0.5``: square root).
        l1: L1 regularization strength.
        l2: L2 regularization strength.
        beta: the beta of the per-coordinate rate.
    """
    _check_shapes("ftrl_rows_", param, grad, accum=(accum, "rows"), linear=(linear, "rows"))
    if _kernel(param, grad, accum, linear):
        n, d = param.shape
        _launch(
            "ftrl_rows",
            n * d,
            [
                ("ptr", param),
                ("ptr", grad),
                ("ptr", accum),
                ("ptr", linear),
                ("i64", n),
                ("i64", d),
                ("f32", lr),
                ("f32", lr_power),
                ("f32", l1),
                ("f32", l2),
                ("f32", beta),
            ],
        )
        return
    accum_new = accum + grad * grad
    if lr_power == -0.5:
        root_new, root_old = accum_new.sqrt(), accum.sqrt()
    else:
        root_new, root_old = accum_new.pow(-lr_power), accum.pow(-lr_power)
    linear.add_(grad - (root_new - root_old) / lr * param)
    quadratic = (beta + root_new) / lr + 2 * l2
    shrunk = (torch.sign(linear) * l1 - linear) / quadratic
    param.copy_(torch.where(linear.abs() > l1, shrunk, torch.zeros_like(shrunk)))
    accum.copy_(accum_new)
