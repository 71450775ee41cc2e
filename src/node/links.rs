//! Dialing, accepting and losing links, and the rule that leaves one link per pair.
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
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status, Streaming};

use super::inner::{Inner, Phase};
use crate::error::RpcError;
use crate::link::auth::{self, Hello};
use crate::link::writer::Writer;
use crate::link::{LinkState, LinkTokens, Peer, reader};
use crate::proto::Batch;
use crate::proto::mesh_client::MeshClient;
use crate::stats::Stats;

pub(crate) type LinkStream = Pin<Box<dyn Stream<Item = Result<Batch, Status>> + Send + 'static>>;

const INCARNATION: &str = "cg-incarnation";

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

impl Inner {
    fn tokens(&self) -> LinkTokens {
        LinkTokens {
            kill: self.root.child_token(),
            close: tokio_util::sync::CancellationToken::new(),
        }
    }

    fn writer(
        &self,
        peer: &Arc<Peer>,
        tokens: &LinkTokens,
        gate: Option<oneshot::Receiver<()>>,
    ) -> Writer {
        Writer::new(
            peer.clone(),
            self.stats.clone(),
            tokens,
            gate,
            self.config.batch_bytes,
            self.config.batch_envelopes,
        )
    }

    async fn try_dial(&self, peer: &Arc<Peer>) -> Result<Dialed, DialError> {
        let lost = |cause: String| {
            DialError::Failed(RpcError::PeerLost {
                peer: peer.addr,
                cause,
            })
        };
        let Some(net_addr) = self.view().get(peer.addr).map(|m| m.net_addr.clone()) else {
            return Err(DialError::Failed(RpcError::NoRoute {
                to: peer.addr,
                reason: "not in membership".into(),
            }));
        };
        let deadline = Instant::now() + self.config.dial_timeout;
        let endpoint = Endpoint::from_shared(format!("http://{net_addr}"))
            .map_err(|e| lost(format!("bad network address {net_addr:?}: {e}")))?
            .connect_timeout(self.config.dial_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(self.config.keepalive_interval)
            .keep_alive_timeout(self.config.keepalive_timeout)
            .keep_alive_while_idle(true);
        let channel = match tokio::time::timeout_at(deadline, endpoint.connect()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(lost(format!("dial {net_addr}: {}", source_text(&e)))),
            Err(_) => return Err(lost(format!("dial {net_addr}: timed out"))),
        };
        let max = self.config.max_batch_message();
        let mut client = MeshClient::new(channel.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let tokens = self.tokens();
        let (gate_tx, gate_rx) = oneshot::channel();
        let mut req = Request::new(self.writer(peer, &tokens, Some(gate_rx)));
        auth::sign(
            req.metadata_mut(),
            &self.secret,
            self.addr,
            peer.addr,
            self.incarnation,
        );
        let resp = match tokio::time::timeout_at(deadline, client.link(req)).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(status)) if status.code() == Code::Aborted => {
                return Err(DialError::Simultaneous);
            }
            Ok(Err(status)) => {
                return Err(match status.code() {
                    Code::Unauthenticated
                    | Code::PermissionDenied
                    | Code::FailedPrecondition
                    | Code::Unavailable => DialError::Failed(RpcError::Refused {
                        peer: peer.addr,
                        reason: status.message().to_owned(),
                    }),
                    _ => lost(format!("link call failed: {}", status.message())),
                });
            }
            Err(_) => return Err(lost(format!("{net_addr} did not admit the link in time"))),
        };
        let incarnation = resp
            .metadata()
            .get(INCARNATION)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        Ok(Dialed {
            inbound: resp.into_inner(),
            tokens,
            gate: gate_tx,
            incarnation,
            channel,
        })
    }

    pub(crate) async fn dial(self: Arc<Self>, peer: Arc<Peer>, link_gen: u64, backoff: Duration) {
        let attempt = tokio::select! {
            r = self.try_dial(&peer) => r,
            // Shutdown fails whatever waits on this peer; nothing more to do here.
            _ = self.root.cancelled() => return,
        };
        let error = match attempt {
            Ok(d) => return self.dialed_up(peer, link_gen, d),
            Err(DialError::Simultaneous) => {
                // The peer keeps the link it dialed; it will reach us shortly.
                let until = Instant::now() + self.config.dial_timeout;
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
                        _ = self.root.cancelled() => return,
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
        Stats::incr(&self.stats.dials_failed);
        let backoff = if backoff.is_zero() {
            self.config.redial_backoff
        } else {
            (backoff * 2).min(self.config.redial_backoff_max)
        };
        tracing::warn!(peer = %peer.addr, error = %error, ?backoff, "dial failed");
        peer.set_state(
            &mut st,
            LinkState::Idle {
                retry_at: Some(Instant::now() + backoff),
                backoff,
                last_error: Some(error.clone()),
            },
        );
        // Under the state lock: a send that starts a new dial cannot queue in between.
        let relayed = peer.fail_all(&error, &self.stats);
        drop(st);
        self.bounce(peer.addr, relayed, &error);
    }

    fn dialed_up(self: Arc<Self>, peer: Arc<Peer>, link_gen: u64, d: Dialed) {
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
        self.link_up(peer, link_gen, d.inbound, d.tokens, Some(d.channel));
    }

    fn link_up(
        self: Arc<Self>,
        peer: Arc<Peer>,
        link_gen: u64,
        inbound: Streaming<Batch>,
        tokens: LinkTokens,
        channel: Option<Channel>,
    ) {
        Stats::incr(&self.stats.links_opened);
        if self.addr.is_harbor() && peer.addr.is_harbor() {
            // Operators watch the links between harbors.
            tracing::info!(node = %self.addr, peer = %peer.addr, link_gen, "harbor link up");
        } else {
            tracing::debug!(peer = %peer.addr, link_gen, "link up");
        }
        self.links_changed.notify_waiters();
        let this = self.clone();
        let span = tracing::info_span!(parent: None, "link", node = %self.addr, peer = %peer.addr, link_gen);
        self.tracker.spawn(tracing::Instrument::instrument(
            async move {
                // Keeps the dialed connection open for the life of the link.
                let _channel = channel;
                let why = reader::run(inbound, peer.clone(), tokens, this.clone()).await;
                this.link_down(&peer, link_gen, &why);
            },
            span,
        ));
    }

    /// Ends link `link_gen` of `peer` (if it is still the current one) and fails what waits on it.
    pub(crate) fn link_down(&self, peer: &Arc<Peer>, link_gen: u64, why: &str) {
        let mut st = peer.state();
        let LinkState::Up {
            link_gen: g,
            tokens,
            ..
        } = &*st
        else {
            return;
        };
        if *g != link_gen {
            return;
        }
        tokens.kill.cancel();
        peer.set_state(&mut st, LinkState::idle());
        let error = if matches!(self.phase(), Phase::Draining | Phase::Closed) {
            RpcError::Shutdown { node: self.addr }
        } else {
            RpcError::PeerLost {
                peer: peer.addr,
                cause: why.to_owned(),
            }
        };
        // Under the state lock: a new link or dial cannot start before the old link's
        // leftovers are failed, so nothing meant for the new link is swept away.
        let relayed = peer.fail_all(&error, &self.stats);
        drop(st);
        self.bounce(peer.addr, relayed, &error);
        Stats::incr(&self.stats.links_closed);
        self.links_changed.notify_waiters();
        tracing::info!(peer = %peer.addr, reason = why, "link down");
    }

    /// Forgets a peer that left membership or moved: closes its link and fails what waits.
    pub(crate) fn drop_peer(&self, addr: crate::LogicAddr, why: &str) {
        let Some(peer) = self
            .peers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&addr)
        else {
            return;
        };
        let mut st = peer.state();
        if let LinkState::Up { tokens, .. } = &*st {
            tokens.kill.cancel();
            Stats::incr(&self.stats.links_closed);
        }
        peer.set_state(&mut st, LinkState::Closed);
        let error = RpcError::PeerLost {
            peer: addr,
            cause: why.to_owned(),
        };
        let relayed = peer.fail_all(&error, &self.stats);
        drop(st);
        self.bounce(peer.addr, relayed, &error);
        self.links_changed.notify_waiters();
        tracing::info!(peer = %addr, reason = why, "peer dropped");
    }

    /// Admits or refuses an inbound link.
    pub(crate) fn accept(
        self: &Arc<Self>,
        req: Request<Streaming<Batch>>,
    ) -> Result<Response<LinkStream>, Status> {
        let refuse = |status: Status| {
            Stats::incr(&self.stats.links_refused);
            tracing::info!(node = %self.addr, reason = status.message(), "link refused");
            Err(status)
        };
        if self.phase() != Phase::Running {
            return refuse(Status::unavailable(format!(
                "{} is not running (starting or shutting down)",
                self.addr
            )));
        }
        let hello: Hello =
            match auth::verify(req.metadata(), &self.secret, self.config.hello_max_skew) {
                Ok(h) => h,
                Err(auth::HelloError::BadSecret { from }) => {
                    return refuse(Status::unauthenticated(format!(
                        "{} refused {from}: cluster secret mismatch (HMAC check failed)",
                        self.addr
                    )));
                }
                Err(e) => {
                    return refuse(Status::unauthenticated(format!(
                        "{} refused the link: {e}",
                        self.addr
                    )));
                }
            };
        if hello.to != self.addr {
            return refuse(Status::failed_precondition(format!(
                "link meant for {} reached {}",
                hello.to, self.addr
            )));
        }
        if hello.from == self.addr || self.view().get(hello.from).is_none() {
            return refuse(Status::permission_denied(format!(
                "{} refused {}: not in {}'s membership",
                self.addr, hello.from, self.addr
            )));
        }
        let peer = self
            .peers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(hello.from)
            .or_insert_with(|| self.new_peer(hello.from))
            .clone();
        let mut replaced = None;
        let mut st = peer.state();
        let smaller = self.addr < hello.from;
        match &*st {
            LinkState::Dialing { .. } if smaller => {
                drop(st);
                return refuse(Status::aborted(format!(
                    "simultaneous dial: {} keeps the link it dialed",
                    self.addr
                )));
            }
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
                && since.elapsed() < self.config.dial_timeout =>
            {
                drop(st);
                return refuse(Status::aborted(format!(
                    "simultaneous dial: {} keeps the link it dialed",
                    self.addr
                )));
            }
            LinkState::Up {
                tokens,
                incarnation,
                ..
            } => {
                // The peer dials although a link is up: it restarted, or its side of the
                // link is gone. What waits on the old link will not be answered on it.
                let cause = if *incarnation == hello.incarnation {
                    "the peer replaced the link"
                } else {
                    "the peer restarted"
                };
                tokens.kill.cancel();
                let error = RpcError::PeerLost {
                    peer: peer.addr,
                    cause: cause.into(),
                };
                // Answered once the state lock is released, below.
                replaced = Some((peer.fail_all(&error, &self.stats), error));
                Stats::incr(&self.stats.links_closed);
            }
            LinkState::Closed => {
                drop(st);
                return refuse(Status::permission_denied(format!(
                    "{} refused {}: it left membership",
                    self.addr, hello.from
                )));
            }
            LinkState::Idle { .. } | LinkState::Dialing { .. } => {}
        }
        let link_gen = self.next_gen.fetch_add(1, Ordering::Relaxed);
        let tokens = self.tokens();
        peer.set_state(
            &mut st,
            LinkState::Up {
                link_gen,
                tokens: tokens.clone(),
                dialed: false,
                incarnation: hello.incarnation,
                since: Instant::now(),
            },
        );
        drop(st);
        if let Some((relayed, error)) = replaced {
            self.bounce(peer.addr, relayed, &error);
        }
        let writer = self.writer(&peer, &tokens, None);
        self.clone()
            .link_up(peer, link_gen, req.into_inner(), tokens, None);
        let stream: LinkStream = Box::pin(writer.map(Ok));
        let mut resp = Response::new(stream);
        resp.metadata_mut().insert(
            INCARNATION,
            self.incarnation
                .to_string()
                .parse()
                .expect("digits are valid metadata"),
        );
        Ok(resp)
    }
}

fn source_text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        text.push_str(": ");
        text.push_str(&s.to_string());
        src = s.source();
    }
    text
}
