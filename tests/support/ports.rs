//! Ports for processes a test starts later.
//!
//! A port taken from the kernel with `bind(":0")` and released again comes from the ephemeral
//! range, where the kernel also picks the local port of every outgoing connection and of every
//! other `:0` listener. Between the release and the child's own bind, any of those may take it:
//! the child then fails with "address in use". These ports come from below the ephemeral range,
//! where the kernel never picks one, in an order that differs per process; each is checked free
//! (TCP and UDP) when it is handed out.
#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicU32, Ordering};

/// Lowest port handed out.
const FIRST: u32 = 10_000;

/// A loopback port that is free now, for a process started after this returns.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let end = ephemeral_low().max(FIRST + 1_000);
    let span = end - FIRST;
    if NEXT.load(Ordering::Relaxed) == u32::MAX {
        // Start at a place of this process's own so concurrent test processes rarely meet.
        let seed = std::process::id().wrapping_mul(2_654_435_761)
            ^ (&NEXT as *const AtomicU32 as usize as u32);
        let _ = NEXT.compare_exchange(u32::MAX, seed % span, Ordering::Relaxed, Ordering::Relaxed);
    }
    for _ in 0..span {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16;
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {FIRST} and {end}");
}

/// The lowest port of the kernel's ephemeral range (Linux; 32768 elsewhere).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}
