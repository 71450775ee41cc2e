//! The fault-injection harness: every process on a host of its own.
//!
//! A [`Net`] is a private network: a namespace holding a bridge, and for each [`Host`] a
//! namespace joined to the bridge by a veth pair, with an address in a /24 of 10.0.0.0/8
//! chosen per test process. Processes run inside a host with [`Host::spawn`]; faults are one
//! call each: [`Net::partition`] / [`Net::heal`] (the host's link to the bridge down / up),
//! [`Net::cut`] / [`Net::mend`] (blackhole routes between two hosts, one way or both),
//! [`Proc::kill`] (SIGKILL), [`Proc::pause`] / [`Proc::resume`] (SIGSTOP / SIGCONT: a frozen
//! VM). Dropping the `Net` kills every process it started (by pid) and deletes every
//! namespace, also when a test panics.
//!
//! The scenarios in `main.rs` build on this (a bed of etcd, nodes and a load driver); how to
//! write one is described there.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Runs `ip ARGS` (in namespace `ns` when given); an error names the command and its output.
pub fn ip(ns: Option<&str>, args: &[&str]) -> Result<(), Error> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["netns", "exec", ns, "ip"]);
    }
    let out = cmd.args(args).output()?;
    if !out.status.success() {
        return Err(format!(
            "ip {} (in {}): {}",
            args.join(" "),
            ns.unwrap_or("the root namespace"),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(())
}

/// Why this machine cannot run the fault tests, if it cannot: root (network namespaces need
/// CAP_NET_ADMIN) and iproute2 with namespaces and bridges.
pub fn unsupported() -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        });
    if uid.as_deref() != Some("0") {
        return Some("they need root (network namespaces need CAP_NET_ADMIN)".into());
    }
    let probe = format!("cgf{}probe", std::process::id() % 100_000);
    match ip(None, &["netns", "add", &probe]) {
        Ok(()) => {
            let _ = ip(None, &["netns", "del", &probe]);
            None
        }
        Err(e) => Some(format!("network namespaces are not available here: {e}")),
    }
}

/// Delays everything `host` sends by `ms` (netem). `Err` names why when the kernel has no
/// netem (the fault then cannot be injected here).
pub fn slow_link(host: &Host, ms: u32) -> Result<(), Error> {
    let out = Command::new("ip")
        .args([
            "netns", "exec", &host.ns, "tc", "qdisc", "add", "dev", &host.dev,
        ])
        .args(["root", "netem", "delay", &format!("{ms}ms")])
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("tc netem: {}", String::from_utf8_lossy(&out.stderr).trim()).into())
    }
}

/// A private network of hosts; everything it made goes when it is dropped.
pub struct Net {
    tag: String,
    /// The namespace holding the bridge.
    hub: String,
    /// The /24's first three octets, e.g. `10.77.3`.
    prefix: String,
    hosts: Mutex<Vec<String>>,
    procs: Arc<Mutex<Vec<u32>>>,
    /// Where process logs go.
    pub dir: PathBuf,
}

/// One host: a namespace with one address on the bridge.
#[derive(Clone, Debug)]
pub struct Host {
    pub name: String,
    pub ns: String,
    pub ip: String,
    /// The veth end on the bridge (taking it down partitions the host).
    port: String,
    /// The host's own interface (on which a slow link would be set).
    pub dev: String,
    procs: Arc<Mutex<Vec<u32>>>,
    dir: PathBuf,
}

impl Net {
    /// A new network; `tag` names it in the namespaces (with this process's id).
    pub fn new(tag: &str) -> Result<Net, Error> {
        let pid = std::process::id();
        let id = pid % 100_000;
        let hub = format!("cgf{id}{tag}hub");
        let dir = std::env::temp_dir().join(format!("cg-faults-{pid}-{tag}"));
        std::fs::create_dir_all(&dir)?;
        let net = Net {
            tag: tag.into(),
            prefix: format!("10.{}.{}", 100 + (pid / 250) % 150, pid % 250),
            hub: hub.clone(),
            hosts: Mutex::new(Vec::new()),
            procs: Arc::default(),
            dir,
        };
        ip(None, &["netns", "add", &hub])?;
        ip(Some(&hub), &["link", "add", "br0", "type", "bridge"])?;
        ip(Some(&hub), &["link", "set", "br0", "up"])?;
        Ok(net)
    }

    /// Adds host `name` (at most 20 per network).
    pub fn host(&self, name: &str) -> Result<Host, Error> {
        let mut hosts = self.hosts.lock().unwrap();
        let n = hosts.len() + 2;
        if n > 21 {
            return Err("at most 20 hosts per network".into());
        }
        let id = std::process::id() % 100_000;
        let ns = format!("cgf{id}{}{name}", self.tag);
        let port = format!("p{id}x{n}");
        let inner = format!("i{id}x{n}");
        let ip_addr = format!("{}.{n}", self.prefix);
        ip(None, &["netns", "add", &ns])?;
        hosts.push(ns.clone());
        ip(
            None,
            &["link", "add", &port, "type", "veth", "peer", "name", &inner],
        )?;
        ip(None, &["link", "set", &port, "netns", &self.hub])?;
        ip(None, &["link", "set", &inner, "netns", &ns])?;
        ip(Some(&self.hub), &["link", "set", &port, "master", "br0"])?;
        ip(Some(&self.hub), &["link", "set", &port, "up"])?;
        ip(Some(&ns), &["link", "set", "lo", "up"])?;
        ip(
            Some(&ns),
            &["addr", "add", &format!("{ip_addr}/24"), "dev", &inner],
        )?;
        ip(Some(&ns), &["link", "set", &inner, "up"])?;
        Ok(Host {
            name: name.into(),
            ns,
            ip: ip_addr,
            port,
            dev: inner,
            procs: self.procs.clone(),
            dir: self.dir.clone(),
        })
    }

    /// Cuts `host` off from every other host (its link to the bridge goes down).
    pub fn partition(&self, host: &Host) -> Result<(), Error> {
        ip(Some(&self.hub), &["link", "set", &host.port, "down"])
    }

    /// Undoes [`Net::partition`].
    pub fn heal(&self, host: &Host) -> Result<(), Error> {
        ip(Some(&self.hub), &["link", "set", &host.port, "up"])
    }

    /// Drops what `from` sends to `to` (a blackhole route in `from`); with `both`, the other
    /// way too.
    pub fn cut(&self, from: &Host, to: &Host, both: bool) -> Result<(), Error> {
        ip(
            Some(&from.ns),
            &["route", "add", "blackhole", &format!("{}/32", to.ip)],
        )?;
        if both {
            ip(
                Some(&to.ns),
                &["route", "add", "blackhole", &format!("{}/32", from.ip)],
            )?;
        }
        Ok(())
    }

    /// Undoes [`Net::cut`].
    pub fn mend(&self, from: &Host, to: &Host, both: bool) -> Result<(), Error> {
        ip(
            Some(&from.ns),
            &["route", "del", "blackhole", &format!("{}/32", to.ip)],
        )?;
        if both {
            ip(
                Some(&to.ns),
                &["route", "del", "blackhole", &format!("{}/32", from.ip)],
            )?;
        }
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for pid in self
            .procs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        for ns in self
            .hosts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = ip(None, &["netns", "del", &ns]);
        }
        let _ = ip(None, &["netns", "del", &self.hub]);
    }
}

/// Lines a process printed, with a way to wait for one.
#[derive(Clone, Default)]
pub struct Lines(Arc<(Mutex<Vec<String>>, Condvar)>);

impl Lines {
    /// Waits up to `limit` for a line containing `text`; returns it.
    pub fn wait_for(&self, text: &str, limit: Duration) -> Option<String> {
        let (lock, cv) = &*self.0;
        let end = Instant::now() + limit;
        let mut lines = lock.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| l.contains(text)) {
                return Some(l.clone());
            }
            let left = end.checked_duration_since(Instant::now())?;
            lines = cv.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// Every line so far.
    pub fn all(&self) -> Vec<String> {
        self.0.0.lock().unwrap().clone()
    }

    fn push(&self, line: String) {
        let (lock, cv) = &*self.0;
        lock.lock().unwrap().push(line);
        cv.notify_all();
    }
}

/// A process on a host, with what it prints.
pub struct Proc {
    pub name: String,
    child: Child,
    pub out: Lines,
    /// Its log: stdout and stderr (a node's logs).
    pub log: PathBuf,
}

impl Proc {
    /// The lines of its log so far.
    pub fn log_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Host {
    /// Starts `cmd` inside this host; stdout is kept in [`Proc::out`] and, with stderr, written
    /// to a log file named after the process.
    pub fn spawn(
        &self,
        name: &str,
        program: &std::path::Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<Proc, Error> {
        let log_path = self.dir.join(format!("{}-{name}.log", self.name));
        let log = std::fs::File::create(&log_path)?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.try_clone()?)
            .spawn()?;
        // `ip netns exec` execs the program: the child's pid is the program's.
        self.procs.lock().unwrap().push(child.id());
        let out = Lines::default();
        let lines = out.clone();
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut log = log;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                use std::io::Write;
                let _ = writeln!(log, "{line}");
                lines.push(line);
            }
        });
        Ok(Proc {
            name: name.into(),
            child,
            out,
            log: log_path,
        })
    }
}

impl Proc {
    fn signal(&self, sig: &str) -> Result<(), Error> {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()?
            .success();
        if ok {
            Ok(())
        } else {
            Err(format!("kill {sig} {} failed", self.name).into())
        }
    }

    /// SIGKILL, and reaps it.
    pub fn kill(&mut self) -> Result<(), Error> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGSTOP: frozen, as a paused VM.
    pub fn pause(&self) -> Result<(), Error> {
        self.signal("-STOP")
    }

    /// SIGCONT.
    pub fn resume(&self) -> Result<(), Error> {
        self.signal("-CONT")
    }

    /// SIGTERM.
    pub fn terminate(&self) -> Result<(), Error> {
        self.signal("-TERM")
    }

    /// Waits up to `limit` for it to exit (a blocking wait on a helper thread); kills it
    /// when the time is up and returns `None`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        let child = &mut self.child;
        std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel();
            s.spawn(move || {
                let _ = tx.send(child.wait());
            });
            match rx.recv_timeout(limit) {
                Ok(Ok(status)) => Some(status),
                _ => {
                    let _ = Command::new("kill").args(["-KILL", &pid]).status();
                    None
                }
            }
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
