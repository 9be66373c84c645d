"""Device handling of the CUDA paths, checked without a GPU.

A CUDA kernel dereferences every address it is given: a tensor of another device reaching one
faults and leaves the CUDA context unusable for the rest of the process. These tests send the
ops down their kernel path (``use_cuda_kernels`` forced, ``launch`` recorded) with a tensor on
another device (``meta`` stands for it) and check that the op refuses before any launch. The
launcher itself runs against a fake driver that models the current context per thread.
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

import recis_kernels._cuda as cuda_pkg
from recis_kernels import IdMap, RowStore, UnsupportedDeviceError
from recis_kernels._checks import resolve_device
from recis_kernels._cuda import launcher
from recis_kernels.ops import hash_table, optim, row_store

META = torch.device("meta")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, torch.device, list]]:
    """Every launch as (kernel, launch device, devices of its tensor arguments)."""
    seen: list[tuple[str, torch.device, list]] = []

    def record(module_name, kernel, grid, block, args, *, device, shared_mem=0):
        tensors = [v for _, v in args if isinstance(v, torch.Tensor)]
        seen.append((kernel, device, [t.device for t in tensors]))
        if kernel == "find_slots":
            tensors[-1].fill_(-1)  # its output: every key absent

    monkeypatch.setattr(cuda_pkg, "launch", record)
    for module in (hash_table, row_store, optim):
        monkeypatch.setattr(module, "use_cuda_kernels", lambda device: True)
    return seen


def test_resolve_device_gives_cuda_its_current_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert resolve_device("cuda") == torch.device("cuda", 3)
    assert resolve_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("meta") == META


def test_row_store_on_cuda_compares_equal_to_its_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tensors made on "cuda" report "cuda:<current>"; a store kept as plain "cuda" would
    # refuse every one of them.
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert RowStore(4, device="cuda").device == torch.device("cuda", 2)


def test_id_map_refuses_keys_of_another_device(launches) -> None:
    m = IdMap(device="cpu")
    keys = torch.zeros(3, dtype=torch.int64, device=META)
    for call in (m.find, m.find_or_insert, m.insert_absent, m.erase):
        with pytest.raises(
            UnsupportedDeviceError, match=r"IdMap\.\w+: keys is on meta, expected cpu"
        ):
            call(keys)
    assert launches == []


def test_id_map_refuses_tables_of_another_device(launches) -> None:
    m = IdMap(device="cpu")
    keys = torch.tensor([1, 2, 3])
    tables = torch.zeros(3, dtype=torch.int32, device=META)
    with pytest.raises(UnsupportedDeviceError, match=r"IdMap\.find: tables is on meta"):
        m.find(keys, tables)
    assert launches == []


def test_id_map_kernel_gets_tensors_of_its_device(launches) -> None:
    m = IdMap(device="cpu")
    keys = torch.tensor([5, -1, 5])
    m.find(keys, torch.zeros(3, dtype=torch.int32))
    assert launches, "the kernel path was not taken"
    for kernel, device, devices in launches:
        assert devices, kernel
        assert all(d == device for d in devices), (kernel, device, devices)


def test_row_store_refuses_rows_and_values_of_another_device(launches) -> None:
    store = RowStore(4, block_rows=8)
    store.reserve(8)
    rows = torch.tensor([1, 2])
    with pytest.raises(UnsupportedDeviceError, match=r"RowStore\.gather: rows is on meta"):
        store.gather(rows.to(META))
    with pytest.raises(UnsupportedDeviceError, match=r"RowStore\.scatter: values is on meta"):
        store.scatter(rows, torch.ones(2, 4, device=META))
    with pytest.raises(UnsupportedDeviceError, match=r"RowStore\.scatter_add: values is on meta"):
        store.scatter_add(rows, torch.ones(2, 4, device=META))
    with pytest.raises(UnsupportedDeviceError, match=r"RowStore\.update: rows is on meta"):
        store.update(rows.to(META), lambda current, which: current)
    assert launches == []


def test_optimizer_kernel_not_launched_on_mixed_devices(launches) -> None:
    param = torch.zeros(2, 4)
    grad = torch.ones(2, 4, device=META)
    # The torch implementation takes these (on a GPU torch raises for a host/device pair).
    optim.sgd_rows_(param, grad, lr=0.1)
    assert launches == []
    optim.sgd_rows_(param, torch.ones(2, 4), lr=0.1)
    assert [k for k, _, _ in launches] == ["sgd_rows"]


# -- the launcher against a fake driver ----------------------------------------------------------


class FakeDriver:
    """The driver calls the launcher makes, with one current context per thread (one thread
    here) and the primary context of device ``i`` modelled as ``1000 + i``."""

    class CUresult:
        CUDA_SUCCESS = 0
        CUDA_ERROR_NOT_INITIALIZED = 3

    def __init__(self, runtime: FakeRuntime) -> None:
        self.runtime = runtime
        self.initialized = False
        self.launched: list[dict] = []

    def cuGetErrorString(self, result):
        return 0, f"error {result}".encode()

    def cuInit(self, flags):
        self.initialized = True
        return (0,)

    def cuDeviceGet(self, index):
        return (0 if self.initialized else 3), index

    def cuDevicePrimaryCtxRetain(self, dev):
        return 0, 1000 + dev

    def cuCtxGetCurrent(self):
        return 0, 1000 + self.runtime.current

    def cuCtxSetCurrent(self, ctx):
        self.runtime.current = ctx - 1000
        return (0,)

    def cuModuleLoadData(self, image):
        return 0, ("module", self.runtime.current)

    def cuModuleGetFunction(self, module, name):
        return 0, (module, name)

    def CUstream(self, handle):
        return ("stream", handle)

    def cuLaunchKernel(self, fn, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        self.launched.append(
            {"fn": fn, "stream": stream, "current": self.runtime.current, "params": params}
        )
        return (0,)


class FakeRuntime:
    """torch's view: the current device is the device of the current context."""

    def __init__(self) -> None:
        self.current = 0
        self.compiled: list[tuple[str, str]] = []

    @contextlib.contextmanager
    def device(self, index):
        before, self.current = self.current, int(index)
        try:
            yield
        finally:
            self.current = before

    def current_stream(self, device=None):
        index = device.index if isinstance(device, torch.device) else device
        index = self.current if index is None else index
        return types.SimpleNamespace(cuda_stream=700 + index)

    def compile_kernel(self, name, arch):
        self.compiled.append((name, arch))
        return types.SimpleNamespace(cubin=b"cubin", arch=arch)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeRuntime, FakeDriver]:
    runtime = FakeRuntime()
    driver = FakeDriver(runtime)
    monkeypatch.setattr(launcher, "cuda_bindings", lambda module: driver)
    monkeypatch.setattr(launcher, "compile_kernel", runtime.compile_kernel)
    for cache in ("_functions", "_modules", "_contexts"):
        monkeypatch.setattr(launcher, cache, {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: runtime.current)
    monkeypatch.setattr(torch.cuda, "device", runtime.device)
    monkeypatch.setattr(torch.cuda, "current_stream", runtime.current_stream)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    return runtime, driver


def test_launch_on_another_device_leaves_the_current_device_alone(fake_cuda) -> None:
    runtime, driver = fake_cuda
    args = [("ptr", 4096), ("i64", 7), ("i32", 1), ("f32", 0.5)]
    launcher.launch("row_store", "gather_rows", 2, 256, args, device=torch.device("cuda", 1))
    (call,) = driver.launched
    # Loaded and launched in device 1's context, on device 1's current stream...
    assert call["current"] == 1
    assert call["fn"] == (("module", 1), b"gather_rows")
    assert call["stream"] == ("stream", 701)
    # ...and torch's current device is what it was before.
    assert runtime.current == 0
    values, kinds = call["params"]
    assert values == (4096, 7, 1, 0.5)
    assert kinds == tuple(launcher._CTYPES[k] for k, _ in args)


def test_launch_compiles_for_the_device_arch_and_initializes_the_driver(fake_cuda) -> None:
    runtime, driver = fake_cuda
    launcher.launch("mod", "fused_mod", 1, 256, [("i64", 1)], device=torch.device("cuda"))
    assert driver.initialized
    assert runtime.compiled == [("mod", "sm_90")]  # H100 / H200: compute capability 9.0
    assert driver.launched[0]["current"] == 0
    assert runtime.current == 0


# -- on a real GPU -------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_cuda
def test_kernels_on_cuda_keep_the_current_device() -> None:
    before = torch.cuda.current_device()
    m = IdMap(device="cuda")
    keys = torch.tensor([5, -1, 5, 7], device="cuda")
    rows, is_new = m.find_or_insert(keys)
    assert m.device == keys.device
    assert m.find(keys).tolist() == rows.tolist()
    assert is_new.tolist() == [True, True, True, True]
    store = RowStore(4, block_rows=4, device="cuda")
    store.reserve(8)
    store.scatter(torch.tensor([6], device="cuda"), torch.full((1, 4), 2.0, device="cuda"))
    got = store.gather(torch.tensor([6, 0], device="cuda"))
    assert got.cpu().tolist() == [[2.0] * 4, [0.0] * 4]
    with pytest.raises(UnsupportedDeviceError):
        store.gather(torch.tensor([6]))  # host rows never reach the kernel
    if torch.cuda.device_count() > 1:
        other = IdMap(device="cuda:1")
        other.find_or_insert(torch.tensor([3], device="cuda:1"))
        assert other.find(torch.tensor([3], device="cuda:1")).tolist() == [0]
    assert torch.cuda.current_device() == before
