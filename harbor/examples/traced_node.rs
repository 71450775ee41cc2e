//! A node whose calls are traced (OpenTelemetry, through `clustergo::telemetry`): one process
//! of a trace that crosses harbors.
//!
//! ```text
//! traced_node <etcd endpoint> <prefix> <addr> serve          # serves `echo` until stdin closes
//! traced_node <etcd endpoint> <prefix> <addr> call <target>  # calls `echo` on target once
//! ```
//!
//! Membership is in etcd (the node must be listed there); the cluster secret comes from
//! `CLUSTERGO_SECRET`; traces go where `OTEL_EXPORTER_OTLP_ENDPOINT` says. `serve` prints
//! `READY` once started; `call` prints `OK <answer>` and exits 0 when the call succeeded,
//! then opens a stream (inside a span of its own, `open.demo`) and prints `STREAM <echo>`.

use std::time::Duration;

use clustergo::{
    Bytes, EtcdDiscovery, EtcdOptions, HandlerError, LogicAddr, Node, NodeConfig, RpcError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::Instrument;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, endpoint, prefix, addr, role, rest @ ..] = args.as_slice() else {
        return Err("usage: traced_node <etcd> <prefix> <addr> serve|call <target>".into());
    };
    let me: LogicAddr = addr.parse()?;
    let telemetry = clustergo::telemetry::init(&format!("traced-{me}"))?;
    let node = Node::builder(me)
        .discovery(EtcdDiscovery::connect(
            [endpoint.clone()],
            prefix.clone(),
            EtcdOptions::default().lease_ttl(Duration::from_secs(2)),
        ))
        .config(NodeConfig::default())
        .rpc("echo", |_ctx, payload| async move {
            Ok::<_, HandlerError>(payload)
        })
        .on_stream(|s| async move {
            let (mut r, mut w) = s.into_split();
            if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                let _ = w.shutdown().await;
            }
        })
        .build();
    node.start().await?;
    let result = match (role.as_str(), rest) {
        ("serve", []) => {
            println!("READY");
            // Until the test closes stdin.
            let _ = tokio::io::stdin().read(&mut [0u8; 1]).await;
            Ok(())
        }
        ("call", [target]) => call(&node, target.parse()?).await,
        _ => Err("the role is `serve` or `call <target>`".into()),
    };
    node.shutdown().await;
    telemetry.shutdown().await;
    result
}

/// Calls `echo` on `to` once it is routable (its harbors seen alive), within ten seconds.
async fn call(node: &Node, to: LogicAddr) -> Result<(), Box<dyn std::error::Error>> {
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match node.call(to, "echo", Bytes::from_static(b"traced")).await {
            Ok(answer) => {
                println!("OK {}", String::from_utf8_lossy(&answer));
                return stream(node, to)
                    .instrument(tracing::info_span!("open.demo"))
                    .await;
            }
            Err(RpcError::NoRoute { .. }) if tokio::time::Instant::now() < until => {
                // Membership has not shown the harbors alive yet: try again shortly.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Opens a stream to `to`, writes a line, reads its echo.
async fn stream(node: &Node, to: LogicAddr) -> Result<(), Box<dyn std::error::Error>> {
    let (mut r, mut w) = node.open_stream(to).await?.into_split();
    w.write_all(b"hi").await?;
    w.shutdown().await?;
    let mut echo = String::new();
    r.read_to_string(&mut echo).await?;
    println!("STREAM {echo}");
    Ok(())
}
