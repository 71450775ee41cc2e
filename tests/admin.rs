//! The admin listener over real nodes: `/metrics` says what the nodes did (and Prometheus's
//! own `promtool` accepts it), `/ready` turns unready when a node starts to drain, before it
//! leaves membership.

#[path = "support/prometheus.rs"]
mod prometheus_server;
mod support;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use clustergo::admin::Admin;
use clustergo::membership::{BoxFuture, Discovery, MembershipStream};
use clustergo::{HandlerError, LogicAddr, MemoryDiscovery, Node, RpcError};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET `path` from the admin listener at `addr`: (status, body).
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    get_accepting(addr, path, "*/*").await
}

async fn get_accepting(addr: std::net::SocketAddr, path: &str, accept: &str) -> (u16, String) {
    within(async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nAccept: {accept}\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        let (status, body) = prometheus_server::parse_http(&text);
        assert_ne!(status, 0, "not an HTTP answer: {text:?}");
        (status, body)
    })
    .await
}

/// The value of the series whose line starts with `series ` (labels included).
fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split(' ').next()?.parse().ok())
}

#[tokio::test]
async fn metrics_say_what_the_nodes_did_and_promtool_accepts_them() {
    init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.2.1"]);
    let server = c
        .start("1.2.1", |b| {
            b.rpc("echo", |_ctx, p| async move { Ok::<_, HandlerError>(p) })
                .rpc("fail", |_ctx, _| async move {
                    Err::<Bytes, _>(HandlerError::new(1000, "no"))
                })
        })
        .await;
    let client = c.start("1.1.1", |b| b).await;
    for _ in 0..7 {
        client
            .call(server.addr(), "echo", Bytes::from_static(b"hi"))
            .await
            .unwrap();
    }
    assert!(
        client
            .call(server.addr(), "fail", Bytes::new())
            .await
            .is_err()
    );
    let missing = client.call(server.addr(), "missing", Bytes::new()).await;
    assert!(
        matches!(missing, Err(RpcError::NoMethod { .. })),
        "{missing:?}"
    );

    let admin = Admin::new().node(&server).node(&client);
    let listener = admin.serve("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr();
    let (status, text) = get(at, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    let v = |s: &str| value(&text, s).unwrap_or_else(|| panic!("no series {s} in:\n{text}"));
    // Both sides count the same calls, each by its own method and outcome.
    let ok = r#"{node="1.2.1",method="echo",outcome="ok"}"#;
    assert_eq!(
        v(&format!("clustergo_rpc_server_duration_seconds_count{ok}")),
        7.0
    );
    let ok = r#"{node="1.1.1",method="echo",outcome="ok"}"#;
    assert_eq!(
        v(&format!("clustergo_rpc_client_duration_seconds_count{ok}")),
        7.0
    );
    assert_eq!(
        v(
            r#"clustergo_rpc_server_duration_seconds_count{node="1.2.1",method="fail",outcome="error"}"#
        ),
        1.0
    );
    // A method the server does not serve is counted, under a label the caller cannot choose.
    assert_eq!(
        v(
            r#"clustergo_rpc_server_duration_seconds_count{node="1.2.1",method="_unknown",outcome="no_method"}"#
        ),
        1.0
    );
    assert_eq!(
        v(
            r#"clustergo_rpc_client_duration_seconds_count{node="1.1.1",method="missing",outcome="no_method"}"#
        ),
        1.0
    );
    assert_eq!(v(r#"clustergo_requests_received_total{node="1.2.1"}"#), 9.0);
    assert_eq!(v(r#"clustergo_links_up{node="1.1.1"}"#), 1.0);
    // Traffic by kind, each way: nine requests out of the client, nine answers back.
    assert_eq!(
        v(r#"clustergo_envelopes_sent_total{node="1.1.1",kind="request"}"#),
        9.0
    );
    assert_eq!(
        v(r#"clustergo_envelopes_received_total{node="1.2.1",kind="request"}"#),
        9.0
    );
    assert_eq!(
        v(r#"clustergo_envelopes_received_total{node="1.1.1",kind="response"}"#),
        9.0
    );
    assert!(v(r#"clustergo_bytes_sent_total{node="1.1.1",kind="request"}"#) >= 9.0 * 2.0);
    assert_eq!(v(r#"clustergo_dials_started_total{node="1.1.1"}"#), 1.0);
    assert_eq!(
        v(r#"clustergo_dial_failures_total{node="1.1.1",reason="refused"}"#),
        0.0
    );
    assert_eq!(
        v(r#"clustergo_members{node="1.1.1",state="available"}"#),
        2.0
    );
    assert_eq!(v(r#"clustergo_node_ready{node="1.2.1"}"#), 1.0);
    assert!(
        text.contains(r#"clustergo_peer_queue_depth{node="1.1.1",peer="1.2.1"}"#),
        "{text}"
    );
    // Prometheus asks for OpenMetrics and gets it.
    let (_, open) =
        get_accepting(at, "/metrics", "application/openmetrics-text;version=1.0.0").await;
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert!(
        open.contains("# TYPE clustergo_requests_received counter"),
        "{open}"
    );
    assert!(
        text.contains("# TYPE clustergo_requests_received_total counter"),
        "{text}"
    );

    // Prometheus's own linter accepts the exposition.
    prometheus_server::promtool_check(&text);

    let (status, body) = get(at, "/status").await;
    assert_eq!(status, 200);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["nodes"][0]["addr"], "1.2.1");
    assert_eq!(status["nodes"][1]["links_up"], 1);
    assert_eq!(get(at, "/live").await.0, 200);
    assert_eq!(get(at, "/nothing").await.0, 404);
    client.shutdown().await;
    server.shutdown().await;
}

/// Membership whose `leave` waits until the test lets it go, then takes the member out (as
/// etcd does when its lease is revoked).
struct SlowLeave {
    inner: MemoryDiscovery,
    gate: Arc<Mutex<Option<tokio::sync::oneshot::Receiver<()>>>>,
}

impl Discovery for SlowLeave {
    fn subscribe(&self) -> MembershipStream {
        self.inner.subscribe()
    }

    fn leave(&self, me: LogicAddr) -> BoxFuture {
        let gate = self.gate.lock().unwrap().take();
        let members = self.inner.clone();
        Box::pin(async move {
            if let Some(gate) = gate {
                let _ = gate.await;
            }
            members.remove(me);
        })
    }
}

#[tokio::test]
async fn a_draining_node_is_unready_before_it_leaves_membership() {
    init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.2.1"]);
    let (release, gate) = tokio::sync::oneshot::channel();
    let slow = SlowLeave {
        inner: c.members.clone(),
        gate: Arc::new(Mutex::new(Some(gate))),
    };
    let draining = c.builder("1.2.1").discovery(slow).build();
    within(draining.start()).await.unwrap();
    let watcher = c.start("1.1.1", |b| b).await;
    let admin = Admin::new().node(&draining);
    let listener = admin.serve("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr();
    assert_eq!(get(at, "/ready").await, (200, "ready\n".into()));

    let stopping = {
        let n = draining.clone();
        tokio::spawn(async move { n.shutdown().await })
    };
    // The shutdown is held in `leave`: unready now, and still a member for everyone else.
    let unready = within(async {
        loop {
            let (status, body) = get(at, "/ready").await;
            if status == 503 {
                return body;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(unready.contains("1.2.1 is draining"), "{unready}");
    assert!(
        watcher.member(draining.addr()).is_some(),
        "still listed while it drains"
    );
    release.send(()).unwrap();
    within(stopping).await.unwrap();
    assert!(
        watcher
            .wait_for_member(draining.addr(), |m| m.is_none(), WAIT)
            .await
    );
    watcher.shutdown().await;
}

/// A node that is listed but not available (e.g. its lease lapsed) is not ready.
#[tokio::test]
async fn an_unavailable_member_is_not_ready() {
    let mut c = Cluster::new(&["1.1.1"]);
    let node: Node = c.start("1.1.1", |b| b).await;
    assert_eq!(node.readiness(), Ok(()));
    let me = node.member(node.addr()).unwrap();
    c.members.upsert(me.with_available(false));
    within(async {
        while node.readiness().is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(
        node.readiness(),
        Err("1.1.1 is not available in membership".into())
    );
    node.shutdown().await;
}

/// A process that starts to drain its own work says so on `/ready` before its node stops.
#[tokio::test]
async fn set_draining_makes_ready_say_no_while_the_node_still_runs() {
    let mut c = Cluster::new(&["1.1.1"]);
    let node: Node = c.start("1.1.1", |b| b).await;
    let server = Admin::new().node(&node).serve("127.0.0.1:0").await.unwrap();
    let at = server.local_addr();
    assert_eq!(get(at, "/ready").await.0, 200);
    server.set_draining();
    assert_eq!(
        get(at, "/ready").await,
        (503, "not ready: draining\n".into())
    );
    assert!(node.is_running());
    assert_eq!(get(at, "/live").await.0, 200);
    node.shutdown().await;
}
