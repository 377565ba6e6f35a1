//! `GRPCRoute.spec` (raw) → [`GatewayApiRoute`] (validated): a gRPC method is a path
//! (`/package.Service/Method`), so a method match becomes a path match (as Istio translates
//! it), and the rest — parents, header matches, header and mirror filters, weighted backends —
//! reads as an HTTPRoute's does.

use serde_json::Value;

use super::http_route::{self, Filters};
use super::raw;
use crate::config::diagnostic::ObjectContext;
use crate::config::fields;
use crate::config::model::{
    GatewayApiRoute, HttpRoute, ObjectRef, PathKind, Precedence, RequestMatch, RouteKind,
    StringMatch,
};
use crate::config::values;
use crate::config::virtual_service::DestinationRef;

/// Converts one spec. Invalid values are reported through `cx`; the caller must discard the
/// result when `cx.has_errors()`.
pub(crate) fn convert(
    cx: &mut ObjectContext,
    id: &ObjectRef,
    created: Option<&Value>,
    spec: raw::GrpcRouteSpec,
) -> (GatewayApiRoute, Vec<DestinationRef>) {
    let created = fields::creation_time(cx, created);
    let namespace = id.namespace.as_str();
    let (parents, gateways) =
        http_route::parents(cx, spec.parent_refs.unwrap_or_default(), namespace);
    let hostnames = http_route::hostnames(cx, spec.hostnames, gateways.is_empty());
    let mut refs = Vec::new();
    let mut routes = Vec::new();
    // Upstream's default for absent rules, as for an HTTPRoute: every call, no backend.
    let rules = spec.rules.unwrap_or_else(|| {
        vec![raw::GrpcRule {
            name: None,
            matches: None,
            filters: None,
            backend_refs: None,
            session_persistence: None,
        }]
    });
    for (index, rule) in rules.into_iter().enumerate() {
        let name = rule.name.clone();
        let found = self::rule(
            cx,
            &format!("spec.rules[{index}]"),
            rule,
            namespace,
            &mut refs,
        );
        routes.extend(http_route::ranked(id, index, name, found));
    }
    let route = GatewayApiRoute {
        id: id.clone(),
        kind: RouteKind::Grpc,
        created,
        parents,
        gateways,
        hostnames,
        routes,
    };
    (route, refs)
}

fn rule(
    cx: &mut ObjectContext,
    path: &str,
    rule: raw::GrpcRule,
    namespace: &str,
    refs: &mut Vec<DestinationRef>,
) -> Vec<(Precedence, HttpRoute)> {
    cx.unsupported(
        &format!("{path}.sessionPersistence"),
        &rule.session_persistence,
    );
    let filters_field = format!("{path}.filters");
    for (i, filter) in rule.filters.iter().flatten().enumerate() {
        if let Some(kind @ ("URLRewrite" | "RequestRedirect" | "CORS")) = filter.kind.as_deref() {
            cx.error(
                &format!("{filters_field}[{i}].type"),
                format!(
                    "{kind} is not a GRPCRoute filter: expected RequestHeaderModifier, \
                     ResponseHeaderModifier, RequestMirror or ExtensionRef"
                ),
            );
        }
    }
    let filters: Filters = http_route::filters(cx, &filters_field, rule.filters, namespace, refs);
    let (route, direct_response) = http_route::backends(
        cx,
        path,
        rule.backend_refs.unwrap_or_default(),
        namespace,
        refs,
    );
    if filters.unsupported {
        return Vec::new();
    }
    let matches = match rule.matches {
        Some(matches) if !matches.is_empty() => matches,
        _ => vec![raw::GrpcMatch {
            method: None,
            headers: None,
        }],
    };
    matches
        .into_iter()
        .enumerate()
        .filter_map(|(i, m)| {
            let field = format!("{path}.matches[{i}]");
            let (precedence, request_match) = request_match(cx, &field, m)?;
            let route = HttpRoute {
                name: None,
                matches: vec![request_match],
                route: route.clone(),
                redirect: None,
                direct_response,
                rewrite: None,
                headers: filters.headers.clone(),
                timeout: None,
                retries: None,
                fault: None,
                mirror: filters.mirror.clone(),
            };
            Some((precedence, route))
        })
        .collect()
}

fn request_match(
    cx: &mut ObjectContext,
    field: &str,
    raw: raw::GrpcMatch,
) -> Option<(Precedence, RequestMatch)> {
    let (uri, service_length, method_length) = match raw.method {
        None => (None, 0, 0),
        Some(method) => {
            let (uri, service, method) = method_match(cx, &format!("{field}.method"), method)?;
            (Some(uri), service, method)
        }
    };
    let headers = http_route::value_matches(cx, &format!("{field}.headers"), raw.headers, |n| {
        values::header_name(n).map_err(|e| e.to_string())
    });
    let precedence = Precedence {
        path_kind: PathKind::PathPrefix,
        // The service's length first, then the method's: both fit 16 bits (gRPC names are
        // far shorter), so one number orders them.
        path_length: (service_length.min(0xffff) << 16) | method_length.min(0xffff),
        method: false,
        headers: headers.len(),
        query_params: 0,
    };
    let request_match = RequestMatch {
        uri,
        headers,
        ..RequestMatch::default()
    };
    Some((precedence, request_match))
}

/// The path match of a method match, and the lengths of its service and method.
fn method_match(
    cx: &mut ObjectContext,
    field: &str,
    raw: raw::MethodMatch,
) -> Option<(StringMatch, usize, usize)> {
    let service = raw.service.filter(|s| !s.is_empty());
    let method = raw.method.filter(|m| !m.is_empty());
    let lengths = (
        service.as_ref().map_or(0, String::len),
        method.as_ref().map_or(0, String::len),
    );
    if service.is_none() && method.is_none() {
        cx.error(field, "one of service or method must be set");
        return None;
    }
    let uri = match raw.kind.as_deref().unwrap_or("Exact") {
        "Exact" => {
            for (name, value) in [("service", &service), ("method", &method)] {
                let valid = value.as_ref().is_none_or(|v| {
                    v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
                });
                if !valid {
                    cx.error(
                        &format!("{field}.{name}"),
                        format!("{value:?} is not a gRPC {name} name"),
                    );
                    return None;
                }
            }
            match (&service, &method) {
                (Some(service), Some(method)) => StringMatch::Exact(format!("/{service}/{method}")),
                (Some(service), None) => StringMatch::PathPrefix(format!("/{service}")),
                (None, Some(method)) => {
                    let pattern = format!("/[^/]+/{}", regex::escape(method));
                    StringMatch::Regex(cx.check(field, values::full_match_regex(&pattern))?)
                }
                (None, None) => unreachable!("checked above"),
            }
        }
        "RegularExpression" => {
            let service = service.as_deref().unwrap_or("[^/]+");
            let method = method.as_deref().unwrap_or("[^/]+");
            let pattern = format!("/(?:{service})/(?:{method})");
            StringMatch::Regex(cx.check(field, values::full_match_regex(&pattern))?)
        }
        other => {
            cx.error(
                &format!("{field}.type"),
                format!("unknown method match type {other:?}: expected Exact or RegularExpression"),
            );
            return None;
        }
    };
    Some((uri, lengths.0, lengths.1))
}
