"""Shared fixtures of the cross-package tests: the repository root and the data generator."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_data_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "recis_bench_data", ROOT / "benchmarks" / "data.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def data() -> ModuleType:
    """``benchmarks/data.py``, the seeded click-log generator."""
    return _load_data_module()
