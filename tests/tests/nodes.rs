//! A cluster of two simulated nodes ([`SimNetwork`]): a real Kubernetes 1.20 control plane on the
//! first node's underlay address, a kubelet stand-in and an agent (Kubernetes mode, its
//! ServiceAccount's token) per node, and a Deployment spread over both nodes by a pod
//! anti-affinity. Pods get their IPs from their node's subnet, reach the other node's pods by IP
//! and through the Service by name (through their own node's agent), each agent enrolls only its
//! node's pods, and the kubelets' heartbeats keep the nodes' Ready conditions fresh.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use mesh_tests::control_plane::ControlPlane;
use mesh_tests::kubelet::{Kubelet, RunningPod, Settings};
use mesh_tests::probe::curl;
use mesh_tests::{require_root, Agent, SimNetwork, SimNode};
use serde_json::Value;

const NAMESPACE: &str = "shop";
const NODE_NAMES: [&str; 2] = ["node-1", "node-2"];
const TIMEOUT: Duration = Duration::from_secs(120);
/// Shorter than a kubelet's 10 s, so that the test sees a few heartbeats.
const HEARTBEAT_PERIOD: Duration = Duration::from_secs(2);
/// Requests the client sends to the Service: enough for both replicas to be chosen (with two
/// endpoints picked at random, all on one has a chance of 2⁻¹⁹).
const REQUESTS: usize = 20;

/// The web Deployment (one replica per node, by a required pod anti-affinity on the hostname
/// label the kubelets set), its Service, and a client pod bound to node-1.
const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {sidecarless.io/mesh: enabled}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
          - labelSelector: {matchLabels: {app: web}}
            topologyKey: kubernetes.io/hostname
      containers:
      - name: web
        image: mesh-test/upstream:1
        args: [serve, --listen, '0.0.0.0:8080', --name, web]
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {httpGet: {path: /health, port: http}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop}
spec:
  nodeName: node-1
  terminationGracePeriodSeconds: 1
  containers:
  - name: client
    image: mesh-test/upstream
    args: [serve, --listen, '0.0.0.0:9090', --name, client]
"#;

/// [`mesh_tests::wait_for`] within [`TIMEOUT`].
fn wait_for<T>(what: &str, check: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    mesh_tests::wait_for(what, TIMEOUT, check)
}

fn is_ready(object: &Value) -> bool {
    object["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// The Node's Ready condition.
fn ready_condition(node: &Value) -> Value {
    node["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Ready")
        .cloned()
        .unwrap_or(Value::Null)
}

/// Two nodes on one underlay, a control plane reachable from both, a kubelet and an agent on
/// each: a Deployment spread over both nodes gets its pods' IPs from their nodes' subnets; a
/// client pod on node-1 reaches the replica on node-2 by its pod IP (no agent running yet: the
/// network itself) and the Service by name through node-1's agent, whose access log shows both
/// replicas, the one on the other node included; each agent enrolls its node's pods only; and
/// each Node's Ready condition has its heartbeat renewed while its transition time stays.
#[test]
fn a_deployment_spread_over_two_nodes_reaches_across_them() -> Result<()> {
    require_root();
    let started = Instant::now();
    let network = SimNetwork::new(2)?;
    let nodes: Vec<Arc<SimNode>> = network.nodes().to_vec();
    let address = nodes[0]
        .underlay_ip()
        .context("node-1 has an underlay address")?;
    let control_plane = nodes[0].run_on_node(|| ControlPlane::start_on(address))??;
    ensure!(
        control_plane
            .server()
            .starts_with(&format!("https://{address}:")),
        "the API server is on node-1's underlay address: {}",
        control_plane.server()
    );
    let control_plane_up = started.elapsed();
    // From node-2: the API server is reached over the underlay.
    let kubectl =
        |args: &[&str]| -> Result<String> { nodes[1].run_on_node(|| control_plane.kubectl(args))? };

    let settings = Settings {
        heartbeat_period: HEARTBEAT_PERIOD,
        ..Settings::default()
    };
    let kubelets: Vec<Kubelet> = nodes
        .iter()
        .zip(NODE_NAMES)
        .map(|(node, name)| {
            Kubelet::start_with_settings(node.clone(), &control_plane, name, settings.clone())
        })
        .collect::<Result<_>>()?;

    // Each Node is registered with its address and pod subnet.
    for (node, name) in nodes.iter().zip(NODE_NAMES) {
        let object: Value = serde_json::from_str(&kubectl(&["get", "node", name, "-o", "json"])?)?;
        let internal_ip = object["status"]["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|address| address["type"] == "InternalIP")
            .and_then(|address| address["address"].as_str());
        ensure!(
            internal_ip == Some(node.internal_ip().to_string().as_str())
                && object["spec"]["podCIDR"] == node.pod_cidr().as_str()
                && is_ready(&object),
            "{name} is Ready with InternalIP {} and podCIDR {}: {object}",
            node.internal_ip(),
            node.pod_cidr()
        );
    }

    let manifests = control_plane.dir().join("shop.yaml");
    std::fs::write(&manifests, MANIFESTS)?;
    let applied = Instant::now();
    kubectl(&["apply", "-f", &manifests.display().to_string()])?;
    let web = wait_for("two web replicas Ready and the client Running", || {
        let pods: Value =
            serde_json::from_str(&kubectl(&["-n", NAMESPACE, "get", "pods", "-o", "json"])?)?;
        let pods = pods["items"].as_array().cloned().unwrap_or_default();
        let web: Vec<Value> = pods
            .iter()
            .filter(|pod| pod["metadata"]["labels"]["app"] == "web" && is_ready(pod))
            .cloned()
            .collect();
        let client_running = pods
            .iter()
            .any(|pod| pod["metadata"]["name"] == "client" && pod["status"]["phase"] == "Running");
        Ok((web.len() == 2 && client_running).then_some(web))
    })?;
    let replicas_ready = applied.elapsed();

    // One replica on each node, with an IP of its node's subnet and its node's address as hostIP.
    let mut replicas: Vec<RunningPod> = Vec::new();
    for (node, (kubelet, name)) in nodes.iter().zip(kubelets.iter().zip(NODE_NAMES)) {
        let pod = web
            .iter()
            .find(|pod| pod["spec"]["nodeName"] == name)
            .with_context(|| format!("no web replica on {name}: {web:?}"))?;
        let pod_name = pod["metadata"]["name"].as_str().context("pod name")?;
        let running = kubelet
            .pod(NAMESPACE, pod_name)
            .with_context(|| format!("{name}'s kubelet runs no {pod_name}"))?;
        let ip = running.pod.ip();
        ensure!(
            node.owns_pod_ip(ip)
                && pod["status"]["podIP"] == ip.to_string().as_str()
                && pod["status"]["hostIP"] == node.internal_ip().to_string().as_str(),
            "{pod_name} on {name} has an IP of {} ({ip}) and hostIP {}: {}",
            node.pod_cidr(),
            node.internal_ip(),
            pod["status"]
        );
        replicas.push(running);
    }
    let client = kubelets[0]
        .pod(NAMESPACE, "client")
        .context("node-1's kubelet runs the client")?;
    ensure!(
        nodes[0].owns_pod_ip(client.pod.ip()),
        "the client's IP {} is node-1's",
        client.pod.ip()
    );

    // By pod IP, before any agent runs: the network itself carries the client's request to the
    // replica on node-2, which sees the client's own address.
    let url = format!("http://{}/", replicas[1].pod.addr(8080));
    let mut get = nodes[0].spawn_in_pod(&client.pod, curl(&["-i", &url]))?;
    ensure!(
        get.finish(TIMEOUT)?.success(),
        "client → {url}: {}",
        get.stderr().text()
    );
    let response = get.stdout().text();
    ensure!(
        response.starts_with("HTTP/1.1 200")
            && response.contains(&format!("x-peer: {}:", client.pod.ip())),
        "node-2's replica answered the client, seeing its pod IP: {response}"
    );

    // An agent per node, both with the ServiceAccount's kubeconfig naming node-1's address.
    let kubeconfig = nodes[1].run_on_node(|| control_plane.agent_kubeconfig())??;
    let agents_started = Instant::now();
    let agents: Vec<Agent> = nodes
        .iter()
        .zip(NODE_NAMES)
        .map(|(node, name)| Agent::spawn_kubernetes(node, &kubeconfig, name))
        .collect::<Result<_>>()?;
    for agent in &agents {
        agent.wait_ready(TIMEOUT)?;
    }
    let agents_ready = agents_started.elapsed();
    let expected: [BTreeSet<String>; 2] = [
        [&replicas[0].name, &client.name]
            .iter()
            .map(|name| format!("{NAMESPACE}/{name}"))
            .collect(),
        BTreeSet::from([format!("{NAMESPACE}/{}", replicas[1].name)]),
    ];
    for ((agent, expected), name) in agents.iter().zip(&expected).zip(NODE_NAMES) {
        wait_for(&format!("{name}'s agent enrolls {expected:?}"), || {
            Ok((agent.enrolled()?.into_iter().collect::<BTreeSet<_>>() == *expected).then_some(()))
        })?;
    }
    let enrolled_at = agents_started.elapsed();

    // Through the Service by name: node-1's agent carries the client's requests to both
    // replicas, across the underlay to node-2's.
    let service: Value = serde_json::from_str(&kubectl(&[
        "-n", NAMESPACE, "get", "svc", "web", "-o", "json",
    ])?)?;
    let cluster_ip: Ipv4Addr = service["spec"]["clusterIP"]
        .as_str()
        .context("the Service has a clusterIP")?
        .parse()?;
    network.add_host("web", cluster_ip)?;
    let mut get = Command::new(mesh_tests::upstream_binary()?);
    get.args(["get", "--url", "http://web:8080/", "--quiet"])
        .args(["--count", &REQUESTS.to_string()]);
    let requests_sent = Instant::now();
    let mut get = nodes[0].spawn_in_pod(&client.pod, get)?;
    ensure!(
        get.finish(TIMEOUT)?.success(),
        "the client's requests to the Service failed: {}",
        get.stderr().text()
    );
    let requests_took = requests_sent.elapsed();
    let records = agents[0].wait_for_records(REQUESTS, |r| r["kind"] == "http", TIMEOUT)?;
    let to_node_2 = records
        .iter()
        .filter(|record| record["endpoint"] == replicas[1].pod.addr(8080).to_string().as_str())
        .count();
    let endpoints: BTreeSet<String> = records
        .iter()
        .filter_map(|record| record["endpoint"].as_str().map(str::to_owned))
        .collect();
    let replica_endpoints: BTreeSet<String> = replicas
        .iter()
        .map(|replica| replica.pod.addr(8080).to_string())
        .collect();
    ensure!(
        endpoints == replica_endpoints && records.iter().all(|record| record["status"] == 200),
        "node-1's agent sent the {REQUESTS} requests to both replicas ({replica_endpoints:?}), \
         each answered 200: {records:?}"
    );

    // Heartbeats: node-2's Ready condition has its lastHeartbeatTime renewed, twice, and keeps
    // its lastTransitionTime.
    let read_ready = || -> Result<Value> {
        let object: Value =
            serde_json::from_str(&kubectl(&["get", "node", NODE_NAMES[1], "-o", "json"])?)?;
        Ok(ready_condition(&object))
    };
    let first = read_ready()?;
    let mut renewals = Vec::new();
    let mut last = first.clone();
    let mut last_change = Instant::now();
    for _ in 0..2 {
        let next = wait_for("node-2's heartbeat renewed", || {
            let now = read_ready()?;
            Ok((now["lastHeartbeatTime"] != last["lastHeartbeatTime"]).then_some(now))
        })?;
        renewals.push(last_change.elapsed());
        last_change = Instant::now();
        ensure!(
            next["status"] == "True"
                && next["lastTransitionTime"] == first["lastTransitionTime"]
                && next["lastHeartbeatTime"].as_str() > last["lastHeartbeatTime"].as_str(),
            "the heartbeat moves lastHeartbeatTime on and leaves the rest: {last} → {next}"
        );
        last = next;
    }

    eprintln!(
        "control plane up on {} in {:.1} s; both replicas Ready {:.1} s after apply; both \
         agents ready in {:.1} s and enrolled their pods by {:.1} s; {REQUESTS} requests through \
         node-1's agent in {:.2} s, {to_node_2} of them to node-2's replica; node-2's heartbeat renewed within {:.1} s of a first look, \
         then {:.1} s later (period {HEARTBEAT_PERIOD:?}, timestamps in whole seconds); {:.1} s \
         in all",
        control_plane.server(),
        control_plane_up.as_secs_f64(),
        replicas_ready.as_secs_f64(),
        agents_ready.as_secs_f64(),
        enrolled_at.as_secs_f64(),
        requests_took.as_secs_f64(),
        renewals[0].as_secs_f64(),
        renewals[1].as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
