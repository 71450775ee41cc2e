//! Shared test harness: real nodes on 127.0.0.1 with in-memory membership.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::future::Future;
use std::net::TcpListener;
use std::time::Duration;

pub mod ports;

use clustergo::{LogicAddr, Member, MemoryDiscovery, Node, NodeBuilder, NodeConfig};

/// One outer timeout for anything a test awaits.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn a(text: &str) -> LogicAddr {
    text.parse().unwrap()
}

/// A port bound now and held until the node takes it.
pub fn bind() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let net = l.local_addr().unwrap().to_string();
    (l, net)
}

/// Fast timeouts so failing paths finish quickly in tests.
pub fn test_config() -> NodeConfig {
    NodeConfig::default()
        .secret("test-secret")
        .call_timeout(Duration::from_secs(5))
        .dial_timeout(Duration::from_secs(2))
        .shutdown_grace(Duration::from_secs(3))
}

/// Nodes sharing one in-memory membership; each address gets a held port.
pub struct Cluster {
    pub members: MemoryDiscovery,
    listeners: Vec<(LogicAddr, TcpListener)>,
}

impl Cluster {
    pub fn new(addrs: &[&str]) -> Self {
        let members = MemoryDiscovery::default();
        let mut listeners = Vec::new();
        for text in addrs {
            let (l, net) = bind();
            members.upsert(Member::new(a(text), net));
            listeners.push((a(text), l));
        }
        Cluster { members, listeners }
    }

    /// A builder for `addr` wired to this cluster's membership and its held port.
    pub fn builder(&mut self, addr: &str) -> NodeBuilder {
        let addr = a(addr);
        let i = self
            .listeners
            .iter()
            .position(|(x, _)| *x == addr)
            .expect("address was given to Cluster::new");
        let (_, l) = self.listeners.remove(i);
        Node::builder(addr)
            .discovery(self.members.clone())
            .config(test_config())
            .listener(l)
    }

    /// Builds and starts `addr` with the handlers `f` adds.
    pub async fn start(&mut self, addr: &str, f: impl FnOnce(NodeBuilder) -> NodeBuilder) -> Node {
        let node = f(self.builder(addr)).build();
        within(node.start()).await.unwrap();
        node
    }
}

/// Awaits `fut` under the outer timeout; a hang fails the test instead of blocking CI.
pub async fn within<F: Future>(fut: F) -> F::Output {
    tokio::time::timeout(WAIT, fut)
        .await
        .expect("timed out waiting for the condition")
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "clustergo=warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// The path of example binary `name` (`cargo test` builds example targets).
pub fn example(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().join("examples");
    let bin = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "example {name} not built at {}",
        bin.display()
    );
    bin
}

/// Kills a child process (ours, by its handle) whatever the test's outcome.
pub struct Reap(pub std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
