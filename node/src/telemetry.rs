//! Request telemetry beyond the counters: W3C trace context and spans.
//!
//! Every HTTP hop through the mesh is a span (the sending node's `client` span, the
//! receiving node's `server` span) when an OTLP endpoint is configured: a request that
//! carries a `traceparent` continues its trace, one that does not starts a trace (at the
//! configured sample rate), and the request leaves with a `traceparent` naming this hop,
//! so the next hop and the service continue the same trace. Without an endpoint, a
//! `traceparent` passes through untouched and no span is made.
//!
//! Spans are made with the OpenTelemetry SDK (sampling, ids, batching) and exported as
//! OTLP/HTTP protobuf (`POST {endpoint}/v1/traces`, the OpenTelemetry proto types) from a
//! task of the node's runtime. The export queue is bounded: spans are dropped, and
//! counted, rather than held when the collector is slow or away.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioExecutor;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _,
};
use opentelemetry::KeyValue;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData,
    SpanExporter,
};
use opentelemetry_sdk::Resource;
use prost::Message as _;
use tokio::sync::mpsc;

use crate::config::TelemetryConfig;

/// Export batches waiting for the collector; more are dropped.
const QUEUE: usize = 64;
/// How often finished spans are sent.
const EXPORT_EVERY: Duration = Duration::from_secs(1);
/// How long a node stopping waits for its last spans to be posted.
const FLUSH_GRACE: Duration = Duration::from_millis(500);
/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed W3C `traceparent` (version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl TraceParent {
    /// Parses `00-<32 hex>-<16 hex>-<2 hex>`; anything else (or all-zero ids) is `None`,
    /// and the request is then treated as carrying none.
    pub fn parse(v: &str) -> Option<Self> {
        let mut parts = v.trim().split('-');
        let (ver, t, s, f) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if ver != "00" || parts.next().is_some() || t.len() != 32 || s.len() != 16 || f.len() != 2 {
            return None;
        }
        let lower = |x: &str| {
            x.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !(lower(t) && lower(s) && lower(f)) {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        hex::decode_to_slice(t, &mut trace_id).ok()?;
        hex::decode_to_slice(s, &mut span_id).ok()?;
        let flags = u8::from_str_radix(f, 16).ok()?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The header value.
    pub fn to_header(self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.span_id),
            u8::from(self.sampled)
        )
    }
}

/// The node's tracer, when an endpoint is configured, and the access log switch.
#[derive(Debug, Default)]
pub struct Telemetry {
    tracer: Option<(SdkTracerProvider, SdkTracer)>,
    pub access_log: bool,
    /// Spans dropped because the export queue was full (`quicmesh_spans_dropped_total`).
    pub dropped: prometheus_client::metrics::counter::Counter,
}

/// One hop's span (`None` inside when no tracer, or not sampled and so not recorded).
#[derive(Debug)]
pub struct Hop {
    span: Option<opentelemetry_sdk::trace::Span>,
    /// What to send on: this hop's context, or the incoming one untouched.
    pub traceparent: Option<TraceParent>,
}

impl Hop {
    /// The trace id, for the access log.
    pub fn trace_id(&self) -> Option<String> {
        self.traceparent.map(|t| hex::encode(t.trace_id))
    }

    /// Ends the span with the response status (and the mesh's reason when it answered).
    pub fn finish(self, status: u16, reason: Option<&str>) {
        let Some(mut span) = self.span else { return };
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if let Some(r) = reason {
            span.set_attribute(KeyValue::new("quicmesh.reason", r.to_string()));
        }
        if status >= 500 || reason.is_some() {
            span.set_status(Status::error(reason.unwrap_or("server error").to_string()));
        }
        span.end();
    }
}

/// What a hop's span records at its start.
#[derive(Debug, Clone, Copy)]
pub struct HopInfo<'a> {
    /// `true`: the sending node's span (client); `false`: the receiving node's (server).
    pub egress: bool,
    pub method: &'a str,
    pub path: &'a str,
    pub src: &'a str,
    pub dst: &'a str,
    pub route: &'a str,
    /// The other node.
    pub peer: &'a str,
}

impl Telemetry {
    /// Builds the tracer for `cfg` (a task of the current runtime posts the spans).
    pub fn start(
        cfg: &TelemetryConfig,
        node: &str,
        dropped: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        let tracer = cfg.otlp_endpoint.as_ref().map(|endpoint| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(post(endpoint.clone(), rx));
            let exporter = OtlpHttp {
                tx,
                resource: ResourceAttributesWithSchema::default(),
                dropped: dropped.clone(),
            };
            let batches = BatchSpanProcessor::builder(exporter)
                .with_batch_config(
                    BatchConfigBuilder::default()
                        .with_scheduled_delay(EXPORT_EVERY)
                        .build(),
                )
                .build();
            let provider = SdkTracerProvider::builder()
                .with_span_processor(batches)
                .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                    cfg.sample_rate,
                ))))
                .with_resource(
                    Resource::builder()
                        .with_service_name("quicmesh-node")
                        .with_attribute(KeyValue::new("host.name", node.to_string()))
                        .with_attribute(KeyValue::new("quicmesh.node", node.to_string()))
                        .build(),
                )
                .build();
            let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "quicmesh");
            (provider, tracer)
        });
        Self {
            tracer,
            access_log: cfg.access_log,
            dropped,
        }
    }

    /// Starts a hop for a request that came with `incoming` (its `traceparent` value).
    pub fn hop(&self, incoming: Option<&str>, info: HopInfo<'_>) -> Hop {
        let parent = incoming.and_then(TraceParent::parse);
        let Some((_, tracer)) = &self.tracer else {
            return Hop {
                span: None,
                traceparent: parent,
            };
        };
        let cx = match parent {
            Some(p) => opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from_bytes(p.trace_id),
                SpanId::from_bytes(p.span_id),
                if p.sampled {
                    TraceFlags::SAMPLED
                } else {
                    TraceFlags::default()
                },
                true,
                TraceState::default(),
            )),
            None => opentelemetry::Context::new(),
        };
        let name = format!("{} {}", info.method, info.route);
        let span = tracer
            .span_builder(name)
            .with_kind(if info.egress {
                SpanKind::Client
            } else {
                SpanKind::Server
            })
            .with_attributes(vec![
                KeyValue::new("http.request.method", info.method.to_string()),
                KeyValue::new("url.path", info.path.to_string()),
                KeyValue::new("quicmesh.src_service", info.src.to_string()),
                KeyValue::new("quicmesh.dst_service", info.dst.to_string()),
                KeyValue::new("quicmesh.route", info.route.to_string()),
                KeyValue::new("quicmesh.peer", info.peer.to_string()),
            ])
            .start_with_context(tracer, &cx);
        let sc = span.span_context().clone();
        let traceparent = if sc.is_valid() {
            Some(TraceParent {
                trace_id: sc.trace_id().to_bytes(),
                span_id: sc.span_id().to_bytes(),
                sampled: sc.is_sampled(),
            })
        } else {
            parent
        };
        Hop {
            span: Some(span),
            traceparent,
        }
    }

    /// Exports what is buffered (at shutdown): hands the last spans to the posting task
    /// and gives it a moment to send them.
    pub async fn flush(&self) {
        if let Some((p, _)) = &self.tracer {
            let _ = p.force_flush();
            tokio::time::sleep(FLUSH_GRACE).await;
        }
    }
}

/// Encodes batches for the posting task.
#[derive(Debug)]
struct OtlpHttp {
    tx: mpsc::Sender<Vec<u8>>,
    resource: ResourceAttributesWithSchema,
    dropped: prometheus_client::metrics::counter::Counter,
}

impl SpanExporter for OtlpHttp {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let n = batch.len() as u64;
        let req = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(batch, &self.resource),
        };
        if self.tx.try_send(req.encode_to_vec()).is_err() {
            self.dropped.inc_by(n);
        }
        std::future::ready(Ok(()))
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = ResourceAttributesWithSchema::from(resource);
    }
}

/// Posts encoded batches to `{endpoint}/v1/traces` until the exporter is gone.
async fn post(endpoint: hyper::Uri, mut rx: mpsc::Receiver<Vec<u8>>) {
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let url = format!("{}/v1/traces", endpoint.to_string().trim_end_matches('/'));
    let mut warned = false;
    while let Some(body) = rx.recv().await {
        let req = hyper::Request::post(&url)
            .header(hyper::header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(Bytes::from(body)));
        let Ok(req) = req else { continue };
        match tokio::time::timeout(EXPORT_TIMEOUT, client.request(req)).await {
            Ok(Ok(r)) if r.status().is_success() => warned = false,
            other => {
                // Once per outage, not once per batch.
                if !warned {
                    tracing::warn!(%url, result = ?other.map(|r| r.map(|r| r.status())), "OTLP export failed");
                    warned = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_is_read_strictly_and_written_back_the_same() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceParent::parse(v).unwrap();
        assert!(t.sampled);
        assert_eq!(t.to_header(), v);
        for bad in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }
}
