from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import EXTREME_IDS
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from recis_embedding import (
    ConfigError,
    DynamicEmbedding,
    EmbeddingEngine,
    EmbeddingOption,
    InputError,
    Normal,
    SparseSGD,
)
from recis_kernels import RaggedTensor

DIM = 3
INIT = Normal(std=1.0)
ID = st.one_of(st.integers(-8, 8), st.sampled_from(EXTREME_IDS))
ROWS = st.lists(st.lists(st.tuples(ID, st.floats(0.25, 4.0)), max_size=5), min_size=1, max_size=6)


def vec(x: int, table: str) -> torch.Tensor:
    return INIT(torch.tensor([x]), DIM, table)[0].double()


def ragged(rows, weights: bool = True) -> RaggedTensor:
    values = torch.tensor([x for r in rows for x, _ in r], dtype=torch.int64)
    w = torch.tensor([w for r in rows for _, w in r], dtype=torch.float32)
    offsets = torch.tensor([0, *torch.tensor([len(r) for r in rows]).cumsum(0).tolist()])
    return RaggedTensor(values, offsets, weights=w if weights else None)


def expected_pool(rows, combiner: str, table: str, use_weight: bool = True) -> torch.Tensor:
    out = []
    for r in rows:
        acc = torch.zeros(DIM, dtype=torch.float64)
        ws = [w if use_weight else 1.0 for _, w in r]
        for (x, _), w in zip(r, ws, strict=True):
            acc += w * vec(x, table)
        norm = {"sum": 1.0, "mean": sum(ws), "sqrtn": math.sqrt(sum(w * w for w in ws))}[combiner]
        out.append(acc / norm if norm else acc * 0)
    return torch.stack(out).float()


@given(ROWS, st.sampled_from(["sum", "mean", "sqrtn"]), st.booleans())
def test_pooled_lookup_matches_reference(rows, combiner: str, use_weight: bool) -> None:
    engine = EmbeddingEngine(
        {"f": EmbeddingOption(DIM, combiner=combiner, initializer=INIT, use_weight=use_weight)}
    )
    out = engine({"f": ragged(rows)})["f"]
    torch.testing.assert_close(
        out, expected_pool(rows, combiner, "f", use_weight), atol=1e-5, rtol=1e-5
    )


def test_three_level_input_pools_inner_rows() -> None:
    r = RaggedTensor(
        torch.tensor([1, 2, 3, 4]), [torch.tensor([0, 2, 2, 3]), torch.tensor([0, 2, 3, 4])]
    )
    out = EmbeddingEngine({"f": EmbeddingOption(DIM, initializer=INIT)})({"f": r})["f"]
    assert out.shape == (3, 2, DIM)
    exp = torch.zeros(3, 2, DIM, dtype=torch.float64)
    exp[0, 0] = vec(1, "f") + vec(2, "f")
    exp[0, 1] = vec(3, "f")
    exp[2, 0] = vec(4, "f")
    torch.testing.assert_close(out, exp.float())


def test_sequence_and_tile_outputs() -> None:
    rows = [[(5, 1.0), (6, 1.0), (5, 1.0)], [], [(-1, 1.0)]]
    engine = EmbeddingEngine(
        {
            "s": EmbeddingOption(DIM, combiner=None, initializer=INIT, shared_name="t"),
            "k": EmbeddingOption(
                DIM,
                combiner="tile",
                combiner_kwargs={"tile_len": 2},
                initializer=INIT,
                shared_name="t",
            ),
        }
    )
    out = engine({"s": ragged(rows), "k": ragged(rows)})
    assert out["s"].shape == (3, 3, DIM)
    assert out["s_mask"].tolist() == [[True] * 3, [False] * 3, [True, False, False]]
    torch.testing.assert_close(out["s"][0, 2], vec(5, "t").float())
    assert not out["s"][1].detach().any()
    assert out["k"].shape == (3, 2 * DIM)
    torch.testing.assert_close(out["k"][0], torch.cat([vec(5, "t"), vec(6, "t")]).float())
    torch.testing.assert_close(out["k"][2, DIM:], torch.zeros(DIM))


def test_dense_inputs_columns_and_passthrough() -> None:
    engine = EmbeddingEngine({"a": EmbeddingOption(DIM, initializer=INIT, combiner="mean")})
    dense = torch.tensor([[1, 2], [3, 3]])
    col = SimpleNamespace(values=torch.tensor([1, 2, 3, 3]), offsets=torch.tensor([0, 2, 4]))
    out_dense = engine({"a": dense, "label": "kept"})
    assert out_dense["label"] == "kept"
    torch.testing.assert_close(out_dense["a"], engine({"a": col})["a"])
    torch.testing.assert_close(out_dense["a"][1], vec(3, "a").float())


def test_tables_of_different_load_factors_are_not_fused() -> None:
    engine = EmbeddingEngine(
        {
            "a": EmbeddingOption(DIM),
            "b": EmbeddingOption(DIM, max_load_factor=0.75),
            "c": EmbeddingOption(DIM, max_load_factor=0.75),
        },
        fuse=True,
    )
    a, b, c = (engine.table(f)[0] for f in "abc")
    assert a is not b
    assert b is c
    assert (a._map.max_load_factor, b._map.max_load_factor) == (0.5, 0.75)
    with pytest.raises(ConfigError, match=r"share table 'a'.*max_load_factor=0.5 vs 0.75"):
        EmbeddingEngine(
            {
                "a": EmbeddingOption(DIM),
                "x": EmbeddingOption(DIM, shared_name="a", max_load_factor=0.75),
            }
        )
    with pytest.raises(ConfigError, match=r"max_load_factor must be a number in \(0, 0.9\], got 0"):
        EmbeddingOption(DIM, max_load_factor=0)


def test_fused_and_unfused_tables_give_identical_results() -> None:
    def build(fuse: bool) -> tuple[EmbeddingEngine, SparseSGD]:
        opts = {
            "u": EmbeddingOption(DIM, initializer=INIT),
            "i": EmbeddingOption(DIM, initializer=INIT, combiner="mean"),
            "h": EmbeddingOption(DIM, initializer=INIT, shared_name="i"),
        }
        engine = EmbeddingEngine(opts, fuse=fuse)
        return engine, SparseSGD(engine, lr=0.5)

    fused, opt_f = build(True)
    plain, opt_p = build(False)
    assert len(fused.physical) == 1
    assert len(plain.physical) == 2
    ids = torch.tensor(EXTREME_IDS)
    batch = {"u": ids[:, None], "i": RaggedTensor(ids, torch.tensor([0, 3, 7])), "h": ids[:2, None]}
    for engine, opt in ((fused, opt_f), (plain, opt_p)):
        out = engine(batch)
        (out["u"].sum() + 2 * out["i"].square().sum() + out["h"].sum()).backward()
        opt.step()
        opt.zero_grad()
    for name in ("u", "i"):
        tf, kf = fused.table(name)
        tp, kp = plain.table(name)
        assert torch.equal(tf.ids(kf), tp.ids(kp))
        assert torch.equal(tf.embeddings(table=kf), tp.embeddings(table=kp))
    # The same id in two fused tables is two keys: different vectors, different updates.
    tf, _ = fused.table("u")
    one = torch.tensor([1])
    assert not torch.equal(tf.embeddings(one, "u"), tf.embeddings(one, "i"))


def test_fusion_does_not_change_how_repeated_gradients_are_summed() -> None:
    # Many repeats of few ids: a row's gradient sums dozens of terms, whose float32 rounding
    # depends on their order. A fused table must sum them in the order a table of its own does.
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(5):
        lengths = torch.randint(0, 6, (8,), generator=g)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        ids = torch.randint(0, 25, (int(offsets[-1]),), generator=g)
        batches.append(RaggedTensor(ids, offsets))
    states = []
    for fuse in (True, False):
        opts = {"a": EmbeddingOption(3), "z": EmbeddingOption(3, combiner="mean")}
        engine = EmbeddingEngine(opts, fuse=fuse)
        opt = SparseSGD(engine, lr=0.01)
        for ids in batches:
            out = engine({"a": ids, "z": ids})
            (out["a"].mul(1.37).square().sum() + out["z"].mul(2.1).square().sum()).backward()
            opt.step()
            opt.zero_grad()
        states.append([engine.table(f)[0].embeddings(table=engine.table(f)[1]) for f in "az"])
    for fused, plain in zip(*states, strict=True):
        assert torch.equal(fused, plain)


def test_eval_mode_never_inserts() -> None:
    emb = DynamicEmbedding(EmbeddingOption(DIM, initializer=INIT, default_value=0.5))
    emb(torch.tensor([[1], [2]]))
    emb.eval()
    out = emb(torch.tensor([[1], [99]]))
    torch.testing.assert_close(out[0], vec(1, "embedding").float())
    assert out[1].tolist() == [0.5] * DIM
    assert len(emb.table) == 2


def test_gradients_match_dense_autograd() -> None:
    engine = EmbeddingEngine(
        {
            "a": EmbeddingOption(DIM, initializer=INIT, combiner="sqrtn", shared_name="t"),
            "b": EmbeddingOption(DIM, initializer=INIT, shared_name="t"),
        }
    )
    opt = SparseSGD(engine, lr=1.0)
    rows = [[(1, 2.0), (2, 1.0), (1, 1.0)], [(3, 0.5)]]
    ids = [1, 2, 3]
    before = torch.stack([vec(x, "t") for x in ids]).float().requires_grad_(True)
    out = engine({"a": ragged(rows), "b": torch.tensor([[2], [2]])})
    target = torch.randn(2, DIM)
    ((out["a"] * target).sum() + (out["b"] * target).square().sum()).backward()
    opt.step()
    # The same loss on a dense parameter with plain torch ops.
    idx = {x: k for k, x in enumerate(ids)}
    pooled = []
    for r in rows:
        w = torch.tensor([w for _, w in r])
        e = before[[idx[x] for x, _ in r]]
        pooled.append((w[:, None] * e).sum(0) / w.square().sum().sqrt())
    b = before[[idx[2], idx[2]]]
    ((torch.stack(pooled) * target).sum() + (b * target).square().sum()).backward()
    table, _ = engine.table("t")
    torch.testing.assert_close(
        table.embeddings(torch.tensor(ids)), (before - before.grad).detach(), atol=1e-5, rtol=1e-5
    )


def test_configuration_and_input_errors() -> None:
    with pytest.raises(ConfigError, match="combiner must be one of"):
        EmbeddingOption(4, combiner="max")
    with pytest.raises(ConfigError, match="tile_len"):
        EmbeddingOption(4, combiner="tile")
    with pytest.raises(ConfigError, match="features 'a' and 'b' share table 't' but"):
        EmbeddingEngine(
            {"a": EmbeddingOption(4, shared_name="t"), "b": EmbeddingOption(8, shared_name="t")}
        )
    engine = EmbeddingEngine({"a": EmbeddingOption(4)})
    with pytest.raises(
        InputError, match=r"^batch has no column for feature 'a' \(columns: b, c\)$"
    ):
        engine({"c": torch.tensor([1]), "b": torch.tensor([1])})
    with pytest.raises(
        InputError,
        match=r"feature 'a': ids must be integers \(int64, or int32/int16/int8/uint8, widened "
        r"to int64\), got torch.float32",
    ):
        engine({"a": torch.tensor([1.0])})
    with pytest.raises(InputError, match=r"ids must be integers .* got torch.bool"):
        engine({"a": torch.tensor([True])})
    with pytest.raises(InputError, match="feature 'a': ids must be a tensor"):
        engine({"a": [1, 2]})


def test_fused_keys_that_share_a_mixed_dedup_key_stay_apart() -> None:
    """The fused dedup key is ``id ^ (table * K)``; ids built to collide on it stay distinct."""
    k = -7046029254386353131  # the mixing constant of the fused dedup key
    a, b = 12345, 12345 ^ k  # (table 0, a) and (table 1, b) share the key a
    engine = EmbeddingEngine(
        {"x": EmbeddingOption(DIM, initializer=INIT), "y": EmbeddingOption(DIM, initializer=INIT)}
    )
    assert len(engine.physical) == 1
    out = engine({"x": torch.tensor([[a], [b]]), "y": torch.tensor([[b], [a]])})
    torch.testing.assert_close(out["x"], torch.stack([vec(a, "x"), vec(b, "x")]).float())
    torch.testing.assert_close(out["y"], torch.stack([vec(b, "y"), vec(a, "y")]).float())
    table, _ = engine.table("x")
    assert len(table) == 4


def test_ragged_sequence_output_keeps_offsets_and_gradients() -> None:
    engine = EmbeddingEngine(
        {
            "s": EmbeddingOption(
                DIM, combiner=None, combiner_kwargs={"ragged": True}, initializer=INIT
            )
        }
    )
    opt = SparseSGD(engine, lr=1.0)
    r = ragged([[(4, 1.0), (5, 1.0)], [], [(4, 1.0)]])
    out = engine({"s": r})["s"]
    assert isinstance(out, RaggedTensor)
    assert out.offsets[0].tolist() == [0, 2, 2, 3]
    torch.testing.assert_close(out.values[2], vec(4, "s").float())
    out.values.sum().backward()
    opt.step()
    torch.testing.assert_close(
        engine.table("s")[0].embeddings(torch.tensor([4])), (vec(4, "s") - 2).float()[None]
    )


def test_dedup_paths_agree() -> None:
    from recis_embedding._dedup import dedup, exact_dedup

    k = -7046029254386353131
    values = torch.tensor([5, 5, 12345, 12345 ^ k, -1, 5, 1 << 62])
    tabs = torch.tensor([0, 1, 0, 1, 0, 0, 1], dtype=torch.int32)
    for fn in (dedup, exact_dedup):
        ids, id_tabs, inverse, _ = fn(values, tabs)
        assert torch.equal(ids[inverse], values)
        assert torch.equal(id_tabs[inverse], tabs)
        assert len(set(zip(ids.tolist(), id_tabs.tolist(), strict=True))) == ids.numel() == 6
    # The exact path resolves the colliding pair lexicographically, which leaves no grouping
    # to reuse; the CPU path lists none (its backward pass needs no grouping).
    assert exact_dedup(values, tabs)[3] is None
    assert dedup(values, tabs)[3] is None
    # Without a collision the exact path groups the positions of each pair, ascending.
    ok = values[:3]
    ids, _, inverse, grouping = exact_dedup(ok, tabs[:3])
    order, offsets = grouping
    assert sorted(inverse[order].tolist()) == inverse[order].tolist()
    assert offsets.tolist()[-1] == ok.numel()
    for u in range(ids.numel()):  # each group lists its positions in ascending order
        group = order[offsets[u] : offsets[u + 1]].tolist()
        assert group == sorted(group)


@pytest.mark.parametrize("seed", range(4))
def test_cpu_dedup_matches_the_exact_one_on_random_pairs(seed: int) -> None:
    from recis_embedding._dedup import dedup, exact_dedup

    gen = torch.Generator().manual_seed(seed)
    n = 5_000
    pool = torch.cat([torch.randint(-(2**63), 2**63 - 1, (60,), generator=gen), torch.arange(40)])
    values = pool[torch.randint(0, pool.numel(), (n,), generator=gen)]
    tabs = torch.randint(0, 5, (n,), generator=gen)
    ids, id_tabs, inverse, grouping = dedup(values, tabs)
    assert grouping is None
    exact = exact_dedup(values, tabs)
    assert ids.numel() == exact[0].numel()
    assert torch.equal(ids[inverse], values)
    assert torch.equal(id_tabs[inverse].to(torch.int64), tabs)
    assert inverse.dtype == torch.int64
    assert id_tabs.dtype == torch.int32
    # Distinct pairs in order of first occurrence: pair u first shows at position firsts[u],
    # and those positions increase.
    firsts = torch.full((ids.numel(),), n, dtype=torch.int64)
    firsts.scatter_reduce_(0, inverse, torch.arange(n), reduce="amin")
    assert bool((firsts[1:] > firsts[:-1]).all())
    assert torch.equal(inverse[firsts], torch.arange(ids.numel()))


def test_device_results_match_cpu(device: torch.device) -> None:
    def run(dev: torch.device) -> tuple[dict, torch.Tensor]:
        opts = {
            "u": EmbeddingOption(4, initializer=INIT, device=dev),
            "s": EmbeddingOption(4, initializer=INIT, device=dev, combiner="mean"),
        }
        engine = EmbeddingEngine(opts)
        opt = SparseSGD(engine, lr=0.5)
        r = RaggedTensor(torch.tensor(EXTREME_IDS), torch.tensor([0, 3, 3, 7]))
        batch = {"u": torch.tensor(EXTREME_IDS[:3]).to(dev)[:, None], "s": r.to(dev)}
        out = engine(batch)
        (out["u"].square().sum() + out["s"].sum()).backward()
        opt.step()
        table, index = engine.table("s")
        return {k: v.detach().cpu() for k, v in out.items()}, table.embeddings(table=index).cpu()

    out_dev, emb_dev = run(device)
    out_cpu, emb_cpu = run(torch.device("cpu"))
    for key in out_cpu:
        torch.testing.assert_close(out_dev[key], out_cpu[key])
    torch.testing.assert_close(emb_dev, emb_cpu)


def test_empty_batches_keep_every_output_shape() -> None:
    none = RaggedTensor(torch.zeros(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    options = {
        "k": EmbeddingOption(DIM, combiner="tile", combiner_kwargs={"tile_len": 2}),
        "s": EmbeddingOption(DIM, combiner=None),
        "m": EmbeddingOption(DIM, combiner="mean"),
    }
    out = EmbeddingEngine(options)({f: none for f in options})
    assert out["k"].shape == (0, 2 * DIM)
    assert out["s"].shape == (0, 0, DIM)
    assert out["m"].shape == (0, DIM)


def test_ids_past_tile_len_or_max_len_are_not_looked_up() -> None:
    # Only the first tile_len (max_len) ids of a row reach the output, so only they may be
    # inserted, counted or trained: 7, 8 and 9 sit past every feature's length.
    rows = [[(1, 1.0), (2, 1.0), (7, 1.0)], [(3, 1.0)], [(4, 1.0), (5, 1.0), (8, 1.0), (9, 1.0)]]
    lengths = {"tile": {"tile_len": 2}, None: {"max_len": 2}}
    for combiner, kwargs in [*lengths.items(), (None, {"max_len": 2, "ragged": True})]:
        option = EmbeddingOption(
            DIM, combiner=combiner, combiner_kwargs=kwargs, initializer=INIT, shared_name="t"
        )
        engine = EmbeddingEngine({"s": option})
        out = engine({"s": ragged(rows)})
        assert sorted(engine.table("t")[0].ids().tolist()) == [1, 2, 3, 4, 5], kwargs
        if combiner == "tile":
            torch.testing.assert_close(out["s"][2], torch.cat([vec(4, "t"), vec(5, "t")]).float())
        elif kwargs.get("ragged"):
            assert out["s"].offsets[0].tolist() == [0, 2, 3, 5]
            torch.testing.assert_close(out["s"].values[3], vec(4, "t").float())
        else:
            assert out["s_mask"].tolist() == [[True, True], [True, False], [True, True]]
    dense = EmbeddingEngine(
        {"d": EmbeddingOption(DIM, combiner="tile", combiner_kwargs={"tile_len": 1})}
    )
    assert dense({"d": torch.tensor([[1, 7], [2, 8]])})["d"].shape == (2, DIM)
    assert sorted(dense.table("d")[0].ids().tolist()) == [1, 2]


def _reference_weight_grads(rows, combiner: str, table: str, grad_out: torch.Tensor):
    """d(Σ grad_out * pooled) / d w_i, by autograd through the combiner's formula."""
    w = torch.tensor([w for r in rows for _, w in r], dtype=torch.float64, requires_grad=True)
    out, at = [], 0
    for r in rows:
        ws = w[at : at + len(r)]
        acc = torch.zeros(DIM, dtype=torch.float64)
        for k, (x, _) in enumerate(r):
            acc = acc + ws[k] * vec(x, table)
        norm = {"sum": None, "mean": ws.sum(), "sqrtn": (ws * ws).sum().sqrt()}[combiner]
        out.append(acc if norm is None else acc / norm)
        at += len(r)
    ((torch.stack(out) * grad_out.double()).sum() + 0 * w.sum()).backward()
    return w.grad.float()


@given(ROWS, st.sampled_from(["sum", "mean", "sqrtn"]), st.booleans(), st.booleans())
def test_weights_that_need_a_gradient_get_it(rows, combiner, training, concat) -> None:
    # Weights computed by a model (attention-style pooling) train through the lookup, pooled
    # alone or in a concatenation, whether or not the table itself trains.
    option = EmbeddingOption(DIM, combiner=combiner, initializer=INIT, shared_name="t")
    engine = EmbeddingEngine(
        {"f": option, "g": option}, concat={"fg": ["f", "g"]} if concat else None
    )
    r = ragged(rows)
    with torch.no_grad():  # insert the ids, so that eval() reads them too
        engine({"f": r, "g": r})
    engine.train(training)
    w = r.weights.clone().requires_grad_(True)
    out = engine({"f": r.with_values(r.values, w), "g": ragged(rows, weights=False)})["f"]
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(len(rows)))
    (out * grad_out).sum().backward()
    exp = _reference_weight_grads(rows, combiner, "t", grad_out)
    if any(abs(x) > 1e4 for x in exp.tolist()):
        return  # nearly cancelling weights: no meaningful tolerance
    torch.testing.assert_close(w.grad, exp, atol=1e-4, rtol=1e-4)


def test_a_lookup_recomputed_by_activation_checkpointing_is_refused() -> None:
    # torch.utils.checkpoint reruns the forward in the backward pass: the lookup inserted and
    # counted again (an id admitted by the recount, its row trained though the loss read the
    # default).
    from torch.utils.checkpoint import checkpoint

    engine = EmbeddingEngine({"u": EmbeddingOption(DIM, initializer=INIT)})
    out = checkpoint(lambda b: engine(b)["u"] * 2, {"u": torch.tensor([[7]])}, use_reentrant=False)
    with pytest.raises(ConfigError, match=r"called during a backward pass, as activation "):
        out.sum().backward()
    # Checkpointing the dense layers only is fine, and eval lookups may be recomputed.
    dense = nn.Linear(DIM, 1)
    x = engine({"u": torch.tensor([[7]])})["u"]
    checkpoint(dense, x, use_reentrant=False).sum().backward()
    engine.eval()
    with torch.no_grad():
        checkpoint(lambda b: engine(b)["u"], {"u": torch.tensor([[7]])}, use_reentrant=False)


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_a_bag_whose_weights_are_all_zero_passes_finite_gradients(combiner: str) -> None:
    # Such a bag reads 0 (mean, sqrtn); sqrtn's square root of its zero total gave the
    # weights NaN gradients (0 * inf), which a model computing them (ReLU-gated attention,
    # masked padding) would spread into its parameters.
    engine = EmbeddingEngine({"f": EmbeddingOption(DIM, combiner=combiner, initializer=INIT)})
    w = torch.tensor([1.0, 0.0, 0.0], requires_grad=True)
    out = engine({"f": RaggedTensor(torch.tensor([1, 2, 3]), [torch.tensor([0, 1, 3])], w)})["f"]
    out.sum().backward()
    assert torch.isfinite(w.grad).all()
    if combiner != "sum":
        assert out[1].abs().sum() == 0
        assert w.grad.tolist() == [0.0, 0.0, 0.0]  # d(w e / |w|) / dw = 0; the empty bag: 0


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
def test_narrower_integer_ids_look_up_as_the_same_int64_ids(dtype: torch.dtype) -> None:
    """recis-io hands out int32 id columns (TorchRec takes int32 ids too): narrower integer ids
    are widened, dense and ragged, and find the rows of the same int64 ids."""
    engine = EmbeddingEngine(
        {
            "a": EmbeddingOption(DIM, initializer=INIT),
            "s": EmbeddingOption(DIM, initializer=INIT, combiner="mean"),
        }
    )
    ids = torch.tensor([[3], [0], [100], [3]])
    offsets = torch.tensor([0, 2, 2, 4])
    values = torch.tensor([7, 1, 100, 7])
    want = engine({"a": ids, "s": RaggedTensor(values, [offsets])})
    if dtype == torch.uint8:
        # Ragged uint8 values are how strings are laid out: refused below; widened here.
        got = engine({"a": ids.to(dtype), "s": RaggedTensor(values, [offsets])})
    else:
        got = engine({"a": ids.to(dtype), "s": RaggedTensor(values.to(dtype), [offsets])})
    torch.testing.assert_close(got["a"], want["a"])
    torch.testing.assert_close(got["s"], want["s"])
    table, _ = engine.table("a")
    assert table.stats().rows == 6  # 3, 0, 100 of "a" and 7, 1, 100 of "s": no others


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.tensor([[1.0, 2.0, 3.0]]), r"feature 'item': ids must be integers"),
        (
            RaggedTensor(torch.arange(4), [torch.tensor([0, 2]), torch.tensor([0, 1, 4])]),
            r"feature 'item': combiner None takes 2-level ids, got 3 levels",
        ),
        (
            torch.zeros(2, 1, dtype=torch.int64),
            r"feature 'item': combiner_kwargs max_len=4611686018427387904 gives a padded",
        ),
    ],
)
def test_a_batch_refused_for_one_feature_leaves_every_table_as_it_was(bad, match) -> None:
    # Tables of several dims: several physical tables, looked up one after the other. A
    # feature refused in a later one must not leave the ids of an earlier one inserted.
    engine = EmbeddingEngine(
        {
            "user": EmbeddingOption(4, initializer=INIT),
            "item": EmbeddingOption(8, combiner=None, combiner_kwargs={"max_len": 2**62}),
        }
    )
    assert len(engine.physical) == 2
    with pytest.raises(InputError, match=match):
        engine({"user": torch.tensor([1, 2]), "item": bad})
    assert engine.rows_per_table() == {"user": 0, "item": 0}
    assert all(t.stats().inserts == 0 for t in engine.physical)


def test_a_string_column_whose_hash_was_forgotten_is_refused() -> None:
    """recis-io reads strings as ragged uint8 bytes: taken as ids, each byte value became a
    row and each string the pool of its bytes, trained without a word."""
    engine = EmbeddingEngine({"city": EmbeddingOption(DIM, initializer=INIT)})
    strings = RaggedTensor(
        torch.tensor(list(b"parislima"), dtype=torch.uint8), [torch.tensor([0, 5, 9])]
    )
    with pytest.raises(InputError, match=r"feature 'city': ragged uint8 values are a column of "):
        engine({"city": strings})
    table, _ = engine.table("city")
    assert table.stats().rows == 0


@pytest.mark.parametrize("scale", [1e-24, 1e20])
def test_weighted_sqrtn_pools_tiny_and_huge_weights_as_their_ratios(scale: float) -> None:
    # Σw² is formed in float64, as recis_kernels.segment_reduce forms it: in float32, squares
    # of 1e-24 underflowed to 0 (the bag pooled to 0) and squares of 1e20 overflowed to inf.
    engine = EmbeddingEngine({"f": EmbeddingOption(DIM, combiner="sqrtn", initializer=INIT)})
    values, offsets = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 3])
    w = torch.tensor([1.0, 1.0, 3.0])
    want = engine({"f": RaggedTensor(values, [offsets], w)})["f"]
    got = engine({"f": RaggedTensor(values, [offsets], w * scale)})["f"]
    torch.testing.assert_close(got, want)
    assert got.abs().sum() > 0


@pytest.mark.parametrize(("combiner", "option"), [(None, "max_len"), ("tile", "tile_len")])
def test_a_padded_output_too_large_to_count_names_the_feature_and_option(combiner, option) -> None:
    engine = EmbeddingEngine(
        {"h": EmbeddingOption(4, combiner=combiner, combiner_kwargs={option: 2**62})}
    )
    ids = RaggedTensor(torch.tensor([1, 2, 3]), [torch.tensor([0, 3, 3])])
    with pytest.raises(InputError, match=rf"feature 'h': combiner_kwargs {option}={2**62} gives a"):
        engine({"h": ids})
