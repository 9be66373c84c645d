//! Remainders of unsigned 64-bit ids by a divisor fixed for many ids.
//!
//! A hardware 64-bit division takes tens of cycles; dividing by an invariant divisor is a
//! multiplication instead (Granlund and Montgomery, "Division by invariant integers using
//! multiplication", 1994, figure 4.1): with `l = ceil(log2 d)` and
//! `m = floor(2^64 * (2^l - d) / d) + 1`, for every 64-bit `n`,
//! `n / d = (t + ((n - t) >> min(l, 1))) >> max(l - 1, 0)` where `t = (m * n) >> 64`.

/// A divisor `1 <= d < 2^63` prepared for repeated remainders.
#[derive(Clone, Copy, Debug)]
pub struct Divisor {
    d: u64,
    m: u64,
    shift1: u32,
    shift2: u32,
}

impl Divisor {
    /// Prepares `d`; `None` when `d` is 0 or not below `2^63`.
    pub fn new(d: u64) -> Option<Divisor> {
        if d == 0 || d >= 1 << 63 {
            return None;
        }
        // ceil(log2 d): 0 for d = 1.
        let l = 64 - (d - 1).leading_zeros();
        let m = ((((1u128 << l) - d as u128) << 64) / d as u128 + 1) as u64;
        Some(Divisor {
            d,
            m,
            shift1: l.min(1),
            shift2: l.saturating_sub(1),
        })
    }

    /// `n % d`.
    #[inline(always)]
    pub fn rem(&self, n: u64) -> u64 {
        let t = ((self.m as u128 * n as u128) >> 64) as u64;
        let q = (t + ((n - t) >> self.shift1)) >> self.shift2;
        n - q * self.d
    }

    /// `out[i] = x[i] % d`.
    pub fn rem_into(&self, x: &[u64], out: &mut [u64]) {
        assert_eq!(
            x.len(),
            out.len(),
            "rem_into: input and output lengths differ"
        );
        for (o, &n) in out.iter_mut().zip(x) {
            *o = self.rem(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Divisor;

    fn numerators() -> Vec<u64> {
        let mut n = vec![
            0,
            1,
            2,
            3,
            u64::MAX,
            u64::MAX - 1,
            1 << 63,
            (1 << 63) - 1,
            (1 << 63) + 1,
        ];
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..20_000 {
            // splitmix64
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            n.push(z ^ (z >> 31));
        }
        n
    }

    fn divisors() -> Vec<u64> {
        let mut d = vec![
            1,
            2,
            3,
            5,
            7,
            10,
            641,
            1_000_003,
            (1 << 63) - 1,
            (1 << 62) + 1,
        ];
        for k in 1..63 {
            d.extend([(1u64 << k) - 1, 1u64 << k, (1u64 << k) + 1]);
        }
        d
    }

    #[test]
    fn matches_the_hardware_remainder() {
        let ns = numerators();
        for d in divisors() {
            let div = Divisor::new(d).unwrap();
            for &n in &ns {
                assert_eq!(div.rem(n), n % d, "{n} % {d}");
            }
            // Numerators next to multiples of d, where a wrong quotient shows first.
            for k in [1u64, 2, 3, u64::MAX / d - 1, u64::MAX / d] {
                let base = k.wrapping_mul(d);
                for n in [base.wrapping_sub(1), base, base.wrapping_add(1)] {
                    assert_eq!(div.rem(n), n % d, "{n} % {d}");
                }
            }
        }
    }

    #[test]
    fn refuses_zero_and_large_divisors() {
        assert!(Divisor::new(0).is_none());
        assert!(Divisor::new(1 << 63).is_none());
        assert!(Divisor::new(u64::MAX).is_none());
        assert!(Divisor::new((1 << 63) - 1).is_some());
    }

    #[test]
    fn rem_into_fills_the_output() {
        let div = Divisor::new(10).unwrap();
        let mut out = [0u64; 3];
        div.rem_into(&[7, 25, u64::MAX], &mut out);
        assert_eq!(out, [7, 5, 5]);
    }
}
