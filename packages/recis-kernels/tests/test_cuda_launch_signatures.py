"""The CUDA launch code of every op, checked against its kernel's real signature without a GPU.

Each op's ``_<op>_cuda`` function runs on CPU tensors with ``launch`` replaced by a checker that
compiles the kernel to PTX and verifies that the kernel exists and that the launch passes exactly
its parameters, with matching sizes. A mismatch here would corrupt arguments on a GPU.
"""

from __future__ import annotations

import contextlib
import re
from functools import cache

import pytest
import torch
from cuda.bindings import nvrtc

import recis_kernels as rk
import recis_kernels._cuda as cuda_pkg
from recis_kernels._cuda import compiler
from recis_kernels.ops import (
    bucketize,
    dense,
    feature_cross,
    hash_table,
    hashing,
    mix,
    mod,
    row_store,
    segment_reduce,
    truncate,
)

_KIND_BITS = {"ptr": 64, "i64": 64, "u64": 64, "f64": 64, "i32": 32, "f32": 32}
_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\(([^)]*)\)", re.S)
_PARAM = re.compile(r"\.param\s+\.(?:[a-z]+?)(\d+)")


@cache
def ptx_signatures(name: str) -> dict[str, list[int]]:
    """Kernel name -> parameter sizes in bits, from the PTX NVRTC generates."""
    source = (compiler._source_dir() / f"{name}.cu").read_bytes()
    headers = compiler._headers()
    err, prog = nvrtc.nvrtcCreateProgram(
        source, name.encode(), len(headers), list(headers.values()), [h.encode() for h in headers]
    )
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    opts = [b"--gpu-architecture=compute_80", b"-std=c++17"]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    _, size = nvrtc.nvrtcGetPTXSize(prog)
    buf = bytearray(size)
    nvrtc.nvrtcGetPTX(prog, buf)
    nvrtc.nvrtcDestroyProgram(prog)
    ptx = bytes(buf).decode()
    return {m.group(1): [int(b) for b in _PARAM.findall(m.group(2))] for m in _ENTRY.finditer(ptx)}


class LaunchChecker:
    def __init__(self) -> None:
        self.launched: list[str] = []

    def __call__(self, module_name, kernel, grid, block, args, *, device, shared_mem=0):
        signatures = ptx_signatures(module_name)
        assert kernel in signatures, (
            f"{module_name}.cu has no kernel {kernel!r}: {sorted(signatures)}"
        )
        expected = signatures[kernel]
        got = [_KIND_BITS[kind] for kind, _ in args]
        assert got == expected, f"{kernel}: launch passes {got}, kernel takes {expected}"
        for kind, value in args:
            if isinstance(value, torch.Tensor):
                assert kind == "ptr"
                assert value.is_contiguous()
        grid_x = grid if isinstance(grid, int) else grid[0]
        assert 0 < grid_x < 2**31
        self.launched.append(kernel)


@pytest.fixture
def checker(monkeypatch):
    c = LaunchChecker()
    monkeypatch.setattr(cuda_pkg, "launch", c)
    return c


def test_mod_launch(checker):
    mod._fused_mod_cuda(torch.tensor([1, 2, 3]), [1, 2], [3, 4])
    assert checker.launched == ["fused_mod"]


def test_hash_launch(checker):
    data = torch.tensor(list(b"abcd"), dtype=torch.uint8)
    hashing._hash_bytes_cuda(data, torch.tensor([0, 1, 4]), "murmur", 7)
    assert checker.launched == ["hash_bytes"]


def test_mix_launches(checker, monkeypatch):
    monkeypatch.setattr(mix, "use_cuda_kernels", lambda device: True)
    mix._mix64_op(torch.tensor([1, 2]))
    mix._multi_hash_op(torch.tensor([1, 2]), [3, 0])
    mix._hashed_uniform_op(torch.tensor([1, 2]), torch.tensor([5]), 3)
    assert checker.launched == ["mix64", "multi_hash", "hashed_uniform"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_bucketize_launch(checker, dtype):
    xs = torch.tensor([1, 2, 3], dtype=dtype)
    bucketize._fused_bucketize_cuda(xs, [2, 1], torch.tensor([1, 2], dtype=dtype), [1, 1])
    assert checker.launched == [f"fused_bucketize_{'f64' if dtype.is_floating_point else 'i64'}"]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32, torch.int64])
def test_dense_launches(checker, dtype):
    r2 = rk.RaggedTensor(torch.ones(3, 2, dtype=dtype), torch.tensor([0, 1, 3]))
    pad = torch.tensor(0, dtype=dtype)
    dense._ragged_to_dense_cuda(r2.values, r2.offsets, pad, [2])
    r3 = rk.RaggedTensor(
        torch.ones(3, dtype=dtype), [torch.tensor([0, 2, 2]), torch.tensor([0, 1, 3])]
    )
    dense._ragged_to_dense_cuda(r3.values, r3.offsets, pad, [2, 2])
    suffix = {1: "w1", 2: "w2", 4: "w4", 8: "w8"}[torch.tensor([], dtype=dtype).element_size()]
    assert checker.launched == [f"ragged_to_dense2_{suffix}", f"ragged_to_dense3_{suffix}"]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32, torch.int64])
def test_dense_to_ragged_launches(checker, dtype):
    dense._dense_to_ragged_cuda(torch.ones(2, 3, dtype=dtype), [torch.tensor([0, 1, 3])])
    dense._dense_to_ragged_cuda(
        torch.ones(2, 2, 3, dtype=dtype), [torch.tensor([0, 2, 3]), torch.tensor([0, 1, 3, 4])]
    )
    suffix = {1: "w1", 2: "w2", 4: "w4", 8: "w8"}[torch.tensor([], dtype=dtype).element_size()]
    assert checker.launched == [f"dense_to_ragged2_{suffix}", f"dense_to_ragged3_{suffix}"]


def test_cross_launch(checker):
    v, o, w = torch.tensor([1, 2]), torch.tensor([0, 2]), torch.ones(2)
    feature_cross._cross_cuda(v, o, w, v, o, w)
    assert checker.launched == ["feature_cross"]


def test_truncate_launch(checker):
    truncate._truncate_index_cuda(
        torch.tensor([0, 3, 4]), torch.tensor([2, 2]), torch.tensor([True, False])
    )
    assert checker.launched == ["truncate_index"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["sum", "mean", "sqrtn", "tile"])
def test_segment_reduce_launches(checker, dtype, mode):
    rows = torch.ones(4, 3, dtype=dtype)
    off = torch.tensor([0, 1, 4])
    tile = 2 if mode == "tile" else 0
    out = torch.empty(2, 3 * max(tile, 1), dtype=dtype)
    for weights in (None, torch.ones(4)):
        segment_reduce._launch("fwd", rows, off, weights, mode, tile, 3, out)
        segment_reduce._launch("bwd", out, off, weights, mode, tile, 3, rows)
    suffix = "f32" if dtype == torch.float32 else "f64"
    assert checker.launched == [f"segment_reduce_fwd_{suffix}", f"segment_reduce_bwd_{suffix}"] * 2


@pytest.mark.parametrize("width", [4, 3])
def test_row_store_launches(checker, monkeypatch, width):
    monkeypatch.setattr(row_store, "use_cuda_kernels", lambda device: True)
    store = rk.RowStore(width, block_rows=4)
    store.reserve(5)
    store.gather(torch.tensor([1, 4]))
    store.scatter(torch.tensor([1, 4]), torch.ones(2, width))
    assert checker.launched == ["gather_rows", "scatter_rows"]


def test_hash_table_launches(checker, monkeypatch):
    monkeypatch.setattr(hash_table, "use_cuda_kernels", lambda device: True)
    m = rk.IdMap(capacity=16)
    keys, tabs = torch.tensor([5, 9]), torch.tensor([0, 1], dtype=torch.int32)
    m._find_slots(keys, tabs)
    with contextlib.suppress(RuntimeError):  # no kernel ran, so its slots are not set
        m._claim_cuda(keys, tabs)
    assert checker.launched == ["find_slots", "claim_slots"]


def test_every_kernel_is_launched_somewhere():
    """Guard against a kernel with no launch site (dead code that is never checked)."""
    launched_by_ops = {
        "mod": {"fused_mod"},
        "hashing": {"hash_bytes"},
        "mix": {"mix64", "multi_hash", "hashed_uniform"},
        "bucketize": {"fused_bucketize_f64", "fused_bucketize_i64"},
        "dense": {
            f"{kind}{n}_w{w}"
            for kind in ("ragged_to_dense", "dense_to_ragged")
            for n in (2, 3)
            for w in (1, 2, 4, 8)
        },
        "feature_cross": {"feature_cross"},
        "truncate": {"truncate_index"},
        "segment_reduce": {
            f"segment_reduce_{d}_{t}" for d in ("fwd", "bwd") for t in ("f32", "f64")
        },
        "row_store": {"gather_rows", "scatter_rows"},
        "hash_table": {"find_slots", "claim_slots"},
    }
    for name, kernels in launched_by_ops.items():
        assert set(ptx_signatures(name)) == kernels
