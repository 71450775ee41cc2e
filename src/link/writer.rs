//! The writer half of a link: a `Stream` of batches that tonic polls directly, so no task of
//! ours sits between the queue and the transport.
//!
//! Each poll takes everything queued (up to the batch limits) and yields it as one gRPC
//! message. With one envelope queued, that envelope goes out at once: batching never waits.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_stream::Stream;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::peer::{LinkTokens, Outbound, Peer};
use crate::proto::{Batch, envelope::Body};
use crate::stats::Stats;

pub(crate) struct Writer {
    peer: Arc<Peer>,
    stats: Arc<Stats>,
    /// Until the peer has admitted the link, nothing is taken from the queue: a refused dial
    /// must leave the queue whole for the link that wins.
    gate: Option<oneshot::Receiver<()>>,
    kill: Pin<Box<WaitForCancellationFutureOwned>>,
    close: Pin<Box<WaitForCancellationFutureOwned>>,
    max_bytes: usize,
    max_envelopes: usize,
    /// Taken from the queue, not yet written (left over when a batch hit the byte limit).
    buf: Vec<Outbound>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("peer", &self.peer.addr)
            .finish_non_exhaustive()
    }
}

impl Writer {
    pub(crate) fn new(
        peer: Arc<Peer>,
        stats: Arc<Stats>,
        tokens: &LinkTokens,
        gate: Option<oneshot::Receiver<()>>,
        max_bytes: usize,
        max_envelopes: usize,
    ) -> Self {
        Writer {
            peer,
            stats,
            gate,
            kill: Box::pin(tokens.kill.clone().cancelled_owned()),
            close: Box::pin(tokens.close.clone().cancelled_owned()),
            max_bytes,
            max_envelopes,
            buf: Vec::new(),
        }
    }
}

/// Rough wire size of an envelope, for the batch byte limit.
pub(crate) fn approx_size(body: &Option<Body>) -> usize {
    const HEADER: usize = 24;
    HEADER
        + match body {
            Some(Body::Request(r)) => r.payload.len() + r.method.len(),
            Some(Body::Response(r)) => match &r.result {
                Some(crate::proto::response::Result::Payload(p)) => p.len(),
                Some(crate::proto::response::Result::Error(e)) => e.message.len(),
                None => 0,
            },
            Some(Body::Message(m)) => {
                m.payload.len()
                    + match &m.kind {
                        Some(crate::proto::message::Kind::TypeName(t)) => t.len(),
                        _ => 0,
                    }
            }
            _ => 0,
        }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Taken from the queue but never written: the link ended under them. Waiting calls
        // among them are failed by the link's end; count the rest.
        for item in self.buf.drain(..) {
            if !matches!(item.env.body, Some(Body::Request(_))) {
                Stats::incr(&self.stats.envelopes_lost);
            }
        }
    }
}

impl Stream for Writer {
    type Item = Batch;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Batch>> {
        let this = &mut *self;
        if let Some(gate) = &mut this.gate {
            match ready!(Pin::new(gate).poll(cx)) {
                Ok(()) => this.gate = None,
                Err(_) => return Poll::Ready(None),
            }
        }
        if this.kill.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        loop {
            if this.buf.is_empty() {
                // One receive takes everything queued (up to the envelope limit) and returns
                // the queue's permits in one step.
                let polled = this
                    .peer
                    .rx()
                    .poll_recv_many(cx, &mut this.buf, this.max_envelopes);
                match polled {
                    // The peer holds the sender, so the queue never closes while we live.
                    Poll::Ready(0) => return Poll::Ready(None),
                    Poll::Ready(_) => {}
                    Poll::Pending => {
                        // Graceful close: end only once nothing is left to write.
                        if this.close.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(None);
                        }
                        return Poll::Pending;
                    }
                }
            }
            // Cut at the byte limit; the rest waits in `buf` for the next poll.
            let mut bytes = 0;
            let mut cut = this.buf.len();
            for (i, item) in this.buf.iter().enumerate() {
                bytes += approx_size(&item.env.body);
                if bytes >= this.max_bytes {
                    cut = i + 1;
                    break;
                }
            }
            let rest = if cut < this.buf.len() {
                this.buf.split_off(cut)
            } else {
                Vec::new()
            };
            let mut now = None;
            let mut envelopes = Vec::with_capacity(this.buf.len());
            for item in this.buf.drain(..) {
                match item.deadline {
                    Some(d) if d <= *now.get_or_insert_with(Instant::now) => {
                        this.peer.expire(item, &this.stats)
                    }
                    _ => envelopes.push(item.env),
                }
            }
            this.buf = rest;
            if !envelopes.is_empty() {
                return Poll::Ready(Some(Batch { envelopes }));
            }
            // Everything taken had expired: look again.
        }
    }
}
