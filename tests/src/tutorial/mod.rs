//! The tutorial "Service Mesh for Developers" on this machine: apps A (Python) → B (Deno) → C
//! (Java, v1 and v2) as pods, the agent enrolling them and serving the ingress gateway, and the
//! tutorial's steps (apply a rule, scale a deployment, crash or repair a replica) measured as the
//! tutorial shows them. Shared by `cargo xtask demo` and the end-to-end tests that replay it.
//!
//! The steps run in either of two [`World`]s:
//! - [`local::LocalTutorial`]: one simulated node or several (an agent on each), the agents
//!   reading rules from a folder, our commands (`mesh-agent apply`, `cargo xtask demo scale`)
//!   standing in for `oc`;
//! - [`kubernetes::KubernetesTutorial`]: a real Kubernetes control plane and the kubelet stand-in
//!   on the simulated node, the demo apps as Deployments, the agent in Kubernetes mode, and
//!   `kubectl` doing every change, the seed's `oc` commands one for one.

pub mod kubernetes;
pub mod local;

use std::{
    fmt,
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{Agent, SimNode};

const APP_PORT: u16 = 8080;

/// The tutorial's deployments: (name, app, version).
const DEPLOYMENTS: [(&str, &str, &str); 4] = [
    ("service-a", "service-a", "v1"),
    ("service-b", "service-b", "v1"),
    ("service-c-v1", "service-c", "v1"),
    ("service-c-v2", "service-c", "v2"),
];

/// A running pod of the tutorial's world.
#[derive(Clone, Debug)]
pub struct PodInfo {
    pub deployment: String,
    pub name: String,
    pub ip: Ipv4Addr,
}

/// Where the tutorial's steps run: what differs between local mode and Kubernetes mode. The
/// steps themselves, and how they are measured, are the provided methods, the same for both.
pub trait World {
    /// The node of the gateway, where the tutorial's `curl`s run (it reaches every node's pods).
    fn node(&self) -> &SimNode;

    /// The agent of the gateway's node.
    fn agent(&self) -> &Agent;

    /// Every node's agent, the gateway's first.
    fn agents(&self) -> Vec<&Agent> {
        vec![self.agent()]
    }

    /// The ids of what the world made (nodes, underlay): what [`crate::leftovers_of`] takes.
    fn ids(&self) -> Vec<String> {
        vec![self.node().id()]
    }

    /// Where the ingress gateway listens, inside the node (the tutorial's `$ROUTE`).
    fn gateway(&self) -> SocketAddr;

    /// Every running pod of the tutorial's deployments, sorted by name.
    fn running_pods(&self) -> Result<Vec<PodInfo>>;

    /// `oc create -f` / `oc replace -f` of one of the tutorial's files.
    fn apply(&self, action: &Action) -> Result<String>;

    /// `oc scale deploy/<deployment> --replicas N`; returns once the new replicas serve and the
    /// agent routes to exactly the running ones. Call it from the thread that started the world:
    /// pods die with the thread that spawned them.
    fn scale(&self, deployment: &str, count: usize) -> Result<()>;

    /// The command a user types for `action` in this world.
    fn command(&self, action: &Action) -> String;

    /// `curl $ROUTE/service-a`, from inside the node: (status, body).
    fn call(&self) -> Result<(u16, String)> {
        self.call_with(&[])
    }

    /// Like [`call`](Self::call), with extra request headers.
    fn call_with(&self, headers: &[(&str, &str)]) -> Result<(u16, String)> {
        let gateway = self.gateway();
        self.node()
            .run_on_node(|| crate::http::request(gateway, "GET", "/service-a", headers, ""))?
    }

    /// The first (by name) running pod of `deployment`: the one the tutorial crashes.
    fn first_pod(&self, deployment: &str) -> Result<PodInfo> {
        self.running_pods()?
            .into_iter()
            .find(|pod| pod.deployment == deployment)
            .with_context(|| format!("no running pod of {deployment}"))
    }

    /// `curl localhost:8080/crash` through `oc port-forward pod/<pod>`: straight to the pod,
    /// from the node.
    fn crash(&self, pod: &str) -> Result<()> {
        self.pod_request(pod, "/crash")
    }

    fn repair(&self, pod: &str) -> Result<()> {
        self.pod_request(pod, "/repair")
    }

    fn pod_request(&self, pod: &str, path: &str) -> Result<()> {
        let ip = self.pod_ip(pod)?;
        let (status, body) = self.node().run_on_node(|| {
            crate::http::request(SocketAddr::from((ip, APP_PORT)), "GET", path, &[], "")
        })??;
        if status != 200 {
            bail!("{pod}: {status} {body}");
        }
        Ok(())
    }

    fn pod_ip(&self, pod: &str) -> Result<Ipv4Addr> {
        self.running_pods()?
            .into_iter()
            .find(|p| p.name == pod)
            .map(|p| p.ip)
            .with_context(|| format!("no running pod {pod}"))
    }

    /// Runs `count` calls through the gateway from the node, `concurrency` at a time, and
    /// returns each response body (errors as `ERROR <status> <body>`).
    fn load(&self, count: usize, concurrency: usize) -> Result<Vec<String>> {
        let args = [
            "get".to_owned(),
            "--url".to_owned(),
            format!("http://{}/service-a", self.gateway()),
            "--count".to_owned(),
            count.to_string(),
            "--concurrency".to_owned(),
            concurrency.to_string(),
        ];
        let mut command = Command::new(crate::upstream_binary()?);
        command.args(&args);
        let mut process = self.node().spawn_on_node(command)?;
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

    /// Opens connections inside the node from any thread, without borrowing the world.
    fn dialer(&self) -> NodeDialer {
        NodeDialer {
            netns: self.node().netns_path(),
        }
    }

    /// Does one of the tutorial's moves. Call it from the thread that started the world (it
    /// may scale).
    fn act(&self, action: &Action) -> Result<()> {
        match action {
            Action::Create(_) | Action::Replace(_) => self.apply(action).map(drop),
            Action::Scale(deployment, count) => self.scale(deployment, *count),
            Action::Crash(deployment) => self.crash(&self.first_pod(deployment)?.name),
            Action::Repair(deployment) => self.repair(&self.first_pod(deployment)?.name),
        }
    }

    /// Does a step's moves, then measures it.
    fn run_step(&self, step: &Step) -> Result<Outcome> {
        for action in &step.actions {
            self.act(action)
                .with_context(|| format!("{}: {}", step.name, self.command(action)))?;
        }
        match &step.measure {
            Measure::Load { count, check } => measure_load(self, *count, *check),
            Measure::BackAfterEjection { deployment } => {
                measure_back_after_ejection(self, deployment)
            }
        }
    }

    /// Waits until at least `n` access-log records of all agents together satisfy `matches`.
    fn wait_for_records(
        &self,
        n: usize,
        matches: &dyn Fn(&serde_json::Value) -> bool,
        timeout: Duration,
    ) -> Result<Vec<serde_json::Value>> {
        crate::wait_for("the agents' access-log records", timeout, || {
            let found: Vec<serde_json::Value> = self
                .agents()
                .iter()
                .flat_map(|agent| agent.access_log())
                .filter(|record| matches(record))
                .collect();
            Ok((found.len() >= n).then_some(found))
        })
    }

    /// How long `pod` stays ejected from now on, as the agents' `/clusters` show it: the
    /// longest ejection left in any cluster of any agent that has it (the agent of the caller's
    /// node ejects), zero if it is in service everywhere.
    fn ejection_left(&self, pod: &str) -> Result<Duration> {
        let address = SocketAddr::from((self.pod_ip(pod)?, APP_PORT));
        let mut clusters = Vec::new();
        for agent in self.agents() {
            clusters.extend(agent_clusters(agent)?);
        }
        let mine: Vec<&ClusterEndpoint> = clusters
            .iter()
            .flat_map(|c| &c.endpoints)
            .filter(|e| e.address == address)
            .collect();
        if mine.is_empty() {
            bail!("{pod} ({address}) is in no cluster of the agent: {clusters:?}");
        }
        Ok(mine
            .iter()
            .filter_map(|e| e.ejected_for)
            .max()
            .unwrap_or_default())
    }
}

/// One cluster of the agent's `/clusters`, the parts the tutorial reads.
#[derive(Debug, serde::Deserialize)]
struct Cluster {
    endpoints: Vec<ClusterEndpoint>,
}

#[derive(Debug, serde::Deserialize)]
struct ClusterEndpoint {
    address: SocketAddr,
    ejected_for: Option<Duration>,
}

fn agent_clusters(agent: &Agent) -> Result<Vec<Cluster>> {
    let (status, body) = agent.admin_get("/clusters")?;
    if status != 200 {
        bail!("/clusters answered {status}: {body}");
    }
    serde_json::from_str(&body).context("parsing /clusters")
}

/// Every endpoint on the apps' port the agent routes to, in any cluster.
fn routed_addresses(agent: &Agent) -> Result<std::collections::BTreeSet<SocketAddr>> {
    Ok(agent_clusters(agent)?
        .iter()
        .flat_map(|c| &c.endpoints)
        .map(|e| e.address)
        .filter(|address| address.port() == APP_PORT)
        .collect())
}

/// Waits until every agent routes to exactly the running pods of the tutorial's deployments.
fn wait_until_routed(world: &(impl World + ?Sized), within: Duration) -> Result<()> {
    crate::wait_for(
        "every agent routing to exactly the running pods",
        within,
        || {
            let running: std::collections::BTreeSet<SocketAddr> = world
                .running_pods()?
                .iter()
                .map(|pod| SocketAddr::from((pod.ip, APP_PORT)))
                .collect();
            for agent in world.agents() {
                if routed_addresses(agent)? != running {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
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

/// One move of the tutorial, as the tutorial names it; each [`World`] says how its user types it
/// ([`World::command`]).
#[derive(Clone, Debug)]
pub enum Action {
    /// `oc create -f kubernetes/<file>` (the same file is `deploy/examples/<file>` here).
    Create(&'static str),
    /// `oc replace -f kubernetes/<file>`.
    Replace(&'static str),
    /// `oc scale deploy/<deployment> --replicas N`.
    Scale(&'static str, usize),
    /// `curl localhost:8080/crash` through `oc port-forward pod/<pod>`, to the first (by name)
    /// replica of the deployment.
    Crash(&'static str),
    /// `curl localhost:8080/repair`, to the same replica.
    Repair(&'static str),
}

impl Action {
    /// The tutorial's command for this move (its files live under `kubernetes/` in the
    /// tutorial's repository and under `deploy/examples/` here, with the same names).
    pub fn tutorial(&self) -> String {
        match self {
            Action::Create(file) => format!("oc create -f {file}"),
            Action::Replace(file) => format!("oc replace -f {file}"),
            Action::Scale(deployment, n) => format!("oc scale deploy/{deployment} --replicas {n}"),
            Action::Crash(deployment) => {
                format!("curl localhost:8080/crash  (port-forward a {deployment} pod)")
            }
            Action::Repair(deployment) => {
                format!("curl localhost:8080/repair (port-forward that {deployment} pod)")
            }
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
    /// Calls through the gateway until the first replica of `deployment`, just repaired,
    /// answers again. Istio (Envoy) brings
    /// an ejected endpoint back at the first outlier sweep after its ejection ends, and each
    /// ejection lasts `baseEjectionTime` × the number of times the endpoint was ejected (less
    /// the sweeps that found it healthy since). So the bound is the ejection left when the
    /// replica is repaired, as the agent's `/clusters` shows it, plus one `interval` and
    /// `BACK_SLACK`; and that ejection left must itself be one Envoy could be in (at most
    /// `baseEjectionTime` × the agent's ejection count).
    BackAfterEjection { deployment: &'static str },
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

/// The deployment whose first replica is crashed (and later repaired).
pub const CRASHED: &str = "service-c-v2";

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
            actions: vec![Action::Crash(CRASHED)],
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
            actions: vec![Action::Repair(CRASHED)],
            measure: Measure::BackAfterEjection {
                deployment: CRASHED,
            },
            expected: "≤ ejection left + 4 s",
        },
    ]
}

/// The tutorial's VirtualServices and their Gateway API twins (`deploy/examples/gateway-api/`).
const GATEWAY_API_TWINS: [(&str, &str); 4] = [
    ("canary/1-vs-v1.yml", "gateway-api/canary/1-route-v1.yml"),
    (
        "canary/2-vs-v1_and_v2_90_10.yml",
        "gateway-api/canary/2-route-v1_and_v2_90_10.yml",
    ),
    (
        "canary/3-vs-v1_and_v2_50_50.yml",
        "gateway-api/canary/3-route-v1_and_v2_50_50.yml",
    ),
    ("canary/4-vs-v2.yml", "gateway-api/canary/4-route-v2.yml"),
];

/// The tutorial's canary (its four steps, measured as [`steps`] measures them) with Gateway API
/// HTTPRoutes attached to `service-c` in place of its VirtualServices, and no DestinationRule:
/// the routes name each version by its own Service.
pub fn gateway_api_canary_steps(pace: Pace) -> Vec<Step> {
    let twin = |file: &str| {
        GATEWAY_API_TWINS
            .iter()
            .find(|(vs, _)| *vs == file)
            .map(|&(_, route)| route)
    };
    steps(pace)
        .into_iter()
        .filter(|step| step.name.starts_with("canary"))
        .map(|mut step| {
            step.actions = step
                .actions
                .iter()
                .filter_map(|action| match action {
                    Action::Create(file) => twin(file).map(Action::Create),
                    Action::Replace(file) => twin(file).map(Action::Replace),
                    _ => None,
                })
                .collect();
            step
        })
        .collect()
}

fn measure_load(
    world: &(impl World + ?Sized),
    count: usize,
    check: fn(&Tally) -> bool,
) -> Result<Outcome> {
    let bodies = world.load(count, 4)?;
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

fn measure_back_after_ejection(world: &(impl World + ?Sized), deployment: &str) -> Result<Outcome> {
    let pod = world.first_pod(deployment)?.name;
    let marker = replica_marker(deployment, &pod)?;
    let start = Instant::now();
    let left = world.ejection_left(&pod)?;
    // The agent that ejects is the one of the callers' node: the most any agent made.
    let mut ejections = 0;
    for agent in world.agents() {
        ejections = ejections.max(ejection_count(agent)?);
    }
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
        let (_, body) = world.call()?;
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

/// How many ejections outlier detection made so far, all endpoints together (`/metrics`).
fn ejection_count(agent: &Agent) -> Result<u32> {
    let (status, text) = agent.admin_get("/metrics")?;
    if status != 200 {
        bail!("/metrics answered {status}: {text}");
    }
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .context("parsing /metrics")?;
    let sample = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric.starts_with("mesh_engine_events") && s.labels.get("event") == Some("ejection")
        })
        .context("/metrics has no mesh_engine_events{event=\"ejection\"}")?;
    match sample.value {
        prometheus_parse::Value::Counter(n) | prometheus_parse::Value::Untyped(n) => Ok(n as u32),
        _ => bail!("mesh_engine_events{{event=\"ejection\"}} is not a counter"),
    }
}

/// What C's answer contains when `pod` of `deployment` served it: `| v2 | x2k7z |` for
/// `service-c-v2-7d9f6c-x2k7z` (C shows its version and the part of its host name after the
/// last `-`).
fn replica_marker(deployment: &str, pod: &str) -> Result<String> {
    let (_, suffix) = pod.rsplit_once('-').context("pod name without a suffix")?;
    let (_, _, version) = DEPLOYMENTS
        .iter()
        .find(|(name, ..)| *name == deployment)
        .with_context(|| format!("{deployment} is not one of the tutorial's deployments"))?;
    Ok(format!("| {version} | {suffix} |"))
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

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::PermissionsExt};

    use super::*;
    use crate::mesh_config::examples_dir;

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

    /// On a fresh machine several tests install the runtimes at once (CI failed so on
    /// 2026-12-06: a second npm rewrote the prefix under the first). Each run must get a deno
    /// and npm must run once. The `npm` and `java` here are stand-ins first on `PATH`, no
    /// network: this `npm` fails if another is installing into the same prefix.
    #[test]
    fn runtimes_asked_for_by_several_at_once_are_installed_once() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        for (name, script) in [("npm", NPM_STANDIN), ("java", JAVA_STANDIN)] {
            let path = bin.join(name);
            fs::write(&path, script).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let cache = dir.path().join("cache");
        let runs: Vec<_> = (0..3)
            .map(|_| {
                Command::new(demo_dir().join("install-runtimes.sh"))
                    .env("PATH", &path)
                    .env("MESH_CACHE", &cache)
                    .env("DENO_VERSION", "9.9.9")
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for run in runs {
            let output = run.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(output.status.success(), "{stderr}");
            let deno = String::from_utf8_lossy(&output.stdout);
            assert!(
                deno.trim_end().ends_with("node_modules/deno/deno"),
                "{deno}"
            );
        }
        let installs = fs::read_to_string(cache.join("deno/npm-runs")).unwrap();
        assert_eq!(installs.lines().count(), 1, "npm ran more than once");
    }

    /// `npm install --prefix DIR deno@V ...`: after a second, a `deno` printing version V.
    const NPM_STANDIN: &str = r#"#!/bin/sh
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix="$2"; shift ;;
        deno@*) version="${1#deno@}" ;;
    esac
    shift
done
mkdir -p "$prefix"
mkdir "$prefix/.installing" || { echo "another npm is installing into $prefix" >&2; exit 1; }
echo run >> "$prefix/npm-runs"
sleep 1
mkdir -p "$prefix/node_modules/deno"
printf '#!/bin/sh\necho "deno %s (stand-in)"\n' "$version" > "$prefix/node_modules/deno/deno"
chmod +x "$prefix/node_modules/deno/deno"
rmdir "$prefix/.installing"
"#;

    /// A Java with the modules the demo needs.
    const JAVA_STANDIN: &str = r#"#!/bin/sh
case "$1" in
    --list-modules) echo jdk.compiler@17; echo jdk.httpserver@17 ;;
    *) echo 'openjdk version "17" (stand-in)' >&2 ;;
esac
"#;

    #[test]
    fn a_replica_is_recognised_by_its_version_and_pod_suffix() {
        assert_eq!(
            replica_marker("service-c-v2", "service-c-v2-0").unwrap(),
            "| v2 | 0 |"
        );
        assert_eq!(
            replica_marker("service-c-v1", "service-c-v1-5d8f7b9c4-x2k7z").unwrap(),
            "| v1 | x2k7z |"
        );
        assert!(replica_marker("service-d", "service-d-0").is_err());
    }
}
