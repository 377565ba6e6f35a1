//! The validated mesh configuration: what the engine and proxy consume.
//!
//! Built from raw Kubernetes objects by `config::parse` ("parse, don't validate"): every value
//! here has already been checked (weights are not all zero, durations are non-negative, regexes
//! compile, subsets exist, header values are legal), so the engine never re-checks. Gateway API
//! routes (`HTTPRoute`) are translated into the same [`VirtualService`]s: one engine, two front
//! doors.
//! Optional sections stay `Option` where "absent" and "default" differ for Istio semantics
//! (e.g. retries absent ⇒ Istio's default policy, resolved by the engine); otherwise defaults are
//! filled in here and documented in `docs/configuration.md`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use k8s_openapi::jiff::Timestamp;
use regex::Regex;

/// `namespace/name` of a Kubernetes object; namespace defaults to `default`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

/// A host as written in a rule (`service-c`, `service-c.ns`, `service-c.ns.svc.cluster.local`,
/// or `*`), with the namespace of the object it appeared in, which short names resolve against.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Host {
    pub name: String,
    pub namespace: String,
}

impl Host {
    /// Expands Kubernetes short names (`svc`, `svc.ns`, `svc.ns.svc`) so that a reference and a
    /// rule written differently for the same service compare equal, when rules are checked
    /// and merged; resolving a request's host is the service registry's job.
    pub fn reference_key(&self) -> String {
        let name = self.name.trim_end_matches('.').to_ascii_lowercase();
        match name.matches('.').count() {
            _ if name.starts_with('*') => name,
            0 => format!("{name}.{}.svc.cluster.local", self.namespace),
            1 => format!("{name}.svc.cluster.local"),
            2 if name.ends_with(".svc") => format!("{name}.cluster.local"),
            _ => name,
        }
    }
}

/// A percentage in [0, 100], kept as parts per million so decisions use integer arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Percent {
    pub per_million: u32,
}

impl Percent {
    pub const ZERO: Percent = Percent { per_million: 0 };
    pub const HUNDRED: Percent = Percent {
        per_million: 1_000_000,
    };
}

/// The Istio rules in force at one moment, shared with the objects they were read from.
#[derive(Clone, Debug, Default)]
pub struct MeshConfig {
    pub virtual_services: Vec<Arc<VirtualService>>,
    pub destination_rules: Vec<Arc<DestinationRule>>,
    pub gateways: Vec<Arc<Gateway>>,
    pub authorization_policies: Vec<Arc<AuthorizationPolicy>>,
    pub peer_authentications: Vec<Arc<PeerAuthentication>>,
}

/// Istio's default root namespace: its security policies without a selector apply to every
/// workload of the mesh.
pub const ROOT_NAMESPACE: &str = "istio-system";

// ---------------------------------------------------------------- VirtualService

#[derive(Clone, Debug)]
pub struct VirtualService {
    pub id: ObjectRef,
    pub hosts: Vec<Host>,
    /// `gateways:` as written (`mesh` means sidecar/mesh traffic; absent ⇒ `["mesh"]`).
    pub gateways: Vec<String>,
    pub http: Vec<HttpRoute>,
    /// `metadata.creationTimestamp`, when the object has one: when a VirtualService and
    /// Gateway API routes claim one host, the older takes it (as Istio).
    pub created: Option<Timestamp>,
    /// On which ports of `hosts` a request that matches none of `http` is answered 404 rather
    /// than sent to the service's own default route.
    pub exclusive: Exclusive,
}

/// Which ports of its hosts a VirtualService claims whole.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Exclusive {
    /// None: what no route matches takes the service's own route (Istio's reading).
    #[default]
    No,
    /// Every port (a Gateway API route attached to a Service without a port).
    AllPorts,
    /// These ports (routes attached to a Service port).
    Ports(Vec<u16>),
}

impl Exclusive {
    /// Both claims at once.
    pub fn union(&mut self, other: &Exclusive) {
        match (&mut *self, other) {
            (_, Exclusive::No) | (Exclusive::AllPorts, _) => {}
            (Exclusive::Ports(mine), Exclusive::Ports(theirs)) => {
                mine.extend(theirs);
                mine.sort_unstable();
                mine.dedup();
            }
            (me, other) => *me = other.clone(),
        }
    }

    pub fn covers(&self, port: u16) -> bool {
        match self {
            Exclusive::No => false,
            Exclusive::AllPorts => true,
            Exclusive::Ports(ports) => ports.contains(&port),
        }
    }
}

#[derive(Clone, Debug)]
pub struct HttpRoute {
    pub name: Option<String>,
    /// Any one matching selects the route; empty matches every request.
    pub matches: Vec<RequestMatch>,
    /// Weights are relative and not all zero: a VirtualService's sum to 100 (a single
    /// destination without weight gets 100), a Gateway API rule's to anything. Empty only when
    /// `redirect` or `direct_response` answers instead.
    pub route: Vec<RouteDestination>,
    /// Answer with a redirect instead of routing (Gateway API `RequestRedirect`).
    pub redirect: Option<Redirect>,
    /// Answer with this status instead of routing: a Gateway API rule whose backends are all
    /// invalid or weighted 0 is answered 500.
    pub direct_response: Option<u16>,
    pub rewrite: Option<Rewrite>,
    pub headers: Headers,
    /// Bounds the whole request, retries included. `None` ⇒ no timeout (Istio's default).
    pub timeout: Option<Duration>,
    /// `None` ⇒ Istio's default retry policy, resolved by the engine.
    pub retries: Option<RetryPolicy>,
    pub fault: Option<Fault>,
    pub mirror: Option<Mirror>,
}

#[derive(Clone, Debug, Default)]
pub struct RequestMatch {
    pub name: Option<String>,
    pub uri: Option<StringMatch>,
    /// `http` or `https` (as the request's `:scheme`).
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    /// Header names are lower-case.
    pub headers: Vec<(HeaderName, StringMatch)>,
    pub without_headers: Vec<(HeaderName, StringMatch)>,
    pub query_params: Vec<(String, StringMatch)>,
    pub port: Option<u16>,
    /// The client's namespace (Istio's `sourceNamespace`; a GAMMA consumer route's).
    pub source_namespace: Option<String>,
    /// Applies to `uri` exact/prefix (regex carries its own flags).
    pub ignore_uri_case: bool,
    pub gateways: Vec<String>,
}

#[derive(Clone, Debug)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    /// Gateway API `PathPrefix`: whole path elements, so `/abc` matches `/abc`, `/abc/` and
    /// `/abc/def` but not `/abcd`. Kept without a trailing `/`, so `""` matches every path.
    PathPrefix(String),
    /// Anchored: must match the whole value (RE2 full-match semantics, as Envoy).
    Regex(Regex),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Destination {
    pub host: Host,
    pub subset: Option<String>,
    pub port: Option<u16>,
}

#[derive(Clone, Debug)]
pub struct RouteDestination {
    pub destination: Destination,
    pub weight: u32,
    pub headers: Headers,
}

#[derive(Clone, Debug, Default)]
pub struct Rewrite {
    /// Replaces the matched prefix when the route matched by prefix, else the whole path.
    pub uri: Option<String>,
    pub authority: Option<String>,
    /// `uri` replaces the whole path however the route matched (Gateway API `ReplaceFullPath`).
    pub whole_path: bool,
}

/// A redirect answered by the mesh: the request's URL with the parts given here replaced.
#[derive(Clone, Debug)]
pub struct Redirect {
    /// `http` or `https`.
    pub scheme: Option<String>,
    pub host: Option<String>,
    /// `None`: the request's port, or the new scheme's default port when `scheme` is set; the
    /// default port of the scheme is left out of `Location`.
    pub port: Option<u16>,
    pub path: Option<RedirectPath>,
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
}

#[derive(Clone, Debug)]
pub enum RedirectPath {
    /// The whole path.
    Whole(String),
    /// The prefix the route matched (as `Rewrite::uri`).
    Prefix(String),
}

#[derive(Clone, Debug, Default)]
pub struct Headers {
    pub request: HeaderOperations,
    pub response: HeaderOperations,
}

#[derive(Clone, Debug, Default)]
pub struct HeaderOperations {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Retries after the first try (Istio's `attempts`); 0 disables retries.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub retry_on: RetryOn,
}

/// `retryOn` conditions (Envoy's `x-envoy-retry-on` / `x-envoy-retry-grpc-on` vocabulary).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    pub five_xx: bool,
    pub gateway_error: bool,
    pub connect_failure: bool,
    pub refused_stream: bool,
    pub reset: bool,
    pub retriable_4xx: bool,
    /// `retriable-status-codes` and bare codes (e.g. `retryOn: "503,504"`).
    pub retriable_status_codes: Vec<u16>,
    /// gRPC status conditions.
    pub cancelled: bool,
    pub deadline_exceeded: bool,
    pub internal: bool,
    pub resource_exhausted: bool,
    pub unavailable: bool,
    /// Envoy's `reset-before-request`: a reset before any response byte.
    pub reset_before_request: bool,
    /// Envoy's `envoy-ratelimited`: the upstream answered with `x-envoy-ratelimited`.
    pub envoy_ratelimited: bool,
    /// Envoy's `retriable-headers`; Istio cannot configure the header list, so it never fires
    /// unless the request carries `x-envoy-retriable-header-names`.
    pub retriable_headers: bool,
    pub http3_post_connect_failure: bool,
}

impl RetryOn {
    /// Istio's conditions when `retries` is absent or has no `retryOn`:
    /// `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes` with 503.
    pub fn istio_default() -> RetryOn {
        RetryOn {
            connect_failure: true,
            refused_stream: true,
            unavailable: true,
            cancelled: true,
            retriable_status_codes: vec![503],
            ..RetryOn::default()
        }
    }
}

impl RetryPolicy {
    /// Istio's policy when a route has no `retries`: 2 attempts on [`RetryOn::istio_default`].
    pub fn istio_default() -> RetryPolicy {
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            retry_on: RetryOn::istio_default(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug)]
pub struct FaultDelay {
    pub fixed_delay: Duration,
    pub percentage: Percent,
}

#[derive(Clone, Debug)]
pub struct FaultAbort {
    pub http_status: u16,
    pub percentage: Percent,
}

#[derive(Clone, Debug)]
pub struct Mirror {
    pub destination: Destination,
    /// Absent in YAML ⇒ 100%.
    pub percentage: Percent,
}

// ---------------------------------------------------------------- Gateway API

/// A Gateway API `HTTPRoute` or `GRPCRoute` attached to Services (GAMMA), validated: its rules
/// split into one route per match, each ranked. All the routes of one kind attached to one
/// Service are merged into one exclusive [`VirtualService`] by [`crate::config::mesh_config`],
/// most specific match first.
#[derive(Clone, Debug)]
pub struct GatewayApiRoute {
    pub id: ObjectRef,
    pub kind: RouteKind,
    pub created: Option<Timestamp>,
    pub parents: Vec<ParentService>,
    /// Gateways it is attached to (ingress), with `hostnames`.
    pub gateways: Vec<ParentGateway>,
    /// `spec.hostnames`, lower-case: the hosts it serves at its gateways (none: every host).
    pub hostnames: Vec<String>,
    /// In the order written: rule by rule, match by match.
    pub routes: Vec<RankedRoute>,
}

/// A `parentRefs` entry naming a Gateway API `Gateway` the agent's ingress serves: the route
/// applies to requests through it, on the listener of `port` only when given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentGateway {
    pub gateway: ObjectRef,
    pub port: Option<u16>,
}

/// The Gateway API's route kinds, which are never merged: a Service takes the routes of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RouteKind {
    Http,
    Grpc,
}

/// A `parentRefs` entry naming a Service: the route applies to requests for it, on `port` only
/// when given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentService {
    pub host: Host,
    pub port: Option<u16>,
}

#[derive(Clone, Debug)]
pub struct RankedRoute {
    pub precedence: Precedence,
    /// The rule's index in `spec.rules`, which breaks ties inside one object.
    pub rule: usize,
    /// At most one match (the rule's `matches[i]`), without the parent's port yet.
    pub route: HttpRoute,
}

/// How specific a match is, as the Gateway API orders them: an `Exact` path before a
/// `PathPrefix` before a regular expression (Istio's choice; the API leaves regexes to the
/// implementation), a longer path first, then a method match, then more header matches, then
/// more query parameter matches. Greater is more specific. A GRPCRoute's matches rank by the
/// length of their service, then of their method (`path_length` holds both), then headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Precedence {
    pub path_kind: PathKind,
    pub path_length: usize,
    pub method: bool,
    pub headers: usize,
    pub query_params: usize,
}

/// Ordered from least to most specific.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PathKind {
    RegularExpression,
    PathPrefix,
    Exact,
}

// ---------------------------------------------------------------- DestinationRule

#[derive(Clone, Debug)]
pub struct DestinationRule {
    pub id: ObjectRef,
    pub host: Host,
    pub traffic_policy: TrafficPolicy,
    pub subsets: Vec<Subset>,
}

#[derive(Clone, Debug)]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Each section present here replaces the host-level one (Istio's override).
    pub traffic_policy: TrafficPolicy,
}

#[derive(Clone, Debug, Default)]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LoadBalancer {
    RoundRobin,
    /// Power of two choices; Istio's default.
    #[default]
    LeastRequest,
    Random,
    Passthrough,
}

/// Limits; `None` ⇒ unlimited (Istio's effective default of 2^32-1).
#[derive(Clone, Debug, Default)]
pub struct ConnectionPool {
    pub tcp: TcpPool,
    pub http: HttpPool,
}

#[derive(Clone, Debug)]
pub struct TcpPool {
    pub max_connections: Option<u32>,
    /// Default 10 s, as Istio.
    pub connect_timeout: Duration,
    /// Default 1 h, as Istio.
    pub idle_timeout: Option<Duration>,
}

impl Default for TcpPool {
    fn default() -> Self {
        TcpPool {
            max_connections: None,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(3600)),
        }
    }
}

#[derive(Clone, Debug)]
pub struct HttpPool {
    pub http1_max_pending_requests: Option<u32>,
    pub http2_max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: Option<u32>,
    /// Default 1 h, as Istio.
    pub idle_timeout: Option<Duration>,
}

impl Default for HttpPool {
    fn default() -> Self {
        HttpPool {
            http1_max_pending_requests: None,
            http2_max_requests: None,
            max_requests_per_connection: None,
            max_retries: None,
            idle_timeout: Some(Duration::from_secs(3600)),
        }
    }
}

/// Envoy's defaults fill absent fields: consecutive 5xx 5, gateway errors off, local-origin 5,
/// interval 10 s, base ejection 30 s, max ejection 10%, min health 0%.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierDetection {
    /// 0 disables.
    pub consecutive_5xx_errors: u32,
    /// `None` ⇒ off.
    pub consecutive_gateway_errors: Option<u32>,
    pub consecutive_local_origin_failures: u32,
    pub split_external_local_origin_errors: bool,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_5xx_errors: 5,
            consecutive_gateway_errors: None,
            consecutive_local_origin_failures: 5,
            split_external_local_origin_errors: false,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
            min_health_percent: 0,
        }
    }
}

// ---------------------------------------------------------------- Gateway

#[derive(Clone, Debug)]
pub struct Gateway {
    pub id: ObjectRef,
    pub selector: BTreeMap<String, String>,
    pub servers: Vec<GatewayServer>,
}

#[derive(Clone, Debug)]
pub struct GatewayServer {
    pub port: u16,
    /// Upper-case, as Istio compares it (`HTTP`, `HTTP2`, `GRPC`, `TCP`, ...).
    pub protocol: String,
    /// `port.name`, informational.
    pub port_name: String,
    pub hosts: Vec<String>,
}

// ---------------------------------------------------------------- AuthorizationPolicy

/// `security.istio.io` `AuthorizationPolicy`, evaluated by [`crate::authorization`] at the
/// destination of each connection and request.
#[derive(Clone, Debug)]
pub struct AuthorizationPolicy {
    pub id: ObjectRef,
    /// `None`: every workload of its namespace, or of the mesh in the root namespace.
    pub selector: Option<BTreeMap<String, String>>,
    pub action: AuthorizationAction,
    /// Empty: an `ALLOW` policy allows nothing, any other matches nothing (Istio's reading).
    pub rules: Vec<AuthorizationRule>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthorizationAction {
    Allow,
    Deny,
    Audit,
    /// An external authorizer (`provider`), which this mesh does not call: what the policy
    /// matches is denied (fails closed).
    Custom,
}

/// Matches when one of `from` (or `from` is empty), one of `to` (or `to` is empty) and every
/// condition of `when` match.
#[derive(Clone, Debug, Default)]
pub struct AuthorizationRule {
    pub from: Vec<SourceMatch>,
    pub to: Vec<OperationMatch>,
    pub when: Vec<Condition>,
}

/// `rules[].from[].source`: every field set must match.
#[derive(Clone, Debug, Default)]
pub struct SourceMatch {
    /// SPIFFE IDs without `spiffe://`, as Istio writes them (`cluster.local/ns/a/sa/b`).
    pub principals: Values<Pattern>,
    pub namespaces: Values<Pattern>,
    pub ip_blocks: Values<ipnet::IpNet>,
    /// The client's address as the destination sees it (`X-Forwarded-For` is not trusted, so
    /// the same address as `ip_blocks`).
    pub remote_ip_blocks: Values<ipnet::IpNet>,
    /// A field this mesh cannot evaluate (JWT `requestPrincipals`, `serviceAccounts`), named in
    /// a warning: it never counts as matched or unmatched (fails closed).
    pub unevaluable: bool,
}

/// `rules[].to[].operation`: every field set must match.
#[derive(Clone, Debug, Default)]
pub struct OperationMatch {
    /// Lower case; compared with the request's `Host` without its port, case-insensitively.
    pub hosts: Values<Pattern>,
    pub ports: Values<u16>,
    pub methods: Values<Pattern>,
    /// Compared with the request's path without its query, dot-segments removed.
    pub paths: Values<Pattern>,
    /// A path template (`{*}`, `{**}`), named in a warning: fails closed.
    pub unevaluable: bool,
}

/// One `when` condition.
#[derive(Clone, Debug)]
pub enum Condition {
    /// `request.headers[name]`.
    RequestHeader(HeaderName, Values<Pattern>),
    SourceIp(Values<ipnet::IpNet>),
    RemoteIp(Values<ipnet::IpNet>),
    SourceNamespace(Values<Pattern>),
    SourcePrincipal(Values<Pattern>),
    DestinationIp(Values<ipnet::IpNet>),
    DestinationPort(Values<u16>),
    /// A key this mesh cannot evaluate (`request.auth.*`, `connection.sni`, `experimental.*`),
    /// named in a warning: fails closed.
    Unevaluable,
}

/// A field's `values` (any may match; empty: not set) and `notValues` (none may match).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Values<T> {
    pub any_of: Vec<T>,
    pub none_of: Vec<T>,
}

impl<T> Default for Values<T> {
    fn default() -> Self {
        Values {
            any_of: Vec::new(),
            none_of: Vec::new(),
        }
    }
}

impl<T> Values<T> {
    pub fn is_set(&self) -> bool {
        !self.any_of.is_empty() || !self.none_of.is_empty()
    }
}

/// Istio's string match in authorization rules: exact, `prefix*`, `*suffix`, or `*`, which
/// matches any value that is present.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Present,
}

impl Pattern {
    pub fn parse(text: &str) -> Pattern {
        if text == "*" {
            Pattern::Present
        } else if let Some(prefix) = text.strip_suffix('*') {
            Pattern::Prefix(prefix.to_owned())
        } else if let Some(suffix) = text.strip_prefix('*') {
            Pattern::Suffix(suffix.to_owned())
        } else {
            Pattern::Exact(text.to_owned())
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Exact(exact) => value == exact,
            Pattern::Prefix(prefix) => value.starts_with(prefix.as_str()),
            Pattern::Suffix(suffix) => value.ends_with(suffix.as_str()),
            Pattern::Present => !value.is_empty(),
        }
    }
}

// ---------------------------------------------------------------- PeerAuthentication

/// `security.istio.io` `PeerAuthentication`: which connections a workload accepts, mutual TLS
/// or plaintext. Resolved per workload by [`crate::authorization::PeerAuthentications`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAuthentication {
    pub id: ObjectRef,
    /// `metadata.creationTimestamp`, when the object has one (the API server's always do, a
    /// file's seldom): of several policies at one level, the oldest wins.
    pub created: Option<Timestamp>,
    /// `spec.selector.matchLabels`, never empty. `None` (no selector, or one without labels,
    /// which Istio reads alike): every workload of its namespace, or of the mesh in the root
    /// namespace.
    pub selector: Option<BTreeMap<String, String>>,
    /// `spec.mtls.mode`; `Unset` when absent.
    pub mode: PeerMtlsMode,
    /// `spec.portLevelMtls`, by the port the pod listens on; empty unless there is a selector.
    pub port_level: BTreeMap<u16, PeerMtlsMode>,
}

/// A `PeerAuthentication` mode as written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerMtlsMode {
    /// Inherits the mode of the next broader level (port → workload → namespace → mesh), and
    /// `PERMISSIVE` at the top.
    Unset,
    Disable,
    Permissive,
    Strict,
}
