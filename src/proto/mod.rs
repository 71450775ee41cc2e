//! The generated wire types and gRPC service of `proto/mesh.proto`.
#![allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all
)]

tonic::include_proto!("clustergo.mesh.v1");

mod batch;
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
