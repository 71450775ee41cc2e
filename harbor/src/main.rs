//! `harbor`: a clustergo node of type 255 that carries traffic between clusters.
//!
//! Load config (file, env, flags) → validate → install logging → start the node with etcd
//! membership → serve until SIGTERM / Ctrl-C (or until membership removes it) → leave
//! membership and drain within the grace period. Exit codes: 0 after a clean stop, 1 when the
//! node fails to start, 2 for a bad configuration (nothing was bound or connected). The
//! address may be `cluster.255.auto`: the lowest free harbor id is claimed from etcd (see
//! `clustergo::app`).
//!
//! Besides forwarding, a harbor answers the RPC `harbor.status` with its view of every
//! harbor: one line each, `addr net_addr available=… linked=…`.

mod config;
mod policy;

use std::process::ExitCode;

use clap::Parser;
use clustergo::{Bytes, EtcdDiscovery, EtcdOptions, HandlerError, Node, NodeConfig};
use config::{Args, Config};

fn main() -> ExitCode {
    clustergo::app::main(
        "harbor",
        || Config::load(Args::parse()),
        |c| format!("harbor-{}", c.placement.addr),
        false,
        serve,
    )
}

async fn serve(config: Config) -> Result<(), clustergo::app::BoxError> {
    let mut discovery = EtcdDiscovery::connect(
        config.endpoints.clone(),
        config.prefix.clone(),
        EtcdOptions::default().lease_ttl(config.lease_ttl),
    );
    if let Some((endpoints, prefix)) = &config.center {
        discovery = discovery.with_harbors_center(endpoints.clone(), prefix.clone());
    }
    // The listener is bound (and an `auto` id claimed) before the node is built.
    let (me, listener) = config.placement.place(&discovery).await?;
    let builder = Node::builder(me)
        .discovery(discovery)
        .config(with_tls(
            NodeConfig::default()
                .secret(config.secret.clone())
                .shutdown_grace(config.shutdown_grace)
                .max_envelope(config.max_envelope),
            config.mesh_tls.clone(),
        ))
        .rpc("harbor.status", |ctx, _| {
            let text = status(ctx.node());
            async move { Ok::<_, HandlerError>(Bytes::from(text)) }
        });
    let builder = match listener {
        Some(l) => builder.listener(l),
        None => builder,
    };
    let policy = policy::Policy::new(config.deny.clone(), config.relay_rate);
    let builder = if policy.is_active() {
        builder.relay_layer(policy)
    } else {
        builder
    };
    let node = builder.build();
    // Up before the node starts: `/live` answers and `/ready` says why not while it starts.
    let admin = match config.admin_listen {
        Some(at) => Some(
            clustergo::admin::Admin::new()
                .node(&node)
                .serve(at)
                .await
                .map_err(|e| format!("admin_listen {at}: {e}"))?,
        ),
        None => None,
    };
    node.start().await?;
    let admin_text = admin
        .as_ref()
        .map(|a| format!(", admin on {}", a.local_addr()))
        .unwrap_or_default();
    println!(
        "harbor {me} listening on {}{admin_text}",
        node.local_addr().ok_or("no listener")?
    );
    let stop = clustergo::app::until_stopped(&node, admin.as_ref()).await;
    println!("harbor {me} stopped");
    stop.into_result()
}

/// One line per harbor this one sees.
fn status(node: &Node) -> String {
    let mut lines: Vec<String> = node
        .members()
        .into_iter()
        .filter(|m| m.addr.is_harbor())
        .map(|m| {
            format!(
                "{} {} available={} linked={}",
                m.addr,
                m.net_addr,
                m.available,
                m.addr == node.addr() || node.is_linked(m.addr)
            )
        })
        .collect();
    lines.sort();
    lines.join("\n")
}

/// The node's configuration with TLS on links, if `[mesh_tls]` configured it.
fn with_tls(c: NodeConfig, tls: Option<clustergo::LinkTls>) -> NodeConfig {
    match tls {
        Some(t) => c.tls(t),
        None => c,
    }
}
