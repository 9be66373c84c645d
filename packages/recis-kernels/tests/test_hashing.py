from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import signed64
from hash_reference import farm64, murmur64a
from hypothesis import given
from hypothesis import strategies as st

import recis_kernels as rk

# Fingerprint64 values published for BigQuery's FARM_FINGERPRINT and Redshift's
# farmFingerprint64, plus longer strings hashed with the FarmHash C++ library (pyfarmhash 0.5.1)
# to cover the 17-32, 33-64 and >64 byte code paths.
FARM_VECTORS = [
    (b"", -7286425919675154353),
    (b"alphabet", -2427165924636348523),
    (b"Amazon Redshift", 8085098817162212970),
    (b"1footrue", -1541654101129638711),
    (b"2applefalse", 2794438866806483259),
    (b"3true", -4880158226897771312),
    (("recis-" * 60)[:17].encode(), 3292599429551541409),
    (("recis-" * 60)[:40].encode(), -5784860375319977568),
    (("recis-" * 60)[:65].encode(), 7801915495504568540),
    (("recis-" * 60)[:130].encode(), 1938578309176732121),
    (("recis-" * 60)[:257].encode(), -5388163204837759424),
]


def pack(strings: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.tensor(list(b"".join(strings)), dtype=torch.uint8)
    offsets = torch.tensor(np.cumsum([0, *[len(s) for s in strings]]), dtype=torch.int64)
    return data, offsets


@pytest.mark.parametrize(("text", "expected"), FARM_VECTORS)
def test_farm_published_vectors(text, expected):
    assert rk.hash_bytes(*pack([text]), "farm").tolist() == [expected]
    assert signed64(farm64(text)) == expected


def test_murmur_known_values():
    # MurmurHash64A with seed 0 maps the empty input to 0 (every step of the mix keeps 0).
    assert rk.hash_strings([""], "murmur").tolist() == [0]
    data, offsets = pack([b"hello", b"hello world", b"x" * 100])
    expected = [signed64(murmur64a(s)) for s in (b"hello", b"hello world", b"x" * 100)]
    assert rk.hash_bytes(data, offsets, "murmur").tolist() == expected


bytes_st = st.lists(
    st.one_of(st.binary(max_size=20), st.binary(min_size=60, max_size=300)), max_size=12
)


@given(strings=bytes_st, algorithm=st.sampled_from(["farm", "murmur"]))
def test_hash_bytes_matches_reference(strings, algorithm):
    ref = farm64 if algorithm == "farm" else murmur64a
    got = rk.hash_bytes(*pack(strings), algorithm)
    assert got.dtype == torch.int64
    assert got.tolist() == [signed64(ref(s)) for s in strings]


@given(strings=st.lists(st.binary(max_size=40), max_size=10), buckets=st.integers(1, (1 << 63) - 1))
def test_buckets_take_unsigned_remainder(strings, buckets):
    got = rk.hash_bytes(*pack(strings), "farm", buckets)
    assert got.tolist() == [farm64(s) % buckets for s in strings]


def test_every_length_up_to_200():
    strings = [bytes((i * 7 + j) % 256 for j in range(i)) for i in range(201)]
    for algorithm, ref in (("farm", farm64), ("murmur", murmur64a)):
        got = rk.hash_bytes(*pack(strings), algorithm).tolist()
        assert got == [signed64(ref(s)) for s in strings]


@pytest.mark.parametrize("algorithm", ["farm", "murmur"])
def test_strings_at_the_end_of_the_bytes(algorithm):
    """Empty and short strings ending the buffer (words are read at their start, up to the
    last byte): each still hashes as the reference."""
    ref = farm64 if algorithm == "farm" else murmur64a
    for strings in ([b"abcdefghij", b""], [b"", b""], [b"x" * 70, b"a", b""], [b"abc"]):
        got = rk.hash_bytes(*pack(strings), algorithm).tolist()
        assert got == [signed64(ref(s)) for s in strings]


def test_torch_implementation_matches_reference():
    """The torch version (what compiled code and CUDA tensors without the kernels run; eager
    CPU calls use NumPy) on every length class, against the references."""
    from recis_kernels.ops import _farm

    strings = [bytes((i * 11 + j) % 256 for j in range(i)) for i in range(201)] + [b""]
    data, offsets = pack(strings)
    for fn, ref in ((_farm.farm_fingerprint64, farm64), (_farm.murmur64a, murmur64a)):
        assert fn(data, offsets).tolist() == [signed64(ref(s)) for s in strings]


@given(strings=bytes_st)
def test_numpy_and_torch_implementations_agree(strings):
    from recis_kernels.ops import _farm, _farm_host

    data, offsets = pack(strings)
    for torch_fn, host_fn in (
        (_farm.farm_fingerprint64, _farm_host.farm_fingerprint64),
        (_farm.murmur64a, _farm_host.murmur64a),
    ):
        host = host_fn(data.numpy(), offsets.numpy())
        assert torch_fn(data, offsets).tolist() == host.tolist()


def test_hash_strings_inputs_agree():
    words = ["alphabet", "", "ünïcode", "x" * 70]
    expected = rk.hash_bytes(*pack([w.encode() for w in words]), "murmur").tolist()
    assert rk.hash_strings(words, "murmur").tolist() == expected
    assert rk.hash_strings(np.array(words, dtype=object), "murmur").tolist() == expected
    assert rk.hash_strings([w.encode() for w in words], "murmur").tolist() == expected
    for typ in (pa.string(), pa.large_string()):
        arr = pa.array(["skip", *words], type=typ).slice(1)
        assert rk.hash_strings(arr, "murmur").tolist() == expected
    chunked = pa.chunked_array([words[:2], words[2:]])
    assert rk.hash_strings(chunked, "murmur").tolist() == expected


def test_nulls_hash_like_empty_string():
    empty = rk.hash_strings([""]).item()
    assert rk.hash_strings(["a", None]).tolist()[1] == empty
    assert rk.hash_strings(pa.array(["a", None, "b"])).tolist()[1] == empty


def test_hash_errors():
    data, offsets = pack([b"ab"])
    with pytest.raises(ValueError, match="algorithm must be 'farm' or 'murmur', got 'md5'"):
        rk.hash_bytes(data, offsets, "md5")
    # A list is refused by name (it raised a bare TypeError: unhashable type).
    with pytest.raises(
        rk.ArgumentError, match=r"hash_strings: algorithm must be .*, got \['farm'\]"
    ):
        rk.hash_strings(["a"], ["farm"])
    with pytest.raises(rk.ArgumentError, match=r"hash_bytes: algorithm must be .*, got \['farm'\]"):
        rk.hash_bytes(data, offsets, ["farm"])
    with pytest.raises(ValueError, match=r"buckets must be an int in \[0, 2\*\*63 - 1\], got -1"):
        rk.hash_bytes(data, offsets, "farm", -1)
    with pytest.raises(
        rk.UnsupportedDtypeError, match="hash_bytes: data has dtype int8, expected uint8"
    ):
        rk.hash_bytes(data.to(torch.int8), offsets)
    with pytest.raises(ValueError, match=r"offsets must start at 0.*end at len\(data\) = 2"):
        rk.hash_bytes(data, torch.tensor([0, 1]))
    with pytest.raises(
        rk.IndexOutOfRangeError,
        match=r"hash_bytes: offsets\[1\] = 3 is out of range, expected a value in \[0, 2\]",
    ):
        rk.hash_bytes(data, torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="expected a sequence of strings, got a single str"):
        rk.hash_strings("abc")
    with pytest.raises(TypeError, match="strings must be str or bytes, got int"):
        rk.hash_strings([1])
    with pytest.raises(TypeError, match="arrow array must hold strings or binary, got int64"):
        rk.hash_strings(pa.array([1, 2]))


def test_hash_device_matches_cpu(device):
    strings = [bytes(range(n % 256)) * (1 + n // 256) for n in range(0, 400, 7)]
    data, offsets = pack(strings)
    for algorithm in ("farm", "murmur"):
        for buckets in (0, 1000):
            cpu = rk.hash_bytes(data, offsets, algorithm, buckets)
            dev = rk.hash_bytes(data.to(device), offsets.to(device), algorithm, buckets)
            assert torch.equal(cpu, dev.cpu())


def test_hash_opcheck():
    data, offsets = pack([b"abc", b"", b"z" * 70])
    torch.library.opcheck(torch.ops.recis.hash_bytes.default, (data, offsets, "farm", 0))
