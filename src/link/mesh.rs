//! A node's links as a whole: the peer slots, the link generations, the dial schedule, and
//! how a link comes up, goes down and is forgotten.
//!
//! The link layer owns this state; the node above it is a [`Host`]: it says who is a member
//! and where, whether it takes links, and answers what a lost link was relaying. Dialing is in
//! `dial` (with the redial schedule), accepting in `accept`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Streaming;
use tonic::transport::Channel;

use super::peer::{ACK_EVERY, AckDue, LinkState, LinkStreams, LinkTokens, Peer};
use super::reader::{self, Deliver};
use super::writer::Writer;
use crate::addr::LogicAddr;
use crate::config::NodeConfig;
use crate::error::RpcError;
use crate::hash::FastMap;
use crate::proto::{Batch, Envelope};
use crate::stats::Stats;

/// What the link layer needs of the node it serves.
pub(crate) trait Host: Deliver {
    /// The node's links.
    fn links(&self) -> &Links<Self::Streams>;
    /// The network address membership lists for `peer`; `None` if it is not a member.
    fn net_addr(&self, peer: LogicAddr) -> Option<String>;
    /// Whether the node takes new links (running: not starting, not shutting down).
    fn accepting(&self) -> bool;
    /// Whether the node is shutting down (a link that ends now ends for that reason).
    fn closing(&self) -> bool;
    /// A fresh slot for peer `addr`.
    fn new_peer(&self, addr: LogicAddr) -> Arc<Peer<Self::Streams>>;
    /// The link to `via` ended under `relayed`: other nodes' requests this node was relaying
    /// there, which must be answered (the node's own callers were failed already).
    fn link_lost(&self, via: LogicAddr, relayed: Vec<Envelope>, error: &RpcError);
}

/// The link-layer state of one node.
pub(crate) struct Links<S> {
    pub(crate) addr: LogicAddr,
    /// Random per start, sent in every hello: a peer tells a restart from a lost link by it.
    pub(crate) incarnation: u64,
    pub(crate) secret: Vec<u8>,
    pub(crate) config: NodeConfig,
    pub(crate) peers: RwLock<FastMap<LogicAddr, Arc<Peer<S>>>>,
    pub(crate) next_gen: AtomicU64,
    /// Signalled when a link comes up or goes down.
    pub(crate) changed: Notify,
    pub(crate) stats: Arc<Stats>,
    /// Cancelled last in shutdown: ends every link and dial.
    pub(crate) root: CancellationToken,
    pub(crate) tracker: TaskTracker,
    /// Set by the links' readers; what the acknowledgement sweep waits for.
    pub(crate) ack_due: Arc<AckDue>,
}

impl<S: LinkStreams> Links<S> {
    pub(crate) fn new(
        addr: LogicAddr,
        config: NodeConfig,
        secret: Vec<u8>,
        stats: Arc<Stats>,
        root: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        Links {
            addr,
            incarnation: fastrand::u64(1..),
            secret,
            config,
            peers: RwLock::new(FastMap::default()),
            next_gen: AtomicU64::new(1),
            changed: Notify::new(),
            stats,
            root,
            tracker,
            ack_due: Default::default(),
        }
    }

    /// The slot of `addr`, if this node has one (no membership check).
    pub(crate) fn peer_slot(&self, addr: LogicAddr) -> Option<Arc<Peer<S>>> {
        self.peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&addr)
            .cloned()
    }

    /// The peers this node has a slot for now.
    pub(crate) fn peer_list(&self) -> Vec<Arc<Peer<S>>> {
        self.peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub(crate) fn next_gen(&self) -> u64 {
        self.next_gen.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn tokens(&self) -> LinkTokens {
        LinkTokens {
            kill: self.root.child_token(),
            close: CancellationToken::new(),
            fault: Default::default(),
            counts: Default::default(),
            ack_due: self.ack_due.clone(),
        }
    }

    pub(crate) fn writer(
        &self,
        peer: &Arc<Peer<S>>,
        tokens: &LinkTokens,
        gate: Option<oneshot::Receiver<()>>,
    ) -> Writer<S> {
        Writer::new(
            peer.clone(),
            self.stats.clone(),
            tokens,
            gate,
            self.config.batch_bytes,
            self.config.batch_envelopes,
        )
    }
}

/// How long a link whose peer closed its side may take to write what is queued and its last
/// acknowledgement; also how long a cut link's writer has to go.
const CLOSE_FLUSH: std::time::Duration = std::time::Duration::from_secs(1);

impl<S: LinkStreams> Links<S> {
    /// The acknowledgement sweep, for the life of the node: [`ACK_EVERY`] after a link's
    /// reader received envelopes, each link whose reader received envelopes its writer has
    /// not told the peer of (it sent nothing since) sends the count in a batch of its own.
    /// Traffic both ways carries the counts in its batches, so under load the sweep finds
    /// nothing to do; one task per node, not a wake per request. A node that receives nothing
    /// sleeps here until it does: idle, its links cost it no periodic wake-ups (there used to
    /// be ten a second per node, traffic or not).
    pub(crate) async fn acknowledge(&self) {
        loop {
            if !self.ack_due.take() {
                tokio::select! {
                    _ = self.root.cancelled() => return,
                    () = self.ack_due.marked() => {}
                }
                continue;
            }
            // Time for the writers to carry the count with traffic of their own.
            tokio::select! {
                _ = self.root.cancelled() => return,
                () = tokio::time::sleep(ACK_EVERY) => {}
            }
            for peer in self.peer_list() {
                if let LinkState::Up { tokens, .. } = &*peer.state() {
                    tokens.counts.ask_ack();
                }
            }
        }
    }
}

/// Starts the reader of link `link_gen`, now up; the link goes down when the reader ends.
pub(crate) fn link_up<H: Host>(
    host: Arc<H>,
    peer: Arc<Peer<H::Streams>>,
    link_gen: u64,
    inbound: Streaming<Batch>,
    tokens: LinkTokens,
    channel: Option<Channel>,
) {
    let links = host.links();
    Stats::incr(&links.stats.links_opened);
    if links.addr.is_harbor() && peer.addr.is_harbor() {
        // Operators watch the links between harbors.
        tracing::info!(node = %links.addr, peer = %peer.addr, link_gen, "harbor link up");
    } else {
        tracing::debug!(peer = %peer.addr, link_gen, "link up");
    }
    links.changed.notify_waiters();
    let span =
        tracing::info_span!(parent: None, "link", node = %links.addr, peer = %peer.addr, link_gen);
    let tracker = links.tracker.clone();
    crate::task::spawn(&tracker, span, async move {
        // Keeps the dialed connection open for the life of the link.
        let _channel = channel;
        let stats = host.links().stats.clone();
        let mine = tokens.clone();
        let why = reader::run(inbound, peer.clone(), tokens, host.clone(), stats.clone()).await;
        if why == reader::PEER_CLOSED {
            // The peer ended its side in order: ours ends in order too, with what is queued
            // and an acknowledgement of all it received, so the peer counts nothing of its
            // own as unconfirmed. Bounded: then it is cut.
            mine.close.cancel();
            mine.counts.writer_gone(CLOSE_FLUSH).await;
        }
        link_down(&*host, &peer, link_gen, &why);
        // What this side wrote that the peer never confirmed may have died with the link:
        // counted once the writer is gone (or had its time), so the count is final.
        mine.kill.cancel();
        mine.counts.writer_gone(CLOSE_FLUSH).await;
        let unconfirmed = mine.counts.unconfirmed();
        if unconfirmed > 0 {
            stats
                .envelopes_unconfirmed
                .fetch_add(unconfirmed, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(peer = %peer.addr, link_gen, unconfirmed, reason = %why, "link ended with envelopes the peer had not confirmed; they may not have arrived");
        }
    });
}

/// Ends link `link_gen` of `peer` (if it is still the current one) and fails what waits on it.
pub(crate) fn link_down<H: Host>(host: &H, peer: &Arc<Peer<H::Streams>>, link_gen: u64, why: &str) {
    let links = host.links();
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
    let error = if host.closing() {
        RpcError::Shutdown { node: links.addr }
    } else {
        RpcError::PeerLost {
            peer: peer.addr,
            cause: why.to_owned(),
        }
    };
    // Under the state lock: a new link or dial cannot start before the old link's
    // leftovers are failed, so nothing meant for the new link is swept away.
    let relayed = peer.fail_all(&error, &links.stats);
    drop(st);
    host.link_lost(peer.addr, relayed, &error);
    Stats::incr(&links.stats.links_closed);
    links.changed.notify_waiters();
    tracing::info!(peer = %peer.addr, reason = why, "link down");
}

/// A peer left membership. A peer that leaves to shut down drains first (its handlers
/// finish, a harbor lets the answers it relays pass), so a link still up is kept until the
/// peer closes it or this node's `shutdown_grace` ends, then the peer is dropped. While
/// kept, the link carries only what is under way: answers (both ways) and streams already
/// open; nothing new is sent to the peer or taken from it. Listed again meanwhile, the
/// peer is dropped at once (the old link may lead to the old process). A peer with no
/// link up is dropped at once.
pub(crate) fn peer_left<H: Host>(host: &Arc<H>, addr: LogicAddr) {
    let links = host.links();
    let Some(peer) = links.peer_slot(addr).filter(|p| p.is_up()) else {
        return drop_peer(&**host, addr, "removed from membership");
    };
    peer.set_leaving();
    let host = host.clone();
    let linger = links.config.shutdown_grace;
    let span = tracing::info_span!("node", node = %links.addr, task = "peer-left", peer = %addr);
    crate::task::spawn(&links.tracker, span, async move {
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
                _ = host.links().root.cancelled() => return,
            }
        }
        // Listed again meanwhile: nothing to drop.
        if host.net_addr(addr).is_none() {
            drop_peer(&*host, addr, "removed from membership");
        }
    });
}

/// Forgets a peer that left membership or moved: closes its link and fails what waits.
pub(crate) fn drop_peer<H: Host>(host: &H, addr: LogicAddr, why: &str) {
    let links = host.links();
    let Some(peer) = links
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
        Stats::incr(&links.stats.links_closed);
    }
    peer.set_state(&mut st, LinkState::Closed);
    let error = RpcError::PeerLost {
        peer: addr,
        cause: why.to_owned(),
    };
    let relayed = peer.fail_all(&error, &links.stats);
    drop(st);
    host.link_lost(peer.addr, relayed, &error);
    links.changed.notify_waiters();
    tracing::info!(peer = %addr, reason = why, "peer dropped");
}
