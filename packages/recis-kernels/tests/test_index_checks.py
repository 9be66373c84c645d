"""Out-of-range rows and offsets: a clear IndexOutOfRangeError on the CPU path and from the
kernels' device-side checks, never a wild memory access.

The kernel tests run the ``.cu`` sources compiled as host C++ (see conftest.HostKernels) with the
ops' host-side value checks switched off, as they are for CUDA tensors: what is left to catch a
bad index is the check inside the kernel.
"""

from __future__ import annotations

import pytest
import torch
from conftest import use_host_kernels

import recis_kernels as rk
from recis_kernels import IndexOutOfRangeError, RaggedTensor, RowStore
from recis_kernels._cuda import index_errors
from recis_kernels.ops import dense, feature_cross, hashing, row_store, segment_reduce

INT64_MIN = -(1 << 63)


@pytest.fixture
def kernels(_host_kernels, monkeypatch):
    """Every op through its kernel on CPU tensors, without host-side value checks."""
    use_host_kernels(
        _host_kernels,
        monkeypatch,
        ("row_store", "dense", "hashing", "segment_reduce", "feature_cross"),
    )
    for module in (row_store, dense, hashing, segment_reduce, feature_cross):
        monkeypatch.setattr(module, "can_inspect", lambda t: False)
    yield
    index_errors.check_index_errors("cpu")  # nothing left recorded by a test


def _message(op: str, arg: str, pos: int, value: int, low: int, high: int) -> str:
    text = f"{op}: {arg}[{pos}] = {value} is out of range, expected a value in [{low}, {high}]"
    return "^" + text.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(
        ")", r"\)"
    )


def _filled_store(width: int, block_rows: int, rows: int) -> RowStore:
    store = RowStore(width, block_rows=block_rows)
    store.reserve(rows)
    cap = store.capacity
    for b, block in enumerate(store.blocks):
        block.copy_(torch.arange(block.numel(), dtype=torch.float32).reshape(block.shape))
        block += b * 1000
    assert store.capacity == cap
    return store


# -- RowStore ------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [4, 3])  # float4 path, scalar path
@pytest.mark.parametrize("bad", [12, 13, -1, INT64_MIN, (1 << 63) - 1, 4 * 256])
def test_row_store_kernels_report_a_bad_row_and_leave_memory_alone(kernels, width, bad):
    store = _filled_store(width, block_rows=4, rows=12)  # 3 blocks, rows [0, 12)
    before = [b.clone() for b in store.blocks]
    rows = torch.tensor([3, bad, 0])
    for op, call in (
        ("RowStore.gather", lambda: store.gather(rows)),
        ("RowStore.scatter", lambda: store.scatter(rows, torch.full((3, width), -5.0))),
        ("RowStore.update", lambda: store.update(rows, lambda cur, which: cur + 1)),
    ):
        with pytest.raises(IndexOutOfRangeError, match=_message(op, "rows", 1, bad, 0, 11)):
            call()
    # The scatter wrote its two good rows; nothing else moved.
    after = torch.cat(store.blocks)
    want = torch.cat(before)
    want[[3, 0]] = -5.0
    assert torch.equal(after, want)
    # The record is cleared: the next good call runs.
    assert torch.equal(store.gather(torch.tensor([0, 11])), want[[0, 11]])


def test_row_store_kernels_give_the_cpu_results_in_range(kernels, monkeypatch):
    rows = torch.tensor([11, 0, 5, 5, 7])
    values = torch.linspace(-1, 1, 5 * 6).reshape(5, 6)

    def run(store: RowStore) -> torch.Tensor:
        store.scatter_add(rows, values)
        store.scatter(torch.tensor([2, 9]), torch.ones(2, 2), start=4)
        store.update(torch.tensor([3, 10]), lambda cur, which: cur * 2, 1, 5)
        return store.gather(torch.tensor([4, 11, 0, 5, 5, 7, 2, 9, 3, 10, 1]), 1, 6)

    got = run(_filled_store(6, block_rows=4, rows=12))
    monkeypatch.setattr(row_store, "use_cuda_kernels", lambda device: False)
    monkeypatch.setattr(row_store, "can_inspect", lambda t: True)
    assert torch.equal(got, run(_filled_store(6, block_rows=4, rows=12)))


def test_row_store_scatter_add_on_a_device_names_the_position_in_rows(kernels):
    # Duplicates are reduced on the device first; the bad row is still named where it was given.
    store = _filled_store(2, block_rows=4, rows=8)
    with pytest.raises(
        IndexOutOfRangeError, match=_message("RowStore.scatter_add", "rows", 3, 8, 0, 7)
    ):
        store.scatter_add(torch.tensor([1, 1, 0, 8, 1]), torch.ones(5, 2))


@pytest.mark.parametrize("block_rows", [4, 64])  # 3 blocks, 1 block
def test_row_store_cpu_path_names_op_position_and_value(block_rows):
    store = _filled_store(2, block_rows=block_rows, rows=12)
    cap = store.capacity
    before = torch.cat(store.blocks).clone()
    for bad in (cap, -1, INT64_MIN):
        rows = torch.tensor([0, 5, bad])
        ones = torch.ones(3, 2)
        cases = (
            ("RowStore.gather", store.gather, ()),
            ("RowStore.scatter", store.scatter, (ones,)),
            ("RowStore.scatter_add", store.scatter_add, (ones,)),
            ("RowStore.update", store.update, (lambda cur, which: cur + 1,)),
        )
        for op, method, extra in cases:
            with pytest.raises(
                IndexOutOfRangeError, match=_message(op, "rows", 2, bad, 0, cap - 1)
            ):
                method(rows, *extra)
    assert torch.equal(torch.cat(store.blocks), before)


def test_row_store_launch_passes_the_capacity(monkeypatch):
    calls = []

    def record(module_name, kernel, grid, block, args, *, device, shared_mem=0):
        calls.append((kernel, args))

    import recis_kernels._cuda as cuda_pkg

    monkeypatch.setattr(cuda_pkg, "launch", record)
    monkeypatch.setattr(row_store, "use_cuda_kernels", lambda device: True)
    store = RowStore(4, block_rows=4)
    store.reserve(9)  # 3 blocks: capacity 12
    store.gather(torch.tensor([1, 2]))
    store.scatter(torch.tensor([1]), torch.ones(1, 4))
    for kernel, args in calls:
        assert args[3] == ("i64", 12), kernel
        buf, site = args[-2], args[-1]
        assert buf[0] == "ptr"
        assert buf[1] is index_errors.error_buffer(torch.device("cpu"))
        assert index_errors._sites[site[1]] == (f"RowStore.{kernel.split('_')[0]}", ("rows",))


# -- ragged offsets ------------------------------------------------------------------------------


def test_ragged_to_dense_kernels_report_bad_offsets(kernels):
    past = RaggedTensor(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 5]), validate=False)
    with pytest.raises(
        IndexOutOfRangeError, match=_message("ragged_to_dense", "offsets", 2, 5, 2, 3)
    ):
        past.to_dense(pad_value=0)
    down = RaggedTensor(torch.tensor([1, 2, 3]), torch.tensor([0, 3, 1, 3]), validate=False)
    with pytest.raises(
        IndexOutOfRangeError, match=_message("ragged_to_dense", "offsets", 2, 1, 3, 3)
    ):
        down.to_dense(pad_value=0, max_len=3)
    three = RaggedTensor(
        torch.tensor([1, 2, 3]), [torch.tensor([0, 1, 2]), torch.tensor([0, 2, 9])], validate=False
    )
    with pytest.raises(
        IndexOutOfRangeError, match=_message("ragged_to_dense", "offsets[1]", 2, 9, 2, 3)
    ):
        three.to_dense(pad_value=0, max_len=(1, 3))
    # In range: the kernel's result.
    good = RaggedTensor(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 2, 3]), validate=False)
    assert good.to_dense(pad_value=-1).tolist() == [[1, 2], [-1, -1], [3, -1]]


def test_dense_to_ragged_kernels_report_bad_lengths_as_offsets(kernels):
    dense2 = torch.arange(6).reshape(2, 3)
    with pytest.raises(
        IndexOutOfRangeError, match=_message("dense_to_ragged", "offsets", 1, -1, 0, 2)
    ):
        rk.dense_to_ragged(dense2, lengths=torch.tensor([-1, 3]))
    # A row longer than the dense row would leave output unwritten.
    with pytest.raises(
        IndexOutOfRangeError, match=_message("dense_to_ragged", "offsets", 2, 6, 1, 4)
    ):
        rk.dense_to_ragged(dense2, lengths=torch.tensor([1, 5]))
    got = rk.dense_to_ragged(dense2, lengths=torch.tensor([1, 3]))
    assert got.values.tolist() == [0, 3, 4, 5]


def test_hash_bytes_kernel_reports_bad_offsets(kernels):
    data = torch.tensor(list(b"abc"), dtype=torch.uint8)
    with pytest.raises(IndexOutOfRangeError, match=_message("hash_bytes", "offsets", 2, 9, 2, 3)):
        rk.hash_bytes(data, torch.tensor([0, 2, 9]))
    with pytest.raises(IndexOutOfRangeError, match=_message("hash_bytes", "offsets", 0, -4, 0, 3)):
        rk.hash_bytes(data, torch.tensor([-4, 3]))
    with pytest.raises(IndexOutOfRangeError, match=_message("hash_bytes", "offsets", 2, 1, 2, 3)):
        rk.hash_bytes(data, torch.tensor([0, 2, 1, 3]))
    # Offsets that leave bytes outside every string, refused by the CPU path too.
    for offsets, pos, value, low, high in (([1, 3], 0, 1, 0, 0), ([0, 2], 1, 2, 3, 3)):
        with pytest.raises(
            IndexOutOfRangeError, match=_message("hash_bytes", "offsets", pos, value, low, high)
        ):
            rk.hash_bytes(data, torch.tensor(offsets))
    good = torch.tensor([0, 2, 3])
    assert rk.hash_bytes(data, good, "murmur").tolist() == [
        rk.hash_strings(["ab"], "murmur").item(),
        rk.hash_strings(["c"], "murmur").item(),
    ]


def test_hash_bytes_cpu_path_names_position_and_value():
    data = torch.tensor(list(b"abc"), dtype=torch.uint8)
    with pytest.raises(IndexOutOfRangeError, match=_message("hash_bytes", "offsets", 2, 9, 0, 3)):
        rk.hash_bytes(data, torch.tensor([0, 2, 9]))
    with pytest.raises(IndexOutOfRangeError, match=_message("hash_bytes", "offsets", 2, 1, 2, 3)):
        rk.hash_bytes(data, torch.tensor([0, 2, 1, 3]))


@pytest.mark.parametrize("mode", ["sum", "mean", "tile"])
def test_segment_reduce_kernels_report_bad_offsets(kernels, mode):
    rows = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    tile = 2 if mode == "tile" else None
    with pytest.raises(
        IndexOutOfRangeError, match=_message("segment_reduce", "offsets", 2, 9, 2, 3)
    ):
        rk.segment_reduce(rows, torch.tensor([0, 2, 9]), mode=mode, tile_len=tile)
    got = rk.segment_reduce(rows, torch.tensor([0, 2, 3]), mode=mode, tile_len=tile)
    want = {
        "sum": [[2.0, 4.0], [4.0, 5.0]],
        "mean": [[1.0, 2.0], [4.0, 5.0]],
        "tile": [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 0.0, 0.0]],
    }[mode]
    assert got.tolist() == want


@pytest.mark.parametrize("mode", ["sum", "mean", "tile"])
def test_segment_reduce_kernels_report_rows_outside_every_segment(kernels, monkeypatch, mode):
    # Offsets not starting at 0 or ending before the last row leave rows in no segment: the
    # forward would ignore them and the backward give them no gradient (it left them
    # uninitialized), so the kernels report them.
    rows = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    tile = 2 if mode == "tile" else None
    for offsets, pos, value, low, high in (([1, 2, 3], 0, 1, 0, 0), ([0, 2, 2], 2, 2, 3, 3)):
        with pytest.raises(
            IndexOutOfRangeError, match=_message("segment_reduce", "offsets", pos, value, low, high)
        ):
            rk.segment_reduce(rows, torch.tensor(offsets), mode=mode, tile_len=tile)
        with monkeypatch.context() as mp:
            # As on a GPU: the launch returns, the error is read at the next check.
            mp.setattr(index_errors, "after_launch", lambda device: None)
            grad = segment_reduce._segment_reduce_backward_impl(
                torch.ones(2, 4 if tile else 2), torch.tensor(offsets), None, mode, tile or 0, 3
            )
        with pytest.raises(
            IndexOutOfRangeError,
            match=_message("segment_reduce (backward)", "offsets", pos, value, low, high),
        ):
            index_errors.check_index_errors("cpu")
        # Every row outside the segments gets a zero gradient, not whatever memory held.
        outside = [i for i in range(3) if not offsets[0] <= i < offsets[-1]]
        assert not grad[outside].any()


def test_feature_cross_kernel_reports_bad_offsets(kernels, monkeypatch):
    b = RaggedTensor(torch.tensor([7, 8]), torch.tensor([0, 1, 2]))
    a = RaggedTensor(torch.tensor([1]), torch.tensor([0, 1, 2]), validate=False)
    with pytest.raises(
        IndexOutOfRangeError, match=_message("feature_cross", "a offsets", 2, 2, 1, 1)
    ):
        rk.feature_cross(a, b)
    good = RaggedTensor(torch.tensor([1, 2]), torch.tensor([0, 1, 2]), torch.tensor([2.0, 3.0]))
    got = rk.feature_cross(good, b)
    monkeypatch.setattr(feature_cross, "use_cuda_kernels", lambda device: False)
    want = rk.feature_cross(good, b)
    assert got.values.tolist() == want.values.tolist()
    assert got.weights.tolist() == want.weights.tolist() == [2.0, 3.0]


# -- the error buffer ----------------------------------------------------------------------------


def _record(device, op, args, arg, pos, value, low, high):
    buf = index_errors.error_buffer(device)
    site = index_errors.site_id(op, args)
    buf.copy_(torch.tensor([1, site, arg, pos, value, low, high, 0]))


def test_error_buffer_size_matches_the_kernels():
    from recis_kernels._cuda import compiler

    header = (compiler._source_dir() / "recis_common.cuh").read_text()
    assert f"#define RECIS_ERR_WORDS {index_errors.ERR_WORDS}\n" in header


def test_check_index_errors_raises_once_and_clears():
    cpu = torch.device("cpu")
    index_errors.check_index_errors(cpu)  # nothing recorded
    _record(cpu, "some_op", ("a", "b"), 1, 7, -3, 0, 10)
    with pytest.raises(IndexOutOfRangeError, match=_message("some_op", "b", 7, -3, 0, 9)):
        rk.check_index_errors(cpu)
    rk.check_index_errors(cpu)
    rk.check_index_errors()


def test_ops_raise_recorded_errors_where_they_read_the_device():
    # host_ints is how the CUDA paths read sizes; it raises what earlier kernels recorded.
    cpu = torch.device("cpu")
    _record(cpu, "RowStore.gather", ("rows",), 0, 4, 99, 0, 64)
    with pytest.raises(
        IndexOutOfRangeError, match=_message("RowStore.gather", "rows", 4, 99, 0, 63)
    ):
        index_errors.host_int(torch.tensor([5]))
    assert index_errors.host_ints(torch.tensor([5, 6])) == [5, 6]
