//! Byte streams between nodes: many per link, each ordered and flow-controlled.
//!
//! A [`Stream`] is opened with [`Node::open_stream`](crate::Node::open_stream) and accepted by
//! the handler the target registered with
//! [`NodeBuilder::on_stream`](crate::NodeBuilder::on_stream). It implements tokio's
//! [`AsyncRead`] and [`AsyncWrite`]: `shutdown` is a half-close (the peer reads to EOF and can
//! still write back), dropping a stream before it is closed both ways — or
//! [`Stream::reset`] — aborts it, and the peer's reads and writes fail with
//! [`StreamError::Reset`].
//!
//! Streams ride the same link as RPC and messages, and cross clusters through harbors like
//! them (both directions by the same harbors, which end a stream at both sides when one of
//! their links fails). Each has a receive window
//! ([`NodeConfig::stream_window`](crate::NodeConfig::stream_window)): a reader that stops
//! reading stalls only its own stream's writer; other streams, calls and messages keep
//! flowing. Small writes are coalesced into the link's batches.
//!
//! Ordering: the bytes of one stream arrive in order. Across streams, and between a stream
//! and messages or calls, there is no order to rely on — a stream's data leaves when the
//! link's writer pulls it, which may be after a message sent later — and a receiver could not
//! observe one anyway, since each stream is read by its own task.

mod framed;
mod shared;
mod table;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::addr::LogicAddr;
use crate::error::ErrorCode;
use crate::proto;

pub use framed::{FrameError, Frames};
pub(crate) use shared::{Init, Shared, key};
pub(crate) use table::{AddError, Live, Table};

/// A peer of this node, with the table of the streams its link carries.
pub(crate) type Peer = crate::link::Peer<Table>;

use crate::proto::{META_ENTRY_OVERHEAD as ENTRY_OVERHEAD, meta_wire_size as wire_size};

/// Names a stream: the node that opened it and its number there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamId {
    /// The node that opened the stream.
    pub opener: LogicAddr,
    /// The opener's number for it.
    pub seq: u64,
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.opener, self.seq)
    }
}

/// Key/value pairs sent with a stream's open, e.g. the client's transport and address when a
/// gateway opens a stream for a client. Order and duplicates are kept as given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamMeta {
    entries: Vec<(String, String)>,
}

impl StreamMeta {
    /// No entries.
    pub fn new() -> Self {
        StreamMeta::default()
    }

    /// Adds an entry (builder style).
    #[must_use]
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.insert(key, value);
        self
    }

    /// Adds an entry.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.entries.push((key.into(), value.into()));
    }

    /// The value of the first entry named `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The entries in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes the entries take against the envelope size limit.
    pub(crate) fn size(&self) -> usize {
        self.entries
            .iter()
            .map(|(k, v)| k.len() + v.len() + ENTRY_OVERHEAD)
            .sum()
    }

    pub(crate) fn to_wire(&self) -> Vec<proto::StreamMeta> {
        self.entries
            .iter()
            .map(|(key, value)| proto::StreamMeta {
                key: key.clone(),
                value: value.clone(),
            })
            .collect()
    }

    pub(crate) fn from_wire(meta: Vec<proto::StreamMeta>) -> Self {
        StreamMeta {
            entries: meta.into_iter().map(|m| (m.key, m.value)).collect(),
        }
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for StreamMeta {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        StreamMeta {
            entries: iter
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }
}

/// An ordered, flow-controlled byte stream to another node.
///
/// Read and write it with tokio's `AsyncReadExt` / `AsyncWriteExt`, or split it into halves
/// for two tasks with [`Stream::into_split`]. Errors come as [`std::io::Error`] carrying a
/// [`StreamError`](crate::StreamError) (get it with
/// [`StreamError::from_io`](crate::StreamError::from_io)).
///
/// - `flush` waits until everything written has been handed to the link.
/// - `shutdown` half-closes: the peer reads every byte, then EOF, and may still write back.
/// - Dropped before both directions are closed (written side shut down, read side at EOF), the
///   stream is reset: the peer sees [`StreamError::Reset`](crate::StreamError::Reset).
///   [`Stream::reset`] does the same with a reason.
/// - When the link to the peer is lost, reads and writes fail with
///   [`StreamError::PeerLost`](crate::StreamError::PeerLost); bytes that arrived before are
///   still read first.
#[derive(Debug)]
pub struct Stream {
    reader: StreamReader,
    writer: StreamWriter,
}

/// The read half of a [`Stream`]. Dropped before EOF, it resets the stream.
#[derive(Debug)]
pub struct StreamReader {
    shared: Arc<Shared>,
}

/// The write half of a [`Stream`]. Dropped before `shutdown`, it resets the stream.
#[derive(Debug)]
pub struct StreamWriter {
    shared: Arc<Shared>,
}

fn id_of(s: &Shared) -> StreamId {
    StreamId {
        opener: if s.opened_here { s.local } else { s.remote },
        seq: s.id,
    }
}

impl Stream {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Stream {
            reader: StreamReader {
                shared: shared.clone(),
            },
            writer: StreamWriter { shared },
        }
    }

    /// The node at the other end.
    pub fn peer(&self) -> LogicAddr {
        self.reader.shared.remote
    }

    /// This stream's name.
    pub fn id(&self) -> StreamId {
        id_of(&self.reader.shared)
    }

    /// Whether this node opened the stream (rather than accepted it).
    pub fn is_opener(&self) -> bool {
        self.reader.shared.opened_here
    }

    /// The metadata the opener sent.
    pub fn metadata(&self) -> &StreamMeta {
        &self.reader.shared.meta
    }

    /// Aborts the stream: the peer's reads and writes fail with
    /// [`StreamError::Reset`](crate::StreamError::Reset) carrying `reason` and code
    /// [`ErrorCode::RESET`]. Bytes not yet handed to the link are dropped.
    pub fn reset(self, reason: impl Into<String>) {
        self.writer.shared.abort(ErrorCode::RESET, reason.into());
    }

    /// Splits the stream into halves that can move to different tasks.
    pub fn into_split(self) -> (StreamReader, StreamWriter) {
        (self.reader, self.writer)
    }
}

impl StreamReader {
    /// The node at the other end.
    pub fn peer(&self) -> LogicAddr {
        self.shared.remote
    }

    /// The stream's name.
    pub fn id(&self) -> StreamId {
        id_of(&self.shared)
    }
}

impl StreamWriter {
    /// The node at the other end.
    pub fn peer(&self) -> LogicAddr {
        self.shared.remote
    }

    /// The stream's name.
    pub fn id(&self) -> StreamId {
        id_of(&self.shared)
    }

    /// Aborts the whole stream, as [`Stream::reset`].
    pub fn reset(self, reason: impl Into<String>) {
        self.shared.abort(ErrorCode::RESET, reason.into());
    }
}

impl Drop for StreamReader {
    fn drop(&mut self) {
        self.shared.drop_read();
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        self.shared.drop_write();
    }
}

impl AsyncRead for StreamReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.shared.poll_read(cx, buf)
    }
}

impl AsyncWrite for StreamWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.shared.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.shared.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.shared.poll_shutdown(cx)
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.reader).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.writer).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.writer).poll_shutdown(cx)
    }
}

/// The accept handler registered with [`NodeBuilder::on_stream`](crate::NodeBuilder::on_stream).
pub(crate) type StreamHandler = Arc<
    dyn Fn(Stream) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync,
>;
