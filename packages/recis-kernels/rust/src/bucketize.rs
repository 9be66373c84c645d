//! Buckets of values against sorted boundaries: the number of boundaries `<= x`.
//!
//! NaN compares false with everything, so it counts no boundary: it lands in bucket 0 unless
//! the caller names another bucket for it (a fill value's bucket, say). The
//! boundaries come sorted, NaN-free and already in the values' type (rounded so that the
//! comparison in that type is exact; see the Python side).

/// Up to this many boundaries, every boundary is compared with a block of values (a loop the
/// compiler vectorizes across values); longer lists are binary searched per value.
pub const COUNT_MAX: usize = 32;
/// Values counted together against each boundary in turn: the block and its counts stay in
/// vector registers while the boundaries stream past (64 float32 values and their counts fill
/// 8 + 8 AVX2 registers; 8-byte values and counts, 8 + 8 AVX-512 ones). Measured on the 13 dense
/// features of the features benchmark (4096 rows, 8 to 20 boundaries, AVX-512): 23 against 45
/// us (float32) and 37 against 80 us (float64) for blocks of 256 counted through memory;
/// blocks of 32 were slower still, the compiler no longer vectorizing them.
const BLOCK: usize = 64;

/// `out[i]` = the number of `bounds` that are `<= x[i]`, or `nan_bucket` where `x[i]` is NaN
/// (a value unordered with itself).
pub fn bucketize_into<T: PartialOrd + Copy>(
    bounds: &[T],
    x: &[T],
    out: &mut [i64],
    nan_bucket: i64,
) {
    assert_eq!(
        x.len(),
        out.len(),
        "bucketize_into: input and output lengths differ"
    );
    if bounds.len() <= COUNT_MAX {
        count_dispatch(bounds, x, out, nan_bucket);
        return;
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = bounds.partition_point(|&b| b <= v) as i64;
    }
    if nan_bucket != 0 {
        for (o, &v) in out.iter_mut().zip(x) {
            if v.partial_cmp(&v).is_none() {
                *o = nan_bucket;
            }
        }
    }
}

/// [`count_into`] compiled for AVX-512 or AVX2 where the CPU has them (four or twice the
/// lanes of the SSE2 every x86-64 has), else for the build's baseline.
fn count_dispatch<T: PartialOrd + Copy>(bounds: &[T], x: &[T], out: &mut [i64], nan: i64) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") {
            // SAFETY: the CPU supports AVX-512 F and BW (checked just above).
            unsafe { count_avx512(bounds, x, out, nan) };
            return;
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { count_avx2(bounds, x, out, nan) };
            return;
        }
    }
    count_into(bounds, x, out, nan);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn count_avx512<T: PartialOrd + Copy>(bounds: &[T], x: &[T], out: &mut [i64], nan: i64) {
    count_into(bounds, x, out, nan);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn count_avx2<T: PartialOrd + Copy>(bounds: &[T], x: &[T], out: &mut [i64], nan: i64) {
    count_into(bounds, x, out, nan);
}

/// `out[i]` = the number of `bounds` that are `<= x[i]`, or `nan` where `x[i]` is NaN: every
/// boundary against a block of values at a time, counted in lanes as wide as the values (no
/// narrowing of the comparison masks); a last partial block one value at a time.
#[inline(always)]
fn count_into<T: PartialOrd + Copy>(bounds: &[T], x: &[T], out: &mut [i64], nan: i64) {
    if std::mem::size_of::<T>() == 8 {
        count_blocks::<T, u64>(bounds, x, out, nan);
    } else {
        count_blocks::<T, u32>(bounds, x, out, nan);
    }
}

/// An unsigned count of boundaries, as wide as the values compared.
trait Count: Copy + std::ops::AddAssign {
    const ZERO: Self;
    fn of(below: bool) -> Self;
    fn get(self) -> i64;
}

impl Count for u32 {
    const ZERO: Self = 0;
    #[inline(always)]
    fn of(below: bool) -> Self {
        u32::from(below)
    }
    #[inline(always)]
    fn get(self) -> i64 {
        i64::from(self)
    }
}

impl Count for u64 {
    const ZERO: Self = 0;
    #[inline(always)]
    fn of(below: bool) -> Self {
        u64::from(below)
    }
    #[inline(always)]
    fn get(self) -> i64 {
        // At most COUNT_MAX (or a slice's length): always fits.
        self as i64
    }
}

#[inline(always)]
fn count_blocks<T: PartialOrd + Copy, C: Count>(bounds: &[T], x: &[T], out: &mut [i64], nan: i64) {
    let full = x.len() - x.len() % BLOCK;
    let (x_full, x_rest) = x.split_at(full);
    let (out_full, out_rest) = out.split_at_mut(full);
    for (xs, os) in x_full
        .chunks_exact(BLOCK)
        .zip(out_full.chunks_exact_mut(BLOCK))
    {
        // Arrays of a fixed size: the compiler unrolls the lanes into registers.
        let xs: &[T; BLOCK] = xs.try_into().expect("a chunk of BLOCK values");
        let mut counts = [C::ZERO; BLOCK];
        for &b in bounds {
            for (c, &v) in counts.iter_mut().zip(xs) {
                *c += C::of(v >= b);
            }
        }
        for ((o, &c), &v) in os.iter_mut().zip(&counts).zip(xs) {
            // NaN is unordered with itself (and counted no boundary).
            *o = if v.partial_cmp(&v).is_none() {
                nan
            } else {
                c.get()
            };
        }
    }
    for (o, &v) in out_rest.iter_mut().zip(x_rest) {
        *o = if v.partial_cmp(&v).is_none() {
            nan
        } else {
            bounds.iter().filter(|&&b| v >= b).count() as i64
        };
    }
}

#[cfg(test)]
mod tests {
    use super::{bucketize_into, count_dispatch, count_into, BLOCK, COUNT_MAX};

    fn reference<T: PartialOrd + Copy>(bounds: &[T], v: T) -> i64 {
        bounds.iter().filter(|&&b| b <= v).count() as i64
    }

    #[test]
    fn short_and_long_lists_agree_with_counting() {
        for len in [0, 1, 3, COUNT_MAX, COUNT_MAX + 1, 200] {
            // Repeated boundaries included: every value of a run counts.
            let bounds: Vec<f32> = (0..len).map(|i| (i / 2) as f32 - 10.0).collect();
            let mut x: Vec<f32> = (0..1000).map(|i| i as f32 * 0.37 - 50.0).collect();
            x.extend([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 0.0, -10.0]);
            let mut out = vec![-1; x.len()];
            bucketize_into(&bounds, &x, &mut out, 0);
            for (&v, &o) in x.iter().zip(&out) {
                assert_eq!(o, reference(&bounds, v), "x = {v}, {len} boundaries");
            }
        }
    }

    #[test]
    fn every_block_size_counts_alike_on_each_instruction_set() {
        // Short inputs, full blocks and partial ones, through the dispatched path (AVX2
        // where the CPU has it) and the baseline one.
        let bounds: Vec<f64> = (0..COUNT_MAX).map(|i| (i * 3) as f64 - 40.0).collect();
        for n in (0..40).chain([BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17]) {
            let mut x: Vec<f64> = (0..n).map(|i| (i * 7 % 101) as f64 - 50.0).collect();
            x.extend([f64::NAN; 3]);
            let n = x.len();
            let (mut a, mut b) = (vec![-1; n], vec![-1; n]);
            count_dispatch(&bounds, &x, &mut a, 5);
            count_into(&bounds, &x, &mut b, 5);
            let want: Vec<i64> = x
                .iter()
                .map(|&v| if v.is_nan() { 5 } else { reference(&bounds, v) })
                .collect();
            assert_eq!(a, want, "{n} values");
            assert_eq!(b, want, "{n} values");
        }
    }

    #[test]
    fn nan_lands_in_bucket_zero() {
        let mut out = [9; 2];
        bucketize_into(&[f64::NEG_INFINITY, 0.0], &[f64::NAN, -1.0], &mut out, 0);
        assert_eq!(out, [0, 1]);
        bucketize_into(
            &(0..100).map(f64::from).collect::<Vec<_>>(),
            &[f64::NAN, 50.0],
            &mut out,
            0,
        );
        assert_eq!(out, [0, 51]);
    }

    #[test]
    fn nan_takes_the_bucket_named_for_it() {
        // Short lists (counted) and long ones (searched); values in bucket 0 keep it.
        for len in [3, COUNT_MAX + 5] {
            let bounds: Vec<f32> = (0..len).map(|i| i as f32).collect();
            let mut x = vec![f32::NAN, -1.0, 1.5, f32::NAN];
            x.extend((0..300).map(|i| if i % 7 == 0 { f32::NAN } else { -5.0 }));
            let mut out = vec![0; x.len()];
            bucketize_into(&bounds, &x, &mut out, 2);
            for (&v, &o) in x.iter().zip(&out) {
                let want = if v.is_nan() { 2 } else { reference(&bounds, v) };
                assert_eq!(o, want, "x = {v}, {len} boundaries");
            }
        }
    }

    #[test]
    fn integers_at_the_extremes() {
        let bounds = [i64::MIN, -1, 0, i64::MAX];
        let x = [i64::MIN, -2, -1, 0, 1, i64::MAX];
        // Alone (the values after the last full block) and repeated over full blocks.
        for copies in [1, 3 * BLOCK / x.len() + 1] {
            let xs: Vec<i64> = x.iter().copied().cycle().take(copies * x.len()).collect();
            let mut out = vec![0; xs.len()];
            count_dispatch(&bounds, &xs, &mut out, 7); // integers are never NaN
            let want: Vec<i64> = [1, 1, 2, 3, 3, 4]
                .into_iter()
                .cycle()
                .take(xs.len())
                .collect();
            assert_eq!(out, want, "{copies} copies");
        }
    }
}
