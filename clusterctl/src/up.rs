//! `clusterctl up FILE`: a whole deployment on one machine, each part its own process with its
//! own log — etcd, harbors, gateways, game servers and service nodes — until Ctrl-C, then a
//! clean stop in order (gateways, game servers, services, harbors, etcd; each node drains on
//! SIGTERM), leaving no process behind.
//!
//! The file (see `deploy/local/cluster.toml`):
//!
//! ```toml
//! prefix = "/clustergo/local"      # membership key prefix
//! secret = "..."                   # CLUSTERGO_SECRET of every process
//! run_dir = "../../target/local"   # logs and etcd's data; relative to the file
//! # bin_dir = "target/debug"       # where harbor/gateway are (and examples/ under it);
//! #                                 default: beside this clusterctl
//! [etcd]
//! client = "127.0.0.1:23790"
//! peer = "127.0.0.1:23800"
//!
//! [[node]]
//! kind = "harbor"                  # harbor | gateway | game | service
//! addr = "1.255.1"
//! listen = "127.0.0.1:29001"       # its link listener (its membership entry)
//! admin = "127.0.0.1:29501"        # /metrics /live /ready /status
//! # gateway only: backend_type = 1, tcp = "...", ws = "...", kcp = "..."
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::io::IsTerminal;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clustergo::LogicAddr;
use clustergo::Member;
use clustergo::membership::{alive_key, encode_member, member_key};
use serde::Deserialize;

/// The deployment file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Deployment {
    prefix: String,
    secret: String,
    run_dir: PathBuf,
    bin_dir: Option<PathBuf>,
    etcd: EtcdSpec,
    #[serde(rename = "node")]
    nodes: Vec<NodeSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EtcdSpec {
    client: String,
    peer: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    // Started in this order, stopped in the reverse one.
    Harbor,
    Service,
    Game,
    Gateway,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeSpec {
    kind: Kind,
    addr: LogicAddr,
    listen: String,
    admin: Option<String>,
    /// Visible to other clusters (harbors always are).
    #[serde(default)]
    export: bool,
    backend_type: Option<u8>,
    tcp: Option<String>,
    ws: Option<String>,
    kcp: Option<String>,
}

/// One started process.
struct Proc {
    name: String,
    addr: Option<LogicAddr>,
    kind: Option<Kind>,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to this child (by its own pid).
    fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status();
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then waits up to `grace`; SIGKILL after that.
    async fn stop(&mut self, grace: Duration) -> String {
        if let Some(status) = self.exited() {
            return format!("{} had exited ({status})", self.name);
        }
        self.signal("-TERM");
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if let Some(status) = self.exited() {
                return format!("{} stopped ({status})", self.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        format!("{} did not stop within {grace:?}: killed", self.name)
    }
}

/// Runs the deployment in `file` until Ctrl-C or SIGTERM.
pub(crate) async fn up(file: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let d: Deployment = toml::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    check(&d)?;
    let base = file.parent().unwrap_or(Path::new("."));
    let run_dir = base.join(&d.run_dir);
    let logs = run_dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;
    let run_dir = run_dir.canonicalize().unwrap_or(run_dir);
    let logs = run_dir.join("logs");
    let bins = match &d.bin_dir {
        Some(b) => base.join(b),
        None => std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
            .ok_or("cannot tell where clusterctl is: set bin_dir")?,
    };
    // Ctrl-C and SIGTERM are watched from the start: one during start-up stops what has
    // started so far.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot watch for SIGTERM: {e}"))?;
    let watcher = tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        let _ = stop_tx.send(true);
    });
    let mut procs: Vec<Proc> = Vec::new();
    let result = run(&d, &run_dir, &logs, &bins, &mut procs, stop).await;
    watcher.abort();
    // Stop in reverse order of start: clients' doors first, membership last.
    println!("stopping (each node drains first)...");
    let mut lines = Vec::new();
    while let Some(mut p) = procs.pop() {
        // A gateway closes its clients within its grace, then its node drains within its
        // own: both default to 10 s or less.
        let grace = if p.kind.is_some() {
            Duration::from_secs(40)
        } else {
            Duration::from_secs(10)
        };
        let line = p.stop(grace).await;
        println!("  {line}");
        lines.push(line);
    }
    result.map(|()| format!("stopped; logs in {}\n", logs.display()))
}

fn check(d: &Deployment) -> Result<(), String> {
    if !d.prefix.starts_with('/') {
        return Err(format!("prefix {:?} must start with '/'", d.prefix));
    }
    let mut seen = BTreeMap::new();
    for n in &d.nodes {
        if seen.insert(n.addr, ()).is_some() {
            return Err(format!("node {} is listed twice", n.addr));
        }
        match n.kind {
            Kind::Harbor if !n.addr.is_harbor() => {
                return Err(format!("harbor {} must have type 255", n.addr));
            }
            Kind::Gateway => {
                if n.backend_type.is_none() {
                    return Err(format!("gateway {} needs backend_type", n.addr));
                }
                if n.tcp.is_none() && n.ws.is_none() && n.kcp.is_none() {
                    return Err(format!("gateway {} needs tcp, ws or kcp", n.addr));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Bound of one etcd request.
const ETCD_TIMEOUT: Duration = Duration::from_secs(3);

/// An etcd request under [`ETCD_TIMEOUT`].
async fn timed<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(ETCD_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("etcd: {what}: {e}")),
        Err(_) => Err(format!("etcd: {what}: no answer within {ETCD_TIMEOUT:?}")),
    }
}

type StopRx = tokio::sync::watch::Receiver<bool>;

fn stopping(stop: &StopRx) -> Result<(), String> {
    if *stop.borrow() {
        Err("interrupted during start-up".into())
    } else {
        Ok(())
    }
}

async fn run(
    d: &Deployment,
    run_dir: &Path,
    logs: &Path,
    bins: &Path,
    procs: &mut Vec<Proc>,
    mut stop: StopRx,
) -> Result<(), String> {
    let endpoint = format!("http://{}", d.etcd.client);
    // etcd first.
    let peer = format!("http://{}", d.etcd.peer);
    let etcd = spawn(
        "etcd",
        None,
        None,
        Command::new("etcd")
            .args(["--name", "local", "--data-dir"])
            .arg(run_dir.join("etcd"))
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("local={peer}")]),
        logs,
    )
    .map_err(|e| format!("{e} (install etcd: apt-get install etcd-server)"))?;
    procs.push(etcd);
    let mut client = connect_etcd(&endpoint, procs, &stop).await?;
    println!("etcd on {endpoint} (pid {})", procs[0].pid());
    // Membership: what an earlier run left under the prefix goes (etcd's data persists in
    // run_dir), then every node at its listen address.
    let all = format!("{}/", d.prefix.trim_end_matches('/'));
    timed(
        "clearing the prefix",
        client.delete(all, Some(etcd_client::DeleteOptions::new().with_prefix())),
    )
    .await?;
    for n in &d.nodes {
        let m = Member::new(n.addr, n.listen.clone()).with_export(n.export || n.addr.is_harbor());
        timed(
            "writing membership",
            client.put(member_key(&d.prefix, n.addr), encode_member(&m), None),
        )
        .await?;
    }
    let mut order: Vec<&NodeSpec> = d.nodes.iter().collect();
    order.sort_by_key(|n| n.kind);
    for n in order {
        stopping(&stop)?;
        let mut cmd = command(d, n, bins, &endpoint)?;
        cmd.env("CLUSTERGO_SECRET", &d.secret);
        let name = format!("{:?}-{}", n.kind, n.addr).to_lowercase();
        let p = spawn(&name, Some(n.addr), Some(n.kind), &mut cmd, logs)?;
        println!("started {name} (pid {}), log {}", p.pid(), p.log.display());
        procs.push(p);
        wait_alive(&mut client, &d.prefix, n.addr, procs, &stop).await?;
    }
    println!("{}", where_to_connect(d));
    let tty = std::io::stdout().is_terminal();
    let mut last = String::new();
    loop {
        let line = status(&mut client, &d.prefix, procs).await;
        if tty {
            print!("\r\x1b[2K{line}");
            let _ = std::io::Write::flush(&mut std::io::stdout());
        } else if line != last {
            println!("{line}");
        }
        last = line;
        if *stop.borrow() {
            break;
        }
        tokio::select! {
            _ = stop.changed() => break,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    if tty {
        println!();
    }
    Ok(())
}

/// The command line of one node.
fn command(d: &Deployment, n: &NodeSpec, bins: &Path, etcd: &str) -> Result<Command, String> {
    let find = |rel: &str| {
        let p = bins.join(rel);
        if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "{} not found (build it: cargo build -p harbor -p gateway -p clusterctl --examples -p clustergo)",
                p.display()
            ))
        }
    };
    let addr = n.addr.to_string();
    let common = |c: &mut Command| {
        c.args(["--addr", &addr, "--etcd", etcd, "--prefix", &d.prefix]);
        if let Some(a) = &n.admin {
            c.args(["--admin-listen", a]);
        }
    };
    let cmd = match n.kind {
        Kind::Harbor => {
            let mut c = Command::new(find("harbor")?);
            common(&mut c);
            c
        }
        Kind::Gateway => {
            let mut c = Command::new(find("gateway")?);
            common(&mut c);
            let t = n.backend_type.unwrap_or(1).to_string();
            c.args(["--backend-type", &t]);
            for (flag, v) in [("--tcp", &n.tcp), ("--ws", &n.ws), ("--kcp", &n.kcp)] {
                if let Some(v) = v {
                    c.args([flag, v]);
                }
            }
            c
        }
        Kind::Game => {
            let mut c = Command::new(find("examples/game_server")?);
            common(&mut c);
            c
        }
        Kind::Service => {
            // The echo service example: membership from etcd, its address.
            let mut c = Command::new(find("examples/echo_server")?);
            c.arg(format!(
                "etcd://{}{}",
                etcd.trim_start_matches("http://"),
                d.prefix
            ))
            .arg(&addr);
            c
        }
    };
    Ok(cmd)
}

fn spawn(
    name: &str,
    addr: Option<LogicAddr>,
    kind: Option<Kind>,
    cmd: &mut Command,
    logs: &Path,
) -> Result<Proc, String> {
    let log = logs.join(format!("{name}.log"));
    let out = File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Its own process group: a terminal's Ctrl-C reaches `up` only, which then stops the
        // parts in order.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {name} ({:?}): {e}", cmd.get_program()))?;
    Ok(Proc {
        name: name.into(),
        addr,
        kind,
        child,
        log,
    })
}

async fn connect_etcd(
    endpoint: &str,
    procs: &mut [Proc],
    stop: &StopRx,
) -> Result<etcd_client::Client, String> {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        stopping(stop)?;
        if let Some(status) = procs[0].exited() {
            return Err(format!(
                "etcd exited ({status}); see {}",
                procs[0].log.display()
            ));
        }
        let attempt = async {
            let mut c = etcd_client::Client::connect([endpoint], None).await?;
            c.get("/", None).await?;
            Ok::<_, etcd_client::Error>(c)
        };
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(1), attempt).await {
            return Ok(c);
        }
        if Instant::now() > end {
            return Err(format!("etcd at {endpoint} did not answer within 20 s"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `addr` holds its alive key (it started and joined), or its process exits.
async fn wait_alive(
    client: &mut etcd_client::Client,
    prefix: &str,
    addr: LogicAddr,
    procs: &mut [Proc],
    stop: &StopRx,
) -> Result<(), String> {
    let end = Instant::now() + Duration::from_secs(30);
    let key = alive_key(prefix, addr);
    loop {
        stopping(stop)?;
        let p = procs.last_mut().ok_or("no process")?;
        if let Some(status) = p.exited() {
            return Err(format!(
                "{} exited at start ({status}); see {}",
                p.name,
                p.log.display()
            ));
        }
        if timed("reading liveness", client.get(key.as_str(), None))
            .await
            .is_ok_and(|r| r.count() > 0)
        {
            return Ok(());
        }
        if Instant::now() > end {
            return Err(format!(
                "{addr} did not join within 30 s; see {}",
                p.log.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn where_to_connect(d: &Deployment) -> String {
    let mut out = String::from("up. Connect:\n");
    for n in d.nodes.iter().filter(|n| n.kind == Kind::Gateway) {
        if let Some(t) = &n.tcp {
            out += &format!("  tcp://{t}  (clustergo-client, or any length-prefixed TCP client)\n");
        }
        if let Some(w) = &n.ws {
            out += &format!("  ws://{w}/\n");
            out += &format!("  browser: examples/browser/index.html?gw=ws://{w}/&auto=1\n");
        }
        if let Some(k) = &n.kcp {
            out += &format!("  kcp://{k}\n");
        }
    }
    for n in d.nodes.iter().filter(|n| n.admin.is_some()) {
        if let Some(a) = &n.admin {
            out += &format!("  {} admin: http://{a}/status\n", n.addr);
        }
    }
    out += &format!(
        "  membership: clusterctl --endpoints http://{} --prefix {} members list\n",
        d.etcd.client, d.prefix
    );
    out += "Ctrl-C stops everything.";
    out
}

/// One line: which parts run and which nodes are alive in membership.
async fn status(client: &mut etcd_client::Client, prefix: &str, procs: &mut [Proc]) -> String {
    let alive_dir = format!("{}/alive/", prefix.trim_end_matches('/'));
    let listed = timed(
        "reading liveness",
        client.get(
            alive_dir.as_str(),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        ),
    )
    .await;
    let alive: Vec<LogicAddr> = match listed {
        Ok(r) => r
            .kvs()
            .iter()
            .filter_map(|kv| {
                std::str::from_utf8(kv.key())
                    .ok()?
                    .strip_prefix(&alive_dir)?
                    .parse()
                    .ok()
            })
            .collect(),
        Err(_) => return "etcd does not answer".into(),
    };
    let mut by_kind: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut exited = Vec::new();
    for p in procs.iter_mut() {
        if let Some(status) = p.exited() {
            exited.push(format!("{} exited ({status})", p.name));
        }
        if let (Some(kind), Some(addr)) = (p.kind, p.addr) {
            let e = by_kind
                .entry(format!("{kind:?}").to_lowercase())
                .or_default();
            e.1 += 1;
            e.0 += usize::from(alive.contains(&addr));
        }
    }
    let mut parts: Vec<String> = by_kind
        .into_iter()
        .map(|(k, (up, all))| format!("{k} {up}/{all}"))
        .collect();
    parts.insert(0, "alive:".into());
    parts.extend(exited);
    parts.join(" ")
}
