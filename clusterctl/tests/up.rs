//! `clusterctl up deploy/local/cluster.toml` for real: the shipped file (on free ports), every
//! part its own process; a client echoes through the gateway, a node calls across clusters
//! through the harbors, Ctrl-C stops everything and leaves no process behind.

#[path = "../../tests/support/ports.rs"]
mod ports;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use clustergo::{EtcdDiscovery, EtcdOptions, LogicAddr, Node, NodeConfig};

const WAIT: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The shipped deployment with every `127.0.0.1:PORT` moved to a free port and its run
/// directory in `dir`; returns the file and the old → new address map.
fn localized(dir: &Path) -> (PathBuf, Vec<(String, String)>) {
    let text = std::fs::read_to_string(repo().join("deploy/local/cluster.toml")).unwrap();
    let mut moved = Vec::new();
    let mut out = String::new();
    for line in text.lines() {
        let mut line = line.to_owned();
        if let Some(start) = line.find("\"127.0.0.1:") {
            let end = start + 1 + line[start + 1..].find('"').unwrap();
            let old = line[start + 1..end].to_owned();
            let new = format!("127.0.0.1:{}", ports::free_port());
            line = line.replace(&old, &new);
            moved.push((old, new));
        }
        if line.starts_with("run_dir") {
            line = format!("run_dir = {:?}", dir.join("run").display().to_string());
        }
        out += &line;
        out.push('\n');
    }
    let file = dir.join("cluster.toml");
    std::fs::write(&file, out).unwrap();
    (file, moved)
}

fn new_addr(moved: &[(String, String)], old: &str) -> String {
    moved.iter().find(|(o, _)| o == old).unwrap().1.clone()
}

/// The lines `up` prints until one contains `marker` (true) or nothing comes for [`WAIT`].
fn read_until(rx: &mpsc::Receiver<String>, marker: &str) -> (bool, Vec<String>) {
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(WAIT) {
        let done = line.contains(marker);
        lines.push(line);
        if done {
            return (true, lines);
        }
    }
    (false, lines)
}

fn alive(pid: u32) -> bool {
    // A reaped child has no /proc entry; a zombie would still say so in its status.
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        !s.lines()
            .any(|l| l.starts_with("State:") && l.contains("Z"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_clients_and_cross_cluster_calls_and_ctrl_c_leaves_nothing() {
    let bin = Path::new(env!("CARGO_BIN_EXE_clusterctl"));
    for part in [
        "harbor",
        "gateway",
        "examples/game_server",
        "examples/echo_server",
    ] {
        assert!(
            bin.with_file_name(part).is_file(),
            "{part} is not built beside clusterctl: cargo build -p clustergo -p harbor -p gateway --bins --examples \
             (the workspace's `cargo test` builds them)"
        );
    }
    let dir = std::env::temp_dir().join(format!(
        "cg-up-{}-{}",
        std::process::id(),
        ports::free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (file, moved) = localized(&dir);
    let mut up = Command::new(bin)
        .args(["up"])
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let up_pid = up.id();
    // Whatever happens below, `up` is stopped as Ctrl-C would (and so are its children).
    struct Stop(u32);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .args(["-INT", &self.0.to_string()])
                .status();
        }
    }
    let _stop = Stop(up_pid);
    // Its output, line by line, on a channel (read on a thread: the pipe blocks).
    let (tx, rx) = mpsc::channel::<String>();
    let out = up.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("[up] {line}");
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let (ready, lines) = read_until(&rx, "Ctrl-C stops everything");
    assert!(ready, "the deployment did not come up: {lines:#?}");
    // Every process it started, by pid.
    let pids: Vec<u32> = lines
        .iter()
        .filter_map(|l| {
            let at = l.find("(pid ")? + 5;
            l[at..].split(')').next()?.parse().ok()
        })
        .collect();
    assert_eq!(
        pids.len(),
        9,
        "etcd, 4 harbors, a service, 2 game servers, a gateway: {lines:#?}"
    );
    assert!(pids.iter().all(|p| alive(*p)));

    // A client echoes through the gateway, over TCP and over WebSocket.
    let tcp = new_addr(&moved, "127.0.0.1:7000");
    let ws = new_addr(&moved, "127.0.0.1:7001");
    for url in [format!("tcp://{tcp}"), format!("ws://{ws}/")] {
        let mut client = tokio::time::timeout(WAIT, clustergo_client::Client::connect(&url))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        client.send(Bytes::from_static(b"hello")).await.unwrap();
        let echo = tokio::time::timeout(WAIT, client.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&echo[..], b"hello", "{url}");
        client.close("done").await.unwrap();
    }

    // A node of cluster 1 (its id claimed from the deployment's etcd) calls the echo service
    // of cluster 2: through a harbor of each cluster.
    let etcd = format!("http://{}", new_addr(&moved, "127.0.0.1:23790"));
    let discovery = EtcdDiscovery::connect([etcd], "/clustergo/local", EtcdOptions::default());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let me = discovery
        .claim(1, 50, listener.local_addr().unwrap().to_string(), false)
        .await
        .unwrap();
    let node = Node::builder(me)
        .discovery(discovery)
        .listener(listener)
        .config(NodeConfig::default().secret("local-deployment-secret"))
        .build();
    node.start().await.unwrap();
    let service: LogicAddr = "2.2.1".parse().unwrap();
    // `EchoRequest { text: "across" }`, by hand: field 1, length-delimited.
    let mut request = vec![0x0a, 6];
    request.extend_from_slice(b"across");
    let reply = node
        .call_timeout(
            service,
            "examples.echo.v1.Echo/Call",
            Bytes::from(request),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.contains("across") && reply.contains("2.2.1"),
        "reply {reply:?}"
    );
    node.shutdown().await;

    // Ctrl-C: everything drains and stops; nothing is left.
    let status = Command::new("kill")
        .args(["-INT", &up_pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let (stopped, rest) = read_until(&rx, "stopped; logs in");
    assert!(stopped, "no clean stop: {rest:#?}");
    let exit = up.wait().unwrap();
    assert!(exit.success(), "clusterctl up exited {exit}: {rest:#?}");
    // Each node drained and exited by itself (none had to be killed).
    assert!(!rest.iter().any(|l| l.contains("killed")), "{rest:#?}");
    let left: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
    let logs = std::fs::read_dir(dir.join("run/logs")).unwrap().count();
    assert_eq!(logs, 9, "one log per process");
    let _ = std::fs::remove_dir_all(&dir);
}
