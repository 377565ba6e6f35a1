//! Kubernetes mode against a real Kubernetes 1.20 control plane (`mesh_tests::control_plane`),
//! run inside a simulated node's network namespace, with the kubelet stand-in
//! (`mesh_tests::kubelet`) running pods as processes in kubelet-named cgroups on the node, and the
//! agent on the node with its ServiceAccount's token, as the DaemonSet runs it. Every change is
//! made with kubectl: enrollment follows pod and namespace labels, on the agent's node only; a
//! killed agent fails open, and one that cannot reach the API server enrolls nothing until it
//! can; rules and endpoints arrive through watches and take effect on traffic; an invalid object
//! is rejected by itself (reported in the log, the metrics, `/config_dump` and an Event on it)
//! while every other change keeps coming in: its last good version stays in force, across a
//! relist too, and one the agent never saw valid (after a restart: nothing is persisted) is left
//! out; the agent rides out an API server outage with its last state, and a watch resumed from a
//! compacted resourceVersion (`410 Gone`) is recovered by a relist.
//!
//! The first run builds the control plane's binaries (tens of minutes, once; `cargo xtask test`
//! does it before the tests). Each test starts a control plane of its own (~15 s).

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use mesh_tests::{
    control_plane::ControlPlane,
    kubelet::{Kubelet, RunningPod, UPSTREAM_IMAGE},
    require_root, Agent, Pod, SimNode,
};
use serde_json::Value;

const NODE: &str = "node-1";
/// A second Node, whose kubelet runs its pods on the same simulated host: their processes are in
/// the host's `/proc` with kubelet-named cgroups, as this node's are, so only the pod's
/// `spec.nodeName` keeps the agent from enrolling them.
const OTHER_NODE: &str = "node-2";
const MESH_LABEL: &str = "sidecarless.io/mesh";
const TIMEOUT: Duration = Duration::from_secs(60);
/// How soon a change made with kubectl takes effect (docs/kubernetes.md promises a second).
const PROMPTLY: Duration = Duration::from_secs(1);
/// How long the API server stays down. The longer, the longer the agent's watches back off
/// (kube's default: doubling from 0.8 s up to 30 s) before they see it back.
const OUTAGE: Duration = Duration::from_secs(5);

/// [`mesh_tests::wait_for`] within `within`.
fn wait_for<T>(
    what: &str,
    within: Duration,
    check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    mesh_tests::wait_for(what, within, check)
}

/// A control plane in a simulated node's network namespace and a kubelet stand-in for each of
/// `nodes`, all on that one simulated node.
struct Cluster {
    // Dropped in this order: the pods' processes, then the control plane, then the node.
    kubelets: Vec<Kubelet>,
    control_plane: ControlPlane,
    node: Arc<SimNode>,
    /// The agent's kubeconfig: its ServiceAccount's token, `deploy/base`'s role.
    agent_kubeconfig: PathBuf,
}

impl Cluster {
    fn start(nodes: &[&str]) -> Result<Cluster> {
        require_root();
        let node = Arc::new(SimNode::new()?);
        let control_plane = node.run_on_node(ControlPlane::start)??;
        let agent_kubeconfig = node.run_on_node(|| control_plane.agent_kubeconfig())??;
        let kubelets = nodes
            .iter()
            .map(|name| Kubelet::start(node.clone(), &control_plane, name))
            .collect::<Result<_>>()?;
        Ok(Cluster {
            kubelets,
            control_plane,
            node,
            agent_kubeconfig,
        })
    }

    fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.node.run_on_node(|| self.control_plane.kubectl(args))?
    }

    /// `kubectl apply` of `yaml`.
    fn apply(&self, yaml: &str) -> Result<()> {
        let file = tempfile::Builder::new()
            .suffix(".yaml")
            .tempfile_in(self.control_plane.dir())?;
        std::fs::write(file.path(), yaml)?;
        let path = file.path().to_str().context("the path is not UTF-8")?;
        self.kubectl(&["apply", "-f", path])?;
        Ok(())
    }

    /// The agent on [`NODE`], once ready.
    fn agent(&self) -> Result<Agent> {
        let agent = Agent::spawn_kubernetes(&self.node, &self.agent_kubeconfig, NODE)?;
        agent.wait_ready(TIMEOUT)?;
        Ok(agent)
    }

    /// Waits until a kubelet runs `namespace/name`.
    fn running(&self, namespace: &str, name: &str) -> Result<RunningPod> {
        wait_for(&format!("{namespace}/{name} running"), TIMEOUT, || {
            Ok(self
                .kubelets
                .iter()
                .find_map(|kubelet| kubelet.pod(namespace, name))
                .filter(|pod| !pod.pids.is_empty()))
        })
    }

    /// `count` GETs of `url` from `client` with `upstream get`: its summary line.
    fn get(&self, client: &Pod, url: &str, count: usize, extra: &[&str]) -> Result<Value> {
        let mut command = Command::new(mesh_tests::upstream_binary()?);
        command
            .args([
                "get",
                "--url",
                url,
                "--count",
                &count.to_string(),
                "--quiet",
            ])
            .args(extra);
        let mut process = self.node.spawn_in_pod(client, command)?;
        ensure!(
            process.finish(TIMEOUT)?.success(),
            "GET {url} from {} failed: {}",
            client.name(),
            process.stderr().text()
        );
        process
            .stdout()
            .json_lines()
            .pop()
            .context("upstream get printed no summary")
    }
}

/// A pod bound to `node` running `upstream serve` as `name` on port 8080.
fn pod(namespace: &str, name: &str, node: &str, labels: &[(&str, &str)]) -> String {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  \
         labels: {{{}}}\nspec:\n  nodeName: {node}\n  terminationGracePeriodSeconds: 1\n  \
         containers:\n  - name: app\n    image: {UPSTREAM_IMAGE}\n    \
         args: [serve, --listen, '0.0.0.0:8080', --name, {name}]\n---\n",
        labels.join(", ")
    )
}

/// Waits until the agent has enrolled exactly `expected`; how long that took.
fn wait_enrolled(agent: &Agent, expected: &[&str], within: Duration) -> Result<Duration> {
    let started = Instant::now();
    wait_for(&format!("enrolled: {expected:?}"), within, || {
        Ok((agent.enrolled()? == expected).then_some(()))
    })?;
    Ok(started.elapsed())
}

fn count(summary: &Value, field: &str, key: &str) -> u64 {
    summary[field][key].as_u64().unwrap_or(0)
}

/// `mesh_kubernetes_watch_failures_total{kind}`.
fn watch_failures(agent: &Agent, kind: &str) -> Result<f64> {
    let (_, metrics) = agent.admin_get("/metrics")?;
    Ok(metrics
        .lines()
        .find(|line| {
            line.starts_with("mesh_kubernetes_watch_failures_total")
                && line.contains(&format!("kind=\"{kind}\""))
        })
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0))
}

/// How many lines the agent logged that contain every one of `parts`.
fn logged(agent: &Agent, parts: &[&str]) -> usize {
    agent
        .stderr_text()
        .lines()
        .filter(|line| parts.iter().all(|part| line.contains(part)))
        .count()
}

/// A request from `client` to `url` succeeds, and the agent carried it (its access log says so).
fn through_the_agent(cluster: &Cluster, agent: &Agent, client: &Pod, url: &str) -> Result<()> {
    let before = agent.access_log().len();
    let summary = cluster.get(client, url, 1, &[])?;
    ensure!(count(&summary, "by_status", "200") == 1, "{summary}");
    agent.wait_for_records(before + 1, |_| true, TIMEOUT)?;
    Ok(())
}

/// Pods in a namespace labelled for the mesh, in one that is not, and on another node; the agent
/// enrolls exactly the labelled ones on its node, and follows `kubectl label` of pods and
/// namespaces within a second. Killed, it fails open: the next request goes straight to its
/// destination. Restarted while the API server is down, it is not ready, says why, and enrolls
/// nothing (requests still go straight through); once the API server is back it enrolls the
/// labelled pods again and carries their requests.
#[test]
fn enrollment_follows_pod_and_namespace_labels_on_this_node_only_and_fails_open() -> Result<()> {
    let started = Instant::now();
    let mut cluster = Cluster::start(&[NODE, OTHER_NODE])?;
    let mut yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: meshed, labels: {{{MESH_LABEL}: enabled}}}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {{name: plain}}\n---\n"
    );
    yaml += &pod("meshed", "by-namespace", NODE, &[]);
    yaml += &pod("meshed", "opted-out", NODE, &[(MESH_LABEL, "disabled")]);
    yaml += &pod("plain", "by-label", NODE, &[(MESH_LABEL, "enabled")]);
    yaml += &pod("plain", "unlabelled", NODE, &[]);
    yaml += &pod("meshed", "other-node", OTHER_NODE, &[]);
    cluster.apply(&yaml)?;
    let client = cluster.running("meshed", "by-namespace")?;
    let server = cluster.running("meshed", "opted-out")?;
    for (namespace, name) in [
        ("plain", "by-label"),
        ("plain", "unlabelled"),
        ("meshed", "other-node"),
    ] {
        cluster.running(namespace, name)?;
    }
    let cluster_up = started.elapsed();

    let mut agent = cluster.agent()?;
    let both = ["meshed/by-namespace", "plain/by-label"];
    wait_enrolled(&agent, &both, TIMEOUT)?;

    // The cluster is the truth: the admin API does not change enrollment here.
    let (status, _) = agent.admin_request("DELETE", "/pods/meshed/by-namespace", "")?;
    ensure!(status == 403, "DELETE /pods answered {status}");

    // The pod's label, removed and added again; then the namespace's, added and removed.
    let relabel = |args: &[&str], expected: &[&str]| -> Result<Duration> {
        let started = Instant::now();
        cluster.kubectl(args)?;
        wait_enrolled(&agent, expected, PROMPTLY)?;
        Ok(started.elapsed())
    };
    let (pod_label, namespace_label) = (
        ["-n", "plain", "label", "pod", "by-label"],
        ["label", "namespace", "plain"],
    );
    let all = ["meshed/by-namespace", "plain/by-label", "plain/unlabelled"];
    let took = [
        relabel(
            &[&pod_label[..], &[&format!("{MESH_LABEL}-")]].concat(),
            &["meshed/by-namespace"],
        )?,
        relabel(
            &[&pod_label[..], &[&format!("{MESH_LABEL}=enabled")]].concat(),
            &both,
        )?,
        relabel(
            &[&namespace_label[..], &[&format!("{MESH_LABEL}=enabled")]].concat(),
            &all,
        )?,
        relabel(
            &[&namespace_label[..], &[&format!("{MESH_LABEL}-")]].concat(),
            &both,
        )?,
    ];
    eprintln!(
        "from the start of kubectl label (its own run included): pod unenrolled in {:?}, \
         enrolled in {:?}; the namespace's pods enrolled in {:?}, unenrolled in {:?}",
        took[0], took[1], took[2], took[3]
    );

    // An enrolled pod's request to another pod goes through the agent.
    let url = format!("http://{}/", server.pod.addr(8080));
    through_the_agent(&cluster, &agent, &client.pod, &url)?;

    // Killed: the next request goes straight to its destination.
    agent.process().signal(libc::SIGKILL)?;
    let killed = Instant::now();
    agent.process().wait_timeout(TIMEOUT)?;
    let summary = cluster.get(&client.pod, &url, 1, &["--timeout-secs", "1"])?;
    ensure!(count(&summary, "by_status", "200") == 1, "{summary}");
    let fail_open = killed.elapsed();
    drop(agent);

    // A new agent while the API server is down: alive, not ready (and why), nothing enrolled,
    // requests go straight through.
    cluster
        .node
        .clone()
        .run_on_node(|| cluster.control_plane.stop_apiserver())??;
    let agent = Agent::spawn_kubernetes(&cluster.node, &cluster.agent_kubeconfig, NODE)?;
    let reasons = wait_for(
        "/ready to say it cannot reach the API server",
        TIMEOUT,
        || {
            let (code, body) = agent.admin_get("/ready")?;
            Ok((code == 503 && body.contains("last error")).then_some(body))
        },
    )?;
    eprintln!("while the API server is down, /ready: {}", reasons.trim());
    ensure!(agent.enrolled()?.is_empty(), "{:?}", agent.enrolled()?);
    let summary = cluster.get(&client.pod, &url, 1, &[])?;
    ensure!(count(&summary, "by_status", "200") == 1, "{summary}");
    ensure!(
        agent.access_log().is_empty(),
        "an agent that is not ready carried a request: {:?}",
        agent.access_log()
    );

    // The API server back: ready, the labelled pods enrolled again, requests through it.
    let node = cluster.node.clone();
    node.run_on_node(|| cluster.control_plane.start_apiserver())??;
    let back = Instant::now();
    agent.wait_ready(TIMEOUT)?;
    wait_enrolled(&agent, &both, TIMEOUT)?;
    let reenrolled = back.elapsed();
    through_the_agent(&cluster, &agent, &client.pod, &url)?;
    eprintln!(
        "cluster up in {:.1} s; fail-open: a request succeeded {fail_open:?} after SIGKILL; \
         re-enrolled {reenrolled:?} after the API server was back; test took {:.1} s",
        cluster_up.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// service-c's two versions as pods behind a real Service (the EndpointSlice controller
/// publishes them), its DestinationRule's subsets, and a client pod. Through watches: the
/// tutorial's canary VirtualService takes effect within a second; an invalid VirtualService in
/// another namespace is left out and reported (log, metric, /config_dump, Event) while a change
/// in meshed still takes effect within a second; meshed's own made invalid is rejected and its
/// last good version stays in force; an endpoint removed under 200 rps fails no request. The API
/// server stopped: requests go on with the last state, the agent stays ready and counts each
/// kind's failed watches; etcd compacted meanwhile, so the watches resume into `410 Gone`; the
/// relist keeps the last good version of a DestinationRule made invalid before the outage (the
/// canary applied afterwards needs its subsets), and changes made with kubectl arrive again.
/// Restarted with the invalid objects still there, the agent is ready with everything else in
/// force, the DestinationRule left out (it never saw it valid: the canary's subsets answer 503
/// `NR` until it is mended), and the objects' Events are not made twice.
#[test]
fn rules_and_endpoints_arrive_through_watches_and_survive_an_api_server_outage() -> Result<()> {
    let started = Instant::now();
    let mut cluster = Cluster::start(&[NODE])?;
    let app = |version: &'static str| [("app", "service-c"), ("version", version)];
    let destination_rule = "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\n\
         metadata: {name: service-c, namespace: meshed}\nspec:\n  host: service-c\n  subsets:\n  \
         - {name: version-v1, labels: {version: v1}}\n  - {name: version-v2, labels: {version: v2}}\n";
    let mut yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: meshed, labels: {{{MESH_LABEL}: enabled}}}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: service-c, namespace: meshed}}\n\
         spec:\n  selector: {{app: service-c}}\n  ports: [{{name: http, port: 8080, targetPort: 8080}}]\n---\n\
         {destination_rule}---\n"
    );
    yaml += &pod("meshed", "service-c-v1", NODE, &app("v1"));
    yaml += &pod("meshed", "service-c-v2", NODE, &app("v2"));
    yaml += &pod("meshed", "client", NODE, &[]);
    cluster.apply(&yaml)?;
    let v1 = cluster.running("meshed", "service-c-v1")?;
    let v2 = cluster.running("meshed", "service-c-v2")?;
    let client = cluster.running("meshed", "client")?.pod;
    let service: Value = serde_json::from_str(&cluster.kubectl(&[
        "-n",
        "meshed",
        "get",
        "service",
        "service-c",
        "-o",
        "json",
    ])?)?;
    let cluster_ip: Ipv4Addr = service["spec"]["clusterIP"]
        .as_str()
        .context("service-c has a clusterIP")?
        .parse()?;
    cluster.node.add_host("service-c", cluster_ip)?;
    let url = "http://service-c:8080/";
    let cluster_up = started.elapsed();

    let agent = cluster.agent()?;
    let endpoints = |expected: &[&RunningPod]| -> Result<Duration> {
        let started = Instant::now();
        wait_for("service-c's endpoints in the agent", TIMEOUT, || {
            let (_, clusters) = agent.admin_get("/clusters")?;
            Ok([&v1, &v2]
                .iter()
                .all(|pod| {
                    let listed = clusters.contains(&pod.pod.ip().to_string());
                    listed == expected.iter().any(|e| e.name == pod.name)
                })
                .then_some(()))
        })?;
        Ok(started.elapsed())
    };
    endpoints(&[&v1, &v2])?;
    let both = cluster.get(&client, url, 40, &[])?;
    ensure!(count(&both, "by_status", "200") == 40, "{both}");

    // The tutorial's canary VirtualService, applied with kubectl: in force within a second.
    let canary = std::fs::read_to_string(
        mesh_tests::mesh_config::examples_dir().join("canary/4-vs-v2.yml"),
    )?
    .replace(
        "name: service-c\n",
        "name: service-c\n  namespace: meshed\n",
    );
    cluster.apply(&canary)?;
    let applied = Instant::now();
    wait_for("the canary in force", PROMPTLY, || {
        Ok((count(
            &cluster.get(&client, url, 1, &[])?,
            "by_body",
            "service-c-v2",
        ) == 1)
            .then_some(()))
    })?;
    let canary_took = applied.elapsed();
    let all_v2 = cluster.get(&client, url, 20, &[])?;
    ensure!(count(&all_v2, "by_body", "service-c-v2") == 20, "{all_v2}");

    // In namespace shop: a VirtualService the CRD's schema took although it is invalid, and one
    // naming a subset (and a host) that does not exist yet, which once froze every later update.
    // The first is left out by itself and reported — log, metric, /config_dump, an Event on it —
    // the second is taken with a warning, and a change in namespace meshed is in force within a
    // second, as ever.
    cluster.apply(SHOP_RULES)?;
    let reported = [
        "left out of the config in force: kubernetes: VirtualService shop/reviews: \
         spec.http[0].timeout: invalid duration \"soon\"",
    ];
    wait_for("the invalid VirtualService reported", TIMEOUT, || {
        Ok((logged(&agent, &reported) == 1).then_some(()))
    })?;
    wait_for(
        "the route to what does not exist yet taken",
        TIMEOUT,
        || {
            Ok((logged(
                &agent,
                &["VirtualService shop/ratings", "is not defined (yet)"],
            ) == 1)
                .then_some(()))
        },
    )?;
    let all_v1 = canary.replace("subset: version-v2", "subset: version-v1");
    cluster.apply(&all_v1)?;
    let applied = Instant::now();
    wait_for(
        "meshed's change in force beside shop's bad object",
        PROMPTLY,
        || {
            Ok((count(
                &cluster.get(&client, url, 1, &[])?,
                "by_body",
                "service-c-v1",
            ) == 1)
                .then_some(()))
        },
    )?;
    let beside_bad_object = applied.elapsed();
    let v1_only = cluster.get(&client, url, 20, &[])?;
    ensure!(
        count(&v1_only, "by_body", "service-c-v1") == 20,
        "{v1_only}"
    );
    ensure!(
        rejected_objects(&agent, "VirtualService")? == 1.0,
        "mesh_config_rejected_objects"
    );
    // Never seen valid: left out.
    let rejected = outcomes(&agent)?;
    ensure!(
        rejected == ["VirtualService shop/reviews: left_out"],
        "{rejected:?}"
    );
    let event = wait_for("the Event on the rejected object", TIMEOUT, || {
        Ok(rejection_events(&cluster, "shop", "reviews")?.pop())
    })?;
    ensure!(
        event["type"] == "Warning"
            && event["involvedObject"]["kind"] == "VirtualService"
            && event["message"]
                .as_str()
                .is_some_and(|m| m.contains("spec.http[0].timeout: invalid duration \"soon\"")),
        "{event}"
    );

    // meshed's own VirtualService made invalid (everything to v2 now): rejected, its last good
    // version (everything to v1) stays in force and /config_dump says so; corrected, it is
    // taken.
    let invalid = canary.replace("  - route:", "  - timeout: soon\n    route:");
    cluster.apply(&invalid)?;
    let kept = [
        "rejected, the last good version stays in force: kubernetes: VirtualService \
         meshed/service-c: spec.http[0].timeout: invalid duration \"soon\"",
    ];
    wait_for("the invalid VirtualService rejected", TIMEOUT, || {
        Ok((logged(&agent, &kept) == 1).then_some(()))
    })?;
    let still_v1 = cluster.get(&client, url, 20, &[])?;
    ensure!(
        count(&still_v1, "by_body", "service-c-v1") == 20,
        "{still_v1}"
    );
    ensure!(rejected_objects(&agent, "VirtualService")? == 2.0);
    ensure!(
        outcomes(&agent)?
            == [
                "VirtualService meshed/service-c: last_good_in_force",
                "VirtualService shop/reviews: left_out"
            ],
        "{:?}",
        outcomes(&agent)?
    );
    cluster.apply(&canary)?;
    wait_for(
        "the corrected VirtualService in force",
        PROMPTLY * 5,
        || {
            Ok((count(
                &cluster.get(&client, url, 1, &[])?,
                "by_body",
                "service-c-v2",
            ) == 1)
                .then_some(()))
        },
    )?;

    // Under 200 rps: the VirtualService deleted, then v2 taken out of the Service (the
    // EndpointSlice controller drops its endpoint; the pod runs on): no request fails.
    let mut load = cluster.node.spawn_in_pod(&client, {
        let mut get = Command::new(mesh_tests::upstream_binary()?);
        get.args(["get", "--url", url, "--count", "600", "--rate", "200"])
            .args(["--concurrency", "4", "--quiet"]);
        get
    })?;
    std::thread::sleep(Duration::from_millis(1000));
    cluster.kubectl(&["-n", "meshed", "delete", "virtualservice", "service-c"])?;
    std::thread::sleep(Duration::from_millis(500));
    cluster.kubectl(&[
        "-n",
        "meshed",
        "label",
        "pod",
        "service-c-v2",
        "app=retired",
        "--overwrite",
    ])?;
    ensure!(load.finish(TIMEOUT)?.success(), "{}", load.stderr().text());
    let summary = load.stdout().json_lines().pop().context("no summary")?;
    eprintln!("endpoint change under 200 rps: {summary}");
    ensure!(count(&summary, "by_status", "200") == 600, "{summary}");
    endpoints(&[&v1])?;
    let all_v1 = cluster.get(&client, url, 20, &[])?;
    ensure!(count(&all_v1, "by_body", "service-c-v1") == 20, "{all_v1}");

    // The DestinationRule made invalid: rejected, its last good version (the subsets) stays,
    // and must outlive the relist after the outage: the canary applied then needs its subsets.
    cluster.apply(&format!(
        "{destination_rule}  trafficPolicy: {{connectionPool: {{tcp: {{connectTimeout: soon}}}}}}\n"
    ))?;
    let invalid_rule = [
        "rejected, the last good version stays in force",
        "DestinationRule meshed/service-c",
        "connectTimeout",
    ];
    wait_for("the invalid DestinationRule rejected", TIMEOUT, || {
        Ok((logged(&agent, &invalid_rule) == 1).then_some(()))
    })?;

    // The outage: requests go on with the last state, the agent stays ready and counts.
    let node = cluster.node.clone();
    let kinds = [
        "Pod",
        "Service",
        "EndpointSlice",
        "VirtualService",
        "DestinationRule",
    ];
    let failures_before: Vec<f64> = kinds
        .iter()
        .map(|kind| watch_failures(&agent, kind))
        .collect::<Result<_>>()?;
    node.run_on_node(|| cluster.control_plane.stop_apiserver())??;
    let outage = Instant::now();
    while outage.elapsed() < OUTAGE {
        let summary = cluster.get(&client, url, 20, &[])?;
        ensure!(
            count(&summary, "by_body", "service-c-v1") == 20,
            "during the outage: {summary}"
        );
        let (ready, body) = agent.admin_get("/ready")?;
        ensure!(ready == 200, "not ready during the outage: {body}");
        std::thread::sleep(Duration::from_millis(500));
    }
    for (kind, before) in kinds.iter().zip(&failures_before) {
        let now = watch_failures(&agent, kind)?;
        ensure!(
            now > *before,
            "{kind}'s watch failures: {before} before the outage, {now} during"
        );
        ensure!(
            logged(&agent, &["watch failed", kind]) >= 1,
            "{kind}'s failing watch is logged:\n{}",
            agent.stderr_text()
        );
    }

    // etcd compacted past every resourceVersion handed out so far, then the API server back:
    // a watch from before the outage is 410 Gone.
    let compacted = node.run_on_node(|| cluster.control_plane.compact_etcd())??;
    node.run_on_node(|| cluster.control_plane.start_apiserver())??;
    let back = Instant::now();
    let expired = cluster.kubectl(&[
        "get",
        "--raw",
        &format!(
            "/apis/networking.istio.io/v1beta1/virtualservices?watch=1&timeoutSeconds=1&resourceVersion={}",
            compacted - 1
        ),
    ])?;
    ensure!(
        expired.contains("\"code\":410"),
        "a watch from before the compaction: {expired}"
    );

    // Changes after it: v2 back in the Service and a VirtualService sending everything there.
    cluster.kubectl(&[
        "-n",
        "meshed",
        "label",
        "pod",
        "service-c-v2",
        "app=service-c",
        "--overwrite",
    ])?;
    // The relist after `410 Gone` finds the DestinationRule still invalid: its last good
    // version stays (a relist once dropped every object it found invalid), counted, not logged
    // again. The canary needs its subsets.
    wait_for("the DestinationRule watch relisted", TIMEOUT, || {
        Ok((logged(&agent, &["watch recovered", "DestinationRule"]) >= 1).then_some(()))
    })?;
    ensure!(rejected_objects(&agent, "DestinationRule")? == 1.0);
    ensure!(
        logged(&agent, &invalid_rule) == 1,
        "{}",
        agent.stderr_text()
    );
    cluster.apply(&canary)?;
    wait_for("caught up after the outage", TIMEOUT, || {
        let summary = cluster.get(&client, url, 20, &[])?;
        Ok((count(&summary, "by_body", "service-c-v2") == 20).then_some(()))
    })?;
    let caught_up = back.elapsed();
    for kind in ["EndpointSlice", "VirtualService"] {
        ensure!(
            logged(&agent, &["watch recovered", kind]) >= 1,
            "{kind}'s watch recovery is logged:\n{}",
            agent.stderr_text()
        );
    }
    ensure!(
        outcomes(&agent)?
            == [
                "DestinationRule meshed/service-c: last_good_in_force",
                "VirtualService shop/reviews: left_out"
            ],
        "{:?}",
        outcomes(&agent)?
    );

    // Restarted with the bad objects still there: ready with everything else in force at once.
    // Nothing was persisted, so the DestinationRule, never seen valid by this agent, is left
    // out: the canary's subsets answer 503 NR until it is mended. The bad objects are reported
    // again, and no second Event is made for the same version.
    let mut agent = agent;
    agent.process().signal(libc::SIGTERM)?;
    agent.process().wait_timeout(TIMEOUT)?;
    drop(agent);
    let restarted = Instant::now();
    let agent = cluster.agent()?;
    let ready_in = restarted.elapsed();
    let summary = cluster.get(&client, url, 20, &[])?;
    ensure!(
        count(&summary, "by_status", "503") == 20
            && count(&summary, "by_body", "cluster not found") == 20,
        "{summary}"
    );
    ensure!(
        outcomes(&agent)?
            == [
                "DestinationRule meshed/service-c: left_out",
                "VirtualService shop/reviews: left_out"
            ],
        "{:?}",
        outcomes(&agent)?
    );
    ensure!(logged(&agent, &reported) == 1, "{}", agent.stderr_text());
    ensure!(
        logged(
            &agent,
            &[
                "left out of the config in force",
                "DestinationRule meshed/service-c",
                "connectTimeout"
            ]
        ) == 1,
        "{}",
        agent.stderr_text()
    );
    ensure!(rejected_objects(&agent, "VirtualService")? == 1.0);
    ensure!(rejected_objects(&agent, "DestinationRule")? == 1.0);
    cluster.apply(destination_rule)?;
    let mended = Instant::now();
    wait_for("the mended DestinationRule in force", TIMEOUT, || {
        let summary = cluster.get(&client, url, 20, &[])?;
        Ok((count(&summary, "by_body", "service-c-v2") == 20).then_some(()))
    })?;
    let mended_took = mended.elapsed();
    ensure!(rejected_objects(&agent, "DestinationRule")? == 0.0);
    std::thread::sleep(Duration::from_millis(500));
    let events = rejection_events(&cluster, "shop", "reviews")?;
    ensure!(events.len() == 1, "one Event per bad version: {events:?}");
    let events = rejection_events(&cluster, "meshed", "service-c")?;
    ensure!(
        events.len() == 2,
        "one Event per bad version of each of meshed's two objects: {events:?}"
    );
    eprintln!(
        "cluster up in {:.1} s; canary in force {canary_took:?} after kubectl apply; another \
         namespace's change in force {beside_bad_object:?} with an invalid VirtualService \
         present; caught up {caught_up:?} after the API server was back, with the invalid \
         DestinationRule's last good version; restarted with the invalid objects present, ready \
         in {ready_in:?}, the DestinationRule left out until mended (in force {mended_took:?} \
         after kubectl apply); test took {:.1} s",
        cluster_up.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Namespace shop's rules: `reviews` is invalid (its timeout is no duration), `ratings` names a
/// host and subset that do not exist yet (a warning).
const SHOP_RULES: &str = "apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - timeout: soon
    route:
    - destination: {host: reviews}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings]
  http:
  - route:
    - destination: {host: ratings, subset: v9}
";

/// `/config_dump`'s rejected objects, as `Kind namespace/name: outcome`.
fn outcomes(agent: &Agent) -> Result<Vec<String>> {
    let (_, dump) = agent.admin_get("/config_dump")?;
    let dump: Value = serde_json::from_str(&dump)?;
    Ok(dump["rejected"]
        .as_array()
        .context("/config_dump's rejected")?
        .iter()
        .map(|r| {
            let text = |field: &str| r[field].as_str().unwrap_or_default().to_owned();
            format!(
                "{} {}/{}: {}",
                text("kind"),
                text("namespace"),
                text("name"),
                text("outcome")
            )
        })
        .collect())
}

/// `mesh_config_rejected_objects{kind}`.
fn rejected_objects(agent: &Agent, kind: &str) -> Result<f64> {
    let (_, metrics) = agent.admin_get("/metrics")?;
    let wanted = format!("mesh_config_rejected_objects{{kind=\"{kind}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&wanted)?.parse().ok())
        .with_context(|| format!("no {wanted}in /metrics"))
}

/// The `Rejected` Events about `namespace/name`, as `kubectl get events` shows them.
fn rejection_events(cluster: &Cluster, namespace: &str, name: &str) -> Result<Vec<Value>> {
    let events: Value = serde_json::from_str(&cluster.kubectl(&[
        "-n",
        namespace,
        "get",
        "events",
        "--field-selector",
        &format!("involvedObject.name={name},reason=Rejected"),
        "-o",
        "json",
    ])?)?;
    Ok(events["items"].as_array().cloned().unwrap_or_default())
}
