//! A real OTLP/gRPC trace receiver for tests: the `TraceService` of opentelemetry-proto,
//! served on a loopback port; what the processes under test export, by service name.
#![allow(dead_code, unreachable_pub)]

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;

/// Spans received, with the `service.name` of the process that sent each; waiters are woken
/// by each export.
#[derive(Default, Clone)]
pub struct Receiver(Arc<Mutex<Vec<(String, Span)>>>, Arc<tokio::sync::Notify>);

impl Receiver {
    /// Serves on `port` (free; see `ports.rs`): the receiver, the endpoint URL for
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, and the server task.
    pub fn start(port: u16) -> (Receiver, String, tokio::task::JoinHandle<()>) {
        let receiver = Receiver::default();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve(([127, 0, 0, 1], port).into());
        let task = tokio::spawn(async move {
            if let Err(e) = server.await {
                panic!("OTLP receiver: {e}");
            }
        });
        (receiver, format!("http://127.0.0.1:{port}"), task)
    }

    /// Everything received so far.
    pub fn spans(&self) -> Vec<(String, Span)> {
        self.0.lock().unwrap().clone()
    }

    /// Waits (up to `within`) until `found` finds what it looks for in the spans received,
    /// checking again after each export; `None` if it never does.
    pub async fn wait_for<T>(
        &self,
        within: std::time::Duration,
        found: impl Fn(&[(String, Span)]) -> Option<T>,
    ) -> Option<T> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let exported = self.1.notified();
            tokio::pin!(exported);
            exported.as_mut().enable();
            if let Some(t) = found(&self.spans()) {
                return Some(t);
            }
            tokio::time::timeout_at(deadline, exported).await.ok()?;
        }
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    got.push((service.clone(), span));
                }
            }
        }
        drop(got);
        self.1.notify_waiters();
        Ok(tonic::Response::new(Default::default()))
    }
}

/// A span's string attribute `key`.
pub fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        })
}
