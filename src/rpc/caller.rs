//! The caller's side of a call: register the call on the peer it goes to, queue its request,
//! wait for its outcome under the caller's deadline, and name the outcome as an [`RpcError`].
//!
//! What this needs of the node (is it running, which neighbour a destination is reached by,
//! call ids, envelopes) comes through [`Sender`]; the handler side is in the parent module.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::addr::LogicAddr;
use crate::error::{ErrorCode, RpcError};
use crate::link::Outbound;
use crate::link::Outcome as Answer;
use crate::metrics::Outcome;
use crate::proto::{self, Envelope, envelope::Body};
use crate::stream::Peer;

/// What the caller's side needs of the node.
pub(crate) trait Sender {
    /// The neighbour that reaches `to`, with a link up or being dialed, for a call of `len`
    /// bytes (method name and payload); fails if the node is not running, the call is too
    /// large or there is no route.
    fn path_for_call(&self, to: LogicAddr, len: usize) -> Result<Arc<Peer>, RpcError>;
    /// A fresh call id.
    fn call_id(&self) -> u64;
    /// An envelope from this node to `to`.
    fn envelope(&self, to: LogicAddr, body: Body) -> Envelope;
    /// Something was queued on `peer` (dials it if its link went down meanwhile).
    fn queued(&self, peer: &Arc<Peer>);
    /// Whether calls are timed (`NodeConfig::call_metrics`).
    fn timed(&self) -> bool;
    /// A call of `method` ended with `outcome` after `took`.
    fn record_call(&self, method: &str, outcome: Outcome, took: Duration);
}

/// A call whose request is queued (or waiting for room) and whose answer is awaited.
pub(crate) struct Started {
    peer: Arc<Peer>,
    id: u64,
    rx: oneshot::Receiver<Answer>,
    /// The request, when the queue was full and it still has to wait for room.
    full: Option<Box<Outbound>>,
}

/// Removes a call's waiting slot if the caller stops waiting first.
struct PendingGuard<'a> {
    peer: &'a Peer,
    id: u64,
    armed: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.peer.take_pending(self.id);
        }
    }
}

/// A duration in whole milliseconds as the wire carries it (at least 1).
pub(crate) fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1)
}

/// Registers a call and queues its request without waiting; a full queue hands the request
/// back for [`finish`] to wait with.
pub(crate) fn begin<S: Sender>(
    node: &S,
    to: LogicAddr,
    method: &str,
    payload: Bytes,
    timeout: Duration,
    deadline: Instant,
) -> Result<Started, RpcError> {
    // The method name rides in the same envelope, so it counts against the limit.
    let peer = node
        .path_for_call(to, payload.len() + method.len())
        .inspect_err(|e| {
            if node.timed() {
                node.record_call(method, Outcome::of_error(e), Duration::ZERO)
            }
        })?;
    let id = node.call_id();
    let (tx, rx) = oneshot::channel();
    peer.add_pending(id, to, tx);
    let item = Outbound {
        env: node.envelope(
            to,
            Body::Request(proto::Request {
                id,
                method: method.to_owned(),
                payload,
                timeout_ms: millis(timeout),
                oneway: false,
            }),
        ),
        deadline: Some(deadline),
    };
    match peer.try_enqueue(item) {
        Ok(()) => {
            node.queued(&peer);
            Ok(Started {
                peer,
                id,
                rx,
                full: None,
            })
        }
        Err((RpcError::QueueFull { .. }, item)) => Ok(Started {
            peer,
            id,
            rx,
            full: Some(Box::new(item)),
        }),
        Err((e, _)) => {
            peer.take_pending(id);
            if node.timed() {
                node.record_call(method, Outcome::of_error(&e), Duration::ZERO);
            }
            Err(e)
        }
    }
}

/// Waits for the outcome of a call [`begin`] started, until `deadline`.
pub(crate) async fn finish<S: Sender>(
    node: &S,
    started: Started,
    to: LogicAddr,
    method: &str,
    timeout: Duration,
    deadline: Instant,
) -> Result<Bytes, RpcError> {
    let result = wait(node, started, to, method, timeout, deadline).await;
    if !node.timed() {
        return result;
    }
    let outcome = match &result {
        Ok(_) => Outcome::Ok,
        Err(e) => Outcome::of_error(e),
    };
    // The call began `timeout` before its deadline: no clock read at its start.
    let began = deadline.checked_sub(timeout).unwrap_or(deadline);
    node.record_call(method, outcome, began.elapsed());
    result
}

async fn wait<S: Sender>(
    node: &S,
    Started { peer, id, rx, full }: Started,
    to: LogicAddr,
    method: &str,
    timeout: Duration,
    deadline: Instant,
) -> Result<Bytes, RpcError> {
    let mut guard = PendingGuard {
        peer: &peer,
        id,
        armed: true,
    };
    if let Some(item) = full {
        peer.enqueue(*item, timeout).await?;
        node.queued(&peer);
    }
    let outcome = match tokio::time::timeout_at(deadline, rx).await {
        Ok(Ok(o)) => o,
        Ok(Err(_)) => Answer::Failed(RpcError::PeerLost {
            peer: to,
            cause: "the call was abandoned".into(),
        }),
        Err(_) => Answer::Failed(RpcError::Timeout {
            to,
            method: method.into(),
            after: timeout,
        }),
    };
    guard.armed = false;
    match outcome {
        Answer::Reply(p) => Ok(p),
        Answer::Failed(RpcError::Timeout { .. }) => Err(RpcError::Timeout {
            to,
            method: method.into(),
            after: timeout,
        }),
        Answer::Failed(e) => Err(e),
        Answer::Remote { code, message } => Err(remote_error(to, method, code, message)),
    }
}

/// The error a caller sees for an error answer with `code`.
fn remote_error(to: LogicAddr, method: &str, code: u32, message: String) -> RpcError {
    match ErrorCode(code) {
        ErrorCode::NO_METHOD => RpcError::NoMethod {
            to,
            method: method.into(),
        },
        ErrorCode::BUSY => RpcError::Busy { to },
        ErrorCode::SHUTDOWN => RpcError::Shutdown { node: to },
        ErrorCode::NO_ROUTE => RpcError::NoRoute {
            to,
            reason: message,
        },
        ErrorCode::PEER_LOST => RpcError::PeerLost {
            peer: to,
            cause: message,
        },
        ErrorCode::HOP_BUSY => RpcError::PathBusy {
            to,
            reason: message,
        },
        code => RpcError::Remote { to, code, message },
    }
}
