//! TLS and mutual TLS on links (cargo feature `tls`, rustls with the *ring* provider, TLS 1.3
//! only: both ends are clustergo, so there is no older peer to speak to).
//!
//! # The identity rule
//!
//! A node's certificate names its logical address as a DNS subject alternative name, most
//! specific label first, under the reserved suffix `clustergo`:
//!
//! | address `cluster.type.server` | name in the certificate |
//! |---|---|
//! | `1.2.7` | `7.2.1.clustergo` |
//! | `3.255.1` (a harbor) | `1.255.3.clustergo` |
//! | every server of type 2 in cluster 1 | `*.2.1.clustergo` (a wildcard) |
//!
//! ([`LinkTls::name_of`] writes the name.) A DNS name rather than a URI SAN, because the
//! standard path-validation code (webpki) checks DNS names, wildcards included, so no
//! certificate parser of our own sits on the trust boundary; and because most specific first
//! lets one wildcard certificate serve every replica of a server type whose server numbers are
//! handed out at run time.
//!
//! - **Dialing**, a node checks that the acceptor's certificate chains to the CA and carries
//!   the name of the address it dialed; a node at that network address without such a
//!   certificate gets nothing (not even the hello).
//! - **Accepting** with [`LinkTls::mutual`] (the default), a node requires a client
//!   certificate from the CA and refuses the link unless that certificate carries the name of
//!   the address the dialer claims (`cg-from`). So a node holding one certificate cannot claim
//!   another address, whatever secret it knows.
//! - Without `mutual`, the acceptor asks for no certificate: links are encrypted and the
//!   acceptor is authenticated, the dialer only by the cluster secret.
//!
//! A node's certificate serves as server and as client certificate: if it has an extended key
//! usage extension, it must list both `serverAuth` and `clientAuth`.
//!
//! The secret handshake of `link::auth` runs inside TLS as well. Every node of a mesh must use
//! the same mode: a TLS node and a plain one cannot link (the dial fails with a TLS or HTTP/2
//! error naming the peer).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;

use crate::addr::LogicAddr;

/// What is wrong with a TLS configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read the TLS {what} {path}: {source}")]
    Read {
        /// `CA`, `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// PEM text that holds no usable item of the kind wanted.
    #[error("the TLS {what} is not usable PEM: {reason}")]
    Pem {
        /// `CA`, `certificate` or `key`.
        what: &'static str,
        /// The cause.
        reason: String,
    },
    /// rustls refused the combination (e.g. a key that does not match the certificate).
    #[error("the TLS configuration is refused: {0}")]
    Rejected(String),
}

/// TLS settings of a node's links: the CA every node's certificate chains to, this node's
/// certificate chain and private key, and whether dialers must present certificates (mutual
/// TLS, the default). See the module docs for the identity rule. Set it with
/// [`NodeConfig::tls`](crate::NodeConfig::tls).
#[derive(Clone)]
pub struct LinkTls {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    leaf: CertificateDer<'static>,
    mutual: bool,
}

impl std::fmt::Debug for LinkTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkTls")
            .field("mutual", &self.mutual)
            .finish_non_exhaustive()
    }
}

fn certs(what: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

impl LinkTls {
    /// From PEM text: the CA certificate(s), this node's certificate chain (leaf first) and
    /// its private key (PKCS#8, PKCS#1 or SEC1). With `mutual`, dialers must present a
    /// certificate that names the address they claim.
    pub fn from_pem(
        ca: &[u8],
        cert_chain: &[u8],
        key: &[u8],
        mutual: bool,
    ) -> Result<LinkTls, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in certs("CA", ca)? {
            roots
                .add(ca)
                .map_err(|e| TlsError::Rejected(format!("CA certificate: {e}")))?;
        }
        let roots = Arc::new(roots);
        let chain = certs("certificate", cert_chain)?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::Pem {
            what: "key",
            reason: e.to_string(),
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let rejected = |e: rustls::Error| TlsError::Rejected(e.to_string());
        let verifier = if mutual {
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.clone(),
                provider.clone(),
            )
            .build()
            .map_err(|e| TlsError::Rejected(e.to_string()))?
        } else {
            rustls::server::WebPkiClientVerifier::no_client_auth()
        };
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(rejected)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(rejected)?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(rejected)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain.clone(), key)
            .map_err(rejected)?;
        client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(LinkTls {
            client: Arc::new(client),
            server: Arc::new(server),
            leaf: chain[0].clone(),
            mutual,
        })
    }

    /// From PEM files; see [`LinkTls::from_pem`].
    pub fn from_files(
        ca: impl AsRef<Path>,
        cert_chain: impl AsRef<Path>,
        key: impl AsRef<Path>,
        mutual: bool,
    ) -> Result<LinkTls, TlsError> {
        LinkTls::from_pem(
            &read("CA", ca.as_ref())?,
            &read("certificate", cert_chain.as_ref())?,
            &read("key", key.as_ref())?,
            mutual,
        )
    }

    /// Whether dialers must present a certificate naming their address.
    pub fn is_mutual(&self) -> bool {
        self.mutual
    }

    /// The DNS name a certificate must carry to act as `addr`: `server.type.cluster.clustergo`.
    pub fn name_of(addr: LogicAddr) -> String {
        format!(
            "{}.{}.{}.clustergo",
            addr.server(),
            addr.node_type(),
            addr.cluster()
        )
    }

    fn server_name(addr: LogicAddr) -> ServerName<'static> {
        // Digits, dots and a fixed suffix always form a valid DNS name.
        ServerName::try_from(LinkTls::name_of(addr)).unwrap_or_else(|_| {
            ServerName::try_from("invalid.clustergo").expect("a literal DNS name")
        })
    }

    /// Whether the certificate `cert` may act as `addr` (its chain was checked by rustls).
    pub(crate) fn check_name(cert: &CertificateDer<'_>, addr: LogicAddr) -> Result<(), String> {
        let parsed = rustls::server::ParsedCertificate::try_from(cert)
            .map_err(|e| format!("unreadable certificate: {e}"))?;
        rustls::client::verify_server_name(&parsed, &LinkTls::server_name(addr)).map_err(|_| {
            format!(
                "the certificate does not name {addr} (it must carry the DNS name {})",
                LinkTls::name_of(addr)
            )
        })
    }

    /// Checked at start: this node's own certificate must name its address.
    pub(crate) fn check_own(&self, addr: LogicAddr) -> Result<(), String> {
        LinkTls::check_name(&self.leaf, addr).map_err(|e| format!("TLS: this node's {e}"))
    }

    /// The client side of a link to `to`, over `tcp`.
    pub(crate) async fn connect(
        &self,
        tcp: TcpStream,
        to: LogicAddr,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        tokio_rustls::TlsConnector::from(self.client.clone())
            .connect(LinkTls::server_name(to), tcp)
            .await
    }

    /// The server side of accepted connections.
    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.server.clone())
    }
}

/// The `[mesh_tls]` section of a binary's TOML configuration (the harbor's, the gateway's, a
/// game server's own): PEM files of the CA, this node's certificate chain and its key, and
/// whether dialers must present certificates (default `true`).
///
/// ```toml
/// [mesh_tls]
/// ca = "/etc/clustergo/ca.crt"
/// cert = "/etc/clustergo/node.crt"   # names this node's address, e.g. 1.255.1.clustergo
/// key = "/etc/clustergo/node.key"
/// mutual = true
/// ```
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkTlsFiles {
    /// The CA certificate(s) every node's certificate chains to.
    pub ca: std::path::PathBuf,
    /// This node's certificate chain, leaf first.
    pub cert: std::path::PathBuf,
    /// This node's private key.
    pub key: std::path::PathBuf,
    /// Whether dialers must present a certificate that names their address. Default `true`.
    #[serde(default = "yes")]
    pub mutual: bool,
}

fn yes() -> bool {
    true
}

impl LinkTlsFiles {
    /// Reads the files; see [`LinkTls::from_files`].
    pub fn load(&self) -> Result<LinkTls, TlsError> {
        LinkTls::from_files(&self.ca, &self.cert, &self.key, self.mutual)
    }
}

/// Dials links over TLS: a tonic connector (a `tower::Service<Uri>`) that connects to one
/// network address and runs the client handshake for one logical address.
#[derive(Debug, Clone)]
pub(crate) struct Connector {
    pub(crate) tls: LinkTls,
    pub(crate) net_addr: String,
    pub(crate) to: LogicAddr,
}

type Io = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower_service::Service<tonic::codegen::http::Uri> for Connector {
    type Response = Io;
    type Error = std::io::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Io>> + Send + 'static>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(&this.net_addr).await?;
            // Small batches must not wait for Nagle.
            tcp.set_nodelay(true)?;
            let tls =
                this.tls.connect(tcp, this.to).await.map_err(|e| {
                    std::io::Error::new(e.kind(), format!("TLS with {}: {e}", this.to))
                })?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}
