//! Length-prefixed frames over a byte stream (TCP, TLS, KCP), and the TCP listener (with TLS
//! when configured).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use clustergo_client::wire;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout_at;
use tokio_rustls::{TlsAcceptor, rustls};

use crate::admission::Handshake;
use crate::config::Listen;
use crate::session::{self, ClientInfo, Fault, FrameRead, FrameWrite, Item};
use crate::state::Gateway;
use crate::transport::{BYE, HANDSHAKE_FAILED, info, next_tcp};

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

/// Serves a length-prefixed client (TCP, TLS, KCP).
pub(super) async fn framed<R, W>(
    gw: Arc<Gateway>,
    handshake: Handshake,
    info: ClientInfo,
    r: R,
    w: W,
) where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let (r, w) = (FramedRead::new(r, gw.limits.max_frame), FramedWrite::new(w));
    session::serve(gw, handshake, info, r, w).await;
}

/// Accepts TCP clients (with TLS when configured) until shutdown.
pub(crate) async fn tcp(gw: Arc<Gateway>, listener: TcpListener, tls: Option<TlsAcceptor>) {
    let busy = busy_frame();
    let budget = gw.admission.listener_budget();
    while let Some((sock, peer)) = next_tcp(&gw, &listener, "tcp").await {
        let Some(permit) = gw.admission.admit(&budget, peer, "tcp") else {
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
                    // Boxed: a TLS handshake's state is large and a plain client's task would
                    // otherwise hold room for it.
                    let handshake = tls_handshake(&g, &tls, sock, peer, info.deadline);
                    let Some(stream) = Box::pin(handshake).await else {
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
pub(crate) async fn tls_handshake(
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

/// What a plain TCP client turned away at accept gets: a close frame, written only if the
/// socket takes it at once.
fn busy_frame() -> BytesMut {
    let mut b = BytesMut::new();
    wire::put_close(&mut b, BUSY);
    b
}

const BUSY: &str = "gateway busy: try again later";
