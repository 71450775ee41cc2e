//! Mode `members`: what membership costs as it grows, in a real etcd.
//!
//! For each M of `--members` (default 100, 1,000, 10,000, 50,000) the bench lists M members
//! under a prefix of their own (each with its alive key, as running nodes have; 13 node types
//! of up to 4,000 servers), then starts a process of watching nodes (`watchers`), each a
//! whole [`Node`] on an [`EtcdDiscovery`] of that prefix, and measures:
//! - **time to the first snapshot**: `Node::start` of one node (reading the prefix, building
//!   its view, taking its lease and putting its alive key), on an etcd nobody else reads;
//! - **memory per member**: that node's resident growth minus a node's own (one started
//!   before it on a prefix listing only itself), over M: the member's place in the source's
//!   state, the merger's map and the node's view, and what the allocator kept from reading;
//! - **change propagation**: with 20 nodes watching, changes written at 10/s and at 100/s for
//!   10 s each (each a member's network address, a different member each time), the delay
//!   from when the write was due until every one of the 20 has the new value in its view,
//!   p50/p99/max; and the watching process's CPU per change per node, less what it spends
//!   idle over as long (measured just before).
//!
//! Small M carry the fixed growth of a view (maps, indexes, pages of the allocator) over few
//! members, as small N do in `links`. A change that a watcher has not applied within 10 s is
//! counted as lost.
//!
//! Needs an etcd binary (`etcd` on the `PATH`, or `CLUSTERGO_ETCD`); without one the mode says
//! that it did not run.

use std::time::{Duration, Instant};

use clustergo::membership::{alive_key, encode_member, member_key};
use clustergo::{EtcdDiscovery, EtcdOptions, LogicAddr, Member, Node};
use etcd_client::{Client, Txn, TxnOp};

use super::{Proc, config, cpu_nanos, number, rss_bytes, until_stdin_closes};

// The tests' etcd (it brings the tests' port picker, which the mesh bench also loads: two
// copies in the smoke test, each checking a port free when it hands it out).
#[allow(clippy::duplicate_mod)]
#[path = "../../tests/support/etcd.rs"]
mod etcd;

/// Watching nodes of the propagation measurement.
pub(crate) const WATCHERS: usize = 20;
/// Change rates, per second.
pub(crate) const RATES: [u32; 2] = [10, 100];
/// Servers per node type of the listed members.
const PER_TYPE: usize = 4_000;
/// Members per transaction while listing (two puts each; etcd allows 128 operations).
const PER_TXN: usize = 64;
/// Transactions in flight while listing.
const TXNS: usize = 8;
/// How long a watcher may take to apply a change before it counts as lost.
const LOST_AFTER: Duration = Duration::from_secs(10);

/// One M's figures.
#[derive(Debug, Clone)]
pub(crate) struct MembersRow {
    pub(crate) members: usize,
    /// Seconds the listing took (not a figure of the framework; shown for context).
    pub(crate) list_secs: f64,
    pub(crate) first_snapshot_ms: f64,
    pub(crate) bytes_per_member: f64,
    /// Per rate of [`RATES`].
    pub(crate) changes: Vec<ChangeFigures>,
}

/// Propagation at one rate.
#[derive(Debug, Clone)]
pub(crate) struct ChangeFigures {
    pub(crate) rate: u32,
    pub(crate) written: usize,
    pub(crate) lost: usize,
    /// Until all watchers applied it, over the changes.
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
    /// Watchers' CPU per change per watching node.
    pub(crate) cpu_us_per_node: f64,
}

/// The etcd binary, if this machine has one.
fn etcd_binary() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("CLUSTERGO_ETCD") {
        return Some(p.into());
    }
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/bin"])
        .map(|d| std::path::Path::new(d).join("etcd"))
        .find(|p| p.is_file())
}

/// The i-th listed member (from 0).
fn member_addr(i: usize) -> LogicAddr {
    LogicAddr::new(1, (1 + i / PER_TYPE) as u8, (1 + i % PER_TYPE) as u16)
        .expect("at most 13 types of 4,000")
}

/// The watching nodes' addresses: a type of their own.
fn watcher_addr(i: usize) -> LogicAddr {
    LogicAddr::new(1, 200, 1 + i as u16).expect("a small server id")
}

fn prefix(m: usize) -> String {
    format!("/scale/m{m}")
}

/// Runs the mode: `None` when this machine has no etcd.
pub(crate) fn run(
    sizes: &[usize],
    secs: f64,
    smoke: bool,
) -> Result<Option<Vec<MembersRow>>, String> {
    if etcd_binary().is_none() {
        println!(
            "scale members: not run: no etcd binary (install Debian's etcd-server, or set CLUSTERGO_ETCD)"
        );
        return Ok(None);
    }
    let server = etcd::Etcd::start();
    println!("scale members: etcd at {}", server.endpoint);
    println!(
        "{:>7} | {:>8} | {:>10} | {:>9} | {:>24} | {:>24}",
        "members",
        "list s",
        "first ms",
        "B/member",
        "10/s p50/p99/max ms, CPU",
        "100/s p50/p99/max ms, CPU"
    );
    println!("{}", "-".repeat(96));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for &m in sizes {
        if m > 13 * PER_TYPE {
            return Err(format!("--members: at most {}", 13 * PER_TYPE));
        }
        let started = Instant::now();
        runtime.block_on(list(&server.endpoint, m))?;
        let list_secs = started.elapsed().as_secs_f64();
        let mut child = Proc::spawn(&[
            "watchers".into(),
            server.endpoint.clone(),
            m.to_string(),
            secs.to_string(),
        ])?;
        let first = child.expect("FIRST")?;
        let mut f = first.split_whitespace().map(|v| v.parse::<f64>());
        let (Some(Ok(first_ms)), Some(Ok(bytes_per_member))) = (f.next(), f.next()) else {
            return Err(format!("watchers: bad FIRST line {first:?}"));
        };
        let mut changes = Vec::new();
        for rate in RATES {
            let line = child.expect("CHANGES")?;
            let c = parse_changes(&line)?;
            if c.rate != rate {
                return Err(format!(
                    "watchers: figures for {}/s, expected {rate}/s",
                    c.rate
                ));
            }
            changes.push(c);
        }
        drop(child);
        let row = MembersRow {
            members: m,
            list_secs,
            first_snapshot_ms: first_ms,
            bytes_per_member,
            changes,
        };
        let fig = |c: &ChangeFigures| {
            format!(
                "{:.1}/{:.1}/{:.1}, {:.0} µs{}",
                c.p50_ms,
                c.p99_ms,
                c.max_ms,
                c.cpu_us_per_node,
                if c.lost > 0 {
                    format!(" ({} lost)", c.lost)
                } else {
                    String::new()
                }
            )
        };
        println!(
            "{:>7} | {:>8.2} | {:>10.1} | {:>9.0} | {:>24} | {:>24}",
            m,
            row.list_secs,
            row.first_snapshot_ms,
            row.bytes_per_member,
            fig(&row.changes[0]),
            fig(&row.changes[1])
        );
        rows.push(row);
    }
    let name = if smoke { "members-smoke" } else { "members" };
    write_csv(&rows, name)?;
    draw(&rows, name)?;
    Ok(Some(rows))
}

fn parse_changes(line: &str) -> Result<ChangeFigures, String> {
    let v: Vec<&str> = line.split_whitespace().collect();
    let bad = || format!("watchers: bad CHANGES line {line:?}");
    if v.len() != 7 {
        return Err(bad());
    }
    let f = |i: usize| v[i].parse::<f64>().map_err(|_| bad());
    Ok(ChangeFigures {
        rate: v[0].parse().map_err(|_| bad())?,
        written: v[1].parse().map_err(|_| bad())?,
        lost: v[2].parse().map_err(|_| bad())?,
        p50_ms: f(3)?,
        p99_ms: f(4)?,
        max_ms: f(5)?,
        cpu_us_per_node: f(6)?,
    })
}

/// Lists members 0..m under `prefix(m)`, each with its alive key.
async fn list(endpoint: &str, m: usize) -> Result<(), String> {
    let client = Client::connect([endpoint], None)
        .await
        .map_err(|e| format!("etcd: {e}"))?;
    let p = prefix(m);
    let mut inflight = tokio::task::JoinSet::new();
    for chunk in (0..m).collect::<Vec<_>>().chunks(PER_TXN) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .flat_map(|&i| {
                let addr = member_addr(i);
                let member = Member::new(addr, format!("127.0.0.1:{}", 10_000 + i % 50_000));
                [
                    TxnOp::put(member_key(&p, addr), encode_member(&member), None),
                    TxnOp::put(alive_key(&p, addr), "1", None),
                ]
            })
            .collect();
        let mut c = client.clone();
        inflight.spawn(async move { c.txn(Txn::new().and_then(ops)).await.map(|_| ()) });
        while inflight.len() >= TXNS {
            inflight
                .join_next()
                .await
                .expect("a transaction in flight")
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("listing: {e}"))?;
        }
    }
    while let Some(r) = inflight.join_next().await {
        r.map_err(|e| e.to_string())?
            .map_err(|e| format!("listing: {e}"))?;
    }
    Ok(())
}

/// The `watchers` process: `watchers <endpoint> <members> <secs>`.
pub(crate) fn process(args: &[String]) -> Result<(), String> {
    let endpoint = args.get(2).ok_or("watchers: endpoint")?.clone();
    let m = number(args.get(3))?;
    let secs: f64 = args
        .get(4)
        .and_then(|s| s.parse().ok())
        .ok_or("watchers: seconds")?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?
        .block_on(watchers(endpoint, m, secs))
}

fn options() -> EtcdOptions {
    EtcdOptions::default().request_timeout(Duration::from_secs(10))
}

/// Lists `addr` under `prefix` at a fresh listener; a node for it, not started.
async fn node_at(
    kv: &mut Client,
    endpoint: &str,
    prefix: &str,
    addr: LogicAddr,
) -> Result<Node, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let at = l.local_addr().map_err(|e| e.to_string())?;
    let me = Member::new(addr, at.to_string());
    kv.put(member_key(prefix, addr), encode_member(&me), None)
        .await
        .map_err(|e| format!("etcd: {e}"))?;
    Ok(Node::builder(addr)
        .discovery(EtcdDiscovery::connect([endpoint], prefix, options()))
        .listener(l)
        .config(config())
        .build())
}

async fn watchers(endpoint: String, m: usize, secs: f64) -> Result<(), String> {
    let me = std::process::id();
    let p = prefix(m);
    let mut kv = Client::connect([endpoint.clone()], None)
        .await
        .map_err(|e| format!("etcd: {e}"))?;
    // Two nodes of their own first: the first pays what a process pays once (the runtime's
    // threads, the first connections); the second's growth is what a node costs without
    // members, the baseline of the member figure.
    let warm = node_at(
        &mut kv,
        &endpoint,
        &format!("/scale/warm{m}"),
        watcher_addr(0),
    )
    .await?;
    let lone = node_at(
        &mut kv,
        &endpoint,
        &format!("/scale/lone{m}"),
        watcher_addr(0),
    )
    .await?;
    let first = node_at(&mut kv, &endpoint, &p, watcher_addr(1)).await?;
    let mut rest = Vec::new();
    for i in 2..=WATCHERS {
        rest.push(node_at(&mut kv, &endpoint, &p, watcher_addr(i)).await?);
    }
    warm.start()
        .await
        .map_err(|e| format!("warm-up node: {e}"))?;
    let rss0 = rss_bytes(me)?;
    lone.start().await.map_err(|e| format!("lone node: {e}"))?;
    let rss1 = rss_bytes(me)?;
    let started = Instant::now();
    first
        .start()
        .await
        .map_err(|e| format!("first node: {e}"))?;
    let first_ms = started.elapsed().as_secs_f64() * 1e3;
    let rss2 = rss_bytes(me)?;
    let (rss0, rss1, rss2) = (rss0 as i64, rss1 as i64, rss2 as i64);
    let per_member = ((rss2 - rss1) - (rss1 - rss0)) as f64 / m as f64;
    println!("FIRST {first_ms:.2} {per_member:.1}");
    let starts = rest.iter().map(|n| n.start());
    for r in futures_util::future::join_all(starts).await {
        r.map_err(|e| format!("watcher: {e}"))?;
    }
    let mut nodes = vec![first];
    nodes.extend(rest);
    let nodes = std::sync::Arc::new(nodes);
    // The watches start after each node's first snapshot; the first change after that also
    // waits for them to be set up. One change first, not counted.
    if change(kv.clone(), nodes.clone(), p.clone(), 0, m, Instant::now())
        .await?
        .is_none()
    {
        return Err("the watchers did not apply the first change within 10 s".into());
    }
    let mut serial = 0usize;
    for rate in RATES {
        let count = ((rate as f64 * secs).ceil() as usize).max(5);
        // What the 20 nodes cost doing nothing over as long, to take from the figure.
        let cpu0 = cpu_nanos(me)?;
        tokio::time::sleep(Duration::from_secs_f64(count as f64 / rate as f64)).await;
        let idle = cpu_nanos(me)? - cpu0;
        let cpu0 = cpu_nanos(me)?;
        let t0 = tokio::time::Instant::now();
        let mut pending = tokio::task::JoinSet::new();
        for k in 0..count {
            let due = t0 + Duration::from_secs_f64(k as f64 / rate as f64);
            tokio::time::sleep_until(due).await;
            serial += 1;
            // Timed from when it was due, not from when its task ran: a late start is delay.
            let due = due.into_std();
            pending.spawn(change(kv.clone(), nodes.clone(), p.clone(), serial, m, due));
        }
        let mut delays = Vec::new();
        let mut lost = 0;
        while let Some(r) = pending.join_next().await {
            match r.map_err(|e| e.to_string())?? {
                Some(d) => delays.push(d.as_secs_f64() * 1e3),
                None => lost += 1,
            }
        }
        let spent = (cpu_nanos(me)? - cpu0).saturating_sub(idle);
        let cpu = spent as f64 / 1e3 / count as f64 / WATCHERS as f64;
        delays.sort_by(f64::total_cmp);
        let at = |q: f64| {
            delays
                .get(((delays.len() as f64 * q) as usize).min(delays.len().saturating_sub(1)))
                .copied()
                .unwrap_or(f64::NAN)
        };
        println!(
            "CHANGES {rate} {count} {lost} {:.3} {:.3} {:.3} {cpu:.1}",
            at(0.5),
            at(0.99),
            delays.last().copied().unwrap_or(f64::NAN)
        );
    }
    until_stdin_closes().await;
    for n in nodes.iter() {
        n.shutdown().await;
    }
    lone.shutdown().await;
    warm.shutdown().await;
    Ok(())
}

/// Change number `serial`: a new network address for one member; the time from `start` (when
/// the write was due) until every node has it (`None`: some node did not within
/// [`LOST_AFTER`]).
async fn change(
    mut kv: Client,
    nodes: std::sync::Arc<Vec<Node>>,
    prefix: String,
    serial: usize,
    m: usize,
    start: Instant,
) -> Result<Option<Duration>, String> {
    let addr = member_addr(serial % m);
    let net = format!("127.0.0.2:{}", 1 + serial % 65_000);
    let waits = nodes.iter().map(|n| {
        let net = net.clone();
        n.wait_for_member(
            addr,
            move |x| x.is_some_and(|x| x.net_addr == net),
            LOST_AFTER,
        )
    });
    let value = encode_member(&Member::new(addr, net.clone()));
    let (put, seen) = tokio::join!(
        kv.put(member_key(&prefix, addr), value, None),
        futures_util::future::join_all(waits)
    );
    put.map_err(|e| format!("etcd: {e}"))?;
    Ok(seen.iter().all(|s| *s).then(|| start.elapsed()))
}

fn write_csv(rows: &[MembersRow], name: &str) -> Result<(), String> {
    let mut out = String::from("members,list_secs,first_snapshot_ms,bytes_per_member");
    for r in RATES {
        out.push_str(&format!(
            ",written_{r},lost_{r},p50_ms_{r},p99_ms_{r},max_ms_{r},cpu_us_per_node_{r}"
        ));
    }
    out.push('\n');
    for r in rows {
        out.push_str(&format!(
            "{},{:.2},{:.2},{:.1}",
            r.members, r.list_secs, r.first_snapshot_ms, r.bytes_per_member
        ));
        for c in &r.changes {
            out.push_str(&format!(
                ",{},{},{:.3},{:.3},{:.3},{:.1}",
                c.written, c.lost, c.p50_ms, c.p99_ms, c.max_ms, c.cpu_us_per_node
            ));
        }
        out.push('\n');
    }
    super::write_file(&format!("{name}.csv"), out.as_bytes())
}

fn draw(rows: &[MembersRow], name: &str) -> Result<(), String> {
    use super::plot::{Chart, Series};
    let x = |r: &MembersRow| r.members as f64;
    let series = |label: &'static str, f: &dyn Fn(&MembersRow) -> f64| Series {
        name: label,
        points: rows.iter().map(|r| (x(r), f(r))).collect(),
    };
    let charts = [
        (
            "snapshot",
            Chart {
                title: "Time to a node's first snapshot, per thousand members",
                x_label: "members",
                y_label: "ms per 1000 members",
                log_x: true,
            },
            vec![series("Node::start", &|r| r.first_snapshot_ms * 1e3 / x(r))],
        ),
        (
            "memory",
            Chart {
                title: "Resident memory per member in a node's view",
                x_label: "members",
                y_label: "bytes per member",
                log_x: true,
            },
            vec![series("one node", &|r| r.bytes_per_member)],
        ),
        (
            "propagation",
            Chart {
                title: "A change until all 20 watchers applied it",
                x_label: "members",
                y_label: "ms",
                log_x: true,
            },
            vec![
                series("p50 at 10/s", &|r| r.changes[0].p50_ms),
                series("p99 at 10/s", &|r| r.changes[0].p99_ms),
                series("p50 at 100/s", &|r| r.changes[1].p50_ms),
                series("p99 at 100/s", &|r| r.changes[1].p99_ms),
            ],
        ),
        (
            "change-cpu",
            Chart {
                title: "Watchers' CPU per change, per node",
                x_label: "members",
                y_label: "us per change per node",
                log_x: true,
            },
            vec![
                series("at 10/s", &|r| r.changes[0].cpu_us_per_node),
                series("at 100/s", &|r| r.changes[1].cpu_us_per_node),
            ],
        ),
    ];
    for (chart_name, chart, series) in charts {
        super::draw_file(&format!("{name}-{chart_name}.png"), &chart, &series)?;
    }
    Ok(())
}
