//! RPC: handlers, the context they see, and the [`Replyer`] that answers exactly once.

pub(crate) mod caller;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::addr::LogicAddr;
use crate::error::{ErrorCode, HandlerError};
use crate::link::Outbound;
use crate::proto::{self, Envelope, envelope::Body, response};
use crate::stats::Stats;
use crate::stream::Peer;

/// What a handler knows about the request it serves.
#[derive(Debug, Clone)]
pub struct CallContext {
    pub(crate) from: LogicAddr,
    pub(crate) method: String,
    pub(crate) deadline: Option<Instant>,
    pub(crate) oneway: bool,
    pub(crate) node: crate::Node,
}

impl CallContext {
    /// The node serving the call: a handler calls, sends or opens streams through it (no
    /// need to smuggle a `Node` into the handler's closure).
    pub fn node(&self) -> &crate::Node {
        &self.node
    }

    /// The caller's address.
    pub fn from(&self) -> LogicAddr {
        self.from
    }

    /// The method called.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// When the caller stops waiting, as sent by the caller; `None` for no deadline.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether the caller expects no answer ([`Node::post`](crate::Node::post)).
    pub fn is_oneway(&self) -> bool {
        self.oneway
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Bytes, HandlerError>> + Send + 'static>>;

/// A registered RPC handler.
#[derive(Clone)]
pub(crate) enum RpcHandler {
    /// Answers through a [`Replyer`], now or later, from any thread.
    Replyer(Arc<dyn Fn(CallContext, Bytes, Replyer) + Send + Sync>),
    /// Answers with the future's output; runs as its own task.
    Async(Arc<dyn Fn(CallContext, Bytes) -> BoxFuture + Send + Sync>),
}

impl RpcHandler {
    pub(crate) fn from_async<F, Fut>(f: F) -> Self
    where
        F: Fn(CallContext, Bytes) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Bytes, HandlerError>> + Send + 'static,
    {
        RpcHandler::Async(Arc::new(move |ctx, payload| Box::pin(f(ctx, payload))))
    }
}

/// Server-side state shared by every reply: the concurrency limit and the drain signal.
#[derive(Debug)]
pub(crate) struct ServerShared {
    pub(crate) addr: LogicAddr,
    pub(crate) inflight: AtomicUsize,
    pub(crate) limit: usize,
    /// Handlers one caller may have running at once (its fair share of `limit`).
    pub(crate) per_caller: usize,
    /// Handlers running for callers in other clusters, by caller (direct callers are counted
    /// on their peer slot).
    pub(crate) remote_serving: std::sync::Mutex<crate::hash::FastMap<LogicAddr, usize>>,
    pub(crate) drained: Notify,
    pub(crate) max_envelope: usize,
    pub(crate) send_timeout: std::time::Duration,
    /// Responses waiting for room in a full queue.
    pub(crate) waiting_replies: AtomicUsize,
    pub(crate) tracker: tokio_util::task::TaskTracker,
    pub(crate) stats: Arc<Stats>,
    pub(crate) runtime: std::sync::OnceLock<tokio::runtime::Handle>,
    /// Fires at the end of shutdown: handlers still running then are dropped (their callers
    /// have been told `Shutdown` or `PeerLost` by then).
    pub(crate) cancel: tokio_util::sync::CancellationToken,
    /// Durations of the calls served here, by method and outcome (`None`: not timed).
    pub(crate) calls: Option<crate::metrics::ServerCalls>,
}

impl ServerShared {
    /// A place for one more handler run for `caller` (whose request came over `peer`'s link):
    /// within the caller's fair share, then within the node's limit. `Err` names the limit.
    fn try_acquire(&self, peer: &Peer, caller: LogicAddr) -> Result<(), &'static str> {
        let share = self.per_caller;
        let taken = if caller == peer.addr {
            // A direct caller: its counter lives on its peer slot, no lock.
            peer.serving
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < share).then_some(n + 1)
                })
                .is_ok()
        } else {
            // A caller in another cluster, through a harbor.
            let mut remote = self
                .remote_serving
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let n = remote.entry(caller).or_insert(0);
            (*n < share).then(|| *n += 1).is_some()
        };
        if !taken {
            return Err("at this caller's share of the concurrency limit");
        }
        let node_wide = self
            .inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .is_ok();
        if !node_wide {
            self.release_share(peer, caller);
            return Err("at the concurrency limit");
        }
        Ok(())
    }

    fn release_share(&self, peer: &Peer, caller: LogicAddr) {
        if caller == peer.addr {
            peer.serving.fetch_sub(1, Ordering::AcqRel);
        } else {
            let mut remote = self
                .remote_serving
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(n) = remote.get_mut(&caller) {
                *n -= 1;
                if *n == 0 {
                    remote.remove(&caller);
                }
            }
        }
    }

    fn release(&self, peer: &Peer, caller: LogicAddr) {
        self.release_share(peer, caller);
        if self.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.drained.notify_waiters();
        }
    }

    /// Queues a response toward `to` through `peer`. `holds_permit`: the request counted
    /// against the concurrency limit, released once the response is queued (so shutdown's
    /// drain covers replies still waiting for room).
    ///
    /// A full queue (the peer reads slower than it asks) gets a bounded wait: at most
    /// `limit` responses wait at once, each at most `send_timeout`; beyond that the response
    /// is dropped, counted in `responses_dropped` and logged. A peer can never make this node
    /// hold more than that.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn respond(
        self: &Arc<Self>,
        peer: &Arc<Peer>,
        to: LogicAddr,
        id: u64,
        deadline: Option<Instant>,
        result: Result<Bytes, HandlerError>,
        holds_permit: bool,
    ) {
        let result = match result {
            Ok(p) if p.len() > self.max_envelope => response::Result::Error(proto::Error {
                code: ErrorCode::TOO_LARGE.0,
                message: format!(
                    "response of {} bytes is over the limit of {} bytes",
                    p.len(),
                    self.max_envelope
                ),
            }),
            Ok(p) => response::Result::Payload(p),
            Err(e) => response::Result::Error(proto::Error {
                code: e.code.0,
                message: crate::error::clip(e.message),
            }),
        };
        let item = Outbound {
            env: Envelope::originate(
                to.as_u32(),
                self.addr.as_u32(),
                Body::Response(proto::Response {
                    id,
                    result: Some(result),
                }),
            ),
            deadline,
        };
        let done =
            move |this: &ServerShared, peer: &Peer, error: Option<crate::error::RpcError>| {
                if let Some(e) = error {
                    Stats::incr(&this.stats.responses_dropped);
                    tracing::warn!(%to, error = %e, "response dropped");
                }
                if holds_permit {
                    this.release(peer, to);
                }
            };
        let mut item = match peer.try_enqueue(item) {
            Ok(()) => return done(self, peer, None),
            Err((crate::error::RpcError::QueueFull { .. }, item)) => item,
            Err((e, _)) => return done(self, peer, Some(e)),
        };
        let (Some(rt), true) = (self.runtime.get(), self.reserve_waiting()) else {
            return done(
                self,
                peer,
                Some(crate::error::RpcError::QueueFull {
                    peer: peer.addr,
                    capacity: self.limit,
                }),
            );
        };
        let until = Instant::now() + self.send_timeout;
        item.deadline = Some(deadline.map_or(until, |d| d.min(until)));
        let this = self.clone();
        let peer = peer.clone();
        let span = tracing::debug_span!("node", node = %self.addr, task = "reply", %to, id);
        crate::task::spawn_on(&self.tracker, rt, span, async move {
            let r = peer.enqueue(item, this.send_timeout).await;
            this.waiting_replies.fetch_sub(1, Ordering::AcqRel);
            done(&this, &peer, r.err());
        });
    }

    fn reserve_waiting(&self) -> bool {
        self.waiting_replies
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .is_ok()
    }

    /// Dispatches one request to its handler (or answers the error that prevents it).
    /// `handler` comes with its method's slot in the call metrics; `started` is when the
    /// request arrived.
    pub(crate) fn serve(
        self: &Arc<Self>,
        handler: Option<(&RpcHandler, usize)>,
        peer: &Arc<Peer>,
        ctx: CallContext,
        started: Instant,
        id: u64,
        payload: Bytes,
    ) {
        let slot = handler.map_or(0, |(_, s)| s);
        let handler = handler.map(|(h, _)| h);
        let refuse = |code: ErrorCode, message: String| {
            if let Some(calls) = &self.calls {
                calls.record(
                    slot,
                    crate::metrics::Outcome::of_code(code),
                    started.elapsed(),
                );
            }
            if !ctx.oneway {
                self.respond(
                    peer,
                    ctx.from,
                    id,
                    ctx.deadline,
                    Err(HandlerError { code, message }),
                    false,
                );
            }
        };
        let Some(handler) = handler else {
            return refuse(
                ErrorCode::NO_METHOD,
                format!("no handler for method {:?}", ctx.method),
            );
        };
        if let Err(limit) = self.try_acquire(peer, ctx.from) {
            Stats::incr(&self.stats.requests_busy);
            return refuse(ErrorCode::BUSY, limit.into());
        }
        let replyer = Replyer {
            shared: Some(self.clone()),
            peer: peer.clone(),
            to: ctx.from,
            id,
            oneway: ctx.oneway,
            deadline: ctx.deadline,
            slot,
            started,
        };
        match handler {
            RpcHandler::Replyer(f) => {
                // A panic drops the replyer while unwinding, which answers PANICKED.
                if std::panic::catch_unwind(AssertUnwindSafe(|| f(ctx, payload, replyer))).is_err()
                {
                    tracing::error!(peer = %peer.addr, "RPC handler panicked");
                }
            }
            RpcHandler::Async(f) => {
                let from = ctx.from;
                // The task runs in the call's span (`rpc.server`, when traced), or one that
                // names it (fields are formatted only if the span is enabled).
                let current = tracing::Span::current();
                let span = if current.is_disabled() {
                    tracing::debug_span!(
                        "node",
                        node = %self.addr,
                        task = "rpc",
                        method = %ctx.method,
                        %from,
                        id
                    )
                } else {
                    current
                };
                let mut fut = match std::panic::catch_unwind(AssertUnwindSafe(|| f(ctx, payload))) {
                    Ok(fut) => fut,
                    Err(p) => return replyer.reply(Err(panicked(from, p))),
                };
                // Poll once here: a handler that answers without waiting (most do) costs no
                // task. A pending one moves to a task, whose first poll registers the real
                // waker, so the throwaway waker used here is never relied on.
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(&mut cx))) {
                    Ok(std::task::Poll::Ready(result)) => return replyer.reply(result),
                    Ok(std::task::Poll::Pending) => {}
                    Err(p) => return replyer.reply(Err(panicked(from, p))),
                }
                let cancel = self.cancel.clone();
                crate::task::spawn(&self.tracker, span, async move {
                    // Biased: the handler is polled before the token is registered with.
                    let outcome = tokio::select! {
                        biased;
                        r = AssertUnwindSafe(fut).catch_unwind() => r,
                        _ = cancel.cancelled() => {
                            tracing::warn!(%from, id, "RPC handler dropped at the end of shutdown");
                            return;
                        }
                    };
                    let result = outcome.unwrap_or_else(|p| Err(panicked(from, p)));
                    replyer.reply(result);
                });
            }
        }
    }
}

fn panicked(from: LogicAddr, payload: Box<dyn std::any::Any + Send>) -> HandlerError {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into());
    tracing::error!(caller = %from, panic = %text, "RPC handler panicked");
    HandlerError {
        code: ErrorCode::PANICKED,
        message: format!("the handler panicked: {text}"),
    }
}

/// Answers one RPC request, exactly once.
///
/// [`Replyer::reply`] consumes it, so a second reply does not compile. Dropping it without
/// replying answers the caller with [`ErrorCode::NO_REPLY`] (or [`ErrorCode::PANICKED`] when
/// dropped by a panic), so no caller waits for a reply that will never come. It can be moved to
/// any thread, e.g. into a game loop that answers on its next tick. For a one-way request
/// ([`Node::post`](crate::Node::post)) replying does nothing.
pub struct Replyer {
    shared: Option<Arc<ServerShared>>,
    peer: Arc<Peer>,
    to: LogicAddr,
    id: u64,
    oneway: bool,
    deadline: Option<Instant>,
    /// The method's slot in the server's call metrics.
    slot: usize,
    started: Instant,
}

impl std::fmt::Debug for Replyer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replyer")
            .field("to", &self.to)
            .field("id", &self.id)
            .field("oneway", &self.oneway)
            .finish_non_exhaustive()
    }
}

impl Replyer {
    /// The caller's address.
    pub fn caller(&self) -> LogicAddr {
        self.to
    }

    /// Sends the answer.
    pub fn reply(mut self, result: Result<Bytes, HandlerError>) {
        self.finish(result);
    }

    fn finish(&mut self, result: Result<Bytes, HandlerError>) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        if let Some(calls) = &shared.calls {
            let outcome = match &result {
                Ok(_) => crate::metrics::Outcome::Ok,
                Err(e) => crate::metrics::Outcome::of_code(e.code),
            };
            calls.record(self.slot, outcome, self.started.elapsed());
        }
        if self.oneway {
            shared.release(&self.peer, self.to);
        } else {
            shared.respond(&self.peer, self.to, self.id, self.deadline, result, true);
        }
    }
}

impl Drop for Replyer {
    fn drop(&mut self) {
        if self.shared.is_some() {
            let (code, message) = if std::thread::panicking() {
                (ErrorCode::PANICKED, "the handler panicked")
            } else {
                (
                    ErrorCode::NO_REPLY,
                    "the handler dropped its reply without answering",
                )
            };
            self.finish(Err(HandlerError {
                code,
                message: message.into(),
            }));
        }
    }
}
