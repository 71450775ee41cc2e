//! One client: handshake (the first data frame), a stream to a game server, frames both ways,
//! and an end with a reason on both sides.
//!
//! A session is one task. Its two directions run as two futures inside it, so a client that
//! does not read never stops the game server's frames to other clients, and a game server
//! that does not read never stops heartbeats. Every wait is bounded: the handshake by
//! `handshake_timeout`, reading by `idle_timeout`, each write (to the client or to the stream)
//! by `write_timeout`. Buffers are per session and bounded by the largest frame plus what one
//! read returns; beyond that, backpressure is the stream's credit window toward the game
//! server and the socket toward the client.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use clustergo::{LogicAddr, Stream, StreamError, StreamMeta};
use clustergo_client::wire::{self, Inbound, close_code};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::time::{Instant, timeout, timeout_at};

use crate::admission::{Bucket, Handshake};
use crate::config::{Limits, Policy};
use crate::state::Gateway;

/// The receiving half of a client connection.
pub(crate) trait FrameRead: Send {
    /// The next unit from the client. Cancel-safe.
    fn recv(&mut self) -> impl Future<Output = Result<Item, Fault>> + Send;
    /// Reads and drops input until the client closes or the connection fails.
    fn discard(&mut self) -> impl Future<Output = ()> + Send;
}

/// What a client sent.
#[derive(Debug)]
pub(crate) enum Item {
    /// A frame, heartbeat or close.
    Wire(Inbound),
    /// Transport-level traffic the transport answers itself (a WebSocket ping or pong) of this
    /// many bytes: charged to the rate limits like a heartbeat, never forwarded.
    Control(usize),
}

/// The sending half of a client connection.
pub(crate) trait FrameWrite: Send {
    /// Sends `heartbeats` heartbeats, then `frames`, and flushes.
    fn send(
        &mut self,
        heartbeats: u32,
        frames: &[Bytes],
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// Tells the client why it is being closed (a close frame, or a WebSocket close with
    /// `code`), then closes.
    fn close(&mut self, code: u16, reason: &str) -> impl Future<Output = io::Result<()>> + Send;
    /// After the client closed: sends what is still queued and an answer to the client's
    /// close, if it sent one (on WebSocket the close handshake's, on TCP and KCP a close frame,
    /// which tells a KCP client its close arrived), and ends the connection.
    fn finish(&mut self, answer: bool) -> impl Future<Output = io::Result<()>> + Send;
}

/// Why a client is disconnected by the gateway's rules, or lost.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Fault {
    #[error("frame of {size} bytes is over the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed input: {0}")]
    Malformed(String),
    #[error("no first frame within {0:?}")]
    Handshake(Duration),
    #[error("idle for {0:?}")]
    Idle(Duration),
    #[error("over the rate limit of {0} frames/s")]
    FrameRate(u32),
    #[error("over the rate limit of {0} bytes/s")]
    ByteRate(u64),
    #[error("not reading: a write waited {0:?}")]
    NotReading(Duration),
    #[error("connection closed")]
    Eof,
    #[error("connection failed: {0}")]
    Io(io::Error),
}

impl Fault {
    fn code(&self) -> u16 {
        match self {
            Fault::TooLarge { .. } => close_code::TOO_BIG,
            Fault::Malformed(_) => close_code::UNSUPPORTED,
            _ => close_code::POLICY,
        }
    }
}

impl From<io::Error> for Fault {
    fn from(e: io::Error) -> Self {
        Fault::Io(e)
    }
}

/// How a session ended.
#[derive(Debug)]
enum End {
    /// The client left: end of stream (`None`) or a close frame with its reason.
    ClientLeft(Option<String>),
    /// The client broke a rule or its connection failed.
    Client(Fault),
    /// The game server ended the stream cleanly.
    ServerEnded,
    /// The game server sent a close frame for the client.
    ServerClosed(String),
    /// The stream failed.
    Server(String),
    /// The gateway is shutting down.
    Shutdown,
    /// The game server is leaving membership (or no longer available).
    Drained,
}

/// A client at the point it was accepted.
#[derive(Debug, Clone)]
pub(crate) struct ClientInfo {
    pub(crate) transport: &'static str,
    pub(crate) peer: std::net::SocketAddr,
    /// When its handshake time is up (set at accept: TLS and WebSocket handshakes count).
    pub(crate) deadline: Instant,
    /// The WebSocket subprotocol agreed on, if any.
    pub(crate) subprotocol: Option<Box<str>>,
}

/// Token buckets for frames and bytes per second, each with a one-second burst.
#[derive(Debug)]
struct Rate {
    frames: Bucket,
    bytes: Bucket,
}

impl Rate {
    fn new(limits: &Limits) -> Rate {
        let (f, b) = (
            f64::from(limits.frames_per_sec),
            limits.bytes_per_sec as f64,
        );
        Rate {
            frames: Bucket::new(f, f),
            bytes: Bucket::new(b, b),
        }
    }

    fn take(&mut self, bytes: usize, limits: &Limits) -> Result<(), Fault> {
        if !self.frames.take(1.0) {
            return Err(Fault::FrameRate(limits.frames_per_sec));
        }
        if !self.bytes.take(bytes as f64) {
            return Err(Fault::ByteRate(limits.bytes_per_sec));
        }
        Ok(())
    }
}

/// Serves one accepted client until either side ends; logs how it ended. The session is one
/// span (`gateway.session`, see `clustergo::trace`): its stream open is its child, so the game
/// server's work for the client joins the same trace.
pub(crate) async fn serve<R: FrameRead, W: FrameWrite>(
    gw: Arc<Gateway>,
    handshake: Handshake,
    info: ClientInfo,
    rd: R,
    wr: W,
) {
    let span = tracing::debug_span!(
        target: clustergo::trace::TARGET,
        parent: None,
        "gateway.session",
        otel.kind = "server",
        clustergo.transport = info.transport,
        client.address = %info.peer,
        clustergo.server = tracing::field::Empty,
        clustergo.end = tracing::field::Empty,
    );
    tracing::Instrument::instrument(session(gw, handshake, info, rd, wr), span).await
}

async fn session<R: FrameRead, W: FrameWrite>(
    gw: Arc<Gateway>,
    handshake: Handshake,
    info: ClientInfo,
    mut rd: R,
    mut wr: W,
) {
    let limits = &gw.limits;
    let mut rate = Rate::new(limits);
    let deadline = info.deadline;
    // Handshake: heartbeats are answered; the first data frame picks the server.
    let first = loop {
        let item = tokio::select! {
            r = timeout_at(deadline, rd.recv()) => match r {
                Ok(item) => item,
                Err(_) => Err(Fault::Handshake(limits.handshake_timeout)),
            },
            () = gw.shutdown.cancelled() => {
                Box::pin(finish_client(&gw, &info, &mut rd, &mut wr, End::Shutdown)).await;
                return;
            }
        };
        let item = item.and_then(|item| {
            rate.take(item_len(&item), limits)?;
            Ok(item)
        });
        let item = match item {
            Ok(Item::Control(_)) => continue,
            Ok(Item::Wire(item)) => Ok(item),
            Err(fault) => Err(fault),
        };
        match item {
            Ok(Inbound::Heartbeat) => {
                if let Err(e) = bounded_send(&mut wr, 1, &[], limits).await {
                    Box::pin(finish_client(&gw, &info, &mut rd, &mut wr, End::Client(e))).await;
                    return;
                }
            }
            Ok(Inbound::Data(frame)) => break frame,
            Ok(Inbound::Close(reason)) => {
                log_end(&gw, &info, None, &End::ClientLeft(Some(reason)));
                let _ = timeout(limits.write_timeout.min(LINGER), wr.finish(true)).await;
                return;
            }
            Err(fault) => {
                Box::pin(finish_client(
                    &gw,
                    &info,
                    &mut rd,
                    &mut wr,
                    End::Client(fault),
                ))
                .await;
                return;
            }
        }
    };
    // A client now: trade the handshake's places for a client's.
    let _client = match handshake.promote(&gw.admission, info.peer) {
        Ok(c) => c,
        Err((code, reason)) => {
            gw.metrics
                .ended(crate::metrics::Ended::TurnedAway, info.transport, None);
            Box::pin(goodbye(&gw, &mut rd, &mut wr, code, reason)).await;
            return;
        }
    };
    // A session client's hello says where to go; a version 1 client's first frame is its
    // routing key and goes to the game server as its first frame.
    let route = match session_route(&gw, &first) {
        Ok(r) => r,
        Err((code, reason)) => {
            gw.metrics
                .ended(crate::metrics::Ended::TurnedAway, info.transport, None);
            tracing::info!(client = %info.peer, transport = info.transport, %reason, "session refused");
            Box::pin(goodbye(&gw, &mut rd, &mut wr, code, &reason)).await;
            return;
        }
    };
    let v2 = !matches!(route, Route::V1);
    let stream = tokio::select! {
        s = Box::pin(open(&gw, &info, &first, &route)) => s,
        () = gw.shutdown.cancelled() => Err((close_code::GOING_AWAY, public(v2, close_code::GOING_AWAY, "gateway shutting down"))),
    };
    let stream = match stream {
        Ok(s) => s,
        Err((code, reason)) => {
            gw.stats.server_failures.fetch_add(1, Ordering::Relaxed);
            gw.metrics
                .ended(crate::metrics::Ended::NoServer, info.transport, None);
            tracing::info!(client = %info.peer, transport = info.transport, %reason, "client turned away");
            Box::pin(goodbye(&gw, &mut rd, &mut wr, code, &reason)).await;
            return;
        }
    };
    let _counted = gw.metrics.client(info.transport);
    let server = stream.peer();
    tracing::Span::current().record("clustergo.server", tracing::field::display(server));
    // A version 1 client is closed when its game server leaves membership (its connection is
    // its session: it reconnects elsewhere). A session client is not: its session lives in
    // the game server, which ends it itself when its shutdown gets there (1012, passed on
    // below), or the stream's loss tells the client to resume; cutting it here would only
    // have it resume into the same leaving server.
    let drained = if v2 {
        tokio_util::sync::CancellationToken::new()
    } else {
        gw.drain_token(server)
    };
    let (mut down, mut up) = stream.into_split();
    let mut up_buf = BytesMut::new();
    if !v2 {
        wire::put_frame(&mut up_buf, &first);
        gw.stats.frames_up.fetch_add(1, Ordering::Relaxed);
        gw.metrics
            .bytes_up
            .fetch_add(first.len() as u64, Ordering::Relaxed);
    }

    let owed = AtomicU32::new(0);
    let wake = Notify::new();
    let client_blocked = AtomicBool::new(false);
    // Bytes of the batch being written to the stream not written yet: if the session ends in
    // the middle of a write, the rest is written before the stream is ended cleanly, so the
    // game server never sees half a frame.
    let unwritten = AtomicUsize::new(0);
    let end = {
        let upstream = async {
            loop {
                if !up_buf.is_empty() {
                    {
                        unwritten.store(up_buf.len(), Ordering::Relaxed);
                        let mut write =
                            std::pin::pin!(write_counting(&mut up, &up_buf, &unwritten));
                        let mut excused = false;
                        loop {
                            match timeout(limits.write_timeout, &mut write).await {
                                Ok(Ok(())) => break,
                                Ok(Err(e)) => return End::Server(stream_reason(&e)),
                                // The game server may be stuck writing to a client that does not
                                // read: the client's fault, which the other direction's timeout
                                // reports within one more `write_timeout`. Wait that long once.
                                Err(_) if !excused && client_blocked.load(Ordering::Relaxed) => {
                                    excused = true;
                                }
                                Err(_) => {
                                    return End::Server(format!(
                                        "not reading: a write waited {:?}",
                                        limits.write_timeout
                                    ));
                                }
                            }
                        }
                    }
                    up_buf.clear();
                    shrink(&mut up_buf);
                }
                let item = match timeout(limits.idle_timeout, rd.recv()).await {
                    Ok(Ok(item)) => item,
                    Ok(Err(Fault::Eof)) => return End::ClientLeft(None),
                    Ok(Err(fault)) => return End::Client(fault),
                    Err(_) => return End::Client(Fault::Idle(limits.idle_timeout)),
                };
                if let Err(fault) = rate.take(item_len(&item), limits) {
                    return End::Client(fault);
                }
                let Item::Wire(item) = item else { continue };
                match item {
                    Inbound::Heartbeat => {
                        owed.fetch_add(1, Ordering::Relaxed);
                        wake.notify_one();
                    }
                    Inbound::Data(frame) => {
                        gw.stats.frames_up.fetch_add(1, Ordering::Relaxed);
                        gw.metrics
                            .bytes_up
                            .fetch_add(frame.len() as u64, Ordering::Relaxed);
                        wire::put_frame(&mut up_buf, &frame);
                    }
                    Inbound::Close(reason) => return End::ClientLeft(Some(reason)),
                }
            }
        };
        let downstream = async {
            let mut buf = BytesMut::new();
            let mut frames = Vec::new();
            loop {
                let heartbeats = owed.swap(0, Ordering::Relaxed);
                if heartbeats > 0 || !frames.is_empty() {
                    client_blocked.store(true, Ordering::Relaxed);
                    let sent = bounded_send(&mut wr, heartbeats, &frames, limits).await;
                    client_blocked.store(false, Ordering::Relaxed);
                    if let Err(fault) = sent {
                        return End::Client(fault);
                    }
                    gw.stats
                        .frames_down
                        .fetch_add(frames.len() as u64, Ordering::Relaxed);
                    let bytes: usize = frames.iter().map(|f| f.len()).sum();
                    gw.metrics
                        .bytes_down
                        .fetch_add(bytes as u64, Ordering::Relaxed);
                    frames.clear();
                }
                if buf.capacity() - buf.len() < 512 {
                    buf.reserve(1024);
                }
                tokio::select! {
                    n = down.read_buf(&mut buf) => match n {
                        Ok(0) if buf.is_empty() => return End::ServerEnded,
                        Ok(0) => return End::Server("stream ended inside a frame".into()),
                        Ok(_) => {}
                        Err(e) => return End::Server(stream_reason(&e)),
                    },
                    () = wake.notified() => {}
                }
                loop {
                    match wire::decode(&mut buf, limits.max_frame) {
                        Ok(Some(Inbound::Data(frame))) => frames.push(frame),
                        Ok(Some(Inbound::Heartbeat)) => {}
                        Ok(Some(Inbound::Close(reason))) => {
                            if !frames.is_empty()
                                && bounded_send(&mut wr, 0, &frames, limits).await.is_ok()
                            {
                                gw.stats
                                    .frames_down
                                    .fetch_add(frames.len() as u64, Ordering::Relaxed);
                            }
                            return End::ServerClosed(reason);
                        }
                        Ok(None) => break,
                        Err(e) => {
                            return End::Server(format!("bad frame from the game server: {e}"));
                        }
                    }
                }
            }
        };
        let mut upstream = std::pin::pin!(upstream);
        let mut downstream = std::pin::pin!(downstream);
        tokio::select! {
            end = &mut upstream => match end {
                // Writing failed because the game server ended or reset the stream; what it
                // sent before (its last frames, a kick's reason, its end) is still readable
                // and says more than the write error.
                End::Server(reason) => match timeout(LINGER, &mut downstream).await {
                    Ok(end @ (End::ServerClosed(_) | End::ServerEnded)) => end,
                    _ => End::Server(reason),
                },
                end => end,
            },
            end = &mut downstream => end,
            () = gw.shutdown.cancelled() => End::Shutdown,
            () = drained.cancelled() => End::Drained,
        }
    };
    log_end(&gw, &info, Some(server), &end);
    // The ending, boxed: a client's task holds only what its idle phase needs, not the
    // largest of its phases (a task's future is as large as its largest await point).
    Box::pin(async {
        // The stream: a clean client exit (or shutdown, or drain) ends it cleanly, so the game
        // server reads every frame and then the end; anything else resets it with the reason.
        // The client is told at the same time.
        let stream_end = async {
            match &end {
                End::ClientLeft(_) | End::Shutdown | End::Drained => {
                    let rest = unwritten.load(Ordering::Relaxed).min(up_buf.len());
                    let tail = &up_buf[up_buf.len() - rest..];
                    let ended = async {
                        up.write_all(tail).await?;
                        up.shutdown().await
                    };
                    if matches!(timeout(limits.write_timeout, ended).await, Ok(Ok(()))) {
                        // Let the game server finish its side (its last frames are dropped: the
                        // client is gone or being told to go), bounded.
                        let drain = async {
                            let mut sink = [0u8; 1024];
                            while matches!(down.read(&mut sink).await, Ok(n) if n > 0) {}
                        };
                        let _ = timeout(LINGER, drain).await;
                    }
                }
                End::Client(fault) => up.reset(format!("client {}: {fault}", info.peer)),
                End::ServerEnded | End::ServerClosed(_) | End::Server(_) => {}
            }
        };
        let client_end = async {
            if let End::ClientLeft(said) = &end {
                let finish = wr.finish(said.is_some());
                let _ = timeout(limits.write_timeout.min(LINGER), finish).await;
            } else {
                close_client(&gw, &mut rd, &mut wr, &end, Some(server), v2).await;
            }
        };
        tokio::join!(stream_end, client_end);
    })
    .await;
}

/// Writes all of `buf`, keeping `unwritten` up to date after every write.
async fn write_counting(
    up: &mut clustergo::StreamWriter,
    buf: &[u8],
    unwritten: &AtomicUsize,
) -> io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        let n = up.write(&buf[off..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        off += n;
        unwritten.store(buf.len() - off, Ordering::Relaxed);
    }
    Ok(())
}

/// Drops a buffer's allocation once it is empty and large: a client that sent (or was sent)
/// one large frame does not keep a large buffer while it idles.
pub(crate) fn shrink(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > SHRINK_ABOVE {
        *buf = BytesMut::new();
    }
}

/// Buffers larger than this are dropped once empty.
pub(crate) const SHRINK_ABOVE: usize = 16 << 10;

fn item_len(item: &Item) -> usize {
    match item {
        Item::Wire(Inbound::Data(b)) => b.len(),
        Item::Wire(_) => 0,
        Item::Control(n) => *n,
    }
}

async fn bounded_send<W: FrameWrite>(
    wr: &mut W,
    heartbeats: u32,
    frames: &[Bytes],
    limits: &Limits,
) -> Result<(), Fault> {
    match timeout(limits.write_timeout, wr.send(heartbeats, frames)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Fault::Io(e)),
        Err(_) => Err(Fault::NotReading(limits.write_timeout)),
    }
}

/// Ends a session that has no stream yet.
async fn finish_client<R: FrameRead, W: FrameWrite>(
    gw: &Gateway,
    info: &ClientInfo,
    rd: &mut R,
    wr: &mut W,
    end: End,
) {
    log_end(gw, info, None, &end);
    close_client(gw, rd, wr, &end, None, false).await;
}

/// Tells the client why it is closed, then reads and drops what it still sends until it
/// closes too (bounded): closing a socket with unread input makes the kernel reset the
/// connection, and a reset can destroy the close frame before the client reads it. A session
/// client (`v2`) is told a stable code and a public reason; what failed inside goes to the
/// log only.
async fn close_client<R: FrameRead, W: FrameWrite>(
    gw: &Gateway,
    rd: &mut R,
    wr: &mut W,
    end: &End,
    server: Option<LogicAddr>,
    v2: bool,
) {
    if v2 {
        use clustergo_client::session::{code, parse_close};
        let (c, text): (u16, String) = match end {
            End::ClientLeft(_) => (code::NORMAL, "bye".into()),
            End::Client(Fault::NotReading(_) | Fault::Eof | Fault::Io(_)) => return,
            End::Client(fault) => (fault.code(), fault.to_string()),
            End::ServerEnded => (code::NORMAL, "session ended".into()),
            // The session layer's own close: already a code and a public reason.
            End::ServerClosed(reason) => match parse_close(reason) {
                (Some(c), text) => (c, text.to_owned()),
                (None, _) => (code::NORMAL, "session ended".into()),
            },
            End::Server(_) => (
                code::SERVER_UNAVAILABLE,
                "game server unavailable, reconnect".into(),
            ),
            End::Shutdown => (code::GOING_AWAY, "gateway shutting down, reconnect".into()),
            // The session lives on in the game server, detached: the client may resume it
            // while the server is still there.
            End::Drained => (
                code::SERVER_UNAVAILABLE,
                "game server unavailable, reconnect".into(),
            ),
        };
        goodbye(
            gw,
            rd,
            wr,
            c,
            &clustergo_client::session::close_reason(c, &text),
        )
        .await;
        return;
    }
    let (code, reason) = match end {
        End::ClientLeft(_) => (close_code::NORMAL, "bye".to_owned()),
        End::Client(Fault::NotReading(_) | Fault::Eof | Fault::Io(_)) => return,
        End::Client(fault) => (fault.code(), fault.to_string()),
        End::ServerEnded => (
            close_code::NORMAL,
            "session ended by the game server".into(),
        ),
        End::ServerClosed(reason) => (close_code::NORMAL, reason.clone()),
        End::Server(reason) => (
            close_code::SERVER_ERROR,
            match server {
                Some(s) => format!("game server {s} failed: {reason}"),
                None => reason.clone(),
            },
        ),
        End::Shutdown => (close_code::GOING_AWAY, "gateway shutting down".into()),
        End::Drained => (
            close_code::TRY_AGAIN,
            match server {
                Some(s) => format!("game server {s} is leaving: reconnect"),
                None => "game server leaving: reconnect".into(),
            },
        ),
    };
    goodbye(gw, rd, wr, code, &reason).await;
}

/// Sends the close (bounded: a client that does not read cannot hold the session), then
/// lingers until the client closes its side (bounded).
pub(crate) async fn goodbye<R: FrameRead, W: FrameWrite>(
    gw: &Gateway,
    rd: &mut R,
    wr: &mut W,
    code: u16,
    reason: &str,
) {
    let limit = gw.limits.write_timeout.min(LINGER);
    if matches!(timeout(limit, wr.close(code, reason)).await, Ok(Ok(()))) {
        let _ = timeout(LINGER, rd.discard()).await;
    }
}

/// How long a closed client may take to close its side.
const LINGER: Duration = Duration::from_secs(1);

fn log_end(gw: &Gateway, info: &ClientInfo, server: Option<LogicAddr>, end: &End) {
    use crate::metrics::Ended;
    let how = match end {
        End::Client(Fault::Eof) | End::ClientLeft(_) => Ended::ClientLeft,
        End::Client(_) => Ended::ClientFault,
        End::Server(_) => Ended::ServerFailed,
        End::ServerEnded | End::ServerClosed(_) => Ended::ServerClosed,
        End::Shutdown => Ended::Shutdown,
        End::Drained => Ended::Drained,
    };
    // The session began at accept, a handshake timeout before its handshake deadline.
    let began = info.deadline.checked_sub(gw.limits.handshake_timeout);
    let lasted = server.and(began).map(|b| b.elapsed());
    gw.metrics.ended(how, info.transport, lasted);
    tracing::Span::current().record("clustergo.end", how.as_str());
    let server = server.map(|s| s.to_string()).unwrap_or_else(|| "-".into());
    match end {
        End::Client(Fault::Eof) => {
            tracing::debug!(client = %info.peer, transport = info.transport, %server, "client left");
        }
        End::Client(fault) => {
            gw.stats.client_faults.fetch_add(1, Ordering::Relaxed);
            tracing::info!(client = %info.peer, transport = info.transport, %server, reason = %fault, "client disconnected");
        }
        End::ClientLeft(reason) => {
            tracing::debug!(client = %info.peer, transport = info.transport, %server, reason = reason.as_deref().unwrap_or("end of stream"), "client left");
        }
        End::Server(reason) => {
            gw.stats.server_failures.fetch_add(1, Ordering::Relaxed);
            tracing::info!(client = %info.peer, transport = info.transport, %server, %reason, "game server failed: client closed");
        }
        End::ServerEnded | End::ServerClosed(_) => {
            tracing::debug!(client = %info.peer, transport = info.transport, %server, "game server ended the session");
        }
        End::Shutdown => {
            tracing::debug!(client = %info.peer, transport = info.transport, %server, "closed for shutdown");
        }
        End::Drained => {
            tracing::debug!(client = %info.peer, transport = info.transport, %server, "game server leaving: client closed");
        }
    }
}

fn stream_reason(e: &io::Error) -> String {
    match StreamError::from_io(e) {
        Some(s) => s.to_string(),
        None => e.to_string(),
    }
}

/// Opens the client's stream: up to `open_attempts` different game servers.
/// Where a client goes.
#[derive(Debug)]
enum Route {
    /// A version 1 client: its first frame is the routing key, then goes to the server.
    V1,
    /// A new session, routed by this key.
    New(Bytes),
    /// A session resuming on the game server its token names.
    Resume {
        server: LogicAddr,
        token: clustergo_client::session::Token,
        received: u64,
    },
}

/// Reads a first frame: a session hello (checked: its version, and a resume's token) or a
/// version 1 client's frame.
fn session_route(gw: &Gateway, first: &Bytes) -> Result<Route, (u16, String)> {
    use clustergo_client::session::{Hello, SessionWireError, close_reason, code};
    match Hello::decode(first) {
        Ok(None) => Ok(Route::V1),
        Ok(Some(Hello::New { key })) => Ok(Route::New(key)),
        Ok(Some(Hello::Resume { token, received })) => {
            if let Err(e) = gw.tokens.check(&token) {
                return Err((e.code(), close_reason(e.code(), &e.to_string())));
            }
            // Only to a game server of this gateway's type that membership lists: a token is
            // never a way to reach any other node.
            let server = LogicAddr::from_u32(token.server)
                .ok()
                .filter(|s| s.node_type() == gw.backend_type && gw.node.member(*s).is_some())
                .ok_or_else(|| {
                    let c = code::NO_SESSION;
                    (c, close_reason(c, "session no longer exists"))
                })?;
            Ok(Route::Resume {
                server,
                token,
                received,
            })
        }
        Err(e @ SessionWireError::Version(_)) => {
            Err((code::VERSION, close_reason(code::VERSION, &e.to_string())))
        }
        Err(e) => Err((code::PROTOCOL, close_reason(code::PROTOCOL, &e.to_string()))),
    }
}

/// A close reason for a client: with its code first for a session client.
fn public(v2: bool, code: u16, text: &str) -> String {
    if v2 {
        clustergo_client::session::close_reason(code, text)
    } else {
        text.to_owned()
    }
}

async fn open(
    gw: &Gateway,
    info: &ClientInfo,
    first: &Bytes,
    route: &Route,
) -> Result<Stream, (u16, String)> {
    use clustergo::session::{META_RECEIVED, META_SESSION, META_TOKEN, hex};
    let key = match route {
        Route::New(key) => key,
        _ => first,
    };
    let mut tried: Vec<LogicAddr> = Vec::new();
    let mut last = String::new();
    let v2 = !matches!(route, Route::V1);
    for _ in 0..gw.limits.open_attempts {
        // A resume goes to its session's server, and only there.
        let target = match route {
            Route::Resume { server, .. } if tried.is_empty() => Some(*server),
            Route::Resume { .. } => None,
            _ => pick(gw, key, &tried),
        };
        let Some(target) = target else {
            break;
        };
        tried.push(target);
        let mut meta = StreamMeta::new()
            .with("transport", info.transport)
            .with("client", info.peer.to_string())
            .with("gateway", gw.node.addr().to_string());
        if let Some(p) = &info.subprotocol {
            meta.insert("subprotocol", p.as_ref());
        }
        match route {
            Route::V1 => {}
            Route::New(_) => meta.insert(META_SESSION, "new"),
            Route::Resume {
                token, received, ..
            } => {
                meta.insert(META_SESSION, "resume");
                meta.insert(META_TOKEN, hex(&token.to_bytes()));
                meta.insert(META_RECEIVED, received.to_string());
            }
        }
        match timeout(
            gw.limits.open_timeout,
            gw.node.open_stream_with(target, meta),
        )
        .await
        {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = format!("opening a stream to {target} timed out"),
        }
        tracing::debug!(client = %info.peer, %target, reason = %last, "open failed; trying another server");
    }
    if let Route::Resume { server, .. } = route {
        // Its server may come back within the resume window: the client may try again.
        tracing::info!(client = %info.peer, %server, reason = %last, "session cannot resume now");
        let c = clustergo_client::session::code::SERVER_UNAVAILABLE;
        return Err((c, public(v2, c, "game server unavailable, reconnect")));
    }
    if tried.is_empty() {
        return Err((
            close_code::TRY_AGAIN,
            public(
                v2,
                close_code::TRY_AGAIN,
                &format!("no game server of type {} available", gw.backend_type),
            ),
        ));
    }
    tracing::info!(client = %info.peer, reason = %last, "no game server took the client");
    Err((
        close_code::TRY_AGAIN,
        if v2 {
            public(
                v2,
                close_code::TRY_AGAIN,
                "no game server took the client, try again later",
            )
        } else {
            format!("no game server took the client: {last}")
        },
    ))
}

/// An available game server not tried yet: any (random) or the key's (sticky).
fn pick(gw: &Gateway, first: &[u8], tried: &[LogicAddr]) -> Option<LogicAddr> {
    let mut candidates = gw.node.available_of_type(gw.backend_type);
    candidates.retain(|a| !tried.contains(a));
    match gw.policy {
        Policy::Random => {
            (!candidates.is_empty()).then(|| candidates[fastrand::usize(..candidates.len())])
        }
        Policy::Sticky => rendezvous(first, &candidates),
    }
}

/// The server with the highest score for `key` (rendezvous hashing): independent of the
/// candidates' order, and when a server joins or leaves only the keys it wins or held move.
fn rendezvous(key: &[u8], candidates: &[LogicAddr]) -> Option<LogicAddr> {
    // The library's rendezvous hashing, as every node picks harbors and sticky targets.
    clustergo::rendezvous::pick(
        clustergo::rendezvous::key_of(key),
        candidates.iter().copied(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_allows_a_one_second_burst_then_refills() {
        let limits = Limits {
            frames_per_sec: 10,
            bytes_per_sec: 1000,
            ..Limits::default()
        };
        let mut rate = Rate::new(&limits);
        for _ in 0..10 {
            rate.take(10, &limits).unwrap();
        }
        assert!(matches!(rate.take(10, &limits), Err(Fault::FrameRate(10))));
        tokio::time::advance(Duration::from_millis(500)).await;
        for _ in 0..5 {
            rate.take(10, &limits).unwrap();
        }
        assert!(rate.take(0, &limits).is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(matches!(
            rate.take(1001, &limits),
            Err(Fault::ByteRate(1000))
        ));
        rate.take(1000, &limits).unwrap();
    }

    #[test]
    fn sticky_keys_spread_and_only_a_new_servers_keys_move() {
        let a = |s: &str| -> LogicAddr { s.parse().unwrap() };
        let three = [a("1.1.1"), a("1.1.2"), a("1.1.3")];
        let four = [a("1.1.4"), a("1.1.3"), a("1.1.2"), a("1.1.1")];
        let mut per_server = std::collections::HashMap::new();
        let mut moved = 0;
        for i in 0..3000 {
            let key = format!("player-{i}");
            let before = rendezvous(key.as_bytes(), &three).unwrap();
            let reversed: Vec<_> = three.iter().rev().copied().collect();
            assert_eq!(rendezvous(key.as_bytes(), &reversed), Some(before));
            *per_server.entry(before).or_insert(0) += 1;
            let after = rendezvous(key.as_bytes(), &four).unwrap();
            if after != before {
                assert_eq!(after, a("1.1.4"), "{key} moved between old servers");
                moved += 1;
            }
        }
        // Roughly a third each, and roughly a quarter moves to the new server.
        assert!(
            per_server.values().all(|n| (800..1200).contains(n)),
            "{per_server:?}"
        );
        assert!((550..950).contains(&moved), "{moved} of 3000 moved");
        assert_eq!(rendezvous(b"x", &[]), None);
    }
}
