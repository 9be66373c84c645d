//! Crossed ids: the hash of a pair of ids, MurmurHash64A (seed 0) of their 16 little-endian
//! bytes (two full blocks, no tail), the same as the CUDA kernel and the torch path compute.

const M: u64 = 0xC6A4_A793_5BD1_E995;

/// MurmurHash64A of the 16 bytes `a.to_le_bytes() ++ b.to_le_bytes()`, seed 0.
#[inline(always)]
pub fn murmur_pair(a: u64, b: u64) -> u64 {
    let mut h = 16u64.wrapping_mul(M);
    for k in [a, b] {
        let mut k = k.wrapping_mul(M);
        k ^= k >> 47;
        k = k.wrapping_mul(M);
        h ^= k;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 47;
    h = h.wrapping_mul(M);
    h ^ (h >> 47)
}

/// `out[i] = murmur_pair(a[i], b[i])`.
pub fn pair_hash_into(a: &[u64], b: &[u64], out: &mut [u64]) {
    assert!(
        a.len() == out.len() && b.len() == out.len(),
        "pair_hash_into: input and output lengths differ"
    );
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = murmur_pair(x, y);
    }
}

#[cfg(test)]
mod tests {
    use super::{murmur_pair, pair_hash_into, M};

    /// MurmurHash64A of any bytes, seed 0, block by block as its definition reads.
    fn murmur64a(data: &[u8]) -> u64 {
        let mut h = (data.len() as u64).wrapping_mul(M);
        let mut blocks = data.chunks_exact(8);
        for block in &mut blocks {
            let mut k = u64::from_le_bytes(block.try_into().unwrap()).wrapping_mul(M);
            k ^= k >> 47;
            k = k.wrapping_mul(M);
            h ^= k;
            h = h.wrapping_mul(M);
        }
        let tail = blocks.remainder();
        if !tail.is_empty() {
            for (i, &byte) in tail.iter().enumerate() {
                h ^= u64::from(byte) << (8 * i);
            }
            h = h.wrapping_mul(M);
        }
        h ^= h >> 47;
        h = h.wrapping_mul(M);
        h ^ (h >> 47)
    }

    #[test]
    fn pairs_hash_as_their_sixteen_bytes() {
        let ids = [
            0,
            1,
            2,
            u64::MAX,
            1 << 63,
            (1 << 63) - 1,
            0x9E37_79B9_7F4A_7C15,
        ];
        for &a in &ids {
            for &b in &ids {
                let bytes = [a.to_le_bytes(), b.to_le_bytes()].concat();
                assert_eq!(murmur_pair(a, b), murmur64a(&bytes), "({a}, {b})");
            }
        }
        // The pair is ordered: (a, b) and (b, a) differ.
        assert_ne!(murmur_pair(1, 2), murmur_pair(2, 1));
    }

    #[test]
    fn known_values() {
        // From the package's Python reference of MurmurHash64A (tests/hash_reference.py).
        assert_eq!(murmur64a(&[]), 0);
        let mut out = [0u64; 2];
        pair_hash_into(&[0, 1], &[0, 2], &mut out);
        assert_eq!(out, [0xfcde_a51a_023e_4390, 0x208f_4166_ada6_77c0]);
    }
}
