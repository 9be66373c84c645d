"""The compiled CPU kernels (private; called through ``recis_kernels.ops._cpu_kernels``)."""

from typing import final

__all__ = [
    "Pending",
    "adam_apply",
    "adam_block_rows",
    "adam_moments",
    "bucketize_parts",
    "copy_block_rows",
    "copy_rows",
    "group_pairs",
    "hashed_uniform",
    "idmap_claim",
    "idmap_claim_blank",
    "idmap_find",
    "interleave_bags",
    "pair_hash_parts",
    "pooled_rows_grad",
    "rowwise_adagrad_block_rows",
    "sort_int64_by_high_bits",
    "truncate_plan",
    "umod_parts",
]

def umod_parts(
    parts: list[tuple[int, int]],
    divisors: list[int],
    out: int,
    threads: int,
    background: bool = False,
) -> Pending | None: ...
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
    background: bool = False,
) -> Pending | None: ...

@final
class Pending:
    def wait(self) -> None: ...
    def hold(self, *objects: object) -> None: ...
    @property
    def done(self) -> bool: ...

def pair_hash_parts(
    a_parts: list[tuple[int, int]],
    b_parts: list[tuple[int, int]],
    out: int,
    threads: int,
    divisors: list[int] | None = None,
) -> None: ...
def sort_int64_by_high_bits(data: int, len: int, low_bits: int) -> None: ...
def truncate_plan(offsets: int, rows: int, parts: list[tuple[int, int, bool]], out: int) -> int: ...
def idmap_find(
    slots: tuple[int, int, int],
    capacity: int,
    keys: int,
    tabs: int,
    n: int,
    out: int,
    rows: int | None = None,
) -> None: ...
def idmap_claim(
    slots: tuple[int, int, int], capacity: int, keys: int, tabs: int, n: int, out: int
) -> int: ...
def idmap_claim_blank(
    slots: tuple[int, int, int], capacity: int, keys: int, tabs: int, n: int, out: int
) -> None: ...
def group_pairs(
    keys: int,
    tabs: int,
    n: int,
    out: tuple[int, int, int],
    positions: tuple[int, int] | None = None,
) -> int: ...
def adam_moments(
    rows: list[tuple[int, int]], n: int, d: int, hyper: tuple[float, float, float, float]
) -> None: ...
def adam_apply(rows: list[tuple[int, int]], n: int, d: int, eps: float) -> None: ...
def adam_block_rows(
    blocks: list[int],
    shift: int,
    width: int,
    rows: int,
    n: int,
    grad: int,
    d: int,
    columns: tuple[int, int, int, int],
    hyper: tuple[float, float, float, float],
    lr: float,
    eps: float,
) -> None: ...
def rowwise_adagrad_block_rows(
    blocks: list[int],
    shift: int,
    width: int,
    rows: int,
    n: int,
    grad: int,
    d: int,
    columns: tuple[int, int],
    hyper: tuple[float, float, float],
) -> None: ...
def interleave_bags(
    members: list[tuple[int, int, int | None, int, int | None]],
    rows: int,
    n: int,
    out: tuple[int, int, int | None, int],
) -> None: ...
def copy_block_rows(
    blocks: list[int],
    shift: int,
    row_bytes: int,
    rows: int,
    n: int,
    start: int,
    len: int,
    data: int,
    stride: int,
    gather: bool,
) -> None: ...
def pooled_rows_grad(
    grad_out: int,
    m: int,
    d: int,
    bags: int | None,
    inverse: int,
    n: int,
    weights: int | None,
    out: int,
    rows: int,
) -> None: ...
def hashed_uniform(
    ids: int,
    n: int,
    seeds: int,
    seed_count: int,
    dim: int,
    out: int,
    threads: int,
) -> None: ...
