//! The path a message takes between two nodes, worked out from membership alone: what the
//! operator CLI's `route` explains, by the rule the nodes route by.
//!
//! Same node: local. Same cluster: a direct link. Other cluster: the sender's cluster's harbor,
//! then the target cluster's harbor, then the target (a harbor sender skips the first hop).
//! Each step is `router::next_hop`, the function nodes and harbors route by.
//! Among the available harbors of a cluster the one chosen is fixed by rendezvous hashing on
//! the pair of addresses, so it is the same on every node (and both ways) while the harbor set
//! holds, and only pairs of a harbor that leaves move.

use std::fmt;

use crate::addr::LogicAddr;
use crate::membership::Member;
use crate::membership::view::View;

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
    find(to).ok_or_else(|| format!("{to} is not in membership"))?;
    if from == to {
        return Ok(vec![Hop::Local(from)]);
    }
    let link = |from: LogicAddr, m: &Member| Hop::Link {
        from,
        to: m.addr,
        net_addr: m.net_addr.clone(),
    };
    // Hop by hop, by the very rule every node routes by (`router::next_hop`), each step over
    // the membership as that node sees it.
    let key = crate::router::route_key(from, to);
    let mut hops = Vec::new();
    let mut at = from;
    while at != to {
        if hops.len() as u32 >= crate::router::MAX_HOPS {
            return Err(format!(
                "no route: more than {} hops",
                crate::router::MAX_HOPS
            ));
        }
        let view = View::new(at, members.iter().cloned());
        let next = crate::router::next_hop(at, to, key, &view, &|_| false)
            .map_err(|e| match e {
                crate::router::RouteError::NoRoute { reason, .. } => format!("no route: {reason}"),
                other => other.to_string(),
            })?
            .addr();
        let m = find(next).ok_or_else(|| format!("no route: {next} is not in membership"))?;
        hops.push(link(at, m));
        at = next;
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
