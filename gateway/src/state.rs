//! What the gateway's sessions share: the node, limits and budgets, counters, the drains of
//! game servers that leave, and the status report.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use clustergo::{LogicAddr, Node};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Limits, Policy};

/// What every session shares.
#[derive(Debug)]
pub(crate) struct Gateway {
    pub(crate) node: Node,
    pub(crate) backend_type: u8,
    pub(crate) policy: Policy,
    pub(crate) limits: Limits,
    /// Budgets and their counters (clients in all and per source, handshakes per source).
    pub(crate) admission: Arc<crate::admission::Admission>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tasks: TaskTracker,
    pub(crate) stats: Stats,
    /// Metrics for the admin listener.
    pub(crate) metrics: crate::metrics::Metrics,
    /// Per game server, cancelled when it leaves: its clients are closed so they reconnect.
    pub(crate) drains: std::sync::Mutex<std::collections::HashMap<LogicAddr, CancellationToken>>,
    /// Checks the tokens of sessions that resume (the cluster secret's session key).
    pub(crate) tokens: clustergo::session::TokenKey,
}

/// Counters, reported by the `gateway.status` RPC.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// KCP cookies sent (answers to HELLO).
    pub(crate) kcp_cookies: AtomicU64,
    /// KCP datagrams dropped: unknown conv, wrong source, bad cookie, malformed, a full
    /// session queue, or over the cookie rate.
    pub(crate) kcp_dropped: AtomicU64,
    pub(crate) client_faults: AtomicU64,
    pub(crate) server_failures: AtomicU64,
    pub(crate) frames_up: AtomicU64,
    pub(crate) frames_down: AtomicU64,
}

impl Gateway {
    /// Cancelled when `server` stops being available. Already cancelled if it is not
    /// available now (it left while the client's stream was being opened).
    pub(crate) fn drain_token(&self, server: LogicAddr) -> CancellationToken {
        // Checked under the lock, so a drain cannot run between the check and the insert.
        let mut drains = self.drains.lock().unwrap_or_else(|e| e.into_inner());
        if !self.node.member(server).is_some_and(|m| m.available) {
            // Not stored: once the server is back, its new clients must get a live token.
            let gone = CancellationToken::new();
            gone.cancel();
            return gone;
        }
        drains.entry(server).or_default().clone()
    }

    /// Closes the clients of every server in `gone` (they left membership or became
    /// unavailable).
    pub(crate) fn drain(&self, gone: &[LogicAddr]) {
        let mut drains = self.drains.lock().unwrap_or_else(|e| e.into_inner());
        for server in gone {
            if let Some(token) = drains.remove(server) {
                token.cancel();
            }
        }
    }

    /// Clients connected now.
    pub(crate) fn active(&self) -> usize {
        self.admission.active()
    }
}

/// The `gateway.status` answer: one `name=value` per line.
pub(crate) fn status(gw: &Gateway) -> String {
    let s = &gw.stats;
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    format!(
        "clients={}\naccepted={}\nturned_away={}\nturned_away_source={}\nsources={}\nkcp_cookies={}\nkcp_dropped={}\nclient_faults={}\nserver_failures={}\nframes_up={}\nframes_down={}",
        gw.active(),
        n(&gw.admission.accepted),
        n(&gw.admission.turned_away),
        n(&gw.admission.turned_away_source),
        gw.admission.sources_held(),
        n(&s.kcp_cookies),
        n(&s.kcp_dropped),
        n(&s.client_faults),
        n(&s.server_failures),
        n(&s.frames_up),
        n(&s.frames_down),
    )
}

/// Logs the game servers clients can go to whenever that set changes, and drains the clients
/// of servers that leave it.
pub(crate) async fn watch_backends(gw: Arc<Gateway>) {
    let mut last: Option<Vec<clustergo::LogicAddr>> = None;
    loop {
        let now = gw.node.available_of_type(gw.backend_type);
        if last.as_ref() != Some(&now) {
            let list: Vec<String> = now.iter().map(|a| a.to_string()).collect();
            tracing::info!(
                "game servers of type {} available: [{}]",
                gw.backend_type,
                list.join(", ")
            );
            if let Some(before) = &last {
                let gone: Vec<_> = before
                    .iter()
                    .filter(|a| !now.contains(a))
                    .copied()
                    .collect();
                if !gone.is_empty() {
                    tracing::info!(servers = ?gone, "game servers left: closing their clients");
                    gw.drain(&gone);
                }
            }
            last = Some(now);
        }
        let changed = gw.node.wait_available_of_type(
            gw.backend_type,
            |now| last.as_deref() != Some(now),
            std::time::Duration::from_secs(3600),
        );
        tokio::select! {
            _ = changed => {}
            () = gw.shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server seen unavailable while a client's stream was being opened must not leave a
    /// cancelled token behind: once it is back, its new clients are served.
    #[tokio::test]
    async fn a_drain_is_not_remembered_past_the_servers_return() {
        let me: LogicAddr = "1.100.1".parse().unwrap();
        let server: LogicAddr = "1.1.1".parse().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let members = clustergo::MemoryDiscovery::new([
            clustergo::Member::new(me, listener.local_addr().unwrap().to_string()),
            clustergo::Member::new(server, "127.0.0.1:9").with_available(false),
        ]);
        let node = Node::builder(me)
            .discovery(members.clone())
            .listener(listener)
            .config(clustergo::NodeConfig::default().secret("unit"))
            .build();
        node.start().await.unwrap();
        let gw = Gateway {
            node: node.clone(),
            backend_type: 1,
            policy: Policy::Random,
            limits: Limits::default(),
            admission: crate::admission::Admission::new(&Limits::default()),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            stats: Stats::default(),
            metrics: Default::default(),
            drains: Default::default(),
            tokens: clustergo::session::TokenKey::from_secret(b"unit"),
        };
        assert!(gw.drain_token(server).is_cancelled());
        members.set_available(server, true);
        let back = |m: &[clustergo::Member]| m.iter().any(|m| m.addr == server && m.available);
        assert!(
            node.wait_members(back, std::time::Duration::from_secs(5))
                .await
        );
        let token = gw.drain_token(server);
        assert!(!token.is_cancelled());
        gw.drain(&[server]);
        assert!(token.is_cancelled());
        node.shutdown().await;
    }
}
