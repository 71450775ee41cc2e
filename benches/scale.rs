//! Scale benchmark: how a node's costs grow with its links (`links`), with the membership it
//! follows (`members`, in `scale/members.rs`) and with the clusters behind its harbors
//! (`clusters`, in `scale/clusters.rs`). Figures, not pass/fail; every run is bounded in time
//! and stops by itself. Each mode writes its figures as CSV and draws each curve as a PNG in
//! `target/scale/` (`<mode>-smoke*` for a smoke run).
//!
//! Mode `links`: one node, the hub (`1.2.1`, a process of its own), links to N peers
//! (`1.1.1`…, many nodes hosted in two other processes), for each N of `--sizes` (default
//! 10, 100, 500, 1,000). For each N:
//! - **time to link all N**: the hub calls each peer once (64 at a time), from its first call
//!   to its last answer;
//! - **memory per link**, on each side: the hub's resident memory after linking minus before,
//!   over N; the hosts' likewise (their nodes are up before; only the links are new);
//! - **CPU at idle**: the hub's and the hosts' CPU time over 3 s with every link up and no
//!   traffic (keepalives, acknowledgement sweeps, timers), per second;
//! - **`rpc-c128` spread over all N**: 128 callers in the hub, each calling the peers in turn,
//!   64-byte echo; calls/s and latency p50/p99; and **its raw baseline in the same run**: the
//!   same callers over plain TCP, one connection per peer to an echo server in the process
//!   that hosts it (requests pipelined, answers batched), so the framework's cost reads as a
//!   ratio.
//!
//! It prints a table and writes `target/scale/links.csv` (a smoke run, `links-smoke.csv`).
//!
//! Flags: `--mode links|members|clusters` (repeatable; all by default), `--sizes 10,100,...`
//! (links), `--members 100,...` (members), `--clusters 10,...` (clusters), `--secs <f64>` (rpc
//! seconds, default 3), `--smoke` (small sizes, 0.3 s). Unknown arguments (cargo's `--bench`)
//! are ignored.
//!
//! Processes (this binary re-executed): `host <addr,addr,...>` serves those nodes (an echo
//! server each, and a raw echo server for the process); `hub <addr> <peers> <secs> <idle>`
//! is the hub, calling every listed node but itself and the harbors; `watchers` is the
//! members mode's. Each binds its listeners, prints
//! `PORTS …`, reads the membership (`MEMBERS addr=host:port …`) from stdin, starts its nodes
//! and prints `READY`; the hub then runs the steps the parent sends it. Each exits when its
//! stdin closes. Open-file limits are raised to the hard limit at start (each link is a
//! socket on each side).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clustergo::{Bytes, HandlerError, LogicAddr, Member, MemoryDiscovery, Node, NodeConfig};

#[path = "scale/clusters.rs"]
pub(crate) mod clusters;
#[path = "scale/members.rs"]
pub(crate) mod members;
#[path = "scale/plot.rs"]
pub(crate) mod plot;

const SECRET: &[u8] = b"clustergo-scale-bench";
/// Every mode, in run order.
pub(crate) const MODES: [&str; 3] = ["links", "members", "clusters"];
/// Concurrent callers of the spread `rpc-c128`.
const CALLERS: usize = 128;
/// Calls in flight while linking.
const LINKING: usize = 64;
/// Processes the peers are spread over.
const HOSTS: usize = 2;
/// How long idle CPU is measured.
const IDLE: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
pub(crate) struct Opts {
    modes: Vec<&'static str>,
    sizes: Vec<usize>,
    members: Vec<usize>,
    clusters: Vec<usize>,
    measure: Duration,
    idle: Duration,
    smoke: bool,
}

/// One N's figures.
#[derive(Debug, Clone)]
pub(crate) struct LinksRow {
    pub(crate) peers: usize,
    pub(crate) link_ms: f64,
    pub(crate) hub_bytes_per_link: f64,
    pub(crate) peer_bytes_per_link: f64,
    pub(crate) hub_idle_cpu_ms_per_s: f64,
    pub(crate) hosts_idle_cpu_ms_per_s: f64,
    pub(crate) calls_per_sec: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    /// The raw baseline: the same callers over plain TCP, one connection per peer.
    pub(crate) raw_calls_per_sec: f64,
    pub(crate) raw_p50_us: f64,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        modes: Vec::new(),
        sizes: vec![10, 100, 500, 1000],
        members: vec![100, 1_000, 10_000, 50_000],
        clusters: vec![10, 100, 1_000],
        measure: Duration::from_secs(3),
        idle: IDLE,
        smoke: false,
    };
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--mode" => {
                let m = value("--mode")?;
                let known = MODES.iter().find(|k| **k == m);
                o.modes.push(
                    known.ok_or_else(|| {
                        format!("unknown mode {m:?}; modes: {}", MODES.join(", "))
                    })?,
                );
            }
            "--sizes" => o.sizes = counts("--sizes", &value("--sizes")?, 60_000)?,
            "--clusters" => o.clusters = counts("--clusters", &value("--clusters")?, 4_000)?,
            "--members" => o.members = counts("--members", &value("--members")?, 52_000)?,
            "--secs" => {
                o.measure = Duration::from_secs_f64(
                    value("--secs")?
                        .parse()
                        .map_err(|e| format!("--secs: {e}"))?,
                )
            }
            "--smoke" => {
                o.sizes = vec![10, 20];
                o.members = vec![50, 200];
                o.clusters = vec![3, 6];
                o.measure = Duration::from_millis(300);
                o.idle = Duration::from_millis(300);
                o.smoke = true;
            }
            _ => {}
        }
    }
    if o.modes.is_empty() {
        o.modes = MODES.to_vec();
    }
    Ok(o)
}

/// A comma-separated list of counts for flag `name`, each from 1 to `max`.
fn counts(name: &str, list: &str, max: usize) -> Result<Vec<usize>, String> {
    let v = list
        .split(',')
        .map(|n| {
            n.trim()
                .parse::<usize>()
                .map_err(|e| format!("{name}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if v.iter().any(|n| *n == 0 || *n > max) {
        return Err(format!("{name}: each between 1 and {max}"));
    }
    Ok(v)
}

/// What a run measured, by mode (empty: not run).
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) links: Vec<LinksRow>,
    /// `None`: the mode was asked for but could not run here (no etcd).
    pub(crate) members: Option<Vec<members::MembersRow>>,
    pub(crate) clusters: Vec<clusters::ClustersRow>,
}

/// Runs the benchmark, or one of its processes.
pub(crate) fn entry(args: Vec<String>) -> Result<Report, String> {
    raise_open_files();
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    };
    match args.get(1).map(String::as_str) {
        Some("host") => {
            let list = addrs(args.get(2).ok_or("host: addresses")?)?;
            runtime()?.block_on(host(list))?;
            Ok(Report::default())
        }
        Some("hub") => {
            let me: LogicAddr = args
                .get(2)
                .and_then(|s| s.parse().ok())
                .ok_or("hub: address")?;
            let peers = number(args.get(3))?;
            let secs: f64 = args
                .get(4)
                .and_then(|s| s.parse().ok())
                .ok_or("hub: seconds")?;
            let idle: f64 = args
                .get(5)
                .and_then(|s| s.parse().ok())
                .ok_or("hub: idle seconds")?;
            runtime()?.block_on(hub(
                me,
                peers,
                Duration::from_secs_f64(secs),
                Duration::from_secs_f64(idle),
            ))?;
            Ok(Report::default())
        }
        Some("watchers") => {
            members::process(&args)?;
            Ok(Report::default())
        }
        _ => {
            let opts = parse(&args)?;
            let mut report = Report::default();
            for mode in &opts.modes {
                match *mode {
                    "links" => report.links = links(&opts)?,
                    "members" => {
                        report.members =
                            members::run(&opts.members, opts.measure.as_secs_f64(), opts.smoke)?
                    }
                    "clusters" => report.clusters = clusters::run(&opts.clusters, &opts)?,
                    _ => unreachable!("modes are checked when parsed"),
                }
            }
            Ok(report)
        }
    }
}

fn number(arg: Option<&String>) -> Result<usize, String> {
    arg.and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("expected a number, got {arg:?}"))
}

/// Raises this process's open-file limit to its hard limit; the limit it has now.
pub(crate) fn raise_open_files() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0)
}

fn config() -> NodeConfig {
    NodeConfig::default().secret(SECRET)
}

/// Binds `n` loopback listeners and prints their ports; then reads the membership.
fn bind_and_read_members(n: usize) -> Result<(Vec<std::net::TcpListener>, Vec<Member>), String> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let ports: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port().to_string()))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    println!("PORTS {}", ports.join(" "));
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let members = line
        .strip_prefix("MEMBERS ")
        .ok_or_else(|| format!("expected MEMBERS, got {line:?}"))?
        .split_whitespace()
        .map(|m| {
            let (a, at) = m.split_once('=').ok_or("member without '='")?;
            let a: LogicAddr = a.parse().map_err(|e| format!("{a}: {e}"))?;
            Ok(Member::new(a, at))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok((listeners, members))
}

/// Echoes `u32`-length frames, answering in batches (a flush once nothing more was read).
async fn raw_echo(s: tokio::net::TcpStream) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.set_nodelay(true)?;
    let (r, w) = s.into_split();
    let mut r = tokio::io::BufReader::with_capacity(16 << 10, r);
    let mut w = tokio::io::BufWriter::with_capacity(16 << 10, w);
    let mut buf = vec![0u8; 64];
    loop {
        let n = r.read_u32().await? as usize;
        buf.resize(n.min(1 << 16), 0);
        r.read_exact(&mut buf).await?;
        w.write_u32(buf.len() as u32).await?;
        w.write_all(&buf).await?;
        if r.buffer().is_empty() {
            w.flush().await?;
        }
    }
}

/// Waits until stdin closes (the parent is done or gone).
async fn until_stdin_closes() {
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    })
    .await;
}

/// Parses a comma-separated list of addresses.
fn addrs(list: &str) -> Result<Vec<LogicAddr>, String> {
    list.split(',')
        .map(|a| a.parse().map_err(|e| format!("{a}: {e}")))
        .collect()
}

/// Serves the nodes `addrs` (an echo server each; a harbor forwards).
async fn host(addrs: Vec<LogicAddr>) -> Result<(), String> {
    let count = addrs.len();
    // The raw baseline's echo server: one listener for all of this process's peers.
    let raw = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "RAW {}",
        raw.local_addr().map_err(|e| e.to_string())?.port()
    );
    tokio::spawn(async move {
        while let Ok((s, _)) = raw.accept().await {
            tokio::spawn(raw_echo(s));
        }
    });
    let (listeners, members) = bind_and_read_members(count)?;
    let discovery = MemoryDiscovery::new(members);
    let mut nodes = Vec::with_capacity(count);
    for (me, l) in addrs.into_iter().zip(listeners) {
        let node = Node::builder(me)
            .discovery(discovery.clone())
            .listener(l)
            .config(config())
            .rpc("echo", |_, p| async move { Ok::<_, HandlerError>(p) })
            .build();
        node.start().await.map_err(|e| format!("{me}: {e}"))?;
        nodes.push(node);
    }
    println!("READY");
    until_stdin_closes().await;
    Ok(())
}

/// The hub `me`: it calls every listed node but itself and the harbors.
async fn hub(me: LogicAddr, peers: usize, measure: Duration, idle: Duration) -> Result<(), String> {
    let (mut listeners, members) = bind_and_read_members(1)?;
    let targets: Arc<Vec<LogicAddr>> = Arc::new(
        members
            .iter()
            .map(|m| m.addr)
            .filter(|a| *a != me && !a.is_harbor())
            .collect(),
    );
    if targets.len() != peers {
        return Err(format!(
            "hub: {} peers listed, {peers} expected",
            targets.len()
        ));
    }
    let node = Node::builder(me)
        .discovery(MemoryDiscovery::new(members))
        .listener(listeners.remove(0))
        .config(config())
        .build();
    node.start().await.map_err(|e| e.to_string())?;
    println!("READY");
    let mut steps = BufReader::new(std::io::stdin()).lines();
    let mut step = || steps.next().and_then(Result::ok).unwrap_or_default();

    // Link to every peer: one call each, `LINKING` at a time.
    if step() != "LINK" {
        return Err("hub: expected LINK".into());
    }
    let before = rss_bytes(std::process::id())?;
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks: Vec<tokio::task::JoinHandle<Result<(), String>>> = Vec::new();
    for _ in 0..LINKING.min(peers) {
        let (node, targets, next) = (node.clone(), targets.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(to) = targets.get(i) else {
                    return Ok(());
                };
                node.call(*to, "echo", Bytes::from_static(&[0u8; 64]))
                    .await
                    .map_err(|e| format!("linking {to}: {e}"))?;
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let link_ms = started.elapsed().as_secs_f64() * 1e3;
    let after = rss_bytes(std::process::id())?;
    println!("LINKED {link_ms:.1} {before} {after}");

    // Idle: nothing but what the links and the node do by themselves.
    if step() != "IDLE" {
        return Err("hub: expected IDLE".into());
    }
    let cpu = cpu_nanos(std::process::id())?;
    tokio::time::sleep(idle).await;
    let spent = cpu_nanos(std::process::id())?.saturating_sub(cpu);
    println!("IDLED {spent}");

    // `rpc-c128`, spread over every peer (`RPC`) or over the first k (`RPC k`), as often as
    // the parent asks.
    let mut line = step();
    while let Some(rest) = line.strip_prefix("RPC") {
        let k = rest
            .trim()
            .parse()
            .unwrap_or(targets.len())
            .clamp(1, targets.len());
        let (calls, elapsed, p50, p99) = {
            let (node, targets) = (node.clone(), targets.clone());
            spread(measure, move |i| {
                let (node, targets) = (node.clone(), targets.clone());
                async move {
                    let to = targets[i % k];
                    node.call(to, "echo", Bytes::from_static(&[0x5a; 64]))
                        .await
                        .map(drop)
                        .map_err(|e| format!("calling {to}: {e}"))
                }
            })
            .await?
        };
        println!("CALLED {calls} {elapsed:.3} {p50:.1} {p99:.1}");
        line = step();
    }

    // The raw baseline: the same callers over plain TCP, one connection per peer (to the
    // raw echo server of the process that hosts it).
    let ports: Vec<u16> = line
        .strip_prefix("RAW ")
        .ok_or("hub: expected RAW")?
        .split_whitespace()
        .map(|p| p.parse().map_err(|e| format!("{e}")))
        .collect::<Result<_, String>>()?;
    let (calls, elapsed, p50, p99) = raw_spread(&ports, measure).await?;
    println!("RAWCALLED {calls} {elapsed:.3} {p50:.1} {p99:.1}");
    until_stdin_closes().await;
    node.shutdown().await;
    Ok(())
}

/// A pipelined connection of the raw baseline: requests written in order under the lock,
/// answers matched to them in order by its reader.
struct RawConn {
    writer: tokio::sync::Mutex<(
        tokio::net::tcp::OwnedWriteHalf,
        tokio::sync::mpsc::UnboundedSender<tokio::sync::oneshot::Sender<()>>,
    )>,
}

impl RawConn {
    async fn open(port: u16) -> Result<Arc<RawConn>, String> {
        use tokio::io::AsyncReadExt;
        let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("raw connect: {e}"))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        let (r, w) = s.into_split();
        // Unbounded, but never more than the callers (128) at once: each waits for its answer.
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<tokio::sync::oneshot::Sender<()>>();
        tokio::spawn(async move {
            let mut r = tokio::io::BufReader::with_capacity(16 << 10, r);
            let mut buf = vec![0u8; 64];
            while let Some(done) = rx.recv().await {
                let Ok(n) = r.read_u32().await else { return };
                buf.resize(n as usize, 0);
                if r.read_exact(&mut buf).await.is_err() {
                    return;
                }
                let _ = done.send(());
            }
        });
        Ok(Arc::new(RawConn {
            writer: tokio::sync::Mutex::new((w, tx)),
        }))
    }

    async fn call(&self) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        let (done, answered) = tokio::sync::oneshot::channel();
        {
            let mut g = self.writer.lock().await;
            g.1.send(done).map_err(|_| "raw reader gone")?;
            let mut frame = [0x5au8; 68];
            frame[..4].copy_from_slice(&64u32.to_be_bytes());
            g.0.write_all(&frame).await.map_err(|e| e.to_string())?;
        }
        answered.await.map_err(|_| "raw connection ended".into())
    }
}

/// 128 callers spread over one raw connection per port in `ports`: (calls, seconds, p50 µs,
/// p99 µs).
async fn raw_spread(ports: &[u16], measure: Duration) -> Result<(usize, f64, f64, f64), String> {
    let mut conns = Vec::with_capacity(ports.len());
    for p in ports {
        conns.push(RawConn::open(*p).await?);
    }
    let conns = Arc::new(conns);
    spread(measure, move |i| {
        let conns = conns.clone();
        async move { conns[i % conns.len()].call().await }
    })
    .await
}

/// [`CALLERS`] callers for `measure`, caller `c` making its `k`-th call as `call(c + k ×
/// CALLERS)` (so together they go round the peers): (calls, seconds, p50 µs, p99 µs).
async fn spread<F, Fut>(measure: Duration, call: F) -> Result<(usize, f64, f64, f64), String>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for c in 0..CALLERS {
        let (call, stop) = (call.clone(), stop.clone());
        callers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                call(i).await?;
                lat.push(t.elapsed().as_nanos() as u64);
                i += CALLERS;
            }
            Ok::<_, String>(lat)
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(measure).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for c in callers {
        lat.extend(c.await.map_err(|e| e.to_string())??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pick = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |n| *n as f64 / 1e3)
    };
    Ok((lat.len(), elapsed, pick(0.5), pick(0.99)))
}

/// A child process and its lines.
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: std::io::Lines<BufReader<ChildStdout>>,
}

impl Proc {
    fn spawn(args: &[String]) -> Result<Proc, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawning {args:?}: {e}"))?;
        let stdin = child.stdin.take();
        let lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
        Ok(Proc {
            child,
            stdin,
            lines,
        })
    }

    /// The next line that starts with `tag`, without it (other lines are passed on).
    fn expect(&mut self, tag: &str) -> Result<String, String> {
        for line in self.lines.by_ref() {
            let line = line.map_err(|e| e.to_string())?;
            if let Some(rest) = line.strip_prefix(tag) {
                return Ok(rest.trim().to_owned());
            }
            println!("  {line}");
        }
        Err(format!("the process ended before it said {tag}"))
    }

    fn say(&mut self, line: &str) -> Result<(), String> {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        writeln!(stdin, "{line}").map_err(|e| e.to_string())
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Closing stdin ends it; a process that does not end within 10 s is killed.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_bytes(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("reading /proc/{pid}/status: {e}"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or("no VmRSS")?;
    Ok(kb * 1024)
}

/// CPU time of every thread of `pid` so far, in nanoseconds (`/proc/<pid>/task/*/schedstat`).
fn cpu_nanos(pid: u32) -> Result<u64, String> {
    let dir = format!("/proc/{pid}/task");
    let mut total = 0;
    for t in std::fs::read_dir(&dir).map_err(|e| format!("reading {dir}: {e}"))? {
        let path = t.map_err(|e| e.to_string())?.path().join("schedstat");
        // A thread that ended meanwhile is gone from the list.
        if let Ok(text) = std::fs::read_to_string(&path) {
            total += text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(total)
}

/// One N: the processes, the steps, the figures.
fn links_at(n: usize, opts: &Opts) -> Result<LinksRow, String> {
    let per_host = n.div_ceil(HOSTS);
    let mut hosts = Vec::new();
    let mut members = Vec::new();
    let mut raw_ports = Vec::new();
    let mut first = 1;
    while first <= n {
        let count = per_host.min(n + 1 - first);
        let list: Vec<String> = (first..first + count).map(|i| format!("1.1.{i}")).collect();
        let mut p = Proc::spawn(&["host".into(), list.join(",")])?;
        let raw = p.expect("RAW")?;
        raw_ports.extend(std::iter::repeat_n(raw, count));
        let ports = p.expect("PORTS")?;
        for (i, port) in ports.split_whitespace().enumerate() {
            members.push(format!("1.1.{}=127.0.0.1:{port}", first + i));
        }
        hosts.push(p);
        first += count;
    }
    let mut hub = Proc::spawn(&[
        "hub".into(),
        "1.2.1".into(),
        n.to_string(),
        opts.measure.as_secs_f64().to_string(),
        opts.idle.as_secs_f64().to_string(),
    ])?;
    let port = hub.expect("PORTS")?;
    members.push(format!("1.2.1=127.0.0.1:{port}"));
    let line = format!("MEMBERS {}", members.join(" "));
    for p in hosts.iter_mut().chain(std::iter::once(&mut hub)) {
        p.say(&line)?;
    }
    for p in hosts.iter_mut().chain(std::iter::once(&mut hub)) {
        p.expect("READY")?;
    }
    let hosts_rss =
        |hosts: &[Proc]| -> Result<u64, String> { hosts.iter().map(|p| rss_bytes(p.pid())).sum() };
    let hosts_before = hosts_rss(&hosts)?;
    hub.say("LINK")?;
    let linked = hub.expect("LINKED")?;
    let hosts_after = hosts_rss(&hosts)?;
    let f: Vec<f64> = linked
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    let (link_ms, hub_before, hub_after) = (f[0], f[1], f[2]);

    let hosts_cpu =
        |hosts: &[Proc]| -> Result<u64, String> { hosts.iter().map(|p| cpu_nanos(p.pid())).sum() };
    let cpu_before = hosts_cpu(&hosts)?;
    let idle_started = Instant::now();
    hub.say("IDLE")?;
    let hub_nanos: f64 = hub.expect("IDLED")?.parse().unwrap_or(0.0);
    let idle_secs = idle_started.elapsed().as_secs_f64();
    let hosts_nanos = hosts_cpu(&hosts)?.saturating_sub(cpu_before) as f64;

    hub.say("RPC")?;
    let called = hub.expect("CALLED")?;
    let c: Vec<f64> = called
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    hub.say(&format!("RAW {}", raw_ports.join(" ")))?;
    let raw: Vec<f64> = hub
        .expect("RAWCALLED")?
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    Ok(LinksRow {
        peers: n,
        link_ms,
        hub_bytes_per_link: (hub_after - hub_before) / n as f64,
        peer_bytes_per_link: (hosts_after as f64 - hosts_before as f64) / n as f64,
        hub_idle_cpu_ms_per_s: hub_nanos / 1e6 / opts.idle.as_secs_f64(),
        hosts_idle_cpu_ms_per_s: hosts_nanos / 1e6 / idle_secs,
        calls_per_sec: c[0] / c[1].max(1e-9),
        p50_us: c[2],
        p99_us: c[3],
        raw_calls_per_sec: raw[0] / raw[1].max(1e-9),
        raw_p50_us: raw[2],
    })
}

fn links(opts: &Opts) -> Result<Vec<LinksRow>, String> {
    let limit = raise_open_files();
    println!("scale links: open-file limit {limit} in each process (raised to the hard limit)");
    println!(
        "{:>6} | {:>9} | {:>12} | {:>12} | {:>11} | {:>13} | {:>10} | {:>8} | {:>8} | {:>10} | {:>6}",
        "peers",
        "link ms",
        "hub B/link",
        "peer B/link",
        "hub idle",
        "hosts idle",
        "calls/s",
        "p50 µs",
        "p99 µs",
        "raw/s",
        "÷ raw"
    );
    println!("{}", "-".repeat(132));
    let mut rows = Vec::new();
    for &n in &opts.sizes {
        // Each link is a socket on each side, and the hosts hold a listener per node.
        if (n as u64 + 64) > limit {
            return Err(format!(
                "{n} peers need more open files than the limit of {limit} allows"
            ));
        }
        let r = links_at(n, opts)?;
        println!(
            "{:>6} | {:>9.1} | {:>12.0} | {:>12.0} | {:>6.2} ms/s | {:>8.2} ms/s | {:>10.0} | {:>8.1} | {:>8.1} | {:>10.0} | {:>6.2}",
            r.peers,
            r.link_ms,
            r.hub_bytes_per_link,
            r.peer_bytes_per_link,
            r.hub_idle_cpu_ms_per_s,
            r.hosts_idle_cpu_ms_per_s,
            r.calls_per_sec,
            r.p50_us,
            r.p99_us,
            r.raw_calls_per_sec,
            r.calls_per_sec / r.raw_calls_per_sec.max(1e-9)
        );
        rows.push(r);
    }
    // A smoke run's figures do not replace a real run's.
    let prefix = if opts.smoke { "links-smoke" } else { "links" };
    write_csv(&rows, &format!("{prefix}.csv"))?;
    draw_links(&rows, prefix)?;
    Ok(rows)
}

/// The curves of `links`, as PNG files beside the CSV: cost per unit against N, N on a
/// logarithmic scale (a flat curve is a cost that grows linearly; a rising one grows faster).
fn draw_links(rows: &[LinksRow], prefix: &str) -> Result<(), String> {
    let n = |r: &LinksRow| r.peers as f64;
    let series = |name: &'static str, f: &dyn Fn(&LinksRow) -> f64| plot::Series {
        name,
        points: rows.iter().map(|r| (n(r), f(r))).collect(),
    };
    let charts: [(&str, plot::Chart<'_>, Vec<plot::Series<'_>>); 4] = [
        (
            "memory",
            plot::Chart {
                title: "Resident memory per idle link",
                x_label: "links (peers of the hub)",
                y_label: "KB per link",
                log_x: true,
            },
            vec![
                series("hub side", &|r| r.hub_bytes_per_link / 1e3),
                series("peer side", &|r| r.peer_bytes_per_link / 1e3),
            ],
        ),
        (
            "link-time",
            plot::Chart {
                title: "Time to link, per link",
                x_label: "links",
                y_label: "ms per link",
                log_x: true,
            },
            vec![series("hub", &|r| r.link_ms / n(r))],
        ),
        (
            "idle-cpu",
            plot::Chart {
                title: "CPU at idle, per link (hub) and per node (hosts)",
                x_label: "links",
                y_label: "us of CPU per second",
                log_x: true,
            },
            vec![
                series("hub, per link", &|r| r.hub_idle_cpu_ms_per_s * 1e3 / n(r)),
                series("hosts, per node", &|r| {
                    r.hosts_idle_cpu_ms_per_s * 1e3 / n(r)
                }),
            ],
        ),
        (
            "calls",
            plot::Chart {
                title: "rpc-c128 spread over all links",
                x_label: "links",
                y_label: "thousand calls per second",
                log_x: true,
            },
            vec![
                series("clustergo", &|r| r.calls_per_sec / 1e3),
                series("raw TCP", &|r| r.raw_calls_per_sec / 1e3),
            ],
        ),
    ];
    for (name, chart, series) in charts {
        draw_file(&format!("{prefix}-{name}.png"), &chart, &series)?;
    }
    Ok(())
}

/// Where the figures go: `target/scale`.
fn out_dir() -> Result<std::path::PathBuf, String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/scale");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Writes `target/scale/<name>`.
fn write_file(name: &str, bytes: &[u8]) -> Result<(), String> {
    let path = out_dir()?.join(name);
    std::fs::write(&path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Draws one chart as `target/scale/<name>`.
fn draw_file(
    name: &str,
    chart: &plot::Chart<'_>,
    series: &[plot::Series<'_>],
) -> Result<(), String> {
    let path = out_dir()?.join(name);
    plot::draw(&path, chart, series).map_err(|e| format!("writing {}: {e}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

fn write_csv(rows: &[LinksRow], name: &str) -> Result<(), String> {
    let mut out = String::from(
        "peers,link_ms,hub_bytes_per_link,peer_bytes_per_link,hub_idle_cpu_ms_per_s,hosts_idle_cpu_ms_per_s,calls_per_sec,p50_us,p99_us,raw_calls_per_sec,raw_p50_us\n",
    );
    for r in rows {
        out.push_str(&format!(
            "{},{:.1},{:.0},{:.0},{:.3},{:.3},{:.0},{:.1},{:.1},{:.0},{:.1}\n",
            r.peers,
            r.link_ms,
            r.hub_bytes_per_link,
            r.peer_bytes_per_link,
            r.hub_idle_cpu_ms_per_s,
            r.hosts_idle_cpu_ms_per_s,
            r.calls_per_sec,
            r.p50_us,
            r.p99_us,
            r.raw_calls_per_sec,
            r.raw_p50_us
        ));
    }
    write_file(name, out.as_bytes())
}

#[allow(dead_code)]
fn main() {
    match entry(std::env::args().collect()) {
        Ok(_) => {}
        Err(e) => {
            eprintln!("scale: {e}");
            std::process::exit(1);
        }
    }
}
