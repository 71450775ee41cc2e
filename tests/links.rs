//! Links: lazy dial, one link per pair under simultaneous dial, order, bounded queues, and
//! the admission check.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clustergo::{Cmd, HandlerError, Member, MemoryDiscovery, Node, RpcError};
use support::*;
use tokio::sync::mpsc;

/// A handler that forwards every cmd-1 payload (as u32) with its sender into a channel.
fn collector(
    b: clustergo::NodeBuilder,
    tx: mpsc::Sender<(clustergo::LogicAddr, u32)>,
) -> clustergo::NodeBuilder {
    b.on_cmd(Cmd(1), move |ctx, p| {
        let n = u32::from_be_bytes(p[..4].try_into().unwrap());
        tx.try_send((ctx.from(), n))
            .expect("collector channel has room");
    })
}

fn n(i: u32) -> Bytes {
    Bytes::copy_from_slice(&i.to_be_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_dial_loses_nothing_and_leaves_one_link() {
    init_tracing();
    const EACH: u32 = 1000;
    let mut raced = 0;
    for round in 0..100 {
        let mut c = Cluster::new(&["1.1.1", "1.1.2"]);
        let (tx_a, mut rx_a) = mpsc::channel(EACH as usize + 10);
        let (tx_b, mut rx_b) = mpsc::channel(EACH as usize + 10);
        let na = c.start("1.1.1", |b| collector(b, tx_a)).await;
        let nb = c.start("1.1.2", |b| collector(b, tx_b)).await;
        // Both send first, at the same moment, on fresh nodes.
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let send_all =
            |from: Node, to: clustergo::LogicAddr, barrier: Arc<tokio::sync::Barrier>| {
                tokio::spawn(async move {
                    barrier.wait().await;
                    for i in 0..EACH {
                        from.send_cmd(to, Cmd(1), n(i)).await.unwrap();
                    }
                })
            };
        let ha = send_all(na.clone(), nb.addr(), barrier.clone());
        let hb = send_all(nb.clone(), na.addr(), barrier);
        within(ha).await.unwrap();
        within(hb).await.unwrap();
        for (rx, from) in [(&mut rx_b, na.addr()), (&mut rx_a, nb.addr())] {
            for i in 0..EACH {
                let got = within(rx.recv()).await.unwrap();
                assert_eq!(
                    got,
                    (from, i),
                    "round {round}: message lost or out of order"
                );
            }
        }
        assert!(
            na.is_linked(nb.addr()) && nb.is_linked(na.addr()),
            "round {round}"
        );
        // Exactly one link survives: the loser never came up, or was closed.
        let (sa, sb) = (na.stats(), nb.stats());
        assert_eq!(
            sa.links_opened - sa.links_closed,
            1,
            "round {round}: {sa:?}"
        );
        assert_eq!(
            sb.links_opened - sb.links_closed,
            1,
            "round {round}: {sb:?}"
        );
        raced += (sa.links_refused + sb.links_refused > 0) as u32;
        na.shutdown().await;
        nb.shutdown().await;
    }
    eprintln!("simultaneous dials refused by the smaller node in {raced} of 100 rounds");
    assert!(raced > 0, "no round exercised a simultaneous dial");
}

#[tokio::test]
async fn a_hundred_thousand_messages_arrive_in_order() {
    const COUNT: u32 = 100_000;
    let mut c = Cluster::new(&["1.1.1", "1.2.1"]);
    let (tx, mut rx) = mpsc::channel(COUNT as usize);
    let receiver = c.start("1.2.1", |b| collector(b, tx)).await;
    let sender = c.start("1.1.1", |b| b).await;
    let to = receiver.addr();
    let send = tokio::spawn(async move {
        for i in 0..COUNT {
            sender.send_cmd(to, Cmd(1), n(i)).await.unwrap();
        }
        sender
    });
    for i in 0..COUNT {
        let (_, got) = within(rx.recv()).await.unwrap();
        assert_eq!(got, i);
    }
    let sender = within(send).await.unwrap();
    assert_eq!(receiver.stats().messages_received, u64::from(COUNT));
    assert_eq!(
        sender.stats().envelopes_lost + sender.stats().envelopes_expired,
        0
    );
    // The receiver acknowledges every message although it sends nothing back (its sweep,
    // every 100 ms): the sender's gauge of unconfirmed envelopes goes to 0 with the link up.
    let admin = clustergo::admin::Admin::new().node(&sender);
    let gauge = format!("clustergo_peer_unconfirmed{{node=\"1.1.1\",peer=\"{to}\"}} ");
    let settled = within(async {
        loop {
            let text = admin.metrics_text();
            let line = text
                .lines()
                .find(|l| l.starts_with(&gauge))
                .map(str::to_owned);
            if line.as_deref().is_some_and(|l| l.ends_with(" 0")) {
                return line;
            }
            // A metric is read, not awaited: poll it.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(settled.is_some());
    assert!(sender.is_linked(to));
    // And when the receiver shuts down, the link ends with nothing unconfirmed.
    receiver.shutdown().await;
    assert!(sender.wait_linked(to, false, Duration::from_secs(10)).await);
    assert_eq!(sender.stats().envelopes_unconfirmed, 0);
    assert_eq!(sender.stats().links_closed, 1);
}

#[tokio::test]
async fn a_full_queue_is_an_error_to_the_sender_never_a_hang() {
    let members = MemoryDiscovery::default();
    let (la, na) = bind();
    // A peer address that accepts TCP but never speaks HTTP/2: the dial hangs until its
    // timeout, so everything sent meanwhile waits in the queue.
    let (silent, nb) = bind();
    members.upsert(Member::new(a("1.1.1"), na));
    members.upsert(Member::new(a("1.2.1"), nb));
    let node = Node::builder(a("1.1.1"))
        .discovery(members)
        .config(
            test_config()
                .peer_queue(16)
                .send_timeout(Duration::from_millis(200))
                .dial_timeout(Duration::from_secs(3)),
        )
        .listener(la)
        .build();
    within(node.start()).await.unwrap();
    for i in 0..16 {
        node.try_send_cmd(a("1.2.1"), Cmd(1), n(i)).unwrap();
    }
    let e = node.try_send_cmd(a("1.2.1"), Cmd(1), n(16)).unwrap_err();
    assert_eq!(
        e,
        RpcError::QueueFull {
            peer: a("1.2.1"),
            capacity: 16
        }
    );
    // The waiting form gives up at its deadline with the same error.
    let e = within(node.send_cmd(a("1.2.1"), Cmd(1), n(17)))
        .await
        .unwrap_err();
    assert!(matches!(e, RpcError::QueueFull { .. }), "{e:?}");
    // A call waits no longer than its own deadline either.
    let started = tokio::time::Instant::now();
    let e = within(node.call_timeout(a("1.2.1"), "x", Bytes::new(), Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert!(
        matches!(e, RpcError::QueueFull { .. } | RpcError::Timeout { .. }),
        "{e:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "{:?}",
        started.elapsed()
    );
    // Other peers and the node itself are unaffected.
    assert!(node.try_send_cmd(a("1.1.1"), Cmd(9), Bytes::new()).is_ok());
    drop(silent);
    node.shutdown().await;
}

#[tokio::test]
async fn messages_by_protobuf_type_and_unknown_types() {
    #[derive(Clone, PartialEq, prost::Message)]
    struct Move {
        #[prost(uint32, tag = "1")]
        x: u32,
        #[prost(string, tag = "2")]
        who: String,
    }
    impl prost::Name for Move {
        const NAME: &'static str = "Move";
        const PACKAGE: &'static str = "game.v1";
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct Unhandled {
        #[prost(uint32, tag = "1")]
        y: u32,
    }
    impl prost::Name for Unhandled {
        const NAME: &'static str = "Unhandled";
        const PACKAGE: &'static str = "game.v1";
    }
    let mut c = Cluster::new(&["1.1.1", "1.2.1"]);
    let got = Arc::new(Mutex::new(Vec::new()));
    let (tx, mut rx) = mpsc::channel(8);
    let g = got.clone();
    let receiver = c
        .start("1.2.1", move |b| {
            b.on_message(move |ctx, m: Move| {
                g.lock().unwrap().push((ctx.from(), m));
                tx.try_send(()).unwrap();
            })
        })
        .await;
    let sender = c.start("1.1.1", |b| b).await;
    sender
        .send_message(receiver.addr(), &Unhandled { y: 1 })
        .await
        .unwrap();
    sender
        .send_cmd(receiver.addr(), Cmd(77), Bytes::from_static(b"?"))
        .await
        .unwrap();
    sender
        .send_message(
            receiver.addr(),
            &Move {
                x: 3,
                who: "p1".into(),
            },
        )
        .await
        .unwrap();
    within(rx.recv()).await.unwrap();
    assert_eq!(
        got.lock().unwrap()[0],
        (
            sender.addr(),
            Move {
                x: 3,
                who: "p1".into()
            }
        )
    );
    // The unknown ones were counted (they arrived first, in order) and the link stayed up.
    assert_eq!(receiver.stats().messages_unknown, 2);
    assert_eq!(receiver.stats().links_closed, 0);
    assert!(sender.is_linked(receiver.addr()));
}

#[tokio::test]
async fn admission_checks_secret_and_membership() {
    init_tracing();
    // The server's membership lists 1.1.1 but not 1.1.3; 1.1.2 has the wrong secret.
    let (ls, ns) = bind();
    let (l1, n1) = bind();
    let (l2, n2) = bind();
    let (l3, n3) = bind();
    let server_view = MemoryDiscovery::new([
        Member::new(a("1.2.1"), ns.clone()),
        Member::new(a("1.1.1"), n1.clone()),
        Member::new(a("1.1.2"), n2.clone()),
    ]);
    let everyone = MemoryDiscovery::new([
        Member::new(a("1.2.1"), ns),
        Member::new(a("1.1.1"), n1),
        Member::new(a("1.1.2"), n2),
        Member::new(a("1.1.3"), n3),
    ]);
    let server = Node::builder(a("1.2.1"))
        .discovery(server_view)
        .config(test_config())
        .listener(ls)
        .rpc("echo", |_, p| async move { Ok::<_, HandlerError>(p) })
        .build();
    within(server.start()).await.unwrap();
    let start = |addr: &str, l, secret: &str| {
        let node = Node::builder(a(addr))
            .discovery(everyone.clone())
            .config(test_config().secret(secret))
            .listener(l)
            .build();
        async move {
            within(node.start()).await.unwrap();
            node
        }
    };
    let good = start("1.1.1", l1, "test-secret").await;
    let wrong_secret = start("1.1.2", l2, "not-the-secret").await;
    let unlisted = start("1.1.3", l3, "test-secret").await;

    assert!(
        within(good.call(server.addr(), "echo", Bytes::new()))
            .await
            .is_ok()
    );
    let e = within(wrong_secret.call(server.addr(), "echo", Bytes::new()))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, RpcError::Refused { reason, .. } if reason.contains("failed the cluster secret check")),
        "{e}"
    );
    let e = within(unlisted.call(server.addr(), "echo", Bytes::new()))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, RpcError::Refused { reason, .. } if reason.contains("1.1.3 is not a member this node admits")),
        "{e}"
    );
    // The wrong secret is caught by the dialer (the acceptor's proof fails it), before it
    // sends anything; the acceptor refuses only the unlisted node.
    assert_eq!(server.stats().links_refused, 1);
}

/// A node removed from membership while it runs keeps its link only for what is under way:
/// nothing new goes to it (calls fail at once) and nothing new is taken from it (its calls
/// are dropped); listed again, it gets a fresh link and calls work both ways.
#[tokio::test]
async fn a_removed_node_gets_nothing_new_and_a_fresh_link_when_listed_again() {
    support::init_tracing();
    let mut c = support::Cluster::new(&["1.1.1", "1.1.2"]);
    let echo = |b: clustergo::NodeBuilder| {
        b.rpc("who", |ctx, _| async move {
            Ok::<_, clustergo::HandlerError>(bytes::Bytes::from(ctx.node().addr().to_string()))
        })
    };
    let n1 = c.start("1.1.1", echo).await;
    // 1.1.2 keeps its own membership (where it stays listed): removed only in 1.1.1's view.
    let own = MemoryDiscovery::new([
        c.members.get(a("1.1.1")).unwrap(),
        c.members.get(a("1.1.2")).unwrap(),
    ]);
    let n2 = echo(c.builder("1.1.2").discovery(own)).build();
    within(n2.start()).await.unwrap();
    within(n1.call(a("1.1.2"), "who", bytes::Bytes::new()))
        .await
        .unwrap();
    let listed = c.members.remove(a("1.1.2")).unwrap();
    let gone = |m: &[clustergo::Member]| m.iter().all(|m| m.addr != a("1.1.2"));
    assert!(n1.wait_members(gone, support::WAIT).await);
    let r = within(n1.call(a("1.1.2"), "who", bytes::Bytes::new())).await;
    assert!(
        matches!(r, Err(clustergo::RpcError::NoRoute { .. })),
        "{r:?}"
    );
    // 1.1.2 still lists itself and 1.1.1; its call reaches 1.1.1 over the kept link, and is
    // not taken.
    let before = n1.stats().envelopes_misaddressed;
    let r = within(n2.call_timeout(
        a("1.1.1"),
        "who",
        bytes::Bytes::new(),
        std::time::Duration::from_millis(300),
    ))
    .await;
    assert!(r.is_err(), "{r:?}");
    assert!(n1.stats().envelopes_misaddressed > before);
    // Listed again: a fresh link, calls both ways.
    c.members.upsert(listed);
    let back = |m: &[clustergo::Member]| m.iter().any(|m| m.addr == a("1.1.2"));
    assert!(n1.wait_members(back, support::WAIT).await);
    let r = within(n1.call(a("1.1.2"), "who", bytes::Bytes::new())).await;
    assert_eq!(&r.unwrap()[..], b"1.1.2");
    let r = within(n2.call(a("1.1.1"), "who", bytes::Bytes::new())).await;
    assert_eq!(&r.unwrap()[..], b"1.1.1");
}

/// A node that shuts down in order while another calls it back to back: its last answers
/// are acknowledged before its links end, so it counts nothing as unconfirmed (which would
/// say "may not have arrived" about answers that did).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orderly_shutdown_leaves_nothing_unconfirmed() {
    for round in 0..10 {
        let mut c = Cluster::new(&["1.1.1", "1.1.2"]);
        let a = c
            .start("1.1.1", |b| {
                b.rpc("echo", |_, p| async move { Ok::<_, HandlerError>(p) })
            })
            .await;
        let b = c.start("1.1.2", |b| b).await;
        let (ok_tx, mut ok_rx) = mpsc::channel::<()>(1);
        let caller = {
            let (b, to) = (b.clone(), a.addr());
            tokio::spawn(async move {
                let mut ok = 0u64;
                while b.call(to, "echo", n(1)).await.is_ok() {
                    ok += 1;
                    if ok == 200 {
                        let _ = ok_tx.send(()).await;
                    }
                }
                ok
            })
        };
        within(ok_rx.recv()).await.expect("calls go through");
        a.shutdown().await;
        let calls = within(caller).await.unwrap();
        b.shutdown().await;
        assert!(calls >= 200);
        assert_eq!(a.stats().envelopes_unconfirmed, 0, "round {round}: a");
        // At most the caller's last request, sent as `a` was closing: its call failed.
        assert!(b.stats().envelopes_unconfirmed <= 1, "round {round}: b");
    }
}
