//! `/metrics` as a scraper sees it: record known traffic, encode, parse with a Prometheus text
//! parser, and check the counts per `destination_version` and `response_code`.

use std::{collections::BTreeMap, fmt, time::Duration};

use mesh_agent::exposition::{self, OPENMETRICS_CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE};
use mesh_agent::identity::{ServiceIdentity, WorkloadIdentity};
use mesh_agent::telemetry::metrics::{
    FlagsLabel, Metrics, NoFlags, Protocol, RequestOutcome, DEFAULT_CLUSTER, MAX_SERIES_PER_FAMILY,
};
use prometheus_client::registry::Registry;
use prometheus_parse::{Scrape, Value};

/// The telemetry metrics on a registry of their own, served as `/metrics` serves them.
struct Served {
    registry: Registry,
    metrics: Metrics,
}

impl Served {
    fn new() -> Served {
        Served::capped(MAX_SERIES_PER_FAMILY)
    }

    /// With at most `cap` series per family.
    fn capped(cap: usize) -> Served {
        let mut registry = Registry::default();
        let metrics = Metrics::new(DEFAULT_CLUSTER, &mut registry).with_max_series(cap);
        Served { registry, metrics }
    }

    fn render(&self, accept: Option<&str>) -> (&'static str, String) {
        exposition::render(&self.registry, accept)
    }

    /// OpenMetrics text.
    fn encode(&self) -> String {
        self.render(Some("application/openmetrics-text")).1
    }

    /// The classic text format.
    fn encode_prometheus(&self) -> String {
        self.render(None).1
    }
}

impl std::ops::Deref for Served {
    type Target = Metrics;

    fn deref(&self) -> &Metrics {
        &self.metrics
    }
}

/// Stands in for the engine's flag set.
struct Flags(&'static str, u32);

impl fmt::Display for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl FlagsLabel for Flags {
    fn key(&self) -> u32 {
        self.1
    }
}

fn workload(name: &str, app: &str, version: &str) -> WorkloadIdentity {
    let labels = BTreeMap::from([
        ("app".to_owned(), app.to_owned()),
        ("version".to_owned(), version.to_owned()),
    ]);
    WorkloadIdentity::from_pod_labels(name, "default", &labels)
}

fn outcome(status: u16, flags: &dyn FlagsLabel) -> RequestOutcome<'_> {
    RequestOutcome {
        protocol: Protocol::Http,
        status,
        grpc_status: None,
        flags,
        duration: Duration::from_millis(3),
        request_bytes: 0,
        response_bytes: 120,
    }
}

fn parse(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|line| Ok(line.to_owned()))).expect("parses")
}

fn counter(value: &Value) -> f64 {
    match value {
        Value::Counter(v) | Value::Untyped(v) | Value::Gauge(v) => *v,
        other => panic!("not a counter: {other:?}"),
    }
}

/// Sum of `metric` samples whose labels include all of `want`.
fn sum(scrape: &Scrape, metric: &str, want: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| want.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| counter(&s.value))
        .sum()
}

struct Canary {
    metrics: Served,
}

impl Canary {
    /// 90 requests to v1 (2 of them 503 UH), 10 to v2, 3 to an unknown host: all from `client`.
    fn record() -> Self {
        let metrics = Served::new();
        let client = workload("client", "client", "v1");
        let service = ServiceIdentity::new("service-c", "default");
        let v1 = metrics.peer_labels(
            &client,
            Some(&service),
            Some(&workload("service-c-v1", "service-c", "v1")),
        );
        let v2 = metrics.peer_labels(
            &client,
            Some(&service),
            Some(&workload("service-c-v2", "service-c", "v2")),
        );
        let unknown = metrics.peer_labels(&client, None, None);
        for _ in 0..88 {
            metrics.record_request(&v1, &outcome(200, &NoFlags));
        }
        for _ in 0..2 {
            metrics.record_request(&v1, &outcome(503, &Flags("UH", 1)));
        }
        for _ in 0..10 {
            metrics.record_request(&v2, &outcome(200, &NoFlags));
        }
        for _ in 0..3 {
            metrics.record_request(&unknown, &outcome(200, &NoFlags));
        }
        Canary { metrics }
    }
}

fn check_canary_counts(scrape: &Scrape) {
    let total = "istio_requests_total";
    let ok = [("response_code", "200")];
    assert_eq!(sum(scrape, total, &[("destination_version", "v1")]), 90.0);
    assert_eq!(sum(scrape, total, &[("destination_version", "v2")]), 10.0);
    // What Kiali's graph groups by: every series carries the four canonical labels.
    let canary = |revision| {
        [
            ("source_canonical_service", "client"),
            ("source_canonical_revision", "v1"),
            ("destination_canonical_service", "service-c"),
            ("destination_canonical_revision", revision),
        ]
    };
    assert_eq!(sum(scrape, total, &canary("v1")), 90.0);
    assert_eq!(sum(scrape, total, &canary("v2")), 10.0);
    assert_eq!(
        sum(scrape, total, &[("destination_version", "v1"), ok[0]]),
        88.0
    );
    assert_eq!(
        sum(
            scrape,
            total,
            &[
                ("destination_version", "v1"),
                ("response_code", "503"),
                ("response_flags", "UH"),
            ]
        ),
        2.0
    );
    assert_eq!(
        sum(
            scrape,
            total,
            &[
                ("destination_service", "unknown"),
                ("destination_workload", "unknown")
            ]
        ),
        3.0
    );
    assert_eq!(
        sum(
            scrape,
            total,
            &[
                ("reporter", "source"),
                ("source_workload", "client"),
                ("source_app", "client"),
                ("destination_service", "service-c.default.svc.cluster.local"),
                ("destination_service_name", "service-c"),
                ("destination_service_namespace", "default"),
                ("destination_app", "service-c"),
                ("request_protocol", "http"),
                ("response_flags", "-"),
                ("connection_security_policy", "none"),
            ]
        ),
        98.0
    );
}

#[test]
fn openmetrics_scrape_parses_and_counts_match() {
    let canary = Canary::record();
    let text = canary.metrics.encode();
    assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    check_canary_counts(&parse(&text));
}

#[test]
fn prometheus_text_scrape_parses_and_counts_match() {
    let canary = Canary::record();
    let text = canary.metrics.encode_prometheus();
    assert!(!text.contains("# EOF"));
    assert!(text.contains("# TYPE istio_requests_total counter"));
    check_canary_counts(&parse(&text));
}

#[test]
fn render_negotiates_the_format() {
    let metrics = Served::new();
    let (content_type, body) = metrics.render(Some(
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    ));
    assert_eq!(content_type, OPENMETRICS_CONTENT_TYPE);
    assert!(body.ends_with("# EOF\n"));
    let (content_type, body) = metrics.render(None);
    assert_eq!(content_type, PROMETHEUS_CONTENT_TYPE);
    assert!(!body.contains("# EOF"));
}

#[test]
fn histograms_use_istio_buckets() {
    let canary = Canary::record();
    let scrape = parse(&canary.metrics.encode_prometheus());
    let duration = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "istio_request_duration_milliseconds"
                && s.labels.get("destination_version") == Some("v2")
        })
        .expect("duration histogram");
    let Value::Histogram(buckets) = &duration.value else {
        panic!("not a histogram: {:?}", duration.value);
    };
    let bounds: Vec<f64> = buckets.iter().map(|b| b.less_than).collect();
    assert_eq!(&bounds[..4], &[0.5, 1.0, 5.0, 10.0]);
    assert!(bounds.contains(&3_600_000.0));
    // All ten v2 requests took 3 ms: none at or below 1 ms, all at or below 5 ms.
    let count_at = |le: f64| buckets.iter().find(|b| b.less_than == le).map(|b| b.count);
    assert_eq!(count_at(1.0), Some(0.0));
    assert_eq!(count_at(5.0), Some(10.0));

    let text = canary.metrics.encode_prometheus();
    assert!(text.contains("istio_response_bytes_bucket{"));
    // Formatted as the Go client does; Prometheus reads both.
    assert!(text.contains("le=\"1e+08\""));
    assert!(text.contains("istio_request_bytes_sum{"));
}

#[test]
fn tcp_connections_are_counted_with_the_tcp_label_subset() {
    let metrics = Served::new();
    let client = workload("client", "client", "v1");
    let echo = ServiceIdentity::new("echo", "default");
    let peer = metrics.peer_labels(&client, Some(&echo), None);
    let first = metrics.tcp_connection(&peer);
    first.add_sent(100);
    first.add_received(40);
    first.close(&metrics.metrics, &NoFlags);
    let second = metrics.tcp_connection(&peer);
    second.add_sent(5);
    drop(second);
    let failed = metrics.tcp_connection(&peer);
    failed.close(&metrics.metrics, &Flags("UF", 2));

    let scrape = parse(&metrics.encode_prometheus());
    let echo_host = ("destination_service", "echo.default.svc.cluster.local");
    let tcp = ("request_protocol", "tcp");
    assert_eq!(
        sum(
            &scrape,
            "istio_tcp_connections_opened_total",
            &[echo_host, tcp]
        ),
        3.0
    );
    assert_eq!(
        sum(
            &scrape,
            "istio_tcp_connections_closed_total",
            &[echo_host, ("response_flags", "-")]
        ),
        2.0
    );
    assert_eq!(
        sum(
            &scrape,
            "istio_tcp_connections_closed_total",
            &[echo_host, ("response_flags", "UF")]
        ),
        1.0
    );
    assert_eq!(
        sum(&scrape, "istio_tcp_sent_bytes_total", &[echo_host]),
        105.0
    );
    assert_eq!(
        sum(&scrape, "istio_tcp_received_bytes_total", &[echo_host]),
        40.0
    );
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == "istio_tcp_connections_opened_total")
        .expect("a TCP sample");
    assert_eq!(sample.labels.get("response_code"), None, "TCP has no code");
    assert_eq!(sample.labels.get("destination_workload"), Some("unknown"));
}

#[test]
fn series_beyond_the_cap_fold_into_one_overflow_series() {
    let cap = 50;
    let metrics = Served::capped(cap);
    let client = workload("client", "client", "v1");
    let service = ServiceIdentity::new("service-c", "default");
    let peer = metrics.peer_labels(&client, Some(&service), None);
    // Distinct flag sets stand in for any label value that would grow without bound.
    let extra = 25;
    let total = cap + extra;
    let names: Vec<String> = (0..total).map(|i| format!("F{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        let flags = DynFlags(name, u32::try_from(i).expect("small"));
        metrics.record_request(&peer, &outcome(200, &flags));
    }
    let scrape = parse(&metrics.encode_prometheus());
    let series = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "istio_requests_total")
        .count();
    assert_eq!(series, cap + 1, "cap plus the overflow series");
    assert_eq!(
        sum(
            &scrape,
            "istio_requests_total",
            &[("destination_service", "overflow")]
        ),
        extra as f64
    );
    assert_eq!(
        sum(&scrape, "istio_requests_total", &[]),
        total as f64,
        "nothing is lost"
    );
    assert_eq!(
        sum(
            &scrape,
            "mesh_telemetry_series_overflow_total",
            &[("family", "istio_requests")]
        ),
        extra as f64
    );
}

struct DynFlags<'a>(&'a str, u32);

impl fmt::Display for DynFlags<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl FlagsLabel for DynFlags<'_> {
    fn key(&self) -> u32 {
        self.1
    }
}

#[test]
fn the_default_cap_is_ten_thousand_series() {
    assert_eq!(MAX_SERIES_PER_FAMILY, 10_000);
}

#[test]
fn grpc_requests_carry_their_status() {
    let metrics = Served::new();
    let client = workload("client", "client", "v1");
    let service = ServiceIdentity::new("greeter", "default");
    let peer = metrics.peer_labels(&client, Some(&service), None);
    let mut grpc = outcome(200, &NoFlags);
    grpc.protocol = Protocol::Grpc;
    grpc.grpc_status = Some(14);
    metrics.record_request(&peer, &grpc);
    // Out of range: reported as UNKNOWN (2) so a broken peer cannot widen the label set.
    grpc.grpc_status = Some(9_999);
    metrics.record_request(&peer, &grpc);
    let scrape = parse(&metrics.encode_prometheus());
    let grpc_label = ("request_protocol", "grpc");
    assert_eq!(
        sum(
            &scrape,
            "istio_requests_total",
            &[grpc_label, ("grpc_response_status", "14")]
        ),
        1.0
    );
    assert_eq!(
        sum(
            &scrape,
            "istio_requests_total",
            &[grpc_label, ("grpc_response_status", "2")]
        ),
        1.0
    );
}

/// Not a benchmark: prints what recording costs so a regression is visible in test output.
#[test]
fn recording_cost() {
    let metrics = Served::new();
    let client = workload("client", "client", "v1");
    let service = ServiceIdentity::new("service-c", "default");
    let peer = metrics.peer_labels(&client, Some(&service), None);
    let ok = outcome(200, &NoFlags);
    metrics.record_request(&peer, &ok);
    let n = 100_000u32;
    let started = std::time::Instant::now();
    for _ in 0..n {
        metrics.record_request(&peer, &ok);
    }
    let per_request = started.elapsed() / n;
    println!("record_request: {} ns/op", per_request.as_nanos());
}
