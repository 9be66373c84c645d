//! Probing and claiming the slots of an `IdMap` (`recis_kernels/ops/hash_table.py`).
//!
//! The map is four slot arrays of one power-of-two capacity: ids, table indices, rows and a
//! state byte (`EMPTY`, `FULL`, `ERASED`). A pair's home slot is `fmix64(id + table *
//! 0x9E3779B97F4A7C15) & (capacity - 1)`; collisions probe linearly. The map keeps at least one
//! slot empty (it grows first), so every probe ends; a probe that would still visit all slots
//! stops there, so a corrupt map cannot hang a lookup.

use crate::radix::sort_by_high_bits;

pub const EMPTY: i8 = 0;
pub const FULL: i8 = 1;
pub const ERASED: i8 = 2;

/// The golden-ratio constant (2**64 / phi) that offsets ids before mixing.
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Slots a key that found its slot full looks ahead for a free one per claim round (the
/// `_CLAIM_WINDOW` of the torch spelling, which must place keys alike).
pub const CLAIM_WINDOW: usize = 16;

/// Queries whose home slots are computed and prefetched before the first is probed: enough
/// cache misses in flight to hide most of the latency of a map larger than the caches.
const AHEAD: usize = 16;

/// MurmurHash3's 64-bit finalizer.
#[inline]
pub fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// Home slot of the pair `(key, tab)` in a map of `mask + 1` slots.
#[inline]
pub fn home(key: i64, tab: i32, mask: usize) -> usize {
    let premix = (tab as u32 as u64)
        .wrapping_mul(GOLDEN)
        .wrapping_add(key as u64);
    (fmix64(premix) as usize) & mask
}

/// Asks the CPU to bring the cache line at `p` close (a hint: never faults).
#[inline]
pub fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The slot arrays of a map, read only.
pub struct Slots<'a> {
    pub keys: &'a [i64],
    pub tabs: &'a [i32],
    pub state: &'a [i8],
}

impl Slots<'_> {
    fn mask(&self) -> usize {
        let cap = self.keys.len();
        assert!(
            cap.is_power_of_two() && self.tabs.len() == cap && self.state.len() == cap,
            "slot arrays must share one power-of-two length"
        );
        cap - 1
    }

    /// The slot holding `(key, tab)`, probing from `p`, or -1.
    #[inline]
    fn probe(&self, key: i64, tab: i32, mut p: usize, mask: usize) -> i64 {
        for _ in 0..=mask {
            match self.state[p] {
                EMPTY => return -1,
                FULL if self.keys[p] == key && self.tabs[p] == tab => return p as i64,
                _ => p = (p + 1) & mask,
            }
        }
        -1
    }
}

/// `out[i]` = the slot holding `(keys[i], tabs[i])`, or -1 where the pair is absent.
pub fn find(slots: &Slots<'_>, keys: &[i64], tabs: &[i32], out: &mut [i64]) {
    probe_all(slots, None, keys, tabs, out);
}

/// `out[i]` = the row of `(keys[i], tabs[i])` (`rows[slot]`), or -1 where the pair is absent:
/// [`find`] with each found slot's row read in the same pass, the next queries' home slots
/// prefetched in all four arrays.
pub fn find_rows(slots: &Slots<'_>, rows: &[i64], keys: &[i64], tabs: &[i32], out: &mut [i64]) {
    assert!(rows.len() == slots.keys.len(), "find_rows: lengths differ");
    probe_all(slots, Some(rows), keys, tabs, out);
}

/// The probes of [`find`] and [`find_rows`]: the home slots of a block of queries computed and
/// prefetched (also in the table and row arrays when rows are read), then each query probed.
fn probe_all(slots: &Slots<'_>, rows: Option<&[i64]>, keys: &[i64], tabs: &[i32], out: &mut [i64]) {
    assert!(
        keys.len() == tabs.len() && keys.len() == out.len(),
        "find: lengths differ"
    );
    let mask = slots.mask();
    let mut homes = [0usize; AHEAD];
    for (c, chunk) in out.chunks_mut(AHEAD).enumerate() {
        let base = c * AHEAD;
        for (j, h) in homes.iter_mut().enumerate().take(chunk.len()) {
            *h = home(keys[base + j], tabs[base + j], mask);
            prefetch(&slots.state[*h]);
            prefetch(&slots.keys[*h]);
            if let Some(rows) = rows {
                prefetch(&slots.tabs[*h]);
                prefetch(&rows[*h]);
            }
        }
        for (j, o) in chunk.iter_mut().enumerate() {
            let slot = slots.probe(keys[base + j], tabs[base + j], homes[j], mask);
            *o = match rows {
                Some(rows) if slot >= 0 => rows[slot as usize],
                _ => slot,
            };
        }
    }
}

/// The slot arrays of a map, to claim slots in.
pub struct SlotsMut<'a> {
    pub keys: &'a mut [i64],
    pub tabs: &'a mut [i32],
    pub state: &'a mut [i8],
}

/// Places distinct pairs, all absent from the map, into slots that are not full, writing each
/// pair's slot to `out`, in rounds: every round each unplaced pair looks at its current slot
/// (first its home) and of the pairs on one free slot the earliest (in input order) takes it;
/// every other pair then stands on a full slot and moves on to the first slot that is not full
/// among the next `CLAIM_WINDOW`, or past them all. This is the placement of the vectorized
/// claim rounds of `IdMap._claim_torch`, slot for slot.
///
/// Returns how many of the slots taken held a tombstone, or `Err(i)` with the input position
/// of a pair that found no free slot in a whole turn around the map (nothing is undone).
pub fn claim(
    slots: &mut SlotsMut<'_>,
    keys: &[i64],
    tabs: &[i32],
    out: &mut [i64],
) -> Result<usize, usize> {
    let n = keys.len();
    assert!(tabs.len() == n && out.len() == n, "claim: lengths differ");
    let cap = slots.keys.len();
    assert!(
        cap.is_power_of_two() && slots.tabs.len() == cap && slots.state.len() == cap,
        "slot arrays must share one power-of-two length"
    );
    let mask = cap - 1;
    // (input position, current slot, slots walked) of the pairs not placed yet, in input order.
    let mut left: Vec<(usize, usize, usize)> = (0..n)
        .map(|i| (i, home(keys[i], tabs[i], mask), 0))
        .collect();
    let mut reused = 0;
    while !left.is_empty() {
        // Places the round's winners: in input order, the first pair on a free slot takes it,
        // and a later pair on that slot finds it full.
        left.retain(|&(i, p, _)| {
            let state = slots.state[p];
            if state == FULL {
                return true;
            }
            reused += usize::from(state == ERASED);
            slots.state[p] = FULL;
            slots.keys[p] = keys[i];
            slots.tabs[p] = tabs[i];
            out[i] = p as i64;
            false
        });
        // Everyone left stands on a full slot: to the first slot of the window that is not
        // full, or past the window.
        for entry in left.iter_mut() {
            let (i, p, walked) = *entry;
            if walked > cap {
                return Err(i);
            }
            let mut step = CLAIM_WINDOW;
            for s in 1..=CLAIM_WINDOW {
                if slots.state[(p + s) & mask] != FULL {
                    step = s;
                    break;
                }
            }
            *entry = (i, (p + step) & mask, walked + step);
        }
    }
    Ok(reused)
}

/// Places distinct pairs into a map whose slots are all empty (a new map, a rehash, a cleared
/// map) as key-by-key linear probing in order of home slot would, ties in input order: in that
/// order each pair takes the first slot at or after both its home and the slot of the pair
/// before it; the pairs that would run past the last slot then take the first free slots from
/// slot 0 on, in the same order. This is the placement of `IdMap._claim_blank_torch`, slot for
/// slot, with one radix sort of the pairs by home instead of a probe each: the slots are then
/// written in ascending order. Writes each pair's slot to `out`.
pub fn claim_blank(slots: &mut SlotsMut<'_>, keys: &[i64], tabs: &[i32], out: &mut [i64]) {
    let n = keys.len();
    assert!(
        tabs.len() == n && out.len() == n,
        "claim_blank: lengths differ"
    );
    let cap = slots.keys.len();
    assert!(
        cap.is_power_of_two() && slots.tabs.len() == cap && slots.state.len() == cap,
        "slot arrays must share one power-of-two length"
    );
    assert!(n <= cap, "claim_blank: {n} pairs for {cap} slots");
    if n == 0 {
        return;
    }
    let mask = cap - 1;
    let order = by_home(keys, tabs, mask, true);
    let mut place = |slot: usize, i: usize, slots: &mut SlotsMut<'_>| {
        slots.state[slot] = FULL;
        slots.keys[slot] = keys[i];
        slots.tabs[slot] = tabs[i];
        out[i] = slot as i64;
    };
    let mut next = 0;
    let mut wrapped = Vec::new();
    for (h, i) in order {
        let slot = h.max(next);
        if slot > mask {
            wrapped.push(i); // and every pair after it: `next` only grows
            continue;
        }
        place(slot, i, slots);
        next = slot + 1;
    }
    let mut slot = 0;
    for i in wrapped {
        while slots.state[slot] == FULL {
            slot += 1;
        }
        place(slot, i, slots);
    }
}

/// `(home, input position)` of every pair, in that order: with `packed` where it fits 63 bits,
/// as `home << bits | position` sorted by radix (positions ascend in the low bits, so a stable
/// sort by the high bits gives that order), else as sorted tuples.
fn by_home(keys: &[i64], tabs: &[i32], mask: usize, packed: bool) -> Vec<(usize, usize)> {
    let n = keys.len();
    let bits = (usize::BITS - n.saturating_sub(1).leading_zeros()).max(1);
    let mask_bits = usize::BITS - mask.leading_zeros();
    if !packed || n < 2 || mask_bits + bits > 63 {
        let mut pairs: Vec<(usize, usize)> =
            (0..n).map(|i| (home(keys[i], tabs[i], mask), i)).collect();
        pairs.sort_unstable();
        return pairs;
    }
    let mut all: Vec<i64> = (0..n)
        .map(|i| ((home(keys[i], tabs[i], mask) << bits) | i) as i64)
        .collect();
    sort_by_high_bits(&mut all, bits);
    let low = (1usize << bits) - 1;
    all.into_iter()
        .map(|p| (p as usize >> bits, p as usize & low))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map of `cap` slots holding `pairs` placed by linear probing, one after another.
    fn map_with(cap: usize, pairs: &[(i64, i32)]) -> (Vec<i64>, Vec<i32>, Vec<i8>) {
        let (mut k, mut t, mut s) = (vec![0; cap], vec![0; cap], vec![EMPTY; cap]);
        for &(key, tab) in pairs {
            let mut p = home(key, tab, cap - 1);
            while s[p] == FULL {
                p = (p + 1) & (cap - 1);
            }
            (k[p], t[p], s[p]) = (key, tab, FULL);
        }
        (k, t, s)
    }

    #[test]
    fn home_matches_the_python_definition() {
        // Home slots computed by recis_kernels' torch spelling (`_home_torch`).
        assert_eq!(home(5, 3, 1023), 285);
        assert_eq!(home(-3, 7, 1023), 607);
        assert_eq!(fmix64(0), 0);
        assert_eq!(fmix64(1), 0xb456_bcfc_34c2_cb2c);
    }

    #[test]
    fn find_sees_every_key_and_nothing_else() {
        let pairs: Vec<(i64, i32)> = (0..40).map(|i| (i * 7919 - 100, (i % 3) as i32)).collect();
        let (k, t, s) = map_with(64, &pairs);
        let slots = Slots {
            keys: &k,
            tabs: &t,
            state: &s,
        };
        let keys: Vec<i64> = pairs
            .iter()
            .map(|p| p.0)
            .chain([i64::MIN, 1, i64::MAX])
            .collect();
        let tabs: Vec<i32> = pairs.iter().map(|p| p.1).chain([0, 5, 0]).collect();
        let mut out = vec![0; keys.len()];
        find(&slots, &keys, &tabs, &mut out);
        for (i, &slot) in out.iter().enumerate() {
            if i < pairs.len() {
                assert!(slot >= 0 && k[slot as usize] == keys[i] && t[slot as usize] == tabs[i]);
            } else {
                assert_eq!(slot, -1);
            }
        }
        // The same id in another table is another key.
        let mut other = [0];
        find(&slots, &[pairs[0].0], &[pairs[0].1 + 1], &mut other);
        assert_eq!(other, [-1]);
    }

    #[test]
    fn find_rows_reads_the_row_of_every_found_slot() {
        let pairs: Vec<(i64, i32)> = (0..40).map(|i| (i * 7919 - 100, (i % 3) as i32)).collect();
        let (k, t, s) = map_with(64, &pairs);
        let slots = Slots {
            keys: &k,
            tabs: &t,
            state: &s,
        };
        let rows: Vec<i64> = (0..64).map(|slot| 1000 + 3 * slot).collect();
        let keys: Vec<i64> = pairs.iter().map(|p| p.0).chain([i64::MIN, 7]).collect();
        let tabs: Vec<i32> = pairs.iter().map(|p| p.1).chain([0, 9]).collect();
        let (mut found, mut slot_of) = (vec![0; keys.len()], vec![0; keys.len()]);
        find_rows(&slots, &rows, &keys, &tabs, &mut found);
        find(&slots, &keys, &tabs, &mut slot_of);
        for (i, (&row, &slot)) in found.iter().zip(&slot_of).enumerate() {
            if i < pairs.len() {
                assert_eq!(row, rows[slot as usize]);
            } else {
                assert_eq!((row, slot), (-1, -1));
            }
        }
    }

    #[test]
    fn find_ends_in_a_map_without_an_empty_slot() {
        let pairs: Vec<(i64, i32)> = (0..16).map(|i| (i, 0)).collect();
        let (k, t, s) = map_with(16, &pairs);
        let mut out = [0];
        find(
            &Slots {
                keys: &k,
                tabs: &t,
                state: &s,
            },
            &[99],
            &[0],
            &mut out,
        );
        assert_eq!(out, [-1]);
    }

    #[test]
    fn claim_takes_free_and_erased_slots_once_each() {
        let pairs: Vec<(i64, i32)> = (0..20).map(|i| (i * 31, 0)).collect();
        let (mut k, mut t, mut s) = map_with(64, &pairs);
        for p in s.iter_mut().filter(|x| **x == FULL).take(5) {
            *p = ERASED;
        }
        let keys: Vec<i64> = (100..130).collect();
        let tabs = vec![1; keys.len()];
        let mut out = vec![-1; keys.len()];
        let mut slots = SlotsMut {
            keys: &mut k,
            tabs: &mut t,
            state: &mut s,
        };
        let reused = claim(&mut slots, &keys, &tabs, &mut out).unwrap();
        assert!(reused <= 5);
        let mut seen = out.clone();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), keys.len(), "two keys on one slot");
        let mut found = vec![0; keys.len()];
        find(
            &Slots {
                keys: &k,
                tabs: &t,
                state: &s,
            },
            &keys,
            &tabs,
            &mut found,
        );
        assert_eq!(found, out, "every claimed key is reachable from its home");
    }

    #[test]
    fn claim_blank_places_as_linear_probing_in_order_of_home() {
        let mut rng = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            rng = fmix64(rng.wrapping_add(GOLDEN));
            rng
        };
        // Few pairs, half full, nearly full (pairs wrap past the last slot), full.
        for (cap, n) in [(16, 3), (64, 32), (64, 60), (256, 250), (32, 32), (8, 0)] {
            let keys: Vec<i64> = (0..n).map(|_| next() as i64).collect();
            let tabs: Vec<i32> = (0..n).map(|_| (next() % 4) as i32).collect();
            let (mut k, mut t, mut st) = (vec![0i64; cap], vec![0i32; cap], vec![EMPTY; cap]);
            let mut out = vec![-1i64; n];
            let mut slots = SlotsMut {
                keys: &mut k,
                tabs: &mut t,
                state: &mut st,
            };
            claim_blank(&mut slots, &keys, &tabs, &mut out);
            // The reference: pair by pair in order of (home, position), each probing from its
            // home to the first empty slot.
            let mask = cap - 1;
            let mut order: Vec<(usize, usize)> =
                (0..n).map(|i| (home(keys[i], tabs[i], mask), i)).collect();
            order.sort();
            let (mut rk, mut rt, mut rs) = (vec![0i64; cap], vec![0i32; cap], vec![EMPTY; cap]);
            let mut want = vec![-1i64; n];
            for (h, i) in order {
                let mut p = h;
                while rs[p] == FULL {
                    p = (p + 1) & mask;
                }
                (rk[p], rt[p], rs[p]) = (keys[i], tabs[i], FULL);
                want[i] = p as i64;
            }
            assert_eq!(out, want, "{n} pairs in {cap} slots");
            assert_eq!((k, t, st), (rk, rt, rs), "{n} pairs in {cap} slots");
        }
    }

    #[test]
    fn by_home_sorts_alike_packed_and_as_tuples() {
        let keys: Vec<i64> = (0..3000).map(|i| fmix64(i) as i64).collect();
        let tabs: Vec<i32> = (0..3000).map(|i| i % 5).collect();
        for mask in [0, 63, 4095, (1 << 20) - 1] {
            let packed = by_home(&keys, &tabs, mask, true);
            assert_eq!(packed, by_home(&keys, &tabs, mask, false), "mask {mask}");
            assert!(packed.windows(2).all(|w| w[0] < w[1]));
        }
    }

    #[test]
    fn claim_reports_a_full_map() {
        let pairs: Vec<(i64, i32)> = (0..16).map(|i| (i, 0)).collect();
        let (mut k, mut t, mut s) = map_with(16, &pairs);
        let mut out = [0, 0];
        let mut slots = SlotsMut {
            keys: &mut k,
            tabs: &mut t,
            state: &mut s,
        };
        assert_eq!(claim(&mut slots, &[50, 51], &[0, 0], &mut out), Err(0));
    }
}
