//! Dialing a link: connect (over TLS when configured), send the hello, check the acceptor's
//! challenge before anything is sent, prove this node, and wait to be admitted.
//!
//! A failed dial fails what waits on the peer and schedules the next one after a backoff that
//! doubles from `redial_backoff` to `redial_backoff_max`; sends meanwhile wait for it within
//! their own deadlines (see `mesh::ensure_link`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status, Streaming};

use super::auth::{Challenge, Hello};
use super::mesh::{Host, Links, link_up};
use super::peer::{LinkState, LinkStreams, LinkTokens, Peer};
use super::writer::DialerStream;
use crate::error::RpcError;
use crate::proto::Batch;
use crate::proto::mesh_client::MeshClient;
use crate::stats::Stats;

enum DialError {
    /// The peer keeps its own dial; wait for its link.
    Simultaneous,
    Failed(RpcError),
}

struct Dialed {
    inbound: Streaming<Batch>,
    tokens: LinkTokens,
    gate: oneshot::Sender<()>,
    incarnation: u64,
    channel: Channel,
}

/// Makes sure a link to `peer` is up or being dialed.
pub(crate) fn ensure_link<H: Host>(
    host: &Arc<H>,
    peer: &Arc<Peer<H::Streams>>,
) -> Result<(), RpcError> {
    if peer.is_up() {
        return Ok(());
    }
    let links = host.links();
    let mut st = peer.state();
    // Within the redial backoff, the dial is scheduled for its end rather than refused:
    // what is sent meanwhile waits for it (within its own deadline) instead of failing
    // with the previous dial's error, which may be stale by then (the peer came back).
    let (backoff, until) = match &*st {
        LinkState::Up { .. } | LinkState::Dialing { .. } => return Ok(()),
        LinkState::Closed => {
            return Err(RpcError::NoRoute {
                to: peer.addr,
                reason: "left membership".into(),
            });
        }
        LinkState::Idle {
            retry_at, backoff, ..
        } => (*backoff, retry_at.filter(|at| Instant::now() < *at)),
    };
    let link_gen = links.next_gen();
    peer.set_state(&mut st, LinkState::Dialing { link_gen, until });
    drop(st);
    let host = host.clone();
    let peer = peer.clone();
    // A root span: a dial started by a relay must not appear inside that link's span.
    let span =
        tracing::info_span!(parent: None, "dial", node = %links.addr, peer = %peer.addr, link_gen);
    let tracker = links.tracker.clone();
    crate::task::spawn(&tracker, span, async move {
        if let Some(until) = until
            && !wait_to_redial(host.links(), &peer, link_gen, until).await
        {
            return;
        }
        dial(host, peer, link_gen, backoff).await
    });
    Ok(())
}

/// Waits for the end of the redial backoff, or for membership to say the peer changed.
/// Returns whether the dial `link_gen` is still wanted (no link came up meanwhile).
async fn wait_to_redial<S: LinkStreams>(
    links: &Links<S>,
    peer: &Peer<S>,
    link_gen: u64,
    until: Instant,
) -> bool {
    let now = peer.redial_now.notified();
    tokio::pin!(now);
    now.as_mut().enable();
    if !peer.redial_hint.swap(false, Ordering::AcqRel) {
        tokio::select! {
            () = tokio::time::sleep_until(until) => {}
            () = now => {}
            _ = links.root.cancelled() => return false,
        }
    }
    let mut st = peer.state();
    match &mut *st {
        LinkState::Dialing { link_gen: g, until } if *g == link_gen => {
            // Dialing for real now: a link the peer dials meets the usual rule.
            *until = None;
            true
        }
        _ => false,
    }
}

async fn try_dial<S: LinkStreams>(
    links: &Links<S>,
    net_addr: Option<String>,
    peer: &Arc<Peer<S>>,
) -> Result<Dialed, DialError> {
    let lost = |cause: String| {
        DialError::Failed(RpcError::PeerLost {
            peer: peer.addr,
            cause,
        })
    };
    let refused = |reason: String| {
        DialError::Failed(RpcError::Refused {
            peer: peer.addr,
            reason,
        })
    };
    let Some(net_addr) = net_addr else {
        return Err(DialError::Failed(RpcError::NoRoute {
            to: peer.addr,
            reason: "not in membership".into(),
        }));
    };
    let deadline = Instant::now() + links.config.dial_timeout;
    let endpoint = Endpoint::from_shared(format!("http://{net_addr}"))
        .map_err(|e| lost(format!("bad network address {net_addr:?}: {e}")))?
        .connect_timeout(links.config.dial_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(links.config.keepalive_interval)
        .keep_alive_timeout(links.config.keepalive_timeout)
        .keep_alive_while_idle(true);
    #[cfg(feature = "tls")]
    let connect = async {
        match &links.config.tls {
            Some(tls) => {
                endpoint
                    .connect_with_connector(crate::link::tls::Connector {
                        tls: tls.clone(),
                        net_addr: net_addr.clone(),
                        to: peer.addr,
                    })
                    .await
            }
            None => endpoint.connect().await,
        }
    };
    #[cfg(not(feature = "tls"))]
    let connect = endpoint.connect();
    let channel = match tokio::time::timeout_at(deadline, connect).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(lost(format!("dial {net_addr}: {}", source_text(&e)))),
        Err(_) => return Err(lost(format!("dial {net_addr}: timed out"))),
    };
    let max = links.config.max_batch_message();
    let mut client = MeshClient::new(channel.clone())
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let tokens = links.tokens();
    let (gate_tx, gate_rx) = oneshot::channel();
    let (proof_tx, proof_rx) = oneshot::channel();
    let hello = Hello::new(links.addr, peer.addr, links.incarnation);
    let writer = links.writer(peer, &tokens, Some(gate_rx));
    let mut req = Request::new(DialerStream::new(proof_rx, writer));
    hello.write(req.metadata_mut());
    let status_error = |status: Status| match status.code() {
        Code::Aborted => DialError::Simultaneous,
        Code::Unauthenticated
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::Unavailable => refused(status.message().to_owned()),
        _ => lost(format!("link call failed: {}", status.message())),
    };
    let resp = match tokio::time::timeout_at(deadline, client.link(req)).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(status)) => return Err(status_error(status)),
        Err(_) => {
            return Err(lost(format!(
                "{net_addr} did not answer the link hello in time"
            )));
        }
    };
    // Nothing is sent before the node at `net_addr` has proved it is the peer.
    let challenge = Challenge::read(resp.metadata(), &links.secret, &hello)
        .map_err(|e| refused(format!("the node at {net_addr}: {e}")))?;
    tokens
        .counts
        .peer_acks
        .store(super::auth::acks(resp.metadata()), Relaxed);
    let _ = proof_tx.send(Batch {
        proof: hello.prove(&links.secret, &challenge),
        ..Batch::default()
    });
    let mut inbound = resp.into_inner();
    match tokio::time::timeout_at(deadline, inbound.message()).await {
        Ok(Ok(Some(first))) if first.envelopes.is_empty() => {}
        Ok(Ok(Some(_))) => {
            return Err(lost(format!(
                "{net_addr} broke the handshake: its first batch carried envelopes"
            )));
        }
        Ok(Ok(None)) => {
            return Err(lost(format!(
                "{net_addr} ended the link before admitting it"
            )));
        }
        Ok(Err(status)) => return Err(status_error(status)),
        Err(_) => return Err(lost(format!("{net_addr} did not admit the link in time"))),
    }
    Ok(Dialed {
        inbound,
        tokens,
        gate: gate_tx,
        incarnation: challenge.incarnation,
        channel,
    })
}

pub(crate) async fn dial<H: Host>(
    host: Arc<H>,
    peer: Arc<Peer<H::Streams>>,
    link_gen: u64,
    backoff: Duration,
) {
    let links = host.links();
    Stats::incr(&links.stats.dials_started);
    let attempt = tokio::select! {
        r = try_dial(links, host.net_addr(peer.addr), &peer) => r,
        // Shutdown fails whatever waits on this peer; nothing more to do here.
        _ = links.root.cancelled() => return,
    };
    let error = match attempt {
        Ok(d) => return dialed_up(host.clone(), peer, link_gen, d),
        Err(DialError::Simultaneous) => {
            // The peer keeps the link it dialed; it will reach us shortly.
            let until = Instant::now() + links.config.dial_timeout;
            loop {
                let changed = peer.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if !matches!(&*peer.state(), LinkState::Dialing { link_gen: g, .. } if *g == link_gen)
                {
                    return;
                }
                tokio::select! {
                    r = tokio::time::timeout_at(until, changed) => if r.is_err() { break },
                    _ = links.root.cancelled() => return,
                }
            }
            RpcError::PeerLost {
                peer: peer.addr,
                cause: "both nodes dialed and the peer's link never arrived".into(),
            }
        }
        Err(DialError::Failed(e)) => e,
    };
    let mut st = peer.state();
    if !matches!(&*st, LinkState::Dialing { link_gen: g, .. } if *g == link_gen) {
        return;
    }
    Stats::incr(&links.stats.dials_failed);
    Stats::incr(match &error {
        RpcError::Refused { .. } => &links.stats.dial_failures_refused,
        RpcError::PeerLost { cause, .. } if cause.starts_with("both nodes dialed") => {
            &links.stats.dial_failures_simultaneous
        }
        RpcError::PeerLost { cause, .. }
            if cause.contains("timed out") || cause.contains("in time") =>
        {
            &links.stats.dial_failures_timeout
        }
        _ => &links.stats.dial_failures_unreachable,
    });
    let backoff = if backoff.is_zero() {
        links.config.redial_backoff
    } else {
        (backoff * 2).min(links.config.redial_backoff_max)
    };
    tracing::warn!(peer = %peer.addr, error = %error, ?backoff, "dial failed");
    peer.set_state(
        &mut st,
        LinkState::Idle {
            retry_at: Some(Instant::now() + backoff),
            backoff,
        },
    );
    // Under the state lock: a send that starts a new dial cannot queue in between.
    let relayed = peer.fail_all(&error, &links.stats);
    drop(st);
    host.link_lost(peer.addr, relayed, &error);
}

fn dialed_up<H: Host>(host: Arc<H>, peer: Arc<Peer<H::Streams>>, link_gen: u64, d: Dialed) {
    let mut st = peer.state();
    if !matches!(&*st, LinkState::Dialing { link_gen: g, .. } if *g == link_gen) {
        // An accepted link won meanwhile; this one never carried anything.
        d.tokens.kill.cancel();
        return;
    }
    peer.set_state(
        &mut st,
        LinkState::Up {
            link_gen,
            tokens: d.tokens.clone(),
            dialed: true,
            incarnation: d.incarnation,
            since: Instant::now(),
        },
    );
    drop(st);
    // The receiver lives in the writer, which tonic holds until the call ends.
    let _ = d.gate.send(());
    link_up(host, peer, link_gen, d.inbound, d.tokens, Some(d.channel));
}

fn source_text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        // Some layers already end their text with their cause: say it once.
        let part = s.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        src = s.source();
    }
    text
}
