//! Sharing the elements of several parts (features) out between threads.

/// Elements `start..end` of part `part`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub part: usize,
    pub start: usize,
    pub end: usize,
}

/// How many shares `total` elements make for up to `threads` threads, each share at least
/// `min_share` elements (thread hand-offs cost microseconds; small calls stay on one thread).
pub fn share_count(total: usize, threads: usize, min_share: usize) -> usize {
    (total / min_share.max(1)).clamp(1, threads.max(1))
}

/// The elements of parts of lengths `lens`, in order, cut into `count` shares of equal size
/// (to one element), each a list of runs; empty parts appear in no run.
pub fn split(lens: &[usize], count: usize) -> Vec<Vec<Run>> {
    let total: usize = lens.iter().sum();
    let count = count.max(1);
    let mut shares = Vec::with_capacity(count);
    let (mut part, mut start) = (0, 0);
    for s in 0..count {
        let mut want = total * (s + 1) / count - total * s / count;
        let mut runs = Vec::new();
        while want > 0 {
            let len = lens[part];
            let take = want.min(len - start);
            if take > 0 {
                runs.push(Run {
                    part,
                    start,
                    end: start + take,
                });
            }
            want -= take;
            start += take;
            if start == len {
                part += 1;
                start = 0;
            }
        }
        shares.push(runs);
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::{share_count, split, Run};

    #[test]
    fn shares_cover_every_element_once_in_order() {
        let lens = [5, 0, 3, 8, 0];
        for count in 1..=17 {
            let shares = split(&lens, count);
            assert_eq!(shares.len(), count);
            let flat: Vec<(usize, usize)> = shares
                .iter()
                .flatten()
                .flat_map(|r| (r.start..r.end).map(move |i| (r.part, i)))
                .collect();
            let want: Vec<(usize, usize)> = lens
                .iter()
                .enumerate()
                .flat_map(|(p, &n)| (0..n).map(move |i| (p, i)))
                .collect();
            assert_eq!(flat, want, "{count} shares");
            let sizes: Vec<usize> = shares
                .iter()
                .map(|s| s.iter().map(|r| r.end - r.start).sum())
                .collect();
            let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(hi - lo <= 1, "{count} shares of sizes {sizes:?}");
        }
    }

    #[test]
    fn a_share_may_span_parts() {
        let shares = split(&[2, 2], 1);
        assert_eq!(
            shares,
            vec![vec![
                Run {
                    part: 0,
                    start: 0,
                    end: 2
                },
                Run {
                    part: 1,
                    start: 0,
                    end: 2
                }
            ]]
        );
        assert_eq!(split(&[], 3), vec![vec![], vec![], vec![]]);
    }

    #[test]
    fn small_totals_stay_on_one_thread() {
        assert_eq!(share_count(10, 8, 100), 1);
        assert_eq!(share_count(250, 8, 100), 2);
        assert_eq!(share_count(1 << 20, 2, 100), 2);
        assert_eq!(share_count(0, 0, 0), 1);
    }
}
