"""Host work that runs on a pool thread while the caller goes on: :func:`overlap`."""

from __future__ import annotations

import threading
from typing import Any

import torch

__all__ = ["defer", "deferring", "finish_overlapped", "overlap"]

# Work smaller than this runs in place: handing it to a pool thread costs microseconds.
MIN_BYTES = 1 << 18

_local = threading.local()


class overlap:  # lower case: used as a function, ``with overlap():``
    """Let large host work of recis-kernels ops run on a pool thread of their own.

    Within the block, an op whose work ends in a large pass over host memory may return as soon
    as that pass has started, so that the caller's next ops run while it proceeds on another
    core. Today: the row copy of 2-level ``truncate`` / ``fused_truncate`` and the remainders of
    ``mod`` / ``fused_mod`` on int64 CPU tensors, each from 256 KiB of output. Such a result
    must not be read, on the host or by another op, until :func:`finish_overlapped` returns or
    the block ends (both wait for everything started in it); everything else is unchanged.
    With ``torch.get_num_threads() == 1`` every op runs in place, as outside a block. Blocks
    nest: the outermost one waits at its end, also when the block raises.

    ``overlap(False)`` inside a block runs its ops in place again, for code that reads what it
    computes straight away (work started before it goes on; the outer block still waits for
    it).

    ``FeatureEngine`` runs the groups of a step in such a block, the groups of its own fused
    ``mod`` and ``truncate`` calls deferring and every other group (``map`` functions, other
    registered implementations) inside ``overlap(False)``: the next step reads their results
    only after the block.

    Args:
        enabled: whether ops in the block may defer their work (``False``: they run in place).

    Example:
        >>> with overlap():
        ...     kept = fused_truncate([seq], [50], ["tail"])  # the copy may still run
        ...     other = fused_bucketize(xs, bounds)  # meanwhile, on this thread
        ...     finish_overlapped()
        ...     use(kept)
    """

    __slots__ = ("_enabled", "_outer", "_was_enabled")

    def __init__(self, enabled: bool = True) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"overlap: enabled must be a bool, got {enabled!r}")
        self._enabled = enabled

    def __enter__(self) -> None:
        self._outer = getattr(_local, "pending", None) is not None
        self._was_enabled = getattr(_local, "enabled", False)
        if not self._outer:
            _local.pending = []
        _local.enabled = self._enabled

    def __exit__(self, *exc: object) -> None:
        _local.enabled = self._was_enabled
        if self._outer:
            return
        try:
            finish_overlapped()
        finally:
            _local.pending = None


def finish_overlapped() -> None:
    """Wait for all work started in the current :func:`overlap` block (none outside one)."""
    pending: list[tuple[Any, tuple[torch.Tensor, ...]]] | None = getattr(_local, "pending", None)
    while pending:
        job, _ = pending.pop()
        job.wait()


def deferring(nbytes: int) -> bool:
    """Whether host work writing ``nbytes`` may run in the background here: inside an
    enabled :func:`overlap` block, with more than one torch thread, and large enough to be
    worth it."""
    return (
        nbytes >= MIN_BYTES
        and getattr(_local, "enabled", False)
        and getattr(_local, "pending", None) is not None
        and torch.get_num_threads() > 1
    )


def defer(job: Any, *keep: torch.Tensor) -> None:
    """Record started work (``job.wait()`` finishes it) with the tensors it reads and writes,
    kept alive until it is done."""
    _local.pending.append((job, keep))
