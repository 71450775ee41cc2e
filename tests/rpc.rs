//! RPC between real nodes on loopback: every outcome a caller can see.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clustergo::{ErrorCode, HandlerError, NodeConfig, RpcError};
use support::*;
use tokio::sync::{mpsc, oneshot};

fn echo(b: clustergo::NodeBuilder) -> clustergo::NodeBuilder {
    b.rpc("echo", |_ctx, p| async move { Ok::<_, HandlerError>(p) })
}

#[tokio::test]
async fn call_callback_and_post_between_two_nodes() {
    init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.2.1"]);
    let (post_tx, mut post_rx) = mpsc::channel(4);
    let server = c
        .start("1.2.1", |b| {
            echo(b)
                .rpc("whoami", |ctx, _| async move {
                    Ok::<_, HandlerError>(Bytes::from(ctx.from().to_string()))
                })
                .rpc("note", move |ctx, p| {
                    let tx = post_tx.clone();
                    async move {
                        assert!(ctx.is_oneway());
                        tx.send(p).await.unwrap();
                        Ok::<_, HandlerError>(Bytes::new())
                    }
                })
        })
        .await;
    let client = c.start("1.1.1", |b| b).await;

    let reply = within(client.call(server.addr(), "echo", Bytes::from_static(b"hello"))).await;
    assert_eq!(reply.unwrap(), Bytes::from_static(b"hello"));
    let who = within(client.call(server.addr(), "whoami", Bytes::new()))
        .await
        .unwrap();
    assert_eq!(who, Bytes::from_static(b"1.1.1"));
    assert!(client.is_linked(server.addr()) && server.is_linked(client.addr()));

    let (tx, rx) = oneshot::channel();
    client.call_with_callback(
        server.addr(),
        "echo",
        Bytes::from_static(b"cb"),
        Duration::from_secs(5),
        move |r| tx.send(r).unwrap(),
    );
    assert_eq!(
        within(rx).await.unwrap().unwrap(),
        Bytes::from_static(b"cb")
    );

    within(client.post(server.addr(), "note", Bytes::from_static(b"one-way")))
        .await
        .unwrap();
    assert_eq!(
        within(post_rx.recv()).await.unwrap(),
        Bytes::from_static(b"one-way")
    );
    // One link serves both directions.
    let reply = within(server.call(client.addr(), "echo", Bytes::new())).await;
    assert!(matches!(reply, Err(RpcError::NoMethod { .. })), "{reply:?}");
    assert_eq!(client.stats().links_opened, 1);
    assert_eq!(server.stats().links_opened, 1);
}

#[tokio::test]
async fn the_deadline_travels_with_the_request() {
    let mut c = Cluster::new(&["1.1.1", "1.2.1"]);
    let server = c
        .start("1.2.1", |b| {
            b.rpc("left", |ctx, _| async move {
                let left = ctx.deadline().unwrap() - tokio::time::Instant::now();
                Ok::<_, HandlerError>(Bytes::from(left.as_millis().to_string()))
            })
        })
        .await;
    let client = c.start("1.1.1", |b| b).await;
    let left = within(client.call_timeout(
        server.addr(),
        "left",
        Bytes::new(),
        Duration::from_millis(1500),
    ))
    .await
    .unwrap();
    let ms: u64 = std::str::from_utf8(&left).unwrap().parse().unwrap();
    assert!((1000..=1500).contains(&ms), "handler saw {ms} ms left");
}

#[tokio::test]
async fn handler_failures_give_typed_errors() {
    init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.2.1"]);
    let server = c
        .start("1.2.1", |b| {
            b.rpc("fail", |_, _| async move {
                Err::<Bytes, _>(HandlerError::new(150, "no gold"))
            })
            .rpc("panic", |_, _| async move {
                if true {
                    panic!("async boom");
                }
                Ok::<_, HandlerError>(Bytes::new())
            })
            .rpc_with_replyer("drop", |_, _, replyer| drop(replyer))
            .rpc_with_replyer("panic-sync", |_, _, _replyer| panic!("sync boom"))
            .rpc_with_replyer("later", |_, p, replyer| {
                std::thread::spawn(move || replyer.reply(Ok(p)));
            })
        })
        .await;
    let client = c.start("1.1.1", |b| b).await;
    let to = server.addr();
    let call = |m: &'static str| {
        let client = client.clone();
        async move { within(client.call(to, m, Bytes::from_static(b"x"))).await }
    };

    let e = call("fail").await.unwrap_err();
    assert_eq!(
        e,
        RpcError::Remote {
            to,
            code: ErrorCode(150),
            message: "no gold".into()
        }
    );
    let e = call("panic").await.unwrap_err();
    assert!(
        matches!(&e, RpcError::Remote { code: ErrorCode::PANICKED, message, .. } if message.contains("async boom")),
        "{e:?}"
    );
    let e = call("drop").await.unwrap_err();
    assert!(
        matches!(
            e,
            RpcError::Remote {
                code: ErrorCode::NO_REPLY,
                ..
            }
        ),
        "{e:?}"
    );
    let e = call("panic-sync").await.unwrap_err();
    assert!(
        matches!(
            e,
            RpcError::Remote {
                code: ErrorCode::PANICKED,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(call("later").await.unwrap(), Bytes::from_static(b"x"));
    let e = call("missing").await.unwrap_err();
    assert_eq!(
        e,
        RpcError::NoMethod {
            to,
            method: "missing".into()
        }
    );
    assert_eq!(e.to_string(), "1.2.1 has no handler for method \"missing\"");
    // The link survived all of it.
    assert_eq!(call("later").await.unwrap(), Bytes::from_static(b"x"));
    assert_eq!(client.stats().links_opened, 1);
}

#[tokio::test]
async fn over_the_concurrency_limit_the_caller_gets_busy() {
    let mut c = Cluster::new(&["1.1.1", "1.2.1"]);
    let (started_tx, mut started_rx) = mpsc::channel::<()>(4);
    let release = Arc::new(tokio::sync::Notify::new());
    let r2 = release.clone();
    let server = c
        .start("1.2.1", move |b| {
            b.config(test_config().max_concurrent_requests(1))
                .rpc("hold", move |_, _| {
                    let started = started_tx.clone();
                    let release = r2.clone();
                    async move {
                        started.send(()).await.unwrap();
                        release.notified().await;
                        Ok::<_, HandlerError>(Bytes::from_static(b"done"))
                    }
                })
        })
        .await;
    let client = c.start("1.1.1", |b| b).await;
    let first = tokio::spawn({
        let client = client.clone();
        let to = server.addr();
        async move { client.call(to, "hold", Bytes::new()).await }
    });
    within(started_rx.recv()).await.unwrap();
    let e = within(client.call(server.addr(), "hold", Bytes::new()))
        .await
        .unwrap_err();
    assert_eq!(e, RpcError::Busy { to: server.addr() });
    release.notify_one();
    assert_eq!(
        within(first).await.unwrap().unwrap(),
        Bytes::from_static(b"done")
    );
}

#[tokio::test]
async fn oversize_payloads_fail_at_the_sender() {
    let mut c = Cluster::new(&["1.1.1", "1.2.1"]);
    let cfg = test_config().max_envelope(1024);
    let server = c
        .start("1.2.1", |b| {
            b.config(cfg.clone()).rpc("big", |_, _| async move {
                Ok::<_, HandlerError>(Bytes::from(vec![0u8; 2048]))
            })
        })
        .await;
    let client = c.start("1.1.1", |b| echo(b.config(cfg.clone()))).await;
    let big = Bytes::from(vec![0u8; 1025]);
    let e = client
        .call(server.addr(), "echo", big.clone())
        .await
        .unwrap_err();
    // The method name rides in the same envelope and counts too.
    assert_eq!(
        e,
        RpcError::TooLarge {
            size: 1025 + "echo".len(),
            limit: 1024
        }
    );
    assert!(matches!(
        client.post(server.addr(), "x", big.clone()).await,
        Err(RpcError::TooLarge { .. })
    ));
    assert!(matches!(
        client.try_send_cmd(server.addr(), clustergo::Cmd(1), big),
        Err(RpcError::TooLarge { .. })
    ));
    // A response over the limit turns into an error response, not a broken link.
    let e = within(client.call(server.addr(), "big", Bytes::new()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            RpcError::Remote {
                code: ErrorCode::TOO_LARGE,
                ..
            }
        ),
        "{e:?}"
    );
    // Exactly at the limit is fine.
    let ok = within(server.call(client.addr(), "echo", Bytes::from(vec![1u8; 1020]))).await;
    assert_eq!(ok.unwrap().len(), 1020);
}

#[tokio::test]
async fn an_oversize_envelope_from_a_peer_closes_only_that_link() {
    init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.2.1", "1.3.1"]);
    let server = c
        .start("1.2.1", |b| {
            echo(b.config(test_config().max_envelope(1024)))
        })
        .await;
    // This sender allows more than the server does, so the server sees an oversize envelope.
    let loose = c
        .start("1.1.1", |b| b.config(test_config().max_envelope(1 << 20)))
        .await;
    let other = c.start("1.3.1", |b| b).await;
    assert!(
        within(other.call(server.addr(), "echo", Bytes::from_static(b"a")))
            .await
            .is_ok()
    );
    let e = within(loose.call(server.addr(), "echo", Bytes::from(vec![0u8; 4096])))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, RpcError::PeerLost { cause, .. } if cause.contains("closed by the peer") || cause.contains("transport")),
        "{e:?}"
    );
    // The other link is untouched, and the offender can reconnect with small payloads.
    assert!(
        within(other.call(server.addr(), "echo", Bytes::from_static(b"b")))
            .await
            .is_ok()
    );
    assert!(
        within(loose.call(server.addr(), "echo", Bytes::from_static(b"c")))
            .await
            .is_ok()
    );
    assert_eq!(other.stats().links_opened, 1);
}

#[tokio::test]
async fn a_listed_peer_that_is_not_running_fails_within_the_deadline() {
    let mut c = Cluster::new(&["1.1.1", "1.2.1"]);
    // A long redial backoff, so the call below certainly falls within it.
    let client = c
        .start("1.1.1", |b| {
            b.config(test_config().redial_backoff(Duration::from_secs(30)))
        })
        .await;
    // 1.2.1's port is held by the harness but nobody serves it: drop it so dials are refused.
    drop(c.builder("1.2.1"));
    let started = tokio::time::Instant::now();
    let e = within(client.call_timeout(a("1.2.1"), "echo", Bytes::new(), Duration::from_secs(2)))
        .await
        .unwrap_err();
    assert!(
        matches!(e, RpcError::PeerLost { .. } | RpcError::Timeout { .. }),
        "{e:?}"
    );
    assert!(started.elapsed() <= Duration::from_millis(2100));
    // During the redial backoff, a call waits for the next dial within its own deadline
    // (here shorter than the backoff) instead of failing with the last dial's error, which
    // could be stale by now.
    let e2 =
        within(client.call_timeout(a("1.2.1"), "echo", Bytes::new(), Duration::from_millis(300)))
            .await
            .unwrap_err();
    assert!(matches!(e2, RpcError::Timeout { .. }), "{e2:?}");
    // Unknown addresses are no route.
    let e3 = client
        .call(a("1.9.9"), "echo", Bytes::new())
        .await
        .unwrap_err();
    assert_eq!(
        e3,
        RpcError::NoRoute {
            to: a("1.9.9"),
            reason: "not in 1.1.1's membership".into()
        }
    );
}

#[tokio::test]
async fn callbacks_run_exactly_once_even_when_the_call_cannot_be_sent() {
    let mut c = Cluster::new(&["1.1.1"]);
    let node = c.builder("1.1.1").build();
    let count = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = oneshot::channel();
    let n = count.clone();
    node.call_with_callback(
        a("1.1.1"),
        "x",
        Bytes::new(),
        Duration::from_secs(1),
        move |r| {
            n.fetch_add(1, Ordering::SeqCst);
            tx.send(r).unwrap();
        },
    );
    let r = within(rx).await.unwrap();
    assert_eq!(r, Err(RpcError::NotStarted { node: a("1.1.1") }));
    assert_eq!(count.load(Ordering::SeqCst), 1);
    let _ = NodeConfig::default();
}

#[tokio::test]
async fn a_callback_call_keeps_its_place_among_the_callers_sends() {
    let mut c = Cluster::new(&["1.1.1", "1.2.1"]);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (tx, mut rx) = mpsc::channel(4);
    let (s1, s2, t2) = (seen.clone(), seen.clone(), tx.clone());
    let server = c
        .start("1.2.1", move |b| {
            b.rpc_with_replyer("reserve", move |_, _, replyer| {
                s1.lock().unwrap().push("reserve");
                replyer.reply(Ok(Bytes::new()));
            })
            .on_cmd(clustergo::Cmd(1), move |_, _| {
                s2.lock().unwrap().push("commit");
                t2.try_send(()).unwrap();
            })
        })
        .await;
    let client = c.start("1.1.1", |b| b).await;
    for _ in 0..20 {
        seen.lock().unwrap().clear();
        client.call_with_callback(
            server.addr(),
            "reserve",
            Bytes::new(),
            Duration::from_secs(5),
            |r| {
                r.unwrap();
            },
        );
        client
            .try_send_cmd(server.addr(), clustergo::Cmd(1), Bytes::new())
            .unwrap();
        within(rx.recv()).await.unwrap();
        assert_eq!(*seen.lock().unwrap(), ["reserve", "commit"]);
    }
}

#[tokio::test]
async fn application_codes_never_pose_as_framework_codes() {
    let mut c = Cluster::new(&["1.1.1", "1.2.1"]);
    let server = c
        .start("1.2.1", |b| {
            b.rpc("shutdown-code", |_, _| async move {
                Err::<Bytes, _>(HandlerError::new(3, "no gold"))
            })
            .rpc("busy-on-purpose", |_, _| async move {
                Err::<Bytes, _>(HandlerError {
                    code: ErrorCode::BUSY,
                    message: "overloaded".into(),
                })
            })
            .rpc("long-error", |_, _| async move {
                Err::<Bytes, _>(HandlerError::new(100, "x".repeat(1 << 20)))
            })
        })
        .await;
    let client = c.start("1.1.1", |b| b).await;
    let to = server.addr();
    let e = within(client.call(to, "shutdown-code", Bytes::new()))
        .await
        .unwrap_err();
    assert_eq!(
        e,
        RpcError::Remote {
            to,
            code: ErrorCode::HANDLER,
            message: "no gold".into()
        }
    );
    let e = within(client.call(to, "busy-on-purpose", Bytes::new()))
        .await
        .unwrap_err();
    assert_eq!(e, RpcError::Busy { to });
    // An error text far over the batch limit is cut, and the link survives it.
    let e = within(client.call(to, "long-error", Bytes::new()))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, RpcError::Remote { message, .. } if message.len() == 4096),
        "{e:?}"
    );
    assert_eq!(client.stats().links_closed, 0);
}

/// A handler reaches its own node through its context: 1.1.1's handler asks 1.1.2 and
/// answers with what it heard, and a message handler forwards what it got.
#[tokio::test]
async fn handlers_reach_their_own_node_through_the_context() {
    let mut c = Cluster::new(&["1.1.1", "1.1.2"]);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let _n2 = c
        .start("1.1.2", move |b| {
            b.rpc("name", |ctx, _| async move {
                Ok::<_, HandlerError>(Bytes::from(ctx.node().addr().to_string()))
            })
            .on_cmd(clustergo::Cmd(2), move |ctx, p| {
                let _ = tx.send((ctx.node().addr(), ctx.from(), p));
            })
        })
        .await;
    let n1 = c
        .start("1.1.1", |b| {
            b.rpc("relay", |ctx, _| async move {
                let heard = ctx
                    .node()
                    .call(a("1.1.2"), "name", Bytes::new())
                    .await
                    .map_err(|e| HandlerError::msg(e.to_string()))?;
                ctx.node()
                    .send_cmd(a("1.1.2"), clustergo::Cmd(2), heard.clone())
                    .await
                    .map_err(|e| HandlerError::msg(e.to_string()))?;
                Ok::<_, HandlerError>(heard)
            })
        })
        .await;
    let got = within(n1.call(a("1.1.1"), "relay", Bytes::new()))
        .await
        .unwrap();
    assert_eq!(&got[..], b"1.1.2");
    let (at, from, payload) = within(rx.recv()).await.unwrap();
    assert_eq!(
        (at, from, &payload[..]),
        (a("1.1.2"), a("1.1.1"), &b"1.1.2"[..])
    );
}
