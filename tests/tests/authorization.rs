//! AuthorizationPolicy at the destination, end to end on three simulated nodes in local mode
//! with mutual TLS: `service-b`'s pod on node 2 admits only `service-a`'s identity (node 1),
//! and only `GET` on two paths; `intruder` (node 3) is in the mesh with an identity of its own.
//! Requests go through both agents; the destination's agent judges each one on the identity
//! its tunnel proved and on the HTTP it delivers, with no proxy beside the agents.

use std::{net::Ipv4Addr, process::Command, sync::Arc, time::Duration};

use mesh_tests::{
    agent::sum_samples, require_root, Agent, Backend, ConfigDir, Pod, PodProcess, SimNetwork,
    SimNode, IN_MESH,
};
use serde_json::{json, Value};

const UPSTREAM: &str = env!("CARGO_BIN_EXE_upstream");
const PROBE: &str = env!("CARGO_BIN_EXE_probe");
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 88);
/// A TCP service (an echo server) beside service-b: its policy can only judge connections.
const DB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 89);
const DB_PORT: u16 = 7000;
const PORT: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(30);
const SERVICE_A: &str = "spiffe://cluster.local/ns/default/sa/service-a";

/// The tutorial's shape: A may `GET /` and `/private` of B, a DENY on `/private` wins over
/// that, and an AUDIT policy in the root namespace marks every `GET /` in the mesh.
const POLICIES: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: service-b-from-a, namespace: default}
spec:
  selector: {matchLabels: {app: service-b}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/service-a]}}]
    to: [{operation: {methods: [GET], paths: ['/', '/private']}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: nothing-private, namespace: default}
spec:
  selector: {matchLabels: {app: service-b}}
  action: DENY
  rules: [{to: [{operation: {paths: ['/private*']}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-root, namespace: istio-system}
spec:
  action: AUDIT
  rules: [{to: [{operation: {paths: ['/']}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-from-a, namespace: default}
spec:
  selector: {matchLabels: {app: db}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/service-a]}}]
";

struct Cluster {
    _network: SimNetwork,
    nodes: Vec<Arc<SimNode>>,
    service_a: Pod,
    intruder: Pod,
    server: PodProcess,
    _db: PodProcess,
    agents: Vec<Agent>,
    _config: ConfigDir,
    _ca: tempfile::TempDir,
}

fn upstream(args: &[&str]) -> Command {
    let mut command = Command::new(UPSTREAM);
    command.args(args);
    command
}

fn pod_object(pod: &Pod, account: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, \
         labels: {{app: {account}, sidecarless.io/mesh: enabled}}}}\n\
         spec: {{serviceAccountName: {account}}}\nstatus: {{podIP: {ip}}}\n",
        name = pod.name(),
        ip = pod.ip()
    )
}

fn cluster() -> Cluster {
    require_root();
    let network = SimNetwork::new(3).unwrap();
    let nodes: Vec<Arc<SimNode>> = network.nodes().to_vec();
    let service_a = nodes[0].add_pod("service-a").unwrap();
    let b = nodes[1].add_pod("service-b-1").unwrap();
    let intruder = nodes[2].add_pod("intruder").unwrap();
    let db_pod = nodes[1].add_pod("db-1").unwrap();
    network.add_host("service-b", VIP).unwrap();
    let listen = format!("0.0.0.0:{DB_PORT}");
    let mut echo = Command::new(PROBE);
    echo.args(["echo-server", "--listen", &listen]);
    let db = nodes[1].spawn_in_pod(&db_pod, echo).unwrap();
    db.stdout()
        .wait_for_json(|line| line["listening"].is_string(), TIMEOUT)
        .unwrap();
    let args = [
        "serve",
        "--listen",
        "0.0.0.0:8080",
        "--name",
        "service-b-1",
        "--log",
    ];
    let server = nodes[1].spawn_in_pod(&b, upstream(&args)).unwrap();
    server
        .stdout()
        .wait_for_json(|line| line["listening"].is_string(), TIMEOUT)
        .unwrap();
    let config = ConfigDir::new().unwrap();
    let labels = [("app", "service-b"), IN_MESH];
    let backends = [Backend {
        pod: &b,
        labels: &labels,
    }];
    config
        .service("service-b", VIP, PORT, "http", &backends)
        .unwrap();
    let db_labels = [("app", "db"), IN_MESH];
    let db_backends = [Backend {
        pod: &db_pod,
        labels: &db_labels,
    }];
    config
        .service("db", DB_VIP, DB_PORT, "tcp", &db_backends)
        .unwrap();
    let clients = format!(
        "{}---\n{}",
        pod_object(&service_a, "service-a"),
        pod_object(&intruder, "intruder")
    );
    config.write("clients.yml", &clients).unwrap();
    config.write("policies.yml", POLICIES).unwrap();
    let ca = tempfile::Builder::new()
        .prefix("mesh-ca-")
        .tempdir()
        .unwrap();
    let ca_dir = ca.path().join("ca");
    mesh_tests::ca_init(&mesh_tests::agent_binary().unwrap(), &ca_dir).unwrap();
    let config_dir = config.path().to_str().unwrap().to_owned();
    let pods: [&[&Pod]; 3] = [&[&service_a], &[&b, &db_pod], &[&intruder]];
    let agents = nodes
        .iter()
        .zip(pods)
        .map(|(node, pods)| {
            let args = [
                "--config",
                config_dir.as_str(),
                "--ca",
                ca_dir.to_str().unwrap(),
            ];
            Agent::start(node, pods, &args).unwrap()
        })
        .collect();
    Cluster {
        _network: network,
        nodes,
        service_a,
        intruder,
        server,
        _db: db,
        agents,
        _config: config,
        _ca: ca,
    }
}

impl Cluster {
    /// `count` requests from `pod` (on node `node`) to service-b; returns the statuses seen.
    fn requests(
        &self,
        node: usize,
        pod: &Pod,
        method: &str,
        path: &str,
        headers: &[&str],
    ) -> Value {
        let url = format!("http://service-b:{PORT}{path}");
        let mut args = vec![
            "get",
            "--url",
            url.as_str(),
            "--count",
            "5",
            "--method",
            method,
            "--timeout-secs",
            "10",
            "--quiet",
        ];
        for header in headers {
            args.extend(["--header", header]);
        }
        let mut get = self.nodes[node].spawn_in_pod(pod, upstream(&args)).unwrap();
        get.finish(TIMEOUT).unwrap();
        let summary = get
            .stdout()
            .json_lines()
            .into_iter()
            .rfind(|line| line["summary"] == true)
            .unwrap_or_else(|| panic!("a summary: {}", get.stderr().text()));
        summary["by_status"].clone()
    }

    /// The requests service-b's app received, as it logged them.
    fn received(&self) -> Vec<Value> {
        self.server
            .stdout()
            .json_lines()
            .into_iter()
            .filter(|line| line["method"].is_string())
            .collect()
    }

    fn destination(&self) -> &Agent {
        &self.agents[1]
    }
}

#[test]
fn only_service_a_may_get_b_a_deny_wins_audit_passes_and_forged_identities_gain_nothing() {
    let cluster = cluster();
    let a = &cluster.service_a;
    assert_eq!(
        cluster.requests(0, a, "GET", "/", &[]),
        json!({"200": 5}),
        "A may GET /"
    );
    assert_eq!(
        cluster.requests(0, a, "POST", "/", &[]),
        json!({"403": 5}),
        "an L7 rule: A may not POST"
    );
    assert_eq!(
        cluster.requests(0, a, "GET", "/private", &[]),
        json!({"403": 5}),
        "the DENY wins over the ALLOW"
    );
    assert_eq!(
        cluster.requests(0, a, "GET", "/./private", &[]),
        json!({"403": 5}),
        "the path is judged normalized"
    );
    let intruder = &cluster.intruder;
    assert_eq!(
        cluster.requests(2, intruder, "GET", "/", &[]),
        json!({"403": 5}),
        "another workload is denied"
    );
    let forged = format!("x-forwarded-client-cert: By=spiffe://x;URI={SERVICE_A}");
    assert_eq!(
        cluster.requests(2, intruder, "GET", "/", &[&forged]),
        json!({"403": 5}),
        "a forged identity header gains nothing"
    );

    let received = cluster.received();
    assert_eq!(
        received.len(),
        5,
        "only A's GETs reached the app: {received:?}"
    );
    for request in &received {
        assert_eq!(request["method"], "GET");
        assert_eq!(request["path"], "/");
        let xfcc = request["xfcc"].as_str().unwrap_or_default();
        assert!(
            xfcc.ends_with(&format!(";URI={SERVICE_A}")),
            "the app is told who the tunnel proved: {request}"
        );
    }
    let destination = cluster.destination();
    let (status, metrics) = destination.admin_get("/metrics").unwrap();
    assert_eq!(status, 200);
    let denied = sum_samples(
        &metrics,
        "mesh_authorization_denials_total",
        &[("layer", "request")],
    );
    assert_eq!(denied, 25.0, "{metrics}");
    // The destination reports each request it judged, with the identity the tunnel proved.
    let reported = |code: &str, principal: &str| {
        sum_samples(
            &metrics,
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("response_code", code),
                ("source_principal", principal),
                ("connection_security_policy", "mutual_tls"),
            ],
        )
    };
    assert_eq!(reported("200", SERVICE_A), 5.0, "{metrics}");
    assert_eq!(reported("403", SERVICE_A), 15.0, "{metrics}");
    let audited = destination
        .stderr_text()
        .lines()
        .filter(|line| {
            line.contains("authorization audit") && line.contains("istio-system/audit-root")
        })
        .count();
    assert!(audited >= 5, "{}", destination.stderr_text());
    // The source's agent passed the 403s on as answers: not retried, not an outlier.
    let (_, source) = cluster.agents[0].admin_get("/metrics").unwrap();
    let forbidden = sum_samples(
        &source,
        "istio_requests_total",
        &[("reporter", "source"), ("response_code", "403")],
    );
    assert_eq!(forbidden, 15.0, "{source}");
}

#[test]
fn a_tcp_connection_denied_is_reset_and_one_allowed_is_carried() {
    let cluster = cluster();
    let echo = |node: usize, pod: &Pod| {
        let to = format!("{DB_VIP}:{DB_PORT}");
        let mut client = Command::new(PROBE);
        client.args([
            "echo-client",
            "--to",
            &to,
            "--conns",
            "3",
            "--bytes",
            "100000",
            "--timeout-secs",
            "10",
        ]);
        let mut process = cluster.nodes[node].spawn_in_pod(pod, client).unwrap();
        process.finish(TIMEOUT).unwrap();
        process
            .stdout()
            .json_lines()
            .into_iter()
            .rfind(|line| line["summary"] == true)
            .expect("a summary")
    };
    let allowed = echo(0, &cluster.service_a);
    assert_eq!(allowed["ok"], 3, "A's connections are carried: {allowed}");
    let denied = echo(2, &cluster.intruder);
    assert_eq!(
        denied["failed"], 3,
        "the intruder's connections are reset: {denied}"
    );
    let (_, metrics) = cluster.destination().admin_get("/metrics").unwrap();
    let reset = sum_samples(
        &metrics,
        "mesh_authorization_denials_total",
        &[("layer", "connection")],
    );
    assert_eq!(reset, 3.0, "{metrics}");
}
