from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from recis_kernels import (
    ArgumentError,
    IndexOutOfRangeError,
    ShapeError,
    UnsupportedDtypeError,
    pooled_rows_grad,
)
from recis_kernels.ops import pooled_grad as pooled_module


def _sorted_reference(grad_out, inverse, num_rows, bags, weights):
    """The sort-based spelling: ids grouped by row with a stable sort, then one
    ``embedding_bag`` sum per row over the bags' gradients."""
    n = inverse.numel()
    seg = (
        torch.arange(n)
        if bags is None
        else torch.repeat_interleave(torch.arange(bags.numel() - 1), bags[1:] - bags[:-1])
    )
    order = torch.argsort(inverse, stable=True)
    offsets = torch.zeros(num_rows + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(inverse, minlength=num_rows), 0, out=offsets[1:])
    w = None if weights is None else weights[order]
    return F.embedding_bag(
        seg[order], grad_out, offsets, mode="sum", per_sample_weights=w, include_last_offset=True
    )


@st.composite
def pooled_lookups(draw):
    rows = draw(st.integers(1, 12))
    d = draw(st.integers(1, 9))
    lengths = draw(st.lists(st.integers(0, 5), max_size=20))
    n = sum(lengths)
    with_bags = draw(st.booleans())
    if not with_bags:
        lengths = [1] * n
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(len(lengths), d, generator=gen)
    inverse = torch.randint(0, rows, (n,), generator=gen)
    bags = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0, out=bags[1:])
    weights = torch.randn(n, generator=gen) if draw(st.booleans()) else None
    return grad_out, inverse, rows, bags if with_bags else None, weights


@settings(max_examples=80, deadline=None, derandomize=True)
@given(pooled_lookups())
def test_pooled_rows_grad_matches_the_sorted_spelling(case) -> None:
    grad_out, inverse, rows, bags, weights = case
    got = pooled_rows_grad(grad_out, inverse, rows, bags=bags, weights=weights)
    assert got.shape == (rows, grad_out.shape[1])
    want = _sorted_reference(grad_out, inverse, rows, bags, weights)
    if weights is None:
        # The same additions in the same order: equal to the bit.
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        pooled_module._torch(grad_out, inverse, rows, bags, weights), want, rtol=1e-6, atol=1e-6
    )


def test_pooled_rows_grad_example_and_gradient_of_the_gradient() -> None:
    grad_out = torch.tensor([[1.0], [10.0]])
    got = pooled_rows_grad(grad_out, torch.tensor([1, 0, 1]), 2, bags=torch.tensor([0, 2, 3]))
    assert got.tolist() == [[1.0], [11.0]]
    # A grad_out that needs a gradient takes the torch spelling, which carries one.
    g = grad_out.clone().requires_grad_(True)
    out = pooled_rows_grad(g, torch.tensor([1, 0, 1]), 2, bags=torch.tensor([0, 2, 3]))
    out.sum().backward()
    assert g.grad.tolist() == [[2.0], [1.0]]


def test_pooled_rows_grad_refuses_bad_input() -> None:
    g, inv, bags = torch.ones(2, 3), torch.tensor([0, 1, 1]), torch.tensor([0, 1, 3])
    cases = [
        (
            lambda: pooled_rows_grad(g.double(), inv, 2, bags=bags),
            UnsupportedDtypeError,
            "pooled_rows_grad: grad_out",
        ),
        (
            lambda: pooled_rows_grad(g, inv.int(), 2, bags=bags),
            UnsupportedDtypeError,
            "pooled_rows_grad: inverse",
        ),
        (
            lambda: pooled_rows_grad(g, inv, 2, bags=bags[:2]),
            ShapeError,
            r"bags has 2 offsets, expected 3 for 2 bags",
        ),
        (
            lambda: pooled_rows_grad(g, inv, 2),
            ShapeError,
            r"grad_out has 2 rows, expected one per id \(3\) without bags",
        ),
        (
            lambda: pooled_rows_grad(g, inv, 2, bags=torch.tensor([0, 1, 2])),
            ShapeError,
            "bag offsets run from 0 to 2, expected 0 to 3",
        ),
        (
            lambda: pooled_rows_grad(torch.ones(3, 3), inv, 2, bags=torch.tensor([0, 2, 1, 3])),
            ShapeError,
            "bag offsets decrease at 2: 2 then 1",
        ),
        (
            lambda: pooled_rows_grad(g, inv, 2, bags=bags, weights=torch.ones(2)),
            ShapeError,
            r"weights has shape \(2,\), expected \(3,\)",
        ),
        (
            lambda: pooled_rows_grad(g, torch.tensor([0, 2, 1]), 2, bags=bags),
            IndexOutOfRangeError,
            r"inverse\[1\] = 2 is outside the 2 rows",
        ),
        (
            lambda: pooled_rows_grad(g, torch.tensor([0, -1, 1]), 2, bags=bags),
            IndexOutOfRangeError,
            r"inverse\[1\] = -1 is outside the 2 rows",
        ),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


@pytest.mark.parametrize("variant", ["plain", "grad_out needs grad", "weights need grad", "D=0"])
def test_pooled_rows_grad_checks_alike_on_every_cpu_path(variant: str) -> None:
    # Tensors needing a gradient take the torch spelling, rows of width 0 no pass at all:
    # both failed with torch's errors (or none) where the compiled pass names the problem.
    d = 0 if variant == "D=0" else 3

    def call(inverse, bags, n_rows=2):
        g = torch.ones(bags.numel() - 1, d, requires_grad=variant == "grad_out needs grad")
        w = torch.ones(inverse.numel(), requires_grad=variant == "weights need grad")
        return pooled_rows_grad(g, inverse, n_rows, bags=bags, weights=w)

    inv = torch.tensor([0, 1, 1])
    assert call(inv, torch.tensor([0, 2, 3])).shape == (2, d)
    cases = [
        (inv, torch.tensor([0, 1, 2]), ShapeError, "bag offsets run from 0 to 2, expected 0 to 3"),
        (inv, torch.tensor([0, 4, 3]), ShapeError, "bag offsets decrease at 2: 4 then 3"),
        (inv, torch.tensor([1, 1, 3]), ShapeError, "bag offsets run from 1 to 3, expected 0 to 3"),
        (
            torch.tensor([0, 0, 5]),
            torch.tensor([0, 2, 3]),
            IndexOutOfRangeError,
            r"pooled_rows_grad: inverse\[2\] = 5 is outside the 2 rows",
        ),
    ]
    for inverse, bags, error, message in cases:
        with pytest.raises(error, match=message):
            call(inverse, bags)


def test_pooled_rows_grad_takes_numpy_row_counts_and_refuses_bools() -> None:
    import numpy as np

    g, inv = torch.ones(3, 2), torch.tensor([0, 1, 1])
    assert pooled_rows_grad(g, inv, np.int64(2)).shape == (2, 2)
    with pytest.raises(ArgumentError, match="num_rows must be an int >= 0, got True"):
        pooled_rows_grad(g, inv, True)


def test_pooled_rows_grad_of_no_ids_is_zeros() -> None:
    got = pooled_rows_grad(
        torch.ones(2, 4),
        torch.zeros(0, dtype=torch.int64),
        3,
        bags=torch.zeros(3, dtype=torch.int64),
    )
    assert torch.equal(got, torch.zeros(3, 4))


def test_pooled_rows_grad_on_device(device: torch.device) -> None:
    grad_out = torch.tensor([[1.0, 2.0], [10.0, 20.0]], device=device)
    got = pooled_rows_grad(
        grad_out,
        torch.tensor([1, 0, 1], device=device),
        2,
        bags=torch.tensor([0, 2, 3], device=device),
        weights=torch.tensor([1.0, 2.0, 0.5], device=device),
    )
    assert got.cpu().tolist() == [[2.0, 4.0], [6.0, 12.0]]
