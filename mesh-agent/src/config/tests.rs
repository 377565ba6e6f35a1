//! Loader tests: the tutorial's files, every validation error and warning (naming file,
//! object, field and reason), API versions, JSON, multi-document files, Lists, other kinds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::model::{LoadBalancer, OutlierDetection, Percent, StringMatch};
use super::*;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

fn example(relative: &str) -> (String, String) {
    let path = examples_dir().join(relative);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    (relative.to_owned(), text)
}

fn load_examples(relatives: &[&str]) -> Loaded {
    let sources: Vec<(String, String)> = relatives.iter().map(|r| example(r)).collect();
    load_sources(&sources)
}

fn indent(text: &str) -> String {
    text.lines().map(|line| format!("  {line}\n")).collect()
}

fn vs(spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata:\n  name: bad\n  \
         namespace: shop\nspec:\n{}",
        indent(spec)
    )
}

fn dr(spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata:\n  name: bad\n  \
         namespace: shop\nspec:\n{}",
        indent(spec)
    )
}

fn gw(spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1beta1\nkind: Gateway\nmetadata:\n  name: bad\n  \
         namespace: shop\nspec:\n{}",
        indent(spec)
    )
}

fn describe(loaded: &Loaded) -> String {
    loaded
        .diagnostics
        .iter()
        .map(|d| format!("\n  {}: {d}", d.severity))
        .collect()
}

// ---------------------------------------------------------------- the tutorial

/// The tutorial applies its files step by step on top of each other; each set is what is in
/// force at one step.
const TUTORIAL_STEPS: &[&[&str]] = &[
    &["destination-rules.yml"],
    &["destination-rules.yml", "canary/1-vs-v1.yml"],
    &["destination-rules.yml", "canary/2-vs-v1_and_v2_90_10.yml"],
    &["destination-rules.yml", "canary/3-vs-v1_and_v2_50_50.yml"],
    &["destination-rules.yml", "canary/4-vs-v2.yml"],
    &["destination-rules.yml", "circuit-breaker/1-vs.yml"],
    &[
        "circuit-breaker/2-destination-rules.yml",
        "circuit-breaker/1-vs.yml",
    ],
    &[
        "circuit-breaker/2-destination-rules.yml",
        "circuit-breaker/3-vs-retry.yml",
    ],
    &["gateway.yml"],
    // The canary's Gateway API twin, applied instead of its VirtualServices.
    &["gateway-api/canary/1-route-v1.yml"],
    &["gateway-api/canary/2-route-v1_and_v2_90_10.yml"],
    &["gateway-api/canary/3-route-v1_and_v2_50_50.yml"],
    &["gateway-api/canary/4-route-v2.yml"],
];

const CIRCUIT_BREAKER_RULE: &str = "circuit-breaker/2-destination-rules.yml";

#[test]
fn every_example_parses_without_errors_and_only_the_expected_warning() {
    let mut found = Vec::new();
    config_files(&examples_dir(), &mut found).expect("examples directory is readable");
    assert!(
        found.len() >= 18,
        "expected the tutorial and feature examples, found {found:?}"
    );
    for path in &found {
        let relative = path
            .strip_prefix(examples_dir())
            .expect("under the examples directory")
            .to_string_lossy()
            .into_owned();
        let gateway_api_feature =
            relative.starts_with("gateway-api/") && !relative.starts_with("gateway-api/canary/");
        if relative.starts_with("features/") || gateway_api_feature {
            // Feature examples, Istio's and the Gateway API's, are self-contained.
            let loaded = load_examples(&[&relative]);
            assert!(
                loaded.diagnostics.is_empty(),
                "{relative}:{}",
                describe(&loaded)
            );
        } else if relative.starts_with("security/") {
            // Self-contained too; each policy says what it does not judge yet.
            let loaded = load_examples(&[&relative]);
            assert!(loaded.is_ok(), "{relative}:{}", describe(&loaded));
            assert!(
                loaded.warnings().next().is_none(),
                "{relative}:{}",
                describe(&loaded)
            );
        } else {
            let in_a_step = TUTORIAL_STEPS
                .iter()
                .any(|step| step.contains(&relative.as_str()));
            assert!(in_a_step, "{relative} is in no tutorial step");
        }
    }
    for step in TUTORIAL_STEPS {
        let loaded = load_examples(step);
        let expected_warnings = usize::from(step.contains(&CIRCUIT_BREAKER_RULE));
        assert!(loaded.is_ok(), "{step:?}:{}", describe(&loaded));
        assert_eq!(
            loaded.warnings().count(),
            expected_warnings,
            "{step:?}:{}",
            describe(&loaded)
        );
    }
}

#[test]
fn the_whole_examples_folder_loads_as_one_set_without_errors() {
    let loaded = load_path(&examples_dir());
    assert!(loaded.is_ok(), "{}", describe(&loaded));
    // Besides the circuit breaker's unknown field, only the tutorial's redefinitions of
    // service-c (each step replaces the previous one) are reported, and that its Gateway API
    // twin, meant to replace the VirtualServices, does not take service-c from them.
    for warning in loaded.warnings() {
        let replaces = warning.reason.starts_with("replaces the definition in");
        let cb_field = warning.field == "spec.trafficPolicy.connectionPool.http.maxConnections";
        let twin = warning.object == "HTTPRoute.gateway.networking.k8s.io default/service-c"
            && warning
                .reason
                .contains("also routed by VirtualService default/service-c");
        assert!(replaces || cb_field || twin, "unexpected {warning}");
    }
    let others: Vec<_> = loaded.other_objects().collect();
    assert_eq!(others.len(), 1, "the Service in features/list.json");
    assert_eq!(&*others[0].key.kind, "Service");
}

#[test]
fn circuit_breaker_rule_warns_once_about_http_max_connections() {
    let loaded = load_examples(&[CIRCUIT_BREAKER_RULE]);
    assert!(loaded.is_ok(), "{}", describe(&loaded));
    let warnings: Vec<_> = loaded.warnings().collect();
    assert_eq!(warnings.len(), 1, "{}", describe(&loaded));
    let w = warnings[0];
    assert_eq!(w.file, CIRCUIT_BREAKER_RULE);
    assert_eq!(w.object, "DestinationRule default/service-c");
    assert_eq!(
        w.field,
        "spec.trafficPolicy.connectionPool.http.maxConnections"
    );
    assert_eq!(w.reason, "unknown field, ignored");

    let rule = &loaded.config.destination_rules[0];
    let pool = rule
        .traffic_policy
        .connection_pool
        .as_ref()
        .expect("connection pool");
    assert_eq!(pool.tcp.max_connections, Some(100));
    assert_eq!(pool.tcp.connect_timeout, Duration::from_secs(10));
    assert_eq!(pool.http.http1_max_pending_requests, None);
    assert_eq!(pool.http.idle_timeout, Some(Duration::from_secs(3600)));
    let outlier = rule
        .traffic_policy
        .outlier_detection
        .as_ref()
        .expect("outlier detection");
    assert_eq!(
        *outlier,
        OutlierDetection {
            consecutive_5xx_errors: 1,
            interval: Duration::from_secs(2),
            base_ejection_time: Duration::from_secs(10),
            max_ejection_percent: 100,
            ..OutlierDetection::default()
        }
    );
}

#[test]
fn canary_split_and_subsets() {
    let loaded = load_examples(&["destination-rules.yml", "canary/2-vs-v1_and_v2_90_10.yml"]);
    assert!(loaded.diagnostics.is_empty(), "{}", describe(&loaded));
    let rule = &loaded.config.destination_rules[0];
    assert_eq!(rule.host.name, "service-c");
    assert_eq!(rule.host.namespace, "default");
    let subsets: Vec<_> = rule
        .subsets
        .iter()
        .map(|s| (s.name.as_str(), s.labels.get("version").map(String::as_str)))
        .collect();
    assert_eq!(
        subsets,
        [("version-v1", Some("v1")), ("version-v2", Some("v2"))]
    );
    let vs = &loaded.config.virtual_services[0];
    assert_eq!(vs.gateways, ["mesh"]);
    let split: Vec<_> = vs.http[0]
        .route
        .iter()
        .map(|d| (d.destination.subset.as_deref(), d.weight))
        .collect();
    assert_eq!(split, [(Some("version-v1"), 90), (Some("version-v2"), 10)]);
    assert!(
        vs.http[0].retries.is_none(),
        "absent retries stay absent for the engine"
    );
}

#[test]
fn retry_vs_and_gateway() {
    let loaded = load_examples(&["circuit-breaker/3-vs-retry.yml", "gateway.yml"]);
    assert!(loaded.diagnostics.is_empty(), "{}", describe(&loaded));
    // Rules are kept in key order (kind, namespace, name), whatever the load order.
    let retried = loaded.config.virtual_services.iter();
    let retry = retried
        .into_iter()
        .find(|vs| vs.id.name == "service-c")
        .expect("service-c")
        .http[0]
        .retries
        .as_ref()
        .expect("retries");
    assert_eq!(retry.attempts, 3);
    assert_eq!(retry.per_try_timeout, Some(Duration::from_secs(1)));
    assert!(retry.retry_on.five_xx);
    assert!(retry.retry_on.retriable_status_codes.is_empty());

    let gateway = &loaded.config.gateways[0];
    assert_eq!(gateway.id.name, "service-gateway");
    assert_eq!(
        gateway.selector.get("istio").map(String::as_str),
        Some("ingressgateway")
    );
    let server = &gateway.servers[0];
    assert_eq!(
        (
            server.port,
            server.protocol.as_str(),
            server.port_name.as_str()
        ),
        (80, "HTTP", "http")
    );
    assert_eq!(server.hosts, ["*"]);
    let vs = &loaded.config.virtual_services[0];
    assert_eq!(vs.id.name, "service-a");
    assert_eq!(vs.gateways, ["service-gateway"]);
    assert_eq!(vs.hosts[0].name, "*");
    let route = &vs.http[0];
    assert!(matches!(&route.matches[0].uri, Some(StringMatch::Prefix(p)) if p == "/service-a"));
    assert_eq!(
        route.rewrite.as_ref().and_then(|r| r.uri.as_deref()),
        Some("/")
    );
    assert_eq!(route.route[0].destination.host.name, "service-a");
    assert_eq!(route.route[0].destination.port, Some(8080));
}

#[test]
fn feature_examples_fill_the_model() {
    let loaded = load_path(&examples_dir().join("features"));
    assert!(loaded.diagnostics.is_empty(), "{}", describe(&loaded));
    let config = &loaded.config;
    let vs = |name: &str| {
        config
            .virtual_services
            .iter()
            .find(|v| v.id.name == name)
            .unwrap_or_else(|| panic!("{name}"))
    };
    let rule = |name: &str| {
        config
            .destination_rules
            .iter()
            .find(|r| r.id.name == name)
            .unwrap_or_else(|| panic!("{name}"))
    };

    let matching = vs("service-b-matching");
    let m = &matching.http[3].matches[0];
    let names: Vec<_> = m.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["user-agent", "x-client-version", "x-user"]);
    assert!(matching.http[1].matches[0].ignore_uri_case);
    assert_eq!(matching.http[2].matches[0].port, Some(8080));
    assert!(
        matches!(&matching.http[2].matches[0].scheme, Some(StringMatch::Exact(s)) if s == "http")
    );
    assert_eq!(matching.http[3].matches[1].gateways, ["mesh"]);

    let headers = vs("service-d-headers");
    let request = &headers.http[0].headers.request;
    assert_eq!(request.set[0].0.as_str(), "x-mesh-route");
    assert_eq!(request.remove[0].as_str(), "x-internal-debug");
    assert_eq!(headers.http[0].route[1].weight, 30);

    let retries = vs("service-e-retries");
    let all = &retries.http[0].retries.as_ref().expect("retries").retry_on;
    assert!(all.five_xx && all.unavailable && all.http3_post_connect_failure);
    assert_eq!(all.retriable_status_codes, [503, 429]);
    assert_eq!(retries.http[0].timeout, Some(Duration::from_secs(90)));
    assert_eq!(
        retries.http[1].retries.as_ref().map(|r| r.attempts),
        Some(0)
    );
    assert_eq!(
        retries.http[2].retries.as_ref().map(|r| r.retry_on.clone()),
        Some(model::RetryOn::istio_default())
    );

    let faults = vs("service-f-faults");
    let fault = faults.http[0].fault.as_ref().expect("fault");
    let delay = fault.delay.as_ref().expect("delay");
    assert_eq!(
        (delay.fixed_delay, delay.percentage),
        (
            Duration::from_secs(2),
            Percent {
                per_million: 125_000
            }
        )
    );
    let abort = fault.abort.as_ref().expect("abort");
    assert_eq!(
        (abort.http_status, abort.percentage),
        (503, Percent { per_million: 1_000 })
    );
    let legacy = faults.http[1]
        .fault
        .as_ref()
        .and_then(|f| f.delay.as_ref())
        .expect("delay");
    assert_eq!(
        legacy.percentage,
        Percent {
            per_million: 100_000
        }
    );

    let mirror = vs("service-g-mirror");
    let first = mirror.http[0].mirror.as_ref().expect("mirror");
    assert_eq!(
        first.percentage,
        Percent {
            per_million: 255_000
        }
    );
    assert_eq!(first.destination.subset.as_deref(), Some("candidate"));
    assert_eq!(
        mirror.http[1].mirror.as_ref().map(|m| m.percentage),
        Some(Percent::HUNDRED)
    );

    let lb = rule("service-h");
    assert_eq!(
        lb.traffic_policy.load_balancer,
        Some(LoadBalancer::RoundRobin)
    );
    let per_subset: Vec<_> = lb
        .subsets
        .iter()
        .map(|s| s.traffic_policy.load_balancer)
        .collect();
    assert_eq!(
        per_subset,
        [
            Some(LoadBalancer::LeastRequest),
            Some(LoadBalancer::LeastRequest),
            Some(LoadBalancer::Random),
            Some(LoadBalancer::Passthrough)
        ]
    );

    let pool = rule("service-i")
        .traffic_policy
        .connection_pool
        .clone()
        .expect("pool");
    assert_eq!(pool.tcp.connect_timeout, Duration::from_millis(250));
    assert_eq!(pool.tcp.idle_timeout, Some(Duration::from_secs(300)));
    assert_eq!(pool.http.http2_max_requests, Some(200));
    assert_eq!(pool.http.max_requests_per_connection, Some(100));
    assert_eq!(pool.http.max_retries, Some(3));
    assert_eq!(pool.http.idle_timeout, Some(Duration::from_secs(30)));

    let outlier = rule("service-j")
        .traffic_policy
        .outlier_detection
        .clone()
        .expect("outlier");
    assert_eq!(
        outlier,
        OutlierDetection {
            consecutive_5xx_errors: 3,
            consecutive_gateway_errors: Some(2),
            consecutive_local_origin_failures: 4,
            split_external_local_origin_errors: true,
            interval: Duration::from_secs(5),
            base_ejection_time: Duration::from_secs(60),
            max_ejection_percent: 50,
            min_health_percent: 30,
        }
    );
    let deprecated = rule("service-k")
        .traffic_policy
        .outlier_detection
        .clone()
        .expect("outlier");
    assert_eq!(
        (
            deprecated.consecutive_5xx_errors,
            deprecated.consecutive_gateway_errors
        ),
        (0, Some(5))
    );

    let listed = vs("service-l");
    assert_eq!(listed.id.namespace, "shop");
    assert_eq!(listed.hosts[0].namespace, "shop");
    assert_eq!(listed.http[0].timeout, Some(Duration::from_secs(3)));
}

// ---------------------------------------------------------------- errors

struct ErrorCase {
    name: &'static str,
    yaml: String,
    object: &'static str,
    field: &'static str,
    reason: &'static str,
}

fn case(name: &'static str, yaml: String, field: &'static str, reason: &'static str) -> ErrorCase {
    let object = if yaml.contains("kind: VirtualService") {
        "VirtualService shop/bad"
    } else if yaml.contains("kind: DestinationRule") {
        "DestinationRule shop/bad"
    } else {
        "Gateway shop/bad"
    };
    ErrorCase {
        name,
        yaml,
        object,
        field,
        reason,
    }
}

/// A VirtualService with one route to `dest` and the given extra lines in that route.
fn route_with(extra: &str) -> String {
    vs(&format!(
        "hosts: [svc]\nhttp:\n- route:\n  - destination: {{host: svc}}\n{}",
        indent(extra)
    ))
}

fn error_cases() -> Vec<ErrorCase> {
    vec![
        case("weights must sum to 100", vs("hosts: [svc]\nhttp:\n- route:\n  - destination: {host: a}\n    weight: 80\n  - destination: {host: b}\n    weight: 10"),
            "spec.http[0].route", "weights sum to 90, must be 100"),
        case("several destinations need weights", vs("hosts: [svc]\nhttp:\n- route:\n  - destination: {host: a}\n  - destination: {host: b}"),
            "spec.http[0].route", "weights sum to 0, must be 100"),
        case("a lone explicit weight must be 100", vs("hosts: [svc]\nhttp:\n- route:\n  - destination: {host: a}\n    weight: 50"),
            "spec.http[0].route", "weights sum to 50, must be 100"),
        case("negative weight", vs("hosts: [svc]\nhttp:\n- route:\n  - destination: {host: a}\n    weight: -10\n  - destination: {host: b}\n    weight: 110"),
            "spec.http[0].route[0].weight", "weight -10 must not be negative"),
        case("unparsable timeout", route_with("timeout: soon"), "spec.http[0].timeout", "invalid duration \"soon\""),
        case("negative timeout", route_with("timeout: -1s"), "spec.http[0].timeout", "must not be negative"),
        case("timeout without unit", route_with("timeout: \"5\""), "spec.http[0].timeout", "invalid duration \"5\""),
        case("unparsable perTryTimeout", route_with("retries: {attempts: 1, perTryTimeout: 1x}"),
            "spec.http[0].retries.perTryTimeout", "invalid duration \"1x\""),
        case("negative retry attempts", route_with("retries: {attempts: -1}"),
            "spec.http[0].retries.attempts", "retry attempts -1 must not be negative"),
        case("unknown retryOn", route_with("retries: {attempts: 2, retryOn: \"5xx,sometimes\"}"),
            "spec.http[0].retries.retryOn", "unknown retryOn condition(s) \"sometimes\""),
        case("status code out of range in retryOn", route_with("retries: {attempts: 2, retryOn: \"700\"}"),
            "spec.http[0].retries.retryOn", "unknown retryOn condition(s) \"700\""),
        case("bad regex", route_with("match:\n- uri: {regex: \"/v[0-9\"}"), "spec.http[0].match[0].uri", "invalid regex"),
        case("two match kinds", route_with("match:\n- uri: {exact: /a, prefix: /b}"),
            "spec.http[0].match[0].uri", "exactly one of exact, prefix, regex must be set, found 2"),
        case("empty uri match", route_with("match:\n- uri: {}"),
            "spec.http[0].match[0].uri", "exactly one of exact, prefix, regex must be set, found 0"),
        case("bad regex in header match", route_with("match:\n- headers:\n    x-a: {regex: \"(\"}"),
            "spec.http[0].match[0].headers.x-a", "invalid regex"),
        case("invalid header name in match", route_with("match:\n- headers:\n    \"x a\": {exact: b}"),
            "spec.http[0].match[0].headers.x a", "invalid header name \"x a\""),
        case("match port out of range", route_with("match:\n- port: 70000"), "spec.http[0].match[0].port", "port 70000 is outside 1–65535"),
        case("delay percentage above 100", route_with("fault:\n  delay: {fixedDelay: 1s, percentage: {value: 100.5}}"),
            "spec.http[0].fault.delay.percentage.value", "percentage 100.5 is outside 0–100"),
        case("negative abort percentage", route_with("fault:\n  abort: {httpStatus: 503, percentage: {value: -1}}"),
            "spec.http[0].fault.abort.percentage.value", "percentage -1 is outside 0–100"),
        case("legacy delay percent above 100", route_with("fault:\n  delay: {fixedDelay: 1s, percent: 150}"),
            "spec.http[0].fault.delay.percent", "percentage 150 is outside 0–100"),
        case("negative fixed delay", route_with("fault:\n  delay: {fixedDelay: -2s, percentage: {value: 1}}"),
            "spec.http[0].fault.delay.fixedDelay", "must not be negative"),
        case("delay without fixedDelay", route_with("fault:\n  delay: {percentage: {value: 1}}"),
            "spec.http[0].fault.delay.fixedDelay", "missing required field"),
        case("abort status above 599", route_with("fault:\n  abort: {httpStatus: 600, percentage: {value: 1}}"),
            "spec.http[0].fault.abort.httpStatus", "HTTP status 600 is outside 100–599"),
        case("abort status below 100", route_with("fault:\n  abort: {httpStatus: 99, percentage: {value: 1}}"),
            "spec.http[0].fault.abort.httpStatus", "HTTP status 99 is outside 100–599"),
        case("abort without status", route_with("fault:\n  abort: {percentage: {value: 1}}"),
            "spec.http[0].fault.abort.httpStatus", "missing required field"),
        case("empty fault", route_with("fault: {}"), "spec.http[0].fault", "must set delay or abort"),
        case("mirror percentage above 100", route_with("mirror: {host: shadow}\nmirrorPercentage: {value: 101}"),
            "spec.http[0].mirrorPercentage.value", "percentage 101 is outside 0–100"),
        case("legacy mirror_percent above 100", route_with("mirror: {host: shadow}\nmirror_percent: 200"),
            "spec.http[0].mirrorPercent", "percentage 200 is outside 0–100"),
        case("mirror without host", route_with("mirror: {subset: v1}"), "spec.http[0].mirror.host", "missing required field"),
        case("CR/LF in a header value", route_with("headers:\n  request:\n    set: {x-a: \"ok\\r\\nx-evil: 1\"}"),
            "spec.http[0].headers.request.set.x-a", "contains CR or LF"),
        case("control character in a header value", route_with("headers:\n  response:\n    add: {x-a: \"a\\u0001b\"}"),
            "spec.http[0].headers.response.add.x-a", "contains an invalid character"),
        case("invalid header name to set", route_with("headers:\n  request:\n    set: {\"x:a\": b}"),
            "spec.http[0].headers.request.set.x:a", "invalid header name \"x:a\""),
        case("invalid header name to remove", route_with("headers:\n  request:\n    remove: [\"bad name\"]"),
            "spec.http[0].headers.request.remove[0]", "invalid header name \"bad name\""),
        case("CR/LF in a destination header", vs("hosts: [svc]\nhttp:\n- route:\n  - destination: {host: svc}\n    headers:\n      request:\n        add: {x-a: \"a\\nb\"}"),
            "spec.http[0].route[0].headers.request.add.x-a", "contains CR or LF"),
        case("CR/LF in rewrite authority", route_with("rewrite: {authority: \"a\\r\\nb\"}"),
            "spec.http[0].rewrite.authority", "contains CR or LF"),
        case("missing hosts", vs("http:\n- route:\n  - destination: {host: svc}"), "spec.hosts", "missing required field"),
        case("empty hosts", vs("hosts: []\nhttp:\n- route:\n  - destination: {host: svc}"), "spec.hosts", "missing required field"),
        case("missing destination host", vs("hosts: [svc]\nhttp:\n- route:\n  - destination: {subset: v1}"),
            "spec.http[0].route[0].destination.host", "missing required field"),
        case("missing destination", vs("hosts: [svc]\nhttp:\n- route:\n  - weight: 100"),
            "spec.http[0].route[0].destination", "missing required field"),
        case("route without destinations", vs("hosts: [svc]\nhttp:\n- timeout: 1s"), "spec.http[0].route", "missing required field"),
        case("destination port out of range", vs("hosts: [svc]\nhttp:\n- route:\n  - destination: {host: svc, port: {number: 0}}"),
            "spec.http[0].route[0].destination.port.number", "port 0 is outside 1–65535"),
        case("wrong type", vs("hosts: [svc]\nhttp:\n- route:\n  - destination: {host: svc}\n    weight: ten"),
            "spec.http[0].route[0].weight", "invalid type: string \"ten\""),
        case("spec missing", "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: bad, namespace: shop}\n".into(),
            "spec", "missing required field"),
        case("unsupported version", "apiVersion: networking.istio.io/v2\nkind: VirtualService\nmetadata: {name: bad, namespace: shop}\nspec: {}\n".into(),
            "apiVersion", "unsupported version \"networking.istio.io/v2\""),
        // DestinationRule
        case("duplicate subset names", dr("host: svc\nsubsets:\n- name: v1\n  labels: {version: v1}\n- name: v1\n  labels: {version: v2}"),
            "spec.subsets[1].name", "duplicate subset name \"v1\" (first at spec.subsets[0])"),
        case("subset without name", dr("host: svc\nsubsets:\n- labels: {version: v1}"), "spec.subsets[0].name", "missing required field"),
        case("missing rule host", dr("subsets:\n- name: v1"), "spec.host", "missing required field"),
        case("unknown load balancer", dr("host: svc\ntrafficPolicy:\n  loadBalancer: {simple: FASTEST}"),
            "spec.trafficPolicy.loadBalancer.simple", "unknown load balancer \"FASTEST\""),
        case("negative pool limit", dr("host: svc\ntrafficPolicy:\n  connectionPool:\n    tcp: {maxConnections: -1}"),
            "spec.trafficPolicy.connectionPool.tcp.maxConnections", "-1 must not be negative"),
        case("zero connect timeout", dr("host: svc\ntrafficPolicy:\n  connectionPool:\n    tcp: {connectTimeout: 0s}"),
            "spec.trafficPolicy.connectionPool.tcp.connectTimeout", "must be at least 1ms"),
        case("bad pool idle timeout", dr("host: svc\ntrafficPolicy:\n  connectionPool:\n    http: {idleTimeout: 1d}"),
            "spec.trafficPolicy.connectionPool.http.idleTimeout", "invalid duration \"1d\""),
        case("bad outlier interval", dr("host: svc\ntrafficPolicy:\n  outlierDetection: {interval: 1 minute}"),
            "spec.trafficPolicy.outlierDetection.interval", "invalid duration"),
        case("negative ejection time", dr("host: svc\ntrafficPolicy:\n  outlierDetection: {baseEjectionTime: -30s}"),
            "spec.trafficPolicy.outlierDetection.baseEjectionTime", "must not be negative"),
        case("max ejection above 100", dr("host: svc\ntrafficPolicy:\n  outlierDetection: {maxEjectionPercent: 150}"),
            "spec.trafficPolicy.outlierDetection.maxEjectionPercent", "percentage 150 is outside 0–100"),
        case("negative consecutive errors", dr("host: svc\ntrafficPolicy:\n  outlierDetection: {consecutive5xxErrors: -3}"),
            "spec.trafficPolicy.outlierDetection.consecutive5xxErrors", "-3 must not be negative"),
        case("error in a subset policy", dr("host: svc\nsubsets:\n- name: v1\n  trafficPolicy:\n    loadBalancer: {simple: round_robin}"),
            "spec.subsets[0].trafficPolicy.loadBalancer.simple", "unknown load balancer \"round_robin\""),
        // Gateway
        case("gateway without servers", gw("selector: {istio: ingressgateway}"), "spec.servers", "missing required field"),
        case("gateway port out of range", gw("servers:\n- port: {number: 0, name: http, protocol: HTTP}\n  hosts: [\"*\"]"),
            "spec.servers[0].port.number", "port 0 is outside 1–65535"),
        case("gateway unknown protocol", gw("servers:\n- port: {number: 80, name: http, protocol: GOPHER}\n  hosts: [\"*\"]"),
            "spec.servers[0].port.protocol", "unknown protocol \"GOPHER\""),
        case("gateway server without hosts", gw("servers:\n- port: {number: 80, name: http, protocol: HTTP}"),
            "spec.servers[0].hosts", "missing required field"),
        case("gateway host with two slashes", gw("servers:\n- port: {number: 80, name: http, protocol: HTTP}\n  hosts: [\"*\", \"a/b/c\"]"),
            "spec.servers[0].hosts[1]", "\"a/b/c\" is not [namespace/]host"),
        case("gateway host without a name", gw("servers:\n- port: {number: 80, name: http, protocol: HTTP}\n  hosts: [\"shop/\"]"),
            "spec.servers[0].hosts[0]", "is not [namespace/]host"),
        case("gateway host with an inner wildcard", gw("servers:\n- port: {number: 80, name: http, protocol: HTTP}\n  hosts: [\"a.*.com\"]"),
            "spec.servers[0].hosts[0]", "a wildcard is allowed only at the start"),
        case("gateway host with a wildcard namespace part", gw("servers:\n- port: {number: 80, name: http, protocol: HTTP}\n  hosts: [\"sh*/a.com\"]"),
            "spec.servers[0].hosts[0]", "the namespace is a name"),
    ]
}

#[test]
fn every_error_names_file_object_field_and_reason() {
    for c in error_cases() {
        let loaded = load_str("bad.yml", &c.yaml);
        let found = loaded.errors().any(|d| {
            d.file == "bad.yml"
                && d.object == c.object
                && d.field == c.field
                && d.reason.contains(c.reason)
        });
        assert!(
            found,
            "{}: want error {}: {}: {}\ngot:{}\nyaml:\n{}",
            c.name,
            c.object,
            c.field,
            c.reason,
            describe(&loaded),
            c.yaml
        );
        assert!(
            loaded.config.virtual_services.is_empty(),
            "{}: object with errors kept",
            c.name
        );
        assert!(
            loaded.config.destination_rules.is_empty(),
            "{}: object with errors kept",
            c.name
        );
        assert!(
            loaded.config.gateways.is_empty(),
            "{}: object with errors kept",
            c.name
        );
    }
}

#[test]
fn all_errors_are_reported_not_only_the_first() {
    let yaml = vs("http:\n- match:\n  - uri: {regex: \"(\"}\n  timeout: later\n  route:\n  - destination: {host: a}\n    weight: 80\n  - destination: {host: b, subset: v1}\n    weight: 10\n  retries: {attempts: -2}");
    let loaded = load_str("bad.yml", &yaml);
    let fields: Vec<_> = loaded.errors().map(|d| d.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.hosts",
            "spec.http[0].match[0].uri",
            "spec.http[0].route",
            "spec.http[0].timeout",
            "spec.http[0].retries.attempts",
        ],
        "{}",
        describe(&loaded)
    );
}

#[test]
fn errors_display_as_file_object_field_reason() {
    let loaded = load_str(
        "deploy/examples/x.yml",
        "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: service-c}\n\
         spec:\n  hosts: [service-c]\n  http:\n  - route:\n    - destination: {host: service-c}\n      weight: 80\n    \
         - destination: {host: service-c}\n      weight: 10\n",
    );
    let lines: Vec<String> = loaded.errors().map(|d| d.to_string()).collect();
    assert_eq!(
        lines,
        ["deploy/examples/x.yml: VirtualService default/service-c: spec.http[0].route: weights sum to 90, must be 100"]
    );
}

#[test]
fn yaml_syntax_errors_and_bad_documents_are_errors() {
    let loaded = load_str("broken.yml", "kind: [unclosed\n");
    let error = loaded.errors().next().expect("an error");
    assert_eq!(
        (error.file.as_str(), error.object.as_str()),
        ("broken.yml", "")
    );
    assert!(error.reason.starts_with("invalid YAML"), "{error}");

    let loaded = load_str("scalar.yml", "just a string\n");
    assert_eq!(
        loaded.errors().next().map(|d| d.object.as_str()),
        Some("document 1")
    );

    let loaded = load_str("nokind.yml", "apiVersion: v1\nmetadata: {name: x}\n");
    let error = loaded.errors().next().expect("an error");
    assert_eq!(
        (error.object.as_str(), error.field.as_str()),
        ("document 1", "kind")
    );

    let loaded = load_str(
        "noname.yml",
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {}\nspec: {}\n",
    );
    let error = loaded.errors().next().expect("an error");
    assert_eq!(
        (error.object.as_str(), error.field.as_str()),
        ("Gateway (document 1)", "metadata.name")
    );

    let loaded = load_str("broken.json", "{\"kind\": ");
    assert!(loaded
        .errors()
        .next()
        .is_some_and(|e| e.reason.starts_with("invalid JSON")));
}

// ---------------------------------------------------------------- warnings

#[test]
fn unknown_and_unsupported_fields_only_warn() {
    let cases: &[(&str, String, &str, &str)] = &[
        ("unknown route field", route_with("retrys: {attempts: 3}"), "spec.http[0].retrys", "unknown field, ignored"),
        ("unknown nested field", route_with("retries: {attempts: 3, tries: 4}"), "spec.http[0].retries.tries", "unknown field, ignored"),
        ("unknown top-level field", format!("{}extra: 1\n", route_with("")), "extra", "unknown field, ignored"),
        ("tcp routes", vs("hosts: [svc]\ntcp:\n- route:\n  - destination: {host: svc}\nhttp:\n- route:\n  - destination: {host: svc}"), "spec.tcp", UNSUPPORTED_REASON),
        ("tls routes", vs("hosts: [svc]\ntls: []\nhttp:\n- route:\n  - destination: {host: svc}"), "spec.tls", UNSUPPORTED_REASON),
        ("sourceLabels", route_with("match:\n- sourceLabels: {app: a}"), "spec.http[0].match[0].sourceLabels", UNSUPPORTED_REASON),
        ("redirect beside a route", route_with("redirect: {uri: /x}"), "spec.http[0].redirect", UNSUPPORTED_REASON),
        ("fault without percentage", route_with("fault:\n  delay: {fixedDelay: 1s}"), "spec.http[0].fault.delay.percentage", "this fault applies to no request"),
        ("rule tls", dr("host: svc\ntrafficPolicy:\n  tls: {mode: ISTIO_MUTUAL}"), "spec.trafficPolicy.tls", UNSUPPORTED_REASON),
        ("portLevelSettings", dr("host: svc\ntrafficPolicy:\n  portLevelSettings: []"), "spec.trafficPolicy.portLevelSettings", UNSUPPORTED_REASON),
        ("consistentHash", dr("host: svc\ntrafficPolicy:\n  loadBalancer:\n    consistentHash: {httpHeaderName: x-user}"), "spec.trafficPolicy.loadBalancer.consistentHash", UNSUPPORTED_REASON),
        ("gateway tls", gw("servers:\n- port: {number: 443, name: https, protocol: HTTPS}\n  hosts: [\"*\"]\n  tls: {mode: SIMPLE}"), "spec.servers[0].tls", UNSUPPORTED_REASON),
        ("unknown field in a gateway", gw("servers:\n- port: {number: 80, name: http, protocol: http, extra: 1}\n  hosts: [\"*\"]"), "spec.servers[0].port.extra", "unknown field, ignored"),
    ];
    for (name, yaml, field, reason) in cases {
        let loaded = load_str("warn.yml", yaml);
        assert!(loaded.is_ok(), "{name}:{}", describe(&loaded));
        let warnings: Vec<_> = loaded.warnings().collect();
        assert_eq!(warnings.len(), 1, "{name}:{}", describe(&loaded));
        let w = warnings[0];
        assert_eq!(
            (w.file.as_str(), w.field.as_str()),
            ("warn.yml", *field),
            "{name}"
        );
        assert!(w.object.ends_with(" shop/bad"), "{name}: {}", w.object);
        assert!(w.reason.contains(reason), "{name}: {}", w.reason);
    }
}

const UNSUPPORTED_REASON: &str = "not supported by this mesh, ignored";

#[test]
fn a_route_with_only_a_redirect_is_left_out_with_a_warning() {
    let loaded = load_str(
        "warn.yml",
        &vs("hosts: [svc]\nhttp:\n- redirect: {uri: /new}\n- route:\n  - destination: {host: svc}"),
    );
    assert!(loaded.is_ok(), "{}", describe(&loaded));
    let warning = loaded.warnings().next().expect("warning");
    assert_eq!(warning.field, "spec.http[0].redirect");
    assert!(warning.reason.contains("this http route is ignored"));
    assert_eq!(loaded.config.virtual_services[0].http.len(), 1);
}

#[test]
fn gateway_hosts_load_in_every_istio_form() {
    let hosts = r#"["*", "a.example.com", "*.example.com", "*/a.example.com", "./*", "shop/*.example.com", "*foo.com"]"#;
    let loaded = load_str(
        "gw.yml",
        &gw(&format!(
            "servers:\n- port: {{number: 80, name: http, protocol: HTTP}}\n  hosts: {hosts}"
        )),
    );
    assert!(loaded.diagnostics.is_empty(), "{}", describe(&loaded));
    assert_eq!(loaded.config.gateways[0].servers[0].hosts.len(), 7);
}

/// A policy kind of Istio's that the mesh does not enforce is kept, named in one warning (file and
/// object, no field) and reported as ignored; the load stays good. Other kinds stay silent.
#[test]
fn istio_kinds_not_implemented_warn_and_are_ignored() {
    let kinds = [
        ("security.istio.io/v1beta1", "RequestAuthentication"),
        ("networking.istio.io/v1", "ServiceEntry"),
        ("networking.istio.io/v1beta1", "Sidecar"),
        ("networking.istio.io/v1alpha3", "EnvoyFilter"),
        ("networking.istio.io/v1", "WorkloadEntry"),
        ("networking.istio.io/v1", "WorkloadGroup"),
        ("networking.istio.io/v1beta1", "ProxyConfig"),
        ("telemetry.istio.io/v1", "Telemetry"),
        ("extensions.istio.io/v1alpha1", "WasmPlugin"),
        // A kind Istio may add later is not enforced either.
        ("security.istio.io/v2", "FuturePolicy"),
    ];
    let mut text = String::new();
    for (api_version, kind) in kinds {
        text.push_str(&format!(
            "---\napiVersion: {api_version}\nkind: {kind}\nmetadata: {{name: p, namespace: shop}}\n\
             spec: {{anything: [1]}}\n"
        ));
    }
    text.push_str("---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: b}\n");
    text.push_str(
        "---\napiVersion: example.com/v1\nkind: AuthorizationPolicy\nmetadata: {name: x}\n",
    );
    let loaded = load_str("policies.yml", &text);
    assert!(loaded.is_ok(), "{}", describe(&loaded));
    let warnings: Vec<String> = loaded.warnings().map(ToString::to_string).collect();
    let expected: Vec<String> = kinds
        .iter()
        .map(|(_, kind)| {
            format!(
                "policies.yml: {kind} shop/p: kind {kind} is not implemented by this mesh: \
                 not enforced"
            )
        })
        .collect();
    assert_eq!(warnings, expected);
    let ignored: Vec<(String, String)> = loaded
        .objects
        .values()
        .filter_map(|o| Some((o.key.to_string(), o.ignored()?)))
        .collect();
    assert_eq!(ignored.len(), kinds.len(), "{ignored:?}");
    let policy = ObjectKey::new("RequestAuthentication", Some("shop"), "p");
    let sourced = &loaded.objects[&policy];
    assert_eq!(
        sourced.ignored().as_deref(),
        Some("kind RequestAuthentication is not implemented by this mesh: not enforced")
    );
    assert_eq!(sourced.manifest()["spec"]["anything"][0], 1, "kept as read");
    for quiet in [
        ObjectKey::new("ConfigMap", None, "c"),
        // Not Istio's: a kind of its own.
        ObjectKey::new("AuthorizationPolicy.example.com", None, "x"),
    ] {
        assert_eq!(loaded.objects[&quiet].ignored(), None, "{quiet}");
    }
    assert_eq!(loaded.other_objects().count(), kinds.len() + 2);
}

/// Kinds of other API groups keep to themselves: a Gateway API `Gateway` does not replace
/// Istio's of the same name (the ingress would be lost), nor is a Knative `Service` read as a
/// Kubernetes Service.
#[test]
fn a_kind_of_another_group_is_its_own_kind() {
    let loaded = load_str(
        "objects.yml",
        "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: public, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ['*']
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: public, namespace: istio-system}
spec:
  gatewayClassName: istio
  listeners: [{name: http, port: 80, protocol: HTTP}]
---
apiVersion: serving.knative.dev/v1
kind: Service
metadata: {name: hello}
spec:
  template: {spec: {containers: [{image: hello}]}}
",
    );
    assert!(loaded.is_ok(), "{:?}", loaded.diagnostics);
    assert_eq!(loaded.diagnostics, [], "no definition replaced another");
    let gateways: Vec<String> = loaded
        .config
        .gateways
        .iter()
        .map(|g| format!("{}/{} {:?}", g.id.namespace, g.id.name, g.selector))
        .collect();
    assert_eq!(
        gateways,
        [
            "istio-system/public {\"istio\": \"ingressgateway\"}",
            "istio-system/public {}",
        ],
        "both Gateways are in force"
    );
    let keys: Vec<String> = loaded.objects.keys().map(ToString::to_string).collect();
    assert_eq!(
        keys,
        [
            "Gateway istio-system/public",
            "Gateway.gateway.networking.k8s.io istio-system/public",
            "Service.serving.knative.dev default/hello",
        ]
    );
}

// ---------------------------------------------------------------- cross-object rules

/// The warnings of `loaded` as `field|reason`.
fn warning_lines(loaded: &Loaded) -> Vec<String> {
    loaded
        .warnings()
        .map(|d| format!("{}|{}", d.field, d.reason))
        .collect()
}

/// A subset no DestinationRule defines (yet) is looked for across sources and is a warning, as
/// `istioctl analyze` reports it: the rule may well arrive later. The route stays in the config.
#[test]
fn subsets_not_defined_are_warnings_looked_up_across_sources() {
    let rules = example("destination-rules.yml");
    let canary = vs("hosts: [service-c]\nhttp:\n- route:\n  - destination: {host: service-c.default.svc.cluster.local, subset: version-v1}\n    weight: 90\n  - destination: {host: service-c, subset: version-v3}\n    weight: 10");
    // The rule lives in namespace default and the VirtualService in shop, so the short name
    // `service-c` in shop is another service; the fully qualified one is the rule's.
    let loaded = load_sources(&[
        (rules.0.as_str(), rules.1.as_str()),
        ("vs.yml", canary.as_str()),
    ]);
    assert!(loaded.is_ok(), "{}", describe(&loaded));
    assert_eq!(loaded.config.virtual_services.len(), 1);
    assert_eq!(
        warning_lines(&loaded),
        [
            "spec.http[0].route[1].destination.subset|subset \"version-v3\" is not defined (yet): \
          no DestinationRule for host service-c; requests routed to it are answered 503 NR until \
          a DestinationRule defines it"
        ]
    );

    let same_namespace = canary.replace("namespace: shop", "namespace: default");
    let loaded = load_sources(&[
        (rules.0.as_str(), rules.1.as_str()),
        ("vs.yml", same_namespace.as_str()),
    ]);
    let warning = loaded.warnings().next().expect("a subset not defined");
    assert_eq!(warning.file, "vs.yml");
    assert_eq!(warning.object, "VirtualService default/bad");
    assert!(
        warning.reason.starts_with(
            "subset \"version-v3\" is not defined (yet): the DestinationRule for host service-c \
             defines version-v1, version-v2;"
        ),
        "{warning}"
    );
    assert_eq!(loaded.diagnostics.len(), 1, "{}", describe(&loaded));

    // Mirrors are looked up too.
    let mirror = route_with("mirror: {host: svc, subset: shadow}");
    let loaded = load_str("m.yml", &mirror);
    assert!(loaded.is_ok(), "{}", describe(&loaded));
    assert_eq!(
        loaded.warnings().next().map(|d| d.field.as_str()),
        Some("spec.http[0].mirror.subset")
    );
}

/// `mesh-agent validate -f` of the tutorial's canary file alone: the route is valid, its
/// subsets come from a file not given, so a warning per subset and no error.
#[test]
fn the_tutorials_canary_alone_is_valid_with_a_warning_per_subset() {
    let loaded = load_examples(&["canary/2-vs-v1_and_v2_90_10.yml"]);
    assert!(loaded.is_ok(), "{}", describe(&loaded));
    let fields: Vec<&str> = loaded.warnings().map(|d| d.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.http[0].route[0].destination.subset",
            "spec.http[0].route[1].destination.subset"
        ]
    );
    let with_rules = load_examples(&["canary/2-vs-v1_and_v2_90_10.yml", "destination-rules.yml"]);
    assert!(
        with_rules.diagnostics.is_empty(),
        "{}",
        describe(&with_rules)
    );
}

#[test]
fn a_rejected_rule_does_not_cause_subset_warnings() {
    let text = format!(
        "{}---\n{}",
        dr("host: svc\nsubsets:\n- name: v1\n  trafficPolicy:\n    loadBalancer: {simple: NOPE}"),
        vs("hosts: [svc]\nhttp:\n- route:\n  - destination: {host: svc, subset: v1}")
    );
    let loaded = load_str("both.yml", &text);
    let fields: Vec<_> = loaded
        .diagnostics
        .iter()
        .map(|d| d.field.as_str())
        .collect();
    assert_eq!(
        fields,
        ["spec.subsets[0].trafficPolicy.loadBalancer.simple"]
    );
}

/// Which hosts are services is looked up only when the caller knows them (the agent's store);
/// a destination to one that is not is a warning then.
#[test]
fn hosts_that_are_no_service_are_warnings_when_services_are_known() {
    let text = vs("hosts: [svc]\nhttp:\n- route:\n  - destination: {host: svc}\n    weight: 50\n  - destination: {host: other.elsewhere}\n    weight: 50");
    let loaded = load_str("vs.yml", &text);
    let objects: Vec<&Sourced> = loaded.objects.values().map(|o| &**o).collect();
    let services: std::collections::BTreeSet<String> =
        ["svc.shop.svc.cluster.local".to_owned()].into();
    let warnings = check_references(&objects, &[], Some(&services));
    let found: Vec<(&str, &str)> = warnings
        .iter()
        .map(|d| (d.field.as_str(), d.reason.as_str()))
        .collect();
    assert_eq!(
        found,
        [(
            "spec.http[0].route[1].destination.host",
            "host other.elsewhere is no known service (yet): requests routed to it are answered \
             503 NR until a Service of that name exists"
        )]
    );
    assert_eq!(check_references(&objects, &[], None), []);
}

// ---------------------------------------------------------------- one object at a time

/// Each document of a text is read by itself: the valid ones are objects, each invalid one a
/// rejection with its identity (when readable) and every diagnostic, so it can be left out
/// alone.
#[test]
fn each_object_of_a_text_is_valid_or_rejected_by_itself() {
    let text = format!(
        "{}---\n{}---\n{}---\napiVersion: v1\nkind: Service\nmetadata: {{namespace: shop}}\n",
        route_with("timeout: 2s"),
        route_with("timeout: soon").replace("name: bad", "name: worse"),
        dr("host: svc\nsubsets:\n- name: v1\n  labels: {version: v1}")
    );
    let (objects, rejected) = read_each("mixed.yml", &text);
    let keys: Vec<String> = objects.iter().map(|o| o.key.to_string()).collect();
    assert_eq!(
        keys,
        ["VirtualService shop/bad", "DestinationRule shop/bad"]
    );
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    let worse = &rejected[0];
    assert_eq!(
        worse.key.as_ref().map(ToString::to_string).as_deref(),
        Some("VirtualService shop/worse")
    );
    assert_eq!(&*worse.origin, "mixed.yml");
    assert_eq!(worse.counted_kind(), "VirtualService");
    let error = worse.errors().next().expect("an error");
    assert_eq!(
        (
            error.file.as_str(),
            error.object.as_str(),
            error.field.as_str()
        ),
        (
            "mixed.yml",
            "VirtualService shop/worse",
            "spec.http[0].timeout"
        )
    );
    // No name: no identity, counted as `unknown`, told apart by its place in the file.
    let nameless = &rejected[1];
    assert_eq!(nameless.key, None);
    assert_eq!(nameless.counted_kind(), "unknown");
    assert_eq!(
        nameless.id(),
        ("mixed.yml".into(), "Service (document 4)".to_owned())
    );

    // A text that does not parse is one rejection without identity.
    let (objects, rejected) = read_each("broken.yml", "kind: [unclosed");
    assert!(objects.is_empty());
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].key, None);
    assert!(rejected[0].diagnostics[0]
        .reason
        .starts_with("invalid YAML"));

    // A Kubernetes object of the wrong shape, by its kind.
    let (_, rejected) = read_each(
        "cm.yml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: 3}\n",
    );
    assert_eq!(rejected[0].counted_kind(), "Pod");
}

#[test]
fn a_later_definition_replaces_an_earlier_one_with_a_warning() {
    let loaded = load_examples(&[
        "canary/1-vs-v1.yml",
        "canary/4-vs-v2.yml",
        "destination-rules.yml",
    ]);
    assert!(loaded.is_ok(), "{}", describe(&loaded));
    assert_eq!(loaded.config.virtual_services.len(), 1);
    let route = &loaded.config.virtual_services[0].http[0].route[0];
    assert_eq!(route.destination.subset.as_deref(), Some("version-v2"));
    let warning = loaded.warnings().next().expect("warning");
    assert_eq!(warning.file, "canary/4-vs-v2.yml");
    assert_eq!(
        warning.reason,
        "replaces the definition in canary/1-vs-v1.yml; only the last one is used"
    );
}

// ---------------------------------------------------------------- input forms

#[test]
fn all_three_api_versions_are_read() {
    for version in ["v1alpha3", "v1beta1", "v1"] {
        let (_, text) = example("circuit-breaker/3-vs-retry.yml");
        let text = text.replace("v1beta1", version);
        let loaded = load_str("v.yml", &text);
        assert!(
            loaded.diagnostics.is_empty(),
            "{version}:{}",
            describe(&loaded)
        );
        assert_eq!(loaded.config.virtual_services.len(), 1, "{version}");
    }
}

#[test]
fn json_multi_document_list_and_other_kinds() {
    let json = r#"{"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "r", "namespace": "shop"},
        "spec": {"host": "svc", "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}}}
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}"#;
    let loaded = load_str("objects.json", json);
    assert!(loaded.diagnostics.is_empty(), "{}", describe(&loaded));
    assert_eq!(
        loaded.config.destination_rules[0]
            .traffic_policy
            .load_balancer,
        Some(LoadBalancer::Random)
    );
    let others: Vec<_> = loaded.other_objects().collect();
    assert_eq!(&*others[0].key.kind, "Namespace");
    assert_eq!(&*others[0].origin, "objects.json");

    let yaml = "\
apiVersion: v1
kind: Service
metadata: {name: svc}
spec: {ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: svc-abc}
addressType: IPv4
endpoints: []
---
apiVersion: v1
kind: List
items:
- apiVersion: networking.istio.io/v1alpha3
  kind: Gateway
  metadata: {name: gw}
  spec:
    servers:
    - port: {number: 80, name: http, protocol: HTTP}
      hosts: ['*']
- apiVersion: v1
  kind: Pod
  metadata: {name: p, labels: {app: svc}}
---
---
";
    let loaded = load_str("many.yaml", yaml);
    assert!(loaded.diagnostics.is_empty(), "{}", describe(&loaded));
    let mut kinds: Vec<_> = loaded.other_objects().map(|o| &*o.key.kind).collect();
    kinds.sort();
    assert_eq!(kinds, ["EndpointSlice", "Pod", "Service"]);
    assert_eq!(loaded.config.gateways[0].id.name, "gw");
    assert_eq!(loaded.config.gateways[0].id.namespace, "default");
}

#[test]
fn metadata_and_status_are_not_unknown_fields() {
    let text = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: g\n  uid: 1\n  \
                labels: {a: b}\n  annotations: {x: y}\n  resourceVersion: \"7\"\nspec:\n  servers:\n  \
                - port: {number: 80, name: http, protocol: HTTP}\n    hosts: ['*']\nstatus: {}\n";
    let loaded = load_str("g.yml", text);
    assert!(loaded.diagnostics.is_empty(), "{}", describe(&loaded));
}

// ---------------------------------------------------------------- files and the CLI helper

#[test]
fn directories_are_read_recursively_in_order_skipping_hidden_entries() {
    let dir = std::env::temp_dir().join(format!("mesh-config-test-{}", std::process::id()));
    let nested = dir.join("b");
    let hidden = dir.join("..data");
    std::fs::create_dir_all(&nested).expect("temp dir");
    std::fs::create_dir_all(&hidden).expect("temp dir");
    let (_, rules) = example("destination-rules.yml");
    let (_, canary) = example("canary/1-vs-v1.yml");
    std::fs::write(dir.join("a.yaml"), &rules).expect("write");
    std::fs::write(nested.join("vs.yml"), &canary).expect("write");
    std::fs::write(hidden.join("vs.yml"), &canary).expect("write");
    std::fs::write(dir.join("notes.txt"), "not config").expect("write");

    let loaded = load_path(&dir);
    let names: Vec<_> = loaded
        .files
        .iter()
        .map(|f| {
            Path::new(f)
                .strip_prefix(&dir)
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(names, ["a.yaml", "b/vs.yml"]);
    assert!(loaded.diagnostics.is_empty(), "{}", describe(&loaded));

    let mut out = Vec::new();
    let ok = run_validate(std::slice::from_ref(&dir), &mut out).expect("write to a Vec");
    assert!(ok);
    let out = String::from_utf8(out).expect("utf-8");
    assert_eq!(
        out,
        "2 file(s): 1 VirtualService, 0 HTTPRoute, 0 GRPCRoute, 1 DestinationRule, 0 Gateway, 0 AuthorizationPolicy, 0 PeerAuthentication, 0 other object(s); 0 error(s), 0 warning(s)\n"
    );

    std::fs::write(
        nested.join("vs.yml"),
        canary.replace("weight: 100", "weight: 90"),
    )
    .expect("write");
    let mut out = Vec::new();
    let ok =
        run_validate(&[dir.clone(), dir.join("missing.yml")], &mut out).expect("write to a Vec");
    assert!(!ok);
    let out = String::from_utf8(out).expect("utf-8");
    let lines: Vec<_> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].ends_with("weights sum to 90, must be 100"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("error: ") && lines[1].contains("missing.yml: cannot read"),
        "{out}"
    );
    assert!(lines[2].ends_with("2 error(s), 0 warning(s)"), "{out}");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn an_empty_directory_warns() {
    let dir = std::env::temp_dir().join(format!("mesh-config-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let loaded = load_path(&dir);
    assert!(loaded.is_ok());
    assert_eq!(loaded.warnings().count(), 1);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn defaults_follow_istio_and_envoy() {
    let loaded = load_str(
        "d.yml",
        &dr("host: svc\ntrafficPolicy:\n  connectionPool:\n    tcp: {maxConnections: 0}\n    http: {idleTimeout: 0s}\n  outlierDetection: {}"),
    );
    assert!(loaded.diagnostics.is_empty(), "{}", describe(&loaded));
    let policy = &loaded.config.destination_rules[0].traffic_policy;
    let pool = policy.connection_pool.as_ref().expect("pool");
    assert_eq!(
        pool.tcp.max_connections, None,
        "0 means unlimited, as in Istio"
    );
    assert_eq!(
        pool.http.idle_timeout, None,
        "0s turns the idle timeout off"
    );
    assert_eq!(policy.outlier_detection, Some(OutlierDetection::default()));
    assert_eq!(
        policy.load_balancer, None,
        "absent: the engine applies LEAST_REQUEST"
    );

    let loaded = load_str("r.yml", &route_with("timeout: 0s\nretries: {attempts: 3}"));
    let route = &loaded.config.virtual_services[0].http[0];
    assert_eq!(route.timeout, None, "0s disables the route timeout");
    assert_eq!(
        route.retries.as_ref().map(|r| r.retry_on.clone()),
        Some(model::RetryOn::istio_default())
    );
}

#[test]
fn deprecated_outlier_and_balancer_names_mean_what_istio_makes_of_them() {
    let outlier = |spec: &str| {
        let loaded = load_str(
            "d.yml",
            &dr(&format!(
                "host: svc\ntrafficPolicy:\n  outlierDetection: {spec}"
            )),
        );
        assert!(loaded.diagnostics.is_empty(), "{}", describe(&loaded));
        loaded.config.destination_rules[0]
            .traffic_policy
            .outlier_detection
            .clone()
            .expect("outlier detection")
    };
    let old = outlier("{consecutiveErrors: 3}");
    assert_eq!(old.consecutive_gateway_errors, Some(3));
    assert_eq!(old.consecutive_5xx_errors, 0, "plain 5xx counting is off");
    let both = outlier("{consecutiveErrors: 3, consecutive5xxErrors: 2}");
    assert_eq!(both.consecutive_gateway_errors, Some(3));
    assert_eq!(both.consecutive_5xx_errors, 2, "the newer field wins");

    let balancer = |simple: &str| {
        let loaded = load_str(
            "d.yml",
            &dr(&format!(
                "host: svc\ntrafficPolicy:\n  loadBalancer: {{simple: {simple}}}"
            )),
        );
        assert!(loaded.diagnostics.is_empty(), "{}", describe(&loaded));
        loaded.config.destination_rules[0]
            .traffic_policy
            .load_balancer
    };
    assert_eq!(balancer("LEAST_CONN"), Some(LoadBalancer::LeastRequest));
    assert_eq!(balancer("UNSPECIFIED"), None, "the default, LEAST_REQUEST");
    assert_eq!(balancer("PASSTHROUGH"), Some(LoadBalancer::Passthrough));
}
