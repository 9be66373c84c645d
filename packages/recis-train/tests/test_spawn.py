"""The helper that starts the distributed tests' processes retries a run once after an abort."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from _spawn import RETRIED, spawn_ranks


def _abort_in_first_run(rank: int, root: str) -> None:
    if Path(root).name == "run-1":
        os.abort()
    (Path(root) / f"done-{rank}").touch()


def _always_abort(rank: int, root: str) -> None:
    os.abort()


def _raise(rank: int, root: str) -> None:
    raise ValueError("a worker's own error")


def _exit_on_signal_other_than_abort(rank: int, root: str) -> None:
    os.kill(os.getpid(), 9)


def fresh_roots(base: Path):
    counter = itertools.count(1)

    def fresh() -> Path:
        root = base / f"run-{next(counter)}"
        root.mkdir()
        return root

    return fresh


def test_a_run_whose_worker_aborted_is_started_once_more(tmp_path):
    before = len(RETRIED)
    root = spawn_ranks(_abort_in_first_run, fresh_roots(tmp_path), 1)
    assert root == tmp_path / "run-2"
    assert (root / "done-0").exists()
    assert len(RETRIED) == before + 1
    assert "test_spawn" in RETRIED[-1]
    assert "SIGABRT" in RETRIED[-1]
    RETRIED.pop()  # a deliberate abort: not one to report


@pytest.mark.parametrize(
    ("worker", "error"),
    [
        (_always_abort, "SIGABRT"),
        (_raise, "a worker's own error"),
        (_exit_on_signal_other_than_abort, "SIGKILL"),
    ],
)
def test_other_failures_and_a_second_abort_fail_as_before(tmp_path, worker, error):
    before = len(RETRIED)
    with pytest.raises(
        mp.ProcessRaisedException if worker is _raise else mp.ProcessExitedException, match=error
    ):
        spawn_ranks(worker, fresh_roots(tmp_path), 1)
    runs = sorted(p.name for p in tmp_path.iterdir())
    assert runs == (["run-1", "run-2"] if worker is _always_abort else ["run-1"])
    del RETRIED[before:]
