from __future__ import annotations

import copy
import os
import pickle

import numpy as np
import pytest
import torch
from conftest import use_host_kernels
from hypothesis import given
from hypothesis import strategies as st

from recis_kernels import RowStore, ShapeError


@given(
    st.integers(1, 9),
    st.lists(st.integers(0, 40), max_size=60),
    st.sampled_from([4, 8, 16, 64]),  # 11, 6, 3 and 1 blocks
)
def test_gather_scatter_add_match_numpy(width: int, rows: list[int], block_rows: int) -> None:
    store = RowStore(width, block_rows=block_rows)
    store.reserve(41)
    assert store.capacity >= 41
    ref = np.zeros((41, width), dtype=np.float64)
    base = torch.arange(41 * width, dtype=torch.float32).reshape(41, width)
    store.scatter(torch.arange(41), base)
    ref[:] = base.numpy()
    idx = torch.tensor(rows, dtype=torch.int64)
    vals = torch.linspace(-1, 1, len(rows) * width).reshape(len(rows), width)
    store.scatter_add(idx, vals)
    np.add.at(ref, np.array(rows, dtype=np.int64), vals.numpy().astype(np.float64))
    np.testing.assert_allclose(store.gather(torch.arange(41)).numpy(), ref, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(store.gather(idx).numpy(), ref[rows].reshape(-1, width), atol=1e-5)


def test_column_ranges_and_growth_keep_rows(device: torch.device) -> None:
    store = RowStore(6, block_rows=2, device=device)
    store.reserve(3)
    store.scatter(torch.tensor([2, 0], device=device), torch.ones(2, 2, device=device), start=4)
    store.reserve(9)
    assert len(store.blocks) == 5
    got = store.gather(torch.tensor([0, 1, 2], device=device), 3, 6)
    assert got.tolist() == [[0, 1, 1], [0, 0, 0], [0, 1, 1]]


def test_row_store_rejects_bad_columns() -> None:
    store = RowStore(4)
    store.reserve(1)
    with pytest.raises(ShapeError, match=r"columns \[2, 6\) outside a row of 4"):
        store.scatter(torch.tensor([0]), torch.ones(1, 4), start=2)
    with pytest.raises(ShapeError, match="values has shape"):
        store.scatter_add(torch.tensor([0, 0]), torch.ones(1, 4))


@given(
    st.lists(st.integers(0, 40), unique=True, max_size=41),
    st.sampled_from([4, 16, 64]),
    st.integers(0, 4),
)
def test_scatter_then_gather_columns_in_any_order(rows: list[int], block_rows: int, start: int):
    store = RowStore(5, block_rows=block_rows)
    store.reserve(41)
    idx = torch.tensor(rows, dtype=torch.int64)
    vals = torch.arange(len(rows) * (5 - start), dtype=torch.float32).reshape(len(rows), 5 - start)
    store.scatter(idx, vals, start=start)
    assert torch.equal(store.gather(idx, start, 5), vals)
    untouched = sorted(set(range(41)) - set(rows))
    assert not store.gather(torch.tensor(untouched, dtype=torch.int64)).any()


@given(
    st.lists(st.integers(0, 40), unique=True, max_size=41),
    st.sampled_from([4, 16, 64]),  # 11, 3 and 1 blocks
    st.integers(0, 3),
)
def test_update_applies_fn_to_each_row_once(rows: list[int], block_rows: int, start: int):
    store = RowStore(5, block_rows=block_rows)
    store.reserve(41)
    base = torch.arange(41 * 5, dtype=torch.float32).reshape(41, 5)
    store.scatter(torch.arange(41), base)
    idx = torch.tensor(rows, dtype=torch.int64)
    # A per-row operand in the order of ``rows``, as an optimizer's gradients are.
    delta = torch.arange(len(rows), dtype=torch.float32)[:, None] * 1000 + 1000
    seen: list[torch.Tensor | None] = []

    def fn(current: torch.Tensor, which: torch.Tensor | None) -> torch.Tensor:
        seen.append(which)
        d = delta if which is None else delta.index_select(0, which)
        return current + d

    store.update(idx, fn, start, 4)
    assert len(seen) == (1 if rows else 0)
    want = base.clone()
    want[idx, start:4] += delta
    assert torch.equal(store.gather(torch.arange(41)), want)


def test_update_rejects_a_result_of_the_wrong_shape() -> None:
    for block_rows in (2, 64):  # several blocks, one block
        store = RowStore(4, block_rows=block_rows)
        store.reserve(4)
        with pytest.raises(ShapeError, match=r"fn returned \(3, 3\), expected shape \(3, 4\)"):
            store.update(torch.tensor([0, 2, 3]), lambda cur, which: cur[:, :3])
        assert not store.gather(torch.arange(4)).any()  # nothing written


def test_rows_outside_the_store_are_rejected() -> None:
    store = RowStore(2, block_rows=4)
    store.reserve(12)  # 3 blocks
    before = store.gather(torch.arange(12)).clone()
    for bad, pos in (([0, 12], 1), ([-1, 3], 0), ([5, 4 * 256 + 1], 1)):
        rows = torch.tensor(bad)
        msg = rf"rows\[{pos}\] = {bad[pos]} is out of range, expected a value in \[0, 11\]"
        with pytest.raises(IndexError, match="RowStore.gather: " + msg):
            store.gather(rows)
        with pytest.raises(IndexError, match="RowStore.scatter: " + msg):
            store.scatter(rows, torch.ones(2, 2))
        with pytest.raises(IndexError, match="RowStore.update: " + msg):
            store.update(rows, lambda cur, which: cur + 1)
    assert torch.equal(store.gather(torch.arange(12)), before)
    # Before any reserve there is nothing to index ("expected a value in [0, -1]" before).
    with pytest.raises(IndexError, match=r"rows\[0\] = 0 is out of range: there is nothing to "):
        RowStore(2).gather(torch.tensor([0]))


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda s: pickle.loads(pickle.dumps(s))])
def test_a_copy_of_a_store_writes_its_own_blocks(request, monkeypatch, clone) -> None:
    # Through the kernel, whose block pointer table holds the blocks' addresses: a copy must
    # not read or write the original's blocks through a table it copied.
    use_host_kernels(request.getfixturevalue("_host_kernels"), monkeypatch, ("row_store",))
    for block_rows in (16, 2):  # one block, several
        store = RowStore(4, block_rows=block_rows)
        store.reserve(4)
        store.scatter(torch.tensor([1]), torch.ones(1, 4))  # builds the original's table
        twin = clone(store)
        twin.scatter(torch.tensor([2]), torch.full((1, 4), 7.0))
        assert store.gather(torch.tensor([1, 2])).tolist() == [[1.0] * 4, [0.0] * 4]
        assert twin.gather(torch.tensor([1, 2])).tolist() == [[1.0] * 4, [7.0] * 4]
        del store
        twin.scatter(torch.tensor([3]), torch.full((1, 4), 5.0))
        assert twin.gather(torch.tensor([3])).tolist() == [[5.0] * 4]


@pytest.mark.parametrize("view", ["strided", "strided, off alignment", "off alignment"])
def test_the_kernels_read_and_write_blocks_that_are_strided_or_off_alignment_views(
    request, monkeypatch, view
) -> None:
    # A store whose block is a view (loaded or unpickled from one): strided (columns of a
    # wider tensor), or starting 8 bytes off the 16 bytes four-float loads need. The same rows
    # as the torch path reads and writes.
    use_host_kernels(request.getfixturevalue("_host_kernels"), monkeypatch, ("row_store",))
    store = RowStore(4, block_rows=4)
    base = torch.arange(34, dtype=torch.float32)
    block = {
        "strided": base[:32].view(4, 8)[:, 4:],
        "strided, off alignment": base[:32].view(4, 8)[:, 2:6],
        "off alignment": base[2:18].view(4, 4),
    }[view]
    expected = block.clone()
    store.blocks = [block]
    rows = torch.tensor([0, 1, 3])
    assert store.gather(rows).tolist() == expected[rows].tolist()
    before = base.clone()
    store.scatter(torch.tensor([2]), torch.full((1, 4), -1.0))
    assert block[2].tolist() == [-1.0] * 4
    changed = (base != before).nonzero().squeeze(1)
    assert changed.numel() == 4  # nothing outside the block's row moved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("block_rows", [4, 64])
def test_compiled_host_copies_match_the_block_by_block_path(monkeypatch, dtype, block_rows):
    """On CPU tensors rows are copied by one compiled pass in the order asked; the torch path
    groups them by block. Gathers (duplicates too), scatters and updates of column ranges
    must agree, for any element size."""
    g = torch.Generator().manual_seed(block_rows)
    rows = torch.randperm(40, generator=g)[:25]
    asked = torch.cat([rows, rows[:5]])  # duplicates in a gather
    values = (torch.randn(25, 3, generator=g) * 100).to(dtype)
    results = []
    for compiled in (True, False):
        with monkeypatch.context() as mp:
            if not compiled:
                mp.setattr(RowStore, "_host", lambda self, rows: False)
            store = RowStore(7, dtype=dtype, block_rows=block_rows)
            store.reserve(40)
            store.scatter(torch.arange(40), torch.arange(280).reshape(40, 7).to(dtype))
            store.scatter(rows, values, start=2)
            gathered = store.gather(asked, 1, 6)
            store.update(rows, lambda cur, which: cur * 2, 3, 7)
            results.append((gathered, store.gather(torch.arange(40))))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_scatter_of_the_stores_own_rows_writes_their_old_values() -> None:
    # Values viewing a block: the compiled copy read rows it had just written (rows 1-4 all
    # became row 0); torch's index_copy_ refuses such overlap.
    store = RowStore(4, torch.float32, 8)
    store.reserve(8)
    store.scatter(torch.arange(8), torch.arange(32, dtype=torch.float32).view(8, 4))
    before = store.gather(torch.arange(4))
    store.scatter(torch.tensor([1, 2, 3, 4]), store.blocks[0][0:4])
    assert torch.equal(store.gather(torch.tensor([1, 2, 3, 4])), before)


def _resident_bytes(tensor: torch.Tensor) -> int:
    """Bytes of ``tensor``'s pages that are in RAM (Linux's /proc/self/pagemap: 8 bytes a
    page, bit 63 set for a page present)."""
    page = os.sysconf("SC_PAGE_SIZE")
    first = tensor.data_ptr() // page
    last = (tensor.data_ptr() + tensor.numel() * tensor.element_size() - 1) // page
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = np.frombuffer(pagemap.read((last - first + 1) * 8), dtype=np.uint64)
    return int(((entries >> np.uint64(63)) & np.uint64(1)).sum()) * page


@pytest.mark.skipif(not os.path.exists("/proc/self/pagemap"), reason="reads Linux's /proc")
@pytest.mark.parametrize("clone", [None, copy.deepcopy, lambda s: pickle.loads(pickle.dumps(s))])
def test_a_cpu_block_takes_memory_as_its_rows_are_written(clone) -> None:
    # 65,536 rows of 32 floats: an 8 MiB block; a store of a few rows holds the pages of
    # those rows (a huge page at most), not the whole block.
    store = RowStore(32, block_rows=1 << 16)
    store.reserve(3)
    store.scatter(torch.tensor([0, 2]), torch.ones(2, 32))
    store = store if clone is None else clone(store)
    block = store.blocks[0]
    assert block.shape == (1 << 16, 32)
    if clone is None:
        assert _resident_bytes(block) <= 2 << 20
    assert store.gather(torch.tensor([0, 1, 2, 65_535])).sum(1).tolist() == [32.0, 0, 32.0, 0]
    store.scatter(torch.tensor([65_535]), torch.full((1, 32), 2.0))
    assert store.gather(torch.tensor([65_535])).sum().item() == 64.0
    # A process forked after it writes its own copy, never the parent's rows.
    pid = os.fork()
    if pid == 0:
        block[1] = 9.0
        os._exit(0)
    os.waitpid(pid, 0)
    assert store.gather(torch.tensor([1])).sum().item() == 0.0
