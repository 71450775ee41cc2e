//! The link hello: who dials, whom it means to reach, and proof that it holds the cluster
//! secret, carried in the `Link` call's metadata.
//!
//! The proof is HMAC-SHA256 over a versioned string of every hello field, so a hello cannot be
//! moved to another pair of nodes or replayed outside [`NodeConfig::hello_max_skew`]
//! (crate::NodeConfig::hello_max_skew). It authenticates the node that dials, not each envelope:
//! links are trusted once admitted. TLS is left to the transport.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tonic::metadata::{MetadataMap, MetadataValue};

use crate::addr::LogicAddr;

const FROM: &str = "cg-from";
const TO: &str = "cg-to";
const INCARNATION: &str = "cg-incarnation";
const TIME: &str = "cg-time";
const MAC: &str = "cg-mac";

/// What a dialer claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hello {
    pub(crate) from: LogicAddr,
    pub(crate) to: LogicAddr,
    /// Random per node start: tells a restarted peer from a stale link to its old self.
    pub(crate) incarnation: u64,
    pub(crate) time_ms: u64,
}

/// Why a hello was refused. The text goes back to the dialer in the status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HelloError {
    #[error("link hello is missing or malformed: {0}")]
    Malformed(&'static str),
    #[error("link hello from {from} failed the cluster secret check (HMAC mismatch)")]
    BadSecret { from: LogicAddr },
    #[error("link hello from {from} is {skew:?} away from this node's clock (limit {limit:?})")]
    Stale {
        from: LogicAddr,
        skew: Duration,
        limit: Duration,
    },
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn mac(secret: &[u8], h: &Hello) -> Hmac<Sha256> {
    // new_from_slice accepts keys of any length for HMAC.
    let mut m = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(
        format!(
            "clustergo-link-v1\n{}\n{}\n{}\n{}",
            h.from.as_u32(),
            h.to.as_u32(),
            h.incarnation,
            h.time_ms
        )
        .as_bytes(),
    );
    m
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Writes a signed hello into `md`.
pub(crate) fn sign(
    md: &mut MetadataMap,
    secret: &[u8],
    from: LogicAddr,
    to: LogicAddr,
    incarnation: u64,
) {
    let h = Hello {
        from,
        to,
        incarnation,
        time_ms: now_ms(),
    };
    let tag = hex(&mac(secret, &h).finalize().into_bytes());
    let num = |v: u64| MetadataValue::try_from(v.to_string()).expect("digits are valid metadata");
    md.insert(FROM, num(from.as_u32().into()));
    md.insert(TO, num(to.as_u32().into()));
    md.insert(INCARNATION, num(incarnation));
    md.insert(TIME, num(h.time_ms));
    md.insert(
        MAC,
        MetadataValue::try_from(tag).expect("hex is valid metadata"),
    );
}

/// Reads and checks a hello. Membership and target checks are the caller's.
pub(crate) fn verify(
    md: &MetadataMap,
    secret: &[u8],
    max_skew: Duration,
) -> Result<Hello, HelloError> {
    let field = |key: &'static str| -> Result<&str, HelloError> {
        md.get(key)
            .and_then(|v| v.to_str().ok())
            .ok_or(HelloError::Malformed(key))
    };
    let num = |key: &'static str| -> Result<u64, HelloError> {
        field(key)?.parse().map_err(|_| HelloError::Malformed(key))
    };
    let addr = |key: &'static str| -> Result<LogicAddr, HelloError> {
        let raw = u32::try_from(num(key)?).map_err(|_| HelloError::Malformed(key))?;
        LogicAddr::from_u32(raw).map_err(|_| HelloError::Malformed(key))
    };
    let h = Hello {
        from: addr(FROM)?,
        to: addr(TO)?,
        incarnation: num(INCARNATION)?,
        time_ms: num(TIME)?,
    };
    let tag = unhex(field(MAC)?).ok_or(HelloError::Malformed(MAC))?;
    mac(secret, &h)
        .verify_slice(&tag)
        .map_err(|_| HelloError::BadSecret { from: h.from })?;
    let skew = Duration::from_millis(now_ms().abs_diff(h.time_ms));
    if skew > max_skew {
        return Err(HelloError::Stale {
            from: h.from,
            skew,
            limit: max_skew,
        });
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> LogicAddr {
        s.parse().unwrap()
    }

    #[test]
    fn signed_hello_verifies_and_tampering_fails() {
        let mut md = MetadataMap::new();
        sign(&mut md, b"k1", a("1.1.1"), a("1.1.2"), 42);
        let h = verify(&md, b"k1", Duration::from_secs(5)).unwrap();
        assert_eq!((h.from, h.to, h.incarnation), (a("1.1.1"), a("1.1.2"), 42));
        assert_eq!(
            verify(&md, b"k2", Duration::from_secs(5)),
            Err(HelloError::BadSecret { from: a("1.1.1") })
        );
        md.insert(
            TO,
            MetadataValue::try_from(a("1.1.3").as_u32().to_string()).unwrap(),
        );
        assert!(matches!(
            verify(&md, b"k1", Duration::from_secs(5)),
            Err(HelloError::BadSecret { .. })
        ));
        md.remove(MAC);
        assert_eq!(
            verify(&md, b"k1", Duration::from_secs(5)),
            Err(HelloError::Malformed(MAC))
        );
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(
            unhex(&hex(&[0, 1, 0xab, 0xff])).unwrap(),
            vec![0, 1, 0xab, 0xff]
        );
        assert!(unhex("abc").is_none());
        assert!(unhex("zz").is_none());
    }
}
