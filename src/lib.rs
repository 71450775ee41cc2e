//! clustergo: a framework for game-server clusters.
//!
//! Every node has a 32-bit logical address (`cluster.type.server`, see [`LogicAddr`]). Nodes
//! call each other by address — RPC ([`Node::call`], [`Node::call_with_callback`],
//! [`Node::post`]), one-way messages ([`Node::send_cmd`], [`Node::send_message`]) and byte
//! streams ([`Node::open_stream`], [`Stream`]) — over
//! long-lived gRPC links that open on first use and carry batches of envelopes both ways.
//! Membership (address, network address, export, available) comes from a [`Discovery`]
//! source.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use bytes::Bytes;
//! use clustergo::{HandlerError, LogicAddr, Member, MemoryDiscovery, Node};
//!
//! let (a, b): (LogicAddr, LogicAddr) = ("1.1.1".parse()?, "1.2.1".parse()?);
//! let members = MemoryDiscovery::new([
//!     Member::new(a, "127.0.0.1:9001"),
//!     Member::new(b, "127.0.0.1:9002"),
//! ]);
//! let server = Node::builder(b)
//!     .discovery(members.clone())
//!     .rpc("echo", |_ctx, payload| async move { Ok::<_, HandlerError>(payload) })
//!     .build();
//! server.start().await?;
//! let client = Node::builder(a).discovery(members).build();
//! client.start().await?;
//! let reply = client.call(b, "echo", Bytes::from_static(b"hi")).await?;
//! assert_eq!(&reply[..], b"hi");
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - `addr`: logical addresses.
//! - `config`: limits and timeouts of a node.
//! - `error`: the error types, one per layer.
//! - `gate`: a rate gate for log lines attackers can cause.
//! - `membership`: members, visibility, discovery sources (memory, file) and the node's view.
//! - `link`: per-peer queues, the batching writer, the reader, the link hello.
//! - `rpc`: handlers, call context, the replyer.
//! - `message`: one-way message handlers.
//! - `stream`: flow-controlled byte streams between nodes, many per link.
//! - `node`: the public handle; start, dispatch, links, shutdown.
//! - `app` (feature `app`): what a binary does around its node: exit codes, `auto` ids, SIGTERM drain.
//! - `router`: next hops (direct, harbors), sticky paths, and the forwarding layer harbors run.
//! - `relay`: a harbor's relay stack as its tower middleware sees it.
//! - `rendezvous`: the rendezvous hashing every pick uses (harbors, sticky targets, the
//!   gateway's game servers).
//! - `stats`: counters.
//! - `typed`: protobuf requests and responses over RPC (what generated services use).
//! - `proto`: the generated wire types (public for tools and attack tests; not a stable API).

#![forbid(unsafe_code)]

mod addr;
#[cfg(feature = "admin")]
pub mod admin;
#[cfg(feature = "app")]
pub mod app;
mod config;
mod error;
mod gate;
mod hash;
mod link;
pub mod membership;
mod message;
mod metrics;
mod node;
#[doc(hidden)]
pub mod proto;
pub mod rendezvous;
mod router;
pub mod session;
pub use router::route;
mod rpc;
mod stats;
mod stream;
mod task;
#[cfg(feature = "telemetry")]
pub mod telemetry;
pub mod trace;
mod typed;

pub use addr::{AddrError, AddrField, HARBOR_TYPE, LogicAddr, MAX_CLUSTER, MAX_SERVER, MAX_TYPE};
pub use config::{DEV_SECRET, NodeConfig, SECRET_ENV, binary_secret, secret_from_env};
pub use error::{
    DiscoveryError, ErrorCode, HandlerError, RpcError, SelectError, StartError, StreamError,
};
pub use gate::{LogGate, source_key};

/// A harbor's relay stack: what its middleware sees and wraps (see
/// [`NodeBuilder::relay_layer`]).
pub mod relay {
    pub use crate::router::stack::{BoxError, Forward, Overloaded, RelayKind, Relayed};
}
#[cfg(feature = "tls")]
pub use link::tls::{LinkTls, LinkTlsFiles, TlsError};
pub use membership::{
    Discovery, DiscoveryHealth, DrainProgress, FileDiscovery, Member, MembershipEvent,
    MemoryDiscovery,
};
#[cfg(feature = "etcd")]
pub use membership::{EtcdDiscovery, EtcdOptions};
pub use message::{Cmd, MessageContext};
pub use node::{Node, NodeBuilder};
pub use rpc::{CallContext, Replyer};
pub use stats::StatsSnapshot;
pub use stream::{FrameError, Frames, Stream, StreamId, StreamMeta, StreamReader, StreamWriter};

/// The README's examples, compiled as doc tests so the README stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// Re-exported so handlers and callers name the same `Bytes`.
pub use bytes::Bytes;
