#include "recis_common.cuh"

// out[i] = (u64)ids[i] % (u64)ns[feature of i]; feature_offsets (K+1) splits the packed ids.
extern "C" __global__ void fused_mod(const i64* ids, const i64* feature_offsets, const i64* ns,
                                     i64 num_features, i64 n, i64* out) {
  RECIS_GRID_STRIDE(i, n) {
    i64 f = num_features == 1 ? 0 : recis_find_row(feature_offsets, num_features, i);
    out[i] = recis_umod(ids[i], ns[f]);
  }
}
