//! The game server's session layer in process: a node plays the gateway, opening session
//! streams and speaking the session wire, to check the node-wide bounds.

mod support;

use bytes::{Bytes, BytesMut};
use clustergo::session::{META_SESSION, SessionConfig};
use clustergo::{Node, Stream, StreamMeta};
use clustergo_client::session::{Frame, parse_close};
use clustergo_client::wire::{self, Inbound};
use support::{Cluster, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A game whose session sends `fill:N` frames of 300 bytes on request, then echoes.
fn game(config: SessionConfig) -> impl FnOnce(clustergo::NodeBuilder) -> clustergo::NodeBuilder {
    move |b| {
        b.on_session(config, |mut s| async move {
            while let Ok(Some(f)) = s.recv().await {
                let n = std::str::from_utf8(&f)
                    .ok()
                    .and_then(|t| t.strip_prefix("fill:"))
                    .and_then(|n| n.parse::<usize>().ok());
                match n {
                    Some(n) => {
                        for _ in 0..n {
                            if s.send(Bytes::from(vec![7u8; 299])).await.is_err() {
                                return;
                            }
                        }
                    }
                    None if s.send(f).await.is_err() => return,
                    None => {}
                }
            }
        })
    }
}

/// One side of a session stream, as a gateway sees it: wire frames both ways.
struct Conn {
    stream: Stream,
    buf: BytesMut,
}

impl Conn {
    async fn open(gw: &Node, server: clustergo::LogicAddr, kind: Option<&str>) -> Conn {
        let mut meta = StreamMeta::new();
        if let Some(k) = kind {
            meta.insert(META_SESSION, k);
        }
        let stream = within(gw.open_stream_with(server, meta)).await.unwrap();
        Conn {
            stream,
            buf: BytesMut::new(),
        }
    }

    async fn send(&mut self, payload: &[u8]) {
        let mut b = BytesMut::new();
        wire::put_frame(&mut b, payload);
        self.stream.write_all(&b).await.unwrap();
    }

    async fn next(&mut self) -> Inbound {
        within(async {
            loop {
                if let Some(u) = wire::decode(&mut self.buf, 1 << 20).unwrap() {
                    return u;
                }
                if self.stream.read_buf(&mut self.buf).await.unwrap() == 0 {
                    return Inbound::Close("end of stream".into());
                }
            }
        })
        .await
    }

    /// The next session frame (a data frame of the wire).
    async fn frame(&mut self) -> Frame {
        match self.next().await {
            Inbound::Data(d) => Frame::decode(d).unwrap(),
            other => panic!("wanted a session frame, got {other:?}"),
        }
    }
}

/// All sessions of a node together hold at most `max_replay_total` unacknowledged bytes: a
/// session whose send would pass it ends with 4004, the others go on, and what an
/// acknowledgement frees is usable again.
#[tokio::test]
async fn the_node_wide_replay_budget_holds() {
    let mut c = Cluster::new(&["1.1.1", "1.100.1"]);
    let config = SessionConfig::default().max_replay_total(1000);
    let server = c.start("1.1.1", game(config)).await;
    let gw = c.start("1.100.1", |b| b).await;
    let mut a = Conn::open(&gw, server.addr(), Some("new")).await;
    assert!(matches!(
        a.frame().await,
        Frame::Welcome { received: 0, .. }
    ));
    a.send(&Frame::data(b"fill:3")).await;
    for _ in 0..3 {
        assert!(matches!(a.frame().await, Frame::Data(d) if d.len() == 299));
    }
    // 900 bytes held for `a` (never acknowledged): `b`'s first 300 do not fit.
    let mut b = Conn::open(&gw, server.addr(), Some("new")).await;
    assert!(matches!(b.frame().await, Frame::Welcome { .. }));
    b.send(&Frame::data(b"fill:1")).await;
    match b.next().await {
        Inbound::Close(reason) => assert_eq!(parse_close(&reason).0, Some(4004), "{reason}"),
        other => panic!("wanted the session ended, got {other:?}"),
    }
    // `a` acknowledges; a new session fits again, and `a` still echoes.
    a.send(&Frame::Ack(3).encode()).await;
    a.send(&Frame::data(b"ping")).await;
    assert_eq!(a.frame().await, Frame::Data(Bytes::from_static(b"ping")));
    let mut c2 = Conn::open(&gw, server.addr(), Some("new")).await;
    assert!(matches!(c2.frame().await, Frame::Welcome { .. }));
    c2.send(&Frame::data(b"fill:1")).await;
    assert!(matches!(c2.frame().await, Frame::Data(d) if d.len() == 299));
}

/// Version 1 sessions count against `max_sessions` too.
#[tokio::test]
async fn version_1_sessions_count_against_the_limit() {
    let mut c = Cluster::new(&["1.1.1", "1.100.1"]);
    let server = c
        .start("1.1.1", game(SessionConfig::default().max_sessions(1)))
        .await;
    let gw = c.start("1.100.1", |b| b).await;
    let mut v1 = Conn::open(&gw, server.addr(), None).await;
    v1.send(b"hello").await;
    assert_eq!(v1.next().await, Inbound::Data(Bytes::from_static(b"hello")));
    let mut refused = Conn::open(&gw, server.addr(), Some("new")).await;
    match refused.next().await {
        Inbound::Close(reason) => assert_eq!(parse_close(&reason).0, Some(1013), "{reason}"),
        other => panic!("wanted a refusal, got {other:?}"),
    }
    // The first one ends (the gateway ends its side); once the server has ended its side
    // too, the place is free again.
    v1.stream.shutdown().await.unwrap();
    assert_eq!(v1.next().await, Inbound::Close("end of stream".into()));
    let mut next = Conn::open(&gw, server.addr(), Some("new")).await;
    assert!(matches!(next.frame().await, Frame::Welcome { .. }));
}

/// The value of `clustergo_<name>` for `labels` on `node`'s metrics, if shown.
fn metric(admin: &clustergo::admin::Admin, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("clustergo_{name}{{{labels}}} ");
    admin
        .metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
}

/// Waits until the metric reads `want` (a gauge is read, not awaited: it is polled).
async fn metric_reaches(admin: &clustergo::admin::Admin, name: &str, labels: &str, want: f64) {
    let mut last = None;
    let reached = tokio::time::timeout(support::WAIT, async {
        loop {
            last = metric(admin, name, labels);
            if last == Some(want) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        reached.is_ok(),
        "{name}{{{labels}}} is {last:?}, never {want}"
    );
}

/// What the game has not read yet is bounded per session (`inbox_bytes`) and for all of the
/// node's sessions (`max_inbox_total`): past its own bound a session stops reading its client
/// (the stream's window holds the client back) while the others go on; past the node's, every
/// session waits its turn. Nothing is dropped: once the game reads, everything arrives, in
/// order, and the budget is whole again.
#[tokio::test]
async fn the_inbox_budgets_hold_input_the_game_has_not_read() {
    let mut c = Cluster::new(&["1.1.1", "1.100.1"]);
    let (release, held) = tokio::sync::watch::channel(false);
    let config = SessionConfig::default()
        .inbox(10_000, 8 << 10)
        .max_inbox_total(12 << 10);
    let server = c
        .start("1.1.1", move |b| {
            b.on_session(config, move |mut s| {
                let mut held = held.clone();
                async move {
                    while let Ok(Some(f)) = s.recv().await {
                        // A game stuck on this session until the test releases it.
                        if &f[..] == b"hold" {
                            if s.send("held").await.is_err() {
                                return;
                            }
                            let _ = held.wait_for(|r| *r).await;
                        } else if s.send(f).await.is_err() {
                            return;
                        }
                    }
                }
            })
        })
        .await;
    let gw = c.start("1.100.1", |b| b).await;
    let admin = clustergo::admin::Admin::new().node(&server);
    let node = "node=\"1.1.1\"";
    let inbox = |want: f64| metric_reaches(&admin, "session_inbox_bytes", node, want);
    let mut live = Conn::open(&gw, server.addr(), Some("new")).await;
    assert!(matches!(live.frame().await, Frame::Welcome { .. }));
    // A stuck session, sent 100 frames of 1,000 bytes by a writer of its own, until its own
    // bound (8 KiB) holds 8 of them.
    let mut stuck = Vec::new();
    let mut stick = async || {
        let mut conn = Conn::open(&gw, server.addr(), Some("new")).await;
        assert!(matches!(conn.frame().await, Frame::Welcome { .. }));
        conn.send(&Frame::data(b"hold")).await;
        assert_eq!(conn.frame().await, Frame::Data(Bytes::from_static(b"held")));
        let (rd, mut wr) = conn.stream.into_split();
        let writer = tokio::spawn(async move {
            for i in 0..100u8 {
                let mut b = BytesMut::new();
                wire::put_frame(&mut b, &Frame::data(&[i; 1000]));
                wr.write_all(&b).await.unwrap();
            }
            wr
        });
        stuck.push((rd, conn.buf, writer));
    };
    stick().await;
    // Its first frame is its own, the other 7 come from the node's pool.
    inbox(8000.0).await;
    live.send(&Frame::data(b"ping")).await;
    assert_eq!(live.frame().await, Frame::Data(Bytes::from_static(b"ping")));
    // A second one: its own first frame, and the 5 more the pool (12 KiB) has room for.
    stick().await;
    inbox(14000.0).await;
    assert_eq!(
        metric(&admin, "sessions", "node=\"1.1.1\",state=\"attached\""),
        Some(3.0)
    );
    // The pool is spent, and a session whose game keeps up still goes on.
    for _ in 0..20 {
        live.send(&Frame::data(b"still")).await;
        assert_eq!(
            live.frame().await,
            Frame::Data(Bytes::from_static(b"still"))
        );
    }
    assert_eq!(metric(&admin, "session_inbox_bytes", node), Some(14000.0));
    // The game reads again: every frame comes back, once, in order.
    release.send_replace(true);
    for (mut rd, mut buf, writer) in stuck {
        for i in 0..100u8 {
            // The next data frame (the server's acknowledgements come in between).
            let got = within(async {
                loop {
                    match wire::decode(&mut buf, 1 << 20).unwrap() {
                        Some(Inbound::Data(d)) => match Frame::decode(d).unwrap() {
                            Frame::Ack(_) => {}
                            f => return f,
                        },
                        Some(other) => panic!("wanted a frame, got {other:?}"),
                        None => {
                            assert!(rd.read_buf(&mut buf).await.unwrap() > 0, "stream ended")
                        }
                    }
                }
            })
            .await;
            assert_eq!(got, Frame::Data(Bytes::from(vec![i; 1000])));
        }
        within(writer).await.unwrap();
    }
    inbox(0.0).await;
    assert_eq!(metric(&admin, "sessions_started_total", node), Some(3.0));
}

/// A node that shuts down ends its sessions at once, each client told `1012`, and waits
/// (within its grace period) for their handlers, which can still call other nodes: a game
/// saves its player after its session ended.
#[tokio::test]
async fn shutdown_ends_sessions_and_waits_for_their_handlers() {
    use std::sync::{Arc, OnceLock};
    let mut c = Cluster::new(&["1.1.1", "1.2.1", "1.100.1"]);
    let (saved_tx, mut saved) = tokio::sync::mpsc::channel::<Bytes>(4);
    let db = c
        .start("1.2.1", move |b| {
            b.rpc("db.save", move |_, p| {
                let saved_tx = saved_tx.clone();
                async move {
                    let _ = saved_tx.send(p).await;
                    Ok::<_, clustergo::HandlerError>(Bytes::new())
                }
            })
        })
        .await;
    let db_addr = db.addr();
    let me: Arc<OnceLock<Node>> = Arc::default();
    let node = me.clone();
    let server = c
        .start("1.1.1", move |b| {
            b.on_session(SessionConfig::default(), move |mut s| {
                let node = node.clone();
                async move {
                    let end = loop {
                        match s.recv().await {
                            Ok(Some(f)) => {
                                let _ = s.send(f).await;
                            }
                            Ok(None) => return,
                            Err(e) => break e,
                        }
                    };
                    // Work that takes a while after the end (what is under test: the shutdown
                    // waits for it), then the save.
                    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                    let Some(node) = node.get() else { return };
                    let saved = node
                        .call(db_addr, "db.save", Bytes::from(end.to_string()))
                        .await;
                    assert!(saved.is_ok(), "{saved:?}");
                }
            })
        })
        .await;
    let _ = me.set(server.clone());
    let gw = c.start("1.100.1", |b| b).await;
    let mut conn = Conn::open(&gw, server.addr(), Some("new")).await;
    assert!(matches!(conn.frame().await, Frame::Welcome { .. }));
    conn.send(&Frame::data(b"ping")).await;
    assert_eq!(conn.frame().await, Frame::Data(Bytes::from_static(b"ping")));
    let stopping = tokio::spawn({
        let server = server.clone();
        async move { server.shutdown().await }
    });
    match conn.next().await {
        Inbound::Close(reason) => {
            assert_eq!(
                parse_close(&reason),
                (Some(1012), "game server shutting down")
            )
        }
        other => panic!("wanted the session ended, got {other:?}"),
    }
    let save = within(saved.recv()).await.unwrap();
    assert!(
        std::str::from_utf8(&save).unwrap().contains("(1012)"),
        "{save:?}"
    );
    within(stopping).await.unwrap();
}
