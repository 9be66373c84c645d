"""The trainer's history (``(step, logs)`` per training step and evaluation) as checkpoints
hold it: in columns of tensors.

A list of a few thousand small dicts takes torch's weights-only loader about 20 µs an entry,
and every save reads its file back that way (see :func:`~recis_train._checkpoint.save_object`):
kept as lists, a run of 20,000 steps spent 0.4 s on each save, more with every step. As
columns, the steps and the values of each log key are tensors, which load at memory speed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from recis_train.exceptions import CheckpointError

History = dict[str, list[tuple[int, dict[str, float]]]]

_PACKED = ("steps", "keys", "values", "present")


def pack_history(
    history: Mapping[str, Sequence[tuple[int, Mapping[str, float]]]],
) -> dict[str, Any]:
    """Each part of ``history`` in columns: ``steps`` ((n,) int64), ``keys`` (the log keys, in
    the order first met), ``values`` ((n, k) float64, NaN where an entry lacks the key) and
    ``present`` ((n, k) bool, or ``None`` when every entry has every key). A part holding
    anything but integer steps and float values (a log a user added by hand) stays a list."""
    return {name: _pack(entries) for name, entries in history.items()}


def _pack(entries: Sequence[tuple[int, Mapping[str, float]]]) -> Any:
    keys: dict[str, None] = {}
    for entry in entries:
        if not (isinstance(entry, tuple) and len(entry) == 2):
            return list(entries)
        step, logs = entry
        if type(step) is not int or not -(2**63) <= step < 2**63 or type(logs) is not dict:
            return list(entries)
        for key, value in logs.items():
            if type(key) is not str or type(value) is not float:
                return list(entries)
            keys[key] = None
    names = list(keys)
    steps = torch.tensor([step for step, _ in entries], dtype=torch.int64)
    values = torch.tensor(
        [[logs.get(k, math.nan) for k in names] for _, logs in entries], dtype=torch.float64
    ).reshape(len(entries), len(names))
    present = None
    if any(len(logs) != len(names) for _, logs in entries):
        present = torch.tensor(
            [[k in logs for k in names] for _, logs in entries], dtype=torch.bool
        ).reshape(len(entries), len(names))
    return {"steps": steps, "keys": names, "values": values, "present": present}


def check_history(history: Mapping[str, Any], file: Path) -> None:
    """Raises :class:`CheckpointError` naming ``file`` and the part when a part of the
    checkpoint's history (a mapping, as the trainer state's checks found it) is neither a list
    of entries nor columns :func:`pack_history` could have written."""
    for name, part in history.items():
        if isinstance(part, (list, tuple)):
            continue
        if not isinstance(part, Mapping) or set(part) != set(_PACKED):
            raise CheckpointError(
                f"{file}: trainer state entry 'history' must map names to lists or to columns "
                f"{list(_PACKED)}; {name!r} is {_kind(part)}"
            )
        steps, keys, values, present = (part[k] for k in _PACKED)
        where = f"{file}: trainer state entry history[{name!r}]"
        if not (
            isinstance(steps, torch.Tensor) and steps.dtype == torch.int64 and steps.dim() == 1
        ):
            raise CheckpointError(f"{where}: 'steps' is not a 1-d int64 tensor ({_kind(steps)})")
        if not (isinstance(keys, (list, tuple)) and all(isinstance(k, str) for k in keys)):
            raise CheckpointError(f"{where}: 'keys' is not a list of strings ({_kind(keys)})")
        if len(set(keys)) != len(keys):
            raise CheckpointError(f"{where}: 'keys' names a key twice")
        shape = (len(steps), len(keys))
        if not (
            isinstance(values, torch.Tensor)
            and values.dtype == torch.float64
            and tuple(values.shape) == shape
        ):
            raise CheckpointError(
                f"{where}: 'values' is not a float64 tensor of shape {shape} ({_kind(values)})"
            )
        if present is not None and not (
            isinstance(present, torch.Tensor)
            and present.dtype == torch.bool
            and tuple(present.shape) == shape
        ):
            raise CheckpointError(
                f"{where}: 'present' is not None or a bool tensor of shape {shape} "
                f"({_kind(present)})"
            )


def unpack_history(history: Mapping[str, Any]) -> History:
    """The history :func:`pack_history` packed (checked by :func:`check_history`); parts held
    as lists come back as lists of their entries, each as it was saved."""
    out: History = {}
    for name, part in history.items():
        if isinstance(part, (list, tuple)):
            out[name] = list(part)  # entries as they were saved (a user's own, too)
            continue
        keys = list(part["keys"])
        steps = part["steps"].tolist()
        rows = part["values"].tolist()
        if part["present"] is None:
            out[name] = [
                (s, dict(zip(keys, row, strict=True))) for s, row in zip(steps, rows, strict=True)
            ]
        else:
            out[name] = [
                (s, {k: v for k, v, kept in zip(keys, row, mask, strict=True) if kept})
                for s, row, mask in zip(steps, rows, part["present"].tolist(), strict=True)
            ]
    return out


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
