//! The streams between this node and one peer, and the queue of those with something to send.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

use super::shared::Shared;
use crate::error::StreamError;
use crate::hash::FastMap;
use crate::stats::Stats;

/// Node-wide: how many streams are open, and a signal when that reaches zero (shutdown waits
/// for it).
#[derive(Debug)]
pub(crate) struct Live {
    pub(crate) stats: Arc<Stats>,
    pub(crate) idle: Notify,
    /// Numbers for the streams this node opens, unique across all its links: harbors and
    /// targets know a stream by (opener, number), whichever harbor it went through.
    pub(crate) next_id: std::sync::atomic::AtomicU64,
}

impl Live {
    pub(crate) fn active(&self) -> u64 {
        self.stats.streams_active.load(Ordering::Acquire)
    }
}

/// Why a stream could not be added.
#[derive(Debug)]
pub(crate) enum AddError {
    Full {
        limit: usize,
    },
    /// The metadata of the streams the peer opened would pass the per-peer limit.
    MetaFull {
        limit: usize,
    },
    Duplicate,
    /// The link these streams lived on failed, and no new one is up or being dialed.
    Closed,
}

pub(crate) struct Table {
    streams: Mutex<Streams>,
    /// Streams with something to send, each at most once (its `queued` flag), so the queue
    /// never holds more entries than there are streams: bounded by `max_streams` plus streams
    /// that just ended and wait to send their last envelope.
    ready: Mutex<VecDeque<Arc<Shared>>>,
    /// The writer of the link that is up, waiting for a ready stream.
    writer: AtomicWaker,
    live: Arc<Live>,
    max: usize,
    /// Bytes of metadata the streams the peer opened may hold in all.
    max_meta: usize,
}

struct Streams {
    /// Bytes of metadata held for the streams the peer opened.
    meta_bytes: usize,
    map: FastMap<(u32, u64), Arc<Shared>>,
    /// Cleared when the streams are failed (the link went down), set again when a link is
    /// dialed or admitted. Both happen under the peer's link-state lock, so a stream added
    /// here is either failed with the others or belongs to the next link, never stranded
    /// (e.g. an open delivered by a dying link's reader after its streams were failed).
    open: bool,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("streams", &self.lock().map.len())
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl Table {
    pub(crate) fn new(live: Arc<Live>, max: usize, max_meta: usize) -> Self {
        Table {
            streams: Mutex::new(Streams {
                meta_bytes: 0,
                map: FastMap::default(),
                open: false,
            }),
            ready: Mutex::new(VecDeque::new()),
            writer: AtomicWaker::new(),
            live,
            max,
            max_meta,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Streams> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a stream this node opens, numbered here.
    pub(crate) fn add_opened<T>(
        &self,
        make: impl FnOnce(u64) -> (Arc<Shared>, T),
    ) -> Result<(Arc<Shared>, T), AddError> {
        let mut s = self.lock();
        if !s.open {
            return Err(AddError::Closed);
        }
        if s.map.len() >= self.max {
            return Err(AddError::Full { limit: self.max });
        }
        let id = self.live.next_id.fetch_add(1, Ordering::Relaxed);
        let (stream, extra) = make(id);
        s.map.insert(stream.key(), stream.clone());
        self.live
            .stats
            .streams_active
            .fetch_add(1, Ordering::AcqRel);
        Ok((stream, extra))
    }

    /// Adds a stream the peer opened.
    pub(crate) fn add_accepted(&self, stream: &Arc<Shared>) -> Result<(), AddError> {
        let mut s = self.lock();
        if !s.open {
            return Err(AddError::Closed);
        }
        if s.map.contains_key(&stream.key()) {
            return Err(AddError::Duplicate);
        }
        if s.map.len() >= self.max {
            return Err(AddError::Full { limit: self.max });
        }
        let meta = stream.meta.size();
        if s.meta_bytes + meta > self.max_meta {
            return Err(AddError::MetaFull {
                limit: self.max_meta,
            });
        }
        s.meta_bytes += meta;
        s.map.insert(stream.key(), stream.clone());
        self.live
            .stats
            .streams_active
            .fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    pub(crate) fn get(&self, key: (u32, u64)) -> Option<Arc<Shared>> {
        self.lock().map.get(&key).cloned()
    }

    /// Takes `stream` out (if it is still the one under its key).
    pub(crate) fn remove(&self, stream: &Arc<Shared>) {
        let mut s = self.lock();
        let key = stream.key();
        if s.map.get(&key).is_some_and(|x| Arc::ptr_eq(x, stream)) {
            s.map.remove(&key);
            if !stream.opened_here {
                s.meta_bytes -= stream.meta.size();
            }
            drop(s);
            self.forget_one();
        }
    }

    fn forget_one(&self) {
        if self
            .live
            .stats
            .streams_active
            .fetch_sub(1, Ordering::AcqRel)
            == 1
        {
            self.live.idle.notify_waiters();
        }
    }

    /// Every stream open now.
    pub(crate) fn all(&self) -> Vec<Arc<Shared>> {
        self.lock().map.values().cloned().collect()
    }

    /// Accepts streams again: a link is being dialed or was admitted.
    pub(crate) fn reopen(&self) {
        self.lock().open = true;
    }

    /// Fails every stream (the link went down, the peer left, the node shut down) and takes
    /// no more until [`Table::reopen`].
    pub(crate) fn fail_all(&self, error: &StreamError) {
        let streams: Vec<_> = {
            let mut s = self.lock();
            s.open = false;
            s.meta_bytes = 0;
            s.map.drain().map(|(_, v)| v).collect()
        };
        // What waited to be sent belonged to the lost link; no stream can be added until the
        // next link, so nothing of a new one is swept away here.
        self.ready.lock().unwrap_or_else(|e| e.into_inner()).clear();
        for stream in streams {
            self.forget_one();
            stream.fail(error.clone());
        }
    }

    pub(crate) fn push_ready(&self, stream: Arc<Shared>) {
        self.ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(stream);
        self.writer.wake();
    }

    /// The next stream with something to send; registers `cx` to be woken when one arrives.
    /// No registration once `killed` (see `LinkStreams::pull_ready`).
    pub(crate) fn pop_ready(
        &self,
        cx: &std::task::Context<'_>,
        killed: &tokio_util::sync::CancellationToken,
    ) -> Option<Arc<Shared>> {
        let mut ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        // Checked only before registering (a mutex of its own), not on every pull.
        if ready.is_empty() && !killed.is_cancelled() {
            // Registered under the lock: a push after this check wakes us.
            self.writer.register(cx.waker());
        }
        ready.pop_front()
    }
}

impl crate::link::LinkStreams for Table {
    fn pull_ready(
        &self,
        cx: &std::task::Context<'_>,
        out: &mut Vec<crate::proto::Envelope>,
        killed: &tokio_util::sync::CancellationToken,
    ) -> Option<usize> {
        self.pop_ready(cx, killed).map(|stream| stream.pull(out))
    }

    fn fail_all(&self, error: &StreamError) {
        Table::fail_all(self, error)
    }

    fn reopen(&self) {
        Table::reopen(self)
    }
}
