//! Counters an operator asks for first. Cheap relaxed atomics, read as a [`StatsSnapshot`].

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        #[derive(Debug, Default)]
        pub(crate) struct Stats {
            $(pub(crate) $name: AtomicU64,)*
        }

        impl Stats {
            pub(crate) fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }

        /// A copy of a node's counters at one moment.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct StatsSnapshot {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        impl StatsSnapshot {
            /// Every counter: its name, its description, its value.
            #[cfg_attr(not(feature = "admin"), allow(dead_code))]
            pub(crate) fn each(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($name), concat!($($doc, "\n",)*), self.$name),)*]
            }
        }
    };
}

counters! {
    /// Links that came up (dialed or accepted).
    links_opened,
    /// Links that went down.
    links_closed,
    /// Inbound links refused (secret, certificate, membership, shutting down).
    links_refused,
    /// Connections closed at once on accept: too many awaiting admission (from their address,
    /// or in all).
    connections_refused,
    /// Connections closed because no link was admitted on them within the dial timeout.
    connections_timed_out,
    /// Dials started.
    dials_started,
    /// Dials that failed (all reasons).
    dials_failed,
    /// Dials the peer refused (secret, certificate, membership, shutting down).
    dial_failures_refused,
    /// Dials that timed out (connecting, or waiting for the peer's answer).
    dial_failures_timeout,
    /// Dials that could not connect or lost the connection during the handshake.
    dial_failures_unreachable,
    /// Dials that lost a simultaneous dial and whose peer's link never arrived.
    dial_failures_simultaneous,
    /// RPC requests this node's handlers received.
    requests_received,
    /// Requests answered `Busy` (over the concurrency limit).
    requests_busy,
    /// Responses this node could not queue back to the caller (its queue stayed full).
    responses_dropped,
    /// Responses that matched no waiting call (it had timed out or been cancelled).
    responses_orphaned,
    /// One-way messages handed to a handler.
    messages_received,
    /// Messages with no handler for their type or command.
    messages_unknown,
    /// Messages whose payload did not decode as the handler's type.
    messages_undecodable,
    /// Envelopes dropped because they expired in a queue.
    envelopes_expired,
    /// Envelopes dropped when their link went down or their peer left membership.
    envelopes_lost,
    /// Envelopes written on a link that ended before the peer confirmed receiving them (each
    /// side acknowledges what it received with its own traffic, or within about 100 ms when it
    /// has none; a link that ends in order confirms everything first): they may or may not
    /// have arrived. Callers of two-way requests among them were told (`PeerLost`, or
    /// `Shutdown`); one-way requests and messages among them may be lost. Never counted for a
    /// peer that does not acknowledge (an older version).
    envelopes_unconfirmed,
    /// Envelopes dropped as misaddressed (wrong `to`, or `from` not the link's peer).
    envelopes_misaddressed,
    /// Envelopes this harbor forwarded for other nodes.
    envelopes_forwarded,
    /// Envelopes this harbor could not forward (no route, hop limit, link failed); requests
    /// among them were answered with the reason.
    envelopes_unroutable,
    /// Envelopes this harbor did not forward because the queue toward their next hop was full:
    /// requests among them were answered `HOP_BUSY`, streams reset, messages dropped. The
    /// reader never waits for room, so other destinations keep flowing.
    envelopes_hop_busy,
    /// Streams this node opened that the peer accepted.
    streams_opened,
    /// Streams peers opened that this node accepted.
    streams_accepted,
    /// Stream opens this node refused (no acceptor, shutting down, too many streams).
    streams_refused,
    /// Streams peers ended abnormally: reset, dropped before closing, shut down, overran a
    /// window, timed out an open (refusals are counted by the refusing side only).
    streams_reset,
    /// Stream envelopes for a stream this node no longer knows (closed or reset meanwhile).
    stream_envelopes_unknown,
    /// Stream closes and refusals dropped on a full queue (the far end learns of the end at
    /// its own timeout instead).
    closes_dropped,
    /// Streams open now (a gauge, not a counter).
    streams_active,
    /// Requests sent on links (this node's and relayed ones).
    envelopes_sent_request,
    /// Responses sent on links.
    envelopes_sent_response,
    /// One-way messages sent on links.
    envelopes_sent_message,
    /// Stream envelopes (open, data, close) sent on links.
    envelopes_sent_stream,
    /// Approximate bytes of requests sent (payload, method, a fixed header).
    bytes_sent_request,
    /// Approximate bytes of responses sent.
    bytes_sent_response,
    /// Approximate bytes of messages sent.
    bytes_sent_message,
    /// Approximate bytes of stream envelopes sent.
    bytes_sent_stream,
    /// Requests received on links.
    envelopes_received_request,
    /// Responses received on links.
    envelopes_received_response,
    /// One-way messages received on links.
    envelopes_received_message,
    /// Stream envelopes received on links.
    envelopes_received_stream,
    /// Approximate bytes of requests received.
    bytes_received_request,
    /// Approximate bytes of responses received.
    bytes_received_response,
    /// Approximate bytes of messages received.
    bytes_received_message,
    /// Approximate bytes of stream envelopes received.
    bytes_received_stream,
}

impl Stats {
    pub(crate) fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Which way a batch went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Sent,
    Received,
}

impl Stats {
    /// Counts the envelopes and approximate bytes of one batch by kind: added up locally,
    /// then at most eight atomic adds per batch.
    pub(crate) fn count_batch(&self, dir: Direction, envelopes: &[crate::proto::Envelope]) {
        use crate::proto::envelope::Body;
        let mut n = [0u64; 4];
        let mut b = [0u64; 4];
        for env in envelopes {
            let k = match &env.body {
                Some(Body::Request(_)) => 0,
                Some(Body::Response(_)) => 1,
                Some(Body::Message(_)) => 2,
                Some(Body::Open(_) | Body::Data(_) | Body::Close(_)) => 3,
                _ => continue,
            };
            n[k] += 1;
            b[k] += crate::proto::approx_size(&env.body) as u64;
        }
        let (envs, bytes) = match dir {
            Direction::Sent => (
                [
                    &self.envelopes_sent_request,
                    &self.envelopes_sent_response,
                    &self.envelopes_sent_message,
                    &self.envelopes_sent_stream,
                ],
                [
                    &self.bytes_sent_request,
                    &self.bytes_sent_response,
                    &self.bytes_sent_message,
                    &self.bytes_sent_stream,
                ],
            ),
            Direction::Received => (
                [
                    &self.envelopes_received_request,
                    &self.envelopes_received_response,
                    &self.envelopes_received_message,
                    &self.envelopes_received_stream,
                ],
                [
                    &self.bytes_received_request,
                    &self.bytes_received_response,
                    &self.bytes_received_message,
                    &self.bytes_received_stream,
                ],
            ),
        };
        for k in 0..4 {
            if n[k] > 0 {
                envs[k].fetch_add(n[k], Ordering::Relaxed);
                bytes[k].fetch_add(b[k], Ordering::Relaxed);
            }
        }
    }
}
