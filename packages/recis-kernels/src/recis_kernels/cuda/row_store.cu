#include "recis_common.cuh"

// Blocked row store: row r lives in block r >> block_shift, at offset r & (block_rows - 1).
// block_ptrs holds the address of every (block_rows, width) float32 block.

__device__ __forceinline__ float* recis_row(const i64* block_ptrs, i64 r, int block_shift,
                                            i64 width) {
  float* block = (float*)block_ptrs[r >> block_shift];
  return block + (r & ((1LL << block_shift) - 1)) * width;
}

// out[i, :] = row(rows[i])[start : start + cols]. One thread per (row, 4-column group); the
// group moves as one 16-byte float4 when width, start and cols keep it aligned.
extern "C" __global__ void gather_rows(const i64* block_ptrs, int block_shift, i64 width,
                                       const i64* rows, i64 n, i64 start, i64 cols, int vec4,
                                       float* out) {
  i64 groups = (cols + 3) / 4;
  RECIS_GRID_STRIDE(t, n * groups) {
    i64 i = t / groups, c = (t % groups) * 4;
    const float* src = recis_row(block_ptrs, rows[i], block_shift, width) + start + c;
    float* dst = out + i * cols + c;
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
                                        const i64* rows, i64 n, i64 start, i64 cols, int vec4,
                                        int accumulate, const float* values) {
  i64 groups = (cols + 3) / 4;
  RECIS_GRID_STRIDE(t, n * groups) {
    i64 i = t / groups, c = (t % groups) * 4;
    float* dst = recis_row(block_ptrs, rows[i], block_shift, width) + start + c;
    const float* src = values + i * cols + c;
    if (vec4 && !accumulate) {
      *(float4*)dst = *(const float4*)src;
    } else {
      for (i64 k = 0; k < 4 && c + k < cols; ++k) dst[k] = accumulate ? dst[k] + src[k] : src[k];
    }
  }
}
