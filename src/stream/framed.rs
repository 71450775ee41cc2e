//! Frames over a stream: `u32` big-endian length, then that many bytes — the framing a gateway
//! forwards between its clients and the stream it opens for each, so game code reads and writes
//! whole frames and never parses lengths.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use super::{Stream, StreamMeta};
use crate::addr::LogicAddr;
use crate::error::StreamError;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// A frame over the limit given to [`Frames::new`]: sent by the peer (the session cannot
    /// go on: the rest of the byte stream is not framed any more) or offered to `send`.
    #[error("frame of {size} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// Its length (as announced by the peer, or offered).
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The peer ended the stream in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The stream failed (reset, link lost, …).
    #[error(transparent)]
    Stream(StreamError),
    /// Another I/O failure.
    #[error("stream I/O failed: {0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for FrameError {
    fn from(e: std::io::Error) -> Self {
        if let Some(s) = StreamError::from_io(&e) {
            return FrameError::Stream(s.clone());
        }
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            return FrameError::Truncated;
        }
        FrameError::Io(e)
    }
}

/// A [`Stream`] read and written as length-prefixed frames.
///
/// ```no_run
/// # async fn serve(stream: clustergo::Stream) -> Result<(), clustergo::FrameError> {
/// use clustergo::Frames;
/// let mut frames = Frames::new(stream, 64 << 10);
/// while let Some(frame) = frames.recv().await? {
///     frames.send(frame).await?; // echo
/// }
/// frames.close().await
/// # }
/// ```
#[derive(Debug)]
pub struct Frames {
    inner: Framed<Stream, LengthDelimitedCodec>,
    peer: LogicAddr,
    meta: StreamMeta,
    limit: usize,
}

impl Frames {
    /// Frames over `stream`; frames longer than `max_frame` bytes are errors both ways.
    pub fn new(stream: Stream, max_frame: usize) -> Self {
        // A length is a u32 on the wire.
        let max_frame = max_frame.min(u32::MAX as usize);
        let (peer, meta) = (stream.peer(), stream.metadata().clone());
        let codec = LengthDelimitedCodec::builder()
            .length_field_type::<u32>()
            .big_endian()
            .max_frame_length(max_frame)
            .new_codec();
        Frames {
            // A small first read buffer: a game server holds one per client, most of them idle;
            // it grows to the frames that arrive.
            inner: Framed::with_capacity(stream, codec, 512),
            peer,
            meta,
            limit: max_frame,
        }
    }

    /// The node at the other end.
    pub fn peer(&self) -> LogicAddr {
        self.peer
    }

    /// The stream's open metadata.
    pub fn metadata(&self) -> &StreamMeta {
        &self.meta
    }

    /// The next frame; `Ok(None)` when the peer closed the stream cleanly between frames.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, FrameError> {
        match self.inner.next().await {
            None => Ok(None),
            Some(Ok(frame)) => Ok(Some(frame.freeze())),
            Some(Err(e)) => Err(self.read_error(e)),
        }
    }

    fn read_error(&self, e: std::io::Error) -> FrameError {
        // The codec reports an oversize length as `InvalidData` carrying its own error type.
        if e.kind() == std::io::ErrorKind::InvalidData
            && e.get_ref()
                .is_some_and(|inner| inner.is::<tokio_util::codec::LengthDelimitedCodecError>())
        {
            let size = self
                .inner
                .read_buffer()
                .get(..4)
                .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
            return FrameError::TooLarge {
                size,
                limit: self.limit,
            };
        }
        // `Framed` reports a stream that ended inside a frame this way (tokio-util's default
        // `decode_eof`).
        if e.kind() == std::io::ErrorKind::Other && e.to_string() == "bytes remaining on stream" {
            return FrameError::Truncated;
        }
        e.into()
    }

    /// Sends one frame (and flushes it to the link).
    pub async fn send(&mut self, frame: Bytes) -> Result<(), FrameError> {
        if frame.len() > self.limit {
            return Err(FrameError::TooLarge {
                size: frame.len(),
                limit: self.limit,
            });
        }
        self.inner.send(frame).await.map_err(FrameError::from)
    }

    /// Puts one frame into the write buffer, unflushed: the next send carries it.
    pub(crate) fn buffer(&mut self, frame: &[u8]) {
        use bytes::BufMut;
        let buf = self.inner.write_buffer_mut();
        buf.reserve(4 + frame.len());
        buf.put_u32(frame.len() as u32);
        buf.put_slice(frame);
    }

    /// Sends one frame of `tag` then `payload` (and flushes it), written straight into the
    /// write buffer: no frame of its own is built (a session's data frame is its payload
    /// with a type byte before it).
    pub(crate) async fn send_tagged(&mut self, tag: u8, payload: &[u8]) -> Result<(), FrameError> {
        use bytes::BufMut;
        let len = 1 + payload.len();
        if len > self.limit {
            return Err(FrameError::TooLarge {
                size: len,
                limit: self.limit,
            });
        }
        let buf = self.inner.write_buffer_mut();
        buf.reserve(4 + len);
        buf.put_u32(len as u32);
        buf.put_u8(tag);
        buf.put_slice(payload);
        SinkExt::<Bytes>::flush(&mut self.inner)
            .await
            .map_err(FrameError::from)
    }

    /// Flushes what was sent and half-closes the stream: the peer reads every frame, then the
    /// end. Dropping `Frames` instead resets the stream, as dropping a [`Stream`] does.
    pub async fn close(mut self) -> Result<(), FrameError> {
        SinkExt::<Bytes>::close(&mut self.inner)
            .await
            .map_err(FrameError::from)
    }

    /// The stream underneath, with any bytes already read past the last frame dropped.
    pub fn into_stream(self) -> Stream {
        self.inner.into_inner()
    }
}
