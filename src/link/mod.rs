//! Links between nodes: the per-peer queue, the batching writer, the reader, and the hello.
//!
//! A link is one long-lived call of the `Mesh.Link` gRPC method. Whichever side dialed, a link
//! carries traffic both ways. Everything sent to a peer goes through that peer's bounded
//! queue; the writer of whichever link is up drains it into batches, so what was queued while
//! dialing is sent in order once the link is up, and when a dialed link loses a simultaneous
//! dial to an accepted one nothing queued is lost.

pub(crate) mod auth;
pub(crate) mod peer;
pub(crate) mod reader;
pub(crate) mod writer;

pub(crate) use peer::{LinkState, LinkTokens, Outbound, Outcome, Peer};
