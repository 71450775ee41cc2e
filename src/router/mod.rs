//! Routing: the next hop of an envelope, and the tower layer that forwards by it.
//!
//! Same cluster: a direct link. Other cluster: from an ordinary node, a harbor of its own
//! cluster; from a harbor, a harbor of the target's cluster (or the target itself when it is a
//! harbor). The harbor of a cluster is picked by rendezvous hashing on the destination, so the
//! choice is the same on every node and sticky while the harbor set holds; harbors whose link
//! just failed are passed over while another is available (failover). Every forward counts a
//! hop and [`MAX_HOPS`] bounds every path, so inconsistent membership can never make traffic
//! circle.
//!
//! The forwarding a harbor does is [`Route`], a tower `Service<Envelope>` built by
//! [`RouteLayer`] over the service that hands an envelope to a neighbour.

mod layer;
pub(crate) mod relays;
pub mod route;
mod service;
pub(crate) mod stack;

use crate::addr::LogicAddr;
use crate::membership::view::View;

pub(crate) use layer::RouteLayer;
pub(crate) use service::{BoxError, Routes};

/// Forwards an envelope may take: sender's harbor, target's harbor, target is two; two more
/// leave room for a harbor that is also the target, never for a loop.
pub(crate) const MAX_HOPS: u32 = 4;

/// Where an envelope goes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NextHop {
    /// The destination itself, over a direct link.
    Direct(LogicAddr),
    /// A harbor on the way.
    Harbor(LogicAddr),
}

impl NextHop {
    pub(crate) fn addr(self) -> LogicAddr {
        match self {
            NextHop::Direct(a) | NextHop::Harbor(a) => a,
        }
    }
}

/// Why an envelope cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RouteError {
    /// No next hop.
    #[error("{at} has no route to {to}: {reason}")]
    NoRoute {
        /// The node that found no route.
        at: LogicAddr,
        /// The destination.
        to: LogicAddr,
        /// Why.
        reason: String,
    },
    /// The envelope took more forwards than any path needs.
    #[error(
        "{at} dropped an envelope for {to} after {hops} hops (limit {MAX_HOPS}): a routing loop"
    )]
    HopLimit {
        /// The node that stopped it.
        at: LogicAddr,
        /// The destination.
        to: LogicAddr,
        /// Hops taken.
        hops: u32,
    },
}

/// The key a harbor is picked by for an envelope between `a` and `b`: the unordered pair, so
/// both directions — a call and its answer, a stream's two sides — cross the same harbors
/// (each harbor on the way then sees answers go by, and can end both sides of a stream), and
/// everything one node sends another takes one path, in order.
pub(crate) fn route_key(a: LogicAddr, b: LogicAddr) -> u64 {
    crate::rendezvous::pair_key(a, b)
}

/// The next hop from `me` to `to` over `view`, picking harbors by `key` (see [`route_key`]) and
/// passing over harbors `avoid` rejects while another one is available.
pub(crate) fn next_hop(
    me: LogicAddr,
    to: LogicAddr,
    key: u64,
    view: &View,
    avoid: &dyn Fn(LogicAddr) -> bool,
) -> Result<NextHop, RouteError> {
    if to.cluster() == me.cluster() || (me.is_harbor() && to.is_harbor()) {
        return Ok(NextHop::Direct(to));
    }
    // The harbor's cluster: the target's for a harbor, the sender's own otherwise.
    let cluster = if me.is_harbor() {
        to.cluster()
    } else {
        me.cluster()
    };
    view.pick_harbor(cluster, key, avoid)
        .map(NextHop::Harbor)
        .ok_or_else(|| RouteError::NoRoute {
            at: me,
            to,
            reason: format!("no available harbor in cluster {cluster}"),
        })
}

/// Keeps every active pair of nodes on the harbor it took: rendezvous hashing would move a
/// pair when a harbor joins (or comes back), while its older envelopes are still on the old
/// path, and the newer ones could overtake them. A pair keeps its harbor until it has gone
/// unused across two sweeps (a sweep runs at most every [`StickyPaths::IDLE`], checked every
/// 1,024 routing decisions, so the clock is not read per envelope), or that harbor stops
/// being an available harbor of the cluster, or its link failed moments ago; then the pair
/// is routed afresh. Bounded: at most [`StickyPaths::MAX_PAIRS`] pairs are remembered (beyond, a pair
/// is routed by hashing alone).
#[derive(Debug, Default)]
pub(crate) struct StickyPaths {
    /// Sharded by pair, so link readers routing different pairs rarely meet on a lock.
    shards: [std::sync::Mutex<Sticky>; 16],
}

#[derive(Debug, Default)]
struct Sticky {
    /// Pair key → (its harbor, used since the last sweep).
    paths: crate::hash::FastMap<u64, (LogicAddr, bool)>,
    picks: u32,
    swept: Option<std::time::Instant>,
}

impl StickyPaths {
    /// How long a pair must be idle before it may move to another harbor: far longer than an
    /// envelope stays on a path.
    pub(crate) const IDLE: std::time::Duration = std::time::Duration::from_secs(2);
    /// Pairs remembered at most (in all shards).
    pub(crate) const MAX_PAIRS: usize = 100_000;

    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, Sticky> {
        // The pair key's two addresses mixed, so neighbouring keys spread over the shards.
        let mixed = (key ^ (key >> 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let i = (mixed >> 60) as usize;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The harbor for pair `key` in `cluster`: the one it used, while `keep` says that harbor
    /// is still usable, else `fresh()` (remembered for next time).
    pub(crate) fn pick(
        &self,
        key: u64,
        keep: impl Fn(LogicAddr) -> bool,
        fresh: impl FnOnce() -> Result<NextHop, RouteError>,
    ) -> Result<NextHop, RouteError> {
        let mut s = self.shard(key);
        s.picks = s.picks.wrapping_add(1);
        // The clock is read once in a thousand picks, not per envelope.
        if s.picks % 1024 == 0 {
            let now = std::time::Instant::now();
            if s.swept.is_none_or(|t| now.duration_since(t) >= Self::IDLE) {
                s.swept = Some(now);
                s.paths.retain(|_, (_, used)| std::mem::take(used));
            }
        }
        if let Some((h, used)) = s.paths.get_mut(&key)
            && keep(*h)
        {
            *used = true;
            return Ok(NextHop::Harbor(*h));
        }
        let hop = fresh()?;
        if let NextHop::Harbor(h) = hop
            && (s.paths.len() < Self::MAX_PAIRS / 16 || s.paths.contains_key(&key))
        {
            s.paths.insert(key, (h, true));
        }
        Ok(hop)
    }

    /// Forgets every pair (idle ones go at the next sweep anyway).
    #[cfg(test)]
    fn sweep_now(&self) {
        for shard in &self.shards {
            let mut s = shard.lock().unwrap_or_else(|e| e.into_inner());
            s.paths.retain(|_, (_, used)| std::mem::take(used));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::Member;

    fn a(s: &str) -> LogicAddr {
        s.parse().unwrap()
    }

    fn k(s: &str) -> u64 {
        u64::from(a(s).as_u32())
    }

    fn view(me: &str, members: &[&str]) -> View {
        View::new(
            a(me),
            members.iter().map(|m| Member::new(a(m), "127.0.0.1:1")),
        )
    }

    const ALL: &[&str] = &["1.1.1", "1.255.1", "1.255.2", "2.1.1", "2.255.1", "2.255.2"];

    #[test]
    fn same_cluster_is_direct_other_clusters_go_through_harbors() {
        let none = |_| false;
        let v = view("2.1.1", ALL);
        assert_eq!(
            next_hop(a("2.1.1"), a("2.1.9"), k("2.1.9"), &v, &none),
            Ok(NextHop::Direct(a("2.1.9")))
        );
        let hop = next_hop(a("2.1.1"), a("1.1.1"), k("1.1.1"), &v, &none).unwrap();
        assert!(
            matches!(hop, NextHop::Harbor(h) if h.cluster() == 2 && h.is_harbor()),
            "{hop:?}"
        );
        // A harbor sends to the target cluster's harbor, or straight to a harbor target.
        let hv = view("2.255.1", ALL);
        let hop = next_hop(a("2.255.1"), a("1.1.1"), k("1.1.1"), &hv, &none).unwrap();
        assert!(
            matches!(hop, NextHop::Harbor(h) if h.cluster() == 1),
            "{hop:?}"
        );
        assert_eq!(
            next_hop(a("2.255.1"), a("1.255.2"), k("1.255.2"), &hv, &none),
            Ok(NextHop::Direct(a("1.255.2")))
        );
    }

    #[test]
    fn the_harbor_choice_is_sticky_and_fails_over() {
        let v = view("2.1.1", ALL);
        let none = |_| false;
        let first = next_hop(a("2.1.1"), a("1.1.1"), k("1.1.1"), &v, &none)
            .unwrap()
            .addr();
        for _ in 0..10 {
            assert_eq!(
                next_hop(a("2.1.1"), a("1.1.1"), k("1.1.1"), &v, &none)
                    .unwrap()
                    .addr(),
                first
            );
        }
        // Destinations spread over both harbors.
        let used: std::collections::HashSet<_> = (1..64)
            .map(|s| {
                let to = LogicAddr::new(1, 1, s).unwrap();
                next_hop(a("2.1.1"), to, u64::from(to.as_u32()), &v, &none)
                    .unwrap()
                    .addr()
            })
            .collect();
        assert_eq!(used.len(), 2);
        // The chosen harbor is avoided while another is left; with none left it is used.
        let other = next_hop(a("2.1.1"), a("1.1.1"), k("1.1.1"), &v, &|h| h == first)
            .unwrap()
            .addr();
        assert_ne!(other, first);
        let all_down = next_hop(a("2.1.1"), a("1.1.1"), k("1.1.1"), &v, &|_| true)
            .unwrap()
            .addr();
        assert_eq!(all_down, first);
    }

    #[test]
    fn both_directions_take_the_same_harbors() {
        let v2 = view("2.1.1", ALL);
        let v1 = view("1.1.1", ALL);
        let hv2 = view("2.255.1", ALL);
        let hv1 = view("1.255.1", ALL);
        let none = |_| false;
        for s in 1..32 {
            let (x, y) = (a("2.1.1"), LogicAddr::new(1, 1, s).unwrap());
            let key = route_key(x, y);
            assert_eq!(key, route_key(y, x));
            let h2 = next_hop(x, y, key, &v2, &none).unwrap().addr();
            let h1 = next_hop(h2, y, key, &hv2, &none).unwrap().addr();
            // Back: the target's harbor is the same one, and so is the opener's.
            assert_eq!(next_hop(y, x, key, &v1, &none).unwrap().addr(), h1);
            assert_eq!(next_hop(h1, x, key, &hv1, &none).unwrap().addr(), h2);
        }
    }

    #[test]
    fn no_harbor_is_a_named_error() {
        let v = view("2.1.1", &["2.1.1", "1.1.1", "1.255.1"]);
        let e = next_hop(a("2.1.1"), a("1.1.1"), k("1.1.1"), &v, &|_| false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "2.1.1 has no route to 1.1.1: no available harbor in cluster 2"
        );
        let hv = view("2.255.1", &["2.255.1", "2.1.1"]);
        let e = next_hop(a("2.255.1"), a("1.1.1"), k("1.1.1"), &hv, &|_| false).unwrap_err();
        assert!(
            e.to_string().ends_with("no available harbor in cluster 1"),
            "{e}"
        );
    }

    #[test]
    fn an_active_pair_keeps_its_harbor_when_another_joins_and_moves_when_idle_or_lost() {
        let paths = StickyPaths::default();
        let (h1, h2) = (a("1.255.1"), a("1.255.2"));
        let fresh = |h: LogicAddr| move || Ok(NextHop::Harbor(h));
        assert_eq!(paths.pick(7, |_| true, fresh(h1)), Ok(NextHop::Harbor(h1)));
        // A harbor joined and hashing now says h2: the active pair stays.
        assert_eq!(paths.pick(7, |_| true, fresh(h2)), Ok(NextHop::Harbor(h1)));
        // Idle across two sweeps: it may move.
        paths.sweep_now();
        paths.sweep_now();
        assert_eq!(paths.pick(7, |_| true, fresh(h2)), Ok(NextHop::Harbor(h2)));
        // Its harbor is no longer usable: it moves at once.
        assert_eq!(
            paths.pick(7, |h| h != h2, fresh(h1)),
            Ok(NextHop::Harbor(h1))
        );
        // Used between sweeps: it stays.
        paths.sweep_now();
        assert_eq!(paths.pick(7, |_| true, fresh(h2)), Ok(NextHop::Harbor(h1)));
        paths.sweep_now();
        assert_eq!(paths.pick(7, |_| true, fresh(h2)), Ok(NextHop::Harbor(h1)));
    }
}
