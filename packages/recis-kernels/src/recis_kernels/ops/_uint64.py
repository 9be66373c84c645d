"""Unsigned 64-bit arithmetic on int64 tensors (torch has no full uint64 support).

Addition, subtraction, multiplication and xor wrap identically for signed and unsigned 64-bit
integers, so only right shifts and remainders need care.
"""

from __future__ import annotations

import numpy as np
import torch

from recis_kernels._checks import can_inspect
from recis_kernels.ops import _cpu_kernels

__all__ = ["const", "rotr", "shr", "umod", "umod_const", "umod_parts", "umod_segments"]

_MASK64 = (1 << 64) - 1


def const(value: int) -> int:
    """The int64 with the same bit pattern as the unsigned 64-bit ``value``."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of the 64-bit pattern by ``0 < s < 64``."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def rotr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Right rotation of the 64-bit pattern by ``0 <= s < 64``."""
    if s == 0:
        return x
    return shr(x, s) | (x << (64 - s))


def umod(x: torch.Tensor, n: torch.Tensor | int, two64_mod_n: torch.Tensor | int) -> torch.Tensor:
    """``(uint64)x % n`` for ``0 < n < 2**63``, given ``2**64 % n`` (per element or scalar)."""
    if can_inspect(x):
        if isinstance(n, int):
            return umod_segments(x.reshape(-1), [x.numel()], [n]).view(x.shape)
        # NumPy has native unsigned 64-bit remainders: one pass, no fix-up of negative ids.
        xu = x.detach().contiguous().numpy().view(np.uint64)
        nu = np.uint64(n) if isinstance(n, int) else n.detach().cpu().numpy().astype(np.uint64)
        return torch.from_numpy((xu % nu).view(np.int64))
    r = torch.remainder(x, n)
    # A negative x stands for x + 2**64, so add 2**64 % n: stated as r - (n - c), plus n when
    # that is negative, it stays in range for every n. ``v >> 63`` is all ones exactly where v
    # is negative, which selects without a comparison pass.
    r -= (x >> 63) & (n - two64_mod_n)
    r += (r >> 63) & n
    return r


def umod_const(x: torch.Tensor, n: int) -> torch.Tensor:
    """``(uint64)x % n`` for a Python int ``0 < n < 2**63``."""
    return umod(x, n, (1 << 64) % n)


def umod_segments(x: torch.Tensor, sizes: list[int], ns: list[int]) -> torch.Tensor:
    """``(uint64)x % ns[k]`` over consecutive segments of ``sizes[k]`` elements of a flat CPU
    tensor, ``0 < ns[k] < 2**63``."""
    x = x.detach().contiguous()
    return umod_parts(list(x.split(sizes)), ns)


def umod_parts(xs: list[torch.Tensor], ns: list[int]) -> torch.Tensor:
    """``(uint64)xs[k] % ns[k]`` for CPU tensors, ``0 < ns[k] < 2**63``, written one after
    another into one flat int64 tensor: one pass of the compiled CPU kernel, which divides by each
    feature's modulus with a multiplication (see ``rust/src/divide.rs``)."""
    return _cpu_kernels.umod_parts(xs, ns)
