#include "recis_common.cuh"

// FarmHash Fingerprint64 (farmhashna::Hash64) and MurmurHash64A (seed 0) of ragged byte strings,
// one thread per string. Reads are bytewise because strings start at arbitrary byte offsets.

__device__ __forceinline__ u64 fetch64(const u8* p) {
  u64 v = 0;
#pragma unroll
  for (int k = 0; k < 8; ++k) v |= (u64)p[k] << (8 * k);
  return v;
}

__device__ __forceinline__ u64 fetch32(const u8* p) {
  u64 v = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k) v |= (u64)p[k] << (8 * k);
  return v;
}

#define K0 0xc3a5c85c97cb3127ULL
#define K1 0xb492b66fbe98f273ULL
#define K2 0x9ae16a3b2f90404fULL

__device__ __forceinline__ u64 shift_mix(u64 v) { return v ^ (v >> 47); }

__device__ __forceinline__ u64 hash_len16(u64 u, u64 v, u64 mul) {
  u64 a = (u ^ v) * mul;
  a ^= a >> 47;
  u64 b = (v ^ a) * mul;
  b ^= b >> 47;
  return b * mul;
}

__device__ u64 farm_len0to16(const u8* s, u64 len) {
  if (len >= 8) {
    u64 mul = K2 + len * 2;
    u64 a = fetch64(s) + K2;
    u64 b = fetch64(s + len - 8);
    u64 c = recis_rotr(b, 37) * mul + a;
    u64 d = (recis_rotr(a, 25) + b) * mul;
    return hash_len16(c, d, mul);
  }
  if (len >= 4) {
    u64 mul = K2 + len * 2;
    u64 a = fetch32(s);
    return hash_len16(len + (a << 3), fetch32(s + len - 4), mul);
  }
  if (len > 0) {
    u64 y = (u64)s[0] + ((u64)s[len >> 1] << 8);
    u64 z = len + ((u64)s[len - 1] << 2);
    return shift_mix(y * K2 ^ z * K0) * K2;
  }
  return K2;
}

__device__ u64 farm_len17to32(const u8* s, u64 len) {
  u64 mul = K2 + len * 2;
  u64 a = fetch64(s) * K1;
  u64 b = fetch64(s + 8);
  u64 c = fetch64(s + len - 8) * mul;
  u64 d = fetch64(s + len - 16) * K2;
  return hash_len16(recis_rotr(a + b, 43) + recis_rotr(c, 30) + d,
                    a + recis_rotr(b + K2, 18) + c, mul);
}

__device__ u64 farm_len33to64(const u8* s, u64 len) {
  u64 mul = K2 + len * 2;
  u64 a = fetch64(s) * K2;
  u64 b = fetch64(s + 8);
  u64 c = fetch64(s + len - 8) * mul;
  u64 d = fetch64(s + len - 16) * K2;
  u64 y = recis_rotr(a + b, 43) + recis_rotr(c, 30) + d;
  u64 z = hash_len16(y, a + recis_rotr(b + K2, 18) + c, mul);
  u64 e = fetch64(s + 16) * mul;
  u64 f = fetch64(s + 24);
  u64 g = (y + fetch64(s + len - 32)) * mul;
  u64 h = (z + fetch64(s + len - 24)) * mul;
  return hash_len16(recis_rotr(e + f, 43) + recis_rotr(g, 30) + h,
                    e + recis_rotr(f + a, 18) + g, mul);
}

__device__ __forceinline__ void weak32(const u8* p, u64 a, u64 b, u64* first, u64* second) {
  u64 w = fetch64(p), x = fetch64(p + 8), y = fetch64(p + 16), z = fetch64(p + 24);
  a += w;
  b = recis_rotr(b + a + z, 21);
  u64 c = a;
  a += x;
  a += y;
  b += recis_rotr(a, 44);
  *first = a + z;
  *second = b + c;
}

__device__ u64 farm_over64(const u8* s, u64 len) {
  const u64 seed = 81;
  u64 x = seed;
  u64 y = seed * K1 + 113;
  u64 z = shift_mix(y * K2 + 113) * K2;
  u64 v0 = 0, v1 = 0, w0 = 0, w1 = 0;
  x = x * K2 + fetch64(s);
  const u8* end = s + ((len - 1) / 64) * 64;
  const u8* last64 = end + ((len - 1) & 63) - 63;
  do {
    x = recis_rotr(x + y + v0 + fetch64(s + 8), 37) * K1;
    y = recis_rotr(y + v1 + fetch64(s + 48), 42) * K1;
    x ^= w1;
    y += v0 + fetch64(s + 40);
    z = recis_rotr(z + w0, 33) * K1;
    weak32(s, v1 * K1, x + w0, &v0, &v1);
    weak32(s + 32, z + w1, y + fetch64(s + 16), &w0, &w1);
    u64 t = z; z = x; x = t;
    s += 64;
  } while (s != end);
  u64 mul = K1 + ((z & 0xff) << 1);
  s = last64;
  w0 += ((len - 1) & 63);
  v0 += w0;
  w0 += v0;
  x = recis_rotr(x + y + v0 + fetch64(s + 8), 37) * mul;
  y = recis_rotr(y + v1 + fetch64(s + 48), 42) * mul;
  x ^= w1 * 9;
  y += v0 * 9 + fetch64(s + 40);
  z = recis_rotr(z + w0, 33) * mul;
  weak32(s, v1 * mul, x + w0, &v0, &v1);
  weak32(s + 32, z + w1, y + fetch64(s + 16), &w0, &w1);
  u64 t = z; z = x; x = t;
  return hash_len16(hash_len16(v0, w0, mul) + shift_mix(y) * K0 + z,
                    hash_len16(v1, w1, mul) + x, mul);
}

__device__ u64 farm_fingerprint64(const u8* s, u64 len) {
  if (len <= 16) return farm_len0to16(s, len);
  if (len <= 32) return farm_len17to32(s, len);
  if (len <= 64) return farm_len33to64(s, len);
  return farm_over64(s, len);
}

__device__ u64 murmur64a(const u8* s, u64 len) {
  const u64 m = 0xc6a4a7935bd1e995ULL;
  u64 h = len * m;
  const u64 blocks = len / 8;
  for (u64 i = 0; i < blocks; ++i) {
    u64 k = fetch64(s + 8 * i);
    k *= m;
    k ^= k >> 47;
    k *= m;
    h ^= k;
    h *= m;
  }
  const u8* tail = s + blocks * 8;
  const int rest = (int)(len & 7);
  if (rest) {
    u64 t = 0;
    for (int k = 0; k < rest; ++k) t |= (u64)tail[k] << (8 * k);
    h ^= t;
    h *= m;
  }
  h ^= h >> 47;
  h *= m;
  h ^= h >> 47;
  return h;
}

// algorithm: 0 = farm, 1 = murmur. buckets > 0 takes the unsigned remainder. String i is
// data[offsets[i] : offsets[i + 1]] of num_bytes; a string whose offsets are not
// 0 <= offsets[i] <= offsets[i + 1] <= num_bytes is reported (argument 0, "offsets") and hashes
// to 0 without reading data; offsets not covering data (off[0] != 0 or
// off[num_strings] < num_bytes) are reported too, as the CPU path refuses them.
extern "C" __global__ void hash_bytes(const u8* data, i64 num_bytes, const i64* offsets,
                                      i64 num_strings, int algorithm, i64 buckets, i64* out,
                                      RECIS_ERR_PARAMS) {
  RECIS_GRID_STRIDE(i, num_strings) {
    const i64 start = offsets[i], end = offsets[i + 1];
    const bool ok = recis_row_in_range(err, err_site, 0, i, start, end, num_bytes);
    // After the string's own check, so that an error both report reads as the CPU path's.
    recis_offsets_cover(i, offsets, num_strings, num_bytes, err, err_site, 0);
    if (!ok) {
      out[i] = 0;
      continue;
    }
    const u64 len = (u64)(end - start);
    u64 h = algorithm == 0 ? farm_fingerprint64(data + start, len) : murmur64a(data + start, len);
    out[i] = buckets > 0 ? (i64)(h % (u64)buckets) : (i64)h;
  }
}
