//! A node's view of membership: the members it may see, and the selection indexes.

use std::collections::HashMap;

use super::{Member, visible};
use crate::addr::LogicAddr;

/// What one node sees. Rebuilt on every change; changes are rare next to lookups.
#[derive(Debug, Default, Clone)]
pub(crate) struct View {
    members: HashMap<LogicAddr, Member>,
    /// Available, non-harbor nodes by type, sorted by address.
    by_type: HashMap<u8, Vec<LogicAddr>>,
    /// Available harbors by cluster, sorted by address.
    harbors: HashMap<u16, Vec<LogicAddr>>,
}

/// What applying an event did to one member.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Change {
    Added,
    Removed,
    NetAddrChanged,
    FlagsChanged,
}

impl View {
    pub(crate) fn new(viewer: LogicAddr, members: impl IntoIterator<Item = Member>) -> Self {
        let mut v = View::default();
        for m in members {
            if visible(viewer, &m) {
                v.members.insert(m.addr, m);
            }
        }
        v.reindex();
        v
    }

    fn reindex(&mut self) {
        self.by_type.clear();
        self.harbors.clear();
        for m in self.members.values() {
            if m.available && m.addr.is_harbor() {
                self.harbors
                    .entry(m.addr.cluster())
                    .or_default()
                    .push(m.addr);
            }
            if m.available && !m.addr.is_harbor() {
                self.by_type
                    .entry(m.addr.node_type())
                    .or_default()
                    .push(m.addr);
            }
        }
        for list in self.by_type.values_mut() {
            list.sort_unstable();
        }
        for list in self.harbors.values_mut() {
            list.sort_unstable();
        }
    }

    /// The available harbor of `cluster` that `key` maps to by rendezvous hashing, passing over
    /// harbors `avoid` rejects while another one is left.
    pub(crate) fn pick_harbor(
        &self,
        cluster: u16,
        key: u64,
        avoid: &dyn Fn(LogicAddr) -> bool,
    ) -> Option<LogicAddr> {
        let list = self.harbors.get(&cluster)?;
        let best = |ok: &dyn Fn(&LogicAddr) -> bool| {
            list.iter()
                .copied()
                .filter(|a| ok(a))
                .max_by_key(|a| score(key, *a))
        };
        best(&|a| !avoid(*a)).or_else(|| best(&|_| true))
    }

    /// Whether `addr` is an available harbor of `cluster`.
    pub(crate) fn has_harbor(&self, cluster: u16, addr: LogicAddr) -> bool {
        self.harbors
            .get(&cluster)
            .is_some_and(|l| l.binary_search(&addr).is_ok())
    }

    pub(crate) fn get(&self, addr: LogicAddr) -> Option<&Member> {
        self.members.get(&addr)
    }

    pub(crate) fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    /// Every address whose entry differs between `self` and `next`, with what changed.
    pub(crate) fn changes(&self, next: &View) -> Vec<(LogicAddr, Change)> {
        let mut out = Vec::new();
        for (addr, old) in &self.members {
            match next.members.get(addr) {
                None => out.push((*addr, Change::Removed)),
                Some(new) if new.net_addr != old.net_addr => {
                    out.push((*addr, Change::NetAddrChanged))
                }
                Some(new) if new != old => out.push((*addr, Change::FlagsChanged)),
                Some(_) => {}
            }
        }
        for addr in next.members.keys() {
            if !self.members.contains_key(addr) {
                out.push((*addr, Change::Added));
            }
        }
        out
    }

    /// The view after an upsert (a member not visible to `viewer` is dropped from it).
    /// Puts `m` into the view in place (or takes it out, if `viewer` may not see it); the
    /// change it makes, if any. The cost is a map insert and a sorted insert into one index
    /// list, whatever the size of the view: a change to one member of 50,000 must not cost
    /// a copy of the other 49,999.
    pub(crate) fn upsert(&mut self, viewer: LogicAddr, m: Member) -> Option<(LogicAddr, Change)> {
        let addr = m.addr;
        if !visible(viewer, &m) {
            return self.remove(addr);
        }
        let change = match self.members.get(&addr) {
            None => Change::Added,
            Some(old) if old.net_addr != m.net_addr => Change::NetAddrChanged,
            Some(old) if *old != m => Change::FlagsChanged,
            Some(_) => return None,
        };
        self.unindex(addr);
        if m.available {
            let list = self.index_of(addr);
            if let Err(at) = list.binary_search(&addr) {
                list.insert(at, addr);
            }
        }
        self.members.insert(addr, m);
        Some((addr, change))
    }

    /// Takes `addr` out of the view in place; `Removed` if it was in.
    pub(crate) fn remove(&mut self, addr: LogicAddr) -> Option<(LogicAddr, Change)> {
        self.members.remove(&addr)?;
        self.unindex(addr);
        Some((addr, Change::Removed))
    }

    /// The selection list `addr` belongs in when available.
    fn index_of(&mut self, addr: LogicAddr) -> &mut Vec<LogicAddr> {
        if addr.is_harbor() {
            self.harbors.entry(addr.cluster()).or_default()
        } else {
            self.by_type.entry(addr.node_type()).or_default()
        }
    }

    fn unindex(&mut self, addr: LogicAddr) {
        let list = self.index_of(addr);
        if let Ok(at) = list.binary_search(&addr) {
            list.remove(at);
        }
        if list.is_empty() {
            if addr.is_harbor() {
                self.harbors.remove(&addr.cluster());
            } else {
                self.by_type.remove(&addr.node_type());
            }
        }
    }

    /// The available members of `node_type` (not harbors), in address order.
    pub(crate) fn of_type(&self, node_type: u8) -> &[LogicAddr] {
        self.by_type.get(&node_type).map_or(&[], Vec::as_slice)
    }

    pub(crate) fn pick_random(&self, node_type: u8) -> Option<LogicAddr> {
        let list = self.by_type.get(&node_type)?;
        (!list.is_empty()).then(|| list[fastrand::usize(..list.len())])
    }

    /// The node of `node_type` that `key` maps to by rendezvous hashing: the same key gets the
    /// same node while the set holds, and when a node leaves only its keys move.
    pub(crate) fn pick_sticky(&self, node_type: u8, key: u64) -> Option<LogicAddr> {
        self.by_type
            .get(&node_type)?
            .iter()
            .copied()
            .max_by_key(|a| score(key, *a))
    }
}

pub(crate) use crate::rendezvous::score;

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> LogicAddr {
        s.parse().unwrap()
    }

    #[test]
    fn visibility_same_cluster_export_or_harbor_pair() {
        let me = a("1.1.1");
        let v = View::new(
            me,
            [
                Member::new(a("1.2.1"), "h:1"),
                Member::new(a("2.2.1"), "h:2"),
                Member::new(a("2.2.2"), "h:3").with_export(true),
                Member::new(a("2.255.1"), "h:4"),
            ],
        );
        assert!(v.get(a("1.2.1")).is_some());
        assert!(v.get(a("2.2.1")).is_none());
        assert!(v.get(a("2.2.2")).is_some());
        assert!(v.get(a("2.255.1")).is_none());
        let harbor = View::new(a("1.255.1"), [Member::new(a("2.255.1"), "h:4")]);
        assert!(harbor.get(a("2.255.1")).is_some());
    }

    #[test]
    fn selection_skips_unavailable_and_harbors() {
        let me = a("1.1.1");
        let v = View::new(
            me,
            [
                Member::new(a("1.2.1"), "h:1").with_available(false),
                Member::new(a("1.2.2"), "h:2"),
                Member::new(a("1.255.1"), "h:3"),
            ],
        );
        for _ in 0..50 {
            assert_eq!(v.pick_random(2), Some(a("1.2.2")));
        }
        assert_eq!(v.pick_random(255), None);
        assert_eq!(v.pick_random(3), None);
    }

    #[test]
    fn sticky_pick_is_stable_and_moves_only_removed_keys() {
        let me = a("1.1.1");
        let all: Vec<_> = (1..=5)
            .map(|s| Member::new(LogicAddr::new(1, 2, s).unwrap(), "h:1"))
            .collect();
        let v = View::new(me, all.clone());
        let before: Vec<_> = (0..1000u64).map(|k| v.pick_sticky(2, k).unwrap()).collect();
        assert_eq!(
            before,
            (0..1000u64)
                .map(|k| v.pick_sticky(2, k).unwrap())
                .collect::<Vec<_>>()
        );
        let gone = a("1.2.3");
        let mut v2 = v.clone();
        assert_eq!(v2.remove(gone), Some((gone, Change::Removed)));
        for (k, was) in before.iter().enumerate() {
            let now = v2.pick_sticky(2, k as u64).unwrap();
            if *was != gone {
                assert_eq!(now, *was, "key {k} moved although its node stayed");
            }
        }
        // Spread: every node gets some keys.
        for m in &all {
            assert!(before.contains(&m.addr));
        }
    }

    /// Changes applied in place give the view and indexes a rebuild would, and say what they
    /// changed as `changes` between the two views does.
    #[test]
    fn changes_in_place_match_a_rebuild() {
        let me = a("1.1.1");
        let mut rng = fastrand::Rng::with_seed(7);
        let mut truth: std::collections::BTreeMap<LogicAddr, Member> = Default::default();
        let mut v = View::new(me, []);
        for step in 0..5_000 {
            let cluster = rng.u16(1..=3);
            let server = rng.u16(1..=6);
            let addr = if rng.u8(0..5) == 0 {
                LogicAddr::harbor(cluster, server).unwrap()
            } else {
                LogicAddr::new(cluster, rng.u8(1..=3), server).unwrap()
            };
            let before = v.clone();
            let said = if rng.u8(0..4) == 0 {
                truth.remove(&addr);
                v.remove(addr)
            } else {
                let m = Member::new(addr, format!("h:{}", rng.u8(0..3)))
                    .with_available(rng.bool())
                    .with_export(rng.bool());
                truth.insert(addr, m.clone());
                v.upsert(me, m)
            };
            let rebuilt = View::new(me, truth.values().cloned());
            assert_eq!(v.members, rebuilt.members, "step {step}");
            assert_eq!(v.by_type, rebuilt.by_type, "step {step}");
            assert_eq!(v.harbors, rebuilt.harbors, "step {step}");
            assert_eq!(
                said.into_iter().collect::<Vec<_>>(),
                before.changes(&rebuilt),
                "step {step}"
            );
        }
    }
}
