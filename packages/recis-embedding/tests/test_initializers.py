from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from recis_embedding import (
    ConfigError,
    Constant,
    Initializer,
    KaimingNormal,
    KaimingUniform,
    Normal,
    TruncatedNormal,
    Uniform,
    XavierNormal,
    XavierUniform,
)

IDS = torch.arange(-20_000, 20_000, dtype=torch.int64) * 7919


@pytest.mark.parametrize(
    ("init", "mean", "std", "bound"),
    [
        (Uniform(low=-0.5, high=0.5), 0.0, math.sqrt(1 / 12), 0.5),
        (Normal(mean=1.0, std=0.5), 1.0, 0.5, None),
        (TruncatedNormal(std=1.0), 0.0, 0.8796, 2.0),
        (XavierUniform(), 0.0, math.sqrt(1 / 16), math.sqrt(3 / 16)),
        (XavierNormal(), 0.0, math.sqrt(1 / 16), None),
        (KaimingUniform(), 0.0, math.sqrt(2 / 16), math.sqrt(6 / 16)),
        (KaimingNormal(), 0.0, math.sqrt(2 / 16), None),
    ],
)
def test_moments_and_bounds(init, mean: float, std: float, bound: float | None) -> None:
    x = init(IDS, 16, "t")
    assert x.shape == (IDS.numel(), 16)
    assert x.dtype == torch.float32
    assert abs(float(x.mean()) - mean) < 0.02 * max(std, 1)
    assert abs(float(x.std()) / std - 1) < 0.02
    if bound is not None:
        assert float((x - mean).abs().max()) <= bound + 1e-6


def test_same_id_same_vector_whatever_the_batch() -> None:
    init = Normal(seed=3)
    full = init(IDS[:100], 8, "t")
    shuffled = torch.randperm(100)
    assert torch.equal(init(IDS[:100][shuffled], 8, "t"), full[shuffled])
    assert not torch.equal(init(IDS[:100], 8, "other"), full)
    assert not torch.equal(Normal(seed=4)(IDS[:100], 8, "t"), full)


def test_constant_and_invalid_parameters() -> None:
    assert Constant(value=0.25)(torch.tensor([5]), 3, "t").tolist() == [[0.25] * 3]
    with pytest.raises(ConfigError, match="low < high"):
        Uniform(low=1.0, high=0.0)
    with pytest.raises(ConfigError, match="std > 0"):
        Normal(std=0.0)


def test_rows_of_several_tables_equal_per_table_initialization() -> None:
    from recis_embedding._initializers import init_rows

    @dataclasses.dataclass(frozen=True)
    class Doubled(Normal):
        def sample(self, ids: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
            return 2 * super().sample(ids, dim, seed)

    inits = [Normal(seed=1), Normal(seed=2), Uniform(), Normal(seed=1, std=0.5), Doubled()]
    names = ["a", "b", "c", "d", "e"]
    ids = IDS[:500]
    tabs = torch.arange(500) % 5
    out = init_rows(ids, tabs, 6, inits, names)
    for t in range(5):
        sel = tabs == t
        assert torch.equal(out[sel], inits[t](ids[sel], 6, names[t]))
    only = tabs < 2  # every table sampled in one call
    assert torch.equal(init_rows(ids[only], tabs[only], 6, inits, names), out[only])


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_distinct_small_equals_torch_unique(dtype: torch.dtype) -> None:
    from recis_embedding._host import distinct_small

    gen = torch.Generator().manual_seed(5)
    for n, count in [(0, 3), (1, 1), (50, 7), (4000, 300)]:
        values = torch.randint(0, count, (n,), generator=gen, dtype=dtype)
        assert distinct_small(values, count) == torch.unique(values).tolist()


@pytest.mark.parametrize("seed", [2**31, 2**40, 2**70, -(2**63) - 5])
def test_any_int_seed_works_modulo_2_64(seed: int) -> None:
    ids = torch.tensor([1, 2, 3])
    for init in (Uniform(seed=seed), Normal(seed=seed)):
        got = init(ids, 4, "t")
        assert got.shape == (3, 4)
        assert bool(torch.isfinite(got).all())
        same = dataclasses.replace(init, seed=seed + 2**64)
        assert torch.equal(got, same(ids, 4, "t"))


def test_a_seed_must_be_an_int() -> None:
    with pytest.raises(ConfigError, match=r"Normal initializer needs an int seed, got 1\.5"):
        Normal(seed=1.5)


def test_positional_arguments_are_the_initializers_own_fields() -> None:
    # The seed is keyword-only: Normal(0.0, 0.5) is mean 0 and std 0.5, as in torch.nn.init.
    assert Normal(0.0, 0.5) == Normal(mean=0.0, std=0.5)
    assert Normal(1, 2) == Normal(mean=1, std=2, seed=0)
    assert Constant(0.3) == Constant(value=0.3)
    assert TruncatedNormal(0, 1, -0.5, 1.5).a == -0.5
    assert Uniform(-1, 2, seed=3) == Uniform(low=-1, high=2, seed=3)

    @dataclasses.dataclass(frozen=True)
    class Scaled(Initializer):
        scale: float  # a custom field without a default

        def sample(self, ids: torch.Tensor, dim: int, seed: int | torch.Tensor) -> torch.Tensor:
            return torch.full((ids.numel(), dim), self.scale)

    assert Scaled(2.0, seed=4)(torch.tensor([1]), 2, "t").tolist() == [[2.0, 2.0]]


def _formula(init: Initializer, ids: torch.Tensor, dim: int, name: str) -> torch.Tensor:
    """Each built-in initializer's documented formula, spelled with fresh tensors, over
    ``hashed_uniform`` (stream 1, the second Box-Muller uniform, salts the seed)."""
    from recis_embedding._initializers import table_seed
    from recis_kernels import hashed_uniform

    seed = table_seed(init.seed, name)

    def u(stream: int = 0) -> torch.Tensor:
        return hashed_uniform(ids, seed + stream * 0x5851F42D4C957F2D, dim)

    def normal() -> torch.Tensor:
        return torch.sqrt(-2.0 * torch.log(u(0))) * torch.cos(2.0 * math.pi * u(1))

    if isinstance(init, Uniform):
        out = init.low + (init.high - init.low) * u()
    elif isinstance(init, Normal):
        out = init.mean + init.std * normal()
    elif isinstance(init, TruncatedNormal):
        cdf_a = 0.5 * (1 + math.erf(init.a / math.sqrt(2)))
        cdf_b = 0.5 * (1 + math.erf(init.b / math.sqrt(2)))
        z = math.sqrt(2) * torch.erfinv(2 * (cdf_a + (cdf_b - cdf_a) * u()) - 1)
        out = init.mean + init.std * z.clamp(init.a, init.b)
    elif isinstance(init, (XavierUniform, KaimingUniform)):
        out = init.gain * math.sqrt(3.0 / dim) * (2 * u() - 1)
    elif isinstance(init, XavierNormal):
        out = init.gain * math.sqrt(1.0 / dim) * normal()
    else:
        assert isinstance(init, KaimingNormal)
        out = init.gain / math.sqrt(dim) * normal()
    return out.to(torch.float32)


@pytest.mark.parametrize(
    "init",
    [
        Uniform(low=-0.3, high=0.1, seed=4),
        Normal(mean=0.5, std=0.2),
        TruncatedNormal(mean=0.1, std=0.02, a=-1.5, b=2.5, seed=-9),
        XavierUniform(gain=0.7),
        XavierNormal(seed=1 << 70),
        KaimingUniform(),
        KaimingNormal(gain=1.3),
    ],
)
def test_rows_follow_the_documented_formula_bit_for_bit(init: Initializer) -> None:
    ids = torch.cat([IDS, torch.tensor([0, -1, (1 << 63) - 1, -(1 << 63)])])
    assert torch.equal(init(ids, 8, "items"), _formula(init, ids, 8, "items"))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Constant("a"), r"Constant initializer: value must be a finite number, got 'a'"),
        (lambda: Normal(std=float("nan")), r"Normal initializer: std must be a finite number"),
        (lambda: Normal(mean=math.inf), r"Normal initializer: mean must be a finite number"),
        (lambda: Normal(std="1"), r"Normal initializer: std must be a finite number, got '1'"),
        (lambda: Uniform(0.0, math.inf), r"Uniform initializer: high must be a finite number"),
        (lambda: TruncatedNormal(std=math.nan), r"TruncatedNormal initializer: std must be"),
        (lambda: TruncatedNormal(a=math.nan), r"TruncatedNormal initializer: a must be a number"),
        (lambda: KaimingNormal(gain="x"), r"KaimingNormal initializer: gain must be a finite"),
        (lambda: XavierUniform(gain=math.inf), r"XavierUniform initializer: gain must be"),
    ],
)
def test_initializer_values_are_checked_when_made(make, message) -> None:
    # Each made rows of NaN or inf, or failed at the first lookup.
    with pytest.raises(ConfigError, match=message):
        make()
    # A one-sided truncation is a number too.
    TruncatedNormal(a=0.0, b=math.inf)
