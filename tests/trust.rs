//! The trust boundary, tried as an attacker on the network would: each test runs one attack
//! over real loopback sockets against real nodes, and asserts what the victims notice.
//!
//! The attacker speaks the mesh wire itself (`clustergo::proto`), so these tests also pin the
//! link handshake as a peer implementation sees it.

#[path = "support/handshake.rs"]
mod handshake;
mod support;

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clustergo::proto::mesh_client::MeshClient;
use clustergo::proto::mesh_server::{Mesh, MeshServer};
use clustergo::proto::{Batch, Envelope, Response as WireResponse, envelope::Body, response};
use clustergo::{HandlerError, Member, MemoryDiscovery, Node};
use support::{a, bind, test_config, within};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

type Outbound = Pin<Box<dyn Stream<Item = Result<Batch, Status>> + Send>>;

fn who(name: &'static str) -> impl FnOnce(clustergo::NodeBuilder) -> clustergo::NodeBuilder {
    move |b| {
        b.rpc("who", move |_, _| async move {
            Ok::<_, HandlerError>(Bytes::from_static(name.as_bytes()))
        })
    }
}

/// Copies the link's `cg-*` metadata (the hello, or the acceptor's answer to it).
fn copy_hello(from: &MetadataMap, to: &mut MetadataMap) {
    for kv in from.iter() {
        if let tonic::metadata::KeyAndValueRef::Ascii(k, v) = kv {
            if k.as_str().starts_with("cg-") {
                to.insert(k.clone(), v.clone());
            }
        }
    }
}

/// What a man in the middle saw of one link handshake.
#[derive(Default)]
struct Captured {
    hello: Option<MetadataMap>,
    first: Option<Batch>,
}

/// A man in the middle: relays a link to `target` unchanged, recording the hello and the
/// dialer's first message.
struct Relay {
    target: String,
    seen: Arc<Mutex<Captured>>,
}

#[tonic::async_trait]
impl Mesh for Relay {
    type LinkStream = Outbound;

    async fn link(
        &self,
        req: Request<Streaming<Batch>>,
    ) -> Result<Response<Self::LinkStream>, Status> {
        self.seen.lock().unwrap().hello = Some(req.metadata().clone());
        let mut from_dialer = req.into_inner();
        let (tx, rx) = mpsc::channel::<Batch>(64);
        let mut out = Request::new(ReceiverStream::new(rx));
        copy_hello(
            &self.seen.lock().unwrap().hello.clone().unwrap(),
            out.metadata_mut(),
        );
        let seen = self.seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(b)) = from_dialer.message().await {
                seen.lock().unwrap().first.get_or_insert_with(|| b.clone());
                if tx.send(b).await.is_err() {
                    break;
                }
            }
        });
        let mut client = MeshClient::connect(format!("http://{}", self.target))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let resp = client.link(out).await?;
        let mut answer = MetadataMap::new();
        copy_hello(resp.metadata(), &mut answer);
        let mut from_target = resp.into_inner();
        let back = async_stream(move |tx| async move {
            loop {
                match from_target.message().await {
                    Ok(Some(b)) => {
                        if tx.send(Ok(b)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                }
            }
        });
        let mut r = Response::new(back);
        copy_hello(&answer, r.metadata_mut());
        Ok(r)
    }
}

/// A stream fed by a task.
fn async_stream<F, Fut>(f: F) -> Outbound
where
    F: FnOnce(mpsc::Sender<Result<Batch, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(f(tx));
    Box::pin(ReceiverStream::new(rx))
}

async fn serve(svc: impl Mesh) -> String {
    let (l, net) = bind();
    l.set_nonblocking(true).unwrap();
    let l = tokio::net::TcpListener::from_std(l).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(MeshServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    net
}

/// Every envelope the attacker's link receives, until it ends or `wait` passes; the end
/// status if there was one.
async fn drain(mut inbound: Streaming<Batch>, wait: Duration) -> (Vec<Envelope>, Option<Status>) {
    let mut got = Vec::new();
    let end = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(end, inbound.message()).await {
            Ok(Ok(Some(b))) => got.extend(b.envelopes),
            Ok(Ok(None)) | Err(_) => return (got, None),
            Ok(Err(s)) => return (got, Some(s)),
        }
    }
}

/// A captured hello, replayed on a new connection, must not make the attacker the node that
/// dialed: the real link stays, and the attacker receives none of the victim's traffic.
#[tokio::test]
async fn a_replayed_hello_does_not_hijack_the_link() {
    support::init_tracing();
    let (la, net_a) = bind();
    let (lb, net_b) = bind();
    // A reaches B through the man in the middle; B knows everyone's real address.
    let seen = Arc::new(Mutex::new(Captured::default()));
    let relay = serve(Relay {
        target: net_b.clone(),
        seen: seen.clone(),
    })
    .await;
    let a_view = MemoryDiscovery::new([
        Member::new(a("1.1.1"), net_a.clone()),
        Member::new(a("1.1.2"), relay),
    ]);
    let b_view = MemoryDiscovery::new([
        Member::new(a("1.1.1"), net_a.clone()),
        Member::new(a("1.1.2"), net_b.clone()),
    ]);
    let node_a = who("a")(Node::builder(a("1.1.1")))
        .discovery(a_view)
        .config(test_config())
        .listener(la)
        .build();
    let node_b = who("b")(Node::builder(a("1.1.2")))
        .discovery(b_view)
        .config(test_config())
        .listener(lb)
        .build();
    within(node_a.start()).await.unwrap();
    within(node_b.start()).await.unwrap();
    let reply = within(node_a.call(a("1.1.2"), "who", Bytes::new()))
        .await
        .unwrap();
    assert_eq!(&reply[..], b"b");

    // The replay: the same hello and the same first message, on a connection of our own.
    let (hello, first) = {
        let s = seen.lock().unwrap();
        (
            s.hello.clone().expect("a hello was relayed"),
            s.first.clone(),
        )
    };
    let (tx, rx) = mpsc::channel::<Batch>(8);
    if let Some(first) = first {
        tx.send(first).await.unwrap();
    }
    let mut req = Request::new(ReceiverStream::new(rx));
    copy_hello(&hello, req.metadata_mut());
    let mut attacker = MeshClient::connect(format!("http://{net_b}"))
        .await
        .unwrap();
    let admitted = within(attacker.link(req)).await;
    let inbound = admitted.map(|r| r.into_inner());

    // B calls A while the replayed link exists: A must answer, not the attacker.
    let b_calls_a = {
        let b = node_b.clone();
        tokio::spawn(async move {
            b.call_timeout(a("1.1.1"), "who", Bytes::new(), Duration::from_secs(3))
                .await
        })
    };
    let (stolen, status) = match inbound {
        Ok(inbound) => drain(inbound, Duration::from_secs(4)).await,
        Err(s) => (Vec::new(), Some(s)),
    };
    drop(tx);
    assert!(
        stolen.iter().all(|e| e.body.is_none()),
        "the attacker received the victim's traffic: {stolen:?}"
    );
    let status = status.expect("the replayed link must be refused with a status");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    let reply = within(b_calls_a).await.unwrap().unwrap();
    assert_eq!(&reply[..], b"a");
    assert_eq!(node_b.stats().links_closed, 0, "the real link was replaced");
    node_a.shutdown().await;
    node_b.shutdown().await;
}

/// A member's own link to `net`, as `from` to `to`, with the cluster secret: what a node that
/// holds the secret (a compromised or buggy one) can do. Performs the handshake of
/// `link::auth` from its description, and returns the admitted link's inbound half and the
/// sender of its outbound batches.
async fn member_link(
    net: &str,
    secret: &[u8],
    from: clustergo::LogicAddr,
    to: clustergo::LogicAddr,
) -> Result<(Streaming<Batch>, mpsc::Sender<Batch>), Status> {
    let (tx, rx) = mpsc::channel::<Batch>(8);
    let mut req = Request::new(ReceiverStream::new(rx));
    handshake::write_hello(req.metadata_mut(), from, to);
    let mut client = MeshClient::connect(format!("http://{net}"))
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?
        .max_decoding_message_size(8 << 20)
        .max_encoding_message_size(8 << 20);
    let resp = client.link(req).await?;
    let proof = handshake::dial_proof(secret, from, to, resp.metadata());
    tx.send(Batch {
        proof,
        ..Batch::default()
    })
    .await
    .unwrap();
    let mut inbound = resp.into_inner();
    // The acceptor's first batch, empty, says the link is admitted.
    let first = inbound.message().await?.expect("admitted");
    assert!(first.envelopes.is_empty());
    Ok((inbound, tx))
}

const SECRET: &[u8] = b"test-secret";

/// A member of cluster 2 answers calls that 1.1.1 made to another node of cluster 2: the
/// forged answers must not reach the callers, and are counted.
#[tokio::test]
async fn forged_answers_from_another_node_are_not_accepted() {
    support::init_tracing();
    let mut c = support::Cluster::new(&["1.1.1", "1.255.1", "2.255.1", "2.1.2", "2.1.3"]);
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let started = Arc::new(tokio::sync::Semaphore::new(0));
    let sentinel = Arc::new(tokio::sync::Notify::new());
    let caller = {
        let sentinel = sentinel.clone();
        c.start("1.1.1", move |b| {
            b.on_cmd(clustergo::Cmd(9), move |_, _| sentinel.notify_one())
        })
        .await
    };
    let _h1 = c.start("1.255.1", |b| b).await;
    let h2 = c.start("2.255.1", |b| b).await;
    let _server = {
        let (release, started) = (release.clone(), started.clone());
        c.start("2.1.2", move |b| {
            b.rpc("slow", move |_, _| {
                let release = release.clone();
                started.add_permits(1);
                async move {
                    let _ = release.acquire().await;
                    Ok::<_, HandlerError>(Bytes::from_static(b"real"))
                }
            })
        })
        .await
    };
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let caller = caller.clone();
            tokio::spawn(async move {
                caller
                    .call_timeout(server_addr(), "slow", Bytes::new(), Duration::from_secs(8))
                    .await
            })
        })
        .collect();
    fn server_addr() -> clustergo::LogicAddr {
        a("2.1.2")
    }
    // The five requests are being served before anything is forged.
    drop(within(started.acquire_many(5)).await.unwrap());
    let net_h2 = h2.local_addr().unwrap().to_string();
    let (_inbound, tx) = member_link(&net_h2, SECRET, a("2.1.3"), a("2.255.1"))
        .await
        .expect("a member may link to its harbor");
    let forged: Vec<Envelope> = (1..=40u64)
        .map(|id| Envelope {
            to: a("1.1.1").as_u32(),
            from: a("2.1.3").as_u32(),
            hops: 0,
            trace: Bytes::new(),
            body: Some(Body::Response(WireResponse {
                id,
                result: Some(response::Result::Payload(Bytes::from_static(b"forged"))),
            })),
        })
        .collect();
    // A message after the forgeries, on the same path: once it is handled, they have arrived.
    let mut envelopes = forged;
    envelopes.push(Envelope {
        to: a("1.1.1").as_u32(),
        from: a("2.1.3").as_u32(),
        hops: 0,
        trace: Bytes::new(),
        body: Some(Body::Message(clustergo::proto::Message {
            kind: Some(clustergo::proto::message::Kind::Cmd(9)),
            payload: Bytes::new(),
        })),
    });
    tx.send(Batch {
        envelopes,
        ..Batch::default()
    })
    .await
    .unwrap();
    within(sentinel.notified()).await;
    release.add_permits(5);
    for call in calls {
        let reply = within(call).await.unwrap().unwrap();
        assert_eq!(&reply[..], b"real");
    }
    assert!(caller.stats().responses_orphaned >= 40);
}

/// Connections that never say anything are closed within the dial timeout, and a flood of
/// them from one address does not keep a real peer from linking.
#[tokio::test]
async fn silent_connections_are_closed_and_capped() {
    support::init_tracing();
    let mut c = support::Cluster::new(&["1.1.1", "1.1.2"]);
    let victim = c.start("1.1.1", who("victim")).await;
    let peer = c.start("1.1.2", |b| b).await;
    let target = victim.local_addr().unwrap();
    let mut silent = Vec::new();
    for _ in 0..300 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        silent.push(s.connect(target).await.unwrap());
    }
    // A real peer links and calls while the flood holds.
    let reply = within(peer.call(victim.addr(), "who", Bytes::new()))
        .await
        .unwrap();
    assert_eq!(&reply[..], b"victim");
    // Every silent connection is closed by the node: at once over the cap, at the dial
    // timeout (2 s here) otherwise.
    let started = tokio::time::Instant::now();
    for mut s in silent {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 256];
        let closed = tokio::time::timeout(Duration::from_secs(6), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    // The server's HTTP/2 preface and settings.
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "a silent connection was still open after {:?}",
            started.elapsed()
        );
    }
    let reply = within(peer.call(victim.addr(), "who", Bytes::new()))
        .await
        .unwrap();
    assert_eq!(&reply[..], b"victim");
    // 64 (the per-source cap) waited out the deadline; the rest were closed at once.
    let stats = victim.stats();
    assert_eq!(
        stats.connections_refused + stats.connections_timed_out,
        300,
        "{stats:?}"
    );
    assert!(stats.connections_refused >= 300 - 64, "{stats:?}");
}

/// Sends `batch` on a member's link to a node: the link must end with `code` and a status
/// that says `says`, and the node keep serving.
async fn a_batch_ends_the_link(batch: Batch, code: tonic::Code, says: &str) {
    support::init_tracing();
    let mut c = support::Cluster::new(&["1.1.1", "1.1.2", "1.1.3"]);
    let victim = c.start("1.1.1", who("victim")).await;
    let peer = c.start("1.1.2", |b| b).await;
    let net = victim.local_addr().unwrap().to_string();
    let (inbound, tx) = member_link(&net, SECRET, a("1.1.3"), a("1.1.1"))
        .await
        .unwrap();
    tx.send(batch).await.unwrap();
    let (_, status) = drain(inbound, Duration::from_secs(8)).await;
    let status = status.expect("the link must end with a status");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(says), "{status:?}");
    let reply = within(peer.call(victim.addr(), "who", Bytes::new()))
        .await
        .unwrap();
    assert_eq!(&reply[..], b"victim");
}

/// One batch of 580,000 empty envelopes (1.16 MB): refused before it is decoded into
/// envelopes, with a status that says why; the node keeps serving.
#[tokio::test]
async fn a_batch_of_many_tiny_envelopes_is_refused() {
    let flood = Batch {
        envelopes: vec![Envelope::default(); 580_000],
        ..Batch::default()
    };
    a_batch_ends_the_link(flood, tonic::Code::ResourceExhausted, "envelopes").await;
}

/// A member confirming more envelopes than were sent to it (which would hide what a dying
/// link lost): the link ends with a status that says so; the node keeps serving.
#[tokio::test]
async fn a_peer_cannot_confirm_more_than_it_was_sent() {
    let lie = Batch {
        received: u64::MAX,
        ..Batch::default()
    };
    a_batch_ends_the_link(lie, tonic::Code::InvalidArgument, "confirmed").await;
}

/// One caller's slow requests take at most its share of the node's handlers: another caller
/// is still served, and the greedy one hears `Busy` naming its share.
#[tokio::test]
async fn one_caller_cannot_take_every_handler() {
    support::init_tracing();
    let mut c = support::Cluster::new(&["1.1.1", "1.1.2", "1.1.3"]);
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let started = Arc::new(tokio::sync::Semaphore::new(0));
    let _server = {
        let (release, started) = (release.clone(), started.clone());
        let node = c
            .builder("1.1.1")
            .config(
                test_config()
                    .max_concurrent_requests(10)
                    .max_requests_per_caller(4),
            )
            .rpc("slow", move |_, _| {
                let release = release.clone();
                started.add_permits(1);
                async move {
                    let _ = release.acquire().await;
                    Ok::<_, HandlerError>(Bytes::from_static(b"done"))
                }
            })
            .rpc("who", |_, _| async {
                Ok::<_, HandlerError>(Bytes::from_static(b"server"))
            })
            .build();
        within(node.start()).await.unwrap();
        node
    };
    let greedy = c.start("1.1.2", |b| b).await;
    let other = c.start("1.1.3", |b| b).await;
    let held: Vec<_> = (0..4)
        .map(|_| {
            let g = greedy.clone();
            tokio::spawn(async move { g.call(a("1.1.1"), "slow", Bytes::new()).await })
        })
        .collect();
    drop(within(started.acquire_many(4)).await.unwrap());
    let e = within(greedy.call(a("1.1.1"), "who", Bytes::new()))
        .await
        .unwrap_err();
    assert!(matches!(e, clustergo::RpcError::Busy { .. }), "{e}");
    let reply = within(other.call(a("1.1.1"), "who", Bytes::new()))
        .await
        .unwrap();
    assert_eq!(&reply[..], b"server");
    release.add_permits(4);
    for h in held {
        assert_eq!(&within(h).await.unwrap().unwrap()[..], b"done");
    }
    // The share is given back: the greedy caller is served again.
    let reply = within(greedy.call(a("1.1.1"), "who", Bytes::new()))
        .await
        .unwrap();
    assert_eq!(&reply[..], b"server");
}

/// Stream metadata is bounded: an open over the limit fails at the sender, and a peer that
/// sends one anyway (or many that together pass the per-peer total) is refused with the
/// reason.
#[tokio::test]
async fn stream_metadata_is_bounded() {
    use clustergo::proto::{StreamMeta as WireMeta, StreamOpen};
    support::init_tracing();
    let mut c = support::Cluster::new(&["1.1.1", "1.1.2", "1.1.9"]);
    let server = c
        .start("1.1.1", |b| {
            b.config(
                test_config()
                    .max_stream_meta(1024)
                    .max_stream_meta_per_peer(4096),
            )
            .on_stream(|s| async move {
                // Held open until the opener goes.
                let mut s = s;
                let _ = tokio::io::AsyncReadExt::read(&mut s, &mut [0u8; 1]).await;
            })
        })
        .await;
    let client = c.start("1.1.2", |b| b).await;
    let big = clustergo::StreamMeta::new().with("k", "v".repeat(5000));
    let e = within(client.open_stream_with(a("1.1.1"), big))
        .await
        .unwrap_err();
    assert!(matches!(e, clustergo::StreamError::TooLarge { .. }), "{e}");

    // A hostile member sends what a well-behaved node never would.
    let net = server.local_addr().unwrap().to_string();
    let (inbound, tx) = member_link(&net, SECRET, a("1.1.9"), a("1.1.1"))
        .await
        .unwrap();
    let open = |id: u64, bytes: usize| Envelope {
        to: a("1.1.1").as_u32(),
        from: a("1.1.9").as_u32(),
        hops: 0,
        trace: Bytes::new(),
        body: Some(Body::Open(StreamOpen {
            id,
            window: 1 << 16,
            meta: vec![WireMeta {
                key: "k".into(),
                value: "v".repeat(bytes),
            }],
        })),
    };
    // One over the per-stream limit, then six of ~900 bytes: four fit in 4 KiB, two do not.
    let mut envelopes = vec![open(1, 2000)];
    envelopes.extend((2..8).map(|id| open(id, 900)));
    tx.send(Batch {
        envelopes,
        ..Batch::default()
    })
    .await
    .unwrap();
    let (got, _) = drain(inbound, Duration::from_secs(2)).await;
    let refusals: Vec<(u64, String)> = got
        .into_iter()
        .filter_map(|e| match e.body {
            Some(Body::Close(c)) => Some((c.id, c.reason)),
            _ => None,
        })
        .collect();
    assert_eq!(refusals.len(), 3, "{refusals:?}");
    assert!(
        refusals[0].1.contains("over 1.1.1's limit of 1024 bytes"),
        "{refusals:?}"
    );
    assert!(
        refusals[1].1.contains("over 4096 bytes, its limit"),
        "{refusals:?}"
    );
    drop(tx);
}

/// Before its link is admitted, a connection may carry only a few KiB: a first message of a
/// megabyte (a "proof" padded out) is refused as it arrives, not buffered whole and then
/// checked. (Before, every pending connection could make the node hold a full batch.)
#[tokio::test]
async fn a_huge_first_message_is_refused_before_its_proof_is_read() {
    support::init_tracing();
    let mut c = support::Cluster::new(&["1.1.1", "1.1.2"]);
    let n1 = c.start("1.1.1", who("n1")).await;
    let net = c.members.get(a("1.1.1")).unwrap().net_addr;
    let (tx, rx) = mpsc::channel::<Batch>(8);
    let mut req = Request::new(ReceiverStream::new(rx));
    handshake::write_hello(req.metadata_mut(), a("1.1.2"), a("1.1.1"));
    let mut client = MeshClient::connect(format!("http://{net}"))
        .await
        .unwrap()
        .max_encoding_message_size(8 << 20);
    let resp = within(client.link(req)).await.unwrap();
    tx.send(Batch {
        proof: Bytes::from(vec![0u8; 1 << 20]),
        ..Batch::default()
    })
    .await
    .unwrap();
    let err = within(resp.into_inner().message()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("before the link was admitted"),
        "{err:?}"
    );
    assert!(n1.stats().links_refused >= 1);
}

/// Without the secret, a prober cannot tell members from other addresses: a hello from a
/// member's address and one from an address nobody has both get a challenge, and a wrong
/// proof fails the same way for both.
#[tokio::test]
async fn a_prober_without_the_secret_cannot_list_members() {
    support::init_tracing();
    let mut c = support::Cluster::new(&["1.1.1", "1.1.2"]);
    let _n1 = c.start("1.1.1", who("n1")).await;
    let net = c.members.get(a("1.1.1")).unwrap().net_addr;
    let mut answers = Vec::new();
    for from in ["1.1.2", "1.1.9"] {
        let (tx, rx) = mpsc::channel::<Batch>(8);
        let mut req = Request::new(ReceiverStream::new(rx));
        handshake::write_hello(req.metadata_mut(), a(from), a("1.1.1"));
        let mut client = MeshClient::connect(format!("http://{net}")).await.unwrap();
        let resp = within(client.link(req))
            .await
            .unwrap_or_else(|s| panic!("{from} got no challenge: {s:?}"));
        assert!(resp.metadata().get("cg-proof").is_some());
        tx.send(Batch {
            proof: Bytes::from(vec![0u8; 32]),
            ..Batch::default()
        })
        .await
        .unwrap();
        let err = within(resp.into_inner().message()).await.unwrap_err();
        answers.push((err.code(), err.message().replace(from, "X")));
    }
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[0].0, tonic::Code::Unauthenticated);
}
