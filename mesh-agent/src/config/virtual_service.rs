//! `VirtualService.spec` (raw) → [`VirtualService`] (validated).

use std::collections::BTreeMap;

use http::{HeaderName, HeaderValue};

use super::diagnostic::{ObjectContext, UNSUPPORTED};
use super::fields::{self, MISSING};
use super::model::{
    Destination, Exclusive, Fault, FaultAbort, FaultDelay, HeaderOperations, Headers, Host,
    HttpRoute, Mirror, ObjectRef, Percent, RequestMatch, RetryOn, RetryPolicy, Rewrite,
    RouteDestination, StringMatch, VirtualService,
};
use super::raw;
use super::values;

/// A destination named by a route or mirror: its host, and its subset if it names one. Whether
/// they exist is looked up across the whole set (see `rules::check_references`).
#[derive(Clone, Debug)]
pub(crate) struct DestinationRef {
    /// The destination's path in the object, e.g. `spec.http[0].route[1].destination`.
    pub field: String,
    pub host: Host,
    pub subset: Option<String>,
}

/// Converts one spec. Invalid values are reported through `cx` and replaced by placeholders;
/// the caller must discard the result when `cx.has_errors()`.
pub(super) fn convert(
    cx: &mut ObjectContext,
    id: &ObjectRef,
    created: Option<&serde_json::Value>,
    spec: raw::VirtualServiceSpec,
) -> (VirtualService, Vec<DestinationRef>) {
    let created = fields::creation_time(cx, created);
    cx.unsupported("spec.tcp", &spec.tcp);
    cx.unsupported("spec.tls", &spec.tls);
    cx.unsupported("spec.exportTo", &spec.export_to);

    let namespace = id.namespace.as_str();
    let hosts = fields::hosts(cx, "spec.hosts", spec.hosts, namespace);
    let gateways = match spec.gateways {
        Some(gateways) if !gateways.is_empty() => gateways,
        _ => vec!["mesh".to_owned()],
    };
    let mut refs = Vec::new();
    let http = spec
        .http
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .filter_map(|(i, route)| {
            http_route(cx, &format!("spec.http[{i}]"), route, namespace, &mut refs)
        })
        .collect();
    let vs = VirtualService {
        id: id.clone(),
        hosts,
        gateways,
        http,
        created,
        exclusive: Exclusive::No,
    };
    (vs, refs)
}

/// `None` when the route is left out (it only has actions this mesh does not implement).
fn http_route(
    cx: &mut ObjectContext,
    path: &str,
    raw: raw::HttpRoute,
    namespace: &str,
    refs: &mut Vec<DestinationRef>,
) -> Option<HttpRoute> {
    cx.unsupported(&format!("{path}.mirrors"), &raw.mirrors);
    cx.unsupported(&format!("{path}.corsPolicy"), &raw.cors_policy);
    let other_actions = [
        ("redirect", raw.redirect.is_some()),
        ("directResponse", raw.direct_response.is_some()),
        ("delegate", raw.delegate.is_some()),
    ];
    let destinations = raw.route.unwrap_or_default();
    if destinations.is_empty() {
        // Dropping the whole route (rather than keeping one without destinations) keeps the
        // model's invariant; the warning says so, as traffic falls through to later routes.
        let mut dropped = false;
        for (name, present) in other_actions {
            if present {
                cx.warn(
                    &format!("{path}.{name}"),
                    "not supported by this mesh: this http route is ignored",
                );
                dropped = true;
            }
        }
        if !dropped {
            cx.error(&format!("{path}.route"), MISSING);
        }
        return None;
    }
    for (name, present) in other_actions {
        if present {
            cx.warn(&format!("{path}.{name}"), UNSUPPORTED);
        }
    }

    let matches = raw
        .matches
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, m)| request_match(cx, &format!("{path}.match[{i}]"), m))
        .collect();
    let route = route_destinations(cx, path, destinations, namespace, refs);
    let rewrite = raw
        .rewrite
        .map(|r| rewrite(cx, &format!("{path}.rewrite"), r));
    let headers = headers(cx, &format!("{path}.headers"), raw.headers);
    let timeout = fields::optional_timeout(cx, &format!("{path}.timeout"), raw.timeout.as_deref());
    let retries = raw
        .retries
        .map(|r| retries(cx, &format!("{path}.retries"), r));
    let fault = raw
        .fault
        .and_then(|f| fault(cx, &format!("{path}.fault"), f));
    let mirror = mirror(
        cx,
        path,
        raw.mirror,
        raw.mirror_percentage,
        raw.mirror_percent,
        namespace,
        refs,
    );
    Some(HttpRoute {
        name: raw.name,
        matches,
        route,
        rewrite,
        headers,
        timeout,
        retries,
        fault,
        mirror,
        redirect: None,
        direct_response: None,
    })
}

fn request_match(cx: &mut ObjectContext, path: &str, raw: raw::HttpMatch) -> RequestMatch {
    cx.unsupported(&format!("{path}.sourceLabels"), &raw.source_labels);
    cx.unsupported(&format!("{path}.statPrefix"), &raw.stat_prefix);
    let mut one = |name: &str, m: Option<raw::StringMatch>| {
        m.and_then(|m| string_match(cx, &format!("{path}.{name}"), m, false))
    };
    let uri = one("uri", raw.uri);
    let scheme = one("scheme", raw.scheme);
    let method = one("method", raw.method);
    let authority = one("authority", raw.authority);
    let headers = header_matches(cx, &format!("{path}.headers"), raw.headers);
    let without_headers =
        header_matches(cx, &format!("{path}.withoutHeaders"), raw.without_headers);
    let query_params = raw
        .query_params
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(name, m)| {
            let matcher = string_match(cx, &format!("{path}.queryParams.{name}"), m, true)?;
            Some((name, matcher))
        })
        .collect();
    let port = raw
        .port
        .map(|p| fields::port(cx, &format!("{path}.port"), p));
    RequestMatch {
        name: raw.name,
        uri,
        scheme,
        method,
        authority,
        headers,
        without_headers,
        query_params,
        port,
        source_namespace: raw.source_namespace.filter(|ns| !ns.is_empty()),
        ignore_uri_case: raw.ignore_uri_case.unwrap_or(false),
        gateways: raw.gateways.unwrap_or_default(),
    }
}

fn string_match(
    cx: &mut ObjectContext,
    path: &str,
    raw: raw::StringMatch,
    allow_empty: bool,
) -> Option<StringMatch> {
    cx.check(
        path,
        values::string_match(raw.exact, raw.prefix, raw.regex, allow_empty),
    )
}

fn header_matches(
    cx: &mut ObjectContext,
    path: &str,
    raw: Option<BTreeMap<String, raw::StringMatch>>,
) -> Vec<(HeaderName, StringMatch)> {
    raw.unwrap_or_default()
        .into_iter()
        .filter_map(|(name, m)| {
            let field = format!("{path}.{name}");
            let name = cx.check(&field, values::header_name(&name));
            let matcher = string_match(cx, &field, m, true);
            Some((name?, matcher?))
        })
        .collect()
}

fn route_destinations(
    cx: &mut ObjectContext,
    path: &str,
    raw: Vec<raw::RouteDestination>,
    namespace: &str,
    refs: &mut Vec<DestinationRef>,
) -> Vec<RouteDestination> {
    // Istio lets a lone destination omit its weight; with several, an omitted weight is 0.
    let lone = raw.len() == 1;
    let mut sum: i64 = 0;
    let mut weights_valid = true;
    let route = raw
        .into_iter()
        .enumerate()
        .map(|(j, d)| {
            let item = format!("{path}.route[{j}]");
            let destination = destination(
                cx,
                &format!("{item}.destination"),
                d.destination,
                namespace,
                refs,
            );
            let weight = match d.weight {
                None if lone => 100,
                None => 0,
                Some(w) if w < 0 => {
                    cx.error(
                        &format!("{item}.weight"),
                        format!("weight {w} must not be negative"),
                    );
                    weights_valid = false;
                    0
                }
                Some(w) => w,
            };
            sum = sum.saturating_add(weight);
            RouteDestination {
                destination,
                weight: u32::try_from(weight).unwrap_or(u32::MAX),
                headers: headers(cx, &format!("{item}.headers"), d.headers),
            }
        })
        .collect();
    if weights_valid && sum != 100 {
        cx.error(
            &format!("{path}.route"),
            format!("weights sum to {sum}, must be 100"),
        );
    }
    route
}

fn destination(
    cx: &mut ObjectContext,
    path: &str,
    raw: Option<raw::Destination>,
    namespace: &str,
    refs: &mut Vec<DestinationRef>,
) -> Destination {
    let Some(raw) = raw else {
        cx.error(path, MISSING);
        return Destination {
            host: Host {
                name: String::new(),
                namespace: namespace.to_owned(),
            },
            subset: None,
            port: None,
        };
    };
    let host = fields::host(cx, &format!("{path}.host"), raw.host.as_deref(), namespace);
    let subset = raw.subset.filter(|s| !s.is_empty());
    refs.push(DestinationRef {
        field: path.to_owned(),
        host: host.clone(),
        subset: subset.clone(),
    });
    let port = raw.port.map(|p| match p.number {
        Some(number) => fields::port(cx, &format!("{path}.port.number"), number),
        None => {
            cx.error(&format!("{path}.port.number"), MISSING);
            0
        }
    });
    Destination { host, subset, port }
}

fn rewrite(cx: &mut ObjectContext, path: &str, raw: raw::Rewrite) -> Rewrite {
    cx.unsupported(&format!("{path}.uriRegexRewrite"), &raw.uri_regex_rewrite);
    // Both end up in the request head (path, Host/:authority), so they obey header-value rules.
    let mut checked = |name: &str, value: Option<String>| {
        let value = value?;
        cx.check(&format!("{path}.{name}"), values::header_value(&value))?;
        Some(value)
    };
    Rewrite {
        uri: checked("uri", raw.uri),
        authority: checked("authority", raw.authority),
        whole_path: false,
    }
}

fn headers(cx: &mut ObjectContext, path: &str, raw: Option<raw::Headers>) -> Headers {
    let Some(raw) = raw else {
        return Headers::default();
    };
    Headers {
        request: header_operations(cx, &format!("{path}.request"), raw.request),
        response: header_operations(cx, &format!("{path}.response"), raw.response),
    }
}

fn header_operations(
    cx: &mut ObjectContext,
    path: &str,
    raw: Option<raw::HeaderOperations>,
) -> HeaderOperations {
    let Some(raw) = raw else {
        return HeaderOperations::default();
    };
    let mut pairs = |op: &str, map: Option<raw::StringMap>| -> Vec<(HeaderName, HeaderValue)> {
        map.unwrap_or_default()
            .into_iter()
            .filter_map(|(name, value)| {
                let field = format!("{path}.{op}.{name}");
                let name = cx.check(&field, values::header_name(&name));
                let value = cx.check(&field, values::header_value(&value));
                Some((name?, value?))
            })
            .collect()
    };
    let set = pairs("set", raw.set);
    let add = pairs("add", raw.add);
    let remove = raw
        .remove
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter_map(|(i, name)| cx.check(&format!("{path}.remove[{i}]"), values::header_name(name)))
        .collect();
    HeaderOperations { set, add, remove }
}

fn retries(cx: &mut ObjectContext, path: &str, raw: raw::Retries) -> RetryPolicy {
    // Istio: attempts is an int32 whose absence reads as 0, which disables retries.
    let attempts = match raw.attempts {
        None => 0,
        Some(n) if n < 0 => {
            cx.error(
                &format!("{path}.attempts"),
                format!("retry attempts {n} must not be negative"),
            );
            0
        }
        Some(n) => fields::count(cx, &format!("{path}.attempts"), n),
    };
    let per_try_timeout = fields::optional_timeout(
        cx,
        &format!("{path}.perTryTimeout"),
        raw.per_try_timeout.as_deref(),
    );
    let retry_on = match raw.retry_on.as_deref().map(str::trim) {
        None | Some("") => RetryOn::istio_default(),
        Some(text) => cx
            .check(&format!("{path}.retryOn"), values::parse_retry_on(text))
            .unwrap_or_default(),
    };
    RetryPolicy {
        attempts,
        per_try_timeout,
        retry_on,
    }
}

fn fault(cx: &mut ObjectContext, path: &str, raw: raw::Fault) -> Option<Fault> {
    if raw.delay.is_none() && raw.abort.is_none() {
        cx.error(path, "must set delay or abort");
        return None;
    }
    let delay = raw
        .delay
        .and_then(|d| fault_delay(cx, &format!("{path}.delay"), d));
    let abort = raw
        .abort
        .and_then(|a| fault_abort(cx, &format!("{path}.abort"), a));
    (delay.is_some() || abort.is_some()).then_some(Fault { delay, abort })
}

/// Istio injects a fault into no request when no percentage is given; say so, since a fault
/// that never fires is rarely what the author meant.
fn fault_percentage(
    cx: &mut ObjectContext,
    path: &str,
    percentage: Option<raw::PercentValue>,
    percent: Option<i64>,
) -> Percent {
    let field = format!("{path}.percentage");
    fields::percentage(cx, &field, percentage, &format!("{path}.percent"), percent).unwrap_or_else(
        || {
            cx.warn(
                &field,
                "not set: as in Istio, this fault applies to no request",
            );
            Percent::ZERO
        },
    )
}

fn fault_delay(cx: &mut ObjectContext, path: &str, raw: raw::FaultDelay) -> Option<FaultDelay> {
    let Some(fixed) = raw.fixed_delay else {
        if raw.exponential_delay.is_some() {
            cx.warn(&format!("{path}.exponentialDelay"), UNSUPPORTED);
        } else {
            cx.error(&format!("{path}.fixedDelay"), MISSING);
        }
        return None;
    };
    let fixed_delay = fields::duration(cx, &format!("{path}.fixedDelay"), &fixed);
    let percentage = fault_percentage(cx, path, raw.percentage, raw.percent);
    Some(FaultDelay {
        fixed_delay,
        percentage,
    })
}

fn fault_abort(cx: &mut ObjectContext, path: &str, raw: raw::FaultAbort) -> Option<FaultAbort> {
    let Some(status) = raw.http_status else {
        let mut other = false;
        for (name, value) in [
            ("grpcStatus", &raw.grpc_status),
            ("http2Error", &raw.http2_error),
        ] {
            if value.is_some() {
                cx.warn(&format!("{path}.{name}"), UNSUPPORTED);
                other = true;
            }
        }
        if !other {
            cx.error(&format!("{path}.httpStatus"), MISSING);
        }
        return None;
    };
    let http_status = match u16::try_from(status) {
        Ok(code) if (100..=599).contains(&code) => code,
        _ => {
            cx.error(
                &format!("{path}.httpStatus"),
                format!("HTTP status {status} is outside 100–599"),
            );
            0
        }
    };
    let percentage = fault_percentage(cx, path, raw.percentage, raw.percent);
    Some(FaultAbort {
        http_status,
        percentage,
    })
}

fn mirror(
    cx: &mut ObjectContext,
    path: &str,
    raw: Option<raw::Destination>,
    percentage: Option<raw::PercentValue>,
    legacy_percent: Option<i64>,
    namespace: &str,
    refs: &mut Vec<DestinationRef>,
) -> Option<Mirror> {
    let percentage = fields::percentage(
        cx,
        &format!("{path}.mirrorPercentage"),
        percentage,
        &format!("{path}.mirrorPercent"),
        legacy_percent,
    );
    let Some(raw) = raw else {
        if percentage.is_some() {
            cx.warn(
                &format!("{path}.mirrorPercentage"),
                "has no effect without mirror",
            );
        }
        return None;
    };
    let destination = destination(cx, &format!("{path}.mirror"), Some(raw), namespace, refs);
    Some(Mirror {
        destination,
        percentage: percentage.unwrap_or(Percent::HUNDRED),
    })
}
