"""Batches: a mapping of column name to tensor or ragged column, all in one buffer."""

from __future__ import annotations

import weakref
from collections.abc import ItemsView, Iterator, KeysView, Mapping, ValuesView
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .exceptions import InvalidArgumentError

if TYPE_CHECKING:
    import pyarrow as pa

_TORCH_DTYPES = {
    "bool": torch.bool,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "uint16": torch.uint16,
    "uint32": torch.uint32,
    "uint64": torch.uint64,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
}


class Ragged:
    """A column whose rows hold variable-length lists.

    ``values`` holds every innermost element of the batch in row order. ``offsets`` is a tuple
    of int64 tensors, one per list level, outermost first; level ``l`` has one more entry than
    it has items and starts at 0, so items of row ``i`` are ``offsets[0][i]:offsets[0][i+1]``.
    A ``list<int64>`` column therefore has one offsets tensor of length ``B + 1``; a
    ``list<list<int64>>`` has two; an unhashed string column holds its UTF-8 bytes as uint8
    values with one offsets tensor (one more level for a list of strings).

    Example:
        Three rows ``[[1, 2], [], [3]]`` give::

            values  = tensor([1, 2, 3])
            offsets = (tensor([0, 2, 2, 3]),)

        Two rows ``[[[1], [2, 3]], [[4]]]`` give::

            values  = tensor([1, 2, 3, 4])
            offsets = (tensor([0, 2, 3]), tensor([0, 1, 3, 4]))

    Attributes:
        values: ``(N,)`` innermost elements (``(N, k)`` for lists of fixed-size lists).
        offsets: int64 tensors, outermost first; ``offsets[0]`` has shape ``(B + 1,)``.
    """

    __slots__ = ("offsets", "values")

    def __init__(self, values: torch.Tensor, offsets: tuple[torch.Tensor, ...]) -> None:
        self.values = values
        self.offsets = tuple(offsets)

    def __len__(self) -> int:
        return self.offsets[0].numel() - 1

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Ragged:
        """Returns the column on ``device`` (one copy per tensor).

        Raises:
            InvalidArgumentError: ``device`` is not a device (a dtype, for example).
        """
        device = _device(device, "Ragged")
        return Ragged(
            self.values.to(device, non_blocking=non_blocking),
            tuple(o.to(device, non_blocking=non_blocking) for o in self.offsets),
        )

    def pin_memory(self) -> Ragged:
        """Returns the column in pinned (page-locked) host memory: one copy per tensor, none
        when it is already pinned. ``DataLoader(pin_memory=True)`` calls this for ragged
        columns it finds in the batches it pins.

        Raises:
            RuntimeError: Torch cannot pin memory here (no CUDA device), as for a tensor.
        """
        if self.is_pinned():
            return self
        return Ragged(self.values.pin_memory(), tuple(o.pin_memory() for o in self.offsets))

    def is_pinned(self) -> bool:
        """Whether the values and every offsets tensor are in pinned host memory."""
        return self.values.is_pinned() and all(o.is_pinned() for o in self.offsets)

    def row(self, i: int) -> Any:
        """Returns row ``i`` as nested Python lists (handy in tests and debugging); a negative
        ``i`` counts from the end.

        Raises:
            IndexError: ``i`` is outside the rows.
        """
        rows = len(self)
        if not -rows <= i < rows:
            raise IndexError(f"row {i} is out of range for {rows} rows")
        i %= rows

        def level(depth: int, a: int, b: int) -> Any:
            if depth == len(self.offsets):
                return self.values[a:b].tolist()
            off = self.offsets[depth]
            return [level(depth + 1, int(off[j]), int(off[j + 1])) for j in range(a, b)]

        return level(1, int(self.offsets[0][i]), int(self.offsets[0][i + 1]))

    def __repr__(self) -> str:
        return f"Ragged(values={self.values!r}, offsets={self.offsets!r})"


Value = torch.Tensor | Ragged


def _device(device: Any, owner: str) -> torch.device:
    # `tensor.to(torch.float32)` converts values; here it would reinterpret the bytes of
    # every column (and the offsets), so anything but a device is refused.
    try:
        return torch.device(device)
    except (TypeError, RuntimeError) as e:
        raise InvalidArgumentError(
            f"{owner}.to takes a device such as 'cuda' or 'cpu', got {device!r}; "
            "columns keep the dtypes they were read with (convert a column itself instead)"
        ) from e


@dataclass(frozen=True)
class _ColumnInfo:
    name: str
    dtype: str
    fixed: int
    levels: int
    text: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.dtype]


def _views(
    buffer: torch.Tensor, infos: list[_ColumnInfo], layout: tuple[int, list[Any]]
) -> dict[str, Value]:
    rows, cols = layout
    # Cut every region out of the buffer in one split (regions are in buffer order, with
    # alignment gaps between them), then reinterpret each region as its column's dtype.
    dtypes = [info.torch_dtype for info in infos]
    edges: list[int] = []
    for dtype, (values_at, values_len, offsets) in zip(dtypes, cols, strict=True):
        edges += (values_at, values_at + values_len * dtype.itemsize)
        for at, n in offsets:
            edges += (at, at + n * 8)
    sizes = [b - a for a, b in zip([0, *edges], edges, strict=False)]
    pieces = iter(buffer[: edges[-1]].split(sizes)[1::2] if edges else ())
    out: dict[str, Value] = {}
    for info, dtype, (_, _, offsets) in zip(infos, dtypes, cols, strict=True):
        values = next(pieces).view(dtype)
        if info.fixed and info.levels:
            # A list of fixed-size lists: each list item is a row of k values.
            values = values.view(-1, info.fixed)
        if info.levels:
            offs = tuple(next(pieces).view(torch.int64) for _ in offsets)
            out[info.name] = Ragged(values, offs)
        elif info.fixed:
            out[info.name] = values.view(rows, info.fixed)
        else:
            out[info.name] = values
    return out


class _Columns(dict):
    """A batch's columns with the buffer, infos and layout they come from, shared by every
    ``Batch`` rebuilt from them."""

    def __init__(self, buffer: torch.Tensor, infos: list[_ColumnInfo], layout: Any) -> None:
        super().__init__(_views(buffer, infos, layout))
        self.buffer, self.infos, self.layout = buffer, infos, layout


# Live column sets by the id of their first column. Live columns keep that column alive, so the
# id names them alone; `Batch(columns)` uses this to rebuild a batch from its own columns.
_LIVE: weakref.WeakValueDictionary[int, _Columns] = weakref.WeakValueDictionary()


def _register(columns: _Columns) -> None:
    if columns:
        _LIVE[id(next(iter(columns.values())))] = columns


def _columns_of(columns: Mapping[str, Any]) -> _Columns:
    first = next(iter(columns.values()), None)
    known = _LIVE.get(id(first))
    if (
        known is None
        or list(columns) != list(known)
        or any(columns[k] is not v for k, v in known.items())
    ):
        # A TypeError lets torch's default_convert fall back to a plain dict.
        raise TypeError("Batch(columns) takes the columns of an existing batch, unchanged")
    return known


class Batch(Mapping[str, Value]):
    """One batch: column name to ``(B,)`` / ``(B, k)`` tensor or :class:`Ragged`.

    Every column is a view into one contiguous buffer, so moving a batch to a GPU is a single
    host-to-device copy. ``len(batch)`` is the number of rows ``B``; use ``batch.keys()`` for
    the columns.

    ``Batch(columns)`` with the unchanged columns of a batch (a ``dict`` of
    ``batch.items()``) gives a batch over the same buffer and column objects; other mappings
    raise ``TypeError``. This is how a ``DataLoader`` rebuilds each
    batch it receives (``default_convert`` calls ``type(batch)({...})``), so batches keep their
    type, ``len`` and methods through ``DataLoader(ds, batch_size=None)``.
    """

    def __init__(
        self,
        buffer: torch.Tensor | Mapping[str, Value],
        infos: list[_ColumnInfo] | None = None,
        layout: tuple[int, list[Any]] | None = None,
    ) -> None:
        if isinstance(buffer, Mapping):
            columns = _columns_of(buffer)
        elif infos is None or layout is None:
            raise TypeError("Batch(buffer, infos, layout) needs the infos and layout")
        else:
            columns = _Columns(buffer, infos, layout)
            _register(columns)
        self._buffer = columns.buffer
        self._infos = columns.infos
        self._layout = columns.layout
        self._columns = columns

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A batch sent from a DataLoader worker is rebuilt here without __init__.
        self.__dict__.update(state)
        _register(self._columns)

    @property
    def buffer(self) -> torch.Tensor:
        """The ``(nbytes,)`` uint8 buffer every column views."""
        return self._buffer

    @property
    def device(self) -> torch.device:
        return self._buffer.device

    def __getitem__(self, name: str) -> Value:
        return self._columns[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._columns)

    def __len__(self) -> int:
        return int(self._layout[0])

    def __contains__(self, name: object) -> bool:
        return name in self._columns

    def keys(self) -> KeysView[str]:
        return self._columns.keys()

    def values(self) -> ValuesView[Value]:
        return self._columns.values()

    def items(self) -> ItemsView[str, Value]:
        return self._columns.items()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Returns the batch on ``device`` with one copy of the whole buffer.

        Args:
            device: Target device, for example ``"cuda"``.
            non_blocking: Asynchronous copy; overlaps with compute when the buffer is pinned.

        Raises:
            InvalidArgumentError: ``device`` is not a device (a dtype, for example).
        """
        target = self._buffer.to(_device(device, "Batch"), non_blocking=non_blocking)
        if target is self._buffer:
            return self
        return Batch(target, self._infos, self._layout)

    def pin_memory(self) -> Batch:
        """Returns the batch in pinned host memory (one copy, unless already pinned).

        Raises:
            RuntimeError: Torch cannot pin memory here (no CUDA device), as for a tensor.
        """
        if self._buffer.is_pinned():
            return self
        return Batch(self._buffer.pin_memory(), self._infos, self._layout)

    def is_pinned(self) -> bool:
        """Whether the batch's buffer (and so every column) is in pinned host memory."""
        return bool(self._buffer.is_pinned())

    def to_arrow(self) -> pa.RecordBatch:
        """Returns the batch as a ``pyarrow.RecordBatch`` sharing this batch's memory.

        Dense columns become primitive arrays, ``(B, k)`` columns fixed-size lists, ragged
        columns ``large_list`` (int64 offsets), unhashed strings ``large_string`` /
        ``large_binary``. Bool columns are copied (Arrow packs bools into bits). Needs the
        ``arrow`` extra and a CPU batch.
        """
        from ._arrow import to_record_batch

        return to_record_batch(self)

    def __arrow_c_schema__(self) -> Any:
        """The batch's Arrow schema as an ``ArrowSchema`` PyCapsule (Arrow PyCapsule interface)."""
        return self.to_arrow().schema.__arrow_c_schema__()

    def __arrow_c_array__(self, requested_schema: Any = None) -> tuple[Any, Any]:
        """The batch as ``ArrowSchema`` and ``ArrowArray`` (a struct array) PyCapsules: the Arrow
        C data interface, so any Arrow consumer (``pyarrow.record_batch(batch)``, polars,
        DuckDB, ...) takes the batch without copying its values (the arrays point into the
        batch's buffer, which stays alive until the consumer releases them)."""
        return self.to_arrow().__arrow_c_array__(requested_schema)

    def __repr__(self) -> str:
        cols = ", ".join(self._columns)
        return f"Batch(rows={len(self)}, columns=[{cols}])"
