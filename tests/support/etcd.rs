//! A real etcd for tests: Debian's `etcd-server` on free loopback ports with a temporary data
//! directory, stopped (by its pid, through the child handle) when dropped.
#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Etcd {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    client_port: u16,
    peer_port: u16,
    dir: PathBuf,
}

fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CLUSTERGO_ETCD") {
        return p.into();
    }
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/bin"])
    {
        let p = PathBuf::from(dir).join("etcd");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "etcd not found: these tests need a real etcd. Install it with \
         `apt-get install -y etcd-server` (the README's test command does), \
         or point CLUSTERGO_ETCD at an etcd binary"
    );
}

#[path = "ports.rs"]
mod ports;
pub use ports::free_port;

impl Etcd {
    /// Lists `members` under `prefix`, as an operator would.
    pub async fn list(&self, prefix: &str, members: &[clustergo::Member]) {
        use clustergo::membership::{encode_member, member_key};
        let mut kv = etcd_client::Client::connect([self.endpoint.clone()], None)
            .await
            .unwrap();
        for m in members {
            kv.put(member_key(prefix, m.addr), encode_member(m), None)
                .await
                .unwrap();
        }
    }

    /// Starts a fresh etcd and waits until it answers.
    pub fn start() -> Etcd {
        let dir =
            std::env::temp_dir().join(format!("cg-etcd-{}-{}", std::process::id(), free_port()));
        let mut e = Etcd {
            child: None,
            endpoint: String::new(),
            client_port: free_port(),
            peer_port: free_port(),
            dir,
        };
        // A port picked free can be taken by another test's etcd before this one binds it:
        // then etcd exits at once, and a fresh pair of ports is tried.
        for _ in 0..5 {
            e.endpoint = format!("http://127.0.0.1:{}", e.client_port);
            match e.try_spawn() {
                Ok(()) => return e,
                Err(status) => {
                    eprintln!("etcd exited at start ({status}); trying other ports");
                    e.client_port = free_port();
                    e.peer_port = free_port();
                    let _ = std::fs::remove_dir_all(&e.dir);
                }
            }
        }
        panic!("etcd exited at start five times");
    }

    fn spawn(&mut self) {
        if let Err(status) = self.try_spawn() {
            panic!("etcd exited at start: {status}");
        }
    }

    fn try_spawn(&mut self) -> Result<(), std::process::ExitStatus> {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(binary())
            .args(["--name", "t", "--data-dir"])
            .arg(&self.dir)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args([
                "--initial-cluster",
                &format!("t={peer}"),
                "--log-level",
                "error",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd starts");
        self.child = Some(child);
        self.wait_ready()
    }

    fn healthy(&self) -> bool {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.client_port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let req = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        let mut body = String::new();
        s.write_all(req.as_bytes()).is_ok()
            && s.read_to_string(&mut body).is_ok()
            && body.contains("\"health\":\"true\"")
    }

    /// Polls `/health` (a readiness probe, not a settle delay) for up to 15 s.
    fn wait_ready(&mut self) -> Result<(), std::process::ExitStatus> {
        let end = Instant::now() + Duration::from_secs(15);
        while !self.healthy() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(status);
            }
            assert!(
                Instant::now() < end,
                "etcd did not become ready within 15 s"
            );
            std::thread::park_timeout(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stops etcd (data kept), as an outage.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts etcd again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
