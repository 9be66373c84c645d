"""The training data stream: epochs, a resumable cursor, and moving batches to the device."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from recis_train.exceptions import ConfigError


def move_to(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor on ``device`` (non-blocking; batches keep their own type)."""
    if device.type == "cpu":
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
    any deterministic iterable.

    Before each epoch's pass, ``data.set_epoch(epoch)`` is called when ``data`` has it (a
    recis-io ``Dataset``, so a shuffled one reads a new order every epoch).

    Every epoch iterates ``data`` again, so more than one epoch needs an iterable that can be
    iterated again (a list, a ``DataLoader``, a recis-io ``Dataset``), not a one-shot iterator
    such as a generator.

    Raises:
        ConfigError: ``epochs > 1`` and ``data`` is an iterator; (while iterating) an epoch
            after a non-empty one gave no batch (``data`` is one-shot), or resuming skips more
            batches than the epoch has (the data changed since the checkpoint).
    """

    def __init__(self, data: Iterable[Any], epochs: int) -> None:
        if epochs > 1 and isinstance(data, Iterator):
            raise ConfigError(
                f"train_data is a one-shot iterator ({type(data).__name__}) but epochs={epochs} "
                "passes over it were asked for; give a list or another iterable that can be "
                "iterated again (e.g. a DataLoader), or set epochs=1"
            )
        self.data = data
        self.epochs = epochs
        self.epoch = 0
        self.consumed = 0  # batches taken in the current epoch
        self._reader_state: Any = None
        self._resume = False
        self._stateful = callable(getattr(data, "state_dict", None)) and callable(
            getattr(data, "load_state_dict", None)
        )

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "reader": self._reader_state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])
        self._reader_state = state.get("reader")
        self._resume = True

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

    def _epoch(self) -> Iterator[Any]:
        set_epoch = getattr(self.data, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(self.epoch)
        skip = 0
        if self._resume and self.consumed:
            if self._stateful and self._reader_state is not None:
                self.data.load_state_dict(self._reader_state)  # type: ignore[attr-defined]
            else:
                skip = self.consumed
        self._resume = False
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
