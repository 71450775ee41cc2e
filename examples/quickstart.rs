//! Two nodes in one process on the embedded in-memory membership: an echo RPC and a message
//! handler on one, calls and a message from the other. Exits 0 when everything arrived.
//!
//! Run: `cargo run --example quickstart`

use std::time::Duration;

use clustergo::{Bytes, Cmd, HandlerError, LogicAddr, Member, MemoryDiscovery, Node, NodeConfig};
use tokio::sync::mpsc;

const CHAT: Cmd = Cmd(1);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Two addresses of cluster 1: a gate (type 1) and a game server (type 2).
    let gate: LogicAddr = "1.1.1".parse()?;
    let game: LogicAddr = "1.2.1".parse()?;

    // Bind both listeners first so membership can name their real ports.
    let gate_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let game_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let members = MemoryDiscovery::new([
        Member::new(gate, gate_listener.local_addr()?.to_string()),
        Member::new(game, game_listener.local_addr()?.to_string()),
    ]);
    let config = NodeConfig::default().secret("quickstart-secret");

    let (chat_tx, mut chat_rx) = mpsc::channel(8);
    let game_node = Node::builder(game)
        .discovery(members.clone())
        .config(config.clone())
        .listener(game_listener)
        .rpc("echo", move |ctx, payload| async move {
            println!(
                "[{game}] echo from {}: {:?}",
                ctx.from(),
                String::from_utf8_lossy(&payload)
            );
            Ok::<_, HandlerError>(payload)
        })
        .on_cmd(CHAT, move |ctx, payload| {
            // Message handlers run in arrival order and must not block: hand work off.
            let _ = chat_tx.try_send((ctx.from(), payload));
        })
        .build();
    game_node.start().await?;

    let gate_node = Node::builder(gate)
        .discovery(members)
        .config(config)
        .listener(gate_listener)
        .build();
    gate_node.start().await?;

    // Pick a game server by type, then call it. The link opens on this first call.
    let target = gate_node.get_addr_by_type(2)?;
    let reply = gate_node
        .call(target, "echo", Bytes::from_static(b"hello, game server"))
        .await?;
    println!("[{gate}] reply: {:?}", String::from_utf8_lossy(&reply));

    // The callback form, for code that must not await.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    gate_node.call_with_callback(
        target,
        "echo",
        Bytes::from_static(b"by callback"),
        Duration::from_secs(1),
        |r| {
            let _ = done_tx.send(r);
        },
    );
    let reply = done_rx.await??;
    println!(
        "[{gate}] callback reply: {:?}",
        String::from_utf8_lossy(&reply)
    );

    // A one-way message.
    gate_node
        .send_cmd(target, CHAT, Bytes::from_static(b"a chat line"))
        .await?;
    let (from, line) = tokio::time::timeout(Duration::from_secs(5), chat_rx.recv())
        .await?
        .ok_or("chat handler went away")?;
    println!(
        "[{game}] chat from {from}: {:?}",
        String::from_utf8_lossy(&line)
    );

    // Typed errors: a method nobody registered.
    match gate_node.call(target, "missing", Bytes::new()).await {
        Err(e) => println!("[{gate}] expected error: {e}"),
        Ok(_) => return Err("a missing method answered".into()),
    }

    gate_node.shutdown().await;
    game_node.shutdown().await;
    println!("quickstart: ok");
    Ok(())
}
