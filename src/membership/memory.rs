//! In-memory membership, changed at run time: the test harness and the embedded default.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

use super::watch::{self as level, State};
use super::{Discovery, Member, MembershipStream};
use crate::addr::LogicAddr;

/// Membership held in memory and shared by every node that subscribes to it (clone the
/// handle). Changes reach subscribers in order; none of the mutators blocks.
///
/// ```
/// use clustergo::{LogicAddr, Member, MemoryDiscovery};
/// let a: LogicAddr = "1.1.1".parse().unwrap();
/// let members = MemoryDiscovery::new([Member::new(a, "127.0.0.1:9001")]);
/// members.set_available(a, false);
/// assert!(!members.get(a).unwrap().available);
/// ```
#[derive(Clone, Debug)]
pub struct MemoryDiscovery {
    tx: Arc<watch::Sender<State>>,
}

impl Default for MemoryDiscovery {
    fn default() -> Self {
        Self::new([])
    }
}

impl MemoryDiscovery {
    /// Membership holding `members` (a later entry for the same address wins).
    pub fn new(members: impl IntoIterator<Item = Member>) -> Self {
        let map: BTreeMap<_, _> = members.into_iter().map(|m| (m.addr, m)).collect();
        let (tx, _) = watch::channel(State {
            members: Arc::new(map),
            error: None,
        });
        MemoryDiscovery { tx: Arc::new(tx) }
    }

    fn modify<R>(&self, f: impl FnOnce(&mut BTreeMap<LogicAddr, Member>) -> R) -> R {
        let mut out = None;
        self.tx.send_modify(|state| {
            out = Some(f(Arc::make_mut(&mut state.members)));
        });
        // send_modify always runs the closure.
        out.expect("modify closure ran")
    }

    /// Adds a member, or replaces the one with the same address.
    pub fn upsert(&self, member: Member) {
        self.modify(|m| m.insert(member.addr, member));
    }

    /// Removes a member; returns it if it was there.
    pub fn remove(&self, addr: LogicAddr) -> Option<Member> {
        self.modify(|m| m.remove(&addr))
    }

    /// Sets `available` of a member; false if there is no such member.
    pub fn set_available(&self, addr: LogicAddr, available: bool) -> bool {
        self.modify(|m| m.get_mut(&addr).map(|e| e.available = available).is_some())
    }

    /// Sets `export` of a member; false if there is no such member.
    pub fn set_export(&self, addr: LogicAddr, export: bool) -> bool {
        self.modify(|m| m.get_mut(&addr).map(|e| e.export = export).is_some())
    }

    /// Sets the network address of a member; false if there is no such member.
    pub fn set_net_addr(&self, addr: LogicAddr, net_addr: impl Into<String>) -> bool {
        let net_addr = net_addr.into();
        self.modify(|m| m.get_mut(&addr).map(|e| e.net_addr = net_addr).is_some())
    }

    /// One member.
    pub fn get(&self, addr: LogicAddr) -> Option<Member> {
        self.tx.borrow().members.get(&addr).cloned()
    }

    /// Every member, in address order.
    pub fn members(&self) -> Vec<Member> {
        self.tx.borrow().members.values().cloned().collect()
    }
}

impl Discovery for MemoryDiscovery {
    fn subscribe(&self) -> MembershipStream {
        level::stream(self.tx.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::MembershipEvent;
    use tokio_stream::StreamExt;

    fn a(s: &str) -> LogicAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn snapshot_then_ordered_changes() {
        let d = MemoryDiscovery::new([Member::new(a("1.1.1"), "127.0.0.1:1")]);
        let mut s = d.subscribe();
        let first = s.next().await.unwrap().unwrap();
        assert_eq!(
            first,
            MembershipEvent::Snapshot(vec![Member::new(a("1.1.1"), "127.0.0.1:1")])
        );
        d.upsert(Member::new(a("1.1.2"), "127.0.0.1:2"));
        assert_eq!(
            s.next().await.unwrap().unwrap(),
            MembershipEvent::Upsert(Member::new(a("1.1.2"), "127.0.0.1:2"))
        );
        d.remove(a("1.1.1"));
        assert_eq!(
            s.next().await.unwrap().unwrap(),
            MembershipEvent::Remove(a("1.1.1"))
        );
        assert!(d.set_available(a("1.1.2"), false));
        let MembershipEvent::Upsert(m) = s.next().await.unwrap().unwrap() else {
            panic!("expected an upsert")
        };
        assert!(!m.available);
        assert!(!d.set_export(a("9.9.9"), true));
    }

    #[tokio::test]
    async fn empty_membership_still_yields_a_snapshot() {
        let d = MemoryDiscovery::default();
        let first = d.subscribe().next().await.unwrap().unwrap();
        assert_eq!(first, MembershipEvent::Snapshot(vec![]));
    }
}
