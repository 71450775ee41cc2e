//! Errors, one enum per layer. Every message names the thing and the cause.

use std::time::Duration;

use crate::addr::LogicAddr;

/// Error code carried in an RPC error response. Codes below 100 are the framework's own;
/// applications use 100 and above.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    /// No handler is registered for the method.
    pub const NO_METHOD: ErrorCode = ErrorCode(1);
    /// The server is at its concurrency limit.
    pub const BUSY: ErrorCode = ErrorCode(2);
    /// The server is shutting down.
    pub const SHUTDOWN: ErrorCode = ErrorCode(3);
    /// The handler returned an error without a code of its own.
    pub const HANDLER: ErrorCode = ErrorCode(4);
    /// The handler panicked.
    pub const PANICKED: ErrorCode = ErrorCode(5);
    /// The handler dropped its [`Replyer`](crate::Replyer) without replying.
    pub const NO_REPLY: ErrorCode = ErrorCode(6);
    /// The response did not fit in the envelope size limit.
    pub const TOO_LARGE: ErrorCode = ErrorCode(7);
    /// No route to the target from some hop.
    pub const NO_ROUTE: ErrorCode = ErrorCode(8);
    /// The request did not decode as the handler's request type.
    pub const BAD_REQUEST: ErrorCode = ErrorCode(9);
    /// A stream open was refused (no acceptor, too many streams).
    pub const REFUSED: ErrorCode = ErrorCode(10);
    /// A stream was reset by the application, or dropped before it was closed.
    pub const RESET: ErrorCode = ErrorCode(11);
    /// A stream's sender overran the window its receiver granted.
    pub const FLOW_CONTROL: ErrorCode = ErrorCode(12);
    /// A stream open was not answered within the opener's open timeout.
    pub const TIMEOUT: ErrorCode = ErrorCode(13);
    /// A harbor lost its link to the next hop while the request waited there.
    pub const PEER_LOST: ErrorCode = ErrorCode(14);
    /// A harbor could not queue the request toward its next hop: that hop's queue was full.
    pub const HOP_BUSY: ErrorCode = ErrorCode(15);
    /// First code free for applications.
    pub const APPLICATION: ErrorCode = ErrorCode(100);
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The error an RPC handler answers with; the caller sees it as [`RpcError::Remote`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("error {code}: {message}")]
pub struct HandlerError {
    /// The code; use [`ErrorCode::APPLICATION`] and above for your own.
    pub code: ErrorCode,
    /// Text for the caller.
    pub message: String,
}

impl HandlerError {
    /// An error with an application code (100 and above). Codes below 100 are the
    /// framework's: given one, `new` uses [`ErrorCode::HANDLER`] instead, so a caller never
    /// mistakes an application error for `Busy` or `Shutdown`. (Build the struct directly to
    /// send a framework code on purpose, e.g. `ErrorCode::BUSY` from an overloaded handler.)
    pub fn new(code: u32, message: impl Into<String>) -> Self {
        HandlerError {
            code: if code < ErrorCode::APPLICATION.0 {
                ErrorCode::HANDLER
            } else {
                ErrorCode(code)
            },
            message: message.into(),
        }
    }

    /// An error with code [`ErrorCode::HANDLER`].
    pub fn msg(message: impl Into<String>) -> Self {
        HandlerError {
            code: ErrorCode::HANDLER,
            message: message.into(),
        }
    }
}

/// Why an RPC call, or a send, failed. Callers match on the variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RpcError {
    /// The local node has not been started.
    #[error("node {node} is not started")]
    NotStarted {
        /// The local node.
        node: LogicAddr,
    },
    /// A node is shutting down: the local one (nothing can be sent) or the target (it refused
    /// new requests).
    #[error("node {node} is shutting down")]
    Shutdown {
        /// The node that is shutting down.
        node: LogicAddr,
    },
    /// No outcome within the deadline.
    #[error("call {method:?} to {to} timed out after {after:?}")]
    Timeout {
        /// The target.
        to: LogicAddr,
        /// The method called, or `"<message>"` for a one-way message.
        method: String,
        /// The deadline that passed.
        after: Duration,
    },
    /// The target is not reachable from here.
    #[error("no route to {to}: {reason}")]
    NoRoute {
        /// The target.
        to: LogicAddr,
        /// Why, e.g. `not in membership`.
        reason: String,
    },
    /// The link to the peer failed (dial error, or dropped while waiting).
    #[error("link to {peer} lost: {cause}")]
    PeerLost {
        /// The peer.
        peer: LogicAddr,
        /// What happened.
        cause: String,
    },
    /// A harbor on the path could not queue the request toward its next hop: that hop's queue
    /// is full (the hop, or the destination behind it, is slow or stuck). Answered at once;
    /// other destinations are not affected. Retry later.
    #[error("{to} cannot be reached for now: {reason}")]
    PathBusy {
        /// The target.
        to: LogicAddr,
        /// Which hop's queue was full, at which harbor.
        reason: String,
    },
    /// The peer's acceptor refused the link (secret, membership).
    #[error("link to {peer} refused: {reason}")]
    Refused {
        /// The peer.
        peer: LogicAddr,
        /// The reason the peer gave.
        reason: String,
    },
    /// The target has no handler for the method.
    #[error("{to} has no handler for method {method:?}")]
    NoMethod {
        /// The target.
        to: LogicAddr,
        /// The method.
        method: String,
    },
    /// The handler answered with an error, panicked, or dropped its reply.
    #[error("{to} answered error {code}: {message}")]
    Remote {
        /// The target.
        to: LogicAddr,
        /// The code (see [`ErrorCode`]).
        code: ErrorCode,
        /// The text.
        message: String,
    },
    /// The target is at its concurrency limit.
    #[error("{to} is busy: at its limit of concurrent requests")]
    Busy {
        /// The target.
        to: LogicAddr,
    },
    /// The payload is over the envelope size limit.
    #[error("payload of {size} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// Size of the payload.
        size: usize,
        /// The limit ([`NodeConfig::max_envelope`](crate::NodeConfig::max_envelope)).
        limit: usize,
    },
    /// The response did not decode as the expected protobuf type.
    #[error("response of {method:?} from {to} did not decode: {reason}")]
    BadResponse {
        /// The target.
        to: LogicAddr,
        /// The method called.
        method: String,
        /// The decoder's complaint.
        reason: String,
    },
    /// The queue to the peer is full.
    #[error("queue to {peer} is full ({capacity} envelopes)")]
    QueueFull {
        /// The peer.
        peer: LogicAddr,
        /// The queue's capacity.
        capacity: usize,
    },
}

/// Why a stream could not be opened, or why it failed. Reads and writes on a
/// [`Stream`](crate::Stream) report it inside a [`std::io::Error`];
/// [`StreamError::from_io`] gets it back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The local node has not been started.
    #[error("node {node} is not started")]
    NotStarted {
        /// The local node.
        node: LogicAddr,
    },
    /// A node is shutting down: the local one, or the peer (it closed the stream as it shut
    /// down, or refused the open).
    #[error("node {node} is shutting down")]
    Shutdown {
        /// The node that is shutting down.
        node: LogicAddr,
    },
    /// A node cannot open a stream to itself.
    #[error("node {node} cannot open a stream to itself")]
    ToSelf {
        /// The local node.
        node: LogicAddr,
    },
    /// The target is not reachable from here.
    #[error("no route to {to}: {reason}")]
    NoRoute {
        /// The target.
        to: LogicAddr,
        /// Why, e.g. `not in membership`.
        reason: String,
    },
    /// The peer, or the link to it, refused: no stream acceptor, too many streams, a refused
    /// link.
    #[error("stream to {peer} refused: {reason}")]
    Refused {
        /// The peer.
        peer: LogicAddr,
        /// The reason the peer gave.
        reason: String,
    },
    /// The open was not answered in time
    /// ([`NodeConfig::stream_open_timeout`](crate::NodeConfig::stream_open_timeout)).
    #[error("opening a stream to {to} timed out after {after:?}")]
    Timeout {
        /// The target.
        to: LogicAddr,
        /// The open timeout.
        after: Duration,
    },
    /// The link to the peer failed: every stream on it fails.
    #[error("link to {peer} lost: {cause}")]
    PeerLost {
        /// The peer.
        peer: LogicAddr,
        /// What happened.
        cause: String,
    },
    /// The peer reset the stream (or dropped it before closing it).
    #[error("stream reset by {peer} (code {code}): {reason}")]
    Reset {
        /// The peer.
        peer: LogicAddr,
        /// The code (see [`ErrorCode`]): [`ErrorCode::RESET`] for an application reset.
        code: ErrorCode,
        /// The reason the peer gave.
        reason: String,
    },
    /// This side reset the stream (one half was dropped early, or the open timed out); the
    /// other half fails with this.
    #[error("stream to {peer} aborted by this node: {reason}")]
    Aborted {
        /// The peer.
        peer: LogicAddr,
        /// Why.
        reason: String,
    },
    /// Written after [`shutdown`](tokio::io::AsyncWriteExt::shutdown) (the write half is
    /// closed).
    #[error("stream to {peer}: write after shutdown")]
    Finished {
        /// The peer.
        peer: LogicAddr,
    },
    /// The local limit of streams per peer is reached.
    #[error("too many streams to {peer} (limit {limit})")]
    TooMany {
        /// The peer.
        peer: LogicAddr,
        /// [`NodeConfig::max_streams`](crate::NodeConfig::max_streams).
        limit: usize,
    },
    /// The open metadata is over the envelope size limit.
    #[error("stream metadata of {size} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// Size of the metadata.
        size: usize,
        /// The limit ([`NodeConfig::max_envelope`](crate::NodeConfig::max_envelope)).
        limit: usize,
    },
}

impl StreamError {
    /// The stream error inside an I/O error from a [`Stream`](crate::Stream)'s reads or
    /// writes, if it carries one.
    pub fn from_io(e: &std::io::Error) -> Option<&StreamError> {
        e.get_ref()?.downcast_ref()
    }

    /// The I/O error kind a read or write reports this error with.
    pub fn io_kind(&self) -> std::io::ErrorKind {
        use std::io::ErrorKind;
        match self {
            StreamError::Reset { .. } => ErrorKind::ConnectionReset,
            StreamError::PeerLost { .. } | StreamError::Aborted { .. } => {
                ErrorKind::ConnectionAborted
            }
            StreamError::Finished { .. } => ErrorKind::BrokenPipe,
            StreamError::Timeout { .. } => ErrorKind::TimedOut,
            StreamError::Refused { .. } | StreamError::TooMany { .. } => {
                ErrorKind::ConnectionRefused
            }
            _ => ErrorKind::Other,
        }
    }
}

impl From<StreamError> for std::io::Error {
    fn from(e: StreamError) -> Self {
        std::io::Error::new(e.io_kind(), e)
    }
}

impl StreamError {
    /// A link-level failure (dial, admission, membership, shutdown) as seen by a stream to
    /// `peer`.
    pub(crate) fn from_link(e: RpcError, peer: LogicAddr) -> Self {
        match e {
            RpcError::NotStarted { node } => StreamError::NotStarted { node },
            RpcError::Shutdown { node } => StreamError::Shutdown { node },
            RpcError::NoRoute { to, reason } => StreamError::NoRoute { to, reason },
            RpcError::Refused { peer, reason } => StreamError::Refused { peer, reason },
            RpcError::PeerLost { peer, cause } => StreamError::PeerLost { peer, cause },
            RpcError::TooLarge { size, limit } => StreamError::TooLarge { size, limit },
            other => StreamError::PeerLost {
                peer,
                cause: other.to_string(),
            },
        }
    }
}

/// Why [`Node::start`](crate::Node::start) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// `start` was called twice.
    #[error("node {0} was already started")]
    AlreadyStarted(LogicAddr),
    /// The configuration is invalid.
    #[error("invalid configuration of node {node}: {reason}")]
    Config {
        /// The node.
        node: LogicAddr,
        /// What is wrong.
        reason: String,
    },
    /// The first membership snapshot did not arrive in time.
    #[error("node {node}: no membership snapshot within {after:?}")]
    MembershipTimeout {
        /// The node.
        node: LogicAddr,
        /// The start timeout.
        after: Duration,
    },
    /// The membership source failed.
    #[error("node {node}: membership source failed: {source}")]
    Discovery {
        /// The node.
        node: LogicAddr,
        /// The cause.
        source: DiscoveryError,
    },
    /// The node is not listed in membership.
    #[error("node {0} is not in membership")]
    NotInMembership(LogicAddr),
    /// Binding the listen address failed.
    #[error("node {node}: cannot listen on {net_addr}: {source}")]
    Bind {
        /// The node.
        node: LogicAddr,
        /// The address.
        net_addr: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// A membership source failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// A membership file could not be read.
    #[error("cannot read membership file {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        reason: String,
    },
    /// A membership document is malformed.
    #[error("malformed membership in {source_name}: {reason}")]
    Malformed {
        /// Where it came from (a file path, a key).
        source_name: String,
        /// What is wrong.
        reason: String,
    },
    /// A membership service could not be reached or answered an error.
    #[error("membership source {source_name} unavailable: {reason}")]
    Unavailable {
        /// Which service (e.g. `etcd http://127.0.0.1:2379`).
        source_name: String,
        /// What failed.
        reason: String,
    },
    /// The source ended.
    #[error("membership source ended")]
    Ended,
    /// No server id could be claimed (`EtcdDiscovery::claim`).
    #[error("cannot claim a server id for {cluster}.{node_type}.auto: {reason}")]
    Claim {
        /// The cluster asked for.
        cluster: u16,
        /// The node type asked for.
        node_type: u8,
        /// Why: an invalid cluster or type, every id taken, or too many lost races.
        reason: String,
    },
}

/// Why no node could be selected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectError {
    /// The node is not running.
    #[error("node {0} is not running")]
    NotRunning(LogicAddr),
    /// No available, visible node of that type.
    #[error("no available node of type {0}")]
    NoneAvailable(u8),
}

/// Longest error text sent back to a caller; longer texts are cut (on a char boundary), so an
/// error can never outgrow the batch limit and take its link down.
pub(crate) const MAX_ERROR_TEXT: usize = 4096;

pub(crate) fn clip(mut text: String) -> String {
    if text.len() > MAX_ERROR_TEXT {
        let mut end = MAX_ERROR_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}
