//! Smoke test of the gateway benchmark: every mode for a fraction of a second, with real
//! processes; fails if a mode fails or measures nothing. When re-executed by the benchmark as
//! its game server (first argument `game-server`), it serves as the game server instead.

#[path = "../benches/gateway.rs"]
#[allow(dead_code)]
mod bench;

fn main() {
    let mut args: Vec<String> = std::env::args().collect();
    if args
        .get(1)
        .is_some_and(|a| a == "game-server" || a == "raw-echo" || a == "raw-relay")
    {
        if let Err(e) = bench::entry(args) {
            eprintln!("bench smoke game server: {e}");
            std::process::exit(2);
        }
        return;
    }
    // Curves of an earlier run must not pass for this one's.
    let figures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/scale");
    for name in ["gateway-smoke-relay", "gateway-smoke-idle"] {
        for ext in ["png", "csv"] {
            let _ = std::fs::remove_file(figures.join(format!("{name}.{ext}")));
        }
    }
    args.truncate(1);
    args.push("--smoke".into());
    let report = match bench::entry(args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench smoke: {e}");
            std::process::exit(1);
        }
    };
    let mut failed = false;
    if report.rows.len() != 12 {
        eprintln!("bench smoke: {} echo runs, wanted 12", report.rows.len());
        failed = true;
    }
    match &report.sessions {
        Some(s) if s.resumed == 10 && s.sessions > 0 && s.resume_p50_ms > 0.0 => {}
        other => {
            eprintln!("bench smoke: session run: {other:?}");
            failed = true;
        }
    }
    for row in &report.rows {
        if row.frames == 0 || row.per_sec <= 0.0 {
            eprintln!("bench smoke: {} measured nothing: {row:?}", row.name);
            failed = true;
        }
    }
    // Through the gateway and through the raw relay: TCP and WebSocket, 1 and 10 clients.
    if report.relay.len() != 4
        || report
            .relay
            .iter()
            .any(|(gw, raw, ratio)| gw.frames == 0 || raw.frames == 0 || *ratio <= 0.0)
    {
        eprintln!("bench smoke: relay runs: {:?}", report.relay);
        failed = true;
    }
    match report.idle.as_slice() {
        [idle] if idle.clients == 200 => {}
        other => {
            eprintln!("bench smoke: idle run: {other:?}");
            failed = true;
        }
    }
    // Their curves, drawn beside the CSV.
    for name in ["gateway-smoke-relay", "gateway-smoke-idle"] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/scale");
        let png = std::fs::read(dir.join(format!("{name}.png"))).unwrap_or_default();
        let csv = std::fs::read_to_string(dir.join(format!("{name}.csv"))).unwrap_or_default();
        if !png.starts_with(b"\x89PNG\r\n\x1a\n") || csv.lines().count() < 2 {
            eprintln!("bench smoke: {name}: no PNG or no CSV rows");
            failed = true;
        }
    }
    if failed {
        std::process::exit(1);
    }
    println!(
        "bench smoke: {} echo runs, {} relay runs, the session run, the idle run and their curves passed",
        report.rows.len(),
        report.relay.len()
    );
}
