//! What every clustergo binary does around its node, in one place (cargo feature `app`): the
//! harbor, the gateway and a game server built on the library start, place, serve and stop the
//! same way.
//!
//! - [`main`]: the runtime, logs and traces ([`crate::telemetry`]), and the exit codes every
//!   binary shares: 0 after a clean stop, 1 when something fails to start, 2 for a bad
//!   configuration (reported before anything was bound or connected).
//! - [`AddrSpec`]: a node address from configuration, `c.t.s` or `c.t.auto` (a server id
//!   claimed from etcd, [`EtcdDiscovery::claim`]).
//! - [`Placement::place`]: binds the node's listener and, for `auto`, claims its id, so the
//!   node can be built.
//! - [`until_stopped`]: serves until SIGTERM, Ctrl-C or the node closing by itself, then
//!   drains: `/ready` says no, the node leaves membership, keeps serving what still arrives
//!   until it is quiet ([`NodeConfig::drain_quiet`](crate::NodeConfig::drain_quiet)), lets
//!   calls and streams finish within the grace period, and closes.
//!
//! ```no_run
//! use clustergo::app::{AddrSpec, Placement};
//! use clustergo::{EtcdDiscovery, EtcdOptions, Node};
//!
//! fn main() -> std::process::ExitCode {
//!     clustergo::app::main("game-server", || Ok(()), |()| "game-server".into(), false, |()| async {
//!         let discovery = EtcdDiscovery::connect(["http://127.0.0.1:2379"], "/clustergo", EtcdOptions::default());
//!         let placement = Placement {
//!             addr: "1.1.auto".parse()?,
//!             listen: Some("0.0.0.0:9000".parse()?),
//!             advertise: Some("10.0.0.5:9000".into()),
//!             export: false,
//!         };
//!         let (addr, listener) = placement.place(&discovery).await?;
//!         let mut builder = Node::builder(addr).discovery(discovery);
//!         if let Some(l) = listener {
//!             builder = builder.listener(l);
//!         }
//!         let node = builder.build();
//!         node.start().await?;
//!         clustergo::app::until_stopped(&node, None).await.into_result()
//!     })
//! }
//! ```

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::str::FromStr;

use crate::addr::{HARBOR_TYPE, LogicAddr};
use crate::admin::AdminServer;
use crate::membership::EtcdDiscovery;
use crate::node::Node;

/// An error a binary reports and exits on.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Runs a binary called `name`: loads its configuration (an error exits 2 before anything
/// starts), builds a runtime (multi-threaded or current-thread), installs logs and traces under
/// the service name `service` gives for the configuration (`OTEL_SERVICE_NAME` overrides it),
/// runs `run`, flushes the traces, and exits 0 — or 1 with the error on stderr.
pub fn main<C, F, Fut>(
    name: &str,
    load: impl FnOnce() -> Result<C, String>,
    service: impl FnOnce(&C) -> String,
    multi_thread: bool,
    run: F,
) -> ExitCode
where
    F: FnOnce(C) -> Fut,
    Fut: Future<Output = Result<(), BoxError>>,
{
    let config = match load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(2);
        }
    };
    let service = service(&config);
    let rt = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    }
    .enable_all()
    .build();
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start a runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async {
        // Logs (RUST_LOG), and traces when OTEL_EXPORTER_OTLP_ENDPOINT is set.
        let telemetry = crate::telemetry::init(&service)?;
        let result = run(config).await;
        telemetry.shutdown().await;
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::from(1)
        }
    }
}

/// A node address as configuration gives it: fixed, or `cluster.type.auto` for the lowest free
/// server id claimed from etcd when the node starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrSpec {
    /// `c.t.s`: listed in membership by an operator.
    Fixed(LogicAddr),
    /// `c.t.auto`: claimed under the node's etcd lease ([`EtcdDiscovery::claim`]).
    Auto {
        /// The cluster.
        cluster: u16,
        /// The node type (255: a harbor).
        node_type: u8,
    },
}

impl AddrSpec {
    /// The cluster.
    pub fn cluster(&self) -> u16 {
        match self {
            AddrSpec::Fixed(a) => a.cluster(),
            AddrSpec::Auto { cluster, .. } => *cluster,
        }
    }

    /// The node type.
    pub fn node_type(&self) -> u8 {
        match self {
            AddrSpec::Fixed(a) => a.node_type(),
            AddrSpec::Auto { node_type, .. } => *node_type,
        }
    }
}

impl FromStr for AddrSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let Some(head) = s.strip_suffix(".auto") else {
            return s.parse().map(AddrSpec::Fixed).map_err(|e| format!("{e}"));
        };
        // Checked as a whole address with server 1: the same rules and messages.
        let probe: LogicAddr = format!("{head}.1").parse().map_err(|e| format!("{e}"))?;
        Ok(AddrSpec::Auto {
            cluster: probe.cluster(),
            node_type: probe.node_type(),
        })
    }
}

impl fmt::Display for AddrSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddrSpec::Fixed(a) => a.fmt(f),
            AddrSpec::Auto { cluster, node_type } => write!(f, "{cluster}.{node_type}.auto"),
        }
    }
}

/// Where a node listens and how it gets its address.
#[derive(Debug, Clone)]
pub struct Placement {
    /// The address, or `auto`.
    pub addr: AddrSpec,
    /// Where to listen for links. Unset: the network address membership lists (a fixed
    /// address only; `auto` needs it).
    pub listen: Option<SocketAddr>,
    /// The `host:port` peers dial, written into membership for an `auto` address (e.g. a
    /// pod's IP). Unset: `listen`, when it names a specific IP.
    pub advertise: Option<String>,
    /// An `auto` node's membership entry is visible to other clusters.
    pub export: bool,
}

impl Placement {
    /// A placement from configuration text: `listen` as `host:port`, checked with
    /// [`Placement::validate`].
    pub fn from_config(
        addr: AddrSpec,
        listen: Option<&str>,
        advertise: Option<String>,
        export: bool,
    ) -> Result<Placement, String> {
        let listen = match listen {
            Some(text) => Some(text.parse::<SocketAddr>().map_err(|e| {
                format!("listen {text:?}: {e} (want host:port, e.g. 0.0.0.0:9000)")
            })?),
            None => None,
        };
        let p = Placement {
            addr,
            listen,
            advertise,
            export,
        };
        p.validate()?;
        Ok(p)
    }

    /// Checks what can be checked before binding anything: an `auto` address needs `listen`,
    /// and a peer-dialable address (`advertise`, or a specific `listen` IP).
    pub fn validate(&self) -> Result<(), String> {
        if let AddrSpec::Auto { .. } = self.addr {
            let Some(listen) = self.listen else {
                return Err(format!(
                    "addr {}: an auto address needs `listen` (where the node binds)",
                    self.addr
                ));
            };
            if self.advertise.is_none() && listen.ip().is_unspecified() {
                return Err(format!(
                    "addr {}: listen {listen} binds every interface, so peers cannot dial it: \
                     set `advertise` (host:port, e.g. the pod's IP)",
                    self.addr
                ));
            }
        }
        if let Some(a) = &self.advertise {
            if a.rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(format!("advertise {a:?} must be host:port"));
            }
        }
        Ok(())
    }

    /// Binds the listener (when `listen` is set) and, for an `auto` address, claims the lowest
    /// free server id in `discovery`. Returns the node's address and the listener to pass to
    /// [`NodeBuilder::listener`](crate::NodeBuilder::listener). Build the node with the same
    /// `discovery` and start it at once: the claim lives on its lease from here on.
    pub async fn place(
        &self,
        discovery: &EtcdDiscovery,
    ) -> Result<(LogicAddr, Option<std::net::TcpListener>), BoxError> {
        self.validate()?;
        let listener = match self.listen {
            Some(at) => Some(
                std::net::TcpListener::bind(at)
                    .map_err(|e| format!("cannot listen on {at}: {e}"))?,
            ),
            None => None,
        };
        let addr = match self.addr {
            AddrSpec::Fixed(a) => a,
            AddrSpec::Auto { cluster, node_type } => {
                let bound = listener.as_ref().map(|l| l.local_addr()).transpose()?;
                let advertise = match (&self.advertise, bound) {
                    (Some(a), _) => a.clone(),
                    (None, Some(b)) => b.to_string(),
                    (None, None) => return Err("an auto address needs `listen`".into()),
                };
                let export = self.export || node_type == HARBOR_TYPE;
                discovery
                    .claim(cluster, node_type, advertise, export)
                    .await?
            }
        };
        Ok((addr, listener))
    }
}

/// Why [`until_stopped`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stop {
    /// SIGTERM (e.g. systemd, Kubernetes).
    Terminated,
    /// SIGINT (Ctrl-C).
    Interrupted,
    /// The node closed by itself (removed from membership, or its claimed id lost).
    Closed,
}

impl Stop {
    /// What a binary returns: `Ok` for a signal; an error for a node that stopped by itself,
    /// so the process exits 1 and a supervisor (systemd's `Restart=on-failure`, Kubernetes)
    /// starts it again.
    pub fn into_result(self) -> Result<(), BoxError> {
        match self {
            Stop::Terminated | Stop::Interrupted => Ok(()),
            Stop::Closed => Err("the node stopped by itself (removed from membership, its \
                                 network address changed, or its claimed id's lease lost)"
                .into()),
        }
    }
}

/// Serves until SIGTERM, Ctrl-C or the node closing by itself, then drains and stops it:
/// `/ready` answers "draining" (when `admin` is given), the node leaves membership and finishes
/// what is under way within its grace period (see [`Node::shutdown`]). Returns why it stopped.
pub async fn until_stopped(node: &Node, admin: Option<&AdminServer>) -> Stop {
    let why = wait_for_stop(node).await;
    match why {
        Stop::Terminated => tracing::info!(node = %node.addr(), "SIGTERM: draining"),
        Stop::Interrupted => tracing::info!(node = %node.addr(), "interrupted: draining"),
        Stop::Closed => {}
    }
    if let Some(a) = admin {
        a.set_draining();
    }
    node.shutdown().await;
    why
}

/// Waits for SIGTERM, Ctrl-C or the node closing by itself.
pub async fn wait_for_stop(node: &Node) -> Stop {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch for SIGTERM; Ctrl-C still stops");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = term => Stop::Terminated,
        _ = tokio::signal::ctrl_c() => Stop::Interrupted,
        () = node.closed() => Stop::Closed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_and_fixed_addresses_parse_and_print() {
        assert_eq!(
            "1.2.auto".parse::<AddrSpec>(),
            Ok(AddrSpec::Auto {
                cluster: 1,
                node_type: 2
            })
        );
        assert_eq!(
            "3.255.auto".parse::<AddrSpec>().unwrap().to_string(),
            "3.255.auto"
        );
        assert_eq!(
            "1.2.7".parse::<AddrSpec>(),
            Ok(AddrSpec::Fixed("1.2.7".parse().unwrap()))
        );
        assert!("0.2.auto".parse::<AddrSpec>().is_err());
        assert!("1.auto".parse::<AddrSpec>().is_err());
        assert!("1.2.x".parse::<AddrSpec>().is_err());
    }

    #[test]
    fn an_auto_address_needs_a_dialable_place() {
        let p = |listen: Option<&str>, advertise: Option<&str>| Placement {
            addr: "1.2.auto".parse().unwrap(),
            listen: listen.map(|l| l.parse().unwrap()),
            advertise: advertise.map(Into::into),
            export: false,
        };
        assert!(
            p(None, None)
                .validate()
                .unwrap_err()
                .contains("needs `listen`")
        );
        assert!(
            p(Some("0.0.0.0:9000"), None)
                .validate()
                .unwrap_err()
                .contains("set `advertise`")
        );
        assert!(
            p(Some("0.0.0.0:9000"), Some("10.0.0.5:9000"))
                .validate()
                .is_ok()
        );
        assert!(p(Some("127.0.0.1:9000"), None).validate().is_ok());
        assert!(p(Some("0.0.0.0:9000"), Some("nope")).validate().is_err());
    }
}
