//! Client listeners (TCP, WebSocket, KCP; TLS on the first two) and the two frame formats:
//! length-prefixed on TCP and KCP, one binary message per frame on WebSocket.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Buf, Bytes, BytesMut};
use clustergo_client::wire::{self, Inbound};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::timeout_at;
use tokio_rustls::{TlsAcceptor, rustls};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::config::Listen;
use crate::session::{self, ClientInfo, Fault, FrameRead, FrameWrite, Gateway, Item};

/// Reads length-prefixed frames from a byte stream.
#[derive(Debug)]
pub(crate) struct FramedRead<R> {
    io: R,
    buf: BytesMut,
    limit: usize,
}

impl<R: AsyncRead + Unpin + Send> FramedRead<R> {
    pub(crate) fn new(io: R, limit: usize) -> Self {
        FramedRead {
            io,
            buf: BytesMut::new(),
            limit,
        }
    }
}

impl<R: AsyncRead + Unpin + Send> FrameRead for FramedRead<R> {
    async fn discard(&mut self) {
        self.buf.clear();
        let mut sink = [0u8; 512];
        while matches!(self.io.read(&mut sink).await, Ok(n) if n > 0) {}
    }

    async fn recv(&mut self) -> Result<Item, Fault> {
        loop {
            match wire::decode(&mut self.buf, self.limit) {
                Ok(Some(item)) => return Ok(Item::Wire(item)),
                Ok(None) => {}
                Err(wire::WireError::TooLarge { size, limit }) => {
                    return Err(Fault::TooLarge { size, limit });
                }
                Err(e) => return Err(Fault::Malformed(e.to_string())),
            }
            // Small reads while idle: an idle client holds a small buffer; `decode` reserves
            // the whole frame once its length is known.
            if self.buf.capacity() - self.buf.len() < 64 {
                self.buf.reserve(512);
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(if self.buf.is_empty() {
                    Fault::Eof
                } else {
                    Fault::Malformed("connection ended inside a frame".into())
                });
            }
        }
    }
}

/// Writes length-prefixed frames to a byte stream.
#[derive(Debug)]
pub(crate) struct FramedWrite<W> {
    io: W,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin + Send> FramedWrite<W> {
    pub(crate) fn new(io: W) -> Self {
        FramedWrite {
            io,
            buf: BytesMut::new(),
        }
    }

    async fn flush_buf(&mut self) -> io::Result<()> {
        while self.buf.has_remaining() {
            let n = self.io.write(&self.buf).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.buf.advance(n);
        }
        // Keep no large buffer while the client is quiet.
        if self.buf.capacity() > 16 << 10 {
            self.buf = BytesMut::new();
        }
        self.io.flush().await
    }
}

impl<W: AsyncWrite + Unpin + Send> FrameWrite for FramedWrite<W> {
    async fn send(&mut self, heartbeats: u32, frames: &[Bytes]) -> io::Result<()> {
        for _ in 0..heartbeats {
            wire::put_frame(&mut self.buf, &[]);
        }
        for f in frames {
            wire::put_frame(&mut self.buf, f);
        }
        self.flush_buf().await
    }

    async fn finish(&mut self, answer: bool) -> io::Result<()> {
        if answer {
            wire::put_close(&mut self.buf, BYE);
        }
        self.flush_buf().await?;
        self.io.shutdown().await
    }

    async fn close(&mut self, _code: u16, reason: &str) -> io::Result<()> {
        wire::put_close(&mut self.buf, reason);
        self.flush_buf().await?;
        self.io.shutdown().await
    }
}

/// Reads WebSocket messages as frames.
pub(crate) struct WsRead<S> {
    ws: SplitStream<WebSocketStream<Metered<S>>>,
    /// The connection under the WebSocket layer, for draining it after a close.
    raw: Raw<S>,
}

/// Writes frames as WebSocket binary messages.
pub(crate) struct WsWrite<S>(SplitSink<WebSocketStream<Metered<S>>, Message>);

impl<S: AsyncRead + AsyncWrite + Unpin + Send> FrameRead for WsRead<S> {
    /// Drains the raw connection rather than the WebSocket layer: after a message over the
    /// limit the layer only repeats its error, while the rest of that message still sits in
    /// the socket, and closing a socket with unread input resets the connection — which can
    /// destroy the close (1009 and its reason) before the client reads it.
    async fn discard(&mut self) {
        let raw = self.raw.clone();
        std::future::poll_fn(move |cx| {
            let mut io = raw.lock().unwrap_or_else(|e| e.into_inner());
            let mut sink = [0u8; 4096];
            loop {
                let mut buf = tokio::io::ReadBuf::new(&mut sink);
                match std::pin::Pin::new(&mut *io).poll_read(cx, &mut buf) {
                    std::task::Poll::Ready(Ok(())) if !buf.filled().is_empty() => continue,
                    std::task::Poll::Ready(_) => return std::task::Poll::Ready(()),
                    std::task::Poll::Pending => return std::task::Poll::Pending,
                }
            }
        })
        .await
    }

    async fn recv(&mut self) -> Result<Item, Fault> {
        let item = match self.ws.next().await {
            None => return Err(Fault::Eof),
            Some(Ok(Message::Binary(b))) if b.is_empty() => Inbound::Heartbeat,
            Some(Ok(Message::Binary(b))) => Inbound::Data(b),
            Some(Ok(Message::Close(frame))) => {
                Inbound::Close(frame.map(|f| f.reason.to_string()).unwrap_or_default())
            }
            Some(Ok(Message::Text(_))) => {
                return Err(Fault::Malformed("text message (frames are binary)".into()));
            }
            // Pings are answered by the WebSocket layer, but they cost like heartbeats.
            Some(Ok(Message::Ping(b) | Message::Pong(b))) => return Ok(Item::Control(b.len())),
            Some(Ok(Message::Frame(_))) => return Ok(Item::Control(0)),
            Some(Err(tungstenite::Error::Capacity(e))) => {
                return Err(match e {
                    tungstenite::error::CapacityError::MessageTooLong { size, max_size } => {
                        Fault::TooLarge {
                            size,
                            limit: max_size,
                        }
                    }
                    other => Fault::Malformed(other.to_string()),
                });
            }
            Some(Err(tungstenite::Error::Io(e))) => {
                return Err(
                    match e.get_ref().and_then(|i| i.downcast_ref::<RawRate>()) {
                        Some(RawRate(limit)) => Fault::ByteRate(*limit),
                        None => Fault::Io(e),
                    },
                );
            }
            Some(Err(
                tungstenite::Error::ConnectionClosed
                | tungstenite::Error::AlreadyClosed
                | tungstenite::Error::Protocol(
                    tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                ),
            )) => return Err(Fault::Eof),
            Some(Err(e)) => return Err(Fault::Malformed(e.to_string())),
        };
        Ok(Item::Wire(item))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> FrameWrite for WsWrite<S> {
    async fn send(&mut self, heartbeats: u32, frames: &[Bytes]) -> io::Result<()> {
        for _ in 0..heartbeats {
            self.0
                .feed(Message::Binary(Bytes::new()))
                .await
                .map_err(ws_io)?;
        }
        for f in frames {
            self.0
                .feed(Message::Binary(f.clone()))
                .await
                .map_err(ws_io)?;
        }
        self.0.flush().await.map_err(ws_io)
    }

    async fn finish(&mut self, _answer: bool) -> io::Result<()> {
        // tungstenite queued the answer to the client's close; this sends it.
        match self.0.close().await {
            Ok(()) | Err(tungstenite::Error::ConnectionClosed) => Ok(()),
            Err(e) => Err(ws_io(e)),
        }
    }

    async fn close(&mut self, code: u16, reason: &str) -> io::Result<()> {
        let frame = CloseFrame {
            code: code.into(),
            reason: wire::clip(reason, wire::MAX_WS_REASON).into(),
        };
        self.0
            .send(Message::Close(Some(frame)))
            .await
            .map_err(ws_io)?;
        self.0.close().await.map_err(ws_io)
    }
}

fn ws_io(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        other => io::Error::other(other),
    }
}

/// Loads a listener's certificate chain and key.
pub(crate) fn tls_acceptor(listen: &Listen) -> Result<Option<TlsAcceptor>, String> {
    let Some((cert, key)) = &listen.tls else {
        return Ok(None);
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|c| c.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("tls_cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("tls_cert {} holds no certificate", cert.display()));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("tls_key {}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("tls_cert/tls_key {}: {e}", cert.display()))?;
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

/// Takes a handshake slot of this listener for a new connection, or `None` when
/// `max_handshakes` of its connections are already between accept and their first frame
/// (counted and logged).
///
/// Connections hold a handshake slot until their first data frame, and only then take one of
/// the `max_clients` slots: a flood of connections that never finish (or of forged KCP
/// datagrams: UDP proves nothing about the sender) fills only its own listener's handshake
/// budget — never the clients', nor another transport's — and a connection turned away here
/// costs no task and no TLS or WebSocket work.
fn admit(
    gw: &Gateway,
    budget: &Arc<Semaphore>,
    peer: SocketAddr,
    transport: &str,
) -> Option<Permit> {
    match budget.clone().try_acquire_owned() {
        Ok(p) => {
            gw.stats.accepted.fetch_add(1, Ordering::Relaxed);
            Some(p)
        }
        Err(_) => {
            gw.stats.turned_away.fetch_add(1, Ordering::Relaxed);
            if let Some(skipped) = HANDSHAKES_FULL.pass() {
                tracing::info!(client = %peer, transport, max_handshakes = gw.limits.max_handshakes, skipped, "too many handshakes: connection dropped");
            }
            None
        }
    }
}

/// What a plain TCP client turned away at accept gets: a close frame, written only if the
/// socket takes it at once.
fn busy_frame() -> BytesMut {
    let mut b = BytesMut::new();
    wire::put_close(&mut b, BUSY);
    b
}

const BUSY: &str = "gateway busy: try again later";

/// The reason of the close frame that answers a client's.
const BYE: &str = "bye";

/// What a WebSocket client turned away at accept gets, if the socket takes it at once.
const BUSY_HTTP: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// The next TCP connection, or `None` once the gateway shuts down.
async fn next_tcp(
    gw: &Gateway,
    listener: &TcpListener,
    what: &str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((sock, peer)) => {
                    let _ = sock.set_nodelay(true);
                    return Some((sock, peer));
                }
                Err(e) => {
                    // Out of descriptors and the like: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "{what} accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            () = gw.shutdown.cancelled() => return None,
        }
    }
}

/// Serves a length-prefixed client (TCP, TLS, KCP).
async fn framed<R, W>(gw: Arc<Gateway>, handshake: Permit, info: ClientInfo, r: R, w: W)
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let (r, w) = (FramedRead::new(r, gw.limits.max_frame), FramedWrite::new(w));
    session::serve(gw, handshake, info, r, w).await;
}

type Permit = tokio::sync::OwnedSemaphorePermit;

fn info(gw: &Gateway, transport: &'static str, peer: SocketAddr) -> ClientInfo {
    ClientInfo {
        transport,
        peer,
        deadline: tokio::time::Instant::now() + gw.limits.handshake_timeout,
        subprotocol: None,
    }
}

/// Accepts TCP clients (with TLS when configured) until shutdown.
pub(crate) async fn tcp(gw: Arc<Gateway>, listener: TcpListener, tls: Option<TlsAcceptor>) {
    let busy = busy_frame();
    let budget = Arc::new(Semaphore::new(gw.limits.max_handshakes));
    while let Some((sock, peer)) = next_tcp(&gw, &listener, "tcp").await {
        let Some(permit) = admit(&gw, &budget, peer, "tcp") else {
            if tls.is_none() {
                let _ = sock.try_write(&busy);
            }
            continue;
        };
        let g = gw.clone();
        let tls = tls.clone();
        gw.tasks.spawn(async move {
            match tls {
                None => {
                    let (r, w) = sock.into_split();
                    let info = info(&g, "tcp", peer);
                    framed(g, permit, info, r, w).await;
                }
                Some(tls) => {
                    let info = info(&g, "tls", peer);
                    let Some(stream) = tls_handshake(&g, &tls, sock, peer, info.deadline).await
                    else {
                        return;
                    };
                    let (r, w) = tokio::io::split(stream);
                    framed(g, permit, info, r, w).await;
                }
            }
        });
    }
}

/// The TLS handshake, bounded by the client's deadline and by shutdown.
async fn tls_handshake(
    gw: &Gateway,
    tls: &TlsAcceptor,
    sock: TcpStream,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let accept = tokio::select! {
        r = timeout_at(deadline, tls.accept(sock)) => r,
        () = gw.shutdown.cancelled() => return None,
    };
    match accept {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            if let Some(skipped) = HANDSHAKE_FAILED.pass() {
                tracing::info!(client = %peer, reason = %format!("TLS handshake failed: {e}"), skipped, "client disconnected");
            }
            None
        }
        Err(_) => {
            if let Some(skipped) = HANDSHAKE_FAILED.pass() {
                tracing::info!(client = %peer, reason = "TLS handshake timed out", skipped, "client disconnected");
            }
            None
        }
    }
}

/// Accepts WebSocket clients on `path` (with TLS when configured) until shutdown.
pub(crate) async fn websocket(
    gw: Arc<Gateway>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    path: String,
    protocols: Vec<String>,
) {
    let path: Arc<str> = path.into();
    let protocols: Arc<[String]> = protocols.into();
    let budget = Arc::new(Semaphore::new(gw.limits.max_handshakes));
    while let Some((sock, peer)) = next_tcp(&gw, &listener, "websocket").await {
        let Some(permit) = admit(&gw, &budget, peer, "websocket") else {
            if tls.is_none() {
                let _ = sock.try_write(BUSY_HTTP);
            }
            continue;
        };
        let g = gw.clone();
        let tls = tls.clone();
        let (path, protocols) = (path.clone(), protocols.clone());
        gw.tasks.spawn(async move {
            match tls {
                None => {
                    let info = info(&g, "ws", peer);
                    ws_session(g, permit, sock, info, &path, &protocols).await;
                }
                Some(tls) => {
                    let info = info(&g, "wss", peer);
                    if let Some(s) = tls_handshake(&g, &tls, sock, peer, info.deadline).await {
                        ws_session(g, permit, s, info, &path, &protocols).await;
                    }
                }
            }
        });
    }
}

async fn ws_session<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    gw: Arc<Gateway>,
    handshake: Permit,
    io: S,
    mut info: ClientInfo,
    path: &str,
    protocols: &[String],
) {
    let mut chosen = None;
    // The callback's error type is tungstenite's; its size is not ours to choose.
    #[allow(clippy::result_large_err)]
    let check = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let refuse = |status, text: String| {
            let mut r = ErrorResponse::new(Some(text));
            *r.status_mut() = status;
            r
        };
        if req.uri().path() != path {
            let text = format!("no WebSocket at {}", req.uri().path());
            return Err(refuse(tungstenite::http::StatusCode::NOT_FOUND, text));
        }
        let offered: Vec<&str> = req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
        if offered.is_empty() || protocols.is_empty() {
            return Ok(resp);
        }
        match offered.iter().find(|p| protocols.iter().any(|q| q == *p)) {
            Some(p) => {
                if let Ok(v) = tungstenite::http::HeaderValue::from_str(p) {
                    resp.headers_mut().insert("sec-websocket-protocol", v);
                }
                chosen = Some(p.to_string());
                Ok(resp)
            }
            None => {
                let text = format!(
                    "no common subprotocol: offered {}, supported {}",
                    offered.join(", "),
                    protocols.join(", ")
                );
                Err(refuse(tungstenite::http::StatusCode::BAD_REQUEST, text))
            }
        }
    };
    let config = clustergo_client::ws_config(gw.limits.max_frame);
    let (io, raw) = Metered::new(io, gw.limits.bytes_per_sec);
    let peer = info.peer;
    let upgrade = tokio::select! {
        r = timeout_at(
            info.deadline,
            tokio_tungstenite::accept_hdr_async_with_config(io, check, Some(config)),
        ) => r,
        () = gw.shutdown.cancelled() => return,
    };
    let ws = match upgrade {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            if let Some(skipped) = HANDSHAKE_FAILED.pass() {
                tracing::info!(client = %peer, reason = %format!("WebSocket handshake failed: {e}"), skipped, "client disconnected");
            }
            return;
        }
        Err(_) => {
            if let Some(skipped) = HANDSHAKE_FAILED.pass() {
                tracing::info!(client = %peer, reason = "WebSocket handshake timed out", skipped, "client disconnected");
            }
            return;
        }
    };
    info.subprotocol = chosen.map(String::into_boxed_str);
    let (w, r) = ws.split();
    let r = WsRead { ws: r, raw };
    session::serve(gw, handshake, info, r, WsWrite(w)).await;
}

/// Accepts KCP clients until shutdown; returns the listener, which must outlive the sessions
/// it accepted (dropping it stops their input).
pub(crate) async fn kcp(
    gw: Arc<Gateway>,
    mut listener: tokio_kcp::KcpListener,
) -> tokio_kcp::KcpListener {
    let budget = Arc::new(Semaphore::new(gw.limits.max_handshakes));
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::error!(error = %e, "kcp listener failed: no more KCP clients");
                    return listener;
                }
            },
            () = gw.shutdown.cancelled() => return listener,
        };
        // Turned away silently: answering an unauthenticated datagram would let a forged
        // source aim our replies at someone else.
        let Some(permit) = admit(&gw, &budget, peer, "kcp") else {
            continue;
        };
        let g = gw.clone();
        gw.tasks.spawn(async move {
            let (r, w) = tokio::io::split(stream);
            let info = info(&g, "kcp", peer);
            framed(g, permit, info, r, w).await;
        });
    }
}

/// The raw bytes a WebSocket client sends, metered before tungstenite parses them: message
/// fragments and control frames that never complete a message would otherwise cost nothing
/// against the rate limits. Allows twice `bytes_per_sec` (framing included, and the payload is
/// charged again when its message completes) with a one-second burst; over it, reading fails
/// with [`RawRate`].
pub(crate) struct Metered<S> {
    // Shared with the reading half's `Raw`, which drains it after a close. The WebSocket
    // layer never reads and writes at once (its halves share one lock), so this lock is
    // never contended while it runs.
    io: Raw<S>,
    limit: u64,
    tokens: f64,
    last: tokio::time::Instant,
}

/// The error a [`Metered`] reader fails with: the client's raw bytes went over twice its
/// `bytes_per_sec` (the limit named is `bytes_per_sec`).
#[derive(Debug, thiserror::Error)]
#[error("over the rate limit of {0} bytes/s (WebSocket framing included)")]
pub(crate) struct RawRate(pub(crate) u64);

/// The connection under a WebSocket.
type Raw<S> = Arc<std::sync::Mutex<S>>;

impl<S> Metered<S> {
    fn new(io: S, bytes_per_sec: u64) -> (Self, Raw<S>) {
        let io = Arc::new(std::sync::Mutex::new(io));
        let metered = Metered {
            io: io.clone(),
            limit: bytes_per_sec,
            tokens: 2.0 * bytes_per_sec as f64,
            last: tokio::time::Instant::now(),
        };
        (metered, io)
    }

    fn io(&self) -> std::sync::MutexGuard<'_, S> {
        self.io.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        std::task::ready!(std::pin::Pin::new(&mut *self.io()).poll_read(cx, buf))?;
        let n = (buf.filled().len() - before) as f64;
        let now = tokio::time::Instant::now();
        let cap = 2.0 * self.limit as f64;
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * cap).min(cap) - n;
        if self.tokens < 0.0 {
            return std::task::Poll::Ready(Err(io::Error::other(RawRate(self.limit))));
        }
        std::task::Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut *self.io()).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut *self.io()).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut *self.io()).poll_shutdown(cx)
    }
}

static HANDSHAKES_FULL: clustergo::LogGate = clustergo::LogGate::new();
// Connections turned away before any session are cheap to make (over UDP their sources can
// be forged): their lines are gated.
static HANDSHAKE_FAILED: clustergo::LogGate = clustergo::LogGate::new();
