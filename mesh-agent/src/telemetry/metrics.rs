//! Prometheus metrics: Istio's standard request and TCP metrics under Istio's names and label
//! names (so Kiali and the Istio Grafana dashboards read them unchanged), plus the agent's own
//! `mesh_*` metrics.
//!
//! Cost on the data path: label values are built once per [`PeerLabels`] (source workload →
//! destination service/workload), which the proxy keeps next to its upstream endpoint. Recording
//! a request is then one lookup in that peer's small map (keyed by protocol, status, gRPC status
//! and response flags, all integers) and a few atomic adds; no string is formatted per request.
//!
//! Cardinality: every label value comes from the mesh's own registry ([`WorkloadIdentity`],
//! [`ServiceIdentity`]); a destination the mesh does not know is `unknown`. On top of that, each
//! metric family holds at most [`MAX_SERIES_PER_FAMILY`] series: label sets beyond that are folded
//! into one series whose labels all read `overflow`, and `mesh_telemetry_series_overflow_total`
//! counts the folded recordings.

use std::{
    collections::HashMap,
    fmt,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, OnceLock, PoisonError, RwLock,
    },
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{
        text, DescriptorEncoder, EncodeLabel, EncodeLabelSet, EncodeMetric, LabelSetEncoder,
    },
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::Histogram,
        MetricType,
    },
    registry::Registry,
};

use super::otlp::ExportStats;
use crate::{
    engine::{EngineMetrics, ResponseFlags},
    identity::{ServiceIdentity, WorkloadIdentity, UNKNOWN},
};

/// `Content-Type` of [`Metrics::encode`] (OpenMetrics text, which Prometheus prefers).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of [`Metrics::encode_prometheus`] (the classic text format, for `curl` and
/// scrapers that do not ask for OpenMetrics).
pub const PROMETHEUS_CONTENT_TYPE: &str =
    prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Most series one metric family holds; later label sets go to the `overflow` series.
pub const MAX_SERIES_PER_FAMILY: usize = 10_000;

/// Istio's `reporter` label. The agent proxies on the client's behalf, where a sidecar would
/// report from the client side, so it reports as `source` (`waypoint` would make Kiali expect a
/// waypoint proxy in the graph).
const REPORTER: &str = "source";
/// What Istio reports without mTLS; the mesh has no identities yet.
const CONNECTION_SECURITY_POLICY: &str = "none";
const OVERFLOW: &str = "overflow";
/// Istio's default cluster name (`values.global.multiCluster.clusterName`).
pub const DEFAULT_CLUSTER: &str = "Kubernetes";

/// Istio's `istio_request_duration_milliseconds` buckets.
const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's `istio_request_bytes` / `istio_response_bytes` buckets.
const BYTES_BUCKETS: [f64; 9] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8];

/// Envoy response flags as the metrics see them. `key` identifies the set and must be
/// one-to-one with its text (series are cached by it); `Display` renders the label (`-` when
/// there is none, `UF,URX` otherwise) and runs only when a new series is created.
pub trait FlagsLabel: fmt::Display {
    fn key(&self) -> u32;
}

/// The engine's flags, keyed by the flags they contain.
impl FlagsLabel for ResponseFlags {
    fn key(&self) -> u32 {
        // Built from the public constants: a flag added to the engine must be added here, or
        // sets differing only by it would share a series (a test checks every known one).
        ENGINE_FLAGS
            .iter()
            .enumerate()
            .filter(|(_, flag)| self.contains(**flag))
            .fold(0, |key, (bit, _)| key | 1 << bit)
    }
}

const ENGINE_FLAGS: [ResponseFlags; 10] = [
    ResponseFlags::UH,
    ResponseFlags::UF,
    ResponseFlags::UO,
    ResponseFlags::URX,
    ResponseFlags::UT,
    ResponseFlags::NR,
    ResponseFlags::FI,
    ResponseFlags::DI,
    ResponseFlags::UC,
    ResponseFlags::DC,
];

/// No response flags: `-`.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoFlags;

impl fmt::Display for NoFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("-")
    }
}

impl FlagsLabel for NoFlags {
    fn key(&self) -> u32 {
        0
    }
}

/// Istio's `request_protocol` for HTTP-level metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http,
    Grpc,
}

impl Protocol {
    fn label(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
        }
    }
}

/// What one finished request reports.
pub struct RequestOutcome<'a> {
    pub protocol: Protocol,
    /// The status sent to the client (also for responses the mesh made itself: 503, 504, ...).
    pub status: u16,
    /// The `grpc-status` the client got, for gRPC; values above 16 are reported as 2 (UNKNOWN).
    pub grpc_status: Option<u32>,
    pub flags: &'a dyn FlagsLabel,
    /// From the first request byte to the last response byte.
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// Events the engine and proxy count per destination service (`mesh_*_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceEvent {
    /// An endpoint was ejected by outlier detection.
    OutlierEjection,
    /// A retry attempt was made.
    Retry,
    /// A retry was skipped because the retry budget was spent.
    RetryBudgetExhausted,
    /// A request was refused by a connection-pool limit.
    PoolOverflow,
    /// Too many endpoints were ejected, so the balancer used all of them (Envoy's panic mode).
    PanicRouting,
}

/// Whether a config change was applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReloadResult {
    Ok,
    Rejected,
}

/// Reads the kernel's redirect decision counters at scrape time: `(decision, count)` pairs with
/// monotonic counts, e.g. from `Redirect::decision_counts`.
pub type DecisionSource = Box<dyn Fn() -> Vec<(&'static str, u64)> + Send + Sync>;

/// Every metric the agent serves. Create one, share it (`Arc<Metrics>`), encode it at `/metrics`.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestKey, Counter>,
    request_duration: Family<RequestKey, Histogram, fn() -> Histogram>,
    request_bytes: Family<RequestKey, Histogram, fn() -> Histogram>,
    response_bytes: Family<RequestKey, Histogram, fn() -> Histogram>,
    request_series: AtomicUsize,
    /// Created on first use, so a healthy scrape shows no `overflow` series.
    overflow_request: OnceLock<RequestSeries>,
    tcp_opened: Family<TcpKey, Counter>,
    tcp_closed: Family<TcpKey, Counter>,
    tcp_sent: Family<TcpKey, Counter>,
    tcp_received: Family<TcpKey, Counter>,
    tcp_series: AtomicUsize,
    overflow_tcp: OnceLock<TcpSeries>,
    peers: Mutex<HashMap<Arc<PeerValues>, Arc<PeerLabels>>>,
    overflow_peer: Arc<PeerLabels>,
    series_overflow: Family<[(&'static str, &'static str); 1], Counter>,
    /// Per [`ServiceEvent`]: the family and how many series it holds.
    service_events: [(Family<ServiceKey, Counter>, AtomicUsize); 5],
    config_reloads: Family<[(&'static str, &'static str); 1], Counter>,
    enrolled_pods: Gauge,
    scraped: Arc<ScrapeTimeCollector>,
    cluster: Arc<str>,
    max_series: usize,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("request_series", &self.request_series)
            .field("tcp_series", &self.tcp_series)
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(DEFAULT_CLUSTER)
    }
}

impl Metrics {
    /// `cluster` fills `source_cluster` and `destination_cluster`.
    pub fn new(cluster: &str) -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestKey, Counter>::default();
        let request_duration: Family<RequestKey, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS_MS));
        let request_bytes: Family<RequestKey, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(BYTES_BUCKETS));
        let response_bytes: Family<RequestKey, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(BYTES_BUCKETS));
        // prometheus-client appends `_total` to counters, so counters register without it.
        registry.register(
            "istio_requests",
            "Requests proxied, by source, destination and response",
            requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds",
            request_duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body size in bytes",
            request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body size in bytes",
            response_bytes.clone(),
        );

        let tcp_opened = Family::<TcpKey, Counter>::default();
        let tcp_closed = Family::<TcpKey, Counter>::default();
        let tcp_sent = Family::<TcpKey, Counter>::default();
        let tcp_received = Family::<TcpKey, Counter>::default();
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            tcp_closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent by the client to the destination over TCP",
            tcp_sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received by the client from the destination over TCP",
            tcp_received.clone(),
        );

        let series_overflow = Family::default();
        registry.register(
            "mesh_telemetry_series_overflow",
            "Recordings folded into the overflow series because a family reached its series cap",
            series_overflow.clone(),
        );
        let service_events: [(Family<ServiceKey, Counter>, AtomicUsize); 5] = Default::default();
        for (event, (family, _)) in SERVICE_EVENTS.iter().zip(&service_events) {
            registry.register(event.metric_name(), event.help(), family.clone());
        }
        let config_reloads = Family::default();
        registry.register(
            "mesh_config_reloads",
            "Config changes, applied (ok) or refused (rejected)",
            config_reloads.clone(),
        );
        let enrolled_pods = Gauge::default();
        registry.register(
            "mesh_enrolled_pods",
            "Pods whose connections the agent currently intercepts",
            enrolled_pods.clone(),
        );
        let scraped = Arc::new(ScrapeTimeCollector::default());
        registry.register_collector(Box::new(Arc::clone(&scraped)));

        let overflow_peer = Arc::new(PeerLabels::new(Arc::new(PeerValues::overflow())));

        Metrics {
            registry,
            requests,
            request_duration,
            request_bytes,
            response_bytes,
            request_series: AtomicUsize::new(0),
            overflow_request: OnceLock::new(),
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            tcp_series: AtomicUsize::new(0),
            overflow_tcp: OnceLock::new(),
            peers: Mutex::default(),
            overflow_peer,
            series_overflow,
            service_events,
            config_reloads,
            enrolled_pods,
            scraped,
            cluster: Arc::from(cluster),
            max_series: MAX_SERIES_PER_FAMILY,
        }
    }

    /// Lowers (or raises) the series cap of each family from [`MAX_SERIES_PER_FAMILY`].
    pub fn with_max_series(mut self, max_series: usize) -> Self {
        self.max_series = max_series;
        self
    }

    /// The interned labels of traffic from `source` to a destination. `service` is `None` when
    /// the destination is not a service of the mesh (reported as `unknown`); `destination` is
    /// `None` when the endpoint's workload is not known.
    ///
    /// Call it when the destination is decided (per upstream endpoint, say) and keep the result:
    /// it hashes every label value.
    pub fn peer_labels(
        &self,
        source: &WorkloadIdentity,
        service: Option<&ServiceIdentity>,
        destination: Option<&WorkloadIdentity>,
    ) -> Arc<PeerLabels> {
        let values = PeerValues::new(source, service, destination, &self.cluster);
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = peers.get(&values) {
            return Arc::clone(existing);
        }
        // A peer is at least one series of some family, so the same cap bounds the map.
        if peers.len() >= self.max_series {
            return Arc::clone(&self.overflow_peer);
        }
        let values = Arc::new(values);
        let peer = Arc::new(PeerLabels::new(Arc::clone(&values)));
        peers.insert(values, Arc::clone(&peer));
        peer
    }

    /// Records one finished HTTP or gRPC request in the `istio_request*` families.
    pub fn record_request(&self, peer: &PeerLabels, outcome: &RequestOutcome<'_>) {
        let key = OutcomeKey {
            protocol: outcome.protocol,
            status: outcome.status,
            grpc_status: outcome.grpc_status.map(grpc_status_label),
            flags: outcome.flags.key(),
        };
        let cached = peer.requests.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(series) = cached.get(&key) {
            series.record(outcome);
            return;
        }
        drop(cached);
        self.new_request_series(peer, key, outcome).record(outcome);
    }

    fn new_request_series(
        &self,
        peer: &PeerLabels,
        key: OutcomeKey,
        outcome: &RequestOutcome<'_>,
    ) -> RequestSeries {
        let mut cached = peer
            .requests
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(series) = cached.get(&key) {
            return series.clone();
        }
        if !self.reserve(&self.request_series) {
            self.count_overflow("istio_requests");
            return self.overflow_request().clone();
        }
        let labels = RequestKey::Series {
            peer: Arc::clone(&peer.values),
            protocol: key.protocol.label(),
            status: key.status,
            grpc_status: key.grpc_status,
            flags: Arc::from(outcome.flags.to_string()),
        };
        let series = RequestSeries::from_families(
            &labels,
            &self.requests,
            &self.request_duration,
            &self.request_bytes,
            &self.response_bytes,
        );
        cached.insert(key, series.clone());
        series
    }

    /// Counts a TCP connection as opened; the returned handle counts its bytes and its close
    /// (on [`TcpConnectionMetrics::close`], or on drop with no flags).
    pub fn tcp_connection(&self, peer: &Arc<PeerLabels>) -> TcpConnectionMetrics {
        let series = self.tcp_series(peer, &NoFlags);
        series.opened.inc();
        TcpConnectionMetrics {
            series,
            peer: Arc::clone(peer),
            closed: false,
        }
    }

    fn tcp_series(&self, peer: &PeerLabels, flags: &dyn FlagsLabel) -> TcpSeries {
        let key = flags.key();
        if let Some(series) = peer
            .tcp
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return series.clone();
        }
        let mut cached = peer.tcp.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(series) = cached.get(&key) {
            return series.clone();
        }
        if !self.reserve(&self.tcp_series) {
            self.count_overflow("istio_tcp");
            return self.overflow_tcp().clone();
        }
        let labels = TcpKey::Series {
            peer: Arc::clone(&peer.values),
            flags: Arc::from(flags.to_string()),
        };
        let series = TcpSeries::from_families(
            &labels,
            [
                &self.tcp_opened,
                &self.tcp_closed,
                &self.tcp_sent,
                &self.tcp_received,
            ],
        );
        cached.insert(key, series.clone());
        series
    }

    /// Counts an engine or proxy event for a destination service (`None`: not a mesh service).
    pub fn record_service_event(&self, event: ServiceEvent, service: Option<&ServiceIdentity>) {
        let (family, series) = &self.service_events[event as usize];
        let key = ServiceKey(Arc::from(service.map_or(UNKNOWN, |s| s.host.as_str())));
        if let Some(counter) = family.get(&key) {
            counter.inc();
            return;
        }
        // Two racing first recordings may both reserve: the count stays an upper bound.
        if self.reserve(series) {
            family.get_or_create(&key).inc();
        } else {
            self.count_overflow(event.metric_name());
            family.get_or_create(&ServiceKey(Arc::from(OVERFLOW))).inc();
        }
    }

    pub fn record_config_reload(&self, result: ReloadResult) {
        let value = match result {
            ReloadResult::Ok => "ok",
            ReloadResult::Rejected => "rejected",
        };
        self.config_reloads
            .get_or_create(&[("result", value)])
            .inc();
    }

    pub fn set_enrolled_pods(&self, count: usize) {
        self.enrolled_pods
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Serves `mesh_redirect_decisions_total{decision}` from `source`, called at each scrape
    /// (so the kernel's per-CPU counters are read only when someone looks). Replaces any
    /// previous source.
    pub fn register_decision_source(&self, source: DecisionSource) {
        *self
            .scraped
            .decisions
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(source);
    }

    /// Serves the engine's own counters as `mesh_engine_events_total{event}` (no per-service
    /// label: the engine counts globally), read at each scrape.
    pub fn register_engine(&self, engine: Arc<EngineMetrics>) {
        *self
            .scraped
            .engine
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(engine);
    }

    /// Serves `mesh_trace_spans_total{outcome="exported"|"dropped"|"failed"}` from the span
    /// exporter's counters ([`SpanExporter::stats`](super::otlp::SpanExporter::stats)).
    pub fn register_span_export(&self, stats: Arc<ExportStats>) {
        *self
            .scraped
            .spans
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(stats);
    }

    /// Serves `mesh_access_log_dropped_lines_total` from the access log's drop counter
    /// ([`AccessLog::dropped`](super::access_log::AccessLog::dropped)).
    pub fn register_access_log(&self, dropped: Arc<AtomicU64>) {
        *self
            .scraped
            .access_log_dropped
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(dropped);
    }

    /// All metrics in OpenMetrics text, ending with `# EOF`; serve with
    /// [`OPENMETRICS_CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; an encoder error would be a bug in a label set.
        if let Err(error) = text::encode(&mut out, &self.registry) {
            tracing::warn!(%error, "encoding metrics failed");
        }
        out
    }

    /// All metrics in the Prometheus text format 0.0.4; serve with [`PROMETHEUS_CONTENT_TYPE`].
    pub fn encode_prometheus(&self) -> String {
        let mut out = String::new();
        if let Err(error) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::warn!(%error, "encoding metrics failed");
        }
        out
    }

    /// The body and `Content-Type` for a scrape with this `Accept` header: OpenMetrics when the
    /// client asks for it (Prometheus does), the classic text format otherwise.
    pub fn render(&self, accept: Option<&str>) -> (&'static str, String) {
        if accept.is_some_and(|accept| accept.contains("application/openmetrics-text")) {
            (OPENMETRICS_CONTENT_TYPE, self.encode())
        } else {
            (PROMETHEUS_CONTENT_TYPE, self.encode_prometheus())
        }
    }

    fn count_overflow(&self, family: &'static str) {
        self.series_overflow
            .get_or_create(&[("family", family)])
            .inc();
    }

    /// Takes one slot of a family's series budget; false when the family is full.
    fn reserve(&self, count: &AtomicUsize) -> bool {
        count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max_series).then_some(n + 1)
            })
            .is_ok()
    }

    fn overflow_request(&self) -> &RequestSeries {
        self.overflow_request.get_or_init(|| {
            RequestSeries::from_families(
                &RequestKey::Overflow,
                &self.requests,
                &self.request_duration,
                &self.request_bytes,
                &self.response_bytes,
            )
        })
    }

    fn overflow_tcp(&self) -> &TcpSeries {
        self.overflow_tcp.get_or_init(|| {
            TcpSeries::from_families(
                &TcpKey::Overflow,
                [
                    &self.tcp_opened,
                    &self.tcp_closed,
                    &self.tcp_sent,
                    &self.tcp_received,
                ],
            )
        })
    }
}

/// gRPC defines codes 0..=16; anything else is a broken peer and must not widen the label set.
fn grpc_status_label(status: u32) -> u8 {
    u8::try_from(status).ok().filter(|s| *s <= 16).unwrap_or(2)
}

/// The interned labels of one (source workload, destination service, destination workload),
/// with the series already recorded for it. Get one from [`Metrics::peer_labels`].
pub struct PeerLabels {
    values: Arc<PeerValues>,
    requests: RwLock<HashMap<OutcomeKey, RequestSeries>>,
    tcp: RwLock<HashMap<u32, TcpSeries>>,
}

impl fmt::Debug for PeerLabels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PeerLabels").field(&self.values).finish()
    }
}

impl PeerLabels {
    fn new(values: Arc<PeerValues>) -> Self {
        PeerLabels {
            values,
            requests: RwLock::default(),
            tcp: RwLock::default(),
        }
    }

    /// The `destination_service` label (`unknown` outside the mesh).
    pub fn destination_service(&self) -> &str {
        &self.values.destination_service
    }
}

/// The per-request part of a request series' labels, as integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct OutcomeKey {
    protocol: Protocol,
    status: u16,
    grpc_status: Option<u8>,
    flags: u32,
}

/// The label values a peer contributes, rendered once.
#[derive(Debug, PartialEq, Eq, Hash)]
struct PeerValues {
    source_workload: Box<str>,
    source_workload_namespace: Box<str>,
    source_app: Box<str>,
    source_version: Box<str>,
    source_cluster: Box<str>,
    destination_workload: Box<str>,
    destination_workload_namespace: Box<str>,
    destination_app: Box<str>,
    destination_version: Box<str>,
    destination_service: Box<str>,
    destination_service_name: Box<str>,
    destination_service_namespace: Box<str>,
    destination_cluster: Box<str>,
}

impl PeerValues {
    fn new(
        source: &WorkloadIdentity,
        service: Option<&ServiceIdentity>,
        destination: Option<&WorkloadIdentity>,
        cluster: &str,
    ) -> Self {
        let dst =
            |field: fn(&WorkloadIdentity) -> &str| Box::from(destination.map_or(UNKNOWN, field));
        let svc = |field: fn(&ServiceIdentity) -> &str| Box::from(service.map_or(UNKNOWN, field));
        PeerValues {
            source_workload: source.workload.as_str().into(),
            source_workload_namespace: source.namespace.as_str().into(),
            source_app: source.app.as_str().into(),
            source_version: source.version.as_str().into(),
            source_cluster: cluster.into(),
            destination_workload: dst(|w| &w.workload),
            destination_workload_namespace: dst(|w| &w.namespace),
            destination_app: dst(|w| &w.app),
            destination_version: dst(|w| &w.version),
            destination_service: svc(|s| &s.host),
            destination_service_name: svc(|s| &s.name),
            destination_service_namespace: svc(|s| &s.namespace),
            // Without multicluster, a known destination is in our cluster.
            destination_cluster: if service.is_some() || destination.is_some() {
                cluster.into()
            } else {
                UNKNOWN.into()
            },
        }
    }

    fn overflow() -> Self {
        let o = || Box::from(OVERFLOW);
        PeerValues {
            source_workload: o(),
            source_workload_namespace: o(),
            source_app: o(),
            source_version: o(),
            source_cluster: o(),
            destination_workload: o(),
            destination_workload_namespace: o(),
            destination_app: o(),
            destination_version: o(),
            destination_service: o(),
            destination_service_name: o(),
            destination_service_namespace: o(),
            destination_cluster: o(),
        }
    }

    /// Istio's labels shared by request and TCP metrics, in the order Istio emits them.
    fn pairs<'a>(&'a self, response_flags: &'a str) -> [(&'static str, &'a str); 18] {
        [
            ("reporter", REPORTER),
            ("source_workload", &self.source_workload),
            ("source_workload_namespace", &self.source_workload_namespace),
            ("source_principal", UNKNOWN),
            ("source_app", &self.source_app),
            ("source_version", &self.source_version),
            ("source_cluster", &self.source_cluster),
            ("destination_workload", &self.destination_workload),
            (
                "destination_workload_namespace",
                &self.destination_workload_namespace,
            ),
            ("destination_principal", UNKNOWN),
            ("destination_app", &self.destination_app),
            ("destination_version", &self.destination_version),
            ("destination_service", &self.destination_service),
            ("destination_service_name", &self.destination_service_name),
            (
                "destination_service_namespace",
                &self.destination_service_namespace,
            ),
            ("destination_cluster", &self.destination_cluster),
            ("response_flags", response_flags),
            ("connection_security_policy", CONNECTION_SECURITY_POLICY),
        ]
    }
}

fn encode_pairs(encoder: &mut LabelSetEncoder, pairs: &[(&str, &str)]) -> fmt::Result {
    for pair in pairs {
        pair.encode(encoder.encode_label())?;
    }
    Ok(())
}

/// The label set of one `istio_request*` series.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum RequestKey {
    Series {
        peer: Arc<PeerValues>,
        protocol: &'static str,
        status: u16,
        grpc_status: Option<u8>,
        flags: Arc<str>,
    },
    Overflow,
}

impl EncodeLabelSet for RequestKey {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> fmt::Result {
        match self {
            RequestKey::Series {
                peer,
                protocol,
                status,
                grpc_status,
                flags,
            } => {
                encode_pairs(encoder, &peer.pairs(flags))?;
                // Runs at scrape time only, so formatting here costs the data path nothing.
                let status = status.to_string();
                let grpc_status = grpc_status.map(|s| s.to_string()).unwrap_or_default();
                encode_pairs(
                    encoder,
                    &[
                        ("request_protocol", protocol),
                        ("response_code", &status),
                        ("grpc_response_status", &grpc_status),
                    ],
                )
            }
            RequestKey::Overflow => {
                encode_pairs(encoder, &PeerValues::overflow().pairs(OVERFLOW))?;
                encode_pairs(
                    encoder,
                    &[
                        ("request_protocol", OVERFLOW),
                        ("response_code", OVERFLOW),
                        ("grpc_response_status", OVERFLOW),
                    ],
                )
            }
        }
    }
}

/// The label set of one `istio_tcp_*` series.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum TcpKey {
    Series {
        peer: Arc<PeerValues>,
        flags: Arc<str>,
    },
    Overflow,
}

impl EncodeLabelSet for TcpKey {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> fmt::Result {
        match self {
            TcpKey::Series { peer, flags } => encode_pairs(encoder, &peer.pairs(flags))?,
            TcpKey::Overflow => encode_pairs(encoder, &PeerValues::overflow().pairs(OVERFLOW))?,
        }
        encode_pairs(encoder, &[("request_protocol", "tcp")])
    }
}

/// `destination_service` of the `mesh_*` per-service counters.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ServiceKey(Arc<str>);

impl EncodeLabelSet for ServiceKey {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> fmt::Result {
        encode_pairs(encoder, &[("destination_service", &self.0)])
    }
}

const SERVICE_EVENTS: [ServiceEvent; 5] = [
    ServiceEvent::OutlierEjection,
    ServiceEvent::Retry,
    ServiceEvent::RetryBudgetExhausted,
    ServiceEvent::PoolOverflow,
    ServiceEvent::PanicRouting,
];

impl ServiceEvent {
    /// The family name without prometheus-client's `_total` suffix.
    fn metric_name(self) -> &'static str {
        match self {
            ServiceEvent::OutlierEjection => "mesh_outlier_ejections",
            ServiceEvent::Retry => "mesh_retries",
            ServiceEvent::RetryBudgetExhausted => "mesh_retry_budget_exhausted",
            ServiceEvent::PoolOverflow => "mesh_pool_overflows",
            ServiceEvent::PanicRouting => "mesh_panic_routing",
        }
    }

    fn help(self) -> &'static str {
        match self {
            ServiceEvent::OutlierEjection => "Endpoints ejected by outlier detection",
            ServiceEvent::Retry => "Retry attempts made",
            ServiceEvent::RetryBudgetExhausted => "Retries skipped because the budget was spent",
            ServiceEvent::PoolOverflow => "Requests refused by a connection-pool limit",
            ServiceEvent::PanicRouting => {
                "Requests balanced over all endpoints because too many were ejected"
            }
        }
    }
}

/// Handles to one request series in each `istio_request*` family (clones share the values).
#[derive(Clone)]
struct RequestSeries {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl RequestSeries {
    fn from_families(
        key: &RequestKey,
        requests: &Family<RequestKey, Counter>,
        duration: &Family<RequestKey, Histogram, fn() -> Histogram>,
        request_bytes: &Family<RequestKey, Histogram, fn() -> Histogram>,
        response_bytes: &Family<RequestKey, Histogram, fn() -> Histogram>,
    ) -> Self {
        RequestSeries {
            requests: requests.get_or_create_owned(key),
            duration: duration.get_or_create_owned(key),
            request_bytes: request_bytes.get_or_create_owned(key),
            response_bytes: response_bytes.get_or_create_owned(key),
        }
    }

    fn record(&self, outcome: &RequestOutcome<'_>) {
        self.requests.inc();
        self.duration
            .observe(outcome.duration.as_secs_f64() * 1000.0);
        self.request_bytes.observe(outcome.request_bytes as f64);
        self.response_bytes.observe(outcome.response_bytes as f64);
    }
}

/// Handles to one series in each `istio_tcp_*` family.
#[derive(Clone)]
struct TcpSeries {
    opened: Counter,
    closed: Counter,
    sent: Counter,
    received: Counter,
}

impl TcpSeries {
    fn from_families(key: &TcpKey, families: [&Family<TcpKey, Counter>; 4]) -> Self {
        let [opened, closed, sent, received] = families.map(|f| f.get_or_create_owned(key));
        TcpSeries {
            opened,
            closed,
            sent,
            received,
        }
    }
}

/// One open TCP connection's metrics. Add bytes as they flow (so long connections show up
/// before they end), then [`close`](Self::close) it; dropping it closes it with no flags.
pub struct TcpConnectionMetrics {
    series: TcpSeries,
    peer: Arc<PeerLabels>,
    closed: bool,
}

impl TcpConnectionMetrics {
    /// Bytes from the client to the destination.
    pub fn add_sent(&self, bytes: u64) {
        self.series.sent.inc_by(bytes);
    }

    /// Bytes from the destination to the client.
    pub fn add_received(&self, bytes: u64) {
        self.series.received.inc_by(bytes);
    }

    /// Counts the close, under `flags` (e.g. `UF` when the upstream connect failed).
    pub fn close(mut self, metrics: &Metrics, flags: &dyn FlagsLabel) {
        self.closed = true;
        let series = if flags.key() == NoFlags.key() {
            self.series.clone()
        } else {
            metrics.tcp_series(&self.peer, flags)
        };
        series.closed.inc();
    }
}

impl Drop for TcpConnectionMetrics {
    fn drop(&mut self) {
        if !self.closed {
            self.series.closed.inc();
        }
    }
}

/// Counters owned elsewhere (the kernel, the span exporter), read when `/metrics` is scraped.
#[derive(Default)]
struct ScrapeTimeCollector {
    decisions: RwLock<Option<DecisionSource>>,
    spans: RwLock<Option<Arc<ExportStats>>>,
    engine: RwLock<Option<Arc<EngineMetrics>>>,
    access_log_dropped: RwLock<Option<Arc<AtomicU64>>>,
}

impl fmt::Debug for ScrapeTimeCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScrapeTimeCollector")
            .finish_non_exhaustive()
    }
}

impl ScrapeTimeCollector {
    fn encode_counters(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        label: &str,
        counts: &[(&str, u64)],
    ) -> fmt::Result {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (value, count) in counts {
            ConstCounter::new(*count).encode(family.encode_family(&[(label, *value)])?)?;
        }
        Ok(())
    }
}

impl Collector for ScrapeTimeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let decisions = self
            .decisions
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(source) = decisions.as_ref() {
            Self::encode_counters(
                &mut encoder,
                "mesh_redirect_decisions",
                "Connections seen by the kernel redirect, by decision",
                "decision",
                &source(),
            )?;
        }
        let engine = self.engine.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(engine) = engine.as_ref() {
            let get = EngineMetrics::get;
            Self::encode_counters(
                &mut encoder,
                "mesh_engine_events",
                "Decisions of the L7 engine, by kind",
                "event",
                &[
                    ("request", get(&engine.requests)),
                    ("no_route", get(&engine.no_route)),
                    ("no_healthy_upstream", get(&engine.no_healthy_upstream)),
                    ("ejection", get(&engine.ejections)),
                    ("ejection_overflow", get(&engine.ejections_overflow)),
                    ("unejection", get(&engine.unejections)),
                    ("panic_routing", get(&engine.panic_routing)),
                    ("retry", get(&engine.retries)),
                    (
                        "retry_budget_exhausted",
                        get(&engine.retry_budget_exhausted),
                    ),
                    ("retry_overflow", get(&engine.retry_overflow)),
                    ("pool_overflow", get(&engine.pool_overflow)),
                    ("fault_abort", get(&engine.fault_aborts)),
                    ("fault_delay", get(&engine.fault_delays)),
                    ("mirrored", get(&engine.mirrored)),
                ],
            )?;
        }
        let spans = self.spans.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(stats) = spans.as_ref() {
            Self::encode_counters(
                &mut encoder,
                "mesh_trace_spans",
                "Spans handed to the OTLP exporter, by outcome",
                "outcome",
                &[
                    ("exported", stats.exported()),
                    ("dropped", stats.dropped()),
                    ("failed", stats.failed()),
                ],
            )?;
        }
        let dropped = self
            .access_log_dropped
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(dropped) = dropped.as_ref() {
            ConstCounter::new(dropped.load(Ordering::Relaxed)).encode(
                encoder.encode_descriptor(
                    "mesh_access_log_dropped_lines",
                    "Access-log lines dropped because the writer could not keep up",
                    None,
                    MetricType::Counter,
                )?,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn engine_flags_keys_are_one_to_one_with_their_text() {
        let mut seen = HashMap::new();
        for bits in 0u32..(1 << ENGINE_FLAGS.len()) {
            let flags = ENGINE_FLAGS
                .iter()
                .enumerate()
                .filter(|(bit, _)| bits & (1 << bit) != 0)
                .fold(ResponseFlags::NONE, |set, (_, flag)| set | *flag);
            assert_eq!(flags.key(), bits);
            assert!(seen.insert(flags.to_string(), bits).is_none(), "{flags}");
        }
        assert_eq!(ResponseFlags::NONE.key(), NoFlags.key());
        assert_eq!(ResponseFlags::NONE.to_string(), NoFlags.to_string());
    }

    #[test]
    fn engine_counters_are_read_at_scrape_time() {
        let metrics = Metrics::default();
        let engine = Arc::new(EngineMetrics::default());
        metrics.register_engine(Arc::clone(&engine));
        engine.retries.fetch_add(4, Ordering::Relaxed);
        let text = metrics.encode_prometheus();
        assert!(
            text.contains("mesh_engine_events_total{event=\"retry\"} 4"),
            "{text}"
        );
        assert!(text.contains("mesh_engine_events_total{event=\"ejection\"} 0"));
    }

    #[test]
    fn access_log_drops_are_read_at_scrape_time() {
        let metrics = Metrics::default();
        let dropped = Arc::new(AtomicU64::new(0));
        metrics.register_access_log(Arc::clone(&dropped));
        dropped.fetch_add(3, Ordering::Relaxed);
        let text = metrics.encode_prometheus();
        assert!(
            text.contains("mesh_access_log_dropped_lines_total 3"),
            "{text}"
        );
    }

    #[test]
    fn the_same_labels_intern_to_one_peer() {
        let metrics = Metrics::default();
        let source = WorkloadIdentity::from_pod_labels("a", "default", &BTreeMap::new());
        let service = ServiceIdentity::new("b", "default");
        let first = metrics.peer_labels(&source, Some(&service), None);
        let second = metrics.peer_labels(&source, Some(&service), None);
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(first.destination_service(), "b.default.svc.cluster.local");
        let unknown = metrics.peer_labels(&source, None, None);
        assert_eq!(unknown.destination_service(), "unknown");
    }
}
