"""Fused implementations of the built-in op kinds, registered with the fusion registry.

Each gathers the elements of every feature's value, makes one recis-kernels call for the whole
group (per-feature parameters passed alongside), and puts the results back into each value's
structure.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import recis_kernels as rk

from ._fusion import register_fused
from ._ops import Mod
from ._values import Value, flat, rebuild

__all__: list[str] = []


@register_fused("mod")
def fused_mod(ops: Sequence[Mod], values: Sequence[Value]) -> list[Value]:
    """All ``mod`` ops of a step as one ``recis_kernels.fused_mod`` call."""
    ids = [flat(v).to(torch.int64) for v in values]
    outs = rk.fused_mod(ids, [op.n for op in ops])
    return [rebuild(v, o) for v, o in zip(values, outs, strict=True)]
