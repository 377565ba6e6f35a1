//! What the proxy reports for each request, in process: Istio metrics per version and code,
//! trace context carried upstream and spans exported to a collector, one access-log line per
//! request — and exactly one record, also for a client that went away mid-request.

mod support;

use std::time::Duration;

use http::{Request, StatusCode};
use mesh_agent::telemetry::otlp::OtlpConfig;
use opentelemetry_proto::tonic::common::v1::any_value;
use support::{example, loopback, service_c_yaml, Body, Mesh, Options, Upstream, SERVICE_C};
use tokio::io::AsyncWriteExt;

const HOST: &str = "service-c.default.svc.cluster.local";

/// `service-c` v1 and v2, the subsets, `rules`; the upstreams are kept alive with the mesh.
async fn service_c(rules: &str, options: Options) -> (Mesh, [Upstream; 2]) {
    let (ip1, ip2) = (loopback(), loopback());
    let upstreams = [
        Upstream::start(ip1, "v1").await,
        Upstream::start(ip2, "v2").await,
    ];
    let mut yaml = service_c_yaml(ip1, ip2);
    yaml.push_str("\n---\n");
    yaml.push_str(&example(rules));
    (Mesh::with(&yaml, options).await, upstreams)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_per_version_and_code() {
    let (mesh, _upstreams) = service_c("canary/2-vs-v1_and_v2_90_10.yml", Options::default()).await;
    let mut client = mesh.http1(SERVICE_C).await;
    for _ in 0..100 {
        assert_eq!(client.get("service-c", "/").await.status, StatusCode::OK);
    }
    let requests = |version: &str| {
        mesh.metric(
            "istio_requests_total",
            &[
                ("destination_service", HOST),
                ("destination_version", version),
                ("destination_workload", &format!("service-c-{version}-0")),
                ("source_workload", "client-0"),
                ("response_code", "200"),
                ("response_flags", "-"),
                ("request_protocol", "http"),
            ],
        )
    };
    // Exact: the split is smooth weighted round-robin.
    assert_eq!((requests("v1"), requests("v2")), (90.0, 10.0));

    let mut h2 = mesh.http2(SERVICE_C).await;
    let call = Request::post("http://service-c:8080/demo.Echo/Say")
        .version(http::Version::HTTP_2)
        .header("content-type", "application/grpc")
        .body(Body::default())
        .expect("request");
    assert_eq!(h2.send(call).await.headers["grpc-status"], "0");
    let grpc = [("request_protocol", "grpc"), ("grpc_response_status", "0")];
    assert_eq!(mesh.metric("istio_requests_total", &grpc), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b3_context_continues_upstream_and_the_span_is_exported_with_its_parent() {
    let (collector, mut exports) = support::otlp_collector().await;
    let mut otlp = OtlpConfig::new(&format!("http://{collector}"), "mesh-agent~test").expect("url");
    otlp.flush_interval = Duration::from_millis(20);
    let options = Options {
        otlp: Some(otlp),
        ..Options::default()
    };
    let (mesh, _upstreams) = service_c("canary/1-vs-v1.yml", options).await;
    let trace_id = "463ac35c9f6413ad48485a3953bb6124";
    let span_id = "a2fb4a1d1a96d312";
    let mut client = mesh.http1(SERVICE_C).await;
    let request = Request::get("/headers?q=1")
        .header("host", "service-c:8080")
        .header("x-b3-traceid", trace_id)
        .header("x-b3-spanid", span_id)
        .header("x-b3-sampled", "1")
        .header("x-request-id", "req-42")
        .body(Body::default())
        .expect("request");
    let seen = client.send(request).await.json();
    assert_eq!(seen["x-b3-traceid"], trace_id, "{seen}");
    assert_eq!(seen["x-b3-parentspanid"], span_id, "{seen}");
    assert_eq!(seen["x-request-id"], "req-42", "{seen}");
    let our_span = seen["x-b3-spanid"].as_str().expect("span id").to_owned();
    assert_ne!(our_span, span_id);
    let traceparent = seen["traceparent"].as_str().expect("traceparent");
    assert_eq!(traceparent, format!("00-{trace_id}-{our_span}-01"));

    let export = tokio::time::timeout(Duration::from_secs(10), exports.recv())
        .await
        .expect("an export in time")
        .expect("collector alive");
    let span = &export.resource_spans[0].scope_spans[0].spans[0];
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert_eq!(hex(&span.trace_id), trace_id);
    assert_eq!(hex(&span.span_id), our_span);
    assert_eq!(hex(&span.parent_span_id), span_id);
    assert_eq!(span.name, format!("{HOST}:8080/*"));
    let attribute = |key: &str| {
        span.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(s) => Some(s.clone()),
                _ => None,
            })
    };
    assert_eq!(
        attribute("upstream_cluster").as_deref(),
        Some(format!("outbound|8080|version-v1|{HOST}").as_str())
    );
    assert_eq!(
        attribute("http.url").as_deref(),
        Some(format!("http://{HOST}:8080/headers?q=1").as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_w3c_traceparent_is_continued_too() {
    let (mesh, _upstreams) = service_c("canary/1-vs-v1.yml", Options::default()).await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let parent = "b7ad6b7169203331";
    let mut client = mesh.http1(SERVICE_C).await;
    let request = Request::get("/headers")
        .header("host", "service-c")
        .header("traceparent", format!("00-{trace_id}-{parent}-01"))
        .header("tracestate", "vendor=1")
        .body(Body::default())
        .expect("request");
    let seen = client.send(request).await.json();
    let traceparent = seen["traceparent"].as_str().expect("traceparent");
    assert!(
        traceparent.starts_with(&format!("00-{trace_id}-")),
        "{seen}"
    );
    assert!(!traceparent.contains(parent), "a span of its own: {seen}");
    assert_eq!(seen["x-b3-traceid"], trace_id, "{seen}");
    assert_eq!(seen["x-b3-parentspanid"], parent, "{seen}");
    assert_eq!(seen["tracestate"], "vendor=1", "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_is_one_access_log_line_naming_its_destination() {
    let options = Options {
        access_log: true,
        ..Options::default()
    };
    let (mesh, upstreams) = service_c("canary/1-vs-v1.yml", options).await;
    let mut client = mesh.http1(SERVICE_C).await;
    for _ in 0..3 {
        client.get("service-c", "/items?token=secret").await;
    }
    let lines = mesh.access_log(3).await;
    assert_eq!(lines.len(), 3, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["kind"], "http");
    assert_eq!(line["source_pod"], "client-0");
    assert_eq!(line["destination_service"], HOST);
    assert_eq!(line["destination_subset"], "version-v1");
    assert_eq!(line["endpoint"], upstreams[0].addr.to_string());
    assert_eq!(line["path"], "/items", "no query by default");
    assert_eq!(
        (line["status"].as_u64(), line["attempts"].as_u64()),
        (Some(200), Some(1))
    );
    assert_eq!(line["response_flags"], "-");
    assert_eq!(line["response_bytes"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_mid_request_is_recorded_once_as_dc() {
    let options = Options {
        access_log: true,
        ..Options::default()
    };
    let (mesh, upstreams) = service_c("canary/1-vs-v1.yml", options).await;
    let mut stream = mesh.connect(SERVICE_C).await;
    stream
        .write_all(b"GET /delay/3000 HTTP/1.1\r\nHost: service-c\r\n\r\n")
        .await
        .expect("write");
    // Gone once the request has reached the upstream.
    while upstreams[0].requests() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(stream);
    let lines = mesh.access_log(1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["status"], 0);
    assert_eq!(lines[0]["response_flags"], "DC");
    assert_eq!(lines[0]["destination_subset"], "version-v1");
    let gone = [("response_code", "0"), ("response_flags", "DC")];
    assert_eq!(mesh.metric("istio_requests_total", &gone), 1.0);
    // And only once.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(mesh.access_log(0).await.len(), 1);
    assert_eq!(mesh.metric("istio_requests_total", &[]), 1.0);
}
