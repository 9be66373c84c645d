"""What the model examples share: the seeded click log, its reader and features, the command line.

Every example writes the click log of ``benchmarks/data.py`` with its planted signal (a training
set and a held-out set), reads it with ``recis_io.Dataset``, transforms it with one
``recis_features.FeatureEngine`` (log1p of the 13 dense columns, the behaviour sequence cut to
its most recent ids) and trains with ``recis_train``. Scripts import this module by path (it is
not a package); the ``examples`` nox session skips files starting with ``_``.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import recis_features as rf
import recis_io
from recis_train import TrainingArguments

ROOT = Path(__file__).resolve().parent.parent
DENSE = [f"I{i}" for i in range(1, 14)]
SPARSE = [f"C{i}" for i in range(1, 27)]
LABELS = ("label", "conversion")
SEQ_LEN = 50


def load_data_module() -> Any:
    """``benchmarks/data.py`` of this repository (not an installed package)."""
    spec = importlib.util.spec_from_file_location(
        "recis_bench_data", ROOT / "benchmarks" / "data.py"
    )
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load {ROOT / 'benchmarks' / 'data.py'}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer of at least ``minimum``, refused with its flag's name
    otherwise (``--rows 0`` would otherwise read as "not given")."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """``--small`` (CI size), ``--out DIR``, ``--rows N``, ``--threads N``; adds ``train_rows``,
    ``eval_rows``, ``batch_size`` and ``device`` (CUDA when there is one).

    With ``--small`` torch uses one thread unless ``--threads`` says otherwise: on a machine
    whose few cores are shared (CI), torch's spinning OpenMP threads wait for descheduled
    siblings and small steps get an order of magnitude slower.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--small", action="store_true", help="a small data set (CI)")
    parser.add_argument("--out", default="example-output", help="where data and checkpoints go")
    parser.add_argument(
        "--rows", type=at_least(1), default=None, help="training rows (overrides --small)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: 1 with --small)"
    )
    opts = parser.parse_args(argv)
    threads = opts.threads if opts.threads is not None else (1 if opts.small else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    opts.out = Path(opts.out)
    opts.train_rows = opts.rows or (30_000 if opts.small else 1_000_000)
    opts.eval_rows = max(opts.train_rows // 10, 8_000)
    opts.batch_size = 512 if opts.small else 4096
    opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    return opts


def write_data(out: Path, train_rows: int, eval_rows: int) -> tuple[list[Path], list[Path]]:
    """The training and held-out click logs (the planted signal is the same in both)."""
    data = load_data_module()
    common = {"row_group_size": 65_536, "signal": True, "compression": "zstd"}
    train = data.write_dataset(out / "train", rows=train_rows, files=2, seed=0, **common)
    held_out = data.write_dataset(out / "eval", rows=eval_rows, files=1, seed=1, **common)
    return train, held_out


def reader(
    files: Sequence[Path],
    batch_size: int,
    *,
    shuffle: bool,
    labels: Sequence[str] = LABELS,
    sequence: bool = True,
    epochs: int = 1,
) -> recis_io.Dataset:
    """Batches of the dense columns (nulls read as 0), the 26 ids, the behaviour sequence
    (unless ``sequence=False``) and the ``labels`` columns."""
    columns: list[Any] = [recis_io.Column(c, fill=0.0) for c in DENSE]
    columns += [*SPARSE, *(["seq"] if sequence else []), *labels]
    return recis_io.Dataset(
        [str(f) for f in files],
        batch_size=batch_size,
        columns=columns,
        shuffle=shuffle,
        seed=0,
        epochs=epochs,
    )


def feature_engine(seq_len: int | None = SEQ_LEN) -> rf.FeatureEngine:
    """log1p of the dense columns, the ids as they are and (unless ``seq_len`` is ``None``) the
    ``seq_len`` most recent behaviours."""
    features = [rf.Feature(c).select(c).log1p() for c in DENSE]
    features += [rf.Feature(c).select(c) for c in SPARSE]
    if seq_len is not None:
        features.append(rf.Feature("seq").select("seq").truncate(seq_len, side="tail"))
    return rf.FeatureEngine(features)


def constant_logloss(files: Sequence[Path], column: str, *, where: str | None = None) -> float:
    """Log loss of always predicting the base rate of ``column`` (what a model must beat).

    With ``where``, only rows whose ``where`` column is nonzero count (a task trained with
    ``Task(mask=where)``).
    """
    positives = rows = 0.0
    labels_read = (column,) if where is None else (column, where)
    for batch in reader(files, 65_536, shuffle=False, labels=labels_read, sequence=False):
        labels = batch[column]
        assert isinstance(labels, torch.Tensor)
        if where is not None:
            kept = batch[where]
            assert isinstance(kept, torch.Tensor)
            labels = labels[kept != 0]
        positives += float(labels.sum())
        rows += int(labels.shape[0])
    rate = positives / rows
    return -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))


def dense_matrix(values: Mapping[str, Any]) -> torch.Tensor:
    """``(B, 13)`` float32 of the transformed dense columns."""
    return torch.stack([values[c].float() for c in DENSE], dim=1)


def mlp(sizes: Sequence[int], *, last_activation: bool = True) -> nn.Sequential:
    """Linear layers of ``sizes`` (input first) with ReLU between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if last_activation or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def training_arguments(
    opts: argparse.Namespace, run_dir: Path, **overrides: Any
) -> TrainingArguments:
    """One pass over the training rows, evaluated twice, logged ten times, no resume."""
    steps = math.ceil(opts.train_rows / opts.batch_size)
    values: dict[str, Any] = {
        "output_dir": str(run_dir),
        "train_steps": steps,
        "eval_every": math.ceil(steps / 2),
        "log_every": max(steps // 10, 1),
        "device": opts.device,
        "resume": False,
        "max_to_keep": 1,
    }
    return TrainingArguments(**(values | overrides))


def print_results(title: str, results: Mapping[str, float], keys: Sequence[str]) -> None:
    """A short block of ``key value`` lines under ``title``."""
    print(f"\n=== {title} ===")
    width = max(len(k) for k in keys)
    for key in keys:
        print(f"{key:<{width}}  {results[key]:.4f}")


def outcome(checks: dict[str, bool]) -> int:
    """The example's exit status: 0 when every check holds, else 1 after naming the failed
    ones on stderr (CI runs the examples and reads the status)."""
    failed = [what for what, held in checks.items() if not held]
    if failed:
        print(f"example checks failed: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
