"""Data-parallel training with torchrun: DDP over the dense model, embedding tables sharded by id.

Each rank reads its own shard of the click log (recis-io shards by rank when
``torch.distributed`` is initialized), looks up ids in tables whose rows are spread over the
ranks (``EmbeddingEngine(shard=True)``), and trains with ``recis_train.Trainer``, which wraps
the dense part in ``DistributedDataParallel``, stops every rank together, logs cross-rank means
from rank 0, evaluates AUC over every rank's held-out rows and writes one checkpoint to which
every rank adds its table shard. Every rank then prints what it did; rank 0 prints the AUC.

    python examples/torchrun.py --small --out DIR
        starts itself under ``python -m torch.distributed.run`` on 2 CPU processes (gloo);
        this is how CI runs it.
    torchrun --nproc-per-node 2 examples/torchrun.py --small --out DIR
        the same, launched directly; add ``--device cuda`` on a machine with 2 GPUs (NCCL),
        or ``--nnodes``/``--rdzv-endpoint`` for several machines sharing ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn

import recis_embedding as emb
import recis_features as rf
import recis_io
from recis_train import LoggingHook, Trainer, TrainingArguments, find_tables, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DENSE, at_least, load_data_module, outcome
from _common import SPARSE as ALL_SPARSE

SPARSE = ALL_SPARSE[:8]  # a smaller model: 8 categorical fields
DIM = 8


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a small data set (CI)")
    parser.add_argument("--out", default="torchrun-output", help="data and checkpoints")
    parser.add_argument(
        "--rows", type=at_least(1), default=None, help="training rows (overrides --small)"
    )
    parser.add_argument("--nproc", type=int, default=2, help="ranks when starting itself")
    parser.add_argument("--device", default="cpu", help="'cpu' (gloo) or 'cuda' (NCCL)")
    return parser.parse_args(argv)


def launch(argv: list[str], nproc: int) -> int:
    """Start this script on ``nproc`` local ranks with torch's launcher (what torchrun runs)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", str(nproc), str(Path(__file__).resolve()), *argv]
    print("launching: python", " ".join(command[1:]), flush=True)
    return subprocess.run(command, check=False).returncode


def ensure_data(out: Path, train_rows: int, eval_rows: int) -> None:
    """Write the training and held-out click logs once (rank 0; the others wait)."""
    marker = out / "data" / "MANIFEST.json"
    wanted = {"train": train_rows, "eval": eval_rows}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return
    data = load_data_module()
    common = {"row_group_size": 8192, "signal": True, "files": 2}
    data.write_dataset(out / "data" / "train", rows=train_rows, seed=0, **common)
    data.write_dataset(out / "data" / "eval", rows=eval_rows, seed=1, **common)
    marker.write_text(json.dumps(wanted))


def reader(out: Path, split: str, batch_size: int, *, shuffle: bool) -> recis_io.Dataset:
    """This rank's shard of a split: rank and world size come from torch.distributed. The
    evaluation's shards take every row (even_shards=False), so its AUC is over all of them."""
    columns = [recis_io.Column(c, fill=0.0) for c in DENSE] + [*SPARSE, "seq", "label"]
    return recis_io.Dataset(
        out / "data" / split,
        batch_size=batch_size,
        columns=columns,
        shuffle=shuffle,
        seed=0,
        even_shards=split != "eval",
    )


class ClickModel(nn.Module):
    """Sharded embeddings of 8 id columns and the behaviour sequence, and an MLP over them."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        features = [rf.Feature(c).select(c).log1p() for c in DENSE]
        features += [rf.Feature(c).select(c) for c in [*SPARSE, "seq"]]
        self.features = rf.FeatureEngine(features)
        options = {c: emb.EmbeddingOption(DIM, device=device) for c in SPARSE}
        options["seq"] = emb.EmbeddingOption(DIM, shared_name="C2", combiner="mean", device=device)
        # shard=True: each id's row lives on one rank; lookups travel by all-to-all.
        self.embeddings = emb.EmbeddingEngine(options, shard=True)
        self.mlp = nn.Sequential(
            nn.Linear((len(SPARSE) + 1) * DIM + len(DENSE), 64), nn.ReLU(), nn.Linear(64, 1)
        )

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        values = self.embeddings(self.features(batch))
        fields = [values[c] for c in [*SPARSE, "seq"]] + [values[c].float()[:, None] for c in DENSE]
        logits = self.mlp(torch.cat(fields, dim=1))[:, 0]
        labels = batch["label"].float()
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
        return {"loss": loss, "predictions": torch.sigmoid(logits), "labels": labels}


def train(opts: argparse.Namespace) -> int:
    """One rank's part of the run (under torchrun)."""
    cuda = opts.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(opts.out)
    train_rows = opts.rows or (40_000 if opts.small else 1_000_000)
    batch_size = 256 if opts.small else 2048  # per rank: a step trains world * batch_size rows
    if rank == 0:
        ensure_data(out, train_rows, max(train_rows // 10, 8_000))
    dist.barrier()

    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    seed_everything(0)
    model = ClickModel(device)
    train_data = reader(out, "train", batch_size, shuffle=True)
    steps = train_data.batches_per_epoch()  # the same on every rank: shards are equal
    args = TrainingArguments(
        output_dir=str(out / "run"),
        log_every=max(steps // 5, 1),
        save_every=max(steps // 2, 1),
        max_to_keep=2,
        device=str(device),
        resume=False,
    )
    trainer = Trainer(
        model,
        args,
        train_data=train_data,
        eval_data=lambda: reader(out, "eval", 4096, shuffle=False),
        dense_optimizer=torch.optim.Adam(model.mlp.parameters(), lr=2e-3),
        sparse_optimizer=emb.SparseAdam(model, lr=5e-3),
        hooks=[LoggingHook()],  # prints on rank 0 only
    )
    started = time.perf_counter()
    final = trainer.train_and_evaluate()
    elapsed = time.perf_counter() - started
    shard_rows = sum(t.stats().rows for t in find_tables(trainer.model).values())
    # One line per rank, in rank order.
    for r in range(world):
        if r == rank:
            print(
                f"rank {rank}/{world} ({trainer.device}): {trainer.global_step} steps of "
                f"{batch_size} rows from its shard, {shard_rows:,} embedding rows owned, "
                f"{elapsed:.1f}s",
                flush=True,
            )
        dist.barrier()
    ok = final["auc"] > 0.6
    if rank == 0:
        print(
            f"held-out AUC {final['auc']:.4f} (every rank's rows), logloss {final['logloss']:.4f}"
        )
        print(f"checkpoint {trainer.checkpoints.latest()} (one table file per rank)")
    dist.destroy_process_group()
    return outcome({f"held-out AUC {final['auc']:.4f} above 0.6": ok})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse(argv)
    if "LOCAL_RANK" not in os.environ:  # started plainly: become the launcher
        return launch(argv, opts.nproc)
    return train(opts)


def _leave(code: int) -> NoReturn:
    """End a rank whose work is done (checkpoint written, process group destroyed) without the
    interpreter's teardown: torch's C++ threads left from the collectives at times abort a rank
    there ("terminate called without an active exception", SIGABRT), which fails a run that
    succeeded (seen once in a clean-checkout CI run of this project)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    code = main()
    if "LOCAL_RANK" in os.environ:
        _leave(code)
    sys.exit(code)
