#include "recis_common.cuh"

// Ragged <-> dense copies, one thread per dense element; element types are moved as raw words of
// their width so one kernel serves every dtype. `inner` is the number of words per value row.

template <typename W>
__device__ void to_dense2(const W* values, const i64* off, const W* pad, i64 B, i64 L, i64 inner,
                          W* out) {
  const i64 n = B * L * inner;
  const W p = *pad;
  RECIS_GRID_STRIDE(idx, n) {
    const i64 e = idx % inner;
    const i64 t = idx / inner;
    const i64 l = t % L;
    const i64 b = t / L;
    const i64 start = off[b];
    out[idx] = l < off[b + 1] - start ? values[(start + l) * inner + e] : p;
  }
}

template <typename W>
__device__ void to_dense3(const W* values, const i64* off0, const i64* off1, const W* pad, i64 B,
                          i64 S, i64 L, i64 inner, W* out) {
  const i64 n = B * S * L * inner;
  const W p = *pad;
  RECIS_GRID_STRIDE(idx, n) {
    const i64 e = idx % inner;
    i64 t = idx / inner;
    const i64 l = t % L;
    t /= L;
    const i64 s = t % S;
    const i64 b = t / S;
    W v = p;
    const i64 sub = off0[b] + s;
    if (sub < off0[b + 1]) {
      const i64 start = off1[sub];
      if (l < off1[sub + 1] - start) v = values[(start + l) * inner + e];
    }
    out[idx] = v;
  }
}

// Dense -> ragged: each dense element inside its row's length is written to its place in the
// packed values (`off` are the output offsets; elements past a row's length are skipped).
template <typename W>
__device__ void from_dense2(const W* dense, const i64* off, i64 B, i64 L, W* out) {
  const i64 n = B * L;
  RECIS_GRID_STRIDE(idx, n) {
    const i64 l = idx % L;
    const i64 b = idx / L;
    const i64 start = off[b];
    if (l < off[b + 1] - start) out[start + l] = dense[idx];
  }
}

// 3 levels: `off0` (B + 1) counts kept sub-rows per row, `off1` the values of each kept sub-row.
template <typename W>
__device__ void from_dense3(const W* dense, const i64* off0, const i64* off1, i64 B, i64 S, i64 L,
                            W* out) {
  const i64 n = B * S * L;
  RECIS_GRID_STRIDE(idx, n) {
    const i64 l = idx % L;
    const i64 t = idx / L;
    const i64 s = t % S;
    const i64 b = t / S;
    const i64 sub = off0[b] + s;
    if (sub < off0[b + 1]) {
      const i64 start = off1[sub];
      if (l < off1[sub + 1] - start) out[start + l] = dense[idx];
    }
  }
}

#define RECIS_DENSE_KERNELS(W, SUFFIX)                                                         \
  extern "C" __global__ void ragged_to_dense2_##SUFFIX(const W* values, const i64* off,        \
                                                       const W* pad, i64 B, i64 L, i64 inner,  \
                                                       W* out) {                               \
    to_dense2<W>(values, off, pad, B, L, inner, out);                                          \
  }                                                                                            \
  extern "C" __global__ void ragged_to_dense3_##SUFFIX(const W* values, const i64* off0,       \
                                                       const i64* off1, const W* pad, i64 B,   \
                                                       i64 S, i64 L, i64 inner, W* out) {      \
    to_dense3<W>(values, off0, off1, pad, B, S, L, inner, out);                                \
  }                                                                                            \
  extern "C" __global__ void dense_to_ragged2_##SUFFIX(const W* dense, const i64* off, i64 B,  \
                                                       i64 L, W* out) {                        \
    from_dense2<W>(dense, off, B, L, out);                                                     \
  }                                                                                            \
  extern "C" __global__ void dense_to_ragged3_##SUFFIX(const W* dense, const i64* off0,        \
                                                       const i64* off1, i64 B, i64 S, i64 L,   \
                                                       W* out) {                               \
    from_dense3<W>(dense, off0, off1, B, S, L, out);                                           \
  }

RECIS_DENSE_KERNELS(u8, w1)
RECIS_DENSE_KERNELS(unsigned short, w2)
RECIS_DENSE_KERNELS(u32, w4)
RECIS_DENSE_KERNELS(u64, w8)
