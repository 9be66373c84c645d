//! Remainders of unsigned 64-bit ids by a divisor fixed for many ids.
//!
//! A hardware 64-bit division takes tens of cycles; dividing by an invariant divisor is a
//! multiplication instead (Granlund and Montgomery, "Division by invariant integers using
//! multiplication", 1994). With `l = ceil(log2 d)`: when `m = ceil(2^(63+l) / d)` misses
//! `2^(63+l) / d` by little enough (theorem 4.2), `n / d = (m * n) >> (63 + l)`; otherwise
//! `m' = floor(2^(63+l) / d)` gives `n / d = (m' * (n + 1)) >> (63 + l)` (Robison, 2005).
//! Powers of two mask.

/// How a prepared divisor finds its quotients.
#[derive(Clone, Copy, Debug)]
enum Method {
    /// `d` is a power of two: the remainder is `n & (d - 1)`.
    Mask,
    /// `q = mulhi(n, m) >> shift`: a 64-bit magic number is exact for every `n` (about half
    /// of all divisors; Granlund and Montgomery, theorem 4.2).
    Multiply { m: u64, shift: u32 },
    /// `q = mulhi(n + 1, m) >> shift` with `m` rounded down instead of up, for the other
    /// divisors (where rounding up misses by too much, rounding down with the increment is
    /// exact: Robison, "N-bit unsigned division via N-bit multiply-add", 2005). `n + 1` is
    /// taken in 128 bits, as `m * n + m`: no overflow at `n = 2^64 - 1`.
    MultiplyIncrement { m: u64, shift: u32 },
}

/// A divisor `1 <= d < 2^63` prepared for repeated remainders.
#[derive(Clone, Copy, Debug)]
pub struct Divisor {
    d: u64,
    method: Method,
}

impl Divisor {
    /// Prepares `d`; `None` when `d` is 0 or not below `2^63`.
    pub fn new(d: u64) -> Option<Divisor> {
        if d == 0 || d >= 1 << 63 {
            return None;
        }
        if d.is_power_of_two() {
            return Some(Divisor {
                d,
                method: Method::Mask,
            });
        }
        // l = ceil(log2 d) >= 2, so 2^(l-1) < d < 2^l.
        let l = 64 - (d - 1).leading_zeros();
        let d128 = d as u128;
        // m = ceil(2^(63+l) / d) lies in [2^63, 2^64); it is exact for every 64-bit n when its
        // error m*d - 2^(63+l) is at most 2^(l-1).
        let m = (1u128 << (63 + l)).div_ceil(d128);
        let method = if m * d128 - (1u128 << (63 + l)) <= 1u128 << (l - 1) {
            Method::Multiply {
                m: m as u64,
                shift: l - 1,
            }
        } else {
            // floor(2^(63+l) / d): d is no power of two, so one below the rounded-up value.
            Method::MultiplyIncrement {
                m: (m - 1) as u64,
                shift: l - 1,
            }
        };
        Some(Divisor { d, method })
    }

    /// `n % d`.
    #[inline(always)]
    pub fn rem(&self, n: u64) -> u64 {
        match self.method {
            Method::Mask => n & (self.d - 1),
            Method::Multiply { m, shift } => n - (mulhi(n, m) >> shift) * self.d,
            Method::MultiplyIncrement { m, shift } => n - (mulhi_inc(n, m) >> shift) * self.d,
        }
    }

    /// `out[i] = x[i] % d`.
    pub fn rem_into(&self, x: &[u64], out: &mut [u64]) {
        assert_eq!(
            x.len(),
            out.len(),
            "rem_into: input and output lengths differ"
        );
        let d = self.d;
        // One loop per method: the choice is made once, not per value.
        match self.method {
            Method::Mask => {
                for (o, &n) in out.iter_mut().zip(x) {
                    *o = n & (d - 1);
                }
            }
            Method::Multiply { m, shift } => rem_dispatch(x, out, d, m, shift, 0),
            Method::MultiplyIncrement { m, shift } => rem_dispatch(x, out, d, m, shift, 1),
        }
    }
}

/// `out[i] = x[i] - (mulhi(x[i] + inc, m) >> shift) * d` (`inc` 0 or 1), in SIMD lanes where
/// the CPU has them. x86-64 has no vector instruction for the high half of a 64-bit product,
/// so [`rem_split`] builds it from four 32 x 32 -> 64-bit products, which the compiler
/// vectorizes: 8 lanes with AVX-512 (about 1.8x the scalar loop on 26 x 4096 ids), 4 with
/// AVX2; elsewhere the scalar 128-bit product.
fn rem_dispatch(x: &[u64], out: &mut [u64], d: u64, m: u64, shift: u32, inc: u64) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512dq") {
            // SAFETY: the CPU supports AVX-512 F and DQ (checked just above).
            unsafe { rem_avx512(x, out, d, m, shift, inc) };
            return;
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { rem_avx2(x, out, d, m, shift, inc) };
            return;
        }
    }
    if inc == 0 {
        for (o, &n) in out.iter_mut().zip(x) {
            *o = n - (mulhi(n, m) >> shift) * d;
        }
    } else {
        for (o, &n) in out.iter_mut().zip(x) {
            *o = n - (mulhi_inc(n, m) >> shift) * d;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn rem_avx512(x: &[u64], out: &mut [u64], d: u64, m: u64, shift: u32, inc: u64) {
    rem_split(x, out, d, m, shift, inc);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn rem_avx2(x: &[u64], out: &mut [u64], d: u64, m: u64, shift: u32, inc: u64) {
    rem_split(x, out, d, m, shift, inc);
}

/// [`rem_dispatch`]'s remainders with `mulhi(n + inc, m)` as `hi(n * m + inc * m)` from the
/// 32-bit halves of `n` and `m`: `nl * ml + inc * ml` and the middle sum stay below `2^64`.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[inline(always)]
fn rem_split(x: &[u64], out: &mut [u64], d: u64, m: u64, shift: u32, inc: u64) {
    const LOW: u64 = 0xffff_ffff;
    let (ml, mh) = (m & LOW, m >> 32);
    let (add_low, add_mid) = (ml * inc, mh * inc);
    for (o, &n) in out.iter_mut().zip(x) {
        let (nl, nh) = (n & LOW, n >> 32);
        let ll = nl * ml + add_low;
        let (lh, hl) = (nl * mh, nh * ml);
        let mid = (ll >> 32) + (lh & LOW) + (hl & LOW) + add_mid;
        let hi = nh * mh + (lh >> 32) + (hl >> 32) + (mid >> 32);
        *o = n - (hi >> shift) * d;
    }
}

/// The high 64 bits of the 128-bit product.
#[inline(always)]
fn mulhi(a: u64, b: u64) -> u64 {
    ((a as u128 * b as u128) >> 64) as u64
}

/// The high 64 bits of `(n + 1) * m`, as `n * m + m` in 128 bits: the carry of adding `m` to
/// the low half goes to the high half (one multiplication; `n + 1` itself may overflow).
#[inline(always)]
fn mulhi_inc(n: u64, m: u64) -> u64 {
    let p = n as u128 * m as u128;
    let (_, carry) = (p as u64).overflowing_add(m);
    ((p >> 64) as u64) + u64::from(carry)
}

#[cfg(test)]
mod tests {
    use super::{Divisor, Method};

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
    fn every_method_is_tested() {
        // The divisors above reach each way of dividing, so each is checked against `%`.
        let (mut mask, mut multiply, mut increment) = (0, 0, 0);
        for d in divisors() {
            match Divisor::new(d).unwrap().method {
                Method::Mask => mask += 1,
                Method::Multiply { .. } => multiply += 1,
                Method::MultiplyIncrement { .. } => increment += 1,
            }
        }
        assert!(
            mask > 0 && multiply > 10 && increment > 10,
            "{mask} {multiply} {increment}"
        );
    }

    #[test]
    fn refuses_zero_and_large_divisors() {
        assert!(Divisor::new(0).is_none());
        assert!(Divisor::new(1 << 63).is_none());
        assert!(Divisor::new(u64::MAX).is_none());
        assert!(Divisor::new((1 << 63) - 1).is_some());
    }

    #[test]
    fn rem_into_matches_rem_for_every_method() {
        let ns = numerators();
        for d in [8u64, 100, 103, 158_629, 1_000_003, (1 << 62) + 1] {
            let div = Divisor::new(d).unwrap();
            let mut out = vec![0u64; ns.len()];
            div.rem_into(&ns, &mut out);
            for (&n, &r) in ns.iter().zip(&out) {
                assert_eq!(r, n % d, "{n} % {d}");
            }
        }
    }

    #[test]
    fn split_products_match_the_hardware_remainder() {
        // The 32-bit-halves path (the SIMD one) on its own, whatever this CPU dispatches to.
        let ns = numerators();
        for d in divisors().into_iter().filter(|d| !d.is_power_of_two()) {
            let (m, shift, inc) = match Divisor::new(d).unwrap().method {
                Method::Multiply { m, shift } => (m, shift, 0),
                Method::MultiplyIncrement { m, shift } => (m, shift, 1),
                Method::Mask => unreachable!(),
            };
            let mut out = vec![0u64; ns.len()];
            super::rem_split(&ns, &mut out, d, m, shift, inc);
            for (&n, &r) in ns.iter().zip(&out) {
                assert_eq!(r, n % d, "{n} % {d}");
            }
        }
    }

    #[test]
    fn rem_into_fills_the_output() {
        let div = Divisor::new(10).unwrap();
        let mut out = [0u64; 3];
        div.rem_into(&[7, 25, u64::MAX], &mut out);
        assert_eq!(out, [7, 5, 5]);
    }
}
