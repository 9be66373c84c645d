#include "recis_common.cuh"

// Pooling of ragged row segments. mode: 0 sum, 1 mean (sum w e / sum w), 2 sqrtn
// (sum w e / sqrt(sum w^2)), 3 tile (first T rows of each segment, zero padded).
// weights may be null (every weight 1). One thread per (segment, column): consecutive threads
// read consecutive columns of the same row, so loads coalesce. N is the number of rows of the
// (N, D) rows (forward) or grad_rows (backward) array; a segment whose offsets are not
// 0 <= off[b] <= off[b + 1] <= N is reported (argument 0, "offsets") and treated as empty, and
// so are offsets that do not start at 0 or end at N (rows outside every segment). The backward
// writes only rows inside a segment: grad_rows must be zeroed.
// The backward multiplies in the torch path's order (the weight times the scale first).

// The factor of the pooled sum, in double whatever T: sum w and sum w^2 are formed there, where
// the square of a float weight is exact and neither underflows (1e-24) nor overflows (1e20),
// and the factor is applied there (1 / sqrt(sum w^2) of tiny weights exceeds float's range),
// as the torch path does (ops/segment_reduce.py::_scale).
__device__ __forceinline__ double seg_scale(const float* w, i64 start, i64 end, int mode) {
  if (mode == 0 || mode == 3) return 1.0;
  double acc = 0;
  for (i64 i = start; i < end; ++i) {
    const double wi = w ? (double)w[i] : 1.0;
    acc += mode == 1 ? wi : wi * wi;
  }
  if (acc == 0.0) return 0.0;
  return mode == 1 ? 1.0 / acc : 1.0 / sqrt(acc);
}

template <typename T>
__device__ void pooled_fwd(const T* rows, i64 N, const i64* off, const float* w, i64 B, i64 D,
                           int mode, T* out, i64* err, i64 site) {
  RECIS_GRID_STRIDE(j, B * D) {
    recis_offsets_cover(j, off, B, N, err, site, 0);
    const i64 b = j / D, d = j % D;
    i64 start = off[b], end = off[b + 1];
    if (!recis_row_in_range(err, site, 0, b, start, end, N)) start = end = 0;
    T acc = 0;
    // rows * w, then a sum in row order, each rounded (the CPU path's index_add_).
    for (i64 i = start; i < end; ++i)
      acc = recis_add_rn(acc, recis_mul_rn(w ? (T)w[i] : T(1), rows[i * D + d]));
    out[j] = (T)((double)acc * seg_scale(w, start, end, mode));
  }
}

template <typename T>
__device__ void tile_fwd(const T* rows, i64 N, const i64* off, const float* w, i64 B, i64 D, i64 L,
                         T* out, i64* err, i64 site) {
  RECIS_GRID_STRIDE(j, B * L * D) {
    recis_offsets_cover(j, off, B, N, err, site, 0);
    const i64 d = j % D, t = (j / D) % L, b = j / (D * L);
    i64 start = off[b], end = off[b + 1];
    if (!recis_row_in_range(err, site, 0, b, start, end, N)) start = end = 0;
    const i64 i = start + t;
    out[j] = i < end ? (w ? (T)w[i] : T(1)) * rows[i * D + d] : T(0);
  }
}

template <typename T>
__device__ void pooled_bwd(const T* grad, i64 N, const i64* off, const float* w, i64 B, i64 D,
                           int mode, T* grad_rows, i64* err, i64 site) {
  RECIS_GRID_STRIDE(j, B * D) {
    const i64 b = j / D, d = j % D;
    i64 start = off[b], end = off[b + 1];
    if (!recis_row_in_range(err, site, 0, b, start, end, N)) start = end = 0;
    recis_offsets_cover(j, off, B, N, err, site, 0);
    const T g = grad[j];
    const double scale = seg_scale(w, start, end, mode);
    // The row's factor is formed in double and applied in T, as the torch path does.
    for (i64 i = start; i < end; ++i)
      grad_rows[i * D + d] = g * (T)((w ? (double)w[i] : 1.0) * scale);
  }
}

// Rows past the first L of a segment receive no gradient (grad_rows is zeroed).
template <typename T>
__device__ void tile_bwd(const T* grad, i64 N, const i64* off, const float* w, i64 B, i64 D, i64 L,
                         T* grad_rows, i64* err, i64 site) {
  RECIS_GRID_STRIDE(j, B * L * D) {
    recis_offsets_cover(j, off, B, N, err, site, 0);
    const i64 d = j % D, t = (j / D) % L, b = j / (D * L);
    i64 start = off[b], end = off[b + 1];
    if (!recis_row_in_range(err, site, 0, b, start, end, N)) start = end = 0;
    const i64 i = start + t;
    if (i < end) grad_rows[i * D + d] = (w ? (T)w[i] : T(1)) * grad[j];
  }
}

#define RECIS_SEGMENT_KERNELS(T, SUFFIX)                                                        \
  extern "C" __global__ void segment_reduce_fwd_##SUFFIX(const T* rows, i64 N, const i64* off,  \
                                                         const float* w, i64 B, i64 D, int mode, \
                                                         i64 L, T* out, RECIS_ERR_PARAMS) {     \
    if (mode == 3) tile_fwd<T>(rows, N, off, w, B, D, L, out, err, err_site);                   \
    else pooled_fwd<T>(rows, N, off, w, B, D, mode, out, err, err_site);                        \
  }                                                                                             \
  extern "C" __global__ void segment_reduce_bwd_##SUFFIX(const T* grad, i64 N, const i64* off,  \
                                                         const float* w, i64 B, i64 D, int mode, \
                                                         i64 L, T* grad_rows,                   \
                                                         RECIS_ERR_PARAMS) {                    \
    if (mode == 3) tile_bwd<T>(grad, N, off, w, B, D, L, grad_rows, err, err_site);             \
    else pooled_bwd<T>(grad, N, off, w, B, D, mode, grad_rows, err, err_site);                  \
  }

RECIS_SEGMENT_KERNELS(float, f32)
RECIS_SEGMENT_KERNELS(double, f64)
