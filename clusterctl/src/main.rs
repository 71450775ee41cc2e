//! `clusterctl`: manage clustergo membership in etcd.
//!
//! Keys under `--prefix` (see `clustergo::membership::member_key`): `members/<c.t.s>` holds a
//! member's JSON configuration, `alive/<c.t.s>` exists while the node holds its lease.

mod store;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use clustergo::LogicAddr;

use store::Store;

/// Manage clustergo membership kept in etcd.
#[derive(Debug, Parser)]
#[command(name = "clusterctl", version)]
struct Cli {
    /// etcd endpoints, comma-separated.
    #[arg(
        long,
        env = "CLUSTERGO_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    endpoints: Vec<String>,
    /// Key prefix of this deployment.
    #[arg(long, env = "CLUSTERGO_ETCD_PREFIX", default_value = "/clustergo")]
    prefix: String,
    /// Timeout of each etcd request, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List, add, change and remove members.
    #[command(subcommand)]
    Members(Members),
    /// Mark a node unavailable and wait until it is idle.
    ///
    /// Gateways and `get_addr_by_type` stop picking it (gateways move its clients); then wait,
    /// showing progress, until it reports no streams (clients) and no calls in flight. Exits 1
    /// if the deadline passes first (the node stays unavailable).
    Drain {
        /// The node, `c.t.s`.
        addr: LogicAddr,
        /// How long to wait, seconds.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
    /// Mark a drained node available again.
    Undrain {
        /// The node, `c.t.s`.
        addr: LogicAddr,
    },
    /// Run a whole deployment on this machine until Ctrl-C.
    ///
    /// From a file (e.g. `deploy/local/cluster.toml`): etcd, harbors, gateways, game servers
    /// and service nodes, each its own process with its own log; Ctrl-C drains and stops them
    /// all. Ignores `--endpoints`.
    Up {
        /// The deployment file.
        file: PathBuf,
    },
    /// Explain the path from one node to another under the current membership.
    Route {
        /// Sending node, `c.t.s`.
        from: LogicAddr,
        /// Receiving node, `c.t.s`.
        to: LogicAddr,
    },
}

#[derive(Debug, Subcommand)]
enum Members {
    /// Table of every member: address, network address, export, available, alive.
    List,
    /// Add a member (fails if it is already listed).
    Add {
        /// Logical address, `c.t.s` (type 255 for a harbor).
        addr: LogicAddr,
        /// Network address peers dial, `host:port`.
        net_addr: String,
        /// Visible to other clusters.
        #[arg(long)]
        export: bool,
        /// Listed but not to be picked.
        #[arg(long)]
        unavailable: bool,
    },
    /// Change a member's network address or flags (fails if it is not listed).
    Update {
        /// Logical address, `c.t.s`.
        addr: LogicAddr,
        /// New network address, `host:port`.
        #[arg(long)]
        net_addr: Option<String>,
        /// Visible to other clusters.
        #[arg(long)]
        export: Option<bool>,
        /// May be picked.
        #[arg(long)]
        available: Option<bool>,
    },
    /// Set a member's flags: `--available=false`, `--export=true`.
    Set {
        /// Logical address, `c.t.s`.
        addr: LogicAddr,
        /// May be picked.
        #[arg(long)]
        available: Option<bool>,
        /// Visible to other clusters.
        #[arg(long)]
        export: Option<bool>,
    },
    /// Remove a member (a running node that is removed shuts itself down).
    Remove {
        /// Logical address, `c.t.s`.
        addr: LogicAddr,
    },
    /// Add or replace every member of a membership TOML file (the file discovery's format).
    Import {
        /// The file.
        file: PathBuf,
    },
    /// Write every member as membership TOML (to stdout, or a file).
    Export {
        /// The file; stdout when absent.
        file: Option<PathBuf>,
    },
}

async fn run(cli: Cli) -> Result<String, String> {
    if let Command::Up { file } = &cli.command {
        return up::up(file).await;
    }
    let mut store = Store::connect(
        &cli.endpoints,
        &cli.prefix,
        Duration::from_millis(cli.timeout_ms),
    )
    .await?;
    match cli.command {
        Command::Members(Members::List) => store.list().await,
        Command::Members(Members::Add {
            addr,
            net_addr,
            export,
            unavailable,
        }) => store.add(addr, net_addr, export, !unavailable).await,
        Command::Members(Members::Update {
            addr,
            net_addr,
            export,
            available,
        }) => {
            if net_addr.is_none() && export.is_none() && available.is_none() {
                return Err("members update: give --net-addr, --export and/or --available".into());
            }
            store.update(addr, net_addr, export, available).await
        }
        Command::Members(Members::Set {
            addr,
            available,
            export,
        }) => {
            if available.is_none() && export.is_none() {
                return Err("members set: give --available=<bool> and/or --export=<bool>".into());
            }
            store.update(addr, None, export, available).await
        }
        Command::Members(Members::Remove { addr }) => store.remove(addr).await,
        Command::Members(Members::Import { file }) => store.import(&file).await,
        Command::Members(Members::Export { file }) => store.export(file.as_deref()).await,
        Command::Route { from, to } => store.route(from, to).await,
        Command::Drain { addr, timeout_secs } => {
            store.drain(addr, Duration::from_secs(timeout_secs)).await
        }
        Command::Undrain { addr } => store.undrain(addr).await,
        Command::Up { .. } => unreachable!("handled above"),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("clusterctl: {e}");
            ExitCode::FAILURE
        }
    }
}
