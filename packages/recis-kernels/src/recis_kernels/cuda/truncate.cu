#include "recis_common.cuh"

// For each kept element j (new_off holds the running sums of min(len, max_len) per row), the
// index of its source element: the row's head, or its last `kept` elements when tail[r] is set.
extern "C" __global__ void truncate_index(const i64* off, const i64* new_off, const u8* tail,
                                          i64 rows, i64 total, i64* index) {
  RECIS_GRID_STRIDE(j, total) {
    const i64 r = recis_find_row(new_off, rows, j);
    const i64 kept = new_off[r + 1] - new_off[r];
    const i64 len = off[r + 1] - off[r];
    index[j] = off[r] + (j - new_off[r]) + (tail[r] ? len - kept : 0);
  }
}
