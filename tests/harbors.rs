//! Traffic between clusters through harbor nodes (type 255), in one process on loopback:
//! calls, messages in order, visibility, no-route errors named at the hop that found them,
//! failover between two harbors.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clustergo::{Cmd, HandlerError, Node, RpcError, StreamError};
use support::{Cluster, a, within};
use tokio::sync::Notify;

/// An echo handler that answers with who called and who served.
fn echo(b: clustergo::NodeBuilder) -> clustergo::NodeBuilder {
    b.rpc("who", |ctx, _| async move {
        Ok::<_, HandlerError>(Bytes::from(format!("{} called", ctx.from())))
    })
}

/// Cluster 1: an exported game server 1.1.1, a private one 1.1.2 and harbor(s); cluster 2: a
/// client 2.1.1 and its harbor.
async fn two_clusters(c: &mut Cluster, harbors_in_1: &[&str]) -> (Node, Vec<Node>, Node) {
    c.members.set_export(a("1.1.1"), true);
    // The servers keep running when their handles drop.
    c.start("1.1.1", echo).await;
    c.start("1.1.2", echo).await;
    let mut harbors = Vec::new();
    for h in harbors_in_1 {
        harbors.push(c.start(h, |b| b).await);
    }
    let h2 = c.start("2.255.1", |b| b).await;
    let client = c.start("2.2.1", |b| b).await;
    (client, harbors, h2)
}

#[tokio::test]
async fn calls_and_messages_cross_clusters_through_harbors() {
    support::init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.1.2", "1.255.1", "2.255.1", "2.2.1"]);
    c.members.set_export(a("1.1.1"), true);
    let got: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let done = Arc::new(Notify::new());
    const N: u32 = 10_000;
    let server = {
        let (got, done) = (got.clone(), done.clone());
        c.start("1.1.1", move |b| {
            echo(b).on_cmd(Cmd(7), move |ctx, p| {
                let n = u32::from_be_bytes(p[..4].try_into().unwrap());
                got.lock().unwrap().push((ctx.from().to_string(), n));
                if n == N - 1 {
                    done.notify_one();
                }
            })
        })
        .await
    };
    let private = c.start("1.1.2", echo).await;
    let h1 = c.start("1.255.1", |b| b).await;
    let h2 = c.start("2.255.1", |b| b).await;
    let client = c.start("2.2.1", |b| b).await;

    // Selection in cluster 2 sees only the exported game server of cluster 1.
    for _ in 0..20 {
        assert_eq!(client.get_addr_by_type(1), Ok(server.addr()));
    }
    let reply = within(client.call(server.addr(), "who", Bytes::new()))
        .await
        .unwrap();
    assert_eq!(&reply[..], b"2.2.1 called");
    // The private server is not selectable, but reachable by address.
    let reply = within(client.call(private.addr(), "who", Bytes::new()))
        .await
        .unwrap();
    assert_eq!(&reply[..], b"2.2.1 called");
    // And back: cluster 1 calls into cluster 2 (a harbor, as a target, is reachable too).
    let reply = within(server.call(client.addr(), "missing", Bytes::new()))
        .await
        .unwrap_err();
    assert!(matches!(reply, RpcError::NoMethod { .. }), "{reply:?}");

    // 10,000 messages arrive in order, from the original sender.
    for n in 0..N {
        client
            .send_cmd(
                server.addr(),
                Cmd(7),
                Bytes::copy_from_slice(&n.to_be_bytes()),
            )
            .await
            .unwrap();
    }
    within(done.notified()).await;
    {
        let got = got.lock().unwrap();
        assert_eq!(got.len(), N as usize);
        for (i, (from, n)) in got.iter().enumerate() {
            assert_eq!((from.as_str(), *n), ("2.2.1", i as u32));
        }
    }
    assert!(h2.stats().envelopes_forwarded >= u64::from(N));
    assert!(h1.stats().envelopes_forwarded >= u64::from(N));
}

#[tokio::test]
async fn no_route_is_named_by_the_hop_that_found_it_quickly() {
    support::init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.1.2", "1.255.1", "2.255.1", "2.2.1"]);
    let (client, _h1s, _h2) = two_clusters(&mut c, &["1.255.1"]).await;
    let quick = Duration::from_secs(1);

    // The target left membership: cluster 1's harbor says so.
    c.members.remove(a("1.1.2"));
    let t = Instant::now();
    let e = within(client.call(a("1.1.2"), "who", Bytes::new()))
        .await
        .unwrap_err();
    assert!(t.elapsed() < quick, "{:?}", t.elapsed());
    match &e {
        RpcError::NoRoute { to, reason } => {
            assert_eq!(*to, a("1.1.2"));
            assert!(
                reason.contains("not in 1.255.1's membership") && reason.contains("(at 1.255.1)"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }

    // Cluster 1 has no harbor left: cluster 2's harbor says so.
    c.members.remove(a("1.255.1"));
    let wait = client.call(a("1.1.1"), "who", Bytes::new());
    let e = within(async {
        // The harbor of cluster 2 learns of the removal through membership; until then the
        // call may still reach 1.255.1 and fail on its link. Retry until the new answer.
        let mut e = wait.await.unwrap_err();
        while !matches!(&e, RpcError::NoRoute { reason, .. } if reason.contains("no available harbor in cluster 1"))
        {
            e = client.call(a("1.1.1"), "who", Bytes::new()).await.unwrap_err();
        }
        e
    })
    .await;
    let RpcError::NoRoute { to, reason } = &e else {
        unreachable!()
    };
    assert_eq!(*to, a("1.1.1"));
    assert!(reason.contains("(at 2.255.1)"), "{reason}");

    // The sender's own cluster has no harbor: refused at the sender, at once.
    c.members.remove(a("2.255.1"));
    assert!(
        client
            .wait_for_member(a("2.255.1"), |m| m.is_none(), support::WAIT)
            .await
    );
    let t = Instant::now();
    let e = client
        .call(a("1.1.1"), "who", Bytes::new())
        .await
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_millis(100));
    assert_eq!(
        e,
        RpcError::NoRoute {
            to: a("1.1.1"),
            reason: "no available harbor in cluster 2".into()
        }
    );
}

#[tokio::test]
async fn a_dead_harbor_is_routed_around() {
    support::init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.1.2", "1.255.1", "1.255.2", "2.255.1", "2.2.1"]);
    let (client, harbors, h2) = two_clusters(&mut c, &["1.255.1", "1.255.2"]).await;
    let target = a("1.1.1");
    within(client.call(target, "who", Bytes::new()))
        .await
        .unwrap();
    // Which harbor of cluster 1 carries the traffic: the one that forwarded it.
    let (used, spare): (Vec<_>, Vec<_>) = harbors
        .into_iter()
        .partition(|h| h.stats().envelopes_forwarded > 0);
    let (used, spare) = (
        used.into_iter().next().unwrap(),
        spare.into_iter().next().unwrap(),
    );
    // It dies without leaving membership (its process is gone).
    used.shutdown().await;
    let started = Instant::now();
    // Calls resume through the other harbor within the failover bound; the ones in flight
    // on the dead path fail with PeerLost, none waits for its timeout.
    let mut failures = Vec::new();
    within(async {
        loop {
            match client
                .call_timeout(target, "who", Bytes::new(), Duration::from_secs(3))
                .await
            {
                Ok(_) => break,
                Err(e) => failures.push(e),
            }
        }
    })
    .await;
    let failover = started.elapsed();
    assert!(
        failover < Duration::from_secs(3),
        "failover took {failover:?}"
    );
    for e in &failures {
        assert!(
            matches!(
                e,
                RpcError::PeerLost { .. } | RpcError::NoRoute { .. } | RpcError::Refused { .. }
            ),
            "{e:?}"
        );
    }
    assert!(spare.stats().envelopes_forwarded > 0);
    assert!(h2.stats().envelopes_forwarded > 0);
    for _ in 0..20 {
        within(client.call(target, "who", Bytes::new()))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn two_harbors_in_the_callers_cluster_share_calls_and_streams() {
    support::init_tracing();
    // Two harbors in the caller's cluster: each (caller, target) pair takes one of them, both
    // ways; calls and streams to several targets spread over both.
    let targets = ["1.1.1", "1.1.2", "1.1.3", "1.1.4"];
    let mut names = vec!["1.255.1", "2.255.1", "2.255.16", "2.2.1"];
    names.extend(targets);
    let mut c = Cluster::new(&names);
    for t in targets {
        c.start(t, |b| {
            echo(b).on_stream(|s: clustergo::Stream| async move {
                let (mut r, mut w) = s.into_split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
                }
            })
        })
        .await;
    }
    c.start("1.255.1", |b| b).await;
    let h2a = c.start("2.255.1", |b| b).await;
    let h2b = c.start("2.255.16", |b| b).await;
    let client = c.start("2.2.1", |b| b).await;
    for t in targets {
        for _ in 0..5 {
            let reply =
                within(client.call_timeout(a(t), "who", Bytes::new(), Duration::from_secs(2)))
                    .await
                    .unwrap();
            assert_eq!(&reply[..], b"2.2.1 called");
        }
    }
    assert_eq!(client.stats().responses_orphaned, 0);
    // Streams too, two at a time to each target (numbers are per opener, not per harbor).
    for t in targets {
        let streams = [
            within(client.open_stream(a(t))).await.unwrap(),
            within(client.open_stream(a(t))).await.unwrap(),
        ];
        for mut s in streams {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(t.as_bytes()).await.unwrap();
            s.shutdown().await.unwrap();
            let mut back = Vec::new();
            within(s.read_to_end(&mut back)).await.unwrap();
            assert_eq!(back, t.as_bytes());
        }
    }
    assert_eq!(client.stats().stream_envelopes_unknown, 0);
    // Both harbors of the caller's cluster carried traffic.
    assert!(h2a.stats().envelopes_forwarded > 0 && h2b.stats().envelopes_forwarded > 0);
}

#[tokio::test]
async fn calls_in_flight_through_a_harbor_that_dies_fail_with_peer_lost_at_once() {
    support::init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.255.1", "1.255.2", "2.255.1", "2.2.1"]);
    c.members.set_export(a("1.1.1"), true);
    let arrived = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let signal = Arc::new(Notify::new());
    {
        let (arrived, signal) = (arrived.clone(), signal.clone());
        c.start("1.1.1", move |b| {
            echo(b).rpc("slow", move |_, _| {
                arrived.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                signal.notify_one();
                // Never answers within the test.
                async {
                    std::future::pending::<()>().await;
                    Ok::<_, HandlerError>(Bytes::new())
                }
            })
        })
        .await;
    }
    let harbors = [
        c.start("1.255.1", |b| b).await,
        c.start("1.255.2", |b| b).await,
    ];
    let h2 = c.start("2.255.1", |b| b).await;
    let client = c.start("2.2.1", |b| b).await;
    within(client.call(a("1.1.1"), "who", Bytes::new()))
        .await
        .unwrap();
    let used = harbors
        .iter()
        .find(|h| h.stats().envelopes_forwarded > 0)
        .unwrap()
        .clone();

    let calls: Vec<_> = (0..5)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .call_timeout(a("1.1.1"), "slow", Bytes::new(), Duration::from_secs(20))
                    .await
            })
        })
        .collect();
    within(async {
        while arrived.load(std::sync::atomic::Ordering::SeqCst) < 5 {
            signal.notified().await;
        }
    })
    .await;
    // All five are at the server; the harbor they went through goes away.
    let t = Instant::now();
    used.shutdown().await;
    for call in calls {
        let e = within(call).await.unwrap().unwrap_err();
        assert!(
            matches!(&e, RpcError::PeerLost { peer, .. } if *peer == a("1.1.1")),
            "{e:?}"
        );
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Later calls go through the other harbor.
    within(client.call(a("1.1.1"), "who", Bytes::new()))
        .await
        .unwrap();
    assert!(h2.stats().envelopes_forwarded > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_cross_clusters_and_end_on_both_sides_when_a_harbor_dies() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    support::init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.255.1", "1.255.2", "2.255.1", "2.2.1"]);
    c.members.set_export(a("1.1.1"), true);
    let (ended_tx, mut ended_rx) = tokio::sync::mpsc::channel::<(String, std::io::Error)>(4);
    let server = c
        .start("1.1.1", move |b| {
            b.on_stream(move |s: clustergo::Stream| {
                let ended_tx = ended_tx.clone();
                async move {
                    let (from, meta) = (s.peer(), s.metadata().get("player").map(String::from));
                    let (mut r, mut w) = s.into_split();
                    let greeting = format!("{from} {}\n", meta.unwrap_or_default());
                    if w.write_all(greeting.as_bytes()).await.is_err() {
                        return;
                    }
                    match tokio::io::copy(&mut r, &mut w).await {
                        Ok(_) => {
                            let _ = w.shutdown().await;
                        }
                        Err(e) => {
                            let _ = ended_tx.send((from.to_string(), e)).await;
                        }
                    }
                }
            })
        })
        .await;
    let harbors = [
        c.start("1.255.1", |b| b).await,
        c.start("1.255.2", |b| b).await,
    ];
    c.start("2.255.1", |b| b).await;
    let client = c.start("2.2.1", |b| b).await;

    // An echo of 1 MiB across clusters, metadata and the opener's address intact.
    let meta = clustergo::StreamMeta::new().with("player", "p-42");
    let s = within(client.open_stream_with(server.addr(), meta))
        .await
        .unwrap();
    assert_eq!(s.peer(), server.addr());
    let (mut r, mut w) = s.into_split();
    let mut greeting = [0u8; 11];
    within(r.read_exact(&mut greeting)).await.unwrap();
    assert_eq!(&greeting, b"2.2.1 p-42\n");
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
    let expect = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w
    });
    let mut back = vec![0u8; expect.len()];
    within(r.read_exact(&mut back)).await.unwrap();
    assert!(back == expect, "echo differs");
    let _w = within(writer).await.unwrap();

    // The cluster-1 harbor carrying it dies: both ends learn at once.
    let used = harbors
        .iter()
        .find(|h| h.stats().envelopes_forwarded > 0)
        .unwrap();
    used.shutdown().await;
    let mut buf = [0u8; 16];
    let e = within(r.read(&mut buf)).await.unwrap_err();
    assert!(
        matches!(StreamError::from_io(&e), Some(StreamError::PeerLost { .. })),
        "{e:?}"
    );
    let (from, e) = within(ended_rx.recv()).await.unwrap();
    assert_eq!(from, "2.2.1");
    assert!(
        matches!(StreamError::from_io(&e), Some(StreamError::PeerLost { .. })),
        "{e:?}"
    );
    // A new stream goes through the other harbor.
    let s = within(client.open_stream(server.addr())).await.unwrap();
    s.reset("done");
}

/// A policy filter for the relay stack: refuses requests to one node.
#[derive(Clone)]
struct DenyTo(clustergo::LogicAddr);

#[derive(Clone)]
struct DenyToService<S>(clustergo::LogicAddr, S);

impl<S> tower::Layer<S> for DenyTo {
    type Service = DenyToService<S>;

    fn layer(&self, inner: S) -> DenyToService<S> {
        DenyToService(self.0, inner)
    }
}

impl<S> tower::Service<clustergo::relay::Relayed> for DenyToService<S>
where
    S: tower::Service<clustergo::relay::Relayed, Response = (), Error = clustergo::relay::BoxError>,
{
    type Response = ();
    type Error = clustergo::relay::BoxError;
    type Future = futures_util::future::Either<
        std::future::Ready<Result<(), clustergo::relay::BoxError>>,
        S::Future,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.1.poll_ready(cx)
    }

    fn call(&mut self, r: clustergo::relay::Relayed) -> Self::Future {
        if r.to() == self.0 && r.kind() == clustergo::relay::RelayKind::Request {
            let why = format!("refused by policy: {} may not call {}", r.from(), r.to());
            return futures_util::future::Either::Left(std::future::ready(Err(why.into())));
        }
        futures_util::future::Either::Right(self.1.call(r))
    }
}

/// A harbor relays through one tower stack of its own, built at start: a custom filter refuses
/// calls to one node (they get `NoRoute` with the policy's reason), tower's `RateLimit` bounds
/// what passes (over the rate, messages are dropped and counted at once), and
/// `ConcurrencyLimit` and `Timeout` compose with them. Nothing waits in the harbor's readers.
#[tokio::test]
async fn a_harbor_relays_through_its_own_tower_stack() {
    support::init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.1.2", "1.255.1", "2.255.1", "2.2.1"]);
    c.members.set_export(a("1.1.1"), true);
    c.members.set_export(a("1.1.2"), true);
    let got = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let _server = {
        let got = got.clone();
        c.start("1.1.1", move |b| {
            echo(b).on_cmd(Cmd(7), move |_, _| {
                got.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            })
        })
        .await
    };
    let _private = c.start("1.1.2", echo).await;
    let stack = tower::ServiceBuilder::new()
        .layer(DenyTo(a("1.1.2")))
        .rate_limit(300, Duration::from_secs(1))
        .concurrency_limit(64)
        .timeout(Duration::from_secs(1));
    let h1 = c.start("1.255.1", move |b| b.relay_layer(stack)).await;
    let _h2 = c.start("2.255.1", |b| b).await;
    let client = c.start("2.2.1", |b| b).await;

    let r = within(client.call(a("1.1.1"), "who", Bytes::new())).await;
    assert_eq!(&r.unwrap()[..], b"2.2.1 called");
    match within(client.call(a("1.1.2"), "who", Bytes::new())).await {
        Err(RpcError::NoRoute { to, reason }) => {
            assert_eq!(to, a("1.1.2"));
            assert!(
                reason.contains("refused by policy: 2.2.1 may not call 1.1.2"),
                "{reason}"
            );
            assert!(reason.contains("(at 1.255.1)"), "{reason}");
        }
        other => panic!("wanted NoRoute from the policy, got {other:?}"),
    }

    // 2,000 messages at once: the rate limit lets 300 a second through, and the rest are
    // dropped and counted at the harbor at once (none waits there).
    let started = tokio::time::Instant::now();
    for i in 0..2000u32 {
        client
            .send_cmd(a("1.1.1"), Cmd(7), Bytes::copy_from_slice(&i.to_be_bytes()))
            .await
            .unwrap();
    }
    let delivered = || got.load(std::sync::atomic::Ordering::Relaxed) as u64;
    let accounted = async {
        while delivered() + h1.stats().envelopes_hop_busy < 2000 {
            tokio::task::yield_now().await;
        }
    };
    within(accounted).await;
    let windows = started.elapsed().as_secs() + 1;
    assert!(
        delivered() <= 300 * windows,
        "{} messages passed a limit of 300 a second in {windows} windows",
        delivered()
    );
    assert!(h1.stats().envelopes_hop_busy > 0);
    // Once the rate allows again, calls go through.
    let again = async {
        loop {
            if client.call(a("1.1.1"), "who", Bytes::new()).await.is_ok() {
                return;
            }
            tokio::task::yield_now().await;
        }
    };
    within(again).await;
}

/// 30,000 sequenced one-way messages 2.1.1 → 1.1.1 through the harbors, and a second harbor
/// of cluster 1 becomes available while they are in flight — one that rendezvous hashing
/// prefers for this pair, already linked. The active pair keeps its path, so every message arrives, in order. (Before, the
/// pair moved to the new harbor at once while older messages were still on the old path, and
/// some rounds arrived reordered.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_holds_when_a_harbor_joins_under_load() {
    support::init_tracing();
    // A harbor address that hashing prefers to 1.255.1 for this pair once it is available.
    let base = |extra: &str| -> Vec<clustergo::Member> {
        ["1.1.1", "1.255.1", "2.255.1", "2.1.1", extra]
            .iter()
            .map(|m| clustergo::Member::new(a(m), "127.0.0.1:1").with_export(true))
            .collect()
    };
    let joiner = (2..200)
        .map(|s| format!("1.255.{s}"))
        .find(|h| {
            let hops = clustergo::route::route(a("2.1.1"), a("1.1.1"), &base(h)).unwrap();
            hops.iter()
                .any(|hop| hop.to_string().contains(&format!("harbor {h} ")))
        })
        .expect("some harbor address wins the pair");
    let mut c = Cluster::new(&["1.1.1", "1.255.1", "2.255.1", "2.1.1", &joiner]);
    c.members.set_export(a("1.1.1"), true);
    // The new harbor runs and is linked, but is not yet available for routing: when it
    // becomes available, a path through it is at once as fast as the old one, which still
    // holds the messages in flight.
    c.members.set_available(a(&joiner), false);

    const N: u32 = 30_000;
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let _receiver = c
        .start("1.1.1", move |b| {
            b.on_cmd(Cmd(9), move |_, p| {
                // The behaviour under test: a receiver slower than its senders, so messages
                // wait on the link into it, on the old path, when the new harbor becomes
                // available (a handler that blocks its reader for 50 µs a message).
                std::thread::sleep(Duration::from_micros(50));
                let _ = seen_tx.send(u32::from_be_bytes(p[..4].try_into().unwrap()));
            })
        })
        .await;
    let _h1 = c.start("1.255.1", |b| b).await;
    let h2 = c.start("2.255.1", |b| b).await;
    let joining = c.start(&joiner, |b| b).await;
    let sender = c.start("2.1.1", |b| b).await;
    // Link the two harbors (a call to a method nobody serves is answered over the link).
    let r = within(joining.call(a("2.255.1"), "nobody", Bytes::new())).await;
    assert!(matches!(r, Err(RpcError::NoMethod { .. })), "{r:?}");
    assert!(h2.is_linked(a(&joiner)));

    // At most 4,000 messages in flight: a harbor refuses (and counts) what overflows its
    // queue toward the next hop rather than slowing every sender behind its links, so a
    // sender of large volumes keeps a window, as here.
    let received = Arc::new(tokio::sync::Semaphore::new(4_000));
    let send = {
        let (sender, window) = (sender.clone(), received.clone());
        tokio::spawn(async move {
            for n in 0..N {
                window.acquire().await.unwrap().forget();
                sender
                    .send_cmd(a("1.1.1"), Cmd(9), Bytes::copy_from_slice(&n.to_be_bytes()))
                    .await
                    .unwrap();
            }
        })
    };
    let mut next = 0u32;
    let mut joined = false;
    while next < N {
        let n = within(seen_rx.recv()).await.unwrap();
        assert_eq!(n, next, "message {n} arrived when {next} was due");
        received.add_permits(1);
        next += 1;
        if next == 5_000 && !joined {
            joined = true;
            c.members.set_available(a(&joiner), true);
        }
    }
    send.await.unwrap();
    assert!(joined);
    joining.shutdown().await;
}

/// A relay layer that panics costs the envelope it was given, not the harbor's link: the
/// call gets `NoRoute` saying so, the stack is built anew, and the next call goes through.
#[tokio::test]
async fn a_panicking_relay_layer_costs_one_envelope_not_the_link() {
    #[derive(Clone)]
    struct PanicOnce(Arc<std::sync::atomic::AtomicBool>);
    #[derive(Clone)]
    struct PanicOnceService<S>(Arc<std::sync::atomic::AtomicBool>, S);
    impl<S> tower::Layer<S> for PanicOnce {
        type Service = PanicOnceService<S>;
        fn layer(&self, inner: S) -> PanicOnceService<S> {
            PanicOnceService(self.0.clone(), inner)
        }
    }
    impl<S: tower::Service<clustergo::relay::Relayed>> tower::Service<clustergo::relay::Relayed>
        for PanicOnceService<S>
    {
        type Response = S::Response;
        type Error = S::Error;
        type Future = S::Future;
        fn poll_ready(
            &mut self,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), S::Error>> {
            self.1.poll_ready(cx)
        }
        fn call(&mut self, r: clustergo::relay::Relayed) -> S::Future {
            if r.kind() == clustergo::relay::RelayKind::Request
                && !self.0.swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                panic!("a bug in a relay layer");
            }
            self.1.call(r)
        }
    }
    let mut c = Cluster::new(&["1.1.1", "1.255.1", "2.255.1", "2.2.1"]);
    c.members.set_export(a("1.1.1"), true);
    let _server = c.start("1.1.1", echo).await;
    let fired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let layer = PanicOnce(fired.clone());
    let _h1 = c.start("1.255.1", move |b| b.relay_layer(layer)).await;
    let _h2 = c.start("2.255.1", |b| b).await;
    let client = c.start("2.2.1", |b| b).await;
    match within(client.call(a("1.1.1"), "who", Bytes::new())).await {
        Err(RpcError::NoRoute { reason, .. }) => {
            assert!(reason.contains("a relay layer panicked"), "{reason}")
        }
        other => panic!("wanted the panic's refusal, got {other:?}"),
    }
    assert!(fired.load(std::sync::atomic::Ordering::SeqCst));
    let r = within(client.call(a("1.1.1"), "who", Bytes::new())).await;
    assert_eq!(&r.unwrap()[..], b"2.2.1 called");
}
