//! A gate for log lines that an attacker can cause cheaply.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

/// Lets a kind of log line through at most once a second, counting the ones it held back.
///
/// Lines about connections refused before anyone proved anything (silent sockets, failed
/// handshakes, forged datagrams) are cheap for an attacker to cause; logged each time, they
/// would fill disks and hide everything else. Keep one gate per kind of line, usually a
/// `static`:
///
/// ```
/// use clustergo::LogGate;
/// static REFUSED: LogGate = LogGate::new();
/// if let Some(held_back) = REFUSED.pass() {
///     eprintln!("connection refused ({held_back} more like it not logged)");
/// }
/// ```
#[derive(Debug)]
pub struct LogGate {
    next_ms: AtomicU64,
    skipped: AtomicU64,
}

impl Default for LogGate {
    fn default() -> Self {
        Self::new()
    }
}

impl LogGate {
    /// A gate that lets its first line through.
    pub const fn new() -> Self {
        LogGate {
            next_ms: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one let through)` when this line may be logged.
    pub fn pass(&self) -> Option<u64> {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let now = START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(next, now + 1000, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.skipped.swap(0, Ordering::Relaxed));
        }
        self.skipped.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// What counts as one source for per-source limits (the node's accept path, the gateway's):
/// an IPv4 address (also written as IPv4-mapped IPv6), or an IPv6 /64 — one host usually
/// holds a whole /64, so counting single IPv6 addresses would let it pass for millions of
/// sources.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_and_a_count_of_the_rest() {
        let g = LogGate::new();
        assert_eq!(g.pass(), Some(0));
        assert_eq!(g.pass(), None);
        assert_eq!(g.pass(), None);
        // The next window opens with the count of what was held back.
        g.next_ms.store(0, Ordering::Relaxed);
        assert_eq!(g.pass(), Some(2));
    }
}
