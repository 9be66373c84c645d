#include "recis_common.cuh"

// Ragged <-> dense copies, one thread per dense element; element types are moved as raw words of
// their width so one kernel serves every dtype. `inner` is the number of words per value row.
// Offsets are checked against what they address before use: the outer offsets against the
// number of sub-rows `nsub` (argument 0), the innermost against the number of value rows
// `nvalues` (argument 0 for 2 levels, 1 for 3). A dense element whose row has a bad offset
// gets the pad (ragged -> dense) or is not written (dense -> ragged).

template <typename W>
__device__ void to_dense2(const W* values, i64 nvalues, const i64* off, const W* pad, i64 B, i64 L,
                          i64 inner, W* out, i64* err, i64 site) {
  const i64 n = B * L * inner;
  const W p = *pad;
  RECIS_GRID_STRIDE(idx, n) {
    const i64 e = idx % inner;
    const i64 t = idx / inner;
    const i64 l = t % L;
    const i64 b = t / L;
    const i64 start = off[b], end = off[b + 1];
    W v = p;
    if (recis_row_in_range(err, site, 0, b, start, end, nvalues) && l < end - start) {
      v = values[(start + l) * inner + e];
    }
    out[idx] = v;
  }
}

template <typename W>
__device__ void to_dense3(const W* values, i64 nvalues, const i64* off0, i64 nsub, const i64* off1,
                          const W* pad, i64 B, i64 S, i64 L, i64 inner, W* out, i64* err,
                          i64 site) {
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
    const i64 sub_start = off0[b], sub_end = off0[b + 1];
    const i64 sub = sub_start + s;
    if (recis_row_in_range(err, site, 0, b, sub_start, sub_end, nsub) && sub < sub_end) {
      const i64 start = off1[sub], end = off1[sub + 1];
      if (recis_row_in_range(err, site, 1, sub, start, end, nvalues) && l < end - start) {
        v = values[(start + l) * inner + e];
      }
    }
    out[idx] = v;
  }
}

// Dense -> ragged: each dense element inside its row's length is written to its place in the
// packed values (`off` are the output offsets, `total` the output length; elements past a row's
// length are skipped). A row longer than the dense row (L) would leave output unwritten, so
// its end offset is reported like one past `total`.

// Whether 0 <= off[b] = start <= off[b + 1] = end <= min(start + L, total).
__device__ __forceinline__ bool dense_row_fits(i64* err, i64 site, int arg, i64 b, i64 start,
                                               i64 end, i64 L, i64 total) {
  const i64 stop = start <= total - L ? start + L : total;
  return recis_in_range(err, site, arg, b, start, 0, total + 1) &&
         recis_in_range(err, site, arg, b + 1, end, start, stop + 1);
}
template <typename W>
__device__ void from_dense2(const W* dense, const i64* off, i64 B, i64 L, i64 total, W* out,
                            i64* err, i64 site) {
  const i64 n = B * L;
  RECIS_GRID_STRIDE(idx, n) {
    const i64 l = idx % L;
    const i64 b = idx / L;
    const i64 start = off[b], end = off[b + 1];
    if (dense_row_fits(err, site, 0, b, start, end, L, total) && l < end - start) {
      out[start + l] = dense[idx];
    }
  }
}

// 3 levels: `off0` (B + 1) counts kept sub-rows per row (nsub in all), `off1` the values of each
// kept sub-row.
template <typename W>
__device__ void from_dense3(const W* dense, const i64* off0, i64 nsub, const i64* off1, i64 B,
                            i64 S, i64 L, i64 total, W* out, i64* err, i64 site) {
  const i64 n = B * S * L;
  RECIS_GRID_STRIDE(idx, n) {
    const i64 l = idx % L;
    const i64 t = idx / L;
    const i64 s = t % S;
    const i64 b = t / S;
    const i64 sub_start = off0[b], sub_end = off0[b + 1];
    const i64 sub = sub_start + s;
    if (dense_row_fits(err, site, 0, b, sub_start, sub_end, S, nsub) && sub < sub_end) {
      const i64 start = off1[sub], end = off1[sub + 1];
      if (dense_row_fits(err, site, 1, sub, start, end, L, total) && l < end - start) {
        out[start + l] = dense[idx];
      }
    }
  }
}

#define RECIS_DENSE_KERNELS(W, SUFFIX)                                                         \
  extern "C" __global__ void ragged_to_dense2_##SUFFIX(const W* values, i64 nvalues,           \
                                                       const i64* off, const W* pad, i64 B,    \
                                                       i64 L, i64 inner, W* out,               \
                                                       RECIS_ERR_PARAMS) {                     \
    to_dense2<W>(values, nvalues, off, pad, B, L, inner, out, err, err_site);                  \
  }                                                                                            \
  extern "C" __global__ void ragged_to_dense3_##SUFFIX(                                        \
      const W* values, i64 nvalues, const i64* off0, i64 nsub, const i64* off1, const W* pad,  \
      i64 B, i64 S, i64 L, i64 inner, W* out, RECIS_ERR_PARAMS) {                              \
    to_dense3<W>(values, nvalues, off0, nsub, off1, pad, B, S, L, inner, out, err, err_site);  \
  }                                                                                            \
  extern "C" __global__ void dense_to_ragged2_##SUFFIX(const W* dense, const i64* off, i64 B,  \
                                                       i64 L, i64 total, W* out,               \
                                                       RECIS_ERR_PARAMS) {                     \
    from_dense2<W>(dense, off, B, L, total, out, err, err_site);                               \
  }                                                                                            \
  extern "C" __global__ void dense_to_ragged3_##SUFFIX(const W* dense, const i64* off0,        \
                                                       i64 nsub, const i64* off1, i64 B, i64 S, \
                                                       i64 L, i64 total, W* out,               \
                                                       RECIS_ERR_PARAMS) {                     \
    from_dense3<W>(dense, off0, nsub, off1, B, S, L, total, out, err, err_site);               \
  }

RECIS_DENSE_KERNELS(u8, w1)
RECIS_DENSE_KERNELS(unsigned short, w2)
RECIS_DENSE_KERNELS(u32, w4)
RECIS_DENSE_KERNELS(u64, w8)
