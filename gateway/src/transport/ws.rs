//! WebSocket clients (with TLS when configured): one binary message per frame.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use clustergo_client::wire::{self, Inbound};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::time::timeout_at;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::admission::{Bucket, Handshake};
use crate::session::{self, ClientInfo, Fault, FrameRead, FrameWrite, Item};
use crate::state::Gateway;
use crate::transport::framed::tls_handshake;
use crate::transport::{HANDSHAKE_FAILED, info, next_tcp};

/// Reads WebSocket messages as frames.
pub(crate) struct WsRead<S> {
    ws: SplitStream<WebSocketStream<Metered<S>>>,
    /// The connection under the WebSocket layer, for draining it after a close.
    raw: Raw<S>,
    /// The WebSocket layer failed on the client's input (a message over the limit, a
    /// protocol error): after a close only the raw connection can be drained.
    broken: bool,
}

/// Writes frames as WebSocket binary messages.
pub(crate) struct WsWrite<S>(SplitSink<WebSocketStream<Metered<S>>, Message>);

impl<S: AsyncRead + AsyncWrite + Unpin + Send> FrameRead for WsRead<S> {
    /// Reads until the client answers the close, then returns at once, so the connection
    /// ends right away: a browser reports a close only when the server has ended the TCP
    /// connection, which otherwise waited for the linger (about 1 s late). After the
    /// WebSocket layer failed (a message over the limit: the layer only repeats its error,
    /// while the rest of that message still sits in the socket), the raw connection is
    /// drained instead, since closing a socket with unread input resets the connection — which
    /// can destroy the close (1009 and its reason) before the client reads it.
    async fn discard(&mut self) {
        if !self.broken {
            while let Some(Ok(m)) = self.ws.next().await {
                if matches!(m, Message::Close(_)) {
                    return;
                }
            }
            return;
        }
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
        let item = self.next_item().await;
        if matches!(item, Err(Fault::TooLarge { .. } | Fault::Malformed(_))) {
            self.broken = true;
        }
        item
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> WsRead<S> {
    async fn next_item(&mut self) -> Result<Item, Fault> {
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
    let budget = gw.admission.listener_budget();
    while let Some((sock, peer)) = next_tcp(&gw, &listener, "websocket").await {
        let Some(permit) = gw.admission.admit(&budget, peer, "websocket") else {
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
    handshake: Handshake,
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
    let r = WsRead {
        ws: r,
        raw,
        broken: false,
    };
    session::serve(gw, handshake, info, r, WsWrite(w)).await;
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
    bucket: Bucket,
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
        let twice = 2.0 * bytes_per_sec as f64;
        let metered = Metered {
            io: io.clone(),
            limit: bytes_per_sec,
            bucket: Bucket::new(twice, twice),
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
        if !self.bucket.charge(n) {
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

/// What a WebSocket client turned away at accept gets, if the socket takes it at once.
const BUSY_HTTP: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
