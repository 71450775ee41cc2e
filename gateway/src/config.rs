//! The gateway's configuration: a TOML file, environment variables and flags (each overriding
//! the one before), validated before anything binds or connects.
//!
//! ```toml
//! addr = "1.100.1"          # the gateway's own node address (any type but 255), or
//!                           # "1.100.auto": the lowest free id, claimed from etcd
//! # listen = "0.0.0.0:9000"   # the node's link listener (default: its net_addr); auto needs it
//! # advertise = "10.0.0.5:9000"  # what peers dial, written into membership for auto
//! backend_type = 1          # clients go to available nodes of this type
//! policy = "random"         # or "sticky": the client's first frame picks the server
//! shutdown_grace_secs = 10
//! admin_listen = "127.0.0.1:9101"   # /metrics, /live, /ready, /status (clustergo::admin); omit to turn off
//!
//! [etcd]                    # or, without etcd: members_file = "members.toml"
//! endpoints = ["http://127.0.0.1:2379"]
//! prefix = "/clustergo"
//! lease_ttl_secs = 5
//!
//! [tcp]                     # each listener is optional; at least one is needed
//! listen = "0.0.0.0:7000"
//! # tls_cert = "gateway.crt"  tls_key = "gateway.key"
//!
//! [websocket]
//! listen = "0.0.0.0:7001"
//! path = "/ws"
//! # protocols = ["game.v1"]  # WebSocket subprotocols offered (a browser's second argument)
//!
//! [kcp]
//! listen = "0.0.0.0:7002"
//!
//! # [mesh_tls]              # TLS on links to the game servers (see clustergo::LinkTls)
//! # ca = "ca.crt"  cert = "gateway.crt"  key = "gateway.key"  mutual = true
//!
//! [limits]                  # the defaults
//! max_clients = 10000
//! max_handshakes = 1000
//! max_handshakes_per_source = 64
//! max_clients_per_source = 1000
//! kcp_cookies_per_sec = 50000
//! max_frame_bytes = 65536
//! handshake_timeout_ms = 10000
//! idle_timeout_ms = 60000
//! write_timeout_ms = 10000
//! open_timeout_ms = 5000
//! open_attempts = 3
//! frames_per_sec = 100
//! bytes_per_sec = 1048576
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use clustergo::app::{AddrSpec, Placement};
use serde::Deserialize;

/// Command line (each flag also reads an environment variable).
#[derive(Debug, Parser)]
#[command(
    name = "gateway",
    version,
    about = "Terminates client TCP, WebSocket and KCP connections; one stream each to a game server"
)]
pub(crate) struct Args {
    /// TOML configuration file.
    #[arg(long, env = "GATEWAY_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Run without a cluster secret, on the public development one: anyone who can reach this
    /// gateway can then pass for any node. For a developer's machine only; without it, a
    /// missing `CLUSTERGO_SECRET` stops the gateway before it starts.
    #[arg(long)]
    pub(crate) insecure_dev: bool,
    /// The gateway's logical address, `cluster.type.server`, or `cluster.type.auto` for the
    /// lowest free server id claimed from etcd (needs `--listen`).
    #[arg(long, env = "GATEWAY_ADDR")]
    pub(crate) addr: Option<String>,
    /// Where the gateway's node listens for links (`host:port`); default: the address
    /// membership lists.
    #[arg(long, env = "GATEWAY_LISTEN")]
    pub(crate) listen: Option<String>,
    /// The `host:port` peers dial, written into membership for an `auto` address.
    #[arg(long, env = "GATEWAY_ADVERTISE")]
    pub(crate) advertise: Option<String>,
    /// etcd endpoint(s), `http://host:port` (repeat the flag or separate with commas).
    #[arg(long = "etcd", env = "GATEWAY_ETCD", value_delimiter = ',')]
    pub(crate) etcd: Vec<String>,
    /// Key prefix of the membership in etcd.
    #[arg(long, env = "GATEWAY_PREFIX")]
    pub(crate) prefix: Option<String>,
    /// Node type of the game servers clients go to.
    #[arg(long, env = "GATEWAY_BACKEND_TYPE")]
    pub(crate) backend_type: Option<u8>,
    /// TCP listen address.
    #[arg(long, env = "GATEWAY_TCP")]
    pub(crate) tcp: Option<String>,
    /// WebSocket listen address.
    #[arg(long, env = "GATEWAY_WS")]
    pub(crate) ws: Option<String>,
    /// KCP (UDP) listen address.
    #[arg(long, env = "GATEWAY_KCP")]
    pub(crate) kcp: Option<String>,
    /// Where the admin endpoints listen (`/metrics`, `/live`, `/ready`, `/status`), e.g.
    /// `0.0.0.0:9100`; off when unset.
    #[arg(long, env = "GATEWAY_ADMIN_LISTEN")]
    pub(crate) admin_listen: Option<String>,
    /// How long a shutdown lets clients close and their streams end, in seconds.
    #[arg(long, env = "GATEWAY_SHUTDOWN_GRACE_SECS")]
    pub(crate) shutdown_grace_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    addr: Option<String>,
    listen: Option<String>,
    advertise: Option<String>,
    admin_listen: Option<String>,
    backend_type: Option<u8>,
    policy: Option<String>,
    shutdown_grace_secs: Option<u64>,
    members_file: Option<PathBuf>,
    etcd: Option<EtcdFile>,
    tcp: Option<ListenFile>,
    websocket: Option<ListenFile>,
    kcp: Option<ListenFile>,
    #[serde(default)]
    limits: LimitsFile,
    mesh_tls: Option<clustergo::LinkTlsFiles>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EtcdFile {
    #[serde(default)]
    endpoints: Vec<String>,
    prefix: Option<String>,
    lease_ttl_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenFile {
    listen: Option<String>,
    path: Option<String>,
    protocols: Option<Vec<String>>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    max_clients: Option<usize>,
    max_handshakes: Option<usize>,
    max_handshakes_per_source: Option<usize>,
    max_clients_per_source: Option<usize>,
    kcp_cookies_per_sec: Option<u32>,
    max_frame_bytes: Option<usize>,
    handshake_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    write_timeout_ms: Option<u64>,
    open_timeout_ms: Option<u64>,
    open_attempts: Option<usize>,
    frames_per_sec: Option<u32>,
    bytes_per_sec: Option<u64>,
}

/// How a client's game server is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Policy {
    /// Any available server of the type.
    Random,
    /// By rendezvous hashing of the client's first frame: the same first frame (e.g. an
    /// account id) reaches the same server while it is available.
    Sticky,
}

/// One client listener.
#[derive(Debug, Clone)]
pub(crate) struct Listen {
    /// Socket address to bind.
    pub(crate) addr: SocketAddr,
    /// Certificate chain and key files (PEM), for TLS on TCP and WebSocket.
    pub(crate) tls: Option<(PathBuf, PathBuf)>,
    /// The WebSocket path (WebSocket only).
    pub(crate) path: String,
    /// WebSocket subprotocols the gateway accepts: the first one the client offers that is
    /// listed here is chosen (the client's order decides); a client offering only others is
    /// refused (HTTP 400). Empty: offers are ignored.
    pub(crate) protocols: Vec<String>,
}

/// Per-client limits.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// Clients at once (past their first frame); more are turned away with a reason.
    pub(crate) max_clients: usize,
    /// Connections at once, per listener, between accept and their first frame; more are
    /// dropped at accept.
    pub(crate) max_handshakes: usize,
    /// Connections (all listeners) from one source address between accept and their first
    /// frame; more from that address are dropped at accept (KCP: refused at CONNECT).
    pub(crate) max_handshakes_per_source: usize,
    /// Clients (past their first frame) from one source address; more are turned away with a
    /// reason. A source is an IPv4 address or an IPv6 /64; keep this high enough for players
    /// behind one carrier NAT.
    pub(crate) max_clients_per_source: usize,
    /// KCP cookies sent per second, in all (one-second burst): what the KCP listener may
    /// send to addresses that have proved nothing yet.
    pub(crate) kcp_cookies_per_sec: u32,
    /// Largest frame either way.
    pub(crate) max_frame: usize,
    /// Time from connecting to the first data frame (TLS and WebSocket handshakes included).
    pub(crate) handshake_timeout: Duration,
    /// Longest silence from a client (heartbeats count).
    pub(crate) idle_timeout: Duration,
    /// Longest a write to a client (or to its game server) may wait: a peer that does not read
    /// is disconnected after it.
    pub(crate) write_timeout: Duration,
    /// Bound on opening a stream to a game server.
    pub(crate) open_timeout: Duration,
    /// Game servers tried before giving up on a client.
    pub(crate) open_attempts: usize,
    /// Frames per second a client may send (heartbeats count), with a one-second burst.
    pub(crate) frames_per_sec: u32,
    /// Bytes per second a client may send, with a one-second burst.
    pub(crate) bytes_per_sec: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_clients: 10_000,
            max_handshakes: 1_000,
            max_handshakes_per_source: 64,
            max_clients_per_source: 1_000,
            kcp_cookies_per_sec: 50_000,
            max_frame: 64 << 10,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(10),
            open_timeout: Duration::from_secs(5),
            open_attempts: 3,
            frames_per_sec: 100,
            bytes_per_sec: 1 << 20,
        }
    }
}

/// Where membership comes from.
#[derive(Debug, Clone)]
pub(crate) enum Membership {
    /// etcd: endpoints, key prefix, liveness lease TTL.
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
        lease_ttl: Duration,
    },
    /// A members file (`FileDiscovery`), re-read when it changes: for a cluster on one machine
    /// and for benchmarks.
    File(PathBuf),
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// The cluster secret (`CLUSTERGO_SECRET`, or the development one with `--insecure-dev`).
    pub(crate) secret: Vec<u8>,
    /// TLS on links to the game servers (`[mesh_tls]`), loaded.
    pub(crate) mesh_tls: Option<clustergo::LinkTls>,
    /// The node's address (or `auto`), where it listens and what it advertises.
    pub(crate) placement: Placement,
    pub(crate) backend_type: u8,
    pub(crate) policy: Policy,
    pub(crate) membership: Membership,
    pub(crate) shutdown_grace: Duration,
    /// Where the admin endpoints listen, if anywhere.
    pub(crate) admin_listen: Option<std::net::SocketAddr>,
    pub(crate) tcp: Option<Listen>,
    pub(crate) websocket: Option<Listen>,
    pub(crate) kcp: Option<Listen>,
    pub(crate) limits: Limits,
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
        let addr_text = args
            .addr
            .or(file.addr)
            .ok_or("no gateway address: set `addr` in the config, GATEWAY_ADDR or --addr")?;
        let addr: AddrSpec = addr_text
            .parse()
            .map_err(|e| format!("addr {addr_text:?}: {e}"))?;
        if addr.node_type() == clustergo::HARBOR_TYPE {
            return Err(format!("addr {addr} is a harbor address (type 255)"));
        }
        let backend_type = args.backend_type.or(file.backend_type).ok_or(
            "no backend type: set `backend_type` in the config, GATEWAY_BACKEND_TYPE or --backend-type",
        )?;
        if backend_type == clustergo::HARBOR_TYPE {
            return Err("backend_type 255 is the harbor type".into());
        }
        if backend_type == addr.node_type() {
            return Err(format!(
                "backend_type {backend_type} is the gateway's own type ({addr}): it would pick gateways"
            ));
        }
        let policy = match file.policy.as_deref().unwrap_or("random") {
            "random" => Policy::Random,
            "sticky" => Policy::Sticky,
            other => {
                return Err(format!(
                    "policy {other:?}: must be \"random\" or \"sticky\""
                ));
            }
        };
        let membership = match (file.members_file, file.etcd, args.etcd.is_empty()) {
            (Some(_), Some(_), _) | (Some(_), None, false) => {
                return Err("members_file and etcd exclude each other: choose one".into());
            }
            (Some(path), None, true) => {
                if !path.is_file() {
                    return Err(format!("members_file {}: no such file", path.display()));
                }
                Membership::File(path)
            }
            (None, etcd, _) => {
                let etcd = etcd.unwrap_or_default();
                let endpoints = if args.etcd.is_empty() {
                    etcd.endpoints
                } else {
                    args.etcd
                };
                if endpoints.is_empty() {
                    return Err(
                        "no membership: set `etcd.endpoints` in the config, GATEWAY_ETCD \
                                or --etcd (or `members_file`)"
                            .into(),
                    );
                }
                if let Some(bad) = endpoints
                    .iter()
                    .find(|e| !(e.starts_with("http://") || e.starts_with("https://")))
                {
                    return Err(format!(
                        "etcd endpoint {bad:?} must start with http:// or https://"
                    ));
                }
                let prefix = args
                    .prefix
                    .or(etcd.prefix)
                    .unwrap_or_else(|| "/clustergo".into());
                if !prefix.starts_with('/') {
                    return Err(format!("etcd prefix {prefix:?} must start with '/'"));
                }
                let ttl = etcd.lease_ttl_secs.unwrap_or(5);
                if !(1..=3600).contains(&ttl) {
                    return Err(format!("lease_ttl_secs {ttl} must be in 1..=3600"));
                }
                Membership::Etcd {
                    endpoints,
                    prefix,
                    lease_ttl: Duration::from_secs(ttl),
                }
            }
        };
        let admin_listen = match args.admin_listen.clone().or(file.admin_listen.clone()) {
            Some(text) => Some(text.parse::<std::net::SocketAddr>().map_err(|e| {
                format!("admin_listen {text:?}: {e} (want host:port, e.g. 0.0.0.0:9100)")
            })?),
            None => None,
        };
        let grace = args
            .shutdown_grace_secs
            .or(file.shutdown_grace_secs)
            .unwrap_or(10);
        if !(1..=600).contains(&grace) {
            return Err(format!(
                "shutdown_grace_secs {grace} must be in 1..=600 (closing a client takes up to 2 s)"
            ));
        }
        let tcp = listener("tcp", args.tcp, file.tcp, true, false)?;
        let websocket = listener("websocket", args.ws, file.websocket, true, true)?;
        let kcp = listener("kcp", args.kcp, file.kcp, false, false)?;
        if let (Some(t), Some(w)) = (&tcp, &websocket)
            && t.addr.port() == w.addr.port()
            && t.addr.port() != 0
            && (t.addr.ip() == w.addr.ip()
                || t.addr.ip().is_unspecified()
                || w.addr.ip().is_unspecified())
        {
            return Err(format!("[tcp] and [websocket] both listen on {}", t.addr));
        }
        if tcp.is_none() && websocket.is_none() && kcp.is_none() {
            return Err("no listener: configure at least one of [tcp], [websocket], [kcp]".into());
        }
        let limits = limits(file.limits)?;
        // Last, so a configuration's own mistakes are reported first.
        let mesh_tls = match &file.mesh_tls {
            Some(f) => Some(f.load().map_err(|e| format!("[mesh_tls]: {e}"))?),
            None => None,
        };
        let mutual = mesh_tls.as_ref().is_some_and(clustergo::LinkTls::is_mutual);
        let placement = Placement::from_config(
            addr,
            args.listen.or(file.listen).as_deref(),
            args.advertise.or(file.advertise),
            false,
        )?;
        if matches!(addr, AddrSpec::Auto { .. }) && !matches!(membership, Membership::Etcd { .. }) {
            return Err(format!(
                "addr {addr}: an auto address is claimed from etcd; configure [etcd]"
            ));
        }
        let secret = clustergo::binary_secret(args.insecure_dev, mutual)?;
        Ok(Config {
            secret,
            mesh_tls,
            placement,
            backend_type,
            policy,
            membership,
            shutdown_grace: Duration::from_secs(grace),
            admin_listen,
            tcp,
            websocket,
            kcp,
            limits,
        })
    }
}

fn listener(
    name: &str,
    flag: Option<String>,
    file: Option<ListenFile>,
    tls_allowed: bool,
    path_allowed: bool,
) -> Result<Option<Listen>, String> {
    let file = match (flag, file) {
        (None, None) => return Ok(None),
        (Some(listen), file) => ListenFile {
            listen: Some(listen),
            ..file.unwrap_or_default()
        },
        (None, Some(file)) => file,
    };
    let text = file
        .listen
        .ok_or_else(|| format!("[{name}] needs `listen = \"host:port\"`"))?;
    let addr = text
        .parse()
        .map_err(|e| format!("[{name}] listen {text:?}: {e}"))?;
    let tls = match (file.tls_cert, file.tls_key) {
        (None, None) => None,
        (Some(_), Some(_)) if !tls_allowed => {
            return Err(format!("[{name}] does not support TLS"));
        }
        (Some(cert), Some(key)) => Some((cert, key)),
        _ => return Err(format!("[{name}] needs both tls_cert and tls_key")),
    };
    let path = match file.path {
        Some(_) if !path_allowed => return Err(format!("[{name}] has no path")),
        Some(p) if !p.starts_with('/') => {
            return Err(format!("[{name}] path {p:?} must start with '/'"));
        }
        Some(p) => p,
        None => "/".into(),
    };
    let protocols = match file.protocols {
        Some(_) if !path_allowed => return Err(format!("[{name}] has no protocols")),
        Some(list) => {
            if let Some(bad) = list.iter().find(|p| {
                p.is_empty()
                    || !p
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
            }) {
                return Err(format!("[{name}] protocol {bad:?} is not a valid token"));
            }
            list
        }
        None => Vec::new(),
    };
    Ok(Some(Listen {
        addr,
        tls,
        path,
        protocols,
    }))
}

fn limits(file: LimitsFile) -> Result<Limits, String> {
    let d = Limits::default();
    let ms = |v: Option<u64>, default: Duration, name: &str| -> Result<Duration, String> {
        match v {
            None => Ok(default),
            Some(v) if (1..=3_600_000).contains(&v) => Ok(Duration::from_millis(v)),
            Some(v) => Err(format!("limits.{name} {v} must be in 1..=3600000")),
        }
    };
    let l = Limits {
        max_clients: file.max_clients.unwrap_or(d.max_clients),
        max_handshakes: file.max_handshakes.unwrap_or(d.max_handshakes),
        max_handshakes_per_source: file
            .max_handshakes_per_source
            .unwrap_or(d.max_handshakes_per_source),
        max_clients_per_source: file
            .max_clients_per_source
            .unwrap_or(d.max_clients_per_source),
        kcp_cookies_per_sec: file.kcp_cookies_per_sec.unwrap_or(d.kcp_cookies_per_sec),
        max_frame: file.max_frame_bytes.unwrap_or(d.max_frame),
        handshake_timeout: ms(
            file.handshake_timeout_ms,
            d.handshake_timeout,
            "handshake_timeout_ms",
        )?,
        idle_timeout: ms(file.idle_timeout_ms, d.idle_timeout, "idle_timeout_ms")?,
        write_timeout: ms(file.write_timeout_ms, d.write_timeout, "write_timeout_ms")?,
        open_timeout: ms(file.open_timeout_ms, d.open_timeout, "open_timeout_ms")?,
        open_attempts: file.open_attempts.unwrap_or(d.open_attempts),
        frames_per_sec: file.frames_per_sec.unwrap_or(d.frames_per_sec),
        bytes_per_sec: file.bytes_per_sec.unwrap_or(d.bytes_per_sec),
    };
    if !(1..=1_000_000).contains(&l.max_clients) {
        return Err(format!(
            "limits.max_clients {} must be in 1..=1000000",
            l.max_clients
        ));
    }
    if !(1..=1_000_000).contains(&l.max_handshakes) {
        return Err(format!(
            "limits.max_handshakes {} must be in 1..=1000000",
            l.max_handshakes
        ));
    }
    for (name, v) in [
        ("max_handshakes_per_source", l.max_handshakes_per_source),
        ("max_clients_per_source", l.max_clients_per_source),
        ("kcp_cookies_per_sec", l.kcp_cookies_per_sec as usize),
    ] {
        if !(1..=1_000_000).contains(&v) {
            return Err(format!("limits.{name} {v} must be in 1..=1000000"));
        }
    }
    if !(1..=(16 << 20)).contains(&l.max_frame) {
        return Err(format!(
            "limits.max_frame_bytes {} must be in 1..=16777216",
            l.max_frame
        ));
    }
    if !(1..=16).contains(&l.open_attempts) {
        return Err(format!(
            "limits.open_attempts {} must be in 1..=16",
            l.open_attempts
        ));
    }
    if l.frames_per_sec == 0 {
        return Err("limits.frames_per_sec must be at least 1".into());
    }
    if l.bytes_per_sec < l.max_frame as u64 {
        return Err(format!(
            "limits.bytes_per_sec {} is below max_frame_bytes {}: a largest frame could never pass",
            l.bytes_per_sec, l.max_frame
        ));
    }
    Ok(l)
}
