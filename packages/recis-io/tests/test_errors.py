from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pytest

from recis_io import (
    Column,
    CorruptFileError,
    DataFileNotFoundError,
    DataFileReadError,
    Dataset,
    InvalidArgumentError,
    RecisIOError,
    SchemaError,
)

from ._peak import PRINT_PEAK_KIB
from .conftest import ids_table, write


def test_missing_file_is_file_not_found(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.parquet") as info:
        Dataset(tmp_path / "nope.parquet", batch_size=4)
    assert isinstance(info.value, RecisIOError)
    assert (info.value.errno, info.value.filename) == (errno.ENOENT, str(tmp_path / "nope.parquet"))
    with pytest.raises(DataFileNotFoundError, match="matches no data files"):
        Dataset(str(tmp_path / "*.parquet"), batch_size=4)
    with pytest.raises(DataFileNotFoundError, match="holds no"):
        Dataset(tmp_path, batch_size=4)


def test_file_replaced_after_planning_is_an_os_error(tmp_path, fmt: str) -> None:
    # Planning read the file's metadata; the data is read from whatever is there later. The
    # operating system's refusal is not a corrupt file.
    # Enough rows that a row group ends past a directory's reported size (4096 bytes on
    # most file systems, less on some): the data range is not what tells.
    path = write(ids_table(5000), tmp_path / f"a.{fmt}", fmt, 5000)
    ds = Dataset(path, batch_size=64)
    path.unlink()
    path.mkdir()
    with pytest.raises(
        DataFileReadError,
        match=rf"^\[Errno 21\] cannot read .*a\.{fmt}, (row group|stripe) 0: is a directory$",
    ) as info:
        list(ds)
    assert info.value.errno == errno.EISDIR
    assert isinstance(info.value, OSError)
    assert isinstance(info.value, RecisIOError)
    path.rmdir()
    with pytest.raises(DataFileNotFoundError, match=rf"a\.{fmt}") as gone:
        list(ds)
    # errno and filename set, as open() sets them (both were None)
    assert (gone.value.errno, gone.value.filename) == (errno.ENOENT, str(path))


def test_file_rewritten_after_planning_is_refused_not_misread(tmp_path, fmt: str) -> None:
    # A Dataset keeps the footers it planned with (and reuses its reader across passes): a
    # file rewritten since then would be decoded at the old offsets, another column's bytes
    # read as this one's, or blamed as corrupt. Every read checks the file is the one planned.
    path = tmp_path / f"a.{fmt}"
    first = pa.table({"a": pa.array([1, 2, 3]), "b": pa.array([10, 20, 30])})
    write(first, path, fmt, 3)
    ds = Dataset(path, batch_size=10, columns=["a"])
    assert next(iter(ds))["a"].tolist() == [1, 2, 3]
    # The same schema, the columns stored the other way round: same size, other layout.
    write(pa.table({"b": pa.array([7, 8, 9]), "a": pa.array([4, 5, 6])}), path, fmt, 3)
    planned = os.stat(path)
    os.utime(path, ns=(planned.st_atime_ns, planned.st_mtime_ns + 10**9))  # a later tick
    with pytest.raises(
        DataFileReadError,
        match=rf"cannot read .*a\.{fmt}, (row group|stripe) 0: the file changed after the "
        r"Dataset read its metadata \((its size was \d+ bytes, now \d+|its modification time "
        r"changed)\); create a new Dataset to read it as it is now$",
    ) as info:
        list(ds)
    assert info.value.errno == errno.ESTALE
    assert next(iter(Dataset(path, batch_size=10, columns=["a"])))["a"].tolist() == [4, 5, 6]
    # More rows: not silently left unread.
    ds = Dataset(path, batch_size=10, columns=["a"])
    write(pa.table({"a": pa.array(range(100)), "b": pa.array(range(100))}), path, fmt, 50)
    with pytest.raises(DataFileReadError, match=r"its size was \d+ bytes, now \d+"):
        list(ds)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may read any file"
)
def test_unreadable_file_is_an_os_error(tmp_path) -> None:
    path = write(ids_table(10), tmp_path / "a.parquet", "parquet", 10)
    path.chmod(0)
    with pytest.raises(DataFileReadError, match=r"a\.parquet: permission denied") as info:
        Dataset(path, batch_size=4)
    assert info.value.errno == errno.EACCES


@pytest.mark.parametrize("keep", [0, 0.5, 0.95])
def test_truncated_file_names_the_file(tmp_path, fmt: str, keep: float) -> None:
    good = write(ids_table(500), tmp_path / f"good.{fmt}", fmt, 100)
    data = good.read_bytes()
    bad = tmp_path / f"bad.{fmt}"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CorruptFileError, match="bad"):
        list(Dataset([good, bad], batch_size=64))


def test_corrupt_pages_name_the_file_and_unit(tmp_path) -> None:
    good = write(ids_table(2000), tmp_path / "c.parquet", "parquet", 500)
    data = bytearray(good.read_bytes())
    # Scramble the data pages but keep the footer intact, so only decoding can notice.
    for i in range(8, len(data) // 2):
        data[i] ^= 0x5A
    good.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"c\.parquet"):
        list(Dataset(good, batch_size=64, num_threads=2))


def test_corrupt_pages_surface_through_shuffled_batches(tmp_path) -> None:
    """Shuffled batches are assembled on a thread of their own: its decoding error reaches
    the caller, after the batches read before it, and reading again raises it again."""
    good = write(ids_table(2000), tmp_path / "a.parquet", "parquet", 500)
    bad = write(ids_table(2000), tmp_path / "b.parquet", "parquet", 500)
    data = bytearray(bad.read_bytes())
    for i in range(8, len(data) // 2):
        data[i] ^= 0x5A
    bad.write_bytes(bytes(data))
    ds = Dataset([good, bad], batch_size=100, shuffle=True, seed=1, shuffle_window=500)
    it = iter(ds)
    with pytest.raises(CorruptFileError, match=r"b\.parquet"):
        list(it)
    with pytest.raises(CorruptFileError, match=r"b\.parquet"):
        next(it)


def test_garbage_file_is_corrupt(tmp_path, fmt: str) -> None:
    p = tmp_path / f"g.{fmt}"
    p.write_bytes(b"this is not a columnar file at all" * 10)
    name = {"parquet": "a Parquet", "orc": "an ORC"}[fmt]
    with pytest.raises(CorruptFileError, match=rf"g\.{fmt}: not {name} file: it does not begin"):
        Dataset(p, batch_size=2)


def test_a_file_of_the_other_format_is_named_as_such(tmp_path, fmt: str) -> None:
    other = {"parquet": "orc", "orc": "parquet"}[fmt]
    data = write(ids_table(10), tmp_path / f"d.{fmt}", fmt, 10).read_bytes()
    p = tmp_path / f"d.{other}"
    p.write_bytes(data)
    with pytest.raises(
        CorruptFileError, match=rf"it begins like an? \w+ file: pass format='{fmt}'"
    ):
        Dataset(p, batch_size=2)
    assert len(list(Dataset(p, batch_size=2, format=fmt))) == 5


def test_empty_file_reads_nothing(tmp_path, fmt: str) -> None:
    p = write(ids_table(0), tmp_path / f"e.{fmt}", fmt, 10)
    ds = Dataset(p, batch_size=4)
    assert ds.total_rows == 0
    assert list(ds) == []


def test_a_data_set_of_empty_files_typed_null_reads_nothing(tmp_path) -> None:
    # Its only file typed a column null (no values to type it by): every column was planned
    # from it and the data set raised SchemaError instead of being empty.
    path = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"x": pa.array([], pa.null()), "y": pa.array([], pa.int64())}), path)
    ds = Dataset(path, batch_size=4)
    assert list(ds) == []
    assert ds.batches_per_epoch() == 0
    with pytest.raises(SchemaError, match="column 'x' has unsupported type Null"):
        Dataset(path, batch_size=4, columns=["x"])  # asked for by name: its type is unknown


@pytest.mark.parametrize("empty_first", [True, False])
def test_files_without_rows_are_not_checked_against_the_others(tmp_path, empty_first) -> None:
    # Writers type an empty file's column from no values: pyarrow gives an all-None column the
    # null type. Such a file contributes nothing and must not stop the others from being read.
    full = pa.table({"a": pa.array([1, 2]), "s": pa.array(["x", "y"])})
    a = write(full, tmp_path / "a.parquet", "parquet", 10)
    b = tmp_path / "b.parquet"
    pq.write_table(pa.table({"s": pa.array([], pa.null())}), b)  # no rows, no column 'a'
    files = [b, a] if empty_first else [a, b]
    for columns in (None, ["a", Column("s", hash="murmur")]):
        ds = Dataset(files, batch_size=4, columns=columns)
        (batch,) = list(ds)
        assert list(batch) == ["a", "s"]
        assert batch["a"].tolist() == [1, 2]


def test_a_column_typed_null_in_a_file_with_rows_is_refused_by_name(tmp_path) -> None:
    # pyarrow types a column that is None in every row as null (one day's partition, say):
    # its values have no type to read them as, fill or not.
    day1, day2 = tmp_path / "day1.parquet", tmp_path / "day2.parquet"
    pq.write_table(pa.table({"s": ["a", "b"], "x": [1.0, 2.0]}), day1)
    pq.write_table(pa.table({"s": pa.array([None, None]), "x": [3.0, 4.0]}), day2)
    for column in (Column("s", fill=""), Column("s", hash="farm", fill=0)):
        with pytest.raises(SchemaError, match=r"column 's' has type Null in .*day2\.parquet"):
            Dataset([day1, day2], batch_size=4, columns=[column, "x"])
    (batch,) = list(Dataset([day1, day2], batch_size=4, columns=["x"]))
    assert batch["x"].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_columns_named_twice_in_a_file_are_schema_errors(tmp_path) -> None:
    p = tmp_path / "twice.parquet"
    pq.write_table(pa.table([pa.array([1, 2]), pa.array([3, 4])], names=["x", "x"]), p)
    for columns in (None, ["x"]):
        with pytest.raises(SchemaError, match=r"column 'x' appears 2 times in .*twice\.parquet"):
            Dataset(p, batch_size=4, columns=columns)


def test_missing_column_is_schema_error(tmp_path, fmt: str) -> None:
    p = write(ids_table(10), tmp_path / f"m.{fmt}", fmt, 10)
    with pytest.raises(SchemaError, match="column 'nope' not found"):
        Dataset(p, batch_size=4, columns=["nope"])


def test_mismatched_files_are_schema_errors(tmp_path) -> None:
    a = write(ids_table(10), tmp_path / "a.parquet", "parquet", 10)
    other = pa.table({"id": pa.array(["x"] * 10), "seq": pa.array([[1]] * 10)})
    b = write(other, tmp_path / "b.parquet", "parquet", 10)
    with pytest.raises(SchemaError, match=r"column 'id' has type Utf8 in .*b\.parquet"):
        Dataset([a, b], batch_size=4)
    c = write(pa.table({"id": pa.array([1])}), tmp_path / "c.parquet", "parquet", 10)
    with pytest.raises(ValueError, match="column 'seq' not found"):
        Dataset([a, c], batch_size=4)


def test_nulls_in_id_column_without_fill(tmp_path, fmt: str) -> None:
    p = write(pa.table({"u": pa.array([1, None, 3])}), tmp_path / f"n.{fmt}", fmt, 10)
    with pytest.raises(SchemaError, match="column 'u' has nulls and no fill value"):
        list(Dataset(p, batch_size=4))
    s = write(pa.table({"s": pa.array(["a", None])}), tmp_path / f"s.{fmt}", fmt, 10)
    with pytest.raises(SchemaError, match="column 's' has nulls"):
        list(Dataset(s, batch_size=4, columns=[Column("s", hash="farm")]))


def test_unsupported_type(tmp_path) -> None:
    p = write(pa.table({"d": pa.array([1, 2], pa.date32())}), tmp_path / "d.parquet", "parquet", 1)
    with pytest.raises(SchemaError, match="column 'd' has unsupported type"):
        Dataset(p, batch_size=4)


def test_bad_options(tmp_path) -> None:
    p = write(ids_table(10), tmp_path / "o.parquet", "parquet", 10)
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        Dataset(p, batch_size=0)
    with pytest.raises(InvalidArgumentError, match="rank"):
        Dataset(p, batch_size=1, rank=2, world_size=2)
    with pytest.raises(InvalidArgumentError, match="format"):
        Dataset(p, batch_size=1, format="csv")
    with pytest.raises(InvalidArgumentError, match="device"):
        Dataset(p, batch_size=1, device="tpu")
    with pytest.raises(InvalidArgumentError, match="hash"):
        Column("x", hash="sha1")
    with pytest.raises(SchemaError, match="hash needs a string column"):
        Dataset(p, batch_size=1, columns=[Column("id", hash="farm")])
    with pytest.raises(InvalidArgumentError, match="buckets without hash"):
        Dataset(p, batch_size=1, columns=[Column("id", buckets=3)])
    other = tmp_path / "x.bin"
    other.write_bytes(p.read_bytes())
    with pytest.raises(InvalidArgumentError, match="cannot tell the format"):
        Dataset(other, batch_size=1)
    assert len(list(Dataset(tmp_path / "x.bin", batch_size=4, format="parquet"))) == 3


def _zeroed(path: Path, start: int, length: int) -> Path:
    data = bytearray(path.read_bytes())
    data[start : start + length] = bytes(length)
    path.write_bytes(bytes(data))
    return path


def test_corrupt_orc_footer_is_corrupt_not_a_panic(tmp_path) -> None:
    """A zstd frame of the footer cut short makes the ORC decoder panic; that is a corrupt
    file, raised when the dataset opens it."""
    p = write(ids_table(500), tmp_path / "f.orc", "orc", 100)
    meta = orc.ORCFile(p)
    footer = meta.file_length - 1 - meta.file_postscript_length - meta.file_footer_length
    _zeroed(p, footer, 8)
    with pytest.raises(CorruptFileError, match=r"f\.orc: the decoder failed"):
        Dataset(p, batch_size=64)


@pytest.mark.parametrize("shuffle", [False, True])
def test_corrupt_orc_stripe_is_corrupt_not_a_panic(tmp_path, shuffle: bool) -> None:
    """Zeroed bytes inside the first stripe's compressed streams make the ORC decoder panic on
    a decode thread; the error names the file, stripe and column, shuffled or not, and with
    the column read alone (the other column reads, so the stripe as a whole is sound)."""
    good = write(ids_table(500), tmp_path / "good.orc", "orc", 100)
    bad = _zeroed(write(ids_table(500), tmp_path / "s.orc", "orc", 100), 100, 40)
    ds = Dataset([good, bad], batch_size=64, shuffle=shuffle, num_threads=2)
    with pytest.raises(
        CorruptFileError, match=r"s\.orc, stripe 0: column 'seq': the decoder failed: \S"
    ):
        list(ds)
    with pytest.raises(
        CorruptFileError, match=r"s\.orc, stripe 0: column 'seq': the decoder failed: \S"
    ):
        list(Dataset(bad, batch_size=64, columns=["seq"]))
    ids = [v for b in Dataset(bad, batch_size=64, columns=["id"]) for v in b["id"].tolist()]
    assert ids == list(range(500))


def test_caught_decoder_panics_print_nothing(tmp_path, capfd: pytest.CaptureFixture[str]) -> None:
    """A decoder panic that becomes a CorruptFileError (on opening or on a decode thread) is
    reported once, in the error, not also as a Rust panic message on stderr."""
    footer = write(ids_table(500), tmp_path / "f.orc", "orc", 100)
    meta = orc.ORCFile(footer)
    at = meta.file_length - 1 - meta.file_postscript_length - meta.file_footer_length
    _zeroed(footer, at, 8)
    stripe = _zeroed(write(ids_table(500), tmp_path / "s.orc", "orc", 100), 100, 40)
    capfd.readouterr()
    with pytest.raises(CorruptFileError, match=r"f\.orc: the decoder failed: \S"):
        Dataset(footer, batch_size=64)
    with pytest.raises(CorruptFileError, match=r"s\.orc, stripe 0: column 'seq': the decoder"):
        list(Dataset(stripe, batch_size=64, num_threads=2))
    err = capfd.readouterr().err
    assert "panicked" not in err, err
    assert "RUST_BACKTRACE" not in err, err


def test_orc_footer_with_looping_types_is_corrupt(tmp_path) -> None:
    """A footer whose list type names itself as its element would send the ORC schema parser
    into endless recursion (a stack overflow that kills the process); it is a corrupt file."""
    p = tmp_path / "loop.orc"
    table = pa.table({"seq": pa.array([[1, 2], [3]], pa.list_(pa.int64()))})
    orc.write_table(table, p, compression="uncompressed")
    data = p.read_bytes()
    # Type 1 of the footer: kind LIST (field 1 = 10), packed subtypes (field 2) = [2].
    list_type = bytes([0x08, 0x0A, 0x12, 0x01, 0x02])
    assert data.count(list_type) == 1
    p.write_bytes(data.replace(list_type, list_type[:-1] + b"\x01"))
    with pytest.raises(
        CorruptFileError, match=r"loop\.orc: malformed footer: type 1 lists subtype 1"
    ):
        Dataset(p, batch_size=2)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    """The unsigned LEB128 varint (protobuf's and Thrift compact's) at ``data[at:]`` and the
    offset after it."""
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, at


def _message(data: bytes) -> list[tuple[int, int | bytes]]:
    """The ``(field, value)`` pairs of a protobuf message (varint and length-delimited)."""
    out: list[tuple[int, int | bytes]] = []
    at = 0

    def varint() -> int:
        nonlocal at
        value, at = _read_varint(data, at)
        return value

    while at < len(data):
        key = varint()
        if key & 7 == 0:
            out.append((key >> 3, varint()))
        else:
            assert key & 7 == 2, key
            n = varint()
            out.append((key >> 3, data[at : at + n]))
            at += n
    return out


def _orc_stream(data: bytes, column: int, kind: int) -> tuple[int, int]:
    """Offset and length of column ``column``'s stream of kind ``kind`` in the first stripe
    of the uncompressed ORC file ``data``."""
    ps_len = data[-1]
    postscript = dict(_message(data[-1 - ps_len : -1]))
    assert postscript.get(2, 0) == 0, "uncompressed files only"
    end = len(data) - 1 - ps_len
    footer = _message(data[end - postscript[1] : end])
    stripe = dict(_message(next(v for f, v in footer if f == 3)))
    start = stripe[1] + stripe.get(2, 0) + stripe[3]
    at = stripe[1]
    for field, value in _message(data[start : start + stripe[4]]):
        if field == 1:
            stream = dict(_message(value))
            if (stream.get(2, 0), stream.get(1, 0)) == (column, kind):
                return at, stream[3]
            at += stream[3]
    raise AssertionError(f"no stream of kind {kind} for column {column}")


def _corrupt_file_error(
    path: Path, batch_size: int, iterate: bool = True
) -> subprocess.CompletedProcess[str]:
    """Opens ``path`` with recis-io (and reads it, with ``iterate``) in a child process, which
    an abort cannot take the tests down with, and returns it finished: it prints the
    ``CorruptFileError`` raised, and must exit normally."""
    read = f"recis_io.Dataset(sys.argv[1], batch_size={batch_size})"
    if iterate:
        read = f"for _ in {read}: pass"
    script = (
        "import sys, recis_io\n"
        "try:\n"
        f"    {read}\n"
        "except recis_io.exceptions.CorruptFileError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.parametrize("nested", [False, True])
def test_orc_list_lengths_beyond_memory_are_corrupt_not_an_abort(tmp_path, nested: bool) -> None:
    """A length stream claiming 2**40 values per list made the ORC decoder allocate their
    sum at once, and the failed allocation aborted the process; it is a corrupt file that
    names the column and stripe, for a list of lists too."""
    lists = [list(range(i % 5)) for i in range(512)]
    if nested:
        seq = pa.array([[x] for x in lists], pa.list_(pa.list_(pa.int64())))
    else:
        seq = pa.array(lists, pa.list_(pa.int64()))
    p = tmp_path / "len.orc"
    orc.write_table(pa.table({"seq": seq}), p, compression="uncompressed")
    data = bytearray(p.read_bytes())
    offset, length = _orc_stream(bytes(data), 2 if nested else 1, kind=2)
    # RLE v2 delta run, fixed delta 0: 512 lengths of 2**40; then runs of three zeros.
    run = bytes([0xC1, 0xFF]) + _varint(1 << 40) + _varint(0)
    pad = length - len(run)
    run += (bytes([0x08, 0, 0]) if pad % 2 else b"") + bytes(pad - 3 * (pad % 2))
    data[offset : offset + length] = run
    p.write_bytes(bytes(data))
    done = _corrupt_file_error(p, batch_size=64)
    assert "len.orc, stripe 0: column 'seq' claims" in done.stdout, done.stdout
    assert "so its length stream is corrupt" in done.stdout, done.stdout


def test_fill_out_of_range_names_the_file(tmp_path) -> None:
    """A fill that does not fit the column's type names the file the type was read from (a
    corrupt footer can turn a float column into a bool one)."""
    p = write(pa.table({"b": pa.array([True, None])}), tmp_path / "b.parquet", "parquet", 10)
    with pytest.raises(
        InvalidArgumentError, match=r"out of range for bool: .*\(file .*b\.parquet\)"
    ):
        Dataset(p, batch_size=2, columns=[Column("b", fill=2)])


def _encode(fields: list[tuple[int, int | bytes]]) -> bytes:
    """A protobuf message of ``(field, value)`` pairs (varints and length-delimited bytes)."""
    out = bytearray()
    for field, value in fields:
        if isinstance(value, int):
            out += _varint(field << 3) + _varint(value)
        else:
            out += _varint(field << 3 | 2) + _varint(len(value)) + value
    return bytes(out)


def _set(fields: list[tuple[int, int | bytes]], field: int, value: int) -> list:
    return [(f, value if f == field else v) for f, v in fields]


def _damaged_orc(tmp_path: Path, damage: str, compression: str = "uncompressed") -> Path:
    """A one-stripe ORC file with one length in its metadata damaged: ``"footer"`` (the
    stripe footer's length), ``"stream"`` (a data stream's length in the stripe footer),
    ``"block"`` (the postscript's compression block size), ``"metadata"`` (the postscript's
    metadata length) or ``"rows"`` (the stripe's row count, 0)."""
    p = tmp_path / f"{damage}.orc"
    table = pa.table(
        {"i": pa.array(range(1000), pa.int64()), "s": [f"x{k % 7}" for k in range(1000)]}
    )
    orc.write_table(table, p, compression=compression)
    data = p.read_bytes()
    ps_len = data[-1]
    postscript = _message(data[-1 - ps_len : -1])
    if damage in ("block", "metadata"):
        field, value = (3, 1 << 62) if damage == "block" else (5, 1 << 40)
        new_ps = _encode(_set(postscript, field, value))
        p.write_bytes(data[: -1 - ps_len] + new_ps + bytes([len(new_ps)]))
        return p
    end = len(data) - 1 - ps_len
    footer_len = dict(postscript)[1]
    footer = _message(data[end - footer_len : end])
    stripe = _message(next(v for f, v in footer if f == 3))
    info = dict(stripe)
    start = info[1] + info.get(2, 0) + info[3]
    body, stripe_footer = data[:start], data[start : start + info[4]]
    if damage == "stream":
        streams = _message(stripe_footer)
        first_data = next(
            k for k, (f, v) in enumerate(streams) if f == 1 and dict(_message(v)).get(1) == 1
        )
        stream = _set(_message(streams[first_data][1]), 3, 1 << 60)
        streams[first_data] = (1, _encode(stream))
        stripe_footer = _encode(streams)
        stripe = _set(stripe, 4, len(stripe_footer))
    elif damage == "footer":
        stripe = _set(stripe, 4, 1 << 60)
    else:
        stripe = _set(stripe, 5, 0)
    footer = [(f, _encode(stripe) if f == 3 else v) for f, v in footer]
    new_footer = _encode(footer)
    new_ps = _encode(_set(postscript, 1, len(new_footer)))
    rest = data[start + info[4] : end - footer_len]
    p.write_bytes(body + stripe_footer + rest + new_footer + new_ps + bytes([len(new_ps)]))
    return p


@pytest.mark.parametrize(
    ("damage", "compression", "message"),
    [
        (
            "footer",
            "uncompressed",
            r"stripe 0 claims .* footer bytes from byte 3, beyond the file's",
        ),
        (
            "stream",
            "uncompressed",
            r"stripe 0: a stream of column 1 claims 1152921504606846976 bytes",
        ),
        ("block", "lz4", r"compression block size 4611686018427387904 bytes"),
        ("rows", "uncompressed", r"the stripes hold 0 rows, the file footer says 1000"),
        ("metadata", "zstd", r"and 1099511627776 bytes of metadata claimed before byte"),
    ],
)
def test_orc_metadata_lengths_beyond_the_file_are_corrupt_not_an_abort(
    tmp_path, damage: str, compression: str, message: str
) -> None:
    """orc-rust reads a stripe's footer and streams, and decompresses blocks, into buffers
    of the sizes the file claims: a damaged length of exabytes aborted the process, and a
    stripe row count damaged to 0 read no rows without a word. Each is a corrupt file."""
    p = _damaged_orc(tmp_path, damage, compression)
    done = _corrupt_file_error(p, batch_size=100)
    assert f"{damage}.orc" in done.stdout, done.stdout
    assert re.search(message, done.stdout), done.stdout


def test_parquet_row_group_rows_beyond_its_values_are_corrupt_not_an_abort(tmp_path) -> None:
    """Reading sizes its work by a row group's row count: one damaged to 2**40 aborted the
    process (a failed allocation). No row group holds more rows than its column chunks hold
    values, and the row groups' rows add up to the file's."""
    p = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"i": pa.array(range(1000), pa.int64())}), p, compression="snappy")
    data = p.read_bytes()
    length = int.from_bytes(data[-8:-4], "little")
    footer = data[-8 - length : -8]
    # FileMetaData.num_rows, the column chunk's num_values, then RowGroup.num_rows, the last:
    # each a compact-protocol i64 one field after the one before it, 1000.
    field = bytes([0x16]) + _varint(2000)  # zigzag(1000)
    assert footer.count(field) == 3
    at = footer.rindex(field)
    for value, message in (
        (1 << 40, r"row group 0 claims 1099511627776 rows, more than its column chunks hold"),
        (999, r"the row groups hold 999 rows, the file footer says 1000"),
    ):
        edited = footer[:at] + bytes([0x16]) + _varint(2 * value) + footer[at + len(field) :]
        p.write_bytes(data[: -8 - length] + edited + len(edited).to_bytes(4, "little") + b"PAR1")
        with pytest.raises(CorruptFileError, match=message):
            Dataset(p, batch_size=100)


def test_a_parquet_footer_list_claiming_more_entries_than_bytes_is_corrupt_not_an_abort(
    tmp_path,
) -> None:
    """The footer decoder reserves a list's entries before reading them: a row-group list
    claiming 2**31 - 1 entries asked for hundreds of gigabytes and aborted the process."""
    p = tmp_path / "list.parquet"
    pq.write_table(pa.table({"i": pa.array(range(1000), pa.int64())}), p)
    data = p.read_bytes()
    length = int.from_bytes(data[-8:-4], "little")
    footer = data[-8 - length : -8]
    # FileMetaData.num_rows (field 3, 1000), then field 4, the row groups: a list of 1 struct.
    rows = bytes([0x16]) + _varint(2000)
    at = footer.index(rows) + len(rows)
    assert footer[at : at + 2] == bytes([0x19, 0x1C])
    edited = footer[: at + 1] + bytes([0xFC]) + _varint((1 << 31) - 1) + footer[at + 2 :]
    p.write_bytes(data[: -8 - length] + edited + len(edited).to_bytes(4, "little") + b"PAR1")
    done = _corrupt_file_error(p, batch_size=100, iterate=False)
    assert "list.parquet: malformed footer: a list claims 2147483647 entries" in done.stdout


# Thrift compact-protocol types of the fields of a Parquet page header.
_BOOL_TRUE, _BOOL_FALSE, _I32, _I64, _BINARY, _STRUCT = 1, 2, 5, 6, 8, 12


def _thrift_struct(data: bytes, at: int) -> tuple[list, int]:
    """The fields ``[id, type, value]`` of the compact-protocol struct at ``data[at:]`` (a
    struct's value is its fields, an integer's is decoded) and the offset after it."""

    def varint() -> int:
        nonlocal at
        value, at = _read_varint(data, at)
        return value

    fields: list = []
    last = 0
    while True:
        header = data[at]
        at += 1
        if header == 0:
            return fields, at
        kind = header & 0x0F
        if header >> 4:
            last += header >> 4
        else:
            z = varint()
            last = (z >> 1) ^ -(z & 1)
        if kind in (_BOOL_TRUE, _BOOL_FALSE):
            value: int | bytes | list = kind == _BOOL_TRUE
        elif kind in (4, _I32, _I64):
            z = varint()
            value = (z >> 1) ^ -(z & 1)
        elif kind == _BINARY:
            n = varint()
            value, at = data[at : at + n], at + n
        elif kind == _STRUCT:
            value, at = _thrift_struct(data, at)
        else:
            raise AssertionError(f"unexpected compact type {kind} in a page header")
        fields.append([last, kind, value])


def _thrift_encode(fields: list) -> bytes:
    """A compact-protocol struct of ``[id, type, value]`` fields (ids ascending)."""
    out = bytearray()
    last = 0
    for fid, kind, value in fields:
        if 0 < fid - last <= 15:
            out.append((fid - last) << 4 | kind)
        else:
            out += bytes([kind]) + _varint((fid << 1) ^ (fid >> 15))
        last = fid
        if kind in (4, _I32, _I64):
            out += _varint((value << 1) ^ (value >> 63))
        elif kind == _BINARY:
            out += _varint(len(value)) + value
        elif kind == _STRUCT:
            out += _thrift_encode(value)
    return bytes(out + b"\x00")


def _field(fields: list, fid: int) -> list:
    return next(f for f in fields if f[0] == fid)


def _damaged_page(path: Path, column: int, page: int, damage) -> int:
    """Applies ``damage`` to the header fields of page ``page`` of column ``column`` of row
    group 0 of the Parquet file ``path``, and returns the page's offset. The damaged header is
    re-encoded in the bytes of the old one: a longer header takes bytes from the end of the
    page's body (whose compressed size shrinks to match), a shorter one is padded with a field
    readers skip, so the column chunk keeps its length and the footer stays valid."""
    meta = pq.ParquetFile(path).metadata.row_group(0).column(column)
    at = meta.dictionary_page_offset if meta.has_dictionary_page else meta.data_page_offset
    data = bytearray(path.read_bytes())
    for _ in range(page):
        fields, end = _thrift_struct(bytes(data), at)
        at = end + _field(fields, 3)[2]
    fields, end = _thrift_struct(bytes(data), at)
    body = _field(fields, 3)[2]
    damage(fields)
    keep_size = _field(fields, 3)[2] != body  # the damage is to the size itself
    cut = 0
    while True:
        if not keep_size:
            _field(fields, 3)[2] = body - cut
        new = _thrift_encode(fields)
        gap = (end - at) - len(new) + cut
        if gap == 0:
            break
        if gap >= 4:
            new = _thrift_encode([*fields, [100, _BINARY, bytes(gap - 4)]])
            assert len(new) == end - at + cut
            break
        cut += 4 - gap if gap > 0 else -gap
    data[at : end + body] = new + data[end : end + body - cut]
    path.write_bytes(bytes(data))
    return at


def _set_page_field(*path_and_value: int):
    """A damage setting the field at the ids ``path_and_value[:-1]`` to the last value."""

    def damage(fields: list) -> None:
        *ids, value = path_and_value
        for fid in ids[:-1]:
            fields = _field(fields, fid)[2]
        _field(fields, ids[-1])[2] = value

    return damage


def _pages_table(rows: int = 4000) -> pa.Table:
    return pa.table(
        {
            "id": pa.array([i % 500 for i in range(rows)], pa.int64()),
            "s": pa.array([f"v{i % 300}" for i in range(rows)]),
        }
    )


def _peak_rss(path: Path, batch_size: int) -> tuple[str, int]:
    """Reads ``path`` in a child process (see ``_corrupt_file_error``): the
    ``CorruptFileError`` it raised and its peak resident memory in bytes."""
    script = (
        "import sys, recis_io\n"
        "try:\n"
        f"    for _ in recis_io.Dataset(sys.argv[1], batch_size={batch_size}): pass\n"
        "except recis_io.exceptions.CorruptFileError as e:\n"
        "    print(e)\n"
    ) + PRINT_PEAK_KIB
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    *error, rss = done.stdout.strip().splitlines()
    return "\n".join(error), int(rss) * 1024


@pytest.mark.parametrize(("column", "name"), [(0, "id"), (1, "s")])
def test_parquet_dictionary_page_values_beyond_its_bytes_are_corrupt_not_an_abort(
    tmp_path, column: int, name: str
) -> None:
    """The dictionary decoders make room for as many values as the dictionary page header
    claims before reading them: 2**31 - 1 int64 values filled 16 GiB, and aborted the process
    where that much could not be had. Each value takes at least 8 bytes (an int64) or 4 (the
    length of a string), so the page's size bounds its count."""
    p = tmp_path / "dict.parquet"
    pq.write_table(_pages_table(), p, compression="none")
    at = _damaged_page(p, column, 0, _set_page_field(7, 1, (1 << 31) - 1))
    error, rss = _peak_rss(p, batch_size=100)
    assert (
        f"dict.parquet, row group 0: column '{name}': the dictionary page at byte {at} claims "
        "2147483647 values, more than its" in error
    ), error
    assert rss < 1 << 30, rss


@pytest.mark.parametrize("column", [0, 1])
def test_parquet_page_uncompressed_size_beyond_the_column_chunk_is_corrupt(
    tmp_path, column: int
) -> None:
    """A page is decompressed into a buffer of the size its header claims: a size damaged to
    2**31 - 1 zero-filled 2 GiB (snappy) before the decompressor found the page short. A page
    beyond four times its whole column chunk and 256 MiB is refused before any of that
    memory."""
    p = tmp_path / "size.parquet"
    pq.write_table(_pages_table(), p, compression="snappy")
    at = _damaged_page(p, column, 1, _set_page_field(2, (1 << 31) - 1))
    error, rss = _peak_rss(p, batch_size=100)
    assert re.search(
        rf"size\.parquet, row group 0: column '(id|s)': the page at byte {at} claims 2147483647 "
        r"bytes uncompressed, more than four times the whole column chunk's \d+ and than "
        r"268435456$",
        error,
    ), error
    assert rss < 1 << 30, rss


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        # A data page's value count off by one: the pages no longer add up to the chunk's.
        (
            lambda f: _field(_field(f, 5)[2], 1).__setitem__(2, _field(_field(f, 5)[2], 1)[2] + 1),
            r"the data page at byte \d+ claims \d+ values, more than the \d+ the column chunk's "
            r"metadata leaves for it \(of 4000\)",
        ),
        (
            lambda f: _field(_field(f, 5)[2], 1).__setitem__(2, _field(_field(f, 5)[2], 1)[2] - 1),
            r"the data pages hold 3999 values, the column chunk's metadata says 4000",
        ),
        (
            _set_page_field(5, 1, -5),
            r"the data page at byte \d+ claims -5 values",
        ),
        (
            _set_page_field(3, 1 << 30),
            r"the page at byte \d+ claims 1073741824 bytes, the column chunk has \d+ left",
        ),
        (_set_page_field(1, 9), r"the page at byte \d+ has unknown type 9"),
        (
            lambda f: f.remove(_field(f, 5)),
            r"the page header at byte \d+ does not parse within the column chunk",
        ),
    ],
)
def test_parquet_damaged_data_page_headers_name_the_column(tmp_path, damage, message) -> None:
    """A data page header that cannot be right is refused before decoding, naming the file,
    row group, column and page, whatever the damage."""
    p = tmp_path / "data.parquet"
    table = pa.table({"x": pa.array(range(4000), pa.int64())})
    pq.write_table(table, p, compression="none", use_dictionary=False, data_page_size=4096)
    _damaged_page(p, 0, 1, damage)
    with pytest.raises(
        CorruptFileError, match=r"data\.parquet, row group 0: column 'x': " + message
    ):
        list(Dataset(p, batch_size=100))


def _damaged_data(path: Path, column: int, at: float, data: bytes) -> None:
    """``data`` written over the bytes of column chunk ``column`` of row group 0 from the
    fraction ``at`` of its length: the page headers stay whole, the encoded values do not."""
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(column)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    offset = start + int(chunk.total_compressed_size * at)
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("column", "at", "data", "name", "message"),
    [
        # Dictionary indices past the dictionary (ids read by the direct decoder).
        (0, 0.9, b"\xff" * 32, "id", "dictionary index out of bounds"),
        # A plain string's length prefix cut into its bytes (strings read through Arrow).
        (2, 0.5, b"\xff\xff\xff\x7f", "s", "non UTF-8 data"),
    ],
)
def test_parquet_damaged_values_name_the_column(
    tmp_path, column: int, at: float, data: bytes, name: str, message: str
) -> None:
    """Values that do not decode are refused naming the file, row group and column, whether
    the column is read with others or alone, and the other columns still read."""
    p = tmp_path / "values.parquet"
    n = 10_000
    table = pa.table(
        {
            "id": pa.array([i % 1000 for i in range(n)], pa.int64()),
            "x": pa.array([i / 7 for i in range(n)], pa.float64()),
            "s": pa.array([str(i) for i in range(n)]),
        }
    )
    pq.write_table(table, p, compression="none", use_dictionary=["id"])
    _damaged_data(p, column, at, data)
    pattern = rf"values\.parquet, row group 0: column '{name}': .*{message}"
    for columns in (None, [name]):
        with pytest.raises(CorruptFileError, match=pattern):
            list(Dataset(p, batch_size=1000, columns=columns))
    others = [c for c in table.column_names if c != name]
    read = list(Dataset(p, batch_size=n, columns=others))
    assert read[0]["x"].tolist() == table["x"].to_pylist()


def test_parquet_v2_data_page_counts_are_checked(tmp_path) -> None:
    """A v2 data page claiming more nulls than values is refused, naming the column."""
    p = tmp_path / "v2.parquet"
    table = pa.table({"x": pa.array([None if i % 3 else i for i in range(4000)], pa.float64())})
    pq.write_table(table, p, compression="snappy", data_page_version="2.0", use_dictionary=False)
    _damaged_page(p, 0, 0, _set_page_field(8, 2, 1 << 20))
    with pytest.raises(
        CorruptFileError,
        match=r"v2\.parquet, row group 0: column 'x': the data page at byte 4 claims 1048576 "
        r"nulls and \d+ rows in \d+ values",
    ):
        list(Dataset(p, batch_size=100))


def test_parquet_pages_padded_with_unknown_fields_read_as_before(tmp_path) -> None:
    """The damage above re-encodes page headers in place; undamaged, the file reads as it was
    written, so each error comes from the damage alone."""
    p = tmp_path / "same.parquet"
    table = _pages_table()
    pq.write_table(table, p, compression="zstd")
    for column in (0, 1):
        _damaged_page(p, column, 0, lambda f: None)
        # The data page's statistics dropped: the header is padded to its old length.
        _damaged_page(p, column, 1, lambda f: _field(f, 5)[2].remove(_field(_field(f, 5)[2], 5)))
    ids = [v for b in Dataset(p, batch_size=1000, columns=["id"]) for v in b["id"].tolist()]
    assert ids == table["id"].to_pylist()
    assert pq.read_table(p).equals(table)
