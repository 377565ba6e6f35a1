//! Connection-pool limits through the kernel redirect and the agent process: the tutorial's
//! circuit-breaker DestinationRule (`tcp.maxConnections: 100`) under more than 100 concurrent
//! requests, and the `tight` subset of `deploy/examples/features/connection-pool.yml` (one
//! connection, one pending request). Each limit's details are tested in process, without root:
//! `mesh-agent/tests/proxy_pool.rs`.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    process::Command,
    time::{Duration, Instant},
};

use mesh_tests::{require_root, Agent, Backend, ConfigDir, Pod, PodProcess, SimNode};
use serde_json::Value;

const UPSTREAM: &str = env!("CARGO_BIN_EXE_upstream");
const TIMEOUT: Duration = Duration::from_secs(120);
const SERVICE_C: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const SERVICE_I: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 90);

fn serve(node: &SimNode, pod: &Pod, name: &str) -> PodProcess {
    let mut command = Command::new(UPSTREAM);
    command.args(["serve", "--listen", "0.0.0.0:8080", "--name", name]);
    let server = node.spawn_in_pod(pod, command).unwrap();
    server
        .stdout()
        .wait_for_json(|line| line["listening"].is_string(), TIMEOUT)
        .unwrap();
    server
}

/// Starts `upstream get` in `pod` with `args`.
fn get(node: &SimNode, pod: &Pod, args: &[&str]) -> PodProcess {
    let mut command = Command::new(UPSTREAM);
    command.arg("get").args(args);
    node.spawn_in_pod(pod, command).unwrap()
}

/// Waits for a client started by [`get`]: one line per response, then the summary.
fn finish(mut client: PodProcess) -> (Vec<Value>, Value) {
    let status = client.finish(TIMEOUT).unwrap();
    assert!(status.success(), "{}", client.stderr().text());
    let mut lines = client.stdout().json_lines();
    let summary = lines.pop().expect("a summary");
    assert_eq!(summary["summary"], true, "{summary}");
    (lines, summary)
}

/// The sum of the agent's `metric` samples whose labels contain every `label="value"`.
fn metric(agent: &Agent, metric: &str, labels: &[&str]) -> f64 {
    let (status, text) = agent.admin_get("/metrics").unwrap();
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter(|line| line.starts_with(&format!("{metric}{{")))
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn the_circuit_breaker_caps_upstream_connections_and_a_tight_pool_refuses_the_excess_with_uo() {
    require_root();
    let node = SimNode::new().unwrap();
    let client = node.add_pod("client").unwrap();
    let c_v1 = node.add_pod("service-c-v1-0").unwrap();
    let c_v2 = node.add_pod("service-c-v2-0").unwrap();
    let tight = node.add_pod("service-i-tight-0").unwrap();
    node.add_host("service-c", SERVICE_C).unwrap();
    node.add_host("service-i", SERVICE_I).unwrap();
    let _servers = [
        serve(&node, &c_v1, "v1"),
        serve(&node, &c_v2, "v2"),
        serve(&node, &tight, "tight"),
    ];
    let config = ConfigDir::new().unwrap();
    let c_backends = [
        Backend {
            pod: &c_v1,
            labels: &[("app", "service-c"), ("version", "v1")],
        },
        Backend {
            pod: &c_v2,
            labels: &[("app", "service-c"), ("version", "v2")],
        },
    ];
    config
        .service("service-c", SERVICE_C, 8080, "http", &c_backends)
        .unwrap();
    config
        .copy_example(
            "circuit-breaker/2-destination-rules.yml",
            "circuit-breaker.yml",
        )
        .unwrap();
    let i_backends = [Backend {
        pod: &tight,
        labels: &[("app", "service-i"), ("pool", "tight")],
    }];
    config
        .service("service-i", SERVICE_I, 8080, "http", &i_backends)
        .unwrap();
    config
        .copy_example("features/connection-pool.yml", "connection-pool.yml")
        .unwrap();
    config
        .write(
            "service-i-tight.yml",
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
             metadata: {name: service-i, namespace: default}\n\
             spec:\n  hosts: [service-i]\n  http:\n\
             \x20 - route: [{destination: {host: service-i, subset: tight}}]\n",
        )
        .unwrap();
    let config_path = config.path().to_str().unwrap().to_owned();
    let agent = Agent::start(&node, &[&client], &["--config", &config_path]).unwrap();

    // 150 requests at once, each on a client connection of its own, each held 1 s upstream:
    // 100 upstream connections carry them all, the other 50 requests wait for one.
    let (lines, summary) = finish(get(
        &node,
        &client,
        &[
            "--url",
            "http://service-c:8080/delay/1000",
            "--count",
            "150",
            "--concurrency",
            "150",
            "--timeout-secs",
            "60",
        ],
    ));
    assert_eq!(summary["by_status"]["200"], 150, "{summary}");
    let connections: BTreeSet<(String, String)> = lines
        .iter()
        .map(|line| {
            let header = |name: &str| line["headers"][name].as_str().unwrap_or("").to_owned();
            (header("x-served-by"), header("x-peer"))
        })
        .collect();
    assert!(
        (50..=100).contains(&connections.len()),
        "{} upstream connections",
        connections.len()
    );

    // The tight subset: one connection (opened by a first request, then idle), one pending.
    let (_, warm) = finish(get(&node, &client, &["--url", "http://service-i:8080/"]));
    assert_eq!(warm["by_status"]["200"], 1, "{warm}");
    let held = get(
        &node,
        &client,
        &[
            "--url",
            "http://service-i:8080/delay/5000",
            "--count",
            "2",
            "--concurrency",
            "2",
            "--timeout-secs",
            "60",
        ],
    );
    // One on the connection, one pending.
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let (refused, summary) = finish(get(
        &node,
        &client,
        &[
            "--url",
            "http://service-i:8080/delay/5000",
            "--count",
            "8",
            "--concurrency",
            "8",
        ],
    ));
    let took = started.elapsed();
    assert_eq!(summary["by_status"]["503"], 8, "{summary}");
    for line in &refused {
        assert_eq!(line["headers"]["x-mesh-response-flags"], "UO", "{line}");
    }
    assert!(
        took < Duration::from_millis(2500),
        "the excess waited: {took:?}"
    );
    let (_, summary) = finish(held);
    assert_eq!(summary["by_status"]["200"], 2, "{summary}");

    let service_i = "destination_service=\"service-i.default.svc.cluster.local\"";
    assert_eq!(
        metric(
            &agent,
            "istio_requests_total",
            &[service_i, "response_flags=\"UO\"", "response_code=\"503\""]
        ),
        8.0
    );
    assert_eq!(
        metric(&agent, "mesh_pool_overflows_total", &[service_i]),
        8.0
    );
}
