//! Sorting int64 values by their high bits: a stable least-significant-digit radix sort.

/// Bits of one radix digit: 2048 buckets, whose counts stay in the first-level cache.
const DIGIT: u32 = 11;
const BUCKETS: usize = 1 << DIGIT;

/// The bits of `v` above the lowest `low_bits`, as an unsigned key in the order of the signed
/// values (the sign bit flipped).
#[inline(always)]
fn key(v: i64, low_bits: u32) -> u64 {
    ((v as u64) ^ (1 << 63)) >> low_bits
}

/// Sorts `data` stably by the signed value of its bits above the lowest `low_bits` (`0`: the
/// whole values, ascending): values equal there keep their order. When the low bits of each
/// value hold its position in `data` (ascending), the result is the ascending order of the
/// values. One read to count every digit, then one scatter per digit that is not the same for
/// every value, between `data` and a buffer as large.
pub fn sort_by_high_bits(data: &mut [i64], low_bits: u32) {
    let n = data.len();
    if n < 2 || low_bits >= 64 {
        return;
    }
    let passes = (64 - low_bits).div_ceil(DIGIT) as usize;
    let mut counts = vec![[0usize; BUCKETS]; passes];
    for &v in data.iter() {
        let k = key(v, low_bits);
        for (p, c) in counts.iter_mut().enumerate() {
            c[((k >> (p as u32 * DIGIT)) as usize) & (BUCKETS - 1)] += 1;
        }
    }
    let mut buffer = vec![0i64; n];
    let mut in_buffer = false;
    for (p, c) in counts.iter().enumerate() {
        if c.contains(&n) {
            continue; // one digit for all: this pass would not move anything
        }
        let mut next = [0usize; BUCKETS];
        let mut at = 0;
        for (slot, &x) in next.iter_mut().zip(c.iter()) {
            *slot = at;
            at += x;
        }
        let (src, dst): (&[i64], &mut [i64]) = if in_buffer {
            (&buffer[..], &mut *data)
        } else {
            (&*data, &mut buffer[..])
        };
        let shift = p as u32 * DIGIT;
        for &v in src {
            let d = ((key(v, low_bits) >> shift) as usize) & (BUCKETS - 1);
            dst[next[d]] = v;
            next[d] += 1;
        }
        in_buffer = !in_buffer;
    }
    if in_buffer {
        data.copy_from_slice(&buffer);
    }
}

#[cfg(test)]
mod tests {
    use super::sort_by_high_bits;

    fn values(n: usize, seed: u64) -> Vec<i64> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                // splitmix64
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                (z ^ (z >> 31)) as i64
            })
            .collect()
    }

    #[test]
    fn whole_values_sort_ascending() {
        for n in [0, 1, 2, 3, 100, 5000] {
            let mut v = values(n, n as u64);
            v.extend([i64::MIN, i64::MAX, 0, -1, 1, i64::MIN, 0]);
            let mut want = v.clone();
            want.sort();
            sort_by_high_bits(&mut v, 0);
            assert_eq!(v, want, "{n} values");
        }
    }

    #[test]
    fn high_bits_sort_stably() {
        for low_bits in [1, 11, 18, 40, 63] {
            // The top 10 bits and the low 8 only: values tie on their high bits by the hundreds.
            let mut v: Vec<i64> = values(3000, 7 + u64::from(low_bits))
                .into_iter()
                .map(|x| ((x >> 54) << 54) | (x & 0xFF))
                .collect();
            let mut want = v.clone();
            want.sort_by_key(|&x| ((x as u64) ^ (1 << 63)) >> low_bits);
            sort_by_high_bits(&mut v, low_bits);
            assert_eq!(v, want, "low_bits {low_bits}");
        }
    }

    #[test]
    fn positions_in_the_low_bits_give_the_full_order() {
        let bits = 13;
        let mut v: Vec<i64> = values(5000, 3)
            .into_iter()
            .enumerate()
            .map(|(i, x)| (x % 50) << bits | i as i64)
            .collect();
        let mut want = v.clone();
        want.sort();
        sort_by_high_bits(&mut v, bits);
        assert_eq!(v, want);
    }
}
