//! Prometheus metrics and an admin HTTP listener: `/metrics`, `/live`, `/ready`, `/status`
//! (cargo feature `admin`, on by default).
//!
//! Nothing listens unless asked: build an [`Admin`] over your nodes and [`Admin::serve`] it.
//! The harbor and gateway binaries do so when `admin_listen` is configured.
//!
//! ```no_run
//! # async fn run(node: clustergo::Node) -> std::io::Result<()> {
//! let admin = clustergo::admin::Admin::new().node(&node);
//! let server = admin.serve("127.0.0.1:9100").await?;
//! println!("metrics on http://{}/metrics", server.local_addr());
//! # Ok(()) }
//! ```
//!
//! - `/metrics`: OpenMetrics text to a client that asks for it (Prometheus does), the
//!   Prometheus text format (0.0.4) to anyone else. Every series carries the `node` label (a process may host
//!   several nodes). Counters (`clustergo_<counter>_total`) are the node's
//!   [`StatsSnapshot`](crate::StatsSnapshot); gauges say what is true now (links up, queue
//!   depth per peer, members, handlers in flight, relayed calls waiting, streams open,
//!   readiness); `clustergo_rpc_server_duration_seconds` and
//!   `clustergo_rpc_client_duration_seconds` are histograms by `method` and `outcome`.
//!   Label values come from this node's own configuration and code, never from what a peer
//!   sends: a method this node does not serve is counted as `_unknown`, and past 256
//!   distinct methods a caller's calls share `_other`.
//! - `/live`: 200 while the process serves HTTP at all.
//! - `/ready`: 200 when every node is running, listed in membership and available there
//!   (under etcd: its lease is alive); 503 with the reason otherwise. A node that starts to
//!   shut down is unready at once, before it leaves membership.
//! - `/status`: a small JSON document per node: address, phase, members seen, links up.
//!
//! The listener is bounded: at most 32 connections at once (more are closed at once, counted
//! in a gated log line), 2 s to send the request head and 4 s in all, one request per
//! connection. It has no authentication: bind it to an address only operators and their
//! probes reach (a pod's own address, a private interface), never one that faces players.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use tokio::net::{TcpListener, ToSocketAddrs};
use tokio_util::sync::CancellationToken;

pub use prometheus_client::registry::Registry;

use crate::Node;
use crate::metrics::{CallStats, Histogram};

/// Connections the admin listener serves at once.
const MAX_CONNECTIONS: usize = 32;
/// How long a client may take to send its request head (and, twice that, to be served).
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);

/// Metrics, readiness and status of the nodes of one process, for the admin listener.
pub struct Admin {
    registry: Registry,
    nodes: Arc<RwLock<Vec<Node>>>,
    /// Set by [`AdminServer::set_draining`]: `/ready` says no from then on.
    draining: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("nodes", &self.nodes().len())
            .finish_non_exhaustive()
    }
}

impl Default for Admin {
    fn default() -> Self {
        Admin::new()
    }
}

impl Admin {
    /// An admin over no node yet, with an empty registry.
    pub fn new() -> Admin {
        let nodes = Arc::new(RwLock::new(Vec::new()));
        let mut registry = Registry::default();
        let draining: Arc<std::sync::atomic::AtomicBool> = Default::default();
        registry.register_collector(Box::new(NodeCollector {
            nodes: nodes.clone(),
            draining: draining.clone(),
        }));
        Admin {
            registry,
            nodes,
            draining,
        }
    }

    /// Adds `node`: its metrics, its readiness and its status (a node already added, or
    /// another with its address, is not added twice).
    pub fn node(self, node: &Node) -> Admin {
        {
            let mut nodes = self.nodes.write().unwrap_or_else(|e| e.into_inner());
            if !nodes.iter().any(|n| n.addr() == node.addr()) {
                nodes.push(node.clone());
            }
        }
        self
    }

    /// The registry `/metrics` encodes: register metrics of your own here (prefix their names,
    /// e.g. `game_`).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    fn nodes(&self) -> Vec<Node> {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// What `/metrics` serves now to a client that asks for OpenMetrics (Prometheus does).
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// What `/metrics` serves now to any other client: the Prometheus text format (0.0.4),
    /// which older tools (e.g. `promtool check metrics`) read. It differs from OpenMetrics in
    /// naming a counter's family by its sample name (`..._total`), and has no `# UNIT` and no
    /// `# EOF` line.
    pub fn metrics_prometheus_text(&self) -> String {
        to_prometheus_text(&self.metrics_text())
    }

    /// `Ok` when every node is ready (see the module docs), else why not.
    pub fn ready(&self) -> Result<(), String> {
        if self.draining.load(std::sync::atomic::Ordering::Relaxed) {
            return Err("draining".into());
        }
        let nodes = self.nodes();
        if nodes.is_empty() {
            return Err("no node".into());
        }
        nodes.iter().try_for_each(Node::readiness)
    }

    /// What `/status` serves now.
    pub fn status_json(&self) -> String {
        let draining = self.draining.load(std::sync::atomic::Ordering::Relaxed);
        let nodes: Vec<serde_json::Value> = self
            .nodes()
            .iter()
            .map(|n| {
                let members = n.members();
                serde_json::json!({
                    "addr": n.addr().to_string(),
                    "phase": format!("{:?}", n.inner_arc().phase()),
                    "ready": n.readiness().is_ok() && !draining,
                    "members": members.len(),
                    "members_available": members.iter().filter(|m| m.available).count(),
                    "links_up": n.inner_arc().links.peer_list().iter().filter(|p| p.is_up()).count(),
                })
            })
            .collect();
        serde_json::json!({ "nodes": nodes }).to_string()
    }

    /// Binds `addr` and serves the admin endpoints on a task until the returned server is
    /// shut down or dropped.
    pub async fn serve(self, addr: impl ToSocketAddrs) -> std::io::Result<AdminServer> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let draining = self.draining.clone();
        let admin = Arc::new(self);
        let span = tracing::info_span!("admin", listen = %local_addr, task = "accept");
        crate::task::spawn_untracked(span, accept_loop(listener, admin, stop.clone()));
        Ok(AdminServer {
            local_addr,
            stop: stop.drop_guard(),
            draining,
        })
    }
}

/// A running admin listener; dropping it stops the listener.
#[derive(Debug)]
pub struct AdminServer {
    local_addr: SocketAddr,
    stop: tokio_util::sync::DropGuard,
    draining: Arc<std::sync::atomic::AtomicBool>,
}

impl AdminServer {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Makes `/ready` answer 503 ("draining") from now on, while the process still serves:
    /// call it first thing on SIGTERM, so a load balancer stops sending new work before
    /// anything closes (a node's own shutdown makes it unready too, but a process may have
    /// its own work to close first, e.g. the gateway's clients).
    pub fn set_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Stops accepting; connections being served finish.
    pub fn shutdown(self) {
        drop(self.stop);
    }
}

async fn accept_loop(listener: TcpListener, admin: Arc<Admin>, stop: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (io, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "admin listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        // Always accepted, and closed at once over the cap: connections held open by someone
        // else cannot leave the kernel's backlog to fill up in front of a probe.
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            static OVER: crate::gate::LogGate = crate::gate::LogGate::new();
            if let Some(held) = OVER.pass() {
                tracing::warn!(
                    held_back = held,
                    "admin listener: {MAX_CONNECTIONS} connections open; closed one at once"
                );
            }
            drop(io);
            continue;
        };
        let admin = admin.clone();
        let span = tracing::debug_span!("admin", task = "connection");
        crate::task::spawn_untracked(span, async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&admin, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(io), service);
            // A client that stalls after its head is cut off too.
            let _ = tokio::time::timeout(HEAD_TIMEOUT * 2, conn).await;
        });
    }
}

fn answer(admin: &Admin, req: &Request<Incoming>) -> Response<String> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut r = Response::new(body);
        *r.status_mut() = status;
        if let Ok(v) = content_type.parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let openmetrics = req
                .headers()
                .get_all(hyper::header::ACCEPT)
                .iter()
                .any(|v| {
                    v.to_str()
                        .is_ok_and(|v| v.contains("application/openmetrics-text"))
                });
            if openmetrics {
                reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    admin.metrics_text(),
                )
            } else {
                reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    admin.metrics_prometheus_text(),
                )
            }
        }
        "/live" => reply(StatusCode::OK, "text/plain", "live\n".into()),
        "/ready" => match admin.ready() {
            Ok(()) => reply(StatusCode::OK, "text/plain", "ready\n".into()),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        "/status" => reply(StatusCode::OK, "application/json", admin.status_json()),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /live, /ready or /status\n".into(),
        ),
    }
}

/// OpenMetrics text as the Prometheus text format: counter families take their samples'
/// `_total` name; `# UNIT` and `# EOF` go.
fn to_prometheus_text(openmetrics: &str) -> String {
    let typed = |kind: &'static str| -> std::collections::HashSet<&str> {
        openmetrics
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(kind))
            .collect()
    };
    // Families whose samples carry a suffix the 0.0.4 family name must carry too.
    let counters = typed(" counter");
    let infos = typed(" info");
    let mut out = String::with_capacity(openmetrics.len() + 64 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                } else if infos.contains(name) {
                    out.push_str("_info");
                }
                out.push(' ');
                // Types the 0.0.4 format lacks: an info is a gauge of 1, unknown is untyped.
                out.push_str(match (prefix, tail) {
                    ("# TYPE ", "info") => "gauge",
                    ("# TYPE ", "unknown") => "untyped",
                    _ => tail,
                });
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Encodes every node's metrics at scrape time (one descriptor per metric, a series per node).
#[derive(Debug)]
struct NodeCollector {
    nodes: Arc<RwLock<Vec<Node>>>,
    draining: Arc<std::sync::atomic::AtomicBool>,
}

type Fmt = Result<(), std::fmt::Error>;

fn gauge(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: &[(Vec<(&str, String)>, i64)],
) -> Fmt {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in series {
        m.encode_family(labels)?.encode_gauge(v)?;
    }
    Ok(())
}

fn counter_series(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: &[(Vec<(&str, String)>, u64)],
) -> Fmt {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        m.encode_family(labels)?
            .encode_counter::<NoLabelSet, _, u64>(v, None)?;
    }
    Ok(())
}

/// Stats counters shown as one family with a label: (name prefix, label, help).
const LABELLED: [(&str, &str, &str); 5] = [
    (
        "dial_failures",
        "reason",
        "Dials that failed, by reason: refused, timeout, unreachable, simultaneous",
    ),
    (
        "envelopes_sent",
        "kind",
        "Envelopes sent on links, by kind: request, response, message, stream",
    ),
    (
        "bytes_sent",
        "kind",
        "Approximate bytes sent on links (payload, names, a fixed header per envelope), by kind",
    ),
    (
        "envelopes_received",
        "kind",
        "Envelopes received on links, by kind",
    ),
    (
        "bytes_received",
        "kind",
        "Approximate bytes received on links, by kind",
    ),
];

fn histograms(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: &[(Vec<(&str, String)>, &Histogram)],
) -> Fmt {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in series {
        let (sum, count, buckets) = h.read();
        m.encode_family(labels)?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
    }
    Ok(())
}

fn call_series<'a>(
    node: &str,
    method: &str,
    stats: &'a CallStats,
    out: &mut Vec<(Vec<(&'static str, String)>, &'a Histogram)>,
) {
    for (outcome, h) in stats.each() {
        out.push((
            vec![
                ("node", node.to_owned()),
                ("method", method.to_owned()),
                ("outcome", outcome.as_str().to_owned()),
            ],
            h,
        ));
    }
}

impl Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Fmt {
        let nodes = self.nodes.read().unwrap_or_else(|e| e.into_inner()).clone();
        let draining = self.draining.load(std::sync::atomic::Ordering::Relaxed);
        let inners: Vec<_> = nodes
            .iter()
            .map(|n| (n.addr().to_string(), n.inner_arc()))
            .collect();
        let label = |n: &str| vec![("node", n.to_owned())];

        // Counters, from each node's stats (streams_active is a gauge; the families below are
        // counters with a label).
        let snaps: Vec<_> = inners
            .iter()
            .map(|(n, i)| (n, i.stats.snapshot().each()))
            .collect();
        if let Some((_, first)) = snaps.first() {
            for (family, label, help) in LABELLED {
                let name = format!("clustergo_{family}");
                let mut m = enc.encode_descriptor(&name, help, None, MetricType::Counter)?;
                for (node, each) in &snaps {
                    for (field, _, v) in each {
                        let Some(value) = field
                            .strip_prefix(family)
                            .and_then(|rest| rest.strip_prefix('_'))
                        else {
                            continue;
                        };
                        let labels = [("node", node.as_str()), (label, value)];
                        m.encode_family(&labels)?
                            .encode_counter::<NoLabelSet, _, u64>(v, None)?;
                    }
                }
            }
            for (k, (name, help, _)) in first.iter().enumerate() {
                let labelled = LABELLED
                    .iter()
                    .any(|(f, _, _)| name.strip_prefix(f).is_some_and(|r| r.starts_with('_')));
                if *name == "streams_active" || labelled {
                    continue;
                }
                let full = format!("clustergo_{name}");
                let help = help.lines().next().unwrap_or("").trim();
                let mut m = enc.encode_descriptor(&full, help, None, MetricType::Counter)?;
                for (node, each) in &snaps {
                    let v = each[k].2;
                    m.encode_family(&label(node))?
                        .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
                }
            }
        }

        let per_node =
            |f: &dyn Fn(&crate::node::InnerRef) -> i64| -> Vec<(Vec<(&str, String)>, i64)> {
                inners.iter().map(|(n, i)| (label(n), f(i))).collect()
            };
        gauge(
            &mut enc,
            "clustergo_node_ready",
            "1 when the node is ready (see /ready), else 0",
            &nodes
                .iter()
                .map(|n| {
                    (
                        label(&n.addr().to_string()),
                        i64::from(n.readiness().is_ok() && !draining),
                    )
                })
                .collect::<Vec<_>>(),
        )?;
        gauge(
            &mut enc,
            "clustergo_links_up",
            "Links up now",
            &per_node(&|i| i.links.peer_list().iter().filter(|p| p.is_up()).count() as i64),
        )?;
        let health: Vec<_> = inners
            .iter()
            .map(|(n, i)| (label(n), i.discovery.health(i.addr)))
            .collect();
        counter_series(
            &mut enc,
            "clustergo_membership_resyncs",
            "Full re-reads of membership after its watch was cancelled (compaction) or broke",
            &health
                .iter()
                .map(|(l, h)| (l.clone(), h.resyncs))
                .collect::<Vec<_>>(),
        )?;
        counter_series(
            &mut enc,
            "clustergo_membership_leases_lost",
            "Liveness leases lost (renewed once the store is back)",
            &health
                .iter()
                .map(|(l, h)| (l.clone(), h.leases_lost))
                .collect::<Vec<_>>(),
        )?;
        gauge(
            &mut enc,
            "clustergo_membership_leases_held",
            "Liveness leases held now (sources with leases only, e.g. etcd)",
            &health
                .iter()
                .filter_map(|(l, h)| Some((l.clone(), h.leases_held? as i64)))
                .collect::<Vec<_>>(),
        )?;
        gauge(
            &mut enc,
            "clustergo_streams_open",
            "Streams open now",
            &per_node(&|i| i.stats.snapshot().streams_active as i64),
        )?;
        gauge(
            &mut enc,
            "clustergo_rpc_server_in_flight",
            "Handlers running now",
            &per_node(&|i| i.server.inflight.load(std::sync::atomic::Ordering::Relaxed) as i64),
        )?;
        gauge(
            &mut enc,
            "clustergo_relayed_calls_in_flight",
            "Calls this harbor relayed that wait for their answers",
            &per_node(&|i| i.relays.calls_in_flight() as i64),
        )?;

        // Player sessions, for the nodes that serve them.
        let sessions: Vec<_> = inners
            .iter()
            .filter_map(|(n, i)| Some((n, i.sessions.as_ref()?.snapshot())))
            .collect();
        if !sessions.is_empty() {
            let mut by_state = Vec::new();
            let mut ended = Vec::new();
            for (n, s) in &sessions {
                for (state, v) in [
                    ("attached", s.attached),
                    ("detached", s.detached),
                    ("plain", s.plain),
                ] {
                    by_state.push((
                        vec![("node", (*n).clone()), ("state", state.to_owned())],
                        v as i64,
                    ));
                }
                for (code, v) in &s.ended {
                    ended.push((vec![("node", (*n).clone()), ("code", code.to_string())], *v));
                }
            }
            let each = |f: &dyn Fn(&crate::session::SessionSnapshot) -> i64| -> Vec<_> {
                sessions.iter().map(|(n, s)| (label(n), f(s))).collect()
            };
            gauge(
                &mut enc,
                "clustergo_sessions",
                "Player sessions now: attached (a connection), detached (waiting for a resume), plain (version 1 clients)",
                &by_state,
            )?;
            gauge(
                &mut enc,
                "clustergo_session_replay_bytes",
                "Bytes sent to session clients and not acknowledged yet, all sessions (bounded by max_replay_total)",
                &each(&|s| s.replay_bytes as i64),
            )?;
            gauge(
                &mut enc,
                "clustergo_session_inbox_bytes",
                "Bytes from session clients the game has not read yet, all sessions (bounded by max_inbox_total)",
                &each(&|s| s.inbox_bytes as i64),
            )?;
            let each_count = |f: &dyn Fn(&crate::session::SessionSnapshot) -> u64| -> Vec<_> {
                sessions.iter().map(|(n, s)| (label(n), f(s))).collect()
            };
            counter_series(
                &mut enc,
                "clustergo_sessions_started",
                "Player sessions started",
                &each_count(&|s| s.started),
            )?;
            counter_series(
                &mut enc,
                "clustergo_sessions_resumed",
                "Reattachments of a session to a new connection (a resume)",
                &each_count(&|s| s.resumed),
            )?;
            counter_series(
                &mut enc,
                "clustergo_sessions_ended",
                "Player sessions ended, by the code their client was told (1000 by choice, 1012 the server shut down, 4003 the resume window passed, 4004 a replay buffer overran, ...)",
                &ended,
            )?;
        }

        let mut members = Vec::new();
        let mut depth = Vec::new();
        let mut unconfirmed = Vec::new();
        let mut relayed = Vec::new();
        let mut relay_full = Vec::new();
        for (n, i) in &inners {
            let view = i.view();
            let (up, down) =
                view.members().fold(
                    (0, 0),
                    |(u, d), m| if m.available { (u + 1, d) } else { (u, d + 1) },
                );
            members.push((
                vec![("node", n.clone()), ("state", "available".to_owned())],
                up,
            ));
            members.push((
                vec![("node", n.clone()), ("state", "unavailable".to_owned())],
                down,
            ));
            let mut peers = i.links.peer_list();
            peers.sort_by_key(|p| p.addr);
            for p in peers {
                let labels = vec![("node", n.clone()), ("peer", p.addr.to_string())];
                let sent = p.relayed.load(std::sync::atomic::Ordering::Relaxed);
                let full = p
                    .relay_queue_full
                    .load(std::sync::atomic::Ordering::Relaxed);
                if sent + full > 0 {
                    relayed.push((labels.clone(), sent));
                    relay_full.push((labels.clone(), full));
                }
                unconfirmed.push((labels.clone(), p.unconfirmed() as i64));
                depth.push((labels, p.queued() as i64));
            }
        }
        gauge(
            &mut enc,
            "clustergo_members",
            "Members this node sees, by availability",
            &members,
        )?;
        gauge(
            &mut enc,
            "clustergo_peer_queue_depth",
            "Envelopes queued toward each peer (bounded by peer_queue)",
            &depth,
        )?;
        gauge(
            &mut enc,
            "clustergo_peer_unconfirmed",
            "Envelopes written on the link to each peer that the peer has not confirmed yet (it acknowledges within about 100 ms; 0 for a peer that does not acknowledge); growing while a peer is frozen or unreachable, and counted in clustergo_envelopes_unconfirmed if the link dies",
            &unconfirmed,
        )?;
        counter_series(
            &mut enc,
            "clustergo_relayed_envelopes",
            "Envelopes of other nodes this harbor relayed, by next hop",
            &relayed,
        )?;
        counter_series(
            &mut enc,
            "clustergo_relay_queue_full",
            "Envelopes of other nodes not relayed because the queue toward the next hop was full (answered HOP_BUSY, reset or dropped), by next hop",
            &relay_full,
        )?;

        let mut served = Vec::new();
        let mut made = Vec::new();
        let client: Vec<_> = inners
            .iter()
            .map(|(n, i)| (n, i.client_calls.each()))
            .collect();
        for (n, i) in &inners {
            for (method, stats) in i.server.calls.iter().flat_map(|c| c.each()) {
                call_series(n, method, stats, &mut served);
            }
        }
        for (n, calls) in &client {
            for (method, stats) in calls {
                call_series(n, method, stats, &mut made);
            }
        }
        histograms(
            &mut enc,
            "clustergo_rpc_server_duration_seconds",
            "Calls this node served, from the request's arrival to its answer, by method and outcome",
            &served,
        )?;
        histograms(
            &mut enc,
            "clustergo_rpc_client_duration_seconds",
            "Calls this node made, from the call to its outcome, by method and outcome",
            &made,
        )?;
        Ok(())
    }
}
