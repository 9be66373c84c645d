//! The row ranges a 2-level truncation keeps.
//!
//! Rows `offsets[i]..offsets[i + 1]` come in consecutive parts (features), each part with its
//! own maximum length and side. A row keeps `min(length, max_len)` items: its first ones, or
//! its last ones on the tail side. Integer arithmetic wraps, as the NumPy it replaces did; the
//! copy that reads the ranges checks them.

/// Rows of one part: how many, their maximum length, and whether the tail is kept.
#[derive(Clone, Copy, Debug)]
pub struct Part {
    pub rows: usize,
    pub max_len: i64,
    pub tail: bool,
}

/// The kept ranges of every row, written to the four outputs (each as many entries as rows,
/// `new_offsets` one more): `new_offsets` (the truncated rows' offsets, from 0), `starts` (the
/// first kept item of each row in the input), `dropped` and `padded` (`max_len` minus the
/// kept length). Returns the number of kept items.
pub fn plan(
    offsets: &[i64],
    parts: &[Part],
    new_offsets: &mut [i64],
    starts: &mut [i64],
    dropped: &mut [i64],
    padded: &mut [i64],
) -> i64 {
    let rows = offsets.len().saturating_sub(1);
    assert_eq!(
        parts.iter().map(|p| p.rows).sum::<usize>(),
        rows,
        "plan: the parts' rows must add up to the offsets' rows"
    );
    assert!(
        new_offsets.len() == rows + 1
            && starts.len() == rows
            && dropped.len() == rows
            && padded.len() == rows,
        "plan: output lengths must match the rows"
    );
    let mut total = 0i64;
    new_offsets[0] = 0;
    let mut i = 0;
    for part in parts {
        for _ in 0..part.rows {
            let (lo, hi) = (offsets[i], offsets[i + 1]);
            let length = hi.wrapping_sub(lo);
            let kept = length.min(part.max_len);
            let skip = length.wrapping_sub(kept);
            total = total.wrapping_add(kept);
            new_offsets[i + 1] = total;
            starts[i] = if part.tail { lo.wrapping_add(skip) } else { lo };
            dropped[i] = skip;
            padded[i] = part.max_len.wrapping_sub(kept);
            i += 1;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::{plan, Part};

    #[test]
    fn head_and_tail_parts() {
        // Part 0: rows [0..3), [3..3), [3..8) kept to 2 from the head; part 1: rows [8..9),
        // [9..14) kept to 3 from the tail.
        let offsets = [0, 3, 3, 8, 9, 14];
        let parts = [
            Part {
                rows: 3,
                max_len: 2,
                tail: false,
            },
            Part {
                rows: 2,
                max_len: 3,
                tail: true,
            },
        ];
        let (mut o, mut s, mut d, mut p) = (vec![-1; 6], vec![-1; 5], vec![-1; 5], vec![-1; 5]);
        let total = plan(&offsets, &parts, &mut o, &mut s, &mut d, &mut p);
        assert_eq!(total, 8); // 2 + 0 + 2 + 1 + 3
        assert_eq!(o, [0, 2, 2, 4, 5, 8]);
        assert_eq!(s, [0, 3, 3, 8, 11]);
        assert_eq!(d, [1, 0, 3, 0, 2]);
        assert_eq!(p, [0, 2, 0, 2, 0]);
    }

    #[test]
    fn no_rows() {
        let (mut o, mut s, mut d, mut p) = (vec![-1; 1], vec![], vec![], vec![]);
        assert_eq!(plan(&[7], &[], &mut o, &mut s, &mut d, &mut p), 0);
        assert_eq!(o, [0]);
    }
}
