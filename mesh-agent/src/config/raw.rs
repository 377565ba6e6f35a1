//! Serde mirrors of the Istio `spec` schemas, as loose as the YAML: every field optional, every
//! number signed, so that range and presence checks happen in one place (the conversion into
//! `model`) and produce diagnostics with field paths instead of serde's first-error-wins.
//!
//! Fields Istio has and we do not implement are typed [`Unsupported`]: they must not be reported
//! as unknown (they are valid Istio) but get their own "not supported" warning. Fields we accept
//! without effect are [`Accepted`]. Neither uses `IgnoredAny`, because `serde_ignored` reports
//! every `IgnoredAny` as an unknown field.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// A valid Istio field this mesh does not implement: warned about, then ignored.
pub(super) type Unsupported = Option<Value>;
/// A valid Istio field with no effect here that is not worth a warning (documented). Such
/// fields are named `_x` with a serde rename, as nothing reads them.
pub(super) type Accepted = Option<Value>;

pub(super) type StringMap = BTreeMap<String, String>;

// ---------------------------------------------------------------- VirtualService

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct VirtualServiceSpec {
    pub hosts: Option<Vec<String>>,
    pub gateways: Option<Vec<String>>,
    pub http: Option<Vec<HttpRoute>>,
    pub tcp: Unsupported,
    pub tls: Unsupported,
    pub export_to: Unsupported,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct HttpRoute {
    pub name: Option<String>,
    #[serde(rename = "match")]
    pub matches: Option<Vec<HttpMatch>>,
    pub route: Option<Vec<RouteDestination>>,
    pub redirect: Unsupported,
    pub direct_response: Unsupported,
    pub delegate: Unsupported,
    pub rewrite: Option<Rewrite>,
    pub timeout: Option<String>,
    pub retries: Option<Retries>,
    pub fault: Option<Fault>,
    pub mirror: Option<Destination>,
    pub mirror_percentage: Option<PercentValue>,
    /// Deprecated integer form; the YAML of old Istio releases spells it `mirror_percent`.
    #[serde(alias = "mirror_percent")]
    pub mirror_percent: Option<i64>,
    pub mirrors: Unsupported,
    pub cors_policy: Unsupported,
    pub headers: Option<Headers>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct HttpMatch {
    pub name: Option<String>,
    pub uri: Option<StringMatch>,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    pub headers: Option<BTreeMap<String, StringMatch>>,
    pub without_headers: Option<BTreeMap<String, StringMatch>>,
    pub query_params: Option<BTreeMap<String, StringMatch>>,
    pub port: Option<i64>,
    pub ignore_uri_case: Option<bool>,
    pub gateways: Option<Vec<String>>,
    pub source_labels: Unsupported,
    pub source_namespace: Option<String>,
    pub stat_prefix: Unsupported,
}

#[derive(Debug, Deserialize)]
pub(super) struct StringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct RouteDestination {
    pub destination: Option<Destination>,
    pub weight: Option<i64>,
    pub headers: Option<Headers>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Destination {
    pub host: Option<String>,
    pub subset: Option<String>,
    pub port: Option<PortSelector>,
}

#[derive(Debug, Deserialize)]
pub(super) struct PortSelector {
    pub number: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Rewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub uri_regex_rewrite: Unsupported,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Retries {
    pub attempts: Option<i64>,
    pub per_try_timeout: Option<String>,
    pub retry_on: Option<String>,
    #[serde(rename = "retryRemoteLocalities")]
    pub _retry_remote_localities: Accepted,
}

#[derive(Debug, Deserialize)]
pub(super) struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct FaultDelay {
    pub fixed_delay: Option<String>,
    pub exponential_delay: Unsupported,
    pub percentage: Option<PercentValue>,
    /// Deprecated integer form.
    pub percent: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct FaultAbort {
    pub http_status: Option<i64>,
    pub grpc_status: Unsupported,
    pub http2_error: Unsupported,
    pub percentage: Option<PercentValue>,
    /// Deprecated integer form.
    pub percent: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub(super) struct PercentValue {
    pub value: Option<f64>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Headers {
    pub request: Option<HeaderOperations>,
    pub response: Option<HeaderOperations>,
}

#[derive(Debug, Deserialize)]
pub(super) struct HeaderOperations {
    pub set: Option<StringMap>,
    pub add: Option<StringMap>,
    pub remove: Option<Vec<String>>,
}

// ---------------------------------------------------------------- DestinationRule

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct DestinationRuleSpec {
    pub host: Option<String>,
    pub traffic_policy: Option<TrafficPolicy>,
    pub subsets: Option<Vec<Subset>>,
    pub export_to: Unsupported,
    pub workload_selector: Unsupported,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Subset {
    pub name: Option<String>,
    pub labels: Option<StringMap>,
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Unsupported,
    pub port_level_settings: Unsupported,
    pub tunnel: Unsupported,
    pub proxy_protocol: Unsupported,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct LoadBalancer {
    pub simple: Option<String>,
    pub consistent_hash: Unsupported,
    pub locality_lb_setting: Unsupported,
    pub warmup_duration_secs: Unsupported,
    pub warmup: Unsupported,
}

#[derive(Debug, Deserialize)]
pub(super) struct ConnectionPool {
    pub tcp: Option<TcpSettings>,
    pub http: Option<HttpSettings>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct TcpSettings {
    pub max_connections: Option<i64>,
    pub connect_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    #[serde(rename = "tcpKeepalive")]
    pub _tcp_keepalive: Accepted,
    pub max_connection_duration: Unsupported,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct HttpSettings {
    pub http1_max_pending_requests: Option<i64>,
    pub http2_max_requests: Option<i64>,
    pub max_requests_per_connection: Option<i64>,
    pub max_retries: Option<i64>,
    pub idle_timeout: Option<String>,
    #[serde(rename = "h2UpgradePolicy")]
    pub _h2_upgrade_policy: Accepted,
    #[serde(rename = "useClientProtocol")]
    pub _use_client_protocol: Accepted,
    pub max_concurrent_streams: Unsupported,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct OutlierDetection {
    pub consecutive_5xx_errors: Option<i64>,
    /// Deprecated: Istio maps it to gateway errors (502, 503, 504) and turns 5xx counting off.
    pub consecutive_errors: Option<i64>,
    pub consecutive_gateway_errors: Option<i64>,
    pub consecutive_local_origin_failures: Option<i64>,
    pub split_external_local_origin_errors: Option<bool>,
    pub interval: Option<String>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_percent: Option<i64>,
    pub min_health_percent: Option<i64>,
}

// ---------------------------------------------------------------- Gateway

#[derive(Debug, Deserialize)]
pub(super) struct GatewaySpec {
    pub selector: Option<StringMap>,
    pub servers: Option<Vec<Server>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Server {
    pub port: Option<Port>,
    pub hosts: Option<Vec<String>>,
    #[serde(rename = "name")]
    pub _name: Accepted,
    pub tls: Unsupported,
    pub bind: Unsupported,
    pub default_endpoint: Unsupported,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Port {
    pub number: Option<i64>,
    pub protocol: Option<String>,
    pub name: Option<String>,
    pub target_port: Unsupported,
}

// ---------------------------------------------------------------- AuthorizationPolicy

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct AuthorizationPolicySpec {
    pub selector: Option<WorkloadSelector>,
    pub target_ref: Unsupported,
    pub target_refs: Unsupported,
    pub action: Option<String>,
    pub provider: Option<Value>,
    pub rules: Option<Vec<AuthorizationRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct WorkloadSelector {
    pub match_labels: Option<StringMap>,
}

#[derive(Debug, Deserialize)]
pub(super) struct AuthorizationRule {
    pub from: Option<Vec<RuleFrom>>,
    pub to: Option<Vec<RuleTo>>,
    pub when: Option<Vec<Condition>>,
}

#[derive(Debug, Deserialize)]
pub(super) struct RuleFrom {
    pub source: Option<Source>,
}

#[derive(Debug, Deserialize)]
pub(super) struct RuleTo {
    pub operation: Option<Operation>,
}

/// Every field a list: Istio ORs the items of one field and ANDs the fields.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Source {
    pub principals: Option<Vec<String>>,
    pub not_principals: Option<Vec<String>>,
    pub request_principals: Option<Vec<String>>,
    pub not_request_principals: Option<Vec<String>>,
    pub namespaces: Option<Vec<String>>,
    pub not_namespaces: Option<Vec<String>>,
    pub service_accounts: Option<Vec<String>>,
    pub not_service_accounts: Option<Vec<String>>,
    pub ip_blocks: Option<Vec<String>>,
    pub not_ip_blocks: Option<Vec<String>>,
    pub remote_ip_blocks: Option<Vec<String>>,
    pub not_remote_ip_blocks: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Operation {
    pub hosts: Option<Vec<String>>,
    pub not_hosts: Option<Vec<String>>,
    pub ports: Option<Vec<String>>,
    pub not_ports: Option<Vec<String>>,
    pub methods: Option<Vec<String>>,
    pub not_methods: Option<Vec<String>>,
    pub paths: Option<Vec<String>>,
    pub not_paths: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Condition {
    pub key: Option<String>,
    pub values: Option<Vec<String>>,
    pub not_values: Option<Vec<String>>,
}

// ---------------------------------------------------------------- PeerAuthentication

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct PeerAuthenticationSpec {
    pub selector: Option<WorkloadSelector>,
    pub mtls: Option<MutualTls>,
    /// Keyed by port number: a string in JSON (and so from the API server), an integer or a
    /// string in YAML, both read as text here.
    pub port_level_mtls: Option<BTreeMap<String, MutualTls>>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct MutualTls {
    pub mode: Option<String>,
}
