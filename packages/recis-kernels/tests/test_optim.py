from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import use_host_kernels

from recis_kernels import (
    ArgumentError,
    IndexOutOfRangeError,
    RowStore,
    ShapeError,
    UnsupportedDtypeError,
    adagrad_rows_,
    adam_rows_,
    adam_store_,
    ftrl_rows_,
    rowwise_adagrad_rows_,
    rowwise_adagrad_store_,
    sgd_rows_,
    state_width,
)

N, D, STEPS = 5, 4, 6


def _grads(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, D, generator=g) for _ in range(STEPS)]


def _torch_reference(cls, params: torch.Tensor, grads, **kw) -> torch.Tensor:
    p = torch.nn.Parameter(params.clone())
    opt = cls([p], **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("layout", ["row_views", "separate"])
def test_adam_matches_torch(weight_decay: float, decoupled: bool, layout: str) -> None:
    init = torch.randn(N, D, generator=torch.Generator().manual_seed(1))
    grads = _grads(2)
    if layout == "row_views":  # column views of one (N, 3D + 1) row buffer
        buf = torch.zeros(N, 3 * D + 1)
        buf[:, :D] = init
        param, m, v, step = buf[:, :D], buf[:, D : 2 * D], buf[:, 2 * D : 3 * D], buf[:, 3 * D]
    else:  # contiguous tensors: the layout the CUDA kernel takes
        param, m, v, step = init.clone(), torch.zeros(N, D), torch.zeros(N, D), torch.zeros(N)
    for g in grads:
        adam_rows_(
            param, g, m, v, step, lr=0.01, beta1=0.8, beta2=0.95, eps=1e-6,
            weight_decay=weight_decay, decoupled=decoupled,
        )  # fmt: skip
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    ref = _torch_reference(
        cls, init, grads, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay
    )
    torch.testing.assert_close(param, ref, rtol=1e-6, atol=1e-6)
    assert step.tolist() == [float(STEPS)] * N


@pytest.mark.parametrize("beta1", [0.9, 0.3])
def test_adam_kernel_moments_are_torchs_lerp(request, monkeypatch, beta1: float) -> None:
    # torch's lerp_ starts from the nearer end: beta1 <= 0.5 takes its other formula, which the
    # kernel took for the first (half of the first moments were an ulp off).
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(64, 16, generator=gen) for _ in range(3)]
    results = []
    for through_kernel in (False, True):
        with monkeypatch.context() as mp:
            if through_kernel:
                use_host_kernels(request.getfixturevalue("_host_kernels"), mp, ("optim",))
            param, grad, m = (t.clone() for t in init)
            v, step = init[0].abs(), torch.zeros(64)
            adam_rows_(param, grad, m, v, step, lr=0.01, beta1=beta1)
            results.append((m, v))
    (m_torch, v_torch), (m_kernel, v_kernel) = results
    assert torch.equal(m_kernel, m_torch)
    assert torch.equal(v_kernel, v_torch)


def test_adam_rows_keep_their_own_step() -> None:
    """A row first touched at global step 3 is bias-corrected as its own step 1."""
    init = torch.randn(2, D)
    g = torch.randn(2, D)
    buf = torch.zeros(2, 3 * D + 1)
    buf[:, :D] = init
    buf[0, 3 * D] = 2.0
    adam_rows_(
        buf[1:, :D], g[1:], buf[1:, D : 2 * D], buf[1:, 2 * D : 3 * D], buf[1:, 3 * D], lr=0.1
    )
    ref = _torch_reference(torch.optim.Adam, init[1:], [g[1:]], lr=0.1)
    torch.testing.assert_close(buf[1:, :D], ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("lr_decay", "weight_decay"), [(0.0, 0.0), (0.05, 0.1)])
def test_adagrad_matches_torch(lr_decay: float, weight_decay: float) -> None:
    init = torch.randn(N, D)
    grads = _grads(3)
    param, state = init.clone(), torch.full((N, D), 0.1)
    step = torch.zeros(N)
    for g in grads:
        adagrad_rows_(param, g, state, step, lr=0.05, lr_decay=lr_decay, weight_decay=weight_decay)
    ref = _torch_reference(
        torch.optim.Adagrad,
        init,
        grads,
        lr=0.05,
        lr_decay=lr_decay,
        weight_decay=weight_decay,
        initial_accumulator_value=0.1,
    )
    torch.testing.assert_close(param, ref, rtol=1e-6, atol=1e-6)


def test_sgd_matches_torch() -> None:
    init = torch.randn(N, D)
    grads = _grads(4)
    param = init.clone()
    for g in grads:
        sgd_rows_(param, g, lr=0.1, weight_decay=0.01)
    ref = _torch_reference(torch.optim.SGD, init, grads, lr=0.1, weight_decay=0.01)
    torch.testing.assert_close(param, ref, rtol=1e-6, atol=1e-6)


def test_rowwise_adagrad_matches_numpy() -> None:
    init = torch.randn(N, D)
    grads = _grads(5)
    param, state = init.clone(), torch.zeros(N, 1)
    p, G = init.double().numpy(), np.zeros((N, 1))
    for g in grads:
        rowwise_adagrad_rows_(param, g, state, lr=0.1, eps=1e-8, weight_decay=0.01)
        gd = g.double().numpy() + 0.01 * p
        G += (gd**2).mean(axis=1, keepdims=True)
        p = p - 0.1 * gd / (np.sqrt(G) + 1e-8)
    np.testing.assert_allclose(param.numpy(), p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.numpy(), G, rtol=1e-5)


@pytest.mark.parametrize(("l1", "l2", "beta"), [(0.0, 0.0, 0.0), (0.05, 0.1, 1.0)])
def test_ftrl_matches_numpy(l1: float, l2: float, beta: float) -> None:
    grads = _grads(6)
    param, accum, linear = torch.zeros(N, D), torch.full((N, D), 0.1), torch.zeros(N, D)
    w, n, z = np.zeros((N, D)), np.full((N, D), 0.1), np.zeros((N, D))
    lr = 0.5
    for g in grads:
        ftrl_rows_(param, g, accum, linear, lr=lr, l1=l1, l2=l2, beta=beta)
        gd = g.double().numpy()
        n_new = n + gd**2
        z += gd - (np.sqrt(n_new) - np.sqrt(n)) / lr * w
        n = n_new
        quad = (beta + np.sqrt(n)) / lr + 2 * l2
        w = np.where(np.abs(z) > l1, (np.sign(z) * l1 - z) / quad, 0.0)
    np.testing.assert_allclose(param.numpy(), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(linear.numpy(), z, rtol=1e-5, atol=1e-6)


def test_state_widths() -> None:
    assert [state_width(k, 8) for k in ("sgd", "adagrad", "rowwise_adagrad", "adam", "ftrl")] == [
        0,
        9,
        1,
        17,
        16,
    ]


@pytest.mark.parametrize("bad", ["lamb", ["sgd"], None])
def test_state_width_rejects_unknown_optimizers(bad) -> None:
    # A list raised a bare TypeError (unhashable), an unknown name a KeyError.
    with pytest.raises(ArgumentError, match=r"state_width: optimizer must be one of sgd, .*, got"):
        state_width(bad, 8)


def test_wrong_shapes_are_refused_before_anything_is_updated() -> None:
    # A (1, D) gradient broadcast to every row, and a step of N + 1 rows failed after the step
    # counts and moments had moved.
    param, m, v, step = torch.zeros(N, D), torch.zeros(N, D), torch.zeros(N, D), torch.zeros(N)
    cases = [
        (lambda: sgd_rows_(param, torch.ones(1, D), lr=1.0), r"sgd_rows_: grad must have shape"
         rf" \({N}, {D}\) for param of shape \({N}, {D}\), got \(1, {D}\)"),
        (lambda: sgd_rows_(param, torch.ones(D), lr=1.0), r"grad must have shape"),
        (lambda: sgd_rows_(param[0], torch.ones(D), lr=1.0),
         rf"sgd_rows_: param must be \(N, D\) rows, got \({D},\)"),
        (lambda: adam_rows_(param, torch.ones(N, D), m, v, torch.zeros(N + 1), lr=0.1),
         rf"adam_rows_: step must have shape \({N},\) for param of shape \({N}, {D}\), "
         rf"got \({N + 1},\)"),
        (lambda: adam_rows_(param, torch.ones(N, D), m[:1], v, step, lr=0.1),
         r"adam_rows_: exp_avg must have shape"),
        (lambda: adagrad_rows_(param, torch.ones(N, D), torch.zeros(1, D), step, lr=0.1),
         r"adagrad_rows_: state_sum must have shape"),
        (lambda: rowwise_adagrad_rows_(param, torch.ones(N, D), torch.zeros(N), lr=0.1),
         rf"rowwise_adagrad_rows_: state_sum must have shape \({N}, 1\)"),
        (lambda: ftrl_rows_(param, torch.ones(N, D), m, torch.zeros(N, 1), lr=0.1),
         r"ftrl_rows_: linear must have shape"),
    ]  # fmt: skip
    for call, message in cases:
        with pytest.raises(ShapeError, match=message):
            call()
    for t in (param, m, v, step):
        assert not t.any()  # nothing moved


def test_wrong_dtypes_are_refused_before_anything_is_updated() -> None:
    # A float64 gradient failed in Adam's lerp_ after the step counts had moved (a retry then
    # bias-corrected for one step too many); other updates rounded it silently.
    param, m, v, step = torch.zeros(N, D), torch.zeros(N, D), torch.zeros(N, D), torch.zeros(N)
    wide, ints = torch.ones(N, D, dtype=torch.float64), torch.ones(N, D, dtype=torch.int64)
    cases = [
        (lambda: adam_rows_(param, wide, m, v, step, lr=0.1),
         r"adam_rows_: grad must have the dtype of param \(torch.float32\), got torch.float64"),
        (lambda: adam_rows_(param, ints, m, v, step, lr=0.1), r"got torch.int64"),
        (lambda: adam_rows_(param, torch.ones(N, D), m, v, step.double(), lr=0.1),
         r"adam_rows_: step must have the dtype of param"),
        (lambda: adagrad_rows_(param, wide, torch.zeros(N, D), step, lr=0.1),
         r"adagrad_rows_: grad must have the dtype"),
        (lambda: rowwise_adagrad_rows_(param, wide, torch.zeros(N, 1), lr=0.1),
         r"rowwise_adagrad_rows_: grad must have the dtype"),
        (lambda: ftrl_rows_(param, wide, m, v, lr=0.1), r"ftrl_rows_: grad must have the dtype"),
        (lambda: sgd_rows_(param.long(), ints, lr=1.0),
         r"sgd_rows_: param must be float32 rows, got torch.int64"),
    ]  # fmt: skip
    for call, message in cases:
        with pytest.raises(UnsupportedDtypeError, match=message):
            call()
    for t in (param, m, v, step):
        assert not t.any()  # nothing moved


@pytest.mark.parametrize("beta1", [0.9, 0.3])
@pytest.mark.parametrize(("weight_decay", "decoupled"), [(0.0, False), (0.1, False), (0.1, True)])
def test_compiled_adam_is_the_torch_spelling_bit_for_bit(
    monkeypatch, beta1: float, weight_decay: float, decoupled: bool
) -> None:
    """On CPU tensors adam_rows_ runs compiled; it must round every operation as the torch
    spelling does (which is torch.optim's single-tensor Adam)."""
    from recis_kernels.ops import optim

    gen = torch.Generator().manual_seed(5)
    init = torch.randn(200, 3 * D + 1, generator=gen) * 0.1
    init[:, 2 * D : 3 * D].abs_()
    init[:, 3 * D] = torch.randint(0, 50, (200,), generator=gen).float()
    grads = [torch.randn(200, D, generator=gen) * 10 ** float(k - 2) for k in range(4)]
    results = []
    for compiled in (True, False):
        buf = init.clone()
        param, m, v, step = buf[:, :D], buf[:, D : 2 * D], buf[:, 2 * D : 3 * D], buf[:, 3 * D]
        with monkeypatch.context() as mp:
            if not compiled:
                mp.setattr(optim, "_host_rows", lambda *tensors: False)
            for g in grads:
                adam_rows_(
                    param, g, m, v, step, lr=0.003, beta1=beta1, beta2=0.99, eps=1e-7,
                    weight_decay=weight_decay, decoupled=decoupled,
                )  # fmt: skip
        results.append(buf)
    assert torch.equal(results[0], results[1])


def test_adam_takes_an_expanded_gradient() -> None:
    """One gradient row repeated for every row (stride 0) goes through the torch operations."""
    param, m, v, step = torch.ones(4, D), torch.zeros(4, D), torch.zeros(4, D), torch.zeros(4)
    grad = torch.arange(D, dtype=torch.float32)[None].expand(4, D)
    adam_rows_(param, grad, m, v, step, lr=0.1)
    ref_m = torch.zeros(4, D)
    ref_m.lerp_(grad.contiguous(), 0.1)
    assert torch.equal(m, ref_m)
    assert step.tolist() == [1.0] * 4


def _store_with_state(rows: int, d: int, seed: int) -> RowStore:
    """A store of ``rows`` rows in blocks of 4: ``d`` parameters, a spare column, the
    accumulator (positive), another spare column."""
    store = RowStore(d + 3, block_rows=4)
    store.reserve(rows)
    gen = torch.Generator().manual_seed(seed)
    for block in store.blocks:
        block.copy_(torch.randn(block.shape, generator=gen))
        block[:, d + 1].abs_()
    return store


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("compiled", [True, False])
def test_rowwise_adagrad_store_updates_rows_where_they_live(
    weight_decay: float, compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rows across three blocks, out of order. Without the compiled pass (a store it cannot
    # take, such as one of strided blocks) the update goes through RowStore.update and
    # rowwise_adagrad_rows_.
    d = 5
    store = _store_with_state(12, d, seed=3)
    if not compiled:
        monkeypatch.setattr(store, "_host", lambda rows: False)
    before = torch.cat(list(store.blocks))
    rows = torch.tensor([9, 2, 5, 11, 0])
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(rows.numel(), d, generator=gen) for _ in range(3)]
    param, acc = before[rows, :d].clone(), before[rows, d + 1 :].narrow(1, 0, 1).clone()
    for g in grads:
        rowwise_adagrad_store_(
            store, rows, g, start=0, state=d + 1, lr=0.1, weight_decay=weight_decay
        )
        rowwise_adagrad_rows_(param, g, acc, lr=0.1, weight_decay=weight_decay)
    after = torch.cat(list(store.blocks))
    torch.testing.assert_close(after[rows, :d], param, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(after[rows, d + 1 : d + 2], acc, rtol=1e-6, atol=1e-6)
    # The spare columns and the rows not listed are untouched.
    assert torch.equal(after[:, d], before[:, d])
    assert torch.equal(after[:, d + 2], before[:, d + 2])
    others = torch.tensor([r for r in range(12) if r not in rows.tolist()])
    assert torch.equal(after[others], before[others])


def _adam_store(rows: int, d: int, seed: int, *, adjacent: bool) -> tuple[RowStore, dict]:
    """A store of ``rows`` rows in blocks of 4 with Adam's columns: parameters, first moments,
    a spare column, second moments (positive), then the count (right after them or after one
    more spare column); counts are small whole numbers, as rows touched a few times have."""
    cols = {"start": 0, "exp_avg": d, "exp_avg_sq": 2 * d + 1}
    cols["step"] = 3 * d + 1 if adjacent else 3 * d + 2
    store = RowStore(cols["step"] + 2, block_rows=4)
    store.reserve(rows)
    gen = torch.Generator().manual_seed(seed)
    for block in store.blocks:
        block.copy_(torch.randn(block.shape, generator=gen) * 0.1)
        block[:, cols["exp_avg_sq"] : cols["exp_avg_sq"] + d].abs_()
        block[:, cols["step"]] = torch.randint(0, 5, (block.shape[0],), generator=gen).float()
    return store, cols


@pytest.mark.parametrize("adjacent", [True, False])
@pytest.mark.parametrize(("weight_decay", "decoupled"), [(0.0, False), (0.1, False), (0.1, True)])
@pytest.mark.parametrize("beta1", [0.9, 0.3])
def test_adam_store_updates_rows_where_they_live(
    adjacent: bool, weight_decay: float, decoupled: bool, beta1: float
) -> None:
    # The compiled in-store pass against the same update through RowStore.update (rows
    # gathered, adam_rows_ on their column views, scattered back), across blocks, rows out of
    # order: moments and counts bit for bit, parameters within the roundings in which the two
    # differ (each root correctly rounded in the pass, torch's vectorized one in adam_rows_).
    d = 5
    store, cols = _adam_store(14, d, seed=6, adjacent=adjacent)
    reference = RowStore(store.width, block_rows=4)
    reference.reserve(14)
    for mine, theirs in zip(store.blocks, reference.blocks, strict=True):
        theirs.copy_(mine)
    reference._host = lambda rows: False  # type: ignore[method-assign]
    before = torch.cat(list(store.blocks))
    rows = torch.tensor([9, 2, 13, 5, 11, 0])
    gen = torch.Generator().manual_seed(7)
    kw = {"lr": 0.01, "beta1": beta1, "beta2": 0.99, "eps": 1e-7, "weight_decay": weight_decay,
          "decoupled": decoupled}  # fmt: skip
    for k in range(3):
        g = torch.randn(rows.numel(), d, generator=gen) * 10.0 ** (k - 1)
        adam_store_(store, rows, g, **cols, **kw)
        adam_store_(reference, rows, g, **cols, **kw)
    after, want = torch.cat(list(store.blocks)), torch.cat(list(reference.blocks))
    assert torch.equal(after[:, d:], want[:, d:])
    torch.testing.assert_close(after[:, :d], want[:, :d], rtol=1e-6, atol=1e-7)
    assert torch.equal(after[rows, cols["step"]], before[rows, cols["step"]] + 3)
    assert not torch.equal(after[rows, :d], before[rows, :d])
    others = torch.tensor([r for r in range(14) if r not in rows.tolist()])
    assert torch.equal(after[others], before[others])
    assert torch.equal(after[:, 2 * d], before[:, 2 * d])  # the spare column


def test_adam_store_refuses_bad_input_before_updating() -> None:
    d = 3
    store, cols = _adam_store(8, d, seed=8, adjacent=True)
    before = [b.clone() for b in store.blocks]
    rows, grad = torch.tensor([1, 2]), torch.ones(2, d)
    cases = [
        (lambda: adam_store_(store, rows, grad.double(), **cols, lr=0.1),
         UnsupportedDtypeError, "adam_store_: grad"),
        (lambda: adam_store_(store, rows, torch.ones(3, d), **cols, lr=0.1),
         ShapeError, r"grad has shape \(3, 3\), expected \(2, D\)"),
        (lambda: adam_store_(store, rows, grad, **(cols | {"exp_avg": 2}), lr=0.1),
         ShapeError, r"parameters \[0, 3\), exp_avg \[2, 5\), exp_avg_sq \[7, 10\), step "
                     r"\[10, 11\) must be separate columns of a row of 12"),
        (lambda: adam_store_(store, rows, grad, **(cols | {"step": 12}), lr=0.1),
         ShapeError, r"step \[12, 13\) must be separate columns of a row of 12"),
        (lambda: adam_store_(store, torch.tensor([1, 8]), grad, **cols, lr=0.1),
         IndexOutOfRangeError, "adam_store_"),
    ]  # fmt: skip
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    for b, was in zip(store.blocks, before, strict=True):
        assert torch.equal(b, was)  # nothing moved


def test_compiled_store_updates_refuse_columns_that_wrap_around() -> None:
    # The bindings check their columns themselves (the Python checks stand in front of them):
    # a first column near 2**64 must not wrap into the row and write outside it.
    from recis_kernels import _native

    d = 3
    store, _ = _adam_store(8, d, seed=9, adjacent=True)
    before = [b.clone() for b in store.blocks]
    rows, grad = torch.tensor([1, 2]), torch.ones(2, d)
    layout = ([b.data_ptr() for b in store.blocks], store.block_shift, store.width)
    args = (*layout, rows.data_ptr(), 2, grad.data_ptr(), d)
    far = (1 << 64) - 2
    with pytest.raises(ValueError, match="adam_block_rows: columns"):
        _native.adam_block_rows(*args, (far, d, 2 * d + 1, 3 * d + 1), (0.9, 0.99, 0.0, 1.0),
                                0.1, 1e-8)  # fmt: skip
    with pytest.raises(ValueError, match="rowwise_adagrad_block_rows: columns"):
        _native.rowwise_adagrad_block_rows(*args, (0, far), (0.1, 1e-8, 0.0))
    for b, was in zip(store.blocks, before, strict=True):
        assert torch.equal(b, was)


def test_rowwise_adagrad_store_refuses_bad_input_before_updating() -> None:
    d = 4
    store = _store_with_state(8, d, seed=5)
    before = [b.clone() for b in store.blocks]
    rows, grad = torch.tensor([1, 2]), torch.ones(2, d)
    cases = [
        (
            lambda: rowwise_adagrad_store_(store, rows, grad.double(), state=d + 1, lr=0.1),
            UnsupportedDtypeError,
            "rowwise_adagrad_store_: grad",
        ),
        (
            lambda: rowwise_adagrad_store_(store, rows, torch.ones(3, d), state=d + 1, lr=0.1),
            ShapeError,
            r"grad has shape \(3, 4\), expected \(2, D\)",
        ),
        (
            lambda: rowwise_adagrad_store_(store, rows, grad, state=2, lr=0.1),
            ShapeError,
            r"rowwise_adagrad_store_: parameters \[0, 4\), accumulator \[2, 3\) must be "
            r"separate columns of a row of 7",
        ),
        (
            lambda: rowwise_adagrad_store_(store, rows, grad, start=4, state=0, lr=0.1),
            ShapeError,
            r"parameters \[4, 8\), accumulator \[0, 1\) must be separate columns of a row of 7",
        ),
        (
            lambda: rowwise_adagrad_store_(store, torch.tensor([1, 8]), grad, state=d + 1, lr=0.1),
            IndexOutOfRangeError,
            "rowwise_adagrad_store_",
        ),
        (
            lambda: rowwise_adagrad_store_(
                RowStore(d + 3, torch.float64), rows, grad, state=d + 1, lr=0.1
            ),
            UnsupportedDtypeError,
            "the store holds torch.float64",
        ),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    assert all(torch.equal(a, b) for a, b in zip(store.blocks, before, strict=True))
