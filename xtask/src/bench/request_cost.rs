//! What one proxied HTTP/1.1 keep-alive request costs the agent in user space: instructions and
//! heap allocations, counted exactly by callgrind whatever else the machine is doing (wall-clock
//! figures are not), on `mesh-l7`'s path: a 90/10 VirtualService with retries, a DestinationRule
//! with a pool and outlier detection, one worker.
//!
//! [`Upstream::Tunnel`] measures the same requests to the same pods put in the mesh: each goes
//! through a mutual TLS tunnel to the pod's inbound listener, on the same node, so the one agent
//! counts both ends of `mesh-mtls`'s path (source and destination). [`Upstream::Judged`] adds an
//! AuthorizationPolicy that reads HTTP, so the destination serves each request and judges it
//! before the app: the inbound hop's cost with L7 policy, beside the tunnel's.
//! [`Upstream::Captured`] has a client outside the mesh dial the pod's address: the kernel's
//! inbound capture hands each connection to the agent at the pod, which judges each request
//! with an HTTP policy and delivers it: the plaintext inbound hop alone.
//!
//! The release agent runs under `valgrind --tool=callgrind` on a node of its own; after a
//! warm-up the counters are zeroed, `requests` keep-alive GETs go through it on 16 connections,
//! and the profile of exactly those is dumped (kept under `target/bench/request-cost/` for
//! `callgrind_annotate --inclusive=yes`). Then 1,000 GETs each on a connection of its own, dumped
//! apart: what a new connection costs beyond a keep-alive request (the churn shape's).

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mesh_tests::{agent, world::World, Backend, ConfigDir, Pod, PodProcess, SimNode, IN_MESH};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::hyper_proxy::Split;
use super::proxies::{self, HYPER_PORT};

pub(super) const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const CONNECTIONS: &str = "16";

/// The measured agent's header and idle timeouts: longer than the exercise's 3 s of idleness,
/// short enough that what [`HelloNode::idle_until_closed`] leaves is closed within seconds.
const SHORT_TIMEOUTS: [&str; 4] = ["--http-header-timeout", "2", "--http-idle-timeout", "5"];

/// Requests measured on a connection each: what a new downstream connection costs beyond a
/// keep-alive request.
const CHURN_REQUESTS: u64 = 1_000;

/// Idle connections of each kind [`HelloNode::idle_until_closed`] leaves for the timeouts.
const IDLE_PER_KIND: &str = "20";

/// Allocation entry points, counted when called from outside the allocator: jemalloc's (the
/// agent's global allocator; its symbols carry tikv-jemalloc-sys's `_rjem_` prefix) and the C
/// library's (what C code in the process still calls).
const ALLOCATING: [&str; 9] = [
    "_rjem_malloc",
    "_rjem_mallocx",
    "_rjem_calloc",
    "_rjem_realloc",
    "_rjem_rallocx",
    "malloc",
    "calloc",
    "realloc",
    "posix_memalign",
];

/// How the agent reaches the service's pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// Plain TCP: the pods are not in the mesh (`mesh-l7`).
    Plain,
    /// A `CONNECT` stream in a mutual TLS tunnel to the pod's own listener (`mesh-mtls`, both
    /// ends in one agent).
    Tunnel,
    /// [`Upstream::Tunnel`], with an AuthorizationPolicy that admits the client's `GET`s: the
    /// destination judges each request.
    Judged,
    /// The client, outside the mesh, dials the pod `hello-v1`'s address; its agent captures
    /// each connection at the pod and judges each request (an HTTP policy for everyone).
    Captured,
}

impl Upstream {
    /// The pods are in the mesh: the agent has a CA, serves their tunnels and captures what
    /// arrives at them.
    fn in_mesh(self) -> bool {
        self != Upstream::Plain
    }
}

/// Admits the client pod (no `Pod` object: service account `default`) for `GET` only: a rule
/// that reads HTTP, so each request is served and judged by the destination.
const POLICY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: hello-get, namespace: default}
spec:
  selector: {matchLabels: {app: hello}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/default]}}]
    to: [{operation: {methods: [GET]}}]
";

/// Admits `GET` from anyone, identity or not: a rule that reads HTTP, so each captured request
/// is served and judged.
const CAPTURED_POLICY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: hello-get, namespace: default}
spec:
  selector: {matchLabels: {app: hello}}
  rules:
  - to: [{operation: {methods: [GET]}}]
";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RequestCost {
    pub requests: u64,
    pub instructions_per_request: f64,
    pub allocations_per_request: f64,
    /// What a request on a connection of its own costs beyond a keep-alive one: accepting the
    /// client's connection, finding where it was going, serving it and closing it.
    #[serde(default)]
    pub instructions_per_connection: f64,
    #[serde(default)]
    pub allocations_per_connection: f64,
    /// The requests measured.
    pub profile: PathBuf,
    /// The agent's start-up and warm-up, the requests on a connection each, and the rest of a
    /// bench's traffic ([`HelloNode::exercise`]).
    pub profiles_run: [PathBuf; 3],
    /// What a burst of idle connections runs ([`HelloNode::idle_until_closed`]), and the exit.
    pub profile_burst: PathBuf,
}

impl RequestCost {
    /// The figures as the bench prints them, for `whose` user space ("the agent's").
    pub fn summary(&self, whose: &str) -> String {
        format!(
            "{:.0} instructions and {:.1} allocations per request in {whose} user space, {:.0} \
             and {:.1} more for a connection of its own",
            self.instructions_per_request,
            self.allocations_per_request,
            self.instructions_per_connection,
            self.allocations_per_connection
        )
    }

    /// The figures of a run dumped in `out_dir`: its `requests` keep-alive requests to
    /// `callgrind.out.2`, its requests on a connection each to `.3`; `run` names the profiles
    /// of all it ran, `callgrind.out` holds what ran last.
    fn read(out_dir: &Path, requests: u64, run: [&str; 3]) -> Result<RequestCost> {
        let profile = out_dir.join("callgrind.out.2");
        let (instructions, allocations) = per_request(&profile, requests)?;
        let (churn_instructions, churn_allocations) =
            per_request(&out_dir.join("callgrind.out.3"), CHURN_REQUESTS)?;
        Ok(RequestCost {
            requests,
            instructions_per_request: instructions,
            allocations_per_request: allocations,
            instructions_per_connection: churn_instructions - instructions,
            allocations_per_connection: churn_allocations - allocations,
            profiles_run: run.map(|name| out_dir.join(name)),
            profile_burst: out_dir.join("callgrind.out"),
            profile,
        })
    }
}

/// What the node holds beside `hello`: a world of objects in the agent's folder, and idle pods
/// (`idle-1`, `idle-2`, ...) that the agent enrolls once it is ready.
#[derive(Clone, Copy, Debug, Default)]
pub struct Beside<'w> {
    pub world: Option<&'w World>,
    pub pods: usize,
}

pub fn measure(
    agent_bin: &Path,
    upstream_bin: &Path,
    out_dir: &Path,
    requests: u64,
    upstream: Upstream,
    beside: Beside,
    mangled_names: bool,
) -> Result<RequestCost> {
    let _ = std::fs::remove_dir_all(out_dir);
    std::fs::create_dir_all(out_dir)?;
    let hello = HelloNode::start(agent_bin, upstream_bin, out_dir, upstream, beside.world)?;
    let idle_pods = hello.add_idle_pods(beside.pods)?;
    let mut command = Command::new("valgrind");
    command
        .args(["--tool=callgrind", "--dump-instr=no"])
        // The symbols themselves, for the symbol order (`symbol_order`); the figures are the
        // same either way.
        .args(mangled_names.then_some("--demangle=no"))
        .arg(format!(
            "--callgrind-out-file={}",
            out_dir.join("callgrind.out").display()
        ))
        .arg(agent_bin);
    let mut agent = hello.spawn_agent(command)?;
    wait_ready(&hello.node, &agent)?;
    for pod in &idle_pods {
        hello.enroll(pod)?;
    }

    let warm_up = hello.get(requests / 10)?;
    ensure!(warm_up["errors"] == 0, "warm-up failed: {warm_up}");
    // Start-up and warm-up go to `callgrind.out.1`, the keep-alive requests measured to `.2`,
    // those on a connection each to `.3`, what follows to `.4` and `.out`: all five for the
    // symbol order (`symbol_order`).
    callgrind_control(&["-d"], agent.pid())?;
    let run = hello.get(requests)?;
    callgrind_control(&["-d"], agent.pid())?;
    let churn = hello.get_closing(CHURN_REQUESTS)?;
    callgrind_control(&["-d"], agent.pid())?;
    ensure!(
        churn["errors"] == 0 && churn["by_status"]["200"] == CHURN_REQUESTS,
        "not every request on a connection of its own answered 200: {churn}"
    );
    ensure!(
        run["errors"] == 0 && run["by_status"]["200"] == requests,
        "not every request answered 200: {run}"
    );
    if upstream != Upstream::Captured {
        ensure_split(&run, requests)?;
    }
    if upstream.in_mesh() {
        let (_, metrics) = agent::admin_request(&hello.node.netns_path(), "GET", "/metrics", "")?;
        let went_in = match upstream {
            Upstream::Captured => r#"mesh_redirect_decisions_total{decision="inbound_captured"} "#,
            _ => r#"mesh_tunnel_streams_total{direction="inbound"}"#,
        };
        ensure!(
            metrics.contains(went_in) && !metrics.contains(&format!("{went_in}0\n")),
            "no request went in as expected ({went_in}):\n{metrics}"
        );
        ensure!(
            !metrics.contains("mesh_authorization_denials_total{"),
            "the policy denied requests:\n{metrics}"
        );
    }
    // Not measured, but run, for the symbol order: the rest of what the bench's traffic does
    // (to `.4`), then what a burst of idle connections runs (to `.out`, with the exit).
    hello.exercise()?;
    callgrind_control(&["-d"], agent.pid())?;
    hello.idle_until_closed()?;
    agent.stop(Duration::from_secs(60))?;

    RequestCost::read(
        out_dir,
        requests,
        ["callgrind.out.1", "callgrind.out.3", "callgrind.out.4"],
    )
}

/// What the requests [`measure`] sends cost a proxy built the usual way on hyper in place of
/// the agent (`hyper-l7`'s: `xtask`, so glibc's malloc where the agent has jemalloc): the same
/// node, servers and client, the proxy in a pod of its own under callgrind. Nothing but a
/// reference: `profiles_run` and `profile_burst` name its profiles too, but the symbol order
/// never reads them.
pub fn measure_hyper(
    xtask_bin: &Path,
    upstream_bin: &Path,
    out_dir: &Path,
    requests: u64,
) -> Result<RequestCost> {
    let _ = std::fs::remove_dir_all(out_dir);
    std::fs::create_dir_all(out_dir)?;
    // The agent's binary only matters to a node whose pods are in the mesh: none here.
    let hello = HelloNode::start(xtask_bin, upstream_bin, out_dir, Upstream::Plain, None)?;
    let pod = hello.node.add_pod("proxy")?;
    let [v1, v2] = &hello.pods;
    let split = Split {
        port: HYPER_PORT,
        upstreams: [v1.addr(proxies::HELLO_PORT), v2.addr(proxies::HELLO_PORT)],
    };
    let mut command = Command::new("valgrind");
    command
        .args(["--tool=callgrind", "--dump-instr=no"])
        .arg(format!(
            "--callgrind-out-file={}",
            out_dir.join("callgrind.out").display()
        ))
        .arg(xtask_bin)
        .args(["bench", "--hyper-proxy", &split.arg()]);
    let mut proxy = hello.node.spawn_in_pod(&pod, command)?;
    proxy
        .stdout()
        .wait_for_line(|line| line == "listening", Duration::from_secs(120))
        .context("the hyper proxy did not start under callgrind")?;
    let url = format!("http://{}/", pod.addr(HYPER_PORT));
    let get =
        |count, flags: &[&str]| get(&hello.node, upstream_bin, &hello.client, &url, count, flags);
    let warm_up = get(requests / 10, &[])?;
    ensure!(warm_up["errors"] == 0, "warm-up failed: {warm_up}");
    callgrind_control(&["-d"], proxy.pid())?;
    let run = get(requests, &[])?;
    callgrind_control(&["-d"], proxy.pid())?;
    let churn = get(CHURN_REQUESTS, &["--close"])?;
    callgrind_control(&["-d"], proxy.pid())?;
    ensure!(
        run["errors"] == 0 && run["by_status"]["200"] == requests,
        "not every request through the hyper proxy answered 200: {run}"
    );
    ensure_split(&run, requests)?;
    ensure!(
        churn["errors"] == 0 && churn["by_status"]["200"] == CHURN_REQUESTS,
        "not every request on a connection of its own answered 200: {churn}"
    );
    proxy.stop(Duration::from_secs(10))?;

    RequestCost::read(
        out_dir,
        requests,
        ["callgrind.out.1", "callgrind.out.3", "callgrind.out"],
    )
}

/// That about one request in ten of the client's summary `run` (of `requests`) went to v2.
fn ensure_split(run: &Value, requests: u64) -> Result<()> {
    let v2_share = run["by_body"]["v2"].as_f64().unwrap_or(0.0) / requests as f64;
    ensure!((0.05..=0.15).contains(&v2_share), "not split 90/10: {run}");
    Ok(())
}

/// The node a request is measured on: a client pod, the service `hello` (pods `hello-v1` and
/// `hello-v2` serving, 90/10 with retries and outlier detection), `world` beside it in the
/// agent's folder, and the agent's command line for `upstream`.
pub(super) struct HelloNode {
    pub node: SimNode,
    pub client: Pod,
    pods: [Pod; 2],
    _servers: [PodProcess; 2],
    _config: ConfigDir,
    agent_args: Vec<OsString>,
    admin_socket: PathBuf,
    url: String,
    /// Where `url` goes, as an address the hostile neighbour (`hog`) dials.
    target: String,
    upstream_bin: PathBuf,
}

impl HelloNode {
    pub fn start(
        agent_bin: &Path,
        upstream_bin: &Path,
        out_dir: &Path,
        upstream: Upstream,
        world: Option<&World>,
    ) -> Result<HelloNode> {
        let node = SimNode::new()?;
        let client = node.add_pod("client")?;
        let v1 = node.add_pod("hello-v1")?;
        let v2 = node.add_pod("hello-v2")?;
        node.add_host("hello", VIP)?;
        let servers = [
            serve(&node, upstream_bin, &v1, "v1")?,
            serve(&node, upstream_bin, &v2, "v2")?,
        ];
        let config = ConfigDir::new()?;
        let mut enrolled = if upstream == Upstream::Captured {
            vec![]
        } else {
            vec![&client]
        };
        let mut labels = [
            vec![("app", "hello"), ("version", "v1")],
            vec![("app", "hello"), ("version", "v2")],
        ];
        let ca = out_dir.join("ca");
        if upstream.in_mesh() {
            // The destination agent is this one: it serves the pods' tunnel listeners.
            enrolled.extend([&v1, &v2]);
            for labels in &mut labels {
                labels.push(IN_MESH);
            }
            // A throwaway CA: a run's certificates need not outlive it.
            let _ = std::fs::remove_dir_all(&ca);
            mesh_tests::ca_init(agent_bin, &ca)?;
        }
        config.service(
            "hello",
            VIP,
            proxies::HELLO_PORT,
            "http",
            &[
                Backend {
                    pod: &v1,
                    labels: &labels[0],
                },
                Backend {
                    pod: &v2,
                    labels: &labels[1],
                },
            ],
        )?;
        config.write("rules.yml", &proxies::mesh_rules("hello"))?;
        match upstream {
            Upstream::Judged => config.write("policy.yml", POLICY)?,
            Upstream::Captured => config.write("policy.yml", CAPTURED_POLICY)?,
            Upstream::Plain | Upstream::Tunnel => {}
        }
        if let Some(world) = world {
            config.write("world.yml", &world.yaml())?;
        }
        let (url, target) = match upstream {
            Upstream::Captured => (
                format!("http://{}:{}/", v1.ip(), proxies::HELLO_PORT),
                format!("{}:{}", v1.ip(), proxies::HELLO_PORT),
            ),
            _ => (
                format!("http://hello:{}/", proxies::HELLO_PORT),
                format!("{VIP}:{}", proxies::HELLO_PORT),
            ),
        };

        let mut agent_args: Vec<OsString> = vec!["run".into(), "--cgroup".into()];
        agent_args.push(node.cgroup_path().into());
        agent_args.extend(["--admin", agent::ADMIN].map(OsString::from));
        let temp = |suffix: &str| {
            std::env::temp_dir()
                .join(format!("mesh-bench-{}-{suffix}", std::process::id()))
                .into_os_string()
        };
        // Not the default sockets, which an agent running on this machine may hold (and the
        // default handover socket would have this agent take over from that one).
        let admin_socket = PathBuf::from(temp("request-cost.sock"));
        agent_args.extend(["--admin-socket".into(), admin_socket.clone().into()]);
        agent_args.extend([
            "--handover-socket".into(),
            temp("request-cost.handover.sock"),
        ]);
        // The node's own bpffs: what inbound capture pins goes with the node.
        agent_args.extend(["--bpf-pin-dir".into(), node.bpffs_dir().into()]);
        agent_args.extend(["--config".into(), config.path().into()]);
        for pod in enrolled {
            let netns = pod.netns_path();
            agent_args.extend([
                "--enroll".into(),
                format!("{}={}", pod.name(), netns.display()).into(),
            ]);
        }
        if upstream.in_mesh() {
            agent_args.extend(["--ca".into(), ca.into_os_string()]);
        }
        Ok(HelloNode {
            node,
            client,
            pods: [v1, v2],
            _servers: servers,
            _config: config,
            agent_args,
            admin_socket,
            url,
            target,
            upstream_bin: upstream_bin.to_owned(),
        })
    }

    /// Starts the agent on the node with one worker: `command` (the agent, or a tool that runs
    /// it) with the agent's arguments added, and connection timeouts short enough for
    /// [`Self::idle_until_closed`] to see them close what it leaves idle.
    pub fn spawn_agent(&self, command: Command) -> Result<PodProcess> {
        self.spawn(command, 1, &SHORT_TIMEOUTS)
    }

    /// Starts the agent with `workers` data-path threads and the default timeouts.
    pub fn spawn_agent_with_workers(&self, command: Command, workers: usize) -> Result<PodProcess> {
        self.spawn(command, workers, &[])
    }

    fn spawn(&self, mut command: Command, workers: usize, extra: &[&str]) -> Result<PodProcess> {
        command
            .args(&self.agent_args)
            .args(extra)
            .args(["--workers", &workers.to_string()]);
        self.node.spawn_on_node(command)
    }

    /// `count` pods `idle-1` to `idle-<count>`, serving nothing, for the agent to enroll.
    pub fn add_idle_pods(&self, count: usize) -> Result<Vec<Pod>> {
        let first = self
            .node
            .pods()
            .iter()
            .filter(|pod| pod.name().starts_with("idle-"))
            .count()
            + 1;
        (first..first + count)
            .map(|n| self.node.add_pod(&format!("idle-{n}")))
            .collect()
    }

    /// Enrolls `pod` through the agent's admin socket (`POST /pods`), as at run time on a node.
    pub fn enroll(&self, pod: &Pod) -> Result<()> {
        let body = serde_json::json!({ "name": pod.name(), "netns": pod.netns_path() });
        let headers = [("Content-Type", "application/json")];
        let (status, answer) = mesh_tests::http::request_unix(
            &self.admin_socket,
            "POST",
            "/pods",
            &headers,
            &body.to_string(),
        )?;
        ensure!(
            status == 200,
            "enrolling {} answered {status}: {answer}",
            pod.name()
        );
        Ok(())
    }

    /// `count` keep-alive GETs of the service from the client pod; the client's summary.
    pub fn get(&self, count: u64) -> Result<Value> {
        get(
            &self.node,
            &self.upstream_bin,
            &self.client,
            &self.url,
            count,
            &[],
        )
    }

    /// `count` GETs, each on a connection of its own (the bench's churn shape).
    fn get_closing(&self, count: u64) -> Result<Value> {
        get(
            &self.node,
            &self.upstream_bin,
            &self.client,
            &self.url,
            count,
            &["--close"],
        )
    }

    /// What a bench run does to the agent beyond requests, so that the code it runs is among
    /// what the symbol order lays out first: connections left idle until they sleep and then
    /// woken (between its shapes), and the admin reads it makes (`/metrics`, `/stats`).
    fn exercise(&self) -> Result<()> {
        // Past the downstream and upstream connections' second of idleness.
        std::thread::sleep(Duration::from_secs(3));
        let woken = self.get(200)?;
        ensure!(
            woken["errors"] == 0,
            "requests after idleness failed: {woken}"
        );
        for path in ["/metrics", "/stats"] {
            let (status, _) = agent::admin_request(&self.node.netns_path(), "GET", path, "")?;
            ensure!(status == 200, "GET {path} answered {status}");
        }
        Ok(())
    }

    /// A few of each kind of idle connection a burst from a hostile neighbour opens (silent,
    /// half a head, part of an HTTP/2 preface, idle HTTP/2, idle keep-alive), left until the
    /// agent's timeouts close them: the code a burst runs, which an agent that has only served
    /// requests never paged in.
    fn idle_until_closed(&self) -> Result<()> {
        let hog_bin = self.upstream_bin.with_file_name("hog");
        let mut command = Command::new(&hog_bin);
        command.args(["idle", "--target", &self.target, "--host", "hello"]);
        for kind in [
            "--silent",
            "--half-header",
            "--partial-preface",
            "--idle-h2",
            "--idle-keepalive",
        ] {
            command.args([kind, IDLE_PER_KIND]);
        }
        command.args(["--wait-secs", "60"]);
        let mut hog = self.node.spawn_in_pod(&self.client, command)?;
        let status = hog.finish(Duration::from_secs(120))?;
        ensure!(
            status.success(),
            "{} failed: {}",
            hog_bin.display(),
            hog.stderr().text()
        );
        let lines = hog.stdout().json_lines();
        let summary = lines.last().context("the hog printed nothing")?;
        ensure!(
            summary["open"] == serde_json::json!({}),
            "idle connections left open past the agent's timeouts: {summary}"
        );
        Ok(())
    }
}

fn serve(node: &SimNode, upstream_bin: &Path, pod: &Pod, name: &str) -> Result<PodProcess> {
    let mut command = Command::new(upstream_bin);
    command.args(["serve", "--listen", "0.0.0.0:8080", "--name", name]);
    let server = node.spawn_in_pod(pod, command)?;
    server.stdout().wait_for_json(
        |line| line["listening"].is_string(),
        Duration::from_secs(10),
    )?;
    Ok(server)
}

/// `count` keep-alive GETs of `url` from the client pod; the client's summary.
fn get(
    node: &SimNode,
    upstream_bin: &Path,
    client: &Pod,
    url: &str,
    count: u64,
    flags: &[&str],
) -> Result<Value> {
    let mut command = Command::new(upstream_bin);
    command.args(["get", "--url", url, "--quiet"]).args(flags);
    command.args(["--count", &count.to_string(), "--concurrency", CONNECTIONS]);
    command.args(["--timeout-secs", "60"]);
    let mut process = node.spawn_in_pod(client, command)?;
    let status = process.finish(Duration::from_secs(3600))?;
    ensure!(
        status.success(),
        "the client failed: {}",
        process.stderr().text()
    );
    process
        .stdout()
        .json_lines()
        .last()
        .cloned()
        .context("the client printed no summary")
}

/// The agent starts some 50 times slower under callgrind.
pub(super) fn wait_ready(node: &SimNode, agent: &PodProcess) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !matches!(
        agent::admin_request(&node.netns_path(), "GET", "/ready", ""),
        Ok((200, _))
    ) {
        if agent.stderr().is_closed() {
            bail!("the agent exited:\n{}", agent.stderr().text());
        }
        if Instant::now() > deadline {
            bail!("the agent under callgrind was not ready in 300 s");
        }
        // Fine enough to time a native agent's start (`--scale`).
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn callgrind_control(args: &[&str], pid: u32) -> Result<()> {
    let status = Command::new("callgrind_control")
        .args(args)
        .arg(pid.to_string())
        .stdout(std::process::Stdio::null())
        .status()
        .context("running callgrind_control")?;
    ensure!(status.success(), "callgrind_control {args:?} failed");
    Ok(())
}

/// Total instructions, and calls per callee made from outside the allocator.
/// Instructions and allocations per request in the profile of `requests` requests.
fn per_request(profile: &Path, requests: u64) -> Result<(f64, f64)> {
    let (instructions, calls) = read_profile(profile)?;
    let allocations: u64 = ALLOCATING.iter().filter_map(|f| calls.get(*f)).sum();
    Ok((
        instructions as f64 / requests as f64,
        allocations as f64 / requests as f64,
    ))
}

fn read_profile(path: &Path) -> Result<(u64, HashMap<String, u64>)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the profile {}", path.display()))?;
    let mut names: HashMap<String, String> = HashMap::new();
    // `fn=(12) name` defines id 12; later `fn=(12)` refers to it (cfn shares the ids).
    let mut name_of = |spec: &str| -> String {
        let spec = spec.trim();
        match spec.strip_prefix('(').and_then(|s| s.split_once(')')) {
            Some((id, rest)) => {
                let rest = rest.trim();
                if !rest.is_empty() {
                    names.insert(id.to_owned(), rest.to_owned());
                }
                names.get(id).cloned().unwrap_or_default()
            }
            None => spec.to_owned(),
        }
    };
    let (mut total, mut caller, mut callee) = (0, String::new(), String::new());
    let mut calls: HashMap<String, u64> = HashMap::new();
    for line in text.lines() {
        if let Some(spec) = line.strip_prefix("fn=") {
            caller = name_of(spec);
        } else if let Some(spec) = line.strip_prefix("cfn=") {
            callee = name_of(spec);
        } else if let Some(rest) = line.strip_prefix("calls=") {
            let count: u64 = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .context("a calls= line without a count")?;
            // Calls the allocator makes to itself (realloc → malloc) are not the agent's.
            if !ALLOCATING.contains(&caller.as_str())
                && !caller.starts_with("_int_")
                && !caller.starts_with("_rjem_")
            {
                *calls.entry(callee.clone()).or_default() += count;
            }
        } else if let Some(n) = line
            .strip_prefix("summary:")
            .or_else(|| line.strip_prefix("totals:"))
        {
            total = n.trim().parse().context("the profile's total")?;
        }
    }
    Ok((total, calls))
}
