//! Limits and timeouts of a node. Every capacity, window and timeout lives here with its default.

use std::time::Duration;

/// Environment variable that holds the cluster secret when none is set in code.
pub const SECRET_ENV: &str = "CLUSTERGO_SECRET";

/// The secret used when neither [`NodeConfig::secret`] nor [`SECRET_ENV`] is set.
///
/// It is public, so it keeps nothing out: fine on a developer's machine, never in production.
/// A node that falls back to it logs a warning at start; the `harbor` and `gateway` binaries
/// refuse to start on it unless run with `--insecure-dev`.
pub const DEV_SECRET: &[u8] = b"clustergo-development-secret";

/// The cluster secret for a binary (harbor, gateway, a game server's `main`): [`SECRET_ENV`]
/// if it is set and not empty. With no secret, it fails closed with a message that says how
/// to set one, unless `insecure_dev` (an explicit `--insecure-dev` switch) allows the public
/// [`DEV_SECRET`], which admits anyone who has read this documentation.
pub fn secret_from_env(insecure_dev: bool) -> Result<Vec<u8>, String> {
    binary_secret(insecure_dev, false)
}

/// As [`secret_from_env`], for a binary that may run links over mutual TLS: there the
/// certificates bind every node to its address, so a missing secret is allowed (the public
/// one then serves as the handshake key, and no warning is logged). Without mutual TLS, no
/// secret and no `insecure_dev` is an error.
pub fn binary_secret(insecure_dev: bool, mutual_tls: bool) -> Result<Vec<u8>, String> {
    match std::env::var(SECRET_ENV) {
        Ok(s) if !s.is_empty() => Ok(s.into_bytes()),
        _ if insecure_dev || mutual_tls => Ok(DEV_SECRET.to_vec()),
        _ => Err(format!(
            "no cluster secret: set {SECRET_ENV} (the same value on every node of the mesh), \
             or configure [mesh_tls] with mutual TLS; --insecure-dev runs on the public \
             development secret, for a developer's machine only"
        )),
    }
}

/// Configuration of a [`Node`](crate::Node). Build it with the `#[must_use]` setters, starting
/// from [`NodeConfig::default`].
#[derive(Clone)]
#[non_exhaustive]
pub struct NodeConfig {
    /// Timeout of [`Node::call`](crate::Node::call) when none is given. Default 5 s.
    pub call_timeout: Duration,
    /// How long a one-way message may wait, dial included, before it is dropped with a counted,
    /// logged reason; also how long `send_*` waits for room in a full queue. Default 1 s.
    pub send_timeout: Duration,
    /// Time to connect and be admitted by the peer. Default 3 s.
    pub dial_timeout: Duration,
    /// After a failed dial, the next dial to that peer waits this long (doubling after each
    /// failure up to [`NodeConfig::redial_backoff_max`]). What is sent meanwhile waits for that
    /// dial within its own deadline (calls: their timeout; messages: `send_timeout`) rather
    /// than failing with the previous dial's error; a membership change about the peer (listed
    /// again, available again) ends the wait at once, and so does a link the peer dials.
    /// Default 100 ms.
    pub redial_backoff: Duration,
    /// Upper bound of the redial backoff. Default 2 s.
    pub redial_backoff_max: Duration,
    /// How long [`Node::start`](crate::Node::start) waits for the first membership snapshot.
    /// Default 10 s.
    pub start_timeout: Duration,
    /// How long shutdown lets in-flight RPC handlers finish (and a harbor, the answers of the
    /// calls it relayed). Also how long a link to a peer that left membership is kept for what
    /// is under way on it (answers, streams already open; nothing new). Default 5 s.
    pub shutdown_grace: Duration,
    /// At shutdown, with a membership source that tracks liveness (etcd): after leaving
    /// membership, the node keeps serving everything that arrives until nothing new has
    /// arrived for this long (or the grace period ends). Peers learn that the node left
    /// through their own watch, a little later; a call one of them sent in that gap is served
    /// rather than failed. Zero turns the wait off. Default 500 ms. (Sources without liveness,
    /// such as files, cannot tell peers that the node leaves, so there is nothing to wait for.)
    pub drain_quiet: Duration,
    /// Whether calls are timed into the duration histograms by method and outcome (see
    /// `clustergo::admin`): a clock read at each end and a few relaxed atomic adds per call on
    /// each side (about 5 % of the throughput of empty handlers at 128 calls in flight; see
    /// BENCHMARKS.md). Counters and gauges cost nothing extra and stay. Default on.
    pub call_metrics: bool,
    /// Envelopes queued per peer, dialing or connected. A full queue fails `try_send_*` at once
    /// and makes `send_*` / calls wait up to their deadline. Default 8192.
    pub peer_queue: usize,
    /// Largest payload of one RPC request, response or message, in bytes. Larger sends fail with
    /// `TooLarge` at the sender; a larger envelope from a peer closes that link. Default 1 MiB.
    /// Keep it the same on every node of a cluster.
    pub max_envelope: usize,
    /// A writer stops adding envelopes to a batch once it holds this many bytes. Default 64 KiB.
    /// Batching never waits for a batch to fill. (256 KiB measured no better for bulk streams
    /// and worse for small messages.)
    pub batch_bytes: usize,
    /// A writer puts at most this many envelopes in one batch (at most 4096: peers refuse a
    /// batch of more than [`MAX_BATCH_ENVELOPES`](crate::proto::MAX_BATCH_ENVELOPES)). Default 1024.
    pub batch_envelopes: usize,
    /// RPC handlers running at once; a request over the limit is answered `Busy` at once.
    /// Default 10 000.
    pub max_concurrent_requests: usize,
    /// Interval of HTTP/2 keepalive pings on links. Default 3 s.
    ///
    /// With [`NodeConfig::keepalive_timeout`], the bound on noticing a peer that stopped
    /// answering while still listed (cut off by the network, frozen): its link is closed
    /// after about interval + timeout (measured: 10 s with the defaults, the first ping going
    /// out once the link has been quiet for an interval), so its streams end and a gateway
    /// moves its clients. (It was 10 s + 20 s: a game server cut off from its gateway for 20 s left its
    /// clients stalled for all of it; see `gateway/tests/faults`.)
    pub keepalive_interval: Duration,
    /// A link whose ping is not answered within this is closed. Default 5 s.
    pub keepalive_timeout: Duration,
    /// Connections accepted but not yet admitted as links, in all. Over it, new connections
    /// are closed at once (counted in `connections_refused`). Each must be admitted within
    /// [`NodeConfig::dial_timeout`] of its accept or it is closed. Default 1024.
    pub max_pending_connections: usize,
    /// Connections from one IP address accepted but not yet admitted. Over it, that
    /// address's new connections are closed at once, so a flood from one host cannot keep the
    /// rest out. Default 64.
    pub max_pending_per_source: usize,
    /// RPC handlers one caller (by logical address) may have running here at once; over it
    /// that caller gets `Busy`, so one caller cannot take the whole
    /// [`NodeConfig::max_concurrent_requests`]. Default 2500.
    pub max_requests_per_caller: usize,
    /// Bytes of metadata (keys and values) one stream open may carry. An open over it is
    /// refused. Default 4 KiB.
    pub max_stream_meta: usize,
    /// Bytes of metadata the open streams with one peer may hold in all; an open that would
    /// pass it is refused. Default 16 MiB: room for ~100,000 streams with a gateway's
    /// per-client metadata (~100–150 bytes each); raise it with
    /// [`NodeConfig::max_streams`] on a game server behind a busy gateway. (Through a harbor,
    /// every opener of another cluster shares the harbor's budget.)
    pub max_stream_meta_per_peer: usize,
    /// The cluster secret every node of the mesh shares. `None`: read [`SECRET_ENV`], else
    /// fall back to [`DEV_SECRET`] with a warning.
    pub secret: Option<Vec<u8>>,
    /// TLS on links (feature `tls`): `None` (the default) runs links over plain TCP. With
    /// [`LinkTls::mutual`](crate::LinkTls::from_pem), each side's certificate must name the
    /// address it claims; see [`LinkTls`](crate::LinkTls) for the rule. Every node of a mesh
    /// must use the same mode.
    #[cfg(feature = "tls")]
    pub tls: Option<crate::LinkTls>,
    /// Receive window of each stream: the most bytes a peer may send on a stream before its
    /// reader here takes them. A stream whose reader stops reading holds at most this much and
    /// stalls only itself. Default 256 KiB.
    ///
    /// Memory bound: `max_streams` × `stream_window` per peer if every reader stops.
    pub stream_window: u32,
    /// Bytes a stream buffers for the link's writer before writes wait; also the largest data
    /// envelope a stream sends. Small writes are coalesced up to this. Default 64 KiB; a
    /// smaller [`NodeConfig::max_envelope`] caps it.
    pub stream_buffer: usize,
    /// Streams open at once between this node and one peer, whichever side opened them. An
    /// open over the limit fails with `TooMany` here, or is refused by the peer. Default 8192.
    pub max_streams: usize,
    /// How long [`Node::open_stream`](crate::Node::open_stream) waits for the peer to accept,
    /// dial included. Default 5 s.
    pub stream_open_timeout: Duration,
    /// Largest HTTP/2 frame this node accepts on the links it admits (its SETTINGS to dialers),
    /// 16 KiB ..= 16 MiB - 1. Larger frames cut the writes per batch: on loopback, 1 MiB
    /// frames took a bulk stream from 1.25 to 2.1–2.4 GB/s (small messages: no change). Default 1 MiB. (The dialing side
    /// keeps HTTP/2's 16 KiB: tonic's client has no such setting.)
    pub link_frame_size: u32,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            call_timeout: Duration::from_secs(5),
            send_timeout: Duration::from_secs(1),
            dial_timeout: Duration::from_secs(3),
            redial_backoff: Duration::from_millis(100),
            redial_backoff_max: Duration::from_secs(2),
            start_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            drain_quiet: Duration::from_millis(500),
            call_metrics: true,
            peer_queue: 8192,
            max_envelope: 1 << 20,
            batch_bytes: 64 << 10,
            batch_envelopes: 1024,
            max_concurrent_requests: 10_000,
            keepalive_interval: Duration::from_secs(3),
            keepalive_timeout: Duration::from_secs(5),
            max_pending_connections: 1024,
            max_pending_per_source: 64,
            max_requests_per_caller: 2500,
            max_stream_meta: 4 << 10,
            max_stream_meta_per_peer: 16 << 20,
            secret: None,
            #[cfg(feature = "tls")]
            tls: None,
            stream_window: 256 << 10,
            stream_buffer: 64 << 10,
            max_streams: 8192,
            stream_open_timeout: Duration::from_secs(5),
            link_frame_size: 1 << 20,
        }
    }
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut f = f.debug_struct("NodeConfig");
        f.field("call_timeout", &self.call_timeout)
            .field("send_timeout", &self.send_timeout)
            .field("dial_timeout", &self.dial_timeout)
            .field("redial_backoff", &self.redial_backoff)
            .field("redial_backoff_max", &self.redial_backoff_max)
            .field("start_timeout", &self.start_timeout)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("drain_quiet", &self.drain_quiet)
            .field("peer_queue", &self.peer_queue)
            .field("max_envelope", &self.max_envelope)
            .field("batch_bytes", &self.batch_bytes)
            .field("batch_envelopes", &self.batch_envelopes)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .field("keepalive_interval", &self.keepalive_interval)
            .field("keepalive_timeout", &self.keepalive_timeout)
            .field("max_pending_connections", &self.max_pending_connections)
            .field("max_pending_per_source", &self.max_pending_per_source)
            .field("max_requests_per_caller", &self.max_requests_per_caller)
            .field("max_stream_meta", &self.max_stream_meta)
            .field("max_stream_meta_per_peer", &self.max_stream_meta_per_peer)
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .field("stream_window", &self.stream_window)
            .field("stream_buffer", &self.stream_buffer)
            .field("max_streams", &self.max_streams)
            .field("stream_open_timeout", &self.stream_open_timeout)
            .field("link_frame_size", &self.link_frame_size);
        #[cfg(feature = "tls")]
        f.field("tls", &self.tls);
        f.finish()
    }
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty;)*) => {
        impl NodeConfig {
            $(
                $(#[$doc])*
                #[must_use]
                pub fn $name(mut self, value: $ty) -> Self {
                    self.$name = value;
                    self
                }
            )*
        }
    };
}

setters! {
    /// Sets [`NodeConfig::call_timeout`].
    call_timeout: Duration;
    /// Sets [`NodeConfig::send_timeout`].
    send_timeout: Duration;
    /// Sets [`NodeConfig::dial_timeout`].
    dial_timeout: Duration;
    /// Sets [`NodeConfig::redial_backoff`].
    redial_backoff: Duration;
    /// Sets [`NodeConfig::redial_backoff_max`].
    redial_backoff_max: Duration;
    /// Sets [`NodeConfig::start_timeout`].
    start_timeout: Duration;
    /// Sets [`NodeConfig::shutdown_grace`].
    shutdown_grace: Duration;
    /// Sets [`NodeConfig::drain_quiet`].
    drain_quiet: Duration;
    /// Sets [`NodeConfig::call_metrics`].
    call_metrics: bool;
    /// Sets [`NodeConfig::peer_queue`].
    peer_queue: usize;
    /// Sets [`NodeConfig::max_envelope`].
    max_envelope: usize;
    /// Sets [`NodeConfig::batch_bytes`].
    batch_bytes: usize;
    /// Sets [`NodeConfig::batch_envelopes`].
    batch_envelopes: usize;
    /// Sets [`NodeConfig::max_concurrent_requests`].
    max_concurrent_requests: usize;
    /// Sets [`NodeConfig::keepalive_interval`].
    keepalive_interval: Duration;
    /// Sets [`NodeConfig::keepalive_timeout`].
    keepalive_timeout: Duration;
    /// Sets [`NodeConfig::max_pending_connections`].
    max_pending_connections: usize;
    /// Sets [`NodeConfig::max_pending_per_source`].
    max_pending_per_source: usize;
    /// Sets [`NodeConfig::max_requests_per_caller`].
    max_requests_per_caller: usize;
    /// Sets [`NodeConfig::max_stream_meta`].
    max_stream_meta: usize;
    /// Sets [`NodeConfig::max_stream_meta_per_peer`].
    max_stream_meta_per_peer: usize;
    /// Sets [`NodeConfig::stream_window`].
    stream_window: u32;
    /// Sets [`NodeConfig::stream_buffer`].
    stream_buffer: usize;
    /// Sets [`NodeConfig::max_streams`].
    max_streams: usize;
    /// Sets [`NodeConfig::stream_open_timeout`].
    stream_open_timeout: Duration;
    /// Sets [`NodeConfig::link_frame_size`].
    link_frame_size: u32;
}

impl NodeConfig {
    /// Sets the cluster secret shared by every node of the mesh.
    #[must_use]
    pub fn secret(mut self, secret: impl Into<Vec<u8>>) -> Self {
        self.secret = Some(secret.into());
        self
    }

    /// Runs links over TLS (see [`NodeConfig::tls`](NodeConfig#structfield.tls)).
    #[cfg(feature = "tls")]
    #[must_use]
    pub fn tls(mut self, tls: crate::LinkTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Whether dialers prove their address with a certificate (mutual TLS).
    pub(crate) fn mutual_tls(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.tls.as_ref().is_some_and(crate::LinkTls::is_mutual);
        #[cfg(not(feature = "tls"))]
        false
    }

    /// Largest gRPC message (one batch) this node accepts: a full batch plus one envelope at
    /// the size limit, with room for headers.
    pub(crate) fn stream_chunk(&self) -> usize {
        self.stream_buffer.min(self.max_envelope)
    }

    pub(crate) fn max_batch_message(&self) -> usize {
        self.batch_bytes + self.max_envelope + (64 << 10)
    }

    /// The secret in force, and whether it is the public development fallback.
    pub(crate) fn resolve_secret(&self) -> (Vec<u8>, bool) {
        let secret = match (&self.secret, std::env::var(SECRET_ENV)) {
            (Some(s), _) => s.clone(),
            (None, Ok(s)) if !s.is_empty() => s.into_bytes(),
            _ => DEV_SECRET.to_vec(),
        };
        // Set on purpose (`--insecure-dev`) or not, the public secret is worth a warning.
        let dev = secret == DEV_SECRET;
        (secret, dev)
    }

    /// Checks the values that would make a node misbehave.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let positive = [
            ("peer_queue", self.peer_queue),
            ("max_envelope", self.max_envelope),
            ("batch_bytes", self.batch_bytes),
            ("batch_envelopes", self.batch_envelopes),
            ("max_concurrent_requests", self.max_concurrent_requests),
            ("stream_window", self.stream_window as usize),
            ("stream_buffer", self.stream_buffer),
            ("max_streams", self.max_streams),
            ("max_pending_connections", self.max_pending_connections),
            ("max_pending_per_source", self.max_pending_per_source),
            ("max_requests_per_caller", self.max_requests_per_caller),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be greater than 0"));
            }
        }
        if self.max_envelope > (1 << 30) {
            return Err("max_envelope must be at most 1 GiB".into());
        }
        if !((1 << 14)..(1 << 24)).contains(&self.link_frame_size) {
            return Err(format!(
                "link_frame_size ({}) must be in 16384..=16777215 (HTTP/2's range)",
                self.link_frame_size
            ));
        }
        let cap = crate::proto::MAX_BATCH_ENVELOPES / 2;
        if self.batch_envelopes > cap {
            return Err(format!(
                "batch_envelopes ({}) must be at most {cap} (peers refuse batches of more than {} envelopes)",
                self.batch_envelopes,
                crate::proto::MAX_BATCH_ENVELOPES
            ));
        }
        if self.stream_window > (1 << 30) {
            return Err("stream_window must be at most 1 GiB".into());
        }
        Ok(())
    }
}
