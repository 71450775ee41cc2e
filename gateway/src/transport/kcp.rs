//! KCP clients: one UDP socket, a stateless cookie handshake, then one KCP session per
//! client (the protocol and its wire are in `clustergo_client::kcp`).
//!
//! Why the gateway owns this layer instead of using a KCP listener crate: sessions must be
//! created only for sources that proved they receive at their address (a forged source gets
//! one cookie no larger than its datagram, and nothing is stored), found by `conv` and bound
//! to their address (a datagram with a live session's address and another conv, or a live
//! conv from another address, is dropped and counted — it never replaces a session), and a
//! client that reconnects from the same port gets a fresh conv. A listener keyed by address
//! can give none of these.
//!
//! Rules, exactly:
//! - conv 0 is the handshake; the gateway picks every session's conv, at random in
//!   `1..2^31`, unique among its live sessions;
//! - a cookie is valid for `handshake_timeout` after it was issued, from the address it was
//!   sent to; cookies are sent at most `kcp_cookies_per_sec` a second in all;
//! - a CONNECT takes a handshake place (`max_handshakes` for this listener,
//!   `max_handshakes_per_source`), or is answered with REFUSE; a CONNECT for a live session
//!   from its address is answered with ACCEPT again;
//! - a session's datagrams are metered at twice `bytes_per_sec` (raw bytes) and queued for
//!   its task up to `INPUT_QUEUE` datagrams; a session whose data waits without progress
//!   for `write_timeout` (a client that keeps its window shut) is ended;
//! - everything else (unknown conv, another address, malformed, over a bound) is dropped,
//!   counted in `kcp_dropped` and logged (gated).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use clustergo_client::kcp::{self as wire, Cookie, Handshake, MAX_DATAGRAM};
use clustergo_client::wire::close_code;
use hmac::{Hmac, Mac};
use tokio::net::UdpSocket;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

use crate::admission::Bucket;
use crate::state::Gateway;
use crate::transport::{framed::framed, info};

/// One live session, as the socket's reader sees it.
struct Entry {
    peer: SocketAddr,
    input: mpsc::Sender<Bytes>,
    /// Its raw datagram bytes, metered at twice `bytes_per_sec` (as a WebSocket client's raw
    /// bytes are): KCP segments that never make a frame (duplicates, out of window) cost too.
    /// Over it, datagrams are dropped (KCP resends; an honest client only slows down).
    raw: Bucket,
}

/// Issues and checks cookies: HMAC-SHA256 under a key made at start, truncated to 16 bytes.
struct Cookies {
    key: [u8; 32],
    started: Instant,
    valid: Duration,
}

impl Cookies {
    fn new(valid: Duration) -> Cookies {
        let mut key = [0u8; 32];
        // Without the OS's randomness there is no safe key; a zero key would let anyone mint
        // cookies, so fail loudly instead.
        getrandom::fill(&mut key).expect("the OS random source is available");
        Cookies {
            key,
            started: Instant::now(),
            valid,
        }
    }

    fn now(&self) -> u32 {
        self.started.elapsed().as_secs() as u32
    }

    fn mac(&self, peer: SocketAddr, nonce: u64, conv: u32, issued: u32) -> Hmac<sha2::Sha256> {
        let mut m = Hmac::<sha2::Sha256>::new_from_slice(&self.key).expect("any key length");
        let ip = match peer.ip() {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            std::net::IpAddr::V6(v6) => v6,
        };
        m.update(b"clustergo kcp cookie\n");
        m.update(&ip.octets());
        m.update(&peer.port().to_le_bytes());
        m.update(&nonce.to_le_bytes());
        m.update(&conv.to_le_bytes());
        m.update(&issued.to_le_bytes());
        m
    }

    fn issue(&self, peer: SocketAddr, nonce: u64, conv: u32) -> Cookie {
        let issued = self.now();
        let full = self.mac(peer, nonce, conv, issued).finalize().into_bytes();
        let mut mac = [0u8; 16];
        mac.copy_from_slice(&full[..16]);
        Cookie {
            nonce,
            conv,
            issued,
            mac,
        }
    }

    /// Whether `c` was issued by this gateway to `peer`, and is still fresh.
    fn check(&self, peer: SocketAddr, c: &Cookie) -> Result<(), &'static str> {
        self.mac(peer, c.nonce, c.conv, c.issued)
            .verify_truncated_left(&c.mac)
            .map_err(|_| "a cookie this gateway did not issue to that address")?;
        let now = self.now();
        if c.issued > now || now - c.issued > self.valid.as_secs() as u32 + 1 {
            return Err("a stale cookie");
        }
        Ok(())
    }
}

/// Serves KCP clients on `socket` until shutdown, then until its last session has ended.
pub(crate) async fn serve(gw: Arc<Gateway>, socket: UdpSocket) {
    let socket = Arc::new(socket);
    let cookies = Cookies::new(gw.limits.handshake_timeout);
    let budget = gw.admission.listener_budget();
    let rate = f64::from(gw.limits.kcp_cookies_per_sec);
    let mut cookie_rate = Bucket::new(rate, rate);
    let mut sessions: HashMap<u32, Entry> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let mut sweep = tokio::time::interval(Duration::from_millis(250));
    let mut backoff = Duration::ZERO;
    loop {
        let (n, from) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => {
                    backoff = Duration::ZERO;
                    x
                }
                Err(e) => {
                    // ICMP errors for earlier sends show up here: nothing to do. Out of
                    // memory or buffers: back off instead of spinning.
                    if matches!(e.raw_os_error(), Some(12 | 105)) {
                        backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                        tokio::time::sleep(backoff).await;
                    }
                    continue;
                }
            },
            _ = sweep.tick() => {
                sessions.retain(|_, e| !e.input.is_closed());
                if gw.shutdown.is_cancelled() && sessions.is_empty() {
                    return;
                }
                continue;
            }
        };
        let d = &buf[..n];
        if n > MAX_DATAGRAM {
            dropped(&gw, from, "a datagram over 1500 bytes");
            continue;
        }
        if wire::is_handshake(d) {
            match Handshake::decode(d) {
                Some(Handshake::Hello { nonce }) => {
                    if gw.shutdown.is_cancelled() {
                        dropped(&gw, from, "a HELLO during shutdown");
                    } else if !cookie_rate.take(1.0) {
                        dropped(&gw, from, "a HELLO over kcp_cookies_per_sec");
                    } else {
                        let conv = fresh_conv(&sessions);
                        let answer = Handshake::Cookie(cookies.issue(from, nonce, conv));
                        let _ = socket.try_send_to(&answer.encode(), from);
                        gw.stats.kcp_cookies.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Some(Handshake::Connect(c)) => {
                    if let Err(why) = cookies.check(from, &c) {
                        dropped(&gw, from, why);
                        continue;
                    }
                    let answer = match sessions.get(&c.conv) {
                        Some(e) if e.peer == from && !e.input.is_closed() => {
                            Handshake::Accept { conv: c.conv }
                        }
                        Some(e) if !e.input.is_closed() => {
                            // The conv went to someone else meanwhile (a collision, about one
                            // in 2^31 per live session): the client is refused and connects
                            // again.
                            refuse(c.conv, close_code::TRY_AGAIN, "conv taken: connect again")
                        }
                        _ => match open(&gw, &socket, &budget, from, c.conv) {
                            Ok(entry) => {
                                sessions.insert(c.conv, entry);
                                Handshake::Accept { conv: c.conv }
                            }
                            Err((code, reason)) => refuse(c.conv, code, reason),
                        },
                    };
                    let _ = socket.try_send_to(&answer.encode(), from);
                }
                _ => dropped(&gw, from, "a malformed handshake datagram"),
            }
            continue;
        }
        if n < ::kcp::KCP_OVERHEAD {
            dropped(&gw, from, "a datagram shorter than a KCP header");
            continue;
        }
        let conv = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
        match sessions.get_mut(&conv) {
            None => dropped(&gw, from, "a KCP segment for no session"),
            Some(e) if e.peer != from => {
                dropped(&gw, from, "a KCP segment for another address's session")
            }
            Some(e) => {
                if !e.raw.take(n as f64) {
                    dropped(&gw, from, "a KCP segment over the session's raw byte rate");
                    continue;
                }
                match e.input.try_send(Bytes::copy_from_slice(d)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        dropped(&gw, from, "a KCP segment for a session whose queue is full")
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        sessions.remove(&conv);
                        dropped(&gw, from, "a KCP segment for a session that ended");
                    }
                }
            }
        }
    }
}

fn refuse(conv: u32, code: u16, reason: &str) -> Handshake {
    Handshake::Refuse {
        conv,
        code,
        reason: reason.into(),
    }
}

/// A conv in `1..2^31` that no live session has, from the OS's random source: with the
/// client's address, the conv is what keeps an off-path attacker out of a session, so it must
/// not be predictable from the convs other HELLOs were given.
fn fresh_conv(sessions: &HashMap<u32, Entry>) -> u32 {
    loop {
        let conv = getrandom::u32().expect("the OS random source is available") & 0x7fff_ffff;
        if conv != 0 && !sessions.contains_key(&conv) {
            return conv;
        }
    }
}

/// A new session for `peer` on `conv`, served like any other client.
fn open(
    gw: &Arc<Gateway>,
    socket: &Arc<UdpSocket>,
    budget: &Arc<Semaphore>,
    peer: SocketAddr,
    conv: u32,
) -> Result<Entry, (u16, &'static str)> {
    if gw.shutdown.is_cancelled() {
        return Err((close_code::GOING_AWAY, "gateway shutting down"));
    }
    let Some(handshake) = gw.admission.admit(budget, peer, "kcp") else {
        return Err((close_code::TRY_AGAIN, "gateway busy: try again later"));
    };
    let (tx, rx) = mpsc::channel(wire::INPUT_QUEUE);
    let (stream, task) = wire::session(conv, socket.clone(), peer, rx, gw.limits.write_timeout);
    gw.tasks.spawn(task);
    let g = gw.clone();
    gw.tasks.spawn(async move {
        let (r, w) = tokio::io::split(stream);
        let info = info(&g, "kcp", peer);
        framed(g, handshake, info, r, w).await;
    });
    // At least a queue's worth of full datagrams of burst, whatever bytes_per_sec is.
    let raw = 2.0 * gw.limits.bytes_per_sec as f64;
    let burst = raw.max((wire::INPUT_QUEUE * MAX_DATAGRAM) as f64);
    Ok(Entry {
        peer,
        input: tx,
        raw: Bucket::new(raw, burst),
    })
}

/// Counts and logs (gated) a datagram the listener did not take.
fn dropped(gw: &Gateway, from: SocketAddr, why: &str) {
    gw.stats.kcp_dropped.fetch_add(1, Ordering::Relaxed);
    if let Some(skipped) = DROPPED.pass() {
        tracing::info!(client = %from, reason = why, skipped, "KCP datagram dropped");
    }
}

static DROPPED: clustergo::LogGate = clustergo::LogGate::new();

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn cookies_bind_address_and_expire() {
        let c = Cookies::new(Duration::from_secs(10));
        let a: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let cookie = c.issue(a, 7, 42);
        assert!(c.check(a, &cookie).is_ok());
        assert!(c.check("10.0.0.1:5001".parse().unwrap(), &cookie).is_err());
        let mut forged = cookie;
        forged.conv = 43;
        assert!(c.check(a, &forged).is_err());
        tokio::time::advance(Duration::from_secs(12)).await;
        assert_eq!(c.check(a, &cookie), Err("a stale cookie"));
    }
}
