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

mod config;
mod listen;
mod session;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use clap::Parser;
use clustergo::{Bytes, EtcdDiscovery, EtcdOptions, FileDiscovery, HandlerError, Node, NodeConfig};
use config::{Args, Config, Membership};
use session::Gateway;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn main() -> ExitCode {
    let config = match Config::load(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gateway: {e}");
            return ExitCode::from(2);
        }
    };
    // TLS files are part of the configuration: unreadable ones are a configuration error.
    let tls = match (
        config.tcp.as_ref().map(listen::tls_acceptor).transpose(),
        config
            .websocket
            .as_ref()
            .map(listen::tls_acceptor)
            .transpose(),
    ) {
        (Ok(t), Ok(w)) => (t.flatten(), w.flatten()),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("gateway: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gateway: cannot start a runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(config, tls)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway: {e}");
            ExitCode::from(1)
        }
    }
}

type Tls = Option<tokio_rustls::TlsAcceptor>;

async fn run(
    config: Config,
    (tcp_tls, ws_tls): (Tls, Tls),
) -> Result<(), Box<dyn std::error::Error>> {
    let me = config.addr;
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
            tokio_kcp::KcpListener::bind(clustergo_client::wire::kcp_config(), l.addr)
                .await
                .map_err(|e| bind("kcp", l) + &e.to_string())?,
        ),
        None => None,
    };

    let discovery: Arc<dyn clustergo::Discovery> = match &config.membership {
        Membership::Etcd {
            endpoints,
            prefix,
            lease_ttl,
        } => Arc::new(EtcdDiscovery::connect(
            endpoints.clone(),
            prefix.clone(),
            EtcdOptions::default().lease_ttl(*lease_ttl),
        )),
        Membership::File(path) => Arc::new(FileDiscovery::open(path)?),
    };
    let status_of: Arc<std::sync::OnceLock<Arc<Gateway>>> = Arc::default();
    let status_handle = status_of.clone();
    let node = Node::builder(me)
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
            let text = status_handle.get().map(|g| status(g)).unwrap_or_default();
            async move { Ok::<_, HandlerError>(Bytes::from(text)) }
        })
        .build();
    node.start().await?;
    let gw = Arc::new(Gateway {
        node: node.clone(),
        backend_type: config.backend_type,
        policy: config.policy,
        slots: Arc::new(Semaphore::new(config.limits.max_clients)),
        limits: config.limits.clone(),
        shutdown: CancellationToken::new(),
        tasks: TaskTracker::new(),
        stats: Default::default(),
        drains: Default::default(),
    });
    let _ = status_of.set(gw.clone());
    let listeners = TaskTracker::new();
    let mut lines = vec![format!(
        "gateway {me} node on {}",
        node.local_addr().ok_or("no node listener")?
    )];
    if let Some(l) = tcp {
        lines.push(format!("tcp on {}", l.local_addr()?));
        listeners.spawn(listen::tcp(gw.clone(), l, tcp_tls));
    }
    if let Some(l) = ws {
        let w = config
            .websocket
            .as_ref()
            .ok_or("websocket listener without config")?;
        lines.push(format!("websocket on {}{}", l.local_addr()?, w.path));
        listeners.spawn(listen::websocket(
            gw.clone(),
            l,
            ws_tls,
            w.path.clone(),
            w.protocols.clone(),
        ));
    }
    // The KCP listener comes back when its loop ends and is kept until the sessions are done.
    let kcp = match kcp {
        Some(l) => {
            lines.push(format!("kcp on {}", l.local_addr()?));
            Some(tokio::spawn(listen::kcp(gw.clone(), l)))
        }
        None => None,
    };
    check_descriptors(&config.limits);
    // One line for tools and tests to wait for: everything is bound and the node is up.
    println!("{}", lines.join(", "));
    listeners.spawn(watch_backends(gw.clone()));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!(gateway = %me, "SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!(gateway = %me, "interrupted: shutting down"),
        _ = node.closed() => {}
    }
    let clients = gw.active();
    gw.shutdown.cancel();
    listeners.close();
    listeners.wait().await;
    let kcp = match kcp {
        Some(loop_) => loop_.await.ok(),
        None => None,
    };
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
    drop(kcp);
    node.shutdown().await;
    println!("gateway {me} stopped ({clients} clients closed)");
    Ok(())
}

/// Logs the game servers clients can go to whenever that set changes, and drains the clients
/// of servers that leave it.
async fn watch_backends(gw: Arc<Gateway>) {
    let backends = |members: &[clustergo::Member]| {
        let mut v: Vec<_> = members
            .iter()
            .filter(|m| m.available && m.addr.node_type() == gw.backend_type)
            .map(|m| m.addr)
            .collect();
        v.sort();
        v
    };
    let mut last: Option<Vec<clustergo::LogicAddr>> = None;
    loop {
        let now = backends(&gw.node.members());
        if last.as_ref() != Some(&now) {
            let list: Vec<String> = now.iter().map(|a| a.to_string()).collect();
            tracing::info!(
                "game servers of type {} available: [{}]",
                gw.backend_type,
                list.join(", ")
            );
            if let Some(before) = &last {
                let gone: Vec<_> = before
                    .iter()
                    .filter(|a| !now.contains(a))
                    .copied()
                    .collect();
                if !gone.is_empty() {
                    tracing::info!(servers = ?gone, "game servers left: closing their clients");
                    gw.drain(&gone);
                }
            }
            last = Some(now);
        }
        let changed = gw.node.wait_members(
            |m| Some(backends(m)) != last,
            std::time::Duration::from_secs(3600),
        );
        tokio::select! {
            _ = changed => {}
            () = gw.shutdown.cancelled() => return,
        }
    }
}

/// Warns when the process may not open a descriptor per client: accepts would then fail
/// ("too many open files") before any client hears that the gateway is full.
fn check_descriptors(limits: &config::Limits) {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
        });
    let need = limits.max_clients + 3 * limits.max_handshakes + 256;
    if let Some(soft) = soft.and_then(|s| s.parse::<usize>().ok())
        && soft < need
    {
        tracing::warn!(
            soft_limit = soft,
            needed = need,
            "the open-file limit is below max_clients + handshakes: raise it (ulimit -n) or lower limits.max_clients"
        );
    }
}

fn status(gw: &Gateway) -> String {
    let s = &gw.stats;
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    format!(
        "clients={}\naccepted={}\nturned_away={}\nclient_faults={}\nserver_failures={}\nframes_up={}\nframes_down={}",
        gw.active(),
        n(&s.accepted),
        n(&s.turned_away),
        n(&s.client_faults),
        n(&s.server_failures),
        n(&s.frames_up),
        n(&s.frames_down),
    )
}

/// The node's configuration with TLS on links, if `[mesh_tls]` configured it.
fn with_tls(c: NodeConfig, tls: Option<clustergo::LinkTls>) -> NodeConfig {
    match tls {
        Some(t) => c.tls(t),
        None => c,
    }
}
