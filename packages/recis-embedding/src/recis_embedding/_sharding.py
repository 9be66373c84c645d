"""Row-wise sharding of tables over a ``torch.distributed`` process group.

Rank ``r`` owns the rows of the ids with ``recis_kernels.owner_rank(id, world_size) == r``. A
sharded lookup deduplicates the ids of a fused group locally, sends each distinct
``(table, id)`` key to its owner with one all-to-all, lets the owner find or insert it and read
its row, and receives the rows back with a second all-to-all. The optimizer step sends each
rank's gradient of those rows back to their owners (a third all-to-all) and the owners update
their rows; gradients from several ranks for one row are summed, so a run on ``W`` ranks equals
one process training on the concatenated batches with the sum of the per-rank losses.

Every rank must run the same sequence of lookups and optimizer steps (as with DDP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from recis_embedding.exceptions import ConfigError
from recis_kernels import owner_rank

__all__ = ["Exchange", "Pending", "ShardContext"]


@dataclass
class Pending:
    """Rows read by one training lookup, waiting for their gradient.

    Attributes:
        rows: ``(R,) int64`` rows of the table this rank owns that the lookup read (``-1``:
            absent); for a sharded lookup, the rows requested by all ranks, in received order.
        leaf: ``(U, D)`` tensor the lookup returned; ``leaf.grad`` is its gradient.
        exchange: for sharded lookups, how to route ``leaf.grad`` back to the owners.
    """

    rows: torch.Tensor
    leaf: torch.Tensor
    exchange: Exchange | None = None

    def gradient(self) -> torch.Tensor | None:
        """Gradient of ``rows`` (``(R, D)``), after the exchange for sharded lookups."""
        if self.exchange is None:
            return self.leaf.grad
        grad = self.leaf.grad if self.leaf.grad is not None else torch.zeros_like(self.leaf)
        return self.exchange.to_owners(grad.detach())


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
        dist.all_to_all_single(out, send, self.recv_splits, self.send_splits, group=self.group)
        return out

    def from_owners(self, owned: torch.Tensor, num_local: int) -> torch.Tensor:
        """``(R, D)`` rows read by the owners -> ``(U, D)`` rows in local key order."""
        back = owned.new_empty(num_local, *owned.shape[1:])
        dist.all_to_all_single(
            back, owned.contiguous(), self.send_splits, self.recv_splits, group=self.group
        )
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

    def route(
        self, keys: torch.Tensor, tabs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Exchange]:
        """Send distinct local keys to their owners; returns the keys this rank must serve."""
        owner = owner_rank(keys, self.world_size)
        order = torch.argsort(owner, stable=True)
        counts = torch.bincount(owner, minlength=self.world_size)
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.group)
        ex = Exchange(order, counts.tolist(), recv.tolist(), self.group)
        served_keys = ex.to_owners(keys[:, None])[:, 0]
        served_tabs = ex.to_owners(tabs.to(torch.int64)[:, None])[:, 0].to(torch.int32)
        return served_keys, served_tabs, ex

    def owns(self, ids: torch.Tensor) -> torch.Tensor:
        """``(N,) bool``: which ids this rank owns."""
        return owner_rank(ids, self.world_size) == self.rank
