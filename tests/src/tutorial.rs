//! The tutorial's world on a simulated node: apps A (Python) → B (Deno) → C (Java, v1 and v2)
//! as pods, the agent enrolling them with the ingress gateway, and the tutorial's moves (apply
//! a rule, crash or repair a replica, scale a deployment). Shared by `cargo xtask demo` and the
//! end-to-end tests that replay the tutorial.

use std::{
    collections::BTreeMap,
    fmt,
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    mesh_config::{examples_dir, Backend, ConfigDir},
    Agent, Pod, PodProcess, SimNode,
};

/// Where the ingress gateway listens inside the node (`curl 127.0.0.1/service-a` there).
pub const GATEWAY: &str = "127.0.0.1:80";
const APP_PORT: u16 = 8080;
const SERVICES: [(&str, Ipv4Addr); 3] = [
    ("service-a", Ipv4Addr::new(10, 96, 0, 10)),
    ("service-b", Ipv4Addr::new(10, 96, 0, 20)),
    ("service-c", Ipv4Addr::new(10, 96, 0, 30)),
];

/// The tutorial's deployments: (name, app, version).
const DEPLOYMENTS: [(&str, &str, &str); 4] = [
    ("service-a", "service-a", "v1"),
    ("service-b", "service-b", "v1"),
    ("service-c-v1", "service-c", "v1"),
    ("service-c-v2", "service-c", "v2"),
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

pub struct Tutorial {
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

impl Tutorial {
    /// Installs what the apps need (Deno via npm, a JDK if `java` is missing) and compiles
    /// Service C (once each, cached in `~/.cache/mesh`), then starts the node, one replica of
    /// each deployment, and the agent with the gateway.
    ///
    /// `progress` gets a line for each phase that can take long (installing a runtime, waiting
    /// for pods that are slow to answer), so a first run on a fresh machine never goes quiet.
    pub fn start(progress: &dyn Fn(&str)) -> Result<Tutorial> {
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
        Ok(Tutorial {
            agent,
            replicas: Mutex::new(replicas),
            spare: Mutex::new(BTreeMap::new()),
            config,
            node,
            deno,
        })
    }

    pub fn node(&self) -> &SimNode {
        &self.node
    }

    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// `curl GATEWAY/service-a`, from inside the node: (status, body).
    pub fn call(&self) -> Result<(u16, String)> {
        self.node
            .run_on_node(|| http_get(GATEWAY, "/service-a", &[]))?
    }

    /// Like [`call`](Self::call), with extra request headers.
    pub fn call_with(&self, headers: &[(&str, &str)]) -> Result<(u16, String)> {
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.node.run_on_node(move || {
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            http_get(GATEWAY, "/service-a", &headers)
        })?
    }

    /// `mesh-agent apply -f deploy/examples/<example>` against the running agent.
    pub fn apply(&self, example: &str) -> Result<String> {
        let mut command = Command::new(crate::agent_binary()?);
        command
            .arg("apply")
            .arg("-f")
            .arg(examples_dir().join(example));
        let mut process = self.node.spawn_on_node(command)?;
        let status = process.finish(Duration::from_secs(30))?;
        let out = format!("{}{}", process.stdout().text(), process.stderr().text());
        if !status.success() {
            bail!("apply {example} failed: {out}");
        }
        Ok(out)
    }

    /// `curl <pod>:8080/crash` (or `/repair`), straight to the pod as `oc port-forward` does.
    pub fn crash(&self, pod: &str) -> Result<()> {
        self.pod_request(pod, "/crash")
    }

    pub fn repair(&self, pod: &str) -> Result<()> {
        self.pod_request(pod, "/repair")
    }

    fn pod_request(&self, pod: &str, path: &str) -> Result<()> {
        let ip = self.pod_ip(pod)?;
        let path = path.to_owned();
        let (status, body) = self
            .node
            .run_on_node(move || http_get(&format!("{ip}:{APP_PORT}"), &path, &[]))??;
        if status != 200 {
            bail!("{pod}: {status} {body}");
        }
        Ok(())
    }

    fn pod_ip(&self, pod: &str) -> Result<Ipv4Addr> {
        let replicas = self.replicas.lock().expect("replicas");
        replicas
            .values()
            .flatten()
            .find(|r| r.pod.name() == pod)
            .map(|r| r.pod.ip())
            .with_context(|| format!("no running pod {pod}"))
    }

    /// Running pods of a deployment.
    pub fn pods(&self, deployment: &str) -> Vec<String> {
        let replicas = self.replicas.lock().expect("replicas");
        replicas
            .get(deployment)
            .map(|r| r.iter().map(|r| r.pod.name().to_owned()).collect())
            .unwrap_or_default()
    }

    /// `oc scale deploy/<deployment> --replicas N`: starts or stops pods and updates the
    /// service's endpoints (the agent picks the change up from its config folder). Call it from
    /// the thread that started the tutorial: pods die with the thread that spawned them.
    pub fn scale(&self, deployment: &str, count: usize) -> Result<()> {
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
        write_services(&self.config, &replicas)
    }

    /// Runs `count` calls through the gateway from the node, `concurrency` at a time, and
    /// returns each response body (errors as `ERROR <status> <body>`).
    pub fn load(&self, count: usize, concurrency: usize) -> Result<Vec<String>> {
        let args = [
            "get".to_owned(),
            "--url".to_owned(),
            format!("http://{GATEWAY}/service-a"),
            "--count".to_owned(),
            count.to_string(),
            "--concurrency".to_owned(),
            concurrency.to_string(),
        ];
        let mut command = Command::new(crate::upstream_binary()?);
        command.args(&args);
        let mut process = self.node.spawn_on_node(command)?;
        let status = process.finish(Duration::from_secs(300))?;
        if !status.success() {
            bail!("load failed: {}", process.stderr().text());
        }
        Ok(process
            .stdout()
            .json_lines()
            .iter()
            .filter(|line| line["summary"] != true)
            .map(|line| match line["status"].as_u64() {
                Some(200) => line["body"].as_str().unwrap_or_default().trim().to_owned(),
                status => format!(
                    "ERROR {} {}",
                    status.unwrap_or(0),
                    line["error"]
                        .as_str()
                        .or(line["body"].as_str())
                        .unwrap_or_default()
                ),
            })
            .collect())
    }
}

/// What one chain answer says: C's version, or that the chain failed somewhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Version(String),
    Error,
}

/// Reads `Service A <- Service B <- Service C | v2 | 0 | 12`.
pub fn answer(body: &str) -> Answer {
    let body = body.trim();
    if !body.starts_with("Service A <- Service B <- Service C |") {
        return Answer::Error;
    }
    match body.split('|').nth(1) {
        Some(version) => Answer::Version(version.trim().to_owned()),
        None => Answer::Error,
    }
}

/// What a batch of answers held: how many came from C v1, from C v2, and how many failed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub v1: usize,
    pub v2: usize,
    pub errors: usize,
}

impl Tally {
    pub fn add(&mut self, answer: &Answer) {
        match answer {
            Answer::Version(v) if v == "v1" => self.v1 += 1,
            Answer::Version(v) if v == "v2" => self.v2 += 1,
            _ => self.errors += 1,
        }
    }

    pub fn total(&self) -> usize {
        self.v1 + self.v2 + self.errors
    }

    /// `n` is between `low`% and `high`% of the total, bounds included (integer arithmetic,
    /// so 80 of 1000 is exactly 8%).
    pub fn share_within(&self, n: usize, low: usize, high: usize) -> bool {
        let total = self.total();
        total > 0 && n * 100 >= low * total && n * 100 <= high * total
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let percent = |n: usize| (n * 100).checked_div(self.total()).unwrap_or(0);
        write!(
            f,
            "v1 {} ({}%)  v2 {} ({}%)  errors {}",
            self.v1,
            percent(self.v1),
            self.v2,
            percent(self.v2),
            self.errors
        )
    }
}

/// Tallies a batch of response bodies.
pub fn tally(bodies: &[String]) -> Tally {
    let mut counts = Tally::default();
    for body in bodies {
        counts.add(&answer(body));
    }
    counts
}

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
    let addr = format!("{}:{APP_PORT}", pod.ip());
    matches!(
        node.run_on_node(move || http_get(&addr, "/health", &[])),
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

/// `deploy/demo/install-runtimes.sh`: returns the Deno binary.
pub fn install_runtimes(progress: &dyn Fn(&str)) -> Result<PathBuf> {
    let stdout = run_script(
        Command::new(demo_dir().join("install-runtimes.sh")),
        "install-runtimes: ",
        progress,
    )?;
    let deno = stdout
        .lines()
        .last()
        .context("install-runtimes.sh printed no path")?;
    Ok(PathBuf::from(deno.trim()))
}

/// `deploy/demo/run-app.sh prepare`: compiles Service C once per source and JDK, so replicas
/// start without compiling.
fn prepare_apps(progress: &dyn Fn(&str)) -> Result<()> {
    let mut command = Command::new(demo_dir().join("run-app.sh"));
    command.arg("prepare");
    run_script(command, "run-app: ", progress).map(drop)
}

/// Runs one of the demo's scripts to the end and returns its stdout. The script's own progress
/// lines (those starting with `prefix`: what it found, what it does, how long that took) go to
/// `progress` as they come; the rest of its stderr (apt-get's, npm's, javac's) only into the
/// error if it fails.
fn run_script(mut command: Command, prefix: &str, progress: &dyn Fn(&str)) -> Result<String> {
    let name = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| {
            Path::new(part)
                .file_name()
                .unwrap_or(part)
                .to_string_lossy()
        })
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {name}"))?;
    let stderr = child.stderr.take().context("the script's stderr")?;
    // Their stdout is a line at most, so reading stderr to the end first cannot block them.
    let mut log = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.with_context(|| format!("reading {name}'s output"))?;
        if let Some(message) = line.strip_prefix(prefix) {
            progress(message);
        }
        log.push(line);
    }
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for {name}"))?;
    if !output.status.success() {
        bail!("{name} failed ({}):\n{}", output.status, log.join("\n"));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn demo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/demo")
}

/// A GET from the calling thread's namespace.
fn http_get(addr: &str, path: &str, headers: &[(&str, &str)]) -> Result<(u16, String)> {
    crate::http::request(addr.parse()?, "GET", path, headers, "")
}

/// A running pod of the tutorial's world, for showing to a user.
#[derive(Clone, Debug)]
pub struct PodInfo {
    pub deployment: String,
    pub name: String,
    pub ip: Ipv4Addr,
}

impl Tutorial {
    /// Every running pod, by deployment.
    pub fn running_pods(&self) -> Vec<PodInfo> {
        let replicas = self.replicas.lock().expect("replicas");
        replicas
            .iter()
            .flat_map(|(deployment, replicas)| {
                replicas.iter().map(|r| PodInfo {
                    deployment: deployment.clone(),
                    name: r.pod.name().to_owned(),
                    ip: r.pod.ip(),
                })
            })
            .collect()
    }

    /// Opens connections inside the node from any thread, without borrowing the tutorial.
    pub fn dialer(&self) -> NodeDialer {
        NodeDialer {
            netns: self.node.netns_path(),
        }
    }
}

/// Connects to addresses inside the node's network namespace (the gateway, the admin API). Each
/// call enters the namespace on a fresh thread; the socket stays in the node's namespace when
/// that thread is gone, so the caller can use it anywhere (the demo's relays on the host do).
#[derive(Clone, Debug)]
pub struct NodeDialer {
    netns: PathBuf,
}

impl NodeDialer {
    pub fn connect(&self, addr: SocketAddr) -> Result<TcpStream> {
        crate::netns::run_in(&self.netns, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        })?
        .with_context(|| format!("connecting to {addr} in the node"))
    }
}

/// How many requests the steps send: the end-to-end test's counts, or fewer for
/// `cargo xtask demo --steps`. The expectations are shares, so they hold for both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pace {
    Full,
    Quick,
}

/// One move of the tutorial. Both of the tutorial's verbs (`oc create`, `oc replace`) are our
/// `mesh-agent apply`; they are kept apart to show the tutorial's command faithfully.
#[derive(Clone, Debug)]
pub enum Action {
    /// `oc create -f kubernetes/<file>`, our `mesh-agent apply -f deploy/examples/<file>`.
    Create(&'static str),
    /// `oc replace -f kubernetes/<file>`, our `mesh-agent apply -f deploy/examples/<file>`.
    Replace(&'static str),
    /// `oc scale deploy/<deployment> --replicas N`.
    Scale(&'static str, usize),
    /// `curl localhost:8080/crash` through `oc port-forward pod/<pod>`.
    Crash(&'static str),
    /// `curl localhost:8080/repair` through `oc port-forward pod/<pod>`.
    Repair(&'static str),
}

impl Action {
    /// Our command for this move, as a user types it in local mode (from the repository root,
    /// while `cargo xtask demo` runs).
    pub fn ours(&self) -> String {
        match self {
            Action::Create(file) | Action::Replace(file) => {
                format!("target/debug/mesh-agent apply -f deploy/examples/{file}")
            }
            Action::Scale(deployment, n) => format!("cargo xtask demo scale {deployment} {n}"),
            Action::Crash(pod) => format!("cargo xtask demo crash {pod}"),
            Action::Repair(pod) => format!("cargo xtask demo repair {pod}"),
        }
    }

    /// The tutorial's command for the same move (its files live under `kubernetes/` in the
    /// tutorial's repository and under `deploy/examples/` here, with the same names).
    pub fn tutorial(&self) -> String {
        match self {
            Action::Create(file) => format!("oc create -f {file}"),
            Action::Replace(file) => format!("oc replace -f {file}"),
            Action::Scale(deployment, n) => format!("oc scale deploy/{deployment} --replicas {n}"),
            Action::Crash(pod) => format!("curl localhost:8080/crash  (port-forward {pod})"),
            Action::Repair(pod) => format!("curl localhost:8080/repair (port-forward {pod})"),
        }
    }
}

/// How a step is measured.
#[derive(Clone, Debug)]
pub enum Measure {
    /// `count` calls through the gateway, four at a time; `check` judges their tally.
    Load {
        count: usize,
        check: fn(&Tally) -> bool,
    },
    /// Calls through the gateway until `pod`, just repaired, answers again. Istio (Envoy) brings
    /// an ejected endpoint back at the first outlier sweep after its ejection ends, and each
    /// ejection lasts `baseEjectionTime` × the number of times the endpoint was ejected (less
    /// the sweeps that found it healthy since). So the bound is the ejection left when the
    /// replica is repaired, as the agent's `/clusters` shows it, plus one `interval` and
    /// `BACK_SLACK`; and that ejection left must itself be one Envoy could be in (at most
    /// `baseEjectionTime` × the agent's ejection count).
    BackAfterEjection { pod: &'static str },
}

/// One step of the tutorial: what to do, how to measure it, and what the tutorial promises.
#[derive(Clone, Debug)]
pub struct Step {
    pub name: &'static str,
    pub actions: Vec<Action>,
    pub measure: Measure,
    /// The promise, for a human.
    pub expected: &'static str,
}

/// What a step showed.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// For a human: the tally, or how long the repaired replica took.
    pub shown: String,
    pub passed: bool,
    pub tally: Option<Tally>,
    pub elapsed: Option<Duration>,
    /// A few failed answers, to show what went wrong.
    pub error_samples: Vec<String>,
}

/// The crashed (and later repaired) replica: the first of the two `service-c-v2` replicas.
pub const CRASHED_POD: &str = "service-c-v2-0";

/// `interval` and `baseEjectionTime` of `circuit-breaker/2-destination-rules.yml`, the outlier
/// detection in force when the replica is repaired (a unit test holds them to the file).
const OUTLIER_INTERVAL: Duration = Duration::from_secs(2);
const BASE_EJECTION_TIME: Duration = Duration::from_secs(10);
/// How much later than its sweep the repaired replica may serve: it is probed every
/// `BACK_PROBE_EVERY` and each call reaches it with even odds (one of two replicas), so 2 s
/// leave over a dozen calls (a miss of all of them: 1 in 10,000), and a busy machine's delays.
const BACK_SLACK: Duration = Duration::from_secs(2);
const BACK_PROBE_EVERY: Duration = Duration::from_millis(100);

/// The tutorial in order, from the baseline to the repaired replica. Shared by the end-to-end
/// test (`Pace::Full`) and `cargo xtask demo --steps` (`Pace::Quick`).
pub fn steps(pace: Pace) -> Vec<Step> {
    let n = |full: usize, quick: usize| match pace {
        Pace::Full => full,
        Pace::Quick => quick,
    };
    let load = |count, check| Measure::Load { count, check };
    vec![
        Step {
            name: "baseline: no rules",
            actions: vec![],
            measure: load(n(100, 20), |t| t.errors == 0 && t.v1 > 0 && t.v2 > 0),
            expected: "v1 and v2, no errors",
        },
        Step {
            name: "canary 1: 100% v1",
            actions: vec![
                Action::Create("destination-rules.yml"),
                Action::Create("canary/1-vs-v1.yml"),
            ],
            measure: load(n(1000, 200), |t| t.v2 == 0 && t.errors == 0),
            expected: "v2 0%, no errors",
        },
        Step {
            name: "canary 2: 90/10",
            actions: vec![Action::Replace("canary/2-vs-v1_and_v2_90_10.yml")],
            measure: load(n(1000, 200), |t| {
                t.errors == 0 && t.share_within(t.v2, 8, 12)
            }),
            expected: "v2 10% ± 2, no errors",
        },
        Step {
            name: "canary 3: 50/50",
            actions: vec![Action::Replace("canary/3-vs-v1_and_v2_50_50.yml")],
            measure: load(n(1000, 200), |t| {
                t.errors == 0 && t.share_within(t.v2, 47, 53)
            }),
            expected: "v2 50% ± 3, no errors",
        },
        Step {
            name: "canary 4: 100% v2",
            actions: vec![Action::Replace("canary/4-vs-v2.yml")],
            measure: load(n(1000, 200), |t| t.v1 == 0 && t.errors == 0),
            expected: "v2 100%, no errors",
        },
        Step {
            name: "reset VS, v1 → 0, v2 → 2 replicas",
            actions: vec![
                Action::Replace("circuit-breaker/1-vs.yml"),
                Action::Scale("service-c-v1", 0),
                Action::Scale("service-c-v2", 2),
            ],
            measure: load(n(100, 40), |t| t.v1 == 0 && t.errors == 0),
            expected: "v2 100%, no errors",
        },
        Step {
            name: "crashed replica, no policy",
            actions: vec![Action::Crash(CRASHED_POD)],
            measure: load(n(400, 200), |t| t.share_within(t.errors, 35, 65)),
            expected: "errors 35-65%",
        },
        Step {
            name: "crashed, circuit breaker",
            actions: vec![Action::Replace("circuit-breaker/2-destination-rules.yml")],
            measure: load(n(400, 200), |t| t.share_within(t.errors, 0, 5)),
            expected: "errors ≤ 5%",
        },
        Step {
            name: "crashed, circuit breaker + retries",
            actions: vec![Action::Replace("circuit-breaker/3-vs-retry.yml")],
            measure: load(n(1000, 400), |t| t.errors == 0),
            expected: "no errors",
        },
        Step {
            name: "repaired replica back",
            actions: vec![Action::Repair(CRASHED_POD)],
            measure: Measure::BackAfterEjection { pod: CRASHED_POD },
            expected: "≤ ejection left + 4 s",
        },
    ]
}

impl Tutorial {
    /// Does one of the tutorial's moves. Call it from the thread that started the tutorial (it
    /// may scale).
    pub fn act(&self, action: &Action) -> Result<()> {
        match action {
            Action::Create(file) | Action::Replace(file) => self.apply(file).map(drop),
            Action::Scale(deployment, count) => {
                self.scale(deployment, *count)?;
                // The agent reads the rewritten endpoints from its config folder within ~100 ms.
                std::thread::sleep(Duration::from_millis(500));
                Ok(())
            }
            Action::Crash(pod) => self.crash(pod),
            Action::Repair(pod) => self.repair(pod),
        }
    }

    /// Does a step's moves, then measures it.
    pub fn run_step(&self, step: &Step) -> Result<Outcome> {
        for action in &step.actions {
            self.act(action)
                .with_context(|| format!("{}: {}", step.name, action.ours()))?;
        }
        match &step.measure {
            Measure::Load { count, check } => self.measure_load(*count, *check),
            Measure::BackAfterEjection { pod } => self.measure_back_after_ejection(pod),
        }
    }

    fn measure_load(&self, count: usize, check: fn(&Tally) -> bool) -> Result<Outcome> {
        let bodies = self.load(count, 4)?;
        let tally = tally(&bodies);
        let error_samples = bodies
            .iter()
            .filter(|body| answer(body) == Answer::Error)
            .take(3)
            .cloned()
            .collect();
        Ok(Outcome {
            shown: format!("{tally} of {}", tally.total()),
            // A short batch (the load tool lost answers) fails too.
            passed: tally.total() == count && check(&tally),
            tally: Some(tally),
            elapsed: None,
            error_samples,
        })
    }

    fn measure_back_after_ejection(&self, pod: &str) -> Result<Outcome> {
        let marker = replica_marker(pod)?;
        let start = Instant::now();
        let left = self.ejection_left(pod)?;
        let ejections = self.ejection_count()?;
        let bound = left + OUTLIER_INTERVAL + BACK_SLACK;
        let left_text = format!("ejection left {:.1} s", left.as_secs_f64());
        let outcome = |shown: String, passed: bool, elapsed: Option<Duration>| Outcome {
            shown,
            passed,
            tally: None,
            elapsed,
            error_samples: vec![],
        };
        // Envoy's ejection is baseEjectionTime × a multiplier that grows by one per ejection: an
        // ejection longer than that would be the agent's fault, not a bound to wait for.
        if left > BASE_EJECTION_TIME * ejections {
            return Ok(outcome(
                format!(
                    "{left_text}, more than {} s × {ejections} ejections",
                    BASE_EJECTION_TIME.as_secs()
                ),
                false,
                None,
            ));
        }
        // Keep calling a little past the bound, so a late return is still measured and shown.
        while start.elapsed() < bound + Duration::from_secs(5) {
            let (_, body) = self.call()?;
            if body.contains(&marker) {
                let elapsed = start.elapsed();
                return Ok(outcome(
                    format!(
                        "{pod} back after {:.1} s; {left_text}",
                        elapsed.as_secs_f64()
                    ),
                    elapsed <= bound,
                    Some(elapsed),
                ));
            }
            std::thread::sleep(BACK_PROBE_EVERY);
        }
        Ok(outcome(
            format!(
                "{pod} not back after {:.0} s; {left_text}",
                start.elapsed().as_secs_f64()
            ),
            false,
            None,
        ))
    }

    /// How long `pod` stays ejected from now on, as the agent's `/clusters` shows it: the
    /// longest ejection left in any cluster that has it, zero if it is in service everywhere.
    pub fn ejection_left(&self, pod: &str) -> Result<Duration> {
        #[derive(serde::Deserialize)]
        struct Cluster {
            endpoints: Vec<Endpoint>,
        }
        #[derive(serde::Deserialize)]
        struct Endpoint {
            address: SocketAddr,
            ejected_for: Option<Duration>,
        }
        let address = SocketAddr::from((self.pod_ip(pod)?, APP_PORT));
        let (status, body) = self.agent.admin_get("/clusters")?;
        if status != 200 {
            bail!("/clusters answered {status}: {body}");
        }
        let clusters: Vec<Cluster> = serde_json::from_str(&body).context("parsing /clusters")?;
        let mine: Vec<&Endpoint> = clusters
            .iter()
            .flat_map(|c| &c.endpoints)
            .filter(|e| e.address == address)
            .collect();
        if mine.is_empty() {
            bail!("{pod} ({address}) is in no cluster of the agent: {body}");
        }
        Ok(mine
            .iter()
            .filter_map(|e| e.ejected_for)
            .max()
            .unwrap_or_default())
    }

    /// How many ejections outlier detection made so far, all endpoints together (`/metrics`).
    fn ejection_count(&self) -> Result<u32> {
        let (status, text) = self.agent.admin_get("/metrics")?;
        if status != 200 {
            bail!("/metrics answered {status}: {text}");
        }
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
            .context("parsing /metrics")?;
        let sample = scrape
            .samples
            .iter()
            .find(|s| {
                s.metric.starts_with("mesh_engine_events")
                    && s.labels.get("event") == Some("ejection")
            })
            .context("/metrics has no mesh_engine_events{event=\"ejection\"}")?;
        match sample.value {
            prometheus_parse::Value::Counter(n) | prometheus_parse::Value::Untyped(n) => {
                Ok(n as u32)
            }
            _ => bail!("mesh_engine_events{{event=\"ejection\"}} is not a counter"),
        }
    }
}

/// What C's answer contains when `pod` served it: `| v2 | 0 |` for `service-c-v2-0` (C shows its
/// version and the part of its host name after the last `-`).
fn replica_marker(pod: &str) -> Result<String> {
    let (deployment, suffix) = pod.rsplit_once('-').context("pod name without a suffix")?;
    let (_, _, version) = DEPLOYMENTS
        .iter()
        .find(|(name, ..)| *name == deployment)
        .with_context(|| format!("{pod} is not a pod of the tutorial's deployments"))?;
    Ok(format!("| {version} | {suffix} |"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repaired_steps_bound_uses_the_circuit_breakers_own_durations() {
        let file = examples_dir().join("circuit-breaker/2-destination-rules.yml");
        let yaml = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<&str> = yaml.lines().map(str::trim).collect();
        for expected in [
            format!("interval: {}s", OUTLIER_INTERVAL.as_secs()),
            format!("baseEjectionTime: {}s", BASE_EJECTION_TIME.as_secs()),
        ] {
            assert!(
                lines.contains(&expected.as_str()),
                "{expected:?} not in {yaml}"
            );
        }
    }

    #[test]
    fn a_replica_is_recognised_by_its_version_and_pod_suffix() {
        assert_eq!(replica_marker("service-c-v2-0").unwrap(), "| v2 | 0 |");
        assert_eq!(replica_marker("service-c-v1-1").unwrap(), "| v1 | 1 |");
        assert!(replica_marker("service-d-0").is_err());
    }
}
