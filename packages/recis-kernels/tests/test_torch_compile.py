"""Ops with static output shapes trace into one torch.compile graph (no graph break)."""

from __future__ import annotations

import torch

import recis_kernels as rk


def pipeline(ids, other, rows, offsets, data, data_offsets):
    return (
        rk.fused_mod([ids, other], [7, 11]),
        rk.mix64(ids),
        rk.multi_hash(ids, [3, 0]),
        rk.hash_bytes(data, data_offsets, "farm", 100),
        rk.fused_bucketize([rows[:, 0]], [[0.0, 1.0]]),
        rk.segment_reduce(rows, offsets, None, "sqrtn"),
    )


def test_fullgraph_matches_eager():
    ids = torch.tensor([1, -1, 5, (1 << 63) - 1])
    rows = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    offsets = torch.tensor([0, 1, 4])
    data = torch.tensor(list(b"abcdefgh"), dtype=torch.uint8)
    data_offsets = torch.tensor([0, 2, 8])
    args = (ids, ids * 3, rows, offsets, data, data_offsets)
    compiled = torch.compile(pipeline, backend="eager", fullgraph=True)
    got = compiled(*args)
    expected = pipeline(*args)
    assert torch.equal(got[0][0], expected[0][0])
    assert torch.equal(got[0][1], expected[0][1])
    for g, e in zip(got[1:5], expected[1:5], strict=True):
        assert torch.equal(
            g if isinstance(g, torch.Tensor) else g[0], e if isinstance(e, torch.Tensor) else e[0]
        )
    torch.testing.assert_close(got[5], expected[5])


def test_fullgraph_backward():
    rows = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([0, 2, 5])
    compiled = torch.compile(
        lambda r: rk.segment_reduce(r, offsets, None, "mean"), backend="eager", fullgraph=True
    )
    compiled(rows).sum().backward()
    assert torch.allclose(
        rows.grad, torch.tensor([[0.5] * 2] * 2 + [[1 / 3] * 2] * 3, dtype=torch.float64)
    )


def test_hashing_python_strings_inside_a_compiled_function() -> None:
    # The strings are packed outside the graph; tracing the packing's NumPy calls failed
    # under torch 2.6 (an AssertionError in Dynamo's wrap_numpy_ndarray).
    def hashed(words: list[str]) -> torch.Tensor:
        return rk.hash_strings(words, "farm", 100) + 1

    words = ["ab", "xyz", ""]
    torch._dynamo.reset()
    assert torch.equal(torch.compile(hashed, backend="eager")(words), hashed(words))
