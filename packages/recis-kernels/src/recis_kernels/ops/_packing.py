"""Packing of per-feature tensors into one flat tensor for fused (one pass / one launch) ops."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["pack", "unpack"]


def pack(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Flatten and concatenate; returns the packed tensor and each input's element count."""
    sizes = [t.numel() for t in tensors]
    if len(tensors) == 1:
        return tensors[0].reshape(-1), sizes
    return torch.cat([t.reshape(-1) for t in tensors]), sizes


def unpack(
    packed: torch.Tensor, sizes: Sequence[int], shapes: Sequence[torch.Size]
) -> list[torch.Tensor]:
    """Split a packed result back into tensors of the given shapes."""
    return [p.view(s) for p, s in zip(packed.split(list(sizes)), shapes, strict=True)]
