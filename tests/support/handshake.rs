//! The link handshake by hand, for tests that speak the wire themselves (trust, TLS).
#![allow(dead_code, unreachable_pub, missing_docs)]

use clustergo::LogicAddr;

/// The nonce the hand-made hellos of the trust tests send.
pub const HELLO_NONCE: &str = "0123456789abcdef0123456789abcdef";

/// Writes the `cg-*` metadata of a link hello from `from` to `to` (incarnation 7, the nonce
/// [`HELLO_NONCE`]): what a dialer sends, for tests that speak the wire themselves.
pub fn write_hello(md: &mut tonic::metadata::MetadataMap, from: LogicAddr, to: LogicAddr) {
    md.insert("cg-from", from.as_u32().to_string().parse().unwrap());
    md.insert("cg-to", to.as_u32().to_string().parse().unwrap());
    md.insert("cg-incarnation", "7".parse().unwrap());
    md.insert("cg-nonce", HELLO_NONCE.parse().unwrap());
}

/// The dialer's proof (HMAC-SHA256 under `secret`, role `dial`) for a hello written by
/// [`write_hello`] and the acceptor's `answer` (its response metadata).
pub fn dial_proof(
    secret: &[u8],
    from: LogicAddr,
    to: LogicAddr,
    answer: &tonic::metadata::MetadataMap,
) -> bytes::Bytes {
    use hmac::{Hmac, Mac};
    let field = |k: &str| answer.get(k).unwrap().to_str().unwrap().to_owned();
    let mut m = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    m.update(
        format!(
            "clustergo-link-v2 dial\n{}\n{}\n7\n{}\n{HELLO_NONCE}\n{}",
            from.as_u32(),
            to.as_u32(),
            field("cg-incarnation"),
            field("cg-nonce")
        )
        .as_bytes(),
    );
    bytes::Bytes::copy_from_slice(&m.finalize().into_bytes())
}
