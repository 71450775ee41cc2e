//! Streams between real nodes on loopback: echo, many streams at once, a large transfer,
//! half-close, flow control isolation, typed errors, resets, limits and shutdown.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use clustergo::{
    ErrorCode, HandlerError, NodeBuilder, NodeConfig, Stream, StreamError, StreamMeta,
};
use sha2::{Digest, Sha256};
use support::{Cluster, a, test_config, within};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Echoes every stream until the opener half-closes, then closes its side.
fn echo(b: NodeBuilder) -> NodeBuilder {
    b.on_stream(|stream| async move {
        let (mut r, mut w) = stream.into_split();
        if tokio::io::copy(&mut r, &mut w).await.is_ok() {
            let _ = w.shutdown().await;
        }
    })
}

/// Bytes of a deterministic pattern, distinct per `seed`.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            // xorshift64
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let bytes = self.0.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

async fn write_pattern(w: &mut (impl AsyncWrite + Unpin), seed: u64, len: usize, step: usize) {
    let mut p = Pattern(seed);
    let mut buf = vec![0; step];
    let mut left = len;
    while left > 0 {
        let n = left.min(step);
        p.fill(&mut buf[..n]);
        w.write_all(&buf[..n]).await.unwrap();
        left -= n;
    }
    w.shutdown().await.unwrap();
}

/// Reads to EOF and checks every byte against the pattern; returns the bytes read.
async fn check_pattern(r: &mut (impl AsyncRead + Unpin), seed: u64, step: usize) -> usize {
    let mut p = Pattern(seed);
    let mut got = vec![0; step];
    let mut want = vec![0; step];
    let mut total = 0;
    loop {
        // Read exactly `step` bytes (or up to EOF) so the pattern stays aligned.
        let mut n = 0;
        while n < step {
            match r.read(&mut got[n..]).await.unwrap() {
                0 => break,
                k => n += k,
            }
        }
        if n == 0 {
            return total;
        }
        p.fill(&mut want[..n]);
        assert!(
            got[..n] == want[..n],
            "stream {seed}: bytes differ after {total}"
        );
        total += n;
        if n < step {
            return total;
        }
    }
}

#[tokio::test]
async fn echo_on_one_stream_with_metadata() {
    support::init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.1.2"]);
    let (meta_tx, mut meta_rx) = mpsc::channel(1);
    let server = c
        .start("1.1.2", |b| {
            b.on_stream(move |mut stream: Stream| {
                let meta_tx = meta_tx.clone();
                async move {
                    let _ = meta_tx
                        .send((
                            stream.peer(),
                            stream.id(),
                            stream.is_opener(),
                            stream.metadata().clone(),
                        ))
                        .await;
                    let mut buf = [0; 64];
                    while let Ok(n @ 1..) = stream.read(&mut buf).await {
                        stream.write_all(&buf[..n]).await.unwrap();
                    }
                    stream.shutdown().await.unwrap();
                }
            })
        })
        .await;
    let client = c.start("1.1.1", |b| b).await;

    let meta = StreamMeta::new()
        .with("transport", "websocket")
        .with("client", "203.0.113.7:51234")
        .with("note", "ünïcödé, = and ; kept");
    let mut s = within(client.open_stream_with(server.addr(), meta.clone()))
        .await
        .unwrap();
    assert_eq!(s.peer(), server.addr());
    assert!(s.is_opener());
    let (from, id, opener_there, got) = within(meta_rx.recv()).await.unwrap();
    assert_eq!(from, client.addr());
    assert_eq!(id, s.id());
    assert_eq!(id.opener, client.addr());
    assert!(!opener_there);
    assert_eq!(got, meta);
    assert_eq!(got.get("transport"), Some("websocket"));

    for round in 0..100u32 {
        let msg = format!("ping {round}");
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0; msg.len()];
        within(s.read_exact(&mut back)).await.unwrap();
        assert_eq!(back, msg.as_bytes());
    }
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within(s.read_to_end(&mut rest)).await.unwrap();
    assert!(rest.is_empty());
    drop(s);
    within(no_streams_open(&[&client, &server])).await;
    assert_eq!(client.stats().streams_opened, 1);
    assert_eq!(server.stats().streams_accepted, 1);
    assert_eq!(
        server.stats().streams_reset,
        0,
        "a clean close sends no reset"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_streams_each_echo_a_distinct_mib() {
    support::init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.1.2"]);
    let server = c.start("1.1.2", echo).await;
    let client = c.start("1.1.1", |b| b).await;
    const STREAMS: u64 = 1000;
    const LEN: usize = 1 << 20;
    let mut tasks = tokio::task::JoinSet::new();
    for seed in 1..=STREAMS {
        let client = client.clone();
        let to = server.addr();
        tasks.spawn(async move {
            let s = client.open_stream(to).await.unwrap();
            let (mut r, mut w) = s.into_split();
            let writer =
                tokio::spawn(async move { write_pattern(&mut w, seed, LEN, 16 << 10).await });
            let n = check_pattern(&mut r, seed, 16 << 10).await;
            writer.await.unwrap();
            assert_eq!(n, LEN, "stream {seed} echoed {n} bytes");
        });
    }
    let all = async {
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(120), all)
        .await
        .expect("1000 streams of 1 MiB did not finish in 120 s");
    assert_eq!(client.stats().streams_opened, STREAMS);
    assert_eq!(server.stats().streams_accepted, STREAMS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_transfer_arrives_whole() {
    support::init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.1.2"]);
    // The receiver hashes everything up to EOF and answers with the digest.
    let server = c
        .start("1.1.2", |b| {
            b.on_stream(|mut s| async move {
                let mut hash = Sha256::new();
                let mut buf = vec![0; 64 << 10];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => {
                            hash.update(&buf[..n]);
                            total += n as u64;
                        }
                        Err(_) => return,
                    }
                }
                s.write_all(&total.to_be_bytes()).await.unwrap();
                s.write_all(&hash.finalize()).await.unwrap();
                s.shutdown().await.unwrap();
            })
        })
        .await;
    let client = c.start("1.1.1", |b| b).await;
    const LEN: usize = 256 << 20;
    let mut s = within(client.open_stream(server.addr())).await.unwrap();
    let mut sent = Sha256::new();
    let transfer = async {
        let mut p = Pattern(42);
        let mut buf = vec![0; 64 << 10];
        for _ in 0..LEN / buf.len() {
            p.fill(&mut buf);
            sent.update(&buf);
            s.write_all(&buf).await.unwrap();
        }
        s.shutdown().await.unwrap();
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.unwrap();
        answer
    };
    let answer = tokio::time::timeout(Duration::from_secs(120), transfer)
        .await
        .expect("256 MiB did not arrive within 120 s");
    assert_eq!(answer.len(), 8 + 32);
    assert_eq!(
        u64::from_be_bytes(answer[..8].try_into().unwrap()),
        LEN as u64
    );
    assert_eq!(
        &answer[8..],
        &sent.finalize()[..],
        "hash of what arrived differs"
    );
}

#[tokio::test]
async fn half_close_reader_sees_eof_after_every_byte_and_writes_back() {
    support::init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.1.2"]);
    let server = c
        .start("1.1.2", |b| {
            b.on_stream(|mut s| async move {
                let mut all = Vec::new();
                s.read_to_end(&mut all).await.unwrap();
                // The opener has half-closed; this side can still write.
                let reply = format!("got {} bytes, last {:?}", all.len(), all.last());
                s.write_all(reply.as_bytes()).await.unwrap();
                s.shutdown().await.unwrap();
            })
        })
        .await;
    let client = c.start("1.1.1", |b| b).await;
    let mut s = within(client.open_stream(server.addr())).await.unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    s.write_all(&data).await.unwrap();
    s.shutdown().await.unwrap();
    // Writing after shutdown is an error naming it.
    let e = s.write_all(b"late").await.unwrap_err();
    assert!(
        matches!(StreamError::from_io(&e), Some(StreamError::Finished { .. })),
        "{e}"
    );
    let mut reply = String::new();
    within(s.read_to_string(&mut reply)).await.unwrap();
    assert_eq!(
        reply,
        format!("got 300000 bytes, last Some({})", 299_999 % 251)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_stalls_only_its_own_stream() {
    support::init_tracing();
    const WINDOW: u32 = 64 << 10;
    const BUFFER: usize = 16 << 10;
    let mut c = Cluster::new(&["1.1.1", "1.1.2"]);
    let (held_tx, mut held_rx) = mpsc::channel::<Stream>(4);
    let config = || test_config().stream_window(WINDOW).stream_buffer(BUFFER);
    let server = c
        .start("1.1.2", |b| {
            b.config(config())
                .rpc("ping", |_, p| async move { Ok::<_, HandlerError>(p) })
                .on_stream(move |s: Stream| {
                    let held_tx = held_tx.clone();
                    async move {
                        if s.metadata().get("mode") == Some("stall") {
                            // Keep the stream, never read it.
                            let _ = held_tx.send(s).await;
                            return;
                        }
                        let (mut r, mut w) = s.into_split();
                        if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                            let _ = w.shutdown().await;
                        }
                    }
                })
        })
        .await;
    let client = c.start("1.1.1", |b| b.config(config())).await;
    let mut stalled =
        within(client.open_stream_with(server.addr(), StreamMeta::new().with("mode", "stall")))
            .await
            .unwrap();
    let held = within(held_rx.recv()).await.unwrap();

    // The window's worth goes through at once; one byte more waits for the reader.
    let window = vec![9u8; WINDOW as usize];
    within(stalled.write_all(&window)).await.unwrap();
    let held_back = tokio::time::timeout(Duration::from_millis(300), stalled.write(&[9])).await;
    assert!(
        held_back.is_err(),
        "the writer got past the window: {held_back:?}"
    );
    let written = window.len();

    // Meanwhile another stream and RPC on the same link work normally.
    let mut other = within(client.open_stream(server.addr())).await.unwrap();
    let (mut r, mut w) = tokio::io::split(&mut other);
    let echo = async {
        let writer = async { write_pattern(&mut w, 7, 2 << 20, 8192).await };
        let reader = check_pattern(&mut r, 7, 8192);
        let ((), n) = tokio::join!(writer, reader);
        n
    };
    assert_eq!(within(echo).await, 2 << 20);
    for i in 0..50u32 {
        let p = Bytes::from(i.to_be_bytes().to_vec());
        assert_eq!(
            within(client.call(server.addr(), "ping", p.clone()))
                .await
                .unwrap(),
            p
        );
    }

    // Once the reader drains, the stalled writer finishes.
    let drain = tokio::spawn(async move {
        let (mut r, _w) = held.into_split();
        let mut sink = Vec::new();
        let _ = r.read_to_end(&mut sink).await;
        sink.len()
    });
    let rest = vec![1u8; 256 << 10];
    within(stalled.write_all(&rest)).await.unwrap();
    within(stalled.shutdown()).await.unwrap();
    assert_eq!(within(drain).await.unwrap(), written + rest.len());
}

#[tokio::test]
async fn opens_that_cannot_succeed_fail_quickly_with_their_reason() {
    support::init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.1.2", "1.1.3"]);
    let plain = c.start("1.1.2", |b| b).await;
    let client = c.start("1.1.1", echo).await;
    let quick = Duration::from_secs(1);

    let t = Instant::now();
    let e = within(client.open_stream(plain.addr())).await.unwrap_err();
    assert!(t.elapsed() < quick, "refusal took {:?}", t.elapsed());
    match &e {
        StreamError::Refused { peer, reason } => {
            assert_eq!(*peer, plain.addr());
            assert!(reason.contains("accepts no streams"), "{reason}");
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    assert_eq!(plain.stats().streams_refused, 1);

    let t = Instant::now();
    let e = within(client.open_stream(client.addr())).await.unwrap_err();
    assert_eq!(
        e,
        StreamError::ToSelf {
            node: client.addr()
        }
    );
    assert!(t.elapsed() < quick);
    assert!(e.to_string().contains("cannot open a stream to itself"));

    let t = Instant::now();
    let e = within(client.open_stream(a("1.1.9"))).await.unwrap_err();
    assert!(
        matches!(&e, StreamError::NoRoute { to, .. } if *to == a("1.1.9")),
        "{e:?}"
    );
    assert!(t.elapsed() < quick);

    // Listed in membership, but nothing listens there: the dial fails, named.
    let t = Instant::now();
    let e = within(client.open_stream(a("1.1.3"))).await.unwrap_err();
    assert!(
        matches!(&e, StreamError::PeerLost { peer, .. } if *peer == a("1.1.3")),
        "{e:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );

    // Other clusters need a harbor route.
    let e = within(client.open_stream(a("2.1.1"))).await.unwrap_err();
    assert!(matches!(e, StreamError::NoRoute { .. }), "{e:?}");
}

#[tokio::test]
async fn reset_and_early_drop_reach_the_peer_as_reset() {
    support::init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.1.2"]);
    let (tx, mut rx) = mpsc::channel::<std::io::Error>(4);
    let server = c
        .start("1.1.2", |b| {
            // Reads until the opener resets or drops the stream.
            b.on_stream(report_end(tx))
        })
        .await;
    let client = c.start("1.1.1", |b| b).await;

    let mut s = within(client.open_stream(server.addr())).await.unwrap();
    s.write_all(b"hello").await.unwrap();
    s.reset("player kicked");
    let e = within(rx.recv()).await.unwrap();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
    match StreamError::from_io(&e) {
        Some(StreamError::Reset { peer, code, reason }) => {
            assert_eq!(*peer, client.addr());
            assert_eq!(*code, ErrorCode::RESET);
            assert_eq!(reason, "player kicked");
        }
        other => panic!("{other:?}"),
    }

    let s = within(client.open_stream(server.addr())).await.unwrap();
    drop(s);
    let e = within(rx.recv()).await.unwrap();
    match StreamError::from_io(&e) {
        Some(StreamError::Reset { reason, .. }) => {
            assert!(reason.contains("dropped the stream"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_peers_stream_limit_refuses_with_a_reason() {
    support::init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.1.2"]);
    let server = c
        .start("1.1.2", |b| echo(b).config(test_config().max_streams(2)))
        .await;
    let client = c.start("1.1.1", |b| b).await;
    let s1 = within(client.open_stream(server.addr())).await.unwrap();
    let _s2 = within(client.open_stream(server.addr())).await.unwrap();
    let e = within(client.open_stream(server.addr())).await.unwrap_err();
    match &e {
        StreamError::Refused { peer, reason } => {
            assert_eq!(*peer, server.addr());
            assert!(
                reason.contains("too many streams") && reason.contains("limit 2"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    // A closed stream frees its slot once its reset has reached the server.
    drop(s1);
    let s = within(async {
        loop {
            match client.open_stream(server.addr()).await {
                Ok(s) => break s,
                Err(StreamError::Refused { .. }) => tokio::task::yield_now().await,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    assert_eq!(s.peer(), server.addr());
}

#[tokio::test]
async fn the_local_stream_limit_fails_without_asking_the_peer() {
    support::init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.1.2"]);
    let server = c.start("1.1.2", echo).await;
    let client = c
        .start("1.1.1", |b| b.config(test_config().max_streams(1)))
        .await;
    let _s = within(client.open_stream(server.addr())).await.unwrap();
    let e = within(client.open_stream(server.addr())).await.unwrap_err();
    assert_eq!(
        e,
        StreamError::TooMany {
            peer: server.addr(),
            limit: 1
        }
    );
    assert_eq!(server.stats().streams_refused, 0);
}

#[tokio::test]
async fn shutdown_lets_streams_finish_then_resets_the_rest() {
    support::init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.1.2"]);
    let grace = Duration::from_millis(1500);
    let server = c
        .start("1.1.2", |b| {
            echo(b).config(test_config().shutdown_grace(grace))
        })
        .await;
    let client = c.start("1.1.1", |b| b).await;
    let mut finishing = within(client.open_stream(server.addr())).await.unwrap();
    let mut lingering = within(client.open_stream(server.addr())).await.unwrap();
    finishing.write_all(b"one").await.unwrap();
    let mut buf = [0; 3];
    within(finishing.read_exact(&mut buf)).await.unwrap();

    let started = Instant::now();
    let shutdown = tokio::spawn({
        let server = server.clone();
        async move { server.shutdown().await }
    });
    // While the server drains, open streams keep working and can close cleanly.
    within(server_draining(&server)).await;
    finishing.write_all(b"two").await.unwrap();
    within(finishing.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"two");
    finishing.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within(finishing.read_to_end(&mut rest)).await.unwrap();

    // New opens are refused while draining.
    let e = within(client.open_stream(server.addr())).await.unwrap_err();
    assert!(
        matches!(e, StreamError::Shutdown { node } | StreamError::Refused { peer: node, .. } if node == server.addr()),
        "{e:?}"
    );

    // The stream left open is reset when the grace period ends.
    let e = within(lingering.read(&mut buf)).await.unwrap_err();
    assert_eq!(
        StreamError::from_io(&e),
        Some(&StreamError::Shutdown {
            node: server.addr()
        })
    );
    within(shutdown).await.unwrap();
    let took = started.elapsed();
    assert!(
        took >= grace - Duration::from_millis(100),
        "shutdown took {took:?}"
    );
    assert!(
        took < grace + Duration::from_secs(2),
        "shutdown took {took:?}"
    );
}

/// Resolves once `node` has begun shutting down (there is no event for it; this polls).
async fn server_draining(node: &clustergo::Node) {
    while node.is_running() {
        tokio::task::yield_now().await;
    }
}

/// Resolves once none of `nodes` has a stream open (the gauge has no event; this polls).
async fn no_streams_open(nodes: &[&clustergo::Node]) {
    while nodes.iter().any(|n| n.stats().streams_active > 0) {
        tokio::task::yield_now().await;
    }
}

/// A stream handler that reads until the stream fails and sends the error to `tx`.
fn report_end(
    tx: mpsc::Sender<std::io::Error>,
) -> impl Fn(Stream) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
+ Send
+ Sync
+ 'static {
    move |mut s: Stream| {
        let tx = tx.clone();
        Box::pin(async move {
            let _ = tx.send(read_until_failure(&mut s).await).await;
        })
    }
}

/// Reads until an error or EOF; EOF comes back as an error of kind `UnexpectedEof`, so a
/// handler can report it instead of panicking where no test would see it.
async fn read_until_failure(s: &mut (impl AsyncRead + Unpin)) -> std::io::Error {
    let mut buf = [0; 64];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return std::io::ErrorKind::UnexpectedEof.into(),
            Ok(_) => {}
            Err(e) => return e,
        }
    }
}

#[tokio::test]
async fn a_small_envelope_limit_caps_stream_chunks_instead_of_failing() {
    support::init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.1.2"]);
    // A 1 KiB envelope limit under the 64 KiB stream buffer: data goes in 1 KiB envelopes,
    // and no envelope trips the receiver's size check (which would close the link).
    let small = || test_config().max_envelope(1024);
    let server = c.start("1.1.2", |b| echo(b).config(small())).await;
    let client = c.start("1.1.1", |b| b.config(small())).await;
    let s = within(client.open_stream(server.addr())).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move { write_pattern(&mut w, 3, 300_000, 50_000).await });
    assert_eq!(within(check_pattern(&mut r, 3, 4096)).await, 300_000);
    within(writer).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_peer_process_fails_pending_reads_and_writes_with_peer_lost() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    support::init_tracing();
    // This node holds its port; the child gets a free one, both written to a membership file.
    let (listener, net) = support::bind();
    let child_port = support::ports::free_port();
    let dir = std::env::temp_dir().join(format!("cg-stream-kill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let members = dir.join("members.toml");
    std::fs::write(
        &members,
        format!(
            "[[member]]\naddr = \"1.1.1\"\nnet_addr = \"{net}\"\n\n\
             [[member]]\naddr = \"1.2.1\"\nnet_addr = \"127.0.0.1:{child_port}\"\n"
        ),
    )
    .unwrap();
    let mut child = support::Reap(
        Command::new(support::example("stream_echo"))
            .arg(&members)
            .arg("1.2.1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let first = lines.next().expect("stream_echo printed nothing").unwrap();
    assert!(first.contains("stream echo 1.2.1 listening on"), "{first}");
    std::thread::spawn(move || lines.map_while(Result::ok).count());

    let node = clustergo::Node::builder(a("1.1.1"))
        .discovery(clustergo::FileDiscovery::open(&members).unwrap())
        .config(
            NodeConfig::default()
                .secret("echo-example-secret")
                .keepalive_interval(Duration::from_secs(1))
                .keepalive_timeout(Duration::from_secs(2)),
        )
        .listener(listener)
        .build();
    within(node.start()).await.unwrap();
    let s = within(node.open_stream(a("1.2.1"))).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let (progress_tx, mut progress_rx) = tokio::sync::watch::channel(0usize);
    // Writes without end; reads and counts the echo.
    let writer = tokio::spawn(async move {
        let buf = vec![5u8; 32 << 10];
        loop {
            if let Err(e) = w.write_all(&buf).await {
                return e;
            }
        }
    });
    let reader = tokio::spawn(async move {
        let mut buf = vec![0; 32 << 10];
        let mut total = 0;
        loop {
            match r.read(&mut buf).await {
                Ok(0) => panic!("EOF from a killed peer"),
                Ok(n) => {
                    total += n;
                    progress_tx.send_replace(total);
                }
                Err(e) => return e,
            }
        }
    });
    // Mid-transfer: several MiB have made the round trip.
    within(progress_rx.wait_for(|n| *n >= 4 << 20))
        .await
        .unwrap();
    let killed = Instant::now();
    child.0.kill().unwrap();
    let _ = child.0.wait();
    let (we, re) = tokio::time::timeout(Duration::from_secs(5), async {
        (writer.await.unwrap(), reader.await.unwrap())
    })
    .await
    .expect("pending reads and writes did not fail within 5 s of the kill");
    for e in [&we, &re] {
        assert!(
            matches!(StreamError::from_io(e), Some(StreamError::PeerLost { peer, .. }) if *peer == a("1.2.1")),
            "{e:?}"
        );
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionAborted);
    }
    tracing::info!(after = ?killed.elapsed(), "stream failures seen");
    node.shutdown().await;
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_dropped_link_fails_streams_on_both_sides_with_peer_lost() {
    support::init_tracing();
    // Separate membership per node, so one node can drop the other while it keeps running.
    let (la, na) = support::bind();
    let (lb, nb) = support::bind();
    let view = || {
        clustergo::MemoryDiscovery::new([
            clustergo::Member::new(a("1.1.1"), na.clone()),
            clustergo::Member::new(a("1.1.2"), nb.clone()),
        ])
    };
    let (view_a, view_b) = (view(), view());
    let (tx, mut rx) = mpsc::channel::<std::io::Error>(1);
    let server = clustergo::Node::builder(a("1.1.2"))
        .discovery(view_b)
        .config(test_config())
        .listener(lb)
        .on_stream(report_end(tx))
        .build();
    within(server.start()).await.unwrap();
    let client = clustergo::Node::builder(a("1.1.1"))
        .discovery(view_a.clone())
        .config(test_config())
        .listener(la)
        .build();
    within(client.start()).await.unwrap();

    let mut s = within(client.open_stream(server.addr())).await.unwrap();
    s.write_all(b"before").await.unwrap();
    let (mut r, _w) = s.into_split();
    let pending_read = tokio::spawn(async move {
        let mut buf = [0; 8];
        r.read(&mut buf).await
    });
    // The client forgets the server: its link closes, and both ends of the stream fail.
    view_a.remove(server.addr());
    let here = within(pending_read).await.unwrap().unwrap_err();
    assert!(
        matches!(StreamError::from_io(&here), Some(StreamError::PeerLost { peer, .. }) if *peer == server.addr()),
        "{here:?}"
    );
    let there = within(rx.recv()).await.unwrap();
    assert!(
        matches!(StreamError::from_io(&there), Some(StreamError::PeerLost { peer, .. }) if *peer == client.addr()),
        "{there:?}"
    );
    assert_eq!(client.stats().streams_active, 0);
    assert!(
        within(async {
            while server.stats().streams_active > 0 {
                tokio::task::yield_now().await;
            }
            true
        })
        .await
    );
}

/// A server whose link reader is stuck once it gets command 1 (a handler that blocks its
/// thread until the test releases it, or for `WAIT` at most), with a stream handler that
/// reports how its stream ended.
struct Stuck {
    node: clustergo::Node,
    ended: mpsc::Receiver<std::io::Error>,
    blocked: std::sync::Arc<tokio::sync::Notify>,
    release: std::sync::mpsc::SyncSender<()>,
}

impl Stuck {
    /// Lets the server's reader go on.
    fn release(&self) {
        let _ = self.release.try_send(());
    }
}

async fn stuck_server(c: &mut Cluster) -> Stuck {
    let (tx, ended) = mpsc::channel(4);
    let blocked = std::sync::Arc::new(tokio::sync::Notify::new());
    let signal = blocked.clone();
    let (release, released) = std::sync::mpsc::sync_channel::<()>(1);
    let released = std::sync::Mutex::new(released);
    let node = c
        .start("1.1.2", |b| {
            b.on_cmd(clustergo::Cmd(1), move |_, _| {
                signal.notify_one();
                let _ = released.lock().unwrap().recv_timeout(support::WAIT);
            })
            .on_stream(report_end(tx))
        })
        .await;
    Stuck {
        node,
        ended,
        blocked,
        release,
    }
}

/// Sends command 1 and waits until the server's reader is blocked in its handler.
async fn block_reader(client: &clustergo::Node, stuck: &Stuck) {
    client
        .send_cmd(stuck.node.addr(), clustergo::Cmd(1), Bytes::new())
        .await
        .unwrap();
    within(stuck.blocked.notified()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_open_times_out_and_is_reset_at_the_peer() {
    support::init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.1.2"]);
    let mut stuck = stuck_server(&mut c).await;
    let server = stuck.node.clone();
    let timeout = Duration::from_millis(300);
    let client = c
        .start("1.1.1", |b| {
            b.config(test_config().stream_open_timeout(timeout))
        })
        .await;
    block_reader(&client, &stuck).await;
    let t = Instant::now();
    let e = within(client.open_stream(server.addr())).await.unwrap_err();
    assert_eq!(
        e,
        StreamError::Timeout {
            to: server.addr(),
            after: timeout
        }
    );
    assert!(
        t.elapsed() < timeout + Duration::from_millis(700),
        "{:?}",
        t.elapsed()
    );
    // Once the server reads again it accepts the late open, then finds it reset.
    stuck.release();
    let e = within(stuck.ended.recv()).await.unwrap();
    assert!(
        matches!(StreamError::from_io(&e), Some(StreamError::Reset { code, .. }) if *code == ErrorCode::TIMEOUT),
        "{e:?}"
    );
    within(no_streams_open(&[&client, &server])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_open_leaves_no_stream_behind() {
    support::init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.1.2"]);
    let mut stuck = stuck_server(&mut c).await;
    let server = stuck.node.clone();
    let client = c.start("1.1.1", |b| b).await;
    block_reader(&client, &stuck).await;
    // The caller gives up long before the open's own timeout.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(200),
        client.open_stream(server.addr()),
    )
    .await;
    assert!(gave_up.is_err());
    stuck.release();
    // The server, reading again, accepts the open it got and finds it reset.
    let e = within(stuck.ended.recv()).await.unwrap();
    match StreamError::from_io(&e) {
        Some(StreamError::Reset { reason, .. }) => {
            assert!(reason.contains("stopped waiting"), "{reason}")
        }
        other => panic!("{other:?} ({e})"),
    }
    within(no_streams_open(&[&client, &server])).await;
    // The slot is free and the link healthy: a new open works.
    let s = within(client.open_stream(server.addr())).await.unwrap();
    s.reset("done");
}

#[tokio::test]
async fn huge_reset_reasons_and_metadata_never_take_the_link_down() {
    // Metadata near the envelope limit, allowed on purpose (the default is 4 KiB per open).
    let big_meta = || {
        support::test_config()
            .max_stream_meta(1 << 20)
            .max_stream_meta_per_peer(8 << 20)
    };
    support::init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.1.2"]);
    let (tx, mut rx) = mpsc::channel::<std::io::Error>(4);
    let server = c
        .start("1.1.2", |b| {
            b.config(big_meta()).on_stream(move |mut s: Stream| {
                let tx = tx.clone();
                async move {
                    if s.metadata().get("mode") == Some("echo") {
                        let (mut r, mut w) = s.into_split();
                        if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                            let _ = w.shutdown().await;
                        }
                        return;
                    }
                    let _ = tx.send(read_until_failure(&mut s).await).await;
                }
            })
        })
        .await;
    let client = c.start("1.1.1", |b| b.config(big_meta())).await;
    let mut other =
        within(client.open_stream_with(server.addr(), StreamMeta::new().with("mode", "echo")))
            .await
            .unwrap();

    // A 3 MiB reason arrives clipped.
    let s = within(client.open_stream(server.addr())).await.unwrap();
    s.reset("x".repeat(3 << 20));
    let e = within(rx.recv()).await.unwrap();
    match StreamError::from_io(&e) {
        Some(StreamError::Reset { reason, .. }) => assert_eq!(reason.len(), 4096),
        other => panic!("{other:?}"),
    }

    // Four opens of 700 KiB metadata each, at once: each fits the envelope limit, and the
    // writer never packs them into a batch the peer would refuse.
    let big = "m".repeat(700 << 10);
    let opens = (0..4).map(|_| {
        let (client, big) = (client.clone(), big.clone());
        let to = server.addr();
        tokio::spawn(async move {
            client
                .open_stream_with(to, StreamMeta::new().with("blob", big))
                .await
        })
    });
    for o in opens {
        let s = within(o).await.unwrap().unwrap();
        s.reset("done");
    }
    // The link and the stream on it lived through both.
    other.write_all(b"still here").await.unwrap();
    let mut back = [0; 10];
    within(other.read_exact(&mut back)).await.unwrap();
    assert_eq!(&back, b"still here");
    assert_eq!(client.stats().links_closed, 0);
    assert_eq!(server.stats().links_closed, 0);
}

#[tokio::test]
async fn frames_go_both_ways_whole_and_in_order() {
    use clustergo::{FrameError, Frames};
    support::init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.1.2"]);
    // The game-server side: echo every frame, close after the client does, report a failure.
    let (failed_tx, mut failed) = mpsc::channel::<FrameError>(1);
    let server = c
        .start("1.1.2", |b| {
            b.on_stream(move |s| {
                let failed_tx = failed_tx.clone();
                async move {
                    let mut frames = Frames::new(s, 4096);
                    loop {
                        match frames.recv().await {
                            Ok(Some(frame)) => {
                                if frames.send(frame).await.is_err() {
                                    return;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                let _ = failed_tx.send(e).await;
                                return;
                            }
                        }
                    }
                    let _ = frames.close().await;
                }
            })
        })
        .await;
    let client = c.start("1.1.1", |b| b).await;
    let s =
        within(client.open_stream_with(server.addr(), StreamMeta::new().with("transport", "tcp")))
            .await
            .unwrap();
    let mut frames = Frames::new(s, 4096);
    assert_eq!(frames.peer(), server.addr());
    let sent: Vec<Bytes> = (0..1000u32)
        .map(|i| Bytes::from(vec![(i % 256) as u8; (i as usize * 37) % 4097]))
        .collect();
    // Ten in flight at a time: an echo that is not read back would fill both windows.
    for (i, chunk) in sent.chunks(10).enumerate() {
        for f in chunk {
            within(frames.send(f.clone())).await.unwrap();
        }
        for (j, want) in chunk.iter().enumerate() {
            let got = within(frames.recv()).await.unwrap().unwrap();
            assert_eq!(&got, want, "frame {}", i * 10 + j);
        }
    }
    // Over the limit: refused here, before anything is sent.
    let e = frames.send(Bytes::from(vec![0; 4097])).await.unwrap_err();
    assert!(
        matches!(
            e,
            FrameError::TooLarge {
                size: 4097,
                limit: 4096
            }
        ),
        "{e}"
    );
    within(frames.close()).await.unwrap();
    // The peer's side of the limit: a length prefix over it ends the session there.
    let mut raw = within(client.open_stream(server.addr())).await.unwrap();
    raw.write_all(&100_000u32.to_be_bytes()).await.unwrap();
    raw.write_all(&[0; 16]).await.unwrap();
    raw.shutdown().await.unwrap();
    let e = within(failed.recv()).await.unwrap();
    assert!(
        matches!(
            e,
            FrameError::TooLarge {
                size: 100_000,
                limit: 4096
            }
        ),
        "{e}"
    );
    // The handler dropped its side without closing: the stream is reset.
    let mut rest = Vec::new();
    let e = within(raw.read_to_end(&mut rest)).await.unwrap_err();
    assert!(
        matches!(StreamError::from_io(&e), Some(StreamError::Reset { .. })),
        "{e:?}"
    );

    // A frame cut short by the end of the stream is named as such.
    let (tx, mut rx) = mpsc::channel(1);
    let mut c2 = Cluster::new(&["2.1.1", "2.1.2"]);
    let server2 = c2
        .start("2.1.2", move |b| {
            b.on_stream(move |s| {
                let tx = tx.clone();
                async move {
                    let mut frames = Frames::new(s, 4096);
                    let _ = tx
                        .send(frames.recv().await.map(|f| f.map(|f| f.len())))
                        .await;
                }
            })
        })
        .await;
    let client2 = c2.start("2.1.1", |b| b).await;
    let mut raw = within(client2.open_stream(server2.addr())).await.unwrap();
    raw.write_all(&10u32.to_be_bytes()).await.unwrap();
    raw.write_all(b"abc").await.unwrap();
    raw.shutdown().await.unwrap();
    let got = within(rx.recv()).await.unwrap();
    assert!(matches!(got, Err(FrameError::Truncated)), "{got:?}");
}
