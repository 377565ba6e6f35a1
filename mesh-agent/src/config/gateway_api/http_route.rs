//! `HTTPRoute.spec` (raw) → [`GatewayApiRoute`] (validated): every default the Gateway API
//! defines applied here (the agent's CRDs set none, and files never have them), every rule
//! upstream's CRDs check with CEL checked here, and each rule split into one route per match so
//! routes can be ranked across objects.

use std::time::Duration;

use http::HeaderName;
use serde_json::Value;

use super::raw;
use crate::config::diagnostic::ObjectContext;
use crate::config::fields::{self, MISSING};
use crate::config::model::{
    Destination, GatewayApiRoute, HeaderOperations, Headers, Host, HttpRoute, Mirror, ObjectRef,
    ParentGateway, ParentService, PathKind, Percent, Precedence, RankedRoute, Redirect,
    RedirectPath, RequestMatch, RetryPolicy, Rewrite, RouteDestination, RouteKind, StringMatch,
};
use crate::config::values;
use crate::config::virtual_service::DestinationRef;

pub(crate) const GROUP: &str = "gateway.networking.k8s.io";
/// What a rule answers when it has no backend to send a request to (Gateway API: 500).
const NO_BACKEND: u16 = 500;
const MAX_WEIGHT: i64 = 1_000_000;
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];
const REDIRECT_CODES: [u16; 5] = [301, 302, 303, 307, 308];

/// Converts one spec. Invalid values are reported through `cx`; the caller must discard the
/// result when `cx.has_errors()`.
pub(crate) fn convert(
    cx: &mut ObjectContext,
    id: &ObjectRef,
    created: Option<&Value>,
    spec: raw::HttpRouteSpec,
) -> (GatewayApiRoute, Vec<DestinationRef>) {
    let created = fields::creation_time(cx, created);
    let namespace = id.namespace.as_str();
    let (parents, gateways) = parents(cx, spec.parent_refs.unwrap_or_default(), namespace);
    let hostnames = hostnames(cx, spec.hostnames, gateways.is_empty());
    let mut refs = Vec::new();
    let mut routes = Vec::new();
    let rules = spec.rules.unwrap_or_else(|| vec![default_rule()]);
    for (index, rule) in rules.into_iter().enumerate() {
        let name = rule.name.clone();
        let found = self::rule(
            cx,
            &format!("spec.rules[{index}]"),
            rule,
            namespace,
            &mut refs,
        );
        routes.extend(ranked(id, index, name, found));
    }
    let route = GatewayApiRoute {
        id: id.clone(),
        kind: RouteKind::Http,
        created,
        parents,
        gateways,
        hostnames,
        routes,
    };
    (route, refs)
}

/// A rule's routes, one per match, named after the rule (its `name`, or
/// `<namespace>.<name>.<index>`) and ranked.
pub(super) fn ranked(
    id: &ObjectRef,
    index: usize,
    name: Option<String>,
    routes: Vec<(Precedence, HttpRoute)>,
) -> impl Iterator<Item = RankedRoute> {
    let name = name.unwrap_or_else(|| format!("{}.{}.{index}", id.namespace, id.name));
    routes
        .into_iter()
        .map(move |(precedence, route)| RankedRoute {
            precedence,
            rule: index,
            route: HttpRoute {
                name: Some(name.clone()),
                ..route
            },
        })
}

/// The rule upstream's CRD puts in place of an absent `rules`: it matches every request and has
/// no backend, so answers 500.
fn default_rule() -> raw::Rule {
    raw::Rule {
        name: None,
        matches: None,
        filters: None,
        backend_refs: None,
        timeouts: None,
        retry: None,
        session_persistence: None,
    }
}

pub(super) fn parents(
    cx: &mut ObjectContext,
    refs: Vec<raw::ParentRef>,
    namespace: &str,
) -> (Vec<ParentService>, Vec<ParentGateway>) {
    if refs.is_empty() {
        cx.warn(
            "spec.parentRefs",
            "no parent: this route applies to no traffic",
        );
    }
    let mut services = Vec::new();
    let mut gateways = Vec::new();
    for (i, parent) in refs.into_iter().enumerate() {
        let field = format!("spec.parentRefs[{i}]");
        let group = parent.group.as_deref().unwrap_or(GROUP);
        let kind = parent.kind.as_deref().unwrap_or("Gateway");
        let Some(name) = parent.name.filter(|n| !n.is_empty()) else {
            cx.error(&format!("{field}.name"), MISSING);
            continue;
        };
        let port = parent
            .port
            .map(|p| fields::port(cx, &format!("{field}.port"), p));
        let parent_namespace = parent.namespace.unwrap_or_else(|| namespace.to_owned());
        match (group, kind) {
            ("" | "core", "Service") => {}
            (GROUP, "Gateway") => {
                if parent.section_name.is_some() {
                    cx.warn(
                        &format!("{field}.sectionName"),
                        "a listener by name is not supported: write its port as port; the \
                         route attaches to every listener that admits it",
                    );
                }
                gateways.push(ParentGateway {
                    gateway: ObjectRef {
                        namespace: parent_namespace,
                        name,
                    },
                    port,
                });
                continue;
            }
            _ => {
                cx.warn(
                    &format!("{field}.kind"),
                    format!(
                        "a parent of kind {kind} in group {group:?} is not supported (Service \
                         in group \"\" and Gateway are): this parent is ignored"
                    ),
                );
                continue;
            }
        }
        if parent.section_name.is_some() {
            cx.warn(
                &format!("{field}.sectionName"),
                "a Service port by name is not supported: write its number as port; this \
                 parent is ignored",
            );
            continue;
        }
        services.push(ParentService {
            host: Host {
                name,
                namespace: parent_namespace,
            },
            port,
        });
    }
    (services, gateways)
}

/// `spec.hostnames`: what the route serves at its gateways; with Services alone it has no use.
pub(super) fn hostnames(
    cx: &mut ObjectContext,
    raw: Option<Vec<String>>,
    services_only: bool,
) -> Vec<String> {
    let raw = raw.unwrap_or_default();
    if services_only && !raw.is_empty() {
        cx.warn(
            "spec.hostnames",
            "not used for Service parents (GAMMA): the route applies to requests for the \
             Service, whatever their Host, as in Istio",
        );
    }
    raw.into_iter()
        .enumerate()
        .filter_map(|(i, host)| {
            let field = format!("spec.hostnames[{i}]");
            let name = host.strip_prefix("*.").unwrap_or(&host);
            let valid = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
            if valid {
                Some(host.to_ascii_lowercase())
            } else {
                cx.error(&field, format!("{host:?} is not a host name (or *.suffix)"));
                None
            }
        })
        .collect()
}

/// What a rule's filters do, before its matches are known.
#[derive(Default)]
pub(super) struct Filters {
    pub headers: Headers,
    rewrite: Option<PathAction>,
    authority: Option<String>,
    redirect: Option<RedirectSpec>,
    pub mirror: Option<Mirror>,
    /// A filter this mesh does not implement: the rule must not apply without it.
    pub unsupported: bool,
}

/// A path replacement as written; a prefix replacement needs the rule's one `PathPrefix` match.
enum PathAction {
    Whole(String),
    Prefix(String),
}

struct RedirectSpec {
    scheme: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    path: Option<PathAction>,
    status: u16,
}

/// The routes of one rule, one per match, with their precedence.
fn rule(
    cx: &mut ObjectContext,
    path: &str,
    rule: raw::Rule,
    namespace: &str,
    refs: &mut Vec<DestinationRef>,
) -> Vec<(Precedence, HttpRoute)> {
    cx.unsupported(&format!("{path}.retry"), &rule.retry);
    cx.unsupported(
        &format!("{path}.sessionPersistence"),
        &rule.session_persistence,
    );
    let filters = filters(
        cx,
        &format!("{path}.filters"),
        rule.filters,
        namespace,
        refs,
    );
    let matches = rule.matches.unwrap_or_default();
    let one_path_prefix = matches.len() <= 1
        && matches
            .first()
            .and_then(|m| m.path.as_ref())
            .and_then(|p| p.kind.as_deref())
            .is_none_or(|kind| kind == "PathPrefix");
    let needs_prefix = matches!(filters.rewrite, Some(PathAction::Prefix(_)))
        || matches!(
            filters.redirect,
            Some(RedirectSpec {
                path: Some(PathAction::Prefix(_)),
                ..
            })
        );
    if needs_prefix && !one_path_prefix {
        cx.error(
            &format!("{path}.matches"),
            "ReplacePrefixMatch needs exactly one match, of type PathPrefix",
        );
    }
    let (route, direct_response) = match &filters.redirect {
        Some(_) => {
            if rule.backend_refs.as_ref().is_some_and(|b| !b.is_empty()) {
                cx.warn(
                    &format!("{path}.backendRefs"),
                    "not used: the rule answers with its RequestRedirect",
                );
            }
            (Vec::new(), None)
        }
        None => backends(
            cx,
            path,
            rule.backend_refs.unwrap_or_default(),
            namespace,
            refs,
        ),
    };
    let (timeout, retries) = timeouts(cx, &format!("{path}.timeouts"), rule.timeouts);
    if filters.unsupported {
        return Vec::new();
    }
    let matches = if matches.is_empty() {
        vec![raw::Match {
            path: None,
            headers: None,
            query_params: None,
            method: None,
        }]
    } else {
        matches
    };
    let rewrite = match (filters.rewrite, filters.authority) {
        (None, None) => None,
        (uri, authority) => Some(Rewrite {
            whole_path: matches!(uri, Some(PathAction::Whole(_))),
            uri: uri.map(PathAction::into_text),
            authority,
        }),
    };
    let redirect = filters.redirect.map(|r| Redirect {
        scheme: r.scheme,
        host: r.host,
        port: r.port,
        path: r.path.map(|p| match p {
            PathAction::Whole(text) => RedirectPath::Whole(text),
            PathAction::Prefix(text) => RedirectPath::Prefix(text),
        }),
        status: r.status,
    });
    matches
        .into_iter()
        .enumerate()
        .filter_map(|(i, m)| {
            let (precedence, request_match) =
                request_match(cx, &format!("{path}.matches[{i}]"), m)?;
            let route = HttpRoute {
                name: None,
                matches: vec![request_match],
                route: route.clone(),
                redirect: redirect.clone(),
                direct_response,
                rewrite: rewrite.clone(),
                headers: filters.headers.clone(),
                timeout,
                retries: retries.clone(),
                fault: None,
                mirror: filters.mirror.clone(),
            };
            Some((precedence, route))
        })
        .collect()
}

impl PathAction {
    fn into_text(self) -> String {
        match self {
            PathAction::Whole(text) | PathAction::Prefix(text) => text,
        }
    }
}

fn request_match(
    cx: &mut ObjectContext,
    field: &str,
    raw: raw::Match,
) -> Option<(Precedence, RequestMatch)> {
    let (path_kind, path_length, uri) = match raw.path {
        None => (
            PathKind::PathPrefix,
            1,
            StringMatch::PathPrefix(String::new()),
        ),
        Some(path) => {
            let value = path.value.unwrap_or_else(|| "/".to_owned());
            let kind = path.kind.as_deref().unwrap_or("PathPrefix");
            let length = value.len();
            let checked = |cx: &mut ObjectContext| {
                if value.starts_with('/') && !value.contains("//") {
                    true
                } else {
                    cx.error(
                        &format!("{field}.path.value"),
                        format!("{value:?} must be an absolute path (start with /)"),
                    );
                    false
                }
            };
            match kind {
                "Exact" => {
                    checked(cx).then_some(())?;
                    (PathKind::Exact, length, StringMatch::Exact(value))
                }
                "PathPrefix" => {
                    checked(cx).then_some(())?;
                    let prefix = value.trim_end_matches('/').to_owned();
                    (
                        PathKind::PathPrefix,
                        length,
                        StringMatch::PathPrefix(prefix),
                    )
                }
                "RegularExpression" => {
                    let regex = cx.check(
                        &format!("{field}.path.value"),
                        values::full_match_regex(&value),
                    )?;
                    (
                        PathKind::RegularExpression,
                        length,
                        StringMatch::Regex(regex),
                    )
                }
                other => {
                    cx.error(
                        &format!("{field}.path.type"),
                        format!(
                            "unknown path match type {other:?}: expected Exact, PathPrefix or \
                             RegularExpression"
                        ),
                    );
                    return None;
                }
            }
        }
    };
    let headers: Vec<(HeaderName, StringMatch)> =
        value_matches(cx, &format!("{field}.headers"), raw.headers, |name| {
            values::header_name(name).map_err(|e| e.to_string())
        });
    let query_params: Vec<(String, StringMatch)> = value_matches(
        cx,
        &format!("{field}.queryParams"),
        raw.query_params,
        |name| Ok(name.to_owned()),
    );
    let method = match raw.method {
        None => None,
        Some(method) if METHODS.contains(&method.as_str()) => Some(StringMatch::Exact(method)),
        Some(method) => {
            cx.error(
                &format!("{field}.method"),
                format!(
                    "unknown method {method:?}: expected one of {}",
                    METHODS.join(", ")
                ),
            );
            return None;
        }
    };
    let precedence = Precedence {
        path_kind,
        path_length,
        method: method.is_some(),
        headers: headers.len(),
        query_params: query_params.len(),
    };
    let request_match = RequestMatch {
        uri: Some(uri),
        method,
        headers,
        query_params,
        ..RequestMatch::default()
    };
    Some((precedence, request_match))
}

/// Header or query parameter matches; of two with one name (compared as `name` keys them) the
/// first counts, as the Gateway API says.
pub(super) fn value_matches<K: PartialEq>(
    cx: &mut ObjectContext,
    field: &str,
    raw: Option<Vec<raw::ValueMatch>>,
    name: impl Fn(&str) -> Result<K, String>,
) -> Vec<(K, StringMatch)> {
    let mut found: Vec<(K, StringMatch)> = Vec::new();
    for (i, m) in raw.unwrap_or_default().into_iter().enumerate() {
        let item = format!("{field}[{i}]");
        let Some(key) = m.name.filter(|n| !n.is_empty()) else {
            cx.error(&format!("{item}.name"), MISSING);
            continue;
        };
        let Some(key) = cx.check(&format!("{item}.name"), name(&key)) else {
            continue;
        };
        let Some(value) = m.value else {
            cx.error(&format!("{item}.value"), MISSING);
            continue;
        };
        let matcher = match m.kind.as_deref().unwrap_or("Exact") {
            "Exact" => StringMatch::Exact(value),
            "RegularExpression" => {
                let Some(regex) =
                    cx.check(&format!("{item}.value"), values::full_match_regex(&value))
                else {
                    continue;
                };
                StringMatch::Regex(regex)
            }
            other => {
                cx.error(
                    &format!("{item}.type"),
                    format!("unknown match type {other:?}: expected Exact or RegularExpression"),
                );
                continue;
            }
        };
        if !found.iter().any(|(k, _)| *k == key) {
            found.push((key, matcher));
        }
    }
    found
}

pub(super) fn filters(
    cx: &mut ObjectContext,
    field: &str,
    raw: Option<Vec<raw::Filter>>,
    namespace: &str,
    refs: &mut Vec<DestinationRef>,
) -> Filters {
    let mut filters = Filters::default();
    let mut seen: Vec<String> = Vec::new();
    for (i, filter) in raw.unwrap_or_default().into_iter().enumerate() {
        let item = format!("{field}[{i}]");
        let Some(kind) = filter.kind.clone() else {
            cx.error(&format!("{item}.type"), MISSING);
            continue;
        };
        let repeatable = matches!(kind.as_str(), "RequestMirror" | "ExtensionRef");
        if !repeatable && seen.contains(&kind) {
            cx.error(
                &format!("{item}.type"),
                format!("{kind} may appear only once"),
            );
            continue;
        }
        seen.push(kind.clone());
        match kind.as_str() {
            "RequestHeaderModifier" => {
                let config = filter.request_header_modifier.as_ref();
                let config = section(cx, &item, "requestHeaderModifier", config);
                filters.headers.request = header_modifier(cx, &item, config);
            }
            "ResponseHeaderModifier" => {
                let config = filter.response_header_modifier.as_ref();
                let config = section(cx, &item, "responseHeaderModifier", config);
                filters.headers.response = header_modifier(cx, &item, config);
            }
            "URLRewrite" => {
                let Some(rewrite) = section(cx, &item, "urlRewrite", filter.url_rewrite) else {
                    continue;
                };
                let field = format!("{item}.urlRewrite");
                filters.authority = rewrite
                    .hostname
                    .and_then(|h| hostname(cx, &format!("{field}.hostname"), h));
                filters.rewrite = rewrite
                    .path
                    .and_then(|p| path_modifier(cx, &format!("{field}.path"), p));
            }
            "RequestRedirect" => {
                let Some(redirect) = section(cx, &item, "requestRedirect", filter.request_redirect)
                else {
                    continue;
                };
                filters.redirect = self::redirect(cx, &format!("{item}.requestRedirect"), redirect);
            }
            "RequestMirror" => {
                let Some(mirror) = section(cx, &item, "requestMirror", filter.request_mirror)
                else {
                    continue;
                };
                let field = format!("{item}.requestMirror");
                let mirror = self::mirror(cx, &field, mirror, namespace, refs);
                if filters.mirror.is_some() {
                    cx.warn(&item, "a second RequestMirror is not supported: ignored");
                } else {
                    filters.mirror = mirror;
                }
            }
            "CORS" | "ExtensionRef" | "ExternalAuth" => {
                cx.warn(
                    &format!("{item}.type"),
                    format!("filter {kind} is not supported by this mesh: this rule is ignored"),
                );
                filters.unsupported = true;
            }
            other => cx.error(
                &format!("{item}.type"),
                format!(
                    "unknown filter type {other:?}: expected RequestHeaderModifier, \
                     ResponseHeaderModifier, URLRewrite, RequestRedirect, RequestMirror, CORS, \
                     ExtensionRef or ExternalAuth"
                ),
            ),
        }
    }
    if filters.redirect.is_some() && (filters.rewrite.is_some() || filters.authority.is_some()) {
        cx.error(
            field,
            "RequestRedirect and URLRewrite cannot be used together",
        );
    }
    filters
}

/// A filter's configuration, which must be the field its `type` names.
fn section<T>(cx: &mut ObjectContext, item: &str, name: &str, value: Option<T>) -> Option<T> {
    if value.is_none() {
        cx.error(&format!("{item}.{name}"), MISSING);
    }
    value
}

fn header_modifier(
    cx: &mut ObjectContext,
    item: &str,
    raw: Option<&raw::HeaderModifier>,
) -> HeaderOperations {
    let Some(raw) = raw else {
        return HeaderOperations::default();
    };
    let field = item.to_owned();
    let mut pairs = |op: &str, list: &Option<Vec<raw::NameValue>>| {
        list.iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, pair)| {
                let entry = format!("{field}.{op}[{i}]");
                let name = match &pair.name {
                    Some(name) => cx.check(&format!("{entry}.name"), values::header_name(name)),
                    None => {
                        cx.error(&format!("{entry}.name"), MISSING);
                        None
                    }
                };
                let value = cx.check(
                    &format!("{entry}.value"),
                    values::header_value(pair.value.as_deref().unwrap_or_default()),
                );
                Some((name?, value?))
            })
            .collect::<Vec<_>>()
    };
    let set = pairs("set", &raw.set);
    let add = pairs("add", &raw.add);
    let remove = raw
        .remove
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, name)| {
            cx.check(&format!("{field}.remove[{i}]"), values::header_name(name))
        })
        .collect();
    HeaderOperations { set, add, remove }
}

fn hostname(cx: &mut ObjectContext, field: &str, host: String) -> Option<String> {
    let valid = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if valid {
        Some(host.to_ascii_lowercase())
    } else {
        cx.error(field, format!("{host:?} is not a host name"));
        None
    }
}

fn path_modifier(
    cx: &mut ObjectContext,
    field: &str,
    raw: raw::PathModifier,
) -> Option<PathAction> {
    let absolute = |cx: &mut ObjectContext, name: &str, text: String| {
        if text.is_empty() || text.starts_with('/') {
            cx.check(&format!("{field}.{name}"), values::header_value(&text))?;
            Some(text)
        } else {
            cx.error(
                &format!("{field}.{name}"),
                format!("{text:?} must be an absolute path (start with /)"),
            );
            None
        }
    };
    match raw.kind.as_deref() {
        Some("ReplaceFullPath") => {
            let Some(text) = raw.replace_full_path else {
                cx.error(&format!("{field}.replaceFullPath"), MISSING);
                return None;
            };
            let text = absolute(cx, "replaceFullPath", text)?;
            Some(PathAction::Whole(if text.is_empty() {
                "/".into()
            } else {
                text
            }))
        }
        Some("ReplacePrefixMatch") => {
            let Some(text) = raw.replace_prefix_match else {
                cx.error(&format!("{field}.replacePrefixMatch"), MISSING);
                return None;
            };
            let text = absolute(cx, "replacePrefixMatch", text)?;
            // The engine puts the rest of the path after it: `/xyz/` and `/xyz` read alike,
            // and an empty replacement leaves the rest as the whole path.
            let trimmed = text.trim_end_matches('/');
            Some(PathAction::Prefix(if trimmed.is_empty() {
                "/".into()
            } else {
                trimmed.to_owned()
            }))
        }
        Some(other) => {
            cx.error(
                &format!("{field}.type"),
                format!("unknown path modifier {other:?}: expected ReplaceFullPath or ReplacePrefixMatch"),
            );
            None
        }
        None => {
            cx.error(&format!("{field}.type"), MISSING);
            None
        }
    }
}

fn redirect(cx: &mut ObjectContext, field: &str, raw: raw::Redirect) -> Option<RedirectSpec> {
    let scheme = match raw.scheme.as_deref() {
        None => None,
        Some(scheme @ ("http" | "https")) => Some(scheme.to_owned()),
        Some(other) => {
            cx.error(
                &format!("{field}.scheme"),
                format!("unknown scheme {other:?}: expected http or https"),
            );
            None
        }
    };
    let host = raw
        .hostname
        .and_then(|h| hostname(cx, &format!("{field}.hostname"), h));
    let port = raw
        .port
        .map(|p| fields::port(cx, &format!("{field}.port"), p));
    let path = raw
        .path
        .and_then(|p| path_modifier(cx, &format!("{field}.path"), p));
    let status = match raw.status_code {
        None => 302,
        Some(code) => match u16::try_from(code) {
            Ok(code) if REDIRECT_CODES.contains(&code) => code,
            _ => {
                cx.error(
                    &format!("{field}.statusCode"),
                    format!("{code} is not a redirect status: expected 301, 302, 303, 307 or 308"),
                );
                302
            }
        },
    };
    Some(RedirectSpec {
        scheme,
        host,
        port,
        path,
        status,
    })
}

fn mirror(
    cx: &mut ObjectContext,
    field: &str,
    raw: raw::Mirror,
    namespace: &str,
    refs: &mut Vec<DestinationRef>,
) -> Option<Mirror> {
    let percentage = match (raw.percent, raw.fraction) {
        (Some(_), Some(_)) => {
            cx.error(field, "percent and fraction cannot both be set");
            Percent::ZERO
        }
        (Some(percent), None) => cx
            .check(
                &format!("{field}.percent"),
                values::percent_from_int(percent),
            )
            .unwrap_or(Percent::ZERO),
        (None, Some(fraction)) => self::fraction(cx, &format!("{field}.fraction"), fraction),
        (None, None) => Percent::HUNDRED,
    };
    let Some(target) = raw.backend_ref else {
        cx.error(&format!("{field}.backendRef"), MISSING);
        return None;
    };
    let destination = service(cx, &format!("{field}.backendRef"), target, namespace, refs)?;
    Some(Mirror {
        destination,
        percentage,
    })
}

fn fraction(cx: &mut ObjectContext, field: &str, raw: raw::Fraction) -> Percent {
    let denominator = raw.denominator.unwrap_or(100);
    let Some(numerator) = raw.numerator else {
        cx.error(&format!("{field}.numerator"), MISSING);
        return Percent::ZERO;
    };
    if denominator < 1 || numerator < 0 || numerator > denominator {
        cx.error(
            field,
            format!("{numerator}/{denominator} is not a fraction between 0 and 1"),
        );
        return Percent::ZERO;
    }
    let per_million = numerator.saturating_mul(1_000_000) / denominator;
    Percent {
        per_million: u32::try_from(per_million).unwrap_or(1_000_000),
    }
}

/// A Service a rule sends to or mirrors to (`group` "" and `kind` Service, the defaults), with
/// the port the Gateway API requires; `None` for any other kind, which is warned about.
fn service(
    cx: &mut ObjectContext,
    field: &str,
    raw: raw::ObjectReference,
    namespace: &str,
    refs: &mut Vec<DestinationRef>,
) -> Option<Destination> {
    let group = raw.group.as_deref().unwrap_or("");
    let kind = raw.kind.as_deref().unwrap_or("Service");
    if !matches!(group, "" | "core") || kind != "Service" {
        cx.warn(
            &format!("{field}.kind"),
            format!(
                "a backend of kind {kind} in group {group:?} is not supported (Service in group \
                 \"\" is): left out"
            ),
        );
        return None;
    }
    let Some(name) = raw.name.filter(|n| !n.is_empty()) else {
        cx.error(&format!("{field}.name"), MISSING);
        return None;
    };
    let port = match raw.port {
        Some(port) => fields::port(cx, &format!("{field}.port"), port),
        None => {
            cx.error(
                &format!("{field}.port"),
                "missing required field: a Service backend needs its port",
            );
            0
        }
    };
    let host = Host {
        name,
        namespace: raw.namespace.unwrap_or_else(|| namespace.to_owned()),
    };
    refs.push(DestinationRef {
        field: field.to_owned(),
        host: host.clone(),
        subset: None,
    });
    Some(Destination {
        host,
        subset: None,
        port: Some(port),
    })
}

/// The weighted destinations of a rule, or the status it answers when it has none to send to.
pub(super) fn backends(
    cx: &mut ObjectContext,
    path: &str,
    raw: Vec<raw::BackendRef>,
    namespace: &str,
    refs: &mut Vec<DestinationRef>,
) -> (Vec<RouteDestination>, Option<u16>) {
    let mut route = Vec::new();
    for (j, backend) in raw.into_iter().enumerate() {
        let field = format!("{path}.backendRefs[{j}]");
        let weight = backend.weight.unwrap_or(1);
        if !(0..=MAX_WEIGHT).contains(&weight) {
            cx.error(
                &format!("{field}.weight"),
                format!("weight {weight} is outside 0–{MAX_WEIGHT}"),
            );
            continue;
        }
        let headers = backend_filters(cx, &format!("{field}.filters"), backend.filters.as_deref());
        let Some(destination) = service(cx, &field, backend.target(), namespace, refs) else {
            continue;
        };
        if weight == 0 {
            continue;
        }
        route.push(RouteDestination {
            destination,
            weight: u32::try_from(weight).unwrap_or(u32::MAX),
            headers,
        });
    }
    if route.is_empty() {
        cx.warn(
            &format!("{path}.backendRefs"),
            "no backend to send to (none, or all weighted 0 or left out): requests matching \
             this rule are answered 500",
        );
        return (route, Some(NO_BACKEND));
    }
    (route, None)
}

/// A backend's own filters: header modifiers apply to the requests sent to it and its answers.
fn backend_filters(cx: &mut ObjectContext, field: &str, raw: Option<&[raw::Filter]>) -> Headers {
    let mut headers = Headers::default();
    for (i, filter) in raw.unwrap_or_default().iter().enumerate() {
        let item = format!("{field}[{i}]");
        match filter.kind.as_deref() {
            Some("RequestHeaderModifier") => {
                let config = filter.request_header_modifier.as_ref();
                let config = section(cx, &item, "requestHeaderModifier", config);
                headers.request = header_modifier(cx, &item, config);
            }
            Some("ResponseHeaderModifier") => {
                let config = filter.response_header_modifier.as_ref();
                let config = section(cx, &item, "responseHeaderModifier", config);
                headers.response = header_modifier(cx, &item, config);
            }
            Some(other) => cx.warn(
                &format!("{item}.type"),
                format!("filter {other} on a backend is not supported: ignored"),
            ),
            None => cx.error(&format!("{item}.type"), MISSING),
        }
    }
    headers
}

/// `timeouts.request` bounds the whole request (`0s`: none); `timeouts.backendRequest` each
/// try, under Istio's default retry policy (Istio's own translation overwrites the request
/// timeout with it when the route has no retry stanza; a bound per try is what it means).
fn timeouts(
    cx: &mut ObjectContext,
    field: &str,
    raw: Option<raw::Timeouts>,
) -> (Option<Duration>, Option<RetryPolicy>) {
    let Some(raw) = raw else {
        return (None, None);
    };
    let request = raw
        .request
        .and_then(|text| duration(cx, &format!("{field}.request"), &text));
    let backend = raw
        .backend_request
        .and_then(|text| duration(cx, &format!("{field}.backendRequest"), &text));
    if let (Some(request), Some(backend)) = (request, backend) {
        if !request.is_zero() && backend > request {
            cx.error(
                &format!("{field}.backendRequest"),
                "must not be longer than timeouts.request",
            );
        }
    }
    let retries = backend.filter(|d| !d.is_zero()).map(|per_try| RetryPolicy {
        per_try_timeout: Some(per_try),
        ..RetryPolicy::istio_default()
    });
    (request.filter(|d| !d.is_zero()), retries)
}

/// A Gateway API duration: one to four groups of 1–5 digits and a unit (`h`, `m`, `s`, `ms`).
fn duration(cx: &mut ObjectContext, field: &str, text: &str) -> Option<Duration> {
    let mut rest = text;
    let mut total = Duration::ZERO;
    let mut groups = 0;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let (number, tail) = rest.split_at(digits);
        let (unit, scale) = if tail.starts_with("ms") {
            ("ms", Duration::from_millis(1))
        } else if tail.starts_with('h') {
            ("h", Duration::from_secs(3600))
        } else if tail.starts_with('m') {
            ("m", Duration::from_secs(60))
        } else if tail.starts_with('s') {
            ("s", Duration::from_secs(1))
        } else {
            ("", Duration::ZERO)
        };
        groups += 1;
        if !(1..=5).contains(&digits) || unit.is_empty() || groups > 4 {
            cx.error(
                field,
                format!("invalid duration {text:?}: expected up to four groups like 1h, 30m, 10s or 500ms"),
            );
            return None;
        }
        let number: u32 = number.parse().unwrap_or(0);
        total += scale * number;
        rest = &tail[unit.len()..];
    }
    if groups == 0 {
        cx.error(field, MISSING);
        return None;
    }
    Some(total)
}
