"""Every developer task of the recis monorepo.

``nox`` runs the test matrix (lint, typecheck, cargo-test, test for every package,
test-integration, examples, docs); ``nox -s demo`` trains/reads the demo; ``nox -s bench -- io``
runs one benchmark. Environments are made with uv, so torch is downloaded once and linked into
each of them.

Packages are discovered from ``packages/*/pyproject.toml``; a package whose pyproject has a
``[tool.maturin]`` table is a Rust extension, built once into a wheel under ``target/wheels``
(cargo's incremental build makes later sessions cheap).
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from pathlib import Path

import nox

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - nox itself may run on 3.10
    import tomli as tomllib

nox.needs_version = ">=2024.4.15"
nox.options.default_venv_backend = "uv"
nox.options.error_on_external_run = True
nox.options.sessions = [
    "lint",
    "typecheck",
    "cargo-test",
    "test",
    "test-integration",
    "examples",
    "docs",
]

ROOT = Path(__file__).resolve().parent
PACKAGES_DIR = ROOT / "packages"
TARGET_DIR = ROOT / "target"
CARGO_ENV = {"CARGO_TARGET_DIR": str(TARGET_DIR), "CARGO_TERM_COLOR": "never"}
LINT_TOOLS = ("ruff>=0.6",)
DOCS_TOOLS = ("mkdocs>=1.6,<2", "mkdocs-material>=9.5,<10", "mkdocstrings[python]>=0.26")
# Installed with every test environment: what the top-level tests, examples and benchmarks use.
SHARED_TEST_TOOLS = ("pytest>=8", "hypothesis>=6.100", "pyarrow>=14", "numpy>=1.24")


@functools.cache
def _pyprojects() -> dict[str, dict]:
    """Package name -> its parsed pyproject.toml, for every package under packages/."""
    found = {}
    for path in sorted(PACKAGES_DIR.glob("*/pyproject.toml")):
        doc = tomllib.loads(path.read_text())
        found[doc["project"]["name"]] = doc | {"_dir": path.parent}
    return found


PACKAGES = sorted(_pyprojects())


def _requirement_name(req: str) -> str:
    """'recis-kernels>=0.1,<0.2 ; python_version > "3"' -> 'recis-kernels'."""
    name = req.split(";")[0]
    for sep in "<>=!~[ (":
        name = name.split(sep)[0]
    return name.strip().lower().replace("_", "-")


def _siblings(package: str) -> list[str]:
    """The package and every sibling it depends on, dependencies first."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        for req in _pyprojects()[name]["project"].get("dependencies", []):
            dep = _requirement_name(req)
            if dep in _pyprojects():
                visit(dep)
        order.append(name)

    visit(package)
    return order


def _is_rust(package: str) -> bool:
    return "maturin" in _pyprojects()[package].get("tool", {})


def _extras(package: str, names: tuple[str, ...]) -> list[str]:
    """The requirements of the package's optional extras ``names`` that it defines."""
    optional = _pyprojects()[package]["project"].get("optional-dependencies", {})
    reqs = [req for extra in names for req in optional.get(extra, [])]
    return [r for r in reqs if _requirement_name(r) not in _pyprojects()]


# Wheels built by this nox run: an abi3 wheel serves every session's interpreter, and building
# again per session would recompile pyo3 and the crate (maturin points pyo3 at each venv).
_BUILT: dict[str, Path] = {}


def _build_wheel(session: nox.Session, package: str) -> Path | None:
    """Build a Rust package's release wheel (abi3) once per nox run and return its path; None
    when ``-R`` / ``--no-install`` reuses the session's environment (nothing is installed then)."""
    built = _BUILT.get(package)
    if built is not None and built.is_file():
        return built
    out = TARGET_DIR / "wheels" / package
    # Built beside the last wheel, which stays until this build has replaced it (a skipped
    # build leaves it for the GPU checks that carry it).
    fresh = out.with_name(f"{package}.building")
    shutil.rmtree(fresh, ignore_errors=True)
    session.install("maturin>=1.7,<2")
    with session.chdir(_pyprojects()[package]["_dir"]):
        # Part of installing: it runs under --install-only too (which skips session.run).
        ran = session.run_install(
            "maturin", "build", "--release", "--out", str(fresh), env=CARGO_ENV
        )
    if ran is None:
        return None
    shutil.rmtree(out, ignore_errors=True)
    fresh.rename(out)
    wheels = sorted(out.glob("*.whl"))
    if len(wheels) != 1:
        session.error(f"expected one wheel for {package} in {out}, found {wheels}")
    _BUILT[package] = wheels[0]
    return wheels[0]


def _install(session: nox.Session, packages: list[str], extras: tuple[str, ...] = ()) -> None:
    """Install ``packages`` and their siblings (Rust ones as freshly built wheels)."""
    closure: list[str] = []
    for package in packages:
        closure += [p for p in _siblings(package) if p not in closure]
    specs = []
    for p in closure:
        if not _is_rust(p):
            specs.append(str(_pyprojects()[p]["_dir"]))
            continue
        wheel = _build_wheel(session, p)
        if wheel is None:
            return  # -R / --no-install: the reused environment keeps what it has
        specs.append(str(wheel))
    requirements = [r for p in packages for r in _extras(p, extras)]
    # --no-sources: siblings come from exactly these paths and wheels, not the workspace's
    # editable sources (which would clash with the freshly built Rust wheel).
    session.install("--no-sources", *specs, *requirements)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (check + format), and cargo fmt + clippy on every Rust package."""
    session.install(*LINT_TOOLS)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    for package in filter(_is_rust, PACKAGES):
        manifest = _cargo_manifest(package)
        session.run("cargo", "fmt", "--check", "--manifest-path", manifest, external=True)
        session.run(
            *("cargo", "clippy", "--release", "--all-targets", "--all-features"),
            *("--manifest-path", manifest, "--", "-D", "warnings"),
            external=True,
            env=CARGO_ENV | {"PYO3_PYTHON": _venv_python(session)},
        )


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over every package's sources; stubtest for the native modules' hand-written stubs."""
    _install(session, PACKAGES)
    session.install("mypy>=1.11", *SHARED_TEST_TOOLS)
    sources = [str(_pyprojects()[p]["_dir"] / "src") for p in PACKAGES]
    session.run("mypy", *sources)
    for package in filter(_is_rust, PACKAGES):
        module = _pyprojects()[package]["tool"]["maturin"]["module-name"]
        session.run("python", "-m", "mypy.stubtest", module)


@nox.session(name="cargo-test")
def cargo_test(session: nox.Session) -> None:
    """The Rust unit tests of every Rust package (release profile: shares the wheel's build)."""
    for package in filter(_is_rust, PACKAGES):
        session.run(
            *("cargo", "test", "--release", "--manifest-path", _cargo_manifest(package)),
            external=True,
            env=CARGO_ENV,
        )


# Every test process, including the ones tests spawn (torch.multiprocessing, DataLoader
# workers), prints the Python stack of each thread if it dies of a signal (SIGABRT from a
# native library's abort, SIGSEGV): a crash in a child process names where it happened.
TEST_ENV = {"PYTHONFAULTHANDLER": "1"}


@nox.session
@nox.parametrize("package", PACKAGES)
def test(session: nox.Session, package: str) -> None:
    """One package's tests, in a fresh environment holding only it and its dependencies."""
    _install(session, [package], extras=("test", "cuda"))
    _run_tests(session, package)


def _oldest_torch() -> str:
    """``torch==X.Y.*`` for the highest ``torch>=X.Y`` that a package under packages/ declares:
    the oldest torch release every package claims to support."""
    floors = []
    for doc in _pyprojects().values():
        for req in doc["project"].get("dependencies", []):
            if _requirement_name(req) == "torch":
                floor = req.split(";")[0].partition(">=")[2].split(",")[0].strip()
                floors.append(tuple(int(part) for part in floor.split(".")[:2]))
    major, minor = max(floors)
    return f"torch=={major}.{minor}.*"


@nox.session(name="test-torch-oldest", default=False)
@nox.parametrize("package", PACKAGES)
def test_torch_oldest(session: nox.Session, package: str) -> None:
    """One package's tests, as in ``test``, against the oldest torch the packages declare."""
    pin = _oldest_torch()
    # torch first: the packages' ``torch>=`` is then met and uv leaves it as it is.
    session.install(pin)
    _install(session, [package], extras=("test", "cuda"))
    release = pin.removeprefix("torch==").removesuffix("*")
    check = (
        "import sys, torch; print('torch', torch.__version__); "
        f"sys.exit(0 if torch.__version__.startswith({release!r}) else 'not {pin}')"
    )
    session.run("python", "-c", check)
    _run_tests(session, package)


def _run_tests(session: nox.Session, package: str) -> None:
    # A package may ask for more runs of its suite with extra pytest options, listed in its
    # pyproject as ``[tool.recis] extra-test-runs = [[...], ...]``.
    extra_runs = _pyprojects()[package].get("tool", {}).get("recis", {}).get("extra-test-runs", [])
    with session.chdir(_pyprojects()[package]["_dir"]):
        session.run("pytest", "tests", *session.posargs, env=TEST_ENV)
        for options in extra_runs:
            session.run("pytest", "tests", *options, *session.posargs, env=TEST_ENV)


@nox.session(name="test-integration")
def test_integration(session: nox.Session) -> None:
    """Cross-package pipelines and repo-wide checks under tests/."""
    _install(session, PACKAGES, extras=("test",))
    # pip and hatchling: tests/test_gpu_script.py runs .ci/gpu's offline install of packages/*.
    session.install(*SHARED_TEST_TOOLS, "pip", "hatchling>=1.24")
    session.run("pytest", "tests", *session.posargs, env=TEST_ENV)


@nox.session(name="test-gpu", default=False)
def test_gpu(session: nox.Session) -> None:
    """The tests marked ``gpu`` of every package and of tests/ (needs a CUDA device)."""
    _install(session, PACKAGES, extras=("test", "cuda"))
    session.install(*SHARED_TEST_TOOLS)
    # One pytest per directory: test files of one name in several packages (test_ops.py, ...)
    # cannot be collected in one run. Exit code 5 (nothing selected) is not a failure.
    dirs = [str(_pyprojects()[p]["_dir"] / "tests") for p in PACKAGES] + ["tests"]
    for directory in dirs:
        session.run(
            "pytest", "-m", "gpu", directory, *session.posargs, success_codes=[0, 5], env=TEST_ENV
        )


@nox.session
def examples(session: nox.Session) -> None:
    """Run every script in examples/ on a small data size (``_*.py`` are their shared modules)."""
    _install(session, PACKAGES, extras=("demo",))
    session.install(*SHARED_TEST_TOOLS)
    scripts = sorted(p for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))
    out = ROOT / "target" / "examples"
    for script in scripts:
        session.run("python", str(script), "--small", "--out", str(out / script.stem))


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site with ``mkdocs build --strict``."""
    session.install(*DOCS_TOOLS)
    session.run(
        *("mkdocs", "build", "--strict", "--site-dir", str(TARGET_DIR / "site")),
        env={"NO_MKDOCS_2_WARNING": "1"},
    )


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: the end-to-end training demo on this machine (see README)."""
    _install(session, PACKAGES, extras=("demo",))
    session.install(*SHARED_TEST_TOOLS)
    session.run("python", str(ROOT / "examples" / "demo.py"), *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Side-by-side benchmarks; ``nox -s bench -- io features`` runs only those."""
    _install(session, PACKAGES)
    session.install(*SHARED_TEST_TOOLS, "psutil")
    available = {p.stem.removeprefix("bench_"): p for p in (ROOT / "benchmarks").glob("bench_*.py")}
    chosen = session.posargs or sorted(available)
    unknown = [name for name in chosen if name not in available]
    if unknown:
        session.error(f"unknown benchmark(s) {unknown}; available: {sorted(available)}")
    for name in chosen:
        session.run("python", str(available[name]))


# fbgemm-gpu-cpu ships C++ ops compiled against one torch release and fails to load its
# libraries under any other, so both are pinned together (fbgemm-gpu-cpu 1.9.0 <-> torch 2.14).
FBGEMM_PINS = ("torch==2.14.*", "fbgemm-gpu-cpu==1.9.0")
# torchrec requires fbgemm-gpu, the CUDA build, which would replace fbgemm-gpu-cpu (both are the
# module fbgemm_gpu): torchrec goes in without its dependencies and these go in beside it.
TORCHREC_PIN = "torchrec==1.9.2"
TORCHREC_DEPS = ("tensordict", "torchmetrics==1.0.3", "pyre-extensions", "tqdm")
FBGEMM_BENCHMARKS = {"embedding": ["recis-embedding"], "e2e": ["recis-train"]}


@nox.session(name="bench-fbgemm", default=False)
def bench_fbgemm(session: nox.Session) -> None:
    """A benchmark with FBGEMM on CPU as a contender, in its own pinned environment.

    ``nox -s bench-fbgemm`` runs ``bench_embedding.py`` (FBGEMM TBE); ``-- e2e`` runs
    ``bench_e2e.py`` with TorchRec's fused EmbeddingBagCollection. Further arguments go to the
    script (``-- e2e --threads 1``; ``-- --threads 1`` for the embedding benchmark).
    """
    name, args = "embedding", list(session.posargs)
    if args and not args[0].startswith("-"):
        name, args = args[0], args[1:]
    if name not in FBGEMM_BENCHMARKS:
        session.error(f"unknown benchmark {name!r}; available: {sorted(FBGEMM_BENCHMARKS)}")
    session.install(*FBGEMM_PINS)
    _install(session, FBGEMM_BENCHMARKS[name])
    session.install(*FBGEMM_PINS, *SHARED_TEST_TOOLS)
    if name == "e2e":
        session.install(*FBGEMM_PINS, *TORCHREC_DEPS)
        session.install("--no-deps", TORCHREC_PIN)
    session.run("python", str(ROOT / "benchmarks" / f"bench_{name}.py"), *args)


def _cargo_manifest(package: str) -> str:
    manifest = _pyprojects()[package]["tool"]["maturin"].get("manifest-path", "Cargo.toml")
    return str(_pyprojects()[package]["_dir"] / manifest)


def _venv_python(session: nox.Session) -> str:
    bindir = Path(session.bin)
    return str(bindir / ("python.exe" if os.name == "nt" else "python"))
