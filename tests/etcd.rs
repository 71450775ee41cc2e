//! Membership in a real etcd: snapshot, watch, liveness, outages, malformed values.
// Both harness modules carry `ports`; each copy checks a port free when it hands it out.
#![allow(clippy::duplicate_mod)]

#[path = "support/etcd.rs"]
mod etcd_server;
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clustergo::membership::{alive_key, encode_member, member_key};
use clustergo::{
    Discovery, EtcdDiscovery, EtcdOptions, HandlerError, LogicAddr, Member, MembershipEvent, Node,
    SelectError, StartError,
};
use etcd_client::{Client, GetOptions, PutOptions};
use etcd_server::Etcd;
use support::*;
use tokio_stream::StreamExt;

const PREFIX: &str = "/cg-test";

fn options() -> EtcdOptions {
    EtcdOptions::default()
        .lease_ttl(Duration::from_secs(2))
        .request_timeout(Duration::from_secs(2))
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
}

fn discovery(etcd: &Etcd) -> EtcdDiscovery {
    EtcdDiscovery::connect([etcd.endpoint.clone()], PREFIX, options())
}

async fn client(etcd: &Etcd) -> Client {
    Client::connect([etcd.endpoint.clone()], None)
        .await
        .unwrap()
}

async fn put_member(c: &mut Client, m: &Member) {
    c.put(member_key(PREFIX, m.addr), encode_member(m), None)
        .await
        .unwrap();
}

/// Marks `addr` alive on a lease of its own, as a running node would.
async fn put_alive(c: &mut Client, addr: LogicAddr) -> i64 {
    let lease = c.lease_grant(30, None).await.unwrap().id();
    c.put(
        alive_key(PREFIX, addr),
        "1",
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
    lease
}

/// The `echo_server` example (built with these tests) and its membership argument for `etcd`.
fn echo_server(etcd: &Etcd) -> (std::path::PathBuf, String) {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/echo_server");
    let spec = format!(
        "etcd://{}{PREFIX}",
        etcd.endpoint.trim_start_matches("http://")
    );
    (bin, spec)
}

/// Binds a port for `addr`, lists it in etcd, and returns a started node serving "echo".
async fn start_node(etcd: &Etcd, c: &mut Client, addr: &str) -> Node {
    let (l, net) = bind();
    put_member(c, &Member::new(a(addr), net)).await;
    let node = Node::builder(a(addr))
        .discovery(discovery(etcd))
        .config(test_config())
        .listener(l)
        .rpc("echo", |_, p| async move { Ok::<_, HandlerError>(p) })
        .build();
    within(node.start()).await.unwrap();
    node
}

#[tokio::test]
async fn an_empty_store_gives_an_empty_snapshot_and_an_unlisted_node_does_not_start() {
    let etcd = Etcd::start();
    let first = within(discovery(&etcd).subscribe().next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, MembershipEvent::Snapshot(vec![]));
    let node = Node::builder(a("1.1.1"))
        .discovery(discovery(&etcd))
        .config(test_config())
        .build();
    let e = within(node.start()).await.unwrap_err();
    assert!(matches!(e, StartError::NotInMembership(_)), "{e}");
}

#[tokio::test]
async fn an_unreachable_etcd_fails_start_with_a_clear_error() {
    let mut etcd = Etcd::start();
    etcd.stop();
    let node = Node::builder(a("1.1.1"))
        .discovery(discovery(&etcd))
        .config(test_config())
        .build();
    let e = within(node.start()).await.unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("membership source etcd http://127.0.0.1:"),
        "{text}"
    );
}

#[tokio::test]
async fn changes_reach_a_running_node_within_a_second() {
    init_tracing();
    let etcd = Etcd::start();
    let mut c = client(&etcd).await;
    let me = start_node(&etcd, &mut c, "1.1.1").await;
    // Its own lease makes it alive (and so available) in etcd.
    assert!(
        me.wait_for_member(me.addr(), |m| m.is_some_and(|m| m.available), WAIT)
            .await
    );

    let b = a("1.2.1");
    let timed = |what: &'static str, started: Instant| {
        let took = started.elapsed();
        eprintln!("etcd change -> node view: {what}: {took:?}");
        assert!(took < Duration::from_secs(1), "{what} took {took:?}");
    };
    // Add: listed, but not alive, so not picked.
    let t = Instant::now();
    put_member(&mut c, &Member::new(b, "127.0.0.1:9")).await;
    assert!(me.wait_for_member(b, |m| m.is_some(), WAIT).await);
    timed("add", t);
    assert_eq!(me.get_addr_by_type(2), Err(SelectError::NoneAvailable(2)));
    // Alive: picked.
    let t = Instant::now();
    let lease = put_alive(&mut c, b).await;
    assert!(
        me.wait_for_member(b, |m| m.is_some_and(|m| m.available), WAIT)
            .await
    );
    timed("alive", t);
    assert_eq!(me.get_addr_by_type(2), Ok(b));
    // Set available=false: not picked.
    let t = Instant::now();
    put_member(&mut c, &Member::new(b, "127.0.0.1:9").with_available(false)).await;
    assert!(
        me.wait_for_member(b, |m| m.is_some_and(|m| !m.available), WAIT)
            .await
    );
    timed("set available=false", t);
    assert_eq!(me.get_addr_by_type(2), Err(SelectError::NoneAvailable(2)));
    // Update the network address and export.
    let t = Instant::now();
    put_member(&mut c, &Member::new(b, "127.0.0.1:10").with_export(true)).await;
    assert!(
        me.wait_for_member(
            b,
            |m| m.is_some_and(|m| m.export && m.net_addr.ends_with(":10")),
            WAIT
        )
        .await
    );
    timed("update", t);
    // The lease ends: not available any more.
    let t = Instant::now();
    c.lease_revoke(lease).await.unwrap();
    assert!(
        me.wait_for_member(b, |m| m.is_some_and(|m| !m.available), WAIT)
            .await
    );
    timed("lease revoked", t);
    // Remove.
    let t = Instant::now();
    c.delete(member_key(PREFIX, b), None).await.unwrap();
    assert!(me.wait_for_member(b, |m| m.is_none(), WAIT).await);
    timed("remove", t);
    // Removing the node's own entry shuts it down.
    c.delete(member_key(PREFIX, me.addr()), None).await.unwrap();
    within(me.closed()).await;
}

#[tokio::test]
async fn graceful_shutdown_revokes_the_lease_at_once() {
    let etcd = Etcd::start();
    let mut c = client(&etcd).await;
    // One discovery shared by both nodes (as MemoryDiscovery is in the quickstart), with a
    // lease far longer than the test: only a revoke can clear the key in time, and only the
    // leaving node's.
    let shared = EtcdDiscovery::connect(
        [etcd.endpoint.clone()],
        PREFIX,
        options().lease_ttl(Duration::from_secs(30)),
    );
    let start = |addr: &'static str| {
        let shared = shared.clone();
        let (l, net) = bind();
        let mut c = c.clone();
        async move {
            put_member(&mut c, &Member::new(a(addr), net)).await;
            let node = Node::builder(a(addr))
                .discovery(shared)
                .config(test_config())
                .listener(l)
                .build();
            within(node.start()).await.unwrap();
            node
        }
    };
    let me = start("1.1.1").await;
    let other = start("1.2.1").await;
    assert!(
        me.wait_for_member(me.addr(), |m| m.is_some_and(|m| m.available), WAIT)
            .await
    );
    assert!(
        me.wait_for_member(other.addr(), |m| m.is_some_and(|m| m.available), WAIT)
            .await
    );
    let t = Instant::now();
    other.shutdown().await;
    assert!(
        me.wait_for_member(other.addr(), |m| m.is_some_and(|m| !m.available), WAIT)
            .await
    );
    // Well inside the 2 s lease TTL: the lease was revoked, not left to expire.
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    let alive = c.get(alive_key(PREFIX, other.addr()), None).await.unwrap();
    assert!(alive.kvs().is_empty());
    // The node that stayed is still alive.
    let mine = c.get(alive_key(PREFIX, me.addr()), None).await.unwrap();
    assert_eq!(mine.kvs().len(), 1);
    assert!(me.member(me.addr()).unwrap().available);
}

#[tokio::test]
async fn a_down_harbors_center_does_not_keep_nodes_from_starting() {
    let etcd = Etcd::start();
    let mut c = client(&etcd).await;
    let (l, net) = bind();
    put_member(&mut c, &Member::new(a("1.255.1"), net)).await;
    // Nothing listens on the center's port.
    let (dead, dead_addr) = bind();
    drop(dead);
    let node = Node::builder(a("1.255.1"))
        .discovery(
            discovery(&etcd).with_harbors_center([format!("http://{dead_addr}")], "/nowhere"),
        )
        .config(test_config())
        .listener(l)
        .build();
    within(node.start()).await.unwrap();
    assert!(
        node.wait_for_member(node.addr(), |m| m.is_some_and(|m| m.available), WAIT)
            .await
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_malformed_value_is_skipped_and_hides_nothing() {
    init_tracing();
    let etcd = Etcd::start();
    let mut c = client(&etcd).await;
    c.put(member_key(PREFIX, a("1.3.1")), "{not json", None)
        .await
        .unwrap();
    c.put(
        member_key(PREFIX, a("1.3.2")),
        encode_member(&Member::new(a("1.3.3"), "127.0.0.1:1")),
        None,
    )
    .await
    .unwrap();
    put_member(&mut c, &Member::new(a("1.3.4"), "127.0.0.1:2")).await;
    let me = start_node(&etcd, &mut c, "1.1.1").await;
    assert!(me.member(a("1.3.4")).is_some());
    assert!(me.member(a("1.3.1")).is_none());
    assert!(me.member(a("1.3.2")).is_none() && me.member(a("1.3.3")).is_none());
    // A value that turns bad later is dropped the same way; the rest stays.
    c.put(member_key(PREFIX, a("1.3.4")), "[]", None)
        .await
        .unwrap();
    assert!(me.wait_for_member(a("1.3.4"), |m| m.is_none(), WAIT).await);
    assert!(me.member(me.addr()).is_some());
}

#[tokio::test]
async fn the_view_follows_500_rapid_changes() {
    let etcd = Etcd::start();
    let mut c = client(&etcd).await;
    let me = start_node(&etcd, &mut c, "1.1.1").await;
    for i in 0..500u16 {
        let addr = LogicAddr::new(1, 3, i % 50).unwrap();
        match i % 5 {
            4 => {
                c.delete(member_key(PREFIX, addr), None).await.unwrap();
            }
            k => {
                put_member(
                    &mut c,
                    &Member::new(addr, format!("127.0.0.1:{}", 1000 + i)).with_export(k == 2),
                )
                .await
            }
        }
    }
    // The final state in etcd, member by member, is what the node sees.
    let resp = c
        .get(
            format!("{PREFIX}/members/"),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let mut want: Vec<Member> = resp
        .kvs()
        .iter()
        .map(|kv| serde_json::from_slice(kv.value()).unwrap())
        .filter(|m: &Member| m.addr != me.addr())
        .collect();
    want.sort_by_key(|m| m.addr);
    for i in 0..50u16 {
        let addr = LogicAddr::new(1, 3, i).unwrap();
        let expected = want.iter().find(|m| m.addr == addr).cloned();
        let ok = me
            .wait_for_member(
                addr,
                |m| {
                    m.map(|m| (m.net_addr.clone(), m.export))
                        == expected.as_ref().map(|e| (e.net_addr.clone(), e.export))
                },
                WAIT,
            )
            .await;
        assert!(
            ok,
            "{addr}: node has {:?}, etcd has {expected:?}",
            me.member(addr)
        );
    }
}

#[tokio::test]
async fn nodes_keep_talking_through_an_etcd_outage() {
    init_tracing();
    let mut etcd = Etcd::start();
    let mut c = client(&etcd).await;
    let x = start_node(&etcd, &mut c, "1.1.1").await;
    let y = start_node(&etcd, &mut c, "1.2.1").await;
    // x started before y was listed: wait for the watch to bring y in.
    assert!(x.wait_for_member(y.addr(), |m| m.is_some(), WAIT).await);
    let r = within(x.call(y.addr(), "echo", Bytes::from_static(b"before"))).await;
    assert_eq!(r, Ok(Bytes::from_static(b"before")));
    etcd.stop();
    for _ in 0..20 {
        let r = within(x.call(y.addr(), "echo", Bytes::from_static(b"during"))).await;
        assert_eq!(r, Ok(Bytes::from_static(b"during")));
        let r = within(y.call(x.addr(), "echo", Bytes::from_static(b"back"))).await;
        assert_eq!(r, Ok(Bytes::from_static(b"back")));
    }
    // Both still see each other.
    assert!(x.member(y.addr()).is_some() && y.member(x.addr()).is_some());
    etcd.restart();
    let mut c = client(&etcd).await;
    put_member(&mut c, &Member::new(a("1.3.1"), "127.0.0.1:7")).await;
    for n in [&x, &y] {
        assert!(
            n.wait_for_member(a("1.3.1"), |m| m.is_some(), WAIT).await,
            "{}",
            n.addr()
        );
    }
    assert!(within(x.call(y.addr(), "echo", Bytes::new())).await.is_ok());
}

#[tokio::test]
async fn a_killed_node_stops_being_picked_within_the_lease_ttl_and_returns_when_restarted() {
    let etcd = Etcd::start();
    let mut c = client(&etcd).await;
    let me = start_node(&etcd, &mut c, "1.1.1").await;
    // The server runs as a separate process, so it can be killed without any goodbye.
    let net = format!("127.0.0.1:{}", etcd_server::free_port());
    let server = a("1.2.1");
    put_member(&mut c, &Member::new(server, net)).await;
    let (bin, spec) = echo_server(&etcd);
    let spawn = || {
        Command::new(&bin)
            .args([&spec, "1.2.1"])
            .env("CLUSTERGO_LEASE_TTL_SECS", "2")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut child = spawn();
    assert!(
        me.wait_for_member(server, |m| m.is_some_and(|m| m.available), WAIT)
            .await
    );
    assert_eq!(me.get_addr_by_type(2), Ok(server));
    let killed = Instant::now();
    child.kill().unwrap(); // SIGKILL, by our own child's handle
    child.wait().unwrap();
    assert!(
        me.wait_for_member(server, |m| m.is_some_and(|m| !m.available), WAIT)
            .await
    );
    let took = killed.elapsed();
    eprintln!("killed node unavailable after {took:?} (lease TTL 2 s)");
    assert!(took <= Duration::from_millis(3500), "{took:?}");
    assert_eq!(me.get_addr_by_type(2), Err(SelectError::NoneAvailable(2)));
    // Restarted: alive again.
    let mut child = spawn();
    assert!(
        me.wait_for_member(server, |m| m.is_some_and(|m| m.available), WAIT)
            .await
    );
    assert_eq!(me.get_addr_by_type(2), Ok(server));
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn harbors_read_other_clusters_harbors_from_the_harbors_center() {
    let etcd = Etcd::start();
    let mut c = client(&etcd).await;
    const CENTER: &str = "/cg-center";
    // Cluster 1's own store holds its nodes; cluster 2's harbor is only in the center.
    let (lh, nh) = bind();
    put_member(&mut c, &Member::new(a("1.255.1"), nh.clone())).await;
    c.put(
        member_key(CENTER, a("1.255.1")),
        encode_member(&Member::new(a("1.255.1"), nh)),
        None,
    )
    .await
    .unwrap();
    c.put(
        member_key(CENTER, a("2.255.1")),
        encode_member(&Member::new(a("2.255.1"), "127.0.0.1:7")),
        None,
    )
    .await
    .unwrap();
    // Non-harbor entries in the center are ignored.
    c.put(
        member_key(CENTER, a("2.1.1")),
        encode_member(&Member::new(a("2.1.1"), "127.0.0.1:8").with_export(true)),
        None,
    )
    .await
    .unwrap();
    let lease = c.lease_grant(30, None).await.unwrap().id();
    c.put(
        alive_key(CENTER, a("2.255.1")),
        "1",
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
    let harbor = Node::builder(a("1.255.1"))
        .discovery(discovery(&etcd).with_harbors_center([etcd.endpoint.clone()], CENTER))
        .config(test_config())
        .listener(lh)
        .build();
    within(harbor.start()).await.unwrap();
    assert!(
        harbor
            .wait_for_member(a("2.255.1"), |m| m.is_some_and(|m| m.available), WAIT)
            .await
    );
    assert!(harbor.member(a("2.1.1")).is_none());
    // The harbor keeps its alive key in both stores.
    let probe = c.clone();
    let alive = |prefix: &'static str| {
        let mut c = probe.clone();
        async move {
            !c.get(alive_key(prefix, a("1.255.1")), None)
                .await
                .unwrap()
                .kvs()
                .is_empty()
        }
    };
    // The liveness task writes both keys right after start; poll etcd for them.
    within(async {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        while !(alive(PREFIX).await && alive(CENTER).await) {
            tick.tick().await;
        }
    })
    .await;
    // Changes in the center reach the harbor; the harbor's leave clears both.
    c.delete(member_key(CENTER, a("2.255.1")), None)
        .await
        .unwrap();
    assert!(
        harbor
            .wait_for_member(a("2.255.1"), |m| m.is_none(), WAIT)
            .await
    );
    harbor.shutdown().await;
    assert!(!alive(PREFIX).await && !alive(CENTER).await);
}

/// An operator deletes a running node's alive key: the node notices within about a lease TTL
/// and puts it back, so it is picked again without a restart.
#[tokio::test]
async fn a_deleted_alive_key_is_restored_while_the_node_runs() {
    let etcd = Etcd::start();
    let mut c = client(&etcd).await;
    let watcher = start_node(&etcd, &mut c, "1.1.1").await;
    let node = start_node(&etcd, &mut c, "1.2.1").await;
    assert!(
        watcher
            .wait_for_member(node.addr(), |m| m.is_some_and(|m| m.available), WAIT)
            .await
    );
    c.delete(alive_key(PREFIX, node.addr()), None)
        .await
        .unwrap();
    assert!(
        watcher
            .wait_for_member(node.addr(), |m| m.is_some_and(|m| !m.available), WAIT)
            .await
    );
    let deleted = Instant::now();
    assert!(
        watcher
            .wait_for_member(node.addr(), |m| m.is_some_and(|m| m.available), WAIT)
            .await,
        "the alive key was not restored"
    );
    // Checked once a TTL (2 s here).
    assert!(
        deleted.elapsed() < Duration::from_secs(4),
        "{:?}",
        deleted.elapsed()
    );
}

/// Claims an id of `1.2.auto` on a fresh source and starts a node on it, serving "echo".
async fn start_auto_node(etcd: &Etcd) -> Node {
    let (l, net) = bind();
    let d = discovery(etcd);
    let addr = within(d.claim(1, 2, net, false)).await.unwrap();
    let node = Node::builder(addr)
        .discovery(d)
        .config(test_config())
        .listener(l)
        .rpc("echo", |_, p| async move { Ok::<_, HandlerError>(p) })
        .build();
    within(node.start()).await.unwrap();
    node
}

/// Whether `addr`'s member entry exists in etcd.
async fn listed(c: &mut Client, addr: LogicAddr) -> bool {
    c.get(member_key(PREFIX, addr), None).await.unwrap().count() > 0
}

#[tokio::test]
async fn twenty_nodes_starting_at_once_claim_twenty_distinct_ids() {
    let etcd = Etcd::start();
    let mut c = client(&etcd).await;
    // Listed by an operator: id 1 is never claimed.
    put_member(&mut c, &Member::new(a("1.2.1"), "127.0.0.1:9")).await;
    let mut starts = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let etcd_endpoint = etcd.endpoint.clone();
        starts.spawn(async move {
            let (l, net) = bind();
            // Twenty watches and claims at once on a loaded machine: patient requests.
            let patient = options().request_timeout(Duration::from_secs(10));
            let d = EtcdDiscovery::connect([etcd_endpoint], PREFIX, patient);
            let addr = d.claim(1, 2, net, false).await.unwrap();
            let node = Node::builder(addr)
                .discovery(d)
                .config(test_config())
                .listener(l)
                .rpc("echo", |_, p| async move { Ok::<_, HandlerError>(p) })
                .build();
            node.start().await.unwrap();
            node
        });
    }
    let nodes: Vec<Node> = within(starts.join_all()).await;
    let mut ids: Vec<u16> = nodes.iter().map(|n| n.addr().server()).collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        (2..=21).collect::<Vec<u16>>(),
        "the lowest free ids, each once"
    );
    // They see each other and talk: the claimed entries are real members.
    let (first, last) = (&nodes[0], &nodes[19]);
    assert!(
        first
            .wait_for_member(last.addr(), |m| m.is_some_and(|m| m.available), WAIT)
            .await
    );
    let reply = first
        .call(last.addr(), "echo", Bytes::from_static(b"hi"))
        .await
        .unwrap();
    assert_eq!(&reply[..], b"hi");
    // A node that stops releases its id at the end of its shutdown; the next claim takes it.
    let gone = nodes[7].addr();
    nodes[7].shutdown().await;
    assert!(
        !listed(&mut c, gone).await,
        "{gone} still listed after its shutdown"
    );
    let next = start_auto_node(&etcd).await;
    assert_eq!(next.addr(), gone);
    let stops = nodes.iter().chain([&next]).map(|n| n.shutdown());
    within(futures_util::future::join_all(stops)).await;
}

#[tokio::test]
async fn a_killed_nodes_claimed_id_is_free_only_after_its_lease_expires() {
    let etcd = Etcd::start();
    let mut c = client(&etcd).await;
    let (bin, spec) = echo_server(&etcd);
    // The node runs as a separate process, so it can be killed without any goodbye.
    let mut child = Command::new(&bin)
        .args([&spec, "1.2.auto"])
        .env("CLUSTERGO_LEASE_TTL_SECS", "2")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let first = out
        .next()
        .expect("the echo server printed nothing")
        .unwrap();
    // "echo server 1.2.1 listening on ..."
    let claimed: LogicAddr = first
        .split_whitespace()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no address in {first:?}"));
    assert_eq!(claimed, a("1.2.1"));
    assert!(listed(&mut c, claimed).await);
    child.kill().unwrap(); // SIGKILL, by our own child's handle
    child.wait().unwrap();
    let killed = Instant::now();
    // While its lease lives, the id is not given out again.
    let other = start_auto_node(&etcd).await;
    assert_eq!(other.addr(), a("1.2.2"));
    assert!(
        killed.elapsed() < Duration::from_millis(1200),
        "the check came too late to mean anything"
    );
    assert!(
        listed(&mut c, claimed).await,
        "the id was freed before its lease could expire"
    );
    // Then the lease expires (renewed every third of the 2 s TTL: 1.3 to 2 s after the kill):
    // watched from the revision just read, so the deletion cannot be missed.
    let read = c.get(member_key(PREFIX, claimed), None).await.unwrap();
    assert_eq!(
        read.count(),
        1,
        "the id was freed before its lease could expire"
    );
    let from = read.header().unwrap().revision() + 1;
    let mut events = c
        .watch(
            member_key(PREFIX, claimed),
            Some(etcd_client::WatchOptions::new().with_start_revision(from)),
        )
        .await
        .unwrap();
    let freed = within(async {
        loop {
            let resp = events.message().await.unwrap().expect("the watch ended");
            if resp
                .events()
                .iter()
                .any(|e| e.event_type() == etcd_client::EventType::Delete)
            {
                return killed.elapsed();
            }
        }
    })
    .await;
    eprintln!("killed node's id free after {freed:?} (lease TTL 2 s)");
    assert!(freed >= Duration::from_millis(1200), "{freed:?}");
    assert!(freed <= Duration::from_millis(3500), "{freed:?}");
    let again = start_auto_node(&etcd).await;
    assert_eq!(
        again.addr(),
        claimed,
        "the freed id is the lowest free one again"
    );
    other.shutdown().await;
    again.shutdown().await;
}

#[tokio::test]
async fn a_node_whose_claimed_lease_is_lost_stops_and_leaves_the_new_owner_alone() {
    let etcd = Etcd::start();
    let mut c = client(&etcd).await;
    let old = start_auto_node(&etcd).await;
    let id = old.addr();
    assert_eq!(id, a("1.2.1"));
    // The lease ends under it (as when etcd expired it during a partition).
    let lease = c.get(member_key(PREFIX, id), None).await.unwrap().kvs()[0].lease();
    c.lease_revoke(lease).await.unwrap();
    // The id is free at once: another node claims it and starts.
    let new = start_auto_node(&etcd).await;
    assert_eq!(new.addr(), id);
    // The old node learns its claim is lost and stops by itself...
    within(old.closed()).await;
    // ...without touching the new owner's alive key.
    let alive = c.get(alive_key(PREFIX, id), None).await.unwrap();
    let kv = alive
        .kvs()
        .first()
        .expect("the new owner's alive key is gone");
    assert_ne!(kv.lease(), lease);
    assert!(new.readiness().is_ok(), "{:?}", new.readiness());
    new.shutdown().await;
}

/// A store too large for one gRPC message (over 4 MiB: 6,000 members with 1,600-byte host names
/// and their alive keys) still gives a node its whole membership: the prefix is read in
/// pages at one revision, and a page still too large (4,000 such members) is asked for again
/// smaller. A key just past the prefix (`<prefix>0…`) stays out of the view.
#[tokio::test]
async fn a_membership_larger_than_one_grpc_message_is_read_whole() {
    use etcd_client::{Txn, TxnOp};
    let etcd = Etcd::start();
    let mut c = client(&etcd).await;
    const MEMBERS: u16 = 6_000;
    let host = "h".repeat(1_600);
    let addr = |i: u16| LogicAddr::new(1, 2 + (i / 4_000) as u8, 1 + i % 4_000).unwrap();
    let ids: Vec<u16> = (0..MEMBERS).collect();
    for chunk in ids.chunks(64) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .flat_map(|&i| {
                let m = Member::new(addr(i), format!("{host}.example:{}", 1_000 + i));
                [
                    TxnOp::put(member_key(PREFIX, m.addr), encode_member(&m), None),
                    TxnOp::put(alive_key(PREFIX, m.addr), "1", None),
                ]
            })
            .collect();
        c.txn(Txn::new().and_then(ops)).await.unwrap();
    }
    let total: usize = c
        .get(
            format!("{PREFIX}/"),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .unwrap()
        .kvs()
        .len();
    assert_eq!(total, 2 * MEMBERS as usize);
    // A neighbouring prefix that a range read must not reach into.
    let stray = Member::new(a("1.1.9"), "127.0.0.1:1");
    c.put(
        format!("{PREFIX}0/members/1.1.9"),
        encode_member(&stray),
        None,
    )
    .await
    .unwrap();
    let node = start_node(&etcd, &mut c, "1.1.1").await;
    let members = node.members();
    assert_eq!(
        members.len(),
        MEMBERS as usize + 1,
        "every member and the node itself"
    );
    for i in [0, 3_999, 4_000, 4_999, 5_000, MEMBERS - 1] {
        let m = node
            .member(addr(i))
            .unwrap_or_else(|| panic!("{} missing", addr(i)));
        assert_eq!(m.net_addr, format!("{host}.example:{}", 1_000 + i));
        assert!(m.available, "{} is alive", addr(i));
    }
    assert!(
        node.member(a("1.1.9")).is_none(),
        "a key of another prefix leaked in"
    );
    // And it follows changes from there (the watch starts at the revision read).
    put_member(&mut c, &Member::new(addr(7), "127.0.0.1:7")).await;
    assert!(
        node.wait_for_member(
            addr(7),
            |m| m.is_some_and(|m| m.net_addr == "127.0.0.1:7"),
            Duration::from_secs(5)
        )
        .await
    );
    node.shutdown().await;
}
