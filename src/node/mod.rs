//! The public handle: [`Node`].

mod builder;
mod dispatch;
mod inner;
mod lifecycle;
mod relay;
mod streams;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

pub use builder::NodeBuilder;
use inner::{Inner, Phase};

use crate::addr::LogicAddr;
use crate::error::StreamError;
use crate::error::{RpcError, SelectError, StartError};
use crate::link::Outbound;
use crate::membership::Member;
use crate::message::Cmd;
use crate::proto::{self, envelope::Body, message::Kind};
use crate::rpc::caller;
use crate::stats::StatsSnapshot;
use crate::stream::Peer;
use crate::stream::{Stream, StreamMeta};

/// A node of the mesh: one logical address, one listener, links to the peers it talks to.
///
/// `Node` is a cheap `Clone` handle; many nodes can live in one process. Build one with
/// [`Node::builder`], then [`Node::start`] it. A started node runs until [`Node::shutdown`]
/// or until membership removes it (or changes its network address).
///
/// Every call returns a typed outcome within its deadline; none waits forever.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("addr", &self.inner.addr)
            .field("phase", &self.inner.phase())
            .finish()
    }
}

/// The node's shared state, as the admin listener reads it.
#[cfg(feature = "admin")]
pub(crate) type InnerRef = Arc<Inner>;

/// The caller's span of a call (see `clustergo::trace`); fields are formatted only if it is
/// enabled.
fn call_span(from: LogicAddr, to: LogicAddr, method: &str) -> tracing::Span {
    tracing::debug_span!(
        target: crate::trace::TARGET,
        "rpc.client",
        otel.name = %method,
        otel.kind = "client",
        rpc.system = "clustergo",
        rpc.method = %method,
        clustergo.from = %from,
        clustergo.to = %to,
        otel.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    )
}

/// Marks a call's span failed, with the error's kind.
fn failed(span: &tracing::Span, e: &RpcError) {
    if !span.is_disabled() {
        span.record("otel.status_code", "ERROR");
        span.record("error.type", crate::metrics::Outcome::of_error(e).as_str());
    }
}

/// Why a one-way body was not queued at once.
enum Pushback {
    /// The queue is full; the item to wait with.
    Full(Arc<Peer>, Box<Outbound>),
    Failed(RpcError),
}

impl Node {
    /// Starts building the node at `addr`.
    pub fn builder(addr: LogicAddr) -> NodeBuilder {
        NodeBuilder::new(addr)
    }

    /// This node's logical address.
    pub fn addr(&self) -> LogicAddr {
        self.inner.addr
    }

    /// The socket address the node listens on, once started.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.inner.local_addr.get().copied()
    }

    /// `Ok` when this node is running, listed in membership and available there (under etcd:
    /// its lease is alive); else why not. What `/ready` answers (see `clustergo::admin`, feature `admin`).
    pub fn readiness(&self) -> Result<(), String> {
        let inner = &self.inner;
        if !self.is_running() {
            return Err(format!("{} is {:?}", self.addr(), inner.phase()).to_lowercase());
        }
        match inner.view().get(self.addr()) {
            None => Err(format!("{} is not in membership", self.addr())),
            Some(m) if !m.available => {
                Err(format!("{} is not available in membership", self.addr()))
            }
            Some(_) => Ok(()),
        }
    }

    /// Whether the node is started and not shutting down.
    pub fn is_running(&self) -> bool {
        self.inner.phase() == Phase::Running
    }

    /// Starts the node: waits for the first membership snapshot (up to
    /// [`NodeConfig::start_timeout`](crate::NodeConfig::start_timeout)), finds itself in it,
    /// and listens on its network address (or the listener given to the builder).
    ///
    /// A failed start leaves the node as it was, so it can be started again.
    pub async fn start(&self) -> Result<(), StartError> {
        self.inner.start().await
    }

    /// Shuts the node down and waits until it is closed: stops accepting links, answers new
    /// requests with [`RpcError::Shutdown`], lets in-flight RPC handlers finish within the
    /// grace period (they may still call other nodes meanwhile), writes what is queued, closes
    /// links. Once closed, every send fails with [`RpcError::Shutdown`]. Calling it again, or
    /// during [`Node::start`], just waits for the same end.
    pub async fn shutdown(&self) {
        self.inner.shutdown().await
    }

    /// Resolves once the node is closed (by [`Node::shutdown`] or by membership).
    pub async fn closed(&self) {
        let mut rx = self.inner.closed.subscribe();
        // The sender lives as long as the node.
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Calls `method` on `to` with the default timeout
    /// ([`NodeConfig::call_timeout`](crate::NodeConfig::call_timeout)).
    pub async fn call(
        &self,
        to: LogicAddr,
        method: &str,
        payload: Bytes,
    ) -> Result<Bytes, RpcError> {
        self.call_timeout(to, method, payload, self.inner.config.call_timeout)
            .await
    }

    /// Calls `method` on `to`; the timeout travels with the request, so the handler sees it as
    /// its deadline.
    pub async fn call_timeout(
        &self,
        to: LogicAddr,
        method: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, RpcError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let span = call_span(self.inner.addr, to, method);
        // The request is built inside the span, so it carries the span's context.
        let started =
            span.in_scope(|| caller::begin(&self.inner, to, method, payload, timeout, deadline));
        let result = match started {
            Ok(s) => {
                let finish = caller::finish(&self.inner, s, to, method, timeout, deadline);
                tracing::Instrument::instrument(finish, span.clone()).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            failed(&span, e);
        }
        result
    }

    /// Calls `method` on `to` and runs `callback` with the outcome, for code that must not
    /// await (a game loop). The callback runs exactly once, on one of the node's runtime
    /// threads, also when the call fails before it is sent; forward the result into your loop
    /// from there.
    pub fn call_with_callback<F>(
        &self,
        to: LogicAddr,
        method: &str,
        payload: Bytes,
        timeout: Duration,
        callback: F,
    ) where
        F: FnOnce(Result<Bytes, RpcError>) + Send + 'static,
    {
        // Queue the request now, so it keeps its place among this caller's other sends.
        let deadline = tokio::time::Instant::now() + timeout;
        let span = call_span(self.inner.addr, to, method);
        let started =
            span.in_scope(|| caller::begin(&self.inner, to, method, payload, timeout, deadline));
        let inner = self.inner.clone();
        let method = method.to_owned();
        let fut = async move {
            let result = match started {
                Ok(s) => {
                    let finish = caller::finish(&inner, s, to, &method, timeout, deadline);
                    tracing::Instrument::instrument(finish, span.clone()).await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = &result {
                failed(&span, e);
            }
            callback(result)
        };
        let rt = self.inner.server.runtime.get().cloned();
        match rt.or_else(|| tokio::runtime::Handle::try_current().ok()) {
            Some(rt) => {
                let span =
                    tracing::debug_span!("node", node = %self.inner.addr, task = "call", %to);
                drop(crate::task::spawn_on(&self.inner.tracker, &rt, span, fut))
            }
            // Not started and not on a runtime: the call failed before any await.
            None => futures_util::FutureExt::now_or_never(fut).unwrap_or(()),
        }
    }

    /// Calls `method` on `to` without waiting for an answer (one-way RPC). `Ok` means queued;
    /// it waits for room in a full queue up to
    /// [`NodeConfig::send_timeout`](crate::NodeConfig::send_timeout).
    pub async fn post(&self, to: LogicAddr, method: &str, payload: Bytes) -> Result<(), RpcError> {
        self.inner.check_size(payload.len() + method.len())?;
        let body = Body::Request(proto::Request {
            id: 0,
            method: method.to_owned(),
            payload,
            timeout_ms: caller::millis(self.inner.config.send_timeout),
            oneway: true,
        });
        self.push(to, body).await
    }

    /// Queues a one-way body without waiting. Built in a plain function, so the envelope is
    /// constructed in place rather than moved through async state machines; on a full queue
    /// the item comes back for [`Node::push`] to wait with.
    fn push_now(&self, to: LogicAddr, body: Body) -> Result<(), Pushback> {
        let inner = &self.inner;
        inner.check_running().map_err(Pushback::Failed)?;
        let peer = inner.peer_for(to).map_err(Pushback::Failed)?;
        crate::link::ensure_link(inner, &peer).map_err(Pushback::Failed)?;
        let item = Outbound {
            env: inner.envelope(to, body),
            deadline: inner.oneway_deadline(&peer),
        };
        match peer.try_enqueue(item) {
            Ok(()) => {
                inner.after_enqueue(&peer);
                Ok(())
            }
            Err((RpcError::QueueFull { .. }, item)) => Err(Pushback::Full(peer, Box::new(item))),
            Err((e, _)) => Err(Pushback::Failed(e)),
        }
    }

    async fn push(&self, to: LogicAddr, body: Body) -> Result<(), RpcError> {
        match self.push_now(to, body) {
            Ok(()) => Ok(()),
            Err(Pushback::Full(peer, mut item)) => {
                // Waiting for room can take a while: from here on the item can expire.
                let wait = self.inner.config.send_timeout;
                item.deadline
                    .get_or_insert_with(|| tokio::time::Instant::now() + wait);
                peer.enqueue(*item, wait).await?;
                self.inner.after_enqueue(&peer);
                Ok(())
            }
            Err(Pushback::Failed(e)) => Err(e),
        }
    }

    fn try_push(&self, to: LogicAddr, body: Body) -> Result<(), RpcError> {
        match self.push_now(to, body) {
            Ok(()) => Ok(()),
            Err(Pushback::Full(peer, _)) => Err(RpcError::QueueFull {
                peer: peer.addr,
                capacity: self.inner.config.peer_queue,
            }),
            Err(Pushback::Failed(e)) => Err(e),
        }
    }

    /// Sends raw bytes as message `cmd` to `to`, waiting for room in a full queue up to
    /// [`NodeConfig::send_timeout`](crate::NodeConfig::send_timeout). `Ok` means queued:
    /// messages of one sender reach one receiver in order.
    pub async fn send_cmd(&self, to: LogicAddr, cmd: Cmd, payload: Bytes) -> Result<(), RpcError> {
        let body = self.cmd_body(cmd, payload)?;
        self.push(to, body).await
    }

    /// Like [`Node::send_cmd`], but fails with [`RpcError::QueueFull`] at once instead of
    /// waiting; never blocks, so it suits a game loop.
    pub fn try_send_cmd(&self, to: LogicAddr, cmd: Cmd, payload: Bytes) -> Result<(), RpcError> {
        let body = self.cmd_body(cmd, payload)?;
        self.try_push(to, body)
    }

    /// Sends a protobuf message to `to`; the receiver's handler for `M` gets it.
    pub async fn send_message<M: prost::Message + prost::Name>(
        &self,
        to: LogicAddr,
        msg: &M,
    ) -> Result<(), RpcError> {
        let body = self.type_body(msg)?;
        self.push(to, body).await
    }

    /// Like [`Node::send_message`], failing at once when the queue is full.
    pub fn try_send_message<M: prost::Message + prost::Name>(
        &self,
        to: LogicAddr,
        msg: &M,
    ) -> Result<(), RpcError> {
        let body = self.type_body(msg)?;
        self.try_push(to, body)
    }

    fn cmd_body(&self, cmd: Cmd, payload: Bytes) -> Result<Body, RpcError> {
        self.inner.check_size(payload.len())?;
        Ok(Body::Message(proto::Message {
            kind: Some(Kind::Cmd(cmd.0)),
            payload,
        }))
    }

    /// Encodes `msg`; its type name rides in the envelope and counts against the limit.
    fn type_body<M: prost::Message + prost::Name>(&self, msg: &M) -> Result<Body, RpcError> {
        let payload = Bytes::from(msg.encode_to_vec());
        let name = M::full_name();
        self.inner.check_size(payload.len() + name.len())?;
        Ok(Body::Message(proto::Message {
            kind: Some(Kind::TypeName(name)),
            payload,
        }))
    }

    /// Opens a byte stream to `to`, whose node must accept streams
    /// ([`NodeBuilder::on_stream`]). Waits for the peer to accept, dialing first if need be,
    /// up to [`NodeConfig::stream_open_timeout`](crate::NodeConfig::stream_open_timeout).
    ///
    /// Fails with [`StreamError::ToSelf`] for this node's own address,
    /// [`StreamError::NoRoute`] for an address not in membership,
    /// [`StreamError::Refused`] when the peer has no stream handler or too many streams,
    /// [`StreamError::Shutdown`] when either node is shutting down,
    /// [`StreamError::TooMany`] at this node's own limit
    /// ([`NodeConfig::max_streams`](crate::NodeConfig::max_streams)),
    /// [`StreamError::TooLarge`] for metadata over
    /// [`NodeConfig::max_stream_meta`](crate::NodeConfig::max_stream_meta) (or the envelope
    /// limit, if smaller),
    /// [`StreamError::Timeout`] when the peer does not answer in time,
    /// [`StreamError::Reset`] when the peer's handler drops the stream at once, and with the
    /// link's failure ([`StreamError::PeerLost`], [`StreamError::Refused`]) when the peer
    /// cannot be reached. Dropping the returned future before it resolves aborts the open.
    pub async fn open_stream(&self, to: LogicAddr) -> Result<Stream, StreamError> {
        self.inner.open_stream(to, StreamMeta::new()).await
    }

    /// Like [`Node::open_stream`], sending `meta` (e.g. the client's transport and address) to
    /// the accepting side, where [`Stream::metadata`] returns it. The metadata is bounded by
    /// [`NodeConfig::max_stream_meta`](crate::NodeConfig::max_stream_meta) here and at the
    /// peer, which also caps what all the streams a peer opened hold
    /// ([`NodeConfig::max_stream_meta_per_peer`](crate::NodeConfig::max_stream_meta_per_peer)).
    pub async fn open_stream_with(
        &self,
        to: LogicAddr,
        meta: StreamMeta,
    ) -> Result<Stream, StreamError> {
        self.inner.open_stream(to, meta).await
    }

    /// A random available node of `node_type` among those this node sees (its cluster and
    /// exported nodes); harbors are never picked. May return this node itself.
    pub fn get_addr_by_type(&self, node_type: u8) -> Result<LogicAddr, SelectError> {
        self.select(node_type, |v| v.pick_random(node_type))
    }

    /// Like [`Node::get_addr_by_type`], but the same `key` (e.g. a player id) maps to the same
    /// node while the set of available nodes holds; when a node leaves, only its keys move.
    pub fn get_addr_by_type_sticky(
        &self,
        node_type: u8,
        key: u64,
    ) -> Result<LogicAddr, SelectError> {
        self.select(node_type, |v| v.pick_sticky(node_type, key))
    }

    fn select(
        &self,
        node_type: u8,
        pick: impl FnOnce(&crate::membership::view::View) -> Option<LogicAddr>,
    ) -> Result<LogicAddr, SelectError> {
        // Handlers finishing during a shutdown may still pick peers (save a player to a
        // database node); a node not started or closed has no view to pick from.
        if !matches!(self.inner.phase(), Phase::Running | Phase::Draining) {
            return Err(SelectError::NotRunning(self.inner.addr));
        }
        pick(&self.inner.view()).ok_or(SelectError::NoneAvailable(node_type))
    }

    /// Every member this node sees now (its cluster, exported members of other clusters, and
    /// for a harbor every harbor), in no particular order.
    pub fn members(&self) -> Vec<Member> {
        self.inner.view().members().cloned().collect()
    }

    /// The member `addr` as this node sees it now (`None` if absent or not visible).
    pub fn member(&self, addr: LogicAddr) -> Option<Member> {
        self.inner.view().get(addr).cloned()
    }

    /// Waits until `check` holds for this node's view of member `addr` (`None`: absent or not
    /// visible), up to `timeout`; returns whether it did. For tools and tests that must wait
    /// for a membership change to arrive.
    pub async fn wait_for_member(
        &self,
        addr: LogicAddr,
        check: impl Fn(Option<&Member>) -> bool,
        timeout: Duration,
    ) -> bool {
        let inner = &self.inner;
        wait_until(&inner.view_changed, timeout, || {
            check(inner.view().get(addr))
        })
        .await
    }

    /// Waits until `check` holds for every member this node sees (as [`Node::members`]
    /// returns them), up to `timeout`; returns whether it did. A gateway watches the game
    /// servers it can pick this way; tools wait for a cluster to come up.
    pub async fn wait_members(&self, check: impl Fn(&[Member]) -> bool, timeout: Duration) -> bool {
        wait_until(&self.inner.view_changed, timeout, || check(&self.members())).await
    }

    /// The available members of `node_type` (not harbors) this node sees now, in address
    /// order: those [`Node::get_addr_by_type`] picks from. It copies addresses only, from
    /// the view's index; [`Node::members`] copies every member.
    pub fn available_of_type(&self, node_type: u8) -> Vec<LogicAddr> {
        self.inner.view().of_type(node_type).to_vec()
    }

    /// Waits until `check` holds for [`Node::available_of_type`]`(node_type)`, up to
    /// `timeout`; returns whether it did. It looks at that type's index only: a gateway that
    /// follows its game servers compares their list on each change, not every member.
    pub async fn wait_available_of_type(
        &self,
        node_type: u8,
        check: impl Fn(&[LogicAddr]) -> bool,
        timeout: Duration,
    ) -> bool {
        let inner = &self.inner;
        wait_until(&inner.view_changed, timeout, || {
            check(inner.view().of_type(node_type))
        })
        .await
    }

    /// Whether a link to `peer` is up now.
    pub fn is_linked(&self, peer: LogicAddr) -> bool {
        self.inner
            .links
            .peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&peer)
            .is_some_and(|p| p.is_up())
    }

    /// Waits until a link to `peer` is up or down (`up`), up to `timeout`; returns whether it
    /// got there.
    pub async fn wait_linked(&self, peer: LogicAddr, up: bool, timeout: Duration) -> bool {
        wait_until(&self.inner.links.changed, timeout, || {
            self.is_linked(peer) == up
        })
        .await
    }

    #[cfg(any(test, feature = "admin"))]
    pub(crate) fn inner_arc(&self) -> Arc<Inner> {
        self.inner.clone()
    }

    pub(crate) fn inner_config(&self) -> &crate::NodeConfig {
        &self.inner.config
    }

    /// The node's counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }
}

/// Waits until `cond` holds, re-checking each time `signal` fires, up to `timeout`.
async fn wait_until(
    signal: &tokio::sync::Notify,
    timeout: Duration,
    cond: impl Fn() -> bool,
) -> bool {
    let end = tokio::time::Instant::now() + timeout;
    loop {
        let changed = signal.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if cond() {
            return true;
        }
        if tokio::time::timeout_at(end, changed).await.is_err() {
            return cond();
        }
    }
}
