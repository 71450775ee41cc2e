//! Gateway benchmark: clients in this process, the `gateway` binary, and a game server (this
//! binary re-executed as `game-server`) that echoes every frame, all on loopback.
//!
//! Modes:
//! - `gateway-echo`: for each transport (TCP, WebSocket, KCP), 1 and then 100 clients, each
//!   echoing one 64-byte frame at a time through the gateway and the game server; frames/s
//!   and round-trip p50/p99. Each run twice in turn: plain clients (no session: version 1)
//!   and session clients (`SessionClient`: sequence numbers, acknowledgements, replay
//!   buffers), against the same game server (which serves sessions), so the cost of
//!   resumable sessions reads as a ratio in the same run.
//! - `gateway-session`: resume time (a session's connection dropped, from the drop until the
//!   frame sent meanwhile comes back, which needs the resume and the replay) for `--clients`
//!   sessions at once, p50/p99; and the game server's resident memory per session, attached
//!   and detached, for 1,000 sessions (`--smoke`: 50).
//! - `gateway-relay`: the gateway against a raw baseline in the same run. For TCP and
//!   WebSocket, 1, 100 and 1,000 clients (`--smoke`: 1 and 10) echo 64-byte frames (plain
//!   clients) through the gateway to the game server, and in turn through a plain tokio TCP
//!   relay (`copy_bidirectional`, a process of its own) to a plain echo server (a process of
//!   its own: bytes back on TCP, messages back on WebSocket); the ratio is gateway ÷ relay
//!   (median of `--rounds`).
//! - `gateway-idle`: 1,000, 10,000 and 50,000 TCP clients (`--idle`), each on a gateway and
//!   game server of its own, that each send one frame, read its echo and then stay quiet; the
//!   gateway's (and the game server's) resident memory before and after, per client. The
//!   clients connect from several loopback addresses (one has about 28,000 ephemeral ports
//!   toward one listener); the open-file limit is raised to 200,000 where allowed (as root),
//!   else to the hard limit.
//!
//! Flags: `--mode <name>` (one mode), `--secs <f64>` (measured seconds per run, default 3),
//! `--clients <n>` (the larger echo run, default 100), `--idle <n,...>` (idle client counts, default
//! 1,000,10,000,50,000), `--only <prefix>` (only the `gateway-echo` rows whose names start with it, e.g.
//! `tcp-c100-session`, to profile one), `--rounds <n>` (each `gateway-echo` pair measured `n`
//! times, plain and session in turn; the rows are the medians and the ratio is the median of
//! the rounds' ratios: steadier on a noisy machine), `--smoke` (0.2 s runs, 200 idle clients). Unknown arguments (cargo's `--bench`)
//! are ignored. Membership is a members file: no etcd needed.
//!
//! The `gateway-relay` and `gateway-idle` figures are also written as CSV and drawn as PNG
//! curves (the scale bench's drawer) in `target/scale/gateway-*` (`gateway-smoke-*` for a
//! smoke run).

use std::io::{BufRead, BufReader};

// The scale bench's PNG drawer (only `draw` is used here).
#[path = "../../benches/scale/plot.rs"]
mod plot;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use clustergo::session::SessionConfig;
use clustergo::{FileDiscovery, LogicAddr, Node, NodeConfig};
use clustergo_client::{
    Client, ClientConfig, SessionClient, SessionClientConfig, SessionEvent, wire,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "clustergo-gateway-bench";
/// Every mode, in run order.
pub(crate) const MODES: [&str; 4] = [
    "gateway-echo",
    "gateway-session",
    "gateway-idle",
    "gateway-relay",
];

#[derive(Debug, Clone)]
pub(crate) struct Opts {
    mode: Option<String>,
    measure: Duration,
    clients: usize,
    idle: Vec<usize>,
    /// This process's open-file limit (see `raise_open_files`).
    open_files: u64,
    /// Only the `gateway-echo` rows whose names start with this (for profiling one row).
    only: Option<String>,
    /// Plain and session runs of each `gateway-echo` pair, in turn.
    rounds: usize,
    smoke: bool,
}

/// One measured run.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) name: String,
    pub(crate) frames: u64,
    pub(crate) per_sec: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
}

/// What `gateway-idle` found.
#[derive(Debug, Clone)]
pub(crate) struct Idle {
    pub(crate) clients: usize,
    pub(crate) gateway_bytes_per_client: f64,
    pub(crate) server_bytes_per_client: f64,
    /// The gateway's, once every client has also sent (and got back) one 60 KB frame.
    pub(crate) gateway_after_large: f64,
    /// The gateway's after a second such round.
    pub(crate) gateway_after_large2: f64,
}

/// What `gateway-session` found.
#[derive(Debug, Clone)]
pub(crate) struct Sessions {
    pub(crate) resumed: usize,
    pub(crate) resume_p50_ms: f64,
    pub(crate) resume_p99_ms: f64,
    pub(crate) sessions: usize,
    pub(crate) attached_bytes_per_session: f64,
    pub(crate) detached_bytes_per_session: f64,
}

#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) rows: Vec<Row>,
    pub(crate) idle: Vec<Idle>,
    pub(crate) sessions: Option<Sessions>,
    /// `gateway-relay`: (through the gateway, through the raw relay, median ratio).
    pub(crate) relay: Vec<(Row, Row, f64)>,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        mode: None,
        measure: Duration::from_secs(3),
        clients: 100,
        idle: vec![1_000, 10_000, 50_000],
        open_files: 0,
        only: None,
        rounds: 1,
        smoke: false,
    };
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--mode" => {
                let m = value("--mode")?;
                if !MODES.contains(&m.as_str()) {
                    return Err(format!("unknown mode {m:?}; modes: {}", MODES.join(", ")));
                }
                o.mode = Some(m);
            }
            "--secs" => {
                o.measure = Duration::from_secs_f64(
                    value("--secs")?
                        .parse()
                        .map_err(|e| format!("--secs: {e}"))?,
                )
            }
            "--clients" => {
                o.clients = value("--clients")?
                    .parse()
                    .map_err(|e| format!("--clients: {e}"))?
            }
            "--idle" => {
                o.idle = value("--idle")?
                    .split(',')
                    .map(|k| k.trim().parse().map_err(|e| format!("--idle: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--only" => o.only = Some(value("--only")?),
            "--rounds" => {
                o.rounds = value("--rounds")?
                    .parse::<usize>()
                    .map_err(|e| format!("--rounds: {e}"))?
                    .max(1)
            }
            "--smoke" => {
                o.measure = Duration::from_millis(200);
                o.idle = vec![200];
                o.clients = 10;
                o.smoke = true;
            }
            _ => {}
        }
    }
    Ok(o)
}

/// Runs the benchmark (or, as `game-server <members> <addr>`, the game server).
pub(crate) fn entry(args: Vec<String>) -> Result<Report, String> {
    if args
        .get(1)
        .is_some_and(|a| a == "raw-echo" || a == "raw-relay")
    {
        let role = args[1].clone();
        let arg = args.get(2).cloned().unwrap_or_default();
        let rt = if role == "raw-relay" {
            // As the gateway's: a worker per core.
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
        } else {
            // As the game server's.
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        }
        .map_err(|e| e.to_string())?;
        rt.block_on(raw_role(&role, &arg))?;
        return Ok(Report::default());
    }
    if args.get(1).is_some_and(|a| a == "game-server") {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(game_server(&args[2], &args[3]))?;
        return Ok(Report::default());
    }
    let mut opts = parse(&args)?;
    opts.open_files = raise_open_files();
    println!(
        "open-file limit: {} (this process and the gateway, game server and relays it starts)",
        opts.open_files
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(run(opts))
}

/// The game server: echoes every frame of every stream.
async fn game_server(members: &str, addr: &str) -> Result<(), String> {
    let me: LogicAddr = addr.parse().map_err(|e| format!("{e}"))?;
    let node = Node::builder(me)
        .discovery(FileDiscovery::open(members).map_err(|e| e.to_string())?)
        .config(NodeConfig::default().secret(SECRET).max_streams(60_000))
        .on_session(SessionConfig::default(), |mut session| async move {
            while let Ok(Some(f)) = session.recv().await {
                if session.send(f).await.is_err() {
                    return;
                }
            }
        })
        .build();
    node.start().await.map_err(|e| e.to_string())?;
    println!("READY");
    // Stop when the benchmark (our parent) closes our stdin.
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    while matches!(stdin.read(&mut sink).await, Ok(n) if n > 0) {}
    node.shutdown().await;
    Ok(())
}

/// The run with the median frames/s.
fn median_row(mut rows: Vec<Row>) -> Row {
    rows.sort_by(|a, b| a.per_sec.total_cmp(&b.per_sec));
    let mid = rows.len() / 2;
    rows.swap_remove(mid)
}

/// A raw baseline process: `raw-echo tcp|ws` (an echo server) or `raw-relay <host:port>` (a
/// relay to it). Prints `READY <port>`; ends when its stdin closes.
async fn raw_role(role: &str, arg: &str) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "READY {}",
        listener.local_addr().map_err(|e| e.to_string())?.port()
    );
    let (role, arg) = (role.to_owned(), arg.to_owned());
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            let arg = arg.clone();
            match role.as_str() {
                "raw-relay" => tokio::spawn(async move {
                    let Ok(mut up) = tokio::net::TcpStream::connect(&arg).await else {
                        return;
                    };
                    let _ = up.set_nodelay(true);
                    let mut s = s;
                    let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
                }),
                _ if arg == "ws" => tokio::spawn(async move {
                    use futures_util::{SinkExt, StreamExt};
                    let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                        return;
                    };
                    while let Some(Ok(m)) = ws.next().await {
                        if m.is_binary() && ws.send(m).await.is_err() {
                            return;
                        }
                    }
                }),
                _ => tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }),
            };
        }
    });
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    while matches!(stdin.read(&mut sink).await, Ok(n) if n > 0) {}
    Ok(())
}

/// This binary again, in one of its parts (`args`), and the first line it printed.
fn spawn_self(args: &[&str]) -> Result<(Proc, String), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting {args:?}: {e}"))?;
    let out = child.stdout.take();
    // Killed when dropped, also if its first line cannot be read.
    let child = Proc(child);
    let mut line = String::new();
    BufReader::new(out.ok_or("no stdout")?)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    Ok((child, line))
}

/// Starts a raw baseline process; its port.
fn raw_process(args: &[&str]) -> Result<(Proc, u16), String> {
    let (child, line) = spawn_self(args)?;
    let port = line
        .strip_prefix("READY ")
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| format!("{args:?}: {line:?}"))?;
    Ok((child, port))
}

/// `gateway-relay`: the gateway against the raw relay, per transport and client count.
async fn relay(setup: &Setup, opts: &Opts) -> Result<Vec<(Row, Row, f64)>, String> {
    let counts: &[usize] = if opts.clients < 100 {
        &[1, 10]
    } else {
        &[1, 100, 1000]
    };
    println!(
        "{:<22} | {:>12} | {:>9} | {:>9} | {:>10} | {:>7}",
        "gateway-relay", "frames/s", "p50 µs", "p99 µs", "round trips", "÷ relay"
    );
    println!("{}", "-".repeat(85));
    let mut out = Vec::new();
    for (name, gw_url, kind, path) in [
        ("tcp", &setup.tcp, "tcp", ""),
        ("ws", &setup.ws, "ws", "/ws"),
    ] {
        let (_echo, echo_port) = raw_process(&["raw-echo", kind])?;
        let upstream = format!("127.0.0.1:{echo_port}");
        let (_relay, relay_port) = raw_process(&["raw-relay", &upstream])?;
        let relay_url = format!("{kind}://127.0.0.1:{relay_port}{path}");
        for &n in counts {
            let (mut gws, mut raws, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..opts.rounds {
                let gw = echo(&format!("{name}-c{n}"), gw_url, n, opts.measure, false).await?;
                let raw = echo(
                    &format!("{name}-c{n}-relay"),
                    &relay_url,
                    n,
                    opts.measure,
                    false,
                )
                .await?;
                ratios.push(gw.per_sec / raw.per_sec);
                gws.push(gw);
                raws.push(raw);
            }
            let (gw, raw) = (median_row(gws), median_row(raws));
            ratios.sort_by(f64::total_cmp);
            let ratio = ratios[ratios.len() / 2];
            for (row, r) in [(&gw, Some(ratio)), (&raw, None)] {
                println!(
                    "{:<22} | {:>12.0} | {:>9.1} | {:>9.1} | {:>10} | {:>7}",
                    row.name,
                    row.per_sec,
                    row.p50_us,
                    row.p99_us,
                    row.frames,
                    r.map(|r| format!("{r:.2}")).unwrap_or_default()
                );
            }
            out.push((gw, raw, ratio));
        }
    }
    Ok(out)
}

/// A child killed (by its handle) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
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

#[path = "../../tests/support/ports.rs"]
mod ports;

fn free_port() -> Result<u16, String> {
    Ok(ports::free_port())
}

struct Setup {
    server: Proc,
    gateway: Proc,
    tcp: String,
    ws: String,
    kcp: String,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn setup() -> Result<Setup, String> {
    let dir = TempDir(std::env::temp_dir().join(format!("cg-gw-bench-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).map_err(|e| e.to_string())?;
    let members = dir.0.join("members.toml");
    std::fs::write(
        &members,
        format!(
            "[[member]]\naddr = \"1.100.1\"\nnet_addr = \"127.0.0.1:{}\"\n\n\
             [[member]]\naddr = \"1.1.1\"\nnet_addr = \"127.0.0.1:{}\"\n",
            free_port()?,
            free_port()?
        ),
    )
    .map_err(|e| e.to_string())?;
    let members_arg = members.display().to_string();
    let (server, line) = spawn_self(&["game-server", &members_arg, "1.1.1"])?;
    if !line.starts_with("READY") {
        return Err(format!("game server: {line:?}"));
    }
    let config = dir.0.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "addr = \"1.100.1\"\nbackend_type = 1\nmembers_file = \"{}\"\n\
             [tcp]\nlisten = \"127.0.0.1:0\"\n[websocket]\nlisten = \"127.0.0.1:0\"\npath = \"/ws\"\n\
             [kcp]\nlisten = \"127.0.0.1:0\"\n\
             [limits]\nmax_clients = 60000\nmax_handshakes_per_source = 1000000\nmax_clients_per_source = 1000000\nframes_per_sec = 1000000\nbytes_per_sec = 1073741824\n\
             idle_timeout_ms = 600000\nhandshake_timeout_ms = 60000\n",
            members.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let mut gateway = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("--config")
        .arg(&config)
        .env("CLUSTERGO_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting the gateway: {e}"))?;
    let mut first = String::new();
    BufReader::new(gateway.stdout.take().ok_or("no stdout")?)
        .read_line(&mut first)
        .map_err(|e| e.to_string())?;
    let field = |name: &str| -> Result<String, String> {
        let rest = first
            .split(&format!("{name} on "))
            .nth(1)
            .ok_or(format!("no {name} in {first:?}"))?;
        Ok(rest.split(',').next().unwrap_or_default().trim().to_owned())
    };
    Ok(Setup {
        tcp: format!("tcp://{}", field("tcp")?),
        ws: format!("ws://{}", field("websocket")?),
        kcp: format!("kcp://{}", field("kcp")?),
        server,
        gateway: Proc(gateway),
        _dir: dir,
    })
}

/// Raises the open-file limit (inherited by the processes this one starts): to 200,000 where
/// allowed (root may raise the hard limit too), else to the hard limit. The limit now.
fn raise_open_files() -> u64 {
    const WANT: u64 = 200_000;
    if rlimit::setrlimit(rlimit::Resource::NOFILE, WANT, WANT).is_ok() {
        return WANT;
    }
    rlimit::increase_nofile_limit(WANT).unwrap_or(0)
}

/// A gateway and a game server, once a frame goes through (the gateway reads its members
/// file at start).
async fn ready_setup() -> Result<Setup, String> {
    let setup = setup()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match probe(&setup.tcp).await {
            Ok(()) => return Ok(setup),
            Err(e) if Instant::now() > deadline => return Err(format!("gateway not ready: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn run(opts: Opts) -> Result<Report, String> {
    let setup = ready_setup().await?;
    let mut report = Report::default();
    let wants = |m: &str| opts.mode.as_deref().is_none_or(|x| x == m);
    if wants("gateway-echo") {
        println!(
            "{:<22} | {:>12} | {:>9} | {:>9} | {:>10} | {:>7}",
            "gateway-echo", "frames/s", "p50 µs", "p99 µs", "round trips", "÷ plain"
        );
        println!("{}", "-".repeat(85));
        for (name, url) in [("tcp", &setup.tcp), ("ws", &setup.ws), ("kcp", &setup.kcp)] {
            for n in [1, opts.clients] {
                let (plain_name, session_name) =
                    (format!("{name}-c{n}"), format!("{name}-c{n}-session"));
                if let Some(only) = &opts.only {
                    let wanted = |row: &str| row.starts_with(only.as_str());
                    if !wanted(&plain_name) && !wanted(&session_name) {
                        continue;
                    }
                    // One row alone (the other is not measured).
                    let session = only.ends_with("-session");
                    let (row, s) = if session {
                        (&session_name, true)
                    } else {
                        (&plain_name, false)
                    };
                    let r = echo(row, url, n, opts.measure, s).await?;
                    println!(
                        "{:<22} | {:>12.0} | {:>9.1} | {:>9.1} | {:>10} |",
                        r.name, r.per_sec, r.p50_us, r.p99_us, r.frames
                    );
                    continue;
                }
                let (mut plains, mut sessions, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
                for _ in 0..opts.rounds {
                    let plain = echo(&plain_name, url, n, opts.measure, false).await?;
                    let session = echo(&session_name, url, n, opts.measure, true).await?;
                    ratios.push(session.per_sec / plain.per_sec);
                    plains.push(plain);
                    sessions.push(session);
                }
                let (plain, session) = (median_row(plains), median_row(sessions));
                ratios.sort_by(f64::total_cmp);
                let ratio = ratios[ratios.len() / 2];
                for (row, ratio) in [(&plain, None), (&session, Some(ratio))] {
                    println!(
                        "{:<22} | {:>12.0} | {:>9.1} | {:>9.1} | {:>10} | {:>7}",
                        row.name,
                        row.per_sec,
                        row.p50_us,
                        row.p99_us,
                        row.frames,
                        ratio.map(|r| format!("{r:.2}")).unwrap_or_default()
                    );
                }
                report.rows.push(plain);
                report.rows.push(session);
            }
        }
    }
    if wants("gateway-session") {
        // 1,000 sessions for the memory figures (50 in a smoke run).
        let m = if opts.idle.iter().all(|k| *k < 1000) {
            50
        } else {
            1000
        };
        let s = sessions(&setup, &setup.tcp, opts.clients, m).await?;
        println!(
            "gateway-session: {} sessions resumed at once over TCP: drop to first replayed frame p50 {:.1} ms, p99 {:.1} ms; \
             game server memory per session: {:.0} bytes attached, {:.0} bytes detached ({} sessions)",
            s.resumed,
            s.resume_p50_ms,
            s.resume_p99_ms,
            s.attached_bytes_per_session,
            s.detached_bytes_per_session,
            s.sessions
        );
        report.sessions = Some(s);
    }
    if wants("gateway-relay") {
        report.relay = relay(&setup, &opts).await?;
    }
    // Each count on a gateway and game server of its own: memory freed by one run would
    // otherwise be reused by the next and hide its cost.
    drop(setup);
    for &asked in &opts.idle {
        if !wants("gateway-idle") {
            break;
        }
        // A client is a socket here and one in the gateway, besides what each process holds.
        let limit = opts.open_files;
        let k = asked.min((limit as usize).saturating_sub(1_000));
        if k < asked {
            println!(
                "gateway-idle: {asked} clients need more open files than this machine's limit of {limit} per process allows; measuring {k}"
            );
        }
        let setup = ready_setup().await?;
        let idle = idle(&setup, k).await?;
        println!(
            "gateway-idle: {} idle TCP clients: gateway {:.0} bytes/client ({:.1} KiB), game server {:.0} bytes/client; \
             gateway after one 60 KB echo each: {:.0} bytes/client, after a second: {:.0}",
            idle.clients,
            idle.gateway_bytes_per_client,
            idle.gateway_bytes_per_client / 1024.0,
            idle.server_bytes_per_client,
            idle.gateway_after_large,
            idle.gateway_after_large2
        );
        report.idle.push(idle);
    }
    figures(
        &report,
        if opts.smoke {
            "gateway-smoke"
        } else {
            "gateway"
        },
    )?;
    Ok(report)
}

/// Writes the relay and idle figures as CSV and PNG curves in `target/scale`.
fn figures(report: &Report, prefix: &str) -> Result<(), String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/scale");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let write = |name: String, text: String| -> Result<(), String> {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
        println!("wrote {}", path.display());
        Ok(())
    };
    let draw = |name: String, chart: plot::Chart<'_>, series: Vec<plot::Series<'_>>| {
        let path = dir.join(name);
        plot::draw(&path, &chart, &series)
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        println!("wrote {}", path.display());
        Ok::<_, String>(())
    };
    if !report.relay.is_empty() {
        let mut csv = String::from(
            "run,gateway_frames_per_sec,gateway_p50_us,relay_frames_per_sec,relay_p50_us,ratio\n",
        );
        for (gw, raw, ratio) in &report.relay {
            csv.push_str(&format!(
                "{},{:.0},{:.1},{:.0},{:.1},{:.3}\n",
                gw.name, gw.per_sec, gw.p50_us, raw.per_sec, raw.p50_us, ratio
            ));
        }
        write(format!("{prefix}-relay.csv"), csv)?;
        // Runs are named `<transport>-c<clients>`.
        let points = |transport: &str, f: &dyn Fn(&(Row, Row, f64)) -> f64| -> Vec<(f64, f64)> {
            report
                .relay
                .iter()
                .filter_map(|r| {
                    let n = r.0.name.strip_prefix(transport)?.strip_prefix("-c")?;
                    Some((n.parse().ok()?, f(r)))
                })
                .collect()
        };
        let series = |name, transport, f: &dyn Fn(&(Row, Row, f64)) -> f64| plot::Series {
            name,
            points: points(transport, f),
        };
        draw(
            format!("{prefix}-relay.png"),
            plot::Chart {
                title: "gateway-echo against a raw TCP relay",
                x_label: "clients",
                y_label: "thousand frames per second",
                log_x: true,
            },
            vec![
                series("gateway, TCP", "tcp", &|r| r.0.per_sec / 1e3),
                series("relay, TCP", "tcp", &|r| r.1.per_sec / 1e3),
                series("gateway, WebSocket", "ws", &|r| r.0.per_sec / 1e3),
                series("relay, WebSocket", "ws", &|r| r.1.per_sec / 1e3),
            ],
        )?;
    }
    if !report.idle.is_empty() {
        let mut csv = String::from("clients,gateway_bytes_per_client,server_bytes_per_client\n");
        for i in &report.idle {
            csv.push_str(&format!(
                "{},{:.0},{:.0}\n",
                i.clients, i.gateway_bytes_per_client, i.server_bytes_per_client
            ));
        }
        write(format!("{prefix}-idle.csv"), csv)?;
        let series = |name, f: &dyn Fn(&Idle) -> f64| plot::Series {
            name,
            points: report
                .idle
                .iter()
                .map(|i| (i.clients as f64, f(i)))
                .collect(),
        };
        draw(
            format!("{prefix}-idle.png"),
            plot::Chart {
                title: "Memory per idle TCP client",
                x_label: "clients",
                y_label: "KB per client",
                log_x: true,
            },
            vec![
                series("gateway", &|i| i.gateway_bytes_per_client / 1e3),
                series("game server", &|i| i.server_bytes_per_client / 1e3),
            ],
        )?;
    }
    Ok(())
}

async fn probe(url: &str) -> Result<(), String> {
    let mut c = Client::connect(url).await.map_err(|e| e.to_string())?;
    c.send("probe").await.map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(2), c.recv())
        .await
        .map_err(|_| "no echo".to_owned())?
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// A plain client or a session client, echoing.
enum EchoClient {
    Plain(Box<Client>),
    Session(Box<SessionClient>),
}

impl EchoClient {
    async fn send(&mut self, b: Bytes) -> Result<(), String> {
        match self {
            EchoClient::Plain(c) => c.send(b).await.map_err(|e| e.to_string()),
            EchoClient::Session(s) => s.send(b).await.map_err(|e| e.to_string()),
        }
    }

    async fn recv(&mut self) -> Result<Bytes, String> {
        match self {
            EchoClient::Plain(c) => c.recv().await.map_err(|e| e.to_string()),
            EchoClient::Session(s) => loop {
                match s.recv().await.map_err(|e| e.to_string())? {
                    SessionEvent::Frame(f) => return Ok(f),
                    SessionEvent::Ended { reason, .. } => return Err(reason),
                    _ => {}
                }
            },
        }
    }

    async fn close(self) {
        match self {
            EchoClient::Plain(c) => drop(c.close("done").await),
            EchoClient::Session(s) => drop(s.close().await),
        }
    }
}

/// `n` clients on `url` (session clients with `session`), each echoing 64-byte frames one at
/// a time: warm up for a third of `measure`, then count and time round trips for `measure`.
async fn echo(
    name: &str,
    url: &str,
    n: usize,
    measure: Duration,
    session: bool,
) -> Result<Row, String> {
    let config = ClientConfig::default().idle_timeout(None);
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(if session {
            let c = SessionClientConfig::default().client(config.clone());
            EchoClient::Session(Box::new(
                SessionClient::connect(&[url], b"", c)
                    .await
                    .map_err(|e| format!("{name}: {e}"))?,
            ))
        } else {
            EchoClient::Plain(Box::new(
                Client::connect_with(url, config.clone())
                    .await
                    .map_err(|e| format!("{name}: {e}"))?,
            ))
        });
    }
    let warm_until = Instant::now() + measure / 3;
    let end = warm_until + measure;
    let mut tasks = tokio::task::JoinSet::new();
    for mut c in clients {
        tasks.spawn(async move {
            let payload = Bytes::from_static(&[0x5a; 64]);
            let mut samples: Vec<u32> = Vec::with_capacity(1 << 16);
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                c.send(payload.clone()).await?;
                let echo = tokio::time::timeout(Duration::from_secs(5), c.recv())
                    .await
                    .map_err(|_| "an echo took over 5 s".to_owned())??;
                if echo.len() != 64 {
                    return Err(format!("echo of {} bytes", echo.len()));
                }
                if t >= warm_until {
                    samples.push(t.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32);
                }
            }
            c.close().await;
            Ok::<_, String>(samples)
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r.map_err(|e| e.to_string())??);
    }
    if all.is_empty() {
        return Err(format!("{name}: no round trip measured"));
    }
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    Ok(Row {
        name: name.into(),
        frames: all.len() as u64,
        per_sec: all.len() as f64 / measure.as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    })
}

/// `gateway-session`: `resumers` sessions drop their connections at once and each sends a
/// frame meanwhile: the time until its echo (resume, replay, echo); then `m` sessions, the
/// game server's memory with them attached and detached.
async fn sessions(setup: &Setup, url: &str, resumers: usize, m: usize) -> Result<Sessions, String> {
    let mut tasks = tokio::task::JoinSet::new();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(resumers));
    for _ in 0..resumers {
        let (url, barrier) = (url.to_owned(), barrier.clone());
        tasks.spawn(async move {
            let mut s = SessionClient::connect(&[&url], b"", SessionClientConfig::default())
                .await
                .map_err(|e| e.to_string())?;
            s.send("before").await.map_err(|e| e.to_string())?;
            next_frame(&mut s).await?;
            barrier.wait().await;
            let t = Instant::now();
            s.switch_to(&url);
            s.send("meanwhile").await.map_err(|e| e.to_string())?;
            let f = next_frame(&mut s).await?;
            let took = t.elapsed();
            if f != "meanwhile".as_bytes() {
                return Err(format!("after the resume, got {f:?}"));
            }
            let _ = s.close().await;
            Ok::<_, String>(took)
        });
    }
    let mut took = Vec::new();
    while let Some(r) = tasks.join_next().await {
        took.push(r.map_err(|e| e.to_string())??);
    }
    took.sort_unstable();
    let pct = |p: f64| took[((took.len() - 1) as f64 * p) as usize].as_secs_f64() * 1000.0;
    let pid = setup.server.0.id();
    let before = rss_bytes(pid)?;
    let mut held = Vec::with_capacity(m);
    for _ in 0..m {
        let mut s = SessionClient::connect(&[url], b"", SessionClientConfig::default())
            .await
            .map_err(|e| e.to_string())?;
        s.send("hello").await.map_err(|e| e.to_string())?;
        next_frame(&mut s).await?;
        held.push(s);
    }
    let attached = rss_bytes(pid)?;
    // Dropped without a bye: every session detaches and waits for its client.
    drop(held);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let detached = rss_bytes(pid)?;
    let per = |after: u64| (after.saturating_sub(before)) as f64 / m.max(1) as f64;
    Ok(Sessions {
        resumed: took.len(),
        resume_p50_ms: pct(0.5),
        resume_p99_ms: pct(0.99),
        sessions: m,
        attached_bytes_per_session: per(attached),
        detached_bytes_per_session: per(detached),
    })
}

async fn next_frame(s: &mut SessionClient) -> Result<Bytes, String> {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), s.recv())
            .await
            .map_err(|_| "no frame in 10 s".to_owned())?
            .map_err(|e| e.to_string())?;
        match ev {
            SessionEvent::Frame(f) => return Ok(f),
            SessionEvent::Ended { reason, .. } => return Err(reason),
            _ => {}
        }
    }
}

/// `n` raw TCP clients, each fully connected (one frame echoed through a game server stream),
/// then idle: resident memory per client of the gateway and of the game server.
async fn idle(setup: &Setup, n: usize) -> Result<Idle, String> {
    let addr = setup.tcp.trim_start_matches("tcp://").to_owned();
    let (gw_pid, server_pid) = (setup.gateway.0.id(), setup.server.0.id());
    let (gw_before, server_before) = (rss_bytes(gw_pid)?, rss_bytes(server_pid)?);
    let mut socks = Vec::with_capacity(n);
    let mut frame = BytesMut::new();
    wire::put_frame(&mut frame, b"hello!");
    for chunk in 0..n.div_ceil(500) {
        let mut batch = tokio::task::JoinSet::new();
        for _ in (chunk * 500)..((chunk + 1) * 500).min(n) {
            let (addr, frame) = (addr.clone(), frame.clone());
            // Past 20,000 clients, from other loopback addresses: one address has about 28,000
            // ephemeral ports toward one listener.
            let extra = socks.len() / 20_000;
            batch.spawn(async move {
                let to: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
                let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
                if extra > 0 {
                    let from = std::net::Ipv4Addr::new(127, 0, 0, 1 + extra as u8);
                    sock.bind((from, 0).into())
                        .map_err(|e| format!("bind {from}: {e}"))?;
                }
                let mut s = sock
                    .connect(to)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                s.write_all(&frame).await.map_err(|e| e.to_string())?;
                let mut echo = [0u8; 10];
                tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut echo))
                    .await
                    .map_err(|_| "no echo in 20 s".to_owned())?
                    .map_err(|e| format!("echo: {e}"))?;
                Ok::<_, String>(s)
            });
        }
        while let Some(r) = batch.join_next().await {
            socks.push(r.map_err(|e| e.to_string())??);
        }
    }
    let (gw_after, server_after) = (rss_bytes(gw_pid)?, rss_bytes(server_pid)?);
    let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / n as f64;
    // Each client sends one large frame and reads its echo, then idles again: buffers sized
    // for it must not stay.
    let mut large = BytesMut::new();
    wire::put_frame(&mut large, &vec![0x33; 60_000]);
    let socks = echo_large(socks, &large).await?;
    let gw_large = rss_bytes(gw_pid)?;
    // A second round: if memory were kept per client it would grow again; if the first
    // round's figure is the allocator keeping freed memory for reuse, it stays.
    let socks = echo_large(socks, &large).await?;
    let gw_large2 = rss_bytes(gw_pid)?;
    let idle = Idle {
        clients: socks.len(),
        gateway_bytes_per_client: per(gw_after, gw_before),
        server_bytes_per_client: per(server_after, server_before),
        gateway_after_large: per(gw_large, gw_before),
        gateway_after_large2: per(gw_large2, gw_before),
    };
    drop(socks);
    Ok(idle)
}

/// Every client sends `large` and reads its echo, 500 at a time.
async fn echo_large(
    socks: Vec<tokio::net::TcpStream>,
    large: &BytesMut,
) -> Result<Vec<tokio::net::TcpStream>, String> {
    let n = socks.len();
    let mut rest = socks.into_iter();
    let mut socks = Vec::with_capacity(n);
    loop {
        let chunk: Vec<_> = rest.by_ref().take(500).collect();
        if chunk.is_empty() {
            break;
        }
        let mut batch = tokio::task::JoinSet::new();
        for mut s in chunk {
            let large = large.clone();
            batch.spawn(async move {
                s.write_all(&large).await.map_err(|e| e.to_string())?;
                let mut echo = vec![0u8; large.len()];
                tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut echo))
                    .await
                    .map_err(|_| "no large echo in 20 s".to_owned())?
                    .map_err(|e| format!("large echo: {e}"))?;
                Ok::<_, String>(s)
            });
        }
        while let Some(r) = batch.join_next().await {
            socks.push(r.map_err(|e| e.to_string())??);
        }
    }
    Ok(socks)
}

#[allow(dead_code)]
fn main() {
    match entry(std::env::args().collect()) {
        Ok(_) => {}
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(1);
        }
    }
}
