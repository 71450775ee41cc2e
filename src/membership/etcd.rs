//! Membership in etcd.
//!
//! Key layout under a prefix `P` (e.g. `/clustergo/prod`):
//! - `P/members/<c.t.s>` → JSON `{"addr":"1.2.1","net_addr":"10.0.0.5:9001","export":false,"available":true}`,
//!   written by operators (`clusterctl`); the configuration of a node.
//! - `P/alive/<c.t.s>` → `"1"`, bound to the running node's lease; it vanishes when the node
//!   stops keeping the lease (crash: within the lease TTL; graceful shutdown: at once).
//!
//! A node sees a member as available when its configured `available` is true *and* its alive
//! key exists. Members without an alive key stay in the view (direct sends still work, as for
//! any unavailable member) but are never picked.
//!
//! Subscription: one get of the whole prefix at revision R (an empty store gives an empty
//! snapshot), then a watch from R+1, so no change between the two is missed. A watch that is
//! cancelled (compaction) or broken (etcd down) is followed by a fresh get, delivered as a
//! snapshot that the node diffs against its view; in between, the node keeps its last view and
//! keeps serving. Reconnects back off from `backoff_min` to `backoff_max`.
//!
//! A malformed value (bad JSON, or a key whose address disagrees with the value) is logged and
//! skipped; it hides nothing else.
//!
//! ## Server ids leased from etcd
//!
//! A node may start with its cluster and type only (`1.2.auto`) and take the lowest free server
//! id with [`EtcdDiscovery::claim`]: its member entry is created *under its own lease* (a
//! transaction that succeeds only if neither its member key nor its alive key exists); the
//! node puts its alive key on the same lease when it starts, so it is picked only once it
//! serves. An operator-listed member (no lease) holds its id for good; a claimed one holds it
//! exactly as long as its lease lives: a graceful shutdown revokes the lease (at its very end,
//! after the node has closed its links), a crash lets it expire after the TTL, and only then
//! can another node claim the id. A node whose renewals go unanswered gives the claim up
//! before the lease can have expired (counting from when the last answered renewal was sent,
//! with a fifth of the TTL to spare) and shuts itself down, taking nothing new and touching no
//! key it may no longer own; so one id is never served by two nodes.
//!
//! ## Drain progress
//!
//! While a node's member entry says `available = false` (an operator's `clusterctl drain`), the
//! node writes its progress into its alive key's value (same lease): `{"draining":true,
//! "streams":N,"calls":M}`. Watchers treat any value of an alive key as alive, so this changes
//! nothing for them; `clusterctl drain` reads it to wait until the node is idle.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{BoxFuture, Discovery, DrainProgress, Member, MembershipEvent, MembershipStream};
use crate::addr::{HARBOR_TYPE, LogicAddr, MAX_SERVER};
use crate::error::DiscoveryError;

/// Options of [`EtcdDiscovery`], with defaults.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EtcdOptions {
    /// Time to live of a node's liveness lease; a crashed node stops being picked within it.
    /// Default 5 s (kept alive every third of it).
    pub lease_ttl: Duration,
    /// Timeout of one etcd request (get, put, grant, revoke). Default 3 s.
    pub request_timeout: Duration,
    /// First wait before reconnecting after a failure; doubles up to `backoff_max`.
    /// Default 100 ms.
    pub backoff_min: Duration,
    /// Longest wait between reconnects. Default 2 s.
    pub backoff_max: Duration,
    /// Items buffered between the watcher and the node. Default 1024.
    pub channel: usize,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            lease_ttl: Duration::from_secs(5),
            request_timeout: Duration::from_secs(3),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            channel: 1024,
        }
    }
}

impl EtcdOptions {
    /// Sets [`EtcdOptions::lease_ttl`] (whole seconds, at least 1).
    #[must_use]
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl.max(Duration::from_secs(1));
        self
    }

    /// Sets [`EtcdOptions::request_timeout`].
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`EtcdOptions::backoff_min`] and [`EtcdOptions::backoff_max`].
    #[must_use]
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max.max(min);
        self
    }
}

/// Membership kept in etcd (see the module docs for the key layout).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use clustergo::{EtcdDiscovery, EtcdOptions, Node};
/// let discovery = EtcdDiscovery::connect(["http://127.0.0.1:2379"], "/clustergo/prod", EtcdOptions::default());
/// let node = Node::builder("1.2.1".parse()?).discovery(discovery).build();
/// node.start().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct EtcdDiscovery {
    inner: Arc<Inner>,
    /// The harbors center, if harbors read the harbor-wide view from elsewhere.
    center: Option<Arc<Inner>>,
}

struct Inner {
    endpoints: Vec<String>,
    prefix: String,
    options: EtcdOptions,
    /// Per node kept alive through this source (clones are shared by nodes): its lease, for
    /// `leave`, and whether it has left (after which no lease may be granted for it).
    leases: Mutex<std::collections::HashMap<LogicAddr, LeaseSlot>>,
    /// Re-reads after a broken or cancelled watch.
    resyncs: AtomicU64,
    /// The client drain reports go through.
    reports: Mutex<Option<Client>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdDiscovery")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// The key of member `addr`'s configuration under `prefix`.
pub fn member_key(prefix: &str, addr: LogicAddr) -> String {
    format!("{}/members/{addr}", prefix.trim_end_matches('/'))
}

/// Rounds of "read the taken ids, try the lowest free one" a claim makes before it gives up;
/// each lost round means another node won an id, so N nodes claiming at once need at most N.
const CLAIM_ROUNDS: usize = 512;

/// Keys per page when the whole prefix is read ([`read_prefix`]): about 0.5 MiB of ordinary
/// members and alive keys.
const LOAD_PAGE: i64 = 5_000;

/// Why [`read_prefix`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A page did not come within the timeout.
    #[error("a page of the read did not come within {0:?}")]
    TimedOut(Duration),
    /// The revision the read is pinned to was compacted between two pages; read again.
    #[error("the revision read was compacted between two pages")]
    Compacted,
    /// A page said more keys follow but held none.
    #[error("a page said more keys follow but held none")]
    EmptyPage,
    /// What etcd (or the gRPC client) answered.
    #[error(transparent)]
    Etcd(#[from] etcd_client::Error),
}

/// Reads every key under `prefix/` and hands each key and value to `each`, in key order;
/// returns the revision the read was made at.
///
/// In pages of up to 5,000 keys, every page at the revision of the first, so what
/// `each` sees is one consistent state whatever its size (a watch from the revision plus one
/// misses nothing). One read of everything would be one gRPC message, and a client refuses
/// messages over 4 MiB: about 25,000 members with their alive keys. Pages are large because
/// etcd walks every key of the remaining range for each page, limit or not: 50,000 members
/// read in 20 pages rather than 100. A page still over the limit (long values) is asked for
/// again at a quarter of the size, and the size grows back after. `timeout` bounds each page.
pub async fn read_prefix(
    client: &mut Client,
    prefix: &str,
    timeout: Duration,
    mut each: impl FnMut(&[u8], &[u8]),
) -> Result<i64, ReadError> {
    let prefix = prefix.trim_end_matches('/');
    // The end of the range: the prefix's last byte (`/`) plus one.
    let end = format!("{prefix}0");
    let mut key = format!("{prefix}/").into_bytes();
    let mut revision = 0;
    let mut page = LOAD_PAGE;
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(page);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let read = tokio::time::timeout(timeout, client.get(key.clone(), Some(options)))
            .await
            .map_err(|_| ReadError::TimedOut(timeout))?;
        let mut resp = match read {
            Ok(r) => r,
            Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::OutOfRange => {
                if s.message().contains("compacted") {
                    return Err(ReadError::Compacted);
                }
                if s.message().contains("too large") && page > 1 {
                    page = (page / 4).max(1);
                    continue;
                }
                return Err(etcd_client::Error::GRpcStatus(s).into());
            }
            Err(e) => return Err(e.into()),
        };
        // Every page's header carries the store's current revision; the first page's is the
        // one the whole read is pinned to.
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        let kvs = resp.take_kvs();
        for kv in &kvs {
            each(kv.key(), kv.value());
        }
        match kvs.last() {
            Some(last) if resp.more() => {
                // The next page starts just after the last key read.
                let mut next = last.key().to_vec();
                next.push(0);
                key = next;
                page = (page * 2).min(LOAD_PAGE);
            }
            None if resp.more() => return Err(ReadError::EmptyPage),
            _ => return Ok(revision),
        }
    }
}

/// The key of member `addr`'s liveness under `prefix`.
pub fn alive_key(prefix: &str, addr: LogicAddr) -> String {
    format!("{}/alive/{addr}", prefix.trim_end_matches('/'))
}

/// What one key under the prefix is.
#[derive(Debug, PartialEq)]
enum Key {
    Member(LogicAddr),
    Alive(LogicAddr),
    Other,
}

fn classify(prefix: &str, key: &[u8]) -> Key {
    let Ok(key) = std::str::from_utf8(key) else {
        return Key::Other;
    };
    let Some(rest) = key.strip_prefix(prefix.trim_end_matches('/')) else {
        return Key::Other;
    };
    let parse = |s: &str| s.parse::<LogicAddr>().ok();
    if let Some(a) = rest.strip_prefix("/members/").and_then(parse) {
        Key::Member(a)
    } else if let Some(a) = rest.strip_prefix("/alive/").and_then(parse) {
        Key::Alive(a)
    } else {
        Key::Other
    }
}

/// Decodes a member value; the key's address must match the value's.
fn decode(addr: LogicAddr, value: &[u8]) -> Result<Member, String> {
    let m: Member = serde_json::from_slice(value).map_err(|e| e.to_string())?;
    if m.addr != addr {
        return Err(format!(
            "the value names {} but the key names {addr}",
            m.addr
        ));
    }
    Ok(m)
}

/// Encodes a member value.
pub fn encode(member: &Member) -> String {
    // Plain strings and bools always serialise.
    serde_json::to_string(member).expect("member serialises")
}

/// The configured members and the alive set, as last read from etcd.
#[derive(Debug, Default)]
struct State {
    members: BTreeMap<LogicAddr, Member>,
    alive: BTreeSet<LogicAddr>,
}

impl State {
    fn effective(&self, addr: LogicAddr) -> Option<Member> {
        let mut m = self.members.get(&addr)?.clone();
        m.available &= self.alive.contains(&addr);
        Some(m)
    }

    fn snapshot(&self) -> Vec<Member> {
        self.members
            .keys()
            .filter_map(|a| self.effective(*a))
            .collect()
    }

    fn apply_put(&mut self, prefix: &str, key: &[u8], value: &[u8]) -> Option<LogicAddr> {
        match classify(prefix, key) {
            Key::Member(addr) => match decode(addr, value) {
                Ok(m) => {
                    self.members.insert(addr, m);
                    Some(addr)
                }
                Err(reason) => {
                    tracing::warn!(key = %String::from_utf8_lossy(key), reason, "malformed member value in etcd; skipped");
                    // A member whose value turned bad is gone until it is fixed.
                    self.members.remove(&addr).map(|_| addr)
                }
            },
            Key::Alive(addr) => self.alive.insert(addr).then_some(addr),
            Key::Other => None,
        }
    }

    fn apply_delete(&mut self, prefix: &str, key: &[u8]) -> Option<LogicAddr> {
        match classify(prefix, key) {
            Key::Member(addr) => self.members.remove(&addr).map(|_| addr),
            Key::Alive(addr) => self.alive.remove(&addr).then_some(addr),
            Key::Other => None,
        }
    }
}

fn failed(endpoints: &[String], what: &str, e: impl std::fmt::Display) -> DiscoveryError {
    DiscoveryError::Unavailable {
        source_name: format!("etcd {}", endpoints.join(",")),
        reason: format!("{what}: {e}"),
    }
}

impl EtcdDiscovery {
    /// A source reading `prefix` from the etcd cluster at `endpoints` (`http://host:port`).
    /// Nothing connects until a node subscribes.
    pub fn connect(
        endpoints: impl IntoIterator<Item = impl Into<String>>,
        prefix: impl Into<String>,
        options: EtcdOptions,
    ) -> Self {
        EtcdDiscovery {
            inner: Inner::new(endpoints, prefix, options),
            center: None,
        }
    }

    /// Also reads harbors from a separate etcd endpoint/prefix, the "harbors center" of a
    /// multi-cluster deployment: every cluster lists its harbors there (same key layout), so a
    /// harbor sees every other cluster's harbors without reading their stores. A member listed
    /// in this source's own prefix wins over the center; non-harbor entries of the center are
    /// ignored. A harbor node using this source also keeps its alive key in the center.
    #[must_use]
    pub fn with_harbors_center(
        mut self,
        endpoints: impl IntoIterator<Item = impl Into<String>>,
        prefix: impl Into<String>,
    ) -> Self {
        self.center = Some(Inner::new(endpoints, prefix, self.inner.options.clone()));
        self
    }

    /// The prefix, without a trailing `/`.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// Claims the lowest free server id of `cluster.node_type` (from 1 up; `node_type` 255 for
    /// a harbor) and lists the node there, at `net_addr`, under a lease of its own (see the
    /// module docs). Returns the address to build the node with; build it with this same
    /// source (or a clone) and start it within the lease TTL, so the node's liveness follows
    /// the claimed lease. The lease is renewed from here on; a node that stops releases it.
    ///
    /// Errors: [`DiscoveryError::Claim`] when the cluster or type is invalid, every id is
    /// taken, or the claim kept losing races; [`DiscoveryError::Unavailable`] when etcd
    /// cannot be reached.
    pub async fn claim(
        &self,
        cluster: u16,
        node_type: u8,
        net_addr: impl Into<String>,
        export: bool,
    ) -> Result<LogicAddr, DiscoveryError> {
        if node_type == HARBOR_TYPE && self.center.is_some() {
            return Err(DiscoveryError::Claim {
                cluster,
                node_type,
                reason: "a harbor listed in a harbors center needs a fixed address".into(),
            });
        }
        self.inner
            .claim(cluster, node_type, net_addr.into(), export)
            .await
    }
}

impl Inner {
    fn new(
        endpoints: impl IntoIterator<Item = impl Into<String>>,
        prefix: impl Into<String>,
        options: EtcdOptions,
    ) -> Arc<Self> {
        Arc::new(Inner {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: prefix.into().trim_end_matches('/').to_owned(),
            options,
            leases: Mutex::new(Default::default()),
            resyncs: AtomicU64::new(0),
            reports: Mutex::new(None),
        })
    }

    async fn client(&self) -> Result<Client, DiscoveryError> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(self.options.request_timeout)
            .with_keep_alive(Duration::from_secs(2), self.options.request_timeout)
            .with_keep_alive_while_idle(true);
        tokio::time::timeout(
            self.options.request_timeout,
            Client::connect(&self.endpoints, Some(opts)),
        )
        .await
        .map_err(|_| failed(&self.endpoints, "connect", "timed out"))?
        .map_err(|e| failed(&self.endpoints, "connect", e))
    }

    async fn timed<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, DiscoveryError> {
        tokio::time::timeout(self.options.request_timeout, fut)
            .await
            .map_err(|_| failed(&self.endpoints, what, "timed out"))?
            .map_err(|e| failed(&self.endpoints, what, e))
    }

    fn next_backoff(&self, b: Duration) -> Duration {
        let min = self.options.backoff_min.max(Duration::from_millis(1));
        if b.is_zero() {
            min
        } else {
            (b * 2).clamp(min, self.options.backoff_max.max(min))
        }
    }

    /// Reads the whole prefix ([`read_prefix`]); returns the state and the revision it was
    /// read at. A revision compacted between two pages ends the read as a compaction ends a
    /// watch: it starts again at once.
    async fn load(&self, client: &mut Client) -> Result<(State, i64), WatchEnd> {
        let mut state = State::default();
        let read = read_prefix(
            client,
            &self.prefix,
            self.options.request_timeout,
            |k, v| {
                state.apply_put(&self.prefix, k, v);
            },
        )
        .await;
        match read {
            Ok(revision) => Ok((state, revision)),
            Err(ReadError::Compacted) => Err(WatchEnd::Reset { progressed: true }),
            Err(e) => Err(failed(&self.endpoints, "get", e).into()),
        }
    }

    /// Feeds `tx` until the merger drops its end.
    async fn watch_loop(self: Arc<Self>, tx: SourceTx) {
        let mut backoff = Duration::ZERO;
        let mut last_error: Option<String> = None;
        // Whether membership was ever read: before that there is nothing to keep.
        let mut loaded = false;
        loop {
            let reason = match self.watch_once(&tx, &mut last_error, &mut loaded).await {
                Ok(()) => return, // the node went away
                Err(WatchEnd::Reset { progressed }) => {
                    // Read again soon after a compaction; a watch that etcd keeps cancelling
                    // before it delivered anything (a permanent reason) backs off like a
                    // failure, rather than re-reading the prefix every 100 ms forever.
                    backoff = if progressed {
                        self.next_backoff(Duration::ZERO)
                    } else {
                        self.next_backoff(backoff)
                    };
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = tx.closed() => return,
                    }
                    continue;
                }
                Err(WatchEnd::Failed(e)) => e,
            };
            if last_error.as_deref() != Some(&reason.to_string()) {
                if loaded {
                    tracing::warn!(error = %reason, "etcd membership unavailable; keeping the last known membership");
                } else {
                    tracing::warn!(error = %reason, "etcd membership unavailable; none read yet");
                }
                last_error = Some(reason.to_string());
                // The node reports it; a closed channel means nobody listens any more.
                if tx.send(Err(reason)).await.is_err() {
                    return;
                }
            }
            backoff = self.next_backoff(backoff);
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = tx.closed() => return,
            }
        }
    }

    async fn watch_once(
        &self,
        tx: &SourceTx,
        last_error: &mut Option<String>,
        loaded: &mut bool,
    ) -> Result<(), WatchEnd> {
        let mut client = self.client().await?;
        let (mut state, revision) = self.load(&mut client).await?;
        if *loaded {
            // A full read after the first: the watch broke or was cancelled.
            self.resyncs.fetch_add(1, Ordering::Relaxed);
        }
        *loaded = true;
        if last_error.take().is_some() {
            tracing::info!("etcd membership available again");
        }
        let all = state.snapshot().into_iter().map(|m| (m.addr, m)).collect();
        if tx.send(Ok(SourceMsg::Reset(all))).await.is_err() {
            return Ok(());
        }
        let mut watch = self
            .timed(
                "watch",
                client.watch(
                    format!("{}/", self.prefix),
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(revision + 1),
                    ),
                ),
            )
            .await?;
        // Whether this watch delivered anything before it ended.
        let mut progressed = false;
        loop {
            let msg = tokio::select! {
                m = watch.message() => m,
                _ = tx.closed() => return Ok(()),
            };
            let resp = match msg {
                Ok(Some(r)) => r,
                Ok(None) => return Err(WatchEnd::Failed(failed(&[], "watch", "stream ended"))),
                Err(e) => return Err(WatchEnd::Failed(failed(&self.endpoints, "watch", e))),
            };
            if resp.canceled() || resp.compact_revision() > 0 {
                static CANCELLED: crate::gate::LogGate = crate::gate::LogGate::new();
                if let Some(held) = CANCELLED.pass() {
                    tracing::info!(
                        reason = resp.cancel_reason(),
                        held_back = held,
                        "etcd watch cancelled; reading membership again"
                    );
                }
                return Err(WatchEnd::Reset { progressed });
            }
            progressed = true;
            let mut touched = BTreeSet::new();
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let changed = match ev.event_type() {
                    EventType::Put => state.apply_put(&self.prefix, kv.key(), kv.value()),
                    EventType::Delete => state.apply_delete(&self.prefix, kv.key()),
                };
                touched.extend(changed);
            }
            let changed: Vec<_> = touched
                .into_iter()
                .map(|addr| (addr, state.effective(addr)))
                .collect();
            if !changed.is_empty() && tx.send(Ok(SourceMsg::Changed(changed))).await.is_err() {
                return Ok(());
            }
        }
    }

    /// Holds `me`'s alive key on one lease, renewed every third of its TTL; a lost lease (etcd
    /// down longer than the TTL) is replaced by a new one when etcd is back.
    async fn keep_alive(self: Arc<Self>, me: LogicAddr) {
        let ttl = self.options.lease_ttl.as_secs().max(1) as i64;
        let mut backoff = Duration::ZERO;
        // A node (re)starting on this source is alive again.
        let claim = {
            let mut slots = self.slots();
            let slot = slots.entry(me).or_default();
            slot.left = false;
            slot.claim.clone()
        };
        // A claimed id lives on its own lease, renewed since the claim: the node is alive
        // until that lease is lost, and then it must stop (this future ends).
        if let Some(claim) = claim {
            let put = async {
                let mut client = self.client().await?;
                self.put_alive(&mut client, me, claim.lease).await
            };
            tokio::select! {
                r = put => if let Err(e) = r {
                    // Not alive, so not picked; the lease (and the id) stay held. A node that
                    // cannot reach etcd for a TTL loses the claim and stops.
                    tracing::warn!(node = %me, error = %e, "could not put the alive key of the claimed id");
                },
                () = claim.lost.cancelled() => return,
            }
            claim.lost.cancelled().await;
            return;
        }
        loop {
            match self.hold_lease(me, ttl).await {
                Ok(()) => backoff = Duration::ZERO,
                Err(_) if self.slots().get(&me).is_some_and(|s| s.left) => return,
                Err(e) => {
                    // A retry that never held a lease (etcd still down) loses nothing more.
                    {
                        let mut slots = self.slots();
                        let slot = slots.entry(me).or_default();
                        if std::mem::take(&mut slot.held) {
                            slot.lost += 1;
                        }
                    }
                    tracing::warn!(node = %me, error = %e, "liveness lease lost; renewing");
                    backoff = self.next_backoff(backoff);
                }
            }
            tokio::time::sleep(backoff).await;
        }
    }

    async fn claim(
        self: &Arc<Self>,
        cluster: u16,
        node_type: u8,
        net_addr: String,
        export: bool,
    ) -> Result<LogicAddr, DiscoveryError> {
        let refuse = |reason: String| DiscoveryError::Claim {
            cluster,
            node_type,
            reason,
        };
        let addr_of = |server: u16| {
            if node_type == HARBOR_TYPE {
                LogicAddr::harbor(cluster, server)
            } else {
                LogicAddr::new(cluster, node_type, server)
            }
            .map_err(|e| refuse(e.to_string()))
        };
        addr_of(1)?;
        let ttl = self.options.lease_ttl.as_secs().max(1) as i64;
        let mut client = self.client().await?;
        let granted_at = tokio::time::Instant::now();
        let granted = self
            .timed("lease grant", client.lease_grant(ttl, None))
            .await?;
        let lease = granted.id();
        // What etcd granted (it may raise a TTL below its minimum), counted from the request.
        let ttl = Duration::from_secs(granted.ttl().max(1) as u64);
        let dir = format!("{}/members/{cluster}.{node_type}.", self.prefix);
        let alive_dir = format!("{}/alive/{cluster}.{node_type}.", self.prefix);
        let mut claimed = Err(refuse(format!(
            "{CLAIM_ROUNDS} rounds lost races with other claims"
        )));
        for _ in 0..CLAIM_ROUNDS {
            // Taken: a member entry, or an alive key without one (a node still running under
            // that id after its entry was removed).
            let mut taken = BTreeSet::new();
            let mut failed = None;
            for d in [&dir, &alive_dir] {
                let listed = self
                    .timed(
                        "get taken ids",
                        client.get(
                            d.as_str(),
                            Some(GetOptions::new().with_prefix().with_keys_only()),
                        ),
                    )
                    .await;
                match listed {
                    Ok(r) => taken.extend(r.kvs().iter().filter_map(|kv| {
                        std::str::from_utf8(kv.key())
                            .ok()?
                            .strip_prefix(d.as_str())?
                            .parse::<u16>()
                            .ok()
                    })),
                    Err(e) => failed = Some(e),
                }
            }
            if let Some(e) = failed {
                claimed = Err(e);
                break;
            }
            let Some(server) = (1..=MAX_SERVER).find(|s| !taken.contains(s)) else {
                claimed = Err(refuse(format!("every server id 1..={MAX_SERVER} is taken")));
                break;
            };
            let addr = addr_of(server)?;
            let member = Member::new(addr, net_addr.clone()).with_export(export);
            let key = member_key(&self.prefix, addr);
            // The member entry only: the node is picked once it has started and put its alive
            // key (on this same lease), not before.
            let txn = Txn::new()
                .when([
                    Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                    Compare::create_revision(alive_key(&self.prefix, addr), CompareOp::Equal, 0),
                ])
                .and_then([TxnOp::put(
                    key,
                    encode(&member),
                    Some(PutOptions::new().with_lease(lease)),
                )]);
            match self.timed("claim", client.txn(txn)).await {
                Ok(r) if r.succeeded() => {
                    claimed = Ok(addr);
                    break;
                }
                // Another node took that id between the read and the write: read again.
                Ok(_) => continue,
                Err(e) => {
                    claimed = Err(e);
                    break;
                }
            }
        }
        let addr = match claimed {
            Ok(a) => a,
            Err(e) => {
                let _ = self.timed("lease revoke", client.lease_revoke(lease)).await;
                return Err(e);
            }
        };
        let claim = Arc::new(Claim {
            lease,
            ttl,
            granted_at,
            lost: CancellationToken::new(),
            released: CancellationToken::new(),
        });
        {
            let mut slots = self.slots();
            let slot = slots.entry(addr).or_default();
            *slot = LeaseSlot {
                lost: slot.lost,
                held: true,
                claim: Some(claim.clone()),
                ..LeaseSlot::default()
            };
        }
        tracing::info!(node = %addr, %net_addr, "claimed server id under its own lease");
        let span = tracing::info_span!("membership", source = "etcd", task = "claim", node = %addr);
        crate::task::spawn_untracked(span, self.clone().renew_claim(addr, claim, client));
        Ok(addr)
    }

    /// Renews a claimed lease every third of its TTL until it is released, or until it must be
    /// taken as lost: etcd said it expired, or no renewal can have reached etcd in time. etcd
    /// expires a lease one TTL after it processed the last renewal, which is after that
    /// renewal was sent; so the lease surely lives until `sent + TTL` of the last renewal
    /// answered, and every attempt must finish before that instant minus a margin. When one
    /// cannot, the node stops while etcd may still hold the lease — before another node could
    /// claim the id.
    async fn renew_claim(self: Arc<Self>, me: LogicAddr, claim: Arc<Claim>, mut client: Client) {
        let ttl = claim.ttl;
        let every = (ttl / 3).max(Duration::from_millis(300));
        let margin = (ttl / 5).max(Duration::from_millis(200));
        // The lease lives at least until this instant.
        let mut lives_until = claim.granted_at + ttl;
        let mut keeper = None;
        let why = loop {
            let must_end = lives_until.checked_sub(margin).unwrap_or(lives_until);
            if tokio::time::Instant::now() >= must_end {
                break format!("no renewal was answered in time (TTL {ttl:?})");
            }
            let sent = tokio::time::Instant::now();
            let renewed = async {
                if keeper.is_none() {
                    keeper = Some(client.lease_keep_alive(claim.lease).await?);
                }
                let Some((k, responses)) = keeper.as_mut() else {
                    unreachable!("set above")
                };
                k.keep_alive().await?;
                let resp = responses.message().await?;
                Ok::<_, etcd_client::Error>(resp.map(|r| r.ttl()))
            };
            let pause = tokio::select! {
                r = tokio::time::timeout_at(must_end, renewed) => match r {
                    Ok(Ok(Some(t))) if t > 0 => {
                        lives_until = sent + ttl;
                        every
                    }
                    Ok(Ok(Some(_))) => break "etcd says the lease expired".to_owned(),
                    other => {
                        keeper = None;
                        let error = match other {
                            Ok(Err(e)) => e.to_string(),
                            Ok(Ok(None)) => "the keep-alive stream ended".into(),
                            _ => "timed out".into(),
                        };
                        tracing::warn!(node = %me, %error, "cannot renew the claimed server id's lease; retrying");
                        if let Ok(Ok(c)) = tokio::time::timeout_at(must_end, self.client()).await {
                            client = c;
                        }
                        Duration::from_millis(100)
                    }
                },
                () = claim.released.cancelled() => return,
            };
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = claim.released.cancelled() => return,
            }
        };
        tracing::error!(node = %me, reason = %why, "the claimed server id's lease is lost; the id may be given to another node, so this node stops");
        {
            let mut slots = self.slots();
            let slot = slots.entry(me).or_default();
            if std::mem::take(&mut slot.held) {
                slot.lost += 1;
            }
        }
        claim.lost.cancel();
    }

    /// Ends a claimed id's lease at once: its member entry and alive key go with it.
    async fn release(self: Arc<Self>, me: LogicAddr) {
        let claim = {
            let mut slots = self.slots();
            let slot = slots.entry(me).or_default();
            slot.held = false;
            slot.claim.take()
        };
        let Some(claim) = claim else { return };
        claim.released.cancel();
        let revoked = async {
            let mut client = self.client().await?;
            self.timed("lease revoke", client.lease_revoke(claim.lease))
                .await
        };
        match revoked.await {
            Ok(_) => tracing::info!(node = %me, "claimed server id released"),
            Err(e) => {
                tracing::warn!(node = %me, error = %e, "could not revoke the claimed id's lease; it expires by itself")
            }
        }
    }

    /// Writes `me`'s drain progress into its alive key, keeping the key's lease. Nothing is
    /// written when the key is gone (the node left or its lease is being renewed).
    async fn report_drain(self: Arc<Self>, me: LogicAddr, progress: DrainProgress) {
        let value = progress.to_json();
        let key = alive_key(&self.prefix, me);
        let written = async {
            // One client for the reports of a drain (a new one only after a failure).
            let cached = self
                .reports
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let mut client = match cached {
                Some(c) => c,
                None => self.client().await?,
            };
            *self.reports.lock().unwrap_or_else(|e| e.into_inner()) = Some(client.clone());
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Greater, 0)])
                .and_then([TxnOp::put(
                    key.clone(),
                    value,
                    Some(PutOptions::new().with_ignore_lease()),
                )]);
            self.timed("put drain progress", client.txn(txn)).await
        };
        if let Err(e) = written.await {
            *self.reports.lock().unwrap_or_else(|e| e.into_inner()) = None;
            tracing::debug!(node = %me, error = %e, "drain progress not written");
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<LogicAddr, LeaseSlot>> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn hold_lease(&self, me: LogicAddr, ttl: i64) -> Result<(), DiscoveryError> {
        let mut client = self.client().await?;
        let lease = self
            .timed("lease grant", client.lease_grant(ttl, None))
            .await?
            .id();
        let left = {
            let mut slots = self.slots();
            let slot = slots.entry(me).or_default();
            if !slot.left {
                slot.lease = Some((lease, client.clone()));
            }
            slot.left
        };
        if left {
            // `leave` ran while this lease was being granted: it must not make the node alive.
            let _ = self.timed("lease revoke", client.lease_revoke(lease)).await;
            return Err(failed(&self.endpoints, "lease grant", "the node has left"));
        }
        self.put_alive(&mut client, me, lease).await?;
        // Held from here until this function returns (the lease lost, or the node gone).
        self.slots().entry(me).or_default().held = true;
        let (mut keeper, mut responses) = self
            .timed("lease keep-alive", client.lease_keep_alive(lease))
            .await?;
        let every = Duration::from_millis((ttl as u64 * 1000 / 3).max(300));
        for renewal in 1u64.. {
            // Once a TTL: an operator (or a script) may have deleted the key while the lease
            // lives; the node is still running, so it is put back.
            if renewal % 3 == 0 {
                let key = alive_key(&self.prefix, me);
                let found = self
                    .timed(
                        "get alive key",
                        client.get(key, Some(GetOptions::new().with_count_only())),
                    )
                    .await?
                    .count();
                if found == 0 {
                    tracing::warn!(node = %me, "this node's alive key was deleted while it runs; putting it back");
                    self.put_alive(&mut client, me, lease).await?;
                }
            }
            self.timed("lease keep-alive", keeper.keep_alive()).await?;
            let resp = self
                .timed("lease keep-alive", responses.message())
                .await?
                .ok_or_else(|| failed(&self.endpoints, "lease keep-alive", "stream ended"))?;
            if resp.ttl() <= 0 {
                return Err(failed(
                    &self.endpoints,
                    "lease keep-alive",
                    "the lease expired",
                ));
            }
            tokio::time::sleep(every).await;
        }
        Ok(())
    }

    async fn put_alive(
        &self,
        client: &mut Client,
        me: LogicAddr,
        lease: i64,
    ) -> Result<(), DiscoveryError> {
        self.timed(
            "put alive key",
            client.put(
                alive_key(&self.prefix, me),
                "1",
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await?;
        Ok(())
    }
}

/// What one etcd source tells the merger.
enum SourceMsg {
    /// Everything, after a (re)connect: effective members by address.
    Reset(BTreeMap<LogicAddr, Member>),
    /// Members that changed (`None`: gone).
    Changed(Vec<(LogicAddr, Option<Member>)>),
}

type SourceTx = mpsc::Sender<Result<SourceMsg, DiscoveryError>>;

/// Combines the cluster's source with the harbors center: a member listed in the cluster's
/// prefix wins; a harbor listed only in the center is taken from there.
struct Merger {
    main: Option<BTreeMap<LogicAddr, Member>>,
    center: BTreeMap<LogicAddr, Member>,
    /// Clusters the cluster's own source has ever listed a member of: the center never speaks
    /// for them.
    own: BTreeSet<u16>,
}

impl Merger {
    /// The merged member: the cluster's own entry, else a harbor of *another* cluster from
    /// the center (a cluster's own store is authoritative for its own harbors, so removing one
    /// there removes it even while the center still lists it).
    fn get(&self, addr: LogicAddr) -> Option<Member> {
        let main = self.main.as_ref()?;
        if let Some(m) = main.get(&addr) {
            return Some(m.clone());
        }
        if addr.is_harbor() && !self.own.contains(&addr.cluster()) {
            return self.center.get(&addr).cloned();
        }
        None
    }

    fn snapshot(&self) -> Vec<Member> {
        let mut addrs: BTreeSet<LogicAddr> =
            self.main.iter().flat_map(|m| m.keys().copied()).collect();
        addrs.extend(self.center.keys().filter(|a| a.is_harbor()));
        addrs.into_iter().filter_map(|a| self.get(a)).collect()
    }

    /// Applies one source's message; returns the events for the node.
    fn apply(&mut self, from_center: bool, msg: SourceMsg) -> Vec<MembershipEvent> {
        match msg {
            SourceMsg::Reset(all) => {
                if from_center {
                    self.center = all;
                } else {
                    self.own.extend(all.keys().map(|a| a.cluster()));
                    self.main = Some(all);
                }
                // Nothing goes out before the cluster's own first snapshot.
                match self.main {
                    Some(_) => vec![MembershipEvent::Snapshot(self.snapshot())],
                    None => vec![],
                }
            }
            SourceMsg::Changed(list) => {
                let mut out = Vec::new();
                for (addr, m) in list {
                    let before = self.get(addr);
                    let map = if from_center {
                        &mut self.center
                    } else {
                        match self.main.as_mut() {
                            Some(m) => m,
                            None => continue,
                        }
                    };
                    match m {
                        Some(m) => map.insert(addr, m),
                        None => map.remove(&addr),
                    };
                    if !from_center {
                        self.own.insert(addr.cluster());
                    }
                    let after = self.get(addr);
                    if self.main.is_some() && before != after {
                        out.push(match after {
                            Some(m) => MembershipEvent::Upsert(m),
                            None => MembershipEvent::Remove(addr),
                        });
                    }
                }
                out
            }
        }
    }
}

async fn merge(
    mut main: mpsc::Receiver<Result<SourceMsg, DiscoveryError>>,
    mut center: Option<mpsc::Receiver<Result<SourceMsg, DiscoveryError>>>,
    tx: mpsc::Sender<Result<MembershipEvent, DiscoveryError>>,
) {
    let mut merger = Merger {
        main: None,
        center: BTreeMap::new(),
        own: BTreeSet::new(),
    };
    loop {
        let (from_center, item) = tokio::select! {
            m = main.recv() => match m {
                Some(m) => (false, m),
                None => return,
            },
            Some(c) = async { match center.as_mut() { Some(rx) => rx.recv().await, None => None } } => (true, c),
            _ = tx.closed() => return,
        };
        let events = match item {
            Ok(msg) => merger.apply(from_center, msg).into_iter().map(Ok).collect(),
            // Before the cluster's own first snapshot, a center failure must not look like
            // a failure of the node's membership (a node would refuse to start on it).
            Err(e) if from_center && merger.main.is_none() => {
                tracing::warn!(error = %e, "harbors center unavailable; starting from the cluster's own membership");
                vec![]
            }
            Err(e) => vec![Err(e)],
        };
        for e in events {
            if tx.send(e).await.is_err() {
                return;
            }
        }
        if center.as_ref().is_some_and(|c| c.is_closed()) {
            center = None;
        }
    }
}

#[derive(Default)]
struct LeaseSlot {
    lease: Option<(i64, Client)>,
    left: bool,
    /// The alive key is up on a kept lease now.
    held: bool,
    /// Leases lost after they were held.
    lost: u64,
    /// The node's server id was claimed under this lease ([`EtcdDiscovery::claim`]).
    claim: Option<Arc<Claim>>,
}

/// A server id claimed under its own lease.
struct Claim {
    lease: i64,
    /// The TTL etcd granted.
    ttl: Duration,
    /// When the grant was asked for: the lease lives at least until this plus `ttl`.
    granted_at: tokio::time::Instant,
    /// Cancelled when the lease is lost: the id may be someone else's now.
    lost: CancellationToken,
    /// Cancelled by `release`: renewing stops (the lease is being revoked).
    released: CancellationToken,
}

enum WatchEnd {
    /// Read everything again (the watch was cancelled, e.g. by compaction); `progressed`:
    /// the watch delivered changes before that.
    Reset {
        progressed: bool,
    },
    Failed(DiscoveryError),
}

impl From<DiscoveryError> for WatchEnd {
    fn from(e: DiscoveryError) -> Self {
        WatchEnd::Failed(e)
    }
}

impl Discovery for EtcdDiscovery {
    fn health(&self, me: LogicAddr) -> crate::membership::DiscoveryHealth {
        let sources = std::iter::once(&self.inner).chain(self.center.as_ref());
        let mut h = crate::membership::DiscoveryHealth {
            leases_held: Some(0),
            ..Default::default()
        };
        for s in sources {
            h.resyncs += s.resyncs.load(Ordering::Relaxed);
            if let Some(slot) = s.slots().get(&me) {
                h.leases_lost += slot.lost;
                h.leases_held = h.leases_held.map(|n| n + u64::from(slot.held));
            }
        }
        h
    }

    fn subscribe(&self) -> MembershipStream {
        let cap = self.inner.options.channel.max(1);
        let (tx, rx) = mpsc::channel(cap);
        let (main_tx, main_rx) = mpsc::channel(cap);
        // A node subscribes from `start`, on its runtime. Each task ends when the node drops
        // the stream: the merger sees `tx` closed, the watchers then see theirs closed.
        let span = |task: &'static str| tracing::info_span!("membership", source = "etcd", task);
        crate::task::spawn_untracked(span("watch"), self.inner.clone().watch_loop(main_tx));
        let center_rx = self.center.as_ref().map(|center| {
            let (c_tx, c_rx) = mpsc::channel(cap);
            crate::task::spawn_untracked(span("watch-center"), center.clone().watch_loop(c_tx));
            c_rx
        });
        crate::task::spawn_untracked(span("merge"), merge(main_rx, center_rx, tx));
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    fn keep_alive(&self, me: LogicAddr) -> Option<BoxFuture> {
        let main = self.inner.clone().keep_alive(me);
        match (&self.center, me.is_harbor()) {
            (Some(center), true) => {
                let center = center.clone().keep_alive(me);
                Some(Box::pin(async move {
                    tokio::join!(main, center);
                }))
            }
            _ => Some(Box::pin(main)),
        }
    }

    fn release(&self, me: LogicAddr) -> BoxFuture {
        Box::pin(self.inner.clone().release(me))
    }

    fn report_drain(&self, me: LogicAddr, progress: DrainProgress) -> BoxFuture {
        Box::pin(self.inner.clone().report_drain(me, progress))
    }

    fn leave(&self, me: LogicAddr) -> BoxFuture {
        let main = self.inner.clone().leave(me);
        match (&self.center, me.is_harbor()) {
            (Some(center), true) => {
                let center = center.clone().leave(me);
                Box::pin(async move {
                    tokio::join!(main, center);
                })
            }
            _ => Box::pin(main),
        }
    }
}

impl Inner {
    /// Revokes the lease held for `me`, if any.
    async fn leave(self: Arc<Self>, me: LogicAddr) {
        let held = {
            let mut slots = self.slots();
            let slot = slots.entry(me).or_default();
            slot.left = true;
            if slot.claim.is_some() {
                None
            } else {
                slot.held = false;
                slot.lease.take()
            }
        };
        let claim = self.slots().get(&me).and_then(|s| s.claim.clone());
        if let Some(claim) = claim {
            if claim.lost.is_cancelled() {
                // The id may be another node's now: nothing under it is touched.
                return;
            }
            // A claimed id keeps its lease (and so its member entry, which peers need to keep
            // their links) until `release`; only the alive key goes, so it is not picked. Only
            // while it is on this node's lease: never another node's key.
            let gone = async {
                let mut client = self.client().await?;
                let key = alive_key(&self.prefix, me);
                let txn = Txn::new()
                    .when([Compare::lease(key.clone(), CompareOp::Equal, claim.lease)])
                    .and_then([TxnOp::delete(key, None)]);
                self.timed("delete alive key", client.txn(txn)).await
            };
            match gone.await {
                Ok(_) => {
                    tracing::info!(node = %me, "alive key deleted; the claimed id is kept until the node has stopped")
                }
                Err(e) => tracing::warn!(node = %me, error = %e, "could not delete the alive key"),
            }
            return;
        }
        if let Some((lease, mut client)) = held {
            match self.timed("lease revoke", client.lease_revoke(lease)).await {
                Ok(_) => tracing::info!(node = %me, "liveness lease revoked"),
                Err(e) => {
                    tracing::warn!(node = %me, error = %e, "could not revoke the liveness lease; it expires by itself")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> LogicAddr {
        s.parse().unwrap()
    }

    #[test]
    fn keys_and_values() {
        assert_eq!(member_key("/cg/", a("1.2.1")), "/cg/members/1.2.1");
        assert_eq!(
            classify("/cg", b"/cg/members/1.2.1"),
            Key::Member(a("1.2.1"))
        );
        assert_eq!(classify("/cg", b"/cg/alive/1.2.1"), Key::Alive(a("1.2.1")));
        assert_eq!(classify("/cg", b"/cg/members/x"), Key::Other);
        assert_eq!(classify("/cg", b"/other/members/1.2.1"), Key::Other);
        let m = Member::new(a("1.2.1"), "127.0.0.1:1").with_export(true);
        assert_eq!(decode(a("1.2.1"), encode(&m).as_bytes()).unwrap(), m);
        assert!(
            decode(a("1.2.2"), encode(&m).as_bytes())
                .unwrap_err()
                .contains("names 1.2.1")
        );
        assert!(decode(a("1.2.1"), b"{not json").is_err());
    }

    #[test]
    fn the_center_speaks_only_for_other_clusters_harbors() {
        let mut m = Merger {
            main: None,
            center: BTreeMap::new(),
            own: BTreeSet::new(),
        };
        let member = |s: &str| (a(s), Member::new(a(s), "h:1"));
        // Nothing before the cluster's own snapshot.
        let center: BTreeMap<_, _> = [member("1.255.1"), member("2.255.1"), member("2.1.1")].into();
        assert!(m.apply(true, SourceMsg::Reset(center)).is_empty());
        let main: BTreeMap<_, _> = [member("1.1.1"), member("1.255.1")].into();
        let MembershipEvent::Snapshot(all) = m.apply(false, SourceMsg::Reset(main)).remove(0)
        else {
            panic!("a snapshot")
        };
        let addrs: Vec<String> = all.iter().map(|m| m.addr.to_string()).collect();
        assert_eq!(addrs, ["1.1.1", "1.255.1", "2.255.1"]);
        // Removing the own harbor from the cluster's store removes it, center or not.
        let ev = m.apply(false, SourceMsg::Changed(vec![(a("1.255.1"), None)]));
        assert_eq!(ev, vec![MembershipEvent::Remove(a("1.255.1"))]);
        // Another cluster's harbor leaving the center is removed.
        let ev = m.apply(true, SourceMsg::Changed(vec![(a("2.255.1"), None)]));
        assert_eq!(ev, vec![MembershipEvent::Remove(a("2.255.1"))]);
    }

    #[test]
    fn availability_needs_the_alive_key() {
        let mut s = State::default();
        let v = encode(&Member::new(a("1.2.1"), "h:1"));
        s.apply_put("/p", b"/p/members/1.2.1", v.as_bytes());
        assert!(!s.effective(a("1.2.1")).unwrap().available);
        s.apply_put("/p", b"/p/alive/1.2.1", b"1");
        assert!(s.effective(a("1.2.1")).unwrap().available);
        s.apply_delete("/p", b"/p/alive/1.2.1");
        assert!(!s.effective(a("1.2.1")).unwrap().available);
        // A malformed value is skipped and removes nothing else.
        s.apply_put("/p", b"/p/members/1.2.2", b"garbage");
        assert_eq!(s.snapshot().len(), 1);
    }
}
