//! The generated wire types and gRPC service of `proto/mesh.proto`.
#![allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all
)]

tonic::include_proto!("clustergo.mesh.v1");

mod batch;
pub(crate) mod codec;
pub use batch::{Batch, MAX_BATCH_ENVELOPES};

/// Bytes counted per stream-open metadata entry on top of its key and value: at least what
/// protobuf spends framing it, so many empty entries cannot slip a huge open under the size
/// limit.
pub(crate) const META_ENTRY_OVERHEAD: usize = 8;

/// Wire size of stream-open metadata as the size limits count it.
pub(crate) fn meta_wire_size(meta: &[StreamMeta]) -> usize {
    meta.iter()
        .map(|m| m.key.len() + m.value.len() + META_ENTRY_OVERHEAD)
        .sum()
}

/// Rough wire size of an envelope, for the batch byte limit.
pub(crate) fn approx_size(body: &Option<envelope::Body>) -> usize {
    const HEADER: usize = 24;
    HEADER
        + match body {
            Some(envelope::Body::Request(r)) => r.payload.len() + r.method.len(),
            Some(envelope::Body::Response(r)) => match &r.result {
                Some(response::Result::Payload(p)) => p.len(),
                Some(response::Result::Error(e)) => e.message.len(),
                None => 0,
            },
            Some(envelope::Body::Message(m)) => {
                m.payload.len()
                    + match &m.kind {
                        Some(message::Kind::TypeName(t)) => t.len(),
                        _ => 0,
                    }
            }
            Some(envelope::Body::Data(d)) => d.data.len(),
            Some(envelope::Body::Open(o)) => crate::proto::meta_wire_size(&o.meta),
            Some(envelope::Body::Close(c)) => c.reason.len(),
            _ => 0,
        }
}

impl Envelope {
    /// An envelope this node originates from `from` to `to`: the one place envelopes are
    /// built (relayed ones are forwarded as they came, with one more hop), so what every
    /// envelope carries besides its body (the hop count, and the sender's trace context when
    /// tracing is built) is set here alone.
    pub(crate) fn originate(to: u32, from: u32, body: envelope::Body) -> Envelope {
        Envelope {
            to,
            from,
            hops: 0,
            trace: crate::trace::current(),
            body: Some(body),
        }
    }
}
