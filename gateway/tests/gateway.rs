//! The gateway binary with real processes on loopback: a real etcd, `game_server` example
//! processes behind it, and clients over TCP, TLS, WebSocket and KCP.

mod bed;

use std::time::Duration;

use bed::{TEST_LIMITS, WAIT, bed, bed_with};
use bytes::{Bytes, BytesMut};
use clustergo_client::wire::{self, Inbound};
use clustergo_client::{Client, ClientConfig, ClientError};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

async fn within<F: std::future::Future>(f: F) -> F::Output {
    timeout(WAIT, f).await.expect("timed out")
}

async fn connect(url: &str) -> Client {
    within(Client::connect(url))
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// Sends `frame` and returns the answer.
async fn ask(c: &mut Client, frame: &str) -> String {
    c.send(frame.to_owned()).await.unwrap();
    let reply = within(c.recv()).await.unwrap();
    String::from_utf8(reply.to_vec()).unwrap()
}

/// Reads what the gateway sends a raw TCP client until it closes; returns the close reason.
async fn close_reason(sock: &mut TcpStream) -> String {
    let mut buf = BytesMut::new();
    loop {
        while let Some(item) = wire::decode(&mut buf, 1 << 20).unwrap() {
            if let Inbound::Close(reason) = item {
                return reason;
            }
        }
        let n = within(sock.read_buf(&mut buf)).await.unwrap_or(0);
        assert!(n > 0, "closed without a close frame");
    }
}

/// Reads a WebSocket until the gateway's close message and returns its frame.
async fn ws_close<S>(ws: &mut S) -> tokio_tungstenite::tungstenite::protocol::CloseFrame
where
    S: futures_util::Stream<
            Item = Result<
                tokio_tungstenite::tungstenite::Message,
                tokio_tungstenite::tungstenite::Error,
            >,
        > + Unpin,
{
    within(async {
        loop {
            match ws.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(f)))) => break f,
                Some(Ok(_)) => continue,
                other => panic!("wanted a close, got {other:?}"),
            }
        }
    })
    .await
}

/// A raw TCP client sends `bytes` and is told `reason` in a close frame, which the gateway
/// also logs.
async fn told(gw: &bed::Gateway, bytes: &[u8], reason: &str) {
    let mut s = TcpStream::connect(&gw.tcp).await.unwrap();
    // The gateway may cut a flood off before it has all of it.
    let _ = s.write_all(bytes).await;
    let said = close_reason(&mut s).await;
    assert!(said.contains(reason), "{said:?}, wanted {reason:?}");
    gw.log.wait(&["client disconnected", reason]).await;
}

fn expect_closed(r: Result<Bytes, ClientError>, want: &str) -> (String, Option<u16>) {
    match r {
        Err(ClientError::Closed { reason, code }) => {
            assert!(reason.contains(want), "reason {reason:?}, wanted {want:?}");
            (reason, code)
        }
        other => panic!("wanted a close with {want:?}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_transport_echoes_a_thousand_frames_in_order_with_metadata() {
    let bed = bed(&["1.1.1"], TEST_LIMITS).await;
    for transport in ["tcp", "ws", "kcp"] {
        let mut c = connect(&bed.gateway.url(transport)).await;
        let meta = ask(&mut c, "meta").await;
        assert!(
            meta.contains(&format!("transport={transport}"))
                && meta.contains("client=127.0.0.1:")
                && meta.contains("gateway=1.100.1"),
            "{meta}"
        );
        for i in 0..1000 {
            c.send(format!("{transport}-{i}")).await.unwrap();
        }
        for i in 0..1000 {
            let echo = within(c.recv()).await.unwrap();
            assert_eq!(echo, format!("{transport}-{i}").as_bytes(), "{transport}");
        }
        // A large frame arrives whole.
        let big: Bytes = (0..60_000u32).map(|i| i as u8).collect::<Vec<_>>().into();
        c.send(big.clone()).await.unwrap();
        assert_eq!(within(c.recv()).await.unwrap(), big);
        within(c.close("done")).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_clients_over_three_transports() {
    // A thousand connects at once on two cores: more than the usual handshake time.
    let limits = TEST_LIMITS
        .replace(
            "handshake_timeout_ms = 1000",
            "handshake_timeout_ms = 10000",
        )
        .replace(
            "[limits]",
            // All from one address: the per-source caps are not what this test is about.
            "[limits]\nmax_handshakes = 2000\nmax_handshakes_per_source = 2000",
        );
    let bed = bed(&["1.1.1", "1.1.2"], &limits).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let transport = ["tcp", "ws", "kcp"][i % 3];
        let url = bed.gateway.url(transport);
        tasks.spawn(async move {
            let mut c = Client::connect(&url)
                .await
                .unwrap_or_else(|e| panic!("client {i} ({transport}): {e}"));
            for j in 0..3 {
                let frame = format!("client {i} frame {j}");
                c.send(frame.clone()).await.unwrap();
                let echo = c.recv().await.unwrap();
                assert_eq!(echo, frame.as_bytes());
            }
            c.close("done").await.unwrap();
            transport
        });
    }
    let mut done = [0; 3];
    within(async {
        while let Some(r) = tasks.join_next().await {
            let t = r.unwrap();
            done[["tcp", "ws", "kcp"].iter().position(|x| *x == t).unwrap()] += 1;
        }
    })
    .await;
    assert_eq!(done, [334, 333, 333]);
}

/// Bad clients of every kind are disconnected with their reason (told to them and logged),
/// while a well-behaved client on the same gateway goes on echoing without a stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_are_cut_off_and_a_good_one_keeps_its_latency() {
    let bed = bed(&["1.1.1"], TEST_LIMITS).await;
    let gw = &bed.gateway;
    let mut good = connect(&gw.url("tcp")).await;
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let watcher = tokio::spawn(async move {
        let (mut worst, mut n) = (Duration::ZERO, 0u32);
        loop {
            let t = Instant::now();
            let frame = format!("ping {n}");
            good.send(frame.clone()).await.unwrap();
            assert_eq!(good.recv().await.unwrap(), frame.as_bytes());
            worst = worst.max(t.elapsed());
            n += 1;
            if stop_rx.try_recv().is_ok() {
                return (worst, n, good);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });

    // An oversize length prefix.
    told(
        gw,
        &[0x7f, 0xff, 0xff, 0xff],
        "frame of 2147483647 bytes is over the limit of 65536",
    )
    .await;
    // Garbage: a length word with the close bit and an impossible reason length.
    told(
        gw,
        b"\xde\xad\xbe\xefnot a frame at all",
        "malformed input: close frame",
    )
    .await;

    // A text message over WebSocket.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}", gw.ws))
        .await
        .unwrap();
    ws.send(tokio_tungstenite::tungstenite::Message::text("hello?"))
        .await
        .unwrap();
    let close = ws_close(&mut ws).await;
    assert_eq!(u16::from(close.code), wire::close_code::UNSUPPORTED);
    assert!(close.reason.contains("text message"), "{close}");

    // Never sends its first frame.
    let started = Instant::now();
    told(gw, b"", "no first frame within 1s").await;
    assert!(started.elapsed() < Duration::from_secs(5));

    // Floods: 20,000 heartbeats in one burst, over 5,000 frames/s.
    let mut burst = BytesMut::new();
    wire::put_frame(&mut burst, b"hello");
    for _ in 0..20_000 {
        wire::put_frame(&mut burst, b"");
    }
    told(gw, &burst, "over the rate limit of 5000 frames/s").await;

    // Never reads: large frames echo back until the socket buffers fill; the gateway's
    // write then waits past `write_timeout` and it cuts the client off.
    let mut lazy = connect(&gw.url("tcp")).await;
    let chunk: Bytes = vec![7u8; 60_000].into();
    within(async {
        while !gw.log.contains("not reading") {
            if lazy.send(chunk.clone()).await.is_err() {
                break;
            }
        }
    })
    .await;
    gw.log
        .wait(&["client disconnected", "not reading: a write waited 500ms"])
        .await;

    stop_tx.send(()).unwrap();
    let (worst, n, mut good) = within(watcher).await.unwrap();
    assert!(n > 10, "only {n} echoes");
    // What a player would notice: a stall of half a second (otherwise an echo takes well under
    // a millisecond).
    assert!(
        worst < Duration::from_millis(500),
        "worst echo took {worst:?}"
    );
    assert_eq!(ask(&mut good, "still here").await, "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_game_server_closes_its_clients_and_new_ones_go_elsewhere() {
    let mut bed = bed(&["1.1.1", "1.1.2"], TEST_LIMITS).await;
    let url = bed.gateway.url("tcp");
    let mut on = [Vec::new(), Vec::new()];
    within(async {
        while on[0].len() < 3 || on[1].len() < 3 {
            let mut c = connect(&url).await;
            let who = ask(&mut c, "whoami").await;
            on[usize::from(who == "1.1.2")].push(c);
        }
    })
    .await;
    bed.servers[0].kill();
    let killed = Instant::now();
    for c in &mut on[0] {
        let (reason, _) = expect_closed(within(c.recv()).await, "game server 1.1.1 failed");
        assert!(reason.contains("lost"), "{reason}");
    }
    assert!(
        // At once: before a lease (2 s) or the idle timeout (3 s) could end them; slack for a
        // loaded machine.
        killed.elapsed() < Duration::from_secs(5),
        "closed after {:?}",
        killed.elapsed()
    );
    for c in &mut on[1] {
        assert_eq!(ask(c, "whoami").await, "1.1.2");
    }
    for _ in 0..6 {
        let mut c = connect(&url).await;
        assert_eq!(ask(&mut c, "whoami").await, "1.1.2");
    }
    bed.gateway
        .log
        .wait(&["game server failed: client closed", "1.1.1"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_game_server_ends_or_kicks_a_client_and_the_client_hears_why() {
    let bed = bed(&["1.1.1"], TEST_LIMITS).await;
    let mut c = connect(&bed.gateway.url("tcp")).await;
    c.send("kick:cheating detected").await.unwrap();
    expect_closed(within(c.recv()).await, "cheating detected");
    let mut c = connect(&bed.gateway.url("ws")).await;
    c.send("kick:server full").await.unwrap();
    let (_, code) = expect_closed(within(c.recv()).await, "server full");
    assert_eq!(code, Some(wire::close_code::NORMAL));
    let mut c = connect(&bed.gateway.url("kcp")).await;
    c.send("bye").await.unwrap();
    expect_closed(within(c.recv()).await, "session ended by the game server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_a_quiet_client_and_silence_ends_one() {
    let bed = bed(&["1.1.1"], TEST_LIMITS).await;
    let beating = ClientConfig::default().heartbeat(Some(Duration::from_millis(200)));
    let mut alive = within(Client::connect_with(&bed.gateway.url("kcp"), beating))
        .await
        .unwrap();
    assert_eq!(ask(&mut alive, "hi").await, "hi");
    let silent = ClientConfig::default().heartbeat(None);
    let mut quiet = within(Client::connect_with(&bed.gateway.url("tcp"), silent))
        .await
        .unwrap();
    assert_eq!(ask(&mut quiet, "hi").await, "hi");
    // The quiet one is cut off after the 3 s idle timeout; the one sending heartbeats,
    // waiting in `recv` the same time, is not.
    let (quiet_end, alive_wait) = tokio::join!(within(quiet.recv()), async {
        timeout(Duration::from_secs(4), alive.recv()).await
    });
    expect_closed(quiet_end, "idle for 3s");
    assert!(
        alive_wait.is_err(),
        "the heartbeating client got {alive_wait:?}"
    );
    assert_eq!(ask(&mut alive, "still").await, "still");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_policy_sends_a_key_to_the_same_server() {
    let bed = bed(
        &["1.1.1", "1.1.2", "1.1.3"],
        &format!("policy = \"sticky\"\n{TEST_LIMITS}"),
    )
    .await;
    let url = bed.gateway.url("ws");
    let mut seen = std::collections::HashMap::new();
    for round in 0..3 {
        for key in 0..12 {
            let mut c = connect(&url).await;
            let key = format!("player-{key}");
            assert_eq!(ask(&mut c, &key).await, key);
            let who = ask(&mut c, "whoami").await;
            if round == 0 {
                seen.insert(key, who);
            } else {
                assert_eq!(seen[&key], who, "{key} moved");
            }
        }
    }
    let servers: std::collections::HashSet<_> = seen.values().collect();
    assert!(servers.len() >= 2, "12 keys all on {servers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_gateway_turns_clients_away_with_a_reason() {
    let bed = bed(
        &["1.1.1"],
        &TEST_LIMITS.replace("[limits]", "[limits]\nmax_clients = 2"),
    )
    .await;
    let mut one = connect(&bed.gateway.url("tcp")).await;
    let mut two = connect(&bed.gateway.url("ws")).await;
    assert_eq!(ask(&mut one, "1").await, "1");
    assert_eq!(ask(&mut two, "2").await, "2");
    let mut three = connect(&bed.gateway.url("tcp")).await;
    let _ = three.send("3").await;
    expect_closed(within(three.recv()).await, "gateway full");
    bed.gateway
        .log
        .wait(&["gateway full: client turned away"])
        .await;
    within(one.close("done")).await.unwrap();
    // The slot comes back once the gateway has seen the client leave.
    within(async {
        loop {
            let mut c = connect(&bed.gateway.url("tcp")).await;
            c.send("again").await.unwrap();
            match c.recv().await {
                Ok(b) => break assert_eq!(&b[..], b"again"),
                Err(ClientError::Closed { reason, .. }) if reason.contains("full") => {}
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_tells_clients_and_exits_cleanly() {
    let mut bed = bed(&["1.1.1"], TEST_LIMITS).await;
    let mut tcp = connect(&bed.gateway.url("tcp")).await;
    let mut ws = connect(&bed.gateway.url("ws")).await;
    assert_eq!(ask(&mut tcp, "a").await, "a");
    assert_eq!(ask(&mut ws, "b").await, "b");
    bed.gateway.proc.terminate();
    expect_closed(within(tcp.recv()).await, "gateway shutting down");
    let (_, code) = expect_closed(within(ws.recv()).await, "gateway shutting down");
    assert_eq!(code, Some(wire::close_code::GOING_AWAY));
    let status = within(async {
        loop {
            if let Some(s) = bed.gateway.proc.child.try_wait().unwrap() {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(status.code(), Some(0));
    bed.gateway.out.wait(&["stopped (2 clients closed)"]).await;
}

#[test]
fn bad_configurations_are_refused_before_anything_binds() {
    let dir = bed::TempDir::new("bad");
    let ok = "addr = \"1.100.1\"\nbackend_type = 1\n[etcd]\nendpoints = [\"http://127.0.0.1:1\"]\n";
    let cases = [
        (ok.to_owned(), "no listener"),
        (
            format!("{ok}[tcp]\nlisten = \"nowhere\"\n"),
            "[tcp] listen \"nowhere\"",
        ),
        (
            format!("{ok}[tcp]\nlisten = \"127.0.0.1:0\"\ntls_cert = \"c.pem\"\n"),
            "needs both tls_cert and tls_key",
        ),
        (
            format!("{ok}[kcp]\nlisten = \"127.0.0.1:0\"\ntls_cert = \"c\"\ntls_key = \"k\"\n"),
            "[kcp] does not support TLS",
        ),
        (
            format!("{ok}[websocket]\nlisten = \"127.0.0.1:0\"\npath = \"ws\"\n"),
            "must start with '/'",
        ),
        (
            format!("{ok}[tcp]\nlisten = \"127.0.0.1:0\"\n[limits]\nmax_frame_bytes = 0\n"),
            "max_frame_bytes 0",
        ),
        (
            format!("{ok}[tcp]\nlisten = \"127.0.0.1:0\"\n[limits]\nbytes_per_sec = 10\n"),
            "a largest frame could never pass",
        ),
        (
            format!("{ok}[tcp]\nlisten = \"127.0.0.1:0\"\n[limits]\nidle_timeout_ms = 0\n"),
            "idle_timeout_ms 0",
        ),
        (
            format!("{ok}[tcp]\nlisten = \"127.0.0.1:0\"\n[limits]\nmax_clients = 0\n"),
            "max_clients 0",
        ),
        (
            format!("{ok}policy = \"roundrobin\"\n"),
            "unknown field `policy`",
        ),
        (
            ok.replace("backend_type = 1\n", "policy = \"roundrobin\"\n")
                + "[tcp]\nlisten = \"127.0.0.1:0\"\n",
            "no backend type",
        ),
        (
            "backend_type = 1\npolicy = \"roundrobin\"\naddr = \"1.100.1\"\n[etcd]\nendpoints = [\"http://h:1\"]\n[tcp]\nlisten = \"127.0.0.1:0\"\n".to_owned(),
            "policy \"roundrobin\"",
        ),
        (
            ok.replace("1.100.1", "1.255.1") + "[tcp]\nlisten = \"127.0.0.1:0\"\n",
            "harbor address",
        ),
        (
            format!(
                "{ok}[tcp]\nlisten = \"127.0.0.1:0\"\ntls_cert = \"/nonexistent.pem\"\ntls_key = \"/nonexistent.key\"\n"
            ),
            "tls_cert /nonexistent.pem",
        ),
        (
            format!("{ok}[websocket]\nlisten = \"127.0.0.1:0\"\nprotocols = [\"game v1\"]\n"),
            "protocol \"game v1\" is not a valid token",
        ),
        (
            format!("{ok}[tcp]\nlisten = \"127.0.0.1:0\"\nprotocols = [\"a\"]\n"),
            "[tcp] has no protocols",
        ),
        (
            ok.replace("backend_type = 1", "backend_type = 100") + "[tcp]\nlisten = \"127.0.0.1:0\"\n",
            "the gateway's own type",
        ),
        (
            format!("shutdown_grace_secs = 0\n{ok}[tcp]\nlisten = \"127.0.0.1:0\"\n"),
            "shutdown_grace_secs 0 must be in 1..=600",
        ),
        (
            format!("{ok}[tcp]\nlisten = \"127.0.0.1:7000\"\n[websocket]\nlisten = \"127.0.0.1:7000\"\n"),
            "both listen on 127.0.0.1:7000",
        ),
        (
            format!("members_file = \"/nonexistent/members.toml\"\n{ok}[tcp]\nlisten = \"127.0.0.1:0\"\n"),
            "exclude each other",
        ),
        (
            "addr = \"1.100.1\"\nbackend_type = 1\nmembers_file = \"/nonexistent/m.toml\"\n[tcp]\nlisten = \"127.0.0.1:0\"\n".to_owned(),
            "members_file /nonexistent/m.toml: no such file",
        ),
        (
            format!("{ok}[tcp]\nlisten = \"127.0.0.1:0\"\nport = 1\n"),
            "unknown field `port`",
        ),
        // Fails closed: a configuration without a secret (none in the environment here).
        (
            format!("{ok}[tcp]\nlisten = \"127.0.0.1:0\"\n"),
            "no cluster secret: set CLUSTERGO_SECRET",
        ),
    ];
    for (i, (config, want)) in cases.iter().enumerate() {
        let path = dir.0.join(format!("{i}.toml"));
        std::fs::write(&path, config).unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"));
        cmd.arg("--config")
            .arg(&path)
            .env_remove("GATEWAY_ADDR")
            .env_remove("GATEWAY_ETCD")
            .env_remove("CLUSTERGO_SECRET");
        if !want.contains("no cluster secret") {
            cmd.env("CLUSTERGO_SECRET", bed::SECRET);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{config:?} → {stderr}");
        assert!(
            stderr.contains(want),
            "{config:?}: wanted {want:?} in {stderr:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_wss_with_the_gateways_certificate() {
    let dir = bed::TempDir::new("tls");
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (crt, key) = (dir.0.join("gw.crt"), dir.0.join("gw.key"));
    std::fs::write(&crt, cert.cert.pem()).unwrap();
    std::fs::write(&key, cert.signing_key.serialize_pem()).unwrap();
    let files = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
        crt.display(),
        key.display()
    );
    let bed = bed_with(&["1.1.1"], TEST_LIMITS, &files, &files).await;
    let trusting = ClientConfig::default().add_root_pem_file(&crt).unwrap();
    for transport in ["tls", "wss"] {
        let mut c = within(Client::connect_with(
            &bed.gateway.url(transport),
            trusting.clone(),
        ))
        .await
        .unwrap_or_else(|e| panic!("{transport}: {e}"));
        let meta = ask(&mut c, "meta").await;
        assert!(meta.contains(&format!("transport={transport}")), "{meta}");
        for i in 0..100 {
            assert_eq!(
                ask(&mut c, &format!("secret {i}")).await,
                format!("secret {i}")
            );
        }
    }
    // Without the CA the client refuses before connecting; a plain client is cut off.
    match Client::connect(&bed.gateway.url("tls")).await {
        Err(ClientError::Tls(why)) => assert!(why.contains("no trusted roots"), "{why}"),
        other => panic!("{other:?}"),
    }
    let mut plain = connect(&bed.gateway.url("tcp")).await;
    let _ = plain.send("in the clear").await;
    assert!(within(plain.recv()).await.is_err());
    bed.gateway.log.wait(&["TLS handshake failed"]).await;
}

/// A game server that leaves (SIGTERM: it leaves membership first) has its clients closed
/// with a reason at once, so they reconnect — to another server of the type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_game_server_leaving_membership_drains_its_clients() {
    let bed = bed(&["1.1.1", "1.1.2"], TEST_LIMITS).await;
    let url = bed.gateway.url("ws");
    let mut leaving = Vec::new();
    within(async {
        while leaving.len() < 3 {
            let mut c = connect(&url).await;
            if ask(&mut c, "whoami").await == "1.1.1" {
                leaving.push(c);
            }
        }
    })
    .await;
    bed.servers[0].terminate();
    let asked = Instant::now();
    for c in &mut leaving {
        let (reason, code) = expect_closed(within(c.recv()).await, "game server 1.1.1 is leaving");
        assert_eq!(code, Some(wire::close_code::TRY_AGAIN), "{reason}");
    }
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "drained after {:?}",
        asked.elapsed()
    );
    bed.gateway
        .log
        .wait(&["game servers of type 1 available: [1.1.2]"])
        .await;
    for _ in 0..5 {
        let mut c = connect(&url).await;
        assert_eq!(ask(&mut c, "whoami").await, "1.1.2");
    }
}

/// A client's close is answered: a browser's closing handshake completes (a clean close), and
/// on TCP (as on KCP, where it is the only sign the close arrived) a close frame comes back;
/// before and after the first frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_from_the_client_is_answered() {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::{CloseFrame, frame::coding::CloseCode};
    let bed = bed(&["1.1.1"], TEST_LIMITS).await;
    for first in [true, false] {
        let mut s = TcpStream::connect(&bed.gateway.tcp).await.unwrap();
        let mut out = BytesMut::new();
        if first {
            wire::put_frame(&mut out, b"hi");
        }
        wire::put_close(&mut out, "leaving");
        s.write_all(&out).await.unwrap();
        assert_eq!(
            close_reason(&mut s).await,
            "bye",
            "first frame sent: {first}"
        );
    }
    for first in [true, false] {
        let (mut ws, _) = tokio_tungstenite::connect_async(bed.gateway.url("ws"))
            .await
            .unwrap();
        if first {
            ws.send(Message::binary(&b"hi"[..])).await.unwrap();
            assert_eq!(
                within(ws.next()).await.unwrap().unwrap(),
                Message::binary(&b"hi"[..])
            );
        }
        ws.send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "leaving".into(),
        })))
        .await
        .unwrap();
        match within(ws.next()).await {
            Some(Ok(Message::Close(_))) => {}
            other => panic!("wanted the close answered (first frame sent: {first}), got {other:?}"),
        }
    }
}

/// A server that is marked unavailable drains its clients; once it is available again it takes
/// new clients (nothing remembers the old drain).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_comes_back_takes_clients_again() {
    let bed = bed(&["1.1.1", "1.1.2"], TEST_LIMITS).await;
    let url = bed.gateway.url("tcp");
    let listed = |available: bool| {
        let m = bed
            .members
            .iter()
            .find(|m| m.addr == bed::a("1.1.1"))
            .unwrap();
        clustergo::Member::new(m.addr, m.net_addr.clone()).with_available(available)
    };
    for round in 0..3 {
        // A client on 1.1.1 (random policy: connect until one lands there).
        let mut c = within(async {
            loop {
                let mut c = connect(&url).await;
                if ask(&mut c, "whoami").await == "1.1.1" {
                    break c;
                }
            }
        })
        .await;
        bed.etcd.list(bed::PREFIX, &[listed(false)]).await;
        expect_closed(within(c.recv()).await, "game server 1.1.1 is leaving");
        bed.etcd.list(bed::PREFIX, &[listed(true)]).await;
        // The gateway logs the full set again: once at start, then once per round.
        bed.gateway
            .log
            .wait_count("available: [1.1.1, 1.1.2]", round + 2)
            .await;
    }
}

/// Handshake budgets are per listener: silent TCP connections fill only the TCP budget (the
/// next one is told the gateway is busy); WebSocket and KCP clients still connect, and
/// clients past their handshake are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_finish_only_fill_their_own_handshake_budget() {
    let limits = TEST_LIMITS
        .replace("handshake_timeout_ms = 1000", "handshake_timeout_ms = 5000")
        .replace("[limits]", "[limits]\nmax_handshakes = 20");
    let bed = bed(&["1.1.1"], &limits).await;
    let mut tcp = connect(&bed.gateway.url("tcp")).await;
    assert_eq!(ask(&mut tcp, "tcp works").await, "tcp works");
    // Twenty silent TCP connections fill the TCP budget; the next is told at once.
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(&bed.gateway.tcp).await.unwrap());
    }
    let mut over = TcpStream::connect(&bed.gateway.tcp).await.unwrap();
    let reason = close_reason(&mut over).await;
    assert!(reason.contains("gateway busy"), "{reason}");
    // The other listeners have their own budgets.
    let mut ws = connect(&bed.gateway.url("ws")).await;
    assert_eq!(ask(&mut ws, "ws too").await, "ws too");
    let mut kcp = connect(&bed.gateway.url("kcp")).await;
    assert_eq!(ask(&mut kcp, "and kcp").await, "and kcp");
    // Clients past their handshake are not affected.
    assert_eq!(ask(&mut tcp, "still").await, "still");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_rate_and_websocket_ping_floods_are_cut_off() {
    let limits = TEST_LIMITS.replace("bytes_per_sec = 67108864", "bytes_per_sec = 100000");
    let bed = bed(&["1.1.1"], &limits).await;
    let mut c = connect(&bed.gateway.url("tcp")).await;
    let big: Bytes = vec![1u8; 60_000].into();
    c.send(big.clone()).await.unwrap();
    let _ = c.send(big).await;
    let got = loop {
        match within(c.recv()).await {
            Ok(_) => continue,
            other => break other,
        }
    };
    expect_closed(got, "over the rate limit of 100000 bytes/s");
    // Pings are answered by the WebSocket layer but cost like heartbeats.
    let (mut ws, _) = tokio_tungstenite::connect_async(bed.gateway.url("ws"))
        .await
        .unwrap();
    ws.send(tokio_tungstenite::tungstenite::Message::binary(&b"hi"[..]))
        .await
        .unwrap();
    for _ in 0..6000 {
        let ping = tokio_tungstenite::tungstenite::Message::Ping(Bytes::from_static(b"p"));
        if ws.feed(ping).await.is_err() {
            break;
        }
    }
    let _ = ws.flush().await;
    let close = ws_close(&mut ws).await;
    assert_eq!(u16::from(close.code), wire::close_code::POLICY);
    assert!(
        close.reason.contains("rate limit of 5000 frames/s"),
        "{close}"
    );

    // A message that never completes: one fragment, then endless empty continuations. No
    // message is ever charged, but the raw bytes are.
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let (mut ws, _) = tokio_tungstenite::connect_async(bed.gateway.url("ws"))
        .await
        .unwrap();
    ws.send(tokio_tungstenite::tungstenite::Message::binary(&b"hi"[..]))
        .await
        .unwrap();
    let start = Frame::message(Bytes::from_static(b"x"), OpCode::Data(Data::Binary), false);
    let _ = ws
        .feed(tokio_tungstenite::tungstenite::Message::Frame(start))
        .await;
    for _ in 0..100_000 {
        let more = Frame::message(Bytes::new(), OpCode::Data(Data::Continue), false);
        let more = tokio_tungstenite::tungstenite::Message::Frame(more);
        if ws.feed(more).await.is_err() {
            break;
        }
    }
    let _ = ws.flush().await;
    let close = ws_close(&mut ws).await;
    assert!(
        close.reason.contains("rate limit of 100000 bytes/s"),
        "{close}"
    );
}

/// A browser that asks for a subprotocol gets the first one it offers that the gateway
/// lists; the game server sees it in the metadata. Offering only unknown ones is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_subprotocols_are_negotiated() {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let bed = bed_with(
        &["1.1.1"],
        TEST_LIMITS,
        "",
        "protocols = [\"game.v1\", \"game.v2\"]\n",
    )
    .await;
    let request = |offer: &str| {
        let mut r = bed.gateway.url("ws").into_client_request().unwrap();
        r.headers_mut()
            .insert("sec-websocket-protocol", offer.parse().unwrap());
        r
    };
    let (mut ws, resp) = within(tokio_tungstenite::connect_async(request(
        "chat, game.v2, game.v1",
    )))
    .await
    .unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "game.v2");
    ws.send(Message::binary(&b"meta"[..])).await.unwrap();
    match within(ws.next()).await {
        Some(Ok(Message::Binary(meta))) => {
            let meta = String::from_utf8_lossy(&meta).into_owned();
            assert!(meta.contains("subprotocol=game.v2"), "{meta}");
        }
        other => panic!("{other:?}"),
    }
    match within(tokio_tungstenite::connect_async(request("chat"))).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 400);
            let body =
                String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned();
            assert!(
                body.contains("no common subprotocol: offered chat"),
                "{body}"
            );
        }
        other => panic!("wanted a refusal, got {other:?}"),
    }
    // Without an offer, nothing is chosen and the connection works as before.
    let mut plain = connect(&bed.gateway.url("ws")).await;
    assert_eq!(ask(&mut plain, "hi").await, "hi");
}

/// A client that keeps sending while its game server kicks it (or ends the session) hears the
/// server's reason, not the failure of writing its late frames to the ended stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kick_wins_over_the_clients_late_frames() {
    let bed = bed(&["1.1.1"], TEST_LIMITS).await;
    for transport in ["tcp", "ws"] {
        for round in 0..15 {
            let mut c = connect(&bed.gateway.url(transport)).await;
            assert_eq!(ask(&mut c, "hello").await, "hello");
            let (command, want) = if round % 3 == 2 {
                ("bye", "session ended by the game server")
            } else {
                ("kick:cheating detected", "cheating detected")
            };
            c.send(command).await.unwrap();
            // Late input right behind the command, racing the server's close.
            for _ in 0..200 {
                if c.send("more input").await.is_err() {
                    break;
                }
            }
            let got = within(async {
                loop {
                    match c.recv().await {
                        Ok(_) => continue,
                        other => break other,
                    }
                }
            })
            .await;
            expect_closed(got, want);
        }
    }
}

/// A WebSocket message over the limit is refused with 1009 and the reason. (That a browser
/// still reads this close although the rest of its message was unread — the gateway drains it
/// before closing the socket — is checked by the browser test; this client reads it either
/// way.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_websocket_message_gets_its_close() {
    let bed = bed(&["1.1.1"], TEST_LIMITS).await;
    for size in [65_537, 1_000_000, 20_000_000] {
        let (mut ws, _) = tokio_tungstenite::connect_async(bed.gateway.url("ws"))
            .await
            .unwrap();
        ws.send(tokio_tungstenite::tungstenite::Message::binary(&b"hi"[..]))
            .await
            .unwrap();
        let big = tokio_tungstenite::tungstenite::Message::binary(vec![9u8; size]);
        let sent = within(ws.send(big)).await;
        let close = ws_close(&mut ws).await;
        assert_eq!(
            u16::from(close.code),
            wire::close_code::TOO_BIG,
            "{size} bytes (send: {sent:?}): {close}"
        );
        assert!(
            close
                .reason
                .contains(&format!("{size} bytes is over the limit of 65536")),
            "{close}"
        );
    }
}
