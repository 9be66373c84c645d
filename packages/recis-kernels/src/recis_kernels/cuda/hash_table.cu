#include "recis_common.cuh"

// Read-only probe of the open-addressing id map (see ops/hash_table.py for the layout):
// out[i] = slot holding (keys[i], tabs[i]), or -1 when the probe reaches an empty slot.
// state: 0 empty, 1 full, 2 erased (probing continues past erased slots).
extern "C" __global__ void find_slots(const i64* slot_keys, const int* slot_tabs,
                                      const signed char* slot_state, i64 mask, const i64* keys,
                                      const int* tabs, i64 n, i64* out) {
  RECIS_GRID_STRIDE(i, n) {
    i64 k = keys[i];
    int t = tabs[i];
    i64 p = (i64)(recis_fmix64((u64)k + (u64)(i64)t * 0x9E3779B97F4A7C15ULL) & (u64)mask);
    i64 found = -1;
    for (i64 probe = 0; probe <= mask; ++probe) {
      signed char st = slot_state[p];
      if (st == 0) break;
      if (st == 1 && slot_keys[p] == k && slot_tabs[p] == t) {
        found = p;
        break;
      }
      p = (p + 1) & mask;
    }
    out[i] = found;
  }
}
