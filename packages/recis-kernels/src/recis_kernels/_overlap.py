"""Host copies that run on a pool thread while the caller goes on: :func:`overlap`."""

from __future__ import annotations

import threading
from typing import Any

import torch

__all__ = ["defer", "deferring", "finish_overlapped", "overlap"]

# Copies smaller than this run in place: handing one to a pool thread costs microseconds.
MIN_BYTES = 1 << 18

_local = threading.local()


class overlap:  # lower case: used as a function, ``with overlap():``
    """Let large host copies of recis-kernels ops run on a pool thread of their own.

    Within the block, an op whose work ends in a large copy on the host (today the row copy of
    2-level ``truncate`` / ``fused_truncate``, from 256 KiB) may return as soon as the copy has
    started, so that the caller's next ops run while it proceeds on another core. Such a
    result must not be read, on the host or by another op, until :func:`finish_overlapped`
    returns or the block ends (both wait for every copy started in it); everything else is
    unchanged. With ``torch.get_num_threads() == 1`` every copy runs in place, as outside a
    block. Blocks nest: the outermost one waits at its end, also when the block raises.

    ``FeatureEngine`` runs the groups of a step in such a block: the next step reads their
    results only after it.

    Example:
        >>> with overlap():
        ...     kept = fused_truncate([seq], [50], ["tail"])  # the copy may still run
        ...     other = fused_mod(ids, moduli)  # meanwhile, on this thread
        ...     finish_overlapped()
        ...     use(kept)
    """

    __slots__ = ("_outer",)

    def __enter__(self) -> None:
        self._outer = getattr(_local, "pending", None) is not None
        if not self._outer:
            _local.pending = []

    def __exit__(self, *exc: object) -> None:
        if self._outer:
            return
        try:
            finish_overlapped()
        finally:
            _local.pending = None


def finish_overlapped() -> None:
    """Wait for every copy started in the current :func:`overlap` block (none outside one)."""
    pending: list[tuple[Any, tuple[torch.Tensor, ...]]] | None = getattr(_local, "pending", None)
    while pending:
        job, _ = pending.pop()
        job.wait()


def deferring(nbytes: int) -> bool:
    """Whether a host copy of ``nbytes`` may run in the background here: inside an
    :func:`overlap` block, with more than one torch thread, and large enough to be worth it."""
    return (
        nbytes >= MIN_BYTES
        and getattr(_local, "pending", None) is not None
        and torch.get_num_threads() > 1
    )


def defer(job: Any, *keep: torch.Tensor) -> None:
    """Record a started copy (``job.wait()`` finishes it) with the tensors it reads and
    writes, kept alive until it is done."""
    _local.pending.append((job, keep))
