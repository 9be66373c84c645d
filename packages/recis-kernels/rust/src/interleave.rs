//! Ragged members laid out row by row: row 0's items of every member in turn, then row 1's,
//! and so on (the batch-major order of a concatenated embedding lookup), with the offsets of
//! the `(row, member)` bags, a label per item (its member's) and optionally a weight per item
//! (its bag's).

/// One member: its items, and either its row offsets (`rows + 1`, items
/// `offsets[r]..offsets[r + 1]` in row `r`) or `None` for one item per row.
pub struct Member<'a> {
    pub values: &'a [i64],
    pub offsets: Option<&'a [i64]>,
    /// Written for each of the member's items.
    pub label: i32,
    /// One weight per row (its bag's), or `None` for 1.
    pub scale: Option<&'a [f32]>,
}

/// Where the interleaved items go: `values`, `labels` (and `weights` when given) hold one entry
/// per item, `bags` `rows * members + 1` offsets.
pub struct Interleaved<'a> {
    pub values: &'a mut [i64],
    pub labels: &'a mut [i32],
    pub weights: Option<&'a mut [f32]>,
    pub bags: &'a mut [i64],
}

/// The bag of a member's row: `(start, end)` in its values.
#[inline]
fn bag(member: &Member<'_>, row: usize) -> (usize, usize) {
    match member.offsets {
        Some(offsets) => (offsets[row] as usize, offsets[row + 1] as usize),
        None => (row, row + 1),
    }
}

/// Checks every member against `rows`: one item per row, or `rows + 1` offsets that never
/// decrease and stay inside its values. Returns the total number of items, or a message
/// naming the member (by position) and what is wrong.
pub fn count_items(members: &[Member<'_>], rows: usize) -> Result<usize, String> {
    let mut total = 0usize;
    for (k, m) in members.iter().enumerate() {
        if m.scale.is_some_and(|s| s.len() != rows) {
            return Err(format!(
                "member {k}: {} scales for {rows} rows",
                m.scale.map_or(0, |s| s.len())
            ));
        }
        match m.offsets {
            None => {
                if m.values.len() != rows {
                    return Err(format!(
                        "member {k}: {} values for {rows} rows",
                        m.values.len()
                    ));
                }
                total += rows;
            }
            Some(offsets) => {
                if offsets.len() != rows + 1 {
                    return Err(format!(
                        "member {k}: {} offsets for {rows} rows",
                        offsets.len()
                    ));
                }
                let size = m.values.len() as i64;
                for (r, w) in offsets.windows(2).enumerate() {
                    if w[0] < 0 || w[1] < w[0] || w[1] > size {
                        return Err(format!(
                            "member {k}: row {r} spans items {}..{} of {size}",
                            w[0], w[1]
                        ));
                    }
                }
                if rows > 0 {
                    total += (offsets[rows] - offsets[0]) as usize;
                }
            }
        }
    }
    Ok(total)
}

/// Interleaves `members` (checked by [`count_items`], whose total the outputs hold).
///
/// # Panics
///
/// If an output's length does not match.
pub fn interleave(members: &[Member<'_>], rows: usize, out: &mut Interleaved<'_>) {
    let n = out.values.len();
    assert!(
        out.labels.len() == n
            && out.weights.as_ref().is_none_or(|w| w.len() == n)
            && out.bags.len() == rows * members.len() + 1,
        "interleave: output lengths differ"
    );
    let mut at = 0usize;
    let mut q = 0usize;
    out.bags[0] = 0;
    for r in 0..rows {
        for m in members {
            let weight = m.scale.map_or(1.0, |s| s[r]);
            if m.offsets.is_none() {
                // Most members of a concatenation hold one id per row.
                out.values[at] = m.values[r];
                out.labels[at] = m.label;
                if let Some(weights) = out.weights.as_deref_mut() {
                    weights[at] = weight;
                }
                at += 1;
            } else {
                let (lo, hi) = bag(m, r);
                let len = hi - lo;
                out.values[at..at + len].copy_from_slice(&m.values[lo..hi]);
                out.labels[at..at + len].fill(m.label);
                if let Some(weights) = out.weights.as_deref_mut() {
                    weights[at..at + len].fill(weight);
                }
                at += len;
            }
            q += 1;
            out.bags[q] = at as i64;
        }
    }
    assert_eq!(
        at, n,
        "interleave: the members hold another number of items"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_interleave_members_with_their_labels_and_scales() {
        let single = [10, 11, 12];
        let (seq, seq_offsets) = ([20, 21, 22, 23], [0, 2, 2, 4]);
        let scale = [0.5f32, 1.0, 0.25];
        let members = [
            Member {
                values: &single,
                offsets: None,
                label: 3,
                scale: None,
            },
            Member {
                values: &seq,
                offsets: Some(&seq_offsets),
                label: 7,
                scale: Some(&scale),
            },
        ];
        let n = count_items(&members, 3).unwrap();
        assert_eq!(n, 7);
        let (mut values, mut labels, mut weights, mut bags) =
            (vec![0; n], vec![0; n], vec![0.0; n], vec![0; 7]);
        interleave(
            &members,
            3,
            &mut Interleaved {
                values: &mut values,
                labels: &mut labels,
                weights: Some(&mut weights),
                bags: &mut bags,
            },
        );
        assert_eq!(values, [10, 20, 21, 11, 12, 22, 23]);
        assert_eq!(labels, [3, 7, 7, 3, 3, 7, 7]);
        assert_eq!(weights, [1.0, 0.5, 0.5, 1.0, 1.0, 0.25, 0.25]);
        assert_eq!(bags, [0, 1, 3, 4, 4, 5, 7]);
    }

    #[test]
    fn bad_members_are_named() {
        let v = [1, 2, 3];
        let bad_offsets = [0, 2, 1, 3];
        let cases: [(Member<'_>, &str); 3] = [
            (
                Member {
                    values: &v[..2],
                    offsets: None,
                    label: 0,
                    scale: None,
                },
                "member 0: 2 values for 3 rows",
            ),
            (
                Member {
                    values: &v,
                    offsets: Some(&bad_offsets),
                    label: 0,
                    scale: None,
                },
                "member 0: row 1 spans items 2..1 of 3",
            ),
            (
                Member {
                    values: &v,
                    offsets: Some(&[0, 1, 2, 4]),
                    label: 0,
                    scale: None,
                },
                "member 0: row 2 spans items 2..4 of 3",
            ),
        ];
        for (member, message) in cases {
            assert_eq!(count_items(&[member], 3), Err(message.to_string()));
        }
    }
}
