//! The deterministic reading plan: which rows a shard reads in an epoch, and in what order.
//!
//! An epoch orders the units (file, row group / stripe) in file order, or by a permutation
//! seeded with `(seed, epoch)` when shuffling, and lays their rows end to end; when shuffling,
//! the sequence then starts at a row drawn with `(seed, epoch)` and wraps around. Shard `s` of
//! `S` takes the contiguous slice `[s * n, (s + 1) * n)` of that sequence with `n = total / S`,
//! so every shard gets the same number of rows; the last `total % S` rows of the epoch's order
//! are not read in that epoch (with shuffling, other rows each epoch). With shuffling, the
//! shard's slice is cut into windows of `window` rows and each window is permuted with a seed
//! of `(seed, epoch, shard, window)`. Positions in a shard are therefore a pure function of the
//! inputs, which is what makes the cursor exact.

use super::error::{Error, Result};

/// A decodable piece of a file: a Parquet row group or an ORC stripe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unit {
    pub file: usize,
    pub group: usize,
    pub rows: usize,
}

/// Rows `[start, end)` of unit `unit`: one decode task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub unit: usize,
    pub start: usize,
    pub end: usize,
}

/// What the plan depends on besides the units and the epoch.
#[derive(Clone, Copy, Debug)]
pub struct Sharding {
    pub shuffle: bool,
    pub seed: u64,
    pub window: usize,
    pub shard: usize,
    pub shards: usize,
    /// Every shard `total / shards` rows (the last `total % shards` rows of the epoch's order
    /// left out), or the first `total % shards` shards one row more, so the shards cover
    /// every row.
    pub even: bool,
}

/// The rows of one shard in one epoch.
#[derive(Debug)]
pub struct ShardPlan {
    pub segments: Vec<Segment>,
    /// Position of each segment's first row in the shard sequence; one extra entry at the end.
    pub starts: Vec<usize>,
    pub rows: usize,
    window: usize,
    window_seed: Option<u64>,
    cached: Option<(usize, Vec<u32>)>,
}

/// SplitMix64: a small, well-mixed generator whose sequence is fixed for a seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(parts: &[u64]) -> Rng {
        let mut state = 0x243f_6a88_85a3_08d3u64;
        for &p in parts {
            state = Rng(state ^ p).next_u64();
        }
        Rng(state)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform index below `n` (`n > 0`), by rejection so no index is favoured.
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let v = self.next_u64();
            if v < zone {
                return v % n;
            }
        }
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// The positions `[lo, hi)` of the epoch's sequence of `total` rows that shard `shard` of
/// `shards` reads (see [`Sharding::even`]).
pub fn shard_bounds(total: usize, shard: usize, shards: usize, even: bool) -> (usize, usize) {
    let shards = shards.max(1);
    let per = total / shards;
    if even {
        return (shard * per, (shard + 1) * per);
    }
    let extra = total % shards;
    let lo = shard * per + shard.min(extra);
    (lo, lo + per + usize::from(shard < extra))
}

impl ShardPlan {
    pub fn new(units: &[Unit], cfg: &Sharding, epoch: u64) -> Result<ShardPlan> {
        if cfg.shards == 0 || cfg.shard >= cfg.shards {
            return Err(Error::InvalidArgument(format!(
                "shard {} is out of range for {} shards",
                cfg.shard, cfg.shards
            )));
        }
        let mut order: Vec<usize> = (0..units.len()).collect();
        if cfg.shuffle {
            Rng::new(&[cfg.seed, epoch, 1]).shuffle(&mut order);
        }
        let total: usize = units.iter().map(|u| u.rows).sum();
        // The epoch's sequence as pieces of units (unit, first row, end row), in order.
        let mut pieces: Vec<(usize, usize, usize)> =
            order.iter().map(|&u| (u, 0, units[u].rows)).collect();
        if cfg.shuffle && total > 0 {
            // Start the sequence at a seeded row, so that the rows left over at its end (and
            // the windows at the shards' ends) are other rows each epoch, not always the
            // tail of whichever unit comes last.
            let offset = Rng::new(&[cfg.seed, epoch, 3]).below(total as u64) as usize;
            pieces = rotated(&pieces, offset);
        }
        let (lo, hi) = shard_bounds(total, cfg.shard, cfg.shards, cfg.even);
        let per = hi - lo;
        let mut segments = Vec::new();
        let mut starts = Vec::new();
        let mut pos = 0;
        for &(u, first, last) in &pieces {
            let rows = last - first;
            let (a, b) = (pos.max(lo), (pos + rows).min(hi));
            if a < b {
                starts.push(a - lo);
                segments.push(Segment {
                    unit: u,
                    start: first + a - pos,
                    end: first + b - pos,
                });
            }
            pos += rows;
        }
        starts.push(per);
        let window_seed = cfg.shuffle.then(|| {
            Rng::new(&[cfg.seed, epoch, 2, cfg.shard as u64, cfg.shards as u64]).next_u64()
        });
        Ok(ShardPlan {
            segments,
            starts,
            rows: per,
            window: cfg.window.max(1),
            window_seed,
            cached: None,
        })
    }

    /// Index of the segment holding shard position `pos`.
    pub fn segment_of(&self, pos: usize) -> usize {
        self.starts.partition_point(|&s| s <= pos).saturating_sub(1)
    }

    /// First shard position whose row may be needed by a batch starting at `pos`.
    pub fn first_needed(&self, pos: usize) -> usize {
        match self.window_seed {
            Some(_) => pos - pos % self.window,
            None => pos,
        }
    }

    /// Last shard position (exclusive) whose row may be needed by a batch ending at `end`.
    pub fn last_needed(&self, end: usize) -> usize {
        match self.window_seed {
            Some(_) if end > 0 => ((end - 1) / self.window + 1) * self.window,
            _ => end,
        }
        .min(self.rows)
    }

    /// Appends the source (segment, row in segment) of positions `[a, b)` as runs of
    /// consecutive rows: `(segment, first row, last row + 1)`.
    pub fn sources(&mut self, a: usize, b: usize, out: &mut Vec<(usize, usize, usize)>) {
        let mut pos = a;
        while pos < b {
            match self.window_seed {
                None => {
                    let seg = self.segment_of(pos);
                    let end = self.starts[seg + 1].min(b);
                    let first = pos - self.starts[seg];
                    push_run(out, seg, first, first + end - pos);
                    pos = end;
                }
                Some(seed) => {
                    let w = pos / self.window;
                    let base = w * self.window;
                    let len = self.window.min(self.rows - base);
                    if self.cached.as_ref().is_none_or(|(cw, _)| *cw != w) {
                        let mut perm: Vec<u32> = (0..len as u32).collect();
                        Rng::new(&[seed, w as u64]).shuffle(&mut perm);
                        self.cached = Some((w, perm));
                    }
                    let perm = &self.cached.as_ref().expect("cached window").1;
                    let end = (base + len).min(b);
                    for p in pos..end {
                        let src = base + perm[p - base] as usize;
                        let seg = self.segment_of(src);
                        let row = src - self.starts[seg];
                        push_run(out, seg, row, row + 1);
                    }
                    pos = end;
                }
            }
        }
    }
}

/// `pieces` (unit, first row, end row) laid end to end, started at row `offset` of the sequence
/// and wrapped around: the piece holding `offset` is split in two.
fn rotated(pieces: &[(usize, usize, usize)], offset: usize) -> Vec<(usize, usize, usize)> {
    let mut head = Vec::with_capacity(pieces.len() + 1);
    let mut tail = Vec::new();
    let mut pos = 0;
    for &(u, first, last) in pieces {
        let rows = last - first;
        if pos + rows <= offset {
            tail.push((u, first, last));
        } else if pos >= offset {
            head.push((u, first, last));
        } else {
            let cut = first + (offset - pos);
            head.push((u, cut, last));
            tail.push((u, first, cut));
        }
        pos += rows;
    }
    head.extend(tail);
    head
}

fn push_run(out: &mut Vec<(usize, usize, usize)>, seg: usize, a: usize, b: usize) {
    if let Some(last) = out.last_mut() {
        if last.0 == seg && last.2 == a {
            last.2 = b;
            return;
        }
    }
    out.push((seg, a, b));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn units() -> Vec<Unit> {
        [5, 7, 3, 10, 1]
            .iter()
            .enumerate()
            .map(|(i, &rows)| Unit {
                file: i / 2,
                group: i % 2,
                rows,
            })
            .collect()
    }

    fn global_rows(plan: &mut ShardPlan, units: &[Unit]) -> Vec<usize> {
        let base: Vec<usize> = units
            .iter()
            .scan(0, |acc, u| {
                let b = *acc;
                *acc += u.rows;
                Some(b)
            })
            .collect();
        let mut runs = Vec::new();
        plan.sources(0, plan.rows, &mut runs);
        let mut rows = Vec::new();
        for (seg, a, b) in runs {
            let s = plan.segments[seg];
            rows.extend((a..b).map(|r| base[s.unit] + s.start + r));
        }
        rows
    }

    #[test]
    fn shards_are_disjoint_equal_and_cover_all_but_the_remainder() {
        let units = units();
        for shuffle in [false, true] {
            let mut all = Vec::new();
            for shard in 0..3 {
                let cfg = Sharding {
                    shuffle,
                    seed: 7,
                    window: 4,
                    shard,
                    shards: 3,
                    even: true,
                };
                let mut plan = ShardPlan::new(&units, &cfg, 1).unwrap();
                let rows = global_rows(&mut plan, &units);
                assert_eq!(rows.len(), 26 / 3);
                all.extend(rows);
            }
            all.sort_unstable();
            all.dedup();
            assert_eq!(all.len(), 3 * (26 / 3));
        }
    }

    #[test]
    fn uneven_shards_are_disjoint_and_cover_every_row() {
        let units = units();
        for shuffle in [false, true] {
            let mut all = Vec::new();
            let mut sizes = Vec::new();
            for shard in 0..4 {
                let cfg = Sharding {
                    shuffle,
                    seed: 7,
                    window: 4,
                    shard,
                    shards: 4,
                    even: false,
                };
                let mut plan = ShardPlan::new(&units, &cfg, 1).unwrap();
                let rows = global_rows(&mut plan, &units);
                sizes.push(rows.len());
                all.extend(rows);
            }
            assert_eq!(sizes, vec![7, 7, 6, 6]); // 26 rows: 2 shards one row more
            all.sort_unstable();
            all.dedup();
            assert_eq!(all, (0..26).collect::<Vec<_>>());
        }
        assert_eq!(shard_bounds(5, 4, 8, false), (4, 5)); // more shards than rows
        assert_eq!(shard_bounds(5, 5, 8, false), (5, 5));
        assert_eq!(shard_bounds(26, 1, 3, true), (8, 16));
    }

    #[test]
    fn shuffle_depends_on_seed_and_epoch_only() {
        let units = units();
        let cfg = Sharding {
            shuffle: true,
            seed: 3,
            window: 6,
            shard: 0,
            shards: 1,
            even: true,
        };
        let a = global_rows(&mut ShardPlan::new(&units, &cfg, 0).unwrap(), &units);
        let b = global_rows(&mut ShardPlan::new(&units, &cfg, 0).unwrap(), &units);
        let c = global_rows(&mut ShardPlan::new(&units, &cfg, 1).unwrap(), &units);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, (0..26).collect::<Vec<_>>());
    }

    #[test]
    fn shuffled_epochs_leave_out_other_rows_each_epoch() {
        // One unit of 10 rows over 3 shards: one row a epoch is not read. Shuffled, it is
        // another row each epoch (it was always the unit's last), so every row is read.
        let units = [Unit {
            file: 0,
            group: 0,
            rows: 10,
        }];
        let mut read = std::collections::BTreeSet::new();
        let mut left_out = std::collections::BTreeSet::new();
        for epoch in 0..6 {
            let mut epoch_rows = Vec::new();
            for shard in 0..3 {
                let cfg = Sharding {
                    shuffle: true,
                    seed: 11,
                    window: 4,
                    shard,
                    shards: 3,
                    even: true,
                };
                let mut plan = ShardPlan::new(&units, &cfg, epoch).unwrap();
                epoch_rows.extend(global_rows(&mut plan, &units));
            }
            epoch_rows.sort_unstable();
            epoch_rows.dedup();
            assert_eq!(epoch_rows.len(), 9);
            left_out.extend((0..10).filter(|r| !epoch_rows.contains(r)));
            read.extend(epoch_rows);
        }
        assert_eq!(read.len(), 10);
        assert!(left_out.len() > 1);
    }

    #[test]
    fn a_rotation_splits_the_unit_holding_the_offset() {
        let pieces = [(0, 0, 5), (1, 0, 7), (2, 0, 3)];
        assert_eq!(rotated(&pieces, 0), pieces.to_vec());
        assert_eq!(
            rotated(&pieces, 8),
            vec![(1, 3, 7), (2, 0, 3), (0, 0, 5), (1, 0, 3)]
        );
        assert_eq!(rotated(&pieces, 5), vec![(1, 0, 7), (2, 0, 3), (0, 0, 5)]);
    }

    #[test]
    fn bad_shard_is_rejected() {
        let cfg = Sharding {
            shuffle: false,
            seed: 0,
            window: 1,
            shard: 2,
            shards: 2,
            even: true,
        };
        assert!(ShardPlan::new(&units(), &cfg, 0).is_err());
    }
}
