//! The roles this test binary plays when re-executed inside a host (`CG_FAULT_ROLE`): the
//! load driver, a sink that checks message order, and an HTTP probe. Each prints what it saw
//! as lines the scenarios parse.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clustergo::{Bytes, Cmd, LogicAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::net::Error;
use crate::{PREFIX, SECRET, WAIT};

/// The command of the driver's sequenced messages (payload: the sequence number, 8 bytes big
/// endian, counting from 1 per sender and receiver, one step per accepted send).
pub(crate) const SEQ: Cmd = Cmd(7);

fn var(k: &str) -> Result<String, Error> {
    std::env::var(k).map_err(|_| format!("{k} not set").into())
}

fn opt(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

fn addrs(list: &str) -> Result<Vec<LogicAddr>, Error> {
    list.split(',')
        .map(|a| a.parse().map_err(Error::from))
        .collect()
}

/// A node of this test on the etcd at `CG_ETCD` with a 2 s lease, at `CG_ADDR`.
fn node(
    builder: impl FnOnce(clustergo::NodeBuilder) -> clustergo::NodeBuilder,
) -> Result<clustergo::Node, Error> {
    let discovery = clustergo::EtcdDiscovery::connect(
        [var("CG_ETCD")?],
        PREFIX,
        clustergo::EtcdOptions::default().lease_ttl(Duration::from_secs(2)),
    );
    let b = clustergo::Node::builder(var("CG_ADDR")?.parse()?)
        .discovery(discovery)
        .config(
            clustergo::NodeConfig::default()
                .secret(SECRET)
                .shutdown_grace(Duration::from_secs(2)),
        );
    Ok(builder(b).build())
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// The error's variant name (`Timeout`, `PeerLost`, …).
fn kind(e: &impl std::fmt::Debug) -> String {
    let text = format!("{e:?}");
    text.split([' ', '{', '(']).next().unwrap_or("?").to_owned()
}

/// The driver: node `CG_ADDR` calling `CG_TARGETS` in turn (`game.whoami`), each call with
/// `CG_DEADLINE_MS`, for `CG_RUN_MS`. Prints `call <at_ms> <to> <ok|err> <took_ms> [kind]`
/// per call and `view <at_ms> <addr> <available>` when a target's availability changes in
/// its view. Optional:
/// - `CG_MSG_EVERY_MS`: also sends each target a sequenced message ([`SEQ`]) that often,
///   never waiting for room (`try_send_cmd`, as a game loop does); prints `msgs <to>
///   accepted=N` and `msgfail <to> <kind> <count>` at the end;
/// - `CG_GAP=<from_ms>+<len_ms>`: sends and calls nothing in that window (the pairs go idle);
/// - `CG_LATE=<from_ms>:<addr,…>`: more targets, called in turn with the others from then on;
/// - `CG_LINKS`: addresses whose link state is printed on change: `linked <at_ms> <addr> <up>`;
/// - `CG_WATCH`: admin endpoints (`ip:port`) whose `/status` is printed when it changes:
///   `status <at_ms> <ip:port> <json>`;
/// - `CG_REPORT=1`: at the end, asks each target (a sink) for its report: `report <to> <text>`;
/// - `CG_METRICS`: admin endpoints (`ip:port`) whose envelope counters are read at the end:
///   `metric <ip:port> <line>` per `clustergo_envelopes_…` sample.
///
/// Then prints its counters (`stats name=value …`, with the largest queue depth toward any
/// peer it saw, sampled every 20 ms) and `done`. Logs go to stderr (the host's log file).
pub(crate) fn driver() -> Result<(), Error> {
    let targets = addrs(&var("CG_TARGETS")?)?;
    let deadline = Duration::from_millis(var("CG_DEADLINE_MS")?.parse()?);
    let run = Duration::from_millis(var("CG_RUN_MS")?.parse()?);
    let msg_every = opt("CG_MSG_EVERY_MS")
        .map(|v| v.parse().map(Duration::from_millis))
        .transpose()?;
    let gap = match opt("CG_GAP") {
        Some(g) => {
            let (from, len) = g.split_once('+').ok_or("CG_GAP: <from_ms>+<len_ms>")?;
            let from: u64 = from.parse()?;
            Some((from, from + len.parse::<u64>()?))
        }
        None => None,
    };
    let late = match opt("CG_LATE") {
        Some(l) => {
            let (from, list) = l.split_once(':').ok_or("CG_LATE: <from_ms>:<addr,…>")?;
            Some((from.parse::<u64>()?, addrs(list)?))
        }
        None => None,
    };
    let links = opt("CG_LINKS")
        .map(|l| addrs(&l))
        .transpose()?
        .unwrap_or_default();
    let watch: Vec<String> = opt("CG_WATCH")
        .map(|w| w.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let report = opt("CG_REPORT").is_some();
    let metrics: Vec<String> = opt("CG_METRICS")
        .map(|w| w.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let rt = runtime()?;
    rt.block_on(async move {
        let _logs = clustergo::telemetry::init("fault-driver")?;
        let node = node(|b| b)?;
        node.start().await?;
        let everyone = targets.iter().chain(late.iter().flat_map(|(_, l)| l));
        for t in everyone {
            if !node
                .wait_for_member(*t, |m| m.is_some_and(|m| m.available), WAIT)
                .await
            {
                return Err(format!("{t} never became available").into());
            }
        }
        println!("ready");
        let t0 = tokio::time::Instant::now();
        let ms = move || t0.elapsed().as_millis() as u64;
        let idle = move || gap.is_some_and(|(a, b)| (a..b).contains(&ms()));
        let admin = clustergo::admin::Admin::new().node(&node);
        let max_depth = Arc::new(std::sync::atomic::AtomicU64::new(0));
        // Views, links and the queue depth, sampled every 20 ms; a line at each change.
        let watcher = {
            let node = node.clone();
            let targets = targets.clone();
            let max_depth = max_depth.clone();
            tokio::spawn(async move {
                let mut seen: HashMap<(bool, LogicAddr), Option<bool>> = HashMap::new();
                loop {
                    for t in &targets {
                        let now = node.member(*t).map(|m| m.available);
                        if seen.insert((false, *t), now) != Some(now) {
                            println!("view {} {t} {}", ms(), now.unwrap_or(false));
                        }
                    }
                    for l in &links {
                        let up = Some(node.is_linked(*l));
                        if seen.insert((true, *l), up) != Some(up) {
                            println!("linked {} {l} {}", ms(), up == Some(true));
                        }
                    }
                    let text = admin.metrics_text();
                    let depth = text
                        .lines()
                        .filter(|l| l.starts_with("clustergo_peer_queue_depth{"))
                        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                        .max()
                        .unwrap_or(0);
                    max_depth.fetch_max(depth, std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        let probes: Vec<_> = watch
            .into_iter()
            .map(|at| {
                tokio::spawn(async move {
                    let mut last = String::new();
                    loop {
                        let body = http_get(&at, "/status")
                            .await
                            .unwrap_or_else(|e| format!("unreachable: {e}"));
                        if body != last {
                            println!("status {} {at} {}", ms(), body.replace('\n', " "));
                            last = body;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                })
            })
            .collect();
        // Sequenced messages: per target, accepted sends and failures by kind.
        let sent: Arc<Mutex<HashMap<LogicAddr, Sent>>> = Arc::default();
        let sender = msg_every.map(|every| {
            let node = node.clone();
            let targets = targets.clone();
            let sent = sent.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    if idle() {
                        continue;
                    }
                    for t in &targets {
                        let mut sent = sent.lock().unwrap();
                        let (seq, fails) = sent.entry(*t).or_default();
                        let payload = Bytes::copy_from_slice(&(*seq + 1).to_be_bytes());
                        match node.try_send_cmd(*t, SEQ, payload) {
                            Ok(()) => *seq += 1,
                            Err(e) => *fails.entry(kind(&e)).or_default() += 1,
                        }
                    }
                }
            })
        });
        let mut i = 0usize;
        while ms() < run.as_millis() as u64 {
            if idle() {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            let to = match &late {
                Some((from, more)) if ms() >= *from => {
                    let n = targets.len() + more.len();
                    let k = i % n;
                    if k < targets.len() { targets[k] } else { more[k - targets.len()] }
                }
                _ => targets[i % targets.len()],
            };
            i += 1;
            let at = ms();
            let started = tokio::time::Instant::now();
            let r = node
                .call_timeout(to, "game.whoami", Bytes::new(), deadline)
                .await;
            let took = started.elapsed().as_millis();
            match r {
                Ok(_) => println!("call {at} {to} ok {took}"),
                Err(e) => println!("call {at} {to} err {took} {}", kind(&e)),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if let Some(s) = sender {
            s.abort();
        }
        watcher.abort();
        probes.iter().for_each(|p| p.abort());
        for (to, (accepted, fails)) in sent.lock().unwrap().iter() {
            println!("msgs {to} accepted={accepted}");
            for (k, n) in fails {
                println!("msgfail {to} {k} {n}");
            }
        }
        if report {
            for t in &targets {
                // Everything sent before has arrived or is lost: the report is asked on the
                // same link, after the messages, in order.
                let r = node
                    .call_timeout(*t, "fault.report", Bytes::new(), WAIT)
                    .await
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_else(|e| format!("failed {e}"));
                println!("report {t} {r}");
            }
        }
        for at in &metrics {
            match http_get(at, "/metrics").await {
                Ok(text) => text
                    .lines()
                    .filter(|l| l.starts_with("clustergo_envelopes_"))
                    .for_each(|l| println!("metric {at} {l}")),
                Err(e) => println!("metric {at} unreachable: {e}"),
            }
        }
        let st = node.stats();
        println!(
            "stats dials_started={} dials_failed={} dial_failures_timeout={} dial_failures_refused={} dial_failures_unreachable={} envelopes_lost={} envelopes_expired={} envelopes_unconfirmed={} max_queue_depth={}",
            st.dials_started,
            st.dials_failed,
            st.dial_failures_timeout,
            st.dial_failures_refused,
            st.dial_failures_unreachable,
            st.envelopes_lost,
            st.envelopes_expired,
            st.envelopes_unconfirmed,
            max_depth.load(std::sync::atomic::Ordering::Relaxed)
        );
        println!("done");
        node.shutdown().await;
        Ok::<(), Error>(())
    })
}

/// Sequenced messages to one target: sends accepted, and sends refused by kind.
type Sent = (u64, HashMap<String, u64>);

/// What a sink saw from one sender.
#[derive(Default)]
struct Seen {
    received: u64,
    /// The next sequence number expected.
    next: u64,
    /// Sequence numbers skipped (never seen, when a later one came).
    missing: u64,
    /// Arrivals at or below one already seen: duplicates or reordered.
    behind: u64,
}

/// The sink: node `CG_ADDR` answering `game.whoami`, checking the order of [`SEQ`] messages
/// per sender, and answering `fault.report` with `received=N missing=M behind=B last=L` for
/// the caller. Prints `listening on` when it serves.
pub(crate) fn sink() -> Result<(), Error> {
    let rt = runtime()?;
    rt.block_on(async move {
        let _logs = clustergo::telemetry::init("fault-sink")?;
        let seen: Arc<Mutex<HashMap<LogicAddr, Seen>>> = Arc::default();
        let me: LogicAddr = var("CG_ADDR")?.parse()?;
        let (on_msg, on_report) = (seen.clone(), seen.clone());
        let node = node(|b| {
            b.rpc("game.whoami", move |_, _| async move {
                Ok::<_, clustergo::HandlerError>(Bytes::from(me.to_string()))
            })
            .on_cmd(SEQ, move |ctx, payload| {
                let Ok(seq) = <[u8; 8]>::try_from(&payload[..]).map(u64::from_be_bytes) else {
                    return;
                };
                let mut all = on_msg.lock().unwrap();
                let s = all.entry(ctx.from()).or_default();
                s.received += 1;
                let next = s.next.max(1);
                if seq < next {
                    s.behind += 1;
                } else {
                    s.missing += seq - next;
                    s.next = seq + 1;
                }
            })
            .rpc("fault.report", move |ctx, _| {
                let text = on_report
                    .lock()
                    .unwrap()
                    .get(&ctx.from())
                    .map(|s| {
                        format!(
                            "received={} missing={} behind={} last={}",
                            s.received,
                            s.missing,
                            s.behind,
                            s.next.saturating_sub(1)
                        )
                    })
                    .unwrap_or_else(|| "received=0 missing=0 behind=0 last=0".into());
                async move { Ok::<_, clustergo::HandlerError>(Bytes::from(text)) }
            })
        })?;
        node.start().await?;
        println!(
            "sink {me} listening on {}",
            node.local_addr().ok_or("no listener")?
        );
        node.closed().await;
        Ok::<(), Error>(())
    })
}

/// `GET path` from the HTTP server at `at` (`ip:port`); the body, or why not. Bounded: 2 s,
/// 1 MiB.
async fn http_get(at: &str, path: &str) -> Result<String, Error> {
    tokio::time::timeout(Duration::from_secs(2), async {
        let mut s = tokio::net::TcpStream::connect(at).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {at}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        (&mut s).take(1 << 20).read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP header")?;
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            return Err(head.lines().next().unwrap_or("").into());
        }
        Ok::<String, Error>(body.to_owned())
    })
    .await
    .map_err(|_| Error::from("timed out"))?
}
