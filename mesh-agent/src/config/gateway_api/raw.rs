//! Serde mirrors of the Gateway API `spec` schemas (`gateway.networking.k8s.io/v1`), as loose as
//! the YAML, like [`super::super::raw`] for Istio's: every field optional, every number signed,
//! so that defaults, ranges and the rules upstream's CRDs check with CEL are all checked in one
//! place (`http_route::convert`) with field paths.

use serde::Deserialize;

use crate::config::raw::{Accepted, Unsupported};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct HttpRouteSpec {
    pub parent_refs: Option<Vec<ParentRef>>,
    pub hostnames: Option<Vec<String>>,
    pub rules: Option<Vec<Rule>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ParentRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub section_name: Option<String>,
    pub port: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Rule {
    pub name: Option<String>,
    pub matches: Option<Vec<Match>>,
    pub filters: Option<Vec<Filter>>,
    pub backend_refs: Option<Vec<BackendRef>>,
    pub timeouts: Option<Timeouts>,
    pub retry: Unsupported,
    pub session_persistence: Unsupported,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Match {
    pub path: Option<PathMatch>,
    pub headers: Option<Vec<ValueMatch>>,
    pub query_params: Option<Vec<ValueMatch>>,
    pub method: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct PathMatch {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub value: Option<String>,
}

/// A header or query parameter match.
#[derive(Debug, Deserialize)]
pub(crate) struct ValueMatch {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub name: Option<String>,
    pub value: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Filter {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub request_header_modifier: Option<HeaderModifier>,
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(rename = "urlRewrite")]
    pub url_rewrite: Option<UrlRewrite>,
    pub request_redirect: Option<Redirect>,
    pub request_mirror: Option<Mirror>,
    // Filters this mesh does not implement: known (not warned as unknown fields), and their
    // `type` drops the rule.
    #[serde(rename = "cors")]
    pub _cors: Accepted,
    #[serde(rename = "extensionRef")]
    pub _extension_ref: Accepted,
    #[serde(rename = "externalAuth")]
    pub _external_auth: Accepted,
}

#[derive(Debug, Deserialize)]
pub(crate) struct HeaderModifier {
    pub set: Option<Vec<NameValue>>,
    pub add: Option<Vec<NameValue>>,
    pub remove: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct NameValue {
    pub name: Option<String>,
    pub value: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct UrlRewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PathModifier {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub replace_full_path: Option<String>,
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<i64>,
    pub status_code: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Mirror {
    pub backend_ref: Option<ObjectReference>,
    pub percent: Option<i64>,
    pub fraction: Option<Fraction>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Fraction {
    pub numerator: Option<i64>,
    pub denominator: Option<i64>,
}

/// A `backendRefs` entry: a reference (written out rather than flattened, which would hide
/// unknown fields from the warnings), its weight and its own filters.
#[derive(Debug, Deserialize)]
pub(crate) struct BackendRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub port: Option<i64>,
    pub weight: Option<i64>,
    pub filters: Option<Vec<Filter>>,
}

impl BackendRef {
    pub fn target(&self) -> ObjectReference {
        ObjectReference {
            group: self.group.clone(),
            kind: self.kind.clone(),
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            port: self.port,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct ObjectReference {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub port: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Timeouts {
    pub request: Option<String>,
    pub backend_request: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct GrpcRouteSpec {
    pub parent_refs: Option<Vec<ParentRef>>,
    pub hostnames: Option<Vec<String>>,
    pub rules: Option<Vec<GrpcRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct GrpcRule {
    pub name: Option<String>,
    pub matches: Option<Vec<GrpcMatch>>,
    pub filters: Option<Vec<Filter>>,
    pub backend_refs: Option<Vec<BackendRef>>,
    pub session_persistence: Unsupported,
}

#[derive(Debug, Deserialize)]
pub(crate) struct GrpcMatch {
    pub method: Option<MethodMatch>,
    pub headers: Option<Vec<ValueMatch>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct MethodMatch {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub service: Option<String>,
    pub method: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct GatewaySpec {
    pub gateway_class_name: Option<String>,
    pub listeners: Option<Vec<Listener>>,
    pub addresses: Unsupported,
    pub infrastructure: Unsupported,
    pub backend_tls: Unsupported,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Listener {
    pub name: Option<String>,
    pub hostname: Option<String>,
    pub port: Option<i64>,
    pub protocol: Option<String>,
    pub tls: Unsupported,
    pub allowed_routes: Option<AllowedRoutes>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct AllowedRoutes {
    pub namespaces: Option<RouteNamespaces>,
    /// Which route kinds may attach; the agent attaches HTTPRoutes and GRPCRoutes alike.
    #[serde(rename = "kinds")]
    pub _kinds: Accepted,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RouteNamespaces {
    pub from: Option<String>,
    pub selector: Unsupported,
}
