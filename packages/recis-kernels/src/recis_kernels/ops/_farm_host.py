"""FarmHash Fingerprint64 and MurmurHash64A of ragged bytes in NumPy, for eager CPU calls.

The same functions as :mod:`recis_kernels.ops._farm` (which runs under ``torch.compile`` and on
CUDA tensors when the kernels are off), computed with NumPy's unsigned 64-bit arithmetic: no
masking for logical shifts, words read with one gather from overlapping views of the bytes,
each length class and each 64-byte round computed on the strings it concerns only, in passes
of a few thousand strings. On one core here, 20,000 strings of 6-18 bytes take 1.0 ms (torch
version: 4.3 ms) and of 60-180 bytes 5.4 ms (56 ms).
"""

from __future__ import annotations

import numpy as np

__all__ = ["farm_fingerprint64", "murmur64a"]

_U = np.uint64
_MASK = (1 << 64) - 1
K0 = _U(0xC3A5C85C97CB3127)
K1 = _U(0xB492B66FBE98F273)
K2 = _U(0x9AE16A3B2F90404F)
M = _U(0xC6A4A7935BD1E995)
_S47 = _U(47)


class _Bytes:
    """The bytes with 8 bytes of zero padding, and word views starting at every byte.

    A word may start at any byte of the data or at its end (an empty last string is read at its
    start, and the result discarded), and ends inside the padding at the latest.
    """

    def __init__(self, data: np.ndarray) -> None:
        self.raw = np.concatenate([data, np.zeros(8, dtype=np.uint8)])
        end = data.size
        self.w64 = np.ndarray((end + 1,), dtype="<u8", buffer=self.raw, strides=(1,))
        self.w32 = np.ndarray((end + 5,), dtype="<u4", buffer=self.raw, strides=(1,))

    # Indexing, not ``take``: ``take`` first copies a non-contiguous source whole (8 bytes per
    # byte of data here), where indexing reads the strided view in place.
    def fetch64(self, pos: np.ndarray) -> np.ndarray:
        return self.w64[pos].astype(np.uint64, copy=False)

    def fetch32(self, pos: np.ndarray) -> np.ndarray:
        return self.w32[pos].astype(np.uint64)

    def byte(self, pos: np.ndarray) -> np.ndarray:
        return self.raw[pos].astype(np.uint64)


def _rotr(x: np.ndarray, s: int) -> np.ndarray:
    return (x >> _U(s)) | (x << _U(64 - s))


def _shift_mix(v: np.ndarray) -> np.ndarray:
    return v ^ (v >> _S47)


def _hash_len16(u: np.ndarray, v: np.ndarray, mul) -> np.ndarray:
    a = (u ^ v) * mul
    a ^= a >> _S47
    b = (v ^ a) * mul
    b ^= b >> _S47
    b *= mul
    return b


def _len0to16(by: _Bytes, s: np.ndarray, n: np.ndarray) -> np.ndarray:
    out = np.full(s.shape, K2, dtype=np.uint64)
    nu = n.astype(np.uint64)
    mul = K2 + nu * _U(2)
    big = np.flatnonzero(n >= 8)
    if big.size:
        ss, mm = s[big], mul[big]
        a = by.fetch64(ss) + K2
        b = by.fetch64(ss + n[big] - 8)
        c = _rotr(b, 37) * mm + a
        d = (_rotr(a, 25) + b) * mm
        out[big] = _hash_len16(c, d, mm)
    mid = np.flatnonzero((n >= 4) & (n < 8))
    if mid.size:
        ss = s[mid]
        a = by.fetch32(ss)
        tail = by.fetch32(ss + n[mid] - 4)
        out[mid] = _hash_len16(nu[mid] + (a << _U(3)), tail, mul[mid])
    small = np.flatnonzero((n > 0) & (n < 4))
    if small.size:
        ss, ni = s[small], n[small]
        a, b, c = by.byte(ss), by.byte(ss + (ni >> 1)), by.byte(ss + ni - 1)
        y = a + (b << _U(8))
        z = nu[small] + (c << _U(2))
        out[small] = _shift_mix(y * K2 ^ z * K0) * K2
    return out


def _len17to32(by: _Bytes, s: np.ndarray, n: np.ndarray) -> np.ndarray:
    mul = K2 + n.astype(np.uint64) * _U(2)
    a = by.fetch64(s) * K1
    b = by.fetch64(s + 8)
    c = by.fetch64(s + n - 8) * mul
    d = by.fetch64(s + n - 16) * K2
    return _hash_len16(_rotr(a + b, 43) + _rotr(c, 30) + d, a + _rotr(b + K2, 18) + c, mul)


def _len33to64(by: _Bytes, s: np.ndarray, n: np.ndarray) -> np.ndarray:
    mul = K2 + n.astype(np.uint64) * _U(2)
    a = by.fetch64(s) * K2
    b = by.fetch64(s + 8)
    c = by.fetch64(s + n - 8) * mul
    d = by.fetch64(s + n - 16) * K2
    y = _rotr(a + b, 43) + _rotr(c, 30) + d
    z = _hash_len16(y, a + _rotr(b + K2, 18) + c, mul)
    e = by.fetch64(s + 16) * mul
    f = by.fetch64(s + 24)
    g = (y + by.fetch64(s + n - 32)) * mul
    h = (z + by.fetch64(s + n - 24)) * mul
    return _hash_len16(_rotr(e + f, 43) + _rotr(g, 30) + h, e + _rotr(f + a, 18) + g, mul)


def _weak32(by: _Bytes, p, a, b):
    w, x, y, z = by.fetch64(p), by.fetch64(p + 8), by.fetch64(p + 16), by.fetch64(p + 24)
    a = a + w
    b = _rotr(b + a + z, 21)
    c = a
    a = a + x + y
    b = b + _rotr(a, 44)
    return a + z, b + c


def _block(by: _Bytes, p, x, y, z, v, w, mul, last: bool):
    x = _rotr(x + y + v[0] + by.fetch64(p + 8), 37) * mul
    y = _rotr(y + v[1] + by.fetch64(p + 48), 42) * mul
    x = x ^ (w[1] * _U(9) if last else w[1])
    y = y + (v[0] * _U(9) if last else v[0]) + by.fetch64(p + 40)
    z = _rotr(z + w[0], 33) * mul
    v = _weak32(by, p, v[1] * mul, x + w[0])
    w = _weak32(by, p + 32, z + w[1], y + by.fetch64(p + 16))
    return z, y, x, v, w  # x and z swap after every block


def _len_over64(by: _Bytes, s: np.ndarray, n: np.ndarray) -> np.ndarray:
    seed = 81
    x = np.full(s.shape, _U((seed * int(K2)) & _MASK), dtype=np.uint64) + by.fetch64(s)
    y = np.full(s.shape, _U((seed * int(K1) + 113) & _MASK), dtype=np.uint64)
    z = _shift_mix(y * K2 + _U(113)) * K2
    state = [np.zeros(s.shape, dtype=np.uint64) for _ in range(4)]  # v0, v1, w0, w1
    blocks = (n - 1) // 64
    for t in range(int(blocks.max())):
        # The 64-byte rounds of the strings that still have one before their last 64 bytes.
        act = np.flatnonzero(blocks > t)
        v, w = (state[0][act], state[1][act]), (state[2][act], state[3][act])
        nx, ny, nz, nv, nw = _block(by, s[act] + 64 * t, x[act], y[act], z[act], v, w, K1, False)
        x[act], y[act], z[act] = nx, ny, nz
        for k, part in enumerate((*nv, *nw)):
            state[k][act] = part
    v0, v1, w0, w1 = state
    mul = K1 + ((z & _U(0xFF)) << _U(1))
    w0 = w0 + ((n - 1) & 63).astype(np.uint64)
    v0 = v0 + w0
    w0 = w0 + v0
    x, y, z, v, w = _block(by, s + n - 64, x, y, z, (v0, v1), (w0, w1), mul, True)
    return _hash_len16(
        _hash_len16(v[0], w[0], mul) + _shift_mix(y) * K0 + z,
        _hash_len16(v[1], w[1], mul) + x,
        mul,
    )


# Strings hashed per pass: the temporaries of a pass stay in the core's cache (106k strings of
# 1-20 bytes: 3.6 ms in passes of 4096, 7.3 ms in one pass, on one core here).
_CHUNK = 4096


def _chunked(fn, data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    by = _Bytes(data)
    starts = offsets[:-1]
    lens = np.diff(offsets)
    out = np.empty(starts.shape, dtype=np.uint64)
    for lo in range(0, starts.size, _CHUNK):
        hi = lo + _CHUNK
        out[lo:hi] = fn(by, starts[lo:hi], lens[lo:hi])
    return out.view(np.int64)


def _farm(by: _Bytes, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    out = np.empty(starts.shape, dtype=np.uint64)
    classes = (
        (lens <= 16, _len0to16),
        ((lens > 16) & (lens <= 32), _len17to32),
        ((lens > 32) & (lens <= 64), _len33to64),
        (lens > 64, _len_over64),
    )
    for mask, fn in classes:
        at = np.flatnonzero(mask)
        if at.size:
            out[at] = fn(by, starts[at], lens[at])
    return out


def _murmur(by: _Bytes, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    h = lens.astype(np.uint64) * M  # seed 0
    blocks = lens // 8
    for t in range(int(blocks.max()) if blocks.size else 0):
        act = np.flatnonzero(blocks > t)
        k = by.fetch64(starts[act] + 8 * t) * M
        k ^= k >> _S47
        k *= M
        h[act] = (h[act] ^ k) * M
    tail_len = lens & 7
    # The tail's bytes are the low bytes of the little-endian word at its start (the word may
    # run into the next string or the padding; those bytes are masked off).
    tail = by.fetch64(starts + blocks * 8) & ((_U(1) << (tail_len * 8).astype(np.uint64)) - _U(1))
    has_tail = np.flatnonzero(tail_len)
    h[has_tail] = (h[has_tail] ^ tail[has_tail]) * M
    h ^= h >> _S47
    h *= M
    h ^= h >> _S47
    return h


def farm_fingerprint64(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """FarmHash Fingerprint64 of each ``data[offsets[i]:offsets[i+1]]`` (uint8 bytes, int64
    offsets); int64 ``(S,)`` with the hash's bits."""
    return _chunked(_farm, data, offsets)


def murmur64a(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """MurmurHash64A (seed 0) of each ``data[offsets[i]:offsets[i+1]]``; int64 ``(S,)``."""
    return _chunked(_murmur, data, offsets)
