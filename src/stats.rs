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
    /// Dials that failed.
    dials_failed,
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
}

impl Stats {
    pub(crate) fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
