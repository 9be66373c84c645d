"""Row-wise sharding of tables over a ``torch.distributed`` process group.

Rank ``r`` owns the rows of the ids with ``recis_kernels.owner_rank(id, world_size) == r``. A
sharded lookup deduplicates the ids of a fused group locally, sends each distinct
``(table, id)`` key to its owner with one all-to-all (with its table index and how many times
the local batch uses it), lets the owner find or insert each key once however many ranks asked
for it and read its row, and receives the rows back with a second all-to-all. The optimizer
step sends each rank's gradient of those rows back to their owners (a third all-to-all) and the
owners update their rows; gradients from several ranks for one row are summed, so a run on
``W`` ranks equals one process training on the concatenated batches with the sum of the
per-rank losses.

Every rank must run the same sequence of lookups and optimizer steps (as with DDP).
"""

from __future__ import annotations

import contextlib
import pickle
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from recis_embedding.exceptions import ConfigError
from recis_kernels import owner_rank

if dist.is_available():
    # torch.distributed.nn.functional binds ``group.WORLD`` as the default argument of its
    # collectives when it is first imported. torch imports it lazily (creating any torch
    # optimizer does, through torch._dynamo); if that happens after init_process_group, its
    # defaults keep the default group alive after destroy_process_group, and the group's gloo
    # threads, still running when the interpreter shuts down, can abort the process at exit
    # ("terminate called without an active exception") after a run that succeeded. Imported
    # here, before a training script creates its group, the defaults bind no group.
    import torch.distributed.nn.functional

__all__ = [
    "Exchange",
    "Pending",
    "ShardContext",
    "awaiting_backward",
    "cuda_only",
    "gather_objects_on_host",
    "handed_over",
]

# The tensors of finished collectives that the backend may still hold, each with its use count
# before the collective (see handed_over).
_handed: list[tuple[torch.Tensor, int]] = []
_handed_lock = threading.Lock()
# Tensor._use_count (the C++ references to a tensor) is private torch API, there from 2.6 on.
_COUNTS_USES = hasattr(torch.Tensor, "_use_count")


@contextlib.contextmanager
def handed_over(*tensors: torch.Tensor) -> Iterator[None]:
    """Context for a blocking collective over ``tensors``: they stay referenced from Python
    until the backend has let go of them.

    Gloo runs a collective on a worker thread of the group, which signals completion first and
    drops its references to the tensors afterwards. A tensor whose Python object is freed
    before that is left to the worker thread to free, and freeing it takes the GIL. Should the
    program destroy the process group meanwhile (the end of a step, then
    ``dist.destroy_process_group()``), the group's destructor, which runs with the GIL held on
    torch releases that do not shut the backend down first, waits for that worker thread: a
    deadlock. Kept here instead, such a tensor is released by a later collective (or at exit)
    once the worker thread has let go of it.
    """
    if not _COUNTS_USES:  # a torch without the count: nothing to tell, nothing kept
        yield
        return
    _let_go()
    before = [t._use_count() for t in tensors]
    try:
        yield
    finally:
        with _handed_lock:
            _handed.extend(zip(tensors, before, strict=True))
        _let_go()


def gather_objects_on_host(item: Any, rank: int, world_size: int, group: Any = None) -> list[Any]:
    """Every rank's ``item`` (picklable), in rank order, through two all-reduces of CPU tensors
    (``dist.all_gather_object`` on a gloo group, with its tensors kept until the group's
    threads let go of them: see :func:`handed_over`)."""
    data = torch.frombuffer(bytearray(pickle.dumps(item)), dtype=torch.uint8)
    sizes = torch.zeros(world_size, dtype=torch.int64)
    sizes[rank] = data.numel()
    with handed_over(sizes):
        dist.all_reduce(sizes, group=group)
    lengths = sizes.tolist()
    # Each rank fills its own row, zeros elsewhere: the sum is every rank's bytes.
    rows = torch.zeros(world_size, max(lengths), dtype=torch.uint8)
    rows[rank, : data.numel()] = data
    with handed_over(rows):
        dist.all_reduce(rows, group=group)
    return [pickle.loads(rows[r, :n].numpy().tobytes()) for r, n in enumerate(lengths)]


def _let_go() -> None:
    """Release the handed-over tensors that no backend holds anymore."""
    with _handed_lock:
        if _handed:
            _handed[:] = [(t, n) for t, n in _handed if t._use_count() > n]


@dataclass
class Pending:
    """Rows read by one training lookup, waiting for their gradient.

    Attributes:
        rows: ``(R,) int64`` rows of the table this rank owns that the lookup read (``-1``:
            absent); for a sharded lookup, the rows requested by all ranks, in received order.
        leaf: ``(U, D)`` tensor the lookup returned; ``leaf.grad`` is its gradient.
        exchange: for sharded lookups, how to route ``leaf.grad`` back to the owners.
        missed: shared with a hook on ``leaf``; set when an optimizer step goes past this
            lookup (applying its gradient or not), so that a gradient arriving later raises
            instead of being lost.
    """

    rows: torch.Tensor
    leaf: torch.Tensor
    exchange: Exchange | None = None
    missed: list[bool] = field(default_factory=lambda: [False])
    #: The outputs read from ``leaf`` when there are several (the features of a fused or
    #: shared table, looked up together), and ``inverse``, the leaf row of each id they read:
    #: a row only outputs that received no gradient read is left out of the step, as it would
    #: be were each output's table looked up alone.
    uses: list[Use] | None = None
    inverse: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.leaf.requires_grad:
            self.leaf.register_hook(_late_gradient_guard(self.missed))

    @property
    def stepped(self) -> bool:
        """An optimizer step has applied (or gone past) this lookup's gradient."""
        return self.missed[0]

    @property
    def partial(self) -> bool:
        """Some of the outputs read from ``leaf`` received no gradient."""
        return self.uses is not None and not all(u.reached for u in self.uses)

    def reached(self) -> torch.Tensor:
        """``(U,) bool``: the rows of ``leaf`` an output that received a gradient read."""
        mask = torch.zeros(self.leaf.shape[0], dtype=torch.bool, device=self.leaf.device)
        if self.uses is None or self.inverse is None:
            mask[:] = self.leaf.grad is not None
            return mask
        for use in self.uses:
            if use.reached:
                mask[self.inverse[use.positions()]] = True
        return mask

    def gradient(self, masked: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``rows`` and their gradient (``(R, D)``), after the exchange for sharded lookups;
        ``None`` without a gradient. ``masked``: only the rows an output that received a
        gradient read (a sharded lookup sends that mark along with its gradient, so every
        rank of the group must pass the same ``masked``)."""
        if self.exchange is None:
            grad = self.leaf.grad
            if grad is None:
                return None
            if not (masked and self.partial):
                return self.rows, grad
            keep = self.reached().nonzero().squeeze(1)
            return self.rows[keep], grad[keep]
        grad = self.leaf.grad if self.leaf.grad is not None else torch.zeros_like(self.leaf)
        if not masked:
            return self.rows, self.exchange.to_owners(grad.detach())
        marked = torch.cat([grad.detach(), self.reached()[:, None].to(grad.dtype)], dim=1)
        owned = self.exchange.to_owners(marked)
        keep = (owned[:, -1] > 0).nonzero().squeeze(1)
        return self.rows[keep], owned[keep, :-1]


@dataclass
class Use:
    """One output read from a lookup's rows, its ids at positions ``[start, stop)`` of the
    lookup's ``inverse``; with ``bags``, those of member ``member`` of ``members`` joined
    batch-major there (bag ``r * members + member`` holds row ``r``'s ids of the member).
    ``reached`` is set once the output receives a gradient; ``device`` is where ``inverse``
    lives."""

    start: int
    stop: int
    bags: torch.Tensor | None = None
    members: int = 1
    member: int = 0
    reached: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def positions(self) -> torch.Tensor:
        """Positions in the lookup's ``inverse`` of the ids this output read."""
        if self.bags is None:
            return torch.arange(self.start, self.stop, device=self.device)
        lengths = self.bags[1:] - self.bags[:-1]
        member = torch.arange(lengths.numel(), device=self.bags.device) % self.members
        of_id = torch.repeat_interleave(member, lengths)
        return (of_id == self.member).nonzero().squeeze(1) + self.start

    def mark(self, *grads: Any) -> None:
        """A gradient hook: the output received a gradient (left as it is)."""
        self.reached = True


@dataclass
class Exchange:
    """Routing of one sharded lookup: ``order`` sorts local keys by owner rank."""

    order: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    group: Any

    def to_owners(self, local: torch.Tensor) -> torch.Tensor:
        """``(U, D)`` per-local-key rows -> ``(R, D)`` rows in the owners' received order."""
        send = local.index_select(0, self.order).contiguous()
        out = local.new_empty(sum(self.recv_splits), *local.shape[1:])
        with handed_over(out, send):
            dist.all_to_all_single(out, send, self.recv_splits, self.send_splits, group=self.group)
        return out

    def from_owners(self, owned: torch.Tensor, num_local: int) -> torch.Tensor:
        """``(R, D)`` rows read by the owners -> ``(U, D)`` rows in local key order."""
        back = owned.new_empty(num_local, *owned.shape[1:])
        send = owned.contiguous()
        with handed_over(back, send):
            dist.all_to_all_single(back, send, self.send_splits, self.recv_splits, group=self.group)
        out = torch.empty_like(back)
        out[self.order] = back
        return out


class ShardContext:
    """The process group a sharded engine spreads its rows over."""

    def __init__(self, group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError(
                "sharded embeddings need torch.distributed initialized (e.g. under torchrun, "
                "dist.init_process_group('gloo' or 'nccl'))"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        #: the CUDA device of the tables (NCCL groups): object collectives run on it (they
        #: use the current device otherwise, cuda:0 on every rank unless set)
        self.device: torch.device | None = None

    def check_devices(self, tables: Sequence[Any]) -> None:
        """Raise :class:`ConfigError` when the group's backend cannot exchange the rows of
        ``tables`` where they live: NCCL moves CUDA tensors only, so a table on the host would
        fail at its first lookup inside NCCL with no word of which table or why. (A group of
        several backends, e.g. ``"cpu:gloo,cuda:nccl"``, serves both.)"""
        if not cuda_only(self.backend):
            return
        host = sorted(name for t in tables if t.device.type != "cuda" for name in t.names)
        if host:
            raise ConfigError(
                f"sharded tables {host} live on the host, but the process group's backend is "
                f"nccl, which exchanges CUDA tensors only: declare them with "
                f"EmbeddingOption(..., device='cuda:<local rank>'), or shard over a gloo group "
                f"(process_group=dist.new_group(backend='gloo'))"
            )
        self.device = tables[0].device if tables else None

    def on_device(self) -> contextlib.AbstractContextManager[Any]:
        """Context for an object collective (``all_gather_object``): NCCL runs it on the
        current CUDA device, which must be this rank's, the tables' device."""
        if self.device is not None and self.device.type == "cuda":
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()

    def gather_object(self, item: Any) -> list[Any]:
        """Every rank's ``item`` (picklable), in rank order."""
        if not cuda_only(self.backend):
            # Host objects go through gloo, with tensors kept until its threads let go of them
            # (see handed_over), which ``dist.all_gather_object`` frees on return.
            return self._gather_on_host(item)
        out: list[Any] = [None] * self.world_size
        with self.on_device():
            dist.all_gather_object(out, item, group=self.group)
        return out

    def _gather_on_host(self, item: Any) -> list[Any]:
        return gather_objects_on_host(item, self.rank, self.world_size, self.group)

    def failed_ranks(self, failed: bool, device: torch.device) -> list[int]:
        """The ranks that report ``failed``, agreed by every rank with one small all-reduce
        (a tensor on ``device``, the tables' device)."""
        flags = torch.zeros(self.world_size, device=device)
        flags[self.rank] = float(failed)
        with handed_over(flags):
            dist.all_reduce(flags, group=self.group)
        return [r for r, f in enumerate(flags.tolist()) if f > 0]

    def route(
        self, keys: torch.Tensor, tabs: torch.Tensor, uses: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Exchange]:
        """Send distinct local keys to their owners; returns the keys this rank must serve.

        Args:
            keys: ``(U,) int64`` distinct local ids.
            tabs: ``(U,)`` their table indices.
            uses: ``(U,) int64`` how many times the local batch uses each key (the owner's
                eviction statistics count every use, as one process would).

        Returns:
            ``(keys (R,), tables (R,) int32, uses (R,) int64, exchange)``: the keys sent to this
            rank, in received order (a key asked for by several ranks arrives once per rank).
        """
        owner = owner_rank(keys, self.world_size)
        order = torch.argsort(owner, stable=True)
        counts = torch.bincount(owner, minlength=self.world_size)
        recv = torch.empty_like(counts)
        with handed_over(recv, counts):
            dist.all_to_all_single(recv, counts, group=self.group)
        ex = Exchange(order, counts.tolist(), recv.tolist(), self.group)
        packed = torch.stack([keys, tabs.to(torch.int64), uses.to(torch.int64)], dim=1)
        served = ex.to_owners(packed)
        return served[:, 0], served[:, 1].to(torch.int32), served[:, 2], ex

    def owns(self, ids: torch.Tensor) -> torch.Tensor:
        """``(N,) bool``: which ids this rank owns."""
        return owner_rank(ids, self.world_size) == self.rank


def cuda_only(backend: str) -> bool:
    """Whether a process group of ``backend`` (``dist.get_backend(group)``: ``"nccl"``,
    ``"cuda:nccl"``, ``"gloo"``, ``"cpu:gloo,cuda:nccl"``, ...) takes CUDA tensors only: NCCL,
    with no backend for host tensors beside it."""
    parts = [p.strip() for p in str(backend).lower().split(",") if p.strip()]
    host = any(p.startswith("cpu:") or (":" not in p and p != "nccl") for p in parts)
    return not host and any(p.rsplit(":", 1)[-1] == "nccl" for p in parts)


def _late_gradient_guard(missed: list[bool]) -> Callable[[torch.Tensor], None]:
    # Holds the flag only (not the Pending entry, which holds the leaf): no reference cycle,
    # and the guard works after zero_grad() forgot the entry. A copy of a model (pickle,
    # deepcopy) drops it with the autograd graph it guards.
    @torch.utils.hooks.unserializable_hook
    def guard(grad: torch.Tensor) -> None:
        if missed[0]:
            raise RuntimeError(
                "recis_embedding: the gradient of an embedding lookup arrived after an "
                "optimizer step or zero_grad() went past the lookup (backward() ran after "
                "step(), or again through a retained graph after zero_grad(), for a forward "
                "made before it), so no step would apply it; run each forward's backward() "
                "before the optimizer's step(), and a forward again for another backward "
                "after a step or zero_grad()"
            )

    return guard


def awaiting_backward(pending: list[Pending]) -> list[Pending]:
    """The lookups of ``pending`` whose gradient is still to come: no optimizer step has
    gone past them and ``backward()`` has not reached them yet.

    For sharded lookups a gradient arrived if it arrived on any rank, so every rank keeps the
    same entries and later gradient exchanges still pair up.
    """
    fresh = [p for p in pending if not p.stepped]
    waiting = {id(p) for p in fresh if p.exchange is None and p.leaf.grad is None}
    by_group: dict[int, tuple[Any, list[Pending]]] = {}
    for p in fresh:
        if p.exchange is not None:
            by_group.setdefault(id(p.exchange.group), (p.exchange.group, []))[1].append(p)
    # One all-reduce per process group, over the lookups of every table passed in.
    for group, sharded in by_group.values():
        # On the leaves' device: NCCL reduces only CUDA tensors.
        flags = torch.tensor(
            [p.leaf.grad is None for p in sharded], dtype=torch.int32, device=sharded[0].leaf.device
        )
        with handed_over(flags):
            dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group)
        waiting.update(id(p) for p, w in zip(sharded, flags.tolist(), strict=True) if w)
    return [p for p in fresh if id(p) in waiting]
