//! The harbor binary: configuration errors before binding, and real harbor processes carrying
//! calls, messages and streams between two clusters whose membership is in a real etcd.

#[path = "../../tests/support/etcd.rs"]
mod etcd_server;
#[path = "../../tests/support/otlp.rs"]
mod otlp;
#[path = "../../tests/support/prometheus.rs"]
mod prometheus_server;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use clustergo::{
    Bytes, Cmd, EtcdDiscovery, EtcdOptions, HandlerError, LogicAddr, Member, Node, NodeConfig,
    RpcError,
};
use etcd_server::Etcd;

const PREFIX: &str = "/cg-harbor-test";
const SECRET: &str = "harbor-test-secret";
const WAIT: Duration = Duration::from_secs(15);

fn a(s: &str) -> LogicAddr {
    s.parse().unwrap()
}

fn harbor() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_harbor"));
    c.env("CLUSTERGO_SECRET", SECRET)
        .env_remove("HARBOR_ADDR")
        .env_remove("HARBOR_ETCD")
        .env_remove("HARBOR_CONFIG");
    c
}

/// A number for a config file no other test of this process writes.
fn next_file() -> u32 {
    static FILES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Runs the harbor with `config` as its file and `args`; returns (exit code, stderr).
fn run_with_config(config: &str, args: &[&str]) -> (i32, String) {
    let dir = std::env::temp_dir().join(format!("cg-harbor-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A file of its own per run: tests run in parallel.
    let path = dir.join(format!("{}.toml", next_file()));
    std::fs::write(&path, config).unwrap();
    let out = harbor()
        .arg("--config")
        .arg(&path)
        .args(args)
        .output()
        .unwrap();
    std::fs::remove_file(&path).ok();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configurations_are_refused_before_anything_binds() {
    let ok_etcd = "[etcd]\nendpoints = [\"http://127.0.0.1:1\"]\n";
    let cases = [
        (
            format!("addr = \"1.1.1\"\n{ok_etcd}"),
            "is not a harbor address: its type must be 255",
        ),
        (
            format!("addr = \"1.255.1\"\nport = 9\n{ok_etcd}"),
            "unknown field `port`",
        ),
        (
            "addr = \"1.255.1\"\n[etcd]\nendpoint = \"x\"\n".to_owned(),
            "unknown field `endpoint`",
        ),
        ("addr = \"1.255.1\"\n".to_owned(), "no etcd endpoints"),
        (
            format!("addr = \"0.255.1\"\n{ok_etcd}"),
            "cluster 0 is out of range",
        ),
        (
            "addr = \"1.255.1\"\n[etcd]\nendpoints = [\"127.0.0.1:2379\"]\n".to_owned(),
            "must start with http://",
        ),
        (ok_etcd.to_owned(), "no harbor address"),
        (
            format!("addr = \"1.255.1\"\n{ok_etcd}[harbors_center]\nprefix = \"/h\"\n"),
            "[harbors_center] needs endpoints",
        ),
        (
            format!(
                "addr = \"1.255.1\"\n{ok_etcd}[harbors_center]\nendpoints = [\"http://h:1\"]\n"
            ),
            "[harbors_center] needs a prefix",
        ),
        (
            format!("addr = \"1.255.1\"\nmax_envelope_bytes = 0\n{ok_etcd}"),
            "max_envelope_bytes 0 must be in",
        ),
        (
            format!("addr = \"1.255.1\"\n{ok_etcd}[relay]\ndeny = [\"2>1\"]\n"),
            "[relay] deny entry \"2>1\": write it as \"FROM->TO\"",
        ),
        (
            format!("addr = \"1.255.1\"\n{ok_etcd}[relay]\nmax_per_sec = 0\n"),
            "[relay] max_per_sec must be at least 1",
        ),
    ];
    for (config, want) in cases {
        let (code, stderr) = run_with_config(&config, &[]);
        assert_eq!(code, 2, "{config:?} → {stderr}");
        assert!(
            stderr.contains(want),
            "{config:?}: wanted {want:?} in {stderr:?}"
        );
    }
    // Flags override the file (the harbors center can come from flags alone), and are
    // validated the same way.
    for (args, want) in [
        (["--addr", "2.3.4"], "addr 2.3.4 is not a harbor address"),
        (
            ["--harbors-center-prefix", "/h"],
            "[harbors_center] needs endpoints",
        ),
    ] {
        let (code, stderr) = run_with_config(&format!("addr = \"1.255.1\"\n{ok_etcd}"), &args);
        assert_eq!(code, 2, "{args:?} → {stderr}");
        assert!(
            stderr.contains(want),
            "{args:?}: wanted {want:?} in {stderr:?}"
        );
    }
}

/// Without a cluster secret the harbor fails closed: it will not run on the public development
/// secret unless told so with `--insecure-dev`.
#[test]
fn no_secret_no_harbor_unless_insecure_dev() {
    let run = |extra: &[&str]| {
        let out = harbor()
            .env_remove("CLUSTERGO_SECRET")
            .args(["--addr", "1.255.1", "--etcd", "http://127.0.0.1:1"])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = run(&[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("no cluster secret: set CLUSTERGO_SECRET"),
        "{stderr}"
    );
    // With the switch it gets past its configuration (and then finds no etcd there).
    let (code, stderr) = run(&["--insecure-dev"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(!stderr.contains("no cluster secret"), "{stderr}");
    assert!(stderr.contains("public development secret"), "{stderr}");
}

/// A harbor process, killed (by its handle) if the test ends before it stops.
struct HarborProc(Child, String);

impl Drop for HarborProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// etcd listing server 1.1.1 (exported), harbors 1.255.1 and 2.255.1 and client 2.2.1
/// (exported if `client_export`), with the listeners the two nodes will serve on.
async fn two_clusters(client_export: bool) -> (Etcd, std::net::TcpListener, std::net::TcpListener) {
    let etcd = Etcd::start();
    let server_net = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client_net = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let members = [
        Member::new(a("1.1.1"), server_net.local_addr().unwrap().to_string()).with_export(true),
        Member::new(a("1.255.1"), free_port()),
        Member::new(a("2.255.1"), free_port()),
        Member::new(a("2.2.1"), client_net.local_addr().unwrap().to_string())
            .with_export(client_export),
    ];
    etcd.list(PREFIX, &members).await;
    (etcd, server_net, client_net)
}

/// Starts `node` under the outer timeout.
async fn start(node: &Node) {
    tokio::time::timeout(WAIT, node.start())
        .await
        .expect("the node started in time")
        .expect("the node started");
}

/// Calls `method` on `to`, retrying while there is no route yet (until the harbors see each
/// other alive through etcd), bounded by the outer timeout.
async fn call_when_routed(node: &Node, to: LogicAddr, method: &str) -> Result<Bytes, RpcError> {
    tokio::time::timeout(WAIT, async {
        loop {
            match node.call(to, method, Bytes::new()).await {
                Err(RpcError::NoRoute { reason, .. })
                    if reason.contains("no available harbor in cluster") =>
                {
                    tokio::task::yield_now().await
                }
                other => return other,
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no route from {} to {to} within the outer timeout",
            node.addr()
        )
    })
}

fn free_port() -> String {
    format!("127.0.0.1:{}", etcd_server::free_port())
}

fn start_harbor(etcd: &Etcd, addr: &str) -> HarborProc {
    start_harbor_with(etcd, addr, None)
}

/// A harbor process, with `config` (TOML) as its file if given.
fn start_harbor_with(etcd: &Etcd, addr: &str, config: Option<&str>) -> HarborProc {
    start_harbor_env(etcd, addr, config, &[])
}

/// As [`start_harbor_with`], with environment variables `env` too.
fn start_harbor_env(
    etcd: &Etcd,
    addr: &str,
    config: Option<&str>,
    env: &[(&str, &str)],
) -> HarborProc {
    let mut cmd = harbor();
    cmd.envs(env.iter().copied());
    match config {
        // A short grace unless the file sets one (flags would override it).
        Some(c) if c.contains("shutdown_grace_secs") => {}
        _ => {
            cmd.args(["--shutdown-grace-secs", "1"]);
        }
    }
    if let Some(config) = config {
        // A file of its own per start: tests run in parallel, and two of them start a
        // 2.255.1 with different files (one harbor once read the other's deny policy).
        let n = next_file();
        let dir = std::env::temp_dir().join(format!("cg-harbor-run-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{addr}-{n}.toml"));
        std::fs::write(&path, config).unwrap();
        cmd.arg("--config").arg(path);
    }
    let mut child = cmd
        .args(["--addr", addr, "--etcd", &etcd.endpoint, "--prefix", PREFIX])
        .args(["--lease-ttl-secs", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("harbor printed nothing").unwrap();
    assert!(
        first.contains(&format!("harbor {addr} listening on")),
        "{first}"
    );
    // Keep draining its output so it never blocks on a full pipe.
    let addr = addr.to_owned();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            println!("[{addr}] {line}");
        }
    });
    HarborProc(child, first)
}

async fn node(etcd: &Etcd, addr: &str, net: std::net::TcpListener) -> clustergo::NodeBuilder {
    Node::builder(a(addr))
        .discovery(EtcdDiscovery::connect(
            [etcd.endpoint.clone()],
            PREFIX,
            EtcdOptions::default().lease_ttl(Duration::from_secs(2)),
        ))
        .config(NodeConfig::default().secret(SECRET))
        .listener(net)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harbor_processes_carry_calls_and_messages_between_clusters() {
    let (etcd, server_net, client_net) = two_clusters(false).await;
    let mut h1 = start_harbor(&etcd, "1.255.1");
    let _h2 = start_harbor(&etcd, "2.255.1");

    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let server = node(&etcd, "1.1.1", server_net)
        .await
        .rpc("who", |ctx, _| async move {
            Ok::<_, HandlerError>(Bytes::from(format!("{} called", ctx.from())))
        })
        .on_cmd(Cmd(1), move |ctx, p| {
            let _ = seen_tx.send((ctx.from(), u32::from_be_bytes(p[..4].try_into().unwrap())));
        })
        .on_stream(|s| async move {
            let (mut r, mut w) = s.into_split();
            if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
            }
        })
        .build();
    start(&server).await;
    let client = node(&etcd, "2.2.1", client_net).await.build();
    start(&client).await;

    // Everyone alive: the exported server is selectable from cluster 2.
    assert!(
        client
            .wait_for_member(a("1.1.1"), |m| m.is_some_and(|m| m.available), WAIT)
            .await
    );
    assert!(
        client
            .wait_for_member(a("2.255.1"), |m| m.is_some_and(|m| m.available), WAIT)
            .await
    );
    assert_eq!(client.get_addr_by_type(1), Ok(a("1.1.1")));
    let reply = call_when_routed(&client, a("1.1.1"), "who").await.unwrap();
    assert_eq!(&reply[..], b"2.2.1 called");

    // 10,000 messages in order, at most 1,000 in flight: a harbor drops (counted, logged) what
    // does not fit its 8,192-envelope queue to the next hop, and a loaded machine can slow a
    // harbor process enough for a 10,000 burst to overflow it.
    const N: u32 = 10_000;
    const WINDOW: u32 = 1_000;
    for start in (0..N).step_by(WINDOW as usize) {
        for n in start..start + WINDOW {
            client
                .send_cmd(a("1.1.1"), Cmd(1), Bytes::copy_from_slice(&n.to_be_bytes()))
                .await
                .unwrap();
        }
        for n in start..start + WINDOW {
            let (from, got) = tokio::time::timeout(WAIT, seen_rx.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!((from, got), (a("2.2.1"), n));
        }
    }

    // A stream through both harbor processes: 256 KiB echoed, then a clean close.
    let stream = tokio::time::timeout(WAIT, client.open_stream(a("1.1.1")))
        .await
        .unwrap()
        .unwrap();
    let (mut r, mut w) = stream.into_split();
    let data: Vec<u8> = (0..256u32 << 10).map(|i| (i % 251) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(
        WAIT,
        tokio::io::AsyncReadExt::read_to_end(&mut r, &mut back),
    )
    .await
    .unwrap()
    .unwrap();
    writer.await.unwrap();
    assert!(back == data, "stream echo differs");

    // A target cluster 1 does not list: its harbor says so, for calls and for streams.
    let e = client
        .call(a("1.1.77"), "who", Bytes::new())
        .await
        .unwrap_err();
    match &e {
        RpcError::NoRoute { to, reason } => {
            assert_eq!(*to, a("1.1.77"));
            assert!(reason.contains("(at 1.255.1)"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let t = std::time::Instant::now();
    let e = client.open_stream(a("1.1.77")).await.unwrap_err();
    assert!(matches!(e, clustergo::StreamError::NoRoute { .. }), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    // The harbor reports its view of harbors and links.
    let status = client
        .call(a("2.255.1"), "harbor.status", Bytes::new())
        .await
        .unwrap();
    let status = String::from_utf8_lossy(&status).into_owned();
    assert!(
        status.contains("1.255.1") && status.contains("linked=true"),
        "{status}"
    );

    // SIGTERM: the harbor leaves membership, drains and exits 0.
    let pid = h1.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let exited = tokio::task::spawn_blocking(move || {
        let status = h1.0.wait().unwrap();
        std::mem::forget(h1);
        status
    });
    let status = tokio::time::timeout(WAIT, exited).await.unwrap().unwrap();
    assert!(status.success(), "{status:?}");
    // With cluster 1's only harbor gone, calls there fail fast with the reason.
    let e = tokio::time::timeout(WAIT, async {
        loop {
            match client.call(a("1.1.1"), "who", Bytes::new()).await {
                Err(e @ RpcError::NoRoute { .. }) => break e,
                _ => tokio::task::yield_now().await,
            }
        }
    })
    .await
    .unwrap();
    assert!(
        e.to_string().contains("no available harbor in cluster 1"),
        "{e}"
    );
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_harbor_in_use_moves_traffic_to_the_other() {
    let etcd = Etcd::start();
    let server_net = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client_net = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let members = vec![
        Member::new(a("1.1.1"), server_net.local_addr().unwrap().to_string()).with_export(true),
        Member::new(a("1.255.1"), free_port()),
        Member::new(a("1.255.2"), free_port()),
        Member::new(a("2.255.1"), free_port()),
        Member::new(a("2.2.1"), client_net.local_addr().unwrap().to_string()),
    ];
    etcd.list(PREFIX, &members).await;
    // The cluster-1 harbor traffic to 1.1.1 takes, by the rule every node routes by.
    let path = clustergo::route::route(a("2.2.1"), a("1.1.1"), &members).unwrap();
    let in_use = path
        .iter()
        .find_map(|hop| match hop {
            clustergo::route::Hop::Link { to, .. } if to.cluster() == 1 && to.is_harbor() => {
                Some(*to)
            }
            _ => None,
        })
        .unwrap();
    let mut harbors: Vec<(LogicAddr, HarborProc)> = ["1.255.1", "1.255.2", "2.255.1"]
        .into_iter()
        .map(|h| (a(h), start_harbor(&etcd, h)))
        .collect();

    let arrived = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let seen = arrived.clone();
    let server = node(&etcd, "1.1.1", server_net)
        .await
        .rpc("who", |ctx, _| async move {
            Ok::<_, HandlerError>(Bytes::from(format!("{} called", ctx.from())))
        })
        // Its slow handlers are still running when the test ends: a short grace.
        .config(
            NodeConfig::default()
                .secret(SECRET)
                .shutdown_grace(Duration::from_millis(300)),
        )
        .rpc("slow", move |_, _| {
            seen.add_permits(1);
            async {
                std::future::pending::<()>().await;
                Ok::<_, HandlerError>(Bytes::new())
            }
        })
        .build();
    start(&server).await;
    let client = node(&etcd, "2.2.1", client_net).await.build();
    start(&client).await;
    // Until the harbors see each other alive, there may be no route yet.
    tokio::time::timeout(WAIT, async {
        while client.call(a("1.1.1"), "who", Bytes::new()).await.is_err() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();

    // Calls in flight through the harbor in use when it is killed.
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .call_timeout(a("1.1.1"), "slow", Bytes::new(), Duration::from_secs(30))
                    .await
            })
        })
        .collect();
    let _all = tokio::time::timeout(WAIT, arrived.acquire_many(4))
        .await
        .unwrap();
    let i = harbors.iter().position(|(h, _)| *h == in_use).unwrap();
    let (_, mut victim) = harbors.remove(i);
    let killed = std::time::Instant::now();
    victim.0.kill().unwrap();
    let _ = victim.0.wait();
    for call in calls {
        let e = tokio::time::timeout(WAIT, call)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert!(matches!(&e, RpcError::PeerLost { .. }), "{e:?}");
    }
    // New calls go through the other harbor, within the failover bound.
    tokio::time::timeout(WAIT, async {
        loop {
            match client.call(a("1.1.1"), "who", Bytes::new()).await {
                Ok(reply) => break assert_eq!(&reply[..], b"2.2.1 called"),
                Err(_) => tokio::task::yield_now().await,
            }
        }
    })
    .await
    .unwrap();
    let failover = killed.elapsed();
    assert!(
        failover < Duration::from_secs(3),
        "failover took {failover:?}"
    );
    for _ in 0..20 {
        client.call(a("1.1.1"), "who", Bytes::new()).await.unwrap();
    }
    client.shutdown().await;
    server.shutdown().await;
}

/// A harbor process's relay policy (`[relay] deny`): calls from cluster 2 to cluster 1 are
/// refused at the harbor that applies it, at once and with the policy's reason; traffic the
/// other way still flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_harbor_process_refuses_the_cluster_pairs_its_policy_denies() {
    let (etcd, server_net, client_net) = two_clusters(true).await;
    let _h1 = start_harbor(&etcd, "1.255.1");
    let _h2 = start_harbor_with(
        &etcd,
        "2.255.1",
        Some("[relay]\ndeny = [\"2->1\"]\nmax_per_sec = 100000\n"),
    );
    let who = |b: clustergo::NodeBuilder| {
        b.rpc("who", |ctx, _| async move {
            Ok::<_, HandlerError>(Bytes::from(format!("{} called", ctx.from())))
        })
    };
    let server = who(node(&etcd, "1.1.1", server_net).await).build();
    start(&server).await;
    let client = who(node(&etcd, "2.2.1", client_net).await).build();
    start(&client).await;
    for (node, harbor) in [(&client, "2.255.1"), (&server, "1.255.1")] {
        assert!(
            node.wait_for_member(a(harbor), |m| m.is_some_and(|m| m.available), WAIT)
                .await
        );
    }

    let refused = call_when_routed(&client, a("1.1.1"), "who").await;
    match refused {
        Err(RpcError::NoRoute { to, reason }) => {
            assert_eq!(to, a("1.1.1"));
            assert!(
                reason.contains("refused by the relay policy: cluster 2 may not reach cluster 1")
                    && reason.contains("(at 2.255.1)"),
                "{reason}"
            );
        }
        other => panic!("wanted the policy's refusal, got {other:?}"),
    }
    // The other direction is not denied.
    let reply = call_when_routed(&server, a("2.2.1"), "who").await.unwrap();
    assert_eq!(&reply[..], b"1.1.1 called");
    server.shutdown().await;
    client.shutdown().await;
}

/// A harbor process stopped (SIGTERM) while calls it relayed are still being served: their
/// answers pass through it within its grace period, so every caller gets its answer. (Before,
/// the harbor closed its links as soon as its own handlers were done, and the answers on their
/// way were lost: the callers got `PeerLost`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_harbor_lets_the_answers_it_waits_for_pass() {
    let (etcd, server_net, client_net) = two_clusters(false).await;
    let _h1 = start_harbor(&etcd, "1.255.1");
    let mut h2 = start_harbor_with(&etcd, "2.255.1", Some("shutdown_grace_secs = 5\n"));
    let started = Arc::new(tokio::sync::Semaphore::new(0));
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let server = {
        let (started, release) = (started.clone(), release.clone());
        node(&etcd, "1.1.1", server_net)
            .await
            .rpc("slow", move |ctx, _| {
                let (started, release) = (started.clone(), release.clone());
                async move {
                    started.add_permits(1);
                    release.acquire().await.unwrap().forget();
                    Ok::<_, HandlerError>(Bytes::from(format!("{} answered", ctx.from())))
                }
            })
            .build()
    };
    start(&server).await;
    let client = node(&etcd, "2.2.1", client_net).await.build();
    start(&client).await;
    assert!(
        client
            .wait_for_member(a("2.255.1"), |m| m.is_some_and(|m| m.available), WAIT)
            .await
    );
    // Until 2.255.1 sees 1.255.1 alive, there is no route: a first call waits for it.
    release.add_permits(1);
    call_when_routed(&client, a("1.1.1"), "slow").await.unwrap();
    started.acquire_many(1).await.unwrap().forget();

    // Twenty calls in flight through 2.255.1, each held by the server.
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let client = client.clone();
        calls.spawn(async move {
            client
                .call_timeout(a("1.1.1"), "slow", Bytes::new(), Duration::from_secs(15))
                .await
        });
    }
    tokio::time::timeout(WAIT, started.acquire_many(20))
        .await
        .unwrap()
        .unwrap()
        .forget();
    let pid = h2.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    // The harbor leaves membership, then waits for the answers: let them come.
    assert!(
        client
            .wait_for_member(a("2.255.1"), |m| m.is_none_or(|m| !m.available), WAIT)
            .await
    );
    release.add_permits(20);
    while let Some(r) = calls.join_next().await {
        let r = r.unwrap();
        assert!(
            matches!(&r, Ok(b) if &b[..] == b"2.2.1 answered"),
            "a call in flight through the stopping harbor: {r:?}"
        );
    }
    let status = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(s) = h2.0.try_wait().unwrap() {
                return s;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    assert!(status.success(), "{status}");
    server.shutdown().await;
    client.shutdown().await;
}

/// Mutual TLS on links binds every node to its address, so a harbor configured with it may
/// start without a secret; TLS without client certificates may not; unreadable files are
/// named.
#[test]
fn mutual_tls_lets_a_harbor_start_without_a_secret() {
    let dir = std::env::temp_dir().join(format!("harbor-mtls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(dir.join("ca.crt"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["1.255.1.clustergo".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.join("node.crt"), leaf.pem()).unwrap();
    std::fs::write(dir.join("node.key"), key.serialize_pem()).unwrap();
    let run = |mutual: bool, key_file: &str| {
        let config = dir.join(format!("harbor-{mutual}-{key_file}.toml"));
        std::fs::write(
            &config,
            format!(
                "[mesh_tls]\nca = \"{0}/ca.crt\"\ncert = \"{0}/node.crt\"\nkey = \"{0}/{key_file}\"\nmutual = {mutual}\n",
                dir.display()
            ),
        )
        .unwrap();
        let out = harbor()
            .env_remove("CLUSTERGO_SECRET")
            .args(["--addr", "1.255.1", "--etcd", "http://127.0.0.1:1"])
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Gets past its configuration (and then finds no etcd there), with no dev-secret warning.
    let (code, stderr) = run(true, "node.key");
    assert_eq!(code, 1, "{stderr}");
    assert!(!stderr.contains("no cluster secret"), "{stderr}");
    assert!(!stderr.contains("public development secret"), "{stderr}");
    let (code, stderr) = run(false, "node.key");
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("no cluster secret"), "{stderr}");
    let (code, stderr) = run(true, "missing.key");
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("[mesh_tls]: cannot read the TLS key") && stderr.contains("missing.key"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A real Prometheus server scrapes two running harbors' admin endpoints: it finds them up,
/// and the series an operator asks for first carry what the harbors did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_running_harbors() {
    let (etcd, server_net, client_net) = two_clusters(false).await;
    let admin = Some("admin_listen = \"127.0.0.1:0\"\n");
    let h1 = start_harbor_with(&etcd, "1.255.1", admin);
    let h2 = start_harbor_with(&etcd, "2.255.1", admin);
    let admin_of = |h: &HarborProc| -> String {
        h.1.split("admin on ")
            .nth(1)
            .unwrap_or_else(|| panic!("no admin address in {:?}", h.1))
            .trim()
            .to_owned()
    };
    let targets = [admin_of(&h1), admin_of(&h2)];
    let server = node(&etcd, "1.1.1", server_net)
        .await
        .rpc("who", |ctx, _| async move {
            Ok::<_, HandlerError>(Bytes::from(format!("{} called", ctx.from())))
        })
        .build();
    start(&server).await;
    let client = node(&etcd, "2.2.1", client_net).await.build();
    start(&client).await;
    call_when_routed(&client, a("1.1.1"), "who").await.unwrap();
    for _ in 0..9 {
        client.call(a("1.1.1"), "who", Bytes::new()).await.unwrap();
    }
    let prom = prometheus_server::Prometheus::start(etcd_server::free_port(), &targets);
    let wait = Duration::from_secs(20);
    tokio::task::spawn_blocking(move || {
        // What each harbor serves passes Prometheus's own linter.
        for t in &targets {
            let (status, text) = prometheus_server::http_get(t, "/metrics").unwrap();
            assert_eq!(status, 200, "{text}");
            prometheus_server::promtool_check(&text);
        }
        prom.wait_for("sum(up)", wait, |v| v == 2.0);
        // Each call and its answer crossed both harbors: ten each way, at least.
        for h in ["1.255.1", "2.255.1"] {
            let q = format!("clustergo_envelopes_forwarded_total{{node=\"{h}\"}}");
            prom.wait_for(&q, wait, |v| v >= 20.0);
            let q = format!("clustergo_links_up{{node=\"{h}\"}}");
            prom.wait_for(&q, wait, |v| v >= 2.0);
            let q = format!("clustergo_node_ready{{node=\"{h}\"}}");
            prom.wait_for(&q, wait, |v| v == 1.0);
            let q = format!("clustergo_members{{node=\"{h}\",state=\"available\"}}");
            prom.wait_for(&q, wait, |v| v >= 3.0);
            let q = format!("clustergo_membership_leases_held{{node=\"{h}\"}}");
            prom.wait_for(&q, wait, |v| v == 1.0);
        }
        // Relayed by next hop: 2.255.1 sent the ten requests on to 1.255.1, and 1.255.1 the
        // ten answers back to 2.255.1.
        for (h, next) in [("2.255.1", "1.255.1"), ("1.255.1", "2.255.1")] {
            let q = format!("clustergo_relayed_envelopes_total{{node=\"{h}\",peer=\"{next}\"}}");
            prom.wait_for(&q, wait, |v| v >= 10.0);
        }
    })
    .await
    .unwrap();
    client.shutdown().await;
    server.shutdown().await;
}

fn traced_node() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/traced_node");
    assert!(
        bin.exists(),
        "example traced_node not built at {}",
        bin.display()
    );
    bin
}

/// One call from 2.1.1 to 1.1.1 through harbors 2.255.1 and 1.255.1, four processes each
/// exporting its spans to a real OTLP receiver: one trace, caller -> harbor -> harbor ->
/// server, each span the child of the one before, the server's inside the caller's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_call_across_harbors_is_one_trace() {
    let (receiver, endpoint, otlp) = otlp::Receiver::start(etcd_server::free_port());
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("CLUSTERGO_SECRET", SECRET),
    ];

    let etcd = Etcd::start();
    let members = [
        Member::new(a("1.1.1"), free_port()).with_export(true),
        Member::new(a("1.255.1"), free_port()),
        Member::new(a("2.255.1"), free_port()),
        Member::new(a("2.1.1"), free_port()),
    ];
    etcd.list(PREFIX, &members).await;
    let _h1 = start_harbor_env(&etcd, "1.255.1", None, &env);
    let _h2 = start_harbor_env(&etcd, "2.255.1", None, &env);
    let node = |addr: &str, role: &[&str]| {
        let mut cmd = Command::new(traced_node());
        cmd.args([etcd.endpoint.as_str(), PREFIX, addr])
            .args(role)
            .envs(env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        cmd
    };
    let mut served = HarborProc(node("1.1.1", &["serve"]).spawn().unwrap(), String::new());
    let mut ready = String::new();
    BufReader::new(served.0.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "READY");
    let mut call = node("2.1.1", &["call", "1.1.1"]);
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || call.output().unwrap()),
    )
    .await
    .expect("the caller finished")
    .unwrap();
    assert!(
        out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("OK traced")
            && String::from_utf8_lossy(&out.stdout).contains("STREAM hi"),
        "caller: {out:?}"
    );
    // The server flushes its spans when it stops (stdin closed).
    drop(served.0.stdin.take());
    let status = tokio::task::spawn_blocking(move || served.0.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "server exited {status}");

    // Harbors export every 100 ms: wait for the four spans of the request's path.
    let spans = receiver
        .wait_for(WAIT * 2, |got| {
            let client = got.iter().find(|(svc, s)| {
                svc == "traced-2.1.1"
                    && s.name == "echo"
                    && s.status.as_ref().is_none_or(|st| st.code != 2)
            });
            if let Some((_, client)) = client {
                let child_of = |svc: &str, parent: &[u8]| {
                    got.iter()
                        .find(|(s, span)| s == svc && span.parent_span_id == parent)
                        .map(|(_, span)| span.clone())
                };
                let h2 = child_of("harbor-2.255.1", &client.span_id);
                let h1 = h2
                    .as_ref()
                    .and_then(|h2| child_of("harbor-1.255.1", &h2.span_id));
                let server = h1
                    .as_ref()
                    .and_then(|h1| child_of("traced-1.1.1", &h1.span_id));
                // The stream open, traced the same way from the caller's span around it.
                let opened = got
                    .iter()
                    .find(|(svc, s)| svc == "traced-2.1.1" && s.name == "open.demo");
                let accepted = opened.and_then(|(_, open)| {
                    let h2 = child_of("harbor-2.255.1", &open.span_id)?;
                    let h1 = child_of("harbor-1.255.1", &h2.span_id)?;
                    child_of("traced-1.1.1", &h1.span_id).filter(|s| s.name == "stream.accept")
                });
                if let (Some(h2), Some(h1), Some(server), Some(_)) = (h2, h1, server, accepted) {
                    return Some((client.clone(), h2, h1, server));
                }
            }
            None
        })
        .await;
    let Some((client, h2, h1, server)) = spans else {
        let got = receiver.spans();
        let names: Vec<_> = got
            .iter()
            .map(|(svc, s)| {
                format!(
                    "{svc}:{} id={:x?} parent={:x?}",
                    s.name, s.span_id, s.parent_span_id
                )
            })
            .collect();
        panic!("no caller -> harbor -> harbor -> server chain among {names:#?}");
    };
    // One trace; kinds and attributes after the OpenTelemetry RPC conventions.
    for s in [&h2, &h1, &server] {
        assert_eq!(s.trace_id, client.trace_id);
    }
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    assert_eq!(client.kind, SpanKind::Client as i32);
    assert_eq!(server.kind, SpanKind::Server as i32);
    assert_eq!(otlp::attr(&client, "rpc.system"), Some("clustergo"));
    assert_eq!(otlp::attr(&client, "rpc.method"), Some("echo"));
    assert_eq!(otlp::attr(&client, "clustergo.to"), Some("1.1.1"));
    assert_eq!(otlp::attr(&server, "clustergo.from"), Some("2.1.1"));
    assert_eq!(otlp::attr(&h2, "clustergo.harbor"), Some("2.255.1"));
    assert_eq!(otlp::attr(&h1, "clustergo.harbor"), Some("1.255.1"));
    // Timings: the server span lies inside the caller's.
    assert!(
        client.start_time_unix_nano <= server.start_time_unix_nano
            && server.end_time_unix_nano <= client.end_time_unix_nano,
        "client {}..{}, server {}..{}",
        client.start_time_unix_nano,
        client.end_time_unix_nano,
        server.start_time_unix_nano,
        server.end_time_unix_nano
    );
    otlp.abort();
}
