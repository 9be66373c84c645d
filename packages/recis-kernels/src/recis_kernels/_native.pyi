"""The compiled CPU kernels (private; called through ``recis_kernels.ops._cpu_kernels``)."""

__all__ = [
    "bucketize_parts",
    "copy_rows",
    "pair_hash_parts",
    "sort_int64_by_high_bits",
    "truncate_plan",
    "umod_parts",
]

def umod_parts(
    parts: list[tuple[int, int]], divisors: list[int], out: int, threads: int
) -> None: ...
def bucketize_parts(
    dtype: str,
    parts: list[tuple[int, int]],
    bounds: int,
    bound_lens: list[int],
    out: int,
    threads: int,
    nan_buckets: list[int] | None = None,
) -> None: ...
def copy_rows(
    src: int,
    src_len: int,
    dst: int,
    dst_len: int,
    item: int,
    src_starts: int,
    dst_offsets: int,
    rows: int,
    threads: int,
) -> None: ...
def pair_hash_parts(
    a_parts: list[tuple[int, int]], b_parts: list[tuple[int, int]], out: int, threads: int
) -> None: ...
def sort_int64_by_high_bits(data: int, len: int, low_bits: int) -> None: ...
def truncate_plan(offsets: int, rows: int, parts: list[tuple[int, int, bool]], out: int) -> int: ...
