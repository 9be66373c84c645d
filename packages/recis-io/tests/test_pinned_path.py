"""The path ``device="pinned"`` and ``device="cuda"`` take when CUDA is available, run on the
CPU.

With CUDA, batches are not handed over as the reader's own packed chunks: the reader assembles
each batch ahead and copies it into a buffer torch allocates in page-locked memory
(``fill_into``). Only the allocation and the device copy need a GPU; here torch's pinning is
replaced by plain memory, so every value, batch boundary and resume cursor of that path is
checked against the CPU path on any machine.
"""

from __future__ import annotations

import pytest
import torch

import recis_io._dataset as dataset_module
from recis_io import Column, Dataset

from .conftest import write
from .test_values import base_table, collect


@pytest.fixture
def cuda_emulated(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """CUDA reported available to recis-io; the pinned allocations it asks torch for are
    plain CPU tensors, whose sizes are recorded."""
    sizes: list[int] = []
    real_empty = torch.empty

    def empty(*size, pin_memory: bool = False, **kwargs):
        out = real_empty(*size, **kwargs)
        if pin_memory:
            sizes.append(out.numel())
        return out

    monkeypatch.setattr(dataset_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dataset_module.torch, "empty", empty)
    return sizes


TEXT = frozenset({"s", "ls"})


@pytest.mark.parametrize("batch_size", [1, 10, 32, 200])
def test_pinned_batches_equal_cpu_batches(
    tmp_path, fmt: str, batch_size: int, cuda_emulated
) -> None:
    path = write(base_table(fmt), tmp_path / f"t.{fmt}", fmt, 16)
    with pytest.MonkeyPatch.context() as off:
        off.setattr(dataset_module.torch.cuda, "is_available", lambda: False)
        expected = collect(Dataset(path, batch_size=batch_size), text=TEXT)
    got = collect(Dataset(path, batch_size=batch_size, device="pinned"), text=TEXT)
    assert cuda_emulated, "the pinned path was not taken"
    assert got == expected


@pytest.mark.parametrize("shuffle", [False, True])
def test_pinned_batches_keep_order_sizes_and_hashes(
    tmp_path, fmt: str, shuffle: bool, cuda_emulated
) -> None:
    table = base_table(fmt)
    paths = [write(table, tmp_path / f"t{i}.{fmt}", fmt, 16) for i in range(3)]
    columns = ["i64", "l", Column("s", hash="farm", buckets=1000), "ll", "f32"]
    kwargs = dict(batch_size=24, columns=columns, shuffle=shuffle, seed=5, drop_last=True)
    with pytest.MonkeyPatch.context() as off:
        off.setattr(dataset_module.torch.cuda, "is_available", lambda: False)
        cpu = list(Dataset(paths, **kwargs))
    pinned = list(Dataset(paths, device="pinned", num_threads=2, **kwargs))
    assert [len(b) for b in pinned] == [len(b) for b in cpu]
    assert all(len(b) == 24 for b in pinned)
    for a, b in zip(cpu, pinned, strict=True):
        assert a["i64"].tolist() == b["i64"].tolist()
        assert a["s"].tolist() == b["s"].tolist()
        assert a["f32"].tolist() == b["f32"].tolist()
        assert a["l"].values.tolist() == b["l"].values.tolist()
        assert a["l"].offsets[0].tolist() == b["l"].offsets[0].tolist()
        assert [o.tolist() for o in a["ll"].offsets] == [o.tolist() for o in b["ll"].offsets]


def test_pinned_resume_continues_with_the_next_sample(tmp_path, fmt: str, cuda_emulated) -> None:
    paths = [write(base_table(fmt), tmp_path / f"t{i}.{fmt}", fmt, 16) for i in range(2)]
    kwargs = dict(batch_size=7, columns=["i64", "l"], shuffle=True, seed=3, epochs=2)
    whole = [b["i64"].tolist() for b in Dataset(paths, device="pinned", **kwargs)]
    ds = Dataset(paths, device="pinned", **kwargs)
    it = iter(ds)
    head = [next(it)["i64"].tolist() for _ in range(20)]
    state = ds.state_dict()
    del it
    resumed = Dataset(paths, device="pinned", **kwargs)
    resumed.load_state_dict(state)
    tail = [b["i64"].tolist() for b in resumed]
    assert head + tail == whole
