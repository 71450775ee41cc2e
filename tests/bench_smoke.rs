//! Smoke test of the mesh and scale benchmarks: runs every mode for a fraction of a second
//! in their processes and fails if a mode fails or measures nothing. When re-executed by a
//! benchmark as one of its processes (first argument `peer`, `host`, `hub` or `watchers`), it
//! plays that part instead.

#[path = "../benches/mesh.rs"]
mod mesh;
#[path = "../benches/scale.rs"]
mod scale;

fn main() {
    let mut args: Vec<String> = std::env::args().collect();
    if args.get(1).is_some_and(|a| a == "peer") {
        if let Err(e) = mesh::entry(args) {
            eprintln!("bench smoke peer: {e}");
            std::process::exit(2);
        }
        return;
    }
    if args
        .get(1)
        .is_some_and(|a| a == "host" || a == "hub" || a == "watchers")
    {
        if let Err(e) = scale::entry(args) {
            eprintln!("bench smoke scale process: {e}");
            std::process::exit(2);
        }
        return;
    }
    // Curves of an earlier run must not pass for this one's.
    let figures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/scale");
    for entry in std::fs::read_dir(&figures).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().contains("-smoke") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    // Only the binary name is kept: cargo's test arguments mean nothing here.
    args.truncate(1);
    args.push("--smoke".into());
    let started = std::time::Instant::now();
    let outcomes = match mesh::entry(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench smoke: {e}");
            std::process::exit(2);
        }
    };
    let (mut passed, mut failed) = (0, 0);
    for o in &outcomes {
        match &o.result {
            Ok(row)
                if row.mesh.ops > 0
                    && row.raw.ops > 0
                    && row.mesh.ops_per_sec > 0.0
                    && row.raw.ops_per_sec > 0.0
                    && row.bare.map(|b| b.ops > 0 && b.ops_per_sec > 0.0)
                        == mesh::bare::covers(o.name).then_some(true) =>
            {
                passed += 1
            }
            Ok(row) => {
                failed += 1;
                eprintln!("bench smoke: {} measured zero operations: {row:?}", o.name);
            }
            Err(e) => {
                failed += 1;
                eprintln!("bench smoke: {} failed: {e}", o.name);
            }
        }
    }
    if outcomes.len() != mesh::MODES.len() {
        failed += 1;
        eprintln!(
            "bench smoke: expected {} modes, {} ran",
            mesh::MODES.len(),
            outcomes.len()
        );
    }
    // Links over mutual TLS, through harbors too (four processes).
    for mode in ["rpc-c1", "rpc-c128-harbor"] {
        let args = ["smoke", "--smoke", "--tls", "--mode", mode].map(String::from);
        match mesh::entry(args.to_vec()).as_deref() {
            Ok([o]) if o.result.as_ref().is_ok_and(|r| r.mesh.ops > 0) => passed += 1,
            other => {
                failed += 1;
                eprintln!("bench smoke: {mode} over TLS failed: {other:?}");
            }
        }
    }
    // The scale benchmark, at two small sizes.
    let args = ["smoke", "--smoke"].map(String::from);
    let report = scale::entry(args.to_vec());
    match &report {
        Ok(r)
            if r.links.len() == 2
                && r.links
                    .iter()
                    .all(|r| r.link_ms > 0.0 && r.calls_per_sec > 0.0 && r.p50_us > 0.0) =>
        {
            passed += 1
        }
        other => {
            failed += 1;
            eprintln!("bench smoke: scale links failed or measured nothing: {other:?}");
        }
    }
    // Membership in a real etcd (the README's test command installs it): every change
    // reached all watchers.
    match report.as_ref().map(|r| r.members.as_deref()) {
        Ok(Some(rows))
            if rows.len() == 2
                && rows.iter().all(|r| {
                    r.first_snapshot_ms > 0.0
                        && r.changes.len() == scale::members::RATES.len()
                        && r.changes.iter().all(|c| c.lost == 0 && c.p50_ms > 0.0)
                }) =>
        {
            passed += 1
        }
        other => {
            failed += 1;
            eprintln!("bench smoke: scale members failed, did not run or lost changes: {other:?}");
        }
    }
    // Clusters behind harbors: calls went through, the harbors did work.
    match report.as_ref().map(|r| &r.clusters) {
        Ok(rows)
            if rows.len() == 2
                && rows.iter().all(|r| {
                    r.link_ms > 0.0 && r.calls_per_sec > 0.0 && r.edge_cpu_us_per_call > 0.0
                }) =>
        {
            passed += 1
        }
        other => {
            failed += 1;
            eprintln!("bench smoke: scale clusters failed or measured nothing: {other:?}");
        }
    }
    // Its curves: PNG files, checksums right.
    let pngs = [
        "links-smoke-memory",
        "links-smoke-link-time",
        "links-smoke-idle-cpu",
        "links-smoke-calls",
        "members-smoke-snapshot",
        "members-smoke-memory",
        "members-smoke-propagation",
        "members-smoke-change-cpu",
        "clusters-smoke-memory",
        "clusters-smoke-forwarding",
        "clusters-smoke-calls",
    ]
    .map(|c| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("target/scale/{c}.png"))
    });
    let drawn = pngs.iter().all(|p| {
        std::fs::read(p).is_ok_and(|b| b.starts_with(b"\x89PNG\r\n\x1a\n") && b.len() > 1000)
    });
    match scale::plot::self_check() {
        Ok(()) if drawn => passed += 1,
        other => {
            failed += 1;
            eprintln!("bench smoke: scale curves: {other:?}, drawn: {drawn}");
        }
    }
    println!("bench smoke: took {:.1} s", started.elapsed().as_secs_f64());
    println!("bench smoke: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}
