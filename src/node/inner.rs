//! The node's shared state and its send path.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::addr::LogicAddr;
use crate::config::NodeConfig;
use crate::error::RpcError;
use crate::hash::FastMap;
use crate::link::{Host, Links};
use crate::membership::Discovery;
use crate::membership::view::View;
use crate::message::MsgHandlers;
use crate::proto::{Envelope, envelope::Body};
use crate::router::{self, NextHop, RouteError};
use crate::rpc::{RpcHandler, ServerShared};
use crate::stats::Stats;
use crate::stream::{self, Live};
use crate::stream::{Peer, Table};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Phase {
    Created = 0,
    Starting = 1,
    Running = 2,
    Draining = 3,
    Closed = 4,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Created,
            1 => Phase::Starting,
            2 => Phase::Running,
            3 => Phase::Draining,
            _ => Phase::Closed,
        }
    }
}

/// What the builder registered.
pub(crate) struct Handlers {
    pub(crate) rpcs: FastMap<String, RpcHandler>,
    pub(crate) messages: MsgHandlers,
    pub(crate) stream_handler: Option<crate::stream::StreamHandler>,
    /// Registrations made twice, named; a non-empty list fails the start.
    pub(crate) duplicates: Vec<String>,
    /// The layers of a harbor's relay stack, if any.
    pub(crate) relay_layers: Option<crate::router::stack::RelayLayerFn>,
    /// The player sessions it serves, if it serves them (see `NodeBuilder::on_session`).
    pub(crate) sessions: Option<Arc<crate::session::Sessions>>,
}

pub(crate) struct Inner {
    pub(crate) addr: LogicAddr,
    pub(crate) config: NodeConfig,
    pub(crate) dev_secret: bool,
    /// The handlers by method, each with its slot in the server's call metrics.
    pub(crate) rpcs: FastMap<String, (RpcHandler, usize)>,
    pub(crate) messages: MsgHandlers,
    pub(crate) stream_handler: Option<crate::stream::StreamHandler>,
    /// The player sessions it serves, if it serves them.
    pub(crate) sessions: Option<Arc<crate::session::Sessions>>,
    pub(crate) duplicates: Vec<String>,
    pub(crate) discovery: Arc<dyn Discovery>,
    phase: AtomicU8,
    pub(crate) view: RwLock<Arc<View>>,
    /// Peers and their links (the link layer's state).
    pub(crate) links: Links<Table>,
    pub(crate) self_peer: Arc<Peer>,
    pub(crate) server: Arc<ServerShared>,
    pub(crate) stats: Arc<Stats>,
    /// Streams open on all peers; shutdown waits for them to close.
    pub(crate) live_streams: Arc<Live>,
    /// A harbor's books of the calls and streams it relays.
    pub(crate) relays: crate::router::relays::Relays,
    next_id: AtomicU64,
    /// Keys that turn `next_id` into call ids.
    call_ids: crate::hash::SipKey,
    /// Cancelled last in shutdown: ends every task and link.
    pub(crate) root: CancellationToken,
    /// Cancelled first in shutdown: stops accepting connections.
    pub(crate) accept_stop: CancellationToken,
    /// Cancelled in shutdown once the node has left membership: its player sessions end.
    pub(crate) sessions_stop: CancellationToken,
    /// Cancelled at the start of shutdown: stops keeping this node alive in membership.
    pub(crate) liveness_stop: CancellationToken,
    /// The membership source keeps this node alive (it can tell peers that the node leaves).
    pub(crate) has_liveness: std::sync::atomic::AtomicBool,
    /// Set once a shutdown has left membership and waited for quiet: from then on, new
    /// requests, streams and links are refused (see [`Inner::takes_new`]).
    pub(crate) refusing: std::sync::atomic::AtomicBool,
    pub(crate) tracker: TaskTracker,
    pub(crate) closed: watch::Sender<bool>,
    pub(crate) listener: Mutex<Option<std::net::TcpListener>>,
    pub(crate) local_addr: OnceLock<std::net::SocketAddr>,
    /// Signalled when the view changes.
    pub(crate) view_changed: Notify,
    /// Signalled when the phase changes.
    pub(crate) phase_changed: Notify,
    /// A harbor's relay stack, built on first use (see `stack`).
    pub(crate) relay: Mutex<Option<crate::router::stack::RelayService>>,
    pub(crate) relay_layers: Option<crate::router::stack::RelayLayerFn>,
    /// Relay futures running on tasks of their own (layers that wait).
    pub(crate) relay_in_flight: std::sync::atomic::AtomicUsize,
    /// The harbor each active pair of nodes takes.
    pub(crate) sticky: router::StickyPaths,
    /// Durations of the calls this node makes, by method and outcome.
    pub(crate) client_calls: crate::metrics::ClientCalls,
}

impl Inner {
    pub(crate) fn new(
        addr: LogicAddr,
        config: NodeConfig,
        discovery: Arc<dyn Discovery>,
        listener: Option<std::net::TcpListener>,
        handlers: Handlers,
    ) -> Arc<Self> {
        let Handlers {
            rpcs,
            messages,
            stream_handler,
            duplicates,
            relay_layers,
            sessions,
        } = handlers;
        let (secret, dev_secret) = config.resolve_secret();
        let calls = crate::metrics::ServerCalls::new(rpcs.keys());
        let rpcs = rpcs
            .into_iter()
            .map(|(m, h)| {
                let slot = calls.slot(&m);
                (m, (h, slot))
            })
            .collect();
        let stats = Arc::new(Stats::default());
        let root = CancellationToken::new();
        let tracker = TaskTracker::new();
        let server = Arc::new(ServerShared {
            addr,
            inflight: Default::default(),
            limit: config.max_concurrent_requests,
            per_caller: config.max_requests_per_caller,
            remote_serving: Default::default(),
            drained: Notify::new(),
            max_envelope: config.max_envelope,
            send_timeout: config.send_timeout,
            waiting_replies: Default::default(),
            tracker: tracker.clone(),
            stats: stats.clone(),
            runtime: OnceLock::new(),
            cancel: root.clone(),
            calls: config.call_metrics.then_some(calls),
        });
        let live_streams = Arc::new(Live {
            stats: stats.clone(),
            idle: Notify::new(),
            next_id: std::sync::atomic::AtomicU64::new(1),
        });
        let links = Links::new(
            addr,
            config.clone(),
            secret,
            stats.clone(),
            root.clone(),
            tracker.clone(),
        );
        Arc::new(Inner {
            addr,
            self_peer: Peer::new(
                addr,
                config.peer_queue.max(1),
                stream::Table::new(live_streams.clone(), 0, 0),
            ),
            live_streams,
            relays: crate::router::relays::Relays::new(
                config.peer_queue.saturating_mul(8),
                config.max_streams.saturating_mul(8),
            ),
            config,
            links,
            dev_secret,
            rpcs,
            messages,
            stream_handler,
            sessions,
            duplicates,
            discovery,
            phase: AtomicU8::new(Phase::Created as u8),
            view: RwLock::new(Arc::new(View::default())),
            server,
            stats,
            next_id: AtomicU64::new(1),
            call_ids: crate::hash::SipKey::random(),
            root,
            accept_stop: CancellationToken::new(),
            sessions_stop: CancellationToken::new(),
            liveness_stop: CancellationToken::new(),
            has_liveness: Default::default(),
            refusing: Default::default(),
            tracker,
            closed: watch::channel(false).0,
            listener: Mutex::new(listener),
            local_addr: OnceLock::new(),
            view_changed: Notify::new(),
            phase_changed: Notify::new(),
            relay: Mutex::new(None),
            relay_layers,
            relay_in_flight: Default::default(),
            sticky: Default::default(),
            client_calls: Default::default(),
        })
    }

    /// Whether new requests, streams and links are taken: while running, and in a shutdown
    /// until the node has left membership and waited for quiet (peers may not have seen it
    /// leave yet).
    pub(crate) fn takes_new(&self) -> bool {
        match self.phase() {
            Phase::Running => true,
            Phase::Draining => !self.refusing.load(std::sync::atomic::Ordering::Acquire),
            _ => false,
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    pub(crate) fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Release);
        self.phase_changed.notify_waiters();
    }

    /// Moves from `from` to `to`; false if the phase was not `from`.
    pub(crate) fn transition(&self, from: Phase, to: Phase) -> bool {
        let moved = self
            .phase
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if moved {
            self.phase_changed.notify_waiters();
        }
        moved
    }

    pub(crate) fn view(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether this node may send. While draining it still may: handlers finishing within
    /// the grace period often call out (a game server saving a player to a database node).
    /// New requests *to* a draining node are refused instead.
    pub(crate) fn check_running(&self) -> Result<(), RpcError> {
        match self.phase() {
            Phase::Running | Phase::Draining => Ok(()),
            Phase::Created | Phase::Starting => Err(RpcError::NotStarted { node: self.addr }),
            Phase::Closed => Err(RpcError::Shutdown { node: self.addr }),
        }
    }

    pub(crate) fn check_size(&self, len: usize) -> Result<(), RpcError> {
        if len > self.config.max_envelope {
            return Err(RpcError::TooLarge {
                size: len,
                limit: self.config.max_envelope,
            });
        }
        Ok(())
    }

    /// A call id no other node can guess: a counter through SipHash under this node's random
    /// keys. (Unique in practice: two calls in flight share an id with odds of ~2^-64.)
    pub(crate) fn next_call_id(&self) -> u64 {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        // 0 marks a one-way request.
        self.call_ids.hash(&n.to_le_bytes()).max(1)
    }

    /// The peer slot of the next hop toward `to`: `to` itself in this cluster (created on
    /// first use for a member this node may see), a harbor for another cluster.
    pub(crate) fn peer_for(&self, to: LogicAddr) -> Result<Arc<Peer>, RpcError> {
        self.peer_keyed(to, router::route_key(self.addr, to))
    }

    fn peer_keyed(&self, to: LogicAddr, key: u64) -> Result<Arc<Peer>, RpcError> {
        if to == self.addr {
            return Ok(self.self_peer.clone());
        }
        // The send path's common case: a direct neighbour, no view to consult.
        if to.cluster() == self.addr.cluster() {
            return self.link_peer(to);
        }
        let hop = self.next_hop_keyed(to, key).map_err(|e| match e {
            RouteError::NoRoute { reason, .. } => RpcError::NoRoute { to, reason },
            other => RpcError::NoRoute {
                to,
                reason: other.to_string(),
            },
        })?;
        self.link_peer(hop.addr())
    }

    /// The next hop toward `to`, harbors picked by `key`; harbors whose link failed moments ago
    /// are passed over while another one is available.
    pub(crate) fn next_hop_keyed(&self, to: LogicAddr, key: u64) -> Result<NextHop, RouteError> {
        let view = self.view();
        if to.cluster() == self.addr.cluster() || (self.addr.is_harbor() && to.is_harbor()) {
            return Ok(NextHop::Direct(to));
        }
        // An active pair stays on its harbor (see `StickyPaths`): order through harbors holds
        // when a harbor joins.
        let cluster = if self.addr.is_harbor() {
            to.cluster()
        } else {
            self.addr.cluster()
        };
        self.sticky.pick(
            key,
            |h| view.has_harbor(cluster, h) && !self.failed_recently(h),
            || router::next_hop(self.addr, to, key, &view, &|h| self.failed_recently(h)),
        )
    }

    /// Whether the link to `addr` failed (dropped, or a dial failed) within the longest redial
    /// backoff plus a dial timeout and has not come back since, or is being redialed after a
    /// failure: routing passes over such a harbor while another is available. After the window
    /// the next envelope for it tries it again (and only that one waits on the dial).
    fn failed_recently(&self, addr: LogicAddr) -> bool {
        let peers = self.links.peers.read().unwrap_or_else(|e| e.into_inner());
        // Long enough to cover a dial that hangs, so an unresponsive harbor is not tried
        // again while the last try may still be waiting.
        let window = self.config.redial_backoff_max + self.config.dial_timeout;
        peers.get(&addr).is_some_and(|p| p.failed_within(window))
    }

    /// The slot of neighbour `to` (a node this one links to directly).
    pub(crate) fn link_peer(&self, to: LogicAddr) -> Result<Arc<Peer>, RpcError> {
        if let Some(p) = self
            .links
            .peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&to)
        {
            // A peer that left membership gets nothing new; its answers go by `answer_path`.
            if p.is_leaving() {
                return Err(RpcError::NoRoute {
                    to,
                    reason: format!("it left {}'s membership", self.addr),
                });
            }
            return Ok(p.clone());
        }
        if self.view().get(to).is_none() {
            return Err(RpcError::NoRoute {
                to,
                reason: format!("not in {}'s membership", self.addr),
            });
        }
        let mut peers = self.links.peers.write().unwrap_or_else(|e| e.into_inner());
        Ok(peers.entry(to).or_insert_with(|| self.new_peer(to)).clone())
    }

    /// A fresh slot for peer `addr`.
    pub(crate) fn new_peer(&self, addr: LogicAddr) -> Arc<Peer> {
        Peer::new(
            addr,
            self.config.peer_queue,
            stream::Table::new(
                self.live_streams.clone(),
                self.config.max_streams,
                self.config.max_stream_meta_per_peer,
            ),
        )
    }

    pub(crate) fn envelope(&self, to: LogicAddr, body: Body) -> Envelope {
        Envelope::originate(to.as_u32(), self.addr.as_u32(), body)
    }

    /// If the link went down between `link::ensure_link` and queueing, what was just queued
    /// would wait for some later send to dial; dial now instead.
    pub(crate) fn after_enqueue(self: &Arc<Self>, peer: &Arc<Peer>) {
        if !peer.is_up() {
            // A failure here (backoff, left membership) has already failed the queue.
            let _ = crate::link::ensure_link(self, peer);
        }
    }

    /// The deadline of a one-way item: none while the link is up (the writer is draining the
    /// queue, and reading the clock per message is measurable), `send_timeout` from now while
    /// the link is being dialed.
    pub(crate) fn oneway_deadline(&self, peer: &Peer) -> Option<Instant> {
        (!peer.is_up()).then(|| Instant::now() + self.config.send_timeout)
    }
}

impl Host for Inner {
    fn links(&self) -> &Links<Table> {
        &self.links
    }

    fn net_addr(&self, peer: LogicAddr) -> Option<String> {
        self.view().get(peer).map(|m| m.net_addr.clone())
    }

    fn accepting(&self) -> bool {
        self.takes_new()
    }

    fn closing(&self) -> bool {
        matches!(self.phase(), Phase::Draining | Phase::Closed)
    }

    fn new_peer(&self, addr: LogicAddr) -> Arc<Peer> {
        Inner::new_peer(self, addr)
    }

    fn link_lost(&self, via: LogicAddr, relayed: Vec<Envelope>, error: &RpcError) {
        self.bounce(via, relayed, error)
    }
}

/// The caller's side of RPC sends through the node.
impl crate::rpc::caller::Sender for Arc<Inner> {
    fn path_for_call(&self, to: LogicAddr, len: usize) -> Result<Arc<Peer>, RpcError> {
        self.check_running()?;
        self.check_size(len)?;
        let peer = self.peer_for(to)?;
        crate::link::ensure_link(self, &peer)?;
        Ok(peer)
    }

    fn call_id(&self) -> u64 {
        self.next_call_id()
    }

    fn envelope(&self, to: LogicAddr, body: Body) -> Envelope {
        Inner::envelope(self, to, body)
    }

    fn queued(&self, peer: &Arc<Peer>) {
        self.after_enqueue(peer)
    }

    fn timed(&self) -> bool {
        self.config.call_metrics
    }

    fn record_call(
        &self,
        method: &str,
        outcome: crate::metrics::Outcome,
        took: std::time::Duration,
    ) {
        self.client_calls.record(method, outcome, took)
    }
}
