//! The client itself: connecting over each transport, frames both ways, heartbeats.

use crate::{kcp, wire};

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_rustls::rustls;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{
    CloseFrame, WebSocketConfig, frame::coding::CloseCode,
};
use tokio_tungstenite::tungstenite::{self, Message};

use wire::Inbound;

/// Why a connection could not be made or could not go on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The address is not one of the supported forms.
    #[error("bad gateway address {url:?}: {reason}")]
    Url {
        /// The address given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Connecting (TCP, TLS, WebSocket upgrade or the first KCP exchange) failed.
    #[error("cannot connect to {url}: {reason}")]
    Connect {
        /// The address given.
        url: String,
        /// The cause.
        reason: String,
    },
    /// Connecting took longer than [`ClientConfig::connect_timeout`].
    #[error("connecting to {url} timed out after {after:?}")]
    ConnectTimeout {
        /// The address given.
        url: String,
        /// The timeout.
        after: Duration,
    },
    /// The TLS settings cannot be used (no roots, unreadable CA file, bad server name).
    #[error("TLS: {0}")]
    Tls(String),
    /// The gateway closed the connection; `reason` is what it said (a close frame or WebSocket
    /// close message), or a description when it said nothing.
    #[error("closed by the gateway: {reason}")]
    Closed {
        /// The gateway's reason.
        reason: String,
        /// The WebSocket close code, on WebSocket connections ([`wire::close_code`]).
        code: Option<u16>,
    },
    /// Nothing arrived for [`ClientConfig::idle_timeout`].
    #[error("nothing received for {0:?}")]
    Idle(Duration),
    /// A frame over the limit: offered to [`Client::send`], or announced by the gateway.
    #[error("frame of {size} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// Its size.
        size: usize,
        /// [`ClientConfig::max_frame`].
        limit: usize,
    },
    /// The gateway sent something the wire format does not allow.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The connection failed.
    #[error("connection failed: {0}")]
    Io(#[from] io::Error),
}

/// Connection settings; [`ClientConfig::default`] suits most games.
#[derive(Clone)]
pub struct ClientConfig {
    connect_timeout: Duration,
    idle_timeout: Option<Duration>,
    heartbeat: Option<Duration>,
    pub(crate) max_frame: usize,
    roots: Vec<CertificateDer<'static>>,
    server_name: Option<String>,
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("connect_timeout", &self.connect_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("heartbeat", &self.heartbeat)
            .field("max_frame", &self.max_frame)
            .field("roots", &self.roots.len())
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl Default for ClientConfig {
    /// Connect timeout 5 s, heartbeat every 10 s of silence, idle after 30 s, frames up to
    /// 64 KiB, no TLS roots.
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Some(Duration::from_secs(30)),
            heartbeat: Some(Duration::from_secs(10)),
            max_frame: 64 << 10,
            roots: Vec::new(),
            server_name: None,
        }
    }
}

impl ClientConfig {
    /// Bound on connecting, TLS and WebSocket handshakes included.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Fail [`Client::recv`] when nothing arrived for this long (`None`: never).
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Send a heartbeat after this long without sending (`None`: never). Keep it well under the
    /// gateway's idle timeout.
    pub fn heartbeat(mut self, interval: Option<Duration>) -> Self {
        self.heartbeat = interval;
        self
    }

    /// Largest frame sent or accepted (clamped to [`wire::MAX_FRAME_LIMIT`]).
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.max_frame = bytes.min(wire::MAX_FRAME_LIMIT);
        self
    }

    /// Trusts the certificates in a PEM file as TLS roots (for `tls://` and `wss://`).
    pub fn add_root_pem_file(mut self, path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| ClientError::Tls(format!("CA file {}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(ClientError::Tls(format!(
                "CA file {} holds no certificate",
                path.display()
            )));
        }
        self.roots.extend(certs);
        Ok(self)
    }

    /// Trusts `cert` as a TLS root.
    pub fn add_root(mut self, cert: CertificateDer<'static>) -> Self {
        self.roots.push(cert);
        self
    }

    /// The name checked against the gateway's certificate, instead of the address's host.
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }
}

/// The transport of a [`Client`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `tcp://`
    Tcp,
    /// `tls://`
    Tls,
    /// `ws://`
    Ws,
    /// `wss://`
    Wss,
    /// `kcp://`
    Kcp,
}

impl Transport {
    /// The address scheme.
    pub fn scheme(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Ws => "ws",
            Transport::Wss => "wss",
            Transport::Kcp => "kcp",
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
type BoxIo = Box<dyn Io>;

/// A connection to the gateway.
pub struct Client {
    conn: Conn,
    transport: Transport,
    config: ClientConfig,
    last_sent: Instant,
    last_heard: Instant,
    last_heartbeat: Instant,
    /// Where WebSocket messages of `send_tagged` are built: its memory is used again once
    /// the message before was written (no allocation per message).
    scratch: BytesMut,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

enum Conn {
    /// Length-prefixed frames (TCP, TLS, KCP). Reads and writes make progress together, so a
    /// heartbeat queued inside `recv` never blocks reading. (On WebSocket a heartbeat is
    /// written before reading goes on; it is one small message.)
    Framed {
        rd: ReadHalf<BoxIo>,
        wr: WriteHalf<BoxIo>,
        rbuf: BytesMut,
        wbuf: BytesMut,
    },
    Ws(Box<WebSocketStream<BoxIo>>),
}

struct Target {
    transport: Transport,
    host: String,
    port: u16,
    path: String,
}

fn parse(url: &str) -> Result<Target, ClientError> {
    let bad = |reason: &str| ClientError::Url {
        url: url.into(),
        reason: reason.into(),
    };
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
    let transport = match scheme {
        "tcp" => Transport::Tcp,
        "tls" => Transport::Tls,
        "ws" => Transport::Ws,
        "wss" => Transport::Wss,
        "kcp" => Transport::Kcp,
        _ => return Err(bad("the scheme must be tcp, tls, ws, wss or kcp")),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if path != "/" && !matches!(transport, Transport::Ws | Transport::Wss) {
        return Err(bad("only ws:// and wss:// addresses have a path"));
    }
    let (host, port) = authority.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let port = port.parse().map_err(|_| bad("the port is not a number"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok(Target {
        transport,
        host: host.into(),
        port,
        path: path.into(),
    })
}

impl Client {
    /// Connects with [`ClientConfig::default`].
    pub async fn connect(url: &str) -> Result<Client, ClientError> {
        Client::connect_with(url, ClientConfig::default()).await
    }

    /// Connects with `config`. The whole connect (resolution, TCP or KCP, TLS, WebSocket
    /// upgrade; on KCP a heartbeat exchange, since UDP has no handshake) is bounded by
    /// [`ClientConfig::connect_timeout`].
    pub async fn connect_with(url: &str, config: ClientConfig) -> Result<Client, ClientError> {
        let target = parse(url)?;
        let deadline = Instant::now() + config.connect_timeout;
        let fail = |reason: String| ClientError::Connect {
            url: url.into(),
            reason,
        };
        let connecting = async {
            let addr = tokio::net::lookup_host((target.host.as_str(), target.port))
                .await
                .map_err(|e| fail(format!("cannot resolve {}: {e}", target.host)))?
                .next()
                .ok_or_else(|| fail(format!("{} has no address", target.host)))?;
            let io = open(&target, addr, &config).await.map_err(|e| match e {
                ClientError::Io(e) => fail(e.to_string()),
                other => other,
            })?;
            let conn = match target.transport {
                Transport::Ws | Transport::Wss => {
                    let host = if target.host.contains(':') {
                        format!("[{}]", target.host)
                    } else {
                        target.host.clone()
                    };
                    let request = format!(
                        "{}://{host}:{}{}",
                        target.transport.scheme(),
                        target.port,
                        target.path
                    );
                    let (ws, _) = tokio_tungstenite::client_async_with_config(
                        request,
                        io,
                        Some(ws_config(config.max_frame)),
                    )
                    .await
                    .map_err(|e| fail(format!("WebSocket upgrade failed: {e}")))?;
                    Conn::Ws(Box::new(ws))
                }
                _ => {
                    let (rd, wr) = tokio::io::split(io);
                    Conn::Framed {
                        rd,
                        wr,
                        rbuf: BytesMut::new(),
                        wbuf: BytesMut::new(),
                    }
                }
            };
            let now = Instant::now();
            let client = Client {
                conn,
                transport: target.transport,
                config: config.clone(),
                last_sent: now,
                last_heard: now,
                last_heartbeat: now,
                scratch: BytesMut::new(),
            };
            Ok(client)
        };
        timeout_at(deadline, connecting)
            .await
            .map_err(|_| ClientError::ConnectTimeout {
                url: url.into(),
                after: config.connect_timeout,
            })?
    }

    /// The transport in use.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// Sends one frame and flushes it. An empty frame is a heartbeat.
    pub async fn send(&mut self, frame: impl Into<Bytes>) -> Result<(), ClientError> {
        let frame = frame.into();
        if frame.len() > self.config.max_frame {
            return Err(ClientError::TooLarge {
                size: frame.len(),
                limit: self.config.max_frame,
            });
        }
        self.last_sent = Instant::now();
        match &mut self.conn {
            Conn::Framed { wr, wbuf, .. } => {
                wire::put_frame(wbuf, &frame);
                flush_framed(wr, wbuf).await?;
            }
            Conn::Ws(ws) => ws.send(Message::Binary(frame)).await.map_err(ws_error)?,
        }
        Ok(())
    }

    /// Queues one frame, unflushed: the next send carries it.
    pub(crate) async fn buffer(&mut self, frame: Bytes) -> Result<(), ClientError> {
        match &mut self.conn {
            Conn::Framed { wbuf, .. } => wire::put_frame(wbuf, &frame),
            Conn::Ws(ws) => ws.feed(Message::Binary(frame)).await.map_err(ws_error)?,
        }
        Ok(())
    }

    /// Sends one frame of `tag` then `payload`: on TCP, TLS and KCP written straight into the
    /// write buffer (no frame of its own is built); on WebSocket, one message.
    pub(crate) async fn send_tagged(&mut self, tag: u8, payload: &[u8]) -> Result<(), ClientError> {
        let len = 1 + payload.len();
        if len > self.config.max_frame {
            return Err(ClientError::TooLarge {
                size: len,
                limit: self.config.max_frame,
            });
        }
        self.last_sent = Instant::now();
        match &mut self.conn {
            Conn::Framed { wr, wbuf, .. } => {
                wbuf.reserve(4 + len);
                wbuf.put_u32(len as u32);
                wbuf.put_u8(tag);
                wbuf.put_slice(payload);
                flush_framed(wr, wbuf).await?;
            }
            Conn::Ws(ws) => {
                let m = &mut self.scratch;
                m.reserve(len);
                m.put_u8(tag);
                m.put_slice(payload);
                ws.send(Message::Binary(m.split().freeze()))
                    .await
                    .map_err(ws_error)?
            }
        }
        Ok(())
    }

    /// Sends a heartbeat now.
    pub async fn heartbeat(&mut self) -> Result<(), ClientError> {
        self.last_heartbeat = Instant::now();
        self.send(Bytes::new()).await
    }

    /// The next data frame. Heartbeat answers are consumed here; a close from the gateway is
    /// [`ClientError::Closed`] with its reason.
    ///
    /// Cancel-safe: dropping the future (e.g. in `tokio::select!`) loses no frame.
    pub async fn recv(&mut self) -> Result<Bytes, ClientError> {
        loop {
            if let Some(item) = self.next_item().await? {
                self.last_heard = Instant::now();
                match item {
                    Inbound::Data(frame) => return Ok(frame),
                    Inbound::Heartbeat => continue,
                    Inbound::Close(reason) => {
                        return Err(ClientError::Closed { reason, code: None });
                    }
                }
            }
        }
    }

    /// One step of receiving: an item, or `None` after housekeeping (a heartbeat sent, bytes
    /// written).
    async fn next_item(&mut self) -> Result<Option<Inbound>, ClientError> {
        // A heartbeat is due after `heartbeat` without sending, and also after `heartbeat`
        // without hearing anything (since the last heartbeat): a client that keeps sending to
        // a quiet server still gets answers, so it does not mistake silence for a dead link.
        let heartbeat_at = self
            .config
            .heartbeat
            .map(|h| (self.last_sent + h).min(self.last_heard.max(self.last_heartbeat) + h));
        let idle_at = self.config.idle_timeout.map(|i| self.last_heard + i);
        let limit = self.config.max_frame;
        let due = async move {
            match heartbeat_at {
                Some(t) => sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let idle = async move {
            match idle_at {
                Some(t) => sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        match &mut self.conn {
            Conn::Framed { rd, wr, rbuf, wbuf } => {
                if let Some(item) = wire::decode(rbuf, limit).map_err(wire_error)? {
                    return Ok(Some(item));
                }
                // Writing and a due heartbeat first (a client that always finds data waiting
                // must still send its heartbeats), then reading, and the idle check last: data
                // already waiting wins over it.
                tokio::select! {
                    biased;
                    n = wr.write(wbuf), if !wbuf.is_empty() => {
                        bytes::Buf::advance(wbuf, n?);
                        if wbuf.is_empty() {
                            wr.flush().await?;
                        }
                    }
                    () = due => {
                        wire::put_frame(wbuf, &[]);
                        self.last_sent = Instant::now();
                        self.last_heartbeat = self.last_sent;
                    }
                    n = rd.read_buf(rbuf) => {
                        if n? == 0 {
                            return Err(ClientError::Closed {
                                reason: "connection closed without a reason".into(),
                                code: None,
                            });
                        }
                    }
                    () = idle => return Err(ClientError::Idle(self.config.idle_timeout.unwrap_or_default())),
                }
                Ok(None)
            }
            Conn::Ws(ws) => {
                tokio::select! {
                    biased;
                    () = due => {
                        self.last_sent = Instant::now();
                        self.last_heartbeat = self.last_sent;
                        ws.send(Message::Binary(Bytes::new())).await.map_err(ws_error)?;
                        Ok(None)
                    }
                    msg = ws.next() => match msg {
                        None => Err(ClientError::Closed {
                            reason: "connection closed without a reason".into(),
                            code: None,
                        }),
                        Some(Err(e)) => Err(ws_error(e)),
                        Some(Ok(Message::Binary(b))) if b.is_empty() => Ok(Some(Inbound::Heartbeat)),
                        Some(Ok(Message::Binary(b))) => Ok(Some(Inbound::Data(b))),
                        Some(Ok(Message::Close(frame))) => Err(match frame {
                            Some(f) => ClientError::Closed {
                                reason: f.reason.to_string(),
                                code: Some(f.code.into()),
                            },
                            None => ClientError::Closed {
                                reason: "closed without a reason".into(),
                                code: None,
                            },
                        }),
                        Some(Ok(Message::Text(_))) => {
                            Err(ClientError::Protocol("text message from the gateway".into()))
                        }
                        Some(Ok(_)) => Ok(None),
                    },
                    () = idle => Err(ClientError::Idle(self.config.idle_timeout.unwrap_or_default())),
                }
            }
        }
    }

    /// Tells the gateway why the client leaves (a close frame, or a WebSocket close), waits
    /// (up to a second) for its answer — on KCP the only sign the close arrived — and closes
    /// the connection. Frames still arriving meanwhile are dropped.
    pub async fn close(mut self, reason: &str) -> Result<(), ClientError> {
        match &mut self.conn {
            Conn::Framed { rd, wr, rbuf, wbuf } => {
                wire::put_close(wbuf, reason);
                flush_framed(wr, wbuf).await?;
                let limit = self.config.max_frame;
                let answered = async {
                    loop {
                        match wire::decode(rbuf, limit) {
                            Ok(Some(Inbound::Close(_))) | Err(_) => return,
                            Ok(Some(_)) => continue,
                            Ok(None) => {}
                        }
                        if !matches!(rd.read_buf(rbuf).await, Ok(n) if n > 0) {
                            return;
                        }
                    }
                };
                let _ = tokio::time::timeout(CLOSE_WAIT, answered).await;
                let _ = wr.shutdown().await;
            }
            Conn::Ws(ws) => {
                let frame = CloseFrame {
                    code: CloseCode::Normal,
                    reason: wire::clip(reason, wire::MAX_WS_REASON).into(),
                };
                match WebSocketStream::close(ws, Some(frame)).await {
                    Ok(()) | Err(tungstenite::Error::ConnectionClosed) => {}
                    Err(e) => return Err(ws_error(e)),
                }
                // The gateway's answering close ends the stream.
                let answered = async { while let Some(Ok(_)) = ws.next().await {} };
                let _ = tokio::time::timeout(CLOSE_WAIT, answered).await;
            }
        }
        Ok(())
    }
}

/// How long [`Client::close`] waits for the gateway's answer.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

async fn flush_framed(wr: &mut WriteHalf<BoxIo>, wbuf: &mut BytesMut) -> io::Result<()> {
    while !wbuf.is_empty() {
        let n = wr.write(wbuf).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        bytes::Buf::advance(wbuf, n);
    }
    wr.flush().await
}

/// The byte stream under the frames: TCP, TCP+TLS or KCP.
async fn open(
    target: &Target,
    addr: SocketAddr,
    config: &ClientConfig,
) -> Result<BoxIo, ClientError> {
    match target.transport {
        Transport::Kcp => {
            let (stream, _conv) =
                kcp::connect(addr, config.connect_timeout)
                    .await
                    .map_err(|e| match e {
                        kcp::ConnectError::Refused { code, reason } => ClientError::Closed {
                            reason,
                            code: Some(code),
                        },
                        other => ClientError::Io(io::Error::other(other.to_string())),
                    })?;
            Ok(Box::new(stream))
        }
        Transport::Tcp | Transport::Ws => {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            Ok(Box::new(tcp))
        }
        Transport::Tls | Transport::Wss => {
            let connector = tls_connector(config)?;
            let name = config.server_name.as_deref().unwrap_or(&target.host);
            let name = ServerName::try_from(name.to_owned())
                .map_err(|e| ClientError::Tls(format!("server name {name:?}: {e}")))?;
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| ClientError::Tls(format!("handshake with {addr}: {e}")))?;
            Ok(Box::new(tls))
        }
    }
}

fn tls_connector(config: &ClientConfig) -> Result<tokio_rustls::TlsConnector, ClientError> {
    if config.roots.is_empty() {
        return Err(ClientError::Tls(
            "no trusted roots: add the gateway's CA with ClientConfig::add_root_pem_file".into(),
        ));
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in &config.roots {
        roots
            .add(cert.clone())
            .map_err(|e| ClientError::Tls(format!("root certificate: {e}")))?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ClientError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(tls)))
}

/// WebSocket settings for frames up to `max_frame`: small buffers (a client holds one
/// connection, a gateway thousands) and messages written at once.
pub fn ws_config(max_frame: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame))
}

fn ws_error(e: tungstenite::Error) -> ClientError {
    match e {
        tungstenite::Error::Io(e) => ClientError::Io(e),
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            ClientError::Closed {
                reason: "connection closed".into(),
                code: None,
            }
        }
        tungstenite::Error::Capacity(e) => ClientError::Protocol(format!("over a limit: {e}")),
        other => ClientError::Protocol(other.to_string()),
    }
}

fn wire_error(e: wire::WireError) -> ClientError {
    match e {
        wire::WireError::TooLarge { size, limit } => ClientError::TooLarge { size, limit },
        other => ClientError::Protocol(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_or_name_the_problem() {
        let t = parse("ws://127.0.0.1:80/game").unwrap();
        assert_eq!(
            (t.transport, t.host.as_str(), t.port, t.path.as_str()),
            (Transport::Ws, "127.0.0.1", 80, "/game")
        );
        let t = parse("kcp://[::1]:9").unwrap();
        assert_eq!((t.transport, t.host.as_str()), (Transport::Kcp, "::1"));
        for (url, why) in [
            ("127.0.0.1:1", "no scheme"),
            ("udp://h:1", "scheme"),
            ("tcp://h", "no port"),
            ("tcp://h:x", "not a number"),
            ("tcp://h:1/p", "path"),
            ("tcp://:1", "no host"),
        ] {
            let e = parse(url).err().unwrap().to_string();
            assert!(e.contains(why) && e.contains(url), "{url}: {e}");
        }
    }
}
