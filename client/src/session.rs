//! Resumable sessions: the wire format a session client, the gateway and the game server's
//! session layer share, and the bookkeeping both ends of a session keep.
//!
//! A session runs end to end between the client and the game server's session layer
//! (`clustergo::session`); the gateway between them only reads the client's hello and
//! forwards everything else unchanged. So a session outlives its connection and its gateway:
//! the client reconnects, over any transport, to any gateway, and picks up where it was.
//!
//! # Wire
//!
//! Every unit below is one data frame of [`wire`](crate::wire) (TCP, TLS and KCP:
//! length-prefixed; WebSocket: one binary message).
//!
//! - **Hello** (client → gateway, the connection's first data frame): [`MAGIC`], [`VERSION`],
//!   then a kind byte:
//!   - `0` (new session): the rest is the routing key (what a v1 client's first frame was:
//!     e.g. an account id for a sticky gateway; may be empty);
//!   - `1` (resume): `received` (`u64` big endian: the data frames the client got so far),
//!     then the session's token ([`Token::LEN`] bytes).
//!
//!   A first frame that does not start with [`MAGIC`] is a version 1 client's first frame:
//!   no session, frames pass as they are. A hello with another version is refused with
//!   [`code::VERSION`].
//! - Then, both ways, **session frames**: a type byte, then its body.
//!   - `1` **data**: the application's frame. The n-th data frame one side sends in a session
//!     has sequence number n (from 1, across reconnections): it is never on the wire.
//!   - `2` **ack**: `u64` big endian, how many data frames this side received in the session.
//!     Sent after [`ACK_EVERY`] unacknowledged frames, or [`ACK_DELAY`] after the first of
//!     them, whichever is sooner.
//!   - `3` **welcome** (game server → client, first on every connection of a session):
//!     `received` (`u64` big endian: the data frames the server got so far), then a fresh
//!     token ([`Token::LEN`] bytes) for the next resume.
//!   - `4` **bye** (either way): the session ends by choice; the other side ends it too.
//!
//! Each side keeps what it sent and the other has not acknowledged ([`Replay`], bounded in
//! frames and bytes: over the bound the session ends with [`code::REPLAY_FULL`]). On resume
//! each side learns what the other received (the hello's `received`, the welcome's
//! `received`) and sends again exactly the frames after it: nothing twice, nothing lost,
//! order kept.
//!
//! # Ends
//!
//! A session client is closed with a reason whose first word is a stable code ([`code`]), then
//! a short public reason: `4003 session no longer exists`. On WebSocket the close code is that
//! code. Internals (addresses, transport errors) go to the gateway's and server's logs only.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

/// What a session hello starts with (a byte no text starts with, then `cgsess`).
pub const MAGIC: [u8; 7] = *b"\0cgsess";

/// The session wire version this crate speaks.
pub const VERSION: u8 = 2;

/// Unacknowledged data frames after which a side acknowledges at once.
pub const ACK_EVERY: u64 = 32;

/// How long a side waits, after the first data frame it has not acknowledged, before it
/// acknowledges anyway.
pub const ACK_DELAY: Duration = Duration::from_millis(100);

/// How long an ack that is due (after [`ACK_EVERY`] frames) waits for a data frame going the
/// other way to ride with: written in the same write, it costs no write (nor a gateway's
/// read and write) of its own. A side that sends nothing meanwhile sends it alone.
pub const ACK_RIDE: Duration = Duration::from_millis(10);

/// Stable codes a session is ended with (the first word of the close reason; the WebSocket
/// close code). 1000-1013 mean what they mean for WebSocket; 4000-4099 are the session's own.
pub mod code {
    /// The session ended by choice (a bye, or the game ended it).
    pub const NORMAL: u16 = 1000;
    /// The gateway is shutting down: resume, on another gateway.
    pub const GOING_AWAY: u16 = 1001;
    /// The game server is unavailable: resume (or reconnect).
    pub const SERVER_UNAVAILABLE: u16 = 1011;
    /// The game server is shutting down (a restart, a rolled pod): the session is over, as its
    /// state was the game server's; start a new one (it goes to a server that stays).
    pub const SERVER_RESTART: u16 = 1012;
    /// No game server could take a new session, or the gateway is full: try again later.
    pub const TRY_AGAIN: u16 = 1013;
    /// The token is not one the cluster issued (forged or damaged).
    pub const BAD_TOKEN: u16 = 4001;
    /// The token has expired.
    pub const EXPIRED: u16 = 4002;
    /// The session no longer exists (ended, its resume window passed, or its game server
    /// restarted).
    pub const NO_SESSION: u16 = 4003;
    /// More was sent than the other side acknowledged than the replay buffer holds.
    pub const REPLAY_FULL: u16 = 4004;
    /// The hello's version is not spoken here.
    pub const VERSION: u16 = 4005;
    /// The session broke the protocol (a malformed frame, an impossible count).
    pub const PROTOCOL: u16 = 4006;
    /// The session was resumed on another connection: this one is stale.
    pub const REPLACED: u16 = 4007;

    /// Whether a session ended with `code` can be resumed by reconnecting.
    pub fn resumable(code: u16) -> bool {
        matches!(code, GOING_AWAY | SERVER_UNAVAILABLE)
    }
}

/// `code` and a public `text` as a close reason: `"4003 session no longer exists"`.
pub fn close_reason(code: u16, text: &str) -> String {
    format!("{code} {text}")
}

/// The code and text of a close reason made by [`close_reason`]; no code for other reasons.
pub fn parse_close(reason: &str) -> (Option<u16>, &str) {
    match reason.split_once(' ') {
        Some((c, text)) if c.len() == 4 => match c.parse() {
            Ok(code) => (Some(code), text),
            Err(_) => (None, reason),
        },
        _ => (None, reason),
    }
}

/// A session frame or hello that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionWireError {
    /// A hello of another version.
    #[error("session version {0} is not spoken here (this side speaks {VERSION})")]
    Version(u8),
    /// A hello or session frame that is too short, of an unknown kind or type, or whose
    /// token is not [`Token::LEN`] bytes.
    #[error("malformed session {0}")]
    Malformed(&'static str),
}

/// The client's first frame of a session connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A new session; `key` routes it (a sticky gateway picks the server by it).
    New {
        /// The routing key (may be empty).
        key: Bytes,
    },
    /// Resume the session `token` names; the client received `received` data frames so far.
    Resume {
        /// The latest token the session gave.
        token: Token,
        /// Data frames the client received in the session.
        received: u64,
    },
}

impl Hello {
    /// The hello as a data frame's payload.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(MAGIC.len() + 2 + 8 + Token::LEN);
        b.put_slice(&MAGIC);
        b.put_u8(VERSION);
        match self {
            Hello::New { key } => {
                b.put_u8(0);
                b.put_slice(key);
            }
            Hello::Resume { token, received } => {
                b.put_u8(1);
                b.put_u64(*received);
                b.put_slice(&token.to_bytes());
            }
        }
        b.freeze()
    }

    /// Reads a connection's first data frame: `Ok(None)` when it is not a session hello (a
    /// version 1 client's frame).
    pub fn decode(frame: &Bytes) -> Result<Option<Hello>, SessionWireError> {
        let Some(rest) = frame.strip_prefix(&MAGIC[..]) else {
            return Ok(None);
        };
        let (&version, rest) = rest
            .split_first()
            .ok_or(SessionWireError::Malformed("hello"))?;
        if version != VERSION {
            return Err(SessionWireError::Version(version));
        }
        let (&kind, rest) = rest
            .split_first()
            .ok_or(SessionWireError::Malformed("hello"))?;
        match kind {
            0 => Ok(Some(Hello::New {
                key: frame.slice(MAGIC.len() + 2..),
            })),
            1 => {
                let (received, token) =
                    split_u64(rest).ok_or(SessionWireError::Malformed("hello"))?;
                let token = Token::parse(token).ok_or(SessionWireError::Malformed("token"))?;
                Ok(Some(Hello::Resume { token, received }))
            }
            _ => Err(SessionWireError::Malformed("hello")),
        }
    }
}

fn split_u64(b: &[u8]) -> Option<(u64, &[u8])> {
    let (n, rest) = b.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*n), rest))
}

/// What a session's token carries: which session, on which game server, until when, and the
/// cluster's signature over that (checked by gateways and game servers, which share the
/// cluster secret; the client only keeps it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    /// The session's id (random).
    pub id: [u8; 16],
    /// The logical address (`u32`) of the game server holding the session.
    pub server: u32,
    /// Which of the session's tokens this is (each connection gets the next one): a copy of
    /// an older one is refused.
    pub generation: u32,
    /// When the token stops being accepted, in seconds since the Unix epoch.
    pub expires: u64,
    /// The signature (HMAC-SHA256 under a key derived from the cluster secret, truncated).
    pub mac: [u8; 16],
}

impl Token {
    /// Bytes on the wire.
    pub const LEN: usize = 16 + 4 + 4 + 8 + 16;

    /// The signed part: id, server, generation, expiry.
    pub fn signed(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[..16].copy_from_slice(&self.id);
        b[16..20].copy_from_slice(&self.server.to_be_bytes());
        b[20..24].copy_from_slice(&self.generation.to_be_bytes());
        b[24..].copy_from_slice(&self.expires.to_be_bytes());
        b
    }

    /// The token as bytes.
    pub fn to_bytes(&self) -> [u8; Token::LEN] {
        let mut b = [0u8; Token::LEN];
        b[..32].copy_from_slice(&self.signed());
        b[32..].copy_from_slice(&self.mac);
        b
    }

    /// A token from exactly [`Token::LEN`] bytes.
    pub fn parse(b: &[u8]) -> Option<Token> {
        if b.len() != Token::LEN {
            return None;
        }
        let mut t = Token {
            id: [0; 16],
            server: 0,
            generation: 0,
            expires: 0,
            mac: [0; 16],
        };
        t.id.copy_from_slice(&b[..16]);
        t.server = u32::from_be_bytes(b[16..20].try_into().ok()?);
        t.generation = u32::from_be_bytes(b[20..24].try_into().ok()?);
        t.expires = u64::from_be_bytes(b[24..32].try_into().ok()?);
        t.mac.copy_from_slice(&b[32..]);
        Some(t)
    }
}

/// One session frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The application's frame.
    Data(Bytes),
    /// The sender received this many data frames.
    Ack(u64),
    /// The game server's greeting on each connection: what it received, and the next token.
    Welcome {
        /// Data frames the server received in the session.
        received: u64,
        /// The token for the next resume.
        token: Token,
    },
    /// The session ends by choice.
    Bye,
}

/// The type byte of a data frame (a sender may write it before the payload itself, instead
/// of building the frame with [`Frame::data`]).
pub const DATA: u8 = 1;
const ACK: u8 = 2;
const WELCOME: u8 = 3;
const BYE: u8 = 4;

impl Frame {
    /// The data frame of `payload` (its one copy).
    pub fn data(payload: &[u8]) -> Bytes {
        let mut b = BytesMut::with_capacity(1 + payload.len());
        b.put_u8(DATA);
        b.put_slice(payload);
        b.freeze()
    }

    /// The frame's bytes.
    pub fn encode(&self) -> Bytes {
        match self {
            Frame::Data(p) => Frame::data(p),
            Frame::Ack(n) => {
                let mut b = BytesMut::with_capacity(9);
                b.put_u8(ACK);
                b.put_u64(*n);
                b.freeze()
            }
            Frame::Welcome { received, token } => {
                let mut b = BytesMut::with_capacity(9 + Token::LEN);
                b.put_u8(WELCOME);
                b.put_u64(*received);
                b.put_slice(&token.to_bytes());
                b.freeze()
            }
            Frame::Bye => Bytes::from_static(&[BYE]),
        }
    }

    /// Reads one frame; a data frame's payload shares `frame`'s memory.
    pub fn decode(frame: Bytes) -> Result<Frame, SessionWireError> {
        match frame.first() {
            Some(&DATA) => Ok(Frame::Data(frame.slice(1..))),
            Some(&ACK) => match split_u64(&frame[1..]) {
                Some((n, [])) => Ok(Frame::Ack(n)),
                _ => Err(SessionWireError::Malformed("ack")),
            },
            Some(&WELCOME) => {
                let (received, token) =
                    split_u64(&frame[1..]).ok_or(SessionWireError::Malformed("welcome"))?;
                let token = Token::parse(token).ok_or(SessionWireError::Malformed("token"))?;
                Ok(Frame::Welcome { received, token })
            }
            Some(&BYE) if frame.len() == 1 => Ok(Frame::Bye),
            _ => Err(SessionWireError::Malformed("frame")),
        }
    }
}

/// The replay buffer went over its bound: the session cannot keep its promise and ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "replay buffer full: {frames} frames / {bytes} bytes not acknowledged (bound {max_frames} frames / {max_bytes} bytes)"
)]
pub struct ReplayFull {
    /// Frames held, with the one that did not fit.
    pub frames: usize,
    /// Bytes held, with the one that did not fit.
    pub bytes: usize,
    /// The bound in frames.
    pub max_frames: usize,
    /// The bound in bytes.
    pub max_bytes: usize,
}

/// A count the other side cannot honestly give (more than was sent, or behind what it said
/// before such that frames it needs were already dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the other side says it received {said} data frames; {sent} were sent, {kept_from} is the oldest kept"
)]
pub struct BadCount {
    /// The count it gave.
    pub said: u64,
    /// Data frames sent in the session.
    pub sent: u64,
    /// The sequence number of the oldest frame still kept.
    pub kept_from: u64,
}

/// Payloads below this are copied into the replay buffer's own blocks; larger ones into an
/// allocation of their own.
const COPY_BELOW: usize = 512;
/// The sizes of those blocks: twice what the buffer holds, within these. Frames are
/// acknowledged in order, so the blocks alive are the oldest unacknowledged frame's to the
/// current one: beyond the bytes counted, a buffer holds at most about two blocks.
const MIN_BLOCK: usize = 128;
const MAX_BLOCK: usize = 1024;

/// What one side sent that the other has not acknowledged, in order, bounded.
///
/// It keeps the payloads, not encoded frames (the sender writes the data frame's type byte
/// as it writes the frame, with no copy of its own), and counts each as its encoded size:
/// one byte more.
#[derive(Debug)]
pub struct Replay {
    /// Payloads of data frames, the oldest first.
    frames: VecDeque<Bytes>,
    /// Where small payloads are copied (see [`Replay::push`]).
    block: BytesMut,
    /// Data frames sent in the session (the newest one's sequence number).
    sent: u64,
    bytes: usize,
    max_frames: usize,
    max_bytes: usize,
}

impl Replay {
    /// An empty buffer holding at most `max_frames` frames and `max_bytes` bytes.
    pub fn new(max_frames: usize, max_bytes: usize) -> Replay {
        Replay {
            frames: VecDeque::new(),
            block: BytesMut::new(),
            sent: 0,
            bytes: 0,
            max_frames,
            max_bytes,
        }
    }

    /// Keeps a copy of a data frame's payload (not the encoded frame: the sender writes the
    /// type byte itself) until acknowledged; its sequence number, or why it does not fit.
    ///
    /// It is always a copy, so what the buffer counts is what it holds (a `Bytes` kept as it
    /// is would keep alive all the memory it shares: a connection's read buffer, a game's
    /// large `Vec`). A small payload (under 512 bytes) is copied into a block of the
    /// buffer's own (128 bytes to 1 KiB as the buffer fills: one allocation for many frames,
    /// let go whenever the buffer empties), a larger one into an allocation of its own.
    pub fn keep(&mut self, payload: &[u8]) -> Result<u64, ReplayFull> {
        let (frames, bytes) = (self.frames.len() + 1, self.bytes + 1 + payload.len());
        if frames > self.max_frames || bytes > self.max_bytes {
            return Err(ReplayFull {
                frames,
                bytes,
                max_frames: self.max_frames,
                max_bytes: self.max_bytes,
            });
        }
        self.bytes = bytes;
        let kept = if payload.len() < COPY_BELOW {
            if self.block.capacity() - self.block.len() < payload.len() {
                // Sized to what the buffer holds: a session that keeps one small frame holds a
                // small block, a busy one few allocations.
                let size = (2 * bytes).clamp(MIN_BLOCK, MAX_BLOCK).max(payload.len());
                self.block = BytesMut::with_capacity(size);
            }
            self.block.extend_from_slice(payload);
            self.block.split().freeze()
        } else {
            Bytes::copy_from_slice(payload)
        };
        self.frames.push_back(kept);
        self.sent += 1;
        Ok(self.sent)
    }

    /// The sequence number of the oldest frame kept (`sent + 1` when none is).
    fn kept_from(&self) -> u64 {
        self.sent + 1 - self.frames.len() as u64
    }

    /// The other side received `received` data frames: forgets those. A count beyond what was
    /// sent is an error; one behind an earlier count is ignored.
    pub fn ack(&mut self, received: u64) -> Result<(), BadCount> {
        if received > self.sent {
            return Err(self.bad(received));
        }
        while self.kept_from() <= received {
            if let Some(f) = self.frames.pop_front() {
                self.bytes -= 1 + f.len();
            }
        }
        if self.frames.is_empty() {
            // Nothing refers to the block any more: let it go (an idle session holds none).
            self.block = BytesMut::new();
            if self.frames.capacity() > 64 {
                // Let a burst's allocation go (not the usual one, a little over
                // `ACK_EVERY` frames: that would be freed and grown again between every two
                // acknowledgements).
                self.frames.shrink_to(16);
            }
        }
        Ok(())
    }

    /// The payloads to send again to a side that received `received`: all after it, in order.
    /// An error when the count is beyond what was sent or some of them were already dropped
    /// (acknowledged before, so the count went back).
    pub fn after(&mut self, received: u64) -> Result<impl Iterator<Item = &Bytes>, BadCount> {
        if received > self.sent || received + 1 < self.kept_from() {
            return Err(self.bad(received));
        }
        self.ack(received)?;
        Ok(self.frames.iter())
    }

    fn bad(&self, said: u64) -> BadCount {
        BadCount {
            said,
            sent: self.sent,
            kept_from: self.kept_from(),
        }
    }

    /// Data frames sent in the session.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Frames kept.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Bytes kept.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// What one side received, and what it has told the other.
#[derive(Debug, Default, Clone, Copy)]
pub struct Receipts {
    /// Data frames received in the session.
    pub received: u64,
    /// The count last sent in an ack or welcome.
    pub told: u64,
}

impl Receipts {
    /// One more data frame arrived; `true` when an ack is due at once ([`ACK_EVERY`]).
    pub fn got(&mut self) -> bool {
        self.received += 1;
        self.received - self.told >= ACK_EVERY
    }

    /// Whether an ack is due at once ([`ACK_EVERY`] frames not acknowledged).
    pub fn due(&self) -> bool {
        self.received - self.told >= ACK_EVERY
    }

    /// Whether something arrived that the other side was not told of.
    pub fn owed(&self) -> bool {
        self.received > self.told
    }

    /// The ack to send now, if one is owed (and marks it told).
    pub fn ack(&mut self) -> Option<Bytes> {
        self.owed().then(|| {
            self.told = self.received;
            Frame::Ack(self.received).encode()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Token {
        Token {
            id: [7; 16],
            server: 0x0101_0001,
            generation: 3,
            expires: 1_800_000_000,
            mac: [9; 16],
        }
    }

    #[test]
    fn hellos_and_frames_round_trip() {
        for h in [
            Hello::New {
                key: Bytes::from_static(b"account-42"),
            },
            Hello::New { key: Bytes::new() },
            Hello::Resume {
                token: token(),
                received: 12345,
            },
        ] {
            assert_eq!(Hello::decode(&h.encode()).unwrap(), Some(h));
        }
        assert_eq!(Hello::decode(&Bytes::from_static(b"whoami")).unwrap(), None);
        let mut other = Hello::New { key: Bytes::new() }.encode().to_vec();
        other[7] = 3;
        assert_eq!(
            Hello::decode(&Bytes::from(other)),
            Err(SessionWireError::Version(3))
        );
        let mut short = Hello::Resume {
            token: token(),
            received: 1,
        }
        .encode()
        .to_vec();
        short.pop();
        assert!(Hello::decode(&Bytes::from(short)).is_err());
        for f in [
            Frame::Data(Bytes::from_static(b"x")),
            Frame::Data(Bytes::new()),
            Frame::Ack(u64::MAX),
            Frame::Welcome {
                received: 3,
                token: token(),
            },
            Frame::Bye,
        ] {
            assert_eq!(Frame::decode(f.encode()).unwrap(), f);
        }
        for bad in [&b""[..], b"\x09", b"\x02\x00", b"\x04\x00", b"\x03\x00"] {
            assert!(
                Frame::decode(Bytes::copy_from_slice(bad)).is_err(),
                "{bad:?}"
            );
        }
        assert_eq!(Token::parse(&token().to_bytes()), Some(token()));
        assert_eq!(
            parse_close(&close_reason(4003, "gone")),
            (Some(4003), "gone")
        );
        assert_eq!(parse_close("bye"), (None, "bye"));
    }

    #[test]
    fn replay_keeps_what_is_unacknowledged_and_resends_exactly_the_rest() {
        let mut r = Replay::new(4, 100);
        let p = |b: &[u8]| Bytes::copy_from_slice(b);
        for i in 1..=3u8 {
            assert_eq!(r.keep(&p(&[i])).unwrap(), u64::from(i));
        }
        r.ack(1).unwrap();
        assert_eq!(r.len(), 2);
        // An old count (behind) is ignored; the other side may have acked late.
        r.ack(0).unwrap();
        let again: Vec<Bytes> = r.after(1).unwrap().cloned().collect();
        assert_eq!(again, vec![p(&[2]), p(&[3])]);
        let again: Vec<Bytes> = r.after(2).unwrap().cloned().collect();
        assert_eq!(again, vec![p(&[3])]);
        // Frame 2 is gone: a side claiming it never got it cannot be served.
        assert!(r.after(1).is_err());
        assert!(r.ack(4).is_err());
        r.keep(&p(&[4])).unwrap();
        r.keep(&p(&[5])).unwrap();
        r.keep(&p(&[6])).unwrap();
        let full = r.keep(&p(&[7])).unwrap_err();
        assert_eq!((full.frames, full.max_frames), (5, 4));
        // Counted as encoded: a byte more each.
        let mut small = Replay::new(100, 6);
        small.keep(&p(b"abc")).unwrap();
        assert_eq!(small.bytes(), 4);
        assert!(small.keep(&p(b"d")).is_ok());
        assert!(small.keep(&p(b"")).is_err());
    }

    #[test]
    fn receipts_ack_every_so_often() {
        let mut r = Receipts::default();
        for _ in 1..ACK_EVERY {
            assert!(!r.got());
        }
        assert!(r.got());
        assert_eq!(r.ack().map(Frame::decode), Some(Ok(Frame::Ack(ACK_EVERY))));
        assert!(r.ack().is_none());
    }
}
