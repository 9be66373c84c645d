#include "recis_common.cuh"

// Blocked row store: row r lives in block r >> block_shift, at offset r & (block_rows - 1).
// block_ptrs holds the address of every (block_rows, width) float32 block; num_rows is the
// number of addressable rows (blocks * block_rows). A row outside [0, num_rows) is reported
// (argument 0, "rows") and not touched: a gather writes zeros for it.

__device__ __forceinline__ float* recis_row(const i64* block_ptrs, i64 r, int block_shift,
                                            i64 width) {
  float* block = (float*)block_ptrs[r >> block_shift];
  return block + (r & ((1LL << block_shift) - 1)) * width;
}

// out[i, :] = row(rows[i])[start : start + cols]. One thread per (row, 4-column group); the
// group moves as one 16-byte float4 when width, start and cols keep it aligned.
extern "C" __global__ void gather_rows(const i64* block_ptrs, int block_shift, i64 width,
                                       i64 num_rows, const i64* rows, i64 n, i64 start, i64 cols,
                                       int vec4, float* out, RECIS_ERR_PARAMS) {
  i64 groups = (cols + 3) / 4;
  RECIS_GRID_STRIDE(t, n * groups) {
    i64 i = t / groups, c = (t % groups) * 4;
    const i64 r = rows[i];
    float* dst = out + i * cols + c;
    if (!recis_in_range(err, err_site, 0, i, r, 0, num_rows)) {
      for (i64 k = 0; k < 4 && c + k < cols; ++k) dst[k] = 0.0f;
      continue;
    }
    const float* src = recis_row(block_ptrs, r, block_shift, width) + start + c;
    if (vec4) {
      *(float4*)dst = *(const float4*)src;
    } else {
      for (i64 k = 0; k < 4 && c + k < cols; ++k) dst[k] = src[k];
    }
  }
}

// row(rows[i])[start : start + cols] = values[i, :] (add when accumulate != 0). Rows are
// distinct (callers reduce duplicates first), so no two threads write one element.
extern "C" __global__ void scatter_rows(const i64* block_ptrs, int block_shift, i64 width,
                                        i64 num_rows, const i64* rows, i64 n, i64 start, i64 cols,
                                        int vec4, int accumulate, const float* values,
                                        RECIS_ERR_PARAMS) {
  i64 groups = (cols + 3) / 4;
  RECIS_GRID_STRIDE(t, n * groups) {
    i64 i = t / groups, c = (t % groups) * 4;
    const i64 r = rows[i];
    if (!recis_in_range(err, err_site, 0, i, r, 0, num_rows)) continue;
    float* dst = recis_row(block_ptrs, r, block_shift, width) + start + c;
    const float* src = values + i * cols + c;
    if (vec4 && !accumulate) {
      *(float4*)dst = *(const float4*)src;
    } else {
      for (i64 k = 0; k < 4 && c + k < cols; ++k) dst[k] = accumulate ? dst[k] + src[k] : src[k];
    }
  }
}
