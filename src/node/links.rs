//! Dialing, accepting and losing links, and the rule that leaves one link per pair.
//!
//! Simultaneous dial: when both nodes dial each other, the node with the smaller address keeps
//! the link it dialed. The larger node admits the smaller one's dial, and the smaller refuses
//! the larger one's with `ABORTED`. A refused dialer leaves its queue untouched (its writer is
//! gated until admission) and waits for the winning link, whose writer then drains the same
//! queue: nothing is lost or reordered.
//!
//! A link is admitted only after the handshake of `link::auth`: each side proves the cluster
//! secret over both sides' fresh nonces, so no recorded handshake admits anyone again.
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
use tokio_stream::Stream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status, Streaming};

use super::inner::{Inner, Phase};
use crate::error::RpcError;
use crate::link::auth::{Challenge, Hello};
use crate::link::incoming::ConnInfo;
use crate::link::writer::Writer;
use crate::link::{AcceptorStream, DialerStream, LinkState, LinkTokens, reader};
use crate::proto::Batch;
use crate::proto::mesh_client::MeshClient;
use crate::stats::Stats;
use crate::stream::{Peer, Table};

pub(crate) type LinkStream = Pin<Box<dyn Stream<Item = Result<Batch, Status>> + Send + 'static>>;

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
            fault: Default::default(),
        }
    }

    fn writer(
        &self,
        peer: &Arc<Peer>,
        tokens: &LinkTokens,
        gate: Option<oneshot::Receiver<()>>,
    ) -> Writer<Table> {
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
        let refused = |reason: String| {
            DialError::Failed(RpcError::Refused {
                peer: peer.addr,
                reason,
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
        #[cfg(feature = "tls")]
        let connect = async {
            match &self.config.tls {
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
        let max = self.config.max_batch_message();
        let mut client = MeshClient::new(channel.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let tokens = self.tokens();
        let (gate_tx, gate_rx) = oneshot::channel();
        let (proof_tx, proof_rx) = oneshot::channel();
        let hello = Hello::new(self.addr, peer.addr, self.incarnation);
        let writer = self.writer(peer, &tokens, Some(gate_rx));
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
        let challenge = Challenge::read(resp.metadata(), &self.secret, &hello)
            .map_err(|e| refused(format!("the node at {net_addr}: {e}")))?;
        let _ = proof_tx.send(Batch {
            proof: hello.prove(&self.secret, &challenge),
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

    /// A peer left membership. A peer that leaves to shut down drains first (its handlers
    /// finish, a harbor lets the answers it relays pass), so a link still up is kept until the
    /// peer closes it or this node's `shutdown_grace` ends, then the peer is dropped. While
    /// kept, the link carries only what is under way: answers (both ways) and streams already
    /// open; nothing new is sent to the peer or taken from it. Listed again meanwhile, the
    /// peer is dropped at once (the old link may lead to the old process). A peer with no
    /// link up is dropped at once.
    pub(crate) fn peer_left(self: &Arc<Self>, addr: crate::LogicAddr) {
        let Some(peer) = self.peer_slot(addr).filter(|p| p.is_up()) else {
            return self.drop_peer(addr, "removed from membership");
        };
        peer.set_leaving();
        let this = self.clone();
        let linger = self.config.shutdown_grace;
        self.tracker.spawn(async move {
            let until = Instant::now() + linger;
            loop {
                let changed = peer.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if !peer.is_up() {
                    break;
                }
                tokio::select! {
                    r = tokio::time::timeout_at(until, changed) => if r.is_err() { break },
                    _ = this.root.cancelled() => return,
                }
            }
            // Listed again meanwhile: nothing to drop.
            if this.view().get(addr).is_none() {
                this.drop_peer(addr, "removed from membership");
            }
        });
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

    /// Answers a link hello with a challenge; admission follows the dialer's proof (see
    /// [`Inner::admit`]). Refusals here go to a dialer that has proved nothing yet, so they
    /// name nothing it did not send.
    pub(crate) fn accept(
        self: &Arc<Self>,
        req: Request<Streaming<Batch>>,
    ) -> Result<Response<LinkStream>, Status> {
        if self.phase() != Phase::Running {
            return Err(self.refused(Status::unavailable(
                "the node is not running (starting or shutting down)",
            )));
        }
        let hello = Hello::read(req.metadata())
            .map_err(|e| self.refused(Status::unauthenticated(e.to_string())))?;
        if hello.to != self.addr {
            return Err(self.refused(Status::failed_precondition(format!(
                "link meant for {} reached another node",
                hello.to
            ))));
        }
        // Membership is checked after the proof (`admit_proven`): refusing non-members here
        // would tell anyone who asks which addresses are members.
        let conn = req.extensions().get::<ConnInfo>().cloned();
        #[cfg(feature = "tls")]
        if self.config.mutual_tls() {
            // The handshake verified the chain; the certificate must also name the address.
            let cert = conn.as_ref().and_then(|c| c.peer_cert.get());
            let checked = match cert {
                Some(cert) => crate::LinkTls::check_name(cert, hello.from),
                None => Err("no client certificate".to_owned()),
            };
            if let Err(e) = checked {
                return Err(self.refused(Status::permission_denied(format!("mutual TLS: {e}"))));
            }
        }
        let challenge = Challenge::new(self.incarnation);
        let tokens = self.tokens();
        let (tx, rx) = oneshot::channel();
        let stream: LinkStream = Box::pin(AcceptorStream::Waiting {
            admission: rx,
            fault: tokens.fault.clone(),
        });
        let mut resp = Response::new(stream);
        challenge.write(resp.metadata_mut(), &self.secret, &hello);
        let span =
            tracing::debug_span!(parent: None, "admit", node = %self.addr, peer = %hello.from);
        self.tracker.spawn(tracing::Instrument::instrument(
            self.clone()
                .admit(hello, challenge, req.into_inner(), tokens, tx, conn),
            span,
        ));
        Ok(resp)
    }

    fn refused(&self, status: Status) -> Status {
        // Anyone can cause these before proving anything: the lines are gated.
        static REFUSED: crate::LogGate = crate::LogGate::new();
        Stats::incr(&self.stats.links_refused);
        if let Some(held) = REFUSED.pass() {
            tracing::info!(node = %self.addr, reason = status.message(), held_back = held, "link refused");
        }
        status
    }

    /// Waits (up to the dial timeout) for the dialer's proof, then admits the link or refuses
    /// it with a status.
    async fn admit(
        self: Arc<Self>,
        hello: Hello,
        challenge: Challenge,
        mut inbound: Streaming<Batch>,
        tokens: LinkTokens,
        mut tx: oneshot::Sender<Result<Writer<Table>, Status>>,
        conn: Option<ConnInfo>,
    ) {
        let wait = self.config.dial_timeout;
        let first = tokio::select! {
            r = tokio::time::timeout(wait, inbound.message()) => r,
            _ = self.root.cancelled() => return,
            // The call ended before the proof: nothing to admit, nobody to tell.
            () = tx.closed() => return,
        };
        let proof = match first {
            Ok(Ok(Some(b))) if b.envelopes.is_empty() && b.over_limit == 0 => b.proof,
            Ok(Ok(Some(_))) => {
                let status = Status::invalid_argument(
                    "the dialer's first batch must carry its proof and no envelopes",
                );
                return drop(tx.send(Err(self.refused(status))));
            }
            // Over the pre-proof byte limit (or undecodable): the dialer hears why.
            Ok(Err(status)) => return drop(tx.send(Err(self.refused(status)))),
            Ok(Ok(None)) => return,
            Err(_) => {
                let status = Status::deadline_exceeded(format!("no link proof within {wait:?}"));
                return drop(tx.send(Err(self.refused(status))));
            }
        };
        if let Err(e) = hello.check(&self.secret, &challenge, &proof) {
            return drop(tx.send(Err(self.refused(Status::unauthenticated(e.to_string())))));
        }
        match self.clone().admit_proven(&hello, tokens.clone()) {
            Ok((peer, link_gen)) => {
                if let Some(conn) = conn {
                    conn.admitted();
                }
                let writer = self.writer(&peer, &tokens, None);
                // If the call ended meanwhile, the reader sees it end and takes the link down.
                let _ = tx.send(Ok(writer));
                self.link_up(peer, link_gen, inbound, tokens, None);
            }
            Err(status) => drop(tx.send(Err(self.refused(status)))),
        }
    }

    /// Admits a dialer that proved itself: the rule that leaves one link per pair, and the
    /// replacement of a link the peer lost or left behind when it restarted.
    fn admit_proven(
        self: Arc<Self>,
        hello: &Hello,
        tokens: LinkTokens,
    ) -> Result<(Arc<Peer>, u64), Status> {
        if self.phase() != Phase::Running {
            return Err(Status::unavailable(format!(
                "{} is shutting down",
                self.addr
            )));
        }
        if hello.from == self.addr || self.view().get(hello.from).is_none() {
            return Err(Status::permission_denied(format!(
                "{} is not a member this node admits (not in {}'s membership)",
                hello.from, self.addr
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
        let keeps_own = || {
            Status::aborted(format!(
                "simultaneous dial: {} keeps the link it dialed",
                self.addr
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
                && since.elapsed() < self.config.dial_timeout =>
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
                replaced = Some((peer.fail_all(&error, &self.stats), error));
                Stats::incr(&self.stats.links_closed);
            }
            LinkState::Closed => {
                return Err(Status::permission_denied(format!(
                    "{} refused {}: it left membership",
                    self.addr, hello.from
                )));
            }
            LinkState::Idle { .. } | LinkState::Dialing { .. } => {}
        }
        let link_gen = self.next_gen.fetch_add(1, Ordering::Relaxed);
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
            self.bounce(peer.addr, relayed, &error);
        }
        Ok((peer, link_gen))
    }
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
