//! Span export over OTLP/HTTP (protobuf `ExportTraceServiceRequest`, `POST /v1/traces`), which
//! Jaeger and the OpenTelemetry collector accept.
//!
//! Each proxied request is one finished span whose ids are the ones propagated in its headers
//! (`trace`), so the spans of every hop link up at the collector. The proxy hands spans to
//! [`SpanExporter::export`], which never waits: spans go into a bounded queue (a full queue drops
//! the span and counts it), and a background task sends them in batches.
//!
//! Why not the OpenTelemetry SDK's tracer: our spans are complete records by the time they are
//! known (ids from the headers, start and end measured by the proxy), which the SDK would have to
//! be coaxed into accepting (custom id generator, remote parent contexts, explicit timestamps);
//! and its batch processor does not report its drops to our metrics. Encoding the OTLP messages
//! of `opentelemetry-proto` directly and posting them with hyper is shorter and does exactly
//! what we need.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{header::CONTENT_TYPE, Method, Request, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue},
    resource::v1::Resource,
    trace::v1::{span::SpanKind, status::StatusCode, ResourceSpans, ScopeSpans, Span, Status},
};
use prometheus_client::registry::Registry;
use prost::Message;
use tokio::{sync::mpsc, task::JoinHandle};

use crate::exposition::ScrapedCounters;

use super::trace::SpanContext;

/// Where and how to send spans.
#[derive(Clone, Debug)]
pub struct OtlpConfig {
    /// The collector's traces URL, e.g. `http://jaeger-collector.istio-system:4318/v1/traces`.
    pub endpoint: Uri,
    /// Spans waiting to be sent; when full, new spans are dropped (and counted).
    pub queue_capacity: usize,
    /// Most spans in one request to the collector.
    pub max_batch: usize,
    /// A partial batch is sent after this long.
    pub flush_interval: Duration,
    /// How long one export may take before it is abandoned (its spans count as failed).
    pub timeout: Duration,
    /// Envoy's `node_id` span attribute: which agent proxied the request.
    pub node_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OtlpConfigError {
    #[error("OTLP endpoint {0:?} is not a URL: {1}")]
    InvalidUrl(String, http::uri::InvalidUri),
    #[error("OTLP endpoint {0:?} must be http://host[:port][/path] (no TLS support)")]
    Unsupported(String),
}

impl OtlpConfig {
    /// Defaults around `endpoint`: a URL without a path gets OTLP's `/v1/traces` (port 4318 is
    /// OTLP/HTTP's). Only `http` is supported.
    pub fn new(endpoint: &str, node_id: impl Into<String>) -> Result<Self, OtlpConfigError> {
        let uri: Uri = endpoint
            .parse()
            .map_err(|e| OtlpConfigError::InvalidUrl(endpoint.to_owned(), e))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(OtlpConfigError::Unsupported(endpoint.to_owned()));
        }
        let uri = if uri.path() == "/" && uri.query().is_none() {
            let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
            format!("http://{authority}/v1/traces")
                .parse()
                .map_err(|e| OtlpConfigError::InvalidUrl(endpoint.to_owned(), e))?
        } else {
            uri
        };
        Ok(OtlpConfig {
            endpoint: uri,
            queue_capacity: 2048,
            max_batch: 512,
            flush_interval: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
            node_id: node_id.into(),
        })
    }
}

/// One proxied request, as a CLIENT span.
#[derive(Clone, Debug)]
pub struct ProxySpan {
    /// This hop's ids (trace, span, parent) and `x-request-id`, as injected upstream.
    pub context: SpanContext,
    /// Envoy's form: `{destination host}:{port}/*`, e.g.
    /// `service-c.default.svc.cluster.local:8080/*`.
    pub name: String,
    /// The calling workload as Jaeger lists it (Istio: `{workload}.{namespace}`); spans are
    /// grouped under it.
    pub service_name: Arc<str>,
    pub start: SystemTime,
    pub end: SystemTime,
    pub method: Method,
    /// The request URL as the client asked for it (`http://service-c:8080/path?q`).
    pub url: String,
    pub protocol: Version,
    /// 0 when no response was sent.
    pub status: u16,
    /// Envoy's cluster name, e.g. `outbound|8080|v1|service-c.default.svc.cluster.local`.
    pub upstream_cluster: String,
    /// Envoy response flags, `-` when none.
    pub response_flags: String,
    /// The upstream endpoint the last attempt went to.
    pub peer: Option<SocketAddr>,
}

impl ProxySpan {
    /// Envoy's span name: `{host}:{port}/*`.
    pub fn envoy_name(host: &str, port: u16) -> String {
        format!("{host}:{port}/*")
    }
}

/// What the exporter did, for `/metrics` or `/stats`.
#[derive(Debug, Default)]
pub struct ExportStats {
    exported: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

impl ExportStats {
    /// Spans the collector accepted.
    pub fn exported(&self) -> u64 {
        self.exported.load(Ordering::Relaxed)
    }

    /// Spans dropped because the queue was full (or the exporter had stopped).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Spans lost because the collector refused them or could not be reached in time.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

/// Queues finished spans for export. Cheap to clone; the export task ends once every clone is
/// dropped and the queue is sent.
#[derive(Clone, Debug)]
pub struct SpanExporter {
    queue: mpsc::Sender<ProxySpan>,
    stats: Arc<ExportStats>,
}

/// The background task that sends batches.
#[derive(Debug)]
pub struct ExportTask(JoinHandle<()>);

impl ExportTask {
    /// Waits until the queue is sent, after every [`SpanExporter`] has been dropped (shutdown).
    pub async fn finish(self) {
        let _ = self.0.await;
    }
}

impl SpanExporter {
    /// Starts the export task on the current Tokio runtime (start it from the admin runtime to
    /// keep it off the data path).
    pub fn start(config: OtlpConfig) -> (SpanExporter, ExportTask) {
        let (queue, spans) = mpsc::channel(config.queue_capacity.max(1));
        let stats = Arc::new(ExportStats::default());
        let task = tokio::spawn(run(config, spans, Arc::clone(&stats)));
        (SpanExporter { queue, stats }, ExportTask(task))
    }

    /// Queues `span` if its trace is sampled; never waits.
    pub fn export(&self, span: ProxySpan) {
        if !span.context.sampled {
            return;
        }
        if self.queue.try_send(span).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn stats(&self) -> &Arc<ExportStats> {
        &self.stats
    }

    /// Serves `spans_total{outcome="exported"|"dropped"|"failed"}` (under the caller's prefix:
    /// `mesh_trace_`) from the exporter's counters.
    pub fn register_metrics(&self, registry: &mut Registry) {
        let stats = Arc::clone(&self.stats);
        registry.register_collector(Box::new(ScrapedCounters {
            name: "spans",
            help: "Spans handed to the OTLP exporter, by outcome",
            label: "outcome",
            read: move || {
                vec![
                    ("exported", stats.exported()),
                    ("dropped", stats.dropped()),
                    ("failed", stats.failed()),
                ]
            },
        }));
    }
}

async fn run(config: OtlpConfig, mut spans: mpsc::Receiver<ProxySpan>, stats: Arc<ExportStats>) {
    let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let max_batch = config.max_batch.max(1);
    let mut batch = Vec::with_capacity(max_batch);
    let mut ticker = tokio::time::interval(config.flush_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            span = spans.recv() => match span {
                Some(span) => {
                    batch.push(span);
                    if batch.len() >= max_batch {
                        send(&client, &config, &mut batch, &stats).await;
                    }
                }
                None => {
                    send(&client, &config, &mut batch, &stats).await;
                    return;
                }
            },
            _ = ticker.tick() => send(&client, &config, &mut batch, &stats).await,
        }
    }
}

async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    config: &OtlpConfig,
    batch: &mut Vec<ProxySpan>,
    stats: &ExportStats,
) {
    if batch.is_empty() {
        return;
    }
    let count = batch.len() as u64;
    let body = encode(batch, &config.node_id).encode_to_vec();
    batch.clear();
    let request = Request::builder()
        .method(Method::POST)
        .uri(config.endpoint.clone())
        .header(CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(Bytes::from(body)));
    let Ok(request) = request else {
        stats.failed.fetch_add(count, Ordering::Relaxed);
        return;
    };
    let outcome = tokio::time::timeout(config.timeout, async {
        let response = client.request(request).await.map_err(|e| e.to_string())?;
        let status = response.status();
        // Read the body so the connection can be reused.
        let _ = response.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("collector answered {status}"))
        }
    })
    .await
    .unwrap_or_else(|_| Err("timed out".to_owned()));
    match outcome {
        Ok(()) => stats.exported.fetch_add(count, Ordering::Relaxed),
        Err(error) => {
            tracing::debug!(%error, spans = count, endpoint = %config.endpoint, "span export failed");
            stats.failed.fetch_add(count, Ordering::Relaxed)
        }
    };
}

/// The OTLP request for `spans`, one resource per calling workload.
pub fn encode(spans: &[ProxySpan], node_id: &str) -> ExportTraceServiceRequest {
    let mut by_service: BTreeMap<&str, Vec<Span>> = BTreeMap::new();
    for span in spans {
        by_service
            .entry(&span.service_name)
            .or_default()
            .push(to_otlp(span, node_id));
    }
    let resource_spans = by_service
        .into_iter()
        .map(|(service, spans)| ResourceSpans {
            resource: Some(Resource {
                attributes: vec![string("service.name", service)],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "mesh-agent".to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest { resource_spans }
}

fn to_otlp(span: &ProxySpan, node_id: &str) -> Span {
    let ctx = &span.context;
    let mut attributes = vec![
        string("node_id", node_id),
        string("component", "proxy"),
        string("guid:x-request-id", ctx.request_id.as_str()),
        string("http.method", span.method.as_str()),
        string("http.url", &span.url),
        string("http.protocol", &format!("{:?}", span.protocol)),
        string("http.status_code", &span.status.to_string()),
        string("upstream_cluster", &span.upstream_cluster),
        string("response_flags", &span.response_flags),
    ];
    if let Some(peer) = span.peer {
        attributes.push(string("peer.address", &peer.to_string()));
    }
    // Envoy marks 5xx and requests that got no response as errors.
    let failed = span.status == 0 || span.status >= 500;
    if failed {
        attributes.push(string("error", "true"));
    }
    Span {
        trace_id: ctx.trace_id.to_be_bytes().to_vec(),
        span_id: ctx.span_id.to_be_bytes().to_vec(),
        parent_span_id: ctx
            .parent_span_id
            .map(|id| id.to_be_bytes().to_vec())
            .unwrap_or_default(),
        trace_state: ctx
            .tracestate
            .as_ref()
            .and_then(|t| t.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        // W3C trace flags: bit 0 is "sampled".
        flags: u32::from(ctx.sampled),
        name: span.name.clone(),
        kind: SpanKind::Client as i32,
        start_time_unix_nano: unix_nanos(span.start),
        end_time_unix_nano: unix_nanos(span.end),
        attributes,
        status: Some(Status {
            code: if failed {
                StatusCode::Error
            } else {
                StatusCode::Unset
            } as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn string(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..Default::default()
    }
}

fn unix_nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_gets_the_traces_path_when_it_has_none() {
        let config = OtlpConfig::new("http://jaeger:4318", "node").expect("valid");
        assert_eq!(config.endpoint, "http://jaeger:4318/v1/traces");
        let config = OtlpConfig::new("http://collector:4318/custom/traces", "node").expect("valid");
        assert_eq!(config.endpoint.path(), "/custom/traces");
    }

    #[test]
    fn endpoint_must_be_plain_http() {
        assert!(matches!(
            OtlpConfig::new("https://jaeger:4318", "node"),
            Err(OtlpConfigError::Unsupported(_))
        ));
        assert!(matches!(
            OtlpConfig::new("jaeger:4318", "node"),
            Err(OtlpConfigError::Unsupported(_))
        ));
        assert!(matches!(
            OtlpConfig::new("http://jae ger", "node"),
            Err(OtlpConfigError::InvalidUrl(..))
        ));
    }
}
