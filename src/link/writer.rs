//! The writer half of a link: a `Stream` of batches that tonic polls directly, so no task of
//! ours sits between the queue and the transport.
//!
//! Each poll takes everything queued (up to the batch limits) and yields it as one gRPC
//! message. With one envelope queued, that envelope goes out at once: batching never waits.
//!
//! The writer waits on five sources: the peer's queue, the streams with something to send,
//! the acknowledgement sweep, and the link's two cancellation tokens. Each is polled with a
//! waker of its own that marks it as woken (see [`Woken`]), and a poll looks only at sources
//! that were marked or still had more to give. The transport polls a writer several times per
//! batch it sends (once for the batch, then until it is pending, and after each flow-control
//! event); with one call outstanding, polling every source each time cost about 3,600
//! instructions per call on each side, most of it for sources with nothing to say.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU8;
use std::sync::atomic::Ordering::{AcqRel, Relaxed};
use std::task::{Context, Poll, Wake, Waker, ready};

use futures_util::task::AtomicWaker;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_stream::Stream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::peer::{LinkCounts, LinkStreams, LinkTokens, Outbound, Peer};
use crate::proto::{Batch, envelope::Body};
use crate::stats::Stats;

pub(crate) struct Writer<S> {
    peer: Arc<Peer<S>>,
    stats: Arc<Stats>,
    /// Until the peer has admitted the link, nothing is taken from the queue: a refused dial
    /// must leave the queue whole for the link that wins.
    gate: Option<oneshot::Receiver<()>>,
    kill: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The same token as `kill`, checked under the locks of the peer's queue and stream
    /// table (see [`Writer::fill_queued`]).
    killed: CancellationToken,
    close: Pin<Box<WaitForCancellationFutureOwned>>,
    max_bytes: usize,
    max_envelopes: usize,
    /// Taken from the queue, not yet written (left over when a batch hit the byte limit).
    buf: Vec<Outbound>,
    /// Which source fills the next batch first.
    streams_first: bool,
    /// The link's delivery accounting (see [`LinkCounts`]).
    counts: Arc<LinkCounts>,
    /// Which sources woke the writer since it last looked.
    woken: Arc<Woken>,
    /// Each source's own waker, by bit number (see [`Woken`]).
    wakers: Arc<[Waker; SOURCES]>,
    /// Sources to look at next poll whether woken or not: they had more to give, or were not
    /// reached.
    carry: u8,
    /// The close token fired: end once nothing is left to write.
    closing: bool,
}

/// The sources a writer waits on, as bits of [`Woken::bits`].
const QUEUE: u8 = 1;
const STREAMS: u8 = 2;
const ACK: u8 = 4;
const KILL: u8 = 8;
const CLOSE: u8 = 16;
const SOURCES: usize = 5;
const ALL: u8 = (1 << SOURCES) - 1;

/// The sources that woke a writer, and the task to wake for them. A source is polled with a
/// waker that sets its bit, then wakes the task, so a later poll can skip every source whose
/// bit is clear: its own registration still stands, and it will set the bit when it has
/// something. A source that answered without registering (it gave something, or was not
/// polled) is carried over to the next poll instead.
#[derive(Debug, Default)]
struct Woken {
    bits: AtomicU8,
    task: AtomicWaker,
}

/// The waker a writer hands one source.
struct SourceWaker {
    woken: Arc<Woken>,
    bit: u8,
}

impl Wake for SourceWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // The bit is set before the task is woken, so the poll that follows sees it.
        self.woken.bits.fetch_or(self.bit, AcqRel);
        self.woken.task.wake();
    }
}

impl<S> std::fmt::Debug for Writer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("peer", &self.peer.addr)
            .finish_non_exhaustive()
    }
}

impl<S: LinkStreams> Writer<S> {
    pub(crate) fn new(
        peer: Arc<Peer<S>>,
        stats: Arc<Stats>,
        tokens: &LinkTokens,
        gate: Option<oneshot::Receiver<()>>,
        max_bytes: usize,
        max_envelopes: usize,
    ) -> Self {
        let woken = Arc::new(Woken::default());
        Writer {
            peer,
            stats,
            gate,
            kill: Box::pin(tokens.kill.clone().cancelled_owned()),
            killed: tokens.kill.clone(),
            close: Box::pin(tokens.close.clone().cancelled_owned()),
            max_bytes,
            max_envelopes,
            buf: Vec::new(),
            streams_first: false,
            counts: tokens.counts.clone(),
            wakers: Arc::new([QUEUE, STREAMS, ACK, KILL, CLOSE].map(|bit| {
                Waker::from(Arc::new(SourceWaker {
                    woken: woken.clone(),
                    bit,
                }))
            })),
            woken,
            carry: ALL,
            closing: false,
        }
    }
}

impl<S> Drop for Writer<S> {
    fn drop(&mut self) {
        self.counts
            .writer_done
            .store(true, std::sync::atomic::Ordering::Release);
        self.counts.writer_gone.notify_waiters();
        // Taken from the queue but never written: the link ended under them. Waiting calls
        // among them are failed by the link's end; count the rest (one-way requests too).
        for item in self.buf.drain(..) {
            match &item.env.body {
                // The caller is told by the link's end.
                Some(Body::Request(r)) if !r.oneway => {}
                _ => Stats::incr(&self.stats.envelopes_lost),
            }
        }
    }
}

impl<S: LinkStreams> Writer<S> {
    /// Moves queued envelopes into `out` until the batch is full. `Ready(true)` when the queue
    /// may hold more, `Pending` when it is empty (the waker is registered), `Ready(false)`
    /// when the writer is done with it (the link was killed).
    fn fill_queued(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<crate::proto::Envelope>,
        bytes: &mut usize,
    ) -> Poll<bool> {
        if self.buf.is_empty() {
            // The queue is the peer's, not the link's, and keeps one waker: the last writer
            // to look registers. A writer killed for a new link must not look again, or it
            // would take the registration from the new link's writer, which looks only when
            // woken. A link is killed before the next one is up (under the peer's state
            // lock), so checking under the queue's lock is enough.
            let mut rx = self.peer.rx();
            if self.killed.is_cancelled() {
                return Poll::Ready(false);
            }
            // One receive takes everything queued (up to the envelope limit) and returns the
            // queue's permits in one step.
            let room = self.max_envelopes.saturating_sub(out.len()).max(1);
            match rx.poll_recv_many(cx, &mut self.buf, room) {
                // The peer holds the sender, so the queue never closes while we live.
                Poll::Ready(0) => return Poll::Ready(false),
                Poll::Ready(_) => {}
                Poll::Pending => return Poll::Pending,
            }
        }
        // Cut at the byte limit; the rest waits in `buf` for the next batch.
        let mut cut = self.buf.len();
        for (i, item) in self.buf.iter().enumerate() {
            *bytes += crate::proto::approx_size(&item.env.body);
            if *bytes >= self.max_bytes {
                cut = i + 1;
                break;
            }
        }
        let mut now = None;
        for item in self.buf.drain(..cut) {
            match item.deadline {
                Some(d) if d <= *now.get_or_insert_with(Instant::now) => {
                    self.peer.expire(item, &self.stats)
                }
                _ => out.push(item.env),
            }
        }
        Poll::Ready(true)
    }

    /// An acknowledgement-only batch, when the reader received envelopes the peer has not
    /// been told of and the node's acknowledgement sweep asked for one (at most every
    /// [`ACK_EVERY`](super::peer::ACK_EVERY): a writer that sends anything carries the count
    /// anyway), or at once when `now`. Registers `cx`'s waker for the sweep.
    fn ack(&mut self, cx: &mut Context<'_>, now: bool) -> Option<Batch> {
        self.counts.writer.register(cx.waker());
        let asked = self.counts.asked.swap(false, Relaxed);
        let received = self.counts.received.load(Relaxed);
        if (!asked && !now) || received == self.counts.told.load(Relaxed) {
            return None;
        }
        self.counts.told.store(received, Relaxed);
        Some(Batch {
            received,
            ..Batch::default()
        })
    }

    /// Pulls from streams with something to send until the batch is full; `Pending` when
    /// none is ready (the waker is registered).
    fn fill_streams(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<crate::proto::Envelope>,
        bytes: &mut usize,
    ) -> Poll<()> {
        let mut pulled = false;
        while *bytes < self.max_bytes && out.len() < self.max_envelopes {
            match self.peer.streams.pull_ready(cx, out, &self.killed) {
                Some(n) => {
                    *bytes += n;
                    pulled = true;
                }
                None if pulled => break,
                None => return Poll::Pending,
            }
        }
        Poll::Ready(())
    }
}

impl<S: LinkStreams> Stream for Writer<S> {
    type Item = Batch;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Batch>> {
        let this = &mut *self;
        if let Some(gate) = &mut this.gate {
            match ready!(Pin::new(gate).poll(cx)) {
                Ok(()) => this.gate = None,
                Err(_) => return Poll::Ready(None),
            }
        }
        // Registered before the bits are taken: a source that fires from here on wakes this
        // task again.
        this.woken.task.register(cx.waker());
        let mut due = this.woken.bits.swap(0, AcqRel) | this.carry;
        this.carry = 0;
        let wakers = this.wakers.clone();
        let source = |bit: u8| Context::from_waker(&wakers[bit.trailing_zeros() as usize]);
        if due & KILL != 0 {
            if this.kill.as_mut().poll(&mut source(KILL)).is_ready() {
                return Poll::Ready(None);
            }
            due &= !KILL;
        }
        if due & CLOSE != 0 {
            this.closing = this.closing || this.close.as_mut().poll(&mut source(CLOSE)).is_ready();
            due &= !CLOSE;
        }
        let result = loop {
            let mut envelopes = Vec::new();
            let mut bytes = 0;
            // A source not polled is pending as far as this batch goes, and is looked at
            // next time (`carry`); one polled and pending has its waker registered.
            let mut queued = Poll::Pending;
            let mut streams = Poll::Pending;
            let take_queue = due & QUEUE != 0 || !this.buf.is_empty();
            let take_streams = due & STREAMS != 0;
            let (max_bytes, max_envelopes) = (this.max_bytes, this.max_envelopes);
            let full = |envelopes: &Vec<_>, bytes: usize| {
                bytes >= max_bytes || envelopes.len() >= max_envelopes
            };
            // Alternate which source fills a batch first, so a flood on one (bulk streams, a
            // message storm) cannot starve the other.
            this.streams_first = !this.streams_first;
            if this.streams_first {
                if take_streams {
                    streams = this.fill_streams(&mut source(STREAMS), &mut envelopes, &mut bytes);
                }
                if take_queue {
                    queued = if full(&envelopes, bytes) {
                        Poll::Ready(true)
                    } else {
                        this.fill_queued(&mut source(QUEUE), &mut envelopes, &mut bytes)
                    };
                }
            } else {
                if take_queue {
                    queued = this.fill_queued(&mut source(QUEUE), &mut envelopes, &mut bytes);
                }
                if take_streams {
                    streams = if full(&envelopes, bytes) {
                        Poll::Ready(())
                    } else {
                        this.fill_streams(&mut source(STREAMS), &mut envelopes, &mut bytes)
                    };
                }
            }
            if let Poll::Ready(false) = queued {
                break Poll::Ready(None);
            }
            // A source that gave something may hold more; one not reached is still due.
            if queued.is_ready() || (take_queue && !this.buf.is_empty()) {
                due |= QUEUE;
            } else if take_queue {
                due &= !QUEUE;
            }
            if streams.is_ready() {
                due |= STREAMS;
            } else if take_streams {
                due &= !STREAMS;
            }
            if !envelopes.is_empty() {
                this.stats
                    .count_batch(crate::stats::Direction::Sent, &envelopes);
                this.counts
                    .written
                    .fetch_add(envelopes.len() as u64, Relaxed);
                // Every batch carries the receipt count: no acknowledgement of its own is due.
                let received = this.counts.received.load(Relaxed);
                this.counts.told.store(received, Relaxed);
                break Poll::Ready(Some(Batch {
                    envelopes,
                    received,
                    ..Batch::default()
                }));
            }
            if due & (QUEUE | STREAMS) == 0 {
                // Graceful close: end only once nothing is left to write, and what was
                // received is acknowledged.
                if due & ACK != 0 || this.closing {
                    due &= !ACK;
                    if let Some(ack) = this.ack(&mut source(ACK), this.closing) {
                        break Poll::Ready(Some(ack));
                    }
                }
                // The queue can answer pending with envelopes in it, when the task's budget
                // ran out (it has woken the task to look again): not the end yet.
                if this.closing && this.peer.queued() == 0 {
                    break Poll::Ready(None);
                }
                break Poll::Pending;
            }
            // Everything taken had expired, or a stream had nothing left to say: look again.
        };
        this.carry = due;
        result
    }
}

/// What a dialer sends: its proof, once it has checked the acceptor's (see `link::auth`),
/// then the writer's batches (gated until the acceptor admits the link).
pub(crate) struct DialerStream<S> {
    proof: Option<oneshot::Receiver<Batch>>,
    writer: Writer<S>,
}

impl<S> DialerStream<S> {
    pub(crate) fn new(proof: oneshot::Receiver<Batch>, writer: Writer<S>) -> Self {
        DialerStream {
            proof: Some(proof),
            writer,
        }
    }
}

impl<S: LinkStreams> Stream for DialerStream<S> {
    type Item = Batch;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Batch>> {
        if let Some(proof) = &mut self.proof {
            let first = ready!(Pin::new(proof).poll(cx));
            self.proof = None;
            // No proof: the dial was abandoned (the acceptor failed its own proof).
            return Poll::Ready(first.ok());
        }
        Pin::new(&mut self.writer).poll_next(cx)
    }
}

/// What an acceptor sends once the dialer's proof is in: an empty batch that says "admitted",
/// then the writer's batches; or a refusal. A link that ends because the peer broke the
/// protocol ends with that status rather than OK.
pub(crate) enum AcceptorStream<S> {
    Waiting {
        admission: oneshot::Receiver<Result<Writer<S>, tonic::Status>>,
        fault: Arc<std::sync::OnceLock<tonic::Status>>,
    },
    Admitted {
        writer: Writer<S>,
        fault: Arc<std::sync::OnceLock<tonic::Status>>,
    },
    Done,
}

impl<S: LinkStreams> Stream for AcceptorStream<S> {
    type Item = Result<Batch, tonic::Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match this {
            AcceptorStream::Waiting { admission, fault } => {
                let fault = fault.clone();
                match ready!(Pin::new(admission).poll(cx)) {
                    Ok(Ok(writer)) => {
                        *this = AcceptorStream::Admitted { writer, fault };
                        Poll::Ready(Some(Ok(Batch::default())))
                    }
                    Ok(Err(status)) => {
                        *this = AcceptorStream::Done;
                        Poll::Ready(Some(Err(status)))
                    }
                    Err(_) => {
                        *this = AcceptorStream::Done;
                        Poll::Ready(None)
                    }
                }
            }
            AcceptorStream::Admitted { writer, fault } => {
                if let Some(batch) = ready!(Pin::new(writer).poll_next(cx)) {
                    return Poll::Ready(Some(Ok(batch)));
                }
                let end = fault.get().cloned().map(Err);
                *this = AcceptorStream::Done;
                Poll::Ready(end)
            }
            AcceptorStream::Done => Poll::Ready(None),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The writer's wake-ups: every source it waits on wakes the task that polls it, so
    //! nothing queued, pulled, asked for or cancelled waits for an unrelated wake.

    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::addr::LogicAddr;
    use crate::error::StreamError;
    use crate::proto::{Envelope, Message};

    /// Streams that have `ready` envelopes to give, one per pull.
    #[derive(Default)]
    struct TestStreams {
        ready: Mutex<Vec<Envelope>>,
        waker: AtomicWaker,
    }

    impl LinkStreams for TestStreams {
        fn pull_ready(
            &self,
            cx: &Context<'_>,
            out: &mut Vec<Envelope>,
            killed: &CancellationToken,
        ) -> Option<usize> {
            let mut ready = self.ready.lock().unwrap();
            if ready.is_empty() && !killed.is_cancelled() {
                self.waker.register(cx.waker());
            }
            let env = ready.pop()?;
            out.push(env);
            Some(10)
        }
        fn fail_all(&self, _: &StreamError) {}
        fn reopen(&self) {}
    }

    /// Counts the task's wake-ups.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Relaxed);
        }
    }

    fn message(n: u8) -> Envelope {
        Envelope {
            body: Some(Body::Message(Message {
                payload: vec![n].into(),
                ..Message::default()
            })),
            ..Envelope::default()
        }
    }

    struct Rig {
        peer: Arc<Peer<TestStreams>>,
        tokens: LinkTokens,
        writer: Writer<TestStreams>,
        count: Arc<Count>,
        waker: Waker,
    }

    impl Rig {
        fn new() -> Rig {
            Rig::sized(64, 128)
        }

        /// A rig whose queue holds `capacity` envelopes and whose batches hold `batch`.
        fn sized(capacity: usize, batch: usize) -> Rig {
            let peer = Peer::new(
                LogicAddr::new(1, 2, 3).unwrap(),
                capacity,
                TestStreams::default(),
            );
            let tokens = LinkTokens::default();
            let writer = Writer::new(peer.clone(), Arc::default(), &tokens, None, 1 << 20, batch);
            let count = Arc::new(Count::default());
            let waker = Waker::from(count.clone());
            Rig {
                peer,
                tokens,
                writer,
                count,
                waker,
            }
        }

        fn poll(&mut self) -> Poll<Option<Batch>> {
            let mut cx = Context::from_waker(&self.waker);
            Pin::new(&mut self.writer).poll_next(&mut cx)
        }

        fn wakes(&self) -> usize {
            self.count.0.load(Relaxed)
        }

        fn queue(&self, n: u8) {
            let item = Outbound {
                env: message(n),
                deadline: None,
            };
            assert!(self.peer.try_enqueue(item).is_ok());
        }
    }

    fn payloads(batch: &Batch) -> Vec<u8> {
        batch
            .envelopes
            .iter()
            .map(|e| match &e.body {
                Some(Body::Message(m)) => m.payload[0],
                other => panic!("not a message: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn every_source_wakes_the_writer_and_is_taken_on_the_next_poll() {
        let mut rig = Rig::new();
        assert!(rig.poll().is_pending());

        // The queue.
        let before = rig.wakes();
        rig.queue(1);
        rig.queue(2);
        assert!(rig.wakes() > before, "queueing did not wake the writer");
        let Poll::Ready(Some(b)) = rig.poll() else {
            panic!("queued envelopes not taken")
        };
        assert_eq!(payloads(&b), [1, 2]);
        assert!(rig.poll().is_pending());

        // Polls nobody asked for find nothing and take nothing.
        assert!(rig.poll().is_pending());
        assert!(rig.poll().is_pending());

        // A stream with something to send.
        let before = rig.wakes();
        rig.peer.streams.ready.lock().unwrap().push(message(3));
        rig.peer.streams.waker.wake();
        assert!(
            rig.wakes() > before,
            "a ready stream did not wake the writer"
        );
        let Poll::Ready(Some(b)) = rig.poll() else {
            panic!("the stream's envelope not taken")
        };
        assert_eq!(payloads(&b), [3]);
        assert!(rig.poll().is_pending());

        // The acknowledgement sweep, once the reader received envelopes.
        rig.tokens.counts.received.store(5, Relaxed);
        let before = rig.wakes();
        rig.tokens.counts.ask_ack();
        assert!(rig.wakes() > before, "the sweep did not wake the writer");
        let Poll::Ready(Some(b)) = rig.poll() else {
            panic!("no acknowledgement sent")
        };
        assert!(b.envelopes.is_empty());
        assert_eq!(b.received, 5);
        assert!(rig.poll().is_pending());

        // A graceful close sends what is queued, then ends. (The queue's wake comes first;
        // the close's finds the task woken already.)
        rig.queue(4);
        rig.tokens.close.cancel();
        let Poll::Ready(Some(b)) = rig.poll() else {
            panic!("what was queued before the close was not sent")
        };
        assert_eq!(payloads(&b), [4]);
        assert!(matches!(rig.poll(), Poll::Ready(None)));
    }

    #[test]
    fn closing_wakes_an_idle_writer_which_acknowledges_and_ends() {
        let mut rig = Rig::new();
        assert!(rig.poll().is_pending());
        rig.tokens.counts.received.store(3, Relaxed);
        let before = rig.wakes();
        rig.tokens.close.cancel();
        assert!(rig.wakes() > before, "closing did not wake the writer");
        // What was received is acknowledged before the end, unasked.
        let Poll::Ready(Some(b)) = rig.poll() else {
            panic!("no acknowledgement before the end")
        };
        assert_eq!((b.envelopes.len(), b.received), (0, 3));
        assert!(matches!(rig.poll(), Poll::Ready(None)));
    }

    #[test]
    fn a_killed_writer_ends_at_once_and_leaves_the_queue_whole() {
        let mut rig = Rig::new();
        assert!(rig.poll().is_pending());
        let before = rig.wakes();
        rig.tokens.kill.cancel();
        assert!(rig.wakes() > before, "the kill did not wake the writer");
        rig.queue(1);
        assert!(matches!(rig.poll(), Poll::Ready(None)));
        // What was queued is left for the next link's writer.
        assert_eq!(rig.peer.queued(), 1);
    }

    /// The peer's queue and stream table outlive a link and keep one waker each. The old
    /// link's writer, killed while inside a poll (its bits taken, the kill not yet seen),
    /// then reaching the queue after the new link's writer registered there, must not take
    /// the registration: the new writer would never be woken for the queue again.
    #[test]
    fn a_killed_writer_does_not_take_the_queue_from_the_next_links_writer() {
        let mut old = Rig::new();
        assert!(old.poll().is_pending());
        old.tokens.kill.cancel();
        // The next link's writer, on the same peer, registers with the queue and the streams.
        let tokens = LinkTokens::default();
        let mut new = Writer::new(
            old.peer.clone(),
            Arc::default(),
            &tokens,
            None,
            1 << 20,
            128,
        );
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut new).poll_next(&mut cx).is_pending());
        // The old writer, past its kill check, reaches the queue and the streams.
        let (mut out, mut bytes) = (Vec::new(), 0);
        let wakers = old.writer.wakers.clone();
        let mut old_cx = Context::from_waker(&wakers[0]);
        let _ = old.writer.fill_queued(&mut old_cx, &mut out, &mut bytes);
        let _ = old.writer.fill_streams(&mut old_cx, &mut out, &mut bytes);
        assert!(out.is_empty());
        // What is queued now, and a stream that becomes ready, wake the new writer.
        let before = count.0.load(Relaxed);
        old.queue(7);
        assert!(
            count.0.load(Relaxed) > before,
            "the queue woke the dead writer"
        );
        let Poll::Ready(Some(b)) = Pin::new(&mut new).poll_next(&mut cx) else {
            panic!("the new writer did not take what was queued")
        };
        assert_eq!(payloads(&b), [7]);
        assert!(Pin::new(&mut new).poll_next(&mut cx).is_pending());
        let _ = old.writer.fill_streams(&mut old_cx, &mut out, &mut bytes);
        let before = count.0.load(Relaxed);
        old.peer.streams.ready.lock().unwrap().push(message(8));
        old.peer.streams.waker.wake();
        assert!(
            count.0.load(Relaxed) > before,
            "the stream woke the dead writer"
        );
    }

    /// The queue answers pending with envelopes in it once the task's budget is spent (and
    /// wakes the task to look again); a closing writer must not take that for an empty queue.
    #[tokio::test(flavor = "current_thread")]
    async fn a_closing_writer_out_of_budget_ends_only_once_the_queue_is_empty() {
        let mut rig = Rig::sized(512, 1);
        for n in 0..=255 {
            rig.queue(n);
        }
        rig.tokens.close.cancel();
        let mut sent = Vec::new();
        let mut ended = false;
        let mut pending = 0;
        while !ended {
            // One task poll: its budget (128 units) runs out before 256 receives.
            std::future::poll_fn(|_| {
                loop {
                    match rig.poll() {
                        Poll::Ready(Some(b)) => sent.extend(payloads(&b)),
                        Poll::Ready(None) => {
                            ended = true;
                            return Poll::Ready(());
                        }
                        Poll::Pending => {
                            pending += 1;
                            return Poll::Ready(());
                        }
                    }
                }
            })
            .await;
            assert!(pending < 10, "the writer stopped taking from the queue");
            // A new task poll, with a new budget.
            tokio::task::yield_now().await;
        }
        assert_eq!(
            sent.len(),
            256,
            "the writer ended with envelopes still queued"
        );
        assert_eq!(sent, (0..=255).collect::<Vec<u8>>());
        assert!(
            pending > 0,
            "the budget never ran out: the test shows nothing"
        );
    }

    #[test]
    fn a_batch_cut_at_the_envelope_limit_leaves_the_rest_for_the_next_poll() {
        let mut rig = Rig::new();
        let peer = rig.peer.clone();
        rig.writer = Writer::new(peer, Arc::default(), &rig.tokens, None, 1 << 20, 2);
        for n in 1..=5 {
            rig.queue(n);
        }
        let mut got = Vec::new();
        while let Poll::Ready(Some(b)) = rig.poll() {
            assert!(b.envelopes.len() <= 2);
            got.extend(payloads(&b));
        }
        // No wake came between these polls: the writer knew there was more.
        assert_eq!(got, [1, 2, 3, 4, 5]);
    }
}
