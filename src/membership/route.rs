//! The path a message takes between two nodes, worked out from membership alone: what the
//! operator CLI's `route` explains, by the rule the nodes route by.
//!
//! Same node: local. Same cluster: a direct link. Other cluster: the sender's cluster's harbor,
//! then the target cluster's harbor, then the target (a harbor sender skips the first hop).
//! Among the available harbors of a cluster the one chosen is fixed by rendezvous hashing on
//! the pair of addresses, so it is the same on every node (and both ways) while the harbor set
//! holds, and only pairs of a harbor that leaves move.

use std::fmt;

use super::Member;
use super::view::score;
use crate::addr::LogicAddr;

/// One step of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Hop {
    /// Delivered inside the node itself.
    Local(LogicAddr),
    /// A link from `from` to `to`.
    Link {
        /// Sending node.
        from: LogicAddr,
        /// Receiving node.
        to: LogicAddr,
        /// The receiver's network address.
        net_addr: String,
    },
}

impl fmt::Display for Hop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hop::Local(a) => write!(f, "{a}: local delivery, no network hop"),
            Hop::Link { from, to, net_addr } => {
                let role = |a: &LogicAddr| if a.is_harbor() { "harbor " } else { "" };
                write!(f, "{}{from} -> {}{to} ({net_addr})", role(from), role(to))
            }
        }
    }
}

/// Works out the hops from `from` to `to` over `members` (effective availability: configured
/// and alive). The error says why there is no route.
pub fn route(from: LogicAddr, to: LogicAddr, members: &[Member]) -> Result<Vec<Hop>, String> {
    let find = |a: LogicAddr| members.iter().find(|m| m.addr == a);
    if find(from).is_none() {
        return Err(format!("{from} is not in membership"));
    }
    let target = find(to).ok_or_else(|| format!("{to} is not in membership"))?;
    if from == to {
        return Ok(vec![Hop::Local(from)]);
    }
    let link = |from: LogicAddr, m: &Member| Hop::Link {
        from,
        to: m.addr,
        net_addr: m.net_addr.clone(),
    };
    if from.cluster() == to.cluster() {
        return Ok(vec![link(from, target)]);
    }
    let harbor = |cluster: u16| {
        members
            .iter()
            .filter(|m| m.addr.is_harbor() && m.addr.cluster() == cluster && m.available)
            .max_by_key(|m| score(crate::router::route_key(from, to), m.addr))
            .ok_or_else(|| format!("no route: no available harbor in cluster {cluster}"))
    };
    let mut hops = Vec::new();
    let mut at = from;
    if !from.is_harbor() {
        let h = harbor(from.cluster())?;
        hops.push(link(at, h));
        at = h.addr;
    }
    // A harbor target is linked to directly from a harbor, as the router does.
    if !to.is_harbor() {
        let h = harbor(to.cluster())?;
        if h.addr != to {
            hops.push(link(at, h));
            at = h.addr;
        }
    }
    if at != to {
        hops.push(link(at, target));
    }
    Ok(hops)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> LogicAddr {
        s.parse().unwrap()
    }

    fn members() -> Vec<Member> {
        vec![
            Member::new(a("1.1.1"), "h:1"),
            Member::new(a("1.1.2"), "h:2"),
            Member::new(a("1.255.1"), "h:3"),
            Member::new(a("1.255.2"), "h:4").with_available(false),
            Member::new(a("2.1.1"), "h:5").with_export(true),
            Member::new(a("2.255.1"), "h:6"),
            Member::new(a("3.1.1"), "h:7"),
        ]
    }

    #[test]
    fn routes() {
        let m = members();
        assert_eq!(
            route(a("1.1.1"), a("1.1.1"), &m).unwrap(),
            vec![Hop::Local(a("1.1.1"))]
        );
        let direct = route(a("1.1.1"), a("1.1.2"), &m).unwrap();
        assert_eq!(direct.len(), 1);
        assert_eq!(direct[0].to_string(), "1.1.1 -> 1.1.2 (h:2)");
        let cross = route(a("1.1.1"), a("2.1.1"), &m).unwrap();
        let text: Vec<String> = cross.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "1.1.1 -> harbor 1.255.1 (h:3)",
                "harbor 1.255.1 -> harbor 2.255.1 (h:6)",
                "harbor 2.255.1 -> 2.1.1 (h:5)"
            ]
        );
        // From a harbor: no first hop. To a harbor: no last hop.
        assert_eq!(route(a("1.255.1"), a("2.1.1"), &m).unwrap().len(), 2);
        assert_eq!(route(a("1.1.1"), a("2.255.1"), &m).unwrap().len(), 2);
        assert_eq!(
            route(a("1.1.1"), a("3.1.1"), &m).unwrap_err(),
            "no route: no available harbor in cluster 3"
        );
        assert_eq!(
            route(a("1.1.1"), a("9.1.1"), &m).unwrap_err(),
            "9.1.1 is not in membership"
        );
    }

    #[test]
    fn a_harbor_target_is_reached_from_a_harbor_directly() {
        let hops = route(a("2.1.1"), a("1.255.1"), &members()).unwrap();
        let pairs: Vec<_> = hops
            .iter()
            .map(|h| match h {
                Hop::Link { from, to, .. } => (from.to_string(), to.to_string()),
                Hop::Local(a) => (a.to_string(), a.to_string()),
            })
            .collect();
        assert_eq!(
            pairs,
            [
                ("2.1.1".into(), "2.255.1".into()),
                ("2.255.1".into(), "1.255.1".into())
            ]
        );
    }

    #[test]
    fn harbor_choice_is_sticky_per_destination() {
        let mut m = members();
        m.push(Member::new(a("2.255.2"), "h:8"));
        m.push(Member::new(a("2.255.3"), "h:9"));
        let first = route(a("1.1.1"), a("2.1.1"), &m).unwrap();
        for _ in 0..10 {
            assert_eq!(route(a("1.1.1"), a("2.1.1"), &m).unwrap(), first);
        }
    }
}
