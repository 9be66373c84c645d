"""The trainer's collectives over gloo keep their CPU tensors until the group lets go of them.

Gloo runs a collective on a worker thread that drops its references after signalling
completion; a tensor Python freed first is left to that thread, which then needs the GIL. On
torch releases before 2.8, a process group destroyed meanwhile (``destroy_process_group()``
at the end of a run) waits for the thread with the GIL held: an occasional hang at exit, seen
with torch 2.6 in the distributed tests. recis-embedding's ``handed_over`` keeps such tensors;
every host collective of the trainer and the metrics must go through it.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

import recis_embedding._sharding as sharding
import recis_train._distributed as distributed
from recis_train._distributed import DistributedContext
from recis_train.metrics import AUROC, LogLoss


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def kept(monkeypatch) -> list[torch.Tensor]:
    """The tensors handed over by every collective run while the test runs."""
    seen: list[torch.Tensor] = []
    real = sharding.handed_over

    @contextlib.contextmanager
    def recording(*tensors: torch.Tensor):
        seen.extend(tensors)
        with real(*tensors):
            yield

    monkeypatch.setattr(sharding, "handed_over", recording)
    monkeypatch.setattr(distributed, "handed_over", recording)
    return seen


@pytest.mark.usefixtures("one_rank_group")
def test_reductions_gathers_and_broadcasts_keep_their_tensors(kept) -> None:
    ctx = DistributedContext(0, 1)
    assert ctx.reduce([1.0, 2.5], "max") == [1.0, 2.5]
    assert len(kept) == 1
    assert ctx.gather({"a": 1}) == [{"a": 1}]
    assert len(kept) == 3  # the sizes, then the bytes
    assert ctx.broadcast(("step-3", [1, 2])) == ("step-3", [1, 2])
    assert len(kept) == 5


@pytest.mark.usefixtures("one_rank_group")
def test_metric_sync_keeps_its_tensors(kept, monkeypatch) -> None:
    # One rank: the metrics sync only where the world is larger; pretend it is.
    import recis_train.metrics._base as base

    monkeypatch.setattr(base, "_world_size", lambda: 2)
    logloss, auc = LogLoss(), AUROC()
    for m in (logloss, auc):
        m.update(torch.tensor([0.2, 0.9]), torch.tensor([0, 1]))
    logloss._synced_state()
    summed = len(kept)
    assert summed >= 1
    auc._synced_state()
    assert len(kept) > summed
