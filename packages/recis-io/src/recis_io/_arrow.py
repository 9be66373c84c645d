"""Conversion of batches to pyarrow without copying the values."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .exceptions import InvalidArgumentError

if TYPE_CHECKING:
    import pyarrow as pa

    from ._batch import Batch, _ColumnInfo


def _buffer(pa_mod, t: torch.Tensor) -> pa.Buffer:
    if t.numel() == 0:
        # torch gives an empty tensor a null data pointer, which Arrow refuses as the data of
        # a string array (a batch of only empty strings): an empty buffer of its own instead.
        return pa_mod.py_buffer(b"")
    # The base keeps the torch tensor (and so the batch memory) alive as long as arrow needs it.
    return pa_mod.foreign_buffer(t.data_ptr(), t.numel() * t.element_size(), base=t)


def _leaf_type(pa_mod, info: _ColumnInfo) -> pa.DataType:
    if info.text == "string":
        return pa_mod.large_string()
    if info.text == "binary":
        return pa_mod.large_binary()
    return pa_mod.bool_() if info.dtype == "bool" else getattr(pa_mod, info.dtype)()


def _array(pa_mod, info: _ColumnInfo, value) -> pa.Array:
    from ._batch import Ragged

    if isinstance(value, Ragged):
        levels = list(value.offsets)
        if info.text:
            last = levels.pop()
            arr = pa_mod.Array.from_buffers(
                _leaf_type(pa_mod, info),
                last.numel() - 1,
                [None, _buffer(pa_mod, last), _buffer(pa_mod, value.values)],
            )
        else:
            arr = _flat(pa_mod, info, value.values.reshape(-1))
            if value.values.dim() == 2:
                arr = pa_mod.FixedSizeListArray.from_arrays(arr, value.values.shape[1])
        for off in reversed(levels):
            arr = pa_mod.LargeListArray.from_arrays(
                pa_mod.Array.from_buffers(
                    pa_mod.int64(), off.numel(), [None, _buffer(pa_mod, off)]
                ),
                arr,
            )
        return arr
    flat = _flat(pa_mod, info, value.reshape(-1))
    if value.dim() == 2:
        return pa_mod.FixedSizeListArray.from_arrays(flat, value.shape[1])
    return flat


def _flat(pa_mod, info: _ColumnInfo, t: torch.Tensor) -> pa.Array:
    if info.dtype == "bool":
        return pa_mod.array(t.tolist(), type=pa_mod.bool_())
    typ = _leaf_type(pa_mod, info)
    return pa_mod.Array.from_buffers(typ, t.numel(), [None, _buffer(pa_mod, t)])


def to_record_batch(batch: Batch) -> pa.RecordBatch:
    try:
        import pyarrow as pa_mod
    except ImportError as err:
        raise ImportError(
            "Batch.to_arrow needs pyarrow, which recis-io does not install itself: "
            "pip install 'recis-io[arrow]'"
        ) from err

    if batch.device.type != "cpu":
        raise InvalidArgumentError(f"to_arrow needs a cpu batch, this one is on {batch.device}")
    arrays = [_array(pa_mod, info, batch[info.name]) for info in batch._infos]
    return pa_mod.RecordBatch.from_arrays(arrays, names=[i.name for i in batch._infos])
