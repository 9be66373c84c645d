"""``EmbeddingEngine(concat=...)``: pooled features joined into one ``(B, sum of dims)`` output."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recis_embedding import (
    ConfigError,
    EmbeddingEngine,
    EmbeddingOption,
    InputError,
    Normal,
    SparseAdam,
)
from recis_kernels import RaggedTensor

INIT = Normal(std=1.0)
B = 5


def options(**extra: EmbeddingOption) -> dict[str, EmbeddingOption]:
    opts = {
        "user": EmbeddingOption(4, initializer=INIT),
        "item": EmbeddingOption(4, initializer=INIT),
        "tags": EmbeddingOption(4, initializer=INIT, combiner="mean"),
        "seq": EmbeddingOption(4, initializer=INIT, shared_name="item", combiner="sqrtn"),
        "hist": EmbeddingOption(4, initializer=INIT, combiner=None),  # a sequence output
    }
    return opts | extra


def batch(seed: int = 0) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([2, 0, 3, 1, 4])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    n = int(offsets[-1])
    return {
        "user": torch.randint(0, 6, (B,), generator=g),
        "item": torch.randint(0, 6, (B, 1), generator=g),
        "tags": torch.randint(0, 6, (B, 3), generator=g),
        "seq": RaggedTensor(
            torch.randint(0, 6, (n,), generator=g), offsets, weights=torch.rand(n, generator=g)
        ),
        "hist": RaggedTensor(torch.randint(0, 6, (n,), generator=g), offsets),
        "label": torch.ones(B),
    }


JOIN = ["tags", "user", "seq", "item"]


def test_joined_output_is_the_concatenation_and_features_are_views_of_it() -> None:
    plain = EmbeddingEngine(options())
    joined = EmbeddingEngine(options(), concat={"sparse": JOIN})
    a, b = plain(batch()), joined(batch())
    assert b["sparse"].shape == (B, 16)
    assert torch.equal(b["sparse"], torch.cat([a[f] for f in JOIN], dim=1))
    for k, f in enumerate(JOIN):
        assert torch.equal(b[f], a[f])
        assert b[f].data_ptr() == b["sparse"][:, 4 * k :].data_ptr()  # a view, no copy
    assert torch.equal(b["hist"], a["hist"])  # features outside the join are untouched
    assert torch.equal(b["hist_mask"], a["hist_mask"])
    assert torch.equal(b["label"], a["label"])


@pytest.mark.parametrize("join", [JOIN, ["user", "item"]])
def test_an_empty_batch_joins_to_zero_rows(join) -> None:
    # Zero rows left view(rows, -1) nothing to infer its width from.
    empty = {f: torch.zeros(0, 1, dtype=torch.int64) for f in join}
    opts = {f: o for f, o in options().items() if f in join}
    out = EmbeddingEngine(opts, concat={"x": join})(empty)
    assert out["x"].shape == (0, 4 * len(join))
    assert all(out[f].shape == (0, 4) for f in join)


@pytest.mark.parametrize("join", [["user", "item"], ["item", "user", "user2"]])
def test_single_id_features_join_by_one_gather(join) -> None:
    opts = options(user2=EmbeddingOption(4, initializer=INIT, shared_name="user"))
    data = batch() | {"user2": torch.arange(B)}
    plain = EmbeddingEngine(opts)(data)
    out = EmbeddingEngine(opts, concat={"x": join})(data)
    assert torch.equal(out["x"], torch.cat([plain[f] for f in join], dim=1))


def test_features_of_several_tables_are_joined_after_pooling() -> None:
    opts = options(wide=EmbeddingOption(8, initializer=INIT))  # another dim: its own table
    data = batch() | {"wide": torch.arange(B)}
    plain = EmbeddingEngine(opts)(data)
    out = EmbeddingEngine(opts, concat={"x": ["user", "wide", "seq"]})(data)
    assert out["x"].shape == (B, 16)
    assert torch.equal(out["x"], torch.cat([plain[f] for f in ["user", "wide", "seq"]], dim=1))


def test_training_through_the_join_matches_training_through_cat() -> None:
    def train(concat: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        engine = EmbeddingEngine(options(), concat={"sparse": JOIN} if concat else None)
        opt = SparseAdam(engine, lr=0.1)
        head = torch.linspace(-1, 1, 16)
        losses = []
        for step in range(4):
            out = engine(batch(step))
            x = out["sparse"] if concat else torch.cat([out[f] for f in JOIN], dim=1)
            loss = ((x @ head) ** 2).mean() + out["hist"].sum()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
        tables = {n: engine.table(n)[0].embeddings(table=engine.table(n)[1]) for n in ("user",)}
        tables["item"] = engine.table("item")[0].embeddings(table=engine.table("item")[1])
        return losses, tables

    base_losses, base = train(False)
    losses, tables = train(True)
    # Gradients of one row add up in another order (batch-major): equal up to rounding.
    torch.testing.assert_close(losses, base_losses)
    for name in base:
        torch.testing.assert_close(tables[name], base[name])


ROW_LENGTHS = st.lists(st.integers(0, 4), min_size=1, max_size=6)


@settings(max_examples=30, deadline=None)
@given(ROW_LENGTHS, st.sampled_from(["sum", "mean", "sqrtn"]))
def test_any_row_lengths_join_like_cat(lengths, combiner) -> None:
    rows = len(lengths)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    n = int(offsets[-1])
    opts = {
        "a": EmbeddingOption(2, initializer=INIT, combiner=combiner),
        "b": EmbeddingOption(2, initializer=INIT),
        "c": EmbeddingOption(2, initializer=INIT, combiner="mean"),
    }
    data = {
        "a": RaggedTensor(torch.arange(n) % 3, offsets),
        "b": torch.arange(rows),
        "c": RaggedTensor((torch.arange(n) * 7) % 5, offsets.flip(0).neg() + n),
    }
    plain = EmbeddingEngine(opts)(data)
    out = EmbeddingEngine(opts, concat={"j": ["c", "a", "b"]})(data)
    torch.testing.assert_close(out["j"], torch.cat([plain[f] for f in "cab"], dim=1))


@pytest.mark.parametrize(
    ("concat", "message"),
    [
        ({"user": ["item"]}, "concat 'user': the name is also a feature's"),
        ({"x": ["nope"]}, "concat 'x': 'nope' has no EmbeddingOption"),
        ({"x": ["hist"]}, "concat 'x': 'hist' has combiner None; only pooled"),
        ({"x": ["user"], "y": ["item", "user"]}, "concat 'y': 'user' is already in concat 'x'"),
        ({"x": []}, "concat 'x': expected a non-empty list"),
        ({"x": "user"}, "concat 'x': expected a non-empty list"),
        ({"hist_mask": ["user"]}, "concat 'hist_mask': the name is also the mask of sequence"),
    ],
)
def test_bad_concat_is_named(concat, message) -> None:
    with pytest.raises(ConfigError, match=message):
        EmbeddingEngine(options(), concat=concat)


def test_outputs_never_replace_one_another_or_batch_columns() -> None:
    with pytest.raises(ConfigError, match="'hist': its padded output comes with a mask named"):
        EmbeddingEngine(options(hist_mask=EmbeddingOption(4)))
    # A ragged sequence output has no mask: the name is free.
    ragged = EmbeddingOption(4, combiner=None, combiner_kwargs={"ragged": True})
    EmbeddingEngine(options(hist=ragged, hist_mask=EmbeddingOption(4)))
    engine = EmbeddingEngine(options(), concat={"x": ["user", "item"]})
    for column in ("x", "hist_mask"):
        with pytest.raises(InputError, match=rf"batch columns \['{column}'\] have the names"):
            engine(batch() | {column: torch.zeros(B)})


def test_inputs_that_cannot_join_are_named() -> None:
    engine = EmbeddingEngine(options(), concat={"x": ["user", "item"]})
    with pytest.raises(InputError, match="concat 'x': feature 'item' has 3 rows, 'user' has 5"):
        engine(batch() | {"item": torch.arange(3)})
    three = RaggedTensor(torch.arange(4), [torch.tensor([0, 1, 2]), torch.tensor([0, 1, 4])])
    outer = EmbeddingEngine(options(), concat={"x": ["user", "tags"]})
    with pytest.raises(InputError, match="concat 'x': feature 'tags' has 3-level ids"):
        outer(batch() | {"user": torch.arange(2), "tags": three})
    wide = EmbeddingEngine(
        options(wide=EmbeddingOption(8)), concat={"x": ["user", "wide"]}
    )  # two tables: joined after pooling
    with pytest.raises(InputError, match="concat 'x': feature 'wide' has 3-level ids"):
        wide(batch() | {"user": torch.arange(2), "wide": three})
    with pytest.raises(InputError, match="concat 'x': feature 'wide' has 3 rows, 'user' has 2"):
        wide(batch() | {"user": torch.arange(2), "wide": torch.arange(3)})
    # Refused before any lookup: no table took the batch's ids.
    assert set(wide.rows_per_table().values()) == {0}


@pytest.mark.parametrize("kind", ["plain", "per bag", "per id"])
def test_host_and_torch_batch_major_orders_agree(kind) -> None:
    """The CPU reorders ids in NumPy; the torch spelling (other devices) must agree."""
    from recis_embedding._concat import batch_major_host, batch_major_torch
    from recis_embedding._inputs import as_ids

    data = batch(3)
    parts = [as_ids(f, data[f]) for f in ("user", "seq", "tags", "item")]
    scales = [None, None, None, None]
    mults = [None, None, None, None]
    if kind != "plain":
        scales[2] = torch.full((B,), 1 / 3)  # tags: three ids per row, mean
        scales[1] = torch.rand(B)
    if kind == "per id":
        mults[1], scales[1] = torch.rand(parts[1].values.numel()), None
    host = batch_major_host(parts, [0, 1, 2, 1], scales, mults, B)
    other = batch_major_torch(parts, [0, 1, 2, 1], scales, mults, B)
    for a, b in zip(host, other, strict=True):
        assert a == b if not isinstance(a, torch.Tensor) else torch.equal(a, b)
    # Row 0 holds user, its two seq ids, three tags and item, in that order.
    seq_row0 = data["seq"].values[:2].tolist()
    tags_row0 = data["tags"][0].tolist()
    first_row = [data["user"][0].item(), *seq_row0, *tags_row0, data["item"][0, 0].item()]
    assert host.values[:7].tolist() == first_row
    assert host.bags[:5].tolist() == [0, 1, 3, 6, 7]
    assert host.tabs[:7].tolist() == [0, 1, 1, 2, 2, 2, 1]
    if kind == "plain":
        assert host.weights is None
    else:
        w = host.weights[:7]
        seq_w = mults[1][:2] if kind == "per id" else scales[1][0].repeat(2)
        assert torch.equal(w[1:3], seq_w)
        assert torch.equal(w[3:6], torch.full((3,), 1 / 3))
        assert w[0] == w[6] == 1


@pytest.mark.parametrize("mode", ["mean", "sqrtn"])
def test_unweighted_bags_scale_per_bag_exactly_as_unit_weights(mode) -> None:
    from recis_embedding._pooling import bag_weights

    lengths = torch.randint(0, 200, (3_000,), generator=torch.Generator().manual_seed(0))
    bags = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    n = int(bags[-1])
    assert torch.equal(bag_weights(bags, None, mode, n), bag_weights(bags, torch.ones(n), mode, n))
