//! The distinct `(id, table)` pairs of a lookup, in order of first occurrence, with the group of
//! every position and the positions of every group.
//!
//! One pass over the pairs with an open-addressing set of the groups seen so far (as large as
//! the last call's on this thread, doubled whenever it is half full), then, when they are asked
//! for, a counting pass that lists each group's positions in ascending order. Pairs are
//! compared whole, so no two distinct pairs ever share a group, whatever their ids.

use crate::idmap::{home, prefetch};

/// Pairs whose home slots are computed and prefetched before the first of them is probed.
const AHEAD: usize = 16;

const VACANT: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct Entry {
    key: i64,
    tab: i32,
    group: u32,
}

const EMPTY_ENTRY: Entry = Entry {
    key: 0,
    tab: 0,
    group: VACANT,
};

/// Where the groups of `group_pairs` go.
pub struct Groups<'a> {
    /// The first pair of each group: its id ...
    pub keys: &'a mut [i64],
    /// ... and its table (both as long as the input; the first `U` are written).
    pub tabs: &'a mut [i32],
    /// The group of every position.
    pub inverse: &'a mut [i64],
    /// Optionally, the positions of every group, listed when given.
    pub positions: Option<Positions<'a>>,
}

/// Where the positions of the groups go.
pub struct Positions<'a> {
    /// Every group's positions, ascending, one group after another ...
    pub order: &'a mut [i64],
    /// ... group `g`'s at `order[offsets[g]..offsets[g + 1]]` (`U + 1` written, room for one
    /// more than the input's length).
    pub offsets: &'a mut [i64],
}

/// The smallest set: 16 KiB.
const MIN_CAPACITY: usize = 1024;

thread_local! {
    /// The set last used on this thread, kept for the next call (at most as large as its
    /// distinct pairs needed).
    static SPARE: std::cell::RefCell<Vec<Entry>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn empty_set(capacity: usize) -> Vec<Entry> {
    vec![EMPTY_ENTRY; capacity]
}

/// Groups the pairs `(keys[i], tabs[i])`; returns `U`, the number of distinct pairs.
///
/// # Panics
///
/// If the lengths disagree, or there are `u32::MAX` pairs or more.
pub fn group_pairs(keys: &[i64], tabs: &[i32], out: &mut Groups<'_>) -> usize {
    let n = keys.len();
    assert!(
        tabs.len() == n
            && out.keys.len() == n
            && out.tabs.len() == n
            && out.inverse.len() == n
            && out
                .positions
                .as_ref()
                .is_none_or(|p| p.order.len() == n && p.offsets.len() == n + 1),
        "group_pairs: lengths differ"
    );
    assert!(n < VACANT as usize, "group_pairs: too many pairs");
    // The set of the previous call on this thread, emptied: a pipeline groups batches of
    // similar sizes, and a set that starts as large as the last one needed neither regrows
    // nor touches fresh pages.
    let mut set = SPARE.with(|spare| std::mem::take(&mut *spare.borrow_mut()));
    let mut capacity = set
        .len()
        .clamp(MIN_CAPACITY, (2 * n).next_power_of_two().max(MIN_CAPACITY));
    if set.capacity() > 4 * capacity {
        set = Vec::new(); // a much larger call's set: not kept for small ones
    }
    set.clear();
    set.resize(capacity, EMPTY_ENTRY);
    let mut groups = 0usize;
    // Home slots are computed and prefetched a block of pairs ahead of their probes, so the
    // cache misses of a set larger than the caches overlap.
    let mut homes = [0usize; AHEAD];
    for base in (0..n).step_by(AHEAD) {
        let end = (base + AHEAD).min(n);
        let block_mask = capacity - 1;
        for (h, i) in homes.iter_mut().zip(base..end) {
            *h = home(keys[i], tabs[i], block_mask);
            prefetch(&set[*h]);
        }
        for i in base..end {
            let (key, tab) = (keys[i], tabs[i]);
            let mask = capacity - 1;
            // The set may have grown since this block's homes were computed.
            let mut p = if mask == block_mask {
                homes[i - base]
            } else {
                home(key, tab, mask)
            };
            let group = loop {
                let e = set[p];
                if e.group == VACANT {
                    let g = groups;
                    set[p] = Entry {
                        key,
                        tab,
                        group: g as u32,
                    };
                    out.keys[g] = key;
                    out.tabs[g] = tab;
                    groups += 1;
                    if 2 * groups > capacity {
                        capacity *= 2;
                        set = rebuilt(&out.keys[..groups], &out.tabs[..groups], capacity);
                    }
                    break g;
                }
                if e.key == key && e.tab == tab {
                    break e.group as usize;
                }
                p = (p + 1) & mask;
            };
            out.inverse[i] = group as i64;
        }
    }
    SPARE.with(|spare| *spare.borrow_mut() = set);
    if let Some(positions) = out.positions.as_mut() {
        list_positions(&out.inverse[..], groups, positions);
    }
    groups
}

/// Each group's positions in ascending order: counts, their running sums, then one pass
/// placing every position.
fn list_positions(inverse: &[i64], groups: usize, out: &mut Positions<'_>) {
    let offsets = &mut out.offsets[..groups + 1];
    offsets.fill(0);
    for &g in inverse {
        offsets[g as usize + 1] += 1;
    }
    for g in 0..groups {
        offsets[g + 1] += offsets[g];
    }
    let mut next: Vec<i64> = offsets[..groups].to_vec();
    for (i, &g) in inverse.iter().enumerate() {
        let g = g as usize;
        out.order[next[g] as usize] = i as i64;
        next[g] += 1;
    }
}

/// A set of `capacity` slots holding the groups `0..keys.len()`.
fn rebuilt(keys: &[i64], tabs: &[i32], capacity: usize) -> Vec<Entry> {
    let mut set = empty_set(capacity);
    let mask = capacity - 1;
    for (g, (&key, &tab)) in keys.iter().zip(tabs).enumerate() {
        let mut p = home(key, tab, mask);
        while set[p].group != VACANT {
            p = (p + 1) & mask;
        }
        set[p] = Entry {
            key,
            tab,
            group: g as u32,
        };
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The groups' ids, tables, inverse, order and offsets.
    type Grouped = (Vec<i64>, Vec<i32>, Vec<i64>, Vec<i64>, Vec<i64>);

    fn grouped(keys: &[i64], tabs: &[i32]) -> Grouped {
        let n = keys.len();
        let (mut k, mut t, mut inv, mut ord, mut off) = (
            vec![0; n],
            vec![0; n],
            vec![0; n],
            vec![0; n],
            vec![-7; n + 1],
        );
        let u = group_pairs(
            keys,
            tabs,
            &mut Groups {
                keys: &mut k,
                tabs: &mut t,
                inverse: &mut inv,
                positions: Some(Positions {
                    order: &mut ord,
                    offsets: &mut off,
                }),
            },
        );
        k.truncate(u);
        t.truncate(u);
        off.truncate(u + 1);
        (k, t, inv, ord, off)
    }

    #[test]
    fn groups_follow_first_occurrence_and_list_positions_ascending() {
        // Enough distinct pairs to grow the set twice; ids repeat across tables.
        let n = 3000;
        let keys: Vec<i64> = (0..n).map(|i| ((i * 7) % 700) as i64 - 350).collect();
        let tabs: Vec<i32> = (0..n).map(|i| (i % 3) as i32).collect();
        let (k, t, inv, ord, off) = grouped(&keys, &tabs);
        let mut first: HashMap<(i64, i32), usize> = HashMap::new();
        let mut expect = Vec::new();
        for i in 0..n {
            let g = *first.entry((keys[i], tabs[i])).or_insert_with(|| {
                expect.push((keys[i], tabs[i]));
                expect.len() - 1
            });
            assert_eq!(inv[i], g as i64);
        }
        assert_eq!(k.len(), expect.len());
        for (g, &(key, tab)) in expect.iter().enumerate() {
            assert_eq!((k[g], t[g]), (key, tab));
            let positions = &ord[off[g] as usize..off[g + 1] as usize];
            assert!(positions.windows(2).all(|w| w[0] < w[1]));
            assert!(positions.iter().all(|&i| inv[i as usize] == g as i64));
        }
        assert_eq!(off[k.len()], n as i64);
    }

    #[test]
    fn extreme_ids_and_pairs_with_equal_premix_values_stay_apart() {
        // id + table * golden agrees for (golden, 0) and (0, 1): one home, two pairs.
        let golden = 0x9E37_79B9_7F4A_7C15u64 as i64;
        let keys = [golden, 0, i64::MIN, i64::MAX, -1, golden, 0];
        let tabs = [0, 1, 0, 0, 0, 0, 1];
        let (k, t, inv, _, _) = grouped(&keys, &tabs);
        assert_eq!(k, [golden, 0, i64::MIN, i64::MAX, -1]);
        assert_eq!(t, [0, 1, 0, 0, 0]);
        assert_eq!(inv, [0, 1, 2, 3, 4, 0, 1]);
    }

    #[test]
    fn positions_are_listed_only_when_asked_for() {
        let keys = [5i64, 9, 5, 5, 9, 1];
        let tabs = [0i32; 6];
        let (mut k, mut t, mut inv) = (vec![0; 6], vec![0; 6], vec![0; 6]);
        let u = group_pairs(
            &keys,
            &tabs,
            &mut Groups {
                keys: &mut k,
                tabs: &mut t,
                inverse: &mut inv,
                positions: None,
            },
        );
        assert_eq!(u, 3);
        assert_eq!(&k[..u], [5, 9, 1]);
        assert_eq!(inv, [0, 1, 0, 0, 1, 2]);
        let (_, _, inv2, ord, off) = grouped(&keys, &tabs);
        assert_eq!(inv2, inv);
        assert_eq!(ord, [0, 2, 3, 1, 4, 5]);
        assert_eq!(off, [0, 3, 5, 6]);
    }

    #[test]
    fn empty_input_has_no_group() {
        let (k, _, _, _, off) = grouped(&[], &[]);
        assert!(k.is_empty());
        assert_eq!(off, [0]);
    }
}
