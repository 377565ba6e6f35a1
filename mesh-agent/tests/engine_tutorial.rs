//! The tutorial ("Service Mesh for Developers"), end to end through the engine: its YAML files
//! from `deploy/examples/`, parsed by the config loader, against a scripted `service-c`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_agent::config;
use mesh_agent::engine::registry::{Endpoint, Registry, Service, ServicePort};
use mesh_agent::engine::{Engine, EngineSettings, Outcome, RequestInfo, Verdict};
use mesh_agent::identity::{ServiceIdentity, WorkloadIdentity};

fn example(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(path)
}

/// `service-c` with `v1` pods 10.0.1.x and `v2` pods 10.0.2.x, port 80 → 8080.
fn registry(v1: u8, v2: u8) -> Registry {
    let pod = |v: u8, i: u8| Endpoint {
        ip: IpAddr::V4(Ipv4Addr::new(10, 0, v, i)),
        labels: BTreeMap::from([("version".to_owned(), format!("v{v}"))]),
        workload: Some(Arc::new(WorkloadIdentity::from_pod_labels(
            format!("service-c-v{v}"),
            "default",
            &BTreeMap::new(),
        ))),
    };
    Registry {
        services: vec![Arc::new(Service {
            identity: Arc::new(ServiceIdentity::new("service-c", "default")),
            ports: vec![ServicePort {
                port: 80,
                target_port: 8080,
            }],
            endpoints: (1..=v1)
                .map(|i| pod(1, i))
                .chain((1..=v2).map(|i| pod(2, i)))
                .collect(),
        })],
    }
}

fn engine(files: &[&str], registry: &Registry, now: Instant) -> Engine {
    let paths: Vec<PathBuf> = files.iter().map(|f| example(f)).collect();
    let loaded = config::load_paths(&paths);
    assert!(loaded.is_ok(), "{:?}", loaded.diagnostics);
    Engine::new(&loaded.config, registry, EngineSettings::default(), now)
}

/// One request from service-b; `upstream` answers per endpoint. Returns the final status and
/// the endpoints tried.
fn call(
    engine: &Engine,
    now: Instant,
    upstream: impl Fn(SocketAddr) -> u16,
) -> (u16, Vec<SocketAddr>) {
    let req = http::Request::get("/")
        .header("host", "service-c")
        .body(())
        .unwrap();
    let (parts, ()) = req.into_parts();
    let info = RequestInfo::from_parts(&parts, 80, "default");
    let mut plan = engine.route(&info, now).unwrap();
    let mut now = now;
    let mut tried = Vec::new();
    loop {
        let attempt = match plan.next_attempt(now) {
            Ok(a) => a,
            Err(e) => return (e.status(), tried),
        };
        tried.push(attempt.endpoint());
        let status = upstream(attempt.endpoint());
        match plan.report(attempt, Outcome::status(status), now) {
            Verdict::Forward => return (status, tried),
            Verdict::RetryAt(at) => now = at,
            Verdict::Fail(e) => return (e.status(), tried),
        }
    }
}

#[test]
fn canary_steps_send_exact_shares_to_each_version() {
    let registry = registry(1, 1);
    let t0 = Instant::now();
    let steps = [
        ("canary/1-vs-v1.yml", 100),
        ("canary/2-vs-v1_and_v2_90_10.yml", 90),
        ("canary/3-vs-v1_and_v2_50_50.yml", 50),
        ("canary/4-vs-v2.yml", 0),
    ];
    for (file, v1_percent) in steps {
        let engine = engine(&["destination-rules.yml", file], &registry, t0);
        let to_v1 = (0..1_000)
            .filter(|_| call(&engine, t0, |_| 200).1[0].ip() == Ipv4Addr::new(10, 0, 1, 1))
            .count();
        assert_eq!(to_v1, v1_percent * 10, "{file}");
    }
}

/// The circuit-breaker section: v1 scaled to 0, v2 to 2 pods, one of which crashes.
#[test]
fn circuit_breaker_ejects_the_crashed_pod_and_retries_hide_the_errors() {
    let registry = registry(0, 2);
    let crashed = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 2, 1)), 8080);
    let upstream = |ep: SocketAddr| if ep == crashed { 500 } else { 200 };
    let t0 = Instant::now();
    // A request every 500 ms for 30 s, as the tutorial's curl loop.
    let times = (0..60).map(|i| t0 + Duration::from_millis(500 * i));

    // Step 1 (no rules): round-robin-ish traffic, about half the calls fail.
    let plain = engine(&["circuit-breaker/1-vs.yml"], &registry, t0);
    let failures = times
        .clone()
        .filter(|&t| call(&plain, t, upstream).0 == 500)
        .count();
    assert!(failures > 10, "{failures}");

    // Step 2 (circuit breaker): the crashed pod is ejected on its first 500 and comes back
    // for one request after 10 s, then 20 s: three errors in 30 s.
    let breaker = engine(
        &[
            "circuit-breaker/1-vs.yml",
            "circuit-breaker/2-destination-rules.yml",
        ],
        &registry,
        t0,
    );
    let failures = times
        .clone()
        .filter(|&t| call(&breaker, t, upstream).0 == 500)
        .count();
    assert!((1..=3).contains(&failures), "{failures}");

    // Step 3 (plus retries): "All errors are gone."
    let retrying = engine(
        &[
            "circuit-breaker/2-destination-rules.yml",
            "circuit-breaker/3-vs-retry.yml",
        ],
        &registry,
        t0,
    );
    let mut crashed_tries = 0;
    for t in times {
        let (status, tried) = call(&retrying, t, upstream);
        assert_eq!(status, 200);
        crashed_tries += tried.iter().filter(|&&e| e == crashed).count();
    }
    // Back at 10 s and at 30 s at the earliest: at most two tries reach the crashed pod
    // after the first one.
    assert!(crashed_tries <= 3, "{crashed_tries}");
}
