//! Node lifecycle: start and its errors, self traffic, graceful shutdown, membership churn.

mod support;

use std::time::Duration;

use bytes::Bytes;
use clustergo::{
    Cmd, Discovery, HandlerError, Member, MembershipEvent, MemoryDiscovery, Node, RpcError,
    SelectError, StartError, membership::MembershipStream,
};
use support::*;
use tokio::sync::mpsc;

#[tokio::test]
async fn a_single_node_calls_and_messages_itself() {
    let mut c = Cluster::new(&["1.1.1"]);
    let (tx, mut rx) = mpsc::channel(4);
    let node = c
        .builder("1.1.1")
        .rpc("echo", |ctx, p| async move {
            assert_eq!(ctx.from().to_string(), "1.1.1");
            Ok::<_, HandlerError>(p)
        })
        .on_cmd(Cmd(5), move |ctx, p| tx.try_send((ctx.from(), p)).unwrap())
        .build();
    // Before start every form fails with a clear error.
    let e = node
        .call(a("1.1.1"), "echo", Bytes::new())
        .await
        .unwrap_err();
    assert_eq!(e, RpcError::NotStarted { node: a("1.1.1") });
    assert_eq!(e.to_string(), "node 1.1.1 is not started");
    assert!(matches!(
        node.try_send_cmd(a("1.1.1"), Cmd(5), Bytes::new()),
        Err(RpcError::NotStarted { .. })
    ));
    assert_eq!(
        node.get_addr_by_type(1),
        Err(SelectError::NotRunning(a("1.1.1")))
    );

    within(node.start()).await.unwrap();
    assert!(matches!(
        node.start().await,
        Err(StartError::AlreadyStarted(_))
    ));
    let reply = within(node.call(node.addr(), "echo", Bytes::from_static(b"me")))
        .await
        .unwrap();
    assert_eq!(reply, Bytes::from_static(b"me"));
    node.send_cmd(node.addr(), Cmd(5), Bytes::from_static(b"note"))
        .await
        .unwrap();
    assert_eq!(
        within(rx.recv()).await.unwrap(),
        (a("1.1.1"), Bytes::from_static(b"note"))
    );
    // No network hop: no link was opened.
    assert_eq!(node.stats().links_opened, 0);
    assert_eq!(node.get_addr_by_type(1), Ok(a("1.1.1")));
    assert_eq!(node.get_addr_by_type(7), Err(SelectError::NoneAvailable(7)));
    node.shutdown().await;
    let e = node
        .call(a("1.1.1"), "echo", Bytes::new())
        .await
        .unwrap_err();
    assert_eq!(e, RpcError::Shutdown { node: a("1.1.1") });
}

/// A membership source that never answers.
struct Silent;

impl Discovery for Silent {
    fn subscribe(&self) -> MembershipStream {
        Box::pin(tokio_stream::pending())
    }
}

#[tokio::test]
async fn start_fails_clearly() {
    // Not listed.
    let members = MemoryDiscovery::new([Member::new(a("1.1.2"), "127.0.0.1:1")]);
    let node = Node::builder(a("1.1.1"))
        .discovery(members.clone())
        .config(test_config())
        .build();
    let e = within(node.start()).await.unwrap_err();
    assert!(matches!(e, StartError::NotInMembership(_)));
    assert_eq!(e.to_string(), "node 1.1.1 is not in membership");
    // A failed start can be retried once the node is listed.
    let (l, net) = bind();
    members.upsert(Member::new(a("1.1.1"), net));
    let node = Node::builder(a("1.1.1"))
        .discovery(members)
        .config(test_config())
        .listener(l)
        .build();
    within(node.start()).await.unwrap();
    node.shutdown().await;

    // No snapshot within the start timeout.
    let node = Node::builder(a("1.1.1"))
        .discovery(Silent)
        .config(test_config().start_timeout(Duration::from_millis(100)))
        .build();
    let e = within(node.start()).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "node 1.1.1: no membership snapshot within 100ms"
    );

    // A duplicate registration is a configuration error naming it.
    let node = Node::builder(a("1.1.1"))
        .rpc("x", |_, p| async move { Ok::<_, HandlerError>(p) })
        .rpc("x", |_, p| async move { Ok::<_, HandlerError>(p) })
        .build();
    let e = within(node.start()).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("RPC method \"x\" is registered twice"),
        "{e}"
    );

    // The port is taken.
    let (held, net) = bind();
    let node = Node::builder(a("1.1.1"))
        .discovery(MemoryDiscovery::new([Member::new(a("1.1.1"), net.clone())]))
        .build();
    let e = within(node.start()).await.unwrap_err();
    assert!(
        matches!(&e, StartError::Bind { net_addr, .. } if *net_addr == net),
        "{e}"
    );
    drop(held);
    let _ = MembershipEvent::Remove(a("1.1.1"));
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_calls() {
    init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.2.1"]);
    let (entered_tx, mut entered) = mpsc::channel::<()>(1);
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let r = release.clone();
    // The handler calls back out while its node drains, as a game server saving a player
    // to a database node would.
    let me: std::sync::Arc<std::sync::OnceLock<Node>> = Default::default();
    let me2 = me.clone();
    let server = c
        .start("1.2.1", move |b| {
            b.rpc("slow", move |ctx, p| {
                let entered = entered_tx.clone();
                let release = r.clone();
                let me = me2.clone();
                async move {
                    entered.send(()).await.unwrap();
                    release.notified().await;
                    let node = me.get().unwrap();
                    node.call(ctx.from(), "audit", p)
                        .await
                        .map_err(|e| HandlerError::msg(e.to_string()))
                }
            })
            .rpc("echo", |_, p| async move { Ok::<_, HandlerError>(p) })
        })
        .await;
    me.set(server.clone()).unwrap();
    let client = c
        .start("1.1.1", |b| {
            b.rpc("audit", |_, p| async move {
                Ok::<_, HandlerError>(Bytes::from([&b"audited: "[..], &p[..]].concat()))
            })
        })
        .await;
    let to = server.addr();
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .call(to, "slow", Bytes::from_static(b"finish me"))
                .await
        }
    });
    within(entered.recv()).await.unwrap();
    let shutting = tokio::spawn({
        let server = server.clone();
        async move { server.shutdown().await }
    });
    // Once draining, new calls to the node are refused with Shutdown.
    let refused = loop {
        match within(client.call(to, "echo", Bytes::new())).await {
            Ok(_) => tokio::task::yield_now().await,
            Err(e) => break e,
        }
    };
    assert_eq!(refused, RpcError::Shutdown { node: to });
    assert!(!server.is_running());
    // The in-flight handler still finishes, calling out on the way, and its reply arrives.
    release.notify_one();
    assert_eq!(
        within(in_flight).await.unwrap().unwrap(),
        Bytes::from_static(b"audited: finish me")
    );
    within(shutting).await.unwrap();
    within(server.closed()).await;
    // Once closed, the node itself can send nothing.
    assert_eq!(
        server.call(client.addr(), "audit", Bytes::new()).await,
        Err(RpcError::Shutdown { node: to })
    );
    // The client sees the link go and fails fast afterwards.
    assert!(client.wait_linked(to, false, WAIT).await);
    let e = within(client.call(to, "echo", Bytes::new()))
        .await
        .unwrap_err();
    assert!(matches!(e, RpcError::PeerLost { .. }), "{e:?}");
}

#[tokio::test]
async fn membership_churn() {
    init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.2.1", "1.2.2"]);
    let echo =
        |b: clustergo::NodeBuilder| b.rpc("echo", |_, p| async move { Ok::<_, HandlerError>(p) });
    let me = c.start("1.1.1", echo).await;
    let b1 = c.start("1.2.1", echo).await;
    let b2 = c.start("1.2.2", echo).await;
    let m = &c.members;

    // Unavailable: never picked, still callable directly.
    m.set_available(b1.addr(), false);
    assert!(
        me.wait_for_member(b1.addr(), |x| x.is_some_and(|x| !x.available), WAIT)
            .await
    );
    for _ in 0..100 {
        assert_eq!(me.get_addr_by_type(2), Ok(b2.addr()));
    }
    for key in 0..100 {
        assert_eq!(me.get_addr_by_type_sticky(2, key), Ok(b2.addr()));
    }
    assert!(
        within(me.call(b1.addr(), "echo", Bytes::new()))
            .await
            .is_ok()
    );
    m.set_available(b2.addr(), false);
    assert!(
        me.wait_for_member(b2.addr(), |x| x.is_some_and(|x| !x.available), WAIT)
            .await
    );
    assert_eq!(me.get_addr_by_type(2), Err(SelectError::NoneAvailable(2)));
    m.set_available(b1.addr(), true);
    m.set_available(b2.addr(), true);
    assert!(
        me.wait_for_member(b2.addr(), |x| x.is_some_and(|x| x.available), WAIT)
            .await
    );
    let sticky = me.get_addr_by_type_sticky(2, 42).unwrap();
    assert_eq!(me.get_addr_by_type_sticky(2, 42).unwrap(), sticky);

    // A changed network address: the old process goes away (its own entry moved), a new one
    // serves the new address, and the next dial uses it.
    assert!(
        within(me.call(b2.addr(), "echo", Bytes::new()))
            .await
            .is_ok()
    );
    let (l, net) = bind();
    m.set_net_addr(b2.addr(), net);
    within(b2.closed()).await;
    assert!(me.wait_linked(b2.addr(), false, WAIT).await);
    let b2_new = Node::builder(b2.addr())
        .discovery(m.clone())
        .config(test_config())
        .listener(l);
    let b2_new = echo(b2_new).build();
    within(b2_new.start()).await.unwrap();
    assert!(
        within(me.call(b2.addr(), "echo", Bytes::from_static(b"moved")))
            .await
            .is_ok()
    );
    assert!(b2_new.is_linked(me.addr()));

    // A removed peer's link is closed; calls to it are then no route.
    assert!(me.is_linked(b1.addr()));
    m.remove(b1.addr());
    assert!(me.wait_linked(b1.addr(), false, WAIT).await);
    let e = me.call(b1.addr(), "echo", Bytes::new()).await.unwrap_err();
    assert!(matches!(e, RpcError::NoRoute { .. }), "{e:?}");
    // ... and removing a node's own entry shut that node down.
    within(b1.closed()).await;

    // Removing our own entry shuts us down.
    m.remove(me.addr());
    within(me.closed()).await;
    assert!(matches!(
        me.call(b2.addr(), "echo", Bytes::new()).await,
        Err(RpcError::Shutdown { .. })
    ));
}

#[tokio::test]
async fn a_removed_peer_is_dropped_while_it_keeps_running() {
    // Each node has its own membership source, so only the caller's view changes.
    let (la, na) = bind();
    let (lb, nb) = bind();
    let both = [Member::new(a("1.1.1"), na), Member::new(a("1.1.2"), nb)];
    let view_a = MemoryDiscovery::new(both.clone());
    let view_b = MemoryDiscovery::new(both);
    let echo =
        |b: clustergo::NodeBuilder| b.rpc("echo", |_, p| async move { Ok::<_, HandlerError>(p) });
    let na = echo(
        Node::builder(a("1.1.1"))
            .discovery(view_a.clone())
            .config(test_config())
            .listener(la),
    )
    .build();
    let nb = echo(
        Node::builder(a("1.1.2"))
            .discovery(view_b)
            .config(test_config())
            .listener(lb),
    )
    .build();
    within(na.start()).await.unwrap();
    within(nb.start()).await.unwrap();
    assert!(
        within(na.call(nb.addr(), "echo", Bytes::new()))
            .await
            .is_ok()
    );
    view_a.remove(nb.addr());
    assert!(na.wait_linked(nb.addr(), false, WAIT).await);
    assert!(nb.wait_linked(na.addr(), false, WAIT).await);
    assert!(nb.is_running());
    // nb may still dial na, but na no longer admits it.
    let e = within(nb.call(na.addr(), "echo", Bytes::new()))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, RpcError::Refused { reason, .. } if reason.contains("1.1.2 is not a member this node admits")),
        "{e}"
    );
}

#[tokio::test]
async fn calls_waiting_on_a_dropped_link_fail_at_once() {
    let mut c = Cluster::new(&["1.1.1", "1.2.1"]);
    let (entered_tx, mut entered) = mpsc::channel::<()>(1);
    let server = c
        .start("1.2.1", move |b| {
            b.config(test_config().shutdown_grace(Duration::from_millis(100)))
                .rpc("forever", move |_, _| {
                    let entered = entered_tx.clone();
                    async move {
                        entered.send(()).await.unwrap();
                        std::future::pending::<()>().await;
                        Ok::<_, HandlerError>(Bytes::new())
                    }
                })
        })
        .await;
    let client = c.start("1.1.1", |b| b).await;
    let to = server.addr();
    let started = tokio::time::Instant::now();
    let call = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .call_timeout(to, "forever", Bytes::new(), Duration::from_secs(30))
                .await
        }
    });
    within(entered.recv()).await.unwrap();
    // The server gives up on its stuck handler after the grace period and closes its links.
    server.shutdown().await;
    let e = within(call).await.unwrap().unwrap_err();
    assert!(
        matches!(e, RpcError::PeerLost { peer, .. } if peer == to),
        "{e:?}"
    );
    // Grace (100 ms) plus link teardown, far inside the call's 30 s deadline.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "waited {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn shutdown_while_starting_returns_once_start_ends() {
    let node = Node::builder(a("1.1.1"))
        .discovery(Silent)
        .config(test_config().start_timeout(Duration::from_millis(300)))
        .build();
    let starting = tokio::spawn({
        let node = node.clone();
        async move { node.start().await }
    });
    // Let start reach its wait for the first snapshot.
    tokio::task::yield_now().await;
    within(node.shutdown()).await;
    assert!(matches!(
        within(starting).await.unwrap(),
        Err(StartError::MembershipTimeout { .. })
    ));
    within(node.closed()).await;
    assert!(matches!(
        node.start().await,
        Err(StartError::AlreadyStarted(_))
    ));
}
