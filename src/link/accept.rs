//! Accepting a link: answer the hello with a challenge, check the dialer's proof (and, under
//! mutual TLS, that its certificate names the address it claims), then admit it by the rule
//! that leaves one link per pair.
//!
//! Simultaneous dial: when both nodes dial each other, the node with the smaller address keeps
//! the link it dialed. The larger node admits the smaller one's dial, and the smaller refuses
//! the larger one's with `ABORTED`. A refused dialer leaves its queue untouched (its writer is
//! gated until admission) and waits for the winning link, whose writer then drains the same
//! queue: nothing is lost or reordered.
//!
//! Every node start has a random incarnation number, sent in the hello. A dial from a peer
//! whose incarnation differs from the one on the current link means the peer restarted: the
//! stale link is replaced at once rather than waiting for keepalive to notice.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::auth::{Challenge, Hello};
use super::incoming::ConnInfo;
use super::mesh::{Host, Links, link_up};
use super::peer::{LinkState, LinkTokens, Peer};
use super::writer::{AcceptorStream, Writer};
use crate::error::RpcError;
use crate::proto::Batch;
use crate::stats::Stats;

/// A peer admitted and the generation of its new link.
type Admitted<S> = (Arc<Peer<S>>, u64);

/// What an accepted link call answers with.
pub(crate) type LinkStream = Pin<Box<dyn Stream<Item = Result<Batch, Status>> + Send + 'static>>;

/// Answers a link hello with a challenge; admission follows the dialer's proof (see
/// `admit`). Refusals here go to a dialer that has proved nothing yet, so they
/// name nothing it did not send.
pub(crate) fn accept<H: Host>(
    host: &Arc<H>,
    req: Request<Streaming<Batch>>,
) -> Result<Response<LinkStream>, Status> {
    let links = host.links();
    if !host.accepting() {
        return Err(refused(
            links,
            Status::unavailable("the node is not running (starting or shutting down)"),
        ));
    }
    let hello = Hello::read(req.metadata())
        .map_err(|e| refused(links, Status::unauthenticated(e.to_string())))?;
    if hello.to != links.addr {
        return Err(refused(
            links,
            Status::failed_precondition(format!(
                "link meant for {} reached another node",
                hello.to
            )),
        ));
    }
    // Membership is checked after the proof (`admit_proven`): refusing non-members here
    // would tell anyone who asks which addresses are members.
    let conn = req.extensions().get::<ConnInfo>().cloned();
    #[cfg(feature = "tls")]
    if links.config.mutual_tls() {
        // The handshake verified the chain; the certificate must also name the address.
        let cert = conn.as_ref().and_then(|c| c.peer_cert.get());
        let checked = match cert {
            Some(cert) => crate::link::tls::LinkTls::check_name(cert, hello.from),
            None => Err("no client certificate".to_owned()),
        };
        if let Err(e) = checked {
            return Err(refused(
                links,
                Status::permission_denied(format!("mutual TLS: {e}")),
            ));
        }
    }
    let challenge = Challenge::new(links.incarnation);
    let tokens = links.tokens();
    tokens
        .counts
        .peer_acks
        .store(super::auth::acks(req.metadata()), Relaxed);
    let (tx, rx) = oneshot::channel();
    let stream: LinkStream = Box::pin(AcceptorStream::Waiting {
        admission: rx,
        fault: tokens.fault.clone(),
    });
    let mut resp = Response::new(stream);
    challenge.write(resp.metadata_mut(), &links.secret, &hello);
    let span = tracing::debug_span!(parent: None, "admit", node = %links.addr, peer = %hello.from);
    let admit = admit(
        host.clone(),
        hello,
        challenge,
        req.into_inner(),
        tokens,
        tx,
        conn,
    );
    crate::task::spawn(&links.tracker, span, admit);
    Ok(resp)
}

fn refused<S>(links: &Links<S>, status: Status) -> Status {
    // Anyone can cause these before proving anything: the lines are gated.
    static REFUSED: crate::gate::LogGate = crate::gate::LogGate::new();
    Stats::incr(&links.stats.links_refused);
    if let Some(held) = REFUSED.pass() {
        tracing::info!(node = %links.addr, reason = status.message(), held_back = held, "link refused");
    }
    status
}

/// Waits (up to the dial timeout) for the dialer's proof, then admits the link or refuses
/// it with a status.
async fn admit<H: Host>(
    host: Arc<H>,
    hello: Hello,
    challenge: Challenge,
    mut inbound: Streaming<Batch>,
    tokens: LinkTokens,
    mut tx: oneshot::Sender<Result<Writer<H::Streams>, Status>>,
    conn: Option<ConnInfo>,
) {
    let links = host.links();
    let wait = links.config.dial_timeout;
    let first = tokio::select! {
        r = tokio::time::timeout(wait, inbound.message()) => r,
        _ = links.root.cancelled() => return,
        // The call ended before the proof: nothing to admit, nobody to tell.
        () = tx.closed() => return,
    };
    let proof = match first {
        Ok(Ok(Some(b))) if b.envelopes.is_empty() && b.over_limit == 0 => b.proof,
        Ok(Ok(Some(_))) => {
            let status = Status::invalid_argument(
                "the dialer's first batch must carry its proof and no envelopes",
            );
            return drop(tx.send(Err(refused(links, status))));
        }
        // Over the pre-proof byte limit (or undecodable): the dialer hears why.
        Ok(Err(status)) => return drop(tx.send(Err(refused(links, status)))),
        Ok(Ok(None)) => return,
        Err(_) => {
            let status = Status::deadline_exceeded(format!("no link proof within {wait:?}"));
            return drop(tx.send(Err(refused(links, status))));
        }
    };
    if let Err(e) = hello.check(&links.secret, &challenge, &proof) {
        return drop(tx.send(Err(refused(links, Status::unauthenticated(e.to_string())))));
    }
    match admit_proven(&*host, &hello, tokens.clone()) {
        Ok((peer, link_gen)) => {
            if let Some(conn) = conn {
                conn.admitted();
            }
            let writer = links.writer(&peer, &tokens, None);
            // If the call ended meanwhile, the reader sees it end and takes the link down.
            let _ = tx.send(Ok(writer));
            link_up(host.clone(), peer, link_gen, inbound, tokens, None);
        }
        Err(status) => drop(tx.send(Err(refused(links, status)))),
    }
}

/// Admits a dialer that proved itself: the rule that leaves one link per pair, and the
/// replacement of a link the peer lost or left behind when it restarted.
fn admit_proven<H: Host>(
    host: &H,
    hello: &Hello,
    tokens: LinkTokens,
) -> Result<Admitted<H::Streams>, Status> {
    let links = host.links();
    if !host.accepting() {
        return Err(Status::unavailable(format!(
            "{} is shutting down",
            links.addr
        )));
    }
    if hello.from == links.addr || host.net_addr(hello.from).is_none() {
        return Err(Status::permission_denied(format!(
            "{} is not a member this node admits (not in {}'s membership)",
            hello.from, links.addr
        )));
    }
    let peer = links
        .peers
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .entry(hello.from)
        .or_insert_with(|| host.new_peer(hello.from))
        .clone();
    let mut replaced = None;
    let mut st = peer.state();
    let smaller = links.addr < hello.from;
    let keeps_own = || {
        Status::aborted(format!(
            "simultaneous dial: {} keeps the link it dialed",
            links.addr
        ))
    };
    match &*st {
        // A dial still waiting for its backoff is not in flight: the peer's link is taken.
        LinkState::Dialing { until: None, .. } if smaller => return Err(keeps_own()),
        // Both dialed and ours was admitted first. A dial that raced ours started before
        // our link came up, so it arrives within a dial timeout of it; a later dial means
        // the peer lost its side of our link, and is served below.
        LinkState::Up {
            dialed: true,
            incarnation,
            since,
            ..
        } if smaller
            && *incarnation == hello.incarnation
            && since.elapsed() < links.config.dial_timeout =>
        {
            return Err(keeps_own());
        }
        LinkState::Up {
            tokens: old,
            incarnation,
            ..
        } => {
            // The peer proved itself on a fresh connection although a link is up: it
            // restarted, or its side of the link is gone. What waits on the old link will
            // not be answered on it.
            let cause = if *incarnation == hello.incarnation {
                "the peer replaced the link"
            } else {
                "the peer restarted"
            };
            old.kill.cancel();
            let error = RpcError::PeerLost {
                peer: peer.addr,
                cause: cause.into(),
            };
            // Answered once the state lock is released, below.
            replaced = Some((peer.fail_all(&error, &links.stats), error));
            Stats::incr(&links.stats.links_closed);
        }
        LinkState::Closed => {
            return Err(Status::permission_denied(format!(
                "{} refused {}: it left membership",
                links.addr, hello.from
            )));
        }
        LinkState::Idle { .. } | LinkState::Dialing { .. } => {}
    }
    let link_gen = links.next_gen();
    peer.set_state(
        &mut st,
        LinkState::Up {
            link_gen,
            tokens,
            dialed: false,
            incarnation: hello.incarnation,
            since: Instant::now(),
        },
    );
    drop(st);
    if let Some((relayed, error)) = replaced {
        host.link_lost(peer.addr, relayed, &error);
    }
    Ok((peer, link_gen))
}
