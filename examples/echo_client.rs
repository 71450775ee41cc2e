//! Calls the echo service through the generated `EchoClient`: await, timeout, callback,
//! one-way, and a typed one-way message. Exits 0 when everything was answered.
//!
//! Run: `cargo run --example echo_client -- examples/members.toml [1.1.1] [1.2.1]`
//! with `echo_server` running.

use std::time::Duration;

use clustergo::{FileDiscovery, LogicAddr, Node, NodeConfig};

// A binary uses only part of the generated API.
#[allow(dead_code, unreachable_pub)]
mod echo {
    include!(concat!(env!("OUT_DIR"), "/examples.echo.v1.rs"));
}
use echo::{ChatLine, EchoClient, EchoRequest};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let members = args
        .next()
        .unwrap_or_else(|| "examples/members.toml".into());
    let me: LogicAddr = args.next().as_deref().unwrap_or("1.1.1").parse()?;
    let server: LogicAddr = args.next().as_deref().unwrap_or("1.2.1").parse()?;

    let node = Node::builder(me)
        .discovery(FileDiscovery::open(&members)?)
        // CLUSTERGO_SECRET when set (a deployment's), else the examples' own.
        .config(NodeConfig::default().secret(
            std::env::var(clustergo::SECRET_ENV).unwrap_or_else(|_| "echo-example-secret".into()),
        ))
        .build();
    node.start().await?;

    let echo = EchoClient::new(&node, server);
    let reply = echo
        .call(&EchoRequest {
            text: "hello".into(),
        })
        .await?;
    println!("reply from {}: {:?}", reply.served_by, reply.text);

    let reply = echo
        .call_timeout(
            &EchoRequest {
                text: "in time".into(),
            },
            Duration::from_secs(2),
        )
        .await?;
    println!("reply within 2 s: {:?}", reply.text);

    let (tx, rx) = tokio::sync::oneshot::channel();
    echo.call_with_callback(
        &EchoRequest {
            text: "by callback".into(),
        },
        Duration::from_secs(2),
        move |reply| {
            let _ = tx.send(reply);
        },
    );
    println!("callback reply: {:?}", rx.await??.text);

    echo.post_call(&EchoRequest {
        text: "one-way".into(),
    })
    .await?;
    node.send_message(
        server,
        &ChatLine {
            from_player: "player-7".into(),
            text: "gg".into(),
        },
    )
    .await?;
    // A call after the one-way sends returns once they were handled: they share the link, in order.
    echo.call(&EchoRequest {
        text: "done".into(),
    })
    .await?;

    node.shutdown().await;
    println!("echo client: ok");
    Ok(())
}
