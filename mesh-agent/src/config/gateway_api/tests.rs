//! HTTPRoutes read, validated and merged: YAML in, the engine's model out.

use std::time::Duration;

use crate::config::model::{Exclusive, PathKind, RedirectPath, StringMatch, VirtualService};
use crate::config::{load_sources, load_str, Loaded, Severity};

fn route(name: &str, extra_metadata: &str, spec: &str) -> String {
    let spec: String = spec.lines().map(|line| format!("  {line}\n")).collect();
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: {name}\n  \
         namespace: shop\n{extra_metadata}spec:\n{spec}"
    )
}

/// A route for Service `service-c` on port 8080 with these rules.
fn rules(rules: &str) -> String {
    route(
        "c",
        "",
        &format!(
            "parentRefs:\n- {{group: \"\", kind: Service, name: service-c, port: 8080}}\nrules:\n{rules}"
        ),
    )
}

fn describe(loaded: &Loaded) -> String {
    loaded
        .diagnostics
        .iter()
        .map(|d| format!("\n  {}: {d}", d.severity))
        .collect()
}

fn loaded_ok(text: &str) -> Loaded {
    let loaded = load_str("route.yml", text);
    assert!(loaded.is_ok(), "{}", describe(&loaded));
    loaded
}

fn only_service(loaded: &Loaded) -> &VirtualService {
    assert_eq!(
        loaded.config.virtual_services.len(),
        1,
        "{:#?}",
        loaded.config
    );
    &loaded.config.virtual_services[0]
}

#[test]
fn a_canary_route_splits_a_service_by_weight_on_its_port() {
    let loaded = loaded_ok(&rules(
        "- backendRefs:\n  - {name: service-c-v1, port: 8080, weight: 90}\n  - {name: service-c-v2, port: 8080, weight: 10}",
    ));
    let vs = only_service(&loaded);
    assert_eq!(vs.exclusive, Exclusive::Ports(vec![8080]));
    assert_eq!(vs.gateways, ["mesh"]);
    assert_eq!(vs.hosts[0].name, "service-c");
    assert_eq!(vs.hosts[0].namespace, "shop");
    let http = &vs.http[0];
    let weights: Vec<(&str, Option<u16>, u32)> = http
        .route
        .iter()
        .map(|d| {
            (
                d.destination.host.name.as_str(),
                d.destination.port,
                d.weight,
            )
        })
        .collect();
    assert_eq!(
        weights,
        [
            ("service-c-v1", Some(8080), 90),
            ("service-c-v2", Some(8080), 10)
        ]
    );
    assert_eq!(http.matches.len(), 1);
    assert_eq!(http.matches[0].port, Some(8080));
    assert!(matches!(&http.matches[0].uri, Some(StringMatch::PathPrefix(p)) if p.is_empty()));
    assert_eq!(http.name.as_deref(), Some("shop.c.0"));
    assert!(http.retries.is_none() && http.timeout.is_none());
}

#[test]
fn defaults_fill_what_is_left_out() {
    // No weight: 1 each. No port on the parent: every port.
    let loaded = loaded_ok(&route(
        "c",
        "",
        "parentRefs: [{group: \"\", kind: Service, name: service-c}]\nrules:\n- backendRefs:\n  - {name: a, port: 80}\n  - {name: b, port: 80}",
    ));
    let http = &only_service(&loaded).http[0];
    assert_eq!(
        http.route.iter().map(|d| d.weight).collect::<Vec<_>>(),
        [1, 1]
    );
    assert_eq!(http.matches[0].port, None);
    assert_eq!(only_service(&loaded).exclusive, Exclusive::AllPorts);

    // No rules, or a rule without backends: every request answered 500, with a warning.
    for spec in ["", "rules:\n- matches: [{path: {value: /x}}]"] {
        let loaded = loaded_ok(&route(
            "c",
            "",
            &format!("parentRefs: [{{group: \"\", kind: Service, name: service-c}}]\n{spec}"),
        ));
        let http = &only_service(&loaded).http[0];
        assert_eq!(http.direct_response, Some(500));
        assert!(http.route.is_empty());
        let warning = loaded.warnings().next().expect("a warning");
        assert!(warning.reason.contains("answered 500"), "{warning}");
    }
}

#[test]
fn weights_of_zero_send_nothing_and_all_zero_answers_500() {
    let loaded = loaded_ok(&rules(
        "- backendRefs:\n  - {name: a, port: 80, weight: 0}\n  - {name: b, port: 80, weight: 3}",
    ));
    let http = &only_service(&loaded).http[0];
    assert_eq!(http.route.len(), 1);
    assert_eq!(http.route[0].destination.host.name, "b");
    let loaded = loaded_ok(&rules("- backendRefs:\n  - {name: a, port: 80, weight: 0}"));
    assert_eq!(only_service(&loaded).http[0].direct_response, Some(500));
}

#[test]
fn matches_become_one_route_each_ordered_by_precedence_across_routes() {
    let older = route(
        "older",
        "  creationTimestamp: \"2026-01-01T00:00:00Z\"\n",
        "parentRefs: [{group: \"\", kind: Service, name: service-c}]\nrules:\n\
         - matches:\n  - path: {type: PathPrefix, value: /a}\n  - path: {type: PathPrefix, value: /a/b}\n  backendRefs: [{name: prefix, port: 80}]",
    );
    let newer = route(
        "newer",
        "  creationTimestamp: \"2026-02-01T00:00:00Z\"\n",
        "parentRefs: [{group: \"\", kind: Service, name: service-c}]\nrules:\n\
         - matches:\n  - path: {type: PathPrefix, value: /a}\n  - path: {type: Exact, value: /a}\n  \
         - path: {type: PathPrefix, value: /a}\n    method: GET\n    headers: [{name: X-Tenant, value: t}]\n  \
         - path: {type: RegularExpression, value: \"/a/.*\"}\n  backendRefs: [{name: newer, port: 80}]",
    );
    // Files in either order: the order comes from the routes, not the load.
    for sources in [
        [("a.yml", &older), ("b.yml", &newer)],
        [("a.yml", &newer), ("b.yml", &older)],
    ] {
        let loaded = load_sources(&sources);
        assert!(loaded.is_ok(), "{}", describe(&loaded));
        let vs = only_service(&loaded);
        let order: Vec<String> = vs
            .http
            .iter()
            .map(|r| {
                let m = &r.matches[0];
                let path = match &m.uri {
                    Some(StringMatch::Exact(p)) => format!("={p}"),
                    Some(StringMatch::PathPrefix(p)) => format!("{p}/*"),
                    Some(StringMatch::Regex(re)) => format!("~{re}"),
                    other => format!("{other:?}"),
                };
                let extra = if m.method.is_some() { "+method" } else { "" };
                format!("{path}{extra} {}", r.route[0].destination.host.name)
            })
            .collect();
        assert_eq!(
            order,
            [
                "=/a newer",
                "/a/b/* prefix",
                "/a/*+method newer",
                "/a/* prefix",
                "/a/* newer",
                "~^(?:/a/.*)$ newer",
            ]
        );
    }
}

#[test]
fn precedence_ranks_path_kinds_then_length() {
    assert!(PathKind::Exact > PathKind::PathPrefix);
    assert!(PathKind::PathPrefix > PathKind::RegularExpression);
}

#[test]
fn header_and_query_matches_keep_the_first_of_a_name() {
    let loaded = loaded_ok(&rules(
        "- matches:\n  - headers:\n    - {name: X-A, value: one}\n    - {name: x-a, value: two}\n    - {type: RegularExpression, name: x-b, value: \"b.*\"}\n    \
         queryParams:\n    - {name: q, value: \"1\"}\n    - {name: Q, value: \"2\"}\n    method: POST\n  backendRefs: [{name: a, port: 80}]",
    ));
    let m = &only_service(&loaded).http[0].matches[0];
    assert_eq!(m.headers.len(), 2);
    assert_eq!(m.headers[0].0, "x-a");
    assert!(matches!(&m.headers[0].1, StringMatch::Exact(v) if v == "one"));
    assert!(matches!(&m.headers[1].1, StringMatch::Regex(_)));
    // Query parameter names are case-sensitive.
    assert_eq!(m.query_params.len(), 2);
    assert!(matches!(&m.method, Some(StringMatch::Exact(v)) if v == "POST"));
}

#[test]
fn filters_become_headers_rewrites_redirects_and_mirrors() {
    let loaded = loaded_ok(&rules(
        "- matches: [{path: {type: PathPrefix, value: /old/}}]\n  filters:\n  \
         - type: RequestHeaderModifier\n    requestHeaderModifier:\n      set: [{name: X-Set, value: s}]\n      add: [{name: x-add, value: a}]\n      remove: [x-gone]\n  \
         - type: ResponseHeaderModifier\n    responseHeaderModifier: {set: [{name: x-resp, value: r}]}\n  \
         - type: URLRewrite\n    urlRewrite: {hostname: Other.Example, path: {type: ReplacePrefixMatch, replacePrefixMatch: \"\"}}\n  \
         - type: RequestMirror\n    requestMirror: {backendRef: {name: shadow, port: 80}, fraction: {numerator: 1, denominator: 4}}\n  \
         backendRefs:\n  - name: a\n    port: 80\n    filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier: {set: [{name: x-backend, value: a}]}\n\
         - matches: [{path: {type: Exact, value: /moved}}]\n  filters:\n  - type: RequestRedirect\n    requestRedirect: {scheme: https, hostname: example.com}\n\
         - matches: [{path: {type: PathPrefix, value: /full}}]\n  filters:\n  - type: URLRewrite\n    urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /new}}\n  backendRefs: [{name: a, port: 80}]",
    ));
    let vs = only_service(&loaded);
    // Exact /moved first; PathPrefix /old/ and /full are as long: rule order breaks the tie.
    let [moved, old, full] = &vs.http[..] else {
        panic!("three routes: {:#?}", vs.http)
    };
    assert_eq!(old.headers.request.set[0].0, "x-set");
    assert_eq!(old.headers.request.add[0].0, "x-add");
    assert_eq!(old.headers.request.remove[0], "x-gone");
    assert_eq!(old.headers.response.set[0].0, "x-resp");
    let rewrite = old.rewrite.as_ref().expect("rewrite");
    assert_eq!(rewrite.uri.as_deref(), Some("/"));
    assert!(!rewrite.whole_path);
    assert_eq!(rewrite.authority.as_deref(), Some("other.example"));
    let mirror = old.mirror.as_ref().expect("mirror");
    assert_eq!(mirror.destination.host.name, "shadow");
    assert_eq!(mirror.percentage.per_million, 250_000);
    assert_eq!(old.route[0].headers.request.set[0].0, "x-backend");
    assert!(matches!(&old.matches[0].uri, Some(StringMatch::PathPrefix(p)) if p == "/old"));

    let redirect = moved.redirect.as_ref().expect("redirect");
    assert_eq!(redirect.status, 302);
    assert_eq!(redirect.scheme.as_deref(), Some("https"));
    assert_eq!(redirect.host.as_deref(), Some("example.com"));
    assert!(redirect.port.is_none() && redirect.path.is_none());
    assert!(moved.route.is_empty() && moved.direct_response.is_none());

    let rewrite = full.rewrite.as_ref().expect("rewrite");
    assert!(rewrite.whole_path);
    assert_eq!(rewrite.uri.as_deref(), Some("/new"));
}

#[test]
fn a_prefix_redirect_and_timeouts() {
    let loaded = loaded_ok(&rules(
        "- matches: [{path: {value: /api/}}]\n  filters:\n  - type: RequestRedirect\n    requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2/}, port: 8443, statusCode: 301}\n\
         - timeouts: {request: 10s, backendRequest: 2s500ms}\n  backendRefs: [{name: a, port: 80}]\n\
         - matches: [{path: {value: /off}}]\n  timeouts: {request: 0s}\n  backendRefs: [{name: a, port: 80}]",
    ));
    let vs = only_service(&loaded);
    let [api, off, all] = &vs.http[..] else {
        panic!("three routes: {:#?}", vs.http)
    };
    let redirect = api.redirect.as_ref().expect("redirect");
    assert_eq!(redirect.status, 301);
    assert_eq!(redirect.port, Some(8443));
    assert!(matches!(&redirect.path, Some(RedirectPath::Prefix(p)) if p == "/v2"));
    assert_eq!(all.timeout, Some(Duration::from_secs(10)));
    let retries = all.retries.as_ref().expect("a per-try timeout");
    assert_eq!(retries.per_try_timeout, Some(Duration::from_millis(2500)));
    assert_eq!(retries.attempts, 2);
    assert_eq!(off.timeout, None);
}

/// `(spec, field, reason)`: the spec is a route for Service `service-c`.
const ERRORS: &[(&str, &str, &str)] = &[
    (
        "- backendRefs: [{name: a, port: 80, weight: -1}]",
        "spec.rules[0].backendRefs[0].weight",
        "outside 0–1000000",
    ),
    (
        "- backendRefs: [{name: a, port: 80, weight: 1000001}]",
        "spec.rules[0].backendRefs[0].weight",
        "outside 0–1000000",
    ),
    (
        "- backendRefs: [{name: a}]",
        "spec.rules[0].backendRefs[0].port",
        "needs its port",
    ),
    (
        "- filters: [{type: Teleport}]\n  backendRefs: [{name: a, port: 80}]",
        "spec.rules[0].filters[0].type",
        "unknown filter type \"Teleport\"",
    ),
    (
        "- filters: [{type: URLRewrite}]\n  backendRefs: [{name: a, port: 80}]",
        "spec.rules[0].filters[0].urlRewrite",
        "missing required field",
    ),
    (
        "- matches: [{path: {type: Glob, value: /a}}]\n  backendRefs: [{name: a, port: 80}]",
        "spec.rules[0].matches[0].path.type",
        "unknown path match type \"Glob\"",
    ),
    (
        "- matches: [{path: {type: Exact, value: a}}]\n  backendRefs: [{name: a, port: 80}]",
        "spec.rules[0].matches[0].path.value",
        "must be an absolute path",
    ),
    (
        "- matches: [{path: {type: RegularExpression, value: \"(\"}}]\n  backendRefs: [{name: a, port: 80}]",
        "spec.rules[0].matches[0].path.value",
        "regex",
    ),
    (
        "- matches: [{method: FETCH}]\n  backendRefs: [{name: a, port: 80}]",
        "spec.rules[0].matches[0].method",
        "unknown method \"FETCH\"",
    ),
    (
        "- matches: [{path: {value: /a}}, {path: {value: /b}}]\n  filters:\n  - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}\n  backendRefs: [{name: a, port: 80}]",
        "spec.rules[0].matches",
        "exactly one match, of type PathPrefix",
    ),
    (
        "- filters:\n  - {type: URLRewrite, urlRewrite: {hostname: a.b}}\n  - {type: RequestRedirect, requestRedirect: {hostname: c.d}}",
        "spec.rules[0].filters",
        "cannot be used together",
    ),
    (
        "- filters:\n  - {type: RequestRedirect, requestRedirect: {statusCode: 200}}",
        "spec.rules[0].filters[0].requestRedirect.statusCode",
        "not a redirect status",
    ),
    (
        "- filters:\n  - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: a}]}}\n  - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: b, value: c}]}}\n  backendRefs: [{name: a, port: 80}]",
        "spec.rules[0].filters[1].type",
        "may appear only once",
    ),
    (
        "- timeouts: {request: 1.5s}\n  backendRefs: [{name: a, port: 80}]",
        "spec.rules[0].timeouts.request",
        "invalid duration",
    ),
    (
        "- timeouts: {request: 1s, backendRequest: 2s}\n  backendRefs: [{name: a, port: 80}]",
        "spec.rules[0].timeouts.backendRequest",
        "must not be longer than timeouts.request",
    ),
    (
        "- filters:\n  - {type: RequestMirror, requestMirror: {backendRef: {name: s, port: 80}, percent: 120}}\n  backendRefs: [{name: a, port: 80}]",
        "spec.rules[0].filters[0].requestMirror.percent",
        "",
    ),
];

#[test]
fn every_error_names_its_field_and_the_route_is_rejected() {
    for &(spec, field, reason) in ERRORS {
        let text = rules(spec);
        let loaded = load_str("bad.yml", &text);
        let errors: Vec<_> = loaded.errors().collect();
        assert!(
            errors
                .iter()
                .any(|e| e.field == field && e.reason.contains(reason)),
            "{spec}\nwanted {field}: {reason}; got{}",
            describe(&loaded)
        );
        assert_eq!(
            errors[0].object,
            "HTTPRoute.gateway.networking.k8s.io shop/c"
        );
        assert_eq!(errors[0].file, "bad.yml");
        assert!(loaded.config.virtual_services.is_empty(), "{spec}");
    }
}

#[test]
fn what_is_not_supported_is_warned_by_name_and_left_out() {
    // A filter this mesh lacks drops its rule (fails closed: the Service's route is exclusive).
    let loaded = loaded_ok(&rules(
        "- filters: [{type: CORS, cors: {allowOrigins: [\"*\"]}}]\n  backendRefs: [{name: a, port: 80}]\n\
         - matches: [{path: {value: /b}}]\n  backendRefs: [{name: b, port: 80}]",
    ));
    let warning = loaded.warnings().next().expect("warning");
    assert_eq!(warning.field, "spec.rules[0].filters[0].type");
    assert!(
        warning.reason.contains("CORS is not supported"),
        "{warning}"
    );
    let vs = only_service(&loaded);
    assert_eq!(vs.http.len(), 1);
    assert_eq!(vs.http[0].route[0].destination.host.name, "b");

    let cases = [
        (
            "parentRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: c}]\nrules: [{backendRefs: [{name: a, port: 80}]}]",
            "spec.parentRefs[0].kind",
            "kind ServiceImport in group \"multicluster.x-k8s.io\" is not supported",
        ),
        (
            "parentRefs: [{group: \"\", kind: Service, name: c, sectionName: http}]\nrules: [{backendRefs: [{name: a, port: 80}]}]",
            "spec.parentRefs[0].sectionName",
            "write its number as port",
        ),
        (
            "parentRefs: [{group: \"\", kind: Service, name: c}]\nhostnames: [c.example]\nrules: [{backendRefs: [{name: a, port: 80}]}]",
            "spec.hostnames",
            "not used for Service parents",
        ),
        (
            "parentRefs: [{group: \"\", kind: Service, name: c}]\nrules: [{backendRefs: [{kind: ServiceImport, group: multicluster.x-k8s.io, name: a, port: 80}, {name: b, port: 80}]}]",
            "spec.rules[0].backendRefs[0].kind",
            "left out",
        ),
        (
            "parentRefs: [{group: \"\", kind: Service, name: c}]\nrules: [{retry: {attempts: 3}, backendRefs: [{name: a, port: 80}]}]",
            "spec.rules[0].retry",
            "not supported",
        ),
        (
            "parentRefs: [{group: \"\", kind: Service, name: c}]\nrules: [{backendRefs: [{name: a, port: 80}], colour: red}]",
            "spec.rules[0].colour",
            "unknown field",
        ),
    ];
    for (spec, field, reason) in cases {
        let loaded = loaded_ok(&route("c", "", spec));
        assert!(
            loaded
                .warnings()
                .any(|w| w.field == field && w.reason.contains(reason)),
            "{spec}\nwanted {field}: {reason}; got{}",
            describe(&loaded)
        );
    }
}

#[test]
fn the_oldest_of_a_virtual_service_and_http_routes_takes_the_host() {
    let vs = |created: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: c\n  \
             namespace: shop\n{created}spec:\n  hosts: [service-c, other]\n  http:\n  - route:\n    \
             - destination: {{host: service-c}}\n"
        )
    };
    let http_route = |created: &str| {
        route(
            "c",
            created,
            "parentRefs: [{group: \"\", kind: Service, name: service-c}]\nrules: [{backendRefs: [{name: service-c-v2, port: 80}]}]",
        )
    };
    let january = "  creationTimestamp: \"2026-01-01T00:00:00Z\"\n";
    let february = "  creationTimestamp: \"2026-02-01T00:00:00Z\"\n";

    // Neither dated (files): the VirtualService keeps the host; the route is warned about.
    let loaded = load_sources(&[("vs.yml", vs("")), ("route.yml", http_route(""))]);
    assert!(loaded.is_ok(), "{}", describe(&loaded));
    assert_eq!(loaded.config.virtual_services.len(), 1);
    assert_eq!(loaded.config.virtual_services[0].exclusive, Exclusive::No);
    let warning = loaded.warnings().next().expect("warning");
    assert_eq!(
        (warning.file.as_str(), warning.field.as_str()),
        ("route.yml", "spec.parentRefs")
    );
    assert!(
        warning.reason.contains("VirtualService shop/c"),
        "{warning}"
    );

    // The route is older: it takes service-c; the VirtualService keeps its other host.
    let loaded = load_sources(&[("vs.yml", vs(february)), ("route.yml", http_route(january))]);
    let services = &loaded.config.virtual_services;
    assert_eq!(services.len(), 2, "{services:#?}");
    let kept = services
        .iter()
        .find(|v| v.exclusive == Exclusive::No)
        .expect("the VirtualService");
    assert_eq!(kept.hosts.len(), 1);
    assert_eq!(kept.hosts[0].name, "other");
    let merged = services
        .iter()
        .find(|v| v.exclusive != Exclusive::No)
        .expect("the route");
    assert_eq!(
        merged.http[0].route[0].destination.host.name,
        "service-c-v2"
    );
    let warning = loaded.warnings().next().expect("warning");
    assert_eq!(
        (warning.file.as_str(), warning.field.as_str()),
        ("vs.yml", "spec.hosts")
    );
    assert!(warning.reason.contains("HTTPRoute shop/c"), "{warning}");

    // The VirtualService is older: it keeps both hosts.
    let loaded = load_sources(&[("vs.yml", vs(january)), ("route.yml", http_route(february))]);
    assert_eq!(loaded.config.virtual_services.len(), 1);
    assert_eq!(loaded.config.virtual_services[0].hosts.len(), 2);
}

#[test]
fn other_gateway_api_kinds_are_reported_as_not_implemented() {
    let loaded = load_str(
        "tls.yml",
        "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TLSRoute\nmetadata: {name: t}\nspec: {}\n",
    );
    assert!(loaded.is_ok(), "{}", describe(&loaded));
    let warning = loaded.warnings().next().expect("warning");
    assert_eq!(warning.severity, Severity::Warning);
    assert!(
        warning
            .reason
            .contains("TLSRoute.gateway.networking.k8s.io is not implemented"),
        "{warning}"
    );
}

fn grpc_route(name: &str, extra_metadata: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata:\n  name: {name}\n  \
         namespace: shop\n{extra_metadata}spec:\n  parentRefs: [{{group: \"\", kind: Service, name: greeter, port: 50051}}]\n  \
         rules:\n{}",
        rules.lines().map(|l| format!("  {l}\n")).collect::<String>()
    )
}

#[test]
fn a_grpc_route_matches_methods_as_paths_ranked_by_service_then_method() {
    let loaded = loaded_ok(&grpc_route(
        "g",
        "",
        "- matches: [{method: {service: helloworld.Greeter}}]\n  backendRefs: [{name: by-service, port: 50051}]\n\
         - matches: [{method: {service: helloworld.Greeter, method: SayHello}, headers: [{name: x-canary, value: \"1\"}]}]\n  \
           filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-via, value: mesh}]}}]\n  \
           backendRefs: [{name: canary, port: 50051, weight: 1}, {name: stable, port: 50051, weight: 3}]\n\
         - matches: [{method: {method: SayHello}}]\n  backendRefs: [{name: by-method, port: 50051}]\n\
         - matches: [{method: {type: RegularExpression, service: \"helloworld\\\\..*\"}}]\n  backendRefs: [{name: by-regex, port: 50051}]\n\
         - backendRefs: [{name: rest, port: 50051}]",
    ));
    let vs = only_service(&loaded);
    assert_eq!(vs.exclusive, Exclusive::Ports(vec![50051]));
    let order: Vec<(String, &str)> = vs
        .http
        .iter()
        .map(|r| {
            let uri = match &r.matches[0].uri {
                Some(StringMatch::Exact(p)) => format!("={p}"),
                Some(StringMatch::PathPrefix(p)) => format!("{p}/*"),
                Some(StringMatch::Regex(re)) => format!("~{re}"),
                None => "*".to_owned(),
                other => format!("{other:?}"),
            };
            (uri, r.route[0].destination.host.name.as_str())
        })
        .collect();
    assert_eq!(
        order,
        [
            ("=/helloworld.Greeter/SayHello".to_owned(), "canary"),
            // 18 characters of service, then 12 (the pattern's, as written).
            ("/helloworld.Greeter/*".to_owned(), "by-service"),
            (
                "~^(?:/(?:helloworld\\..*)/(?:[^/]+))$".to_owned(),
                "by-regex"
            ),
            ("~^(?:/[^/]+/SayHello)$".to_owned(), "by-method"),
            ("*".to_owned(), "rest"),
        ]
    );
    let canary = &vs.http[0];
    assert_eq!(canary.matches[0].headers.len(), 1);
    assert_eq!(canary.headers.request.set[0].0, "x-via");
    assert_eq!(
        canary.route.iter().map(|d| d.weight).collect::<Vec<_>>(),
        [1, 3]
    );
    assert!(canary.timeout.is_none() && canary.retries.is_none());
}

#[test]
fn a_grpc_route_refuses_http_only_filters_and_empty_method_matches() {
    for (rules, field, reason) in [
        (
            "- filters: [{type: URLRewrite, urlRewrite: {hostname: a.b}}]\n  backendRefs: [{name: a, port: 1}]",
            "spec.rules[0].filters[0].type",
            "not a GRPCRoute filter",
        ),
        (
            "- matches: [{method: {type: Exact}}]\n  backendRefs: [{name: a, port: 1}]",
            "spec.rules[0].matches[0].method",
            "one of service or method",
        ),
        (
            "- matches: [{method: {service: \"a/b\"}}]\n  backendRefs: [{name: a, port: 1}]",
            "spec.rules[0].matches[0].method.service",
            "not a gRPC service name",
        ),
    ] {
        let loaded = load_str("grpc.yml", &grpc_route("g", "", rules));
        assert!(
            loaded
                .errors()
                .any(|e| e.field == field && e.reason.contains(reason)),
            "{rules}: wanted {field}: {reason}; got{}",
            describe(&loaded)
        );
    }
}

#[test]
fn an_http_route_and_a_grpc_route_are_never_merged_the_older_takes_the_service() {
    let http = route(
        "h",
        "  creationTimestamp: \"2026-02-01T00:00:00Z\"\n",
        "parentRefs: [{group: \"\", kind: Service, name: greeter, port: 50051}]\nrules: [{backendRefs: [{name: http, port: 50051}]}]",
    );
    let grpc = grpc_route(
        "g",
        "  creationTimestamp: \"2026-01-01T00:00:00Z\"\n",
        "- backendRefs: [{name: grpc, port: 50051}]",
    );
    let loaded = load_sources(&[("http.yml", &http), ("grpc.yml", &grpc)]);
    assert!(loaded.is_ok(), "{}", describe(&loaded));
    let vs = only_service(&loaded);
    assert_eq!(vs.http.len(), 1);
    assert_eq!(vs.http[0].route[0].destination.host.name, "grpc");
    let warning = loaded.warnings().next().expect("warning");
    assert_eq!(warning.file, "http.yml");
    assert!(warning.reason.contains("GRPCRoute shop/g"), "{warning}");
}

#[test]
fn validate_reports_a_bad_route_with_its_field() {
    let dir = std::env::temp_dir().join(format!("mesh-validate-route-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("route.yml");
    std::fs::write(
        &file,
        rules("- backendRefs: [{name: a, port: 80, weight: -5}]\n  filters: [{type: Nope}]"),
    )
    .unwrap();
    let mut out = Vec::new();
    let ok = crate::config::run_validate(std::slice::from_ref(&file), &mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!ok);
    assert!(out.contains(&format!(
        "error: {}: HTTPRoute.gateway.networking.k8s.io shop/c: spec.rules[0].backendRefs[0].weight: weight -5 is outside 0–1000000",
        file.display()
    )), "{out}");
    assert!(
        out.contains("spec.rules[0].filters[0].type: unknown filter type \"Nope\""),
        "{out}"
    );
}

const INGRESS: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: shop}
spec:
  gatewayClassName: istio
  listeners:
  - {name: http, port: 80, protocol: HTTP}
  - {name: shop, port: 8080, protocol: HTTP, hostname: shop.example, allowedRoutes: {namespaces: {from: All}}}
  - {name: tls, port: 443, protocol: HTTPS, hostname: shop.example}
";

#[test]
fn a_gateway_of_a_served_class_is_the_ingress_and_its_routes_bind_to_it() {
    let routes = route(
        "front",
        "",
        "parentRefs: [{name: ingress}, {name: ingress, port: 8080}]\nhostnames: [shop.example, \"*.shop.example\"]\n\
         rules:\n- matches: [{path: {value: /cart}}]\n  backendRefs: [{name: cart, port: 80}]\n\
         - matches: [{path: {type: Exact, value: /cart/checkout}}]\n  backendRefs: [{name: checkout, port: 80}]",
    );
    let loaded = load_sources(&[("gateway.yml", INGRESS), ("route.yml", &routes)]);
    assert!(loaded.is_ok(), "{}", describe(&loaded));
    // The HTTPS listener is warned about and left out.
    let warning = loaded.warnings().next().expect("warning");
    assert_eq!(warning.field, "spec.listeners[2].protocol");
    let gateways = &loaded.config.gateways;
    assert_eq!(gateways.len(), 1);
    let gateway = &gateways[0];
    assert!(gateway.selector.is_empty(), "selects the built-in ingress");
    let servers: Vec<(u16, &str, &[String])> = gateway
        .servers
        .iter()
        .map(|s| (s.port, s.protocol.as_str(), &s.hosts[..]))
        .collect();
    assert_eq!(
        servers,
        [
            (80, "HTTP", &["./*".to_owned()][..]),
            (8080, "HTTP", &["*/shop.example".to_owned()][..])
        ]
    );
    // One VirtualService per host, bound to the gateway, the exact path first; on each of the
    // two parents (any listener, and port 8080's).
    let bound: Vec<(&str, &[String], usize)> = loaded
        .config
        .virtual_services
        .iter()
        .map(|vs| (vs.hosts[0].name.as_str(), &vs.gateways[..], vs.http.len()))
        .collect();
    assert_eq!(
        bound,
        [
            ("*.shop.example", &["shop/ingress".to_owned()][..], 4),
            ("shop.example", &["shop/ingress".to_owned()][..], 4),
        ]
    );
    let vs = &loaded.config.virtual_services[1];
    assert_eq!(vs.exclusive, Exclusive::No);
    assert!(
        matches!(&vs.http[0].matches[0].uri, Some(StringMatch::Exact(p)) if p == "/cart/checkout")
    );
    let ports: Vec<Option<u16>> = vs.http.iter().map(|r| r.matches[0].port).collect();
    assert_eq!(ports, [None, Some(8080), None, Some(8080)]);
}

#[test]
fn a_gateway_of_another_class_is_warned_about_and_not_served() {
    let other = INGRESS.replace("gatewayClassName: istio", "gatewayClassName: nginx");
    let loaded = loaded_ok(&other);
    assert!(loaded.config.gateways.is_empty());
    assert!(
        loaded.warnings().any(|w| w.field == "spec.gatewayClassName"
            && w.reason
                .contains("class \"nginx\" is not this mesh's (istio, sidecarless)")),
        "{}",
        describe(&loaded)
    );
}

#[test]
fn consumer_routes_take_the_service_whole_for_their_namespaces_clients() {
    let producer = route(
        "c",
        "",
        "parentRefs: [{group: \"\", kind: Service, name: service-c, port: 8080}]\nrules: [{backendRefs: [{name: v1, port: 8080}]}]",
    );
    let consumer = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: c-for-frontend, namespace: frontend}
spec:
  parentRefs: [{group: \"\", kind: Service, name: service-c, namespace: shop, port: 8080}]
  rules:
  - matches: [{path: {value: /api}}]
    backendRefs: [{name: v2, namespace: shop, port: 8080}]
";
    let loaded = load_sources(&[
        ("producer.yml", producer.as_str()),
        ("consumer.yml", consumer),
    ]);
    assert!(loaded.is_ok(), "{}", describe(&loaded));
    let vs = only_service(&loaded);
    assert_eq!(vs.hosts[0].namespace, "shop");
    type Row<'a> = (Option<&'a str>, Option<u16>, Option<&'a str>, Option<u16>);
    let routes: Vec<Row> = vs
        .http
        .iter()
        .map(|r| {
            let m = &r.matches[0];
            (
                m.source_namespace.as_deref(),
                m.port,
                r.route.first().map(|d| d.destination.host.name.as_str()),
                r.direct_response,
            )
        })
        .collect();
    assert_eq!(
        routes,
        [
            // frontend's clients: its route, then 404 for what it leaves (never the producer's).
            (Some("frontend"), Some(8080), Some("v2"), None),
            (Some("frontend"), Some(8080), None, Some(404)),
            // everyone else's: the producer route.
            (None, Some(8080), Some("v1"), None),
        ]
    );
    assert_eq!(
        vs.http[1].name.as_deref(),
        Some("frontend.consumer-routes.unmatched")
    );
    assert_eq!(vs.exclusive, Exclusive::Ports(vec![8080]));
}
