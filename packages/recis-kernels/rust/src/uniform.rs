//! Counter-based uniforms: each value a pure function of an id, a seed and a column.
//!
//! Column `j` of id `x` under seed `s` takes the top 53 bits of
//! `fmix64(fmix64(x ^ s) + (j + 1) * 0x9E3779B97F4A7C15)` (wrapping), `t`, as
//! `(t + 0.5) / 2**53`: a float64 in (0, 1), never 0 or 1, so a logarithm or an inverse CDF of
//! it is finite. The arithmetic is that of the torch spelling of the same formula (an exact
//! conversion, one rounded addition, an exact scaling), so both give the same bits.

use crate::idmap::{fmix64, GOLDEN};

/// 2**-53: scaling by it is exact.
const TWO_POW_MINUS_53: f64 = 1.0 / 9_007_199_254_740_992.0;

/// The uniform of one column of a mixed id, `base = fmix64(id ^ seed)`.
#[inline]
fn column_uniform(base: u64, column: usize) -> f64 {
    let bits = fmix64(base.wrapping_add((column as u64).wrapping_add(1).wrapping_mul(GOLDEN)));
    ((bits >> 11) as f64 + 0.5) * TWO_POW_MINUS_53
}

/// `out[i * dim + j]` = the uniform of column `j` of `ids[i]` under `seeds[i]`, or under
/// `seeds[0]` for every id when `seeds` holds one seed. `out` holds `ids.len() * dim` values.
pub fn hashed_uniform_into(ids: &[i64], seeds: &[i64], dim: usize, out: &mut [f64]) {
    assert!(
        seeds.len() == 1 || seeds.len() == ids.len(),
        "one seed, or one per id"
    );
    assert_eq!(out.len(), ids.len() * dim, "out holds dim values per id");
    if dim == 0 {
        return;
    }
    let one = seeds.len() == 1;
    for (i, (&id, row)) in ids.iter().zip(out.chunks_exact_mut(dim)).enumerate() {
        let seed = if one { seeds[0] } else { seeds[i] };
        let base = fmix64((id ^ seed) as u64);
        for (j, value) in row.iter_mut().enumerate() {
            *value = column_uniform(base, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The formula in exact integer and rational arithmetic: `(2 t + 1) / 2**54`.
    fn reference(id: i64, seed: i64, column: u64) -> f64 {
        let base = fmix64((id ^ seed) as u64);
        let t = fmix64(base.wrapping_add((column + 1).wrapping_mul(GOLDEN))) >> 11;
        // 2 t + 1 < 2**54 needs 54 bits: round it to 53 the way an f64 addition does.
        let twice = 2 * t + 1;
        let kept = if twice >> 53 == 0 {
            twice
        } else {
            // Round half to even at the lowest bit.
            let half = twice >> 1;
            if twice & 1 == 1 && half & 1 == 1 {
                (half + 1) << 1
            } else {
                half << 1
            }
        };
        kept as f64 / 18_014_398_509_481_984.0 // 2**54
    }

    #[test]
    fn equals_the_rounded_rational_formula() {
        let ids = [0, 1, -1, i64::MIN, i64::MAX, 123_456_789, -987_654_321];
        let seeds = [0, 7, -3, i64::MAX, 42, i64::MIN, 1];
        let dim = 5;
        let mut out = vec![0.0; ids.len() * dim];
        hashed_uniform_into(&ids, &seeds, dim, &mut out);
        for (i, (&id, &seed)) in ids.iter().zip(&seeds).enumerate() {
            for j in 0..dim {
                let u = out[i * dim + j];
                assert_eq!(
                    u.to_bits(),
                    reference(id, seed, j as u64).to_bits(),
                    "id {id} col {j}"
                );
                assert!(u > 0.0 && u < 1.0);
            }
        }
    }

    #[test]
    fn one_seed_serves_every_id() {
        let ids = [5, -5, 0, 99];
        let (mut shared, mut each) = (vec![0.0; 12], vec![0.0; 12]);
        hashed_uniform_into(&ids, &[17], 3, &mut shared);
        hashed_uniform_into(&ids, &[17; 4], 3, &mut each);
        assert_eq!(shared, each);
    }

    #[test]
    fn no_columns_write_nothing() {
        hashed_uniform_into(&[1, 2], &[3], 0, &mut []);
    }
}
