"""Host work that runs on a pool thread while the caller goes on: :func:`overlap`."""

from __future__ import annotations

import os
import sys
import threading
from contextvars import ContextVar, Token
from typing import Any

import torch

__all__ = ["defer", "deferring", "finish_overlapped", "overlap", "overlap_pending"]

# Work smaller than this runs in place: handing it to a pool thread costs microseconds.
MIN_BYTES = 1 << 18

# This process's id, kept current in forked children (os.getpid() is a system call).
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def _owner() -> tuple[int, object]:
    """Who enters and runs a block: this thread, and the asyncio task running on it (if any)."""
    task = None
    aio = sys.modules.get("asyncio")
    if aio is not None and aio._get_running_loop() is not None:
        task = aio.current_task()
    return threading.get_ident(), task


class _Block:
    """One entered :class:`overlap` block: the work started in it, not yet waited for."""

    __slots__ = ("enabled", "open", "owner", "parent", "pending", "pid")

    def __init__(self, enabled: bool, parent: _Block | None, owner: tuple[int, object]) -> None:
        self.enabled = enabled
        self.parent = parent
        self.pending: list[Any] = []  # native ``Pending`` jobs, each holding its buffers
        self.pid = _pid
        self.owner = owner
        self.open = True


# The innermost block of the running context. Contexts are copied into asyncio tasks and
# ``asyncio.to_thread`` calls started inside a block: those see it, and skip it by its owner.
_BLOCK: ContextVar[_Block | None] = ContextVar("recis_kernels_overlap", default=None)


def _current() -> _Block | None:
    """The innermost open block of this context that this process, thread and asyncio task
    entered (a forked child inherits its parent's blocks, whose work never runs in it; a task
    or thread started inside a block inherits it but does not run in it)."""
    block = _BLOCK.get()
    if block is None:
        return None
    owner = _owner()
    while block is not None and (
        not block.open
        or block.pid != _pid
        or block.owner[0] != owner[0]
        or block.owner[1] is not owner[1]
    ):
        block = block.parent
    return block


class overlap:  # lower case: used as a function, ``with overlap():``
    """Let large host work of recis-kernels ops run on a pool thread of their own.

    Within the block, an op whose work ends in a large pass over host memory may return as soon
    as that pass has started, so that the caller's next ops run while it proceeds on another
    core. Today: the row copy of 2-level ``truncate`` / ``fused_truncate`` and the remainders of
    ``mod`` / ``fused_mod`` on int64 CPU tensors, each from 256 KiB of output. Such a result
    must not be read, on the host or by another op, and the op's inputs must not be written
    (the pool thread still reads them), until :func:`finish_overlapped` returns or the block
    ends; everything else is unchanged. With ``torch.get_num_threads() == 1`` every
    op runs in place, as outside a block.

    Every block waits at its end for the work started in it, also when it raises or is
    interrupted; a block inside another waits for its own work only. ``overlap(False)`` runs
    the ops inside it in place again, for code that reads what it computes straight away (work
    started before it goes on; the block around it still waits for it).

    A block belongs to the thread, or the asyncio task, that entered it, and to the process:
    a task or thread started inside it, and a child forked inside it, run their ops in place
    (the fork's child does not wait for the parent's work, which never runs there). Other code
    run by the same thread or task while the block is open counts as inside it, so keep a block
    from staying open across a ``yield``: a generator's consumer would run in it.

    ``FeatureEngine`` runs the groups of a step in such a block, the groups of its own fused
    ``mod`` and ``truncate`` calls deferring and every other group (``map`` functions, other
    registered implementations) inside ``overlap(False)``: the next step reads their results
    only after the block.

    Args:
        enabled: whether ops in the block may defer their work (``False``: they run in place).

    Raises:
        TypeError: ``enabled`` is not a bool.

    Example:
        ```python
        with overlap():
            kept = fused_truncate([seq], [50], ["tail"])  # the copy may still run
            other = fused_bucketize(xs, bounds)  # meanwhile, on this thread
            finish_overlapped()
            use(kept)
        ```
    """

    __slots__ = ("_enabled", "_entered")

    def __init__(self, enabled: bool = True) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"overlap: enabled must be a bool, got {enabled!r}")
        self._enabled = enabled
        # One entry per time this object is entered and not yet left (it may be reused, also
        # by several threads or tasks at once), by who entered it: a block left must be the
        # one its owner entered, not another thread's entered since (whose work it would wait
        # for instead of its own).
        self._entered: dict[tuple[int, object], list[tuple[Token[_Block | None], _Block]]] = {}

    def __enter__(self) -> None:
        owner = _owner()
        block = _Block(self._enabled, _current(), owner)
        self._entered.setdefault(owner, []).append((_BLOCK.set(block), block))

    def __exit__(self, *exc: object) -> None:
        owner = _owner()
        if not self._entered:
            raise RuntimeError("overlap: a block was left that was never entered")
        if owner not in self._entered:
            # Left by another thread or task than entered it: the entry made last.
            owner = next(reversed(self._entered))
        stack = self._entered[owner]
        token, block = stack.pop()
        if not stack:
            del self._entered[owner]
        try:
            _finish(block)
        finally:
            block.open = False
            try:
                _BLOCK.reset(token)
            except ValueError:  # left in another context than it was entered in
                _BLOCK.set(_current())


def _finish(block: _Block) -> None:
    """Wait for the work started in ``block``; each job is let go of only once it is done, so
    an interruption leaves the rest listed (and their drop waits for them)."""
    pending = block.pending
    if block.pid != _pid:
        pending.clear()  # started before a fork: never runs here (dropping it does not wait)
        return
    while pending:
        pending[-1].wait()
        pending.pop()


def finish_overlapped() -> None:
    """Wait for all work started in the current :func:`overlap` block and the blocks around it
    (none outside a block)."""
    block = _current()
    while block is not None:
        _finish(block)
        block = block.parent


def overlap_pending() -> bool:
    """Whether work started in the current :func:`overlap` block, or a block around it, has
    not been waited for yet (it may be running on a pool thread, occupying a core).

    Code that runs its own parallel work meanwhile may leave that core to it: on two cores,
    a small torch op split over two threads waits for a thread that must share the core with
    the pool thread, milliseconds where it computes microseconds. ``FeatureEngine`` runs the
    groups of a step that call torch op by op (and registered implementations) on one torch
    thread fewer while this holds.
    """
    block = _current()
    while block is not None:
        if block.pending:
            return True
        block = block.parent
    return False


def deferring(nbytes: int) -> bool:
    """Whether host work writing ``nbytes`` may run in the background here: inside an
    enabled :func:`overlap` block, with more than one torch thread, and large enough to be
    worth it."""
    if nbytes < MIN_BYTES:
        return False
    block = _current()
    return block is not None and block.enabled and torch.get_num_threads() > 1


def defer(job: Any, *keep: torch.Tensor) -> None:
    """Record started work (a native ``Pending``: ``job.wait()`` finishes it) in the current
    block, with the tensors it reads and writes, which it keeps alive until it is done."""
    job.hold(*keep)
    block = _current()
    assert block is not None, "defer() outside an overlap block (deferring() said no)"
    block.pending.append(job)
