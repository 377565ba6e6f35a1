//! Engine behaviour tests: config built from model types, an injected clock (instants the
//! tests construct) and a scripted upstream driving the plan API. Nothing sleeps.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use regex::Regex;

use super::registry::{Endpoint, Service, ServicePort};
use super::*;
use crate::config::model::*;
// The rule's destination, not the engine's `Destination` (both are glob-imported).
use crate::config::model::Destination;
use crate::identity::ServiceIdentity;

// ---------------------------------------------------------------- builders

fn host(name: &str) -> Host {
    Host {
        name: name.into(),
        namespace: "default".into(),
    }
}

fn dest(name: &str, subset: Option<&str>) -> Destination {
    Destination {
        host: host(name),
        subset: subset.map(Into::into),
        port: None,
    }
}

fn weighted(destination: Destination, weight: u32) -> RouteDestination {
    RouteDestination {
        destination,
        weight,
        headers: Headers::default(),
    }
}

fn http_route(name: &str, matches: Vec<RequestMatch>, route: Vec<RouteDestination>) -> HttpRoute {
    HttpRoute {
        name: Some(name.into()),
        matches,
        route,
        redirect: None,
        direct_response: None,
        rewrite: None,
        headers: Headers::default(),
        timeout: None,
        retries: None,
        fault: None,
        mirror: None,
    }
}

fn to(name: &str) -> Vec<RouteDestination> {
    vec![weighted(dest(name, None), 100)]
}

fn virtual_service(hosts: &[&str], http: Vec<HttpRoute>) -> VirtualService {
    VirtualService {
        id: ObjectRef {
            namespace: "default".into(),
            name: "vs".into(),
        },
        hosts: hosts.iter().map(|h| host(h)).collect(),
        gateways: vec![],
        http,
        created: None,
        exclusive: Exclusive::No,
    }
}

fn subset(name: &str, version: &str) -> Subset {
    Subset {
        name: name.into(),
        labels: BTreeMap::from([("version".to_owned(), version.to_owned())]),
        traffic_policy: TrafficPolicy::default(),
    }
}

fn destination_rule(name: &str, policy: TrafficPolicy) -> DestinationRule {
    DestinationRule {
        id: ObjectRef {
            namespace: "default".into(),
            name: name.into(),
        },
        host: host(name),
        traffic_policy: policy,
        subsets: vec![subset("version-v1", "v1"), subset("version-v2", "v2")],
    }
}

/// The tutorial's circuit breaker: `consecutive5xxErrors: 1, interval: 2s,
/// baseEjectionTime: 10s, maxEjectionPercent: 100`.
fn tutorial_outlier() -> OutlierDetection {
    OutlierDetection {
        consecutive_5xx_errors: 1,
        interval: Duration::from_secs(2),
        base_ejection_time: Duration::from_secs(10),
        max_ejection_percent: 100,
        ..OutlierDetection::default()
    }
}

fn outlier_policy(outlier: OutlierDetection) -> TrafficPolicy {
    TrafficPolicy {
        outlier_detection: Some(outlier),
        ..TrafficPolicy::default()
    }
}

fn ip(v: u8, i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, v, i))
}

/// `name` on port 80 → 8080 with `v1` endpoints 10.0.1.x and `v2` endpoints 10.0.2.x.
fn service(name: &str, v1: u8, v2: u8) -> Service {
    let endpoint = |v: u8, i: u8| Endpoint {
        ip: ip(v, i),
        labels: BTreeMap::from([("version".to_owned(), format!("v{v}"))]),
        workload: None,
    };
    let endpoints = (1..=v1)
        .map(|i| endpoint(1, i))
        .chain((1..=v2).map(|i| endpoint(2, i)))
        .collect();
    Service {
        identity: Arc::new(ServiceIdentity::new(name, "default")),
        ports: vec![ServicePort {
            port: 80,
            target_port: 8080,
        }],
        endpoints,
    }
}

fn addr(v: u8, i: u8) -> SocketAddr {
    SocketAddr::new(ip(v, i), 8080)
}

fn exact(s: &str) -> StringMatch {
    StringMatch::Exact(s.into())
}

fn prefix(s: &str) -> StringMatch {
    StringMatch::Prefix(s.into())
}

fn regex(s: &str) -> StringMatch {
    // The config parser anchors regexes; test builders do the same.
    StringMatch::Regex(Regex::new(&format!("^(?:{s})$")).unwrap())
}

fn hname(s: &str) -> HeaderName {
    HeaderName::from_bytes(s.as_bytes()).unwrap()
}

struct Fixture {
    engine: Engine,
    t0: Instant,
}

fn fixture(vs: Vec<VirtualService>, dr: Vec<DestinationRule>, services: Vec<Service>) -> Fixture {
    fixture_with(vs, dr, services, EngineSettings::default())
}

fn fixture_with(
    vs: Vec<VirtualService>,
    dr: Vec<DestinationRule>,
    services: Vec<Service>,
    settings: EngineSettings,
) -> Fixture {
    let config = MeshConfig {
        virtual_services: vs.into_iter().map(Arc::new).collect(),
        destination_rules: dr.into_iter().map(Arc::new).collect(),
        gateways: vec![],
        authorization_policies: vec![],
        peer_authentications: vec![],
    };
    let registry = Registry {
        services: services.into_iter().map(Arc::new).collect(),
    };
    let t0 = Instant::now();
    Fixture {
        engine: Engine::new(&config, &registry, settings, t0),
        t0,
    }
}

/// A request as a test writes it.
#[derive(Clone)]
struct Req {
    method: Method,
    uri: Uri,
    authority: String,
    scheme: String,
    headers: HeaderMap,
    port: u16,
    gateway: Option<String>,
    namespace: String,
    replayable: bool,
}

fn get(authority: &str, uri: &str) -> Req {
    Req {
        method: Method::GET,
        uri: uri.parse().unwrap(),
        authority: authority.into(),
        scheme: "http".into(),
        headers: HeaderMap::new(),
        port: 80,
        gateway: None,
        namespace: "default".into(),
        replayable: true,
    }
}

impl Req {
    fn header(mut self, name: &str, value: &str) -> Req {
        self.headers
            .append(hname(name), HeaderValue::from_str(value).unwrap());
        self
    }

    fn info(&self) -> RequestInfo<'_> {
        RequestInfo {
            method: &self.method,
            uri: &self.uri,
            authority: &self.authority,
            scheme: &self.scheme,
            headers: &self.headers,
            port: self.port,
            gateway: self.gateway.as_deref(),
            namespace: &self.namespace,
            replayable: self.replayable,
        }
    }
}

impl Fixture {
    fn at(&self, secs: f64) -> Instant {
        self.t0 + Duration::from_secs_f64(secs)
    }

    fn route(&self, req: &Req) -> Result<RequestPlan, EngineError> {
        self.engine.route(&req.info(), self.t0)
    }

    fn route_name(&self, req: &Req) -> String {
        match self.route(req) {
            Ok(plan) => plan.route_name().to_owned(),
            Err(e) => format!("error: {}", e.flags()),
        }
    }

    /// One request, one try, one outcome at `now`; returns the endpoint tried.
    fn one_try(&self, now: Instant, outcome: Outcome) -> Result<SocketAddr, EngineError> {
        let mut plan = self.engine.route(&get("service-c", "/").info(), now)?;
        let attempt = plan.next_attempt(now)?;
        let endpoint = attempt.endpoint();
        plan.report(attempt, outcome, now);
        Ok(endpoint)
    }

    /// Sends requests at `now` until one reaches `crashed`, which answers 500; the others
    /// answer 200.
    fn fail_on(&self, now: Instant, crashed: SocketAddr) {
        loop {
            let mut plan = self
                .engine
                .route(&get("service-c", "/").info(), now)
                .unwrap();
            let attempt = plan.next_attempt(now).unwrap();
            let hit = attempt.endpoint() == crashed;
            let status = if hit { 500 } else { 200 };
            plan.report(attempt, Outcome::status(status), now);
            if hit {
                return;
            }
        }
    }

    /// Endpoints `n` successful requests at `now` go to.
    fn picks(&self, now: Instant, n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|_| self.one_try(now, Outcome::status(200)).unwrap())
            .collect()
    }
}

/// How a scripted request ended.
#[derive(Debug)]
struct Run {
    result: Result<Verdict, EngineError>,
    tried: Vec<SocketAddr>,
    flags: ResponseFlags,
    ended: Instant,
}

/// Drives one request through the plan API against a scripted upstream that returns an
/// outcome and a latency for (endpoint, try number). A try that would outlast its deadline is
/// reported as `Timeout` at the deadline, as the proxy would.
fn drive(
    engine: &Engine,
    req: &Req,
    start: Instant,
    mut upstream: impl FnMut(SocketAddr, u32) -> (Outcome, Duration),
) -> Run {
    let mut now = start;
    let mut tried = Vec::new();
    let mut plan = match engine.route(&req.info(), now) {
        Ok(plan) => plan,
        Err(e) => {
            return Run {
                result: Err(e),
                tried,
                flags: e.flags(),
                ended: now,
            }
        }
    };
    loop {
        let attempt = match plan.next_attempt(now) {
            Ok(a) => a,
            Err(e) => {
                return Run {
                    result: Err(e),
                    tried,
                    flags: plan.flags(),
                    ended: now,
                }
            }
        };
        tried.push(attempt.endpoint());
        let (mut outcome, latency) = upstream(attempt.endpoint(), attempt.number());
        match attempt.deadline() {
            Some(deadline) if now + latency >= deadline => {
                outcome = Outcome::Timeout;
                now = deadline;
            }
            _ => now += latency,
        }
        match plan.report(attempt, outcome, now) {
            Verdict::RetryAt(at) => {
                assert!(at >= now, "backoff goes forward");
                now = at;
            }
            verdict => {
                return Run {
                    result: Ok(verdict),
                    tried,
                    flags: plan.flags(),
                    ended: now,
                }
            }
        }
    }
}

// ---------------------------------------------------------------- matching

#[test]
fn each_match_kind_selects_or_skips_the_route() {
    let m = |f: fn(&mut RequestMatch)| {
        let mut m = RequestMatch::default();
        f(&mut m);
        m
    };
    let base = || get("service-c", "/api/v1/users?id=7&debug");
    let cases: Vec<(&str, RequestMatch, Req, bool)> = vec![
        (
            "uri exact hit",
            m(|m| m.uri = Some(exact("/api/v1/users"))),
            base(),
            true,
        ),
        (
            "uri exact miss",
            m(|m| m.uri = Some(exact("/api/v1"))),
            base(),
            false,
        ),
        (
            "uri exact is case sensitive",
            m(|m| m.uri = Some(exact("/API/v1/users"))),
            base(),
            false,
        ),
        (
            "uri exact ignoreUriCase",
            m(|m| {
                m.uri = Some(exact("/API/V1/USERS"));
                m.ignore_uri_case = true
            }),
            base(),
            true,
        ),
        (
            "uri prefix hit",
            m(|m| m.uri = Some(prefix("/api/"))),
            base(),
            true,
        ),
        (
            "uri prefix miss",
            m(|m| m.uri = Some(prefix("/web"))),
            base(),
            false,
        ),
        (
            "uri prefix ignoreUriCase",
            m(|m| {
                m.uri = Some(prefix("/API"));
                m.ignore_uri_case = true
            }),
            base(),
            true,
        ),
        (
            "uri regex hit",
            m(|m| m.uri = Some(regex("/api/v[0-9]+/.*"))),
            base(),
            true,
        ),
        (
            "uri regex is anchored",
            m(|m| m.uri = Some(regex("/api"))),
            base(),
            false,
        ),
        (
            "uri ignores the query",
            m(|m| m.uri = Some(exact("/api/v1/users?id=7"))),
            base(),
            false,
        ),
        (
            "method hit",
            m(|m| m.method = Some(exact("GET"))),
            base(),
            true,
        ),
        (
            "method miss",
            m(|m| m.method = Some(exact("POST"))),
            base(),
            false,
        ),
        (
            "authority exact",
            m(|m| m.authority = Some(exact("service-c"))),
            base(),
            true,
        ),
        (
            "authority prefix",
            m(|m| m.authority = Some(prefix("service-"))),
            base(),
            true,
        ),
        (
            "authority miss",
            m(|m| m.authority = Some(exact("service-d"))),
            base(),
            false,
        ),
        (
            "scheme hit",
            m(|m| m.scheme = Some(exact("http"))),
            base(),
            true,
        ),
        (
            "scheme miss",
            m(|m| m.scheme = Some(exact("https"))),
            base(),
            false,
        ),
        (
            "scheme of an h2 request",
            m(|m| m.scheme = Some(exact("https"))),
            Req {
                scheme: "https".into(),
                ..base()
            },
            true,
        ),
        (
            "header exact hit",
            m(|m| m.headers = vec![(hname("end-user"), exact("jason"))]),
            base().header("end-user", "jason"),
            true,
        ),
        (
            "header exact miss",
            m(|m| m.headers = vec![(hname("end-user"), exact("jason"))]),
            base().header("end-user", "json"),
            false,
        ),
        (
            "header absent",
            m(|m| m.headers = vec![(hname("end-user"), exact("jason"))]),
            base(),
            false,
        ),
        (
            "header prefix",
            m(|m| m.headers = vec![(hname("x-canary"), prefix("tr"))]),
            base().header("x-canary", "true"),
            true,
        ),
        (
            "header regex",
            m(|m| m.headers = vec![(hname("x-id"), regex("[0-9]{3}"))]),
            base().header("x-id", "123"),
            true,
        ),
        (
            "header regex anchored",
            m(|m| m.headers = vec![(hname("x-id"), regex("[0-9]{3}"))]),
            base().header("x-id", "1234"),
            false,
        ),
        (
            "all headers must match",
            m(|m| m.headers = vec![(hname("a"), exact("1")), (hname("b"), exact("2"))]),
            base().header("a", "1"),
            false,
        ),
        (
            "withoutHeaders excludes a matching value",
            m(|m| m.without_headers = vec![(hname("x-test"), exact("yes"))]),
            base().header("x-test", "yes"),
            false,
        ),
        (
            "withoutHeaders admits another value",
            m(|m| m.without_headers = vec![(hname("x-test"), exact("yes"))]),
            base().header("x-test", "no"),
            true,
        ),
        (
            "withoutHeaders admits an absent header",
            m(|m| m.without_headers = vec![(hname("x-test"), exact("yes"))]),
            base(),
            true,
        ),
        (
            "queryParams exact",
            m(|m| m.query_params = vec![("id".into(), exact("7"))]),
            base(),
            true,
        ),
        (
            "queryParams regex",
            m(|m| m.query_params = vec![("id".into(), regex("[0-9]+"))]),
            base(),
            true,
        ),
        (
            "queryParams valueless",
            m(|m| m.query_params = vec![("debug".into(), exact(""))]),
            base(),
            true,
        ),
        (
            "queryParams absent",
            m(|m| m.query_params = vec![("page".into(), exact("1"))]),
            base(),
            false,
        ),
        ("port hit", m(|m| m.port = Some(80)), base(), true),
        ("port miss", m(|m| m.port = Some(9090)), base(), false),
        (
            "match gateways: mesh traffic",
            m(|m| m.gateways = vec!["mesh".into()]),
            base(),
            true,
        ),
        (
            "match gateways: gateway only",
            m(|m| m.gateways = vec!["ingress".into()]),
            base(),
            false,
        ),
        (
            "match gateways: through the gateway",
            m(|m| m.gateways = vec!["ingress".into()]),
            Req {
                gateway: Some("default/ingress".into()),
                ..base()
            },
            true,
        ),
    ];
    for (name, request_match, req, want) in cases {
        let route = http_route("r", vec![request_match], to("service-c"));
        let f = fixture(
            vec![virtual_service(&["service-c"], vec![route])],
            vec![],
            vec![service("service-c", 1, 0)],
        );
        let expected = if want { "default/vs/r" } else { "default" };
        assert_eq!(f.route_name(&req), expected, "{name}");
    }
}

#[test]
fn first_match_wins_and_any_match_entry_selects() {
    let uri = |u: &str| RequestMatch {
        uri: Some(prefix(u)),
        ..RequestMatch::default()
    };
    let routes = vec![
        http_route("api", vec![uri("/api")], to("service-c")),
        http_route("api-v1", vec![uri("/api/v1")], to("service-c")),
        http_route("either", vec![uri("/a"), uri("/b")], to("service-c")),
        http_route("catch-all", vec![], to("service-c")),
    ];
    let f = fixture(
        vec![virtual_service(&["service-c"], routes)],
        vec![],
        vec![service("service-c", 1, 0)],
    );
    let cases = [
        ("/api/v1/x", "default/vs/api"), // the earlier, broader route wins
        ("/apis", "default/vs/api"),
        ("/b/1", "default/vs/either"),
        ("/a", "default/vs/either"),
        ("/zzz", "default/vs/catch-all"),
    ];
    for (path, want) in cases {
        assert_eq!(f.route_name(&get("service-c", path)), want, "{path}");
    }
}

#[test]
fn no_match_falls_back_to_all_endpoints_and_unknown_hosts_get_no_route() {
    let only_v2 = http_route(
        "v2-only",
        vec![RequestMatch {
            headers: vec![(hname("x-v2"), exact("1"))],
            ..RequestMatch::default()
        }],
        vec![weighted(dest("service-c", Some("version-v2")), 100)],
    );
    let f = fixture(
        vec![virtual_service(&["service-c"], vec![only_v2])],
        vec![destination_rule("service-c", TrafficPolicy::default())],
        vec![service("service-c", 2, 2), service("service-d", 1, 0)],
    );
    let plan = f.route(&get("service-c", "/")).unwrap();
    assert_eq!(plan.route_name(), "default");
    assert_eq!(
        plan.cluster_name(),
        "outbound|80||service-c.default.svc.cluster.local"
    );
    // The default route uses every endpoint, whatever its version.
    let mut seen = f.picks(f.t0, 40);
    seen.sort();
    seen.dedup();
    assert_eq!(seen, vec![addr(1, 1), addr(1, 2), addr(2, 1), addr(2, 2)]);

    let plan = f.route(&get("service-c", "/").header("x-v2", "1")).unwrap();
    assert_eq!(
        plan.cluster_name(),
        "outbound|80|version-v2|service-c.default.svc.cluster.local"
    );
    // A service without rules routes by default; an unknown host is `NR`.
    assert_eq!(f.route_name(&get("service-d", "/")), "default");
    assert_eq!(f.route_name(&get("service-x", "/")), "error: NR");
    assert_eq!(
        f.engine
            .metrics()
            .no_route
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn authorities_resolve_short_namespaced_and_full_names() {
    let f = fixture(
        vec![virtual_service(
            &["service-c"],
            vec![http_route("r", vec![], to("service-c"))],
        )],
        vec![],
        vec![service("service-c", 1, 0)],
    );
    for authority in [
        "service-c",
        "service-c:80",
        "Service-C.default",
        "service-c.default.svc",
        "service-c.default.svc.cluster.local:80",
    ] {
        assert_eq!(
            f.route_name(&get(authority, "/")),
            "default/vs/r",
            "{authority}"
        );
    }
    // A short name means the service in the client's own namespace.
    let other = Req {
        namespace: "prod".into(),
        ..get("service-c", "/")
    };
    assert_eq!(f.route_name(&other), "error: NR");
    let qualified = Req {
        namespace: "prod".into(),
        ..get("service-c.default", "/")
    };
    assert_eq!(f.route_name(&qualified), "default/vs/r");
}

#[test]
fn virtual_service_gateways_limit_where_it_applies() {
    let mut vs = virtual_service(
        &["service-c"],
        vec![http_route("r", vec![], to("service-c"))],
    );
    vs.gateways = vec!["ingress".into()];
    let f = fixture(vec![vs], vec![], vec![service("service-c", 1, 0)]);
    assert_eq!(f.route_name(&get("service-c", "/")), "default");
    let via_gateway = Req {
        gateway: Some("default/ingress".into()),
        ..get("service-c", "/")
    };
    assert_eq!(f.route_name(&via_gateway), "default/vs/r");
}

#[test]
fn the_ingress_tries_the_gateways_on_its_port_in_order_then_all_of_them() {
    let gateway = |name: &str, port: u16| Gateway {
        id: ObjectRef {
            namespace: "default".into(),
            name: name.into(),
        },
        selector: BTreeMap::new(),
        servers: vec![GatewayServer {
            port,
            protocol: "HTTP".into(),
            port_name: "http".into(),
            hosts: vec!["*".into()],
        }],
    };
    let bound = |gateway: &str, prefix: &str, service: &str| {
        let mut vs = virtual_service(
            &["*"],
            vec![http_route(
                prefix,
                vec![RequestMatch {
                    uri: Some(self::prefix(&format!("/{prefix}"))),
                    ..RequestMatch::default()
                }],
                to(service),
            )],
        );
        vs.id.name = prefix.into();
        vs.gateways = vec![gateway.into()];
        vs
    };
    let config = MeshConfig {
        virtual_services: vec![
            Arc::new(bound("public", "a", "service-a")),
            Arc::new(bound("internal", "b", "service-b")),
        ],
        destination_rules: vec![],
        gateways: vec![
            Arc::new(gateway("public", 80)),
            Arc::new(gateway("internal", 80)),
        ],
        authorization_policies: vec![],
        peer_authentications: vec![],
    };
    let registry = Registry {
        services: vec![
            Arc::new(service("service-a", 1, 0)),
            Arc::new(service("service-b", 1, 0)),
        ],
    };
    let t0 = Instant::now();
    let engine = Engine::new(&config, &registry, EngineSettings::default(), t0);
    let ingress = |port: u16, path: &str| {
        let req = Req {
            port,
            ..get("gateway.example", path)
        };
        engine.route_ingress(&req.info(), t0)
    };
    let plan = ingress(80, "/b").expect("the second gateway routes it");
    assert_eq!(plan.route_name(), "default/b/b");
    let destination = plan.destination();
    let service = destination.service.as_ref().expect("a registry service");
    assert_eq!(service.host, "service-b.default.svc.cluster.local");
    assert_eq!(destination.subset, None);
    assert_eq!(
        &*destination.cluster,
        "outbound|80||service-b.default.svc.cluster.local"
    );
    // A port no gateway names: every gateway is tried.
    assert_eq!(
        ingress(8081, "/a").expect("routes").route_name(),
        "default/a/a"
    );
    assert!(matches!(ingress(80, "/c"), Err(EngineError::NoRoute)));
    // Mesh traffic is not routed by gateway-bound rules.
    assert!(matches!(
        engine.route(&get("gateway.example", "/a").info(), t0),
        Err(EngineError::NoRoute)
    ));
}

// ---------------------------------------------------------------- splits and balancing

/// A destination that does not exist yet — a subset no rule defines, a host that is no
/// service — is 503 `NR` for the requests routed to it (Envoy's answer for a cluster it does
/// not have), never retried; the other destinations of the split are served. The rule or the
/// service arriving in a reload puts it to work.
#[test]
fn a_destination_that_does_not_exist_yet_is_503_nr_until_it_does() {
    let split = http_route(
        "split",
        vec![],
        vec![
            weighted(dest("service-c", Some("version-v1")), 50),
            weighted(dest("service-c", Some("version-v3")), 25),
            weighted(dest("service-d", None), 25),
        ],
    );
    let config = |rules: Vec<DestinationRule>| MeshConfig {
        virtual_services: vec![Arc::new(virtual_service(
            &["service-c"],
            vec![split.clone()],
        ))],
        destination_rules: rules.into_iter().map(Arc::new).collect(),
        gateways: vec![],
        authorization_policies: vec![],
        peer_authentications: vec![],
    };
    let f = fixture(
        vec![virtual_service(&["service-c"], vec![split.clone()])],
        vec![destination_rule("service-c", TrafficPolicy::default())],
        vec![service("service-c", 1, 1)],
    );
    let mut answers = BTreeMap::new();
    for _ in 0..100 {
        let answer = match f.route(&get("service-c", "/")) {
            Ok(plan) => plan.cluster_name().to_owned(),
            Err(error) => {
                assert_eq!(error, EngineError::ClusterNotFound);
                assert!(!error.is_retryable());
                format!("{} {}", error.status(), error.flags())
            }
        };
        *answers.entry(answer).or_insert(0) += 1;
    }
    assert_eq!(
        answers,
        BTreeMap::from([
            ("503 NR".to_owned(), 50),
            (
                "outbound|80|version-v1|service-c.default.svc.cluster.local".to_owned(),
                50
            ),
        ])
    );
    assert_eq!(
        f.engine
            .metrics()
            .no_route
            .load(std::sync::atomic::Ordering::Relaxed),
        50
    );

    // The subset defined and the service known: all three destinations are served.
    let mut rule = destination_rule("service-c", TrafficPolicy::default());
    rule.subsets.push(subset("version-v3", "v2"));
    let registry = Registry {
        services: vec![
            Arc::new(service("service-c", 1, 1)),
            Arc::new(service("service-d", 1, 0)),
        ],
    };
    let reloaded = f.engine.reload(&config(vec![rule]), &registry, f.t0);
    let mut clusters = BTreeMap::new();
    for _ in 0..100 {
        let plan = reloaded
            .route(&get("service-c", "/").info(), f.t0)
            .expect("every destination exists");
        *clusters.entry(plan.cluster_name().to_owned()).or_insert(0) += 1;
    }
    assert_eq!(clusters.len(), 3, "{clusters:?}");
}

fn canary(v1: u32, v2: u32) -> Fixture {
    let route = http_route(
        "canary",
        vec![],
        vec![
            weighted(dest("service-c", Some("version-v1")), v1),
            weighted(dest("service-c", Some("version-v2")), v2),
        ],
    );
    fixture(
        vec![virtual_service(&["service-c"], vec![route])],
        vec![destination_rule("service-c", TrafficPolicy::default())],
        vec![service("service-c", 2, 2)],
    )
}

#[test]
fn canary_split_is_exact_in_every_window_of_100() {
    let f = canary(90, 10);
    let to_v1: Vec<bool> = (0..1_000)
        .map(|_| {
            let plan = f.route(&get("service-c", "/")).unwrap();
            plan.cluster_name().contains("version-v1")
        })
        .collect();
    for window in to_v1.windows(100) {
        assert_eq!(window.iter().filter(|&&v1| v1).count(), 90);
    }
    // And the endpoints really are the subset's.
    let v2: Vec<SocketAddr> = (0..200)
        .filter_map(|_| {
            let mut plan = f.route(&get("service-c", "/")).unwrap();
            let a = plan.next_attempt(f.t0).unwrap();
            let ep = a.endpoint();
            plan.report(a, Outcome::status(200), f.t0);
            plan.cluster_name().contains("version-v2").then_some(ep)
        })
        .collect();
    assert_eq!(v2.len(), 20);
    assert!(v2.iter().all(|a| a.ip() == ip(2, 1) || a.ip() == ip(2, 2)));
}

#[test]
fn round_robin_visits_endpoints_in_turn() {
    let policy = TrafficPolicy {
        load_balancer: Some(LoadBalancer::RoundRobin),
        ..TrafficPolicy::default()
    };
    let f = fixture(
        vec![],
        vec![destination_rule("service-c", policy)],
        vec![service("service-c", 3, 0)],
    );
    let picks = f.picks(f.t0, 300);
    for a in [addr(1, 1), addr(1, 2), addr(1, 3)] {
        assert_eq!(picks.iter().filter(|&&p| p == a).count(), 100);
    }
    assert_ne!(picks[0], picks[1]);
}

#[test]
fn least_request_prefers_idle_endpoints_and_random_covers_all() {
    // LEAST_REQUEST (the default): with one endpoint busy, new tries avoid it whenever the two
    // choices include another.
    let f = fixture(vec![], vec![], vec![service("service-c", 2, 0)]);
    let mut busy_plan = f.route(&get("service-c", "/")).unwrap();
    let busy = busy_plan.next_attempt(f.t0).unwrap();
    let busy_addr = busy.endpoint();
    let picks = f.picks(f.t0, 200);
    let to_busy = picks.iter().filter(|&&p| p == busy_addr).count();
    // Both choices land on the busy one with probability 1/4.
    assert!(to_busy < 80, "{to_busy}");
    busy_plan.report(busy, Outcome::status(200), f.t0);

    let policy = TrafficPolicy {
        load_balancer: Some(LoadBalancer::Random),
        ..TrafficPolicy::default()
    };
    let f = fixture(
        vec![],
        vec![destination_rule("service-c", policy)],
        vec![service("service-c", 4, 0)],
    );
    let picks = f.picks(f.t0, 400);
    for i in 1..=4 {
        let n = picks.iter().filter(|&&p| p == addr(1, i)).count();
        assert!((50..150).contains(&n), "endpoint {i}: {n}");
    }
}

#[test]
fn subset_traffic_policy_overrides_the_hosts() {
    let mut rule = destination_rule(
        "service-c",
        TrafficPolicy {
            load_balancer: Some(LoadBalancer::Random),
            ..TrafficPolicy::default()
        },
    );
    rule.subsets[0].traffic_policy.load_balancer = Some(LoadBalancer::RoundRobin);
    let route = http_route(
        "r",
        vec![],
        vec![weighted(dest("service-c", Some("version-v1")), 100)],
    );
    let f = fixture(
        vec![virtual_service(&["service-c"], vec![route])],
        vec![rule],
        vec![service("service-c", 2, 2)],
    );
    let picks = f.picks(f.t0, 6);
    // Strict alternation is round robin's signature.
    assert!(picks.windows(2).all(|w| w[0] != w[1]), "{picks:?}");
}

// ---------------------------------------------------------------- outlier detection

fn tutorial_breaker(endpoints: u8) -> Fixture {
    fixture(
        vec![],
        vec![destination_rule(
            "service-c",
            outlier_policy(tutorial_outlier()),
        )],
        vec![service("service-c", 0, endpoints)],
    )
}

fn ejected(f: &Fixture) -> Vec<SocketAddr> {
    f.engine.ejected("service-c", 80, None)
}

#[test]
fn one_500_ejects_at_once_and_the_endpoint_is_back_after_10s() {
    let f = tutorial_breaker(2);
    let crashed = addr(2, 1);
    // Fail the crashed endpoint once, at the engine's start (a sweep tick).
    f.fail_on(f.t0, crashed);
    assert_eq!(ejected(&f), vec![crashed]);
    assert!(!f.picks(f.at(0.0), 50).contains(&crashed));
    // Ejected at 0 s for 10 s; sweeps run every 2 s, and the one at 10 s returns it.
    assert!(!f.picks(f.at(9.999), 50).contains(&crashed));
    assert!(f.picks(f.at(10.0), 50).contains(&crashed));
    assert_eq!(ejected(&f), vec![]);
}

#[test]
fn an_ejection_between_sweeps_ends_at_the_next_sweep_after_its_time() {
    let f = tutorial_breaker(2);
    let crashed = addr(2, 1);
    let when = f.at(1.0);
    f.fail_on(when, crashed);
    // Due at 11 s; sweeps at 10 s and 12 s: back at 12 s, at most one interval late.
    assert!(!f.picks(f.at(11.5), 50).contains(&crashed));
    assert!(f.picks(f.at(12.0), 50).contains(&crashed));
}

#[test]
fn a_second_ejection_lasts_twice_as_long() {
    let f = tutorial_breaker(2);
    let crashed = addr(2, 1);
    f.fail_on(f.t0, crashed);
    // Back at 10 s and still crashed: the first request it gets fails and ejects it again
    // before any sweep has seen it healthy, so the multiplier is 2: 20 s.
    let back = f.at(10.0);
    f.fail_on(back, crashed);
    assert_eq!(ejected(&f), vec![crashed]);
    assert!(!f.picks(f.at(29.9), 50).contains(&crashed));
    assert!(f.picks(f.at(30.0), 50).contains(&crashed));
    assert_eq!(
        f.engine
            .metrics()
            .ejections
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[test]
fn healthy_sweeps_shrink_the_multiplier_again() {
    let f = tutorial_breaker(2);
    let crashed = addr(2, 1);
    f.fail_on(f.t0, crashed);
    f.picks(f.at(10.0), 1); // back at the 10 s sweep
    f.picks(f.at(12.0), 1); // healthy at the 12 s sweep: multiplier 1 → 0
    let again = f.at(13.0);
    f.fail_on(again, crashed);
    // 10 s again (not 20 s): due 23 s, returned by the 24 s sweep.
    assert!(!f.picks(f.at(23.9), 50).contains(&crashed));
    assert!(f.picks(f.at(24.0), 50).contains(&crashed));
}

#[test]
fn max_ejection_percent_caps_the_ejected_share() {
    let cases = [
        // (endpoints, maxEjectionPercent, how many get ejected when all fail)
        (4, 10, 0), // Envoy's rule: (0+1)/4 = 25% > 10%, so never
        (4, 25, 1),
        (4, 50, 2),
        (4, 100, 4),
        (10, 10, 1),
    ];
    for (endpoints, max, want) in cases {
        let outlier = OutlierDetection {
            max_ejection_percent: max,
            ..tutorial_outlier()
        };
        let policy = TrafficPolicy {
            outlier_detection: Some(outlier),
            load_balancer: Some(LoadBalancer::RoundRobin),
            ..TrafficPolicy::default()
        };
        let f = fixture(
            vec![],
            vec![destination_rule("service-c", policy)],
            vec![service("service-c", endpoints, 0)],
        );
        for _ in 0..endpoints * 3 {
            f.one_try(f.t0, Outcome::status(500)).unwrap();
        }
        assert_eq!(ejected(&f).len(), want, "{endpoints} endpoints at {max}%");
    }
}

#[test]
fn all_ejected_means_panic_routing_to_all_and_it_is_counted() {
    let f = tutorial_breaker(2);
    f.one_try(f.t0, Outcome::status(500)).unwrap();
    f.one_try(f.t0, Outcome::status(500)).unwrap();
    assert_eq!(ejected(&f).len(), 2);
    let mut picks = f.picks(f.t0, 20);
    picks.sort();
    picks.dedup();
    assert_eq!(picks, vec![addr(2, 1), addr(2, 2)]);
    assert_eq!(
        f.engine
            .metrics()
            .panic_routing
            .load(std::sync::atomic::Ordering::Relaxed),
        20
    );

    // Without panic routing (Istio's effective default), all ejected means `UH`.
    let settings = EngineSettings {
        panic_when_all_ejected: false,
        ..EngineSettings::default()
    };
    let f = fixture_with(
        vec![],
        vec![destination_rule(
            "service-c",
            outlier_policy(tutorial_outlier()),
        )],
        vec![service("service-c", 0, 1)],
        settings,
    );
    f.one_try(f.t0, Outcome::status(500)).unwrap();
    assert_eq!(
        f.one_try(f.t0, Outcome::status(200)),
        Err(EngineError::NoHealthyUpstream)
    );
}

#[test]
fn below_min_health_percent_routes_to_all() {
    let outlier = OutlierDetection {
        min_health_percent: 60,
        ..tutorial_outlier()
    };
    let f = fixture(
        vec![],
        vec![destination_rule("service-c", outlier_policy(outlier))],
        vec![service("service-c", 0, 2)],
    );
    let crashed = addr(2, 1);
    f.fail_on(f.t0, crashed);
    // 1 of 2 healthy = 50% < 60%: panic, the ejected endpoint still gets traffic.
    assert!(f.picks(f.t0, 50).contains(&crashed));
}

#[test]
fn gateway_and_local_origin_counters_follow_envoy() {
    let policy = |f: fn(&mut OutlierDetection)| {
        let mut o = OutlierDetection {
            consecutive_5xx_errors: 0,
            ..tutorial_outlier()
        };
        f(&mut o);
        outlier_policy(o)
    };
    use Outcome::*;
    let s = Outcome::status;
    let cases: Vec<(&str, TrafficPolicy, Vec<Outcome>, bool)> = vec![
        (
            "gateway errors in a row",
            policy(|o| o.consecutive_gateway_errors = Some(2)),
            vec![s(502), s(504)],
            true,
        ),
        (
            "a 500 breaks the gateway streak",
            policy(|o| o.consecutive_gateway_errors = Some(2)),
            vec![s(502), s(500), s(503)],
            false,
        ),
        (
            "a 200 resets the 5xx streak",
            policy(|o| o.consecutive_5xx_errors = 2),
            vec![s(500), s(200), s(500)],
            false,
        ),
        (
            "local failures count as 5xx when not split",
            policy(|o| o.consecutive_5xx_errors = 2),
            vec![ConnectFailure, Timeout],
            true,
        ),
        (
            "split: local failures have their own counter",
            policy(|o| {
                o.split_external_local_origin_errors = true;
                o.consecutive_local_origin_failures = 2;
                o.consecutive_5xx_errors = 5
            }),
            vec![ConnectFailure, Reset],
            true,
        ),
        (
            "split: local failures do not count as 5xx",
            policy(|o| {
                o.split_external_local_origin_errors = true;
                o.consecutive_local_origin_failures = 5;
                o.consecutive_5xx_errors = 2
            }),
            vec![ConnectFailure, Reset, s(500)],
            false,
        ),
        (
            "split: a response resets the local counter",
            policy(|o| {
                o.split_external_local_origin_errors = true;
                o.consecutive_local_origin_failures = 2
            }),
            vec![ConnectFailure, s(500), ConnectFailure],
            false,
        ),
    ];
    for (name, policy, outcomes, want) in cases {
        let f = fixture(
            vec![],
            vec![destination_rule("service-c", policy)],
            vec![service("service-c", 1, 0)],
        );
        for outcome in outcomes {
            f.one_try(f.t0, outcome).unwrap();
        }
        assert_eq!(!ejected(&f).is_empty(), want, "{name}");
    }
}

#[test]
fn outlier_state_survives_a_reload() {
    let f = tutorial_breaker(2);
    let crashed = addr(2, 1);
    f.fail_on(f.t0, crashed);
    let config = MeshConfig {
        virtual_services: vec![],
        destination_rules: vec![Arc::new(destination_rule(
            "service-c",
            outlier_policy(tutorial_outlier()),
        ))],
        gateways: vec![],
        authorization_policies: vec![],
        peer_authentications: vec![],
    };
    let registry = Registry {
        services: vec![Arc::new(service("service-c", 0, 3))],
    };
    let reloaded = Fixture {
        engine: f.engine.reload(&config, &registry, f.at(1.0)),
        t0: f.t0,
    };
    assert_eq!(ejected(&reloaded), vec![crashed]);
    assert!(!reloaded.picks(f.at(5.0), 60).contains(&crashed));
    assert!(reloaded.picks(f.at(10.0), 60).contains(&crashed));
}

#[test]
fn a_reload_rebuilds_only_what_changed_and_keeps_live_state() {
    let rule = Arc::new(destination_rule(
        "service-c",
        outlier_policy(tutorial_outlier()),
    ));
    let config = MeshConfig {
        virtual_services: vec![],
        destination_rules: vec![Arc::clone(&rule)],
        gateways: vec![],
        authorization_policies: vec![],
        peer_authentications: vec![],
    };
    let (a, c) = (
        Arc::new(service("service-a", 2, 0)),
        Arc::new(service("service-c", 0, 3)),
    );
    let registry = Registry {
        services: vec![Arc::clone(&a), Arc::clone(&c)],
    };
    let t0 = Instant::now();
    let f = Fixture {
        engine: Engine::new(&config, &registry, EngineSettings::default(), t0),
        t0,
    };
    let crashed = addr(2, 1);
    f.fail_on(t0, crashed);
    let cluster_of = |engine: &Engine, host: &str| {
        let snap = &engine.snap;
        let index = snap
            .cluster_keys
            .iter()
            .position(|k| k.host.starts_with(host));
        Arc::clone(&snap.clusters[index.expect("a cluster")])
    };

    // service-c gains an endpoint: only its cluster is rebuilt; routes stay shared.
    let mut grown = service("service-c", 0, 4);
    grown.identity = Arc::clone(&c.identity);
    let registry = Registry {
        services: vec![Arc::clone(&a), Arc::new(grown)],
    };
    let reloaded = f.engine.reload(&config, &registry, f.at(1.0));
    assert!(Arc::ptr_eq(&reloaded.snap.routes, &f.engine.snap.routes));
    assert!(Arc::ptr_eq(
        &cluster_of(&reloaded, "service-a"),
        &cluster_of(&f.engine, "service-a")
    ));
    let (before, after) = (
        cluster_of(&f.engine, "service-c"),
        cluster_of(&reloaded, "service-c"),
    );
    assert!(!Arc::ptr_eq(&before, &after));
    assert_eq!(after.endpoints.len(), 4);
    assert!(Arc::ptr_eq(&before.shared, &after.shared));
    let reloaded = Fixture {
        engine: reloaded,
        t0,
    };
    assert_eq!(
        ejected(&reloaded),
        vec![crashed],
        "the ejection carries over"
    );
    assert!(reloaded.picks(f.at(5.0), 80).contains(&addr(2, 4)));

    // A new rule for service-c recompiles routes; service-a's cluster is still reused.
    let config = MeshConfig {
        destination_rules: vec![Arc::new((*rule).clone())],
        ..config
    };
    let recompiled = reloaded.engine.reload(&config, &registry, f.at(6.0));
    assert!(!Arc::ptr_eq(
        &recompiled.snap.routes,
        &reloaded.engine.snap.routes
    ));
    assert!(Arc::ptr_eq(
        &cluster_of(&recompiled, "service-a"),
        &cluster_of(&reloaded.engine, "service-a")
    ));
    let recompiled = Fixture {
        engine: recompiled,
        t0,
    };
    assert_eq!(ejected(&recompiled), vec![crashed], "and again");
}

// ---------------------------------------------------------------- retries and timeouts

fn with_retries(retries: Option<RetryPolicy>, timeout: Option<Duration>, endpoints: u8) -> Fixture {
    let mut route = http_route("r", vec![], to("service-c"));
    route.retries = retries;
    route.timeout = timeout;
    fixture(
        vec![virtual_service(&["service-c"], vec![route])],
        vec![],
        vec![service("service-c", endpoints, 0)],
    )
}

fn retry_policy(
    attempts: u32,
    per_try: Option<Duration>,
    retry_on: RetryOn,
) -> Option<RetryPolicy> {
    Some(RetryPolicy {
        attempts,
        per_try_timeout: per_try,
        retry_on,
    })
}

fn on_5xx() -> RetryOn {
    RetryOn {
        five_xx: true,
        ..RetryOn::default()
    }
}

const MS: Duration = Duration::from_millis(1);

#[test]
fn retries_up_to_attempts_then_forwards_the_last_response_with_urx() {
    // The tutorial's retry policy: attempts 3, perTryTimeout 1s, retryOn 5xx.
    let f = with_retries(
        retry_policy(3, Some(Duration::from_secs(1)), on_5xx()),
        None,
        4,
    );
    let run = drive(&f.engine, &get("service-c", "/"), f.t0, |_, _| {
        (Outcome::status(500), MS)
    });
    assert_eq!(run.tried.len(), 4);
    assert_eq!(run.result, Ok(Verdict::Forward));
    assert_eq!(run.flags.to_string(), "URX");

    let run = drive(&f.engine, &get("service-c", "/"), f.t0, |_, n| {
        (Outcome::status(if n < 3 { 503 } else { 200 }), MS)
    });
    assert_eq!(run.tried.len(), 3);
    assert_eq!(run.result, Ok(Verdict::Forward));
    assert!(run.flags.is_empty());
}

#[test]
fn failures_without_a_response_end_in_local_replies() {
    let f = with_retries(retry_policy(2, None, on_5xx()), None, 3);
    let run = drive(&f.engine, &get("service-c", "/"), f.t0, |_, _| {
        (Outcome::ConnectFailure, MS)
    });
    assert_eq!(run.tried.len(), 3);
    let err = EngineError::RetriesExhausted(TryFailure::ConnectFailure);
    assert_eq!(run.result, Ok(Verdict::Fail(err)));
    assert_eq!(
        (err.status(), run.flags.to_string().as_str()),
        (503, "UF,URX")
    );

    let f = with_retries(retry_policy(0, None, on_5xx()), None, 3);
    let run = drive(&f.engine, &get("service-c", "/"), f.t0, |_, _| {
        (Outcome::Reset, MS)
    });
    assert_eq!(run.result, Ok(Verdict::Fail(EngineError::UpstreamReset)));
    assert_eq!(run.flags.to_string(), "UC");
}

#[test]
fn per_try_timeout_bounds_each_try_and_is_retried() {
    let f = with_retries(
        retry_policy(3, Some(Duration::from_secs(1)), on_5xx()),
        None,
        3,
    );
    // The first try hangs; the second answers in 100 ms.
    let run = drive(&f.engine, &get("service-c", "/"), f.t0, |_, n| {
        if n == 1 {
            (Outcome::status(200), Duration::from_secs(60))
        } else {
            (Outcome::status(200), Duration::from_millis(100))
        }
    });
    assert_eq!(run.tried.len(), 2);
    assert_eq!(run.result, Ok(Verdict::Forward));
    // 1 s timeout + < 25 ms backoff + 100 ms.
    let took = run.ended - f.t0;
    assert!(
        took >= Duration::from_millis(1_100) && took < Duration::from_millis(1_125),
        "{took:?}"
    );

    // Every try hangs: 4 tries of 1 s, then UT with URX.
    let run = drive(&f.engine, &get("service-c", "/"), f.t0, |_, _| {
        (Outcome::status(200), Duration::from_secs(60))
    });
    assert_eq!(run.tried.len(), 4);
    assert_eq!(
        run.result,
        Ok(Verdict::Fail(EngineError::RetriesExhausted(
            TryFailure::Timeout
        )))
    );
    assert_eq!(run.flags.to_string(), "UT,URX");
}

#[test]
fn each_retry_on_condition_at_the_engine() {
    use Outcome::*;
    let s = Outcome::status;
    let on = |f: fn(&mut RetryOn)| {
        let mut r = RetryOn::default();
        f(&mut r);
        r
    };
    let grpc = |code| Response {
        status: 200,
        grpc_status: Some(code),
    };
    let cases: Vec<(&str, RetryOn, Outcome, bool)> = vec![
        ("5xx on 500", on(|r| r.five_xx = true), s(500), true),
        ("5xx on 404", on(|r| r.five_xx = true), s(404), false),
        (
            "gateway-error on 502",
            on(|r| r.gateway_error = true),
            s(502),
            true,
        ),
        (
            "gateway-error on 500",
            on(|r| r.gateway_error = true),
            s(500),
            false,
        ),
        (
            "connect-failure",
            on(|r| r.connect_failure = true),
            ConnectFailure,
            true,
        ),
        (
            "connect-failure on 503",
            on(|r| r.connect_failure = true),
            s(503),
            false,
        ),
        (
            "refused-stream",
            on(|r| r.refused_stream = true),
            RefusedStream,
            true,
        ),
        ("reset", on(|r| r.reset = true), Reset, true),
        ("reset on 500", on(|r| r.reset = true), s(500), false),
        (
            "retriable-4xx on 409",
            on(|r| r.retriable_4xx = true),
            s(409),
            true,
        ),
        (
            "retriable-4xx on 429",
            on(|r| r.retriable_4xx = true),
            s(429),
            false,
        ),
        (
            "retriable-status-codes",
            on(|r| r.retriable_status_codes = vec![429]),
            s(429),
            true,
        ),
        (
            "bare code does not cover others",
            on(|r| r.retriable_status_codes = vec![429]),
            s(503),
            false,
        ),
        (
            "grpc unavailable",
            on(|r| r.unavailable = true),
            grpc(14),
            true,
        ),
        ("grpc cancelled", on(|r| r.cancelled = true), grpc(1), true),
        (
            "grpc deadline-exceeded",
            on(|r| r.deadline_exceeded = true),
            grpc(4),
            true,
        ),
        ("grpc internal", on(|r| r.internal = true), grpc(13), true),
        (
            "grpc resource-exhausted",
            on(|r| r.resource_exhausted = true),
            grpc(8),
            true,
        ),
    ];
    for (name, retry_on, first, retried) in cases {
        let f = with_retries(retry_policy(1, None, retry_on), None, 2);
        let run = drive(&f.engine, &get("service-c", "/"), f.t0, |_, n| {
            (if n == 1 { first } else { s(200) }, MS)
        });
        assert_eq!(run.tried.len(), if retried { 2 } else { 1 }, "{name}");
    }
}

#[test]
fn absent_retries_use_istios_default_policy() {
    let f = with_retries(None, None, 3);
    let run = drive(&f.engine, &get("service-c", "/"), f.t0, |_, _| {
        (Outcome::status(503), MS)
    });
    assert_eq!(run.tried.len(), 3, "503 is retried twice");
    let run = drive(&f.engine, &get("service-c", "/"), f.t0, |_, _| {
        (Outcome::status(500), MS)
    });
    assert_eq!(run.tried.len(), 1, "500 is not");
    let run = drive(&f.engine, &get("service-c", "/"), f.t0, |_, _| {
        (Outcome::ConnectFailure, MS)
    });
    assert_eq!(run.tried.len(), 3, "connect failures are");
}

#[test]
fn a_retry_goes_to_an_endpoint_not_tried_yet() {
    for lb in [
        LoadBalancer::LeastRequest,
        LoadBalancer::RoundRobin,
        LoadBalancer::Random,
    ] {
        let mut route = http_route("r", vec![], to("service-c"));
        route.retries = retry_policy(2, None, on_5xx());
        let policy = TrafficPolicy {
            load_balancer: Some(lb),
            ..TrafficPolicy::default()
        };
        let f = fixture(
            vec![virtual_service(&["service-c"], vec![route])],
            vec![destination_rule("service-c", policy)],
            vec![service("service-c", 3, 0)],
        );
        // Ten requests: 20 retries stay within the retry budget's floor.
        for _ in 0..10 {
            let run = drive(&f.engine, &get("service-c", "/"), f.t0, |_, _| {
                (Outcome::status(500), MS)
            });
            let mut tried = run.tried.clone();
            tried.sort();
            tried.dedup();
            assert_eq!(tried.len(), 3, "{lb:?}: {:?}", run.tried);
        }
    }
    // With a single endpoint, the retry reuses it rather than failing.
    let f = with_retries(retry_policy(2, None, on_5xx()), None, 1);
    let run = drive(&f.engine, &get("service-c", "/"), f.t0, |_, _| {
        (Outcome::status(500), MS)
    });
    assert_eq!(run.tried, vec![addr(1, 1); 3]);
}

#[test]
fn the_route_timeout_cuts_retries_short() {
    let f = with_retries(
        retry_policy(10, Some(Duration::from_secs(1)), on_5xx()),
        Some(Duration::from_millis(2_500)),
        3,
    );
    let run = drive(&f.engine, &get("service-c", "/"), f.t0, |_, _| {
        (Outcome::status(200), Duration::from_secs(60))
    });
    // Tries at ~0 s and ~1 s time out per try; the third is cut by the route deadline.
    assert_eq!(run.tried.len(), 3);
    assert_eq!(run.result, Ok(Verdict::Fail(EngineError::RequestTimeout)));
    assert_eq!(run.ended, f.at(2.5));
    assert_eq!(run.flags.to_string(), "UT");

    // Fast failures: the backoff that would cross the deadline ends the request.
    let f = with_retries(
        retry_policy(1_000, None, on_5xx()),
        Some(Duration::from_millis(100)),
        3,
    );
    let run = drive(&f.engine, &get("service-c", "/"), f.t0, |_, _| {
        (Outcome::status(500), MS * 10)
    });
    assert_eq!(run.result, Ok(Verdict::Fail(EngineError::RequestTimeout)));
    assert!(run.ended <= f.at(0.1));
    assert!(run.tried.len() < 20, "{}", run.tried.len());
}

#[test]
fn non_replayable_requests_are_not_retried() {
    let f = with_retries(retry_policy(3, None, on_5xx()), None, 3);
    let req = Req {
        replayable: false,
        ..get("service-c", "/")
    };
    let run = drive(&f.engine, &req, f.t0, |_, _| (Outcome::status(503), MS));
    assert_eq!(run.tried.len(), 1);
    assert_eq!(run.result, Ok(Verdict::Forward));

    // The proxy can also find out mid-request.
    let mut plan = f.route(&get("service-c", "/")).unwrap();
    plan.mark_not_replayable();
    let a = plan.next_attempt(f.t0).unwrap();
    assert_eq!(plan.report(a, Outcome::status(503), f.t0), Verdict::Forward);
}

#[test]
fn the_budget_caps_retries_at_20_percent_plus_floor_on_a_failing_upstream() {
    let f = with_retries(retry_policy(3, None, on_5xx()), None, 5);
    let requests = 2_000u64;
    let mut tries = 0u64;
    // 2,000 requests over 2 s (one per millisecond), all inside one 10 s window.
    for i in 0..requests {
        let start = f.t0 + Duration::from_millis(i);
        let run = drive(&f.engine, &get("service-c", "/"), start, |_, _| {
            (Outcome::ConnectFailure, Duration::ZERO)
        });
        tries += run.tried.len() as u64;
    }
    let retries = tries - requests;
    let metrics = f.engine.metrics();
    let cap = requests * 20 / 100 + 3 * 10;
    assert_eq!(
        retries,
        metrics.retries.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(retries <= cap, "{retries} > {cap}");
    // The budget is used, not starved: without it there would be 3 × 2,000 retries.
    assert!(retries >= cap - 3, "{retries}");
    assert!(
        metrics
            .retry_budget_exhausted
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

#[test]
fn max_retries_limits_concurrent_retries() {
    let pool = ConnectionPool {
        http: HttpPool {
            max_retries: Some(1),
            ..HttpPool::default()
        },
        ..ConnectionPool::default()
    };
    let mut route = http_route("r", vec![], to("service-c"));
    route.retries = retry_policy(3, None, on_5xx());
    let policy = TrafficPolicy {
        connection_pool: Some(pool),
        ..TrafficPolicy::default()
    };
    let f = fixture(
        vec![virtual_service(&["service-c"], vec![route])],
        vec![destination_rule("service-c", policy)],
        vec![service("service-c", 3, 0)],
    );
    let mut a = f.route(&get("service-c", "/")).unwrap();
    let mut b = f.route(&get("service-c", "/")).unwrap();
    let (ta, tb) = (a.next_attempt(f.t0).unwrap(), b.next_attempt(f.t0).unwrap());
    assert!(matches!(
        a.report(ta, Outcome::status(503), f.t0),
        Verdict::RetryAt(_)
    ));
    // `a`'s retry is outstanding, so `b` may not retry: it forwards its 503 with `UO`.
    assert_eq!(b.report(tb, Outcome::status(503), f.t0), Verdict::Forward);
    assert_eq!(b.flags().to_string(), "UO");
    // Once `a`'s retry is reported, retries are free again.
    let ta = a.next_attempt(f.t0).unwrap();
    assert_eq!(a.report(ta, Outcome::status(200), f.t0), Verdict::Forward);
    let mut c = f.route(&get("service-c", "/")).unwrap();
    let tc = c.next_attempt(f.t0).unwrap();
    assert!(matches!(
        c.report(tc, Outcome::status(503), f.t0),
        Verdict::RetryAt(_)
    ));
}

// ---------------------------------------------------------------- pool limits

fn pooled(pool: ConnectionPool) -> Fixture {
    let policy = TrafficPolicy {
        connection_pool: Some(pool),
        ..TrafficPolicy::default()
    };
    fixture(
        vec![],
        vec![destination_rule("service-c", policy)],
        vec![service("service-c", 2, 0)],
    )
}

#[test]
fn concurrent_requests_over_the_limit_fail_fast_with_uo() {
    let f = pooled(ConnectionPool {
        http: HttpPool {
            http2_max_requests: Some(3),
            ..HttpPool::default()
        },
        ..ConnectionPool::default()
    });
    let mut plans: Vec<RequestPlan> = (0..10)
        .map(|_| f.route(&get("service-c", "/")).unwrap())
        .collect();
    let mut attempts = Vec::new();
    let mut overflows = 0;
    for plan in plans.iter_mut() {
        match plan.next_attempt(f.t0) {
            Ok(a) => attempts.push(a),
            Err(e) => {
                assert_eq!(e, EngineError::Overflow);
                assert_eq!(plan.flags().to_string(), "UO");
                overflows += 1;
            }
        }
    }
    assert_eq!((attempts.len(), overflows), (3, 7));
    assert_eq!(
        f.engine
            .metrics()
            .pool_overflow
            .load(std::sync::atomic::Ordering::Relaxed),
        7
    );
    // Reporting (or dropping) an attempt frees its slot.
    let a = attempts.pop().unwrap();
    plans[0].report(a, Outcome::status(200), f.t0);
    assert!(plans[9].next_attempt(f.t0).is_ok());
    drop(attempts);
    let fresh: Vec<Attempt> = plans[4..7]
        .iter_mut()
        .map(|p| p.next_attempt(f.t0).unwrap())
        .collect();
    assert_eq!(fresh.len(), 3);
}

#[test]
fn connection_and_pending_permits_are_bounded_and_released_on_drop() {
    let f = pooled(ConnectionPool {
        tcp: TcpPool {
            max_connections: Some(100),
            ..TcpPool::default()
        },
        http: HttpPool {
            http1_max_pending_requests: Some(5),
            max_requests_per_connection: Some(10),
            ..HttpPool::default()
        },
    });
    let plan = f.route(&get("service-c", "/")).unwrap();
    assert_eq!(plan.pool_limits().max_requests_per_connection, Some(10));
    assert_eq!(plan.pool_limits().connect_timeout, Duration::from_secs(10));
    let connections: Vec<Permit> = (0..100).map(|_| plan.try_connection().unwrap()).collect();
    assert_eq!(plan.try_connection().unwrap_err(), EngineError::Overflow);
    let pending: Vec<Permit> = (0..5).map(|_| plan.try_pending().unwrap()).collect();
    assert_eq!(plan.try_pending().unwrap_err(), EngineError::Overflow);
    drop(connections);
    drop(pending);
    assert!(plan.try_connection().is_ok());
    assert!(plan.try_pending().is_ok());
}

// ---------------------------------------------------------------- faults, mirror, rewrite

fn pct(percent: u32) -> Percent {
    Percent {
        per_million: percent * 10_000,
    }
}

#[test]
fn faults_abort_and_delay_exact_shares() {
    let mut route = http_route("r", vec![], to("service-c"));
    route.fault = Some(Fault {
        delay: Some(FaultDelay {
            fixed_delay: Duration::from_secs(5),
            percentage: pct(10),
        }),
        abort: Some(FaultAbort {
            http_status: 418,
            percentage: pct(25),
        }),
    });
    let f = fixture(
        vec![virtual_service(&["service-c"], vec![route])],
        vec![],
        vec![service("service-c", 1, 0)],
    );
    let (mut delayed, mut aborted, mut both) = (0, 0, 0);
    for _ in 0..1_000 {
        let mut plan = f.route(&get("service-c", "/")).unwrap();
        let delay = plan.delay();
        if let Some(d) = delay {
            assert_eq!(d, Duration::from_secs(5));
            assert!(plan.flags().contains(ResponseFlags::DI));
            delayed += 1;
        }
        match plan.next_attempt(f.t0) {
            Err(e) => {
                assert_eq!(e, EngineError::FaultAbort { status: 418 });
                assert_eq!(e.status(), 418);
                assert!(plan.flags().contains(ResponseFlags::FI));
                aborted += 1;
                both += usize::from(delay.is_some());
            }
            Ok(a) => {
                plan.report(a, Outcome::status(200), f.t0);
            }
        }
    }
    assert_eq!((delayed, aborted), (100, 250));
    assert!(both > 0, "delay and abort are independent");
    let metrics = f.engine.metrics();
    assert_eq!(
        metrics
            .fault_delays
            .load(std::sync::atomic::Ordering::Relaxed),
        100
    );
    assert_eq!(
        metrics
            .fault_aborts
            .load(std::sync::atomic::Ordering::Relaxed),
        250
    );
}

#[test]
fn mirror_copies_an_exact_share_to_the_mirror_destination() {
    let mut route = http_route(
        "r",
        vec![],
        vec![weighted(dest("service-c", Some("version-v1")), 100)],
    );
    route.mirror = Some(Mirror {
        destination: dest("service-c", Some("version-v2")),
        percentage: pct(30),
    });
    let f = fixture(
        vec![virtual_service(&["service-c"], vec![route])],
        vec![destination_rule("service-c", TrafficPolicy::default())],
        vec![service("service-c", 1, 1)],
    );
    let mut mirrored = 0;
    for _ in 0..1_000 {
        let mut plan = f.route(&get("service-c", "/")).unwrap();
        if let Some(target) = plan.mirror_endpoint(f.t0) {
            assert_eq!(target, addr(2, 1));
            mirrored += 1;
        }
        let a = plan.next_attempt(f.t0).unwrap();
        assert_eq!(
            a.endpoint(),
            addr(1, 1),
            "the real request still goes to v1"
        );
        plan.report(a, Outcome::status(200), f.t0);
    }
    assert_eq!(mirrored, 300);
}

#[test]
fn the_scheme_is_the_uris_or_else_http() {
    let parts = |uri: &str| Request::get(uri).body(()).unwrap().into_parts().0;
    // HTTP/1 origin form, as the mesh receives it: plain HTTP.
    let origin = parts("/a");
    assert_eq!(
        RequestInfo::from_parts(&origin, 80, "default").scheme,
        "http"
    );
    // HTTP/2 (`:scheme`) or an absolute-form URI says it.
    let h2 = parts("https://service-c/a");
    assert_eq!(RequestInfo::from_parts(&h2, 80, "default").scheme, "https");
}

#[test]
fn rewrite_and_header_operations_apply_to_the_request_and_response() {
    let value = HeaderValue::from_static;
    let mut route = http_route(
        "r",
        vec![RequestMatch {
            uri: Some(prefix("/old/")),
            ..RequestMatch::default()
        }],
        to("service-c"),
    );
    route.rewrite = Some(Rewrite {
        uri: Some("/new/".into()),
        authority: Some("service-c.internal".into()),
        whole_path: false,
    });
    route.headers.request.set = vec![(hname("x-route"), value("r"))];
    route.headers.response.remove = vec![hname("server")];
    route.route[0].headers.request.add = vec![(hname("x-dest"), value("c"))];
    route.route[0].headers.request.set = vec![(hname("x-route"), value("dest"))];
    let f = fixture(
        vec![virtual_service(&["service-c"], vec![route])],
        vec![],
        vec![service("service-c", 1, 0)],
    );
    let (mut parts, ()) = Request::get("/old/a/b?x=1")
        .header("host", "service-c")
        .body(())
        .unwrap()
        .into_parts();
    let info = RequestInfo::from_parts(&parts, 80, "default");
    let plan = f.engine.route(&info, f.t0).unwrap();
    plan.rewrite_request(&mut parts);
    assert_eq!(parts.uri, "/new/a/b?x=1");
    assert_eq!(parts.headers["host"], "service-c.internal");
    assert_eq!(parts.headers["x-dest"], "c");
    // Destination level first, then route level: the route's `set` wins.
    assert_eq!(parts.headers["x-route"], "r");
    let mut response = HeaderMap::new();
    response.insert("server", value("envoy"));
    plan.rewrite_response(&mut response);
    assert!(response.is_empty());
}

#[test]
fn several_destination_rules_for_a_host_merge_their_subsets() {
    let mut first = destination_rule("service-c", TrafficPolicy::default());
    first.subsets.truncate(1);
    let mut second = destination_rule("service-c", TrafficPolicy::default());
    second.subsets.remove(0);
    let route = http_route(
        "r",
        vec![],
        vec![weighted(dest("service-c", Some("version-v2")), 100)],
    );
    let f = fixture(
        vec![virtual_service(&["service-c"], vec![route])],
        vec![first, second],
        vec![service("service-c", 1, 1)],
    );
    assert_eq!(f.picks(f.t0, 4), vec![addr(2, 1); 4]);
}

#[test]
fn the_engine_is_shared_by_concurrent_tasks() {
    fn shareable<T: Send + Sync + Clone + 'static>() {}
    fn movable<T: Send + 'static>() {}
    shareable::<Engine>();
    movable::<RequestPlan>();
    movable::<Attempt>();
    movable::<Permit>();

    let f = pooled(ConnectionPool {
        http: HttpPool {
            http2_max_requests: Some(2),
            ..HttpPool::default()
        },
        ..ConnectionPool::default()
    });
    let admitted = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..1_000 {
                    let mut plan = f.route(&get("service-c", "/")).unwrap();
                    if let Ok(a) = plan.next_attempt(f.t0) {
                        admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        plan.report(a, Outcome::status(200), f.t0);
                    }
                }
            });
        }
    });
    assert!(admitted.into_inner() > 0);
    // Every slot came back: the limit's two slots are free again.
    let mut plans: Vec<RequestPlan> = (0..3)
        .map(|_| f.route(&get("service-c", "/")).unwrap())
        .collect();
    let held: Vec<_> = plans[..2]
        .iter_mut()
        .map(|p| p.next_attempt(f.t0).unwrap())
        .collect();
    assert_eq!(
        plans[2].next_attempt(f.t0).unwrap_err(),
        EngineError::Overflow
    );
    drop(held);
}

// ---------------------------------------------------------------- Gateway API routes

fn path_prefix(p: &str) -> Vec<RequestMatch> {
    vec![RequestMatch {
        uri: Some(StringMatch::PathPrefix(p.into())),
        ..RequestMatch::default()
    }]
}

fn counter(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(std::sync::atomic::Ordering::Relaxed)
}

#[test]
fn an_exclusive_host_answers_nr_where_its_routes_do_not_match() {
    let api = |exclusive: bool| {
        let mut vs = virtual_service(
            &["service-c"],
            vec![http_route("api", path_prefix("/api"), to("service-c"))],
        );
        vs.exclusive = if exclusive {
            Exclusive::AllPorts
        } else {
            Exclusive::No
        };
        vs
    };
    let services = || vec![service("service-c", 1, 0), service("service-d", 1, 0)];
    // Istio's reading of a VirtualService: what no route matches takes the service's own route.
    let f = fixture(vec![api(false)], vec![], services());
    assert_eq!(f.route_name(&get("service-c", "/api/x")), "default/vs/api");
    assert_eq!(f.route_name(&get("service-c", "/other")), "default");

    // Gateway API's: 404 `NR`.
    let f = fixture(vec![api(true)], vec![], services());
    assert_eq!(f.route_name(&get("service-c", "/api/x")), "default/vs/api");
    assert_eq!(f.route_name(&get("service-c", "/apix")), "error: NR");
    let err = f.route(&get("service-c", "/other")).unwrap_err();
    assert_eq!((err, err.status()), (EngineError::NoRoute, 404));
    assert_eq!(counter(&f.engine.metrics().no_route), 2);
    // Opaque TCP has no path to match: the service's own route still carries it.
    let tcp = f.engine.route_tcp("service-c:80", "default", 80, f.t0);
    assert_eq!(tcp.unwrap().route_name(), "default");
    // Another service is untouched.
    assert_eq!(f.route_name(&get("service-d", "/other")), "default");

    // Claimed on one port (a route attached to a Service port), the host's other ports are not.
    let mut on_8080 = api(true);
    on_8080.exclusive = Exclusive::Ports(vec![8080]);
    let f = fixture(vec![on_8080], vec![], services());
    assert_eq!(f.route_name(&get("service-c", "/other")), "default");
    let mut other_port = get("service-c", "/other");
    other_port.port = 8080;
    assert_eq!(f.route_name(&other_port), "error: NR");

    // A match on the client's namespace (Istio's `sourceNamespace`, a consumer route's).
    let mut for_frontend = api(false);
    for_frontend.http[0].matches[0].source_namespace = Some("frontend".into());
    let f2 = fixture(vec![for_frontend], vec![], services());
    assert_eq!(f2.route_name(&get("service-c", "/api/x")), "default");
    let mut from_frontend = get("service-c.default", "/api/x");
    from_frontend.namespace = "frontend".into();
    assert_eq!(f2.route_name(&from_frontend), "default/vs/api");

    // A request sent to a claimed service is routed by its routes whatever its Host (GAMMA);
    // to an unclaimed one (or port), the caller routes by Host as Istio does.
    let claimed = |authority: &str, path: &str, port: u16| {
        let mut req = get(authority, path);
        req.port = port;
        f.engine
            .route_claimed(&req.info(), "service-c:8080", f.t0)
            .map(|decided| match decided {
                Ok(plan) => plan.route_name().to_owned(),
                Err(e) => format!("error: {}", e.flags()),
            })
    };
    assert_eq!(
        claimed("service-d", "/api/x", 8080).as_deref(),
        Some("default/vs/api")
    );
    assert_eq!(
        claimed("10.0.0.9", "/other", 8080).as_deref(),
        Some("error: NR")
    );
    assert_eq!(claimed("service-d", "/api/x", 80), None);

    // One exclusive rule among those sharing a host makes the host exclusive, whatever the order.
    let mut by_header = virtual_service(
        &["service-c"],
        vec![http_route(
            "v",
            vec![RequestMatch {
                headers: vec![(hname("x-v"), exact("1"))],
                ..RequestMatch::default()
            }],
            to("service-c"),
        )],
    );
    by_header.id.name = "other".into();
    for rules in [
        vec![by_header.clone(), api(true)],
        vec![api(true), by_header.clone()],
    ] {
        let f = fixture(rules, vec![], services());
        assert_eq!(f.route_name(&get("service-c", "/other")), "error: NR");
        let with_header = get("service-c", "/other").header("x-v", "1");
        assert_eq!(f.route_name(&with_header), "default/other/v");
    }

    // Bound to a gateway alone, an exclusive rule leaves mesh traffic as it was.
    let mut at_gateway = api(true);
    at_gateway.gateways = vec!["ingress".into()];
    let f = fixture(vec![at_gateway], vec![], services());
    assert_eq!(f.route_name(&get("service-c", "/other")), "default");
    assert_eq!(f.route_name(&get("service-c", "/api")), "default");
}

#[test]
fn a_redirect_route_answers_with_its_location_and_no_upstream() {
    let redirect = |name: &str, prefix: &str, f: fn(&mut Redirect)| {
        let mut r = Redirect {
            scheme: None,
            host: None,
            port: None,
            path: None,
            status: 302,
        };
        f(&mut r);
        let mut route = http_route(name, path_prefix(prefix), vec![]);
        route.redirect = Some(r);
        route
    };
    let mut to_https = redirect("to-https", "/secure", |r| {
        r.scheme = Some("https".into());
        r.status = 301;
    });
    to_https.headers.response.set = vec![(hname("x-route"), HeaderValue::from_static("r"))];
    let mut vs = virtual_service(
        &["service-c"],
        vec![
            to_https,
            redirect("to-8080", "/port", |r| r.port = Some(8080)),
            redirect("moved", "/old", |r| {
                r.path = Some(RedirectPath::Prefix("/new".into()));
                r.status = 308;
            }),
            redirect("elsewhere", "/away", |r| {
                r.host = Some("b.example".into());
                r.path = Some(RedirectPath::Whole("/landing".into()));
                r.status = 303;
            }),
        ],
    );
    vs.exclusive = Exclusive::AllPorts;
    let f = fixture(vec![vs], vec![], vec![service("service-c", 1, 0)]);
    let cases = [
        // A new scheme: its default port, so the request's 8080 goes; the query stays.
        (
            "service-c:8080",
            "/secure/a?x=1",
            "default/vs/to-https",
            301,
            "https://service-c/secure/a?x=1",
        ),
        // An explicit port is kept.
        (
            "service-c",
            "/port/a",
            "default/vs/to-8080",
            302,
            "http://service-c:8080/port/a",
        ),
        // The matched prefix replaced, the request's port and query kept.
        (
            "service-c:8080",
            "/old/a/b?q=1",
            "default/vs/moved",
            308,
            "http://service-c:8080/new/a/b?q=1",
        ),
        (
            "service-c",
            "/old",
            "default/vs/moved",
            308,
            "http://service-c/new",
        ),
        // Another host and a whole path.
        (
            "service-c",
            "/away/x?q=1",
            "default/vs/elsewhere",
            303,
            "http://b.example/landing?q=1",
        ),
    ];
    for (authority, uri, route, status, location) in cases {
        let mut req = get(authority, uri);
        if let Some((_, port)) = authority.rsplit_once(':') {
            req.port = port.parse().unwrap();
        }
        let mut plan = f.route(&req).unwrap();
        assert_eq!(plan.route_name(), route);
        let want = LocalAnswer::Redirect {
            status,
            location: HeaderValue::from_static(location),
        };
        assert_eq!(plan.local_answer(), Some(&want), "{authority}{uri}");
        // Nothing failed, nothing is tried.
        assert_eq!(plan.flags(), ResponseFlags::NONE);
        assert_eq!(plan.next_attempt(f.t0).unwrap_err(), EngineError::NoRoute);
        assert_eq!(plan.attempts(), 0);
    }
    // The route's response headers apply to its answer.
    let plan = f.route(&get("service-c", "/secure")).unwrap();
    let mut headers = HeaderMap::new();
    plan.rewrite_response(&mut headers);
    assert_eq!(headers["x-route"], "r");
    let metrics = f.engine.metrics();
    assert_eq!(counter(&metrics.redirects), 6);
    assert_eq!(counter(&metrics.requests), 6);
    assert_eq!(counter(&metrics.no_route), 0);
}

#[test]
fn a_rule_without_valid_backends_answers_500_itself() {
    let mut invalid = http_route("invalid", path_prefix("/broken"), vec![]);
    invalid.direct_response = Some(500);
    let mut vs = virtual_service(
        &["service-c"],
        vec![invalid, http_route("rest", vec![], to("service-c"))],
    );
    vs.exclusive = Exclusive::AllPorts;
    let f = fixture(vec![vs], vec![], vec![service("service-c", 1, 0)]);
    let mut plan = f.route(&get("service-c", "/broken/x")).unwrap();
    assert_eq!(plan.route_name(), "default/vs/invalid");
    assert_eq!(
        plan.local_answer(),
        Some(&LocalAnswer::Direct { status: 500 })
    );
    assert_eq!(plan.flags(), ResponseFlags::NONE);
    assert!(plan.next_attempt(f.t0).is_err());
    // The next rule still routes upstream.
    let plan = f.route(&get("service-c", "/x")).unwrap();
    assert!(plan.local_answer().is_none());
    assert_eq!(counter(&f.engine.metrics().direct_responses), 1);
}

#[test]
fn a_whole_path_rewrite_replaces_the_path_after_a_prefix_match() {
    let rewritten = |whole_path: bool, uri: &str| {
        let mut route = http_route("r", path_prefix("/foo"), to("service-c"));
        route.rewrite = Some(Rewrite {
            uri: Some("/bar".into()),
            whole_path,
            ..Rewrite::default()
        });
        let f = fixture(
            vec![virtual_service(&["service-c"], vec![route])],
            vec![],
            vec![service("service-c", 1, 0)],
        );
        let (mut parts, ()) = Request::get(uri)
            .header("host", "service-c")
            .body(())
            .unwrap()
            .into_parts();
        let info = RequestInfo::from_parts(&parts, 80, "default");
        let plan = f.engine.route(&info, f.t0).unwrap();
        plan.rewrite_request(&mut parts);
        parts.uri.to_string()
    };
    // Gateway API `ReplaceFullPath`.
    assert_eq!(rewritten(true, "/foo/x?q=1"), "/bar?q=1");
    assert_eq!(rewritten(true, "/foo"), "/bar");
    // `ReplacePrefixMatch` (and Istio's `rewrite.uri` on a prefix match).
    assert_eq!(rewritten(false, "/foo/x?q=1"), "/bar/x?q=1");
}
