// Shared definitions for every recis-kernels source. NVRTC compiles without the host standard
// library, so fixed-width types are declared here.
#pragma once

typedef unsigned long long u64;
typedef long long i64;
typedef unsigned int u32;
typedef unsigned char u8;

#define RECIS_GRID_STRIDE(i, n)                                                       \
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                   \
       i += (i64)blockDim.x * gridDim.x)

// Unsigned 64-bit remainder of the bit pattern of a signed id.
__device__ __forceinline__ i64 recis_umod(i64 x, i64 n) { return (i64)((u64)x % (u64)n); }

__device__ __forceinline__ u64 recis_rotr(u64 v, int s) {
  return s == 0 ? v : ((v >> s) | (v << (64 - s)));
}

// MurmurHash3's fmix64 finalizer.
__device__ __forceinline__ u64 recis_fmix64(u64 k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdULL;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ULL;
  k ^= k >> 33;
  return k;
}

// Number of entries of sorted offsets[0..n] that are <= x, minus one: the row holding element x.
__device__ __forceinline__ i64 recis_find_row(const i64* offsets, i64 nrows, i64 x) {
  i64 lo = 0, hi = nrows;  // invariant: offsets[lo] <= x < offsets[hi]
  while (hi - lo > 1) {
    i64 mid = lo + (hi - lo) / 2;
    if (offsets[mid] <= x) lo = mid; else hi = mid;
  }
  return lo;
}
