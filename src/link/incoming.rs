//! The node's own accept path: what a connection may cost before it has proved anything.
//!
//! A connection is *pending* from accept until a link on it is admitted (the handshake of
//! `link::auth` succeeded). Pending connections are capped in all and per source IP address
//! (over a cap, a new connection is closed at once), and each must be admitted within the dial
//! timeout of its accept, whatever it sends meanwhile (nothing, half a TLS handshake, an HTTP/2
//! preface and no call): then it is closed. So silent or slow connections cannot pile up, and
//! a flood from one address leaves room for everyone else. When the process runs out of
//! descriptors (EMFILE/ENFILE), accepting backs off instead of spinning.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_stream::Stream;
use tonic::transport::server::Connected;

use crate::gate::LogGate;
use crate::hash::FastMap;
use crate::stats::Stats;

static REFUSED: LogGate = LogGate::new();
static TIMED_OUT: LogGate = LogGate::new();
static ACCEPT_FAILED: LogGate = LogGate::new();

/// Counts of pending connections, and their caps.
#[derive(Debug)]
pub(crate) struct Admission {
    max_total: usize,
    max_per_source: usize,
    deadline: Duration,
    counts: Mutex<Counts>,
    stats: Arc<Stats>,
    /// Server side of TLS on links, if configured: the handshake runs inside the connection,
    /// under its deadline, driven by the server's first read or write.
    #[cfg(feature = "tls")]
    tls: Option<crate::link::tls::LinkTls>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_source: FastMap<IpAddr, usize>,
}

impl Admission {
    pub(crate) fn new(
        max_total: usize,
        max_per_source: usize,
        deadline: Duration,
        stats: Arc<Stats>,
        #[cfg(feature = "tls")] tls: Option<crate::link::tls::LinkTls>,
    ) -> Arc<Self> {
        Arc::new(Admission {
            max_total,
            max_per_source,
            deadline,
            counts: Mutex::default(),
            stats,
            #[cfg(feature = "tls")]
            tls,
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a new connection from `source`, or `None` over a cap.
    fn take(self: &Arc<Self>, source: IpAddr) -> Option<Slot> {
        let source = crate::source_key(source);
        let mut c = self.counts();
        let from_source = c.by_source.get(&source).copied().unwrap_or(0);
        if c.total >= self.max_total || from_source >= self.max_per_source {
            return None;
        }
        c.total += 1;
        c.by_source.insert(source, from_source + 1);
        Some(Slot {
            admission: self.clone(),
            source,
        })
    }
}

/// One pending connection's place in the counts; given back when it is admitted or closed.
#[derive(Debug)]
struct Slot {
    admission: Arc<Admission>,
    source: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.admission.counts();
        c.total -= 1;
        if let Some(n) = c.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                c.by_source.remove(&self.source);
            }
        }
    }
}

/// What the gRPC handler sees of the connection a call came on (a request extension).
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    pub(crate) remote: SocketAddr,
    slot: Arc<Mutex<Option<Slot>>>,
    /// The client certificate the TLS handshake verified (mutual TLS), set when the handshake
    /// completes: always before the first call on the connection is read.
    #[cfg(feature = "tls")]
    pub(crate) peer_cert:
        Arc<std::sync::OnceLock<tokio_rustls::rustls::pki_types::CertificateDer<'static>>>,
}

impl ConnInfo {
    /// A link on this connection was admitted: it is no longer pending, and stays open.
    pub(crate) fn admitted(&self) {
        self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Whether a link on this connection was admitted.
    pub(crate) fn is_admitted(&self) -> bool {
        self.slot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }
}

/// An accepted connection, closed at its deadline unless a link on it was admitted.
#[derive(Debug)]
pub(crate) struct Conn {
    io: Io,
    info: ConnInfo,
    /// Until admission; dropped after.
    deadline: Option<Pin<Box<Sleep>>>,
    stats: Arc<Stats>,
}

/// A connection's transport: plain TCP, or TLS (handshaking, then established).
enum Io {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Handshake(Box<tokio_rustls::Accept<TcpStream>>),
    #[cfg(feature = "tls")]
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// The TLS handshake failed: the connection is dead (its future must not be polled again).
    #[cfg(feature = "tls")]
    Failed,
}

impl std::fmt::Debug for Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Io::Plain(_) => "Plain",
            #[cfg(feature = "tls")]
            Io::Handshake(_) => "Handshake",
            #[cfg(feature = "tls")]
            Io::Tls(_) => "Tls",
            #[cfg(feature = "tls")]
            Io::Failed => "Failed",
        })
    }
}

/// Poll `$io` (the established transport) with `$call`, or drive the TLS handshake first.
macro_rules! with_io {
    ($self:ident, $cx:ident, |$io:ident| $call:expr) => {
        loop {
            match &mut $self.io {
                Io::Plain($io) => break $call,
                #[cfg(feature = "tls")]
                Io::Tls($io) => break $call,
                #[cfg(feature = "tls")]
                Io::Failed => break Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
                #[cfg(feature = "tls")]
                Io::Handshake(accept) => {
                    let tls = match std::task::ready!(Pin::new(&mut **accept).poll($cx)) {
                        Ok(tls) => tls,
                        Err(e) => {
                            $self.io = Io::Failed;
                            break Poll::Ready(Err(e));
                        }
                    };
                    if let Some(cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first())
                    {
                        let _ = $self.info.peer_cert.set(cert.clone().into_owned());
                    }
                    $self.io = Io::Tls(Box::new(tls));
                }
            }
        }
    };
}

impl Conn {
    fn check(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        let Some(deadline) = &mut self.deadline else {
            return Ok(());
        };
        if self
            .info
            .slot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
        {
            self.deadline = None;
            return Ok(());
        }
        if deadline.as_mut().poll(cx).is_ready() {
            Stats::incr(&self.stats.connections_timed_out);
            if let Some(held) = TIMED_OUT.pass() {
                tracing::info!(remote = %self.info.remote, held_back = held, "closed a connection that was not admitted as a link in time");
            }
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no link admitted on this connection in time",
            ));
        }
        Ok(())
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        // The server always has a read outstanding, so the deadline is watched here.
        self.check(cx)?;
        let this = &mut *self;
        with_io!(this, cx, |io| Pin::new(io).poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.check(cx)?;
        let this = &mut *self;
        with_io!(this, cx, |io| Pin::new(io).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.check(cx)?;
        let this = &mut *self;
        with_io!(this, cx, |io| Pin::new(io).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(io) => io.is_write_vectored(),
            #[cfg(feature = "tls")]
            Io::Tls(io) => io.is_write_vectored(),
            // h2 asks once, before the handshake: the TLS stream it becomes writes vectors.
            #[cfg(feature = "tls")]
            Io::Handshake(_) => true,
            #[cfg(feature = "tls")]
            Io::Failed => false,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        with_io!(this, cx, |io| Pin::new(io).poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.io {
            Io::Plain(io) => Pin::new(io).poll_shutdown(cx),
            #[cfg(feature = "tls")]
            Io::Tls(io) => Pin::new(io).poll_shutdown(cx),
            // Nothing was said over TLS yet: just close.
            #[cfg(feature = "tls")]
            Io::Handshake(_) | Io::Failed => Poll::Ready(Ok(())),
        }
    }
}

/// Bytes a call may carry before its connection has an admitted link: the dialer's first
/// message is its proof (a few dozen bytes), and it sends nothing else until admitted.
pub(crate) const PRE_PROOF_BYTES: usize = 4 << 10;

/// A tower layer for the node's gRPC server: on a connection with no admitted link, a request
/// body may carry at most [`PRE_PROOF_BYTES`]; past that, reading it fails with
/// `RESOURCE_EXHAUSTED`. Without it, the first message would be buffered up to the largest
/// batch a member may send (over 1 MiB) before the proof inside it is checked: a megabyte per
/// pending connection for anyone who can connect.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PreProofLimit;

impl<S> tower_layer::Layer<S> for PreProofLimit {
    type Service = PreProofService<S>;

    fn layer(&self, inner: S) -> PreProofService<S> {
        PreProofService { inner }
    }
}

/// The service [`PreProofLimit`] makes.
#[derive(Debug, Clone)]
pub(crate) struct PreProofService<S> {
    inner: S,
}

type HttpRequest = tonic::codegen::http::Request<tonic::body::Body>;

impl<S: tower_service::Service<HttpRequest>> tower_service::Service<HttpRequest>
    for PreProofService<S>
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: HttpRequest) -> S::Future {
        let conn = req.extensions().get::<ConnInfo>().cloned();
        let req = match conn {
            Some(conn) if !conn.is_admitted() => req.map(|body| {
                tonic::body::Body::new(PreProofBody {
                    inner: body,
                    conn,
                    read: 0,
                    admitted: false,
                })
            }),
            _ => req,
        };
        self.inner.call(req)
    }
}

/// A request body counted until its connection is admitted.
struct PreProofBody {
    inner: tonic::body::Body,
    conn: ConnInfo,
    read: usize,
    /// Seen admitted: no more counting (the link's whole life runs through this body).
    admitted: bool,
}

impl http_body::Body for PreProofBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if !self.admitted
            && let Some(Ok(f)) = &frame
            && let Some(data) = f.data_ref()
        {
            self.read += data.len();
            if self.read > PRE_PROOF_BYTES {
                // Checked only once past the limit: an admitted link pays one lock, once.
                if !self.conn.is_admitted() {
                    return Poll::Ready(Some(Err(tonic::Status::resource_exhausted(format!(
                        "more than {PRE_PROOF_BYTES} bytes before the link was admitted"
                    )))));
                }
                self.admitted = true;
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Out of descriptors or memory: accepting again at once would fail again at once.
fn exhausted(e: &std::io::Error) -> bool {
    // EMFILE 24, ENFILE 23, ENOBUFS 105, ENOMEM 12 (Linux); elsewhere only the kinds.
    matches!(e.raw_os_error(), Some(23 | 24 | 105 | 12))
        || e.kind() == std::io::ErrorKind::OutOfMemory
}

/// Accepted connections within the caps, for the gRPC server. Never yields an error: a failed
/// accept is logged (gated) and, when descriptors ran out, retried after a backoff.
pub(crate) fn incoming(
    listener: TcpListener,
    admission: Arc<Admission>,
) -> impl Stream<Item = Result<Conn, std::io::Error>> + Send + 'static {
    futures_util::stream::unfold(
        (listener, admission, Duration::ZERO),
        |(listener, admission, mut backoff)| async move {
            loop {
                match listener.accept().await {
                    Ok((io, remote)) => {
                        backoff = Duration::ZERO;
                        let Some(slot) = admission.take(remote.ip()) else {
                            Stats::incr(&admission.stats.connections_refused);
                            if let Some(held) = REFUSED.pass() {
                                tracing::warn!(%remote, held_back = held, "closed a connection at once: too many connections awaiting admission (from that address, or in all)");
                            }
                            drop(io);
                            continue;
                        };
                        // Small batches must not wait for Nagle.
                        let _ = io.set_nodelay(true);
                        #[cfg(feature = "tls")]
                        let io = match &admission.tls {
                            Some(tls) => Io::Handshake(Box::new(tls.acceptor().accept(io))),
                            None => Io::Plain(io),
                        };
                        #[cfg(not(feature = "tls"))]
                        let io = Io::Plain(io);
                        let conn = Conn {
                            io,
                            info: ConnInfo {
                                remote,
                                slot: Arc::new(Mutex::new(Some(slot))),
                                #[cfg(feature = "tls")]
                                peer_cert: Arc::default(),
                            },
                            deadline: Some(Box::pin(tokio::time::sleep_until(
                                Instant::now() + admission.deadline,
                            ))),
                            stats: admission.stats.clone(),
                        };
                        return Some((Ok(conn), (listener, admission, backoff)));
                    }
                    Err(e) if exhausted(&e) => {
                        backoff =
                            (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                        if let Some(held) = ACCEPT_FAILED.pass() {
                            tracing::error!(error = %e, ?backoff, held_back = held, "accept failed: out of descriptors or memory; backing off");
                        }
                        tokio::time::sleep(backoff).await;
                    }
                    // The client left before it was accepted, and the like.
                    Err(e) => {
                        if let Some(held) = ACCEPT_FAILED.pass() {
                            tracing::debug!(error = %e, held_back = held, "accept failed");
                        }
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_source_and_in_all() {
        let a = Admission::new(
            3,
            2,
            Duration::from_secs(1),
            Arc::default(),
            #[cfg(feature = "tls")]
            None,
        );
        let (x, y): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let s1 = a.take(x).unwrap();
        let _s2 = a.take(x).unwrap();
        assert!(a.take(x).is_none(), "per-source cap");
        let _s3 = a.take(y).unwrap();
        assert!(a.take(y).is_none(), "total cap");
        drop(s1);
        assert!(a.take(x).is_some(), "a slot given back is free again");
    }

    #[test]
    fn an_ipv6_64_is_one_source_and_mapped_ipv4_is_ipv4() {
        let a = Admission::new(
            10,
            1,
            Duration::from_secs(1),
            Arc::default(),
            #[cfg(feature = "tls")]
            None,
        );
        let _s = a.take("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(a.take("2001:db8:1:2:ffff::9".parse().unwrap()).is_none());
        assert!(a.take("2001:db8:1:3::1".parse().unwrap()).is_some());
        let _v4 = a.take("10.0.0.1".parse().unwrap()).unwrap();
        assert!(a.take("::ffff:10.0.0.1".parse().unwrap()).is_none());
    }
}
