"""Every ```python block of the README files and the docs pages runs, and says what it does.

The blocks of one page run in order in one namespace, inside a fresh temporary directory, as a
reader who copies them one after another would run them. A block is left out only when an HTML
comment right before its fence (blank lines between them allowed) says why:

- ``<!-- no-run: reason -->``: never runs (a fragment of a function, a schematic, torchrun);
- ``<!-- requires: cuda-python -->``: runs where that requirement is met (see ``REQUIREMENTS``).

Blocks that use objects of the reader's own project (``model``, ``batch``, files under
``data/``) get them from the page's setup below: small synthetic ones, Parquet files written
with pyarrow where a block reads files. ``EDITS`` holds the few literal edits that make a block
finish on that data (a watched directory's timeouts, a placeholder argument); each must match
the page exactly once, so an edit that no longer applies fails. ``CHECKS`` then compare what
the blocks produced with what their comments and the surrounding text promise: the value of
each top-level expression statement is recorded by line, and what the blocks print is kept.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import recis_kernels

ROOT = Path(__file__).resolve().parent.parent
PAGE_GLOBS = ("README.md", "packages/*/README.md", "docs/**/*.md")
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")
MARKER = re.compile(r"^\s*<!--\s*(?P<kind>[\w-]+):\s*(?P<what>.*?)\s*-->\s*$")
# Where embedding tables of the setups live: the device TrainingArguments(device="auto") picks.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

REQUIREMENTS: dict[str, Callable[[], bool]] = {
    "cuda-python": recis_kernels.cuda_python_available,
}


@dataclass(frozen=True)
class Block:
    page: str
    fence_line: int  # 1-based line of the opening fence
    code: str  # dedented by the fence's indentation
    no_run: str | None = None
    requires: str | None = None


def _blocks(page: str) -> list[Block]:
    """The ```python blocks of ``page`` (relative to the repository root), with their markers."""
    lines = (ROOT / page).read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{page}:{i + 1}: code fence is never closed"
        if opening["lang"] == "python":
            indent = len(opening["indent"])
            code = "\n".join(line[indent:] for line in lines[i + 1 : end])
            markers = _markers_before(lines, i)
            unknown = set(markers) - {"no-run", "requires"}
            assert not unknown, f"{page}:{i + 1}: unknown marker(s) {sorted(unknown)}"
            found.append(Block(page, i + 1, code, markers.get("no-run"), markers.get("requires")))
        i = end + 1
    return found


def _markers_before(lines: list[str], fence: int) -> dict[str, str]:
    """The ``<!-- kind: what -->`` comments right before line index ``fence``.

    Blank lines may separate them from the fence: inside a list item a comment directly above
    a fence would be rendered in one paragraph with the code.
    """
    markers = {}
    j = fence - 1
    while j >= 0 and (not lines[j].strip() or MARKER.match(lines[j])):
        if marker := MARKER.match(lines[j]):
            markers[marker["kind"]] = marker["what"]
        j -= 1
    return markers


def _pages() -> list[str]:
    paths = {p for pattern in PAGE_GLOBS for p in ROOT.glob(pattern)}
    return sorted(str(p.relative_to(ROOT)) for p in paths if _blocks(str(p.relative_to(ROOT))))


@dataclass
class PageRun:
    """What a page's blocks left behind, for its check."""

    namespace: dict[str, Any]
    source_lines: list[str]
    values: dict[int, Any] = field(default_factory=dict)  # page line -> expression value
    stdout: str = ""

    def value(self, snippet: str) -> Any:
        """The value of the one top-level expression statement whose line holds ``snippet``."""
        lines = [n for n in self.values if snippet in self.source_lines[n - 1]]
        assert len(lines) == 1, f"{snippet!r} is on expression lines {lines}, expected one"
        return self.values[lines[0]]


def _compile(block: Block, code: str) -> Any:
    """``code`` compiled with the page's line numbers; top-level expressions are recorded."""
    tree = ast.parse("\n" * block.fence_line + code, filename=block.page)
    for k, node in enumerate(tree.body):
        if isinstance(node, ast.Expr):
            call = ast.Call(
                ast.Name("__doc_record__", ast.Load()),
                [ast.Constant(node.lineno), node.value],
                [],
            )
            tree.body[k] = ast.copy_location(ast.Expr(call), node)
    return compile(ast.fix_missing_locations(tree), block.page, "exec")


def run_page(page: str) -> PageRun:
    """Runs the page's runnable blocks in the current directory (see the module docstring)."""
    run = PageRun({"__name__": "__doc_example__"}, (ROOT / page).read_text().splitlines())
    run.namespace["__doc_record__"] = run.values.__setitem__
    blocks = _blocks(page)
    runnable = [b for b in blocks if b.no_run is None]
    for block in runnable:
        if block.requires is not None:
            assert block.requires in REQUIREMENTS, (
                f"{page}:{block.fence_line}: unknown requirement {block.requires!r}; "
                f"known: {sorted(REQUIREMENTS)}"
            )
    skipped = [b for b in runnable if b.requires and not REQUIREMENTS[b.requires]()]
    if runnable and len(skipped) == len(runnable):
        pytest.skip(f"{page}: every block needs {sorted({b.requires for b in skipped})}")
    edits = EDITS.get(page, [])
    for old, _ in edits:
        count = sum(b.code.count(old) for b in runnable)
        assert count == 1, f"{page}: the edit of {old!r} matches {count} times, expected once"
    SETUPS.get(page, lambda ns: None)(run.namespace)
    out = io.StringIO()
    for block in runnable:
        if block in skipped:
            continue
        code = block.code
        for old, new in edits:
            code = code.replace(old, new)
        with contextlib.redirect_stdout(out):
            exec(_compile(block, code), run.namespace)
    run.stdout = out.getvalue()
    return run


# ---------------------------------------------------------------------------------------------
# Synthetic data and user objects of the pages' setups.


def _load(relative: str) -> ModuleType:
    """A repository script by path (examples/ and benchmarks/ are not packages)."""
    path = ROOT / relative
    name = f"recis_doc_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(path.parent))  # examples import _common
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def _write_parquet(path: str, columns: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def _click_columns(rows: int, seed: int) -> dict[str, torch.Tensor]:
    """A user (C1) and an item (C2) id per row, a click label that depends on the item, and a
    conversion label set on some clicked rows only."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(0, 40, (rows,), generator=g)
    label = ((items % 3 == 0) ^ (torch.rand(rows, generator=g) < 0.2)).long()
    return {
        "C1": torch.randint(0, 12, (rows,), generator=g),
        "C2": items,
        "label": label,
        "conversion": label * (torch.rand(rows, generator=g) < 0.5).long(),
    }


def _click_batches(batches: int, rows: int, seed: int) -> list[dict[str, torch.Tensor]]:
    return [_click_columns(rows, seed * 1000 + k) for k in range(batches)]


class _Body(nn.Module):
    """Embeddings of the user (C1) and item (C2) ids through an MLP: batch -> (B, 64)."""

    def __init__(self) -> None:
        super().__init__()
        from recis_embedding import EmbeddingEngine, EmbeddingOption

        option = EmbeddingOption(8, device=DEVICE)
        self.embedding = EmbeddingEngine({"C1": option, "C2": option})
        self.mlp = nn.Sequential(nn.Linear(16, 64), nn.ReLU())

    def forward(self, batch: Any) -> torch.Tensor:
        out = self.embedding({"C1": batch["C1"], "C2": batch["C2"]})
        return self.mlp(torch.cat([out["C1"], out["C2"]], dim=1))


class _ClickModel(nn.Module):
    """The single-task contract: ``{"loss", "predictions", "labels"}``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _Body()
        self.head = nn.Linear(64, 1)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        logits = self.head(self.body(batch))[:, 0]
        labels = batch["label"]
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
        return {"loss": loss, "predictions": torch.sigmoid(logits.detach()), "labels": labels}


class _LinearCTR(nn.Module):
    """A plain PyTorch model (no embedding tables) over a (B, 4) feature column ``x``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        logits = self.linear(batch["x"])[:, 0]
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch["label"])
        return {
            "loss": loss,
            "predictions": torch.sigmoid(logits.detach()),
            "labels": batch["label"],
        }


def _linear_batches(batches: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        x = torch.randn(32, 4, generator=g)
        out.append({"x": x, "label": (x[:, 0] + 0.5 * torch.randn(32, generator=g) > 0).float()})
    return out


# ---------------------------------------------------------------------------------------------
# Setups: the objects a page's blocks take as given.


def _setup_root_readme(ns: dict[str, Any]) -> None:
    # The columns of the demo's click log (benchmarks/data.py), where the README reads them.
    _write_parquet(
        "demo-output/data/train/part-00000.parquet",
        {
            "label": [0, 1, 0, 1, 1],
            "I1": pa.array([0.5, None, 1.0, 2.0, 3.0], pa.float32()),
            "C1": pa.array([-7, 12, 2**62, 12, 5], pa.int64()),
            "seq": pa.array([[1, 2], [], [3], [7], [4, 5, 6]], pa.list_(pa.int64())),
        },
    )


def _setup_io_readme(ns: dict[str, Any]) -> None:
    _write_parquet(
        "data/part-0.parquet",
        {
            "label": [0, 1, 0],
            "user": ["a", None, "c"],
            "history": pa.array([[1, 2], [], [3]], pa.list_(pa.int64())),
        },
    )


def _setup_train_readme(ns: dict[str, Any]) -> None:
    torch.manual_seed(0)
    held_out = _linear_batches(2, seed=1)
    ns.update(
        model=_LinearCTR(), train_batches=_linear_batches(6, seed=0), eval_batches=lambda: held_out
    )


def _setup_embedding_concepts(ns: dict[str, Any]) -> None:
    from recis_embedding import SparseAdam
    from recis_kernels import RaggedTensor

    g = torch.Generator().manual_seed(0)
    batch: dict[str, Any] = {
        f"C{i}": torch.randint(-(2**62), 2**62, (4,), generator=g) for i in range(1, 27)
    }
    batch["seq"] = RaggedTensor(
        torch.randint(0, 50, (6,), generator=g), torch.tensor([0, 2, 2, 5, 6])
    )
    model = _Body()
    model(_click_columns(8, seed=0))  # the tables now hold rows
    ns.update(batch=batch, model=model, sparse_optimizer=SparseAdam(model, lr=0.1))
    ns.update(torch=torch, recis_embedding=importlib.import_module("recis_embedding"))


def _setup_train_index(ns: dict[str, Any]) -> None:
    from recis_train import TrainingArguments

    torch.manual_seed(0)
    ns.update(torch=torch, nn=nn, body=_Body(), args=TrainingArguments(output_dir="run"))
    ns.update(
        clicks=_click_batches(3, 32, seed=0),
        recent=_click_batches(2, 32, seed=1),
        holdout=_click_batches(2, 32, seed=2),
    )


def _setup_multistage(ns: dict[str, Any]) -> None:
    from recis_train import Hook, Trainer, TrainingArguments

    common = _load("examples/_common.py")
    example = _load("examples/multistage.py")
    data = common.load_data_module()
    train = data.write_dataset(Path("data/train"), rows=384, files=1, signal=True, seed=0)
    held_out = data.write_dataset(Path("data/eval"), rows=256, files=1, signal=True, seed=1)
    torch.manual_seed(0)
    ns.update(
        model=example.ClickConversion(torch.device(DEVICE)),
        args=TrainingArguments(output_dir="runs"),
        clicks=common.reader(train, 128, shuffle=True, labels=("label",)),
        conversions=common.reader(train, 128, shuffle=True, labels=("conversion",)),
        held_out=lambda: common.reader(held_out, 256, shuffle=False),
        TablesFollowOptimizer=example.TablesFollowOptimizer,
        Hook=Hook,
        Trainer=Trainer,
        nn=nn,
    )


def _setup_multitask(ns: dict[str, Any]) -> None:
    common = _load("examples/_common.py")
    torch.manual_seed(0)
    batch: dict[str, Any] = _click_columns(16, seed=0)
    batch["conversion"][:3] = -1  # not attributed yet
    batch["long_dwell"] = batch["label"]
    batch["dwell_known"] = (torch.arange(16) % 2).long()
    ns.update(body=_Body(), batch=batch, torch=torch)
    # For the MMoE excerpt of examples/mmoe.py: its helpers, and inputs of width 16.
    inputs = nn.Linear(2, 16)
    ns.update(
        mlp=common.mlp,
        TASKS=("click", "conversion"),
        inputs=lambda b: inputs(torch.stack([b["C1"], b["C2"]], 1).float()),
    )


def _setup_online(ns: dict[str, Any]) -> None:
    for hour in range(2):
        columns = _click_columns(64, seed=hour)
        part = f"data/clicks/hour-{hour:02d}/part-0.parquet"
        _write_parquet(part, {k: v.numpy() for k, v in columns.items()})
        (Path(part).parent / "_SUCCESS").touch()
    torch.manual_seed(0)
    model = _ClickModel()
    dense = [p for n, p in model.named_parameters() if not n.startswith("body.embedding")]
    ns.update(model=model, columns=["C1", "C2", "label"], dense_parameters=dense)


def _setup_io_guide(ns: dict[str, Any]) -> None:
    _write_parquet(
        "data/clicks/part-0.parquet",
        {
            "label": [0, 1, 0, 1],
            "price": [1.5, None, 3.0, 4.0],
            "user": ["a", "b", None, "a"],
            "history": pa.array([[1, 2], [], [3], [4]], pa.list_(pa.int64())),
        },
    )


SETUPS: dict[str, Callable[[dict[str, Any]], None]] = {
    "README.md": _setup_root_readme,
    "packages/recis-io/README.md": _setup_io_readme,
    "packages/recis-train/README.md": _setup_train_readme,
    "docs/embedding/index.md": _setup_embedding_concepts,
    "docs/train/index.md": _setup_train_index,
    "docs/train/multistage.md": _setup_multistage,
    "docs/train/multitask.md": _setup_multitask,
    "docs/train/online.md": _setup_online,
    "docs/io/guide.md": _setup_io_guide,
}

EDITS: dict[str, list[tuple[str, str]]] = {
    # `...` stands for the run's other arguments.
    "docs/train/multistage.md": [
        (
            "Trainer(model, args, ...)",
            "Trainer(model, args, train_data=clicks, "
            "dense_optimizer=torch.optim.Adam(model.parameters()))",
        )
    ],
    # A local directory, and a watch that ends soon after the two windows of the setup.
    "docs/train/online.md": [
        ('"/data/clicks"', '"data/clicks"'),
        ("poll_interval=60, idle_timeout=3600", "poll_interval=0.05, idle_timeout=0.2"),
    ],
}


# ---------------------------------------------------------------------------------------------
# Checks: what the comments and the text around the blocks promise.


def _check_features_guide(run: PageRun) -> None:
    out = run.namespace["out"]
    assert out["user"].tolist() == [973020, 350684, 42]
    assert out["item"].tolist() == [7, 7, 8]
    assert out["city"].tolist() == [224, 575, 224]
    assert out["price"].tolist() == [1, 0, 3]
    assert out["clicks"].values.tolist() == [12, 13, 14, 0, 15, 16]
    assert out["clicks"].offsets[0].tolist() == [0, 3, 4, 6]
    assert out["user_x_item"].offsets[0].tolist() == [0, 1, 2, 3]
    assert out["label"] is run.namespace["batch"]["label"]
    steps = [
        {(s["kind"], tuple(s["features"])) for s in step} for step in run.namespace["engine"].plan()
    ]
    assert ("mod", ("user", "item")) in steps[1]
    assert ("fill_missing", ("clicks",)) in steps[1]
    assert ("fill_missing+bucketize", ("price",)) in steps[1]
    assert ("cross+mod", ("user_x_item",)) in steps[1]
    assert steps[2] == {("truncate", ("clicks",))}
    assert steps[3] == {("mod", ("clicks",))}
    ids = run.namespace["ids"]
    expected = recis_kernels.hash_strings(["bb", "ccc", "d"], buckets=10_000)
    assert ids.offsets[0].tolist() == [0, 2, 2, 3]
    assert ids.values.tolist() == expected.tolist()


def _check_root_readme(run: PageRun) -> None:
    ns = run.namespace
    assert ns["label"].shape == (5,)
    batch = ns["batch"]
    assert sorted(batch["I1"].tolist()) == [0.0, 0.5, 1.0, 2.0, 3.0]  # the null read as 0
    assert batch["C1"].dtype == torch.int64
    assert sorted(batch["C1"].tolist()) == [-7, 5, 12, 12, 2**62]
    seq = ns["seq"]
    assert seq.offsets[0].dtype == torch.int64
    assert seq.offsets[0].shape == (6,)
    assert seq.values.numel() == 7
    assert json.loads(json.dumps(ns["state"])) == ns["state"]


def _check_io_readme(run: PageRun) -> None:
    batch = run.namespace["batch"]
    assert batch["label"].shape == (3,)
    user = batch["user"]
    assert user.dtype == torch.int64
    assert user.shape == (3,)
    assert int((user == 0).sum()) == 1  # the null, filled with 0
    assert batch["history"].offsets[0].shape == (4,)
    assert batch["history"].offsets[0].dtype == torch.int64
    json.dumps(run.namespace["state"])


def _check_kernels_readme(run: PageRun) -> None:
    dense = run.value("r.to_dense(pad_value=-1)")
    assert dense.tolist() == [[10, 11], [-1, -1], [12, -1]]
    modded = run.value("rk.fused_mod(")
    assert [t.tolist() for t in modded] == [[3, 4, 5], [5]]


def _check_features_readme(run: PageRun) -> None:
    ns = run.namespace
    out = ns["out"]
    assert torch.equal(out["label"], ns["batch"]["label"])  # passed through
    assert out["user"].tolist() == [3, (2**64 - 7) % 1_000_003]
    assert out["price"].tolist() == [0, 2]
    clicks = run.value('out["clicks"]')
    assert clicks.values.tolist() == list(range(5, 55)) + list(range(55, 60))
    assert clicks.offsets[0].tolist() == [0, 50, 55]
    plain = json.loads(json.dumps(run.value("engine.to_dict()")))
    rebuilt = ns["FeatureEngine"].from_dict(plain)
    assert rebuilt.fingerprint() == run.value("engine.fingerprint()")
    assert re.fullmatch("[0-9a-f]{64}", run.value("engine.fingerprint()"))


def _check_embedding_readme(run: PageRun) -> None:
    ns = run.namespace
    assert {k: tuple(v.shape) for k, v in ns["out"].items()} == {
        "user": (2, 16),
        "item": (2, 16),
        "history": (2, 16),
    }
    assert len(ns["engine"].physical) == 1  # all three features in one physical table
    reader = ns["CheckpointReader"]("ckpt/step-1000")
    embeddings = run.value('CheckpointReader("ckpt/step-1000").read("item")')
    ids = reader.read("item", "ids")
    assert sorted(ids.tolist()) == [3, 4, 5, 1 << 60]  # item and history share the table
    assert embeddings.shape == (4, 16)


def _check_train_readme(run: PageRun) -> None:
    printed = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1, run.stdout
    assert set(ast.literal_eval(printed[0])) == {"loss", "auc", "logloss", "calibration"}
    assert list(Path("runs/ctr/checkpoints").glob("step-*"))


def _check_cuda(run: PageRun) -> None:
    assert run.value(".cubin[:4]") == b"\x7fELF"
    assert sorted(run.value("rk.compile_all(")) == run.value("rk.kernel_names()")


def _check_embedding_concepts(run: PageRun) -> None:
    ns = run.namespace
    x, out, dim = ns["x"], ns["out"], ns["D"]
    assert x.shape == (4, 27 * dim)
    assert torch.equal(out["C1"], x[:, :dim])
    assert out["C1"].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    dense = torch.load("dense.pt")
    with ns["recis_embedding"].tables_saved_separately():
        assert set(dense) == set(ns["model"].state_dict())  # the dense tensors only
    assert Path("tables/manifest.json").is_file()


def _check_train_index(run: PageRun) -> None:
    for stage in ("pretrain", "finetune"):
        assert list(Path("run", stage, "checkpoints").glob("step-*")), stage


def _check_multistage(run: PageRun) -> None:
    ns = run.namespace
    assert set(ns["results"]) == {"pretrain", "finetune"}
    assert 0.0 <= run.value('results["finetune"]["conversion/auc"]') <= 1.0
    tables = ns["loaded"].tables
    assert "C1" not in tables
    assert tables["C2"] > 0
    assert run.stdout.startswith("{'C")


def _check_multitask(run: PageRun) -> None:
    ns = run.namespace
    batch = ns["batch"]
    out = ns["model"](dict(batch, conversion=batch["conversion"].clamp(min=0)))
    assert set(out["losses"]) == {"click", "conversion"}
    assert out["weights"]["conversion"] == 0.5
    assert torch.equal(out["groups"], batch["C1"])
    masked = ns["MultiTask"](ns["body"], ns["tasks"])(batch)
    kept = (batch["label"] != 0) & (batch["conversion"] != -1)
    assert torch.equal(masked["labels"]["conversion"], batch["conversion"][kept])
    assert masked["predictions"]["dwell"].shape == (int((batch["dwell_known"] > 0).sum()),)
    experts = ns["MMoE"](16)(batch)
    assert {k: tuple(v.shape) for k, v in experts.items()} == {
        "click": (16, 32),
        "conversion": (16, 32),
    }


def _check_online(run: PageRun) -> None:
    results = run.namespace["results"]
    assert [w.index for w in results] == [0, 1]
    assert results[0].metrics == {}  # the untrained model's first window is not evaluated
    assert "auc" in results[1].metrics
    assert [w.export_kind for w in results] == ["full", "delta"]
    assert len(run.stdout.splitlines()) == 2  # on_window printed each window


CHECKS: dict[str, Callable[[PageRun], None]] = {
    "README.md": _check_root_readme,
    "packages/recis-io/README.md": _check_io_readme,
    "packages/recis-kernels/README.md": _check_kernels_readme,
    "packages/recis-features/README.md": _check_features_readme,
    "packages/recis-embedding/README.md": _check_embedding_readme,
    "packages/recis-train/README.md": _check_train_readme,
    "docs/kernels/cuda.md": _check_cuda,
    "docs/embedding/index.md": _check_embedding_concepts,
    "docs/train/index.md": _check_train_index,
    "docs/train/multistage.md": _check_multistage,
    "docs/train/multitask.md": _check_multitask,
    "docs/train/online.md": _check_online,
    "docs/features/guide.md": _check_features_guide,
}


@pytest.fixture
def in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# torchdata's StatefulDataLoader (docs/io/guide.md) calls a torch function torch deprecated.
@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")
@pytest.mark.parametrize("page", _pages())
def test_page_examples_run_and_do_what_they_say(page: str, in_tmp_dir: Path) -> None:
    run = run_page(page)
    CHECKS.get(page, lambda run: None)(run)


def test_the_harness_finds_the_pages_it_is_told_about() -> None:
    pages = _pages()
    assert "README.md" in pages
    for page in (*SETUPS, *EDITS, *CHECKS):
        assert page in pages, f"{page} has a setup, edit or check but no python block"


def test_every_marker_comes_right_before_a_python_block() -> None:
    for path in sorted({p for pattern in PAGE_GLOBS for p in ROOT.glob(pattern)}):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if MARKER.match(line) is None:
                continue
            j = i + 1
            while j < len(lines) and (not lines[j].strip() or MARKER.match(lines[j])):
                j += 1
            fence = FENCE.match(lines[j]) if j < len(lines) else None
            lang = fence["lang"] if fence is not None else None
            assert lang == "python", (
                f"{path.relative_to(ROOT)}:{i + 1}: a marker must be followed by a ```python fence"
            )
