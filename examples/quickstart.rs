//! Two nodes in one process on the embedded in-memory membership: the generated echo service
//! (`proto/examples/echo.proto`) on one, calls and a typed one-way message from the other.
//! Exits 0 when everything arrived.
//!
//! Run: `cargo run --example quickstart`

use std::time::Duration;

use clustergo::{CallContext, HandlerError, LogicAddr, Member, MemoryDiscovery, Node, NodeConfig};
use tokio::sync::mpsc;

// Generated at build time by clustergo-build (see build.rs).
#[allow(dead_code, unreachable_pub)]
mod echo {
    include!(concat!(env!("OUT_DIR"), "/examples.echo.v1.rs"));
}
use echo::{ChatLine, EchoClient, EchoReply, EchoRequest, EchoServer, register_echo};

/// The game server's side of the echo service.
struct Echo {
    me: LogicAddr,
}

impl EchoServer for Echo {
    async fn call(
        &self,
        ctx: CallContext,
        request: EchoRequest,
    ) -> Result<EchoReply, HandlerError> {
        println!("[{}] echo from {}: {:?}", self.me, ctx.from(), request.text);
        Ok(EchoReply {
            text: request.text,
            served_by: self.me.to_string(),
        })
    }
}

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
    let builder = Node::builder(game)
        .discovery(members.clone())
        .config(config.clone())
        .listener(game_listener)
        .on_message(move |ctx, line: ChatLine| {
            // Message handlers run in arrival order and must not block: hand work off.
            let _ = chat_tx.try_send((ctx.from(), line));
        });
    let game_node = register_echo(builder, Echo { me: game }).build();
    game_node.start().await?;

    let gate_node = Node::builder(gate)
        .discovery(members)
        .config(config)
        .listener(gate_listener)
        .build();
    gate_node.start().await?;

    // Pick a game server by type, then call it. The link opens on this first call.
    let target = gate_node.get_addr_by_type(2)?;
    let echo = EchoClient::new(&gate_node, target);
    let reply = echo
        .call(&EchoRequest {
            text: "hello, game server".into(),
        })
        .await?;
    println!("[{gate}] reply from {}: {:?}", reply.served_by, reply.text);

    // The callback form, for code that must not await.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    echo.call_with_callback(
        &EchoRequest {
            text: "by callback".into(),
        },
        Duration::from_secs(1),
        |r| {
            let _ = done_tx.send(r);
        },
    );
    let reply = done_rx.await??;
    println!("[{gate}] callback reply: {:?}", reply.text);

    // A typed one-way message.
    let line = ChatLine {
        from_player: "player-7".into(),
        text: "a chat line".into(),
    };
    gate_node.send_message(target, &line).await?;
    let (from, line) = tokio::time::timeout(Duration::from_secs(5), chat_rx.recv())
        .await?
        .ok_or("chat handler went away")?;
    println!("[{game}] chat from {from}: {:?}", line.text);

    // Typed errors: a method nobody registered.
    match gate_node
        .call(target, "missing", clustergo::Bytes::new())
        .await
    {
        Err(e) => println!("[{gate}] expected error: {e}"),
        Ok(_) => return Err("a missing method answered".into()),
    }

    gate_node.shutdown().await;
    game_node.shutdown().await;
    println!("quickstart: ok");
    Ok(())
}
