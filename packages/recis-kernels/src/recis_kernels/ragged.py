"""``RaggedTensor``: a batch of variable-length rows (optionally nested) in packed form.

A 2-level ragged tensor of three rows ``[[10, 11], [], [12]]`` is stored as::

    values  = [10, 11, 12]
    offsets = [[0, 2, 2, 3]]          # row i is values[offsets[i]:offsets[i + 1]]

A 3-level one (rows of lists, e.g. a session of events with several ids each) carries one offsets
tensor per ragged level, outermost first: ``[[[1, 2], [3]], [], [[4]]]`` is::

    values  = [1, 2, 3, 4]
    offsets = [[0, 2, 2, 3],          # batch row -> sub-rows
               [0, 2, 3, 4]]          # sub-row -> values
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from recis_kernels._checks import can_inspect, is_int
from recis_kernels.exceptions import RaggedError

__all__ = ["RaggedTensor"]


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        try:
            return torch.from_numpy(value)
        except (TypeError, ValueError) as exc:
            raise RaggedError(
                f"ragged {what} is a NumPy array torch cannot share (dtype {value.dtype}, "
                f"strides {value.strides}): it needs a numeric or bool dtype in native byte "
                "order and no negative strides; pass np.ascontiguousarray(array, dtype=...)"
            ) from exc
    raise RaggedError(
        f"ragged {what} must be a torch.Tensor or numpy array, got {type(value).__name__}"
    )


def _check_device(what: str, tensor: torch.Tensor, values: torch.Tensor) -> None:
    # Checked always, validate or not: it reads no data. The kernels take the offsets of CUDA
    # values as device addresses, so host offsets would be dereferenced on the GPU.
    if tensor.device != values.device:
        raise RaggedError(
            f"ragged {what} is on {tensor.device} but values are on {values.device}; values, "
            f"offsets and weights must share one device"
        )


class RaggedTensor:
    """Packed variable-length rows with one or more levels of nesting.

    Args:
        values: ``(N,)`` flat values of the innermost level (any dtype), or ``(N, D)`` rows.
        offsets: one ``(R+1,)`` int64 tensor, or a list of them, outermost first. Level ``k``
            splits the rows of level ``k + 1`` (the last level splits ``values``).
        weights: optional ``(N,)`` float32 per-value weights.
        validate: check the offsets (monotone, start at 0, end at the next level's length).
            ``None`` (default) validates CPU tensors and skips CUDA ones, where the check would
            synchronize the stream.

    Raises:
        RaggedError: malformed offsets or weights, or offsets or weights on another device
            than ``values`` (checked even with ``validate=False``).

    Example:
        >>> r = RaggedTensor(torch.tensor([10, 11, 12]), torch.tensor([0, 2, 2, 3]))
        >>> r.to_dense(pad_value=-1)
        tensor([[10, 11],
                [-1, -1],
                [12, -1]])
    """

    __slots__ = ("offsets", "values", "weights")

    def __init__(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor | Sequence[torch.Tensor],
        weights: torch.Tensor | None = None,
        *,
        validate: bool | None = None,
    ) -> None:
        values = _as_tensor(values, "values")
        if isinstance(offsets, (torch.Tensor, np.ndarray)):
            offsets = [offsets]
        offs = [_as_tensor(o, f"offsets[{k}]") for k, o in enumerate(offsets)]
        if not offs:
            raise RaggedError("ragged offsets must hold at least one level, got an empty list")
        for k, o in enumerate(offs):
            if o.dtype != torch.int64:
                raise RaggedError(f"ragged offsets[{k}] must be int64, got {o.dtype}")
            if o.dim() != 1 or o.numel() < 1:
                raise RaggedError(
                    f"ragged offsets[{k}] must be 1-d with at least one entry, got shape {tuple(o.shape)}"
                )
        if values.dim() < 1:
            raise RaggedError("ragged values must have at least one dimension, got a scalar")
        for k, o in enumerate(offs):
            _check_device(f"offsets[{k}]", o, values)
        if weights is not None:
            weights = _as_tensor(weights, "weights")
            if weights.dtype != torch.float32:
                raise RaggedError(f"ragged weights must be float32, got {weights.dtype}")
            if weights.shape != values.shape[:1]:
                raise RaggedError(
                    f"ragged weights must have shape ({values.shape[0]},) like values, "
                    f"got {tuple(weights.shape)}"
                )
            _check_device("weights", weights, values)
        self.values = values
        self.offsets: list[torch.Tensor] = offs
        self.weights = weights
        if validate or (validate is None and can_inspect(values)):
            self.validate()

    @classmethod
    def _trusted(
        cls, values: torch.Tensor, offsets: list[torch.Tensor], weights: torch.Tensor | None
    ) -> RaggedTensor:
        """A ragged tensor from parts an op built and knows to be well-formed (int64 1-d
        offsets, weights float32 and as long as the values, one device): none of the
        constructor's checks, which cost microseconds per feature in a fused call."""
        r = object.__new__(cls)
        r.values = values
        r.offsets = offsets
        r.weights = weights
        return r

    # -- structure -------------------------------------------------------------------------

    @property
    def num_levels(self) -> int:
        """Number of offsets tensors (2-level ragged ``[B, L]`` has one; ``[B, S, L]`` two)."""
        return len(self.offsets)

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def __len__(self) -> int:
        return self.offsets[0].numel() - 1

    def lengths(self, level: int = 0) -> torch.Tensor:
        """``(R,)`` int64 row lengths at ``level`` (0 = outermost)."""
        if not is_int(level) or not 0 <= level < self.num_levels:
            raise RaggedError(f"level must be in [0, {self.num_levels}), got {level!r}")
        return self.offsets[int(level)].diff()

    def validate(self) -> RaggedTensor:
        """Check every level; return ``self``.

        Raises:
            RaggedError: offsets not starting at 0, decreasing, or not ending at the length of
                the next level (or of ``values``).
        """
        for k, o in enumerate(self.offsets):
            nxt = (
                self.values.shape[0]
                if k == self.num_levels - 1
                else self.offsets[k + 1].numel() - 1
            )
            what = "values" if k == self.num_levels - 1 else f"offsets[{k + 1}] rows"
            first, last = int(o[0]), int(o[-1])
            if first != 0:
                raise RaggedError(f"ragged offsets[{k}] must start at 0, got {first}")
            if o.numel() > 1:
                # Neighbours compared, not differenced: a difference can wrap around int64
                # (0 then -2**63 + 1 looks like a step of 2**63 - 1).
                down = o[1:] < o[:-1]
                if bool(down.any()):
                    row = int(torch.nonzero(down)[0, 0])
                    raise RaggedError(
                        f"ragged offsets[{k}] must be non-decreasing, got {int(o[row])} then "
                        f"{int(o[row + 1])} at row {row}"
                    )
            if last != nxt:
                raise RaggedError(
                    f"ragged offsets[{k}] must end at the number of {what} ({nxt}), got {last}"
                )
        return self

    # -- conversions ---------------------------------------------------------------------------

    def to_dense(
        self, pad_value: float | int = 0, max_len: int | Sequence[int] | None = None
    ) -> torch.Tensor:
        """Pad to a dense tensor: 2 levels give ``(B, L)``, 3 levels ``(B, S, L)``.

        Args:
            pad_value: value of padding slots.
            max_len: length of the last dense dimension (an int), or one length per ragged
                dimension (``(S, L)`` for 3 levels). Longer rows keep their head. ``None`` uses the
                longest row.

        Raises:
            RaggedError: ``max_len`` names more lengths than there are ragged dimensions.
        """
        from recis_kernels.ops.dense import ragged_to_dense

        shape: list[int | None] | None = None
        if max_len is not None:
            lens: list[int | None]
            if is_int(max_len):
                lens = [max_len]
            elif isinstance(max_len, Sequence) and not isinstance(max_len, str):
                lens = list(max_len)
            else:
                raise RaggedError(
                    f"to_dense: max_len must be an int or a sequence of ints, got {max_len!r}"
                )
            for length in lens:
                if length is not None and not is_int(length):
                    raise RaggedError(f"to_dense: max_len must hold ints (or None), got {length!r}")
            if not 1 <= len(lens) <= self.num_levels:
                wanted = "one length (L)" if self.num_levels == 1 else "one or two lengths (S, L)"
                raise RaggedError(
                    f"to_dense: max_len of a {self.num_levels + 1}-level ragged tensor must be an "
                    f"int or {wanted}, got {len(lens)} lengths"
                )
            shape = [
                len(self),
                *([None] * (self.num_levels - len(lens))),
                *lens,
            ]
        return ragged_to_dense(self, pad_value=pad_value, shape=shape)

    @classmethod
    def from_dense(
        cls,
        dense: torch.Tensor,
        lengths: torch.Tensor | Sequence[torch.Tensor] | None = None,
        pad_value: float | int | None = None,
    ) -> RaggedTensor:
        """Inverse of :meth:`to_dense`; see :func:`recis_kernels.dense_to_ragged`."""
        from recis_kernels.ops.dense import dense_to_ragged

        return dense_to_ragged(dense, lengths=lengths, pad_value=pad_value)

    @classmethod
    def from_column(cls, col: Any) -> RaggedTensor:
        """Wrap any object with ``.values`` and ``.offsets`` (e.g. a recis-io ragged column).

        The tensors are shared, not copied; numpy arrays are viewed through ``torch.from_numpy``.
        An optional ``.weights`` attribute is carried over.
        """
        if not (hasattr(col, "values") and hasattr(col, "offsets")):
            raise RaggedError(
                f"from_column needs an object with .values and .offsets, got {type(col).__name__}"
            )
        offsets = col.offsets
        if not isinstance(offsets, (torch.Tensor, np.ndarray)):
            offsets = list(offsets)
        return cls(col.values, offsets, getattr(col, "weights", None))

    def with_values(
        self, values: torch.Tensor, weights: torch.Tensor | None = None
    ) -> RaggedTensor:
        """Same row structure, new ``values`` (same length) and optional ``weights``."""
        if values.shape[:1] != self.values.shape[:1]:
            raise RaggedError(
                f"with_values needs {self.values.shape[0]} values to keep the row structure, "
                f"got {values.shape[0] if values.dim() else 'a scalar'}"
            )
        if weights is None and type(values) is torch.Tensor:
            # Offsets already checked; only the new values' device can be wrong.
            _check_device("offsets[0]", self.offsets[0], values)
            return RaggedTensor._trusted(values, self.offsets, None)
        return RaggedTensor(values, self.offsets, weights, validate=False)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RaggedTensor:
        """Copy values, offsets and weights to ``device``.

        Raises:
            RaggedError: ``device`` is a dtype (offsets stay int64: cast the values with
                ``r.with_values(r.values.to(dtype))``).
        """
        if isinstance(device, torch.dtype):
            raise RaggedError(
                f"RaggedTensor.to() moves to a device, got the dtype {device}; offsets stay "
                "int64: cast the values with r.with_values(r.values.to(dtype))"
            )
        return RaggedTensor(
            self.values.to(device, non_blocking=non_blocking),
            [o.to(device, non_blocking=non_blocking) for o in self.offsets],
            None if self.weights is None else self.weights.to(device, non_blocking=non_blocking),
            validate=False,
        )

    def pin_memory(self) -> RaggedTensor:
        """Page-locked copy of a CPU ragged tensor, for asynchronous host-to-device copies."""
        return RaggedTensor(
            self.values.pin_memory(),
            [o.pin_memory() for o in self.offsets],
            None if self.weights is None else self.weights.pin_memory(),
            validate=False,
        )

    def clone(self) -> RaggedTensor:
        """A copy whose values, offsets and weights share no memory with these (as
        ``torch.Tensor.clone``: the values' autograd history is kept)."""
        return RaggedTensor._trusted(
            self.values.clone(),
            [o.clone() for o in self.offsets],
            None if self.weights is None else self.weights.clone(),
        )

    def detach(self) -> RaggedTensor:
        """The same rows with values (and weights) detached from autograd; memory is shared."""
        return RaggedTensor._trusted(
            self.values.detach(),
            list(self.offsets),
            None if self.weights is None else self.weights.detach(),
        )

    def equal(self, other: RaggedTensor) -> bool:
        """Whether ``other`` has the same rows: equal offsets at every level, equal values (as
        ``torch.equal``: same shape and entries, so NaN never equals) and equal weights (both
        absent, or equal). False for anything that is not a ``RaggedTensor``."""
        if not isinstance(other, RaggedTensor) or len(self.offsets) != len(other.offsets):
            return False
        if (self.weights is None) != (other.weights is None):
            return False
        pairs = [*zip(self.offsets, other.offsets, strict=True), (self.values, other.values)]
        if self.weights is not None and other.weights is not None:
            pairs.append((self.weights, other.weights))
        return all(
            a.dtype == b.dtype and a.device == b.device and torch.equal(a, b) for a, b in pairs
        )

    # -- indexing --------------------------------------------------------------------------

    def __getitem__(self, index: int | slice) -> torch.Tensor | RaggedTensor:
        """``r[i]``: the values of row ``i`` (2 levels) or a ragged row (3 levels);
        ``r[a:b]``: a ragged tensor of rows ``a..b-1`` with offsets rebased to 0."""
        n = len(self)
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step != 1:
                raise RaggedError(f"ragged slicing supports step 1 only, got {step}")
            return self._slice(start, max(start, stop))
        if is_int(index):  # never a bool: r[True] would be row 1
            i = int(index)
            if not -n <= i < n:
                raise IndexError(f"ragged row index {i} out of range for {n} rows")
            i %= n
            row = self._slice(i, i + 1)
            if self.num_levels == 1:
                return row.values
            return RaggedTensor(row.values, row.offsets[1:], row.weights, validate=False)
        raise RaggedError(f"ragged rows are indexed by int or slice, got {type(index).__name__}")

    def _slice(self, start: int, stop: int) -> RaggedTensor:
        offsets = []
        for o in self.offsets:
            part = o[start : stop + 1]
            start, stop = int(part[0]), int(part[-1])
            offsets.append(part - start)
        values = self.values[start:stop]
        weights = None if self.weights is None else self.weights[start:stop]
        return RaggedTensor(values, offsets, weights, validate=False)

    def __repr__(self) -> str:
        w = "" if self.weights is None else ", weights=..."
        return (
            f"RaggedTensor(rows={len(self)}, levels={self.num_levels}, values={self.values.shape[0]}, "
            f"dtype={self.values.dtype}, device={self.values.device}{w})"
        )
