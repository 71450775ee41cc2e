//! A fast hasher for the maps on the hot path: peers by address, handlers by command or
//! method name.
//!
//! SipHash's resistance to flooding is not needed here: keys are inserted only from membership
//! and from handler registration, never from what a peer sends; peers' input is only looked up.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// The multiply-rotate hash of rustc's FxHash.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FastHasher(u64);

const K: u64 = 0x517c_c1b7_2722_0a95;

impl FastHasher {
    fn add(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(K);
    }
}

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8-byte chunk")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(b));
        }
    }

    fn write_u8(&mut self, x: u8) {
        self.add(x.into());
    }

    fn write_u32(&mut self, x: u32) {
        self.add(x.into());
    }

    fn write_u64(&mut self, x: u64) {
        self.add(x);
    }

    fn write_usize(&mut self, x: usize) {
        self.add(x as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A `HashMap` with [`FastHasher`].
pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// SipHash-2-4 under a secret key: a keyed pseudo-random function for values a peer must not
/// predict (call ids). Its output for one input says nothing usable about the next without
/// the key, which comes from the OS's random source.
#[derive(Clone)]
pub(crate) struct SipKey([u64; 2]);

impl std::fmt::Debug for SipKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SipKey(<secret>)")
    }
}

impl SipKey {
    /// A fresh key from the OS's random source.
    pub(crate) fn random() -> SipKey {
        let mut b = [0u8; 16];
        // Without the OS's randomness there is no safe key; call ids would be guessable.
        getrandom::fill(&mut b).expect("the OS random source is available");
        SipKey::from_bytes(b)
    }

    fn from_bytes(b: [u8; 16]) -> SipKey {
        let (k0, k1) = b.split_at(8);
        SipKey([
            u64::from_le_bytes(k0.try_into().expect("8 bytes")),
            u64::from_le_bytes(k1.try_into().expect("8 bytes")),
        ])
    }

    /// SipHash-2-4 of `msg`.
    pub(crate) fn hash(&self, msg: &[u8]) -> u64 {
        let [k0, k1] = self.0;
        let mut v = [
            k0 ^ 0x736f_6d65_7073_6575,
            k1 ^ 0x646f_7261_6e64_6f6d,
            k0 ^ 0x6c79_6765_6e65_7261,
            k1 ^ 0x7465_6462_7974_6573,
        ];
        fn round(v: &mut [u64; 4]) {
            v[0] = v[0].wrapping_add(v[1]);
            v[1] = v[1].rotate_left(13) ^ v[0];
            v[0] = v[0].rotate_left(32);
            v[2] = v[2].wrapping_add(v[3]);
            v[3] = v[3].rotate_left(16) ^ v[2];
            v[0] = v[0].wrapping_add(v[3]);
            v[3] = v[3].rotate_left(21) ^ v[0];
            v[2] = v[2].wrapping_add(v[1]);
            v[1] = v[1].rotate_left(17) ^ v[2];
            v[2] = v[2].rotate_left(32);
        }
        let compress = |m: u64, v: &mut [u64; 4]| {
            v[3] ^= m;
            round(v);
            round(v);
            v[0] ^= m;
        };
        let mut chunks = msg.chunks_exact(8);
        for c in &mut chunks {
            compress(u64::from_le_bytes(c.try_into().expect("8 bytes")), &mut v);
        }
        let mut last = [0u8; 8];
        last[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        last[7] = msg.len() as u8;
        compress(u64::from_le_bytes(last), &mut v);
        v[2] ^= 0xff;
        for _ in 0..4 {
            round(&mut v);
        }
        v[0] ^ v[1] ^ v[2] ^ v[3]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_work_with_strings_and_numbers() {
        let mut m: FastMap<String, u32> = FastMap::default();
        for i in 0..1000u32 {
            m.insert(format!("method-{i}"), i);
        }
        for i in 0..1000u32 {
            assert_eq!(m[&format!("method-{i}")], i);
        }
        let mut n: FastMap<u32, u32> = FastMap::default();
        n.extend((0..1000).map(|i| (i << 12, i)));
        assert_eq!(n[&(999 << 12)], 999);
    }

    #[test]
    fn siphash_matches_the_reference_vectors() {
        let key = SipKey::from_bytes(std::array::from_fn(|i| i as u8));
        assert_eq!(key.hash(&[]), 0x726f_db47_dd0e_0e31);
        let eight: Vec<u8> = (0..8).collect();
        assert_eq!(key.hash(&eight), 0x93f5_f579_9a93_2462);
        let fifteen: Vec<u8> = (0..15).collect();
        assert_eq!(key.hash(&fifteen), 0xa129_ca61_49be_45e5);
    }
}
