"""Seeded, per-id reproducible initializers for embedding rows.

A row's initial vector depends only on ``(initializer seed, table name, id, column)``: column
``j`` of id ``x`` draws its random bits from a counter-based hash,
``fmix64(fmix64(x ^ table_seed) + (j + 1) * 0x9E3779B97F4A7C15)`` (MurmurHash3's finalizer), so
the same id gets the same vector whatever the batch order, the fusion or the sharding.
``table_seed`` mixes the initializer's ``seed`` with the CRC-32 of the table name.

Xavier and Kaiming initializers take their fans from the embedding dim: a row is treated as a
``(1, dim)`` weight whose ``fan_in = fan_out = dim``, so Xavier uses ``std = gain * sqrt(1 /
dim)`` and Kaiming ``std = gain / sqrt(dim)`` (uniform variants: bound ``= sqrt(3) * std``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import zlib
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass

import torch

from recis_embedding._host import distinct_small, true_positions
from recis_embedding._numbers import plain_fields
from recis_embedding.exceptions import ConfigError
from recis_kernels import fmix64, hashed_uniform

__all__ = [
    "Constant",
    "Initializer",
    "KaimingNormal",
    "KaimingUniform",
    "Normal",
    "TruncatedNormal",
    "Uniform",
    "XavierNormal",
    "XavierUniform",
    "init_rows",
    "table_seed",
]


def int64_bits(x: int) -> int:
    """The Python int ``x`` taken modulo 2**64, as the signed int64 with those 64 bits."""
    return ((x + (1 << 63)) & ((1 << 64) - 1)) - (1 << 63)


def check_seed(owner: str, seed: object) -> None:
    """Raise :class:`ConfigError` unless ``seed`` is an int (any size: it is used modulo 2**64)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{owner} needs an int seed, got {seed!r}")


@functools.lru_cache(maxsize=4096)
def table_seed(seed: int, name: str) -> int:
    """The 64-bit seed of table ``name`` under initializer seed ``seed``."""
    check_seed("initializer", seed)
    mixed = fmix64(
        torch.tensor(
            [int64_bits((seed * 0x100000001) ^ zlib.crc32(name.encode()))], dtype=torch.int64
        )
    )
    return int(mixed.item())


def _uniform01(
    ids: torch.Tensor, dim: int, seed: int | torch.Tensor, stream: int = 0
) -> torch.Tensor:
    """``(N, dim)`` float64 uniforms in (0, 1) from the ids' bits (``seed``: int or ``(N,)``),
    a fresh tensor the samplers below transform in place."""
    return hashed_uniform(ids, seed + stream * 0x5851F42D4C957F2D, dim)


def _normal(ids: torch.Tensor, dim: int, seed: int | torch.Tensor) -> torch.Tensor:
    # Box-Muller on two independent uniform streams: sqrt(-2 log u1) * cos(2 pi u2).
    u1, u2 = _uniform01(ids, dim, seed, 0), _uniform01(ids, dim, seed, 1)
    return u1.log_().mul_(-2.0).sqrt_().mul_(u2.mul_(2.0 * math.pi).cos_())


@dataclass(frozen=True)
class Initializer:
    """Base class: ``init(ids, dim, table_name) -> (N, dim) float32``.

    Subclass and override :meth:`sample` for a custom initializer; it must be a pure function
    of its arguments so that rows stay reproducible.

    Args:
        seed: keyword-only; any int (used modulo 2**64). Positional arguments are the
            subclass's own fields: ``Normal(0.0, 0.5)`` is ``Normal(mean=0.0, std=0.5)``.
    """

    # Keyword-only, so positional arguments go to the subclass's own fields
    # (``Normal(0.0, 0.5)`` is mean 0, std 0.5) and custom subclasses may add fields
    # without defaults.
    _: KW_ONLY
    seed: int = 0

    def __post_init__(self) -> None:
        plain_fields(self)
        check_seed(f"{type(self).__name__} initializer", self.seed)

    def __call__(self, ids: torch.Tensor, dim: int, name: str) -> torch.Tensor:
        """Initial vectors of ``ids``: ``(N,) int64`` -> ``(N, dim) float32``.

        Raises:
            ConfigError: :meth:`sample` returned something else than an ``(N, dim)`` tensor
                (it would be broadcast: every id the same row, or one value a row).
        """
        out = self.sample(ids, dim, table_seed(self.seed, name))
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (ids.numel(), dim):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(
                f"table {name!r}: initializer {type(self).__name__}.sample returned {got}, "
                f"expected a tensor of shape ({ids.numel()}, {dim}) (one row per id)"
            )
        return out.to(torch.float32)

    def sample(self, ids: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
        """``(N, dim)`` values for ``ids`` under the 64-bit table seed ``seed``."""
        raise NotImplementedError(f"{type(self).__name__} must implement sample()")


def _check_numbers(init: Initializer, *names: str, infinite: tuple[str, ...] = ()) -> None:
    """Refuses a field of ``names`` that is not a real number, or is NaN or infinite (those in
    ``infinite`` may be infinite): it made rows of NaN or inf, or failed at the first lookup."""
    for name in names:
        value = getattr(init, name)
        ok = not isinstance(value, bool) and isinstance(value, numbers.Real)
        if ok and not math.isfinite(value):
            ok = name in infinite and not math.isnan(value)
        if not ok:
            finite = "a number" if name in infinite else "a finite number"
            raise ConfigError(
                f"{type(init).__name__} initializer: {name} must be {finite}, got {value!r}"
            )


@dataclass(frozen=True)
class Constant(Initializer):
    """Every value equals ``value``."""

    value: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_numbers(self, "value")

    def sample(self, ids: torch.Tensor, dim: int, seed: int | torch.Tensor) -> torch.Tensor:
        return torch.full((ids.numel(), dim), float(self.value), device=ids.device)


@dataclass(frozen=True)
class Uniform(Initializer):
    """Uniform on ``[low, high)``."""

    low: float = -0.05
    high: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_numbers(self, "low", "high")
        if not self.low < self.high:
            raise ConfigError(f"Uniform initializer needs low < high, got {self.low}, {self.high}")

    def sample(self, ids: torch.Tensor, dim: int, seed: int | torch.Tensor) -> torch.Tensor:
        return _uniform01(ids, dim, seed).mul_(self.high - self.low).add_(self.low)


@dataclass(frozen=True)
class Normal(Initializer):
    """Normal with ``mean`` and ``std``."""

    mean: float = 0.0
    std: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_numbers(self, "mean", "std")
        if self.std <= 0:
            raise ConfigError(f"Normal initializer needs std > 0, got {self.std}")

    def sample(self, ids: torch.Tensor, dim: int, seed: int | torch.Tensor) -> torch.Tensor:
        return _normal(ids, dim, seed).mul_(self.std).add_(self.mean)


@dataclass(frozen=True)
class TruncatedNormal(Initializer):
    """Normal with ``mean`` and ``std`` truncated to ``[mean + a*std, mean + b*std]``.

    Sampled exactly by the inverse CDF (no rejection), so every id costs the same.
    """

    mean: float = 0.0
    std: float = 0.01
    a: float = -2.0
    b: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_numbers(self, "mean", "std", "a", "b", infinite=("a", "b"))
        if self.std <= 0 or not self.a < self.b:
            raise ConfigError(
                f"TruncatedNormal initializer needs std > 0 and a < b, got std={self.std}, "
                f"a={self.a}, b={self.b}"
            )

    def sample(self, ids: torch.Tensor, dim: int, seed: int | torch.Tensor) -> torch.Tensor:
        if self.a < 0 < self.b:
            cdf_a = 0.5 * (1 + math.erf(self.a / math.sqrt(2)))
            cdf_b = 0.5 * (1 + math.erf(self.b / math.sqrt(2)))
            # u in (cdf(a), cdf(b)), then z = sqrt(2) erfinv(2u - 1): the normal quantile of u.
            u = _uniform01(ids, dim, seed).mul_(cdf_b - cdf_a).add_(cdf_a)
            z = u.mul_(2).sub_(1).erfinv_().mul_(math.sqrt(2))
            return z.clamp_(self.a, self.b).mul_(self.std).add_(self.mean)
        # An interval on one side of 0 (a tail): sampled below 0 (an interval above is the
        # mirror of one below), where the CDF's small values keep their precision and ndtri
        # inverts them; near 1 they round to 1 from about 8 standard deviations out.
        flip = self.a >= 0
        lo, hi = (-self.b, -self.a) if flip else (self.a, self.b)
        cdf_lo, cdf_hi = (0.5 * math.erfc(-x / math.sqrt(2)) for x in (lo, hi))
        u = _uniform01(ids, dim, seed).mul_(cdf_hi - cdf_lo).add_(cdf_lo)
        z = torch.special.ndtri(u).clamp_(lo, hi)
        if flip:
            z.neg_()
        return z.mul_(self.std).add_(self.mean)


@dataclass(frozen=True)
class XavierUniform(Initializer):
    """Uniform with bound ``gain * sqrt(3 / dim)`` (``fan_in = fan_out = dim``)."""

    gain: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_numbers(self, "gain")

    def sample(self, ids: torch.Tensor, dim: int, seed: int | torch.Tensor) -> torch.Tensor:
        bound = self.gain * math.sqrt(3.0 / dim)
        return _uniform01(ids, dim, seed).mul_(2).sub_(1).mul_(bound)


@dataclass(frozen=True)
class XavierNormal(Initializer):
    """Normal with ``std = gain * sqrt(1 / dim)`` (``fan_in = fan_out = dim``)."""

    gain: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_numbers(self, "gain")

    def sample(self, ids: torch.Tensor, dim: int, seed: int | torch.Tensor) -> torch.Tensor:
        return _normal(ids, dim, seed).mul_(self.gain * math.sqrt(1.0 / dim))


@dataclass(frozen=True)
class KaimingUniform(Initializer):
    """Uniform with bound ``gain * sqrt(3 / dim)``, ``gain = sqrt(2)`` (ReLU) by default."""

    gain: float = math.sqrt(2.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_numbers(self, "gain")

    def sample(self, ids: torch.Tensor, dim: int, seed: int | torch.Tensor) -> torch.Tensor:
        bound = self.gain * math.sqrt(3.0 / dim)
        return _uniform01(ids, dim, seed).mul_(2).sub_(1).mul_(bound)


@dataclass(frozen=True)
class KaimingNormal(Initializer):
    """Normal with ``std = gain / sqrt(dim)``, ``gain = sqrt(2)`` (ReLU) by default."""

    gain: float = math.sqrt(2.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_numbers(self, "gain")

    def sample(self, ids: torch.Tensor, dim: int, seed: int | torch.Tensor) -> torch.Tensor:
        return _normal(ids, dim, seed).mul_(self.gain / math.sqrt(dim))


@functools.lru_cache(maxsize=1024)
def _group_key(init: Initializer) -> Initializer:
    """``init`` without its seed: initializers equal up to their seeds sample together."""
    return dataclasses.replace(init, seed=0)


def _batchable(init: Initializer) -> bool:
    """Whether ``init.sample`` is a built-in one, which also takes a ``(N,)`` tensor of seeds."""
    sample = type(init).sample
    return sample is not Initializer.sample and sample.__module__ == __name__


def init_rows(
    ids: torch.Tensor,
    tabs: torch.Tensor,
    dim: int,
    initializers: Sequence[Initializer],
    names: Sequence[str],
) -> torch.Tensor:
    """Initial vectors of ids of several logical tables: ``(N, dim) float32``.

    Equal to ``initializers[t](ids[i:i+1], dim, names[t])`` for every id ``i`` of table ``t``.
    Tables whose built-in initializers differ at most in ``seed`` are sampled together, in one
    call with a per-id seed, so a batch of new ids costs a few tensor operations whatever the
    number of tables.

    Args:
        ids: ``(N,) int64`` ids.
        tabs: ``(N,)`` table index of every id.
        dim: columns per vector.
        initializers: initializer of every table index.
        names: name of every table index.
    """
    out = torch.empty(ids.numel(), dim, device=ids.device)
    present = distinct_small(tabs, len(initializers))
    if len(present) == 1:
        t = present[0]
        out[:] = initializers[t](ids, dim, names[t]).to(out.device)
        return out
    groups: dict[object, list[int]] = {}
    for t in present:
        init = initializers[t]
        key = _group_key(init) if _batchable(init) else ("single", t)
        groups.setdefault(key, []).append(t)
    for members in groups.values():
        init = initializers[members[0]]
        # Built-in samplers take a (N,) tensor of seeds as well as an int (see _batchable).
        sample: Callable[..., torch.Tensor] = init.sample
        if len(members) == 1:
            sel = true_positions(tabs == members[0])
            out[sel] = init(ids[sel], dim, names[members[0]]).to(out.device)
            continue
        table_seeds = [0] * len(initializers)
        for t in members:
            table_seeds[t] = table_seed(initializers[t].seed, names[t])
        seeds = torch.tensor(table_seeds, dtype=torch.int64, device=ids.device)
        if len(members) == len(present):
            out.copy_(sample(ids, dim, seeds[tabs.to(torch.int64)]))  # float64 -> float32
            continue
        mask = torch.zeros(len(initializers), dtype=torch.bool, device=ids.device)
        mask[members] = True
        sel = true_positions(mask[tabs.to(torch.int64)])
        seed = seeds[tabs.to(torch.int64)[sel]]
        out[sel] = sample(ids[sel], dim, seed).to(torch.float32)
    return out
