"""Every row exactly once per epoch, and exact resumes, over random small data sets.

Each example writes 1 to 5 files (Parquet and ORC mixed, row groups or stripes of random sizes,
empty files included) whose ``id`` column numbers the rows, and checks the reading plan's
contract: shards (ranks, and workers) are disjoint, equally sized and cover each epoch but
what ``drop_last`` and the ``total_rows % shards`` remainder document; the shuffled order is a
function of the seed and the epoch; a state taken after any batch resumes with exactly the
rest. The other columns carry per-column options (hash, fill, dtype, fixed-size and nested
lists) whose values are checked against pyarrow's for the row each id names.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from recis_io import Batch, Column, Dataset, InvalidArgumentError, Ragged, hash_bytes

SETTINGS = settings(
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# (format, rows, rows per row group or stripe) of each file.
FILES = st.lists(
    st.tuples(st.sampled_from(["parquet", "orc"]), st.integers(0, 60), st.integers(1, 25)),
    min_size=1,
    max_size=5,
)
COLUMNS = [
    "id",
    Column("key", hash="murmur", buckets=1000),
    Column("name", hash="farm"),
    Column("score", fill=-1),
    Column("small", dtype=torch.int64),
    "nested",
]


def _columns(spec: list[tuple[str, int, int]]) -> list[str | Column]:
    # ORC has no fixed-size lists: the (B, 2) column is read where every file is Parquet.
    return COLUMNS + ["pair"] * all(fmt == "parquet" for fmt, _, _ in spec)


def _table(start: int, rows: int, fmt: str) -> pa.Table:
    ids = list(range(start, start + rows))
    pair = pa.array([[i / 2, -i] for i in ids], pa.list_(pa.float32(), 2))
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "key": pa.array([f"k{i % 7}" for i in ids], pa.string()),
            "name": pa.array([f"user-{i}" * (i % 3) for i in ids], pa.string()),
            "score": pa.array([None if i % 5 == 0 else i * 3 for i in ids], pa.int32()),
            "small": pa.array([i % 100 - 50 for i in ids], pa.int8()),
            "nested": pa.array(
                [[[i] * (j + 1) for j in range(i % 3)] if i % 4 else None for i in ids],
                pa.list_(pa.list_(pa.int32())),
            ),
        }
        | ({"pair": pair} if fmt == "parquet" else {})
    )


def _write(tmp: Path, spec: list[tuple[str, int, int]]) -> tuple[list[Path], dict[int, dict]]:
    paths, expected, start = [], {}, 0
    for i, (fmt, rows, group) in enumerate(spec):
        table = _table(start, rows, fmt)
        path = tmp / f"part-{i}.{fmt}"
        if fmt == "parquet":
            pq.write_table(table, path, row_group_size=group)
        else:
            orc.write_table(table, path, stripe_size=max(64, group * 32))
        paths.append(path)
        for row in table.to_pylist():
            expected[row["id"]] = row
        start += rows
    return paths, expected


@pytest.fixture
def written() -> Iterator[Any]:
    with tempfile.TemporaryDirectory() as tmp:
        made: list[Path] = []

        def make(spec: list[tuple[str, int, int]]) -> tuple[list[Path], dict[int, dict]]:
            sub = Path(tmp) / str(len(made))
            sub.mkdir()
            made.append(sub)
            return _write(sub, spec)

        yield make


def _ragged_rows(r: Ragged) -> list:
    values = r.values.tolist()
    for offsets in reversed(r.offsets):
        o = offsets.tolist()
        values = [values[a:b] for a, b in itertools.pairwise(o)]
    return values


def _check_values(batch: Batch, expected: dict[int, dict]) -> None:
    ids = batch["id"].tolist()
    assert batch["key"].dtype == batch["name"].dtype == batch["small"].dtype == torch.int64
    for column in ("key", "name", "score", "small"):
        assert batch[column].shape == (len(ids),)
    if "pair" in batch:
        assert batch["pair"].shape == (len(ids), 2)
    nested = _ragged_rows(batch["nested"])
    for n, i in enumerate(ids):
        row = expected[i]
        assert batch["key"][n].item() == hash_bytes(row["key"].encode(), "murmur", 1000)
        assert batch["name"][n].item() == hash_bytes(row["name"].encode(), "farm")
        assert batch["score"][n].item() == (-1 if row["score"] is None else row["score"])
        assert batch["small"][n].item() == row["small"]
        if "pair" in batch:
            assert batch["pair"][n].tolist() == row["pair"]
        assert nested[n] == (row["nested"] or [])


def _flat(batches: list[list[int]]) -> list[int]:
    return [i for b in batches for i in b]


def _ids(ds: Any) -> list[list[int]]:
    return [b["id"].tolist() for b in ds]


@SETTINGS
@given(
    spec=FILES,
    batch=st.integers(1, 40),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**64 - 1),
    window=st.integers(1, 50),
    drop_last=st.booleans(),
    world=st.integers(1, 3),
    even=st.booleans(),
)
def test_each_epoch_reads_every_row_once(
    written, spec, batch, shuffle, seed, window, drop_last, world, even
) -> None:
    paths, expected = written(spec)
    total = len(expected)
    per_rank: list[list[int]] = []
    for rank in range(world):
        ds = Dataset(
            paths,
            batch_size=batch,
            columns=_columns(spec),
            shuffle=shuffle,
            seed=seed,
            shuffle_window=window,
            drop_last=drop_last,
            rank=rank,
            world_size=world,
            num_threads=2,
            epochs=2,
            even_shards=even,
        )
        batches = list(ds)
        got = [b["id"].tolist() for b in batches]
        for b in batches:
            _check_values(b, expected)
        per_epoch = ds.batches_per_epoch()
        assert len(got) == 2 * per_epoch
        epoch0 = got[:per_epoch]
        # Every batch is full but the last of an epoch (dropped by drop_last).
        assert all(len(b) == batch for b in epoch0[:-1])
        # Uneven shards: the first total % world ranks read a row more.
        shard = total // world + (not even and rank < total % world)
        kept = shard - shard % batch if drop_last else shard
        assert sum(map(len, epoch0)) == kept
        per_rank.append(_flat(epoch0))
        # The order is a function of the seed and the epoch: set_epoch(1) reads epoch 1.
        assert (
            _ids(
                Dataset(
                    paths,
                    batch_size=batch,
                    columns=["id"],
                    shuffle=shuffle,
                    seed=seed,
                    shuffle_window=window,
                    drop_last=drop_last,
                    rank=rank,
                    world_size=world,
                    num_threads=1,
                    epochs=2,
                    even_shards=even,
                )
            )
            == got
        )
        one = Dataset(
            paths,
            batch_size=batch,
            columns=["id"],
            shuffle=shuffle,
            seed=seed,
            shuffle_window=window,
            drop_last=drop_last,
            rank=rank,
            world_size=world,
            even_shards=even,
        )
        one.set_epoch(1)
        assert _ids(one) == got[per_epoch:]
        if not drop_last:  # rows are cut into batches after they are ordered
            other = Dataset(
                paths,
                batch_size=batch + 3,
                columns=["id"],
                shuffle=shuffle,
                seed=seed,
                shuffle_window=window,
                rank=rank,
                world_size=world,
                epochs=2,
                even_shards=even,
            )
            assert _flat(_ids(other)) == _flat(got)
        if shuffle and window >= 8 and kept >= 8:
            assert _flat(got[per_epoch:]) != _flat(epoch0)
        if not shuffle:
            assert got[per_epoch:] == epoch0
    everything = [i for ids in per_rank for i in ids]
    assert len(everything) == len(set(everything))
    assert set(everything) <= set(expected)
    if not drop_last:
        assert len(everything) == (total - total % world if even else total)
        if not shuffle:  # in file order the unread remainder is the data's tail
            assert sorted(everything) == list(range(len(everything)))
    if even:
        assert len({len(ids) for ids in per_rank}) == 1


@SETTINGS
@given(
    spec=FILES,
    batch=st.integers(1, 40),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**64 - 1),
    window=st.integers(1, 50),
    drop_last=st.booleans(),
    world=st.integers(1, 3),
    epochs=st.integers(1, 2),
    first_epoch=st.integers(0, 2),
    cut=st.floats(0, 1),
    threads=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    prefetch=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    even=st.booleans(),
)
def test_resume_continues_with_exactly_the_rest(
    written,
    spec,
    batch,
    shuffle,
    seed,
    window,
    drop_last,
    world,
    epochs,
    first_epoch,
    cut,
    threads,
    prefetch,
    even,
) -> None:
    paths, expected = written(spec)
    rank = (world - 1) if even else 0  # uneven: rank 0 may read a row more

    def make(which: int) -> Dataset:
        ds = Dataset(
            paths,
            batch_size=batch,
            columns=_columns(spec),
            shuffle=shuffle,
            seed=seed,
            shuffle_window=window,
            drop_last=drop_last,
            rank=rank,
            world_size=world,
            epochs=epochs,
            num_threads=threads[which],
            prefetch=prefetch[which],
            even_shards=even,
        )
        ds.set_epoch(first_epoch)
        return ds

    reference = _ids(make(0))
    k = round(cut * len(reference))
    first = make(0)
    it = iter(first)
    head = [next(it)["id"].tolist() for _ in range(k)]
    state = json.loads(json.dumps(first.state_dict()))
    del it
    resumed = make(1)
    resumed.load_state_dict(state)
    tail = list(resumed)
    for b in tail:
        _check_values(b, expected)
    assert head + [b["id"].tolist() for b in tail] == reference
    # The resumed dataset's own state then matches the uninterrupted one's.
    whole = make(0)
    _ids(whole)
    assert resumed.state_dict() == whole.state_dict()


def _resume(make: Any, cut: int, *, set_epoch: int | None = None) -> tuple[list, Dataset]:
    """The first ``cut`` batches of ``make()`` and a new dataset loaded with the state after."""
    first = make()
    it = iter(first)
    head = [next(it)["id"].tolist() for _ in range(cut)]
    state = json.loads(json.dumps(first.state_dict()))
    del it
    resumed = make()
    resumed.load_state_dict(state)
    if set_epoch is not None:
        resumed.set_epoch(set_epoch)
    return head, resumed


@pytest.mark.parametrize("shuffle", [False, True])
def test_cuts_at_file_boundaries_and_at_the_end(written, shuffle: bool) -> None:
    # Batches of 10 over files of 20, 0, 30 and 10 rows (row groups of 10): cuts after
    # batches 2, 5 and 6 fall on file boundaries, after 6 on the end of the epoch.
    paths, _ = written([("parquet", 20, 10), ("orc", 0, 1), ("orc", 30, 10), ("parquet", 10, 5)])

    def make() -> Dataset:
        return Dataset(paths, batch_size=10, columns=["id"], shuffle=shuffle, seed=4, epochs=2)

    reference = _ids(make())
    assert len(reference) == 12
    for cut in (2, 5, 6, 8, 11, 12):
        head, resumed = _resume(make, cut)
        assert head + _ids(resumed) == reference, cut


def test_a_state_of_another_batch_size_is_refused(written) -> None:
    # Rows 0..19 read in batches of 10, then 20..23 in a batch of 4 although drop_last asks
    # for batches of 7 only: the state's batch boundaries are not this dataset's.
    paths, _ = written([("parquet", 24, 5)])
    ds = Dataset(paths, batch_size=10, columns=["id"], drop_last=True)
    it = iter(ds)
    next(it), next(it)
    state = ds.state_dict()
    other = Dataset(paths, batch_size=7, columns=["id"], drop_last=True)
    with pytest.raises(InvalidArgumentError, match="state has batch_size=10, this dataset has 7"):
        other.load_state_dict(state)
    same = Dataset(paths, batch_size=10, columns=["id"], drop_last=True)
    same.load_state_dict(state)
    assert _ids(same) == []


def test_a_state_of_other_shards_is_refused_and_older_states_had_even_shards(written) -> None:
    # 10 rows over 3 ranks: uneven, rank 0 reads rows 0..3; even, rows 0..2.
    paths, _ = written([("parquet", 10, 5)])

    def make(even: bool) -> Dataset:
        return Dataset(paths, batch_size=2, columns=["id"], rank=0, world_size=3, even_shards=even)

    ds = make(False)
    assert _ids(ds) == [[0, 1], [2, 3]]
    assert ds.batches_per_epoch() == 2
    assert make(True).batches_per_epoch() == 2
    assert _ids(make(True)) == [[0, 1], [2]]
    ds = make(False)
    it = iter(ds)
    next(it)
    state = json.loads(json.dumps(ds.state_dict()))
    assert state["even_shards"] is False
    with pytest.raises(
        InvalidArgumentError, match="state has even_shards=False, this dataset has True"
    ):
        make(True).load_state_dict(state)
    resumed = make(False)
    resumed.load_state_dict(state)
    assert _ids(resumed) == [[2, 3]]
    # A state from before the option (no even_shards) was taken on even shards.
    even = make(True)
    it = iter(even)
    next(it)
    old = {k: v for k, v in even.state_dict().items() if k != "even_shards"}
    with pytest.raises(InvalidArgumentError, match="state has even_shards=True"):
        make(False).load_state_dict(old)
    resumed = make(True)
    resumed.load_state_dict(old)
    assert _ids(resumed) == [[2]]


def test_a_state_of_another_drop_last_is_refused(written) -> None:
    # 24 rows in batches of 10: with drop_last the epoch ends after row 20, so its end-of-epoch
    # state resumed without drop_last read rows 20..23 as a stray batch.
    paths, _ = written([("parquet", 24, 5)])

    def make(drop_last: bool, epochs: int = 1) -> Dataset:
        return Dataset(paths, batch_size=10, columns=["id"], drop_last=drop_last, epochs=epochs)

    ds = make(True)
    assert _ids(ds) == [list(range(10)), list(range(10, 20))]
    state = json.loads(json.dumps(ds.state_dict()))
    assert (state["version"], state["drop_last"]) == (4, True)
    with pytest.raises(
        InvalidArgumentError, match="state has drop_last=True, this dataset has False"
    ):
        make(False).load_state_dict(state)
    same = make(True)
    same.load_state_dict(state)
    assert _ids(same) == []
    # The other way round too: the state's epoch ends 4 rows after this dataset's.
    ds = make(False)
    _ids(ds)
    state = ds.state_dict()
    with pytest.raises(
        InvalidArgumentError, match="state has drop_last=False, this dataset has True"
    ):
        make(True, epochs=2).load_state_dict(state)
    # A version 2 state does not record drop_last and loads as before.
    old = {k: v for k, v in state.items() if k != "drop_last"} | {"version": 2}
    resumed = make(False, epochs=2)
    resumed.load_state_dict(old)
    assert _flat(_ids(resumed)) == list(range(24))


def test_epochs_and_columns_are_free_to_change_on_resume(written) -> None:
    # Documented as free: epochs sets where the pass ends and columns what each row holds,
    # neither which rows an epoch reads nor their order.
    paths, _ = written([("parquet", 25, 5), ("orc", 12, 4)])

    def make(epochs: int, columns: list[str | Column]) -> Dataset:
        return Dataset(paths, batch_size=7, columns=columns, shuffle=True, seed=3, epochs=epochs)

    reference = _ids(make(3, ["id"]))
    first = make(2, ["id", "key"])
    it = iter(first)
    head = [next(it)["id"].tolist() for _ in range(8)]
    state = json.loads(json.dumps(first.state_dict()))
    del it
    resumed = make(3, ["id", Column("name", hash="farm")])
    resumed.load_state_dict(state)
    assert head + _ids(resumed) == reference


@pytest.mark.parametrize("drop_last", [False, True])
def test_a_state_after_an_epochs_last_batch_resumes_in_the_next_epoch(
    written, drop_last: bool
) -> None:
    # An epoch loop that checkpoints after each pass resumes with set_epoch(next epoch).
    paths, _ = written([("parquet", 25, 5), ("orc", 12, 4)])

    def make() -> Dataset:
        return Dataset(paths, batch_size=10, columns=["id"], shuffle=True, drop_last=drop_last)

    ds = make()
    ds.set_epoch(3)
    epoch3 = _ids(ds)
    head, resumed = _resume(lambda: _at(make(), 2), len(_ids(_at(make(), 2))), set_epoch=3)
    assert _ids(resumed) == epoch3 != head
    # Mid-epoch, another epoch is still an error naming both.
    head, resumed = _resume(lambda: _at(make(), 2), 1, set_epoch=3)
    with pytest.raises(InvalidArgumentError, match="resume from is in epoch 2, but this pass"):
        iter(resumed)


def test_a_state_of_a_later_epoch_is_refused_by_an_earlier_pass(written) -> None:
    # A state in the middle of epoch 1 with set_epoch(0) (or epochs=1 from epoch 0) read
    # nothing instead: the rest of epoch 1 was skipped without a word.
    paths, _ = written([("parquet", 25, 5)])

    def make() -> Dataset:
        return Dataset(paths, batch_size=4, columns=["id"], shuffle=True)

    _, resumed = _resume(lambda: _at(make(), 1), 1, set_epoch=0)
    with pytest.raises(
        InvalidArgumentError,
        match=r"resume from is in epoch 1, but this pass reads epochs 0 to 0 \(set_epoch\(0\), "
        r"epochs=1\)",
    ):
        iter(resumed)
    _, resumed = _resume(lambda: _at(make(), 1), 1)
    assert _ids(resumed)  # without set_epoch, the state resumes its own epoch
    # A state of epoch 1 of a pass of 3 epochs from 0, loaded with epochs=1 and no set_epoch:
    # the message named a set_epoch(0) never called.
    ds = Dataset(paths, batch_size=4, columns=["id"], shuffle=True, epochs=3)
    it = iter(ds)
    for _ in range(9):  # 25 rows: 7 batches an epoch, so 2 into epoch 1
        next(it)
    state = ds.state_dict()
    shorter = Dataset(paths, batch_size=4, columns=["id"], shuffle=True, epochs=1)
    shorter.load_state_dict(state)
    with pytest.raises(
        InvalidArgumentError,
        match=r"\(the loaded state's pass began at epoch 0, epochs=1\); call set_epoch with the "
        r"epoch the state was taken in, or read with epochs=2 or more",
    ):
        iter(shorter)


def _at(ds: Dataset, epoch: int) -> Dataset:
    ds.set_epoch(epoch)
    return ds


# Python 3.12+ warns when forking a process that runs threads; forking is what is tested.
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
@settings(SETTINGS, max_examples=4)
@given(
    spec=FILES,
    batch=st.integers(1, 20),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    world=st.integers(1, 3),
    workers=st.integers(1, 2),
    even=st.booleans(),
)
def test_dataloader_workers_split_each_epoch_exactly_once(
    written, spec, batch, shuffle, drop_last, world, workers, even
) -> None:
    paths, expected = written(spec)
    shards = world * workers

    def kept(shard: int) -> int:
        rows = len(expected) // shards + (not even and shard < len(expected) % shards)
        return rows - rows % batch if drop_last else rows

    seen: list[int] = []
    for rank in range(world):
        ds = Dataset(
            paths,
            batch_size=batch,
            columns=_columns(spec),
            shuffle=shuffle,
            seed=8,
            shuffle_window=16,
            drop_last=drop_last,
            rank=rank,
            world_size=world,
            num_threads=1,
            even_shards=even,
        )
        ds.set_epoch(1)
        loader = DataLoader(
            ds, batch_size=None, num_workers=workers, multiprocessing_context="fork"
        )
        batches = list(loader)
        for b in batches:
            _check_values(b, expected)
        assert len(batches) == ds.batches_per_epoch(num_workers=workers)
        ids = [i for b in batches for i in b["id"].tolist()]
        assert len(ids) == sum(kept(rank * workers + w) for w in range(workers))
        seen += ids
    assert len(seen) == len(set(seen))
    assert set(seen) <= set(expected)
    if even is False and not drop_last:
        assert sorted(seen) == sorted(expected)


def test_a_state_taken_after_set_epoch_starts_that_epoch(written) -> None:
    paths, _ = written([("parquet", 25, 5), ("orc", 12, 4)])

    def make() -> Dataset:
        return Dataset(paths, batch_size=10, columns=["id"], shuffle=True, seed=2)

    orders = {}
    for epoch in (2, 3):
        ds = _at(make(), epoch)
        orders[epoch] = _ids(ds)
    # Before any pass: the state is the start of epoch 2, with or without set_epoch on load.
    fresh = _at(make(), 2)
    state = json.loads(json.dumps(fresh.state_dict()))
    assert (state["epoch"], state["row"], state["first_epoch"]) == (2, 0, 2)
    for again in (None, 2):
        resumed = make()
        resumed.load_state_dict(state)
        if again is not None:
            resumed.set_epoch(again)
        assert _ids(resumed) == orders[2]
    # After a finished pass and set_epoch(3): the next iteration reads epoch 3, and so does
    # a dataset loaded with the state.
    ds = _at(make(), 2)
    _ids(ds)
    ds.set_epoch(3)
    state = json.loads(json.dumps(ds.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    assert _ids(resumed) == _ids(ds) == orders[3]


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")
def test_stateful_dataloader_resumes_workers_after_set_epoch(written) -> None:
    # What the guide promises for workers: torchdata's StatefulDataLoader keeps each worker's
    # state, also in a pass after set_epoch and with drop_last, at any cut.
    from torchdata.stateful_dataloader import StatefulDataLoader

    paths, _ = written([("parquet", 47, 5), ("orc", 30, 7), ("parquet", 0, 3)])

    def loader() -> StatefulDataLoader:
        ds = Dataset(
            paths, batch_size=7, columns=["id"], shuffle=True, seed=3, shuffle_window=9,
            drop_last=True, num_threads=1,
        )  # fmt: skip
        ds.set_epoch(2)
        return StatefulDataLoader(
            ds, batch_size=None, num_workers=2, multiprocessing_context="fork"
        )

    full = _ids(loader())
    assert len(full) == 10
    for cut in (0, 3, 9, 10):
        first = loader()
        it = iter(first)
        head = [next(it)["id"].tolist() for _ in range(cut)]
        state = first.state_dict()
        del it, first
        resumed = loader()
        resumed.load_state_dict(state)
        assert head + _ids(resumed) == full, cut


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")
def test_stateful_dataloader_resumes_an_epoch_loop_after_its_last_batch(
    written, persistent: bool
) -> None:
    # A loop that checkpoints the loader after each epoch resumes with set_epoch(next): each
    # worker loads its end-of-epoch state when the pass starts, after set_epoch, and that load
    # used to overwrite the epoch every process shares, so the pass read the old epoch again.
    from torchdata.stateful_dataloader import StatefulDataLoader

    paths, _ = written([("parquet", 40, 6), ("orc", 23, 5)])

    def loader() -> tuple[Dataset, StatefulDataLoader]:
        ds = Dataset(paths, batch_size=6, columns=["id"], shuffle=True, seed=4, num_threads=1)
        return ds, StatefulDataLoader(
            ds, batch_size=None, num_workers=2, multiprocessing_context="fork",
            persistent_workers=persistent,
        )  # fmt: skip

    ds, first = loader()
    orders = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        orders.append(_ids(first))
    assert orders[0] != orders[1] != orders[2]
    ds, first = loader()
    ds.set_epoch(0)
    _ids(first)
    state = first.state_dict()
    del first
    ds, resumed = loader()
    resumed.load_state_dict(state)
    for epoch in (1, 2):
        ds.set_epoch(epoch)
        assert _ids(resumed) == orders[epoch], epoch


def test_set_epoch_and_load_state_dict_may_come_in_either_order(written) -> None:
    paths, _ = written([("parquet", 25, 5), ("orc", 12, 4)])

    def make() -> Dataset:
        return Dataset(paths, batch_size=10, columns=["id"], shuffle=True, seed=6)

    epoch1 = _ids(_at(make(), 1))
    ended = make()
    _ids(ended)
    end_of_0 = json.loads(json.dumps(ended.state_dict()))
    mid = _at(make(), 1)
    it = iter(mid)
    head = [next(it)["id"].tolist()]
    mid_of_1 = json.loads(json.dumps(mid.state_dict()))
    del it
    for state, rest in ((end_of_0, epoch1), (mid_of_1, epoch1[1:])):
        resumed = _at(make(), 1)
        resumed.load_state_dict(state)
        assert resumed.state_dict()["first_epoch"] == 1
        assert _ids(resumed) == rest
    assert head + epoch1[1:] == epoch1
    # A state of another epoch than the one set is still refused, in either order.
    resumed = _at(make(), 2)
    resumed.load_state_dict(mid_of_1)
    with pytest.raises(InvalidArgumentError, match="resume from is in epoch 1, but this pass"):
        iter(resumed)
