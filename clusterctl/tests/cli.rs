//! `clusterctl` against a real etcd, with real nodes watching.

#[path = "../../tests/support/etcd.rs"]
mod etcd_server;

use std::process::Command;
use std::time::{Duration, Instant};

use clustergo::membership::parse_members;
use clustergo::{
    EtcdDiscovery, EtcdOptions, HandlerError, LogicAddr, Member, Node, NodeConfig, SelectError,
};
use etcd_server::Etcd;

const PREFIX: &str = "/cg-cli";
const WAIT: Duration = Duration::from_secs(10);

fn a(s: &str) -> LogicAddr {
    s.parse().unwrap()
}

/// Runs clusterctl; returns (success, stdout, stderr).
fn ctl(etcd: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_clusterctl"))
        .args([
            "--endpoints",
            etcd,
            "--prefix",
            PREFIX,
            "--timeout-ms",
            "1500",
        ])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(etcd: &str, args: &[&str]) -> String {
    let (success, out, err) = ctl(etcd, args);
    assert!(success, "clusterctl {args:?} failed: {err}");
    out
}

fn free_net_addr() -> (std::net::TcpListener, String) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let n = l.local_addr().unwrap().to_string();
    (l, n)
}

async fn node(etcd: &Etcd, addr: &str, listener: std::net::TcpListener) -> Node {
    let discovery = EtcdDiscovery::connect(
        [etcd.endpoint.clone()],
        PREFIX,
        EtcdOptions::default().lease_ttl(Duration::from_secs(2)),
    );
    let node = Node::builder(a(addr))
        .discovery(discovery)
        .config(NodeConfig::default().secret("cli-test"))
        .listener(listener)
        .rpc("echo", |_, p| async move { Ok::<_, HandlerError>(p) })
        .build();
    tokio::time::timeout(WAIT, node.start())
        .await
        .unwrap()
        .unwrap();
    node
}

/// Waits for `check` on `watcher`'s view of `addr`, which must hold within 1 s of `started`
/// (when the clusterctl command was launched, process start included).
async fn reaches(
    watcher: &Node,
    addr: LogicAddr,
    what: &str,
    started: Instant,
    check: impl Fn(Option<&Member>) -> bool,
) {
    assert!(
        watcher.wait_for_member(addr, check, WAIT).await,
        "{what} never reached the node"
    );
    let took = started.elapsed();
    eprintln!("clusterctl {what} -> node view: {took:?} from launching the command");
    assert!(took < Duration::from_secs(1), "{what}: {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_changes_reach_running_nodes_within_a_second() {
    let etcd = Etcd::start();
    let ep = etcd.endpoint.as_str();
    let (l1, n1) = free_net_addr();
    let (l2, n2) = free_net_addr();
    ok(ep, &["members", "add", "1.1.1", &n1]);
    let watcher = node(&etcd, "1.1.1", l1).await;

    let t = Instant::now();
    ok(ep, &["members", "add", "1.2.1", &n2]);
    reaches(&watcher, a("1.2.1"), "members add", t, |m| m.is_some()).await;
    let game = node(&etcd, "1.2.1", l2).await;
    assert!(
        watcher
            .wait_for_member(game.addr(), |m| m.is_some_and(|m| m.available), WAIT)
            .await
    );
    assert_eq!(watcher.get_addr_by_type(2), Ok(game.addr()));

    let list = ok(ep, &["members", "list"]);
    assert!(list.starts_with("ADDRESS"), "{list}");
    let row = list.lines().find(|l| l.starts_with("1.2.1")).unwrap();
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>(),
        ["1.2.1", &n2, "no", "yes", "yes"]
    );

    let t = Instant::now();
    ok(ep, &["members", "set", "1.2.1", "--available=false"]);
    reaches(
        &watcher,
        game.addr(),
        "members set --available=false",
        t,
        |m| m.is_some_and(|m| !m.available),
    )
    .await;
    assert_eq!(
        watcher.get_addr_by_type(2),
        Err(SelectError::NoneAvailable(2))
    );
    let t = Instant::now();
    ok(ep, &["members", "set", "1.2.1", "--available=true"]);
    reaches(
        &watcher,
        game.addr(),
        "members set --available=true",
        t,
        |m| m.is_some_and(|m| m.available),
    )
    .await;
    assert_eq!(watcher.get_addr_by_type(2), Ok(game.addr()));
    let t = Instant::now();
    ok(ep, &["members", "set", "1.2.1", "--export=true"]);
    reaches(&watcher, game.addr(), "members set --export=true", t, |m| {
        m.is_some_and(|m| m.export)
    })
    .await;
    // Calls still work between the two.
    assert!(
        watcher
            .call(game.addr(), "echo", clustergo::Bytes::new())
            .await
            .is_ok()
    );

    let t = Instant::now();
    ok(
        ep,
        &["members", "update", "1.2.1", "--net-addr", "127.0.0.1:9"],
    );
    reaches(&watcher, game.addr(), "members update --net-addr", t, |m| {
        m.is_some_and(|m| m.net_addr == "127.0.0.1:9")
    })
    .await;
    // Its own address moved: the game node shut itself down.
    tokio::time::timeout(WAIT, game.closed()).await.unwrap();

    let t = Instant::now();
    ok(ep, &["members", "remove", "1.2.1"]);
    reaches(&watcher, a("1.2.1"), "members remove", t, |m| m.is_none()).await;
    watcher.shutdown().await;
}

#[tokio::test]
async fn clear_errors() {
    let mut etcd = Etcd::start();
    let ep = etcd.endpoint.clone();
    let (success, _, err) = ctl(&ep, &["members", "add", "0.1.1", "127.0.0.1:1"]);
    assert!(!success);
    assert!(err.contains("cluster 0 is out of range 1..=4095"), "{err}");
    let (success, _, err) = ctl(&ep, &["members", "add", "1.1.1", "nowhere"]);
    assert!(
        !success && err.contains("\"nowhere\" is not host:port"),
        "{err}"
    );
    let (success, _, err) = ctl(&ep, &["members", "remove", "1.2.9"]);
    assert!(
        !success && err.contains("member 1.2.9 is not listed under /cg-cli"),
        "{err}"
    );
    let (success, _, err) = ctl(&ep, &["members", "set", "1.2.9", "--export=true"]);
    assert!(
        !success && err.contains("member 1.2.9 is not listed"),
        "{err}"
    );
    ok(&ep, &["members", "add", "1.1.1", "127.0.0.1:1"]);
    let (success, _, err) = ctl(&ep, &["members", "add", "1.1.1", "127.0.0.1:2"]);
    assert!(!success && err.contains("already listed"), "{err}");
    etcd.stop();
    let (success, _, err) = ctl(&ep, &["members", "list"]);
    assert!(!success);
    assert!(
        err.contains(&format!("etcd at {ep}")) || err.contains("cannot reach etcd"),
        "{err}"
    );
}

#[tokio::test]
async fn import_export_and_route() {
    let etcd = Etcd::start();
    let ep = etcd.endpoint.as_str();
    let dir = std::env::temp_dir().join(format!("cg-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("members.toml");
    std::fs::write(
        &file,
        r#"
[[member]]
addr = "1.1.1"
net_addr = "127.0.0.1:7001"
[[member]]
addr = "1.1.2"
net_addr = "127.0.0.1:7002"
[[member]]
addr = "1.255.1"
net_addr = "127.0.0.1:7003"
[[member]]
addr = "2.1.1"
net_addr = "127.0.0.1:7004"
export = true
[[member]]
addr = "2.255.1"
net_addr = "127.0.0.1:7005"
[[member]]
addr = "3.1.1"
net_addr = "127.0.0.1:7006"
"#,
    )
    .unwrap();
    let out = ok(ep, &["members", "import", file.to_str().unwrap()]);
    assert!(out.contains("imported 6 members"), "{out}");
    let exported = ok(ep, &["members", "export"]);
    let original = parse_members(&std::fs::read_to_string(&file).unwrap(), "f").unwrap();
    assert_eq!(parse_members(&exported, "export").unwrap(), original);

    // Harbors count only while alive: mark both alive, as their running nodes would.
    let mut c = etcd_client::Client::connect([ep], None).await.unwrap();
    for h in ["1.255.1", "2.255.1"] {
        c.put(format!("{PREFIX}/alive/{h}"), "1", None)
            .await
            .unwrap();
    }
    let same = ok(ep, &["route", "1.1.1", "1.1.2"]);
    assert_eq!(
        same,
        "route 1.1.1 -> 1.1.2: direct\n  1. 1.1.1 -> 1.1.2 (127.0.0.1:7002)\n"
    );
    let cross = ok(ep, &["route", "1.1.1", "2.1.1"]);
    assert_eq!(
        cross,
        "route 1.1.1 -> 2.1.1: through harbors\n\
         \x20 1. 1.1.1 -> harbor 1.255.1 (127.0.0.1:7003)\n\
         \x20 2. harbor 1.255.1 -> harbor 2.255.1 (127.0.0.1:7005)\n\
         \x20 3. harbor 2.255.1 -> 2.1.1 (127.0.0.1:7004)\n"
    );
    let (success, _, err) = ctl(ep, &["route", "1.1.1", "3.1.1"]);
    assert!(
        !success && err.contains("no route: no available harbor in cluster 3"),
        "{err}"
    );
    // A harbor that is configured but not alive does not count.
    c.delete(format!("{PREFIX}/alive/2.255.1"), None)
        .await
        .unwrap();
    let (success, _, err) = ctl(ep, &["route", "1.1.1", "2.1.1"]);
    assert!(
        !success && err.contains("no available harbor in cluster 2"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_the_nodes_streams_and_undrain_brings_it_back() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let etcd = Etcd::start();
    let ep = etcd.endpoint.clone();
    let (l1, n1) = free_net_addr();
    let (l2, n2) = free_net_addr();
    ok(&ep, &["members", "add", "1.1.1", &n1]);
    ok(&ep, &["members", "add", "1.2.1", &n2]);
    let caller = node(&etcd, "1.1.1", l1).await;
    let discovery = EtcdDiscovery::connect(
        [etcd.endpoint.clone()],
        PREFIX,
        EtcdOptions::default().lease_ttl(Duration::from_secs(2)),
    );
    let server = Node::builder(a("1.2.1"))
        .discovery(discovery)
        .config(NodeConfig::default().secret("cli-test"))
        .listener(l2)
        .on_stream(|mut stream| async move {
            let mut buf = vec![0; 1024];
            while let Ok(n @ 1..) = stream.read(&mut buf).await {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            let _ = stream.shutdown().await;
        })
        .build();
    tokio::time::timeout(WAIT, server.start())
        .await
        .unwrap()
        .unwrap();
    assert!(
        caller
            .wait_for_member(a("1.2.1"), |m| m.is_some_and(|m| m.available), WAIT)
            .await
    );
    // A client's stream is open: the drain cannot finish.
    let mut stream = caller.open_stream(a("1.2.1")).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut echo = [0; 4];
    stream.read_exact(&mut echo).await.unwrap();
    let ctl_async = |args: Vec<&'static str>| {
        let ep = ep.clone();
        tokio::task::spawn_blocking(move || ctl(&ep, &args))
    };
    let (success, out, err) = ctl_async(vec!["drain", "1.2.1", "--timeout-secs", "4"])
        .await
        .unwrap();
    assert!(!success, "drain succeeded with a stream open: {out}");
    assert!(
        out.contains("draining 1.2.1: 1 streams (clients), 0 calls in flight"),
        "no progress shown: {out}"
    );
    assert!(err.contains("not idle after 4 s: 1 streams"), "{err}");
    // Drained means not picked, while what is under way goes on.
    assert!(
        caller
            .wait_for_member(a("1.2.1"), |m| m.is_some_and(|m| !m.available), WAIT)
            .await
    );
    assert_eq!(
        caller.get_addr_by_type(2),
        Err(SelectError::NoneAvailable(2))
    );
    stream.write_all(b"pong").await.unwrap();
    stream.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"pong");
    // The server reads its readiness from its own view of membership, which its own watch
    // brings (after the caller's, or before): awaited, then asserted.
    assert!(
        server
            .wait_for_member(a("1.2.1"), |m| m.is_some_and(|m| !m.available), WAIT)
            .await
    );
    assert!(server.readiness().is_err());
    // The client leaves: the next drain finishes.
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    drop(stream);
    let started = Instant::now();
    let (success, out, err) = ctl_async(vec!["drain", "1.2.1", "--timeout-secs", "10"])
        .await
        .unwrap();
    assert!(success, "drain failed: {err}");
    assert!(out.contains("1.2.1 drained: idle after"), "{out}");
    eprintln!("drain with nothing open took {:?}", started.elapsed());
    // Undrained: picked again.
    let (success, _, err) = ctl_async(vec!["undrain", "1.2.1"]).await.unwrap();
    assert!(success, "{err}");
    assert!(
        caller
            .wait_for_member(a("1.2.1"), |m| m.is_some_and(|m| m.available), WAIT)
            .await
    );
    assert_eq!(caller.get_addr_by_type(2), Ok(a("1.2.1")));
    assert!(
        server
            .wait_for_member(a("1.2.1"), |m| m.is_some_and(|m| m.available), WAIT)
            .await
    );
    assert!(server.readiness().is_ok());
    // A node that is not running has nothing to wait for.
    server.shutdown().await;
    let (success, out, err) = ctl_async(vec!["drain", "1.2.1"]).await.unwrap();
    assert!(success, "{err}");
    assert!(out.contains("is not running"), "{out}");
    caller.shutdown().await;
}
