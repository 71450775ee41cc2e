//! KCP between clients and the gateway: a stateless cookie handshake over plain UDP, then
//! standard KCP segments (any KCP implementation speaks them once it knows its `conv`).
//!
//! # Why a handshake of our own
//!
//! UDP proves nothing about a datagram's source. A listener that creates a session for the
//! first datagram from an address lets forged sources fill its tables and makes it a
//! reflector: its answers go to whoever the forger named. So, as DTLS and QUIC do, the
//! gateway answers an unproven source only with a *cookie* — a MAC over the source address,
//! the `conv` it offers and the time — no larger than what it was sent, and keeps nothing.
//! Only a client that echoes a valid cookie from the same address gets a session. The
//! gateway, not the client, chooses `conv`, so every session has its own (a client that
//! reconnects from the same UDP port gets a fresh one, and cannot collide with its previous
//! session), and sessions are found by `conv` and bound to the address that proved itself: a
//! datagram with another source or an unknown `conv` is dropped and counted, never a reason to
//! replace a session.
//!
//! # Wire (all integers little-endian, as in KCP's own header)
//!
//! A handshake datagram begins with `conv = 0` (4 zero bytes, never a session's conv) and the
//! tag `cgk1`, then a type byte:
//!
//! | type | name | sent by | body after the type byte | total |
//! |---|---|---|---|---|
//! | 1 | HELLO | client | nonce `u64`, zero padding | exactly 64 bytes |
//! | 2 | COOKIE | gateway | nonce `u64`, conv `u32`, issued `u32`, mac `[u8; 16]` | 41 bytes |
//! | 3 | CONNECT | client | nonce `u64`, conv `u32`, issued `u32`, mac `[u8; 16]`, zero padding | exactly 64 bytes |
//! | 4 | ACCEPT | gateway | conv `u32` | 13 bytes |
//! | 5 | REFUSE | gateway | conv `u32`, close code `u16`, reason (UTF-8, ≤ 40 bytes) | ≤ 55 bytes |
//!
//! The client sends HELLO (repeating every 200 ms until answered), copies the COOKIE's
//! fields into CONNECT (repeating until ACCEPT or REFUSE), then speaks KCP with that conv.
//! The padding makes every answer smaller than its request. `conv` is below 2³¹ (C KCP
//! implementations keep it in an `int`). A cookie is valid for the gateway's handshake
//! timeout, for the address it was sent to. A repeated CONNECT for a live session is
//! answered with ACCEPT again.
//!
//! KCP itself: stream mode, KCP's fast profile (no delay, 10 ms tick, fast resend after 2
//! skipped ACKs, no congestion window), MTU 1400, a send window of 128 segments and a
//! receive window of 64. A peer in message
//! mode interoperates: the bytes arrive in order either way.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The first eight bytes of every handshake datagram: conv 0 and the tag.
pub const MAGIC: [u8; 8] = [0, 0, 0, 0, b'c', b'g', b'k', b'1'];
/// Size of HELLO and CONNECT, padding included.
pub const REQUEST_LEN: usize = 64;
/// Longest REFUSE reason, in bytes.
pub const MAX_REFUSE_REASON: usize = 40;
/// Largest datagram either side accepts (KCP MTU 1400 plus slack).
pub const MAX_DATAGRAM: usize = 1500;

/// The cookie a gateway issues: it proves the client receives at its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cookie {
    /// The client's HELLO nonce, echoed.
    pub nonce: u64,
    /// The conv of the session the cookie is for.
    pub conv: u32,
    /// When it was issued, in the gateway's seconds.
    pub issued: u32,
    /// The gateway's MAC over the address, nonce, conv and time.
    pub mac: [u8; 16],
}

/// One handshake datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handshake {
    /// Client: "I would like a session."
    Hello {
        /// Client's random value, echoed in the cookie.
        nonce: u64,
    },
    /// Gateway: a cookie for the address the HELLO came from.
    Cookie(Cookie),
    /// Client: the cookie, back.
    Connect(Cookie),
    /// Gateway: a session `conv` exists for this address; speak KCP.
    Accept {
        /// The session.
        conv: u32,
    },
    /// Gateway: no session (full, or too many from this address).
    Refuse {
        /// The conv the client asked for.
        conv: u32,
        /// A close code of `wire::close_code`.
        code: u16,
        /// Why, for the player (short).
        reason: String,
    },
}

/// Whether `datagram` is a handshake datagram (else it is a KCP segment, or junk).
pub fn is_handshake(datagram: &[u8]) -> bool {
    datagram.len() >= 9 && datagram[..8] == MAGIC
}

impl Handshake {
    /// Encodes into a new datagram (requests padded to [`REQUEST_LEN`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(REQUEST_LEN);
        b.extend_from_slice(&MAGIC);
        let cookie = |b: &mut Vec<u8>, c: &Cookie| {
            b.extend_from_slice(&c.nonce.to_le_bytes());
            b.extend_from_slice(&c.conv.to_le_bytes());
            b.extend_from_slice(&c.issued.to_le_bytes());
            b.extend_from_slice(&c.mac);
        };
        match self {
            Handshake::Hello { nonce } => {
                b.push(1);
                b.extend_from_slice(&nonce.to_le_bytes());
                b.resize(REQUEST_LEN, 0);
            }
            Handshake::Cookie(c) => {
                b.push(2);
                cookie(&mut b, c);
            }
            Handshake::Connect(c) => {
                b.push(3);
                cookie(&mut b, c);
                b.resize(REQUEST_LEN, 0);
            }
            Handshake::Accept { conv } => {
                b.push(4);
                b.extend_from_slice(&conv.to_le_bytes());
            }
            Handshake::Refuse { conv, code, reason } => {
                b.push(5);
                b.extend_from_slice(&conv.to_le_bytes());
                b.extend_from_slice(&code.to_le_bytes());
                b.extend_from_slice(crate::wire::clip(reason, MAX_REFUSE_REASON).as_bytes());
            }
        }
        b
    }

    /// Decodes a handshake datagram; `None` for anything malformed (requests of the wrong
    /// size included: an unpadded HELLO could draw a larger answer than itself).
    pub fn decode(d: &[u8]) -> Option<Handshake> {
        if !is_handshake(d) {
            return None;
        }
        let (kind, mut body) = (d[8], &d[9..]);
        let cookie = |body: &mut &[u8]| -> Option<Cookie> {
            if body.len() < 32 {
                return None;
            }
            let nonce = body.get_u64_le();
            let conv = body.get_u32_le();
            let issued = body.get_u32_le();
            let mut mac = [0u8; 16];
            body.copy_to_slice(&mut mac);
            Some(Cookie {
                nonce,
                conv,
                issued,
                mac,
            })
        };
        match kind {
            1 if d.len() == REQUEST_LEN => Some(Handshake::Hello {
                nonce: body.get_u64_le(),
            }),
            2 if body.len() == 32 => cookie(&mut body).map(Handshake::Cookie),
            3 if d.len() == REQUEST_LEN => cookie(&mut body).map(Handshake::Connect),
            4 if body.len() == 4 => Some(Handshake::Accept {
                conv: body.get_u32_le(),
            }),
            5 if body.len() >= 6 && body.len() <= 6 + MAX_REFUSE_REASON => {
                let conv = body.get_u32_le();
                let code = body.get_u16_le();
                Some(Handshake::Refuse {
                    conv,
                    code,
                    reason: String::from_utf8_lossy(body).into_owned(),
                })
            }
            _ => None,
        }
    }
}

/// Segments a session may have queued or unacknowledged before it stops taking bytes to send.
const SEND_QUEUE: usize = 128;
/// KCP's receive window, in segments: what a peer may have in flight to us, out of order
/// included.
const RECV_WINDOW: u16 = 64;
/// Bytes received and not yet read by the application, at most, plus one message (beyond
/// this KCP's receive window closes and the peer waits).
const RECV_BUFFER: usize = 64 << 10;
/// Datagrams waiting for a session's task, at most (more are dropped; KCP resends): with
/// datagrams of at most [`MAX_DATAGRAM`] bytes, under 100 KiB per session.
pub const INPUT_QUEUE: usize = 64;
/// After the application closed its side, how long unacknowledged data may still be resent.
pub const LINGER: Duration = Duration::from_secs(2);
/// Worst-case memory of one session, all bounds reached at once: KCP's receive buffers
/// (2 × [`RECV_WINDOW`] segments), its send side ([`SEND_QUEUE`] segments), the bytes held for
/// the application (twice 64 KiB plus one message of at most [`RECV_WINDOW`] segments) and the
/// input queue: under 800 KiB. (Not measured per idle session yet; its buffers grow only
/// with data in flight.)
pub const MAX_SESSION_BYTES: usize = 800 << 10;

/// Writes KCP's segments as datagrams to one peer, without waiting: a datagram the socket
/// cannot take now is dropped, and KCP resends it.
struct Out {
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
}

impl io::Write for Out {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _ = self.socket.try_send_to(buf, self.peer);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How a KCP session's task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The application closed its side and the peer acknowledged everything.
    Finished,
    /// The application closed its side; unacknowledged data was given up after [`LINGER`].
    Lingered,
    /// The application dropped its side while data from the peer was waiting for it.
    Dropped,
    /// KCP gave up resending (the peer is gone).
    DeadLink,
    /// Data waited to be sent or acknowledged without progress for the session's stall
    /// limit: the peer keeps its window shut, or does not acknowledge.
    Stalled,
    /// A segment broke KCP's own arithmetic (possible only in builds with overflow checks):
    /// the session's state cannot be trusted.
    Malformed,
}

/// Runs one KCP session over `socket` to `peer`: datagrams for it arrive on `input`; the
/// application reads and writes the returned byte stream. The session ends (its task
/// returns) when the application has closed its side and the peer acknowledged what was
/// sent (or [`LINGER`] passed), when the application goes away, when KCP gives up on the
/// peer, or when data waits without progress for `stall` (a peer that keeps its window shut).
/// What it holds is bounded by [`MAX_SESSION_BYTES`]. Its timer runs only while data is in
/// flight (at most every 10 ms); an idle session wakes once a second.
pub fn session(
    conv: u32,
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
    input: mpsc::Receiver<Bytes>,
    stall: Duration,
) -> (
    DuplexStream,
    impl Future<Output = SessionEnd> + Send + 'static,
) {
    let (app, ours) = tokio::io::duplex(RECV_BUFFER);
    let mut kcp = ::kcp::Kcp::new_stream(conv, Out { socket, peer });
    kcp.set_nodelay(true, 10, 2, true);
    let _ = kcp.set_mtu(1400);
    kcp.set_wndsize(SEND_QUEUE as u16, RECV_WINDOW);
    (app, drive(kcp, ours, input, stall))
}

async fn drive(
    mut kcp: ::kcp::Kcp<Out>,
    app: DuplexStream,
    mut input: mpsc::Receiver<Bytes>,
    stall: Duration,
) -> SessionEnd {
    let start = Instant::now();
    let now_ms = || start.elapsed().as_millis() as u32;
    let _ = kcp.update(now_ms());
    let (mut app_rd, mut app_wr) = tokio::io::split(app);
    let mut to_app = BytesMut::new();
    let mut from_app = vec![0u8; 16 << 10];
    let mut app_closed: Option<Instant> = None;
    let mut input_open = true;
    let mut next_update = Instant::now();
    // When the data waiting to be sent or acknowledged last shrank (or was none).
    let mut progress = Instant::now();
    let mut waiting = 0;
    loop {
        // What KCP has in order goes to the application, while it keeps up.
        while to_app.len() < RECV_BUFFER {
            let Ok(n) = kcp.peeksize() else { break };
            let at = to_app.len();
            to_app.resize(at + n, 0);
            match kcp.recv(&mut to_app[at..]) {
                Ok(got) => to_app.truncate(at + got),
                Err(_) => {
                    to_app.truncate(at);
                    break;
                }
            }
        }
        if kcp.is_dead_link() {
            return SessionEnd::DeadLink;
        }
        let now_waiting = kcp.wait_snd();
        if now_waiting == 0 || now_waiting < waiting {
            progress = Instant::now();
        }
        waiting = now_waiting;
        if waiting > 0 && progress.elapsed() >= stall {
            return SessionEnd::Stalled;
        }
        if let Some(since) = app_closed {
            if waiting == 0 {
                return SessionEnd::Finished;
            }
            if since.elapsed() >= LINGER {
                return SessionEnd::Lingered;
            }
        }
        let take = app_closed.is_none() && waiting < SEND_QUEUE;
        tokio::select! {
            d = input.recv(), if input_open => match d {
                Some(d) => {
                    // KCP's clock must be current before it timestamps anything.
                    let _ = kcp.update(now_ms());
                    // With overflow checks (debug builds), crafted timestamps or sequence
                    // numbers can overflow KCP's arithmetic; release builds wrap, as the
                    // protocol means. Either way the peer, not the process, pays.
                    let fed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let _ = kcp.input(&d);
                        // Acknowledge at once: the peer's resend timer is short.
                        let _ = kcp.flush();
                    }));
                    if fed.is_err() {
                        return SessionEnd::Malformed;
                    }
                }
                None => input_open = false,
            },
            r = app_rd.read(&mut from_app), if take => match r {
                Ok(0) | Err(_) => app_closed = Some(Instant::now()),
                Ok(n) => {
                    let _ = kcp.update(now_ms());
                    let _ = kcp.send(&from_app[..n]);
                    let _ = kcp.flush();
                }
            },
            r = app_wr.write(&to_app), if !to_app.is_empty() => match r {
                Ok(n) if n > 0 => to_app.advance(n),
                _ => {
                    if app_closed.is_some() {
                        // Closed and gone: nothing can read what is left.
                        to_app.clear();
                    } else {
                        return SessionEnd::Dropped;
                    }
                }
            },
            () = tokio::time::sleep_until(next_update) => {}
        }
        let now = now_ms();
        let _ = kcp.update(now);
        // With nothing in flight KCP has nothing to time: an idle session wakes once a
        // second, not every tick. (`check` gives the delay to the next flush, ≤ 10 ms.)
        let wait = if kcp.wait_snd() == 0 {
            1000
        } else {
            kcp.check(now).clamp(1, 100)
        };
        next_update = Instant::now() + Duration::from_millis(u64::from(wait));
        if to_app.is_empty() && to_app.capacity() > RECV_BUFFER {
            to_app = BytesMut::new();
        }
    }
}

/// A client's stall limit: data to the gateway waiting this long without progress ends the
/// session.
const CLIENT_STALL: Duration = Duration::from_secs(30);

/// Why a KCP connect failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No answer to the handshake in time.
    #[error("no answer from the gateway at {0} within the connect timeout")]
    Timeout(SocketAddr),
    /// The gateway refused a session.
    #[error("the gateway refused the session ({code}): {reason}")]
    Refused {
        /// Close code (see `wire::close_code`).
        code: u16,
        /// The gateway's reason.
        reason: String,
    },
    /// The socket failed.
    #[error("UDP: {0}")]
    Io(#[from] io::Error),
}

/// Connects to the gateway at `gateway` from a new UDP socket (the handshake, then a session
/// task on the current runtime). The returned stream carries the client's frames.
pub async fn connect(
    gateway: SocketAddr,
    timeout: Duration,
) -> Result<(DuplexStream, u32), ConnectError> {
    let local: SocketAddr = if gateway.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    connect_from(UdpSocket::bind(local).await?, gateway, timeout).await
}

/// As [`connect`], from a socket the caller bound (e.g. to keep a local port across
/// reconnects).
pub async fn connect_from(
    socket: UdpSocket,
    gateway: SocketAddr,
    timeout: Duration,
) -> Result<(DuplexStream, u32), ConnectError> {
    socket.connect(gateway).await?;
    let deadline = Instant::now()
        .checked_add(timeout)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365));
    let nonce = random_u64();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let hello = Handshake::Hello { nonce }.encode();
    let cookie = loop {
        match exchange(&socket, &hello, &mut buf, deadline, gateway).await? {
            Handshake::Cookie(c) if c.nonce == nonce => break c,
            _ => continue,
        }
    };
    let connect = Handshake::Connect(cookie).encode();
    loop {
        match exchange(&socket, &connect, &mut buf, deadline, gateway).await? {
            Handshake::Accept { conv } if conv == cookie.conv => break,
            Handshake::Refuse { conv, code, reason } if conv == cookie.conv => {
                return Err(ConnectError::Refused { code, reason });
            }
            _ => continue,
        }
    }
    let socket = Arc::new(socket);
    let (tx, rx) = mpsc::channel(INPUT_QUEUE);
    let (stream, task) = session(cookie.conv, socket.clone(), gateway, rx, CLIENT_STALL);
    // Reads the socket for the session until the session ends.
    tokio::spawn(async move {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            tokio::select! {
                r = socket.recv(&mut buf) => match r {
                    Ok(n) if n >= ::kcp::KCP_OVERHEAD && !is_handshake(&buf[..n])
                        && ::kcp::get_conv(&buf[..n]) == cookie.conv => {
                        let _ = tx.try_send(Bytes::copy_from_slice(&buf[..n]));
                    }
                    Ok(_) => {}
                    // ICMP unreachable and the like: KCP's resends decide.
                    Err(_) => {}
                },
                () = tx.closed() => return,
            }
        }
    });
    tokio::spawn(task);
    Ok((stream, cookie.conv))
}

/// Sends `request` every 200 ms until a handshake datagram comes back or `deadline`.
async fn exchange(
    socket: &UdpSocket,
    request: &[u8],
    buf: &mut [u8],
    deadline: Instant,
    gateway: SocketAddr,
) -> Result<Handshake, ConnectError> {
    loop {
        if Instant::now() >= deadline {
            return Err(ConnectError::Timeout(gateway));
        }
        // A refused port (ICMP) shows up as an error on a later call: keep trying.
        let _ = socket.send(request).await;
        let wait = (Instant::now() + Duration::from_millis(200)).min(deadline);
        loop {
            match tokio::time::timeout_at(wait, socket.recv(buf)).await {
                Err(_) => break,
                Ok(Err(_)) => continue,
                Ok(Ok(n)) => {
                    if let Some(h) = Handshake::decode(&buf[..n]) {
                        return Ok(h);
                    }
                }
            }
        }
    }
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // Only needs to tell this connect's answers from stale ones; not a secret.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::UNIX_EPOCH
            .elapsed()
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_datagrams_round_trip_and_answers_are_smaller_than_requests() {
        let c = Cookie {
            nonce: 7,
            conv: 0x7fff_0001,
            issued: 99,
            mac: [9; 16],
        };
        let refuse = Handshake::Refuse {
            conv: 5,
            code: 1013,
            reason: "x".repeat(100),
        };
        for h in [
            Handshake::Hello { nonce: 42 },
            Handshake::Cookie(c),
            Handshake::Connect(c),
            Handshake::Accept { conv: 3 },
        ] {
            let d = h.encode();
            assert_eq!(Handshake::decode(&d), Some(h.clone()));
        }
        let d = refuse.encode();
        assert!(
            matches!(Handshake::decode(&d), Some(Handshake::Refuse { reason, .. }) if reason.len() == MAX_REFUSE_REASON)
        );
        for answer in [
            Handshake::Cookie(c).encode(),
            d,
            Handshake::Accept { conv: 1 }.encode(),
        ] {
            assert!(answer.len() < REQUEST_LEN);
        }
        // An unpadded HELLO is not one.
        let mut short = Handshake::Hello { nonce: 1 }.encode();
        short.truncate(20);
        assert_eq!(Handshake::decode(&short), None);
        assert_eq!(Handshake::decode(b"junk"), None);
        assert!(!is_handshake(&[0u8; 24]));
    }

    /// Hostile segments (any header, any payload length) never panic a session: KCP's input
    /// is fed 20,000 crafted datagrams for its conv, with the reads and timer calls between.
    #[test]
    fn crafted_segments_do_not_panic_kcp() {
        struct Sink;
        impl io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut kcp = ::kcp::Kcp::new_stream(7, Sink);
        kcp.set_nodelay(true, 10, 2, true);
        kcp.set_wndsize(128, 64);
        let _ = kcp.update(0);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut out = vec![0u8; 1 << 20];
        for i in 0..20_000u32 {
            let mut d = Vec::new();
            for _ in 0..(next() % 3 + 1) {
                let r = next();
                d.extend_from_slice(&7u32.to_le_bytes());
                d.push([81, 82, 83, 84][(r % 4) as usize]);
                d.push((r >> 8) as u8); // frg
                d.extend_from_slice(&((r >> 16) as u16).to_le_bytes()); // wnd
                d.extend_from_slice(&(next() as u32).to_le_bytes()); // ts
                let sn = if r % 5 == 0 {
                    next() as u32
                } else {
                    (next() % 300) as u32
                };
                d.extend_from_slice(&sn.to_le_bytes());
                d.extend_from_slice(&(next() as u32).to_le_bytes()); // una
                let len = (next() % 1400) as u32;
                let claimed = if r % 7 == 0 { next() as u32 } else { len };
                d.extend_from_slice(&claimed.to_le_bytes());
                d.extend(std::iter::repeat_n(0xab, len as usize));
            }
            let _ = kcp.input(&d);
            while let Ok(n) = kcp.peeksize() {
                let cap = out.len();
                let _ = kcp.recv(&mut out[..n.min(cap)]);
            }
            let _ = kcp.send(b"x");
            let _ = kcp.update(i.wrapping_mul(7));
        }
    }

    /// A peer that keeps its receive window shut holds our data unsent: the session ends as
    /// stalled after its stall limit instead of waking every tick forever.
    #[tokio::test]
    async fn a_peer_that_keeps_its_window_shut_stalls_the_session_out() {
        let ours = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let theirs = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (tx, rx) = mpsc::channel(INPUT_QUEUE);
        let stall = Duration::from_millis(300);
        let (mut app, task) = session(9, ours, theirs.local_addr().unwrap(), rx, stall);
        let task = tokio::spawn(task);
        // The peer says its window is 0 (a window-size answer, cmd 84, wnd 0).
        let mut shut = vec![0u8; 24];
        shut[..4].copy_from_slice(&9u32.to_le_bytes());
        shut[4] = 84;
        tx.send(Bytes::from(shut)).await.unwrap();
        app.write_all(b"waits for a window that never opens")
            .await
            .unwrap();
        let started = Instant::now();
        let end = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the session ended")
            .unwrap();
        assert_eq!(end, SessionEnd::Stalled);
        assert!(started.elapsed() >= stall);
        drop(tx);
    }
}
