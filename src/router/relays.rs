//! A harbor's bookkeeping of what it relays: calls waiting for their answers (so an answer
//! goes back the way its request came, a lost link answers its callers, and shutdown drains
//! them), and streams relayed between other nodes (so a lost link ends them at their other
//! end).
//!
//! [`Relays`] only keeps the books: it says what must be done (who to answer, which streams
//! to reset and over which neighbour) and the node does it, so no lock here is held while
//! anything is sent.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::addr::LogicAddr;
use crate::hash::FastMap;
use crate::proto::{Envelope, envelope::Body};

/// A harbor's relayed calls and streams.
#[derive(Debug)]
pub(crate) struct Relays {
    calls: Mutex<RelayTable>,
    /// When `calls` was last swept of expired entries.
    swept: Mutex<Option<Instant>>,
    streams: Mutex<FastMap<(u32, u64), StreamRelay>>,
    /// Signalled when a relayed call ends (answered, bounced, expired).
    changed: Notify,
    call_limit: usize,
    stream_limit: usize,
}

/// A relayed stream whose link on one side was lost: its other end is told, over `tell`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StreamLost {
    /// The neighbour toward the end that is still reachable.
    pub(crate) tell: LogicAddr,
    /// The close goes from `from` (the lost end, as if it had sent it) to `to`.
    pub(crate) from: u32,
    pub(crate) to: u32,
    pub(crate) id: u64,
    pub(crate) to_opener: bool,
}

/// Why a stream open passing through was not noted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StreamsFull;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing here panics while holding a lock; if it ever did, the data is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Relays {
    /// Books for at most `call_limit` relayed calls and `stream_limit` relayed streams.
    pub(crate) fn new(call_limit: usize, stream_limit: usize) -> Relays {
        Relays {
            calls: Mutex::new(RelayTable::default()),
            swept: Mutex::new(None),
            streams: Mutex::new(FastMap::default()),
            changed: Notify::new(),
            call_limit,
            stream_limit,
        }
    }

    /// Remembers a relayed request in flight toward `via` until `until`. Bounded: expired
    /// entries are swept when the table is full, and past its limit (or past its caller's
    /// share) a request is not tracked: its answer then takes the current route, and its caller
    /// learns of a failed link at its own deadline.
    pub(crate) fn track(
        &self,
        key: (u32, u64),
        via: LogicAddr,
        until: Instant,
        came_by: LogicAddr,
    ) {
        let limit = self.call_limit;
        let mut calls = lock(&self.calls);
        if calls.len() >= limit {
            // Sweep at most every 100 ms: a table full of live entries must not cost a full
            // scan per relayed request on the reader's path.
            let now = Instant::now();
            let mut swept = lock(&self.swept);
            if swept.is_none_or(|t| now >= t + Duration::from_millis(100)) {
                *swept = Some(now);
                calls.retain(|_, (_, t, _)| *t > now);
                self.changed.notify_waiters();
            }
            if calls.len() >= limit {
                return;
            }
        }
        let _ = calls.insert(key, (via, until, came_by), limit);
    }

    /// Relayed calls waiting for their answers here now.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) fn calls_in_flight(&self) -> usize {
        lock(&self.calls).len()
    }

    /// The neighbour the request `(caller, id)` came by, if it is being relayed here.
    pub(crate) fn came_by(&self, caller: u32, id: u64) -> Option<LogicAddr> {
        lock(&self.calls).get(&(caller, id)).map(|e| e.2)
    }

    /// An answer passed: its call is no longer in flight here.
    pub(crate) fn answered(&self, caller: u32, id: u64) {
        if lock(&self.calls).remove(&(caller, id)).is_some() {
            self.changed.notify_waiters();
        }
    }

    /// The link to `via` failed: forgets the calls relayed there (and expired ones) and
    /// returns the `(caller, call id)` of those still waiting, to be answered.
    pub(crate) fn calls_lost_via(&self, via: LogicAddr) -> Vec<(u32, u64)> {
        let now = Instant::now();
        let mut calls = lock(&self.calls);
        let lost = calls
            .iter()
            .filter(|(_, (v, t, _))| *v == via && *t > now)
            .map(|(k, _)| *k)
            .collect();
        calls.retain(|_, (v, t, _)| *v != via && *t > now);
        self.changed.notify_waiters();
        lost
    }

    /// Waits until no relayed call is waiting for its answer here (each entry ends when its
    /// answer passes or its caller's deadline does), or `until`. Returns false if `until`
    /// came first.
    pub(crate) async fn drain(&self, until: Instant) -> bool {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let now = Instant::now();
            let next_expiry = lock(&self.calls)
                .values()
                .map(|(_, t, _)| *t)
                .filter(|t| *t > now)
                .min();
            let Some(next) = next_expiry else {
                return true;
            };
            if now >= until {
                return false;
            }
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(next.min(until)) => {}
            }
        }
    }

    /// Keeps the table of streams relayed here as `env` passes from `came_by` toward `next`:
    /// an open adds its two sides, a reset or the second fin removes it. Returns the key of
    /// an open it added (to [`Relays::forget_stream`] if the open is not sent after all).
    pub(crate) fn note_stream(
        &self,
        came_by: LogicAddr,
        next: LogicAddr,
        env: &Envelope,
    ) -> Result<Option<(u32, u64)>, StreamsFull> {
        let (id, to_opener, closes, fin) = match &env.body {
            Some(Body::Open(o)) => {
                let mut streams = lock(&self.streams);
                if streams.len() >= self.stream_limit {
                    return Err(StreamsFull);
                }
                streams.insert(
                    (env.from, o.id),
                    StreamRelay {
                        opener_side: came_by,
                        target_side: next,
                        target: env.to,
                        fins: 0,
                    },
                );
                return Ok(Some((env.from, o.id)));
            }
            Some(Body::Close(c)) => (c.id, c.to_opener, true, false),
            Some(Body::Data(d)) if d.fin => (d.id, d.to_opener, false, true),
            _ => return Ok(None),
        };
        let opener = if to_opener { env.to } else { env.from };
        let mut streams = lock(&self.streams);
        let done = match streams.get_mut(&(opener, id)) {
            Some(r) if fin => {
                r.fins |= if to_opener { 2 } else { 1 };
                r.fins == 3
            }
            Some(_) => closes,
            None => false,
        };
        if done {
            streams.remove(&(opener, id));
        }
        Ok(None)
    }

    /// Forgets a stream noted by [`Relays::note_stream`] whose open was not sent.
    pub(crate) fn forget_stream(&self, key: (u32, u64)) {
        lock(&self.streams).remove(&key);
    }

    /// A stream envelope could not go on: forgets the stream `(opener, id)` and returns the
    /// neighbour ahead of it (toward the opener if `to_opener`), to be told too.
    pub(crate) fn stream_refused(
        &self,
        opener: u32,
        id: u64,
        to_opener: bool,
    ) -> Option<LogicAddr> {
        let r = lock(&self.streams).remove(&(opener, id))?;
        Some(if to_opener {
            r.opener_side
        } else {
            r.target_side
        })
    }

    /// The link to `via` failed: forgets the streams relayed over it and returns, for each,
    /// the close that ends it at the end still reachable.
    pub(crate) fn streams_lost_via(&self, via: LogicAddr) -> Vec<StreamLost> {
        let mut streams = lock(&self.streams);
        let keys: Vec<_> = streams
            .iter()
            .filter(|(_, r)| r.opener_side == via || r.target_side == via)
            .map(|(k, _)| *k)
            .collect();
        keys.into_iter()
            .filter_map(|k| streams.remove(&k).map(|r| (k, r)))
            .map(|((opener, id), r)| {
                // Tell the side that is still reachable, as if the other end had sent it.
                if r.opener_side == via {
                    StreamLost {
                        tell: r.target_side,
                        from: opener,
                        to: r.target,
                        id,
                        to_opener: false,
                    }
                } else {
                    StreamLost {
                        tell: r.opener_side,
                        from: r.target,
                        to: opener,
                        id,
                        to_opener: true,
                    }
                }
            })
            .collect()
    }
}

/// One relayed call: the hop its request went to, its caller's deadline, the neighbour it
/// came by.
type RelayEntry = (LogicAddr, Instant, LogicAddr);

/// Relayed calls waiting for their answers, by `(caller, call id)`, with a count per caller:
/// one caller may hold at most a quarter of the table, so a caller whose calls are never
/// answered (or are long) cannot take the answer paths, bounces and shutdown drain of all.
#[derive(Debug, Default)]
struct RelayTable {
    calls: FastMap<(u32, u64), RelayEntry>,
    per_caller: FastMap<u32, usize>,
}

impl RelayTable {
    fn len(&self) -> usize {
        self.calls.len()
    }

    fn get(&self, key: &(u32, u64)) -> Option<&RelayEntry> {
        self.calls.get(key)
    }

    fn values(&self) -> impl Iterator<Item = &RelayEntry> {
        self.calls.values()
    }

    fn iter(&self) -> impl Iterator<Item = (&(u32, u64), &RelayEntry)> {
        self.calls.iter()
    }

    /// Adds a call unless its caller already holds a quarter of `limit`; says whether it did.
    fn insert(&mut self, key: (u32, u64), entry: RelayEntry, limit: usize) -> bool {
        let held = self.per_caller.entry(key.0).or_default();
        if *held >= (limit / 4).max(1) && !self.calls.contains_key(&key) {
            return false;
        }
        if self.calls.insert(key, entry).is_none() {
            *held += 1;
        }
        true
    }

    fn remove(&mut self, key: &(u32, u64)) -> Option<RelayEntry> {
        let e = self.calls.remove(key)?;
        self.uncount(key.0);
        Some(e)
    }

    fn retain(&mut self, mut keep: impl FnMut(&(u32, u64), &RelayEntry) -> bool) {
        let per_caller = &mut self.per_caller;
        self.calls.retain(|k, e| {
            let kept = keep(k, e);
            if !kept && let Some(n) = per_caller.get_mut(&k.0) {
                *n -= 1;
                if *n == 0 {
                    per_caller.remove(&k.0);
                }
            }
            kept
        });
    }

    fn uncount(&mut self, caller: u32) {
        if let Some(n) = self.per_caller.get_mut(&caller) {
            *n -= 1;
            if *n == 0 {
                self.per_caller.remove(&caller);
            }
        }
    }
}

/// A stream relayed through this harbor: the neighbours on its opener's and its target's side.
#[derive(Debug, Clone, Copy)]
struct StreamRelay {
    opener_side: LogicAddr,
    target_side: LogicAddr,
    target: u32,
    /// Fins seen: 1 from the opener, 2 from the target.
    fins: u8,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_caller_holds_at_most_a_quarter_of_the_relay_table() {
        let mut t = RelayTable::default();
        let at: LogicAddr = "1.255.1".parse().unwrap();
        let e = (at, Instant::now(), at);
        for id in 0..10 {
            assert_eq!(t.insert((7, id), e, 40), id < 10);
        }
        assert!(!t.insert((7, 99), e, 40), "the 11th call of caller 7");
        assert!(t.insert((8, 1), e, 40), "another caller");
        assert!(t.remove(&(7, 0)).is_some());
        assert!(t.insert((7, 99), e, 40), "room again");
        t.retain(|k, _| k.0 != 7);
        assert!(t.insert((7, 100), e, 40));
        assert_eq!(t.len(), 2);
    }

    fn a(s: &str) -> LogicAddr {
        s.parse().unwrap()
    }

    fn open(from: &str, to: &str, id: u64) -> Envelope {
        Envelope {
            to: a(to).as_u32(),
            from: a(from).as_u32(),
            body: Some(Body::Open(crate::proto::StreamOpen {
                id,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn a_lost_link_resets_its_streams_at_the_other_end_only() {
        let r = Relays::new(16, 2);
        let (west, east) = (a("1.255.1"), a("2.255.1"));
        // 1.1.1 opened toward 2.1.1: it came by `west` and went on to `east`.
        assert_eq!(
            r.note_stream(west, east, &open("1.1.1", "2.1.1", 7)),
            Ok(Some((a("1.1.1").as_u32(), 7)))
        );
        assert_eq!(
            r.note_stream(west, east, &open("1.1.2", "2.1.1", 8))
                .map(|k| k.is_some()),
            Ok(true)
        );
        assert_eq!(
            r.note_stream(west, east, &open("1.1.3", "2.1.1", 9)),
            Err(StreamsFull)
        );
        r.forget_stream((a("1.1.2").as_u32(), 8));
        let lost = r.streams_lost_via(east);
        assert_eq!(
            lost,
            vec![StreamLost {
                tell: west,
                from: a("2.1.1").as_u32(),
                to: a("1.1.1").as_u32(),
                id: 7,
                to_opener: true,
            }]
        );
        assert!(
            r.streams_lost_via(west).is_empty(),
            "forgotten once reported"
        );
    }

    #[tokio::test]
    async fn calls_lost_via_a_hop_are_reported_once_and_the_drain_ends() {
        let r = Relays::new(16, 2);
        let (west, east) = (a("1.255.1"), a("2.255.1"));
        let until = Instant::now() + Duration::from_secs(30);
        r.track((1, 1), east, until, west);
        r.track((1, 2), west, until, east);
        assert_eq!(r.came_by(1, 1), Some(west));
        assert_eq!(r.calls_lost_via(east), vec![(1, 1)]);
        assert_eq!(r.came_by(1, 1), None);
        assert!(!r.drain(Instant::now()).await, "a call is still in flight");
        r.answered(1, 2);
        assert!(r.drain(Instant::now() + Duration::from_secs(5)).await);
    }
}
