"""Scalar pure-Python FarmHash Fingerprint64 and MurmurHash64A, written from the algorithm
descriptions, as an independent reference for the vectorized and CUDA implementations."""

from __future__ import annotations

MASK = (1 << 64) - 1
K0 = 0xC3A5C85C97CB3127
K1 = 0xB492B66FBE98F273
K2 = 0x9AE16A3B2F90404F


def _u(x: int) -> int:
    return x & MASK


def _rot(v: int, s: int) -> int:
    return v if s == 0 else _u((v >> s) | (v << (64 - s)))


def _f64(b: bytes, i: int) -> int:
    return int.from_bytes(b[i : i + 8], "little")


def _f32(b: bytes, i: int) -> int:
    return int.from_bytes(b[i : i + 4], "little")


def _smix(v: int) -> int:
    return v ^ (v >> 47)


def _h16(u: int, v: int, mul: int) -> int:
    a = _u((u ^ v) * mul)
    a ^= a >> 47
    b = _u((v ^ a) * mul)
    b ^= b >> 47
    return _u(b * mul)


def _weak(b: bytes, i: int, a: int, c0: int) -> tuple[int, int]:
    w, x, y, z = _f64(b, i), _f64(b, i + 8), _f64(b, i + 16), _f64(b, i + 24)
    a = _u(a + w)
    c0 = _rot(_u(c0 + a + z), 21)
    c = a
    a = _u(a + x + y)
    c0 = _u(c0 + _rot(a, 44))
    return _u(a + z), _u(c0 + c)


def farm64(s: bytes) -> int:
    n = len(s)
    if n <= 16:
        if n >= 8:
            mul = _u(K2 + n * 2)
            a = _u(_f64(s, 0) + K2)
            b = _f64(s, n - 8)
            c = _u(_rot(b, 37) * mul + a)
            d = _u((_rot(a, 25) + b) * mul)
            return _h16(c, d, mul)
        if n >= 4:
            mul = _u(K2 + n * 2)
            return _h16(_u(n + (_f32(s, 0) << 3)), _f32(s, n - 4), mul)
        if n > 0:
            y = s[0] + (s[n >> 1] << 8)
            z = n + (s[n - 1] << 2)
            return _u(_smix(_u(y * K2) ^ _u(z * K0)) * K2)
        return K2
    if n <= 32:
        mul = _u(K2 + n * 2)
        a = _u(_f64(s, 0) * K1)
        b = _f64(s, 8)
        c = _u(_f64(s, n - 8) * mul)
        d = _u(_f64(s, n - 16) * K2)
        return _h16(
            _u(_rot(_u(a + b), 43) + _rot(c, 30) + d), _u(a + _rot(_u(b + K2), 18) + c), mul
        )
    if n <= 64:
        mul = _u(K2 + n * 2)
        a = _u(_f64(s, 0) * K2)
        b = _f64(s, 8)
        c = _u(_f64(s, n - 8) * mul)
        d = _u(_f64(s, n - 16) * K2)
        y = _u(_rot(_u(a + b), 43) + _rot(c, 30) + d)
        z = _h16(y, _u(a + _rot(_u(b + K2), 18) + c), mul)
        e = _u(_f64(s, 16) * mul)
        f = _f64(s, 24)
        g = _u(_u(y + _f64(s, n - 32)) * mul)
        h = _u(_u(z + _f64(s, n - 24)) * mul)
        return _h16(_u(_rot(_u(e + f), 43) + _rot(g, 30) + h), _u(e + _rot(_u(f + a), 18) + g), mul)
    seed = 81
    x, y = seed, _u(seed * K1 + 113)
    z = _u(_smix(_u(y * K2 + 113)) * K2)
    v, w = (0, 0), (0, 0)
    x = _u(x * K2 + _f64(s, 0))
    end = ((n - 1) // 64) * 64
    last64 = end + ((n - 1) & 63) - 63
    p = 0
    while True:
        x = _u(_rot(_u(x + y + v[0] + _f64(s, p + 8)), 37) * K1)
        y = _u(_rot(_u(y + v[1] + _f64(s, p + 48)), 42) * K1)
        x ^= w[1]
        y = _u(y + v[0] + _f64(s, p + 40))
        z = _u(_rot(_u(z + w[0]), 33) * K1)
        v = _weak(s, p, _u(v[1] * K1), _u(x + w[0]))
        w = _weak(s, p + 32, _u(z + w[1]), _u(y + _f64(s, p + 16)))
        x, z = z, x
        p += 64
        if p == end:
            break
    mul = _u(K1 + ((z & 0xFF) << 1))
    p = last64
    w0 = _u(w[0] + ((n - 1) & 63))
    v0 = _u(v[0] + w0)
    w0 = _u(w0 + v0)
    v, w = (v0, v[1]), (w0, w[1])
    x = _u(_rot(_u(x + y + v[0] + _f64(s, p + 8)), 37) * mul)
    y = _u(_rot(_u(y + v[1] + _f64(s, p + 48)), 42) * mul)
    x ^= _u(w[1] * 9)
    y = _u(y + _u(v[0] * 9) + _f64(s, p + 40))
    z = _u(_rot(_u(z + w[0]), 33) * mul)
    v = _weak(s, p, _u(v[1] * mul), _u(x + w[0]))
    w = _weak(s, p + 32, _u(z + w[1]), _u(y + _f64(s, p + 16)))
    x, z = z, x
    return _h16(
        _u(_h16(v[0], w[0], mul) + _u(_smix(y) * K0) + z), _u(_h16(v[1], w[1], mul) + x), mul
    )


def murmur64a(s: bytes, seed: int = 0) -> int:
    m = 0xC6A4A7935BD1E995
    n = len(s)
    h = _u(seed ^ _u(n * m))
    for i in range(n // 8):
        k = _u(_f64(s, 8 * i) * m)
        k ^= k >> 47
        k = _u(k * m)
        h = _u((h ^ k) * m)
    rest = s[(n // 8) * 8 :]
    if rest:
        h = _u((h ^ int.from_bytes(rest, "little")) * m)
    h ^= h >> 47
    h = _u(h * m)
    return h ^ (h >> 47)


def fmix64(k: int) -> int:
    k &= MASK
    k ^= k >> 33
    k = _u(k * 0xFF51AFD7ED558CCD)
    k ^= k >> 33
    k = _u(k * 0xC4CEB9FE1A85EC53)
    return k ^ (k >> 33)
