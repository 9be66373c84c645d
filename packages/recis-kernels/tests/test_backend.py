from __future__ import annotations

import builtins
import subprocess
import sys

import pytest
import torch

import recis_kernels as rk
from recis_kernels import _backend


@pytest.mark.parametrize(("value", "expected"), [("", "auto"), ("CPU", "cpu"), ("cuda", "cuda")])
def test_backend_reads_environment(monkeypatch, value, expected):
    monkeypatch.setenv("RECIS_KERNELS_BACKEND", value)
    assert rk.backend() == expected


def test_backend_rejects_unknown(monkeypatch):
    monkeypatch.setenv("RECIS_KERNELS_BACKEND", "tpu")
    with pytest.raises(rk.BackendError, match="must be one of auto, cpu, cuda, got 'tpu'"):
        _backend.backend()


def test_cpu_tensors_never_use_kernels(monkeypatch):
    monkeypatch.setenv("RECIS_KERNELS_BACKEND", "cuda")
    assert not _backend.use_cuda_kernels(torch.device("cpu"))


def test_cuda_backend_without_cuda_python_names_the_extra(monkeypatch):
    monkeypatch.setenv("RECIS_KERNELS_BACKEND", "cuda")
    monkeypatch.setattr(_backend, "cuda_python_available", lambda: False)
    with pytest.raises(rk.CudaUnavailableError, match=r"recis-kernels\[cuda\]"):
        _backend.use_cuda_kernels(torch.device("cuda", 0))
    monkeypatch.setenv("RECIS_KERNELS_BACKEND", "auto")
    assert not _backend.use_cuda_kernels(torch.device("cuda", 0))


def test_compile_without_cuda_python_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("cuda"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    from recis_kernels._cuda import compiler

    compiler._memory_cache.clear()
    with pytest.raises(rk.CudaUnavailableError, match=r"recis-kernels\[cuda\]"):
        rk.compile_kernel("mod", "sm_80")


def test_import_does_not_load_cuda_python():
    # torch itself may import parts of cuda-python; recis-kernels must add none of them.
    code = (
        "import sys, torch; before = set(sys.modules); import recis_kernels; "
        "print(sorted(m for m in set(sys.modules) - before if m.startswith('cuda')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


class FakeResult:
    def __init__(self, name: str) -> None:
        self.name = name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FakeResult) and other.name == self.name

    __hash__ = object.__hash__


class FakeDriver:
    class CUresult:
        CUDA_SUCCESS = FakeResult("CUDA_SUCCESS")

    @staticmethod
    def cuGetErrorString(result):
        return None, b"an illegal memory access was encountered"


def test_driver_errors_name_the_call():
    from recis_kernels._cuda import launcher

    launcher._check(FakeDriver, FakeDriver.CUresult.CUDA_SUCCESS, "cuLaunchKernel")
    with pytest.raises(
        rk.KernelLaunchError, match=r"cuLaunchKernel\('mod', 'fused_mod'\) failed: an illegal"
    ):
        launcher._check(
            FakeDriver,
            FakeResult("CUDA_ERROR_ILLEGAL_ADDRESS"),
            "cuLaunchKernel('mod', 'fused_mod')",
        )


class _Sub(torch.Tensor):
    pass


def _path(*args) -> str:
    return _backend.run_op(lambda *a: "dispatcher", lambda *a: "direct", *args)


def test_run_op_skips_the_dispatcher_only_for_plain_eager_tensors(monkeypatch):
    x = torch.arange(4)
    w = torch.ones(4, requires_grad=True)
    assert _path(x, [1, 2], "sum") == "direct"
    assert _path(x, [x, x]) == "direct"
    assert _path(x, w) == "dispatcher"  # the registered autograd must see it
    assert _path(x, [x, w]) == "dispatcher"
    with torch.no_grad():
        assert _path(x, w) == "direct"
    assert _path(x.as_subclass(_Sub)) == "dispatcher"
    assert _path(torch.empty(4, device="meta")) == "dispatcher"
    with monkeypatch.context() as m:
        m.setattr(torch.jit, "is_tracing", lambda: True)
        assert _path(x) == "dispatcher"  # a trace records the op, not NumPy work
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _path(x) == "dispatcher"


def test_ops_give_the_same_results_through_the_dispatcher():
    ids = torch.tensor([7, -1, 1 << 40, 0])
    direct = rk.fused_mod([ids, ids[:2]], [10, 3])
    through = rk.ops.mod._fused_mod_op(torch.cat([ids, ids[:2]]), [4, 2], [10, 3])
    assert torch.equal(torch.cat(direct), through)


def test_torch_implementations_keep_off_numpy_for_other_devices():
    """The torch implementations also serve CUDA tensors when the kernels are off
    (``RECIS_KERNELS_BACKEND=cpu``): their NumPy shortcuts are for CPU tensors only. Meta
    tensors stand in for a device whose memory NumPy cannot read."""
    from recis_kernels.ops import bucketize, mod

    ids = torch.empty(4096, dtype=torch.int64, device="meta")
    assert mod._fused_mod_cpu(ids, [2048, 2048], [10, 7]).device.type == "meta"
    xs = torch.empty(4096, dtype=torch.float32, device="meta")
    bounds = torch.empty(6, dtype=torch.float32, device="meta")
    out = bucketize._fused_bucketize_cpu(xs, [2048, 2048], bounds, [3, 3])
    assert out.device.type == "meta"
    assert out.shape == (4096,)
