//! The client transports: TCP and TLS (`framed`), WebSocket (`ws`), KCP (`kcp`). Each
//! accepts connections within the budgets of `admission` and hands each client, as a
//! [`FrameRead`](crate::session::FrameRead) and a [`FrameWrite`](crate::session::FrameWrite),
//! to `session::serve`.

pub(crate) mod framed;
pub(crate) mod kcp;
pub(crate) mod ws;

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

use crate::session::ClientInfo;
use crate::state::Gateway;

/// The reason of the close frame that answers a client's.
pub(crate) const BYE: &str = "bye";

// Connections turned away before any session are cheap to make (over UDP their sources can
// be forged): their lines are gated.
pub(crate) static HANDSHAKE_FAILED: clustergo::LogGate = clustergo::LogGate::new();

/// The next TCP connection, or `None` once the gateway shuts down.
pub(crate) async fn next_tcp(
    gw: &Gateway,
    listener: &TcpListener,
    what: &str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((sock, peer)) => {
                    let _ = sock.set_nodelay(true);
                    return Some((sock, peer));
                }
                Err(e) => {
                    // Out of descriptors and the like: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "{what} accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            () = gw.shutdown.cancelled() => return None,
        }
    }
}

/// A client at accept: its handshake time starts now.
pub(crate) fn info(gw: &Gateway, transport: &'static str, peer: SocketAddr) -> ClientInfo {
    ClientInfo {
        transport,
        peer,
        deadline: tokio::time::Instant::now() + gw.limits.handshake_timeout,
        subprotocol: None,
    }
}
