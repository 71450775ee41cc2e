//! One gRPC message of a link: a batch of envelopes, and the dialer's proof in its first one.
//!
//! Written by hand rather than generated, so that decoding is bounded by what a batch may cost
//! in memory, not only by its size on the wire: an empty envelope is 2 bytes on the wire and
//! well over 100 in memory, so a 1 MB batch of them would cost ~75 MB. Past
//! [`MAX_BATCH_ENVELOPES`] envelopes, the rest of a batch is skipped without being decoded
//! and counted in [`Batch::over_limit`]; the reader then ends the link with
//! `RESOURCE_EXHAUSTED`.

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{DecodeContext, WireType, message, skip_field};

use crate::proto::Envelope;

/// The most envelopes one batch may carry. A writer fills batches to
/// [`NodeConfig::batch_envelopes`](crate::NodeConfig::batch_envelopes), which must stay below
/// half of this (streams may add a few past the writer's own count).
pub const MAX_BATCH_ENVELOPES: usize = 8192;

/// A batch of envelopes (`clustergo.mesh.v1.Batch`).
#[derive(Clone, PartialEq, Default, Debug)]
pub struct Batch {
    /// The envelopes, in the order they were queued.
    pub envelopes: Vec<Envelope>,
    /// The dialer's answer to the acceptor's challenge; only in the dialer's first batch
    /// (see `link::auth`).
    pub proof: Bytes,
    /// How many envelopes the sender of this batch has received on this link so far: its
    /// acknowledgement of the other side's traffic (0: nothing to say). See
    /// [`StatsSnapshot::envelopes_unconfirmed`](crate::StatsSnapshot::envelopes_unconfirmed).
    pub received: u64,
    /// Envelopes past [`MAX_BATCH_ENVELOPES`] that were skipped while decoding (not on the
    /// wire).
    pub over_limit: usize,
}

const ENVELOPES: u32 = 1;
const PROOF: u32 = 2;
const RECEIVED: u32 = 3;

impl prost::Message for Batch {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        message::encode_repeated(ENVELOPES, &self.envelopes, buf);
        if !self.proof.is_empty() {
            prost::encoding::bytes::encode(PROOF, &self.proof, buf);
        }
        if self.received != 0 {
            prost::encoding::uint64::encode(RECEIVED, &self.received, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        match tag {
            ENVELOPES if self.envelopes.len() >= MAX_BATCH_ENVELOPES => {
                self.over_limit += 1;
                skip_field(wire_type, tag, buf, ctx)
            }
            ENVELOPES => message::merge_repeated(wire_type, &mut self.envelopes, buf, ctx),
            PROOF => prost::encoding::bytes::merge(wire_type, &mut self.proof, buf, ctx),
            RECEIVED => prost::encoding::uint64::merge(wire_type, &mut self.received, buf, ctx),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        message::encoded_len_repeated(ENVELOPES, &self.envelopes)
            + if self.proof.is_empty() {
                0
            } else {
                prost::encoding::bytes::encoded_len(PROOF, &self.proof)
            }
            + if self.received == 0 {
                0
            } else {
                prost::encoding::uint64::encoded_len(RECEIVED, &self.received)
            }
    }

    fn clear(&mut self) {
        self.envelopes.clear();
        self.proof.clear();
        self.received = 0;
        self.over_limit = 0;
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    #[test]
    fn round_trip_and_the_envelope_cap() {
        let b = Batch {
            envelopes: vec![Envelope::default(); 3],
            proof: Bytes::from_static(b"p"),
            received: 1 << 40,
            over_limit: 0,
        };
        assert_eq!(Batch::decode(&b.encode_to_vec()[..]).unwrap(), b);
        // 580,000 empty envelopes: 1.16 MB on the wire. Only the first MAX are decoded.
        let wire: Vec<u8> = [0x0a, 0x00].repeat(580_000);
        let d = Batch::decode(&wire[..]).unwrap();
        assert_eq!(d.envelopes.len(), MAX_BATCH_ENVELOPES);
        assert_eq!(d.over_limit, 580_000 - MAX_BATCH_ENVELOPES);
        assert!(d.envelopes.capacity() <= 2 * MAX_BATCH_ENVELOPES);
    }
}
