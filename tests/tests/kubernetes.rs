//! Kubernetes mode against a test API server that speaks the real list/watch protocol: pods are
//! processes in kubelet-named cgroups on a simulated node; enrollment follows labels; rules and
//! endpoints arrive through watches; the agent rides out a flaky API server.

use std::{
    net::Ipv4Addr,
    process::Command,
    time::{Duration, Instant},
};

use mesh_tests::{kube_api::FakeApiServer, require_root, Agent, Pod, PodProcess, SimNode};
use serde_json::Value;

const UPSTREAM: &str = env!("CARGO_BIN_EXE_upstream");
const NODE: &str = "node-1";
const MESH_LABEL: &str = "sidecarless.io/mesh";
const SERVICE_C: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const TIMEOUT: Duration = Duration::from_secs(60);

struct Cluster {
    node: SimNode,
    api: FakeApiServer,
    /// Holds `kubeconfig`; removed on drop.
    _kubeconfig_dir: tempfile::TempDir,
    kubeconfig: std::path::PathBuf,
    _processes: Vec<PodProcess>,
}

/// A pod of the cluster: a process in the node's kubelet-style cgroup for its UID.
struct KubePod {
    pod: Pod,
    namespace: &'static str,
    uid: String,
    labels: Vec<(&'static str, &'static str)>,
    node: &'static str,
}

impl KubePod {
    fn yaml(&self) -> String {
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  uid: {}\n  labels: {{{}}}\n\
             spec:\n  nodeName: {}\n  containers: [{{name: app, image: app}}]\nstatus:\n  phase: Running\n  podIP: {}\n",
            self.pod.name(),
            self.namespace,
            self.uid,
            labels.join(", "),
            self.node,
            self.pod.ip()
        )
    }
}

fn start_cluster() -> Cluster {
    require_root();
    let node = SimNode::new().unwrap();
    let api = node
        .run_on_node(|| FakeApiServer::start("127.0.0.1:0".parse().unwrap()))
        .unwrap()
        .unwrap();
    let kubeconfig_dir = tempfile::tempdir().unwrap();
    let kubeconfig = kubeconfig_dir.path().join("kubeconfig");
    api.kubeconfig(&kubeconfig).unwrap();
    api.apply_yaml(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: meshed, labels: {sidecarless.io/mesh: enabled}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n",
    )
    .unwrap();
    Cluster {
        node,
        api,
        _kubeconfig_dir: kubeconfig_dir,
        kubeconfig,
        _processes: Vec::new(),
    }
}

impl Cluster {
    /// Adds a pod running `args` (an `upstream` command) in a kubelet-style cgroup.
    fn pod(
        &mut self,
        name: &str,
        namespace: &'static str,
        labels: &[(&'static str, &'static str)],
        node: &'static str,
        args: &[&str],
    ) -> KubePod {
        let pod = self.node.add_pod(name).unwrap();
        // Unique across every test of this process: the agent finds pods by UID in /proc.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let uid = format!("{:08x}-1111-2222-3333-{n:012x}", std::process::id());
        let mut command = Command::new(UPSTREAM);
        command.args(args);
        let process = self.node.spawn_in_pod(&pod, command).unwrap();
        if args.first() == Some(&"serve") {
            process
                .stdout()
                .wait_for_json(|l| l["listening"].is_string(), TIMEOUT)
                .unwrap();
        }
        self.node
            .move_to_cgroup(process.pid(), &format!("kubepods/besteffort/pod{uid}/app"))
            .unwrap();
        self._processes.push(process);
        let kube_pod = KubePod {
            pod,
            namespace,
            uid,
            labels: labels.to_vec(),
            node,
        };
        self.api.apply_yaml(&kube_pod.yaml()).unwrap();
        kube_pod
    }

    fn agent(&self) -> Agent {
        let agent = Agent::spawn_kubernetes(&self.node, &self.kubeconfig, NODE).unwrap();
        agent.wait_ready(Duration::from_secs(20)).unwrap();
        agent
    }

    /// service-c with its endpoints and the subsets' DestinationRule.
    fn service_c(&self, endpoints: &[&KubePod]) {
        let mut yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: service-c, namespace: meshed}}\n\
             spec: {{clusterIP: {SERVICE_C}, ports: [{{name: http, port: 8080}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: service-c-1, namespace: meshed, labels: {{kubernetes.io/service-name: service-c}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n"
        );
        for pod in endpoints {
            yaml.push_str(&format!(
                "- addresses: [{}]\n  conditions: {{ready: true}}\n  targetRef: {{kind: Pod, name: {}, namespace: meshed}}\n",
                pod.pod.ip(),
                pod.pod.name()
            ));
        }
        yaml.push_str(
            "---\napiVersion: networking.istio.io/v1alpha3\nkind: DestinationRule\nmetadata: {name: service-c, namespace: meshed}\n\
             spec:\n  host: service-c\n  subsets:\n  - {name: version-v1, labels: {version: v1}}\n  - {name: version-v2, labels: {version: v2}}\n",
        );
        self.api.apply_yaml(&yaml).unwrap();
    }

    /// `count` GETs of service-c from `client`: the client's summary line.
    fn get(&self, client: &KubePod, count: usize, extra: &[&str]) -> Value {
        let count = count.to_string();
        let mut command = Command::new(UPSTREAM);
        command
            .args([
                "get",
                "--url",
                "http://service-c:8080/",
                "--count",
                &count,
                "--quiet",
            ])
            .args(extra);
        let mut process = self.node.spawn_in_pod(&client.pod, command).unwrap();
        assert!(process.finish(TIMEOUT).unwrap().success());
        process.stdout().json_lines().pop().unwrap()
    }
}

fn enrolled(agent: &Agent) -> Vec<String> {
    let (_, body) = agent.admin_get("/pods").unwrap();
    let pods: Value = serde_json::from_str(&body).unwrap();
    let mut names: Vec<String> = pods
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            format!(
                "{}/{}",
                p["namespace"].as_str().unwrap(),
                p["name"].as_str().unwrap()
            )
        })
        .collect();
    names.sort();
    names
}

fn wait_until(what: &str, within: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

fn count(summary: &Value, field: &str, key: &str) -> u64 {
    summary[field][key].as_u64().unwrap_or(0)
}

#[test]
fn enrollment_follows_pod_and_namespace_labels_on_this_node_only() {
    let mut cluster = start_cluster();
    let serve = |name: &'static str| ["serve", "--listen", "0.0.0.0:8080", "--name", name];
    cluster.pod("by-namespace", "meshed", &[], NODE, &serve("a"));
    cluster.pod(
        "opted-out",
        "meshed",
        &[(MESH_LABEL, "disabled")],
        NODE,
        &serve("b"),
    );
    let by_label = cluster.pod(
        "by-label",
        "plain",
        &[(MESH_LABEL, "enabled")],
        NODE,
        &serve("c"),
    );
    cluster.pod("unlabelled", "plain", &[], NODE, &serve("d"));
    cluster.pod("other-node", "meshed", &[], "node-2", &serve("e"));
    let agent = cluster.agent();
    wait_until("labelled pods enrolled", Duration::from_secs(5), || {
        enrolled(&agent) == ["meshed/by-namespace", "plain/by-label"]
    });

    // The cluster is the truth: the admin API does not change config or enrollment here.
    let (status, _) = agent
        .admin_request("DELETE", "/pods/meshed/by-namespace", "")
        .unwrap();
    assert_eq!(status, 403);

    // Removing the label unenrolls the pod within a second, without restarting it.
    let unlabelled = KubePod {
        labels: vec![],
        ..by_label
    };
    cluster.api.apply_yaml(&unlabelled.yaml()).unwrap();
    let took = wait_until("label removal", Duration::from_secs(1), || {
        enrolled(&agent) == ["meshed/by-namespace"]
    });
    println!("unenrolled {took:?} after the label was removed");
    // And labelling it again enrolls it again.
    let relabelled = KubePod {
        labels: vec![(MESH_LABEL, "enabled")],
        ..unlabelled
    };
    cluster.api.apply_yaml(&relabelled.yaml()).unwrap();
    let took = wait_until("label added", Duration::from_secs(1), || {
        enrolled(&agent).len() == 2
    });
    println!("enrolled {took:?} after the label was added");
}

#[test]
fn rules_and_endpoints_arrive_through_watches_and_survive_a_flaky_api_server() {
    let mut cluster = start_cluster();
    cluster.node.add_host("service-c", SERVICE_C).unwrap();
    let serve = |name: &'static str| ["serve", "--listen", "0.0.0.0:8080", "--name", name];
    let v1 = cluster.pod(
        "service-c-v1-0",
        "meshed",
        &[("app", "service-c"), ("version", "v1")],
        NODE,
        &serve("v1"),
    );
    let v2 = cluster.pod(
        "service-c-v2-0",
        "meshed",
        &[("app", "service-c"), ("version", "v2")],
        NODE,
        &serve("v2"),
    );
    let client = cluster.pod(
        "client",
        "meshed",
        &[],
        NODE,
        &["serve", "--listen", "0.0.0.0:9", "--name", "client"],
    );
    cluster.service_c(&[&v1, &v2]);
    let agent = cluster.agent();
    wait_until("client enrolled", Duration::from_secs(5), || {
        enrolled(&agent).contains(&"meshed/client".to_owned())
    });
    let both = cluster.get(&client, 40, &[]);
    assert_eq!(count(&both, "by_status", "200"), 40, "{both}");

    // The tutorial's canary VirtualService, added through a watch event: in force within 1 s.
    let canary =
        std::fs::read_to_string(mesh_tests::mesh_config::examples_dir().join("canary/4-vs-v2.yml"))
            .unwrap()
            .replace(
                "name: service-c\n",
                "name: service-c\n  namespace: meshed\n",
            );
    cluster.api.apply_yaml(&canary).unwrap();
    let took = wait_until("canary applied", Duration::from_secs(1), || {
        count(&cluster.get(&client, 1, &[]), "by_body", "v2") == 1
    });
    println!("canary VirtualService in force {took:?} after the watch event");
    assert_eq!(count(&cluster.get(&client, 20, &[]), "by_body", "v2"), 20);

    // An EndpointSlice change (a replica removed) under load: no request fails.
    let mut load = cluster
        .node
        .spawn_in_pod(&client.pod, {
            let mut c = Command::new(UPSTREAM);
            c.args([
                "get",
                "--url",
                "http://service-c:8080/",
                "--count",
                "600",
                "--rate",
                "200",
                "--concurrency",
                "4",
                "--quiet",
            ]);
            c
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    cluster
        .api
        .delete("VirtualService", Some("meshed"), "service-c")
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    cluster.service_c(&[&v1]);
    assert!(load.finish(TIMEOUT).unwrap().success());
    let summary = load.stdout().json_lines().pop().unwrap();
    println!("endpoint change under 200 rps: {summary}");
    assert_eq!(count(&summary, "by_status", "200"), 600, "{summary}");
    assert_eq!(count(&cluster.get(&client, 20, &[]), "by_body", "v1"), 20);

    // The API server closes every watch, then forgets history (410 Gone), then goes away for
    // 10 s: routing goes on with the last good state, and changes made after it is back apply.
    cluster.api.close_watches();
    cluster.api.expire_history();
    cluster.api.set_available(false);
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(10) {
        let summary = cluster.get(&client, 20, &[]);
        assert_eq!(
            count(&summary, "by_body", "v1"),
            20,
            "during the outage: {summary}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    cluster.api.set_available(true);
    cluster.service_c(&[&v2]);
    let took = wait_until(
        "caught up after the outage",
        Duration::from_secs(30),
        || count(&cluster.get(&client, 1, &[]), "by_body", "v2") == 1,
    );
    println!("caught up {took:?} after the API server came back");
}
