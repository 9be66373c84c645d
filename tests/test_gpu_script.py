"""The GPU benchmark and the one-command GPU check (.ci/gpu), exercised on a machine without a GPU.

``bench_gpu.py --device cpu`` runs the same ops and checks as on CUDA; ``.ci/gpu --cpu-smoke``
runs the real install (wheels and packages/* into a target directory, offline) and collects the
GPU tests instead of running them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import load_script

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench_gpu.py"
SCRIPT = ROOT / ".ci" / "gpu"
MODULES = ("recis_io", "recis_kernels", "recis_features", "recis_embedding", "recis_train")
ROW_CONTENDERS = {
    "torch copy_",
    "recis RowStore.gather",
    "torch index_select",
    "recis RowStore.scatter",
    "torch index_copy_",
    "recis RowStore.scatter_add",
    "torch index_add_",
}


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script(str(BENCH.relative_to(ROOT)))


def test_bench_gpu_on_the_cpu_checks_times_and_writes_its_json(tmp_path: Path) -> None:
    env = {**os.environ, "RECIS_BENCH_RESULTS_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--device", "cpu", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert doc["benchmark"] == "gpu"
    assert doc["device"] == "cpu"
    assert set(doc["hash_table"]) == {"0.5", "0.75"}
    for load, table in doc["hash_table"].items():
        # Filled to exactly that fraction of the smallest capacity holding 2**16 keys there.
        assert table["capacity"] == 1 << 17
        assert table["table_keys"] == int(float(load) * (1 << 17))
        assert table["load_factor"] == table["table_keys"] / table["capacity"]
        for op in ("find", "find_or_insert"):
            assert set(table[op]) == {"uniform", "zipf"}
            for dist in table[op].values():
                assert set(dist) == {"2^10", "2^12"}
                assert all(e["keys_per_s"] > 0 for e in dist.values())
        # Zipf batches repeat keys; uniform inserts are all distinct.
        assert table["find_or_insert"]["zipf"]["2^12"]["distinct_keys"] < 1 << 12
        assert table["find_or_insert"]["uniform"]["2^12"]["distinct_keys"] == 1 << 12
    assert set(doc["rows"]["dims"]) == {"16", "64", "128"}
    for dim in doc["rows"]["dims"].values():
        contenders = dim["contenders"]
        assert set(contenders) == ROW_CONTENDERS
        assert contenders["torch copy_"]["fraction_of_copy"] == 1.0
        assert all(e["bytes_per_s"] > 0 for e in contenders.values())
    assert set(doc["targets"]) == {
        "find_keys_per_s",
        "gather_fraction_of_copy",
        "scatter_fraction_of_copy",
    }
    assert not any(t["applies"] for t in doc["targets"].values())  # a CPU run judges nothing
    assert "IdMap.find_or_insert" in proc.stdout
    assert "target gather_fraction_of_copy" in proc.stdout


def test_bench_gpu_falls_back_to_the_cpu_and_says_so(bench, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.resolve_device("auto") == torch.device("cpu")
    assert "no CUDA device: measuring the CPU paths" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench.resolve_device("cuda")


def _shifted(method):
    def wrong(self, *args, **kwargs):
        out = method(self, *args, **kwargs)
        if isinstance(out, tuple):  # find_or_insert: (rows, is_new)
            return (out[0] + 1, *out[1:])
        return out + 1

    return wrong


def _drops_first_row(method):
    def wrong(self, rows, values, start=0):
        return method(self, rows[1:], values[1:], start)

    return wrong


@pytest.mark.parametrize(
    ("cls", "name", "corrupt", "part"),
    [
        ("IdMap", "find", _shifted, "hash_table"),
        ("IdMap", "find_or_insert", _shifted, "hash_table"),
        ("RowStore", "gather", _shifted, "rows"),
        ("RowStore", "scatter", _drops_first_row, "rows"),
    ],
)
def test_bench_gpu_exits_1_when_a_result_is_wrong(
    bench, monkeypatch, capsys, tmp_path, cls, name, corrupt, part
) -> None:
    import recis_kernels as rk

    monkeypatch.setenv("RECIS_BENCH_RESULTS_DIR", str(tmp_path))
    target = getattr(rk, cls)
    monkeypatch.setattr(target, name, corrupt(getattr(target, name)))
    argv = ["--device", "cpu", "--quick", "--only", part, "--dims", "16", "--reps", "1"]
    assert bench.main(argv) == 1
    assert "check failed" in capsys.readouterr().err
    assert not (tmp_path / "gpu.json").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--load-factors", "0"], r"--load-factors must lie in \(0, 0.9\), got \[0.0\]"),
        (["--load-factors", "0.5", "0.95"], r"got \[0.95\]"),
        # 0.85 of 2**17 slots plus a batch of 2**14 keys would pass 0.9 of them.
        (["--load-factors", "0.85", "--batch-log2", "14"], r"lower --load-factors or --batch-log2"),
    ],
)
def test_bench_gpu_refuses_load_factors_it_cannot_measure(bench, argv, message) -> None:
    with pytest.raises(SystemExit, match=message):
        bench.main(["--device", "cpu", "--quick", "--only", "hash_table", *argv])


# ----------------------------------------------------------------------------- .ci/gpu


def _run_script(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "RESULTS": str(tmp_path / "results"), "PYTHON": sys.executable}
    full_env.update(env)
    full_env.pop("RECIS_BENCH_RESULTS_DIR", None)
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _summary(tmp_path: Path) -> dict[str, str]:
    lines = (tmp_path / "results" / "summary.txt").read_text().splitlines()
    return {line.split()[0]: line.split(None, 1)[1] for line in lines}


def test_gpu_script_refuses_wheels_without_the_rust_packages_wheels(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    proc = _run_script(tmp_path, "--cpu-smoke", str(wheels))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = _summary(tmp_path)
    assert summary["check-wheels"].startswith("FAILED")
    assert all(
        summary[s].startswith("skipped (the install failed)")
        for s in ("imports", "pytest-gpu", "bench-gpu", "bench-e2e", "demo")
    )
    log = (tmp_path / "results" / "check-wheels.log").read_text()
    for package in RUST_PACKAGES:
        assert f"expected one {package} wheel in {wheels}" in log
        assert f"maturin build --release -m packages/{package}/rust/Cargo.toml" in log


# The packages with a Rust extension: package -> (module, extension module).
RUST_PACKAGES = {
    "recis-io": ("recis_io", "_recis_io"),
    "recis-kernels": ("recis_kernels", "_native"),
}


def _built_wheel(package: str) -> Path | None:
    """A release wheel of a Rust package built from this checkout (by nox, or for .ci/gpu)."""
    module, ext = RUST_PACKAGES[package]
    found = [
        *ROOT.glob(f"target/wheels/{package}/{module}-*.whl"),
        *ROOT.glob(f".whl/{module}-*.whl"),
    ]
    for wheel in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        names = zipfile.ZipFile(wheel).namelist()
        if any(n.startswith(f"{module}/{ext}") and n.endswith(".so") for n in names):
            return wheel
    return None


def test_gpu_script_cpu_smoke_installs_the_packages_and_collects_the_gpu_tests(
    tmp_path: Path,
) -> None:
    built = {package: _built_wheel(package) for package in RUST_PACKAGES}
    missing = [package for package, wheel in built.items() if wheel is None]
    if missing:
        pytest.skip(
            f"no release wheel of {missing} under target/wheels/<package> or .whl (nox builds them)"
        )
    for tool in ("pip", "hatchling"):
        if importlib.util.find_spec(tool) is None:
            pytest.skip(
                f"{tool} is not installed for {sys.executable} (nox test-integration has it)"
            )
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for wheel in built.values():
        shutil.copy2(wheel, wheels)
    target = tmp_path / "target"
    # Two of the six test directories keep the run short; the others are collected the same way.
    collected = ("pytest-gpu-recis-kernels", "pytest-gpu-tests")
    proc = _run_script(
        tmp_path,
        "--cpu-smoke",
        str(wheels),
        RECIS_GPU_TARGET=str(target),
        RECIS_GPU_ONLY=" ".join([*collected, "bench-gpu", "bench-features"]),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = _summary(tmp_path)
    steps = ("check-wheels", "install-wheels", "install-packages", "imports", "bench-gpu")
    for step in (*steps, "bench-features"):
        assert summary[step].startswith("ok"), summary
    features = json.loads((tmp_path / "results" / "features.json").read_text())
    assert features["device"] == "cpu"
    assert features["batches"] == 2
    assert summary["bench-e2e"].startswith("skipped (cpu smoke)")
    assert summary["demo"].startswith("skipped (cpu smoke)")
    for module in MODULES:
        assert (target / module / "__init__.py").is_file(), module
    for module, ext in RUST_PACKAGES.values():
        assert list((target / module).glob(f"{ext}*.so")), module
    assert (target / "recis_kernels" / "cuda" / "hash_table.cu").is_file()  # kernel sources ship
    imports = (tmp_path / "results" / "imports.log").read_text()
    for module in MODULES:
        line = next(x for x in imports.splitlines() if x.startswith(module + " "))
        assert str(target.resolve()) in line, line
    # The GPU tests were collected from the installed packages (the kernels' CUDA variants among
    # them; tests/ has none yet), the other directories left out as asked.
    pytest_steps = {s: v for s, v in summary.items() if s.startswith("pytest-gpu-")}
    assert len(pytest_steps) == 6, summary
    for step, status in pytest_steps.items():
        expected = "ok" if step in collected else "skipped (not in RECIS_GPU_ONLY)"
        assert status.startswith(expected), (step, status)
    kernels = (tmp_path / "results" / "pytest-gpu-recis-kernels.log").read_text()
    assert "[cuda" in kernels
    doc = json.loads((tmp_path / "results" / "gpu.json").read_text())
    assert doc["device"] == "cpu"
    assert set(doc["rows"]["dims"]) == {"16"}
