//! `gateway`: terminates client TCP, WebSocket and KCP connections (TLS optional on the first
//! two) and opens, for each client, one stream to a game server of a configured type, then
//! passes frames both ways unchanged.
//!
//! Load config (file, env, flags) → validate → bind the client listeners → start the node with
//! etcd membership → serve until SIGTERM / Ctrl-C → stop accepting, close every client with a
//! reason and its stream cleanly, wait up to the grace period, leave membership. Exit codes: 0
//! after a clean stop, 1 when something fails to start, 2 for a bad configuration (nothing
//! was bound or connected).
//!
//! The node answers the RPC `gateway.status` with its counters, one `name=value` per line.

mod admission;
mod config;
mod metrics;
mod session;
mod state;
mod transport;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use clustergo::app::AddrSpec;
use clustergo::{Bytes, EtcdDiscovery, EtcdOptions, FileDiscovery, HandlerError, Node, NodeConfig};
use config::{Args, Config, Membership};
use state::Gateway;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn main() -> ExitCode {
    clustergo::app::main(
        "gateway",
        || {
            let config = Config::load(Args::parse())?;
            // TLS files are part of the configuration: unreadable ones are a configuration
            // error.
            let tcp = config.tcp.as_ref().map(transport::framed::tls_acceptor);
            let ws = config
                .websocket
                .as_ref()
                .map(transport::framed::tls_acceptor);
            let tls = (tcp.transpose()?.flatten(), ws.transpose()?.flatten());
            Ok((config, tls))
        },
        |(c, _)| format!("gateway-{}", c.placement.addr),
        true,
        |(config, tls)| serve(config, tls),
    )
}

type Tls = Option<tokio_rustls::TlsAcceptor>;

async fn serve(
    config: Config,
    (tcp_tls, ws_tls): (Tls, Tls),
) -> Result<(), clustergo::app::BoxError> {
    // Bind the client listeners first: a taken port fails before the gateway joins membership.
    let bind = |what: &str, l: &config::Listen| format!("cannot bind {what} {}: ", l.addr);
    let tcp = match &config.tcp {
        Some(l) => Some(
            tokio::net::TcpListener::bind(l.addr)
                .await
                .map_err(|e| bind("tcp", l) + &e.to_string())?,
        ),
        None => None,
    };
    let ws = match &config.websocket {
        Some(l) => Some(
            tokio::net::TcpListener::bind(l.addr)
                .await
                .map_err(|e| bind("websocket", l) + &e.to_string())?,
        ),
        None => None,
    };
    let kcp = match &config.kcp {
        Some(l) => Some(
            tokio::net::UdpSocket::bind(l.addr)
                .await
                .map_err(|e| bind("kcp", l) + &e.to_string())?,
        ),
        None => None,
    };

    // The node's listener is bound (and an `auto` id claimed) before the node is built.
    let (me, node_listener, discovery): (_, _, Arc<dyn clustergo::Discovery>) =
        match &config.membership {
            Membership::Etcd {
                endpoints,
                prefix,
                lease_ttl,
            } => {
                let etcd = EtcdDiscovery::connect(
                    endpoints.clone(),
                    prefix.clone(),
                    EtcdOptions::default().lease_ttl(*lease_ttl),
                );
                let (me, l) = config.placement.place(&etcd).await?;
                (me, l, Arc::new(etcd))
            }
            Membership::File(path) => {
                let AddrSpec::Fixed(me) = config.placement.addr else {
                    return Err("an auto address needs etcd".into());
                };
                let l = config
                    .placement
                    .listen
                    .map(|at| {
                        std::net::TcpListener::bind(at)
                            .map_err(|e| format!("cannot listen on {at}: {e}"))
                    })
                    .transpose()?;
                (me, l, Arc::new(FileDiscovery::open(path)?))
            }
        };
    let status_of: Arc<std::sync::OnceLock<Arc<Gateway>>> = Arc::default();
    let status_handle = status_of.clone();
    let builder = match node_listener {
        Some(l) => Node::builder(me).listener(l),
        None => Node::builder(me),
    };
    let node = builder
        .discovery(discovery)
        .config(with_tls(
            NodeConfig::default()
                .secret(config.secret.clone())
                .shutdown_grace(config.shutdown_grace)
                .stream_open_timeout(config.limits.open_timeout)
                .max_streams(config.limits.max_clients.max(1024)),
            config.mesh_tls.clone(),
        ))
        .rpc("gateway.status", move |_, _| {
            let text = status_handle
                .get()
                .map(|g| state::status(g))
                .unwrap_or_default();
            async move { Ok::<_, HandlerError>(Bytes::from(text)) }
        })
        .build();
    let gw = Arc::new(Gateway {
        node: node.clone(),
        backend_type: config.backend_type,
        policy: config.policy,
        admission: admission::Admission::new(&config.limits),
        limits: config.limits.clone(),
        shutdown: CancellationToken::new(),
        tasks: TaskTracker::new(),
        stats: Default::default(),
        metrics: Default::default(),
        drains: Default::default(),
        tokens: clustergo::session::TokenKey::from_secret(&config.secret),
    });
    let _ = status_of.set(gw.clone());
    // Up before the node starts: `/live` answers and `/ready` says why not while it starts.
    let admin = match config.admin_listen {
        Some(at) => {
            let mut admin = clustergo::admin::Admin::new().node(&node);
            admin
                .registry_mut()
                .register_collector(Box::new(metrics::GatewayCollector(gw.clone())));
            Some(
                admin
                    .serve(at)
                    .await
                    .map_err(|e| format!("admin_listen {at}: {e}"))?,
            )
        }
        None => None,
    };
    node.start().await?;
    let listeners = TaskTracker::new();
    let mut lines = vec![format!(
        "gateway {me} node on {}",
        node.local_addr().ok_or("no node listener")?
    )];
    if let Some(l) = tcp {
        lines.push(format!("tcp on {}", l.local_addr()?));
        listeners.spawn(transport::framed::tcp(gw.clone(), l, tcp_tls));
    }
    if let Some(l) = ws {
        let w = config
            .websocket
            .as_ref()
            .ok_or("websocket listener without config")?;
        lines.push(format!("websocket on {}{}", l.local_addr()?, w.path));
        listeners.spawn(transport::ws::websocket(
            gw.clone(),
            l,
            ws_tls,
            w.path.clone(),
            w.protocols.clone(),
        ));
    }
    // The KCP socket serves until shutdown and then until its last session has ended: it is
    // one of the gateway's tasks.
    if let Some(l) = kcp {
        lines.push(format!("kcp on {}", l.local_addr()?));
        gw.tasks.spawn(transport::kcp::serve(gw.clone(), l));
    }
    if let Some(a) = &admin {
        lines.push(format!("admin on {}", a.local_addr()));
    }
    admission::check_descriptors(&config.limits);
    // One line for tools and tests to wait for: everything is bound and the node is up.
    println!("{}", lines.join(", "));
    listeners.spawn(state::watch_backends(gw.clone()));

    let stop = clustergo::app::wait_for_stop(&node).await;
    if stop != clustergo::app::Stop::Closed {
        tracing::info!(gateway = %me, why = ?stop, "shutting down");
    }
    if let Some(a) = &admin {
        a.set_draining();
    }
    let clients = gw.active();
    gw.shutdown.cancel();
    listeners.close();
    listeners.wait().await;
    gw.tasks.close();
    if tokio::time::timeout(config.shutdown_grace, gw.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = gw.active(),
            "grace period over with clients still closing"
        );
    }
    node.shutdown().await;
    println!("gateway {me} stopped ({clients} clients closed)");
    stop.into_result()
}

/// The node's configuration with TLS on links, if `[mesh_tls]` configured it.
fn with_tls(c: NodeConfig, tls: Option<clustergo::LinkTls>) -> NodeConfig {
    match tls {
        Some(t) => c.tls(t),
        None => c,
    }
}
