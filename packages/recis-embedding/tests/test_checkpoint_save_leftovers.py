"""What a save leaves beside a checkpoint (after a killed save), the file names of long table
names, and a symbolic link at the checkpoint path."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import quote

import pytest
import torch

from recis_embedding import (
    CheckpointError,
    CheckpointReader,
    EmbeddingEngine,
    EmbeddingOption,
    Normal,
    SparseSGD,
    load,
    save,
)

DIM = 4

# Saves two tables to argv[1] and dies (os._exit, like SIGKILL) in the middle of writing the
# second table file: the temporary directory is left behind, as by a killed process.
CHILD = textwrap.dedent(
    """
    import os, sys
    import torch
    import recis_embedding._checkpoint_save as save_mod
    from recis_embedding import EmbeddingEngine, EmbeddingOption, SparseSGD, save

    engine = EmbeddingEngine({"a": EmbeddingOption(4), "b": EmbeddingOption(4)})
    opt = SparseSGD(engine, lr=0.1)
    engine({"a": torch.tensor([[1]]), "b": torch.tensor([[2]])})
    real, calls = save_mod.save_file, []

    def dying(tensors, filename, *args, **kwargs):
        calls.append(filename)
        real(tensors, filename, *args, **kwargs)
        if len(calls) == 2:
            with open(filename, "r+b") as f:
                f.truncate(40)
            os._exit(9)

    save_mod.save_file = dying
    save(sys.argv[1], engine, opt)
    """
)


def engine(*names: str) -> tuple[EmbeddingEngine, SparseSGD]:
    torch.manual_seed(0)
    model = EmbeddingEngine({n: EmbeddingOption(DIM, initializer=Normal(std=0.5)) for n in names})
    opt = SparseSGD(model, lr=0.1)
    model({n: torch.tensor([[k + 1], [-(1 << 62)]]) for k, n in enumerate(names)})
    return model, opt


def rows(model: EmbeddingEngine, name: str) -> tuple[list[int], torch.Tensor]:
    table, index = model.table(name)
    ids = table.ids(index)
    return ids.tolist(), table.read_full(table.find(ids, index))


def dead_pid() -> int:
    """A pid no process has: above the kernel's largest (an exited child's pid could be given
    to another process before the test looks, on a busy machine)."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    except (OSError, ValueError):  # not Linux: an exited (and reaped) child's
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        proc.wait()
        return proc.pid


def test_the_next_save_removes_what_a_killed_save_left(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "c")], capture_output=True, text=True
    )
    assert result.returncode == 9, result.stderr
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".c.tmp")]
    assert len(left) == 1, sorted(p.name for p in tmp_path.iterdir())
    assert left[0].is_dir()
    assert left[0].name.startswith(f".c.tmp-{quote(socket.gethostname(), safe='')}-")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        CheckpointReader(tmp_path / "c")
    model, opt = engine("a", "b")
    save(tmp_path / "c", model, opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    save(tmp_path / "c", model, opt)  # over a checkpoint: nothing left either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    loaded, _ = engine("a", "b")
    load(tmp_path / "c", loaded)
    assert rows(loaded, "a")[0] == rows(model, "a")[0]


def test_a_save_leaves_the_temporary_directories_of_others_alone(tmp_path: Path) -> None:
    host = quote(socket.gethostname(), safe="")
    dead = dead_pid()
    keep = [
        f".c.tmp-{host}-{os.getppid()}",  # a running process of this host
        f".c.tmp-{host}x-{dead}",  # another host's, whose name starts like this one's
        f".c.tmp-other-host-{dead}",  # another host's: its pids mean nothing here
        f".c.tmp-{host}-{dead}-x",  # not a save's
        f".c.tmp-{dead}",  # no host named
        ".c.tmp",  # a sharded save's
        f".d.tmp-{host}-{dead}",  # another checkpoint's
    ]
    for name in keep:
        (tmp_path / name / "sparse").mkdir(parents=True)
    (tmp_path / f".c.tmp-{host}-{dead + 1000000}").write_text("a file, not a save's directory")
    keep.append(f".c.tmp-{host}-{dead + 1000000}")
    (tmp_path / f".c.tmp-{host}-{dead}" / "sparse").mkdir(parents=True)  # a dead save's
    model, opt = engine("a")
    save(tmp_path / "c", model, opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, "c"])


def test_a_long_table_name_saves_and_loads(tmp_path: Path) -> None:
    # 26 CJK characters: 234 bytes percent-encoded, too long for one file name with the
    # shard suffix.
    long = "用户最近三十天点击商品类目序列特征哈希分桶嵌入表向量"[:26]
    longer = long + "二"  # the same shortened prefix: told apart by the hash
    short = "user/å b"
    model, opt = engine(long, longer, short)
    save(tmp_path / "c", model, opt)
    files = sorted(p.name for p in (tmp_path / "c" / "sparse").iterdir())
    assert len(files) == 3
    assert all(len(f.encode()) < 200 for f in files), files
    # A name whose encoding is short keeps the file name it always had.
    assert f"{quote(short, safe='')}.shard-00000-of-00001.safetensors" in files
    shortened = [f for f in files if "+" in f]
    assert len(shortened) == 2
    assert all(f.startswith(quote(long[:10], safe="")) for f in shortened)
    reader = CheckpointReader(tmp_path / "c")
    assert reader.tables() == sorted([long, longer, short])
    assert reader.read(long, "ids").tolist() == rows(model, long)[0]
    loaded, _ = engine(long, longer, short)
    for name in (long, longer, short):
        loaded.table(name)[0].clear()
    load(tmp_path / "c", loaded)
    for name in (long, longer, short):
        ids, full = rows(loaded, name)
        want_ids, want_full = rows(model, name)
        assert ids == want_ids
        assert torch.equal(full, want_full)


def test_a_symbolic_link_is_not_replaced_and_the_error_says_so(tmp_path: Path) -> None:
    model, opt = engine("a")
    save(tmp_path / "step-1", model, opt)
    before = (tmp_path / "step-1" / "manifest.json").read_text()
    os.symlink("step-1", tmp_path / "latest")
    with pytest.raises(CheckpointError) as info:
        save(tmp_path / "latest", model, opt)
    message = str(info.value)
    assert f"{tmp_path / 'latest'} is a symbolic link to step-1" in message
    assert str((tmp_path / "step-1").resolve()) in message
    assert "remove the link" in message
    assert (tmp_path / "latest").is_symlink()
    assert (tmp_path / "step-1" / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1"]
    os.symlink("nowhere", tmp_path / "dangling")
    with pytest.raises(CheckpointError, match=r"dangling is a symbolic link to nowhere"):
        save(tmp_path / "dangling", model, opt)
    assert (tmp_path / "dangling").is_symlink()


def test_a_save_is_on_the_disk_before_it_replaces_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without fsync a crash soon after the rename could leave the new directory with empty
    # files and the previous checkpoint already deleted: every file and directory of the new
    # checkpoint is flushed before the rename, the rename itself before the old one goes.
    import recis_embedding._checkpoint_save as save_mod

    model, opt = engine("a", "b")
    save(tmp_path / "c", model, opt)
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_rmtree = os.fsync, os.replace, save_mod.shutil.rmtree

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", f"{src} -> {dst}"))
        real_replace(src, dst)

    def rmtree(path, *args, **kwargs) -> None:
        events.append(("rmtree", str(path)))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(save_mod.shutil, "rmtree", rmtree)
    save(tmp_path / "c", model, opt)
    final = tmp_path / "c"
    into_place = next(
        i
        for i, (kind, what) in enumerate(events)
        if kind == "replace" and what.endswith(f"-> {final}")
    )
    tmp = Path(events[into_place][1].split(" -> ")[0])
    flushed_before = {what for kind, what in events[:into_place] if kind == "fsync"}
    written = [tmp / p.relative_to(final) for p in final.rglob("*")] + [tmp]
    assert {str(p) for p in written} <= flushed_before, sorted(flushed_before)
    removed = next(i for i, (kind, _) in enumerate(events) if kind == "rmtree" and i > into_place)
    assert ("fsync", str(tmp_path)) in events[into_place:removed], events[into_place:]
    loaded, _ = engine("a", "b")
    load(final, loaded)
    assert rows(loaded, "b")[0] == rows(model, "b")[0]
