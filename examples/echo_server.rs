//! The echo service, served through the API generated from `proto/examples/echo.proto`.
//!
//! Run: `cargo run --example echo_server -- examples/members.toml [1.2.1]`
//! (then `cargo run --example echo_client -- examples/members.toml`). Stops (draining) on
//! Ctrl-C or SIGTERM.
//!
//! With membership in etcd instead of a file: `echo_server etcd://127.0.0.1:2379/clustergo/demo`
//! (the node must be listed under that prefix, e.g. with `clusterctl`); the liveness lease TTL
//! comes from `CLUSTERGO_LEASE_TTL_SECS` (default 5). With etcd, the address may be `1.2.auto`:
//! the lowest free server id of cluster 1, type 2 is claimed under the node's lease.

use std::sync::Arc;
use std::time::Duration;

use clustergo::{
    CallContext, Discovery, EtcdDiscovery, EtcdOptions, FileDiscovery, HandlerError, LogicAddr,
    Node, NodeConfig,
};

// A binary uses only part of the generated API.
#[allow(dead_code, unreachable_pub)]
mod echo {
    include!(concat!(env!("OUT_DIR"), "/examples.echo.v1.rs"));
}
use echo::{ChatLine, EchoReply, EchoRequest, EchoServer, register_echo};

struct Echo {
    me: LogicAddr,
}

impl EchoServer for Echo {
    async fn call(
        &self,
        ctx: CallContext,
        request: EchoRequest,
    ) -> Result<EchoReply, HandlerError> {
        println!("[{}] echo from {}: {:?}", self.me, ctx.from(), request.text);
        Ok(EchoReply {
            text: request.text,
            served_by: self.me.to_string(),
        })
    }
}

/// `etcd://host:port/prefix` or a membership file.
fn membership(spec: &str) -> Result<Arc<dyn Discovery>, Box<dyn std::error::Error>> {
    match etcd_of(spec)? {
        Some(etcd) => Ok(Arc::new(etcd)),
        None => Ok(Arc::new(FileDiscovery::open(spec)?)),
    }
}

/// The etcd source an `etcd://host:port/prefix` spec names; `None` for a file.
fn etcd_of(spec: &str) -> Result<Option<EtcdDiscovery>, Box<dyn std::error::Error>> {
    let Some(rest) = spec.strip_prefix("etcd://") else {
        return Ok(None);
    };
    let (host, prefix) = rest.split_once('/').ok_or("etcd://host:port/prefix")?;
    let ttl = std::env::var("CLUSTERGO_LEASE_TTL_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let options = EtcdOptions::default().lease_ttl(Duration::from_secs(ttl));
    Ok(Some(EtcdDiscovery::connect(
        [format!("http://{host}")],
        format!("/{prefix}"),
        options,
    )))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let members = args
        .next()
        .unwrap_or_else(|| "examples/members.toml".into());
    let addr = args.next().unwrap_or_else(|| "1.2.1".into());
    let discovery = membership(&members)?;
    // `c.t.auto`: claim the lowest free server id from etcd, listening on a free port.
    let (me, listener) = match addr.strip_suffix(".auto") {
        None => (addr.parse::<LogicAddr>()?, None),
        Some(head) => {
            let probe: LogicAddr = format!("{head}.1").parse()?;
            let etcd = etcd_of(&members)?.ok_or("an auto address needs etcd membership")?;
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            let me = etcd
                .claim(
                    probe.cluster(),
                    probe.node_type(),
                    listener.local_addr()?.to_string(),
                    false,
                )
                .await?;
            (me, Some((listener, etcd)))
        }
    };
    let builder = match listener {
        None => Node::builder(me).discovery(discovery),
        // The node follows the claimed lease: it is built on the source that claimed.
        Some((l, etcd)) => Node::builder(me).discovery(etcd).listener(l),
    };
    let builder = builder
        // CLUSTERGO_SECRET when set (a deployment's), else the examples' own.
        .config(NodeConfig::default().secret(
            std::env::var(clustergo::SECRET_ENV).unwrap_or_else(|_| "echo-example-secret".into()),
        ))
        .on_message(move |ctx, line: ChatLine| {
            println!(
                "[{me}] chat from {} ({}): {:?}",
                line.from_player,
                ctx.from(),
                line.text
            );
        });
    let node = register_echo(builder, Echo { me }).build();
    node.start().await?;
    println!(
        "echo server {me} listening on {}",
        node.local_addr().ok_or("no listener")?
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => node.shutdown().await,
        _ = term.recv() => node.shutdown().await,
        _ = node.closed() => {}
    }
    println!("echo server {me} stopped");
    Ok(())
}
