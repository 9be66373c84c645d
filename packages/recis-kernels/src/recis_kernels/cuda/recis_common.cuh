// Shared definitions for every recis-kernels source. NVRTC compiles without the host standard
// library, so fixed-width types are declared here.
#pragma once

typedef unsigned long long u64;
typedef long long i64;
typedef unsigned int u32;
typedef unsigned char u8;

// Separately rounded products and sums. NVRTC contracts `a + b * c` into one fused
// multiply-add (one rounding); torch's CPU ops round the product, then the sum, so kernels that
// must give the CPU path's bits spell the two roundings out.
__device__ __forceinline__ float recis_mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double recis_mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float recis_add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double recis_add_rn(double a, double b) { return __dadd_rn(a, b); }

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

// Range checks of index and offset inputs.
//
// On CUDA the ops do not read index inputs on the host before a launch (that would synchronize
// every call), so each kernel checks, where it uses an input value to address memory, that the
// value lies in [lo, hi). A bad value is never dereferenced: the access is skipped (a gather
// writes zeros) and the first bad value since the last check is recorded in the device's error
// buffer `err` (RECIS_ERR_WORDS int64: claim, site, argument, position, value, lo, hi), which
// the Python side reads where an op synchronizes anyway and raises IndexOutOfRangeError naming
// the op, the argument, the position and the value (see recis_kernels/_cuda/index_errors.py).
//
// This rather than a device-side trap/assert: a trap kills the CUDA context (every later call of
// the process fails, in unrelated code too, and the process must restart) and says only
// "device-side assert triggered"; the buffer keeps the context usable, names what was wrong,
// and costs nothing on the fast path beyond one unsigned compare against a bound held in a
// register (the failure path is out of line). `site` is the launch site's id from Python, `arg`
// the position of the checked argument in that site's argument names.
#define RECIS_ERR_WORDS 8

__device__ __noinline__ void recis_report_index(i64* err, i64 site, int arg, i64 pos, i64 value,
                                                i64 lo, i64 hi) {
  if (atomicCAS((u64*)err, 0ULL, 1ULL) == 0ULL) {
    err[1] = site;
    err[2] = arg;
    err[3] = pos;
    err[4] = value;
    err[5] = lo;
    err[6] = hi;
  }
}

// Whether lo <= value < hi; when not, records (site, arg, pos, value, lo, hi) in err.
__device__ __forceinline__ bool recis_in_range(i64* err, i64 site, int arg, i64 pos, i64 value,
                                               i64 lo, i64 hi) {
  if ((u64)value - (u64)lo < (u64)hi - (u64)lo) return true;
  recis_report_index(err, site, arg, pos, value, lo, hi);
  return false;
}

// Whether 0 <= start <= end <= bound for the row split by offsets[b] = start and
// offsets[b + 1] = end (offsets addressing `bound` elements); reports the first bad entry.
__device__ __forceinline__ bool recis_row_in_range(i64* err, i64 site, int arg, i64 b, i64 start,
                                                   i64 end, i64 bound) {
  return recis_in_range(err, site, arg, b, start, 0, bound + 1) &&
         recis_in_range(err, site, arg, b + 1, end, start, bound + 1);
}

// Called by every thread of a grid-stride loop with its index j: thread 0 reports (as argument
// `arg`) offsets that leave elements outside every row, off[0] != 0 or off[B] < N (off[B] > N
// is reported by the last row's own range check).
__device__ __forceinline__ void recis_offsets_cover(i64 j, const i64* off, i64 B, i64 N, i64* err,
                                                    i64 site, int arg) {
  if (j != 0) return;
  if (off[0] != 0) recis_report_index(err, site, arg, 0, off[0], 0, 1);
  else if (off[B] < N) recis_report_index(err, site, arg, B, off[B], N, N + 1);
}

// The arguments every checked kernel takes last, after its own.
#define RECIS_ERR_PARAMS i64 *err, i64 err_site
