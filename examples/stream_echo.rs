//! A stream echo server: every stream another node opens to it is echoed back until the
//! opener half-closes. The game-server side of the seed's gateway example, in a few lines.
//!
//! Run: `cargo run --example stream_echo -- examples/members.toml [1.2.1]`. Stops on Ctrl-C.

use clustergo::{FileDiscovery, LogicAddr, Node, NodeConfig};
use tokio::io::AsyncWriteExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let members = args
        .next()
        .unwrap_or_else(|| "examples/members.toml".into());
    let me: LogicAddr = args.next().as_deref().unwrap_or("1.2.1").parse()?;

    let node = Node::builder(me)
        .discovery(FileDiscovery::open(&members)?)
        .config(NodeConfig::default().secret("echo-example-secret"))
        .on_stream(|stream| async move {
            let peer = stream.peer();
            let (mut reader, mut writer) = stream.into_split();
            match tokio::io::copy(&mut reader, &mut writer).await {
                Ok(n) => {
                    let _ = writer.shutdown().await;
                    println!("stream from {peer} closed after {n} bytes");
                }
                Err(e) => println!("stream from {peer} failed: {e}"),
            }
        })
        .build();
    node.start().await?;
    println!(
        "stream echo {me} listening on {}",
        node.local_addr().ok_or("no listener")?
    );
    tokio::select! {
        _ = tokio::signal::ctrl_c() => node.shutdown().await,
        _ = node.closed() => {}
    }
    println!("stream echo {me} stopped");
    Ok(())
}
