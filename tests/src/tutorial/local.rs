//! Local mode: the tutorial's apps as pods of a simulated network of one or more nodes, an agent
//! on each node reading the rules from one shared folder (`mesh-agent apply` adds to them through
//! each agent's admin API), and `cargo xtask demo scale|crash|repair` standing in for `oc`. Spread
//! over three nodes, A runs on node 1, B and C v1 on node 2, C v2 on node 3; with mutual TLS on,
//! the agents carry every pod-to-pod connection inside their tunnels.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{
    demo_dir, install_runtimes, prepare_apps, wait_until_routed, Action, PodInfo, World, APP_PORT,
    DEPLOYMENTS,
};
use crate::{
    mesh_config::{examples_dir, Backend, ConfigDir},
    Agent, Pod, PodProcess, SimNetwork, SimNode,
};

/// Where the ingress gateway listens inside the node (`curl 127.0.0.1/service-a` there).
pub const GATEWAY: &str = "127.0.0.1:80";
/// The demo's Services (`deploy/demo/kubernetes/`): (name, VIP, the deployments it selects).
/// Besides the tutorial's three, one per version of C, which Gateway API routes send to.
const SERVICES: [(&str, Ipv4Addr, &[&str]); 5] = [
    ("service-a", Ipv4Addr::new(10, 96, 0, 10), &["service-a"]),
    ("service-b", Ipv4Addr::new(10, 96, 0, 20), &["service-b"]),
    (
        "service-c",
        Ipv4Addr::new(10, 96, 0, 30),
        &["service-c-v1", "service-c-v2"],
    ),
    (
        "service-c-v1",
        Ipv4Addr::new(10, 96, 0, 31),
        &["service-c-v1"],
    ),
    (
        "service-c-v2",
        Ipv4Addr::new(10, 96, 0, 32),
        &["service-c-v2"],
    ),
];

struct Replica {
    pod: Pod,
    /// Index of the node it runs on.
    node: usize,
    process: PodProcess,
}

/// Where the tutorial's pods run, and how the agents carry traffic between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Nodes of the simulated network, an agent on each; the gateway is on the first.
    pub nodes: usize,
    /// Agents are given a CA (`mesh-agent ca init`, then `run --ca`): pod-to-pod traffic goes
    /// inside mutual TLS between them, with each pod's SPIFFE identity.
    pub mutual_tls: bool,
}

impl Layout {
    /// Every pod on one node, plaintext.
    pub const ONE_NODE: Layout = Layout {
        nodes: 1,
        mutual_tls: false,
    };
    /// The issue's cluster: A on node 1, B and C v1 on node 2, C v2 on node 3, mutual TLS.
    pub const THREE_NODES: Layout = Layout {
        nodes: 3,
        mutual_tls: true,
    };

    /// The node (index from 0) of replica `replica` of `deployment`: each deployment starts on
    /// its home node (A 1, B 2, C v1 2, C v2 3, wrapping around fewer nodes), further replicas
    /// on the nodes after it.
    fn node_of(self, deployment: &str, replica: usize) -> usize {
        let home = match deployment {
            "service-a" => 0,
            "service-b" | "service-c-v1" => 1,
            _ => 2,
        };
        (home + replica) % self.nodes
    }
}

/// How long pods may take to answer `/health` after they start: a JVM and Deno's first run take
/// seconds each on a busy 2-core machine, and they start together.
const HEALTHY_WITHIN: Duration = Duration::from_secs(120);
/// Pods still starting after this are named in a progress line ...
const SLOW_START: Duration = Duration::from_secs(2);
/// ... and named again this often while they keep everyone waiting.
const STILL_WAITING_EVERY: Duration = Duration::from_secs(10);

pub struct LocalTutorial {
    // Field order is drop order: the agents and the apps go before the nodes.
    /// One per node, in the nodes' order; the first serves the gateway.
    agents: Vec<Agent>,
    replicas: Mutex<BTreeMap<String, Vec<Replica>>>,
    /// Pods of replicas that were scaled away (with their node), reused when scaling up again.
    spare: Mutex<BTreeMap<String, Vec<(usize, Pod)>>>,
    config: ConfigDir,
    /// The CA the agents mint their pods' certificates from, when mutual TLS is on.
    _ca: Option<tempfile::TempDir>,
    layout: Layout,
    network: SimNetwork,
    /// The Deno binary `install_runtimes` found or installed, for replicas started by scaling.
    deno: PathBuf,
}

impl LocalTutorial {
    /// Installs what the apps need (Deno via npm, a JDK if `java` is missing) and compiles
    /// Service C (once each, cached in `~/.cache/mesh`), then starts the node, one replica of
    /// each deployment, and the agent with the gateway.
    ///
    /// `progress` gets a line for each phase that can take long (installing a runtime, waiting
    /// for pods that are slow to answer), so a first run on a fresh machine never goes quiet.
    pub fn start(layout: Layout, progress: &dyn Fn(&str)) -> Result<LocalTutorial> {
        crate::require_root();
        let deno = install_runtimes(progress)?;
        prepare_apps(progress)?;
        let network = SimNetwork::new(layout.nodes)?;
        for (name, vip, _) in SERVICES {
            network.add_host(name, vip)?;
        }
        let config = ConfigDir::new()?;
        config.copy_example("gateway.yml", "gateway.yml")?;
        let mut replicas = BTreeMap::new();
        for (deployment, ..) in DEPLOYMENTS {
            let index = layout.node_of(deployment, 0);
            let node = network.node(index)?;
            let pod = node.add_pod(&format!("{deployment}-0"))?;
            let process = start_app(node, &pod, deployment, &deno)?;
            let replica = Replica {
                pod,
                node: index,
                process,
            };
            replicas.insert(deployment.to_owned(), vec![replica]);
        }
        wait_healthy(network.nodes(), replicas.values_mut().flatten(), progress)?;
        write_services(&config, &replicas)?;
        let ca = layout.mutual_tls.then(make_ca).transpose()?;
        let dir = config.path().to_str().context("config path")?.to_owned();
        let mut agents = Vec::with_capacity(layout.nodes);
        for (index, node) in network.nodes().iter().enumerate() {
            let pods: Vec<&Pod> = replicas
                .values()
                .flatten()
                .filter(|r| r.node == index)
                .map(|r| &r.pod)
                .collect();
            let mut args = vec!["--config", dir.as_str()];
            if index == 0 {
                args.extend(["--ingress", GATEWAY]);
            }
            let ca_dir = ca.as_ref().map(|ca| ca.path().join("ca"));
            if let Some(ca_dir) = &ca_dir {
                args.extend(["--ca", ca_dir.to_str().context("CA path")?]);
            }
            agents.push(Agent::start(node, &pods, &args)?);
        }
        Ok(LocalTutorial {
            agents,
            replicas: Mutex::new(replicas),
            spare: Mutex::new(BTreeMap::new()),
            config,
            _ca: ca,
            layout,
            network,
            deno,
        })
    }

    /// `mesh-agent apply -f <file>` against every node's agent (each keeps what it is given
    /// over the shared folder); returns the first agent's answer.
    pub fn apply_file(&self, file: &Path) -> Result<String> {
        let mut answers = String::new();
        for (index, agent) in self.agents.iter().enumerate() {
            let mut command = Command::new(crate::agent_binary()?);
            command
                .arg("apply")
                .arg("--admin-socket")
                .arg(agent.admin_socket())
                .arg("-f")
                .arg(file);
            let mut process = self.node_at(index).spawn_on_node(command)?;
            let status = process.finish(Duration::from_secs(30))?;
            let out = format!("{}{}", process.stdout().text(), process.stderr().text());
            if !status.success() {
                bail!(
                    "apply {} to node {}'s agent failed: {out}",
                    file.display(),
                    index + 1
                );
            }
            if answers.is_empty() {
                answers = out;
            }
        }
        Ok(answers)
    }

    /// Runs `command` inside the first replica of `deployment`, on its node: a client that
    /// calls as that workload does.
    pub fn spawn_in(&self, deployment: &str, command: Command) -> Result<PodProcess> {
        let replicas = self.replicas.lock().expect("replicas");
        let replica = replicas
            .get(deployment)
            .and_then(|r| r.first())
            .with_context(|| format!("no replica of {deployment}"))?;
        self.node_at(replica.node)
            .spawn_in_pod(&replica.pod, command)
    }

    /// The simulated network the pods and agents run on.
    pub fn network(&self) -> &SimNetwork {
        &self.network
    }

    fn node_at(&self, index: usize) -> &Arc<SimNode> {
        &self.network.nodes()[index]
    }
}

/// `mesh-agent ca init <tmp>/ca`: the root the agents mint their pods' certificates from.
fn make_ca() -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("mesh-tutorial-ca.")
        .tempdir()
        .context("a directory for the tutorial's CA")?;
    crate::ca_init(&crate::agent_binary()?, &dir.path().join("ca"))?;
    Ok(dir)
}

/// Every tutorial move as our command stands in for it: `mesh-agent apply` for `oc create` and
/// `oc replace` alike (from the repository root), `cargo xtask demo` for the rest (while a
/// live demo runs).
impl World for LocalTutorial {
    fn node(&self) -> &SimNode {
        self.node_at(0)
    }

    fn agent(&self) -> &Agent {
        &self.agents[0]
    }

    fn agents(&self) -> Vec<&Agent> {
        self.agents.iter().collect()
    }

    fn ids(&self) -> Vec<String> {
        self.network.ids()
    }

    /// From the pod's own node, as `oc port-forward` goes through the pod's kubelet: nothing
    /// of the harness crosses the underlay, whose capture must see only the mesh's tunnels.
    fn pod_request(&self, pod: &str, path: &str) -> Result<()> {
        let ip = self.pod_ip(pod)?;
        let node = self
            .network
            .node_of_pod_ip(ip)
            .with_context(|| format!("no node has pod {pod} ({ip})"))?;
        let (status, body) = node.run_on_node(|| {
            crate::http::request(SocketAddr::from((ip, APP_PORT)), "GET", path, &[], "")
        })??;
        if status != 200 {
            bail!("{pod}: {status} {body}");
        }
        Ok(())
    }

    fn gateway(&self) -> SocketAddr {
        GATEWAY.parse().expect("the gateway's address")
    }

    fn running_pods(&self) -> Result<Vec<PodInfo>> {
        let replicas = self.replicas.lock().expect("replicas");
        let mut pods: Vec<PodInfo> = replicas
            .iter()
            .flat_map(|(deployment, replicas)| {
                replicas.iter().map(|r| PodInfo {
                    deployment: deployment.clone(),
                    name: r.pod.name().to_owned(),
                    ip: r.pod.ip(),
                })
            })
            .collect();
        pods.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(pods)
    }

    /// `mesh-agent apply -f deploy/examples/<file>` against every node's agent.
    fn apply(&self, action: &Action) -> Result<String> {
        let (Action::Create(file) | Action::Replace(file)) = action else {
            bail!("{action:?} is not a file to apply");
        };
        self.apply_file(&examples_dir().join(file))
    }

    /// Starts or stops pods, enrolls the new ones and rewrites the services' endpoints (the
    /// agent picks the change up from its config folder).
    fn scale(&self, deployment: &str, count: usize) -> Result<()> {
        {
            let mut replicas = self.replicas.lock().expect("replicas");
            let mut spare = self.spare.lock().expect("spare pods");
            let current = replicas
                .get_mut(deployment)
                .with_context(|| format!("no deployment {deployment}"))?;
            while current.len() > count {
                let mut replica = current.pop().expect("non-empty");
                let _ = replica.process.stop(Duration::from_secs(5));
                self.agents[replica.node].admin_request(
                    "DELETE",
                    &format!("/pods/{}", replica.pod.name()),
                    "",
                )?;
                spare
                    .entry(deployment.to_owned())
                    .or_default()
                    .push((replica.node, replica.pod));
            }
            let mut started = Vec::new();
            while current.len() + started.len() < count {
                let (node, pod) = match spare.get_mut(deployment).and_then(Vec::pop) {
                    Some(spare) => spare,
                    None => {
                        let index = current.len() + started.len();
                        let node = self.layout.node_of(deployment, index);
                        let pod = self
                            .node_at(node)
                            .add_pod(&format!("{deployment}-{index}"))?;
                        (node, pod)
                    }
                };
                let process = start_app(self.node_at(node), &pod, deployment, &self.deno)?;
                started.push(Replica { pod, node, process });
            }
            // Quiet: the live demo's loop shows the scale command's answer when it is done.
            wait_healthy(self.network.nodes(), started.iter_mut(), &|_| {})?;
            for replica in &started {
                let body = format!(
                    r#"{{"name":"{}","netns":"{}"}}"#,
                    replica.pod.name(),
                    replica.pod.netns_path().display()
                );
                let agent = &self.agents[replica.node];
                let (status, answer) = agent.admin_request("POST", "/pods", &body)?;
                if status != 200 {
                    bail!("enrolling {}: {answer}", replica.pod.name());
                }
            }
            current.extend(started);
            write_services(&self.config, &replicas)?;
        }
        wait_until_routed(self, ROUTED_WITHIN)
    }

    fn command(&self, action: &Action) -> String {
        let pod = |deployment| {
            self.first_pod(deployment)
                .map_or_else(|_| format!("<a {deployment} pod>"), |pod| pod.name)
        };
        match action {
            Action::Create(file) | Action::Replace(file) if self.agents.len() > 1 => {
                format!("cargo xtask demo apply deploy/examples/{file}")
            }
            Action::Create(file) | Action::Replace(file) => {
                format!("target/debug/mesh-agent apply -f deploy/examples/{file}")
            }
            Action::Scale(deployment, n) => format!("cargo xtask demo scale {deployment} {n}"),
            Action::Crash(deployment) => format!("cargo xtask demo crash {}", pod(deployment)),
            Action::Repair(deployment) => format!("cargo xtask demo repair {}", pod(deployment)),
        }
    }
}

/// How long the agent may take to route to scaled replicas: it reads the rewritten endpoints
/// from its config folder within ~100 ms.
const ROUTED_WITHIN: Duration = Duration::from_secs(10);

fn start_app(node: &SimNode, pod: &Pod, deployment: &str, deno: &Path) -> Result<PodProcess> {
    let (_, app, version) = DEPLOYMENTS
        .iter()
        .find(|(name, ..)| *name == deployment)
        .with_context(|| format!("unknown deployment {deployment}"))?;
    let mut command = Command::new(demo_dir().join("run-app.sh"));
    command
        .arg(app)
        .env("PORT", APP_PORT.to_string())
        .env("SERVICE_B_HOST", format!("service-b:{APP_PORT}"))
        .env("SERVICE_C_HOST", format!("service-c:{APP_PORT}"))
        .env("VERSION", version)
        .env("HOSTNAME", pod.name())
        .env("DENO", deno);
    node.spawn_in_pod(pod, command)
}

/// Waits until every replica answers `/health` (asked from its own node, as a kubelet probes:
/// nothing of the harness crosses the underlay), all at once (they start in parallel). Pods still
/// starting after `SLOW_START` are named in a progress line, again every `STILL_WAITING_EVERY`,
/// and each of them once it answers. Fails at once if an app exits.
fn wait_healthy<'r>(
    nodes: &[Arc<SimNode>],
    replicas: impl IntoIterator<Item = &'r mut Replica>,
    progress: &dyn Fn(&str),
) -> Result<()> {
    let start = Instant::now();
    let mut waiting: Vec<&mut Replica> = replicas.into_iter().collect();
    let mut next_report = start + SLOW_START;
    let mut reported = false;
    while !waiting.is_empty() {
        let mut still_waiting = Vec::new();
        for replica in waiting {
            if answers_health(&nodes[replica.node], &replica.pod) {
                if reported {
                    progress(&format!(
                        "{} answers after {:.1} s",
                        replica.pod.name(),
                        start.elapsed().as_secs_f64()
                    ));
                }
            } else if let Some(status) = replica.process.try_status()? {
                bail!(
                    "{} exited ({status}) before answering /health:\n{}",
                    replica.pod.name(),
                    replica.process.stderr().text()
                );
            } else {
                still_waiting.push(replica);
            }
        }
        waiting = still_waiting;
        if waiting.is_empty() {
            break;
        }
        let names = || {
            let names: Vec<String> = waiting
                .iter()
                .map(|r| format!("{} ({})", r.pod.name(), runtime(r.pod.name())))
                .collect();
            names.join(", ")
        };
        if start.elapsed() > HEALTHY_WITHIN {
            bail!(
                "no answer on /health after {HEALTHY_WITHIN:?} from {}",
                names()
            );
        }
        if Instant::now() >= next_report {
            let verb = if reported { "still waiting" } else { "waiting" };
            progress(&format!(
                "{verb} for {} to answer /health ({:.0} s) ...",
                names(),
                start.elapsed().as_secs_f64()
            ));
            reported = true;
            next_report = Instant::now() + STILL_WAITING_EVERY;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn answers_health(node: &SimNode, pod: &Pod) -> bool {
    let addr = SocketAddr::from((pod.ip(), APP_PORT));
    matches!(
        node.run_on_node(move || crate::http::request(addr, "GET", "/health", &[], "")),
        Ok(Ok((200, _)))
    )
}

/// What a pod's app runs on, for a user watching it start.
fn runtime(pod: &str) -> &'static str {
    if pod.starts_with("service-a") {
        "Python"
    } else if pod.starts_with("service-b") {
        "Deno"
    } else {
        "Java"
    }
}

fn write_services(config: &ConfigDir, replicas: &BTreeMap<String, Vec<Replica>>) -> Result<()> {
    for (service, vip, selected) in SERVICES {
        let mut backends = Vec::new();
        for (deployment, app, version) in DEPLOYMENTS.iter().filter(|(d, ..)| selected.contains(d))
        {
            for replica in replicas.get(*deployment).into_iter().flatten() {
                // Enrolled, so in the mesh: with `--ca` the agents tunnel to it.
                let labels = [("app", *app), ("version", *version), crate::IN_MESH];
                backends.push((&replica.pod, labels));
            }
        }
        let backends: Vec<Backend<'_>> = backends
            .iter()
            .map(|(pod, labels)| Backend { pod, labels })
            .collect();
        config.service(service, vip, APP_PORT, "http", &backends)?;
    }
    Ok(())
}
