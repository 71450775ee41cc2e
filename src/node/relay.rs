//! What a harbor does with envelopes for other nodes: forwards them one hop through the
//! routing layer, or, when there is no way on, answers a waiting caller with the reason.

use std::future::{Ready, ready};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tower_service::Service;

use super::inner::Inner;
use crate::addr::LogicAddr;
use crate::error::{ErrorCode, HandlerError, RpcError};
use crate::link::Outbound;
use crate::proto::{self, Envelope, envelope::Body};
use crate::router::RouteLayer;
use crate::router::stack::{BoxError, Forward, Forwarder, Relayed};
use crate::router::{NextHop, RouteError, Routes};
use crate::stats::Stats;
use crate::stream::Peer;
use std::pin::Pin;
use tower_layer::Layer;

/// What an envelope that could not be forwarded was, kept before it is handed on.
struct Unsent {
    from: u32,
    to: u32,
    kind: UnsentKind,
}

enum UnsentKind {
    /// A request whose caller waits for an answer.
    Request(u64),
    /// A stream's open, data or window: the stream is ended.
    Stream { id: u64, to_opener: bool },
    /// A one-way message, an answer, a close: dropped.
    Other,
}

impl Unsent {
    fn of(env: &Envelope) -> Unsent {
        let kind = match &env.body {
            Some(Body::Request(r)) if !r.oneway => UnsentKind::Request(r.id),
            Some(Body::Open(o)) => UnsentKind::Stream {
                id: o.id,
                to_opener: false,
            },
            Some(Body::Accept(a)) => UnsentKind::Stream {
                id: a.id,
                to_opener: true,
            },
            Some(Body::Data(d)) => UnsentKind::Stream {
                id: d.id,
                to_opener: d.to_opener,
            },
            Some(Body::Window(w)) => UnsentKind::Stream {
                id: w.id,
                to_opener: w.to_opener,
            },
            _ => UnsentKind::Other,
        };
        Unsent {
            from: env.from,
            to: env.to,
            kind,
        }
    }
}

/// Routes by the node's view (see [`Inner::next_hop`]).
#[derive(Clone, Copy)]
pub(super) struct ViewRoutes<'a>(pub(super) &'a Inner);

impl Routes for ViewRoutes<'_> {
    fn me(&self) -> LogicAddr {
        self.0.addr
    }

    fn next_hop(&self, to: LogicAddr, key: u64) -> Result<NextHop, RouteError> {
        self.0.next_hop_keyed(to, key)
    }
}

/// The service under the routing layer: queues an envelope for a neighbour, dialing it if
/// need be. Never waits: a full queue is an error, so one slow neighbour cannot stall the
/// harbor's reader (and with it everything else on that link).
#[derive(Clone, Copy)]
pub(super) struct Enqueue<'a> {
    pub(super) node: &'a Arc<Inner>,
    /// The neighbour the envelope came from.
    pub(super) came_by: LogicAddr,
}

impl Service<(NextHop, Envelope)> for Enqueue<'_> {
    type Response = ();
    type Error = RpcError;
    type Future = Ready<Result<(), RpcError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), RpcError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (hop, env): (NextHop, Envelope)) -> Self::Future {
        ready(self.node.enqueue_hop(self.came_by, hop, env))
    }
}

impl Inner {
    /// Queues `env` for the next hop, without waiting: a full queue is an error
    /// ([`RpcError::QueueFull`] naming the hop), so one slow or stuck hop costs only its own
    /// traffic.
    fn enqueue_hop(
        self: &Arc<Self>,
        came_by: LogicAddr,
        hop: NextHop,
        env: Envelope,
    ) -> Result<(), RpcError> {
        let peer = self.link_peer(hop.addr())?;
        self.enqueue_to(&peer, came_by, hop, env)
    }

    /// As [`Inner::enqueue_hop`], to a neighbour already chosen.
    fn enqueue_to(
        self: &Arc<Self>,
        peer: &Arc<Peer>,
        came_by: LogicAddr,
        hop: NextHop,
        env: Envelope,
    ) -> Result<(), RpcError> {
        let peer = peer.clone();
        crate::link::ensure_link(self, &peer)?;
        let track = match &env.body {
            Some(Body::Request(r)) if !r.oneway => Some((
                (env.from, r.id),
                Instant::now() + Duration::from_millis(r.timeout_ms.max(1).into()),
            )),
            // An answer passing through: its call is no longer in flight here.
            Some(Body::Response(r)) => {
                self.relays.answered(env.to, r.id);
                None
            }
            _ => None,
        };
        // A request waiting here for a dial is useless after its caller's deadline.
        let deadline = match (&track, self.oneway_deadline(&peer)) {
            (Some((_, until)), Some(d)) => Some(d.min(*until)),
            (_, d) => d,
        };
        // Noted before the envelope is queued (it is gone after), undone if it is not.
        let noted_open = self
            .relays
            .note_stream(came_by, hop.addr(), &env)
            .unwrap_or_else(|_| {
                tracing::warn!(node = %self.addr, "relayed-stream table full; a stream goes untracked");
                None
            });
        if let Err((e, _)) = peer.try_enqueue(Outbound { deadline, env }) {
            if let Some(key) = noted_open {
                self.relays.forget_stream(key);
            }
            if let RpcError::QueueFull { .. } = e {
                Stats::incr(&peer.relay_queue_full);
            }
            return Err(e);
        }
        Stats::incr(&peer.relayed);
        if let Some((key, until)) = track {
            self.relays.track(key, hop.addr(), until, came_by);
        }
        self.after_enqueue(&peer);
        Ok(())
    }

    /// Queues an answer back toward the neighbour its request came by (see
    /// [`Inner::answer_path`]), counting the hop.
    pub(super) fn enqueue_back(
        self: &Arc<Self>,
        back: &Arc<Peer>,
        came_by: LogicAddr,
        mut env: Envelope,
    ) -> Result<(), RpcError> {
        let hop = NextHop::Harbor(back.addr);
        env.hops = env.hops.saturating_add(1);
        if env.hops > crate::router::MAX_HOPS {
            return Err(RpcError::NoRoute {
                to: hop.addr(),
                reason: "hop limit".into(),
            });
        }
        self.enqueue_to(back, came_by, hop, env)
    }

    /// The link to `via` failed: ends the streams relayed over it at their other end, which
    /// would otherwise wait for a peer that can no longer reach it.
    fn fail_stream_relays(&self, via: LogicAddr, error: &RpcError) {
        for lost in self.relays.streams_lost_via(via) {
            let Ok(next) = self.link_peer(lost.tell) else {
                continue;
            };
            let env = Envelope::originate(
                lost.to,
                lost.from,
                Body::Close(proto::StreamClose {
                    id: lost.id,
                    to_opener: lost.to_opener,
                    code: ErrorCode::PEER_LOST.0,
                    reason: format!("{error} (at {})", self.addr),
                }),
            );
            next.try_send_close(env, &self.stats);
        }
    }

    /// Waits until no relayed call is waiting for its answer here, or `until`.
    pub(crate) async fn drain_relays(&self, until: Instant) {
        if !self.relays.drain(until).await {
            tracing::warn!(node = %self.addr, "grace period over with relayed calls still unanswered");
        }
    }

    /// The neighbour the request `(caller, id)` came by, if it was relayed here and its link
    /// is up: its answer goes back the way the request came, even if routing would pick
    /// another way now (that neighbour is leaving membership and draining, or the harbor set
    /// changed).
    pub(super) fn answer_path(&self, caller: u32, id: u64) -> Option<Arc<Peer>> {
        let came_by = self.relays.came_by(caller, id)?;
        self.links.peer_slot(came_by).filter(|p| p.is_up())
    }

    /// Forwards `env` (not addressed to this harbor) one hop on through the relay stack (see
    /// [`super::stack`]), without waiting. What cannot go on is answered or reset back over
    /// the link it came by (a request with `NO_ROUTE`, or `HOP_BUSY` when the next hop's queue
    /// is full or the stack is at its limit; a stream with a close carrying the reason); a
    /// one-way message is dropped, counted and logged (gated).
    pub(crate) fn forward(self: &Arc<Self>, came_by: &Arc<Peer>, mut env: Envelope) {
        // A traced envelope gets a span of this harbor's, the sender's child, whose context
        // goes on in its place: the next hop's span is this one's child.
        let span = if env.trace.is_empty() {
            tracing::Span::none()
        } else {
            let span = tracing::debug_span!(
                target: crate::trace::TARGET,
                "relay",
                otel.kind = "internal",
                clustergo.from = env.from,
                clustergo.to = env.to,
                clustergo.hops = env.hops,
                clustergo.harbor = %self.addr,
            );
            crate::trace::set_parent(&span, &env.trace);
            // Passed on as it came unless this harbor's own span has a context to pass.
            let own = span.in_scope(crate::trace::current);
            if !own.is_empty() {
                env.trace = own;
            }
            span
        };
        let _in_span = span.enter();
        let what = Unsent::of(&env);
        // Shutting down: answers and streams in progress still pass (that is what the drain
        // waits for); new calls too until the harbor has left membership and been quiet
        // (peers may not have seen it leave), then they are sent back to try another harbor.
        if matches!(what.kind, UnsentKind::Request(_)) && !self.takes_new() {
            let e: crate::router::BoxError = Box::new(RpcError::Shutdown { node: self.addr });
            return self.unsent(came_by, what, &e);
        }
        let (Ok(from), Ok(to)) = (LogicAddr::from_u32(env.from), LogicAddr::from_u32(env.to))
        else {
            Stats::incr(&self.stats.envelopes_misaddressed);
            return;
        };
        let req = crate::router::stack::Relayed {
            payload_len: super::dispatch::payload_len(&env.body),
            env,
            from,
            to,
            came_by: came_by.addr,
        };
        let busy = || -> crate::router::BoxError {
            Box::new(crate::router::stack::Overloaded::at(self.addr))
        };
        // Without layers, no stack to lock: `Forward` finishes at once.
        if self.relay_layers.is_none() {
            let r = self.forward_direct(req);
            return self.forwarded(came_by, what, r);
        }
        // Layers that wait run on tasks of their own, bounded: over the bound, refused before
        // anything is called.
        let limit = self.config.peer_queue;
        if self.relay_in_flight.load(Ordering::Relaxed) >= limit {
            return self.unsent(came_by, what, &busy());
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // User code runs here, on the link's reader: a panic in it must not end the reader.
        let called = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut stack = self.relay.lock().unwrap_or_else(|e| e.into_inner());
            // Built once, on first use.
            let svc = stack.get_or_insert_with(|| {
                crate::router::stack::build(forward_of(self), self.relay_layers.as_ref())
            });
            match svc.poll_ready(&mut cx) {
                Poll::Ready(Ok(())) => Ok(svc.call(req)),
                Poll::Ready(Err(e)) => Err(e),
                Poll::Pending => Err(busy()),
            }
        }));
        let mut fut = match called {
            Ok(Ok(fut)) => fut,
            Ok(Err(e)) => return self.unsent(came_by, what, &e),
            Err(_) => {
                // The stack may be broken: it is built anew for the next envelope.
                *self.relay.lock().unwrap_or_else(|e| e.into_inner()) = None;
                let e: crate::router::BoxError = "a relay layer panicked".into();
                return self.unsent(came_by, what, &e);
            }
        };
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            std::pin::Pin::new(&mut fut).poll(&mut cx)
        }));
        match polled {
            Ok(Poll::Ready(r)) => self.forwarded(came_by, what, r),
            Err(_) => {
                let e: crate::router::BoxError = "a relay layer panicked".into();
                self.unsent(came_by, what, &e)
            }
            Ok(Poll::Pending) => {
                self.relay_in_flight.fetch_add(1, Ordering::Relaxed);
                let (this, came_by) = (self.clone(), came_by.clone());
                // Bounded in time too: a layer that never finishes is given up at the call
                // timeout, and at shutdown.
                let wait = self.config.call_timeout;
                let span = tracing::debug_span!("node", node = %self.addr, task = "relay");
                crate::task::spawn(&self.tracker, span, async move {
                    let r = tokio::select! {
                        r = tokio::time::timeout(wait, fut) => r.unwrap_or_else(|_| {
                            Err("the relay stack did not finish within the call timeout".into())
                        }),
                        _ = this.root.cancelled() => Err("the harbor shut down".into()),
                    };
                    this.relay_in_flight.fetch_sub(1, Ordering::Relaxed);
                    this.forwarded(&came_by, what, r);
                });
            }
        }
    }

    fn forwarded(&self, came_by: &Arc<Peer>, what: Unsent, r: Result<(), crate::router::BoxError>) {
        match r {
            Ok(()) => Stats::incr(&self.stats.envelopes_forwarded),
            Err(e) => self.unsent(came_by, what, &e),
        }
    }

    /// Answers, resets or drops (counting it) what could not be forwarded.
    fn unsent(&self, came_by: &Arc<Peer>, what: Unsent, e: &crate::router::BoxError) {
        let busy = matches!(e.downcast_ref(), Some(RpcError::QueueFull { .. }))
            || e.downcast_ref::<crate::router::stack::Overloaded>()
                .is_some();
        let reason = if let Some(RouteError::NoRoute { reason, .. }) = e.downcast_ref() {
            format!("{reason} (at {})", self.addr)
        } else if let Some(RpcError::NoRoute { reason, .. }) = e.downcast_ref() {
            format!("{reason} (at {})", self.addr)
        } else {
            format!("{e} (at {})", self.addr)
        };
        let code = if busy {
            Stats::incr(&self.stats.envelopes_hop_busy);
            ErrorCode::HOP_BUSY
        } else if let Some(RpcError::Shutdown { .. }) = e.downcast_ref() {
            Stats::incr(&self.stats.envelopes_unroutable);
            ErrorCode::PEER_LOST
        } else {
            Stats::incr(&self.stats.envelopes_unroutable);
            ErrorCode::NO_ROUTE
        };
        let (Ok(from), to) = (LogicAddr::from_u32(what.from), what.to) else {
            return;
        };
        match what.kind {
            UnsentKind::Request(id) => self.server.respond(
                came_by,
                from,
                id,
                None,
                Err(HandlerError {
                    code,
                    message: reason,
                }),
                false,
            ),
            // The stream cannot go on: it is ended at the side it came from (and, if the
            // other side is reachable, there too), instead of losing bytes in its middle.
            UnsentKind::Stream { id, to_opener } => {
                let close = |to_opener: bool| {
                    Body::Close(proto::StreamClose {
                        id,
                        to_opener,
                        code: if busy {
                            ErrorCode::RESET.0
                        } else {
                            ErrorCode::NO_ROUTE.0
                        },
                        reason: reason.clone(),
                    })
                };
                // Sent back as the other end would: that is the stream the sender knows.
                let mut back = self.envelope(from, close(!to_opener));
                back.from = to;
                came_by.try_send_close(back, &self.stats);
                let opener = if to_opener { to } else { what.from };
                if let Some(ahead) = self.relays.stream_refused(opener, id, to_opener)
                    && let Ok(target_side) = self.link_peer(ahead)
                    && let Ok(dest) = LogicAddr::from_u32(to)
                {
                    let mut ahead = self.envelope(dest, close(to_opener));
                    ahead.from = what.from;
                    target_side.try_send_close(ahead, &self.stats);
                }
            }
            UnsentKind::Other => {
                static DROPPED: crate::LogGate = crate::LogGate::new();
                if let Some(held) = DROPPED.pass() {
                    tracing::warn!(node = %self.addr, to, from = %from, reason, held_back = held, "dropped an envelope this harbor cannot forward");
                }
            }
        }
    }

    /// Answers the callers of requests relayed toward `via` whose link failed with `error`:
    /// those still queued (`lost`, taken from the failed peer's queue) and those already sent
    /// and not yet answered, so every caller learns it now rather than at its deadline. Runs
    /// with no lock held.
    pub(crate) fn bounce(&self, via: LogicAddr, lost: Vec<Envelope>, error: &RpcError) {
        if self.addr.is_harbor() {
            self.fail_stream_relays(via, error);
        }
        // (A harbor shutting down is a lost path to the caller, not a target shutting down.)
        let code = match error {
            RpcError::NoRoute { .. } => ErrorCode::NO_ROUTE,
            _ => ErrorCode::PEER_LOST,
        };
        let mut callers: Vec<(u32, u64)> = lost
            .into_iter()
            .filter_map(|env| match env.body {
                Some(Body::Request(r)) if !r.oneway => Some((env.from, r.id)),
                _ => None,
            })
            .collect();
        if self.addr.is_harbor() {
            callers.extend(self.relays.calls_lost_via(via));
        }
        callers.sort_unstable();
        callers.dedup();
        for (caller, id) in callers {
            let Ok(caller) = LogicAddr::from_u32(caller) else {
                continue;
            };
            if caller == self.addr {
                continue;
            }
            let Ok(back) = self.peer_for(caller) else {
                Stats::incr(&self.stats.envelopes_lost);
                continue;
            };
            self.server.respond(
                &back,
                caller,
                id,
                None,
                Err(HandlerError {
                    code,
                    message: format!("{error} (at {})", self.addr),
                }),
                false,
            );
        }
    }
}

/// The node under a harbor's relay stack (see `router::stack`): route, then queue toward the
/// next hop, or back the way a request came for its answer.
impl Forwarder for Inner {
    fn forward_one(self: Arc<Self>, r: Relayed) -> Result<(), BoxError> {
        self.forward_direct(r)
    }
}

impl Inner {
    /// What [`Forward`] does: route, then queue, without waiting.
    fn forward_direct(self: &Arc<Self>, r: Relayed) -> Result<(), BoxError> {
        let node = self;
        // An answer goes back the way its request came, while that link is up.
        if let Some(Body::Response(resp)) = &r.env.body
            && let Some(back) = node.answer_path(r.env.to, resp.id)
        {
            return node
                .enqueue_back(&back, r.came_by, r.env)
                .map_err(Into::into);
        }
        let mut route = RouteLayer::new(ViewRoutes(node)).layer(Enqueue {
            node,
            came_by: r.came_by,
        });
        // `Route` over `Enqueue` is always ready and finishes at once.
        let _ = route.poll_ready(&mut Context::from_waker(std::task::Waker::noop()));
        let mut call = route.call(r.env);
        match Pin::new(&mut call).poll(&mut Context::from_waker(std::task::Waker::noop())) {
            Poll::Ready(res) => res,
            Poll::Pending => Err("the forwarding queue did not finish at once".into()),
        }
    }
}

/// The [`Forward`] of `node`.
pub(crate) fn forward_of(node: &Arc<Inner>) -> Forward {
    let weak: std::sync::Weak<dyn Forwarder> = Arc::downgrade(node) as _;
    Forward::new(weak)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use crate::link::reader::Deliver;
    use crate::node::Node;
    use crate::proto::{Envelope, Request, envelope::Body};
    use crate::{LogicAddr, Member, MemoryDiscovery};

    fn a(s: &str) -> LogicAddr {
        s.parse().unwrap()
    }

    fn request(to: &str, from: &str) -> Envelope {
        Envelope {
            to: a(to).as_u32(),
            from: a(from).as_u32(),
            hops: 0,
            trace: Bytes::new(),
            body: Some(Body::Request(Request {
                id: 1,
                method: "m".into(),
                payload: Bytes::new(),
                timeout_ms: 1000,
                oneway: true,
            })),
        }
    }

    /// A started-looking node at `me` whose view holds `members`.
    fn node(me: &str, members: &[&str]) -> Arc<super::Inner> {
        let m = MemoryDiscovery::new(members.iter().map(|x| Member::new(a(x), "127.0.0.1:9")));
        let inner = Node::builder(a(me))
            .discovery(m.clone())
            .build()
            .inner_arc();
        let view = crate::membership::view::View::new(a(me), m.members());
        *inner.view.write().unwrap() = Arc::new(view);
        inner.set_phase(super::super::inner::Phase::Running);
        inner
    }

    const MEMBERS: &[&str] = &["2.1.1", "2.1.5", "2.1.7", "2.255.1", "1.255.1", "1.1.1"];

    #[tokio::test]
    async fn a_harbor_relays_nothing_a_sender_could_forge() {
        let harbor = node("2.255.1", MEMBERS);
        let from_node = harbor.new_peer(a("2.1.1"));
        let from_harbor = harbor.new_peer(a("1.255.1"));
        // An ordinary node sends only as itself, and never within its own cluster.
        for (peer, env) in [
            (&from_node, request("1.1.1", "2.1.7")),
            (&from_node, request("2.1.5", "2.1.1")),
            (&from_node, request("2.1.5", "2.1.7")),
            // A harbor speaks only for its own cluster.
            (&from_harbor, request("2.1.5", "3.1.1")),
            (&from_harbor, request("2.1.5", "2.1.7")),
        ] {
            harbor.deliver(peer, env).unwrap();
        }
        let stats = harbor.stats.snapshot();
        assert_eq!(stats.envelopes_misaddressed, 5);
        assert_eq!(stats.envelopes_forwarded + stats.envelopes_unroutable, 0);
        // What may be relayed is.
        harbor
            .deliver(&from_node, request("1.1.1", "2.1.1"))
            .unwrap();
        harbor
            .deliver(&from_harbor, request("2.1.5", "1.1.1"))
            .unwrap();
        let stats = harbor.stats.snapshot();
        assert_eq!(stats.envelopes_forwarded + stats.envelopes_unroutable, 2);
    }

    #[tokio::test]
    async fn a_request_over_the_hop_limit_is_answered_not_forwarded() {
        let harbor = node("2.255.1", MEMBERS);
        let from_harbor = harbor.new_peer(a("1.255.1"));
        let mut env = request("2.1.5", "1.1.1");
        env.hops = crate::router::MAX_HOPS;
        if let Some(Body::Request(r)) = &mut env.body {
            r.oneway = false;
        }
        harbor.deliver(&from_harbor, env).unwrap();
        let stats = harbor.stats.snapshot();
        assert_eq!(
            (stats.envelopes_unroutable, stats.envelopes_forwarded),
            (1, 0)
        );
        // The answer goes back over the link the request came by, naming the limit.
        let answer = from_harbor.rx().try_recv().unwrap().env;
        assert_eq!(answer.to, a("1.1.1").as_u32());
        match answer.body {
            Some(Body::Response(r)) => match r.result {
                Some(crate::proto::response::Result::Error(e)) => {
                    assert_eq!(e.code, crate::ErrorCode::NO_ROUTE.0);
                    assert!(e.message.contains("hop"), "{}", e.message);
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_receiver_takes_relayed_senders_only_from_other_clusters() {
        let target = node("2.1.5", MEMBERS);
        let harbor = target.new_peer(a("2.255.1"));
        // Through a harbor, a node of the target's own cluster cannot be the sender.
        target.deliver(&harbor, request("2.1.5", "2.1.7")).unwrap();
        assert_eq!(target.stats.snapshot().envelopes_misaddressed, 1);
        target.deliver(&harbor, request("2.1.5", "1.1.1")).unwrap();
        assert_eq!(target.stats.snapshot().envelopes_misaddressed, 1);
        assert_eq!(target.stats.snapshot().requests_received, 1);
    }
}
