#include "recis_common.cuh"

#define RECIS_GOLDEN 0x9e3779b97f4a7c15ULL

extern "C" __global__ void mix64(const i64* ids, i64 n, i64* out) {
  RECIS_GRID_STRIDE(i, n) { out[i] = (i64)recis_fmix64((u64)ids[i]); }
}

// out[i, k] = fmix64(ids[i] + (k + 1) * golden) % buckets[k] (unsigned; no remainder when 0).
extern "C" __global__ void multi_hash(const i64* ids, i64 n, const i64* buckets, i64 k_count,
                                      i64* out) {
  RECIS_GRID_STRIDE(j, n * k_count) {
    const i64 i = j / k_count;
    const i64 k = j % k_count;
    const u64 h = recis_fmix64((u64)ids[i] + (u64)(k + 1) * RECIS_GOLDEN);
    const i64 b = buckets[k];
    out[j] = b > 0 ? (i64)(h % (u64)b) : (i64)h;
  }
}

// out[i, k] (n ids by dim columns, float64) = (t + 0.5) / 2**53, t the top 53 bits of
// fmix64(fmix64(ids[i] ^ seed) + (k + 1) * golden), seed = seeds[i * seed_stride] (stride 0:
// one seed for every id). The rounded addition and exact scaling are spelled out so that no
// fused multiply-add changes a bit: the CPU gives the same values.
extern "C" __global__ void hashed_uniform(const i64* ids, i64 n, const i64* seeds,
                                          i64 seed_stride, i64 dim, double* out) {
  RECIS_GRID_STRIDE(j, n * dim) {
    const i64 i = j / dim;
    const i64 k = j % dim;
    const u64 base = recis_fmix64((u64)ids[i] ^ (u64)seeds[i * seed_stride]);
    const u64 h = recis_fmix64(base + (u64)(k + 1) * RECIS_GOLDEN);
    out[j] = __dmul_rn(__dadd_rn((double)(h >> 11), 0.5), 1.0 / 9007199254740992.0);
  }
}
