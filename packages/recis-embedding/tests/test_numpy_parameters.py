"""Parameters given as NumPy scalars act as the Python numbers they hold.

Vocabulary sizes, learning rates and seeds often come out of NumPy; kept as NumPy scalars they
broke checkpoint manifests (JSON) and computed in float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import recis_embedding as emb
from recis_embedding import ConfigError


def _model(n):
    """An engine and optimizer whose every numeric parameter went through ``n``."""
    engine = emb.EmbeddingEngine(
        {
            "a": emb.EmbeddingOption(
                n.i(4),
                eviction=emb.StaleEviction(n.i(10)),
                initializer=emb.TruncatedNormal(std=n.f(0.01), seed=n.i(3)),
                default_value=n.f(0.5),
                capacity=n.i(1000),
            ),
            "b": emb.EmbeddingOption(
                4,
                admission=emb.ProbabilityAdmission(n.f(0.5), seed=n.i(1)),
                combiner="tile",
                combiner_kwargs={"tile_len": n.i(2)},
            ),
            "c": emb.EmbeddingOption(4, admission=emb.FrequencyAdmission(n.i(2))),
        }
    )
    opt = emb.SparseAdam(
        emb.sparse_parameters(engine), lr=n.f(0.01), betas=(n.f(0.9), n.f(0.99)), eps=n.f(1e-8)
    )
    return engine, opt


class _Python:
    i = staticmethod(int)
    f = staticmethod(lambda x: float(np.float32(x)))


class _NumPy:
    i = staticmethod(np.int64)
    f = staticmethod(np.float32)


def _train(engine, opt, steps=3):
    g = torch.Generator().manual_seed(0)
    outs = []
    for _ in range(steps):
        batch = {k: torch.randint(0, 20, (8, 2), generator=g) for k in "abc"}
        out = engine(batch)
        sum(o.sum() for o in out.values()).backward()
        opt.step()
        opt.zero_grad()
        outs.append(torch.cat([out[k] for k in "abc"], 1).detach())
    return outs


def test_numpy_parameters_train_and_save_like_python_numbers(tmp_path) -> None:
    ours, plain = _model(_NumPy), _model(_Python)
    for a, b in zip(_train(*ours), _train(*plain), strict=True):
        assert torch.equal(a, b)
    emb.save(tmp_path / "np", ours[0], ours[1])  # the manifest is JSON
    emb.save(tmp_path / "py", plain[0], plain[1])
    fresh = _model(_NumPy)
    emb.load(tmp_path / "np", fresh[0], fresh[1])
    assert torch.equal(_train(*fresh)[0], _train(*plain)[0])
    group = ours[1].param_groups[0]
    assert type(group["lr"]) is float
    assert all(type(b) is float for b in group["betas"])
    assert type(ours[0].table_options()["a"].embedding_dim) is int


def test_numpy_values_of_the_wrong_kind_are_still_refused() -> None:
    with pytest.raises(ConfigError, match="embedding_dim must be a positive int"):
        emb.EmbeddingOption(np.float64(4.0))
    with pytest.raises(ConfigError, match="trainable must be a bool"):
        emb.EmbeddingOption(4, trainable=np.int64(1))
    with pytest.raises(
        ConfigError, match=r"StaleEviction needs an int steps in \[1, 2\*\*63 - 1\], got 2\.5"
    ):
        emb.StaleEviction(2.5)
    with pytest.raises(
        ConfigError, match=r"FrequencyAdmission needs an int threshold in \[1, 2\*\*63 - 1\]"
    ):
        emb.FrequencyAdmission(np.float32(1.5))
