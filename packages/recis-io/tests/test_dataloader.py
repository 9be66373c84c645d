from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator, Mapping

import pytest
import torch
from torch.utils.data import DataLoader

from recis_io import Batch, Column, Dataset, ForkedReaderError, InvalidArgumentError, Ragged

from .conftest import write_ids

ROWS = [300, 250]
# Python 3.12+ warns when forking a process that runs threads (ours, torch's); the tests here
# fork on purpose to show it is handled.
FORK_WARNING = "ignore:.*fork.*:DeprecationWarning"
CONTEXTS = [
    pytest.param(
        "fork",
        marks=pytest.mark.skipif(
            "fork" not in multiprocessing.get_all_start_methods(), reason="no fork"
        ),
    ),
    "spawn",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list:
    return write_ids(tmp_path_factory.mktemp("dl"), "parquet", ROWS, 64)


def _ids(loader: DataLoader) -> list[int]:
    return [i for batch in loader for i in batch["id"].tolist()]


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.filterwarnings(FORK_WARNING)
def test_workers_read_disjoint_shares(files, context: str) -> None:
    ds = Dataset(files, batch_size=32, num_threads=2)
    # Threads started in the parent must not break forked children: iterate once first.
    assert len(next(iter(ds))) == 32
    loader = DataLoader(
        ds,
        batch_size=None,
        num_workers=2,
        multiprocessing_context=context,
    )
    got = _ids(loader)
    assert len(got) == len(set(got)) == sum(ROWS) - sum(ROWS) % 2
    assert all(0 <= i < sum(ROWS) for i in got)


@pytest.mark.filterwarnings(FORK_WARNING)
def test_iterator_used_across_fork_raises_clearly(files) -> None:
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork")
    it = iter(Dataset(files, batch_size=16))
    next(it)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report what using the parent's iterator does
        try:
            next(it)
            code = b"no error"
        except ForkedReaderError as e:
            code = b"ok" if "spawn" in str(e) else b"bad message"
        except BaseException:  # anything else is a failure the parent must see
            code = b"other error"
        os.write(write, code)
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.read(read, 64) == b"ok"
    assert status == 0
    # The parent's iterator keeps working.
    assert next(it)["id"].tolist() == list(range(16, 32))


def _wait_for(pid: int, seconds: float) -> int | None:
    """The exit code of child `pid`, or None when it is still running after `seconds` (it is
    then killed)."""
    deadline = time.monotonic() + seconds
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.02)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.filterwarnings(FORK_WARNING)
def test_forked_child_drops_its_copy_of_a_running_reader(files, tmp_path, shuffle: bool) -> None:
    # A forked child holds copies of the parent's running reader (its iterator, the dataset,
    # a batch) but none of the threads behind them. Dropping the copies must neither join
    # those threads nor take their locks: before, the child panicked here ("threads should
    # not terminate unexpectedly", swallowed as an unraisable error) or could hang.
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork")
    ds = Dataset(files, batch_size=16, shuffle=shuffle, seed=3, num_threads=2, prefetch=4)
    it = iter(ds)
    kept = next(it)
    stderr = tmp_path / "child-stderr"
    pid = os.fork()
    if pid == 0:  # child: drop every copy; anything printed on stderr is a failure
        code = 1
        try:
            fd = os.open(stderr, os.O_WRONLY | os.O_CREAT)
            os.dup2(fd, 2)
            del it, kept, ds
            gc.collect()
            code = 0
        finally:
            os._exit(code)
    code = _wait_for(pid, 60)
    assert code is not None, "the child hung dropping its copy of the reader"
    assert code == 0
    assert stderr.read_text() == ""
    # The parent's reader is untouched.
    expected = list(Dataset(files, batch_size=16, shuffle=shuffle, seed=3))
    assert kept["id"].tolist() == expected[0]["id"].tolist()
    assert next(it)["id"].tolist() == expected[1]["id"].tolist()


def test_batches_keep_memory_alive_after_iteration_ends(files) -> None:
    kept = list(Dataset(files, batch_size=100))
    assert torch.cat([b["id"] for b in kept]).tolist() == list(range(sum(ROWS)))


# torchdata calls a torch API that newer torch releases deprecate.
@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")
def test_stateful_dataloader_resumes_every_worker_exactly(files) -> None:
    # torchdata's StatefulDataLoader keeps each worker's Dataset.state_dict(): stopping after a
    # few batches and resuming in new worker processes continues the same sequence.
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader() -> StatefulDataLoader:
        ds = Dataset(files, batch_size=16, shuffle=True, seed=1, shuffle_window=40)
        return StatefulDataLoader(
            ds, batch_size=None, num_workers=2, multiprocessing_context="spawn"
        )

    full = [b["id"].tolist() for b in loader()]
    first = loader()
    it = iter(first)
    head = [next(it)["id"].tolist() for _ in range(5)]
    state = first.state_dict()
    # The first loader is read to its end, not dropped with batches in flight: a spawned
    # worker shut down mid-stream can die of SIGABRT as it exits ("terminate called without
    # an active exception"), with a plain torch dataset too (docs/io/guide.md); taking a
    # state must not change the rest of the pass either.
    assert head + [b["id"].tolist() for b in it] == full
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [b["id"].tolist() for b in resumed]
    assert head + rest == full
    assert len({i for b in full for i in b}) == sum(len(b) for b in full)


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_keep_their_type_through_a_dataloader(files, workers: int) -> None:
    from recis_io import Batch

    loader = DataLoader(
        Dataset(files, batch_size=50),
        batch_size=None,
        num_workers=workers,
        multiprocessing_context="spawn" if workers else None,
    )
    batches = list(loader)
    assert all(type(b) is Batch for b in batches)
    assert all(len(b) == b["id"].shape[0] for b in batches)
    assert [len(b) for b in batches[:5]] == [50] * 5
    first = batches[0]
    assert first.to_arrow().num_rows == 50
    assert first["id"].data_ptr() == first.buffer.data_ptr()
    ids = sorted(i for b in batches for i in b["id"].tolist())
    assert ids == list(range(sum(ROWS)))


def test_batch_from_other_columns_is_a_type_error(files) -> None:
    from recis_io import Batch

    batch = next(iter(Dataset(files, batch_size=10)))
    assert Batch(dict(batch.items())) is not batch
    assert len(Batch(dict(batch.items()))) == 10
    with pytest.raises(TypeError, match="columns of an existing batch"):
        Batch({"id": batch["id"].clone(), "seq": batch["seq"]})
    with pytest.raises(TypeError, match="columns of an existing batch"):
        Batch({"id": batch["id"]})


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.filterwarnings(FORK_WARNING)
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_batches_per_epoch_counts_the_loaders_workers(files, drop_last: bool) -> None:
    # 550 rows, 2 ranks, 3 workers: shards of 91 rows, 3 batches of 32 (2 when dropping the
    # last), so each rank's loader yields 9 (or 6) batches, not ceil(275 / 32) = 9 (or 8).
    seen: list[int] = []
    for rank in range(2):
        ds = Dataset(
            files, batch_size=32, num_threads=1, rank=rank, world_size=2, drop_last=drop_last
        )
        batches = list(DataLoader(ds, batch_size=None, num_workers=3))
        assert len(batches) == ds.batches_per_epoch(num_workers=3) == (6 if drop_last else 9)
        assert ds.batches_per_epoch() == (8 if drop_last else 9)
        seen += [i for b in batches for i in b["id"].tolist()]
    assert len(seen) == len(set(seen)) == 6 * (91 - 91 % 32 if drop_last else 91)


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.filterwarnings(FORK_WARNING)
def test_set_epoch_reaches_persistent_workers(files, context: str) -> None:
    # Persistent workers keep their copy of the dataset for the whole run; the epoch set in
    # the main process before each pass must still decide their order.
    def epochs(persistent: bool) -> list[list[int]]:
        ds = Dataset(files, batch_size=16, shuffle=True, seed=3, shuffle_window=40)
        loader = DataLoader(
            ds,
            batch_size=None,
            num_workers=2,
            multiprocessing_context=context,
            persistent_workers=persistent,
        )
        got = []
        for epoch in range(2):
            ds.set_epoch(epoch)
            got.append(_ids(loader))
        return got

    persistent = epochs(True)
    assert persistent == epochs(False)
    assert persistent[0] != persistent[1]
    assert sorted(persistent[0]) == sorted(persistent[1])


def _can_pin() -> bool:
    try:
        torch.empty(1).pin_memory()
    except RuntimeError:
        return False
    return True


def _ragged_batch(tmp_path) -> Batch:
    import pyarrow as pa

    from .conftest import write

    rows = [[1, 2], [], [3], None, [4, 5, 6]]
    table = pa.table({"h": pa.array(rows, pa.list_(pa.int64())), "s": ["a", "bc", "", "d", "e"]})
    path = write(table, tmp_path / "r.parquet", "parquet", 5)
    return next(iter(Dataset(path, batch_size=5, columns=["h", Column("s", fill="")])))


def _same(a: Ragged, b: Ragged) -> bool:
    return (
        a.values.tolist() == b.values.tolist()
        and len(a.offsets) == len(b.offsets)
        and all(x.tolist() == y.tolist() for x, y in zip(a.offsets, b.offsets, strict=True))
    )


def test_ragged_columns_pin_like_tensors(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``DataLoader(pin_memory=True)`` pins what it finds through each object's own
    ``pin_memory()``: a ragged column (in a batch, or in a dict a collate function made) pins
    its tensors and stays a ``Ragged``; without CUDA it raises what a tensor raises."""
    from torch.utils.data._utils.pin_memory import pin_memory

    batch = _ragged_batch(tmp_path)
    col = batch["h"]
    assert not col.is_pinned()
    assert not batch.is_pinned()
    if not _can_pin():
        with pytest.raises(RuntimeError) as plain:
            torch.empty(1).pin_memory()
        with pytest.raises(type(plain.value)):
            col.pin_memory()
        # What torch does where it can pin, copying into page-locked memory, stood in for by a
        # copy that records what it pinned, to check what a ragged column pins and returns.
        pinned: set[int] = set()

        def fake_pin(self: torch.Tensor, *args: object) -> torch.Tensor:
            out = self.clone()
            pinned.add(out.data_ptr())
            return out

        monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
        monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: self.data_ptr() in pinned)
    for name in ("h", "s"):
        got = pin_memory({name: batch[name]})[name]
        assert type(got) is Ragged
        assert got.is_pinned()
        assert _same(got, batch[name])
        assert got.pin_memory() is got  # pinned already: no second copy
    whole = pin_memory(batch)
    if not _loader_pins_mappings_whole():
        # torch 2.6 pins a mapping's columns one by one: a plain dict of pinned columns.
        assert type(whole) is dict
        assert list(whole) == list(batch)
        assert all(v.is_pinned() for v in whole.values())
        assert _same(whole["h"], col)
        return
    assert type(whole) is Batch
    assert whole.is_pinned()
    assert _same(whole["h"], col)


def _loader_pins_mappings_whole() -> bool:
    """Whether torch's DataLoader pinning calls a mapping's own ``pin_memory()`` (torch 2.15
    does; torch 2.6 pins its items one by one and rebuilds the mapping)."""
    from torch.utils.data._utils.pin_memory import pin_memory

    class Probe(Mapping[str, object]):
        def __getitem__(self, key: str) -> object:
            raise KeyError(key)

        def __iter__(self) -> Iterator[str]:
            return iter(())

        def __len__(self) -> int:
            return 0

        def pin_memory(self) -> Probe:
            return self

    probe = Probe()
    try:
        return pin_memory(probe) is probe
    except Exception:
        return False


@pytest.mark.filterwarnings(FORK_WARNING)
def test_a_state_loaded_in_the_main_process_is_refused_by_workers(files) -> None:
    # Each worker got the main process's cursor for its own shard and resumed at that row of
    # it, silently skipping rows (worker 1 read from row 50 of its shard of 275).
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork")
    first = Dataset(files, batch_size=10, num_threads=1)
    it = iter(first)
    for _ in range(5):
        next(it)
    state = first.state_dict()
    del it
    ds = Dataset(files, batch_size=10, num_threads=1)
    ds.load_state_dict(state)
    loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork")
    with pytest.raises(InvalidArgumentError, match=r"taken on shard 0 of 1, but this pass reads"):
        _ids(loader)
    # Without workers the state is this dataset's to resume.
    assert _ids(DataLoader(ds, batch_size=None)) == list(range(50, sum(ROWS)))


@pytest.mark.parametrize(
    "device",
    [
        "pinned",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ),
    ],
)
@pytest.mark.filterwarnings(FORK_WARNING)
def test_pinned_and_cuda_batches_are_refused_in_workers(files, device: str) -> None:
    # A forked worker cannot initialize CUDA once its parent has, and a pinned batch sent from
    # a worker arrives in shared memory, no longer pinned: the loader's pin_memory does it.
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork")
    ds = Dataset(files, batch_size=50, num_threads=1, device=device)
    loader = DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="fork")
    with pytest.raises(
        InvalidArgumentError,
        match=rf"device='{device}' cannot be used in DataLoader workers: read with device='cpu'"
        r" there and give the DataLoader pin_memory=True",
    ):
        _ids(loader)
    # Without workers the dataset reads on (pinned or CUDA where CUDA is, plain memory here).
    assert len(_ids(DataLoader(ds, batch_size=None))) == sum(ROWS)
