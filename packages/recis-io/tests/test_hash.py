from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import recis_io
from recis_io import Column, Dataset

from .conftest import write

# Reference values computed with Google's farmhash (util::Fingerprint64) through the `cityhash`
# Python package; they cover every length branch (0-16, 17-32, 33-64, > 64 in 64-byte blocks).
_DATA = bytes((i * 31) % 251 for i in range(300))
FARM_VECTORS = [
    (b"", 0x9AE16A3B2F90404F),
    (b"a", 0xB3454265B6DF75E3),
    (b"abc", 0x24A5B3A074E7F369),
    (b"hello", 0xB48BE5A931380CE8),
    (b"12345678", 0x2F99D2664A0FB6EA),
    (b"hello world!!", 0xDCB8BD9B390363D4),
    (b"abcdefghijklmnopq", 0x9E2106C72D7793A8),
    (_DATA[:33], 0x7315F39403C40BF1),
    (_DATA[:64], 0xAAE9A35B22A60291),
    (_DATA[:65], 0x3D48D0B277DF9954),
    (_DATA[:128], 0x594343CEFAFF91E0),
    (_DATA[:200], 0xF8EDCF7CD0D4187F),
    (_DATA[:300], 0xF4781EA5A98DE429),
]


def murmur64a(data: bytes, seed: int = 0) -> int:
    """MurmurHash64A as published by Austin Appleby (SMHasher), in plain Python."""
    m, r, mask = 0xC6A4A7935BD1E995, 47, (1 << 64) - 1
    h = (seed ^ (len(data) * m)) & mask
    n = len(data) // 8 * 8
    for i in range(0, n, 8):
        k = int.from_bytes(data[i : i + 8], "little")
        k = (k * m) & mask
        k ^= k >> r
        k = (k * m) & mask
        h ^= k
        h = (h * m) & mask
    tail = data[n:]
    if tail:
        h ^= int.from_bytes(tail, "little")
        h = (h * m) & mask
    h ^= h >> r
    h = (h * m) & mask
    h ^= h >> r
    return h


def signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


@pytest.mark.parametrize(("data", "expected"), FARM_VECTORS)
def test_farm_fingerprint64_vectors(data: bytes, expected: int) -> None:
    assert recis_io.hash_bytes(data, "farm") == signed(expected)


def test_murmur_of_empty_is_zero() -> None:
    assert recis_io.hash_bytes(b"", "murmur") == 0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_murmur64a_matches_reference(data: bytes) -> None:
    assert recis_io.hash_bytes(data, "murmur") == signed(murmur64a(data))


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=100), st.integers(1, 2**63))
def test_buckets_take_unsigned_remainder(data: bytes, buckets: int) -> None:
    full = recis_io.hash_bytes(data, "farm") & ((1 << 64) - 1)
    assert recis_io.hash_bytes(data, "farm", buckets) == full % buckets


def test_buckets_above_2_63_read_as_int64_bits(tmp_path, fmt: str) -> None:
    """With ``buckets`` above 2**63 an id at or above 2**63 reads as its int64 bits."""
    words = [f"w{i}" for i in range(64)]
    path = write(pa.table({"w": pa.array(words)}), tmp_path / f"b.{fmt}", fmt, 64)
    n = 2**64 - 1
    (batch,) = list(Dataset(path, batch_size=64, columns=[Column("w", hash="farm", buckets=n)]))
    unsigned = [(recis_io.hash_bytes(w.encode(), "farm") % 2**64) % n for w in words]
    assert any(u >= 2**63 for u in unsigned)
    assert batch["w"].tolist() == [signed(u) for u in unsigned]
    assert [recis_io.hash_bytes(w.encode(), "farm", n) for w in words] == batch["w"].tolist()


def test_unknown_hash_is_rejected() -> None:
    with pytest.raises(recis_io.InvalidArgumentError, match="hash must be"):
        recis_io.hash_bytes(b"x", "md5")


@pytest.mark.parametrize("kind", ["farm", "murmur"])
def test_hashed_columns_while_reading(tmp_path, fmt: str, kind: str) -> None:
    words = ["", "a", "hello", "x" * 70, None, "ünïcode"]
    lists = [["a", "b"], [], None, ["hello", None], ["x" * 40], ["z"]]
    table = pa.table(
        {"w": pa.array(words, pa.string()), "l": pa.array(lists, pa.list_(pa.string()))}
    )
    path = write(table, tmp_path / f"h.{fmt}", fmt, 4)
    cols = [Column("w", hash=kind, fill=-1), Column("l", hash=kind, buckets=1000, fill=7)]
    (batch,) = list(Dataset(path, batch_size=100, columns=cols))

    def h(s: str | None, buckets: int = 0) -> int:
        if s is None:
            return -1 if not buckets else 7
        return recis_io.hash_bytes(s.encode(), kind, buckets)

    assert batch["w"].tolist() == [h(w) for w in words]
    flat = [h(x, 1000) for row in lists if row for x in row]
    assert batch["l"].values.tolist() == flat
    assert batch["l"].offsets[0].tolist() == [0, 2, 2, 2, 4, 5, 6]


@pytest.mark.parametrize("kind", ["farm", "murmur"])
def test_hashed_fixed_size_string_lists_read_as_id_matrices(tmp_path, kind: str) -> None:
    rows = [["a", "b"], ["", None], None, ["hello", "x" * 70]]
    table = pa.table({"s": pa.array(rows, pa.list_(pa.string(), 2))})
    path = write(table, tmp_path / "f.parquet", "parquet", 2)
    (batch,) = list(Dataset(path, batch_size=10, columns=[Column("s", hash=kind, fill=-1)]))

    def h(s: str | None) -> int:
        return -1 if s is None else recis_io.hash_bytes(s.encode(), kind)

    assert batch["s"].shape == (4, 2)
    assert batch["s"].tolist() == [[h(x) for x in row] if row else [-1, -1] for row in rows]
    with pytest.raises(recis_io.InvalidArgumentError, match=r"column 's' holds strings.*hash="):
        next(iter(Dataset(path, batch_size=10, columns=["s"])))
