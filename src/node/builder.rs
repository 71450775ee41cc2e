//! Building a node: address, membership source, configuration, handlers.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

use super::Node;
use super::inner::{Handlers, Inner};
use crate::addr::LogicAddr;
use crate::config::NodeConfig;
use crate::error::HandlerError;
use crate::hash::FastMap;
use crate::membership::{Discovery, MemoryDiscovery};
use crate::message::{self, Cmd, MessageContext, MsgHandlers};
use crate::rpc::{CallContext, Replyer, RpcHandler};
use crate::stream::Stream;

/// Builds a [`Node`]. Handlers are registered here, before the node starts; a duplicate
/// registration makes [`Node::start`] fail with a configuration error naming it.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use clustergo::{Cmd, HandlerError, LogicAddr, Member, MemoryDiscovery, Node};
/// let me: LogicAddr = "1.1.1".parse()?;
/// let members = MemoryDiscovery::new([Member::new(me, "127.0.0.1:9001")]);
/// let node = Node::builder(me)
///     .discovery(members)
///     .rpc("echo", |_ctx, payload| async move { Ok::<_, HandlerError>(payload) })
///     .on_cmd(Cmd(1), |ctx, bytes| println!("{} sent {} bytes", ctx.from(), bytes.len()))
///     .build();
/// node.start().await?;
/// # Ok(()) }
/// ```
#[must_use]
pub struct NodeBuilder {
    addr: LogicAddr,
    config: NodeConfig,
    discovery: Option<Arc<dyn Discovery>>,
    listener: Option<std::net::TcpListener>,
    rpcs: FastMap<String, RpcHandler>,
    messages: MsgHandlers,
    stream_handler: Option<crate::stream::StreamHandler>,
    duplicates: Vec<String>,
    relay_layers: Option<crate::router::stack::RelayLayerFn>,
    sessions: Option<(
        crate::session::SessionConfig,
        crate::session::SessionHandler,
    )>,
}

impl std::fmt::Debug for NodeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeBuilder")
            .field("addr", &self.addr)
            .field("config", &self.config)
            .field("rpcs", &self.rpcs.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl NodeBuilder {
    pub(crate) fn new(addr: LogicAddr) -> Self {
        NodeBuilder {
            addr,
            config: NodeConfig::default(),
            discovery: None,
            listener: None,
            rpcs: FastMap::default(),
            messages: MsgHandlers::default(),
            stream_handler: None,
            duplicates: Vec::new(),
            relay_layers: None,
            sessions: None,
        }
    }

    /// The membership source. Default: an empty [`MemoryDiscovery`] (the node will not find
    /// itself, so set one).
    pub fn discovery(mut self, discovery: impl Discovery) -> Self {
        self.discovery = Some(Arc::new(discovery));
        self
    }

    /// Limits and timeouts.
    pub fn config(mut self, config: NodeConfig) -> Self {
        self.config = config;
        self
    }

    /// Serves on an already bound listener instead of binding the network address membership
    /// gives. Tests bind `127.0.0.1:0`, put the port in membership, then pass the listener, so
    /// no port can be taken in between.
    pub fn listener(mut self, listener: std::net::TcpListener) -> Self {
        self.listener = Some(listener);
        self
    }

    fn add_rpc(mut self, method: &str, handler: RpcHandler) -> Self {
        if self.rpcs.insert(method.to_owned(), handler).is_some() {
            self.duplicates.push(format!("RPC method {method:?}"));
        }
        self
    }

    /// Registers an async RPC handler: its output is the answer. Each request runs as its own
    /// task, at most [`NodeConfig::max_concurrent_requests`] at once.
    pub fn rpc<F, Fut>(self, method: &str, handler: F) -> Self
    where
        F: Fn(CallContext, Bytes) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Bytes, HandlerError>> + Send + 'static,
    {
        self.add_rpc(method, RpcHandler::from_async(handler))
    }

    /// Registers an RPC handler that answers through a [`Replyer`], now or later, from any
    /// thread. It runs on the link's reader, so it must not block: a game server moves the
    /// replyer into its game loop.
    pub fn rpc_with_replyer<F>(self, method: &str, handler: F) -> Self
    where
        F: Fn(CallContext, Bytes, Replyer) + Send + Sync + 'static,
    {
        self.add_rpc(method, RpcHandler::Replyer(Arc::new(handler)))
    }

    /// Registers the handler of raw-bytes messages with command `cmd`.
    pub fn on_cmd<F>(mut self, cmd: Cmd, handler: F) -> Self
    where
        F: Fn(MessageContext, Bytes) + Send + Sync + 'static,
    {
        let h: message::MsgHandler = Arc::new(move |ctx, payload| {
            handler(ctx, payload);
            Ok(())
        });
        if self.messages.by_cmd.insert(cmd.0, h).is_some() {
            self.duplicates.push(format!("message {cmd}"));
        }
        self
    }

    /// Registers the handler of protobuf messages of type `M` (keyed by `M`'s full name).
    pub fn on_message<M, F>(mut self, handler: F) -> Self
    where
        M: prost::Message + prost::Name + Default + 'static,
        F: Fn(MessageContext, M) + Send + Sync + 'static,
    {
        let name = M::full_name();
        if self
            .messages
            .by_type
            .insert(name.clone(), message::typed(handler))
            .is_some()
        {
            self.duplicates.push(format!("message type {name}"));
        }
        self
    }

    /// Accepts streams other nodes open to this one: `handler` runs as its own task for each
    /// accepted [`Stream`], which carries the opener's address and metadata. Without it,
    /// opens to this node are refused at once. The node's shutdown waits up to its grace
    /// period for open streams to close, then resets the rest.
    ///
    /// ```no_run
    /// # fn demo(builder: clustergo::NodeBuilder) -> clustergo::NodeBuilder {
    /// use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// builder.on_stream(|mut stream| async move {
    ///     // Echo until the peer half-closes, then close our side.
    ///     let mut buf = vec![0; 4096];
    ///     while let Ok(n @ 1..) = stream.read(&mut buf).await {
    ///         if stream.write_all(&buf[..n]).await.is_err() {
    ///             return;
    ///         }
    ///     }
    ///     let _ = stream.shutdown().await;
    /// })
    /// # }
    /// ```
    pub fn on_stream<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(Stream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if self.stream_handler.is_some() {
            self.duplicates.push("stream handler".into());
        }
        self.stream_handler = Some(Arc::new(move |s| Box::pin(handler(s))));
        self
    }

    /// Serves player sessions (see [`crate::session`]): `handler` runs once per session (in
    /// the task of the stream that started it), with a
    /// [`Session`](crate::session::Session) that lives across the
    /// client's reconnections and gateway restarts. It takes the place of
    /// [`NodeBuilder::on_stream`] (registering both fails the start): gateways open their
    /// streams to it, and a version 1 client gets a session that ends with its connection.
    ///
    /// ```no_run
    /// # fn demo(builder: clustergo::NodeBuilder) -> clustergo::NodeBuilder {
    /// use clustergo::session::SessionConfig;
    /// builder.on_session(SessionConfig::default(), |mut session| async move {
    ///     // Echo until the client ends the session (or it ends otherwise).
    ///     while let Ok(Some(frame)) = session.recv().await {
    ///         if session.send(frame).await.is_err() {
    ///             return;
    ///         }
    ///     }
    /// })
    /// # }
    /// ```
    pub fn on_session<F, Fut>(mut self, config: crate::session::SessionConfig, handler: F) -> Self
    where
        F: Fn(crate::session::Session) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if self.sessions.is_some() {
            self.duplicates.push("session handler".into());
        }
        self.sessions = Some((config, Arc::new(move |s| Box::pin(handler(s)))));
        self
    }

    /// Middleware for what this node relays, if it is a harbor: `layer` wraps
    /// [`relay::Forward`](crate::relay::Forward) (route and queue toward the next hop), and
    /// every envelope the harbor forwards goes through the result, built once. Any
    /// tower layer over `Service<Relayed>` fits: `tower::limit::RateLimitLayer`,
    /// `ConcurrencyLimitLayer`, `timeout::TimeoutLayer`, a filter of your own; combine several
    /// with `tower::ServiceBuilder`. A stack that is not ready refuses at once rather than
    /// waiting (see [`crate::relay`]). Calling this again replaces the layer.
    pub fn relay_layer<L>(mut self, layer: L) -> Self
    where
        L: tower_layer::Layer<crate::relay::Forward> + Send + Sync + 'static,
        L::Service: tower_service::Service<crate::relay::Relayed, Response = ()> + Send + 'static,
        <L::Service as tower_service::Service<crate::relay::Relayed>>::Error:
            Into<crate::relay::BoxError>,
        <L::Service as tower_service::Service<crate::relay::Relayed>>::Future: Send + 'static,
    {
        self.relay_layers = Some(crate::router::stack::layer_fn(layer));
        self
    }

    /// Builds the node. It does nothing until [`Node::start`].
    pub fn build(mut self) -> Node {
        let discovery = self
            .discovery
            .unwrap_or_else(|| Arc::new(MemoryDiscovery::default()));
        let mut sessions = None;
        if let Some((config, handler)) = self.sessions.take() {
            if self.stream_handler.is_some() {
                self.duplicates
                    .push("stream handler (on_stream and on_session)".into());
            }
            let (secret, dev) = self.config.resolve_secret();
            if dev {
                tracing::warn!(node = %self.addr, "sessions on the public development secret: anyone can forge their tokens (set NodeConfig::secret or CLUSTERGO_SECRET)");
            }
            let s = crate::session::Sessions::new(config, &secret, self.addr);
            sessions = Some(s.clone());
            self.stream_handler = Some(Arc::new(move |stream| {
                Box::pin(s.clone().accept(stream, handler.clone()))
            }));
        }
        let inner = Inner::new(
            self.addr,
            self.config,
            discovery,
            self.listener,
            Handlers {
                rpcs: self.rpcs,
                messages: self.messages,
                stream_handler: self.stream_handler,
                duplicates: self.duplicates,
                relay_layers: self.relay_layers,
                sessions: sessions.clone(),
            },
        );
        if let Some(s) = sessions {
            // Sessions end as soon as the shutdown has left membership, not when the node
            // closes: their clients are told at once (while gateways still have their links
            // to it), and their handlers get the rest of the grace period.
            let _ = s.stop.set(inner.sessions_stop.clone());
        }
        Node { inner }
    }
}
