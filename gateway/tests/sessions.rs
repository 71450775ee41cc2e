//! Sessions that survive, with real processes: etcd, the `game_server` example (which serves
//! sessions) and gateway processes; clients are `clustergo_client::SessionClient`s.

mod bed;

use std::time::Duration;

use bed::etcd_server::Etcd;
use bed::*;
use bytes::Bytes;
use clustergo::Member;
use clustergo::session::TokenKey;
use clustergo_client::session::{Hello, Token, code, parse_close};
use clustergo_client::{Client, ClientError, SessionClient, SessionClientConfig, SessionEvent};

/// Limits for these tests: many clients from one address reconnect at once.
const LIMITS: &str = "[limits]
handshake_timeout_ms = 2000
idle_timeout_ms = 10000
write_timeout_ms = 2000
max_handshakes_per_source = 1000
max_clients_per_source = 1000
frames_per_sec = 5000
bytes_per_sec = 67108864
";

/// etcd, game server 1.1.1 and gateways 1.100.1 and 1.100.2, everyone listed.
async fn two_gateways() -> (Etcd, Proc, Gateway, Gateway) {
    let etcd = Etcd::start();
    let members: Vec<Member> = ["1.100.1", "1.100.2", "1.1.1"]
        .iter()
        .map(|m| Member::new(a(m), free_port()))
        .collect();
    etcd.list(PREFIX, &members).await;
    let server = game_server(&etcd, "1.1.1");
    let g1 = gateway_as(&etcd, "1.100.1", LIMITS, "", "");
    let g2 = gateway_as(&etcd, "1.100.2", LIMITS, "", "");
    for g in [&g1, &g2] {
        g.log
            .wait(&["game servers of type 1 available: [1.1.1]"])
            .await;
    }
    (etcd, server, g1, g2)
}

/// What one client saw, or why it failed.
#[derive(Debug, Default)]
struct Run {
    echoed: u64,
    disconnects: u32,
    resumes: u32,
    /// The longest time from a lost connection to the resumed session.
    longest_resume: Duration,
}

/// Sends `rounds` batches of `batch` numbered frames, each batch then its echoes: every echo
/// must be the next number, once (none lost, none twice, in order).
async fn echo_rounds(
    s: &mut SessionClient,
    id: usize,
    rounds: u64,
    batch: u64,
    pause: Duration,
) -> Result<Run, String> {
    let mut run = Run::default();
    let mut next_echo = 1u64;
    let mut sent = 0u64;
    for _ in 0..rounds {
        for _ in 0..batch {
            sent += 1;
            s.send(format!("c{id}-{sent}"))
                .await
                .map_err(|e| format!("send {sent}: {e}"))?;
        }
        while next_echo <= sent {
            let ev = tokio::time::timeout(WAIT, s.recv())
                .await
                .map_err(|_| format!("no event for {WAIT:?}, waiting for echo {next_echo}"))?
                .map_err(|e| format!("recv: {e}"))?;
            match ev {
                SessionEvent::Frame(f) => {
                    let want = format!("c{id}-{next_echo}");
                    if f != want.as_bytes() {
                        return Err(format!(
                            "wanted {want}, got {:?}",
                            String::from_utf8_lossy(&f)
                        ));
                    }
                    next_echo += 1;
                    run.echoed += 1;
                }
                SessionEvent::Disconnected { .. } => run.disconnects += 1,
                SessionEvent::Resumed { after, .. } => {
                    run.resumes += 1;
                    run.longest_resume = run.longest_resume.max(after);
                }
                SessionEvent::Ended { code, reason } => {
                    return Err(format!("session ended: {code:?} {reason}"));
                }
                other => return Err(format!("unexpected {other:?}")),
            }
        }
        tokio::time::sleep(pause).await;
    }
    Ok(run)
}

const CLIENTS: usize = 100;

/// Half the KCP clients start on the gateway that is not killed.
fn starts_on_the_other(id: usize) -> bool {
    id % 3 == 2 && id % 2 == 0
}

/// 100 clients (TCP, WebSocket and KCP, about a third each) echo numbered frames through two
/// gateways; the gateway most of them use is SIGKILLed mid-run. Every client resumes through the
/// other, and every frame comes back once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_a_gateway_sigkill() {
    let (_etcd, _server, mut g1, g2) = two_gateways().await;
    let transports = ["tcp", "ws", "kcp"];
    let mut tasks = Vec::new();
    for id in 0..CLIENTS {
        let t = transports[id % 3];
        let urls = if starts_on_the_other(id) {
            [g2.url(t), g1.url(t)]
        } else {
            [g1.url(t), g2.url(t)]
        };
        tasks.push(tokio::spawn(async move {
            let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
            let mut s = SessionClient::connect(&urls, b"", SessionClientConfig::default())
                .await
                .map_err(|e| format!("client {id} connect: {e}"))?;
            let run = echo_rounds(&mut s, id, 40, 5, Duration::from_millis(50)).await;
            let _ = s.close().await;
            run.map_err(|e| format!("client {id} ({}): {e}", urls[0]))
        }));
    }
    // Mid-run: every client is connected and exchanging.
    tokio::time::sleep(Duration::from_millis(800)).await;
    g1.proc.kill();
    let mut runs = Vec::new();
    for t in tasks {
        runs.push(t.await.unwrap());
    }
    let failed: Vec<&String> = runs.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    let runs: Vec<Run> = runs.into_iter().map(Result::unwrap).collect();
    let resumed = runs.iter().filter(|r| r.resumes > 0).count();
    let echoed: u64 = runs.iter().map(|r| r.echoed).sum();
    let slowest = runs
        .iter()
        .map(|r| r.longest_resume)
        .max()
        .unwrap_or_default();
    println!(
        "sessions: {} clients, {echoed} frames echoed in order, none lost or twice; {resumed} resumed after the gateway's SIGKILL, the slowest in {slowest:?}",
        runs.len()
    );
    assert_eq!(echoed, CLIENTS as u64 * 40 * 5);
    // Every client that was on the killed gateway.
    let on_killed = (0..CLIENTS).filter(|id| !starts_on_the_other(*id)).count();
    assert!(
        resumed >= on_killed,
        "only {resumed} of {on_killed} resumed"
    );
    assert!(slowest < Duration::from_secs(10), "{slowest:?}");
}

/// A session moves from TCP to WebSocket mid-run (and to KCP after): resumed each time,
/// nothing lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_switches_transport() {
    let (_etcd, _server, g1, g2) = two_gateways().await;
    let mut s = SessionClient::connect(&[&g1.url("tcp")], b"", SessionClientConfig::default())
        .await
        .unwrap();
    let first = echo_rounds(&mut s, 1, 5, 4, Duration::ZERO).await.unwrap();
    assert_eq!(first.resumes, 0);
    // Frames sent before the switch are still unacknowledged or in flight: they go along.
    s.send("c1-21").await.unwrap();
    s.switch_to(&g2.url("ws"));
    let mut resumed = None;
    let mut echo = None;
    while echo.is_none() {
        match tokio::time::timeout(WAIT, s.recv()).await.unwrap().unwrap() {
            SessionEvent::Frame(f) => echo = Some(f),
            SessionEvent::Resumed { url, .. } => resumed = Some(url),
            SessionEvent::Disconnected { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(echo.unwrap(), "c1-21".as_bytes());
    assert_eq!(resumed.as_deref(), Some(g2.url("ws").as_str()));
    s.switch_to(&g1.url("kcp"));
    s.send("c1-22").await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, s.recv()).await.unwrap().unwrap() {
            SessionEvent::Frame(f) => {
                assert_eq!(f, "c1-22".as_bytes());
                break;
            }
            SessionEvent::Resumed { .. } | SessionEvent::Disconnected { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    s.close().await.unwrap();
}

/// A raw client says `hello` and is closed with `want` (the code of the reason).
async fn refused(url: &str, hello: Hello, want: u16) -> String {
    let mut c = Client::connect(url).await.unwrap();
    c.send(hello.encode()).await.unwrap();
    match tokio::time::timeout(WAIT, c.recv()).await.unwrap() {
        Err(ClientError::Closed { reason, .. }) => {
            assert_eq!(parse_close(&reason).0, Some(want), "{reason}");
            reason
        }
        other => panic!("wanted a close with {want}, got {other:?}"),
    }
}

/// Forged, expired, unknown and superseded tokens are refused with their codes; a version
/// the gateway does not speak too. The client is told a public reason, nothing internal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_with_a_reason() {
    let (_etcd, _server, g1, _g2) = two_gateways().await;
    let url = g1.url("tcp");
    let key = TokenKey::from_secret(SECRET.as_bytes());
    let server = a("1.1.1");
    let good = key.issue([5; 16], server, 1, Duration::from_secs(60));
    let mut forged = good;
    forged.mac[0] ^= 1;
    let resume = |token: Token| Hello::Resume { token, received: 0 };
    let r = refused(&url, resume(forged), code::BAD_TOKEN).await;
    assert!(!r.contains("1.1.1"), "{r}");
    let expired = key.sign(Token { expires: 1, ..good });
    refused(&url, resume(expired), code::EXPIRED).await;
    // Signed, unexpired, but no such session on that server.
    let r = refused(&url, resume(good), code::NO_SESSION).await;
    assert!(r.contains("session no longer exists"), "{r}");
    // A real session's old token, after three newer ones: refused; the session goes on.
    let mut s = SessionClient::connect(&[&url], b"", SessionClientConfig::default())
        .await
        .unwrap();
    let oldest = s.token();
    for _ in 0..3 {
        s.switch_to(&url);
        s.send("x").await.unwrap();
        loop {
            if let SessionEvent::Frame(_) =
                tokio::time::timeout(WAIT, s.recv()).await.unwrap().unwrap()
            {
                break;
            }
        }
    }
    refused(&url, resume(oldest), code::BAD_TOKEN).await;
    s.send("still here").await.unwrap();
    loop {
        if let SessionEvent::Frame(f) = tokio::time::timeout(WAIT, s.recv()).await.unwrap().unwrap()
        {
            assert_eq!(f, "still here".as_bytes());
            break;
        }
    }
    // Another version.
    let mut v3 = Hello::New { key: Bytes::new() }.encode().to_vec();
    v3[7] = 3;
    let mut c = Client::connect(&url).await.unwrap();
    c.send(Bytes::from(v3)).await.unwrap();
    match tokio::time::timeout(WAIT, c.recv()).await.unwrap() {
        Err(ClientError::Closed { reason, .. }) => {
            assert_eq!(parse_close(&reason).0, Some(code::VERSION), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

/// A client that keeps sending while never reading acknowledgements overruns its replay
/// buffer: the send fails and the session ends with that reason, never grows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_buffer_overrun_ends_the_session_with_its_reason() {
    let (_etcd, _server, g1, _g2) = two_gateways().await;
    let config = SessionClientConfig::default().max_replay(8, 1 << 20);
    let mut s = SessionClient::connect(&[&g1.url("tcp")], b"", config)
        .await
        .unwrap();
    let mut result = Ok(());
    for i in 0..9 {
        result = s.send(format!("f{i}")).await;
        if result.is_err() {
            break;
        }
    }
    match result {
        Err(ClientError::Closed { reason, code: c }) => {
            assert_eq!(c, Some(code::REPLAY_FULL), "{reason}");
            assert!(reason.contains("replay buffer full"), "{reason}");
        }
        other => panic!("wanted the session to end on the overrun, got {other:?}"),
    }
    assert!(s.recv().await.is_err());
}

/// A version 1 client (its first frame is not a hello) still echoes through a game server
/// that serves sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_1_clients_still_work() {
    let (_etcd, _server, g1, _g2) = two_gateways().await;
    let mut c = Client::connect(&g1.url("ws")).await.unwrap();
    c.send("whoami").await.unwrap();
    assert_eq!(c.recv().await.unwrap(), "1.1.1".as_bytes());
    c.send("kick:cheating").await.unwrap();
    match c.recv().await {
        Err(ClientError::Closed { reason, .. }) => assert_eq!(reason, "cheating"),
        other => panic!("{other:?}"),
    }
}

/// A game server that restarts has lost its sessions' state: its session clients try to
/// resume and are told, with 4003, that the session no longer exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_game_server_tells_its_clients_their_session_is_gone() {
    let (etcd, mut server, g1, _g2) = two_gateways().await;
    let mut s = SessionClient::connect(&[&g1.url("tcp")], b"", SessionClientConfig::default())
        .await
        .unwrap();
    echo_rounds(&mut s, 1, 1, 3, Duration::ZERO).await.unwrap();
    server.kill();
    let _restarted = game_server(&etcd, "1.1.1");
    let mut disconnected = false;
    let ended = loop {
        match tokio::time::timeout(WAIT, s.recv()).await.unwrap() {
            Ok(SessionEvent::Disconnected { .. }) => disconnected = true,
            Ok(SessionEvent::Ended { code, reason }) => break (code, reason),
            Ok(other) => panic!("{other:?}"),
            Err(e) => panic!("{e}"),
        }
    };
    assert!(disconnected);
    assert_eq!(ended.0, Some(code::NO_SESSION), "{}", ended.1);
    assert!(ended.1.contains("session no longer exists"), "{}", ended.1);
    assert!(!ended.1.contains("1.1.1"), "internals in {}", ended.1);
}

/// A game server that shuts down (SIGTERM) ends its sessions itself once its drain stops
/// taking new work: each client is told `1012 game server shutting down` (not cut off, not
/// sent to resume into a leaving server), the server exits cleanly well within its grace
/// period, and a new session goes to the server that stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_game_server_shutting_down_tells_its_session_clients() {
    let etcd = Etcd::start();
    let members: Vec<Member> = ["1.100.1", "1.1.1", "1.1.2"]
        .iter()
        .map(|m| Member::new(a(m), free_port()))
        .collect();
    etcd.list(PREFIX, &members).await;
    let servers = [game_server(&etcd, "1.1.1"), game_server(&etcd, "1.1.2")];
    let g = gateway_as(&etcd, "1.100.1", LIMITS, "", "");
    g.log
        .wait(&["game servers of type 1 available: [1.1.1, 1.1.2]"])
        .await;
    let whoami = async |s: &mut SessionClient| -> String {
        s.send("whoami").await.unwrap();
        match tokio::time::timeout(WAIT, s.recv()).await.unwrap() {
            Ok(SessionEvent::Frame(f)) => String::from_utf8(f.to_vec()).unwrap(),
            other => panic!("{other:?}"),
        }
    };
    // Clients on both transports; the server most of them are on is the one stopped.
    let mut clients = Vec::new();
    for i in 0..6 {
        let url = g.url(if i % 2 == 0 { "tcp" } else { "ws" });
        let mut s = SessionClient::connect(
            &[&url],
            format!("k{i}").as_bytes(),
            SessionClientConfig::default(),
        )
        .await
        .unwrap();
        let on = whoami(&mut s).await;
        clients.push((s, on));
    }
    let stopped = clients[0].1.clone();
    let [s1, s2] = servers;
    let (mut server, _stays) = if s1.name == stopped {
        (s1, s2)
    } else {
        (s2, s1)
    };
    let on_it: Vec<_> = clients
        .iter_mut()
        .filter(|(_, on)| *on == stopped)
        .collect();
    let started = std::time::Instant::now();
    server.terminate();
    for (s, _) in on_it {
        // Told, not cut off: the next event is the end (no disconnection, no resume).
        let ended = match tokio::time::timeout(WAIT, s.recv()).await.unwrap() {
            Ok(SessionEvent::Ended { code, reason }) => (code, reason),
            other => panic!("{other:?}"),
        };
        assert_eq!(ended.0, Some(code::SERVER_RESTART), "{}", ended.1);
        assert!(ended.1.contains("game server shutting down"), "{}", ended.1);
        assert!(!ended.1.contains(&stopped), "internals in {}", ended.1);
    }
    let told = started.elapsed();
    // The server's grace period is 10 s: the clients were told as its drain got there (after
    // it left membership and arrivals went quiet), not when the grace period ran out.
    assert!(told < Duration::from_secs(5), "told after {told:?}");
    let status = tokio::task::spawn_blocking(move || {
        let status = server.child.wait();
        (server, status)
    });
    let (_server, status) = tokio::time::timeout(WAIT, status).await.unwrap().unwrap();
    assert!(status.unwrap().success());
    // A new session goes to the server that stays.
    let mut fresh = SessionClient::connect(&[&g.url("tcp")], b"k0", SessionClientConfig::default())
        .await
        .unwrap();
    let on = whoami(&mut fresh).await;
    assert_ne!(on, stopped);
    // The others never noticed.
    for (s, on) in clients.iter_mut().filter(|(_, on)| *on != stopped) {
        assert_eq!(whoami(s).await, *on);
    }
}

/// A session client written in Python from the README's description of the wire (and the C
/// ikcp for KCP): it starts a session over TCP on one gateway, drops the connection with
/// frames in flight, sends more while offline, resumes over KCP on the other gateway, sends
/// again what the server did not get, and gets every echo once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_session_client_resumes_across_gateways_and_transports() {
    let deps = pydeps_with_kcp();
    let (_etcd, _server, g1, g2) = two_gateways().await;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py_session_client.py");
    let out = tokio::time::timeout(
        WAIT * 3,
        tokio::process::Command::new("python3")
            .arg(&script)
            .arg(&g1.tcp)
            .arg(&g2.kcp)
            .env("PYTHONPATH", &deps)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // What the server had not received (the five sent offline, and any of the four sent
    // before the drop that died with the connection) went again on the new connection.
    let (had, again) = stdout
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix("resumed over kcp: the server had ")?;
            let (had, again) = rest.split_once(", sent again ")?;
            Some((had.parse::<u32>().ok()?, again.parse::<u32>().ok()?))
        })
        .unwrap_or_else(|| panic!("no resume in {stdout}"));
    assert!((41..=45).contains(&had) && had + again == 50, "{stdout}");
    assert!(
        stdout.contains("echoes: 60, in order, once each"),
        "{stdout}"
    );
    assert!(stdout.contains("close: 1000 "), "{stdout}");
}
