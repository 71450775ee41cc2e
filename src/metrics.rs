//! Call metrics kept on the hot path: a duration histogram per method and outcome, for the
//! calls this node serves and the calls it makes. Plain atomics, no lock on the server side
//! (its methods are fixed when the node is built) and a read lock on the caller's side; read
//! only when scraped (see `admin`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::error::{ErrorCode, RpcError};
use crate::hash::FastMap;

/// Upper bounds of the duration buckets, in seconds (the last bucket, +Inf, is implied).
pub(crate) const BUCKETS: [f64; 14] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// The method label for a request whose method this node does not serve.
pub(crate) const UNKNOWN_METHOD: &str = "_unknown";
/// The method label for calls past [`MAX_CLIENT_METHODS`] distinct methods.
pub(crate) const OTHER_METHOD: &str = "_other";
/// Distinct methods the caller's side keeps apart; the rest share [`OTHER_METHOD`].
pub(crate) const MAX_CLIENT_METHODS: usize = 256;
/// Longest method name kept as a label.
pub(crate) const MAX_METHOD_LABEL: usize = 128;

/// Whether `method` may be a label value as it is: short, and only `[A-Za-z0-9_.:/-]`, so
/// nothing in it needs escaping in either exposition format.
pub(crate) fn label_safe(method: &str) -> bool {
    !method.is_empty()
        && method.len() <= MAX_METHOD_LABEL
        && method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'/' | b'-'))
}

/// A duration histogram: per-bucket counts and the sum, each an atomic.
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    /// Counts per bucket (not cumulative); the last is +Inf.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    /// In microseconds: at a thousand one-second calls always in flight it takes 580 years
    /// to wrap (in nanoseconds it would take 200 days).
    sum_micros: AtomicU64,
}

/// [`BUCKETS`] in nanoseconds, for the comparison on the hot path.
const BUCKET_NANOS: [u64; BUCKETS.len()] = {
    let mut out = [0u64; BUCKETS.len()];
    let mut i = 0;
    while i < BUCKETS.len() {
        out[i] = (BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    out
};

impl Histogram {
    pub(crate) fn observe(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BUCKET_NANOS
            .iter()
            .position(|b| nanos <= *b)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(nanos / 1_000, Ordering::Relaxed);
    }

    /// (sum in seconds, count, per-bucket counts with their upper bounds; +Inf as `f64::MAX`).
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) fn read(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let bounds = BUCKETS.iter().copied().chain([f64::MAX]);
        let buckets: Vec<(f64, u64)> = bounds.zip(counts.iter().copied()).collect();
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        (sum, counts.iter().sum(), buckets)
    }
}

/// How a call ended, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    /// The handler answered an error of its own.
    Error,
    NoMethod,
    Busy,
    Timeout,
    NoRoute,
    PeerLost,
    PathBusy,
    Shutdown,
    TooLarge,
    Panicked,
    NoReply,
    QueueFull,
    Other,
}

impl Outcome {
    pub(crate) const ALL: [Outcome; 14] = [
        Outcome::Ok,
        Outcome::Error,
        Outcome::NoMethod,
        Outcome::Busy,
        Outcome::Timeout,
        Outcome::NoRoute,
        Outcome::PeerLost,
        Outcome::PathBusy,
        Outcome::Shutdown,
        Outcome::TooLarge,
        Outcome::Panicked,
        Outcome::NoReply,
        Outcome::QueueFull,
        Outcome::Other,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::NoMethod => "no_method",
            Outcome::Busy => "busy",
            Outcome::Timeout => "timeout",
            Outcome::NoRoute => "no_route",
            Outcome::PeerLost => "peer_lost",
            Outcome::PathBusy => "path_busy",
            Outcome::Shutdown => "shutdown",
            Outcome::TooLarge => "too_large",
            Outcome::Panicked => "panicked",
            Outcome::NoReply => "no_reply",
            Outcome::QueueFull => "queue_full",
            Outcome::Other => "other",
        }
    }

    /// The outcome of an error answer with `code`.
    pub(crate) fn of_code(code: ErrorCode) -> Outcome {
        match code {
            ErrorCode::NO_METHOD => Outcome::NoMethod,
            ErrorCode::BUSY => Outcome::Busy,
            ErrorCode::SHUTDOWN => Outcome::Shutdown,
            ErrorCode::NO_ROUTE => Outcome::NoRoute,
            ErrorCode::PEER_LOST => Outcome::PeerLost,
            ErrorCode::HOP_BUSY => Outcome::PathBusy,
            ErrorCode::TOO_LARGE => Outcome::TooLarge,
            ErrorCode::PANICKED => Outcome::Panicked,
            ErrorCode::NO_REPLY => Outcome::NoReply,
            _ => Outcome::Error,
        }
    }

    /// The outcome of a call that failed with `e` at the caller.
    pub(crate) fn of_error(e: &RpcError) -> Outcome {
        match e {
            RpcError::Timeout { .. } => Outcome::Timeout,
            RpcError::NoMethod { .. } => Outcome::NoMethod,
            RpcError::Busy { .. } => Outcome::Busy,
            RpcError::Shutdown { .. } => Outcome::Shutdown,
            RpcError::NoRoute { .. } => Outcome::NoRoute,
            RpcError::PeerLost { .. } => Outcome::PeerLost,
            RpcError::PathBusy { .. } => Outcome::PathBusy,
            RpcError::Remote { code, .. } => Outcome::of_code(*code),
            RpcError::TooLarge { .. } => Outcome::TooLarge,
            RpcError::QueueFull { .. } => Outcome::QueueFull,
            _ => Outcome::Other,
        }
    }
}

/// The calls of one method: a histogram per outcome.
#[derive(Debug, Default)]
pub(crate) struct CallStats {
    by_outcome: [Histogram; Outcome::ALL.len()],
}

impl CallStats {
    pub(crate) fn record(&self, outcome: Outcome, d: Duration) {
        self.by_outcome[outcome as usize].observe(d);
    }

    /// The histograms with at least one call, by outcome.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) fn each(&self) -> impl Iterator<Item = (Outcome, &Histogram)> {
        Outcome::ALL
            .iter()
            .map(|o| (*o, &self.by_outcome[*o as usize]))
            .filter(|(_, h)| h.buckets.iter().any(|b| b.load(Ordering::Relaxed) > 0))
    }
}

/// The calls this node serves, by method: fixed when the node is built (its registered
/// methods plus [`UNKNOWN_METHOD`]), so a lookup takes no lock and a caller cannot add labels.
#[derive(Debug)]
pub(crate) struct ServerCalls {
    index: FastMap<String, usize>,
    methods: Vec<(String, CallStats)>,
}

impl ServerCalls {
    pub(crate) fn new<'a>(methods: impl IntoIterator<Item = &'a String>) -> ServerCalls {
        // A registered name that is no fit label is counted under `_unknown` with the calls
        // of methods this node does not serve.
        let mut names: Vec<String> = methods
            .into_iter()
            .filter(|m| label_safe(m) && m.as_str() != UNKNOWN_METHOD)
            .cloned()
            .collect();
        names.sort();
        names.insert(0, UNKNOWN_METHOD.to_owned());
        ServerCalls {
            index: names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), i))
                .collect(),
            methods: names
                .into_iter()
                .map(|n| (n, CallStats::default()))
                .collect(),
        }
    }

    /// The slot of `method` ([`UNKNOWN_METHOD`]'s if it is not served here).
    pub(crate) fn slot(&self, method: &str) -> usize {
        self.index.get(method).copied().unwrap_or(0)
    }

    pub(crate) fn record(&self, slot: usize, outcome: Outcome, d: Duration) {
        if let Some((_, s)) = self.methods.get(slot) {
            s.record(outcome, d);
        }
    }

    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) fn each(&self) -> impl Iterator<Item = (&str, &CallStats)> {
        self.methods.iter().map(|(n, s)| (n.as_str(), s))
    }
}

/// The calls this node makes, by method: at most [`MAX_CLIENT_METHODS`] methods apart.
#[derive(Debug, Default)]
pub(crate) struct ClientCalls {
    methods: RwLock<FastMap<String, Arc<CallStats>>>,
}

impl ClientCalls {
    pub(crate) fn record(&self, method: &str, outcome: Outcome, d: Duration) {
        {
            let methods = self.methods.read().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = methods.get(method) {
                return s.record(outcome, d);
            }
        }
        // A method seen for the first time: added, or counted as `_other` past the bound or
        // when its name is no fit label (too long, or characters that would need escaping).
        let mut methods = self.methods.write().unwrap_or_else(|e| e.into_inner());
        let fits = methods.len() < MAX_CLIENT_METHODS || methods.contains_key(method);
        let key = if fits && label_safe(method) {
            method
        } else {
            OTHER_METHOD
        };
        methods
            .entry(key.to_owned())
            .or_default()
            .record(outcome, d);
    }

    /// A copy of the table, for a scrape.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) fn each(&self) -> Vec<(String, Arc<CallStats>)> {
        let methods = self.methods.read().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = methods
            .iter()
            .map(|(m, s)| (m.clone(), s.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_into_its_bucket_and_sums() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(80));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(9));
        let (sum, count, buckets) = h.read();
        assert_eq!(count, 3);
        assert!((sum - 9.00308).abs() < 1e-6, "{sum}");
        assert_eq!(buckets[0], (0.0001, 1));
        assert_eq!(buckets[5], (0.005, 1));
        assert_eq!(buckets.last(), Some(&(f64::MAX, 1)));
    }

    #[test]
    fn the_callers_methods_are_bounded() {
        let c = ClientCalls::default();
        for i in 0..MAX_CLIENT_METHODS + 10 {
            c.record(&format!("m{i}"), Outcome::Ok, Duration::ZERO);
        }
        let all = c.each();
        assert_eq!(all.len(), MAX_CLIENT_METHODS + 1);
        let other = all.iter().find(|(m, _)| m == OTHER_METHOD).unwrap();
        let (_, count, _) = other.1.by_outcome[0].read();
        assert_eq!(count, 10);
    }

    #[test]
    fn method_names_that_are_no_fit_label_are_not_kept_apart() {
        let c = ClientCalls::default();
        for m in ["a\"b", "x\ny", &"m".repeat(MAX_METHOD_LABEL + 1), ""] {
            c.record(m, Outcome::Ok, Duration::ZERO);
        }
        c.record("echo.v1/Say", Outcome::Ok, Duration::ZERO);
        let names: Vec<String> = c.each().into_iter().map(|(m, _)| m).collect();
        assert_eq!(names, [OTHER_METHOD, "echo.v1/Say"]);
        let s = ServerCalls::new(&["bad name".to_owned(), UNKNOWN_METHOD.to_owned()]);
        assert_eq!(s.each().count(), 1);
    }

    #[test]
    fn unknown_methods_share_one_server_slot() {
        let methods = vec!["b".to_owned(), "a".to_owned()];
        let s = ServerCalls::new(&methods);
        assert_eq!(s.slot("nope"), 0);
        assert_ne!(s.slot("a"), s.slot("b"));
        s.record(s.slot("nope"), Outcome::NoMethod, Duration::ZERO);
        let names: Vec<&str> = s.each().map(|(n, _)| n).collect();
        assert_eq!(names, [UNKNOWN_METHOD, "a", "b"]);
    }
}
