//! A clustergo game server run by Agones: it tells the Agones SDK sidecar when it is Ready,
//! keeps it told it is healthy while the node is available in membership, and asks for
//! Shutdown once the node has drained. See `deploy/agones/README.md`.
//!
//! The SDK sidecar's REST API is plain HTTP on `localhost:$AGONES_SDK_HTTP_PORT` (default
//! 9358): `POST /ready`, `POST /health`, `POST /shutdown`, each with the body `{}`. It is spoken
//! here over a `TcpStream`, so the example needs no HTTP client.
//!
//! ```text
//! agones [--etcd URL] [--prefix /clustergo] [--addr 1.1.auto] [--listen 0.0.0.0:9000]
//!        [--advertise HOST:PORT] [--shutdown-grace-secs 10] [--insecure-dev]
//! ```
//! Each flag also reads an environment variable: `GAME_ETCD`, `GAME_PREFIX`, `GAME_ADDR`,
//! `GAME_LISTEN`, `GAME_ADVERTISE`, `GAME_SHUTDOWN_GRACE_SECS`; the cluster secret comes from
//! `CLUSTERGO_SECRET`. With `--etcd`, membership is in etcd and `cluster.type.auto` claims the
//! lowest free server id there, listed at the advertised address. Without it, membership holds
//! only this node (to try the SDK calls alone, e.g. against `sdk-server --local`).
//!
//! Clients reach it through a gateway as streams; frames are echoed. Stops on SIGTERM or Ctrl-C:
//! leaves membership, drains, then asks Agones to shut the game server down.

use std::net::SocketAddr;
use std::time::Duration;

use clustergo::{
    EtcdDiscovery, EtcdOptions, Frames, LogicAddr, Member, MemoryDiscovery, Node, NodeConfig,
    Stream,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How often the node's health is reported while it is available.
const HEALTH_EVERY: Duration = Duration::from_secs(2);
/// Bound on one SDK request, connect to status line.
const SDK_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts at `/ready` (one a second): the sidecar may start after the game server.
const READY_ATTEMPTS: u32 = 30;

#[derive(Debug)]
struct Settings {
    etcd: Option<String>,
    prefix: String,
    addr: String,
    listen: SocketAddr,
    advertise: Option<String>,
    grace: Duration,
    insecure_dev: bool,
    sdk_port: u16,
}

/// Flags over environment over defaults.
fn settings() -> Result<Settings, String> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let mut s = Settings {
        etcd: env("GAME_ETCD"),
        prefix: env("GAME_PREFIX").unwrap_or_else(|| "/clustergo".into()),
        addr: env("GAME_ADDR").unwrap_or_else(|| "1.1.auto".into()),
        listen: "0.0.0.0:9000".parse().map_err(|_| "default listen")?,
        advertise: env("GAME_ADVERTISE"),
        grace: Duration::from_secs(10),
        insecure_dev: false,
        sdk_port: 9358,
    };
    let mut listen = env("GAME_LISTEN");
    let mut grace = env("GAME_SHUTDOWN_GRACE_SECS");
    let sdk_port = env("AGONES_SDK_HTTP_PORT");
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--insecure-dev" {
            s.insecure_dev = true;
            continue;
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--etcd" => s.etcd = Some(value),
            "--prefix" => s.prefix = value,
            "--addr" => s.addr = value,
            "--listen" => listen = Some(value),
            "--advertise" => s.advertise = Some(value),
            "--shutdown-grace-secs" => grace = Some(value),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if let Some(l) = listen {
        s.listen = l.parse().map_err(|e| format!("listen {l:?}: {e}"))?;
    }
    if let Some(g) = grace {
        let secs: u64 = g
            .parse()
            .map_err(|e| format!("shutdown grace {g:?}: {e}"))?;
        if !(1..=600).contains(&secs) {
            return Err(format!("shutdown grace {secs} must be in 1..=600"));
        }
        s.grace = Duration::from_secs(secs);
    }
    if let Some(p) = sdk_port {
        s.sdk_port = p
            .parse()
            .map_err(|e| format!("AGONES_SDK_HTTP_PORT {p:?}: {e}"))?;
    }
    Ok(s)
}

/// `cluster.type.auto` → `(cluster, type)`.
fn auto_addr(text: &str) -> Result<Option<(u16, u8)>, String> {
    let Some(head) = text.strip_suffix(".auto") else {
        return Ok(None);
    };
    let (c, t) = head
        .split_once('.')
        .ok_or_else(|| format!("addr {text:?}: want cluster.type.auto"))?;
    let c = c
        .parse()
        .map_err(|e| format!("addr {text:?}: cluster: {e}"))?;
    let t = t.parse().map_err(|e| format!("addr {text:?}: type: {e}"))?;
    Ok(Some((c, t)))
}

/// One `POST path` with body `{}` to the SDK sidecar; `Ok` only for status 200.
async fn sdk_post(port: u16, path: &str) -> Result<(), String> {
    let exchange = async {
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost:{port}\r\nContent-Type: application/json\r\n\
             Content-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        );
        conn.write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        // The status line is all that is needed; read until it is complete (bounded).
        let mut head = Vec::with_capacity(256);
        let mut buf = [0u8; 256];
        while !head.windows(2).any(|w| w == b"\r\n") {
            let n = conn
                .read(&mut buf)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 || head.len() > 4096 {
                return Err("no status line".to_string());
            }
            head.extend_from_slice(&buf[..n]);
        }
        let line = String::from_utf8_lossy(&head);
        let line = line.lines().next().unwrap_or_default().to_owned();
        match line.split_whitespace().nth(1) {
            Some("200") => Ok(()),
            _ => Err(format!("answered {line:?}")),
        }
    };
    match tokio::time::timeout(SDK_TIMEOUT, exchange).await {
        Ok(r) => r.map_err(|e| format!("SDK POST {path}: {e}")),
        Err(_) => Err(format!("SDK POST {path}: timed out after {SDK_TIMEOUT:?}")),
    }
}

/// One client session from a gateway: frames echoed until the client leaves.
async fn session(stream: Stream) {
    let mut frames = Frames::new(stream, 64 << 10);
    while let Ok(Some(frame)) = frames.recv().await {
        if frames.send(frame).await.is_err() {
            return;
        }
    }
    let _ = frames.close().await;
}

async fn run(s: Settings) -> Result<(), Box<dyn std::error::Error>> {
    let secret = clustergo::secret_from_env(s.insecure_dev)?;
    let listener =
        std::net::TcpListener::bind(s.listen).map_err(|e| format!("listen {}: {e}", s.listen))?;
    let advertise = match &s.advertise {
        Some(a) => a.clone(),
        None => listener.local_addr()?.to_string(),
    };
    let builder = match &s.etcd {
        Some(endpoint) => {
            let discovery = EtcdDiscovery::connect(
                endpoint.split(',').map(str::to_owned),
                s.prefix.clone(),
                EtcdOptions::default(),
            );
            let me: LogicAddr = match auto_addr(&s.addr)? {
                Some((cluster, node_type)) => {
                    discovery
                        .claim(cluster, node_type, advertise.clone(), false)
                        .await?
                }
                None => s.addr.parse()?,
            };
            Node::builder(me).discovery(discovery)
        }
        None => {
            if auto_addr(&s.addr)?.is_some() {
                return Err("an auto address is claimed from etcd: give --etcd".into());
            }
            let me: LogicAddr = s.addr.parse()?;
            Node::builder(me).discovery(MemoryDiscovery::new([Member::new(me, advertise)]))
        }
    };
    let node = builder
        .listener(listener)
        .config(NodeConfig::default().secret(secret).shutdown_grace(s.grace))
        .on_stream(session)
        .build();
    node.start().await?;
    let me = node.addr();
    println!(
        "game server {me} listening on {}",
        node.local_addr().ok_or("no listener")?
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = async {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
            () = node.closed() => {}
        }
    };
    tokio::pin!(stop);

    // Ready: Agones may now allocate this game server and count it in its Fleet.
    let mut attempt = 0;
    let ready = loop {
        attempt += 1;
        match sdk_post(s.sdk_port, "/ready").await {
            Ok(()) => break Ready::Told,
            Err(e) if attempt >= READY_ATTEMPTS => {
                eprintln!("game server {me}: {e}; giving up");
                break Ready::SdkUnreachable;
            }
            Err(e) => eprintln!("game server {me}: {e}; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = &mut stop => break Ready::Stopped,
        }
    };
    if ready == Ready::Told {
        println!("game server {me}: Agones told Ready");
        // Health, only while the node is available in membership (under etcd: while its lease
        // lives). When it is not, the pings stop and Agones marks the game server Unhealthy.
        let mut tick = tokio::time::interval(HEALTH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => match node.readiness() {
                    Ok(()) => {
                        if let Err(e) = sdk_post(s.sdk_port, "/health").await {
                            eprintln!("game server {me}: {e}");
                        }
                    }
                    Err(why) => eprintln!("game server {me}: not healthy: {why}"),
                },
                () = &mut stop => break,
            }
        }
    }

    // Leave membership, let the clients finish within the grace, close.
    node.shutdown().await;
    println!("game server {me} drained");
    // Only now: Shutdown makes Agones delete the pod.
    match sdk_post(s.sdk_port, "/shutdown").await {
        Ok(()) => println!("game server {me}: Agones told Shutdown"),
        Err(e) => eprintln!("game server {me}: {e}"),
    }
    println!("game server {me} stopped");
    if ready == Ready::SdkUnreachable {
        return Err("the Agones SDK sidecar never answered /ready".into());
    }
    Ok(())
}

/// How the `/ready` attempts ended.
#[derive(Debug, PartialEq, Eq)]
enum Ready {
    Told,
    SdkUnreachable,
    Stopped,
}

fn main() -> std::process::ExitCode {
    let settings = match settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("agones: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agones: cannot start a runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match rt.block_on(run(settings)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agones: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
