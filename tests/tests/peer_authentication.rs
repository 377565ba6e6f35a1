//! PeerAuthentication and inbound capture, end to end on two simulated nodes in local mode with
//! mutual TLS. Node 1 runs two pods in the mesh: `strict-1` (a workload PeerAuthentication
//! makes it STRICT, except its port 9090, PERMISSIVE by `portLevelMtls`) and `open-1`
//! (PERMISSIVE, Istio's default; an AuthorizationPolicy denies its `/secret` to everyone).
//! Node 2 runs `outsider`, a pod not in the mesh, which dials the pods' addresses directly (the
//! simulated cluster has no kube-proxy), and `service-a`, in the mesh, which calls them through
//! its agent and the tunnel.
//!
//! What arrives at a pod in the mesh is captured by the kernel (`sk_lookup` on the pod's
//! namespace) and handed to the agent's inbound listener in the pod, which judges it; plaintext
//! to a STRICT port is refused. The destination's agent is then killed: the pinned program
//! stays, so STRICT keeps refusing while PERMISSIVE reaches the app directly, and both are
//! captured again once an agent is back, with no pod restarted.

use std::{net::Ipv4Addr, process::Command, sync::Arc, time::Duration};

use mesh_tests::{
    agent::sum_samples, require_root, Agent, Backend, ConfigDir, Pod, PodProcess, SimNetwork,
    SimNode, IN_MESH,
};
use serde_json::{json, Value};

const UPSTREAM: &str = env!("CARGO_BIN_EXE_upstream");
const STRICT_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 90);
const OPEN_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 91);
const PORT: u16 = 8080;
/// `strict-1`'s second port, PERMISSIVE by `portLevelMtls`.
const OPEN_PORT: u16 = 9090;
const TIMEOUT: Duration = Duration::from_secs(30);

const POLICIES: &str = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: default}
spec:
  selector: {matchLabels: {app: strict}}
  mtls: {mode: STRICT}
  portLevelMtls:
    9090: {mode: PERMISSIVE}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-secrets, namespace: default}
spec:
  selector: {matchLabels: {app: open}}
  action: DENY
  rules: [{to: [{operation: {paths: ['/secret']}}]}]
";

struct Cluster {
    _network: SimNetwork,
    nodes: Vec<Arc<SimNode>>,
    strict: Pod,
    open: Pod,
    outsider: Pod,
    service_a: Pod,
    _servers: Vec<PodProcess>,
    agents: Vec<Agent>,
    config: ConfigDir,
    ca_dir: std::path::PathBuf,
    _ca: tempfile::TempDir,
}

fn upstream(args: &[&str]) -> Command {
    let mut command = Command::new(UPSTREAM);
    command.args(args);
    command
}

fn pod_object(pod: &Pod, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, \
         labels: {{app: {app}, sidecarless.io/mesh: enabled}}}}\n\
         spec: {{serviceAccountName: {app}}}\nstatus: {{podIP: {ip}}}\n",
        name = pod.name(),
        ip = pod.ip()
    )
}

fn serve(node: &SimNode, pod: &Pod, port: u16) -> PodProcess {
    let listen = format!("0.0.0.0:{port}");
    let args = ["serve", "--listen", &listen, "--name", pod.name(), "--log"];
    let server = node.spawn_in_pod(pod, upstream(&args)).unwrap();
    server
        .stdout()
        .wait_for_json(|line| line["listening"].is_string(), TIMEOUT)
        .unwrap();
    server
}

fn cluster() -> Cluster {
    require_root();
    let network = SimNetwork::new(2).unwrap();
    let nodes: Vec<Arc<SimNode>> = network.nodes().to_vec();
    let strict = nodes[0].add_pod("strict-1").unwrap();
    let open = nodes[0].add_pod("open-1").unwrap();
    let outsider = nodes[1].add_pod("outsider").unwrap();
    let service_a = nodes[1].add_pod("service-a").unwrap();
    network.add_host("strict", STRICT_VIP).unwrap();
    network.add_host("open", OPEN_VIP).unwrap();
    let servers = vec![
        serve(&nodes[0], &strict, PORT),
        serve(&nodes[0], &strict, OPEN_PORT),
        serve(&nodes[0], &open, PORT),
    ];
    let config = ConfigDir::new().unwrap();
    for (name, vip, pod) in [("strict", STRICT_VIP, &strict), ("open", OPEN_VIP, &open)] {
        let labels = [("app", name), IN_MESH];
        let backends = [Backend {
            pod,
            labels: &labels,
        }];
        config.service(name, vip, PORT, "http", &backends).unwrap();
    }
    let pods = [
        pod_object(&strict, "strict"),
        pod_object(&open, "open"),
        pod_object(&service_a, "service-a"),
    ];
    config.write("pods.yml", &pods.join("---\n")).unwrap();
    config.write("policies.yml", POLICIES).unwrap();
    let ca = tempfile::Builder::new()
        .prefix("mesh-ca-")
        .tempdir()
        .unwrap();
    let ca_dir = ca.path().join("ca");
    mesh_tests::ca_init(&mesh_tests::agent_binary().unwrap(), &ca_dir).unwrap();
    let mut cluster = Cluster {
        _network: network,
        nodes,
        strict,
        open,
        outsider,
        service_a,
        _servers: servers,
        agents: Vec::new(),
        config,
        ca_dir,
        _ca: ca,
    };
    let destination = cluster.start_destination_agent();
    let source = Agent::start(&cluster.nodes[1], &[&cluster.service_a], &cluster.args()).unwrap();
    cluster.agents = vec![destination, source];
    cluster
}

impl Cluster {
    fn args(&self) -> Vec<&str> {
        vec![
            "--config",
            self.config.path().to_str().unwrap(),
            "--ca",
            self.ca_dir.to_str().unwrap(),
        ]
    }

    fn start_destination_agent(&self) -> Agent {
        Agent::start(&self.nodes[0], &[&self.strict, &self.open], &self.args()).unwrap()
    }

    /// Three `GET path` from `pod` on node 2 to `url`'s host; returns the statuses (`"0"`: the
    /// connection failed).
    fn gets(&self, pod: &Pod, url: &str) -> Value {
        let mut args = vec![
            "get",
            "--url",
            url,
            "--count",
            "3",
            "--timeout-secs",
            "5",
            "--quiet",
        ];
        args.extend(["--method", "GET"]);
        let mut get = self.nodes[1].spawn_in_pod(pod, upstream(&args)).unwrap();
        get.finish(TIMEOUT).unwrap();
        let summary = get
            .stdout()
            .json_lines()
            .into_iter()
            .rfind(|line| line["summary"] == true)
            .unwrap_or_else(|| panic!("a summary: {}", get.stderr().text()));
        let mut statuses = summary["by_status"].clone();
        if summary["errors"].as_u64().unwrap_or(0) > 0 {
            statuses["0"] = summary["errors"].clone();
        }
        statuses
    }

    /// The outsider, dialling `pod`'s address directly.
    fn outsider_gets(&self, pod: &Pod, port: u16, path: &str) -> Value {
        self.gets(&self.outsider, &format!("http://{}:{port}{path}", pod.ip()))
    }

    /// What the kubelet does: an HTTP GET from the node's own address to the pod's.
    fn probe_from_node(&self, pod: &Pod) -> u16 {
        let address = std::net::SocketAddr::from((pod.ip(), PORT));
        self.nodes[0]
            .run_on_node(move || {
                mesh_tests::http::request(address, "GET", "/", &[], "")
                    .map_or(0, |(status, _)| status)
            })
            .unwrap()
    }

    fn inbound_decisions(&self, agent: &Agent, decision: &str) -> f64 {
        let (status, metrics) = agent.admin_get("/metrics").unwrap();
        assert_eq!(status, 200);
        sum_samples(
            &metrics,
            "mesh_redirect_decisions_total",
            &[("decision", decision)],
        )
    }
}

#[test]
fn strict_refuses_plaintext_permissive_captures_it_and_both_hold_while_the_agent_is_down() {
    let mut cluster = cluster();
    let (strict, open) = (&cluster.strict, &cluster.open);

    // PERMISSIVE: plaintext is taken, and judged by the pod's AuthorizationPolicies.
    assert_eq!(cluster.outsider_gets(open, PORT, "/"), json!({"200": 3}));
    assert_eq!(
        cluster.outsider_gets(open, PORT, "/secret"),
        json!({"403": 3}),
        "plaintext is captured and judged at the destination"
    );
    // STRICT: refused, except the port portLevelMtls makes PERMISSIVE.
    assert_eq!(
        cluster.outsider_gets(strict, PORT, "/"),
        json!({"0": 3}),
        "plaintext to a STRICT port is refused"
    );
    assert_eq!(
        cluster.outsider_gets(strict, OPEN_PORT, "/"),
        json!({"200": 3})
    );
    // The mesh's own traffic arrives through the tunnel, mutual TLS: STRICT takes it.
    assert_eq!(
        cluster.gets(&cluster.service_a, &format!("http://strict:{PORT}/")),
        json!({"200": 3})
    );
    // The kubelet's probes come from the node: not captured, whatever the mode.
    assert_eq!(cluster.probe_from_node(strict), 200);
    let destination = &cluster.agents[0];
    // A refused client retries each request on a new connection; the others keep theirs.
    assert!(cluster.inbound_decisions(destination, "inbound_refused") >= 3.0);
    assert!(cluster.inbound_decisions(destination, "inbound_captured") >= 3.0);
    let (_, metrics) = destination.admin_get("/metrics").unwrap();
    let plaintext_in = sum_samples(
        &metrics,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("connection_security_policy", "none"),
            ("destination_app", "open"),
        ],
    );
    assert!(plaintext_in >= 2.0, "{metrics}");
    // Judged per request (its policy reads paths): each reported by the destination.
    for (code, count) in [("200", 3.0), ("403", 3.0)] {
        let requests = sum_samples(
            &metrics,
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("destination_app", "open"),
                ("response_code", code),
                ("connection_security_policy", "none"),
            ],
        );
        assert_eq!(requests, count, "{code}: {metrics}");
    }
    // No policy for `strict-1`: its HTTP is served all the same, so that the destination
    // reports each request: the outsider's in plaintext to port 9090, which no service has,
    // and service-a's through the tunnel to port 8080, service `strict`'s.
    for (security, service) in [("none", "unknown"), ("mutual_tls", "strict")] {
        let requests = sum_samples(
            &metrics,
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("destination_app", "strict"),
                ("destination_service_name", service),
                ("response_code", "200"),
                ("connection_security_policy", security),
            ],
        );
        assert_eq!(requests, 3.0, "{security}: {metrics}");
    }

    // The destination's agent dies: the pinned capture stays.
    cluster.agents[0]
        .process()
        .signal(libc::SIGKILL)
        .expect("killing the agent");
    cluster.agents[0]
        .process()
        .wait_timeout(TIMEOUT)
        .unwrap()
        .expect("the agent exits");
    let (strict, open) = (&cluster.strict, &cluster.open);
    assert_eq!(
        cluster.outsider_gets(strict, PORT, "/"),
        json!({"0": 3}),
        "STRICT still refuses plaintext with no agent: fail-closed"
    );
    assert_eq!(
        cluster.outsider_gets(open, PORT, "/secret"),
        json!({"200": 3}),
        "PERMISSIVE reaches the app directly with no agent: fail-open"
    );
    assert_eq!(cluster.probe_from_node(strict), 200);

    // An agent is back: both are captured again; the pods never restarted.
    let back = cluster.start_destination_agent();
    cluster.agents[0] = back;
    let (strict, open) = (&cluster.strict, &cluster.open);
    assert_eq!(
        cluster.outsider_gets(open, PORT, "/secret"),
        json!({"403": 3}),
        "captured and judged again"
    );
    assert_eq!(cluster.outsider_gets(strict, PORT, "/"), json!({"0": 3}));
    assert_eq!(
        cluster.gets(&cluster.service_a, &format!("http://strict:{PORT}/")),
        json!({"200": 3})
    );
    assert_eq!(cluster.probe_from_node(strict), 200);

    // A graceful handover: the successor takes the inbound listeners and the pins over.
    let successor = cluster.agents[0]
        .successor(
            &cluster.nodes[0],
            &mesh_tests::agent_binary().unwrap(),
            TIMEOUT,
        )
        .unwrap();
    let mut predecessor = std::mem::replace(&mut cluster.agents[0], successor);
    predecessor.process().stop(TIMEOUT).unwrap();
    let (strict, open) = (&cluster.strict, &cluster.open);
    assert_eq!(
        cluster.outsider_gets(open, PORT, "/secret"),
        json!({"403": 3}),
        "the successor captures and judges"
    );
    assert_eq!(cluster.outsider_gets(strict, PORT, "/"), json!({"0": 3}));
    assert!(cluster.inbound_decisions(&cluster.agents[0], "inbound_captured") >= 1.0);

    // `open-1` leaves the mesh while no agent runs: the next agent, which serves `strict-1`
    // only, removes its capture, so nothing of the mesh stands in its way any more.
    cluster.agents[0].process().signal(libc::SIGKILL).unwrap();
    cluster.agents[0].process().wait_timeout(TIMEOUT).unwrap();
    // The captures pinned on the node's bpffs (beside the kernel's own `*.debug` files).
    let pins = |cluster: &Cluster| {
        std::fs::read_dir(cluster.nodes[0].bpffs_dir())
            .unwrap()
            .filter(|entry| {
                let name = entry.as_ref().unwrap().file_name();
                name.to_string_lossy().starts_with("netns-")
            })
            .count()
    };
    assert_eq!(pins(&cluster), 2, "both pods' captures outlived the agent");
    cluster.agents[0] =
        Agent::start(&cluster.nodes[0], &[&cluster.strict], &cluster.args()).unwrap();
    assert_eq!(
        pins(&cluster),
        1,
        "the capture of the pod no longer enrolled went"
    );
    let (strict, open) = (&cluster.strict, &cluster.open);
    assert_eq!(
        cluster.outsider_gets(open, PORT, "/secret"),
        json!({"200": 3})
    );
    assert_eq!(cluster.outsider_gets(strict, PORT, "/"), json!({"0": 3}));
}

/// The kernel's `INBOUND_POLICY` map holds every captured pod's port modes on the node
/// (`mesh_common::INBOUND_POLICY_CAPACITY` entries). A PeerAuthentication with more ports than
/// it has room for is accepted as config, but the pod's kernel entries cannot take it: the
/// agent says so, naming the map, and the pod keeps the policy it had (still served); what the
/// failed write had put in the map is taken out again, so the next change still fits and the
/// kernel enforces it.
#[test]
fn a_policy_the_kernel_map_cannot_hold_leaves_the_pod_as_it_was_and_the_map_with_room() {
    let cluster = cluster();
    let (destination, open) = (&cluster.agents[0], &cluster.open);
    assert_eq!(cluster.outsider_gets(open, PORT, "/"), json!({"200": 3}));

    let capacity = mesh_common::INBOUND_POLICY_CAPACITY as u16;
    let ports: Vec<String> = (20_000..20_000 + capacity)
        .map(|port| format!("{port}: {{mode: STRICT}}"))
        .collect();
    let huge = format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {{name: many-ports, namespace: default}}\n\
         spec:\n  selector: {{matchLabels: {{app: open}}}}\n  mtls: {{mode: PERMISSIVE}}\n  \
         portLevelMtls: {{{}}}\n",
        ports.join(", ")
    );
    cluster.config.write("many-ports.yml", &huge).unwrap();
    mesh_tests::wait_for("the agent to say the map is full", TIMEOUT, || {
        let text = destination.stderr_text();
        Ok(text
            .lines()
            .any(|line| {
                line.contains("cannot update what plaintext meets")
                    && line.contains("INBOUND_POLICY")
            })
            .then_some(()))
    })
    .unwrap();
    assert_eq!(
        cluster.outsider_gets(open, PORT, "/"),
        json!({"200": 3}),
        "the pod keeps its PERMISSIVE port 8080"
    );

    // A change that fits: port 8080 STRICT, an entry of its own. The kernel refuses it (not
    // the agent after capturing it), which it could not if the failed write had left its
    // entries behind and the map full.
    let refused_before = cluster.inbound_decisions(destination, "inbound_refused");
    let strict_8080 = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
                       metadata: {name: many-ports, namespace: default}\n\
                       spec:\n  selector: {matchLabels: {app: open}}\n  \
                       mtls: {mode: PERMISSIVE}\n  portLevelMtls: {8080: {mode: STRICT}}\n";
    cluster.config.write("many-ports.yml", strict_8080).unwrap();
    mesh_tests::wait_for("the kernel to refuse plaintext to open-1", TIMEOUT, || {
        let refused = cluster.inbound_decisions(destination, "inbound_refused") - refused_before;
        Ok(
            (cluster.outsider_gets(open, PORT, "/") == json!({"0": 3}) && refused >= 3.0)
                .then_some(()),
        )
    })
    .unwrap();
}
