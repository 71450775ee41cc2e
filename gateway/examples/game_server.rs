//! A game server behind the gateway: each client arrives as a session (with its stream's
//! metadata), and game code reads and writes whole frames through it.
//!
//! Frames are echoed, except a few commands for trying things out:
//! - `whoami` → this server's address;
//! - `meta` → the stream's open metadata, `key=value` joined by spaces;
//! - `kick:<reason>` → ends the session: the client is closed with that reason;
//! - `bye` → ends the session cleanly.
//!
//! Other nodes may call the RPC `game.whoami` (answer: this server's address).
//!
//! Clients get a session (`clustergo::session`): a session client resumes it across lost
//! connections and gateway restarts; a version 1 client's session ends with its connection.
//!
//! Run: `cargo run -p gateway --example game_server -- --etcd http://127.0.0.1:2379 --addr 1.1.1`
//! (a fixed address must be listed under the prefix, e.g. with `clusterctl`), or with
//! `--addr 1.1.auto --listen 127.0.0.1:0` to claim the lowest free server id from etcd. Every
//! flag also reads an environment variable (`GAME_ADDR`, `GAME_LISTEN`, `GAME_ADVERTISE`,
//! `GAME_ETCD`, `GAME_PREFIX`, `GAME_LEASE_TTL_SECS`, `GAME_SHUTDOWN_GRACE_SECS`,
//! `GAME_ADMIN_LISTEN`); the cluster secret comes from `CLUSTERGO_SECRET`. On SIGTERM or Ctrl-C
//! it drains (see `clustergo::app`) and exits 0.

use std::time::Duration;

use clap::Parser;
use clustergo::app::{AddrSpec, Placement};
use clustergo::session::{Session, SessionConfig};
use clustergo::{EtcdDiscovery, EtcdOptions, LogicAddr, Node, NodeConfig};

/// A game server behind clustergo gateways (echo, with a few test commands).
#[derive(Debug, Parser)]
struct Args {
    /// `cluster.type.server`, or `cluster.type.auto` (needs `--listen`).
    #[arg(long, env = "GAME_ADDR")]
    addr: AddrSpec,
    /// Where to listen for links; default: the address membership lists.
    #[arg(long, env = "GAME_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// The `host:port` peers dial, written into membership for an `auto` address.
    #[arg(long, env = "GAME_ADVERTISE")]
    advertise: Option<String>,
    /// etcd endpoint(s), comma-separated.
    #[arg(
        long,
        env = "GAME_ETCD",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    etcd: Vec<String>,
    /// Key prefix of the membership in etcd.
    #[arg(long, env = "GAME_PREFIX", default_value = "/clustergo")]
    prefix: String,
    /// Liveness lease TTL, seconds.
    #[arg(long, env = "GAME_LEASE_TTL_SECS", default_value_t = 2)]
    lease_ttl_secs: u64,
    /// How long a shutdown lets clients' streams and calls finish, seconds.
    #[arg(long, env = "GAME_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    shutdown_grace_secs: u64,
    /// Where the admin endpoints listen (`/metrics`, `/live`, `/ready`, `/status`).
    #[arg(long, env = "GAME_ADMIN_LISTEN")]
    admin_listen: Option<std::net::SocketAddr>,
    /// Run on the public development secret when `CLUSTERGO_SECRET` is unset.
    #[arg(long)]
    insecure_dev: bool,
}

fn main() -> std::process::ExitCode {
    clustergo::app::main(
        "game_server",
        || {
            // `--help` and bad flags exit here, with clap's own codes.
            let args = Args::parse();
            let secret = clustergo::binary_secret(args.insecure_dev, false)?;
            let placement = Placement {
                addr: args.addr,
                listen: args.listen,
                advertise: args.advertise.clone(),
                export: false,
            };
            placement.validate()?;
            Ok((args, placement, secret))
        },
        // Logs, and traces when OTEL_EXPORTER_OTLP_ENDPOINT is set: a client's session at the
        // gateway and this server's work for it are one trace.
        |(args, _, _)| format!("game-server-{}", args.addr),
        false,
        |(args, placement, secret)| async move {
            let discovery = EtcdDiscovery::connect(
                args.etcd.clone(),
                args.prefix.clone(),
                EtcdOptions::default().lease_ttl(Duration::from_secs(args.lease_ttl_secs)),
            );
            let (me, listener) = placement.place(&discovery).await?;
            let builder = Node::builder(me)
                .discovery(discovery)
                .config(
                    NodeConfig::default()
                        .secret(secret)
                        .shutdown_grace(Duration::from_secs(args.shutdown_grace_secs)),
                )
                .on_session(SessionConfig::default(), move |s| session(me, s))
                // For other nodes: answers with this server's address.
                .rpc("game.whoami", move |_, _| async move {
                    Ok::<_, clustergo::HandlerError>(bytes::Bytes::from(me.to_string()))
                });
            let node = match listener {
                Some(l) => builder.listener(l),
                None => builder,
            }
            .build();
            let admin = match args.admin_listen {
                Some(at) => Some(clustergo::admin::Admin::new().node(&node).serve(at).await?),
                None => None,
            };
            node.start().await?;
            println!(
                "game server {me} listening on {}",
                node.local_addr().ok_or("no listener")?
            );
            let stop = clustergo::app::until_stopped(&node, admin.as_ref()).await;
            println!("game server {me} stopped");
            stop.into_result()
        },
    )
}

/// One player's session: it lives across the client's reconnections (a session client) or
/// for one connection (a version 1 client).
async fn session(me: LogicAddr, mut session: Session) {
    loop {
        let frame = match session.recv().await {
            Ok(Some(f)) => f,
            // The client ended the session, or it ended (resume window passed, …).
            Ok(None) | Err(_) => return,
        };
        let reply = match &frame[..] {
            b"whoami" => me.to_string().into(),
            b"meta" => session
                .metadata()
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
                .into(),
            // Ends the session cleanly.
            b"bye" => return,
            f if f.starts_with(b"kick:") => {
                let reason = String::from_utf8_lossy(&f[5..]).into_owned();
                session.close(&reason).await;
                return;
            }
            _ => frame,
        };
        if session.send(reply).await.is_err() {
            return;
        }
    }
}
