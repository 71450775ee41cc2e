//! Fault injection with every process on a host of its own (network namespaces; see
//! `net.rs`). Needs root: without it, this prints that it did not run and why, and counts
//! nothing as passed. Each scenario asserts what a user would notice and prints its figures.
//!
//! Re-executed inside a host, this binary plays the other roles (`CG_FAULT_ROLE`, see
//! `roles.rs`): the load driver (a node calling targets back to back and sending sequenced
//! messages, one line per call), a sink (a node that checks the order of those messages),
//! and the gateway's clients.
//!
//! A new scenario in a few lines: a function returning its figures, listed in `main` with
//! the title its row has in the README's table (the test writes the row):
//!
//! ```text
//! fn my_fault() -> Result<String, Error> {
//!     let b = bed("mine", &["1.1.1", "1.1.2"])?; // etcd, two game servers, a driver host
//!     let run = Duration::from_secs(20);
//!     let mut drv = b.driver(&["1.1.1", "1.1.2"], run)?; // calls both, back to back
//!     std::thread::sleep(Duration::from_secs(3));
//!     b.net.partition(&b.servers[0].0)?; // the fault (or cut, kill, pause, ...)
//!     std::thread::sleep(Duration::from_secs(10));
//!     b.net.heal(&b.servers[0].0)?;
//!     driver_done(&mut drv, run)?;
//!     let all = calls(&drv);
//!     within_deadlines(&all)?; // the promise under test
//!     Ok(format!("{} calls, errors {:?}", all.len(), error_kinds(&all)))
//! }
//! ```

mod net;
mod roles;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use net::{Error, Host, Net, Proc};

const WAIT: Duration = Duration::from_secs(30);

/// A scenario: its figures, or why it failed.
type Scenario = fn() -> Result<String, Error>;

/// A scenario that could not run here (the fault cannot be injected): reported as not run.
#[derive(Debug)]
struct NotRun(String);

impl std::fmt::Display for NotRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotRun {}
const PREFIX: &str = "/cg-faults";
const SECRET: &str = "fault-test-secret";

fn main() {
    if let Ok(role) = std::env::var("CG_FAULT_ROLE") {
        let r = match role.as_str() {
            "driver" => roles::driver(),
            "sink" => roles::sink(),
            "clients" => clients(),
            other => Err(format!("unknown role {other}").into()),
        };
        if let Err(e) = r {
            eprintln!("{role}: {e}");
            std::process::exit(2);
        }
        return;
    }
    // cargo's test arguments (filters) select scenarios by name.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    // (test name, what the README's table calls it, the scenario)
    let scenarios: [(&str, &str, Scenario); 7] = [
        (
            "an_asymmetric_partition_fails_calls_at_their_deadlines_without_flapping",
            "an asymmetric partition for 20 s (the game server cannot send to its caller)",
            asymmetric,
        ),
        (
            "a_slow_link_slows_calls_but_fails_none",
            "a slow link (netem, 100 ms one way)",
            slow_link,
        ),
        (
            "a_game_server_cut_off_from_its_gateway_moves_only_its_clients",
            "a game server cut off from its gateway for 20 s (both still reach etcd), 100 clients echoing",
            gateway_cut,
        ),
        (
            "a_partitioned_harbor_fails_over_within_the_lease",
            "one of the two harbors of the callers' cluster cut off for 20 s, calls and messages across clusters",
            harbor_partition,
        ),
        (
            "etcd_partitioned_from_a_node_fails_no_call_and_the_node_comes_back",
            "etcd cut off from one game server for 30 s",
            etcd_partition,
        ),
        (
            "a_paused_game_server_times_out_its_callers_at_their_deadlines",
            "a game server frozen (SIGSTOP) for 15 s, calls and messages to it and another",
            paused_server,
        ),
        (
            "a_killed_and_restarted_node_is_called_again_at_once",
            "a node SIGKILLed and restarted at the same address 2 s later",
            killed_and_restarted,
        ),
    ];
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    // Runs everywhere, root or not: the README's table has a row for each scenario.
    if let Err(e) = table_matches(&readme, &scenarios.map(|s| s.1)) {
        println!("faults: the README's table is out of date: {e}");
        std::process::exit(1);
    }
    let chosen: Vec<_> = scenarios
        .iter()
        .filter(|(name, _, _)| {
            filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()))
        })
        .collect();
    if let Some(why) = net::unsupported() {
        println!(
            "faults: NOT RUN ({} scenarios): {why}. They run as root, as `.ci/run` does.",
            chosen.len()
        );
        return;
    }
    let mut failed = 0;
    let mut not_run = 0;
    let mut rows = Vec::new();
    for (name, title, scenario) in &chosen {
        let started = Instant::now();
        println!("faults: {name} ...");
        match scenario() {
            Ok(figures) => {
                println!(
                    "faults: {name} ok in {:.1} s: {figures}",
                    started.elapsed().as_secs_f64()
                );
                rows.push((*title, figures));
            }
            Err(e) if e.downcast_ref::<NotRun>().is_some() => {
                not_run += 1;
                println!("faults: {name} NOT RUN: {e}");
                rows.push((
                    *title,
                    format!("not run here: {e}; reported NOT RUN, never a pass"),
                ));
            }
            Err(e) => {
                failed += 1;
                println!("faults: {name} FAILED: {e}");
            }
        }
    }
    println!(
        "faults: {} passed, {failed} failed, {not_run} not run, {} not selected",
        chosen.len() - failed - not_run,
        scenarios.len() - chosen.len()
    );
    if failed > 0 {
        std::process::exit(1);
    }
    // The figures as the README's table: written next to the build, and into the README when
    // asked (`CG_FAULTS_README=1`, with every scenario run).
    let table = table(&rows);
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent().and_then(Path::parent)
    {
        let out = dir.join("faults-table.md");
        if std::fs::write(&out, &table).is_ok() {
            println!("faults: figures written to {}", out.display());
        }
    }
    if std::env::var_os("CG_FAULTS_README").is_some() && chosen.len() == scenarios.len() {
        match write_table(&readme, &table) {
            Ok(()) => println!("faults: the README's table updated"),
            Err(e) => {
                println!("faults: could not update the README: {e}");
                std::process::exit(1);
            }
        }
    }
}

/// Where the generated table sits in the README.
const TABLE_BEGIN: &str = "<!-- faults table: generated by gateway/tests/faults; do not edit -->";
const TABLE_END: &str = "<!-- faults table end -->";

/// A markdown table of `(scenario, figures)`.
fn table(rows: &[(&str, String)]) -> String {
    let mut t =
        String::from("| scenario | what a user notices (measured by the test) |\n|---|---|\n");
    for (title, figures) in rows {
        t.push_str(&format!("| {title} | {} |\n", figures.replace('|', "/")));
    }
    t
}

/// The README's table: its rows' first cells.
fn table_rows(readme: &Path) -> Result<(String, Vec<String>), Error> {
    let text = std::fs::read_to_string(readme)?;
    let start = text.find(TABLE_BEGIN).ok_or("no table start marker")?;
    let end = text.find(TABLE_END).ok_or("no table end marker")?;
    let rows = text[start..end]
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| scenario |"))
        .filter_map(|l| Some(l.split(" | ").next()?.trim_start_matches("| ").to_owned()))
        .collect();
    Ok((text, rows))
}

/// Whether the README's table has exactly one row per scenario title, in order.
fn table_matches(readme: &Path, titles: &[&str]) -> Result<(), Error> {
    let (_, rows) = table_rows(readme)?;
    if rows != titles {
        return Err(format!("its rows are {rows:?}, the scenarios {titles:?}").into());
    }
    Ok(())
}

/// Replaces the README's table with `table`.
fn write_table(readme: &Path, table: &str) -> Result<(), Error> {
    let (text, _) = table_rows(readme)?;
    let start = text.find(TABLE_BEGIN).ok_or("no table start marker")? + TABLE_BEGIN.len();
    let end = text.find(TABLE_END).ok_or("no table end marker")?;
    let new = format!("{}\n{table}{}", &text[..start], &text[end..]);
    std::fs::write(readme, new)?;
    Ok(())
}

/// The programs the scenarios run, as the workspace's test build made them.
fn program(name: &str) -> Result<PathBuf, Error> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(Path::parent).ok_or("no target dir")?;
    let p = match name {
        "game_server" => dir.join("examples").join(name),
        _ => dir.join(name),
    };
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "{} not built (cargo test --workspace builds it)",
            p.display()
        )
        .into())
    }
}

fn etcd_binary() -> PathBuf {
    std::env::var_os("CLUSTERGO_ETCD").map_or_else(|| "etcd".into(), PathBuf::from)
}

/// etcd on `host`; returns its client endpoint.
fn start_etcd(net: &Net, host: &Host) -> Result<(Proc, String), Error> {
    let client = format!("http://{}:2379", host.ip);
    let peer = format!("http://{}:2380", host.ip);
    let data = net.dir.join(format!("etcd-{}", host.name));
    let args: Vec<String> = [
        "--name",
        "f",
        "--data-dir",
        &data.display().to_string(),
        "--listen-client-urls",
        &client,
        "--advertise-client-urls",
        &client,
        "--listen-peer-urls",
        &peer,
        "--initial-advertise-peer-urls",
        &peer,
        "--initial-cluster",
        &format!("f={peer}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let p = host.spawn("etcd", &etcd_binary(), &args, &[])?;
    Ok((p, client))
}

/// Lists `addr` at `net_addr` in etcd, with clusterctl run on `host`.
fn list(host: &Host, etcd: &str, addr: &str, net_addr: &str) -> Result<(), Error> {
    list_with(host, etcd, addr, net_addr, &[])
}

/// [`list`] with `members add` flags (e.g. `--export`).
fn list_with(
    host: &Host,
    etcd: &str,
    addr: &str,
    net_addr: &str,
    flags: &[&str],
) -> Result<(), Error> {
    let ctl = program("clusterctl")?;
    let end = Instant::now() + WAIT;
    loop {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &host.ns])
            .arg(&ctl)
            .args([
                "--endpoints",
                etcd,
                "--prefix",
                PREFIX,
                "members",
                "add",
                addr,
                net_addr,
            ])
            .args(flags)
            .output()?;
        if out.status.success() {
            return Ok(());
        }
        // etcd may still be starting: a readiness wait, bounded.
        if Instant::now() > end {
            return Err(format!(
                "clusterctl members add {addr}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Binary `program` as node `addr` on `host` (listed already) with membership in `etcd` and
/// `extra` flags; returns once it printed `ready_line`.
fn node_process(
    host: &Host,
    program_name: &str,
    addr: &str,
    etcd: &str,
    extra: &[&str],
    ready_line: &str,
) -> Result<Proc, Error> {
    let mut args: Vec<String> = ["--addr", addr, "--etcd", etcd, "--prefix", PREFIX]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let p = host.spawn(
        addr,
        &program(program_name)?,
        &args,
        &[("CLUSTERGO_SECRET", SECRET)],
    )?;
    p.out
        .wait_for(ready_line, WAIT)
        .ok_or_else(|| format!("{program_name} {addr} did not start"))?;
    Ok(p)
}

/// A game server at fixed `addr` on `host` (listed already), up and serving, with its admin
/// endpoints on port 9100.
fn game_server(host: &Host, etcd: &str, addr: &str) -> Result<Proc, Error> {
    let admin = format!("{}:9100", host.ip);
    let extra = [
        "--lease-ttl-secs",
        "2",
        "--shutdown-grace-secs",
        "2",
        "--admin-listen",
        &admin,
    ];
    node_process(host, "game_server", addr, etcd, &extra, "listening on")
}

/// A sink (see [`roles::sink`]) at fixed `addr` on `host` (listed already), up and serving:
/// a game server that also checks the order of the driver's sequenced messages.
fn sink(host: &Host, etcd: &str, addr: &str) -> Result<Proc, Error> {
    let env = [
        ("CG_FAULT_ROLE", "sink"),
        ("CG_ETCD", etcd),
        ("CG_ADDR", addr),
    ];
    let p = host.spawn(addr, &std::env::current_exe()?, &[], &env)?;
    p.out
        .wait_for("listening on", WAIT)
        .ok_or_else(|| format!("sink {addr} did not start"))?;
    Ok(p)
}

/// The load driver on `host`: node `addr` (listed already) calling `targets` in turn, each
/// call with `deadline`, for `run`; `extra` sets its options (see [`roles::driver`]).
fn driver_on(
    host: &Host,
    etcd: &str,
    addr: &str,
    targets: &[&str],
    deadline: Duration,
    run: Duration,
    extra: &[(&str, &str)],
) -> Result<Proc, Error> {
    let exe = std::env::current_exe()?;
    let targets_text = targets.join(",");
    let (deadline, run) = (
        deadline.as_millis().to_string(),
        run.as_millis().to_string(),
    );
    let mut env = vec![
        ("CG_FAULT_ROLE", "driver"),
        ("CG_ETCD", etcd),
        ("CG_ADDR", addr),
        ("CG_TARGETS", &targets_text),
        ("CG_DEADLINE_MS", &deadline),
        ("CG_RUN_MS", &run),
    ];
    env.extend_from_slice(extra);
    let p = host.spawn("driver", &exe, &[], &env)?;
    p.out
        .wait_for("ready", WAIT)
        .ok_or("the driver did not get ready")?;
    Ok(p)
}

/// One call as the driver reported it.
#[derive(Debug)]
struct Call {
    /// Milliseconds since the driver's start.
    at: u64,
    to: String,
    ok: bool,
    took_ms: u64,
    /// The error's kind (`Timeout`, `LinkLost`, …), empty when ok.
    kind: String,
}

fn calls(p: &Proc) -> Vec<Call> {
    p.out
        .all()
        .iter()
        .filter_map(|l| {
            // call <at> <to> <ok|err> <took> [kind]
            let mut f = l.strip_prefix("call ")?.split(' ');
            Some(Call {
                at: f.next()?.parse().ok()?,
                to: f.next()?.into(),
                ok: f.next()? == "ok",
                took_ms: f.next()?.parse().ok()?,
                kind: f.next().unwrap_or("").into(),
            })
        })
        .collect()
}

/// `(at_ms, available)` of each change of `addr` in the driver's view.
fn views(p: &Proc, addr: &str) -> Vec<(u64, bool)> {
    p.out
        .all()
        .iter()
        .filter_map(|l| {
            let mut f = l.strip_prefix("view ")?.split(' ');
            let at = f.next()?.parse().ok()?;
            (f.next()? == addr).then_some(())?;
            Some((at, f.next()? == "true"))
        })
        .collect()
}

/// Waits for the driver to finish its run and exit cleanly.
fn driver_done(p: &mut Proc, run: Duration) -> Result<(), Error> {
    p.out
        .wait_for("done", run + WAIT)
        .ok_or("the driver did not finish")?;
    match p.wait_exit(WAIT) {
        Some(s) if s.success() => Ok(()),
        other => Err(format!("the driver exited {other:?}").into()),
    }
}

/// Scenario 1: a game server cut off from its gateway for 20 s (both still reach etcd) while
/// 100 clients echo through the gateway. The clients of that server are closed with a reason
/// within the link's keepalive bound and reconnect to the other server; the other clients see
/// no error and no stall.
fn gateway_cut() -> Result<String, Error> {
    let net = Net::new("gw")?;
    let (etcd_host, a, b, gw, cli) = (
        net.host("etcd")?,
        net.host("a")?,
        net.host("b")?,
        net.host("gw")?,
        net.host("cli")?,
    );
    let (_etcd, ep) = start_etcd(&net, &etcd_host)?;
    list(&cli, &ep, "1.1.1", &format!("{}:9000", a.ip))?;
    list(&cli, &ep, "1.1.2", &format!("{}:9000", b.ip))?;
    list(&cli, &ep, "1.100.1", &format!("{}:9000", gw.ip))?;
    let _pa = game_server(&a, &ep, "1.1.1")?;
    let _pb = game_server(&b, &ep, "1.1.2")?;
    let tcp = format!("{}:7000", gw.ip);
    let _pg = node_process(
        &gw,
        "gateway",
        "1.100.1",
        &ep,
        &["--backend-type", "1", "--tcp", &tcp],
        "tcp on",
    )?;
    let run = Duration::from_secs(40);
    let env = [
        ("CG_FAULT_ROLE", "clients"),
        ("CG_URL", &format!("tcp://{tcp}") as &str),
        ("CG_CLIENTS", "100"),
        ("CG_RUN_MS", &run.as_millis().to_string()),
    ];
    let mut pc = cli.spawn("clients", &std::env::current_exe()?, &[], &env)?;
    pc.out
        .wait_for("ready", WAIT)
        .ok_or("the clients did not get ready")?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    net.cut(&gw, &a, true)?;
    let cut_at = t0.elapsed().as_millis() as u64;
    std::thread::sleep(Duration::from_secs(20));
    net.mend(&gw, &a, true)?;
    pc.out
        .wait_for("done", run + WAIT)
        .ok_or("the clients did not finish")?;
    let lines = pc.out.all();
    let field = |l: &str, i: usize| l.split(' ').nth(i).map(str::to_owned);
    // closed <at> <client> <server> <reason...>
    let closed: Vec<(u64, String, String)> = lines
        .iter()
        .filter(|l| l.starts_with("closed "))
        .filter_map(|l| {
            let at = field(l, 1)?.parse().ok()?;
            let server = field(l, 3)?;
            let reason = l.splitn(5, ' ').nth(4)?.to_owned();
            Some((at, server, reason))
        })
        .collect();
    let faults: Vec<&String> = lines.iter().filter(|l| l.starts_with("fault ")).collect();
    // gap <client> <server> <max gap between echoes in ms>
    let gaps: Vec<(String, u64)> = lines
        .iter()
        .filter(|l| l.starts_with("gap "))
        .filter_map(|l| Some((field(l, 2)?, field(l, 3)?.parse().ok()?)))
        .collect();
    let other_closed = closed.iter().filter(|(_, s, _)| s == "1.1.2").count();
    let worst_other = gaps
        .iter()
        .filter(|(s, _)| s == "1.1.2")
        .map(|(_, g)| *g)
        .max()
        .unwrap_or(0);
    let moved: Vec<&(u64, String, String)> =
        closed.iter().filter(|(_, s, _)| s == "1.1.1").collect();
    let first_told = moved
        .iter()
        .map(|(at, _, _)| at.saturating_sub(cut_at))
        .min();
    let last_told = moved
        .iter()
        .map(|(at, _, _)| at.saturating_sub(cut_at))
        .max();
    let figures = format!(
        "{} clients of the cut-off server closed with a reason (\"{}\") {:.1}–{:.1} s after the cut (the link's keepalive: 3 s + 5 s), and all reconnected; clients of the other server: {other_closed} closed, longest wait for an echo {worst_other} ms; {} clients saw anything else",
        moved.len(),
        moved.first().map(|m| m.2.as_str()).unwrap_or("-"),
        first_told.unwrap_or(0) as f64 / 1000.0,
        last_told.unwrap_or(0) as f64 / 1000.0,
        faults.len()
    );
    if !faults.is_empty() {
        return Err(format!("{figures}; e.g. {}", faults[0]).into());
    }
    if other_closed > 0 || worst_other > 1_000 {
        return Err(format!("the other server's clients were disturbed: {figures}").into());
    }
    if moved.is_empty() {
        return Err(format!("no client of the cut-off server was told: {figures}").into());
    }
    // The link's keepalive (3 s + 5 s; measured about 10 s) bounds how long they wait, with
    // a margin for a loaded machine.
    if last_told.unwrap_or(0) > 14_000 {
        return Err(format!("clients were told too late: {figures}").into());
    }
    // Told clients came back, to a server that answers.
    let reconnected = lines
        .iter()
        .filter(|l| l.starts_with("conn "))
        .filter_map(|l| l.split(' ').nth(1)?.parse::<u64>().ok())
        .filter(|at| *at > cut_at)
        .count();
    if reconnected < moved.len() {
        return Err(format!("only {reconnected} reconnected: {figures}").into());
    }
    let _ = pc.wait_exit(WAIT);
    Ok(figures)
}

/// The clients role: `CG_CLIENTS` clients of the gateway at `CG_URL`, each echoing a frame
/// every 100 ms for `CG_RUN_MS`, reconnecting when closed. Prints `conn`, `closed <at> <id>
/// <server> <reason>` and `fault <at> <id> <what>` lines, then `gap <id> <server> <ms>` (the
/// longest wait for an echo) per connection, then `done`.
fn clients() -> Result<(), Error> {
    use clustergo_client::{Client, ClientError};
    let var = |k: &str| std::env::var(k).map_err(|_| format!("{k} not set"));
    let url = var("CG_URL")?;
    let n: usize = var("CG_CLIENTS")?.parse()?;
    let run = Duration::from_millis(var("CG_RUN_MS")?.parse()?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let t0 = tokio::time::Instant::now();
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(n);
        let mut tasks = Vec::new();
        for id in 0..n {
            let url = url.clone();
            let ready = ready_tx.clone();
            tasks.push(tokio::spawn(async move {
                let mut ready = Some(ready);
                let mut seq = 0u64;
                // As game clients do: spread out, and back off (with jitter) before a retry.
                let jitter = Duration::from_millis((id as u64 * 37) % 1000);
                tokio::time::sleep(Duration::from_millis(id as u64 * 20)).await;
                while t0.elapsed() < run {
                    let mut attempt = 0;
                    let (mut c, server) = loop {
                        attempt += 1;
                        let conn = tokio::time::timeout(WAIT, Client::connect(&url)).await;
                        let r = match conn {
                            Ok(Ok(mut c)) => ask(&mut c, b"whoami").await.map(|s| (c, s)),
                            Ok(Err(e)) => Err(e.into()),
                            Err(_) => Err("connect timed out".into()),
                        };
                        match r {
                            Ok(v) => break v,
                            Err(e) if attempt < 10 => {
                                println!("retry {} {id} {e}", t0.elapsed().as_millis());
                                tokio::time::sleep(jitter + Duration::from_millis(200)).await;
                            }
                            Err(e) => {
                                println!("fault {} {id} connect: {e}", t0.elapsed().as_millis());
                                return;
                            }
                        }
                    };
                    println!("conn {} {id} {server}", t0.elapsed().as_millis());
                    if let Some(r) = ready.take() {
                        let _ = r.send(()).await;
                    }
                    let mut gap = 0u128;
                    let end = loop {
                        if t0.elapsed() >= run {
                            break None;
                        }
                        seq += 1;
                        let frame = format!("c{id}-{seq}");
                        let sent = tokio::time::Instant::now();
                        if let Err(e) = c.send(bytes::Bytes::from(frame.clone())).await {
                            break Some(Err(e));
                        }
                        match tokio::time::timeout(Duration::from_secs(60), c.recv()).await {
                            Ok(Ok(echo)) if echo == frame.as_bytes() => {
                                gap = gap.max(sent.elapsed().as_millis());
                            }
                            Ok(Ok(other)) => {
                                println!(
                                    "fault {} {id} sent {frame}, got {other:?}",
                                    t0.elapsed().as_millis()
                                );
                                return;
                            }
                            Ok(Err(e)) => break Some(Err(e)),
                            Err(_) => {
                                println!(
                                    "fault {} {id} no echo within 60 s",
                                    t0.elapsed().as_millis()
                                );
                                return;
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    };
                    println!("gap {id} {server} {gap}");
                    match end {
                        None => {
                            let _ = c.close("done").await;
                            return;
                        }
                        Some(Err(ClientError::Closed { reason, .. })) => {
                            println!("closed {} {id} {server} {reason}", t0.elapsed().as_millis());
                            tokio::time::sleep(jitter).await;
                        }
                        Some(Err(e)) => {
                            println!("fault {} {id} {e}", t0.elapsed().as_millis());
                            return;
                        }
                        Some(Ok(())) => return,
                    }
                }
            }));
        }
        drop(ready_tx);
        for _ in 0..n {
            ready_rx.recv().await;
        }
        println!("ready");
        for t in tasks {
            let _ = t.await;
        }
        println!("done");
        Ok::<(), Error>(())
    })
}

/// Sends `frame` and returns the answer as text.
async fn ask(c: &mut clustergo_client::Client, frame: &[u8]) -> Result<String, Error> {
    c.send(bytes::Bytes::copy_from_slice(frame)).await?;
    let answer = tokio::time::timeout(WAIT, c.recv()).await??;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// Scenario 2: one of the two harbors of the callers' cluster cut off (from everything) for
/// 20 s under cross-cluster calls and sequenced messages. Calls in flight through it end
/// with a typed error at their deadline, never later; callers fail over once its lease
/// expires (2 s here); after that no call fails, through the heal too. After the heal the
/// active pair stays on the harbor it failed over to (moving it could reorder its traffic:
/// its messages arrive in order, without duplicates), while a pair that starts afterwards
/// takes the healed harbor again: traffic is balanced again.
fn harbor_partition() -> Result<String, Error> {
    use clustergo::LogicAddr;
    use clustergo::rendezvous::{pair_key, pick};
    let net = Net::new("hb")?;
    let hosts: Vec<Host> = ["etcd", "h11", "h12", "h21", "s2", "s3", "drv"]
        .iter()
        .map(|n| net.host(n))
        .collect::<Result<_, _>>()?;
    let [etcd_host, h11, h12, h21, s2, s3, d] = &hosts[..] else {
        return Err("seven hosts".into());
    };
    // The pairs: the driver and 2.1.1 go through 1.255.1 (the harbor to be cut), and so does
    // the pair started after the heal (with a server picked for it).
    let addr = |s: &str| s.parse::<LogicAddr>();
    let (me, h1, h2) = (addr("1.50.1")?, addr("1.255.1")?, addr("1.255.2")?);
    let harbor_of = |to: LogicAddr| pick(pair_key(me, to), [h1, h2]);
    if harbor_of(addr("2.1.1")?) != Some(h1) {
        return Err("the first pair does not go through 1.255.1: pick another server".into());
    }
    let late = (2..100)
        .map(|i| addr(&format!("2.1.{i}")))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .find(|a| harbor_of(*a) == Some(h1))
        .ok_or("no server whose pair goes through 1.255.1")?
        .to_string();
    let (_etcd, ep) = start_etcd(&net, etcd_host)?;
    for (addr, host) in [("1.255.1", h11), ("1.255.2", h12), ("2.255.1", h21)] {
        list(d, &ep, addr, &format!("{}:9000", host.ip))?;
    }
    list_with(d, &ep, "2.1.1", &format!("{}:9000", s2.ip), &["--export"])?;
    list_with(d, &ep, &late, &format!("{}:9000", s3.ip), &["--export"])?;
    list(d, &ep, "1.50.1", &format!("{}:9000", d.ip))?;
    let harbor = |host: &Host, addr: &str| {
        let admin = format!("{}:9100", host.ip);
        let flags = ["--lease-ttl-secs", "2", "--admin-listen", &admin];
        node_process(host, "harbor", addr, &ep, &flags, "listening on")
    };
    let _h = [
        harbor(h11, "1.255.1")?,
        harbor(h12, "1.255.2")?,
        harbor(h21, "2.255.1")?,
    ];
    let _s = [sink(s2, &ep, "2.1.1")?, sink(s3, &ep, &late)?];
    let run = Duration::from_secs(36);
    // The new pair starts 6 s after the heal (the healed harbor's lease is back by then).
    let late_from = 29_000;
    let late_opt = format!("{late_from}:{late}");
    let harbors_admin = [h11, h12, h21].map(|h| format!("{}:9100", h.ip)).join(",");
    let extra = [
        ("CG_MSG_EVERY_MS", "10"),
        ("CG_REPORT", "1"),
        ("CG_LINKS", "1.255.1,1.255.2"),
        ("CG_LATE", &late_opt as &str),
        ("CG_METRICS", &harbors_admin),
    ];
    let mut drv = driver_on(d, &ep, "1.50.1", &["2.1.1"], DEADLINE, run, &extra)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    // Taken before the fault: calls may fail before the command returns.
    let cut_at = t0.elapsed().as_millis() as u64;
    net.partition(h11)?;
    std::thread::sleep(Duration::from_secs(20));
    net.heal(h11)?;
    let healed_at = t0.elapsed().as_millis() as u64;
    driver_done(&mut drv, run)?;
    let all = calls(&drv);
    within_deadlines(&all)?;
    let failed: Vec<&Call> = all.iter().filter(|c| !c.ok).collect();
    if failed.iter().any(|c| c.at + c.took_ms < cut_at) {
        return Err("calls failed before the partition".into());
    }
    // The call in flight at the cut is lost with the harbor. Without a failure, the
    // partition missed the path and the scenario tested nothing.
    if failed.is_empty() {
        return Err("no call went through the partitioned harbor".into());
    }
    // Failover: the last failure ends within the lease (2 s) plus a deadline (1 s) of the
    // cut; 2 s of margin for a loaded machine.
    let last_fail = failed
        .iter()
        .map(|c| (c.at + c.took_ms).saturating_sub(cut_at))
        .max()
        .unwrap_or(0);
    if last_fail > 5_000 {
        return Err(format!(
            "calls still failed {last_fail} ms after the cut: {:?}",
            failed.last()
        )
        .into());
    }
    // After the heal: the active pair stays where it is; the new one takes 1.255.1.
    let relinked: Vec<u64> = drv
        .out
        .all()
        .iter()
        .filter_map(|l| {
            let rest = l.strip_prefix("linked ")?;
            let (at, rest) = rest.split_once(' ')?;
            (rest == "1.255.1 true").then(|| at.parse().ok())?
        })
        .filter(|at| *at > cut_at)
        .collect();
    if let Some(at) = relinked.iter().find(|at| **at < late_from) {
        return Err(format!(
            "the active pair went back to the healed harbor at {at} ms (healed at {healed_at} ms): its traffic could be reordered"
        )
        .into());
    }
    let rebalanced = relinked
        .first()
        .map(|at| at - late_from)
        .ok_or("the pair started after the heal did not take the healed harbor")?;
    let to_late = all.iter().filter(|c| c.to == late).count();
    if to_late == 0 {
        return Err("no call to the pair started after the heal".into());
    }
    let m = messages(&drv, "2.1.1")?;
    if m.behind > 0 || m.received > m.accepted {
        return Err(
            format!("the active pair's messages were duplicated or reordered: {m:?}").into(),
        );
    }
    // What did not arrive was counted on the way: by the driver, or by a harbor.
    let not_arrived = m.accepted - m.received.min(m.accepted);
    let by_driver: u64 = [
        "envelopes_lost",
        "envelopes_expired",
        "envelopes_unconfirmed",
    ]
    .iter()
    .map(|n| stat(&drv, n).unwrap_or(0))
    .sum();
    let by_harbors = harbor_drops(&drv)?;
    if not_arrived > by_driver + by_harbors {
        return Err(format!(
            "{not_arrived} messages neither arrived nor were counted (driver {by_driver}, harbors {by_harbors})"
        )
        .into());
    }
    let kinds = error_kinds(&all);
    let after_heal = all.iter().filter(|c| c.at > healed_at).count();
    Ok(format!(
        "{} calls across clusters; {} failed ({kinds:?}), the last ending {last_fail} ms after the cut, none past its 1 s deadline; {after_heal} calls after the heal, 0 failed; the active pair stayed on the other harbor ({} messages, {} arrived in order, 0 duplicated; the {} in flight through the cut-off harbor were lost with it, and counted: {by_driver} envelopes by the caller, {by_harbors} by the harbors), a pair started after the heal took the healed harbor {rebalanced} ms later ({to_late} calls, 0 failed)",
        all.len(),
        failed.len(),
        m.accepted,
        m.received,
        m.accepted - m.received.min(m.accepted)
    ))
}

/// Envelopes the harbors the driver read (`CG_METRICS`) dropped and counted: lost, expired,
/// unconfirmed, unroutable or refused at a full hop.
fn harbor_drops(p: &Proc) -> Result<u64, Error> {
    let lines = p.out.all();
    let samples: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("metric "))
        .collect();
    if let Some(l) = samples.iter().find(|l| l.contains("unreachable")) {
        return Err(format!("a harbor's metrics: {l}").into());
    }
    if samples.is_empty() {
        return Err("no metrics from the harbors".into());
    }
    let dropped = ["lost", "expired", "unconfirmed", "unroutable", "hop_busy"];
    Ok(samples
        .iter()
        .filter_map(|l| {
            let (_, sample) = l.split_once(' ')?;
            let name = sample.split(['{', ' ']).next()?;
            dropped
                .iter()
                .any(|d| name.starts_with(&format!("clustergo_envelopes_{d}")))
                .then(|| sample.rsplit(' ').next()?.parse::<f64>().ok())?
        })
        .sum::<f64>() as u64)
}

/// A driver's final counter `name` (from its `stats` line).
fn stat(p: &Proc, name: &str) -> Option<u64> {
    p.out.all().iter().find_map(|l| {
        l.strip_prefix("stats ")?
            .split(' ')
            .find_map(|kv| kv.strip_prefix(&format!("{name}="))?.parse().ok())
    })
}

/// Every call's deadline in these scenarios.
const DEADLINE: Duration = Duration::from_millis(1000);

/// The common topology: etcd, game servers each on a host of their own, and a driver host
/// (node `1.50.1`); everyone listed.
struct Bed {
    net: Net,
    etcd_host: Host,
    _etcd: Proc,
    ep: String,
    /// `(host, address, process)` per game server.
    servers: Vec<(Host, &'static str, Proc)>,
    drv: Host,
}

fn bed(tag: &str, servers: &[&'static str]) -> Result<Bed, Error> {
    bed_of(tag, servers, game_server)
}

/// [`bed`] with [`sink`]s for game servers.
fn sink_bed(tag: &str, servers: &[&'static str]) -> Result<Bed, Error> {
    bed_of(tag, servers, sink)
}

fn bed_of(
    tag: &str,
    servers: &[&'static str],
    start: fn(&Host, &str, &str) -> Result<Proc, Error>,
) -> Result<Bed, Error> {
    let net = Net::new(tag)?;
    let etcd_host = net.host("etcd")?;
    let hosts: Vec<Host> = (0..servers.len())
        .map(|i| net.host(&format!("s{i}")))
        .collect::<Result<_, _>>()?;
    let drv = net.host("drv")?;
    let (etcd, ep) = start_etcd(&net, &etcd_host)?;
    for (addr, host) in servers.iter().zip(&hosts) {
        list(&drv, &ep, addr, &format!("{}:9000", host.ip))?;
    }
    list(&drv, &ep, "1.50.1", &format!("{}:9000", drv.ip))?;
    let mut started = Vec::new();
    for (addr, host) in servers.iter().zip(hosts) {
        let p = start(&host, &ep, addr)?;
        started.push((host, *addr, p));
    }
    Ok(Bed {
        net,
        etcd_host,
        _etcd: etcd,
        ep,
        servers: started,
        drv,
    })
}

impl Bed {
    /// The driver calling `targets` in turn for `run`.
    fn driver(&self, targets: &[&str], run: Duration) -> Result<Proc, Error> {
        self.driver_with(targets, run, &[])
    }

    /// [`Bed::driver`] with options (see [`roles::driver`]).
    fn driver_with(
        &self,
        targets: &[&str],
        run: Duration,
        extra: &[(&str, &str)],
    ) -> Result<Proc, Error> {
        driver_on(&self.drv, &self.ep, "1.50.1", targets, DEADLINE, run, extra)
    }
}

/// No call waited past its deadline (300 ms of slack for a loaded machine).
fn within_deadlines(all: &[Call]) -> Result<(), Error> {
    let late: Vec<&Call> = all
        .iter()
        .filter(|c| c.took_ms > DEADLINE.as_millis() as u64 + 300)
        .collect();
    match late.first() {
        None => Ok(()),
        Some(c) => Err(format!(
            "{} calls waited past their deadline, e.g. {c:?}",
            late.len()
        )
        .into()),
    }
}

/// The distinct error kinds of `calls`' failures.
fn error_kinds<'a>(calls: impl IntoIterator<Item = &'a Call>) -> Vec<String> {
    let mut kinds: Vec<String> = calls
        .into_iter()
        .filter(|c| !c.ok)
        .map(|c| c.kind.clone())
        .collect();
    kinds.sort();
    kinds.dedup();
    kinds
}

/// Scenario 3: etcd cut off from one game server for 30 s. Calls between live nodes go on
/// with no failure; the cut-off node's lease expires, so its peers see it unavailable (not
/// picked) while it is gone; healed, it is available again by itself. A member listed while
/// it is cut off reaches its view when it heals (its `/status`, polled by the driver).
fn etcd_partition() -> Result<String, Error> {
    let b = bed("etcd", &["1.1.1", "1.1.2"])?;
    let a = &b.servers[0].0;
    let run = Duration::from_secs(42);
    let admin = format!("{}:9100", a.ip);
    let mut drv = b.driver_with(&["1.1.1", "1.1.2"], run, &[("CG_WATCH", &admin)])?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    b.net.cut(a, &b.etcd_host, true)?;
    let cut_at = t0.elapsed().as_millis() as u64;
    std::thread::sleep(Duration::from_secs(5));
    // A change while it is cut off: a new member.
    list(&b.drv, &b.ep, "1.1.3", "10.0.0.1:9000")?;
    let added_at = t0.elapsed().as_millis() as u64;
    std::thread::sleep(Duration::from_secs(25));
    b.net.mend(a, &b.etcd_host, true)?;
    let healed_at = t0.elapsed().as_millis() as u64;
    driver_done(&mut drv, run)?;
    let all = calls(&drv);
    let failed: Vec<&Call> = all.iter().filter(|c| !c.ok).collect();
    if let Some(c) = failed.first() {
        return Err(format!(
            "{} of {} calls failed while only etcd was cut off, e.g. {c:?}",
            failed.len(),
            all.len()
        )
        .into());
    }
    let seen = views(&drv, "1.1.1");
    let gone = seen
        .iter()
        .find(|(at, up)| !up && *at > cut_at)
        .map(|(at, _)| at - cut_at)
        .ok_or(format!(
            "the cut-off node was never seen unavailable: {seen:?}"
        ))?;
    let back = seen
        .iter()
        .find(|(at, up)| *up && *at > healed_at)
        .map(|(at, _)| at - healed_at)
        .ok_or(format!(
            "the node did not come back after the heal: {seen:?}"
        ))?;
    // Its 2 s lease expires within 2 s of its last renewal; after the heal it renews (the
    // retry backs off to at most 2 s) and is alive again.
    if gone > 3_000 {
        return Err(format!("unavailable only {gone} ms after the cut (lease TTL 2 s)").into());
    }
    if back > 5_000 {
        return Err(format!("available again only {back} ms after the heal").into());
    }
    // The cut-off node's member count, as its /status said over time.
    let counts: Vec<(u64, u64)> = drv
        .out
        .all()
        .iter()
        .filter_map(|l| {
            let mut f = l.strip_prefix("status ")?.splitn(3, ' ');
            let at = f.next()?.parse().ok()?;
            let json = f.nth(1)?;
            let n = json.split("\"members\":").nth(1)?;
            let n = n
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()?;
            Some((at, n))
        })
        .collect();
    let before = counts
        .iter()
        .take_while(|(at, _)| *at < added_at)
        .last()
        .map(|c| c.1)
        .ok_or(format!("no /status of the cut-off node: {counts:?}"))?;
    if let Some((at, n)) = counts
        .iter()
        .find(|(at, n)| *n != before && *at < healed_at)
    {
        return Err(format!(
            "the cut-off node's view changed to {n} members at {at} ms, before the heal"
        )
        .into());
    }
    let applied = counts
        .iter()
        .find(|(at, n)| *n == before + 1 && *at >= healed_at)
        .map(|(at, _)| at - healed_at)
        .ok_or(format!(
            "the member listed during the cut never reached the cut-off node: {counts:?}"
        ))?;
    if applied > 5_000 {
        return Err(format!("the change reached it only {applied} ms after the heal").into());
    }
    Ok(format!(
        "{} calls, 0 failed; the cut-off node unavailable {gone} ms after the cut (lease TTL 2 s), available again {back} ms after the heal; a member listed during the cut reached its view {applied} ms after the heal",
        all.len()
    ))
}

/// Scenario 4: a game server frozen (SIGSTOP) for 15 s while the driver calls both servers
/// and sends each a sequenced message every 10 ms. Its callers get timeouts at their
/// deadlines, not a pile-up; calls and messages to the other server never fail; the queue
/// toward it stays bounded (the driver's queue-depth gauge); after it resumes it answers
/// again; and every message sent to it arrived in order, without duplicates, or was refused
/// at the send (`QueueFull`, `PeerLost`, …) or counted as dropped by the sender.
fn paused_server() -> Result<String, Error> {
    let b = sink_bed("pause", &["1.1.1", "1.1.2"])?;
    let run = Duration::from_secs(25);
    let extra = [("CG_MSG_EVERY_MS", "10"), ("CG_REPORT", "1")];
    let mut drv = b.driver_with(&["1.1.1", "1.1.2"], run, &extra)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let paused_at = t0.elapsed();
    b.servers[0].2.pause()?;
    std::thread::sleep(Duration::from_secs(15));
    b.servers[0].2.resume()?;
    let resumed_ms = t0.elapsed().as_millis() as u64;
    driver_done(&mut drv, run)?;
    let all = calls(&drv);
    within_deadlines(&all)?;
    let other_failed: Vec<&Call> = all.iter().filter(|c| c.to == "1.1.2" && !c.ok).collect();
    if let Some(c) = other_failed.first() {
        return Err(format!(
            "{} calls to the running server failed, e.g. {c:?}",
            other_failed.len()
        )
        .into());
    }
    let to_paused: Vec<&Call> = all.iter().filter(|c| c.to == "1.1.1").collect();
    let timeouts = to_paused.iter().filter(|c| c.kind == "Timeout").count();
    if timeouts == 0 {
        return Err("no call to the paused server timed out: was it paused?".into());
    }
    // Answered again after the resume (the driver's clock starts about when it got ready).
    let back = to_paused
        .iter()
        .find(|c| c.ok && c.at > resumed_ms)
        .map(|c| c.at.saturating_sub(resumed_ms))
        .ok_or("the paused server never answered after it resumed")?;
    let ok_other = all.iter().filter(|c| c.to == "1.1.2" && c.ok).count();
    // Messages: the running server got every one, in order.
    let other = messages(&drv, "1.1.2")?;
    if other.refused > 0
        || other.missing > 0
        || other.behind > 0
        || other.received != other.accepted
    {
        return Err(format!("messages to the running server: {other:?}").into());
    }
    // The paused one: in order, no duplicates; what did not arrive was counted at the sender.
    let paused = messages(&drv, "1.1.1")?;
    // Dropped from a queue, expired in one, or written on a link that died before the
    // server confirmed them: counted by the sender, with requests among them.
    let dropped = [
        "envelopes_lost",
        "envelopes_expired",
        "envelopes_unconfirmed",
    ]
    .iter()
    .map(|n| stat(&drv, n).unwrap_or(0))
    .sum::<u64>();
    let not_arrived = paused.accepted - paused.received.min(paused.accepted);
    if paused.behind > 0 || paused.received > paused.accepted {
        return Err(
            format!("messages to the paused server duplicated or reordered: {paused:?}").into(),
        );
    }
    if not_arrived > dropped {
        return Err(format!(
            "{not_arrived} messages to the paused server neither arrived nor were counted as dropped ({dropped} envelopes counted): {paused:?}"
        )
        .into());
    }
    let depth = stat(&drv, "max_queue_depth").ok_or("no queue depth from the driver")?;
    let bound = 8192; // NodeConfig::peer_queue's default
    if depth > bound {
        return Err(format!("the queue toward a peer reached {depth} (bound {bound})").into());
    }
    Ok(format!(
        "paused at {:.1} s for 15 s; to the paused server: {} calls, {timeouts} timeouts at the 1 s deadline, errors {:?}, answering again {back} ms after resume; messages to it: {} accepted, {} refused at the send {:?}, {} arrived in order with 0 duplicates, {not_arrived} dropped and counted by the sender ({dropped} envelopes counted); deepest queue {depth} (bound {bound}); to the other: {ok_other} calls and {} messages, 0 failed, 0 lost; longest call {} ms",
        paused_at.as_secs_f64(),
        to_paused.len(),
        error_kinds(to_paused.iter().copied()),
        paused.accepted,
        paused.refused,
        paused.refusals,
        paused.received,
        other.received,
        all.iter().map(|c| c.took_ms).max().unwrap_or(0)
    ))
}

/// The fate of the driver's sequenced messages to one target (with `CG_MSG_EVERY_MS` and
/// `CG_REPORT`).
#[derive(Debug)]
struct Messages {
    /// Sends the driver's node accepted.
    accepted: u64,
    /// Sends it refused at once, and why.
    refused: u64,
    refusals: Vec<String>,
    /// What the target reported: arrivals, sequence numbers skipped, and arrivals behind one
    /// already seen (duplicated or reordered).
    received: u64,
    missing: u64,
    behind: u64,
}

fn messages(p: &Proc, to: &str) -> Result<Messages, Error> {
    let lines = p.out.all();
    let field = |l: &str, name: &str| -> Option<u64> {
        l.split(' ')
            .find_map(|kv| kv.strip_prefix(&format!("{name}="))?.parse().ok())
    };
    let accepted = lines
        .iter()
        .find(|l| l.starts_with(&format!("msgs {to} ")))
        .and_then(|l| field(l, "accepted"))
        .ok_or(format!("no message count for {to}"))?;
    let mut refused = 0;
    let mut refusals = Vec::new();
    for l in lines
        .iter()
        .filter_map(|l| l.strip_prefix(&format!("msgfail {to} ")))
    {
        let (k, n) = l.split_once(' ').ok_or("bad msgfail line")?;
        refused += n.parse::<u64>()?;
        refusals.push(format!("{k} {n}"));
    }
    let report = lines
        .iter()
        .find_map(|l| l.strip_prefix(&format!("report {to} ")))
        .ok_or(format!("no report from {to}"))?;
    let get = |name| field(report, name).ok_or(format!("{to} reported {report}"));
    Ok(Messages {
        accepted,
        refused,
        refusals,
        received: get("received")?,
        missing: get("missing")?,
        behind: get("behind")?,
    })
}

/// Scenario 5: a node killed with SIGKILL and restarted at the same address under load. No
/// call waits past its deadline; once the new process listens, calls reach it at once (its
/// peers replace the link to the dead one).
fn killed_and_restarted() -> Result<String, Error> {
    let mut b = bed("kill", &["1.1.1"])?;
    let run = Duration::from_secs(12);
    let mut drv = b.driver(&["1.1.1"], run)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    // Taken before the signal: calls may fail before `kill` returns (it also reaps).
    let killed_ms = t0.elapsed().as_millis() as u64;
    b.servers[0].2.kill()?;
    std::thread::sleep(Duration::from_secs(2));
    b.servers[0].2 = game_server(&b.servers[0].0, &b.ep, "1.1.1")?;
    let listening_ms = t0.elapsed().as_millis() as u64;
    driver_done(&mut drv, run)?;
    let all = calls(&drv);
    within_deadlines(&all)?;
    let back = all
        .iter()
        .find(|c| c.ok && c.at > listening_ms)
        .map(|c| c.at - listening_ms)
        .ok_or("no call reached the restarted node")?;
    // The restart is seen through etcd (its alive key) and the dial backoff is at most 2 s.
    if back > 2_500 {
        return Err(
            format!("the restarted node was reached only {back} ms after it listened").into(),
        );
    }
    let failed: Vec<&Call> = all.iter().filter(|c| !c.ok).collect();
    if failed.iter().any(|c| c.at + c.took_ms < killed_ms) {
        return Err("calls failed before the kill".into());
    }
    Ok(format!(
        "killed at {:.1} s, listening again at {:.1} s; {} calls, {} failed while it was down ({:?}), none past the 1 s deadline; called again {back} ms after it listened",
        killed_ms as f64 / 1000.0,
        listening_ms as f64 / 1000.0,
        all.len(),
        failed.len(),
        error_kinds(&all)
    ))
}

/// Scenario 6: an asymmetric partition for 20 s: the game server cannot send to its caller
/// (the caller's packets still arrive). Calls end at their deadlines with typed errors; the
/// caller does not redial in a tight loop (its dials back off), its dial failures show in its
/// counters; mended, it calls the server again.
fn asymmetric() -> Result<String, Error> {
    let b = bed("asym", &["1.1.1"])?;
    let a = &b.servers[0].0;
    let run = Duration::from_secs(32);
    let mut drv = b.driver(&["1.1.1"], run)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    b.net.cut(a, &b.drv, false)?;
    let cut_at = t0.elapsed().as_millis() as u64;
    std::thread::sleep(Duration::from_secs(20));
    b.net.mend(a, &b.drv, false)?;
    let mended_at = t0.elapsed().as_millis() as u64;
    driver_done(&mut drv, run)?;
    let all = calls(&drv);
    within_deadlines(&all)?;
    let during = all
        .iter()
        .filter(|c| !c.ok && c.at >= cut_at && c.at <= mended_at)
        .count();
    if during == 0 {
        return Err("no call failed: the partition did not take".into());
    }
    let back = all
        .iter()
        .find(|c| c.ok && c.at > mended_at)
        .map(|c| c.at - mended_at)
        .ok_or("the server was never called again after the mend")?;
    if back > 6_000 {
        return Err(format!("called again only {back} ms after the mend").into());
    }
    let dials = stat(&drv, "dials_started").ok_or("no stats from the driver")?;
    // How a dial fails depends on how the kernel answers (a timeout, or unreachable): counted
    // either way.
    let dial_failed = stat(&drv, "dials_failed").unwrap_or(0);
    // 20 s of a one-way partition: the link dies by keepalive (about 10 s), then dials time
    // out (3 s each) with a backoff between them; a tight redial loop would make hundreds.
    if dials > 12 {
        return Err(format!("{dials} dials in 20 s: the link flaps").into());
    }
    if dial_failed == 0 {
        return Err("the dial failures do not show in the counters".into());
    }
    // And in the caller's log: the link's end with its reason, and each failed dial once
    // (the backoff gates the lines), never a line per call.
    let log = drv.log_lines();
    let about = |what: &str| {
        log.iter()
            .filter(|l| l.contains(what) && l.contains("peer=1.1.1"))
            .count() as u64
    };
    let (downs, dial_lines) = (about("link down"), about("dial failed"));
    if downs == 0 {
        return Err("the lost link is not in the caller's log".into());
    }
    if dial_lines == 0 || dial_lines > dial_failed {
        return Err(format!(
            "{dial_lines} `dial failed` lines in the caller's log for {dial_failed} failed dials"
        )
        .into());
    }
    Ok(format!(
        "{} calls; {during} failed during the 20 s cut ({:?}), none past its 1 s deadline; {dials} dials in all ({dial_failed} failed, counted); in the caller's log: {downs} `link down` and {dial_lines} `dial failed` lines; called again {back} ms after the mend",
        all.len(),
        error_kinds(&all)
    ))
}

/// A slow link (netem, 100 ms on the caller's side): calls are slower and none fails.
/// Reported as not run where the kernel has no netem.
fn slow_link() -> Result<String, Error> {
    let b = bed("slow", &["1.1.1"])?;
    if let Err(e) = net::slow_link(&b.drv, 100) {
        return Err(Box::new(NotRun(format!(
            "this kernel cannot slow a link ({e}); the other faults do not need it"
        ))));
    }
    let run = Duration::from_secs(5);
    let mut drv = b.driver(&["1.1.1"], run)?;
    driver_done(&mut drv, run)?;
    let all = calls(&drv);
    let failed = all.iter().filter(|c| !c.ok).count();
    let fastest = all.iter().map(|c| c.took_ms).min().unwrap_or(0);
    if failed > 0 || fastest < 100 {
        return Err(
            format!("{failed} calls failed, fastest {fastest} ms with 100 ms added").into(),
        );
    }
    Ok(format!(
        "{} calls, 0 failed, fastest {fastest} ms (100 ms added one way)",
        all.len()
    ))
}
