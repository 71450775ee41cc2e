//! Turns a watched membership map into a [`MembershipStream`]: a snapshot, then the
//! differences between successive states, in address order.
//!
//! A level-based watch never blocks the writer and holds no queue: a subscriber that falls
//! behind sees the latest state as one set of changes, never a backlog.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use tokio::sync::watch;

use super::{Member, MembershipEvent, MembershipStream};
use crate::addr::LogicAddr;
use crate::error::DiscoveryError;

pub(crate) type Members = Arc<BTreeMap<LogicAddr, Member>>;

/// A state and an optional error to report once with it.
#[derive(Debug, Clone, Default)]
pub(crate) struct State {
    pub(crate) members: Members,
    pub(crate) error: Option<(u64, DiscoveryError)>,
}

pub(crate) fn stream(mut rx: watch::Receiver<State>) -> MembershipStream {
    let first = rx.borrow_and_update().clone();
    let mut queue: VecDeque<Result<MembershipEvent, DiscoveryError>> = VecDeque::new();
    queue.push_back(Ok(MembershipEvent::Snapshot(
        first.members.values().cloned().collect(),
    )));
    let seen_error = first.error.as_ref().map(|(n, _)| *n);
    if let Some((_, e)) = first.error {
        queue.push_back(Err(e));
    }
    let state = (rx, first.members, seen_error, queue);
    Box::pin(futures_util::stream::unfold(
        state,
        |(mut rx, mut prev, mut seen_error, mut queue)| async move {
            loop {
                if let Some(item) = queue.pop_front() {
                    return Some((item, (rx, prev, seen_error, queue)));
                }
                if rx.changed().await.is_err() {
                    return None;
                }
                let next = rx.borrow_and_update().clone();
                diff(&prev, &next.members, &mut queue);
                prev = next.members;
                if let Some((n, e)) = next.error {
                    if seen_error != Some(n) {
                        seen_error = Some(n);
                        queue.push_back(Err(e));
                    }
                }
            }
        },
    ))
}

fn diff(
    old: &BTreeMap<LogicAddr, Member>,
    new: &BTreeMap<LogicAddr, Member>,
    out: &mut VecDeque<Result<MembershipEvent, DiscoveryError>>,
) {
    for addr in old.keys() {
        if !new.contains_key(addr) {
            out.push_back(Ok(MembershipEvent::Remove(*addr)));
        }
    }
    for (addr, m) in new {
        if old.get(addr) != Some(m) {
            out.push_back(Ok(MembershipEvent::Upsert(m.clone())));
        }
    }
}
