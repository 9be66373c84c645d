//! The gradient of a sum-pooled lookup for its distinct rows.
//!
//! A lookup reads row `inverse[i]` for id `i`, and bag `m` sums (with weights `w_i`) the rows of
//! its ids `bags[m]..bags[m + 1]`. The gradient of row `u` is `sum(w_i * grad_out[bag(i)])` over
//! the ids `i` reading it. One pass over the ids in order adds each id's term into its row: no
//! sort of the ids by row, no list of every row's ids, and each row's terms are summed in
//! ascending id order, the order of the sort-based spelling (a stable grouping followed by an
//! `embedding_bag` sum).

use crate::idmap::prefetch;

/// Ids between the one added and the one whose row is prefetched.
const AHEAD: usize = 8;

/// The inputs of [`rows_grad`].
pub struct Pooled<'a> {
    /// `M * d` gradients of the bags (or `N * d`, one per id, without `bags`).
    pub grad_out: &'a [f32],
    pub d: usize,
    /// `M + 1` bag offsets over the ids, from 0 to `N`, non-decreasing; `None`: id `i` is bag
    /// `i`.
    pub bags: Option<&'a [i64]>,
    /// `N` rows read.
    pub inverse: &'a [i64],
    /// `N` per-id weights, or `None` for ones.
    pub weights: Option<&'a [f32]>,
}

/// Adds every id's term into `out` (`rows * d` floats, usually zeros): `out[inverse[i]] +=
/// w_i * grad_out[bag(i)]`. Returns `Err(i)` at the first id whose row is outside `0..rows`
/// (earlier ids were added).
///
/// # Panics
///
/// If the lengths disagree or the bags are not offsets from 0 to `N` (checked by the caller).
pub fn rows_grad(p: &Pooled<'_>, out: &mut [f32]) -> Result<(), usize> {
    let (d, n) = (p.d, p.inverse.len());
    assert!(
        d > 0 && out.len().is_multiple_of(d),
        "rows_grad: out is not rows of d floats"
    );
    let rows = (out.len() / d) as u64;
    let mut bag = 0usize;
    for i in 0..n {
        if let Some(&ahead) = p.inverse.get(i + AHEAD) {
            if (ahead as u64) < rows {
                prefetch(out.as_ptr().wrapping_add(ahead as usize * d));
            }
        }
        let m = match p.bags {
            None => i,
            Some(b) => {
                while b[bag + 1] as usize <= i {
                    bag += 1;
                }
                bag
            }
        };
        let u = p.inverse[i];
        if u as u64 >= rows {
            return Err(i);
        }
        let u = u as usize;
        let src = &p.grad_out[m * d..(m + 1) * d];
        let dst = &mut out[u * d..(u + 1) * d];
        match p.weights {
            None => dst.iter_mut().zip(src).for_each(|(o, &s)| *o += s),
            Some(w) => {
                let w = w[i];
                dst.iter_mut().zip(src).for_each(|(o, &s)| *o += w * s);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_add_into_their_rows_in_id_order() {
        // Bags [0, 2), [2, 2) (empty), [2, 5) over 5 ids reading rows 1, 0, 1, 1, 2.
        let d = 2;
        let grad_out = [1.0f32, 2.0, 100.0, 200.0, 10.0, 20.0];
        let bags = [0i64, 2, 2, 5];
        let inverse = [1i64, 0, 1, 1, 2];
        let weights = [1.0f32, 2.0, 3.0, 0.5, -1.0];
        let mut out = vec![0.0f32; 3 * d];
        let p = Pooled {
            grad_out: &grad_out,
            d,
            bags: Some(&bags),
            inverse: &inverse,
            weights: Some(&weights),
        };
        rows_grad(&p, &mut out).unwrap();
        assert_eq!(
            out,
            [2.0, 4.0, 1.0 + 30.0 + 5.0, 2.0 + 60.0 + 10.0, -10.0, -20.0]
        );
        // One bag per id, no weights.
        let mut out = vec![0.0f32; 2 * d];
        let p = Pooled {
            grad_out: &grad_out,
            d,
            bags: None,
            inverse: &[1, 1, 0],
            weights: None,
        };
        rows_grad(&p, &mut out).unwrap();
        assert_eq!(out, [10.0, 20.0, 101.0, 202.0]);
    }

    #[test]
    fn a_row_out_of_range_is_reported() {
        let mut out = vec![0.0f32; 2];
        let p = Pooled {
            grad_out: &[1.0, 1.0],
            d: 1,
            bags: None,
            inverse: &[0, 2],
            weights: None,
        };
        assert_eq!(rows_grad(&p, &mut out), Err(1));
    }
}
