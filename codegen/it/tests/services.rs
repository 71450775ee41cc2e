//! Every generated method, called across two real nodes on loopback.

#[path = "../../../tests/support/mod.rs"]
mod support;

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use clustergo::{CallContext, ErrorCode, HandlerError, RpcError};
use clustergo_build_it::echo;
use clustergo_build_it::it::{a, b, common, multi, shop};
use support::*;

#[derive(Default)]
struct Room {
    seats: AtomicU32,
    left: Mutex<Vec<String>>,
}

impl multi::GameServer for Room {
    async fn join(&self, _: CallContext, p: multi::Player) -> Result<multi::Seat, HandlerError> {
        if p.name.is_empty() {
            return Err(HandlerError::new(400, "a player needs a name"));
        }
        Ok(multi::Seat {
            number: self.seats.fetch_add(1, Ordering::SeqCst) + 1,
        })
    }

    async fn move_(
        &self,
        _: CallContext,
        step: multi::player::Step,
    ) -> Result<multi::player::Position, HandlerError> {
        use multi::player::Direction;
        let from = step.from.unwrap_or_default();
        let (dx, dy) = match step.direction() {
            Direction::North => (0, 1),
            Direction::East => (1, 0),
            Direction::South => (0, -1),
            Direction::West => (-1, 0),
        };
        Ok(multi::player::Position {
            x: from.x + dx,
            y: from.y + dy,
        })
    }

    async fn leave(&self, _: CallContext, p: multi::Player) -> Result<multi::Count, HandlerError> {
        self.left.lock().unwrap().push(p.name);
        Ok(multi::Count {
            players: self.seats.load(Ordering::SeqCst) - self.left.lock().unwrap().len() as u32,
        })
    }
}

struct ChatA;
impl a::ChatServer for ChatA {
    async fn send(&self, _: CallContext, line: a::Line) -> Result<a::Ack, HandlerError> {
        Ok(a::Ack {
            by: format!("a:{}", line.text),
        })
    }
}

struct ChatB;
impl b::ChatServer for ChatB {
    async fn send(&self, _: CallContext, line: b::Line) -> Result<b::Ack, HandlerError> {
        Ok(b::Ack {
            by: format!("b:{}", line.emote),
        })
    }
}

struct Echo;
impl echo::EchoServer for Echo {
    async fn call(
        &self,
        ctx: CallContext,
        r: echo::Request,
    ) -> Result<echo::Response, HandlerError> {
        Ok(echo::Response {
            msg: format!("{} from {}", r.msg, ctx.from()),
        })
    }
}

struct Shop;
impl shop::ShopServer for Shop {
    async fn buy(&self, _: CallContext, m: common::Money) -> Result<common::Receipt, HandlerError> {
        let item = match m.gold {
            10 => "sword",
            3 => "potion",
            _ => return Err(HandlerError::new(402, format!("nothing costs {}", m.gold))),
        };
        Ok(common::Receipt {
            paid: m.gold,
            item: item.into(),
        })
    }
}

#[tokio::test]
async fn generated_services_work_across_two_nodes() {
    init_tracing();
    let mut c = Cluster::new(&["1.1.1", "1.2.1"]);
    let (joined_tx, mut joined) = tokio::sync::mpsc::channel(4);
    let server = c
        .start("1.2.1", move |builder| {
            // Any generated message can also travel one-way, typed.
            let builder = builder.on_message(move |ctx, p: multi::Player| {
                joined_tx.try_send((ctx.from(), p.name)).unwrap();
            });
            let builder = multi::register_game(builder, Room::default());
            let builder = a::register_chat(builder, ChatA);
            let builder = b::register_chat(builder, ChatB);
            let builder = echo::register_echo(builder, Echo);
            shop::register_shop(builder, Shop)
        })
        .await;
    let client = c.start("1.1.1", |b| b).await;
    let to = server.addr();

    // A multi-method service with nested types.
    let game = multi::GameClient::new(&client, to);
    assert_eq!(game.target(), to);
    let ann = multi::Player { name: "ann".into() };
    assert_eq!(within(game.join(&ann)).await.unwrap().number, 1);
    let seat = within(game.join_timeout(
        &multi::Player { name: "bob".into() },
        Duration::from_secs(1),
    ))
    .await
    .unwrap();
    assert_eq!(seat.number, 2);
    let e = within(game.join(&multi::Player::default()))
        .await
        .unwrap_err();
    assert_eq!(
        e,
        RpcError::Remote {
            to,
            code: ErrorCode(400),
            message: "a player needs a name".into()
        }
    );
    let step = multi::player::Step {
        name: "ann".into(),
        from: Some(multi::player::Position { x: 2, y: 5 }),
        direction: multi::player::Direction::West as i32,
    };
    assert_eq!(
        within(game.move_(&step)).await.unwrap(),
        multi::player::Position { x: 1, y: 5 }
    );
    let (tx, rx) = tokio::sync::oneshot::channel();
    game.leave_with_callback(&ann, Duration::from_secs(1), move |r| {
        tx.send(r).unwrap();
    });
    assert_eq!(within(rx).await.unwrap().unwrap().players, 1);
    within(game.post_leave(&multi::Player { name: "bob".into() }))
        .await
        .unwrap();
    // The one-way call was handled before this call, which follows it on the same link.
    let pos = within(game.move_timeout(&step, Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!(pos.x, 1);

    // Same service and method names in two packages: distinct wire names, no clash.
    let ack_a = within(a::ChatClient::new(&client, to).send(&a::Line { text: "hi".into() }))
        .await
        .unwrap();
    let ack_b = within(b::ChatClient::new(&client, to).send(&b::Line { emote: 7 }))
        .await
        .unwrap();
    assert_eq!((ack_a.by.as_str(), ack_b.by.as_str()), ("a:hi", "b:7"));
    let raw = within(client.call(to, "it.a.Chat/Send", clustergo::Bytes::new())).await;
    assert!(raw.is_ok(), "{raw:?}");

    // The seed's request/response convention.
    let reply =
        within(echo::EchoClient::new(&client, to).call(&echo::Request { msg: "yo".into() }))
            .await
            .unwrap();
    assert_eq!(reply.msg, "yo from 1.1.1");

    // A typed one-way message.
    within(client.send_message(to, &multi::Player { name: "zed".into() }))
        .await
        .unwrap();
    assert_eq!(
        within(joined.recv()).await.unwrap(),
        (client.addr(), "zed".into())
    );

    // A service over imported messages.
    let shop = shop::ShopClient::new(&client, to);
    let receipt = within(shop.buy(&common::Money { gold: 10 })).await.unwrap();
    assert_eq!((receipt.paid, receipt.item.as_str()), (10, "sword"));
    let e = within(shop.buy(&common::Money { gold: 4 }))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            RpcError::Remote {
                code: ErrorCode(402),
                ..
            }
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn undecodable_requests_and_responses_are_typed_errors() {
    let mut c = Cluster::new(&["1.1.1", "1.2.1"]);
    let server = c
        .start("1.2.1", |b| {
            // A raw handler answering bytes that are not a Seat.
            b.rpc("it.multi.Game/Join", |_, _| async move {
                Ok::<_, HandlerError>(clustergo::Bytes::from_static(&[0xff, 0xff, 0xff]))
            })
        })
        .await;
    let server2 = c
        .start("1.1.1", |b| multi::register_game(b, Room::default()))
        .await;
    let e = within(
        multi::GameClient::new(&server2, server.addr()).join(&multi::Player { name: "x".into() }),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, RpcError::BadResponse { .. }), "{e:?}");
    // Garbage sent to a generated handler is answered BAD_REQUEST.
    let e = within(server.call(
        server2.addr(),
        "it.multi.Game/Join",
        clustergo::Bytes::from_static(&[0xff]),
    ))
    .await
    .unwrap_err();
    assert!(
        matches!(
            e,
            RpcError::Remote {
                code: ErrorCode::BAD_REQUEST,
                ..
            }
        ),
        "{e:?}"
    );
}

struct Odd;
impl clustergo_build_it::it::edge::OddServer for Odd {
    async fn box_(
        &self,
        _: CallContext,
        r: clustergo_build_it::it::edge::S,
    ) -> Result<clustergo_build_it::it::edge::F, HandlerError> {
        Ok(clustergo_build_it::it::edge::F {
            f: format!("boxed {}", r.s),
        })
    }
    async fn clone(
        &self,
        _: CallContext,
        r: clustergo_build_it::it::edge::F,
    ) -> Result<clustergo_build_it::it::edge::S, HandlerError> {
        Ok(clustergo_build_it::it::edge::S {
            s: format!("cloned {}", r.f),
        })
    }
    async fn type_(
        &self,
        _: CallContext,
        (): (),
    ) -> Result<clustergo_build_it::it::edge::S, HandlerError> {
        Ok(clustergo_build_it::it::edge::S { s: "typed".into() })
    }
    async fn into_(
        &self,
        _: CallContext,
        r: clustergo_build_it::it::edge::S,
    ) -> Result<clustergo_build_it::it::edge::S, HandlerError> {
        Ok(r)
    }
}

#[tokio::test]
async fn names_that_collide_with_rust_still_work() {
    use clustergo_build_it::it::edge::{self, OddClient};
    let mut c = Cluster::new(&["1.1.1", "1.2.1"]);
    let server = c
        .start("1.2.1", |b| {
            edge::register_odd(edge::register_nothing(b, Nothing), Odd)
        })
        .await;
    let client = c.start("1.1.1", |b| b).await;
    let odd = OddClient::new(&client, server.addr());
    assert_eq!(
        within(odd.box_(&edge::S { s: "x".into() }))
            .await
            .unwrap()
            .f,
        "boxed x"
    );
    assert_eq!(
        within(odd.clone_timeout(&edge::F { f: "y".into() }, Duration::from_secs(1)))
            .await
            .unwrap()
            .s,
        "cloned y"
    );
    assert_eq!(within(odd.type_(&())).await.unwrap().s, "typed");
    within(odd.post_into(&edge::S::default())).await.unwrap();
    assert_eq!(
        within(odd.into_(&edge::S { s: "z".into() }))
            .await
            .unwrap()
            .s,
        "z"
    );
    assert_eq!(
        within(odd.clone(&edge::F { f: "w".into() }))
            .await
            .unwrap()
            .s,
        "cloned w"
    );
}

struct Nothing;
impl clustergo_build_it::it::edge::NothingServer for Nothing {}
