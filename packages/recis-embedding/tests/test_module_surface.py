"""Lookups under inference mode, CPU device spellings, initial rows a table cannot hold, the
initializer contract, truncated-normal tails and the state-dict warning's module names."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from recis_embedding import (
    ConfigError,
    Constant,
    DynamicEmbedding,
    EmbeddingEngine,
    EmbeddingOption,
    FrequencyAdmission,
    HashTable,
    Initializer,
    SparseAdam,
    TruncatedNormal,
)


def _train_step(engine: EmbeddingEngine, optimizer: SparseAdam, ids: torch.Tensor) -> None:
    engine({"f": ids[:, None]})["f"].square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("admission", [None, FrequencyAdmission(2)])
def test_a_training_mode_lookup_under_inference_mode_inserts_nothing(admission) -> None:
    # Tensors made under inference mode can never be updated in place afterwards: a lookup
    # there reads as in eval mode, and training goes on as if it had not happened.
    engine = EmbeddingEngine({"f": EmbeddingOption(4, admission=admission)})
    with torch.inference_mode():
        out = engine({"f": torch.arange(2000)[:, None]})["f"]
    assert engine.training
    assert not out.any()  # unknown ids read default_value
    assert engine.rows_per_table() == {"f": 0}
    optimizer = SparseAdam(engine, lr=0.1)
    for _ in range(3):
        _train_step(engine, optimizer, torch.arange(2000))
    assert engine.rows_per_table() == {"f": 2000}


@pytest.mark.parametrize("device", ["cpu:0", torch.device("cpu", 0)])
def test_a_table_declared_on_cpu_0_is_the_cpu_table(device) -> None:
    engine = EmbeddingEngine({"f": EmbeddingOption(4, device=device)})
    assert engine.table("f")[0].device == torch.device("cpu")
    assert engine({"f": torch.tensor([[1], [2]])})["f"].shape == (2, 4)
    assert HashTable(4, device=device).device == torch.device("cpu")
    # One device, one fusion key: both spellings fuse.
    both = EmbeddingEngine(
        {"a": EmbeddingOption(4, device=device), "b": EmbeddingOption(4, device="cpu")}
    )
    assert len(both.physical) == 1


def test_initial_rows_a_float16_table_cannot_hold_are_refused_and_nothing_is_inserted() -> None:
    engine = EmbeddingEngine(
        {"f": EmbeddingOption(2, dtype=torch.float16, initializer=Constant(70000.0))}
    )
    with pytest.raises(
        ConfigError, match=r"initializer Constant gave id 1 .*float16 \(max 65504\)"
    ):
        engine({"f": torch.tensor([[1], [2]])})
    assert engine.rows_per_table() == {"f": 0}
    fits = EmbeddingEngine(
        {"f": EmbeddingOption(2, dtype=torch.float16, initializer=Constant(65504.0))}
    )
    assert fits({"f": torch.tensor([[1]])})["f"].tolist() == [[65504.0, 65504.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_initial_rows_that_are_not_finite_are_refused_in_every_dtype(
    dtype: torch.dtype, value: float
) -> None:
    class Broken(Initializer):
        def sample(self, ids: torch.Tensor, dim: int, seed: int | torch.Tensor) -> torch.Tensor:
            out = torch.zeros(ids.numel(), dim)
            out[-1, -1] = value  # one value of the batch's last row
            return out

    engine = EmbeddingEngine({"f": EmbeddingOption(2, dtype=dtype, initializer=Broken())})
    with pytest.raises(ConfigError, match=r"initializer Broken gave id 2 .*not finite"):
        engine({"f": torch.tensor([[1], [2]])})
    assert engine.rows_per_table() == {"f": 0}


class _Fixed(Initializer):
    """Returns whatever shape it was built with."""

    def __init__(self, shape: tuple[int, ...] | None, value: float = 1.0) -> None:
        super().__init__()
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "value", value)

    def sample(self, ids, dim, seed):
        shape = self.shape or (ids.numel(), dim)
        return torch.full(shape, self.value, dtype=torch.float64)


@pytest.mark.parametrize(
    ("shape", "got"), [((1, 3), r"\(1, 3\)"), ((4, 1), r"\(4, 1\)"), ((4, 5), r"\(4, 5\)")]
)
def test_an_initializer_of_the_wrong_shape_is_refused_not_broadcast(shape, got) -> None:
    table = HashTable(3, name="t", initializer=_Fixed(shape))
    with pytest.raises(ConfigError, match=rf"_Fixed.sample returned {got}, expected .*\(4, 3\)"):
        table.find_or_insert(torch.arange(4))
    assert len(table) == 0


def test_non_finite_initial_rows_are_refused() -> None:
    table = HashTable(3, name="t", initializer=_Fixed(None, math.nan))
    with pytest.raises(ConfigError, match="not finite; nothing was inserted"):
        table.find_or_insert(torch.arange(4))
    assert len(table) == 0


def test_embedding_dim_must_be_an_int() -> None:
    with pytest.raises(ConfigError, match=r"embedding_dim must be an int >= 1, got 2\.7"):
        HashTable(2.7)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("a", "b", "mean"),
    [
        (8.0, 9.0, 8.1210),  # the truncated normal's mean, from its closed form
        (-9.0, -8.0, -8.1210),
        (9.0, math.inf, 9.1084),
        (0.0, math.inf, math.sqrt(2 / math.pi)),
    ],
)
def test_truncated_normal_samples_far_tails_continuously(a, b, mean) -> None:
    z = TruncatedNormal(a=a, b=b, std=1.0)(torch.arange(100_000), 1, "t")[:, 0].double()
    assert bool(torch.isfinite(z).all())
    assert float(z.min()) >= a
    assert float(z.max()) <= b
    # No pile-up at a bound (an inverse CDF that cannot resolve the tail rounds to it).
    assert float((z == a).double().mean()) < 1e-3
    assert float((z == b).double().mean()) < 1e-3
    assert abs(float(z.mean()) - mean) < 5e-3


def test_truncated_normal_around_zero_keeps_its_inverse_cdf() -> None:
    # The common case (an interval around 0) draws as it always did, so rows in checkpoints
    # and running jobs stay reproducible: sqrt(2) erfinv(2u - 1) of u in (cdf(a), cdf(b)).
    from recis_embedding._initializers import table_seed
    from recis_kernels import hashed_uniform

    ids = torch.tensor([7, 8, 1 << 60])
    got = TruncatedNormal(std=0.5, a=-1.5, b=3.0)(ids, 4, "t")
    cdf_a, cdf_b = (0.5 * (1 + math.erf(x / math.sqrt(2))) for x in (-1.5, 3.0))
    u = hashed_uniform(ids, table_seed(0, "t"), 4) * (cdf_b - cdf_a) + cdf_a
    want = (torch.erfinv(2 * u - 1) * math.sqrt(2)).clamp(-1.5, 3.0) * 0.5
    assert torch.equal(got, want.float())


def test_the_state_dict_warning_names_a_dynamic_embedding_by_its_own_path() -> None:
    words = DynamicEmbedding(EmbeddingOption(4), name="query")
    words(torch.tensor([[9]]))
    model = torch.nn.Module()
    model.words = words
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        words.state_dict()
        model.state_dict()
    messages = [str(w.message) for w in caught]
    assert "the tables of the DynamicEmbedding hold 1 row that is not in it" in messages[0]
    assert "the tables of module 'words' hold 1 row that is not in it" in messages[1]
