"""Every ``>>>`` example in the packages' docstrings runs and prints what it shows.

Usage sketches that need the reader's own model or files are fenced ```python blocks in the
docstrings instead (the guide pages, run by ``test_doc_examples.py``, hold their runnable
forms). Each module's examples run in a fresh namespace with the module's globals, inside a
temporary directory.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from types import ModuleType

import pytest

PACKAGES = ("recis_io", "recis_kernels", "recis_features", "recis_embedding", "recis_train")
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        root = importlib.import_module(package)
        names.append(package)
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
            names.append(info.name)
    return sorted(names)


def _examples(module: ModuleType) -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    return [t for t in finder.find(module, module.__name__) if t.examples]


# The modules that hold examples.
MODULES = [name for name in _modules() if _examples(importlib.import_module(name))]


def test_examples_are_found() -> None:
    # A broken walk or finder would leave nothing to run, and nothing to fail.
    packages = {name.split(".")[0] for name in MODULES}
    assert len(MODULES) >= 15, MODULES
    assert {"recis_kernels", "recis_features"} <= packages, MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str, tmp_path, monkeypatch) -> None:
    module = importlib.import_module(name)
    tests = _examples(module)
    monkeypatch.chdir(tmp_path)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in tests:
        test.globs = dict(module.__dict__)
        runner.run(test, out=lambda text: print(text, end=""))
    summary = runner.summarize(verbose=False)
    assert summary.failed == 0, f"{name}: {summary.failed} of {summary.attempted} examples failed"
