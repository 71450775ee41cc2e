//! A game server behind the gateway: each client arrives as one stream with its metadata, and
//! game code reads and writes whole frames through [`Frames`].
//!
//! Frames are echoed, except a few commands for trying things out:
//! - `whoami` → this server's address;
//! - `meta` → the stream's open metadata, `key=value` joined by spaces;
//! - `kick:<reason>` → closes the client with that reason (a close frame on the stream);
//! - `bye` → ends the session cleanly.
//!
//! Run: `cargo run -p gateway --example game_server -- http://127.0.0.1:2379 /clustergo 1.1.1`
//! (the address must be listed under the prefix, e.g. with `clusterctl`). Stops on SIGTERM or
//! Ctrl-C.

use std::time::Duration;

use bytes::BytesMut;
use clustergo::{EtcdDiscovery, EtcdOptions, Frames, LogicAddr, Node, Stream};
use tokio::io::AsyncWriteExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: game_server <etcd endpoint> <prefix> <addr>";
    let endpoint = args.next().ok_or(usage)?;
    let prefix = args.next().ok_or(usage)?;
    let me: LogicAddr = args.next().ok_or(usage)?.parse()?;
    // Logs, and traces when OTEL_EXPORTER_OTLP_ENDPOINT is set: a client's session at the
    // gateway and this server's work for it are one trace.
    let telemetry = clustergo::telemetry::init(&format!("game-server-{me}"))?;
    let discovery = EtcdDiscovery::connect(
        [endpoint],
        prefix,
        EtcdOptions::default().lease_ttl(Duration::from_secs(2)),
    );
    let node = Node::builder(me)
        .discovery(discovery)
        .on_stream(move |stream| session(me, stream))
        .build();
    node.start().await?;
    println!(
        "game server {me} listening on {}",
        node.local_addr().ok_or("no listener")?
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = node.closed() => {}
    }
    node.shutdown().await;
    telemetry.shutdown().await;
    println!("game server {me} stopped");
    Ok(())
}

async fn session(me: LogicAddr, stream: Stream) {
    let mut frames = Frames::new(stream, 1 << 20);
    loop {
        let frame = match frames.recv().await {
            Ok(Some(f)) => f,
            // The client left: the gateway ended the stream; end ours too.
            Ok(None) => {
                let _ = frames.close().await;
                return;
            }
            // The stream failed (reset by the gateway, link lost).
            Err(_) => return,
        };
        let reply = match &frame[..] {
            b"whoami" => me.to_string().into(),
            b"meta" => frames
                .metadata()
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
                .into(),
            b"bye" => {
                let _ = frames.close().await;
                return;
            }
            f if f.starts_with(b"kick:") => {
                let reason = String::from_utf8_lossy(&f[5..]).into_owned();
                let mut stream = frames.into_stream();
                let mut close = BytesMut::new();
                clustergo_client::wire::put_close(&mut close, &reason);
                let _ = stream.write_all(&close).await;
                let _ = stream.shutdown().await;
                return;
            }
            _ => frame,
        };
        if frames.send(reply).await.is_err() {
            return;
        }
    }
}
