//! Two-process mesh benchmark: a clustergo node in this process talks to a clustergo node in a
//! re-executed copy of this binary (the peer), and every mode is compared with a raw tokio TCP
//! baseline that does the same work with `u32` big-endian length-prefixed frames.
//!
//! Modes (each also against one bare tonic bidi call where it applies, `mesh/bare.rs`: the
//! transport's floor beside the physical limit):
//! - `rpc-c1`: echo RPC of 64 bytes, one caller in a closed loop.
//! - `rpc-c128`: the same with 128 concurrent callers.
//! - `rpc-c128-harbor`: the same from another cluster, through two harbors (four processes:
//!   client → harbor → harbor → server); raw baseline as `rpc-c128`.
//! - `msg`: one-way 64-byte messages from one sender, counted at the receiver.
//! - `stream-pingpong-s1`, `stream-pingpong-s100`, `stream-pipe-s1`, `stream-pipe-s100`,
//!   `stream-bulk`: byte streams (see `mesh/streams.rs`); their raw baselines use one TCP
//!   connection per stream.
//!
//! Flags: `--multi-thread` (2-worker runtime in both processes; default current_thread),
//! `--secs <f64>` (measured seconds per mode, default 3), `--smoke` (0.2 s per mode),
//! `--mode <name>` (one mode only), `--tls` (links over mutual TLS, with a CA and certificates
//! made for the run), `--no-call-metrics` (calls not timed into the duration histograms, in both
//! processes), `--trace-export` (built with `--features telemetry`: every span exported at
//! 100 % sampling over OTLP to a sink in the orchestrator, in both processes), `--only
//! <clustergo|raw|tonic>` (run one side of each mode, for profiling under `perf` or callgrind:
//! the other columns show `-`; the peer is given time to exit by itself so a profiler wrapping
//! it can write its data). Unknown arguments (cargo's `--bench`) are ignored.
//!
//! Peer process: `peer --listen-port 0 --other 127.0.0.1:PORT [--multi-thread] [--tls-dir DIR]`. It prints
//! `READY <node port> <raw port> <bare tonic port>` and exits by itself when its stdin closes.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clustergo::{Bytes, Cmd, HandlerError, LogicAddr, Member, MemoryDiscovery, Node, NodeConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};

#[path = "mesh/bare.rs"]
pub(crate) mod bare;
#[path = "../tests/support/ports.rs"]
mod ports;
#[path = "mesh/streams.rs"]
mod streams;

/// The secret both processes use.
const SECRET: &[u8] = b"clustergo-bench-secret";
/// Payload of every request and message.
static PAYLOAD: [u8; 64] = [0x5a; 64];
/// The message that carries payload.
const CMD_DATA: Cmd = Cmd(1);
/// The message that resets the receiver's counters (ordered with the data messages).
const CMD_RESET: Cmd = Cmd(2);
/// Concurrent callers of `rpc-c128`.
const CONCURRENCY: usize = 128;
/// All modes, in run order.
pub(crate) const MODES: [&str; 9] = [
    "rpc-c1",
    "rpc-c128",
    "rpc-c128-harbor",
    "msg",
    "stream-pingpong-s1",
    "stream-pingpong-s100",
    "stream-pipe-s1",
    "stream-pipe-s100",
    "stream-bulk",
];
/// Largest raw frame accepted.
const MAX_FRAME: usize = 1 << 20;
/// Slack on top of warm-up + measurement before a mode is abandoned as hung.
const MODE_SLACK: Duration = Duration::from_secs(15);

/// Settings of one run.
#[derive(Debug, Clone)]
struct Opts {
    peer: bool,
    multi_thread: bool,
    measure: Duration,
    warmup: Duration,
    mode: Option<String>,
    other: Option<String>,
    listen_port: u16,
    /// Peer in the harbor mode: the whole membership (`addr=host:port,...`) and which of its
    /// nodes to run.
    members: Option<String>,
    run_as: Option<String>,
    /// Links over mutual TLS: the orchestrator makes a CA and a certificate for every bench
    /// address (`--tls`) and hands the directory to its peers (`--tls-dir`).
    tls_dir: Option<std::path::PathBuf>,
    /// Calls not timed into the duration histograms (`NodeConfig::call_metrics(false)`).
    no_call_metrics: bool,
    /// Spans exported (100 % sampled) over OTLP to this endpoint, in both processes.
    trace_export: Option<String>,
    /// `--trace-export`: the orchestrator runs a sink that discards what it receives.
    trace_sink: bool,
    /// `--only`: the one side measured (`clustergo`, `raw` or `tonic`); all when `None`.
    only: Option<Side>,
}

/// One side of a row, for `--only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Clustergo,
    Raw,
    Tonic,
}

impl Opts {
    /// Whether `side` is measured in this run.
    fn runs(&self, side: Side) -> bool {
        self.only.is_none_or(|o| o == side)
    }
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        peer: args.get(1).is_some_and(|a| a == "peer"),
        multi_thread: false,
        measure: Duration::from_secs(3),
        warmup: Duration::from_millis(500),
        mode: None,
        other: None,
        listen_port: 0,
        members: None,
        run_as: None,
        tls_dir: None,
        no_call_metrics: false,
        trace_export: None,
        trace_sink: false,
        only: None,
    };
    let mut tls = false;
    let mut secs = None;
    let mut smoke = false;
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--multi-thread" => o.multi_thread = true,
            "--smoke" => smoke = true,
            "--tls" => tls = true,
            "--no-call-metrics" => o.no_call_metrics = true,
            "--trace-export" => o.trace_sink = true,
            "--trace-export-to" => o.trace_export = Some(value("--trace-export-to")?),
            "--tls-dir" => o.tls_dir = Some(value("--tls-dir")?.into()),
            "--secs" => {
                let v = value("--secs")?;
                let s: f64 = v
                    .parse()
                    .map_err(|_| format!("--secs: not a number: {v}"))?;
                if !(s.is_finite() && s > 0.0 && s < 3600.0) {
                    return Err(format!("--secs must be in (0, 3600), got {s}"));
                }
                secs = Some(s);
            }
            "--mode" => o.mode = Some(value("--mode")?),
            "--only" => {
                o.only = Some(match value("--only")?.as_str() {
                    "clustergo" => Side::Clustergo,
                    "raw" => Side::Raw,
                    "tonic" => Side::Tonic,
                    v => return Err(format!("--only: clustergo, raw or tonic, not {v:?}")),
                })
            }
            "--other" => o.other = Some(value("--other")?),
            "--members" => o.members = Some(value("--members")?),
            "--as" => o.run_as = Some(value("--as")?),
            "--listen-port" => {
                let v = value("--listen-port")?;
                o.listen_port = v
                    .parse()
                    .map_err(|_| format!("--listen-port: bad port {v}"))?;
            }
            _ => {} // cargo passes --bench and friends
        }
    }
    if tls && o.tls_dir.is_none() {
        o.tls_dir = Some(make_certs()?);
    }
    if smoke {
        o.measure = Duration::from_millis(200);
        o.warmup = Duration::from_millis(50);
    }
    if let Some(s) = secs {
        o.measure = Duration::from_secs_f64(s);
    }
    if let Some(m) = &o.mode
        && !MODES.contains(&m.as_str())
    {
        return Err(format!("unknown mode {m:?}; modes: {}", MODES.join(", ")));
    }
    Ok(o)
}

/// Throughput and latency of one side (clustergo or raw) of a mode.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Measure {
    /// Operations counted.
    pub(crate) ops: u64,
    /// Operations per second.
    pub(crate) ops_per_sec: f64,
    /// Median latency in µs (`None` for one-way messages).
    pub(crate) p50_us: Option<f64>,
    /// 99th percentile latency in µs.
    pub(crate) p99_us: Option<f64>,
}

impl Measure {
    /// A side not run (`--only`).
    const SKIPPED: Measure = Measure {
        ops: 0,
        ops_per_sec: 0.0,
        p50_us: None,
        p99_us: None,
    };

    /// Operations per second for the table; `-` for a side not run.
    fn rate(&self) -> String {
        if self.ops == 0 {
            "-".into()
        } else {
            format!("{:.0}", self.ops_per_sec)
        }
    }

    /// `self` ÷ `base` for the table; `-` when either side was not run.
    fn ratio(&self, base: &Measure) -> String {
        if self.ops == 0 || base.ops == 0 {
            "-".into()
        } else {
            format!("{:.2}", self.ops_per_sec / base.ops_per_sec)
        }
    }
}

/// One table row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Row {
    /// Through clustergo.
    pub(crate) mesh: Measure,
    /// Through raw TCP.
    pub(crate) raw: Measure,
    /// Through one bare tonic bidi call (modes `bare::covers`).
    pub(crate) bare: Option<Measure>,
}

/// The outcome of one mode.
#[derive(Debug)]
pub(crate) struct ModeOutcome {
    /// Mode name.
    pub(crate) name: &'static str,
    /// The row, or why the mode failed.
    pub(crate) result: Result<Row, String>,
}

/// Runs the benchmark with command-line `args` (program name first). As the peer (`args[1] ==
/// "peer"`) it serves until stdin closes and then exits the process. As the orchestrator it
/// prints the table and returns one outcome per mode run.
pub(crate) fn entry(args: Vec<String>) -> Result<Vec<ModeOutcome>, String> {
    let opts = parse(&args)?;
    if opts.no_call_metrics {
        CALL_METRICS.store(false, std::sync::atomic::Ordering::Relaxed);
    }
    if let Some(dir) = &opts.tls_dir {
        let tls = clustergo::LinkTls::from_files(
            dir.join("ca.crt"),
            dir.join("node.crt"),
            dir.join("node.key"),
            true,
        )
        .map_err(|e| format!("--tls: {e}"))?;
        let _ = TLS.set(tls);
        if !opts.peer {
            println!("links: mutual TLS (rustls, ring, TLS 1.3)");
        }
    }
    let rt = if opts.multi_thread {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }
    .map_err(|e| format!("runtime: {e}"))?;
    let mut opts = opts;
    #[cfg(feature = "telemetry")]
    let telemetry = rt.block_on(trace_export(&mut opts))?;
    #[cfg(not(feature = "telemetry"))]
    rt.block_on(trace_export(&mut opts))?;
    let out = if opts.peer {
        rt.block_on(peer_main(opts)).map(|()| Vec::new())
    } else {
        Ok(rt.block_on(orchestrate(opts)))
    };
    #[cfg(feature = "telemetry")]
    if let Some(t) = telemetry {
        rt.block_on(t.shutdown());
    }
    out
}

/// `--trace-export`: a sink that discards spans, and this process exporting to it (the peers
/// get `--trace-export-to`): every call's spans are made, sampled and sent, so the run shows
/// what tracing at 100 % costs.
#[cfg(feature = "telemetry")]
async fn trace_export(opts: &mut Opts) -> Result<Option<clustergo::telemetry::Telemetry>, String> {
    if opts.trace_sink && opts.trace_export.is_none() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("trace sink: {e}"))?;
        let at = l.local_addr().map_err(|e| e.to_string())?;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(
                    opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::new(Sink),
                )
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
        );
        opts.trace_export = Some(format!("http://{at}"));
        println!("traces: every span exported over OTLP to a sink at {at}");
    }
    let Some(endpoint) = &opts.trace_export else {
        return Ok(None);
    };
    clustergo::telemetry::init_to(
        if opts.peer { "bench-peer" } else { "bench" },
        Some(endpoint),
    )
    .map(Some)
    .map_err(|e| format!("--trace-export: {e}"))
}

#[cfg(not(feature = "telemetry"))]
async fn trace_export(opts: &mut Opts) -> Result<(), String> {
    match opts.trace_sink || opts.trace_export.is_some() {
        true => Err("--trace-export needs the bench built with `--features telemetry`".into()),
        false => Ok(()),
    }
}

/// Receives spans and drops them.
#[cfg(feature = "telemetry")]
struct Sink;

#[cfg(feature = "telemetry")]
#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService for Sink {
    async fn export(
        &self,
        _request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        Ok(tonic::Response::new(Default::default()))
    }
}

#[allow(dead_code)] // unused when this file is a module of the smoke test
fn main() {
    match entry(std::env::args().collect()) {
        Ok(outcomes) => {
            let failed: Vec<&str> = outcomes
                .iter()
                .filter(|o| o.result.is_err())
                .map(|o| o.name)
                .collect();
            if !failed.is_empty() {
                eprintln!("bench: failed modes: {}", failed.join(", "));
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(2);
        }
    }
}

fn addr(text: &str) -> LogicAddr {
    text.parse().expect("valid logical address")
}

/// TLS on links for this process, when the run asked for it.
static TLS: std::sync::OnceLock<clustergo::LinkTls> = std::sync::OnceLock::new();
/// Calls timed into the histograms in this process (`--no-call-metrics` turns it off).
static CALL_METRICS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

fn config() -> NodeConfig {
    let c = NodeConfig::default()
        .secret(SECRET)
        .call_metrics(CALL_METRICS.load(std::sync::atomic::Ordering::Relaxed));
    match TLS.get() {
        Some(tls) => c.tls(tls.clone()),
        None => c,
    }
}

/// A CA and one certificate naming every server of types 1, 2 and 255 in clusters 1 and 2
/// (all the bench's addresses), written to a fresh directory.
fn make_certs() -> Result<std::path::PathBuf, String> {
    let e = |e: rcgen::Error| format!("--tls: {e}");
    let dir = std::env::temp_dir().join(format!("clustergo-bench-tls-{}", std::process::id()));
    if dir.join("node.key").exists() {
        // Made by an earlier run in this process, whose configuration is still in force.
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("--tls: {e}"))?;
    let ca_key = rcgen::KeyPair::generate().map_err(e)?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).map_err(e)?.pem();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let names: Vec<String> = [1, 2]
        .iter()
        .flat_map(|c| [1, 2, 255].map(|t| format!("*.{t}.{c}.clustergo")))
        .collect();
    let key = rcgen::KeyPair::generate().map_err(e)?;
    let leaf = rcgen::CertificateParams::new(names)
        .map_err(e)?
        .signed_by(&key, &issuer)
        .map_err(e)?;
    for (name, text) in [
        ("ca.crt", ca_pem),
        ("node.crt", leaf.pem()),
        ("node.key", key.serialize_pem()),
    ] {
        std::fs::write(dir.join(name), text).map_err(|e| format!("--tls: {e}"))?;
    }
    Ok(dir)
}

/// `addr=host:port,...` as membership.
fn parse_members(list: &str) -> Result<Vec<Member>, String> {
    list.split(',')
        .map(|item| {
            let (a, net) = item
                .split_once('=')
                .ok_or(format!("--members: {item:?} is not addr=host:port"))?;
            let addr: LogicAddr = a.parse().map_err(|e| format!("--members: {e}"))?;
            // Cluster 1's server is exported, so cluster 2 may call it.
            Ok(Member::new(addr, net).with_export(!addr.is_harbor()))
        })
        .collect()
}

fn members(orchestrator: &str, peer: &str) -> MemoryDiscovery {
    MemoryDiscovery::new([
        Member::new(addr("1.1.1"), orchestrator),
        Member::new(addr("1.2.1"), peer),
    ])
}

// ---------------------------------------------------------------------------------------------
// Peer process

/// Receiver-side counters of one-way messages: count, first arrival, and the latest sampled
/// arrival with the count at that moment (ns since `base`). The clock is read once per
/// `SAMPLE` messages so that reading it does not dominate what is measured.
#[derive(Debug)]
struct SinkStats {
    base: Instant,
    count: AtomicU64,
    first_ns: AtomicU64,
    last_ns: AtomicU64,
    last_count: AtomicU64,
}

/// Messages between clock reads at the receiver.
const SAMPLE: u64 = 256;

impl SinkStats {
    fn new() -> Self {
        SinkStats {
            base: Instant::now(),
            count: AtomicU64::new(0),
            first_ns: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
            last_count: AtomicU64::new(0),
        }
    }

    fn hit(&self) {
        let n = self.count.fetch_add(1, Ordering::Relaxed);
        if n % SAMPLE == 0 {
            let t = self.base.elapsed().as_nanos() as u64 + 1; // 0 means "none yet"
            if n == 0 {
                self.first_ns.store(t, Ordering::Relaxed);
            }
            self.last_ns.store(t, Ordering::Relaxed);
            self.last_count.store(n, Ordering::Relaxed);
        }
    }

    fn reset(&self) {
        self.count.store(0, Ordering::Relaxed);
        self.last_count.store(0, Ordering::Relaxed);
        self.first_ns.store(0, Ordering::Relaxed);
        self.last_ns.store(0, Ordering::Relaxed);
    }

    /// Big-endian: messages received, the index of the last sampled arrival (messages that
    /// arrived after the first and up to it), and the ns between the two samples.
    fn encode(&self) -> [u8; 24] {
        let count = self.count.load(Ordering::Relaxed);
        let sampled = self.last_count.load(Ordering::Relaxed);
        let span = self
            .last_ns
            .load(Ordering::Relaxed)
            .saturating_sub(self.first_ns.load(Ordering::Relaxed));
        let mut out = [0; 24];
        out[..8].copy_from_slice(&count.to_be_bytes());
        out[8..16].copy_from_slice(&sampled.to_be_bytes());
        out[16..].copy_from_slice(&span.to_be_bytes());
        out
    }
}

async fn peer_main(opts: Opts) -> Result<(), String> {
    // Exit as soon as the orchestrator goes away (its end of our stdin closes).
    std::thread::spawn(|| {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 256];
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
        std::process::exit(0);
    });
    // The harbor mode gives the whole membership and the node to run; the others, the
    // orchestrator's address.
    let listed = opts.members.as_deref().map(parse_members).transpose()?;
    let me = addr(opts.run_as.as_deref().unwrap_or("1.2.1"));
    let listen_port = match &listed {
        Some(list) => list
            .iter()
            .find(|m| m.addr == me)
            .and_then(|m| m.net_addr.rsplit(':').next()?.parse().ok())
            .ok_or(format!("peer: {me} is not in --members"))?,
        None => opts.listen_port,
    };
    let node_listener = std::net::TcpListener::bind(("127.0.0.1", listen_port))
        .map_err(|e| format!("peer: bind: {e}"))?;
    let node_port = node_listener
        .local_addr()
        .map_err(|e| e.to_string())?
        .port();
    let raw_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("peer: bind raw: {e}"))?;
    let raw_port = raw_listener.local_addr().map_err(|e| e.to_string())?.port();
    let bare_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("peer: bind bare: {e}"))?;
    let bare_port = bare_listener
        .local_addr()
        .map_err(|e| e.to_string())?
        .port();
    bare::serve(bare_listener);

    let sink = Arc::new(SinkStats::new());
    let (s_data, s_reset, s_stats) = (sink.clone(), sink.clone(), sink.clone());
    let discovery = match listed {
        Some(list) => MemoryDiscovery::new(list),
        None => {
            let other = opts.other.ok_or("peer: --other is required")?;
            members(&other, &format!("127.0.0.1:{node_port}"))
        }
    };
    let node = streams::serve(Node::builder(me))
        .discovery(discovery)
        .config(config())
        .listener(node_listener)
        .rpc("echo", |_ctx, p| async move { Ok::<_, HandlerError>(p) })
        .rpc("msg-stats", move |_ctx, _| {
            let bytes = Bytes::copy_from_slice(&s_stats.encode());
            async move { Ok::<_, HandlerError>(bytes) }
        })
        .on_cmd(CMD_DATA, move |_ctx, _p| s_data.hit())
        .on_cmd(CMD_RESET, move |_ctx, _p| s_reset.reset())
        .build();
    node.start()
        .await
        .map_err(|e| format!("peer: start: {e}"))?;

    let mut out = std::io::stdout().lock();
    writeln!(out, "READY {node_port} {raw_port} {bare_port}").map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())?;
    drop(out);

    loop {
        match raw_listener.accept().await {
            Ok((s, _)) => {
                tokio::spawn(async move {
                    if let Err(e) = raw_conn(s).await {
                        eprintln!("peer: raw connection: {e}");
                    }
                });
            }
            Err(e) => {
                eprintln!("peer: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Reads one frame body into `buf`; `Ok(false)` at a clean end of stream.
async fn read_frame<R: AsyncReadExt + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<bool> {
    let len = match r.read_u32().await {
        Ok(n) => n as usize,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e),
    };
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!("frame of {len} bytes")));
    }
    buf.resize(len, 0);
    r.read_exact(buf).await?;
    Ok(true)
}

/// One raw connection: first byte `E` (echo every frame) or `S` (sink: count frames; a 1-byte
/// frame `R` resets, `Q` answers count and elapsed).
async fn raw_conn(s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let (r, w) = s.into_split();
    let mut r = BufReader::with_capacity(64 << 10, r);
    let w = BufWriter::with_capacity(64 << 10, w);
    let kind = r.read_u8().await?;
    if matches!(kind, b'B' | b'K') {
        return streams::raw_conn(kind, r, w).await;
    }
    let mut w = w;
    let mut buf = Vec::with_capacity(1024);
    let sink = SinkStats::new();
    while read_frame(&mut r, &mut buf).await? {
        match kind {
            b'E' => {
                w.write_u32(buf.len() as u32).await?;
                w.write_all(&buf).await?;
                // Flush once nothing more is already received: answers go out in batches.
                if r.buffer().is_empty() {
                    w.flush().await?;
                }
            }
            b'S' => match &buf[..] {
                b"R" => sink.reset(),
                b"Q" => {
                    w.write_u32(24).await?;
                    w.write_all(&sink.encode()).await?;
                    w.flush().await?;
                }
                _ => sink.hit(),
            },
            k => {
                return Err(std::io::Error::other(format!(
                    "unknown connection kind {k}"
                )));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Orchestrator

/// The peer process and the addresses it serves on.
struct PeerProc {
    child: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
    raw: SocketAddr,
    /// The bare tonic server.
    bare: SocketAddr,
}

async fn spawn_peer(opts: &Opts, args: &[String]) -> Result<(PeerProc, u16), String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("peer")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if opts.multi_thread {
        cmd.arg("--multi-thread");
    }
    if let Some(dir) = &opts.tls_dir {
        cmd.arg("--tls-dir").arg(dir);
    }
    if opts.no_call_metrics {
        cmd.arg("--no-call-metrics");
    }
    if let Some(e) = &opts.trace_export {
        cmd.arg("--trace-export-to").arg(e);
    }
    let mut child = cmd.spawn().map_err(|e| format!("spawn peer: {e}"))?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().ok_or("peer stdout")?;
    let mut proc = PeerProc {
        child,
        stdin,
        raw: SocketAddr::from(([127, 0, 0, 1], 0)),
        bare: SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let mut lines = BufReader::new(stdout).lines();
    let line = match tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await {
        Ok(Ok(Some(line))) => line,
        other => {
            stop_peer(&mut proc).await;
            return Err(format!("peer did not report READY: {other:?}"));
        }
    };
    let ports: Vec<u16> = line
        .strip_prefix("READY ")
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let [node_port, raw_port, bare_port] = ports[..] else {
        stop_peer(&mut proc).await;
        return Err(format!("bad READY line from peer: {line:?}"));
    };
    proc.raw = SocketAddr::from(([127, 0, 0, 1], raw_port));
    proc.bare = SocketAddr::from(([127, 0, 0, 1], bare_port));
    Ok((proc, node_port))
}

async fn stop_node(node: &Node) {
    if tokio::time::timeout(Duration::from_secs(10), node.shutdown())
        .await
        .is_err()
    {
        eprintln!("bench: node shutdown took over 10 s");
    }
}

async fn stop_peer(p: &mut PeerProc) {
    drop(p.stdin.take()); // the peer exits by itself on EOF ...
    // ... given a moment to (a profiler wrapping it writes its data then) ...
    let _ = tokio::time::timeout(Duration::from_secs(10), p.child.wait()).await;
    let _ = p.child.kill().await; // ... and is killed and reaped regardless
}

async fn orchestrate(opts: Opts) -> Vec<ModeOutcome> {
    let runtime = if opts.multi_thread {
        "multi-thread (2 workers)"
    } else {
        "current_thread"
    };
    println!(
        "clustergo mesh bench: runtime {runtime} in both processes, {:.2} s measured per mode after {:.2} s warm-up, 64-byte payloads, 127.0.0.1",
        opts.measure.as_secs_f64(),
        opts.warmup.as_secs_f64()
    );
    println!(
        "{:<20} | {:>10} | {:>6} | {:>6} | {:>10} | {:>7} | {:>7} | {:>5} | {:>10} | {:>8} | {:>7}",
        "mode",
        "ops/s",
        "p50 µs",
        "p99 µs",
        "raw ops/s",
        "raw p50",
        "raw p99",
        "ratio",
        "tonic op/s",
        "tonic p50",
        "÷ tonic"
    );
    println!("{}", "-".repeat(136));
    let mut outcomes = Vec::new();
    for name in MODES {
        if opts.mode.as_deref().is_some_and(|m| m != name) {
            continue;
        }
        let limit = opts.warmup * 2 + opts.measure * 2 + MODE_SLACK;
        let result = match tokio::time::timeout(limit, run_mode(&opts, name)).await {
            Ok(r) => r,
            Err(_) => Err(format!("hung: not done within {limit:?}")),
        };
        match &result {
            Ok(row) => println!(
                "{:<20} | {:>10} | {:>6} | {:>6} | {:>10} | {:>7} | {:>7} | {:>5} | {:>10} | {:>8} | {:>7}",
                name,
                row.mesh.rate(),
                us(row.mesh.p50_us),
                us(row.mesh.p99_us),
                row.raw.rate(),
                us(row.raw.p50_us),
                us(row.raw.p99_us),
                row.mesh.ratio(&row.raw),
                row.bare.map_or_else(|| "-".into(), |b| b.rate()),
                us(row.bare.and_then(|b| b.p50_us)),
                row.bare.map_or_else(|| "-".into(), |b| row.mesh.ratio(&b)),
            ),
            Err(e) => println!("{name:<20} | FAILED: {e}"),
        }
        outcomes.push(ModeOutcome { name, result });
    }
    println!(
        "units: rpc = calls/s, msg = messages/s, pingpong = round trips/s, pipe = echoed 64-byte writes/s, bulk = MB/s (10^6 bytes)"
    );
    println!("bench: {} modes ran", outcomes.len());
    outcomes
}

fn us(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

/// One mode: a fresh peer process, the clustergo run, then the raw run, then teardown.
async fn run_mode(opts: &Opts, name: &str) -> Result<Row, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let own_port = listener.local_addr().map_err(|e| e.to_string())?.port();
    if name == "rpc-c128-harbor" {
        return run_harbor_mode(opts, listener).await;
    }
    let args = [
        "--listen-port",
        "0",
        "--other",
        &format!("127.0.0.1:{own_port}"),
    ]
    .map(String::from);
    let (mut peer, peer_port) = spawn_peer(opts, &args).await?;
    let node = Node::builder(addr("1.1.1"))
        .discovery(members(
            &format!("127.0.0.1:{own_port}"),
            &format!("127.0.0.1:{peer_port}"),
        ))
        .config(config())
        .listener(listener)
        .build();
    let result = async {
        node.start().await.map_err(|e| format!("start: {e}"))?;
        let to = addr("1.2.1");
        let (warmup, measure) = (opts.warmup, opts.measure);
        let mesh = if opts.runs(Side::Clustergo) {
            match name {
                "rpc-c1" => mesh_rpc(&node, to, 1, warmup, measure).await,
                "rpc-c128" => mesh_rpc(&node, to, CONCURRENCY, warmup, measure).await,
                "msg" => mesh_msg(&node, to, warmup, measure).await,
                _ => streams::run(streams::Target::Mesh(&node, to), name, warmup, measure).await,
            }
            .map_err(|e| format!("clustergo: {e}"))?
        } else {
            Measure::SKIPPED
        };
        let raw = if opts.runs(Side::Raw) {
            match name {
                "rpc-c1" => raw_rpc_c1(peer.raw, warmup, measure).await,
                "rpc-c128" => raw_rpc_concurrent(peer.raw, CONCURRENCY, warmup, measure).await,
                "msg" => raw_msg(peer.raw, warmup, measure).await,
                _ => streams::run(streams::Target::Raw(peer.raw), name, warmup, measure).await,
            }
            .map_err(|e| format!("raw: {e}"))?
        } else {
            Measure::SKIPPED
        };
        let bare = if opts.runs(Side::Tonic) {
            bare::run(name, peer.bare, warmup, measure)
                .await
                .transpose()
                .map_err(|e| format!("bare tonic: {e}"))?
        } else {
            None
        };
        Ok(Row { mesh, raw, bare })
    }
    .await;
    stop_node(&node).await;
    stop_peer(&mut peer).await;
    result
}

/// `rpc-c128-harbor`: client 2.1.1 (this process) → harbor 2.255.1 → harbor 1.255.1 →
/// server 1.2.1, each in its own process; the raw baseline is the direct one of `rpc-c128`.
async fn run_harbor_mode(opts: &Opts, listener: std::net::TcpListener) -> Result<Row, String> {
    let own = listener.local_addr().map_err(|e| e.to_string())?;
    // Ports for the peer processes to bind later: from below the ephemeral range, so no
    // outgoing connection or `:0` listener takes one first (a peer then failed to start).
    let free = || -> Result<String, String> { Ok(format!("127.0.0.1:{}", ports::free_port())) };
    let list = format!(
        "2.1.1={own},1.2.1={},1.255.1={},2.255.1={}",
        free()?,
        free()?,
        free()?
    );
    let mut procs = Vec::new();
    let mut server_raw = None;
    for who in ["1.2.1", "1.255.1", "2.255.1"] {
        let args = ["--members", &list, "--as", who].map(String::from);
        match spawn_peer(opts, &args).await {
            Ok((p, _)) => {
                if who == "1.2.1" {
                    server_raw = Some(p.raw);
                }
                procs.push(p)
            }
            Err(e) => {
                for p in &mut procs {
                    stop_peer(p).await;
                }
                return Err(e);
            }
        }
    }
    let node = Node::builder(addr("2.1.1"))
        .discovery(MemoryDiscovery::new(parse_members(&list)?))
        .config(config())
        .listener(listener)
        .build();
    let result = async {
        node.start().await.map_err(|e| format!("start: {e}"))?;
        let mesh = if opts.runs(Side::Clustergo) {
            mesh_rpc(&node, addr("1.2.1"), CONCURRENCY, opts.warmup, opts.measure)
                .await
                .map_err(|e| format!("clustergo through harbors: {e}"))?
        } else {
            Measure::SKIPPED
        };
        let raw_to = server_raw.ok_or("no server")?;
        let raw = if opts.runs(Side::Raw) {
            raw_rpc_concurrent(raw_to, CONCURRENCY, opts.warmup, opts.measure)
                .await
                .map_err(|e| format!("raw: {e}"))?
        } else {
            Measure::SKIPPED
        };
        Ok(Row {
            mesh,
            raw,
            bare: None,
        })
    }
    .await;
    stop_node(&node).await;
    for p in &mut procs {
        stop_peer(p).await;
    }
    result
}

/// Latencies recorded by one caller: u32 nanoseconds.
fn latency_vec(measure: Duration, callers: usize) -> Vec<u32> {
    // A guess of the calls one caller completes; growth beyond it is amortized.
    let guess = (measure.as_secs_f64() * 200_000.0 / callers as f64) as usize;
    Vec::with_capacity(guess.clamp(1024, 4 << 20))
}

fn nanos(d: Duration) -> u32 {
    u32::try_from(d.as_nanos()).unwrap_or(u32::MAX)
}

/// Builds a measure from per-call latencies taken in `elapsed`.
fn summarize(mut lat: Vec<u32>, elapsed: Duration) -> Measure {
    lat.sort_unstable();
    let pct = |p: f64| -> Option<f64> {
        if lat.is_empty() {
            return None;
        }
        let rank = ((p / 100.0) * lat.len() as f64).ceil() as usize;
        Some(f64::from(lat[rank.clamp(1, lat.len()) - 1]) / 1000.0)
    };
    Measure {
        ops: lat.len() as u64,
        ops_per_sec: lat.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_us: pct(50.0),
        p99_us: pct(99.0),
    }
}

/// Closed-loop echo calls from `callers` tasks; latencies of calls started in the measured
/// window are kept.
async fn mesh_rpc(
    node: &Node,
    to: LogicAddr,
    callers: usize,
    warmup: Duration,
    measure: Duration,
) -> Result<Measure, String> {
    let start = Instant::now() + warmup;
    let end = start + measure;
    let mut tasks = Vec::with_capacity(callers);
    for _ in 0..callers {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            let payload = Bytes::from_static(&PAYLOAD);
            let mut lat = latency_vec(measure, callers);
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    return Ok(lat);
                }
                let reply = node
                    .call(to, "echo", payload.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                if reply.len() != PAYLOAD.len() {
                    return Err(format!("echo returned {} bytes", reply.len()));
                }
                if t0 >= start {
                    lat.push(nanos(t0.elapsed()));
                }
            }
        }));
    }
    let all = join_latencies(tasks).await?;
    Ok(summarize(
        all,
        Instant::now().saturating_duration_since(start),
    ))
}

async fn join_latencies(
    tasks: Vec<tokio::task::JoinHandle<Result<Vec<u32>, String>>>,
) -> Result<Vec<u32>, String> {
    let mut all = Vec::new();
    let mut first_err = None;
    for t in tasks {
        match t.await {
            Ok(Ok(lat)) => all.extend_from_slice(&lat),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(format!("caller task: {e}"));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(all),
    }
}

/// One-way messages as fast as `send_cmd` takes them; the rate is the receiver's.
async fn mesh_msg(
    node: &Node,
    to: LogicAddr,
    warmup: Duration,
    measure: Duration,
) -> Result<Measure, String> {
    let payload = Bytes::from_static(&PAYLOAD);
    let send_for = |d: Duration| {
        let payload = payload.clone();
        async move {
            let end = Instant::now() + d;
            let mut sent = 0u64;
            loop {
                if sent % 32 == 0 && Instant::now() >= end {
                    return Ok::<_, String>(sent);
                }
                node.send_cmd(to, CMD_DATA, payload.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                sent += 1;
            }
        }
    };
    send_for(warmup).await?;
    node.send_cmd(to, CMD_RESET, Bytes::new())
        .await
        .map_err(|e| e.to_string())?;
    let sent = send_for(measure).await?;
    // Requests travel the same ordered link, so every message is handled before this.
    let stats = node
        .call(to, "msg-stats", Bytes::new())
        .await
        .map_err(|e| format!("msg-stats: {e}"))?;
    let m = receiver_measure(&stats)?;
    if m.ops != sent {
        eprintln!("bench: msg: {sent} sent, {} received", m.ops);
    }
    Ok(m)
}

fn receiver_measure(stats: &[u8]) -> Result<Measure, String> {
    let stats: [u8; 24] = stats
        .try_into()
        .map_err(|_| format!("stats of {} bytes", stats.len()))?;
    let word = |i: usize| u64::from_be_bytes(stats[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let (count, sampled, span_ns) = (word(0), word(1), word(2));
    let ops_per_sec = if sampled > 0 && span_ns > 0 {
        sampled as f64 / (span_ns as f64 / 1e9)
    } else {
        0.0
    };
    Ok(Measure {
        ops: count,
        ops_per_sec,
        p50_us: None,
        p99_us: None,
    })
}

async fn raw_connect(
    to: SocketAddr,
    kind: u8,
) -> std::io::Result<(
    BufReader<tokio::net::tcp::OwnedReadHalf>,
    BufWriter<tokio::net::tcp::OwnedWriteHalf>,
)> {
    let s = TcpStream::connect(to).await?;
    s.set_nodelay(true)?;
    let (r, w) = s.into_split();
    let mut w = BufWriter::with_capacity(64 << 10, w);
    w.write_u8(kind).await?;
    Ok((BufReader::with_capacity(64 << 10, r), w))
}

/// Writes one echo request frame: length, 8-byte id, payload.
async fn write_request<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    id: u64,
    payload: &[u8],
) -> std::io::Result<()> {
    w.write_u32((8 + payload.len()) as u32).await?;
    w.write_u64(id).await?;
    w.write_all(payload).await
}

/// Raw baseline of `rpc-c1`: one request/response outstanding on one connection.
async fn raw_rpc_c1(
    to: SocketAddr,
    warmup: Duration,
    measure: Duration,
) -> Result<Measure, String> {
    let io = |e: std::io::Error| e.to_string();
    let (mut r, mut w) = raw_connect(to, b'E').await.map_err(io)?;
    let start = Instant::now() + warmup;
    let end = start + measure;
    let mut lat = latency_vec(measure, 1);
    let mut buf = Vec::with_capacity(128);
    let mut id = 0u64;
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        id += 1;
        write_request(&mut w, id, &PAYLOAD).await.map_err(io)?;
        w.flush().await.map_err(io)?;
        if !read_frame(&mut r, &mut buf).await.map_err(io)? {
            return Err("server closed".into());
        }
        if buf.len() != 8 + PAYLOAD.len() || buf[..8] != id.to_be_bytes() {
            return Err("bad echo".into());
        }
        if t0 >= start {
            lat.push(nanos(t0.elapsed()));
        }
    }
    w.shutdown().await.map_err(io)?;
    Ok(summarize(
        lat,
        Instant::now().saturating_duration_since(start),
    ))
}

/// Raw baseline of `rpc-c128`: `callers` tasks share one connection; a writer task drains
/// their requests into a `BufWriter` and flushes when the queue is empty; a reader task routes
/// each answer by its id (caller index in the high 32 bits) to the caller's `Notify`.
async fn raw_rpc_concurrent(
    to: SocketAddr,
    callers: usize,
    warmup: Duration,
    measure: Duration,
) -> Result<Measure, String> {
    let io = |e: std::io::Error| e.to_string();
    let (mut r, mut w) = raw_connect(to, b'E').await.map_err(io)?;
    let (tx, mut rx) = mpsc::channel::<(u64, Bytes)>(callers * 2);
    let writer = tokio::spawn(async move {
        while let Some((id, p)) = rx.recv().await {
            write_request(&mut w, id, &p).await?;
            while let Ok((id, p)) = rx.try_recv() {
                write_request(&mut w, id, &p).await?;
            }
            w.flush().await?;
        }
        w.shutdown().await
    });
    let slots: Arc<Vec<(Notify, AtomicU64)>> = Arc::new(
        (0..callers)
            .map(|_| (Notify::new(), AtomicU64::new(0)))
            .collect(),
    );
    let reader_slots = slots.clone();
    let reader = tokio::spawn(async move {
        let mut buf = Vec::with_capacity(128);
        while read_frame(&mut r, &mut buf).await? {
            if buf.len() < 8 {
                return Err(std::io::Error::other("short echo"));
            }
            let id = u64::from_be_bytes(buf[..8].try_into().expect("8 bytes"));
            let Some((notify, got)) = reader_slots.get((id >> 32) as usize) else {
                return Err(std::io::Error::other("echo for an unknown caller"));
            };
            got.store(id, Ordering::Release);
            notify.notify_one();
        }
        Ok(())
    });
    let start = Instant::now() + warmup;
    let end = start + measure;
    let mut tasks = Vec::with_capacity(callers);
    for i in 0..callers {
        let (tx, slots) = (tx.clone(), slots.clone());
        tasks.push(tokio::spawn(async move {
            let payload = Bytes::from_static(&PAYLOAD);
            let mut lat = latency_vec(measure, callers);
            let (notify, got) = &slots[i];
            let mut seq = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    return Ok(lat);
                }
                seq += 1;
                let id = ((i as u64) << 32) | seq;
                tx.send((id, payload.clone()))
                    .await
                    .map_err(|_| "writer stopped".to_string())?;
                if tokio::time::timeout(Duration::from_secs(5), notify.notified())
                    .await
                    .is_err()
                {
                    return Err("raw echo timed out".to_string());
                }
                if got.load(Ordering::Acquire) != id {
                    return Err("raw echo answered the wrong request".to_string());
                }
                if t0 >= start {
                    lat.push(nanos(t0.elapsed()));
                }
            }
        }));
    }
    drop(tx);
    let result = join_latencies(tasks).await;
    let elapsed = Instant::now().saturating_duration_since(start);
    // All callers are done, so the writer drains, shuts the connection, and the reader sees EOF.
    let w = tokio::time::timeout(Duration::from_secs(5), writer).await;
    let r = tokio::time::timeout(Duration::from_secs(5), reader).await;
    let all = result?;
    match (w, r) {
        (Ok(Ok(Ok(()))), Ok(Ok(Ok(())))) => {}
        other => return Err(format!("raw connection tasks: {other:?}")),
    }
    Ok(summarize(all, elapsed))
}

/// Raw baseline of `msg`: frames written back to back through a `BufWriter`; the rate is the
/// receiver's.
async fn raw_msg(to: SocketAddr, warmup: Duration, measure: Duration) -> Result<Measure, String> {
    let io = |e: std::io::Error| e.to_string();
    let (mut r, mut w) = raw_connect(to, b'S').await.map_err(io)?;
    async fn send_for<W: AsyncWriteExt + Unpin>(w: &mut W, d: Duration) -> std::io::Result<u64> {
        let end = Instant::now() + d;
        let mut sent = 0u64;
        loop {
            if sent % 32 == 0 && Instant::now() >= end {
                return Ok(sent);
            }
            w.write_u32(PAYLOAD.len() as u32).await?;
            w.write_all(&PAYLOAD).await?;
            sent += 1;
        }
    }
    send_for(&mut w, warmup).await.map_err(io)?;
    w.write_u32(1).await.map_err(io)?;
    w.write_all(b"R").await.map_err(io)?;
    let sent = send_for(&mut w, measure).await.map_err(io)?;
    w.write_u32(1).await.map_err(io)?;
    w.write_all(b"Q").await.map_err(io)?;
    w.flush().await.map_err(io)?;
    let mut buf = Vec::with_capacity(24);
    let got = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut r, &mut buf))
        .await
        .map_err(|_| "sink stats timed out".to_string())?
        .map_err(io)?;
    if !got {
        return Err("sink closed".into());
    }
    let m = receiver_measure(&buf)?;
    if m.ops != sent {
        return Err(format!("raw msg: {sent} sent, {} received", m.ops));
    }
    w.shutdown().await.map_err(io)?;
    Ok(m)
}
