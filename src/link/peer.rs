//! One peer: its bounded queue, the calls waiting on it, and the state of its link.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::addr::LogicAddr;
use crate::error::{RpcError, StreamError};
use crate::hash::FastMap;
use crate::proto::{Envelope, envelope::Body};
use crate::stats::Stats;

/// An envelope waiting in a peer's queue, with the time after which it is useless (`None`:
/// it is written whenever the link gets to it).
#[derive(Debug)]
pub(crate) struct Outbound {
    pub(crate) env: Envelope,
    pub(crate) deadline: Option<Instant>,
}

/// How a call ended, as far as the link knows; the caller turns it into an [`RpcError`]
/// with its own context.
#[derive(Debug)]
pub(crate) enum Outcome {
    Reply(Bytes),
    Remote { code: u32, message: String },
    Failed(RpcError),
}

/// The cancellation handles of one link.
#[derive(Debug, Clone, Default)]
pub(crate) struct LinkTokens {
    /// Ends the link now.
    pub(crate) kill: CancellationToken,
    /// Ends the link once the queue is empty.
    pub(crate) close: CancellationToken,
    /// Why the peer broke the protocol, if it did: the acceptor ends the call with this
    /// status instead of OK, so the dialer can tell why its link ended.
    pub(crate) fault: Arc<std::sync::OnceLock<tonic::Status>>,
    /// What each side of the link wrote and what the other confirmed.
    pub(crate) counts: Arc<LinkCounts>,
    /// The node's: told when the link's reader received envelopes.
    pub(crate) ack_due: Arc<AckDue>,
}

/// Whether any of a node's links received envelopes since its acknowledgement sweep last
/// looked. The sweep sleeps on it, so a node without traffic does no periodic work for its
/// links (their keepalives aside).
#[derive(Debug, Default)]
pub(crate) struct AckDue {
    pending: std::sync::atomic::AtomicBool,
    wake: tokio::sync::Notify,
}

impl AckDue {
    /// A reader received envelopes (after counting them).
    pub(crate) fn mark(&self) {
        use std::sync::atomic::Ordering::{AcqRel, Relaxed};
        // Under load it is set already: a load, no write to the shared line.
        if !self.pending.load(Relaxed) && !self.pending.swap(true, AcqRel) {
            self.wake.notify_one();
        }
    }

    /// Takes the mark: whether anything was received since the last take.
    pub(crate) fn take(&self) -> bool {
        self.pending
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    /// Waits for the next mark (at once if one came since the last take).
    pub(crate) async fn marked(&self) {
        self.wake.notified().await
    }
}

/// How often a side that received envelopes and has sent nothing since tells the other side
/// so (its own batches carry the count anyway).
pub(crate) const ACK_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Delivery accounting of one link. Each side counts the envelopes it received and tells the
/// other in its batches ([`Batch::received`](crate::proto::Batch::received)); when the link
/// ends, what this side wrote past the last count the peer confirmed is counted as
/// unconfirmed (it may or may not have arrived), so nothing a dead link swallows goes
/// uncounted.
#[derive(Debug, Default)]
pub(crate) struct LinkCounts {
    /// Envelopes this side wrote on the link.
    pub(crate) written: std::sync::atomic::AtomicU64,
    /// The most the peer said it received.
    pub(crate) confirmed: std::sync::atomic::AtomicU64,
    /// Envelopes this side's reader received.
    pub(crate) received: std::sync::atomic::AtomicU64,
    /// The count this side's writer last told the peer.
    pub(crate) told: std::sync::atomic::AtomicU64,
    /// The node's acknowledgement sweep asks the writer for an acknowledgement-only batch.
    pub(crate) asked: std::sync::atomic::AtomicBool,
    /// Whether the peer acknowledges (it said so in the handshake): without it, nothing it
    /// left unconfirmed is counted.
    pub(crate) peer_acks: std::sync::atomic::AtomicBool,
    /// Set when the link's writer is gone: nothing more is written.
    pub(crate) writer_done: std::sync::atomic::AtomicBool,
    /// Signalled when the writer is gone.
    pub(crate) writer_gone: tokio::sync::Notify,
    /// The writer, woken by the sweep.
    pub(crate) writer: futures_util::task::AtomicWaker,
}

impl LinkCounts {
    /// Waits up to `limit` for the link's writer to be gone (so `written` is final).
    pub(crate) async fn writer_gone(&self, limit: Duration) -> bool {
        use std::sync::atomic::Ordering::Acquire;
        let gone = async {
            loop {
                let n = self.writer_gone.notified();
                tokio::pin!(n);
                n.as_mut().enable();
                if self.writer_done.load(Acquire) {
                    return;
                }
                n.await;
            }
        };
        tokio::time::timeout(limit, gone).await.is_ok()
    }

    /// Asks the writer to acknowledge what the reader received, if the peer has not been told.
    pub(crate) fn ask_ack(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.received.load(Relaxed) != self.told.load(Relaxed) {
            self.asked.store(true, Relaxed);
            self.writer.wake();
        }
    }

    /// Envelopes written that the peer has not confirmed.
    pub(crate) fn unconfirmed(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.peer_acks.load(Relaxed) {
            return 0;
        }
        self.written
            .load(Relaxed)
            .saturating_sub(self.confirmed.load(Relaxed))
    }
}

/// What a link needs of the streams it carries. The stream layer implements it (its table of
/// one peer's streams), so links know streams only as a source of frames that ends with them.
pub(crate) trait LinkStreams: Send + Sync + 'static {
    /// Appends the frames of one stream that has something to send and returns the bytes
    /// appended; `None` when none has (the waker is registered, unless `killed` is cancelled:
    /// checked under the lock the waker is registered under, because the streams are the
    /// peer's and a writer killed for a new link must not take the registration from the new
    /// link's writer).
    fn pull_ready(
        &self,
        cx: &std::task::Context<'_>,
        out: &mut Vec<Envelope>,
        killed: &tokio_util::sync::CancellationToken,
    ) -> Option<usize>;
    /// The link ended: fails every stream on it.
    fn fail_all(&self, error: &StreamError);
    /// A new link is up: streams may be opened on it again.
    fn reopen(&self);
}

#[derive(Debug)]
pub(crate) enum LinkState {
    /// No link. A send before `retry_at` (the redial backoff after a failed dial) waits for
    /// a dial scheduled then, within its own deadline.
    Idle {
        retry_at: Option<Instant>,
        backoff: Duration,
    },
    Dialing {
        link_gen: u64,
        /// The dial waits for the end of the redial backoff (or for membership to say the peer
        /// changed). While it waits, a link the peer dials is taken (there is no dial of ours
        /// in flight to keep).
        until: Option<Instant>,
    },
    Up {
        link_gen: u64,
        tokens: LinkTokens,
        dialed: bool,
        incarnation: u64,
        /// When the link came up.
        since: Instant,
    },
    /// The peer left membership or the node shut down; the slot is dead.
    Closed,
}

impl LinkState {
    pub(crate) fn idle() -> Self {
        LinkState::Idle {
            retry_at: None,
            backoff: Duration::ZERO,
        }
    }
}

pub(crate) struct Peer<S> {
    pub(crate) addr: LogicAddr,
    tx: mpsc::Sender<Outbound>,
    rx: Mutex<mpsc::Receiver<Outbound>>,
    capacity: usize,
    /// Calls waiting for an answer, by call id: who must answer, and the caller.
    pending: Mutex<FastMap<u64, (LogicAddr, oneshot::Sender<Outcome>)>>,
    state: Mutex<LinkState>,
    /// Mirrors `state` being `Up`: the send path reads it without the lock.
    up: AtomicBool,
    /// The peer left membership; its link is kept only for what is already under way.
    leaving: AtomicBool,
    /// Envelopes of other nodes this node (a harbor) relayed toward this peer.
    pub(crate) relayed: std::sync::atomic::AtomicU64,
    /// Envelopes of other nodes not relayed toward this peer because its queue was full.
    pub(crate) relay_queue_full: std::sync::atomic::AtomicU64,
    /// RPC handlers running here for this peer's own requests (its fair share is capped).
    pub(crate) serving: std::sync::atomic::AtomicUsize,
    /// Signalled on every state change.
    pub(crate) changed: Notify,
    /// Ends a dial's wait for the redial backoff: membership says the peer changed.
    pub(crate) redial_now: Notify,
    /// Set with `redial_now`, so a change that comes before the wait starts is not missed.
    pub(crate) redial_hint: AtomicBool,
    /// The streams with this peer; they end with its link.
    pub(crate) streams: S,
    /// When the link to this peer last failed (dropped, or a dial failed); cleared when a
    /// link comes up. Routing passes over a harbor that failed moments ago.
    failed_at: Mutex<Option<Instant>>,
}

impl<S> std::fmt::Debug for Peer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here panics while holding a lock; if it ever did, the data is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<S: LinkStreams> Peer<S> {
    pub(crate) fn new(addr: LogicAddr, capacity: usize, streams: S) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(capacity);
        Arc::new(Peer {
            addr,
            tx,
            rx: Mutex::new(rx),
            capacity,
            pending: Mutex::new(FastMap::default()),
            state: Mutex::new(LinkState::idle()),
            up: AtomicBool::new(false),
            leaving: AtomicBool::new(false),
            serving: Default::default(),
            relayed: Default::default(),
            relay_queue_full: Default::default(),
            changed: Notify::new(),
            redial_now: Notify::new(),
            redial_hint: AtomicBool::new(false),
            streams,
            failed_at: Mutex::new(None),
        })
    }

    /// Envelopes waiting in the queue now.
    pub(crate) fn queued(&self) -> usize {
        self.capacity.saturating_sub(self.tx.capacity())
    }

    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Whether the peer left membership (its link, if up, is kept for answers and streams
    /// under way, nothing new).
    pub(crate) fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::Acquire)
    }

    pub(crate) fn set_leaving(&self) {
        self.leaving.store(true, Ordering::Release);
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, LinkState> {
        lock(&self.state)
    }

    /// Envelopes written on the current link that the peer has not confirmed (0 without a
    /// link).
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) fn unconfirmed(&self) -> u64 {
        match &*self.state() {
            LinkState::Up { tokens, .. } => tokens.counts.unconfirmed(),
            _ => 0,
        }
    }

    /// Replaces the state; the caller holds the guard from [`Peer::state`].
    pub(crate) fn set_state(&self, guard: &mut MutexGuard<'_, LinkState>, next: LinkState) {
        self.up
            .store(matches!(next, LinkState::Up { .. }), Ordering::Release);
        if matches!(next, LinkState::Dialing { .. } | LinkState::Up { .. }) {
            self.streams.reopen();
        }
        if matches!(next, LinkState::Up { .. }) {
            *lock(&self.failed_at) = None;
        }
        **guard = next;
        self.changed.notify_waiters();
    }

    pub(crate) fn rx(&self) -> MutexGuard<'_, mpsc::Receiver<Outbound>> {
        lock(&self.rx)
    }

    /// Queues without waiting; on failure the item comes back with the error.
    #[allow(clippy::result_large_err)]
    pub(crate) fn try_enqueue(&self, item: Outbound) -> Result<(), (RpcError, Outbound)> {
        self.tx.try_send(item).map_err(|e| match e {
            mpsc::error::TrySendError::Full(item) => (
                RpcError::QueueFull {
                    peer: self.addr,
                    capacity: self.capacity,
                },
                item,
            ),
            // The receiver lives as long as the peer, so the channel cannot close.
            mpsc::error::TrySendError::Closed(item) => (
                RpcError::PeerLost {
                    peer: self.addr,
                    cause: "queue closed".into(),
                },
                item,
            ),
        })
    }

    /// Queues a stream close or refusal without waiting. On a full queue it is dropped, counted
    /// in `closes_dropped` and logged (gated): the far end then learns of the end only at its
    /// own timeout, which is why it is counted.
    pub(crate) fn try_send_close(&self, env: Envelope, stats: &Stats) {
        static DROPPED: crate::gate::LogGate = crate::gate::LogGate::new();
        if let Err((e, _)) = self.try_enqueue(Outbound {
            env,
            deadline: None,
        }) {
            Stats::incr(&stats.closes_dropped);
            if let Some(held) = DROPPED.pass() {
                tracing::warn!(peer = %self.addr, error = %e, held_back = held, "a stream close was dropped; the far end will time out instead");
            }
        }
    }

    /// Queues, waiting for room until the item's deadline (or for `wait` if it has none).
    pub(crate) async fn enqueue(&self, item: Outbound, wait: Duration) -> Result<(), RpcError> {
        let item = match self.try_enqueue(item) {
            Ok(()) => return Ok(()),
            Err((RpcError::QueueFull { .. }, item)) => item,
            Err((e, _)) => return Err(e),
        };
        let deadline = item.deadline.unwrap_or_else(|| Instant::now() + wait);
        match tokio::time::timeout_at(deadline, self.tx.reserve()).await {
            Ok(Ok(permit)) => {
                permit.send(item);
                Ok(())
            }
            Ok(Err(_)) => Err(RpcError::PeerLost {
                peer: self.addr,
                cause: "queue closed".into(),
            }),
            Err(_) => Err(RpcError::QueueFull {
                peer: self.addr,
                capacity: self.capacity,
            }),
        }
    }

    /// Registers call `id`, to be answered by `responder`.
    pub(crate) fn add_pending(&self, id: u64, responder: LogicAddr, tx: oneshot::Sender<Outcome>) {
        lock(&self.pending).insert(id, (responder, tx));
    }

    /// Takes call `id` whoever answers (the caller gave up, or the call failed here).
    pub(crate) fn take_pending(&self, id: u64) -> Option<oneshot::Sender<Outcome>> {
        lock(&self.pending).remove(&id).map(|(_, tx)| tx)
    }

    /// Takes call `id` for an answer from `from`: only the node that was called may answer it,
    /// or — when `harbor_error` (a `NO_ROUTE`, `PEER_LOST` or `HOP_BUSY` error) — a harbor on the path
    /// reporting why the call cannot reach it. Anyone else's answer leaves the call waiting.
    pub(crate) fn take_answer(
        &self,
        id: u64,
        from: LogicAddr,
        harbor_error: bool,
    ) -> Option<oneshot::Sender<Outcome>> {
        let mut pending = lock(&self.pending);
        match pending.get(&id) {
            Some((responder, _)) if *responder == from || (harbor_error && from.is_harbor()) => {
                pending.remove(&id).map(|(_, tx)| tx)
            }
            _ => None,
        }
    }

    /// Whether the link to this peer failed within `window`, or failed earlier and is being
    /// dialed again now (only the traffic that started that dial waits on it).
    pub(crate) fn failed_within(&self, window: Duration) -> bool {
        let Some(at) = *lock(&self.failed_at) else {
            return false;
        };
        at.elapsed() < window || matches!(*self.state(), LinkState::Dialing { .. })
    }

    /// Fails every waiting call and stream, and drops everything queued, counting what is lost.
    /// Returns the queued requests of other nodes' callers (relayed through this node), so
    /// the caller can answer them once it holds no lock.
    #[must_use = "relayed requests must be answered"]
    pub(crate) fn fail_all(&self, error: &RpcError, stats: &Stats) -> Vec<Envelope> {
        *lock(&self.failed_at) = Some(Instant::now());
        self.streams
            .fail_all(&StreamError::from_link(error.clone(), self.addr));
        let waiting: Vec<_> = lock(&self.pending).drain().map(|(_, (_, tx))| tx).collect();
        for tx in waiting {
            // A caller that gave up already has dropped its receiver; nothing to tell it.
            let _ = tx.send(Outcome::Failed(error.clone()));
        }
        let mut relayed = Vec::new();
        let mut rx = self.rx();
        while let Ok(item) = rx.try_recv() {
            match &item.env.body {
                // Our own callers were failed above, through `pending`.
                Some(Body::Request(r)) if r.oneway => Stats::incr(&stats.envelopes_lost),
                Some(Body::Request(_)) => relayed.push(item.env),
                _ => Stats::incr(&stats.envelopes_lost),
            }
        }
        relayed
    }

    /// Fails one queued item that expired before it could be written.
    pub(crate) fn expire(&self, item: Outbound, stats: &Stats) {
        Stats::incr(&stats.envelopes_expired);
        if let Some(Body::Request(req)) = &item.env.body {
            if let Some(tx) = self.take_pending(req.id) {
                let _ = tx.send(Outcome::Failed(RpcError::Timeout {
                    to: self.addr,
                    method: req.method.clone(),
                    after: Duration::ZERO,
                }));
            }
        } else {
            tracing::debug!(peer = %self.addr, "envelope expired in the queue before it could be sent");
        }
    }
}
