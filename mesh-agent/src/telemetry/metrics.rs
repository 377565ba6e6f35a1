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
    borrow::Borrow,
    fmt,
    hash::{Hash, Hasher},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, OnceLock, PoisonError, RwLock,
    },
    time::Duration,
};

use foldhash::HashMap;

use prometheus_client::{
    encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use crate::{
    engine::ResponseFlags,
    identity::{spiffe::SpiffeId, ServiceIdentity, WorkloadIdentity, UNKNOWN},
};

/// Most series one metric family holds; later label sets go to the `overflow` series.
pub const MAX_SERIES_PER_FAMILY: usize = 10_000;

/// Istio's `reporter` label. The agent proxies on the client's behalf, where a sidecar would
/// report from the client side, so it reports as `source` (`waypoint` would make Kiali expect a
/// waypoint proxy in the graph); the agent at the far end of a tunnel reports `destination`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Reporter {
    #[default]
    Source,
    Destination,
}

impl Reporter {
    fn label(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// How a connection was secured, and who its ends proved to be: `Some` only inside a mutual
/// TLS tunnel (`connection_security_policy="mutual_tls"`, both principals); otherwise the
/// principals are `unknown` and the policy `none` (plaintext, Istio's PERMISSIVE).
#[derive(Clone, Copy, Debug, Default)]
pub struct Security<'a> {
    pub reporter: Reporter,
    pub principals: Option<(&'a SpiffeId, &'a SpiffeId)>,
}

const MUTUAL_TLS: &str = "mutual_tls";
const PLAINTEXT: &str = "none";
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

/// Istio's request and TCP metrics, registered on the agent's registry. Create one, share it
/// (`Arc<Metrics>`) with the data path.
pub struct Metrics {
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
    limit_hits: Family<[(&'static str, &'static str); 1], Counter>,
    authorization_denials: Family<[(&'static str, &'static str); 1], Counter>,
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

impl Metrics {
    /// Registers the `istio_*` families on `registry` (the agent's root: Istio's names have no
    /// prefix) and `mesh_telemetry_series_overflow_total`. `cluster` fills `source_cluster` and
    /// `destination_cluster`.
    pub fn new(cluster: &str, registry: &mut Registry) -> Self {
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
        registry.sub_registry_with_prefix("mesh").register(
            "telemetry_series_overflow",
            "Recordings folded into the overflow series because a family reached its series cap",
            series_overflow.clone(),
        );

        let limit_hits = Family::default();
        registry.sub_registry_with_prefix("mesh").register(
            "proxy_limit_hits",
            "Connections closed or refused, and requests degraded, because the data path hit one \
             of its bounds (`limit`: which)",
            limit_hits.clone(),
        );

        let authorization_denials = Family::default();
        registry.sub_registry_with_prefix("mesh").register(
            "authorization_denials",
            "Connections reset and requests answered 403 at their destination because its \
             AuthorizationPolicies deny them (`layer`: connection or request)",
            authorization_denials.clone(),
        );

        let overflow_peer = Arc::new(PeerLabels::new(Arc::new(PeerValues::overflow())));

        Metrics {
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
            limit_hits,
            authorization_denials,
            cluster: Arc::from(cluster),
            max_series: MAX_SERIES_PER_FAMILY,
        }
    }

    /// Counts one hit of the data path's bound `limit` (`mesh_proxy_limit_hits_total`).
    pub fn limit_hit(&self, limit: &'static str) {
        self.limit_hits.get_or_create(&[("limit", limit)]).inc();
    }

    /// Counts one connection or request denied by authorization policy
    /// (`mesh_authorization_denials_total`).
    pub fn authorization_denied(&self, layer: &'static str) {
        self.authorization_denials
            .get_or_create(&[("layer", layer)])
            .inc();
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
        self.secured_peer_labels(source, service, destination, Security::default())
    }

    /// [`Self::peer_labels`] for traffic reported by `security.reporter`, inside a tunnel
    /// between `security.principals` if any.
    pub fn secured_peer_labels(
        &self,
        source: &WorkloadIdentity,
        service: Option<&ServiceIdentity>,
        destination: Option<&WorkloadIdentity>,
        security: Security<'_>,
    ) -> Arc<PeerLabels> {
        let values = PeerValues::new(source, service, destination, &self.cluster, security);
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = peers.get(&values as &dyn PeerKey) {
            return Arc::clone(existing);
        }
        // A peer is at least one series of some family, so the same cap bounds the map.
        if peers.len() >= self.max_series {
            return Arc::clone(&self.overflow_peer);
        }
        let values = Arc::new(values.map(Box::from));
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

/// The label values a peer contributes: owned (`Box<str>`) once interned, borrowed (`&str`)
/// to look an interned peer up without copying its strings. Both hash and compare alike.
#[derive(Debug, PartialEq, Eq, Hash)]
struct PeerValues<S = Box<str>> {
    reporter: &'static str,
    source_principal: S,
    destination_principal: S,
    connection_security_policy: &'static str,
    source_workload: S,
    source_canonical_service: S,
    source_canonical_revision: S,
    source_workload_namespace: S,
    source_app: S,
    source_version: S,
    source_cluster: S,
    destination_workload: S,
    destination_workload_namespace: S,
    destination_app: S,
    destination_version: S,
    destination_service: S,
    destination_canonical_service: S,
    destination_canonical_revision: S,
    destination_service_name: S,
    destination_service_namespace: S,
    destination_cluster: S,
}

/// A peer's values whatever holds their strings: what the interned peers are looked up by.
trait PeerKey {
    fn values(&self) -> PeerValues<&str>;
}

impl<S: AsRef<str>> PeerKey for PeerValues<S> {
    fn values(&self) -> PeerValues<&str> {
        self.map(|value| value)
    }
}

impl Hash for dyn PeerKey + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.values().hash(state);
    }
}

impl PartialEq for dyn PeerKey + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.values() == other.values()
    }
}

impl Eq for dyn PeerKey + '_ {}

/// Borrowed values find an interned peer (`Arc<PeerValues>` hashes as `PeerValues<&str>`
/// does: field by field, each a `str`).
impl<'a> Borrow<dyn PeerKey + 'a> for Arc<PeerValues> {
    fn borrow(&self) -> &(dyn PeerKey + 'a) {
        &**self
    }
}

impl<S: AsRef<str>> PeerValues<S> {
    /// The same values, each passed through `to`.
    fn map<'s, T>(&'s self, to: impl Fn(&'s str) -> T) -> PeerValues<T> {
        PeerValues {
            reporter: self.reporter,
            source_principal: to(self.source_principal.as_ref()),
            destination_principal: to(self.destination_principal.as_ref()),
            connection_security_policy: self.connection_security_policy,
            source_workload: to(self.source_workload.as_ref()),
            source_canonical_service: to(self.source_canonical_service.as_ref()),
            source_canonical_revision: to(self.source_canonical_revision.as_ref()),
            source_workload_namespace: to(self.source_workload_namespace.as_ref()),
            source_app: to(self.source_app.as_ref()),
            source_version: to(self.source_version.as_ref()),
            source_cluster: to(self.source_cluster.as_ref()),
            destination_workload: to(self.destination_workload.as_ref()),
            destination_workload_namespace: to(self.destination_workload_namespace.as_ref()),
            destination_app: to(self.destination_app.as_ref()),
            destination_version: to(self.destination_version.as_ref()),
            destination_service: to(self.destination_service.as_ref()),
            destination_canonical_service: to(self.destination_canonical_service.as_ref()),
            destination_canonical_revision: to(self.destination_canonical_revision.as_ref()),
            destination_service_name: to(self.destination_service_name.as_ref()),
            destination_service_namespace: to(self.destination_service_namespace.as_ref()),
            destination_cluster: to(self.destination_cluster.as_ref()),
        }
    }
}

impl<'a> PeerValues<&'a str> {
    fn new(
        source: &'a WorkloadIdentity,
        service: Option<&'a ServiceIdentity>,
        destination: Option<&'a WorkloadIdentity>,
        cluster: &'a str,
        security: Security<'a>,
    ) -> Self {
        let (source_principal, destination_principal) = match security.principals {
            Some((source, destination)) => (source.as_str(), destination.as_str()),
            None => (UNKNOWN, UNKNOWN),
        };
        let dst = |field: fn(&'a WorkloadIdentity) -> &'a str| destination.map_or(UNKNOWN, field);
        let svc = |field: fn(&'a ServiceIdentity) -> &'a str| service.map_or(UNKNOWN, field);
        PeerValues {
            reporter: security.reporter.label(),
            source_principal,
            destination_principal,
            connection_security_policy: if security.principals.is_some() {
                MUTUAL_TLS
            } else {
                PLAINTEXT
            },
            source_workload: &source.workload,
            source_canonical_service: &source.canonical_service,
            source_canonical_revision: &source.canonical_revision,
            source_workload_namespace: &source.namespace,
            source_app: &source.app,
            source_version: &source.version,
            source_cluster: cluster,
            destination_workload: dst(|w| &w.workload),
            destination_workload_namespace: dst(|w| &w.namespace),
            destination_app: dst(|w| &w.app),
            destination_version: dst(|w| &w.version),
            destination_service: svc(|s| &s.host),
            destination_canonical_service: dst(|w| &w.canonical_service),
            destination_canonical_revision: dst(|w| &w.canonical_revision),
            destination_service_name: svc(|s| &s.name),
            destination_service_namespace: svc(|s| &s.namespace),
            // Without multicluster, a known destination is in our cluster.
            destination_cluster: if service.is_some() || destination.is_some() {
                cluster
            } else {
                UNKNOWN
            },
        }
    }
}

impl PeerValues {
    fn overflow() -> Self {
        let o = || Box::from(OVERFLOW);
        PeerValues {
            reporter: OVERFLOW,
            source_principal: o(),
            destination_principal: o(),
            connection_security_policy: OVERFLOW,
            source_workload: o(),
            source_canonical_service: o(),
            source_canonical_revision: o(),
            source_workload_namespace: o(),
            source_app: o(),
            source_version: o(),
            source_cluster: o(),
            destination_workload: o(),
            destination_workload_namespace: o(),
            destination_app: o(),
            destination_version: o(),
            destination_service: o(),
            destination_canonical_service: o(),
            destination_canonical_revision: o(),
            destination_service_name: o(),
            destination_service_namespace: o(),
            destination_cluster: o(),
        }
    }

    /// Istio's labels shared by request and TCP metrics, in the order Istio emits them.
    fn pairs<'a>(&'a self, response_flags: &'a str) -> [(&'static str, &'a str); 22] {
        [
            ("reporter", self.reporter),
            ("source_workload", &self.source_workload),
            ("source_canonical_service", &self.source_canonical_service),
            ("source_canonical_revision", &self.source_canonical_revision),
            ("source_workload_namespace", &self.source_workload_namespace),
            ("source_principal", &self.source_principal),
            ("source_app", &self.source_app),
            ("source_version", &self.source_version),
            ("source_cluster", &self.source_cluster),
            ("destination_workload", &self.destination_workload),
            (
                "destination_workload_namespace",
                &self.destination_workload_namespace,
            ),
            ("destination_principal", &self.destination_principal),
            ("destination_app", &self.destination_app),
            ("destination_version", &self.destination_version),
            ("destination_service", &self.destination_service),
            (
                "destination_canonical_service",
                &self.destination_canonical_service,
            ),
            (
                "destination_canonical_revision",
                &self.destination_canonical_revision,
            ),
            ("destination_service_name", &self.destination_service_name),
            (
                "destination_service_namespace",
                &self.destination_service_namespace,
            ),
            ("destination_cluster", &self.destination_cluster),
            ("response_flags", response_flags),
            (
                "connection_security_policy",
                self.connection_security_policy,
            ),
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn engine_flags_keys_are_one_to_one_with_their_text() {
        let mut seen = std::collections::HashMap::new();
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
    fn the_same_labels_intern_to_one_peer() {
        let metrics = Metrics::new(DEFAULT_CLUSTER, &mut Registry::default());
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
