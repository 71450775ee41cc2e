//! Trace context in envelopes (cargo feature `otel`): a request, a one-way message and a stream
//! open carry the sender's current span context as W3C `traceparent` text (and `tracestate`
//! after a newline) in the envelope's `trace` field; the receiver's span is its child, and each
//! harbor on the way adds a span of its own and passes its context on.
//!
//! Without the feature, or until `propagate` turns it on (`clustergo::telemetry` does when
//! it exports), the field stays empty: one relaxed load per envelope, no allocation and no
//! clock read on the hot path. The spans are `tracing` spans of target
//! [`TARGET`] at DEBUG level, named after the OpenTelemetry RPC conventions (`rpc.system`,
//! `rpc.method`, `otel.kind`, `otel.status_code`, `error.type`) plus `clustergo.from`,
//! `clustergo.to` and `clustergo.hops`; `clustergo::telemetry` exports them.
//!
//! A peer's `trace` field is hostile input: over `MAX_TRACE` (512) bytes, not UTF-8, not a valid
//! version-00 `traceparent`, or an all-zero id, it is ignored (the receiver's span then starts
//! a trace of its own).

use bytes::Bytes;

/// The `tracing` target of the spans this module's context links.
pub const TARGET: &str = "clustergo::otel";

/// Longest `trace` field read.
#[cfg_attr(not(feature = "otel"), allow(dead_code))]
pub(crate) const MAX_TRACE: usize = 512;

/// Whether outgoing envelopes carry the current span's context (see [`propagate`]).
#[cfg(feature = "otel")]
static PROPAGATE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns the propagation of trace context into outgoing envelopes on or off, for the whole
/// process. `clustergo::telemetry::init` turns it on when it installs an exporter; call it
/// yourself if you install a `tracing-opentelemetry` layer of your own. Off (the default),
/// sending costs one relaxed atomic load per envelope and nothing else. Receiving always
/// honours a context that arrives.
#[cfg(feature = "otel")]
pub fn propagate(on: bool) {
    PROPAGATE.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// The current span's context as a `trace` field; empty when there is none to pass on.
/// Inlined check, out-of-line work: off, an envelope is built in place as without the feature.
#[cfg(feature = "otel")]
#[inline]
pub(crate) fn current() -> Bytes {
    if !PROPAGATE.load(std::sync::atomic::Ordering::Relaxed) {
        return Bytes::new();
    }
    current_span_context()
}

#[cfg(feature = "otel")]
#[cold]
#[inline(never)]
fn current_span_context() -> Bytes {
    let span = tracing::Span::current();
    if span.is_disabled() {
        return Bytes::new();
    }
    encode(&span)
}

/// The current span's context as a `trace` field: always empty without the `otel` feature.
#[cfg(not(feature = "otel"))]
#[inline]
pub(crate) fn current() -> Bytes {
    Bytes::new()
}

/// `span`'s context as a `trace` field (empty if it has no valid OpenTelemetry context).
#[cfg(feature = "otel")]
pub(crate) fn encode(span: &tracing::Span) -> Bytes {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() {
        return Bytes::new();
    }
    let mut text = format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    );
    let state = sc.trace_state().header();
    if !state.is_empty() && text.len() + 1 + state.len() <= MAX_TRACE {
        text.push('\n');
        text.push_str(&state);
    }
    Bytes::from(text)
}

/// Makes `span` the child of the context in `trace` (a received envelope's), if it holds one.
#[cfg(feature = "otel")]
pub(crate) fn set_parent(span: &tracing::Span, trace: &[u8]) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if trace.is_empty() || span.is_disabled() {
        return;
    }
    if let Some(cx) = parse(trace) {
        let _ = span.set_parent(cx);
    }
}

/// Without the `otel` feature there is no context to link.
#[cfg(not(feature = "otel"))]
#[inline]
pub(crate) fn set_parent(_span: &tracing::Span, _trace: &[u8]) {}

/// A `trace` field as a remote parent context; `None` if it is not a valid one.
#[cfg(feature = "otel")]
fn parse(trace: &[u8]) -> Option<opentelemetry::Context> {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    if trace.len() > MAX_TRACE {
        return None;
    }
    let text = std::str::from_utf8(trace).ok()?;
    let (parent, state) = text.split_once('\n').unwrap_or((text, ""));
    let mut parts = parent.split('-');
    let (version, trace_id, span_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || version != "00"
        || trace_id.len() != 32
        || span_id.len() != 16
        || flags.len() != 2
    {
        return None;
    }
    let sc = SpanContext::new(
        TraceId::from_hex(trace_id).ok()?,
        SpanId::from_hex(span_id).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        state.parse::<TraceState>().unwrap_or_default(),
    );
    sc.is_valid()
        .then(|| opentelemetry::Context::new().with_remote_span_context(sc))
}

#[cfg(all(test, feature = "otel"))]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceContextExt;

    #[test]
    fn a_valid_traceparent_parses_and_anything_else_is_ignored() {
        let good =
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\nrojo=00f067aa0ba902b7";
        let cx = parse(good).expect("valid");
        let sc = cx.span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(sc.span_id().to_string(), "b7ad6b7169203331");
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(sc.trace_state().get("rojo"), Some("00f067aa0ba902b7"));
        for bad in [
            &b"01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"[..],
            b"00-00000000000000000000000000000000-b7ad6b7169203331-01",
            b"00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-xx",
            b"00-zzf7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            b"\xff\xfe",
            &[b'0'; MAX_TRACE + 1],
        ] {
            assert!(parse(bad).is_none(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
