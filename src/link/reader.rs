//! The reader half of a link: decodes batches and hands each envelope to the node.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tonic::{Code, Status, Streaming};

use super::peer::{LinkStreams, LinkTokens, Peer};
use crate::proto::MAX_BATCH_ENVELOPES;
use crate::proto::{Batch, Envelope};

/// Where a reader delivers envelopes: the node's dispatcher.
pub(crate) trait Deliver: Sized + Send + Sync + 'static {
    /// The streams a peer's link carries.
    type Streams: LinkStreams;
    /// Handles one envelope that arrived from `peer`, without waiting: a reader serves every
    /// destination behind its link, so nothing one destination does may hold it. Returns a
    /// status to close the link with when the peer broke the protocol.
    fn deliver(
        self: &Arc<Self>,
        peer: &Arc<Peer<Self::Streams>>,
        env: Envelope,
    ) -> Result<(), Status>;
}

/// How many envelopes of one batch a reader hands on before it lets the other tasks of its
/// thread run ([`tokio::task::yield_now`]).
///
/// Handing on an envelope is quick, and what it causes (answers queued by handlers inline,
/// callers woken, relayed envelopes queued for the next hop) waits for the writers, which are
/// tasks of the same thread. A reader that delivered a whole batch of a hundred requests
/// before yielding made its writer send all hundred answers at the end, so the peer sat idle
/// while this node worked and then this node sat idle while the peer did: two nodes on
/// separate cores working in turn. Yielding every few dozen envelopes lets the writers send
/// the first answers while the rest are delivered, and the two nodes work at the same time.
/// Measured on `rpc-c128` (one thread per process): 0.50-0.61 of bare tonic's calls per
/// second before, 0.82-0.91 after (p50 245 → 150 µs); through harbors +25 %;
/// `stream-pingpong-s100` +85 %; one caller, messages and byte streams unchanged. 16, 32
/// and 64 measured alike; 8 costs more than it gains. It also keeps one link's large batch
/// (up to [`MAX_BATCH_ENVELOPES`]) from holding up the thread's other links.
const DELIVER_RUN: usize = 32;

/// Why a link ended when the peer ended its side in order.
pub(crate) const PEER_CLOSED: &str = "closed by the peer";

/// Ends the link for a protocol violation: the status is kept for the acceptor's answer.
fn fault(tokens: &LinkTokens, status: Status) -> String {
    let why = status.message().to_owned();
    // The first fault is the cause; later ones are its echoes.
    let _ = tokens.fault.set(status);
    why
}

/// Reads until the peer closes, the transport fails, the node closes the link or delivery
/// fails; returns why the link ended.
pub(crate) async fn run<D: Deliver>(
    mut inbound: Streaming<Batch>,
    peer: Arc<Peer<D::Streams>>,
    tokens: LinkTokens,
    deliver: Arc<D>,
    stats: Arc<crate::stats::Stats>,
) -> String {
    let kill = tokens.kill.cancelled();
    tokio::pin!(kill);
    loop {
        let batch = tokio::select! {
            biased;
            _ = &mut kill => return "closed by this node".into(),
            m = inbound.message() => m,
        };
        match batch {
            Ok(Some(batch)) if batch.over_limit > 0 => {
                return fault(
                    &tokens,
                    Status::resource_exhausted(format!(
                        "{} sent a batch of {} envelopes, over the limit of {MAX_BATCH_ENVELOPES} envelopes",
                        peer.addr,
                        batch.envelopes.len() + batch.over_limit
                    )),
                );
            }
            Ok(Some(batch)) => {
                stats.count_batch(crate::stats::Direction::Received, &batch.envelopes);
                let counts = &tokens.counts;
                if batch.received > 0 {
                    // Each envelope is counted as written before its batch goes out: a peer
                    // confirming more is lying, and would hide what was lost.
                    let written = counts.written.load(Relaxed);
                    if batch.received > written {
                        return fault(
                            &tokens,
                            Status::invalid_argument(format!(
                                "{} confirmed {} envelopes of the {written} sent to it",
                                peer.addr, batch.received
                            )),
                        );
                    }
                    counts.confirmed.fetch_max(batch.received, Relaxed);
                }
                let mut received = false;
                for (i, env) in batch.envelopes.into_iter().enumerate() {
                    if i > 0 && i % DELIVER_RUN == 0 {
                        tokio::task::yield_now().await;
                    }
                    // A link replaced or dropped mid-batch delivers nothing more: what waited
                    // on it has been failed already.
                    if tokens.kill.is_cancelled() {
                        return "closed by this node".into();
                    }
                    if let Err(status) = deliver.deliver(&peer, env) {
                        return fault(&tokens, status);
                    }
                    // Acknowledged with this side's next batch, or by the node's sweep (see
                    // `Links::acknowledge`); counted once handed on, so an envelope a dying
                    // link drops mid-batch is never confirmed.
                    counts.received.fetch_add(1, Relaxed);
                    received = true;
                }
                if received {
                    tokens.ack_due.mark();
                }
            }
            Ok(None) => return PEER_CLOSED.into(),
            // What tonic itself refused to decode: too large, or not a batch.
            Err(status) if status.code() == Code::OutOfRange => {
                return fault(
                    &tokens,
                    Status::resource_exhausted(status.message().to_owned()),
                );
            }
            Err(status) if status.message().contains("decode") => {
                let text = format!(
                    "{} sent a batch that did not decode: {}",
                    peer.addr,
                    status.message()
                );
                return fault(&tokens, Status::invalid_argument(text));
            }
            Err(status) => return format!("transport error: {}", status.message()),
        }
    }
}
