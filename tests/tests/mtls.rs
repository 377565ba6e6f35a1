//! Cross-node traffic over mutual TLS, end to end on three simulated nodes in local mode: one
//! agent per node (`--config` one shared folder, `--ca` one CA made by `mesh-agent ca init`), a
//! client on node 1 calling a service whose pods are on nodes 1, 2 and 3. Every request
//! succeeds; a capture of the underlay finds none of the requests' bytes in plaintext, only
//! tunnel traffic to port 15008 (and, as the control, the same traffic through agents without
//! `--ca` is found in plaintext); the destination agents report what they received with the
//! client's identity; and a destination agent killed is a failed connect that retries hide.

use std::{
    net::Ipv4Addr,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_tests::{
    agent::sum_samples,
    capture::{Capture, Captured},
    require_root, Agent, Backend, ConfigDir, Pod, PodProcess, SimNetwork, SimNode, IN_MESH,
};
use serde_json::Value;

const UPSTREAM: &str = env!("CARGO_BIN_EXE_upstream");
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 77);
const PORT: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(30);
/// Requests per batch: with three endpoints picked at random, each is chosen (all on two has a
/// chance of 3·(2/3)³⁰, about 10⁻⁵).
const REQUESTS: &str = "30";
const CLIENT_IDENTITY: &str = "spiffe://cluster.local/ns/default/sa/client";

fn upstream(args: &[&str]) -> Command {
    let mut command = Command::new(UPSTREAM);
    command.args(args);
    command
}

/// Three nodes; `client` and `web-1` on node 1, `web-2` on node 2, `web-3` on node 3, each web
/// pod running `upstream serve --log`, all in the mesh; one agent per node.
struct Cluster {
    network: SimNetwork,
    nodes: Vec<Arc<SimNode>>,
    client: Pod,
    servers: Vec<PodProcess>,
    agents: Vec<Agent>,
    _config: ConfigDir,
    _ca: Option<tempfile::TempDir>,
}

fn cluster(tunnel: bool) -> Cluster {
    require_root();
    let network = SimNetwork::new(3).unwrap();
    let nodes: Vec<Arc<SimNode>> = network.nodes().to_vec();
    let client = nodes[0].add_pod("client").unwrap();
    let web: Vec<Pod> = nodes
        .iter()
        .enumerate()
        .map(|(index, node)| node.add_pod(&format!("web-{}", index + 1)).unwrap())
        .collect();
    network.add_host("web", VIP).unwrap();
    let servers: Vec<PodProcess> = web
        .iter()
        .zip(&nodes)
        .map(|(pod, node)| {
            let args = [
                "serve",
                "--listen",
                "0.0.0.0:8080",
                "--name",
                pod.name(),
                "--log",
            ];
            let server = node.spawn_in_pod(pod, upstream(&args)).unwrap();
            server
                .stdout()
                .wait_for_json(|line| line["listening"].is_string(), TIMEOUT)
                .unwrap();
            server
        })
        .collect();
    let config = ConfigDir::new().unwrap();
    let labels = [("app", "web"), IN_MESH];
    let backends: Vec<Backend> = web
        .iter()
        .map(|pod| Backend {
            pod,
            labels: &labels,
        })
        .collect();
    config.service("web", VIP, PORT, "http", &backends).unwrap();
    config
        .write(
            "client.yml",
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: default, \
                 labels: {{app: client, sidecarless.io/mesh: enabled}}}}\n\
                 spec: {{serviceAccountName: client}}\nstatus: {{podIP: {}}}\n",
                client.ip()
            ),
        )
        .unwrap();
    let ca = tunnel.then(|| {
        let dir = tempfile::Builder::new()
            .prefix("mesh-ca-")
            .tempdir()
            .unwrap();
        mesh_tests::ca_init(&mesh_tests::agent_binary().unwrap(), &dir.path().join("ca")).unwrap();
        dir
    });
    let ca_dir = ca.as_ref().map(|dir| dir.path().join("ca"));
    let config_dir = config.path().to_str().unwrap().to_owned();
    let agents = nodes
        .iter()
        .enumerate()
        .map(|(index, node)| {
            let mut pods = vec![&web[index]];
            if index == 0 {
                pods.push(&client);
            }
            let mut args = vec!["--config", config_dir.as_str()];
            if let Some(dir) = &ca_dir {
                args.extend(["--ca", dir.to_str().unwrap()]);
            }
            Agent::start(node, &pods, &args).unwrap()
        })
        .collect();
    Cluster {
        network,
        nodes,
        client,
        servers,
        agents,
        _config: config,
        _ca: ca,
    }
}

impl Cluster {
    /// `count` requests from the client to the service, each with `needle` in its path and in a
    /// header; returns the summary line (all of them must have succeeded).
    fn requests(&self, needle: &str) -> Value {
        let url = format!("http://web:{PORT}/{needle}");
        let header = format!("x-needle: {needle}");
        let args = [
            "get",
            "--url",
            url.as_str(),
            "--count",
            REQUESTS,
            "--header",
            header.as_str(),
            "--timeout-secs",
            "10",
            "--quiet",
        ];
        let mut get = self.nodes[0]
            .spawn_in_pod(&self.client, upstream(&args))
            .unwrap();
        let status = get.finish(TIMEOUT).unwrap();
        assert!(status.success(), "{}", get.stderr().text());
        let summary = get
            .stdout()
            .json_lines()
            .into_iter()
            .rfind(|line| line["summary"] == true)
            .expect("a summary");
        assert_eq!(summary["errors"], 0, "{summary}");
        assert_eq!(
            summary["by_status"],
            serde_json::json!({"200": 30}),
            "{summary}"
        );
        summary
    }

    /// Requests with `needle` each web pod has received.
    fn received(&self, needle: &str) -> Vec<usize> {
        self.servers
            .iter()
            .map(|server| {
                server
                    .stdout()
                    .json_lines()
                    .iter()
                    .filter(|line| line["path"].as_str().is_some_and(|p| p.contains(needle)))
                    .count()
            })
            .collect()
    }

    /// Captures the underlay while `traffic` runs.
    fn captured(&self, traffic: impl FnOnce()) -> Captured {
        let capture = Capture::start(&self.network).unwrap();
        traffic();
        // The last frames are in the socket's queue already; a moment for the reader.
        std::thread::sleep(Duration::from_millis(200));
        capture.stop().unwrap()
    }
}

fn metrics(agent: &Agent) -> String {
    let (status, body) = agent.admin_get("/metrics").unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

fn needle(what: &str) -> String {
    format!("mtls-{what}-{}", std::process::id())
}

#[test]
fn cross_node_requests_travel_inside_mutual_tls_and_are_reported_with_identities() {
    let cluster = cluster(true);
    let needle = needle("secret");
    let captured = cluster.captured(|| {
        cluster.requests(&needle);
    });
    let received = cluster.received(&needle);
    assert!(
        received.iter().all(|count| *count > 0),
        "every pod, the one on the client's node included, is reached: {received:?}"
    );
    assert!(
        captured.payload_bytes_to_port(mesh_agent_tunnel_port()) > 0,
        "the capture saw the tunnels' traffic"
    );
    assert_eq!(
        captured.payload_bytes_to_port(PORT),
        0,
        "no plaintext to the app's port"
    );
    assert!(
        !captured.contains(needle.as_bytes()).unwrap(),
        "a request crossed the underlay in plaintext"
    );
    for (index, agent) in cluster.agents.iter().enumerate() {
        let text = metrics(agent);
        let destination = sum_samples(
            &text,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("source_principal", CLIENT_IDENTITY),
                (
                    "destination_principal",
                    "spiffe://cluster.local/ns/default/sa/web",
                ),
                ("connection_security_policy", "mutual_tls"),
                ("source_workload", "client"),
            ],
        );
        assert!(destination >= 1.0, "node {}: {text}", index + 1);
    }
    let source = metrics(&cluster.agents[0]);
    let tunnelled = sum_samples(
        &source,
        "istio_requests_total",
        &[
            ("reporter", "source"),
            ("source_principal", CLIENT_IDENTITY),
            ("connection_security_policy", "mutual_tls"),
            ("response_code", "200"),
        ],
    );
    assert_eq!(tunnelled, 30.0, "{source}");
    // Tunnels are pooled: one per destination pod, however many requests.
    let handshakes = sum_samples(
        &source,
        "mesh_tunnel_handshakes_total",
        &[("direction", "outbound")],
    );
    assert_eq!(handshakes, 3.0, "{source}");
}

#[test]
fn without_a_ca_the_same_traffic_crosses_in_plaintext() {
    let cluster = cluster(false);
    let needle = needle("visible");
    let captured = cluster.captured(|| {
        cluster.requests(&needle);
    });
    assert!(captured.contains(needle.as_bytes()).unwrap());
    assert!(captured.payload_bytes_to_port(PORT) > 0);
    assert_eq!(captured.payload_bytes_to_port(mesh_agent_tunnel_port()), 0);
    let source = metrics(&cluster.agents[0]);
    let plaintext = sum_samples(
        &source,
        "istio_requests_total",
        &[
            ("connection_security_policy", "none"),
            ("response_code", "200"),
        ],
    );
    assert_eq!(plaintext, 30.0, "{source}");
}

#[test]
fn a_destination_agent_killed_is_a_failed_connect_that_retries_hide() {
    let mut cluster = cluster(true);
    let warm = needle("warm");
    cluster.requests(&warm);
    cluster.agents[2].process().signal(libc::SIGKILL).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while !cluster.agents[2].process().stderr().is_closed() {
        assert!(Instant::now() < deadline, "the agent did not die");
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = needle("after");
    cluster.requests(&after);
    let received = cluster.received(&after);
    assert_eq!(received[2], 0, "web-3 has no agent: {received:?}");
    assert_eq!(received.iter().sum::<usize>(), 30, "{received:?}");
    // Retried after a failed connect: the try to web-3 (its tunnel refused) and one more.
    let retried = cluster.agents[0]
        .access_log()
        .into_iter()
        .filter(|line| line["path"].as_str().is_some_and(|p| p.contains(&after)))
        .filter(|line| line["status"] == 200 && line["attempts"].as_u64() > Some(1))
        .count();
    assert!(
        retried >= 1,
        "no request was retried after a failed connect"
    );
}

#[test]
fn a_destination_agent_restarted_hands_its_tunnel_listeners_over() {
    let mut cluster = cluster(true);
    cluster.requests(&needle("before"));
    let binary = mesh_tests::agent_binary().unwrap();
    let successor = cluster.agents[1]
        .successor(&cluster.nodes[1], &binary, TIMEOUT)
        .unwrap();
    let mut predecessor = std::mem::replace(&mut cluster.agents[1], successor);
    // The old agent drains and waits for SIGTERM: gone, it holds no listener any more.
    predecessor.process().signal(libc::SIGTERM).unwrap();
    predecessor.process().finish(TIMEOUT).unwrap();
    let after = needle("handed-over");
    cluster.requests(&after);
    assert!(
        cluster.received(&after)[1] > 0,
        "web-2 is reached after the restart"
    );
    let text = metrics(&cluster.agents[1]);
    let inbound = sum_samples(
        &text,
        "mesh_tunnel_handshakes_total",
        &[("direction", "inbound")],
    );
    assert!(
        inbound >= 1.0,
        "the successor serves web-2's tunnel listener: {text}"
    );
    assert!(
        !cluster.agents[1].stderr_text().contains("cannot listen"),
        "{}",
        cluster.agents[1].stderr_text()
    );
}

/// HBONE's port.
fn mesh_agent_tunnel_port() -> u16 {
    15008
}
