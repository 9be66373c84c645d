"""Vectorized FarmHash Fingerprint64 (``farmhashna::Hash64``) and MurmurHash64A over ragged bytes.

Each function hashes many strings at once: ``fetch`` reads little-endian words at per-string
positions, and the length classes of FarmHash (0-16, 17-32, 33-64, >64 bytes) are computed on the
subsets of strings that fall in them. Strings over 64 bytes loop over 64-byte blocks; the loop runs
``max_len / 64`` times with finished strings masked out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from recis_kernels.ops._uint64 import const, rotr, shr

__all__ = ["farm_fingerprint64", "murmur64a"]

K0 = const(0xC3A5C85C97CB3127)
K1 = const(0xB492B66FBE98F273)
K2 = const(0x9AE16A3B2F90404F)
M = const(0xC6A4A7935BD1E995)

Fetch = Callable[[torch.Tensor], torch.Tensor]


def _fetchers(data: torch.Tensor) -> tuple[Fetch, Fetch, Callable[[torch.Tensor], torch.Tensor]]:
    # Padding lets every 8-byte read of a short string stay in bounds; the extra bytes are never
    # mixed into a hash because each length class only reads inside its string. Bytes stay uint8
    # and are widened per read, so memory stays at the size of the input.
    padded = torch.cat([data, data.new_zeros(8)])

    def byte(pos: torch.Tensor) -> torch.Tensor:
        return padded[pos].to(torch.int64)

    def fetch64(pos: torch.Tensor) -> torch.Tensor:
        word = byte(pos)
        for k in range(1, 8):
            word = word | (byte(pos + k) << (8 * k))
        return word

    def fetch32(pos: torch.Tensor) -> torch.Tensor:
        word = byte(pos)
        for k in range(1, 4):
            word = word | (byte(pos + k) << (8 * k))
        return word

    return fetch64, fetch32, byte


def _shift_mix(v: torch.Tensor) -> torch.Tensor:
    return v ^ shr(v, 47)


def _hash_len16(u: torch.Tensor, v: torch.Tensor, mul: torch.Tensor | int) -> torch.Tensor:
    a = (u ^ v) * mul
    a = a ^ shr(a, 47)
    b = (v ^ a) * mul
    b = b ^ shr(b, 47)
    return b * mul


def _len0to16(fetch64, fetch32, byte, s, n):
    out = torch.full_like(s, K2)
    mul = K2 + n * 2
    big = n >= 8
    if big.any():
        ss, nn, mm = s[big], n[big], mul[big]
        a = fetch64(ss) + K2
        b = fetch64(ss + nn - 8)
        c = rotr(b, 37) * mm + a
        d = (rotr(a, 25) + b) * mm
        out[big] = _hash_len16(c, d, mm)
    mid = (n >= 4) & (n < 8)
    if mid.any():
        ss, nn, mm = s[mid], n[mid], mul[mid]
        a = fetch32(ss)
        out[mid] = _hash_len16(nn + (a << 3), fetch32(ss + nn - 4), mm)
    small = (n > 0) & (n < 4)
    if small.any():
        ss, nn = s[small], n[small]
        a, b, c = byte(ss), byte(ss + (nn >> 1)), byte(ss + nn - 1)
        y = a + (b << 8)
        z = nn + (c << 2)
        out[small] = _shift_mix(y * K2 ^ z * K0) * K2
    return out


def _len17to32(fetch64, s, n):
    mul = K2 + n * 2
    a = fetch64(s) * K1
    b = fetch64(s + 8)
    c = fetch64(s + n - 8) * mul
    d = fetch64(s + n - 16) * K2
    return _hash_len16(rotr(a + b, 43) + rotr(c, 30) + d, a + rotr(b + K2, 18) + c, mul)


def _len33to64(fetch64, s, n):
    mul = K2 + n * 2
    a = fetch64(s) * K2
    b = fetch64(s + 8)
    c = fetch64(s + n - 8) * mul
    d = fetch64(s + n - 16) * K2
    y = rotr(a + b, 43) + rotr(c, 30) + d
    z = _hash_len16(y, a + rotr(b + K2, 18) + c, mul)
    e = fetch64(s + 16) * mul
    f = fetch64(s + 24)
    g = (y + fetch64(s + n - 32)) * mul
    h = (z + fetch64(s + n - 24)) * mul
    return _hash_len16(rotr(e + f, 43) + rotr(g, 30) + h, e + rotr(f + a, 18) + g, mul)


def _weak32(fetch64, p, a, b):
    w, x, y, z = fetch64(p), fetch64(p + 8), fetch64(p + 16), fetch64(p + 24)
    a = a + w
    b = rotr(b + a + z, 21)
    c = a
    a = a + x + y
    b = b + rotr(a, 44)
    return a + z, b + c


def _block(fetch64, p, x, y, z, v, w, mul, last):
    x = rotr(x + y + v[0] + fetch64(p + 8), 37) * mul
    y = rotr(y + v[1] + fetch64(p + 48), 42) * mul
    x = x ^ (w[1] * 9 if last else w[1])
    y = y + (v[0] * 9 if last else v[0]) + fetch64(p + 40)
    z = rotr(z + w[0], 33) * mul
    v = _weak32(fetch64, p, v[1] * mul, x + w[0])
    w = _weak32(fetch64, p + 32, z + w[1], y + fetch64(p + 16))
    return z, y, x, v, w  # x and z swap after every block


def _len_over64(fetch64, s, n):
    seed = 81
    zero = torch.zeros_like(s)
    x = torch.full_like(s, const(seed * K2)) + fetch64(s)
    y = torch.full_like(s, const(seed * K1 + 113))
    z = _shift_mix(y * K2 + 113) * K2
    v = (zero, zero)
    w = (zero, zero)
    blocks = (n - 1) // 64
    for t in range(int(blocks.max())):
        active = blocks > t
        # Finished strings re-read their first block (in bounds) and discard the result.
        p = torch.where(active, s + 64 * t, s)
        nx, ny, nz, nv, nw = _block(fetch64, p, x, y, z, v, w, K1, last=False)
        x, y, z = (torch.where(active, a, b) for a, b in ((nx, x), (ny, y), (nz, z)))
        v = (torch.where(active, nv[0], v[0]), torch.where(active, nv[1], v[1]))
        w = (torch.where(active, nw[0], w[0]), torch.where(active, nw[1], w[1]))
    mul = K1 + ((z & 0xFF) << 1)
    last64 = s + n - 64
    w0 = w[0] + ((n - 1) & 63)
    v0 = v[0] + w0
    w0 = w0 + v0
    x, y, z, v, w = _block(fetch64, last64, x, y, z, (v0, v[1]), (w0, w[1]), mul, last=True)
    return _hash_len16(
        _hash_len16(v[0], w[0], mul) + _shift_mix(y) * K0 + z,
        _hash_len16(v[1], w[1], mul) + x,
        mul,
    )


def farm_fingerprint64(data: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """FarmHash Fingerprint64 of each ``data[offsets[i]:offsets[i+1]]``; int64 ``(S,)``."""
    fetch64, fetch32, byte = _fetchers(data)
    starts = offsets[:-1]
    lens = offsets.diff()
    out = torch.empty_like(starts)
    classes = (
        (lens <= 16, lambda s, n: _len0to16(fetch64, fetch32, byte, s, n)),
        ((lens > 16) & (lens <= 32), lambda s, n: _len17to32(fetch64, s, n)),
        ((lens > 32) & (lens <= 64), lambda s, n: _len33to64(fetch64, s, n)),
        (lens > 64, lambda s, n: _len_over64(fetch64, s, n)),
    )
    for mask, fn in classes:
        if mask.any():
            out[mask] = fn(starts[mask], lens[mask])
    return out


def murmur64a(data: torch.Tensor, offsets: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """MurmurHash64A of each ``data[offsets[i]:offsets[i+1]]``; int64 ``(S,)``."""
    fetch64, _, byte = _fetchers(data)
    starts = offsets[:-1]
    lens = offsets.diff()
    h = const(seed) ^ (lens * M)
    blocks = lens // 8
    for t in range(int(blocks.max()) if blocks.numel() else 0):
        active = blocks > t
        k = fetch64(torch.where(active, starts + 8 * t, starts)) * M
        k = (k ^ shr(k, 47)) * M
        h = torch.where(active, (h ^ k) * M, h)
    tail_len = lens & 7
    tail_start = starts + blocks * 8
    tail = torch.zeros_like(h)
    for j in range(7):
        tail = tail | torch.where(tail_len > j, byte(tail_start + j) << (8 * j), 0)
    h = torch.where(tail_len > 0, (h ^ tail) * M, h)
    h = h ^ shr(h, 47)
    h = h * M
    return h ^ shr(h, 47)
