//! Mode `clusters`: what a harbor costs as the clusters behind it grow.
//!
//! For each C of `--clusters` (default 10, 100, 1,000): cluster 1 has a caller (`1.1.1`, a
//! process of its own) and two harbors (`1.255.1`, `1.255.2`, together in a process of their
//! own: the measured harbors); clusters 2 … C+1 each have two harbors and an echo server
//! (`k.255.1`, `k.255.2`, `k.1.1`), hosted as nodes in two other processes. Every node's
//! membership lists all of them (a harbor sees every harbor, as it would through a harbors
//! center; an ordinary node sees its own cluster). Measured:
//! - **linking**: the caller calls each server once (64 at a time): caller → a harbor of
//!   cluster 1 → a harbor of the server's cluster → the server; the time, and the measured
//!   harbors' resident growth per remote cluster (their links and route state);
//! - **idle CPU** of the measured harbors over the idle period, per second;
//! - **`rpc-c128-harbor` spread over all C clusters**: 128 callers calling the servers in
//!   turn, 64-byte echo; calls/s, p50/p99, and the measured harbors' CPU per call (each call
//!   is two envelopes through them: the request and its answer); and the raw baseline of
//!   `links`: the same callers over plain TCP straight to an echo server in each hosting
//!   process, one connection per server;
//! - **the same calls concentrated on 10 clusters** (with all C listed and linked): what C
//!   costs by itself (the view, the idle links), apart from the fan-out.

use std::time::Instant;

use super::{
    HOSTS, Opts, Proc, cpu_nanos, draw_file, plot, raise_open_files, rss_bytes, write_file,
};

/// One C's figures.
#[derive(Debug, Clone)]
pub(crate) struct ClustersRow {
    pub(crate) clusters: usize,
    pub(crate) link_ms: f64,
    /// The measured harbors' resident growth while linking, per remote cluster.
    pub(crate) edge_bytes_per_cluster: f64,
    /// The measured harbors' resident memory after linking, over C.
    pub(crate) edge_total_bytes_per_cluster: f64,
    pub(crate) edge_idle_cpu_ms_per_s: f64,
    pub(crate) calls_per_sec: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    /// The measured harbors' CPU per call forwarded (two envelopes).
    pub(crate) edge_cpu_us_per_call: f64,
    /// The same callers, all calling the first [`NEAR`] clusters' servers only: C's own
    /// cost (the view, the idle links) without the fan-out.
    pub(crate) near_calls_per_sec: f64,
    pub(crate) near_edge_cpu_us_per_call: f64,
    pub(crate) raw_calls_per_sec: f64,
}

/// Clusters the concentrated run calls.
pub(crate) const NEAR: usize = 10;

/// The remote clusters' nodes, in hosting order.
fn remote_nodes(c: usize) -> Vec<String> {
    (2..2 + c)
        .flat_map(|k| {
            [
                format!("{k}.1.1"),
                format!("{k}.255.1"),
                format!("{k}.255.2"),
            ]
        })
        .collect()
}

/// Spawns `host` for `list`; its raw echo port and its nodes' listing entries.
fn spawn_host(list: &[String]) -> Result<(Proc, String, Vec<String>), String> {
    let mut p = Proc::spawn(&["host".into(), list.join(",")])?;
    let raw = p.expect("RAW")?;
    let ports = p.expect("PORTS")?;
    let listed = list
        .iter()
        .zip(ports.split_whitespace())
        .map(|(a, port)| format!("{a}=127.0.0.1:{port}"))
        .collect();
    Ok((p, raw, listed))
}

fn numbers(line: &str) -> Vec<f64> {
    line.split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect()
}

fn clusters_at(c: usize, opts: &Opts) -> Result<ClustersRow, String> {
    let nodes = remote_nodes(c);
    let per_host = nodes.len().div_ceil(HOSTS).div_ceil(3) * 3;
    let mut hosts = Vec::new();
    let mut members = Vec::new();
    let mut raw_ports = Vec::new();
    for chunk in nodes.chunks(per_host) {
        let (p, raw, listed) = spawn_host(chunk)?;
        // One server per three nodes, each reached over the raw baseline at its host.
        raw_ports.extend(std::iter::repeat_n(raw, chunk.len() / 3));
        members.extend(listed);
        hosts.push(p);
    }
    let (mut edge, _, listed) = spawn_host(&["1.255.1".into(), "1.255.2".into()])?;
    members.extend(listed);
    let mut hub = Proc::spawn(&[
        "hub".into(),
        "1.1.1".into(),
        c.to_string(),
        opts.measure.as_secs_f64().to_string(),
        opts.idle.as_secs_f64().to_string(),
    ])?;
    let port = hub.expect("PORTS")?;
    members.push(format!("1.1.1=127.0.0.1:{port}"));
    let line = format!("MEMBERS {}", members.join(" "));
    for p in hosts.iter_mut().chain([&mut edge, &mut hub]) {
        p.say(&line)?;
    }
    for p in hosts.iter_mut().chain([&mut edge, &mut hub]) {
        p.expect("READY")?;
    }
    let edge_before = rss_bytes(edge.pid())?;
    hub.say("LINK")?;
    let link_ms = numbers(&hub.expect("LINKED")?)[0];
    let edge_after = rss_bytes(edge.pid())?;

    let cpu = cpu_nanos(edge.pid())?;
    let idle_started = Instant::now();
    hub.say("IDLE")?;
    hub.expect("IDLED")?;
    let idle_secs = idle_started.elapsed().as_secs_f64();
    let edge_idle = cpu_nanos(edge.pid())?.saturating_sub(cpu) as f64;

    // Returns the calls' figures and the measured harbors' CPU per call.
    let mut rpc = |step: &str| -> Result<(Vec<f64>, f64), String> {
        let cpu = cpu_nanos(edge.pid())?;
        hub.say(step)?;
        let called = numbers(&hub.expect("CALLED")?);
        let spent = cpu_nanos(edge.pid())?.saturating_sub(cpu) as f64;
        Ok((called.clone(), spent / 1e3 / called[0].max(1.0)))
    };
    let (called, edge_cpu_us_per_call) = rpc("RPC")?;
    let (near, near_edge_cpu_us_per_call) = rpc(&format!("RPC {NEAR}"))?;
    hub.say(&format!("RAW {}", raw_ports.join(" ")))?;
    let raw = numbers(&hub.expect("RAWCALLED")?);
    Ok(ClustersRow {
        clusters: c,
        link_ms,
        edge_bytes_per_cluster: (edge_after as f64 - edge_before as f64) / c as f64,
        edge_total_bytes_per_cluster: edge_after as f64 / c as f64,
        edge_idle_cpu_ms_per_s: edge_idle / 1e6 / idle_secs,
        calls_per_sec: called[0] / called[1].max(1e-9),
        p50_us: called[2],
        p99_us: called[3],
        edge_cpu_us_per_call,
        near_calls_per_sec: near[0] / near[1].max(1e-9),
        near_edge_cpu_us_per_call,
        raw_calls_per_sec: raw[0] / raw[1].max(1e-9),
    })
}

/// Runs the mode over `sizes`.
pub(crate) fn run(sizes: &[usize], opts: &Opts) -> Result<Vec<ClustersRow>, String> {
    let limit = raise_open_files();
    println!("scale clusters: open-file limit {limit} in each process");
    println!(
        "{:>8} | {:>8} | {:>14} | {:>14} | {:>10} | {:>9} | {:>8} | {:>8} | {:>11} | {:>9} | {:>6} | {:>10} | {:>11}",
        "clusters",
        "link ms",
        "harbors B/cl.",
        "total B/cl.",
        "idle",
        "calls/s",
        "p50 µs",
        "p99 µs",
        "µs/call",
        "raw/s",
        "÷ raw",
        "10 cl. /s",
        "10 cl. µs"
    );
    println!("{}", "-".repeat(156));
    let mut rows = Vec::new();
    for &c in sizes {
        // A hosting process holds a listener per node and a link or two per node.
        if (3 * c / HOSTS * 3) as u64 + 64 > limit {
            return Err(format!(
                "{c} clusters need more open files than the limit of {limit} allows"
            ));
        }
        let r = clusters_at(c, opts)?;
        println!(
            "{:>8} | {:>8.1} | {:>14.0} | {:>14.0} | {:>5.2} ms/s | {:>9.0} | {:>8.1} | {:>8.1} | {:>11.2} | {:>9.0} | {:>6.2} | {:>10.0} | {:>11.2}",
            r.clusters,
            r.link_ms,
            r.edge_bytes_per_cluster,
            r.edge_total_bytes_per_cluster,
            r.edge_idle_cpu_ms_per_s,
            r.calls_per_sec,
            r.p50_us,
            r.p99_us,
            r.edge_cpu_us_per_call,
            r.raw_calls_per_sec,
            r.calls_per_sec / r.raw_calls_per_sec.max(1e-9),
            r.near_calls_per_sec,
            r.near_edge_cpu_us_per_call
        );
        rows.push(r);
    }
    let name = if opts.smoke {
        "clusters-smoke"
    } else {
        "clusters"
    };
    write_csv(&rows, name)?;
    draw(&rows, name)?;
    Ok(rows)
}

fn write_csv(rows: &[ClustersRow], name: &str) -> Result<(), String> {
    let mut out = String::from(
        "clusters,link_ms,edge_bytes_per_cluster,edge_total_bytes_per_cluster,edge_idle_cpu_ms_per_s,calls_per_sec,p50_us,p99_us,edge_cpu_us_per_call,near_calls_per_sec,near_edge_cpu_us_per_call,raw_calls_per_sec\n",
    );
    for r in rows {
        out.push_str(&format!(
            "{},{:.1},{:.0},{:.0},{:.3},{:.0},{:.1},{:.1},{:.2},{:.0},{:.2},{:.0}\n",
            r.clusters,
            r.link_ms,
            r.edge_bytes_per_cluster,
            r.edge_total_bytes_per_cluster,
            r.edge_idle_cpu_ms_per_s,
            r.calls_per_sec,
            r.p50_us,
            r.p99_us,
            r.edge_cpu_us_per_call,
            r.near_calls_per_sec,
            r.near_edge_cpu_us_per_call,
            r.raw_calls_per_sec
        ));
    }
    write_file(&format!("{name}.csv"), out.as_bytes())
}

fn draw(rows: &[ClustersRow], name: &str) -> Result<(), String> {
    let x = |r: &ClustersRow| r.clusters as f64;
    let series = |label: &'static str, f: &dyn Fn(&ClustersRow) -> f64| plot::Series {
        name: label,
        points: rows.iter().map(|r| (x(r), f(r))).collect(),
    };
    let charts = [
        (
            "memory",
            plot::Chart {
                title: "A cluster's two harbors: memory per remote cluster",
                x_label: "clusters",
                y_label: "KB per remote cluster",
                log_x: true,
            },
            vec![
                series("growth while linking", &|r| r.edge_bytes_per_cluster / 1e3),
                series("all, over C", &|r| r.edge_total_bytes_per_cluster / 1e3),
            ],
        ),
        (
            "forwarding",
            plot::Chart {
                title: "Harbors' CPU per call forwarded (two envelopes)",
                x_label: "clusters",
                y_label: "us per call",
                log_x: true,
            },
            vec![
                series("calls spread over all C", &|r| r.edge_cpu_us_per_call),
                series("calls to 10 clusters", &|r| r.near_edge_cpu_us_per_call),
            ],
        ),
        (
            "calls",
            plot::Chart {
                title: "rpc-c128-harbor spread over all clusters",
                x_label: "clusters",
                y_label: "thousand calls per second",
                log_x: true,
            },
            vec![
                series("through harbors", &|r| r.calls_per_sec / 1e3),
                series("to 10 clusters only", &|r| r.near_calls_per_sec / 1e3),
                series("raw TCP, direct", &|r| r.raw_calls_per_sec / 1e3),
            ],
        ),
    ];
    for (chart_name, chart, series) in charts {
        draw_file(&format!("{name}-{chart_name}.png"), &chart, &series)?;
    }
    Ok(())
}
