"""The Dataset: configuration, sharding, resumable iteration."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import PurePath
from typing import Any, TypeGuard

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from ._batch import Batch, _ColumnInfo
from ._column import Column, plain_number
from ._paths import PathLike, resolve_paths
from ._recis_io import Reader
from .exceptions import ForkedReaderError, InvalidArgumentError

# Version 2 adds "files" (the data set's identity), version 3 "drop_last", version 4 names
# each file by its path below the data set's common directory (its base name before); states
# of earlier versions still load, checked on what they record.
_STATE_VERSION = 4
_STATE_VERSIONS = (1, 2, 3, 4)
_DEVICES = ("cpu", "pinned", "cuda")


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


# The native reader takes sizes and counts as 64-bit integers.
_MAX_INT = 2**63 - 1
# Each decode thread is an OS thread with its own buffers.
_MAX_THREADS = 4096
# Row groups and batches kept ready: far past what any pipeline can use, and each costs memory.
_MAX_PREFETCH = 4096


def _positive(name: str, value: Any, minimum: int = 1, maximum: int = _MAX_INT) -> int:
    value = plain_number(value)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise InvalidArgumentError(
            f"{name} must be an integer in [{minimum}, {maximum}], got {value!r}"
        )
    return value


def _flag(name: str, value: Any) -> bool:
    # bool("no") is True: a string or number here is a mistake, not a flag.
    value = plain_number(value)
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be True or False, got {value!r}")
    return value


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise InvalidArgumentError(
            f"environment variable {name}={text!r} is not an integer"
        ) from None


def _as_columns(columns: Sequence[str | Column] | None) -> list[Column] | None:
    if columns is None:
        return None
    if isinstance(columns, (str, bytes, Column)):
        raise InvalidArgumentError(
            f"columns must be a list of names or Column objects, got {columns!r}; "
            f"pass [{columns!r}] for one column"
        )
    out = [_as_column(c) for c in columns]
    if not out:
        raise InvalidArgumentError("columns must name at least one column, or be None for all")
    seen: set[str] = set()
    for c in out:
        if c.name in seen:
            raise InvalidArgumentError(f"columns name '{c.name}' more than once")
        seen.add(c.name)
    return out


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    # Where each value came from, named when they do not fit together: a RANK exported
    # without WORLD_SIZE (or a launcher's leftovers) otherwise reads as a bad argument.
    sources = {"rank": "the rank argument", "world_size": "the world_size argument"}
    if rank is None or world_size is None:
        if dist.is_available() and dist.is_initialized():
            auto = (dist.get_rank(), dist.get_world_size())
            found = ("torch.distributed's rank", "torch.distributed's world size")
        else:
            auto = (_env_int("RANK", 0), _env_int("WORLD_SIZE", 1))
            env = [
                f"environment variable {v}={os.environ[v]}"
                if v in os.environ
                else f"the default {d} ({v} is not set)"
                for v, d in (("RANK", 0), ("WORLD_SIZE", 1))
            ]
            found = (env[0], env[1])
        if rank is None:
            rank, sources["rank"] = auto[0], found[0]
        if world_size is None:
            world_size, sources["world_size"] = auto[1], found[1]
    world_size = _positive("world_size", world_size)
    rank = plain_number(rank)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise InvalidArgumentError(
            f"rank must be in [0, {world_size}), got {rank!r} (rank from {sources['rank']}, "
            f"world_size from {sources['world_size']})"
        )
    return rank, world_size


def _device_kind(device: str | torch.device) -> tuple[str, torch.device | None]:
    text = str(device)
    if text in ("cpu", "pinned"):
        return text, None
    try:
        dev = torch.device(text)
    except RuntimeError as e:
        raise InvalidArgumentError(f"device must be one of {_DEVICES}, got {text!r}") from e
    if dev.type != "cuda":
        raise InvalidArgumentError(f"device must be one of {_DEVICES}, got {text!r}")
    if not torch.cuda.is_available():
        raise InvalidArgumentError(
            f"device {text!r} needs CUDA, but torch.cuda.is_available() is false"
        )
    return "cuda", dev


class Dataset(IterableDataset):
    """Reads Parquet/ORC files into fixed-size batches of torch tensors.

    Decoding runs on a pool of native threads with the GIL released; the order of rows depends
    only on the inputs and ``seed`` (never on thread timing), so runs are reproducible and
    :meth:`state_dict` can resume exactly.

    Each epoch lays the files' row groups (stripes for ORC) end to end, in file order or in a
    seeded permutation (started at a seeded row and wrapped around) when ``shuffle`` is set,
    and gives shard ``s`` of ``S`` the contiguous slice ``[s * n, (s + 1) * n)`` with
    ``n = total_rows // S``. Shards are therefore disjoint,
    equally sized (every rank sees the same number of batches), and together cover the data
    except the last ``total_rows % S`` rows of each epoch's order (with shuffle these differ
    from epoch to epoch). With ``even_shards=False`` the first ``total_rows % S`` shards take
    one row more instead, so that the shards cover every row (for an evaluation, whose metrics
    should count every row; ranks then may see different numbers of batches, which
    recis-train's evaluation handles). With ``shuffle`` the shard's rows are also permuted within windows of
    ``shuffle_window`` rows. Under a ``DataLoader`` with workers, shards are
    ``rank * num_workers + worker_id`` out of ``world_size * num_workers``.

    Epochs are numbered from 0 and each has its own permutation. An iteration reads epochs
    ``k .. k + epochs - 1``, where ``k`` is 0 unless :meth:`set_epoch` says otherwise: call
    ``ds.set_epoch(epoch)`` before each pass of an epoch loop (as with ``DistributedSampler``),
    or every pass reads epoch 0's order again.

    Args:
        paths: A file, directory or glob, or a sequence of them (``.parquet``/``.pq``/``.orc``).
            Directories and globs skip hidden and ``_``-prefixed names (``_SUCCESS``,
            ``_temporary/``) that a wildcard or the directory walk would take in. Each file
            may be reached once (not by a directory and a path inside it, two globs, or a
            link and its target), so every row is read once per epoch.
        batch_size: Rows per batch; batches span row-group boundaries.
        columns: A list of column names or :class:`Column` options, at least one and each
            name once; ``None`` reads every column of the first file with rows (of the
            first file when none has any). Each output keeps the order given here.
        format: ``"auto"`` (by file suffix), ``"parquet"`` or ``"orc"``.
        num_threads: Decode threads, 1 to 4096 (default ``None``: the CPUs this process may
            use).
        prefetch: Decoded row groups kept ready beyond those the current batch needs, and the
            number of spare batch buffers kept for reuse, 0 to 4096; memory stays bounded by it and
            ``num_threads`` (about 4 to 10 decoded row groups, see the guide's Memory section).
        drop_last: Drop each epoch's final batch when it is smaller than ``batch_size``
            (a bool).
        shuffle: Permute row groups per epoch, start each epoch at a seeded row, and permute
            rows within windows (a bool).
        seed: Seed of every permutation.
        shuffle_window: Rows per in-shard shuffle window (memory holds about one window).
        rank: This process's rank (default: ``torch.distributed`` if initialized, else the
            ``RANK`` environment variable, else 0).
        world_size: Number of ranks (same defaults, ``WORLD_SIZE``, else 1).
        epochs: Passes over the data per iteration.
        even_shards: Every shard ``total_rows // S`` rows, the remainder left out (the
            default); ``False``: the first ``total_rows % S`` shards one row more, so every
            row is read (a bool).
        device: ``"cpu"``; ``"pinned"`` (page-locked buffers when CUDA is available, plain
            CPU memory otherwise); or ``"cuda"``/``"cuda:N"`` (pinned buffers, each batch
            moved with one non-blocking copy). In ``DataLoader`` workers only ``"cpu"``
            (iterating there raises :class:`InvalidArgumentError` otherwise); the loader's
            ``pin_memory=True`` pins in the main process.

    Raises:
        DataFileNotFoundError: A path matched no file.
        SchemaError: A column is missing, unsupported, or typed differently across files
            (numbers of different types need the :class:`Column`'s ``dtype``).
        CorruptFileError: A file's metadata cannot be read.
        InvalidArgumentError: Two entries of ``paths`` reach the same file, an entry is not a
            ``str`` or ``os.PathLike``, an option is out of range (sizes and counts go up to
            ``2**63 - 1``) or of the wrong type, or the ``RANK``/``WORLD_SIZE`` environment
            variable is not an integer.

    Example:
        ```python
        ds = Dataset("data/", batch_size=8192,
                     columns=["label", Column("user", hash="farm", fill=0)])
        for batch in ds:
            batch["label"]           # (B,) tensor
            batch["user"]            # (B,) int64 ids
        ```
    """

    def __init__(
        self,
        paths: PathLike | Sequence[PathLike],
        *,
        batch_size: int,
        columns: Sequence[str | Column] | None = None,
        format: str = "auto",
        num_threads: int | None = None,
        prefetch: int = 2,
        drop_last: bool = False,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_window: int = 65536,
        rank: int | None = None,
        world_size: int | None = None,
        epochs: int = 1,
        device: str | torch.device = "cpu",
        even_shards: bool = True,
    ) -> None:
        super().__init__()
        self.batch_size = _positive("batch_size", batch_size)
        threads = _default_threads() if num_threads is None else num_threads
        self.num_threads = _positive("num_threads", threads, maximum=_MAX_THREADS)
        self.prefetch = _positive("prefetch", prefetch, minimum=0, maximum=_MAX_PREFETCH)
        self.shuffle_window = _positive("shuffle_window", shuffle_window)
        self.epochs = _positive("epochs", epochs, minimum=0)
        seed = plain_number(seed)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise InvalidArgumentError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        self.seed = seed
        self.drop_last = _flag("drop_last", drop_last)
        self.shuffle = _flag("shuffle", shuffle)
        self.even_shards = _flag("even_shards", even_shards)
        self.rank, self.world_size = _rank_world(rank, world_size)
        self._device_kind, self._device = _device_kind(device)
        self.columns = _as_columns(columns)
        self._files = resolve_paths(paths, format)
        # Opening a reader once validates every file and column now rather than mid-training.
        probe = self._reader(0, 1)
        self.total_rows: int = probe.total_rows
        # What a state checks the files against, in plan order: each file's path below the
        # directory all files share (not that directory, so a copied data set resumes; the
        # partition directories, so `dt=1/part-0` and `dt=2/part-0` are two files) and its row
        # count. States before version 4 recorded base names.
        self._identity = [
            [name, rows]
            for name, rows in zip(_relative_names(self._files), probe.file_rows, strict=True)
        ]
        self._infos = [_ColumnInfo(*t) for t in probe.schema()]
        self._cursor: tuple[int, int] = (0, 0)
        # A loaded state not iterated yet: (first epoch of its pass, epoch, row), and the
        # (shard, shards) it was taken on. Kept in this object only: a DataLoader worker loads
        # its own state (StatefulDataLoader).
        self._resume: tuple[int, int, int] | None = None
        self._resume_shard: tuple[int, int] = (self.rank, self.world_size)
        # The epoch set_epoch set, -1 before any call, in shared memory so that DataLoader
        # workers, which iterate copies of this object (persistent ones for the whole run),
        # read what the main process set; and the first epoch of the current or last pass.
        self._next_first = torch.full((), -1, dtype=torch.int64).share_memory_()
        self._pass_first = 0
        # Whether set_epoch was called since the last pass started: the next pass then starts
        # at the beginning of that epoch, which is what state_dict() reports.
        self._epoch_set = False
        self._shard: tuple[int, int] = (self.rank, self.world_size)
        # A finished iterator's reader, kept for the next pass: its decode buffers are already
        # allocated. Only used in the process that made it (never across a fork or pickle).
        self._idle: tuple[int, tuple[int, int], Reader] | None = (os.getpid(), (0, 1), probe)

    def _reader(self, shard: int, shards: int) -> Reader:
        specs = None if self.columns is None else [c._spec() for c in self.columns]
        return Reader(
            self._files,
            specs,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
            shuffle=self.shuffle,
            seed=self.seed,
            window=self.shuffle_window,
            shard=shard,
            shards=shards,
            epochs=self.epochs,
            num_threads=self.num_threads,
            prefetch=self.prefetch,
            # Batches in reader-owned CPU memory can be decoded chunks themselves.
            pack=self._device_kind == "cpu" or not torch.cuda.is_available(),
            even=self.even_shards,
        )

    @property
    def files(self) -> list[str]:
        """The data files, in plan order."""
        return [p for p, _ in self._files]

    def _current_shard(self) -> tuple[int, int]:
        info = get_worker_info()
        if info is None:
            return self.rank, self.world_size
        return (
            self.rank * info.num_workers + info.id,
            self.world_size * info.num_workers,
        )

    def batches_per_epoch(self, num_workers: int = 0) -> int:
        """Batches this rank yields per epoch (the same on every rank, unless
        ``even_shards=False`` gives some shards a row more).

        Args:
            num_workers: The ``num_workers`` of the ``DataLoader`` that reads this dataset:
                each worker reads a shard of its own, so the loader yields the sum of its
                workers' batches (each worker's last batch may be smaller). 0 (the default)
                is reading without a ``DataLoader`` or with ``num_workers=0``; inside a
                worker the count is that worker's own.

        Raises:
            InvalidArgumentError: ``num_workers`` is not an int in ``[0, 4096]``.
        """
        workers = _positive("num_workers", num_workers, minimum=0, maximum=_MAX_THREADS)
        if get_worker_info() is not None:
            return -(-self._epoch_rows(*self._current_shard()) // self.batch_size)
        workers = max(1, workers)
        shards = self.world_size * workers
        return sum(
            -(-self._epoch_rows(self.rank * workers + w, shards) // self.batch_size)
            for w in range(workers)
        )

    def _shard_rows(self, shard: int, shards: int) -> int:
        """Rows of one epoch of shard ``shard`` of ``shards``."""
        rows, extra = divmod(self.total_rows, shards)
        return rows + (shard < extra and not self.even_shards)

    def _epoch_rows(self, shard: int, shards: int) -> int:
        # Rows of one epoch of a shard that are read (drop_last drops the last partial batch).
        rows = self._shard_rows(shard, shards)
        return rows - rows % self.batch_size if self.drop_last else rows

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_idle"] = None
        return state

    def _take_reader(self, shard: int, shards: int) -> Reader:
        idle, self._idle = self._idle, None
        if idle is not None and idle[0] == os.getpid() and idle[1] == (shard, shards):
            return idle[2]
        return self._reader(shard, shards)

    def _give_back(self, key: tuple[int, int], reader: Reader) -> None:
        self._idle = (os.getpid(), key, reader)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration read epochs ``epoch .. epoch + epochs - 1``.

        With ``shuffle`` each epoch has its own order of row groups and rows, a function of
        ``seed`` and the epoch only, so ``set_epoch(e)`` then one pass reads exactly what the
        ``e``-th epoch of a single iteration with more ``epochs`` would. A state taken during
        such a pass resumes within it (:meth:`load_state_dict` restores the epoch range); a
        state taken after the last batch of epoch ``e`` also resumes with ``set_epoch(e + 1)``,
        as an epoch loop that checkpoints after each pass calls it. Once called, the pass reads
        from the epoch set, whether the state was loaded before or after the call, so a
        ``StatefulDataLoader``'s workers (which load their states when a pass starts) follow it.
        The epoch is kept in shared memory, so ``DataLoader`` workers (persistent ones too,
        started with fork or spawn) read it when their next pass starts: call it before
        ``iter(loader)``, as with ``DistributedSampler``.

        Raises:
            InvalidArgumentError: ``epoch`` is not an int in ``[0, 2**62]``.
        """
        self._next_first.fill_(_positive("set_epoch: epoch", epoch, minimum=0, maximum=2**62))
        self._epoch_set = True

    def _set_epoch(self) -> int | None:
        """The epoch ``set_epoch`` last set, by this process or the one that made this worker's
        copy; ``None`` before any call."""
        epoch = int(self._next_first)
        return None if epoch < 0 else epoch

    def _next_pass(self, shard: int, shards: int) -> tuple[int, tuple[int, int]]:
        """The first epoch and the cursor of the next pass.

        The epoch ``set_epoch`` set wins over a loaded state's, whichever came first: a
        ``StatefulDataLoader`` loads each worker's state when the pass starts, after the main
        process's ``set_epoch``. Without ``set_epoch`` a loaded state resumes its own pass.
        """
        set_to = self._set_epoch()
        if self._resume is None:
            first = self._pass_first if set_to is None else set_to
            return first, (first, 0)
        loaded_first, epoch, row = self._resume
        first = loaded_first if set_to is None else set_to
        if epoch + 1 == first and row >= self._epoch_rows(shard, shards):
            # A state taken after the last batch of epoch e is where epoch e + 1 starts: an
            # epoch loop that checkpoints after each pass resumes with set_epoch(e + 1).
            return first, (first, 0)
        # A state at the very start of the epoch after this pass's last (row 0) is a pass
        # already finished; any later row of it is in an epoch this pass does not read.
        finished = epoch == first + self.epochs and row == 0
        if not (first <= epoch < first + self.epochs or finished):
            began = (
                f"set_epoch({first})"
                if set_to is not None
                else f"the loaded state's pass began at epoch {first}"
            )
            more = (
                f", or read with epochs={epoch - first + 1} or more"
                if epoch >= first + self.epochs
                else ""
            )
            raise InvalidArgumentError(
                f"the state to resume from is in epoch {epoch}, but this pass reads epochs "
                f"{first} to {first + self.epochs - 1} ({began}, epochs={self.epochs}); call "
                f"set_epoch with the epoch the state was taken in{more}"
            )
        return first, (epoch, row)

    def __iter__(self) -> Iterator[Batch]:
        if self._device_kind != "cpu" and get_worker_info() is not None:
            # A forked worker cannot initialize CUDA once its parent has, and a pinned or CUDA
            # batch sent from a worker reaches the main process in shared memory (no longer
            # pinned) or through CUDA IPC: DataLoader(pin_memory=True) pins in the main process.
            raise InvalidArgumentError(
                f"device={str(self._device or self._device_kind)!r} cannot be used in "
                "DataLoader workers: read with "
                "device='cpu' there and give the DataLoader pin_memory=True (it pins each batch "
                "in the main process), then move batches with batch.to(device, "
                "non_blocking=True)"
            )
        shard, shards = self._current_shard()
        if self._resume is not None and self._resume_shard != (shard, shards):
            # A state loaded in the main process reaches DataLoader workers in their copies
            # of the dataset, but each worker reads a shard of its own.
            raise InvalidArgumentError(
                f"the loaded state was taken on shard {self._resume_shard[0]} of "
                f"{self._resume_shard[1]}, but this pass reads shard {shard} of {shards} (a "
                "DataLoader worker's); load each worker's own state in that worker, as "
                "torchdata's StatefulDataLoader does"
            )
        first, start = self._next_pass(shard, shards)
        end = first + self.epochs
        reader = self._take_reader(shard, shards)
        reader.set_end_epoch(end)
        reader.seek(*start)
        self._resume = None  # only once the reader took it: a failure keeps the state
        self._pass_first = first
        self._epoch_set = False
        self._cursor = start
        self._shard = (shard, shards)
        return _BatchIterator(self, reader, (shard, shards))

    def state_dict(self) -> dict[str, Any]:
        """The cursor after the last batch this object yielded: small and JSON-serializable.

        After ``set_epoch(e)`` and before the next iteration it is the start of epoch ``e``,
        where that iteration begins.

        With a multi-worker ``DataLoader`` the workers iterate copies of the dataset, so this
        object's state does not follow them: use torchdata's ``StatefulDataLoader``, which
        keeps every worker's state, or read with threads in one process (``num_threads``).
        """
        first, (epoch, row) = self._pass_first, self._cursor
        shard = self._resume_shard if self._resume is not None else self._shard
        if self._resume is not None or self._epoch_set:
            # A loaded state, or set_epoch(e) after the last pass: where the next pass starts.
            try:
                first, (epoch, row) = self._next_pass(*shard)
            except InvalidArgumentError:
                # The loaded state does not fit the epoch set: it is still what was loaded.
                first, epoch, row = self._resume  # type: ignore[misc]
        return {
            "version": _STATE_VERSION,
            "epoch": epoch,
            "row": row,
            "first_epoch": first,
            "shard": shard[0],
            "shards": shard[1],
            "total_rows": self.total_rows,
            "files": [list(f) for f in self._identity],
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "shuffle_window": self.shuffle_window,
            "even_shards": self.even_shards,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Makes the next iteration continue exactly after the batch the state was taken at.

        The options that decide which rows a pass yields and in what order must be the ones
        the state was taken with. ``epochs`` (where the pass ends, not what an epoch reads),
        ``columns`` and their options (the values of each row, not which rows),
        ``num_threads``, ``prefetch``, ``format`` and ``device`` are free to change, and so
        are ``seed`` and ``shuffle_window`` without shuffle (the order is file order).

        The state is this shard's cursor: with a multi-worker ``DataLoader`` load each
        worker's own state in that worker (torchdata's ``StatefulDataLoader`` does); workers
        that find a state loaded in the main process raise when they start iterating.

        Raises:
            InvalidArgumentError: The state is malformed or was taken with different files
                (paths below their common directory, and row counts), batch size, ``drop_last``, shuffle, shard or number of
                shards, or with shuffle another seed or window.
        """
        if not isinstance(state, dict) or state.get("version") not in _STATE_VERSIONS:
            raise InvalidArgumentError(
                f"not a recis-io state (version {_STATE_VERSION}, or 1 from recis-io 0.1, "
                "or 2 without drop_last)"
            )
        shard, shards = self._current_shard()
        expected: dict[str, Any] = {
            "total_rows": self.total_rows,
            # The cursor is a row, but batches (and what drop_last drops) are cut from the
            # start of the epoch: another size would end the epoch with a stray batch.
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "shards": shards,
            "shard": shard,
        }
        if state["version"] >= 4:
            expected["files"] = self._identity
        elif state["version"] >= 2:
            expected["files"] = [[os.path.basename(str(n)), rows] for n, rows in self._identity]
        if state["version"] >= 3:
            # The epoch ends where drop_last says: with another value a state taken at the end
            # of an epoch resumes with a stray partial batch, or skips it.
            expected["drop_last"] = self.drop_last
        if self.shuffle:
            # Without shuffle the order is file order, whatever the seed and window: both are
            # free to change then.
            expected["seed"] = self.seed
            expected["shuffle_window"] = self.shuffle_window
        # The shards' slices of the epoch differ with even_shards (states from before it was an
        # option had even shards).
        got = {**state, "even_shards": state.get("even_shards", True)}
        expected["even_shards"] = self.even_shards
        for key, value in expected.items():
            if got.get(key) != value:
                raise InvalidArgumentError(_mismatch(key, got.get(key), value))
        epoch, row = state.get("epoch"), state.get("row")
        if not (_cursor_int(epoch) and _cursor_int(row) and epoch <= _MAX_EPOCH):
            raise InvalidArgumentError(f"state has invalid cursor epoch={epoch!r} row={row!r}")
        if row > self._shard_rows(shard, shards):
            raise InvalidArgumentError(f"state row {row} is past the end of the shard")
        first = state.get("first_epoch", 0)
        if not (_cursor_int(first) and first <= epoch):
            raise InvalidArgumentError(f"state has invalid first_epoch={first!r} (epoch {epoch})")
        self._resume = (first, epoch, row)
        self._resume_shard = (shard, shards)
        self._cursor = (epoch, row)

    def __repr__(self) -> str:
        return (
            f"Dataset(files={len(self._files)}, rows={self.total_rows}, "
            f"batch_size={self.batch_size}, shuffle={self.shuffle})"
        )


#: The largest epoch a state may hold (JSON's exact integers; the reader counts in 64 bits).
_MAX_EPOCH = 1 << 53


def _cursor_int(value: Any) -> TypeGuard[int]:
    """An int >= 0 that is not a bool (``True`` is an int to Python, not to a cursor)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _mismatch(key: str, got: Any, have: Any) -> str:
    if key != "files":
        return f"state has {key}={got!r}, this dataset has {have!r}"
    if not isinstance(got, list) or len(got) != len(have):
        n = len(got) if isinstance(got, list) else got
        return f"state was taken over {n!r} files, this dataset has {len(have)}"
    i, (a, b) = next((i, p) for i, p in enumerate(zip(got, have, strict=True)) if p[0] != p[1])
    return f"state file {i} is {a!r} ([path, rows]), this dataset has {b!r}"


def _relative_names(files: list[tuple[str, str]]) -> list[str]:
    """Each file's path below the directory all of them share, with ``/`` separators."""
    paths = [os.path.abspath(p) for p, _ in files]
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    return [PurePath(os.path.relpath(p, root)).as_posix() for p in paths]


def _as_column(c: str | Column) -> Column:
    if isinstance(c, Column):
        return c
    if isinstance(c, str):
        return Column(c)
    raise InvalidArgumentError(f"columns must hold names or Column objects, got {c!r}")


class _BatchIterator(Iterator[Batch]):
    def __init__(self, dataset: Dataset, reader: Reader, key: tuple[int, int]) -> None:
        self._ds = dataset
        self._reader: Reader | None = reader
        self._key = key
        self._pid = os.getpid()
        # One next() at a time: the reader is not to be entered by two threads at once.
        self._lock = threading.Lock()
        # A batch the reader filled whose next() did not return it (an exception such as a
        # KeyboardInterrupt raised in between): the next call returns it, and the cursor only
        # moves past a batch once it is returned.
        self._filled: tuple[torch.Tensor, Any, tuple[int, ...]] | None = None

    def __iter__(self) -> _BatchIterator:
        return self

    def __next__(self) -> Batch:
        if os.getpid() != self._pid:
            raise ForkedReaderError(
                "this iterator was started before the process forked; start iterating in the "
                "child (DataLoader workers do) or use multiprocessing_context='spawn'"
            )
        with self._lock:
            return self._next()

    def _next(self) -> Batch:
        reader = self._reader
        if reader is None:
            raise StopIteration
        kind = self._ds._device_kind
        if self._filled is None:
            # A batch fill_owned handed out stays held by the reader until it is stored here:
            # if an exception (a Ctrl-C) lost it on the way, prepare and fill_owned give it
            # again rather than the next one.
            nbytes = reader.prepare()
            if nbytes is None:
                self._close()
                raise StopIteration
            if kind == "cpu" or not torch.cuda.is_available():
                capsule, layout = reader.fill_owned()
                buffer = torch.utils.dlpack.from_dlpack(capsule)
            else:
                buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
                layout = reader.fill_into(buffer.data_ptr(), nbytes)
            self._filled = (buffer, layout, tuple(reader.cursor()))
        # Stored (now or by an interrupted call): the reader may read on.
        reader.release_held()
        buffer, layout, cursor = self._filled
        batch = Batch(buffer, self._ds._infos, layout)
        if kind == "cuda" and self._ds._device is not None:
            batch = batch.to(self._ds._device, non_blocking=True)
        self._filled = None
        self._ds._cursor = cursor  # type: ignore[assignment]
        return batch

    def _close(self) -> None:
        if self._reader is not None:
            self._reader.pause()
            self._ds._give_back(self._key, self._reader)
            self._reader = None

    def __del__(self) -> None:
        if self._reader is not None and os.getpid() == self._pid:
            self._close()
