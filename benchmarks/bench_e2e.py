"""End to end: the demo's model trained by recis vs the same model in plain PyTorch (and TorchRec).

Workload: the seeded click log with its planted signal (``data.py``, ``signal=True``): a
training set of ``--rows`` rows in 4 Parquet files and a held-out file of ``--rows // 5`` rows.
Every contender trains the demo's multi-task DeepFM (``examples/demo.py``: 26 categorical
fields and the behaviour sequence, its 50 most recent ids mean-pooled through the item table, at
dim 8; FM interactions + MLP over them and the 13 log1p dense features; click and conversion
heads, conversion weighted 0.5) for the same number of steps of the same batch size, one pass
over the training set, with Adam (lr 2e-3) on the dense parameters and sparse Adam (lr 5e-3)
on the embeddings (TorchRec: see below), embeddings initialized N(0, 0.01²) truncated.

- recis: ``recis_io.Dataset`` (shuffled) → ``FeatureEngine`` → ``EmbeddingEngine`` (dynamic
  hash tables, all fused into one; no id modulo) → ``recis_train.Trainer`` with
  ``recis_embedding.SparseAdam``; no hooks, no checkpoints.
- PyTorch: a ``torch.utils.data.DataLoader`` (``--workers`` worker processes) over an
  ``IterableDataset`` reading the same Parquet files with pyarrow (row groups in a seeded random
  order, rows shuffled within each), one ``nn.EmbeddingBag(sparse=True)`` of ``--table-rows`` rows
  per field (ids modulo that; the sequence reads the ``C2`` bag), ``torch.optim.SparseAdam`` on
  the bags and ``torch.optim.Adam`` on the rest.
- TorchRec, where ``torchrec`` imports and runs (otherwise the report says why and the row reads
  "not measured"): the same DataLoader; the batch turned into a ``KeyedJaggedTensor`` (26
  single-id features and the sequence, ids modulo ``--table-rows``) for one
  ``FusedEmbeddingBagCollection`` of 26 ``EmbeddingBagConfig`` tables, the sequence a second
  feature of the ``C2`` table (TorchRec pools per table, so that table pools by MEAN, which is
  SUM for ``C2``'s one id per row; the others by SUM). Its FBGEMM TBE kernels update the rows
  inside the backward pass with exact row-wise Adagrad (``--torchrec-lr``, default 0.05, the
  rate ``bench_embedding.py`` gives row-wise Adagrad: at Adam's 5e-3 row-wise Adagrad trains
  the embeddings too slowly, and the same model trained by recis with row-wise Adagrad at 5e-3
  reached click AUC 0.71 against 0.78 at 0.05): FBGEMM's CPU kernels have no Adam
  (``Optimizer adam is not supported in CPU mode``).
  ``torchrec.optim.apply_optimizer_in_backward`` on a plain ``EmbeddingBagCollection`` is not
  used: unsharded, it steps a torch optimizer on each table's dense gradient, not through TBE.
  ``torch.optim.Adam`` on the rest. Runs with torchrec 1.9.2 on torch 2.14 with
  fbgemm-gpu-cpu 1.9.0 (``nox -s bench-fbgemm -- e2e``: torchrec installed without its
  dependencies, since it asks for the CUDA fbgemm-gpu). With torch 2.15 it does not: the CUDA
  fbgemm-gpu 1.9.0 cannot load without ``libnvidia-ml.so.1`` and fbgemm-gpu-cpu 1.9.0 fails
  with an undefined torch symbol (``c10::report_overflow``).

Reported per contender: training samples/s over the whole training run (reading, features,
lookups, forward, backward and the optimizer steps; evaluation excluded), and the held-out AUC
per task after training (the same ``recis_train.metrics.AUROC`` for all); ratios are over
PyTorch, and the last line gives recis over TorchRec. On a shared 2-core machine use
``--threads 1`` (see ``bench_embedding.py``).

Run: ``python benchmarks/bench_e2e.py [--rows 200000] [--batch 4096] [--threads N]``; with
TorchRec: ``nox -s bench-fbgemm -- e2e [--threads N]``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import print_table, write_json
from data import write_dataset

ROOT = Path(__file__).resolve().parent.parent
DENSE = [f"I{i}" for i in range(1, 14)]
SPARSE = [f"C{i}" for i in range(1, 27)]
SEQ_LEN = 50
DIM = 8
TASKS = {"click": ("label", 1.0), "conversion": ("conversion", 0.5)}
DENSE_LR, SPARSE_LR = 2e-3, 5e-3
TORCHREC_LR = 0.05  # row-wise Adagrad's, as in bench_embedding.py


def load_demo() -> Any:
    """``examples/demo.py``: its DeepFM body and recis-io reader are the recis contender."""
    spec = importlib.util.spec_from_file_location("recis_demo", ROOT / "examples" / "demo.py")
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load {ROOT / 'examples' / 'demo.py'}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- recis


def train_recis(
    demo: Any,
    train: list[Path],
    held_out: list[Path],
    steps: int,
    batch: int,
    device: str,
    out: Path,
) -> dict[str, float]:
    from recis_embedding import SparseAdam
    from recis_train import MultiTask, Task, Trainer, TrainingArguments, seed_everything
    from recis_train.metrics import AUROC

    seed_everything(0)
    body = demo.DeepFM(torch.device(device))
    model = MultiTask(
        body,
        [
            Task(name, nn.Linear(body.out_dim, 1), label=column, weight=weight)
            for name, (column, weight) in TASKS.items()
        ],
    )
    args = TrainingArguments(
        output_dir=str(out),
        train_steps=steps,
        device=device,
        resume=False,
        save_at_end=False,
        log_every=max(steps, 1),
    )
    trainer = Trainer(
        model,
        args,
        train_data=demo.reader(train, batch, shuffle=True),
        dense_optimizer=torch.optim.Adam(model.parameters(), lr=DENSE_LR),
        sparse_optimizer=SparseAdam(model, lr=SPARSE_LR),
        metrics={"auc": AUROC},
    )
    gc.collect()  # garbage of an earlier run is not billed to this one
    start = time.perf_counter()
    trainer.train()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    seconds = time.perf_counter() - start
    results = trainer.evaluate(demo.reader(held_out, 8192, shuffle=False))
    samples = sum(logs["samples"] for _, logs in trainer.history["train"])
    return {
        "steps": trainer.global_step,
        "samples": samples,
        "seconds": seconds,
        **{f"{t}_auc": results[f"{t}/auc"] for t in TASKS},
    }


# ----------------------------------------------------------------------------- PyTorch


def _tail_ids(seq: pa.ListArray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The last ``keep`` ids of every row, flat, and each row's start offset (EmbeddingBag)."""
    offsets = seq.offsets.to_numpy().astype(np.int64)
    values = seq.values.to_numpy()
    ends = offsets[1:]
    kept = np.minimum(ends - offsets[:-1], keep)
    starts = np.zeros(len(kept), dtype=np.int64)
    np.cumsum(kept[:-1], out=starts[1:])
    within = np.arange(int(kept.sum()), dtype=np.int64) - np.repeat(starts, kept)
    return values[np.repeat(ends - kept, kept) + within], starts


def to_tensors(table: pa.Table) -> dict[str, torch.Tensor]:
    """One batch: ``dense (B, 13)`` log1p, ``ids (B, 26)``, ``seq``/``seq_offsets``, labels."""
    dense = np.stack([table.column(c).fill_null(0.0).to_numpy() for c in DENSE], axis=1)
    ids = np.stack([table.column(c).to_numpy() for c in SPARSE], axis=1)
    seq, offsets = _tail_ids(table.column("seq").combine_chunks(), SEQ_LEN)
    out = {
        "dense": torch.from_numpy(np.log1p(dense.astype(np.float32))),
        "ids": torch.from_numpy(ids),
        "seq": torch.from_numpy(seq),
        "seq_offsets": torch.from_numpy(offsets),
    }
    for column, _ in TASKS.values():
        out[column] = torch.tensor(table.column(column).to_numpy(), dtype=torch.int64)
    return out


class ParquetBatches(torch.utils.data.IterableDataset):
    """Batches of ``batch_size`` rows from Parquet files, read with pyarrow.

    With ``shuffle``, row groups come in a seeded random order and rows are shuffled within
    each; batches span row-group boundaries, so every batch but the last is full.
    """

    def __init__(self, files: list[Path], batch_size: int, *, shuffle: bool, seed: int = 0):
        self.files, self.batch_size, self.shuffle, self.seed = files, batch_size, shuffle, seed

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rng = np.random.default_rng(self.seed)
        units = [(f, g) for f in self.files for g in range(pq.ParquetFile(f).num_row_groups)]
        if self.shuffle:
            units = [units[i] for i in rng.permutation(len(units))]
        columns = [*DENSE, *SPARSE, "seq", *(c for c, _ in TASKS.values())]
        pending: pa.Table | None = None
        for path, group in units:
            table = pq.ParquetFile(path).read_row_group(group, columns=columns)
            if self.shuffle:
                table = table.take(pa.array(rng.permutation(table.num_rows)))
            pending = table if pending is None else pa.concat_tables([pending, table])
            while pending.num_rows >= self.batch_size:
                yield to_tensors(pending.slice(0, self.batch_size))
                pending = pending.slice(self.batch_size)
        if pending is not None and pending.num_rows:
            yield to_tensors(pending)


class DeepFMTop(nn.Module):
    """The demo's DeepFM above its embeddings: FM interactions + MLP, a logit per task."""

    def __init__(self) -> None:
        super().__init__()
        fields = len(SPARSE) + 1
        self.dense_norm = nn.BatchNorm1d(len(DENSE))
        self.mlp = nn.Sequential(
            nn.Linear(fields * DIM + len(DENSE), 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU()
        )
        self.heads = nn.ModuleDict({t: nn.Linear(64 + 1, 1) for t in TASKS})

    def forward(self, fields: torch.Tensor, dense: torch.Tensor) -> dict[str, torch.Tensor]:
        """``fields (B, F, D)`` pooled embeddings and ``dense (B, 13)`` → ``{task: (B,)}``."""
        fm = 0.5 * (fields.sum(1).pow(2) - fields.pow(2).sum(1)).sum(1, keepdim=True)
        deep = self.mlp(torch.cat([fields.flatten(1), self.dense_norm(dense)], dim=1))
        shared = torch.cat([deep, fm], dim=1)
        return {t: head(shared)[:, 0] for t, head in self.heads.items()}


class TorchDeepFM(nn.Module):
    """The demo's DeepFM with fixed-size ``nn.EmbeddingBag`` tables (ids modulo their size)."""

    def __init__(self, table_rows: int) -> None:
        super().__init__()
        self.table_rows = table_rows
        bags = [nn.EmbeddingBag(table_rows, DIM, mode="sum", sparse=True) for _ in SPARSE]
        for bag in bags:
            nn.init.trunc_normal_(bag.weight, std=0.01, a=-0.02, b=0.02)
        self.item = bags[SPARSE.index("C2")]  # the sequence reads the item table
        self.bags = nn.ModuleList(bags)
        self.top = DeepFMTop()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = torch.remainder(batch["ids"], self.table_rows)
        rows = torch.arange(ids.shape[0], device=ids.device)
        pooled = [bag(ids[:, j], rows) for j, bag in enumerate(self.bags)]
        seq = torch.remainder(batch["seq"], self.table_rows)
        pooled.append(
            nn.functional.embedding_bag(
                seq, self.item.weight, batch["seq_offsets"], mode="mean", sparse=True
            )
        )
        return self.top(torch.stack(pooled, dim=1), batch["dense"])


def fit(
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    train: list[Path],
    held_out: list[Path],
    steps: int,
    batch: int,
    device: str,
    workers: int,
) -> dict[str, float]:
    """Train ``model`` on the DataLoader for ``steps`` steps, then its held-out AUC per task.

    ``optimizers`` are stepped after every backward pass (an optimizer fused into the backward
    pass, like TorchRec's, is not among them).
    """
    from recis_train.metrics import AUROC

    loader = torch.utils.data.DataLoader(
        ParquetBatches(train, batch, shuffle=True),
        batch_size=None,
        num_workers=workers,
        pin_memory=device == "cuda",
    )
    gc.collect()  # garbage of an earlier run is not billed to this one
    start = time.perf_counter()
    samples = done = 0
    model.train()
    for data in loader:
        if done == steps:
            break
        data = {k: v.to(device, non_blocking=True) for k, v in data.items()}
        logits = model(data)
        loss = sum(
            weight * nn.functional.binary_cross_entropy_with_logits(logits[t], data[c].float())
            for t, (c, weight) in TASKS.items()
        )
        loss.backward()  # type: ignore[union-attr]
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        samples += int(data["label"].shape[0])
        done += 1
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()  # the last steps' kernels are part of the run
    seconds = time.perf_counter() - start
    aucs = {t: AUROC() for t in TASKS}
    model.eval()
    with torch.no_grad():
        for data in ParquetBatches(held_out, 8192, shuffle=False):
            data = {k: v.to(device) for k, v in data.items()}
            logits = model(data)
            for t, (c, _) in TASKS.items():
                aucs[t].update(torch.sigmoid(logits[t]).float(), data[c])
    return {
        "steps": done,
        "samples": samples,
        "seconds": seconds,
        **{f"{t}_auc": aucs[t].compute() for t in TASKS},
    }


def train_torch(
    train: list[Path],
    held_out: list[Path],
    steps: int,
    batch: int,
    device: str,
    table_rows: int,
    workers: int,
) -> dict[str, float]:
    torch.manual_seed(0)
    model = TorchDeepFM(table_rows).to(device)
    sparse = [p for bag in model.bags for p in bag.parameters()]
    dense = [p for p in model.parameters() if all(p is not q for q in sparse)]
    optimizers = [
        torch.optim.Adam(dense, lr=DENSE_LR),
        torch.optim.SparseAdam(sparse, lr=SPARSE_LR),
    ]
    return fit(model, optimizers, train, held_out, steps, batch, device, workers)


# ----------------------------------------------------------------------------- TorchRec

KEYS = [*SPARSE, "seq"]  # the KeyedJaggedTensor's features, in the order of the model's fields


class TorchRecDeepFM(nn.Module):
    """The demo's DeepFM over one TorchRec ``FusedEmbeddingBagCollection`` (FBGEMM TBE).

    One ``EmbeddingBagConfig`` of ``table_rows`` rows per categorical field (ids modulo that),
    the sequence a second feature of the ``C2`` table. TorchRec pools per table, not per feature,
    so the ``C2`` table pools by MEAN (the sequence's combiner), which for ``C2``'s single id per
    row is its SUM; the other 25 tables pool by SUM. The collection updates its rows inside the
    backward pass with FBGEMM's exact row-wise Adagrad (``optimizer_type=RowWiseAdagrad``):
    FBGEMM's CPU kernels have no Adam.
    """

    def __init__(self, table_rows: int, lr: float, device: torch.device) -> None:
        from torchrec import EmbeddingBagConfig, PoolingType
        from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
        from torchrec.optim import RowWiseAdagrad

        super().__init__()
        self.table_rows = table_rows
        tables = [
            EmbeddingBagConfig(
                name=c,
                embedding_dim=DIM,
                num_embeddings=table_rows,
                feature_names=[c, "seq"] if c == "C2" else [c],
                pooling=PoolingType.MEAN if c == "C2" else PoolingType.SUM,
            )
            for c in SPARSE
        ]
        self.ebc = FusedEmbeddingBagCollection(
            tables=tables,
            optimizer_type=RowWiseAdagrad,
            optimizer_kwargs={"lr": lr},
            device=device,
        )
        for bag in self.ebc.embedding_bags.values():  # views of the TBE's weights
            nn.init.trunc_normal_(bag.weight, std=0.01, a=-0.02, b=0.02)
        self.top = DeepFMTop().to(device)

    def dense_parameters(self) -> list[nn.Parameter]:
        """Everything but the embeddings (those the fused optimizer updates)."""
        return list(self.top.parameters())

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from torchrec import KeyedJaggedTensor

        ids = torch.remainder(batch["ids"], self.table_rows)  # (B, 26)
        seq = torch.remainder(batch["seq"], self.table_rows)
        end = torch.tensor([seq.numel()], dtype=torch.int64, device=seq.device)
        seq_lengths = torch.diff(batch["seq_offsets"], append=end)
        features = KeyedJaggedTensor.from_lengths_sync(
            KEYS,
            torch.cat([ids.t().reshape(-1), seq]),  # feature-major: all of C1, then C2, ...
            torch.cat([torch.ones(ids.numel(), dtype=torch.int64, device=ids.device), seq_lengths]),
        )
        pooled = self.ebc(features).to_dict()
        return self.top(torch.stack([pooled[k] for k in KEYS], dim=1), batch["dense"])


def train_torchrec(
    train: list[Path],
    held_out: list[Path],
    steps: int,
    batch: int,
    device: str,
    table_rows: int,
    workers: int,
    sparse_lr: float,
) -> dict[str, float]:
    torch.manual_seed(0)
    model = TorchRecDeepFM(table_rows, sparse_lr, torch.device(device))
    dense_opt = torch.optim.Adam(model.dense_parameters(), lr=DENSE_LR)
    return fit(model, [dense_opt], train, held_out, steps, batch, device, workers)


def torchrec_status(device: str) -> str | None:
    """None when TorchRec's fused collection runs a step on ``device``, else why not."""
    try:
        from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
        from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
        from torchrec.optim import RowWiseAdagrad

        config = EmbeddingBagConfig(
            name="t", embedding_dim=4, num_embeddings=8, feature_names=["f"]
        )
        ebc = FusedEmbeddingBagCollection(
            tables=[config],
            optimizer_type=RowWiseAdagrad,
            optimizer_kwargs={"lr": 0.1},
            device=torch.device(device),
        )
        before = ebc.embedding_bags["t"].weight.detach().clone()
        ids = torch.tensor([1, 3], device=device)
        kjt = KeyedJaggedTensor.from_lengths_sync(["f"], ids, torch.ones_like(ids))
        ebc(kjt).values().sum().backward()
        changed = (ebc.embedding_bags["t"].weight.detach() != before).any(1)
        if changed.nonzero().flatten().tolist() != [1, 3]:
            return "not measured: the fused collection's backward did not update the rows it read"
    except Exception as err:  # an ImportError, or fbgemm_gpu failing to load its library
        text = str(err).strip().splitlines()[-1] if str(err).strip() else ""
        return f"not measured: torchrec does not import and run here ({type(err).__name__}: {text})"
    return None


# ----------------------------------------------------------------------------- main


def median_run(runs: list[dict[str, float]]) -> dict[str, Any]:
    """The run of median samples/s (of an even number, the slower of the two middle ones),
    with every run's rate."""
    rates = [r["samples"] / r["seconds"] for r in runs]
    middle = sorted(range(len(runs)), key=rates.__getitem__)[(len(runs) - 1) // 2]
    return dict(runs[middle], samples_per_s=rates[middle], all_samples_per_s=rates)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000, help="training rows")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    ap.add_argument(
        "--table-rows",
        type=int,
        default=1 << 18,
        help="rows per PyTorch/TorchRec table (ids modulo it)",
    )
    ap.add_argument(
        "--torchrec-lr",
        type=float,
        default=TORCHREC_LR,
        help="learning rate of TorchRec's fused row-wise Adagrad on the embeddings",
    )
    ap.add_argument("--reps", type=int, default=1, help="training runs per contender")
    ap.add_argument(
        "--warmup-steps",
        type=int,
        default=5,
        help="steps of an untimed first run per contender (kernel compiles and loads, "
        "allocator and library set-up; 0: none)",
    )
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    ap.add_argument(
        "--data", default=None, help="directory for the data (default: a temporary one)"
    )
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error(f"--reps must be at least 1, got {args.reps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    steps = math.ceil(args.rows / args.batch)
    with tempfile.TemporaryDirectory(prefix="recis-bench-e2e-") as tmp:
        root = Path(args.data) if args.data else Path(tmp)
        common: dict[str, Any] = {"signal": True, "row_group_size": 65_536, "compression": "zstd"}
        train = write_dataset(root / "train", rows=args.rows, files=4, seed=0, **common)
        held_out = write_dataset(
            root / "eval", rows=max(args.rows // 5, 10_000), files=1, seed=1, **common
        )
        demo = load_demo()
        torchrec = torchrec_status(device)
        runs: dict[str, list[dict[str, float]]] = {"recis": [], "PyTorch": []}
        if torchrec is None:
            runs["TorchRec"] = []
        if args.warmup_steps > 0:
            warm = min(args.warmup_steps, steps)
            train_recis(demo, train, held_out, warm, args.batch, device, Path(tmp) / "warmup")
            train_torch(train, held_out, warm, args.batch, device, args.table_rows, args.workers)
            if torchrec is None:
                train_torchrec(
                    train,
                    held_out,
                    warm,
                    args.batch,
                    device,
                    args.table_rows,
                    args.workers,
                    args.torchrec_lr,
                )
        for rep in range(args.reps):  # alternated, so a busy spell hits all alike
            runs["recis"].append(
                train_recis(demo, train, held_out, steps, args.batch, device, Path(tmp) / f"{rep}")
            )
            runs["PyTorch"].append(
                train_torch(
                    train, held_out, steps, args.batch, device, args.table_rows, args.workers
                )
            )
            if "TorchRec" in runs:
                runs["TorchRec"].append(
                    train_torchrec(
                        train,
                        held_out,
                        steps,
                        args.batch,
                        device,
                        args.table_rows,
                        args.workers,
                        args.torchrec_lr,
                    )
                )
    results = {name: median_run(r) for name, r in runs.items()}
    base = results["PyTorch"]
    rows = []
    for name, r in results.items():
        rate = r["samples_per_s"]
        rows.append(
            [
                name,
                int(r["steps"]),
                rate,
                rate / base["samples_per_s"],
                r["click_auc"],
                r["conversion_auc"],
                r["click_auc"] / base["click_auc"],
                r["conversion_auc"] / base["conversion_auc"],
            ]
        )
    if torchrec is not None:
        rows.append(["TorchRec", "", "not measured", "", "", "", "", ""])
    print_table(
        f"end to end, demo DeepFM: {args.rows:,} training rows, batch {args.batch}, "
        f"{steps} steps, median of {args.reps} run(s) after a {args.warmup_steps}-step warm-up, "
        f"{device}, torch threads {torch.get_num_threads()}, "
        f"DataLoader workers {args.workers}, PyTorch/TorchRec rows/table {args.table_rows:,}",
        [
            "contender",
            "steps",
            "samples/s",
            "x PyTorch",
            "click AUC",
            "conversion AUC",
            "click AUC x PyTorch",
            "conversion AUC x PyTorch",
        ],
        rows,
    )
    if torchrec is None:
        import fbgemm_gpu
        import torchrec as trec

        ours, theirs = results["recis"], results["TorchRec"]
        torchrec = (
            f"torchrec {trec.__version__}, fbgemm_gpu {fbgemm_gpu.__version__}: "
            "FusedEmbeddingBagCollection (FBGEMM TBE), embeddings by fused exact row-wise "
            f"Adagrad lr {args.torchrec_lr:g}, dense by Adam lr {DENSE_LR:g}; "
            f"recis / TorchRec: samples/s {ours['samples_per_s'] / theirs['samples_per_s']:.2f}x, "
            f"click AUC {ours['click_auc'] / theirs['click_auc']:.3f}x, "
            f"conversion AUC {ours['conversion_auc'] / theirs['conversion_auc']:.3f}x"
        )
    # Each rep ran the contenders back to back: its ratio shows how much the machine moved.
    pairs = ", ".join(
        f"{ours / theirs:.2f}x"
        for ours, theirs in zip(
            results["recis"]["all_samples_per_s"],
            results["PyTorch"]["all_samples_per_s"],
            strict=True,
        )
    )
    print(f"recis / PyTorch samples/s in each rep (run back to back): {pairs}")
    print(f"TorchRec: {torchrec}")
    write_json(
        "e2e",
        {
            "rows": args.rows,
            "batch": args.batch,
            "steps": steps,
            "device": device,
            "workers": args.workers,
            "table_rows": args.table_rows,
            "torchrec": torchrec,
            "torchrec_lr": args.torchrec_lr,
            "reps": args.reps,
            "warmup_steps": args.warmup_steps,
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
