//! Span export against a real (local) OTLP/HTTP receiver: a hyper server that decodes each
//! `ExportTraceServiceRequest` the way a collector does and hands it to the test.

use std::{
    convert::Infallible,
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use mesh_agent::{
    exposition,
    telemetry::{
        otlp::{OtlpConfig, ProxySpan, SpanExporter},
        trace::{continue_or_start, inject, SpanContext},
    },
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::any_value,
    trace::v1::{span::SpanKind, Span},
};
use prometheus_client::registry::Registry;
use prost::Message;
use tokio::{net::TcpListener, sync::mpsc};

/// What the receiver got: the request's path and content type, and the decoded payload.
struct Received {
    path: String,
    content_type: Option<String>,
    payload: ExportTraceServiceRequest,
}

/// Starts a receiver answering `status`; returns its address and the requests it decodes.
async fn receiver(status: StatusCode) -> (SocketAddr, mpsc::UnboundedReceiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            let service = service_fn(move |request: Request<Incoming>| {
                let tx = tx.clone();
                async move {
                    let path = request.uri().path().to_owned();
                    let content_type = request
                        .headers()
                        .get(http::header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let body = request
                        .into_body()
                        .collect()
                        .await
                        .expect("body")
                        .to_bytes();
                    let payload = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                    let _ = tx.send(Received {
                        path,
                        content_type,
                        payload,
                    });
                    let mut response = Response::new(Full::new(Bytes::new()));
                    *response.status_mut() = status;
                    Ok::<_, Infallible>(response)
                }
            });
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    });
    (addr, rx)
}

fn config(addr: SocketAddr) -> OtlpConfig {
    let mut config = OtlpConfig::new(&format!("http://{addr}"), "sidecar~10.0.0.1~node-a~mesh")
        .expect("endpoint");
    config.flush_interval = Duration::from_millis(20);
    config
}

fn span(context: SpanContext, service: &str, host: &str, status: u16) -> ProxySpan {
    let start = SystemTime::now();
    ProxySpan {
        context,
        name: ProxySpan::envoy_name(host, 8080),
        service_name: service.into(),
        start,
        end: start + Duration::from_millis(12),
        method: Method::GET,
        url: format!("http://{host}:8080/items?id=1"),
        protocol: Version::HTTP_11,
        status,
        upstream_cluster: format!("outbound|8080|v1|{host}"),
        response_flags: "-".to_owned(),
        peer: Some("10.77.0.3:8080".parse().expect("addr")),
    }
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .and_then(|value| match value {
            any_value::Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        })
}

/// All spans of the payloads received until `count` spans have arrived, with their service.
async fn collect(rx: &mut mpsc::UnboundedReceiver<Received>, count: usize) -> Vec<(String, Span)> {
    let mut spans = Vec::new();
    while spans.len() < count {
        let received = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("spans arrive in time")
            .expect("receiver alive");
        assert_eq!(received.path, "/v1/traces");
        assert_eq!(
            received.content_type.as_deref(),
            Some("application/x-protobuf")
        );
        for resource in received.payload.resource_spans {
            let service = resource
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    any_value::Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                spans.extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
    }
    spans
}

#[tokio::test]
async fn parent_and_child_spans_arrive_linked() {
    let (addr, mut rx) = receiver(StatusCode::OK).await;
    let (exporter, task) = SpanExporter::start(config(addr));
    let mut rng = fastrand::Rng::with_seed(1);

    // Hop 1: the client sent no context, so the agent starts the trace and injects it.
    let caller = HeaderMap::new();
    let first = continue_or_start(&caller, 1.0, &mut rng);
    let mut upstream = HeaderMap::new();
    inject(&first, &mut upstream);
    // Hop 2: service-b calls service-c passing the headers on; the agent continues the trace.
    let second = continue_or_start(&upstream, 0.0, &mut rng);
    assert!(second.sampled, "the caller's decision wins over our ratio");

    exporter.export(span(
        first.clone(),
        "client.default",
        "service-b.default.svc.cluster.local",
        200,
    ));
    exporter.export(span(
        second.clone(),
        "service-b.default",
        "service-c.default.svc.cluster.local",
        503,
    ));

    let spans = collect(&mut rx, 2).await;
    let find = |name: &str| {
        spans
            .iter()
            .find(|(_, s)| s.name == name)
            .unwrap_or_else(|| panic!("span {name} arrived"))
    };
    let (parent_service, parent) = find("service-b.default.svc.cluster.local:8080/*");
    let (child_service, child) = find("service-c.default.svc.cluster.local:8080/*");

    assert_eq!(parent_service, "client.default");
    assert_eq!(child_service, "service-b.default");
    assert_eq!(parent.trace_id, first.trace_id.to_be_bytes());
    assert_eq!(child.trace_id, parent.trace_id, "one trace");
    assert_eq!(parent.span_id, first.span_id.to_be_bytes());
    assert!(parent.parent_span_id.is_empty(), "the root has no parent");
    assert_eq!(child.span_id, second.span_id.to_be_bytes());
    assert_eq!(child.parent_span_id, parent.span_id, "child of hop 1");

    assert_eq!(parent.kind, SpanKind::Client as i32);
    assert_eq!(
        parent.end_time_unix_nano - parent.start_time_unix_nano,
        12_000_000
    );
    assert_eq!(attribute(parent, "http.method"), Some("GET"));
    assert_eq!(
        attribute(parent, "http.url"),
        Some("http://service-b.default.svc.cluster.local:8080/items?id=1")
    );
    assert_eq!(attribute(parent, "http.status_code"), Some("200"));
    assert_eq!(attribute(parent, "http.protocol"), Some("HTTP/1.1"));
    assert_eq!(
        attribute(parent, "upstream_cluster"),
        Some("outbound|8080|v1|service-b.default.svc.cluster.local")
    );
    assert_eq!(attribute(parent, "response_flags"), Some("-"));
    assert_eq!(
        attribute(parent, "node_id"),
        Some("sidecar~10.0.0.1~node-a~mesh")
    );
    assert_eq!(
        attribute(parent, "guid:x-request-id"),
        Some(first.request_id.as_str())
    );
    assert_eq!(
        attribute(child, "guid:x-request-id"),
        Some(first.request_id.as_str()),
        "the request id crosses hops"
    );
    assert_eq!(attribute(parent, "peer.address"), Some("10.77.0.3:8080"));
    assert_eq!(attribute(parent, "error"), None);
    assert_eq!(attribute(child, "error"), Some("true"), "503 is an error");

    drop(exporter);
    tokio::time::timeout(Duration::from_secs(5), task.finish())
        .await
        .expect("the task ends once exporters are gone");
}

#[tokio::test]
async fn unsampled_spans_are_not_exported_and_stats_count_exports() {
    let (addr, mut rx) = receiver(StatusCode::OK).await;
    let (exporter, task) = SpanExporter::start(config(addr));
    let mut rng = fastrand::Rng::with_seed(2);
    let unsampled = continue_or_start(&HeaderMap::new(), 0.0, &mut rng);
    let sampled = continue_or_start(&HeaderMap::new(), 1.0, &mut rng);
    exporter.export(span(
        unsampled,
        "a.default",
        "b.default.svc.cluster.local",
        200,
    ));
    exporter.export(span(
        sampled.clone(),
        "a.default",
        "b.default.svc.cluster.local",
        200,
    ));
    let stats = exporter.stats().clone();
    drop(exporter);
    task.finish().await;
    let spans = collect(&mut rx, 1).await;
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].1.span_id, sampled.span_id.to_be_bytes());
    assert_eq!(stats.exported(), 1);
    assert_eq!(stats.dropped(), 0);
    assert_eq!(stats.failed(), 0);
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_without_waiting() {
    let (addr, _rx) = receiver(StatusCode::OK).await;
    let mut config = config(addr);
    config.queue_capacity = 3;
    let (exporter, task) = SpanExporter::start(config);
    let mut registry = Registry::default();
    exporter.register_metrics(
        registry
            .sub_registry_with_prefix("mesh")
            .sub_registry_with_prefix("trace"),
    );
    let mut rng = fastrand::Rng::with_seed(3);
    // The test runtime has one thread: the export task cannot run until we yield, so the queue
    // fills after three spans.
    for _ in 0..10 {
        let ctx = continue_or_start(&HeaderMap::new(), 1.0, &mut rng);
        exporter.export(span(ctx, "a.default", "b.default.svc.cluster.local", 200));
    }
    let stats = exporter.stats().clone();
    assert_eq!(stats.dropped(), 7);
    drop(exporter);
    task.finish().await;
    assert_eq!(stats.exported(), 3);

    // `/metrics` serves the same counts.
    let (_, text) = exposition::render(&registry, None);
    assert!(
        text.contains("mesh_trace_spans_total{outcome=\"dropped\"} 7"),
        "{text}"
    );
    assert!(text.contains("mesh_trace_spans_total{outcome=\"exported\"} 3"));
}

#[tokio::test]
async fn an_unreachable_or_refusing_collector_counts_failures() {
    // A port that was just free: nothing listens there.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let (exporter, task) = SpanExporter::start(config(closed));
    let mut rng = fastrand::Rng::with_seed(4);
    let ctx = continue_or_start(&HeaderMap::new(), 1.0, &mut rng);
    exporter.export(span(ctx, "a.default", "b.default.svc.cluster.local", 200));
    let stats = exporter.stats().clone();
    drop(exporter);
    task.finish().await;
    assert_eq!((stats.exported(), stats.failed()), (0, 1));

    let (addr, mut rx) = receiver(StatusCode::SERVICE_UNAVAILABLE).await;
    let (exporter, task) = SpanExporter::start(config(addr));
    let ctx = continue_or_start(&HeaderMap::new(), 1.0, &mut rng);
    exporter.export(span(ctx, "a.default", "b.default.svc.cluster.local", 200));
    let stats = exporter.stats().clone();
    drop(exporter);
    task.finish().await;
    collect(&mut rx, 1).await;
    assert_eq!((stats.exported(), stats.failed()), (0, 1));
}
