//! What a connection may cost before it is a client, what one source address may hold, and
//! the gateway's one rate limiter.
//!
//! Budgets, from accept on (all in `[limits]`):
//! - **per listener**: `max_handshakes` connections between accept and their first frame, so
//!   a flood on one transport never takes another's room;
//! - **per source** (an IPv4 address or an IPv6 /64, across listeners):
//!   `max_handshakes_per_source` of those, so one host holding silent sockets cannot fill a
//!   listener's budget, and `max_clients_per_source` clients;
//! - **in all**: `max_clients` clients.
//!
//! A connection over a budget at accept is turned away before any task or TLS work; a client
//! over one at its first frame is told why. KCP creates nothing at all before a client has
//! echoed a cookie from its address (`transport::kcp`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use clustergo_client::wire::close_code;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::Limits;

/// A token bucket: `rate` tokens a second, at most `burst` saved.
#[derive(Debug)]
pub(crate) struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub(crate) fn new(rate: f64, burst: f64) -> Bucket {
        Bucket {
            tokens: burst,
            rate,
            burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
    }

    /// Takes `n` tokens if there are that many.
    pub(crate) fn take(&mut self, n: f64) -> bool {
        self.refill();
        if self.tokens < n {
            return false;
        }
        self.tokens -= n;
        true
    }

    /// Charges `n` tokens already spent (the bucket may go into debt); `false` once in debt.
    pub(crate) fn charge(&mut self, n: f64) -> bool {
        self.refill();
        self.tokens -= n;
        self.tokens >= 0.0
    }
}

/// Handshakes and clients per source address.
#[derive(Debug)]
pub(crate) struct Sources {
    max_handshakes: usize,
    max_clients: usize,
    counts: Mutex<HashMap<IpAddr, Count>>,
}

#[derive(Debug, Default)]
struct Count {
    handshakes: usize,
    clients: usize,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Handshake,
    Client,
}

impl Sources {
    pub(crate) fn new(max_handshakes: usize, max_clients: usize) -> Arc<Sources> {
        Arc::new(Sources {
            max_handshakes,
            max_clients,
            counts: Mutex::default(),
        })
    }

    fn take(self: &Arc<Self>, ip: IpAddr, kind: Kind) -> Option<SourceHold> {
        let key = clustergo::source_key(ip);
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let c = counts.entry(key).or_default();
        let (n, max) = match kind {
            Kind::Handshake => (&mut c.handshakes, self.max_handshakes),
            Kind::Client => (&mut c.clients, self.max_clients),
        };
        if *n >= max {
            if c.handshakes == 0 && c.clients == 0 {
                counts.remove(&key);
            }
            return None;
        }
        *n += 1;
        Some(SourceHold {
            sources: self.clone(),
            key,
            kind,
        })
    }

    /// Source addresses holding anything now.
    pub(crate) fn len(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The gateway's budgets: clients in all and per source, handshakes per source (each
/// listener keeps its own handshake budget, see [`Admission::admit`]), and their counters.
#[derive(Debug)]
pub(crate) struct Admission {
    limits: Limits,
    /// `max_clients` permits: one per client past its handshake.
    slots: Arc<Semaphore>,
    sources: Arc<Sources>,
    /// Connections that got a handshake place.
    pub(crate) accepted: AtomicU64,
    /// Connections or clients turned away by a budget.
    pub(crate) turned_away: AtomicU64,
    /// Of `turned_away`: over `max_handshakes_per_source` at accept.
    pub(crate) turned_away_source: AtomicU64,
}

impl Admission {
    pub(crate) fn new(limits: &Limits) -> Arc<Admission> {
        Arc::new(Admission {
            slots: Arc::new(Semaphore::new(limits.max_clients)),
            sources: Sources::new(
                limits.max_handshakes_per_source,
                limits.max_clients_per_source,
            ),
            limits: limits.clone(),
            accepted: AtomicU64::new(0),
            turned_away: AtomicU64::new(0),
            turned_away_source: AtomicU64::new(0),
        })
    }

    /// Clients connected now.
    pub(crate) fn active(&self) -> usize {
        self.limits.max_clients - self.slots.available_permits()
    }

    /// Source addresses holding a handshake or a client now.
    pub(crate) fn sources_held(&self) -> usize {
        self.sources.len()
    }

    /// A handshake budget for one listener (`max_handshakes`).
    pub(crate) fn listener_budget(&self) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(self.limits.max_handshakes))
    }
}

/// One handshake's or client's place in its source's count; given back on drop.
#[derive(Debug)]
struct SourceHold {
    sources: Arc<Sources>,
    key: IpAddr,
    kind: Kind,
}

impl Drop for SourceHold {
    fn drop(&mut self) {
        let mut counts = self
            .sources
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(c) = counts.get_mut(&self.key) {
            match self.kind {
                Kind::Handshake => c.handshakes -= 1,
                Kind::Client => c.clients -= 1,
            }
            if c.handshakes == 0 && c.clients == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// A connection between accept and its first frame: its place in its listener's budget and
/// in its source's count.
#[derive(Debug)]
pub(crate) struct Handshake {
    _permit: OwnedSemaphorePermit,
    _source: SourceHold,
}

/// A client: its place in `max_clients` and in its source's count.
#[derive(Debug)]
pub(crate) struct Client {
    _slot: OwnedSemaphorePermit,
    _source: SourceHold,
}

/// Why a client was turned away at its first frame: a close code and a reason for the player.
pub(crate) type Refusal = (u16, &'static str);

pub(crate) const FULL: &str = "gateway full: try again later";
const SOURCE_FULL: &str = "too many clients from your address: try again later";

impl Handshake {
    /// Trades the handshake's places for a client's, or says why not.
    pub(crate) fn promote(self, adm: &Admission, peer: SocketAddr) -> Result<Client, Refusal> {
        let refuse = |why: &'static str, log: &str| {
            adm.turned_away.fetch_add(1, Ordering::Relaxed);
            if let Some(skipped) = TURNED_AWAY.pass() {
                tracing::info!(client = %peer, max_clients = adm.limits.max_clients, max_clients_per_source = adm.limits.max_clients_per_source, skipped, "{log}: client turned away");
            }
            Err((close_code::TRY_AGAIN, why))
        };
        let Ok(slot) = adm.slots.clone().try_acquire_owned() else {
            return refuse(FULL, "gateway full");
        };
        let Some(source) = adm.sources.take(peer.ip(), Kind::Client) else {
            return refuse(SOURCE_FULL, "too many clients from one address");
        };
        Ok(Client {
            _slot: slot,
            _source: source,
        })
    }
}

impl Admission {
    /// Takes a handshake place for a new connection from `peer` on a listener with `budget`,
    /// or `None` (counted and logged, gated) when the listener's or the source's handshakes
    /// are all taken.
    pub(crate) fn admit(
        &self,
        budget: &Arc<Semaphore>,
        peer: SocketAddr,
        transport: &str,
    ) -> Option<Handshake> {
        let turned_away = |why: &str| {
            self.turned_away.fetch_add(1, Ordering::Relaxed);
            if let Some(skipped) = HANDSHAKES_FULL.pass() {
                tracing::info!(client = %peer, transport, max_handshakes = self.limits.max_handshakes, max_handshakes_per_source = self.limits.max_handshakes_per_source, skipped, "{why}: connection dropped");
            }
            None
        };
        let Ok(permit) = budget.clone().try_acquire_owned() else {
            return turned_away("too many handshakes");
        };
        let Some(source) = self.sources.take(peer.ip(), Kind::Handshake) else {
            self.turned_away_source.fetch_add(1, Ordering::Relaxed);
            return turned_away("too many handshakes from one address");
        };
        self.accepted.fetch_add(1, Ordering::Relaxed);
        Some(Handshake {
            _permit: permit,
            _source: source,
        })
    }
}

/// Warns when the process may not open a descriptor per client: accepts would then fail
/// ("too many open files") before any client hears that the gateway is full.
pub(crate) fn check_descriptors(limits: &Limits) {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
        });
    let need = limits.max_clients + 3 * limits.max_handshakes + 256;
    if let Some(soft) = soft.and_then(|s| s.parse::<usize>().ok())
        && soft < need
    {
        tracing::warn!(
            soft_limit = soft,
            needed = need,
            "the open-file limit is below max_clients + handshakes: raise it (ulimit -n) or lower limits.max_clients"
        );
    }
}

static HANDSHAKES_FULL: clustergo::LogGate = clustergo::LogGate::new();
static TURNED_AWAY: clustergo::LogGate = clustergo::LogGate::new();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_capped_per_kind_and_released_on_drop() {
        let s = Sources::new(2, 1);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let h1 = s.take(a, Kind::Handshake).unwrap();
        let _h2 = s.take(a, Kind::Handshake).unwrap();
        assert!(s.take(a, Kind::Handshake).is_none());
        assert!(
            s.take("10.0.0.2".parse().unwrap(), Kind::Handshake)
                .is_some()
        );
        let _c = s.take(a, Kind::Client).unwrap();
        assert!(s.take(a, Kind::Client).is_none());
        drop(h1);
        assert!(s.take(a, Kind::Handshake).is_some());
        // An IPv6 /64 is one source.
        let _v6 = s
            .take("2001:db8::1".parse().unwrap(), Kind::Client)
            .unwrap();
        assert!(
            s.take("2001:db8::2".parse().unwrap(), Kind::Client)
                .is_none()
        );
    }

    #[test]
    fn nothing_is_kept_for_a_source_that_holds_nothing() {
        let s = Sources::new(1, 1);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        drop(s.take(a, Kind::Handshake));
        assert_eq!(s.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_refills_at_its_rate_up_to_its_burst() {
        let mut b = Bucket::new(10.0, 5.0);
        assert!(b.take(5.0));
        assert!(!b.take(1.0));
        tokio::time::advance(std::time::Duration::from_millis(200)).await;
        assert!(b.take(2.0));
        assert!(!b.take(0.5));
        tokio::time::advance(std::time::Duration::from_secs(10)).await;
        assert!(!b.take(6.0), "no more than the burst is saved");
        assert!(!b.charge(6.0), "a charge over the balance goes into debt");
    }
}
