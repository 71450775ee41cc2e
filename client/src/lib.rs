//! Client for the clustergo gateway: connect over TCP, TLS, WebSocket (plain or TLS) or KCP,
//! then send and receive whole frames.
//!
//! ```no_run
//! # async fn run() -> Result<(), clustergo_client::ClientError> {
//! use clustergo_client::Client;
//! let mut client = Client::connect("tcp://127.0.0.1:7000").await?;
//! client.send("hello").await?;
//! let echo = client.recv().await?;
//! assert_eq!(&echo[..], b"hello");
//! client.close("done").await?;
//! # Ok(()) }
//! ```
//!
//! Addresses: `tcp://host:port`, `tls://host:port` (TCP with TLS), `ws://host:port/path`,
//! `wss://host:port/path`, `kcp://host:port`. TLS trusts only the roots added to the
//! [`ClientConfig`] (e.g. the gateway's CA from a PEM file).
//!
//! While a caller waits in [`Client::recv`], the client sends a heartbeat (an empty frame) when
//! it has sent nothing, or heard nothing, for [`ClientConfig::heartbeat`], and fails with
//! [`ClientError::Idle`] when nothing (not even a heartbeat answer) arrived for
//! [`ClientConfig::idle_timeout`]. The wire format is in [`wire`].
//!
//! KCP runs over UDP, which proves nothing about who sent a datagram: like plain TCP it is no
//! defence against a forged peer; use TLS (`tls://`, `wss://`) where that matters.

//!
//! [`session`] is the resumable session on top (a session that survives a lost connection or
//! a gateway restart); [`wire`] and [`session`]'s codec are plain bytes, available without the
//! transports (`default-features = false`), as the game-server side uses them.

#[cfg(feature = "net")]
pub mod kcp;
#[cfg(feature = "net")]
mod net;
#[cfg(feature = "net")]
mod resume;
pub mod session;
pub mod wire;

#[cfg(feature = "net")]
pub use net::*;
#[cfg(feature = "net")]
pub use resume::{SessionClient, SessionClientConfig, SessionEvent};
