#include "recis_common.cuh"

// bucket = number of boundaries <= x, by binary search in the feature's sorted boundaries.
// Features are packed: x_offsets (K+1) split xs, b_offsets (K+1) split the boundaries.
template <typename T>
__device__ void fused_bucketize(const T* xs, const i64* x_offsets, const T* bounds,
                                const i64* b_offsets, i64 k, i64 n, i64* out) {
  RECIS_GRID_STRIDE(i, n) {
    const i64 f = k == 1 ? 0 : recis_find_row(x_offsets, k, i);
    const T x = xs[i];
    i64 lo = b_offsets[f], hi = b_offsets[f + 1];
    const i64 base = lo;
    // NaN compares false everywhere, so it lands in bucket 0 like the CPU path.
    while (lo < hi) {
      const i64 mid = lo + (hi - lo) / 2;
      if (bounds[mid] <= x) lo = mid + 1; else hi = mid;
    }
    out[i] = (x == x) ? lo - base : 0;
  }
}

extern "C" __global__ void fused_bucketize_f64(const double* xs, const i64* x_offsets,
                                               const double* bounds, const i64* b_offsets, i64 k,
                                               i64 n, i64* out) {
  fused_bucketize<double>(xs, x_offsets, bounds, b_offsets, k, n, out);
}

extern "C" __global__ void fused_bucketize_i64(const i64* xs, const i64* x_offsets,
                                               const i64* bounds, const i64* b_offsets, i64 k,
                                               i64 n, i64* out) {
  fused_bucketize<i64>(xs, x_offsets, bounds, b_offsets, k, n, out);
}
