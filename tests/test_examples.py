"""The example models (and the end-to-end benchmark's PyTorch twin) on a few real batches.

The examples themselves run in the ``examples`` nox session; these checks are the fast part:
shapes, masking, which tasks a batch trains, and that both benchmark contenders see the same
behaviour sequence.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import load_script

ROOT = Path(__file__).resolve().parent.parent


def _load(relative: str) -> ModuleType:
    return load_script(relative)


@pytest.fixture(scope="module")
def common() -> ModuleType:
    return _load("examples/_common.py")


@pytest.fixture(scope="module")
def files(common, tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("clicks")
    data = common.load_data_module()
    return data.write_dataset(out, rows=600, files=1, signal=True, row_group_size=300)


@pytest.fixture(scope="module")
def batch(common, files):
    return next(iter(common.reader(files, 200, shuffle=False)))


def test_target_attention_masks_padding_and_empty_histories() -> None:
    din = _load("examples/din.py")
    attention = din.TargetAttention(4)
    candidate = torch.randn(3, 4)
    behaviours = torch.randn(3, 5, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    interest, weights = attention(candidate, behaviours, mask)
    assert torch.allclose(weights.sum(1), torch.tensor([1.0, 0.0, 1.0]))
    assert (weights[~mask] == 0).all()
    assert torch.equal(interest[1], torch.zeros(4))
    interest.sum().backward()
    assert torch.isfinite(behaviours.grad).all()
    expected = (weights[0, :3, None] * behaviours[0, :3]).sum(0)
    assert torch.allclose(interest[0], expected)


def test_din_marks_the_behaviours_equal_to_the_candidate(batch) -> None:
    din = _load("examples/din.py")
    torch.manual_seed(0)
    body = din.DIN(torch.device("cpu")).eval()
    with torch.no_grad():
        rep = body(batch)
    assert rep.shape == (200, body.out_dim)
    same, mask = body.last["same"], body.last["mask"]
    seq = batch["seq"]
    offsets, values = seq.offsets[0].tolist(), seq.values
    for row in range(20):
        history = values[offsets[row] : offsets[row + 1]][-50:]
        assert int(same[row][mask[row]].sum()) == int((history == batch["C2"][row]).sum())


def test_dlrm_interacts_every_pair_once(batch) -> None:
    dlrm = _load("examples/dlrm.py")
    torch.manual_seed(0)
    model = dlrm.DLRM(torch.device("cpu"))
    assert model.pairs.numel() == 27 * 26 // 2
    out = model(batch)
    assert out["predictions"].shape == (200,)
    assert torch.isfinite(out["loss"])
    assert ((out["predictions"] > 0) & (out["predictions"] < 1)).all()


def test_mmoe_gives_each_task_its_own_tower(batch) -> None:
    mmoe = _load("examples/mmoe.py")
    torch.manual_seed(0)
    body = mmoe.MMoE(torch.device("cpu")).eval()
    with torch.no_grad():
        out = body(batch)
    assert set(out) == {"click", "conversion"}
    assert out["click"].shape == out["conversion"].shape == (200, body.out_dim)
    assert not torch.equal(out["click"], out["conversion"])
    share = body.gate_sums["click"]
    assert share.sum() == pytest.approx(200.0)


def test_multistage_trains_the_tasks_whose_labels_the_batch_carries(common, files) -> None:
    multistage = _load("examples/multistage.py")
    torch.manual_seed(0)
    model = multistage.ClickConversion(torch.device("cpu"))
    clicks = next(iter(common.reader(files, 100, shuffle=False, labels=("label",))))
    assert set(model(clicks)["losses"]) == {"click"}
    both = next(iter(common.reader(files, 100, shuffle=False)))
    assert set(model(both)["losses"]) == {"click", "conversion"}
    recorded = sum(len(t.pending) for t in model.embeddings.physical)
    assert recorded > 0  # trainable tables record lookups for a sparse optimizer
    model.train_tables = False
    out = model(both)
    out["losses"]["click"].backward()
    assert sum(len(t.pending) for t in model.embeddings.physical) == recorded


def test_both_benchmark_contenders_see_the_same_sequence(common, files) -> None:
    import pyarrow.parquet as pq

    bench = _load("benchmarks/bench_e2e.py")
    table = pq.read_table(files[0]).slice(0, 300)
    values, starts = bench._tail_ids(table.column("seq").combine_chunks(), bench.SEQ_LEN)
    recis_batch = next(iter(common.reader(files, 300, shuffle=False)))
    ragged = common.feature_engine(bench.SEQ_LEN)(recis_batch)["seq"]
    assert torch.equal(torch.from_numpy(values), ragged.values)
    assert torch.equal(torch.from_numpy(starts), ragged.offsets[0][:-1])
