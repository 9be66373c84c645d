"""Rows read only by outputs the loss did not use are left out of the optimizer step, whether
their tables are fused with used ones, share a table with them, or are joined with them.

The reference engine has the used features only: every row it holds must match, and every
row only the engine under test holds (read by unused features alone) must still hold its
initial value, as a torch sparse embedding left out of the loss has no gradient to apply.
Weight decay and Adagrad's accumulators make a step with a zero gradient visible.
"""

from __future__ import annotations

import pytest
import torch

from recis_embedding import (
    Constant,
    EmbeddingEngine,
    EmbeddingOption,
    InputError,
    SparseAdagrad,
    SparseAdamW,
)
from recis_kernels import RaggedTensor

B = 6


def options() -> dict[str, EmbeddingOption]:
    init = Constant(0.5)
    return {
        "user": EmbeddingOption(3, initializer=init),
        "item": EmbeddingOption(3, initializer=init, combiner="mean"),
        "tags": EmbeddingOption(3, initializer=init, combiner="sqrtn"),
        "hist": EmbeddingOption(3, initializer=init, combiner=None, shared_name="item"),
        "clicks": EmbeddingOption(
            3, initializer=init, combiner=None, combiner_kwargs={"ragged": True}
        ),
        "recent": EmbeddingOption(
            3, initializer=init, combiner="tile", combiner_kwargs={"tile_len": 2}
        ),
    }


def batch(step: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(step)
    lengths = torch.randint(0, 4, (B,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    n = int(offsets[-1])

    def ragged(weighted: bool = False) -> RaggedTensor:
        values = torch.randint(0, 12, (n,), generator=g)
        return RaggedTensor(
            values, offsets, weights=torch.rand(n, generator=g) if weighted else None
        )

    return {
        "user": torch.randint(0, 12, (B,), generator=g),
        "item": torch.randint(0, 12, (B, 2), generator=g),
        "tags": ragged(weighted=True),
        "hist": ragged(),
        "clicks": ragged(),
        "recent": ragged(),
    }


def loss_of(out: dict[str, object], used: list[str]) -> torch.Tensor:
    total = torch.zeros(())
    for k, f in enumerate(used):
        value = out[f]
        value = value.values if isinstance(value, RaggedTensor) else value
        total = total + (k + 1) * (value * value).sum()
    return total


def check_against(engine: EmbeddingEngine, reference: EmbeddingEngine) -> None:
    for name in ("user", "item", "tags", "clicks", "recent"):
        table, index = engine.table(name)
        ids = table.ids(index)
        try:
            ref_table, ref_index = reference.table(name)
        except InputError:
            ref_ids = torch.zeros(0, dtype=torch.int64)
        else:
            ref_ids = ref_table.ids(ref_index)
            assert set(ref_ids.tolist()) <= set(ids.tolist()), name
            torch.testing.assert_close(
                table.embeddings(ref_ids, index),
                ref_table.embeddings(ref_ids, ref_index),
                rtol=1e-6,
                atol=1e-7,
                msg=name,
            )
        alone = ids[~torch.isin(ids, ref_ids)]
        untouched = table.embeddings(alone, index)
        assert torch.equal(untouched, torch.full_like(untouched, 0.5)), name


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize(
    "make_opt",
    [lambda e: SparseAdamW(e, lr=0.1, weight_decay=0.5), lambda e: SparseAdagrad(e, lr=0.1)],
)
@pytest.mark.parametrize(
    "used",
    [["user"], ["hist"], ["item", "clicks"], ["tags", "recent", "user"], list(options())],
)
def test_outputs_left_out_of_the_loss_step_no_row(fuse, make_opt, used) -> None:
    engine = EmbeddingEngine(options(), fuse=fuse)
    reference = EmbeddingEngine({f: options()[f] for f in used}, fuse=fuse)
    opt, ref_opt = make_opt(engine), make_opt(reference)
    for step in range(4):
        data = batch(step)
        loss_of(engine(data), used).backward()
        loss_of(reference({f: data[f] for f in used}), used).backward()
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
    check_against(engine, reference)


@pytest.mark.parametrize("use", ["member", "joined"])
def test_joined_members_step_as_the_loss_uses_them(use) -> None:
    # A member's output is a view of the joined one: the loss using only member "user" must
    # step only its rows; using the joined output steps all members'.
    join = ["user", "item", "tags"]
    joined = EmbeddingEngine({f: options()[f] for f in join}, concat={"j": join})
    used = ["user"] if use == "member" else join
    reference = EmbeddingEngine({f: options()[f] for f in used})
    opts = [SparseAdamW(e, lr=0.1, weight_decay=0.5) for e in (joined, reference)]
    for step in range(3):
        data = batch(step)
        out = joined({f: data[f] for f in join})
        (out["user"].sum() if use == "member" else out["j"].sum()).backward()
        ref_out = reference({f: data[f] for f in used})
        sum(ref_out[f].sum() for f in used).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    for name in join:
        table, index = joined.table(name)
        ids = table.ids(index)
        if name in used:
            ref_table, ref_index = reference.table(name)
            assert ids.tolist() == ref_table.ids(ref_index).tolist()
            torch.testing.assert_close(
                table.embeddings(ids, index), ref_table.embeddings(ids, ref_index), msg=name
            )
        else:
            untouched = table.embeddings(ids, index)
            assert torch.equal(untouched, torch.full_like(untouched, 0.5)), name
