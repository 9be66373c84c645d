"""Every shipped kernel must compile for the archs recis supports, on machines without a GPU."""

from __future__ import annotations

import pytest

import recis_kernels as rk
from recis_kernels._cuda import compiler


def test_kernel_sources_are_shipped():
    names = rk.kernel_names()
    assert "mod" in names
    assert all(not n.startswith("recis_common") for n in names)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", rk.kernel_names())
def test_every_kernel_compiles(name, arch):
    compiled = rk.compile_kernel(name, arch=arch)
    assert compiled.arch == arch
    # An ELF cubin starts with the ELF magic number.
    assert compiled.cubin[:4] == b"\x7fELF"


def test_compile_all_returns_every_kernel():
    result = rk.compile_all("sm_90")
    assert sorted(result) == rk.kernel_names()


def test_cache_hits_memory_then_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("RECIS_KERNELS_CACHE_DIR", str(tmp_path))
    compiler._memory_cache.clear()
    first = rk.compile_kernel("mod", "sm_80")
    files = list(tmp_path.glob("mod-sm_80-*.cubin"))
    assert [f.name for f in files] == [f"mod-sm_80-{first.key}.cubin"]
    assert rk.compile_kernel("mod", "sm_80") is first
    compiler._memory_cache.clear()
    again = rk.compile_kernel("mod", "sm_80")
    assert again is not first
    assert again.cubin == first.cubin
    # Different options mean a different key, never a stale binary.
    other = rk.compile_kernel("mod", "sm_80", options=("-lineinfo",))
    assert other.key != first.key


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv("RECIS_KERNELS_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert rk.cache_dir() == tmp_path / "recis-kernels"


def test_compile_error_carries_name_arch_and_log(tmp_path, monkeypatch):
    src = tmp_path / "cuda"
    src.mkdir()
    (src / "broken.cu").write_text('extern "C" __global__ void k() { undeclared_symbol = 1; }\n')
    monkeypatch.setattr(compiler, "_source_dir", lambda: src)
    with pytest.raises(rk.KernelCompileError) as info:
        rk.compile_kernel("broken", "sm_80")
    message = str(info.value)
    assert "'broken'" in message
    assert "sm_80" in message
    assert "undeclared_symbol" in message


def test_unknown_kernel_and_bad_arch():
    with pytest.raises(ValueError, match="no kernel source named 'nope'"):
        rk.compile_kernel("nope")
    with pytest.raises(ValueError, match="arch must look like 'sm_90', got '90'"):
        rk.compile_kernel("mod", arch="90")
