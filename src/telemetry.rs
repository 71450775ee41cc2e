//! Log output and trace export for a binary in one call (cargo feature `telemetry`).
//!
//! ```no_run
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Inside the runtime (the OTLP exporter runs on it).
//! let telemetry = clustergo::telemetry::init("game-server")?;
//! // ... serve ...
//! telemetry.shutdown().await; // flushes what is not exported yet
//! # Ok(()) }
//! ```
//!
//! - Logs go to stderr, filtered by `RUST_LOG` (default `info`).
//! - Traces are exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, and not otherwise. The standard variables
//!   apply: `OTEL_SERVICE_NAME` (else the name given to [`init`]), `OTEL_RESOURCE_ATTRIBUTES`,
//!   `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`, `OTEL_BSP_SCHEDULE_DELAY` and the
//!   other batch settings, `OTEL_EXPORTER_OTLP_TIMEOUT`.
//! - Which spans are exported: `CLUSTERGO_TRACE_FILTER` (an `EnvFilter` directive list),
//!   default `clustergo::otel=debug,info`: the library's call, relay and message spans (see
//!   [`crate::trace`]) and your own spans at INFO and above.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// The OTLP exporter could not be built (e.g. a malformed endpoint).
    #[error("OTLP trace exporter: {0}")]
    Exporter(String),
    /// `CLUSTERGO_TRACE_FILTER` is not a valid filter.
    #[error("CLUSTERGO_TRACE_FILTER: {0}")]
    Filter(String),
    /// A global `tracing` subscriber was installed already.
    #[error("a tracing subscriber is installed already: {0}")]
    AlreadySet(String),
}

/// Keeps the exporter running; dropping it flushes the spans not exported yet (bounded by
/// the exporter's timeout).
#[derive(Debug)]
#[must_use = "dropping it stops the trace export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether traces are exported (an OTLP endpoint was configured).
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes the spans not exported yet and stops the export. The flush runs on a blocking
    /// thread while this task waits, so the runtime keeps driving the exporter's connection
    /// (dropping the guard on the only thread of a current-thread runtime would block the
    /// very export it waits for, until the exporter's timeout).
    pub async fn shutdown(self) {
        if self.provider.is_some() {
            let _ = tokio::task::spawn_blocking(move || drop(self)).await;
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("telemetry: flushing traces failed: {e}");
        }
    }
}

fn set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

/// Installs the global `tracing` subscriber: log output, plus trace export when an OTLP
/// endpoint is configured (see the module docs). Call it inside a Tokio runtime.
pub fn init(service: &str) -> Result<Telemetry, TelemetryError> {
    init_to(service, None)
}

/// As [`init`], exporting to `endpoint` (e.g. `http://127.0.0.1:4317`) when given, whatever
/// the environment says; `None` reads `OTEL_EXPORTER_OTLP_ENDPOINT` as [`init`] does.
pub fn init_to(service: &str, endpoint: Option<&str>) -> Result<Telemetry, TelemetryError> {
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")));
    let exporting = endpoint.is_some()
        || set("OTEL_EXPORTER_OTLP_ENDPOINT")
        || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    if !exporting {
        tracing_subscriber::registry()
            .with(logs)
            .try_init()
            .map_err(|e| TelemetryError::AlreadySet(e.to_string()))?;
        return Ok(Telemetry { provider: None });
    }
    let filter = std::env::var("CLUSTERGO_TRACE_FILTER")
        .unwrap_or_else(|_| format!("{}=debug,info", crate::trace::TARGET));
    let filter = EnvFilter::try_new(&filter).map_err(|e| TelemetryError::Filter(e.to_string()))?;
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if let Some(e) = endpoint {
        use opentelemetry_otlp::WithExportConfig as _;
        builder = builder.with_endpoint(e);
    }
    let exporter = builder
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let mut resource = Resource::builder();
    if !set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name(service.to_owned());
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let traces = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("clustergo"))
        .with_filter(filter);
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .map_err(|e| TelemetryError::AlreadySet(e.to_string()))?;
    crate::trace::propagate(true);
    Ok(Telemetry {
        provider: Some(provider),
    })
}
