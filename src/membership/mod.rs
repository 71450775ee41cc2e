//! Membership: who is in the mesh, where they listen, and who may see whom.
//!
//! A [`Discovery`] source yields a [`MembershipStream`]: always an initial
//! [`MembershipEvent::Snapshot`] (even an empty one), then changes in the order they happened.
//! Sources here: [`MemoryDiscovery`] (mutable at run time; tests and the embedded default) and
//! [`FileDiscovery`] (a TOML file, reloaded when it changes) and, with the `etcd` feature,
//! `EtcdDiscovery` (etcd, with a liveness lease per node).

#[cfg(feature = "etcd")]
mod etcd;
mod file;
mod memory;
pub(crate) mod view;
mod watch;

use std::pin::Pin;

use serde::{Deserialize, Serialize};
use tokio_stream::Stream;

use crate::addr::LogicAddr;
use crate::error::DiscoveryError;

#[cfg(feature = "etcd")]
pub use etcd::{
    EtcdDiscovery, EtcdOptions, ReadError, alive_key, encode as encode_member, member_key,
    read_prefix,
};
pub use file::{FileDiscovery, format_members, parse_members};
pub use memory::MemoryDiscovery;

/// One node as membership describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Member {
    /// Logical address.
    pub addr: LogicAddr,
    /// Network address the node listens on and peers dial, `host:port`.
    pub net_addr: String,
    /// Visible to other clusters.
    #[serde(default)]
    pub export: bool,
    /// May be picked by [`Node::get_addr_by_type`](crate::Node::get_addr_by_type) and as a
    /// harbor. Direct sends to an unavailable node still work.
    #[serde(default = "yes")]
    pub available: bool,
}

fn yes() -> bool {
    true
}

impl Member {
    /// A member that is available and not exported.
    pub fn new(addr: LogicAddr, net_addr: impl Into<String>) -> Self {
        Member {
            addr,
            net_addr: net_addr.into(),
            export: false,
            available: true,
        }
    }

    /// Sets `export`.
    #[must_use]
    pub fn with_export(mut self, export: bool) -> Self {
        self.export = export;
        self
    }

    /// Sets `available`.
    #[must_use]
    pub fn with_available(mut self, available: bool) -> Self {
        self.available = available;
        self
    }
}

/// Whether a node at `viewer` may see `member`: same cluster, exported, or harbor to harbor.
pub fn visible(viewer: LogicAddr, member: &Member) -> bool {
    viewer.cluster() == member.addr.cluster()
        || member.export
        || (viewer.is_harbor() && member.addr.is_harbor())
}

/// One item of a membership stream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MembershipEvent {
    /// The whole membership; the first item of every stream, and after a resync.
    Snapshot(Vec<Member>),
    /// A member was added or changed.
    Upsert(Member),
    /// A member was removed.
    Remove(LogicAddr),
}

/// The stream a [`Discovery`] source yields. An `Err` item is reported and the last known view
/// is kept; the stream goes on.
pub type MembershipStream =
    Pin<Box<dyn Stream<Item = Result<MembershipEvent, DiscoveryError>> + Send + 'static>>;

/// A source of membership.
pub trait Discovery: Send + Sync + 'static {
    /// Starts a subscription: an initial snapshot, then changes in order.
    fn subscribe(&self) -> MembershipStream;

    /// Keeps node `me` alive in this source for as long as the returned future runs (a
    /// started node runs it until shutdown). Sources without liveness return `None`. A future
    /// that *ends* means the source can no longer keep the node alive under its address (a
    /// claimed id's lease was lost): the node then shuts down, taking nothing new.
    fn keep_alive(&self, me: LogicAddr) -> Option<BoxFuture> {
        let _ = me;
        None
    }

    /// Ends node `me`'s liveness at once: the first step of a graceful shutdown, so peers stop
    /// picking the node before it stops serving.
    fn leave(&self, me: LogicAddr) -> BoxFuture {
        let _ = me;
        Box::pin(async {})
    }

    /// Node `me` has stopped serving (its links are closed): release what the source still
    /// holds for it, e.g. a server id claimed under a lease. Called once, at the very end of
    /// a graceful shutdown. The default does nothing.
    fn release(&self, me: LogicAddr) -> BoxFuture {
        let _ = me;
        Box::pin(async {})
    }

    /// Node `me` is marked unavailable in membership while it runs (an operator drains it):
    /// publish how much it still serves, for the operator's tools. Called when the drain is
    /// seen and then whenever the figures change (at most twice a second). The default
    /// publishes nothing.
    fn report_drain(&self, me: LogicAddr, progress: DrainProgress) -> BoxFuture {
        let _ = (me, progress);
        Box::pin(async {})
    }

    /// The source's health as node `me` sees it, for metrics. The default says nothing (no
    /// resyncs, no leases).
    fn health(&self, me: LogicAddr) -> DiscoveryHealth {
        let _ = me;
        DiscoveryHealth::default()
    }
}

/// What a membership source says about its own health for one node (for metrics; see
/// `clustergo::admin`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DiscoveryHealth {
    /// Full re-reads of membership after a watch was cancelled (compaction) or broke. Per
    /// source: nodes sharing one source (clones of one `EtcdDiscovery`) share this count.
    pub resyncs: u64,
    /// The node's liveness leases lost after they were held (each is renewed when the
    /// store is back).
    pub leases_lost: u64,
    /// The node's liveness leases held now; `None` for a source without leases.
    pub leases_held: Option<u64>,
}

/// How much a draining node still serves ([`Discovery::report_drain`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrainProgress {
    /// Always true: the value says the node is draining.
    pub draining: bool,
    /// Byte streams open to or from the node (behind a gateway, one per client).
    pub streams: u64,
    /// RPC handlers still running.
    pub calls: u64,
}

impl DrainProgress {
    /// A draining node's figures.
    pub fn new(streams: u64, calls: u64) -> Self {
        DrainProgress {
            draining: true,
            streams,
            calls,
        }
    }

    /// Nothing left to wait for.
    pub fn is_idle(&self) -> bool {
        self.streams == 0 && self.calls == 0
    }

    /// The JSON form written to membership stores: `{"draining":true,"streams":N,"calls":M}`.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"draining\":{},\"streams\":{},\"calls\":{}}}",
            self.draining, self.streams, self.calls
        )
    }

    /// Parses [`DrainProgress::to_json`]'s form; `None` for anything else (e.g. the plain
    /// `"1"` of an alive key that is not draining).
    pub fn from_json(text: &[u8]) -> Option<DrainProgress> {
        let text = std::str::from_utf8(text).ok()?.trim();
        let body = text.strip_prefix('{')?.strip_suffix('}')?;
        let (mut draining, mut streams, mut calls) = (None, None, None);
        for field in body.split(',') {
            let (k, v) = field.split_once(':')?;
            let v = v.trim();
            match k.trim() {
                "\"draining\"" => draining = Some(v.parse::<bool>().ok()?),
                "\"streams\"" => streams = Some(v.parse::<u64>().ok()?),
                "\"calls\"" => calls = Some(v.parse::<u64>().ok()?),
                _ => {}
            }
        }
        Some(DrainProgress {
            draining: draining?,
            streams: streams?,
            calls: calls?,
        })
    }
}

/// A boxed future a [`Discovery`] source hands to the node.
pub type BoxFuture = Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>;

impl<D: Discovery + ?Sized> Discovery for std::sync::Arc<D> {
    fn subscribe(&self) -> MembershipStream {
        (**self).subscribe()
    }

    fn keep_alive(&self, me: LogicAddr) -> Option<BoxFuture> {
        (**self).keep_alive(me)
    }

    fn leave(&self, me: LogicAddr) -> BoxFuture {
        (**self).leave(me)
    }

    fn health(&self, me: LogicAddr) -> DiscoveryHealth {
        (**self).health(me)
    }

    fn release(&self, me: LogicAddr) -> BoxFuture {
        (**self).release(me)
    }

    fn report_drain(&self, me: LogicAddr, progress: DrainProgress) -> BoxFuture {
        (**self).report_drain(me, progress)
    }
}
