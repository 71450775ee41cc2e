//! The gateway's metrics on its admin listener (`admin_listen`), beside its node's: clients
//! by transport, admissions and turn-aways, frames and bytes each way, how sessions ended and
//! how long they lasted. Label values are fixed sets (transports, directions, reasons); no
//! client address is ever a label.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

use crate::state::Gateway;

/// The transports, as the `transport` label says them (the names the listeners give their
/// clients).
pub(crate) const TRANSPORTS: [&str; 5] = ["tcp", "tls", "ws", "wss", "kcp"];

/// How a session ended, as the `reason` label says it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ended {
    ClientLeft,
    ClientFault,
    ServerClosed,
    ServerFailed,
    Shutdown,
    Drained,
    /// Past its handshake but over the gateway's or its address's client cap.
    TurnedAway,
    /// No game server could take it.
    NoServer,
}

const ENDED: [(Ended, &str); 8] = [
    (Ended::ClientLeft, "client_left"),
    (Ended::ClientFault, "client_fault"),
    (Ended::ServerClosed, "server_ended"),
    (Ended::ServerFailed, "server_failed"),
    (Ended::Shutdown, "shutdown"),
    (Ended::Drained, "drained"),
    (Ended::TurnedAway, "turned_away"),
    (Ended::NoServer, "no_server"),
];

impl Ended {
    /// The `reason` label of this end.
    pub(crate) fn as_str(self) -> &'static str {
        ENDED[self as usize].1
    }
}

fn transport_index(t: &str) -> usize {
    // Every listener names its clients from TRANSPORTS; a new one must be added there (the
    // gateway's metrics test covers each).
    debug_assert!(
        TRANSPORTS.contains(&t),
        "transport {t:?} missing from TRANSPORTS"
    );
    TRANSPORTS.iter().position(|x| *x == t).unwrap_or(0)
}

type TransportLabel = [(&'static str, &'static str); 1];

/// Counters and gauges the sessions keep (atomics), and the session duration histograms.
#[derive(Debug)]
pub(crate) struct Metrics {
    clients: [AtomicU64; TRANSPORTS.len()],
    ended: [AtomicU64; ENDED.len()],
    pub(crate) bytes_up: AtomicU64,
    pub(crate) bytes_down: AtomicU64,
    durations: Family<TransportLabel, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            clients: Default::default(),
            ended: Default::default(),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            durations: Family::new_with_constructor(|| {
                Histogram::new([0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 14400.0])
            }),
        }
    }
}

/// Counts a client while it lives.
#[derive(Debug)]
pub(crate) struct ClientGauge<'a>(&'a AtomicU64);

impl Drop for ClientGauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// A client of `transport` is connected until the guard drops.
    pub(crate) fn client(&self, transport: &str) -> ClientGauge<'_> {
        let c = &self.clients[transport_index(transport)];
        c.fetch_add(1, Ordering::Relaxed);
        ClientGauge(c)
    }

    /// A session ended (`lasted`: from accept to now, for a session that reached a game
    /// server).
    pub(crate) fn ended(&self, how: Ended, transport: &str, lasted: Option<Duration>) {
        self.ended[how as usize].fetch_add(1, Ordering::Relaxed);
        if let Some(d) = lasted {
            let t = TRANSPORTS[transport_index(transport)];
            self.durations
                .get_or_create(&[("transport", t)])
                .observe(d.as_secs_f64());
        }
    }
}

/// Encodes the gateway's metrics at scrape time.
#[derive(Debug)]
pub(crate) struct GatewayCollector(pub(crate) Arc<Gateway>);

type Fmt = Result<(), std::fmt::Error>;

fn counter(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> Fmt {
    enc.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

fn counters<L: prometheus_client::encoding::EncodeLabelSet>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: &[(L, u64)],
) -> Fmt {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        m.encode_family(labels)?
            .encode_counter::<NoLabelSet, _, u64>(v, None)?;
    }
    Ok(())
}

impl Collector for GatewayCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Fmt {
        let gw = &self.0;
        let m = &gw.metrics;
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        {
            let mut g = enc.encode_descriptor(
                "clustergo_gateway_clients",
                "Clients connected now (past their first frame), by transport",
                None,
                MetricType::Gauge,
            )?;
            for (i, t) in TRANSPORTS.iter().enumerate() {
                let v = n(&m.clients[i]) as i64;
                g.encode_family(&[("transport", *t)])?.encode_gauge(&v)?;
            }
        }
        counter(
            &mut enc,
            "clustergo_gateway_accepted",
            "Connections admitted to their handshake",
            n(&gw.admission.accepted),
        )?;
        counters(
            &mut enc,
            "clustergo_gateway_turned_away",
            "Connections turned away before their handshake, by reason (the gateway's total caps, or their source's)",
            &[
                ([("reason", "busy")], n(&gw.admission.turned_away)),
                ([("reason", "source")], n(&gw.admission.turned_away_source)),
            ],
        )?;
        counters(
            &mut enc,
            "clustergo_gateway_frames",
            "Data frames relayed, by direction (up: client to game server)",
            &[
                ([("direction", "up")], n(&gw.stats.frames_up)),
                ([("direction", "down")], n(&gw.stats.frames_down)),
            ],
        )?;
        counters(
            &mut enc,
            "clustergo_gateway_bytes",
            "Frame payload bytes relayed, by direction",
            &[
                ([("direction", "up")], n(&m.bytes_up)),
                ([("direction", "down")], n(&m.bytes_down)),
            ],
        )?;
        let ended: Vec<_> = ENDED
            .iter()
            .map(|(e, r)| ([("reason", *r)], n(&m.ended[*e as usize])))
            .collect();
        counters(
            &mut enc,
            "clustergo_gateway_sessions_ended",
            "Sessions ended, by how",
            &ended,
        )?;
        counter(
            &mut enc,
            "clustergo_gateway_kcp_cookies",
            "KCP cookies sent (answers to HELLO)",
            n(&gw.stats.kcp_cookies),
        )?;
        counter(
            &mut enc,
            "clustergo_gateway_kcp_dropped",
            "KCP datagrams dropped (unknown conv, wrong source, bad cookie, malformed, full queue, over the cookie rate)",
            n(&gw.stats.kcp_dropped),
        )?;
        let d = enc.encode_descriptor(
            "clustergo_gateway_session_duration_seconds",
            "How long sessions lasted, from accept to their end, for those that reached a game server; by transport",
            None,
            MetricType::Histogram,
        )?;
        m.durations.encode(d)?;
        Ok(())
    }
}
