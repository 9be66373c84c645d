"""An iterator interrupted inside next(), shared by two threads, and tampered cursors."""

from __future__ import annotations

import threading

import pytest

import recis_io._dataset as dataset_module
from recis_io import Dataset, InvalidArgumentError

from .conftest import write_ids

ROWS = [120, 80]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list:
    return write_ids(tmp_path_factory.mktemp("it"), "parquet", ROWS, 32)


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_batch_interrupted_in_next_is_given_by_the_next_call(files, monkeypatch, shuffle):
    # A KeyboardInterrupt raised after the reader filled a batch lost it, and the cursor had
    # already moved past it (a checkpoint taken on Ctrl-C skipped it on resume).
    def read(interrupt_at: int | None) -> tuple[list[int], list[dict]]:
        ds = Dataset(files, batch_size=25, num_threads=2, shuffle=shuffle, seed=3)
        made = {"n": 0}
        real = dataset_module.Batch

        def batch(*args, **kwargs):
            made["n"] += 1
            if made["n"] == interrupt_at:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(dataset_module, "Batch", batch)
        ids, states = [], []
        it = iter(ds)
        while True:
            try:
                b = next(it)
            except KeyboardInterrupt:
                states.append(ds.state_dict())
                continue
            except StopIteration:
                break
            ids += b["id"].tolist()
            states.append(ds.state_dict())
        return ids, states

    whole, states = read(None)
    interrupted, seen = read(3)
    assert interrupted == whole
    # The state taken at the interrupt is the one after batch 2, not after batch 3.
    assert seen[2] == states[1]
    assert sorted(whole) == list(range(sum(ROWS)))


class _LosesOneFill:
    """A reader whose ``fill_owned`` result is lost once on its way back (an exception raised
    after the call returned, before Python stored the batch)."""

    def __init__(self, reader, lose_at: int) -> None:
        self._reader, self._lose_at, self._calls = reader, lose_at, 0

    def fill_owned(self):
        got = self._reader.fill_owned()
        self._calls += 1
        if self._calls == self._lose_at:
            raise KeyboardInterrupt
        return got

    def __getattr__(self, name):
        return getattr(self._reader, name)


@pytest.mark.parametrize("where", ["fill_owned returned", "from_dlpack converted"])
def test_a_batch_lost_on_its_way_out_of_the_reader_is_given_again(files, monkeypatch, where):
    # The reader had moved on: the batch was gone, and the iteration ended a batch short
    # without a word (a Ctrl-C landing there in a notebook lost 25 rows).
    ds = Dataset(files, batch_size=25, num_threads=2)
    whole = [i for b in ds for i in b["id"].tolist()]
    it = iter(ds)
    if where == "fill_owned returned":
        it._reader = _LosesOneFill(it._reader, lose_at=3)
    else:
        real, calls = dataset_module.torch.utils.dlpack.from_dlpack, {"n": 0}

        def convert(capsule):
            tensor = real(capsule)  # the capsule is consumed: only the reader can give it again
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return tensor

        monkeypatch.setattr(dataset_module.torch.utils.dlpack, "from_dlpack", convert)
    got, interrupts = [], 0
    while True:
        try:
            got += next(it)["id"].tolist()
        except KeyboardInterrupt:
            interrupts += 1
            assert ds.state_dict()["row"] == 50  # the cursor stays after batch 2
        except StopIteration:
            break
    assert interrupts == 1
    assert got == whole


def test_one_iterator_shared_by_two_threads_gives_every_row_once(files):
    # PyO3 refused the second thread's call with a bare "RuntimeError: Already borrowed".
    ds = Dataset(files, batch_size=10, num_threads=2)
    it = iter(ds)
    got: list[int] = []
    errors: list[BaseException] = []

    def pull() -> None:
        try:
            for b in it:
                got.extend(b["id"].tolist())
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=pull) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(got) == list(range(sum(ROWS)))


@pytest.mark.parametrize(
    ("key", "value"), [("epoch", 2**64 - 1), ("epoch", True), ("row", True), ("epoch", 10**30)]
)
def test_a_tampered_cursor_is_refused(files, key, value):
    # A huge epoch was accepted and failed at iter() with a bare OverflowError, dropping the
    # state; True passed as an int.
    ds = Dataset(files, batch_size=10)
    it = iter(ds)
    next(it)
    state = ds.state_dict()
    state[key] = value
    with pytest.raises(InvalidArgumentError, match="state has invalid"):
        Dataset(files, batch_size=10).load_state_dict(state)
