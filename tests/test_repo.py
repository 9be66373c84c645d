"""Repository-wide rules: the README's commands, package layout, and import directions."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = sorted(p.parent for p in (ROOT / "packages").glob("*/pyproject.toml"))
IMPORT_NAMES = {d.name: d.name.replace("-", "_") for d in PACKAGE_DIRS}

# DESIGN.md: which sibling packages each package may import.
ALLOWED_IMPORTS = {
    "recis_io": set(),
    "recis_kernels": set(),
    "recis_features": {"recis_kernels"},
    "recis_embedding": {"recis_kernels"},
    "recis_train": {"recis_io", "recis_kernels", "recis_features", "recis_embedding"},
}


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^(python3 -m pip install nox uv && .+)$", text, flags=re.M)


def test_ci_runs_exactly_the_readme_test_command() -> None:
    commands = _readme_commands()
    test_commands = [c for c in commands if "-s demo" not in c]
    assert len(test_commands) == 1, commands
    ci_lines = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith("#") and not line.startswith(("set ", "cd "))
    ]
    assert ci_lines == test_commands


def test_readme_has_the_demo_command() -> None:
    assert "python3 -m pip install nox uv && python3 -m nox -s demo" in _readme_commands()


@pytest.mark.parametrize("pkg_dir", PACKAGE_DIRS, ids=lambda p: p.name)
def test_package_layout(pkg_dir: Path) -> None:
    import_name = IMPORT_NAMES[pkg_dir.name]
    src = pkg_dir / "src" / import_name
    for required in ("README.md", "CHANGELOG.md"):
        assert (pkg_dir / required).is_file(), f"{pkg_dir.name} lacks {required}"
    for required in ("__init__.py", "py.typed", "exceptions.py"):
        assert (src / required).is_file(), f"{pkg_dir.name} lacks src/{import_name}/{required}"
    init = ast.parse((src / "__init__.py").read_text())
    assigned = {
        t.id
        for node in init.body
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name)
    }
    assert "__all__" in assigned, f"{import_name}/__init__.py defines no __all__"


@pytest.mark.parametrize("pkg_dir", PACKAGE_DIRS, ids=lambda p: p.name)
def test_siblings_are_required_by_range_not_pin(pkg_dir: Path) -> None:
    project = tomllib.loads((pkg_dir / "pyproject.toml").read_text())["project"]
    for req in project.get("dependencies", []):
        name = re.split(r"[<>=!~\[ ;(]", req, maxsplit=1)[0]
        if name in IMPORT_NAMES:
            assert "==" not in req, f"{pkg_dir.name} pins sibling {req!r}; use a range"
            assert re.search(r"[<>~]", req), f"{pkg_dir.name} requires {req!r} without a range"


@pytest.mark.parametrize("pkg_dir", PACKAGE_DIRS, ids=lambda p: p.name)
def test_version_in_readme_package_table(pkg_dir: Path) -> None:
    pyproject = tomllib.loads((pkg_dir / "pyproject.toml").read_text())
    version = pyproject["project"].get("version")
    if version is None:  # dynamic: the Rust crate's version
        cargo = next(pkg_dir.glob("**/Cargo.toml"))
        version = tomllib.loads(cargo.read_text())["package"]["version"]
    row = [
        line
        for line in (ROOT / "README.md").read_text().splitlines()
        if f"`{pkg_dir.name}`" in line
    ]
    assert row, f"README's package table has no row for {pkg_dir.name}"
    assert version in row[0], f"README lists {row[0]!r}, but {pkg_dir.name} is at {version}"


def _imported_recis_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return {n for n in names if n.startswith("recis_")}


@pytest.mark.parametrize("pkg_dir", PACKAGE_DIRS, ids=lambda p: p.name)
def test_imports_follow_the_dependency_table(pkg_dir: Path) -> None:
    me = IMPORT_NAMES[pkg_dir.name]
    allowed = ALLOWED_IMPORTS[me] | {me}
    for path in (pkg_dir / "src").rglob("*.py"):
        bad = _imported_recis_modules(path) - allowed
        assert not bad, (
            f"{path.relative_to(ROOT)} imports {sorted(bad)}; {me} may import {sorted(allowed)}"
        )
