"""Blocked row storage: rows of a fixed width in fixed-size blocks that grow without copying.

Row ``r`` lives in block ``r >> block_shift`` at offset ``r & (block_rows - 1)``. ``blocks`` is
the block pointer table (a Python list of ``(block_rows, width)`` tensors on the CPU path).
Adding rows appends blocks; existing rows never move, so a table can grow while views of its
rows stay valid. A CPU block of 1 MiB or more is anonymous memory the operating system maps on
first touch (zero pages): its memory is taken as rows are written, a page at a time, so a table
of a few rows holds a few pages, not a whole block of ``block_rows`` rows. On CPU tensors
gathers and scatters copy each row's column range with one compiled pass in the order asked
(``_native.copy_block_rows``), any dtype; the torch path (tensors that are traced or need
gradients) groups rows by block. On CUDA (float32 rows) gathers and scatters are single
launches of ``cuda/row_store.cu`` that read the block pointer table on the device and move
16-byte ``float4`` groups when the row width and column range are multiples of 4;
``scatter_add`` reduces duplicate rows first, so every row is written by exactly one thread
(no atomics).

Rows outside ``[0, capacity)`` raise :class:`~recis_kernels.IndexOutOfRangeError` naming the op,
the position and the row. Host rows are checked before any work; the CUDA kernels check each
row on the device, skip a bad one (a gather returns zeros for it) and record it, and the error
is raised where the package next reads the device (see :func:`recis_kernels.check_index_errors`).
"""

from __future__ import annotations

import mmap
from collections.abc import Callable

import numpy as np
import torch

from recis_kernels import _native
from recis_kernels._backend import on_host, use_cuda_kernels
from recis_kernels._checks import (
    can_inspect,
    check_1d,
    check_device,
    check_dtype,
    check_index_range,
    check_tensor,
    grid_for,
    resolve_device,
)
from recis_kernels._cuda import index_errors
from recis_kernels.exceptions import ShapeError

__all__ = ["RowStore"]

#: CPU blocks of this many bytes or more are mapped lazily (see the module docstring)
_LAZY_BYTES = 1 << 20
#: private: a process forked after the blocks were made (a data loader's worker) writes to
#: its own copy of a page, never to the parent's rows
_PRIVATE = (
    {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_ANONYMOUS") else {}
)


class RowStore:
    """Rows of ``width`` elements of ``dtype`` in blocks of ``block_rows`` rows.

    Args:
        width: elements per row.
        dtype: element dtype.
        block_rows: rows per block (rounded up to a power of two).
        device: where the blocks live.

    Example:
        >>> s = RowStore(4)
        >>> s.reserve(3)
        >>> s.scatter(torch.tensor([2]), torch.ones(1, 4))
        >>> s.gather(torch.tensor([2, 0]))
        tensor([[1., 1., 1., 1.],
                [0., 0., 0., 0.]])
    """

    def __init__(
        self,
        width: int,
        dtype: torch.dtype = torch.float32,
        block_rows: int = 1 << 16,
        device: torch.device | str | None = None,
    ) -> None:
        if width < 1:
            raise ShapeError(f"RowStore: width must be >= 1, got {width}")
        self.width = int(width)
        self.dtype = dtype
        self.block_shift = max(0, int(block_rows) - 1).bit_length()
        self.block_rows = 1 << self.block_shift
        self.device = resolve_device(device)
        self.blocks: list[torch.Tensor] = []

    @property
    def capacity(self) -> int:
        """Rows addressable without adding a block."""
        return len(self.blocks) * self.block_rows

    @property
    def nbytes(self) -> int:
        """Bytes held by all blocks."""
        return sum(b.numel() * b.element_size() for b in self.blocks)

    def reserve(self, num_rows: int) -> None:
        """Add zero-filled blocks until rows ``[0, num_rows)`` exist."""
        while self.capacity < num_rows:
            self.blocks.append(self._zeros())

    @property
    def _item_size(self) -> int:
        """Bytes of one element of :attr:`dtype`."""
        return torch.empty(0, dtype=self.dtype).element_size()

    def _zeros(self) -> torch.Tensor:
        """A new zero-filled block."""
        shape = (self.block_rows, self.width)
        nbytes = self.block_rows * self.width * self._item_size
        if self.device.type != "cpu" or nbytes < _LAZY_BYTES:
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        # Pages of zeros mapped as they are first touched (torch.zeros writes every page).
        memory = mmap.mmap(-1, nbytes, **_PRIVATE)
        return torch.frombuffer(memory, dtype=self.dtype).view(shape)

    def _check_rows(self, op: str, rows: torch.Tensor) -> None:
        check_tensor(op, "rows", rows)
        check_dtype(op, "rows", rows, (torch.int64,))
        check_1d(op, "rows", rows)
        check_device(op, "rows", rows, self.device)
        if can_inspect(rows):
            check_index_range(op, "rows", rows, 0, self.capacity)

    def _columns(self, start: int, stop: int | None) -> tuple[int, int]:
        stop = self.width if stop is None else stop
        if not 0 <= start < stop <= self.width:
            raise ShapeError(f"RowStore: columns [{start}, {stop}) outside a row of {self.width}")
        return start, stop

    def _groups(self, op: str, rows: torch.Tensor):
        """(block index, slice of the grouped order, offsets in the block) per block touched,
        and the grouped order: ``order`` lists positions in ``rows`` block by block (ascending
        within a block), so block ``b``'s rows are ``rows[order[sl]]``. Host rows were
        checked by :meth:`_check_rows`; device rows are checked here, where the counts are
        read anyway."""
        blk = rows >> self.block_shift
        low = rows & (self.block_rows - 1)
        if can_inspect(rows) and len(self.blocks) <= 1 << 16:
            # NumPy sorts 8- and 16-bit keys stably by radix sort: one linear pass, several
            # times faster than torch's comparison sort or a comparison pass per block.
            wide = blk.numpy()
            counts = np.bincount(wide, minlength=len(self.blocks)).tolist()
            small = wide.astype(np.uint8 if len(self.blocks) <= 1 << 8 else np.uint16)
            order = torch.from_numpy(np.argsort(small, kind="stable"))
        else:
            least, greatest = torch.stack(torch.aminmax(rows)).tolist()
            check_index_range(op, "rows", rows, 0, self.capacity, (least, greatest))
            counts = torch.bincount(blk, minlength=len(self.blocks)).tolist()
            order = torch.argsort(blk, stable=True)
        touched = [b for b, count in enumerate(counts) if count]
        low = low.index_select(0, order)
        groups, at = [], 0
        for b in touched:
            groups.append((b, slice(at, at + counts[b]), low[at : at + counts[b]]))
            at += counts[b]
        return groups, order

    def gather(self, rows: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Copy rows (columns ``[start, stop)``) into a new ``(N, stop - start)`` tensor.

        Args:
            rows: ``(N,) int64`` row indices below :attr:`capacity`, duplicates allowed.
            start: first column.
            stop: end column (default: the row width).
        """
        op = "RowStore.gather"
        self._check_rows(op, rows)
        return self._gather(op, rows, *self._columns(start, stop))

    def _gather(self, op: str, rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        out = torch.empty(rows.numel(), stop - start, dtype=self.dtype, device=self.device)
        if rows.numel() == 0:
            return out
        if self._kernel():
            self._launch(op, "gather_rows", rows, start, stop - start, out, None)
            return out
        if self._host(rows):
            self._copy_host(rows, start, stop, out, gather=True)
            return out
        if len(self.blocks) == 1:
            torch.index_select(self._block(0, start, stop), 0, rows, out=out)
            return out
        # Gather block by block into consecutive slices, then put the rows back in the asked
        # order with one scatter.
        groups, order = self._groups(op, rows)
        grouped = self._gather_grouped(groups, start, stop)
        out.index_copy_(0, order, grouped)
        return out

    def _gather_grouped(self, groups, start: int, stop: int) -> torch.Tensor:
        size = groups[-1][1].stop if groups else 0
        grouped = torch.empty(size, stop - start, dtype=self.dtype, device=self.device)
        for b, sl, low in groups:
            torch.index_select(self._block(b, start, stop), 0, low, out=grouped[sl])
        return grouped

    def update(
        self,
        rows: torch.Tensor,
        fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        """Read rows (columns ``[start, stop)``), compute their new values, write them back.

        ``fn(current, which)`` gets the ``(N, stop - start)`` current values of the rows in
        some order and returns their new values in that order: row ``k`` of ``current`` is
        ``rows[which[k]]`` (``which`` is ``None`` when the order is that of ``rows``). On CPU
        tensors the rows are copied out and back by one compiled pass each, in the order of
        ``rows`` (``which`` is ``None``); the torch path of other CPU inputs visits them block
        by block, so neither the read nor the write pays to put rows back in the asked order:
        an optimizer permutes its gradients by ``which`` instead.

        Args:
            rows: ``(N,) int64`` distinct row indices below :attr:`capacity`.
            fn: the update, as above.
            start: first column.
            stop: end column (default: the row width).
        """
        op = "RowStore.update"
        self._check_rows(op, rows)
        start, stop = self._columns(start, stop)
        if rows.numel() == 0:
            return
        whole = self._kernel() or len(self.blocks) == 1 or self._host(rows)
        if whole:
            groups, which = [], None
            current = self._gather(op, rows, start, stop)
        else:
            groups, which = self._groups(op, rows)
            current = self._gather_grouped(groups, start, stop)
        new = fn(current, which)
        if not isinstance(new, torch.Tensor) or new.shape != current.shape:
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise ShapeError(
                f"RowStore.update: fn returned {got}, expected shape {tuple(current.shape)}"
            )
        if whole:
            self._scatter(op, rows, new, start, stop)
            return
        for b, sl, low in groups:
            self._block(b, start, stop).index_copy_(0, low, new[sl].to(self.dtype))

    def _block(self, b: int, start: int, stop: int) -> torch.Tensor:
        block = self.blocks[b]
        return block if (start, stop) == (0, self.width) else block[:, start:stop]

    def scatter(self, rows: torch.Tensor, values: torch.Tensor, start: int = 0) -> None:
        """Overwrite rows (columns from ``start``) with ``values``; rows must be distinct.

        Args:
            rows: ``(N,) int64`` distinct row indices.
            values: ``(N, W)`` with ``start + W <= width``, cast to the store dtype.
            start: first column written.
        """
        op = "RowStore.scatter"
        self._check_rows(op, rows)
        stop = self._check_values(op, rows, values, start)
        if self._shares_a_block(values):
            # Rows of the store itself (a view of a block): copied first, or rows written
            # early would be read back as the source of later ones (the kernels copy row by
            # row; torch's index_copy_ refuses overlapping memory).
            values = values.clone()
        self._scatter(op, rows, values, start, stop)

    def _shares_a_block(self, values: torch.Tensor) -> bool:
        """Whether ``values`` lies in the memory of one of the blocks."""
        if values.device != self.device or values.numel() == 0:
            return False
        memory = values.untyped_storage().data_ptr()
        return any(b.untyped_storage().data_ptr() == memory for b in self.blocks)

    def _scatter(
        self, op: str, rows: torch.Tensor, values: torch.Tensor, start: int, stop: int
    ) -> None:
        if self._kernel() and rows.numel():
            src = values.to(self.dtype).contiguous()
            self._launch(op, "scatter_rows", rows, start, stop - start, src, 0)
            return
        if rows.numel() == 0:
            return
        if self._host(rows):
            self._copy_host(rows, start, stop, values.to(self.dtype).contiguous(), gather=False)
            return
        if len(self.blocks) == 1:
            self._block(0, start, stop).index_copy_(0, rows, values.to(self.dtype))
            return
        groups, order = self._groups(op, rows)
        grouped = values.index_select(0, order)
        for b, sl, low in groups:
            self._block(b, start, stop).index_copy_(0, low, grouped[sl].to(self.dtype))

    def scatter_add(self, rows: torch.Tensor, values: torch.Tensor, start: int = 0) -> None:
        """Add ``values`` into rows (columns from ``start``); duplicate rows accumulate.

        Duplicates are reduced first (one sum per distinct row), then added once per row.

        Args:
            rows: ``(N,) int64`` row indices, duplicates allowed.
            values: ``(N, W)`` with ``start + W <= width``.
            start: first column updated.
        """
        op = "RowStore.scatter_add"
        self._check_rows(op, rows)
        stop = self._check_values(op, rows, values, start)
        uniq, inverse = torch.unique(rows, return_inverse=True)
        if uniq.numel() and not can_inspect(rows):
            # unique synchronized to size its output; its ends, read with the pending kernel
            # errors, bound every row, so a bad row is named at its position in ``rows``.
            least, greatest = index_errors.host_ints(torch.stack((uniq[0], uniq[-1])))
            check_index_range(op, "rows", rows, 0, self.capacity, (least, greatest))
        summed = torch.zeros(uniq.numel(), values.shape[1], dtype=values.dtype, device=self.device)
        summed.scatter_add_(0, inverse[:, None].expand(-1, values.shape[1]), values)
        current = self._gather(op, uniq, start, stop)
        self._scatter(op, uniq, current + summed.to(self.dtype), start, stop)

    def _kernel(self) -> bool:
        """Whether the CUDA kernels move the rows: float32 dense blocks (a store loaded from
        strided tensors keeps the torch path, as on the CPU)."""
        return (
            self.dtype == torch.float32
            and use_cuda_kernels(self.device)
            and all(b.is_contiguous() for b in self.blocks)
        )

    def _host(self, rows: torch.Tensor) -> bool:
        """Whether the compiled CPU copy can move the rows: plain CPU rows (checked in range
        by the caller) and dense blocks (a store loaded from strided tensors keeps the torch
        path)."""
        return (
            self.device.type == "cpu"
            and on_host((rows,))
            and all(b.is_contiguous() for b in self.blocks)
        )

    def _copy_host(
        self, rows: torch.Tensor, start: int, stop: int, data: torch.Tensor, *, gather: bool
    ) -> None:
        """Columns ``[start, stop)`` of ``rows`` to (``gather``) or from the contiguous
        ``(N, stop - start)`` ``data``, one compiled pass in the order of ``rows``."""
        item = self._item_size
        rows = rows.contiguous()
        _native.copy_block_rows(
            [b.data_ptr() for b in self.blocks],
            self.block_shift,
            self.width * item,
            rows.data_ptr(),
            rows.numel(),
            start * item,
            (stop - start) * item,
            data.data_ptr(),
            (stop - start) * item,
            gather,
        )

    def _block_table(self) -> torch.Tensor:
        """The block pointer table on the device, rebuilt whenever the blocks' addresses
        changed: blocks added, or other tensors in their place (a copy of the store, blocks
        loaded or moved)."""
        ptrs = tuple(b.data_ptr() for b in self.blocks)
        cached = getattr(self, "_ptrs", None)
        if cached is None or cached[0] != ptrs:
            table = torch.tensor(ptrs, dtype=torch.int64).to(self.device)
            cached = (ptrs, table, all(p % 16 == 0 for p in ptrs))
            self._ptrs = cached
        return cached[1]

    def _blocks_aligned(self) -> bool:
        """Whether every block starts on 16 bytes (a block loaded as a view may not)."""
        self._block_table()
        return self._ptrs[2]

    def __getstate__(self) -> dict[str, object]:
        # The pointer table holds this process's addresses of these blocks: a copy or an
        # unpickled store builds its own.
        state = self.__dict__.copy()
        state.pop("_ptrs", None)
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        # torch.load(map_location=...) moves the blocks: the store lives where they are (a
        # store without blocks keeps its device; a HashTable sets its store's from its own).
        self.__dict__.update(state)
        if self.blocks:
            self.device = self.blocks[0].device

    def _launch(
        self,
        op: str,
        kernel: str,
        rows: torch.Tensor,
        start: int,
        cols: int,
        data: torch.Tensor,
        accumulate: int | None,
    ) -> None:
        from recis_kernels._cuda import launch

        rows = rows.contiguous()
        aligned = self.width % 4 == 0 and start % 4 == 0 and cols % 4 == 0
        # Four floats a load: the rows of every block and of data must start on 16 bytes.
        vec4 = int(aligned and data.data_ptr() % 16 == 0 and self._blocks_aligned())
        n = rows.numel() * ((cols + 3) // 4)
        table = self._block_table()
        # The table may have been built on another stream: a new one (blocks added) replaces it
        # while this launch may still read it, so its memory waits for this stream too.
        if table.is_cuda:
            table.record_stream(torch.cuda.current_stream(self.device))
        args = [
            ("ptr", table),
            ("i32", self.block_shift),
            ("i64", self.width),
            ("i64", self.capacity),
            ("ptr", rows),
            ("i64", rows.numel()),
            ("i64", start),
            ("i64", cols),
            ("i32", vec4),
        ]
        args += [("ptr", data)] if accumulate is None else [("i32", accumulate), ("ptr", data)]
        args += index_errors.error_args(self.device, op, ("rows",))
        launch("row_store", kernel, grid_for(n), 256, args, device=self.device)
        index_errors.after_launch(self.device)

    def _check_values(self, op: str, rows: torch.Tensor, values: torch.Tensor, start: int) -> int:
        check_tensor(op, "values", values)
        check_device(op, "values", values, self.device)
        if values.dim() != 2 or values.shape[0] != rows.numel():
            raise ShapeError(
                f"{op}: values has shape {tuple(values.shape)}, expected ({rows.numel()}, W)"
            )
        _, stop = self._columns(start, start + values.shape[1])
        return stop
