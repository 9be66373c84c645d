"""Shared fixtures of the cross-package tests: the repository root and the data generator."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_script(relative: str, name: str | None = None) -> ModuleType:
    """The script ``relative`` to the repository root (an example or a benchmark) as a module,
    with its folder importable while it loads (examples import ``_common``, benchmarks
    ``_harness``)."""
    path = ROOT / relative
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(name or f"recis_{path.stem}_under_test", path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def data() -> ModuleType:
    """``benchmarks/data.py``, the seeded click-log generator."""
    return load_script("benchmarks/data.py", "recis_bench_data")
