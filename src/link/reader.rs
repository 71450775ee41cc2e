//! The reader half of a link: decodes batches and hands each envelope to the node.

use std::sync::Arc;

use tonic::Streaming;

use super::peer::{LinkTokens, Peer};
use crate::proto::{Batch, Envelope};

/// What a reader awaits before its next envelope: a harbor waiting for room toward the next
/// hop. Meanwhile this link's traffic waits, and HTTP/2 flow control slows its sender.
pub(crate) type Backpressure = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Where a reader delivers envelopes: the node's dispatcher.
pub(crate) trait Deliver: Sized + Send + Sync + 'static {
    /// Handles one envelope that arrived from `peer`. Returns an error to close the link, or
    /// something to await before the next envelope.
    fn deliver(
        self: &Arc<Self>,
        peer: &Arc<Peer>,
        env: Envelope,
    ) -> Result<Option<Backpressure>, String>;
}

/// Reads until the peer closes, the transport fails, the node closes the link or delivery
/// fails; returns why the link ended.
pub(crate) async fn run<D: Deliver>(
    mut inbound: Streaming<Batch>,
    peer: Arc<Peer>,
    tokens: LinkTokens,
    deliver: Arc<D>,
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
            Ok(Some(batch)) => {
                for env in batch.envelopes {
                    // A link replaced or dropped mid-batch delivers nothing more: what waited
                    // on it has been failed already.
                    if tokens.kill.is_cancelled() {
                        return "closed by this node".into();
                    }
                    match deliver.deliver(&peer, env) {
                        Ok(None) => {}
                        Ok(Some(wait)) => {
                            tokio::select! {
                                biased;
                                _ = &mut kill => return "closed by this node".into(),
                                () = wait => {}
                            }
                        }
                        Err(reason) => return reason,
                    }
                }
            }
            Ok(None) => return "closed by the peer".into(),
            Err(status) => return format!("transport error: {}", status.message()),
        }
    }
}
