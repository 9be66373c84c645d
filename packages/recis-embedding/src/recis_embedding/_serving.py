"""Rows and embeddings of a lookup's distinct keys, served by the rank that owns each key."""

from __future__ import annotations

from typing import Any

import torch

from recis_embedding._dedup import dedup
from recis_embedding._host import repeat_values, true_positions
from recis_embedding._sharding import ShardContext
from recis_embedding._table import HashTable
from recis_embedding.exceptions import TableFullError

__all__ = ["serve", "serve_sharded"]


def serve(
    table: HashTable, keys: torch.Tensor, key_tabs: torch.Tensor, insert: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and embeddings of distinct keys this rank owns (inserting when ``insert``: in
    training mode, unless the table is frozen; otherwise unknown keys read the default, as in
    eval mode)."""
    if insert:
        admit = None
        if table.admission is not None:
            admit = table.admission.admit(table, keys, key_tabs)
        rows, _ = table.find_or_insert(keys, key_tabs, admit=admit, distinct=True)
        if table.admission is not None:
            table.admission.inserted(table)
            # Every policy's rejections count, a custom one's too: the distinct keys left
            # without a row.
            table.count("admissions_rejected", int((rows < 0).sum()))
    else:
        rows = table.find(keys, key_tabs)
    present = rows >= 0
    if bool(present.all()):
        return rows, table.read(rows)
    emb = torch.full((rows.numel(), table.dim), table.default_value, device=rows.device)
    idx = true_positions(present)
    emb[idx] = table.read(rows[idx])
    return rows, emb


def serve_sharded(
    shard: ShardContext,
    table: HashTable,
    keys: torch.Tensor,
    key_tabs: torch.Tensor,
    inverse: torch.Tensor,
    insert: bool,
) -> tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor, torch.Tensor]:
    """:func:`serve` of a sharded lookup: the local distinct keys go to their owners, which
    serve each key once however many ranks asked for it, and the rows come back.

    Returns:
        ``(rows (R,), emb (U, D), exchange, owned (K,), uses)``: the rows read for the keys
        this rank received, in received order; the embeddings of the local keys; the
        routing; the rows of the distinct keys this rank served; and, per use of one of
        those keys by any rank's batch, its index into ``owned``.
    """
    num_local = keys.numel()
    counts = torch.bincount(inverse, minlength=num_local)
    served, served_tabs, served_uses, exchange = shard.route(keys, key_tabs, counts)
    # A key asked for by several ranks arrives once per rank; admission, insertion and
    # the eviction statistics see it once, with all its uses, as one process would.
    ukeys, utabs, back, _ = dedup(served, served_tabs)
    if not (insert and table.capacity is not None):
        owned, emb = serve(table, ukeys, utabs, insert)
    else:
        # Only a table with a capacity refuses a lookup, and only on the shard that is full:
        # the ranks agree before the rows go back, so every rank raises (none waits in the
        # exchange below for a rank that left it).
        try:
            owned, emb = serve(table, ukeys, utabs, insert)
            full = None
        except TableFullError as error:
            full = error
        failed = shard.failed_ranks(full is not None, table.device)
        if full is not None:
            try:
                raise full
            finally:
                # This frame is in the error's traceback: keeping the error would make a
                # cycle holding the table and the shard's process group until a collection.
                del full
        if failed:
            raise TableFullError(
                f"table {table.names[0]!r} is full on rank {', '.join(map(str, failed))}, "
                f"which refused this lookup (sharded: every rank raises; the shards of other "
                f"ranks keep the batch's new ids, see the rank's own error for the remedy)"
            )
    uses = repeat_values(back, served_uses, int(served_uses.sum()))
    rows = owned.index_select(0, back)
    emb = exchange.from_owners(emb.index_select(0, back), num_local)
    return rows, emb, exchange, owned, uses
