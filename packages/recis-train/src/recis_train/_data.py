"""The training data stream: epochs, a resumable cursor, and moving batches to the device."""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from recis_train.exceptions import ConfigError

_log = logging.getLogger("recis_train")


def move_to(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor on ``device`` (non-blocking; batches keep their own type)."""
    if device.type == "cpu" and not _off_host(obj):
        return obj  # readers produce host memory; a no-op .to() could still copy
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if hasattr(obj, "to") and not isinstance(obj, (Mapping, list, tuple)):
        try:
            return obj.to(device, non_blocking=True)
        except TypeError:
            return obj.to(device)
    if isinstance(obj, Mapping):
        if hasattr(obj, "to"):
            return obj.to(device, non_blocking=True)
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        moved = [move_to(v, device) for v in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else type(obj)(moved)
    return obj


def _off_host(obj: Any) -> bool:
    """Whether ``obj`` (a batch) holds a tensor outside host memory."""
    if isinstance(obj, torch.Tensor):
        return obj.device.type != "cpu"
    if isinstance(obj, Mapping):
        return any(_off_host(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_off_host(v) for v in obj)
    device = getattr(obj, "device", None)  # a ragged tensor or column
    return isinstance(device, torch.device) and device.type != "cpu"


def batch_rows(batch: Any) -> int:
    """Rows in a batch: a tensor's first dim, a mapping's first column, or ``len``."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    num_rows = getattr(batch, "num_rows", None)
    if isinstance(num_rows, int):
        return num_rows
    if isinstance(batch, Mapping):
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.dim():
                return int(value.shape[0])
            offsets = getattr(value, "offsets", None)
            if offsets is not None:
                first = offsets[0] if isinstance(offsets, (list, tuple)) else offsets
                return int(first.shape[0]) - 1
        # No tensor column: NumPy arrays or lists (the model converts them).
        for value in batch.values():
            shape = getattr(value, "shape", None)
            if isinstance(shape, tuple) and shape:
                return int(shape[0])
            if isinstance(value, (list, tuple)):
                return len(value)
        return 0
    if isinstance(batch, (list, tuple)) and batch:
        return batch_rows(batch[0])
    return len(batch) if hasattr(batch, "__len__") else 1


class DataStream:
    """Iterates ``data`` for ``epochs`` passes, tracking a cursor a checkpoint can store.

    If ``data`` has ``state_dict()`` / ``load_state_dict()`` (a recis-io ``Dataset``), the
    cursor holds the reader's state captured right after each batch was taken, and resuming
    loads it, so the reader continues with exactly the next sample. Otherwise resuming
    re-iterates the current epoch and skips the batches already consumed, which is exact for
    any deterministic iterable. An order drawn at random when the epoch's iteration starts (a
    ``DataLoader`` with ``shuffle=True``) is drawn again alike: the cursor holds torch's global
    RNG state (and that of the loader's or its sampler's own ``generator``) from right before
    the epoch's ``iter(data)``, and the re-iteration starts from it, then puts back the global
    RNG state the resume had. An order drawn from other generators (Python's ``random``,
    NumPy's) or while the epoch runs is not covered: it must not depend on them. Nor is a
    ``DataLoader`` with ``persistent_workers=True`` resumed in its second epoch or later
    (its iterator drew a seed for its workers in the first epoch only): a warning says so.

    A one-shot iterator (a generator) cannot be iterated again: it simply goes on where it
    stands, and the batches it gave that the trainer has not trained yet (the micro-batches of
    a step cut short) are kept to be given again,
    until :meth:`trained` reports them trained. Resuming from a checkpoint (a fresh iterator)
    skips the consumed batches, as for other data.

    Before each epoch's pass, ``data.set_epoch(epoch)`` is called when ``data`` has it (a
    recis-io ``Dataset``, so a shuffled one reads a new order every epoch).

    Every epoch iterates ``data`` again, so more than one epoch needs an iterable that can be
    iterated again (a list, a ``DataLoader``, a recis-io ``Dataset``), not a one-shot iterator
    such as a generator.

    Raises:
        ConfigError: ``epochs > 1`` and ``data`` is an iterator; (while iterating) an epoch
            after a non-empty one gave no batch (``data`` is one-shot), resuming skips more
            batches than the epoch has (the data changed since the checkpoint), or a one-shot
            iterator would have to go back to batches it no longer keeps.
    """

    def __init__(self, data: Iterable[Any], epochs: int) -> None:
        self.data = data
        self.set_epochs(epochs)
        self.epoch = 0
        self.consumed = 0  # batches taken in the current epoch
        self._reader_state: Any = None
        self._resume = False
        self._stateful = callable(getattr(data, "state_dict", None)) and callable(
            getattr(data, "load_state_dict", None)
        )
        # The RNG states the current epoch's order was drawn from (see the class docstring);
        # a reader with a state of its own resumes from that instead.
        self._epoch_rng: dict[str, Any] | None = None
        self._one_shot = isinstance(data, Iterator) and not self._stateful
        self._taken = 0  # batches taken from a one-shot iterator so far
        self._untrained: collections.deque[tuple[int, Any]] = collections.deque()

    def set_epochs(self, epochs: int) -> None:
        """The passes over the data (``args.epochs`` raised between ``train()`` calls goes on
        from the cursor; one-shot iterators allow one pass)."""
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise ConfigError(f"epochs must be an int of at least 1, got {epochs!r}")
        if epochs > 1 and isinstance(self.data, Iterator):
            raise ConfigError(
                f"train_data is a one-shot iterator ({type(self.data).__name__}) but "
                f"epochs={epochs} passes over it were asked for; give a list or another "
                "iterable that can be iterated again (e.g. a DataLoader), or set epochs=1"
            )
        self.epochs = epochs

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "consumed": self.consumed, "reader": self._reader_state}
        if self._epoch_rng is not None:
            state["epoch_rng"] = self._epoch_rng
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])
        self._reader_state = state.get("reader")
        self._epoch_rng = state.get("epoch_rng")  # checkpoints of earlier versions have none
        self._resume = True

    def trained(self, cursor: Mapping[str, Any]) -> None:
        """The trainer trained every batch up to ``cursor`` (one of :meth:`state_dict`): a
        one-shot iterator's batches up to there will not be given again, and are dropped."""
        if not self._one_shot:
            return
        position = int(cursor["consumed"]) if int(cursor["epoch"]) == 0 else self._taken
        while self._untrained and self._untrained[0][0] <= position:
            self._untrained.popleft()

    def __iter__(self) -> Iterator[Any]:
        nonempty_epoch = None  # an epoch this iteration saw batches in
        while self.epoch < self.epochs:
            yield from self._epoch()
            if self.consumed:
                nonempty_epoch = self.epoch
            elif nonempty_epoch is not None:
                raise ConfigError(
                    f"train_data gave no batch in epoch {self.epoch + 1} of {self.epochs} after "
                    f"giving some in epoch {nonempty_epoch + 1}: it can be iterated only once; "
                    "give a list or another iterable that can be iterated again, or set epochs=1"
                )
            self.epoch += 1
            self.consumed = 0
            self._reader_state = None
            self._epoch_rng = None

    def _epoch(self) -> Iterator[Any]:
        set_epoch = getattr(self.data, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(self.epoch)
        if self._one_shot:
            yield from self._go_on()
            return
        skip = 0
        if self._resume and self.consumed:
            if self._stateful and self._reader_state is not None:
                self.data.load_state_dict(self._reader_state)  # type: ignore[attr-defined]
            else:
                skip = self.consumed
        self._resume = False
        # Skipping the consumed batches lands on the rows trained next only if the order is the
        # one they were consumed in: draw it from the RNG states the epoch first started from.
        replay = self._epoch_rng if skip else None
        if replay is None:
            self._epoch_rng = None if self._stateful else _order_rng(self.data)
        elif self.epoch > 0 and _persistent_workers(self.data):
            # Its later epochs draw their order on the iterator the first epoch built, which
            # drew a seed for its workers first; a resumed run builds its first iterator here.
            _log.warning(
                "resuming in epoch %d of a DataLoader with persistent_workers=True: its order "
                "is drawn from other random numbers than in the interrupted run, so skipping "
                "the %d batches trained may not land on the rows trained next; use "
                "persistent_workers=False (or a recis-io Dataset) for an exact resume",
                self.epoch + 1,
                skip,
            )
        with _drawn_from(replay, self.data):
            iterator = iter(self.data)
            skipped = sum(1 for _ in itertools.islice(iterator, skip))
        if skipped < skip:
            raise ConfigError(
                f"resuming at batch {skip} of epoch {self.epoch + 1}, but train_data has only "
                f"{skipped} batch(es) in it: the training data changed since the checkpoint"
            )
        for batch in iterator:
            self.consumed += 1
            if self._stateful:
                self._reader_state = self.data.state_dict()  # type: ignore[attr-defined]
            yield batch

    def _go_on(self) -> Iterator[Any]:
        """The (only) epoch of a one-shot iterator, from the cursor: the batches it gave past
        the cursor again, then on where the iterator stands; a cursor past that skips."""
        target = self.consumed if self._resume else 0
        self._resume = False
        again: list[Any] = []
        if target < self._taken:
            again = [batch for position, batch in self._untrained if position > target]
            if len(again) != self._taken - target:
                raise ConfigError(
                    f"train_data is a one-shot iterator ({type(self.data).__name__}) that has "
                    f"given {self._taken} batch(es); it cannot go back to batch {target + 1} "
                    "(restored from a checkpoint of an earlier step): give a list or another "
                    "iterable that can be iterated again, or a fresh iterator of the same data"
                )
        elif target > self._taken:
            skip = target - self._taken
            skipped = sum(1 for _ in itertools.islice(self.data, skip))
            self._taken += skipped
            if skipped < skip:
                raise ConfigError(
                    f"resuming at batch {target} of epoch {self.epoch + 1}, but train_data has "
                    f"only {self._taken} batch(es) in it: the training data changed since the "
                    "checkpoint"
                )
        self.consumed = target
        for batch in again:
            self.consumed += 1
            yield batch
        for batch in self.data:
            self._taken += 1
            self._untrained.append((self._taken, batch))
            self.consumed += 1
            yield batch


def _persistent_workers(data: Any) -> bool:
    """Whether ``data`` is a ``DataLoader`` keeping its worker processes across epochs."""
    return (
        bool(getattr(data, "persistent_workers", False))
        and (getattr(data, "num_workers", 0) or 0) > 0
    )


def _generators(data: Any) -> list[torch.Generator]:
    """The torch generators ``data`` draws its order from: a ``DataLoader``'s ``generator``
    and its sampler's (the same one when the loader made the sampler), each once."""
    found: list[torch.Generator] = []
    batch_sampler = getattr(data, "batch_sampler", None)
    for owner in (data, getattr(data, "sampler", None), getattr(batch_sampler, "sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def _order_rng(data: Any) -> dict[str, Any]:
    """The RNG states an iteration of ``data`` starting now draws its order from."""
    return {
        "torch": torch.get_rng_state(),
        "generators": [generator.get_state() for generator in _generators(data)],
    }


@contextlib.contextmanager
def _drawn_from(state: Mapping[str, Any] | None, data: Any) -> Iterator[None]:
    """Within it, torch's global RNG (and ``data``'s generators) are in ``state``; the global
    RNG is put back afterwards (the resume restored it, later steps continue from it), the
    generators are left as the iteration advanced them (as the first pass left them)."""
    if state is None:
        yield
        return
    now = torch.get_rng_state()
    torch.set_rng_state(state["torch"])
    generators = _generators(data)
    if len(generators) == len(state["generators"]):  # else the data changed: leave them
        for generator, saved in zip(generators, state["generators"], strict=True):
            generator.set_state(saved)
    try:
        yield
    finally:
        torch.set_rng_state(now)
