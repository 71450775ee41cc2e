//! What a harbor does with envelopes for other nodes: forwards them one hop through the
//! routing layer, or, when there is no way on, answers a waiting caller with the reason.

use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::FutureExt;
use tower_layer::Layer;
use tower_service::Service;

use super::inner::Inner;
use crate::addr::LogicAddr;
use crate::error::{ErrorCode, HandlerError, RpcError};
use crate::link::{Outbound, Peer};
use crate::proto::{self, Envelope, envelope::Body};
use crate::router::{NextHop, RouteError, RouteLayer, Routes};
use crate::stats::Stats;

/// Routes by the node's view (see [`Inner::next_hop`]).
#[derive(Clone, Copy)]
struct ViewRoutes<'a>(&'a Inner);

impl Routes for ViewRoutes<'_> {
    fn me(&self) -> LogicAddr {
        self.0.addr
    }

    fn next_hop(&self, to: LogicAddr) -> Result<NextHop, RouteError> {
        self.0.next_hop(to)
    }
}

/// The service under the routing layer: queues an envelope for a neighbour, dialing it if
/// need be. Never waits: a full queue is an error, so one slow neighbour cannot stall the
/// harbor's reader (and with it everything else on that link).
#[derive(Clone, Copy)]
struct Enqueue<'a>(&'a Arc<Inner>);

impl Service<(NextHop, Envelope)> for Enqueue<'_> {
    type Response = ();
    type Error = RpcError;
    type Future = Ready<Result<(), RpcError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), RpcError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (hop, env): (NextHop, Envelope)) -> Self::Future {
        ready(self.0.enqueue_hop(hop, env))
    }
}

impl Inner {
    fn enqueue_hop(self: &Arc<Self>, hop: NextHop, env: Envelope) -> Result<(), RpcError> {
        let peer = self.link_peer(hop.addr())?;
        self.ensure_link(&peer)?;
        let item = Outbound {
            deadline: self.oneway_deadline(&peer),
            env,
        };
        peer.try_enqueue(item).map_err(|(e, _)| e)?;
        self.after_enqueue(&peer);
        Ok(())
    }

    /// Forwards `env` (not addressed to this harbor) one hop on. A request that cannot go on
    /// is answered with [`ErrorCode::NO_ROUTE`] and the reason, back over the link it came
    /// by; anything else is dropped, counted and logged.
    pub(crate) fn forward(self: &Arc<Self>, came_by: &Arc<Peer>, env: Envelope) {
        let bounce = match &env.body {
            Some(Body::Request(r)) if !r.oneway => Some((r.id, env.from)),
            _ => None,
        };
        let (to, from) = (env.to, env.from);
        let mut route = RouteLayer::new(ViewRoutes(self)).layer(Enqueue(self));
        let sent = match route.poll_ready(&mut Context::from_waker(std::task::Waker::noop())) {
            Poll::Ready(Ok(())) => route
                .call(env)
                .now_or_never()
                .unwrap_or_else(|| Err("the forwarding queue was not ready".into())),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err("the forwarding queue was not ready".into()),
        };
        let Err(e) = sent else {
            Stats::incr(&self.stats.envelopes_forwarded);
            return;
        };
        Stats::incr(&self.stats.envelopes_unroutable);
        let reason = if let Some(RouteError::NoRoute { reason, .. }) = e.downcast_ref() {
            format!("{reason} (at {})", self.addr)
        } else if let Some(RpcError::NoRoute { reason, .. }) = e.downcast_ref() {
            format!("{reason} (at {})", self.addr)
        } else {
            format!("{e} (at {})", self.addr)
        };
        match (bounce, LogicAddr::from_u32(from)) {
            (Some((id, _)), Ok(caller)) => self.server.respond(
                came_by,
                caller,
                id,
                None,
                Err(HandlerError {
                    code: ErrorCode::NO_ROUTE,
                    message: reason,
                }),
                false,
            ),
            _ => {
                tracing::warn!(node = %self.addr, to, from, reason, "dropped an envelope this harbor cannot forward")
            }
        }
    }

    /// Answers requests of other nodes' callers that were queued here for a link that failed
    /// (`error`), so those callers learn it now rather than at their deadline. Runs with no
    /// lock held.
    pub(crate) fn bounce(&self, lost: Vec<Envelope>, error: &RpcError) {
        for env in lost {
            let (Some(Body::Request(r)), Ok(caller)) = (env.body, LogicAddr::from_u32(env.from))
            else {
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
                r.id,
                None,
                Err(HandlerError {
                    code: ErrorCode::PEER_LOST,
                    message: format!("{error} (at {})", self.addr),
                }),
                false,
            );
        }
    }

    /// Streams do not cross clusters yet: a relayed open is refused with the reason, other
    /// relayed stream envelopes are dropped.
    pub(crate) fn refuse_relayed_stream(&self, came_by: &Arc<Peer>, from: LogicAddr, body: Body) {
        let Body::Open(o) = body else {
            Stats::incr(&self.stats.stream_envelopes_unknown);
            return;
        };
        Stats::incr(&self.stats.streams_refused);
        let close = Body::Close(proto::StreamClose {
            id: o.id,
            to_opener: true,
            code: ErrorCode::NO_ROUTE.0,
            reason: format!(
                "streams between clusters are not routed yet ({from} to {})",
                self.addr
            ),
        });
        let _ = came_by.try_enqueue(Outbound {
            env: self.envelope(from, close),
            deadline: None,
        });
    }
}
