#include "recis_common.cuh"

// MurmurHash64A (seed 0) of the 16 little-endian bytes of two 64-bit ids: two full blocks, no tail.
__device__ __forceinline__ u64 murmur_pair(u64 a, u64 b) {
  const u64 m = 0xc6a4a7935bd1e995ULL;
  u64 h = 16ULL * m;
  u64 k = a * m;
  k ^= k >> 47;
  k *= m;
  h ^= k;
  h *= m;
  k = b * m;
  k ^= k >> 47;
  k *= m;
  h ^= k;
  h *= m;
  h ^= h >> 47;
  h *= m;
  h ^= h >> 47;
  return h;
}

// One thread per output pair. Row r of the output is the Cartesian product of a's row r (la ids)
// and b's row r (lb ids), a-major; out_off (B+1) holds the running sums of la * lb. A row whose
// a offsets (argument 0) are not 0 <= a_off[r] <= a_off[r + 1] <= na, or b offsets (argument 1)
// not within nb likewise, is reported and its pairs get id 0 and weight 0 without reading ids.
extern "C" __global__ void feature_cross(const i64* a_vals, i64 na, const i64* a_off,
                                         const float* a_w, const i64* b_vals, i64 nb,
                                         const i64* b_off, const float* b_w, const i64* out_off,
                                         i64 rows, i64 total, i64* out_vals, float* out_w,
                                         RECIS_ERR_PARAMS) {
  RECIS_GRID_STRIDE(j, total) {
    const i64 r = recis_find_row(out_off, rows, j);
    const i64 t = j - out_off[r];
    const i64 a_start = a_off[r], b_start = b_off[r], b_end = b_off[r + 1];
    if (!recis_row_in_range(err, err_site, 0, r, a_start, a_off[r + 1], na) ||
        !recis_row_in_range(err, err_site, 1, r, b_start, b_end, nb)) {
      out_vals[j] = 0;
      out_w[j] = 0.0f;
      continue;
    }
    const i64 lb = b_end - b_start;
    const i64 ia = a_start + t / lb;
    const i64 ib = b_start + t % lb;
    out_vals[j] = (i64)murmur_pair((u64)a_vals[ia], (u64)b_vals[ib]);
    out_w[j] = a_w[ia] * b_w[ib];
  }
}
