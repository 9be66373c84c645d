"""``overlap`` blocks: every block waits for its own work, blocks belong to their thread or
asyncio task and process, and the buffers of deferred work live until it is done."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch

import recis_kernels as rk
from recis_kernels import _overlap

# 2**21 ids: 16 MiB of remainders, far above the 256 KiB from which work is deferred.
IDS = torch.randint(-(1 << 62), 1 << 62, (1 << 21,), generator=torch.Generator().manual_seed(5))
N = 1_000_003


@pytest.fixture(autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def want() -> torch.Tensor:
    return rk.mod(IDS, N)


def test_a_block_inside_another_waits_for_its_own_work(want, mod_defers) -> None:
    # A library running its own block inside the caller's (FeatureEngine's steps, say) reads
    # its results right after its block: they must be complete then, not only at the outer end.
    with rk.overlap():
        outer = rk.mod(IDS, N)
        for _ in range(3):
            with rk.overlap():
                inner = rk.mod(IDS, N)
            assert torch.equal(inner, want)
        assert len(_overlap._current().pending) == 1  # the outer work is its block's
    assert torch.equal(outer, want)
    assert _overlap._current() is None


def test_overlap_pending_tells_whether_work_is_still_listed(want, mod_defers) -> None:
    assert not rk.overlap_pending()
    with rk.overlap():
        assert not rk.overlap_pending()
        rk.mod(IDS[:1000], N)  # small: runs in place
        assert not rk.overlap_pending()
        out = rk.mod(IDS, N)
        assert rk.overlap_pending()
        with rk.overlap(False):
            assert rk.overlap_pending()  # the block around it still has work
        with rk.overlap():
            assert rk.overlap_pending()
        rk.finish_overlapped()
        assert not rk.overlap_pending()
        assert torch.equal(out, want)
        rk.mod(IDS, N)
    assert not rk.overlap_pending()


def test_overlap_false_at_the_top_runs_in_place(want) -> None:
    with rk.overlap(False):
        out = rk.mod(IDS, N)
        assert not _overlap._current().pending
        assert torch.equal(out, want)


def test_one_instance_entered_twice_leaves_no_block_behind(want) -> None:
    block = rk.overlap()
    with block:
        with block:
            inner = rk.mod(IDS, N)
        assert torch.equal(inner, want)
        outer = rk.mod(IDS, N)
    assert torch.equal(outer, want)
    assert _overlap._current() is None
    assert not _overlap.deferring(1 << 30)  # later ops run in place


class _Job:
    """Deferred work as ``defer`` takes it, recording whether it was waited for."""

    def __init__(self) -> None:
        self.waited = False

    def hold(self, *keep: torch.Tensor) -> None:
        pass

    def wait(self) -> None:
        self.waited = True


def test_one_instance_shared_by_two_threads_waits_for_each_thread_s_own_work() -> None:
    # Thread A enters the shared block, thread B enters it too, A leaves: A's block ended, and
    # waited for A's work, not for B's (A left B's entry, waiting for nothing of its own, and
    # read a half-written result).
    import threading

    shared = rk.overlap()
    jobs = {"a": _Job(), "b": _Job()}
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def a() -> None:
        with shared:
            _overlap.defer(jobs["a"])
            a_in.set()
            b_in.wait(10)
        seen["a done at a's end"] = jobs["a"].waited
        seen["b done at a's end"] = jobs["b"].waited
        a_out.set()

    def b() -> None:
        a_in.wait(10)
        with shared:
            _overlap.defer(jobs["b"])
            b_in.set()
            a_out.wait(10)
            seen["b still in its block"] = _overlap.overlap_pending()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {
        "a done at a's end": True,
        "b done at a's end": False,
        "b still in its block": True,
    }
    assert jobs["b"].waited


def test_leaving_a_block_never_entered_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="never entered"):
        rk.overlap().__exit__(None, None, None)


def test_asyncio_tasks_have_blocks_of_their_own(want) -> None:
    async def waits_in_its_block() -> None:
        with rk.overlap():
            rk.mod(IDS, 7)
            await asyncio.sleep(0.05)

    async def reads_after_its_block() -> torch.Tensor:
        await asyncio.sleep(0.01)  # while the other task is suspended in its block
        with rk.overlap():
            out = rk.mod(IDS, N)
        return out

    async def main() -> torch.Tensor:
        _, out = await asyncio.gather(waits_in_its_block(), reads_after_its_block())
        return out

    assert torch.equal(asyncio.run(main()), want)


def test_deferred_work_holds_its_buffers_until_it_is_done(want, mod_defers) -> None:
    ids = IDS.clone()
    gone = weakref.ref(ids)
    with rk.overlap():
        out = rk.mod(ids, N)
        (job,) = _overlap._current().pending
        del ids
        gc.collect()
        assert gone() is not None  # held by the job
        del job
    assert gone() is None  # let go once done and waited for
    assert torch.equal(out, want)


def test_dropping_unfinished_work_waits_before_freeing_its_buffers(want, mod_defers) -> None:
    # What an interrupted block end leaves: jobs not waited for, the caller's last references to
    # their buffers gone. Dropping each job waits for it; only then are its buffers freed.
    results = []
    for _ in range(5):
        block = rk.overlap()
        block.__enter__()
        results.append(rk.mod(IDS.clone(), N))
        pending = _overlap._current().pending
        (entries,) = block._entered.values()
        state = entries.pop()
        _overlap._BLOCK.reset(state[0])
        pending.clear()  # no wait() here: the drop must wait
    gc.collect()
    for out in results:
        assert torch.equal(out, want)
    assert _overlap._current() is None


def test_a_child_forked_inside_a_block_runs_its_own_blocks() -> None:
    # The child inherits the parent's block but not the pool thread running its work: the
    # child's own blocks wait for the child's work, finish_overlapped() returns, and the
    # inherited job refuses to be waited for instead of hanging. (The child compares with NumPy:
    # torch's own OpenMP ops may not run in a forked child.)
    script = textwrap.dedent(
        """
        import os, sys
        import numpy as np
        import torch
        import recis_kernels as rk
        from recis_kernels import _overlap

        torch.set_num_threads(2)
        ids = torch.randint(-(1 << 62), 1 << 62, (1 << 22,), generator=torch.Generator().manual_seed(1))
        small = ids[: 1 << 20].clone()
        want = rk.mod(small, 13).numpy().copy()
        with rk.overlap():
            rk.mod(ids, 1_000_003)
            (inherited,) = _overlap._current().pending
            pid = os.fork()
            if pid == 0:
                ok = _overlap._current() is None
                with rk.overlap():
                    out = rk.mod(small, 13)
                ok = ok and np.array_equal(out.numpy(), want)
                rk.finish_overlapped()
                try:
                    inherited.wait()
                    ok = False
                except RuntimeError as exc:
                    ok = ok and "before it forked" in str(exc)
                os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], timeout=120, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def test_enabled_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="overlap: enabled must be a bool, got 1"):
        rk.overlap(1)  # type: ignore[arg-type]


def test_tasks_and_threads_started_inside_a_block_run_in_place(want) -> None:
    # They see the block (asyncio copies the context into them) but do not run in it: what
    # they compute is complete when they read it.
    async def reads_its_own() -> bool:
        out = rk.mod(IDS, N)
        return torch.equal(out, want)

    def reads_on_a_thread() -> bool:
        out = rk.mod(IDS, N)
        return torch.equal(out, want)

    async def main() -> list[bool]:
        with rk.overlap():
            first = await asyncio.create_task(reads_its_own())
            second = await asyncio.to_thread(reads_on_a_thread)
            assert not _overlap._current().pending  # nothing of theirs landed here
        return [first, second]

    assert asyncio.run(main()) == [True, True]
