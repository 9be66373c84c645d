#include "recis_common.cuh"

// The open-addressing id map of ops/hash_table.py: slot arrays keys (int64), tabs (int32),
// state (int8: 0 empty, 1 full, 2 erased). A key's home slot is
// fmix64(key + table * 0x9E3779B97F4A7C15) & mask; collisions probe linearly.

__device__ __forceinline__ i64 home_slot(i64 k, int t, i64 mask) {
  return (i64)(recis_fmix64((u64)k + (u64)(i64)t * 0x9E3779B97F4A7C15ULL) & (u64)mask);
}

// Read-only probe: out[i] = slot holding (keys[i], tabs[i]), or -1 when the probe reaches an
// empty slot (probing continues past erased slots).
extern "C" __global__ void find_slots(const i64* slot_keys, const int* slot_tabs,
                                      const signed char* slot_state, i64 mask, const i64* keys,
                                      const int* tabs, i64 n, i64* out) {
  RECIS_GRID_STRIDE(i, n) {
    i64 k = keys[i];
    int t = tabs[i];
    i64 p = home_slot(k, t, mask);
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

// Places n distinct keys that are all absent from the map (the caller deduplicated them and
// looked them up; it also made room, so a slot that is not full always lies ahead). Each thread
// walks from its key's home slot to the first slot that is not full and takes it by a
// compare-and-swap of the 32-bit word holding that slot's state byte (empty or erased -> full);
// a thread that loses the race reads the slot again and walks on once it is full. Every slot a
// key passes was full when read and stays full (nothing is erased meanwhile), so a probe from
// the home slot reaches the key: linear probing holds whatever order the threads run in.
// out[i] = slot of keys[i]; *reclaimed += erased slots taken. The state array must start at a
// 4-byte boundary and hold a multiple of 4 slots (capacities are powers of two, at least 16).
extern "C" __global__ void claim_slots(i64* slot_keys, int* slot_tabs, signed char* slot_state,
                                       i64 mask, const i64* keys, const int* tabs, i64 n, i64* out,
                                       unsigned long long* reclaimed) {
  RECIS_GRID_STRIDE(i, n) {
    const i64 k = keys[i];
    const int t = tabs[i];
    i64 p = home_slot(k, t, mask);
    out[i] = -1;  // stays -1 only if every slot is full: the caller's invariant was broken
    for (i64 passed = 0; passed <= mask;) {
      unsigned int* word = reinterpret_cast<unsigned int*>(slot_state + (p & ~(i64)3));
      const int shift = (int)(p & 3) * 8;
      const unsigned int seen = *reinterpret_cast<volatile unsigned int*>(word);
      const unsigned int state = (seen >> shift) & 0xffu;
      if (state == 1u) {
        p = (p + 1) & mask;
        ++passed;
        continue;
      }
      const unsigned int full = (seen & ~(0xffu << shift)) | (1u << shift);
      if (atomicCAS(word, seen, full) == seen) {
        slot_keys[p] = k;
        slot_tabs[p] = t;
        out[i] = p;
        if (state == 2u) atomicAdd(reclaimed, 1ULL);
        break;
      }
      // Another thread changed the word (this slot or a neighbour): read it again.
    }
  }
}
