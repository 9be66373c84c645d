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
