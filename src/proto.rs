//! The generated wire types and gRPC service of `proto/mesh.proto`.
#![allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all
)]

tonic::include_proto!("clustergo.mesh.v1");

pub use crate::link::batch::{Batch, MAX_BATCH_ENVELOPES};
