//! The harbor's configuration: a TOML file, environment variables and flags (each overriding
//! the one before), validated before anything binds or connects.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use clustergo::app::{AddrSpec, Placement};
use serde::Deserialize;

/// Command line (each flag also reads an environment variable).
#[derive(Debug, Parser)]
#[command(
    name = "harbor",
    version,
    about = "Carries clustergo traffic between clusters"
)]
pub(crate) struct Args {
    /// TOML configuration file.
    #[arg(long, env = "HARBOR_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Run without a cluster secret, on the public development one: anyone who can reach this
    /// harbor can then pass for any node. For a developer's machine only; without it, a
    /// missing `CLUSTERGO_SECRET` stops the harbor before it starts.
    #[arg(long)]
    pub(crate) insecure_dev: bool,
    /// This harbor's logical address, `cluster.255.server`, or `cluster.255.auto` for the
    /// lowest free server id claimed from etcd (needs `--listen`).
    #[arg(long, env = "HARBOR_ADDR")]
    pub(crate) addr: Option<String>,
    /// Where to listen for links (`host:port`); default: the address membership lists.
    #[arg(long, env = "HARBOR_LISTEN")]
    pub(crate) listen: Option<String>,
    /// The `host:port` peers dial, written into membership for an `auto` address.
    #[arg(long, env = "HARBOR_ADVERTISE")]
    pub(crate) advertise: Option<String>,
    /// etcd endpoint(s), `http://host:port` (repeat the flag or separate with commas).
    #[arg(long = "etcd", env = "HARBOR_ETCD", value_delimiter = ',')]
    pub(crate) etcd: Vec<String>,
    /// Key prefix of the membership in etcd.
    #[arg(long, env = "HARBOR_PREFIX")]
    pub(crate) prefix: Option<String>,
    /// Liveness lease TTL in seconds.
    #[arg(long, env = "HARBOR_LEASE_TTL_SECS")]
    pub(crate) lease_ttl_secs: Option<u64>,
    /// How long a shutdown lets traffic in flight finish, in seconds.
    #[arg(long, env = "HARBOR_SHUTDOWN_GRACE_SECS")]
    pub(crate) shutdown_grace_secs: Option<u64>,
    /// Largest payload relayed, in bytes: at least the largest of the clusters it joins.
    #[arg(long, env = "HARBOR_MAX_ENVELOPE_BYTES")]
    pub(crate) max_envelope_bytes: Option<usize>,
    /// etcd endpoint(s) of the harbors center, when clusters keep separate stores.
    #[arg(
        long = "harbors-center-etcd",
        env = "HARBOR_CENTER_ETCD",
        value_delimiter = ','
    )]
    pub(crate) center_etcd: Vec<String>,
    /// Key prefix of the harbors center.
    #[arg(long = "harbors-center-prefix", env = "HARBOR_CENTER_PREFIX")]
    pub(crate) center_prefix: Option<String>,
    /// Where the admin endpoints listen (`/metrics`, `/live`, `/ready`, `/status`), e.g.
    /// `0.0.0.0:9100`; off when unset.
    #[arg(long, env = "HARBOR_ADMIN_LISTEN")]
    pub(crate) admin_listen: Option<String>,
}

/// The file's layout; unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    addr: Option<String>,
    listen: Option<String>,
    advertise: Option<String>,
    admin_listen: Option<String>,
    shutdown_grace_secs: Option<u64>,
    max_envelope_bytes: Option<usize>,
    etcd: Option<EtcdFile>,
    harbors_center: Option<CenterFile>,
    mesh_tls: Option<clustergo::LinkTlsFiles>,
    relay: Option<RelayFile>,
}

/// `[relay]`: the harbor's relay policy.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RelayFile {
    max_per_sec: Option<u64>,
    #[serde(default)]
    deny: Vec<String>,
}

/// Where every cluster lists its harbors, when clusters keep membership in separate stores.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CenterFile {
    #[serde(default)]
    endpoints: Vec<String>,
    prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EtcdFile {
    #[serde(default)]
    endpoints: Vec<String>,
    prefix: Option<String>,
    lease_ttl_secs: Option<u64>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// The cluster secret (`CLUSTERGO_SECRET`, or the development one with `--insecure-dev`).
    pub(crate) secret: Vec<u8>,
    /// The harbor's address (type 255), where it listens and what it advertises.
    pub(crate) placement: Placement,
    /// etcd endpoints.
    pub(crate) endpoints: Vec<String>,
    /// Membership key prefix.
    pub(crate) prefix: String,
    /// Liveness lease TTL.
    pub(crate) lease_ttl: Duration,
    /// Shutdown grace period.
    pub(crate) shutdown_grace: Duration,
    /// Largest payload relayed.
    pub(crate) max_envelope: usize,
    /// The harbors center (endpoints, prefix), if clusters keep separate stores.
    pub(crate) center: Option<(Vec<String>, String)>,
    /// TLS on links (`[mesh_tls]`), loaded.
    pub(crate) mesh_tls: Option<clustergo::LinkTls>,
    /// Envelopes relayed per second at most (`[relay] max_per_sec`).
    pub(crate) relay_rate: Option<u64>,
    /// Cluster pairs `(from, to)` whose traffic is refused (`[relay] deny`).
    pub(crate) deny: Vec<(u16, u16)>,
    /// Where the admin endpoints listen, if anywhere.
    pub(crate) admin_listen: Option<std::net::SocketAddr>,
}

impl Config {
    /// Reads the file (if any), applies environment and flags over it, and validates.
    pub(crate) fn load(args: Args) -> Result<Config, String> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
                toml::from_str::<File>(&text)
                    .map_err(|e| format!("config {}: {e}", path.display()))?
            }
            None => File::default(),
        };
        let etcd = file.etcd.unwrap_or_default();
        let admin_listen = match args.admin_listen.or(file.admin_listen) {
            Some(text) => Some(text.parse::<std::net::SocketAddr>().map_err(|e| {
                format!("admin_listen {text:?}: {e} (want host:port, e.g. 0.0.0.0:9100)")
            })?),
            None => None,
        };
        let addr_text = args
            .addr
            .or(file.addr)
            .ok_or("no harbor address: set `addr` in the config, HARBOR_ADDR or --addr")?;
        let addr: AddrSpec = addr_text
            .parse()
            .map_err(|e| format!("addr {addr_text:?}: {e}"))?;
        if addr.node_type() != clustergo::HARBOR_TYPE {
            return Err(format!(
                "addr {addr} is not a harbor address: its type must be 255 (e.g. {}.255.1)",
                addr.cluster(),
            ));
        }
        let placement = Placement::from_config(
            addr,
            args.listen.or(file.listen).as_deref(),
            args.advertise.or(file.advertise),
            true,
        )?;
        let endpoints = if args.etcd.is_empty() {
            etcd.endpoints
        } else {
            args.etcd
        };
        if endpoints.is_empty() {
            return Err(
                "no etcd endpoints: set `etcd.endpoints` in the config, HARBOR_ETCD or --etcd"
                    .into(),
            );
        }
        check_endpoints("etcd", &endpoints)?;
        let prefix = args
            .prefix
            .or(etcd.prefix)
            .unwrap_or_else(|| "/clustergo".into());
        if !prefix.starts_with('/') {
            return Err(format!("etcd prefix {prefix:?} must start with '/'"));
        }
        let ttl = args.lease_ttl_secs.or(etcd.lease_ttl_secs).unwrap_or(5);
        if !(1..=3600).contains(&ttl) {
            return Err(format!("lease_ttl_secs {ttl} must be in 1..=3600"));
        }
        let grace = args
            .shutdown_grace_secs
            .or(file.shutdown_grace_secs)
            .unwrap_or(5);
        if grace > 600 {
            return Err(format!("shutdown_grace_secs {grace} must be at most 600"));
        }
        let max_envelope = args
            .max_envelope_bytes
            .or(file.max_envelope_bytes)
            .unwrap_or(1 << 20);
        if !(1024..=(1 << 30)).contains(&max_envelope) {
            return Err(format!(
                "max_envelope_bytes {max_envelope} must be in 1024..=1073741824"
            ));
        }
        let mut center_file = file.harbors_center;
        if !args.center_etcd.is_empty() || args.center_prefix.is_some() {
            let c = center_file.get_or_insert_with(CenterFile::default);
            if !args.center_etcd.is_empty() {
                c.endpoints = args.center_etcd;
            }
            if args.center_prefix.is_some() {
                c.prefix = args.center_prefix;
            }
        }
        let center = match center_file {
            None => None,
            Some(c) => {
                if c.endpoints.is_empty() {
                    return Err("[harbors_center] needs endpoints".into());
                }
                check_endpoints("harbors_center", &c.endpoints)?;
                let prefix = c.prefix.ok_or("[harbors_center] needs a prefix")?;
                if !prefix.starts_with('/') {
                    return Err(format!(
                        "harbors_center prefix {prefix:?} must start with '/'"
                    ));
                }
                Some((c.endpoints, prefix))
            }
        };
        if center.is_some() && matches!(placement.addr, AddrSpec::Auto { .. }) {
            return Err(format!(
                "addr {}: a harbor listed in a harbors center needs a fixed address",
                placement.addr
            ));
        }
        // Last, so a configuration's own mistakes are reported first.
        let relay = file.relay.unwrap_or_default();
        let relay_rate = match relay.max_per_sec {
            Some(0) => return Err("[relay] max_per_sec must be at least 1".into()),
            r => r,
        };
        let deny = relay
            .deny
            .iter()
            .map(|pair| {
                let bad = || {
                    format!(
                        "[relay] deny entry {pair:?}: write it as \"FROM->TO\" (cluster numbers, e.g. \"2->1\")"
                    )
                };
                let (from, to) = pair.split_once("->").ok_or_else(bad)?;
                let cluster = |s: &str| {
                    s.trim()
                        .parse::<u16>()
                        .ok()
                        .filter(|c| (1..=clustergo::MAX_CLUSTER).contains(c))
                };
                Ok((cluster(from).ok_or_else(bad)?, cluster(to).ok_or_else(bad)?))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let mesh_tls = match &file.mesh_tls {
            Some(f) => Some(f.load().map_err(|e| format!("[mesh_tls]: {e}"))?),
            None => None,
        };
        let mutual = mesh_tls.as_ref().is_some_and(clustergo::LinkTls::is_mutual);
        let secret = clustergo::binary_secret(args.insecure_dev, mutual)?;
        Ok(Config {
            secret,
            mesh_tls,
            relay_rate,
            deny,
            center,
            max_envelope,
            admin_listen,
            placement,
            endpoints,
            prefix,
            lease_ttl: Duration::from_secs(ttl),
            shutdown_grace: Duration::from_secs(grace),
        })
    }
}

fn check_endpoints(what: &str, endpoints: &[String]) -> Result<(), String> {
    match endpoints
        .iter()
        .find(|e| !(e.starts_with("http://") || e.starts_with("https://")))
    {
        Some(bad) => Err(format!(
            "{what} endpoint {bad:?} must start with http:// or https://"
        )),
        None => Ok(()),
    }
}
