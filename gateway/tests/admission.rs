//! The gateway's admission and its KCP layer, tried as an attacker would, against the real
//! gateway process on loopback: silent sockets from one host, forged UDP sources, datagrams
//! forged with a live client's address, clients reconnecting from the same UDP port, and a
//! third-party C KCP client.

mod bed;

use std::net::SocketAddr;

use bed::{TEST_LIMITS, WAIT, bed};
use bytes::BytesMut;
use clustergo_client::Client;
use clustergo_client::kcp::{self as ckcp, Handshake};
use clustergo_client::wire::{self, Inbound};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::time::timeout;

async fn within<F: std::future::Future>(f: F) -> F::Output {
    timeout(WAIT, f).await.expect("timed out")
}

/// Sends one frame over a raw byte stream and reads frames until its echo.
async fn raw_echo<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S, text: &str) -> String {
    let mut out = BytesMut::new();
    wire::put_frame(&mut out, text.as_bytes());
    io.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    within(async {
        loop {
            while let Some(item) = wire::decode(&mut buf, 1 << 20).unwrap() {
                match item {
                    Inbound::Data(b) => return String::from_utf8(b.to_vec()).unwrap(),
                    Inbound::Heartbeat => {}
                    Inbound::Close(r) => panic!("closed: {r}"),
                }
            }
            assert!(io.read_buf(&mut buf).await.unwrap() > 0, "ended");
        }
    })
    .await
}

/// A TCP connection from source address `from` (another loopback address: another host).
async fn tcp_from(from: &str, to: &str) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{from}:0").parse().unwrap()).unwrap();
    s.connect(to.parse().unwrap()).await.unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// One host (127.0.0.1) holds 300 silent connections on each of the TCP and WebSocket
/// listeners, more than their whole handshake budget (200). Only 64 of each hold a place
/// (the per-source cap); another host (127.0.0.2) still connects on both. Before per-source
/// caps, it was turned away with "gateway busy".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_holding_silent_sockets_cannot_turn_others_away() {
    let limits = TEST_LIMITS
        .replace(
            "handshake_timeout_ms = 1000",
            "handshake_timeout_ms = 20000",
        )
        .replace("[limits]", "[limits]\nmax_handshakes = 200");
    let bed = bed(&["1.1.1"], &limits).await;
    let ws_addr = bed.gateway.ws.split('/').next().unwrap().to_owned();
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(TcpStream::connect(&bed.gateway.tcp).await.unwrap());
        silent.push(TcpStream::connect(&ws_addr).await.unwrap());
    }
    bed.gateway
        .log
        .wait(&["too many handshakes from one address: connection dropped"])
        .await;

    let mut other = tcp_from("127.0.0.2", &bed.gateway.tcp).await;
    assert_eq!(
        raw_echo(&mut other, "from another host").await,
        "from another host"
    );
    let ws_sock = tcp_from("127.0.0.2", &ws_addr).await;
    let (mut ws, _) = within(tokio_tungstenite::client_async(
        bed.gateway.url("ws"),
        ws_sock,
    ))
    .await
    .unwrap();
    ws.send(tokio_tungstenite::tungstenite::Message::binary(
        &b"ws too"[..],
    ))
    .await
    .unwrap();
    let echo = within(async {
        loop {
            if let Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(b))) = ws.next().await
                && !b.is_empty()
            {
                return b;
            }
        }
    })
    .await;
    assert_eq!(&echo[..], b"ws too");
    drop(silent);
}

/// 2,000 forged sources (distinct UDP ports) each send a KCP header with a made-up conv and
/// an unpadded HELLO, and 2,000 more send a proper HELLO and never come back. The gateway
/// creates no session for any of them (its memory stays flat), sends back fewer bytes than
/// it received (cookies only, none to the junk), and a real KCP client connects at once
/// although `max_handshakes` is only 100. (Before: every junk source became a session, the
/// handshake budget filled, memory grew ~40 KB per source and stayed, and four times the
/// datagrams came back over 11 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_kcp_sources_create_nothing_and_draw_back_less_than_they_sent() {
    let limits = TEST_LIMITS.replace("[limits]", "[limits]\nmax_handshakes = 100");
    let bed = bed(&["1.1.1"], &limits).await;
    let gw: SocketAddr = bed.gateway.kcp.parse().unwrap();
    let pid = bed.gateway.proc.child.id();
    // A first client, so that lazily made buffers count in the baseline.
    let mut first = within(Client::connect(&bed.gateway.url("kcp")))
        .await
        .unwrap();
    first.send("warm").await.unwrap();
    within(first.recv()).await.unwrap();
    let before = rss_kib(pid);

    let mut sockets = Vec::new();
    let mut sent = 0usize;
    for i in 0..4000u32 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let datagrams: Vec<Vec<u8>> = if i % 2 == 0 {
            let mut junk = vec![0u8; 24];
            junk[..4].copy_from_slice(&(i + 7).to_le_bytes());
            junk[4] = 81; // PUSH, sn 0
            let mut short_hello = Handshake::Hello { nonce: 1 }.encode();
            short_hello.truncate(17);
            vec![junk, short_hello]
        } else {
            vec![
                Handshake::Hello {
                    nonce: u64::from(i),
                }
                .encode(),
            ]
        };
        for d in datagrams {
            udp.send_to(&d, gw).await.unwrap();
            sent += d.len();
        }
        sockets.push(udp);
    }
    // The socket takes datagrams in order: once a later client is through, every forged one
    // before it has been handled.
    let mut c = within(Client::connect(&bed.gateway.url("kcp")))
        .await
        .unwrap();
    c.send("real client").await.unwrap();
    assert_eq!(&within(c.recv()).await.unwrap()[..], b"real client");

    let mut back = 0usize;
    let mut cookies = 0usize;
    let mut buf = [0u8; 2048];
    for (i, s) in sockets.iter().enumerate() {
        while let Ok(n) = s.try_recv(&mut buf) {
            back += n;
            match Handshake::decode(&buf[..n]) {
                Some(Handshake::Cookie(_)) if i % 2 == 1 => cookies += 1,
                other => panic!("source {i} got {other:?} ({n} bytes)"),
            }
        }
    }
    assert!(back < sent, "{back} bytes back for {sent} sent");
    assert!(cookies > 0, "proper HELLOs get cookies");
    let after = rss_kib(pid);
    assert!(
        after < before + 4 * 1024,
        "gateway grew from {before} KiB to {after} KiB for 4,000 forged sources"
    );
    assert!(bed.gateway.log.contains("KCP datagram dropped"));
    drop(first);
}

/// A datagram forged with a live KCP client's address and port, `sn = 0` and another conv
/// (and one with no session at all) is dropped and counted: the client's session goes on,
/// and the gateway does not log it as the client leaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datagram_forged_with_a_live_clients_address_does_not_replace_its_session() {
    let bed = bed(&["1.1.1"], TEST_LIMITS).await;
    let gw: SocketAddr = bed.gateway.kcp.parse().unwrap();
    // Victim and forger share the address, as a spoofing attacker's datagrams would.
    let shared = |port: u16| {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        s.set_reuse_port(true).unwrap();
        s.set_nonblocking(true).unwrap();
        s.bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())
            .unwrap();
        UdpSocket::from_std(s.into()).unwrap()
    };
    let victim = shared(0);
    let port = victim.local_addr().unwrap().port();
    let (mut io, conv) = within(ckcp::connect_from(victim, gw, WAIT)).await.unwrap();
    assert_eq!(raw_echo(&mut io, "before").await, "before");

    let forger = shared(port);
    let mut forged = vec![0u8; 24];
    forged[..4].copy_from_slice(&(conv ^ 0x5a5a).to_le_bytes());
    forged[4] = 81; // PUSH, sn 0
    forger.send_to(&forged, gw).await.unwrap();
    forged[..4].copy_from_slice(&0x1234u32.to_le_bytes());
    forger.send_to(&forged, gw).await.unwrap();
    drop(forger);
    bed.gateway
        .log
        .wait(&["KCP datagram dropped", "a KCP segment for no session"])
        .await;

    assert_eq!(raw_echo(&mut io, "after").await, "after");
    assert!(!bed.gateway.log.contains("client left"));
}

/// A client that reconnects from the same UDP port gets a new session each time: after a
/// clean close (8 of 8) and after a crash that leaves its old session behind (8 of 8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_from_the_same_udp_port_always_gets_a_new_session() {
    let bed = bed(&["1.1.1"], TEST_LIMITS).await;
    let gw: SocketAddr = bed.gateway.kcp.parse().unwrap();
    let port = UdpSocket::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut convs = Vec::new();
    for round in 0..16 {
        // The last round's session lets go of the port once its task has seen the end.
        let socket = within(async {
            loop {
                match UdpSocket::bind(("127.0.0.1", port)).await {
                    Ok(s) => return s,
                    Err(_) => tokio::task::yield_now().await,
                }
            }
        })
        .await;
        let (mut io, conv) = within(ckcp::connect_from(socket, gw, WAIT))
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let text = format!("round {round}");
        assert_eq!(raw_echo(&mut io, &text).await, text);
        assert!(!convs.contains(&conv), "conv {conv} given twice");
        convs.push(conv);
        if round < 8 {
            // A clean close: the gateway answers it.
            let mut close = BytesMut::new();
            wire::put_close(&mut close, "leaving");
            io.write_all(&close).await.unwrap();
            let mut buf = BytesMut::new();
            let said = within(async {
                loop {
                    if let Some(Inbound::Close(r)) = wire::decode(&mut buf, 1 << 16).unwrap() {
                        return r;
                    }
                    assert!(io.read_buf(&mut buf).await.unwrap() > 0);
                }
            })
            .await;
            assert_eq!(said, "bye");
        }
        // Round 8 and after: a crash, the session left to time out at the gateway.
        drop(io);
    }
}

/// A standard C KCP implementation (ikcp, through PyPI `kcp`) connects: the cookie
/// handshake in plain UDP, then KCP with the conv it was given, in message mode; it echoes
/// a frame and its close is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_party_c_kcp_client_connects() {
    let deps = bed::pydeps_with_kcp();
    let bed = bed(&["1.1.1"], TEST_LIMITS).await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c_kcp_client.py");
    let out = within(
        tokio::process::Command::new("python3")
            .arg(&script)
            .arg(&bed.gateway.kcp)
            .env("PYTHONPATH", &deps)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("echo: hello from ikcp"), "{stdout}");
    assert!(stdout.contains("close: bye"), "{stdout}");
}
