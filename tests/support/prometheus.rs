//! A real Prometheus server for tests: Debian's `prometheus` on a free loopback port with a
//! temporary data directory, scraping the given targets every second; stopped (by its pid,
//! through the child handle) when dropped.
#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Prometheus {
    child: Child,
    /// `127.0.0.1:PORT` of its HTTP API.
    pub addr: String,
    dir: PathBuf,
}

fn binary() -> PathBuf {
    let found = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/bin"])
        .map(|d| PathBuf::from(d).join("prometheus"))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "prometheus not found: these tests scrape with a real Prometheus server. Install it \
             with `apt-get install -y prometheus` (the README's test command does)"
        )
    })
}

/// An HTTP/1.x answer as (status, body); status 0 if it is none.
pub fn parse_http(text: &str) -> (u16, String) {
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// One HTTP/1.0 GET on loopback: (status, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(parse_http(&text))
}

/// Asserts that Prometheus's own linter, `promtool check metrics`, accepts `text`.
pub fn promtool_check(text: &str) {
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "promtool not runnable ({e}): install it with `apt-get install -y prometheus` \
                 (the README's test command does)"
            )
        });
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Prometheus {
    /// Starts Prometheus on `port` (free; see `ports.rs`) scraping `targets` (`host:port` of
    /// `/metrics` endpoints) every second, and waits until it is ready.
    pub fn start(port: u16, targets: &[String]) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("cg-prom-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let list = targets
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: clustergo\n    static_configs:\n      - targets: [{list}]\n"
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(binary())
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut p = Prometheus { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("prometheus exited at start: {status}");
            }
            if matches!(http_get(&p.addr, "/-/ready"), Ok((200, _))) {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready within 30 s"
            );
            // Another process's HTTP API, which tells nobody when it is ready: the condition
            // is polled (bounded by the deadline above), not waited out.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs an instant query; the `result` array of its answer.
    pub fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        let (status, body) = http_get(&self.addr, &path).unwrap();
        assert_eq!(status, 200, "query {promql}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// Waits (up to `within`) until `promql` returns a sample whose value passes `check`;
    /// returns that value.
    pub fn wait_for(&self, promql: &str, within: Duration, check: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + within;
        let mut last = Vec::new();
        while Instant::now() < deadline {
            last = self.query(promql);
            let value = last.iter().find_map(|r| {
                let v: f64 = r["value"][1].as_str()?.parse().ok()?;
                check(v).then_some(v)
            });
            if let Some(v) = value {
                return v;
            }
            // Prometheus scrapes once a second and pushes nothing: the query is polled, bounded
            // by `within`.
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("no sample of {promql} passed within {within:?}; last answer: {last:?}");
    }

    /// Whether every target's last scrape succeeded (`up == 1`).
    pub fn targets_up(&self) -> Vec<serde_json::Value> {
        self.query("up")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
