//! Streams on the node: opening, accepting, delivering stream envelopes, closing at shutdown.

use std::sync::Arc;

use tokio::time::Instant;

use super::inner::Inner;
use crate::addr::LogicAddr;
use crate::error::{ErrorCode, StreamError};
use crate::proto::{self, envelope::Body};
use crate::stats::Stats;
use crate::stream::Peer;
use crate::stream::{self, AddError, Init, Shared, Stream, StreamMeta};

/// Aborts a stream whose open was abandoned before the stream was handed out.
struct OpenGuard(Option<Arc<Shared>>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.abort(
                ErrorCode::RESET,
                format!("{} stopped waiting for the open", s.local),
            );
        }
    }
}

impl Inner {
    pub(crate) async fn open_stream(
        self: &Arc<Self>,
        to: LogicAddr,
        meta: StreamMeta,
    ) -> Result<Stream, StreamError> {
        let link = |e| StreamError::from_link(e, to);
        self.check_running().map_err(link)?;
        if to == self.addr {
            return Err(StreamError::ToSelf { node: self.addr });
        }
        let size = meta.size();
        let limit = self.config.max_stream_meta.min(self.config.max_envelope);
        if size > limit {
            return Err(StreamError::TooLarge { size, limit });
        }
        // In another cluster: the harbor both directions of this stream cross.
        let peer = self.peer_for(to).map_err(link)?;
        crate::link::ensure_link(self, &peer).map_err(link)?;
        let (shared, accepted) = peer
            .streams
            .add_opened(|id| {
                Shared::opening(Init {
                    id,
                    opened_here: true,
                    local: self.addr,
                    remote: to,
                    meta,
                    peer: Arc::downgrade(&peer),
                    chunk: self.config.stream_chunk(),
                    window: self.config.stream_window,
                    credit: 0,
                })
            })
            .map_err(|e| match e {
                AddError::Full { limit } => StreamError::TooMany { peer: to, limit },
                // Numbers opened here are unique, and opened streams' metadata is not capped
                // (it is this node's own).
                AddError::Duplicate | AddError::Closed | AddError::MetaFull { .. } => {
                    StreamError::PeerLost {
                        peer: to,
                        cause: "the link went down as the stream was opened".into(),
                    }
                }
            })?;
        peer.streams.push_ready(shared.clone());
        self.after_enqueue(&peer);
        // Until the stream is handed out, a caller that stops waiting (a dropped future, a
        // `select!`) aborts it; otherwise it would hold a slot on both nodes forever.
        let mut guard = OpenGuard(Some(shared));
        let timeout = self.config.stream_open_timeout;
        let outcome = tokio::time::timeout(timeout, accepted).await;
        let shared = guard.0.take().expect("taken only here");
        match outcome {
            Ok(Ok(Ok(()))) => {
                Stats::incr(&self.stats.streams_opened);
                Ok(Stream::new(shared))
            }
            Ok(Ok(Err(e))) => Err(e),
            // The stream keeps its sender until it ends, and ending sends the outcome.
            Ok(Err(_)) => Err(StreamError::PeerLost {
                peer: to,
                cause: "the open was abandoned".into(),
            }),
            Err(_) => {
                shared.abort(
                    ErrorCode::TIMEOUT,
                    format!("open not answered within {timeout:?}"),
                );
                Err(StreamError::Timeout { to, after: timeout })
            }
        }
    }

    /// Hands a stream envelope `from` a node (over the link to `peer`: the node itself, or a
    /// harbor on the way) to its stream.
    pub(crate) fn deliver_stream(
        &self,
        peer: &Arc<Peer>,
        from: LogicAddr,
        body: Body,
        trace: &[u8],
    ) {
        let find = |id: u64, to_opener: bool| {
            let key = stream::key(from, id, to_opener);
            // Relayed: after a failover the envelope may arrive by another harbor of this
            // cluster than the stream's own; numbers are unique per opener, so look there too.
            let found = peer.streams.get(key).or_else(|| {
                (from != peer.addr)
                    .then(|| {
                        self.links
                            .peer_list()
                            .iter()
                            .filter(|p| {
                                p.addr.is_harbor()
                                    && p.addr.cluster() == self.addr.cluster()
                                    && p.addr != peer.addr
                            })
                            .find_map(|p| p.streams.get(key))
                    })
                    .flatten()
            });
            if found.is_none() {
                // Closed or reset here meanwhile: what was in flight is moot.
                Stats::incr(&self.stats.stream_envelopes_unknown);
            }
            found
        };
        match body {
            Body::Open(o) => self.accept_stream(peer, from, o.id, o.window, o.meta, trace),
            Body::Accept(a) => {
                if let Some(s) = find(a.id, true) {
                    s.on_accept(a.window)
                }
            }
            Body::Data(d) => {
                if let Some(s) = find(d.id, d.to_opener) {
                    s.on_data(d.data, d.fin)
                }
            }
            Body::Window(w) => {
                if let Some(s) = find(w.id, w.to_opener) {
                    s.on_window(w.credit)
                }
            }
            Body::Close(c) => {
                if let Some(s) = find(c.id, c.to_opener) {
                    if c.code != ErrorCode::REFUSED.0 {
                        Stats::incr(&self.stats.streams_reset);
                    }
                    s.on_close(ErrorCode(c.code), c.reason);
                }
            }
            _ => {}
        }
    }

    fn accept_stream(
        &self,
        peer: &Arc<Peer>,
        from: LogicAddr,
        id: u64,
        window: u32,
        meta: Vec<proto::StreamMeta>,
        trace: &[u8],
    ) {
        let refuse = |code: ErrorCode, reason: String| {
            Stats::incr(&self.stats.streams_refused);
            tracing::debug!(%from, id, reason, "stream refused");
            let env = self.envelope(
                from,
                Body::Close(proto::StreamClose {
                    id,
                    to_opener: true,
                    code: code.0,
                    reason,
                }),
            );
            // A full queue drops the refusal (counted); the opener's open timeout ends its wait.
            peer.try_send_close(env, &self.stats);
        };
        let Some(handler) = &self.stream_handler else {
            return refuse(
                ErrorCode::REFUSED,
                format!("{} accepts no streams (no stream handler)", self.addr),
            );
        };
        if !self.takes_new() {
            return refuse(
                ErrorCode::SHUTDOWN,
                format!("{} is shutting down", self.addr),
            );
        }
        let size = crate::proto::meta_wire_size(&meta);
        if size > self.config.max_stream_meta {
            return refuse(
                ErrorCode::REFUSED,
                format!(
                    "stream metadata of {size} bytes is over {}'s limit of {} bytes",
                    self.addr, self.config.max_stream_meta
                ),
            );
        }
        let shared = Shared::accepting(Init {
            id,
            opened_here: false,
            local: self.addr,
            remote: from,
            meta: StreamMeta::from_wire(meta),
            peer: Arc::downgrade(peer),
            chunk: self.config.stream_chunk(),
            window: self.config.stream_window,
            credit: u64::from(window),
        });
        match peer.streams.add_accepted(&shared) {
            Ok(()) => {}
            Err(AddError::Full { limit }) => {
                return refuse(
                    ErrorCode::REFUSED,
                    format!(
                        "too many streams between {} and {} (limit {limit})",
                        self.addr, from
                    ),
                );
            }
            Err(AddError::MetaFull { limit }) => {
                return refuse(
                    ErrorCode::REFUSED,
                    format!(
                        "{size} more bytes of metadata would take the streams {from} opened to {} over {limit} bytes, its limit",
                        self.addr
                    ),
                );
            }
            // Delivered by a link that has just been failed: its opener's side is gone too.
            Err(AddError::Closed) => return,
            Err(AddError::Duplicate) => {
                // The peer reused a number still open: a bug on its side. The open stream
                // stays; the duplicate is dropped.
                Stats::incr(&self.stats.stream_envelopes_unknown);
                tracing::warn!(peer = %peer.addr, id, "stream open reuses an open stream's number; dropped");
                return;
            }
        }
        Stats::incr(&self.stats.streams_accepted);
        peer.streams.push_ready(shared.clone());
        // The stream's task runs in a span that is the opener's child when the open was traced.
        let traced = tracing::debug_span!(
            target: crate::trace::TARGET,
            parent: None,
            "stream.accept",
            otel.kind = "server",
            rpc.system = "clustergo",
            clustergo.from = %from,
            clustergo.to = %self.addr,
            clustergo.stream = id,
        );
        let span = if traced.is_disabled() {
            tracing::debug_span!(parent: None, "stream", node = %self.addr, peer = %peer.addr, id)
        } else {
            crate::trace::set_parent(&traced, trace);
            traced
        };
        let task = span.in_scope(|| handler(Stream::new(shared)));
        crate::task::spawn(&self.tracker, span, task);
    }

    /// Shutdown: waits until every stream has closed, up to `grace_end`, then resets the rest.
    pub(crate) async fn close_streams(&self, grace_end: Instant) {
        loop {
            let idle = self.live_streams.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            let n = self.live_streams.active();
            if n == 0 {
                return;
            }
            if tokio::time::timeout_at(grace_end, idle).await.is_err() {
                tracing::warn!(node = %self.addr, streams = n, "grace period over with streams open; resetting them");
                break;
            }
        }
        let peers = self.links.peer_list();
        for peer in peers {
            for stream in peer.streams.all() {
                stream.abort(
                    ErrorCode::SHUTDOWN,
                    format!("{} is shutting down", self.addr),
                );
            }
        }
    }
}
