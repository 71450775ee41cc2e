//! The link handshake: each side proves it holds the cluster secret, bound to this one
//! connection, so nothing seen on the network can be replayed to pass for a node.
//!
//! ```text
//! dialer → acceptor   call metadata    cg-from, cg-to, cg-incarnation, cg-nonce (Nd, fresh)
//! acceptor → dialer   response headers cg-incarnation, cg-nonce (Na, fresh), cg-proof (Pa)
//! dialer → acceptor   first batch      proof (Pd), no envelopes
//! acceptor → dialer   first batch      empty: admitted (or the call ends with a status)
//! ```
//!
//! `Pa` and `Pd` are HMAC-SHA256 under the secret over one transcript — version, role,
//! from, to, both incarnations, both nonces — with the role (`accept` / `dial`) telling the
//! two apart, so neither can be reflected as the other. The dialer checks `Pa` before it sends
//! anything: whoever merely holds a member's network address gets no traffic. The acceptor
//! checks `Pd`, which covers its own fresh `Na`: a captured hello and proof are worthless on
//! any other connection, so a link that is up is never replaced without a fresh proof.
//! Freshness comes from the nonces, not from clocks, so there is no skew window to replay in
//! and no clock to keep in step.
//!
//! What this does not do: encrypt, or bind the proof to the TCP connection. A man in the
//! middle can relay a handshake as it happens (and then read the link); TLS closes that.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tonic::metadata::{MetadataMap, MetadataValue};

use crate::addr::LogicAddr;

const FROM: &str = "cg-from";
const TO: &str = "cg-to";
const INCARNATION: &str = "cg-incarnation";
const NONCE: &str = "cg-nonce";
const PROOF: &str = "cg-proof";
const VERSION: &str = "clustergo-link-v2";
/// Sent by nodes whose batches acknowledge what they received (`Batch::received`); outside
/// the proof's transcript, so nodes without it still link. A peer that does not send it is
/// never counted as having left envelopes unconfirmed.
const ACKS: &str = "cg-acks";

/// Whether the other side's metadata says it acknowledges what it receives.
pub(crate) fn acks(md: &MetadataMap) -> bool {
    md.get(ACKS).is_some_and(|v| v.as_bytes() == b"1")
}

type Nonce = [u8; 16];

/// What a dialer sends first: who it says it is, whom it means to reach, and its nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hello {
    pub(crate) from: LogicAddr,
    pub(crate) to: LogicAddr,
    /// Random per node start: tells a restarted peer from a stale link to its old self.
    pub(crate) incarnation: u64,
    nonce: Nonce,
}

/// The acceptor's answer: its incarnation and its nonce (its proof travels beside them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Challenge {
    pub(crate) incarnation: u64,
    nonce: Nonce,
}

/// Why a handshake failed. The text may go back to the other side: it names nothing the
/// other side did not send itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HelloError {
    #[error("link handshake field {0} is missing or malformed")]
    Malformed(&'static str),
    #[error("the link proof of {from} failed the cluster secret check")]
    BadProof { from: LogicAddr },
    #[error(
        "the acceptor's proof failed the cluster secret check: it is not {to}, or the two nodes' secrets differ"
    )]
    BadAcceptor { to: LogicAddr },
}

/// 16 bytes no one can predict.
fn fresh() -> Nonce {
    let mut n = [0u8; 16];
    if getrandom::fill(&mut n).is_err() {
        // The OS refused randomness (it practically never does). A nonce must still never
        // repeat: a time-seeded generator is the fallback.
        tracing::warn!("the OS gave no random bytes for a link nonce; using a weaker source");
        n = fastrand::u128(..).to_le_bytes();
    }
    n
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn transcript(role: &str, secret: &[u8], h: &Hello, c: &Challenge) -> Hmac<Sha256> {
    // HMAC takes keys of any length.
    let mut m = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(
        format!(
            "{VERSION} {role}\n{}\n{}\n{}\n{}\n{}\n{}",
            h.from.as_u32(),
            h.to.as_u32(),
            h.incarnation,
            c.incarnation,
            hex(&h.nonce),
            hex(&c.nonce),
        )
        .as_bytes(),
    );
    m
}

fn text<'a>(md: &'a MetadataMap, key: &'static str) -> Result<&'a str, HelloError> {
    md.get(key)
        .and_then(|v| v.to_str().ok())
        .ok_or(HelloError::Malformed(key))
}

fn number(md: &MetadataMap, key: &'static str) -> Result<u64, HelloError> {
    text(md, key)?
        .parse()
        .map_err(|_| HelloError::Malformed(key))
}

fn address(md: &MetadataMap, key: &'static str) -> Result<LogicAddr, HelloError> {
    let raw = u32::try_from(number(md, key)?).map_err(|_| HelloError::Malformed(key))?;
    LogicAddr::from_u32(raw).map_err(|_| HelloError::Malformed(key))
}

fn put(md: &mut MetadataMap, key: &'static str, value: String) {
    md.insert(
        key,
        MetadataValue::try_from(value).expect("digits and hex are valid metadata"),
    );
}

impl Hello {
    pub(crate) fn new(from: LogicAddr, to: LogicAddr, incarnation: u64) -> Self {
        Hello {
            from,
            to,
            incarnation,
            nonce: fresh(),
        }
    }

    pub(crate) fn write(&self, md: &mut MetadataMap) {
        put(md, FROM, self.from.as_u32().to_string());
        put(md, TO, self.to.as_u32().to_string());
        put(md, INCARNATION, self.incarnation.to_string());
        put(md, NONCE, hex(&self.nonce));
        put(md, ACKS, "1".to_owned());
    }

    pub(crate) fn read(md: &MetadataMap) -> Result<Self, HelloError> {
        Ok(Hello {
            from: address(md, FROM)?,
            to: address(md, TO)?,
            incarnation: number(md, INCARNATION)?,
            nonce: unhex(text(md, NONCE)?).ok_or(HelloError::Malformed(NONCE))?,
        })
    }

    /// The dialer's proof for `challenge`, sent in its first batch.
    pub(crate) fn prove(&self, secret: &[u8], challenge: &Challenge) -> bytes::Bytes {
        let tag = transcript("dial", secret, self, challenge)
            .finalize()
            .into_bytes();
        bytes::Bytes::copy_from_slice(&tag)
    }

    /// Checks the dialer's proof (acceptor side).
    pub(crate) fn check(
        &self,
        secret: &[u8],
        challenge: &Challenge,
        proof: &[u8],
    ) -> Result<(), HelloError> {
        transcript("dial", secret, self, challenge)
            .verify_slice(proof)
            .map_err(|_| HelloError::BadProof { from: self.from })
    }
}

impl Challenge {
    pub(crate) fn new(incarnation: u64) -> Self {
        Challenge {
            incarnation,
            nonce: fresh(),
        }
    }

    /// Writes the challenge and the acceptor's proof into the response headers.
    pub(crate) fn write(&self, md: &mut MetadataMap, secret: &[u8], hello: &Hello) {
        let tag = transcript("accept", secret, hello, self)
            .finalize()
            .into_bytes();
        put(md, INCARNATION, self.incarnation.to_string());
        put(md, NONCE, hex(&self.nonce));
        put(md, PROOF, hex(&tag));
        put(md, ACKS, "1".to_owned());
    }

    /// Reads the acceptor's answer to `hello` and checks its proof (dialer side).
    pub(crate) fn read(md: &MetadataMap, secret: &[u8], hello: &Hello) -> Result<Self, HelloError> {
        let c = Challenge {
            incarnation: number(md, INCARNATION)?,
            nonce: unhex(text(md, NONCE)?).ok_or(HelloError::Malformed(NONCE))?,
        };
        let tag: [u8; 32] = unhex(text(md, PROOF)?).ok_or(HelloError::Malformed(PROOF))?;
        transcript("accept", secret, hello, &c)
            .verify_slice(&tag)
            .map_err(|_| HelloError::BadAcceptor { to: hello.to })?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> LogicAddr {
        s.parse().unwrap()
    }

    #[test]
    fn handshake_verifies_and_binds_every_field() {
        let hello = Hello::new(a("1.1.1"), a("1.1.2"), 42);
        let mut md = MetadataMap::new();
        hello.write(&mut md);
        let got = Hello::read(&md).unwrap();
        assert_eq!(got, hello);

        let challenge = Challenge::new(7);
        let mut answer = MetadataMap::new();
        challenge.write(&mut answer, b"k1", &got);
        assert_eq!(Challenge::read(&answer, b"k1", &hello).unwrap(), challenge);
        // Another secret, or another hello (a fresh nonce), fails the acceptor's proof.
        assert_eq!(
            Challenge::read(&answer, b"k2", &hello),
            Err(HelloError::BadAcceptor { to: a("1.1.2") })
        );
        let other = Hello::new(a("1.1.1"), a("1.1.2"), 42);
        assert!(Challenge::read(&answer, b"k1", &other).is_err());

        let proof = hello.prove(b"k1", &challenge);
        assert_eq!(got.check(b"k1", &challenge, &proof), Ok(()));
        // The same proof against a fresh challenge (a replay on another connection) fails.
        assert_eq!(
            got.check(b"k1", &Challenge::new(7), &proof),
            Err(HelloError::BadProof { from: a("1.1.1") })
        );
        assert!(got.check(b"k2", &challenge, &proof).is_err());
        // The acceptor's proof is not a dialer's proof (no reflection).
        let pa = unhex::<32>(answer.get(PROOF).unwrap().to_str().unwrap()).unwrap();
        assert!(got.check(b"k1", &challenge, &pa).is_err());
    }

    #[test]
    fn malformed_fields_are_named() {
        let mut md = MetadataMap::new();
        Hello::new(a("1.1.1"), a("1.1.2"), 1).write(&mut md);
        md.insert(NONCE, MetadataValue::try_from("abc").unwrap());
        assert_eq!(Hello::read(&md), Err(HelloError::Malformed(NONCE)));
        md.remove(FROM);
        assert_eq!(Hello::read(&md), Err(HelloError::Malformed(FROM)));
        md.insert(FROM, MetadataValue::try_from("0").unwrap());
        assert_eq!(Hello::read(&md), Err(HelloError::Malformed(FROM)));
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(
            unhex::<4>(&hex(&[0, 1, 0xab, 0xff])),
            Some([0, 1, 0xab, 0xff])
        );
        assert!(unhex::<2>("abc").is_none());
        assert!(unhex::<1>("zz").is_none());
    }
}
