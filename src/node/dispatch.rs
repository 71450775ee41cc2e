//! Delivery of arriving envelopes: responses to waiting calls, requests to RPC handlers,
//! messages to message handlers. Also the local loop that carries self-sends, and the gRPC
//! service that admits links.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use tokio::time::Instant;

use super::inner::Inner;
use crate::addr::LogicAddr;
use crate::error::{ErrorCode, HandlerError};
use crate::link::{Outcome, reader::Deliver};
use crate::message::MessageContext;
use crate::proto::{Envelope, envelope::Body, message::Kind, response};
use crate::rpc::CallContext;
use crate::stats::Stats;
use crate::stream::Peer;

/// Payload bytes an envelope's body carries, as the size limit counts them.
pub(super) fn payload_len(body: &Option<Body>) -> usize {
    match body {
        Some(Body::Response(r)) => match &r.result {
            Some(response::Result::Payload(p)) => p.len(),
            _ => 0,
        },
        Some(Body::Request(r)) => r.payload.len(),
        Some(Body::Message(m)) => m.payload.len(),
        Some(Body::Data(d)) => d.data.len(),
        Some(Body::Open(o)) => crate::proto::meta_wire_size(&o.meta),
        _ => 0,
    }
}

impl Deliver for Inner {
    type Streams = crate::stream::Table;

    fn deliver(self: &Arc<Self>, peer: &Arc<Peer>, env: Envelope) -> Result<(), tonic::Status> {
        let limit = self.config.max_envelope;
        let len = payload_len(&env.body);
        if len > limit {
            return Err(tonic::Status::resource_exhausted(format!(
                "{} sent an envelope of {len} bytes, over the limit of {limit} bytes",
                peer.addr
            )));
        }
        let (Ok(to), Ok(from)) = (LogicAddr::from_u32(env.to), LogicAddr::from_u32(env.from))
        else {
            self.misaddressed(peer, &env);
            return Ok(());
        };
        // A peer that left membership may finish what is under way (answers, streams already
        // open), nothing new.
        if peer.is_leaving()
            && matches!(
                env.body,
                Some(Body::Request(_) | Body::Message(_) | Body::Open(_)) | None
            )
        {
            self.misaddressed(peer, &env);
            return Ok(());
        }
        if to != self.addr {
            // Traffic between clusters passes through harbors; nobody else relays, and a
            // harbor relays only what may come from its link (see `relayable`).
            if self.addr.is_harbor() && relayable(peer.addr, from, to) {
                self.forward(peer, env);
                return Ok(());
            }
            self.misaddressed(peer, &env);
            return Ok(());
        }
        // The original sender is the link's peer, or — through a harbor — a node of another
        // cluster: nobody can pass for a node of this node's own cluster.
        if from != peer.addr && !(peer.addr.is_harbor() && from.cluster() != self.addr.cluster()) {
            self.misaddressed(peer, &env);
            return Ok(());
        }
        match env.body {
            Some(Body::Response(r)) => {
                // A harbor on the path may answer for the callee, but only to say the call
                // cannot reach it (no route, link lost, next hop's queue full); any other
                // answer must come from the callee itself.
                let harbor_error = matches!(
                    &r.result,
                    Some(response::Result::Error(e))
                        if ErrorCode(e.code) == ErrorCode::NO_ROUTE
                            || ErrorCode(e.code) == ErrorCode::PEER_LOST
                            || ErrorCode(e.code) == ErrorCode::HOP_BUSY
                );
                let outcome = match r.result {
                    Some(response::Result::Payload(p)) => Outcome::Reply(p),
                    Some(response::Result::Error(e)) => Outcome::Remote {
                        code: e.code,
                        message: e.message,
                    },
                    None => Outcome::Remote {
                        code: ErrorCode::HANDLER.0,
                        message: "empty response".into(),
                    },
                };
                // A relayed answer may come back through another harbor than its request went
                // out by (the harbor set changed, or the far side hashed differently): the
                // call waits on one of this cluster's harbors. Call ids are unique per node
                // and unguessable; an answer counts only from the node that was called.
                let waiting = peer.take_answer(r.id, from, harbor_error).or_else(|| {
                    (from != peer.addr)
                        .then(|| self.take_answer_at_harbors(r.id, from, harbor_error))
                        .flatten()
                });
                match waiting {
                    // The caller may have stopped waiting between lookup and send.
                    Some(tx) => drop(tx.send(outcome)),
                    None => {
                        Stats::incr(&self.stats.responses_orphaned);
                        tracing::debug!(peer = %peer.addr, %from, id = r.id, "an answer matched no call waiting for it from that node");
                    }
                }
            }
            Some(Body::Request(r)) => self.serve_request(peer, from, r, &env.trace),
            Some(Body::Message(m)) => self.handle_message(from, m, &env.trace),
            Some(
                body @ (Body::Open(_)
                | Body::Accept(_)
                | Body::Data(_)
                | Body::Window(_)
                | Body::Close(_)),
            ) => {
                self.deliver_stream(peer, from, body, &env.trace);
            }
            None => Stats::incr(&self.stats.envelopes_misaddressed),
        }
        Ok(())
    }
}

/// Whether a harbor may relay an envelope `from` → `to` that arrived over the link to `peer`:
/// an ordinary node only sends its own traffic (`from == peer`), a harbor only its own cluster's
/// (it checked its senders the same way), and only traffic between clusters is relayed.
fn relayable(peer: LogicAddr, from: LogicAddr, to: LogicAddr) -> bool {
    let sender_ok = if peer.is_harbor() {
        from.cluster() == peer.cluster()
    } else {
        from == peer
    };
    sender_ok && from.cluster() != to.cluster()
}

impl Inner {
    /// Takes call `id`, answered by `from`, from whichever harbor slot of this cluster holds it.
    fn take_answer_at_harbors(
        &self,
        id: u64,
        from: LogicAddr,
        harbor_error: bool,
    ) -> Option<tokio::sync::oneshot::Sender<Outcome>> {
        self.links
            .peer_list()
            .iter()
            .filter(|p| p.addr.is_harbor() && p.addr.cluster() == self.addr.cluster())
            .find_map(|p| p.take_answer(id, from, harbor_error))
    }

    fn misaddressed(&self, peer: &Peer, env: &Envelope) {
        Stats::incr(&self.stats.envelopes_misaddressed);
        tracing::debug!(
            peer = %peer.addr, to = env.to, from = env.from,
            "dropped an envelope not addressed from this link's peer to this node"
        );
    }
}

impl Inner {
    fn serve_request(
        self: &Arc<Self>,
        peer: &Arc<Peer>,
        from: LogicAddr,
        r: crate::proto::Request,
        trace: &[u8],
    ) {
        Stats::incr(&self.stats.requests_received);
        // The caller's span is this one's parent (fields are formatted only if enabled).
        let span = tracing::debug_span!(
            target: crate::trace::TARGET,
            "rpc.server",
            otel.name = %r.method,
            otel.kind = "server",
            rpc.system = "clustergo",
            rpc.method = %r.method,
            clustergo.from = %from,
            clustergo.to = %self.addr,
        );
        crate::trace::set_parent(&span, trace);
        let _in_span = span.enter();
        // One clock read: the handler's deadline and the start of the call's duration.
        let received = Instant::now();
        let ctx = CallContext {
            node: super::Node {
                inner: self.clone(),
            },
            from,
            deadline: (r.timeout_ms > 0)
                .then(|| received + std::time::Duration::from_millis(r.timeout_ms.into())),
            oneway: r.oneway,
            method: r.method,
        };
        if !self.takes_new() {
            if let Some(calls) = &self.server.calls {
                let slot = self.rpcs.get(&ctx.method).map_or(0, |(_, s)| *s);
                calls.record(slot, crate::metrics::Outcome::Shutdown, received.elapsed());
            }
            if !ctx.oneway {
                self.server.respond(
                    peer,
                    ctx.from,
                    r.id,
                    ctx.deadline,
                    Err(HandlerError {
                        code: ErrorCode::SHUTDOWN,
                        message: format!("{} is shutting down", self.addr),
                    }),
                    false,
                );
            }
            return;
        }
        let handler = self.rpcs.get(&ctx.method).map(|(h, slot)| (h, *slot));
        self.server
            .serve(handler, peer, ctx, received, r.id, r.payload);
    }

    fn handle_message(self: &Arc<Self>, from: LogicAddr, m: crate::proto::Message, trace: &[u8]) {
        let span = tracing::debug_span!(
            target: crate::trace::TARGET,
            "message.receive",
            otel.kind = "consumer",
            rpc.system = "clustergo",
            clustergo.from = %from,
            clustergo.to = %self.addr,
        );
        crate::trace::set_parent(&span, trace);
        let _in_span = span.enter();
        let handler = match &m.kind {
            Some(Kind::Cmd(c)) => self.messages.by_cmd.get(c),
            Some(Kind::TypeName(t)) => self.messages.by_type.get(t),
            None => None,
        };
        let Some(handler) = handler else {
            Stats::incr(&self.stats.messages_unknown);
            tracing::warn!(%from, kind = ?m.kind, "no handler for message; dropped");
            return;
        };
        Stats::incr(&self.stats.messages_received);
        let ctx = MessageContext {
            from,
            node: super::Node {
                inner: self.clone(),
            },
        };
        match std::panic::catch_unwind(AssertUnwindSafe(|| handler(ctx, m.payload))) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                Stats::incr(&self.stats.messages_undecodable);
                tracing::warn!(%from, kind = ?m.kind, error = %e, "message did not decode; dropped");
            }
            Err(_) => tracing::error!(%from, kind = ?m.kind, "message handler panicked"),
        }
    }

    /// Carries what this node sends to itself: same queue, same order, same dispatch as a link,
    /// without a network hop and without running handlers inside the sender's call.
    pub(crate) async fn local_loop(self: Arc<Self>) {
        let peer = self.self_peer.clone();
        let mut buf = Vec::with_capacity(self.config.batch_envelopes);
        loop {
            let n = tokio::select! {
                _ = self.root.cancelled() => return,
                n = std::future::poll_fn(|cx| {
                    peer.rx().poll_recv_many(cx, &mut buf, self.config.batch_envelopes)
                }) => n,
            };
            if n == 0 {
                return;
            }
            let now = Instant::now();
            for item in buf.drain(..) {
                if item.deadline.is_some_and(|d| d <= now) {
                    peer.expire(item, &self.stats);
                } else if let Err(status) = self.deliver(&peer, item.env) {
                    tracing::warn!(reason = status.message(), "dropped a self-sent envelope");
                }
            }
        }
    }
}

/// The gRPC face of a node: admits links.
pub(crate) struct MeshService {
    pub(crate) inner: Arc<Inner>,
}

#[tonic::async_trait]
impl crate::proto::mesh_server::Mesh for MeshService {
    type LinkStream = crate::link::accept::LinkStream;

    async fn link(
        &self,
        req: tonic::Request<tonic::Streaming<crate::proto::Batch>>,
    ) -> Result<tonic::Response<Self::LinkStream>, tonic::Status> {
        crate::link::accept::accept(&self.inner, req)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use proptest::prelude::*;
    use prost::Message as _;

    use super::*;
    use crate::node::Node;
    use crate::proto::{Batch, Envelope, Request, Response, envelope::Body, message::Kind};

    fn node() -> (Arc<Inner>, Arc<Peer>) {
        let me: LogicAddr = "1.1.1".parse().unwrap();
        let peer_addr: LogicAddr = "1.1.2".parse().unwrap();
        let node = Node::builder(me)
            .rpc_with_replyer("m", |_, p, r| r.reply(Ok(p)))
            .on_cmd(crate::Cmd(1), |_, _| {})
            .on_stream(|_| async {})
            .config(
                crate::NodeConfig::default()
                    .max_envelope(1024)
                    .stream_window(2048)
                    .max_streams(3),
            )
            .build();
        let inner = node.inner_arc();
        // Running, so stream opens are accepted (their handlers are spawned, never run).
        inner.set_phase(super::super::inner::Phase::Running);
        let peer = inner.new_peer(peer_addr);
        // As if a link were up: streams may be added.
        peer.streams.reopen();
        (inner, peer)
    }

    fn envelope(to: u32, from: u32, body: u8, id: u64, text: String, payload: Vec<u8>) -> Envelope {
        let payload = Bytes::from(payload);
        // Stream bodies name a few ids, so they hit streams earlier envelopes opened.
        let (sid, to_opener) = (id % 4, id & 4 != 0);
        let body = match body % 10 {
            0 => Some(Body::Request(Request {
                id,
                method: text,
                payload,
                timeout_ms: id as u32,
                oneway: id % 2 == 0,
            })),
            1 => Some(Body::Response(Response {
                id,
                result: Some(crate::proto::response::Result::Payload(payload)),
            })),
            2 => Some(Body::Message(crate::proto::Message {
                kind: Some(if id % 2 == 0 {
                    Kind::Cmd(id as u32)
                } else {
                    Kind::TypeName(text)
                }),
                payload,
            })),
            3 => Some(Body::Message(crate::proto::Message {
                kind: None,
                payload,
            })),
            4 => None,
            5 => Some(Body::Open(crate::proto::StreamOpen {
                id: sid,
                window: id as u32,
                meta: vec![crate::proto::StreamMeta {
                    key: text,
                    value: String::from_utf8_lossy(&payload).into_owned(),
                }],
            })),
            6 => Some(Body::Data(crate::proto::StreamData {
                id: sid,
                to_opener,
                data: payload,
                fin: id & 8 != 0,
            })),
            7 => Some(Body::Window(crate::proto::StreamWindow {
                id: sid,
                to_opener,
                credit: (id >> 8) as u32,
            })),
            8 => Some(Body::Close(crate::proto::StreamClose {
                id: sid,
                to_opener,
                code: (id >> 8) as u32,
                reason: text,
            })),
            _ => Some(Body::Accept(crate::proto::StreamAccept {
                id: sid,
                window: (id >> 8) as u32,
            })),
        };
        Envelope {
            to,
            from,
            hops: 0,
            trace: Bytes::new(),
            body,
        }
    }

    proptest! {
        /// Whatever a peer sends — calls, messages, stream envelopes for streams that exist or
        /// not, with any window or credit — delivery never panics; an oversize payload closes
        /// the link (an error), nothing else does.
        #[test]
        fn delivery_never_panics(
            raw in proptest::collection::vec(any::<u8>(), 0..512),
            picks in proptest::collection::vec(
                (any::<bool>(), any::<u8>(), any::<u64>(), "\\PC{0,12}", proptest::collection::vec(any::<u8>(), 0..1500)),
                0..16,
            ),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let _in_runtime = rt.enter();
            let (inner, peer) = node();
            // Arbitrary bytes as a batch: decode errors are the transport's; whatever decodes
            // is delivered.
            if let Ok(batch) = Batch::decode(&raw[..]) {
                for env in batch.envelopes {
                    let _ = inner.deliver(&peer, env);
                }
            }
            for (addressed, body, id, text, payload) in picks {
                let (to, from) = if addressed {
                    (inner.addr.as_u32(), peer.addr.as_u32())
                } else {
                    (id as u32, (id >> 32) as u32)
                };
                let env = envelope(to, from, body, id, text, payload);
                let oversize = match &env.body {
                    Some(Body::Request(r)) => r.payload.len() > 1024,
                    Some(Body::Response(r)) => match &r.result {
                        Some(crate::proto::response::Result::Payload(p)) => p.len() > 1024,
                        _ => false,
                    },
                    Some(Body::Message(m)) => m.payload.len() > 1024,
                    Some(Body::Data(d)) => d.data.len() > 1024,
                    Some(Body::Open(o)) => {
                        crate::proto::meta_wire_size(&o.meta) > 1024
                    }
                    _ => false,
                };
                let carries = env.body.is_some();
                let r = inner.deliver(&peer, env);
                // Size is checked before addressing: an oversize envelope is a protocol
                // violation whoever it names.
                prop_assert_eq!(r.is_err(), oversize && carries);
            }
        }
    }
}
