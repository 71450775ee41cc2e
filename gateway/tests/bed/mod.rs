//! A test bed: a real etcd, game server processes (the `game_server` example) and a gateway
//! process, all on loopback; the gateway's log is collected so tests can wait for a line.
#![allow(dead_code, unreachable_pub)]

#[path = "../../../tests/support/etcd.rs"]
pub mod etcd_server;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clustergo::{LogicAddr, Member};
use etcd_server::Etcd;

pub const PREFIX: &str = "/cg-gateway-test";
pub const SECRET: &str = "gateway-test-secret";
/// One outer bound for anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn a(s: &str) -> LogicAddr {
    s.parse().unwrap()
}

/// A child process of the test, killed by its handle when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Sends SIGKILL (to this child only).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM (to this child only).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// Lines a process wrote, shared with the thread that reads them.
#[derive(Clone, Default)]
pub struct Log(Arc<(Mutex<Vec<String>>, std::sync::Condvar)>);

impl Log {
    fn push(&self, line: String) {
        self.0.0.lock().unwrap().push(line);
        self.0.1.notify_all();
    }

    /// Waits (blocking, bounded by [`WAIT`]) for a line containing every one of `parts`.
    pub fn wait_for(&self, parts: &[&str]) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        let mut lines = self.0.0.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| parts.iter().all(|p| l.contains(p))) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(
                !left.is_zero(),
                "no log line with {parts:?}; log:\n{}",
                lines.join("\n")
            );
            lines = self.0.1.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// Async form of [`Log::wait_for`].
    pub async fn wait(&self, parts: &[&str]) -> String {
        let log = self.clone();
        let parts: Vec<String> = parts.iter().map(|s| s.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            let p: Vec<&str> = parts.iter().map(String::as_str).collect();
            log.wait_for(&p)
        })
        .await
        .unwrap()
    }

    pub fn contains(&self, text: &str) -> bool {
        self.0.0.lock().unwrap().iter().any(|l| l.contains(text))
    }

    /// Waits (bounded by [`WAIT`]) until `n` lines contain `text`.
    pub async fn wait_count(&self, text: &str, n: usize) {
        let log = self.clone();
        let text = text.to_owned();
        tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + WAIT;
            let mut lines = log.0.0.lock().unwrap();
            while lines.iter().filter(|l| l.contains(&text)).count() < n {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                assert!(
                    !left.is_zero(),
                    "not {n} lines with {text:?}; log:\n{}",
                    lines.join("\n")
                );
                lines = log.0.1.wait_timeout(lines, left).unwrap().0;
            }
        })
        .await
        .unwrap()
    }
}

fn collect(name: String, out: impl std::io::Read + Send + 'static, log: Log) {
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("[{name}] {line}");
            log.push(line);
        }
    });
}

/// The path of the `game_server` example (built by `cargo test` with the package's tests).
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        bin.exists(),
        "example {name} not built at {}",
        bin.display()
    );
    bin
}

/// `127.0.0.1:PORT` with a port free for a process started later.
pub fn free_port() -> String {
    format!("127.0.0.1:{}", etcd_server::free_port())
}

/// Starts game server `addr` (already listed) and waits until it is up.
/// Environment for every process the bed starts (a test binary that sets it holds one test).
pub static ENV: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

fn bed_env() -> Vec<(String, String)> {
    ENV.lock().unwrap().clone()
}

pub fn game_server(etcd: &Etcd, addr: &str) -> Proc {
    let mut child = Command::new(example("game_server"))
        .args(["--etcd", &etcd.endpoint, "--prefix", PREFIX, "--addr", addr])
        .env("CLUSTERGO_SECRET", SECRET)
        .envs(bed_env())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("game server printed nothing").unwrap();
    assert!(first.contains("listening on"), "{first}");
    let name = addr.to_owned();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            println!("[{name}] {line}");
        }
    });
    Proc {
        child,
        name: addr.into(),
    }
}

/// A running gateway process.
pub struct Gateway {
    pub proc: Proc,
    pub log: Log,
    pub out: Log,
    pub tcp: String,
    pub ws: String,
    pub kcp: String,
    /// The admin listener, when the config sets `admin_listen`.
    pub admin: Option<String>,
    _dir: TempDir,
}

impl Gateway {
    pub fn url(&self, transport: &str) -> String {
        match transport {
            "tcp" => format!("tcp://{}", self.tcp),
            "tls" => format!("tls://{}", self.tcp),
            "ws" => format!("ws://{}", self.ws),
            "wss" => format!("wss://{}", self.ws),
            "kcp" => format!("kcp://{}", self.kcp),
            other => panic!("transport {other}"),
        }
    }
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "cg-gw-{tag}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Limits that let failure paths finish quickly.
pub const TEST_LIMITS: &str = "[limits]
handshake_timeout_ms = 1000
idle_timeout_ms = 3000
write_timeout_ms = 500
frames_per_sec = 5000
bytes_per_sec = 67108864
";

/// Starts the gateway `1.100.1` (already listed) in front of game servers of type 1, with
/// all three listeners on free ports plus `extra` config (listener options go in `tcp_extra`
/// and `ws_extra`, e.g. TLS files).
pub fn gateway(etcd: &Etcd, extra: &str, tcp_extra: &str, ws_extra: &str) -> Gateway {
    gateway_as(etcd, "1.100.1", extra, tcp_extra, ws_extra)
}

/// [`gateway`] at address `addr` (listed already).
pub fn gateway_as(
    etcd: &Etcd,
    addr: &str,
    extra: &str,
    tcp_extra: &str,
    ws_extra: &str,
) -> Gateway {
    let dir = TempDir::new("cfg");
    let config = format!(
        "addr = \"{addr}\"\nbackend_type = 1\nshutdown_grace_secs = 3\n{extra}\n\
         [etcd]\nendpoints = [\"{}\"]\nprefix = \"{PREFIX}\"\nlease_ttl_secs = 2\n\
         [tcp]\nlisten = \"127.0.0.1:0\"\n{tcp_extra}\n\
         [websocket]\nlisten = \"127.0.0.1:0\"\npath = \"/ws\"\n{ws_extra}\n\
         [kcp]\nlisten = \"127.0.0.1:0\"\n",
        etcd.endpoint
    );
    let path = dir.0.join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("--config")
        .arg(&path)
        .env("CLUSTERGO_SECRET", SECRET)
        .env("RUST_LOG", "info")
        .envs(bed_env())
        .env_remove("GATEWAY_ADDR")
        .env_remove("GATEWAY_ETCD")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Log::default();
    collect("gateway".into(), child.stderr.take().unwrap(), log.clone());
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    if stdout.read_line(&mut first).unwrap_or(0) == 0 {
        panic!(
            "gateway printed nothing; log:\n{}",
            log.0.0.lock().unwrap().join("\n")
        );
    }
    let out = Log::default();
    collect("gateway".into(), stdout, out.clone());
    let field = |name: &str| -> String {
        let rest = first
            .split(&format!("{name} on "))
            .nth(1)
            .unwrap_or_else(|| panic!("no {name} in {first:?}"));
        rest.split(',').next().unwrap().trim().to_owned()
    };
    Gateway {
        tcp: field("tcp"),
        ws: field("websocket"),
        kcp: field("kcp"),
        admin: first
            .split("admin on ")
            .nth(1)
            .map(|rest| rest.split(',').next().unwrap_or(rest).trim().to_owned()),
        proc: Proc {
            child,
            name: "gateway".into(),
        },
        log,
        out,
        _dir: dir,
    }
}

/// etcd, game servers `servers` (type 1) and a gateway, everyone listed.
pub struct Bed {
    pub etcd: Etcd,
    /// Everyone as listed in etcd.
    pub members: Vec<Member>,
    pub servers: Vec<Proc>,
    pub gateway: Gateway,
}

pub async fn bed(servers: &[&str], extra: &str) -> Bed {
    bed_with(servers, extra, "", "").await
}

pub async fn bed_with(servers: &[&str], extra: &str, tcp_extra: &str, ws_extra: &str) -> Bed {
    bed_listing(servers, extra, tcp_extra, ws_extra, &[]).await
}

/// A bed whose membership also lists `also` (nodes of the test itself) from the start, so the
/// game servers admit their links at once: listed later, a member is refused by a server
/// whose view has not caught up yet.
pub async fn bed_listing(
    servers: &[&str],
    extra: &str,
    tcp_extra: &str,
    ws_extra: &str,
    also: &[Member],
) -> Bed {
    let etcd = Etcd::start();
    let mut members = vec![Member::new(a("1.100.1"), free_port())];
    members.extend(servers.iter().map(|s| Member::new(a(s), free_port())));
    etcd.list(PREFIX, &members).await;
    etcd.list(PREFIX, also).await;
    let procs = servers.iter().map(|s| game_server(&etcd, s)).collect();
    let gateway = gateway(&etcd, extra, tcp_extra, ws_extra);
    let mut sorted: Vec<&str> = servers.to_vec();
    sorted.sort();
    gateway
        .log
        .wait(&[&format!(
            "game servers of type 1 available: [{}]",
            sorted.join(", ")
        )])
        .await;
    Bed {
        etcd,
        members,
        servers: procs,
        gateway,
    }
}

/// Where the README's test command installs the PyPI packages the tests use; fails, saying
/// why, when `kcp` is not there.
pub fn pydeps_with_kcp() -> PathBuf {
    let deps = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pydeps");
    let probe = Command::new("python3")
        .args(["-c", "import kcp"])
        .env("PYTHONPATH", &deps)
        .status();
    assert!(
        probe.is_ok_and(|s| s.success()),
        "PyPI kcp is not installed in {}: run the README's test command, which installs it",
        deps.display()
    );
    deps
}
