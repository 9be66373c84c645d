"""The native reader (private; use :class:`recis_io.Dataset`)."""

from typing import Any, final

__all__ = ["Reader", "hash_bytes"]

_Layout = tuple[int, list[tuple[int, int, list[tuple[int, int]]]]]
_Spec = tuple[str, int | float | str | bytes | None, str | None, int, str | None]

def hash_bytes(data: bytes, kind: str, buckets: int = 0) -> int:
    """Hashes ``data`` as the reader hashes strings.

    Args:
        data: The raw bytes (UTF-8 for strings).
        kind: ``"farm"`` (FarmHash Fingerprint64) or ``"murmur"`` (MurmurHash64A, seed 0).
        buckets: When positive, the unsigned hash modulo ``buckets``.

    Returns:
        The id as a signed 64-bit integer (the hash's bits reinterpreted).

    Raises:
        InvalidArgumentError: ``kind`` is not a known hash.
    """

@final
class Reader:
    """One shard's stream of packed batches; decodes on native threads."""

    def __new__(
        cls,
        paths: list[tuple[str, str]],
        columns: list[_Spec] | None,
        *,
        batch_size: int,
        drop_last: bool,
        shuffle: bool,
        seed: int,
        window: int,
        shard: int,
        shards: int,
        epochs: int,
        num_threads: int,
        prefetch: int,
        pack: bool = False,
        even: bool = True,
    ) -> Reader: ...
    def schema(self) -> list[tuple[str, str, int, int, str]]:
        """``(name, dtype, fixed width or 0, ragged levels, text kind)`` per output column."""
    @property
    def total_rows(self) -> int: ...
    @property
    def file_rows(self) -> list[int]:
        """Rows of each file, in the order the paths were given."""
    @property
    def shard_rows(self) -> int: ...
    @property
    def batches_per_epoch(self) -> int: ...
    def cursor(self) -> tuple[int, int]:
        """``(epoch, row)`` of the next row this reader hands out."""
    def seek(self, epoch: int, pos: int) -> None: ...
    def set_end_epoch(self, end: int) -> None:
        """Makes the reader end when its cursor reaches epoch ``end``."""
    def pause(self) -> None:
        """Stops the decode threads; reading resumes from the cursor."""
    def prepare(self) -> int | None:
        """Decodes the next batch; returns its size in bytes, ``None`` after the last one."""
    def fill_into(self, ptr: int, nbytes: int) -> _Layout:
        """Packs the prepared batch into caller-owned memory at ``ptr``."""
    def fill_owned(self) -> tuple[Any, _Layout]:
        """The prepared batch as a DLPack capsule: a packed chunk, or a reused buffer packed now.

        The batch stays held until :meth:`release_held`: ``prepare`` and ``fill_owned`` give it
        again meanwhile."""
    def release_held(self) -> None:
        """The batch ``fill_owned`` handed out is stored: the next ``prepare`` reads on."""
