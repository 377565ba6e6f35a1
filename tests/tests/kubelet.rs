//! The kubelet stand-in (`mesh_tests::kubelet`) on a simulated node, with a real Kubernetes 1.20
//! control plane in the node's network namespace: a Deployment's pods run as processes, become
//! Ready through their readiness probe, the real EndpointSlice controller publishes them, scaling
//! and deleting stop them; and the agent, in Kubernetes mode, enrolls them and carries a client
//! pod's request to the Service.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use mesh_tests::{control_plane::ControlPlane, kubelet::Kubelet, require_root, Agent, SimNode};
use serde_json::Value;

const NODE: &str = "node-1";
const NAMESPACE: &str = "shop";
const TIMEOUT: Duration = Duration::from_secs(120);

/// [`mesh_tests::wait_for`] within [`TIMEOUT`].
fn wait_for<T>(what: &str, check: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    mesh_tests::wait_for(what, TIMEOUT, check)
}

/// The processes in the node's kubelet cgroups (`kubepods/...`), by cgroup: what runs, whatever
/// the kubelet believes.
fn kubepods_processes(node: &SimNode) -> Result<Vec<(String, u32)>> {
    fn walk(dir: &Path, root: &Path, found: &mut Vec<(String, u32)>) -> Result<()> {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs"))?;
        for pid in procs.lines() {
            let relative = dir.strip_prefix(root)?.display().to_string();
            found.push((relative, pid.parse()?));
        }
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                walk(&entry.path(), root, found)?;
            }
        }
        Ok(())
    }
    let root = node.cgroup_path().join("kubepods");
    let mut found = Vec::new();
    if root.exists() {
        walk(&root, &root, &mut found)?;
    }
    Ok(found)
}

/// A Deployment of two `mesh-test/upstream` replicas behind a Service, run by the kubelet
/// stand-in: Running, then Ready once the probe answers, then published by the EndpointSlice
/// controller; the agent enrolls the namespace's pods and carries a client pod's request to a
/// replica; scaling to one leaves one process and one endpoint; deleting the namespace leaves
/// no process.
#[test]
fn a_deployment_runs_as_processes_becomes_ready_and_reaches_its_endpoints() -> Result<()> {
    require_root();
    let node = Arc::new(SimNode::new()?);
    let control_plane = node.run_on_node(ControlPlane::start)??;
    let kubectl =
        |args: &[&str]| -> Result<String> { node.run_on_node(|| control_plane.kubectl(args))? };
    let kubelet = Kubelet::start(node.clone(), &control_plane, NODE)?;

    let manifests = control_plane.dir().join("shop.yaml");
    std::fs::write(
        &manifests,
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n  labels: \
             {{sidecarless.io/mesh: enabled}}\n---\n\
             apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: {NAMESPACE}}}\n\
             spec:\n  replicas: 2\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    \
             metadata: {{labels: {{app: web}}}}\n    spec:\n      \
             terminationGracePeriodSeconds: 1\n      containers:\n      - name: web\n        \
             image: mesh-test/upstream:1\n        \
             args: [serve, --listen, '0.0.0.0:8080', --name, web]\n        \
             ports: [{{name: http, containerPort: 8080}}]\n        \
             readinessProbe: {{httpGet: {{path: /health, port: http}}, periodSeconds: 1}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {NAMESPACE}}}\n\
             spec:\n  selector: {{app: web}}\n  ports: [{{name: http, port: 8080, targetPort: 8080}}]\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: {NAMESPACE}}}\n\
             spec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: client\n    \
             image: mesh-test/upstream\n    args: [serve, --listen, '0.0.0.0:9090', --name, client]\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: unready, namespace: {NAMESPACE}}}\n\
             spec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: app\n    \
             image: mesh-test/upstream\n    args: [serve, --listen, '0.0.0.0:8080', --name, unready]\n    \
             readinessProbe: {{httpGet: {{path: /status/503, port: 8080}}, periodSeconds: 1}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: no-image, namespace: {NAMESPACE}}}\n\
             spec:\n  containers:\n  - {{name: app, image: example.com/not-in-the-table:1}}\n",
        ),
    )?;
    let applied = Instant::now();
    kubectl(&["apply", "-f", &manifests.display().to_string()])?;

    // Each replica's first sighting Running (with its IP) and Ready, then both published.
    let pods_of = |selector: &str| -> Result<Vec<Value>> {
        let pods: Value = serde_json::from_str(&kubectl(&[
            "-n", NAMESPACE, "get", "pods", "-l", selector, "-o", "json",
        ])?)?;
        Ok(pods["items"].as_array().cloned().unwrap_or_default())
    };
    let is_ready = |pod: &Value| {
        pod["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    };
    let mut running_at = None;
    let ready = wait_for("two web replicas Running and Ready", || {
        let pods = pods_of("app=web")?;
        let running: Vec<&Value> = pods
            .iter()
            .filter(|pod| pod["status"]["phase"] == "Running")
            .collect();
        if running.len() == 2 && running_at.is_none() {
            running_at = Some(applied.elapsed());
        }
        Ok((running.len() == 2 && running.iter().all(|pod| is_ready(pod))).then_some(pods))
    })?;
    let ready_at = applied.elapsed();
    let mut replica_ips = BTreeSet::new();
    for pod in &ready {
        let name = pod["metadata"]["name"].as_str().context("pod name")?;
        let running = kubelet
            .pod(NAMESPACE, name)
            .with_context(|| format!("the kubelet runs no {name}"))?;
        let ip = running.pod.ip().to_string();
        ensure!(
            pod["status"]["podIP"] == ip.as_str()
                && pod["status"]["podIPs"][0]["ip"] == ip.as_str(),
            "{name}'s status has its simulated IP {ip}: {}",
            pod["status"]
        );
        ensure!(
            pod["status"]["hostIP"] == node.ip().to_string().as_str(),
            "hostIP: {}",
            pod["status"]
        );
        ensure!(
            pod["status"]["containerStatuses"][0]["state"]["running"].is_object(),
            "{name}'s container is running: {}",
            pod["status"]
        );
        replica_ips.insert(ip);
    }

    let slice_addresses = || -> Result<BTreeSet<String>> {
        let slices: Value = serde_json::from_str(&kubectl(&[
            "-n",
            NAMESPACE,
            "get",
            "endpointslices.v1beta1.discovery.k8s.io",
            "-l",
            "kubernetes.io/service-name=web",
            "-o",
            "json",
        ])?)?;
        Ok(slices["items"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|slice| slice["endpoints"].as_array().cloned().unwrap_or_default())
            .filter(|endpoint| endpoint["conditions"]["ready"] == true)
            .flat_map(|endpoint| {
                endpoint["addresses"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|address| address.as_str().map(str::to_owned))
            .collect())
    };
    wait_for("both replicas in the Service's EndpointSlice", || {
        Ok((slice_addresses()? == replica_ips).then_some(()))
    })?;
    let published_at = applied.elapsed();
    eprintln!(
        "after apply: both replicas Running at {:.1} s, Ready at {:.1} s, published at {:.1} s",
        running_at.unwrap_or_default().as_secs_f64(),
        ready_at.as_secs_f64(),
        published_at.as_secs_f64()
    );

    // An image the kubelet does not know: waiting, with a reason, and nothing runs.
    let no_image = wait_for("no-image waiting with ErrImagePull", || {
        let pods = pods_of("!app")?;
        Ok(pods
            .into_iter()
            .find(|pod| pod["metadata"]["name"] == "no-image")
            .filter(|pod| !pod["status"]["containerStatuses"].is_null()))
    })?;
    let waiting = &no_image["status"]["containerStatuses"][0]["state"]["waiting"];
    ensure!(
        waiting["reason"] == "ErrImagePull"
            && waiting["message"]
                .as_str()
                .is_some_and(|m| m.contains("example.com/not-in-the-table")),
        "no-image's container: {}",
        no_image["status"]
    );
    ensure!(
        no_image["status"]["phase"] == "Pending" && !is_ready(&no_image),
        "no-image is Pending, not Ready: {}",
        no_image["status"]
    );

    // A probe answering 503: running, never Ready (it has been probed for as long as the
    // replicas took to become Ready and be published, several rounds).
    let unready = pods_of("!app")?
        .into_iter()
        .find(|pod| pod["metadata"]["name"] == "unready")
        .context("the unready pod")?;
    ensure!(
        unready["status"]["phase"] == "Running" && !is_ready(&unready),
        "unready is Running, not Ready: {}",
        unready["status"]
    );

    // The agent, with its ServiceAccount's token, enrolls the namespace's running pods.
    let kubeconfig = node.run_on_node(|| control_plane.agent_kubeconfig())??;
    let agent = Agent::spawn_kubernetes(&node, &kubeconfig, NODE)?;
    agent.wait_ready(TIMEOUT)?;
    let mut expected: Vec<String> = ready
        .iter()
        .map(|pod| {
            format!(
                "{NAMESPACE}/{}",
                pod["metadata"]["name"].as_str().unwrap_or("")
            )
        })
        .chain([
            format!("{NAMESPACE}/client"),
            format!("{NAMESPACE}/unready"),
        ])
        .collect();
    expected.sort();
    wait_for("the running labelled pods enrolled", || {
        Ok((agent.enrolled()? == expected).then_some(()))
    })?;

    // The client pod calls the Service by name; the agent carries it to a replica.
    let service: Value = serde_json::from_str(&kubectl(&[
        "-n", NAMESPACE, "get", "svc", "web", "-o", "json",
    ])?)?;
    let cluster_ip = service["spec"]["clusterIP"]
        .as_str()
        .context("the Service has a clusterIP")?
        .parse()?;
    node.add_host("web", cluster_ip)?;
    let client = kubelet
        .pod(NAMESPACE, "client")
        .context("the kubelet runs the client")?;
    let mut get = Command::new(mesh_tests::upstream_binary()?);
    get.args([
        "get",
        "--url",
        "http://web:8080/",
        "--count",
        "1",
        "--quiet",
    ]);
    let mut get = node.spawn_in_pod(&client.pod, get)?;
    ensure!(
        get.finish(TIMEOUT)?.success(),
        "the client's request failed: {}",
        get.stderr().text()
    );
    let records = agent.wait_for_records(1, |r| r["kind"] == "http", TIMEOUT)?;
    let endpoint = records[0]["endpoint"].as_str().unwrap_or_default();
    ensure!(
        replica_ips
            .iter()
            .any(|ip| endpoint == format!("{ip}:8080")),
        "the request went to a replica ({replica_ips:?}): {}",
        records[0]
    );

    // Scaled to one: one replica's process, one endpoint, one enrolled replica.
    kubectl(&[
        "-n",
        NAMESPACE,
        "scale",
        "deployment",
        "web",
        "--replicas",
        "1",
    ])?;
    let left = wait_for("one web process and one endpoint left", || {
        let web: Vec<_> = kubelet
            .running()
            .into_iter()
            .filter(|pod| pod.name.starts_with("web-"))
            .collect();
        let addresses = slice_addresses()?;
        Ok((web.len() == 1 && addresses.len() == 1).then_some((web, addresses)))
    })?;
    let processes = kubepods_processes(&node)?;
    ensure!(
        processes.len() == 3,
        "the client, the unready pod and one replica run: {processes:?}"
    );
    ensure!(
        left.1.contains(&left.0[0].pod.ip().to_string()),
        "the endpoint left is the replica left: {left:?}"
    );
    wait_for("the agent follows the scale-down", || {
        Ok((agent.enrolled()?.len() == 3).then_some(()))
    })?;

    // The namespace deleted: its pods are stopped and their deletion confirmed.
    let deleting = Instant::now();
    kubectl(&["delete", "namespace", NAMESPACE, "--wait=false"])?;
    wait_for("no pod process left", || {
        Ok((kubelet.running().is_empty() && kubepods_processes(&node)?.is_empty()).then_some(()))
    })?;
    wait_for("the pods gone from the API server", || {
        let pods = kubectl(&["-n", NAMESPACE, "get", "pods", "-o", "name"])?;
        Ok(pods.trim().is_empty().then_some(()))
    })?;
    eprintln!(
        "namespace deleted: processes stopped and pods gone in {:.1} s",
        deleting.elapsed().as_secs_f64()
    );
    Ok(())
}
