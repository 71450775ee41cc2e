//! TLS and mutual TLS on links, with certificates made at test time: the mesh works over TLS,
//! a certificate binds the address its holder may claim (as dialer and as acceptor), and the
//! accept path's bounds hold under TLS too.

#![cfg(feature = "tls")]

#[path = "support/handshake.rs"]
mod handshake;
mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clustergo::proto::Batch;
use clustergo::proto::mesh_client::MeshClient;
use clustergo::{HandlerError, LinkTls, LogicAddr, Member, RpcError};
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use support::{a, within};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Request;

/// A test CA and the PEM files it signs.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A node's certificate chain and key, PEM.
struct Leaf {
    cert: String,
    key: String,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `names`, usable as server and client certificate.
    fn leaf(&self, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    fn tls(&self, leaf: &Leaf, mutual: bool) -> LinkTls {
        LinkTls::from_pem(
            self.pem.as_bytes(),
            leaf.cert.as_bytes(),
            leaf.key.as_bytes(),
            mutual,
        )
        .unwrap()
    }

    /// TLS for node `addr`, with a certificate that names it.
    fn node(&self, addr: &str) -> LinkTls {
        self.tls(&self.leaf(&[&LinkTls::name_of(a(addr))]), true)
    }
}

fn echo(b: clustergo::NodeBuilder) -> clustergo::NodeBuilder {
    b.rpc(
        "echo",
        |_, p: Bytes| async move { Ok::<_, HandlerError>(p) },
    )
}

#[tokio::test]
async fn nodes_call_each_other_over_mutual_tls_with_exact_and_wildcard_names() {
    support::init_tracing();
    let ca = Ca::new();
    let mut c = support::Cluster::new(&["1.1.1", "1.2.7"]);
    let n1 = {
        let b = c.builder("1.1.1");
        echo(b.config(support::test_config().tls(ca.node("1.1.1")))).build()
    };
    within(n1.start()).await.unwrap();
    // One certificate for every server of type 2 in cluster 1.
    let wildcard = ca.tls(&ca.leaf(&["*.2.1.clustergo"]), true);
    let n2 = echo(
        c.builder("1.2.7")
            .config(support::test_config().tls(wildcard)),
    )
    .build();
    within(n2.start()).await.unwrap();

    let got = within(n1.call(a("1.2.7"), "echo", Bytes::from_static(b"over tls")))
        .await
        .unwrap();
    assert_eq!(&got[..], b"over tls");
    let got = within(n2.call(a("1.1.1"), "echo", Bytes::from_static(b"and back")))
        .await
        .unwrap();
    assert_eq!(&got[..], b"and back");
    n1.shutdown().await;
    n2.shutdown().await;
}

#[tokio::test]
async fn a_node_whose_certificate_names_another_address_does_not_start() {
    let ca = Ca::new();
    let mut c = support::Cluster::new(&["1.1.1"]);
    let n = c
        .builder("1.1.1")
        .config(support::test_config().tls(ca.node("1.1.2")))
        .build();
    let err = within(n.start()).await.unwrap_err().to_string();
    assert!(
        err.contains("does not name 1.1.1") && err.contains("1.1.1.clustergo"),
        "{err}"
    );
    // A wildcard covers one label only: `*.2.1.clustergo` is not type 3, and `*.clustergo`
    // is nobody.
    for (addr, name) in [("1.3.7", "*.2.1.clustergo"), ("1.2.7", "*.clustergo")] {
        let mut c = support::Cluster::new(&[addr]);
        let n = c
            .builder(addr)
            .config(support::test_config().tls(ca.tls(&ca.leaf(&[name]), true)))
            .build();
        let err = within(n.start()).await.unwrap_err().to_string();
        assert!(
            err.contains(&format!("does not name {addr}")),
            "{name}: {err}"
        );
    }
}

/// A tonic connector that dials `net` over TLS with `config`, for an attacker's hand-made link.
#[derive(Clone)]
struct RawTls {
    net: String,
    name: String,
    config: Arc<tokio_rustls::rustls::ClientConfig>,
}

impl tower_service::Service<tonic::codegen::http::Uri> for RawTls {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send + 'static>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = tokio::net::TcpStream::connect(&this.net).await?;
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(this.name).unwrap();
            let tls = tokio_rustls::TlsConnector::from(this.config)
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// A rustls client for the test CA, presenting `leaf` (or no certificate).
fn client_config(ca: &Ca, leaf: Option<&Leaf>) -> Arc<tokio_rustls::rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match leaf {
        Some(l) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(l.cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(l.key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// The link handshake by hand over TLS: `from` claims its address to `to` at `net`, with the
/// cluster secret. Returns the acceptor's verdict on the link.
async fn claim(
    net: &str,
    tls: Arc<tokio_rustls::rustls::ClientConfig>,
    from: LogicAddr,
    to: LogicAddr,
) -> Result<(), tonic::Status> {
    let channel = tonic::transport::Endpoint::from_static("http://mesh")
        .connect_with_connector(RawTls {
            net: net.to_owned(),
            name: LinkTls::name_of(to),
            config: tls,
        })
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e:?}")))?;
    let (tx, rx) = mpsc::channel::<Batch>(8);
    let mut req = Request::new(ReceiverStream::new(rx));
    handshake::write_hello(req.metadata_mut(), from, to);
    let resp = MeshClient::new(channel).link(req).await?;
    let proof = handshake::dial_proof(b"test-secret", from, to, resp.metadata());
    tx.send(Batch {
        proof,
        ..Batch::default()
    })
    .await
    .unwrap();
    let first = resp.into_inner().message().await?;
    assert!(first.is_some_and(|b| b.envelopes.is_empty()));
    Ok(())
}

/// The attack of a secret holder (here, one with a valid certificate for 1.1.3) who claims to
/// be 1.1.2: without mutual TLS the secret is the whole identity and the claim is admitted;
/// with it, the certificate decides.
#[tokio::test]
async fn a_certificate_for_one_address_cannot_claim_another() {
    support::init_tracing();
    let ca = Ca::new();
    let mut c = support::Cluster::new(&["1.1.1", "1.1.2", "1.1.3"]);
    let net = |c: &support::Cluster, s: &str| c.members.get(a(s)).unwrap().net_addr;
    let target = net(&c, "1.1.1");
    let n1 = echo(
        c.builder("1.1.1")
            .config(support::test_config().tls(ca.node("1.1.1"))),
    )
    .build();
    within(n1.start()).await.unwrap();
    let leaf3 = ca.leaf(&[&LinkTls::name_of(a("1.1.3"))]);

    // Control: the holder of 1.1.3's certificate may be 1.1.3.
    within(claim(
        &target,
        client_config(&ca, Some(&leaf3)),
        a("1.1.3"),
        a("1.1.1"),
    ))
    .await
    .unwrap();
    // The attack: the same holder claims 1.1.2.
    let refused = within(claim(
        &target,
        client_config(&ca, Some(&leaf3)),
        a("1.1.2"),
        a("1.1.1"),
    ))
    .await
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("does not name 1.1.2"),
        "{refused:?}"
    );
    // No certificate at all: the TLS handshake itself fails, nothing is admitted.
    let anonymous = within(claim(
        &target,
        client_config(&ca, None),
        a("1.1.2"),
        a("1.1.1"),
    ))
    .await;
    assert!(anonymous.is_err());
    assert_eq!(
        n1.stats().links_opened,
        1,
        "only the honest claim was admitted"
    );
    n1.shutdown().await;

    // TLS without client certificates: the secret is the dialer's whole identity, and the
    // same claim is admitted (what mutual TLS adds).
    let n3 = echo(c.builder("1.1.3").config(
        support::test_config().tls(ca.tls(&ca.leaf(&[&LinkTls::name_of(a("1.1.3"))]), false)),
    ))
    .build();
    within(n3.start()).await.unwrap();
    within(claim(
        &net(&c, "1.1.3"),
        client_config(&ca, Some(&leaf3)),
        a("1.1.2"),
        a("1.1.3"),
    ))
    .await
    .unwrap();
    n3.shutdown().await;
}

/// Something else listens at 1.1.2's network address with a valid certificate, but for 1.1.3:
/// a node dialing 1.1.2 refuses it in the TLS handshake, sends it nothing and says why.
#[tokio::test]
async fn a_dialer_refuses_an_acceptor_whose_certificate_names_another_address() {
    support::init_tracing();
    let ca = Ca::new();
    let mut c = support::Cluster::new(&["1.1.1", "1.1.3"]);
    // 1.1.3, honest but misplaced: membership says 1.1.2 lives at its address.
    let (l, imposter_net) = support::bind();
    c.members.upsert(Member::new(a("1.1.2"), imposter_net));
    let n1 = echo(
        c.builder("1.1.1")
            .config(support::test_config().tls(ca.node("1.1.1"))),
    )
    .build();
    within(n1.start()).await.unwrap();
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = served.clone();
    let n3 = clustergo::Node::builder(a("1.1.3"))
        .discovery(c.members.clone())
        .config(support::test_config().tls(ca.node("1.1.3")))
        .listener(l)
        .rpc("echo", move |_, p: Bytes| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { Ok::<_, HandlerError>(p) }
        })
        .build();
    within(n3.start()).await.unwrap();

    let err = within(n1.call(a("1.1.2"), "echo", Bytes::from_static(b"secret move")))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, RpcError::PeerLost { .. } | RpcError::Refused { .. })
            && text.contains("TLS with 1.1.2")
            && text.contains("certificate"),
        "{text}"
    );
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(
        n3.stats().links_opened,
        0,
        "no link was admitted at the impostor"
    );
    n1.shutdown().await;
    n3.shutdown().await;
}

/// A connection to a TLS node that never starts its handshake is closed within the dial
/// timeout, as on plain links.
#[tokio::test]
async fn a_silent_connection_to_a_tls_node_is_closed_at_the_deadline() {
    let ca = Ca::new();
    let mut c = support::Cluster::new(&["1.1.1"]);
    let net = c.members.get(a("1.1.1")).unwrap().net_addr;
    let n1 = c
        .builder("1.1.1")
        .config(
            support::test_config()
                .tls(ca.node("1.1.1"))
                .dial_timeout(Duration::from_millis(500)),
        )
        .build();
    within(n1.start()).await.unwrap();
    let mut s = tokio::net::TcpStream::connect(&net).await.unwrap();
    let mut buf = [0u8; 16];
    // EOF or a reset: the node closed it.
    let n = within(s.read(&mut buf)).await.unwrap_or(0);
    assert_eq!(n, 0);
    assert!(n1.stats().connections_timed_out >= 1);
    n1.shutdown().await;
}
