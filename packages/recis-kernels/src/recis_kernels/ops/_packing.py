"""Packing of per-feature tensors into one flat tensor for fused (one pass / one launch) ops."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from recis_kernels._checks import can_inspect

__all__ = ["concat_rows", "pack", "split_rows", "stacked_offsets", "stacked_weights", "unpack"]


def pack(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Flatten and concatenate; returns the packed tensor and each input's element count."""
    sizes = [t.numel() for t in tensors]
    if len(tensors) == 1:
        return tensors[0].reshape(-1), sizes
    adjacent = _adjacent(tensors)
    if adjacent is not None:
        return adjacent, sizes
    return torch.cat([t.reshape(-1) for t in tensors]), sizes


def _adjacent(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One view over ``tensors`` when they already lie back to back in one buffer (the parts of
    an earlier fused result, or columns of one packed batch), so packing them copies nothing."""
    first = tensors[0]
    if torch.compiler.is_compiling() or first.requires_grad:
        return None
    end = first.data_ptr()
    storage = first.untyped_storage().data_ptr()
    for t in tensors:
        if (
            t.dtype != first.dtype
            or t.device != first.device
            or t.requires_grad
            or not t.is_contiguous()
            or t.data_ptr() != end
            or t.untyped_storage().data_ptr() != storage
        ):
            return None
        end += t.numel() * t.element_size()
    total = (end - first.data_ptr()) // first.element_size()
    return first.as_strided((total,), (1,), first.storage_offset())


def unpack(
    packed: torch.Tensor, sizes: Sequence[int], shapes: Sequence[torch.Size]
) -> list[torch.Tensor]:
    """Split a packed result back into tensors of the given shapes."""
    parts = packed.split(list(sizes))
    # Flat inputs need no view (a view costs microseconds: fused calls unpack dozens of parts).
    if all(len(s) == 1 for s in shapes):
        return list(parts)
    return [p if p.shape == s else p.view(s) for p, s in zip(parts, shapes, strict=True)]


def concat_rows(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[int]]:
    """Stack the rows of several 2-level ragged ``(values, offsets, weights)`` into one.

    Returns the packed values, offsets, weights (``None`` when no part has weights; parts without
    weights count as weight 1) and each part's row count.
    """
    rows = [o.numel() - 1 for _, o, _ in parts]
    if len(parts) == 1:
        v, o, w = parts[0]
        return v, o, w, rows
    values = torch.cat([v for v, _, _ in parts])
    offsets = stacked_offsets([o for _, o, _ in parts], [v.shape[0] for v, _, _ in parts])
    weights = stacked_weights([v for v, _, _ in parts], [w for _, _, w in parts])
    return values, offsets, weights, rows


def stacked_weights(
    values: Sequence[torch.Tensor], weights: Sequence[torch.Tensor | None]
) -> torch.Tensor | None:
    """The parts' weights stacked like their values (a part without weights counts as weight 1);
    ``None`` when no part has weights."""
    if all(w is None for w in weights):
        return None
    return torch.cat(
        [
            w if w is not None else torch.ones(v.shape[0], dtype=torch.float32, device=v.device)
            for v, w in zip(values, weights, strict=True)
        ]
    )


def stacked_offsets(offsets: Sequence[torch.Tensor], counts: Sequence[int]) -> torch.Tensor:
    """Offsets of ragged parts stacked row-wise: each part's offsets shifted by the values
    before it (``counts``: each part's number of values)."""
    if can_inspect(offsets[0]):
        out = np.empty(sum(o.numel() - 1 for o in offsets) + 1, dtype=np.int64)
        row = base = 0
        for o, n in zip(offsets, counts, strict=True):
            m = o.numel() - 1
            np.add(o.numpy()[:-1], base, out=out[row : row + m])
            row, base = row + m, base + n
        out[-1] = base
        return torch.from_numpy(out)
    pieces = []
    base = 0
    for o, n in zip(offsets, counts, strict=True):
        pieces.append(o[:-1] + base)
        base += n
    pieces.append(torch.tensor([base], dtype=torch.int64, device=offsets[0].device))
    return torch.cat(pieces)


def split_rows(
    values: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None, rows: Sequence[int]
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Inverse of :func:`concat_rows` on an op's packed 2-level result."""
    if len(rows) == 1:
        return [(values, offsets, weights)]
    row_bounds = [0]
    for r in rows:
        row_bounds.append(row_bounds[-1] + r)
    host = can_inspect(offsets)
    if host:
        offsets_np = offsets.numpy()
        value_bounds = offsets_np[row_bounds].tolist()
    else:
        value_bounds = offsets[torch.tensor(row_bounds, device=offsets.device)].tolist()
    out = []
    for k in range(len(rows)):
        lo, hi = value_bounds[k], value_bounds[k + 1]
        first, last = row_bounds[k], row_bounds[k + 1] + 1
        off = torch.from_numpy(offsets_np[first:last] - lo) if host else offsets[first:last] - lo
        out.append((values[lo:hi], off, None if weights is None else weights[lo:hi]))
    return out
