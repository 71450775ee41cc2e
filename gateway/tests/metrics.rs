//! The gateway's admin listener with real processes: a real Prometheus server scrapes it and
//! finds what the clients did; `promtool` accepts what it serves.

mod bed;
#[path = "../../tests/support/prometheus.rs"]
mod prometheus_server;

use std::time::Duration;

use bed::{TEST_LIMITS, WAIT, bed};
use clustergo_client::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

async fn within<F: std::future::Future>(f: F) -> F::Output {
    timeout(WAIT, f).await.expect("timed out")
}

/// GET `path` from `addr` (HTTP/1.0, plain text): (status, body).
async fn get(addr: &str, path: &str) -> (u16, String) {
    within(async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        prometheus_server::parse_http(&text)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_gateway_and_sees_its_clients() {
    let bed = bed(
        &["1.1.1"],
        &format!("admin_listen = \"127.0.0.1:0\"\n{TEST_LIMITS}"),
    )
    .await;
    let admin = bed
        .gateway
        .admin
        .clone()
        .expect("the gateway printed its admin address");
    // Ready once its own liveness shows in membership: until then /ready says why not.
    within(async {
        loop {
            match get(&admin, "/ready").await {
                (200, body) => break assert_eq!(body, "ready\n"),
                (503, body) => assert!(body.starts_with("not ready: 1.100.1"), "{body}"),
                other => panic!("/ready answered {other:?}"),
            }
            // Asked again shortly: the answer changes when etcd's watch delivers the lease.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // Ten 100-byte frames each way over every transport; the TCP client stays connected.
    let frame = "x".repeat(100);
    let mut kept = None;
    for transport in ["tcp", "ws", "kcp"] {
        let mut c = within(Client::connect(&bed.gateway.url(transport)))
            .await
            .unwrap();
        for _ in 0..10 {
            c.send(frame.clone()).await.unwrap();
            assert_eq!(within(c.recv()).await.unwrap().len(), 100);
        }
        if transport == "tcp" {
            kept = Some(c);
        } else {
            within(c.close("done")).await.unwrap();
        }
    }

    let (status, text) = get(&admin, "/metrics").await;
    assert_eq!(status, 200);
    // The TCP client is still connected (it may idle out later, while Prometheus starts);
    // the WebSocket client is counted as `ws`, never as `tcp`.
    assert!(
        text.contains("clustergo_gateway_clients{transport=\"tcp\"} 1\n"),
        "{text}"
    );
    prometheus_server::promtool_check(&text);

    let prom = prometheus_server::Prometheus::start(
        bed::etcd_server::free_port(),
        std::slice::from_ref(&admin),
    );
    let wait = Duration::from_secs(20);
    tokio::task::spawn_blocking(move || {
        prom.wait_for("up", wait, |v| v == 1.0);
        // The closed clients are gone once the gateway has seen their close.
        prom.wait_for(r#"clustergo_gateway_clients{transport="ws"}"#, wait, |v| {
            v == 0.0
        });
        prom.wait_for(r#"clustergo_gateway_clients{transport="kcp"}"#, wait, |v| {
            v == 0.0
        });
        // Each ended session is timed under its own transport.
        prom.wait_for(
            r#"clustergo_gateway_session_duration_seconds_count{transport="ws"}"#,
            wait,
            |v| v == 1.0,
        );
        prom.wait_for(
            r#"clustergo_gateway_frames_total{direction="up"}"#,
            wait,
            |v| v >= 30.0,
        );
        prom.wait_for(
            r#"clustergo_gateway_bytes_total{direction="down"}"#,
            wait,
            |v| v >= 3000.0,
        );
        prom.wait_for(
            r#"clustergo_gateway_sessions_ended_total{reason="client_left"}"#,
            wait,
            |v| v >= 2.0,
        );
        prom.wait_for(
            r#"clustergo_gateway_session_duration_seconds_count{transport="kcp"}"#,
            wait,
            |v| v == 1.0,
        );
        prom.wait_for(r#"clustergo_links_up{node="1.100.1"}"#, wait, |v| v >= 1.0);
        prom.wait_for(r#"clustergo_gateway_accepted_total"#, wait, |v| v >= 3.0);
    })
    .await
    .unwrap();
    drop(kept);
}
