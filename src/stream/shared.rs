//! The state of one stream, shared by its handles, its peer's stream table and the link writer.
//!
//! Sending: a write copies bytes into the stream's buffer (at most `stream_buffer`, and never
//! more than the credit the peer granted) and, if the stream is not scheduled yet, puts it on
//! the peer's ready queue. The link writer pulls everything the stream has to say (open,
//! accept, window update, one data envelope with all buffered bytes, fin, reset) when it
//! builds the next batch. So a hundred 64-byte writes between two batches leave as one data
//! envelope, and a stream never has more than one entry in the ready queue.
//!
//! Receiving: data is kept as the `Bytes` the transport decoded (no copy) until read. The
//! receiver tracks how much the peer may still send (`allowed`); data beyond it is a flow
//! control violation that resets the stream. Reading returns credit to the peer in steps of
//! half the window, so the buffer never holds more than one window.
//!
//! Lock order: a stream's lock is never held while taking the table's or the ready queue's.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::ReadBuf;
use tokio::sync::oneshot;

use super::Peer;
use super::StreamMeta;
use crate::addr::LogicAddr;
use crate::error::{ErrorCode, StreamError};
use crate::proto::{self, Envelope, envelope::Body};

/// Received chunks at least this large keep sharing the buffer they were decoded into;
/// smaller ones are copied (see [`Shared::on_data`]).
const SHARE_MIN: usize = 32 << 10;

/// A stream's key in the table of the link it uses: the node at the other end (a link to a
/// harbor carries streams with many), the opener's id, and which side opened.
pub(crate) fn key(remote: LogicAddr, id: u64, opened_here: bool) -> (u32, u64) {
    (remote.as_u32(), (id << 1) | u64::from(opened_here))
}

pub(crate) struct Shared {
    pub(crate) id: u64,
    pub(crate) opened_here: bool,
    pub(crate) local: LogicAddr,
    pub(crate) remote: LogicAddr,
    pub(crate) meta: StreamMeta,
    peer: Weak<Peer>,
    /// Largest data envelope, and what a write may buffer.
    chunk: usize,
    /// Receive window granted to the peer.
    window: u32,
    state: Mutex<State>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("id", &self.id)
            .field("opened_here", &self.opened_here)
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    /// On the peer's ready queue.
    queued: bool,
    /// Opener: the open still to send.
    open: Option<Vec<proto::StreamMeta>>,
    /// The opener's trace context, for the open envelope (taken when the stream was opened:
    /// the envelope itself is built later, by the link's writer).
    open_trace: Bytes,
    /// Acceptor: the accept still to send.
    accept: bool,
    /// Window update still to send.
    credit_out: u64,
    /// Written, not yet pulled by the link writer.
    buf: BytesMut,
    /// The write half is shut down (fin goes out after `buf`).
    fin: bool,
    fin_sent: bool,
    /// A reset still to send.
    reset_out: Option<(ErrorCode, String)>,
    /// Bytes this side may still send.
    credit: u64,
    /// Received, not yet read: large chunks as decoded, then `tail`.
    recv: VecDeque<Bytes>,
    /// Received small chunks, copied (they come after everything in `recv`).
    tail: BytesMut,
    /// Bytes the peer may still send.
    allowed: u64,
    /// Read, not yet returned to the peer as credit.
    unacked: u64,
    fin_recv: bool,
    /// Why the stream ended abnormally; reads still return what arrived before it.
    error: Option<StreamError>,
    /// Out of the peer's table.
    removed: bool,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
    /// Opener: waits for the accept or the refusal.
    open_tx: Option<oneshot::Sender<Result<(), StreamError>>>,
}

impl State {
    /// Whether the link writer has something to pull; if so and the stream is not on the ready
    /// queue yet, marks it queued and returns true (the caller pushes it once unlocked).
    fn schedule(&mut self) -> bool {
        let has_output = self.reset_out.is_some()
            || self.open.is_some()
            || self.accept
            || self.credit_out > 0
            || !self.buf.is_empty()
            || (self.fin && !self.fin_sent);
        if has_output && !self.queued {
            self.queued = true;
            return true;
        }
        false
    }

    /// Both directions closed cleanly, or the stream ended abnormally: leaves the table.
    fn take_done(&mut self) -> bool {
        let done = (self.fin_sent && self.fin_recv) || self.error.is_some();
        if done && !self.removed {
            self.removed = true;
            return true;
        }
        false
    }

    fn wake_all(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }

    /// Ends the stream with `error`; whatever was waiting to be sent is dropped.
    fn fail(&mut self, error: StreamError) {
        if self.error.is_some() {
            return;
        }
        if let Some(tx) = self.open_tx.take() {
            let _ = tx.send(Err(error.clone()));
        }
        self.error = Some(error);
        // Nothing more goes out: after a link loss or a peer's reset there is no one to tell,
        // and a fin or reset left behind could reach a new stream of the same number on the
        // next link. (A local abort sets its reset after this.)
        self.open = None;
        self.accept = false;
        self.credit_out = 0;
        self.buf = BytesMut::new();
        self.reset_out = None;
        self.wake_all();
    }
}

/// Largest receive tail an idle stream keeps allocated.
const TAIL_KEEP: usize = 16 << 10;

/// A buffer of `capacity` bytes whose start is not just past `src` modulo 4 KiB.
///
/// glibc copies large blocks with `rep movsb`, which on some CPUs (measured: AMD EPYC) runs at
/// 1.7 GB/s instead of 30+ GB/s when the destination sits 1..63 bytes after the source modulo
/// 4096. Two 64 KiB blocks from malloc are 16 bytes apart modulo 4096, so a user writing from
/// a malloc'd 64 KiB buffer into a fresh 64 KiB buffer hit exactly that; shifting the start by
/// up to 64 bytes avoids it.
fn fresh_buffer(capacity: usize, src: *const u8) -> BytesMut {
    const SLACK: usize = 64;
    let mut buf = BytesMut::with_capacity(capacity + SLACK);
    let distance = (buf.as_ptr() as usize).wrapping_sub(src as usize) % 4096;
    if (1..SLACK).contains(&distance) {
        let pad = SLACK - distance;
        buf.put_bytes(0, pad);
        buf.advance(pad);
    }
    buf
}

fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// What a new stream starts with.
pub(crate) struct Init {
    pub(crate) id: u64,
    pub(crate) opened_here: bool,
    pub(crate) local: LogicAddr,
    pub(crate) remote: LogicAddr,
    pub(crate) meta: StreamMeta,
    pub(crate) peer: Weak<Peer>,
    pub(crate) chunk: usize,
    pub(crate) window: u32,
    /// Acceptor: the window the opener granted.
    pub(crate) credit: u64,
}

impl Shared {
    /// A stream this node opens; the receiver learns whether the peer accepted. The caller puts
    /// it on the ready queue (it starts marked as queued).
    pub(crate) fn opening(init: Init) -> (Arc<Shared>, oneshot::Receiver<Result<(), StreamError>>) {
        let (tx, rx) = oneshot::channel();
        let open = init.meta.to_wire();
        let s = Shared::new(init);
        {
            let mut st = s.lock();
            st.open = Some(open);
            st.open_trace = crate::trace::current();
            st.open_tx = Some(tx);
            st.queued = true;
        }
        (s, rx)
    }

    /// A stream a peer opened and this node accepts. The caller puts it on the ready queue (it
    /// starts marked as queued).
    pub(crate) fn accepting(init: Init) -> Arc<Shared> {
        let credit = init.credit;
        let s = Shared::new(init);
        {
            let mut st = s.lock();
            st.accept = true;
            st.credit = credit;
            st.queued = true;
        }
        s
    }

    fn new(init: Init) -> Arc<Shared> {
        Arc::new(Shared {
            id: init.id,
            opened_here: init.opened_here,
            local: init.local,
            remote: init.remote,
            meta: init.meta,
            peer: init.peer,
            chunk: init.chunk,
            window: init.window,
            state: Mutex::new(State {
                allowed: u64::from(init.window),
                ..State::default()
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding this lock; if it ever did, the state is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn key(&self) -> (u32, u64) {
        key(self.remote, self.id, self.opened_here)
    }

    /// Called with the lock released: puts the stream on the ready queue and/or takes it out
    /// of the table, as the locked section decided.
    fn after(self: &Arc<Self>, push: bool, done: bool) {
        if !push && !done {
            return;
        }
        // The peer is gone only once its links and streams are; nothing left to tell it.
        let Some(peer) = self.peer.upgrade() else {
            return;
        };
        if done {
            peer.streams.remove(self);
        }
        if push {
            peer.streams.push_ready(self.clone());
        }
    }

    // ---- The link writer's side.

    /// Appends what the stream has to send; returns roughly how many bytes that is on the wire
    /// (for the batch limit).
    pub(crate) fn pull(self: &Arc<Self>, out: &mut Vec<Envelope>) -> usize {
        let mut st = self.lock();
        st.queued = false;
        let to_opener = !self.opened_here;
        let env = |body| Envelope::originate(self.remote.as_u32(), self.local.as_u32(), body);
        // Per envelope: the writer's header estimate.
        const HEADER: usize = 24;
        if let Some((code, reason)) = st.reset_out.take() {
            let bytes = HEADER + reason.len();
            out.push(env(Body::Close(proto::StreamClose {
                id: self.id,
                to_opener,
                code: code.0,
                reason,
            })));
            return bytes;
        }
        if st.error.is_some() {
            return 0;
        }
        let mut bytes = 0;
        if let Some(meta) = st.open.take() {
            bytes += HEADER + super::wire_size(&meta);
            let mut open = env(Body::Open(proto::StreamOpen {
                id: self.id,
                window: self.window,
                meta,
            }));
            open.trace = std::mem::take(&mut st.open_trace);
            out.push(open);
        }
        if std::mem::take(&mut st.accept) {
            bytes += HEADER;
            out.push(env(Body::Accept(proto::StreamAccept {
                id: self.id,
                window: self.window,
            })));
        }
        if st.credit_out > 0 {
            let credit = u32::try_from(std::mem::take(&mut st.credit_out)).unwrap_or(u32::MAX);
            bytes += HEADER;
            out.push(env(Body::Window(proto::StreamWindow {
                id: self.id,
                to_opener,
                credit,
            })));
        }
        if !st.buf.is_empty() || (st.fin && !st.fin_sent) {
            // The whole buffer goes: a `BytesMut` kept after `split` would, once the frozen
            // part is gone, grow by copying everything it ever held.
            let data = std::mem::take(&mut st.buf).freeze();
            bytes += HEADER + data.len();
            let fin = st.fin;
            st.fin_sent = fin;
            out.push(env(Body::Data(proto::StreamData {
                id: self.id,
                to_opener,
                data,
                fin,
            })));
            // Room in the buffer again, or the shutdown is done.
            if let Some(w) = st.write_waker.take() {
                w.wake();
            }
        }
        let done = st.take_done();
        drop(st);
        self.after(false, done);
        bytes
    }

    // ---- The link reader's side.

    /// The peer accepted this node's open.
    pub(crate) fn on_accept(&self, window: u32) {
        let mut st = self.lock();
        st.credit = u64::from(window);
        if let Some(tx) = st.open_tx.take() {
            let _ = tx.send(Ok(()));
        }
    }

    /// Data from the peer; an overrun of the window resets the stream.
    pub(crate) fn on_data(self: &Arc<Self>, data: Bytes, fin: bool) {
        let mut st = self.lock();
        if st.error.is_some() || st.fin_recv {
            return;
        }
        let len = data.len() as u64;
        if len > st.allowed {
            let reason = format!(
                "{} sent {len} bytes with {} bytes of window left",
                self.remote, st.allowed
            );
            st.fail(StreamError::Aborted {
                peer: self.remote,
                reason: reason.clone(),
            });
            st.reset_out = Some((ErrorCode::FLOW_CONTROL, reason));
            let push = st.schedule();
            let done = st.take_done();
            drop(st);
            return self.after(push, done);
        }
        st.allowed -= len;
        if data.len() >= SHARE_MIN {
            if !st.tail.is_empty() {
                let small = st.tail.split().freeze();
                st.recv.push_back(small);
            }
            st.recv.push_back(data);
        } else {
            // A small slice would keep the whole batch buffer it was decoded into alive, so a
            // stalled reader of small writes could pin far more memory than its window. Small
            // chunks are copied into one buffer instead.
            st.tail.extend_from_slice(&data);
        }
        st.fin_recv = fin;
        if let Some(w) = st.read_waker.take() {
            w.wake();
        }
        let done = st.take_done();
        drop(st);
        self.after(false, done);
    }

    /// The peer granted more credit.
    pub(crate) fn on_window(&self, credit: u32) {
        let mut st = self.lock();
        st.credit = st.credit.saturating_add(u64::from(credit));
        if let Some(w) = st.write_waker.take() {
            w.wake();
        }
    }

    /// The peer reset the stream or refused the open.
    pub(crate) fn on_close(self: &Arc<Self>, code: ErrorCode, reason: String) {
        let peer = self.remote;
        let error = match code {
            ErrorCode::SHUTDOWN => StreamError::Shutdown { node: peer },
            ErrorCode::REFUSED => StreamError::Refused { peer, reason },
            ErrorCode::NO_ROUTE => StreamError::NoRoute { to: peer, reason },
            // A harbor on the way lost its link toward the other end.
            ErrorCode::PEER_LOST => StreamError::PeerLost {
                peer,
                cause: reason,
            },
            code => StreamError::Reset { peer, code, reason },
        };
        self.fail(error);
    }

    /// Ends the stream with `error` (link lost, node shut down, peer reset).
    pub(crate) fn fail(self: &Arc<Self>, error: StreamError) {
        let mut st = self.lock();
        st.fail(error);
        let done = st.take_done();
        drop(st);
        self.after(false, done);
    }

    /// Aborts from this side: the peer gets a reset with `code` and `reason`, both halves here
    /// fail with [`StreamError::Aborted`] ([`StreamError::Shutdown`] for a shutdown). Nothing
    /// happens once the stream has ended.
    pub(crate) fn abort(self: &Arc<Self>, code: ErrorCode, reason: String) {
        // The reason travels in an envelope: it must not outgrow a batch.
        let reason = crate::error::clip(reason);
        let mut st = self.lock();
        if st.error.is_some() || (st.fin_sent && st.fin_recv) {
            return;
        }
        // An open that never left needs no reset.
        let sent_open = st.open.is_none();
        st.fail(if code == ErrorCode::SHUTDOWN {
            StreamError::Shutdown { node: self.local }
        } else {
            StreamError::Aborted {
                peer: self.remote,
                reason: reason.clone(),
            }
        });
        if sent_open {
            st.reset_out = Some((code, reason));
        }
        let push = st.schedule();
        let done = st.take_done();
        drop(st);
        self.after(push, done);
    }

    /// Whether the stream has ended abnormally or closed both ways.
    #[cfg(test)]
    pub(crate) fn is_finished(&self) -> bool {
        let st = self.lock();
        st.error.is_some() || (st.fin_sent && st.fin_recv)
    }

    // ---- The handles' side.

    pub(crate) fn poll_read(
        self: &Arc<Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let mut st = self.lock();
        let mut n = 0;
        while buf.remaining() > 0 {
            let Some(front) = st.recv.front_mut() else {
                let take = st.tail.len().min(buf.remaining());
                buf.put_slice(&st.tail[..take]);
                st.tail.advance(take);
                if st.tail.is_empty() && st.tail.capacity() > TAIL_KEEP {
                    // A burst of small chunks grew it; an idle stream keeps nothing large.
                    st.tail = BytesMut::new();
                }
                n += take;
                break;
            };
            let take = front.len().min(buf.remaining());
            buf.put_slice(&front[..take]);
            front.advance(take);
            if front.is_empty() {
                st.recv.pop_front();
            }
            n += take;
        }
        if n > 0 {
            st.unacked += n as u64;
            let threshold = u64::from(self.window / 2).max(1);
            let mut push = false;
            if !st.fin_recv && st.error.is_none() && st.unacked >= threshold {
                let credit = std::mem::take(&mut st.unacked);
                st.allowed += credit;
                st.credit_out += credit;
                push = st.schedule();
            }
            drop(st);
            self.after(push, false);
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() == 0 || st.fin_recv {
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = &st.error {
            return Poll::Ready(Err(e.clone().into()));
        }
        register(&mut st.read_waker, cx);
        Poll::Pending
    }

    pub(crate) fn poll_write(
        self: &Arc<Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut st = self.lock();
        if let Some(e) = &st.error {
            return Poll::Ready(Err(e.clone().into()));
        }
        if st.fin {
            return Poll::Ready(Err(StreamError::Finished { peer: self.remote }.into()));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let room =
            (self.chunk - st.buf.len()).min(usize::try_from(st.credit).unwrap_or(usize::MAX));
        if room == 0 {
            register(&mut st.write_waker, cx);
            return Poll::Pending;
        }
        let n = room.min(data.len());
        if st.buf.capacity() == 0 {
            // Sized for this write (a 64 KiB write is one allocation, no growth); small
            // writes start at 4 KiB and grow as they coalesce.
            st.buf = fresh_buffer(n.max(4096).min(self.chunk), data.as_ptr());
        }
        st.buf.extend_from_slice(&data[..n]);
        st.credit -= n as u64;
        let push = st.schedule();
        drop(st);
        self.after(push, false);
        Poll::Ready(Ok(n))
    }

    /// Ready once everything written has been handed to the link.
    pub(crate) fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut st = self.lock();
        if let Some(e) = &st.error {
            return Poll::Ready(Err(e.clone().into()));
        }
        if st.buf.is_empty() {
            return Poll::Ready(Ok(()));
        }
        register(&mut st.write_waker, cx);
        Poll::Pending
    }

    /// Half-close: ready once the fin has been handed to the link.
    pub(crate) fn poll_shutdown(
        self: &Arc<Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        let mut st = self.lock();
        if st.fin_sent {
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = &st.error {
            return Poll::Ready(Err(e.clone().into()));
        }
        let push = if st.fin {
            false
        } else {
            st.fin = true;
            st.schedule()
        };
        register(&mut st.write_waker, cx);
        drop(st);
        self.after(push, false);
        Poll::Pending
    }

    /// The read half went away: unless the peer had finished writing, the stream is aborted.
    pub(crate) fn drop_read(self: &Arc<Self>) {
        let early = {
            let st = self.lock();
            st.error.is_none() && !st.fin_recv
        };
        if early {
            self.abort(
                ErrorCode::RESET,
                format!(
                    "{} dropped the stream before reading to its end",
                    self.local
                ),
            );
        }
    }

    /// The write half went away: unless it was shut down, the stream is aborted.
    pub(crate) fn drop_write(self: &Arc<Self>) {
        let early = {
            let st = self.lock();
            st.error.is_none() && !st.fin
        };
        if early {
            self.abort(
                ErrorCode::RESET,
                format!("{} dropped the stream without shutting it down", self.local),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Context;

    fn stream(window: u32, chunk: usize) -> Arc<Shared> {
        Shared::accepting(Init {
            id: 1,
            opened_here: false,
            local: "1.1.1".parse().unwrap(),
            remote: "1.1.2".parse().unwrap(),
            meta: StreamMeta::new(),
            peer: Weak::new(),
            chunk,
            window,
            credit: 100,
        })
    }

    fn bodies(s: &Arc<Shared>) -> Vec<Body> {
        let mut out = Vec::new();
        s.pull(&mut out);
        out.into_iter().filter_map(|e| e.body).collect()
    }

    #[test]
    fn writes_stop_at_credit_and_coalesce() {
        let s = stream(1000, 64);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // The accept goes first.
        assert!(matches!(bodies(&s)[..], [Body::Accept(_)]));
        for _ in 0..4 {
            assert!(matches!(
                s.poll_write(&mut cx, &[7; 10]),
                Poll::Ready(Ok(10))
            ));
        }
        // Four writes, one data envelope.
        match &bodies(&s)[..] {
            [Body::Data(d)] => assert_eq!(d.data.len(), 40),
            other => panic!("{other:?}"),
        }
        // 60 bytes of credit left, and the buffer holds at most 64.
        assert!(matches!(
            s.poll_write(&mut cx, &[7; 100]),
            Poll::Ready(Ok(60))
        ));
        assert!(s.poll_write(&mut cx, &[7; 1]).is_pending());
        s.on_window(5);
        bodies(&s);
        assert!(matches!(
            s.poll_write(&mut cx, &[7; 100]),
            Poll::Ready(Ok(5))
        ));
    }

    #[test]
    fn receive_buffer_never_exceeds_window() {
        let s = stream(100, 64);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        bodies(&s);
        s.on_data(Bytes::from(vec![1; 60]), false);
        s.on_data(Bytes::from(vec![1; 40]), false);
        // Reading half the window returns it as credit.
        let mut mem = [0; 50];
        let mut rb = ReadBuf::new(&mut mem);
        assert!(s.poll_read(&mut cx, &mut rb).is_ready());
        match &bodies(&s)[..] {
            [Body::Window(w)] => assert_eq!(w.credit, 50),
            other => panic!("{other:?}"),
        }
        // 50 buffered + 50 allowed: one more byte is an overrun that resets the stream.
        s.on_data(Bytes::from(vec![1; 51]), false);
        match &bodies(&s)[..] {
            [Body::Close(c)] => assert_eq!(c.code, ErrorCode::FLOW_CONTROL.0),
            other => panic!("{other:?}"),
        }
        let mut rb = ReadBuf::new(&mut mem);
        // What arrived before the overrun is still readable, then the error.
        assert!(matches!(s.poll_read(&mut cx, &mut rb), Poll::Ready(Ok(()))));
        assert_eq!(rb.filled().len(), 50);
        let mut rb = ReadBuf::new(&mut mem);
        assert!(matches!(s.poll_read(&mut cx, &mut rb), Poll::Ready(Err(_))));
    }

    #[test]
    fn fin_after_buffered_data_then_eof() {
        let s = stream(100, 64);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        bodies(&s);
        assert!(s.poll_write(&mut cx, b"abc").is_ready());
        assert!(s.poll_shutdown(&mut cx).is_pending());
        match &bodies(&s)[..] {
            [Body::Data(d)] => assert!(d.fin && &d.data[..] == b"abc"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(s.poll_shutdown(&mut cx), Poll::Ready(Ok(()))));
        assert!(matches!(s.poll_write(&mut cx, b"x"), Poll::Ready(Err(_))));
        s.on_data(Bytes::from_static(b"z"), true);
        let mut mem = [0; 8];
        let mut rb = ReadBuf::new(&mut mem);
        assert!(s.poll_read(&mut cx, &mut rb).is_ready());
        assert_eq!(rb.filled(), b"z");
        let mut rb = ReadBuf::new(&mut mem);
        assert!(matches!(s.poll_read(&mut cx, &mut rb), Poll::Ready(Ok(()))));
        assert!(rb.filled().is_empty());
        assert!(s.is_finished());
    }
}
