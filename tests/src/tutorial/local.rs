//! Local mode: the tutorial's apps as pods of one simulated node, the agent reading its rules
//! from a folder (`mesh-agent apply` writes them there through the admin API), and `cargo xtask
//! demo scale|crash|repair` standing in for `oc`.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{
    demo_dir, install_runtimes, prepare_apps, wait_until_routed, Action, PodInfo, World, APP_PORT,
    DEPLOYMENTS,
};
use crate::{
    mesh_config::{examples_dir, Backend, ConfigDir},
    Agent, Pod, PodProcess, SimNode,
};

/// Where the ingress gateway listens inside the node (`curl 127.0.0.1/service-a` there).
pub const GATEWAY: &str = "127.0.0.1:80";
const SERVICES: [(&str, Ipv4Addr); 3] = [
    ("service-a", Ipv4Addr::new(10, 96, 0, 10)),
    ("service-b", Ipv4Addr::new(10, 96, 0, 20)),
    ("service-c", Ipv4Addr::new(10, 96, 0, 30)),
];

struct Replica {
    pod: Pod,
    process: PodProcess,
}

/// How long pods may take to answer `/health` after they start: a JVM and Deno's first run take
/// seconds each on a busy 2-core machine, and they start together.
const HEALTHY_WITHIN: Duration = Duration::from_secs(120);
/// Pods still starting after this are named in a progress line ...
const SLOW_START: Duration = Duration::from_secs(2);
/// ... and named again this often while they keep everyone waiting.
const STILL_WAITING_EVERY: Duration = Duration::from_secs(10);

pub struct LocalTutorial {
    // Field order is drop order: the agent and the apps go before the node.
    agent: Agent,
    replicas: Mutex<BTreeMap<String, Vec<Replica>>>,
    /// Pods of replicas that were scaled away, reused when scaling up again.
    spare: Mutex<BTreeMap<String, Vec<Pod>>>,
    config: ConfigDir,
    node: SimNode,
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
    pub fn start(progress: &dyn Fn(&str)) -> Result<LocalTutorial> {
        crate::require_root();
        let deno = install_runtimes(progress)?;
        prepare_apps(progress)?;
        let node = SimNode::new()?;
        for (name, vip) in SERVICES {
            node.add_host(name, vip)?;
        }
        let config = ConfigDir::new()?;
        config.copy_example("gateway.yml", "gateway.yml")?;
        let mut replicas = BTreeMap::new();
        for (deployment, ..) in DEPLOYMENTS {
            let pod = node.add_pod(&format!("{deployment}-0"))?;
            let process = start_app(&node, &pod, deployment, &deno)?;
            replicas.insert(deployment.to_owned(), vec![Replica { pod, process }]);
        }
        wait_healthy(&node, replicas.values_mut().flatten(), progress)?;
        write_services(&config, &replicas)?;
        let pods: Vec<&Pod> = replicas.values().flatten().map(|r| &r.pod).collect();
        let dir = config.path().to_str().context("config path")?.to_owned();
        let agent = Agent::start(&node, &pods, &["--config", &dir, "--ingress", GATEWAY])?;
        Ok(LocalTutorial {
            agent,
            replicas: Mutex::new(replicas),
            spare: Mutex::new(BTreeMap::new()),
            config,
            node,
            deno,
        })
    }
}

/// Every tutorial move as our command stands in for it: `mesh-agent apply` for `oc create` and
/// `oc replace` alike (from the repository root), `cargo xtask demo` for the rest (while a
/// live demo runs).
impl World for LocalTutorial {
    fn node(&self) -> &SimNode {
        &self.node
    }

    fn agent(&self) -> &Agent {
        &self.agent
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

    /// `mesh-agent apply -f deploy/examples/<file>` against the running agent.
    fn apply(&self, action: &Action) -> Result<String> {
        let (Action::Create(file) | Action::Replace(file)) = action else {
            bail!("{action:?} is not a file to apply");
        };
        let mut command = Command::new(crate::agent_binary()?);
        command
            .arg("apply")
            .arg("--admin-socket")
            .arg(self.agent.admin_socket())
            .arg("-f")
            .arg(examples_dir().join(file));
        let mut process = self.node.spawn_on_node(command)?;
        let status = process.finish(Duration::from_secs(30))?;
        let out = format!("{}{}", process.stdout().text(), process.stderr().text());
        if !status.success() {
            bail!("apply {file} failed: {out}");
        }
        Ok(out)
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
                self.agent
                    .admin_request("DELETE", &format!("/pods/{}", replica.pod.name()), "")?;
                spare
                    .entry(deployment.to_owned())
                    .or_default()
                    .push(replica.pod);
            }
            let mut started = Vec::new();
            while current.len() + started.len() < count {
                let pod = match spare.get_mut(deployment).and_then(Vec::pop) {
                    Some(pod) => pod,
                    None => {
                        let index = current.len() + started.len();
                        self.node.add_pod(&format!("{deployment}-{index}"))?
                    }
                };
                let process = start_app(&self.node, &pod, deployment, &self.deno)?;
                started.push(Replica { pod, process });
            }
            // Quiet: the live demo's loop shows the scale command's answer when it is done.
            wait_healthy(&self.node, started.iter_mut(), &|_| {})?;
            for replica in &started {
                let body = format!(
                    r#"{{"name":"{}","netns":"{}"}}"#,
                    replica.pod.name(),
                    replica.pod.netns_path().display()
                );
                let (status, answer) = self.agent.admin_request("POST", "/pods", &body)?;
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

/// Waits until every replica answers `/health`, all at once (they start in parallel). Pods still
/// starting after `SLOW_START` are named in a progress line, again every `STILL_WAITING_EVERY`,
/// and each of them once it answers. Fails at once if an app exits.
fn wait_healthy<'r>(
    node: &SimNode,
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
            if answers_health(node, &replica.pod) {
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
    for (service, vip) in SERVICES {
        let mut backends = Vec::new();
        for (deployment, app, version) in DEPLOYMENTS.iter().filter(|(_, app, _)| *app == service) {
            for replica in replicas.get(*deployment).into_iter().flatten() {
                backends.push((&replica.pod, [("app", *app), ("version", *version)]));
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
