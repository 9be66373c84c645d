"""Data-parallel training over ``torch.distributed``: the collectives the Trainer runs per rank.

Under ``torchrun`` every rank runs the same :class:`~recis_train.Trainer` loop on its own share
of the data. The dense parameters are replicated and wrapped in ``DistributedDataParallel``;
the embedding tables are sharded by id over the ranks by recis-embedding (they hold no
``nn.Parameter``, so DDP never sees them). Every rank back-propagates ``loss / world_size``
and both kinds of gradient are *summed* over the ranks: DDP through :func:`sum_gradients`
(a communication hook that all-reduces without DDP's own division) and the sharded tables
through their all-to-all, which adds the gradients every rank computed for a row. So a run of
``W`` ranks with ``b`` rows per rank takes exactly the steps of one process training on the
``W * b`` rows of all ranks with the mean loss, up to float summation order.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from recis_embedding._sharding import cuda_only, gather_objects_on_host, handed_over
from recis_train._checkpoint import CheckpointManager, Writer, file_checksums, first_verified
from recis_train.exceptions import CheckpointError, ConfigError, RankFailedError

__all__ = [
    "DistributedContext",
    "all_reduce",
    "gather_objects",
    "own_rank_state",
    "sum_gradients",
]


def sum_gradients(group: Any, bucket: Any) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: all-reduce a gradient bucket as a sum (no division by the world)."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def all_reduce(tensor: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> None:
    """``dist.all_reduce`` over the default group, in place. A CPU tensor (gloo) stays
    referenced until the group's worker thread lets go of it: freed first by Python, it is
    left to that thread to free, which takes the GIL, and a process group destroyed meanwhile
    (``destroy_process_group()`` after the run) waits for that thread with the GIL held on
    torch releases before 2.8, a deadlock (see recis_embedding's ``handed_over``)."""
    with handed_over(tensor) if tensor.device.type == "cpu" else contextlib.nullcontext():
        dist.all_reduce(tensor, op=op)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank: over gloo through CPU
    tensors kept as in :func:`all_reduce` (``dist.all_gather_object`` frees its own on
    return), over NCCL by ``dist.all_gather_object``."""
    if cuda_only(dist.get_backend()):
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return gather_objects_on_host(obj, dist.get_rank(), dist.get_world_size())


class DistributedContext:
    """This process's rank in an initialized default process group with two or more ranks.

    Args:
        rank: this process's rank.
        world_size: number of ranks.
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size

    @classmethod
    def detect(cls) -> DistributedContext | None:
        """The context of the default process group, or ``None`` outside a multi-rank run."""
        if not dist.is_available() or not dist.is_initialized():
            return None
        world = dist.get_world_size()
        return cls(dist.get_rank(), world) if world > 1 else None

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the rank that prints and writes shared files)."""
        return self.rank == 0

    # ------------------------------------------------------------------ setup

    def device(self, device: torch.device) -> torch.device:
        """``device`` with a CUDA index chosen per rank (``LOCAL_RANK``) when none was given."""
        if device.type != "cuda":
            return device
        if device.index is None:
            local = os.environ.get("LOCAL_RANK")
            index = int(local) if local is not None else self.rank % torch.cuda.device_count()
            device = torch.device("cuda", index)
        torch.cuda.set_device(device)
        return device

    def wrap(
        self, model: nn.Module, device: torch.device, options: Mapping[str, Any]
    ) -> DistributedDataParallel | None:
        """``model`` in DDP summing gradients over the ranks; ``None`` without dense parameters.

        DDP broadcasts rank 0's parameters and buffers here, so every rank starts alike.
        """
        if not any(p.requires_grad for p in model.parameters()):
            return None
        device_ids = [device.index] if device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=device_ids, **dict(options))
        # DDP compares a hook's annotations with the classes themselves; this module's are
        # strings (postponed evaluation), so it gets an unannotated wrapper.
        ddp.register_comm_hook(None, lambda state, bucket: sum_gradients(state, bucket))
        return ddp

    def check_tables(self, model: nn.Module) -> None:
        """Raise if ``model`` holds recis-embedding tables that are not sharded over the ranks.

        Unsharded tables would be trained by each rank on its own data and drift apart.
        """
        if importlib.util.find_spec("recis_embedding") is None:
            return
        from recis_embedding import EmbeddingEngine

        for name, module in model.named_modules():
            if not isinstance(module, EmbeddingEngine):
                continue
            where = name or type(model).__name__
            if module.shard is None:
                raise ConfigError(
                    f"embedding module {where!r} is not sharded; under torch.distributed "
                    f"({self.world_size} ranks) build it with EmbeddingEngine(..., shard=True) "
                    "so every id has one owner rank"
                )
            if module.shard.world_size != self.world_size:
                raise ConfigError(
                    f"embedding module {where!r} is sharded over {module.shard.world_size} ranks "
                    f"but the trainer runs on {self.world_size}; shard it over the default group"
                )

    # ------------------------------------------------------------------ collectives

    def _collective_device(self) -> torch.device:
        # NCCL reduces only CUDA tensors; gloo and the others take CPU tensors.
        if cuda_only(dist.get_backend()):
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def reduce(self, values: Sequence[float], op: str = "sum") -> list[float]:
        """``values`` combined elementwise over the ranks (``"sum"``, ``"min"`` or ``"max"``)."""
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self._collective_device())
        all_reduce(tensor, ops[op])
        return [float(v) for v in tensor.cpu()]

    def agree_count(self, count: int, error: Exception | None = None, what: str = "") -> int:
        """The smallest ``count`` over the ranks: how many micro-batches every rank can train.

        Args:
            count: micro-batches this rank has.
            error: what this rank failed with while taking them, if it did.
            what: what the ranks were doing, for the error message.

        Raises:
            RankFailedError: another rank passed an ``error`` (see :meth:`fail_together`).
        """
        try:
            return self.agree_step(count, False, error, what)[0]
        finally:
            del error  # see fail_together

    def agree_step(
        self, count: int, stop: bool, error: Exception | None = None, what: str = ""
    ) -> tuple[int, bool]:
        """:meth:`agree_count`, and whether any rank's hooks asked to stop (``stop``): in one
        collective, so that every rank stops, and records the stop, when one asked to."""
        lowest, failed, stopped = self.reduce(
            [-count, float(error is not None), float(stop)], "max"
        )
        if failed:
            try:
                self.fail_together(error, what)
            finally:
                del error  # see fail_together
        return int(-lowest), bool(stopped)

    def fail_together(self, error: Exception | None, what: str) -> None:
        """Raise on every rank after one or more ranks failed (a collective call).

        Every rank learned already (from a collective) that some rank failed; here they
        exchange the errors. A rank that failed raises its own ``error``; the others raise
        :class:`RankFailedError` naming the failed ranks and their errors.

        A frame that keeps the error it raises (or caught) is in the error's traceback: the
        error, its traceback and the frames' locals (a trainer, its model and process group)
        would form a cycle that lives until the next garbage collection, past
        ``destroy_process_group()``, and a process group destroyed that late can abort the
        process at exit. So this function, and every caller that holds the error, drops its
        reference before the error leaves the frame.
        """
        reports = self.gather(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            try:
                raise error
            finally:
                del error
        failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
        raise RankFailedError(
            f"{what} failed on rank(s) {[rank for rank, _ in failed]}: "
            + "; ".join(f"rank {rank}: {report}" for rank, report in failed)
        )

    def mean_logs(self, logs: Mapping[str, float], samples: int) -> tuple[dict[str, float], int]:
        """``logs`` averaged over the ranks (same keys on every rank) and the summed ``samples``."""
        keys = sorted(logs)
        reduced = self.reduce([logs[k] for k in keys] + [samples])
        means = {k: v / self.world_size for k, v in zip(keys, reduced[:-1], strict=True)}
        return {k: means[k] for k in logs}, int(reduced[-1])

    def nonfinite_ranks(
        self, finite: bool, counts: Sequence[float] = ()
    ) -> tuple[list[int], list[float]]:
        """Ranks whose loss was not finite (every rank gets the same list), and ``counts``
        summed over the ranks (e.g. each task's kept rows), with the same all-reduce."""
        flags = [0.0] * self.world_size
        flags[self.rank] = 0.0 if finite else 1.0
        reduced = self.reduce(flags + list(counts))
        bad = [r for r, flag in enumerate(reduced[: self.world_size]) if flag]
        return bad, reduced[self.world_size :]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        return gather_objects(obj)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if cuda_only(dist.get_backend()):
            box = [obj]
            dist.broadcast_object_list(box, src=0)
            return box[0]
        # Over gloo as a gather in which only rank 0's object is sent (the others send None):
        # the collective's tensors are kept as in all_reduce.
        return gather_objects(obj if self.rank == 0 else None)[0]

    def barrier(self) -> None:
        """Wait until every rank got here."""
        dist.barrier()

    # ------------------------------------------------------------------ checkpoints

    def save(
        self,
        manager: CheckpointManager,
        step: int,
        writers: Mapping[str, Writer],
        sparse: Callable[[Path], None] | None,
        meta: Mapping[str, Any],
    ) -> Path:
        """Write a checkpoint of ``step`` together (a collective call).

        Rank 0 writes ``writers`` (dense and trainer state) through ``manager`` into its
        temporary directory and sends that directory to the others; then every rank runs
        ``sparse`` into its ``sparse/`` part (recis-embedding writes one file per table and shard,
        each rank its own); then the ranks compute the manifest's checksums together, each
        reading every ``world_size``-th file of the sorted list (rank 0 alone would read the
        whole checkpoint); then rank 0 writes the manifest and renames the directory into
        place. Every rank returns only after that, so the checkpoint is complete for all.

        Raises:
            CheckpointError: the save failed on rank 0, or a rank could not read its share of
                the files (raised on every rank).
        """
        if self.is_main:
            return self._save_main(manager, step, writers, sparse, meta)
        if sparse is not None:
            directory = self.broadcast(None)
            if directory is not None:
                sparse(Path(directory))
        job = self.broadcast(None)  # the files to checksum, or None when the save failed
        if job is not None:
            self.gather(self._checksum_share(Path(job[0]), job[1]))
        error = self.broadcast(None)
        if error is not None:
            raise CheckpointError(f"rank 0 failed to save the checkpoint of step {step}: {error}")
        return manager.path_for(step)

    def _checksum_share(self, root: Path, names: list[str]) -> tuple[bool, Any]:
        """``(True, checksums)`` of this rank's share of ``names``, or ``(False, why)``: an
        error is sent to rank 0 rather than raised, so no rank is left waiting for this one."""
        try:
            return True, file_checksums(root, names[self.rank :: self.world_size])
        except Exception as err:
            return False, f"{type(err).__name__}: {err}"

    def _save_main(
        self,
        manager: CheckpointManager,
        step: int,
        writers: Mapping[str, Writer],
        sparse: Callable[[Path], None] | None,
        meta: Mapping[str, Any],
    ) -> Path:
        announced = sent = False

        def write_sparse(directory: Path) -> None:
            nonlocal announced
            self.broadcast(str(directory))
            announced = True
            sparse(directory)  # type: ignore[misc]

        def checksums(root: Path, names: list[str]) -> dict[str, str]:
            nonlocal sent
            self.broadcast((str(root), names))
            sent = True
            shares = self.gather(self._checksum_share(root, names))
            failed = [f"rank {r}: {why}" for r, (ok, why) in enumerate(shares) if not ok]
            if failed:
                raise CheckpointError("reading the written files failed on " + "; ".join(failed))
            return {name: crc for _, share in shares for name, crc in share.items()}

        parts = dict(writers)
        if sparse is not None:
            parts["sparse"] = write_sparse  # last: the other parts are written by then
        try:
            path = manager.save(step, parts, meta, checksums=checksums)
        except BaseException as err:
            if sparse is not None and not announced:
                self.broadcast(None)
            if not sent:
                self.broadcast(None)
            self.broadcast(str(err) or type(err).__name__)
            raise
        self.broadcast(None)
        return path

    def choose_checkpoint(self, found: Path | None) -> Path | None:
        """Rank 0's choice of checkpoint, so every rank restores the same one."""
        chosen = self.broadcast(None if found is None else str(found))
        return None if chosen is None else Path(chosen)

    def choose_verified(
        self,
        candidates: Sequence[Path],
        check: Callable[[Path, tuple[int, int]], list[str]],
        *,
        explicit: bool,
        root: Path,
        damaged: Sequence[str] = (),
    ) -> Path | None:
        """The first of rank 0's ``candidates`` that verifies on every rank (a collective call);
        rank 0's ``damaged`` checkpoints count for every rank.

        Each rank runs ``check(path, (rank, world_size))`` on its share of a candidate's files;
        the ranks exchange what they found, so every rank skips the same candidates and
        returns the same checkpoint, or raises the same error (see
        :func:`~recis_train._checkpoint.first_verified`).

        Raises:
            CheckpointCorruptError: as :func:`~recis_train._checkpoint.first_verified`.
            RankFailedError: the check raised on another rank (this rank raises its own error
                when it did).
        """
        names, damaged = self.broadcast(
            ([str(p) for p in candidates], list(damaged)) if self.is_main else None
        )

        def together(path: Path) -> list[str]:
            wrong: list[str] = []
            error: Exception | None = None
            try:
                wrong = check(path, (self.rank, self.world_size))
            except Exception as err:
                error = err
            reports = self.gather(
                (wrong, None if error is None else f"{type(error).__name__}: {error}")
            )
            failed = [(rank, report) for rank, (_, report) in enumerate(reports) if report]
            if error is not None:
                try:
                    raise error
                finally:
                    del error  # see fail_together
            if failed:
                raise RankFailedError(
                    f"verifying checkpoint {path} failed on rank(s) {[r for r, _ in failed]}: "
                    + "; ".join(f"rank {rank}: {report}" for rank, report in failed)
                )
            return [item for found, _ in reports for item in found]

        return first_verified(
            [Path(n) for n in names], together, explicit=explicit, root=root, damaged=damaged
        )


def own_rank_state(state: Mapping[str, Any], rank: int, world_size: int, file: Path) -> Any:
    """This rank's part of a saved trainer state (data cursor, RNG), checked against the world.

    A checkpoint of ``W`` ranks stores every rank's part under ``"ranks"``; one of a single
    process has none (its own part is the state itself).

    Raises:
        CheckpointError: the checkpoint was written by a different number of ranks.
    """
    saved = state.get("ranks")
    written = 1 if saved is None else len(saved)
    if written != world_size:
        raise CheckpointError(
            f"{file}: written by {written} rank(s), this run has {world_size}; the data cursors "
            "resume only the same number of ranks (restore parts=('dense', 'sparse') to "
            "warm-start: tables reshard on load)"
        )
    return state if saved is None else saved[rank]
