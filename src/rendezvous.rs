//! Rendezvous (highest-random-weight) hashing: every candidate gets a score for a key, and the
//! highest wins. Every process ranks the same way (the hash is fixed, not seeded), a key keeps
//! its pick while that candidate is in the set, and when a candidate leaves only its keys
//! move. The library picks harbors and `get_addr_by_type_sticky` targets with it; the gateway
//! picks a client's game server with it.

use crate::addr::LogicAddr;

/// The score of `addr` for `key`: SplitMix64 over the pair.
pub fn score(key: u64, addr: LogicAddr) -> u64 {
    let mut z = (key ^ u64::from(addr.as_u32()).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A key for arbitrary bytes (an account id, a client's first frame): FNV-1a.
pub fn key_of(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The key traffic between nodes `a` and `b` is routed by: the unordered pair, so both
/// directions cross the same harbors. `pick(pair_key(a, b), harbors)` is the harbor of a
/// cluster that a fresh pair takes (an active pair keeps the one it has; see the README's
/// routing section); operators can predict a path with it.
pub fn pair_key(a: LogicAddr, b: LogicAddr) -> u64 {
    let (lo, hi) = (a.as_u32().min(b.as_u32()), a.as_u32().max(b.as_u32()));
    (u64::from(lo) << 32) | u64::from(hi)
}

/// The candidate with the highest score for `key` (ties, which need equal scores, go to the
/// higher address); `None` for no candidates. The order of `candidates` does not matter.
pub fn pick(key: u64, candidates: impl IntoIterator<Item = LogicAddr>) -> Option<LogicAddr> {
    candidates
        .into_iter()
        .max_by_key(|a| (score(key, *a), a.as_u32()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> LogicAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_key_keeps_its_pick_and_only_a_leavers_keys_move() {
        let four = [a("1.1.1"), a("1.1.2"), a("1.1.3"), a("1.1.4")];
        let three = &four[..3];
        let mut moved = 0;
        for k in 0..4000u64 {
            let key = key_of(&k.to_le_bytes());
            let before = pick(key, four).unwrap();
            let reversed = four.iter().rev().copied();
            assert_eq!(pick(key, reversed), Some(before));
            let after = pick(key, three.iter().copied()).unwrap();
            if before != a("1.1.4") {
                assert_eq!(after, before, "a key moved although its pick stayed");
            } else {
                moved += 1;
            }
        }
        assert!((700..1300).contains(&moved), "{moved} of 4000 were 1.1.4's");
        assert_eq!(pick(1, []), None);
    }
}
