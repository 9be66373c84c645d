from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recis_io import Dataset, InvalidArgumentError

from .conftest import write_ids

ROWS = [130, 0, 77, 200]  # an empty file in the middle is fine
TOTAL = sum(ROWS)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list:
    return write_ids(tmp_path_factory.mktemp("ids"), "parquet", ROWS, 32)


def ids(ds: Dataset) -> list[list[int]]:
    return [b["id"].tolist() for b in ds]


def test_plain_order_is_file_order(files) -> None:
    got = list(itertools.chain.from_iterable(ids(Dataset(files, batch_size=50))))
    assert got == list(range(TOTAL))


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world", [2, 3, 5])
def test_shards_are_disjoint_equal_and_cover(files, shuffle: bool, world: int) -> None:
    per_rank = []
    for rank in range(world):
        ds = Dataset(files, batch_size=16, shuffle=shuffle, seed=3, rank=rank, world_size=world)
        batches = ids(ds)
        assert len(batches) == ds.batches_per_epoch()
        per_rank.append([i for b in batches for i in b])
    assert len({len(r) for r in per_rank}) == 1
    assert len({len(ids) for ids in [per_rank[0]]}) == 1
    seen = [i for r in per_rank for i in r]
    assert len(seen) == len(set(seen)) == TOTAL - TOTAL % world
    assert set(seen) <= set(range(TOTAL))


def test_shuffle_is_a_seeded_permutation_per_epoch(files) -> None:
    ds = Dataset(files, batch_size=64, shuffle=True, seed=11, epochs=2, shuffle_window=50)
    flat = [i for b in ids(ds) for i in b]
    first, second = flat[:TOTAL], flat[TOTAL:]
    assert sorted(first) == sorted(second) == list(range(TOTAL))
    assert first != second
    assert first != list(range(TOTAL))
    again = Dataset(files, batch_size=64, shuffle=True, seed=11, epochs=2, shuffle_window=50)
    assert [i for b in ids(again) for i in b] == flat
    other = Dataset(files, batch_size=64, shuffle=True, seed=12, epochs=2, shuffle_window=50)
    assert [i for b in ids(other) for i in b] != flat


def test_order_does_not_depend_on_threads(files) -> None:
    runs = [
        ids(Dataset(files, batch_size=33, shuffle=True, seed=5, num_threads=t, prefetch=p))
        for t, p in [(1, 0), (2, 1), (4, 6)]
    ]
    assert runs[0] == runs[1] == runs[2]


@settings(max_examples=25, deadline=None)
@given(
    cut=st.integers(0, 40),
    shuffle=st.booleans(),
    threads=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    world=st.integers(1, 3),
    batch=st.sampled_from([7, 32, 100]),
    drop_last=st.booleans(),
)
def test_resume_is_exact(files, cut, shuffle, threads, world, batch, drop_last) -> None:
    rank = world - 1

    def make(t: int) -> Dataset:
        return Dataset(
            files,
            batch_size=batch,
            shuffle=shuffle,
            seed=9,
            shuffle_window=40,
            epochs=3,
            rank=rank,
            world_size=world,
            num_threads=t,
            drop_last=drop_last,
        )

    reference = ids(make(threads[0]))
    first = make(threads[0])
    head = []
    it = iter(first)
    for batch_ids in itertools.islice(it, cut):
        head.append(batch_ids["id"].tolist())
    state = json.loads(json.dumps(first.state_dict()))
    del it
    resumed = make(threads[1])
    resumed.load_state_dict(state)
    tail = ids(resumed)
    assert head + tail == reference


def test_new_iteration_restarts_without_loaded_state(files) -> None:
    ds = Dataset(files, batch_size=100)
    first = ids(ds)
    assert ds.state_dict()["row"] == TOTAL
    assert ds.state_dict()["epoch"] == 0
    assert ids(ds) == first


def test_state_from_another_setup_is_rejected(files) -> None:
    state = Dataset(files, batch_size=10, shuffle=True, seed=1).state_dict()
    with pytest.raises(InvalidArgumentError, match="seed"):
        Dataset(files, batch_size=10, shuffle=True, seed=2).load_state_dict(state)
    with pytest.raises(InvalidArgumentError, match="shards"):
        Dataset(files, batch_size=10, shuffle=True, seed=1, world_size=2, rank=0).load_state_dict(
            state
        )
    with pytest.raises(InvalidArgumentError, match="not a recis-io state"):
        Dataset(files, batch_size=10).load_state_dict({"epoch": 0})


def test_seed_and_window_are_free_to_change_on_resume_without_shuffle(files) -> None:
    # Without shuffle the order is file order whatever the seed and window: only with shuffle
    # does a state of another seed or window resume into another order.
    first = Dataset(files, batch_size=10, seed=1, shuffle_window=40)
    it = iter(first)
    head = [next(it)["id"].tolist() for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))
    del it
    resumed = Dataset(files, batch_size=10, seed=2, shuffle_window=7)
    resumed.load_state_dict(state)
    assert head + ids(resumed) == ids(Dataset(files, batch_size=10))
    shuffled = Dataset(files, batch_size=10, shuffle=True, seed=1, shuffle_window=40).state_dict()
    for other in ({"seed": 2}, {"shuffle_window": 7}):
        ((name, value),) = other.items()
        options = {"seed": 1, "shuffle_window": 40} | other
        message = rf"state has {name}=\d+, this dataset has {value}"
        with pytest.raises(InvalidArgumentError, match=message):
            Dataset(files, batch_size=10, shuffle=True, **options).load_state_dict(shuffled)


def test_state_of_another_rank_is_rejected(files) -> None:
    ds = Dataset(files, batch_size=10, world_size=2, rank=0)
    next(iter(ds))
    state = ds.state_dict()
    assert state["shard"] == 0
    with pytest.raises(InvalidArgumentError, match=r"state has shard=0, this dataset has 1"):
        Dataset(files, batch_size=10, world_size=2, rank=1).load_state_dict(state)
    Dataset(files, batch_size=10, world_size=2, rank=0).load_state_dict(state)


def test_state_of_other_files_is_rejected(tmp_path, files) -> None:
    state = json.loads(json.dumps(Dataset(files, batch_size=10).state_dict()))
    assert state["version"] == 4
    assert state["files"] == [[p.name, rows] for p, rows in zip(files, ROWS, strict=True)]
    # The same rows in differently named files, or one file's rows moved to another.
    for name in ("renamed", "moved", "empty", "copy"):
        (tmp_path / name).mkdir()
    renamed = write_ids(tmp_path / "renamed", "parquet", ROWS, 32)
    for i, p in enumerate(renamed):
        p.rename(p.with_name(f"other-{i}.parquet"))
    moved = write_ids(tmp_path / "moved", "parquet", [ROWS[0] - 1, 1, *ROWS[2:]], 32)
    with pytest.raises(InvalidArgumentError, match=r"state file 0 is \['part-0\.parquet', 130\]"):
        Dataset(sorted((tmp_path / "renamed").iterdir()), batch_size=10).load_state_dict(state)
    with pytest.raises(
        InvalidArgumentError,
        match=r"state file 0 is .* this dataset has \['part-0\.parquet', 129\]",
    ):
        Dataset(moved, batch_size=10).load_state_dict(state)
    # An extra empty file keeps total_rows, so the file list is what differs.
    empty = write_ids(tmp_path / "empty", "parquet", [0], 32)
    with pytest.raises(
        InvalidArgumentError, match=r"state was taken over 4 files, this dataset has 5"
    ):
        Dataset([*files, *empty], batch_size=10).load_state_dict(state)
    # The same files copied elsewhere resume.
    copy = write_ids(tmp_path / "copy", "parquet", ROWS, 32)
    Dataset(copy, batch_size=10).load_state_dict(state)


def test_state_names_files_by_their_path_below_the_common_directory(tmp_path) -> None:
    # Two partitions of same-named files with the same row counts: base names cannot tell
    # them apart, so a state taken over one order loaded over the other read a partition
    # twice and skipped the other.
    parts = []
    for day in ("dt=1", "dt=2"):
        (tmp_path / "data" / day).mkdir(parents=True)
        parts += write_ids(tmp_path / "data" / day, "parquet", [20], 8)
    ds = Dataset(tmp_path / "data", batch_size=10)
    it = iter(ds)
    first = next(it)["id"].tolist()
    state = json.loads(json.dumps(ds.state_dict()))
    assert state["files"] == [["dt=1/part-0.parquet", 20], ["dt=2/part-0.parquet", 20]]
    with pytest.raises(
        InvalidArgumentError,
        match=r"state file 0 is \['dt=1/part-0\.parquet', 20\] \(\[path, rows\]\), "
        r"this dataset has \['dt=2/part-0\.parquet', 20\]",
    ):
        Dataset(parts[::-1], batch_size=10).load_state_dict(state)
    # The same files in the same order resume, spelled as a list, a glob, or copied elsewhere.
    copy = tmp_path / "copy"
    (copy / "nested").mkdir(parents=True)
    (tmp_path / "data").rename(copy / "nested" / "data")
    for spelled in (
        sorted((copy / "nested" / "data").rglob("*.parquet")),
        str(copy / "nested" / "data" / "dt=*"),
    ):
        resumed = Dataset(spelled, batch_size=10)
        resumed.load_state_dict(state)
        rest = [i for b in ids(resumed) for i in b]
        assert sorted(first + rest) == sorted(2 * list(range(20)))
        assert len(first + rest) == 40


def test_state_of_version_three_checks_base_names(tmp_path) -> None:
    parts = []
    for day in ("dt=1", "dt=2"):
        (tmp_path / day).mkdir()
        parts += write_ids(tmp_path / day, "parquet", [20], 8)
    ds = Dataset(parts, batch_size=10)
    next(iter(ds))
    state = ds.state_dict() | {"version": 3}
    state["files"] = [["part-0.parquet", 20], ["part-0.parquet", 20]]
    resumed = Dataset(parts, batch_size=10)
    resumed.load_state_dict(state)
    assert next(iter(resumed))["id"].tolist() == list(range(10, 20))
    state["files"] = [["part-1.parquet", 20], ["part-0.parquet", 20]]
    with pytest.raises(InvalidArgumentError, match=r"state file 0 is \['part-1\.parquet', 20\]"):
        Dataset(parts, batch_size=10).load_state_dict(state)


def test_state_of_version_one_still_loads(files) -> None:
    ds = Dataset(files, batch_size=10)
    it = iter(ds)
    next(it)
    state = ds.state_dict()
    del it
    state = {k: v for k, v in state.items() if k != "files"} | {"version": 1}
    resumed = Dataset(files, batch_size=10)
    resumed.load_state_dict(state)
    assert next(iter(resumed))["id"].tolist() == list(range(10, 20))


def test_rank_defaults_from_environment(files, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    ds = Dataset(files, batch_size=10)
    assert (ds.rank, ds.world_size) == (1, 4)
    assert sum(len(b) for b in ids(ds)) == TOTAL // 4


def test_set_epoch_reads_that_epochs_order(files) -> None:
    def make(**kw) -> Dataset:
        return Dataset(files, batch_size=64, shuffle=True, seed=11, shuffle_window=50, **kw)

    flat = [i for b in ids(make(epochs=3)) for i in b]
    ds = make()
    assert [i for b in ids(ds) for i in b] == [i for b in ids(ds) for i in b]  # no set_epoch
    for epoch in range(3):
        ds.set_epoch(epoch)
        assert [i for b in ids(ds) for i in b] == flat[epoch * TOTAL : (epoch + 1) * TOTAL]
    two = make(epochs=2)
    two.set_epoch(1)
    assert [i for b in ids(two) for i in b] == flat[TOTAL:]


def test_a_state_taken_after_set_epoch_resumes_in_that_epoch(files) -> None:
    def make() -> Dataset:
        return Dataset(files, batch_size=32, shuffle=True, seed=5, shuffle_window=40)

    ds = make()
    ds.set_epoch(4)
    reference = ids(ds)
    ds.set_epoch(4)
    it = iter(ds)
    head = [next(it)["id"].tolist() for _ in range(3)]
    state = json.loads(json.dumps(ds.state_dict()))
    assert (state["epoch"], state["first_epoch"]) == (4, 4)
    del it
    resumed = make()
    resumed.load_state_dict(state)
    assert head + ids(resumed) == reference
    again = make()
    again.load_state_dict(state)
    again.set_epoch(4)  # the same epoch, as an epoch loop calls it: fine
    assert head + ids(again) == reference
    wrong = make()
    wrong.load_state_dict(state)
    wrong.set_epoch(7)
    with pytest.raises(InvalidArgumentError, match="resume from is in epoch 4, but this pass"):
        iter(wrong)


@pytest.mark.parametrize("epoch", [-1, 1.0, True, 2**63])
def test_set_epoch_checks_its_argument(files, epoch) -> None:
    with pytest.raises(InvalidArgumentError, match="set_epoch: epoch must be an int"):
        Dataset(files, batch_size=8).set_epoch(epoch)


def test_shuffled_epochs_leave_out_other_rows_each_epoch(tmp_path) -> None:
    # One row group of 10 rows over 3 ranks: one row an epoch is not read. It used to be the
    # row group's last row in every epoch, never trained on.
    paths = write_ids(tmp_path, "parquet", [10], 10)
    read: set[int] = set()
    for epoch in range(6):
        rows = []
        for rank in range(3):
            ds = Dataset(paths, batch_size=2, shuffle=True, seed=5, rank=rank, world_size=3)
            ds.set_epoch(epoch)
            rows += [i for b in ids(ds) for i in b]
        assert len(rows) == len(set(rows)) == 9
        read.update(rows)
    assert read == set(range(10))
