//! One-way messages: by protobuf type or by numeric command.
//!
//! Handlers are plain functions that run on the link's reader in arrival order, so the
//! messages of one sender are handled in the order they were sent. A handler that has slow
//! work to do hands it to a task or a channel of its own.

use std::sync::Arc;

use bytes::Bytes;

use crate::addr::LogicAddr;
use crate::hash::FastMap;

/// An application-defined message number for raw-bytes messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cmd(pub u32);

impl std::fmt::Display for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cmd {}", self.0)
    }
}

/// What a message handler knows about the message.
#[derive(Debug, Clone)]
pub struct MessageContext {
    pub(crate) from: LogicAddr,
    pub(crate) node: crate::Node,
}

impl MessageContext {
    /// The node the message reached: a handler answers or forwards through it.
    pub fn node(&self) -> &crate::Node {
        &self.node
    }

    /// The sender's address.
    pub fn from(&self) -> LogicAddr {
        self.from
    }
}

pub(crate) type MsgHandler =
    Arc<dyn Fn(MessageContext, Bytes) -> Result<(), prost::DecodeError> + Send + Sync>;

/// Handlers by key, filled by the builder and read-only once the node runs.
#[derive(Default, Clone)]
pub(crate) struct MsgHandlers {
    pub(crate) by_cmd: FastMap<u32, MsgHandler>,
    pub(crate) by_type: FastMap<String, MsgHandler>,
}

pub(crate) fn typed<M, F>(f: F) -> MsgHandler
where
    M: prost::Message + Default + 'static,
    F: Fn(MessageContext, M) + Send + Sync + 'static,
{
    Arc::new(move |ctx, payload| {
        let msg = M::decode(payload)?;
        f(ctx, msg);
        Ok(())
    })
}
