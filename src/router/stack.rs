//! The relay stack of a harbor (`clustergo::relay`): every envelope it forwards goes through one tower `Service`,
//! built once (on the first envelope it forwards), so a harbor can add middleware — a rate limit, a
//! concurrency limit, a timeout, a policy filter — with
//! [`NodeBuilder::relay_layer`](crate::NodeBuilder::relay_layer).
//!
//! The innermost service is [`Forward`]: it picks the next hop (the routing rule of the
//! README) and queues the envelope toward it, never waiting. The stack is driven from the
//! link readers, which must never wait either (one reader serves every destination behind its
//! link), so:
//! - a stack that is not ready (`poll_ready` pending: a rate limit out of tokens, a
//!   concurrency limit at its bound) refuses the envelope now, as `HOP_BUSY`;
//! - an error from the stack refuses it with that error's text, as `NO_ROUTE`, except a full
//!   queue toward the next hop and [`Overloaded`], which are `HOP_BUSY`;
//! - a layer that panics refuses the envelope, and the stack is built anew;
//! - a response future that does not finish at once (a layer that waits) runs on its own
//!   task, given up at `call_timeout` and at shutdown; while `peer_queue` of them run,
//!   envelopes are refused before the stack is called.
//!
//! A layer sees answers and stream traffic too: refusing an answer turns a call that ran into
//! a timeout at its caller, so limit new work ([`RelayKind::Request`], [`RelayKind::Message`],
//! [`RelayKind::StreamOpen`]) rather than everything.
//!
//! Refused requests are answered at once with the reason; refused stream envelopes end their
//! stream at both ends; refused one-way messages and answers are dropped, counted
//! (`envelopes_hop_busy`, `envelopes_unroutable`) and logged (gated).

use std::future::{Future, Ready, ready};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use crate::addr::LogicAddr;
use crate::proto::{Envelope, envelope::Body};

/// Errors as tower middleware passes them on.
pub use super::service::BoxError;

/// What a relayed envelope carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayKind {
    /// A request (a call, or a one-way request).
    Request,
    /// The answer to a request.
    Response,
    /// A one-way message.
    Message,
    /// A stream's open: new work, like a request.
    StreamOpen,
    /// A stream's acceptance, data, window or close: a stream under way.
    Stream,
}

/// An envelope a harbor forwards, as the layers of its relay stack see it.
#[derive(Debug)]
pub struct Relayed {
    pub(crate) env: Envelope,
    pub(crate) from: LogicAddr,
    pub(crate) to: LogicAddr,
    pub(crate) came_by: LogicAddr,
    pub(crate) payload_len: usize,
}

impl Relayed {
    /// The node that sent it.
    pub fn from(&self) -> LogicAddr {
        self.from
    }

    /// The node it is for.
    pub fn to(&self) -> LogicAddr {
        self.to
    }

    /// The neighbour it came from (a node of this harbor's cluster, or another harbor).
    pub fn came_by(&self) -> LogicAddr {
        self.came_by
    }

    /// What it carries.
    pub fn kind(&self) -> RelayKind {
        match &self.env.body {
            Some(Body::Request(_)) => RelayKind::Request,
            Some(Body::Response(_)) => RelayKind::Response,
            Some(Body::Message(_)) => RelayKind::Message,
            Some(Body::Open(_)) => RelayKind::StreamOpen,
            _ => RelayKind::Stream,
        }
    }

    /// Payload bytes it carries (request, answer, message or stream data).
    pub fn payload_len(&self) -> usize {
        self.payload_len
    }
}

/// What sits under a relay stack: the node that routes and queues (implemented by the node).
pub(crate) trait Forwarder: Send + Sync {
    /// Routes `r` and queues it toward its next hop, without waiting.
    fn forward_one(self: Arc<Self>, r: Relayed) -> Result<(), BoxError>;
}

/// The innermost service of a relay stack: picks the next hop and queues the envelope toward
/// it without waiting (a full queue is an error naming the hop). Always ready.
#[derive(Clone)]
pub struct Forward {
    node: Weak<dyn Forwarder>,
}

impl std::fmt::Debug for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Forward")
    }
}

impl Forward {
    pub(crate) fn new(node: Weak<dyn Forwarder>) -> Forward {
        Forward { node }
    }
}

impl Service<Relayed> for Forward {
    type Response = ();
    type Error = BoxError;
    type Future = Ready<Result<(), BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, r: Relayed) -> Self::Future {
        match self.node.upgrade() {
            Some(node) => ready(node.forward_one(r)),
            None => ready(Err("the harbor is shutting down".into())),
        }
    }
}

/// A relay stack's future: [`Forward`]'s alone needs no allocation; a stack's is boxed.
pub(crate) type RelayFuture = futures_util::future::Either<
    Ready<Result<(), BoxError>>,
    Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>,
>;

/// A relay stack, type-erased.
pub(crate) type RelayService =
    Box<dyn Service<Relayed, Response = (), Error = BoxError, Future = RelayFuture> + Send>;

/// Builds a node's relay stack over its [`Forward`].
pub(crate) type RelayLayerFn = Arc<dyn Fn(Forward) -> RelayService + Send + Sync>;

/// Boxes the futures (and errors) of a stack.
struct Boxed<S>(S);

impl<S> Service<Relayed> for Boxed<S>
where
    S: Service<Relayed, Response = ()>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = RelayFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, r: Relayed) -> RelayFuture {
        let fut = self.0.call(r);
        futures_util::future::Either::Right(Box::pin(async move { fut.await.map_err(Into::into) }))
    }
}

/// [`Forward`] alone, as a relay stack.
struct Plain(Forward);

impl Service<Relayed> for Plain {
    type Response = ();
    type Error = BoxError;
    type Future = RelayFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, r: Relayed) -> RelayFuture {
        futures_util::future::Either::Left(self.0.call(r))
    }
}

/// The layer function for `layer`.
pub(crate) fn layer_fn<L>(layer: L) -> RelayLayerFn
where
    L: Layer<Forward> + Send + Sync + 'static,
    L::Service: Service<Relayed, Response = ()> + Send + 'static,
    <L::Service as Service<Relayed>>::Error: Into<BoxError>,
    <L::Service as Service<Relayed>>::Future: Send + 'static,
{
    Arc::new(move |forward| Box::new(Boxed(layer.layer(forward))) as RelayService)
}

/// The stack over `forward`: its layers, or [`Forward`] alone.
pub(crate) fn build(forward: Forward, layers: Option<&RelayLayerFn>) -> RelayService {
    match layers {
        Some(f) => f(forward),
        None => Box::new(Plain(forward)),
    }
}

/// The error that refuses an envelope as `HOP_BUSY` (the caller sees `PathBusy`): a relay
/// stack that is not ready refuses with it, and a layer of yours may return it (e.g. a rate
/// limit for some kinds of traffic only). Any other error refuses as `NO_ROUTE`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Overloaded(pub String);

impl Overloaded {
    pub(crate) fn at(harbor: LogicAddr) -> Overloaded {
        Overloaded(format!("the relay stack of {harbor} is at its limit"))
    }
}
