//! The gateway's client wire format, shared by [`Client`](crate::Client) and the gateway.
//!
//! On TCP (plain or TLS) and KCP a connection carries frames: a `u32` big-endian length, then
//! that many bytes. On WebSocket each binary message is one frame and the length is the
//! message's.
//!
//! - A **data frame** (length ≥ 1) passes through the gateway unchanged, both ways.
//! - A **heartbeat** is a frame of length 0. The gateway answers each with one heartbeat and
//!   does not forward it; it keeps an otherwise quiet client from the idle timeout.
//! - A **close frame** (TCP and KCP only) has the top bit of the length set: the other 31 bits
//!   give the length of a UTF-8 reason (at most [`MAX_REASON`] bytes). The side that sends it
//!   closes the connection after it; the gateway answers a client's close frame with one of
//!   its own (reason `bye`). KCP has no end-of-stream of its own, so this is how either side
//!   learns that the other left and why, and that its own close arrived. On WebSocket the close message's code and reason
//!   carry the same thing ([`close_code`]).

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes before each frame's payload on TCP and KCP.
pub const HEADER: usize = 4;

/// The bit of the length word that marks a close frame.
pub const CLOSE_BIT: u32 = 1 << 31;

/// Longest close reason sent or accepted, in bytes (longer reasons are clipped when sent).
pub const MAX_REASON: usize = 1024;

/// Longest close reason a WebSocket close message can carry (125-byte control payload minus
/// the 2-byte code).
pub const MAX_WS_REASON: usize = 123;

/// Most [`decode`] reserves at once for a frame still arriving.
const RESERVE_STEP: usize = 64 << 10;

/// Largest frame limit either side may configure: lengths use 31 bits.
pub const MAX_FRAME_LIMIT: usize = (CLOSE_BIT - 1) as usize;

/// One decoded unit of the wire format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A data frame (never empty).
    Data(Bytes),
    /// A zero-length frame.
    Heartbeat,
    /// The peer is closing, for this reason.
    Close(String),
}

/// A length prefix the receiver cannot accept; the connection cannot go on after it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// A data frame announced as longer than the receiver's limit.
    #[error("frame of {size} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// The announced length.
        size: usize,
        /// The receiver's limit.
        limit: usize,
    },
    /// A close frame announcing a reason longer than [`MAX_REASON`].
    #[error("close frame with a reason of {size} bytes (at most {MAX_REASON})")]
    BadClose {
        /// The announced length.
        size: usize,
    },
}

/// Takes the next complete unit off the front of `buf`, if it holds one.
///
/// Checks the length word as soon as it is there, so an oversize announcement fails before
/// any of its payload is buffered.
pub fn decode(buf: &mut BytesMut, limit: usize) -> Result<Option<Inbound>, WireError> {
    let Some(word) = buf.get(..HEADER) else {
        return Ok(None);
    };
    let word = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
    let close = word & CLOSE_BIT != 0;
    let size = (word & !CLOSE_BIT) as usize;
    if close && size > MAX_REASON {
        return Err(WireError::BadClose { size });
    }
    if !close && size > limit {
        return Err(WireError::TooLarge { size, limit });
    }
    if buf.len() < HEADER + size {
        // Room for the rest of the frame, 64 KiB at a time: memory follows the bytes that
        // arrive, not what a length word announces.
        buf.reserve((HEADER + size - buf.len()).min(RESERVE_STEP));
        return Ok(None);
    }
    buf.advance(HEADER);
    let payload = buf.split_to(size).freeze();
    if buf.is_empty() {
        // The payload shares the buffer's allocation; an empty buffer holding on to it would
        // keep the last (possibly large) allocation alive after the frame is gone, for as long
        // as the connection idles. The next read starts a small one.
        *buf = BytesMut::new();
    }
    Ok(Some(if close {
        Inbound::Close(String::from_utf8_lossy(&payload).into_owned())
    } else if size == 0 {
        Inbound::Heartbeat
    } else {
        Inbound::Data(payload)
    }))
}

/// Appends a data frame (or, for an empty payload, a heartbeat).
///
/// The caller keeps payloads within its limit; a payload of [`MAX_FRAME_LIMIT`] bytes or more
/// cannot be represented and is a bug of the caller.
pub fn put_frame(buf: &mut BytesMut, payload: &[u8]) {
    assert!(payload.len() <= MAX_FRAME_LIMIT, "frame over 31 bits");
    buf.reserve(HEADER + payload.len());
    buf.put_u32(payload.len() as u32);
    buf.put_slice(payload);
}

/// Appends a close frame carrying `reason`, clipped to [`MAX_REASON`] bytes.
pub fn put_close(buf: &mut BytesMut, reason: &str) {
    let reason = clip(reason, MAX_REASON);
    buf.put_u32(CLOSE_BIT | reason.len() as u32);
    buf.put_slice(reason.as_bytes());
}

/// `text` cut to at most `max` bytes at a character boundary.
pub fn clip(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// WebSocket close codes the gateway uses, by the kind of reason.
pub mod close_code {
    /// The session ended normally (the game server or the client ended it).
    pub const NORMAL: u16 = 1000;
    /// The gateway is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// A text message, or anything else the gateway cannot forward.
    pub const UNSUPPORTED: u16 = 1003;
    /// The client broke a limit: handshake or idle timeout, rate, not reading.
    pub const POLICY: u16 = 1008;
    /// A frame over the gateway's limit.
    pub const TOO_BIG: u16 = 1009;
    /// The game server failed or was lost.
    pub const SERVER_ERROR: u16 = 1011;
    /// No game server could take the client, or the gateway is full: try again later.
    pub const TRY_AGAIN: u16 = 1013;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_heartbeats_and_close_round_trip() {
        let mut buf = BytesMut::new();
        put_frame(&mut buf, b"hello");
        put_frame(&mut buf, b"");
        put_close(&mut buf, "bye");
        assert_eq!(
            decode(&mut buf, 16).unwrap(),
            Some(Inbound::Data(Bytes::from_static(b"hello")))
        );
        assert_eq!(decode(&mut buf, 16).unwrap(), Some(Inbound::Heartbeat));
        assert_eq!(
            decode(&mut buf, 16).unwrap(),
            Some(Inbound::Close("bye".into()))
        );
        assert_eq!(decode(&mut buf, 16).unwrap(), None);
    }

    #[test]
    fn partial_input_waits_and_oversize_fails_early() {
        let mut buf = BytesMut::new();
        put_frame(&mut buf, b"abcdef");
        let mut part = buf.split_to(7);
        assert_eq!(decode(&mut part, 16).unwrap(), None);
        part.unsplit(buf);
        assert_eq!(
            decode(&mut part, 16).unwrap(),
            Some(Inbound::Data(Bytes::from_static(b"abcdef")))
        );
        let mut big = BytesMut::from(&[0x00, 0x01, 0x00, 0x00][..]);
        assert_eq!(
            decode(&mut big, 1024),
            Err(WireError::TooLarge {
                size: 65536,
                limit: 1024
            })
        );
        let mut bad_close = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            decode(&mut bad_close, 1024),
            Err(WireError::BadClose { .. })
        ));
    }

    #[test]
    fn an_emptied_buffer_lets_go_of_the_frames_allocation() {
        let mut buf = BytesMut::new();
        put_frame(&mut buf, &[7; 60_000]);
        let frame = decode(&mut buf, 1 << 20).unwrap();
        assert!(matches!(frame, Some(Inbound::Data(ref b)) if b.len() == 60_000));
        assert_eq!(buf.capacity(), 0);
    }

    #[test]
    fn close_reasons_are_clipped_at_a_char_boundary() {
        let long = "é".repeat(MAX_REASON);
        let mut buf = BytesMut::new();
        put_close(&mut buf, &long);
        match decode(&mut buf, 16).unwrap() {
            Some(Inbound::Close(r)) => {
                assert!(r.len() <= MAX_REASON && r.len() >= MAX_REASON - 1);
                assert!(r.chars().all(|c| c == 'é'));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(clip("abc", 2), "ab");
    }
}
