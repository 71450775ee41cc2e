//! Links between nodes: the per-peer queue, the batching writer, the reader and the handshake
//! (the batch they carry is a wire type, in `proto`).
//!
//! A link is one long-lived call of the `Mesh.Link` gRPC method. Whichever side dialed, a link
//! carries traffic both ways. Everything sent to a peer goes through that peer's bounded
//! queue; the writer of whichever link is up drains it into batches, so what was queued while
//! dialing is sent in order once the link is up, and when a dialed link loses a simultaneous
//! dial to an accepted one nothing queued is lost.

pub(crate) mod accept;
pub(crate) mod auth;
pub(crate) mod dial;
pub(crate) mod incoming;
pub(crate) mod mesh;
pub(crate) mod peer;
pub(crate) mod reader;
#[cfg(feature = "tls")]
pub(crate) mod tls;
pub(crate) mod writer;

pub(crate) use dial::ensure_link;
pub(crate) use mesh::{Host, Links, drop_peer, peer_left};
pub(crate) use peer::{LinkState, LinkStreams, Outbound, Outcome, Peer};
